//! Clients in processes of their own, for scenario 1's big blob: `curl` (C,
//! discards the body) and `crane blob` (Go's HTTP stack, hashes what it reads
//! to verify the digest, as a container runtime does).
//!
//! On one host the receiver's side of TCP is part of what a send costs, and who
//! pays for it depends on the reader's pace, so the same server's CPU per GiB
//! differs by client; these rows show by how much.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use rustix::process::{Pid, WaitId, WaitIdOptions};

use crate::procfs;

/// A client program that fetches one blob and exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExternalClient {
    Curl,
    Crane,
}

/// One fetch: wall time from spawn to exit, and the client's own CPU.
#[derive(Debug, Clone, Copy)]
pub struct ClientRun {
    pub secs: f64,
    pub cpu_secs: f64,
}

impl ExternalClient {
    pub const ALL: [ExternalClient; 2] = [ExternalClient::Curl, ExternalClient::Crane];

    pub fn name(self) -> &'static str {
        match self {
            ExternalClient::Curl => "curl",
            ExternalClient::Crane => "crane",
        }
    }

    /// The program, or why it is missing.
    pub fn program(self) -> Result<PathBuf> {
        let p = match self {
            ExternalClient::Curl => {
                std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                    .map(|dir| dir.join("curl"))
                    .find(|p| p.is_file())
                    .unwrap_or_else(|| PathBuf::from("curl"))
            }
            ExternalClient::Crane => regmirror_e2e::controlplane::tools_root()
                .join("bin")
                .join("crane"),
        };
        ensure!(
            p.is_file(),
            "{} is missing ({})",
            p.display(),
            match self {
                ExternalClient::Curl => "apt-get install curl",
                ExternalClient::Crane => "scripts/install-go-tools.sh crane",
            }
        );
        Ok(p)
    }

    /// Arguments fetching `repo@digest` from the registry at `host` (`IP:PORT`).
    pub fn args(self, host: &str, repo: &str, digest: &str) -> Vec<String> {
        match self {
            ExternalClient::Curl => vec![
                "--silent".into(),
                "--show-error".into(),
                "--fail".into(),
                "--noproxy".into(),
                "*".into(),
                "--output".into(),
                "/dev/null".into(),
                "--write-out".into(),
                "%{size_download}".into(),
                format!("http://{host}/v2/{repo}/blobs/{digest}"),
            ],
            ExternalClient::Crane => vec![
                "blob".into(),
                "--insecure".into(),
                format!("{host}/{repo}@{digest}"),
            ],
        }
    }

    /// Fetches `repo@digest` (`size` bytes) from `host`; blocks until the client exits.
    pub fn fetch(self, host: &str, repo: &str, digest: &str, size: u64) -> Result<ClientRun> {
        let program = self.program()?;
        // Files, not pipes: nobody reads them until the client has exited.
        let mut stdout = tempfile::tempfile()?;
        let mut stderr = tempfile::tempfile()?;
        let t0 = Instant::now();
        let child = Command::new(&program)
            .args(self.args(host, repo, digest))
            .env("NO_PROXY", "*")
            .stdin(Stdio::null())
            .stdout(match self {
                // crane writes the blob to stdout; curl writes only its --write-out.
                ExternalClient::Crane => Stdio::null(),
                ExternalClient::Curl => Stdio::from(stdout.try_clone()?),
            })
            .stderr(Stdio::from(stderr.try_clone()?))
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        let mut child = Reaped(child);
        // Wait for the exit without reaping: a zombie's /proc/PID/stat still holds
        // the CPU of all its threads, so it is exactly this run's.
        let pid = Pid::from_raw(i32::try_from(child.0.id())?).context("child pid")?;
        rustix::process::waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        )
        .context("wait for the client")?;
        let secs = t0.elapsed().as_secs_f64();
        let cpu_secs = procfs::cpu_seconds(child.0.id())?;
        let status = child.0.wait()?;
        let read = |f: &mut std::fs::File| -> Result<String> {
            let mut text = String::new();
            f.seek(SeekFrom::Start(0))?;
            f.read_to_string(&mut text)?;
            Ok(text)
        };
        if !status.success() {
            bail!(
                "{} {}: {}: {}",
                self.name(),
                host,
                status,
                read(&mut stderr)?.trim()
            );
        }
        if self == ExternalClient::Curl {
            let got = read(&mut stdout)?;
            ensure!(
                got.trim() == size.to_string(),
                "curl {host}: {got} bytes, wanted {size}"
            );
        }
        Ok(ClientRun { secs, cpu_secs })
    }
}

/// A client process that is killed and reaped if the fetch bails out early.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_clients_name_the_blob_by_digest() {
        let curl = ExternalClient::Curl.args("127.0.0.1:5000", "r/x", "sha256:ab");
        assert_eq!(
            curl.last().unwrap(),
            "http://127.0.0.1:5000/v2/r/x/blobs/sha256:ab"
        );
        assert!(curl.contains(&"--fail".to_owned()));
        let crane = ExternalClient::Crane.args("127.0.0.1:5000", "r/x", "sha256:ab");
        assert_eq!(
            crane,
            ["blob", "--insecure", "127.0.0.1:5000/r/x@sha256:ab"]
        );
    }

    #[test]
    fn a_failing_client_is_an_error() {
        if ExternalClient::Curl.program().is_err() {
            eprintln!("skipped: no curl");
            return;
        }
        // A port just released: nothing listens, so curl fails fast.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let err = ExternalClient::Curl
            .fetch(&host, "r", "sha256:00", 1)
            .unwrap_err();
        assert!(err.to_string().contains(&format!("curl {host}")), "{err:#}");
    }
}
