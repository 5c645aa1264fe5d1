//! The node agent's decisions, as pure functions of what it watches (every
//! RegistryMirror, its own Node) and what it found on disk: which files each
//! mirror wants on this node, which marked files go, what the node reports
//! and whether it is reconciled (issue 17: one agent per node reconciles the
//! node to exactly the desired set).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt as _;
use regmirror_node::{Detection, HostReport, HostState, HostsToml, MergeMode};
use serde_json::{Value, json};

use crate::crd::{DEFAULT_CONTAINERD_CONFIG_DIR, NodeState, RegistryMirror};
use crate::node_report::MirrorOnNode;
use crate::selection::{selects, within_allowed};

/// How long containerd waits to connect to the cache before trying the next host.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(1);

/// What one mirror wants on this node.
#[derive(Debug, Clone, PartialEq)]
pub enum Want {
    /// `files` in `dir`, with containerd's configuration read from
    /// `config_file` (both node paths, within the allowed directories).
    Files {
        config_file: String,
        files: Vec<HostsToml>,
        merge: MergeMode,
    },
    /// Selected, but the operator has not published the hosts or the
    /// NodePort yet: nothing is written (reported `NotEffective`).
    Waiting(String),
    /// `containerdConfigDir` or `containerdConfigFile` is outside the
    /// installer's directories: nothing is written (reported `Failed`).
    Refused(String),
    /// Being deleted: its files go; reported `Removed` once they are gone.
    Deleting,
    /// Does not select this node: its files go; reported only while that fails.
    NotSelected,
}

/// One mirror's plan for this node.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorPlan {
    /// The mirror's name: the owner named in its files' marker.
    pub name: String,
    pub uid: Option<String>,
    /// `spec.nodes.containerdConfigDir` (a node path), without trailing `/`.
    pub config_dir: String,
    /// Whether the mirror selects this node (also while it is being deleted).
    pub selected: bool,
    pub want: Want,
}

/// `dir` without trailing slashes (`/` stays `/`), so a mirror naming
/// `/etc/containerd/certs.d/` and a file found in `/etc/containerd/certs.d`
/// are the same directory.
pub fn normalized(dir: &str) -> String {
    let t = dir.trim_end_matches('/');
    if t.is_empty() && dir.starts_with('/') {
        "/".to_owned()
    } else {
        t.to_owned()
    }
}

/// The files this node should have for `mirror`, or why there are none yet
/// (the operator has not published `status.hosts`, or where the cache is
/// reached). Where the cache is reached follows what the operator applied,
/// never the live spec (a refused edit must not move nodes): the members'
/// `status.cacheAddresses` when it publishes them (`cache.hostNetwork`),
/// else `status.nodePort` on this node. `node_ip` is this node's address:
/// where containerd reaches the NodePort, or which host-network member is
/// this node's own (tried first: no network hop, and a node running a member
/// keeps pulling when others are unreachable).
pub fn desired(mirror: &RegistryMirror, node_ip: &str) -> Result<Vec<HostsToml>, String> {
    let status = mirror.status.as_ref();
    let hosts = status
        .and_then(|s| s.hosts.as_ref())
        .ok_or("waiting for the operator to publish the mirror's hosts")?;
    let addresses = status
        .and_then(|s| s.cache_addresses.as_ref())
        .filter(|a| !a.is_empty());
    let mirrors = match addresses {
        Some(addresses) => {
            let (mut urls, others): (Vec<&String>, Vec<&String>) = addresses
                .iter()
                .partition(|a| crate::status::address_host(a) == node_ip);
            urls.extend(others);
            urls.into_iter().map(|a| format!("http://{a}")).collect()
        }
        None => {
            let port = status
                .and_then(|s| s.node_port)
                .ok_or("waiting for the cache Service's NodePort")?;
            vec![format!("http://{}", crate::status::address(node_ip, port))]
        }
    };
    Ok(hosts
        .iter()
        .filter_map(|h| mirror.spec.upstreams.iter().find(|u| &u.host == h))
        .map(|u| HostsToml {
            registry: u.host.clone(),
            server: u.effective_url(),
            mirrors: mirrors.clone(),
            dial_timeout: DIAL_TIMEOUT,
            owner: mirror.name_any(),
        })
        .collect())
}

