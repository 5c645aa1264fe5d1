//! The distribution API subset served by the fake: manifests, blobs, uploads,
//! tag lists and referrers; and blobs as object storage serves them.

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde_json::json;

use super::faults::{corrupt_blob, corrupt_manifest, reset_mid_body, slow_body};
use super::server::{API_VERSION, error, query_params, read_body};
use super::{Behaviour, Shared, StoredManifest};
use crate::util::sha256_digest;

pub(super) async fn manifest(
    shared: &Shared,
    method: &Method,
    name: &str,
    reference: &str,
    headers: &HeaderMap,
    body: Body,
    behaviour: &Behaviour,
) -> Response {
    if method == Method::PUT {
        let bytes = match read_body(body).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let media_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_owned();
        let digest = sha256_digest(&bytes);
        if reference.starts_with("sha256:") && reference != digest {
            return error(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                "reference does not match body",
            );
        }
        let mut st = shared.lock();
        st.manifests.insert(
            (name.into(), digest.clone()),
            StoredManifest { media_type, bytes },
        );
        if !is_digest(reference) {
            st.tags
                .insert((name.into(), reference.into()), digest.clone());
        }
        return Response::builder()
            .status(StatusCode::CREATED)
            .header(API_VERSION.0, API_VERSION.1)
            .header("location", format!("/v2/{name}/manifests/{digest}"))
            .header("docker-content-digest", &digest)
            .header("content-length", 0)
            .body(Body::empty())
            .expect("valid response");
    }
    let found = {
        let mut st = shared.lock();
        let digest = if is_digest(reference) {
            Some(reference.to_owned())
        } else {
            st.tags
                .get(&(name.to_owned(), reference.to_owned()))
                .cloned()
        };
        match digest {
            Some(d) if method == Method::DELETE => {
                st.manifests.remove(&(name.to_owned(), d.clone()));
                st.tags.retain(|(n, _), v| !(n == name && *v == d));
                return Response::builder()
                    .status(StatusCode::ACCEPTED)
                    .header("content-length", 0)
                    .body(Body::empty())
                    .expect("valid response");
            }
            Some(d) => st
                .manifests
                .get(&(name.to_owned(), d.clone()))
                .cloned()
                .map(|m| (d, m)),
            None => None,
        }
    };
    let Some((digest, m)) = found else {
        return error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "manifest unknown",
        );
    };
    if method != Method::GET && method != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "method");
    }
    let head = method == Method::HEAD;
    let content_type = match behaviour {
        Behaviour::ManifestsAsJson => "application/json",
        _ => &m.media_type,
    };
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(API_VERSION.0, API_VERSION.1)
        .header("content-type", content_type)
        .header("etag", format!("\"{digest}\""));
    if !(head && *behaviour == Behaviour::HeadWithoutDigest) {
        builder = builder.header("docker-content-digest", &digest);
    }
    if head || *behaviour != Behaviour::Chunked {
        builder = builder.header("content-length", m.bytes.len());
    }
    let body = if head {
        Body::empty()
    } else {
        match behaviour {
            Behaviour::CorruptManifests => Body::from(corrupt_manifest(&m.bytes)),
            Behaviour::SlowBody { bytes_per_sec } => {
                slow_body(shared, m.bytes.clone(), *bytes_per_sec)
            }
            Behaviour::Chunked => chunked(m.bytes.clone()),
            _ => Body::from(m.bytes.clone()),
        }
    };
    builder.body(body).expect("valid response")
}

/// Whether a manifest reference is a digest (`<algorithm>:<encoded>`; tags
/// cannot contain a colon).
fn is_digest(reference: &str) -> bool {
    reference.contains(':')
}

/// `data` as a body of unknown length, which hyper sends chunked.
fn chunked(data: Bytes) -> Body {
    Body::from_stream(futures::stream::iter([Ok::<_, std::io::Error>(data)]))
}

/// `Range: bytes=a-b` / `bytes=a-` against `len`: Some((start, end_inclusive)).
fn parse_range(headers: &HeaderMap, len: usize) -> Option<(usize, usize)> {
    let v = headers
        .get("range")?
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?;
    let (a, b) = v.split_once('-')?;
    let start: usize = a.trim().parse().ok()?;
    let end = if b.trim().is_empty() {
        len.checked_sub(1)?
    } else {
        b.trim().parse::<usize>().ok()?.min(len.checked_sub(1)?)
    };
    (start <= end).then_some((start, end))
}

