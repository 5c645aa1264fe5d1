//! The HTTP face of the cache: OCI distribution read endpoints on top of
//! `Mirror`, plus health probes.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request as HttpRequest, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::metrics::{EndpointLabels, Metrics, RequestLabels};
use crate::mirror::{Blob, Mirror, Relayed};
use crate::oci::media;
use crate::oci::pagination::{link_query, next_link, next_page_link, paginate, rename_tag_list};
use crate::oci::{Digest, Reference};
use crate::range::{self, RangeRequest};
use crate::route::{Endpoint, RepoRequest, Request, route};
use crate::store::StoredManifest;
use crate::verify::verified;
use crate::zerocopy::SendQueue;

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");

pub fn app(mirror: Arc<Mirror>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(registry)
        .layer(middleware::from_fn(api_version_header))
        .layer(middleware::from_fn_with_state(
            Arc::clone(mirror.metrics()),
            access_log,
        ))
        .with_state(mirror)
}

/// The upstream a registry request was routed to, for the access log and metrics.
#[derive(Clone)]
struct RoutedTo(String);

async fn metrics(State(mirror): State<Arc<Mirror>>) -> Response {
    let mut resp = mirror.metrics_text().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

/// The metrics label for a request path (bounded cardinality).
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v2" | "/v2/" => "base",
        "/v2/_catalog" => "catalog",
        p if !p.starts_with("/v2/") => "other",
        p if p.contains("/manifests/") => "manifest",
        p if p.contains("/blobs/") => "blob",
        p if p.ends_with("/tags/list") => "tags",
        p if p.contains("/referrers/") => "referrers",
        _ => "other",
    }
}

async fn api_version_header(req: HttpRequest, next: Next) -> Response {
    let mut resp = next.run(req).await;
    resp.headers_mut()
        .insert("docker-distribution-api-version", API_VERSION);
    resp
}

/// One line and one count per request, when its response headers are ready.
async fn access_log(State(metrics): State<Arc<Metrics>>, req: HttpRequest, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    let ms = elapsed.as_secs_f64() * 1000.0;
    if uri.path().starts_with("/v2") {
        let upstream = resp
            .extensions()
            .get::<RoutedTo>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        let endpoint = endpoint_label(uri.path());
        metrics
            .requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_owned(),
                method: method.to_string(),
                status,
                upstream: upstream.clone(),
            })
            .inc();
        metrics
            .request_seconds
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
        tracing::info!(%method, uri = %uri, status, upstream, ms = format_args!("{ms:.1}"), "request");
    } else {
        tracing::debug!(%method, uri = %uri, status, "request");
    }
    resp
}

/// Ready when the store is writable, and (in a cluster) not draining.
async fn ready(State(mirror): State<Arc<Mirror>>) -> Response {
    if mirror.cluster().is_some_and(|c| c.is_draining()) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    if mirror.cluster().is_some_and(|c| !c.membership().is_known()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster membership not yet known",
        )
            .into_response();
    }
    let store = mirror.store().clone();
    let probe = tokio::task::spawn_blocking(move || {
        let tmp = store.temp_file()?;
        std::io::Write::write_all(&mut tmp.file(), b"ready")
    })
    .await;
    match probe {
        Ok(Ok(())) => (StatusCode::OK, "ready").into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "storage is not writable");
            (StatusCode::SERVICE_UNAVAILABLE, "storage is not writable").into_response()
        }
        Err(e) => Error::internal(e).into_response(),
    }
}