/// Why a mirror's node path `path` (its field `field`) is refused, or
/// `None` when it is within `allowed`.
fn refusal(field: &str, path: &str, allowed: &[String]) -> Option<String> {
    (!within_allowed(path, allowed)).then(|| {
        format!(
            "spec.nodes.{field} {path:?} is not within the directories the node agent may use ({}); the installer sets them (chart value agent.hostDirs)",
            allowed.join(", ")
        )
    })
}

/// What `mirror` wants on `node` (reached at `node_ip`), given the
/// installer's `allowed` directories. Deletion comes first (its files go
/// whatever the spec says), then selection, then the allowed directories,
/// then the published hosts.
pub fn plan(mirror: &RegistryMirror, node: &Node, node_ip: &str, allowed: &[String]) -> MirrorPlan {
    let nodes = &mirror.spec.nodes;
    let selected = selects(nodes, node);
    let want = if mirror.metadata.deletion_timestamp.is_some() {
        Want::Deleting
    } else if !selected {
        Want::NotSelected
    } else if let Some(why) = refusal("containerdConfigDir", &nodes.containerd_config_dir, allowed)
        .or_else(|| {
            refusal(
                "containerdConfigFile",
                &nodes.containerd_config_file,
                allowed,
            )
        })
    {
        Want::Refused(why)
    } else {
        match desired(mirror, node_ip) {
            Ok(files) => Want::Files {
                config_file: nodes.containerd_config_file.clone(),
                files,
                merge: if nodes.merge_existing {
                    MergeMode::KeepUserHosts
                } else {
                    MergeMode::Never
                },
            },
            Err(waiting) => Want::Waiting(waiting),
        }
    };
    MirrorPlan {
        name: mirror.name_any(),
        uid: mirror.uid(),
        config_dir: normalized(&nodes.containerd_config_dir),
        selected,
        want,
    }
}

/// The directories (node paths) whose marked files the agent reconciles:
/// every current mirror's `containerdConfigDir`, the directories of its
/// previous report's entries (`previous`: files of mirrors that are gone
/// since) and the default `/etc/containerd/certs.d`, each only when within
/// `allowed` (a directory the installer did not allow is never touched).
pub fn known_dirs<'a>(
    plans: &[MirrorPlan],
    previous: impl IntoIterator<Item = &'a str>,
    allowed: &[String],
) -> BTreeSet<String> {
    plans
        .iter()
        .map(|p| p.config_dir.clone())
        .chain(previous.into_iter().map(normalized))
        .chain([DEFAULT_CONTAINERD_CONFIG_DIR.to_owned()])
        .filter(|d| within_allowed(d, allowed))
        .collect()
}

/// The (directory, owner) pairs whose files go: every owner `found` in a
/// known directory, unless a mirror of that name writes files in that very
/// directory (then `apply` reconciles them). Deleted, deleting, de-selected,
/// refused, waiting and moved mirrors and orphans all end up here.
pub fn removals(
    found: &BTreeMap<String, Vec<String>>,
    plans: &[MirrorPlan],
) -> Vec<(String, String)> {
    let writes: BTreeSet<(&str, &str)> = plans
        .iter()
        .filter(|p| matches!(p.want, Want::Files { .. }))
        .map(|p| (p.config_dir.as_str(), p.name.as_str()))
        .collect();
    found
        .iter()
        .flat_map(|(dir, owners)| owners.iter().map(move |o| (dir, o)))
        .filter(|(dir, owner)| !writes.contains(&(dir.as_str(), owner.as_str())))
        .map(|(dir, owner)| (dir.clone(), owner.clone()))
        .collect()
}

/// What one pass did to the files.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Per mirror with [`Want::Files`]: the file results and containerd's detection.
    pub applied: BTreeMap<String, (Vec<HostReport>, Detection)>,
    /// Per removed (directory, owner): the file results.
    pub removed: Vec<(String, String, Vec<HostReport>)>,
}

impl Outcome {
    /// Whether every write and removal succeeded (issue 17's readiness:
    /// a conflict or a refused mirror is the user's configuration and does
    /// not make the agent unready; a failed file operation does).
    pub fn reconciled(&self) -> bool {
        let failed = |r: &HostReport| matches!(r.state, HostState::Failed(_));
        !self.applied.values().flat_map(|(r, _)| r).any(failed)
            && !self.removed.iter().flat_map(|(_, _, r)| r).any(failed)
    }

