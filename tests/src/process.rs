//! Child processes owned by the harness: output captured to a log file, killed on drop.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::util::{read_lossy, tail_lines};

/// Whether `setpriv --pdeathsig` is available: children then die with the thread that
/// spawned them, even when the test process is killed before `Drop` runs.
fn setpriv() -> Option<&'static Path> {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    SETPRIV
        .get_or_init(|| {
            ["/usr/bin/setpriv", "/bin/setpriv"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        })
        .as_deref()
}

/// A spawned child with stdout+stderr appended to `log_path`.
///
/// Drop sends SIGKILL and reaps it. Use [`ChildGuard::terminate`] for a graceful stop.
#[derive(Debug)]
pub(crate) struct ChildGuard {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
}

impl ChildGuard {
    /// Spawns `program args..` with stdin closed and output appended to `log_path`.
    pub(crate) fn spawn<S: AsRef<OsStr>>(
        name: &str,
        program: &Path,
        args: &[S],
        envs: &[(String, String)],
        env_remove: &[String],
        log_path: &Path,
    ) -> Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("open log {}", log_path.display()))?;
        let mut cmd = match setpriv() {
            Some(sp) => {
                let mut c = Command::new(sp);
                c.args(["--pdeathsig", "KILL", "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        for k in env_remove {
            cmd.env_remove(k);
        }
        cmd.args(args)
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name} ({})", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log_path: log_path.to_owned(),
        })
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` if the child has exited (it is reaped then).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub(crate) fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    /// SIGTERM, then wait up to `grace`, then SIGKILL. Returns the exit status.
    pub(crate) async fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} was not running", self.name);
        };
        if let Some(st) = child.try_wait()? {
            self.child = None;
            return Ok(st);
        }
        let pid = child.id().to_string();
        // `kill` from procps: no libc/unsafe needed.
        let _ = Command::new("kill")
            .args(["-TERM", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill_now()
            .ok_or_else(|| anyhow!("{} did not exit after SIGKILL", self.name))
    }

    /// SIGKILL and reap. `None` if there was no child.
    pub(crate) fn kill_now(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// Text of the captured output so far.
    pub(crate) fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Polls `GET {url}/v2/` until 200; fails early if the child exits, with the log tail.
    pub(crate) async fn wait_v2_ready(&mut self, url: &str, timeout: Duration) -> Result<()> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .build()?;
        let target = format!("{url}/v2/");
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last: String;
        loop {
            if let Some(st) = self.exited() {
                self.child = None;
                bail!(
                    "{} exited ({st}) before {target} answered 200; log tail:\n{}",
                    self.name,
                    tail_lines(&self.log(), 40)
                );
            }
            match client.get(&target).send().await {
                Ok(r) if r.status() == reqwest::StatusCode::OK => return Ok(()),
                Ok(r) => last = format!("status {}", r.status()),
                Err(e) => last = format!("error {e}"),
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} not ready: {target} did not answer 200 within {timeout:?} (last: {last}); log tail:\n{}",
                    self.name,
                    tail_lines(&self.log(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// Numeric fields of `/proc/<pid>/stat`, by their numbers in proc(5) (from
/// 4 on), read at once. Errors when the process is gone.
fn stat_fields<const N: usize>(pid: u32, numbers: [usize; N]) -> Result<[u64; N]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count fields after its ')'.
    let after = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let mut values = [0; N];
    for (value, number) in values.iter_mut().zip(numbers) {
        // fields[0] is field 3 (state).
        *value = fields
            .get(number - 3)
            .context("short stat")?
            .parse::<u64>()
            .context("stat field")?;
    }
    Ok(values)
}

/// CPU time process `pid` has used so far (user + system, all threads), from
/// `/proc/<pid>/stat` fields 14 and 15, in clock ticks of 1/100 s (Linux's
/// USER_HZ). Errors when the process is gone.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let [utime, stime] = stat_fields(pid, [14, 15])?;
    Ok(Duration::from_millis((utime + stime) * 10))
}

/// Minor page faults of process `pid` so far (all threads), `/proc/<pid>/stat`
/// field 10. Errors when the process is gone.
pub fn minor_faults(pid: u32) -> Result<u64> {
    Ok(stat_fields(pid, [10])?[0])
}

/// Resident memory of process `pid` in bytes (`VmRSS` of `/proc/<pid>/status`,
/// which counts kB). Errors when the process is gone.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// Runs a short-lived command with a timeout (killed when it expires).
/// Returns the output whatever the exit status; errors only on spawn failure or timeout.
pub async fn run_with_timeout<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
) -> Result<Output> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("spawn {program}"))?;
    let shown = || {
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.with_context(|| format!("wait for {program}")),
        Err(_) => bail!("`{program} {}` timed out after {timeout:?}", shown()),
    }
}

/// Fails with the command's stdout/stderr unless it exited successfully.
pub fn ensure_success(what: &str, out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether a start failure looks like a lost race for a pre-picked port.
pub(crate) fn is_addr_in_use(e: &anyhow::Error) -> bool {
    format!("{e:#}")
        .to_ascii_lowercase()
        .contains("address already in use")
}
