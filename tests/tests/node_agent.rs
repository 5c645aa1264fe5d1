//! The whole path on one machine: a RegistryMirror on a real control plane,
//! the operator publishing hosts and NodePort, the node agent writing
//! hosts.toml for a (kwok) node, and a real containerd pulling docker.io
//! images through a real cache over the CRI, as the kubelet does. Then the
//! agent repairs wiped files, survives restarts, the runtime falls back to
//! the upstream when the cache is down, and deletion removes exactly the
//! agent's files before the finalizer lets go.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use regmirror_e2e::seed::{self, ImageSpec};
use regmirror_e2e::util::{tail_lines, wait_until};
use regmirror_e2e::{
    AgentOptions, AgentProcess, CacheProcess, Containerd, ControlPlane, OperatorProcess, Registry,
    RequestLog,
};
use serde_json::Value;

const NS: &str = "regmirror-system";
const WAIT: Duration = Duration::from_secs(60);

/// A port in the NodePort range that is free on 127.0.0.1 right now.
fn free_node_port() -> u16 {
    (0..200)
        .map(|i| 30000 + ((std::process::id() as u16).wrapping_mul(7) + i * 13) % 2700)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port in 30000-32699")
}

async fn mirror(cp: &ControlPlane) -> Result<Option<Value>> {
    cp.get_json(&["registrymirror", "hub"]).await
}

/// Waits until the mirror (`None` once gone) passes `check`, as
/// [`OperatorProcess::wait_for`] does; fails with the mirror, the operator's
/// log and the agent's log.
async fn wait_mirror(
    cp: &ControlPlane,
    agent: &AgentProcess,
    op: &mut OperatorProcess,
    what: &str,
    check: impl Fn(Option<&Value>) -> bool,
) -> Result<()> {
    op.wait_for(cp, what, &["registrymirror", "hub"], |m| {
        check(m).then_some(())
    })
    .await
    .with_context(|| format!("agent log:\n{}", tail_lines(&agent.log(), 20)))
}

fn node_entry<'a>(m: Option<&'a Value>, node: &str) -> Option<&'a Value> {
    m?["status"]["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == node)
}

fn condition_true(m: Option<&Value>, type_: &str) -> bool {
    m.and_then(|m| m["status"]["conditions"].as_array())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == type_ && c["status"] == "True")
        })
}

