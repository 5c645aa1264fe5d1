//! The `regmirror-operator` binary under test, as a child process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tempfile::TempDir;

use crate::controlplane::ControlPlane;
use crate::process::ChildGuard;
use crate::util::{free_port, workspace_root};

pub const OPERATOR_BIN: &str = "regmirror-operator";
/// How long [`OperatorProcess::wait_for`] waits.
pub const WAIT: Duration = Duration::from_secs(60);

/// The condition of type `type_` in an object's `status.conditions`.
pub fn condition<'a>(m: &'a Value, type_: &str) -> Option<&'a Value> {
    m["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Path of the operator binary: `$REGMIRROR_BIN_DIR/regmirror-operator`, else
/// `$CARGO_TARGET_DIR/debug/...`, else `<workspace>/target/debug/...`.
/// Panics if it does not exist.
pub fn operator_binary() -> PathBuf {
    let candidates: Vec<PathBuf> = if let Some(dir) = std::env::var_os("REGMIRROR_BIN_DIR") {
        vec![PathBuf::from(dir).join(OPERATOR_BIN)]
    } else {
        let mut v = Vec::new();
        if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
            v.push(PathBuf::from(t).join("debug").join(OPERATOR_BIN));
        }
        v.push(workspace_root().join("target/debug").join(OPERATOR_BIN));
        v
    };
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "{OPERATOR_BIN} not found (looked at {candidates:?}); build it first: cargo build --bins"
        )
    })
}

/// A running operator (`regmirror-operator run`), killed on drop.
pub struct OperatorProcess {
    child: ChildGuard,
    _dir: TempDir,
    /// `http://127.0.0.1:PORT` serving /metrics, /healthz, /readyz.
    pub metrics_url: String,
    /// Set by [`OperatorProcess::stop`].
    pub stopped: bool,
}

impl OperatorProcess {
    /// Starts the operator against `kubeconfig`, reconciling into `namespace`,
    /// with leader election on the Lease `regmirror-operator` as `identity`.
    pub fn start(
        kubeconfig: &Path,
        namespace: &str,
        identity: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("regmirror-operator-")
            .tempdir()?;
        let port = free_port();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--namespace".into(),
            namespace.into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{port}"),
            "--identity".into(),
            identity.into(),
            "--cache-image".into(),
            "registry.invalid/regmirror-cache:test".into(),
            "--agent-image".into(),
            "registry.invalid/regmirror-operator:test".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = ChildGuard::spawn(
            "regmirror-operator",
            &operator_binary(),
            &args,
            &[
                ("KUBECONFIG".into(), kubeconfig.display().to_string()),
                (
                    "REGMIRROR_LOG".into(),
                    "info,regmirror_operator=debug".into(),
                ),
                ("NO_COLOR".into(), "1".into()),
                ("RUST_BACKTRACE".into(), "1".into()),
            ],
            &["POD_NAMESPACE".into(), "POD_NAME".into()],
            &dir.path().join("operator.log"),
        )?;
        Ok(Self {
            child,
            _dir: dir,
            metrics_url: format!("http://127.0.0.1:{port}"),
            stopped: false,
        })
    }

