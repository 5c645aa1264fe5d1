//! The operator against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kwok): CRD validation, children,
//! status, events, host conflicts, spec changes, finalizer, garbage collection
//! and leader election, the cache cluster (members discovering each other
//! through EndpointSlices while it scales), the migration from the
//! single-Deployment layout, and the nodes' side of the status aggregated
//! from node agents' reports (simulated: RegistryMirrorNodes written with
//! kubectl as an agent writes them) with the installer's limits and the
//! retirement of per-mirror agent DaemonSets (issue 17), as named scenarios.
//!
//! The scenarios share one control plane and one operator, started by the
//! first scenario and stopped when the last has finished (see [`turn`]); they
//! take turns, and each uses its own mirrors and upstream hosts, so none
//! depends on another having run.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use regmirror_e2e::operator::{condition, installation_claim, set_installation_claim};
use regmirror_e2e::{
    CacheOptions, CacheProcess, ControlPlane, OperatorProcess, free_port, wait_until,
};
use tokio::sync::{Mutex, MutexGuard};

const NS: &str = "regmirror-system";
/// The operator's identity in the leader lease (the same after a restart).
const IDENTITY: &str = "op-1";

/// Every scenario of this file: the shared control plane is stopped when this
/// many have had their [`turn`].
const SCENARIOS: [&str; 18] = [
    "a_larger_storage_size_expands_every_member_claim_and_keeps_the_members_running",
    "a_node_the_agent_daemon_set_cannot_reach_says_why",
    "invalid_specs_are_rejected_with_the_schemas_messages",
    "conditions_events_and_logs_are_messages_a_user_can_act_on",
    "uninstall_removes_every_mirror_or_fails_naming_what_is_left",
    "a_second_installation_waits_while_the_first_is_alive",
    "a_spec_the_cache_or_the_api_server_refuses_leaves_the_running_cache_alone",
    "a_mirror_becomes_ready_with_owned_labelled_children_events_and_metrics",
    "a_later_mirror_loses_a_shared_host_until_the_older_is_deleted",
    "a_spec_change_rolls_the_cache_config",
    "without_the_operator_the_finalizer_holds_and_the_garbage_collector_cleans_up",
    "another_registrys_only_credentials_entry_is_never_copied",
    "cache_members_discover_each_other_and_scaling_restarts_none",
    "an_old_layout_mirror_hands_its_volume_to_member_zero",
    "ready_counts_only_reports_of_existing_selected_nodes",
    "deletion_waits_only_for_existing_nodes_still_reporting_the_mirror",
    "a_mirror_asking_for_the_nodes_root_or_a_foreign_agent_image_is_refused",
    "per_mirror_agents_are_retired_once_the_shared_agent_reports_every_node",
];

fn mirror_yaml(name: &str, upstreams: &str, extra: &str) -> String {
    format!(
        "apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: {name}\nspec:\n  upstreams: {upstreams}\n{extra}"
    )
}

/// `kubectl patch registrymirror NAME --type=merge -p PATCH`.
async fn patch_mirror(cp: &ControlPlane, name: &str, patch: &str) -> Result<()> {
    cp.kubectl_ok(&["patch", "registrymirror", name, "--type=merge", "-p", patch])
        .await
        .map(drop)
}

/// Creates the mirror `name` of `upstreams` with 1Gi of storage, and waits
/// until the operator applied its children (the NodePort Service is applied
/// last).
async fn create_mirror(
    cp: &ControlPlane,
    op: &mut OperatorProcess,
    name: &str,
    upstreams: &str,
) -> Result<()> {
    cp.apply_ok(&mirror_yaml(name, upstreams, "  storage: {size: 1Gi}\n"))
        .await?;
    op.wait_for(
        cp,
        &format!("{name}'s children applied"),
        &["service", &format!("regmirror-{name}"), "-n", NS],
        |d| d.map(|_| ()),
    )
    .await
}

/// Writes node `node`'s report as its agent would: the RegistryMirrorNode
/// named after the node (created if missing), then its status (the status
/// subresource) with `entries` (mirror, state) replacing the node's entries
/// for those mirrors, each with the mirror's current uid. `Gone` as a state
/// drops the mirror's entry.
async fn report(cp: &ControlPlane, node: &str, entries: &[(&str, &str)]) -> Result<()> {
    if cp.get_json(&["registrymirrornode", node]).await?.is_none() {
        cp.apply_ok(&format!(
            "apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirrorNode\nmetadata:\n  name: {node}\nspec:\n  nodeName: {node}\n"
        ))
        .await?;
    }
    let current = cp
        .get_json(&["registrymirrornode", node])
        .await?
        .context("the report just created")?;
    let mut mirrors: Vec<serde_json::Value> = current["status"]["mirrors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (mirror, state) in entries {
        mirrors.retain(|e| e["mirror"] != *mirror);
        if *state == "Gone" {
            continue;
        }
        let m = cp
            .get_json(&["registrymirror", mirror])
            .await?
            .with_context(|| format!("mirror {mirror}"))?;
        mirrors.push(serde_json::json!({
            "mirror": mirror, "uid": m["metadata"]["uid"], "state": state,
            "configDir": "/etc/containerd/certs.d", "hosts": [],
        }));
    }
    let patch = serde_json::json!({"status": {
        "mirrors": mirrors,
        "lastUpdate": "2026-01-01T00:00:00Z",
    }});
    cp.kubectl_ok(&[
        "patch",
        "registrymirrornode",
        node,
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch.to_string(),
    ])
    .await
    .map(drop)
}

/// Adds kwok nodes `nodes` labelled `pool=<name>`, and the mirror `name`
/// (upstream `<name>.example`, 1Gi) selecting them.
async fn pooled_mirror(cp: &ControlPlane, name: &str, nodes: &[&str]) -> Result<()> {
    add_nodes(cp, nodes, &[&format!("pool={name}")]).await?;
    cp.apply_ok(&mirror_yaml(
        name,
        &format!("[{{host: {name}.example}}]"),
        &format!("  storage: {{size: 1Gi}}\n  nodes: {{nodeSelector: {{pool: {name}}}}}\n"),
    ))
    .await
}

/// Waits until the mirror `name` is gone (its finalizer released).
async fn mirror_gone(cp: &ControlPlane, op: &mut OperatorProcess, name: &str) -> Result<()> {
    op.wait_for(
        cp,
        &format!("{name} gone"),
        &["registrymirror", name],
        |m| m.is_none().then_some(()),
    )
    .await
}

/// Adds kwok nodes `names` labelled `labels` (`k=v` each).
async fn add_nodes(cp: &ControlPlane, names: &[&str], labels: &[&str]) -> Result<()> {
    for n in names {
        cp.add_node(n).await?;
        let mut args = vec!["label", "node", n, "--overwrite"];
        args.extend_from_slice(labels);
        cp.kubectl_ok(&args).await?;
    }
    Ok(())
}

/// Deletes nodes `names` and their reports (what the garbage collector does
/// through the report's owner reference, which these simulated reports lack),
/// so the mirrors of other scenarios select `node-1` alone again.
async fn remove_nodes(cp: &ControlPlane, names: &[&str]) -> Result<()> {
    for n in names {
        cp.kubectl_ok(&["delete", "node", n, "--ignore-not-found"])
            .await?;
        cp.kubectl_ok(&["delete", "registrymirrornode", n, "--ignore-not-found"])
            .await?;
    }
    Ok(())
}