async fn registry(State(mirror): State<Arc<Mirror>>, req: HttpRequest) -> Response {
    let (parts, _body) = req.into_parts();
    if let Some(refused) = misdirected(&mirror, &parts.headers) {
        return refused;
    }
    let head = parts.method == Method::HEAD;
    let mut routed = None;
    let result = match route(
        &parts.method,
        parts.uri.path(),
        parts.uri.query(),
        mirror.upstreams(),
    ) {
        Err(e) => Err(e),
        Ok(Request::Base) => Ok(json_response(head, "{}".into())),
        Ok(Request::Catalog { n, last }) => catalog(&mirror, n, last, head).await,
        Ok(Request::Repo(r)) => {
            routed = Some(RoutedTo(mirror.upstream(r.upstream).host().to_owned()));
            // HTTP/2 frames bodies itself; only HTTP/1 sockets can splice.
            let zero_copy = parts
                .extensions
                .get::<SendQueue>()
                .filter(|_| parts.version < Version::HTTP_2)
                .cloned();
            if let Some(answer) = from_owner(&mirror, &r, &parts, zero_copy.clone()).await {
                Ok(answer)
            } else {
                repo_request(&mirror, r, &parts.headers, head, zero_copy).await
            }
        }
    };
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    if let Some(r) = routed {
        resp.extensions_mut().insert(r);
    }
    // A fellow member's request: say who answers, so it can tell a
    // misdirected URL from this member.
    if let Some(c) = mirror.cluster()
        && parts.headers.contains_key(crate::cluster::HOP_HEADER)
        && let Ok(me) = HeaderValue::from_str(c.me())
    {
        resp.headers_mut().insert(crate::cluster::MEMBER_HEADER, me);
    }
    resp
}

/// A fellow member's request meant for another member (its
/// [`crate::cluster::MEMBER_HEADER`] names someone else: the sender's URL
/// for that member reaches this one): `421 Misdirected Request` (RFC 9110
/// section 15.5.20), served by nobody, stored nowhere, with this member's
/// name for the sender to see.
fn misdirected(mirror: &Mirror, headers: &HeaderMap) -> Option<Response> {
    let cluster = mirror.cluster()?;
    if !headers.contains_key(crate::cluster::HOP_HEADER) {
        return None;
    }
    let meant = headers.get(crate::cluster::MEMBER_HEADER)?;
    if meant.as_bytes() == cluster.me().as_bytes() {
        return None;
    }
    tracing::warn!(
        meant = %String::from_utf8_lossy(meant.as_bytes()),
        from = %headers.get(crate::cluster::HOP_HEADER).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).unwrap_or_default(),
        "refused a request meant for another member: the sender's URL for it reaches this one"
    );
    let mut resp = (
        StatusCode::MISDIRECTED_REQUEST,
        format!("this is cluster member {:?}\n", cluster.me()),
    )
        .into_response();
    if let Ok(me) = HeaderValue::from_str(cluster.me()) {
        resp.headers_mut().insert(crate::cluster::MEMBER_HEADER, me);
    }
    Some(resp)
}

/// In a cache cluster, the answer of the member that serves `r`'s key when
/// that is another member ([`Cluster::serve_elsewhere`]); `None`: served
/// here, as always without a cluster. A blob's body is relayed without
/// copies when the client's connection can take it (`zero_copy`).
///
/// [`Cluster::serve_elsewhere`]: crate::cluster::Cluster::serve_elsewhere
async fn from_owner(
    mirror: &Mirror,
    r: &RepoRequest,
    parts: &Parts,
    zero_copy: Option<SendQueue>,
) -> Option<Response> {
    let cluster = mirror.cluster()?;
    let host = mirror.upstream(r.upstream).host();
    let key = crate::cluster::key_of(host, r)?;
    let path = crate::cluster::router::forward_path(host, r)?;
    let zero_copy = zero_copy.filter(|_| matches!(r.endpoint, Endpoint::Blob(_)));
    cluster
        .serve_elsewhere(&key, &parts.method, &path, &parts.headers, zero_copy)
        .await
}

