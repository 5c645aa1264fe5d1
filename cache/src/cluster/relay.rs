//! The peer hop without copies, for its common case: a blob GET from an
//! HTTP/1 client that the owner answers 200 or 206 with a `Content-Length`
//! and no content coding. The request goes to the owner over a plain
//! HTTP/1.1 connection of this module's own (kept alive and reused per
//! member); its response head is read and parsed here ([`parse_head`]), and
//! the body moves from the owner's socket to the client's with `splice(2)`
//! ([`crate::zerocopy::socket_body`]), never entering user space (only the
//! body bytes read together with the head are copied, sent first).
//!
//! Other answers to such a request: without a body (204, 304) or small
//! (errors, up to [`MAX_BUFFERED`] bytes) are read here and relayed whole;
//! the rest ([`BodyPlan::Fallback`]: chunked or unsized, such as a fill from
//! a chunked upstream) is dropped with its connection and the request asked
//! again through the HTTP client ([`super::forward::PeerClient::send`]).
//! Timeouts are the HTTP client's: connect, response headers, body idle.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use url::{Host, Url};

use super::Member;
use super::forward::{Unreachable, response_headers};
use crate::zerocopy::{SendQueue, SpliceSource, socket_body};

/// Largest response head accepted from a member, in bytes.
const MAX_HEAD: usize = 64 << 10;
/// Most header fields in a member's response head.
const MAX_HEADERS: usize = 128;
/// Largest body (in bytes) read into memory and relayed whole: answers that
/// are not spliced are errors, a few hundred bytes of JSON.
pub const MAX_BUFFERED: u64 = 1 << 20;
/// Bytes read at once while waiting for a response head.
const HEAD_READ: usize = 16 << 10;
/// Idle connections kept per member.
const POOL_PER_MEMBER: usize = 32;
/// Idle connections older than this are closed, not reused: well inside a
/// member's own wait for a next request (its header read timeout, 10 s),
/// so that a reused connection is rarely one the member is closing.
const POOL_IDLE: Duration = Duration::from_secs(5);

/// How the body of a member's answer reaches the client, from its status
/// and headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPlan {
    /// `Content-Length` bytes moved with `splice(2)` (200 or 206, no
    /// `Content-Encoding`).
    Splice(u64),
    /// No body (204, 304: RFC 9112 section 6.3).
    Empty,
    /// `Content-Length` bytes, at most [`MAX_BUFFERED`], read and relayed
    /// whole.
    Buffer(u64),
    /// Anything else (chunked, no length, conflicting lengths, a large
    /// non-2xx answer, an interim 1xx): asked again through the HTTP client.
    Fallback,
}

/// How to relay the body of an answer with `status` and `headers` to a GET
/// (see [`BodyPlan`]).
pub fn body_plan(status: StatusCode, headers: &HeaderMap) -> BodyPlan {
    if matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED) {
        return BodyPlan::Empty;
    }
    if status.is_informational() || headers.contains_key(header::TRANSFER_ENCODING) {
        return BodyPlan::Fallback;
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter().map(|v| {
        v.to_str()
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
    });
    let Some(Some(len)) = lengths.next() else {
        return BodyPlan::Fallback;
    };
    if lengths.any(|other| other != Some(len)) {
        return BodyPlan::Fallback;
    }
    let whole_or_part = matches!(status, StatusCode::OK | StatusCode::PARTIAL_CONTENT);
    if whole_or_part && !headers.contains_key(header::CONTENT_ENCODING) {
        BodyPlan::Splice(len)
    } else if len <= MAX_BUFFERED {
        BodyPlan::Buffer(len)
    } else {
        BodyPlan::Fallback
    }
}

/// A member's response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// HTTP/1.1 without `Connection: close`: the connection may carry
    /// another request after the body.
    pub keep_alive: bool,
    /// Bytes of the head (status line, fields, blank line).
    pub len: usize,
}

