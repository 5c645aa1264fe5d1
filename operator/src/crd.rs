//! The `RegistryMirror` custom resource (`regmirror.dev/v1alpha1`).
//!
//! Everything but `spec.upstreams` has a default. Validation that a user can
//! get wrong at `kubectl apply` time lives in the schema as CEL rules with
//! messages; what needs the cluster (the operator's namespace, Secrets,
//! other mirrors) is checked by the controller and reported in `status`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use regmirror_registry::docker_hub::{self, DOCKER_HUB};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "regmirror.dev";
pub const DEFAULT_STORAGE_SIZE: &str = "20Gi";
pub const DEFAULT_CONTAINERD_CONFIG_DIR: &str = "/etc/containerd/certs.d";
pub const DEFAULT_CONTAINERD_CONFIG_FILE: &str = "/etc/containerd/config.toml";
pub const DEFAULT_CACHE_PORT: i32 = 5000;

/// CEL (on the whole object, on update): `spec.storage.size` is the same,
/// larger, or at least what the running claims have (`status.storage.size`).
const STORAGE_SIZE_RULE: &str = "!has(self.spec.storage) || !has(oldSelf.spec.storage) || !has(self.spec.storage.size) || !has(oldSelf.spec.storage.size) \
    || self.spec.storage.size == oldSelf.spec.storage.size \
    || !isQuantity(self.spec.storage.size) || !isQuantity(oldSelf.spec.storage.size) \
    || quantity(self.spec.storage.size).compareTo(quantity(oldSelf.spec.storage.size)) >= 0 \
    || (has(self.status) && has(self.status.storage) && isQuantity(self.status.storage.size) \
        && quantity(self.spec.storage.size).compareTo(quantity(self.status.storage.size)) >= 0)";
/// CEL: `spec.storage.accessMode` unchanged, or the running claims' (`status.storage.accessMode`).
const STORAGE_ACCESS_MODE_RULE: &str = "!has(self.spec.storage) || !has(oldSelf.spec.storage) \
    || (has(self.spec.storage.accessMode) ? self.spec.storage.accessMode : 'ReadWriteOnce') \
       == (has(oldSelf.spec.storage.accessMode) ? oldSelf.spec.storage.accessMode : 'ReadWriteOnce') \
    || (has(self.status) && has(self.status.storage) && has(self.status.storage.accessMode) \
        && (has(self.spec.storage.accessMode) ? self.spec.storage.accessMode : 'ReadWriteOnce') == self.status.storage.accessMode)";
/// CEL: `spec.storage.storageClassName` unchanged, set or unset, or the
/// running claims' (`status.storage.storageClassName`; `<unset>` stands
/// for none, which no StorageClass name can be).
const STORAGE_CLASS_RULE: &str = "!has(self.spec.storage) || !has(oldSelf.spec.storage) \
    || (has(self.spec.storage.storageClassName) ? self.spec.storage.storageClassName : '<unset>') \
       == (has(oldSelf.spec.storage.storageClassName) ? oldSelf.spec.storage.storageClassName : '<unset>') \
    || (has(self.status) && has(self.status.storage) \
        && (has(self.spec.storage.storageClassName) ? self.spec.storage.storageClassName : '<unset>') \
           == (has(self.status.storage.storageClassName) ? self.status.storage.storageClassName : '<unset>'))";

