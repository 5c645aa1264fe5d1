//! Hashing a body behind its bytes, on the blocking pool.
//!
//! SHA-256 runs at about 2 GB/s on one core (with the CPU's SHA
//! instructions), the speed of a fast upstream on its own: hashed in step
//! with the body (receive a batch, hash it, receive the next), the upstream
//! waits for every hash and a cold transfer takes the sum of both times.
//! [`HashBehind`] takes the batches as they come instead and hashes them on
//! one blocking-pool thread while the body goes on arriving, at most
//! [`HASH_LAG`] bytes behind it; only the digest, at the end, is waited for.
//!
//! A worker runs only while batches are queued (it hands the hasher back
//! when the queue is empty, and the next batch starts another), so nothing
//! sits on the blocking pool while the body is waited for.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::oci::digest::Hasher;

/// Most bytes (received, not yet hashed) the hash may lag behind the body:
/// about 2 ms of hashing, enough to ride out a late batch, little to wait
/// for at the end, little memory per transfer.
pub const HASH_LAG: usize = 4 << 20;

/// A hasher fed batch by batch, hashing on the blocking pool behind them.
pub struct HashBehind {
    lane: Arc<Mutex<Lane>>,
    /// The newest worker; earlier ones have handed the hasher back.
    worker: Option<JoinHandle<()>>,
}

/// What the async side and the worker share.
struct Lane {
    /// Batches not yet taken by the worker.
    queued: VecDeque<Bytes>,
    /// Bytes queued or being hashed.
    behind: usize,
    /// Here while no worker runs; the worker's while one does.
    hasher: Option<Hasher>,
}

impl HashBehind {
    pub fn new(hasher: Hasher) -> Self {
        let lane = Lane {
            queued: VecDeque::new(),
            behind: 0,
            hasher: Some(hasher),
        };
        Self {
            lane: Arc::new(Mutex::new(lane)),
            worker: None,
        }
    }

    /// Queues `batch` to be hashed after every batch pushed before it, and
    /// returns once the hash is at most [`HASH_LAG`] bytes behind. Errors:
    /// [`Error::Internal`] if a worker failed (its hasher is lost).
    pub async fn push(&mut self, batch: Bytes) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (idle, behind) = {
            let mut lane = self.lock();
            lane.behind += batch.len();
            lane.queued.push_back(batch);
            (lane.hasher.take(), lane.behind)
        };
        if let Some(hasher) = idle {
            // The previous worker has handed the hasher back: it is done.
            let lane = Arc::clone(&self.lane);
            self.worker = Some(tokio::task::spawn_blocking(move || work(&lane, hasher)));
        }
        if behind > HASH_LAG {
            self.drain().await?;
        }
        Ok(())
    }

    /// The hasher once every pushed batch is hashed. Errors as for
    /// [`HashBehind::push`].
    pub async fn finish(mut self) -> Result<Hasher> {
        self.drain().await?;
        self.lock()
            .hasher
            .take()
            .ok_or_else(|| Error::internal("the body's hasher was lost"))
    }

    /// Waits until the queue is empty and the worker has handed the hasher
    /// back (nothing is pushed meanwhile).
    async fn drain(&mut self) -> Result<()> {
        if let Some(worker) = self.worker.take() {
            worker.await.map_err(Error::internal)?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lane> {
        lock(&self.lane)
    }
}

fn lock(lane: &Mutex<Lane>) -> std::sync::MutexGuard<'_, Lane> {
    lane.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Hashes queued batches in order until the queue is empty, then hands the
/// hasher back (blocking).
fn work(lane: &Mutex<Lane>, mut hasher: Hasher) {
    let mut done = 0;
    loop {
        let batch = {
            let mut lane = lock(lane);
            lane.behind -= done;
            match lane.queued.pop_front() {
                Some(batch) => batch,
                None => {
                    lane.hasher = Some(hasher);
                    return;
                }
            }
        };
        hasher.update(&batch);
        done = batch.len();
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

    #[tokio::test]
    async fn hashes_every_batch_in_order_whatever_the_lag() {
        // Far more than the lag allowed, in batches of odd sizes, some empty.
        let batches: Vec<Bytes> = (0..200u32)
            .map(|i| pattern((i as usize * 7919) % 100_000, i as u8))
            .collect();
        let whole = batches.concat();
        for algorithm in Algorithm::ALL {
            let mut hash = HashBehind::new(algorithm.hasher());
            for b in &batches {
                hash.push(b.clone()).await.unwrap();
                assert!(
                    hash.lock().behind <= HASH_LAG,
                    "the hash fell too far behind"
                );
            }
            let digest: Digest = hash.finish().await.unwrap().finish();
            assert_eq!(digest, algorithm.digest(&whole));
        }
    }

    #[tokio::test]
    async fn an_empty_body_has_the_empty_digest() {
        let hash = HashBehind::new(Algorithm::Sha256.hasher());
        assert_eq!(hash.finish().await.unwrap().finish(), Digest::of(b""));
    }
}
