//! sha512 content and signed schema1 manifests through the cache, in
//! process, from a fake upstream on loopback: fetched, verified, stored
//! under the digest the registry uses and served warm without asking the
//! upstream again; content that does not match its digest is refused and
//! nothing of it is stored.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Request, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use clap::Parser;
use regmirror_cache::config::{Cli, Config};
use regmirror_cache::oci::{Algorithm, Digest};
use regmirror_cache::store::layout;
use regmirror_cache::{mirror::Mirror, server, store::Store};
use tower::ServiceExt;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const SIGNED_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
const UNSIGNED_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// A real signed schema1 manifest from distribution 2.8.2 and the digest
/// distribution gave it (see `cache/src/oci/schema1.rs`).
const SIGNED: &[u8] = include_bytes!("../src/oci/testdata/schema1-signed.json");
const SIGNED_DIGEST: &str =
    "sha256:ce59cb8e67dc80e59be17057e749154b3b2b386ddded5256c5a6f1d36693e602";

/// One canned upstream answer.
#[derive(Clone)]
struct Canned {
    content_type: &'static str,
    /// Its `Docker-Content-Digest`, if any.
    digest: Option<String>,
    body: Bytes,
}

/// A registry on loopback answering `GET`/`HEAD` of the paths it was given,
/// 404 for others, or 500 for everything once `broken`. Counts every
/// request but `/v2/`.
#[derive(Default)]
struct Fake {
    routes: Mutex<HashMap<String, Canned>>,
    broken: std::sync::atomic::AtomicBool,
    hits: AtomicUsize,
}

impl Fake {
    /// Starts it; returns it and its `http://127.0.0.1:<port>`.
    async fn start() -> (Arc<Self>, String) {
        let fake = Arc::new(Self::default());
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(Arc::clone(&fake));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (fake, url)
    }

    fn serve(&self, path: &str, content_type: &'static str, digest: Option<&str>, body: &[u8]) {
        self.routes.lock().unwrap().insert(
            path.to_owned(),
            Canned {
                content_type,
                digest: digest.map(str::to_owned),
                body: Bytes::copy_from_slice(body),
            },
        );
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn answer(State(fake): State<Arc<Fake>>, method: Method, uri: Uri) -> Response {
    if uri.path() == "/v2/" {
        return (StatusCode::OK, "{}").into_response();
    }
    fake.hits.fetch_add(1, Ordering::SeqCst);
    if fake.broken.load(Ordering::SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let Some(c) = fake.routes.lock().unwrap().get(uri.path()).cloned() else {
        let body = r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#;
        return (StatusCode::NOT_FOUND, body).into_response();
    };
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, c.content_type.parse().unwrap());
    h.insert(header::CONTENT_LENGTH, c.body.len().into());
    if let Some(d) = &c.digest {
        h.insert("docker-content-digest", d.parse().unwrap());
    }
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(c.body)
    };
    (h, body).into_response()
}

/// The cache in process, storing under `storage`, with `upstream` as its
/// one upstream `r.test`.
async fn cache(storage: &Path, upstream: &str) -> axum::Router {
    let cli = Cli::try_parse_from([
        "regmirror-cache",
        "--storage",
        storage.to_str().unwrap(),
        "--upstream",
        &format!("r.test={upstream}"),
    ])
    .unwrap();
    let config = Config::resolve(cli).unwrap();
    let store = Store::open(&config.storage).await.unwrap();
    server::app(Arc::new(Mirror::new(&config, store).unwrap()))
}

/// A client's answer: status, headers, and the body or the error that
/// ended it.
async fn call(
    app: &axum::Router,
    method: Method,
    uri: &str,
) -> (StatusCode, HeaderMap, Result<Bytes, String>) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let body = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .map_err(|e| e.to_string());
    (status, headers, body)
}

fn header<'h>(h: &'h HeaderMap, name: &str) -> &'h str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// Every regular file under `dir`, relative to it, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// The content files (no `.type` sidecars, no tag records) stored for `r.test`.
fn stored_content(storage: &Path) -> Vec<String> {
    let up = layout::upstream_dir(storage, "r.test");
    files_under(&up)
        .into_iter()
        .filter(|f| !f.ends_with(".type") && !f.starts_with("repositories/"))
        .collect()
}