/// A pull-through cache for one or more upstream registries, and the
/// configuration that points every selected node's container runtime at it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "regmirror.dev",
    version = "v1alpha1",
    kind = "RegistryMirror",
    plural = "registrymirrors",
    shortname = "rmirror",
    category = "regmirror",
    status = "RegistryMirrorStatus",
    derive = "PartialEq",
    doc = "A pull-through cache for container registries, and the node configuration that sends every pull through it.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Upstreams","type":"string","jsonPath":".status.upstreams"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Members","type":"string","description":"Cache members ready/desired","jsonPath":".status.cache.members"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","description":"Nodes whose container runtime is configured to pull through the cache","jsonPath":".status.nodesConfigured"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    // What Kubernetes does not change on a StatefulSet's claim templates is
    // fixed (a larger size is carried out by the operator). Each rule also
    // lets an edit go back to the claims the cache runs with
    // (`status.storage`), so a change the operator could not carry out is
    // never a dead end (issue 18).
    validation = Rule::new(STORAGE_SIZE_RULE)
        .field_path(".spec.storage.size")
        .message("storage.size may only grow (or go back to status.storage.size, what the members' claims have): Kubernetes does not shrink a volume (for smaller volumes create a new mirror); a larger size expands every member's claim, which needs a StorageClass with allowVolumeExpansion: true"),
    validation = Rule::new(STORAGE_ACCESS_MODE_RULE)
        .field_path(".spec.storage.accessMode")
        .message("storage.accessMode is fixed once the mirror exists (it may go back to status.storage.accessMode): Kubernetes does not change a StatefulSet's claim templates"),
    validation = Rule::new(STORAGE_CLASS_RULE)
        .field_path(".spec.storage.storageClassName")
        .message("storage.storageClassName is fixed once the mirror exists, set or unset (it may go back to status.storage.storageClassName): Kubernetes does not change a StatefulSet's claim templates"),
)]
#[serde(rename_all = "camelCase")]
pub struct RegistryMirrorSpec {
    /// Registries to mirror, by the host that image references name (`docker.io/library/alpine`
    /// is host `docker.io`). Each host may appear once.
    #[x_kube(merge_strategy = ListMerge::Map(vec!["host".into()]))]
    #[schemars(length(min = 1, max = 64))]
    pub upstreams: Vec<Upstream>,
    /// Where each cache member keeps content: one claim per member.
    #[serde(default)]
    pub storage: Storage,
    /// The cache: a StatefulSet of `replicas` members acting as one cache.
    #[serde(default)]
    // The cache runs unprivileged: on the node's network it may bind only
    // ports from net.ipv4.ip_unprivileged_port_start (1024 by default; a
    // pod's own network lowers it to 0).
    #[x_kube(validation = Rule::new("!has(self.hostNetwork) || !self.hostNetwork || !has(self.port) || self.port >= 1024")
        .message("cache.port must be 1024 or more with cache.hostNetwork: the cache runs unprivileged and binds the port on the node"))]
    pub cache: CacheSpec,
    /// Which nodes are configured to pull through the cache, and how.
    #[serde(default)]
    pub nodes: NodesSpec,
}

/// One upstream registry.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    /// Registry host as image references name it, with an optional port: `docker.io`,
    /// `ghcr.io`, `registry.example.com:5000`.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(
        validation = Rule::new(r"self.matches('^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?$')")
            .message("host must be a lowercase registry host name with an optional port (1-65535), such as docker.io or registry.example.com:5000 (no scheme, no path)"),
        validation = docker_hub_alias_rule()
    )]
    pub host: String,
    /// Where the registry API is served. Defaults for well-known hosts (docker.io is
    /// https://registry-1.docker.io; ghcr.io, quay.io, registry.k8s.io, gcr.io,
    /// mcr.microsoft.com and public.ecr.aws are themselves), otherwise `https://<host>`.
    /// Nodes fall back to it when the cache is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new(r"self.matches('^https?://([^/?#@\\s:\\[\\]]+|\\[[0-9a-fA-F:.]+\\])(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?(/[^?#\\s]*)?$')")
        .message("url must be http:// or https:// followed by a host, an optional port (1-65535) and path, without credentials, query or fragment"))]
    pub url: Option<String>,
    /// A `kubernetes.io/dockerconfigjson` Secret holding credentials for this registry.
    /// It must be in the operator's namespace (which is the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<SecretRef>,
    /// Serve cached tags of this upstream without asking it for this long (e.g. `5m`).
    /// Overrides `cache.tagTTL`.
    #[serde(default, rename = "tagTTL", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = duration_rule())]
    pub tag_ttl: Option<String>,
}

fn default_storage_size() -> String {
    DEFAULT_STORAGE_SIZE.into()
}
fn default_replicas() -> i32 {
    1
}
fn default_port() -> i32 {
    DEFAULT_CACHE_PORT
}
fn default_containerd_config_dir() -> String {
    DEFAULT_CONTAINERD_CONFIG_DIR.into()
}

