//! Issue 17: the node agent stays quiet when it cannot talk to the API
//! server. Before, with the server unreachable it burnt 8.5 CPU-s in 10 s and
//! wrote 312,540 log lines; with a token that got 403 it sent about 1,250
//! requests/s; with a deleted ServiceAccount's token (401) it wrote 1,643 log
//! lines in 6 s. Each case runs the agent as a real process for 10 s against
//! a real kube-apiserver and bounds its CPU time and log lines; then the 403
//! agent is granted access and must say once that it works again, and its
//! `/readyz` is true only once the node is configured.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use regmirror_e2e::util::{free_port, http_client, tail_lines, wait_until};
use regmirror_e2e::{AgentOptions, AgentProcess, ControlPlane};

/// How long each case runs.
const RUN: Duration = Duration::from_secs(10);
/// The issue's bounds for those 10 s.
const MAX_CPU: Duration = Duration::from_millis(200);
const MAX_LINES: usize = 50;

/// The agent for node-1, whose `/` is `root`; `extra` environment variables.
fn start_agent(kubeconfig: &Path, root: &Path, extra: &[(&str, &str)]) -> Result<AgentProcess> {
    AgentProcess::start_with_env(
        &AgentOptions {
            kubeconfig,
            node_name: "node-1",
            node_ip: "127.0.0.1",
            host_root: root,
            allowed_dirs: &["/etc/containerd"],
        },
        extra,
    )
}

/// The status code of the agent's `/readyz` at `addr`.
async fn readyz(addr: &str) -> Result<u16> {
    let r = http_client()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await?;
    Ok(r.status().as_u16())
}

/// Runs the agent for [`RUN`] with `kubeconfig`; returns the still running
/// agent and, when it used too much CPU or wrote too many lines, why.
async fn run_case(
    case: &str,
    kubeconfig: &Path,
    root: &Path,
    extra: &[(&str, &str)],
) -> Result<(AgentProcess, Option<String>)> {
    let mut agent = start_agent(kubeconfig, root, extra)?;
    tokio::time::sleep(RUN).await;
    ensure!(
        agent.is_running(),
        "{case}: the agent exited; log:\n{}",
        tail_lines(&agent.log(), 30)
    );
    let cpu = agent.cpu_time()?;
    let log = agent.log();
    let lines = log.lines().count();
    eprintln!("{case}: {cpu:?} CPU, {lines} log lines in {RUN:?}");
    let problem = (cpu >= MAX_CPU || lines >= MAX_LINES).then(|| {
        format!(
            "{case}: {cpu:?} CPU (limit {MAX_CPU:?}) and {lines} log lines (limit {MAX_LINES}) in {RUN:?}; log tail:\n{}",
            tail_lines(&log, 10)
        )
    });
    Ok((agent, problem))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_backs_off_and_stays_quiet_without_the_api_server() -> Result<()> {
    let cp = ControlPlane::start().await?;
    cp.install_crd().await?;
    // node-1's `/`, with containerd configured to read hosts.toml.
    let node_root = tempfile::tempdir()?;
    let node = node_root.path();
    let hosts = &node.join("etc/containerd/certs.d");
    std::fs::create_dir_all(hosts)?;
    std::fs::write(
        node.join("etc/containerd/config.toml"),
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n",
    )?;

    // (a) Nothing listens at the address (a port that was free a moment ago).
    let unreachable = cp.kubeconfig_with(
        "unreachable.kubeconfig",
        &format!("https://127.0.0.1:{}", free_port()),
        "anything",
    )?;
    let mut problems = Vec::new();
    let (mut a, problem) = run_case("unreachable", &unreachable, node, &[]).await?;
    a.stop(Duration::from_secs(5)).await?;
    problems.extend(problem);

    // (c) 401: a token the API server does not know (as after the
    // ServiceAccount was deleted).
    let garbage = cp.kubeconfig_with("garbage.kubeconfig", &cp.server, "not-a-token")?;
    let (mut c, problem) = run_case("401", &garbage, node, &[]).await?;
    c.stop(Duration::from_secs(5)).await?;
    problems.extend(problem);

    // (b) 403: a ServiceAccount without any RBAC.
    cp.kubectl_ok(&["create", "serviceaccount", "nobody", "-n", "default"])
        .await?;
    let token = cp
        .kubectl_ok(&["create", "token", "nobody", "-n", "default"])
        .await?;
    let forbidden = cp.kubeconfig_with("forbidden.kubeconfig", &cp.server, token.trim())?;
    // This one serves /readyz, as in the DaemonSet.
    let probe = format!("127.0.0.1:{}", free_port());
    let extra = [("REGMIRROR_PROBE_ADDR", probe.as_str())];
    let (b, problem) = run_case("403", &forbidden, node, &extra).await?;
    problems.extend(problem);
    ensure!(problems.is_empty(), "{}", problems.join("\n\n"));
    ensure!(readyz(&probe).await? == 503, "ready while forbidden");

    // Access granted: the agent says so once, within its backoff cap (30 s).
    cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "nobody-admin",
        "--clusterrole=cluster-admin",
        "--serviceaccount=default:nobody",
    ])
    .await?;
    wait_until(Duration::from_secs(45), || async {
        b.log().contains("watching the mirrors works again")
    })
    .await
    .with_context(|| format!("no recovery logged; log:\n{}", tail_lines(&b.log(), 30)))?;
    // Readable but no Node to configure: not ready.
    ensure!(readyz(&probe).await? == 503, "ready without its Node");

    // The mirror as the operator publishes it, then the Node: the agent
    // configures the node and only then is ready.
    cp.apply_ok("apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: hub\nspec:\n  upstreams: [{host: docker.io}]\n  storage: {size: 1Gi}\n")
        .await?;
    cp.kubectl_ok(&[
        "patch",
        "registrymirror",
        "hub",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"hosts":["docker.io"],"nodePort":30123}}"#,
    ])
    .await?;
    ensure!(readyz(&probe).await? == 503, "ready without its Node");
    cp.add_node("node-1").await?;
    wait_until(Duration::from_secs(45), || async {
        readyz(&probe).await.is_ok_and(|s| s == 200)
    })
    .await
    .with_context(|| format!("never ready; log:\n{}", tail_lines(&b.log(), 30)))?;
    assert!(hosts.join("docker.io/hosts.toml").exists());
    let recovered = b.log().matches("watching the mirrors works again").count();
    ensure!(recovered == 1, "recovery logged {recovered} times");
    Ok(())
}
