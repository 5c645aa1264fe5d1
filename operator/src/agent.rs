//! The node agent (`regmirror-operator agent`), one pod per node per mirror:
//! writes this node's containerd `hosts.toml` files for the mirror's hosts,
//! tells whether containerd will read them, and reports the result as its own
//! entry of the mirror's `status.nodes` (server-side apply, one field manager
//! per node, so agents and the operator never overwrite each other).
//!
//! Files are removed only when the mirror is being deleted (the operator's
//! finalizer waits for the `Removed` report), never when the pod restarts:
//! a rolling update of the agent must not send pulls around the cache.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::utils::Backoff as _;
use kube::runtime::watcher::DefaultBackoff;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource};
use regmirror_node::{Apply, HostReport, HostState, HostsToml, MergeMode};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::crd::{NodeResult, NodeState, RegistryMirror};
use crate::quiet::{FailureLog, Say};

/// Files are re-checked this often even without a change to the mirror, so a
/// wiped or edited hosts.toml comes back.
pub const RESYNC: Duration = Duration::from_secs(30);
/// An unchanged result is re-reported this often (a heartbeat in `lastUpdate`).
pub const REPORT_EVERY: Duration = Duration::from_secs(300);
/// How long containerd waits to connect to the cache before trying the next host.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub mirror: String,
    pub node_name: String,
    pub node_ip: String,
    /// The hosts directory as this process sees it (`/host/etc/containerd/certs.d`).
    pub hosts_dir: PathBuf,
    /// The same directory as containerd on the node names it.
    pub hosts_dir_on_node: String,
    /// containerd's config.toml as this process sees it.
    pub containerd_config: PathBuf,
    pub resync: Duration,
}

/// The files this node should have for `mirror`, or why there are none yet.
pub fn desired(mirror: &RegistryMirror, node_ip: &str) -> Result<Vec<HostsToml>, String> {
    let status = mirror.status.as_ref();
    let hosts = status
        .and_then(|s| s.hosts.as_ref())
        .ok_or("waiting for the operator to publish the mirror's hosts")?;
    let port = status
        .and_then(|s| s.node_port)
        .ok_or("waiting for the cache Service's NodePort")?;
    let ip = if node_ip.contains(':') {
        format!("[{node_ip}]")
    } else {
        node_ip.to_owned()
    };
    Ok(hosts
        .iter()
        .filter_map(|h| mirror.spec.upstreams.iter().find(|u| &u.host == h))
        .map(|u| HostsToml {
            registry: u.host.clone(),
            server: u.effective_url(),
            mirror: format!("http://{ip}:{port}"),
            dial_timeout: DIAL_TIMEOUT,
            owner: mirror_name(mirror),
        })
        .collect())
}

fn mirror_name(mirror: &RegistryMirror) -> String {
    mirror.meta().name.clone().unwrap_or_default()
}

/// `report` with the paths in its message as the node's user knows them:
/// `seen_as` (where this container mounts the hosts directory, under
/// `/host`) replaced by `on_node` (the directory on the node).
pub fn on_node(mut report: HostReport, seen_as: &std::path::Path, on_node: &str) -> HostReport {
    let seen_as = seen_as.display().to_string();
    if let HostState::Conflict(m) | HostState::Failed(m) = &mut report.state {
        *m = m.replace(&seen_as, on_node);
    }
    report
}

/// This node's state from the file results and containerd's configuration.
pub fn node_state(
    reports: &[HostReport],
    detection: &regmirror_node::Detection,
) -> (NodeState, String) {
    let describe = |want: fn(&HostState) -> Option<&String>| -> Vec<String> {
        reports
            .iter()
            .filter_map(|r| want(&r.state).map(|m| format!("{}: {m}", r.registry)))
            .collect()
    };
    let failed = describe(|s| match s {
        HostState::Failed(m) => Some(m),
        _ => None,
    });
    if !failed.is_empty() {
        return (NodeState::Failed, failed.join("; "));
    }
    let conflicts = describe(|s| match s {
        HostState::Conflict(m) => Some(m),
        _ => None,
    });
    if !conflicts.is_empty() {
        return (NodeState::Conflict, conflicts.join("; "));
    }
    if !detection.reads_hosts {
        return (NodeState::NotEffective, detection.message.clone());
    }
    let hosts: Vec<&str> = reports
        .iter()
        .filter(|r| matches!(r.state, HostState::Configured | HostState::Unchanged))
        .map(|r| r.registry.as_str())
        .collect();
    (
        NodeState::Configured,
        format!("pulls of {} go through the cache", hosts.join(", ")),
    )
}

