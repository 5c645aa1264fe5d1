//! Upstream authorization: anonymous or Basic, and the Bearer token flow with
//! tokens reused per scope until they expire.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;
use url::Url;

use super::challenge::Challenge;
use super::credentials::{self, Credentials};
use super::hosts::HostPolicy;
use crate::error::{Error, Result};

/// Tokens are dropped this long before the upstream says they expire.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// Registries may omit `expires_in`; the token spec says 60 s then.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
enum Scheme {
    Bearer { realm: Url, service: Option<String> },
    Basic,
}

#[derive(Debug)]
struct Token {
    header: HeaderValue,
    expires: Instant,
}

pub struct Auth {
    host: String,
    credentials_file: Option<PathBuf>,
    policy: HostPolicy,
    /// Learned from the first challenge, so later requests authorize up front.
    scheme: Mutex<Option<Scheme>>,
    tokens: Mutex<HashMap<String, Token>>,
    /// One token fetch at a time per upstream; others then find it cached.
    fetch_lock: tokio::sync::Mutex<()>,
    pub(super) token_fetches: std::sync::atomic::AtomicU64,
}

impl Auth {
    pub fn new(host: String, credentials_file: Option<PathBuf>, policy: HostPolicy) -> Self {
        Self {
            host,
            credentials_file,
            policy,
            scheme: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            fetch_lock: tokio::sync::Mutex::new(()),
            token_fetches: Default::default(),
        }
    }

    fn credentials(&self) -> Result<Option<Credentials>> {
        match &self.credentials_file {
            None => Ok(None),
            Some(path) => credentials::load(path, &self.host).map_err(|e| {
                tracing::warn!(upstream = %self.host, error = %e, "cannot load credentials");
                Error::Denied {
                    upstream: self.host.clone(),
                    detail: "credentials file unreadable".into(),
                }
            }),
        }
    }

    /// The Authorization header to send before any challenge, if we know one.
    pub async fn authorization(
        &self,
        client: &reqwest::Client,
        scope: &str,
        timeout: Duration,
    ) -> Result<Option<HeaderValue>> {
        let scheme = self.scheme.lock().expect("poisoned").clone();
        match scheme {
            None => Ok(None),
            Some(Scheme::Basic) => self.basic(),
            Some(Scheme::Bearer { realm, service }) => self
                .bearer(client, &realm, service.as_deref(), scope, timeout, false)
                .await
                .map(Some),
        }
    }

    /// Reacts to a 401: learns the scheme and returns a fresh Authorization.
    pub async fn answer(
        &self,
        client: &reqwest::Client,
        challenge: Option<Challenge>,
        scope: &str,
        timeout: Duration,
    ) -> Result<HeaderValue> {
        let denied = |detail: &str| Error::Denied {
            upstream: self.host.clone(),
            detail: detail.to_owned(),
        };
        match challenge {
            Some(Challenge::Basic) => {
                *self.scheme.lock().expect("poisoned") = Some(Scheme::Basic);
                self.basic()?
                    .ok_or_else(|| denied("upstream requires credentials"))
            }
            Some(Challenge::Bearer { realm, service, .. }) => {
                let realm: Url = realm.parse().map_err(|_| denied("invalid token realm"))?;
                if !self.policy.permits(&realm) {
                    tracing::warn!(upstream = %self.host, realm = %realm, "refusing token realm on an unrelated host");
                    return Err(denied(
                        "token realm is not on the upstream's site (see allowed_hosts)",
                    ));
                }
                *self.scheme.lock().expect("poisoned") = Some(Scheme::Bearer {
                    realm: realm.clone(),
                    service: service.clone(),
                });
                self.bearer(client, &realm, service.as_deref(), scope, timeout, true)
                    .await
            }
            None => Err(denied("unsupported authentication challenge")),
        }
    }

    fn basic(&self) -> Result<Option<HeaderValue>> {
        Ok(self.credentials()?.map(|c| basic_header(&c)))
    }

