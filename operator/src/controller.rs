//! The reconcile loop: validate -> build -> server-side apply -> prune ->
//! status, per `RegistryMirror`, plus the finalizer that removes node
//! configuration before a mirror goes away. Watching, applying, pruning and
//! deleting children all walk [`ChildKind`]'s one list. The nodes' side of
//! the status is aggregated from the node agents' reports
//! ([`crate::node_watch`], [`crate::node_status`]), whose changes trigger
//! reconciles at a bounded rate.
//!
//! Children are namespaced (the operator's namespace) while the mirror is
//! cluster-scoped. `Controller::owns` would map a child's owner reference to
//! a *namespaced* object reference that never matches the mirror, so children
//! are watched with `watches_with` and an explicit owner-reference mapper.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions,
    PropagationPolicy,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::agent_migration::{self, Outcome as Legacy};
use crate::children::ChildKind;
use crate::crd::RegistryMirror;
use crate::credentials;
use crate::metrics::Metrics;
use crate::migration::{self, Progress};
use crate::node_status::{self, NodesSummary};
use crate::node_watch::{self, NodeViews};
use crate::resources::{self, Children, MANAGER, Settings};
use crate::status::{self, Conflict, Observed, Problem, reason};
use crate::storage::{self, Growth, TemplateChange};
use crate::validation;

/// Held on every mirror until its node configuration is removed.
pub const FINALIZER: &str = "regmirror.dev/node-config";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {}", api_error_text(.0))]
    Kube(#[from] kube::Error),
    #[error("applying {kind} {name}: {}", api_error_text(.source))]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("waiting for node agents to remove their configuration: {0}")]
    NodeCleanupPending(String),
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

/// An API error as a user reads it in a condition, an event or a log line:
/// for the API server's own answer its reason, code and message (`Invalid
/// (422): StatefulSet.apps "x" is invalid: ...`), not kube's debug dump of
/// the whole `Status` (issue 18); other errors as they display.
pub fn api_error_text(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let reason = if s.reason.is_empty() {
                "Failure"
            } else {
                s.reason.as_str()
            };
            format!("{reason} ({}): {}", s.code, s.message)
        }
        other => other.to_string(),
    }
}

impl Error {
    /// Whether this is the API server's 409 Conflict: another writer changed
    /// the object first, which the next pass resolves by itself.
    pub fn is_conflict(&self) -> bool {
        let api = match self {
            Self::Kube(e) | Self::Apply { source: e, .. } => e,
            Self::Finalizer(f) => match f.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => return e.is_conflict(),
                _ => return false,
            },
            Self::NodeCleanupPending(_) => return false,
        };
        matches!(api, kube::Error::Api(s) if s.code == 409)
    }

    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Apply { .. } => "apply",
            Self::NodeCleanupPending(_) => "node_cleanup_pending",
            Self::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.kind(),
                _ => "finalizer",
            },
        }
    }
}

/// Shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Every mirror, for conflict detection.
    pub mirrors: Store<RegistryMirror>,
    /// Every Node and every node agent's report, for the nodes' status.
    pub views: NodeViews,
    /// Consecutive failures per mirror, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Uids of mirrors known to have no agent DaemonSet of the per-mirror
    /// layout (any more): not looked for again.
    legacy_gone: Mutex<HashSet<String>>,
}

impl Context {
    /// Shared state for [`reconcile`] and [`error_policy`]: `mirrors` is the
    /// controller's store of every mirror, `views` the Nodes and reports.
    pub fn new(
        client: Client,
        settings: Settings,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        mirrors: Store<RegistryMirror>,
        views: NodeViews,
    ) -> Self {
        Self {
            client,
            settings,
            recorder,
            metrics,
            mirrors,
            views,
            failures: Mutex::default(),
            legacy_gone: Mutex::default(),
        }
    }

    /// What the reports say about `mirror`; `None` until the Nodes and the
    /// reports have been listed.
    fn nodes_summary(&self, mirror: &RegistryMirror) -> Option<NodesSummary> {
        self.views.ready().then(|| {
            node_status::summarize(
                mirror,
                &self.views.nodes.state(),
                &self.views.reports.state(),
            )
        })
    }

    fn ns<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    /// The children of `kind` in the operator's namespace.
    fn children(&self, kind: ChildKind) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &self.settings.namespace,
            &kind.api_resource(),
        )
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    reporter: Reporter,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let mirrors = Api::<RegistryMirror>::all(client.clone());
    let mut controller =
        Controller::new(mirrors.clone(), watcher::Config::default().any_semantic());
    let store = controller.store();
    let (views, triggers) = node_watch::start(&client);
    controller = controller.reconcile_on(node_watch::throttled(
        triggers,
        store.clone(),
        node_watch::AGGREGATE_EVERY,
    ));
    let labelled =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        Recorder::new(client.clone(), reporter),
        metrics,
        store.clone(),
        views,
    ));
    for kind in ChildKind::resources() {
        let api = ctx.children(kind);
        let resource = kind.api_resource();
        controller = match kind {
            // Users' credential Secrets carry no label of ours: watch the
            // namespace, and map a Secret to the mirrors that reference it as
            // well as to the mirror that owns it.
            ChildKind::Secret => {
                let store = store.clone();
                controller.watches_with(api, resource, watcher::Config::default(), move |secret| {
                    let name = secret.name_any();
                    let owner = owner_of(secret);
                    store
                        .state()
                        .into_iter()
                        .filter(|m| {
                            m.spec.upstreams.iter().any(|u| {
                                u.credentials_secret
                                    .as_ref()
                                    .is_some_and(|r| r.name == name)
                            }) || owner.as_ref().is_some_and(|o| o.name == m.name_any())
                        })
                        .map(|m| ObjectRef::from_obj(m.as_ref()))
                        .collect::<Vec<_>>()
                })
            }
            _ => controller.watches_with(api, resource, labelled.clone(), owner_of),
        };
    }
    let peers_store = store.clone();
    controller
        // A mirror's change or deletion can end another's host conflict.
        .watches(mirrors, watcher::Config::default(), move |changed| {
            peers_store
                .state()
                .into_iter()
                .filter(|m| m.name_any() != changed.name_any() && status::share_a_host(m, &changed))
                .map(|m| ObjectRef::from_obj(m.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(mirror = %obj.name, "reconciled"),
                // Already logged by `error_policy`.
                Err(e @ kube::runtime::controller::Error::ReconcilerFailed(..)) => {
                    tracing::debug!(error = %e, "reconcile failed")
                }
                // A watch that fails (the API unreachable, the CRD deleted, no
                // permission) stops every reconcile: the user must hear of it.
                Err(e) => tracing::warn!(error = %e, "watching failed; retrying"),
            }
        })
        .await;
}

/// How often [`wait_for_crd`] asks the API server again.
const CRD_POLL: Duration = Duration::from_secs(5);

/// What the API server's answer to listing mirrors says about the CRD:
/// `Ok(())` when it is served; else the message to log. A 404 on the list
/// means the resource is not served at all (an empty list is a 200), i.e. the
/// `RegistryMirror` CRD is not installed.
pub fn crd_state(listed: Result<(), &kube::Error>) -> Result<(), CrdProblem> {
    match listed {
        Ok(()) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(CrdProblem::NotInstalled),
        Err(e) => Err(CrdProblem::Unreachable(e.to_string())),
    }
}

/// Why the operator cannot start its controller yet ([`crd_state`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrdProblem {
    #[error(
        "the RegistryMirror CRD (registrymirrors.regmirror.dev) is not installed: apply crds/registrymirror.yaml (the Helm chart installs it); waiting for it"
    )]
    NotInstalled,
    #[error("cannot list RegistryMirrors: {0}; retrying")]
    Unreachable(String),
}

/// Waits until the API server serves `RegistryMirror`s, asking every
/// [`CRD_POLL`]. Until then `/readyz` fails and each new problem is logged
/// (a missing CRD at error level, any other failure at warn), once per change
/// so a long wait does not flood the log. Returns `false` when `shutdown`
/// fired first: the caller exits without starting the controller (whose
/// graceful shutdown would wait for a list that never succeeds).
pub async fn wait_for_crd(
    client: &Client,
    metrics: &Metrics,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    let api = Api::<RegistryMirror>::all(client.clone());
    let one = ListParams::default().limit(1);
    let mut last: Option<CrdProblem> = None;
    loop {
        let listed = tokio::select! {
            r = api.list_metadata(&one) => r.map(|_| ()),
            () = shutdown.cancelled() => return false,
        };
        match crd_state(listed.as_ref().map(|_| ())) {
            Ok(()) => {
                if last.is_some() {
                    tracing::info!("RegistryMirrors are served: starting");
                }
                return true;
            }
            Err(p) => {
                metrics
                    .ready
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                if last.as_ref() != Some(&p) {
                    match p {
                        CrdProblem::NotInstalled => tracing::error!("{p}"),
                        CrdProblem::Unreachable(_) => tracing::warn!("{p}"),
                    }
                    last = Some(p);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(CRD_POLL) => {}
            () = shutdown.cancelled() => return false,
        }
    }
}

/// The mirror a child belongs to, from its controller owner reference.
fn owner_of<K: Resource>(child: K) -> Option<ObjectRef<RegistryMirror>> {
    let api_version = RegistryMirror::api_version(&());
    let kind = RegistryMirror::kind(&());
    child
        .meta()
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true) && o.api_version == api_version && o.kind == kind)
        .map(|o| ObjectRef::new(&o.name))
}

