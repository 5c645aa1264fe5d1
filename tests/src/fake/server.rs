//! HTTP side of the fake: routing, behaviours, the distribution API subset.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State as AxState};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde_json::json;

use super::auth::{self, Need};
use super::content::{blob, manifest, object, referrers, tags, upload};
use super::{Behaviour, RecordedRequest, Shared};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

pub(super) const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

pub(super) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"errors": [{"code": code, "message": message, "detail": null}]}).to_string();
    Response::builder()
        .status(status)
        .header(API_VERSION.0, API_VERSION.1)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Body::from(body))
        .expect("valid response")
}

pub(super) fn query_params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parsed `/v2/...` route.
enum Route<'a> {
    Base,
    Manifest(&'a str, &'a str),
    Blob(&'a str, &'a str),
    Upload(&'a str, &'a str),
    Tags(&'a str),
    Referrers(&'a str, &'a str),
    /// `/objects/<digest>`: a blob as object storage serves it.
    Object(&'a str),
    Other,
}

fn route(path: &str) -> Route<'_> {
    if path == "/v2/" || path == "/v2" {
        return Route::Base;
    }
    if let Some(digest) = path.strip_prefix("/objects/") {
        return Route::Object(digest);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Route::Other;
    };
    if let Some((name, id)) = rest.rsplit_once("/blobs/uploads/") {
        return Route::Upload(name, id);
    }
    if let Some(name) = rest.strip_suffix("/blobs/uploads") {
        return Route::Upload(name, "");
    }
    if let Some((name, r)) = rest.rsplit_once("/manifests/") {
        return Route::Manifest(name, r);
    }
    if let Some((name, d)) = rest.rsplit_once("/blobs/") {
        return Route::Blob(name, d);
    }
    if let Some((name, d)) = rest.rsplit_once("/referrers/") {
        return Route::Referrers(name, d);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Route::Tags(name);
    }
    Route::Other
}

async fn handle(AxState(shared): AxState<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let path = parts.uri.path().to_owned();
    let path_q = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| path.clone());
    let query = parts.uri.query().unwrap_or("").to_owned();
    let headers = parts.headers;
    {
        let mut st = shared.lock();
        st.requests.push(RecordedRequest {
            method: method.to_string(),
            path: path_q.clone(),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        });
    }
    if path == "/token" {
        return token_endpoint(&shared, &method, &query, &headers, body).await;
    }

    // Behaviours that replace the whole answer.
    let behaviour = {
        let mut st = shared.lock();
        let idx = st
            .rules
            .iter()
            .position(|(p, _)| path_q.contains(p.as_str()));
        let slot = match idx {
            Some(i) => &mut st.rules[i].1,
            None => &mut st.behaviour,
        };
        let current = slot.clone();
        if let Behaviour::TooManyRequests { count, .. } = slot {
            if *count <= 1 {
                *slot = Behaviour::Normal;
            } else {
                *count -= 1;
            }
        }
        current
    };
    match &behaviour {
        Behaviour::Status(code) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return error(status, "UNKNOWN", "fake upstream status behaviour");
        }
        Behaviour::TooManyRequests {
            retry_after_secs,
            count,
        } if *count > 0 => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                "slow down",
            );
            r.headers_mut().insert(
                "retry-after",
                retry_after_secs.to_string().parse().expect("header"),
            );
            return r;
        }
        Behaviour::Hang => {
            shared.cancel.cancelled().await;
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "fake upstream stopped",
            );
        }
        _ => {}
    }

    let r = route(&path);
    // Authorisation.
    let need: Need<'_> = match &r {
        // Object storage URLs are presigned: no registry authorisation.
        Route::Base | Route::Other | Route::Object(_) => None,
        Route::Manifest(n, _)
        | Route::Blob(n, _)
        | Route::Upload(n, _)
        | Route::Tags(n)
        | Route::Referrers(n, _) => {
            let action = if method == Method::GET || method == Method::HEAD {
                "pull"
            } else {
                "push"
            };
            Some((n, action))
        }
    };
    {
        let st = shared.lock();
        let authz = headers.get("authorization").and_then(|v| v.to_str().ok());
        if let Err(challenge) = auth::check(
            &st.auth,
            &shared.base_url,
            st.tokens_not_before_ms,
            authz,
            need,
        ) {
            drop(st);
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "authentication required",
            );
            resp.headers_mut()
                .insert("www-authenticate", challenge.parse().expect("header"));
            return resp;
        }
    }

    if let (Behaviour::HeadRefused(code), Route::Manifest(..) | Route::Blob(..)) = (&behaviour, &r)
        && method == Method::HEAD
    {
        let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::METHOD_NOT_ALLOWED);
        return error(status, "UNSUPPORTED", "HEAD is not served here");
    }
    match r {
        Route::Base => {
            if method == Method::GET || method == Method::HEAD {
                json_ok("{}")
            } else {
                error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "method")
            }
        }
        Route::Manifest(name, reference) => {
            manifest(
                &shared, &method, name, reference, &headers, body, &behaviour,
            )
            .await
        }
        Route::Blob(name, digest) => blob(
            &shared, &method, name, digest, &headers, &path_q, &behaviour,
        ),
        Route::Upload(name, id) => upload(&shared, &method, name, id, &query, body).await,
        Route::Tags(name) => tags(&shared, name, &query),
        Route::Referrers(name, digest) => referrers(&shared, name, digest, &query),
        Route::Object(digest) => object(&shared, &method, digest),
        Route::Other => error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route"),
    }
}

