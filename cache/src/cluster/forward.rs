//! Streaming one client request from another member (the key's owner) and
//! its answer back, as a reverse proxy does: same method, path and query,
//! the request headers that choose the answer, and the owner's status,
//! headers and body as they arrive (issue 16, "Routing").

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use futures::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, header};

use super::relay::{Relay, Relayed};
use super::{HOP_HEADER, MEMBER_HEADER, Member};
use crate::config::Timeouts;
use crate::error::{Error, Result};
use crate::upstream::error_chain;
use crate::zerocopy::SendQueue;

/// Request headers passed on to the owner: those that choose the answer's
/// representation or part. Everything else (credentials, hop-by-hop
/// headers) stays here: the owner answers with its own upstream access.
const FORWARDED_REQUEST_HEADERS: [HeaderName; 4] = [
    header::ACCEPT,
    header::RANGE,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
];

/// Response headers that describe one connection, not the answer
/// (RFC 9110 section 7.6.1); the owner's are not relayed.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Why a member gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum Unreachable {
    /// The connection failed or broke before the response headers.
    #[error("{0}")]
    Transport(String),
    /// No response headers within the connect plus response-header timeouts.
    #[error("no response headers within {0:?}")]
    Timeout(Duration),
    /// The answer came from another member, or from no regmirror member
    /// (its [`MEMBER_HEADER`] names someone else, or is missing).
    #[error("{}", match .0 { Some(name) => format!("answers as member {name:?}: its URL reaches another member"), None => "answers without a Regmirror-Member header: its URL does not reach a regmirror cache member".to_owned() })]
    NotTheMember(Option<String>),
}

/// Whether `answer` came from member `to`: its [`MEMBER_HEADER`] names it.
/// Errors: [`Unreachable::NotTheMember`] with the name it gave, if any.
pub fn check_member(to: &Member, answer: &HeaderMap) -> std::result::Result<(), Unreachable> {
    match answer.get(&MEMBER_HEADER).map(|v| v.to_str()) {
        Some(Ok(name)) if name == to.name => Ok(()),
        Some(Ok(name)) => Err(Unreachable::NotTheMember(Some(name.to_owned()))),
        _ => Err(Unreachable::NotTheMember(None)),
    }
}

