//! In-process load generation: timed GET/HEAD with reqwest over HTTP/1.1.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::time::Instant;

/// `Accept` listing the four manifest media types.
pub use regmirror_e2e::seed::ACCEPT_ALL_MANIFESTS;

/// HTTP/1.1 client for loopback: no proxy, keep-alive pool of `pool` idle connections.
pub fn client(pool: usize, timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(pool)
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .build()
        .expect("build reqwest client")
}

/// One timed request.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    pub status: u16,
    /// Until the response headers.
    pub headers: Duration,
    /// Until the first body byte (= `headers` for an empty body).
    pub ttfb: Duration,
    /// Until the body is complete (or the read stopped at `stop_after`).
    pub total: Duration,
    /// Body bytes read.
    pub bytes: u64,
    /// For bodies over 2 MiB with a Content-Length: from the moment all but the last
    /// MiB had arrived to the end (a stall before the last bytes shows here).
    pub last_mib: Duration,
}

/// Sends `req`, reads the body (at most `stop_after` bytes, then drops the connection),
/// and times it from `start`.
pub async fn timed(
    req: reqwest::RequestBuilder,
    start: Instant,
    stop_after: Option<u64>,
) -> Result<Timed> {
    let mut resp = req.send().await.context("send")?;
    let headers = start.elapsed();
    let status = resp.status().as_u16();
    let tail_from = resp
        .content_length()
        .filter(|l| *l > 2 << 20)
        .map(|l| l - (1 << 20));
    let mut tail_start = None;
    let mut ttfb = None;
    let mut bytes = 0u64;
    while let Some(chunk) = resp.chunk().await.context("read body")? {
        if ttfb.is_none() {
            ttfb = Some(start.elapsed());
        }
        bytes += chunk.len() as u64;
        if tail_start.is_none() && tail_from.is_some_and(|t| bytes >= t) {
            tail_start = Some(start.elapsed());
        }
        if stop_after.is_some_and(|s| bytes >= s) {
            break;
        }
    }
    let total = start.elapsed();
    Ok(Timed {
        status,
        headers,
        ttfb: ttfb.unwrap_or(headers),
        total,
        bytes,
        last_mib: tail_start.map_or(Duration::ZERO, |t| total - t),
    })
}

/// GET `url` (whole body).
pub async fn get(client: &reqwest::Client, url: &str) -> Result<Timed> {
    timed(client.get(url), Instant::now(), None).await
}

/// GET `url`, failing unless 200 with `expect_len` bytes.
pub async fn get_ok(client: &reqwest::Client, url: &str, expect_len: u64) -> Result<Timed> {
    get_ok_from(client, url, Instant::now(), expect_len).await
}

/// [`get_ok`] timed from `start` (shared by clients started together).
pub async fn get_ok_from(
    client: &reqwest::Client,
    url: &str,
    start: Instant,
    expect_len: u64,
) -> Result<Timed> {
    let t = timed(client.get(url), start, None).await?;
    anyhow::ensure!(
        t.status == 200 && t.bytes == expect_len,
        "GET {url}: status {} with {} bytes, expected 200 with {expect_len}",
        t.status,
        t.bytes
    );
    Ok(t)
}

/// Seconds as f64.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Milliseconds as f64.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
