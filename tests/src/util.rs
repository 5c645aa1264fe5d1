//! Small helpers shared by the harness and by tests: ports, polling, digests, HTTP client.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use sha2::{Digest, Sha256, Sha512};

/// Default overall timeout for one HTTP request made by the harness.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(120);
/// Default connect timeout for the harness HTTP client.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP port on 127.0.0.1 that was free a moment ago (bind `:0`, read the port, close).
///
/// Only for peers that need the port number in their config; in-process servers
/// should bind `:0` themselves and keep the listener.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Polls `check` every 50 ms until it returns `true`; fails after `timeout`.
///
/// The tests' one way to wait for something to happen: callers name the
/// condition in a `.context(..)` on the error, and sleep only when the time
/// itself is under test.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (up to 10 s) until a download that counts its body bytes into
/// `received` as they arrive has `bytes` of them: the transfer is under way.
pub async fn received_at_least(
    received: &std::sync::atomic::AtomicUsize,
    bytes: usize,
) -> Result<()> {
    use anyhow::Context as _;
    let now = || received.load(std::sync::atomic::Ordering::Relaxed);
    wait_until(Duration::from_secs(10), || async { now() >= bytes })
        .await
        .with_context(|| format!("download never reached {bytes} bytes (at {})", now()))
}

/// `sha256:<hex>` of `bytes`, the OCI digest form.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `sha512:<hex>` of `bytes` (128 hex digits), the other algorithm the OCI
/// image spec registers.
pub fn sha512_digest(bytes: &[u8]) -> String {
    format!("sha512:{}", hex::encode(Sha512::digest(bytes)))
}

/// reqwest client for loopback tests: no proxy, 5 s connect timeout, 120 s total timeout,
/// follows redirects.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(HTTP_TIMEOUT)
        .build()
        .expect("build reqwest client")
}

/// Like [`http_client`] but never follows redirects (to observe 307s).
pub fn http_client_no_redirect() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(HTTP_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("build reqwest client")
}

/// The Cargo workspace root (parent of the `tests/` crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent dir")
        .to_path_buf()
}

/// Whether this process runs as root (uid 0), read from `/proc/self/status`.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Panics with a clear message unless running as root (containerd needs it).
pub fn require_root(what: &str) {
    assert!(
        is_root(),
        "{what} needs root (uid 0); run the tests as root"
    );
}

/// Last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Reads a (log) file as lossy UTF-8, empty if missing.
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Runs a test body with a hard time limit; panics on error or timeout.
pub async fn bounded<F: Future<Output = Result<()>>>(secs: u64, f: F) {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(r) => r.unwrap(),
        Err(_) => panic!("test exceeded its {secs} s limit"),
    }
}

/// The value of the Prometheus sample whose name-and-labels are exactly
/// `series`, 0 when absent.
pub fn metric_sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// The sum of the samples whose line starts with `prefix` and contains every
/// string of `must_contain` (label matchers such as `reason="size"`).
pub fn metric_sum(text: &str, prefix: &str, must_contain: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && must_contain.iter().all(|m| l.contains(m)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Every file under `dirs`, recursively; unreadable directories are skipped.
pub fn files_under(mut dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for p in entries.flatten().map(|e| e.path()) {
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files
}
