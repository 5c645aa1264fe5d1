//! The suite's top end-to-end test (issue 19): on the one real node (a
//! kubelet on a private containerd, see [`RealNode`]), `helm install` of
//! `charts/regmirror` runs the operator and the node agent as real pods
//! (the images packed by the test from the binaries this build made, with
//! the chart's securityContext, probes, volumes and RBAC), a RegistryMirror
//! runs its cache as a real pod on a local PersistentVolume with
//! `cache.hostNetwork`, the agent writes the node's `hosts.toml` through its
//! hostPath mount, and workload pods pull through the cache: with the
//! upstream stopped, with the cache pod gone (containerd falls back to the
//! upstream), after the mirror is deleted and after `helm uninstall`.
//!
//! Loopback only: every pod gets the API server's loopback address
//! (`apiServer.host`/`port`, the chart's own values), upstreams and the
//! image registry are on 127.0.0.1, docker.io is only ever pulled through a
//! `hosts.toml` whose `server` is the local upstream.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use regmirror_e2e::helm::{Helm, chart_dir};
use regmirror_e2e::images::{cache_image, operator_image, shell_image};
use regmirror_e2e::kubelet::NODE_NAME;
use regmirror_e2e::operator::condition;
use regmirror_e2e::util::{bounded, files_under, free_port, tail_lines};
use regmirror_e2e::{
    ControlPlane, RealNode, Registry, StartOptions, cache_binary, operator_binary, write_hosts_toml,
};
use serde_json::{Value, json};

const NS: &str = "regmirror-system";
const RELEASE: &str = "regmirror";
const MIRROR: &str = "real";
/// The cache member's pod (StatefulSet `regmirror-<mirror>`, ordinal 0).
const CACHE_POD: &str = "regmirror-real-0";
const STORAGE_CLASS: &str = "regmirror-e2e-local";
const WAIT: Duration = Duration::from_secs(90);

/// What the test's pods and files look like to a failure message: the
/// release's pods, the mirror's status and the kubelet's last lines.
async fn diagnostics(cp: &ControlPlane, node: &RealNode) -> String {
    let pods = cp
        .kubectl(&["get", "pods", "-A", "-o", "wide"])
        .await
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mirror = cp
        .get_json(&["registrymirror", MIRROR])
        .await
        .ok()
        .flatten()
        .map(|m| format!("{:#}", m["status"]))
        .unwrap_or_default();
    let events = cp
        .kubectl(&["get", "events", "-A", "--sort-by=.lastTimestamp"])
        .await
        .map(|o| tail_lines(&String::from_utf8_lossy(&o.stdout), 25))
        .unwrap_or_default();
    format!(
        "pods:\n{pods}\nmirror status: {mirror}\nevents:\n{events}\nkubelet log tail:\n{}",
        tail_lines(&node.kubelet_log(), 25)
    )
}

