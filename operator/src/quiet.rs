//! Rate-limited failure logging (issue 17): a failure that repeats is logged
//! once, then at most once per [`FailureLog::every`] with how many repeats
//! were left out; the first success after failures is logged once.
//!
//! Pure decisions on a caller-supplied clock, so the node agent's loop stays
//! the only place that logs and the rules are tested here.

use std::time::{Duration, Instant};

/// How often a repeating failure is logged again (with its count).
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// What the caller should log for one event; `None` means stay quiet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Say {
    /// Log this failure; `suppressed` same failures were left out since the
    /// last line about it (0 for a new failure).
    Failure { suppressed: u64 },
    /// The first success after `failures` failures over `lasted`.
    Recovered { failures: u64, lasted: Duration },
}

/// The state of one source of failures (one watch, one kind of request).
#[derive(Debug, Clone)]
pub struct FailureLog {
    /// Minimum time between two lines about the same failure.
    pub every: Duration,
    current: Option<Failing>,
}

#[derive(Debug, Clone)]
struct Failing {
    /// The failure's text; a different text is a new failure, logged at once.
    what: String,
    since: Instant,
    logged_at: Instant,
    suppressed: u64,
    failures: u64,
}

impl Default for FailureLog {
    fn default() -> Self {
        Self::new(LOG_EVERY)
    }
}

impl FailureLog {
    /// A source that logs a repeating failure at most once per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            current: None,
        }
    }

    /// Whether the last event was a failure.
    pub fn failing(&self) -> bool {
        self.current.is_some()
    }

    /// A failure described by `what` at `now`: `Some` when it is to be logged.
    pub fn failure(&mut self, what: &str, now: Instant) -> Option<Say> {
        match &mut self.current {
            Some(f) if f.what == what => {
                f.failures += 1;
                if now.saturating_duration_since(f.logged_at) < self.every {
                    f.suppressed += 1;
                    return None;
                }
                let suppressed = std::mem::take(&mut f.suppressed);
                f.logged_at = now;
                Some(Say::Failure { suppressed })
            }
            Some(f) => {
                // Another failure of the same source: say it, keep the episode's start.
                f.what = what.to_owned();
                f.logged_at = now;
                f.suppressed = 0;
                f.failures += 1;
                Some(Say::Failure { suppressed: 0 })
            }
            None => {
                self.current = Some(Failing {
                    what: what.to_owned(),
                    since: now,
                    logged_at: now,
                    suppressed: 0,
                    failures: 1,
                });
                Some(Say::Failure { suppressed: 0 })
            }
        }
    }

    /// A success at `now`: `Some` once, for the first success after failures.
    pub fn success(&mut self, now: Instant) -> Option<Say> {
        self.current.take().map(|f| Say::Recovered {
            failures: f.failures,
            lasted: now.saturating_duration_since(f.since),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_failure_is_logged_once_then_once_per_period_with_a_count() {
        let t0 = Instant::now();
        let mut log = FailureLog::new(Duration::from_secs(60));
        assert_eq!(
            log.failure("refused", t0),
            Some(Say::Failure { suppressed: 0 })
        );
        for s in 1..=59 {
            assert_eq!(log.failure("refused", t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(
            log.failure("refused", t0 + Duration::from_secs(60)),
            Some(Say::Failure { suppressed: 59 })
        );
        assert_eq!(log.failure("refused", t0 + Duration::from_secs(61)), None);
        assert!(log.failing());
    }

    #[test]
    fn a_different_failure_is_logged_at_once() {
        let t0 = Instant::now();
        let mut log = FailureLog::default();
        assert!(log.failure("refused", t0).is_some());
        assert_eq!(log.failure("refused", t0), None);
        assert_eq!(
            log.failure("403 forbidden", t0 + Duration::from_secs(1)),
            Some(Say::Failure { suppressed: 0 })
        );
        assert_eq!(
            log.failure("403 forbidden", t0 + Duration::from_secs(2)),
            None
        );
    }

    #[test]
    fn recovery_is_logged_once_with_the_episode() {
        let t0 = Instant::now();
        let mut log = FailureLog::default();
        assert_eq!(log.success(t0), None, "no failure, nothing to say");
        log.failure("refused", t0);
        log.failure("refused", t0 + Duration::from_secs(3));
        log.failure("401", t0 + Duration::from_secs(5));
        assert_eq!(
            log.success(t0 + Duration::from_secs(9)),
            Some(Say::Recovered {
                failures: 3,
                lasted: Duration::from_secs(9)
            })
        );
        assert_eq!(log.success(t0 + Duration::from_secs(10)), None);
        assert!(!log.failing());
        // A new episode starts counting afresh.
        assert_eq!(
            log.failure("refused", t0 + Duration::from_secs(11)),
            Some(Say::Failure { suppressed: 0 })
        );
    }
}
