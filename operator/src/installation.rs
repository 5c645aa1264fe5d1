//! One installation manages the RegistryMirrors (issue 18, item 3: a second
//! `helm install` in another namespace reconciled every cluster-scoped
//! mirror too; the two fought over `status.nodePort`, sent about 8,600
//! requests in 30 s, and one released a finalizer the other still held).
//!
//! RegistryMirrors are cluster-scoped, so the claim is too: the annotation
//! [`CLAIM`] on the RegistryMirror CRD names the installation
//! (`<namespace>/<lease>`) whose operator reconciles them. An installation
//! counts as alive while its leader Lease is held and renewed; an operator
//! whose installation is not the claimant takes the claim only from a dead
//! one (its Lease gone, released or expired), and otherwise waits, saying so
//! in its log, its `/readyz` and an event.

use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource};
use serde_json::json;

use crate::metrics::Metrics;

/// The annotation on `registrymirrors.regmirror.dev` naming the claimant.
pub const CLAIM: &str = "regmirror.dev/installation";
/// The CRD the claim is recorded on.
pub const CRD_NAME: &str = "registrymirrors.regmirror.dev";
/// How often a waiting operator looks at the claim again.
pub const RECHECK: Duration = Duration::from_secs(10);

/// An installation: the operator's namespace and leader Lease name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installation {
    pub namespace: String,
    pub lease: String,
}

impl Installation {
    /// The claim's text, `<namespace>/<lease>`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.lease)
    }

    /// The installation a claim's text names; `None` when malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let (namespace, lease) = text.split_once('/')?;
        (!namespace.is_empty() && !lease.is_empty()).then(|| Self {
            namespace: namespace.into(),
            lease: lease.into(),
        })
    }
}

/// What an operator does with the claim as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The claim names this installation: reconcile.
    Ours,
    /// Unclaimed, malformed, or its claimant is dead: claim it, then reconcile.
    Take,
    /// Another installation is alive and claims the mirrors: do not reconcile.
    Refuse { by: String },
}

/// How long another installation's leader Lease must have gone unrenewed
/// before its claim is taken over: far longer than a rolling restart, an
/// API server outage or a crash-looping operator's back-off, so a claimant
/// that is only briefly down keeps its mirrors (a reviewer moved every
/// mirror to a second installation by stopping the first for 10 s).
pub const CLAIM_GRACE: Duration = Duration::from_secs(600);

/// Decides from the claim's text (`None`: no claim) and, for another
/// installation's claim, that installation's leader Lease as read (`None`:
/// no such Lease). Another installation's claim is taken only when its
/// Lease has gone unrenewed for [`CLAIM_GRACE`] (a leftover of an
/// installation removed without its uninstall hook). Without a Lease there
/// is no telling whether the claimant is alive (it may run without leader
/// election): the claim stays until released by its uninstall hook or by
/// hand (`kubectl annotate crd registrymirrors.regmirror.dev
/// regmirror.dev/installation-`).
pub fn decide(
    claim: Option<&str>,
    me: &Installation,
    claimant_lease: Option<&Lease>,
    now: Timestamp,
) -> Verdict {
    let Some(claimant) = claim.and_then(Installation::parse) else {
        return Verdict::Take;
    };
    if &claimant == me {
        return Verdict::Ours;
    }
    let last_renewed = claimant_lease.and_then(|l| l.spec.as_ref()).and_then(|s| {
        s.renew_time
            .as_ref()
            .map(|t| (t.0, s.lease_duration_seconds.unwrap_or(15)))
    });
    match last_renewed {
        Some((renewed, duration)) => {
            let stale_after = SignedDuration::from_secs(i64::from(duration))
                + SignedDuration::from_secs(CLAIM_GRACE.as_secs() as i64);
            if renewed + stale_after < now {
                Verdict::Take
            } else {
                Verdict::Refuse { by: claimant.id() }
            }
        }
        None => Verdict::Refuse { by: claimant.id() },
    }
}

/// The claim's text on the RegistryMirror CRD `crd`, as written (`None`:
/// unclaimed).
pub fn claim_text(crd: &CustomResourceDefinition) -> Option<&str> {
    crd.metadata
        .annotations
        .as_ref()?
        .get(CLAIM)
        .map(String::as_str)
}

/// One round: read the claim (and the claimant's Lease), take it when
/// [`decide`] says so (a merge patch carrying the CRD's `resourceVersion`,
/// so of two installations taking at once one gets 409 and reads again).
pub async fn round(client: &Client, me: &Installation) -> kube::Result<Verdict> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = crds.get(CRD_NAME).await?;
    let claim = claim_text(&crd).map(str::to_owned);
    let lease = match claim.as_deref().and_then(Installation::parse) {
        Some(other) if &other != me => {
            Api::<Lease>::namespaced(client.clone(), &other.namespace)
                .get_opt(&other.lease)
                .await?
        }
        _ => None,
    };
    let verdict = decide(claim.as_deref(), me, lease.as_ref(), Timestamp::now());
    if verdict == Verdict::Take {
        let patch = json!({"metadata": {
            "resourceVersion": crd.metadata.resource_version,
            "annotations": {CLAIM: me.id()},
        }});
        crds.patch(CRD_NAME, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(installation = %me.id(), previous = ?claim, "this installation now manages the RegistryMirrors");
    }
    Ok(verdict)
}

