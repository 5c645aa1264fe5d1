//! Checking an upstream blob body against its digest before its last bytes
//! go out.
//!
//! A client may receive a body's bytes as they arrive, but never all of a
//! body that does not match its digest: the batch that ends the body is
//! released only once the digest has been checked. With a known length that
//! batch is the one reaching it, and every earlier batch is released as soon
//! as it is teed; without one, any batch could be the last, so the newest is
//! held back until the next one is teed or the body ends. The fill (which
//! writes every batch to its temp file through a [`Tee`]) and the uncached
//! pass-through both read upstream bodies through [`verified`].
//!
//! Teeing and hashing run behind the body ([`Absorber`]): the body goes on
//! being received while earlier batches are written and hashed on the
//! blocking pool, and only the batch that ends the body waits for the hash
//! of everything. So receiving, writing and hashing overlap, and a cold
//! transfer takes about as long as the slowest of them rather than their
//! sum.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, Fuse};
use futures::{FutureExt, Stream, StreamExt};

use crate::absorb::Absorber;
pub use crate::absorb::Tee;
use crate::error::{Error, Result};
use crate::oci::Digest;
use crate::upstream::UpstreamBody;

/// Most bytes gathered from chunks that have already arrived into one batch
/// (one write and one hand-over to the worker), so that small chunks do not
/// cost a trip each. A single larger chunk is one batch as it is.
pub const BATCH: usize = 256 * 1024;

/// `body`'s bytes, in batches released as the module docs say, checked
/// against `digest` with its algorithm (sha256 or sha512), and copied to
/// `tee` first, if given. A body with a
/// known length is not read past it. The stream ends after the last byte of
/// a body that matched, or with one error, after which it ends:
/// - [`Error::UpstreamInvalid`] "blob body longer than its Content-Length"
///   as soon as a batch goes past the length, before that batch is teed;
/// - [`Error::UpstreamUnavailable`] "blob body ended after X of Y bytes";
/// - [`Error::UpstreamInvalid`] "blob content does not match its digest";
/// - the body's own errors and the tee's, as they are (the first to
///   happen), once the batches teed before it are released;
/// - [`Error::Internal`] if the blocking pool fails.
pub fn verified(
    body: UpstreamBody,
    digest: Digest,
    tee: Option<Tee>,
) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
    let verifier = Verifier {
        chunks: body.chunks.fuse(),
        upstream: body.upstream,
        len: body.len,
        absorber: Absorber::new(digest.algorithm().hasher(), tee),
        digest,
        pending: VecDeque::new(),
        held: None,
        ready: VecDeque::new(),
        failed: None,
        received: false,
        ended: false,
    };
    // After an error the stream ends: `try_unfold` drops the state.
    futures::stream::try_unfold(verifier, |mut v| async move {
        Ok(v.next_release().await?.map(|batch| (batch, v)))
    })
}

struct Verifier {
    chunks: Fuse<BoxStream<'static, Result<Bytes>>>,
    upstream: String,
    len: Option<u64>,
    digest: Digest,
    absorber: Absorber,
    /// Batches pushed to the absorber, not yet released, with the offset
    /// each ends at.
    pending: VecDeque<(u64, Bytes)>,
    /// Without a known length: the newest teed batch, until the next is.
    held: Option<Bytes>,
    /// Batches that may go out, in order.
    ready: VecDeque<Bytes>,
    /// The first error; it ends the body once the batches teed before it
    /// have gone out.
    failed: Option<Error>,
    /// Nothing more is read from the body: it ended, reached its length, or
    /// failed.
    received: bool,
    /// The whole body has been checked: nothing follows `ready` but
    /// `failed`.
    ended: bool,
}

impl Verifier {
    /// The next batch that may go out; `None` after the last.
    async fn next_release(&mut self) -> Result<Option<Bytes>> {
        loop {
            if let Some(batch) = self.ready.pop_front() {
                return Ok(Some(batch));
            }
            if self.ended {
                return self.failed.take().map_or(Ok(None), Err);
            }
            self.release_teed();
            if !self.ready.is_empty() {
                continue;
            }
            if self.received {
                self.conclude().await;
                continue;
            }
            if self.absorber.is_full() {
                self.absorber.progress().await;
                continue;
            }
            let waiting = !self.pending.is_empty();
            let chunk = tokio::select! {
                biased;
                () = self.absorber.progress(), if waiting => None,
                chunk = self.chunks.next() => Some(chunk),
            };
            if let Some(chunk) = chunk {
                self.take(chunk);
            }
        }
    }

