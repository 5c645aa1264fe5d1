//! Eviction: keeping the store within its byte budget and age limit.
//!
//! Content goes least recently *read* first (recency from the usage index,
//! [`super::usage`]), never while a reader holds a lease on it. Three things
//! start a pass: a fill that needs room ([`Store::admit`], synchronously,
//! before its first byte), a write that takes usage over the high watermark
//! (it wakes the sweeper), and the sweeper's timer, which expires content
//! older than `max_age`. What to remove is a pure plan ([`plan`]) over the
//! index; the pass carries it out.

use std::io;
use std::time::Duration;

use super::usage::{self, Entry, Key, Reservation};
use super::{Store, blocking};

/// How much the store may hold, and when content goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Byte budget for content; `None`: unlimited (the volume's size).
    pub max_size: Option<u64>,
    /// Eviction starts above this fraction of `max_size`...
    pub high_watermark: f64,
    /// ...and removes least recently used content down to this fraction.
    pub low_watermark: f64,
    /// Content not read for this long is removed whatever the size.
    pub max_age: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_size: None,
            high_watermark: 0.9,
            low_watermark: 0.8,
            max_age: None,
        }
    }
}

impl Limits {
    /// Bytes above which eviction starts; `None` without a budget.
    fn high(&self) -> Option<u64> {
        self.max_size
            .map(|m| (m as f64 * self.high_watermark) as u64)
    }

    /// Bytes an eviction pass brings usage down to; `None` without a budget.
    fn low(&self) -> Option<u64> {
        self.max_size
            .map(|m| (m as f64 * self.low_watermark) as u64)
    }
}

/// What one eviction pass removed, as (files, bytes) per reason.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Evicted {
    pub by_size: (u64, u64),
    pub by_age: (u64, u64),
}

/// How often the sweeper checks the store when nothing signals pressure:
/// a tenth of `max_age` (so content outlives it by at most 10%), within
/// 1 s..10 min; a minute without an age limit.
fn sweep_period(max_age: Option<Duration>) -> Duration {
    max_age.map_or(Duration::from_secs(60), |a| {
        (a / 10).clamp(Duration::from_secs(1), Duration::from_secs(600))
    })
}