/// `(name, state)` of each entry of a mirror's `status.nodes`.
fn node_entries(m: &serde_json::Value) -> Vec<(String, String)> {
    m["status"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_owned(),
                n["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A PersistentVolume the cache's claim can bind to (no provisioner here).
fn pv_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {name}\nspec:\n  capacity: {{storage: 20Gi}}\n  accessModes: [ReadWriteOnce]\n  hostPath: {{path: /tmp/{name}}}\n"
    )
}

/// Waits until mirror `name` is Ready with `members` (`ready/desired`) cache members.
async fn ready_with_members(
    cp: &ControlPlane,
    op: &mut OperatorProcess,
    name: &str,
    members: &str,
) -> Result<()> {
    op.wait_for(
        cp,
        &format!("{name} Ready with {members} members"),
        &["registrymirror", name],
        |m| {
            let m = m?;
            (condition(m, "Ready")?["status"] == "True"
                && m["status"]["cache"]["members"] == members)
                .then_some(())
        },
    )
    .await
}

/// Waits until the message of mirror `name`'s condition `type_` contains
/// `needle`; returns the message.
async fn condition_message(
    cp: &ControlPlane,
    op: &mut OperatorProcess,
    name: &str,
    type_: &str,
    needle: &str,
) -> Result<String> {
    op.wait_for(
        cp,
        &format!("{name}'s {type_} saying {needle:?}"),
        &["registrymirror", name],
        |m| {
            let text = condition(m?, type_)?["message"].as_str()?;
            text.contains(needle).then(|| text.to_owned())
        },
    )
    .await
}

/// What the scenarios share. The operator is declared first, so it stops
/// before the control plane.
struct Cluster {
    op: OperatorProcess,
    cp: ControlPlane,
}

impl Cluster {
    /// A control plane with one node, a volume per scenario mirror, the
    /// operator's namespace and agent ServiceAccount, the CRD, and the operator.
    async fn start() -> Result<Self> {
        let cp = ControlPlane::start().await?;
        cp.add_node("node-1").await?;
        cp.kubectl_ok(&["create", "namespace", NS]).await?;
        cp.kubectl_ok(&["create", "serviceaccount", "regmirror-agent", "-n", NS])
            .await?;
        // Some scenarios make more than one mirror with a cache.
        for i in 1..=2 * SCENARIOS.len() {
            cp.apply_ok(&pv_yaml(&format!("cache-pv-{i}"))).await?;
        }
        cp.install_crd().await?;
        let op = OperatorProcess::start(&cp.kubeconfig, NS, IDENTITY, &[])?;
        Ok(Self { op, cp })
    }
}

/// Runs `job` on the keeper thread and returns its result.
///
/// The harness starts processes under `setpriv --pdeathsig KILL`: they die
/// when the thread that spawned them ends. A scenario's thread ends with the
/// scenario; the keeper thread waits for jobs until the test binary exits. So
/// what the keeper starts outlives each scenario, and still dies with the
/// binary however it ends (a failed scenario, a filter that leaves the last
/// turn untaken, a kill).
async fn on_keeper<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> T {
    type Job = Box<dyn FnOnce() + Send>;
    static KEEPER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("cluster-keeper".into())
            .spawn(move || rx.into_iter().for_each(|job| job()))
            .expect("spawn the keeper thread");
        tx
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    keeper
        .send(Box::new(move || {
            let _ = tx.send(job());
        }))
        .expect("the keeper thread runs as long as the binary");
    rx.await.expect("the keeper thread answers")
}

/// The shared cluster, `None` until the first turn and after the last.
static CLUSTER: Mutex<Option<Cluster>> = Mutex::const_new(None);
/// Turns ended so far.
static ENDED: AtomicUsize = AtomicUsize::new(0);

/// One scenario's exclusive use of the shared cluster.
struct Turn(MutexGuard<'static, Option<Cluster>>);

/// Waits for `scenario`'s turn (one scenario at a time: scenarios stop the
/// operator, and a failure is easier to read alone).
async fn turn(scenario: &str) -> Turn {
    assert!(
        SCENARIOS.contains(&scenario),
        "{scenario} is not listed in SCENARIOS, so the cluster would stop too early"
    );
    Turn(CLUSTER.lock().await)
}

impl Turn {
    /// The cluster, started on the first turn, with the operator restarted
    /// if it is not running (a scenario stopped it, or it failed).
    async fn cluster(&mut self) -> Result<(&ControlPlane, &mut OperatorProcess)> {
        if self.0.is_none() {
            let started = on_keeper(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the keeper")
                    .block_on(Cluster::start())
            })
            .await?;
            *self.0 = Some(started);
        }
        let cluster = self.0.as_mut().expect("started above");
        if !cluster.op.is_running() {
            let kubeconfig = cluster.cp.kubeconfig.clone();
            cluster.op =
                on_keeper(move || OperatorProcess::start(&kubeconfig, NS, IDENTITY, &[])).await?;
        }
        Ok((&cluster.cp, &mut cluster.op))
    }
}

impl Drop for Turn {
    /// The last turn stops the cluster (processes and their directories).
    fn drop(&mut self) {
        if ENDED.fetch_add(1, Ordering::SeqCst) + 1 == SCENARIOS.len() {
            drop(self.0.take());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_rejected_with_the_schemas_messages() -> Result<()> {
    let mut turn = turn("invalid_specs_are_rejected_with_the_schemas_messages").await;
    let (cp, _) = turn.cluster().await?;
    for (upstreams, extra, expected) in [
        (
            "[{host: Docker.IO/library}]",
            "",
            "host must be a lowercase registry host name",
        ),
        ("[{host: index.docker.io}]", "", "write docker.io"),
        (
            "[{host: r.example, url: 'ftp://r.example'}]",
            "",
            "url must be http:// or https://",
        ),
        (
            "[{host: docker.io}, {host: docker.io}]",
            "",
            "Duplicate value",
        ),
        (
            "[{host: docker.io}]",
            "  storage: {size: lots}\n",
            "size must be a quantity",
        ),
        (
            "[{host: docker.io}]",
            "  cache: {replicas: 17}\n",
            "replicas must be from 1 to 16 cache members",
        ),
        // Issue 19: an unprivileged cache cannot bind a port below 1024 on the node.
        (
            "[{host: docker.io}]",
            "  cache: {hostNetwork: true, port: 999}\n",
            "cache.port must be 1024 or more with cache.hostNetwork",
        ),
        (
            "[{host: docker.io}]",
            "  cache: {maxSize: lots}\n",
            "the budget of all cache members together",
        ),
        (
            "[{host: docker.io, tagTTL: soon}]",
            "",
            "must be a duration",
        ),
        ("[]", "", "spec.upstreams"),
        // Issue 18, item 1: accepted before, then refused by the cache or the API server.
        (
            "[{host: r.example, url: 'http://:80'}]",
            "",
            "url must be http:// or https:// followed by a host",
        ),
        (
            "[{host: 'r.example:99999'}]",
            "",
            "host must be a lowercase registry host name with an optional port (1-65535)",
        ),
        (
            "[{host: r.example, url: 'http://r.example:65536/'}]",
            "",
            "url must be http:// or https:// followed by a host, an optional port (1-65535)",
        ),
        (
            "[{host: docker.io}]",
            "  cache: {maxSize: '0'}\n",
            "maxSize must be more than 0",
        ),
        (
            "[{host: docker.io}]",
            "  cache: {maxAge: 0s}\n",
            "maxAge must be longer than 0",
        ),
        (
            "[{host: docker.io, tagTTL: 99999999999999999999d}]",
            "",
            "each number at most 9 digits",
        ),
        (
            "[{host: docker.io}]",
            "  storage: {size: '0'}\n",
            "size must be more than 0",
        ),
        (
            "[{host: docker.io}]",
            "  storage: {storageClassName: 'Not Valid!'}\n",
            "storageClassName must be a StorageClass name",
        ),
        (
            "[{host: docker.io}]",
            "  nodes: {nodeSelector: {'bad key!': x}}\n",
            "nodeSelector keys must be label keys",
        ),
        (
            "[{host: docker.io}]",
            "  nodes: {nodeSelector: {pool: 'not valid!'}}\n",
            "spec.nodes.nodeSelector.pool",
        ),
        (
            "[{host: docker.io}]",
            "  cache: {image: ''}\n",
            "spec.cache.image",
        ),
    ] {
        let out = cp.apply(&mirror_yaml("bad", upstreams, extra)).await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(expected),
            "{upstreams} {extra}: expected rejection containing {expected:?}, got {}: {stderr}",
            out.status
        );
    }
    Ok(())
}

/// `regmirror-operator uninstall --namespace namespace` (the chart's
/// pre-delete hook) as the hook's ServiceAccount with the chart's hook RBAC;
/// its output and whether it succeeded.
async fn run_uninstall(
    cp: &ControlPlane,
    namespace: &str,
    timeout: &str,
) -> Result<(bool, String)> {
    let out = tokio::process::Command::new(regmirror_e2e::operator_binary())
        .args(["uninstall", "--namespace", namespace, "--timeout", timeout])
        .env(
            "KUBECONFIG",
            cp.token_kubeconfig(NS, "regmirror-uninstall", "uninstall.kubeconfig")
                .await?,
        )
        .env("NO_COLOR", "1")
        .env_remove("POD_NAMESPACE")
        .kill_on_drop(true)
        .output()
        .await?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Whether the mirror `name` exists and is not being deleted.
async fn untouched(cp: &ControlPlane, name: &str) -> Result<bool> {
    Ok(cp
        .get_json(&["registrymirror", name])
        .await?
        .is_some_and(|m| m["metadata"]["deletionTimestamp"].is_null()))
}

/// Issue 18, item 4: before `helm uninstall` removes the operator, its
/// pre-delete hook deletes every mirror and waits for their finalizers (the
/// node configuration), then releases the installation claim. It deletes
/// nothing for an installation that does not manage the mirrors, nor while
/// no operator of its own runs (nothing would process the deletion); when
/// node agents do not confirm in time it fails, naming each mirror and why.
/// Before, uninstall left the mirrors, their workloads and every node's
/// files, with finalizers nobody would release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_removes_every_mirror_or_fails_naming_what_is_left() -> Result<()> {
    let mut turn = turn("uninstall_removes_every_mirror_or_fails_naming_what_is_left").await;
    let (cp, op) = turn.cluster().await?;
    // The hook's ServiceAccount and RBAC, as the chart renders them (the Job
    // itself would only run on a real node: its command runs here instead).
    let hook = regmirror_e2e::helm::Helm::new()?
        .template(NS, &["--show-only", "templates/uninstall-hook.yaml"])
        .await?;
    for doc in hook.split("\n---").filter(|d| !d.contains("kind: Job")) {
        if doc.contains("kind:") {
            cp.apply_ok(doc).await?;
        }
    }
    create_mirror(cp, op, "leaving-a", "[{host: leaving-a.example}]").await?;
    create_mirror(cp, op, "leaving-b", "[{host: leaving-b.example}]").await?;
    wait_until(Duration::from_secs(30), || async {
        installation_claim(cp).await.ok().flatten().as_deref()
            == Some(&format!("{NS}/regmirror-operator"))
    })
    .await
    .context("the operator never claimed the mirrors")?;

    // Another installation's hook: not its mirrors, none removed.
    let (ok, out) = run_uninstall(cp, "regmirror-unrelated", "3s").await?;
    assert!(ok && out.contains("none removed"), "{out}");
    assert!(
        untouched(cp, "leaving-a").await?,
        "an unrelated uninstall deleted a mirror"
    );

    // This installation's operator is down: nothing would remove the node
    // configuration, so nothing is deleted.
    op.stop(Duration::from_secs(10)).await?;
    let (ok, out) = run_uninstall(cp, NS, "3s").await?;
    assert!(!ok, "uninstall succeeded with no operator running: {out}");
    assert!(
        out.contains("no operator of this installation is running"),
        "{out}"
    );
    assert!(
        untouched(cp, "leaving-a").await?,
        "deleted with no operator to finish"
    );

    // Running, but a node's agent never confirms removal: the hook fails in
    // time, naming the mirror and the node, and the deletion goes on.
    let (cp, _op) = turn.cluster().await?;
    report(cp, "node-1", &[("leaving-a", "Configured")]).await?;
    let (ok, out) = run_uninstall(cp, NS, "5s").await?;
    assert!(
        !ok,
        "uninstall succeeded with a node still configured: {out}"
    );
    for needle in [
        "still present after 5s",
        "leaving-a: Deleting",
        "node-1",
        "They are being deleted",
        "helm uninstall stops here",
    ] {
        assert!(out.contains(needle), "{needle:?} not in: {out}");
    }
    assert!(
        cp.get_json(&["registrymirror", "leaving-b"])
            .await?
            .is_none(),
        "leaving-b not removed"
    );

    // The agent confirms (no reports left: no agent runs here): the same hook
    // removes the rest and releases the claim.
    cp.kubectl_ok(&["delete", "registrymirrornodes", "--all"])
        .await?;
    let (ok, out) = run_uninstall(cp, NS, "60s").await?;
    assert!(ok, "uninstall failed: {out}");
    assert!(
        out.contains("RegistryMirror(s) and their node configuration"),
        "{out}"
    );
    assert!(
        cp.get_json(&["registrymirrors"])
            .await?
            .is_some_and(|l| l["items"].as_array().is_some_and(Vec::is_empty)),
        "mirrors left after a successful uninstall"
    );
    assert_eq!(installation_claim(cp).await?, None, "claim not released");
    assert!(
        cp.get_json(&["statefulset", "regmirror-leaving-a", "-n", NS])
            .await?
            .is_none(),
        "the cache outlived its mirror"
    );
    Ok(())
}

/// Issue 18, item 8 on the real API server: a cache that cannot start says
/// why (its pod's scheduling cause, and for an unbound claim the claim's own
/// event) and where to look (the real namespace);
/// no condition carries a Rust debug dump of an API error; a normal delete
/// is a Normal event; the operator's log has no colour codes off a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_events_and_logs_are_messages_a_user_can_act_on() -> Result<()> {
    let mut turn = turn("conditions_events_and_logs_are_messages_a_user_can_act_on").await;
    let (cp, op) = turn.cluster().await?;
    // A StorageClass nobody provides: the member's claim stays Pending and
    // the scheduler says so on the pod.
    cp.apply_ok(&mirror_yaml(
        "unbound",
        "[{host: unbound.example}]",
        "  storage: {size: 1Gi, storageClassName: nobody-provides-this}\n",
    ))
    .await?;
    let message = op
        .wait_for(
            cp,
            "unbound: CacheUnavailable with the pod's cause",
            &["registrymirror", "unbound"],
            |m| {
                let c = condition(m?, "CacheAvailable")?;
                let text = c["message"].as_str()?;
                // The claim's own event says why it is not bound.
                (c["reason"] == "CacheUnavailable"
                    && text.contains("cannot be scheduled")
                    && text.contains("claim data-regmirror-unbound-0: "))
                .then(|| text.to_owned())
            },
        )
        .await?;
    assert!(
        message.contains("unbound")
            && message.contains("PersistentVolumeClaim")
            && message.contains("\"nobody-provides-this\" not found"),
        "{message}"
    );
    assert!(
        message.contains(&format!("kubectl -n {NS} get pods")),
        "{message}"
    );
    let m = cp
        .get_json(&["registrymirror", "unbound"])
        .await?
        .context("unbound")?;
    let conditions = m["status"]["conditions"].to_string();
    for dump in ["Status {", "Some(", "ErrorResponse", "\\u001b["] {
        assert!(!conditions.contains(dump), "{dump:?} in {conditions}");
    }
    cp.kubectl_ok(&["delete", "registrymirror", "unbound", "--timeout=60s"])
        .await?;
    let events = cp
        .get_json(&["events.events.k8s.io", "-n", "default"])
        .await?
        .context("events")?;
    let deleting: Vec<&serde_json::Value> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["regarding"]["name"] == "unbound" && e["reason"] == "Deleting")
        .collect();
    assert!(!deleting.is_empty(), "no Deleting event");
    assert!(
        deleting.iter().all(|e| e["type"] == "Normal"),
        "{deleting:?}"
    );
    assert!(
        !op.log().contains('\u{1b}'),
        "colour codes in a log written to a file"
    );
    Ok(())
}

/// Issue 18, item 8: a node without an agent pod says why, from the agent
/// DaemonSet's own events. Before, a namespace whose PodSecurity level
/// forbids the agent's hostPath volumes showed only "AgentsNotReady".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_the_agent_daemon_set_cannot_reach_says_why() -> Result<()> {
    let mut turn = turn("a_node_the_agent_daemon_set_cannot_reach_says_why").await;
    let (cp, op) = turn.cluster().await?;
    let label = "pod-security.kubernetes.io/enforce";
    cp.kubectl_ok(&[
        "label",
        "namespace",
        NS,
        &format!("{label}=baseline"),
        "--overwrite",
    ])
    .await?;
    // The chart's agent DaemonSet, as installed: its pods need hostPath.
    let ds = regmirror_e2e::helm::Helm::new()?
        .template(NS, &["--show-only", "templates/agent-daemonset.yaml"])
        .await?;
    cp.apply_ok(&ds).await?;
    cp.apply_ok(&mirror_yaml(
        "unreached",
        "[{host: unreached.example}]",
        "  storage: {size: 1Gi}\n",
    ))
    .await?;
    let message = condition_message(cp, op, "unreached", "NodesConfigured", "FailedCreate").await?;
    for needle in [
        "node-1: Pending",
        &format!("the node agent DaemonSet {NS}/regmirror-agent has 0/1 pods ready"),
        "violates PodSecurity",
        "hostPath",
    ] {
        assert!(message.contains(needle), "{needle:?} not in: {message}");
    }
    cp.kubectl_ok(&["label", "namespace", NS, &format!("{label}-")])
        .await?;
    cp.kubectl_ok(&["delete", "daemonset", "regmirror-agent", "-n", NS])
        .await?;
    cp.kubectl_ok(&["delete", "registrymirror", "unreached", "--timeout=60s"])
        .await?;
    Ok(())
}

