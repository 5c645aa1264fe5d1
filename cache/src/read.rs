//! Reading cached files into response bodies.
//!
//! Each chunk is one `pread` on the blocking pool straight into the buffer
//! handed to the connection (one copy, no intermediate buffer). Chunks are
//! large when few clients stream, which costs fewer round trips per byte,
//! and shrink as more stream at once, which keeps memory per stream small:
//! all streams together hold about [`READ_BUDGET`] in flight.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures::Stream;

/// Bytes in flight across all file streams, about.
pub const READ_BUDGET: usize = 64 << 20;
const MIN_CHUNK: usize = 64 << 10;
const MAX_CHUNK: usize = 2 << 20;

static STREAMS: AtomicUsize = AtomicUsize::new(0);

/// The chunk size when `streams` file streams are open.
pub fn chunk_size(streams: usize) -> usize {
    (READ_BUDGET / streams.max(1)).clamp(MIN_CHUNK, MAX_CHUNK)
}

/// Counts an open stream for as long as it lives.
struct Open;

impl Open {
    fn new() -> Self {
        STREAMS.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        STREAMS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `len` bytes at `pos` (fewer only at end of file).
pub async fn read_at(file: Arc<File>, pos: u64, len: usize) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, pos)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}

/// Bytes `start..end` of a complete file, in adaptive chunks. The stream
/// owns the file and reads it sequentially into fresh, unzeroed buffers.
pub fn file_stream(
    file: File,
    start: u64,
    end: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let state = (Some(file), start, Open::new());
    futures::stream::unfold(state, move |(file, pos, open)| async move {
        let file = file.filter(|_| pos < end)?;
        let want = chunk_size(STREAMS.load(Ordering::Relaxed)) as u64;
        let len = want.min(end - pos);
        let read = tokio::task::spawn_blocking(move || {
            let mut f = file;
            if pos == start && start > 0 {
                f.seek(SeekFrom::Start(start))?;
            }
            let mut buf = Vec::with_capacity(len as usize);
            (&mut f).take(len).read_to_end(&mut buf)?;
            if (buf.len() as u64) < len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shorter than its blob",
                ));
            }
            Ok((f, Bytes::from(buf)))
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        match read {
            Ok((f, b)) => Some((Ok(b), (Some(f), pos + len, open))),
            // The error ends the stream.
            Err(e) => Some((Err(e), (None, end, open))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn chunks_shrink_as_streams_grow() {
        assert_eq!(chunk_size(0), MAX_CHUNK);
        assert_eq!(chunk_size(1), MAX_CHUNK);
        assert_eq!(chunk_size(256), 256 << 10);
        assert_eq!(chunk_size(100_000), MIN_CHUNK);
    }

    #[tokio::test]
    async fn streams_exactly_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let got: Vec<u8> = file_stream(File::open(&path).unwrap(), 123, 4_900_000)
            .map(|c| c.unwrap())
            .collect::<Vec<_>>()
            .await
            .concat();
        assert_eq!(got, &data[123..4_900_000]);
        // A range past the end of the file is an error, not a short body.
        let mut s = Box::pin(file_stream(File::open(&path).unwrap(), 0, 6_000_000));
        let mut total = 0;
        let mut failed = false;
        while let Some(c) = s.next().await {
            match c {
                Ok(b) => total += b.len(),
                Err(_) => failed = true,
            }
        }
        assert!(failed && total < 6_000_000);
    }
}
