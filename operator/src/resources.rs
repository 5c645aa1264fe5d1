//! Pure builders: a `RegistryMirror` (plus operator settings and resolved
//! credentials) in, the Kubernetes objects that run its cache out. The node
//! agents are not a mirror's: one DaemonSet for all mirrors is installed with
//! the operator (the Helm chart, issue 17).
//!
//! All children live in the operator's namespace and carry a controller owner
//! reference to the (cluster-scoped) mirror, so the garbage collector removes
//! them with it, and the `app.kubernetes.io/*` labels plus
//! [`MIRROR_LABEL`], by which the controller finds and prunes them.

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use regmirror_registry::cache_file::{
    DurationText, FileCluster, FileConfig, FileDiscovery, FileUpstream,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::crd::RegistryMirror;
use crate::credentials::DOCKERCONFIGJSON;

pub const MANAGER: &str = "regmirror-operator";
pub const PART_OF: &str = "regmirror";
/// Label holding [`instance_label`] of the owning mirror, on every child.
pub const MIRROR_LABEL: &str = "regmirror.dev/mirror";
/// Pod-template annotation: a hash of the cache configuration, so a change rolls the pod.
pub const CONFIG_HASH_ANNOTATION: &str = "regmirror.dev/config-hash";

pub const COMPONENT_CACHE: &str = "cache";

/// Where things are inside the cache container.
pub const CONFIG_DIR: &str = "/etc/regmirror";
pub const CONFIG_KEY: &str = "config.toml";
pub const DATA_DIR: &str = "/var/lib/regmirror";
pub const CREDENTIALS_DIR: &str = "/var/run/regmirror/credentials";
pub const CREDENTIALS_FILE: &str = "config.json";
/// The cache port's name, on the container and both Services; members
/// discover each other's port by it.
pub const REGISTRY_PORT: &str = "registry";
/// The StatefulSet's volumeClaimTemplate: member `i`'s claim is
/// `data-<statefulset>-<i>` ([`member_claim_name`]).
pub const DATA_CLAIM_TEMPLATE: &str = "data";
/// Seconds between a cache member's SIGTERM and the kubelet's SIGKILL: the
/// cache's drain (`regmirror_cache::cluster::router::DRAIN`, 5 s) plus its
/// shutdown grace for open transfers (`listen::SHUTDOWN_GRACE`, 25 s), and
/// 10 s to spare.
pub const CACHE_TERMINATION_GRACE_SECONDS: i64 = 40;

/// Unprivileged user of the cache container (fsGroup makes the volume writable).
const CACHE_UID: i64 = 65532;

/// Longest child name: a DNS-1035 label (Services) with room for the
/// suffixes controllers append to pod names.
const MAX_NAME: usize = 52;
/// Longest label value.
const MAX_LABEL: usize = 63;

/// Operator-wide settings the builders need.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Namespace the children are created in.
    pub namespace: String,
    pub cache_image: String,
    /// The node agent image the installer runs (the chart's `agent.image`): a
    /// mirror naming another in `spec.nodes.agentImage` is refused.
    pub agent_image: String,
    /// Node directories the installer lets the node agents use (the chart's
    /// `agent.hostDirs`, which its agent DaemonSet mounts): a mirror's
    /// containerd paths must be inside them ([`crate::selection::within_allowed`]).
    pub agent_host_dirs: Vec<String>,
    /// The installer's node agent DaemonSet in `namespace` (the chart's
    /// `<release>-agent`): read to say why nodes have not reported.
    pub agent_daemon_set: String,
    /// Where pods reach the API server, when not at the `kubernetes`
    /// Service's cluster IP (the chart's `apiServer.host`/`port`, e.g. a
    /// cluster without kube-proxy): set on the cache pods as
    /// `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT`, which in-cluster
    /// clients (the cache's discovery) read instead of what the kubelet
    /// injects. `None`: the kubelet's.
    pub kubernetes_service: Option<HostPort>,
}

