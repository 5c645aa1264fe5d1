//! The Helm chart (`charts/regmirror`): `helm lint`, the rendered manifests
//! and the examples validated strictly against the schemas of a real API
//! server (and the CRD's own), then `helm install` into a real control plane,
//! where the operator runs with a token of the chart's ServiceAccount: the
//! mirrors from `examples/` get their children and status, so the chart's
//! RBAC is enough (for the node agent too: run with its token), and `kubectl auth can-i` shows what it does not allow.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use regmirror_e2e::helm::{
    Helm, chart_dir, find, kubeconform, parse_yaml_stream, write_api_schemas, write_crd_schemas,
};
use regmirror_e2e::operator::condition;
use regmirror_e2e::util::{tail_lines, workspace_root};
use regmirror_e2e::{
    AgentOptions, AgentProcess, ControlPlane, OperatorProcess, ensure_success, operator_binary,
};
use serde_json::Value;

const NS: &str = "regmirror-system";
const RELEASE: &str = "regmirror";

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Long flags listed by a clap `--help`, with their `[default: ...]` when shown.
fn help_flags(help: &str) -> Vec<(String, Option<String>)> {
    help.lines()
        .filter_map(|l| {
            let t = l.trim_start();
            let t = t.strip_prefix("-h, ").unwrap_or(t);
            let flag = t.strip_prefix("--")?.split([' ', '=']).next()?.to_owned();
            let default = l
                .split("[default: ")
                .nth(1)
                .and_then(|d| d.split(']').next())
                .map(str::to_owned);
            Some((flag, default))
        })
        .collect()
}

async fn operator_run_flags() -> Result<Vec<(String, Option<String>)>> {
    operator_flags("run").await
}

/// The flags of `regmirror-operator <subcommand>`, with their defaults.
async fn operator_flags(subcommand: &str) -> Result<Vec<(String, Option<String>)>> {
    let out = tokio::process::Command::new(operator_binary())
        .args([subcommand, "--help"])
        .output()
        .await?;
    ensure_success(&format!("regmirror-operator {subcommand} --help"), &out)?;
    // Defaults may be on the next line of a long help entry: join each entry.
    let text = String::from_utf8_lossy(&out.stdout).replace("\n          ", " ");
    Ok(help_flags(&text))
}

/// Issue 18, item 4: `helm uninstall` first runs `regmirror-operator
/// uninstall` as a pre-delete hook, with flags the binary has, its own
/// ServiceAccount, and rights to list and delete mirrors and nothing of the
/// cluster's workloads; `uninstall.removeMirrors: false` drops it.
#[tokio::test]
async fn the_uninstall_hook_removes_the_mirrors_first_with_its_own_rights() -> Result<()> {
    let helm = Helm::new()?;
    let objects = parse_yaml_stream(&helm.template(NS, &[]).await?)?;
    let hooks: Vec<&Value> = objects
        .iter()
        .filter(|o| o["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete")
        .collect();
    let kinds: BTreeSet<&str> = hooks.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["ClusterRole", "ClusterRoleBinding", "Job", "ServiceAccount"])
    );
    let job = hooks.iter().find(|o| o["kind"] == "Job").unwrap();
    for o in &hooks {
        let weight: i32 = o["metadata"]["annotations"]["helm.sh/hook-weight"]
            .as_str()
            .unwrap()
            .parse()?;
        if o["kind"] != "Job" {
            assert!(weight < 0, "{} must exist before the Job", o["kind"]);
        }
    }
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(job["spec"]["backoffLimit"], 0);
    let sa = pod["serviceAccountName"].as_str().unwrap();
    assert!(
        hooks
            .iter()
            .any(|o| o["kind"] == "ServiceAccount" && o["metadata"]["name"] == sa)
    );
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "uninstall");
    let flags = operator_flags("uninstall").await?;
    for a in &args[1..] {
        let name = a.trim_start_matches("--").split('=').next().unwrap();
        assert!(
            flags.iter().any(|(f, _)| f == name),
            "uninstall has no flag --{name}"
        );
    }
    assert!(args.contains(&"--timeout=4m"), "{args:?}");
    let role = hooks.iter().find(|o| o["kind"] == "ClusterRole").unwrap();
    let text = role["rules"].to_string();
    assert!(
        text.contains("registrymirrors") && text.contains("delete"),
        "{text}"
    );
    for never in ["pods", "secrets", "nodes", "deployments", "\"*\""] {
        assert!(!text.contains(never), "the hook may {never}: {text}");
    }

    let without = parse_yaml_stream(
        &helm
            .template(NS, &["--set", "uninstall.removeMirrors=false"])
            .await?,
    )?;
    assert!(
        without
            .iter()
            .all(|o| o["metadata"]["annotations"]["helm.sh/hook"].is_null()),
        "hooks rendered with uninstall.removeMirrors=false"
    );
    Ok(())
}

