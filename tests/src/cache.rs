//! The regmirror cache binary under test, as a child process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use regmirror_cache::oci::Digest;
use regmirror_cache::store::layout;
use tempfile::TempDir;

use crate::process::{ChildGuard, is_addr_in_use};
use crate::util::{files_under, free_port, read_lossy, sha256_digest, tail_lines, workspace_root};

/// Name of the cache binary.
pub const CACHE_BIN: &str = "regmirror-cache";
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Path of the cache binary: `$REGMIRROR_BIN_DIR/regmirror-cache`, else
/// `$CARGO_TARGET_DIR/debug/regmirror-cache` (if that variable is set), else
/// `<workspace>/target/debug/regmirror-cache`. Panics if it does not exist.
pub fn cache_binary() -> PathBuf {
    let candidates: Vec<PathBuf> = if let Some(dir) = std::env::var_os("REGMIRROR_BIN_DIR") {
        vec![PathBuf::from(dir).join(CACHE_BIN)]
    } else {
        let mut v = Vec::new();
        if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
            v.push(PathBuf::from(t).join("debug").join(CACHE_BIN));
        }
        v.push(
            workspace_root()
                .join("target")
                .join("debug")
                .join(CACHE_BIN),
        );
        v
    };
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "{CACHE_BIN} not found (looked at {candidates:?}); build it first: cargo build --bins \
             (or set REGMIRROR_BIN_DIR to the directory holding it)"
        )
    })
}

/// How to start the cache. `args` are passed as given; `--listen 127.0.0.1:PORT` and
/// `--storage DIR` are added unless `args` already contain them. Inherited `REGMIRROR_*`
/// environment variables are removed; set them with `env`.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Bound on waiting for `GET /v2/` to answer 200 (default 20 s).
    pub ready_timeout: Duration,
    /// Binary to run (default [`cache_binary`]).
    pub binary: Option<PathBuf>,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            args: Vec::new(),
            env: vec![
                ("RUST_BACKTRACE".into(), "1".into()),
                // Plain log text (tracing-subscriber colours even when writing to a file).
                ("NO_COLOR".into(), "1".into()),
            ],
            ready_timeout: Duration::from_secs(20),
            binary: None,
        }
    }
}

impl CacheOptions {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    /// `--upstream HOST=URL`
    pub fn upstream(self, host: &str, url: &str) -> Self {
        self.arg("--upstream").arg(format!("{host}={url}"))
    }
    /// `--config FILE`
    pub fn config(self, file: &Path) -> Self {
        self.arg("--config").arg(file.display().to_string())
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// A running `regmirror-cache`; killed on drop, its temp dir (storage, log) removed.
#[derive(Debug)]
pub struct CacheProcess {
    child: Option<ChildGuard>,
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    addr: SocketAddr,
    storage: PathBuf,
    log_path: PathBuf,
    ready_timeout: Duration,
    // Last: removed after the process is killed.
    dir: TempDir,
}

fn arg_value(args: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&eq).map(str::to_owned)
        }
    })
}

impl CacheProcess {
    /// Starts the cache with `args` (e.g. `["--upstream", "docker.io=http://127.0.0.1:N"]`),
    /// harness-chosen port and storage; waits for `GET /v2/` 200.
    pub async fn start<I, S>(args: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::start_with(CacheOptions {
            args: args.into_iter().map(Into::into).collect(),
            ..CacheOptions::default()
        })
        .await
    }

