//! containerd (Debian's 1.6) as a pull client, with private root/state/socket, driven by `ctr`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::process::{ChildGuard, ensure_success, run_with_timeout};
use crate::util::{read_lossy, require_root, tail_lines};

const BINARY: &str = "/usr/bin/containerd";
const CTR: &str = "ctr";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const CTR_TIMEOUT: Duration = Duration::from_secs(30);
/// containerd namespace used for everything.
pub const NAMESPACE: &str = "test";

/// Writes `<dir>/<host>/hosts.toml` (containerd `config_path` / `ctr --hosts-dir` layout):
/// `server = server_url` and one mirror `[host."<mirror_url>"]` with pull+resolve.
/// Plain http URLs need nothing else. Returns the file path.
///
/// `host` is the registry as named in image refs (`docker.io`, `127.0.0.1:5000`).
/// Point `server_url` at loopback too (e.g. the closed port `http://127.0.0.1:9`) so a
/// failing mirror can never make containerd dial the internet.
pub fn write_hosts_toml(
    dir: &Path,
    host: &str,
    mirror_url: &str,
    server_url: &str,
) -> Result<PathBuf> {
    let host_dir = dir.join(host);
    std::fs::create_dir_all(&host_dir)?;
    let path = host_dir.join("hosts.toml");
    let text = format!(
        "server = \"{server_url}\"\n\n[host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    );
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// The harness's CRI plugin tables (config version 2): no SELinux, stream
/// server on loopback, snapshotter `native`, CNI dirs `dir/cni-bin` and
/// `dir/cni-conf` (created), and `registry.config_path = certs_dir` if given.
pub fn cri_tables(dir: &Path, certs_dir: Option<&Path>) -> Result<String> {
    let cni_conf = dir.join("cni-conf");
    let cni_bin = dir.join("cni-bin");
    std::fs::create_dir_all(&cni_conf)?;
    std::fs::create_dir_all(&cni_bin)?;
    let mut t = format!(
        "\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n  enable_selinux = false\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"native\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{}\"\n  conf_dir = \"{}\"\n",
        cni_bin.display(),
        cni_conf.display(),
    );
    if let Some(certs) = certs_dir {
        t.push_str(&format!(
            "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
            certs.display()
        ));
    }
    Ok(t)
}

/// A private containerd daemon (root needed), killed on drop with its temp dir removed.
#[derive(Debug)]
pub struct Containerd {
    child: Option<ChildGuard>,
    config_file: PathBuf,
    socket: PathBuf,
    log_path: PathBuf,
    /// Timeout of one `ctr image pull` (default 120 s).
    pub pull_timeout: Duration,
    // Last: removed after the daemon is killed.
    dir: TempDir,
}

impl Containerd {
    /// containerd with the CRI plugin disabled.
    pub async fn start() -> Result<Self> {
        Self::start_inner(false, |_| Ok((String::new(), String::new()))).await
    }

    /// containerd with the CRI plugin enabled, registry `config_path = certs_dir`,
    /// snapshotter `native`, CNI dirs inside the temp dir.
    pub async fn start_with_cri(certs_dir: &Path) -> Result<Self> {
        Self::start_inner(true, |d| {
            Ok((String::new(), cri_tables(d, Some(certs_dir))?))
        })
        .await
    }

    /// containerd with the CRI plugin enabled and configured only by imported
    /// files: `config(dir)` (dir: the temp dir holding config.toml) returns
    /// the main config's `imports` and the files to write first, as (path
    /// relative to `dir`, text); the main config.toml is version 2 without
    /// plugin tables. Build CRI tables with [`cri_tables`].
    pub async fn start_with_imports(
        config: impl FnOnce(&Path) -> Result<(Vec<String>, Vec<(String, String)>)>,
    ) -> Result<Self> {
        Self::start_with_imports_at(None, config).await
    }

    /// [`Containerd::start_with_imports`] with config.toml and the imported
    /// files in `config_dir` (created) instead of the temp dir, apart from
    /// root and state as on a real node (`/etc/containerd`): a node agent
    /// may mount it without the daemon's mounts.
    pub async fn start_with_imports_at(
        config_dir: Option<&Path>,
        config: impl FnOnce(&Path) -> Result<(Vec<String>, Vec<(String, String)>)>,
    ) -> Result<Self> {
        Self::start_inner_at(true, config_dir, |d| {
            let (imports, files) = config(d)?;
            for (rel, text) in files {
                let path = d.join(rel);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
            }
            let list: Vec<String> = imports.iter().map(|i| format!("{i:?}")).collect();
            Ok((format!("imports = [{}]\n", list.join(", ")), String::new()))
        })
        .await
    }

    /// `config(dir)` returns (top-level keys, tables) to add to the main config.
    async fn start_inner(
        cri: bool,
        config: impl FnOnce(&Path) -> Result<(String, String)>,
    ) -> Result<Self> {
        Self::start_inner_at(cri, None, config).await
    }

    /// `config` gets the directory config.toml goes to: `config_dir`, or
    /// the temp dir.
    async fn start_inner_at(
        cri: bool,
        config_dir: Option<&Path>,
        config: impl FnOnce(&Path) -> Result<(String, String)>,
    ) -> Result<Self> {
        require_root("containerd");
        let dir = tempfile::Builder::new()
            .prefix("regmirror-ctrd-")
            .tempdir()?;
        let d = dir.path();
        let config_dir = config_dir.unwrap_or(d).to_path_buf();
        std::fs::create_dir_all(&config_dir)?;
        let socket = d.join("sock");
        let q = |p: PathBuf| p.display().to_string();
        let mut cfg = format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\n",
            q(d.join("root")),
            q(d.join("state"))
        );
        if cri {
            cfg.push_str("disabled_plugins = []\n");
        } else {
            cfg.push_str("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n");
        }
        let (top, tables) = config(&config_dir)?;
        cfg.push_str(&top);
        cfg.push_str(&format!(
            "\n[grpc]\n  address = \"{}\"\n[ttrpc]\n  address = \"{}\"\n[debug]\n  address = \"{}\"\n[metrics]\n  address = \"\"\n",
            q(socket.clone()),
            q(d.join("sock.ttrpc")),
            q(d.join("debug.sock"))
        ));
        cfg.push_str(&tables);
        let config_path = config_dir.join("config.toml");
        std::fs::write(&config_path, cfg)?;
        let log_path = d.join("containerd.log");
        let args = ["--config".to_owned(), q(config_path.clone())];
        let child = ChildGuard::spawn("containerd", Path::new(BINARY), &args, &[], &[], &log_path)?;
        let mut me = Self {
            child: Some(child),
            config_file: config_path,
            socket,
            log_path,
            pull_timeout: Duration::from_secs(120),
            dir,
        };
        me.wait_ready().await?;
        Ok(me)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(st) = self.child.as_mut().and_then(ChildGuard::exited) {
                bail!(
                    "containerd exited ({st}); log tail:\n{}",
                    tail_lines(&self.log(), 40)
                );
            }
            if self.socket.exists()
                && let Ok(out) = self.ctr(&["version"], Duration::from_secs(5)).await
                && out.status.success()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "containerd not ready within {READY_TIMEOUT:?}; log tail:\n{}",
                    tail_lines(&self.log(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `crictl` (the kubelet's CRI calls) against this containerd; fails with
    /// its output unless it succeeded.
    pub async fn crictl(&self, args: &[&str]) -> Result<String> {
        let endpoint = format!("unix://{}", self.socket.display());
        let mut all = vec![
            "--runtime-endpoint".to_owned(),
            endpoint.clone(),
            "--image-endpoint".to_owned(),
            endpoint,
            "--timeout".to_owned(),
            "60s".to_owned(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let crictl = crate::tools::tool("crictl").display().to_string();
        let out = crate::process::run_with_timeout(&crictl, &all, Duration::from_secs(90)).await?;
        ensure_success(&format!("crictl {}", args.join(" ")), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The config.toml it was started with.
    pub fn config_file(&self) -> PathBuf {
        self.config_file.clone()
    }

    /// gRPC socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The private temp dir (root, state, config, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's own log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Runs `ctr --address SOCK -n test ARGS..` with a timeout; returns the output
    /// whatever the exit status.
    pub async fn ctr(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut full: Vec<String> = vec![
            "--address".into(),
            self.socket.display().to_string(),
            "--connect-timeout".into(),
            "5s".into(),
            "-n".into(),
            NAMESPACE.into(),
        ];
        full.extend(args.iter().map(|a| (*a).to_owned()));
        run_with_timeout(CTR, &full, timeout).await
    }

    /// Like [`Containerd::ctr`] but fails unless it exits 0; returns stdout.
    pub async fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args, CTR_TIMEOUT).await?;
        ensure_success(&format!("ctr {}", args.join(" ")), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr image pull --hosts-dir DIR --snapshotter native [--platform P] REF` (unpacks).
    /// Returns the output whatever the exit status; errors on timeout
    /// ([`Containerd::pull_timeout`]).
    pub async fn pull(
        &self,
        hosts_dir: &Path,
        image_ref: &str,
        platform: Option<&str>,
    ) -> Result<Output> {
        let mut extra = Vec::new();
        if let Some(p) = platform {
            extra.extend(["--platform", p]);
        }
        self.pull_with(hosts_dir, image_ref, &extra).await
    }

    /// [`Containerd::pull`] with extra `ctr image pull` flags (e.g. `--http-dump`,
    /// `--all-platforms`).
    pub async fn pull_with(
        &self,
        hosts_dir: &Path,
        image_ref: &str,
        extra_args: &[&str],
    ) -> Result<Output> {
        let hosts = hosts_dir.display().to_string();
        let mut args = vec![
            "image",
            "pull",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            "native",
        ];
        args.extend_from_slice(extra_args);
        args.push(image_ref);
        self.ctr(&args, self.pull_timeout).await
    }

    /// [`Containerd::pull`] that fails (with ctr's output) unless the pull succeeded.
    pub async fn pull_ok(
        &self,
        hosts_dir: &Path,
        image_ref: &str,
        platform: Option<&str>,
    ) -> Result<()> {
        let out = self.pull(hosts_dir, image_ref, platform).await?;
        ensure_success(&format!("ctr image pull {image_ref}"), &out)
    }

    /// `(ref, target digest)` of every image, from `ctr images ls`.
    pub async fn images(&self) -> Result<Vec<(String, String)>> {
        let text = self.ctr_ok(&["images", "ls"]).await?;
        Ok(text
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                let r = cols.next()?;
                let _type = cols.next()?;
                let digest = cols.next()?;
                Some((r.to_owned(), digest.to_owned()))
            })
            .collect())
    }

    /// Target digest (manifest or index) of `image_ref`, `None` if not present.
    pub async fn image_digest(&self, image_ref: &str) -> Result<Option<String>> {
        Ok(self
            .images()
            .await?
            .into_iter()
            .find(|(r, _)| r == image_ref)
            .map(|(_, d)| d))
    }

    /// Digests in the content store (`ctr content ls -q`), sorted.
    pub async fn content_digests(&self) -> Result<Vec<String>> {
        let text = self.ctr_ok(&["content", "ls", "-q"]).await?;
        let mut v: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        v.sort();
        Ok(v)
    }

    /// Removes every image (synchronous GC), then any leftover content and snapshots,
    /// so the next pull is cold.
    pub async fn remove_all_images(&self) -> Result<()> {
        let refs: Vec<String> = self.images().await?.into_iter().map(|(r, _)| r).collect();
        if !refs.is_empty() {
            let mut args = vec!["images", "rm", "--sync"];
            args.extend(refs.iter().map(String::as_str));
            self.ctr_ok(&args).await?;
        }
        let left = self.content_digests().await?;
        if !left.is_empty() {
            let mut args = vec!["content", "rm"];
            args.extend(left.iter().map(String::as_str));
            self.ctr_ok(&args).await?;
        }
        let snaps = self
            .ctr_ok(&["snapshots", "--snapshotter", "native", "ls"])
            .await?;
        // Children before parents: remove in reverse listing order, repeatedly.
        let mut keys: Vec<String> = snaps
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        for _ in 0..8 {
            if keys.is_empty() {
                break;
            }
            let mut still = Vec::new();
            for k in keys.into_iter().rev() {
                let out = self
                    .ctr(
                        &["snapshots", "--snapshotter", "native", "rm", &k],
                        CTR_TIMEOUT,
                    )
                    .await?;
                if !out.status.success() {
                    still.push(k);
                }
            }
            keys = still;
        }
        if !keys.is_empty() {
            bail!("could not remove snapshots {keys:?}");
        }
        let left = self.content_digests().await?;
        if !left.is_empty() {
            bail!("content left after remove_all_images: {left:?}");
        }
        Ok(())
    }

    /// Status column of `ctr plugins ls` for plugin `id` (e.g. `cri` -> `ok`).
    pub async fn plugin_status(&self, id: &str) -> Result<Option<String>> {
        let text = self.ctr_ok(&["plugins", "ls"]).await?;
        Ok(text.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // TYPE ID PLATFORMS STATUS (PLATFORMS may be "-")
            (cols.len() >= 4 && cols[1] == id).then(|| cols[cols.len() - 1].to_owned())
        }))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill_now();
        }
    }
}