    /// Failure messages of removing `owner`'s files, with their registries.
    fn removal_failures(&self, owner: &str) -> Vec<String> {
        self.removed
            .iter()
            .filter(|(_, o, _)| o == owner)
            .flat_map(|(_, _, r)| r)
            .filter_map(|r| match &r.state {
                HostState::Failed(m) => Some(format!("{}: {m}", r.registry)),
                _ => None,
            })
            .collect()
    }
}

/// A node's state for one mirror from its file results and containerd's
/// configuration: failures first, then conflicts, then whether containerd
/// reads the files.
pub fn node_state(reports: &[HostReport], detection: &Detection) -> (NodeState, String) {
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
    (
        NodeState::Configured,
        format!(
            "pulls of {} go through the cache",
            configured(reports).join(", ")
        ),
    )
}

/// The registries whose file is in place.
fn configured(reports: &[HostReport]) -> Vec<String> {
    reports
        .iter()
        .filter(|r| matches!(r.state, HostState::Configured | HostState::Unchanged))
        .map(|r| r.registry.clone())
        .collect()
}

/// The entries of this node's report, sorted by mirror: every mirror that
/// selects the node (any state); mirrors being deleted that select it, had
/// an entry in the `previous` report, or had files removed (`Removed`, or
/// `Failed` while removal fails); any other owner only while removing its
/// files fails.
pub fn entries(
    plans: &[MirrorPlan],
    outcome: &Outcome,
    previous: &[MirrorOnNode],
) -> Vec<MirrorOnNode> {
    let mut out: BTreeMap<String, MirrorOnNode> = BTreeMap::new();
    let entry = |p: &MirrorPlan, state, message: String, hosts| MirrorOnNode {
        mirror: p.name.clone(),
        uid: p.uid.clone(),
        state,
        message: Some(message).filter(|m| !m.is_empty()),
        config_dir: p.config_dir.clone(),
        hosts,
    };
    for p in plans {
        let failures = outcome.removal_failures(&p.name);
        let e = match &p.want {
            Want::Files { .. } => {
                let (state, message, hosts) = match outcome.applied.get(&p.name) {
                    Some((reports, detection)) => {
                        let (s, m) = node_state(reports, detection);
                        (s, m, configured(reports))
                    }
                    None => (NodeState::Failed, "not applied".to_owned(), Vec::new()),
                };
                if failures.is_empty() {
                    entry(p, state, message, hosts)
                } else {
                    entry(p, NodeState::Failed, failures.join("; "), hosts)
                }
            }
            Want::Waiting(why) => entry(p, NodeState::NotEffective, why.clone(), Vec::new()),
            Want::Refused(why) => entry(p, NodeState::Failed, why.clone(), Vec::new()),
            Want::Deleting => {
                let had = p.selected
                    || previous.iter().any(|e| e.mirror == p.name)
                    || outcome.removed.iter().any(|(_, o, _)| *o == p.name);
                if !had {
                    continue;
                }
                if failures.is_empty() {
                    entry(
                        p,
                        NodeState::Removed,
                        "configuration removed".into(),
                        Vec::new(),
                    )
                } else {
                    entry(p, NodeState::Failed, failures.join("; "), Vec::new())
                }
            }
            Want::NotSelected if failures.is_empty() => continue,
            Want::NotSelected => entry(p, NodeState::Failed, failures.join("; "), Vec::new()),
        };
        out.insert(p.name.clone(), e);
    }
    for (dir, owner, _) in &outcome.removed {
        if out.contains_key(owner) {
            continue;
        }
        let failures = outcome.removal_failures(owner);
        if !failures.is_empty() {
            out.insert(
                owner.clone(),
                MirrorOnNode {
                    mirror: owner.clone(),
                    uid: None,
                    state: NodeState::Failed,
                    message: Some(failures.join("; ")),
                    config_dir: dir.clone(),
                    hosts: Vec::new(),
                },
            );
        }
    }
    out.into_values().collect()
}