    /// Starts the cache with full options.
    pub async fn start_with(opts: CacheOptions) -> Result<Self> {
        let binary = opts.binary.clone().unwrap_or_else(cache_binary);
        let dir = tempfile::Builder::new()
            .prefix("regmirror-cache-")
            .tempdir()?;
        let mut args = opts.args.clone();
        let pick_port = arg_value(&args, "--listen").is_none();
        if pick_port {
            args.push("--listen".into());
            args.push(format!("127.0.0.1:{}", free_port()));
        }
        let listen = arg_value(&args, "--listen").expect("--listen set");
        let addr: SocketAddr = listen
            .parse()
            .with_context(|| format!("--listen {listen}"))?;
        let storage = match arg_value(&args, "--storage") {
            Some(s) => PathBuf::from(s),
            None => {
                let s = dir.path().join("storage");
                std::fs::create_dir_all(&s)?;
                args.push("--storage".into());
                args.push(s.display().to_string());
                s
            }
        };
        let mut me = Self {
            child: None,
            binary,
            args,
            env: opts.env,
            addr,
            log_path: dir.path().join("cache.log"),
            storage,
            ready_timeout: opts.ready_timeout,
            dir,
        };
        // A harness-picked port can be lost to a race: retry with another one.
        let mut attempt = 0;
        loop {
            match me.spawn_and_wait().await {
                Ok(()) => return Ok(me),
                Err(e) if pick_port && attempt < 3 && is_addr_in_use(&e) => {
                    attempt += 1;
                    me.addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    let i = me
                        .args
                        .iter()
                        .position(|a| a == "--listen")
                        .expect("--listen set");
                    me.args[i + 1] = me.addr.to_string();
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        // Inherited REGMIRROR_* variables would silently change the configuration.
        let inherited: Vec<String> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .filter(|k| k.starts_with("REGMIRROR_"))
            .collect();
        let mut child = ChildGuard::spawn(
            CACHE_BIN,
            &self.binary,
            &self.args,
            &self.env,
            &inherited,
            &self.log_path,
        )?;
        child
            .wait_v2_ready(&self.url(), self.ready_timeout)
            .await
            .with_context(|| format!("args: {:?}", self.args))?;
        self.child = Some(child);
        Ok(())
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn storage(&self) -> &Path {
        &self.storage
    }
    /// The cache's files under [`CacheProcess::storage`].
    pub fn store(&self) -> StoreLayout {
        StoreLayout::new(&self.storage)
    }
    /// Private temp dir (holds the default storage and the log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// Full argument list as passed (including harness-added `--listen`/`--storage`).
    pub fn args(&self) -> &[String] {
        &self.args
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ChildGuard::pid)
    }
    /// Captured stdout+stderr so far, across restarts.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }
    /// Last `n` lines of [`CacheProcess::log`].
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&self.log(), n)
    }
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// `GET /metrics`: the Prometheus exposition text.
    pub async fn metrics(&self) -> Result<String> {
        let resp = crate::util::http_client()
            .get(format!("{}/metrics", self.url()))
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 200, "/metrics: {}", resp.status());
        Ok(resp.text().await?)
    }

    /// Blob bytes the cache sent to clients, from every source.
    pub async fn served_bytes(&self) -> Result<f64> {
        Ok(crate::util::metric_sum(
            &self.metrics().await?,
            "regmirror_served_bytes_total",
            &[],
        ))
    }

    /// SIGTERM, wait up to 10 s (then SIGKILL); returns the exit status.
    pub async fn stop(&mut self) -> Result<ExitStatus> {
        match self.child.take() {
            Some(mut c) => c.terminate(STOP_GRACE).await,
            None => bail!("cache is not running"),
        }
    }

    /// SIGKILL (crash simulation), reaped.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        self.child.take().and_then(|mut c| c.kill_now())
    }

    /// Waits (bounded) for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Some(c) = self.child.as_mut() else {
                bail!("cache is not running");
            };
            if let Some(st) = c.exited() {
                self.child = None;
                return Ok(st);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("cache still running after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops (if running) and starts again with the same args, port and storage.
    pub async fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            self.stop().await?;
        }
        self.child = None;
        self.spawn_and_wait().await
    }
}

impl Drop for CacheProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill_now();
        }
    }
}

/// The cache's files under one storage root, located with the cache's own path
/// functions ([`regmirror_cache::store::layout`]), for tests that look at (or
/// plant) stored content with or without a running cache.
#[derive(Debug, Clone)]
pub struct StoreLayout {
    root: PathBuf,
}

