//! Many node agents at once, as the chart's DaemonSet runs them on a large
//! cluster: one `regmirror-operator agent` process per (kwok) node, each with
//! a host root of its own, so every "node" has its own `/etc/containerd`.
//! For measuring the API load the agents make ([`crate::audit`]) and what
//! they cost ([`AgentFleet::usage`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::operator::operator_binary;
use crate::process::{ChildGuard, cpu_time, rss_bytes};
use crate::util::tail_lines;

/// The node directory every agent may touch (`--allowed-dir`, the chart's
/// default `agent.hostDirs`).
pub const ALLOWED_DIR: &str = "/etc/containerd";

/// Each node's `/etc/containerd/config.toml`: containerd 1.x reading
/// `hosts.toml` from `/etc/containerd/certs.d` (a mirror's default
/// `containerdConfigDir`), so the agent reports `Configured`, not
/// `NotEffective`.
pub const CONTAINERD_CONFIG: &str = "version = 2\n\
    [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  \
    config_path = \"/etc/containerd/certs.d\"\n";

/// How [`AgentFleet::start`] runs each agent.
#[derive(Debug, Clone)]
pub struct FleetOptions<'a> {
    /// Whose credentials the agents use (e.g. the chart's agent ServiceAccount
    /// token, [`crate::ControlPlane::token_kubeconfig`]).
    pub kubeconfig: &'a Path,
    /// `--heartbeat`: an unchanged report is rewritten this often.
    pub heartbeat: Duration,
    /// `--resync`: the files are checked this often.
    pub resync: Duration,
    /// `REGMIRROR_LOG` (e.g. `warn`: 200 agents at `debug` write a lot).
    pub log: &'a str,
}

/// CPU and memory of all agents together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetUsage {
    /// User + system CPU time used since start, summed.
    pub cpu: Duration,
    /// Resident memory now, summed, in bytes.
    pub rss_bytes: u64,
}

/// One agent process per node, killed on drop.
pub struct AgentFleet {
    agents: Vec<(String, ChildGuard)>,
    dir: TempDir,
}

/// `humantime` form of a whole number of seconds or milliseconds (`20s`, `1500ms`).
fn duration_arg(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl AgentFleet {
    /// Starts `regmirror-operator agent --node-name NODE --node-ip 127.0.0.1
    /// --host-root ROOT --allowed-dir /etc/containerd` for every node of
    /// `nodes`, ROOT being [`AgentFleet::host_root`] with
    /// [`CONTAINERD_CONFIG`] in its `etc/containerd/config.toml`. Start it
    /// from the test's own thread (see the crate docs).
    pub fn start(nodes: &[&str], o: &FleetOptions<'_>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("regmirror-fleet-")
            .tempdir()?;
        let mut fleet = Self {
            agents: Vec::with_capacity(nodes.len()),
            dir,
        };
        let env = vec![
            ("KUBECONFIG".to_owned(), o.kubeconfig.display().to_string()),
            ("REGMIRROR_LOG".to_owned(), o.log.to_owned()),
            ("NO_COLOR".to_owned(), "1".to_owned()),
        ];
        let remove = [
            "POD_NAMESPACE".to_owned(),
            "REGMIRROR_PROBE_ADDR".to_owned(),
        ];
        for node in nodes {
            let root = fleet.host_root(node);
            let etc = root.join(ALLOWED_DIR.trim_start_matches('/'));
            std::fs::create_dir_all(&etc)?;
            std::fs::write(etc.join("config.toml"), CONTAINERD_CONFIG)?;
            let args = [
                "agent".to_owned(),
                "--node-name".into(),
                node.to_string(),
                "--node-ip".into(),
                "127.0.0.1".into(),
                "--host-root".into(),
                root.display().to_string(),
                "--allowed-dir".into(),
                ALLOWED_DIR.into(),
                "--heartbeat".into(),
                duration_arg(o.heartbeat),
                "--resync".into(),
                duration_arg(o.resync),
            ];
            let child = ChildGuard::spawn(
                &format!("agent {node}"),
                &operator_binary(),
                &args,
                &env,
                &remove,
                &root.join("agent.log"),
            )?;
            fleet.agents.push((node.to_string(), child));
        }
        Ok(fleet)
    }

    /// The directory the agent of `node` sees as the node's `/`.
    pub fn host_root(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    /// Number of agents.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// The last `n` lines of `node`'s agent log.
    pub fn log_tail(&self, node: &str, n: usize) -> String {
        tail_lines(
            &crate::util::read_lossy(&self.host_root(node).join("agent.log")),
            n,
        )
    }

    /// Fails, naming the first agent that exited and its log tail, unless all run.
    pub fn ensure_running(&mut self) -> Result<()> {
        for (node, child) in &mut self.agents {
            if let Some(st) = child.exited() {
                bail!(
                    "the agent of {node} exited ({st}); log tail:\n{}",
                    tail_lines(&child.log(), 30)
                );
            }
        }
        Ok(())
    }

    /// CPU time and resident memory of all agents together; errors when one
    /// is gone.
    pub fn usage(&self) -> Result<FleetUsage> {
        let mut total = FleetUsage {
            cpu: Duration::ZERO,
            rss_bytes: 0,
        };
        for (node, child) in &self.agents {
            let pid = child
                .pid()
                .with_context(|| format!("the agent of {node} is not running"))?;
            total.cpu += cpu_time(pid)?;
            total.rss_bytes += rss_bytes(pid)?;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_the_agent_parses_them() {
        assert_eq!(duration_arg(Duration::from_secs(20)), "20s");
        assert_eq!(duration_arg(Duration::from_millis(1500)), "1500ms");
        assert_eq!(
            humantime::parse_duration(&duration_arg(Duration::from_millis(1500))).unwrap(),
            Duration::from_millis(1500)
        );
    }
}
