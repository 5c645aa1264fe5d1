//! The node agent (`regmirror-operator agent`), one pod per node for every
//! RegistryMirror (issue 17), run by the chart's DaemonSet: it watches all
//! mirrors and its own Node, reconciles the node's containerd `hosts.toml`
//! files to exactly what the mirrors that select the node want, and reports
//! the result to its node's `RegistryMirrorNode`.
//!
//! - [`plan`]: the pure decisions (what each mirror wants here, what goes,
//!   what is reported, what counts as a change);
//! - [`files`]: one pass's file work (blocking, through the node crate);
//! - [`report`]: the node's `RegistryMirrorNode`;
//! - this module: the watches and the loop.
//!
//! Files are removed when no mirror wants them here any more (deleted or
//! deleting mirror, node de-selected, mirror moved, orphans), never when the
//! agent stops: a rolling update of the agent must not send pulls around the
//! cache.

pub mod files;
pub mod plan;
pub mod report;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff as _;
use kube::runtime::watcher::DefaultBackoff;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::crd::{NodeState, RegistryMirror};
use crate::installation::{self, Installation};
use crate::node_report::{MirrorOnNode, RegistryMirrorNode};
use crate::quiet::{FailureLog, Say};
use plan::{MirrorPlan, known_dirs, mirror_key, node_key};

/// Files are re-checked this often even without a change (locally, no API
/// request), so a wiped or edited hosts.toml comes back.
pub const RESYNC: Duration = Duration::from_secs(30);
/// An unchanged report is rewritten this often (`lastUpdate`, a heartbeat).
pub const HEARTBEAT: Duration = Duration::from_secs(300);

/// What the agent is told at start (`regmirror-operator agent` flags).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name: the Node watched, the `RegistryMirrorNode` written.
    pub node_name: String,
    /// Where containerd on this node reaches the caches' NodePorts.
    pub node_ip: String,
    /// Where this process sees the node's `/` (`/host` in the pod).
    pub host_root: PathBuf,
    /// Node paths the installer lets the agent touch (chart `agent.hostDirs`);
    /// see [`crate::selection::within_allowed`].
    pub allowed_dirs: Vec<String>,
    /// How often files are re-checked without a change.
    pub resync: Duration,
    /// How often an unchanged report is rewritten.
    pub heartbeat: Duration,
    /// This agent's installation: while the claim on the RegistryMirrors
    /// ([`crate::installation`]) names another, the agent touches no file
    /// and writes no report (two installations' agents would fight over
    /// each node). `None`: no check.
    pub installation: Option<Installation>,
}

/// The failure logs of the agent's sources of API errors.
#[derive(Debug, Default)]
struct Failures {
    claim: FailureLog,
    mirrors: FailureLog,
    node: FailureLog,
    read: FailureLog,
    report: FailureLog,
}

/// Logs `error` from the source `log` unless it is a repeat within
/// [`crate::quiet::LOG_EVERY`] (issue 17: an unreachable API server wrote
/// 312,540 lines in 11 s).
fn failed(log: &mut FailureLog, what: &str, error: &kube::Error) {
    failed_text(log, what, crate::controller::api_error_text(error));
}

/// A watch's failure as [`failed`] logs it; an expired resource version
/// (410 Gone: the watch re-lists, as after every API server restart) is
/// routine and logged at debug only.
fn watch_failed(log: &mut FailureLog, what: &str, error: &watcher::Error) {
    match error {
        watcher::Error::WatchError(s) if s.code == 410 => {
            tracing::debug!(error = %s.message, "{what}: re-listing");
        }
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => failed(log, what, e),
        other => failed_text(log, what, other.to_string()),
    }
}

/// Logs `text` from the source `log` unless it is a repeat within
/// [`crate::quiet::LOG_EVERY`].
fn failed_text(log: &mut FailureLog, what: &str, text: String) {
    if let Some(Say::Failure { suppressed }) = log.failure(&text, Instant::now()) {
        if suppressed == 0 {
            tracing::warn!(error = %text, "{what}");
        } else {
            tracing::warn!(error = %text, suppressed, "{what} (still failing)");
        }
    }
}

