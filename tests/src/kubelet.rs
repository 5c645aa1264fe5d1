//! One real Kubernetes node on this machine: a kubelet (built by
//! `scripts/install-go-tools.sh` like the API server) registered against a
//! [`ControlPlane`], on a private containerd with the CRI plugin, runc and
//! the `cgroupfs` driver. Recipe and limits: `design/test-peers.md` (kubelet
//! section).
//!
//! What this node can and cannot do (so tests shape pods accordingly):
//! - Only `hostNetwork: true` pods run: the CNI config is loopback-only (the
//!   node turns Ready, the host's network is untouched). There is no
//!   kube-proxy and EndpointSlices refuse loopback addresses, so Services and
//!   NodePorts do not work.
//! - Pods must not dial the service CIDR (the kubelet sets
//!   `KUBERNETES_SERVICE_HOST` to its first address, which is not routed here
//!   and would leave the machine): give them [`RealNode::api_server_env`].
//!   No cluster DNS address is configured.
//! - Images come from loopback registries only: [`RealNode::image_registry`]
//!   holds the pause image and whatever the test pushes (see
//!   [`crate::images`]); other registries need a `hosts.toml` in
//!   [`RealNode::certs_dir`] with a loopback `server`.
//! - The kubelet writes a few host paths whatever its flags
//!   (`/var/lib/kubelet/device-plugins`, `/var/log/containers`,
//!   `/run/containerd/s`, the `/k8s.io` cgroups), so one node runs per
//!   machine: [`RealNode::start`] takes a machine-wide lock, and stopping
//!   removes the paths that were not there before.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::controlplane::{ControlPlane, tools_root};
use crate::images::pause_image;
use crate::process::ChildGuard;
use crate::util::{free_port, read_lossy, require_root, tail_lines};
use crate::{Containerd, Registry, write_hosts_toml};

/// The Node's name, also its `InternalIP` (a node name that is an IP address
/// becomes its address; `--node-ip=127.0.0.1` is refused as loopback).
/// Start the control plane with
/// `StartOptions { kubelet_node: Some(NODE_NAME.into()), .. }`.
pub const NODE_NAME: &str = "127.0.0.1";
/// The machine-wide lock file: one real node at a time.
pub const LOCK_PATH: &str = "/tmp/regmirror-e2e-real-node.lock";
/// Repository and tag of the pause image in [`RealNode::image_registry`].
pub const PAUSE_REPO: &str = "regmirror-e2e/pause";
const PAUSE_TAG: &str = "1";
const LOCK_TIMEOUT: Duration = Duration::from_secs(600);
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const POD_TIMEOUT: Duration = Duration::from_secs(90);
/// Container waiting reasons that end [`RealNode::wait_pod_phase`] early.
const POD_STUCK: [&str; 3] = ["ErrImagePull", "ImagePullBackOff", "CreateContainerError"];
/// Debian's containernetworking-plugins (the `loopback` plugin).
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The node's containerd configuration directory, under its temp dir.
const ETC_CONTAINERD: &str = "etc/containerd";
/// Host paths the kubelet and containerd create regardless of their flags,
/// deepest first; each is removed at stop unless it existed at start (then
/// only the entries that appeared are removed).
const HOST_PATHS: [&str; 5] = [
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/run/containerd/s",
    "/run/containerd",
];
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The cgroup containerd puts CRI containers in when the kubelet gives no
/// parent (`cgroupsPerQOS: false`): its namespace.
const CRI_CGROUP: &str = "k8s.io";

/// Inputs of [`kubelet_configuration`].
#[derive(Debug, Clone)]
pub struct KubeletPorts {
    /// Serving port (logs, exec) on 127.0.0.1; the API server reaches it at
    /// the Node's `InternalIP`.
    pub port: u16,
    /// `/healthz` port on 127.0.0.1.
    pub healthz_port: u16,
}

