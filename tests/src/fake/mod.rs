//! `FakeUpstream`: a programmable in-process registry on loopback for fault and auth tests.
//!
//! It serves manifests (by tag and digest), blobs, tag lists and the referrers
//! API (both paged with `n` and `last`, as the OCI distribution spec allows),
//! accepts pushes (so [`crate::seed::push_image`] works against it too),
//! records every request, and can be switched at runtime between
//! [`Behaviour`]s and [`Auth`] modes. Every fake also serves its blobs as
//! object storage would, at `/objects/<digest>`: no registry headers, no
//! authorisation (a presigned URL), the target of
//! [`Behaviour::RedirectBlobsToObjects`].
//!
//! It is served by a task of the test's own tokio runtime: never block that runtime
//! (e.g. with `std::process::Command::output` or `std::thread::sleep`) while something is
//! talking to the fake, or it will stall.

mod auth;
mod content;
mod faults;
mod server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::request_log::RequestLog;
use crate::seed::{PushedImage, PushedIndex};
use crate::util::sha256_digest;

/// How the fake answers. Applies to every request except the `/token` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// A correct registry.
    Normal,
    /// Blob bodies have one byte flipped (same length, wrong digest). Headers unchanged.
    CorruptBlobs,
    /// Manifest bodies have one hex digit of the first digest changed (same length,
    /// still valid JSON); `Docker-Content-Digest` still claims the true digest.
    CorruptManifests,
    /// Every request answers this status with an empty JSON error body.
    Status(u16),
    /// The next `count` requests answer 429 with `Retry-After`, then behaviour reverts to
    /// `Normal`.
    TooManyRequests { retry_after_secs: u64, count: usize },
    /// Accept the request and never answer (until the fake is dropped).
    Hang,
    /// Manifest and blob bodies are streamed at about this rate (Content-Length correct).
    SlowBody { bytes_per_sec: u64 },
    /// Blob GETs announce the full Content-Length, send half, then drop the connection.
    ResetMidBlob,
    /// Blob GET/HEAD answer `307` with `Location: <to><same path and query>`.
    RedirectBlobs { to: String },
    /// Blob GET/HEAD answer `307` to object storage:
    /// `Location: <base>/objects/<digest>?X-Amz-Expires=300`, relative when
    /// `base` is `None`. Any fake serves `/objects/<digest>` (see
    /// [`FakeUpstream`]), so `base` may name this fake or another one.
    RedirectBlobsToObjects { base: Option<String> },
    /// HEAD on manifests and blobs answers this status while GET works, as
    /// some registries and proxies do (405, 403, 404, 501).
    HeadRefused(u16),
    /// Manifest HEADs answer without `Docker-Content-Digest` (GETs keep it).
    HeadWithoutDigest,
    /// Manifests are served as `Content-Type: application/json`.
    ManifestsAsJson,
    /// Manifest and blob GET bodies are sent chunked, without Content-Length
    /// (HEADs keep it).
    Chunked,
}

/// Authentication required by the fake for `/v2/...` (the `/token` endpoint is open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    /// `401` + `WWW-Authenticate: Bearer realm="..",service="..",scope="repository:<name>:pull"`
    /// unless `Authorization: Bearer <token>` carries a valid token for that repository.
    /// Tokens come from `GET /token?service=..&scope=..` (or the OAuth2 `POST /token`
    /// form), which checks Basic credentials when `username`/`password` are set.
    /// Tokens are self-describing, so any fake accepts tokens issued by any fake.
    Bearer {
        /// Token endpoint advertised in the challenge; `None` = this fake's `/token`.
        realm_url: Option<String>,
        service: String,
        username: Option<String>,
        password: Option<String>,
    },
    /// `401` + `WWW-Authenticate: Basic realm="regmirror-fake"` unless the credentials match.
    Basic {
        username: String,
        password: String,
    },
}

/// The fields of the fake's token responses. Registries differ: Docker Hub
/// sends both `token` and `access_token`, others only one, and `expires_in` is
/// optional (clients then assume 60 s). Default: all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenFields {
    pub token: bool,
    pub access_token: bool,
    pub expires_in: bool,
}

