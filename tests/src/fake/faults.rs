//! Body mutations for the fault behaviours.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;

use super::Shared;

/// Changes one hex digit of the first `sha256:` digest (same length, valid JSON).
pub(super) fn corrupt_manifest(b: &Bytes) -> Bytes {
    let mut v = b.to_vec();
    if let Some(pos) = v.windows(7).position(|w| w == b"sha256:") {
        let i = pos + 7;
        if i < v.len() {
            v[i] = if v[i] == b'0' { b'1' } else { b'0' };
            return v.into();
        }
    }
    if let Some(last) = v.last_mut() {
        *last ^= 0x01;
    }
    v.into()
}

/// Flips one byte in the middle (same length). Empty blobs stay empty.
pub(super) fn corrupt_blob(b: &Bytes) -> Bytes {
    let mut v = b.to_vec();
    if !v.is_empty() {
        let i = v.len() / 2;
        v[i] ^= 0xff;
    }
    v.into()
}

/// Streams `data` at about `bytes_per_sec`, ending early if the fake shuts down.
pub(super) fn slow_body(shared: &Shared, data: Bytes, bytes_per_sec: u64) -> Body {
    let chunk = usize::try_from((bytes_per_sec / 20).max(1)).unwrap_or(usize::MAX);
    let cancel = shared.cancel.clone();
    let stream = futures::stream::unfold((data, cancel), move |(mut data, cancel)| async move {
        if data.is_empty() {
            return None;
        }
        tokio::select! {
            () = cancel.cancelled() => {
                return Some((Err(std::io::Error::other("fake upstream stopped")), (Bytes::new(), cancel)));
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        let n = chunk.min(data.len());
        let piece = data.split_to(n);
        Some((Ok::<_, std::io::Error>(piece), (data, cancel)))
    });
    Body::from_stream(stream)
}

/// Sends the first half of `data`, waits a moment (so it is flushed), then fails the body:
/// hyper drops the connection before Content-Length is reached.
pub(super) fn reset_mid_body(data: Bytes) -> Body {
    let half = data.slice(..data.len() / 2);
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(half)]).chain(
        futures::stream::once(async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "fake reset mid blob",
            ))
        }),
    );
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corruption_keeps_length() {
        let m = Bytes::from_static(b"{\"digest\":\"sha256:abc\"}");
        let c = corrupt_manifest(&m);
        assert_eq!(c.len(), m.len());
        assert_ne!(c, m);
        let b = Bytes::from_static(b"hello");
        assert_ne!(corrupt_blob(&b), b);
    }
}