#[test]
fn chart_crds_are_the_generated_crds() {
    for file in ["registrymirror.yaml", "registrymirrornode.yaml"] {
        let generated = read(&workspace_root().join("crds").join(file));
        let in_chart = read(&chart_dir().join("crds").join(file));
        assert!(
            generated == in_chart,
            "charts/regmirror/crds/{file} differs from crds/{file}: run `make crds`"
        );
    }
}

#[tokio::test]
async fn helm_lint_is_clean() -> Result<()> {
    let helm = Helm::new()?;
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    for extra in [&[][..], &["--set", "mirror.enabled=true"]] {
        let mut args = vec!["lint", "--strict", chart];
        args.extend_from_slice(extra);
        let out = helm.run_ok(&args).await?;
        assert!(
            out.contains("0 chart(s) failed") && !out.contains("[WARNING]"),
            "{out}"
        );
    }
    // Two replicas without leader election would reconcile at once.
    let out = helm
        .run(&[
            "template",
            RELEASE,
            chart,
            "--set",
            "operator.leaderElection.enabled=false",
        ])
        .await?;
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("needs operator.leaderElection"),
        "{out:?}"
    );
    Ok(())
}

#[tokio::test]
async fn rendered_chart_follows_conventions() -> Result<()> {
    let helm = Helm::new()?;
    let objects = parse_yaml_stream(&helm.template(NS, &[]).await?)?;
    let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Deployment",
            "Job",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
        ]),
        "no RegistryMirror unless mirror.enabled"
    );
    for o in &objects {
        let labels = &o["metadata"]["labels"];
        for l in [
            "helm.sh/chart",
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
        ] {
            assert!(labels[l].is_string(), "{} lacks label {l}", o["kind"]);
        }
        // Least privilege: no wildcards, and no Secrets beyond the release namespace.
        for rule in o["rules"].as_array().into_iter().flatten() {
            for field in ["verbs", "resources", "apiGroups"] {
                assert!(
                    !rule[field].as_array().unwrap().contains(&"*".into()),
                    "{}: wildcard in {rule}",
                    o["metadata"]["name"]
                );
            }
            if o["kind"] == "ClusterRole" {
                assert!(
                    !rule["resources"]
                        .as_array()
                        .unwrap()
                        .contains(&"secrets".into()),
                    "cluster-wide secrets: {rule}"
                );
            }
        }
    }

    // Every argument of the operator is one of its flags, and the node agents
    // run as the agent ServiceAccount the chart creates.
    let deploy = find(&objects, "Deployment", RELEASE).context("operator Deployment")?;
    let pod = &deploy["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let flags = operator_run_flags().await?;
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "run");
    for a in &args[1..] {
        let name = a.trim_start_matches("--").split('=').next().unwrap();
        assert!(
            flags.iter().any(|(f, _)| f == name),
            "{a} is not a flag of regmirror-operator run: {flags:?}"
        );
    }
    // ...and their values parse (clap checks each value before acting on a trailing --help).
    let out = tokio::process::Command::new(operator_binary())
        .args(&args)
        .arg("--help")
        .output()
        .await?;
    ensure_success(&format!("regmirror-operator {}", args.join(" ")), &out)?;
    let agents = find(&objects, "DaemonSet", &format!("{RELEASE}-agent")).context("agents")?;
    let agent_sa = agents["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .context("agent ServiceAccount")?;
    assert_eq!(agent_sa, "regmirror-agent");
    assert!(find(&objects, "ServiceAccount", agent_sa).is_some());
    // The image the agents run is the one the operator allows.
    let agent_image = agents["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap();
    assert!(args.contains(&format!("--agent-image={agent_image}").as_str()));
    assert_eq!(pod["serviceAccountName"], RELEASE);
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(env.contains(&"POD_NAMESPACE") && env.contains(&"POD_NAME"));
    assert_eq!(deploy["spec"]["replicas"], 2);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));

    // A default mirror; name overrides.
    let with_mirror = parse_yaml_stream(
        &helm
            .template(
                NS,
                &["--set", "mirror.enabled=true", "--set", "mirror.name=hub"],
            )
            .await?,
    )?;
    let m = find(&with_mirror, "RegistryMirror", "hub").context("mirror")?;
    assert_eq!(m["spec"]["upstreams"][0]["host"], "docker.io");
    let renamed = parse_yaml_stream(
        &helm
            .template(NS, &["--set", "fullnameOverride=cache-ops"])
            .await?,
    )?;
    assert!(find(&renamed, "Deployment", "cache-ops").is_some());
    let renamed = parse_yaml_stream(&helm.template(NS, &["--set", "nameOverride=rm"]).await?)?;
    assert!(find(&renamed, "Deployment", "regmirror-rm").is_some());
    Ok(())
}