impl Default for TokenFields {
    fn default() -> Self {
        Self {
            token: true,
            access_token: true,
            expires_in: true,
        }
    }
}

impl Auth {
    /// Anonymous bearer tokens from this fake's `/token`, service `fake-registry`.
    pub fn bearer_anonymous() -> Self {
        Auth::Bearer {
            realm_url: None,
            service: "fake-registry".into(),
            username: None,
            password: None,
        }
    }
    /// Bearer tokens from this fake's `/token` that require these Basic credentials.
    pub fn bearer_with_credentials(username: &str, password: &str) -> Self {
        Auth::Bearer {
            realm_url: None,
            service: "fake-registry".into(),
            username: Some(username.into()),
            password: Some(password.into()),
        }
    }
}

/// One request as received (recorded before any behaviour or auth check).
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path with query string.
    pub path: String,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub(crate) struct StoredManifest {
    pub(crate) media_type: String,
    pub(crate) bytes: Bytes,
}

#[derive(Debug)]
pub(crate) struct State {
    /// (repo, digest) -> manifest
    pub(crate) manifests: HashMap<(String, String), StoredManifest>,
    /// (repo, tag) -> digest
    pub(crate) tags: HashMap<(String, String), String>,
    /// (repo, digest) -> bytes
    pub(crate) blobs: HashMap<(String, String), Bytes>,
    /// upload id -> (repo, data so far)
    pub(crate) uploads: HashMap<String, (String, Vec<u8>)>,
    pub(crate) behaviour: Behaviour,
    /// (path substring, behaviour) overrides, first match wins.
    pub(crate) rules: Vec<(String, Behaviour)>,
    pub(crate) auth: Auth,
    pub(crate) requests: Vec<RecordedRequest>,
    pub(crate) token_requests: usize,
    pub(crate) token_expires_in: u64,
    pub(crate) token_fields: TokenFields,
    /// Tokens issued before this (ms since epoch) are rejected.
    pub(crate) tokens_not_before_ms: u128,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    pub(crate) cancel: CancellationToken,
    pub(crate) base_url: String,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The programmable registry. Stops (and releases hung requests) on drop.
#[derive(Debug)]
pub struct FakeUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl FakeUpstream {
    /// Binds `127.0.0.1:0` and serves in a task of the current tokio runtime.
    pub async fn start() -> Result<Self> {
        Self::start_on("127.0.0.1").await
    }

