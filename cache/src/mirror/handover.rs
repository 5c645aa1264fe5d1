//! Handover between cluster members (issue 16, "Handover"): a member that
//! owns a key and misses it in its store asks the other members (the
//! previous owner after a join, a scale-down or a restart among them) for
//! it before the upstream, so a resize downloads nothing cached in the
//! cluster; and a member asked that way answers from its store alone.
//!
//! The asking side lives in the fills ([`Mirror::blob`], manifests by
//! digest): a peer's 200 stands in for the upstream's answer and is
//! verified and stored like it; anything else sends the fill upstream.

use futures::FutureExt;
use http::header;

use super::{Blob, Mirror, header_str};
use crate::cluster::handover;
use crate::error::{Error, Result};
use crate::oci::{Digest, RepoName};
use crate::route::UpstreamId;
use crate::store::{StoredBlob, StoredManifest};
use crate::upstream::{self, UpstreamBody};

impl Mirror {
    /// The blob `d` of upstream `up` from the store alone, for a request
    /// with [`handover::ONLY_IF_CACHED`]: [`Blob::Stored`], or
    /// [`Error::BlobUnknown`] when the store has none (no upstream request,
    /// no fill joined or started).
    pub async fn stored_blob(&self, up: UpstreamId, d: &Digest) -> Result<Blob> {
        match self.store.blob(self.host(up), d).await? {
            Some(StoredBlob { file, size, lease }) => Ok(Blob::Stored { file, size, lease }),
            None => Err(Error::BlobUnknown(d.to_string())),
        }
    }

    /// The manifest `d` of upstream `up` from the store alone, for a
    /// request with [`handover::ONLY_IF_CACHED`]; [`Error::ManifestUnknown`]
    /// when the store has none.
    pub async fn stored_manifest(
        &self,
        up: UpstreamId,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<StoredManifest> {
        self.store
            .manifest(self.host(up), d)
            .await?
            .ok_or_else(|| Error::ManifestUnknown(format!("{repo}@{d}")))
    }

    /// When this member owns the key, asks the other members for `repo`'s
    /// content `d` (`kind`: `blobs` or `manifests`) of upstream `up` from
    /// their stores ([`handover::ask`]): a 200 response, or `None` on its
    /// own, when this member is not first in the key's ranking, when no
    /// other member is alive or has it, when they fail (counted in
    /// `regmirror_cluster_handover_total`), or when `d` was handed over
    /// lately and is missing again ([`handover::HandedOver`]).
    async fn handover(
        &self,
        up: UpstreamId,
        repo: &RepoName,
        kind: &str,
        d: &Digest,
    ) -> Option<(String, reqwest::Response)> {
        let cluster = self.cluster.as_deref()?;
        let host = self.host(up);
        let now = std::time::Instant::now();
        if cluster.handed_over().recently(host, d, now) {
            // Handed over lately and missing again: that copy did not
            // check out (or its fill failed); the upstream's will.
            tracing::warn!(upstream = %host, digest = %d, "content handed over lately is missing again; fetching it from the upstream");
            return None;
        }
        let handed = handover::ask(cluster, host, repo, kind, d).await;
        if handed.is_some() {
            cluster.handed_over().record(host, d, now);
        }
        handed
    }

    /// The body of `repo`'s blob `d` on upstream `up` for its fill: from
    /// the member ranked next when it has the blob stored ([`Mirror::handover`]),
    /// else from the upstream ([`Mirror::blob_body`]). Verified by the fill
    /// either way.
    pub(super) async fn fill_body(
        &self,
        up: UpstreamId,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<UpstreamBody> {
        if let Some((peer, resp)) = self.handover(up, repo, "blobs", d).await {
            tracing::info!(upstream = %self.host(up), digest = %d, %peer, "blob handed over by a cluster member");
            return Ok(UpstreamBody::from_response(&handover::source(&peer), resp));
        }
        self.blob_body(up, repo, d).await
    }

    /// `repo`'s manifest `d` on upstream `up` from the member ranked next
    /// ([`Mirror::handover`]), verified against `d` and stored; `None`
    /// (after logging) when the peer has none or its answer does not check
    /// out, so the caller fetches it from the upstream.
    pub(super) async fn handed_over_manifest(
        &self,
        up: UpstreamId,
        repo: &RepoName,
        d: &Digest,
    ) -> Option<StoredManifest> {
        let (peer, resp) = self.handover(up, repo, "manifests", d).await?;
        let source = handover::source(&peer);
        let content_type = header_str(resp.headers(), header::CONTENT_TYPE).map(str::to_owned);
        let checked = async {
            let bytes = upstream::read_limited(resp, self.max_manifest_size, &source).await?;
            self.store_manifest(up, repo, &source, content_type, Some(d.clone()), bytes)
                .await
        }
        .boxed()
        .await;
        match checked {
            Ok(m) => {
                tracing::info!(upstream = %self.host(up), digest = %d, %peer, "manifest handed over by a cluster member");
                Some(m)
            }
            Err(e) => {
                tracing::warn!(upstream = %self.host(up), digest = %d, %peer, error = %e, "handed-over manifest refused; asking the upstream");
                None
            }
        }
    }
}