/// `hub=Configured,quay=Conflict`, for `kubectl get`.
pub fn summary(entries: &[MirrorOnNode]) -> String {
    entries
        .iter()
        .map(|e| format!("{}={:?}", e.mirror, e.state))
        .collect::<Vec<_>>()
        .join(",")
}

/// What of a mirror the files depend on (issue 17: a status-only change by
/// the operator, such as its conditions, must not cause a pass): uid,
/// spec, published hosts, NodePort and host-network cache addresses, and
/// whether it is being deleted.
pub fn mirror_key(m: &RegistryMirror) -> Value {
    let status = m.status.as_ref();
    json!({
        "uid": m.metadata.uid,
        "spec": m.spec,
        "hosts": status.and_then(|s| s.hosts.as_ref()),
        "nodePort": status.and_then(|s| s.node_port),
        "cacheAddresses": status.and_then(|s| s.cache_addresses.as_ref()),
        "deleting": m.metadata.deletion_timestamp.is_some(),
    })
}

/// What of the Node selection depends on: uid, labels, taints (a kubelet's
/// status heartbeat changes none of them).
pub fn node_key(n: &Node) -> Value {
    json!({
        "uid": n.metadata.uid,
        "labels": n.metadata.labels,
        "taints": n.spec.as_ref().and_then(|s| s.taints.as_ref()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::RegistryMirrorStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn mirror(name: &str, spec: Value, status: Option<RegistryMirrorStatus>) -> RegistryMirror {
        let mut m = RegistryMirror::new(name, serde_json::from_value(spec).unwrap());
        m.metadata.uid = Some(format!("uid-{name}"));
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

    fn node(labels: Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "n1", "uid": "u", "labels": labels}}))
            .unwrap()
    }

    fn allowed() -> Vec<String> {
        vec!["/etc/containerd".to_owned()]
    }

    fn hub() -> RegistryMirror {
        mirror(
            "hub",
            json!({"upstreams": [{"host": "docker.io"}]}),
            published(&["docker.io"], 30001),
        )
    }

    fn report(registry: &str, state: HostState) -> HostReport {
        HostReport {
            registry: registry.into(),
            state,
        }
    }

    fn reads() -> Detection {
        regmirror_node::inspect(
            Some(
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n",
            ),
            "/etc/containerd/certs.d",
        )
    }

    #[test]
    fn desired_files_follow_the_published_hosts_and_port() {
        let spec = json!({"upstreams": [
            {"host": "docker.io"},
            {"host": "registry.local:5000", "url": "http://10.1.2.3:5000/"},
            {"host": "quay.io"},
        ]});
        // quay.io lost to another mirror: the operator left it out of status.hosts.
        let m = mirror(
            "hub",
            spec.clone(),
            published(&["docker.io", "registry.local:5000"], 31500),
        );
        let want = desired(&m, "192.168.1.7").unwrap();
        assert_eq!(want.len(), 2);
        assert_eq!(want[0].registry, "docker.io");
        assert_eq!(want[0].server, "https://registry-1.docker.io");
        assert_eq!(want[0].mirrors, ["http://192.168.1.7:31500"]);
        assert_eq!(want[0].owner, "hub");
        assert_eq!(want[1].server, "http://10.1.2.3:5000");
        assert_eq!(
            desired(&m, "fd00::7").unwrap()[0].mirrors,
            ["http://[fd00::7]:31500"]
        );
        assert!(
            desired(&mirror("hub", spec, None), "1.2.3.4")
                .unwrap_err()
                .contains("waiting")
        );
    }

    #[test]
    fn host_network_members_are_reached_at_their_nodes_own_first() {
        let spec = json!({"upstreams": [{"host": "docker.io"}],
                          "cache": {"hostNetwork": true, "port": 5000}});
        let mut status = published(&["docker.io"], 31500).unwrap();
        // No member address published yet: the NodePort, as before.
        let waiting = mirror("hub", spec.clone(), Some(status.clone()));
        assert_eq!(
            desired(&waiting, "10.0.0.5").unwrap()[0].mirrors,
            ["http://10.0.0.5:31500"]
        );
        status.cache_addresses = Some(vec!["10.0.0.3:5000".into(), "10.0.0.5:5001".into()]);
        let m = mirror("hub", spec.clone(), Some(status.clone()));
        // This node's own member comes first, whatever port it is on (one
        // member may still listen on the port before a change).
        assert_eq!(
            desired(&m, "10.0.0.5").unwrap()[0].mirrors,
            ["http://10.0.0.5:5001", "http://10.0.0.3:5000"]
        );
        // A node without a member tries them in the published order.
        assert_eq!(
            desired(&m, "10.0.0.9").unwrap()[0].mirrors,
            ["http://10.0.0.3:5000", "http://10.0.0.5:5001"]
        );
        // What the operator applied decides, not the live spec: an edit
        // turning hostNetwork off that is not applied yet moves no node.
        let mut refused = m.clone();
        refused.spec.cache.host_network = false;
        assert_eq!(
            desired(&refused, "10.0.0.9").unwrap(),
            desired(&m, "10.0.0.9").unwrap()
        );
        let mut not_yet = waiting.clone();
        not_yet.spec.cache.host_network = false;
        assert_eq!(
            desired(&not_yet, "10.0.0.5").unwrap(),
            desired(&waiting, "10.0.0.5").unwrap()
        );
        status.cache_addresses = Some(vec!["[fd00::5]:5000".into()]);
        let v6 = mirror("hub", spec, Some(status));
        assert_eq!(
            desired(&v6, "fd00::5").unwrap()[0].mirrors,
            ["http://[fd00::5]:5000"]
        );
        // The addresses are part of what a pass depends on.
        assert_ne!(mirror_key(&m), mirror_key(&v6));
    }

    #[test]
    fn a_plan_is_deletion_then_selection_then_allowed_dirs_then_hosts() {
        let n = node(json!({"pool": "a"}));
        let p = plan(&hub(), &n, "10.0.0.9", &allowed());
        assert!(p.selected);
        assert_eq!(p.config_dir, "/etc/containerd/certs.d");
        let Want::Files {
            files,
            merge,
            config_file,
        } = &p.want
        else {
            panic!("{p:?}")
        };
        assert_eq!(files[0].mirrors, ["http://10.0.0.9:30001"]);
        assert_eq!(*merge, MergeMode::Never);
        assert_eq!(config_file, "/etc/containerd/config.toml");

        let mut merged = hub();
        merged.spec.nodes.merge_existing = true;
        assert!(matches!(
            plan(&merged, &n, "ip", &allowed()).want,
            Want::Files {
                merge: MergeMode::KeepUserHosts,
                ..
            }
        ));

        let unpublished = mirror("hub", json!({"upstreams": [{"host": "docker.io"}]}), None);
        assert!(matches!(
            plan(&unpublished, &n, "ip", &allowed()).want,
            Want::Waiting(_)
        ));

        let mut other_pool = hub();
        other_pool.spec.nodes.node_selector = [("pool".to_owned(), "b".to_owned())].into();
        let p = plan(&other_pool, &n, "ip", &allowed());
        assert_eq!((p.selected, p.want), (false, Want::NotSelected));

        for (dir, file) in [
            ("/", "/etc/containerd/config.toml"),
            (
                "/etc/containerd-evil/certs.d",
                "/etc/containerd/config.toml",
            ),
            ("/etc/containerd/certs.d", "/etc/shadow"),
        ] {
            let mut root = hub();
            root.spec.nodes.containerd_config_dir = dir.into();
            root.spec.nodes.containerd_config_file = file.into();
            let Want::Refused(why) = plan(&root, &n, "ip", &allowed()).want else {
                panic!("{dir} {file} not refused")
            };
            assert!(why.contains("/etc/containerd"), "{why}");
            assert!(why.contains("agent.hostDirs"), "{why}");
        }

        // Deletion wins over everything, even a refused directory.
        let mut deleting = other_pool.clone();
        deleting.spec.nodes.containerd_config_dir = "/".into();
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        assert_eq!(plan(&deleting, &n, "ip", &allowed()).want, Want::Deleting);
    }

    #[test]
    fn known_dirs_are_current_previous_and_default_within_allowed() {
        let n = node(json!({}));
        let mut moved = hub();
        moved.spec.nodes.containerd_config_dir = "/etc/containerd/other.d/".into();
        let mut root = hub();
        root.spec.nodes.containerd_config_dir = "/".into();
        let plans = [
            plan(&moved, &n, "ip", &allowed()),
            plan(&root, &n, "ip", &allowed()),
        ];
        let dirs = known_dirs(&plans, ["/etc/containerd/old.d/", "/var/lib/x"], &allowed());
        assert_eq!(
            dirs.into_iter().collect::<Vec<_>>(),
            [
                "/etc/containerd/certs.d",
                "/etc/containerd/old.d",
                "/etc/containerd/other.d"
            ]
        );
        assert!(known_dirs(&[], [], &["/var/lib/k3s".to_owned()]).is_empty());
        assert_eq!(normalized("/"), "/");
        assert_eq!(normalized("/a/b//"), "/a/b");
    }

    #[test]
    fn everything_marked_that_no_mirror_writes_there_is_removed() {
        let n = node(json!({"pool": "a"}));
        let mut moved = mirror(
            "moved",
            json!({"upstreams": [{"host": "ghcr.io"}], "nodes": {"containerdConfigDir": "/etc/containerd/new.d"}}),
            published(&["ghcr.io"], 30002),
        );
        moved.metadata.uid = Some("u-moved".into());
        let mut gone_from_node = hub();
        gone_from_node.metadata.name = Some("deselected".into());
        gone_from_node.spec.nodes.node_selector = [("pool".to_owned(), "b".to_owned())].into();
        let plans = [
            plan(&hub(), &n, "ip", &allowed()),
            plan(&moved, &n, "ip", &allowed()),
            plan(&gone_from_node, &n, "ip", &allowed()),
        ];
        let found: BTreeMap<String, Vec<String>> = [
            (
                "/etc/containerd/certs.d".to_owned(),
                vec![
                    "deselected".into(),
                    "hub".into(),
                    "hub2".into(),
                    "moved".into(),
                ],
            ),
            ("/etc/containerd/new.d".to_owned(), vec!["moved".into()]),
        ]
        .into();
        assert_eq!(
            removals(&found, &plans),
            [
                (
                    "/etc/containerd/certs.d".to_owned(),
                    "deselected".to_owned()
                ),
                ("/etc/containerd/certs.d".to_owned(), "hub2".to_owned()),
                ("/etc/containerd/certs.d".to_owned(), "moved".to_owned()),
            ]
        );
    }

    #[test]
    fn entries_report_selected_mirrors_deletions_and_failed_removals_only() {
        let n = node(json!({"pool": "a"}));
        let mut waiting = mirror("waiting", json!({"upstreams": [{"host": "quay.io"}]}), None);
        waiting.metadata.uid = Some("u-w".into());
        let mut refused = hub();
        refused.metadata.name = Some("refused".into());
        refused.spec.nodes.containerd_config_dir = "/".into();
        let mut deselected = hub();
        deselected.metadata.name = Some("deselected".into());
        deselected.spec.nodes.node_selector = [("pool".to_owned(), "b".to_owned())].into();
        let mut deleting = deselected.clone();
        deleting.metadata.name = Some("deleting".into());
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let mut deleting_elsewhere = deleting.clone();
        deleting_elsewhere.metadata.name = Some("elsewhere".into());
        let plans: Vec<MirrorPlan> = [
            &hub(),
            &waiting,
            &refused,
            &deselected,
            &deleting,
            &deleting_elsewhere,
        ]
        .into_iter()
        .map(|m| plan(m, &n, "ip", &allowed()))
        .collect();
        let dir = "/etc/containerd/certs.d".to_owned();
        let outcome = Outcome {
            applied: [(
                "hub".to_owned(),
                (vec![report("docker.io", HostState::Configured)], reads()),
            )]
            .into(),
            removed: vec![
                (
                    dir.clone(),
                    "deselected".into(),
                    vec![report("ghcr.io", HostState::Removed)],
                ),
                (
                    dir.clone(),
                    "deleting".into(),
                    vec![report("ghcr.io", HostState::Removed)],
                ),
                (
                    dir.clone(),
                    "hub2".into(),
                    vec![report("quay.io", HostState::Failed("EROFS".into()))],
                ),
            ],
        };
        let got = entries(&plans, &outcome, &[]);
        let states: Vec<(&str, NodeState)> =
            got.iter().map(|e| (e.mirror.as_str(), e.state)).collect();
        assert_eq!(
            states,
            [
                ("deleting", NodeState::Removed),
                ("hub", NodeState::Configured),
                ("hub2", NodeState::Failed),
                ("refused", NodeState::Failed),
                ("waiting", NodeState::NotEffective),
            ]
        );
        assert_eq!(got[1].hosts, ["docker.io"]);
        assert_eq!(got[1].uid.as_deref(), Some("uid-hub"));
        assert_eq!(got[2].message.as_deref(), Some("quay.io: EROFS"));
        assert!(
            got[3]
                .message
                .as_deref()
                .unwrap()
                .contains("agent.hostDirs")
        );
        assert_eq!(
            summary(&got),
            "deleting=Removed,hub=Configured,hub2=Failed,refused=Failed,waiting=NotEffective"
        );
        assert!(!outcome.reconciled(), "a failed removal");
        // A deleting mirror stays reported once it had an entry.
        let previous = [got[0].clone()];
        let mut again = outcome.clone();
        again.removed.clear();
        let got = entries(&plans, &again, &previous);
        assert_eq!(got[0].mirror, "deleting");
        assert_eq!(got.len(), 4);
        assert!(again.reconciled());
        // A failed write of a wanted mirror is not reconciled; a conflict is.
        let mut conflict = again.clone();
        conflict.applied.insert(
            "hub".into(),
            (
                vec![report("docker.io", HostState::Conflict("user file".into()))],
                reads(),
            ),
        );
        assert!(conflict.reconciled());
        let got = entries(&plans, &conflict, &[]);
        assert_eq!(
            got[0].mirror, "hub",
            "a deleting mirror never reported here is left out"
        );
        assert_eq!(got[0].state, NodeState::Conflict);
        conflict.applied.insert(
            "hub".into(),
            (
                vec![report("docker.io", HostState::Failed("EROFS".into()))],
                reads(),
            ),
        );
        assert!(!conflict.reconciled());
    }

    #[test]
    fn node_state_puts_failures_then_conflicts_then_containerd_first() {
        let unset = regmirror_node::inspect(Some("version = 2\n"), "/etc/containerd/certs.d");
        let good = [
            report("docker.io", HostState::Configured),
            report("ghcr.io", HostState::Unchanged),
        ];
        assert_eq!(
            node_state(&good, &reads()),
            (
                NodeState::Configured,
                "pulls of docker.io, ghcr.io go through the cache".into()
            )
        );
        let (s, m) = node_state(&good, &unset);
        assert_eq!(s, NodeState::NotEffective);
        assert!(m.contains("config_path"));
        let conflict = [
            report("docker.io", HostState::Conflict("user file".into())),
            good[1].clone(),
        ];
        assert_eq!(node_state(&conflict, &reads()).0, NodeState::Conflict);
        let failed = [
            conflict[0].clone(),
            report("x", HostState::Failed("EROFS".into())),
        ];
        assert_eq!(
            node_state(&failed, &reads()),
            (NodeState::Failed, "x: EROFS".into())
        );
    }

    #[test]
    fn only_what_the_files_depend_on_is_a_change() {
        let m = hub();
        let mut conditions = m.clone();
        conditions.status.as_mut().unwrap().conditions = vec![
            serde_json::from_value(json!({
                "type": "Ready", "status": "False", "reason": "X", "message": "m",
                "lastTransitionTime": "2026-01-01T00:00:00Z"
            }))
            .unwrap(),
        ];
        conditions.metadata.resource_version = Some("2".into());
        assert_eq!(mirror_key(&m), mirror_key(&conditions));
        let mut port = m.clone();
        port.status.as_mut().unwrap().node_port = Some(30002);
        assert_ne!(mirror_key(&m), mirror_key(&port));
        let mut spec = m.clone();
        spec.spec.nodes.merge_existing = true;
        assert_ne!(mirror_key(&m), mirror_key(&spec));

        let n = node(json!({"a": "b"}));
        let mut heartbeat = n.clone();
        heartbeat.status = Some(
            serde_json::from_value(json!({"conditions": [{"type": "Ready", "status": "True"}]}))
                .unwrap(),
        );
        assert_eq!(node_key(&n), node_key(&heartbeat));
        assert_ne!(node_key(&n), node_key(&node(json!({"a": "c"}))));
    }
}
