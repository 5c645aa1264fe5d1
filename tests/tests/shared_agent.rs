//! Issue 17: one node agent per node for every mirror, against a real
//! kube-apiserver with kwok nodes, agents as real processes and no operator
//! (the test publishes each mirror's `status.hosts`/`nodePort` as the
//! operator would). Each node's `/` is a temp dir; the agents may touch
//! `/etc/containerd` only. Checked: two mirrors configured by one agent per
//! node, reported in the node's RegistryMirrorNode; an orphan of a deleted
//! mirror removed and its host taken by a new mirror (not a conflict); a
//! user's file left alone (Conflict), merged and restored; a mirror asking
//! for `/` or a directory outside the allowed ones refused with nothing
//! written; a status-only change to a mirror causes no report; a narrowed
//! nodeSelector and a deletion remove the files and the entries; an agent
//! restart keeps the files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use regmirror_e2e::operator::set_installation_claim;
use regmirror_e2e::util::{files_under, tail_lines, wait_until};
use regmirror_e2e::{AgentOptions, AgentProcess, ControlPlane};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(45);
const CONTAINERD: &str = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
/// A user's own file (no marker).
const USER_FILE: &str = "server = \"https://quay.io\"\n[host.\"https://corp-mirror.example\"]\n  capabilities = [\"pull\"]\n";

/// One kwok node and its agent.
struct Node {
    name: &'static str,
    root: tempfile::TempDir,
    agent: Option<AgentProcess>,
}

impl Node {
    fn new(name: &'static str) -> Result<Self> {
        let root = tempfile::tempdir()?;
        std::fs::create_dir_all(root.path().join("etc/containerd/certs.d"))?;
        std::fs::write(root.path().join("etc/containerd/config.toml"), CONTAINERD)?;
        Ok(Self {
            name,
            root,
            agent: None,
        })
    }

    fn certs(&self) -> PathBuf {
        self.root.path().join("etc/containerd/certs.d")
    }

    fn start(&mut self, cp: &ControlPlane) -> Result<()> {
        self.agent = Some(AgentProcess::start(&AgentOptions {
            kubeconfig: &cp.kubeconfig,
            node_name: self.name,
            node_ip: "127.0.0.1",
            host_root: self.root.path(),
            allowed_dirs: &["/etc/containerd"],
        })?);
        Ok(())
    }

    /// The agent's whole log.
    fn log(&self) -> String {
        self.agent.as_ref().map(|a| a.log()).unwrap_or_default()
    }

    /// The owner named in the marker of `registry`'s hosts.toml, `Some("")`
    /// for a file without one, `None` when there is none.
    fn owner(&self, registry: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.certs().join(registry).join("hosts.toml")).ok()?;
        Some(
            regmirror_node::owner_of(&text)
                .unwrap_or_default()
                .to_owned(),
        )
    }
}

async fn report(cp: &ControlPlane, node: &str) -> Result<Option<Value>> {
    cp.get_json(&["registrymirrornode", node]).await
}

fn entry<'a>(report: &'a Value, mirror: &str) -> Option<&'a Value> {
    report["status"]["mirrors"]
        .as_array()?
        .iter()
        .find(|e| e["mirror"] == mirror)
}