/// Waits until this installation holds the claim. While another one does,
/// `/readyz` fails, the log says who (once, then once a minute at most) and
/// an event on the CRD says so once. API errors are retried every
/// [`RECHECK`].
pub async fn claim(client: &Client, me: &Installation, metrics: &Metrics, recorder: &Recorder) {
    let mut refused_by: Option<String> = None;
    let mut last_log: Option<std::time::Instant> = None;
    loop {
        match round(client, me).await {
            Ok(Verdict::Ours | Verdict::Take) => {
                if refused_by.is_some() {
                    metrics.ready.store(true, Ordering::Relaxed);
                }
                return;
            }
            Ok(Verdict::Refuse { by }) => {
                metrics.ready.store(false, Ordering::Relaxed);
                let due = last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                if refused_by.as_deref() != Some(by.as_str()) || due {
                    tracing::error!(
                        installation = %me.id(),
                        other = %by,
                        "another regmirror installation ({by}) manages the RegistryMirrors: this one does not reconcile them; uninstall one of them (helm uninstall in namespace {}). If {by} is gone without its uninstall hook, this one takes over {} after its leader Lease was last renewed, or at once after: kubectl annotate crd {CRD_NAME} {CLAIM}-",
                        me.namespace,
                        humantime::format_duration(CLAIM_GRACE)
                    );
                    last_log = Some(std::time::Instant::now());
                }
                if refused_by.as_deref() != Some(by.as_str()) {
                    publish_refusal(client, recorder, me, &by).await;
                    refused_by = Some(by);
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::controller::api_error_text(&e), "cannot read the installation claim on {CRD_NAME}; retrying");
            }
        }
        tokio::time::sleep(RECHECK).await;
    }
}

/// While this installation reconciles: every [`RECHECK`], claims the
/// mirrors again if the claim was dropped (an uninstall hook that ran but
/// did not remove the operator) and returns the other installation's id if
/// one, alive, holds it now (the caller stops reconciling).
pub async fn keep(client: &Client, me: &Installation) -> String {
    loop {
        tokio::time::sleep(RECHECK).await;
        match round(client, me).await {
            Ok(Verdict::Refuse { by }) => return by,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %crate::controller::api_error_text(&e), "cannot check the installation claim; retrying");
            }
        }
    }
}

async fn publish_refusal(client: &Client, recorder: &Recorder, me: &Installation, by: &str) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let Ok(crd) = crds.get(CRD_NAME).await else {
        return;
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "AnotherInstallation".into(),
        note: Some(format!(
            "the regmirror installation in {} does not reconcile RegistryMirrors: {by} manages them",
            me.namespace
        )),
        action: "Claim".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &crd.object_ref(&())).await {
        tracing::debug!(error = %e, "cannot publish the AnotherInstallation event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn me() -> Installation {
        Installation {
            namespace: "regmirror-b".into(),
            lease: "regmirror-operator".into(),
        }
    }

    fn lease(holder: &str, renewed: i64) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn claims_round_trip_and_malformed_ones_are_free() {
        assert_eq!(Installation::parse(&me().id()), Some(me()));
        for bad in ["", "ns", "/lease", "ns/"] {
            assert_eq!(Installation::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn another_installations_claim_is_taken_only_long_after_its_lease_lapsed() {
        let now = Timestamp::from_second(10_000).unwrap();
        let other = "regmirror-system/regmirror-operator";
        let refused = Verdict::Refuse { by: other.into() };
        assert_eq!(decide(None, &me(), None, now), Verdict::Take);
        assert_eq!(decide(Some("junk"), &me(), None, now), Verdict::Take);
        assert_eq!(decide(Some(&me().id()), &me(), None, now), Verdict::Ours);
        // Alive, briefly down (released, or expired within the grace), or
        // without a Lease at all (leader election off): still theirs.
        assert_eq!(
            decide(Some(other), &me(), Some(&lease("op-1", 9_990)), now),
            refused
        );
        assert_eq!(
            decide(Some(other), &me(), Some(&lease("", 9_900)), now),
            refused
        );
        assert_eq!(
            decide(Some(other), &me(), Some(&lease("op-1", 9_500)), now),
            refused
        );
        assert_eq!(decide(Some(other), &me(), None, now), refused);
        // Unrenewed for longer than the grace: a leftover.
        assert_eq!(
            decide(Some(other), &me(), Some(&lease("op-1", 9_000)), now),
            Verdict::Take
        );
        assert_eq!(
            decide(Some(other), &me(), Some(&lease("", 9_000)), now),
            Verdict::Take
        );
    }
}
