//! The cache's behaviour, independent of HTTP: where a manifest or blob comes
//! from (store, an in-flight fill, the upstream), tag freshness, stale serving.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::FutureExt;
use http::{HeaderMap, HeaderValue, Method, header};

use crate::config::{Config, Timeouts};
use crate::error::{Error, Result};
use crate::fill::{Fill, FillJob, Fills};
use crate::flight::Flights;
use crate::metrics::Metrics;
use crate::oci::media::{self, accepts};
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::store::{Lease, Store, StoredBlob, StoredManifest, TagRecord};
use crate::upstream::{self, Upstream, UpstreamBody};

const MAX_PASSTHROUGH_BODY: u64 = 8 << 20;

/// A tag lookup: upstream, repository, tag, and the Accept list it was made with.
type TagKey = (usize, RepoName, Tag, String);

pub struct Mirror {
    upstreams: Vec<Upstream>,
    hosts: Vec<String>,
    store: Store,
    fills: Arc<Fills>,
    tag_flights: Flights<TagKey, StoredManifest>,
    manifest_flights: Flights<(usize, Digest), StoredManifest>,
    /// When each tag was last confirmed with its upstream (for tag TTLs).
    validated: Mutex<HashMap<(usize, RepoName, Tag), Instant>>,
    timeouts: Timeouts,
    max_manifest_size: u64,
    metrics: Arc<Metrics>,
    registry: prometheus_client::registry::Registry,
}

/// Where a blob's bytes come from.
pub enum Blob {
    Stored {
        file: File,
        size: u64,
        lease: Option<Lease>,
    },
    Filling {
        fill: Arc<Fill>,
        size: Option<u64>,
    },
    /// No room to store it: the upstream's body, relayed as it arrives
    /// (through [`crate::verify::verified`]).
    PassThrough {
        body: UpstreamBody,
    },
}

