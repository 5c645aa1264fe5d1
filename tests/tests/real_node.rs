//! The suite's one real node (issue 19, foundation): a kubelet on a private
//! containerd registers against the loopback control plane and turns Ready;
//! a hostNetwork pod whose docker.io image is pulled through a
//! `regmirror-cache` process (containerd's `hosts.toml` points docker.io at
//! it, `server` at a closed port) runs and `kubectl logs` shows its output;
//! a pod's in-cluster client reaches the API server on loopback with its
//! ServiceAccount token; and the `regmirror-cache` binary this build made,
//! packed by the test into the Containerfile's layout on an empty base, runs
//! as a non-root pod on a local PersistentVolume (writable through
//! `fsGroup`), serves `/v2/` and stores what it fetched on the volume. The
//! node leaves nothing behind on the host.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use regmirror_e2e::images::{NONROOT, cache_image, shell_image};
use regmirror_e2e::kubelet::NODE_NAME;
use regmirror_e2e::tools::tool;
use regmirror_e2e::util::{bounded, free_port, http_client, metric_sum, tail_lines, wait_until};
use regmirror_e2e::{
    BinaryImage, CacheProcess, ControlPlane, RealNode, Registry, RequestLog, StartOptions,
    StoreLayout, cache_binary, write_hosts_toml,
};
use serde_json::{Value, json};

const POD_TIMEOUT: Duration = Duration::from_secs(90);

/// [`RealNode::host_network_pod`] in `default`, with plain log text.
fn host_network_pod(node: &RealNode, name: &str, image: &str, args: &[&str]) -> Value {
    let mut pod = node.host_network_pod("default", name, image, args);
    pod["spec"]["containers"][0]["env"]
        .as_array_mut()
        .expect("env")
        .push(json!({"name": "NO_COLOR", "value": "1"}));
    pod
}

