//! Blob fills: one upstream download per blob, shared by every client.
//!
//! The first request for a cold blob starts a fill; the fill writes the body
//! to a temp file while hashing it, and publishes how many bytes are readable.
//! Every request for the same blob, any range, reads from that file as it
//! grows. The final bytes are published only once the digest has been
//! verified and the file renamed into the store, so a client can never
//! receive a complete body that does not match its digest.
//!
//! Before the first byte is written the fill is admitted against the byte
//! budget and its full size is allocated on disk, so a full disk shows up
//! as [`Error::StorageFull`] before any client has been answered, and the
//! caller can pass the blob through uncached instead.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::read::read_at;
use crate::store::{Kind, Store};

/// How much a reader sends per chunk, and how much the writer gathers
/// before one write, when more is already waiting.
const CHUNK: usize = 256 * 1024;

#[derive(Clone, Debug)]
pub enum FillState {
    Connecting,
    Streaming {
        size: Option<u64>,
        available: u64,
        file: Arc<File>,
    },
    Done {
        size: u64,
        file: Arc<File>,
    },
    Failed(Error),
}

pub struct Fill {
    rx: watch::Receiver<FillState>,
}

/// What a fill needs to run.
pub struct FillJob {
    pub store: Store,
    pub host: String,
    pub digest: Digest,
    /// The upstream GET, already past auth and redirects.
    pub fetch: BoxFuture<'static, Result<reqwest::Response>>,
    pub body_idle: Duration,
    pub metrics: Arc<Metrics>,
}

type FillKey = (String, Digest);

#[derive(Default)]
pub struct Fills {
    map: Mutex<HashMap<FillKey, Arc<Fill>>>,
}

impl Fills {
    /// The fill in flight for this blob, or a new one made from `job`.
    /// The flag is true when this call joined a fill already running.
    pub fn join_or_start(
        self: &Arc<Self>,
        host: &str,
        digest: &Digest,
        job: impl FnOnce() -> FillJob,
    ) -> (Arc<Fill>, bool) {
        let key = (host.to_owned(), digest.clone());
        let mut map = self.map.lock().expect("poisoned");
        if let Some(f) = map.get(&key) {
            return (Arc::clone(f), true);
        }
        let (tx, rx) = watch::channel(FillState::Connecting);
        let fill = Arc::new(Fill { rx });
        map.insert(key.clone(), Arc::clone(&fill));
        let job = job();
        let fills = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = run(&tx, job).await {
                tracing::warn!(upstream = %key.0, digest = %key.1, error = %e, "blob fill failed; nothing stored");
                tx.send_replace(FillState::Failed(e));
            }
            fills.map.lock().expect("poisoned").remove(&key);
        });
        (fill, false)
    }

    pub fn in_flight(&self, host: &str, digest: &Digest) -> Option<Arc<Fill>> {
        let map = self.map.lock().expect("poisoned");
        map.get(&(host.to_owned(), digest.clone())).cloned()
    }
}

impl Fill {
    /// Waits until the upstream answered; returns the blob size if known.
    pub async fn ready(&self) -> Result<Option<u64>> {
        let mut rx = self.rx.clone();
        loop {
            match &*rx.borrow_and_update() {
                FillState::Connecting => {}
                FillState::Streaming { size, .. } => return Ok(*size),
                FillState::Done { size, .. } => return Ok(Some(*size)),
                FillState::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(Error::internal("blob fill ended without a result"));
            }
        }
    }

    /// Bytes `start..end` (to the end if `None`) as they become available.
    pub fn read(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let reader = Reader {
            rx: self.rx.clone(),
            pos: start,
            end,
            finished: false,
        };
        futures::stream::unfold(reader, |mut r| async move {
            if r.finished {
                return None;
            }
            match r.next_chunk().await {
                Ok(Some(b)) => Some((Ok(b), r)),
                Ok(None) => None,
                Err(e) => {
                    r.finished = true;
                    Some((Err(e), r))
                }
            }
        })
    }
}

struct Reader {
    rx: watch::Receiver<FillState>,
    pos: u64,
    end: Option<u64>,
    finished: bool,
}

impl Reader {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let (file, limit, complete) = match &*self.rx.borrow_and_update() {
                FillState::Connecting => (None, 0, false),
                FillState::Streaming {
                    available, file, ..
                } => (Some(Arc::clone(file)), *available, false),
                FillState::Done { size, file } => (Some(Arc::clone(file)), *size, true),
                FillState::Failed(e) => return Err(io::Error::other(e.to_string())),
            };
            let target = self.end.map_or(limit, |e| e.min(limit));
            if let Some(file) = file.filter(|_| self.pos < target) {
                let len = (target - self.pos).min(CHUNK as u64) as usize;
                let pos = self.pos;
                let chunk = read_at(file, pos, len).await?;
                self.pos += chunk.len() as u64;
                return Ok(Some(chunk));
            }
            if complete || self.end.is_some_and(|e| self.pos >= e) {
                return Ok(None);
            }
            if self.rx.changed().await.is_err() {
                return Err(io::Error::other("blob fill ended without a result"));
            }
        }
    }
}