    /// Takes the next chunk of the body (`None` at its end), together with
    /// the chunks that have already arrived after it, up to [`BATCH`]
    /// bytes, and pushes them as one batch to the absorber.
    fn take(&mut self, chunk: Option<Result<Bytes>>) {
        let first = match chunk {
            None => {
                self.received = true;
                return;
            }
            Some(Err(e)) => return self.fail(e),
            Some(Ok(first)) => first,
        };
        let at = self.absorber.pushed();
        let mut gathered: Option<BytesMut> = None;
        while gathered.as_ref().map_or(first.len(), BytesMut::len) < BATCH {
            match self.chunks.next().now_or_never() {
                Some(Some(Ok(c))) => gathered
                    .get_or_insert_with(|| BytesMut::from(&first[..]))
                    .extend_from_slice(&c),
                Some(Some(Err(e))) => {
                    self.fail(e);
                    break;
                }
                Some(None) => {
                    self.received = true;
                    break;
                }
                None => break,
            }
        }
        let batch = gathered.map_or(first, BytesMut::freeze);
        let end = at + batch.len() as u64;
        if self.len.is_some_and(|len| end > len) {
            let overlong = self.invalid("blob body longer than its Content-Length".into());
            return self.fail(overlong);
        }
        if self.len == Some(end) {
            // Not read past the length, not even to see its end.
            self.received = true;
        }
        if !batch.is_empty() {
            self.absorber.push(batch.clone());
            self.pending.push_back((end, batch));
        }
    }

    /// Keeps the first error and stops reading the body.
    fn fail(&mut self, e: Error) {
        self.failed.get_or_insert(e);
        self.received = true;
    }

    /// Releases the pending batches the absorber has teed, but the one that
    /// ends a body of known length (it waits for the digest); a tee error
    /// fails the body.
    fn release_teed(&mut self) {
        let (teed, error) = self.absorber.teed();
        while let Some((end, _)) = self.pending.front() {
            if *end > teed || self.len == Some(*end) {
                break;
            }
            let (_, batch) = self.pending.pop_front().expect("a front");
            match self.len {
                Some(_) => self.ready.push_back(batch),
                None => self.ready.extend(self.held.replace(batch)),
            }
        }
        if let Some(e) = error {
            self.fail(e);
        }
    }

    /// Once nothing more is read: waits for the absorber to tee and hash
    /// everything, releases what was teed, then checks the whole body (its
    /// length, then its digest) and releases its last batch if it matches.
    async fn conclude(&mut self) {
        self.ended = true;
        let hashed = self.absorber.finish().await;
        self.release_teed();
        if self.failed.is_some() {
            return;
        }
        let hasher = match hashed {
            Ok(hasher) => hasher,
            Err(e) => return self.fail(e),
        };
        let seen = self.absorber.pushed();
        if let Some(len) = self.len.filter(|len| *len != seen) {
            return self.fail(Error::UpstreamUnavailable {
                upstream: self.upstream.clone(),
                detail: format!("blob body ended after {seen} of {len} bytes"),
            });
        }
        let actual = hasher.finish();
        if actual != self.digest {
            let mismatch = self.invalid(format!(
                "blob content does not match its digest (got {actual})"
            ));
            return self.fail(mismatch);
        }
        self.ready.extend(self.pending.drain(..).map(|(_, b)| b));
        self.ready.extend(self.held.take());
    }