pub async fn reconcile(mirror: Arc<RegistryMirror>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let name = mirror.name_any();
    let api: Api<RegistryMirror> = Api::all(ctx.client.clone());
    let result = finalizer(&api, FINALIZER, mirror, |event| async {
        match event {
            Finalizer::Apply(m) => apply(&m, &ctx).await,
            Finalizer::Cleanup(m) => cleanup(&m, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let kind = result.as_ref().err().map(Error::kind);
    ctx.metrics.observe(&name, start.elapsed(), kind);
    if result.is_ok() {
        ctx.failures.lock().expect("not poisoned").remove(&name);
    }
    result
}

/// Requeues with a per-mirror exponential backoff (5 s doubling to 5 min);
/// other mirrors are unaffected.
pub fn error_policy(mirror: Arc<RegistryMirror>, error: &Error, ctx: Arc<Context>) -> Action {
    let name = mirror.name_any();
    if let Error::Finalizer(e) = error
        && let kube::runtime::finalizer::Error::CleanupFailed(Error::NodeCleanupPending(msg)) =
            e.as_ref()
    {
        tracing::info!(mirror = %name, "{msg}");
        return Action::requeue(Duration::from_secs(5));
    }
    let n = {
        let mut f = ctx.failures.lock().expect("not poisoned");
        let n = f.entry(name.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let delay = backoff(n);
    if error.is_conflict() {
        // Routine with more than one writer; the retry settles it.
        tracing::debug!(mirror = %name, error = %error, retry_in = ?delay, "reconcile met a conflict");
    } else {
        tracing::warn!(mirror = %name, error = %error, retry_in = ?delay, "reconcile failed");
    }
    Action::requeue(delay)
}

/// 5 s, 10 s, 20 s ... capped at 5 min.
pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1 << failures.saturating_sub(1).min(6));
    Duration::from_secs(secs.min(300))
}

async fn apply(mirror: &RegistryMirror, ctx: &Context) -> Result<Action, Error> {
    let name = mirror.name_any();
    let all = ctx.mirrors.state();
    let peers: Vec<&RegistryMirror> = all.iter().map(AsRef::as_ref).collect();
    let conflicts = status::conflicts(mirror, &peers);

    let creds = match load_credentials(mirror, ctx).await? {
        Ok(c) => c,
        Err(e) => {
            let problem = Problem {
                reason: reason::CREDENTIALS_UNAVAILABLE,
                message: e.to_string(),
            };
            report(mirror, ctx, conflicts, Outcome::Stopped(problem)).await?;
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
    };

    let before: Option<StatefulSet> = ctx
        .ns::<StatefulSet>()
        .get_opt(&resources::stateful_set_name(&name))
        .await?;
    // The member claims say how far a larger storage.size has got: members
    // keep within what every claim holds. Read without a StatefulSet too: an
    // operator stopped between deleting it for a growth and creating it anew
    // finds the claims as they are (a new mirror has none).
    let claims = member_claim_list(mirror, ctx).await?;
    let members = storage::member_claims(&name, &claims);
    let settled = storage::settled_bytes(&members, mirror.spec.cache.replicas);
    let mut children = resources::build_within(mirror, &ctx.settings, creds.as_deref(), settled);
    let change = before.as_ref().map_or(TemplateChange::Same, |existing| {
        storage::template_change(&children.stateful_set, existing)
    });
    if let Some(existing) = &before {
        resources::keep_claim_templates(&mut children.stateful_set, existing);
    }
    // Nothing is written before everything that can refuse this spec has
    // had its say: the cache's parser, whether Kubernetes will expand the
    // member claims to a larger size, then (for a new generation) the API
    // server in a dry run of every child. The running cache stays as it is.
    let mut verdict = validation::check(mirror, &children).err();
    let mut expand = None;
    if verdict.is_none() {
        if let TemplateChange::Grow { to, .. } = &change {
            match Box::pin(plan_growth(ctx, &members, mirror.spec.cache.replicas, to)).await? {
                Growth::Expand(names) => expand = Some(names),
                Growth::Refused(message) => {
                    let problem = Problem {
                        reason: reason::STORAGE_NOT_EXPANDABLE,
                        message,
                    };
                    report(mirror, ctx, conflicts, Outcome::Stopped(problem)).await?;
                    // A StorageClass is not watched: look again in a while.
                    return Ok(Action::requeue(Duration::from_secs(60)));
                }
            }
        }
        if needs_dry_run(mirror) {
            // Boxed: a large future, run only for a new generation.
            verdict = Box::pin(dry_run_children(&children, ctx)).await?;
        }
    }
    if let Some(message) = verdict {
        let problem = Problem {
            reason: reason::INVALID_SPEC,
            message,
        };
        report(mirror, ctx, conflicts, Outcome::Stopped(problem)).await?;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    if let (TemplateChange::Grow { from, to }, Some(existing), Some(names)) =
        (&change, &before, &expand)
    {
        if let Err(problem) = Box::pin(grow_storage(ctx, existing, names, to)).await? {
            // Waiting for the StatefulSet's deletion is short; a refused
            // expansion (a quota, a policy) waits for someone to act.
            let again = if problem.reason == reason::STORAGE_GROWING {
                Duration::from_secs(5)
            } else {
                Duration::from_secs(60)
            };
            report(mirror, ctx, conflicts, Outcome::Stopped(problem)).await?;
            return Ok(Action::requeue(again));
        }
        resources::set_claim_size(&mut children.stateful_set, to);
        let claims = match names.as_slice() {
            [] => String::new(),
            names => format!("expanded claims {} to {to}; ", names.join(", ")),
        };
        publish(
            ctx,
            mirror,
            EventType::Normal,
            "StorageGrown",
            "Apply",
            format!(
                "storage.size {from} -> {to}: {claims}re-creating StatefulSet {} with the larger claim template (its pods keep running)",
                existing.name_any()
            ),
        )
        .await;
    }
    if change == TemplateChange::Kept {
        publish(
            ctx,
            mirror,
            EventType::Warning,
            "StorageUnchanged",
            "Apply",
            "spec.storage asks for claims of another access mode, class or a smaller size than the cache StatefulSet's, which Kubernetes does not change: existing and new members keep the claims as they are (only a larger storage.size is carried out)".into(),
        )
        .await;
    }
    // The StatefulSet is created only once the old layout's content is
    // handed to member 0, so while it exists there is nothing to migrate.
    if before.is_none() {
        // Boxed: a large future, seldom run.
        let migrating = Box::pin(migration::migrate(
            &ctx.client,
            &ctx.settings.namespace,
            &name,
        ));
        if let Progress::Waiting(message) = migrating.await? {
            let problem = Problem {
                reason: reason::MIGRATING,
                message,
            };
            report(mirror, ctx, conflicts, Outcome::Stopped(problem)).await?;
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
    }

    let mut applied = match apply_children(&children, ctx).await {
        Ok(a) => a,
        Err(e) => {
            let problem = Problem {
                reason: reason::APPLY_FAILED,
                message: e.to_string(),
            };
            report(mirror, ctx, conflicts, Outcome::Stopped(problem)).await?;
            return Err(e);
        }
    };
    prune(mirror, &children, ctx).await?;
    applied.legacy_agents = retire_legacy_agents(mirror, ctx).await?;
    let replicas = mirror.spec.cache.replicas;
    // Claims in use still below the template's size (bound after a growth
    // skipped them): expanded now, or said.
    let (lag_expanded, lag_note) = match (&change, &expand) {
        (TemplateChange::Same, None) => {
            Box::pin(expand_lagging(
                mirror,
                ctx,
                &members,
                &mirror.spec.storage.size,
            ))
            .await?
        }
        _ => (false, None),
    };
    let growing = match expand.is_some() || lag_expanded {
        false => storage::resizing(&name, &members, replicas, &ctx.settings.namespace),
        // The claims just grown: as they are now.
        true => {
            let claims = member_claim_list(mirror, ctx).await?;
            storage::resizing(
                &name,
                &storage::member_claims(&name, &claims),
                replicas,
                &ctx.settings.namespace,
            )
        }
    };
    applied.storage = match (growing, lag_note) {
        (Some(g), Some(n)) => Some(format!("{g}; {n}")),
        (g, n) => g.or(n),
    };

    let event = match &before {
        // Claims without a StatefulSet: a growth's re-creation finished by
        // this pass after an operator stopped half-way, or a migration from
        // the single-Deployment layout (member 0's claim made first).
        None if !members.is_empty() => Some((
            "Created",
            format!(
                "created the cache StatefulSet {} in namespace {} on its members' existing claims",
                resources::stateful_set_name(&name),
                ctx.settings.namespace
            ),
        )),
        None => Some((
            "Created",
            format!(
                "created the cache ({}) in namespace {}",
                resources::stateful_set_name(&name),
                ctx.settings.namespace
            ),
        )),
        Some(d) if config_hash(d) != Some(children.config_hash.as_str()) => Some((
            "ConfigChanged",
            "cache configuration changed: rolling the cache members".to_owned(),
        )),
        Some(_) => None,
    };
    if let Some((reason, note)) = event {
        publish(ctx, mirror, EventType::Normal, reason, "Apply", note).await;
    }

    let ready = report(mirror, ctx, conflicts, Outcome::Applied(applied)).await?;
    Ok(Action::requeue(if ready {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(30)
    }))
}

/// Deletes `mirror`'s agent DaemonSet of the per-mirror layout once the
/// shared agent reports on every node it selects ([`agent_migration`]);
/// `Some(why)` while it is kept. Nothing is decided before the Nodes and
/// reports are listed, and a mirror found without one is not looked at again.
async fn retire_legacy_agents(
    mirror: &RegistryMirror,
    ctx: &Context,
) -> Result<Option<String>, Error> {
    let uid = mirror.uid().unwrap_or_default();
    if ctx.legacy_gone.lock().expect("not poisoned").contains(&uid) {
        return Ok(None);
    }
    let Some(summary) = ctx.nodes_summary(mirror) else {
        return Ok(None);
    };
    match agent_migration::retire(&ctx.client, &ctx.settings.namespace, mirror, &summary).await? {
        Legacy::Kept(why) => Ok(Some(why)),
        Legacy::Absent | Legacy::Deleted => {
            ctx.legacy_gone.lock().expect("not poisoned").insert(uid);
            Ok(None)
        }
    }
}

/// How long a pass waits for the StatefulSet it deleted to re-create it
/// with larger claims (the garbage collector orphans its pods and claims
/// first); then the next pass goes on.
const STATEFUL_SET_DELETION_WAIT: Duration = Duration::from_secs(30);

/// The claims labelled as `mirror`'s cache's (its member claims among them,
/// [`storage::member_claims`]).
async fn member_claim_list(
    mirror: &RegistryMirror,
    ctx: &Context,
) -> Result<Vec<PersistentVolumeClaim>, Error> {
    let selector = resources::pods_selector(&mirror.name_any(), resources::COMPONENT_CACHE);
    Ok(ctx
        .ns::<PersistentVolumeClaim>()
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// Reads the StorageClass of each member claim and decides whether they
/// can all grow to `size` ([`storage::plan_growth`]). Writes nothing.
async fn plan_growth(
    ctx: &Context,
    members: &[(u32, &PersistentVolumeClaim)],
    replicas: i32,
    size: &str,
) -> Result<Growth, Error> {
    let classes = claim_classes(ctx, members).await?;
    Ok(storage::plan_growth(size, members, replicas, &classes))
}

/// The StorageClass of each class the claims name (`None`: it does not exist).
async fn claim_classes(
    ctx: &Context,
    members: &[(u32, &PersistentVolumeClaim)],
) -> Result<BTreeMap<String, Option<StorageClass>>, Error> {
    let api: Api<StorageClass> = Api::all(ctx.client.clone());
    let mut classes = BTreeMap::new();
    for (_, claim) in members {
        if let Some(class) = storage::class_of(claim)
            && !classes.contains_key(class)
        {
            classes.insert(class.to_owned(), api.get_opt(class).await?);
        }
    }
    Ok(classes)
}

/// Carries out a growth [`plan_growth`] allowed: expands each claim in
/// `expand` to `size` (a merge patch of its request, on the version that
/// was judged, so a claim grown larger meanwhile is never shrunk: a
/// conflict is retried), then deletes the StatefulSet `existing` orphaning
/// its pods and claims, and waits (at most [`STATEFUL_SET_DELETION_WAIT`])
/// until it is gone; the caller then creates it anew. Each step is
/// idempotent: a pass that stopped anywhere is finished by the next (a
/// claim already grown is not expanded again; a missing StatefulSet is just
/// created). Inner `Err`: what the status says meanwhile.
async fn grow_storage(
    ctx: &Context,
    existing: &StatefulSet,
    expand: &[String],
    size: &str,
) -> Result<Result<(), Problem>, Error> {
    if let Err(problem) = expand_claims(ctx, expand, size).await? {
        return Ok(Err(problem));
    }
    let api = ctx.ns::<StatefulSet>();
    let name = existing.name_any();
    let orphan = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        preconditions: Some(Preconditions {
            uid: existing.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &orphan).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let deadline = Instant::now() + STATEFUL_SET_DELETION_WAIT;
    loop {
        let current = api.get_opt(&name).await?;
        if current.is_none_or(|s| s.uid() != existing.uid()) {
            return Ok(Ok(()));
        }
        if Instant::now() >= deadline {
            return Ok(Err(Problem {
                reason: reason::STORAGE_GROWING,
                message: format!(
                    "re-creating the cache StatefulSet {name} with claims of {size}: waiting for its deletion to finish (its pods and claims stay and keep running)"
                ),
            }));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Expands each claim in `expand` to `size`: a merge patch of its request
/// on the version read just before, so a claim grown larger meanwhile is
/// never shrunk (a conflict is retried by the next pass). Inner `Err`: the
/// API server refused (a quota, a policy), as the status says it.
async fn expand_claims(
    ctx: &Context,
    expand: &[String],
    size: &str,
) -> Result<Result<(), Problem>, Error> {
    let claims = ctx.ns::<PersistentVolumeClaim>();
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    for name in expand {
        let Some(claim) = claims.get_opt(name).await? else {
            continue;
        };
        let patch = json!({
            "metadata": {"resourceVersion": claim.resource_version()},
            "spec": {"resources": {"requests": {"storage": size}}},
        });
        match claims.patch(name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if matches!(s.code, 403 | 422) => {
                return Ok(Err(Problem {
                    reason: reason::STORAGE_NOT_EXPANDABLE,
                    message: format!(
                        "the API server refuses to expand claim {name} to {size}: {}",
                        api_error_text(&kube::Error::Api(s))
                    ),
                }));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Ok(()))
}

/// Claims of running members bound after the growth that skipped them, or
/// left by an older template, asking for less than `size`
/// ([`storage::lagging`]): expanded when their class allows, else said.
/// Never blocks the generation (it is applied). Returns whether claims were
/// expanded (the status then reads them again) and a note for the status
/// when some cannot be.
async fn expand_lagging(
    mirror: &RegistryMirror,
    ctx: &Context,
    members: &[(u32, &PersistentVolumeClaim)],
    size: &str,
) -> Result<(bool, Option<String>), Error> {
    let lagging = storage::lagging(members, mirror.spec.cache.replicas, size);
    if lagging.is_empty() {
        return Ok((false, None));
    }
    let classes = Box::pin(claim_classes(ctx, &lagging)).await?;
    let note = match storage::plan_lagging(size, &lagging, mirror.spec.cache.replicas, &classes) {
        Growth::Expand(names) => match expand_claims(ctx, &names, size).await? {
            Ok(()) => {
                publish(
                    ctx,
                    mirror,
                    EventType::Normal,
                    "StorageGrown",
                    "Apply",
                    format!(
                        "expanded claims {} to storage.size {size}",
                        names.join(", ")
                    ),
                )
                .await;
                (true, None)
            }
            Err(p) => (false, Some(p.message)),
        },
        Growth::Refused(message) => (false, Some(message)),
    };
    Ok(note)
}

/// Outer `Err`: the API failed (retry); inner `Err`: the user must fix something.
async fn load_credentials(
    mirror: &RegistryMirror,
    ctx: &Context,
) -> Result<Result<Option<Vec<u8>>, credentials::CredentialsError>, Error> {
    let names = match credentials::referenced_secrets(mirror, &ctx.settings.namespace) {
        Ok(n) => n,
        Err(e) => return Ok(Err(e)),
    };
    let api = ctx.ns::<Secret>();
    let mut secrets = BTreeMap::new();
    for n in names {
        if let Some(s) = api.get_opt(&n).await? {
            secrets.insert(n, s);
        }
    }
    Ok(credentials::merge(
        mirror,
        &ctx.settings.namespace,
        &secrets,
    ))
}

/// The children the status is computed from, as the API server last returned
/// them (`None`: not there).
#[derive(Debug, Default)]
struct Seen {
    stateful_set: Option<StatefulSet>,
    service: Option<Service>,
    /// Why the per-mirror agent DaemonSet is still kept, if it is.
    legacy_agents: Option<String>,
    /// Member claims still growing ([`storage::resizing`]).
    storage: Option<String>,
}

impl Seen {
    /// Reads the children as they are (when they were not all applied).
    async fn read(mirror: &RegistryMirror, ctx: &Context) -> Result<Self, Error> {
        let name = mirror.name_any();
        Ok(Self {
            stateful_set: ctx
                .ns::<StatefulSet>()
                .get_opt(&resources::stateful_set_name(&name))
                .await?,
            service: ctx
                .ns::<Service>()
                .get_opt(&resources::service_name(&name))
                .await?,
            legacy_agents: None,
            storage: None,
        })
    }

    /// Keeps `applied` if it is one of the children the status reads.
    fn record(&mut self, kind: ChildKind, applied: DynamicObject) -> Result<(), Error> {
        match kind {
            ChildKind::StatefulSet => self.stateful_set = Some(decode(applied)?),
            ChildKind::Service => self.service = Some(decode(applied)?),
            ChildKind::ConfigMap
            | ChildKind::Secret
            | ChildKind::ServiceAccount
            | ChildKind::Role
            | ChildKind::RoleBinding
            | ChildKind::MembersService => {}
        }
        Ok(())
    }

    /// What the status says about these children.
    fn observed(&self) -> Observed {
        Observed {
            cache_replicas: self.stateful_set.as_ref().map(members),
            claim_template: self.stateful_set.as_ref().and_then(storage::claim_status),
            node_port: self.service.as_ref().and_then(node_port),
            legacy_agents: self.legacy_agents.clone(),
            storage: self.storage.clone(),
            ..Default::default()
        }
    }
}

/// A child as returned by a dynamic API, as its own type.
fn decode<K: DeserializeOwned>(object: DynamicObject) -> Result<K, Error> {
    serde_json::to_value(object)
        .and_then(serde_json::from_value)
        .map_err(|e| Error::Kube(kube::Error::SerdeError(e)))
}

/// `(desired, ready)` cache members.
fn members(s: &StatefulSet) -> (i32, i32) {
    let want = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let ready = s
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    (want, ready)
}

fn node_port(s: &Service) -> Option<i32> {
    s.spec.as_ref()?.ports.as_ref()?.first()?.node_port
}

fn config_hash(d: &StatefulSet) -> Option<&str> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(resources::CONFIG_HASH_ANNOTATION)
        .map(String::as_str)
}

/// Where a reconcile pass ended, which decides what the status is computed from.
enum Outcome {
    /// Every child applied, as the API server returned them.
    Applied(Seen),
    /// Stopped by a problem before every child was applied: the status reads
    /// the children as they are.
    Stopped(Problem),
    /// The mirror is being deleted; the children as read, and what the
    /// finalizer waits for.
    Deleting(Seen, Option<String>),
}

/// Writes the status for a pass that ended in `outcome` with `conflicts`;
/// returns whether the mirror is Ready.
async fn report(
    mirror: &RegistryMirror,
    ctx: &Context,
    conflicts: Vec<Conflict>,
    outcome: Outcome,
) -> Result<bool, Error> {
    let (observed, problem, cleanup) = match outcome {
        Outcome::Applied(seen) => {
            let mut observed = seen.observed();
            let missing = observed
                .cache_replicas
                .is_some_and(|(want, ready)| ready < want);
            let host_network = mirror.spec.cache.host_network;
            // The member pods are read only when the status needs them.
            let pods = if missing || host_network {
                member_pods(mirror, ctx).await
            } else {
                None
            };
            if missing {
                observed.cache_cause = match pods
                    .iter()
                    .flatten()
                    .find_map(|p| Some((p, status::pod_cause(p)?)))
                {
                    Some((pod, cause)) => Some(match status::unbound_claim(pod) {
                        Some(claim) => {
                            let events = claim_events(ctx, &claim).await;
                            status::with_claim_cause(cause, &claim, &events)
                        }
                        None => cause,
                    }),
                    None => None,
                };
            }
            if host_network {
                observed.cache_addresses = pods.as_deref().map(status::member_addresses);
            }
            (observed, None, None)
        }
        Outcome::Stopped(p) => {
            let observed = Observed {
                not_applied: true,
                ..Seen::read(mirror, ctx).await?.observed()
            };
            (observed, Some(p), None)
        }
        Outcome::Deleting(seen, waiting) => (seen.observed(), None, Some(waiting)),
    };
    let nodes = ctx.nodes_summary(mirror);
    let pending = nodes.as_ref().is_some_and(|s| {
        s.nodes
            .iter()
            .any(|n| n.state == crate::crd::NodeState::Pending)
    });
    let agent_cause = if pending && cleanup.is_none() {
        Box::pin(agent_cause(ctx)).await
    } else {
        None
    };
    let observed = Observed {
        conflicts,
        problem,
        deleting: cleanup.is_some(),
        cleanup: cleanup.flatten(),
        nodes,
        agent_cause,
        node_refusal: node_status::refusal(
            mirror,
            &ctx.settings.agent_host_dirs,
            &ctx.settings.agent_image,
        ),
        namespace: ctx.settings.namespace.clone(),
        ..observed
    };
    update_status(mirror, ctx, &observed).await
}

/// Why nodes have not reported, from the installer's agent DaemonSet and
/// its events ([`status::agent_cause`]); read only while some selected node
/// has no report. `None` when they cannot be read.
async fn agent_cause(ctx: &Context) -> Option<String> {
    let name = &ctx.settings.agent_daemon_set;
    let ds = match ctx.ns::<DaemonSet>().get_opt(name).await {
        Ok(ds) => ds,
        Err(e) => {
            tracing::debug!(error = %api_error_text(&e), "cannot read the agent DaemonSet for the status");
            return None;
        }
    };
    let selector = format!("involvedObject.kind=DaemonSet,involvedObject.name={name}");
    let events = ctx
        .ns::<k8s_openapi::api::core::v1::Event>()
        .list(&ListParams::default().fields(&selector))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    status::agent_cause(ds.as_ref(), &events, &ctx.settings.namespace, name)
}

/// The events about the claim `name` in the children's namespace (core/v1:
/// the PersistentVolume controller and provisioners record there); empty
/// when they cannot be listed.
async fn claim_events(ctx: &Context, name: &str) -> Vec<k8s_openapi::api::core::v1::Event> {
    let selector = format!("involvedObject.kind=PersistentVolumeClaim,involvedObject.name={name}");
    ctx.ns::<k8s_openapi::api::core::v1::Event>()
        .list(&ListParams::default().fields(&selector))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// The cache's member pods, for why a member is not ready
/// ([`status::pod_cause`]) and where host-network members run
/// ([`status::member_addresses`]). `None` when they cannot be listed (the
/// status then just counts members and keeps the addresses it had).
async fn member_pods(mirror: &RegistryMirror, ctx: &Context) -> Option<Vec<Pod>> {
    let selector = resources::pods_selector(&mirror.name_any(), resources::COMPONENT_CACHE);
    match ctx
        .ns::<Pod>()
        .list(&kube::api::ListParams::default().labels(&selector))
        .await
    {
        Ok(pods) => Some(pods.items),
        Err(e) => {
            tracing::debug!(mirror = %mirror.name_any(), error = %api_error_text(&e), "cannot list the cache's pods for the status");
            None
        }
    }
}

async fn ssa(ctx: &Context, kind: ChildKind, object: &Value) -> Result<DynamicObject, Error> {
    apply_as_manager(ctx, kind, object, false).await
}

/// [`ssa`], or only its server-side dry run when `dry_run`.
async fn apply_as_manager(
    ctx: &Context,
    kind: ChildKind,
    object: &Value,
    dry_run: bool,
) -> Result<DynamicObject, Error> {
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut params = PatchParams::apply(MANAGER).force();
    params.dry_run = dry_run;
    ctx.children(kind)
        .patch(&name, &params, &Patch::Apply(object))
        .await
        .map_err(|source| Error::Apply {
            kind: kind.as_str(),
            name,
            source,
        })
}

/// Whether this generation of the spec has not been applied in full yet
/// (so its children are dry-run first).
fn needs_dry_run(mirror: &RegistryMirror) -> bool {
    mirror.status.as_ref().and_then(|s| s.observed_generation) != mirror.metadata.generation
}

/// The children whose content the spec shapes in ways the API server may
/// refuse (ports, resources, storage class, image), dry-run before anything
/// is written. The others are fixed shapes, and some cannot be dry-run
/// before what they refer to exists (a RoleBinding's escalation check needs
/// its Role: 404 in a dry run on a first apply).
const JUDGED: [ChildKind; 2] = [ChildKind::MembersService, ChildKind::StatefulSet];

/// Server-side dry run of the [`JUDGED`] children, then a real apply of
/// the NodePort Service: `Some(message)` when the API server refuses one as
/// invalid ([`validation::refused`]), `None` when all would apply. Other
/// failures are errors (retried).
///
/// The Service is written for real, last: the API server checks a NodePort
/// (range, already allocated) only when it allocates it, which a dry run
/// skips (seen on Kubernetes 1.35). Written last, it changes only once
/// everything else would apply too.
async fn dry_run_children(c: &Children, ctx: &Context) -> Result<Option<String>, Error> {
    let kinds = JUDGED
        .into_iter()
        .map(|k| (k, true))
        .chain([(ChildKind::Service, false)]);
    for (kind, dry_run) in kinds {
        let Some(object) = c.object(kind) else {
            continue;
        };
        match apply_as_manager(ctx, kind, &object, dry_run).await {
            Ok(_) => {}
            Err(Error::Apply {
                kind,
                name,
                source: kube::Error::Api(status),
            }) => {
                return match validation::refused(kind, &name, &status) {
                    Some(message) => Ok(Some(message)),
                    None => Err(Error::Apply {
                        kind,
                        name,
                        source: kube::Error::Api(status),
                    }),
                };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Applies every child in [`ChildKind::ALL`]'s order.
async fn apply_children(c: &Children, ctx: &Context) -> Result<Seen, Error> {
    let mut seen = Seen::default();
    for kind in ChildKind::ALL {
        if let Some(object) = c.object(kind) {
            let applied = ssa(ctx, kind, &object).await?;
            seen.record(kind, applied)?;
        }
    }
    Ok(seen)
}

/// Deletes this mirror's children that are no longer wanted (today: the
/// credentials Secret once no upstream has credentials; also any child left
/// by an older naming scheme): of every kind, those labelled as the mirror's
/// and owned by it that [`Children::wanted`] does not name.
async fn prune(mirror: &RegistryMirror, c: &Children, ctx: &Context) -> Result<(), Error> {
    let wanted = c.wanted();
    let uid = mirror.uid().unwrap_or_default();
    let lp = ListParams::default().labels(&resources::children_selector(&mirror.name_any()));
    for kind in ChildKind::resources() {
        let api = ctx.children(kind);
        for item in api.list_metadata(&lp).await?.items {
            let name = item.metadata.name.clone().unwrap_or_default();
            let ours = item
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == uid);
            // Kinds sharing a resource (the two Services) are pruned together.
            let is_wanted = wanted
                .iter()
                .any(|(k, n)| k.as_str() == kind.as_str() && *n == name);
            if ours && !is_wanted {
                tracing::info!(mirror = %mirror.name_any(), kind = kind.as_str(), %name, "pruning child no longer wanted");
                delete_ignoring_missing(&api, &name).await?;
            }
        }
    }
    Ok(())
}

/// Deletes the objects of `api` matching `selector` that have no owner.
async fn delete_ownerless<K>(api: &Api<K>, selector: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    for o in api
        .list(&ListParams::default().labels(selector))
        .await?
        .items
    {
        if o.owner_references().is_empty() {
            delete_ignoring_missing(api, &o.name_any()).await?;
        }
    }
    Ok(())
}

async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes the status when it changed; returns whether the mirror is Ready.
async fn update_status(
    mirror: &RegistryMirror,
    ctx: &Context,
    observed: &Observed,
) -> Result<bool, Error> {
    let previous = mirror.status.as_ref();
    let new = status::compute(mirror, previous, observed, Timestamp::now());
    let is_ready = status::condition(Some(&new), status::READY).is_some_and(|c| c.status == "True");
    if let Some(e) = status::ready_event(previous, &new) {
        publish(ctx, mirror, e.type_, &e.reason, "Reconcile", e.note).await;
    }

    if previous != Some(&new) {
        let api: Api<RegistryMirror> = Api::all(ctx.client.clone());
        // Entries of the per-mirror agents of earlier versions (each its own
        // field manager, with a heartbeat the operator never writes) would
        // survive an apply of the operator's list: dropped once, with the
        // whole list, which the apply then writes anew.
        if previous.is_some_and(|p| p.nodes.iter().any(|n| n.last_update.is_some())) {
            api.patch_status(
                &mirror.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"nodes": null}})),
            )
            .await?;
        }
        let patch = json!({
            "apiVersion": RegistryMirror::api_version(&()),
            "kind": RegistryMirror::kind(&()),
            "status": new,
        });
        api.patch_status(
            &mirror.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    Ok(is_ready)
}

async fn publish(
    ctx: &Context,
    mirror: &RegistryMirror,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(truncate(note, 1000)),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &mirror.object_ref(&())).await {
        tracing::warn!(mirror = %mirror.name_any(), error = %e, "cannot publish event");
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// How long deletion waits for node agents before giving up on them (an
/// agent that cannot run must not keep a mirror forever).
pub const NODE_CLEANUP_TIMEOUT: Duration = Duration::from_secs(600);

/// What deletion still waits for, as the condition and the log say it:
/// `Some(message)` while an existing node's agent reports configuration of
/// the mirror not yet `Removed` (`pending`, from [`node_status::cleanup_pending`];
/// `None` when the reports have not been read yet), until
/// [`NODE_CLEANUP_TIMEOUT`] after the deletion. Nodes that are gone or never
/// reported the mirror are not waited for.
pub fn node_cleanup_pending(
    mirror: &RegistryMirror,
    pending: Option<&[String]>,
    now: Timestamp,
) -> Option<String> {
    if let Some(deleted) = &mirror.metadata.deletion_timestamp {
        let waited = now.duration_since(deleted.0).as_secs().max(0) as u64;
        if waited >= NODE_CLEANUP_TIMEOUT.as_secs() {
            return None;
        }
    }
    match pending {
        None => Some("waiting until the node agents' reports have been read".into()),
        Some([]) => None,
        Some(names) => Some(format!(
            "waiting for node agents to remove their configuration from {}",
            node_status::name_list(names)
        )),
    }
}

/// Finalizer cleanup: wait for the node agents' acknowledgement, then delete
/// the children in [`ChildKind::deletion_order`], and the per-mirror agent
/// DaemonSet of earlier versions if one is left, so the finalizer can be
/// released.
async fn cleanup(mirror: &RegistryMirror, ctx: &Context) -> Result<Action, Error> {
    let name = mirror.name_any();
    let seen = Seen::read(mirror, ctx).await?;
    let pending = ctx.views.ready().then(|| {
        node_status::cleanup_pending(mirror, &ctx.views.nodes.state(), &ctx.views.reports.state())
    });
    let waiting = node_cleanup_pending(mirror, pending.as_deref(), Timestamp::now());
    report(
        mirror,
        ctx,
        Vec::new(),
        Outcome::Deleting(seen, waiting.clone()),
    )
    .await?;
    if let Some(waiting) = waiting {
        return Err(Error::NodeCleanupPending(waiting));
    }
    // Still pending but for the timeout: say so once, then let go.
    let deleted_at = mirror
        .metadata
        .deletion_timestamp
        .as_ref()
        .map_or_else(Timestamp::now, |t| t.0);
    if let Some(waiting) = node_cleanup_pending(mirror, pending.as_deref(), deleted_at) {
        publish(
            ctx,
            mirror,
            EventType::Warning,
            "NodeCleanupTimedOut",
            "Cleanup",
            format!(
                "node agents did not confirm removal within {NODE_CLEANUP_TIMEOUT:?} ({waiting}); hosts.toml files may remain on those nodes"
            ),
        )
        .await;
    }
    for kind in ChildKind::deletion_order() {
        delete_ignoring_missing(&ctx.children(kind), &kind.child_name(&name)).await?;
    }
    // Member pods and claims go with the StatefulSet that owns them
    // (`whenDeleted: Delete`); those orphaned by a growth the mirror's
    // deletion interrupted have no owner, so they are deleted here.
    let selector = resources::pods_selector(&name, resources::COMPONENT_CACHE);
    delete_ownerless(&ctx.ns::<Pod>(), &selector).await?;
    delete_ownerless(&ctx.ns::<PersistentVolumeClaim>(), &selector).await?;
    let uid = mirror.uid().unwrap_or_default();
    if !ctx.legacy_gone.lock().expect("not poisoned").contains(&uid) {
        delete_ignoring_missing(&ctx.ns::<DaemonSet>(), &resources::daemon_set_name(&name)).await?;
    }
    publish(
        ctx,
        mirror,
        EventType::Normal,
        "Deleted",
        "Cleanup",
        format!(
            "node configuration removed; deleted the cache in namespace {}",
            ctx.settings.namespace
        ),
    )
    .await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_read_as_the_api_server_said_them() {
        use kube::core::Status;
        let invalid = kube::Error::Api(
            Status::failure(
                "StatefulSet.apps \"x\" is invalid: spec: Forbidden: updates to statefulset spec are forbidden",
                "Invalid",
            )
            .with_code(422)
            .boxed(),
        );
        let e = Error::Apply {
            kind: "StatefulSet",
            name: "x".into(),
            source: invalid,
        };
        let text = e.to_string();
        assert_eq!(
            text,
            "applying StatefulSet x: Invalid (422): StatefulSet.apps \"x\" is invalid: spec: Forbidden: updates to statefulset spec are forbidden"
        );
        assert!(
            !text.contains("Status {") && !text.contains("Some("),
            "{text}"
        );
        assert!(!e.is_conflict());

        let conflict = Error::Kube(kube::Error::Api(
            Status::failure("the object has been modified", "Conflict")
                .with_code(409)
                .boxed(),
        ));
        assert!(conflict.is_conflict());
        assert_eq!(
            conflict.to_string(),
            "kubernetes API: Conflict (409): the object has been modified"
        );
        let wrapped = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(
            conflict,
        )));
        assert!(wrapped.is_conflict());
    }

    #[test]
    fn a_404_on_the_list_means_the_crd_is_not_installed() {
        use kube::core::Status;
        assert_eq!(crd_state(Ok(())), Ok(()));
        let not_found = kube::Error::Api(
            Status::failure(
                "the server could not find the requested resource",
                "NotFound",
            )
            .with_code(404)
            .boxed(),
        );
        let p = crd_state(Err(&not_found)).unwrap_err();
        assert_eq!(p, CrdProblem::NotInstalled);
        assert!(
            p.to_string().contains("apply crds/registrymirror.yaml"),
            "{p}"
        );
        let forbidden = kube::Error::Api(
            Status::failure("registrymirrors is forbidden", "Forbidden")
                .with_code(403)
                .boxed(),
        );
        let p = crd_state(Err(&forbidden)).unwrap_err();
        assert!(
            matches!(&p, CrdProblem::Unreachable(m) if m.contains("forbidden")),
            "{p}"
        );
    }

    #[test]
    fn deletion_waits_for_the_named_nodes_until_the_timeout() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let deleted: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut m = RegistryMirror::new(
            "hub",
            serde_json::from_value(json!({"upstreams": [{"host": "docker.io"}]})).unwrap(),
        );
        m.metadata.deletion_timestamp = Some(Time(deleted));
        let soon = deleted + std::time::Duration::from_secs(30);
        let n2 = ["n2".to_owned()];
        assert_eq!(
            node_cleanup_pending(&m, Some(&n2), soon).as_deref(),
            Some("waiting for node agents to remove their configuration from n2")
        );
        // Nothing concluded before the reports are read.
        assert!(node_cleanup_pending(&m, None, soon).is_some());
        assert_eq!(node_cleanup_pending(&m, Some(&[]), soon), None);
        // An agent that never answers does not hold the mirror forever.
        let late = deleted + NODE_CLEANUP_TIMEOUT;
        assert_eq!(node_cleanup_pending(&m, Some(&n2), late), None);
        assert_eq!(node_cleanup_pending(&m, None, late), None);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn children_map_to_their_cluster_scoped_owner() {
        let m = crate::fixtures::mirror(true);
        let c = resources::build(&m, &crate::fixtures::settings(), None);
        let r = owner_of(c.stateful_set).unwrap();
        assert_eq!(r, ObjectRef::<RegistryMirror>::new("hub"));
        assert_eq!(r.namespace, None, "cluster-scoped: no namespace");
        assert!(owner_of(StatefulSet::default()).is_none());
    }

    #[test]
    fn long_notes_are_cut_on_char_boundaries() {
        assert_eq!(truncate("ééé".into(), 3), "é");
        assert_eq!(truncate("abc".into(), 10), "abc");
    }

    /// Reconciles against a mocked API server (see [`crate::fixtures`]).
    mod against_the_api {
        use super::*;
        use crate::crd::NodeState;
        use crate::fixtures::{self, ApiServer, NS, metadata_list};
        use http::{Method, StatusCode};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

        fn core(plural: &str, name: &str) -> String {
            format!("/api/v1/namespaces/{NS}/{plural}/{name}")
        }

        fn apps(plural: &str, name: &str) -> String {
            format!("/apis/apps/v1/namespaces/{NS}/{plural}/{name}")
        }

        fn rbac(plural: &str, name: &str) -> String {
            format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/{plural}/{name}")
        }

        /// The member claims are listed (after the StatefulSet is read):
        /// here there are none.
        async fn expect_no_member_claims(api: &mut ApiServer) {
            api.expect(
                Method::GET,
                &format!("/api/v1/namespaces/{NS}/persistentvolumeclaims"),
                StatusCode::OK,
                |_| json!({"apiVersion": "v1", "kind": "PersistentVolumeClaimList", "metadata": {}, "items": []}),
            )
            .await;
        }

        /// Without a StatefulSet the reconcile first looks for the old
        /// layout to migrate: here there is none.
        async fn expect_nothing_to_migrate(api: &mut ApiServer) {
            for path in [
                apps("deployments", "regmirror-hub"),
                core("persistentvolumeclaims", "regmirror-hub"),
                core("persistentvolumeclaims", "data-regmirror-hub-0"),
            ] {
                api.expect_not_found(Method::GET, &path).await;
            }
        }

        /// `m` with its current generation already applied (no dry run).
        fn applied_before(mut m: RegistryMirror) -> RegistryMirror {
            m.status = Some(crate::crd::RegistryMirrorStatus {
                observed_generation: m.metadata.generation,
                ..Default::default()
            });
            m
        }

        #[tokio::test]
        async fn a_new_generation_the_api_server_refuses_writes_no_child() {
            // Generation 2 of a mirror whose generation 1 runs on port 31500 for docker.io.
            let mut m = fixtures::mirror(true);
            m.metadata.generation = Some(2);
            m.status = Some(crate::crd::RegistryMirrorStatus {
                observed_generation: Some(1),
                hosts: Some(vec!["docker.io".into()]),
                node_port: Some(31500),
                ..Default::default()
            });
            let result = fixtures::reconcile(m, |mut api| async move {
                let stateful_set = apps("statefulsets", "regmirror-hub");
                api.expect_not_found(Method::GET, &stateful_set).await;
                expect_no_member_claims(&mut api).await;
                for path in [
                    core("services", "regmirror-hub-members"),
                    stateful_set.clone(),
                ] {
                    let call = api
                        .expect(Method::PATCH, &path, StatusCode::OK, |c| c.body.clone())
                        .await;
                    assert!(call.query.contains("dryRun=All"), "{path}: {}", call.query);
                }
                // The NodePort Service last, for real: only a real write checks its port.
                let call = api.expect(
                    Method::PATCH,
                    &core("services", "regmirror-hub"),
                    StatusCode::UNPROCESSABLE_ENTITY,
                    |_| {
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                               "status": "Failure", "reason": "Invalid", "code": 422,
                               "message": "Service \"regmirror-hub\" is invalid: spec.ports[0].nodePort: Invalid value: 80: provided port is not in the valid range. The range of valid ports is 30000-32767"})
                    },
                )
                .await;
                assert!(!call.query.contains("dryRun"), "{}", call.query);
                // No real apply, no migration: the status reads the children as they are.
                for path in [stateful_set, core("services", "regmirror-hub")] {
                    api.expect_not_found(Method::GET, &path).await;
                }
                assert_eq!(
                    api.expect_event().await,
                    ("Warning".into(), "InvalidSpec".into())
                );
                let status = api.expect_status().await;
                let ready = &status["conditions"][0];
                assert_eq!(ready["reason"], "InvalidSpec");
                assert!(
                    ready["message"]
                        .as_str()
                        .unwrap()
                        .starts_with("spec.cache.nodePort: the API server refuses the cache's Service regmirror-hub: "),
                    "{ready}"
                );
                // What nodes act on stays generation 1's.
                assert_eq!(status["observedGeneration"], 1);
                assert_eq!(status["hosts"], json!(["docker.io"]));
                assert_eq!(status["nodePort"], 31500);
                api
            })
            .await;
            assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
        }

        fn success() -> Value {
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})
        }

        fn owned(name: &str, uid: &str) -> Value {
            json!({"name": name, "namespace": NS, "ownerReferences": [{
                "apiVersion": "regmirror.dev/v1alpha1", "kind": "RegistryMirror",
                "name": "hub", "uid": uid, "controller": true,
            }]})
        }

        fn deleted(mut m: RegistryMirror) -> RegistryMirror {
            m.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
            m
        }

        #[tokio::test]
        async fn first_reconcile_adds_the_finalizer_and_nothing_else() {
            let result = fixtures::reconcile(fixtures::mirror(false), |mut api| async move {
                let patch = api.expect_finalizer_patch(true).await;
                assert_eq!(
                    patch,
                    json!([
                        {"op": "test", "path": "/metadata/finalizers", "value": null},
                        {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
                    ])
                );
                api
            })
            .await;
            assert_eq!(result.unwrap(), Action::await_change());
        }

        #[tokio::test]
        async fn apply_applies_children_in_order_then_prunes_then_writes_the_status() {
            let result = fixtures::reconcile(applied_before(fixtures::mirror(true)), |mut api| async move {
                let stateful_set = apps("statefulsets", "regmirror-hub");
                api.expect_not_found(Method::GET, &stateful_set).await;
                expect_no_member_claims(&mut api).await;
                expect_nothing_to_migrate(&mut api).await;

                // Server-side apply, what is referred to first; no Secret
                // without credentials.
                let service_port = json!({"spec": {"ports": [
                    {"name": "registry", "port": 5000, "nodePort": 31500},
                ]}});
                for (path, stored) in [
                    (core("configmaps", "regmirror-hub"), json!({})),
                    (core("serviceaccounts", "regmirror-hub-cache"), json!({})),
                    (rbac("roles", "regmirror-hub-cache"), json!({})),
                    (rbac("rolebindings", "regmirror-hub-cache"), json!({})),
                    (core("services", "regmirror-hub-members"), json!({})),
                    (
                        stateful_set.clone(),
                        json!({"spec": {"replicas": 1}, "status": {"replicas": 1, "readyReplicas": 1}}),
                    ),
                    (core("services", "regmirror-hub"), service_port),
                ] {
                    let call = api.expect_apply(&path, stored).await;
                    let owner = &call.body["metadata"]["ownerReferences"][0];
                    assert_eq!(owner["uid"], "uid-hub", "{path}");
                }

                // Pruning lists every kind by the mirror's labels and deletes
                // what the mirror owns but no longer wants, nothing else.
                for (path, items) in [
                    (
                        format!("/api/v1/namespaces/{NS}/configmaps"),
                        vec![owned("regmirror-hub", "uid-hub")],
                    ),
                    (
                        format!("/api/v1/namespaces/{NS}/secrets"),
                        vec![
                            owned("regmirror-hub-credentials", "uid-hub"),
                            owned("regmirror-hub-other", "uid-of-an-older-hub"),
                        ],
                    ),
                    (format!("/api/v1/namespaces/{NS}/serviceaccounts"), vec![]),
                    (
                        format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles"),
                        vec![],
                    ),
                    (
                        format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings"),
                        vec![],
                    ),
                    // Both Services, listed once: the wanted ones stay.
                    (
                        format!("/api/v1/namespaces/{NS}/services"),
                        vec![
                            owned("regmirror-hub", "uid-hub"),
                            owned("regmirror-hub-members", "uid-hub"),
                        ],
                    ),
                    (format!("/apis/apps/v1/namespaces/{NS}/statefulsets"), vec![]),
                ] {
                    let call = api
                        .expect(Method::GET, &path, StatusCode::OK, |_| {
                            metadata_list(&items)
                        })
                        .await;
                    assert!(
                        call.query.contains("regmirror.dev%2Fmirror%3Dhub"),
                        "{path}: {}",
                        call.query
                    );
                    if path.ends_with("/secrets") {
                        api.expect(
                            Method::DELETE,
                            &core("secrets", "regmirror-hub-credentials"),
                            StatusCode::OK,
                            |_| success(),
                        )
                        .await;
                    }
                }

                // No agent DaemonSet of the per-mirror layout to retire.
                api.expect_not_found(Method::GET, &apps("daemonsets", "regmirror-hub-agent"))
                    .await;

                // Then the events and the status, from what the API server
                // returned and what the node reports say.
                assert_eq!(
                    api.expect_event().await,
                    ("Normal".into(), "Created".into())
                );
                assert_eq!(api.expect_event().await, ("Normal".into(), "Ready".into()));
                let status = api.expect_status().await;
                assert_eq!(status["nodePort"], 31500);
                assert_eq!(status["nodesConfigured"], 1);
                assert_eq!(status["nodes"], json!([{"name": "n1", "state": "Configured"}]));
                assert_eq!(
                    status["cache"],
                    json!({"replicas": 1, "readyReplicas": 1, "members": "1/1"})
                );
                assert_eq!(status["conditions"][0]["type"], "Ready");
                assert_eq!(status["conditions"][0]["status"], "True");
                api
            })
            .await;
            assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
        }

        #[tokio::test]
        async fn a_failed_apply_is_reported_in_the_status_from_the_children_as_they_are() {
            let result = fixtures::reconcile(
                applied_before(fixtures::mirror(true)),
                |mut api| async move {
                    let stateful_set = apps("statefulsets", "regmirror-hub");
                    api.expect_not_found(Method::GET, &stateful_set).await;
                    expect_no_member_claims(&mut api).await;
                    expect_nothing_to_migrate(&mut api).await;
                    api.expect(
                        Method::PATCH,
                        &core("configmaps", "regmirror-hub"),
                        StatusCode::FORBIDDEN,
                        |_| {
                            json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                               "status": "Failure", "reason": "Forbidden", "code": 403,
                               "message": "configmaps is forbidden"})
                        },
                    )
                    .await;
                    // Nothing more is applied or pruned; the status reads the children.
                    for path in [stateful_set, core("services", "regmirror-hub")] {
                        api.expect_not_found(Method::GET, &path).await;
                    }
                    assert_eq!(
                        api.expect_event().await,
                        ("Warning".into(), "ApplyFailed".into())
                    );
                    let status = api.expect_status().await;
                    let ready = &status["conditions"][0];
                    assert_eq!(ready["reason"], "ApplyFailed");
                    assert!(
                        ready["message"]
                            .as_str()
                            .unwrap()
                            .starts_with("applying ConfigMap regmirror-hub: "),
                        "{ready}"
                    );
                    api
                },
            )
            .await;
            assert_eq!(result.unwrap_err().kind(), "apply");
        }

        #[tokio::test]
        async fn deletion_deletes_the_children_then_the_old_agents_then_releases_the_finalizer() {
            let m = deleted(fixtures::mirror(true));
            let views = fixtures::nodes_reporting(&[("n1", NodeState::Removed)]);
            let result = fixtures::reconcile_seeing(m, views, |mut api| async move {
                expect_deleting_status(&mut api).await;

                // Every node reported Removed: the children go, and an
                // agent DaemonSet of the per-mirror layout if one is left.
                for (path, found) in [
                    (apps("statefulsets", "regmirror-hub"), true),
                    (core("services", "regmirror-hub-members"), true),
                    (core("services", "regmirror-hub"), true),
                    (core("configmaps", "regmirror-hub"), true),
                    (core("secrets", "regmirror-hub-credentials"), false),
                    (core("serviceaccounts", "regmirror-hub-cache"), true),
                    (rbac("roles", "regmirror-hub-cache"), true),
                    (rbac("rolebindings", "regmirror-hub-cache"), true),
                ] {
                    if found {
                        api.expect(Method::DELETE, &path, StatusCode::OK, |_| success())
                            .await;
                    } else {
                        api.expect_not_found(Method::DELETE, &path).await;
                    }
                }
                // Member pods and claims: those still owned by the
                // StatefulSet go with it; those orphaned by an interrupted
                // growth are deleted.
                for (plural, list, prefix) in [
                    ("pods", "PodList", "regmirror-hub"),
                    ("persistentvolumeclaims", "PersistentVolumeClaimList", "data-regmirror-hub"),
                ] {
                    api.expect(
                        Method::GET,
                        &format!("/api/v1/namespaces/{NS}/{plural}"),
                        StatusCode::OK,
                        |_| {
                            json!({"apiVersion": "v1", "kind": list, "metadata": {}, "items": [
                                {"metadata": {"name": format!("{prefix}-0"), "namespace": NS,
                                              "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                                                                   "name": "regmirror-hub", "uid": "s"}]}},
                                {"metadata": {"name": format!("{prefix}-1"), "namespace": NS}},
                            ]})
                        },
                    )
                    .await;
                    api.expect(
                        Method::DELETE,
                        &core(plural, &format!("{prefix}-1")),
                        StatusCode::OK,
                        |_| success(),
                    )
                    .await;
                }
                api.expect_not_found(Method::DELETE, &apps("daemonsets", "regmirror-hub-agent"))
                    .await;
                assert_eq!(
                    api.expect_event().await,
                    ("Normal".into(), "Deleted".into())
                );
                let patch = api.expect_finalizer_patch(false).await;
                assert_eq!(
                    patch,
                    json!([
                        {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
                        {"op": "remove", "path": "/metadata/finalizers/0"},
                    ])
                );
                api
            })
            .await;
            assert_eq!(result.unwrap(), Action::await_change());
        }

        #[tokio::test]
        async fn deletion_waits_while_a_node_agent_still_has_configuration() {
            let m = deleted(fixtures::mirror(true));
            let views = fixtures::nodes_reporting(&[
                ("n1", NodeState::Removed),
                ("n2", NodeState::Configured),
            ]);
            let result = fixtures::reconcile_seeing(m, views, |mut api| async move {
                let status = expect_deleting_status(&mut api).await;
                let ready = &status["conditions"][0]["message"];
                assert!(
                    ready
                        .as_str()
                        .unwrap()
                        .ends_with("waiting for node agents to remove their configuration from n2"),
                    "{ready}"
                );
                // No deletion, and the finalizer stays.
                api
            })
            .await;
            let err = result.unwrap_err();
            assert_eq!(err.kind(), "node_cleanup_pending");
            assert!(
                err.to_string().contains("n2") && !err.to_string().contains("n1"),
                "{err}"
            );
        }

        /// Generation 2 of `hub` asks for 2Gi of class `fast` where
        /// generation 1 made 1Gi: the mirror, and its StatefulSet as it runs.
        fn growing() -> (RegistryMirror, Value) {
            let mut m = fixtures::mirror(true);
            m.spec.storage.storage_class_name = Some("fast".into());
            let mut before = m.clone();
            m.spec.storage.size = "2Gi".into();
            m.metadata.generation = Some(2);
            m.status = Some(crate::crd::RegistryMirrorStatus {
                observed_generation: Some(1),
                hosts: Some(vec!["docker.io".into()]),
                ..Default::default()
            });
            before.spec.storage.size = "1Gi".into();
            let mut sts = serde_json::to_value(
                resources::build(&before, &fixtures::settings(), None).stateful_set,
            )
            .unwrap();
            sts["metadata"]["uid"] = json!("sts-uid");
            (m, sts)
        }

        /// Expects the member claims listed (member 0's: bound, 1Gi, class
        /// `fast`), then the class read, answered `class`.
        async fn expect_claims_and_class(api: &mut ApiServer, class: Value) {
            let call = api
                .expect(
                    Method::GET,
                    &format!("/api/v1/namespaces/{NS}/persistentvolumeclaims"),
                    StatusCode::OK,
                    |_| {
                        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaimList", "metadata": {},
                               "items": [{"metadata": {"name": "data-regmirror-hub-0", "namespace": NS, "resourceVersion": "7"},
                                          "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "1Gi"}}},
                                          "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}}]})
                    },
                )
                .await;
            assert!(
                call.query.contains("app.kubernetes.io%2Finstance%3Dhub"),
                "{}",
                call.query
            );
            api.expect(
                Method::GET,
                "/apis/storage.k8s.io/v1/storageclasses/fast",
                StatusCode::OK,
                |_| class,
            )
            .await;
        }

        #[tokio::test]
        async fn a_larger_size_a_class_will_not_expand_writes_nothing() {
            let (m, sts) = growing();
            let result = fixtures::reconcile(m, |mut api| async move {
                let stateful_set = apps("statefulsets", "regmirror-hub");
                let running = sts.clone();
                api.expect(Method::GET, &stateful_set, StatusCode::OK, |_| running)
                    .await;
                expect_claims_and_class(
                    &mut api,
                    json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                           "metadata": {"name": "fast"}, "provisioner": "example.com/p"}),
                )
                .await;
                // No dry run, no write: the status reads the children as they are.
                api.expect(Method::GET, &stateful_set, StatusCode::OK, |_| sts)
                    .await;
                api.expect_not_found(Method::GET, &core("services", "regmirror-hub"))
                    .await;
                assert_eq!(
                    api.expect_event().await,
                    ("Warning".into(), "StorageNotExpandable".into())
                );
                let status = api.expect_status().await;
                let ready = &status["conditions"][0];
                assert_eq!(ready["reason"], "StorageNotExpandable");
                assert!(
                    ready["message"].as_str().unwrap().contains(
                        "StorageClass fast of claim data-regmirror-hub-0 does not allow volume expansion"
                    ),
                    "{ready}"
                );
                assert_eq!(status["observedGeneration"], 1);
                assert_eq!(status["hosts"], json!(["docker.io"]));
                api
            })
            .await;
            assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(60)));
        }

        #[tokio::test]
        async fn a_larger_size_expands_the_claims_then_deletes_the_stateful_set_orphaning_its_pods()
        {
            let (m, sts) = growing();
            let result = fixtures::reconcile(m, |mut api| async move {
                let stateful_set = apps("statefulsets", "regmirror-hub");
                api.expect(Method::GET, &stateful_set, StatusCode::OK, |_| sts)
                    .await;
                expect_claims_and_class(
                    &mut api,
                    json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                           "metadata": {"name": "fast"}, "provisioner": "example.com/p",
                           "allowVolumeExpansion": true}),
                )
                .await;
                // The dry run sees the claim template as it runs (Kubernetes
                // refuses a change of it).
                api.expect(Method::PATCH, &core("services", "regmirror-hub-members"), StatusCode::OK, |c| c.body.clone())
                    .await;
                let dry = api
                    .expect(Method::PATCH, &stateful_set, StatusCode::OK, |c| c.body.clone())
                    .await;
                assert!(dry.query.contains("dryRun=All"), "{}", dry.query);
                assert_eq!(
                    dry.body["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
                    "1Gi"
                );
                api.expect(Method::PATCH, &core("services", "regmirror-hub"), StatusCode::OK, |c| c.body.clone())
                    .await;
                // Each claim grows first, on the version that was judged.
                let claim = core("persistentvolumeclaims", "data-regmirror-hub-0");
                api.expect(Method::GET, &claim, StatusCode::OK, |_| {
                    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                           "metadata": {"name": "data-regmirror-hub-0", "namespace": NS, "resourceVersion": "7"}})
                })
                .await;
                let patch = api
                    .expect(Method::PATCH, &claim, StatusCode::OK, |c| c.body.clone())
                    .await;
                assert_eq!(patch.content_type, "application/merge-patch+json");
                assert_eq!(
                    patch.body,
                    json!({"metadata": {"resourceVersion": "7"},
                           "spec": {"resources": {"requests": {"storage": "2Gi"}}}})
                );
                // Then the StatefulSet goes, its pods and claims orphaned:
                // refused here, which ends the pass before anything else.
                let delete = api
                    .expect(Method::DELETE, &stateful_set, StatusCode::INTERNAL_SERVER_ERROR, |_| {
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                               "status": "Failure", "reason": "InternalError", "code": 500, "message": "etcd"})
                    })
                    .await;
                assert_eq!(delete.body["propagationPolicy"], "Orphan");
                assert_eq!(delete.body["preconditions"]["uid"], "sts-uid");
                api
            })
            .await;
            assert_eq!(result.unwrap_err().kind(), "kube");
        }

        /// What cleanup does first: reads the children (the cache gone),
        /// then reports Deleting; returns the status written.
        async fn expect_deleting_status(api: &mut ApiServer) -> Value {
            api.expect_not_found(Method::GET, &apps("statefulsets", "regmirror-hub"))
                .await;
            api.expect_not_found(Method::GET, &core("services", "regmirror-hub"))
                .await;
            assert_eq!(
                api.expect_event().await,
                ("Normal".into(), "Deleting".into())
            );
            let status = api.expect_status().await;
            assert_eq!(status["conditions"][0]["reason"], "Deleting");
            status
        }
    }
}
