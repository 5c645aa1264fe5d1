//! The operator against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kwok): CRD validation, children,
//! status, events, host conflicts, spec changes, finalizer, garbage collection
//! and leader election. One control plane for the whole scenario keeps the
//! run to about a minute.

use std::time::Duration;

use anyhow::{Context, Result};
use regmirror_e2e::operator::condition;
use regmirror_e2e::{ControlPlane, OperatorProcess};

const NS: &str = "regmirror-system";

fn mirror_yaml(name: &str, upstreams: &str, extra: &str) -> String {
    format!(
        "apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: {name}\nspec:\n  upstreams: {upstreams}\n{extra}"
    )
}

/// A PersistentVolume the cache's claim can bind to (no provisioner here).
fn pv_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {name}\nspec:\n  capacity: {{storage: 20Gi}}\n  accessModes: [ReadWriteOnce]\n  hostPath: {{path: /tmp/{name}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reconciles_mirrors_on_a_real_control_plane() -> Result<()> {
    let cp = ControlPlane::start().await?;
    cp.add_node("node-1").await?;
    cp.kubectl_ok(&["create", "namespace", NS]).await?;
    cp.kubectl_ok(&["create", "serviceaccount", "regmirror-agent", "-n", NS])
        .await?;
    for pv in ["cache-pv-1", "cache-pv-2"] {
        cp.apply_ok(&pv_yaml(pv)).await?;
    }
    cp.install_crd().await?;

    // Invalid specs are rejected by the API server with the schema's messages.
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
            "  cache: {replicas: 2}\n",
            "needs storage.accessMode ReadWriteMany",
        ),
        (
            "[{host: docker.io, tagTTL: soon}]",
            "",
            "must be a duration",
        ),
        ("[]", "", "spec.upstreams"),
    ] {
        let out = cp.apply(&mirror_yaml("bad", upstreams, extra)).await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(expected),
            "{upstreams} {extra}: expected rejection containing {expected:?}, got {}: {stderr}",
            out.status
        );
    }

    let mut op = OperatorProcess::start(&cp.kubeconfig, NS, "op-1", &[])?;
    cp.apply_ok(&mirror_yaml(
        "hub",
        "[{host: docker.io}, {host: ghcr.io}]",
        "  storage: {size: 1Gi}\n",
    ))
    .await?;

    // Ready, with everything derived from the real children.
    let hub = op
        .wait_for(&cp, "hub Ready", &["registrymirror", "hub"], |m| {
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
        ("persistentvolumeclaim", "regmirror-hub"),
        ("deployment", "regmirror-hub"),
        ("service", "regmirror-hub"),
        ("daemonset", "regmirror-hub-agent"),
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
    let deploy = cp
        .get_json(&["deployment", "regmirror-hub", "-n", NS])
        .await?
        .unwrap();
    let hash1 = deploy["spec"]["template"]["metadata"]["annotations"]["regmirror.dev/config-hash"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(deploy["spec"]["strategy"]["type"], "Recreate");

    let table = cp.kubectl_ok(&["get", "registrymirrors"]).await?;
    assert!(
        table.contains("READY")
            && table.contains("UPSTREAMS")
            && table.contains("ENDPOINT")
            && table.contains("docker.io,ghcr.io"),
        "{table}"
    );

    // Events on the mirror (cluster-scoped objects' events live in `default`).
    op.wait_for(
        &cp,
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
    assert_eq!(lease["spec"]["holderIdentity"], "op-1");
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

    // A second mirror claiming docker.io loses it to the older one.
    cp.apply_ok(&mirror_yaml(
        "second",
        "[{host: docker.io}, {host: quay.io}]",
        "  storage: {size: 1Gi}\n",
    ))
    .await?;
    let second = op
        .wait_for(
            &cp,
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
        msg.contains("docker.io is already mirrored by RegistryMirror \"hub\""),
        "{msg}"
    );
    assert_eq!(second["status"]["hosts"], serde_json::json!(["quay.io"]));
    assert_eq!(second["status"]["upstreams"], "docker.io(conflict),quay.io");

    // A spec change rolls the ConfigMap and the pod template.
    cp.kubectl_ok(&[
        "patch",
        "registrymirror",
        "hub",
        "--type=merge",
        "-p",
        r#"{"spec":{"cache":{"tagTTL":"5m"}}}"#,
    ])
    .await?;
    op.wait_for(
        &cp,
        "hub config rolled",
        &["deployment", "regmirror-hub", "-n", NS],
        |d| {
            let h = d?["spec"]["template"]["metadata"]["annotations"]["regmirror.dev/config-hash"]
                .as_str()?;
            (h != hash1).then_some(())
        },
    )
    .await?;
    let cm = cp
        .get_json(&["configmap", "regmirror-hub", "-n", NS])
        .await?
        .unwrap();
    assert!(
        cm["data"]["config.toml"]
            .as_str()
            .unwrap()
            .contains("tag_ttl = \"5m\"")
    );
    op.wait_for(
        &cp,
        "hub observedGeneration 2",
        &["registrymirror", "hub"],
        |m| {
            let m = m?;
            (m["status"]["observedGeneration"] == m["metadata"]["generation"]
                && m["metadata"]["generation"] == 2)
                .then_some(())
        },
    )
    .await?;

    // Deleting hub runs the finalizer: children go, then the mirror, and
    // `second` gets docker.io.
    cp.kubectl_ok(&["delete", "registrymirror", "hub", "--wait=false"])
        .await?;
    op.wait_for(&cp, "hub gone", &["registrymirror", "hub"], |m| {
        m.is_none().then_some(())
    })
    .await?;
    for (kind, name) in [
        ("deployment", "regmirror-hub"),
        ("daemonset", "regmirror-hub-agent"),
        ("configmap", "regmirror-hub"),
        ("service", "regmirror-hub"),
    ] {
        assert!(
            cp.get_json(&[kind, name, "-n", NS]).await?.is_none(),
            "{kind} {name} left behind"
        );
    }
    op.wait_for(
        &cp,
        "second takes docker.io",
        &["registrymirror", "second"],
        |m| {
            let hosts = m?["status"]["hosts"].as_array()?.clone();
            (hosts.len() == 2).then_some(())
        },
    )
    .await?;

    // With the operator stopped, the finalizer holds a deleted mirror...
    op.stop(Duration::from_secs(10)).await?;
    let lease = cp
        .get_json(&["lease", "regmirror-operator", "-n", NS])
        .await?
        .unwrap();
    assert!(
        lease["spec"]["holderIdentity"].is_null(),
        "lease released on shutdown: {lease}"
    );
    cp.kubectl_ok(&["delete", "registrymirror", "second", "--wait=false"])
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = cp
        .get_json(&["registrymirror", "second"])
        .await?
        .context("second deleted without its finalizer")?;
    assert!(held["metadata"]["deletionTimestamp"].is_string());
    // ...and without it, kube-controller-manager's garbage collector removes
    // the children through their owner references.
    cp.kubectl_ok(&[
        "patch",
        "registrymirror",
        "second",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])
    .await?;
    op.wait_for(
        &cp,
        "second's Deployment garbage-collected",
        &["deployment", "regmirror-second", "-n", NS],
        |d| d.is_none().then_some(()),
    )
    .await?;
    op.wait_for(
        &cp,
        "second's DaemonSet garbage-collected",
        &["daemonset", "regmirror-second-agent", "-n", NS],
        |d| d.is_none().then_some(()),
    )
    .await?;
    Ok(())
}
