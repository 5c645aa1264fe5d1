//! Moving a mirror from the single-cache layout (a Deployment mounting one
//! claim, [`resources::pvc_name`]) to the cache cluster (a StatefulSet with a
//! claim per member) without losing what the cache holds: member 0's claim
//! ([`resources::member_claim_name`]) is bound to the old claim's volume.
//!
//! The standard procedure for handing a PersistentVolume to another claim
//! (Kubernetes docs, "Reserving a PersistentVolume"): stop the pods using it,
//! make the volume survive its claim (`Retain`, the original policy kept in
//! [`RECLAIM_POLICY_ANNOTATION`]), create the new claim naming the volume
//! (`volumeName`; it stays Pending while the old claim holds the volume),
//! delete the old claim, point the volume's `claimRef` at the new claim
//! (without the old uid), and once the binder bound them, restore the policy.
//! Only then is the StatefulSet created, so its member 0 mounts the old content.
//!
//! Each step is chosen by [`next_step`] from the objects as they are, so the
//! procedure is idempotent and resumes at any step after a restart: the
//! volume is found from the old claim or, once that is gone, from the new
//! claim's `volumeName`, and only a volume carrying the annotation (which this
//! procedure set) is ever re-pointed. It needs `get` and `patch` on
//! PersistentVolumes (cluster-scoped: a ClusterRole).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::resources::{self, COMPONENT_CACHE};

/// On the volume while it is being handed over: its reclaim policy before
/// the procedure set `Retain`, restored at the end.
pub const RECLAIM_POLICY_ANNOTATION: &str = "regmirror.dev/original-reclaim-policy";

/// The objects the procedure decides from (`None`: not there).
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The old layout's Deployment.
    pub deployment: Option<Deployment>,
    /// Pods of the cache that still exist (the old Deployment's: no
    /// StatefulSet exists while migrating).
    pub pods: usize,
    /// The old layout's claim.
    pub old_claim: Option<PersistentVolumeClaim>,
    /// Member 0's claim.
    pub new_claim: Option<PersistentVolumeClaim>,
    /// The volume the old claim is bound to, else the one the new claim names.
    pub volume: Option<PersistentVolume>,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing (left) to migrate: the StatefulSet may be applied.
    Done,
    /// Delete the old Deployment, which stops its pod.
    DeleteDeployment,
    /// Wait until the old pods are gone (how many are left).
    WaitForPods(usize),
    /// The old claim holds no volume, so no content: delete it.
    DeleteUnboundClaim,
    /// Keep the volume when its claim goes: set `Retain`, remembering `original`.
    RetainVolume { volume: String, original: String },
    /// Create member 0's claim naming `volume`.
    CreateClaim { volume: String },
    /// Delete the old claim (its volume is retained and member 0's claim waits for it).
    DeleteOldClaim,
    /// The old claim is being deleted (its protection finalizer waits for pods).
    WaitForOldClaim,
    /// Point `volume`'s claimRef at member 0's claim (clearing the old uid).
    RebindVolume { volume: String },
    /// The binder has yet to bind member 0's claim to the volume.
    WaitForBinding,
    /// Bound: give `volume` its original reclaim `policy` back.
    RestoreReclaimPolicy { volume: String, policy: String },
}

impl Step {
    /// Whether this step only waits for Kubernetes (requeue, act later).
    pub fn is_wait(&self) -> bool {
        matches!(
            self,
            Self::WaitForPods(_) | Self::WaitForOldClaim | Self::WaitForBinding
        )
    }
}

fn bound_volume(claim: &PersistentVolumeClaim) -> Option<&str> {
    let bound = claim.status.as_ref()?.phase.as_deref() == Some("Bound");
    let name = claim.spec.as_ref()?.volume_name.as_deref()?;
    (bound && !name.is_empty()).then_some(name)
}

fn annotated_policy(volume: &PersistentVolume) -> Option<&str> {
    volume
        .metadata
        .annotations
        .as_ref()?
        .get(RECLAIM_POLICY_ANNOTATION)
        .map(String::as_str)
}