pub(super) fn blob(
    shared: &Shared,
    method: &Method,
    name: &str,
    digest: &str,
    headers: &HeaderMap,
    path_q: &str,
    behaviour: &Behaviour,
) -> Response {
    if method == Method::DELETE {
        let removed = shared
            .lock()
            .blobs
            .remove(&(name.to_owned(), digest.to_owned()));
        return match removed {
            Some(_) => Response::builder()
                .status(StatusCode::ACCEPTED)
                .header("content-length", 0)
                .body(Body::empty())
                .expect("valid response"),
            None => error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown"),
        };
    }
    if method != Method::GET && method != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "method");
    }
    if let Behaviour::RedirectBlobs { to } = behaviour {
        return Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(API_VERSION.0, API_VERSION.1)
            .header("location", format!("{}{path_q}", to.trim_end_matches('/')))
            .header("content-length", 0)
            .body(Body::empty())
            .expect("valid response");
    }
    if let Behaviour::RedirectBlobsToObjects { base } = behaviour {
        let base = base.as_deref().unwrap_or("").trim_end_matches('/');
        return Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(API_VERSION.0, API_VERSION.1)
            .header(
                "location",
                format!("{base}/objects/{digest}?X-Amz-Expires=300"),
            )
            .header("content-length", 0)
            .body(Body::empty())
            .expect("valid response");
    }
    let Some(data) = shared
        .lock()
        .blobs
        .get(&(name.to_owned(), digest.to_owned()))
        .cloned()
    else {
        return error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown");
    };
    let data = if *behaviour == Behaviour::CorruptBlobs {
        corrupt_blob(&data)
    } else {
        data
    };
    let total = data.len();
    let (status, data, content_range) = match parse_range(headers, total) {
        Some((s, e)) => (
            StatusCode::PARTIAL_CONTENT,
            data.slice(s..=e),
            Some(format!("bytes {s}-{e}/{total}")),
        ),
        None => (StatusCode::OK, data, None),
    };
    let head = method == Method::HEAD;
    let mut builder = Response::builder()
        .status(status)
        .header(API_VERSION.0, API_VERSION.1)
        .header("content-type", "application/octet-stream")
        .header("docker-content-digest", digest)
        .header("accept-ranges", "bytes")
        .header("etag", format!("\"{digest}\""));
    if head || *behaviour != Behaviour::Chunked {
        builder = builder.header("content-length", data.len());
    }
    if let Some(cr) = content_range {
        builder = builder.header("content-range", cr);
    }
    let body = if head {
        Body::empty()
    } else {
        match behaviour {
            Behaviour::SlowBody { bytes_per_sec } => slow_body(shared, data, *bytes_per_sec),
            Behaviour::ResetMidBlob => reset_mid_body(data),
            Behaviour::Chunked => chunked(data),
            _ => Body::from(data),
        }
    };
    builder.body(body).expect("valid response")
}

pub(super) async fn upload(
    shared: &Shared,
    method: &Method,
    name: &str,
    id: &str,
    query: &str,
    body: Body,
) -> Response {
    let params = query_params(query);
    let digest_param = params
        .iter()
        .find(|(k, _)| k == "digest")
        .map(|(_, v)| v.clone());
    let accepted = |id: &str, len: usize| {
        Response::builder()
            .status(StatusCode::ACCEPTED)
            .header(API_VERSION.0, API_VERSION.1)
            .header("location", format!("/v2/{name}/blobs/uploads/{id}"))
            .header("docker-upload-uuid", id)
            .header("range", format!("0-{}", len.saturating_sub(1)))
            .header("content-length", 0)
            .body(Body::empty())
            .expect("valid response")
    };
    let created = |digest: &str| {
        Response::builder()
            .status(StatusCode::CREATED)
            .header(API_VERSION.0, API_VERSION.1)
            .header("location", format!("/v2/{name}/blobs/{digest}"))
            .header("docker-content-digest", digest)
            .header("content-length", 0)
            .body(Body::empty())
            .expect("valid response")
    };
    let finish = |data: Vec<u8>, expected: &str| -> Response {
        let actual = sha256_digest(&data);
        if actual != expected {
            return error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "digest mismatch");
        }
        shared
            .lock()
            .blobs
            .insert((name.to_owned(), actual.clone()), data.into());
        created(&actual)
    };
    let bytes = match read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match *method {
        Method::POST if id.is_empty() => {
            if let Some(d) = digest_param {
                return finish(bytes.to_vec(), &d);
            }
            let id = format!("{:032x}", rand::random::<u128>());
            shared
                .lock()
                .uploads
                .insert(id.clone(), (name.to_owned(), bytes.to_vec()));
            accepted(&id, bytes.len())
        }
        Method::PATCH | Method::PUT if !id.is_empty() => {
            let data = {
                let mut st = shared.lock();
                let Some((repo, data)) = st.uploads.get_mut(id) else {
                    return error(
                        StatusCode::NOT_FOUND,
                        "BLOB_UPLOAD_UNKNOWN",
                        "upload unknown",
                    );
                };
                if repo != name {
                    return error(
                        StatusCode::NOT_FOUND,
                        "BLOB_UPLOAD_UNKNOWN",
                        "upload unknown",
                    );
                }
                data.extend_from_slice(&bytes);
                if *method == Method::PATCH {
                    return accepted(id, data.len());
                }
                st.uploads.remove(id).map(|(_, d)| d).unwrap_or_default()
            };
            match digest_param {
                Some(d) => finish(data, &d),
                None => error(
                    StatusCode::BAD_REQUEST,
                    "DIGEST_INVALID",
                    "digest parameter missing",
                ),
            }
        }
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "method"),
    }
}