/// The host directories of a rendered chart, as each part names them.
struct HostDirs {
    /// The agents' `--allowed-dir` values.
    allowed: Vec<String>,
    /// The host paths the agents' pod mounts.
    host_paths: Vec<String>,
    /// Where they are mounted in the agent container.
    mounts: Vec<String>,
    /// The operator's `--agent-host-dirs` value.
    operator: String,
}

/// [`HostDirs`] of the rendered chart `objects`.
fn host_dirs(objects: &[Value]) -> Result<HostDirs> {
    let agents = find(objects, "DaemonSet", &format!("{RELEASE}-agent")).context("agents")?;
    let pod = &agents["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let strings = |v: &Value, f: &dyn Fn(&Value) -> Option<String>| -> Vec<String> {
        v.as_array().into_iter().flatten().filter_map(f).collect()
    };
    let allowed = strings(&container["args"], &|a| {
        a.as_str()?
            .strip_prefix("--allowed-dir=")
            .map(str::to_owned)
    });
    let host_paths = strings(&pod["volumes"], &|v| {
        Some(v["hostPath"]["path"].as_str()?.to_owned())
    });
    let mounts = strings(&container["volumeMounts"], &|m| {
        Some(m["mountPath"].as_str()?.to_owned())
    });
    let deploy = find(objects, "Deployment", RELEASE).context("operator")?;
    let operator = strings(
        &deploy["spec"]["template"]["spec"]["containers"][0]["args"],
        &|a| {
            a.as_str()?
                .strip_prefix("--agent-host-dirs=")
                .map(str::to_owned)
        },
    );
    Ok(HostDirs {
        allowed,
        host_paths,
        mounts,
        operator: operator.join(";"),
    })
}