/// Parses the response head at the start of `buf` (RFC 9112): `Ok(None)`
/// while it is incomplete.
///
/// # Errors
/// Not an HTTP/1 response head, or more than 128 fields: a message saying so.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("invalid response head from the member: {e}")),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or_default())
        .map_err(|e| format!("invalid status from the member: {e}"))?;
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    for field in resp.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|e| format!("invalid header name from the member: {e}"))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|e| format!("invalid header value from the member: {e}"))?;
        headers.append(name, value);
    }
    let close = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"));
    Ok(Some(Head {
        status,
        headers,
        keep_alive: resp.version == Some(1) && !close,
        len,
    }))
}

/// The HTTP/1.1 request head of a GET of `path_and_query` from the member
/// at `authority` (`host:port`) with `headers`.
pub fn request_head(authority: &str, path_and_query: &str, headers: &HeaderMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    for part in [
        b"GET ".as_slice(),
        path_and_query.as_bytes(),
        b" HTTP/1.1\r\nhost: ",
        authority.as_bytes(),
        b"\r\nuser-agent: ",
        concat!("regmirror/", env!("CARGO_PKG_VERSION")).as_bytes(),
        b"\r\n",
    ] {
        out.extend_from_slice(part);
    }
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Where a member listens: host to connect to, port, and the `Host` value.
/// `None` for URLs other than `http://` ones.
fn target(url: &Url) -> Option<(String, u16, String)> {
    if url.scheme() != "http" {
        return None;
    }
    let port = url.port_or_known_default()?;
    let host = match url.host()? {
        Host::Domain(d) => d.to_owned(),
        Host::Ipv4(a) => a.to_string(),
        Host::Ipv6(a) => a.to_string(),
    };
    let authority = format!("{}:{port}", url.host_str()?);
    Some((host, port, authority))
}

/// Idle connections to the members, by `host:port`.
#[derive(Default)]
struct Pool(Mutex<HashMap<String, Vec<(SpliceSource, Instant)>>>);

impl Pool {
    /// The most recently used idle connection to `authority` that is young
    /// enough and quiet (no close, no stray bytes from the member).
    fn take(&self, authority: &str) -> Option<SpliceSource> {
        let mut idle = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let conns = idle.get_mut(authority)?;
        while let Some((conn, since)) = conns.pop() {
            let mut byte = [0u8; 1];
            let quiet = matches!(
                conn.socket.try_read(&mut byte),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            );
            if quiet && since.elapsed() < POOL_IDLE {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, authority: &str, conn: SpliceSource) {
        let mut idle = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let conns = idle.entry(authority.to_owned()).or_default();
        conns.retain(|(_, since)| since.elapsed() < POOL_IDLE);
        if conns.len() < POOL_PER_MEMBER {
            conns.push((conn, Instant::now()));
        }
    }
}

/// What [`Relay::get`] made of a member's answer.
#[derive(Debug)]
pub enum Relayed {
    /// The answer to send the client.
    Answer(Response),
    /// Not relayable here ([`BodyPlan::Fallback`], or a URL other than
    /// `http://`): ask again through the HTTP client.
    Fallback,
}

/// The zero-copy peer hop: connections to the members and the timeouts to
/// use on them.
#[derive(Clone)]
pub struct Relay {
    pool: Arc<Pool>,
    connect: Duration,
    header_timeout: Duration,
    body_idle: Duration,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("header_timeout", &self.header_timeout)
            .finish_non_exhaustive()
    }
}

/// A failed exchange, and whether it failed before any byte of an answer
/// (on a reused connection: one the member closed meanwhile).
type ExchangeError = (Unreachable, bool);

impl Relay {
    /// A relay that connects within `connect`, has response heads within
    /// `header_timeout` (connecting included), and waits at most
    /// `body_idle` for a body's next bytes.
    pub fn new(connect: Duration, header_timeout: Duration, body_idle: Duration) -> Self {
        Self {
            pool: Arc::default(),
            connect,
            header_timeout,
            body_idle,
        }
    }

    /// GETs `path_and_query` from member `to` with `headers` (the hop header
    /// among them) and returns the answer for a client whose connection's
    /// socket is a [`crate::zerocopy::ZeroCopyStream`] sharing `queue`: the
    /// owner's status and [`response_headers`], the body as [`BodyPlan`]
    /// says. A failure after the head ends the body with an error (the
    /// client's connection fails: never other or missing bytes as a
    /// success) and calls `on_body_error`.
    ///
    /// # Errors
    /// [`Unreachable`]: no response head from `to` in time, or a broken one.
    pub async fn get(
        &self,
        to: &Member,
        path_and_query: &str,
        headers: &HeaderMap,
        queue: SendQueue,
        on_body_error: impl FnOnce() + Send + 'static,
    ) -> Result<Relayed, Unreachable> {
        let Some((host, port, authority)) = target(&to.url) else {
            return Ok(Relayed::Fallback);
        };
        let request = request_head(&authority, path_and_query, headers);
        let asked = async {
            if let Some(conn) = self.pool.take(&authority) {
                match exchange(conn, &request).await {
                    Ok(answer) => return Ok(answer),
                    // Closed by the member while idle: once more, anew.
                    Err((_, true)) => {}
                    Err((e, false)) => return Err(e),
                }
            }
            let socket = tokio::time::timeout(self.connect, TcpStream::connect((host, port)))
                .await
                .map_err(|_| Unreachable::Timeout(self.connect))?
                .map_err(|e| Unreachable::Transport(e.to_string()))?;
            let _ = socket.set_nodelay(true);
            let conn =
                SpliceSource::new(socket).map_err(|e| Unreachable::Transport(e.to_string()))?;
            exchange(conn, &request).await.map_err(|(e, _)| e)
        };
        let (conn, head, mut early) = tokio::time::timeout(self.header_timeout, asked)
            .await
            .map_err(|_| Unreachable::Timeout(self.header_timeout))??;
        // The connection goes with the error: it reached the wrong server.
        super::forward::check_member(to, &head.headers)?;
        let plan = body_plan(head.status, &head.headers);
        let early = early.split_off(head.len).freeze();
        let pool = Arc::clone(&self.pool);
        let keep_alive = head.keep_alive;
        let give_back = move |conn: SpliceSource| {
            if keep_alive {
                pool.put(&authority, conn);
            }
        };
        let peer = to.name.clone();
        let cut = move |e: &io::Error| {
            tracing::warn!(%peer, error = %e, "peer response cut short");
            on_body_error();
        };
        let body = match plan {
            BodyPlan::Fallback => return Ok(Relayed::Fallback),
            // More body bytes than announced: the connection is out of step.
            BodyPlan::Splice(len) | BodyPlan::Buffer(len) if early.len() as u64 > len => {
                return Ok(Relayed::Fallback);
            }
            BodyPlan::Empty => {
                if early.is_empty() {
                    give_back(conn);
                }
                Body::empty()
            }
            BodyPlan::Splice(len) if len == early.len() as u64 => {
                give_back(conn);
                Body::from(early)
            }
            BodyPlan::Splice(len) => {
                let rest = len - early.len() as u64;
                let spliced =
                    socket_body(queue, conn, rest, self.body_idle, move |end| match end {
                        Ok(conn) => give_back(conn),
                        Err(e) => cut(&e),
                    });
                let early = (!early.is_empty()).then_some(Ok(early));
                Body::from_stream(futures::stream::iter(early).chain(spliced))
            }
            BodyPlan::Buffer(len) => {
                let idle = self.body_idle;
                let whole = async move {
                    match read_rest(conn, early, len, idle).await {
                        Ok((conn, body)) => {
                            give_back(conn);
                            Ok(body)
                        }
                        Err(e) => {
                            cut(&e);
                            Err(e)
                        }
                    }
                };
                Body::from_stream(futures::stream::once(whole))
            }
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.headers_mut() = response_headers(head.headers);
        Ok(Relayed::Answer(resp))
    }
}

/// Sends `request` on `conn` and reads the response head; returns the
/// connection, the head, and every byte read (the head's, then maybe some
/// of the body's).
async fn exchange(
    mut conn: SpliceSource,
    request: &[u8],
) -> Result<(SpliceSource, Head, BytesMut), ExchangeError> {
    let broken = |e: &dyn std::fmt::Display, nothing_read: bool| {
        (Unreachable::Transport(e.to_string()), nothing_read)
    };
    conn.socket
        .write_all(request)
        .await
        .map_err(|e| broken(&e, true))?;
    let mut buf = BytesMut::with_capacity(HEAD_READ);
    loop {
        let n = conn
            .socket
            .read_buf(&mut buf)
            .await
            .map_err(|e| broken(&e, buf.is_empty()))?;
        if n == 0 {
            return Err(broken(
                &"the member closed the connection before its response head",
                buf.is_empty(),
            ));
        }
        match parse_head(&buf) {
            Ok(Some(head)) => return Ok((conn, head, buf)),
            Ok(None) if buf.len() < MAX_HEAD => buf.reserve(HEAD_READ),
            Ok(None) => return Err(broken(&"response head too large", false)),
            Err(e) => return Err(broken(&e, false)),
        }
    }
}

/// Reads from `conn` until `body` (the bytes read so far) is `len` long,
/// each read within `idle`.
async fn read_rest(
    mut conn: SpliceSource,
    body: Bytes,
    len: u64,
    idle: Duration,
) -> io::Result<(SpliceSource, Bytes)> {
    let len = usize::try_from(len).map_err(io::Error::other)?;
    let mut buf = BytesMut::with_capacity(len);
    buf.extend_from_slice(&body);
    while buf.len() < len {
        let n = tokio::time::timeout(idle, conn.socket.read_buf(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the member's body stalled"))??;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the member closed the connection before the end of the body",
            ));
        }
    }
    if buf.len() > len {
        return Err(io::Error::other("more body bytes than announced"));
    }
    Ok((conn, buf.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A member that answers every GET on a connection with `data` (or the
    /// range a `range: bytes=A-B` header asks), keeping connections alive;
    /// with `cut_after`, it sends that many body bytes and closes instead.
    /// Returns its URL and a count of the connections it accepted.
    async fn fake_owner(data: Arc<Vec<u8>>, cut_after: Option<usize>) -> (Url, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let data = Arc::clone(&data);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            let mut more = [0u8; 4096];
                            match conn.read(&mut more).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&more[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        buf.drain(..end + 4);
                        assert!(head.starts_with("get /v2/"), "{head}");
                        assert!(head.contains("\r\nregmirror-hop: me"), "{head}");
                        let range = head.lines().find_map(|l| l.strip_prefix("range: bytes="));
                        let (status, from, to) = match range.and_then(|r| r.split_once('-')) {
                            Some((a, b)) => (
                                "206 Partial Content",
                                a.parse().unwrap(),
                                b.parse::<usize>().unwrap() + 1,
                            ),
                            None => ("200 OK", 0, data.len()),
                        };
                        let out = format!(
                            "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-range: bytes {from}-{}/{}\r\nkeep-alive: timeout=5\r\nregmirror-member: owner\r\n\r\n",
                            to - from,
                            to - 1,
                            data.len()
                        );
                        conn.write_all(out.as_bytes()).await.unwrap();
                        let body = &data[from..to];
                        match cut_after {
                            Some(n) => {
                                conn.write_all(&body[..n]).await.unwrap();
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                return;
                            }
                            None => conn.write_all(body).await.unwrap(),
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    /// A cache-like server on loopback (the real listener, zero-copy
    /// sockets) whose every request is relayed from `owner` through
    /// [`Relay::get`]; returns its URL and a count of relayed bodies cut.
    async fn relaying_server(owner: Url) -> (String, Arc<AtomicUsize>) {
        let relay = Relay::new(
            Duration::from_secs(2),
            Duration::from_secs(2),
            Duration::from_secs(2),
        );
        let member = Member {
            name: "owner".into(),
            url: owner,
        };
        let cut = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&cut);
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (relay, member, cut) = (relay.clone(), member.clone(), Arc::clone(&counted));
            async move {
                let queue = req.extensions().get::<SendQueue>().cloned().unwrap();
                let headers = super::super::forward::request_headers(req.headers(), "me", "owner");
                let path = req.uri().path().to_owned();
                let on_cut = move || {
                    cut.fetch_add(1, Ordering::SeqCst);
                };
                match relay.get(&member, &path, &headers, queue, on_cut).await {
                    Ok(Relayed::Answer(resp)) => resp,
                    other => panic!("not relayed: {other:?}"),
                }
            }
        });
        let listener = crate::listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(crate::listen::serve(
            listener,
            app,
            std::future::pending(),
            Duration::from_secs(1),
            16,
        ));
        (url, cut)
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    /// Whole and Range GETs through the zero-copy relay arrive byte for
    /// byte with the owner's status and headers, on one kept-alive
    /// connection to the owner.
    #[tokio::test]
    async fn the_relay_serves_whole_and_partial_bodies() {
        let data: Arc<Vec<u8>> = Arc::new((0..3_000_017u32).map(|i| (i % 251) as u8).collect());
        let (owner, connections) = fake_owner(Arc::clone(&data), None).await;
        let (url, cut) = relaying_server(owner).await;
        let client = client();
        for _ in 0..3 {
            let resp = client
                .get(format!("{url}/v2/app/blobs/x"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert!(!resp.headers().contains_key("keep-alive"));
            let body = resp.bytes().await.unwrap();
            assert!(body[..] == data[..], "whole body differs");
        }
        let resp = client
            .get(format!("{url}/v2/app/blobs/x"))
            .header("range", "bytes=100-2000099")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 206);
        assert_eq!(resp.headers()["content-range"], "bytes 100-2000099/3000017");
        let body = resp.bytes().await.unwrap();
        assert!(body[..] == data[100..2_000_100], "range differs");
        assert_eq!(connections.load(Ordering::SeqCst), 1, "owner connections");
        assert_eq!(cut.load(Ordering::SeqCst), 0);
    }

    /// An owner that dies mid-body cuts the client off: an error, never a
    /// short body taken as whole.
    #[tokio::test]
    async fn an_owner_dying_mid_body_cuts_the_client_off() {
        let data: Arc<Vec<u8>> = Arc::new(vec![9; 2_000_000]);
        let (owner, _) = fake_owner(data, Some(1_500_000)).await;
        let (url, cut) = relaying_server(owner).await;
        let resp = client()
            .get(format!("{url}/v2/app/blobs/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await.is_err(), "a cut body taken as whole");
        assert_eq!(cut.load(Ordering::SeqCst), 1);
    }

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn whole_and_partial_sized_bodies_are_spliced_the_rest_buffered_or_not_relayed() {
        let sized = headers(&[("content-length", "1000")]);
        assert_eq!(body_plan(StatusCode::OK, &sized), BodyPlan::Splice(1000));
        assert_eq!(
            body_plan(StatusCode::PARTIAL_CONTENT, &sized),
            BodyPlan::Splice(1000)
        );
        assert_eq!(
            body_plan(StatusCode::NOT_FOUND, &sized),
            BodyPlan::Buffer(1000)
        );
        assert_eq!(body_plan(StatusCode::NOT_MODIFIED, &sized), BodyPlan::Empty);
        assert_eq!(
            body_plan(StatusCode::NO_CONTENT, &HeaderMap::new()),
            BodyPlan::Empty
        );
        // Coded content is relayed as it is, through memory when small.
        let coded = headers(&[("content-length", "10"), ("content-encoding", "gzip")]);
        assert_eq!(body_plan(StatusCode::OK, &coded), BodyPlan::Buffer(10));
        let big_error = headers(&[("content-length", &(MAX_BUFFERED + 1).to_string())]);
        assert_eq!(
            body_plan(StatusCode::INTERNAL_SERVER_ERROR, &big_error),
            BodyPlan::Fallback
        );
        let chunked = headers(&[("transfer-encoding", "chunked")]);
        assert_eq!(body_plan(StatusCode::OK, &chunked), BodyPlan::Fallback);
        let both = headers(&[("transfer-encoding", "chunked"), ("content-length", "5")]);
        assert_eq!(body_plan(StatusCode::OK, &both), BodyPlan::Fallback);
        assert_eq!(
            body_plan(StatusCode::OK, &HeaderMap::new()),
            BodyPlan::Fallback
        );
        for odd in [
            &[("content-length", "5"), ("content-length", "6")][..],
            &[("content-length", "+5")],
            &[("content-length", "5, 5")],
            &[("content-length", "")],
        ] {
            assert_eq!(
                body_plan(StatusCode::OK, &headers(odd)),
                BodyPlan::Fallback,
                "{odd:?}"
            );
        }
        let repeated = headers(&[("content-length", "5"), ("content-length", "5")]);
        assert_eq!(body_plan(StatusCode::OK, &repeated), BodyPlan::Splice(5));
        assert_eq!(body_plan(StatusCode::CONTINUE, &sized), BodyPlan::Fallback);
    }

    #[test]
    fn response_heads_parse_once_complete() {
        let raw = b"HTTP/1.1 206 Partial Content\r\ncontent-length: 3\r\n\
                    Content-Range: bytes 0-2/9\r\nx-a: 1\r\nx-a: 2\r\n\r\nabc";
        assert!(parse_head(&raw[..20]).unwrap().is_none());
        let head = parse_head(raw).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(head.len, raw.len() - 3);
        assert_eq!(head.headers[header::CONTENT_RANGE], "bytes 0-2/9");
        assert_eq!(head.headers.get_all("x-a").iter().count(), 2);
        assert!(head.keep_alive);

        let closing = parse_head(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(!closing.unwrap().unwrap().keep_alive);
        let old = parse_head(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(!old.unwrap().unwrap().keep_alive);
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n").is_err());
    }

    #[test]
    fn request_heads_carry_the_host_and_every_header_value() {
        let h = headers(&[
            ("range", "bytes=0-9"),
            ("accept", "a/b"),
            ("accept", "c/d"),
            ("regmirror-hop", "m1"),
        ]);
        let head = request_head("10.0.0.7:5000", "/v2/app/blobs/sha256:ab?x=1", &h);
        let text = String::from_utf8(head).unwrap();
        let mut lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(lines[0], "GET /v2/app/blobs/sha256:ab?x=1 HTTP/1.1");
        assert_eq!(lines[1], "host: 10.0.0.7:5000");
        assert!(lines[2].starts_with("user-agent: regmirror/"));
        assert_eq!(lines.split_off(lines.len() - 2), ["", ""]);
        let mut fields = lines[3..].to_vec();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "accept: a/b",
                "accept: c/d",
                "range: bytes=0-9",
                "regmirror-hop: m1"
            ]
        );
    }

    #[test]
    fn only_plain_http_members_are_relayed_here() {
        let url = |s: &str| Url::parse(s).unwrap();
        assert_eq!(
            target(&url("http://10.0.0.7:5000/")),
            Some(("10.0.0.7".into(), 5000, "10.0.0.7:5000".into()))
        );
        assert_eq!(
            target(&url("http://[::1]:81")),
            Some(("::1".into(), 81, "[::1]:81".into()))
        );
        assert_eq!(
            target(&url("http://cache-0.cache")),
            Some(("cache-0.cache".into(), 80, "cache-0.cache:80".into()))
        );
        assert_eq!(target(&url("https://10.0.0.7:5000")), None);
    }
}
