//! Blob fills: one upstream download per blob, shared by every client.
//!
//! The first request for a cold blob starts a fill; the fill writes the body
//! to a temp file as it arrives, and publishes how many bytes are readable.
//! Every request for the same blob, any range, reads from that file as it
//! grows (on HTTP/1, sent from that file with `sendfile(2)`, see
//! [`Fill::read_zero_copy`]). The body goes through [`verified`], so the final bytes are
//! published only once the digest has been checked: a client can never
//! receive a complete body that does not match its digest. The file is then
//! renamed into the store. Should that rename fail, the verified bytes are
//! still in the open file: every client that joined the fill, reading
//! already or not yet, gets them from there, and a request that comes after
//! the fill has ended starts another one, to store the blob
//! ([`FillState::Done`]).
//!
//! The fill gets its body from [`FillJob::fetch`], an [`UpstreamBody`] whose
//! status the caller has already checked, so it runs as well on chunks made
//! in memory (see the tests below) as on an upstream's response.
//!
//! Before the first byte is written the fill is admitted against the byte
//! budget and its full size is allocated on disk, so a full disk shows up
//! as [`Error::StorageFull`] before any client has been answered, and the
//! caller can pass the blob through uncached instead.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::read::read_at;
use crate::store::{Kind, Reservation, Store};
use crate::upstream::UpstreamBody;
use crate::verify::{Tee, verified};
use crate::zerocopy::{self, SendQueue};

/// How much a reader sends per chunk.
const CHUNK: usize = 256 * 1024;

