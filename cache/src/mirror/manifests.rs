//! Manifests by digest: content addressed, so once stored they are served
//! without asking the upstream again. A fetch stores a manifest only after
//! checking its bytes against the digest asked for (or, by tag, the digest
//! the upstream claims). Like distribution's `proxymanifeststore`.

use std::fmt::Display;
use std::sync::Arc;

use futures::FutureExt;
use http::{HeaderMap, Method, header};

use super::{Mirror, header_str};
use crate::error::{Error, Result};
use crate::oci::media;
use crate::oci::{Algorithm, Digest, Reference, RepoName};
use crate::route::UpstreamId;
use crate::store::StoredManifest;
use crate::upstream;

impl Mirror {
    /// The manifest `reference` names in `repo` on upstream `up`: by digest
    /// from the store or one shared fetch, by tag through the tag cache
    /// ([`super::tags`]). `accept` is the client's `Accept` list (media types,
    /// empty for any); it shapes a tag's upstream request, while a digest
    /// names one manifest whatever its type.
    ///
    /// Errors: [`Error::ManifestUnknown`] when the upstream has no such
    /// manifest, upstream errors when it cannot be asked and nothing usable
    /// is stored, [`Error::UpstreamInvalid`] for content that does not match
    /// its digest.
    pub async fn manifest(
        self: &Arc<Self>,
        up: UpstreamId,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<StoredManifest> {
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(up, repo, d).await,
            Reference::Tag(t) => self.manifest_by_tag(up, repo, t, accept).await,
        }
    }

    /// Content addressed: once stored, never asks the upstream again.
    pub(super) async fn manifest_by_digest(
        self: &Arc<Self>,
        up: UpstreamId,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<StoredManifest> {
        let host = self.host(up);
        if let Some(m) = self.store.manifest(host, d).await? {
            self.metrics.hit(host, "manifest");
            return Ok(m);
        }
        self.metrics.miss(host, "manifest");
        let this = Arc::clone(self);
        let (repo, digest) = (repo.clone(), d.clone());
        self.manifest_flights
            .run((up, d.clone()), move || {
                async move {
                    // Another flight may have stored it since we looked.
                    if let Some(m) = this.store.manifest(this.host(up), &digest).await? {
                        return Ok(m);
                    }
                    if let Some(m) = this.handed_over_manifest(up, &repo, &digest).await {
                        return Ok(m);
                    }
                    this.fetch_manifest(up, &repo, &Reference::Digest(digest), &[])
                        .await
                }
                .boxed()
            })
            .await
            .0
    }

    /// A HEAD or GET of `repo`'s manifest `reference` on upstream `up`,
    /// asking for the media types in `accept`.
    pub(super) async fn manifest_request(
        &self,
        up: UpstreamId,
        method: Method,
        repo: &RepoName,
        reference: impl Display,
        accept: &[String],
    ) -> Result<reqwest::Response> {
        self.upstream(up)
            .send(
                method,
                repo,
                &format!("manifests/{reference}"),
                None,
                manifest_headers(accept),
                self.timeouts.response_header,
            )
            .await
    }

    /// A HEAD of `repo`'s manifest `reference` on upstream `up`, asking for
    /// the media types in `accept`: `None` when the upstream refuses HEAD
    /// ([`upstream::Upstream::head`]), so the caller GETs the manifest.
    pub(super) async fn manifest_head(
        &self,
        up: UpstreamId,
        repo: &RepoName,
        reference: impl Display,
        accept: &[String],
    ) -> Result<Option<reqwest::Response>> {
        self.upstream(up)
            .head(
                repo,
                &format!("manifests/{reference}"),
                manifest_headers(accept),
                self.timeouts.response_header,
            )
            .await
    }

    /// GET a manifest, verify its digest, store it.
    pub(super) async fn fetch_manifest(
        &self,
        up: UpstreamId,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<StoredManifest> {
        let host = self.host(up);
        let resp = self
            .manifest_request(up, Method::GET, repo, reference, accept)
            .await?;
        let status = resp.status();
        if status == 404 {
            return Err(Error::ManifestUnknown(format!("{repo}@{reference}")));
        }
        if !status.is_success() {
            return Err(upstream::status_error(host, "manifest GET", status));
        }
        let content_type = header_str(resp.headers(), header::CONTENT_TYPE).map(str::to_owned);
        let claimed = header_str(resp.headers(), "docker-content-digest")
            .and_then(|v| v.parse::<Digest>().ok());
        let bytes = upstream::read_limited(resp, self.max_manifest_size, host).await?;
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => claimed,
        };
        self.store_manifest(up, repo, host, content_type, expected, bytes)
            .await
    }

    /// Checks `repo`'s manifest `bytes` from `source` (an upstream's host, or a
    /// cluster member handing it over) and stores them: the media type is
    /// `content_type` (its parameters dropped) when it is a
    /// `application/vnd.` type, else sniffed from the bytes, else OCI's;
    /// the digest is computed the way the registry digests it
    /// ([`Digest::of_manifest`]) with the algorithm of `expected` (sha256
    /// without), and must equal `expected` when given. A failure to store
    /// is logged and the manifest served all the same.
    ///
    /// Errors: [`Error::UpstreamInvalid`] naming `source` when the bytes
    /// have no digestible payload or do not match `expected`.
    pub(super) async fn store_manifest(
        &self,
        up: UpstreamId,
        repo: &RepoName,
        source: &str,
        content_type: Option<String>,
        expected: Option<Digest>,
        bytes: bytes::Bytes,
    ) -> Result<StoredManifest> {
        let host = self.host(up);
        let media_type = content_type
            .map(|t| t.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|t| t.starts_with("application/vnd."))
            .or_else(|| media::sniff(&bytes).map(str::to_owned))
            .unwrap_or_else(|| media::OCI_MANIFEST.to_owned());
        // Hashed the way the registry digests it, with the algorithm of the
        // digest it is checked against (sha256 when there is none), so that
        // it is stored under that digest.
        let algorithm = expected
            .as_ref()
            .map_or(Algorithm::Sha256, Digest::algorithm);
        let digest = Digest::of_manifest(algorithm, &media_type, &bytes).map_err(|e| {
            tracing::warn!(upstream = %host, %repo, %source, error = %e, "manifest without a digestible payload; not stored");
            Error::UpstreamInvalid {
                upstream: source.to_owned(),
                detail: e.to_string(),
            }
        })?;
        if let Some(want) = expected.filter(|w| *w != digest) {
            tracing::warn!(upstream = %host, %repo, %source, expected = %want, got = %digest, "manifest digest mismatch; not stored");
            return Err(Error::UpstreamInvalid {
                upstream: source.to_owned(),
                detail: format!("manifest content does not match digest {want}"),
            });
        }
        let m = StoredManifest {
            digest,
            media_type,
            bytes,
        };
        if let Err(e) = self.store.put_manifest(host, &m).await {
            // Serving matters more than caching: pass it through.
            tracing::warn!(upstream = %host, digest = %m.digest, error = %e, "cannot store manifest; serving uncached");
        }
        Ok(m)
    }
}

/// The headers of a manifest request for a client accepting `accept`.
fn manifest_headers(accept: &[String]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, upstream::accept_header(accept));
    headers
}