/// [`stored_content`] once it is `want`: a fill renames its file into the
/// store just after its last bytes went out. Panics after 5 s.
async fn wait_for_content(storage: &Path, want: &[String]) {
    for _ in 0..500 {
        if stored_content(storage) == want {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(stored_content(storage), want);
}

fn fanned(kind: &str, d: &Digest) -> String {
    let hex = d.hex();
    format!("{kind}/{}/{}/{hex}", d.algorithm().name(), &hex[..2])
}

#[tokio::test]
async fn sha512_blobs_and_manifests_are_verified_stored_and_served_warm() {
    let (fake, url) = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = cache(dir.path(), &url).await;

    let blob = vec![7u8; 300_000];
    let blob_digest = Algorithm::Sha512.digest(&blob);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": blob.len(), "digest": blob_digest.to_string()},
        "layers": [],
    })
    .to_string();
    let md = Algorithm::Sha512.digest(manifest.as_bytes());
    let md_str = md.to_string();
    fake.serve(
        &format!("/v2/app/x/blobs/{blob_digest}"),
        "application/octet-stream",
        None,
        &blob,
    );
    for reference in ["v1", md_str.as_str()] {
        let path = format!("/v2/app/x/manifests/{reference}");
        fake.serve(&path, OCI_MANIFEST, Some(&md_str), manifest.as_bytes());
    }

    // Cold: by tag (the upstream says sha512), by digest, the blob.
    for uri in [
        "/v2/app/x/manifests/v1".to_owned(),
        format!("/v2/app/x/manifests/{md}"),
    ] {
        let (s, h, body) = call(&app, Method::GET, &uri).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
        assert_eq!(header(&h, "docker-content-digest"), md_str, "{uri}");
        assert_eq!(header(&h, "content-type"), OCI_MANIFEST, "{uri}");
        assert_eq!(body.unwrap(), manifest.as_bytes(), "{uri}");
    }
    let blob_uri = format!("/v2/app/x/blobs/{blob_digest}");
    let (s, h, body) = call(&app, Method::GET, &blob_uri).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(header(&h, "docker-content-digest"), blob_digest.to_string());
    assert!(body.unwrap() == blob, "other blob bytes");

    // Stored under their algorithm, never under sha256.
    wait_for_content(
        dir.path(),
        &[fanned("blobs", &blob_digest), fanned("manifests", &md)],
    )
    .await;

    // Warm: content addressed, so the upstream is not asked again, not even
    // when it is broken; the tag is served stale.
    let asked = fake.hits();
    fake.broken.store(true, Ordering::SeqCst);
    for m in [Method::GET, Method::HEAD] {
        let (s, h, body) = call(&app, m.clone(), &format!("/v2/app/x/manifests/{md}")).await;
        assert_eq!(s, StatusCode::OK, "{m}");
        assert_eq!(header(&h, "docker-content-digest"), md_str);
        if m == Method::GET {
            assert_eq!(body.unwrap(), manifest.as_bytes());
        }
        let (s, h, body) = call(&app, m.clone(), &blob_uri).await;
        assert_eq!(s, StatusCode::OK, "{m}");
        assert_eq!(header(&h, "content-length"), blob.len().to_string());
        if m == Method::GET {
            assert!(body.unwrap() == blob, "other blob bytes");
        }
    }
    assert_eq!(
        fake.hits(),
        asked,
        "content addressed requests went upstream"
    );
    let (s, h, body) = call(&app, Method::GET, "/v2/app/x/manifests/v1").await;
    assert_eq!(s, StatusCode::OK, "stale tag");
    assert_eq!(header(&h, "docker-content-digest"), md_str);
    assert_eq!(body.unwrap(), manifest.as_bytes());

    // The catalog lists the repository like any other.
    let (s, _, body) = call(&app, Method::GET, "/v2/_catalog").await;
    assert_eq!(s, StatusCode::OK);
    let listed: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(listed, serde_json::json!({"repositories": ["app/x"]}));

    // A restarted cache finds the sha512 content where it left it.
    let app = cache(dir.path(), &url).await;
    let (s, _, body) = call(&app, Method::GET, &blob_uri).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.unwrap() == blob, "other blob bytes");
    assert_eq!(fake.hits(), asked + 1, "only the stale tag asked");
}