/// The next step of moving the old layout's claim to member 0's claim
/// `new` in `namespace`, from what is observed. Pure; see the module docs
/// for the procedure.
pub fn next_step(o: &Observed, new: &str, namespace: &str) -> Step {
    if o.deployment.is_some() {
        return Step::DeleteDeployment;
    }
    if let Some(old) = &o.old_claim {
        if o.pods > 0 {
            return Step::WaitForPods(o.pods);
        }
        if old.metadata.deletion_timestamp.is_some() {
            return Step::WaitForOldClaim;
        }
        let volume = match (bound_volume(old), &o.volume) {
            (Some(name), Some(v)) if v.name_any() == name => v,
            // Unbound, or its volume is gone: there is no content to keep.
            _ => return Step::DeleteUnboundClaim,
        };
        let name = volume.name_any();
        if annotated_policy(volume).is_none() {
            let original = volume
                .spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.clone())
                .unwrap_or_else(|| "Delete".into());
            return Step::RetainVolume {
                volume: name,
                original,
            };
        }
        if o.new_claim.is_none() {
            return Step::CreateClaim { volume: name };
        }
        return Step::DeleteOldClaim;
    }
    // The old claim is gone (or never was).
    let (Some(claim), Some(volume)) = (&o.new_claim, &o.volume) else {
        return Step::Done;
    };
    let named = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref());
    // Only a volume this procedure retained is ever touched.
    let Some(policy) = annotated_policy(volume) else {
        return Step::Done;
    };
    if named != Some(volume.name_any().as_str()) {
        return Step::Done;
    }
    if bound_volume(claim).is_some() {
        return Step::RestoreReclaimPolicy {
            volume: volume.name_any(),
            policy: policy.to_owned(),
        };
    }
    let claim_ref = volume.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    let points_at_new = claim_ref.is_some_and(|r| {
        r.name.as_deref() == Some(new)
            && r.namespace.as_deref() == Some(namespace)
            && r.uid
                .as_deref()
                .is_none_or(|uid| Some(uid) == claim.metadata.uid.as_deref())
    });
    if points_at_new {
        Step::WaitForBinding
    } else {
        Step::RebindVolume {
            volume: volume.name_any(),
        }
    }
}

/// Where a migration stands after [`migrate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Nothing left: apply the StatefulSet.
    Done,
    /// Waiting for Kubernetes; the message says for what.
    Waiting(String),
}

/// Runs the migration of `mirror`'s cache in `namespace` as far as it can
/// go now: acts on each [`next_step`] until it is [`Step::Done`] or a wait.
/// Errors: the API server refused a read or a change (the caller retries).
pub async fn migrate(
    client: &Client,
    namespace: &str,
    mirror: &str,
) -> Result<Progress, kube::Error> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let old = resources::pvc_name(mirror);
    let new = resources::member_claim_name(mirror, 0);
    let selector = resources::pods_selector(mirror, COMPONENT_CACHE);
    let merge = |v| Patch::Merge(v);
    // Each step changes what the next observation sees; a bounded number
    // guards against a loop if the API server ignored a change.
    for _ in 0..8 {
        let mut o = Observed {
            deployment: deployments
                .get_opt(&resources::deployment_name(mirror))
                .await?,
            old_claim: claims.get_opt(&old).await?,
            new_claim: claims.get_opt(&new).await?,
            ..Observed::default()
        };
        if o.old_claim.is_some() && o.deployment.is_none() {
            o.pods = pods
                .list_metadata(&ListParams::default().labels(&selector))
                .await?
                .items
                .len();
        }
        let volume = o
            .old_claim
            .as_ref()
            .and_then(bound_volume)
            .or_else(|| {
                o.new_claim
                    .as_ref()
                    .and_then(|c| c.spec.as_ref()?.volume_name.as_deref())
            })
            .map(str::to_owned);
        if let Some(v) = volume {
            o.volume = volumes.get_opt(&v).await?;
        }
        let step = next_step(&o, &new, namespace);
        if step != Step::Done {
            tracing::info!(%mirror, ?step, "migrating the cache to a StatefulSet");
        }
        match step {
            Step::Done => return Ok(Progress::Done),
            Step::WaitForPods(n) => {
                return Ok(Progress::Waiting(format!(
                    "migrating the cache to a StatefulSet: waiting for {n} pod(s) of the old Deployment to stop"
                )));
            }
            Step::WaitForOldClaim => {
                return Ok(Progress::Waiting(format!(
                    "migrating the cache to a StatefulSet: waiting for claim {old} to be deleted"
                )));
            }
            Step::WaitForBinding => {
                return Ok(Progress::Waiting(format!(
                    "migrating the cache to a StatefulSet: waiting for claim {new} to bind to the old volume"
                )));
            }
            Step::DeleteDeployment => {
                ignore_missing(
                    deployments
                        .delete(
                            &resources::deployment_name(mirror),
                            &DeleteParams::background(),
                        )
                        .await
                        .map(drop),
                )?;
            }
            Step::DeleteUnboundClaim | Step::DeleteOldClaim => {
                ignore_missing(
                    claims
                        .delete(&old, &DeleteParams::default())
                        .await
                        .map(drop),
                )?;
            }
            Step::RetainVolume { volume, original } => {
                let patch = json!({
                    "metadata": {"annotations": {RECLAIM_POLICY_ANNOTATION: original}},
                    "spec": {"persistentVolumeReclaimPolicy": "Retain"},
                });
                volumes
                    .patch(&volume, &PatchParams::default(), &merge(patch))
                    .await?;
            }
            Step::CreateClaim { volume } => {
                let claim = member_claim(&o, mirror, &new, &volume);
                match claims.create(&PostParams::default(), &claim).await {
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    r => {
                        r?;
                    }
                }
            }
            Step::RebindVolume { volume } => {
                let patch = json!({"spec": {"claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "name": new,
                    "namespace": namespace,
                    "uid": null,
                    "resourceVersion": null,
                }}});
                volumes
                    .patch(&volume, &PatchParams::default(), &merge(patch))
                    .await?;
            }
            Step::RestoreReclaimPolicy { volume, policy } => {
                let patch = json!({
                    "metadata": {"annotations": {RECLAIM_POLICY_ANNOTATION: null}},
                    "spec": {"persistentVolumeReclaimPolicy": policy},
                });
                volumes
                    .patch(&volume, &PatchParams::default(), &merge(patch))
                    .await?;
            }
        }
    }
    Ok(Progress::Waiting(
        "migrating the cache to a StatefulSet: still in progress".into(),
    ))
}

