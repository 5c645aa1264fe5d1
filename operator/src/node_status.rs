//! Pure aggregation of the nodes' reports into a mirror's status (issue 17):
//! which existing nodes a mirror selects, which of them its node agent
//! reports Configured, the per-node summaries of `status.nodes`, which nodes
//! deletion waits for, and which changes of a report or a Node are worth a
//! reconcile. The stores the inputs come from are filled by
//! [`crate::node_watch`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;

use crate::crd::{NodeResult, NodeState, RegistryMirror};
use crate::node_report::{MirrorOnNode, RegistryMirrorNode};
use crate::selection;
use crate::status::{Problem, reason};

/// Most entries written to a mirror's `status.nodes` (problems first): the
/// status of a mirror on thousands of nodes stays small; the counts cover
/// every node.
pub const MAX_NODE_ENTRIES: usize = 100;

/// What the reports say about one mirror on the nodes it selects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodesSummary {
    /// Existing Nodes the mirror selects ([`selection::selects`]).
    pub desired: i32,
    /// Those whose agent reports the mirror (name and uid) `Configured`.
    pub configured: i32,
    /// One entry per selected node, problems first then by name, at most
    /// [`MAX_NODE_ENTRIES`]; `Pending` for a node without an entry for
    /// the mirror. No `lastUpdate` (heartbeats are not status changes).
    pub nodes: Vec<NodeResult>,
    /// Selected nodes whose report has no entry for the mirror yet (sorted):
    /// the nodes the shared agent has not taken over.
    pub unreported: Vec<String>,
}

/// The reports by node name (a RegistryMirrorNode is named after its node),
/// so a summary takes one pass over nodes and reports however many there are.
fn by_node(
    reports: &[std::sync::Arc<RegistryMirrorNode>],
) -> BTreeMap<String, &RegistryMirrorNode> {
    reports.iter().map(|r| (r.name_any(), r.as_ref())).collect()
}

/// `node`'s entry for `mirror` (name, and uid when both have one).
fn entry_for<'a>(
    mirror: &RegistryMirror,
    node: &str,
    reports: &BTreeMap<String, &'a RegistryMirrorNode>,
) -> Option<&'a MirrorOnNode> {
    reports
        .get(node)?
        .status
        .as_ref()?
        .entry(&mirror.name_any(), mirror.metadata.uid.as_deref())
}

/// Order of states in `status.nodes`: what needs attention first.
fn rank(state: NodeState) -> u8 {
    match state {
        NodeState::Failed => 0,
        NodeState::Conflict => 1,
        NodeState::NotEffective => 2,
        NodeState::Pending => 3,
        NodeState::Removed => 4,
        NodeState::Configured => 5,
    }
}

/// The summary of `mirror` from every existing Node and every report.
/// Reports of nodes that do not exist or that the mirror does not select
/// count for nothing.
pub fn summarize(
    mirror: &RegistryMirror,
    nodes: &[std::sync::Arc<Node>],
    reports: &[std::sync::Arc<RegistryMirrorNode>],
) -> NodesSummary {
    let reports = by_node(reports);
    let mut entries: Vec<NodeResult> = Vec::new();
    let mut unreported = Vec::new();
    for node in nodes
        .iter()
        .filter(|n| selection::selects(&mirror.spec.nodes, n))
    {
        let name = node.name_any();
        let entry = match entry_for(mirror, &name, &reports) {
            Some(e) => NodeResult {
                name,
                state: e.state,
                message: e.message.clone(),
                last_update: None,
            },
            None => {
                unreported.push(name.clone());
                NodeResult {
                    name,
                    state: NodeState::Pending,
                    message: Some("no report from the node agent on this node yet".into()),
                    last_update: None,
                }
            }
        };
        entries.push(entry);
    }
    let desired = entries.len() as i32;
    let configured = entries
        .iter()
        .filter(|e| e.state == NodeState::Configured)
        .count() as i32;
    entries.sort_by(|a, b| (rank(a.state), &a.name).cmp(&(rank(b.state), &b.name)));
    entries.truncate(MAX_NODE_ENTRIES);
    unreported.sort();
    NodesSummary {
        desired,
        configured,
        nodes: entries,
        unreported,
    }
}