/// Logs the first success of the source `log` after failures, once.
fn succeeded(log: &mut FailureLog, what: &str) {
    if let Some(Say::Recovered { failures, lasted }) = log.success(Instant::now()) {
        let lasted = humantime::format_duration(Duration::from_secs(lasted.as_secs()));
        tracing::info!(failures, %lasted, "{what} works again");
    }
}

/// What the agent keeps between passes.
#[derive(Debug, Default)]
struct State {
    /// The report's entries before this process started; `None` until read.
    previous: Option<Vec<MirrorOnNode>>,
    /// The Node uid the node's `RegistryMirrorNode` was last made owned by
    /// (`None`: not known to exist, or not yet adopted by this process).
    owned_by: Option<String>,
    /// Every directory (node path) known so far: files of a mirror that
    /// moved or went are found there.
    dirs: BTreeSet<String>,
    /// The last report written.
    last: Option<report::Written>,
}

/// How a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Passed {
    /// Files reconciled and the report in line; `reconciled`: without a
    /// failed file operation.
    Done { reconciled: bool },
    /// The Node does not exist (yet): nothing done.
    NoNode,
    /// An API request failed (logged): retried after a backoff.
    ApiFailed,
}

/// The API objects one agent uses.
struct Apis {
    reports: Api<RegistryMirrorNode>,
}

/// One pass: reconcile the files to the watched view, report when due.
async fn pass(
    cfg: &AgentConfig,
    apis: &Apis,
    (mirrors, nodes): (&Store<RegistryMirror>, &Store<Node>),
    st: &mut State,
    failures: &mut Failures,
) -> anyhow::Result<Passed> {
    if st.previous.is_none() {
        match report::read(&apis.reports, &cfg.node_name).await {
            Ok(p) => {
                succeeded(&mut failures.read, "reading this node's report");
                st.previous = Some(p.unwrap_or_default());
            }
            Err(e) => {
                failed(
                    &mut failures.read,
                    "cannot read this node's report; files left as they are",
                    &e,
                );
                return Ok(Passed::ApiFailed);
            }
        }
    }
    let Some(node) = nodes.state().into_iter().next() else {
        return Ok(Passed::NoNode);
    };
    let plans: Vec<MirrorPlan> = mirrors
        .state()
        .iter()
        .map(|m| plan::plan(m, &node, &cfg.node_ip, &cfg.allowed_dirs))
        .collect();
    let earlier: Vec<MirrorOnNode> = match &st.last {
        Some((e, _)) => e.clone(),
        None => st.previous.clone().unwrap_or_default(),
    };
    let previous_dirs = st
        .previous
        .iter()
        .flatten()
        .chain(&earlier)
        .map(|e| e.config_dir.as_str());
    st.dirs
        .extend(known_dirs(&plans, previous_dirs, &cfg.allowed_dirs));
    let (root, p, dirs) = (cfg.host_root.clone(), plans.clone(), st.dirs.clone());
    let runtime = node
        .status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.container_runtime_version.clone())
        .filter(|v| !v.is_empty());
    let outcome =
        tokio::task::spawn_blocking(move || files::reconcile(&root, &p, &dirs, runtime.as_deref()))
            .await?;
    let entries = plan::entries(&plans, &outcome, &earlier);
    let done = Passed::Done {
        reconciled: outcome.reconciled(),
    };
    let uid = node.meta().uid.clone().unwrap_or_default();
    if st.owned_by.as_deref() != Some(uid.as_str()) {
        // First report of this process, or the Node was created again:
        // (re)create the object owned by this Node, and write at once.
        st.last = None;
    }
    if !report::due(st.last.as_ref(), &entries, Instant::now(), cfg.heartbeat) {
        return Ok(done);
    }
    // A 404 means the object went (deleted, or collected with an old Node):
    // adopted again and written once more in the same pass.
    for attempt in 0..2 {
        if st.owned_by.as_deref() != Some(uid.as_str()) {
            if let Err(e) = report::adopt(&apis.reports, &cfg.node_name, &uid).await {
                failed(&mut failures.report, "cannot create this node's report", &e);
                return Ok(Passed::ApiFailed);
            }
            st.owned_by = Some(uid.clone());
        }
        match report::write(&apis.reports, &cfg.node_name, &entries).await {
            Ok(()) => {
                succeeded(&mut failures.report, "reporting this node's result");
                if st.last.as_ref().is_none_or(|(e, _)| *e != entries) {
                    log_entries(&entries);
                }
                st.last = Some((entries, Instant::now()));
                return Ok(done);
            }
            Err(e) if report::not_found(&e) && attempt == 0 => {
                tracing::debug!("this node's report is gone: creating it again");
                st.owned_by = None;
            }
            Err(e) => {
                failed(&mut failures.report, "cannot report this node's result", &e);
                return Ok(Passed::ApiFailed);
            }
        }
    }
    Ok(Passed::ApiFailed)
}

