//! Optional CPU pinning (`BENCH_PIN=1`): the systems under test (and the
//! reference `sendfile` server) on CPU 0, the load generator and the upstream
//! on the others, so the client's work is not charged to, or taken from, the
//! server it measures. Needs at least two CPUs and `taskset` (util-linux).

use std::process::Command;

use anyhow::{Context, Result, ensure};

/// Whether `BENCH_PIN` asks for pinning.
pub fn wanted() -> bool {
    std::env::var("BENCH_PIN").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// CPUs for the systems under test.
pub const SERVER_CPUS: &str = "0";

/// CPUs for everything else: 1..nproc-1.
pub fn client_cpus() -> Result<String> {
    let n = std::thread::available_parallelism()?.get();
    ensure!(
        n >= 2,
        "BENCH_PIN needs at least 2 CPUs, this machine has {n}"
    );
    Ok(format!("1-{}", n - 1))
}

/// Pins a system under test (or the reference server) to [`SERVER_CPUS`] when
/// `BENCH_PIN` asks for it.
pub fn server_if_wanted(pid: u32) -> Result<()> {
    if wanted() {
        pin(pid, SERVER_CPUS)?;
    }
    Ok(())
}

/// Moves every thread of `pid` to `cpus`; threads it starts later inherit them.
pub fn pin(pid: u32, cpus: &str) -> Result<()> {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .context("run taskset (util-linux)")?;
    ensure!(
        out.status.success(),
        "taskset -a -p -c {cpus} {pid}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_every_thread_of_a_process() {
        if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
            return;
        }
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let allowed = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap()
                .lines()
                .find_map(|l| {
                    l.strip_prefix("Cpus_allowed_list:")
                        .map(|v| v.trim().to_owned())
                })
                .unwrap()
        };
        pin(child.id(), SERVER_CPUS).unwrap();
        assert_eq!(allowed(child.id()), "0");
        let others = client_cpus().unwrap();
        pin(child.id(), &others).unwrap();
        assert_eq!(allowed(child.id()), others.replace("1-1", "1"));
        assert!(pin(u32::MAX - 1, "0").is_err());
        child.kill().unwrap();
        let _ = child.wait();
    }
}
