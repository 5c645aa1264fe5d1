//! The distribution API subset served by the fake: manifests, blobs, uploads, tags.

use axum::body::Body;
use axum::response::Response;
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
        if !reference.starts_with("sha256:") {
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
        let digest = if reference.starts_with("sha256:") {
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
    let len = m.bytes.len();
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header(API_VERSION.0, API_VERSION.1)
        .header("content-type", &m.media_type)
        .header("docker-content-digest", &digest)
        .header("etag", format!("\"{digest}\""))
        .header("content-length", len);
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        match behaviour {
            Behaviour::CorruptManifests => Body::from(corrupt_manifest(&m.bytes)),
            Behaviour::SlowBody { bytes_per_sec } => {
                slow_body(shared, m.bytes.clone(), *bytes_per_sec)
            }
            _ => Body::from(m.bytes.clone()),
        }
    };
    builder.body(body).expect("valid response")
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
    let mut builder = Response::builder()
        .status(status)
        .header(API_VERSION.0, API_VERSION.1)
        .header("content-type", "application/octet-stream")
        .header("docker-content-digest", digest)
        .header("accept-ranges", "bytes")
        .header("etag", format!("\"{digest}\""))
        .header("content-length", data.len());
    if let Some(cr) = content_range {
        builder = builder.header("content-range", cr);
    }
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        match behaviour {
            Behaviour::SlowBody { bytes_per_sec } => slow_body(shared, data, *bytes_per_sec),
            Behaviour::ResetMidBlob => reset_mid_body(data),
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

pub(super) fn tags(shared: &Shared, name: &str) -> Response {
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
    let body = json!({"name": name, "tags": tags}).to_string();
    Response::builder()
        .status(StatusCode::OK)
        .header(API_VERSION.0, API_VERSION.1)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Body::from(body))
        .expect("valid response")
}
