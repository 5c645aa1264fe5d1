//! The reconcile loop: validate -> build -> server-side apply -> prune ->
//! status, per `RegistryMirror`, plus the finalizer that removes node
//! configuration before a mirror goes away.
//!
//! Children are namespaced (the operator's namespace) while the mirror is
//! cluster-scoped. `Controller::owns` would map a child's owner reference to
//! a *namespaced* object reference that never matches the mirror, so children
//! are watched with `watches` and an explicit owner-reference mapper.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::crd::RegistryMirror;
use crate::credentials;
use crate::metrics::Metrics;
use crate::resources::{self, Children, MANAGER, Settings};
use crate::status::{self, Observed, Problem, reason};

/// Held on every mirror until its node configuration is removed.
pub const FINALIZER: &str = "regmirror.dev/node-config";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("applying {kind} {name}: {source}")]
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

impl Error {
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
    /// Consecutive failures per mirror, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    fn ns<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
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
    let controller = Controller::new(mirrors.clone(), watcher::Config::default().any_semantic());
    let store = controller.store();
    let ns = settings.namespace.clone();
    let children =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        settings,
        metrics,
        mirrors: store.clone(),
        failures: Mutex::default(),
    });
    let secrets_store = store.clone();
    let peers_store = store.clone();
    controller
        .watches(
            Api::<Deployment>::namespaced(client.clone(), &ns),
            children.clone(),
            owner_of,
        )
        .watches(
            Api::<DaemonSet>::namespaced(client.clone(), &ns),
            children.clone(),
            owner_of,
        )
        .watches(
            Api::<Service>::namespaced(client.clone(), &ns),
            children.clone(),
            owner_of,
        )
        .watches(
            Api::<ConfigMap>::namespaced(client.clone(), &ns),
            children.clone(),
            owner_of,
        )
        .watches(
            Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns),
            children,
            owner_of,
        )
        // Users' credential Secrets carry no label of ours: watch the namespace.
        .watches(
            Api::<Secret>::namespaced(client.clone(), &ns),
            watcher::Config::default(),
            move |secret: Secret| {
                let name = secret.name_any();
                secrets_store
                    .state()
                    .into_iter()
                    .filter(|m| {
                        m.spec.upstreams.iter().any(|u| {
                            u.credentials_secret
                                .as_ref()
                                .is_some_and(|r| r.name == name)
                        }) || owner_of(secret.clone()).is_some_and(|o| o.name == m.name_any())
                    })
                    .map(|m| ObjectRef::from_obj(m.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
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
                Err(e) => tracing::debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
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
    tracing::warn!(mirror = %name, error = %error, retry_in = ?delay, "reconcile failed");
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
            let mut observed = observe(mirror, ctx).await?;
            observed.conflicts = conflicts;
            observed.problem = Some(problem);
            update_status(mirror, ctx, &observed).await?;
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
    };

    let children = resources::build(mirror, &ctx.settings, creds.as_deref());
    let before: Option<Deployment> = ctx
        .ns::<Deployment>()
        .get_opt(&resources::deployment_name(&name))
        .await?;

    let applied = match apply_children(&children, ctx).await {
        Ok(a) => a,
        Err(e) => {
            let mut observed = observe(mirror, ctx).await?;
            observed.conflicts = conflicts;
            observed.problem = Some(Problem {
                reason: reason::APPLY_FAILED,
                message: e.to_string(),
            });
            update_status(mirror, ctx, &observed).await?;
            return Err(e);
        }
    };
    prune(mirror, &children, ctx).await?;

    let event = match &before {
        None => Some((
            "Created",
            format!(
                "created the cache ({}) and node agents ({}) in namespace {}",
                resources::deployment_name(&name),
                resources::daemon_set_name(&name),
                ctx.settings.namespace
            ),
        )),
        Some(d) if config_hash(d) != Some(children.config_hash.as_str()) => Some((
            "ConfigChanged",
            "cache configuration changed: rolling the cache pod".to_owned(),
        )),
        Some(_) => None,
    };
    if let Some((reason, note)) = event {
        publish(ctx, mirror, EventType::Normal, reason, "Apply", note).await;
    }

    let observed = Observed {
        conflicts,
        ..observed_from(&applied)
    };
    let ready = update_status(mirror, ctx, &observed).await?;
    Ok(Action::requeue(if ready {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(30)
    }))
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

struct Applied {
    deployment: Deployment,
    service: Service,
    daemon_set: DaemonSet,
}

fn observed_from(a: &Applied) -> Observed {
    Observed {
        cache_replicas: Some(replicas(&a.deployment)),
        node_port: node_port(&a.service),
        agents: Some(agents(&a.daemon_set)),
        ..Default::default()
    }
}

fn replicas(d: &Deployment) -> (i32, i32) {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let avail = d
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0);
    (want, avail)
}

fn node_port(s: &Service) -> Option<i32> {
    s.spec.as_ref()?.ports.as_ref()?.first()?.node_port
}

fn agents(ds: &DaemonSet) -> (i32, i32) {
    ds.status
        .as_ref()
        .map(|s| (s.desired_number_scheduled, s.number_ready))
        .unwrap_or((0, 0))
}

fn config_hash(d: &Deployment) -> Option<&str> {
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

/// Reads the children as they are (when nothing is applied).
async fn observe(mirror: &RegistryMirror, ctx: &Context) -> Result<Observed, Error> {
    let name = mirror.name_any();
    let d = ctx
        .ns::<Deployment>()
        .get_opt(&resources::deployment_name(&name))
        .await?;
    let s = ctx
        .ns::<Service>()
        .get_opt(&resources::service_name(&name))
        .await?;
    let ds = ctx
        .ns::<DaemonSet>()
        .get_opt(&resources::daemon_set_name(&name))
        .await?;
    Ok(Observed {
        cache_replicas: d.as_ref().map(replicas),
        node_port: s.as_ref().and_then(node_port),
        agents: ds.as_ref().map(agents),
        ..Default::default()
    })
}

async fn ssa<K>(api: &Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::Apply {
        kind: std::any::type_name::<K>()
            .rsplit("::")
            .next()
            .unwrap_or("object"),
        name,
        source,
    })
}

async fn apply_children(c: &Children, ctx: &Context) -> Result<Applied, Error> {
    ssa(&ctx.ns::<ConfigMap>(), &c.config_map).await?;
    if let Some(s) = &c.credentials {
        ssa(&ctx.ns::<Secret>(), s).await?;
    }
    ssa(&ctx.ns::<PersistentVolumeClaim>(), &c.pvc).await?;
    let deployment = ssa(&ctx.ns::<Deployment>(), &c.deployment).await?;
    let service = ssa(&ctx.ns::<Service>(), &c.service).await?;
    let daemon_set = ssa(&ctx.ns::<DaemonSet>(), &c.daemon_set).await?;
    Ok(Applied {
        deployment,
        service,
        daemon_set,
    })
}

/// Deletes this mirror's children that are no longer wanted (today: the
/// credentials Secret once no upstream has credentials; also any child left
/// by an older naming scheme).
async fn prune(mirror: &RegistryMirror, c: &Children, ctx: &Context) -> Result<(), Error> {
    let wanted = c.names();
    let uid = mirror.uid().unwrap_or_default();
    prune_kind::<ConfigMap>(ctx, mirror, &uid, &wanted).await?;
    prune_kind::<Secret>(ctx, mirror, &uid, &wanted).await?;
    prune_kind::<PersistentVolumeClaim>(ctx, mirror, &uid, &wanted).await?;
    prune_kind::<Deployment>(ctx, mirror, &uid, &wanted).await?;
    prune_kind::<Service>(ctx, mirror, &uid, &wanted).await?;
    prune_kind::<DaemonSet>(ctx, mirror, &uid, &wanted).await?;
    Ok(())
}

async fn prune_kind<K>(
    ctx: &Context,
    mirror: &RegistryMirror,
    uid: &str,
    wanted: &[(&'static str, String)],
) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api = ctx.ns::<K>();
    let kind = K::kind(&());
    let lp = ListParams::default().labels(&resources::children_selector(&mirror.name_any()));
    for item in api.list_metadata(&lp).await?.items {
        let name = item.metadata.name.clone().unwrap_or_default();
        let ours = item
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid);
        if ours && !wanted.iter().any(|(k, n)| *k == kind && *n == name) {
            tracing::info!(mirror = %mirror.name_any(), %kind, %name, "pruning child no longer wanted");
            delete_ignoring_missing(&api, &name).await?;
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
    let ready = status::condition(Some(&new), status::READY);
    let is_ready = ready.is_some_and(|c| c.status == "True");

    // Events on Ready transitions and reason changes, never on every pass.
    let old_ready = status::condition(previous, status::READY);
    if let Some(r) = ready
        && old_ready.is_none_or(|o| o.status != r.status || o.reason != r.reason)
    {
        let type_ = if is_ready {
            EventType::Normal
        } else if matches!(
            r.reason.as_str(),
            reason::CACHE_UNAVAILABLE | reason::AGENTS_NOT_READY | reason::NOT_OBSERVED
        ) {
            // Expected while things start; not worth a warning.
            EventType::Normal
        } else {
            EventType::Warning
        };
        publish(
            ctx,
            mirror,
            type_,
            &r.reason,
            "Reconcile",
            r.message.clone(),
        )
        .await;
    }

    let mut comparable = previous.cloned().unwrap_or_default();
    comparable.nodes.clear();
    if comparable != new {
        let api: Api<RegistryMirror> = Api::all(ctx.client.clone());
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

/// Whether the node agents still have configuration for this mirror on some
/// node: `Some(what)` while they do. Agents remove their files when they see
/// the mirror being deleted and report `state: Removed` in `status.nodes`;
/// every node that reported anything must have reported that, unless the
/// agents are gone or [`NODE_CLEANUP_TIMEOUT`] has passed.
pub fn node_cleanup_pending(
    mirror: &RegistryMirror,
    agents: Option<&DaemonSet>,
    now: Timestamp,
) -> Option<String> {
    let scheduled = agents?
        .status
        .as_ref()
        .map_or(0, |s| s.current_number_scheduled);
    if scheduled == 0 {
        return None;
    }
    if let Some(deleted) = &mirror.metadata.deletion_timestamp {
        let waited = now.duration_since(deleted.0).as_secs().max(0) as u64;
        if waited >= NODE_CLEANUP_TIMEOUT.as_secs() {
            return None;
        }
    }
    let pending: Vec<&str> = mirror
        .status
        .iter()
        .flat_map(|s| &s.nodes)
        .filter(|n| n.state != crate::crd::NodeState::Removed)
        .map(|n| n.name.as_str())
        .collect();
    (!pending.is_empty()).then(|| {
        format!(
            "waiting for node agents to remove their configuration from {}",
            pending.join(", ")
        )
    })
}

/// Finalizer cleanup: wait for the node agents' acknowledgement, then delete
/// the children (the agents last), so the finalizer can be released.
async fn cleanup(mirror: &RegistryMirror, ctx: &Context) -> Result<Action, Error> {
    let name = mirror.name_any();
    let observed = Observed {
        deleting: true,
        ..observe(mirror, ctx).await?
    };
    update_status(mirror, ctx, &observed).await?;
    let ds = ctx
        .ns::<DaemonSet>()
        .get_opt(&resources::daemon_set_name(&name))
        .await?;
    if let Some(waiting) = node_cleanup_pending(mirror, ds.as_ref(), Timestamp::now()) {
        return Err(Error::NodeCleanupPending(waiting));
    }
    // Still pending but for the timeout: say so once, then let go.
    let deleted_at = mirror
        .metadata
        .deletion_timestamp
        .as_ref()
        .map_or_else(Timestamp::now, |t| t.0);
    if node_cleanup_pending(mirror, ds.as_ref(), deleted_at).is_some() {
        publish(
            ctx,
            mirror,
            EventType::Warning,
            "NodeCleanupTimedOut",
            "Cleanup",
            format!(
                "node agents did not confirm removal within {NODE_CLEANUP_TIMEOUT:?}; hosts.toml files may remain on some nodes"
            ),
        )
        .await;
    }
    delete_ignoring_missing(&ctx.ns::<Deployment>(), &resources::deployment_name(&name)).await?;
    delete_ignoring_missing(&ctx.ns::<Service>(), &resources::service_name(&name)).await?;
    delete_ignoring_missing(&ctx.ns::<ConfigMap>(), &resources::config_map_name(&name)).await?;
    delete_ignoring_missing(&ctx.ns::<Secret>(), &resources::credentials_name(&name)).await?;
    delete_ignoring_missing(
        &ctx.ns::<PersistentVolumeClaim>(),
        &resources::pvc_name(&name),
    )
    .await?;
    delete_ignoring_missing(&ctx.ns::<DaemonSet>(), &resources::daemon_set_name(&name)).await?;
    publish(
        ctx,
        mirror,
        EventType::Normal,
        "Deleted",
        "Cleanup",
        format!(
            "node configuration removed; deleted the cache and node agents in namespace {}",
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
    fn deletion_waits_for_every_reporting_node_until_the_timeout() {
        use crate::crd::{NodeResult, NodeState, RegistryMirrorStatus};
        use k8s_openapi::api::apps::v1::DaemonSetStatus;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let node = |name: &str, state| NodeResult {
            name: name.into(),
            state,
            message: None,
            last_update: None,
        };
        let deleted: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut m = RegistryMirror::new(
            "hub",
            serde_json::from_value(json!({"upstreams": [{"host": "docker.io"}]})).unwrap(),
        );
        m.metadata.deletion_timestamp = Some(Time(deleted));
        m.status = Some(RegistryMirrorStatus {
            nodes: vec![
                node("n1", NodeState::Removed),
                node("n2", NodeState::Configured),
            ],
            ..Default::default()
        });
        let ds = DaemonSet {
            status: Some(DaemonSetStatus {
                current_number_scheduled: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let soon = deleted + std::time::Duration::from_secs(30);
        let waiting =
            node_cleanup_pending(&m, Some(&ds), soon).expect("n2 has not removed its files");
        assert!(
            waiting.contains("n2") && !waiting.contains("n1"),
            "{waiting}"
        );
        // No agents running (or none scheduled): nothing can be waited for.
        assert_eq!(node_cleanup_pending(&m, None, soon), None);
        // An agent that never answers does not hold the mirror forever.
        let late = deleted + NODE_CLEANUP_TIMEOUT;
        assert_eq!(node_cleanup_pending(&m, Some(&ds), late), None);
        m.status.as_mut().unwrap().nodes[1].state = NodeState::Removed;
        assert_eq!(node_cleanup_pending(&m, Some(&ds), soon), None);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn children_map_to_their_cluster_scoped_owner() {
        let mut m = RegistryMirror::new(
            "hub",
            serde_json::from_value(json!({"upstreams": [{"host": "docker.io"}]})).unwrap(),
        );
        m.metadata.uid = Some("u".into());
        let settings = Settings {
            namespace: "ns".into(),
            cache_image: "c".into(),
            agent_image: "a".into(),
            agent_service_account: "sa".into(),
        };
        let c = resources::build(&m, &settings, None);
        let r = owner_of(c.deployment).unwrap();
        assert_eq!(r, ObjectRef::<RegistryMirror>::new("hub"));
        assert_eq!(r.namespace, None, "cluster-scoped: no namespace");
        assert!(owner_of(Deployment::default()).is_none());
    }

    #[test]
    fn long_notes_are_cut_on_char_boundaries() {
        assert_eq!(truncate("ééé".into(), 3), "é");
        assert_eq!(truncate("abc".into(), 10), "abc");
    }
}