/// Logs a changed report: one line with the summary, one per problem.
fn log_entries(entries: &[MirrorOnNode]) {
    tracing::info!(summary = %plan::summary(entries), "reported");
    for e in entries {
        if matches!(
            e.state,
            NodeState::Conflict | NodeState::Failed | NodeState::NotEffective
        ) {
            let message = e.message.as_deref().unwrap_or_default();
            tracing::warn!(mirror = %e.mirror, state = ?e.state, %message, "not configured");
        }
    }
}

/// The installation other than `me` that the claim on the RegistryMirror
/// CRD names, if any (an absent or malformed claim is nobody's: this
/// installation's operator takes it).
fn other_claimant(crds: &Store<CustomResourceDefinition>, me: &Installation) -> Option<String> {
    crds.state()
        .first()
        .and_then(|crd| installation::claim_text(crd).and_then(Installation::parse))
        .filter(|c| c != me)
        .map(|c| c.id())
}

/// What of the watched view the files depend on ([`plan::mirror_key`],
/// [`plan::node_key`]): a pass runs when it changes.
fn view(mirrors: &Store<RegistryMirror>, nodes: &Store<Node>) -> Value {
    let mut ms: Vec<(String, Value)> = mirrors
        .state()
        .iter()
        .map(|m| (m.meta().name.clone().unwrap_or_default(), mirror_key(m)))
        .collect();
    ms.sort_by(|a, b| a.0.cmp(&b.0));
    let node = nodes.state().first().map(|n| node_key(n));
    serde_json::json!({"mirrors": ms, "node": node})
}

/// A watch of `api` (narrowed by `config`) kept in `writer`'s store, with
/// kube-runtime's [`DefaultBackoff`] on errors. `Init` is emitted before each
/// (re-)list is even tried, and the backoff resets on any `Ok`: it is
/// filtered out after the store saw it, or a failing list would be retried
/// every 0.8-1.6 s for ever instead of backing off.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
) -> impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    watcher(api, config)
        .reflect(writer)
        .filter(|e| std::future::ready(!matches!(e, Ok(watcher::Event::Init))))
        .default_backoff()
}

/// Records one watch event in `log` (errors rate-limited); sets `listed`
/// when it completed a list and clears `open` when the stream ended.
fn watched<K>(
    event: Option<watcher::Result<watcher::Event<K>>>,
    log: &mut FailureLog,
    what: &str,
    listed: &mut bool,
    open: &mut bool,
) {
    match event {
        Some(Ok(e)) => {
            succeeded(log, &format!("watching {what}"));
            if matches!(e, watcher::Event::InitDone) {
                *listed = true;
            }
        }
        // The stream itself waits out its backoff before the next try.
        Some(Err(e)) => watch_failed(log, &format!("cannot watch {what}"), &e),
        None => *open = false,
    }
}