/// One pass: bring the files in line with the mirror; the state to report.
/// `None` when there is nothing to report (mirror gone).
pub fn reconcile_files(
    cfg: &AgentConfig,
    mirror: Option<&RegistryMirror>,
) -> Option<(NodeState, String)> {
    let Some(mirror) = mirror else {
        // Deleted without us seeing it (finalizer timed out): clean up anyway.
        regmirror_node::remove_owned(&cfg.hosts_dir, &cfg.mirror);
        return None;
    };
    if mirror.meta().deletion_timestamp.is_some() {
        let reports = regmirror_node::remove_owned(&cfg.hosts_dir, &cfg.mirror);
        let failed: Vec<String> = reports
            .iter()
            .filter_map(|r| match &r.state {
                HostState::Failed(m) => Some(format!("{}: {m}", r.registry)),
                _ => None,
            })
            .collect();
        return Some(if failed.is_empty() {
            (NodeState::Removed, "configuration removed".into())
        } else {
            (NodeState::Failed, failed.join("; "))
        });
    }
    let want = match desired(mirror, &cfg.node_ip) {
        Ok(w) => w,
        Err(waiting) => return Some((NodeState::NotEffective, waiting)),
    };
    let merge = if mirror.spec.nodes.merge_existing {
        MergeMode::KeepUserHosts
    } else {
        MergeMode::Never
    };
    let reports: Vec<HostReport> = regmirror_node::apply(
        Apply {
            dir: &cfg.hosts_dir,
            owner: &cfg.mirror,
            merge,
        },
        &want,
    )
    .into_iter()
    .map(|r| on_node(r, &cfg.hosts_dir, &cfg.hosts_dir_on_node))
    .collect();
    for r in &reports {
        match &r.state {
            HostState::Configured => tracing::info!(registry = %r.registry, "hosts.toml written"),
            HostState::Removed => tracing::info!(registry = %r.registry, "hosts.toml removed"),
            HostState::Conflict(m) | HostState::Failed(m) => {
                tracing::warn!(registry = %r.registry, problem = %m, "hosts.toml not written")
            }
            HostState::Unchanged => {}
        }
    }
    let config = std::fs::read_to_string(&cfg.containerd_config).ok();
    let detection = regmirror_node::inspect(config.as_deref(), &cfg.hosts_dir_on_node);
    Some(node_state(&reports, &detection))
}

fn field_manager(node: &str) -> String {
    // Field managers are limited to 128 characters.
    let mut m = format!("regmirror-agent/{node}");
    m.truncate(128);
    m
}