fn json_ok(body: &'static str) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(API_VERSION.0, API_VERSION.1)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Body::from(body))
        .expect("valid response")
}

pub(super) async fn read_body(body: Body) -> Result<Bytes, Response> {
    axum::body::to_bytes(body, usize::MAX).await.map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "BLOB_UPLOAD_INVALID",
            &e.to_string(),
        )
    })
}

async fn token_endpoint(
    shared: &Shared,
    method: &Method,
    query: &str,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let basic = auth::parse_basic(headers.get("authorization").and_then(|v| v.to_str().ok()));
    let (scopes, creds) = if method == Method::POST {
        let Ok(form) = read_body(body).await else {
            return error(StatusCode::BAD_REQUEST, "BAD_REQUEST", "body");
        };
        let params = query_params(&String::from_utf8_lossy(&form));
        let get = |k: &str| {
            params
                .iter()
                .find(|(pk, _)| pk == k)
                .map(|(_, v)| v.clone())
        };
        let scopes: Vec<String> = get("scope")
            .map(|s| {
                s.split(' ')
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let creds = match (get("username"), get("password")) {
            (Some(u), Some(p)) => Some((u, p)),
            _ => basic,
        };
        (scopes, creds)
    } else {
        let scopes = query_params(query)
            .into_iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .collect();
        (scopes, basic)
    };
    let mut st = shared.lock();
    st.token_requests += 1;
    if !auth::token_credentials_ok(&st.auth, creds) {
        drop(st);
        return error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "bad credentials");
    }
    let token = auth::issue_token(&scopes, st.token_expires_in);
    let fields = st.token_fields;
    let mut body = serde_json::Map::new();
    if fields.token {
        body.insert("token".into(), json!(token));
    }
    if fields.access_token {
        body.insert("access_token".into(), json!(token));
    }
    if fields.expires_in {
        body.insert("expires_in".into(), json!(st.token_expires_in));
    }
    let body = serde_json::Value::Object(body).to_string();
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Body::from(body))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries() {
        assert_eq!(
            query_params("digest=sha256%3Aab&scope=repository%3Aa%2Fb%3Apull&x"),
            vec![
                ("digest".into(), "sha256:ab".into()),
                ("scope".into(), "repository:a/b:pull".into()),
                ("x".into(), String::new())
            ]
        );
        assert_eq!(percent_decode("%4"), "%4");
    }
}