/// The KubeletConfiguration (v1beta1, YAML) for this machine: cgroup v1
/// allowed (`failCgroupV1: false`, 1.35 exits otherwise), `cgroupfs` without
/// QoS cgroups or node-allocatable enforcement (no systemd, no
/// CAP_SYS_RESOURCE), swap tolerated, everything bound to 127.0.0.1, no
/// read-only port, anonymous authentication with `AlwaysAllow` (only the
/// loopback API server dials it), pod logs in `pod_logs_dir`, CRI at
/// `socket`, and no eviction thresholds or image GC: the kubelet measures
/// the machine's shared disk, and a test machine's free space (often under
/// the default 10-15 %) is no reason to evict or refuse the test's pods. Rules: `design/test-peers.md`.
pub fn kubelet_configuration(ports: &KubeletPorts, pod_logs_dir: &Path, socket: &Path) -> String {
    let sock = format!("unix://{}", socket.display());
    format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1\n\
         kind: KubeletConfiguration\n\
         failCgroupV1: false\n\
         cgroupDriver: cgroupfs\n\
         cgroupsPerQOS: false\n\
         enforceNodeAllocatable: []\n\
         failSwapOn: false\n\
         address: 127.0.0.1\n\
         port: {}\n\
         healthzBindAddress: 127.0.0.1\n\
         healthzPort: {}\n\
         readOnlyPort: 0\n\
         authentication:\n  anonymous: {{enabled: true}}\n  webhook: {{enabled: false}}\n\
         authorization: {{mode: AlwaysAllow}}\n\
         podLogsDir: {}\n\
         containerRuntimeEndpoint: {sock}\n\
         imageServiceEndpoint: {sock}\n\
         serializeImagePulls: false\n\
         evictionHard: {{}}\n\
         evictionSoft: {{}}\n\
         imageGCHighThresholdPercent: 100\n\
         imageGCLowThresholdPercent: 99\n",
        ports.port,
        ports.healthz_port,
        pod_logs_dir.display(),
    )
}

/// containerd's CRI tables (config version 2) for a kubelet on this machine:
/// `sandbox_image` the harness's pause image, `restrict_oom_score_adj`
/// (without it every sandbox fails: runc cannot raise its OOM score without
/// CAP_SYS_RESOURCE), snapshotter `native`, runc v2 with a private `Root` and
/// `SystemdCgroup = false`, the loopback-only CNI config in `cni_conf_dir`
/// with the host's plugins, stream server on loopback, and
/// `registry.config_path = certs_dir`.
pub fn cri_configuration(
    sandbox_image: &str,
    runc_root: &Path,
    cni_conf_dir: &Path,
    certs_dir: &Path,
) -> String {
    let cri = "[plugins.\"io.containerd.grpc.v1.cri\"";
    format!(
        "{cri}]\n  sandbox_image = \"{sandbox_image}\"\n  restrict_oom_score_adj = true\n  \
         enable_selinux = false\n  disable_apparmor = true\n  \
         stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n\
         {cri}.containerd]\n  snapshotter = \"native\"\n  default_runtime_name = \"runc\"\n\
         {cri}.containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
         {cri}.containerd.runtimes.runc.options]\n  Root = \"{}\"\n  SystemdCgroup = false\n\
         {cri}.cni]\n  bin_dir = \"{CNI_BIN_DIR}\"\n  conf_dir = \"{}\"\n\
         {cri}.registry]\n  config_path = \"{}\"\n",
        runc_root.display(),
        cni_conf_dir.display(),
        certs_dir.display(),
    )
}

/// The only CNI network: the `loopback` plugin (containerd needs one config
/// to report the network ready; hostNetwork pods never use it).
pub const LOOPBACK_CNI: &str =
    r#"{"cniVersion":"0.4.0","name":"lo-only","plugins":[{"type":"loopback"}]}"#;

/// Mount points in `/proc/self/mountinfo` text at or under `dir`, deepest
/// first (the order `umount` needs). Mount points with spaces are escaped
/// (`\040`) in mountinfo and come back unescaped.
pub fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    found
}

/// Which host paths existed before the node started, and what they held.
#[derive(Debug)]
struct HostPaths {
    /// (path, entries before start: `None` when the path did not exist).
    paths: Vec<(PathBuf, Option<BTreeSet<PathBuf>>)>,
    /// Top-level cgroups of every hierarchy before start.
    cgroups: BTreeSet<PathBuf>,
}

