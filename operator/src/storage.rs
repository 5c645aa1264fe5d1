//! Growing the cache members' volumes (issue 18, item 2). `storage.size` may
//! only grow (the CRD's transition rule). Kubernetes does not change a
//! StatefulSet's volumeClaimTemplates, so a larger size is carried out by the
//! controller as: expand every member claim (the API server accepts that
//! only for a bound claim whose StorageClass has `allowVolumeExpansion:
//! true`, so this is checked first and nothing is written when a claim
//! fails it), delete the StatefulSet orphaning its pods and claims, and
//! create it anew with the larger template. The new StatefulSet adopts the
//! running pods; its pod template is unchanged, so is its revision, and no
//! member restarts for it.
//!
//! The decisions are pure, here; the controller does the IO.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;

use crate::quantity;
use crate::resources::{self, DATA_CLAIM_TEMPLATE};

/// What the spec's member claim asks of the existing StatefulSet's claim
/// template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateChange {
    /// The same claims (sizes equal as quantities: `1Gi` is `1024Mi`).
    Same,
    /// Only the size, and larger: the member claims grow to `to`.
    Grow { from: String, to: String },
    /// Something Kubernetes does not change on existing claims (access
    /// modes, class, a smaller size, a size that is not a quantity): the
    /// existing template is kept ([`resources::keep_claim_templates`]).
    Kept,
}

/// The claim template's `(access modes, storage request, class)` of `sts`.
fn claim_shape(sts: &StatefulSet) -> Option<(Option<Vec<String>>, String, Option<String>)> {
    let spec = sts
        .spec
        .as_ref()?
        .volume_claim_templates
        .as_ref()?
        .first()?
        .spec
        .as_ref()?;
    Some((
        spec.access_modes.clone(),
        request(spec.resources.as_ref())?,
        spec.storage_class_name.clone(),
    ))
}

/// The claims `sts` makes (its claim template), as `status.storage` says
/// them: the size, the first access mode, the class. Pure.
pub fn claim_status(sts: &StatefulSet) -> Option<crate::crd::StorageStatus> {
    let (modes, size, class) = claim_shape(sts)?;
    Some(crate::crd::StorageStatus {
        size,
        access_mode: modes.and_then(|m| m.into_iter().next()),
        storage_class_name: class,
    })
}

fn request(r: Option<&k8s_openapi::api::core::v1::VolumeResourceRequirements>) -> Option<String> {
    Some(r?.requests.as_ref()?.get("storage")?.0.clone())
}

/// Compares the claim template of `built` (from the spec) with `existing`'s
/// (the StatefulSet as it runs). Pure.
pub fn template_change(built: &StatefulSet, existing: &StatefulSet) -> TemplateChange {
    let (Some((modes, size, class)), Some((old_modes, old_size, old_class))) =
        (claim_shape(built), claim_shape(existing))
    else {
        return TemplateChange::Same;
    };
    if modes != old_modes || class != old_class {
        return TemplateChange::Kept;
    }
    match (quantity::bytes(&size), quantity::bytes(&old_size)) {
        (Some(new), Some(old)) if new == old => TemplateChange::Same,
        (Some(new), Some(old)) if new > old => TemplateChange::Grow {
            from: old_size,
            to: size,
        },
        _ if size == old_size => TemplateChange::Same,
        _ => TemplateChange::Kept,
    }
}