/// The real uid of the process that has `arg` among its arguments.
fn uid_of_process_with_arg(arg: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        cmdline
            .split(|b| *b == 0)
            .any(|a| a == arg.as_bytes())
            .then_some(())?;
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn a_real_node_runs_pods_pulled_through_the_cache_and_the_cache_image_built_from_this_build()
{
    bounded(300, async {
        let t0 = Instant::now();
        let cp = ControlPlane::start_with(StartOptions {
            kubelet_node: Some(NODE_NAME.into()),
            ..Default::default()
        })
        .await?;
        let node = RealNode::start(&cp).await?;
        let ready_after = t0.elapsed();
        let n = cp
            .get_json(&["node", NODE_NAME])
            .await?
            .context("node registered")?;
        ensure!(
            n["status"]["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["type"] == "InternalIP" && a["address"] == "127.0.0.1"),
            "node addresses: {}",
            n["status"]["addresses"]
        );

        // A docker.io image on a local upstream, pulled through a cache
        // process: containerd may only reach the cache (server: a closed port).
        let upstream = Registry::start().await?;
        let hello = shell_image()?
            .push(&upstream.url(), "library/hello", "1.0")
            .await?;
        let cache =
            CacheProcess::start(["--upstream".to_owned(), format!("docker.io={}", upstream.url())])
                .await?;
        write_hosts_toml(&node.certs_dir(), "docker.io", &cache.url(), "http://127.0.0.1:9")?;
        cp.apply_ok(
            &host_network_pod(
            &node,
            "hello",
            "docker.io/library/hello:1.0",
            &[
                "-c",
                "echo hello from a real node; echo api=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT",
            ],
        )
        .to_string())
        .await?;
        node.wait_pod_phase(&cp, "default", "hello", "Succeeded").await?;
        let logs = cp.kubectl_ok(&["logs", "hello", "-n", "default"]).await?;
        let api = &node.api_server_env();
        ensure!(
            logs.contains("hello from a real node")
                && logs.contains(&format!("api=127.0.0.1:{}", api[1].1)),
            "kubectl logs hello:\n{logs}"
        );
        ensure!(
            cache
                .log()
                .contains("/v2/library/hello/manifests/1.0?ns=docker.io"),
            "cache log: {}",
            cache.log_tail(20)
        );
        let metrics = cache.metrics().await?;
        let misses = |kind: &str| {
            metric_sum(
                &metrics,
                "regmirror_cache_misses_total",
                &[&format!("kind=\"{kind}\"")],
            )
        };
        ensure!(
            misses("manifest") >= 1.0 && misses("blob") >= 2.0,
            "the cache did not fetch manifest, config and layer:\n{metrics}"
        );
        ensure!(
            metric_sum(&metrics, "regmirror_served_bytes_total", &[])
                >= hello.layers[0].size() as f64,
            "layer not served by the cache:\n{metrics}"
        );
        upstream.sync_log().await?;
        ensure!(
            upstream.count("GET", &format!("/blobs/{}", hello.layers[0].digest)) == 1,
            "upstream access log: {:?}",
            upstream.access_log()
        );

        // In-cluster clients reach the API server on loopback: a static
        // kubectl in a pod finds KUBERNETES_SERVICE_HOST/PORT, verifies the
        // server with the projected kube-root-ca.crt and authenticates with
        // the pod's ServiceAccount token.
        let reg = node.image_registry();
        BinaryImage::new(&["/kubectl"])
            .binary(&tool("kubectl"), "/kubectl")?
            .push(&reg.url(), "regmirror-e2e/kubectl", "test")
            .await?;
        cp.apply_ok(
            &host_network_pod(
                &node,
                "whoami",
                &format!("{}/regmirror-e2e/kubectl:test", reg.host()),
                &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"],
            )
            .to_string(),
        )
        .await?;
        node.wait_pod_phase(&cp, "default", "whoami", "Succeeded").await?;
        let who = cp.kubectl_ok(&["logs", "whoami", "-n", "default"]).await?;
        ensure!(
            who.trim() == "system:serviceaccount:default:default",
            "kubectl auth whoami in a pod: {who}"
        );

        // The regmirror-cache binary of this build, in the Containerfile's
        // layout on an empty base, runs as a pod (as user 65532) with its
        // data dir on a local PersistentVolume (root's: writable through the
        // pod's fsGroup), serves /v2/ on a loopback port and stores what it
        // fetches from the upstream on the volume.
        let pv_dir = node
            .local_pv(&cp, "cache-data", "regmirror-e2e-local", "1Gi")
            .await?;
        cp.apply_ok(
            &json!({
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "cache-data", "namespace": "default"},
                "spec": {
                    "storageClassName": "regmirror-e2e-local",
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            })
            .to_string(),
        )
        .await?;
        cache_image(&cache_binary())?
            .push(&reg.url(), "regmirror-e2e/regmirror-cache", "test")
            .await?;
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let upstream_arg = format!("docker.io={}", upstream.url());
        let mut pod = host_network_pod(
            &node,
            "cache",
            &format!("{}/regmirror-e2e/regmirror-cache:test", reg.host()),
            &[
                "--listen",
                &listen,
                "--storage",
                "/var/lib/regmirror",
                "--upstream",
                &upstream_arg,
            ],
        );
        pod["spec"]["securityContext"] = json!({"fsGroup": NONROOT});
        pod["spec"]["volumes"] =
            json!([{"name": "data", "persistentVolumeClaim": {"claimName": "cache-data"}}]);
        pod["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "data", "mountPath": "/var/lib/regmirror"}]);
        cp.apply_ok(&pod.to_string()).await?;
        node.wait_pod_phase(&cp, "default", "cache", "Running").await?;
        let client = http_client();
        let url = format!("http://{listen}/v2/");
        wait_until(POD_TIMEOUT, || async {
            client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await
        .with_context(|| {
            format!(
                "the cache pod never answered {url}; kubelet log tail:\n{}",
                tail_lines(&node.kubelet_log(), 20)
            )
        })?;
        let pod_logs = cp.kubectl_ok(&["logs", "cache", "-n", "default"]).await?;
        ensure!(pod_logs.contains(&listen), "cache pod log:\n{pod_logs}");
        ensure!(
            uid_of_process_with_arg(&listen) == Some(NONROOT as u32),
            "the cache pod does not run as the image's user {NONROOT}"
        );
        let layer = &hello.layers[0].digest;
        let blob_url = format!("http://{listen}/v2/library/hello/blobs/{layer}?ns=docker.io");
        let body = client.get(&blob_url).send().await?.error_for_status()?.bytes().await?;
        ensure!(body == hello.layers[0].bytes, "GET {blob_url}: other bytes");
        let stored = StoreLayout::new(&pv_dir).blob("docker.io", layer);
        wait_until(Duration::from_secs(10), || async { stored.is_file() })
            .await
            .with_context(|| format!("{} not stored on the volume", stored.display()))?;

        // The shared disk's free space must not make the kubelet evict or
        // refuse the test's pods (no eviction thresholds).
        let n = cp.get_json(&["node", NODE_NAME]).await?.context("node")?;
        let pressure: Vec<&Value> = n["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["type"] != "Ready" && c["status"] != "False")
            .collect();
        ensure!(pressure.is_empty(), "node conditions: {pressure:?}");

        node.stop().await?;
        eprintln!(
            "real node: Ready after {ready_after:?} (control plane included), whole test {:?}",
            t0.elapsed()
        );
        Ok(())
    })
    .await;
}