/// The agent for node-1 run on this machine (`/` is the node's root), allowed
/// the test's hosts directory and containerd's config directory.
fn agent_options<'a>(cp: &'a ControlPlane, allowed: &'a [&'a str]) -> AgentOptions<'a> {
    AgentOptions {
        kubeconfig: &cp.kubeconfig,
        node_name: "node-1",
        node_ip: "127.0.0.1",
        host_root: Path::new("/"),
        allowed_dirs: allowed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_agent_points_containerd_at_the_cache_and_cleans_up() -> Result<()> {
    // Real peers: upstream registry, cache on the mirror's fixed NodePort, containerd (CRI).
    let reg = Registry::start().await?;
    let image = seed::push_image(
        &reg.url(),
        "library/app",
        "v1",
        &ImageSpec::docker(&[1_500_000, 20_000]),
    )
    .await?;
    let node_port = free_node_port();
    let mut cache = CacheProcess::start([
        "--listen".to_owned(),
        format!("127.0.0.1:{node_port}"),
        "--upstream".to_owned(),
        format!("docker.io={}", reg.url()),
    ])
    .await?;
    let certs_dir = tempfile::tempdir()?;
    let certs = certs_dir.path();
    let user_file = certs.join("quay.io/hosts.toml");
    std::fs::create_dir_all(user_file.parent().unwrap())?;
    std::fs::write(&user_file, "server = \"https://quay.io\"\n")?;
    let ctrd = Containerd::start_with_cri(certs).await?;
    let ctrd_config = ctrd.config_file();
    let (certs_str, config_dir) = (
        certs.display().to_string(),
        ctrd_config.parent().unwrap().display().to_string(),
    );
    let allowed = [certs_str.as_str(), config_dir.as_str()];

    // The control plane, the CRD and the operator.
    let cp = ControlPlane::start().await?;
    cp.add_node("node-1").await?;
    cp.kubectl_ok(&["create", "namespace", NS]).await?;
    cp.kubectl_ok(&["create", "serviceaccount", "regmirror-agent", "-n", NS])
        .await?;
    cp.install_crd().await?;
    cp.apply_ok("apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: agent-pv\nspec:\n  capacity: {storage: 1Gi}\n  accessModes: [ReadWriteOnce]\n  hostPath: {path: /tmp/agent-pv}\n").await?;
    // The installer lets agents use exactly these directories.
    let host_dirs = allowed.join(",");
    let mut op = OperatorProcess::start(
        &cp.kubeconfig,
        NS,
        "op-1",
        &["--agent-host-dirs", &host_dirs],
    )?;
    cp.apply_ok(&format!(
        "apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: hub\nspec:\n  upstreams: [{{host: docker.io, url: '{}'}}]\n  storage: {{size: 1Gi}}\n  cache: {{nodePort: {node_port}}}\n  nodes: {{containerdConfigDir: '{}', containerdConfigFile: '{}'}}\n",
        reg.url(),
        certs.display(),
        ctrd_config.display()
    ))
    .await?;

    // The agent configures node-1 and reports it; the operator counts it.
    let mut agent = AgentProcess::start(&agent_options(&cp, &allowed))?;
    wait_mirror(&cp, &agent, &mut op, "node-1 Configured", |m| {
        node_entry(m, "node-1").is_some_and(|n| n["state"] == "Configured")
            && condition_true(m, "NodesConfigured")
    })
    .await?;
    let hosts_toml = std::fs::read_to_string(certs.join("docker.io/hosts.toml"))?;
    assert!(
        hosts_toml.contains(&format!("[host.\"http://127.0.0.1:{node_port}\"]")),
        "{hosts_toml}"
    );
    assert!(hosts_toml.contains(&format!("server = \"{}\"", reg.url())));

    // The kubelet's path: a CRI pull of a short docker.io name goes through the cache.
    ctrd.crictl(&["pull", "app:v1"]).await?;
    let listed = ctrd.crictl(&["images", "--digests"]).await?;
    assert!(
        listed.contains(&image.digest.trim_start_matches("sha256:")[..13]),
        "{listed}"
    );
    assert!(cache.served_bytes().await? >= image.layers[0].size() as f64);

    // Something wipes the file: the agent writes it again.
    std::fs::remove_dir_all(certs.join("docker.io"))?;
    wait_until(Duration::from_secs(15), || async {
        certs.join("docker.io/hosts.toml").exists()
    })
    .await
    .context("wiped hosts.toml not restored")?;

    // An agent restart (a rolling update) leaves the node configured.
    agent.stop(Duration::from_secs(10)).await?;
    assert!(certs.join("docker.io/hosts.toml").exists());

    // Cache down: containerd falls back to the upstream named as `server`.
    cache.stop().await?;
    ctrd.crictl(&["rmi", "docker.io/library/app:v1"]).await?;
    let before = reg.count("GET", &image.layers[0].digest);
    ctrd.crictl(&["pull", "app:v1"]).await?;
    assert_eq!(reg.count("GET", &image.layers[0].digest), before + 1);

    // Deletion: the finalizer holds the mirror while the node still has its
    // files (no agent running), and lets go once the agent removed them.
    cp.kubectl_ok(&["delete", "registrymirror", "hub", "--wait=false"])
        .await?;
    wait_until(WAIT, || async {
        op.log()
            .contains("waiting for node agents to remove their configuration from node-1")
    })
    .await
    .context("the operator never held the deletion for node-1's files")?;
    let held = mirror(&cp)
        .await?
        .context("mirror deleted before its node was cleaned")?;
    assert!(held["metadata"]["deletionTimestamp"].is_string());
    assert!(certs.join("docker.io/hosts.toml").exists());
    let agent = AgentProcess::start(&agent_options(&cp, &allowed))?;
    wait_mirror(&cp, &agent, &mut op, "hub deleted", |m| m.is_none()).await?;
    assert!(!certs.join("docker.io").exists(), "agent files left behind");
    assert_eq!(
        std::fs::read_to_string(&user_file)?,
        "server = \"https://quay.io\"\n"
    );
    Ok(())
}
