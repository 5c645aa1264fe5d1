//! A real Kubernetes control plane on loopback: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok (fake nodes and pod
//! status), built from the Go module proxy by `scripts/install-go-tools.sh`
//! (see `scripts/control-plane.md`). Every process lives in a private temp dir
//! with free ports and is killed on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tempfile::TempDir;

use crate::process::{ChildGuard, ensure_success, run_with_timeout};
use crate::util::{free_port, tail_lines};

const TOOLS: [&str; 6] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
];
const START_TIMEOUT: Duration = Duration::from_secs(90);
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);

/// Root of the tool cache: `$REGMIRROR_TOOLS`, else `$HOME/.cache/regmirror`.
pub fn tools_root() -> PathBuf {
    match std::env::var_os("REGMIRROR_TOOLS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/regmirror"),
    }
}

/// The directory holding the control-plane binaries; fails (never skips) when
/// any is missing, saying how to build them.
pub fn tools_bin_dir() -> Result<PathBuf> {
    let bin = tools_root().join("bin");
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|t| !bin.join(t).is_file())
        .collect();
    let stages = tools_root().join("share/kwok-stages.yaml");
    if !missing.is_empty() || !stages.is_file() {
        bail!(
            "control-plane binaries missing in {} ({}{}): run scripts/install-go-tools.sh \
             (make test does), which builds them from the Go module proxy",
            bin.display(),
            missing.join(", "),
            if stages.is_file() {
                ""
            } else {
                " and share/kwok-stages.yaml"
            }
        );
    }
    Ok(bin)
}

/// What [`ControlPlane::start_with`] starts beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Log every request to an audit log (policy [`crate::audit::POLICY`]),
    /// read with [`ControlPlane::audit_log`].
    pub audit: bool,
    /// The name of a real kubelet's Node ([`crate::RealNode`]) to serve: the
    /// API server then authorizes with `Node,RBAC`, admits with
    /// `NodeRestriction`, reaches kubelets at their `InternalIP`, and accepts
    /// a token for `system:node:NAME` in group `system:nodes` (the kubelet's
    /// identity; see [`ControlPlane::node_kubeconfig`]). `None`: RBAC only.
    pub kubelet_node: Option<String>,
}

/// A running control plane. Use [`ControlPlane::kubectl`] or the kubeconfig.
pub struct ControlPlane {
    dir: TempDir,
    bin: PathBuf,
    audit_log: Option<PathBuf>,
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    /// (node name, token) when started for a real kubelet.
    node_token: Option<(String, String)>,
    // Dropped (killed) in reverse order of start.
    kwok: Option<ChildGuard>,
    scheduler: Option<ChildGuard>,
    kcm: Option<ChildGuard>,
    apiserver: Option<ChildGuard>,
    etcd: Option<ChildGuard>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for c in [
            &mut self.kwok,
            &mut self.scheduler,
            &mut self.kcm,
            &mut self.apiserver,
            &mut self.etcd,
        ] {
            drop(c.take());
        }
    }
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .context("run openssl")?;
    ensure_success(&format!("openssl {}", args.join(" ")), &out)
}

/// Writes a kubeconfig at `path` for `server`, trusting the CA file `ca`,
/// authenticating with the bearer `token`.
fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) -> Result<()> {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: \"{server}\", certificate-authority: \"{}\"}}}}]\n\
             users: [{{name: admin, user: {{token: \"{token}\"}}}}]\n\
             contexts: [{{name: t, context: {{cluster: t, user: admin}}}}]\ncurrent-context: t\n",
            ca.display()
        ),
    )
    .with_context(|| format!("write {}", path.display()))
}

impl ControlPlane {
    /// A kubeconfig trusting this cluster's CA but naming `server` and the
    /// bearer `token` (another identity, a garbage token, an address where
    /// nothing listens), written as `name` in this control plane's directory.
    pub fn kubeconfig_with(&self, name: &str, server: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        let ca = self.dir.path().join("pki/apiserver.crt");
        write_kubeconfig(&path, server, &ca, token)?;
        Ok(path)
    }