fn entries(dir: &Path) -> Option<BTreeSet<PathBuf>> {
    let rd = std::fs::read_dir(dir).ok()?;
    Some(rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
}

/// Every `/sys/fs/cgroup/<hierarchy>/<top-level cgroup>` directory.
fn top_cgroups() -> BTreeSet<PathBuf> {
    let mut all = BTreeSet::new();
    for h in entries(Path::new(CGROUP_ROOT)).unwrap_or_default() {
        for c in entries(&h).unwrap_or_default() {
            if c.is_dir() {
                all.insert(c);
            }
        }
    }
    all
}

impl HostPaths {
    fn snapshot() -> Self {
        Self {
            paths: HOST_PATHS
                .iter()
                .map(|p| (PathBuf::from(p), entries(Path::new(p))))
                .collect(),
            cgroups: top_cgroups(),
        }
    }

    /// Cgroups that appeared since the snapshot.
    /// The host paths that did not exist at the snapshot.
    fn absent(&self) -> Vec<PathBuf> {
        self.paths
            .iter()
            .filter(|(_, before)| before.is_none())
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn new_cgroups(&self) -> Vec<PathBuf> {
        top_cgroups()
            .into_iter()
            .filter(|c| !self.cgroups.contains(c))
            .collect()
    }

    /// Removes what appeared since the snapshot; returns what could not be removed.
    fn remove_new(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (path, before) in &self.paths {
            let result = match before {
                None if path.exists() => std::fs::remove_dir_all(path),
                None => Ok(()),
                Some(before) => entries(path)
                    .unwrap_or_default()
                    .difference(before)
                    .try_for_each(|e| {
                        if e.is_dir() && !e.is_symlink() {
                            std::fs::remove_dir_all(e)
                        } else {
                            std::fs::remove_file(e)
                        }
                    }),
            };
            if let Err(e) = result {
                problems.push(format!("remove {}: {e}", path.display()));
            }
        }
        for c in self.new_cgroups() {
            if let Err(e) = remove_cgroup_tree(&c) {
                problems.push(format!("remove cgroup {}: {e}", c.display()));
            }
        }
        problems
    }
}

/// Removes a cgroup and its children (children first: `rmdir` is the only
/// way, and only for cgroups without processes).
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            remove_cgroup_tree(&p)?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Process ids in `dir/cgroup.procs` and in every child cgroup's.
fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = read_lossy(&dir.join("cgroup.procs"))
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for c in entries(dir).unwrap_or_default() {
        if c.is_dir() {
            pids.extend(cgroup_pids(&c));
        }
    }
    pids
}

/// Processes whose command line has `arg` as one argument (the shims of one
/// containerd carry `-address SOCKET`).
fn pids_with_arg(arg: &str) -> Vec<u32> {
    entries(Path::new("/proc"))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let pid: u32 = p.file_name()?.to_str()?.parse().ok()?;
            let cmdline = std::fs::read(p.join("cmdline")).ok()?;
            cmdline
                .split(|b| *b == 0)
                .any(|a| a == arg.as_bytes())
                .then_some(pid)
        })
        .collect()
}

/// The `-address` argument of a containerd shim's command line (NUL-separated
/// `/proc/PID/cmdline` split into arguments).
pub fn shim_address<'a>(args: &[&'a str]) -> Option<&'a str> {
    let i = args.iter().position(|a| *a == "-address")?;
    args.get(i + 1).copied()
}

