//! `RegistryMirrorNode` (`regmirror.dev/v1alpha1`, cluster-scoped): one per
//! node, named after it, written only by that node's agent. It holds the
//! node's result for every mirror the agent configures there, so a report
//! touches one small object of the node's own (as `CSINode` does for CSI
//! drivers) instead of every mirror's status (issue 17: with a status entry
//! per node on the mirror, every report woke every agent: N² requests).
//!
//! The operator reads these objects (one watch) and aggregates counts and
//! per-node summaries into each mirror's status at a bounded rate. Each
//! object is owned by its Node, so the garbage collector deletes it with the
//! node.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::NodeState;

/// One node's container runtime configuration for every RegistryMirror,
/// as its node agent last found it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "regmirror.dev",
    version = "v1alpha1",
    kind = "RegistryMirrorNode",
    plural = "registrymirrornodes",
    shortname = "rmnode",
    category = "regmirror",
    status = "RegistryMirrorNodeStatus",
    derive = "PartialEq",
    doc = "One node's container runtime configuration for every RegistryMirror, written by the regmirror node agent on that node.",
    printcolumn = r#"{"name":"Mirrors","type":"string","description":"The mirrors this node is configured for, and their state","jsonPath":".status.summary"}"#,
    printcolumn = r#"{"name":"Updated","type":"date","jsonPath":".status.lastUpdate"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RegistryMirrorNodeSpec {
    /// The Node this object reports on (also its name).
    pub node_name: String,
}

/// What the agent found and did on its node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryMirrorNodeStatus {
    /// One entry per mirror that has (or, while it is being deleted, had)
    /// configuration on this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["mirror".into()]))]
    pub mirrors: Vec<MirrorOnNode>,
    /// `hub=Configured,quay=Conflict`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// When the agent last wrote this status (RFC 3339); a heartbeat,
    /// rewritten every few minutes even without a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<String>,
}

/// One mirror's result on the node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirrorOnNode {
    /// The RegistryMirror's name.
    pub mirror: String,
    /// The RegistryMirror's uid, so a mirror deleted and created again under
    /// the same name does not inherit the old one's results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub state: NodeState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The registry configuration directory on the node that holds this
    /// mirror's files (`spec.nodes.containerdConfigDir` when written), so the
    /// agent can find them again after the mirror is gone.
    pub config_dir: String,
    /// Registry hosts whose `hosts.toml` on this node points at the cache.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

impl RegistryMirrorNodeStatus {
    /// This node's entry for `mirror` (name and, when given, uid).
    pub fn entry(&self, mirror: &str, uid: Option<&str>) -> Option<&MirrorOnNode> {
        self.mirrors.iter().find(|e| {
            e.mirror == mirror && (uid.is_none() || e.uid.is_none() || e.uid.as_deref() == uid)
        })
    }
}

/// The CRD as YAML, as checked in at `crds/registrymirrornode.yaml`.
pub fn crd_yaml() -> String {
    crate::crd::generated_yaml::<RegistryMirrorNode>("regmirror-operator crd --node")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_crd_matches_the_types() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../crds/registrymirrornode.yaml"
        );
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == crd_yaml(),
            "crds/registrymirrornode.yaml is out of date with operator/src/node_report.rs: run `make crds`"
        );
    }

    #[test]
    fn entries_match_by_name_and_uid() {
        let e = |uid: Option<&str>| MirrorOnNode {
            mirror: "hub".into(),
            uid: uid.map(str::to_owned),
            state: NodeState::Configured,
            message: None,
            config_dir: "/etc/containerd/certs.d".into(),
            hosts: vec!["docker.io".into()],
        };
        let s = RegistryMirrorNodeStatus {
            mirrors: vec![e(Some("u1"))],
            ..Default::default()
        };
        assert!(s.entry("hub", Some("u1")).is_some());
        assert!(s.entry("hub", None).is_some());
        assert!(s.entry("hub", Some("u2")).is_none());
        assert!(s.entry("quay", None).is_none());
    }
}
