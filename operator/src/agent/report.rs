//! The node agent's report: its node's `RegistryMirrorNode` (issue 17: one
//! small object per node instead of an entry in every mirror's status, so a
//! report wakes no other agent). Read once at start, created when missing
//! (owned by the Node, so it goes with it), its status server-side applied
//! only when the entries changed or the heartbeat is due.

use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::Resource as _;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::plan::summary;
use crate::node_report::{MirrorOnNode, RegistryMirrorNode, RegistryMirrorNodeSpec};

/// The field manager of every agent's status apply (each agent writes only
/// its own node's object, so one name is enough).
pub const FIELD_MANAGER: &str = "regmirror-agent";

/// The last report written: its entries and when.
pub type Written = (Vec<MirrorOnNode>, Instant);

/// Whether `entries` are to be written at `now`: nothing written yet, the
/// entries changed, or `heartbeat` elapsed since `last` was written.
pub fn due(
    last: Option<&Written>,
    entries: &[MirrorOnNode],
    now: Instant,
    heartbeat: Duration,
) -> bool {
    last.is_none_or(|(e, at)| e != entries || now.saturating_duration_since(*at) >= heartbeat)
}

/// The node's object as the agent creates it: named after the node, owned
/// by the Node `uid` (garbage-collected with it), `spec.nodeName` set.
pub fn object(node: &str, uid: &str) -> RegistryMirrorNode {
    let mut o = RegistryMirrorNode::new(
        node,
        RegistryMirrorNodeSpec {
            node_name: node.to_owned(),
        },
    );
    o.meta_mut().owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.to_owned(),
        uid: uid.to_owned(),
        ..Default::default()
    }]);
    o
}

/// The previous entries of `node`'s object, `None` when it does not exist.
pub async fn read(
    api: &Api<RegistryMirrorNode>,
    node: &str,
) -> kube::Result<Option<Vec<MirrorOnNode>>> {
    Ok(api
        .get_opt(node)
        .await?
        .map(|o| o.status.map(|s| s.mirrors).unwrap_or_default()))
}

/// Creates `node`'s object, or makes an existing one owned by the Node
/// `uid` (server-side apply of its metadata and spec): a Node deleted and
/// created again under the same name has a new uid, and an object still
/// owned by the old one would be garbage-collected under the agent.
pub async fn adopt(api: &Api<RegistryMirrorNode>, node: &str, uid: &str) -> kube::Result<()> {
    api.patch(
        node,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&object(node, uid)),
    )
    .await
    .map(drop)
}

/// Server-side applies `entries` (with their summary and a `lastUpdate`
/// heartbeat) as `node`'s status; entries left out are removed, as this
/// field manager owned them. A 404 means the object is gone.
pub async fn write(
    api: &Api<RegistryMirrorNode>,
    node: &str,
    entries: &[MirrorOnNode],
) -> kube::Result<()> {
    let patch = json!({
        "apiVersion": RegistryMirrorNode::api_version(&()),
        "kind": RegistryMirrorNode::kind(&()),
        "metadata": {"name": node},
        "status": {
            "mirrors": entries,
            "summary": summary(entries),
            "lastUpdate": Timestamp::now().to_string(),
        },
    });
    api.patch_status(
        node,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

/// Whether `e` says the object is not there (deleted with its Node, or by hand).
pub fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::NodeState;

    fn entry(state: NodeState) -> MirrorOnNode {
        MirrorOnNode {
            mirror: "hub".into(),
            uid: Some("u".into()),
            state,
            message: None,
            config_dir: "/etc/containerd/certs.d".into(),
            hosts: vec![],
        }
    }

    #[test]
    fn a_report_is_due_first_on_change_and_on_heartbeat_only() {
        let t0 = Instant::now();
        let hb = Duration::from_secs(300);
        let e = vec![entry(NodeState::Configured)];
        assert!(due(None, &e, t0, hb));
        let last = (e.clone(), t0);
        assert!(!due(Some(&last), &e, t0 + Duration::from_secs(299), hb));
        assert!(due(Some(&last), &e, t0 + hb, hb));
        assert!(due(Some(&last), &[entry(NodeState::Conflict)], t0, hb));
        assert!(due(Some(&last), &[], t0, hb));
    }

    #[test]
    fn the_object_is_named_after_and_owned_by_its_node() {
        let o = object("node-1", "uid-1");
        assert_eq!(o.metadata.name.as_deref(), Some("node-1"));
        assert_eq!(o.spec.node_name, "node-1");
        let owner = &o.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Node", "node-1", "uid-1")
        );
    }
}