async fn run(tx: &watch::Sender<FillState>, job: FillJob) -> Result<()> {
    let unavailable = |detail: String| Error::UpstreamUnavailable {
        upstream: job.host.clone(),
        detail,
    };
    let invalid = |detail: String| Error::UpstreamInvalid {
        upstream: job.host.clone(),
        detail,
    };
    // A fill that finished just before this one started leaves nothing to do.
    let dest = job.store.blob_path(&job.host, &job.digest);
    if let Ok(f) = File::open(&dest) {
        let size = f.metadata()?.len();
        tx.send_replace(FillState::Done {
            size,
            file: Arc::new(f),
        });
        return Ok(());
    }
    let resp = job.fetch.await?;
    match resp.status().as_u16() {
        200 => {}
        404 => return Err(Error::BlobUnknown(job.digest.to_string())),
        s => return Err(invalid(format!("blob GET answered {s}"))),
    }
    let size = resp.content_length();
    let reservation = match size {
        Some(s) => Some(job.store.admit(s).await.ok_or_else(|| {
            Error::StorageFull(format!(
                "no room for {s} bytes within the cache's byte budget"
            ))
        })?),
        None => None,
    };
    let store = job.store.clone();
    let tmp = tokio::task::spawn_blocking(move || -> io::Result<_> {
        let tmp = store.temp_file()?;
        if let Some(s) = size {
            preallocate(tmp.file(), s)?;
        }
        Ok(tmp)
    })
    .await
    .map_err(Error::internal)?
    .map_err(storage_error)?;
    let file = Arc::new(tmp.try_clone_file()?);
    let upstream_bytes = job
        .metrics
        .upstream_bytes
        .get_or_create(&job.metrics.upstream(&job.host))
        .clone();
    tx.send_replace(FillState::Streaming {
        size,
        available: 0,
        file: Arc::clone(&file),
    });

    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut body = resp.bytes_stream();
    let mut eof = false;
    while !eof {
        let first = match tokio::time::timeout(job.body_idle, body.next()).await {
            Err(_) => {
                return Err(unavailable(format!(
                    "blob body stalled for {:?}",
                    job.body_idle
                )));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(unavailable(crate::upstream::describe(&e))),
            Ok(Some(Ok(c))) => c,
        };
        let mut buf = BytesMut::from(&first[..]);
        // Gather what has already arrived into one write.
        while buf.len() < CHUNK {
            match body.next().now_or_never() {
                Some(Some(Ok(c))) => buf.extend_from_slice(&c),
                Some(Some(Err(e))) => return Err(unavailable(crate::upstream::describe(&e))),
                Some(None) => {
                    eof = true;
                    break;
                }
                None => break,
            }
        }
        let len = buf.len() as u64;
        if size.is_some_and(|s| written + len > s) {
            return Err(invalid("blob body longer than its Content-Length".into()));
        }
        let f = Arc::clone(&file);
        let offset = written;
        hasher = tokio::task::spawn_blocking(move || -> io::Result<Sha256> {
            f.write_all_at(&buf, offset)?;
            hasher.update(&buf);
            Ok(hasher)
        })
        .await
        .map_err(Error::internal)?
        .map_err(storage_error)?;
        written += len;
        upstream_bytes.inc_by(len);
        if size == Some(written) {
            break;
        }
        // Without a known size, the newest chunk could be the last: hold it
        // back until the digest is checked.
        let publish = if size.is_some() {
            written
        } else {
            written - len
        };
        tx.send_modify(|s| {
            if let FillState::Streaming { available, .. } = s {
                *available = publish;
            }
        });
    }
    if let Some(s) = size.filter(|s| *s != written) {
        return Err(unavailable(format!(
            "blob body ended after {written} of {s} bytes"
        )));
    }
    let actual = Digest::from_hasher(hasher);
    if actual != job.digest {
        return Err(invalid(format!(
            "blob content does not match its digest (got {actual})"
        )));
    }
    // Verified: readers may have every byte now; the fsync and rename that
    // make the file durable need not hold them up.
    tx.send_modify(|s| {
        if let FillState::Streaming { available, .. } = s {
            *available = written;
        }
    });
    tokio::task::spawn_blocking(move || tmp.persist(&dest))
        .await
        .map_err(Error::internal)?
        .map_err(storage_error)?;
    // The reservation becomes the stored file: counting both at once would
    // make the evictor remove more than the budget requires.
    drop(reservation);
    job.store
        .record(&job.host, Kind::Blob, &job.digest, written);
    tx.send_replace(FillState::Done {
        size: written,
        file,
    });
    Ok(())
}

/// Claims the blob's whole size on disk up front, so that a full disk fails
/// the fill before anything was sent. Filesystems without fallocate skip it.
fn preallocate(file: &File, size: u64) -> io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn storage_error(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
            Error::StorageFull(e.to_string())
        }
        _ => Error::from(e),
    }
}