/// Issue 17: what the node agents may touch on a node is the installer's
/// (`agent.hostDirs`): the agent DaemonSet mounts exactly those host
/// directories (at `/host<dir>`), nothing else of the host, and the agents
/// and the operator are given the same list.
#[tokio::test]
async fn the_agents_mount_only_the_installers_host_dirs_and_agent_and_operator_share_them()
-> Result<()> {
    let helm = Helm::new()?;
    let default = parse_yaml_stream(&helm.template(NS, &[]).await?)?;
    let HostDirs {
        allowed,
        host_paths,
        mounts,
        operator,
    } = host_dirs(&default)?;
    assert_eq!(allowed, ["/etc/containerd"]);
    assert_eq!(host_paths, ["/etc/containerd"]);
    assert_eq!(mounts, ["/host/etc/containerd"]);
    assert_eq!(operator, "/etc/containerd");

    let k3s = "/var/lib/rancher/k3s/agent/etc/containerd";
    let set = format!("agent.hostDirs={{/etc/containerd,{k3s}}}");
    let objects = parse_yaml_stream(&helm.template(NS, &["--set", &set]).await?)?;
    let HostDirs {
        allowed,
        host_paths,
        mounts,
        operator,
    } = host_dirs(&objects)?;
    assert_eq!(allowed, ["/etc/containerd", k3s]);
    assert_eq!(
        host_paths, allowed,
        "every allowed directory, and only those"
    );
    assert_eq!(
        mounts,
        ["/host/etc/containerd".to_owned(), format!("/host{k3s}")]
    );
    assert_eq!(operator, format!("/etc/containerd,{k3s}"));
    // The operator parses the list as its flag's values.
    let flags = operator_run_flags().await?;
    assert!(
        flags
            .iter()
            .any(|(f, d)| f == "agent-host-dirs" && d.as_deref() == Some("/etc/containerd")),
        "{flags:?}"
    );

    // The agents' pod: probed, bounded, tolerating every taint by default.
    let agents = find(&default, "DaemonSet", &format!("{RELEASE}-agent")).context("agents")?;
    let pod = &agents["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["resources"]["limits"]["cpu"], "100m");
    assert_eq!(c["resources"]["limits"]["memory"], "128Mi");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    assert_eq!(
        agents["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        "10%"
    );
    // A relative or escaping directory is refused at install time.
    for bad in ["etc/containerd", "/etc/containerd/../.."] {
        assert_render_refused(
            &helm,
            &format!("agent.hostDirs={{{bad}}}"),
            "agent.hostDirs",
        )
        .await?;
    }
    Ok(())
}

/// `helm template` with `--set set` fails, and its error names `says`.
async fn assert_render_refused(helm: &Helm, set: &str, says: &str) -> Result<()> {
    let out = helm
        .run(&[
            "template",
            RELEASE,
            chart_dir().to_str().unwrap(),
            "--set",
            set,
        ])
        .await?;
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(says),
        "{set}: {out:?}"
    );
    Ok(())
}

/// Issue 19: a cluster whose pods reach the API server elsewhere than at
/// the `kubernetes` Service's cluster IP (no kube-proxy) sets
/// `apiServer.host`/`port`: every pod the chart runs gets
/// KUBERNETES_SERVICE_HOST/PORT, and the operator passes the address on to
/// the caches with a flag it has; `operator.hostNetwork` and
/// `agent.hostNetwork` put those pods on the node's network (cluster DNS
/// still first), with the agents' probe port where their probe looks.
#[tokio::test]
async fn api_server_and_host_network_values_reach_every_pod_the_chart_runs() -> Result<()> {
    let helm = Helm::new()?;
    let pod_specs = |objects: &[Value]| -> Result<Vec<(String, Value)>> {
        let mut out = Vec::new();
        for (kind, name) in [
            ("Deployment", RELEASE.to_owned()),
            ("DaemonSet", format!("{RELEASE}-agent")),
            ("Job", format!("{RELEASE}-uninstall")),
        ] {
            let o = find(objects, kind, &name).with_context(|| format!("{kind} {name}"))?;
            out.push((
                format!("{kind} {name}"),
                o["spec"]["template"]["spec"].clone(),
            ));
        }
        Ok(out)
    };
    let env_value = |pod: &Value, name: &str| -> Option<String> {
        pod["containers"][0]["env"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str().map(str::to_owned))
    };

    // Unset: the kubelet's values, the pod network.
    for (what, pod) in pod_specs(&parse_yaml_stream(&helm.template(NS, &[]).await?)?)? {
        assert_eq!(env_value(&pod, "KUBERNETES_SERVICE_HOST"), None, "{what}");
        assert!(pod.get("hostNetwork").is_none(), "{what}: {pod}");
    }

    let objects = parse_yaml_stream(
        &helm
            .template(
                NS,
                &[
                    "--set",
                    "apiServer.host=fd00::10",
                    "--set",
                    "apiServer.port=6443",
                    "--set",
                    "operator.hostNetwork=true",
                    "--set",
                    "agent.hostNetwork=true",
                    "--set",
                    "agent.probePort=9808",
                ],
            )
            .await?,
    )?;
    for (what, pod) in pod_specs(&objects)? {
        assert_eq!(
            env_value(&pod, "KUBERNETES_SERVICE_HOST").as_deref(),
            Some("fd00::10"),
            "{what}"
        );
        assert_eq!(
            env_value(&pod, "KUBERNETES_SERVICE_PORT").as_deref(),
            Some("6443"),
            "{what}"
        );
        assert_eq!(pod["hostNetwork"], true, "{what}");
        assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "{what}");
    }
    let operator = find(&objects, "Deployment", RELEASE).context("operator")?;
    let args: Vec<&str> = operator["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"--kubernetes-service=[fd00::10]:6443"),
        "{args:?}"
    );
    let flags = operator_run_flags().await?;
    assert!(
        flags.iter().any(|(f, _)| f == "kubernetes-service"),
        "{flags:?}"
    );
    let agent = find(&objects, "DaemonSet", &format!("{RELEASE}-agent")).context("agents")?;
    let c = &agent["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["ports"][0]["containerPort"], 9808);
    assert_eq!(
        c["readinessProbe"]["httpGet"]["port"],
        c["ports"][0]["name"]
    );
    assert!(
        c["args"]
            .as_array()
            .context("agent args")?
            .contains(&Value::from("--probe-addr=0.0.0.0:9808")),
        "{c}"
    );
    // What would make a wrong KUBERNETES_SERVICE_HOST/PORT is refused at install.
    for (bad, says) in [
        ("apiServer.host=api.example:6443", "apiServer.host"),
        ("apiServer.host=[fd00::1]", "apiServer.host"),
        ("apiServer.host=h,apiServer.port=", "apiServer.port"),
        ("apiServer.host=h,apiServer.port=null", "apiServer.port"),
        ("apiServer.host=h,apiServer.port=70000", "apiServer.port"),
    ] {
        assert_render_refused(&helm, bad, says).await?;
    }
    Ok(())
}

#[test]
fn make_image_without_a_container_engine_says_so_and_succeeds() {
    let out = std::process::Command::new("make")
        .args(["-s", "image", "ENGINE="])
        .current_dir(workspace_root())
        .output()
        .expect("run make");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("no usable container engine"), "{stdout}");
}