/// An upstream answer relayed to the client.
pub struct Relayed {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Mirror {
    pub fn new(config: &Config, store: Store) -> Result<Self> {
        let client = upstream::build_client(&config.timeouts)?;
        let metrics = Arc::clone(store.metrics());
        let registry = metrics.registry();
        metrics
            .store_max_bytes
            .set(store.limits().max_size.unwrap_or(0) as i64);
        Ok(Self {
            upstreams: config
                .upstreams
                .iter()
                .map(|u| {
                    Upstream::new(
                        u.clone(),
                        client.clone(),
                        config.credentials.clone(),
                        Arc::clone(&metrics),
                    )
                })
                .collect(),
            hosts: config.upstream_hosts(),
            store,
            fills: Arc::default(),
            tag_flights: Flights::default(),
            manifest_flights: Flights::default(),
            validated: Mutex::default(),
            timeouts: config.timeouts.clone(),
            max_manifest_size: config.max_manifest_size,
            metrics,
            registry,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The `/metrics` exposition, with the store gauges brought up to date.
    pub fn metrics_text(&self) -> String {
        let usage = self.store.usage();
        self.metrics.store_bytes.set(usage.stored_bytes() as i64);
        self.metrics.store_files.set(usage.files() as i64);
        self.metrics.encode(&self.registry)
    }

    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    pub fn upstream(&self, i: usize) -> &Upstream {
        &self.upstreams[i]
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    // ---- manifests ----

    pub async fn manifest(
        self: &Arc<Self>,
        up: usize,
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
    async fn manifest_by_digest(
        self: &Arc<Self>,
        up: usize,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<StoredManifest> {
        if let Some(m) = self.store.manifest(&self.hosts[up], d).await? {
            self.metrics.hit(&self.hosts[up], "manifest");
            return Ok(m);
        }
        self.metrics.miss(&self.hosts[up], "manifest");
        let this = Arc::clone(self);
        let (repo, digest) = (repo.clone(), d.clone());
        self.manifest_flights
            .run((up, d.clone()), move || {
                async move {
                    // Another flight may have stored it since we looked.
                    if let Some(m) = this.store.manifest(&this.hosts[up], &digest).await? {
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

    async fn manifest_by_tag(
        self: &Arc<Self>,
        up: usize,
        repo: &RepoName,
        tag: &Tag,
        accept: &[String],
    ) -> Result<StoredManifest> {
        let host = &self.hosts[up];
        let cached = self
            .store
            .tag(host, repo, tag)
            .await
            .filter(|rec| accepts(accept, &rec.media_type));
        let ttl = self.upstreams[up].config.tag_ttl;
        if let Some(rec) = &cached {
            let fresh = !ttl.is_zero()
                && self
                    .validated
                    .lock()
                    .expect("poisoned")
                    .get(&(up, repo.clone(), tag.clone()))
                    .is_some_and(|t| t.elapsed() < ttl);
            if fresh {
                if let Some(m) = self.stored_for(host, rec).await {
                    self.metrics.hit(host, "manifest");
                    return Ok(m);
                }
            }
        }

        let this = Arc::clone(self);
        let key: TagKey = (up, repo.clone(), tag.clone(), accept.join(","));
        let (r, t, a) = (repo.clone(), tag.clone(), accept.to_vec());
        let lookup = self.tag_flights.run(key, move || {
            async move { this.revalidate(up, &r, &t, &a).await }.boxed()
        });
        let Some(rec) = cached else {
            return lookup.await.0;
        };
        // With a cached copy, the upstream gets a bounded time to answer; the
        // lookup goes on in the background and refreshes the tag when it can.
        let outcome = tokio::time::timeout(self.timeouts.stale_after, lookup).await;
        let err = match outcome {
            Ok((Ok(m), _)) => return Ok(m),
            Ok((Err(e), _)) if !e.is_upstream_failure() => return Err(e),
            Ok((Err(e), _)) => e,
            Err(_) => Error::UpstreamUnavailable {
                upstream: host.clone(),
                detail: format!("no answer within {:?}", self.timeouts.stale_after),
            },
        };
        match self.stored_for(host, &rec).await {
            Some(m) => {
                tracing::warn!(upstream = %host, %repo, %tag, error = %err, "upstream failed; serving cached tag");
                self.metrics
                    .stale_serves
                    .get_or_create(&self.metrics.upstream(host))
                    .inc();
                Ok(m)
            }
            None => Err(err),
        }
    }

    async fn stored_for(&self, host: &str, rec: &TagRecord) -> Option<StoredManifest> {
        let d: Digest = rec.digest.parse().ok()?;
        self.store.manifest(host, &d).await.ok().flatten()
    }

    /// One HEAD to learn the tag's digest; a GET only for content we lack.
    async fn revalidate(
        self: &Arc<Self>,
        up: usize,
        repo: &RepoName,
        tag: &Tag,
        accept: &[String],
    ) -> Result<StoredManifest> {
        let upstream = &self.upstreams[up];
        let host = upstream.host();
        let resp = upstream
            .send(
                Method::HEAD,
                repo,
                &format!("manifests/{tag}"),
                None,
                manifest_headers(accept),
                self.timeouts.response_header,
            )
            .await?;
        let status = resp.status();
        if status == 404 {
            self.store.remove_tag(host, repo, tag).await?;
            return Err(Error::ManifestUnknown(format!("{repo}:{tag}")));
        }
        if !status.is_success() {
            return Err(upstream_status(host, "manifest HEAD", status));
        }
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let m = match digest {
            Some(d) => match self.store.manifest(host, &d).await? {
                Some(m) => {
                    self.metrics.hit(host, "manifest");
                    m
                }
                None => self.manifest_by_digest(up, repo, &d).await?,
            },
            // Registries that do not report digests on HEAD.
            None => {
                self.fetch_manifest(up, repo, &Reference::Tag(tag.clone()), accept)
                    .await?
            }
        };
        // Only lookups that accept every kind of manifest define the tag, so
        // a narrow client never replaces an index with one platform's manifest.
        if accepts(accept, media::OCI_INDEX) && accepts(accept, media::DOCKER_MANIFEST_LIST) {
            let rec = TagRecord {
                digest: m.digest.to_string(),
                media_type: m.media_type.clone(),
            };
            if self.store.tag(host, repo, tag).await.as_ref() != Some(&rec) {
                if let Err(e) = self.store.put_tag(host, repo, tag, &rec).await {
                    tracing::warn!(upstream = %host, %repo, %tag, error = %e, "cannot record tag");
                }
            }
            self.validated
                .lock()
                .expect("poisoned")
                .insert((up, repo.clone(), tag.clone()), Instant::now());
        }
        Ok(m)
    }

    /// GET a manifest, verify its digest, store it.
    async fn fetch_manifest(
        &self,
        up: usize,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<StoredManifest> {
        let upstream = &self.upstreams[up];
        let host = upstream.host();
        let resp = upstream
            .send(
                Method::GET,
                repo,
                &format!("manifests/{reference}"),
                None,
                manifest_headers(accept),
                self.timeouts.response_header,
            )
            .await?;
        let status = resp.status();
        if status == 404 {
            return Err(Error::ManifestUnknown(format!("{repo}@{reference}")));
        }
        if !status.is_success() {
            return Err(upstream_status(host, "manifest GET", status));
        }
        let content_type = header_str(resp.headers(), header::CONTENT_TYPE)
            .map(|t| t.split(';').next().unwrap_or("").trim().to_owned());
        let claimed = header_str(resp.headers(), "docker-content-digest")
            .and_then(|v| v.parse::<Digest>().ok());
        let bytes = upstream::read_limited(resp, self.max_manifest_size, host).await?;
        let digest = Digest::of(&bytes);
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => claimed,
        };
        if let Some(want) = expected.filter(|w| *w != digest) {
            tracing::warn!(upstream = %host, %repo, %reference, expected = %want, got = %digest, "manifest digest mismatch; not stored");
            return Err(Error::UpstreamInvalid {
                upstream: host.to_owned(),
                detail: format!("manifest content does not match digest {want}"),
            });
        }
        let media_type = content_type
            .filter(|t| t.starts_with("application/vnd."))
            .or_else(|| media::sniff(&bytes).map(str::to_owned))
            .unwrap_or_else(|| media::OCI_MANIFEST.to_owned());
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

    // ---- blobs ----

    pub async fn blob_size(
        self: &Arc<Self>,
        up: usize,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<u64> {
        let host = &self.hosts[up];
        if let Some(b) = self.store.blob(host, d).await? {
            return Ok(b.size);
        }
        if let Some(fill) = self.fills.in_flight(host, d) {
            if let Some(size) = fill.ready().await? {
                return Ok(size);
            }
        }
        // A HEAD never downloads the blob.
        let resp = self.blob_request(up, Method::HEAD, repo, d).await?;
        match resp.status().as_u16() {
            // Not `content_length()`: that is the (empty) HEAD body's length.
            200 => header_str(resp.headers(), header::CONTENT_LENGTH)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::UpstreamInvalid {
                    upstream: host.clone(),
                    detail: "blob HEAD without Content-Length".into(),
                }),
            404 => Err(Error::BlobUnknown(d.to_string())),
            _ => Err(upstream_status(host, "blob HEAD", resp.status())),
        }
    }

    /// A HEAD or GET of `repo`'s blob `d` on upstream `up`.
    async fn blob_request(
        &self,
        up: usize,
        method: Method,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<reqwest::Response> {
        self.upstreams[up]
            .send(
                method,
                repo,
                &format!("blobs/{d}"),
                None,
                HeaderMap::new(),
                self.timeouts.response_header,
            )
            .await
    }

    pub async fn blob(self: &Arc<Self>, up: usize, repo: &RepoName, d: &Digest) -> Result<Blob> {
        let host = &self.hosts[up];
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
                host: host.clone(),
                digest: d.clone(),
                fetch: async move { this.blob_body(up, &repo, &digest).await }.boxed(),
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

    /// The body of `repo`'s blob `d` on upstream `up`, unchecked: a 404 is
    /// [`Error::BlobUnknown`], any other status but 200 an upstream error.
    async fn blob_body(&self, up: usize, repo: &RepoName, d: &Digest) -> Result<UpstreamBody> {
        let resp = self.blob_request(up, Method::GET, repo, d).await?;
        match resp.status().as_u16() {
            200 => Ok(UpstreamBody::from_response(&self.hosts[up], resp)),
            404 => Err(Error::BlobUnknown(d.to_string())),
            _ => Err(upstream_status(&self.hosts[up], "blob GET", resp.status())),
        }
    }

    // ---- pass-through and listings ----

    /// `tags/list` from the upstream (paged here if it ignored `n`/`last`),
    /// or the tags we know when it fails.
    pub async fn tags_list(
        &self,
        up: usize,
        repo: &RepoName,
        query: Option<&str>,
    ) -> Result<Relayed> {
        match self.relay(up, repo, "tags/list", query).await {
            Err(e) if e.is_upstream_failure() => {
                let tags = self.store.tags(&self.hosts[up], repo).await?;
                if tags.is_empty() {
                    return Err(e);
                }
                tracing::warn!(upstream = %self.hosts[up], %repo, error = %e, "upstream failed; listing cached tags");
                let (n, last) = page_params(query);
                let page = paginate(&tags, n, last.as_deref());
                let body = serde_json::json!({"name": repo.as_str(), "tags": page}).to_string();
                let mut headers = HeaderMap::new();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Ok(Relayed {
                    status: http::StatusCode::OK,
                    headers,
                    body: body.into(),
                })
            }
            Ok(relayed) => Ok(page_tags(relayed, query)),
            other => other,
        }
    }

    pub async fn referrers(
        &self,
        up: usize,
        repo: &RepoName,
        d: &Digest,
        query: Option<&str>,
    ) -> Result<Relayed> {
        self.relay(up, repo, &format!("referrers/{d}"), query).await
    }

    async fn relay(
        &self,
        up: usize,
        repo: &RepoName,
        rest: &str,
        query: Option<&str>,
    ) -> Result<Relayed> {
        let upstream = &self.upstreams[up];
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, */*"),
        );
        let resp = upstream
            .send(
                Method::GET,
                repo,
                rest,
                query,
                headers,
                self.timeouts.response_header,
            )
            .await?;
        let status = resp.status();
        if status.is_server_error() {
            return Err(upstream_status(upstream.host(), rest, status));
        }
        let mut out = HeaderMap::new();
        for name in [header::CONTENT_TYPE, header::LINK] {
            if let Some(v) = resp.headers().get(&name) {
                out.insert(name, v.clone());
            }
        }
        if let Some(v) = resp.headers().get("oci-filters-applied") {
            out.insert("oci-filters-applied", v.clone());
        }
        let body = upstream::read_limited(resp, MAX_PASSTHROUGH_BODY, upstream.host()).await?;
        Ok(Relayed {
            status,
            headers: out,
            body,
        })
    }

    /// Cached repositories, as a client would name them: unprefixed for the
    /// default upstream, `host/name` for the others.
    pub async fn catalog(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for (i, host) in self.hosts.iter().enumerate() {
            for repo in self.store.repositories(host).await? {
                names.push(if i == 0 {
                    repo
                } else {
                    format!("{host}/{repo}")
                });
            }
        }
        names.sort();
        Ok(names)
    }
}

fn manifest_headers(accept: &[String]) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::ACCEPT, upstream::accept_header(accept));
    h
}

fn header_str(h: &HeaderMap, name: impl http::header::AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn upstream_status(host: &str, what: &str, status: http::StatusCode) -> Error {
    let detail = format!("{what} answered {status}");
    if status.is_server_error() {
        Error::UpstreamUnavailable {
            upstream: host.to_owned(),
            detail,
        }
    } else {
        Error::UpstreamInvalid {
            upstream: host.to_owned(),
            detail,
        }
    }
}

/// `n` and `last` from a query string.
pub fn page_params(query: Option<&str>) -> (Option<usize>, Option<String>) {
    let mut n = None;
    let mut last = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "n" => n = v.parse().ok(),
            "last" => last = Some(v.into_owned()),
            _ => {}
        }
    }
    (n, last)
}

/// Applies `n` and `last` to an upstream tag list that ignored them
/// (distribution 2.8 always sends every tag), with a `Link` to the next page.
/// A list that honours them (no tag at or before `last`, at most `n` tags) is
/// relayed untouched, in the upstream's order and with its own `Link`.
fn page_tags(mut r: Relayed, query: Option<&str>) -> Relayed {
    let (n, last) = page_params(query);
    if r.status != http::StatusCode::OK || (n.is_none() && last.is_none()) {
        return r;
    }
    let Ok(mut list) = serde_json::from_slice::<serde_json::Value>(&r.body) else {
        return r;
    };
    let Some(tags) = list["tags"].as_array() else {
        return r;
    };
    let mut tags: Vec<String> = tags
        .iter()
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect();
    let ignored = n.is_some_and(|n| tags.len() > n)
        || last
            .as_deref()
            .is_some_and(|l| tags.iter().any(|t| t.as_str() <= l));
    if !ignored {
        return r;
    }
    tags.sort();
    tags.dedup();
    let page = paginate(&tags, n, last.as_deref());
    r.headers.remove(header::LINK);
    // The server rewrites the path to the one the client used.
    if let Some(v) =
        next_page_link("tags/list", &tags, page, n).and_then(|l| HeaderValue::from_str(&l).ok())
    {
        r.headers.insert(header::LINK, v);
    }
    list["tags"] = serde_json::json!(page);
    r.body = list.to_string().into();
    r
}

/// Sorted `items` after `last`, at most `n`.
pub fn paginate<'a>(items: &'a [String], n: Option<usize>, last: Option<&str>) -> &'a [String] {
    let start = match last {
        Some(l) => items.partition_point(|i| i.as_str() <= l),
        None => 0,
    };
    let end = n.map_or(items.len(), |n| (start + n).min(items.len()));
    &items[start..end]
}

/// The `Link` header value to the page after `page` of `items` (cut with
/// [`paginate`]), if there is one: `</v2/{path}?n=N&last=L>; rel="next"`.
pub fn next_page_link(
    path: &str,
    items: &[String],
    page: &[String],
    n: Option<usize>,
) -> Option<String> {
    let (n, end) = (n?, page.last()?);
    if page.len() < n || items.last() == Some(end) {
        return None;
    }
    let q = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("n", &n.to_string())
        .append_pair("last", end)
        .finish();
    Some(format!("</v2/{path}?{q}>; rel=\"next\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_page_links_only_when_more_follow() {
        let items: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let link = |n, last| next_page_link("_catalog", &items, paginate(&items, n, last), n);
        assert_eq!(
            link(Some(2), None).as_deref(),
            Some(r#"</v2/_catalog?n=2&last=b>; rel="next""#)
        );
        assert_eq!(link(Some(2), Some("b")), None, "last page");
        assert_eq!(link(Some(3), None), None, "everything fits");
        assert_eq!(link(None, None), None);
    }

    #[test]
    fn pagination() {
        let items: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(paginate(&items, None, None), &items[..]);
        assert_eq!(paginate(&items, Some(2), None), &items[..2]);
        assert_eq!(paginate(&items, Some(2), Some("b")), &items[2..4]);
        assert_eq!(paginate(&items, Some(10), Some("bb")), &items[2..]);
        assert!(paginate(&items, None, Some("z")).is_empty());
        assert!(paginate(&items, Some(0), None).is_empty());
        assert_eq!(
            page_params(Some("n=3&last=x%2Fy")),
            (Some(3), Some("x/y".into()))
        );
    }

    fn tag_list(tags: &[&str], link: Option<&str>) -> Relayed {
        let mut headers = HeaderMap::new();
        if let Some(l) = link {
            headers.insert(header::LINK, HeaderValue::from_str(l).unwrap());
        }
        Relayed {
            status: http::StatusCode::OK,
            headers,
            body: serde_json::json!({"name": "app", "tags": tags})
                .to_string()
                .into(),
        }
    }

    fn tags_of(r: &Relayed) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["name"], "app", "other fields kept");
        serde_json::from_value(v["tags"].clone()).unwrap()
    }

    #[test]
    fn tag_pages_are_cut_when_the_upstream_ignores_n_and_last() {
        let all = ["v2", "latest", "v1", "multi"];
        // OCI conformance: every tag after `last`, none before.
        let r = page_tags(tag_list(&all, None), Some("last=latest"));
        assert_eq!(tags_of(&r), ["multi", "v1", "v2"]);
        assert!(r.headers.get(header::LINK).is_none());
        let r = page_tags(tag_list(&all, None), Some("n=2"));
        assert_eq!(tags_of(&r), ["latest", "multi"]);
        assert_eq!(
            r.headers[header::LINK],
            r#"</v2/tags/list?n=2&last=multi>; rel="next""#
        );
        let r = page_tags(tag_list(&all, None), Some("n=2&last=multi"));
        assert_eq!(tags_of(&r), ["v1", "v2"]);
        assert!(r.headers.get(header::LINK).is_none(), "last page");
    }

    #[test]
    fn tag_pages_the_upstream_made_are_relayed_untouched() {
        let link = r#"</v2/app/tags/list?last=b&n=2>; rel="next""#;
        for (tags, query) in [
            (&["b", "a"][..], None),
            (&["b", "a"][..], Some("ns=docker.io")),
            (&["a", "b"][..], Some("n=2")),
            (&["c", "b"][..], Some("n=2&last=a")),
        ] {
            let before = tag_list(tags, Some(link));
            let r = page_tags(tag_list(tags, Some(link)), query);
            assert_eq!(r.body, before.body, "{query:?}");
            assert_eq!(r.headers[header::LINK], link, "{query:?}");
        }
        let mut not_found = tag_list(&["a"], None);
        not_found.status = http::StatusCode::NOT_FOUND;
        let r = page_tags(not_found, Some("last=z"));
        assert_eq!(tags_of(&r), ["a"]);
    }
}