/// Refuses Docker Hub's aliases ([`docker_hub::ALIASES`]): image references
/// and containerd's `certs.d` lookup name Docker Hub `docker.io`, so a mirror
/// for an alias would never be used.
fn docker_hub_alias_rule() -> kube::core::Rule {
    let aliases: Vec<String> = docker_hub::ALIASES
        .iter()
        .map(|a| format!("'{a}'"))
        .collect();
    kube::core::Rule::new(format!("!(self in [{}])", aliases.join(", "))).message(
        format!(
            "write {DOCKER_HUB}: image references and containerd name Docker Hub {DOCKER_HUB}, so a mirror for this alias would never be used"
        )
        .as_str(),
    )
}

fn duration_rule() -> kube::core::Rule {
    kube::core::Rule::new(r"self.matches('^([0-9]{1,9}(ms|s|m|h|d))+$')")
        .message("must be a duration such as 30s, 5m or 1h30m (each number at most 9 digits)")
}

/// A duration that must be longer than zero (a limit: `0s` would evict at once).
fn positive_duration_rule(field: &str) -> kube::core::Rule {
    kube::core::Rule::new(r"!self.matches('^(0+(ms|s|m|h|d))+$')")
        .message(format!("{field} must be longer than 0 (omit it for no limit)").as_str())
}

/// A quantity that must be more than zero.
fn positive_quantity_rule(field: &str) -> kube::core::Rule {
    kube::core::Rule::new("!isQuantity(self) || quantity(self).isGreaterThan(quantity('0'))")
        .message(format!("{field} must be more than 0").as_str())
}

/// A Secret reference.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Defaults to the operator's namespace; no other namespace is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Access mode of the cache volume.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum AccessMode {
    #[default]
    ReadWriteOnce,
    ReadWriteOncePod,
    ReadWriteMany,
}

impl AccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadWriteOnce => "ReadWriteOnce",
            Self::ReadWriteOncePod => "ReadWriteOncePod",
            Self::ReadWriteMany => "ReadWriteMany",
        }
    }
}

/// Each cache member's PersistentVolumeClaim (a StatefulSet volumeClaimTemplate:
/// one claim per member, kept when the cluster scales down, deleted with the mirror).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Requested volume size of each member (a Kubernetes quantity such as 20Gi).
    /// May only grow: the operator then expands every member's claim (their
    /// StorageClass must allow volume expansion) and re-creates the StatefulSet
    /// with the larger claim template, its pods kept running.
    #[schemars(length(max = 64))]
    #[x_kube(
        validation = Rule::new(r"self.matches('^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$')")
            .message("size must be a quantity such as 500Mi, 20Gi or 1Ti"),
        validation = positive_quantity_rule("size"),
    )]
    #[serde(default = "default_storage_size")]
    pub size: String,
    /// StorageClass of the claims; the cluster default when unset. Fixed once the mirror exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(
        validation = Rule::new(r"self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')")
            .message("storageClassName must be a StorageClass name: lowercase letters, digits, '-' and '.'")
    )]
    pub storage_class_name: Option<String>,
    /// Access mode of each member's claim. Members never share a volume, so
    /// ReadWriteOnce (which every StorageClass offers) suits any number of members.
    /// Fixed once the mirror exists.
    #[serde(default)]
    pub access_mode: AccessMode,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            size: DEFAULT_STORAGE_SIZE.into(),
            storage_class_name: None,
            access_mode: AccessMode::ReadWriteOnce,
        }
    }
}