    async fn bearer(
        &self,
        client: &reqwest::Client,
        realm: &Url,
        service: Option<&str>,
        scope: &str,
        timeout: Duration,
        refresh: bool,
    ) -> Result<HeaderValue> {
        if !refresh && let Some(h) = self.cached(scope) {
            return Ok(h);
        }
        let _guard = self.fetch_lock.lock().await;
        if !refresh && let Some(h) = self.cached(scope) {
            return Ok(h);
        }
        let token = self
            .fetch_token(client, realm, service, scope, timeout)
            .await?;
        let header = token.header.clone();
        self.tokens
            .lock()
            .expect("poisoned")
            .insert(scope.to_owned(), token);
        Ok(header)
    }

    fn cached(&self, scope: &str) -> Option<HeaderValue> {
        let tokens = self.tokens.lock().expect("poisoned");
        tokens
            .get(scope)
            .filter(|t| t.expires > Instant::now())
            .map(|t| t.header.clone())
    }

    async fn fetch_token(
        &self,
        client: &reqwest::Client,
        realm: &Url,
        service: Option<&str>,
        scope: &str,
        timeout: Duration,
    ) -> Result<Token> {
        let unavailable = |detail: String| Error::UpstreamUnavailable {
            upstream: self.host.clone(),
            detail,
        };
        let mut url = realm.clone();
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut req = client.get(url).timeout(timeout);
        if self.policy.may_receive_credentials(realm)
            && let Some(c) = self.credentials()?
        {
            req = req.header(http::header::AUTHORIZATION, basic_header(&c));
        }
        self.token_fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let resp = req
            .send()
            .await
            .map_err(|e| unavailable(format!("token request failed: {}", super::describe(&e))))?;
        let status = resp.status();
        if !status.is_success() {
            // 401/403: the credentials were refused (Denied); 5xx/429: try
            // later; any other status: the realm is not a token service.
            return Err(super::status_error(&self.host, "token endpoint", status));
        }
        let body = super::read_limited(resp, 1 << 20, &self.host).await?;
        let parsed = parse_token(&body).ok_or_else(|| Error::UpstreamInvalid {
            upstream: self.host.clone(),
            detail: "token endpoint sent no token".into(),
        })?;
        let lifetime = parsed.1.unwrap_or(DEFAULT_TOKEN_LIFETIME);
        Ok(Token {
            header: HeaderValue::from_str(&format!("Bearer {}", parsed.0)).map_err(|_| {
                Error::UpstreamInvalid {
                    upstream: self.host.clone(),
                    detail: "token is not a valid header value".into(),
                }
            })?,
            expires: Instant::now()
                + lifetime
                    .saturating_sub(EXPIRY_MARGIN)
                    .max(Duration::from_secs(1)),
        })
    }
}

fn basic_header(c: &Credentials) -> HeaderValue {
    let encoded = STANDARD.encode(format!("{}:{}", c.username, c.password));
    let mut v =
        HeaderValue::from_str(&format!("Basic {encoded}")).expect("base64 is a valid header");
    v.set_sensitive(true);
    v
}

/// `{"token": ...}` or `{"access_token": ...}`, with optional `expires_in`.
fn parse_token(body: &[u8]) -> Option<(String, Option<Duration>)> {
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let t: TokenResponse = serde_json::from_slice(body).ok()?;
    let token = t.token.or(t.access_token).filter(|t| !t.is_empty())?;
    Some((token, t.expires_in.map(Duration::from_secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_responses() {
        assert_eq!(
            parse_token(br#"{"token":"abc","expires_in":300}"#),
            Some(("abc".into(), Some(Duration::from_secs(300))))
        );
        assert_eq!(
            parse_token(br#"{"access_token":"x"}"#),
            Some(("x".into(), None))
        );
        assert_eq!(parse_token(br#"{"token":""}"#), None);
        assert_eq!(parse_token(b"<html>"), None);
    }

    #[test]
    fn basic_header_is_sensitive() {
        let h = basic_header(&Credentials {
            username: "u".into(),
            password: "p".into(),
        });
        assert!(h.is_sensitive());
        assert_eq!(h.to_str().unwrap(), "Basic dTpw");
    }
}