/// A `host:port` pair: `api.example:6443`, `10.0.0.1:443`, `[fd00::1]:6443`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or address, IPv6 without brackets (as `KUBERNETES_SERVICE_HOST` has it).
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for HostPort {
    type Err = String;

    /// Parses `host:port` or `[ipv6]:port`; errors name what is wrong.
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected host:port"))?;
        let host = match host.strip_prefix('[') {
            Some(h) => {
                let h = h
                    .strip_suffix(']')
                    .ok_or_else(|| format!("{s:?}: unclosed '['"))?;
                // Brackets are for an IPv6 address, nothing else.
                h.parse::<Ipv6Addr>()
                    .map_err(|_| format!("{s:?}: only an IPv6 address goes in brackets"))?;
                h
            }
            None if host.contains(':') => {
                return Err(format!(
                    "{s:?}: an IPv6 address needs brackets, [addr]:port"
                ));
            }
            None => host,
        };
        // A DNS name or an address: what KUBERNETES_SERVICE_HOST can hold.
        let name_like = |h: &str| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':')
        };
        if !name_like(host) {
            return Err(format!("{s:?}: expected host:port"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: the port must be 1-65535"))?;
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

/// Everything one mirror needs, ready to apply: one object per
/// [`ChildKind`](crate::children::ChildKind), which also maps the kinds to
/// these fields.
#[derive(Debug, Clone)]
pub struct Children {
    pub config_map: ConfigMap,
    /// Merged upstream credentials, when any upstream has a `credentialsSecret`.
    pub credentials: Option<Secret>,
    /// The cache members' identity, allowed to watch EndpointSlices (discovery).
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    /// The headless Service whose EndpointSlices list the ready members.
    pub members_service: Service,
    /// The cache members, one claim each.
    pub stateful_set: StatefulSet,
    /// The NodePort Service: the entry point nodes pull through.
    pub service: Service,
    /// Hash of the cache configuration, also on the pod template.
    pub config_hash: String,
}

fn short_hash(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))[..8].to_owned()
}

/// Name of a child of `mirror`: `regmirror-<mirror><suffix>`, a valid DNS-1035
/// label of at most 52 characters. Mirror names may be DNS subdomains (dots,
/// up to 253 characters): dots become dashes, and a name that had to be changed
/// or shortened gets a hash of the original, so two mirrors never share a name.
pub fn child_name(mirror: &str, suffix: &str) -> String {
    let base = mirror.replace('.', "-");
    let full = format!("regmirror-{base}{suffix}");
    if base == mirror && full.len() <= MAX_NAME {
        return full;
    }
    let keep = MAX_NAME - "regmirror-".len() - 9 - suffix.len();
    let prefix = base[..base.len().min(keep)].trim_end_matches('-');
    format!("regmirror-{prefix}-{}{suffix}", short_hash(mirror))
}

/// Value of `app.kubernetes.io/instance` and [`MIRROR_LABEL`]: the mirror's
/// name, shortened with a hash when longer than a label value may be.
pub fn instance_label(mirror: &str) -> String {
    if mirror.len() <= MAX_LABEL {
        return mirror.to_owned();
    }
    let prefix = mirror[..MAX_LABEL - 9].trim_end_matches(['-', '.']);
    format!("{prefix}-{}", short_hash(mirror))
}

pub fn config_map_name(mirror: &str) -> String {
    child_name(mirror, "")
}
pub fn credentials_name(mirror: &str) -> String {
    child_name(mirror, "-credentials")
}
/// The single claim of the layout before StatefulSets (one Deployment):
/// only migration ([`crate::migration`]) still looks for it.
pub fn pvc_name(mirror: &str) -> String {
    child_name(mirror, "")
}
/// The Deployment of the layout before StatefulSets; see [`pvc_name`].
pub fn deployment_name(mirror: &str) -> String {
    child_name(mirror, "")
}
/// The cache StatefulSet; its pods are `<name>-0`, `<name>-1`, ...
pub fn stateful_set_name(mirror: &str) -> String {
    child_name(mirror, "")
}
/// The headless Service the members discover each other through.
pub fn members_service_name(mirror: &str) -> String {
    child_name(mirror, "-members")
}
/// The cache's ServiceAccount, Role and RoleBinding.
pub fn cache_account_name(mirror: &str) -> String {
    child_name(mirror, "-cache")
}
/// The claim of cache member `ordinal`, as the StatefulSet controller names
/// it: `<template>-<statefulset>-<ordinal>`.
pub fn member_claim_name(mirror: &str, ordinal: u32) -> String {
    format!(
        "{DATA_CLAIM_TEMPLATE}-{}-{ordinal}",
        stateful_set_name(mirror)
    )
}
pub fn service_name(mirror: &str) -> String {
    child_name(mirror, "")
}
/// The per-mirror node agent DaemonSet of earlier versions, which
/// [`crate::agent_migration`] removes once the shared agent took over.
pub fn daemon_set_name(mirror: &str) -> String {
    child_name(mirror, "-agent")
}

/// Labels every child of `mirror` carries.
pub fn labels(mirror: &str, component: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(mirror, component);
    l.insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
    l.insert("app.kubernetes.io/part-of".into(), PART_OF.into());
    l.insert(MIRROR_LABEL.into(), instance_label(mirror));
    l
}

/// The immutable subset used as Deployment/DaemonSet/Service selectors.
pub fn selector_labels(mirror: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "regmirror".into()),
        ("app.kubernetes.io/instance".into(), instance_label(mirror)),
        ("app.kubernetes.io/component".into(), component.into()),
    ])
}

/// [`selector_labels`] as a label selector (`k=v,k=v`), for listing the
/// pods of `mirror`'s `component`.
pub fn pods_selector(mirror: &str, component: &str) -> String {
    selector_labels(mirror, component)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Label selector matching every child of `mirror` (for listing and pruning).
pub fn children_selector(mirror: &str) -> String {
    format!(
        "app.kubernetes.io/managed-by={MANAGER},{MIRROR_LABEL}={}",
        instance_label(mirror)
    )
}

fn owner_ref(mirror: &RegistryMirror) -> OwnerReference {
    mirror
        .controller_owner_ref(&())
        .expect("a mirror read from the API server has a name and uid")
}

fn metadata(mirror: &RegistryMirror, settings: &Settings, name: String, component: &str) -> Value {
    json!({
        "name": name,
        "namespace": settings.namespace,
        "labels": labels(&mirror.name(), component),
        "ownerReferences": [owner_ref(mirror)],
    })
}

trait MirrorName {
    fn name(&self) -> String;
}
impl MirrorName for RegistryMirror {
    fn name(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("builder produces a valid object")
}

/// Renders the cache configuration for `mirror`: the cache's own file type
/// ([`FileConfig`]) as TOML, under a comment saying who wrote it. It always
/// has `[cluster.discovery]` (the members Service, port [`REGISTRY_PORT`]),
/// for one member too, and nothing that depends on `cache.replicas`, so
/// scaling never changes the pod template and restarts no member. The member
/// name comes from `REGMIRROR_NAME` (the pod's name); `namespace` is the
/// children's (said outright, so the file means the same outside a pod). Every
/// upstream of the spec is served (a host another mirror claimed only loses
/// its node configuration, so nothing restarts when the conflict is resolved).
/// Durations are passed through as the spec writes them (the CRD checks their
/// syntax, the cache parses them).
pub fn cache_config(mirror: &RegistryMirror, namespace: &str, with_credentials: bool) -> String {
    cache_config_within(mirror, namespace, with_credentials, None)
}

/// [`cache_config`] for members whose claims are known to hold only
/// `settled` bytes each (`None`: unknown, taken to be `storage.size`):
/// the member cap is then 90% of the smaller of the two, so while claims
/// grow ([`crate::storage::settled_bytes`]) no member fills a volume that
/// has not grown yet.
pub fn cache_config_within(
    mirror: &RegistryMirror,
    namespace: &str,
    with_credentials: bool,
    settled: Option<u64>,
) -> String {
    let spec = &mirror.spec;
    let duration = |d: &Option<String>| d.as_deref().map(DurationText::new);
    let file = FileConfig {
        // The CRD bounds the port to 1..=65535. `[::]` is dual-stack (the
        // cache clears IPV6_V6ONLY and falls back to 0.0.0.0 on a host
        // without IPv6): nodes reach the NodePort over IPv4 or IPv6.
        listen: u16::try_from(spec.cache.port)
            .ok()
            .map(|port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))),
        storage: Some(DATA_DIR.into()),
        credentials: with_credentials
            .then(|| format!("{CREDENTIALS_DIR}/{CREDENTIALS_FILE}").into()),
        tag_ttl: duration(&spec.cache.tag_ttl),
        max_size: spec
            .cache
            .max_size
            .as_deref()
            .and_then(crate::quantity::bytes),
        max_age: duration(&spec.cache.max_age),
        cluster: FileCluster {
            member_max_size: member_cap(spec, settled),
            discovery: Some(FileDiscovery {
                service: members_service_name(&mirror.name()),
                namespace: Some(namespace.into()),
                port_name: Some(REGISTRY_PORT.into()),
            }),
            ..FileCluster::default()
        },
        upstreams: spec
            .upstreams
            .iter()
            .map(|u| FileUpstream {
                host: u.host.clone(),
                url: Some(u.effective_url()),
                tag_ttl: duration(&u.tag_ttl),
                allowed_hosts: Vec::new(),
            })
            .collect(),
        ..FileConfig::default()
    };
    let body = toml::to_string(&file).expect("cache config serializes");
    format!(
        "# Generated by regmirror-operator from RegistryMirror {:?}: edits are overwritten.\n{body}",
        mirror.name()
    )
}