    pub fn log(&self) -> String {
        self.child.log()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Polls `kubectl get ARGS -o json` until `check` returns `Some`; fails with
    /// the last object seen and this operator's log after [`WAIT`], or at once
    /// if the operator exited without being stopped.
    pub async fn wait_for<T>(
        &mut self,
        cp: &ControlPlane,
        what: &str,
        args: &[&str],
        check: impl Fn(Option<&Value>) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = cp.get_json(args).await?;
            if let Some(t) = check(v.as_ref()) {
                return Ok(t);
            }
            let exited = !self.is_running() && !self.stopped;
            if exited || tokio::time::Instant::now() >= deadline {
                bail!(
                    "{what}: not within {WAIT:?} (operator exited: {exited}); last seen: {}\noperator log tail:\n{}",
                    v.map(|v| serde_json::to_string_pretty(&v).unwrap())
                        .unwrap_or_else(|| "(not found)".into()),
                    crate::util::tail_lines(&self.log(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// SIGTERM (the operator releases its lease), then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Result<std::process::ExitStatus> {
        self.stopped = true;
        self.child.terminate(grace).await
    }
}

/// `regmirror-operator agent` for one (fake) node, run on this machine with
/// the node's `/` at [`AgentOptions::host_root`] (a temp dir per node).
pub struct AgentProcess {
    child: ChildGuard,
    _dir: TempDir,
}

/// What [`AgentProcess::start`] needs.
pub struct AgentOptions<'a> {
    pub kubeconfig: &'a Path,
    pub node_name: &'a str,
    pub node_ip: &'a str,
    /// Where the agent sees the node's `/` (`--host-root`).
    pub host_root: &'a Path,
    /// Node paths the agent may touch (`--allowed-dir`, each).
    pub allowed_dirs: &'a [&'a str],
}

impl AgentOptions<'_> {
    /// Where the agent sees the node path `node_path`, under the host root.
    pub fn on_node(&self, node_path: &str) -> PathBuf {
        self.host_root.join(node_path.trim_start_matches('/'))
    }
}

impl AgentProcess {
    pub fn start(o: &AgentOptions<'_>) -> Result<Self> {
        Self::start_with_env(o, &[])
    }

    /// [`AgentProcess::start`] with more environment variables (`extra`,
    /// e.g. `REGMIRROR_PROBE_ADDR`), set after the defaults (so they win).
    pub fn start_with_env(o: &AgentOptions<'_>, extra: &[(&str, &str)]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("regmirror-agent-")
            .tempdir()?;
        let env: Vec<(String, String)> = [
            ("KUBECONFIG", o.kubeconfig.display().to_string()),
            ("NODE_NAME", o.node_name.to_owned()),
            ("NODE_IP", o.node_ip.to_owned()),
            ("REGMIRROR_HOST_ROOT", o.host_root.display().to_string()),
            ("REGMIRROR_ALLOWED_DIRS", o.allowed_dirs.join(",")),
            ("REGMIRROR_RESYNC", "1s".to_owned()),
            ("REGMIRROR_LOG", "info,regmirror_operator=debug".to_owned()),
            ("NO_COLOR", "1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
        let child = ChildGuard::spawn(
            "regmirror-agent",
            &operator_binary(),
            &["agent"],
            &env,
            &["POD_NAMESPACE".into()],
            &dir.path().join("agent.log"),
        )?;
        Ok(Self { child, _dir: dir })
    }

    pub fn log(&self) -> String {
        self.child.log()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Result<std::process::ExitStatus> {
        self.child.terminate(grace).await
    }

    /// CPU time the agent has used so far ([`crate::process::cpu_time`]).
    pub fn cpu_time(&self) -> Result<Duration> {
        crate::process::cpu_time(self.child.pid().context("agent not running")?)
    }
}

/// The installation claim on the RegistryMirror CRD
/// (`regmirror.dev/installation: NAMESPACE/LEASE`): `None` when unclaimed.
pub async fn installation_claim(cp: &ControlPlane) -> Result<Option<String>> {
    let crd = cp
        .get_json(&["crd", "registrymirrors.regmirror.dev"])
        .await?
        .context("the RegistryMirror CRD")?;
    Ok(crd["metadata"]["annotations"]["regmirror.dev/installation"]
        .as_str()
        .map(str::to_owned))
}

/// Sets the installation claim to `claim` (`NAMESPACE/LEASE`), or releases
/// it with `None`, as an operator or its uninstall hook would.
pub async fn set_installation_claim(cp: &ControlPlane, claim: Option<&str>) -> Result<()> {
    let annotation = match claim {
        Some(c) => format!("regmirror.dev/installation={c}"),
        None => "regmirror.dev/installation-".to_owned(),
    };
    cp.kubectl_ok(&[
        "annotate",
        "crd",
        "registrymirrors.regmirror.dev",
        &annotation,
        "--overwrite",
    ])
    .await
    .map(drop)
}
