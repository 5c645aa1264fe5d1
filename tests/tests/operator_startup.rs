//! The operator before it can reconcile (issue 18): on a real control plane
//! without the RegistryMirror CRD it says so at error level, fails /readyz,
//! ends promptly on SIGTERM, and starts reconciling once the CRD is
//! installed; with the API server unreachable SIGTERM ends it promptly too.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use regmirror_e2e::util::{free_port, http_client};
use regmirror_e2e::{ControlPlane, OperatorProcess};

const NS: &str = "regmirror-system";

/// SIGTERM to exit: the operator has nothing to finish here, so "a few
/// seconds" with room for a loaded machine.
const PROMPT: Duration = Duration::from_secs(4);

/// Waits up to 60 s for a line of the operator's log containing every one of
/// `needles`, and returns it.
async fn log_line(op: &OperatorProcess, needles: &[&str]) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = op.log();
        if let Some(l) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return Ok(l.to_owned());
        }
        if Instant::now() >= deadline {
            bail!("no log line with {needles:?}; log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The status code of the operator's `/readyz`.
async fn readyz(op: &OperatorProcess) -> Result<u16> {
    Ok(http_client()
        .get(format!("{}/readyz", op.metrics_url))
        .send()
        .await?
        .status()
        .as_u16())
}

/// SIGTERM, and asserts a clean exit within [`PROMPT`] (the harness sends
/// SIGKILL after 20 s, which would show as a failed exit).
async fn stops_promptly(op: &mut OperatorProcess, what: &str) -> Result<()> {
    let start = Instant::now();
    let status = op.stop(Duration::from_secs(20)).await?;
    let took = start.elapsed();
    assert!(
        status.success() && took < PROMPT,
        "{what}: SIGTERM ended the operator after {took:?} with {status}; log:\n{}",
        op.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_crd_the_operator_is_unready_says_so_stops_and_picks_it_up() -> Result<()> {
    let cp = ControlPlane::start().await?;
    cp.add_node("node-1").await?;
    cp.kubectl_ok(&["create", "namespace", NS]).await?;
    cp.kubectl_ok(&["create", "serviceaccount", "regmirror-agent", "-n", NS])
        .await?;

    // Without the CRD: an error-level line saying what to do, /readyz fails,
    // and SIGTERM ends the process.
    let mut op = OperatorProcess::start(&cp.kubeconfig, NS, "op-1", &[])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ready = readyz(&op).await?;
    stops_promptly(&mut op, "without the CRD").await?;
    assert_eq!(ready, 503, "ready without the CRD");
    let line = log_line(&op, &["ERROR", "CRD", "not installed"]).await?;
    assert!(line.contains("crds/registrymirror.yaml"), "{line}");

    // Installed while it waits: it becomes ready and reconciles a mirror.
    let mut op = OperatorProcess::start(&cp.kubeconfig, NS, "op-1", &[])?;
    log_line(&op, &["ERROR", "not installed"]).await?;
    assert_eq!(readyz(&op).await?, 503);
    cp.install_crd().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while readyz(&op).await? != 200 {
        if Instant::now() >= deadline {
            bail!("not ready after the CRD was installed; log:\n{}", op.log());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    cp.apply_ok(
        "apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: late\nspec:\n  upstreams: [{host: quay.io}]\n  storage: {size: 1Gi}\n",
    )
    .await?;
    op.wait_for(
        &cp,
        "late's children applied",
        &["service", "regmirror-late", "-n", NS],
        |d| d.map(|_| ()),
    )
    .await?;
    stops_promptly(&mut op, "reconciling").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_server_unreachable_sigterm_ends_the_operator() -> Result<()> {
    let cp = ControlPlane::start().await?;
    // The same cluster credentials, pointed at a port nothing listens on.
    let closed = free_port();
    let kubeconfig = std::fs::read_to_string(&cp.kubeconfig).context("kubeconfig")?;
    assert!(kubeconfig.contains(&cp.server), "{kubeconfig}");
    let dir = tempfile::tempdir()?;
    let unreachable = dir.path().join("kubeconfig");
    std::fs::write(
        &unreachable,
        kubeconfig.replace(&cp.server, &format!("https://127.0.0.1:{closed}")),
    )?;

    for leader_election in ["false", "true"] {
        let mut op = OperatorProcess::start(
            &unreachable,
            NS,
            "op-1",
            &["--leader-election", leader_election],
        )?;
        // Let it try (and fail) to reach the API server, then stop it.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let ready = readyz(&op).await?;
        stops_promptly(&mut op, &format!("leader election {leader_election}")).await?;
        assert_eq!(ready, 503, "ready without an API server");
        let line = log_line(&op, &["WARN", "cannot list RegistryMirrors"]).await?;
        assert!(line.contains("retrying"), "{line}");
    }
    Ok(())
}
