//! Pure status logic: host conflicts between mirrors, conditions derived from
//! what the children report, and condition transitions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;

use crate::crd::{CacheStatus, NodeState, RegistryMirror, RegistryMirrorStatus};
use crate::node_status::NodesSummary;

pub const READY: &str = "Ready";
pub const CACHE_AVAILABLE: &str = "CacheAvailable";
pub const NODES_CONFIGURED: &str = "NodesConfigured";

/// Condition reasons (CamelCase, stable: users and alerts match on them).
pub mod reason {
    pub const READY: &str = "Ready";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const CREDENTIALS_UNAVAILABLE: &str = "CredentialsUnavailable";
    pub const APPLY_FAILED: &str = "ApplyFailed";
    pub const HOST_CONFLICT: &str = "HostConflict";
    pub const DELETING: &str = "Deleting";
    pub const AVAILABLE: &str = "Available";
    pub const CACHE_UNAVAILABLE: &str = "CacheUnavailable";
    /// Some cache members are not ready (starting, scaling, rolling).
    pub const MEMBERS_NOT_READY: &str = "MembersNotReady";
    /// The cache is moving from the single-Deployment layout to a StatefulSet.
    pub const MIGRATING: &str = "Migrating";
    /// A larger `storage.size` whose member claims Kubernetes will not
    /// expand (class without `allowVolumeExpansion`, unbound claim):
    /// nothing of that generation is applied ([`crate::storage`]).
    pub const STORAGE_NOT_EXPANDABLE: &str = "StorageNotExpandable";
    /// The cache StatefulSet is being re-created with larger claims and its
    /// deletion (pods and claims orphaned, kept running) has not finished.
    pub const STORAGE_GROWING: &str = "StorageGrowing";
    pub const NOT_OBSERVED: &str = "NotObserved";
    pub const NODES_CONFIGURED: &str = "NodesConfigured";
    pub const AGENTS_READY: &str = "AgentsReady";
    pub const AGENTS_NOT_READY: &str = "AgentsNotReady";
    pub const NO_NODES: &str = "NoNodes";
    pub const NODES_NOT_CONFIGURED: &str = "NodesNotConfigured";
    /// Selected nodes whose agents have not reported on the mirror yet (and
    /// none reports a problem).
    pub const NODES_PENDING: &str = "NodesPending";
    pub const NO_HOSTS: &str = "NoHosts";
    /// `spec.nodes.containerdConfigDir`/`containerdConfigFile` outside the
    /// installer's directories (issue 17).
    pub const CONFIG_DIR_NOT_ALLOWED: &str = "ConfigDirNotAllowed";
    /// `spec.nodes.agentImage` other than the installed agent image (issue 17).
    pub const AGENT_IMAGE_NOT_ALLOWED: &str = "AgentImageNotAllowed";
}

/// A host of this mirror that an older mirror already serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub host: String,
    /// The mirror that keeps the host.
    pub owner: String,
}

/// Orders mirrors by who claimed first: creation time, then name.
fn claim_key(m: &RegistryMirror) -> (Option<Timestamp>, String) {
    (
        m.metadata.creation_timestamp.as_ref().map(|t| t.0),
        m.metadata.name.clone().unwrap_or_default(),
    )
}

/// Hosts of `me` that another mirror in `all` (which may include `me`) claimed
/// first. Mirrors being deleted keep their claims until their node
/// configuration is gone.
pub fn conflicts(me: &RegistryMirror, all: &[&RegistryMirror]) -> Vec<Conflict> {
    let my_key = claim_key(me);
    let mut out = Vec::new();
    for u in &me.spec.upstreams {
        let winner = all
            .iter()
            .filter(|o| o.metadata.name != me.metadata.name)
            .filter(|o| o.spec.upstreams.iter().any(|ou| ou.host == u.host))
            .map(|o| claim_key(o))
            .filter(|k| *k < my_key)
            .min();
        if let Some((_, owner)) = winner {
            out.push(Conflict {
                host: u.host.clone(),
                owner,
            });
        }
    }
    out
}

/// Whether two mirrors share an upstream host (so a change to one may change
/// the other's conflicts).
pub fn share_a_host(a: &RegistryMirror, b: &RegistryMirror) -> bool {
    a.spec
        .upstreams
        .iter()
        .any(|u| b.spec.upstreams.iter().any(|v| v.host == u.host))
}

/// A problem that stops reconciling before children are (fully) applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// What the controller observed about a mirror's children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// `(desired, ready)` members of the cache StatefulSet, if it exists.
    pub cache_replicas: Option<(i32, i32)>,
    /// Allocated NodePort of the cache Service.
    pub node_port: Option<i32>,
    /// With `cache.hostNetwork`: the member pods' node addresses
    /// ([`member_addresses`]); `None` when they were not listed.
    pub cache_addresses: Option<Vec<String>>,
    /// What the node agents report about the nodes the mirror selects; `None`
    /// until the Nodes and the reports have been listed.
    pub nodes: Option<NodesSummary>,
    /// Why the installer's settings refuse the mirror's node configuration
    /// ([`crate::node_status::refusal`]).
    pub node_refusal: Option<Problem>,
    /// Why an agent DaemonSet of the per-mirror layout is still kept
    /// ([`crate::agent_migration`]).
    pub legacy_agents: Option<String>,
    /// While deleting: what the finalizer waits for.
    pub cleanup: Option<String>,
    pub conflicts: Vec<Conflict>,
    pub problem: Option<Problem>,
    pub deleting: bool,
    /// The namespace the mirror's children live in (the operator's), for
    /// the commands a message suggests.
    pub namespace: String,
    /// Why a cache member is not ready, when a pod says ([`pod_cause`]).
    pub cache_cause: Option<String>,
    /// Why nodes have not reported, when the agent DaemonSet says
    /// ([`agent_cause`]).
    pub agent_cause: Option<String>,
    /// Reconciling stopped before every child of this generation was
    /// applied. The status then keeps what the nodes act on (`hosts`,
    /// `nodePort`) and `observedGeneration` from the last generation that
    /// was (issue 18: an edit that failed half-way still published its new
    /// hosts, so agents pointed nodes at a cache that did not serve them).
    pub not_applied: bool,
    /// The claims the cache StatefulSet makes, as it was read or applied
    /// ([`crate::storage::claim_status`]); `None` when it does not exist.
    pub claim_template: Option<crate::crd::StorageStatus>,
    /// Member claims still growing to a larger `storage.size`
    /// ([`crate::storage::resizing`]): said in `CacheAvailable`, blocks nothing.
    pub storage: Option<String>,
}