async fn report(
    api: &Api<RegistryMirror>,
    cfg: &AgentConfig,
    state: NodeState,
    message: &str,
) -> kube::Result<()> {
    let entry = NodeResult {
        name: cfg.node_name.clone(),
        state,
        message: Some(message.to_owned()).filter(|m| !m.is_empty()),
        last_update: Some(Timestamp::now().to_string()),
    };
    let patch = json!({
        "apiVersion": RegistryMirror::api_version(&()),
        "kind": RegistryMirror::kind(&()),
        "status": {"nodes": [entry]},
    });
    api.patch_status(
        &cfg.mirror,
        &PatchParams::apply(&field_manager(&cfg.node_name)).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

/// The failure logs of the agent's three sources of API errors.
#[derive(Debug, Default)]
struct Failures {
    watch: FailureLog,
    read: FailureLog,
    report: FailureLog,
}

/// Logs `error` from the source `log` unless it is a repeat within
/// [`quiet::LOG_EVERY`] (issue 17: an unreachable API server wrote 312,540
/// lines in 11 s).
fn failed(log: &mut FailureLog, what: &str, error: &dyn std::fmt::Display) {
    let text = error.to_string();
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

/// One pass: read the mirror, reconcile the files, report when due.
/// `Ok(false)` when an API request failed (logged), so the caller backs off.
async fn pass(
    api: &Api<RegistryMirror>,
    cfg: &AgentConfig,
    last: &mut Option<(NodeState, String, Instant)>,
    failures: &mut Failures,
) -> anyhow::Result<bool> {
    let mirror = match api.get_opt(&cfg.mirror).await {
        Ok(m) => {
            succeeded(&mut failures.read, "reading the mirror");
            m
        }
        Err(e) => {
            failed(
                &mut failures.read,
                "cannot read the mirror; files left as they are",
                &e,
            );
            return Ok(false);
        }
    };
    let c = cfg.clone();
    let outcome = tokio::task::spawn_blocking(move || reconcile_files(&c, mirror.as_ref())).await?;
    let Some((state, message)) = outcome else {
        return Ok(true);
    };
    let due = last
        .as_ref()
        .is_none_or(|(s, m, at)| *s != state || *m != message || at.elapsed() >= REPORT_EVERY);
    if !due {
        return Ok(true);
    }
    match report(api, cfg, state, &message).await {
        Ok(()) => {
            succeeded(&mut failures.report, "reporting this node's result");
            tracing::info!(?state, %message, "reported");
            *last = Some((state, message, Instant::now()));
            Ok(true)
        }
        Err(e) => {
            failed(&mut failures.report, "cannot report this node's result", &e);
            Ok(false)
        }
    }
}

/// Whether a node whose last pass succeeded with `state` counts as reconciled
/// (the agent's readiness, issue 17): its files are in line with the mirror
/// and containerd reads them, or they are removed for a deleted mirror.
pub fn reconciled(state: NodeState) -> bool {
    matches!(state, NodeState::Configured | NodeState::Removed)
}

/// Runs until `shutdown`: a pass on every change to the mirror and every
/// `resync`; `ready` is set after each pass to whether the node is
/// [`reconciled`] and its result reported.
///
/// Backoff (issue 17): the watch and the passes each back off with
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
    let api: Api<RegistryMirror> = Api::all(client);
    // `Init` is emitted before each (re-)list is even tried, and the backoff
    // resets on any `Ok`: without this filter a failing list is retried
    // every 0.8-1.6 s for ever instead of backing off.
    let changes = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={}", cfg.mirror)),
    )
    .filter(|e| std::future::ready(!matches!(e, Ok(watcher::Event::Init))))
    .default_backoff();
    let mut changes = std::pin::pin!(changes);
    let mut watching = true;
    let mut last: Option<(NodeState, String, Instant)> = None;
    let mut backoff = DefaultBackoff::default();
    let mut failures = Failures::default();
    tracing::info!(mirror = %cfg.mirror, node = %cfg.node_name, dir = %cfg.hosts_dir.display(), "node agent started");
    'passes: loop {
        let passed = pass(&api, &cfg, &mut last, &mut failures).await?;
        let now_ready = passed && last.as_ref().is_some_and(|(s, ..)| reconciled(*s));
        ready.store(now_ready, Ordering::Relaxed);
        let wait = if passed {
            backoff.reset();
            cfg.resync
        } else {
            // DefaultBackoff never runs out; the cap is its own.
            backoff.next().unwrap_or(cfg.resync)
        };
        let timer = tokio::time::sleep(wait);
        let mut timer = std::pin::pin!(timer);
        loop {
            tokio::select! {
                event = changes.next(), if watching => match event {
                    // A list in progress: the pass follows its InitDone.
                    Some(Ok(watcher::Event::InitApply(_))) => {
                        succeeded(&mut failures.watch, "watching the mirror");
                    }
                    Some(Ok(_)) => {
                        succeeded(&mut failures.watch, "watching the mirror");
                        continue 'passes;
                    }
                    // The stream itself waits out its backoff before the next try.
                    Some(Err(e)) => failed(&mut failures.watch, "cannot watch the mirror", &e),
                    None => watching = false,
                },
                () = &mut timer => continue 'passes,
                () = shutdown.cancelled() => break 'passes,
            }
        }
    }
    tracing::info!("node agent stopped; files stay until the mirror is deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::RegistryMirrorStatus;

    fn mirror(spec: serde_json::Value, status: Option<RegistryMirrorStatus>) -> RegistryMirror {
        let mut m = RegistryMirror::new("hub", serde_json::from_value(spec).unwrap());
        m.status = status;
        m
    }

    fn published(hosts: &[&str], port: i32) -> Option<RegistryMirrorStatus> {
        Some(RegistryMirrorStatus {
            hosts: Some(hosts.iter().map(|h| h.to_string()).collect()),
            node_port: Some(port),
            ..Default::default()
        })
    }

    #[test]
    fn desired_files_follow_the_published_hosts_and_port() {
        let spec = serde_json::json!({"upstreams": [
            {"host": "docker.io"},
            {"host": "registry.local:5000", "url": "http://10.1.2.3:5000/"},
            {"host": "quay.io"},
        ]});
        // quay.io lost to another mirror: the operator left it out of status.hosts.
        let m = mirror(
            spec.clone(),
            published(&["docker.io", "registry.local:5000"], 31500),
        );
        let want = desired(&m, "192.168.1.7").unwrap();
        assert_eq!(want.len(), 2);
        assert_eq!(want[0].registry, "docker.io");
        assert_eq!(want[0].server, "https://registry-1.docker.io");
        assert_eq!(want[0].mirror, "http://192.168.1.7:31500");
        assert_eq!(want[0].owner, "hub");
        assert_eq!(want[1].server, "http://10.1.2.3:5000");
        assert_eq!(
            desired(&m, "fd00::7").unwrap()[0].mirror,
            "http://[fd00::7]:31500"
        );
        assert!(
            desired(&mirror(spec, None), "1.2.3.4")
                .unwrap_err()
                .contains("waiting")
        );
    }

    #[test]
    fn messages_name_the_nodes_paths_not_the_containers() {
        let r = HostReport {
            registry: "docker.io".into(),
            state: HostState::Conflict(
                "/host/etc/containerd/certs.d/docker.io/hosts.toml was not written by regmirror"
                    .into(),
            ),
        };
        let r = on_node(
            r,
            std::path::Path::new("/host/etc/containerd/certs.d"),
            "/etc/containerd/certs.d",
        );
        assert_eq!(
            r.state,
            HostState::Conflict(
                "/etc/containerd/certs.d/docker.io/hosts.toml was not written by regmirror".into()
            )
        );
    }

    #[test]
    fn node_state_puts_failures_then_conflicts_then_containerd_first() {
        let ok = regmirror_node::inspect(
            Some(
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n",
            ),
            "/etc/containerd/certs.d",
        );
        let unset = regmirror_node::inspect(Some("version = 2\n"), "/etc/containerd/certs.d");
        let r = |reg: &str, state: HostState| HostReport {
            registry: reg.into(),
            state,
        };
        let good = [
            r("docker.io", HostState::Configured),
            r("ghcr.io", HostState::Unchanged),
        ];
        assert_eq!(
            node_state(&good, &ok),
            (
                NodeState::Configured,
                "pulls of docker.io, ghcr.io go through the cache".into()
            )
        );
        let (s, m) = node_state(&good, &unset);
        assert_eq!(s, NodeState::NotEffective);
        assert!(m.contains("config_path"));
        let conflict = [
            r("docker.io", HostState::Conflict("user file".into())),
            good[1].clone(),
        ];
        assert_eq!(node_state(&conflict, &ok).0, NodeState::Conflict);
        let failed = [
            conflict[0].clone(),
            r("x", HostState::Failed("EROFS".into())),
        ];
        assert_eq!(
            node_state(&failed, &ok),
            (NodeState::Failed, "x: EROFS".into())
        );
    }

    #[test]
    fn only_configured_or_removed_nodes_are_reconciled() {
        assert!(reconciled(NodeState::Configured));
        assert!(reconciled(NodeState::Removed));
        for s in [
            NodeState::NotEffective,
            NodeState::Conflict,
            NodeState::Failed,
        ] {
            assert!(!reconciled(s), "{s:?}");
        }
    }

    #[test]
    fn files_are_written_then_removed_only_on_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AgentConfig {
            mirror: "hub".into(),
            node_name: "n1".into(),
            node_ip: "10.0.0.9".into(),
            hosts_dir: dir.path().join("certs.d"),
            hosts_dir_on_node: "/etc/containerd/certs.d".into(),
            containerd_config: dir.path().join("missing.toml"),
            resync: RESYNC,
        };
        let mut m = mirror(
            serde_json::json!({"upstreams": [{"host": "docker.io"}]}),
            published(&["docker.io"], 30001),
        );
        let (state, _) = reconcile_files(&cfg, Some(&m)).unwrap();
        // Written, but this node's containerd has no config: reported as such.
        assert_eq!(state, NodeState::NotEffective);
        let file = cfg.hosts_dir.join("docker.io/hosts.toml");
        assert!(
            std::fs::read_to_string(&file)
                .unwrap()
                .contains("http://10.0.0.9:30001")
        );
        m.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::now(),
        ));
        assert_eq!(
            reconcile_files(&cfg, Some(&m)).unwrap().0,
            NodeState::Removed
        );
        assert!(!file.exists());
    }
}
