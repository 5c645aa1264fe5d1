//! The HTTP client side: one `Upstream` per configured registry, handling
//! authorization, rate limiting, redirects and timeouts.

pub mod auth;
pub mod challenge;
pub mod credentials;
pub mod hosts;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use url::Url;

use crate::config::{Timeouts, UpstreamConfig};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::oci::RepoName;
use auth::Auth;
use hosts::HostPolicy;

/// Longest `Retry-After` we wait out before giving up on a request.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);
const MAX_REDIRECTS: usize = 5;
/// How long an upstream that answered a HEAD with 405 or 501 is asked with
/// GET only ([`Upstream::head`]). Bounded, so an upstream that starts
/// answering HEAD gets HEADs again (they spare Docker Hub's pull quota).
const HEAD_REFUSAL_MEMORY: Duration = Duration::from_secs(600);

pub struct Upstream {
    pub config: UpstreamConfig,
    client: reqwest::Client,
    policy: HostPolicy,
    auth: Auth,
    metrics: Arc<Metrics>,
    /// When this upstream last refused HEAD with 405 or 501, by endpoint
    /// (`manifests`, `blobs`): at most one entry per endpoint the cache asks.
    head_refused: Mutex<HashMap<String, Instant>>,
}

/// An upstream stands for its canonical host, so the configured list routes
/// requests as it is (see [`crate::route::route`]).
impl AsRef<str> for Upstream {
    fn as_ref(&self) -> &str {
        self.host()
    }
}