async fn repo_request(
    mirror: &Arc<Mirror>,
    r: RepoRequest,
    headers: &HeaderMap,
    head: bool,
    zero_copy: Option<SendQueue>,
) -> Result<Response> {
    // Only members ask each other this; a lone cache ignores the header.
    if mirror.cluster().is_some() && crate::cluster::handover::only_if_cached(headers) {
        return stored_only(mirror, &r, headers, head, zero_copy).await;
    }
    match &r.endpoint {
        Endpoint::Manifest(reference) => {
            let accept = media::parse_accept(
                headers
                    .get_all(header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            let m = mirror
                .manifest(r.upstream, &r.repo, reference, &accept)
                .await?;
            // No second guess of the media type: a tag's answer is what the
            // upstream gave this `Accept` class (distribution serves schema1,
            // converted or pushed, whatever the list), or a stored answer the
            // list admits; a digest's is the content itself.
            Ok(manifest_response(m, head))
        }
        Endpoint::Blob(d) if head => {
            let size = mirror.blob_size(r.upstream, &r.repo, d).await?;
            Ok(blob_head(d, size))
        }
        Endpoint::Blob(d) => {
            let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
            let blob = mirror.blob(r.upstream, &r.repo, d).await?;
            blob_response(d, blob, range, zero_copy, mirror.metrics()).await
        }
        Endpoint::TagsList => {
            let relayed = mirror
                .tags_list(r.upstream, &r.repo, r.query.as_deref())
                .await?;
            Ok(relay_response(relayed, &r, head))
        }
        Endpoint::Referrers(d) => {
            let relayed = mirror
                .referrers(r.upstream, &r.repo, d, r.query.as_deref())
                .await?;
            Ok(relay_response(relayed, &r, head))
        }
    }
}

/// A request from another cluster member for stored content only
/// ([`crate::cluster::handover::ONLY_IF_CACHED`]): a blob or a manifest by
/// digest from the store, 404 for anything else or anything not stored;
/// never the upstream, never a fill.
async fn stored_only(
    mirror: &Arc<Mirror>,
    r: &RepoRequest,
    headers: &HeaderMap,
    head: bool,
    zero_copy: Option<SendQueue>,
) -> Result<Response> {
    match &r.endpoint {
        Endpoint::Blob(d) => {
            let blob = mirror.stored_blob(r.upstream, d).await?;
            match blob {
                Blob::Stored { size, .. } if head => Ok(blob_head(d, size)),
                blob => {
                    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
                    blob_response(d, blob, range, zero_copy, mirror.metrics()).await
                }
            }
        }
        Endpoint::Manifest(Reference::Digest(d)) => {
            let m = mirror.stored_manifest(r.upstream, &r.repo, d).await?;
            Ok(manifest_response(m, head))
        }
        _ => Err(Error::NotFound),
    }
}

fn manifest_response(m: StoredManifest, head: bool) -> Response {
    let len = m.bytes.len();
    let body = if head {
        Body::empty()
    } else {
        Body::from(m.bytes)
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    set(h, header::CONTENT_TYPE, &m.media_type);
    set(h, "docker-content-digest", &m.digest.to_string());
    set(h, header::ETAG, &format!("\"{}\"", m.digest));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

fn blob_head(d: &Digest, size: u64) -> Response {
    let mut resp = Response::new(Body::empty());
    blob_headers(resp.headers_mut(), d, size);
    resp
}

fn blob_headers(h: &mut HeaderMap, d: &Digest, len: u64) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    set(h, "docker-content-digest", &d.to_string());
    set(h, header::ETAG, &format!("\"{d}\""));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}

async fn blob_response(
    d: &Digest,
    blob: Blob,
    range: Option<&str>,
    zero_copy: Option<SendQueue>,
    metrics: &Arc<Metrics>,
) -> Result<Response> {
    // Uncached: the whole body, as HTTP allows when a Range is not honoured.
    let blob = match blob {
        Blob::PassThrough { body } => {
            let size = body.len;
            let digest = d.clone();
            let relayed = verified(body, d.clone(), None).inspect(move |r| {
                if let Err(e) = r {
                    tracing::warn!(%digest, error = %e, "uncached blob transfer aborted");
                }
            });
            let body = Body::from_stream(counted(relayed, metrics, "passthrough"));
            let mut out = Response::new(body);
            match size {
                Some(s) => blob_headers(out.headers_mut(), d, s),
                None => set(out.headers_mut(), "docker-content-digest", &d.to_string()),
            }
            return Ok(out);
        }
        other => other,
    };
    let size = match &blob {
        Blob::Stored { size, .. } => Some(*size),
        Blob::Filling { size, .. } => *size,
        Blob::PassThrough { .. } => unreachable!("answered above"),
    };
    // Without a size (chunked upstream still filling) the whole body is sent.
    let wanted = size.map_or(RangeRequest::Full, |s| range::resolve(range, s));
    let (status, start, end) = match (wanted, size) {
        (RangeRequest::Unsatisfiable, Some(size)) => {
            return Err(Error::RangeNotSatisfiable { size });
        }
        (RangeRequest::Partial { start, end }, _) => {
            (StatusCode::PARTIAL_CONTENT, start, Some(end + 1))
        }
        _ => (StatusCode::OK, 0, size),
    };
    let body = match blob {
        Blob::PassThrough { .. } => unreachable!("answered above"),
        Blob::Stored { file, size, lease } => {
            let end = end.unwrap_or(size);
            // The lease keeps the file from eviction until its bytes are sent.
            let stream = match zero_copy {
                Some(queue) => {
                    crate::zerocopy::file_body(queue, file, start, end, lease).left_stream()
                }
                None => crate::read::file_stream(file, start, end)
                    .inspect(move |_| {
                        let _ = &lease;
                    })
                    .right_stream(),
            };
            Body::from_stream(counted(stream, metrics, "disk"))
        }
        Blob::Filling { fill, .. } => {
            let stream = match zero_copy {
                Some(queue) => fill.read_zero_copy(queue, start, end).left_stream(),
                None => fill.read(start, end).right_stream(),
            };
            Body::from_stream(counted(stream, metrics, "fill"))
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    match end {
        Some(end) => blob_headers(h, d, end - start),
        None => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            set(h, "docker-content-digest", &d.to_string());
        }
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let (Some(end), Some(size)) = (end, size) else {
            unreachable!("partial responses have a size")
        };
        set(
            h,
            header::CONTENT_RANGE,
            &format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    Ok(resp)
}

/// Counts the bytes of a body stream into `regmirror_served_bytes_total`.
fn counted<S, E>(
    stream: S,
    metrics: &Arc<Metrics>,
    source: &str,
) -> impl futures::Stream<Item = std::result::Result<bytes::Bytes, E>> + Send + 'static
where
    S: futures::Stream<Item = std::result::Result<bytes::Bytes, E>> + Send + 'static,
{
    let counter = metrics
        .served_bytes
        .get_or_create(&crate::metrics::SourceLabels {
            source: source.to_owned(),
        })
        .clone();
    stream.inspect(move |chunk| {
        if let Ok(b) = chunk {
            counter.inc_by(b.len() as u64);
        }
    })
}

/// Relays an upstream listing to the client that asked `req`: a pagination
/// `Link` points back at the URL the client used, with its routing (`ns` or
/// host prefix, see [`RepoRequest::client_url`]), so the next page comes
/// from the same upstream; a tag list names the repository as the client
/// did ([`rename_tag_list`]). Everything else as the upstream sent it.
fn relay_response(mut r: Relayed, req: &RepoRequest, head: bool) -> Response {
    let rest = match &req.endpoint {
        Endpoint::TagsList => Some("tags/list".to_owned()),
        Endpoint::Referrers(d) => Some(format!("referrers/{d}")),
        Endpoint::Manifest(_) | Endpoint::Blob(_) => None,
    };
    if let Some(link) = r.headers.get(header::LINK).and_then(|v| v.to_str().ok()) {
        let target = rest
            .as_deref()
            .zip(link_query(link))
            .map(|(rest, query)| next_link(&req.client_url(rest, query)));
        match target.and_then(|l| HeaderValue::from_str(&l).ok()) {
            Some(v) => r.headers.insert(header::LINK, v),
            None => r.headers.remove(header::LINK),
        };
    }
    if req.endpoint == Endpoint::TagsList
        && r.status == StatusCode::OK
        && let Some(body) = rename_tag_list(&r.body, &req.client_name)
    {
        r.body = body;
    }
    let len = r.body.len();
    let mut resp = Response::new(if head {
        Body::empty()
    } else {
        Body::from(r.body)
    });
    *resp.status_mut() = r.status;
    *resp.headers_mut() = r.headers;
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

async fn catalog(
    mirror: &Mirror,
    n: Option<usize>,
    last: Option<String>,
    head: bool,
) -> Result<Response> {
    let all = mirror.catalog().await?;
    let page = paginate(&all, n, last.as_deref());
    let body = serde_json::json!({ "repositories": page }).to_string();
    let mut resp = json_response(head, body);
    if let Some(link) = next_page_link("_catalog", &all, page, n) {
        set(resp.headers_mut(), header::LINK, &link);
    }
    Ok(resp)
}

fn json_response(head: bool, body: String) -> Response {
    let len = body.len();
    let mut resp = Response::new(if head {
        Body::empty()
    } else {
        Body::from(body)
    });
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

fn set(h: &mut HeaderMap, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}