impl StoreLayout {
    /// The layout under `root` (the cache's `--storage`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Where the blob `digest` (`sha256:<64 hex>`) of upstream `host` is kept
    /// once complete and verified. Panics on a malformed digest.
    pub fn blob(&self, host: &str, digest: &str) -> PathBuf {
        let d: Digest = digest
            .parse()
            .unwrap_or_else(|e| panic!("{digest:?} is not a digest: {e}"));
        layout::blob_path(&self.root, host, &d)
    }

    /// The directory of in-progress writes.
    pub fn tmp_dir(&self) -> PathBuf {
        layout::tmp_dir(&self.root)
    }

    /// The processes' temp directories in [`StoreLayout::tmp_dir`]
    /// ([`layout::process_tmp_dir`]), with the pid each is named after;
    /// errors if that directory cannot be read (the store was never opened).
    pub fn process_tmp_dirs(&self) -> std::io::Result<Vec<(u32, PathBuf)>> {
        let mut dirs = Vec::new();
        for entry in std::fs::read_dir(self.tmp_dir())? {
            let path = entry?.path();
            if let Some(pid) = layout::tmp_dir_pid(&path).filter(|_| path.is_dir()) {
                dirs.push((pid, path));
            }
        }
        Ok(dirs)
    }

    /// The temp directory of the process `pid`, if it has one.
    pub fn process_tmp_dir(&self, pid: u32) -> std::io::Result<Option<PathBuf>> {
        Ok(self
            .process_tmp_dirs()?
            .into_iter()
            .find_map(|(p, dir)| (p == pid).then_some(dir)))
    }

    /// Number of in-progress writes: the files in [`StoreLayout::tmp_dir`]
    /// and in the processes' temp directories in it, their lock files
    /// ([`layout::process_tmp_lock`]) aside; errors if `tmp/` cannot be read
    /// (the store was never opened).
    pub fn temp_files(&self) -> std::io::Result<usize> {
        let mut n = 0;
        for entry in std::fs::read_dir(self.tmp_dir())? {
            let path = entry?.path();
            n += match std::fs::read_dir(&path) {
                Ok(files) => files
                    .filter(|e| {
                        e.as_ref()
                            .map_or(true, |e| e.file_name() != layout::TMP_LOCK)
                    })
                    .count(),
                // Swept or removed by its process meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(_) => 1,
            };
        }
        Ok(n)
    }

    /// Every stored blob and manifest file (not the media-type sidecars) with
    /// its size in bytes, across upstreams. Fails if any does not hash to its
    /// name, or on a read error.
    pub fn verified_content(&self) -> Result<Vec<(PathBuf, u64)>> {
        let mut dirs = Vec::new();
        for host in std::fs::read_dir(layout::upstreams_dir(&self.root))?.flatten() {
            let host = host.file_name().to_string_lossy().into_owned();
            dirs.push(layout::blobs_dir(&self.root, &host));
            dirs.push(layout::manifests_dir(&self.root, &host));
        }
        let mut out = Vec::new();
        for p in files_under(dirs) {
            let name = file_name(&p);
            if name.len() != 64 {
                continue;
            }
            let bytes = std::fs::read(&p)?;
            ensure!(
                sha256_digest(&bytes) == format!("sha256:{name}"),
                "{} does not match its digest",
                p.display()
            );
            out.push((p, bytes.len() as u64));
        }
        Ok(out)
    }

    /// Files anywhere under the root (temp files included) named like
    /// `digest`'s hex (`digest` with its `sha256:` prefix or without): where
    /// the content went, if anywhere, complete or not.
    pub fn files_named(&self, digest: &str) -> Vec<PathBuf> {
        let hex = digest.trim_start_matches("sha256:");
        files_under(vec![self.root.clone()])
            .into_iter()
            .filter(|p| file_name(p) == hex)
            .collect()
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
