//! Which nodes a RegistryMirror configures: one pure rule, used by the node
//! agent (does this node want the mirror's files?) and by the operator
//! (which nodes count for `nodesDesired`, and which deletion waits for).

use k8s_openapi::api::core::v1::{Node, Taint, Toleration};

use crate::crd::NodesSpec;

/// Whether `spec` selects `node`: every `nodeSelector` label matches, and
/// when `tolerations` is set, every `NoSchedule`/`NoExecute` taint of the
/// node is tolerated (as the scheduler would decide for a pod with those
/// tolerations). Unset tolerations select tainted nodes too (the default:
/// control-plane nodes pull images as well). `PreferNoSchedule` taints never
/// exclude a node, as they never keep a pod off one, and neither does a
/// cordon's `node.kubernetes.io/unschedulable` (the DaemonSet controller
/// tolerates it for its pods too): a node being drained keeps pulling
/// through the cache, and its files stay.
pub fn selects(spec: &NodesSpec, node: &Node) -> bool {
    let labels = node.metadata.labels.as_ref();
    let labels_match = spec
        .node_selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
    if !labels_match {
        return false;
    }
    let Some(tolerations) = &spec.tolerations else {
        return true;
    };
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect != "PreferNoSchedule" && t.key != UNSCHEDULABLE_TAINT)
        .all(|t| tolerations.iter().any(|tol| tolerates(tol, t)))
}

/// The taint `kubectl cordon` puts on a node (with effect `NoSchedule`).
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// Kubernetes' `Toleration.ToleratesTaint` (k8s.io/api core/v1
/// toleration.go): an empty key with `Exists` matches every taint; an empty
/// effect matches every effect; `Equal` (the default operator) compares values.
pub fn tolerates(tol: &Toleration, taint: &Taint) -> bool {
    let effect_ok = tol
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    if !effect_ok {
        return false;
    }
    let key = tol.key.as_deref().unwrap_or_default();
    if key.is_empty() {
        return tol.operator.as_deref() == Some("Exists");
    }
    if key != taint.key {
        return false;
    }
    match tol.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "Equal" | "" => {
            tol.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

/// Whether `path` (a node path, e.g. a mirror's `containerdConfigDir`) is
/// one of `allowed` or inside one, compared by whole path components (so
/// `/etc/containerd-evil` is not inside `/etc/containerd`). The installer
/// sets `allowed` (chart `agent.hostDirs`, the directories the agent
/// DaemonSet mounts); a mirror can only choose among them (issue 17: a mirror
/// asking for `/` must not get the node's root). Relative paths and paths
/// with `.`/`..` components are never allowed.
pub fn within_allowed(path: &str, allowed: &[String]) -> bool {
    let parts = |p: &str| -> Option<Vec<String>> {
        if !p.starts_with('/') {
            return None;
        }
        let v: Vec<String> = p
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        (!v.iter().any(|c| c == "." || c == "..")).then_some(v)
    };
    let Some(want) = parts(path) else {
        return false;
    };
    allowed
        .iter()
        .filter_map(|a| parts(a))
        .any(|root| want.len() >= root.len() && want[..root.len()] == root[..])
}

/// Where this process sees the node path `node_path`: under `host_root`
/// (`/host` in the agent's pod, `/` when run directly on a node).
pub fn seen_at(host_root: &std::path::Path, node_path: &str) -> std::path::PathBuf {
    host_root.join(node_path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_paths_inside_the_installers_directories_are_allowed() {
        let allowed = vec![
            "/etc/containerd".to_owned(),
            "/var/lib/rancher/k3s/agent/etc/containerd/".to_owned(),
        ];
        assert!(within_allowed("/etc/containerd", &allowed));
        assert!(within_allowed("/etc/containerd/certs.d", &allowed));
        assert!(within_allowed("/etc/containerd/certs.d/", &allowed));
        assert!(within_allowed(
            "/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
            &allowed
        ));
        for bad in [
            "/",
            "/etc",
            "/etc/containerd-evil",
            "/etc/containerd/../shadow",
            "etc/containerd",
            "/etc/containerd/./x",
            "",
        ] {
            assert!(!within_allowed(bad, &allowed), "{bad}");
        }
        assert!(!within_allowed("/etc/containerd", &[]));
        assert!(
            within_allowed("/anything", &["/".to_owned()]),
            "an installer may allow everything"
        );
    }

    #[test]
    fn node_paths_are_seen_under_the_host_root() {
        use std::path::Path;
        assert_eq!(
            seen_at(Path::new("/host"), "/etc/containerd/certs.d"),
            Path::new("/host/etc/containerd/certs.d")
        );
        assert_eq!(
            seen_at(Path::new("/"), "/etc/containerd"),
            Path::new("/etc/containerd")
        );
    }

    fn node(labels: serde_json::Value, taints: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n", "labels": labels},
            "spec": {"taints": taints},
        }))
        .unwrap()
    }

    fn spec(v: serde_json::Value) -> NodesSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_node_selector_must_match_every_label() {
        let n = node(json!({"pool": "gpu", "zone": "a"}), json!([]));
        assert!(selects(&spec(json!({})), &n));
        assert!(selects(&spec(json!({"nodeSelector": {"pool": "gpu"}})), &n));
        assert!(!selects(
            &spec(json!({"nodeSelector": {"pool": "cpu"}})),
            &n
        ));
        assert!(!selects(
            &spec(json!({"nodeSelector": {"pool": "gpu", "x": "y"}})),
            &n
        ));
    }

    #[test]
    fn tolerations_filter_tainted_nodes_only_when_set() {
        let cp = node(
            json!({}),
            json!([{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"},
                   {"key": "soft", "effect": "PreferNoSchedule"}]),
        );
        assert!(
            selects(&spec(json!({})), &cp),
            "unset tolerations select every node"
        );
        assert!(!selects(&spec(json!({"tolerations": []})), &cp));
        assert!(selects(
            &spec(
                json!({"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]})
            ),
            &cp
        ));
        assert!(selects(
            &spec(json!({"tolerations": [{"operator": "Exists"}]})),
            &cp
        ));
        let cordoned = node(
            json!({}),
            json!([{"key": UNSCHEDULABLE_TAINT, "effect": "NoSchedule"}]),
        );
        assert!(
            selects(&spec(json!({"tolerations": []})), &cordoned),
            "a cordon does not unconfigure a node"
        );
        assert!(!selects(
            &spec(
                json!({"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoExecute"}]})
            ),
            &cp
        ));
    }

    #[test]
    fn equal_compares_values() {
        let t: Taint =
            serde_json::from_value(json!({"key": "k", "value": "v", "effect": "NoSchedule"}))
                .unwrap();
        let tol = |v: serde_json::Value| -> Toleration { serde_json::from_value(v).unwrap() };
        assert!(tolerates(&tol(json!({"key": "k", "value": "v"})), &t));
        assert!(tolerates(
            &tol(json!({"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedule"})),
            &t
        ));
        assert!(!tolerates(&tol(json!({"key": "k", "value": "w"})), &t));
        assert!(!tolerates(
            &tol(json!({"key": "j", "operator": "Exists"})),
            &t
        ));
    }
}