/// Why the installer's node agent DaemonSet `namespace`/`name` (`ds`, `None`
/// when it does not exist) has not reported on every node, from its status
/// and its `events` (core/v1, newest Warning first: the DaemonSet
/// controller's `FailedCreate` says e.g. that a PodSecurity level forbids
/// its hostPath volumes). `None` when every scheduled pod is ready: its
/// nodes have just not reported yet. Pure; quotes at most [`MAX_CAUSE`]
/// characters of an event.
pub fn agent_cause(
    ds: Option<&k8s_openapi::api::apps::v1::DaemonSet>,
    events: &[k8s_openapi::api::core::v1::Event],
    namespace: &str,
    name: &str,
) -> Option<String> {
    let Some(ds) = ds else {
        return Some(format!(
            "the node agent DaemonSet {namespace}/{name} does not exist: the Helm chart installs it (or the operator's --agent-daemonset names another)"
        ));
    };
    let st = ds.status.as_ref();
    let desired = st.map_or(0, |s| s.desired_number_scheduled);
    let ready = st.map_or(0, |s| s.number_ready);
    if desired > 0 && ready >= desired {
        return None;
    }
    let head =
        format!("the node agent DaemonSet {namespace}/{name} has {ready}/{desired} pods ready");
    Some(match latest_warning(events) {
        Some(w) => format!("{head}: {w}"),
        None => format!("{head}: kubectl -n {namespace} describe daemonset {name}"),
    })
}

/// The newest Warning among `events` (core/v1) as `Reason: message`, the
/// message cut at [`MAX_CAUSE`] characters; `None` without one.
fn latest_warning(events: &[k8s_openapi::api::core::v1::Event]) -> Option<String> {
    let when = |e: &k8s_openapi::api::core::v1::Event| {
        e.last_timestamp
            .as_ref()
            .map(|t| t.0)
            .or(e.event_time.as_ref().map(|t| t.0))
    };
    let e = events
        .iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .max_by_key(|e| when(e))?;
    Some(format!(
        "{}: {}",
        e.reason.as_deref().unwrap_or("Warning"),
        clip(e.message.as_deref().unwrap_or(""))
    ))
}

/// The claim that keeps `pod` from being scheduled: its first
/// PersistentVolumeClaim volume, when the scheduler says the pod has
/// unbound claims (its own message names none, the claim's events say why:
/// no volume and no class, a class that does not exist, a provisioner that
/// failed). Pure.
pub fn unbound_claim(pod: &k8s_openapi::api::core::v1::Pod) -> Option<String> {
    let unbound = pod.status.as_ref()?.conditions.as_deref()?.iter().any(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.message.as_deref().is_some_and(|m| m.contains("unbound"))
    });
    if !unbound {
        return None;
    }
    pod.spec
        .as_ref()?
        .volumes
        .iter()
        .flatten()
        .find_map(|v| Some(v.persistent_volume_claim.as_ref()?.claim_name.clone()))
}

/// `pod_cause` followed by why its claim `claim` is not bound, from the
/// claim's `events` (the PersistentVolume controller's or a provisioner's
/// newest Warning, e.g. `FailedBinding: no persistent volumes available for
/// this claim and no storage class is set`). Pure.
pub fn with_claim_cause(
    pod_cause: String,
    claim: &str,
    events: &[k8s_openapi::api::core::v1::Event],
) -> String {
    match latest_warning(events) {
        Some(w) => format!("{pod_cause}; claim {claim}: {w}"),
        None => pod_cause,
    }
}

/// `s` trimmed, cut after [`MAX_CAUSE`] characters with `...`.
fn clip(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(MAX_CAUSE) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// Longest cause quoted from a pod (scheduler messages list every node).
const MAX_CAUSE: usize = 300;

/// Why `pod` is not ready, as its status says, for the CacheAvailable
/// message: the scheduler's reason it cannot place it (a Pending claim, no
/// node with room), a container waiting (image pull, crash loop, config
/// error) or last terminated with an error; `None` for a ready pod or one
/// that says nothing. Pure; quotes at most [`MAX_CAUSE`] characters.
pub fn pod_cause(pod: &k8s_openapi::api::core::v1::Pod) -> Option<String> {
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    let status = pod.status.as_ref()?;
    let conditions = status.conditions.as_deref().unwrap_or_default();
    if conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
    {
        return None;
    }
    if let Some(c) = conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    {
        let why = c.message.as_deref().or(c.reason.as_deref()).unwrap_or("");
        return Some(format!("pod {name} cannot be scheduled: {}", clip(why)));
    }
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for c in containers {
        let state = c.state.as_ref();
        if let Some(w) = state.and_then(|s| s.waiting.as_ref())
            && let Some(reason) = w.reason.as_deref()
            && reason != "ContainerCreating"
            && reason != "PodInitializing"
        {
            let message = w.message.as_deref().map(clip).unwrap_or_default();
            let sep = if message.is_empty() { "" } else { ": " };
            return Some(format!(
                "pod {name}, container {}: {reason}{sep}{message}",
                c.name
            ));
        }
        if let Some(t) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref())
            && t.exit_code != 0
        {
            return Some(format!(
                "pod {name}, container {}: last exited with {} ({}){}",
                c.name,
                t.exit_code,
                t.reason.as_deref().unwrap_or("Error"),
                t.message
                    .as_deref()
                    .map(|m| format!(": {}", clip(m)))
                    .unwrap_or_default()
            ));
        }
    }
    None
}