#[tokio::test]
async fn content_that_does_not_match_its_sha512_digest_is_refused() {
    let (fake, url) = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = cache(dir.path(), &url).await;

    // A blob whose bytes are not those of its digest.
    let claimed = Algorithm::Sha512.digest(b"the real layer");
    fake.serve(
        &format!("/v2/app/bad/blobs/{claimed}"),
        "application/octet-stream",
        None,
        b"a forged layer",
    );
    let (s, _, body) = call(&app, Method::GET, &format!("/v2/app/bad/blobs/{claimed}")).await;
    // Refused before the answer began, or cut short: never served whole.
    match (s, body) {
        (StatusCode::BAD_GATEWAY, Ok(b)) => {
            let b = String::from_utf8_lossy(&b);
            assert!(b.contains("does not match its digest (got sha512:"), "{b}");
        }
        (StatusCode::OK, Err(_)) => {}
        other => panic!("{other:?}"),
    }

    // A manifest by digest, and by a tag whose sha512 digest does not match.
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
    let other = Algorithm::Sha512.digest(b"another manifest").to_string();
    fake.serve(
        &format!("/v2/app/bad/manifests/{other}"),
        OCI_MANIFEST,
        Some(&other),
        manifest,
    );
    fake.serve(
        "/v2/app/bad/manifests/v1",
        OCI_MANIFEST,
        Some(&other),
        manifest,
    );
    for uri in [
        format!("/v2/app/bad/manifests/{other}"),
        "/v2/app/bad/manifests/v1".to_owned(),
    ] {
        let (s, _, body) = call(&app, Method::GET, &uri).await;
        assert_eq!(s, StatusCode::BAD_GATEWAY, "{uri}");
        let body = String::from_utf8(body.unwrap().to_vec()).unwrap();
        assert!(body.contains("does not match digest"), "{uri}: {body}");
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(stored_content(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn signed_schema1_is_stored_as_received_under_its_payload_digest() {
    let (fake, url) = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = cache(dir.path(), &url).await;
    for reference in ["signed", SIGNED_DIGEST] {
        let path = format!("/v2/legacy/app/manifests/{reference}");
        fake.serve(&path, SIGNED_SCHEMA1, Some(SIGNED_DIGEST), SIGNED);
    }
    for uri in [
        "/v2/legacy/app/manifests/signed".to_owned(),
        format!("/v2/legacy/app/manifests/{SIGNED_DIGEST}"),
    ] {
        let (s, h, body) = call(&app, Method::GET, &uri).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {body:?}");
        assert_eq!(header(&h, "docker-content-digest"), SIGNED_DIGEST);
        assert_eq!(header(&h, "content-type"), SIGNED_SCHEMA1);
        assert_eq!(header(&h, "content-length"), SIGNED.len().to_string());
        assert_eq!(body.unwrap(), SIGNED, "signatures and all");
    }
    let d: Digest = SIGNED_DIGEST.parse().unwrap();
    assert_eq!(stored_content(dir.path()), [fanned("manifests", &d)]);
    let stored = layout::manifest_path(dir.path(), "r.test", &d);
    assert_eq!(std::fs::read(stored).unwrap(), SIGNED);
    let asked = fake.hits();
    let (s, _, body) = call(
        &app,
        Method::GET,
        &format!("/v2/legacy/app/manifests/{SIGNED_DIGEST}"),
    )
    .await;
    assert_eq!(
        (s, body.unwrap()),
        (StatusCode::OK, Bytes::from_static(SIGNED))
    );
    assert_eq!(fake.hits(), asked, "a stored manifest went upstream");

    // Unsigned schema1 is digested as its bytes.
    let unsigned =
        br#"{"schemaVersion":1,"name":"legacy/plain","tag":"v1","fsLayers":[],"history":[]}"#;
    let ud = Digest::of(unsigned).to_string();
    fake.serve(
        &format!("/v2/legacy/plain/manifests/{ud}"),
        UNSIGNED_SCHEMA1,
        Some(&ud),
        unsigned,
    );
    let (s, h, body) = call(
        &app,
        Method::GET,
        &format!("/v2/legacy/plain/manifests/{ud}"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(header(&h, "content-type"), UNSIGNED_SCHEMA1);
    assert_eq!(body.unwrap(), &unsigned[..]);
}

#[tokio::test]
async fn signed_schema1_whose_payload_does_not_match_is_refused() {
    let (fake, url) = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = cache(dir.path(), &url).await;
    // The digest of the bytes, signatures and all, as a registry that does
    // not know schema1 might claim: not the payload's.
    let of_bytes = Digest::of(SIGNED).to_string();
    fake.serve(
        &format!("/v2/legacy/bad/manifests/{of_bytes}"),
        SIGNED_SCHEMA1,
        Some(&of_bytes),
        SIGNED,
    );
    fake.serve(
        "/v2/legacy/bad/manifests/v1",
        SIGNED_SCHEMA1,
        Some(&of_bytes),
        SIGNED,
    );
    // A body that is no signed manifest at all.
    fake.serve(
        "/v2/legacy/bad/manifests/broken",
        SIGNED_SCHEMA1,
        None,
        br#"{"schemaVersion":1}"#,
    );
    for (uri, detail) in [
        (
            format!("/v2/legacy/bad/manifests/{of_bytes}"),
            "does not match digest",
        ),
        (
            "/v2/legacy/bad/manifests/v1".to_owned(),
            "does not match digest",
        ),
        (
            "/v2/legacy/bad/manifests/broken".to_owned(),
            "signed schema1 manifest",
        ),
    ] {
        let (s, _, body) = call(&app, Method::GET, &uri).await;
        assert_eq!(s, StatusCode::BAD_GATEWAY, "{uri}");
        let body = String::from_utf8(body.unwrap().to_vec()).unwrap();
        assert!(body.contains(detail), "{uri}: {body}");
    }
    assert_eq!(stored_content(dir.path()), Vec::<String>::new());
}