/// The headers of a request forwarded from member `me` to member `to`:
/// `client`'s [`FORWARDED_REQUEST_HEADERS`] (every value of each), plus
/// `Regmirror-Hop: me`, which makes the receiver serve it itself, and
/// `Regmirror-Member: to`, which makes any other receiver refuse it.
pub fn request_headers(client: &HeaderMap, me: &str, to: &str) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in FORWARDED_REQUEST_HEADERS {
        for value in client.get_all(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    mark_hop(&mut out, me, to);
    out
}

/// Marks `headers` as a request between members: `Regmirror-Hop: me`,
/// `Regmirror-Member: to`.
fn mark_hop(headers: &mut HeaderMap, me: &str, to: &str) {
    if let Ok(v) = HeaderValue::from_str(me) {
        headers.insert(HOP_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(to) {
        headers.insert(MEMBER_HEADER, v);
    }
}

/// The owner's response headers as relayed to the client: all but the
/// [`HOP_BY_HOP`] ones, those its `Connection` header names, and
/// [`MEMBER_HEADER`] (meant for the member that asked).
pub fn response_headers(mut owner: HeaderMap) -> HeaderMap {
    owner.remove(MEMBER_HEADER);
    let named: Vec<HeaderName> = owner
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        owner.remove(name);
    }
    owner
}

/// How this member reaches the others: one HTTP client (connections kept
/// alive and reused), the zero-copy relay for blob bodies, its own name
/// (sent as the hop), and how long it waits for a member's response headers.
#[derive(Debug, Clone)]
pub struct PeerClient {
    client: reqwest::Client,
    relay: Relay,
    me: String,
    header_timeout: Duration,
}

/// How long a member waits for another's answer to an
/// [`super::handover::ONLY_IF_CACHED`] request: it comes from the store (a
/// file opened, no upstream), so a member that takes longer is stalled.
pub const STORED_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

impl PeerClient {
    /// A client for member `me`: connects time out after `timeouts.connect`,
    /// response headers after the owner's own worst case: asking the
    /// others for stored content (a HEAD and a GET, each within
    /// [`STORED_ANSWER_TIMEOUT`]), then the upstream (`timeouts.connect +
    /// timeouts.response_header`), plus a second to spare, so a slow
    /// upstream behind a healthy owner never gets the owner marked down;
    /// a silent body after `timeouts.body_idle` (the upstream's timeouts:
    /// a member answers within them or the upstream's failure shows).
    /// Redirects are not followed: members relay them as they are.
    ///
    /// # Errors
    /// The HTTP client cannot be built ([`Error::Internal`]).
    pub fn new(me: &str, timeouts: &Timeouts) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .read_timeout(timeouts.body_idle)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                Error::Internal(format!(
                    "cannot build the cluster's HTTP client: {}",
                    error_chain(&e)
                ))
            })?;
        let header_timeout = timeouts.connect
            + timeouts.response_header
            + 2 * STORED_ANSWER_TIMEOUT
            + Duration::from_secs(1);
        Ok(Self {
            client,
            relay: Relay::new(timeouts.connect, header_timeout, timeouts.body_idle),
            me: me.to_owned(),
            header_timeout,
        })
    }

    /// The underlying HTTP client, for other requests between members.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// This member's name, as sent in [`HOP_HEADER`].
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Sends `method` `path_and_query` to member `to` with `headers` and
    /// [`HOP_HEADER`] (this member's name), and returns its answer, any
    /// status, the body not yet read.
    ///
    /// # Errors
    /// [`Unreachable`]: no response headers from `to` in time (see
    /// [`PeerClient::new`]), or not from `to` ([`check_member`]).
    pub async fn send(
        &self,
        to: &Member,
        method: Method,
        path_and_query: &str,
        headers: HeaderMap,
    ) -> std::result::Result<reqwest::Response, Unreachable> {
        self.send_within(to, method, path_and_query, headers, self.header_timeout)
            .await
    }

    /// [`PeerClient::send`], waiting at most `header_timeout` for the
    /// response headers.
    ///
    /// # Errors
    /// As for [`PeerClient::send`].
    pub async fn send_within(
        &self,
        to: &Member,
        method: Method,
        path_and_query: &str,
        mut headers: HeaderMap,
        header_timeout: Duration,
    ) -> std::result::Result<reqwest::Response, Unreachable> {
        mark_hop(&mut headers, &self.me, &to.name);
        let url = format!("{}{path_and_query}", to.url.as_str().trim_end_matches('/'));
        let request = self.client.request(method, url).headers(headers).send();
        let answer = tokio::time::timeout(header_timeout, request)
            .await
            .map_err(|_| Unreachable::Timeout(header_timeout))?
            .map_err(|e| Unreachable::Transport(error_chain(&e)))?;
        check_member(to, answer.headers())?;
        Ok(answer)
    }

    /// Sends `method` `path_and_query` (as the client sent them) to member
    /// `to` with [`request_headers`], and returns the answer with the
    /// owner's status and [`response_headers`]; a GET's body streams as it
    /// arrives (a HEAD's is empty). A failure after the headers ends the
    /// body with an error (the client sees a cut transfer, never other
    /// bytes) and calls `on_body_error`.
    ///
    /// With `zero_copy` (the client's connection queue: a blob GET from an
    /// HTTP/1 client), a GET goes through the zero-copy [`Relay`] first,
    /// and through the HTTP client only when that cannot relay the answer.
    ///
    /// # Errors
    /// [`Unreachable`]: no response headers from `to` in time.
    pub async fn forward(
        &self,
        to: &Member,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        zero_copy: Option<SendQueue>,
        on_body_error: impl Fn() + Clone + Send + 'static,
    ) -> std::result::Result<Response, Unreachable> {
        let headers = request_headers(headers, &self.me, &to.name);
        if let Some(queue) = zero_copy.filter(|_| method == Method::GET) {
            let relayed = self
                .relay
                .get(to, path_and_query, &headers, queue, on_body_error.clone())
                .await?;
            if let Relayed::Answer(resp) = relayed {
                return Ok(resp);
            }
        }
        let answer = self
            .send(to, method.clone(), path_and_query, headers)
            .await?;
        let status = answer.status();
        let owner_headers = answer.headers().clone();
        let body = if method == Method::HEAD {
            Body::empty()
        } else {
            let peer = to.name.clone();
            Body::from_stream(answer.bytes_stream().inspect(move |chunk| {
                if let Err(e) = chunk {
                    tracing::warn!(%peer, error = %error_chain(e), "peer response cut short");
                    on_body_error();
                }
            }))
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.headers_mut() = response_headers(owner_headers);
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_representation_headers_and_the_hop_go_to_the_owner() {
        let mut client = HeaderMap::new();
        client.append(header::ACCEPT, HeaderValue::from_static("a/b"));
        client.append(header::ACCEPT, HeaderValue::from_static("c/d"));
        client.insert(header::RANGE, HeaderValue::from_static("bytes=0-9"));
        client.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"x\""));
        client.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        client.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let out = request_headers(&client, "cache-1", "cache-0");
        assert_eq!(out.get_all(header::ACCEPT).iter().count(), 2);
        assert_eq!(out[header::RANGE], "bytes=0-9");
        assert_eq!(out[header::IF_NONE_MATCH], "\"x\"");
        assert_eq!(out[HOP_HEADER], "cache-1");
        assert_eq!(out[MEMBER_HEADER], "cache-0", "the member meant");
        assert!(!out.contains_key(header::AUTHORIZATION));
        assert!(!out.contains_key(header::CONNECTION));
        assert_eq!(out.len(), 6);
    }

    #[test]
    fn an_answer_counts_only_from_the_member_asked() {
        let to = Member {
            name: "m1".into(),
            url: "http://127.0.0.1:1".parse().unwrap(),
        };
        let mut h = HeaderMap::new();
        let e = check_member(&to, &h).unwrap_err().to_string();
        assert!(e.contains("does not reach a regmirror cache member"), "{e}");
        h.insert(MEMBER_HEADER, HeaderValue::from_static("m0"));
        let e = check_member(&to, &h).unwrap_err().to_string();
        assert!(e.contains("answers as member \"m0\""), "{e}");
        h.insert(MEMBER_HEADER, HeaderValue::from_static("m1"));
        assert!(check_member(&to, &h).is_ok());
    }

    #[test]
    fn hop_by_hop_response_headers_stay_behind() {
        let mut owner = HeaderMap::new();
        owner.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        owner.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 0-9/20"),
        );
        owner.insert(
            "docker-content-digest",
            HeaderValue::from_static("sha256:x"),
        );
        owner.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-conn"),
        );
        owner.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        owner.insert("x-conn", HeaderValue::from_static("1"));
        owner.insert(MEMBER_HEADER, HeaderValue::from_static("m1"));
        owner.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let out = response_headers(owner);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["content-length", "content-range", "docker-content-digest"]
        );
    }
}