/// The ordinal of member claim `name` of StatefulSet `sts_name`
/// (`<template>-<statefulset>-<ordinal>`, [`resources::member_claim_name`]),
/// `None` for any other claim.
fn ordinal(sts_name: &str, name: &str) -> Option<u32> {
    let digits = name
        .strip_prefix(DATA_CLAIM_TEMPLATE)?
        .strip_prefix('-')?
        .strip_prefix(sts_name)?
        .strip_prefix('-')?;
    let canonical = !digits.is_empty() && (digits == "0" || !digits.starts_with('0'));
    (canonical && digits.chars().all(|c| c.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The member claims of `mirror`'s StatefulSet among `claims`, by ordinal:
/// those of members removed by a scale-down (retained) too. Pure.
pub fn member_claims<'a>(
    mirror: &str,
    claims: &'a [PersistentVolumeClaim],
) -> Vec<(u32, &'a PersistentVolumeClaim)> {
    let sts = resources::stateful_set_name(mirror);
    let mut members: Vec<_> = claims
        .iter()
        .filter_map(|c| Some((ordinal(&sts, &c.name_any())?, c)))
        .collect();
    members.sort_by_key(|(i, _)| *i);
    members
}

fn is_bound(claim: &PersistentVolumeClaim) -> bool {
    claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
}

fn requested(claim: &PersistentVolumeClaim) -> Option<u64> {
    quantity::bytes(&request(claim.spec.as_ref()?.resources.as_ref())?)
}

fn capacity(claim: &PersistentVolumeClaim) -> Option<&str> {
    Some(
        claim
            .status
            .as_ref()?
            .capacity
            .as_ref()?
            .get("storage")?
            .0
            .as_str(),
    )
}

/// The beta annotation naming a claim's StorageClass, which wins over
/// `spec.storageClassName` where it is set (Kubernetes'
/// `GetPersistentVolumeClaimClass`, which the expansion admission uses).
const BETA_CLASS_ANNOTATION: &str = "volume.beta.kubernetes.io/storage-class";

/// The StorageClass a claim names (`None`: none, or empty), as the API
/// server reads it for expansion.
pub fn class_of(claim: &PersistentVolumeClaim) -> Option<&str> {
    let class = match claim.annotations().get(BETA_CLASS_ANNOTATION) {
        Some(annotated) => Some(annotated.as_str()),
        None => claim.spec.as_ref()?.storage_class_name.as_deref(),
    };
    class.filter(|c| !c.is_empty())
}

/// What growing the member claims to `size` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Growth {
    /// Expand these claims (by name; those already at least `size` are left
    /// alone, never shrunk), then re-create the StatefulSet.
    Expand(Vec<String>),
    /// A claim cannot be expanded: nothing is to be written; the message
    /// says which claim, why, and what to do.
    Refused(String),
}

/// Whether every member claim (`claims`, from [`member_claims`]) below
/// `size` can be expanded to it, by the API server's rule for expansion
/// (the PersistentVolumeClaimResize admission: the claim is bound, names a
/// StorageClass, and that class has `allowVolumeExpansion: true`; a claim
/// without a class is refused whatever the cluster's default is). `classes`
/// holds each class the claims name: `None` when it does not exist. Pure.
pub fn plan_growth(
    size: &str,
    claims: &[(u32, &PersistentVolumeClaim)],
    replicas: i32,
    classes: &BTreeMap<String, Option<StorageClass>>,
) -> Growth {
    judge_growth(size, claims, replicas, classes, true)
}

/// [`plan_growth`] for claims that lag behind a template already applied
/// ([`lagging`]): the same judgement, but a refusal says they stay as they
/// are rather than that the spec is held back. Pure.
pub fn plan_lagging(
    size: &str,
    claims: &[(u32, &PersistentVolumeClaim)],
    replicas: i32,
    classes: &BTreeMap<String, Option<StorageClass>>,
) -> Growth {
    judge_growth(size, claims, replicas, classes, false)
}

fn judge_growth(
    size: &str,
    claims: &[(u32, &PersistentVolumeClaim)],
    replicas: i32,
    classes: &BTreeMap<String, Option<StorageClass>>,
    blocking: bool,
) -> Growth {
    let Some(target) = quantity::bytes(size) else {
        return Growth::Refused(format!("storage.size {size:?} is not a quantity"));
    };
    let mut expand = Vec::new();
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    for (ordinal, claim) in claims {
        if requested(claim).is_some_and(|r| r >= target) {
            continue;
        }
        // A claim of no member (after this spec's replicas) that never got a
        // volume is in no one's way: it keeps its size, as nothing uses it.
        if !is_bound(claim) && i64::from(*ordinal) >= i64::from(replicas) {
            continue;
        }
        let name = claim.name_any();
        match (is_bound(claim), class_of(claim)) {
            (false, _) => problems.push(format!(
                "claim {name} is not bound to a volume (only bound claims can be expanded; if its member never started, delete the claim)"
            )),
            (true, None) => problems.push(format!(
                "claim {name} has no StorageClass (only claims of a class that allows volume expansion can be expanded)"
            )),
            (true, Some(class)) => match classes.get(class) {
                Some(Some(sc)) if sc.allow_volume_expansion == Some(true) => {
                    expand.push(name);
                }
                Some(Some(_)) => {
                    problems.push(format!(
                        "StorageClass {class} of claim {name} does not allow volume expansion"
                    ));
                    let fix = format!(
                        "kubectl patch storageclass {class} -p '{{\"allowVolumeExpansion\":true}}', if its provisioner can expand volumes"
                    );
                    if !fixes.contains(&fix) {
                        fixes.push(fix);
                    }
                }
                _ => problems.push(format!(
                    "StorageClass {class} of claim {name} does not exist"
                )),
            },
        }
    }
    if problems.is_empty() {
        return Growth::Expand(expand);
    }
    if !blocking {
        return Growth::Refused(format!(
            "claims of running members ask for less than storage.size {size} and stay so: {}. To expand them: {}",
            problems.join("; "),
            if fixes.is_empty() {
                "make them expandable".to_owned()
            } else {
                fixes.join("; or ")
            }
        ));
    }
    fixes.push(
        "set storage.size back to status.storage.size, what the claims have (then every other change applies)".into(),
    );
    fixes.push("create a new mirror with the larger size".into());
    Growth::Refused(format!(
        "storage.size {size} needs every member's claim expanded, and Kubernetes will not: {}. Nothing was changed: the cache keeps its claims and this spec is not applied. To go on: {}",
        problems.join("; "),
        fixes.join("; or ")
    ))
}

/// The bytes each running member (ordinal below `replicas`) can be relied on
/// to hold: the smallest capacity their bound claims report (after an
/// expansion, `status.capacity` rises only once the volume and its file
/// system have grown; a claim kept from a removed member has no pod to finish
/// a file-system resize, so it does not count). Scaling changes the figure,
/// and so the configuration, only while the claims in use report different
/// capacities (a growth under way). `None` when no claim reports one. Pure.
pub fn settled_bytes(claims: &[(u32, &PersistentVolumeClaim)], replicas: i32) -> Option<u64> {
    claims
        .iter()
        .filter(|(i, c)| i64::from(*i) < i64::from(replicas) && is_bound(c))
        .filter_map(|(_, c)| quantity::bytes(capacity(c)?))
        .min()
}

/// The bound claims of running members (ordinal below `replicas`) that ask
/// for less than `size`: bound after a growth skipped them (Pending then),
/// or made by a template of before. They are expanded like a growth's
/// ([`plan_growth`]), without re-creating anything. Pure.
pub fn lagging<'a>(
    claims: &[(u32, &'a PersistentVolumeClaim)],
    replicas: i32,
    size: &str,
) -> Vec<(u32, &'a PersistentVolumeClaim)> {
    let Some(target) = quantity::bytes(size) else {
        return Vec::new();
    };
    claims
        .iter()
        .filter(|(i, c)| {
            i64::from(*i) < i64::from(replicas)
                && is_bound(c)
                && requested(c).is_some_and(|r| r < target)
        })
        .copied()
        .collect()
}

/// What the status says while member claims are still growing: each bound
/// claim whose capacity is below its request, with its resize condition
/// (`Resizing`, `FileSystemResizePending`) when it has one. `None` when none
/// is. `mirror` owns the claims, `namespace` is theirs (for the command it
/// suggests). Pure.
pub fn resizing(
    mirror: &str,
    claims: &[(u32, &PersistentVolumeClaim)],
    replicas: i32,
    namespace: &str,
) -> Option<String> {
    let mut growing = Vec::new();
    let mut restart = Vec::new();
    for (i, claim) in claims {
        let Some(have) = capacity(claim) else {
            continue;
        };
        let want = request(claim.spec.as_ref().and_then(|s| s.resources.as_ref()));
        let (Some(want), Some(have_bytes)) = (want, quantity::bytes(have)) else {
            continue;
        };
        if !is_bound(claim) || quantity::bytes(&want).is_none_or(|w| w <= have_bytes) {
            continue;
        }
        let condition = claim
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .find(|c| {
                c.status == "True"
                    && matches!(c.type_.as_str(), "Resizing" | "FileSystemResizePending")
            });
        let mut text = format!("{} holds {have} of {want}", claim.name_any());
        if let Some(c) = condition {
            text.push_str(&format!(" ({}", c.type_));
            if let Some(m) = c.message.as_deref().filter(|m| !m.is_empty()) {
                text.push_str(&format!(": {m}"));
            }
            text.push(')');
            if c.type_ == "FileSystemResizePending" {
                if i64::from(*i) < i64::from(replicas) {
                    restart.push(format!("{}-{i}", resources::stateful_set_name(mirror)));
                } else {
                    // No pod to restart: it grows when its member runs again.
                    text.push_str(" (no member runs on it: it grows when one does)");
                }
            }
        }
        growing.push(text);
    }
    if growing.is_empty() {
        return None;
    }
    let mut message = format!(
        "storage growing: {}; members keep within their old size until their claim reports the new capacity",
        growing.join(", ")
    );
    if !restart.is_empty() {
        message.push_str(&format!(
            "; a file system that grows only while unmounted grows when its member restarts (kubectl -n {namespace} delete pod {})",
            restart.join(" ")
        ));
    }
    Some(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use serde_json::{Value, json};

    fn claim(name: &str, spec: Value, status: Value) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": spec,
            "status": status,
        }))
        .unwrap()
    }

    fn bound(
        name: &str,
        class: Option<&str>,
        request: &str,
        capacity: &str,
    ) -> PersistentVolumeClaim {
        let mut spec = json!({"resources": {"requests": {"storage": request}}});
        if let Some(c) = class {
            spec["storageClassName"] = json!(c);
        }
        claim(
            name,
            spec,
            json!({"phase": "Bound", "capacity": {"storage": capacity}}),
        )
    }

    fn class(name: &str, expands: Option<bool>) -> (String, Option<StorageClass>) {
        let mut sc = json!({"metadata": {"name": name}, "provisioner": "example.com/p"});
        if let Some(e) = expands {
            sc["allowVolumeExpansion"] = json!(e);
        }
        (name.into(), Some(serde_json::from_value(sc).unwrap()))
    }

    fn sts(storage: Value) -> StatefulSet {
        let mut m = fixtures::mirror(true);
        m.spec.storage = serde_json::from_value(storage).unwrap();
        crate::resources::build(&m, &fixtures::settings(), None).stateful_set
    }

    #[test]
    fn only_a_larger_size_of_the_same_claims_is_a_growth() {
        let old = sts(json!({"size": "1Gi", "storageClassName": "fast"}));
        for (storage, expected) in [
            (
                json!({"size": "1Gi", "storageClassName": "fast"}),
                TemplateChange::Same,
            ),
            (
                json!({"size": "1024Mi", "storageClassName": "fast"}),
                TemplateChange::Same,
            ),
            (
                json!({"size": "2Gi", "storageClassName": "fast"}),
                TemplateChange::Grow {
                    from: "1Gi".into(),
                    to: "2Gi".into(),
                },
            ),
            (
                json!({"size": "512Mi", "storageClassName": "fast"}),
                TemplateChange::Kept,
            ),
            (
                json!({"size": "2Gi", "storageClassName": "slow"}),
                TemplateChange::Kept,
            ),
            (json!({"size": "2Gi"}), TemplateChange::Kept),
            (
                json!({"size": "2Gi", "storageClassName": "fast", "accessMode": "ReadWriteMany"}),
                TemplateChange::Kept,
            ),
        ] {
            assert_eq!(
                template_change(&sts(storage.clone()), &old),
                expected,
                "{storage}"
            );
        }
    }

    #[test]
    fn member_claims_are_the_templates_by_ordinal_retained_ones_too() {
        let claims = [
            bound("data-regmirror-hub-10", None, "1Gi", "1Gi"),
            bound("data-regmirror-hub-0", None, "1Gi", "1Gi"),
            bound("data-regmirror-hub-2", None, "1Gi", "1Gi"),
            bound("data-regmirror-hub-other-0", None, "1Gi", "1Gi"),
            bound("data-regmirror-hub-01", None, "1Gi", "1Gi"),
            bound("data-regmirror-hub-", None, "1Gi", "1Gi"),
            bound("regmirror-hub", None, "1Gi", "1Gi"),
        ];
        let found: Vec<(u32, String)> = member_claims("hub", &claims)
            .into_iter()
            .map(|(i, c)| (i, c.name_any()))
            .collect();
        assert_eq!(
            found,
            [
                (0, "data-regmirror-hub-0".to_owned()),
                (2, "data-regmirror-hub-2".to_owned()),
                (10, "data-regmirror-hub-10".to_owned()),
            ]
        );
    }

    #[test]
    fn growth_expands_claims_below_the_size_when_every_class_allows_it() {
        let claims = [
            bound("data-regmirror-hub-0", Some("fast"), "1Gi", "1Gi"),
            // Grown already (a pass that stopped half-way), or larger: left alone.
            bound("data-regmirror-hub-1", Some("fast"), "2Gi", "1Gi"),
            bound("data-regmirror-hub-2", Some("fast"), "5Gi", "5Gi"),
        ];
        let members = member_claims("hub", &claims);
        let classes = BTreeMap::from([class("fast", Some(true))]);
        assert_eq!(
            plan_growth("2Gi", &members, 8, &classes),
            Growth::Expand(vec!["data-regmirror-hub-0".into()])
        );
        // Everything grown: nothing to expand, the StatefulSet still to re-create.
        assert_eq!(
            plan_growth("1Gi", &members, 8, &classes),
            Growth::Expand(vec![])
        );
    }

    #[test]
    fn growth_is_refused_naming_each_claim_that_cannot_expand_and_what_to_do() {
        let claims = [
            bound("data-regmirror-hub-0", Some("fixed"), "1Gi", "1Gi"),
            bound("data-regmirror-hub-1", Some("unset"), "1Gi", "1Gi"),
            bound("data-regmirror-hub-2", None, "1Gi", "1Gi"),
            bound("data-regmirror-hub-3", Some("gone"), "1Gi", "1Gi"),
            claim(
                "data-regmirror-hub-4",
                json!({"storageClassName": "fast", "resources": {"requests": {"storage": "1Gi"}}}),
                json!({"phase": "Pending"}),
            ),
            bound("data-regmirror-hub-5", Some("fast"), "1Gi", "1Gi"),
        ];
        let mut annotated = bound("data-regmirror-hub-6", Some("fast"), "1Gi", "1Gi");
        annotated.metadata.annotations = Some(BTreeMap::from([(
            BETA_CLASS_ANNOTATION.to_owned(),
            "fixed".to_owned(),
        )]));
        let claims = [claims.as_slice(), &[annotated]].concat();
        let classes = BTreeMap::from([
            class("fixed", Some(false)),
            class("unset", None),
            class("fast", Some(true)),
            ("gone".to_owned(), None),
        ]);
        let Growth::Refused(message) =
            plan_growth("2Gi", &member_claims("hub", &claims), 8, &classes)
        else {
            panic!("refused expected");
        };
        for part in [
            "storage.size 2Gi needs every member's claim expanded",
            "StorageClass fixed of claim data-regmirror-hub-0 does not allow volume expansion",
            "StorageClass unset of claim data-regmirror-hub-1 does not allow volume expansion",
            "claim data-regmirror-hub-2 has no StorageClass",
            "StorageClass gone of claim data-regmirror-hub-3 does not exist",
            // The beta annotation wins over spec.storageClassName, as for the API server.
            "StorageClass fixed of claim data-regmirror-hub-6 does not allow volume expansion",
            "claim data-regmirror-hub-4 is not bound",
            "Nothing was changed",
            "kubectl patch storageclass fixed -p '{\"allowVolumeExpansion\":true}'",
            "kubectl patch storageclass unset",
            "; or set storage.size back to status.storage.size",
            "; or create a new mirror",
        ] {
            assert!(message.contains(part), "{part:?} in {message}");
        }
        assert!(!message.contains("hub-5"), "{message}");
        assert!(!message.contains(": or"), "{message}");
        // The Pending claim of a member this spec removes is in no one's way.
        let expandable = [
            bound("data-regmirror-hub-0", Some("fast"), "1Gi", "1Gi"),
            claim(
                "data-regmirror-hub-1",
                json!({"storageClassName": "fast", "resources": {"requests": {"storage": "1Gi"}}}),
                json!({"phase": "Pending"}),
            ),
        ];
        let members = member_claims("hub", &expandable);
        assert_eq!(
            plan_growth("2Gi", &members, 1, &classes),
            Growth::Expand(vec!["data-regmirror-hub-0".into()])
        );
        assert!(
            matches!(plan_growth("2Gi", &members, 2, &classes), Growth::Refused(m) if m.contains("delete the claim"))
        );
        // Lagging claims of an applied template: said, not held against the spec.
        let fixed = [bound("data-regmirror-hub-0", Some("fixed"), "1Gi", "1Gi")];
        let Growth::Refused(note) = plan_lagging("2Gi", &member_claims("hub", &fixed), 1, &classes)
        else {
            panic!("refused expected");
        };
        assert!(
            note.starts_with("claims of running members ask for less than storage.size 2Gi and stay so: StorageClass fixed of claim data-regmirror-hub-0 does not allow volume expansion. To expand them: kubectl patch storageclass fixed")
                && !note.contains("not applied"),
            "{note}"
        );
    }

    #[test]
    fn members_rely_on_the_smallest_capacity_their_claims_report() {
        let claims = [
            bound("data-regmirror-hub-0", Some("fast"), "2Gi", "2Gi"),
            bound("data-regmirror-hub-1", Some("fast"), "2Gi", "1Gi"),
            // A removed member's claim (no pod to finish its resize).
            bound("data-regmirror-hub-2", Some("fast"), "2Gi", "512Mi"),
            claim(
                "data-regmirror-hub-3",
                json!({}),
                json!({"phase": "Pending"}),
            ),
        ];
        let members = member_claims("hub", &claims);
        assert_eq!(settled_bytes(&members, 2), Some(1 << 30));
        assert_eq!(settled_bytes(&members, 1), Some(2 << 30));
        assert_eq!(settled_bytes(&members, 3), Some(512 << 20));
        assert_eq!(settled_bytes(&[], 1), None);
        // Claims in use asking for less than the size are to be expanded.
        let lag: Vec<String> = lagging(&members, 3, "2Gi")
            .iter()
            .map(|(_, c)| c.name_any())
            .collect();
        assert!(lag.is_empty(), "every claim asks for 2Gi: {lag:?}");
        let small = [
            bound("data-regmirror-hub-0", Some("fast"), "2Gi", "2Gi"),
            bound("data-regmirror-hub-1", Some("fast"), "1Gi", "1Gi"),
            bound("data-regmirror-hub-2", Some("fast"), "1Gi", "1Gi"),
        ];
        let members = member_claims("hub", &small);
        let lag: Vec<String> = lagging(&members, 2, "2Gi")
            .iter()
            .map(|(_, c)| c.name_any())
            .collect();
        assert_eq!(lag, ["data-regmirror-hub-1"], "member 2 is not running");
    }

    #[test]
    fn claims_still_growing_are_named_with_their_condition() {
        let mut pending = bound("data-regmirror-hub-1", Some("fast"), "2Gi", "1Gi");
        pending.status.as_mut().unwrap().conditions = Some(vec![
            serde_json::from_value(json!({"type": "FileSystemResizePending", "status": "True",
                "message": "Waiting for user to (re-)start a pod to finish file system resize of volume on node."}))
            .unwrap(),
        ]);
        let claims = [
            bound("data-regmirror-hub-0", Some("fast"), "2Gi", "1Gi"),
            pending,
            bound("data-regmirror-hub-2", Some("fast"), "2Gi", "2Gi"),
        ];
        let message = resizing("hub", &member_claims("hub", &claims), 3, "ns").unwrap();
        assert!(
            message.starts_with(
                "storage growing: data-regmirror-hub-0 holds 1Gi of 2Gi, data-regmirror-hub-1 holds 1Gi of 2Gi (FileSystemResizePending: Waiting for user"
            ),
            "{message}"
        );
        assert!(
            message.contains("kubectl -n ns delete pod regmirror-hub-1"),
            "{message}"
        );
        assert!(!message.contains("hub-2 holds"), "{message}");
        let grown = [bound("data-regmirror-hub-0", Some("fast"), "2Gi", "2Gi")];
        assert_eq!(
            resizing("hub", &member_claims("hub", &grown), 1, "ns"),
            None
        );
        // Member 1 scaled away: no pod to delete, it grows when one runs.
        let message = resizing("hub", &member_claims("hub", &claims), 1, "ns").unwrap();
        assert!(
            message.contains("no member runs on it") && !message.contains("delete pod"),
            "{message}"
        );
    }
}