/// Starts the sweeper: a task that runs an eviction pass whenever a write
/// signals pressure, and at least every tenth of `max_age` (1 s..10 min; a
/// minute without an age limit), until the process ends. `None` (no task)
/// for a store without limits.
pub fn spawn(store: Store) -> Option<tokio::task::JoinHandle<()>> {
    let limits = store.limits();
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

impl Store {
    /// Resolves when usage may need eviction.
    pub async fn pressure(&self) {
        self.pressure.notified().await
    }

    /// Wakes the sweeper if usage (stored plus reserved) is above the high
    /// watermark; called after every write.
    pub(super) fn wake_sweeper_if_over(&self) {
        if self
            .limits()
            .high()
            .is_some_and(|h| self.usage.committed() > h)
        {
            self.pressure.notify_one();
        }
    }

    /// Makes room for `bytes` about to be written: reserves them, evicting
    /// least recently used content first if the budget requires it. `None`
    /// when even that cannot keep the store within its budget.
    pub async fn admit(&self, bytes: u64) -> Option<Reservation> {
        let limits = self.limits();
        // More than the whole budget never fits: evicting first would only
        // empty the store for a blob that is passed through anyway (a
        // cluster member's share, budget / members, makes this common).
        if limits.max_size.is_some_and(|max| bytes > max) {
            return None;
        }
        let reservation = self.usage.reserve(bytes);
        let Some(max) = limits.max_size else {
            return Some(reservation);
        };
        if self.usage.committed() > limits.high().unwrap_or(max) {
            let _ = self.evict().await;
        }
        (self.usage.committed() <= max).then_some(reservation)
    }

    /// One eviction pass: content unused for `max_age`, then least recently
    /// used content until usage is under the low watermark. Logs and counts
    /// what it removed (`regmirror_evictions_total`, `..._evicted_bytes_total`).
    /// Errors only when the blocking task cannot run; a file that cannot be
    /// removed is logged and skipped.
    pub async fn evict(&self) -> io::Result<Evicted> {
        let ev = self.evict_pass().await?;
        for (reason, (files, bytes)) in [("size", ev.by_size), ("age", ev.by_age)] {
            if files > 0 {
                tracing::info!(reason, files, bytes, "evicted");
                let l = crate::metrics::ReasonLabels {
                    reason: reason.to_owned(),
                };
                self.metrics.evictions.get_or_create(&l).inc_by(files);
                self.metrics.evicted_bytes.get_or_create(&l).inc_by(bytes);
            }
        }
        Ok(ev)
    }

    async fn evict_pass(&self) -> io::Result<Evicted> {
        let _one = self.evicting.lock().await;
        if !self.usage.is_loaded() {
            return Ok(Evicted::default());
        }
        let committed = self.usage.committed();
        let limits = self.limits();
        let free = match (limits.high(), limits.low()) {
            (Some(high), Some(low)) if committed > high => committed - low,
            _ => 0,
        };
        let now = usage::now_ms();
        let max_age = limits.max_age;
        let plan = self.usage.scan(|entries| plan(entries, free, max_age, now));
        if plan.is_empty() {
            return Ok(Evicted::default());
        }
        let store = self.clone();
        let expired_before = expired_before(max_age, now);
        blocking(move || {
            let mut out = Evicted::default();
            for (key, _) in plan {
                // Ages are re-read under the index lock: a file read since the
                // plan was made keeps its place in the queue.
                let old = store
                    .usage
                    .last_used(&key)
                    .is_some_and(|u| u < expired_before);
                let Some(size) = store.usage.remove_if_unleased(&key) else {
                    continue;
                };
                let path = store.key_path(&key);
                for p in [path.with_extension("type"), path] {
                    match std::fs::remove_file(&p) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => {
                            tracing::warn!(path = %p.display(), error = %e, "cannot evict");
                        }
                        _ => {}
                    }
                }
                let slot = if old {
                    &mut out.by_age
                } else {
                    &mut out.by_size
                };
                slot.0 += 1;
                slot.1 += size;
            }
            Ok(out)
        })
        .await
    }
}

/// Content last used before this instant (ms since the epoch) is expired;
/// 0 (nothing) without an age limit.
fn expired_before(max_age: Option<Duration>, now: u64) -> u64 {
    max_age.map_or(0, |a| now.saturating_sub(a.as_millis() as u64))
}