    /// Binds `<ip>:0` for a loopback `ip` other than 127.0.0.1 (e.g. `127.0.0.2`),
    /// to stand for a different host.
    pub async fn start_on(ip: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .context("bind fake upstream")?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                manifests: HashMap::new(),
                tags: HashMap::new(),
                blobs: HashMap::new(),
                uploads: HashMap::new(),
                behaviour: Behaviour::Normal,
                rules: Vec::new(),
                auth: Auth::None,
                requests: Vec::new(),
                token_requests: 0,
                token_expires_in: 300,
                token_fields: TokenFields::default(),
                tokens_not_before_ms: 0,
            }),
            cancel: cancel.clone(),
            base_url: format!("http://{addr}"),
        });
        let app = server::router(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await;
        });
        Ok(Self { shared, addr, task })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }
    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    // ---- behaviour and auth ----

    /// Sets the behaviour for all requests (path rules from [`FakeUpstream::set_behaviour_for`]
    /// take precedence).
    pub fn set_behaviour(&self, b: Behaviour) {
        self.shared.lock().behaviour = b;
    }
    pub fn behaviour(&self) -> Behaviour {
        self.shared.lock().behaviour.clone()
    }
    /// Behaviour for requests whose path (with query) contains `path_contains`
    /// (e.g. `"/blobs/"`, a digest, a repo name). Added rules are checked in order.
    pub fn set_behaviour_for(&self, path_contains: &str, b: Behaviour) {
        let mut st = self.shared.lock();
        st.rules.retain(|(p, _)| p != path_contains);
        st.rules.push((path_contains.to_owned(), b));
    }
    /// Removes all path rules.
    pub fn clear_behaviour_rules(&self) {
        self.shared.lock().rules.clear();
    }
    pub fn set_auth(&self, auth: Auth) {
        self.shared.lock().auth = auth;
    }
    /// `expires_in` of tokens issued from now on (default 300 s); enforced on use.
    pub fn set_token_expires_in(&self, secs: u64) {
        self.shared.lock().token_expires_in = secs;
    }
    /// Which fields token responses carry from now on.
    pub fn set_token_fields(&self, fields: TokenFields) {
        self.shared.lock().token_fields = fields;
    }
    /// Makes every token issued so far invalid (by any fake honouring this one's check).
    pub fn revoke_tokens(&self) {
        self.shared.lock().tokens_not_before_ms = auth::now_ms() + 1;
    }

    // ---- content ----

    /// Stores a blob in `repo`, returns its digest.
    pub fn add_blob(&self, repo: &str, bytes: impl Into<Bytes>) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        self.add_blob_as(repo, &digest, bytes);
        digest
    }
    /// Stores a blob in `repo` under `digest`, which the caller computed (a
    /// `sha512:` digest, say); the fake does not check it.
    pub fn add_blob_as(&self, repo: &str, digest: &str, bytes: impl Into<Bytes>) {
        self.shared
            .lock()
            .blobs
            .insert((repo.into(), digest.into()), bytes.into());
    }
    /// Removes a blob from `repo` (later GETs are 404).
    pub fn remove_blob(&self, repo: &str, digest: &str) {
        self.shared
            .lock()
            .blobs
            .remove(&(repo.into(), digest.into()));
    }
    /// Stores a manifest (served with `media_type`), tagged `tag` if given; returns its digest.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        self.add_manifest_as(repo, tag, media_type, bytes, &digest);
        digest
    }
    /// Stores a manifest under `digest`, which the caller computed: a signed
    /// schema1 manifest's digest covers its payload without the signatures,
    /// and a `sha512:` digest is not the fake's default. Tagged `tag` if given.
    pub fn add_manifest_as(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: impl Into<Bytes>,
        digest: &str,
    ) {
        let mut st = self.shared.lock();
        st.manifests.insert(
            (repo.into(), digest.into()),
            StoredManifest {
                media_type: media_type.into(),
                bytes: bytes.into(),
            },
        );
        if let Some(t) = tag {
            st.tags.insert((repo.into(), t.into()), digest.into());
        }
    }
    /// Points `repo:tag` at `digest` (which should be stored already).
    pub fn set_tag(&self, repo: &str, tag: &str, digest: &str) {
        self.shared
            .lock()
            .tags
            .insert((repo.into(), tag.into()), digest.into());
    }
    pub fn remove_tag(&self, repo: &str, tag: &str) {
        self.shared.lock().tags.remove(&(repo.into(), tag.into()));
    }
    /// Loads an image (manifest + blobs) as `repo:tag` (or untagged with `None`).
    pub fn add_image(&self, repo: &str, tag: Option<&str>, image: &PushedImage) {
        for b in image.blobs() {
            self.add_blob(repo, b.bytes.clone());
        }
        self.add_manifest(repo, tag, &image.media_type, image.manifest.clone());
    }
    /// Loads an index, its children (by digest) and their blobs as `repo:tag`.
    pub fn add_index(&self, repo: &str, tag: Option<&str>, index: &PushedIndex) {
        for (_, child) in &index.children {
            self.add_image(repo, None, child);
        }
        self.add_manifest(repo, tag, &index.media_type, index.manifest.clone());
    }

    // ---- observation ----

    /// Every request received so far (including `/token`).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }
    /// Number of requests to the `/token` endpoint.
    pub fn token_requests(&self) -> usize {
        self.shared.lock().token_requests
    }
    /// Forgets recorded requests and the token-request count.
    pub fn clear_requests(&self) {
        let mut st = self.shared.lock();
        st.requests.clear();
        st.token_requests = 0;
    }
}

impl RequestLog for FakeUpstream {
    fn describe(&self) -> String {
        format!("fake upstream {}", self.host())
    }

    /// Requests received (recorded on arrival, before the answer) with this
    /// method whose path contains `path_contains`.
    fn count(&self, method: &str, path_contains: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.path.contains(path_contains))
            .count()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
        self.task.abort();
    }
}
