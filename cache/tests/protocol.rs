//! The HTTP surface in-process (no sockets): routing, errors, bad input.
//! The upstream is a closed port, so anything that reaches it fails loudly.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use clap::Parser;
use regmirror_cache::config::{Cli, Config};
use regmirror_cache::store::layout;
use regmirror_cache::{mirror::Mirror, server, store::Store};
use tower::ServiceExt;

const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

async fn app(storage: &Path) -> axum::Router {
    let cli = Cli::try_parse_from([
        "regmirror-cache",
        "--storage",
        storage.to_str().unwrap(),
        "--upstream",
        "docker.io=http://127.0.0.1:9",
        "--upstream",
        "registry.test:5000=http://127.0.0.1:9",
    ])
    .unwrap();
    let config = Config::resolve(cli).unwrap();
    let store = Store::open(&config.storage).await.unwrap();
    server::app(Arc::new(Mirror::new(&config, store).unwrap()))
}

async fn call(
    app: &axum::Router,
    method: Method,
    uri: &str,
) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let resp = app
        .clone()
        .oneshot(
            Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, headers, json)
}

fn code(body: &serde_json::Value) -> &str {
    body["errors"][0]["code"].as_str().unwrap_or("")
}

/// Every file under `dir`, recursively, but the lock files of the
/// processes' temp directories ([`layout::TMP_LOCK`]), which the store
/// holds from its start, whatever it is asked.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_name() != layout::TMP_LOCK {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn base_endpoint_and_api_version_header_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path()).await;
    for (uri, status) in [
        ("/v2/", 200),
        ("/v2", 200),
        ("/healthz", 200),
        ("/readyz", 200),
        ("/nope", 404),
    ] {
        let (s, h, _) = call(&app, Method::GET, uri).await;
        assert_eq!(s.as_u16(), status, "{uri}");
        assert_eq!(
            h["docker-distribution-api-version"], "registry/2.0",
            "{uri}"
        );
    }
}

#[tokio::test]
async fn writes_are_refused_with_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path()).await;
    for (m, uri) in [
        (Method::POST, "/v2/library/alpine/blobs/uploads/".to_owned()),
        (
            Method::PUT,
            "/v2/library/alpine/manifests/latest".to_owned(),
        ),
        (Method::DELETE, format!("/v2/library/alpine/blobs/{DIGEST}")),
        (
            Method::PATCH,
            "/v2/library/alpine/blobs/uploads/abc".to_owned(),
        ),
    ] {
        let (s, h, body) = call(&app, m.clone(), &uri).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{m} {uri}");
        assert_eq!(code(&body), "UNSUPPORTED");
        assert_eq!(h["allow"], "GET, HEAD");
    }
}

#[tokio::test]
async fn bad_input_gets_oci_errors_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path()).await;
    let long = format!("/v2/{}/manifests/latest", "a".repeat(300));
    let cases = [
        ("/v2/../../etc/passwd/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library/%2e%2e/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library%2Falpine/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/Library/Alpine/manifests/latest", 400, "NAME_INVALID"),
        (long.as_str(), 400, "NAME_INVALID"),
        (
            "/v2/library/alpine/manifests/.hidden",
            400,
            "MANIFEST_INVALID",
        ),
        (
            "/v2/library/alpine/blobs/sha256:1234",
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/alpine/blobs/sha256:..%2f..%2f",
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/library/alpine/blobs/sha512:abcd",
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/x/manifests/latest?ns=evil.example",
            404,
            "NAME_UNKNOWN",
        ),
        (
            "/v2/169.254.169.254/latest/manifests/x",
            404,
            "NAME_UNKNOWN",
        ),
        ("/v2/library/alpine/nothing", 404, "NOT_FOUND"),
    ];
    for (uri, status, want) in cases {
        for m in [Method::GET, Method::HEAD] {
            let (s, _, body) = call(&app, m.clone(), uri).await;
            assert_eq!(s.as_u16(), status, "{m} {uri}");
            if m == Method::GET {
                assert_eq!(code(&body), want, "{uri}: {body}");
            }
        }
    }
    assert_eq!(files_under(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn upstream_failure_is_never_a_401() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path()).await;
    for uri in [
        "/v2/library/alpine/manifests/latest".to_owned(),
        format!("/v2/library/alpine/blobs/{DIGEST}"),
        "/v2/registry.test:5000/app/tags/list".to_owned(),
    ] {
        let (s, h, body) = call(&app, Method::GET, &uri).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {body}");
        assert!(!h.contains_key("www-authenticate"));
        assert_eq!(code(&body), "UNAVAILABLE");
        // Internal addresses stay out of client-facing messages? The upstream
        // name is fine; its URL is not needed.
        assert!(!body.to_string().contains("127.0.0.1:9"), "{body}");
    }
    assert_eq!(
        files_under(&layout::upstreams_dir(dir.path())),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn catalog_is_empty_on_a_new_store() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path()).await;
    let (s, _, body) = call(&app, Method::GET, "/v2/_catalog").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, serde_json::json!({"repositories": []}));
}
