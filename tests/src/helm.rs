//! The Helm chart under test: `helm` with a private home, `helm template`
//! output parsed into objects, and kubeconform against JSON schemas made from
//! a running API server's OpenAPI v3 (kubeconform's default schema registry is
//! on the internet, which tests cannot reach).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use tempfile::TempDir;

use crate::controlplane::ControlPlane;
use crate::process::ensure_success;
use crate::tools::tool;
use crate::util::workspace_root;

const HELM_TIMEOUT: Duration = Duration::from_secs(120);

/// `charts/regmirror` in this workspace.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("charts/regmirror")
}

/// `helm` with its cache, config and data dirs in a temp dir.
pub struct Helm {
    home: TempDir,
}

impl Helm {
    pub fn new() -> Result<Self> {
        Ok(Self {
            home: tempfile::Builder::new()
                .prefix("regmirror-helm-")
                .tempdir()?,
        })
    }

    /// Runs helm (bounded); returns the output whatever the status.
    pub async fn run(&self, args: &[&str]) -> Result<std::process::Output> {
        let h = self.home.path();
        let child = tokio::process::Command::new(tool("helm"))
            .args(args)
            .env("HELM_CACHE_HOME", h.join("cache"))
            .env("HELM_CONFIG_HOME", h.join("config"))
            .env("HELM_DATA_HOME", h.join("data"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn helm")?;
        match tokio::time::timeout(HELM_TIMEOUT, child.wait_with_output()).await {
            Ok(out) => Ok(out?),
            Err(_) => bail!("`helm {}` timed out after {HELM_TIMEOUT:?}", args.join(" ")),
        }
    }

    /// helm that must succeed; returns stdout.
    pub async fn run_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args).await?;
        ensure_success(&format!("helm {}", args.join(" ")), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `helm template regmirror charts/regmirror -n NS` plus `extra`: the manifests as YAML.
    pub async fn template(&self, namespace: &str, extra: &[&str]) -> Result<String> {
        let chart = chart_dir();
        let mut args = vec![
            "template",
            "regmirror",
            chart.to_str().expect("utf-8 path"),
            "--namespace",
            namespace,
        ];
        args.extend_from_slice(extra);
        self.run_ok(&args).await
    }
}

/// The objects of a multi-document YAML stream (empty documents skipped).
pub fn parse_yaml_stream(yaml: &str) -> Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).context("parse YAML")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The object of `kind` named `name` among `objects`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

/// kubeconform's file name for a kind: `{{ .ResourceKind }}{{ .KindSuffix }}.json`,
/// e.g. `deployment-apps-v1.json`, `service-v1.json`.
fn schema_file_name(group: &str, version: &str, kind: &str) -> String {
    let group = group.split('.').next().unwrap_or("");
    if group.is_empty() {
        format!("{}-{version}.json", kind.to_lowercase())
    } else {
        format!("{}-{group}-{version}.json", kind.to_lowercase())
    }
}

/// Makes an OpenAPI v3 schema a strict JSON schema (draft 4, as kubeconform
/// reads it): references point into `definitions`, and objects with declared
/// properties allow no others (what `kubeconform -strict` expects of its schemas).
fn make_strict(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get_mut("$ref") {
                *r = r.replace("#/components/schemas/", "#/definitions/");
            }
            let preserve = m.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
            if m.contains_key("properties") && !m.contains_key("additionalProperties") && !preserve
            {
                m.insert("additionalProperties".into(), json!(false));
            }
            // OpenAPI's `nullable` is JSON schema's null type.
            if m.get("nullable") == Some(&json!(true))
                && let Some(Value::String(t)) = m.get("type").cloned()
            {
                m.insert("type".into(), json!([t, "null"]));
            }
            // CRD schemas: an int-or-string field declares no type.
            if m.get("x-kubernetes-int-or-string") == Some(&json!(true)) {
                m.remove("type");
                m.insert(
                    "oneOf".into(),
                    json!([{"type": "integer"}, {"type": "string"}]),
                );
            }
            m.values_mut().for_each(make_strict);
        }
        Value::Array(a) => a.iter_mut().for_each(make_strict),
        _ => {}
    }
}