/// The HTTP client shared by all `upstreams`: one connection pool,
/// keep-alive, proxy environment variables, certificates verified against
/// the system's CA certificates.
///
/// reqwest (with rustls) reads those when the client is built, through
/// rustls-platform-verifier and rustls-native-certs: the OS bundle, or only
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` when either is set; none at all fails
/// the build. Then, if no upstream URL is https, the client is built
/// without CA certificates (a warning says https redirects and token realms
/// will fail), so a plain-http cache starts on a machine without a bundle.
///
/// Errors: [`Error::UpstreamUnavailable`] for the https upstreams when there
/// are no CA certificates (saying what to install, see [`no_ca_certificates`]);
/// [`Error::Internal`] with reqwest's reasons when the client cannot be
/// built even without them.
pub fn build_client(t: &Timeouts, upstreams: &[UpstreamConfig]) -> Result<reqwest::Client> {
    let builder = || {
        reqwest::Client::builder()
            .connect_timeout(t.connect)
            .read_timeout(t.body_idle)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            // We follow redirects ourselves, checking every hop's host.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION")))
    };
    let with_system_roots = match builder().build() {
        Ok(client) => return Ok(client),
        Err(e) => e,
    };
    // Built without system CA certificates, the client works: they were the
    // problem.
    let without_roots = builder().tls_certs_only([]).build().map_err(|e| {
        Error::Internal(format!(
            "cannot build the upstream HTTP client: {}",
            error_chain(&e)
        ))
    })?;
    no_ca_certificates(upstreams, &error_chain(&with_system_roots))?;
    tracing::warn!(
        reason = %error_chain(&with_system_roots),
        "no CA certificates found; every upstream is plain http, so starting without them \
         (https redirects and token realms will fail)"
    );
    Ok(without_roots)
}

/// Whether the cache may run without CA certificates (`why`: what loading
/// them said): `Ok` when no upstream URL is https, else
/// [`Error::UpstreamUnavailable`] naming the https upstreams and how to
/// provide certificates.
fn no_ca_certificates(upstreams: &[UpstreamConfig], why: &str) -> Result<()> {
    let https: Vec<&str> = upstreams
        .iter()
        .filter(|u| u.url.scheme() == "https")
        .map(|u| u.host.as_str())
        .collect();
    if https.is_empty() {
        return Ok(());
    }
    Err(Error::UpstreamUnavailable {
        upstream: https.join(", "),
        detail: format!(
            "no CA certificates found to verify its https URL \
             (install ca-certificates, or set SSL_CERT_FILE or SSL_CERT_DIR to PEM certificates): {why}"
        ),
    })
}

/// An error and its sources, `: `-separated: reqwest's own message for a
/// build failure is only "builder error".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl Upstream {
    pub fn new(
        config: UpstreamConfig,
        client: reqwest::Client,
        credentials_file: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let policy = HostPolicy::new(&config.url, &config.allowed_hosts);
        Self {
            auth: Auth::new(config.host.clone(), credentials_file, policy.clone()),
            config,
            client,
            policy,
            metrics,
            head_refused: Mutex::default(),
        }
    }

    pub fn host(&self) -> &str {
        &self.config.host
    }

    /// How many token requests this upstream has made (tests, metrics).
    pub fn token_fetches(&self) -> u64 {
        self.auth
            .token_fetches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn url_for(&self, repo: &RepoName, rest: &str, query: Option<&str>) -> Url {
        let mut url = self.config.url.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}/v2/{repo}/{rest}"));
        url.set_query(query);
        url
    }

    fn unavailable(&self, detail: impl Into<String>) -> Error {
        Error::UpstreamUnavailable {
            upstream: self.host().to_owned(),
            detail: detail.into(),
        }
    }

    fn invalid(&self, detail: impl Into<String>) -> Error {
        Error::UpstreamInvalid {
            upstream: self.host().to_owned(),
            detail: detail.into(),
        }
    }

    /// Sends a request for `<repo>/<rest>`, answering auth challenges,
    /// waiting out short rate limits and following checked redirects.
    /// Returns the final response whatever its status, except 401/403/429.
    pub async fn send(
        &self,
        method: Method,
        repo: &RepoName,
        rest: &str,
        query: Option<&str>,
        headers: HeaderMap,
        header_timeout: Duration,
    ) -> Result<reqwest::Response> {
        let resp = self
            .exchange(method.clone(), repo, rest, query, headers, header_timeout)
            .await?;
        denied(self.host(), &method, resp)
    }

    /// A HEAD of `<repo>/<rest>` (with `headers`), as [`Upstream::send`]
    /// sends it. `None` when the upstream refuses HEAD there, in its final
    /// answer after redirects ([`head_refused`]), or refused it with 405 or
    /// 501 within the last 10 minutes: the caller asks with GET instead,
    /// whose answer stands (a 404 to the GET is a real 404, a 403 a real
    /// denial). Docker and containerd fall back the same way. Otherwise the
    /// HEAD's answer, whatever its status but 401/403/429 (errors as for
    /// [`Upstream::send`]).
    pub async fn head(
        &self,
        repo: &RepoName,
        rest: &str,
        headers: HeaderMap,
        header_timeout: Duration,
    ) -> Result<Option<reqwest::Response>> {
        // The endpoint, e.g. `manifests` of `manifests/v1`.
        let endpoint = rest.split('/').next().unwrap_or(rest);
        if self.refused_head_lately(endpoint) {
            return Ok(None);
        }
        let resp = self
            .exchange(Method::HEAD, repo, rest, None, headers, header_timeout)
            .await?;
        let status = resp.status();
        if !head_refused(status) {
            return denied(self.host(), &Method::HEAD, resp).map(Some);
        }
        tracing::debug!(upstream = %self.host(), %repo, %rest, %status, "HEAD refused; asking with GET");
        // 405 and 501 say the method is refused, whatever the resource; 403
        // and 404 may be about the resource, so they are not remembered.
        if matches!(
            status,
            StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED
        ) {
            self.head_refused
                .lock()
                .expect("poisoned")
                .insert(endpoint.to_owned(), Instant::now());
        }
        Ok(None)
    }

    /// Whether this upstream refused HEAD on `endpoint` with 405 or 501
    /// within `HEAD_REFUSAL_MEMORY`.
    fn refused_head_lately(&self, endpoint: &str) -> bool {
        let refused = self.head_refused.lock().expect("poisoned");
        refused
            .get(endpoint)
            .is_some_and(|at| at.elapsed() < HEAD_REFUSAL_MEMORY)
    }

    /// [`Upstream::send`]'s exchange: the final response whatever its
    /// status, except 429 (waited out once, else an error); a 401 or 403 is
    /// returned for the caller to judge.
    async fn exchange(
        &self,
        method: Method,
        repo: &RepoName,
        rest: &str,
        query: Option<&str>,
        headers: HeaderMap,
        header_timeout: Duration,
    ) -> Result<reqwest::Response> {
        let scope = format!("repository:{repo}:pull");
        let origin = self.config.url.origin();
        let mut url = self.url_for(repo, rest, query);
        let mut authorization = self
            .auth
            .authorization(&self.client, &scope, header_timeout)
            .await?;
        let (mut answered_challenge, mut waited, mut hops) = (false, false, 0);
        loop {
            let mut req = self
                .client
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            // Credentials only ever go to the upstream itself, never to a
            // redirect target.
            if let Some(a) = authorization.as_ref().filter(|_| url.origin() == origin) {
                req = req.header(header::AUTHORIZATION, a.clone());
            }
            let sent = tokio::time::timeout(header_timeout, req.send()).await;
            let status = sent
                .as_ref()
                .map_or(0, |r| r.as_ref().map_or(0, |r| r.status().as_u16()));
            self.metrics
                .upstream_request(self.host(), method.as_str(), status);
            let resp = match sent {
                Err(_) => {
                    return Err(self.unavailable(format!("no response within {header_timeout:?}")));
                }
                Ok(Err(e)) => return Err(self.unavailable(describe(&e))),
                Ok(Ok(r)) => r,
            };
            let status = resp.status();
            match status {
                StatusCode::UNAUTHORIZED if !answered_challenge && url.origin() == origin => {
                    let challenge = resp
                        .headers()
                        .get_all(header::WWW_AUTHENTICATE)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .find_map(challenge::parse);
                    authorization = Some(
                        self.auth
                            .answer(&self.client, challenge, &scope, header_timeout)
                            .await?,
                    );
                    answered_challenge = true;
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    let retry_after = retry_after(resp.headers());
                    match retry_after {
                        Some(d) if !waited && d <= MAX_RETRY_WAIT => {
                            tracing::info!(upstream = %self.host(), wait = ?d, "upstream rate limited; retrying");
                            tokio::time::sleep(d).await;
                            waited = true;
                        }
                        _ => {
                            return Err(Error::TooManyRequests {
                                upstream: self.host().to_owned(),
                                retry_after,
                            });
                        }
                    }
                }
                s if s.is_redirection() && s != StatusCode::NOT_MODIFIED => {
                    hops += 1;
                    let next = resp
                        .headers()
                        .get(header::LOCATION)
                        .and_then(|l| l.to_str().ok())
                        .and_then(|l| url.join(l).ok())
                        .ok_or_else(|| self.invalid("redirect without a valid Location"))?;
                    if hops > MAX_REDIRECTS {
                        return Err(self.invalid("too many redirects"));
                    }
                    if !self.policy.permits(&next) {
                        tracing::warn!(upstream = %self.host(), target = %next.host_str().unwrap_or(""), "refusing redirect to a host outside the upstream's allowed hosts");
                        return Err(self.invalid(
                            "redirect to a host that is not allowed (see allowed_hosts)",
                        ));
                    }
                    url = next;
                }
                _ => return Ok(resp),
            }
        }
    }
}

/// `resp`, unless the upstream denied the `method` request with 401 or 403:
/// then [`Error::Denied`] (see [`status_error`]), naming the path that
/// denied it (the last redirect's).
fn denied(host: &str, method: &Method, resp: reqwest::Response) -> Result<reqwest::Response> {
    match resp.status() {
        s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
            let what = format!("{method} {}", resp.url().path());
            Err(status_error(host, &what, s))
        }
        _ => Ok(resp),
    }
}

/// Whether an upstream's final answer to a HEAD (after challenges and
/// redirects) refuses the method where a GET may well work, so the GET is
/// worth asking: 405 and 501 (HEAD not supported), 403 (proxies and object
/// stores whose signed URLs or rules admit GET only) and 404 (registries and
/// proxies that route HEAD nowhere). A GET's answer then stands.
pub fn head_refused(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::NOT_IMPLEMENTED
            | StatusCode::FORBIDDEN
            | StatusCode::NOT_FOUND
    )
}

/// The error for an upstream answering `what` (e.g. `manifest HEAD`) with a
/// status the caller cannot use. One mapping for every request, so a status
/// means the same to a client whichever request met it:
/// - 401 and 403: [`Error::Denied`] (a client sees 403, never a challenge);
/// - 429 and 5xx: [`Error::UpstreamUnavailable`] (503: try again later). A
///   429 only gets here from callers other than [`Upstream::send`], which
///   turns it into [`Error::TooManyRequests`] with the upstream's Retry-After;
/// - anything else (an unexpected 4xx, 1xx or 3xx): [`Error::UpstreamInvalid`]
///   (502: the upstream answered, but not as a registry should).
///
/// Callers decide first which statuses they handle themselves (success,
/// 404, or the 4xx a listing relays to its client).
pub fn status_error(host: &str, what: &str, status: StatusCode) -> Error {
    let upstream = host.to_owned();
    let detail = format!("{what} answered {status}");
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::Denied { upstream, detail },
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
            Error::UpstreamUnavailable { upstream, detail }
        }
        _ => Error::UpstreamInvalid { upstream, detail },
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// A transport error in words, without URLs that could carry secrets.
pub fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "response body failed"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut root = None;
    while let Some(s) = source {
        root = Some(s.to_string());
        source = s.source();
    }
    match root {
        Some(r) => format!("{kind}: {r}"),
        None => kind.to_owned(),
    }
}

/// A blob body on its way from an upstream, not yet checked: what a fill
/// writes and what a pass-through relays, both through
/// [`crate::verify::verified`].
pub struct UpstreamBody {
    /// The configured host of the upstream it comes from, for errors.
    pub upstream: String,
    /// Its length in bytes, from `Content-Length`; `None` when the upstream
    /// sends it chunked.
    pub len: Option<u64>,
    /// Its bytes in order, in the chunks they arrived in. A transport failure
    /// is an item [`Error::UpstreamUnavailable`] (see [`describe`]).
    pub chunks: BoxStream<'static, Result<Bytes>>,
}

impl UpstreamBody {
    /// A body of `len` bytes (if known) arriving as `chunks` from `upstream`.
    pub fn new(
        upstream: &str,
        len: Option<u64>,
        chunks: impl Stream<Item = Result<Bytes>> + Send + 'static,
    ) -> Self {
        Self {
            upstream: upstream.to_owned(),
            len,
            chunks: chunks.boxed(),
        }
    }

    /// The body of `resp`, an upstream's answer whose status the caller has
    /// already checked.
    pub fn from_response(upstream: &str, resp: reqwest::Response) -> Self {
        let host = upstream.to_owned();
        let len = resp.content_length();
        let chunks = resp.bytes_stream().map(move |chunk| {
            chunk.map_err(|e| Error::UpstreamUnavailable {
                upstream: host.clone(),
                detail: describe(&e),
            })
        });
        Self::new(upstream, len, chunks)
    }
}

/// Reads a whole (small) body, refusing more than `limit` bytes.
pub async fn read_limited(resp: reqwest::Response, limit: u64, host: &str) -> Result<Bytes> {
    let too_big = || Error::UpstreamInvalid {
        upstream: host.to_owned(),
        detail: format!("response larger than {limit} bytes"),
    };
    if resp.content_length().is_some_and(|l| l > limit) {
        return Err(too_big());
    }
    let mut body = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::UpstreamUnavailable {
            upstream: host.to_owned(),
            detail: describe(&e),
        })?;
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The `Accept` header we send for manifests: the client's list, with every
/// manifest type spelled out when it had none or a wildcard (registries
/// match media types literally).
pub fn accept_header(accept: &[String]) -> HeaderValue {
    let wildcard = accept.is_empty() || accept.iter().any(|a| a.ends_with("/*"));
    let mut list: Vec<&str> = accept
        .iter()
        .map(String::as_str)
        .filter(|a| !a.ends_with("/*"))
        .collect();
    if wildcard {
        for t in crate::oci::media::ALL_MANIFESTS {
            if !list.contains(&t) {
                list.push(t);
            }
        }
    }
    let list = list.join(", ");
    HeaderValue::from_str(&list)
        .unwrap_or_else(|_| HeaderValue::from_static(crate::oci::media::OCI_MANIFEST))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_one_error_each() {
        let e =
            |code: u16| status_error("r.example", "blob GET", StatusCode::from_u16(code).unwrap());
        // What the client sees: 503 try later, 403 denied, 502 bad upstream.
        for (codes, client_sees) in [
            (&[500, 502, 503, 504, 429][..], 503),
            (&[401, 403][..], 403),
            (&[400, 405, 416, 304, 100][..], 502),
        ] {
            for &code in codes {
                assert_eq!(
                    e(code).status().as_u16(),
                    client_sees,
                    "{code}: {:?}",
                    e(code)
                );
                assert!(e(code).is_upstream_failure(), "{code}");
            }
        }
        assert!(matches!(e(503), Error::UpstreamUnavailable { .. }));
        assert!(matches!(e(401), Error::Denied { .. }));
        assert!(matches!(e(400), Error::UpstreamInvalid { .. }));
        assert_eq!(
            e(503).to_string(),
            "upstream r.example is unavailable: blob GET answered 503 Service Unavailable"
        );
    }

    #[test]
    fn a_head_refused_where_a_get_may_work_is_asked_again_with_get() {
        for code in [405, 501, 403, 404] {
            assert!(head_refused(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        // Answers about the upstream or the request, not the method, stand.
        for code in [200, 204, 304, 400, 401, 429, 500, 502, 503] {
            assert!(!head_refused(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let future = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_str(&httpdate::fmt_http_date(future)).unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn wildcard_accept_lists_every_manifest_type() {
        let h = accept_header(&["*/*".into()]);
        assert!(
            h.to_str()
                .unwrap()
                .contains(crate::oci::media::OCI_MANIFEST)
        );
        assert!(!h.to_str().unwrap().contains("*/*"));
        let h = accept_header(&[crate::oci::media::DOCKER_MANIFEST.into()]);
        assert_eq!(h.to_str().unwrap(), crate::oci::media::DOCKER_MANIFEST);
    }

    #[test]
    fn only_https_upstreams_need_ca_certificates() {
        let http = UpstreamConfig::new("registry.local:5000", Some("http://127.0.0.1:1")).unwrap();
        let ghcr = UpstreamConfig::new("ghcr.io", None).unwrap();
        let quay = UpstreamConfig::new("quay.io", None).unwrap();
        assert!(no_ca_certificates(std::slice::from_ref(&http), "none loaded").is_ok());
        assert!(no_ca_certificates(&[], "none loaded").is_ok());
        let e = no_ca_certificates(&[http, ghcr, quay], "none loaded").unwrap_err();
        assert!(matches!(e, Error::UpstreamUnavailable { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "upstream ghcr.io, quay.io is unavailable: no CA certificates found to verify its \
             https URL (install ca-certificates, or set SSL_CERT_FILE or SSL_CERT_DIR to PEM \
             certificates): none loaded"
        );
    }

    #[test]
    fn error_chains_name_every_cause() {
        let inner = std::io::Error::other("No CA certificates were loaded from the system");
        assert_eq!(
            error_chain(&ChainLink(inner)),
            "builder error: No CA certificates were loaded from the system"
        );
    }

    /// An error with a source, as reqwest's builder errors are.
    #[derive(Debug)]
    struct ChainLink(std::io::Error);

    impl std::fmt::Display for ChainLink {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("builder error")
        }
    }

    impl std::error::Error for ChainLink {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn upstream_urls_keep_a_path_prefix() {
        let mut cfg = UpstreamConfig::new("r.example", Some("https://r.example/mirror/")).unwrap();
        cfg.tag_ttl = Duration::ZERO;
        let t = Timeouts::default();
        let u = Upstream::new(cfg, build_client(&t, &[]).unwrap(), None, Arc::default());
        let repo = RepoName::parse("a/b").unwrap();
        assert_eq!(
            u.url_for(&repo, "tags/list", Some("n=1")).as_str(),
            "https://r.example/mirror/v2/a/b/tags/list?n=1"
        );
    }
}