/// Waits until `check` holds for `node`'s RegistryMirrorNode (`None` when
/// missing) and its files; fails with the report and the agent's log.
async fn wait_node(
    cp: &ControlPlane,
    node: &Node,
    what: &str,
    check: impl Fn(Option<&Value>, &Node) -> bool,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = report(cp, node.name).await?;
        if check(r.as_ref(), node) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "{}: {what}: not within {WAIT:?}; report: {}\nagent log:\n{}",
                node.name,
                r.map(|v| serde_json::to_string_pretty(&v["status"]).unwrap())
                    .unwrap_or_else(|| "(none)".into()),
                tail_lines(&node.log(), 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn state_is(r: Option<&Value>, mirror: &str, state: &str) -> bool {
    r.and_then(|r| entry(r, mirror))
        .is_some_and(|e| e["state"] == state)
}

fn absent(r: Option<&Value>, mirror: &str) -> bool {
    r.is_some_and(|r| entry(r, mirror).is_none())
}

/// Creates mirror `name` for `host` with `nodes` (YAML flow mapping) and
/// publishes its hosts and NodePort as the operator would.
async fn mirror(cp: &ControlPlane, name: &str, host: &str, port: u16, nodes: &str) -> Result<()> {
    cp.apply_ok(&format!(
        "apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: {name}\nspec:\n  upstreams: [{{host: {host}}}]\n  storage: {{size: 1Gi}}\n  nodes: {nodes}\n"
    ))
    .await?;
    patch_status(
        cp,
        name,
        &format!(r#"{{"status":{{"hosts":["{host}"],"nodePort":{port}}}}}"#),
    )
    .await
}

async fn patch_status(cp: &ControlPlane, name: &str, patch: &str) -> Result<()> {
    cp.kubectl_ok(&[
        "patch",
        "registrymirror",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        patch,
    ])
    .await
    .map(|_| ())
}

async fn patch_spec(cp: &ControlPlane, name: &str, patch: &str) -> Result<()> {
    cp.kubectl_ok(&["patch", "registrymirror", name, "--type=merge", "-p", patch])
        .await
        .map(|_| ())
}

/// Every file under `dir` whose text names `what`.
fn files_naming(dir: &Path, what: &str) -> Vec<PathBuf> {
    files_under(vec![dir.to_path_buf()])
        .into_iter()
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains(what)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_per_node_reconciles_every_mirror_and_leaves_nothing_behind() -> Result<()> {
    let cp = ControlPlane::start().await?;
    cp.install_crd().await?;
    let mut n1 = Node::new("node-1")?;
    let mut n2 = Node::new("node-2")?;
    for (n, pool) in [(&n1, "a"), (&n2, "b")] {
        cp.add_node(n.name).await?;
        cp.kubectl_ok(&["label", "node", n.name, &format!("pool={pool}")])
            .await?;
    }
    // node-1: an orphan of the deleted mirror hub2 for docker.io (pointing
    // at a NodePort that may belong to anything now) and a user's own file.
    std::fs::create_dir_all(n1.certs().join("docker.io"))?;
    std::fs::write(
        n1.certs().join("docker.io/hosts.toml"),
        format!(
            "{} mirror=hub2\nserver = \"https://registry-1.docker.io\"\n[host.\"http://127.0.0.1:31999\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            regmirror_node::MARKER
        ),
    )?;
    std::fs::create_dir_all(n1.certs().join("quay.io"))?;
    std::fs::write(n1.certs().join("quay.io/hosts.toml"), USER_FILE)?;

    // Two mirrors, one agent per node configures both.
    mirror(&cp, "hub", "docker.io", 30001, "{}").await?;
    mirror(&cp, "ghcr", "ghcr.io", 30002, "{}").await?;
    n1.start(&cp)?;
    n2.start(&cp)?;
    for n in [&n1, &n2] {
        wait_node(&cp, n, "hub and ghcr Configured", |r, n| {
            state_is(r, "hub", "Configured")
                && state_is(r, "ghcr", "Configured")
                && n.owner("docker.io").as_deref() == Some("hub")
                && n.owner("ghcr.io").as_deref() == Some("ghcr")
        })
        .await?;
    }
    let text = std::fs::read_to_string(n1.certs().join("docker.io/hosts.toml"))?;
    ensure!(
        text.contains("http://127.0.0.1:30001") && !text.contains("31999"),
        "the orphan was not replaced: {text}"
    );
    let r1 = report(&cp, "node-1").await?.context("no report")?;
    let uid = cp.get_json(&["node", "node-1"]).await?.context("node-1")?["metadata"]["uid"].clone();
    let owner = &r1["metadata"]["ownerReferences"][0];
    ensure!(
        owner["kind"] == "Node" && owner["uid"] == uid,
        "not owned by its Node: {owner}"
    );
    ensure!(r1["spec"]["nodeName"] == "node-1");
    ensure!(
        entry(&r1, "hub2").is_none(),
        "the orphan's owner is reported"
    );

    // A user's own file: a conflict, left exactly as it is.
    mirror(&cp, "quay", "quay.io", 30003, "{}").await?;
    wait_node(&cp, &n1, "quay Conflict", |r, _| {
        state_is(r, "quay", "Conflict")
    })
    .await?;
    wait_node(&cp, &n2, "quay Configured", |r, _| {
        state_is(r, "quay", "Configured")
    })
    .await?;
    ensure!(std::fs::read_to_string(n1.certs().join("quay.io/hosts.toml"))? == USER_FILE);
    // mergeExisting: merged behind the cache, restored when the mirror goes.
    patch_spec(&cp, "quay", r#"{"spec":{"nodes":{"mergeExisting":true}}}"#).await?;
    wait_node(&cp, &n1, "quay merged", |r, n| {
        state_is(r, "quay", "Configured") && n.owner("quay.io").as_deref() == Some("quay")
    })
    .await?;
    let merged = std::fs::read_to_string(n1.certs().join("quay.io/hosts.toml"))?;
    ensure!(
        merged.contains("corp-mirror.example"),
        "user's host lost: {merged}"
    );
    cp.kubectl_ok(&["delete", "registrymirror", "quay"]).await?;
    for n in [&n1, &n2] {
        wait_node(&cp, n, "quay gone", |r, _| absent(r, "quay")).await?;
    }
    wait_until(WAIT, || async {
        std::fs::read_to_string(n1.certs().join("quay.io/hosts.toml"))
            .ok()
            .as_deref()
            == Some(USER_FILE)
    })
    .await
    .context("the user's quay.io file was not restored")?;
    ensure!(n2.owner("quay.io").is_none(), "quay.io left on node-2");

    // Asking for the node's root, or a directory the installer did not
    // allow: refused, nothing written anywhere.
    mirror(
        &cp,
        "root",
        "evil.example",
        30004,
        "{containerdConfigDir: /}",
    )
    .await?;
    mirror(
        &cp,
        "elsewhere",
        "other.example",
        30005,
        "{containerdConfigDir: /var/lib/registries}",
    )
    .await?;
    for n in [&n1, &n2] {
        wait_node(&cp, n, "root and elsewhere Failed", |r, _| {
            ["root", "elsewhere"].iter().all(|m| {
                r.and_then(|r| entry(r, m)).is_some_and(|e| {
                    let msg = e["message"].as_str().unwrap_or_default();
                    e["state"] == "Failed"
                        && msg.contains("/etc/containerd")
                        && msg.contains("agent.hostDirs")
                })
            })
        })
        .await?;
        for what in ["mirror=root", "mirror=elsewhere"] {
            let written = files_naming(n.root.path(), what);
            ensure!(
                written.is_empty(),
                "{}: refused mirror wrote {written:?}",
                n.name
            );
        }
    }
    cp.kubectl_ok(&["delete", "registrymirror", "root", "elsewhere"])
        .await?;
    for n in [&n1, &n2] {
        wait_node(&cp, n, "root and elsewhere gone", |r, _| {
            absent(r, "root") && absent(r, "elsewhere")
        })
        .await?;
    }

    // A status-only change (the operator's conditions): no pass, no report.
    const PASS_ON_CHANGE: &str = "changed: reconciling";
    let before = report(&cp, "node-1").await?.context("no report")?;
    let passes = n1.log().matches(PASS_ON_CHANGE).count();
    patch_status(
        &cp,
        "hub",
        r#"{"status":{"conditions":[{"type":"Ready","status":"False","reason":"Testing","message":"status only","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = report(&cp, "node-1").await?.context("no report")?;
    ensure!(
        before["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"],
        "a status-only change was reported: {} -> {}\nagent log:\n{}",
        before["status"],
        after["status"],
        tail_lines(&n1.log(), 30)
    );
    let now = n1.log().matches(PASS_ON_CHANGE).count();
    ensure!(
        passes > 0 && now == passes,
        "passes on change: {passes} before, {now} after a status-only change"
    );

    // Narrowed nodeSelector: node-2 loses ghcr's file and entry.
    patch_spec(
        &cp,
        "ghcr",
        r#"{"spec":{"nodes":{"nodeSelector":{"pool":"a"}}}}"#,
    )
    .await?;
    wait_node(&cp, &n2, "ghcr de-selected", |r, n| {
        absent(r, "ghcr") && n.owner("ghcr.io").is_none()
    })
    .await?;
    ensure!(!n2.certs().join("ghcr.io").exists());
    ensure!(n1.owner("ghcr.io").as_deref() == Some("ghcr"));

    // An agent restart (a rolling update) keeps the files.
    let a1 = n1.agent.as_mut().context("agent")?;
    a1.stop(Duration::from_secs(10)).await?;
    ensure!(n1.owner("docker.io").as_deref() == Some("hub"));
    ensure!(n1.owner("ghcr.io").as_deref() == Some("ghcr"));
    n1.start(&cp)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_node(&cp, &n1, "still configured after a restart", |r, n| {
        state_is(r, "hub", "Configured")
            && state_is(r, "ghcr", "Configured")
            && n.owner("docker.io").as_deref() == Some("hub")
    })
    .await?;

    // Deletion: while a finalizer holds the mirror, its files go and the
    // node reports Removed; once it is gone, so is the entry.
    patch_spec(
        &cp,
        "hub",
        r#"{"metadata":{"finalizers":["test.regmirror.dev/hold"]}}"#,
    )
    .await?;
    cp.kubectl_ok(&["delete", "registrymirror", "hub", "--wait=false"])
        .await?;
    for n in [&n1, &n2] {
        wait_node(&cp, n, "hub Removed", |r, n| {
            state_is(r, "hub", "Removed") && n.owner("docker.io").is_none()
        })
        .await?;
        ensure!(!n.certs().join("docker.io").exists());
    }
    patch_spec(&cp, "hub", r#"{"metadata":{"finalizers":null}}"#).await?;
    for n in [&n1, &n2] {
        wait_node(&cp, n, "hub gone", |r, _| absent(r, "hub")).await?;
    }
    // Deleted outright (no finalizer): files and entry go.
    cp.kubectl_ok(&["delete", "registrymirror", "ghcr"]).await?;
    wait_node(&cp, &n1, "ghcr gone", |r, n| {
        absent(r, "ghcr") && n.owner("ghcr.io").is_none()
    })
    .await?;
    ensure!(std::fs::read_to_string(n1.certs().join("quay.io/hosts.toml"))? == USER_FILE);

    // Another installation holds the claim on the mirrors: an agent of this
    // one (issue 18: two installs) touches no file and writes no report,
    // until the claim is its installation's.
    let mut n3 = Node::new("node-3")?;
    cp.add_node(n3.name).await?;
    mirror(&cp, "third", "mcr.microsoft.com", 31003, "{}").await?;
    set_installation_claim(&cp, Some("first/regmirror-operator")).await?;
    n3.agent = Some(AgentProcess::start_with_env(
        &AgentOptions {
            kubeconfig: &cp.kubeconfig,
            node_name: n3.name,
            node_ip: "127.0.0.1",
            host_root: n3.root.path(),
            allowed_dirs: &["/etc/containerd"],
        },
        &[("REGMIRROR_INSTALLATION", "second/regmirror-operator")],
    )?);
    wait_until(WAIT, || async {
        n3.log()
            .contains("another regmirror installation (first/regmirror-operator) manages")
    })
    .await
    .with_context(|| format!("node-3's agent did not defer:\n{}", n3.log()))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        report(&cp, n3.name).await?.is_none(),
        "a deferring agent wrote a report"
    );
    ensure!(
        n3.owner("mcr.microsoft.com").is_none(),
        "a deferring agent wrote a file"
    );
    set_installation_claim(&cp, Some("second/regmirror-operator")).await?;
    wait_node(
        &cp,
        &n3,
        "third Configured once the claim is its own",
        |r, n| {
            state_is(r, "third", "Configured")
                && n.owner("mcr.microsoft.com").as_deref() == Some("third")
        },
    )
    .await?;
    set_installation_claim(&cp, None).await?;

    // The Node is deleted and created again under its name (a new uid): the
    // garbage collector takes the report with the old Node, and the agent
    // makes it again, owned by the new one, at once (not at its next
    // heartbeat, 5 minutes here).
    let uid =
        |node: Option<Value>| node.and_then(|n| n["metadata"]["uid"].as_str().map(str::to_owned));
    let old_uid = uid(cp.get_json(&["node", n2.name]).await?).context("node-2's uid")?;
    cp.kubectl_ok(&["delete", "node", n2.name]).await?;
    cp.add_node(n2.name).await?;
    let new_uid = uid(cp.get_json(&["node", n2.name]).await?).context("node-2's new uid")?;
    ensure!(new_uid != old_uid);
    wait_node(&cp, &n2, "report owned by the new Node", |r, _| {
        r.is_some_and(|r| r["metadata"]["ownerReferences"][0]["uid"] == new_uid.as_str())
    })
    .await?;
    // And it stays (the collector does not take it with the old Node).
    tokio::time::sleep(Duration::from_secs(5)).await;
    ensure!(
        report(&cp, n2.name).await?.is_some(),
        "the report went with the old Node"
    );
    Ok(())
}