/// `kubectl auth can-i` as a ServiceAccount of the release namespace.
async fn can_i(cp: &ControlPlane, sa: &str, args: &[&str]) -> Result<bool> {
    cp.can_i(&format!("system:serviceaccount:{NS}:{sa}"), args)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installs_and_its_rbac_runs_the_operator() -> Result<()> {
    let cp = ControlPlane::start().await?;
    cp.add_node("node-1").await?;
    let helm = Helm::new()?;
    let work = tempfile::Builder::new()
        .prefix("regmirror-chart-")
        .tempdir()?;
    let chart = chart_dir();
    let examples = workspace_root().join("examples");

    // Strict schema validation: the chart with and without a mirror (and its
    // CRD), and the examples, against this API server's own schemas.
    let schemas = work.path().join("schemas");
    let n = write_api_schemas(
        &cp,
        &schemas,
        &[
            "api/v1",
            "apis/apps/v1",
            "apis/batch/v1",
            "apis/rbac.authorization.k8s.io/v1",
            "apis/apiextensions.k8s.io/v1",
        ],
    )
    .await?;
    assert!(n > 50, "only {n} schemas");
    let crd: Value = serde_saphyr::from_str(&read(&chart.join("crds/registrymirror.yaml")))?;
    write_crd_schemas(&crd, &schemas)?;
    let default = work.path().join("default.yaml");
    std::fs::write(&default, helm.template(NS, &[]).await?)?;
    let full = work.path().join("with-mirror.yaml");
    std::fs::write(
        &full,
        helm.template(NS, &["--include-crds", "--set", "mirror.enabled=true"])
            .await?,
    )?;
    let out = kubeconform(
        &schemas,
        &[
            &default,
            &full,
            &examples.join("mirror.yaml"),
            &examples.join("private-upstream.yaml"),
        ],
    )
    .await?;
    ensure_success("kubeconform", &out)?;
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("Invalid: 0, Errors: 0, Skipped: 0") && !summary.contains("Valid: 0"),
        "{summary}"
    );
    // The schemas are strict: unknown fields and wrong types are refused.
    let bad = work.path().join("bad.yaml");
    std::fs::write(
        &bad,
        read(&default).replace(
            "revisionHistoryLimit: 3",
            "revisionHistoryLimit: 3\n  replicaz: 2",
        ) + "\n---\napiVersion: regmirror.dev/v1alpha1\nkind: RegistryMirror\nmetadata: {name: x}\n\
              spec:\n  upstreams: [{hots: docker.io}]\n  cache: {replicas: many}\n",
    )?;
    let out = kubeconform(&schemas, &[&bad]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    for expected in [
        "'replicaz' not allowed",
        "'hots' not allowed",
        "want integer",
    ] {
        assert!(text.contains(expected), "{expected}: {text}");
    }

    // helm install, as in the README: CRD, operator Deployment (its pods run
    // on kwok's fake node), ServiceAccounts and RBAC.
    let kubeconfig = cp.kubeconfig.to_str().unwrap().to_owned();
    let notes = helm
        .run_ok(&[
            "install",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            NS,
            "--create-namespace",
            "--kubeconfig",
            &kubeconfig,
            "--wait",
            "--timeout",
            "90s",
        ])
        .await?;
    assert!(
        notes.contains("kubectl apply -f examples/mirror.yaml")
            && notes.contains("kubectl get registrymirrors"),
        "NOTES.txt tells the next step: {notes}"
    );
    let deploy = cp
        .get_json(&["deployment", RELEASE, "-n", NS])
        .await?
        .context("operator Deployment")?;
    assert_eq!(deploy["status"]["availableReplicas"], 2, "{deploy}");
    cp.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/registrymirrors.regmirror.dev",
        "--timeout=30s",
    ])
    .await?;

    // The operator binary as the chart's ServiceAccount: a TokenRequest token.
    let sa_kubeconfig = cp
        .token_kubeconfig(NS, RELEASE, "operator.kubeconfig")
        .await?;
    // Volumes for the caches' claims (there is no provisioner here).
    for (pv, size) in [("pv-public", "50Gi"), ("pv-private", "20Gi")] {
        cp.apply_ok(&format!(
            "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: {pv}}}\n\
             spec: {{capacity: {{storage: {size}}}, accessModes: [ReadWriteOnce], hostPath: {{path: /tmp/{pv}}}}}\n"
        ))
        .await?;
    }
    let mut op = OperatorProcess::start(&sa_kubeconfig, NS, "chart-op", &[])?;
    for f in ["mirror.yaml", "private-upstream.yaml"] {
        cp.kubectl_ok(&["apply", "-f", examples.join(f).to_str().unwrap()])
            .await?;
    }

    // Children and status for the public mirror: the operator could watch,
    // apply, read and write status with the chart's RBAC.
    op.wait_for(
        &cp,
        "public: CacheAvailable, status of this generation",
        &["registrymirror", "public"],
        |m| {
            let m = m?;
            (condition(m, "CacheAvailable")?["status"] == "True"
                && m["status"]["observedGeneration"] == m["metadata"]["generation"])
                .then_some(())
        },
    )
    .await?;
    for (kind, name) in [
        ("configmap", "regmirror-public"),
        ("serviceaccount", "regmirror-public-cache"),
        ("role", "regmirror-public-cache"),
        ("rolebinding", "regmirror-public-cache"),
        ("service", "regmirror-public-members"),
        ("statefulset", "regmirror-public"),
        ("persistentvolumeclaim", "data-regmirror-public-0"),
        ("service", "regmirror-public"),
    ] {
        let o = cp.get_json(&[kind, name, "-n", NS]).await?;
        assert!(o.is_some(), "{kind} {name} missing");
    }
    // The node agents are the chart's DaemonSet, not the mirror's.
    assert!(
        cp.get_json(&["daemonset", "regmirror-public-agent", "-n", NS])
            .await?
            .is_none()
    );
    let ds = cp
        .get_json(&["daemonset", &format!("{RELEASE}-agent"), "-n", NS])
        .await?
        .context("the chart's agent DaemonSet")?;
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"], "regmirror-agent",
        "agents run as the chart's agent ServiceAccount"
    );
    // The private mirror's credentials were read and merged into its own Secret.
    let creds = op
        .wait_for(
            &cp,
            "private: merged credentials Secret",
            &["secret", "regmirror-private-credentials", "-n", NS],
            |s| s.cloned(),
        )
        .await?;
    assert_eq!(creds["type"], "kubernetes.io/dockerconfigjson");
    // Events (in `default`, the mirrors being cluster-scoped) and the lease.
    op.wait_for(
        &cp,
        "Created event for public",
        &["events", "-n", "default"],
        |l| {
            l?["items"]
                .as_array()?
                .iter()
                .any(|e| e["involvedObject"]["name"] == "public" && e["reason"] == "Created")
                .then_some(())
        },
    )
    .await?;
    let lease = cp
        .get_json(&["lease", "regmirror-operator", "-n", NS])
        .await?
        .context("lease")?;
    assert_eq!(lease["spec"]["holderIdentity"], "chart-op");
    // The node agent's writes as the chart's agent ServiceAccount: its
    // node's report (created, then its status), which the operator
    // aggregates into the mirror's status.
    let agent_kubeconfig = cp
        .token_kubeconfig(NS, "regmirror-agent", "agent.kubeconfig")
        .await?;
    // The real agent as the chart's agent ServiceAccount, for node-1 whose
    // `/` is `work` (no containerd config there: NotEffective).
    let hosts = work.path().join("etc/containerd/certs.d");
    let mut agent = AgentProcess::start(&AgentOptions {
        kubeconfig: &agent_kubeconfig,
        node_name: "node-1",
        node_ip: "127.0.0.1",
        host_root: work.path(),
        allowed_dirs: &["/etc/containerd"],
    })?;
    op.wait_for(
        &cp,
        "public: node-1's entry from its report",
        &["registrymirror", "public"],
        |m| {
            m?["status"]["nodes"]
                .as_array()?
                .iter()
                .any(|n| n["name"] == "node-1" && n["state"] == "NotEffective")
                .then_some(())
        },
    )
    .await
    .with_context(|| format!("agent log:\n{}", tail_lines(&agent.log(), 30)))?;
    assert!(
        hosts.join("docker.io/hosts.toml").exists(),
        "the agent wrote no hosts.toml"
    );
    assert!(
        !agent.log().to_lowercase().contains("forbidden"),
        "the agent was refused something:\n{}",
        tail_lines(&agent.log(), 40)
    );
    agent.stop(Duration::from_secs(10)).await?;

    // The finalizer: children deleted, finalizer removed.
    cp.kubectl_ok(&["delete", "registrymirror", "private", "--wait=false"])
        .await?;
    op.wait_for(
        &cp,
        "private deleted",
        &["registrymirror", "private"],
        |m| m.is_none().then_some(()),
    )
    .await?;
    assert!(
        cp.get_json(&["statefulset", "regmirror-private", "-n", NS])
            .await?
            .is_none()
    );
    let log = op.log();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the operator was refused something:\n{}",
        tail_lines(&log, 60)
    );

    // What the chart allows, and what it must not.
    let op_sa = RELEASE;
    let agent_sa = "regmirror-agent";
    let ns = ["-n", NS];
    for (sa, args, allowed) in [
        (
            op_sa,
            &["patch", "statefulsets.apps", ns[0], ns[1]][..],
            true,
        ),
        // The cache members' identity and its discovery-only Role (which
        // the operator may grant because it holds those verbs itself).
        (op_sa, &["create", "serviceaccounts", ns[0], ns[1]], true),
        (
            op_sa,
            &["create", "roles.rbac.authorization.k8s.io", ns[0], ns[1]],
            true,
        ),
        (
            op_sa,
            &["watch", "endpointslices.discovery.k8s.io", ns[0], ns[1]],
            true,
        ),
        // Migration from the Deployment layout: hands a volume over.
        (op_sa, &["patch", "persistentvolumes"], true),
        (op_sa, &["delete", "deployments.apps", ns[0], ns[1]], true),
        (op_sa, &["watch", "secrets", ns[0], ns[1]], true),
        (op_sa, &["patch", "registrymirrors.regmirror.dev"], true),
        (
            op_sa,
            &[
                "patch",
                "registrymirrors.regmirror.dev",
                "--subresource=status",
            ],
            true,
        ),
        (
            op_sa,
            &["create", "events.events.k8s.io", "-n", "default"],
            true,
        ),
        (
            op_sa,
            &[
                "update",
                "leases.coordination.k8s.io/regmirror-operator",
                ns[0],
                ns[1],
            ],
            true,
        ),
        // Nothing outside its namespace, nothing cluster-wide but mirrors.
        (op_sa, &["get", "secrets", "-n", "default"], false),
        (op_sa, &["list", "secrets", "--all-namespaces"], false),
        (
            op_sa,
            &["create", "deployments.apps", "-n", "default"],
            false,
        ),
        (
            op_sa,
            &["list", "deployments.apps", "--all-namespaces"],
            false,
        ),
        (
            op_sa,
            &["patch", "daemonsets.apps", "-n", "kube-system"],
            false,
        ),
        (
            op_sa,
            &["create", "events.events.k8s.io", "-n", "kube-system"],
            false,
        ),
        // Not more than it needs inside it either.
        (op_sa, &["create", "pods", ns[0], ns[1]], false),
        (op_sa, &["create", "deployments.apps", ns[0], ns[1]], false),
        (op_sa, &["delete", "persistentvolumes"], false),
        (op_sa, &["list", "persistentvolumes"], false),
        (
            op_sa,
            &["create", "endpointslices.discovery.k8s.io", ns[0], ns[1]],
            false,
        ),
        (
            op_sa,
            &["create", "clusterroles.rbac.authorization.k8s.io"],
            false,
        ),
        (
            op_sa,
            &["update", "leases.coordination.k8s.io/other", ns[0], ns[1]],
            false,
        ),
        (op_sa, &["create", "registrymirrors.regmirror.dev"], false),
        (op_sa, &["delete", "registrymirrors.regmirror.dev"], false),
        (op_sa, &["get", "configmaps", ns[0], ns[1]], false),
        (op_sa, &["get", "nodes"], false),
        (op_sa, &["list", "nodes"], true),
        (op_sa, &["patch", "nodes"], false),
        (op_sa, &["watch", "registrymirrornodes.regmirror.dev"], true),
        (
            op_sa,
            &["patch", "registrymirrornodes.regmirror.dev"],
            false,
        ),
        (
            op_sa,
            &[
                "patch",
                "registrymirrornodes.regmirror.dev",
                "--subresource=status",
            ],
            false,
        ),
        // The per-mirror agents of earlier versions: deleted, never made.
        (op_sa, &["delete", "daemonsets.apps", ns[0], ns[1]], true),
        (op_sa, &["create", "daemonsets.apps", ns[0], ns[1]], false),
        (op_sa, &["patch", "daemonsets.apps", ns[0], ns[1]], false),
        (
            op_sa,
            &["patch", "customresourcedefinitions.apiextensions.k8s.io"],
            false,
        ),
        (
            op_sa,
            &["create", "clusterrolebindings.rbac.authorization.k8s.io"],
            false,
        ),
        // The node agent: reads mirrors and Nodes, writes its node's report;
        // nothing else.
        (agent_sa, &["watch", "registrymirrors.regmirror.dev"], true),
        (agent_sa, &["watch", "nodes"], true),
        (agent_sa, &["get", "nodes"], true),
        (
            agent_sa,
            &["create", "registrymirrornodes.regmirror.dev"],
            true,
        ),
        (
            agent_sa,
            &[
                "patch",
                "registrymirrornodes.regmirror.dev",
                "--subresource=status",
            ],
            true,
        ),
        (
            agent_sa,
            &["delete", "registrymirrornodes.regmirror.dev"],
            false,
        ),
        (
            agent_sa,
            &[
                "patch",
                "registrymirrors.regmirror.dev",
                "--subresource=status",
            ],
            false,
        ),
        (
            agent_sa,
            &["create", "events.events.k8s.io", "-n", "default"],
            false,
        ),
        (agent_sa, &["patch", "registrymirrors.regmirror.dev"], false),
        (agent_sa, &["patch", "nodes"], false),
        (agent_sa, &["get", "secrets", ns[0], ns[1]], false),
        (agent_sa, &["patch", "daemonsets.apps", ns[0], ns[1]], false),
    ] {
        assert_eq!(
            can_i(&cp, sa, args).await?,
            allowed,
            "{sa}: can-i {}",
            args.join(" ")
        );
    }
    Ok(())
}
