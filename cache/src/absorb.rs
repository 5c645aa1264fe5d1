//! Copying and hashing a body's batches behind them, on one blocking-pool
//! thread.
//!
//! A cold body's batches must each be written to the fill's temp file
//! before they go out (readers read that file) and hashed before the last
//! one does (see [`crate::verify`]). SHA-256 runs at about 2 GB/s on one
//! core, the speed of a fast upstream on its own, so neither may hold up
//! the receiving: an [`Absorber`] takes each batch as it arrives and one
//! worker on the blocking pool copies it to the tee, reports it teed, then
//! hashes it, while the body goes on arriving, at most [`LAG`] bytes
//! behind.
//!
//! One worker does both, batch after batch, for as long as batches keep
//! coming: handing every batch to the blocking pool on its own (a task for
//! the write, another for the hash) cost about 10 000 thread wake-ups and
//! lock hand-offs per cold GiB, a tenth of the cache's CPU (`perf`, issue
//! 20). The worker waits up to [`LINGER`] for the next batch, then hands
//! its tee and hasher back and ends, so nothing sits on the blocking pool
//! while a slow body is waited for.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::oci::digest::Hasher;

/// Most bytes (received, not yet teed and hashed) the worker may lag behind
/// the body: about 2 ms of hashing, enough to ride out a late batch, little
/// to wait for at the end, little memory per transfer.
pub const LAG: usize = 4 << 20;

/// How long an idle worker waits for the next batch before it ends: longer
/// than the gap between a fast upstream's reads (well under a millisecond
/// here), short enough that a slow body holds no thread between batches. A
/// body holds a blocking-pool thread (tokio's pool has 512) only while it
/// delivers a batch at least every millisecond: 512 such bodies would be
/// tens of GB/s.
pub const LINGER: Duration = Duration::from_millis(1);

/// Where every batch is copied, on the blocking pool: called with the
/// batch's offset in the body (bytes) and its bytes, in order. An error
/// stops the copying and hashing; it is the absorber's error from then on.
pub type Tee = Box<dyn FnMut(u64, &[u8]) -> Result<()> + Send>;

/// Takes a body's batches and tees and hashes them behind it.
pub struct Absorber {
    shared: Arc<Shared>,
    /// Bytes pushed so far.
    pushed: u64,
}

struct Shared {
    lane: Mutex<Lane>,
    /// Signalled when a batch is queued, for an idle worker.
    queued: Condvar,
    /// Notified when the worker has made progress or ended.
    progress: Notify,
}

/// What the async side and the worker share.
struct Lane {
    /// Batches not yet taken by the worker, with their offsets.
    queued: VecDeque<(u64, Bytes)>,
    /// Bytes teed so far (a prefix of the body).
    teed: u64,
    /// Bytes pushed but not yet hashed.
    behind: usize,
    /// Here while no worker runs; the worker's while one does.
    parts: Option<Parts>,
    /// Whether a worker is running (or about to).
    working: bool,
    /// The tee's error (or a lost worker's): nothing is teed after it.
    failed: Option<Error>,
    /// Nothing more will be pushed: the worker ends once the queue is
    /// empty, without lingering.
    closed: bool,
}

struct Parts {
    tee: Option<Tee>,
    hasher: Hasher,
}

impl Absorber {
    /// An absorber hashing with `hasher` and copying to `tee`, if given.
    pub fn new(hasher: Hasher, tee: Option<Tee>) -> Self {
        let lane = Lane {
            queued: VecDeque::new(),
            teed: 0,
            behind: 0,
            parts: Some(Parts { tee, hasher }),
            working: false,
            failed: None,
            closed: false,
        };
        Self {
            shared: Arc::new(Shared {
                lane: Mutex::new(lane),
                queued: Condvar::new(),
                progress: Notify::new(),
            }),
            pushed: 0,
        }
    }

    /// Bytes pushed so far.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Whether the worker lags more than [`LAG`] behind: push nothing more
    /// until [`Absorber::progress`] says otherwise.
    pub fn is_full(&self) -> bool {
        self.shared.lock().behind > LAG
    }