    fn invalid(&self, detail: String) -> Error {
        Error::UpstreamInvalid {
            upstream: self.upstream.clone(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures::channel::mpsc;

    use super::*;
    use crate::oci::Algorithm;

    /// One whole batch of `byte`: chunks this large are never gathered, so
    /// each is its own batch whatever the timing.
    fn batch_of(byte: u8) -> Bytes {
        Bytes::from(vec![byte; BATCH])
    }

    fn body(len: Option<u64>, chunks: Vec<Result<Bytes>>) -> UpstreamBody {
        UpstreamBody::new("r.example", len, futures::stream::iter(chunks))
    }

    fn len_of(chunks: &[Bytes]) -> u64 {
        chunks.iter().map(|c| c.len() as u64).sum()
    }

    /// Everything the stream yields: the released batches, then its error.
    async fn run(
        body: UpstreamBody,
        digest: Digest,
        tee: Option<Tee>,
    ) -> (Vec<Bytes>, Option<Error>) {
        let mut released = Vec::new();
        let mut error = None;
        let mut s = std::pin::pin!(verified(body, digest, tee));
        while let Some(item) = s.next().await {
            assert!(error.is_none(), "an item after the error");
            match item {
                Ok(b) => released.push(b),
                Err(e) => error = Some(e),
            }
        }
        (released, error)
    }

    /// Each batch the tee saw: its offset and length.
    type Teed = Arc<Mutex<Vec<(u64, usize)>>>;

    fn recording_tee() -> (Tee, Teed) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let tee: Tee = Box::new(move |offset, bytes| {
            s.lock().unwrap().push((offset, bytes.len()));
            Ok(())
        });
        (tee, seen)
    }

    #[tokio::test]
    async fn a_matching_body_is_released_whole_with_or_without_a_length() {
        let chunks = vec![batch_of(1), batch_of(2), Bytes::from_static(b"tail")];
        // Checked with the algorithm the digest names.
        for algorithm in Algorithm::ALL {
            let digest = algorithm.digest(&chunks.concat());
            for len in [Some(len_of(&chunks)), None] {
                let (released, error) = run(
                    body(len, chunks.iter().cloned().map(Ok).collect()),
                    digest.clone(),
                    None,
                )
                .await;
                assert!(error.is_none(), "{algorithm:?} {len:?}: {error:?}");
                assert_eq!(released, chunks, "{algorithm:?} {len:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_body_not_matching_its_sha512_digest_is_caught_with_sha512() {
        let chunks = [batch_of(1), Bytes::from_static(b"tail")];
        // The last batch is held back; the error names the sha512 computed.
        let other = Algorithm::Sha512.digest(&[&batch_of(1)[..], b"tall"].concat());
        let (released, error) = run(
            body(None, chunks.iter().cloned().map(Ok).collect()),
            other,
            None,
        )
        .await;
        assert_eq!(released, chunks[..1]);
        match error {
            Some(Error::UpstreamInvalid { detail, .. }) => {
                assert!(
                    detail.contains("does not match its digest (got sha512:"),
                    "{detail}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_empty_body_is_checked_too() {
        let (released, error) = run(body(Some(0), vec![]), Digest::of(b""), None).await;
        assert!(released.is_empty());
        assert!(error.is_none(), "{error:?}");
        let (released, error) = run(body(None, vec![]), Digest::of(b"x"), None).await;
        assert!(released.is_empty());
        assert!(
            matches!(error, Some(Error::UpstreamInvalid { .. })),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_mismatching_body_never_releases_its_last_batch() {
        let chunks = vec![batch_of(1), batch_of(2), batch_of(3)];
        let digest = Digest::of(&[batch_of(1), batch_of(2), batch_of(4)].concat());
        for len in [Some(len_of(&chunks)), None] {
            let (tee, teed) = recording_tee();
            let (released, error) = run(
                body(len, chunks.iter().cloned().map(Ok).collect()),
                digest.clone(),
                Some(tee),
            )
            .await;
            assert_eq!(released, chunks[..2], "{len:?}");
            match error {
                Some(Error::UpstreamInvalid { detail, .. }) => {
                    assert!(detail.contains("does not match its digest"), "{detail}");
                }
                other => panic!("{len:?}: {other:?}"),
            }
            // The last batch was copied (the fill writes it), just not released.
            let b = BATCH as u64;
            assert_eq!(
                *teed.lock().unwrap(),
                [(0, BATCH), (b, BATCH), (2 * b, BATCH)]
            );
        }
    }

    #[tokio::test]
    async fn an_overlong_body_fails_before_the_excess_is_copied() {
        let (tee, teed) = recording_tee();
        let chunks = vec![Ok(batch_of(1)), Ok(Bytes::from_static(b"excess"))];
        let digest = Digest::of(&batch_of(1));
        let (released, error) = run(body(Some(BATCH as u64 + 1), chunks), digest, Some(tee)).await;
        assert_eq!(released, [batch_of(1)]);
        match error {
            Some(Error::UpstreamInvalid { detail, .. }) => {
                assert_eq!(detail, "blob body longer than its Content-Length");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(*teed.lock().unwrap(), [(0, BATCH)]);
    }

    #[tokio::test]
    async fn a_body_is_not_read_past_its_length() {
        // What follows the length is never looked at, not even this error.
        let chunks = vec![
            Ok(batch_of(1)),
            Err(Error::internal("read past the length")),
        ];
        let (released, error) = run(
            body(Some(BATCH as u64), chunks),
            Digest::of(&batch_of(1)),
            None,
        )
        .await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(released, [batch_of(1)]);
    }

    #[tokio::test]
    async fn a_short_body_fails() {
        let chunks = vec![Ok(Bytes::from_static(b"hello"))];
        // The digest matches what came: only the length shows it is short.
        let (released, error) = run(body(Some(10), chunks), Digest::of(b"hello"), None).await;
        // Not the end as far as the length says: released as it came.
        assert_eq!(released, [Bytes::from_static(b"hello")]);
        match error {
            Some(Error::UpstreamUnavailable { detail, .. }) => {
                assert_eq!(detail, "blob body ended after 5 of 10 bytes");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn body_and_tee_errors_end_the_stream_as_they_are() {
        let broken = || Error::UpstreamUnavailable {
            upstream: "r.example".into(),
            detail: "connection reset".into(),
        };
        let digest = Digest::of(&[batch_of(1), batch_of(2)].concat());
        let chunks = || vec![Ok(batch_of(1)), Err(broken()), Ok(batch_of(2))];
        // With a length the first batch went out; without one it was held.
        let (released, error) =
            run(body(Some(2 * BATCH as u64), chunks()), digest.clone(), None).await;
        assert_eq!(released, [batch_of(1)]);
        assert_eq!(error.unwrap().to_string(), broken().to_string());
        let (released, error) = run(body(None, chunks()), digest.clone(), None).await;
        assert!(released.is_empty());
        assert_eq!(error.unwrap().to_string(), broken().to_string());

        let full: Tee = Box::new(|_, _| Err(Error::StorageFull("disk".into())));
        let chunks = vec![Ok(batch_of(1)), Ok(batch_of(2))];
        let (released, error) = run(body(None, chunks), digest, Some(full)).await;
        assert!(released.is_empty());
        assert!(matches!(error, Some(Error::StorageFull(_))), "{error:?}");
    }

    /// The tee fails on the second batch while the third is on its way:
    /// the third must not be teed (the failed worker has ended, and a new
    /// one would tee it, and count the failed batch as teed), and only the
    /// first is released (found by a review).
    #[tokio::test]
    async fn nothing_is_teed_after_a_tee_error() {
        let chunks = vec![batch_of(1), batch_of(2), batch_of(3), batch_of(4)];
        let (tee, teed) = recording_tee();
        let mut calls = 0;
        let mut inner = tee;
        let failing: Tee = Box::new(move |offset, bytes| {
            inner(offset, bytes)?;
            calls += 1;
            if calls == 2 {
                return Err(Error::StorageFull("disk".into()));
            }
            Ok(())
        });
        let mut n = 0;
        let stream = futures::stream::iter(chunks.clone()).map(move |c| {
            n += 1;
            if n == 3 {
                // The third batch takes a while to arrive.
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(c)
        });
        let body = UpstreamBody::new("r.example", Some(len_of(&chunks)), stream);
        let digest = Digest::of(&chunks.concat());
        let (released, error) = run(body, digest, Some(failing)).await;
        // A stray worker would have teed by now.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let b = BATCH as u64;
        assert_eq!(*teed.lock().unwrap(), [(0, BATCH), (b, BATCH)]);
        assert_eq!(released, chunks[..1]);
        assert!(matches!(error, Some(Error::StorageFull(_))), "{error:?}");
    }

    /// A healthy body whose chunks come about one worker linger apart (a
    /// slow upstream), so that workers keep ending as the next batch is
    /// pushed, arrives whole (found by a review: such bodies failed with
    /// "the body's tee or hash worker panicked").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_body_whose_workers_keep_ending_arrives_whole() {
        let chunks: Vec<Bytes> = (0..600u32)
            .map(|i| Bytes::from(vec![i as u8; 16 * 1024]))
            .collect();
        let digest = Digest::of(&chunks.concat());
        let (tx, rx) = mpsc::unbounded();
        let feed = chunks.clone();
        let linger = crate::absorb::LINGER.as_micros() as u64;
        std::thread::spawn(move || {
            for (i, c) in feed.into_iter().enumerate() {
                // 0.9 to 1.1 lingers apart.
                let us = linger * 9 / 10 + (i as u64 * 7919) % (linger / 5);
                std::thread::sleep(Duration::from_micros(us));
                let _ = tx.unbounded_send(Ok(c));
            }
        });
        let body = UpstreamBody::new("r.example", Some(len_of(&chunks)), rx);
        let (released, error) = run(body, digest, None).await;
        assert!(
            error.is_none(),
            "{error:?} after {} batches",
            released.len()
        );
        assert_eq!(released.concat(), chunks.concat());
    }

    #[tokio::test]
    async fn chunks_that_already_arrived_are_gathered_into_one_batch() {
        let small: Vec<Bytes> = (0..100u8).map(|i| Bytes::from(vec![i; 10])).collect();
        let content = small.concat();
        let (tee, teed) = recording_tee();
        let (released, error) = run(
            body(None, small.into_iter().map(Ok).collect()),
            Digest::of(&content),
            Some(tee),
        )
        .await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(released, [Bytes::from(content)]);
        assert_eq!(*teed.lock().unwrap(), [(0, 1000)]);

        // A batch stops growing at BATCH; a larger chunk stays whole.
        let (tee, teed) = recording_tee();
        let chunks = [
            Bytes::from(vec![1; BATCH - 1]),
            Bytes::from(vec![2; 2]),
            Bytes::from(vec![3; 2 * BATCH]),
        ];
        let (_, error) = run(
            body(None, chunks.iter().cloned().map(Ok).collect()),
            Digest::of(&chunks.concat()),
            Some(tee),
        )
        .await;
        assert!(error.is_none(), "{error:?}");
        let b = BATCH as u64;
        assert_eq!(*teed.lock().unwrap(), [(0, BATCH + 1), (b + 1, 2 * BATCH)]);
    }

    /// With the clock paused, a wait that is still pending once everything
    /// else is idle times out at once: the stream is holding its bytes back.
    async fn next_now(
        s: &mut (impl Stream<Item = Result<Bytes>> + Unpin),
    ) -> Option<Option<Result<Bytes>>> {
        tokio::time::timeout(Duration::from_secs(1), s.next())
            .await
            .ok()
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_length_each_batch_goes_out_at_once_without_one_the_newest_waits() {
        let content = [batch_of(1), batch_of(2)].concat();
        for len in [Some(content.len() as u64), None] {
            let (tx, rx) = mpsc::unbounded();
            let body = UpstreamBody::new("r.example", len, rx);
            let mut s = Box::pin(verified(body, Digest::of(&content), None));
            tx.unbounded_send(Ok(batch_of(1))).unwrap();
            let first = next_now(&mut s).await;
            if len.is_some() {
                assert_eq!(first.unwrap().unwrap().unwrap(), batch_of(1));
            } else {
                assert!(first.is_none(), "released before the next chunk came");
            }
            tx.unbounded_send(Ok(batch_of(2))).unwrap();
            if len.is_none() {
                assert_eq!(
                    next_now(&mut s).await.unwrap().unwrap().unwrap(),
                    batch_of(1)
                );
                assert!(next_now(&mut s).await.is_none(), "released before the end");
                drop(tx);
            }
            assert_eq!(
                next_now(&mut s).await.unwrap().unwrap().unwrap(),
                batch_of(2)
            );
            assert!(next_now(&mut s).await.unwrap().is_none(), "{len:?}");
        }
    }
}
