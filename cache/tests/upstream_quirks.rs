//! What real upstreams do that a cache must pass on faithfully, against a
//! small fake upstream on loopback: HEAD refused where GET works, answers
//! that depend on the `Accept` list, and failures after a narrow client's
//! pull. The cache runs in-process (no socket of its own).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use clap::Parser;
use regmirror_cache::config::{Cli, Config};
use regmirror_cache::oci::Digest;
use regmirror_cache::oci::media;
use regmirror_cache::{mirror::Mirror, server, store::Store};
use tower::ServiceExt;

/// What every request to the fake gets before it is looked at.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Answers as a registry does.
    Up,
    /// Answers every request with this status.
    Status(u16),
    /// Never answers.
    Silent,
}

/// A manifest the fake serves.
#[derive(Clone)]
struct Manifest {
    media_type: &'static str,
    bytes: Bytes,
}

impl Manifest {
    fn new(media_type: &'static str, body: serde_json::Value) -> Self {
        Self {
            media_type,
            bytes: Bytes::from(body.to_string()),
        }
    }

    fn digest(&self) -> String {
        Digest::of(&self.bytes).to_string()
    }
}

/// A registry with a few manifests and blobs, whose faults tests switch.
struct Fake {
    /// Per `repo:tag`, what the tag names, in the registry's order of
    /// preference: the first whose media type the request's `Accept` admits
    /// is served (as distribution serves an index, or Docker Hub one
    /// platform's manifest to clients that cannot take an index); none, 404.
    tags: Mutex<HashMap<String, Vec<Manifest>>>,
    blobs: Mutex<HashMap<String, Bytes>>,
    mode: Mutex<Mode>,
    /// What a HEAD of a manifest or blob gets instead of its answer.
    head_refusal: Mutex<Option<StatusCode>>,
    /// Whether a refused HEAD is first redirected (the refusal comes from
    /// the redirect's target, as from an object store).
    head_redirected: Mutex<bool>,
    /// Digests a tag's HEAD names but a GET by digest does not find (as
    /// distribution 2.8 answers for a manifest it converts to schema1 on the
    /// fly for a schema1-only client).
    unserved_by_digest: Mutex<Vec<String>>,
    /// Every request: method and path.
    log: Mutex<Vec<(Method, String)>>,
}

impl Fake {
    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn refuse_head(&self, status: u16, redirected: bool) {
        *self.head_refusal.lock().unwrap() = Some(StatusCode::from_u16(status).unwrap());
        *self.head_redirected.lock().unwrap() = redirected;
    }

    fn tag(&self, repo_tag: &str, answers: &[&Manifest]) {
        self.tags.lock().unwrap().insert(
            repo_tag.into(),
            answers.iter().map(|&m| m.clone()).collect(),
        );
    }

    fn blob(&self, body: &'static [u8]) -> String {
        let d = Digest::of(body).to_string();
        self.blobs
            .lock()
            .unwrap()
            .insert(d.clone(), Bytes::from_static(body));
        d
    }

    fn count(&self, method: Method, path_part: &str) -> usize {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(m, p)| *m == method && p.contains(path_part))
            .count()
    }

    /// Every manifest by digest, from the tags.
    fn by_digest(&self, d: &str) -> Option<Manifest> {
        let tags = self.tags.lock().unwrap();
        tags.values().flatten().find(|m| m.digest() == d).cloned()
    }
}

