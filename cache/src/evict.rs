//! The background evictor: keeps the store within its byte budget and age
//! limit. Fills also evict synchronously when they need room (see
//! `Store::admit`); this task handles pressure after writes and expiry.

use std::time::Duration;

use crate::store::Store;

/// How often the store is checked when nothing signals pressure.
fn sweep_period(max_age: Option<Duration>) -> Duration {
    max_age.map_or(Duration::from_secs(60), |a| {
        (a / 10).clamp(Duration::from_secs(1), Duration::from_secs(600))
    })
}

/// Runs until the process ends; does nothing for a store without limits.
pub fn spawn(store: Store) -> Option<tokio::task::JoinHandle<()>> {
    let limits = *store.limits();
    if limits.max_size.is_none() && limits.max_age.is_none() {
        return None;
    }
    let period = sweep_period(limits.max_age);
    Some(tokio::spawn(async move {
        loop {
            tokio::select! {
                () = store.pressure() => {}
                () = tokio::time::sleep(period) => {}
            }
            if let Err(e) = store.evict().await {
                tracing::warn!(error = %e, "eviction pass failed");
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_often_enough_for_the_age_limit() {
        assert_eq!(sweep_period(None), Duration::from_secs(60));
        assert_eq!(
            sweep_period(Some(Duration::from_secs(5))),
            Duration::from_secs(1)
        );
        assert_eq!(
            sweep_period(Some(Duration::from_secs(600))),
            Duration::from_secs(60)
        );
        assert_eq!(
            sweep_period(Some(Duration::from_secs(30 * 86400))),
            Duration::from_secs(600)
        );
    }
}
