//! The node agent's file work for one pass (blocking IO through the node
//! crate): remove what the plan says goes, write what it wants, and read
//! containerd's configuration. Paths in the plan are node paths; this
//! process sees them under its host root.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use regmirror_node::{Apply, Detection, HostReport, HostState};

use super::plan::{MirrorPlan, Outcome, Want, removals};
use crate::selection::seen_at;

/// Brings the marked files in `dirs` (node paths, all within the allowed
/// directories) in line with `plans`, seen under `host_root`: first removes
/// every owner's files that no mirror writes in that directory (so an
/// orphan's file never blocks a new mirror for the same host), then writes
/// each wanted mirror's files. Messages name node paths.
pub fn reconcile(host_root: &Path, plans: &[MirrorPlan], dirs: &BTreeSet<String>) -> Outcome {
    let found: BTreeMap<String, Vec<String>> = dirs
        .iter()
        .map(|d| (d.clone(), regmirror_node::owners(&seen_at(host_root, d))))
        .collect();
    let removed = removals(&found, plans)
        .into_iter()
        .map(|(dir, owner)| {
            let seen = seen_at(host_root, &dir);
            let reports = regmirror_node::remove_owned(&seen, &owner)
                .into_iter()
                .map(|r| on_node(r, &seen, &dir))
                .collect::<Vec<_>>();
            log(&owner, &dir, &reports);
            (dir, owner, reports)
        })
        .collect();
    let applied = plans
        .iter()
        .filter_map(|p| {
            let Want::Files {
                config_file,
                files,
                merge,
            } = &p.want
            else {
                return None;
            };
            let seen = seen_at(host_root, &p.config_dir);
            let a = Apply {
                dir: &seen,
                owner: &p.name,
                merge: *merge,
            };
            let reports: Vec<HostReport> = regmirror_node::apply(a, files)
                .into_iter()
                .map(|r| on_node(r, &seen, &p.config_dir))
                .collect();
            log(&p.name, &p.config_dir, &reports);
            let detection = detect(host_root, config_file, &p.config_dir);
            Some((p.name.clone(), (reports, detection)))
        })
        .collect();
    Outcome { applied, removed }
}

/// Whether containerd reads `hosts.toml` from `dir`, from its configuration
/// `config_file` (node paths) as seen under `host_root`. The one place the
/// agent calls [`regmirror_node::inspect`].
pub fn detect(host_root: &Path, config_file: &str, dir: &str) -> Detection {
    let config = std::fs::read_to_string(seen_at(host_root, config_file)).ok();
    regmirror_node::inspect(config.as_deref(), dir)
}

/// `report` with the paths in its message as the node's user knows them:
/// `seen_as` (where this process sees the directory, e.g. under `/host`)
/// replaced by `on_node` (the directory on the node).
pub fn on_node(mut report: HostReport, seen_as: &Path, on_node: &str) -> HostReport {
    let seen_as = seen_as.display().to_string();
    if seen_as != on_node
        && let HostState::Conflict(m) | HostState::Failed(m) = &mut report.state
    {
        *m = m.replace(&seen_as, on_node);
    }
    report
}