/// Cache log level (`REGMIRROR_LOG`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// The cache StatefulSet and its Services.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Cache image; defaults to the operator's `--cache-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new(r"!self.matches('\\s')")
        .message("image must be an image reference without spaces"))]
    pub image: Option<String>,
    /// Always, IfNotPresent or Never; Kubernetes' default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in ['Always', 'IfNotPresent', 'Never']")
        .message("imagePullPolicy must be Always, IfNotPresent or Never"))]
    pub image_pull_policy: Option<String>,
    /// Cache members (1 to 16). Each key has one owner among them, so every blob is
    /// fetched from the upstream once and stored once, cluster-wide; scaling changes
    /// only the number of members (none restarts).
    #[x_kube(validation = Rule::new("self >= 1 && self <= 16")
        .message("replicas must be from 1 to 16 cache members"))]
    #[serde(default = "default_replicas")]
    pub replicas: i32,
    /// Container resources; defaults request 100m CPU and 128Mi memory, limit 1Gi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Serve cached tags without asking the upstream for this long (e.g. `5m`); `0s` by
    /// default, so tags are re-validated with one HEAD on every pull.
    #[serde(default, rename = "tagTTL", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = duration_rule())]
    pub tag_ttl: Option<String>,
    #[serde(default)]
    pub log_level: LogLevel,
    /// Byte budget for cached content of all members together (e.g. `18Gi`): each
    /// member keeps `maxSize / members` and evicts least recently used content to stay
    /// under it. Each member also keeps within 90% of its volume (`storage.size`),
    /// which is the only limit when this is unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(r"self.matches('^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$')")
        .message("maxSize must be a quantity such as 500Mi, 18Gi or 1Ti: the budget of all cache members together"),
        validation = positive_quantity_rule("maxSize"))]
    pub max_size: Option<String>,
    /// Evict content nobody pulled for this long (e.g. `30d`); never by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = duration_rule(), validation = positive_duration_rule("maxAge"))]
    pub max_age: Option<String>,
    /// Fixed NodePort for the cache Service (inside the cluster's NodePort range);
    /// allocated by Kubernetes when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub node_port: Option<i32>,
    /// Port of the cache container and Service; with `hostNetwork`, the port each
    /// member binds on its node.
    #[schemars(range(min = 1, max = 65535))]
    #[serde(default = "default_port")]
    pub port: i32,
    /// Run the cache members on their nodes' network: each binds `port` on its node,
    /// and nodes' container runtimes reach the members at their nodes' addresses
    /// (`status.cacheAddresses`, one `[host]` entry each in `hosts.toml`, this node's
    /// own first, so containerd fails over between members before the upstream)
    /// instead of the Service's NodePort. For clusters without kube-proxy NodePorts and
    /// for caches pinned to storage nodes. At most one member per node (the port is
    /// the node's, and it must be 1024 or more: the cache runs unprivileged); the
    /// namespace's Pod Security level must allow host networking.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_network: bool,
}

impl Default for CacheSpec {
    fn default() -> Self {
        Self {
            image: None,
            image_pull_policy: None,
            replicas: 1,
            resources: None,
            tag_ttl: None,
            log_level: LogLevel::Info,
            max_size: None,
            max_age: None,
            node_port: None,
            port: DEFAULT_CACHE_PORT,
            host_network: false,
        }
    }
}

/// Which nodes' container runtimes are pointed at the cache, and where their
/// configuration lives. The node agents (one per node, installed with the
/// operator) write it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodesSpec {
    /// Nodes to configure (every label must match); all nodes when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "node_selector_schema")]
    #[x_kube(validation = Rule::new(r"self.all(k, k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))")
        .message("nodeSelector keys must be label keys: an optional DNS prefix and '/', then up to 63 letters, digits, '-', '_' or '.'"))]
    pub node_selector: BTreeMap<String, String>,
    /// Which tainted nodes to configure: a node with a NoSchedule or NoExecute taint
    /// is configured only if one of these tolerates it, as the scheduler would
    /// decide for a pod. When unset every node is configured, tainted (e.g.
    /// control-plane) ones too. The installer decides where node agents run
    /// (Helm chart value agent.tolerations); a node without an agent is never
    /// configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// containerd's registry configuration directory on the nodes (`config_path`).
    /// Must be inside a directory the installer lets the node agents use (Helm
    /// chart value agent.hostDirs, default /etc/containerd); otherwise the mirror
    /// is refused (NodesConfigured False, reason ConfigDirNotAllowed).
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new(r"self.startsWith('/') && !self.contains('..')")
        .message("containerdConfigDir must be an absolute path without '..'"))]
    #[serde(default = "default_containerd_config_dir")]
    pub containerd_config_dir: String,
    /// containerd's configuration file on the nodes, read (never written) to tell
    /// whether containerd uses `containerdConfigDir`. Must be inside agent.hostDirs too.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new(r"self.startsWith('/') && !self.contains('..')")
        .message("containerdConfigFile must be an absolute path without '..'"))]
    #[serde(default = "default_containerd_config_file")]
    pub containerd_config_file: String,
    /// Keep a `hosts.toml` regmirror did not write, with the cache put in front of its
    /// hosts (the original is restored when the mirror is deleted). When false, such a
    /// file is left alone and reported as a conflict.
    #[serde(default)]
    pub merge_existing: bool,
    /// Deprecated: the node agent image is the installer's choice (Helm chart value
    /// agent.image, the operator's `--agent-image`). Leave unset; any other image
    /// than the installed one is refused (reason AgentImageNotAllowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_image: Option<String>,
}

