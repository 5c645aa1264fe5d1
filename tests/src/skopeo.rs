//! `skopeo` (1.9) wrappers. skopeo sends `GET /v2/` before anything else and no `ns=`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::process::{ensure_success, run_with_timeout};
use crate::util::sha256_digest;

/// Default timeout of one skopeo command.
pub const SKOPEO_TIMEOUT: Duration = Duration::from_secs(120);

/// Options for [`skopeo_copy_opts`] / [`skopeo_inspect_raw_opts`].
#[derive(Debug, Clone)]
pub struct SkopeoOpts {
    /// Global `--registries-conf FILE` (skopeo 1.9 ignores `CONTAINERS_REGISTRIES_CONF`).
    pub registries_conf: Option<PathBuf>,
    /// Extra flags for the subcommand (e.g. `--all`, `--override-arch arm64`).
    pub extra_args: Vec<String>,
    pub timeout: Duration,
}

impl Default for SkopeoOpts {
    fn default() -> Self {
        Self {
            registries_conf: None,
            extra_args: Vec::new(),
            timeout: SKOPEO_TIMEOUT,
        }
    }
}

fn docker_ref(r: &str) -> String {
    if r.contains("://") {
        r.to_owned()
    } else {
        format!("docker://{r}")
    }
}

fn global_args(opts: &SkopeoOpts) -> Vec<String> {
    let mut args = vec!["--insecure-policy".to_owned()];
    if let Some(conf) = &opts.registries_conf {
        args.push("--registries-conf".into());
        args.push(conf.display().to_string());
    }
    args
}

/// `skopeo copy --src-tls-verify=false docker://SRC dir:DEST`; returns the digest of the
/// copied manifest (`DEST/manifest.json`). `src_ref` may omit `docker://`.
pub async fn skopeo_copy(src_ref: &str, dest_dir: &Path) -> Result<String> {
    skopeo_copy_opts(src_ref, dest_dir, &SkopeoOpts::default()).await
}

/// [`skopeo_copy`] with options.
pub async fn skopeo_copy_opts(src_ref: &str, dest_dir: &Path, opts: &SkopeoOpts) -> Result<String> {
    if let Some(parent) = dest_dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut args = global_args(opts);
    args.extend(["copy".into(), "--src-tls-verify=false".into()]);
    args.extend(opts.extra_args.iter().cloned());
    args.push(docker_ref(src_ref));
    args.push(format!("dir:{}", dest_dir.display()));
    let out = run_with_timeout("skopeo", &args, opts.timeout).await?;
    ensure_success(&format!("skopeo copy {src_ref}"), &out)?;
    let manifest =
        std::fs::read(dest_dir.join("manifest.json")).context("read copied manifest.json")?;
    Ok(sha256_digest(&manifest))
}

/// `skopeo inspect --raw --tls-verify=false docker://REF`: the manifest bytes as served.
pub async fn skopeo_inspect_raw(image_ref: &str) -> Result<Vec<u8>> {
    skopeo_inspect_raw_opts(image_ref, &SkopeoOpts::default()).await
}

/// [`skopeo_inspect_raw`] with options.
pub async fn skopeo_inspect_raw_opts(image_ref: &str, opts: &SkopeoOpts) -> Result<Vec<u8>> {
    let mut args = global_args(opts);
    args.extend([
        "inspect".into(),
        "--raw".into(),
        "--tls-verify=false".into(),
    ]);
    args.extend(opts.extra_args.iter().cloned());
    args.push(docker_ref(image_ref));
    let out = run_with_timeout("skopeo", &args, opts.timeout).await?;
    ensure_success(&format!("skopeo inspect {image_ref}"), &out)?;
    Ok(out.stdout)
}

/// Layer digests listed in a `dir:` copy's `manifest.json`, each checked against the
/// file skopeo wrote for it (`DEST/<hex>`).
pub fn dir_layer_digests(dest_dir: &Path) -> Result<Vec<String>> {
    let manifest: Value = serde_json::from_slice(&std::fs::read(dest_dir.join("manifest.json"))?)?;
    let layers = manifest["layers"]
        .as_array()
        .context("manifest without layers")?;
    let mut out = Vec::new();
    for l in layers {
        let digest = l["digest"]
            .as_str()
            .context("layer without digest")?
            .to_owned();
        let hex = digest.trim_start_matches("sha256:");
        let bytes =
            std::fs::read(dest_dir.join(hex)).with_context(|| format!("layer file {hex}"))?;
        anyhow::ensure!(
            sha256_digest(&bytes) == digest,
            "layer file {hex} does not match its digest"
        );
        out.push(digest);
    }
    Ok(out)
}

/// Writes a `registries.conf` making `mirror_host` (e.g. `127.0.0.1:PORT`, plain http)
/// the mirror of `prefix` (e.g. `docker.io`); pass it as [`SkopeoOpts::registries_conf`].
pub fn write_registries_conf(path: &Path, prefix: &str, mirror_host: &str) -> Result<()> {
    let text = format!(
        "unqualified-search-registries = []\n\n[[registry]]\nprefix = \"{prefix}\"\nlocation = \"{prefix}\"\n\n[[registry.mirror]]\nlocation = \"{mirror_host}\"\ninsecure = true\n"
    );
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}
