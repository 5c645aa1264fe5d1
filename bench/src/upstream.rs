//! The one seeded upstream registry both systems sit in front of, and what we read from
//! it: access-log deltas (requests, bytes) and quiescence.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use regmirror_e2e::{AccessEntry, Registry};
use sha2::{Digest, Sha256};

use crate::procfs;

/// A raw blob seeded into the upstream.
#[derive(Debug, Clone)]
pub struct SeededBlob {
    pub repo: String,
    pub digest: String,
    pub size: u64,
    /// The upstream's file holding the bytes (for the sendfile ceiling).
    pub path: PathBuf,
}

/// The upstream registry (Debian's `docker-registry`).
#[derive(Debug)]
pub struct Upstream {
    pub reg: Registry,
}

/// Position in the access log, to count what happened after it.
#[derive(Debug, Clone, Copy)]
pub struct Mark(usize);

/// What the upstream served after a [`Mark`].
#[derive(Debug, Clone, Default)]
pub struct Served {
    pub entries: Vec<AccessEntry>,
}

impl Served {
    pub fn requests(&self) -> usize {
        self.entries.len()
    }
    /// Body bytes of entries whose path contains `needle`.
    pub fn bytes_for(&self, needle: &str) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.path.contains(needle))
            .map(|e| e.bytes)
            .sum()
    }
    pub fn count(&self, method: &str, needle: &str) -> usize {
        self.entries
            .iter()
            .filter(|e| e.method == method && e.path.contains(needle))
            .count()
    }
}

/// xorshift64* filler: incompressible, fast.
fn fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        let mut x = *state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *state = x;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

impl Upstream {
    pub async fn start() -> Result<Self> {
        Ok(Self {
            reg: Registry::start().await?,
        })
    }

    pub fn url(&self) -> String {
        self.reg.url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.reg
            .host()
            .parse()
            .expect("registry host is an address")
    }

    /// Writes `size` random bytes straight into the registry's storage as a blob of
    /// `repo` (distribution's filesystem layout: `blobs/.../data` plus the repository's
    /// `_layers` link). Much faster than a 1 GiB upload, and needs no memory.
    pub async fn seed_blob(&self, repo: &str, size: u64, seed: u64) -> Result<SeededBlob> {
        let root = self.reg.storage().join("docker/registry/v2");
        let repo = repo.to_owned();
        tokio::task::spawn_blocking(move || -> Result<SeededBlob> {
            std::fs::create_dir_all(&root)?;
            let tmp = root.join(format!("seed-{seed}.tmp"));
            let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
            let mut hasher = Sha256::new();
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = size;
            while left > 0 {
                let n = usize::try_from(left.min(buf.len() as u64))?;
                fill(&mut state, &mut buf[..n]);
                hasher.update(&buf[..n]);
                f.write_all(&buf[..n])?;
                left -= n as u64;
            }
            f.flush()?;
            drop(f);
            let hex = hex::encode(hasher.finalize());
            let digest = format!("sha256:{hex}");
            let dir = root.join("blobs/sha256").join(&hex[..2]).join(&hex);
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("data");
            std::fs::rename(&tmp, &path)?;
            let link = root
                .join("repositories")
                .join(&repo)
                .join("_layers/sha256")
                .join(&hex);
            std::fs::create_dir_all(&link)?;
            std::fs::write(link.join("link"), &digest)?;
            Ok(SeededBlob {
                repo,
                digest,
                size,
                path,
            })
        })
        .await?
    }

    /// The access log's current end.
    pub fn mark(&self) -> Mark {
        Mark(self.reg.access_log().len())
    }

    /// Entries after `mark`.
    pub fn since(&self, mark: Mark) -> Served {
        let mut log = self.reg.access_log();
        Served {
            entries: log.split_off(mark.0.min(log.len())),
        }
    }

    /// Waits until the upstream has written nothing (sockets, access log) for `quiet`,
    /// so every transfer in flight, background copies included, has finished and been
    /// logged. Bounded by `timeout`.
    pub async fn settle(&self, quiet: Duration, timeout: Duration) -> Result<()> {
        let pid = self.reg.pid().context("upstream not running")?;
        let start = tokio::time::Instant::now();
        let mut last = procfs::wchar(pid)?;
        let mut since = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = procfs::wchar(pid)?;
            if now != last {
                last = now;
                since = tokio::time::Instant::now();
            } else if since.elapsed() >= quiet {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!("upstream still busy after {timeout:?}");
            }
        }
    }
}