struct Running {
    fake: Arc<Fake>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Takes the upstream down: its port refuses connections (the fake
    /// closes every connection after its answer, so none is left open).
    fn stop(&self) {
        self.server.abort();
    }
}

async fn start_fake() -> Running {
    let fake = Arc::new(Fake {
        tags: Mutex::default(),
        blobs: Mutex::default(),
        mode: Mutex::new(Mode::Up),
        head_refusal: Mutex::default(),
        head_redirected: Mutex::default(),
        unserved_by_digest: Mutex::default(),
        log: Mutex::default(),
    });
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(Arc::clone(&fake))
        .layer(axum::middleware::map_response(
            |mut resp: Response| async move {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                resp
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Running { fake, addr, server }
}

fn not_found(code: &str) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": "unknown"}]});
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn found(method: &Method, media_type: &str, digest: &str, bytes: Bytes) -> Response {
    let len = bytes.len();
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, media_type.parse().unwrap());
    h.insert("docker-content-digest", digest.parse().unwrap());
    h.insert(header::CONTENT_LENGTH, len.into());
    resp
}

async fn answer(
    State(fake): State<Arc<Fake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_owned();
    fake.log
        .lock()
        .unwrap()
        .push((method.clone(), path.clone()));
    let mode = *fake.mode.lock().unwrap();
    match mode {
        Mode::Up => {}
        Mode::Status(s) => return StatusCode::from_u16(s).unwrap().into_response(),
        Mode::Silent => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return StatusCode::GATEWAY_TIMEOUT.into_response();
        }
    }
    if path == "/v2/" {
        return StatusCode::OK.into_response();
    }
    let refusal = *fake.head_refusal.lock().unwrap();
    if let Some(status) = refusal.filter(|_| method == Method::HEAD) {
        let redirected = *fake.head_redirected.lock().unwrap();
        return match path.strip_prefix("/elsewhere") {
            None if redirected => (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, format!("/elsewhere{path}"))],
            )
                .into_response(),
            _ => status.into_response(),
        };
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return not_found("NOT_FOUND");
    };
    if let Some((repo, reference)) = rest.split_once("/manifests/") {
        let accept: Vec<String> = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        let m = if reference.starts_with("sha256:") {
            let unserved = fake
                .unserved_by_digest
                .lock()
                .unwrap()
                .contains(&reference.to_owned());
            fake.by_digest(reference).filter(|_| !unserved)
        } else {
            let tags = fake.tags.lock().unwrap();
            tags.get(&format!("{repo}:{reference}"))
                .and_then(|answers| {
                    answers
                        .iter()
                        .find(|m| accept.is_empty() || accept.iter().any(|a| a == m.media_type))
                        .cloned()
                })
        };
        return match m {
            Some(m) => found(&method, m.media_type, &m.digest(), m.bytes.clone()),
            None => not_found("MANIFEST_UNKNOWN"),
        };
    }
    if let Some((_, d)) = rest.split_once("/blobs/") {
        let blob = fake.blobs.lock().unwrap().get(d).cloned();
        return match blob {
            Some(b) => found(&method, "application/octet-stream", d, b),
            None => not_found("BLOB_UNKNOWN"),
        };
    }
    not_found("NOT_FOUND")
}

/// The cache, over a new store in `storage`, with `upstream` as its one
/// upstream (`registry.test`), tags always revalidated, and short waits.
async fn cache(storage: &Path, upstream: SocketAddr) -> axum::Router {
    let cli = Cli::try_parse_from([
        "regmirror-cache",
        "--storage",
        storage.to_str().unwrap(),
        "--upstream",
        &format!("registry.test=http://{upstream}"),
    ])
    .unwrap();
    let mut config = Config::resolve(cli).unwrap();
    config.timeouts.stale_after = Duration::from_millis(300);
    config.timeouts.response_header = Duration::from_secs(3);
    let store = Store::open(&config.storage).await.unwrap();
    server::app(Arc::new(Mirror::new(&config, store).unwrap()))
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |v| v.to_str().unwrap_or(""))
    }
}

async fn call(cache: &axum::Router, method: Method, uri: &str, accept: &[&str]) -> Got {
    let mut req = Request::builder().method(method).uri(uri);
    if !accept.is_empty() {
        req = req.header(header::ACCEPT, accept.join(", "));
    }
    let resp = cache
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    Got {
        status,
        headers,
        body,
    }
}

/// containerd's list: every kind, and a wildcard.
const FULL: &[&str] = &[
    media::DOCKER_MANIFEST,
    media::DOCKER_MANIFEST_LIST,
    media::OCI_MANIFEST,
    media::OCI_INDEX,
    "*/*",
];

fn oci_manifest(seed: &str) -> Manifest {
    image_manifest(
        media::OCI_MANIFEST,
        "application/vnd.oci.image.config.v1+json",
        seed,
    )
}

fn docker_manifest(seed: &str) -> Manifest {
    image_manifest(
        media::DOCKER_MANIFEST,
        "application/vnd.docker.container.image.v1+json",
        seed,
    )
}

/// An image manifest of `media_type` without layers, told apart by `seed`.
fn image_manifest(media_type: &'static str, config_type: &str, seed: &str) -> Manifest {
    Manifest::new(
        media_type,
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": config_type, "digest": Digest::of(seed.as_bytes()).to_string(), "size": seed.len()},
            "layers": [],
        }),
    )
}

fn oci_index(of: &Manifest) -> Manifest {
    Manifest::new(
        media::OCI_INDEX,
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_INDEX,
            "manifests": [{"mediaType": of.media_type, "digest": of.digest(), "size": of.bytes.len(), "platform": {"os": "linux", "architecture": "amd64"}}],
        }),
    )
}

fn assert_serves(got: &Got, m: &Manifest, what: &str) {
    assert_eq!(got.status, StatusCode::OK, "{what}: {:?}", got.body);
    assert_eq!(got.header("docker-content-digest"), m.digest(), "{what}");
    assert_eq!(got.header("content-type"), m.media_type, "{what}");
    assert_eq!(
        got.header("content-length"),
        m.bytes.len().to_string(),
        "{what}"
    );
}