    /// A kubeconfig for the ServiceAccount `sa` of `namespace`, with a
    /// TokenRequest token (1 h), written as `name` in this control plane's
    /// directory: a process using it has exactly that account's RBAC.
    pub async fn token_kubeconfig(&self, namespace: &str, sa: &str, name: &str) -> Result<PathBuf> {
        let token = self
            .kubectl_ok(&["create", "token", sa, "-n", namespace, "--duration=1h"])
            .await?;
        self.kubeconfig_with(name, &self.server, token.trim())
    }

    /// `kubectl auth can-i ARGS` as the user `who` (e.g.
    /// `system:serviceaccount:NS:NAME`): whether RBAC allows it.
    pub async fn can_i(&self, who: &str, args: &[&str]) -> Result<bool> {
        let who = format!("--as={who}");
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        all.push(&who);
        let out = self.kubectl(&all).await?;
        match String::from_utf8_lossy(&out.stdout).trim() {
            "yes" => Ok(true),
            "no" => Ok(false),
            _ => anyhow::bail!("kubectl {}: {out:?}", all.join(" ")),
        }
    }

    /// A kubeconfig for the real kubelet's Node named in
    /// [`StartOptions::kubelet_node`] (`system:node:NAME`), written as
    /// `node.kubeconfig` in this control plane's directory. Errors when the
    /// control plane was started without one.
    pub fn node_kubeconfig(&self) -> Result<PathBuf> {
        let Some((_, token)) = &self.node_token else {
            bail!("control plane started without StartOptions::kubelet_node");
        };
        self.kubeconfig_with("node.kubeconfig", &self.server, token)
    }

    /// Starts everything and waits until pods can be created (about 10 s).
    pub async fn start() -> Result<Self> {
        Self::start_with(StartOptions::default()).await
    }

