//! What an upstream received: one way to count requests and to wait for them,
//! whether the upstream is the real registry (its access log) or the fake (its
//! recorded requests).

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::util::wait_until;

/// An upstream that records the requests it received.
pub trait RequestLog: Sync {
    /// Names the upstream in failure messages (`docker-registry 127.0.0.1:PORT`).
    fn describe(&self) -> String;

    /// Number of requests recorded so far with this method (any case) whose
    /// path, query included, contains `path_contains`.
    fn count(&self, method: &str, path_contains: &str) -> usize;

    /// Waits until [`RequestLog::count`] reaches `at_least`, polling; returns
    /// the count then. Errors after `timeout`, naming the upstream, the
    /// request and the count reached.
    fn wait_count(
        &self,
        method: &str,
        path_contains: &str,
        at_least: usize,
        timeout: Duration,
    ) -> impl Future<Output = Result<usize>> + Send {
        async move {
            wait_until(timeout, || async move {
                self.count(method, path_contains) >= at_least
            })
            .await
            .with_context(|| {
                format!(
                    "{}: {at_least} {method} request(s) to a path containing {path_contains:?}; \
                     seen {}",
                    self.describe(),
                    self.count(method, path_contains)
                )
            })?;
            Ok(self.count(method, path_contains))
        }
    }
}