/// Files to delete, least recently used first, as (key, size in bytes):
/// everything unused for `max_age` at `now` (ms since the epoch), then more
/// until `free` bytes are released. Leased files are never chosen.
pub fn plan<'a>(
    entries: impl Iterator<Item = (&'a Key, &'a Entry)>,
    free: u64,
    max_age: Option<Duration>,
    now: u64,
) -> Vec<(Key, u64)> {
    let mut candidates: Vec<(u64, Key, u64)> = entries
        .filter(|(_, e)| e.leases == 0)
        .map(|(k, e)| (e.last_used, *k, e.size))
        .collect();
    candidates.sort_unstable();
    let expired_before = expired_before(max_age, now);
    let mut freed = 0u64;
    candidates
        .into_iter()
        .take_while(|(used, _, size)| {
            let take = *used < expired_before || freed < free;
            if take {
                freed += size;
            }
            take
        })
        .map(|(_, k, s)| (k, s))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::oci::Algorithm;
    use crate::store::{Kind, Usage};

    fn hex(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn plan_eviction(u: &Usage, free: u64, max_age: Option<Duration>, now: u64) -> Vec<(Key, u64)> {
        u.scan(|entries| plan(entries, free, max_age, now))
    }

    #[test]
    fn least_recently_used_go_first_and_leases_protect() {
        let u = Arc::new(Usage::default());
        let keys: Vec<Key> = (1..=4)
            .map(|n| {
                u.key("docker.io", Kind::Blob, Algorithm::Sha256, &hex(n))
                    .unwrap()
            })
            .collect();
        // used at t=10, 40, 20, 30
        for (k, used) in keys.iter().zip([10, 40, 20, 30]) {
            u.insert(*k, 100, used);
        }
        assert_eq!(u.stored_bytes(), 400);
        let plan = plan_eviction(&u, 150, None, 1000);
        assert_eq!(plan, vec![(keys[0], 100), (keys[2], 100)]);
        let lease = u.lease(keys[0]);
        let plan = plan_eviction(&u, 150, None, 1000);
        assert_eq!(plan, vec![(keys[2], 100), (keys[3], 100)]);
        assert_eq!(u.remove_if_unleased(&keys[0]), None, "leased");
        drop(lease);
        assert_eq!(u.remove_if_unleased(&keys[0]), Some(100));
        assert_eq!(u.stored_bytes(), 300);
    }

    #[test]
    fn max_age_expires_old_content_without_size_pressure() {
        let u = Usage::default();
        let a = u
            .key("h", Kind::Manifest, Algorithm::Sha256, &hex(1))
            .unwrap();
        let b = u.key("h", Kind::Blob, Algorithm::Sha256, &hex(2)).unwrap();
        u.insert(a, 5, 100);
        u.insert(b, 5, 900);
        let plan = plan_eviction(&u, 0, Some(Duration::from_millis(500)), 1000);
        assert_eq!(plan, vec![(a, 5)]);
        assert!(plan_eviction(&u, 0, None, 1000).is_empty());
    }

    #[test]
    fn watermarks_are_fractions_of_the_budget() {
        let limits = Limits {
            max_size: Some(1000),
            ..Limits::default()
        };
        assert_eq!((limits.high(), limits.low()), (Some(900), Some(800)));
        assert_eq!(
            (Limits::default().high(), Limits::default().low()),
            (None, None)
        );
    }

    #[tokio::test]
    async fn a_lowered_budget_evicts_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<_> = (1..=5u8)
            .map(|n| {
                let d = Algorithm::Sha256.digest(&[n]);
                let p = crate::store::layout::blob_path(dir.path(), "h", &d);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, [n; 100]).unwrap();
                p
            })
            .collect();
        let limits = Limits {
            max_size: Some(1000),
            ..Limits::default()
        };
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let store = Store::open_with(dir.path(), limits, Arc::clone(&metrics))
            .await
            .unwrap();
        while !store.usage().is_loaded() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _sweeper = spawn(store.clone()).unwrap();
        assert_eq!(metrics.store_max_bytes.get(), 1000);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            store.usage().stored_bytes(),
            500,
            "within 1000: nothing goes"
        );

        // 300: evict above 270, down to 240; the sweeper, not a write, acts.
        store.set_max_size(Some(300));
        assert_eq!(metrics.store_max_bytes.get(), 300);
        assert_eq!(store.limits().max_size, Some(300));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.usage().stored_bytes() > 240 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(store.usage().stored_bytes(), 200);
        assert_eq!(paths.iter().filter(|p| p.exists()).count(), 2);
    }

    #[tokio::test]
    async fn content_larger_than_the_budget_evicts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for n in 1..=3u8 {
            let d = Algorithm::Sha256.digest(&[n]);
            let p = crate::store::layout::blob_path(dir.path(), "h", &d);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, [n; 100]).unwrap();
        }
        let limits = Limits {
            max_size: Some(1000),
            ..Limits::default()
        };
        let store = Store::open_with(dir.path(), limits, Arc::default())
            .await
            .unwrap();
        while !store.usage().is_loaded() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Can never fit: refused without evicting what is stored.
        assert!(store.admit(1001).await.is_none());
        assert_eq!(store.usage().stored_bytes(), 300);
        assert_eq!(store.usage().committed(), 300, "nothing left reserved");
        // Fits once older content goes: admitted, evicting.
        assert!(store.admit(900).await.is_some());
        assert!(store.usage().stored_bytes() < 300);
    }

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
