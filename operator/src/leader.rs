//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator
//! replicas never reconcile at once. kube 5 ships no elector, so this is the
//! usual client-go protocol in small: read the Lease, decide (pure), write it
//! back with its `resourceVersion` (a concurrent writer gets 409 and re-reads).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub identity: String,
    /// How long a lease is valid without renewal; a standby takes over after it.
    pub duration: Duration,
    /// How often the holder renews (well under `duration`).
    pub renew_every: Duration,
}

impl LeaseConfig {
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

/// What to do with the lease as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Take it (it is free, expired or released); `transitions` is the new count.
    Acquire { transitions: i32 },
    /// We hold it: renew.
    Renew,
    /// Someone else holds a valid lease.
    Wait { holder: String },
}

/// Decides from the lease spec as read (`None`: no lease yet).
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire { transitions: 0 };
    };
    let transitions = spec.lease_transitions.unwrap_or(0);
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == me {
        return Decision::Renew;
    }
    let expires = spec.renew_time.as_ref().map(|t| {
        t.0 + SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)))
    });
    match expires {
        Some(e) if !holder.is_empty() && e > now => Decision::Wait {
            holder: holder.into(),
        },
        _ => Decision::Acquire {
            transitions: transitions + 1,
        },
    }
}

fn spec_for(
    cfg: &LeaseConfig,
    now: Timestamp,
    acquired: Option<Timestamp>,
    transitions: i32,
) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs() as i32),
        acquire_time: acquired.map(MicroTime),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    }
}

/// One read-decide-write round. `Ok(true)`: we hold the lease now.
pub async fn try_acquire_or_renew(api: &Api<Lease>, cfg: &LeaseConfig) -> kube::Result<bool> {
    let now = Timestamp::now();
    let current = api.get_opt(&cfg.name).await?;
    let decision = decide(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &cfg.identity,
        now,
    );
    let result = match (decision, current) {
        (Decision::Wait { holder }, _) => {
            tracing::debug!(%holder, "lease held by another replica");
            return Ok(false);
        }
        (Decision::Acquire { transitions }, None) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    ..Default::default()
                },
                spec: Some(spec_for(cfg, now, Some(now), transitions)),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        (Decision::Acquire { transitions }, Some(mut lease)) => {
            lease.spec = Some(spec_for(cfg, now, Some(now), transitions));
            api.replace(&cfg.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        (Decision::Renew, Some(mut lease)) => {
            let old = lease.spec.take().unwrap_or_default();
            let mut spec = spec_for(cfg, now, None, old.lease_transitions.unwrap_or(0));
            spec.acquire_time = old.acquire_time;
            lease.spec = Some(spec);
            api.replace(&cfg.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        (Decision::Renew, None) => unreachable!("renew needs a lease"),
    };
    match result {
        Ok(()) => Ok(true),
        // Someone else wrote first: not ours this round.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until this replica holds the lease.
pub async fn acquire(api: &Api<Lease>, cfg: &LeaseConfig) {
    loop {
        match try_acquire_or_renew(api, cfg).await {
            Ok(true) => {
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, "acquired leadership");
                return;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read or write the leader lease"),
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
}

/// Renews until the lease is lost (another replica took it, or renewal kept
/// failing until it expired); then returns, and the caller must stop reconciling.
pub async fn hold(api: &Api<Lease>, cfg: &LeaseConfig) {
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(cfg.renew_every).await;
        match try_acquire_or_renew(api, cfg).await {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %cfg.name, "leadership lost to another replica");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the leader lease");
                // Stop before the lease can expire under us and a standby starts.
                if last_renewed.elapsed() + cfg.renew_every >= cfg.duration {
                    tracing::error!(lease = %cfg.name, "leader lease not renewed in time");
                    return;
                }
            }
        }
    }
}

/// Gives the lease up on shutdown so a standby takes over at once.
pub async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(&cfg.identity) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    if let Err(e) = api.replace(&cfg.name, &PostParams::default(), &lease).await {
        tracing::warn!(error = %e, "cannot release the leader lease");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn lease(holder: Option<&str>, renewed: Option<i64>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(Into::into),
            renew_time: renewed.map(|s| MicroTime(at(s))),
            lease_duration_seconds: Some(15),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    #[test]
    fn free_expired_and_released_leases_are_taken() {
        assert_eq!(
            decide(None, "me", at(100)),
            Decision::Acquire { transitions: 0 }
        );
        let expired = lease(Some("other"), Some(80), 2);
        assert_eq!(
            decide(Some(&expired), "me", at(100)),
            Decision::Acquire { transitions: 3 }
        );
        let released = lease(None, None, 4);
        assert_eq!(
            decide(Some(&released), "me", at(100)),
            Decision::Acquire { transitions: 5 }
        );
    }

    #[test]
    fn valid_leases_are_respected_and_renewed() {
        let held = lease(Some("other"), Some(90), 1);
        assert_eq!(
            decide(Some(&held), "me", at(100)),
            Decision::Wait {
                holder: "other".into()
            }
        );
        let mine = lease(Some("me"), Some(10), 1);
        assert_eq!(decide(Some(&mine), "me", at(100)), Decision::Renew);
    }
}