/// The parent pid in `/proc/PID/stat` text (`pid (comm) state ppid ...`;
/// `comm` may hold spaces and parentheses, so fields count from the last `)`).
pub fn parent_pid(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every process below `root` (children, grandchildren, ...).
fn descendants(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = entries(Path::new("/proc"))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let pid = p.file_name()?.to_str()?.parse().ok()?;
            Some((pid, parent_pid(&read_lossy(&p.join("stat")))?))
        })
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// What a real node whose test process died (SIGKILL, a timeout) leaves
/// running: the kubelet and containerd die with it (`--pdeathsig`), but
/// containerd's shims and their containers do not. Kills, by PID, each shim
/// whose `-address` is a harness containerd socket (`regmirror-ctrd-`) where
/// nothing listens any more, and every process below it; then removes the CRI
/// cgroups that are empty (`rmdir` refuses the others). Run under the lock.
fn reap_crashed_runs() {
    for p in entries(Path::new("/proc")).unwrap_or_default() {
        let Some(pid) = p.file_name().and_then(|n| n.to_str()?.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = read_lossy(&p.join("cmdline"));
        let args: Vec<&str> = cmdline.split('\0').collect();
        // The socket file outlives a killed containerd: ask whether anyone listens.
        let stale = shim_address(&args).is_some_and(|a| {
            a.contains("/regmirror-ctrd-") && std::os::unix::net::UnixStream::connect(a).is_err()
        });
        if stale {
            let mut pids = descendants(pid);
            pids.push(pid);
            kill_pids(&pids);
            wait_gone(&pids, Duration::from_secs(5));
        }
    }
    for h in entries(Path::new(CGROUP_ROOT)).unwrap_or_default() {
        let cri = h.join(CRI_CGROUP);
        if cri.is_dir() {
            let _ = remove_cgroup_tree(&cri);
        }
    }
}

/// Waits (at most `timeout`) until none of `pids` is alive: gone from
/// `/proc`, or a zombie (out of its cgroups already).
fn wait_gone(pids: &[u32], timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    let alive = |pid: &u32| {
        let stat = read_lossy(&Path::new("/proc").join(pid.to_string()).join("stat"));
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.split_whitespace().next() != Some("Z"))
    };
    while pids.iter().any(alive) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_pids(pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// What a running node leaves in the lock file so that the next start can
/// clean up after a test process that died before stopping it: the host
/// paths that did not exist before it started (`absent PATH` lines) and its
/// private directories (`dir PATH` lines: mounts under them are unmounted,
/// then they are removed). Empty after a clean stop.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CrashRecord {
    pub absent: Vec<PathBuf>,
    pub dirs: Vec<PathBuf>,
}

impl CrashRecord {
    /// The lock file's text for this record.
    pub fn to_text(&self) -> String {
        let lines = |kind: &str, ps: &[PathBuf]| {
            ps.iter()
                .map(|p| format!("{kind} {}\n", p.display()))
                .collect::<String>()
        };
        lines("absent", &self.absent) + &lines("dir", &self.dirs)
    }

    /// Parses [`CrashRecord::to_text`]; other lines are ignored, and only
    /// absolute paths are taken.
    pub fn parse(text: &str) -> Self {
        let mut r = Self::default();
        for line in text.lines() {
            let (kind, path) = line.split_once(' ').unwrap_or((line, ""));
            if !path.starts_with('/') {
                continue;
            }
            match kind {
                "absent" => r.absent.push(PathBuf::from(path)),
                "dir" => r.dirs.push(PathBuf::from(path)),
                _ => {}
            }
        }
        r
    }

    /// Undoes what a crashed node left (after [`reap_crashed_runs`] stopped
    /// its processes): lazily unmounts everything under its dirs, removes
    /// them and the host paths that were absent before it.
    fn clean_up(&self) {
        let mountinfo = read_lossy(Path::new("/proc/self/mountinfo"));
        for d in &self.dirs {
            unmount_under(&mountinfo, d);
            let _ = std::fs::remove_dir_all(d);
        }
        for p in &self.absent {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// `umount -l` of every mount at or under `dir` (deepest first); returns the
/// mount points that could not be unmounted.
fn unmount_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    mounts_under(mountinfo, dir)
        .into_iter()
        .filter(|m| {
            !Command::new("umount")
                .arg("-l")
                .arg(m)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect()
}

/// Holds [`LOCK_PATH`] (an exclusive `flock`) until dropped; its content is
/// the holder's [`CrashRecord`].
#[derive(Debug)]
struct MachineLock {
    file: File,
}

impl MachineLock {
    /// The record the previous holder left (empty after a clean stop).
    fn record(&self) -> CrashRecord {
        CrashRecord::parse(&read_lossy(Path::new(LOCK_PATH)))
    }

    /// Replaces the record (an empty one after a clean stop).
    fn write_record(&mut self, record: &CrashRecord) -> std::io::Result<()> {
        use std::io::{Seek, Write};
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(record.to_text().as_bytes())?;
        self.file.sync_data()
    }

    async fn acquire(timeout: Duration) -> Result<Self> {
        // Not truncated on open: the holder's record must survive a waiter.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(LOCK_PATH)
            .with_context(|| format!("open {LOCK_PATH}"))?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { file }),
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => bail!("lock {LOCK_PATH}: {e}"),
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("another real node holds {LOCK_PATH} for more than {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The kubelet binary from the tools cache; fails (never skips) when it is
/// missing, saying how to build it.
pub fn kubelet_binary() -> Result<PathBuf> {
    let p = tools_root().join("bin/kubelet");
    if !p.is_file() {
        bail!(
            "{} is missing: run scripts/install-go-tools.sh (make test does)",
            p.display()
        );
    }
    Ok(p)
}

/// A running real node; see the module docs. Stop it with
/// [`RealNode::stop`] to learn about leftovers; dropping it cleans up the
/// same way and ignores them.
pub struct RealNode {
    kubelet: Option<ChildGuard>,
    containerd: Option<Containerd>,
    images: Registry,
    host_paths: HostPaths,
    api_port: u16,
    kubelet_port: u16,
    pause_image: String,
    dir: Option<TempDir>,
    lock: Option<MachineLock>,
}

impl RealNode {
    /// Starts containerd and a kubelet registered as [`NODE_NAME`] against
    /// `cp` (started with `StartOptions::kubelet_node`), with a fresh
    /// loopback registry holding the pause image the harness builds, and
    /// waits until the Node is `Ready` (about 1-2 s after the kubelet
    /// starts). Waits at most 10 minutes for another node on this machine to
    /// stop. Needs root. Errors with the kubelet's log tail when it exits or
    /// the Node is not Ready within 90 s.
    pub async fn start(cp: &ControlPlane) -> Result<Self> {
        require_root("a real node (kubelet, containerd)");
        let kubelet_bin = kubelet_binary()?;
        let node_kubeconfig = cp.node_kubeconfig()?;
        let mut lock = MachineLock::acquire(LOCK_TIMEOUT).await?;
        reap_crashed_runs();
        lock.record().clean_up();
        let host_paths = HostPaths::snapshot();
        let images = Registry::start().await?;
        pause_image()?
            .push(&images.url(), PAUSE_REPO, PAUSE_TAG)
            .await
            .context("push the pause image")?;
        let pause_image = format!("{}/{PAUSE_REPO}:{PAUSE_TAG}", images.host());
        let dir = tempfile::Builder::new()
            .prefix("regmirror-node-")
            .tempdir()?;
        let d = dir.path().to_path_buf();
        // The node's containerd configuration apart from everything else,
        // as /etc/containerd is: what a node agent mounts.
        let certs = d.join(ETC_CONTAINERD).join("certs.d");
        write_hosts_toml(&certs, &images.host(), &images.url(), &images.url())?;
        let api_port = cp
            .server
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("API server port")?;
        let mut record = CrashRecord {
            absent: host_paths.absent(),
            dirs: vec![d.clone()],
        };
        lock.write_record(&record)?;
        let mut node = Self {
            kubelet: None,
            containerd: None,
            images,
            host_paths,
            api_port,
            kubelet_port: free_port(),
            pause_image: pause_image.clone(),
            dir: Some(dir),
            lock: Some(lock),
        };
        let (runc_root, cni_conf) = (d.join("runc"), d.join("cni-conf"));
        std::fs::create_dir_all(&cni_conf)?;
        std::fs::write(cni_conf.join("10-lo-only.conflist"), LOOPBACK_CNI)?;
        let cri = cri_configuration(&pause_image, &runc_root, &cni_conf, &certs);
        node.containerd = Some(
            Containerd::start_with_imports_at(Some(&d.join(ETC_CONTAINERD)), |cd| {
                let file = cd.join("cri.toml").display().to_string();
                Ok((vec![file], vec![("cri.toml".to_owned(), cri)]))
            })
            .await?,
        );
        record.dirs.push(node.containerd().dir().to_path_buf());
        if let Some(lock) = node.lock.as_mut() {
            lock.write_record(&record)?;
        }
        let socket = node.containerd().socket().to_path_buf();
        let ports = KubeletPorts {
            port: node.kubelet_port,
            healthz_port: free_port(),
        };
        let config = d.join("kubelet.yaml");
        std::fs::create_dir_all(d.join("pod-logs"))?;
        std::fs::write(
            &config,
            kubelet_configuration(&ports, &d.join("pod-logs"), &socket),
        )?;
        let s = |p: &Path| p.display().to_string();
        node.kubelet = Some(ChildGuard::spawn(
            "kubelet",
            &kubelet_bin,
            &[
                format!("--config={}", s(&config)),
                format!("--kubeconfig={}", s(&node_kubeconfig)),
                format!("--root-dir={}", s(&d.join("kubelet"))),
                format!("--cert-dir={}", s(&d.join("kubelet-pki"))),
                format!("--hostname-override={NODE_NAME}"),
            ],
            &[],
            &[],
            &d.join("kubelet.log"),
        )?);
        node.wait_ready(cp).await?;
        Ok(node)
    }

    async fn wait_ready(&mut self, cp: &ControlPlane) -> Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(st) = self.kubelet.as_mut().and_then(ChildGuard::exited) {
                bail!(
                    "kubelet exited ({st}); log tail:\n{}",
                    tail_lines(&self.kubelet_log(), 40)
                );
            }
            let node = cp.get_json(&["node", NODE_NAME]).await?;
            let ready = node.as_ref().is_some_and(|n| {
                n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            if ready {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "node {NODE_NAME} not Ready within {READY_TIMEOUT:?}: {}\nkubelet log tail:\n{}\ncontainerd log tail:\n{}",
                    node.map(|n| n["status"]["conditions"].to_string())
                        .unwrap_or_else(|| "not registered".into()),
                    tail_lines(&self.kubelet_log(), 30),
                    tail_lines(&self.containerd().log(), 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The Node's name ([`NODE_NAME`]).
    pub fn name(&self) -> &'static str {
        NODE_NAME
    }

    /// containerd's `registry.config_path`: `<host>/hosts.toml` files here
    /// decide where the node pulls from; in
    /// [`RealNode::containerd_config_dir`].
    pub fn certs_dir(&self) -> PathBuf {
        self.containerd_config_dir().join("certs.d")
    }

    /// This node's `/etc/containerd`: config.toml (importing cri.toml) and
    /// certs.d, and nothing else (no daemon state, no mounts).
    pub fn containerd_config_dir(&self) -> PathBuf {
        self.dir().join(ETC_CONTAINERD)
    }

    /// The node's private directory (kubelet root, configs, logs, certs.d).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("node running").path()
    }

    /// The loopback registry the node pulls the pause image from; tests push
    /// their own images (e.g. [`crate::images::BinaryImage`]) here and name
    /// them `{host}/{repo}:{tag}`.
    pub fn image_registry(&self) -> &Registry {
        &self.images
    }

    /// The pause (sandbox) image reference containerd uses.
    pub fn pause_image(&self) -> &str {
        &self.pause_image
    }

    /// The node's containerd (CRI on, namespace `k8s.io` for pods; use
    /// [`Containerd::crictl`]).
    pub fn containerd(&self) -> &Containerd {
        self.containerd.as_ref().expect("node running")
    }

    /// The kubelet's serving port on 127.0.0.1 (logs, exec).
    pub fn kubelet_port(&self) -> u16 {
        self.kubelet_port
    }

    /// A `local` PersistentVolume of `capacity` (e.g. `1Gi`) in
    /// `storage_class`, `ReadWriteOnce`, `Retain`, pinned to this node,
    /// backed by a fresh directory under the node's dir (removed at stop).
    /// The directory is root's with mode 0755, as a real disk's mount point
    /// would be: only a pod `fsGroup` (which the kubelet applies to local
    /// volumes, unlike hostPath ones) lets a non-root pod write to it. A PVC
    /// naming `storage_class` binds to it (no StorageClass object needed).
    /// Returns the directory.
    pub async fn local_pv(
        &self,
        cp: &ControlPlane,
        name: &str,
        storage_class: &str,
        capacity: &str,
    ) -> Result<PathBuf> {
        let dir = self.dir().join("volumes").join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let pv = serde_json::json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": capacity},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": storage_class,
                "local": {"path": dir.display().to_string()},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}
                ]}]}},
            }
        });
        cp.apply_ok(&pv.to_string()).await?;
        Ok(dir)
    }

    /// A Pod manifest (JSON) for this node: `hostNetwork` (the only kind
    /// that runs here), `restartPolicy: Never`, a 1 s grace period, and one
    /// container `main` running `image` with `args` and
    /// [`RealNode::api_server_env`] as its environment. Callers add what else
    /// they need (volumes, securityContext) before applying it.
    pub fn host_network_pod(
        &self,
        namespace: &str,
        name: &str,
        image: &str,
        args: &[&str],
    ) -> serde_json::Value {
        let env: Vec<serde_json::Value> = self
            .api_server_env()
            .iter()
            .map(|(k, v)| serde_json::json!({"name": k, "value": v}))
            .collect();
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "hostNetwork": true,
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": image, "args": args, "env": env}],
            }
        })
    }

    /// Waits (at most 90 s) until pod `namespace/name` reaches `phase`
    /// (`Running`, `Succeeded`, ...) and returns its `status`. Fails early
    /// when it cannot get there (`Failed`, or a container waiting on
    /// `ErrImagePull`, `ImagePullBackOff` or `CreateContainerError`), with
    /// the pod's status and the kubelet's log tail.
    pub async fn wait_pod_phase(
        &self,
        cp: &ControlPlane,
        namespace: &str,
        name: &str,
        phase: &str,
    ) -> Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
        loop {
            let pod = cp.get_json(&["pod", name, "-n", namespace]).await?;
            let status = pod.map(|p| p["status"].clone()).unwrap_or_default();
            let now = status["phase"].as_str().unwrap_or("");
            if now == phase {
                return Ok(status);
            }
            let waiting = status["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["state"]["waiting"]["reason"].as_str())
                .find(|r| POD_STUCK.contains(r));
            if (now == "Failed" && phase != "Failed")
                || waiting.is_some()
                || tokio::time::Instant::now() >= deadline
            {
                bail!(
                    "pod {namespace}/{name} is {now:?}, not {phase}: {status:#}\nkubelet log tail:\n{}",
                    tail_lines(&self.kubelet_log(), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The kubelet's log so far.
    pub fn kubelet_log(&self) -> String {
        read_lossy(&self.dir().join("kubelet.log"))
    }

    /// The environment every pod on this node needs so that in-cluster
    /// clients dial the loopback API server, never the service CIDR:
    /// `[(KUBERNETES_SERVICE_HOST, 127.0.0.1), (KUBERNETES_SERVICE_PORT, PORT)]`.
    /// (An explicit container `env` entry wins over the kubelet's.)
    pub fn api_server_env(&self) -> [(String, String); 2] {
        [
            ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
            ("KUBERNETES_SERVICE_PORT".into(), self.api_port.to_string()),
        ]
    }

    /// Stops everything by PID and removes the host paths the kubelet and
    /// containerd created: the kubelet; every pod sandbox through CRI
    /// (`crictl rmp --all --force`, which stops their containers); any
    /// process left in the CRI cgroups and this containerd's shims;
    /// mounts under the node's and containerd's directories; containerd;
    /// then the paths and cgroups that appeared since start. Errors listing
    /// whatever could not be stopped or removed (the rest is still done).
    pub async fn stop(mut self) -> Result<()> {
        let problems = self.shutdown();
        if !problems.is_empty() {
            bail!("real node cleanup left: {}", problems.join("; "));
        }
        Ok(())
    }

    /// The cleanup of [`RealNode::stop`]; returns what it could not do.
    /// Synchronous (run from `Drop` too).
    fn shutdown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(mut lock) = self.lock.take() else {
            return problems;
        };
        if let Some(mut k) = self.kubelet.take() {
            k.kill_now();
        }
        if let Some(ctrd) = self.containerd.take() {
            let endpoint = format!("unix://{}", ctrd.socket().display());
            let crictl = tools_root().join("bin/crictl");
            let out = Command::new("timeout")
                .args(["60", &crictl.display().to_string()])
                .args(["--runtime-endpoint", &endpoint, "--timeout", "30s"])
                .args(["rmp", "--all", "--force"])
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => problems.push(format!(
                    "crictl rmp: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => problems.push(format!("crictl rmp: {e}")),
            }
            let cri_cgroups: Vec<PathBuf> = self
                .host_paths
                .new_cgroups()
                .into_iter()
                .filter(|c| c.file_name().is_some_and(|n| n == CRI_CGROUP))
                .collect();
            let left: Vec<u32> = cri_cgroups.iter().flat_map(|c| cgroup_pids(c)).collect();
            if !left.is_empty() {
                problems.push(format!("processes left in pod cgroups: {left:?}"));
                kill_pids(&left);
            }
            kill_pids(&pids_with_arg(&ctrd.socket().display().to_string()));
            let mountinfo = read_lossy(Path::new("/proc/self/mountinfo"));
            let mut roots = vec![ctrd.dir().to_path_buf()];
            roots.extend(self.dir.as_ref().map(|d| d.path().to_path_buf()));
            for root in roots {
                for m in unmount_under(&mountinfo, &root) {
                    problems.push(format!("umount {}", m.display()));
                }
            }
            drop(ctrd);
        }
        problems.extend(self.host_paths.remove_new());
        if let Some(dir) = self.dir.take()
            && let Err(e) = dir.close()
        {
            problems.push(format!("remove the node dir: {e}"));
        }
        if problems.is_empty()
            && let Err(e) = lock.write_record(&CrashRecord::default())
        {
            problems.push(format!("clear {LOCK_PATH}: {e}"));
        }
        drop(lock);
        problems
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_under_a_dir_come_deepest_first_and_unescaped() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
            100 22 0:50 / /tmp/n/kubelet/pods/u/volumes/kubernetes.io~projected/kube-api-access-x rw - tmpfs tmpfs rw\n\
            101 22 0:51 / /tmp/n/ctrd/state/sandboxes/1/shm rw - tmpfs shm rw\n\
            102 22 0:52 / /tmp/n/a\\040b rw - tmpfs tmpfs rw\n\
            103 22 0:53 / /tmp/nx rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mounts_under(info, Path::new("/tmp/n")),
            [
                "/tmp/n/kubelet/pods/u/volumes/kubernetes.io~projected/kube-api-access-x",
                "/tmp/n/ctrd/state/sandboxes/1/shm",
                "/tmp/n/a b",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn a_crash_record_round_trips_through_the_lock_file_text() {
        let r = CrashRecord {
            absent: vec!["/var/lib/kubelet".into(), "/run/containerd".into()],
            dirs: vec!["/tmp/regmirror-node-a b".into()],
        };
        assert_eq!(CrashRecord::parse(&r.to_text()), r);
        assert_eq!(CrashRecord::parse(""), CrashRecord::default());
        assert_eq!(
            CrashRecord::parse("absent relative\nother /x\n"),
            CrashRecord::default()
        );
    }

    #[test]
    fn shim_address_and_parent_pid_come_from_proc_text() {
        let args = [
            "/usr/bin/containerd-shim-runc-v2",
            "-namespace",
            "k8s.io",
            "-address",
            "/tmp/regmirror-ctrd-x/sock",
            "-id",
            "abc",
        ];
        assert_eq!(shim_address(&args), Some("/tmp/regmirror-ctrd-x/sock"));
        assert_eq!(shim_address(&["sleep", "infinity"]), None);
        assert_eq!(parent_pid("42 (a) b) c) S 17 42 42 0"), Some(17));
        assert_eq!(parent_pid("42 (sleep) S 1 42"), Some(1));
    }

    #[test]
    fn kubelet_configuration_keeps_everything_on_loopback_and_cgroupfs() {
        let text = kubelet_configuration(
            &KubeletPorts {
                port: 41000,
                healthz_port: 41001,
            },
            Path::new("/tmp/n/pod-logs"),
            Path::new("/tmp/c/sock"),
        );
        let v: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(v["kind"], "KubeletConfiguration");
        assert_eq!(v["failCgroupV1"], false);
        assert_eq!(v["cgroupDriver"], "cgroupfs");
        assert_eq!(v["cgroupsPerQOS"], false);
        assert_eq!(v["address"], "127.0.0.1");
        assert_eq!(v["healthzBindAddress"], "127.0.0.1");
        assert_eq!(v["port"], 41000);
        assert_eq!(v["readOnlyPort"], 0);
        assert_eq!(v["authorization"]["mode"], "AlwaysAllow");
        assert_eq!(v["containerRuntimeEndpoint"], "unix:///tmp/c/sock");
        assert_eq!(v["podLogsDir"], "/tmp/n/pod-logs");
        assert_eq!(v["enforceNodeAllocatable"], serde_json::json!([]));
        assert_eq!(v["evictionHard"], serde_json::json!({}));
        assert_eq!(v["imageGCHighThresholdPercent"], 100);
    }

    #[test]
    fn cri_configuration_is_toml_with_the_settings_this_machine_needs() {
        let text = cri_configuration(
            "127.0.0.1:5001/pause:1",
            Path::new("/tmp/n/runc"),
            Path::new("/tmp/n/cni"),
            Path::new("/tmp/n/certs.d"),
        );
        let v: toml::Value = toml::from_str(&text).unwrap();
        let cri = &v["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(
            cri["sandbox_image"].as_str(),
            Some("127.0.0.1:5001/pause:1")
        );
        assert_eq!(cri["restrict_oom_score_adj"].as_bool(), Some(true));
        let runc = &cri["containerd"]["runtimes"]["runc"];
        assert_eq!(runc["options"]["SystemdCgroup"].as_bool(), Some(false));
        assert_eq!(runc["options"]["Root"].as_str(), Some("/tmp/n/runc"));
        assert_eq!(cri["cni"]["bin_dir"].as_str(), Some(CNI_BIN_DIR));
        assert_eq!(
            cri["registry"]["config_path"].as_str(),
            Some("/tmp/n/certs.d")
        );
    }
}