/// Issue 18, item 3: a second installation (another namespace) does not
/// reconcile the cluster's mirrors while the first is alive, says so in its
/// log, its readiness and an event, and takes over once the first is gone.
/// Before, both reconciled every mirror: `status.nodePort` flipped between
/// two values and the second created children in its own namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_installation_waits_while_the_first_is_alive() -> Result<()> {
    let mut turn = turn("a_second_installation_waits_while_the_first_is_alive").await;
    let (cp, op) = turn.cluster().await?;
    const OTHER: &str = "regmirror-second";
    wait_until(Duration::from_secs(60), || async {
        installation_claim(cp).await.ok().flatten().as_deref()
            == Some("regmirror-system/regmirror-operator")
    })
    .await
    .context("the first installation never claimed the mirrors")?;
    cp.kubectl_ok(&["create", "namespace", OTHER]).await?;
    let mut second = OperatorProcess::start(&cp.kubeconfig, OTHER, "op-second", &[])?;
    create_mirror(cp, op, "twice", "[{host: twice.example}]").await?;
    wait_until(Duration::from_secs(60), || async {
        second.log().contains(
            "another regmirror installation (regmirror-system/regmirror-operator) manages the RegistryMirrors",
        )
    })
    .await
    .with_context(|| format!("the second installation never said it waits:\n{}", second.log()))?;
    let ready = regmirror_e2e::util::http_client()
        .get(format!("{}/readyz", second.metrics_url))
        .send()
        .await?;
    assert_eq!(
        ready.status().as_u16(),
        503,
        "the waiting installation is not ready"
    );
    let events = cp
        .kubectl_ok(&["get", "events.events.k8s.io", "-n", "default", "-o", "json"])
        .await?;
    assert!(
        events.contains("AnotherInstallation"),
        "no AnotherInstallation event"
    );
    // The mirror's status is the first installation's alone, and stays so.
    let port = |m: Option<serde_json::Value>| m.map(|m| m["status"]["nodePort"].clone());
    let first = port(cp.get_json(&["registrymirror", "twice"]).await?);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            port(cp.get_json(&["registrymirror", "twice"]).await?),
            first
        );
    }
    let theirs = cp
        .kubectl_ok(&[
            "get",
            "statefulsets,services,configmaps",
            "-n",
            OTHER,
            "-o",
            "name",
        ])
        .await?;
    assert!(
        !theirs.contains("regmirror-twice"),
        "the second installation created children: {theirs}"
    );
    cp.kubectl_ok(&["delete", "registrymirror", "twice", "--timeout=60s"])
        .await?;

    // The first installation's operator stops (a restart, an outage): its
    // mirrors stay its own.
    op.stop(Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(
        installation_claim(cp).await?.as_deref(),
        Some("regmirror-system/regmirror-operator"),
        "the claim moved while the first installation was only stopped"
    );
    // Its uninstall hook releases the claim: the second takes over.
    set_installation_claim(cp, None).await?;
    wait_until(Duration::from_secs(30), || async {
        installation_claim(cp).await.ok().flatten().as_deref()
            == Some(&format!("{OTHER}/regmirror-operator"))
    })
    .await
    .with_context(|| format!("the second installation never took over:\n{}", second.log()))?;
    assert!(
        second
            .log()
            .contains("this installation now manages the RegistryMirrors")
    );
    // Back to one installation: the second goes as its uninstall hook would
    // leave it (claim released); the next turn restarts the first.
    second.stop(Duration::from_secs(10)).await?;
    set_installation_claim(cp, None).await?;
    Ok(())
}

/// What of `steady`'s children a write would change: the StatefulSet's
/// generation (spec changes only), the ConfigMap's data, the Service's ports.
async fn steady_children(
    cp: &ControlPlane,
) -> Result<(serde_json::Value, serde_json::Value, serde_json::Value)> {
    let sts = cp
        .get_json(&["statefulset", "regmirror-steady", "-n", NS])
        .await?
        .context("steady's StatefulSet")?;
    let cm = cp
        .get_json(&["configmap", "regmirror-steady", "-n", NS])
        .await?
        .context("steady's ConfigMap")?;
    let svc = cp
        .get_json(&["service", "regmirror-steady", "-n", NS])
        .await?
        .context("steady's Service")?;
    Ok((
        sts["metadata"]["generation"].clone(),
        cm["data"].clone(),
        svc["spec"]["ports"].clone(),
    ))
}