#[derive(Clone, Debug)]
pub enum FillState {
    Connecting,
    Streaming {
        size: Option<u64>,
        available: u64,
        file: Arc<File>,
    },
    /// Every byte is verified and readable from `file`.
    Done {
        size: u64,
        file: Arc<File>,
        /// Whether the blob is in the store. `false` when the rename into
        /// the store failed: `file` is then the temp file, already unlinked,
        /// which its readers keep on disk until the last one is done.
        stored: bool,
        /// For a blob not stored, the reservation of its bytes (when its
        /// size was known), released with this state, that is when the last
        /// reader is gone and the unlinked file's space is freed.
        held: Option<Arc<Reservation>>,
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
    /// The upstream's answer to the blob GET, already past auth, redirects
    /// and the status check (a 404 or other failure is this future's error,
    /// which every client of the fill gets). Awaited once, by the fill.
    pub fetch: BoxFuture<'static, Result<UpstreamBody>>,
    /// Longest wait for the next chunk of the body before the fill fails
    /// with [`Error::UpstreamUnavailable`].
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

    /// Bytes `start..end` (to the end if `None`) as they become available,
    /// read from the fill's file in chunks of up to 256 KiB.
    pub fn read(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        self.reader(start, end, None)
    }

    /// Bytes `start..end` (to the end if `None`) as they become available,
    /// as placeholder chunks for a connection whose socket is a
    /// [`zerocopy::ZeroCopyStream`] sharing `queue`: each stands for all the
    /// bytes available when it is made (up to [`zerocopy::CHUNK`]), sent
    /// from the fill's file with `sendfile(2)`, never copied in user space.
    pub fn read_zero_copy(
        &self,
        queue: SendQueue,
        start: u64,
        end: Option<u64>,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        // The fill's state (its file, and the reservation of a blob not
        // stored) lives until the last queued byte is sent.
        let hold: Arc<dyn Send + Sync> = Arc::new(self.rx.clone());
        self.reader(start, end, Some((queue, hold)))
    }

    fn reader(
        &self,
        start: u64,
        end: Option<u64>,
        zero_copy: Option<(SendQueue, Arc<dyn Send + Sync>)>,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let reader = Reader {
            rx: self.rx.clone(),
            start,
            pos: start,
            end,
            finished: false,
            zero_copy,
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
    start: u64,
    pos: u64,
    end: Option<u64>,
    finished: bool,
    /// The connection's queue and what its ranges hold, to send placeholder
    /// chunks instead of bytes read.
    zero_copy: Option<(SendQueue, Arc<dyn Send + Sync>)>,
}

impl Reader {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let (file, limit, complete) = match &*self.rx.borrow_and_update() {
                FillState::Connecting => (None, 0, false),
                FillState::Streaming {
                    available, file, ..
                } => (Some(Arc::clone(file)), *available, false),
                FillState::Done { size, file, .. } => (Some(Arc::clone(file)), *size, true),
                FillState::Failed(e) => return Err(io::Error::other(e.to_string())),
            };
            let target = self.end.map_or(limit, |e| e.min(limit));
            if let Some(file) = file.filter(|_| self.pos < target) {
                let (pos, first) = (self.pos, self.pos == self.start);
                let chunk = match &self.zero_copy {
                    Some((queue, hold)) => {
                        let len = (target - pos).min(zerocopy::CHUNK as u64) as usize;
                        zerocopy::file_chunk(queue, &file, pos, len, hold, first)?
                    }
                    None => {
                        let len = (target - pos).min(CHUNK as u64) as usize;
                        read_at(file, pos, len).await?
                    }
                };
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
    // A fill that finished just before this one started leaves nothing to do.
    let dest = job.store.blob_path(&job.host, &job.digest);
    if let Ok(f) = File::open(&dest) {
        let size = f.metadata()?.len();
        tx.send_replace(FillState::Done {
            size,
            file: Arc::new(f),
            stored: true,
            held: None,
        });
        return Ok(());
    }
    let body = job.fetch.await?;
    let size = body.len;
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
    // A body handed over by a cluster member (named as its source, see
    // `cluster::handover::source`) costs the upstream nothing.
    let from_upstream = body.upstream == job.host;
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

    // Every batch is written as it arrives; readers get it once released.
    let writer = Arc::clone(&file);
    let write: Tee = Box::new(move |offset, bytes| {
        writer.write_all_at(bytes, offset).map_err(storage_error)?;
        if from_upstream {
            upstream_bytes.inc_by(bytes.len() as u64);
        }
        Ok(())
    });
    let mut released = pin!(verified(
        idle_limited(body, job.body_idle),
        job.digest.clone(),
        Some(write),
    ));
    let mut written = 0u64;
    while let Some(batch) = released.next().await {
        written += batch?.len() as u64;
        tx.send_modify(|s| {
            if let FillState::Streaming { available, .. } = s {
                *available = written;
            }
        });
    }
    // Verified and released: the fsync and rename that make the file durable
    // need not hold readers up.
    let persisted = tokio::task::spawn_blocking(move || tmp.persist(&dest))
        .await
        .map_err(Error::internal)?;
    let (stored, held) = match persisted {
        Ok(()) => {
            // The reservation becomes the stored file: counting both at once
            // would make the evictor remove more than the budget requires.
            drop(reservation);
            job.store
                .record(&job.host, Kind::Blob, &job.digest, written);
            (true, None)
        }
        // Every byte checked out and the file is open: its clients need not
        // lose them. The failed persist has unlinked the temp file (or, when
        // only the directory's fsync failed, left it in place, unrecorded, as
        // a failed fill always has).
        Err(e) => {
            tracing::warn!(upstream = %job.host, digest = %job.digest, error = %e, "blob verified but not stored: its rename into the store failed; served from its temp file, fetched again on the next request");
            job.metrics.unstored_blobs.inc();
            (false, reservation.map(Arc::new))
        }
    };
    tx.send_replace(FillState::Done {
        size: written,
        file,
        stored,
        held,
    });
    Ok(())
}

/// `body`, failing with [`Error::UpstreamUnavailable`] "blob body stalled
/// for ..." (and then ending) when no chunk arrives for `idle`.
fn idle_limited(body: UpstreamBody, idle: Duration) -> UpstreamBody {
    let upstream = body.upstream.clone();
    let chunks = futures::stream::unfold(Some(body.chunks), move |chunks| {
        let upstream = upstream.clone();
        async move {
            let mut chunks = chunks?;
            match tokio::time::timeout(idle, chunks.next()).await {
                Ok(chunk) => Some((chunk?, Some(chunks))),
                Err(_) => {
                    let stalled = Error::UpstreamUnavailable {
                        upstream,
                        detail: format!("blob body stalled for {idle:?}"),
                    };
                    Some((Err(stalled), None))
                }
            }
        }
    });
    UpstreamBody::new(&body.upstream, body.len, chunks)
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::FutureExt;
    use futures::channel::mpsc;

    use super::*;
    use crate::oci::Algorithm;
    use crate::store::Limits;
    use crate::verify::BATCH;

    const HOST: &str = "r.example";
    const IDLE: Duration = Duration::from_secs(30);

    type Feed = mpsc::UnboundedSender<Result<Bytes>>;

    /// A store in a temp dir and the fills running on it.
    struct Harness {
        _dir: tempfile::TempDir,
        store: Store,
        fills: Arc<Fills>,
        /// How many fetch futures were made and how many ran.
        jobs: Arc<AtomicUsize>,
        fetches: Arc<AtomicUsize>,
    }

    impl Harness {
        async fn new() -> Self {
            Self::with_limits(Limits::default()).await
        }

        async fn with_limits(limits: Limits) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open_with(dir.path(), limits, Arc::default())
                .await
                .unwrap();
            Self {
                _dir: dir,
                store,
                fills: Arc::default(),
                jobs: Arc::default(),
                fetches: Arc::default(),
            }
        }

        /// Joins the fill of `digest`, or starts one whose upstream body is
        /// `len` bytes (if known) fed through the returned sender.
        fn join(&self, digest: &Digest, len: Option<u64>) -> (Arc<Fill>, bool, Feed) {
            let (feed, chunks) = mpsc::unbounded();
            let body = UpstreamBody::new(HOST, len, chunks);
            let (fill, joined) = self.join_with(digest, async move { Ok(body) }.boxed());
            (fill, joined, feed)
        }

        fn join_with(
            &self,
            digest: &Digest,
            fetch: BoxFuture<'static, Result<UpstreamBody>>,
        ) -> (Arc<Fill>, bool) {
            self.fills.join_or_start(HOST, digest, || {
                self.jobs.fetch_add(1, Ordering::SeqCst);
                let fetches = Arc::clone(&self.fetches);
                FillJob {
                    store: self.store.clone(),
                    host: HOST.to_owned(),
                    digest: digest.clone(),
                    fetch: async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        fetch.await
                    }
                    .boxed(),
                    body_idle: IDLE,
                    metrics: Arc::clone(self.store.metrics()),
                }
            })
        }

        fn stored(&self, digest: &Digest) -> Option<Vec<u8>> {
            std::fs::read(self.store.blob_path(HOST, digest)).ok()
        }

        /// Files left in the store's temp directory (`<root>/tmp/<pid>-<nonce>`).
        fn temp_files(&self) -> usize {
            self.store.temp_files()
        }

        fn upstream_bytes(&self) -> u64 {
            let m = self.store.metrics();
            m.upstream_bytes.get_or_create(&m.upstream(HOST)).get()
        }

        /// Asserts that the fill failed and left nothing behind.
        async fn assert_nothing_stored(&self, digest: &Digest) {
            settle().await;
            assert!(self.stored(digest).is_none(), "a failed fill was stored");
            assert_eq!(self.temp_files(), 0, "a temp file was left");
            assert_eq!(self.store.usage().committed(), 0, "bytes still reserved");
            assert!(self.fills.in_flight(HOST, digest).is_none());
        }
    }

    /// With the clock paused: returns once every task is waiting and no
    /// blocking work runs, i.e. the fill has done all it can with what it got.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    fn pattern(len: usize) -> Bytes {
        (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>().into()
    }

    /// Sends `content` in chunks of `size`.
    fn send(feed: &Feed, content: &[u8], size: usize) {
        for c in content.chunks(size) {
            feed.unbounded_send(Ok(Bytes::copy_from_slice(c))).unwrap();
        }
    }

    /// The next `n` bytes of `reader`.
    async fn read_n(
        reader: &mut (impl Stream<Item = io::Result<Bytes>> + Unpin),
        n: usize,
    ) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            got.extend_from_slice(&reader.next().await.unwrap().unwrap());
        }
        got
    }

