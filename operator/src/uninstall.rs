//! `regmirror-operator uninstall`: what the chart's pre-delete hook runs
//! before `helm uninstall` removes the operator (issue 18, item 4: an
//! uninstall with mirrors present left the CRD, the mirrors, their
//! workloads and every node's `hosts.toml`, and deleting a mirror afterwards
//! hung on its finalizer).
//!
//! While the operator and the node agents still run, it deletes every
//! RegistryMirror this installation manages and waits, at most `timeout`,
//! until their finalizers have removed the node configuration and the
//! children. Then it gives up the installation claim, so a later install
//! starts clean. If that does not happen in time it fails, naming each
//! mirror still there and why: `helm uninstall` stops, and the installation
//! keeps running in a consistent state.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::crd::RegistryMirror;
use crate::installation::{self, CLAIM, CRD_NAME, Installation};
use crate::leader;
use crate::status;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;

/// How often progress is printed while waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// What an uninstall ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every mirror (this many) is gone and the claim is released.
    Removed(usize),
    /// Another, alive installation manages the mirrors: nothing was touched.
    NotOurs { by: String },
}

/// One line per mirror still present: its name and what its `Ready`
/// condition says (e.g. `hub: Deleting: waiting for node agents to remove
/// their configuration from node-3`).
pub fn remaining(mirrors: &[RegistryMirror]) -> String {
    mirrors
        .iter()
        .map(|m| {
            let why = status::condition(m.status.as_ref(), status::READY)
                .map(|c| format!("{}: {}", c.reason, c.message))
                .unwrap_or_else(|| "no status yet".into());
            format!("{}: {why}", m.name_any())
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Deletes this installation's mirrors and waits until they are gone, then
/// releases the claim. Deletes nothing when another installation holds the
/// claim, or when this installation's operator is not running (its leader
/// Lease not held; checked only with `leader_election`). `Err` (with
/// [`remaining`]) after `timeout`, or on an API error.
pub async fn run(
    client: &Client,
    me: &Installation,
    leader_election: bool,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let Some(crd) = crds.get_opt(CRD_NAME).await? else {
        println!("the RegistryMirror CRD is not installed: nothing to remove");
        return Ok(Outcome::Removed(0));
    };
    // Read-only here: never claim on the way out. Only the installation the
    // claim names deletes the mirrors (an unclaimed cluster: whoever runs an
    // operator, which claims at start).
    let claimant = installation::claim_text(&crd).and_then(Installation::parse);
    if let Some(other) = claimant.as_ref().filter(|c| *c != me) {
        println!(
            "the RegistryMirrors are managed by the installation {}: none removed",
            other.id()
        );
        return Ok(Outcome::NotOurs { by: other.id() });
    }
    // Deleting a mirror only marks it: this installation's operator removes
    // the node configuration and lets it go. Without a running operator
    // nothing would, so nothing is deleted.
    if leader_election {
        let lease = Api::<Lease>::namespaced(client.clone(), &me.namespace)
            .get_opt(&me.lease)
            .await?;
        let running = matches!(
            leader::decide(
                lease.as_ref().and_then(|l| l.spec.as_ref()),
                "",
                Timestamp::now()
            ),
            leader::Decision::Wait { .. }
        );
        if !running {
            anyhow::bail!(
                "no operator of this installation is running (its leader Lease {}/{} is not held): it would remove the mirrors' node configuration, so nothing was deleted. Start the operator (kubectl -n {} get pods) and uninstall again, or delete the mirrors yourself and uninstall with uninstall.removeMirrors=false",
                me.namespace,
                me.lease,
                me.namespace
            );
        }
    }
    let mirrors: Api<RegistryMirror> = Api::all(client.clone());
    let listed = mirrors.list(&ListParams::default()).await?.items;
    let count = listed.len();
    for m in &listed {
        if m.metadata.deletion_timestamp.is_none() {
            println!("deleting RegistryMirror {}", m.name_any());
            match mirrors
                .delete(&m.name_any(), &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let started = Instant::now();
    let mut last_progress: Option<Instant> = None;
    loop {
        let left = mirrors.list(&ListParams::default()).await?.items;
        if left.is_empty() {
            break;
        }
        if started.elapsed() >= timeout {
            anyhow::bail!(
                "{} RegistryMirror(s) still present after {}: {}. They are being deleted: the operator lets each go once its node agents confirm that its configuration is removed (or after 10 minutes, leaving hosts.toml on nodes that did not confirm). helm uninstall stops here; the operator and the agents keep running and finish the deletion. Uninstall again once they are gone; to let a mirror go at once (its nodes keep their hosts.toml): kubectl patch registrymirror NAME --type=json -p '[{{\"op\":\"remove\",\"path\":\"/metadata/finalizers\"}}]'",
                left.len(),
                humantime::format_duration(timeout),
                remaining(&left)
            );
        }
        if last_progress.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
            println!(
                "waiting for {} RegistryMirror(s): {}",
                left.len(),
                remaining(&left)
            );
            last_progress = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if claimant.is_some() {
        let patch = json!({"metadata": {"annotations": {CLAIM: null}}});
        crds.patch(CRD_NAME, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    println!("removed {count} RegistryMirror(s) and their node configuration");
    Ok(Outcome::Removed(count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::RegistryMirrorStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    #[test]
    fn what_remains_says_why() {
        let mut hub = RegistryMirror::new(
            "hub",
            serde_json::from_value(json!({"upstreams": [{"host": "docker.io"}]})).unwrap(),
        );
        hub.status = Some(RegistryMirrorStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "Deleting".into(),
                message: "waiting for node agents to remove their configuration from node-3".into(),
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }],
            ..Default::default()
        });
        let quay = RegistryMirror::new("quay", hub.spec.clone());
        assert_eq!(
            remaining(&[hub, quay]),
            "hub: Deleting: waiting for node agents to remove their configuration from node-3; quay: no status yet"
        );
    }
}