    /// Queues `batch` to be teed and hashed after every batch pushed before
    /// it, starting a worker if none runs. Empty batches are skipped, and
    /// so is every batch after the tee failed: nothing is teed after an
    /// error.
    pub fn push(&mut self, batch: Bytes) {
        if batch.is_empty() {
            return;
        }
        let len = batch.len();
        let start = {
            let mut lane = self.shared.lock();
            if lane.failed.is_some() {
                return;
            }
            lane.behind += len;
            lane.queued.push_back((self.pushed, batch));
            !std::mem::replace(&mut lane.working, true)
        };
        self.pushed += len as u64;
        if start {
            let shared = Arc::clone(&self.shared);
            tokio::task::spawn_blocking(move || work(&shared));
        } else {
            self.shared.queued.notify_one();
        }
    }

    /// Bytes teed so far and the tee's error, if any (nothing more is teed
    /// after one).
    pub fn teed(&self) -> (u64, Option<Error>) {
        let lane = self.shared.lock();
        (lane.teed, lane.failed.clone())
    }

    /// Waits until the worker has made progress since the last call (a
    /// batch teed or hashed, an error, or its end); returns at once if it
    /// has already.
    pub async fn progress(&self) {
        self.shared.progress.notified().await;
    }

    /// The hasher once every pushed batch is teed and hashed; push nothing
    /// after this. Errors: the tee's error; [`Error::Internal`] if the
    /// worker was lost (a panic) or the hasher was already taken.
    pub async fn finish(&mut self) -> Result<Hasher> {
        loop {
            let notified = self.shared.progress.notified();
            {
                let mut lane = self.shared.lock();
                if let Some(e) = lane.failed.clone() {
                    return Err(e);
                }
                if !lane.working {
                    return lane
                        .parts
                        .take()
                        .map(|p| p.hasher)
                        .ok_or_else(|| Error::internal("the body's hasher was lost"));
                }
                // An idle worker ends at once rather than after its linger.
                lane.closed = true;
            }
            self.shared.queued.notify_one();
            notified.await;
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Lane> {
        self.lane.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Tees and hashes queued batches in order until none comes for
/// [`LINGER`] (or the tee fails, or the absorber is finishing), then hands
/// the parts back (blocking).
fn work(shared: &Shared) {
    // Whatever ends the worker, a panic included, the async side hears of it.
    let _end = WorkerEnd(shared);
    let mut lane = shared.lock();
    let Some(mut parts) = lane.parts.take() else {
        lane.working = false;
        return;
    };
    loop {
        let Some((offset, batch)) = lane.queued.pop_front() else {
            if lane.closed {
                break;
            }
            lane = shared
                .queued
                .wait_timeout_while(lane, LINGER, |l| l.queued.is_empty() && !l.closed)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            if lane.queued.is_empty() {
                break;
            }
            continue;
        };
        drop(lane);
        let teed = match parts.tee.as_mut() {
            Some(tee) => tee(offset, &batch),
            None => Ok(()),
        };
        lane = shared.lock();
        if let Err(e) = teed {
            lane.failed = Some(e);
            lane.queued.clear();
            lane.behind = 0;
            break;
        }
        lane.teed = offset + batch.len() as u64;
        drop(lane);
        shared.progress.notify_one();
        parts.hasher.update(&batch);
        lane = shared.lock();
        let was_full = lane.behind > LAG;
        lane.behind -= batch.len();
        if was_full && lane.behind <= LAG {
            // The async side may be waiting to push again.
            shared.progress.notify_one();
        }
    }
    // Under the same lock as the decision to end: a batch pushed after it
    // starts a new worker.
    lane.parts = Some(parts);
    lane.working = false;
}

/// Tells the async side the worker has ended, when dropped; after a panic
/// (whose parts are lost) also fails the absorber with [`Error::Internal`]
/// and lets a later push start a worker. A worker that ends normally has
/// already cleared `working` itself, and by now it may be a newer worker's.
struct WorkerEnd<'a>(&'a Shared);

impl Drop for WorkerEnd<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut lane = self.0.lock();
            lane.failed = Some(Error::internal("the body's tee or hash worker panicked"));
            lane.working = false;
        }
        self.0.progress.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Algorithm, Digest};

    fn pattern(len: usize, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<_>>()
            .into()
    }

    /// Pushes `batches`, waiting whenever the worker lags too far.
    async fn push_all(a: &mut Absorber, batches: &[Bytes]) {
        for b in batches {
            while a.is_full() {
                a.progress().await;
            }
            a.push(b.clone());
            assert!(
                a.shared.lock().behind <= LAG + b.len(),
                "pushed past the lag"
            );
        }
    }

