//! Zero-copy bodies for stored blobs on HTTP/1 connections.
//!
//! hyper owns the connection and writes every body byte itself, from buffers
//! the body hands it, so a stored blob would cross user space twice (file to
//! buffer, buffer to socket). Here the kernel moves file pages to the socket
//! with `sendfile(2)` instead: a stored-blob body hands hyper *placeholder*
//! chunks, slices of [`PLACEHOLDER`] (a static buffer nobody reads), and
//! queues the file range each one stands for on its connection. The
//! connection's socket, a [`ZeroCopyStream`], recognises placeholder slices by
//! their address and sends the queued file bytes in their place. hyper writes
//! body bytes in order and exactly once, so the n-th placeholder byte written
//! is the n-th queued file byte.
//!
//! That relies on hyper queueing body buffers rather than copying them (its
//! vectored write strategy, which `listen` forces with `writev(true)`). A
//! placeholder slice with nothing queued fails the connection: zeros are never
//! sent as data. HTTP/2 frames bodies itself, so h2 requests take the copying
//! path in [`crate::read`].
//!
//! `sendfile` runs on a runtime thread, so it is only used for pages already
//! in the page cache (see [`file_body`]); colder bytes are read on the
//! blocking pool.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Largest placeholder chunk. Costs no memory: the static is never touched.
pub const CHUNK: usize = 16 << 20;
/// Most bytes one `sendfile` call may move. Over a network the socket buffer
/// (at most 4 MiB by default) bounds a call anyway; on loopback the sender
/// also runs the receiver's network stack, so an unbounded call could hold a
/// runtime thread for many milliseconds while other connections wait.
const SEND_MAX: usize = 4 << 20;

static PLACEHOLDER: [u8; CHUNK] = [0; CHUNK];

fn is_placeholder(s: &[u8]) -> bool {
    let base = PLACEHOLDER.as_ptr() as usize;
    let p = s.as_ptr() as usize;
    !s.is_empty() && p >= base && p + s.len() <= base + CHUNK
}

/// File bytes still to send for placeholders hyper has been handed.
struct Pending {
    file: Arc<File>,
    pos: u64,
    left: u64,
}

/// The file ranges queued on one connection, shared by its socket and the
/// bodies of its responses. Requests carry it as an extension.
#[derive(Clone, Default)]
pub struct SendQueue(Arc<Mutex<VecDeque<Pending>>>);

impl SendQueue {
    fn push(&self, p: Pending) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(p);
    }
}

/// Bytes `start..end` of a complete stored file for a connection whose
/// socket is a [`ZeroCopyStream`] sharing `queue`: placeholder chunks while
/// the file's pages are in the page cache, so `sendfile` on a runtime thread
/// never waits for the disk; otherwise chunks read on the blocking pool (which
/// also brings the pages in), as [`crate::read`] does.
pub fn file_body(
    queue: SendQueue,
    file: File,
    start: u64,
    end: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let file = Arc::new(file);
    let open = crate::read::Open::new();
    futures::stream::unfold(start, move |pos| {
        let (queue, file) = (queue.clone(), Arc::clone(&file));
        let _ = &open;
        async move {
            if pos >= end {
                return None;
            }
            let len = (end - pos).min(CHUNK as u64);
            if cached(&file, pos, len) {
                queue.push(Pending {
                    file,
                    pos,
                    left: len,
                });
                let chunk = Bytes::from_static(&PLACEHOLDER[..len as usize]);
                return Some((Ok(chunk), pos + len));
            }
            let len = (crate::read::current_chunk_size() as u64).min(len);
            match crate::read::read_at(file, pos, len as usize).await {
                Ok(chunk) => Some((Ok(chunk), pos + len)),
                // The error ends the stream.
                Err(e) => Some((Err(e), end)),
            }
        }
    })
}

/// Whether the pages at the start, middle and end of `pos..pos + len` are in
/// the page cache: `RWF_NOWAIT` reads fail instead of waiting for the disk.
/// Files are read and evicted front to back, so three probes say enough; a
/// filesystem without `RWF_NOWAIT` counts as uncached (the copying path).
fn cached(file: &File, pos: u64, len: u64) -> bool {
    let mut byte = [0u8; 1];
    [pos, pos + len / 2, pos + len - 1].into_iter().all(|at| {
        let mut bufs = [io::IoSliceMut::new(&mut byte)];
        matches!(
            rustix::io::preadv2(file, &mut bufs, at, rustix::io::ReadWriteFlags::NOWAIT),
            Ok(1)
        )
    })
}

/// A client socket that sends queued file ranges in place of placeholders.
pub struct ZeroCopyStream {
    tcp: TcpStream,
    queue: SendQueue,
}

impl ZeroCopyStream {
    pub fn new(tcp: TcpStream) -> (Self, SendQueue) {
        let queue = SendQueue::default();
        let stream = Self {
            tcp,
            queue: queue.clone(),
        };
        (stream, queue)
    }