/// Waits until `check` finds what it wants in `kubectl get ARGS -o json`
/// (`None` when the object does not exist).
async fn wait_json<T>(
    cp: &ControlPlane,
    node: &RealNode,
    what: &str,
    args: &[&str],
    mut check: impl FnMut(Option<&Value>) -> Option<T>,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = cp.get_json(args).await?;
        if let Some(t) = check(got.as_ref()) {
            return Ok(t);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{what}: not within {WAIT:?}; last {}: {}\n{}",
                args.join(" "),
                got.map(|v| format!("{:#}", v["status"]))
                    .unwrap_or_else(|| "absent".into()),
                diagnostics(cp, node).await
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A workload pod on the node (host network: the node has no pod network)
/// running `image` with `sh -c script`, bound to the node by name (so a
/// cordon does not stop it), and its logs once it succeeded.
async fn run_pod(
    cp: &ControlPlane,
    node: &RealNode,
    name: &str,
    image: &str,
    pull: &str,
    script: &str,
) -> Result<String> {
    let mut pod = node.host_network_pod("default", name, image, &["-c", script]);
    pod["spec"]["nodeName"] = json!(NODE_NAME);
    pod["spec"]["containers"][0]["imagePullPolicy"] = json!(pull);
    cp.apply_ok(&pod.to_string()).await?;
    node.wait_pod_phase(cp, "default", name, "Succeeded")
        .await
        .with_context(|| format!("pod {name} ({image})"))?;
    cp.kubectl_ok(&["logs", name, "-n", "default"]).await
}

/// The cache pod's log (its requests are logged at info).
async fn cache_log(cp: &ControlPlane) -> Result<String> {
    cp.kubectl_ok(&["logs", CACHE_POD, "-n", NS]).await
}

fn mirror_yaml(hub: &Registry, second: &Registry, node: &RealNode, port: u16) -> String {
    json!({
        "apiVersion": "regmirror.dev/v1alpha1",
        "kind": "RegistryMirror",
        "metadata": {"name": MIRROR},
        "spec": {
            "upstreams": [
                {"host": "docker.io", "url": hub.url()},
                {"host": second.host(), "url": second.url()},
            ],
            "storage": {"size": "1Gi", "storageClassName": STORAGE_CLASS},
            "cache": {"hostNetwork": true, "port": port},
            "nodes": {
                "containerdConfigDir": node.certs_dir().display().to_string(),
                "containerdConfigFile": node.containerd().config_file().display().to_string(),
                "mergeExisting": true,
            },
        },
    })
    .to_string()
}

#[tokio::test]
async fn helm_installed_operator_agent_and_cache_run_as_pods_and_pods_pull_through_the_cache() {
    bounded(420, async {
        let t0 = std::time::Instant::now();
        let cp = ControlPlane::start_with(StartOptions {
            kubelet_node: Some(NODE_NAME.into()),
            ..Default::default()
        })
        .await?;
        let node = RealNode::start(&cp).await?;

        // Two local upstreams: docker.io and a registry named by address,
        // for which the node already has its own hosts.toml (kept behind
        // the cache, mergeExisting, and given back when the mirror goes).
        let mut hub = Registry::start().await?;
        let second = Registry::start().await?;
        let hello = shell_image()?
            .push(&hub.url(), "library/hello", "1.0")
            .await?;
        shell_image()?
            .file("/later", "pulled while the cache was away\n", 0o644)
            .push(&hub.url(), "library/later", "1.0")
            .await?;
        shell_image()?
            .file("/tools", "one\n", 0o644)
            .push(&second.url(), "tools/echo", "1.0")
            .await?;
        shell_image()?
            .file("/tools", "two\n", 0o644)
            .push(&second.url(), "tools/echo", "2.0")
            .await?;
        let users_file = write_hosts_toml(
            &node.certs_dir(),
            &second.host(),
            &second.url(),
            &second.url(),
        )?;
        let users_text = std::fs::read_to_string(&users_file)?;

        // The images of this build, as the chart runs them.
        let reg = node.image_registry();
        let operator_repo = format!("{}/regmirror-e2e/regmirror-operator", reg.host());
        let cache_repo = format!("{}/regmirror-e2e/regmirror-cache", reg.host());
        operator_image(&operator_binary())?
            .push(&reg.url(), "regmirror-e2e/regmirror-operator", "test")
            .await?;
        cache_image(&cache_binary())?
            .push(&reg.url(), "regmirror-e2e/regmirror-cache", "test")
            .await?;
        node.local_pv(&cp, "regmirror-real-member-0", STORAGE_CLASS, "1Gi")
            .await?;

        // helm install with the values a cluster without kube-proxy sets.
        let api = node.api_server_env();
        let (metrics_port, probe_port, cache_port) = (free_port(), free_port(), free_port());
        let sets = [
            format!("image.operator.repository={operator_repo}"),
            "image.operator.tag=test".into(),
            format!("image.cache.repository={cache_repo}"),
            "image.cache.tag=test".into(),
            format!("apiServer.host={}", api[0].1),
            format!("apiServer.port={}", api[1].1),
            "operator.replicas=1".into(),
            "operator.hostNetwork=true".into(),
            format!("operator.metrics.port={metrics_port}"),
            "agent.hostNetwork=true".into(),
            format!("agent.probePort={probe_port}"),
            format!(
                "agent.hostDirs={{{}}}",
                node.containerd_config_dir().display()
            ),
        ];
        let helm = Helm::new()?;
        let kubeconfig = cp.kubeconfig.display().to_string();
        let chart = chart_dir().display().to_string();
        let mut args = vec![
            "install",
            RELEASE,
            &chart,
            "--namespace",
            NS,
            "--create-namespace",
            "--kubeconfig",
            &kubeconfig,
        ];
        for s in &sets {
            args.extend(["--set", s.as_str()]);
        }
        helm.run_ok(&args).await?;
        wait_json(
            &cp,
            &node,
            "the operator pod ready",
            &["deployment", RELEASE, "-n", NS],
            |d| (d?["status"]["readyReplicas"] == 1).then_some(()),
        )
        .await?;
        let agent_ds = format!("{RELEASE}-agent");
        wait_json(
            &cp,
            &node,
            "the node agent pod ready",
            &["daemonset", &agent_ds, "-n", NS],
            |d| (d?["status"]["numberReady"] == 1).then_some(()),
        )
        .await?;

        // The mirror: its cache on the node's network, on the local volume.
        cp.apply_ok(&mirror_yaml(&hub, &second, &node, cache_port))
            .await?;
        let cache_address = format!("127.0.0.1:{cache_port}");
        let status = wait_json(
            &cp,
            &node,
            "the mirror Ready with the node configured",
            &["registrymirror", MIRROR],
            |m| {
                let m = m?;
                (condition(m, "Ready")?["status"] == "True"
                    && m["status"]["nodesConfigured"] == 1
                    && m["status"]["observedGeneration"] == m["metadata"]["generation"])
                    .then(|| m["status"].clone())
            },
        )
        .await?;
        // The node agent's run, as the status shows it.
        ensure!(
            status["cacheAddresses"] == json!([cache_address])
                && status["nodesDesired"] == 1
                && status["nodes"].as_array().map(Vec::len) == Some(1)
                && status["nodes"][0]["name"] == NODE_NAME
                && status["nodes"][0]["state"] == "Configured",
            "status: {status:#}"
        );
        // Every pod of the installation reaches the API server on loopback,
        // never at the service CIDR's address (not routed here).
        let pods = cp.get_json(&["pods", "-n", NS]).await?.context("pods")?;
        let names: Vec<&str> = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["metadata"]["name"].as_str())
            .collect();
        ensure!(
            names.len() == 3,
            "operator, agent and cache pods: {names:?}"
        );
        for p in pods["items"].as_array().into_iter().flatten() {
            for c in p["spec"]["containers"].as_array().into_iter().flatten() {
                let env = &c["env"];
                ensure!(
                    env.as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| e["name"] == "KUBERNETES_SERVICE_HOST" && e["value"] == api[0].1)
                        && env
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|e| e["name"] == "KUBERNETES_SERVICE_PORT"
                                && e["value"] == api[1].1),
                    "pod {} container {}: env {env}",
                    p["metadata"]["name"],
                    c["name"]
                );
            }
        }
        let claim = cp
            .get_json(&["pvc", &format!("data-{CACHE_POD}"), "-n", NS])
            .await?
            .context("the member's claim")?;
        ensure!(
            claim["spec"]["volumeName"] == "regmirror-real-member-0",
            "claim: {claim:#}"
        );
        let hub_file = node.certs_dir().join("docker.io/hosts.toml");
        let hub_text = std::fs::read_to_string(&hub_file)
            .with_context(|| format!("the agent wrote no {}", hub_file.display()))?;
        ensure!(
            hub_text.starts_with("# managed-by: regmirror mirror=real")
                && hub_text.contains(&format!("[host.\"http://{cache_address}\"]"))
                && hub_text.contains(&format!("server = \"{}\"", hub.url())),
            "{}:\n{hub_text}",
            hub_file.display()
        );
        let merged = std::fs::read_to_string(&users_file)?;
        ensure!(
            merged.starts_with("# managed-by: regmirror")
                && merged
                    .find(&cache_address)
                    .zip(merged.find(&format!("[host.\"{}\"]", second.url())))
                    .is_some_and(|(cache, users)| cache < users),
            "the user's file keeps its host behind the cache:\n{merged}"
        );

        // Pods pull through the cache.
        let out = run_pod(
            &cp,
            &node,
            "hello",
            "docker.io/library/hello:1.0",
            "IfNotPresent",
            "echo hello through the cache",
        )
        .await?;
        ensure!(
            out.contains("hello through the cache"),
            "kubectl logs hello: {out}"
        );
        let log = cache_log(&cp).await?;
        ensure!(
            log.contains("/v2/library/hello/manifests/1.0?ns=docker.io")
                && log.contains(&format!(
                    "/v2/library/hello/blobs/{}",
                    hello.layers[0].digest
                )),
            "cache pod log:\n{}",
            tail_lines(&log, 30)
        );
        let echo = format!("{}/tools/echo:1.0", second.host());
        run_pod(
            &cp,
            &node,
            "echo",
            &echo,
            "IfNotPresent",
            "read l < /tools; echo \"$l\"",
        )
        .await?;
        let log = cache_log(&cp).await?;
        ensure!(
            // containerd escapes the `:` of the registry's name.
            log.contains(&format!(
                "/v2/tools/echo/manifests/1.0?ns={}",
                second.host().replace(':', "%3A")
            )),
            "the second upstream's pull did not go through the cache:\n{}",
            tail_lines(&log, 20)
        );

        // The upstream is down: a pod that must pull again starts from the cache.
        hub.stop().await?;
        let out = run_pod(
            &cp,
            &node,
            "hello-always",
            "docker.io/library/hello:1.0",
            "Always",
            "echo served while the upstream is down",
        )
        .await?;
        ensure!(out.contains("served while the upstream is down"), "{out}");
        ensure!(
            cache_log(&cp)
                .await?
                .matches("/v2/library/hello/manifests/1.0?ns=docker.io")
                .count()
                >= 2,
            "the Always pull did not ask the cache"
        );
        hub.start_again().await?;

        // The cache pod is gone (its replacement cannot be scheduled on the
        // cordoned node): new images come from the upstream (`server`).
        cp.kubectl_ok(&["cordon", NODE_NAME]).await?;
        cp.kubectl_ok(&[
            "delete",
            "pod",
            CACHE_POD,
            "-n",
            NS,
            "--wait=true",
            "--timeout=60s",
        ])
        .await?;
        wait_json(
            &cp,
            &node,
            "the replacement cache pod pending",
            &["pod", CACHE_POD, "-n", NS],
            |p| (p?["status"]["phase"] == "Pending").then_some(()),
        )
        .await?;
        let out = run_pod(
            &cp,
            &node,
            "later",
            "docker.io/library/later:1.0",
            "IfNotPresent",
            "read l < /later; echo \"$l\"",
        )
        .await?;
        ensure!(out.contains("pulled while the cache was away"), "{out}");
        hub.sync_log().await?;
        ensure!(
            hub.log()
                .lines()
                .any(|l| l.contains("/v2/library/later/manifests/1.0") && l.contains("containerd")),
            "containerd did not fall back to the upstream:\n{}",
            tail_lines(&hub.log(), 20)
        );
        let kept = cp
            .get_json(&["registrymirror", MIRROR])
            .await?
            .context("mirror")?;
        ensure!(
            kept["status"]["cacheAddresses"] == json!([cache_address]) && hub_file.is_file(),
            "the node lost the mirror while its member was away: {:#}",
            kept["status"]
        );
        cp.kubectl_ok(&["uncordon", NODE_NAME]).await?;
        wait_json(
            &cp,
            &node,
            "the cache back and the mirror Ready",
            &["registrymirror", MIRROR],
            |m| (condition(m?, "Ready")?["status"] == "True").then_some(()),
        )
        .await?;
        run_pod(
            &cp,
            &node,
            "hello-again",
            "docker.io/library/hello:1.0",
            "Always",
            "true",
        )
        .await?;
        ensure!(
            cache_log(&cp)
                .await?
                .contains("/v2/library/hello/manifests/1.0?ns=docker.io"),
            "the new cache pod did not serve"
        );

        // Deleting the mirror removes its files and gives the user's back;
        // pods then pull straight from the upstream.
        cp.kubectl_ok(&[
            "delete",
            "registrymirror",
            MIRROR,
            "--wait=true",
            "--timeout=120s",
        ])
        .await?;
        ensure!(!hub_file.exists(), "{} left behind", hub_file.display());
        ensure!(
            std::fs::read_to_string(&users_file)? == users_text,
            "the user's hosts.toml was not given back"
        );
        let direct = format!("{}/tools/echo:2.0", second.host());
        let out = run_pod(
            &cp,
            &node,
            "direct",
            &direct,
            "IfNotPresent",
            "read l < /tools; echo \"$l\"",
        )
        .await?;
        ensure!(out.contains("two"), "{out}");

        // helm uninstall (its pre-delete hook runs as a pod too) leaves
        // nothing of ours on the node.
        helm.run_ok(&[
            "uninstall",
            RELEASE,
            "--namespace",
            NS,
            "--kubeconfig",
            &kubeconfig,
            "--wait",
            "--timeout",
            "120s",
        ])
        .await?;
        wait_json(
            &cp,
            &node,
            "the release's pods gone",
            &["pods", "-n", NS],
            |l| l?["items"].as_array()?.is_empty().then_some(()),
        )
        .await?;
        let etc = node.containerd_config_dir();
        let ours: Vec<PathBuf> = files_under(vec![etc.clone()])
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(p).is_ok_and(|t| t.starts_with("# managed-by: regmirror"))
                    || p.strip_prefix(&etc)
                        .is_ok_and(|r| r.to_string_lossy().contains("regmirror"))
            })
            .collect();
        ensure!(ours.is_empty(), "left on the node: {ours:?}");
        ensure!(std::fs::read_to_string(&users_file)? == users_text);

        node.stop().await?;
        eprintln!("real cluster: whole test {:?}", t0.elapsed());
        Ok(())
    })
    .await;
}
