//! A real upstream: Debian's `docker-registry` (CNCF distribution 2.8) on loopback.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;

use crate::process::{ChildGuard, is_addr_in_use};
use crate::request_log::RequestLog;
use crate::util::{free_port, http_client, read_lossy, wait_until};

const BINARY: &str = "/usr/bin/docker-registry";
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Query parameter of [`Registry::sync_log`]'s marker requests.
const SYNC_MARKER: &str = "regmirror-e2e-sync";

/// One line of the registry access log (Apache combined format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// Request URI as sent, query string included (`/v2/library/x/manifests/t?ns=docker.io`).
    pub path: String,
    pub status: u16,
    /// Response bytes written (0 when logged as `-`).
    pub bytes: u64,
}

/// Parses access-log lines (those starting with `127.`) out of a mixed registry log.
pub fn parse_access_log(text: &str) -> Vec<AccessEntry> {
    text.lines()
        .filter(|l| l.starts_with("127."))
        .filter_map(parse_access_line)
        .collect()
}

fn parse_access_line(line: &str) -> Option<AccessEntry> {
    // 127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "referer" "ua"
    let mut parts = line.splitn(3, '"');
    parts.next()?;
    let request = parts.next()?;
    let rest = parts.next()?;
    let mut req = request.split(' ');
    let method = req.next()?.to_owned();
    let path = req.next()?.to_owned();
    let mut nums = rest.split_whitespace();
    let status = nums.next()?.parse().ok()?;
    let bytes = nums.next().and_then(|b| b.parse().ok()).unwrap_or(0);
    Some(AccessEntry {
        method,
        path,
        status,
        bytes,
    })
}

/// `docker-registry serve` with its own config, storage and log in a private temp dir.
///
/// Output (stdout+stderr; the access log goes to stdout with this build) is captured
/// to a file that survives [`Registry::stop`] / [`Registry::start_again`].
/// The process is killed on drop.
#[derive(Debug)]
pub struct Registry {
    child: Option<ChildGuard>,
    port: u16,
    config_path: PathBuf,
    log_path: PathBuf,
    storage: PathBuf,
    proxy_remote: Option<String>,
    /// `compatibility: {schema1: {enabled: true}}`: signed schema1 pushes are accepted.
    schema1: bool,
    // Last: removed after the child is killed.
    dir: TempDir,
}

impl Registry {
    /// Plain registry (push and pull), delete enabled.
    pub async fn start() -> Result<Self> {
        Self::start_inner(None, false).await
    }

    /// Plain registry with schema1 compatibility on (distribution 2.8's
    /// `compatibility: {schema1: {enabled: true}}`): it accepts pushes of
    /// signed schema1 manifests, and signs them afresh, with a key made at
    /// start, on every GET.
    pub async fn start_schema1() -> Result<Self> {
        Self::start_inner(None, true).await
    }

    /// Pull-through proxy of `remote_url` (`proxy: {remoteurl: ...}`).
    /// The remote must already answer `/v2/` (distribution panics otherwise).
    pub async fn start_proxy(remote_url: &str) -> Result<Self> {
        Self::start_inner(Some(remote_url.trim_end_matches('/').to_owned()), false).await
    }