/// Member 0's claim for `volume`: the old claim's access modes and size,
/// the volume's class (binding needs them to match), the cache's labels.
fn member_claim(o: &Observed, mirror: &str, name: &str, volume: &str) -> PersistentVolumeClaim {
    let old = o.old_claim.as_ref().and_then(|c| c.spec.clone());
    let class = o
        .volume
        .as_ref()
        .and_then(|v| v.spec.as_ref()?.storage_class_name.clone())
        .unwrap_or_default();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name,
            "labels": resources::labels(mirror, COMPONENT_CACHE),
        },
        "spec": {
            "accessModes": old.as_ref().and_then(|s| s.access_modes.clone()),
            "resources": old.as_ref().and_then(|s| s.resources.clone()),
            "storageClassName": class,
            "volumeName": volume,
        },
    }))
    .expect("a valid claim")
}

fn ignore_missing(r: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const NEW: &str = "data-regmirror-hub-0";
    const NS: &str = "regmirror-system";

    fn claim(name: &str, volume: Option<&str>, phase: &str) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": name, "uid": format!("uid-{name}")},
            "spec": {"volumeName": volume, "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn volume(policy: &str, annotation: Option<&str>, claim_ref: Value) -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": "pv-1", "annotations": annotation.map(|a| json!({RECLAIM_POLICY_ANNOTATION: a}))},
            "spec": {"persistentVolumeReclaimPolicy": policy, "claimRef": claim_ref,
                     "storageClassName": "local"},
        }))
        .unwrap()
    }

    fn old_ref() -> Value {
        json!({"name": "regmirror-hub", "namespace": NS, "uid": "uid-regmirror-hub"})
    }

    /// The whole procedure, one observation per step, as the objects change.
    #[test]
    fn a_bound_claim_is_handed_to_member_zero_step_by_step() {
        let step = |o: &Observed| next_step(o, NEW, NS);
        let mut o = Observed {
            deployment: Some(Deployment::default()),
            pods: 1,
            old_claim: Some(claim("regmirror-hub", Some("pv-1"), "Bound")),
            volume: Some(volume("Delete", None, old_ref())),
            ..Observed::default()
        };
        assert_eq!(step(&o), Step::DeleteDeployment);
        o.deployment = None;
        assert_eq!(step(&o), Step::WaitForPods(1));
        assert!(step(&o).is_wait());
        o.pods = 0;
        assert_eq!(
            step(&o),
            Step::RetainVolume {
                volume: "pv-1".into(),
                original: "Delete".into()
            }
        );
        o.volume = Some(volume("Retain", Some("Delete"), old_ref()));
        assert_eq!(
            step(&o),
            Step::CreateClaim {
                volume: "pv-1".into()
            }
        );
        o.new_claim = Some(claim(NEW, Some("pv-1"), "Pending"));
        assert_eq!(step(&o), Step::DeleteOldClaim);
        o.old_claim.as_mut().unwrap().metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(step(&o), Step::WaitForOldClaim);
        o.old_claim = None;
        // Released, still naming the old claim (and its uid).
        assert_eq!(
            step(&o),
            Step::RebindVolume {
                volume: "pv-1".into()
            }
        );
        o.volume = Some(volume(
            "Retain",
            Some("Delete"),
            json!({"name": NEW, "namespace": NS}),
        ));
        assert_eq!(step(&o), Step::WaitForBinding);
        // The binder filled in the new claim's uid: still ours.
        o.volume = Some(volume(
            "Retain",
            Some("Delete"),
            json!({"name": NEW, "namespace": NS, "uid": format!("uid-{NEW}")}),
        ));
        assert_eq!(step(&o), Step::WaitForBinding);
        o.new_claim = Some(claim(NEW, Some("pv-1"), "Bound"));
        assert_eq!(
            step(&o),
            Step::RestoreReclaimPolicy {
                volume: "pv-1".into(),
                policy: "Delete".into()
            }
        );
        o.volume = Some(volume(
            "Delete",
            None,
            json!({"name": NEW, "namespace": NS, "uid": format!("uid-{NEW}")}),
        ));
        assert_eq!(step(&o), Step::Done);
    }

    #[test]
    fn an_unbound_or_volumeless_old_claim_is_just_deleted() {
        let o = Observed {
            old_claim: Some(claim("regmirror-hub", None, "Pending")),
            ..Observed::default()
        };
        assert_eq!(next_step(&o, NEW, NS), Step::DeleteUnboundClaim);
        // Bound to a volume that is gone.
        let o = Observed {
            old_claim: Some(claim("regmirror-hub", Some("pv-1"), "Bound")),
            ..Observed::default()
        };
        assert_eq!(next_step(&o, NEW, NS), Step::DeleteUnboundClaim);
    }

    #[test]
    fn nothing_to_migrate_and_volumes_not_ours_are_left_alone() {
        assert_eq!(next_step(&Observed::default(), NEW, NS), Step::Done);
        // Member 0's claim made by the StatefulSet, bound to a provisioned volume.
        let o = Observed {
            new_claim: Some(claim(NEW, Some("pv-1"), "Bound")),
            volume: Some(volume(
                "Delete",
                None,
                json!({"name": NEW, "namespace": NS}),
            )),
            ..Observed::default()
        };
        assert_eq!(next_step(&o, NEW, NS), Step::Done);
        // A pending claim naming a volume this procedure did not retain:
        // never re-pointed.
        let o = Observed {
            new_claim: Some(claim(NEW, Some("pv-1"), "Pending")),
            volume: Some(volume("Delete", None, json!({"name": "someone-else"}))),
            ..Observed::default()
        };
        assert_eq!(next_step(&o, NEW, NS), Step::Done);
    }

    #[test]
    fn the_new_claim_copies_the_old_claims_shape_and_the_volumes_class() {
        let o = Observed {
            old_claim: Some(claim("regmirror-hub", Some("pv-1"), "Bound")),
            volume: Some(volume("Retain", Some("Delete"), old_ref())),
            ..Observed::default()
        };
        let c = serde_json::to_value(member_claim(&o, "hub", NEW, "pv-1")).unwrap();
        assert_eq!(c["metadata"]["name"], NEW);
        assert_eq!(
            c["metadata"]["labels"]["app.kubernetes.io/component"],
            "cache"
        );
        assert_eq!(
            c["spec"],
            json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
                   "storageClassName": "local", "volumeName": "pv-1"})
        );
    }
}