/// `nodeSelector`: at most 64 labels whose values are label values (a
/// `pattern`, which costs nothing in the CEL budget; the keys' rule is CEL,
/// as OpenAPI has no pattern for map keys).
fn node_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 64,
        "additionalProperties": {
            "type": "string",
            "maxLength": 63,
            "pattern": "^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
        }
    })
}

fn default_containerd_config_file() -> String {
    DEFAULT_CONTAINERD_CONFIG_FILE.into()
}

impl Default for NodesSpec {
    fn default() -> Self {
        Self {
            node_selector: BTreeMap::new(),
            tolerations: None,
            containerd_config_dir: DEFAULT_CONTAINERD_CONFIG_DIR.into(),
            containerd_config_file: DEFAULT_CONTAINERD_CONFIG_FILE.into(),
            merge_existing: false,
            agent_image: None,
        }
    }
}

/// What the operator and the node agents observed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RegistryMirrorStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `CacheAvailable`, `NodesConfigured`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Upstream hosts, as shown by `kubectl get` (conflicting hosts are marked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstreams: Option<String>,
    /// Hosts the node agents configure: the spec's, less those another mirror claimed first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// What nodes' container runtimes use, e.g. `<node-ip>:31500`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// NodePort of the cache Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<i32>,
    /// With `cache.hostNetwork`: where nodes reach the cache members, `<node-address>:<port>`
    /// of each ready member's node (by member ordinal). Kept while no member is ready (a
    /// member being replaced), so nodes keep the upstream as fallback; absent, nodes use
    /// the NodePort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_addresses: Option<Vec<String>>,
    /// Existing nodes this mirror selects (spec.nodes.nodeSelector and tolerations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_desired: Option<i32>,
    /// Of those, the nodes whose agent reports them configured to pull through the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_configured: Option<i32>,
    /// The cache members, as the StatefulSet reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStatus>,
    /// The members' claims as the running cache StatefulSet makes them (its claim
    /// template). `spec.storage` may always be set back to these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageStatus>,
    /// Per-node results, aggregated by the operator from the nodes' agents' reports
    /// (RegistryMirrorNodes): one entry per selected node, problems first, at most 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub nodes: Vec<NodeResult>,
}

/// The running members' claims: what the cache StatefulSet's claim template asks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageStatus {
    /// Requested size of each member's claim (a quantity).
    pub size: String,
    /// Access mode of the claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<String>,
    /// StorageClass of the claims; absent when they name none (the cluster default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// The cache members: how many are wanted and how many are ready.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheStatus {
    /// Members wanted (`spec.cache.replicas`, as the StatefulSet has it).
    pub replicas: i32,
    /// Members whose pod is ready.
    pub ready_replicas: i32,
    /// `<ready>/<replicas>`, for `kubectl get`.
    pub members: String,
}

/// One node's configuration result, as its agent reported it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeResult {
    /// Node name.
    pub name: String,
    pub state: NodeState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the agent last wrote this entry (RFC 3339); only in entries written by
    /// agents of earlier versions (the aggregated list has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<String>,
}

/// Where a node is in its configuration.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum NodeState {
    /// hosts.toml written for every host and containerd reads it.
    Configured,
    /// Files written but containerd will not read them (e.g. `config_path` unset).
    NotEffective,
    /// A file the agent did not write is in the way.
    Conflict,
    /// Writing failed.
    Failed,
    /// The mirror is being deleted and this node's files are gone.
    Removed,
    /// Selected, but the node's agent has not reported on this mirror yet
    /// (set by the operator, never by an agent).
    Pending,
}