/// Each cache member's cap on its own volume: 90% of `storage.size`, so it
/// evicts before the volume fills. `cache.maxSize` (rendered as `max_size`)
/// is the budget of all members together, of which each keeps its share
/// (budget / members it sees) within this cap; without it each member fills
/// its own volume. Neither depends on `replicas`, so scaling changes no
/// configuration. `settled`: what the claims are known to hold, when less
/// ([`cache_config_within`]).
fn member_cap(spec: &crate::crd::RegistryMirrorSpec, settled: Option<u64>) -> Option<u64> {
    let size = crate::quantity::bytes(&spec.storage.size)?;
    Some(settled.map_or(size, |s| s.min(size)) / 10 * 9)
}

/// Builds every child of `mirror`. `credentials` is the merged docker
/// `config.json` (see [`crate::credentials`]), when any upstream has credentials.
pub fn build(mirror: &RegistryMirror, settings: &Settings, credentials: Option<&[u8]>) -> Children {
    build_within(mirror, settings, credentials, None)
}

/// [`build`] for members whose claims hold `settled` bytes each, when
/// known: see [`cache_config_within`].
pub fn build_within(
    mirror: &RegistryMirror,
    settings: &Settings,
    credentials: Option<&[u8]>,
    settled: Option<u64>,
) -> Children {
    let name = mirror.name();
    let config = cache_config_within(mirror, &settings.namespace, credentials.is_some(), settled);
    let mut hasher = Sha256::new();
    hasher.update(config.as_bytes());
    // A new credentials Secret changes the volumes anyway; its content is
    // re-read by the cache on use and needs no restart.
    let config_hash = hex::encode(hasher.finalize())[..16].to_owned();

    let config_map = typed(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(mirror, settings, config_map_name(&name), COMPONENT_CACHE),
        "data": { CONFIG_KEY: config },
    }));

    let credentials_secret = credentials.map(|bytes| {
        typed(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata(mirror, settings, credentials_name(&name), COMPONENT_CACHE),
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": { DOCKERCONFIGJSON: String::from_utf8_lossy(bytes) },
        }))
    });

    let account = cache_account_name(&name);
    let service_account = typed(json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(mirror, settings, account.clone(), COMPONENT_CACHE),
    }));
    // Discovery reads the members' EndpointSlices, in this namespace only:
    // nothing else, no write.
    let role = typed(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(mirror, settings, account.clone(), COMPONENT_CACHE),
        "rules": [{
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }],
    }));
    let role_binding = typed(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(mirror, settings, account.clone(), COMPONENT_CACHE),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": settings.namespace}],
    }));
    let stateful_set = typed(stateful_set_json(
        mirror,
        settings,
        &config_hash,
        credentials.is_some(),
    ));
    let members_service = typed(members_service_json(mirror, settings));
    let service = typed(service_json(mirror, settings));

    Children {
        config_map,
        credentials: credentials_secret,
        service_account,
        role,
        role_binding,
        members_service,
        stateful_set,
        service,
        config_hash,
    }
}

/// The claim every member gets: the mirror's `storage`, with the cache's labels.
pub fn claim_spec(mirror: &RegistryMirror) -> Value {
    let storage = &mirror.spec.storage;
    let mut spec = json!({
        "accessModes": [storage.access_mode.as_str()],
        "resources": { "requests": { "storage": storage.size } },
    });
    if let Some(class) = &storage.storage_class_name {
        spec["storageClassName"] = json!(class);
    }
    spec
}