/// Issue 18, items 1 and 2: what only the cache's parser or the API server
/// can refuse sets `InvalidSpec` and writes no child, so the running cache
/// keeps its configuration and the nodes keep pointing at what it serves;
/// storage fields Kubernetes will not change are refused at apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_the_cache_or_the_api_server_refuses_leaves_the_running_cache_alone() -> Result<()> {
    let mut turn =
        turn("a_spec_the_cache_or_the_api_server_refuses_leaves_the_running_cache_alone").await;
    let (cp, op) = turn.cluster().await?;
    create_mirror(cp, op, "steady", "[{host: steady.example}]").await?;
    op.wait_for(
        cp,
        "steady generation 1 applied",
        &["registrymirror", "steady"],
        |m| {
            let m = m?;
            (m["status"]["observedGeneration"] == 1 && m["status"]["nodePort"].is_i64())
                .then_some(())
        },
    )
    .await?;
    let running = steady_children(cp).await?;
    let status0 = cp
        .get_json(&["registrymirror", "steady"])
        .await?
        .context("steady")?["status"]
        .clone();

    // Another Service holds a NodePort, which the mirror then asks for.
    let taken = 30000 + (std::process::id() % 2000) as u16;
    cp.apply_ok(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: holder, namespace: {NS}}}\nspec:\n  type: NodePort\n  selector: {{app: none}}\n  ports: [{{port: 80, nodePort: {taken}}}]\n"
    ))
    .await?;
    for (i, (patch, expected)) in [
        (
            r#"{"spec":{"cache":{"resources":{"limits":{"memory":"lots"}}}}}"#.to_owned(),
            "spec.cache.resources.limits.memory: \"lots\" is not a quantity",
        ),
        (
            r#"{"spec":{"cache":{"nodePort":80}}}"#.to_owned(),
            "spec.cache.nodePort: the API server refuses the cache's Service regmirror-steady",
        ),
        (
            format!(r#"{{"spec":{{"cache":{{"nodePort":{taken}}}}}}}"#),
            "already allocated",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        // Each bad edit also adds a host, which nodes must not be pointed at.
        let bad = patch.replacen(
            r#"{"spec":{"#,
            r#"{"spec":{"upstreams":[{"host":"steady.example"},{"host":"new.example"}],"#,
            1,
        );
        patch_mirror(cp, "steady", &bad).await?;
        let generation = 2 + 2 * i as i64;
        op.wait_for(
            cp,
            &format!("steady InvalidSpec for {patch}"),
            &["registrymirror", "steady"],
            |m| {
                let m = m?;
                let ready = condition(m, "Ready")?;
                (ready["reason"] == "InvalidSpec"
                    && ready["observedGeneration"] == generation
                    && ready["message"].as_str()?.contains(expected))
                .then_some(())
            },
        )
        .await?;
        let m = cp
            .get_json(&["registrymirror", "steady"])
            .await?
            .context("steady")?;
        assert_eq!(m["status"]["observedGeneration"], generation - 1, "{patch}");
        assert_eq!(m["status"]["hosts"], status0["hosts"], "{patch}");
        assert_eq!(m["status"]["nodePort"], status0["nodePort"], "{patch}");
        assert_eq!(
            steady_children(cp).await?,
            running,
            "{patch}: a child was written"
        );
        // Back to the running spec: Ready's reason leaves InvalidSpec.
        patch_mirror(
            cp,
            "steady",
            r#"{"spec":{"upstreams":[{"host":"steady.example"}],"cache":{"resources":null,"nodePort":null}}}"#,
        )
        .await?;
        op.wait_for(
            cp,
            "steady valid again",
            &["registrymirror", "steady"],
            |m| {
                let m = m?;
                (m["status"]["observedGeneration"] == generation + 1).then_some(())
            },
        )
        .await?;
    }

    // Item 2: what Kubernetes will not change on the claims is refused.
    for (patch, expected) in [
        (
            r#"{"spec":{"storage":{"accessMode":"ReadWriteMany"}}}"#,
            "accessMode is fixed",
        ),
        (
            r#"{"spec":{"storage":{"size":"512Mi"}}}"#,
            "storage.size may only grow",
        ),
        (
            r#"{"spec":{"storage":{"storageClassName":"fast"}}}"#,
            "storageClassName is fixed",
        ),
    ] {
        let out = cp
            .kubectl(&[
                "patch",
                "registrymirror",
                "steady",
                "--type=merge",
                "-p",
                patch,
            ])
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(expected),
            "{patch}: {stderr}"
        );
    }
    cp.kubectl_ok(&["delete", "service", "holder", "-n", NS])
        .await?;
    cp.kubectl_ok(&["delete", "registrymirror", "steady", "--wait=false"])
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_becomes_ready_with_owned_labelled_children_events_and_metrics() -> Result<()> {
    let mut turn =
        turn("a_mirror_becomes_ready_with_owned_labelled_children_events_and_metrics").await;
    let (cp, op) = turn.cluster().await?;
    create_mirror(cp, op, "hub", "[{host: docker.io}, {host: ghcr.io}]").await?;
    // The node's agent reports it configured.
    report(cp, "node-1", &[("hub", "Configured")]).await?;

    // Ready, with everything derived from the real children and the report.
    let hub = op
        .wait_for(cp, "hub Ready", &["registrymirror", "hub"], |m| {
            let m = m?;
            (condition(m, "Ready")?["status"] == "True").then(|| m.clone())
        })
        .await?;
    assert_eq!(
        hub["status"]["observedGeneration"],
        hub["metadata"]["generation"]
    );
    assert_eq!(hub["status"]["upstreams"], "docker.io,ghcr.io");
    assert_eq!(hub["status"]["nodesConfigured"], 1);
    assert_eq!(
        hub["status"]["nodes"],
        serde_json::json!([{"name": "node-1", "state": "Configured"}])
    );
    assert_eq!(condition(&hub, "CacheAvailable").unwrap()["status"], "True");
    assert_eq!(
        condition(&hub, "NodesConfigured").unwrap()["status"],
        "True"
    );
    assert_eq!(
        hub["metadata"]["finalizers"],
        serde_json::json!(["regmirror.dev/node-config"])
    );
    let node_port = hub["status"]["nodePort"].as_i64().context("nodePort")?;
    assert_eq!(hub["status"]["endpoint"], format!("<node-ip>:{node_port}"));
    let uid = hub["metadata"]["uid"].as_str().unwrap().to_owned();

    for (kind, name) in [
        ("configmap", "regmirror-hub"),
        ("serviceaccount", "regmirror-hub-cache"),
        ("role", "regmirror-hub-cache"),
        ("rolebinding", "regmirror-hub-cache"),
        ("service", "regmirror-hub-members"),
        ("statefulset", "regmirror-hub"),
        ("service", "regmirror-hub"),
    ] {
        let o = cp
            .get_json(&[kind, name, "-n", NS, "--show-managed-fields"])
            .await?
            .with_context(|| format!("{kind} {name} missing"))?;
        let owner = &o["metadata"]["ownerReferences"][0];
        assert_eq!(owner["uid"], uid.as_str(), "{kind} owner");
        assert_eq!(owner["kind"], "RegistryMirror");
        assert_eq!(owner["controller"], true);
        let labels = &o["metadata"]["labels"];
        assert_eq!(
            labels["app.kubernetes.io/managed-by"], "regmirror-operator",
            "{kind}"
        );
        assert_eq!(labels["app.kubernetes.io/instance"], "hub", "{kind}");
        assert_eq!(labels["app.kubernetes.io/part-of"], "regmirror", "{kind}");
        let managers: Vec<&str> = o["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["operation"] == "Apply")
            .map(|f| f["manager"].as_str().unwrap())
            .collect();
        assert_eq!(
            managers,
            ["regmirror-operator"],
            "{kind} applied by one field manager"
        );
    }
    // The node agents are the chart's, not the mirror's (issue 17).
    assert!(
        cp.get_json(&["daemonset", "regmirror-hub-agent", "-n", NS])
            .await?
            .is_none(),
        "a per-mirror agent DaemonSet was created"
    );
    let svc = cp
        .get_json(&["service", "regmirror-hub", "-n", NS])
        .await?
        .unwrap();
    assert_eq!(svc["spec"]["type"], "NodePort");
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Cluster");
    let cm = cp
        .get_json(&["configmap", "regmirror-hub", "-n", NS])
        .await?
        .unwrap();
    let config = cm["data"]["config.toml"].as_str().unwrap();
    assert!(
        config.contains("url = \"https://registry-1.docker.io\""),
        "{config}"
    );
    // Dual-stack: nodes reach the cache over IPv4 and IPv6 (issue 18).
    assert!(config.contains("listen = \"[::]:5000\""), "{config}");
    let sts = cp
        .get_json(&["statefulset", "regmirror-hub", "-n", NS])
        .await?
        .unwrap();
    assert_eq!(sts["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(hub["status"]["cache"]["members"], "1/1");

    let table = cp.kubectl_ok(&["get", "registrymirrors"]).await?;
    assert!(
        table.contains("READY")
            && table.contains("UPSTREAMS")
            && table.contains("ENDPOINT")
            && table.contains("MEMBERS")
            && table.contains("docker.io,ghcr.io"),
        "{table}"
    );

    // Events on the mirror (cluster-scoped objects' events live in `default`).
    op.wait_for(
        cp,
        "Created and Ready events for hub",
        &["events", "-n", "default"],
        |l| {
            let reasons: Vec<&str> = l?["items"]
                .as_array()?
                .iter()
                .filter(|e| e["involvedObject"]["name"] == "hub")
                .filter_map(|e| e["reason"].as_str())
                .collect();
            (reasons.contains(&"Created") && reasons.contains(&"Ready")).then_some(())
        },
    )
    .await?;

    // The leader lease names this replica; metrics count reconciles.
    let lease = cp
        .get_json(&["lease", "regmirror-operator", "-n", NS])
        .await?
        .context("lease")?;
    assert_eq!(lease["spec"]["holderIdentity"], IDENTITY);
    let metrics = regmirror_e2e::http_client()
        .get(format!("{}/metrics", op.metrics_url))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("regmirror_operator_reconciles_total{mirror=\"hub\"}"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_mirror_loses_a_shared_host_until_the_older_is_deleted() -> Result<()> {
    let mut turn = turn("a_later_mirror_loses_a_shared_host_until_the_older_is_deleted").await;
    let (cp, op) = turn.cluster().await?;
    // Created in this order, and named so that the older also wins a tie on
    // the (one-second) creation time.
    create_mirror(cp, op, "first", "[{host: registry.k8s.io}]").await?;

    // A second mirror claiming registry.k8s.io loses it to the older one.
    create_mirror(
        cp,
        op,
        "second",
        "[{host: registry.k8s.io}, {host: quay.io}]",
    )
    .await?;
    let second = op
        .wait_for(
            cp,
            "second HostConflict",
            &["registrymirror", "second"],
            |m| {
                let m = m?;
                (condition(m, "Ready")?["reason"] == "HostConflict").then(|| m.clone())
            },
        )
        .await?;
    let msg = condition(&second, "Ready").unwrap()["message"]
        .as_str()
        .unwrap();
    assert!(
        msg.contains("registry.k8s.io is already mirrored by RegistryMirror \"first\""),
        "{msg}"
    );
    assert_eq!(second["status"]["hosts"], serde_json::json!(["quay.io"]));
    assert_eq!(
        second["status"]["upstreams"],
        "registry.k8s.io(conflict),quay.io"
    );

    // Deleting first runs the finalizer: children go, then the mirror, and
    // `second` gets registry.k8s.io.
    cp.kubectl_ok(&["delete", "registrymirror", "first", "--wait=false"])
        .await?;
    op.wait_for(cp, "first gone", &["registrymirror", "first"], |m| {
        m.is_none().then_some(())
    })
    .await?;
    for (kind, name) in [
        ("statefulset", "regmirror-first"),
        ("service", "regmirror-first-members"),
        ("role", "regmirror-first-cache"),
        ("daemonset", "regmirror-first-agent"),
        ("configmap", "regmirror-first"),
        ("service", "regmirror-first"),
    ] {
        assert!(
            cp.get_json(&[kind, name, "-n", NS]).await?.is_none(),
            "{kind} {name} left behind"
        );
    }
    op.wait_for(
        cp,
        "second takes registry.k8s.io",
        &["registrymirror", "second"],
        |m| {
            let hosts = m?["status"]["hosts"].as_array()?.clone();
            (hosts.len() == 2).then_some(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_change_rolls_the_cache_config() -> Result<()> {
    let mut turn = turn("a_spec_change_rolls_the_cache_config").await;
    let (cp, op) = turn.cluster().await?;
    create_mirror(cp, op, "rolled", "[{host: mcr.microsoft.com}]").await?;
    let hash = |d: &serde_json::Value| {
        d["spec"]["template"]["metadata"]["annotations"]["regmirror.dev/config-hash"]
            .as_str()
            .map(str::to_owned)
    };
    let sts = cp
        .get_json(&["statefulset", "regmirror-rolled", "-n", NS])
        .await?
        .context("rolled's StatefulSet")?;
    let hash1 = hash(&sts).context("config hash")?;

    // A spec change rolls the ConfigMap and the pod template.
    patch_mirror(cp, "rolled", r#"{"spec":{"cache":{"tagTTL":"5m"}}}"#).await?;
    op.wait_for(
        cp,
        "rolled config rolled",
        &["statefulset", "regmirror-rolled", "-n", NS],
        |d| (hash(d?)? != hash1).then_some(()),
    )
    .await?;
    let cm = cp
        .get_json(&["configmap", "regmirror-rolled", "-n", NS])
        .await?
        .unwrap();
    assert!(
        cm["data"]["config.toml"]
            .as_str()
            .unwrap()
            .contains("tag_ttl = \"5m\"")
    );
    op.wait_for(
        cp,
        "rolled observedGeneration 2",
        &["registrymirror", "rolled"],
        |m| {
            let m = m?;
            (m["status"]["observedGeneration"] == m["metadata"]["generation"]
                && m["metadata"]["generation"] == 2)
                .then_some(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_operator_the_finalizer_holds_and_the_garbage_collector_cleans_up() -> Result<()>
{
    let mut turn =
        turn("without_the_operator_the_finalizer_holds_and_the_garbage_collector_cleans_up").await;
    let (cp, op) = turn.cluster().await?;
    create_mirror(cp, op, "held", "[{host: public.ecr.aws}]").await?;

    // With the operator stopped (it releases its lease), the finalizer holds
    // a deleted mirror...
    op.stop(Duration::from_secs(10)).await?;
    let lease = cp
        .get_json(&["lease", "regmirror-operator", "-n", NS])
        .await?
        .unwrap();
    assert!(
        lease["spec"]["holderIdentity"].is_null(),
        "lease released on shutdown: {lease}"
    );
    cp.kubectl_ok(&["delete", "registrymirror", "held", "--wait=false"])
        .await?;
    // Without a finalizer the API server would remove it at once; with one it
    // is only marked.
    let held = op
        .wait_for(
            cp,
            "held marked deleted",
            &["registrymirror", "held"],
            |m| match m {
                None => Some(None),
                Some(m) => m["metadata"]["deletionTimestamp"]
                    .is_string()
                    .then(|| Some(m.clone())),
            },
        )
        .await?
        .context("held deleted without its finalizer")?;
    assert!(held["metadata"]["deletionTimestamp"].is_string());
    // ...and without it, kube-controller-manager's garbage collector removes
    // the children through their owner references.
    patch_mirror(cp, "held", r#"{"metadata":{"finalizers":null}}"#).await?;
    op.wait_for(
        cp,
        "held's StatefulSet garbage-collected",
        &["statefulset", "regmirror-held", "-n", NS],
        |d| d.is_none().then_some(()),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_registrys_only_credentials_entry_is_never_copied() -> Result<()> {
    let mut turn = turn("another_registrys_only_credentials_entry_is_never_copied").await;
    let (cp, op) = turn.cluster().await?;
    const TOKEN: &str = "ghcr-token-for-ghcr-only";
    cp.kubectl_ok(&[
        "create",
        "secret",
        "docker-registry",
        "ghcr-only",
        "-n",
        NS,
        "--docker-server=ghcr.io",
        "--docker-username=robot",
        &format!("--docker-password={TOKEN}"),
    ])
    .await?;
    cp.apply_ok(&mirror_yaml(
        "quayed",
        "[{host: quay.io, credentialsSecret: {name: ghcr-only}}]",
        "  storage: {size: 1Gi}\n",
    ))
    .await?;
    let ready = op
        .wait_for(
            cp,
            "quayed CredentialsUnavailable",
            &["registrymirror", "quayed"],
            |m| {
                let c = condition(m?, "Ready")?;
                (c["reason"] == "CredentialsUnavailable").then(|| c.clone())
            },
        )
        .await?;
    assert_eq!(ready["status"], "False");
    assert_eq!(
        ready["message"],
        "credentialsSecret ghcr-only has no entry for quay.io (it has: ghcr.io); add one keyed by quay.io"
    );
    // Nothing carries the ghcr.io token to quay.io's cache.
    assert!(
        cp.get_json(&["secret", "regmirror-quayed-credentials", "-n", NS])
            .await?
            .is_none(),
        "credentials Secret copied for quayed"
    );
    for kind in ["configmap", "statefulset"] {
        assert!(
            cp.get_json(&[kind, "regmirror-quayed", "-n", NS])
                .await?
                .is_none(),
            "{kind} applied for quayed"
        );
    }
    cp.kubectl_ok(&["delete", "registrymirror", "quayed", "--wait=false"])
        .await?;
    Ok(())
}

/// A PersistentVolume of StorageClass `class` (none exists: binding matches
/// the name), 1Gi, with `policy` as its reclaim policy; its hostPath is never
/// mounted (kwok's pods run nothing).
fn class_pv_yaml(name: &str, class: &str, policy: &str) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {name}\nspec:\n  capacity: {{storage: 1Gi}}\n  accessModes: [ReadWriteOnce]\n  storageClassName: {class}\n  persistentVolumeReclaimPolicy: {policy}\n  hostPath: {{path: /tmp/regmirror-e2e-never-mounted/{name}}}\n"
    )
}

/// The members a cache process's view held when it last changed, as its
/// discovery logs them (`cluster members: a,b,c`).
fn members_seen(member: &CacheProcess) -> Option<String> {
    member.log().lines().rev().find_map(|l| {
        let (_, rest) = l.split_once("cluster members: ")?;
        Some(
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
        )
    })
}

/// Waits until every one of `members` sees exactly `expected` (names, comma-separated).
async fn wait_for_views(members: &[&CacheProcess], expected: &str) -> Result<()> {
    wait_until(Duration::from_secs(60), || async {
        members
            .iter()
            .all(|m| members_seen(m).as_deref() == Some(expected))
    })
    .await
    .with_context(|| {
        let seen: Vec<String> = members
            .iter()
            .map(|m| format!("{:?}\n{}", members_seen(m), m.log_tail(10)))
            .collect();
        format!("views {expected:?}; seen: {seen:#?}")
    })
}

/// The IP and uid of pod `name` once it is Ready (kwok runs nothing, but
/// gives it an address and the Ready condition).
async fn ready_pod(
    cp: &ControlPlane,
    op: &mut OperatorProcess,
    name: &str,
) -> Result<(String, String)> {
    op.wait_for(
        cp,
        &format!("pod {name} Ready"),
        &["pod", name, "-n", NS],
        |p| {
            let p = p?;
            let ready = p["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            let ip = p["status"]["podIP"].as_str()?;
            ready.then(|| {
                (
                    ip.to_owned(),
                    p["metadata"]["uid"].as_str().unwrap_or_default().to_owned(),
                )
            })
        },
    )
    .await
}

/// Issue 16, test 8: the operator renders the cache cluster (StatefulSet,
/// headless Service, a Role that only reads EndpointSlices, the discovery
/// configuration); real `regmirror-cache` processes, one per member pod, run
/// with that configuration and the members' ServiceAccount token and find
/// each other through the EndpointSlices the controller-manager writes from
/// kwok's pods; scaling 1 -> 3 -> 1 changes every view and restarts nothing
/// (same processes, same pod, same pod template).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_members_discover_each_other_and_scaling_restarts_none() -> Result<()> {
    let mut turn = turn("cache_members_discover_each_other_and_scaling_restarts_none").await;
    let (cp, op) = turn.cluster().await?;
    for i in 0..3 {
        cp.apply_ok(&class_pv_yaml(&format!("pool-pv-{i}"), "pool", "Retain"))
            .await?;
    }
    cp.apply_ok(&mirror_yaml(
        "pool",
        "[{host: gcr.io}]",
        "  storage: {size: 1Gi, storageClassName: pool}\n  cache: {maxSize: 2Gi}\n",
    ))
    .await?;
    report(cp, "node-1", &[("pool", "Configured")]).await?;
    ready_with_members(cp, op, "pool", "1/1").await?;

    // What the operator rendered.
    let sts = cp
        .get_json(&["statefulset", "regmirror-pool", "-n", NS])
        .await?
        .context("StatefulSet")?;
    assert_eq!(sts["spec"]["serviceName"], "regmirror-pool-members");
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    let pod_spec = &sts["spec"]["template"]["spec"];
    assert_eq!(pod_spec["serviceAccountName"], "regmirror-pool-cache");
    assert!(
        pod_spec["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "REGMIRROR_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"),
        "{pod_spec}"
    );
    let headless = cp
        .get_json(&["service", "regmirror-pool-members", "-n", NS])
        .await?
        .context("headless Service")?;
    assert_eq!(headless["spec"]["clusterIP"], "None");
    let entry = cp
        .get_json(&["service", "regmirror-pool", "-n", NS])
        .await?
        .context("NodePort Service")?;
    assert_eq!(entry["spec"]["type"], "NodePort");
    assert_eq!(entry["spec"]["selector"], headless["spec"]["selector"]);
    let claim = cp
        .get_json(&["pvc", "data-regmirror-pool-0", "-n", NS])
        .await?
        .context("member 0's claim")?;
    assert_eq!(claim["spec"]["storageClassName"], "pool");
    let cm = cp
        .get_json(&["configmap", "regmirror-pool", "-n", NS])
        .await?
        .context("ConfigMap")?;
    let config = cm["data"]["config.toml"].as_str().unwrap().to_owned();
    assert!(
        config.contains("[cluster.discovery]\nservice = \"regmirror-pool-members\""),
        "{config}"
    );
    assert!(
        config.contains("max_size = 2147483648"),
        "the cluster's budget: {config}"
    );
    // The members' identity reads EndpointSlices of this namespace, nothing else.
    let cache_sa = format!("system:serviceaccount:{NS}:regmirror-pool-cache");
    for (args, allowed) in [
        (
            &["get", "endpointslices.discovery.k8s.io", "-n", NS][..],
            true,
        ),
        (&["list", "endpointslices.discovery.k8s.io", "-n", NS], true),
        (
            &["watch", "endpointslices.discovery.k8s.io", "-n", NS],
            true,
        ),
        (
            &["create", "endpointslices.discovery.k8s.io", "-n", NS],
            false,
        ),
        (
            &["list", "endpointslices.discovery.k8s.io", "-n", "default"],
            false,
        ),
        (&["get", "pods", "-n", NS], false),
        (&["get", "secrets", "-n", NS], false),
        (&["get", "registrymirrors.regmirror.dev"], false),
    ] {
        assert_eq!(
            cp.can_i(&cache_sa, args).await?,
            allowed,
            "cache: can-i {}",
            args.join(" ")
        );
    }

    // Member processes on loopback, as the pods would run them.
    let work = tempfile::Builder::new()
        .prefix("regmirror-pool-")
        .tempdir()?;
    let config_file = work.path().join("config.toml");
    std::fs::write(&config_file, &config)?;
    let kubeconfig = cp
        .token_kubeconfig(NS, "regmirror-pool-cache", "pool-cache.kubeconfig")
        .await?;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let start = |i: usize, addresses: String| {
        CacheProcess::start_with(
            CacheOptions::new()
                .config(&config_file)
                .arg("--listen")
                .arg(format!("127.0.0.1:{}", ports[i]))
                .env("KUBECONFIG", kubeconfig.to_str().unwrap())
                .env("REGMIRROR_NAME", &format!("regmirror-pool-{i}"))
                .env("REGMIRROR_TEST_PEER_ADDRESSES", &addresses),
        )
    };
    let mapping = |ips: &[String]| {
        ips.iter()
            .zip(&ports)
            .map(|(ip, port)| format!("{ip}=127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let (ip0, uid0) = ready_pod(cp, op, "regmirror-pool-0").await?;
    let mut m0 = start(0, mapping(std::slice::from_ref(&ip0))).await?;
    let pid0 = m0.pid().context("member 0's pid")?;
    wait_for_views(&[&m0], "regmirror-pool-0").await?;

    // 1 -> 3: only the replicas change.
    let revision =
        |s: &serde_json::Value| s["status"]["updateRevision"].as_str().map(str::to_owned);
    let revision1 = revision(&sts).context("updateRevision")?;
    patch_mirror(cp, "pool", r#"{"spec":{"cache":{"replicas":3}}}"#).await?;
    let mut ips = vec![ip0];
    for i in 1..3 {
        ips.push(ready_pod(cp, op, &format!("regmirror-pool-{i}")).await?.0);
    }
    let m1 = start(1, mapping(&ips)).await?;
    let m2 = start(2, mapping(&ips)).await?;
    let all = "regmirror-pool-0,regmirror-pool-1,regmirror-pool-2";
    wait_for_views(&[&m0, &m1, &m2], all).await?;
    op.wait_for(cp, "pool 3/3 members", &["registrymirror", "pool"], |m| {
        (m?["status"]["cache"]["members"] == "3/3").then_some(())
    })
    .await?;
    let scaled = cp
        .get_json(&["statefulset", "regmirror-pool", "-n", NS])
        .await?
        .context("StatefulSet")?;
    assert_eq!(
        scaled["spec"]["template"], sts["spec"]["template"],
        "pod template changed"
    );
    assert_eq!(
        revision(&scaled),
        Some(revision1.clone()),
        "a new revision rolls members"
    );

    // 3 -> 1: the survivors see it at once; member 0 was never restarted.
    patch_mirror(cp, "pool", r#"{"spec":{"cache":{"replicas":1}}}"#).await?;
    wait_for_views(&[&m0], "regmirror-pool-0").await?;
    assert!(
        m0.is_running() && m0.pid() == Some(pid0),
        "member 0 restarted"
    );
    let (_, uid) = ready_pod(cp, op, "regmirror-pool-0").await?;
    assert_eq!(uid, uid0, "member 0's pod was replaced");
    let after = cp
        .get_json(&["statefulset", "regmirror-pool", "-n", NS])
        .await?
        .context("StatefulSet")?;
    assert_eq!(revision(&after), Some(revision1));
    // Claims of removed members stay, for when they come back.
    assert!(
        cp.get_json(&["pvc", "data-regmirror-pool-2", "-n", NS])
            .await?
            .is_some()
    );
    // Discovery kept its watch: no refused or failed request in any log.
    for m in [&m0, &m1, &m2] {
        let log = m.log();
        assert!(
            !log.contains("forbidden") && !log.contains("watching EndpointSlices failed"),
            "{log}"
        );
    }
    drop((m1, m2));
    cp.kubectl_ok(&["delete", "registrymirror", "pool", "--wait=false"])
        .await?;
    Ok(())
}

/// A mirror the single-Deployment operator made (its Deployment and one claim
/// bound to a volume whose reclaim policy is Delete) is moved to the
/// StatefulSet with its content: member 0's claim is bound to the same
/// volume, which survives with its policy restored, and the old Deployment
/// and claim are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_layout_mirror_hands_its_volume_to_member_zero() -> Result<()> {
    let mut turn = turn("an_old_layout_mirror_hands_its_volume_to_member_zero").await;
    {
        // The old layout, made while the operator is stopped, as the old
        // operator made it: owned by the mirror, labelled as its cache.
        let (cp, op) = turn.cluster().await?;
        op.stop(Duration::from_secs(10)).await?;
        cp.apply_ok(&class_pv_yaml("legacy-pv", "legacy", "Delete"))
            .await?;
        cp.apply_ok(&mirror_yaml(
            "legacy",
            "[{host: registry.legacy.example}]",
            "  storage: {size: 1Gi, storageClassName: legacy}\n",
        ))
        .await?;
        let mirror = cp
            .get_json(&["registrymirror", "legacy"])
            .await?
            .context("mirror")?;
        let uid = mirror["metadata"]["uid"].as_str().unwrap();
        let meta = format!(
            "  name: regmirror-legacy\n  namespace: {NS}\n  labels: {{app.kubernetes.io/name: regmirror, app.kubernetes.io/instance: legacy, app.kubernetes.io/component: cache, app.kubernetes.io/managed-by: regmirror-operator, app.kubernetes.io/part-of: regmirror, regmirror.dev/mirror: legacy}}\n  ownerReferences: [{{apiVersion: regmirror.dev/v1alpha1, kind: RegistryMirror, name: legacy, uid: {uid}, controller: true, blockOwnerDeletion: true}}]\n"
        );
        cp.apply_ok(&format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n{meta}spec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: legacy\n  resources: {{requests: {{storage: 1Gi}}}}\n"
        ))
        .await?;
        cp.apply_ok(&format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n{meta}spec:\n  replicas: 1\n  strategy: {{type: Recreate}}\n  selector:\n    matchLabels: {{app.kubernetes.io/name: regmirror, app.kubernetes.io/instance: legacy, app.kubernetes.io/component: cache}}\n  template:\n    metadata:\n      labels: {{app.kubernetes.io/name: regmirror, app.kubernetes.io/instance: legacy, app.kubernetes.io/component: cache}}\n    spec:\n      containers: [{{name: cache, image: regmirror/cache:old}}]\n      volumes: [{{name: data, persistentVolumeClaim: {{claimName: regmirror-legacy}}}}]\n"
        ))
        .await?;
        op.wait_for(
            cp,
            "the old cache running",
            &["deployment", "regmirror-legacy", "-n", NS],
            |d| (d?["status"]["availableReplicas"] == 1).then_some(()),
        )
        .await?;
        let old = cp
            .get_json(&["pvc", "regmirror-legacy", "-n", NS])
            .await?
            .context("old claim")?;
        assert_eq!(old["spec"]["volumeName"], "legacy-pv");
    }

    // The operator (restarted by the turn) migrates, then runs the StatefulSet.
    let (cp, op) = turn.cluster().await?;
    let claim = op
        .wait_for(
            cp,
            "member 0's claim bound",
            &["pvc", "data-regmirror-legacy-0", "-n", NS],
            |c| {
                let c = c?;
                (c["status"]["phase"] == "Bound").then(|| c.clone())
            },
        )
        .await?;
    assert_eq!(claim["spec"]["volumeName"], "legacy-pv");
    op.wait_for(
        cp,
        "legacy 1/1 members",
        &["registrymirror", "legacy"],
        |m| (m?["status"]["cache"]["members"] == "1/1").then_some(()),
    )
    .await?;
    let pv = cp
        .get_json(&["pv", "legacy-pv"])
        .await?
        .context("the old volume survived")?;
    assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Delete");
    assert_eq!(pv["spec"]["claimRef"]["name"], "data-regmirror-legacy-0");
    assert_eq!(pv["status"]["phase"], "Bound");
    assert!(
        pv["metadata"]["annotations"]["regmirror.dev/original-reclaim-policy"].is_null(),
        "{pv}"
    );
    for (kind, name) in [
        ("deployment", "regmirror-legacy"),
        ("pvc", "regmirror-legacy"),
    ] {
        assert!(
            cp.get_json(&[kind, name, "-n", NS]).await?.is_none(),
            "{kind} {name} left behind"
        );
    }
    cp.kubectl_ok(&["delete", "registrymirror", "legacy", "--wait=false"])
        .await?;
    Ok(())
}

/// `(nodesDesired, nodesConfigured)` of a mirror.
fn counts(m: &serde_json::Value) -> (i64, i64) {
    (
        m["status"]["nodesDesired"].as_i64().unwrap_or(-1),
        m["status"]["nodesConfigured"].as_i64().unwrap_or(-1),
    )
}

/// Issue 17: Ready means configured. Counts and `status.nodes` come from the
/// agents' reports of nodes that exist and are selected: nothing before a
/// report (while every node runs an agent pod, as kwok's do), a report from
/// a node the mirror does not select counts for nothing, a deleted node and
/// nodes left out by a narrowed selector are pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_counts_only_reports_of_existing_selected_nodes() -> Result<()> {
    let mut turn = turn("ready_counts_only_reports_of_existing_selected_nodes").await;
    let (cp, op) = turn.cluster().await?;
    let nodes = ["agg-1", "agg-2", "agg-3"];
    pooled_mirror(cp, "agg", &nodes).await?;

    // The cache is up, no agent has reported: not Ready, every node Pending.
    let m = op
        .wait_for(
            cp,
            "agg: cache up, 0/3 nodes",
            &["registrymirror", "agg"],
            |m| {
                let m = m?;
                (condition(m, "CacheAvailable")?["status"] == "True" && counts(m) == (3, 0))
                    .then(|| m.clone())
            },
        )
        .await?;
    let ready = condition(&m, "Ready").unwrap();
    assert_eq!(ready["status"], "False", "{ready}");
    assert_eq!(ready["reason"], "NodesPending", "{ready}");
    assert!(
        node_entries(&m).iter().all(|(_, s)| s == "Pending") && node_entries(&m).len() == 3,
        "{m}"
    );
    assert!(
        cp.get_json(&["daemonset", "regmirror-agg-agent", "-n", NS])
            .await?
            .is_none()
    );

    // Two report; node-1 (not selected) reports too and counts for nothing.
    report(cp, "agg-1", &[("agg", "Configured")]).await?;
    report(cp, "agg-2", &[("agg", "Configured")]).await?;
    report(cp, "node-1", &[("agg", "Configured")]).await?;
    let m = op
        .wait_for(cp, "agg: 2/3 nodes", &["registrymirror", "agg"], |m| {
            let m = m?;
            (counts(m) == (3, 2)).then(|| m.clone())
        })
        .await?;
    assert_eq!(condition(&m, "Ready").unwrap()["status"], "False");
    assert_eq!(
        node_entries(&m),
        [
            ("agg-3".to_owned(), "Pending".to_owned()),
            ("agg-1".into(), "Configured".into()),
            ("agg-2".into(), "Configured".into()),
        ],
        "problems first, nothing of node-1"
    );

    // The last one: Ready.
    report(cp, "agg-3", &[("agg", "Configured")]).await?;
    let m = op
        .wait_for(cp, "agg Ready", &["registrymirror", "agg"], |m| {
            let m = m?;
            (condition(m, "Ready")?["status"] == "True").then(|| m.clone())
        })
        .await?;
    assert_eq!(counts(&m), (3, 3));
    assert_eq!(
        condition(&m, "NodesConfigured").unwrap()["message"],
        "3/3 nodes configured"
    );

    // A deleted node is pruned (its report stays: nothing owns it here).
    cp.kubectl_ok(&["delete", "node", "agg-3"]).await?;
    let m = op
        .wait_for(cp, "agg: agg-3 pruned", &["registrymirror", "agg"], |m| {
            let m = m?;
            (counts(m) == (2, 2)).then(|| m.clone())
        })
        .await?;
    assert!(node_entries(&m).iter().all(|(n, _)| n != "agg-3"), "{m}");
    assert_eq!(condition(&m, "Ready").unwrap()["status"], "True");

    // A narrowed selector: the node left out is no longer counted.
    cp.kubectl_ok(&["label", "node", "agg-1", "tier=gold"])
        .await?;
    patch_mirror(
        cp,
        "agg",
        r#"{"spec":{"nodes":{"nodeSelector":{"pool":"agg","tier":"gold"}}}}"#,
    )
    .await?;
    let m = op
        .wait_for(
            cp,
            "agg: agg-2 de-selected",
            &["registrymirror", "agg"],
            |m| {
                let m = m?;
                (counts(m) == (1, 1)).then(|| m.clone())
            },
        )
        .await?;
    assert_eq!(
        node_entries(&m),
        [("agg-1".to_owned(), "Configured".to_owned())]
    );

    // Labels count too: agg-2 labelled in is selected again, and Pending
    // until its agent reports the mirror (it had dropped the entry).
    report(cp, "agg-2", &[("agg", "Gone")]).await?;
    cp.kubectl_ok(&["label", "node", "agg-2", "tier=gold"])
        .await?;
    op.wait_for(
        cp,
        "agg: agg-2 selected again",
        &["registrymirror", "agg"],
        |m| {
            let m = m?;
            (counts(m) == (2, 1) && condition(m, "Ready")?["status"] == "False").then_some(())
        },
    )
    .await?;

    report(cp, "agg-1", &[("agg", "Removed")]).await?;
    report(cp, "node-1", &[("agg", "Gone")]).await?;
    cp.kubectl_ok(&["delete", "registrymirror", "agg", "--wait=false"])
        .await?;
    mirror_gone(cp, op, "agg").await?;
    remove_nodes(cp, &nodes).await
}

/// Issue 17: deletion waits for the existing nodes whose agent still reports
/// configuration of the mirror, names them in the condition, does not wait
/// for a node that is gone (even one that reported), and lets go once they
/// report `Removed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_waits_only_for_existing_nodes_still_reporting_the_mirror() -> Result<()> {
    let mut turn = turn("deletion_waits_only_for_existing_nodes_still_reporting_the_mirror").await;
    let (cp, op) = turn.cluster().await?;
    let nodes = ["del-1", "del-2", "del-3"];
    pooled_mirror(cp, "del", &nodes).await?;
    op.wait_for(cp, "del finalized", &["registrymirror", "del"], |m| {
        m?["metadata"]["finalizers"].as_array().map(drop)
    })
    .await?;
    for n in nodes {
        report(cp, n, &[("del", "Configured")]).await?;
    }
    // del-3 reported, then went away with its files.
    cp.kubectl_ok(&["delete", "node", "del-3"]).await?;
    op.wait_for(cp, "del: 2 nodes", &["registrymirror", "del"], |m| {
        (counts(m?) == (2, 2)).then_some(())
    })
    .await?;

    cp.kubectl_ok(&["delete", "registrymirror", "del", "--wait=false"])
        .await?;
    report(cp, "del-1", &[("del", "Removed")]).await?;
    let waiting = "waiting for node agents to remove their configuration from del-2";
    let ready = op
        .wait_for(cp, "del waits for del-2", &["registrymirror", "del"], |m| {
            let c = condition(m?, "Ready")?;
            (c["reason"] == "Deleting" && c["message"].as_str()?.ends_with(waiting))
                .then(|| c.clone())
        })
        .await?;
    assert!(
        !ready["message"].as_str().unwrap().contains("del-3"),
        "{ready}"
    );
    // It keeps waiting (and says so in the log) while del-2 has not removed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        cp.get_json(&["registrymirror", "del"]).await?.is_some(),
        "released before del-2 removed its configuration"
    );
    assert!(op.log().contains(waiting), "the log names del-2");

    report(cp, "del-2", &[("del", "Removed")]).await?;
    mirror_gone(cp, op, "del").await?;
    remove_nodes(cp, &nodes).await
}

/// Issue 17: node configuration power stays with the installer. A mirror
/// asking for the node's root directory, or for another agent image, is
/// refused with a condition saying what is allowed and where the installer
/// sets it; nothing runs for it on the nodes (no DaemonSet at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_asking_for_the_nodes_root_or_a_foreign_agent_image_is_refused() -> Result<()> {
    let mut turn =
        turn("a_mirror_asking_for_the_nodes_root_or_a_foreign_agent_image_is_refused").await;
    let (cp, op) = turn.cluster().await?;
    // Claims of a class nothing provides: these caches need no volume.
    let storage = "  storage: {size: 1Gi, storageClassName: refused}\n";
    cp.apply_ok(&mirror_yaml(
        "rootdir",
        "[{host: root.example}]",
        &format!("{storage}  nodes: {{containerdConfigDir: /}}\n"),
    ))
    .await?;
    cp.apply_ok(&mirror_yaml(
        "foreign",
        "[{host: foreign.example}]",
        &format!("{storage}  nodes: {{agentImage: \"attacker.example/anything:latest\"}}\n"),
    ))
    .await?;
    for (mirror, reason, says) in [
        (
            "rootdir",
            "ConfigDirNotAllowed",
            [
                "spec.nodes.containerdConfigDir \"/\"",
                "/etc/containerd",
                "agent.hostDirs",
            ],
        ),
        (
            "foreign",
            "AgentImageNotAllowed",
            [
                "attacker.example/anything:latest",
                "registry.invalid/regmirror-operator:test",
                "agent.image",
            ],
        ),
    ] {
        let m = op
            .wait_for(
                cp,
                &format!("{mirror} refused"),
                &["registrymirror", mirror],
                |m| {
                    let m = m?;
                    (condition(m, "NodesConfigured")?["reason"] == reason).then(|| m.clone())
                },
            )
            .await?;
        // No host published for the nodes: agents write nothing for it.
        assert_eq!(m["status"]["hosts"], serde_json::json!([]), "{mirror}");
        for ty in ["Ready", "NodesConfigured"] {
            let c = condition(&m, ty).unwrap();
            assert_eq!(
                (&c["status"], &c["reason"]),
                (&"False".into(), &reason.into()),
                "{c}"
            );
            let message = c["message"].as_str().unwrap();
            for s in says {
                assert!(
                    message.contains(s),
                    "{ty} of {mirror} lacks {s:?}: {message}"
                );
            }
        }
    }
    let daemon_sets = cp
        .get_json(&["daemonsets", "-n", NS])
        .await?
        .context("daemonsets")?;
    assert_eq!(
        daemon_sets["items"],
        serde_json::json!([]),
        "nothing runs on the nodes for a mirror"
    );
    for mirror in ["rootdir", "foreign"] {
        cp.kubectl_ok(&["delete", "registrymirror", mirror, "--wait=false"])
            .await?;
    }
    Ok(())
}

/// Issue 17, migration: a mirror's agent DaemonSet from the per-mirror
/// layout (`regmirror-<m>-agent`, owned by the mirror) stays, named in the
/// status, until the shared agent reports on every node the mirror selects,
/// then is deleted; the old agents' own entries in `status.nodes` are
/// replaced by the aggregated list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_mirror_agents_are_retired_once_the_shared_agent_reports_every_node() -> Result<()> {
    let mut turn =
        turn("per_mirror_agents_are_retired_once_the_shared_agent_reports_every_node").await;
    let nodes = ["mig-1", "mig-2"];
    {
        // What the old operator left, made while this one is stopped.
        let (cp, op) = turn.cluster().await?;
        op.stop(Duration::from_secs(10)).await?;
        pooled_mirror(cp, "mig", &nodes).await?;
        let mirror = cp
            .get_json(&["registrymirror", "mig"])
            .await?
            .context("mirror")?;
        let uid = mirror["metadata"]["uid"].as_str().unwrap();
        let labels = "{app.kubernetes.io/name: regmirror, app.kubernetes.io/instance: mig, app.kubernetes.io/component: node-agent}";
        cp.apply_ok(&format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: regmirror-mig-agent\n  namespace: {NS}\n  labels: {labels}\n  ownerReferences: [{{apiVersion: regmirror.dev/v1alpha1, kind: RegistryMirror, name: mig, uid: {uid}, controller: true, blockOwnerDeletion: true}}]\nspec:\n  selector: {{matchLabels: {labels}}}\n  template:\n    metadata: {{labels: {labels}}}\n    spec:\n      nodeSelector: {{pool: mig}}\n      tolerations: [{{operator: Exists}}]\n      containers: [{{name: agent, image: regmirror/operator:old, args: [agent]}}]\n"
        ))
        .await?;
        // An old agent's own entry, with its heartbeat.
        cp.kubectl_ok(&[
            "patch",
            "registrymirror",
            "mig",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"nodes":[{"name":"mig-1","state":"Configured","lastUpdate":"2026-01-01T00:00:00Z"},{"name":"old-node","state":"Configured","lastUpdate":"2026-01-01T00:00:00Z"}]}}"#,
        ])
        .await?;
    }

    // The operator (restarted by the turn) keeps the old agents while the
    // shared one has not reported on every selected node.
    let (cp, op) = turn.cluster().await?;
    let m = op
        .wait_for(
            cp,
            "mig: old agents kept",
            &["registrymirror", "mig"],
            |m| {
                let m = m?;
                let c = condition(m, "NodesConfigured")?;
                c["message"]
                    .as_str()?
                    .contains("has not taken over mig-1, mig-2 yet")
                    .then(|| m.clone())
            },
        )
        .await?;
    assert!(
        condition(&m, "NodesConfigured").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("regmirror-mig-agent"),
        "{m}"
    );
    // The old agents' entries are gone: the aggregated list only, no heartbeat.
    assert_eq!(
        m["status"]["nodes"],
        serde_json::json!([
            {"name": "mig-1", "state": "Pending", "message": "no report from the node agent on this node yet"},
            {"name": "mig-2", "state": "Pending", "message": "no report from the node agent on this node yet"},
        ])
    );
    report(cp, "mig-1", &[("mig", "Configured")]).await?;
    op.wait_for(cp, "mig: mig-2 left", &["registrymirror", "mig"], |m| {
        let c = condition(m?, "NodesConfigured")?;
        c["message"]
            .as_str()?
            .contains("has not taken over mig-2 yet")
            .then_some(())
    })
    .await?;
    assert!(
        cp.get_json(&["daemonset", "regmirror-mig-agent", "-n", NS])
            .await?
            .is_some(),
        "deleted before mig-2 was taken over"
    );
    // Any entry counts as taken over, whatever its state.
    report(cp, "mig-2", &[("mig", "NotEffective")]).await?;
    op.wait_for(
        cp,
        "the old agents deleted",
        &["daemonset", "regmirror-mig-agent", "-n", NS],
        |d| d.is_none().then_some(()),
    )
    .await?;
    op.wait_for(
        cp,
        "mig: no old agents named",
        &["registrymirror", "mig"],
        |m| {
            let c = condition(m?, "NodesConfigured")?;
            (!c["message"].as_str()?.contains("regmirror-mig-agent")).then_some(())
        },
    )
    .await?;
    for n in nodes {
        report(cp, n, &[("mig", "Removed")]).await?;
    }
    cp.kubectl_ok(&["delete", "registrymirror", "mig", "--wait=false"])
        .await?;
    mirror_gone(cp, op, "mig").await?;
    remove_nodes(cp, &nodes).await
}

/// `(uid, generation, claim template request)` of mirror `name`'s StatefulSet.
async fn stateful_set_shape(cp: &ControlPlane, name: &str) -> Result<(String, i64, String)> {
    let sts = cp
        .get_json(&["statefulset", &format!("regmirror-{name}"), "-n", NS])
        .await?
        .with_context(|| format!("{name}'s StatefulSet"))?;
    Ok((
        sts["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        sts["metadata"]["generation"].as_i64().unwrap_or_default(),
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ))
}

/// The requested size of each claim in `names`.
async fn claim_requests(cp: &ControlPlane, names: &[&str]) -> Result<Vec<String>> {
    let mut sizes = Vec::new();
    for n in names {
        let claim = cp
            .get_json(&["pvc", n, "-n", NS])
            .await?
            .with_context(|| format!("claim {n}"))?;
        sizes.push(
            claim["spec"]["resources"]["requests"]["storage"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    Ok(sizes)
}

/// Issue 18, item 2: `storage.size` only grows. A larger size whose claims'
/// StorageClass does not allow expansion is `StorageNotExpandable` with
/// nothing written (claims and StatefulSet as they were, the last applied
/// generation kept); once the class allows it, every member claim is
/// expanded, the StatefulSet re-created with the larger template and the
/// running pods adopted (same uids); each member's cap stays within what the
/// claims report (no resizer here: they keep 1Gi, said in `CacheAvailable`).
/// A smaller size is refused at apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_larger_storage_size_expands_every_member_claim_and_keeps_the_members_running()
-> Result<()> {
    let mut turn =
        turn("a_larger_storage_size_expands_every_member_claim_and_keeps_the_members_running")
            .await;
    let (cp, op) = turn.cluster().await?;
    // Not the default class: other scenarios' claims never get it.
    cp.apply_ok(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: grow}\nprovisioner: kubernetes.io/no-provisioner\nvolumeBindingMode: Immediate\n",
    )
    .await?;
    for i in 0..2 {
        cp.apply_ok(&class_pv_yaml(&format!("grow-pv-{i}"), "grow", "Retain"))
            .await?;
    }
    let spec = |size: &str| {
        mirror_yaml(
            "grow",
            "[{host: grow.example}]",
            &format!(
                "  storage: {{size: {size}, storageClassName: grow}}\n  cache: {{replicas: 2}}\n"
            ),
        )
    };
    cp.apply_ok(&spec("1Gi")).await?;
    report(cp, "node-1", &[("grow", "Configured")]).await?;
    ready_with_members(cp, op, "grow", "2/2").await?;
    let claims = ["data-regmirror-grow-0", "data-regmirror-grow-1"];
    let mut pods = Vec::new();
    for i in 0..2 {
        pods.push(ready_pod(cp, op, &format!("regmirror-grow-{i}")).await?.1);
    }
    let sts1 = stateful_set_shape(cp, "grow").await?;
    assert_eq!(sts1.2, "1Gi");
    let config = |cm: Option<&serde_json::Value>| {
        cm.and_then(|c| c["data"]["config.toml"].as_str().map(str::to_owned))
    };
    let config1 = config(
        cp.get_json(&["configmap", "regmirror-grow", "-n", NS])
            .await?
            .as_ref(),
    )
    .context("grow's config")?;
    assert!(
        config1.contains(&format!("member_max_size = {}", (1u64 << 30) / 10 * 9)),
        "{config1}"
    );

    // The class does not allow expansion: refused, nothing written.
    patch_mirror(cp, "grow", r#"{"spec":{"storage":{"size":"2Gi"}}}"#).await?;
    let message = op
        .wait_for(
            cp,
            "grow StorageNotExpandable",
            &["registrymirror", "grow"],
            |m| {
                let ready = condition(m?, "Ready")?;
                (ready["reason"] == "StorageNotExpandable" && ready["observedGeneration"] == 2)
                    .then(|| ready["message"].as_str().unwrap_or_default().to_owned())
            },
        )
        .await?;
    for part in [
        "StorageClass grow of claim data-regmirror-grow-0 does not allow volume expansion",
        "data-regmirror-grow-1",
        "Nothing was changed",
        "kubectl patch storageclass grow",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
    let m = cp
        .get_json(&["registrymirror", "grow"])
        .await?
        .context("grow")?;
    assert_eq!(m["status"]["observedGeneration"], 1);
    assert_eq!(claim_requests(cp, &claims).await?, ["1Gi", "1Gi"]);
    assert_eq!(stateful_set_shape(cp, "grow").await?, sts1);

    // What runs is in the status, and a refused growth is no dead end: the
    // size may go back to it (not below), and then every change applies.
    assert_eq!(
        m["status"]["storage"],
        serde_json::json!({"size": "1Gi", "accessMode": "ReadWriteOnce", "storageClassName": "grow"})
    );
    let out = cp.apply(&spec("512Mi")).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("storage.size may only grow"),
        "{stderr}"
    );
    cp.apply_ok(&spec("1Gi")).await?;
    let ready_at = |generation: i64| {
        move |m: Option<&serde_json::Value>| {
            let m = m?;
            (condition(m, "Ready")?["status"] == "True"
                && m["status"]["observedGeneration"] == generation
                && m["status"]["cache"]["members"] == "2/2")
                .then_some(())
        }
    };
    op.wait_for(
        cp,
        "grow Ready at generation 3 (back to 1Gi)",
        &["registrymirror", "grow"],
        ready_at(3),
    )
    .await?;
    assert_eq!(stateful_set_shape(cp, "grow").await?, sts1);

    // The class allows it now: every claim grows, the StatefulSet is
    // re-created with the larger template, and the pods stay.
    cp.kubectl_ok(&[
        "patch",
        "storageclass",
        "grow",
        "-p",
        r#"{"allowVolumeExpansion":true}"#,
    ])
    .await?;
    patch_mirror(cp, "grow", r#"{"spec":{"storage":{"size":"2Gi"}}}"#).await?;
    op.wait_for(
        cp,
        "grow Ready at generation 4",
        &["registrymirror", "grow"],
        ready_at(4),
    )
    .await?;
    let sts2 = stateful_set_shape(cp, "grow").await?;
    assert_ne!(sts2.0, sts1.0, "the StatefulSet was not re-created");
    assert_eq!(sts2.2, "2Gi");
    assert_eq!(claim_requests(cp, &claims).await?, ["2Gi", "2Gi"]);
    for (i, uid) in pods.iter().enumerate() {
        let (_, now) = ready_pod(cp, op, &format!("regmirror-grow-{i}")).await?;
        assert_eq!(&now, uid, "member {i}'s pod was replaced");
    }
    // Nothing resizes these volumes: the claims report 1Gi, so the members
    // keep 90% of 1Gi, and the status says why.
    let cache = condition_message(cp, op, "grow", "CacheAvailable", "storage growing").await?;
    assert!(
        cache.contains("data-regmirror-grow-0 holds 1Gi of 2Gi")
            && cache.contains("data-regmirror-grow-1 holds 1Gi of 2Gi"),
        "{cache}"
    );
    let config2 = config(
        cp.get_json(&["configmap", "regmirror-grow", "-n", NS])
            .await?
            .as_ref(),
    );
    assert_eq!(config2.as_deref(), Some(config1.as_str()));

    report(cp, "node-1", &[("grow", "Gone")]).await?;
    cp.kubectl_ok(&["delete", "registrymirror", "grow", "--wait=false"])
        .await?;
    mirror_gone(cp, op, "grow").await?;
    cp.kubectl_ok(&[
        "delete",
        "pvc",
        claims[0],
        claims[1],
        "-n",
        NS,
        "--ignore-not-found",
        "--wait=false",
    ])
    .await?;
    cp.kubectl_ok(&[
        "delete",
        "pv",
        "grow-pv-0",
        "grow-pv-1",
        "--ignore-not-found",
        "--wait=false",
    ])
    .await?;
    cp.kubectl_ok(&["delete", "storageclass", "grow", "--ignore-not-found"])
        .await?;
    Ok(())
}