impl Upstream {
    /// The URL the cache fetches from and nodes fall back to: `url` without a
    /// trailing slash, else the host's default
    /// ([`regmirror_registry::known::default_url`]).
    pub fn effective_url(&self) -> String {
        match &self.url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => regmirror_registry::known::default_url(&self.host),
        }
    }
}

/// The CRD as YAML, as checked in at `crds/registrymirror.yaml`.
pub fn crd_yaml() -> String {
    generated_yaml::<RegistryMirror>("regmirror-operator crd")
}

/// `K`'s CRD as YAML with a header naming `command`, which prints it.
pub fn generated_yaml<K: CustomResourceExt>(command: &str) -> String {
    let yaml = serde_saphyr::to_string(&K::crd()).expect("CRD serializes");
    format!("# Generated by `{command}` (make crds): do not edit.\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn checked_in_crd_matches_the_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/registrymirror.yaml");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == crd_yaml(),
            "crds/registrymirror.yaml is out of date with operator/src/crd.rs: run `make crds`"
        );
    }

    #[test]
    fn minimal_spec_gets_defaults() {
        let m: RegistryMirror = serde_json::from_value(json!({
            "apiVersion": "regmirror.dev/v1alpha1",
            "kind": "RegistryMirror",
            "metadata": {"name": "hub"},
            "spec": {"upstreams": [{"host": "docker.io"}, {"host": "registry.local:5000", "url": "http://10.0.0.5:5000/"}]}
        }))
        .unwrap();
        assert_eq!(m.spec.storage.size, "20Gi");
        assert_eq!(m.spec.storage.access_mode, AccessMode::ReadWriteOnce);
        assert_eq!(m.spec.cache.replicas, 1);
        assert_eq!(m.spec.cache.port, 5000);
        assert_eq!(
            m.spec.nodes.containerd_config_dir,
            "/etc/containerd/certs.d"
        );
        assert_eq!(
            m.spec.upstreams[0].effective_url(),
            "https://registry-1.docker.io"
        );
        assert_eq!(m.spec.upstreams[1].effective_url(), "http://10.0.0.5:5000");
    }

    #[test]
    fn url_description_names_every_well_known_registry() {
        let crd = serde_json::to_value(RegistryMirror::crd()).unwrap();
        let url = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["upstreams"]["items"]["properties"]["url"]["description"];
        let text = url.as_str().unwrap();
        for k in regmirror_registry::known::KNOWN_REGISTRIES {
            assert!(text.contains(k.host), "url's description lacks {}", k.host);
            if k.url != format!("https://{}", k.host) {
                assert!(text.contains(k.url), "url's description lacks {}", k.url);
            }
        }
    }

    #[test]
    fn schema_carries_validation_and_list_maps() {
        let crd = serde_json::to_value(RegistryMirror::crd()).unwrap();
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], "v1alpha1");
        assert_eq!(crd["spec"]["scope"], "Cluster");
        assert_eq!(v["subresources"]["status"], json!({}));
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let ups = &spec["properties"]["upstreams"];
        assert_eq!(ups["x-kubernetes-list-type"], "map");
        assert_eq!(ups["x-kubernetes-list-map-keys"], json!(["host"]));
        let text = serde_json::to_string(spec).unwrap();
        for needle in [
            "host must be a lowercase registry host name",
            "url must be http:// or https://",
            "size must be a quantity",
            "replicas must be from 1 to 16 cache members",
            "maxSize must be a quantity such as 500Mi, 18Gi or 1Ti: the budget of all cache members together",
        ] {
            assert!(text.contains(needle), "schema lacks {needle:?}");
        }
        let status = &v["schema"]["openAPIV3Schema"]["properties"]["status"];
        assert_eq!(
            status["properties"]["conditions"]["x-kubernetes-list-map-keys"],
            json!(["type"])
        );
        let cols: Vec<_> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            cols,
            [
                "Ready",
                "Reason",
                "Upstreams",
                "Endpoint",
                "Members",
                "Nodes",
                "Age"
            ]
        );
    }
}