/// The cache members: a StatefulSet, so each member has a stable name (its
/// pod's, `REGMIRROR_NAME`, which ownership hashes) and its own claim. Pods
/// start and stop in parallel (members do not depend on each other's order)
/// and roll one at a time. Claims stay when the cluster scales down (a member
/// that comes back finds its content) and go with the StatefulSet.
fn stateful_set_json(
    mirror: &RegistryMirror,
    settings: &Settings,
    config_hash: &str,
    with_credentials: bool,
) -> Value {
    let name = mirror.name();
    let cache = &mirror.spec.cache;
    let resources = match &cache.resources {
        Some(r) => serde_json::to_value(r).expect("resources serialize"),
        None => json!({
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "1Gi"},
        }),
    };
    let mut container = json!({
        "name": "cache",
        "image": cache.image.clone().unwrap_or_else(|| settings.cache_image.clone()),
        "args": ["--config", format!("{CONFIG_DIR}/{CONFIG_KEY}")],
        "env": [
            {"name": "REGMIRROR_LOG", "value": cache.log_level.as_str()},
            {"name": "REGMIRROR_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
        ],
        "ports": [{"name": REGISTRY_PORT, "containerPort": cache.port, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "registry"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "registry"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "resources": resources,
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": true},
            {"name": DATA_CLAIM_TEMPLATE, "mountPath": DATA_DIR},
        ],
    });
    if let Some(p) = &cache.image_pull_policy {
        container["imagePullPolicy"] = json!(p);
    }
    if let Some(api) = &settings.kubernetes_service {
        let env = container["env"].as_array_mut().expect("array");
        env.push(json!({"name": "KUBERNETES_SERVICE_HOST", "value": api.host}));
        env.push(json!({"name": "KUBERNETES_SERVICE_PORT", "value": api.port.to_string()}));
    }
    let mut volumes =
        vec![json!({"name": "config", "configMap": {"name": config_map_name(&name)}})];
    if with_credentials {
        container["volumeMounts"]
            .as_array_mut()
            .expect("array")
            .push(json!({"name": "credentials", "mountPath": CREDENTIALS_DIR, "readOnly": true}));
        volumes.push(json!({"name": "credentials", "secret": {
            "secretName": credentials_name(&name),
            "items": [{"key": DOCKERCONFIGJSON, "path": CREDENTIALS_FILE}],
        }}));
    }
    let mut pod_spec = json!({
        "serviceAccountName": cache_account_name(&name),
        // Discovery authenticates with it.
        "automountServiceAccountToken": true,
        // The cache's own shutdown takes up to its 5 s drain
        // plus 25 s for open transfers; the kubelet's SIGKILL
        // comes after this, not in the middle of that.
        "terminationGracePeriodSeconds": CACHE_TERMINATION_GRACE_SECONDS,
        "enableServiceLinks": false,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": CACHE_UID,
            "runAsGroup": CACHE_UID,
            "fsGroup": CACHE_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    });
    if cache.host_network {
        // The container port becomes a host port, so the scheduler places
        // at most one member per node; cluster names still resolve.
        pod_spec["hostNetwork"] = json!(true);
        pod_spec["dnsPolicy"] = json!("ClusterFirstWithHostNet");
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(mirror, settings, stateful_set_name(&name), COMPONENT_CACHE),
        "spec": {
            "replicas": cache.replicas,
            "revisionHistoryLimit": 3,
            "serviceName": members_service_name(&name),
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Retain"},
            "selector": {"matchLabels": selector_labels(&name, COMPONENT_CACHE)},
            "template": {
                "metadata": {
                    "labels": labels(&name, COMPONENT_CACHE),
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash},
                },
                "spec": pod_spec,
            },
            "volumeClaimTemplates": [{
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": DATA_CLAIM_TEMPLATE, "labels": labels(&name, COMPONENT_CACHE)},
                "spec": claim_spec(mirror),
            }],
        },
    })
}

/// Keeps `existing`'s volumeClaimTemplates in `built` (Kubernetes refuses
/// to change them on a StatefulSet, and a refused apply would hold back
/// every other change). Returns whether the mirror's `storage` asked for
/// something else (access modes, size or class), which then applies only to
/// a StatefulSet created anew.
pub fn keep_claim_templates(built: &mut StatefulSet, existing: &StatefulSet) -> bool {
    let shape = |s: &StatefulSet| {
        let t = s.spec.as_ref()?.volume_claim_templates.as_ref()?.first()?;
        let spec = t.spec.as_ref()?;
        let size = spec
            .resources
            .as_ref()?
            .requests
            .as_ref()?
            .get("storage")?
            .0
            .clone();
        Some((
            spec.access_modes.clone(),
            size,
            spec.storage_class_name.clone(),
        ))
    };
    let differs = shape(built) != shape(existing);
    if let (Some(b), Some(e)) = (built.spec.as_mut(), existing.spec.as_ref()) {
        b.volume_claim_templates = e.volume_claim_templates.clone();
    }
    differs
}

/// Sets the storage request of `sts`'s claim template to `size`: the larger
/// size its StatefulSet is re-created with once every member claim was
/// expanded ([`crate::storage`]).
pub fn set_claim_size(sts: &mut StatefulSet, size: &str) {
    let templates = sts
        .spec
        .as_mut()
        .and_then(|s| s.volume_claim_templates.as_mut());
    for t in templates.into_iter().flatten() {
        t.spec
            .get_or_insert_with(Default::default)
            .resources
            .get_or_insert_with(Default::default)
            .requests
            .get_or_insert_with(Default::default)
            .insert(
                "storage".into(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity(size.into()),
            );
    }
}

/// The headless Service listing the ready members (its EndpointSlices are
/// what discovery watches): no cluster IP, not-ready pods left out.
fn members_service_json(mirror: &RegistryMirror, settings: &Settings) -> Value {
    let name = mirror.name();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(mirror, settings, members_service_name(&name), COMPONENT_CACHE),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": false,
            "selector": selector_labels(&name, COMPONENT_CACHE),
            "ports": [{"name": REGISTRY_PORT, "port": mirror.spec.cache.port,
                       "targetPort": REGISTRY_PORT, "protocol": "TCP"}],
        },
    })
}