pub(super) fn tags(shared: &Shared, name: &str, query: &str) -> Response {
    let mut tags: Vec<String> = shared
        .lock()
        .tags
        .keys()
        .filter(|(n, _)| n == name)
        .map(|(_, t)| t.clone())
        .collect();
    if tags.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "repository name not known",
        );
    }
    tags.sort();
    let (page, next) = page(&tags, query);
    let body = json!({"name": name, "tags": page}).to_string();
    listing(
        "application/json",
        body,
        next.map(|(n, last)| format!("/v2/{name}/tags/list?n={n}&last={last}")),
    )
}

/// The referrers API: an OCI index of the manifests in `name` whose
/// `subject` is `digest`, sorted by digest and paged like [`tags`]. Always
/// 200, as the spec asks of registries that support the API.
pub(super) fn referrers(shared: &Shared, name: &str, digest: &str, query: &str) -> Response {
    let mut found: Vec<(String, serde_json::Value)> = shared
        .lock()
        .manifests
        .iter()
        .filter(|((repo, _), _)| repo == name)
        .filter_map(|((_, d), m)| {
            let v: serde_json::Value = serde_json::from_slice(&m.bytes).ok()?;
            (v["subject"]["digest"] == digest).then(|| (d.clone(), referrer(d, m, &v)))
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let digests: Vec<String> = found.iter().map(|(d, _)| d.clone()).collect();
    let (page, next) = page(&digests, query);
    let manifests: Vec<&serde_json::Value> = found
        .iter()
        .filter(|(d, _)| page.contains(d))
        .map(|(_, v)| v)
        .collect();
    let body = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    })
    .to_string();
    listing(
        "application/vnd.oci.image.index.v1+json",
        body,
        next.map(|(n, last)| format!("/v2/{name}/referrers/{digest}?n={n}&last={last}")),
    )
}

/// The descriptor of referrer `digest` (manifest `m`, parsed as `v`) in a
/// referrers list: its `artifactType` (or config media type) and annotations.
fn referrer(digest: &str, m: &StoredManifest, v: &serde_json::Value) -> serde_json::Value {
    let mut d = json!({"mediaType": m.media_type, "digest": digest, "size": m.bytes.len()});
    let artifact_type = v
        .get("artifactType")
        .or_else(|| v["config"].get("mediaType"));
    if let Some(t) = artifact_type {
        d["artifactType"] = t.clone();
    }
    if let Some(a) = v.get("annotations") {
        d["annotations"] = a.clone();
    }
    d
}

/// The page of sorted `items` that `query`'s `n` and `last` ask for, and
/// when more follow, the `(n, last)` of the next page.
fn page<'a>(items: &'a [String], query: &str) -> (&'a [String], Option<(usize, &'a str)>) {
    let params = query_params(query);
    let get = |k: &str| params.iter().find(|(pk, _)| pk == k).map(|(_, v)| v);
    let start = get("last").map_or(0, |l| items.partition_point(|i| i <= l));
    let n = get("n").and_then(|n| n.parse::<usize>().ok());
    let end = n.map_or(items.len(), |n| (start + n).min(items.len()));
    let page = &items[start..end];
    let next = n
        .filter(|_| end < items.len())
        .and_then(|n| Some((n, page.last()?.as_str())));
    (page, next)
}

/// A 200 listing with `body`, and a `Link` to `next` when there is one.
fn listing(content_type: &str, body: String, next: Option<String>) -> Response {
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(API_VERSION.0, API_VERSION.1)
        .header("content-type", content_type)
        .header("content-length", body.len());
    if let Some(next) = next {
        builder = builder.header("link", format!("<{next}>; rel=\"next\""));
    }
    builder.body(Body::from(body)).expect("valid response")
}

/// A blob as object storage serves it at a presigned URL: the bytes with
/// `Content-Type`, `Content-Length` and `ETag`, but no registry headers.
pub(super) fn object(shared: &Shared, method: &Method, digest: &str) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "method");
    }
    let data = shared
        .lock()
        .blobs
        .iter()
        .find(|((_, d), _)| d == digest)
        .map(|(_, b)| b.clone());
    let Some(data) = data else {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header("content-type", "application/xml")
            .body(Body::from("<Error><Code>NoSuchKey</Code></Error>"))
            .expect("valid response");
    };
    let etag = digest.split_once(':').map_or(digest, |(_, hex)| hex);
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .header("content-length", data.len())
        .header("etag", format!("\"{etag}\""));
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(data)
    };
    builder.body(body).expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_n_and_last() {
        let items: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(page(&items, ""), (&items[..], None));
        assert_eq!(page(&items, "n=2"), (&items[..2], Some((2, "b"))));
        assert_eq!(page(&items, "n=2&last=b"), (&items[2..], None));
        assert_eq!(page(&items, "last=a"), (&items[1..], None));
    }
}
