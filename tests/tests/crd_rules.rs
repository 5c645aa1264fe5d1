//! The RegistryMirror CRD's storage rules on a real API server, with no
//! operator running (so the status is the test's): what Kubernetes does not
//! change on a StatefulSet's claim templates is fixed, `storage.size` only
//! grows, and each may always go back to what the running claims have,
//! `status.storage` (issue 18: a change the operator could not carry out
//! must never be a dead end).

use anyhow::{Result, ensure};
use regmirror_e2e::ControlPlane;
use regmirror_e2e::util::bounded;

/// `kubectl patch registrymirror r --type=merge -p PATCH` (on `subresource`
/// when given): `Ok(None)` when accepted, `Ok(Some(stderr))` when refused.
async fn patch(
    cp: &ControlPlane,
    patch: &str,
    subresource: Option<&str>,
) -> Result<Option<String>> {
    let mut args = vec!["patch", "registrymirror", "r", "--type=merge", "-p", patch];
    if let Some(s) = subresource {
        args.push("--subresource");
        args.push(s);
    }
    let out = cp.kubectl(&args).await?;
    Ok((!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_is_fixed_or_grows_and_may_always_go_back_to_the_running_claims() {
    bounded(180, async {
        let cp = ControlPlane::start().await?;
        cp.install_crd().await?;
        cp.apply_ok(
            "apiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata: {name: r}\n\
             spec:\n  upstreams: [{host: docker.io}]\n  storage: {size: 2Gi, storageClassName: fast}\n",
        )
        .await?;

        // No status yet: the rules of old.
        for (p, says) in [
            (r#"{"spec":{"storage":{"size":"1Gi"}}}"#, "spec.storage.size"),
            (r#"{"spec":{"storage":{"accessMode":"ReadWriteMany"}}}"#, "spec.storage.accessMode"),
            (r#"{"spec":{"storage":{"storageClassName":"slow"}}}"#, "spec.storage.storageClassName"),
            (r#"{"spec":{"storage":{"storageClassName":null}}}"#, "spec.storage.storageClassName"),
        ] {
            let refused = patch(&cp, p, None).await?;
            ensure!(
                refused.as_deref().is_some_and(|e| e.contains(says) && e.contains("status.storage")),
                "{p}: {refused:?}"
            );
        }
        ensure!(patch(&cp, r#"{"spec":{"storage":{"size":"2048Mi"}}}"#, None).await?.is_none());
        ensure!(patch(&cp, r#"{"spec":{"storage":{"size":"3Gi"}}}"#, None).await?.is_none());

        // The running claims differ from the spec (a growth refused, a mirror
        // of an older operator changed before the rules existed): the spec may
        // go back to them, and nowhere else.
        let running = r#"{"status":{"storage":{"size":"1Gi","accessMode":"ReadWriteMany"}}}"#;
        ensure!(patch(&cp, running, Some("status")).await?.is_none());
        for (p, ok) in [
            (r#"{"spec":{"storage":{"size":"512Mi"}}}"#, false),
            (r#"{"spec":{"storage":{"size":"1Gi"}}}"#, true),
            (r#"{"spec":{"storage":{"accessMode":"ReadWriteOncePod"}}}"#, false),
            (r#"{"spec":{"storage":{"accessMode":"ReadWriteMany"}}}"#, true),
            (r#"{"spec":{"storage":{"storageClassName":"slow"}}}"#, false),
            // The running claims name no class: unset is where it may go back.
            (r#"{"spec":{"storage":{"storageClassName":null}}}"#, true),
        ] {
            let refused = patch(&cp, p, None).await?;
            ensure!(refused.is_none() == ok, "{p}: accepted {}, {refused:?}", refused.is_none());
        }
        let m = cp.get_json(&["registrymirror", "r"]).await?.unwrap_or_default();
        ensure!(
            m["spec"]["storage"] == serde_json::json!({"size": "1Gi", "accessMode": "ReadWriteMany"}),
            "{}",
            m["spec"]["storage"]
        );
        Ok(())
    })
    .await;
}