#[tokio::test]
async fn a_manifest_whose_head_is_refused_is_asked_with_get() {
    for (status, redirected) in [
        (405, false),
        (403, false),
        (404, false),
        (501, false),
        (403, true),
        (405, true),
    ] {
        let what = format!("HEAD answered {status} (redirected first: {redirected})");
        let up = start_fake().await;
        let m = oci_manifest("x");
        up.fake.tag("app/x:v1", &[&m]);
        up.fake.refuse_head(status, redirected);
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path(), up.addr).await;
        let uri = "/v2/app/x/manifests/v1";
        for accept in [&[][..], FULL, &[media::OCI_MANIFEST]] {
            let got = call(&cache, Method::GET, uri, accept).await;
            assert_serves(&got, &m, &format!("{what}, GET {accept:?}"));
            assert_eq!(got.body, m.bytes, "{what}");
            let got = call(&cache, Method::HEAD, uri, accept).await;
            assert_serves(&got, &m, &format!("{what}, HEAD {accept:?}"));
            assert!(got.body.is_empty());
        }
        // A GET's 404 is a real one, and so is its 403.
        let got = call(&cache, Method::GET, "/v2/app/x/manifests/gone", FULL).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{what}");
        up.fake.set_mode(Mode::Status(403));
        let got = call(&cache, Method::HEAD, "/v2/app/x/manifests/gone", FULL).await;
        assert_eq!(got.status, StatusCode::FORBIDDEN, "{what}");
        up.fake.set_mode(Mode::Up);
        // And the tag was cached: served while the upstream is down.
        up.stop();
        let got = call(&cache, Method::GET, uri, FULL).await;
        assert_serves(&got, &m, &format!("{what}, upstream down"));
    }
}

/// The tag's HEAD names a digest that a GET by that digest does not find:
/// the tag's own GET answers (and is verified against what it claims).
#[tokio::test]
async fn a_digest_named_by_head_but_not_served_by_digest_is_fetched_by_tag() {
    let up = start_fake().await;
    let m = docker_manifest("converted");
    up.fake.tag("app/conv:v1", &[&m]);
    up.fake.unserved_by_digest.lock().unwrap().push(m.digest());
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), up.addr).await;
    let uri = "/v2/app/conv/manifests/v1";
    let got = call(&cache, Method::GET, uri, FULL).await;
    assert_serves(&got, &m, "GET by tag after the digest's 404");
    assert_eq!(got.body, m.bytes);
    // Stored under the digest the registry named: served by digest warm.
    up.stop();
    let got = call(
        &cache,
        Method::GET,
        &format!("/v2/app/conv/manifests/{}", m.digest()),
        FULL,
    )
    .await;
    assert_serves(&got, &m, "by digest, upstream down");
}

#[tokio::test]
async fn an_upstream_refusing_head_with_405_is_asked_with_get_only_from_then_on() {
    let up = start_fake().await;
    let m = oci_manifest("x");
    up.fake.tag("app/x:v1", &[&m]);
    up.fake.refuse_head(405, false);
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), up.addr).await;
    for _ in 0..3 {
        let got = call(&cache, Method::GET, "/v2/app/x/manifests/v1", FULL).await;
        assert_serves(&got, &m, "GET");
    }
    assert_eq!(up.fake.count(Method::HEAD, "/manifests/v1"), 1);
    assert_eq!(up.fake.count(Method::GET, "/manifests/v1"), 3);
}

#[tokio::test]
async fn a_blob_whose_head_is_refused_is_sized_by_its_get() {
    for (status, redirected) in [(405, false), (403, true), (404, false), (501, false)] {
        let what = format!("HEAD answered {status} (redirected first: {redirected})");
        let up = start_fake().await;
        let d = up.fake.blob(b"layer bytes");
        up.fake.refuse_head(status, redirected);
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path(), up.addr).await;
        let uri = format!("/v2/app/x/blobs/{d}");
        let got = call(&cache, Method::HEAD, &uri, &[]).await;
        assert_eq!(got.status, StatusCode::OK, "{what}");
        assert_eq!(got.header("content-length"), "11", "{what}");
        assert_eq!(got.header("docker-content-digest"), d, "{what}");
        // The GET that sized it filled the store: the client's GET that
        // follows costs the upstream nothing.
        let got = call(&cache, Method::GET, &uri, &[]).await;
        assert_eq!(got.status, StatusCode::OK, "{what}");
        assert_eq!(&got.body[..], b"layer bytes", "{what}");
        assert_eq!(up.fake.count(Method::GET, &d), 1, "{what}");
        // A blob the GET does not find is unknown.
        let unknown = format!("/v2/app/x/blobs/{}", Digest::of(b"nothing"));
        let got = call(&cache, Method::HEAD, &unknown, &[]).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{what}");
        up.fake.set_mode(Mode::Status(403));
        let got = call(&cache, Method::HEAD, &unknown, &[]).await;
        assert_eq!(got.status, StatusCode::FORBIDDEN, "{what}: a real denial");
    }
}