    /// Everything `reader` yields, and the error it ended with.
    async fn read_rest(
        reader: &mut (impl Stream<Item = io::Result<Bytes>> + Unpin),
    ) -> (Vec<u8>, Option<io::Error>) {
        let mut got = Vec::new();
        while let Some(item) = reader.next().await {
            match item {
                Ok(b) => got.extend_from_slice(&b),
                Err(e) => {
                    assert!(reader.next().await.is_none(), "a read after the error");
                    return (got, Some(e));
                }
            }
        }
        (got, None)
    }

    /// Whether `reader` has nothing more to give for now (clock paused).
    async fn holds_back(reader: &mut (impl Stream<Item = io::Result<Bytes>> + Unpin)) -> bool {
        tokio::time::timeout(Duration::from_secs(1), reader.next())
            .await
            .is_err()
    }

    #[tokio::test(start_paused = true)]
    async fn a_corrupt_body_never_releases_its_last_bytes_and_is_not_stored() {
        let h = Harness::new().await;
        let good = pattern(BATCH);
        let digest = Digest::of(&[&good[..], &[7; BATCH][..]].concat());
        let (fill, _, feed) = h.join(&digest, Some(2 * BATCH as u64));
        assert_eq!(fill.ready().await.unwrap(), Some(2 * BATCH as u64));
        let mut reader = Box::pin(fill.read(0, None));
        send(&feed, &good, BATCH);
        assert_eq!(read_n(&mut reader, BATCH).await, good);
        send(&feed, &[8; BATCH], BATCH);
        let (rest, error) = read_rest(&mut reader).await;
        assert!(
            rest.is_empty(),
            "{} bytes of the corrupt end were read",
            rest.len()
        );
        assert!(
            error
                .unwrap()
                .to_string()
                .contains("does not match its digest"),
            "wrong error"
        );
        // Every byte came and was written; none of the last was published.
        assert_eq!(h.upstream_bytes(), 2 * BATCH as u64);
        let late = Box::pin(fill.read(BATCH as u64, None)).next().await;
        assert!(late.unwrap().is_err(), "a later reader got the end");
        assert!(matches!(
            fill.ready().await,
            Err(Error::UpstreamInvalid { .. })
        ));
        h.assert_nothing_stored(&digest).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_corrupt_body_without_a_length_releases_only_what_came_before_the_newest_batch() {
        let h = Harness::new().await;
        let (a, b) = (pattern(BATCH), Bytes::from(vec![9; BATCH]));
        let digest = Digest::of(&[&a[..], &[7; BATCH][..]].concat());
        let (fill, _, feed) = h.join(&digest, None);
        assert_eq!(fill.ready().await.unwrap(), None);
        let mut reader = Box::pin(fill.read(0, None));
        send(&feed, &a, BATCH);
        send(&feed, &b, BATCH);
        settle().await;
        assert_eq!(h.upstream_bytes(), 2 * BATCH as u64, "both batches written");
        assert_eq!(read_n(&mut reader, BATCH).await, a);
        assert!(
            holds_back(&mut reader).await,
            "the newest batch was published"
        );
        drop(feed);
        let (rest, error) = read_rest(&mut reader).await;
        assert!(
            rest.is_empty(),
            "{} bytes of the corrupt end were read",
            rest.len()
        );
        assert!(error.is_some());
        h.assert_nothing_stored(&digest).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_without_a_length_is_verified_and_stored() {
        let h = Harness::new().await;
        let content = pattern(3 * BATCH + 17);
        let digest = Digest::of(&content);
        let (fill, _, feed) = h.join(&digest, None);
        let mut reader = Box::pin(fill.read(0, None));
        send(&feed, &content, BATCH);
        settle().await;
        // All came, but only the end of the body says which batch is last.
        assert_eq!(read_n(&mut reader, 3 * BATCH).await, content[..3 * BATCH]);
        assert!(
            holds_back(&mut reader).await,
            "the newest batch was published"
        );
        drop(feed);
        let (rest, error) = read_rest(&mut reader).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(rest, content[3 * BATCH..]);
        settle().await;
        assert_eq!(h.stored(&digest).as_deref(), Some(&content[..]));
        assert_eq!(h.temp_files(), 0);
        assert_eq!(h.store.usage().committed(), content.len() as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sha512_blob_is_hashed_with_sha512_and_stored_under_it() {
        let h = Harness::new().await;
        let content = pattern(2 * BATCH + 3);
        let digest = Algorithm::Sha512.digest(&content);
        let (fill, _, feed) = h.join(&digest, Some(content.len() as u64));
        let mut reader = Box::pin(fill.read(0, None));
        send(&feed, &content, BATCH);
        let (got, error) = read_rest(&mut reader).await;
        assert!(error.is_none(), "{error:?}");
        assert!(got == content[..], "other bytes");
        settle().await;
        assert_eq!(h.stored(&digest).as_deref(), Some(&content[..]));
        assert!(
            h.store
                .blob_path(HOST, &digest)
                .to_string_lossy()
                .contains("/blobs/sha512/"),
            "stored under its algorithm"
        );
        assert_eq!(h.store.usage().files(), 1);
        assert_eq!(h.store.usage().committed(), content.len() as u64);

        // The bytes of another sha512 digest are refused and not stored.
        let wrong = Algorithm::Sha512.digest(b"something else");
        let (fill, _, feed) = h.join(&wrong, None);
        let mut reader = Box::pin(fill.read(0, None));
        send(&feed, &content, BATCH);
        drop(feed);
        let (_, error) = read_rest(&mut reader).await;
        let error = error.expect("a mismatch was released").to_string();
        assert!(error.contains("does not match its digest"), "{error}");
        settle().await;
        assert!(h.stored(&wrong).is_none());
        assert_eq!(h.temp_files(), 0);
    }

    /// Fills a 10-byte blob whose digest is that of `expected` from a body
    /// that sends `sent` (in chunks of 5) and then ends; returns the error a
    /// reader got, having checked that the reader never had 10 bytes and
    /// that nothing was stored.
    async fn fill_fails(expected: &[u8], sent: &[u8]) -> String {
        let h = Harness::new().await;
        let digest = Digest::of(expected);
        let (fill, _, feed) = h.join(&digest, Some(10));
        let mut reader = Box::pin(fill.read(0, None));
        send(&feed, sent, 5);
        drop(feed);
        let (got, error) = read_rest(&mut reader).await;
        assert!(got.len() < 10, "the whole body was read");
        h.assert_nothing_stored(&digest).await;
        error.expect("the fill succeeded").to_string()
    }

    #[tokio::test(start_paused = true)]
    async fn an_overlong_body_fails() {
        let error = fill_fails(b"helloworld", b"helloworld!").await;
        assert!(error.contains("longer than its Content-Length"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_body_fails() {
        // The digest of what came: only the length tells it is short.
        let error = fill_fails(b"hello", b"hello").await;
        assert!(error.contains("ended after 5 of 10 bytes"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_after_the_idle_timeout() {
        let h = Harness::new().await;
        let digest = Digest::of(b"helloworld");
        let (fill, _, feed) = h.join(&digest, Some(10));
        let mut reader = Box::pin(fill.read(0, None));
        send(&feed, b"hello", 5);
        assert_eq!(read_n(&mut reader, 5).await, b"hello");
        let stalled_from = tokio::time::Instant::now();
        let (_, error) = tokio::time::timeout(2 * IDLE, read_rest(&mut reader))
            .await
            .expect("the stall was not noticed");
        let waited = stalled_from.elapsed();
        assert!(
            (IDLE..IDLE + Duration::from_secs(1)).contains(&waited),
            "failed after {waited:?}"
        );
        let error = error.unwrap().to_string();
        assert!(error.contains("blob body stalled for 30s"), "{error}");
        assert!(matches!(
            fill.ready().await,
            Err(Error::UpstreamUnavailable { .. })
        ));
        h.assert_nothing_stored(&digest).await;
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_joiners_share_one_fetch() {
        let h = Arc::new(Harness::new().await);
        let content = pattern(3 * BATCH + 100);
        let digest = Digest::of(&content);
        let (fill, joined, feed) = h.join(&digest, Some(content.len() as u64));
        assert!(!joined);
        let mut readers = Vec::new();
        for _ in 0..8 {
            let (h, digest) = (Arc::clone(&h), digest.clone());
            readers.push(tokio::spawn(async move {
                let (fill, joined, _) = h.join(&digest, None);
                let mut reader = Box::pin(fill.read(0, None));
                (joined, read_rest(&mut reader).await)
            }));
        }
        settle().await;
        send(&feed, &content, 1000);
        for r in readers {
            let (joined, (got, error)) = r.await.unwrap();
            assert!(joined, "a second fill started");
            assert!(error.is_none(), "{error:?}");
            assert!(got == content, "a joiner got other bytes");
        }
        assert_eq!(
            read_rest(&mut Box::pin(fill.read(0, None))).await.0,
            content
        );
        assert_eq!(h.jobs.load(Ordering::SeqCst), 1, "fetches made");
        assert_eq!(h.fetches.load(Ordering::SeqCst), 1, "fetches run");
        assert_eq!(h.upstream_bytes(), content.len() as u64);
        settle().await;
        assert_eq!(h.stored(&digest).as_deref(), Some(&content[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_joiner_gets_the_bytes_it_missed() {
        let h = Harness::new().await;
        let content = pattern(3 * BATCH);
        let digest = Digest::of(&content);
        let (first, _, feed) = h.join(&digest, Some(content.len() as u64));
        let mut early = Box::pin(first.read(0, None));
        send(&feed, &content[..2 * BATCH], BATCH);
        assert_eq!(read_n(&mut early, 2 * BATCH).await, content[..2 * BATCH]);

        let (late, joined, _) = h.join(&digest, None);
        assert!(joined && Arc::ptr_eq(&first, &late));
        let mut late = Box::pin(late.read(0, None));
        // What was written is there at once, before the rest comes.
        assert_eq!(read_n(&mut late, 2 * BATCH).await, content[..2 * BATCH]);
        send(&feed, &content[2 * BATCH..], BATCH);
        let (rest, error) = read_rest(&mut late).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(rest, content[2 * BATCH..]);
        assert_eq!(read_rest(&mut early).await.0, content[2 * BATCH..]);
        assert_eq!(h.fetches.load(Ordering::SeqCst), 1);

        // Done: the next request finds it stored and fetches nothing.
        settle().await;
        assert!(h.fills.in_flight(HOST, &digest).is_none());
        let (again, joined, _) = h.join(&digest, None);
        assert!(!joined);
        assert_eq!(again.ready().await.unwrap(), Some(content.len() as u64));
        assert_eq!(h.fetches.load(Ordering::SeqCst), 1, "fetched a stored blob");
    }

    /// Makes the rename of `digest`'s fill fail: a file stands where the
    /// blob's directory must be (so creating it fails with ENOTDIR, root or
    /// not). Returns that file, to remove.
    fn block_the_store(h: &Harness, digest: &Digest) -> std::path::PathBuf {
        let blob = h.store.blob_path(HOST, digest);
        let parent = blob.parent().unwrap().to_owned();
        std::fs::create_dir_all(parent.parent().unwrap()).unwrap();
        std::fs::write(&parent, b"in the way").unwrap();
        parent
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_rename_still_serves_the_verified_bytes_and_stores_nothing() {
        let h = Harness::new().await;
        let content = pattern(3 * BATCH + 5);
        let len = content.len() as u64;
        let digest = Digest::of(&content);
        let obstacle = block_the_store(&h, &digest);
        let (fill, _, feed) = h.join(&digest, Some(len));
        let mut early = Box::pin(fill.read(0, None));
        send(&feed, &content[..BATCH], BATCH);
        assert_eq!(read_n(&mut early, BATCH).await, content[..BATCH]);
        // Joined while the fill runs; reads only after it ended.
        let (joiner, joined, _) = h.join(&digest, None);
        assert!(joined);
        send(&feed, &content[BATCH..], BATCH);
        settle().await;

        // Verified, not stored: the fill is over, its file unlinked, its
        // reservation held while its readers still read.
        assert!(matches!(
            &*fill.rx.borrow(),
            FillState::Done { stored: false, size, .. } if *size == len
        ));
        assert!(h.fills.in_flight(HOST, &digest).is_none());
        assert!(h.stored(&digest).is_none());
        assert_eq!(h.temp_files(), 0, "the temp file was kept");
        assert_eq!(h.store.usage().files(), 0, "recorded as stored");
        assert_eq!(h.store.usage().committed(), len);
        assert_eq!(h.store.metrics().unstored_blobs.get(), 1);

        let (rest, error) = read_rest(&mut early).await;
        assert!(error.is_none(), "{error:?}");
        assert!(rest == content[BATCH..], "the attached reader lost bytes");
        let (late, error) = read_rest(&mut Box::pin(joiner.read(0, None))).await;
        assert!(error.is_none(), "{error:?}");
        assert!(late == content, "the joiner lost bytes");
        assert_eq!(fill.ready().await.unwrap(), Some(len));
        drop((early, fill, joiner));
        assert_eq!(h.store.usage().committed(), 0, "bytes still reserved");

        // The next request fetches it again, and stores it this time.
        std::fs::remove_file(obstacle).unwrap();
        let (again, joined, feed) = h.join(&digest, Some(len));
        assert!(!joined, "joined a fill that was over");
        let mut reader = Box::pin(again.read(0, None));
        send(&feed, &content, BATCH);
        let (got, error) = read_rest(&mut reader).await;
        assert!(error.is_none(), "{error:?}");
        assert!(got == content);
        settle().await;
        assert_eq!(h.fetches.load(Ordering::SeqCst), 2);
        assert_eq!(h.stored(&digest).as_deref(), Some(&content[..]));
        assert_eq!(h.store.usage().committed(), len);
        assert_eq!(h.temp_files(), 0);
        assert_eq!(h.store.metrics().unstored_blobs.get(), 1);
    }

    #[tokio::test]
    async fn a_zero_copy_reader_sends_each_range_from_the_file_as_it_is_written() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let h = Harness::new().await;
        let content = pattern(5 * BATCH + 7);
        let digest = Digest::of(&content);
        let (fill, _, feed) = h.join(&digest, Some(content.len() as u64));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(connect, listener.accept());
        let (mut client, (server, queue)) = (
            client.unwrap(),
            zerocopy::ZeroCopyStream::new(accepted.unwrap().0),
        );
        let mut server = Box::pin(server);
        let mut reader = Box::pin(fill.read_zero_copy(queue, BATCH as u64 + 3, None));
        let receiving = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        // Two batches now, the rest once those are on their way.
        send(&feed, &content[..2 * BATCH], BATCH);
        let mut chunks = 0;
        let mut rest = Some(&content[2 * BATCH..]);
        while let Some(chunk) = reader.next().await {
            let chunk = chunk.unwrap();
            assert!(chunk.iter().all(|&b| b == 0), "bytes, not placeholders");
            server.write_all(&chunk).await.unwrap();
            chunks += 1;
            if let Some(rest) = rest.take() {
                send(&feed, rest, BATCH);
            }
        }
        server.shutdown().await.unwrap();
        let got = receiving.await.unwrap();
        assert!(got == content[BATCH + 3..], "other bytes were sent");
        assert!(chunks >= 2, "sent before the fill ended: {chunks} chunk(s)");
    }

    #[tokio::test]
    async fn a_failed_fetch_fails_every_joiner() {
        let h = Harness::new().await;
        let digest = Digest::of(b"x");
        let (gate, opened) = tokio::sync::oneshot::channel::<()>();
        let fetch = async move {
            let _ = opened.await;
            Err(Error::BlobUnknown("x".into()))
        };
        let (fill, _) = h.join_with(&digest, fetch.boxed());
        let (joiner, joined, _) = h.join(&digest, None);
        assert!(joined);
        gate.send(()).unwrap();
        for f in [fill, joiner] {
            assert!(matches!(f.ready().await, Err(Error::BlobUnknown(_))));
        }
        assert_eq!(h.fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_over_the_budget_fails_before_anything_is_written() {
        let h = Harness::with_limits(Limits {
            max_size: Some(100),
            ..Limits::default()
        })
        .await;
        let digest = Digest::of(&[0; 1000]);
        let (fill, _, feed) = h.join(&digest, Some(1000));
        send(&feed, &[0; 1000], 1000);
        assert!(matches!(fill.ready().await, Err(Error::StorageFull(_))));
        assert_eq!(h.upstream_bytes(), 0, "bytes were written");
        h.assert_nothing_stored(&digest).await;
    }
}