    /// Sends up to `max` bytes of the front queued range.
    fn poll_sendfile(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<usize>> {
        let mut queue = self.queue.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(front) = queue.front_mut() else {
            return Poll::Ready(Err(io::Error::other(
                "placeholder body bytes with no file range queued",
            )));
        };
        let count = (max.min(SEND_MAX) as u64).min(front.left) as usize;
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.tcp, &*front.file, Some(&mut front.pos), count)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stored blob is shorter than its recorded size",
                    )));
                }
                Ok(n) => {
                    front.left -= n as u64;
                    if front.left == 0 {
                        queue.pop_front();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for ZeroCopyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for ZeroCopyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Writes ordinary slices up to the first placeholder with `writev`, or,
    /// when a placeholder comes first, its file bytes with `sendfile`.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let bufs = match bufs.iter().position(|b| !b.is_empty()) {
            Some(i) => &bufs[i..],
            None => return Poll::Ready(Ok(0)),
        };
        if is_placeholder(&bufs[0]) {
            return self.poll_sendfile(cx, bufs[0].len());
        }
        let plain = bufs
            .iter()
            .position(|b| is_placeholder(b))
            .unwrap_or(bufs.len());
        Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[..plain])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn only_slices_of_the_static_are_placeholders() {
        assert!(is_placeholder(&PLACEHOLDER[..1]));
        assert!(is_placeholder(&PLACEHOLDER[CHUNK - 10..]));
        assert!(!is_placeholder(&PLACEHOLDER[..0]));
        let zeros = vec![0u8; 100];
        assert!(!is_placeholder(&zeros));
    }

    async fn pair() -> (ZeroCopyStream, SendQueue, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (server, queue) = ZeroCopyStream::new(accepted.unwrap().0);
        (server, queue, client.unwrap())
    }

    fn test_file(dir: &std::path::Path, len: usize) -> (std::path::PathBuf, Vec<u8>) {
        let path = dir.join("blob");
        let data: Vec<u8> = (0..len as u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    /// Writes `head`, then each chunk followed by `|` (as chunked encoding
    /// interleaves ordinary bytes), vectored as hyper does; returns what the
    /// client received.
    async fn send(chunks: &[Bytes], mut server: ZeroCopyStream, mut client: TcpStream) -> Vec<u8> {
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        server.write_all(b"head\r\n").await.unwrap();
        for c in chunks {
            if is_placeholder(c) {
                // hyper passes a placeholder with what follows it; only the
                // placeholder is written, maybe in several calls.
                let mut rest = c.clone();
                while !rest.is_empty() {
                    let bufs = [IoSlice::new(&rest), IoSlice::new(b"|")];
                    let n = server.write_vectored(&bufs).await.unwrap();
                    assert!(n > 0 && n <= rest.len());
                    rest = rest.slice(n..);
                }
            } else {
                server.write_all(c).await.unwrap();
            }
            server.write_all(b"|").await.unwrap();
        }
        server.shutdown().await.unwrap();
        drop(server);
        reader.await.unwrap()
    }

    fn expected(data: &[u8], start: usize, chunks: &[Bytes]) -> Vec<u8> {
        let mut want = b"head\r\n".to_vec();
        let mut pos = start;
        for c in chunks {
            want.extend_from_slice(&data[pos..pos + c.len()]);
            want.push(b'|');
            pos += c.len();
        }
        want
    }

    /// Cached pages go out as placeholders, which arrive as the file's
    /// bytes, in order.
    #[tokio::test]
    async fn placeholders_become_file_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = test_file(dir.path(), CHUNK * 2 + 12_345);
        let (server, queue, client) = pair().await;
        let (start, end) = (1_000, data.len() - 7);
        let chunks: Vec<Bytes> =
            file_body(queue, File::open(&path).unwrap(), start as u64, end as u64)
                .map(|c| c.unwrap())
                .collect()
                .await;
        assert_eq!(chunks.len(), 3);
        assert!(
            chunks.iter().all(|c| is_placeholder(c)),
            "a freshly written file is cached"
        );
        assert_eq!(chunks.iter().map(Bytes::len).sum::<usize>(), end - start);
        let got = send(&chunks, server, client).await;
        assert!(
            got == expected(&data, start, &chunks),
            "body differs from the file"
        );
    }

    /// Pages not in the page cache are read on the blocking pool instead
    /// (`sendfile` would wait for the disk on a runtime thread), in bounded
    /// chunks, and the body is still the file's bytes.
    #[tokio::test]
    async fn uncached_pages_are_read_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = test_file(dir.path(), CHUNK + 5_000_000);
        let file = File::open(&path).unwrap();
        file.sync_all().unwrap();
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let tmpfs = rustix::fs::fstatfs(&file).unwrap().f_type == 0x0102_1994;
        if tmpfs {
            // tmpfs pages cannot be dropped; nothing to observe here.
            return;
        }
        assert!(!cached(&file, 0, CHUNK as u64));
        let (server, queue, client) = pair().await;
        let chunks: Vec<Bytes> = file_body(queue, file, 0, data.len() as u64)
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert!(!is_placeholder(&chunks[0]));
        assert!(chunks[0].len() <= crate::read::current_chunk_size().max(2 << 20));
        let got = send(&chunks, server, client).await;
        assert!(
            got == expected(&data, 0, &chunks),
            "body differs from the file"
        );
    }

    /// A placeholder with no queued range fails instead of sending zeros.
    #[tokio::test]
    async fn stray_placeholder_is_an_error() {
        let (mut server, _queue, _client) = pair().await;
        let err = server.write_all(&PLACEHOLDER[..10]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Other);
    }

    /// A file shorter than its recorded size ends the body with an error,
    /// whether it shrank before the body was made or while it was sent.
    #[tokio::test]
    async fn short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"short").unwrap();
        let (mut server, queue, _client) = pair().await;
        let mut body = Box::pin(file_body(queue.clone(), File::open(&path).unwrap(), 0, 100));
        let err = body.next().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        queue.push(Pending {
            file: Arc::new(File::open(&path).unwrap()),
            pos: 0,
            left: 100,
        });
        let mut written = 0;
        let err = loop {
            match server.write(&PLACEHOLDER[written..100]).await {
                Ok(n) => written += n,
                Err(e) => break e,
            }
        };
        assert_eq!(written, 5);
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