#[tokio::test]
async fn a_404_that_depends_on_the_accept_list_keeps_the_tag() {
    let up = start_fake().await;
    let amd64 = oci_manifest("amd64");
    let index = oci_index(&amd64);
    // Like distribution: an index, and a 404 for clients that cannot take one.
    up.fake.tag("app/oi:v1", &[&index]);
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), up.addr).await;
    let uri = "/v2/app/oi/manifests/v1";
    assert_serves(
        &call(&cache, Method::GET, uri, FULL).await,
        &index,
        "full Accept",
    );
    let schema2_only = &[media::DOCKER_MANIFEST];
    let got = call(&cache, Method::GET, uri, schema2_only).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND, "the upstream's 404");
    let got = call(&cache, Method::HEAD, uri, schema2_only).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND, "the upstream's 404");
    up.stop();
    for accept in [FULL, &[][..], &[media::OCI_INDEX]] {
        assert_serves(
            &call(&cache, Method::GET, uri, accept).await,
            &index,
            &format!("upstream down, {accept:?}"),
        );
    }
}

#[tokio::test]
async fn a_narrow_clients_manifest_never_replaces_the_index() {
    let up = start_fake().await;
    let amd64 = docker_manifest("amd64");
    let index = oci_index(&amd64);
    // Like Docker Hub: one platform's manifest for clients that cannot take
    // the index.
    up.fake.tag("app/multi:v1", &[&index, &amd64]);
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), up.addr).await;
    let uri = "/v2/app/multi/manifests/v1";
    let schema2_only = &[media::DOCKER_MANIFEST];
    assert_serves(&call(&cache, Method::GET, uri, FULL).await, &index, "full");
    assert_serves(
        &call(&cache, Method::GET, uri, schema2_only).await,
        &amd64,
        "schema2 only",
    );
    // Silent last: its lookup stays in flight, and later requests join it.
    for mode in [Mode::Status(503), Mode::Status(429), Mode::Silent] {
        up.fake.set_mode(mode);
        assert_serves(
            &call(&cache, Method::GET, uri, FULL).await,
            &index,
            &format!("{mode:?}, full"),
        );
        assert_serves(
            &call(&cache, Method::GET, uri, schema2_only).await,
            &amd64,
            &format!("{mode:?}, schema2 only"),
        );
    }
}

#[tokio::test]
async fn a_narrow_clients_tag_is_served_when_the_upstream_fails() {
    let up = start_fake().await;
    let m = oci_manifest("artifact");
    up.fake.tag("app/art:v1", &[&m]);
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), up.addr).await;
    let uri = "/v2/app/art/manifests/v1";
    let oci_only = &[media::OCI_MANIFEST];
    assert_serves(
        &call(&cache, Method::GET, uri, oci_only).await,
        &m,
        "upstream up",
    );
    // Silent last: its lookup stays in flight, and later requests join it.
    for mode in [Mode::Status(500), Mode::Status(429), Mode::Silent] {
        up.fake.set_mode(mode);
        for method in [Method::GET, Method::HEAD] {
            assert_serves(
                &call(&cache, method.clone(), uri, oci_only).await,
                &m,
                &format!("{method} {mode:?}"),
            );
        }
    }
    up.fake.set_mode(Mode::Up);
    up.stop();
    assert_serves(
        &call(&cache, Method::GET, uri, oci_only).await,
        &m,
        "upstream down",
    );
}

/// A silent upstream costs a tag listing `stale_after` (300 ms here), as it
/// costs a tag's revalidation, before the cached tags answer; not the whole
/// response-header timeout (3 s here).
#[tokio::test]
async fn cached_tags_are_listed_within_stale_after_of_a_silent_upstream() {
    let up = start_fake().await;
    let m = oci_manifest("listed");
    up.fake.tag("app/l:v1", &[&m]);
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), up.addr).await;
    let got = call(&cache, Method::GET, "/v2/app/l/manifests/v1", FULL).await;
    assert_serves(&got, &m, "warm-up pull");
    up.fake.set_mode(Mode::Silent);
    let started = std::time::Instant::now();
    let got = call(&cache, Method::GET, "/v2/app/l/tags/list", &[]).await;
    let took = started.elapsed();
    assert_eq!(got.status, StatusCode::OK);
    let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["tags"], serde_json::json!(["v1"]));
    assert!(
        took < Duration::from_secs(2),
        "cached tags listed after {took:?}, not within stale_after"
    );
}