/// Logs the changes one pass made to `owner`'s files in `dir`: writes and
/// removals only (they happen once); conflicts and failures are logged
/// with the report, when they change.
fn log(owner: &str, dir: &str, reports: &[HostReport]) {
    for r in reports {
        match &r.state {
            HostState::Configured => {
                tracing::info!(mirror = owner, dir, registry = %r.registry, "hosts.toml written")
            }
            HostState::Removed => {
                tracing::info!(mirror = owner, dir, registry = %r.registry, "hosts.toml removed")
            }
            HostState::Failed(m) => {
                tracing::debug!(mirror = owner, dir, registry = %r.registry, problem = %m, "hosts.toml not changed")
            }
            HostState::Conflict(_) | HostState::Unchanged => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::plan::plan;
    use crate::crd::{RegistryMirror, RegistryMirrorStatus};
    use k8s_openapi::api::core::v1::Node;
    use serde_json::json;

    fn mirror(name: &str, host: &str, dir: &str, merge: bool) -> RegistryMirror {
        let mut m = RegistryMirror::new(
            name,
            serde_json::from_value(json!({
                "upstreams": [{"host": host}],
                "nodes": {"containerdConfigDir": dir, "mergeExisting": merge},
            }))
            .unwrap(),
        );
        m.status = Some(RegistryMirrorStatus {
            hosts: Some(vec![host.to_owned()]),
            node_port: Some(30001),
            ..Default::default()
        });
        m
    }

    fn pass(root: &Path, mirrors: &[RegistryMirror], previous: &[&str]) -> Outcome {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap();
        let allowed = vec!["/etc/containerd".to_owned()];
        let plans: Vec<MirrorPlan> = mirrors
            .iter()
            .map(|m| plan(m, &node, "10.0.0.9", &allowed))
            .collect();
        let dirs = super::super::plan::known_dirs(&plans, previous.iter().copied(), &allowed);
        reconcile(root, &plans, &dirs)
    }

    #[test]
    fn orphans_and_moved_files_go_users_files_stay() {
        let root = tempfile::tempdir().unwrap();
        let certs = root.path().join("etc/containerd/certs.d");
        let old = root.path().join("etc/containerd/old.d");
        // An orphan of a deleted mirror hub2 for the host hub wants.
        let hub2 = mirror("hub2", "docker.io", "/etc/containerd/certs.d", false);
        pass(root.path(), &[hub2], &[]);
        // A mirror that used to write to old.d (known from the previous report).
        let moved = mirror("moved", "ghcr.io", "/etc/containerd/old.d", false);
        pass(root.path(), &[moved], &[]);
        assert!(old.join("ghcr.io/hosts.toml").exists());
        // A user's own file.
        std::fs::create_dir_all(certs.join("quay.io")).unwrap();
        std::fs::write(certs.join("quay.io/hosts.toml"), "server = \"x\"\n").unwrap();

        let hub = mirror("hub", "docker.io", "/etc/containerd/certs.d", false);
        let moved = mirror("moved", "ghcr.io", "/etc/containerd/certs.d", false);
        let out = pass(root.path(), &[hub, moved], &["/etc/containerd/old.d"]);
        assert!(out.reconciled(), "{out:?}");
        let text = std::fs::read_to_string(certs.join("docker.io/hosts.toml")).unwrap();
        assert_eq!(
            regmirror_node::owner_of(&text),
            Some("hub"),
            "not a conflict"
        );
        assert!(certs.join("ghcr.io/hosts.toml").exists());
        assert!(!old.join("ghcr.io").exists());
        assert_eq!(
            std::fs::read_to_string(certs.join("quay.io/hosts.toml")).unwrap(),
            "server = \"x\"\n"
        );
        // Messages name node paths, not where this process sees them.
        let (reports, detection) = &out.applied["hub"];
        assert!(!detection.reads_hosts);
        assert!(
            !detection
                .message
                .contains(&root.path().display().to_string())
        );
        assert!(matches!(reports[0].state, HostState::Configured));

        // No mirror at all: every marked file goes, the user's stays.
        pass(root.path(), &[], &[]);
        assert_eq!(regmirror_node::owners(&certs), Vec::<String>::new());
        assert!(certs.join("quay.io/hosts.toml").exists());
    }

    #[test]
    fn messages_name_the_nodes_paths_not_the_processs() {
        let r = HostReport {
            registry: "docker.io".into(),
            state: HostState::Conflict(
                "/host/etc/containerd/certs.d/docker.io/hosts.toml was not written by regmirror"
                    .into(),
            ),
        };
        let r = on_node(
            r,
            Path::new("/host/etc/containerd/certs.d"),
            "/etc/containerd/certs.d",
        );
        assert_eq!(
            r.state,
            HostState::Conflict(
                "/etc/containerd/certs.d/docker.io/hosts.toml was not written by regmirror".into()
            )
        );
    }
}