    #[tokio::test]
    async fn tees_and_hashes_every_batch_in_order_whatever_the_lag() {
        // Far more than the lag allowed, in batches of odd sizes, some empty.
        let batches: Vec<Bytes> = (0..200u32)
            .map(|i| pattern((i as usize * 7919) % 100_000, i as u8))
            .collect();
        let whole = batches.concat();
        for algorithm in Algorithm::ALL {
            let copy = Arc::new(Mutex::new(Vec::new()));
            let c = Arc::clone(&copy);
            let tee: Tee = Box::new(move |offset, bytes| {
                let mut c = c.lock().unwrap();
                assert_eq!(offset, c.len() as u64, "teed out of order");
                c.extend_from_slice(bytes);
                Ok(())
            });
            let mut a = Absorber::new(algorithm.hasher(), Some(tee));
            push_all(&mut a, &batches).await;
            assert_eq!(a.pushed(), whole.len() as u64);
            let digest: Digest = a.finish().await.unwrap().finish();
            assert_eq!(digest, algorithm.digest(&whole));
            assert_eq!(*copy.lock().unwrap(), whole);
        }
    }

    #[tokio::test]
    async fn a_batch_is_reported_teed_before_the_worker_ends() {
        let mut a = Absorber::new(Algorithm::Sha256.hasher(), None);
        a.push(pattern(1000, 1));
        for _ in 0..1000 {
            if a.teed().0 == 1000 {
                break;
            }
            a.progress().await;
        }
        assert_eq!(a.teed().0, 1000);
        // The worker is gone once idle: a later batch starts another.
        tokio::time::sleep(LINGER * 4).await;
        assert!(!a.shared.lock().working, "the worker outlived its linger");
        a.push(pattern(24, 2));
        let digest = a.finish().await.unwrap().finish();
        assert_eq!(
            digest,
            Digest::of(&[pattern(1000, 1), pattern(24, 2)].concat())
        );
    }

    #[tokio::test]
    async fn a_tee_error_stops_the_copying_and_is_the_result() {
        let mut calls = 0;
        let tee: Tee = Box::new(move |_, _| {
            calls += 1;
            if calls == 2 {
                Err(Error::StorageFull("disk".into()))
            } else {
                Ok(())
            }
        });
        let mut a = Absorber::new(Algorithm::Sha256.hasher(), Some(tee));
        for i in 0..4 {
            a.push(pattern(100, i));
        }
        let Err(err) = a.finish().await else {
            panic!("the tee error was lost")
        };
        assert_eq!(a.teed().0, 100, "teed past the error");
        assert!(matches!(err, Error::StorageFull(_)), "{err:?}");
    }

    /// A batch pushed the moment a lingering worker has ended starts a new
    /// worker; the old one's end must not be taken for a panic (found by a
    /// review: a slow upstream failed about half its cold pulls).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_push_right_after_a_workers_end_is_not_a_failure() {
        let mut a = Absorber::new(Algorithm::Sha256.hasher(), None);
        let mut all = vec![pattern(64, 0)];
        a.push(all[0].clone());
        for i in 1..1000u32 {
            let b = pattern(64, i as u8);
            all.push(b.clone());
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            // Spin until the worker lets go, then push (as `push` does) in
            // the same critical section, before its end is complete.
            loop {
                let mut lane = a.shared.lock();
                if !lane.working {
                    lane.behind += b.len();
                    lane.queued.push_back((a.pushed, b));
                    lane.working = true;
                    drop(lane);
                    a.pushed += 64;
                    let shared = Arc::clone(&a.shared);
                    tokio::task::spawn_blocking(move || work(&shared));
                    break;
                }
                drop(lane);
                assert!(std::time::Instant::now() < deadline, "worker never ended");
                std::hint::spin_loop();
            }
            if let (_, Some(e)) = a.teed() {
                panic!("after {i} worker ends, a healthy absorber failed: {e}");
            }
        }
        let digest = a.finish().await.unwrap().finish();
        assert_eq!(digest, Digest::of(&all.concat()));
    }

    #[tokio::test]
    async fn an_empty_body_has_the_empty_digest() {
        let mut a = Absorber::new(Algorithm::Sha256.hasher(), None);
        assert_eq!(a.finish().await.unwrap().finish(), Digest::of(b""));
    }
}