/// The cache Service. Container runtimes run on the host, where cluster DNS
/// and (on many setups) ClusterIPs are not usable, so nodes reach the cache at
/// `<their own IP>:<nodePort>`. `externalTrafficPolicy: Cluster`, because with
/// `Local` only the node running the cache pod would answer: every other node
/// would drop the connection and containerd would wait out its dial timeout
/// on each request before falling back to the upstream.
fn service_json(mirror: &RegistryMirror, settings: &Settings) -> Value {
    let name = mirror.name();
    let cache = &mirror.spec.cache;
    let mut port = json!({
        "name": REGISTRY_PORT,
        "port": cache.port,
        "targetPort": "registry",
        "protocol": "TCP",
    });
    if let Some(np) = cache.node_port {
        port["nodePort"] = json!(np);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(mirror, settings, service_name(&name), COMPONENT_CACHE),
        "spec": {
            "type": "NodePort",
            "externalTrafficPolicy": "Cluster",
            "selector": selector_labels(&name, COMPONENT_CACHE),
            "ports": [port],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::RegistryMirrorSpec;
    use serde::Serialize;

    pub(crate) fn mirror(spec: Value) -> RegistryMirror {
        let spec: RegistryMirrorSpec = serde_json::from_value(spec).unwrap();
        let mut m = RegistryMirror::new("hub", spec);
        m.metadata.uid = Some("uid-1".into());
        m
    }

    use crate::fixtures::{NS, settings};

    fn v<T: Serialize>(t: &T) -> Value {
        serde_json::to_value(t).unwrap()
    }

    #[test]
    fn names_are_valid_and_distinct() {
        assert_eq!(child_name("hub", ""), "regmirror-hub");
        assert_eq!(child_name("hub", "-agent"), "regmirror-hub-agent");
        let dotted = child_name("a.b", "");
        assert!(dotted.starts_with("regmirror-a-b-") && dotted.len() == "regmirror-a-b-".len() + 8);
        assert_ne!(
            dotted,
            child_name("a-b", ""),
            "a.b and a-b must not collide"
        );
        let long = "x".repeat(253);
        for suffix in ["", "-agent", "-credentials"] {
            let n = child_name(&long, suffix);
            assert!(n.len() <= 52, "{n}");
            assert!(n.ends_with(suffix));
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            );
        }
        assert_ne!(
            child_name(&format!("{long}a")[1..], ""),
            child_name(&long, "")
        );
        assert_eq!(instance_label("hub"), "hub");
        let l = instance_label(&format!("{}.example", "y".repeat(70)));
        assert!(l.len() <= 63 && !l.contains(".-"), "{l}");
    }

    #[test]
    fn cache_config_matches_the_cache_format() {
        let m = mirror(json!({
            "upstreams": [
                {"host": "docker.io", "tagTTL": "10m", "credentialsSecret": {"name": "hub-creds"}},
                {"host": "ghcr.io"},
                {"host": "registry.local:5000", "url": "http://10.0.0.5:5000/"},
            ],
            "cache": {"tagTTL": "1m", "port": 5001},
        }));
        let text = cache_config(&m, NS, true);
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(parsed["listen"].as_str(), Some("[::]:5001"));
        assert_eq!(parsed["storage"].as_str(), Some(DATA_DIR));
        assert_eq!(
            parsed["credentials"].as_str(),
            Some("/var/run/regmirror/credentials/config.json")
        );
        assert_eq!(parsed["tag_ttl"].as_str(), Some("1m"));
        let ups = parsed["upstream"].as_array().unwrap();
        assert_eq!(ups[0]["url"].as_str(), Some("https://registry-1.docker.io"));
        assert_eq!(ups[0]["tag_ttl"].as_str(), Some("10m"));
        assert_eq!(ups[1]["url"].as_str(), Some("https://ghcr.io"));
        assert_eq!(ups[2]["url"].as_str(), Some("http://10.0.0.5:5000"));

        // The cache's own parser accepts it (unknown keys are errors there).
        let c = resolved_by_the_cache(&text);
        assert_eq!(
            c.upstream_hosts(),
            ["docker.io", "ghcr.io", "registry.local:5000"]
        );
        assert_eq!(c.upstreams[0].tag_ttl, std::time::Duration::from_secs(600));
        assert_eq!(c.upstreams[1].tag_ttl, std::time::Duration::from_secs(60));
        assert_eq!(c.listen.port(), 5001);
        assert!(c.credentials.is_some());

        assert!(
            !cache_config(&m, NS, false).contains("credentials"),
            "no credentials line without a Secret"
        );
    }

    /// `text` as the cache resolves it from `--config`, named as a member
    /// pod is (`REGMIRROR_NAME`, i.e. `--name`).
    fn resolved_by_the_cache(text: &str) -> regmirror_cache::config::Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_KEY);
        std::fs::write(&path, text).unwrap();
        use clap::Parser;
        let cli = regmirror_cache::config::Cli::try_parse_from([
            "regmirror-cache",
            "--config",
            path.to_str().unwrap(),
            "--name",
            "regmirror-hub-0",
        ])
        .unwrap();
        regmirror_cache::config::Config::resolve(cli).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn rendered_config_resolves_in_the_cache_with_limits() {
        let m = mirror(json!({
            "upstreams": [
                {"host": "docker.io", "credentialsSecret": {"name": "hub-creds"}},
                {"host": "ghcr.io", "tagTTL": "1h30m", "credentialsSecret": {"name": "gh"}},
                {"host": "quay.io"},
                {"host": "registry.local:5000", "url": "http://10.0.0.5:5000/v2-mirror/"},
            ],
            "cache": {"tagTTL": "5m", "maxSize": "50Gi", "maxAge": "30d"},
        }));
        let c = resolved_by_the_cache(&cache_config(&m, NS, true));
        assert_eq!(c.listen, "[::]:5000".parse().unwrap());
        assert_eq!(c.storage, std::path::PathBuf::from(DATA_DIR));
        assert_eq!(
            c.credentials,
            Some(format!("{CREDENTIALS_DIR}/{CREDENTIALS_FILE}").into())
        );
        let urls: Vec<&str> = c.upstreams.iter().map(|u| u.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "https://registry-1.docker.io/",
                "https://ghcr.io/",
                "https://quay.io/",
                "http://10.0.0.5:5000/v2-mirror",
            ]
        );
        let ttls: Vec<u64> = c.upstreams.iter().map(|u| u.tag_ttl.as_secs()).collect();
        assert_eq!(ttls, [300, 5400, 300, 300]);
        // Well-known registries keep their redirect hosts in the operator's config.
        assert!(
            c.upstreams[0]
                .allowed_hosts
                .contains(&"*.docker.com".into())
        );
        assert_eq!(c.limits.max_size, Some(50 << 30));
        assert_eq!(
            c.cluster.as_ref().unwrap().member_max_size,
            Some((20u64 << 30) / 10 * 9),
            "the default storage.size's (20Gi) 90%"
        );
        assert_eq!(
            c.limits.max_age,
            Some(std::time::Duration::from_secs(30 * 86400))
        );

        // Without cache.maxSize no cluster budget: each member 90% of its volume.
        let m = mirror(json!({"upstreams": [{"host": "docker.io"}], "storage": {"size": "20Gi"}}));
        let c = resolved_by_the_cache(&cache_config(&m, NS, false));
        assert_eq!(c.limits.max_size, None);
        assert_eq!(
            c.cluster.unwrap().member_max_size,
            Some((20u64 << 30) / 10 * 9)
        );
        assert_eq!(c.limits.max_age, None);
        assert_eq!(c.credentials, None);
        assert_eq!(c.upstreams[0].tag_ttl, std::time::Duration::ZERO);
    }

    #[test]
    fn members_cap_follows_what_their_claims_hold_while_they_grow() {
        let m = mirror(json!({"upstreams": [{"host": "docker.io"}], "storage": {"size": "20Gi"}}));
        let cap = |settled| {
            resolved_by_the_cache(&cache_config_within(&m, NS, false, settled))
                .cluster
                .unwrap()
                .member_max_size
        };
        // Claims still at 10Gi of 20Gi: 90% of 10Gi, not of a volume not there yet.
        assert_eq!(cap(Some(10 << 30)), Some((10u64 << 30) / 10 * 9));
        // Claims larger than asked (provisioners round up), or unknown: storage.size.
        assert_eq!(cap(Some(25 << 30)), Some((20u64 << 30) / 10 * 9));
        assert_eq!(cap(None), Some((20u64 << 30) / 10 * 9));
        assert_eq!(
            build_within(&m, &settings(), None, Some(20 << 30)).config_map,
            build(&m, &settings(), None).config_map
        );
    }

    /// The rendered text is hashed onto the cache's pod template, so any
    /// change to it, formatting included, restarts every cache when the
    /// operator is upgraded: it stays byte for byte what it was. (Changed on
    /// purpose twice: `listen` went from `0.0.0.0` to dual-stack `[::]`, issue
    /// 18; `[cluster.discovery]` came with the StatefulSet, issue 16, whose
    /// migration replaces the pod anyway; the README's upgrade notes say so.)
    #[test]
    fn rendered_config_text_is_stable() {
        let m = mirror(json!({"upstreams": [{"host": "docker.io"}]}));
        assert_eq!(
            cache_config(&m, NS, true),
            r#"# Generated by regmirror-operator from RegistryMirror "hub": edits are overwritten.
listen = "[::]:5000"
storage = "/var/lib/regmirror"
credentials = "/var/run/regmirror/credentials/config.json"

[[upstream]]
host = "docker.io"
url = "https://registry-1.docker.io"

[cluster]
member_max_size = 19327352832

[cluster.discovery]
service = "regmirror-hub-members"
namespace = "regmirror-system"
port_name = "registry"
"#
        );
        let m = mirror(json!({
            "upstreams": [
                {"host": "docker.io", "tagTTL": "10m", "credentialsSecret": {"name": "hub-creds"}},
                {"host": "ghcr.io", "tagTTL": "1h30m"},
                {"host": "registry.local:5000", "url": "http://10.0.0.5:5000/"},
            ],
            "cache": {"tagTTL": "1m", "port": 5001, "maxSize": "50Gi", "maxAge": "30d"},
        }));
        assert_eq!(
            cache_config(&m, NS, true),
            r#"# Generated by regmirror-operator from RegistryMirror "hub": edits are overwritten.
listen = "[::]:5001"
storage = "/var/lib/regmirror"
credentials = "/var/run/regmirror/credentials/config.json"
tag_ttl = "1m"
max_size = 53687091200
max_age = "30d"

[[upstream]]
host = "docker.io"
url = "https://registry-1.docker.io"
tag_ttl = "10m"

[[upstream]]
host = "ghcr.io"
url = "https://ghcr.io"
tag_ttl = "1h30m"

[[upstream]]
host = "registry.local:5000"
url = "http://10.0.0.5:5000"

[cluster]
member_max_size = 19327352832

[cluster.discovery]
service = "regmirror-hub-members"
namespace = "regmirror-system"
port_name = "registry"
"#
        );
    }

    #[test]
    fn stateful_set_runs_named_members_with_probes_hash_and_a_claim_each() {
        let m = mirror(json!({"upstreams": [{"host": "docker.io"}]}));
        let c = build(&m, &settings(), None);
        let d = v(&c.stateful_set);
        assert_eq!(d["metadata"]["name"], "regmirror-hub");
        assert_eq!(d["metadata"]["namespace"], "regmirror-system");
        assert_eq!(
            d["metadata"]["ownerReferences"],
            json!([{"apiVersion": "regmirror.dev/v1alpha1", "kind": "RegistryMirror",
                    "name": "hub", "uid": "uid-1", "controller": true}])
        );
        assert_eq!(
            d["metadata"]["labels"],
            json!({
                "app.kubernetes.io/name": "regmirror",
                "app.kubernetes.io/instance": "hub",
                "app.kubernetes.io/component": "cache",
                "app.kubernetes.io/managed-by": "regmirror-operator",
                "app.kubernetes.io/part-of": "regmirror",
                "regmirror.dev/mirror": "hub",
            })
        );
        let spec = &d["spec"];
        assert_eq!(spec["replicas"], 1);
        assert_eq!(spec["serviceName"], "regmirror-hub-members");
        assert_eq!(spec["podManagementPolicy"], "Parallel");
        assert_eq!(spec["updateStrategy"], json!({"type": "RollingUpdate"}));
        assert_eq!(
            spec["persistentVolumeClaimRetentionPolicy"],
            json!({"whenDeleted": "Delete", "whenScaled": "Retain"})
        );
        let claim = &spec["volumeClaimTemplates"][0];
        assert_eq!(claim["metadata"]["name"], DATA_CLAIM_TEMPLATE);
        assert_eq!(
            claim["spec"],
            json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}})
        );
        assert_eq!(member_claim_name("hub", 0), "data-regmirror-hub-0");
        let tpl = &spec["template"];
        assert_eq!(tpl["spec"]["serviceAccountName"], "regmirror-hub-cache");
        assert_eq!(tpl["spec"]["automountServiceAccountToken"], true);
        let grace =
            regmirror_cache::cluster::router::DRAIN + regmirror_cache::listen::SHUTDOWN_GRACE;
        assert!(
            tpl["spec"]["terminationGracePeriodSeconds"]
                .as_i64()
                .unwrap()
                > grace.as_secs() as i64,
            "the kubelet kills only after the cache's own drain and grace"
        );
        assert_eq!(
            tpl["metadata"]["annotations"][CONFIG_HASH_ANNOTATION],
            c.config_hash
        );
        let ctr = &tpl["spec"]["containers"][0];
        assert_eq!(ctr["image"], "regmirror/cache:test");
        assert_eq!(
            ctr["args"],
            json!(["--config", "/etc/regmirror/config.toml"])
        );
        assert_eq!(ctr["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(ctr["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(ctr["ports"][0]["containerPort"], 5000);
        assert!(
            ctr["env"]
                .as_array()
                .unwrap()
                .contains(&json!({"name": "REGMIRROR_NAME",
            "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}))
        );
        assert_eq!(
            ctr["volumeMounts"][1],
            json!({"name": "data", "mountPath": DATA_DIR})
        );
        assert_eq!(
            tpl["spec"]["volumes"],
            json!([{"name": "config", "configMap": {"name": "regmirror-hub"}}])
        );
        assert_eq!(
            spec["selector"]["matchLabels"]["app.kubernetes.io/component"],
            "cache"
        );

        // A config change changes the hash; an unrelated change does not.
        let m2 = mirror(json!({"upstreams": [{"host": "docker.io"}, {"host": "quay.io"}]}));
        assert_ne!(build(&m2, &settings(), None).config_hash, c.config_hash);
        let m3 = mirror(
            json!({"upstreams": [{"host": "docker.io"}], "storage": {"storageClassName": "fast"}}),
        );
        assert_eq!(build(&m3, &settings(), None).config_hash, c.config_hash);
        // Scaling changes the replicas only: the same pod template, so no
        // member restarts.
        let scaled =
            mirror(json!({"upstreams": [{"host": "docker.io"}], "cache": {"replicas": 3}}));
        let s = v(&build(&scaled, &settings(), None).stateful_set);
        assert_eq!(s["spec"]["replicas"], 3);
        assert_eq!(s["spec"]["template"], d["spec"]["template"]);
        assert_eq!(build(&scaled, &settings(), None).config_map, c.config_map);
    }

    #[test]
    fn host_network_members_bind_their_nodes_port_and_reach_the_api_server_as_installed() {
        let plain = mirror(json!({"upstreams": [{"host": "docker.io"}]}));
        let tpl = |m: &RegistryMirror, s: &Settings| {
            v(&build(m, s, None).stateful_set)["spec"]["template"].clone()
        };
        let before = tpl(&plain, &settings());
        assert_eq!(before["spec"].get("hostNetwork"), None);
        assert_eq!(before["spec"].get("dnsPolicy"), None);

        let m = mirror(json!({"upstreams": [{"host": "docker.io"}],
                              "cache": {"hostNetwork": true, "port": 5123}}));
        let mut installed = settings();
        installed.kubernetes_service = Some("127.0.0.1:6443".parse().unwrap());
        let t = tpl(&m, &installed);
        assert_eq!(t["spec"]["hostNetwork"], true);
        assert_eq!(t["spec"]["dnsPolicy"], "ClusterFirstWithHostNet");
        let ctr = &t["spec"]["containers"][0];
        assert_eq!(ctr["ports"][0]["containerPort"], 5123);
        let env = ctr["env"].as_array().unwrap();
        assert!(env.contains(&json!({"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"})));
        assert!(env.contains(&json!({"name": "KUBERNETES_SERVICE_PORT", "value": "6443"})));
        // The rest of the pod is the same as without.
        assert_eq!(
            t["spec"]["securityContext"],
            before["spec"]["securityContext"]
        );
        assert_eq!(t["spec"]["volumes"], before["spec"]["volumes"]);
    }

    #[test]
    fn host_ports_parse_with_brackets_for_ipv6_and_say_what_is_wrong() {
        let hp: HostPort = "[fd00::1]:6443".parse().unwrap();
        assert_eq!((hp.host.as_str(), hp.port), ("fd00::1", 6443));
        let hp: HostPort = "api.example:443".parse().unwrap();
        assert_eq!((hp.host.as_str(), hp.port), ("api.example", 443));
        for (bad, says) in [
            ("api.example", "host:port"),
            (":443", "host:port"),
            ("fd00::1:6443", "brackets"),
            ("[fd00::1:6443", "unclosed"),
            ("h:0", "1-65535"),
            ("h:70000", "1-65535"),
            ("[api.example:6443]:443", "only an IPv6 address"),
            ("api.example/x:443", "host:port"),
            ("[[fd00::1]]:443", "only an IPv6 address"),
        ] {
            let e = bad.parse::<HostPort>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn an_existing_stateful_sets_claim_templates_are_kept() {
        let m = mirror(json!({"upstreams": [{"host": "docker.io"}]}));
        let existing = build(&m, &settings(), None).stateful_set;
        let mut same = build(&m, &settings(), None).stateful_set;
        assert!(!keep_claim_templates(&mut same, &existing));
        let bigger =
            mirror(json!({"upstreams": [{"host": "docker.io"}], "storage": {"size": "50Gi"}}));
        let mut built = build(&bigger, &settings(), None).stateful_set;
        assert!(keep_claim_templates(&mut built, &existing));
        assert_eq!(
            v(&built)["spec"]["volumeClaimTemplates"],
            v(&existing)["spec"]["volumeClaimTemplates"]
        );
    }

    #[test]
    fn a_grown_claim_template_differs_from_the_spec_in_nothing() {
        let small = build(
            &mirror(json!({"upstreams": [{"host": "docker.io"}], "storage": {"size": "1Gi"}})),
            &settings(),
            None,
        );
        let bigger =
            mirror(json!({"upstreams": [{"host": "docker.io"}], "storage": {"size": "3Gi"}}));
        let mut grown = small.stateful_set.clone();
        set_claim_size(&mut grown, "3Gi");
        assert_eq!(
            v(&grown)["spec"]["volumeClaimTemplates"],
            v(&build(&bigger, &settings(), None).stateful_set)["spec"]["volumeClaimTemplates"]
        );
        assert_eq!(
            v(&grown)["spec"]["template"],
            v(&small.stateful_set)["spec"]["template"]
        );
    }

    #[test]
    fn members_discover_each_other_through_a_headless_service_they_may_only_watch() {
        let m = mirror(json!({"upstreams": [{"host": "docker.io"}], "cache": {"port": 5001}}));
        let c = build(&m, &settings(), None);
        let h = v(&c.members_service);
        assert_eq!(h["metadata"]["name"], "regmirror-hub-members");
        assert_eq!(
            h["spec"],
            json!({
                "clusterIP": "None",
                "publishNotReadyAddresses": false,
                "selector": selector_labels("hub", COMPONENT_CACHE),
                "ports": [{"name": "registry", "port": 5001, "targetPort": "registry", "protocol": "TCP"}],
            })
        );
        let role = v(&c.role);
        assert_eq!(
            role["rules"],
            json!([{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"]}])
        );
        let binding = v(&c.role_binding);
        assert_eq!(
            binding["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "regmirror-hub-cache"})
        );
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "regmirror-hub-cache", "namespace": "regmirror-system"}])
        );
        assert_eq!(
            v(&c.service_account)["metadata"]["name"],
            "regmirror-hub-cache"
        );
        // The cache's own parser takes the rendered discovery.
        let config = resolved_by_the_cache(&cache_config(&m, NS, false));
        assert_eq!(
            config.cluster.map(|c| c.source),
            Some(regmirror_cache::cluster::MemberSource::Kubernetes(
                regmirror_cache::cluster::Discovery {
                    service: "regmirror-hub-members".into(),
                    namespace: Some(NS.into()),
                    port_name: Some("registry".into()),
                }
            ))
        );
    }

    #[test]
    fn claims_images_and_credentials_follow_the_spec() {
        let m = mirror(json!({
            "upstreams": [{"host": "docker.io"}],
            "storage": {"accessMode": "ReadWriteMany", "storageClassName": "nfs", "size": "1Ti"},
            "cache": {"replicas": 2, "image": "my/cache:1", "imagePullPolicy": "Always",
                      "resources": {"requests": {"cpu": "1"}}},
        }));
        let c = build(&m, &settings(), Some(br#"{"auths":{}}"#));
        let d = v(&c.stateful_set);
        assert_eq!(d["spec"]["replicas"], 2);
        let ctr = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(ctr["image"], "my/cache:1");
        assert_eq!(ctr["imagePullPolicy"], "Always");
        assert_eq!(ctr["resources"], json!({"requests": {"cpu": "1"}}));
        assert_eq!(
            ctr["volumeMounts"][2],
            json!({"name": "credentials", "mountPath": CREDENTIALS_DIR, "readOnly": true})
        );
        assert_eq!(
            d["spec"]["template"]["spec"]["volumes"][1]["secret"],
            json!({"secretName": "regmirror-hub-credentials",
                   "items": [{"key": ".dockerconfigjson", "path": "config.json"}]})
        );
        let s = v(c.credentials.as_ref().unwrap());
        assert_eq!(s["type"], "kubernetes.io/dockerconfigjson");
        let p = &d["spec"]["volumeClaimTemplates"][0];
        assert_eq!(
            p["spec"],
            json!({"accessModes": ["ReadWriteMany"], "storageClassName": "nfs",
                   "resources": {"requests": {"storage": "1Ti"}}})
        );
    }

    #[test]
    fn service_is_a_cluster_policy_node_port() {
        let m = mirror(json!({"upstreams": [{"host": "docker.io"}], "cache": {"nodePort": 31500}}));
        let s = v(&build(&m, &settings(), None).service);
        assert_eq!(
            s["spec"],
            json!({
                "type": "NodePort",
                "externalTrafficPolicy": "Cluster",
                "selector": {
                    "app.kubernetes.io/name": "regmirror",
                    "app.kubernetes.io/instance": "hub",
                    "app.kubernetes.io/component": "cache",
                },
                "ports": [{"name": "registry", "port": 5000, "targetPort": "registry",
                           "protocol": "TCP", "nodePort": 31500}],
            })
        );
    }
}