/// Runs until `shutdown`: after both watches (all RegistryMirrors, this
/// Node) have listed once, a pass on every change the files depend on and
/// every `resync`; `ready` is set after each pass to whether it reconciled
/// the node without a failed file operation and its report is written.
///
/// Backoff (issue 17): the watches and the passes each back off with
/// kube-runtime's [`DefaultBackoff`] (client-go's reflector parameters:
/// 0.8 s doubling with jitter up to 30 s, reset after 120 s without
/// errors), reset after a success; repeated failures are logged through
/// [`FailureLog`].
pub async fn run(
    client: Client,
    cfg: AgentConfig,
    ready: &AtomicBool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (mirrors, mirror_writer) = reflector::store::<RegistryMirror>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let mirror_events = watch(
        Api::<RegistryMirror>::all(client.clone()),
        watcher::Config::default(),
        mirror_writer,
    );
    let node_events = watch(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", cfg.node_name)),
        node_writer,
    );
    // The installation claim lives on the RegistryMirror CRD: watched only
    // when this agent knows its installation.
    let (crds, crd_writer) = reflector::store::<CustomResourceDefinition>();
    let crd_events = watch(
        Api::<CustomResourceDefinition>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", installation::CRD_NAME)),
        crd_writer,
    );
    let mut mirror_events = std::pin::pin!(mirror_events);
    let mut node_events = std::pin::pin!(node_events);
    let mut crd_events = std::pin::pin!(crd_events);
    let checks_claim = cfg.installation.is_some();
    let (mut crd_listed, mut crd_open) = (!checks_claim, checks_claim);
    // The other installation this agent defers to, while it does.
    let mut deferring: Option<String> = None;
    let apis = Apis {
        reports: Api::all(client),
    };
    let (mut mirrors_listed, mut node_listed) = (false, false);
    let (mut mirrors_open, mut node_open) = (true, true);
    let mut st = State::default();
    let mut failures = Failures::default();
    let mut backoff = DefaultBackoff::default();
    // The view of the last pass that succeeded; `None` forces the next one.
    let mut passed: Option<Value> = None;
    // After a failed pass only the backoff timer starts the next one.
    let mut failing = false;
    let mut waiting_for_node = false;
    let mut next = tokio::time::Instant::now() + cfg.resync;
    tracing::info!(
        node = %cfg.node_name,
        host_root = %cfg.host_root.display(),
        allowed = %cfg.allowed_dirs.join(","),
        "node agent started"
    );
    loop {
        let mut due = false;
        tokio::select! {
            e = mirror_events.next(), if mirrors_open => watched(e, &mut failures.mirrors, "the mirrors", &mut mirrors_listed, &mut mirrors_open),
            e = node_events.next(), if node_open => watched(e, &mut failures.node, "this node", &mut node_listed, &mut node_open),
            e = crd_events.next(), if crd_open => watched(e, &mut failures.claim, "the installation claim", &mut crd_listed, &mut crd_open),
            () = tokio::time::sleep_until(next) => {
                due = true;
                next = tokio::time::Instant::now() + cfg.resync;
            }
            () = shutdown.cancelled() => break,
        }
        // Never before both lists: an empty view would remove everything.
        if !(mirrors_listed && node_listed && crd_listed) {
            continue;
        }
        if let Some(me) = &cfg.installation {
            match other_claimant(&crds, me) {
                Some(other) => {
                    if deferring.as_deref() != Some(other.as_str()) {
                        tracing::warn!(installation = %me.id(), %other, "another regmirror installation ({other}) manages the RegistryMirrors: this agent touches no file and writes no report while it does");
                    }
                    deferring = Some(other);
                    ready.store(false, Ordering::Relaxed);
                    passed = None;
                    continue;
                }
                None if deferring.take().is_some() => {
                    tracing::info!(
                        "this installation manages the RegistryMirrors again: reconciling"
                    );
                }
                None => {}
            }
        }
        let now_view = view(&mirrors, &nodes);
        let changed = passed.as_ref() != Some(&now_view);
        if !(due || (changed && !failing)) {
            continue;
        }
        if changed {
            tracing::debug!("the mirrors or this Node changed: reconciling");
        }
        let outcome = pass(&cfg, &apis, (&mirrors, &nodes), &mut st, &mut failures).await?;
        ready.store(
            outcome == Passed::Done { reconciled: true },
            Ordering::Relaxed,
        );
        failing = outcome == Passed::ApiFailed;
        if failing {
            passed = None;
            // DefaultBackoff never runs out; the cap is its own.
            next = tokio::time::Instant::now() + backoff.next().unwrap_or(cfg.resync);
            continue;
        }
        backoff.reset();
        passed = Some(now_view);
        next = tokio::time::Instant::now() + cfg.resync;
        let no_node = outcome == Passed::NoNode;
        if no_node && !waiting_for_node {
            tracing::warn!(node = %cfg.node_name, "no Node of this name: waiting for it before touching any file");
        }
        waiting_for_node = no_node;
    }
    tracing::info!("node agent stopped; files stay until no mirror wants them");
    Ok(())
}
