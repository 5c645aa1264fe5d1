//! Single-flight: concurrent callers with the same key share one run of the
//! work, which is spawned so that no caller's disconnect cancels it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};

use crate::error::{Error, Result};

type SharedResult<V> = Shared<BoxFuture<'static, Result<V>>>;

pub struct Flights<K, V: Clone> {
    map: Arc<Mutex<HashMap<K, SharedResult<V>>>>,
}

impl<K, V: Clone> Default for Flights<K, V> {
    fn default() -> Self {
        Self {
            map: Arc::default(),
        }
    }
}

impl<K, V> Flights<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Joins the flight for `key`, or starts `work` as a new one. The second
    /// value is true when this call joined a flight another caller started.
    pub async fn run(
        &self,
        key: K,
        work: impl FnOnce() -> BoxFuture<'static, Result<V>>,
    ) -> (Result<V>, bool) {
        let (shared, joined) = {
            let mut map = self.map.lock().expect("poisoned");
            match map.get(&key) {
                Some(s) => (s.clone(), true),
                None => {
                    let fut = work();
                    let map_ref = Arc::clone(&self.map);
                    let k = key.clone();
                    // The task removes its own entry; it cannot run before we
                    // insert it, since removal needs the lock we hold.
                    let handle = tokio::spawn(async move {
                        let r = fut.await;
                        map_ref.lock().expect("poisoned").remove(&k);
                        r
                    });
                    let s = async move { handle.await.unwrap_or_else(|e| Err(Error::internal(e))) }
                        .boxed()
                        .shared();
                    map.insert(key, s.clone());
                    (s, false)
                }
            }
        };
        (shared.await, joined)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights: Arc<Flights<&str, usize>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (f, runs) = (flights.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                f.run("k", move || {
                    async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
                    }
                    .boxed()
                })
                .await
            }));
        }
        let mut joined = 0;
        for t in tasks {
            let (r, j) = t.await.unwrap();
            assert_eq!(r.unwrap(), 1);
            joined += j as usize;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 15);
        // Finished flights are forgotten: the next call runs again.
        let (r, j) = flights.run("k", || async { Ok(7) }.boxed()).await;
        assert_eq!((r.unwrap(), j), (7, false));
    }

    #[tokio::test]
    async fn dropped_callers_do_not_cancel_the_work() {
        let flights: Arc<Flights<u8, ()>> = Arc::default();
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let caller = flights.run(1, move || {
            async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                d.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            .boxed()
        });
        let _ = tokio::time::timeout(Duration::from_millis(5), caller).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }
}
