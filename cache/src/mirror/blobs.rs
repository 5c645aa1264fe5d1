//! Blobs: served from the store, or from the one fill that fetches each
//! blob for every client at once; passed through uncached when the store has
//! no room. Like distribution's `proxyblobstore`.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use http::{HeaderMap, Method, header};

use super::{Mirror, header_str};
use crate::error::{Error, Result};
use crate::fill::{Fill, FillJob};
use crate::oci::{Digest, RepoName};
use crate::route::UpstreamId;
use crate::store::{Lease, StoredBlob};
use crate::upstream::{self, UpstreamBody};
use crate::verify::verified;

/// Where a blob's bytes come from.
pub enum Blob {
    /// In the store: the open file, its size in bytes, and the lease that
    /// keeps it from eviction while it is sent.
    Stored {
        file: File,
        size: u64,
        lease: Option<Lease>,
    },
    /// Being fetched: read it from the fill as it grows. `size` is the
    /// upstream's `Content-Length`, if it sent one.
    Filling { fill: Arc<Fill>, size: Option<u64> },
    /// No room to store it: the upstream's body, relayed as it arrives
    /// (through [`crate::verify::verified`]).
    PassThrough { body: UpstreamBody },
}

impl Mirror {
    /// The size in bytes of `repo`'s blob `d` on upstream `up`, for a HEAD:
    /// from the store, a fill in flight, or an upstream HEAD (never a
    /// download), or, where the upstream refuses HEAD, from the blob's GET
    /// (`size_by_get`). Errors: [`Error::BlobUnknown`] on an
    /// upstream 404 (to the GET), [`Error::UpstreamInvalid`] for a HEAD
    /// without `Content-Length`, upstream errors otherwise.
    pub async fn blob_size(
        self: &Arc<Self>,
        up: UpstreamId,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<u64> {
        let host = self.host(up);
        if let Some(b) = self.store.blob(host, d).await? {
            return Ok(b.size);
        }
        if let Some(fill) = self.fills.in_flight(host, d)
            && let Some(size) = fill.ready().await?
        {
            return Ok(size);
        }
        let head = self
            .upstream(up)
            .head(
                repo,
                &format!("blobs/{d}"),
                HeaderMap::new(),
                self.timeouts.response_header,
            )
            .await?;
        let Some(resp) = head else {
            return self.size_by_get(up, repo, d).await;
        };
        match resp.status().as_u16() {
            // Not `content_length()`: that is the (empty) HEAD body's length.
            200 => header_str(resp.headers(), header::CONTENT_LENGTH)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::UpstreamInvalid {
                    upstream: host.to_owned(),
                    detail: "blob HEAD without Content-Length".into(),
                }),
            _ => Err(upstream::status_error(host, "blob HEAD", resp.status())),
        }
    }

    /// The size of `repo`'s blob `d` on upstream `up` as its GET tells, for
    /// an upstream that refuses HEAD. The GET is the blob's fill (started or
    /// joined as for a client's GET), so its bytes are stored, not wasted:
    /// a HEAD is mostly followed by the GET, which then reads the fill. The
    /// size is the GET's `Content-Length`; without one, the length of the
    /// verified body once it has all arrived (so also when the store has
    /// no room and the body passes through). Errors as for [`Mirror::blob`].
    async fn size_by_get(
        self: &Arc<Self>,
        up: UpstreamId,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<u64> {
        match self.blob(up, repo, d).await? {
            Blob::Stored { size, .. }
            | Blob::Filling {
                size: Some(size), ..
            } => Ok(size),
            Blob::Filling { fill, size: None } => match counted(fill.read(0, None)).await {
                Ok(size) => Ok(size),
                // The fill's own error says more than its reader's.
                Err(e) => Err(fill.ready().await.err().unwrap_or(e)),
            },
            Blob::PassThrough { body } => match body.len {
                Some(size) => Ok(size),
                None => counted(verified(body, d.clone(), None)).await,
            },
        }
    }

    /// A GET of `repo`'s blob `d` on upstream `up`.
    async fn blob_request(
        &self,
        up: UpstreamId,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<reqwest::Response> {
        self.upstream(up)
            .send(
                Method::GET,
                repo,
                &format!("blobs/{d}"),
                None,
                HeaderMap::new(),
                self.timeouts.response_header,
            )
            .await
    }

    /// `repo`'s blob `d` on upstream `up`, for a GET: stored, or joining (or
    /// starting) its fill once the upstream has answered, or passed through
    /// when the store has no room. Errors: [`Error::BlobUnknown`] on an
    /// upstream 404, the fill's error when it fails before any byte.
    pub async fn blob(
        self: &Arc<Self>,
        up: UpstreamId,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<Blob> {
        let host = self.host(up);
        if let Some(StoredBlob { file, size, lease }) = self.store.blob(host, d).await? {
            self.metrics.hit(host, "blob");
            return Ok(Blob::Stored { file, size, lease });
        }
        self.metrics.miss(host, "blob");
        let (fill, joined) = self.fills.join_or_start(host, d, || {
            let this = Arc::clone(self);
            let (repo, digest) = (repo.clone(), d.clone());
            FillJob {
                store: self.store.clone(),
                host: host.to_owned(),
                digest: d.clone(),
                fetch: async move { this.fill_body(up, &repo, &digest).await }.boxed(),
                body_idle: self.timeouts.body_idle,
                metrics: Arc::clone(&self.metrics),
            }
        });
        if joined {
            self.metrics.fill_joins.inc();
        }
        tracing::debug!(upstream = %host, digest = %d, joined, "blob fill");
        match fill.ready().await {
            Ok(size) => Ok(Blob::Filling { fill, size }),
            Err(Error::StorageFull(why)) => {
                tracing::warn!(upstream = %host, digest = %d, reason = %why, "storage full; passing the blob through uncached");
                self.metrics.disk_full_passthrough.inc();
                let body = self.blob_body(up, repo, d).await?;
                Ok(Blob::PassThrough { body })
            }
            Err(e) => Err(e),
        }
    }

    /// The body of `repo`'s blob `d` on upstream `up`, not yet checked
    /// against its digest: a 404 is [`Error::BlobUnknown`], any other status
    /// but 200 an upstream error ([`upstream::status_error`]).
    pub(super) async fn blob_body(
        &self,
        up: UpstreamId,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<UpstreamBody> {
        let host = self.host(up);
        let resp = self.blob_request(up, repo, d).await?;
        match resp.status().as_u16() {
            200 => Ok(UpstreamBody::from_response(host, resp)),
            404 => Err(Error::BlobUnknown(d.to_string())),
            _ => Err(upstream::status_error(host, "blob GET", resp.status())),
        }
    }
}

/// The number of bytes in `body`, read to its end; its first error fails it.
async fn counted<E>(body: impl Stream<Item = std::result::Result<Bytes, E>>) -> Result<u64>
where
    Error: From<E>,
{
    let mut body = std::pin::pin!(body);
    let mut len = 0;
    while let Some(chunk) = body.next().await {
        len += chunk?.len() as u64;
    }
    Ok(len)
}
