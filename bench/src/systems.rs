//! The two systems under test: our cache and distribution's proxy mode.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use regmirror_e2e::{CacheOptions, CacheProcess, Registry};

/// Upstream host name our cache is configured with (its default, first upstream).
pub const UPSTREAM_HOST: &str = "upstream.bench";

/// Which system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Ours,
    Dist,
}

impl Kind {
    /// A B order used for every run.
    pub const BOTH: [Kind; 2] = [Kind::Ours, Kind::Dist];
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ours => "regmirror",
            Kind::Dist => "distribution",
        }
    }
}

#[derive(Debug)]
enum Proc {
    Ours(CacheProcess),
    Dist(Registry),
}

/// A started system with fresh storage, pointed at one upstream URL.
#[derive(Debug)]
pub struct System {
    pub kind: Kind,
    proc: Proc,
}

impl System {
    /// Starts `kind` in front of `upstream_url` (which must answer `/v2/` already).
    pub async fn start(kind: Kind, upstream_url: &str, cache_bin: &Path) -> Result<Self> {
        let proc = match kind {
            Kind::Ours => {
                let mut opts = CacheOptions::new().upstream(UPSTREAM_HOST, upstream_url);
                opts.binary = Some(cache_bin.to_owned());
                Proc::Ours(CacheProcess::start_with(opts).await?)
            }
            Kind::Dist => Proc::Dist(Registry::start_proxy(upstream_url).await?),
        };
        let sys = Self { kind, proc };
        crate::pin::server_if_wanted(sys.pid()?)?;
        Ok(sys)
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        match &self.proc {
            Proc::Ours(c) => c.url(),
            Proc::Dist(r) => r.url(),
        }
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        match &self.proc {
            Proc::Ours(c) => c.host(),
            Proc::Dist(r) => r.host(),
        }
    }

    pub fn pid(&self) -> Result<u32> {
        match &self.proc {
            Proc::Ours(c) => c.pid(),
            Proc::Dist(r) => r.pid(),
        }
        .context("system not running")
    }

    /// Where a complete, committed blob lives in this system's storage.
    fn blob_path(&self, digest: &str) -> PathBuf {
        match &self.proc {
            Proc::Ours(c) => c.store().blob(UPSTREAM_HOST, digest),
            Proc::Dist(r) => {
                let hex = digest.trim_start_matches("sha256:");
                r.storage()
                    .join("docker/registry/v2/blobs/sha256")
                    .join(&hex[..2])
                    .join(hex)
                    .join("data")
            }
        }
    }

    /// Whether the blob is committed to local storage with its full size.
    pub fn has_blob(&self, digest: &str, size: u64) -> bool {
        std::fs::metadata(self.blob_path(digest)).is_ok_and(|m| m.len() == size)
    }

    /// Polls (every 5 ms) until [`System::has_blob`]; returns how long it took.
    pub async fn wait_blob(&self, digest: &str, size: u64, timeout: Duration) -> Result<Duration> {
        let start = tokio::time::Instant::now();
        loop {
            if self.has_blob(digest, size) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{}: blob {digest} not stored within {timeout:?}",
                    self.kind.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Log tail, for error messages.
    pub fn log_tail(&self) -> String {
        match &self.proc {
            Proc::Ours(c) => c.log_tail(20),
            Proc::Dist(r) => {
                let log = r.log();
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            }
        }
    }
}