/// Writes kubeconform schemas into `dir` for every kind of the API server's
/// group-versions `gvs` (`api/v1`, `apis/apps/v1`, ...), from its `/openapi/v3`.
pub async fn write_api_schemas(cp: &ControlPlane, dir: &Path, gvs: &[&str]) -> Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut written = 0;
    for gv in gvs {
        let raw = cp
            .kubectl_ok(&["get", "--raw", &format!("/openapi/v3/{gv}")])
            .await?;
        let doc: Value = serde_json::from_str(&raw).with_context(|| format!("openapi {gv}"))?;
        let mut defs = doc["components"]["schemas"]
            .as_object()
            .with_context(|| format!("no components.schemas in /openapi/v3/{gv}"))?
            .clone();
        defs.values_mut().for_each(make_strict);
        let defs = Value::Object(defs);
        for (name, schema) in defs.as_object().unwrap() {
            for gvk in schema["x-kubernetes-group-version-kind"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let kind = gvk["kind"].as_str().unwrap_or_default();
                // Shared types (DeleteOptions, WatchEvent) list every group.
                if name.rsplit('.').next() != Some(kind) {
                    continue;
                }
                let file = schema_file_name(
                    gvk["group"].as_str().unwrap_or_default(),
                    gvk["version"].as_str().unwrap_or_default(),
                    kind,
                );
                let one = json!({
                    "allOf": [{"$ref": format!("#/definitions/{name}")}],
                    "definitions": defs,
                });
                std::fs::write(dir.join(file), serde_json::to_vec(&one)?)?;
                written += 1;
            }
        }
    }
    Ok(written)
}

/// Writes the kubeconform schema of every version of a CustomResourceDefinition
/// (parsed from YAML) into `dir`, from its `openAPIV3Schema`.
pub fn write_crd_schemas(crd: &Value, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let group = crd["spec"]["group"].as_str().context("spec.group")?;
    let kind = crd["spec"]["names"]["kind"]
        .as_str()
        .context("spec.names.kind")?;
    for v in crd["spec"]["versions"]
        .as_array()
        .context("spec.versions")?
    {
        let version = v["name"].as_str().context("version name")?;
        let mut schema = v["schema"]["openAPIV3Schema"].clone();
        let props: &mut Map<String, Value> = schema["properties"]
            .as_object_mut()
            .context("openAPIV3Schema.properties")?;
        // What the API server adds to every custom resource.
        props.insert(
            "apiVersion".into(),
            json!({"type": "string", "enum": [format!("{group}/{version}")]}),
        );
        props.insert("kind".into(), json!({"type": "string", "enum": [kind]}));
        props.insert("metadata".into(), json!({"type": "object"}));
        make_strict(&mut schema);
        std::fs::write(
            dir.join(schema_file_name(group, version, kind)),
            serde_json::to_vec(&schema)?,
        )?;
    }
    Ok(())
}

/// `kubeconform -strict -summary` of `files` against the schemas in `dir` only
/// (never the network); returns the output whatever the status.
pub async fn kubeconform(schemas: &Path, files: &[&Path]) -> Result<std::process::Output> {
    let location = format!(
        "{}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        schemas.display()
    );
    let mut args: Vec<String> = vec![
        "-strict".into(),
        "-summary".into(),
        "-schema-location".into(),
        location,
    ];
    args.extend(files.iter().map(|f| f.display().to_string()));
    crate::process::run_with_timeout(
        tool("kubeconform").to_str().expect("utf-8 path"),
        &args,
        Duration::from_secs(60),
    )
    .await
}

/// Kinds [`apply_chart_identities`] applies.
const IDENTITY_KINDS: [&str; 5] = [
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
];

/// Applies the chart's identities and permissions, and nothing else: every
/// ServiceAccount, Role, RoleBinding, ClusterRole and ClusterRoleBinding of
/// `helm template regmirror charts/regmirror -n NAMESPACE` with `extra`
/// arguments (e.g. `--set ...`), after creating `namespace`. For running the
/// operator and the node agents as processes with exactly the RBAC an
/// installed chart gives them ([`ControlPlane::token_kubeconfig`] for
/// `regmirror` and `regmirror-agent`). Returns the `kind/name` of what it
/// applied.
pub async fn apply_chart_identities(
    cp: &ControlPlane,
    namespace: &str,
    extra: &[&str],
) -> Result<Vec<String>> {
    let rendered = Helm::new()?.template(namespace, extra).await?;
    let objects: Vec<Value> = parse_yaml_stream(&rendered)?
        .into_iter()
        .filter(|o| IDENTITY_KINDS.iter().any(|k| o["kind"] == *k))
        .collect();
    let names = objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or_default(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect();
    let mut items = vec![json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}
    })];
    items.extend(objects);
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    cp.apply_ok(&serde_json::to_string(&list)?).await?;
    Ok(names)
}