fn cond(type_: &str, ok: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: None,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// `ip:port` as a URL authority: an IPv6 address in brackets.
pub fn address(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The host of an `address` (`10.0.0.5:5000` -> `10.0.0.5`,
/// `[fd00::5]:5000` -> `fd00::5`). Pure.
pub fn address_host(address: &str) -> &str {
    match address.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => address.rsplit_once(':').map_or(address, |(h, _)| h),
    }
}

/// Where nodes reach host-network cache members: `<hostIP>:<port>` of each
/// member pod on its node's network that is Ready and not being deleted (as the NodePort's
/// endpoints would be: a member that crash-loops, say because something
/// else holds its port on the node, must not be tried, or that something
/// answers the node's pulls), by member ordinal (the pod name's suffix),
/// each node once. The port is the pod's own `registry` container port, so
/// during a `cache.port` change each member is published where it listens.
/// Empty when no member is ready. Pure.
pub fn member_addresses(pods: &[k8s_openapi::api::core::v1::Pod]) -> Vec<String> {
    use k8s_openapi::api::core::v1::Pod;
    let ordinal = |p: &Pod| {
        p.metadata
            .name
            .as_deref()
            .and_then(|n| n.rsplit('-').next())
            .and_then(|o| o.parse::<u32>().ok())
            .unwrap_or(u32::MAX)
    };
    // On the node's network, ready and not going away: a pod of the pod
    // network (one not rolled yet after hostNetwork was turned on) does not
    // listen on its node's address.
    let ready = |p: &Pod| {
        p.spec.as_ref().and_then(|s| s.host_network) == Some(true)
            && p.metadata.deletion_timestamp.is_none()
            && p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let port = |p: &Pod| {
        p.spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|port| port.name.as_deref() == Some(crate::resources::REGISTRY_PORT))
            .map(|port| port.container_port)
    };
    let mut pods: Vec<&Pod> = pods.iter().filter(|p| ready(p)).collect();
    pods.sort_by_key(|p| ordinal(p));
    let mut out: Vec<String> = Vec::new();
    for p in pods {
        let (Some(ip), Some(port)) = (
            p.status
                .as_ref()
                .and_then(|s| s.host_ip.as_deref())
                .filter(|ip| !ip.is_empty()),
            port(p),
        ) else {
            continue;
        };
        let a = address(ip, port);
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// The status the operator writes, `nodes` included (aggregated from the
/// agents' reports in `observed.nodes`). Conditions keep their
/// `lastTransitionTime` unless their status flips.
pub fn compute(
    mirror: &RegistryMirror,
    previous: Option<&RegistryMirrorStatus>,
    observed: &Observed,
    now: Timestamp,
) -> RegistryMirrorStatus {
    let generation = mirror.metadata.generation;
    let conflicted: Vec<&str> = observed.conflicts.iter().map(|c| c.host.as_str()).collect();
    let hosts: Vec<String> = mirror
        .spec
        .upstreams
        .iter()
        .filter(|u| !conflicted.contains(&u.host.as_str()))
        .map(|u| u.host.clone())
        .collect();
    let summary = mirror
        .spec
        .upstreams
        .iter()
        .map(|u| {
            if conflicted.contains(&u.host.as_str()) {
                format!("{}(conflict)", u.host)
            } else {
                u.host.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",");

    let cache = match observed.cache_replicas {
        _ if observed.problem.is_some() && observed.cache_replicas.is_none() => {
            let p = observed.problem.as_ref().expect("checked");
            cond(CACHE_AVAILABLE, false, p.reason, p.message.clone())
        }
        Some((want, ready)) if ready > 0 => {
            // Why a member is missing, when its pod says (no free port on
            // any node for another host-network member, a crash loop).
            let mut message = format!("{ready}/{want} cache members ready");
            for extra in [
                observed.cache_cause.as_ref().filter(|_| ready < want),
                observed.storage.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                message = format!("{message}; {extra}");
            }
            cond(CACHE_AVAILABLE, true, reason::AVAILABLE, message)
        }
        Some((want, ready)) => cond(
            CACHE_AVAILABLE,
            false,
            reason::CACHE_UNAVAILABLE,
            format!(
                "{ready}/{want} cache members ready: {}see the cache StatefulSet's pods (kubectl -n {} get pods -l app.kubernetes.io/instance={})",
                observed
                    .cache_cause
                    .as_deref()
                    .map(|c| format!("{c}; "))
                    .unwrap_or_default(),
                if observed.namespace.is_empty() {
                    "<operator namespace>"
                } else {
                    observed.namespace.as_str()
                },
                crate::resources::instance_label(&mirror.metadata.name.clone().unwrap_or_default())
            ),
        ),
        None => cond(
            CACHE_AVAILABLE,
            false,
            reason::NOT_OBSERVED,
            "the cache StatefulSet has not been created yet".into(),
        ),
    };

    // Counted from the agents' reports of existing selected nodes only
    // (issue 17): nothing is configured until agents say so.
    let reported = observed.nodes.as_ref();
    let counts = reported.map(|s| (s.desired, s.configured));
    let (nodes_desired, nodes_configured, nodes) = match reported {
        _ if hosts.is_empty() => (
            counts.map(|c| c.0),
            Some(0),
            cond(
                NODES_CONFIGURED,
                false,
                reason::NO_HOSTS,
                "every upstream host is claimed by another mirror: no node configuration to write"
                    .into(),
            ),
        ),
        _ if observed.node_refusal.is_some() => {
            let p = observed.node_refusal.as_ref().expect("checked");
            (
                counts.map(|c| c.0),
                counts.map(|c| c.1),
                cond(NODES_CONFIGURED, false, p.reason, p.message.clone()),
            )
        }
        None => (
            None,
            None,
            cond(
                NODES_CONFIGURED,
                false,
                reason::NOT_OBSERVED,
                "the Nodes and the node agents' reports (RegistryMirrorNodes) have not been read yet"
                    .into(),
            ),
        ),
        Some(s) if s.desired == 0 => (
            Some(0),
            Some(0),
            cond(
                NODES_CONFIGURED,
                false,
                reason::NO_NODES,
                "no node matches spec.nodes.nodeSelector (and tolerations)".into(),
            ),
        ),
        Some(s) => {
            let ok = s.configured >= s.desired;
            let problems: Vec<String> = s
                .nodes
                .iter()
                .filter(|n| n.state != NodeState::Configured)
                .take(5)
                .map(|n| {
                    format!(
                        "{}: {:?}{}",
                        n.name,
                        n.state,
                        n.message
                            .as_deref()
                            .map(|m| format!(" ({m})"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            let mut message = format!("{}/{} nodes configured", s.configured, s.desired);
            if !problems.is_empty() {
                message = format!("{message}; {}", problems.join("; "));
            }
            if let Some(legacy) = &observed.legacy_agents {
                message = format!("{message}; {legacy}");
            }
            if let Some(cause) = observed
                .agent_cause
                .as_ref()
                .filter(|_| s.nodes.iter().any(|n| n.state == NodeState::Pending))
            {
                message = format!("{message}; {cause}");
            }
            let only_pending = s
                .nodes
                .iter()
                .all(|n| matches!(n.state, NodeState::Configured | NodeState::Pending));
            let r = if ok {
                reason::NODES_CONFIGURED
            } else if only_pending {
                reason::NODES_PENDING
            } else {
                reason::NODES_NOT_CONFIGURED
            };
            (
                Some(s.desired),
                Some(s.configured),
                cond(NODES_CONFIGURED, ok, r, message),
            )
        }
    };

    let ready = if observed.deleting {
        cond(
            READY,
            false,
            reason::DELETING,
            match &observed.cleanup {
                Some(waiting) => {
                    format!("removing node configuration before the mirror is deleted: {waiting}")
                }
                None => "removing node configuration before the mirror is deleted".into(),
            },
        )
    } else if let Some(p) = observed.problem.as_ref().or(observed.node_refusal.as_ref()) {
        cond(READY, false, p.reason, p.message.clone())
    } else if !observed.conflicts.is_empty() {
        let msg = observed
            .conflicts
            .iter()
            .map(|c| {
                format!(
                    "{} is already mirrored by RegistryMirror {:?}, created earlier",
                    c.host, c.owner
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        cond(
            READY,
            false,
            reason::HOST_CONFLICT,
            format!(
                "{msg}: nodes are not pointed at this mirror for it; remove the host from one of the mirrors"
            ),
        )
    } else if cache.status != "True" {
        cond(READY, false, &cache.reason, cache.message.clone())
    } else if let Some((want, ready)) = observed.cache_replicas.filter(|(w, r)| r < w) {
        // Ready only with every member: a missing one's keys are served by
        // the next in rank, but the cluster is not what the spec asks for.
        cond(
            READY,
            false,
            reason::MEMBERS_NOT_READY,
            match &observed.cache_cause {
                Some(cause) => format!("{ready}/{want} cache members ready; {cause}"),
                None => format!("{ready}/{want} cache members ready"),
            },
        )
    } else if nodes.status != "True" {
        cond(READY, false, &nodes.reason, nodes.message.clone())
    } else {
        cond(
            READY,
            true,
            reason::READY,
            format!("cache available; {}", nodes.message),
        )
    };

    let old = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let conditions = [ready, cache, nodes]
        .into_iter()
        .map(|c| transition(old, c, generation, now))
        .collect();

    // Host-network members are reached where they run; while none has a
    // node (one being replaced), the last addresses stay, so nodes keep
    // their files and fall back to the upstream rather than lose the mirror.
    let cache_addresses = if mirror.spec.cache.host_network {
        observed
            .cache_addresses
            .clone()
            .filter(|a| !a.is_empty())
            .or_else(|| previous.and_then(|p| p.cache_addresses.clone()))
    } else {
        None
    };
    // What nodes act on changes only with a fully applied generation.
    let (observed_generation, upstreams, hosts, node_port, cache_addresses) = match previous {
        // The NodePort is the Service's as it is: the step that writes it
        // for real comes before others that can still stop a generation (a
        // claim expansion), and nodes must reach the cache where it is.
        Some(p) if observed.not_applied => (
            p.observed_generation,
            p.upstreams.clone(),
            p.hosts.clone(),
            observed.node_port.or(p.node_port),
            p.cache_addresses.clone(),
        ),
        None if observed.not_applied => (None, Some(summary), None, observed.node_port, None),
        // Nodes are configured for no host of a mirror refused the nodes
        // (a foreign agent image, directories outside the installer's): the
        // agents write nothing for it and remove what they wrote.
        _ if observed.node_refusal.is_some() => (
            generation,
            Some(summary),
            Some(Vec::new()),
            observed.node_port,
            cache_addresses,
        ),
        _ => (
            generation,
            Some(summary),
            Some(hosts),
            observed.node_port,
            cache_addresses,
        ),
    };
    // What nodes use: the published addresses when there are, as the agents decide.
    let endpoint = match &cache_addresses {
        Some(a) if !a.is_empty() => Some(a.join(",")),
        _ => node_port.map(|p| format!("<node-ip>:{p}")),
    };
    RegistryMirrorStatus {
        // What runs, whatever was applied: what spec.storage may go back to.
        storage: observed
            .claim_template
            .clone()
            .or_else(|| previous.and_then(|p| p.storage.clone())),
        observed_generation,
        conditions,
        upstreams,
        hosts,
        endpoint,
        node_port,
        cache_addresses,
        nodes_desired,
        nodes_configured,
        cache: observed
            .cache_replicas
            .map(|(replicas, ready)| CacheStatus {
                replicas,
                ready_replicas: ready,
                members: format!("{ready}/{replicas}"),
            }),
        nodes: reported.map(|s| s.nodes.clone()).unwrap_or_default(),
    }
}

/// `new` with the `lastTransitionTime` of the same condition in `old` when its
/// status did not change, `now` otherwise.
pub fn transition(
    old: &[Condition],
    mut new: Condition,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    new.observed_generation = generation;
    new.last_transition_time = match old.iter().find(|c| c.type_ == new.type_) {
        Some(prev) if prev.status == new.status => prev.last_transition_time.clone(),
        _ => Time(now),
    };
    new
}

/// The condition of `type_` in `status`, if any.
pub fn condition<'a>(
    status: Option<&'a RegistryMirrorStatus>,
    type_: &str,
) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

/// An event to publish about the mirror's Ready condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyEvent {
    pub type_: EventType,
    /// The Ready condition's reason (one of [`reason`]).
    pub reason: String,
    /// The Ready condition's message.
    pub note: String,
}

/// The event for a status going from `previous` to `new`: one when the Ready
/// condition appears, flips or changes reason, none otherwise (so a resync
/// that changes nothing publishes nothing). Normal when Ready, and when not
/// Ready for a reason expected while things start (cache unavailable, agents
/// not ready, children not observed yet); Warning otherwise.
pub fn ready_event(
    previous: Option<&RegistryMirrorStatus>,
    new: &RegistryMirrorStatus,
) -> Option<ReadyEvent> {
    let ready = condition(Some(new), READY)?;
    let old = condition(previous, READY);
    if old.is_some_and(|o| o.status == ready.status && o.reason == ready.reason) {
        return None;
    }
    let expected = ready.status == "True"
        || matches!(
            ready.reason.as_str(),
            reason::CACHE_UNAVAILABLE
                | reason::MEMBERS_NOT_READY
                | reason::MIGRATING
                // An expected step of a larger storage.size.
                | reason::STORAGE_GROWING
                | reason::AGENTS_NOT_READY
                | reason::NODES_PENDING
                | reason::NOT_OBSERVED
                // Someone deleted it: the normal end of a mirror (issue 18).
                | reason::DELETING
        );
    Some(ReadyEvent {
        type_: if expected {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: ready.reason.clone(),
        note: ready.message.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_agent_pod_is_explained_by_the_daemon_sets_newest_warning() {
        use k8s_openapi::api::apps::v1::DaemonSet;
        use k8s_openapi::api::core::v1::Event;
        let ds = |desired: i32, ready: i32| -> DaemonSet {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "regmirror-agent"},
                "status": {"desiredNumberScheduled": desired, "numberReady": ready,
                           "currentNumberScheduled": desired, "numberMisscheduled": 0}
            }))
            .unwrap()
        };
        let event = |type_: &str, reason: &str, at: &str, message: &str| -> Event {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "e"}, "involvedObject": {},
                "type": type_, "reason": reason, "lastTimestamp": at, "message": message
            }))
            .unwrap()
        };
        let events = [
            event("Warning", "FailedCreate", "2026-01-01T00:00:01Z", "old"),
            event(
                "Warning",
                "FailedCreate",
                "2026-01-01T00:00:09Z",
                "Error creating: pods \"regmirror-agent-x\" is forbidden: violates PodSecurity \"baseline:latest\": hostPath volumes",
            ),
            event(
                "Normal",
                "SuccessfulCreate",
                "2026-01-01T00:00:10Z",
                "created",
            ),
        ];
        let cause = agent_cause(Some(&ds(3, 0)), &events, "ns", "regmirror-agent").unwrap();
        assert_eq!(
            cause,
            "the node agent DaemonSet ns/regmirror-agent has 0/3 pods ready: FailedCreate: Error creating: pods \"regmirror-agent-x\" is forbidden: violates PodSecurity \"baseline:latest\": hostPath volumes"
        );
        assert_eq!(
            agent_cause(Some(&ds(3, 3)), &events, "ns", "regmirror-agent"),
            None
        );
        assert!(
            agent_cause(None, &[], "ns", "regmirror-agent")
                .unwrap()
                .contains("does not exist")
        );
        assert!(
            agent_cause(Some(&ds(0, 0)), &[], "ns", "regmirror-agent")
                .unwrap()
                .contains("0/0 pods ready: kubectl -n ns describe daemonset regmirror-agent")
        );
    }
    use crate::crd::NodeResult;
    use serde_json::json;

    fn mirror(name: &str, created: i64, hosts: &[&str]) -> RegistryMirror {
        let ups: Vec<_> = hosts.iter().map(|h| json!({"host": h})).collect();
        let mut m = RegistryMirror::new(
            name,
            serde_json::from_value(json!({"upstreams": ups})).unwrap(),
        );
        m.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        m.metadata.generation = Some(3);
        m
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    /// What the reports say of `desired` selected nodes, `configured` of
    /// them Configured and the others without a report (listed first, as
    /// [`crate::node_status::summarize`] orders them).
    fn reported(desired: i32, configured: i32) -> Option<NodesSummary> {
        let node = |i: i32, state| NodeResult {
            name: format!("n{i}"),
            state,
            message: None,
            last_update: None,
        };
        let mut nodes: Vec<NodeResult> = (configured..desired)
            .map(|i| node(i, NodeState::Pending))
            .collect();
        nodes.extend((0..configured).map(|i| node(i, NodeState::Configured)));
        Some(NodesSummary {
            desired,
            configured,
            unreported: (configured..desired).map(|i| format!("n{i}")).collect(),
            nodes,
        })
    }

    fn member(
        name: &str,
        host_ip: Option<&str>,
        ready: bool,
        port: i32,
    ) -> k8s_openapi::api::core::v1::Pod {
        let mut status = json!({"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]});
        if let Some(ip) = host_ip {
            status["hostIP"] = json!(ip);
        }
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"hostNetwork": true, "containers": [{"name": "cache", "ports": [{"name": "registry", "containerPort": port}]}]},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn an_addresss_host_is_without_port_or_brackets() {
        assert_eq!(address_host("10.0.0.5:5000"), "10.0.0.5");
        assert_eq!(address_host("[fd00::5]:5000"), "fd00::5");
        assert_eq!(address_host(&address("fd00::5", 80)), "fd00::5");
    }

    #[test]
    fn host_network_members_are_the_ready_ones_by_ordinal_each_node_once() {
        let mut terminating = member("hub-cache-4", Some("10.0.0.4"), true, 5000);
        terminating.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(9).unwrap()));
        let pods = [
            member("hub-cache-10", Some("10.0.0.9"), true, 5000),
            member("hub-cache-2", Some("fd00::2"), true, 5000),
            member("hub-cache-0", Some("10.0.0.5"), true, 5000),
            member("hub-cache-1", None, true, 5000),
            member("hub-cache-3", Some("10.0.0.5"), true, 5000),
            // Crash-looping (say, its port is taken on the node): never tried.
            member("hub-cache-5", Some("10.0.0.6"), false, 5000),
            terminating,
        ];
        assert_eq!(
            member_addresses(&pods),
            ["10.0.0.5:5000", "[fd00::2]:5000", "10.0.0.9:5000"]
        );
        assert!(
            member_addresses(&[member("hub-cache-0", Some("10.0.0.5"), false, 5000)]).is_empty()
        );
        // A ready member still on the pod network (not rolled yet after
        // hostNetwork was turned on) listens on no node address.
        let mut pod_network = member("hub-cache-0", Some("10.0.0.5"), true, 5000);
        pod_network.spec.as_mut().unwrap().host_network = None;
        assert!(member_addresses(&[pod_network]).is_empty());
        // During a port change each member is where it listens.
        assert_eq!(
            member_addresses(&[
                member("hub-cache-0", Some("10.0.0.5"), true, 5001),
                member("hub-cache-1", Some("10.0.0.6"), true, 5000),
            ]),
            ["10.0.0.5:5001", "10.0.0.6:5000"]
        );
    }

    #[test]
    fn host_network_addresses_are_kept_while_no_member_has_a_node() {
        let mut m = mirror("a", 1, &["docker.io"]);
        m.spec.cache.host_network = true;
        let seen = |a: &[&str]| Observed {
            cache_replicas: Some((1, 1)),
            node_port: Some(31500),
            cache_addresses: Some(a.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        let first = compute(&m, None, &seen(&["10.0.0.5:5000"]), t(10));
        assert_eq!(
            first.cache_addresses.as_deref(),
            Some(&["10.0.0.5:5000".to_owned()][..])
        );
        assert_eq!(first.endpoint.as_deref(), Some("10.0.0.5:5000"));
        // The member is being replaced: no pod has a node yet.
        let gap = compute(&m, Some(&first), &seen(&[]), t(20));
        assert_eq!(gap.cache_addresses, first.cache_addresses);
        // It came back elsewhere.
        let moved = compute(&m, Some(&gap), &seen(&["10.0.0.7:5000"]), t(30));
        assert_eq!(
            moved.cache_addresses.as_deref(),
            Some(&["10.0.0.7:5000".to_owned()][..])
        );
        // A generation that was not applied publishes no new addresses; the
        // NodePort is the Service's as it is (written before a later step
        // stopped the generation).
        let refused = Observed {
            not_applied: true,
            node_port: Some(31600),
            ..seen(&["10.0.0.8:5000"])
        };
        let kept = compute(&m, Some(&moved), &refused, t(40));
        assert_eq!(kept.cache_addresses, moved.cache_addresses);
        assert_eq!(kept.node_port, Some(31600));
        assert_eq!(kept.observed_generation, moved.observed_generation);
        // Without hostNetwork there are none, and the NodePort is the endpoint.
        m.spec.cache.host_network = false;
        let off = compute(&m, Some(&moved), &seen(&["10.0.0.7:5000"]), t(50));
        assert_eq!(off.cache_addresses, None);
        assert_eq!(off.endpoint.as_deref(), Some("<node-ip>:31500"));
    }

    #[test]
    fn later_mirror_loses_shared_hosts() {
        let a = mirror("a", 100, &["docker.io", "ghcr.io"]);
        let b = mirror("b", 200, &["ghcr.io", "quay.io"]);
        let c = mirror("c", 100, &["docker.io"]); // same time as a: name decides
        let all = [&a, &b, &c];
        assert_eq!(conflicts(&a, &all), vec![]);
        assert_eq!(
            conflicts(&b, &all),
            vec![Conflict {
                host: "ghcr.io".into(),
                owner: "a".into()
            }]
        );
        assert_eq!(
            conflicts(&c, &all),
            vec![Conflict {
                host: "docker.io".into(),
                owner: "a".into()
            }]
        );
        assert!(share_a_host(&a, &b) && !share_a_host(&b, &c));
    }

    #[test]
    fn claims_still_growing_are_said_without_holding_ready_back() {
        let m = mirror("a", 1, &["docker.io"]);
        let obs = Observed {
            cache_replicas: Some((1, 1)),
            node_port: Some(31500),
            nodes: reported(1, 1),
            storage: Some("storage growing: data-regmirror-a-0 holds 1Gi of 2Gi".into()),
            ..Default::default()
        };
        let s = compute(&m, None, &obs, t(1000));
        let cache = condition(Some(&s), CACHE_AVAILABLE).unwrap();
        assert_eq!(
            cache.message,
            "1/1 cache members ready; storage growing: data-regmirror-a-0 holds 1Gi of 2Gi"
        );
        assert_eq!(condition(Some(&s), READY).unwrap().status, "True");
        assert_eq!(s.observed_generation, Some(3));
    }

    #[test]
    fn ready_needs_cache_and_nodes() {
        let m = mirror("a", 1, &["docker.io"]);
        let obs = Observed {
            cache_replicas: Some((1, 1)),
            node_port: Some(31500),
            nodes: reported(3, 3),
            ..Default::default()
        };
        let s = compute(&m, None, &obs, t(1000));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.endpoint.as_deref(), Some("<node-ip>:31500"));
        assert_eq!(s.nodes_configured, Some(3));
        assert_eq!(s.hosts, Some(vec!["docker.io".to_string()]));
        let ready = condition(Some(&s), READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Ready")
        );
        assert_eq!(ready.observed_generation, Some(3));

        let obs = Observed {
            cache_replicas: Some((1, 0)),
            nodes: reported(3, 1),
            namespace: "regmirror-system".into(),
            ..obs
        };
        let s = compute(&m, None, &obs, t(1000));
        let ready = condition(Some(&s), READY).unwrap();
        assert_eq!(ready.reason, reason::CACHE_UNAVAILABLE);
        // The command to look further names the children's namespace.
        let cache = condition(Some(&s), CACHE_AVAILABLE).unwrap();
        assert!(
            cache
                .message
                .contains("kubectl -n regmirror-system get pods"),
            "{}",
            cache.message
        );
        // And a pod's own reason comes first, when there is one.
        let with_cause = Observed {
            cache_cause: Some("pod regmirror-a-0 cannot be scheduled: unbound claims".into()),
            ..obs.clone()
        };
        let caused = compute(&m, None, &with_cause, t(1000));
        let cache = condition(Some(&caused), CACHE_AVAILABLE).unwrap();
        assert!(
            cache.message.starts_with(
                "0/1 cache members ready: pod regmirror-a-0 cannot be scheduled: unbound claims; see"
            ),
            "{}",
            cache.message
        );
        let nodes = condition(Some(&s), NODES_CONFIGURED).unwrap();
        assert_eq!(
            (nodes.reason.as_str(), nodes.message.as_str()),
            (
                reason::NODES_PENDING,
                "1/3 nodes configured; n1: Pending; n2: Pending"
            )
        );
    }

    #[test]
    fn a_pods_cause_is_what_its_status_says() {
        let pod = |status: serde_json::Value| -> k8s_openapi::api::core::v1::Pod {
            serde_json::from_value(json!({"metadata": {"name": "regmirror-a-0"}, "status": status}))
                .unwrap()
        };
        let unscheduled = pod(json!({"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims."}]}));
        assert_eq!(
            pod_cause(&unscheduled).unwrap(),
            "pod regmirror-a-0 cannot be scheduled: 0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims."
        );
        let pulling = pod(json!({"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "cache", "image": "x", "imageID": "", "ready": false,
              "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff",
              "message": "Back-off pulling image \"x\""}}}]}));
        assert_eq!(
            pod_cause(&pulling).unwrap(),
            "pod regmirror-a-0, container cache: ImagePullBackOff: Back-off pulling image \"x\""
        );
        let crashed = pod(
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "cache", "image": "x", "imageID": "", "ready": false,
              "restartCount": 3, "state": {"running": {}},
              "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}),
        );
        assert_eq!(
            pod_cause(&crashed).unwrap(),
            "pod regmirror-a-0, container cache: last exited with 1 (Error)"
        );
        let creating = pod(
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "cache", "image": "x", "imageID": "", "ready": false,
              "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
        );
        assert_eq!(pod_cause(&creating), None, "just starting: nothing to say");
        let ready = pod(json!({"conditions": [{"type": "Ready", "status": "True"}]}));
        assert_eq!(pod_cause(&ready), None);
        let long = pod(
            json!({"conditions": [{"type": "PodScheduled", "status": "False",
            "message": "x".repeat(1000)}]}),
        );
        assert!(pod_cause(&long).unwrap().ends_with("..."));
        assert!(pod_cause(&long).unwrap().len() < 400);
    }

    #[test]
    fn an_unbound_claim_is_explained_by_its_own_newest_warning() {
        let mut pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": "regmirror-a-0"},
            "spec": {"containers": [], "volumes": [
                {"name": "config", "configMap": {"name": "regmirror-a"}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "data-regmirror-a-0"}}]},
            "status": {"conditions": [{"type": "PodScheduled", "status": "False",
                "message": "0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims."}]},
        }))
        .unwrap();
        assert_eq!(unbound_claim(&pod).as_deref(), Some("data-regmirror-a-0"));
        let event = |type_: &str,
                     reason: &str,
                     message: &str,
                     at: i64|
         -> k8s_openapi::api::core::v1::Event {
            serde_json::from_value(json!({
                "metadata": {"name": format!("e{at}")},
                "involvedObject": {"kind": "PersistentVolumeClaim", "name": "data-regmirror-a-0"},
                "type": type_, "reason": reason, "message": message,
                "lastTimestamp": Timestamp::from_second(at).unwrap().to_string(),
            }))
            .unwrap()
        };
        let events = [
            event(
                "Warning",
                "ProvisioningFailed",
                "storageclass.storage.k8s.io \"gone\" not found",
                10,
            ),
            event(
                "Warning",
                "FailedBinding",
                "no persistent volumes available for this claim and no storage class is set",
                20,
            ),
            event("Normal", "WaitForFirstConsumer", "waiting", 30),
        ];
        let cause = pod_cause(&pod).unwrap();
        assert_eq!(
            with_claim_cause(cause.clone(), "data-regmirror-a-0", &events),
            format!(
                "{cause}; claim data-regmirror-a-0: FailedBinding: no persistent volumes available for this claim and no storage class is set"
            )
        );
        assert_eq!(
            with_claim_cause(cause.clone(), "data-regmirror-a-0", &[]),
            cause
        );
        // Unschedulable for another reason: no claim to look at.
        pod.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].message =
            Some("0/1 nodes are available: 1 Insufficient memory.".into());
        assert_eq!(unbound_claim(&pod), None);
    }

    #[test]
    fn ready_needs_every_cache_member_and_the_status_counts_them() {
        let m = mirror("a", 1, &["docker.io"]);
        let obs = Observed {
            cache_replicas: Some((3, 2)),
            node_port: Some(31500),
            nodes: reported(3, 3),
            ..Default::default()
        };
        let s = compute(&m, None, &obs, t(1000));
        let cache = s.cache.clone().unwrap();
        assert_eq!((cache.replicas, cache.ready_replicas), (3, 2));
        assert_eq!(cache.members, "2/3");
        // Two members serve every key: available, yet not Ready.
        let available = condition(Some(&s), CACHE_AVAILABLE).unwrap();
        assert_eq!(available.status, "True");
        assert_eq!(available.message, "2/3 cache members ready");
        let ready = condition(Some(&s), READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", reason::MEMBERS_NOT_READY)
        );
        // A missing member's own cause is said too, not only when none is ready.
        let why = "pod a-2 cannot be scheduled: 0/2 nodes are available: 2 node(s) didn't have free ports for the requested pod ports.";
        let caused = compute(
            &m,
            None,
            &Observed {
                cache_cause: Some(why.into()),
                ..obs.clone()
            },
            t(1000),
        );
        for c in [CACHE_AVAILABLE, READY] {
            let c = condition(Some(&caused), c).unwrap();
            assert_eq!(c.message, format!("2/3 cache members ready; {why}"));
        }
        let e = ready_event(None, &s).unwrap();
        assert_eq!(e.type_, EventType::Normal, "expected while scaling");

        let all = Observed {
            cache_replicas: Some((3, 3)),
            ..obs
        };
        let s = compute(&m, None, &all, t(1000));
        assert_eq!(condition(Some(&s), READY).unwrap().status, "True");
        assert_eq!(s.cache.unwrap().members, "3/3");
    }

    #[test]
    fn conflicts_and_problems_explain_not_ready() {
        let m = mirror("b", 2, &["docker.io", "quay.io"]);
        let obs = Observed {
            cache_replicas: Some((1, 1)),
            nodes: reported(1, 1),
            conflicts: vec![Conflict {
                host: "docker.io".into(),
                owner: "a".into(),
            }],
            ..Default::default()
        };
        let s = compute(&m, None, &obs, t(5));
        let ready = condition(Some(&s), READY).unwrap();
        assert_eq!(ready.reason, reason::HOST_CONFLICT);
        assert!(
            ready
                .message
                .contains(r#"docker.io is already mirrored by RegistryMirror "a""#)
        );
        assert_eq!(s.hosts, Some(vec!["quay.io".to_string()]));
        assert_eq!(s.upstreams.as_deref(), Some("docker.io(conflict),quay.io"));

        let obs = Observed {
            problem: Some(Problem {
                reason: reason::CREDENTIALS_UNAVAILABLE,
                message: "credentialsSecret x missing".into(),
            }),
            ..Default::default()
        };
        let s = compute(&m, None, &obs, t(5));
        for ty in [READY, CACHE_AVAILABLE] {
            let c = condition(Some(&s), ty).unwrap();
            assert_eq!(c.reason, reason::CREDENTIALS_UNAVAILABLE, "{ty}");
        }
    }

    #[test]
    fn the_reports_count_and_list_the_nodes_and_nothing_counts_before_them() {
        let m = mirror("a", 1, &["docker.io"]);
        let reports = NodesSummary {
            desired: 2,
            configured: 1,
            nodes: vec![
                NodeResult {
                    name: "n2".into(),
                    state: NodeState::NotEffective,
                    message: Some("config_path is not set".into()),
                    last_update: None,
                },
                NodeResult {
                    name: "n1".into(),
                    state: NodeState::Configured,
                    message: None,
                    last_update: None,
                },
            ],
            unreported: vec![],
        };
        // Entries of an older agent (with a heartbeat) are replaced.
        let prev = RegistryMirrorStatus {
            nodes: vec![NodeResult {
                name: "gone".into(),
                state: NodeState::Configured,
                message: None,
                last_update: Some("2026-01-01T00:00:00Z".into()),
            }],
            ..Default::default()
        };
        let obs = Observed {
            cache_replicas: Some((1, 1)),
            nodes: Some(reports.clone()),
            ..Default::default()
        };
        let s = compute(&m, Some(&prev), &obs, t(1));
        let nodes = condition(Some(&s), NODES_CONFIGURED).unwrap();
        assert_eq!(
            (nodes.status.as_str(), nodes.reason.as_str()),
            ("False", reason::NODES_NOT_CONFIGURED)
        );
        assert_eq!(
            nodes.message,
            "1/2 nodes configured; n2: NotEffective (config_path is not set)"
        );
        assert_eq!((s.nodes_desired, s.nodes_configured), (Some(2), Some(1)));
        assert_eq!(
            s.nodes, reports.nodes,
            "the operator writes the aggregated list"
        );
        let e = ready_event(None, &s).unwrap();
        assert_eq!(e.type_, EventType::Warning, "a node reports a problem");

        // No report yet: not Ready, whatever runs (issue 17), and expected.
        let s = compute(
            &m,
            None,
            &Observed {
                nodes: reported(3, 0),
                ..obs.clone()
            },
            t(1),
        );
        let ready = condition(Some(&s), READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", reason::NODES_PENDING)
        );
        assert_eq!(s.nodes_configured, Some(0));
        assert_eq!(ready_event(None, &s).unwrap().type_, EventType::Normal);
        // Nodes and reports not read yet: nothing is claimed either.
        let s = compute(
            &m,
            None,
            &Observed {
                nodes: None,
                ..obs.clone()
            },
            t(1),
        );
        let nodes = condition(Some(&s), NODES_CONFIGURED).unwrap();
        assert_eq!(nodes.reason, reason::NOT_OBSERVED);
        assert_eq!(s.nodes_configured, None);
        // The shared agent has not taken over yet: said where it is waited for.
        let s = compute(
            &m,
            None,
            &Observed {
                nodes: reported(2, 1),
                legacy_agents: Some("the shared node agent has not taken over n1 yet".into()),
                ..obs
            },
            t(1),
        );
        assert!(
            condition(Some(&s), NODES_CONFIGURED)
                .unwrap()
                .message
                .ends_with("; the shared node agent has not taken over n1 yet")
        );
    }

    #[test]
    fn a_refused_mirror_is_not_ready_and_says_why() {
        let m = mirror("a", 1, &["docker.io"]);
        let refusal = Problem {
            reason: reason::CONFIG_DIR_NOT_ALLOWED,
            message: "spec.nodes.containerdConfigDir \"/\" is not inside ...".into(),
        };
        let obs = Observed {
            cache_replicas: Some((1, 1)),
            nodes: reported(1, 0),
            node_refusal: Some(refusal.clone()),
            ..Default::default()
        };
        let s = compute(&m, None, &obs, t(1));
        for ty in [READY, NODES_CONFIGURED] {
            let c = condition(Some(&s), ty).unwrap();
            assert_eq!(
                (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
                ("False", refusal.reason, refusal.message.as_str()),
                "{ty}"
            );
        }
        assert_eq!(condition(Some(&s), CACHE_AVAILABLE).unwrap().status, "True");
        assert_eq!(ready_event(None, &s).unwrap().type_, EventType::Warning);
        // No host is published for nodes: agents write nothing for it.
        assert_eq!(s.hosts, Some(vec![]));
    }

    #[test]
    fn deleting_says_what_it_waits_for() {
        let m = mirror("a", 1, &["docker.io"]);
        let obs = Observed {
            deleting: true,
            cleanup: Some("waiting for node agents to remove their configuration from n2".into()),
            ..Default::default()
        };
        let s = compute(&m, None, &obs, t(1));
        assert_eq!(
            condition(Some(&s), READY).unwrap().message,
            "removing node configuration before the mirror is deleted: waiting for node agents to remove their configuration from n2"
        );
    }

    #[test]
    fn transition_time_moves_only_on_flips() {
        let m = mirror("a", 1, &["docker.io"]);
        let up = Observed {
            cache_replicas: Some((1, 1)),
            nodes: reported(1, 1),
            ..Default::default()
        };
        let s1 = compute(&m, None, &up, t(100));
        let s2 = compute(&m, Some(&s1), &up, t(200));
        assert_eq!(
            condition(Some(&s2), READY).unwrap().last_transition_time,
            Time(t(100))
        );
        let down = Observed {
            cache_replicas: Some((1, 0)),
            ..up.clone()
        };
        let s3 = compute(&m, Some(&s2), &down, t(300));
        assert_eq!(
            condition(Some(&s3), READY).unwrap().last_transition_time,
            Time(t(300))
        );
        assert_eq!(
            condition(Some(&s3), NODES_CONFIGURED)
                .unwrap()
                .last_transition_time,
            Time(t(100)),
            "NodesConfigured did not flip"
        );
    }

    #[test]
    fn ready_events_only_on_transitions_and_warn_on_real_problems() {
        let m = mirror("a", 1, &["docker.io"]);
        let up = Observed {
            cache_replicas: Some((1, 1)),
            nodes: reported(1, 1),
            ..Default::default()
        };
        let ready = compute(&m, None, &up, t(1));
        let e = ready_event(None, &ready).expect("first Ready");
        assert_eq!(
            (e.type_, e.reason.as_str(), e.note.as_str()),
            (
                EventType::Normal,
                reason::READY,
                "cache available; 1/1 nodes configured"
            )
        );
        // Nothing changed: no event on every pass.
        let again = compute(&m, Some(&ready), &up, t(2));
        assert_eq!(ready_event(Some(&ready), &again), None);

        // Expected while things start: Normal.
        let starting = compute(
            &m,
            Some(&ready),
            &Observed {
                cache_replicas: Some((1, 0)),
                ..up.clone()
            },
            t(3),
        );
        let e = ready_event(Some(&ready), &starting).unwrap();
        assert_eq!(
            (e.type_, e.reason.as_str()),
            (EventType::Normal, reason::CACHE_UNAVAILABLE)
        );

        // Not Ready before and after, but for another reason: a Warning.
        let failed = compute(
            &m,
            Some(&starting),
            &Observed {
                problem: Some(Problem {
                    reason: reason::APPLY_FAILED,
                    message: "forbidden".into(),
                }),
                ..up.clone()
            },
            t(4),
        );
        let e = ready_event(Some(&starting), &failed).unwrap();
        assert_eq!(
            (e.type_, e.reason.as_str(), e.note.as_str()),
            (EventType::Warning, reason::APPLY_FAILED, "forbidden")
        );
        let deleting = compute(
            &m,
            Some(&failed),
            &Observed {
                deleting: true,
                ..Default::default()
            },
            t(5),
        );
        let e = ready_event(Some(&failed), &deleting).unwrap();
        assert_eq!(
            (e.type_, e.reason.as_str()),
            (EventType::Normal, reason::DELETING)
        );

        // A status without a Ready condition says nothing.
        assert_eq!(
            ready_event(Some(&ready), &RegistryMirrorStatus::default()),
            None
        );
    }
}