    /// [`ControlPlane::start`] with `options`.
    pub async fn start_with(options: StartOptions) -> Result<Self> {
        let bin = tools_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("regmirror-k8s-")
            .tempdir()?;
        let w = dir.path();
        let pki = w.join("pki");
        std::fs::create_dir_all(pki.join("kcm"))?;
        let sa_key = pki.join("sa.key");
        let sa_pub = pki.join("sa.pub");
        openssl(&["genrsa", "-out", sa_key.to_str().unwrap(), "2048"])?;
        openssl(&[
            "rsa",
            "-in",
            sa_key.to_str().unwrap(),
            "-pubout",
            "-out",
            sa_pub.to_str().unwrap(),
        ])?;
        let token = hex::encode(rand::random::<[u8; 16]>());
        let mut tokens = format!("{token},admin,admin,system:masters\n");
        let node_token = options
            .kubelet_node
            .as_ref()
            .map(|n| (n.clone(), hex::encode(rand::random::<[u8; 16]>())));
        if let Some((node, t)) = &node_token {
            tokens.push_str(&format!(
                "{t},system:node:{node},system:node:{node},system:nodes\n"
            ));
        }
        std::fs::write(pki.join("tokens.csv"), tokens)?;
        let (ec, ep, ap, kp, sp) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );
        let server = format!("https://127.0.0.1:{ap}");
        let kubeconfig = w.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &server, &pki.join("apiserver.crt"), &token)?;
        let audit_log = options.audit.then(|| w.join("audit.log"));
        let mut cp = Self {
            bin: bin.clone(),
            audit_log: audit_log.clone(),
            kubeconfig: kubeconfig.clone(),
            server,
            node_token,
            kwok: None,
            scheduler: None,
            kcm: None,
            apiserver: None,
            etcd: None,
            dir,
        };
        let w = cp.dir.path().to_path_buf();
        let s = |p: &Path| p.display().to_string();

        cp.etcd = Some(ChildGuard::spawn(
            "etcd",
            &bin.join("etcd"),
            &[
                "--name=default".to_string(),
                format!("--data-dir={}", s(&w.join("etcd"))),
                format!("--listen-client-urls=http://127.0.0.1:{ec}"),
                format!("--advertise-client-urls=http://127.0.0.1:{ec}"),
                format!("--listen-peer-urls=http://127.0.0.1:{ep}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{ep}"),
                format!("--initial-cluster=default=http://127.0.0.1:{ep}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
            &[],
            &[],
            &w.join("etcd.log"),
        )?);
        let mut audit_args = Vec::new();
        if let Some(log) = &audit_log {
            let policy = w.join("audit-policy.yaml");
            std::fs::write(&policy, crate::audit::POLICY)?;
            audit_args = vec![
                format!("--audit-policy-file={}", s(&policy)),
                format!("--audit-log-path={}", s(log)),
                // Written as requests arrive; never rotated (lumberjack's
                // default is 100 MB).
                "--audit-log-mode=blocking".into(),
                "--audit-log-maxsize=100000".into(),
            ];
        }
        let authorization = if cp.node_token.is_some() {
            vec![
                "--authorization-mode=Node,RBAC".to_string(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--kubelet-preferred-address-types=InternalIP".into(),
            ]
        } else {
            vec!["--authorization-mode=RBAC".to_string()]
        };
        cp.apiserver = Some(ChildGuard::spawn(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            &[
                "--bind-address=127.0.0.1".to_string(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={ap}"),
                format!("--cert-dir={}", s(&pki)),
                format!("--etcd-servers=http://127.0.0.1:{ec}"),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                format!("--token-auth-file={}", s(&pki.join("tokens.csv"))),
                "--endpoint-reconciler-type=none".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", s(&sa_pub)),
                format!("--service-account-signing-key-file={}", s(&sa_key)),
            ]
            .into_iter()
            .chain(audit_args)
            .chain(authorization)
            .collect::<Vec<_>>(),
            &[],
            &[],
            &w.join("apiserver.log"),
        )?);
        cp.wait_for("kube-apiserver /readyz", &["get", "--raw", "/readyz"])
            .await?;

        let kubeconfig_arg = format!("--kubeconfig={}", s(&kubeconfig));
        cp.kcm = Some(ChildGuard::spawn(
            "kube-controller-manager",
            &bin.join("kube-controller-manager"),
            &[
                kubeconfig_arg.clone(),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={kp}"),
                format!("--cert-dir={}", s(&pki.join("kcm"))),
                format!("--service-account-private-key-file={}", s(&sa_key)),
                format!("--root-ca-file={}", s(&pki.join("apiserver.crt"))),
                "--use-service-account-credentials=true".into(),
            ],
            &[],
            &[],
            &w.join("kcm.log"),
        )?);
        cp.scheduler = Some(ChildGuard::spawn(
            "kube-scheduler",
            &bin.join("kube-scheduler"),
            &[
                kubeconfig_arg.clone(),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={sp}"),
            ],
            &[],
            &[],
            &w.join("scheduler.log"),
        )?);
        cp.kwok = Some(ChildGuard::spawn(
            "kwok",
            &bin.join("kwok"),
            &[
                kubeconfig_arg,
                format!(
                    "--config={}",
                    s(&tools_root().join("share/kwok-stages.yaml"))
                ),
                "--manage-all-nodes=false".into(),
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
                "--cidr=10.244.0.0/24".into(),
            ],
            &[],
            &[],
            &w.join("kwok.log"),
        )?);
        cp.wait_for(
            "the default ServiceAccount (kube-controller-manager running)",
            &["get", "serviceaccount", "default", "-n", "default"],
        )
        .await?;
        Ok(cp)
    }

    /// Directory holding the logs of every component.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The audit log, when started with [`StartOptions::audit`].
    pub fn audit_log(&self) -> Option<crate::audit::AuditLog> {
        self.audit_log.as_deref().map(crate::audit::AuditLog::new)
    }

    /// Last lines of every component's log, for failure messages.
    pub fn logs_tail(&self, n: usize) -> String {
        ["apiserver", "kcm", "scheduler", "kwok"]
            .iter()
            .map(|c| {
                format!(
                    "--- {c} ---\n{}",
                    tail_lines(
                        &crate::util::read_lossy(&self.dir.path().join(format!("{c}.log"))),
                        n
                    )
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn wait_for(&mut self, what: &str, args: &[&str]) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            for (name, c) in [
                ("etcd", &mut self.etcd),
                ("kube-apiserver", &mut self.apiserver),
                ("kube-controller-manager", &mut self.kcm),
                ("kube-scheduler", &mut self.scheduler),
                ("kwok", &mut self.kwok),
            ] {
                if let Some(g) = c
                    && let Some(st) = g.exited()
                {
                    bail!(
                        "{name} exited ({st}) while waiting for {what}; log tail:\n{}",
                        tail_lines(&g.log(), 40)
                    );
                }
            }
            let out = self.kubectl(args).await?;
            if out.status.success() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{what} not ready within {START_TIMEOUT:?}: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.logs_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Runs kubectl against this cluster (bounded); returns the output whatever the status.
    pub async fn kubectl(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut all = vec![format!("--kubeconfig={}", self.kubeconfig.display())];
        all.extend(args.iter().map(|a| a.to_string()));
        run_with_timeout(
            self.bin.join("kubectl").to_str().expect("utf-8 path"),
            &all,
            KUBECTL_TIMEOUT,
        )
        .await
    }

    /// kubectl that must succeed; returns stdout.
    pub async fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args).await?;
        ensure_success(&format!("kubectl {}", args.join(" ")), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl get ... -o json`, parsed; `None` when not found.
    pub async fn get_json(&self, args: &[&str]) -> Result<Option<Value>> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl(&all).await?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("NotFound") || err.contains("not found") {
                return Ok(None);
            }
            ensure_success(&format!("kubectl {}", all.join(" ")), &out)?;
        }
        Ok(Some(serde_json::from_slice(&out.stdout)?))
    }

    /// `kubectl apply -f` of `yaml`; returns the output whatever the status.
    pub async fn apply(&self, yaml: &str) -> Result<std::process::Output> {
        let file = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile_in(self.dir.path())?;
        std::fs::write(file.path(), yaml)?;
        self.kubectl(&["apply", "-f", file.path().to_str().expect("utf-8 path")])
            .await
    }

    /// `kubectl apply -f` that must succeed.
    pub async fn apply_ok(&self, yaml: &str) -> Result<()> {
        let out = self.apply(yaml).await?;
        ensure_success("kubectl apply", &out)
    }

    /// Applies the CRDs in `crds/` (RegistryMirror and RegistryMirrorNode)
    /// and waits until they are served.
    pub async fn install_crd(&self) -> Result<()> {
        let crds = crate::util::workspace_root().join("crds");
        self.kubectl_ok(&["apply", "-f", crds.to_str().unwrap()])
            .await?;
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "crd/registrymirrors.regmirror.dev",
            "crd/registrymirrornodes.regmirror.dev",
            "--timeout=30s",
        ])
        .await?;
        Ok(())
    }

    /// A fake node managed by kwok (Ready within a second), without taints so
    /// ordinary pods schedule onto it.
    pub async fn add_node(&self, name: &str) -> Result<()> {
        self.add_nodes(&[name]).await
    }

    /// [`ControlPlane::add_node`] for each of `names`, in one `kubectl apply`
    /// (200 nodes take a few seconds, not one kubectl run each).
    pub async fn add_nodes(&self, names: &[&str]) -> Result<()> {
        let yaml: String = names
            .iter()
            .map(|name| format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations: {{kwok.x-k8s.io/node: fake}}\n  labels: {{kubernetes.io/hostname: {name}, type: kwok}}\n"
            ))
            .collect();
        self.apply_ok(&yaml).await
    }
}