/// Existing nodes whose agent still reports configuration of `mirror`
/// (an entry, name and uid, not `Removed`), sorted: what deletion waits
/// for. Nodes that are gone, and nodes whose agent never reported the
/// mirror, are not waited for.
pub fn cleanup_pending(
    mirror: &RegistryMirror,
    nodes: &[std::sync::Arc<Node>],
    reports: &[std::sync::Arc<RegistryMirrorNode>],
) -> Vec<String> {
    let reports = by_node(reports);
    let mut names: Vec<String> = nodes
        .iter()
        .map(|n| n.name_any())
        .filter(|n| entry_for(mirror, n, &reports).is_some_and(|e| e.state != NodeState::Removed))
        .collect();
    names.sort();
    names
}

/// `names` for a message: the first five, then how many more.
pub fn name_list(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

/// Why the installer's settings refuse `mirror`'s node configuration, if
/// they do (issue 17: creating a RegistryMirror must not be root on every
/// node): its `containerdConfigDir` or `containerdConfigFile` outside
/// `allowed_dirs` (the chart's `agent.hostDirs`, [`selection::within_allowed`]),
/// or an `agentImage` other than `agent_image` (the chart's `agent.image`).
/// The node agents refuse such a mirror on their own as well.
pub fn refusal(
    mirror: &RegistryMirror,
    allowed_dirs: &[String],
    agent_image: &str,
) -> Option<Problem> {
    let nodes = &mirror.spec.nodes;
    let outside: Vec<String> = [
        ("containerdConfigDir", &nodes.containerd_config_dir),
        ("containerdConfigFile", &nodes.containerd_config_file),
    ]
    .into_iter()
    .filter(|(_, p)| !selection::within_allowed(p, allowed_dirs))
    .map(|(field, p)| format!("spec.nodes.{field} {p:?}"))
    .collect();
    if !outside.is_empty() {
        return Some(Problem {
            reason: reason::CONFIG_DIR_NOT_ALLOWED,
            message: format!(
                "{} {} not inside the directories the node agents may use ({}); the installer sets them (Helm chart value agent.hostDirs, operator flag --agent-host-dirs): use a path inside them or ask the installer to add one",
                outside.join(" and "),
                if outside.len() > 1 { "are" } else { "is" },
                allowed_dirs.join(", ")
            ),
        });
    }
    match nodes.agent_image.as_deref() {
        Some(image) if image != agent_image => Some(Problem {
            reason: reason::AGENT_IMAGE_NOT_ALLOWED,
            message: format!(
                "spec.nodes.agentImage {image:?} is not the installed node agent image {agent_image:?}; the installer sets it (Helm chart value agent.image): remove spec.nodes.agentImage"
            ),
        }),
        _ => None,
    }
}

/// Mirrors whose entry differs between two versions of one node's report
/// (`None`: no report), sorted: what a change of the report is worth a
/// reconcile for. A heartbeat (only `lastUpdate` or the summary changed)
/// yields none.
pub fn changed_entries(
    old: Option<&RegistryMirrorNode>,
    new: Option<&RegistryMirrorNode>,
) -> Vec<String> {
    let entries = |r: Option<&RegistryMirrorNode>| -> BTreeMap<String, MirrorOnNode> {
        r.and_then(|r| r.status.as_ref())
            .map(|s| {
                s.mirrors
                    .iter()
                    .map(|e| (e.mirror.clone(), e.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (old, new) = (entries(old), entries(new));
    let mut changed: Vec<String> = old
        .keys()
        .chain(new.keys())
        .filter(|m| old.get(*m) != new.get(*m))
        .cloned()
        .collect();
    changed.sort();
    changed.dedup();
    changed
}

/// Whether a Node changed in what [`selection::selects`] reads (it came,
/// went, or its labels or taints changed): status and heartbeat updates are
/// not worth a reconcile.
pub fn selection_changed(old: Option<&Node>, new: Option<&Node>) -> bool {
    let key = |n: Option<&Node>| {
        n.map(|n| {
            (
                n.metadata.labels.clone(),
                n.spec.as_ref().and_then(|s| s.taints.clone()),
            )
        })
    };
    key(old) != key(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_report::RegistryMirrorNodeStatus;
    use serde_json::json;
    use std::sync::Arc;

    fn mirror(spec: serde_json::Value) -> RegistryMirror {
        let mut m = RegistryMirror::new("hub", serde_json::from_value(spec).unwrap());
        m.metadata.uid = Some("u1".into());
        m
    }

    fn hub() -> RegistryMirror {
        mirror(json!({"upstreams": [{"host": "docker.io"}]}))
    }

    fn node(name: &str, labels: serde_json::Value) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap(),
        )
    }

    fn entry(mirror: &str, uid: &str, state: NodeState) -> MirrorOnNode {
        MirrorOnNode {
            mirror: mirror.into(),
            uid: Some(uid.into()),
            state,
            message: (state != NodeState::Configured).then(|| format!("{state:?} here")),
            config_dir: "/etc/containerd/certs.d".into(),
            hosts: vec!["docker.io".into()],
        }
    }

    fn report(node: &str, entries: Vec<MirrorOnNode>) -> Arc<RegistryMirrorNode> {
        let mut r = RegistryMirrorNode::new(
            node,
            crate::node_report::RegistryMirrorNodeSpec {
                node_name: node.into(),
            },
        );
        r.status = Some(RegistryMirrorNodeStatus {
            mirrors: entries,
            summary: None,
            last_update: Some("2026-01-01T00:00:00Z".into()),
        });
        Arc::new(r)
    }

    #[test]
    fn only_existing_selected_nodes_count_and_unreported_ones_are_pending() {
        let nodes = [
            node("n1", json!({"pool": "a"})),
            node("n2", json!({"pool": "a"})),
            node("n3", json!({"pool": "a"})),
            node("n4", json!({"pool": "b"})),
        ];
        let reports = [
            report("n1", vec![entry("hub", "u1", NodeState::Configured)]),
            report("n2", vec![entry("hub", "u1", NodeState::NotEffective)]),
            // Not selected, and a node that no longer exists: ignored.
            report("n4", vec![entry("hub", "u1", NodeState::Configured)]),
            report("gone", vec![entry("hub", "u1", NodeState::Configured)]),
        ];
        let m = mirror(
            json!({"upstreams": [{"host": "docker.io"}], "nodes": {"nodeSelector": {"pool": "a"}}}),
        );
        let s = summarize(&m, &nodes, &reports);
        assert_eq!((s.desired, s.configured), (3, 1));
        let listed: Vec<(&str, NodeState)> =
            s.nodes.iter().map(|n| (n.name.as_str(), n.state)).collect();
        assert_eq!(
            listed,
            [
                ("n2", NodeState::NotEffective),
                ("n3", NodeState::Pending),
                ("n1", NodeState::Configured)
            ],
            "problems first"
        );
        assert!(s.nodes.iter().all(|n| n.last_update.is_none()));
        assert_eq!(s.unreported, ["n3"]);

        // Without reports nothing is configured, whatever runs.
        let s = summarize(&hub(), &nodes, &[]);
        assert_eq!((s.desired, s.configured), (4, 0));
        assert!(s.nodes.iter().all(|n| n.state == NodeState::Pending));
    }

    #[test]
    fn an_entry_of_an_older_mirror_of_the_same_name_does_not_count() {
        let nodes = [node("n1", json!({}))];
        let reports = [report(
            "n1",
            vec![entry("hub", "old-uid", NodeState::Configured)],
        )];
        let s = summarize(&hub(), &nodes, &reports);
        assert_eq!((s.desired, s.configured), (1, 0));
        assert_eq!(s.nodes[0].state, NodeState::Pending);
        assert!(cleanup_pending(&hub(), &nodes, &reports).is_empty());
    }

    #[test]
    fn the_status_lists_at_most_a_hundred_nodes_problems_first() {
        let nodes: Vec<Arc<Node>> = (0..150)
            .map(|i| node(&format!("n{i:03}"), json!({})))
            .collect();
        let reports: Vec<Arc<RegistryMirrorNode>> = (0..150)
            .map(|i| {
                let state = if i == 149 {
                    NodeState::Failed
                } else {
                    NodeState::Configured
                };
                report(&format!("n{i:03}"), vec![entry("hub", "u1", state)])
            })
            .collect();
        let s = summarize(&hub(), &nodes, &reports);
        assert_eq!((s.desired, s.configured), (150, 149));
        assert_eq!(s.nodes.len(), MAX_NODE_ENTRIES);
        assert_eq!(s.nodes[0].name, "n149");
    }

    #[test]
    fn deletion_waits_for_existing_nodes_not_yet_removed() {
        let nodes = [
            node("n1", json!({})),
            node("n2", json!({})),
            node("n3", json!({})),
        ];
        let reports = [
            report("n1", vec![entry("hub", "u1", NodeState::Removed)]),
            report("n2", vec![entry("hub", "u1", NodeState::Configured)]),
            report("n3", vec![entry("quay", "u9", NodeState::Configured)]),
            report("gone", vec![entry("hub", "u1", NodeState::Failed)]),
        ];
        assert_eq!(cleanup_pending(&hub(), &nodes, &reports), ["n2"]);
        assert!(cleanup_pending(&hub(), &nodes[..1], &reports).is_empty());
    }

    #[test]
    fn the_installer_decides_directories_and_image() {
        let allowed = vec!["/etc/containerd".to_owned()];
        let image = "ghcr.io/regmirror/regmirror-operator:1";
        assert_eq!(refusal(&hub(), &allowed, image), None);
        let root = mirror(
            json!({"upstreams": [{"host": "docker.io"}], "nodes": {"containerdConfigDir": "/"}}),
        );
        let p = refusal(&root, &allowed, image).unwrap();
        assert_eq!(p.reason, reason::CONFIG_DIR_NOT_ALLOWED);
        assert!(
            p.message.contains("spec.nodes.containerdConfigDir \"/\"")
                && p.message.contains("/etc/containerd")
                && p.message.contains("agent.hostDirs"),
            "{}",
            p.message
        );
        let file = mirror(
            json!({"upstreams": [{"host": "docker.io"}], "nodes": {"containerdConfigFile": "/etc/shadow"}}),
        );
        assert_eq!(
            refusal(&file, &allowed, image).unwrap().reason,
            reason::CONFIG_DIR_NOT_ALLOWED
        );
        let foreign = mirror(
            json!({"upstreams": [{"host": "docker.io"}], "nodes": {"agentImage": "attacker.example/anything:latest"}}),
        );
        let p = refusal(&foreign, &allowed, image).unwrap();
        assert_eq!(p.reason, reason::AGENT_IMAGE_NOT_ALLOWED);
        assert!(
            p.message.contains(image) && p.message.contains("agent.image"),
            "{}",
            p.message
        );
        let same =
            mirror(json!({"upstreams": [{"host": "docker.io"}], "nodes": {"agentImage": image}}));
        assert_eq!(refusal(&same, &allowed, image), None);
    }

    #[test]
    fn heartbeats_trigger_nothing_entry_changes_name_their_mirror() {
        let a = report(
            "n1",
            vec![
                entry("hub", "u1", NodeState::Configured),
                entry("quay", "u2", NodeState::Configured),
            ],
        );
        let mut beat = (*a).clone();
        beat.status.as_mut().unwrap().last_update = Some("2026-01-01T00:05:00Z".into());
        beat.status.as_mut().unwrap().summary = Some("hub=Configured".into());
        assert!(changed_entries(Some(&a), Some(&beat)).is_empty());
        let mut quay_failed = (*a).clone();
        quay_failed.status.as_mut().unwrap().mirrors[1].state = NodeState::Failed;
        assert_eq!(changed_entries(Some(&a), Some(&quay_failed)), ["quay"]);
        assert_eq!(changed_entries(None, Some(&a)), ["hub", "quay"]);
        assert_eq!(changed_entries(Some(&a), None), ["hub", "quay"]);
    }

    #[test]
    fn only_labels_taints_and_existence_of_nodes_matter() {
        let n = node("n1", json!({"pool": "a"}));
        let mut heartbeat = (*n).clone();
        heartbeat.metadata.resource_version = Some("2".into());
        assert!(!selection_changed(Some(&n), Some(&heartbeat)));
        let relabelled = node("n1", json!({"pool": "b"}));
        assert!(selection_changed(Some(&n), Some(&relabelled)));
        let mut tainted = (*n).clone();
        tainted.spec = Some(
            serde_json::from_value(json!({"taints": [{"key": "k", "effect": "NoSchedule"}]}))
                .unwrap(),
        );
        assert!(selection_changed(Some(&n), Some(&tainted)));
        assert!(selection_changed(None, Some(&n)) && selection_changed(Some(&n), None));
    }

    #[test]
    fn long_name_lists_are_cut() {
        let names: Vec<String> = (1..=7).map(|i| format!("n{i}")).collect();
        assert_eq!(name_list(&names), "n1, n2, n3, n4, n5 and 2 more");
        assert_eq!(name_list(&names[..2]), "n1, n2");
    }
}