    async fn start_inner(proxy_remote: Option<String>, schema1: bool) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("regmirror-registry-")
            .tempdir()?;
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let mut reg = Self {
            child: None,
            port: 0,
            config_path: dir.path().join("config.yml"),
            log_path: dir.path().join("registry.log"),
            storage,
            proxy_remote,
            schema1,
            dir,
        };
        // The port is picked before the registry binds it: retry on the rare collision.
        let mut attempt = 0;
        loop {
            reg.port = free_port();
            reg.write_config()?;
            match reg.spawn_and_wait().await {
                Ok(()) => return Ok(reg),
                Err(e) if attempt < 3 && is_addr_in_use(&e) => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    fn write_config(&self) -> Result<()> {
        let mut cfg = format!(
            "version: 0.1\n\
             log: {{level: info, accesslog: {{disabled: false}}}}\n\
             storage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\n\
             http: {{addr: 127.0.0.1:{}, secret: regmirror-e2e}}\n",
            self.storage.display(),
            self.port
        );
        if let Some(remote) = &self.proxy_remote {
            cfg.push_str(&format!("proxy: {{remoteurl: \"{remote}\"}}\n"));
        }
        if self.schema1 {
            cfg.push_str("compatibility: {schema1: {enabled: true}}\n");
        }
        std::fs::write(&self.config_path, cfg).context("write registry config")
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let args = ["serve".to_owned(), self.config_path.display().to_string()];
        let mut child = ChildGuard::spawn(
            "docker-registry",
            Path::new(BINARY),
            &args,
            &[],
            &[],
            &self.log_path,
        )?;
        child.wait_v2_ready(&self.url(), READY_TIMEOUT).await?;
        self.child = Some(child);
        Ok(())
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Storage root (`storage.filesystem.rootdirectory`).
    pub fn storage(&self) -> &Path {
        &self.storage
    }

    /// The private temp dir holding config, storage and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// Process id of the running registry (for `/proc/<pid>` statistics).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ChildGuard::pid)
    }

    /// Stops the registry (SIGTERM, then SIGKILL after 5 s): simulates an upstream outage.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.terminate(STOP_GRACE).await?;
        }
        Ok(())
    }

    /// Starts again on the same port with the same storage, waits for `/v2/`.
    pub async fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("registry on {} is already running", self.host());
        }
        self.spawn_and_wait().await
    }

    /// All captured output (logs and access log) so far, across restarts.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Parsed access log so far, without the marker requests of [`Registry::sync_log`].
    pub fn access_log(&self) -> Vec<AccessEntry> {
        let mut log = parse_access_log(&self.log());
        log.retain(|e| !e.path.contains(SYNC_MARKER));
        log
    }

    /// Waits until every request the registry answered before this call is in
    /// its access log: sends a marker request and waits for its line. (The
    /// line is written after the response, so a count taken right after a
    /// request can lag.) The marker line is left out of [`Registry::access_log`]
    /// and counts. Errors if the marker is not answered or logged within 10 s.
    pub async fn sync_log(&self) -> Result<()> {
        static MARKERS: AtomicU64 = AtomicU64::new(0);
        let marker = format!("{SYNC_MARKER}={}", MARKERS.fetch_add(1, Ordering::Relaxed));
        let url = format!("{}/v2/?{marker}", self.url());
        let status = http_client().get(&url).send().await?.status();
        ensure!(status == 200, "GET {url}: {status}");
        let line = &format!("/v2/?{marker} HTTP/");
        wait_until(Duration::from_secs(10), || async move {
            self.log().contains(line)
        })
        .await
        .with_context(|| format!("{} never logged GET {url}", self.describe()))
    }
}

impl RequestLog for Registry {
    fn describe(&self) -> String {
        format!("docker-registry {}", self.host())
    }

    /// Access-log entries (complete responses) with this method whose path contains `path_contains`.
    fn count(&self, method: &str, path_contains: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|e| e.method.eq_ignore_ascii_case(method) && e.path.contains(path_contains))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_combined_lines() {
        let text = "time=\"x\" level=info msg=\"listening\"\n\
            127.0.0.1 - - [23/Nov/2026:01:58:27 +0000] \"HEAD /v2/library/x/manifests/t?ns=docker.io HTTP/1.1\" 404 91 \"\" \"curl/7.88.1\"\n\
            127.0.0.1 - - [23/Nov/2026:01:58:27 +0000] \"POST /v2/a/b/blobs/uploads/ HTTP/1.1\" 202 - \"\" \"curl\"\n";
        let log = parse_access_log(text);
        assert_eq!(
            log,
            vec![
                AccessEntry {
                    method: "HEAD".into(),
                    path: "/v2/library/x/manifests/t?ns=docker.io".into(),
                    status: 404,
                    bytes: 91
                },
                AccessEntry {
                    method: "POST".into(),
                    path: "/v2/a/b/blobs/uploads/".into(),
                    status: 202,
                    bytes: 0
                },
            ]
        );
    }
}
