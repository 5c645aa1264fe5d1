//! Moving a mirror from its own node agent DaemonSet (`regmirror-<m>-agent`,
//! made by earlier versions, owned by the mirror) to the shared agent the
//! chart installs (issue 17), with no window where a node loses its
//! configuration: both write the same files with the same owner marker and
//! no agent removes files when it stops, so the old DaemonSet is deleted
//! only once every node the mirror selects has an entry for it in its
//! RegistryMirrorNode (the shared agent has taken the node over), and kept
//! until then.

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, DeleteParams};
use kube::{Client, ResourceExt};

use crate::crd::RegistryMirror;
use crate::node_status::{self, NodesSummary};
use crate::resources;

/// What to do with a mirror's old agent DaemonSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every selected node is reported on by the shared agent.
    Delete,
    /// Some are not yet; the message names them, for the status.
    Keep(String),
}

/// The decision for the old agent DaemonSet `daemon_set` of a mirror whose
/// selected nodes without an entry in their report are `unreported`.
pub fn decide(daemon_set: &str, unreported: &[String]) -> Decision {
    if unreported.is_empty() {
        return Decision::Delete;
    }
    Decision::Keep(format!(
        "the shared node agent has not taken over {} yet (no entry in their RegistryMirrorNode): DaemonSet {daemon_set} of the per-mirror layout is kept until it has",
        node_status::name_list(unreported)
    ))
}

/// What [`retire`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No old DaemonSet of this mirror (none, or not owned by it).
    Absent,
    /// Deleted now.
    Deleted,
    /// Kept; why, for the status.
    Kept(String),
}

/// Reads `mirror`'s old agent DaemonSet in `namespace` and deletes it when
/// [`decide`] says so from `summary` (which must come from listed stores).
/// Errors are the API server's.
pub async fn retire(
    client: &Client,
    namespace: &str,
    mirror: &RegistryMirror,
    summary: &NodesSummary,
) -> Result<Outcome, kube::Error> {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let name = resources::daemon_set_name(&mirror.name_any());
    let Some(ds) = api.get_opt(&name).await? else {
        return Ok(Outcome::Absent);
    };
    let uid = mirror.uid().unwrap_or_default();
    if !ds.owner_references().iter().any(|o| o.uid == uid) {
        return Ok(Outcome::Absent);
    }
    match decide(&name, &summary.unreported) {
        Decision::Keep(why) => Ok(Outcome::Kept(why)),
        Decision::Delete => {
            tracing::info!(mirror = %mirror.name_any(), daemonset = %name, "the shared node agent reports on every selected node: deleting the per-mirror agent DaemonSet");
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => Ok(Outcome::Deleted),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(Outcome::Deleted),
                Err(e) => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_agents_go_only_once_every_selected_node_is_taken_over() {
        assert_eq!(decide("regmirror-hub-agent", &[]), Decision::Delete);
        let Decision::Keep(why) = decide("regmirror-hub-agent", &["node-2".into()]) else {
            panic!("kept while node-2 is not reported on");
        };
        assert!(
            why.contains("has not taken over node-2") && why.contains("regmirror-hub-agent"),
            "{why}"
        );
    }
}
