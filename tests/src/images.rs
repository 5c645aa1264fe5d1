//! Runnable container images the suite builds itself from host binaries
//! (the `regmirror-cache` that `make test` just built, `/bin/sleep` as a pause
//! image, `/bin/sh` for a workload), so a real node ([`crate::RealNode`]) runs
//! the binaries under test as pods without any base image from the internet.
//!
//! An image is one uncompressed tar layer on an empty base: each binary, the
//! shared libraries it links (as `ldd` lists them, loader included) at the
//! same paths, optionally the host's CA bundle, and empty directories. The
//! shipped `Containerfile` stays what users build; this is how the suite gets
//! the same binaries into pods.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use serde_json::json;

use crate::seed::{Blob, Flavour, OCI_CONFIG, OCI_MANIFEST, Platform, PushedImage};

/// OCI media type of an uncompressed tar layer: no gzip pass over a large
/// debug binary (seconds in an unoptimised test build), and containerd
/// unpacks it as it is.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Where Debian (and the shipped image) keep the CA bundle that rustls'
/// native roots and OpenSSL read.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const STRIP: &str = "/usr/bin/strip";
/// Fixed mtime of every entry, so the same inputs give the same digests.
const MTIME: u64 = 1_700_000_000;

/// The absolute library paths in `ldd` output: `name => /path (0x..)` lines
/// and the loader's own `/path (0x..)` line; `linux-vdso.so.1` (no file) is
/// left out. Errors on `not found` (the binary would not start) or on
/// `not a dynamic executable` (nothing to add: callers ask [`linked_libraries`],
/// which handles static binaries).
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            bail!("ldd: a library is missing: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// The shared libraries `binary` links, loader included (absolute host
/// paths; empty for a static binary). Runs `ldd`; errors when it cannot run
/// or a library is missing.
pub fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .context("run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // glibc's ldd exits 1 with this line on stdout or stderr for static binaries.
        if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!("ldd {}: {err}{text}", binary.display());
    }
    parse_ldd(&text)
}

/// What goes into the rootfs at one path.
#[derive(Debug, Clone)]
enum Entry {
    /// A host file (symlinks followed), with this mode.
    File {
        host: PathBuf,
        mode: u32,
        strip: bool,
    },
    /// Literal content.
    Bytes { bytes: Bytes, mode: u32 },
}

/// An image on an empty base made of host files: binaries with their linked
/// libraries, the CA bundle, empty directories, an entrypoint and
/// environment. Build with [`BinaryImage::build`], or build and push with
/// [`BinaryImage::push`].
#[derive(Debug, Clone)]
pub struct BinaryImage {
    entries: BTreeMap<String, Entry>,
    /// path -> (mode, uid, gid)
    dirs: BTreeMap<String, (u32, u64, u64)>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    user: Option<String>,
    workdir: Option<String>,
}

impl BinaryImage {
    /// An empty image whose container runs `entrypoint` (absolute path first).
    pub fn new(entrypoint: &[&str]) -> Self {
        Self {
            entries: BTreeMap::new(),
            dirs: BTreeMap::new(),
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: Vec::new(),
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            user: None,
            workdir: None,
        }
    }

    /// Adds the host executable `host` at `in_image` (absolute) with mode
    /// 0755, and every library it links at its host path. Debug sections are
    /// stripped when binutils' `strip` is installed (same code; a debug
    /// `regmirror-cache` shrinks from about 240 MB to a tenth). Errors when
    /// `ldd` fails or a library is missing.
    pub fn binary(mut self, host: &Path, in_image: &str) -> Result<Self> {
        ensure!(host.is_file(), "{} is not a file", host.display());
        for lib in linked_libraries(host)? {
            let key = lib.display().to_string();
            self.entries.insert(
                key,
                Entry::File {
                    host: lib,
                    mode: 0o755,
                    strip: false,
                },
            );
        }
        self.entries.insert(
            in_image.to_owned(),
            Entry::File {
                host: host.to_owned(),
                mode: 0o755,
                strip: Path::new(STRIP).is_file(),
            },
        );
        Ok(self)
    }

    /// Adds the host's CA bundle at [`CA_BUNDLE`] (TLS clients in the image
    /// need it to reach real upstreams).
    pub fn ca_bundle(mut self) -> Self {
        self.entries.insert(
            CA_BUNDLE.to_owned(),
            Entry::File {
                host: PathBuf::from(CA_BUNDLE),
                mode: 0o644,
                strip: false,
            },
        );
        self
    }

    /// Adds a file with literal content at `in_image`.
    pub fn file(mut self, in_image: &str, bytes: impl Into<Bytes>, mode: u32) -> Self {
        self.entries.insert(
            in_image.to_owned(),
            Entry::Bytes {
                bytes: bytes.into(),
                mode,
            },
        );
        self
    }

    /// Adds an empty directory owned by root (e.g. `/tmp` with mode `0o1777`).
    pub fn dir(self, in_image: &str, mode: u32) -> Self {
        self.dir_owned(in_image, mode, 0, 0)
    }

    /// Adds an empty directory owned by `uid:gid` (e.g. a data directory
    /// for a non-root user).
    pub fn dir_owned(mut self, in_image: &str, mode: u32, uid: u64, gid: u64) -> Self {
        self.dirs
            .insert(in_image.trim_end_matches('/').to_owned(), (mode, uid, gid));
        self
    }

    /// Sets the image's `User` (`UID[:GID]`).
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_owned());
        self
    }

    /// Sets the image's `WorkingDir`.
    pub fn workdir(mut self, dir: &str) -> Self {
        self.workdir = Some(dir.to_owned());
        self
    }

    /// Sets the image's default arguments (`Cmd`).
    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = cmd.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Adds `KEY=VALUE` to the image's environment.
    pub fn env(mut self, key_value: &str) -> Self {
        self.env.push(key_value.to_owned());
        self
    }

    /// The uncompressed layer: parent directories (0755) first, then every
    /// directory and file in path order, fixed mtime, owner root.
    fn layer(&self, work: &Path) -> Result<Vec<u8>> {
        let mut parents = BTreeSet::new();
        for p in self.entries.keys().chain(self.dirs.keys()) {
            let mut cur = Path::new(p).parent();
            while let Some(d) = cur.filter(|d| *d != Path::new("/")) {
                parents.insert(d.display().to_string());
                cur = d.parent();
            }
        }
        let mut tar = tar::Builder::new(Vec::new());
        let mut dirs: BTreeMap<String, (u32, u64, u64)> =
            parents.into_iter().map(|d| (d, (0o755, 0, 0))).collect();
        dirs.extend(self.dirs.clone());
        for (d, (mode, uid, gid)) in &dirs {
            let mut h = header(tar::EntryType::Directory, *mode, 0);
            h.set_uid(*uid);
            h.set_gid(*gid);
            h.set_cksum();
            tar.append_data(
                &mut h,
                format!("{}/", d.trim_start_matches('/')),
                std::io::empty(),
            )?;
        }
        for (path, entry) in &self.entries {
            let (bytes, mode) = match entry {
                Entry::Bytes { bytes, mode } => (bytes.to_vec(), *mode),
                Entry::File { host, mode, strip } => (read_file(host, *strip, work)?, *mode),
            };
            let mut h = header(tar::EntryType::Regular, mode, bytes.len() as u64);
            tar.append_data(&mut h, path.trim_start_matches('/'), &bytes[..])?;
        }
        Ok(tar.into_inner()?)
    }

    /// Builds the image (OCI manifest, config for this host's platform, one
    /// uncompressed layer) in memory. Errors when a host file cannot be read.
    pub fn build(&self) -> Result<PushedImage> {
        let work = tempfile::tempdir()?;
        let layer = Blob::new(OCI_LAYER_TAR, self.layer(work.path())?);
        let platform = Platform::host();
        let mut cfg = json!({"Env": self.env, "Entrypoint": self.entrypoint});
        if !self.cmd.is_empty() {
            cfg["Cmd"] = json!(self.cmd);
        }
        if let Some(u) = &self.user {
            cfg["User"] = json!(u);
        }
        if let Some(w) = &self.workdir {
            cfg["WorkingDir"] = json!(w);
        }
        let config = json!({
            "architecture": platform.architecture,
            "os": platform.os,
            "created": "2024-01-01T00:00:00Z",
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        });
        let config = Blob::new(OCI_CONFIG, serde_json::to_vec(&config)?);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "size": config.size(), "digest": config.digest},
            "layers": [{"mediaType": OCI_LAYER_TAR, "size": layer.size(), "digest": layer.digest}],
        });
        let manifest = Bytes::from(serde_json::to_vec(&manifest)?);
        Ok(PushedImage {
            digest: crate::util::sha256_digest(&manifest),
            manifest,
            media_type: OCI_MANIFEST.to_owned(),
            config,
            diff_ids: vec![layer.digest.clone()],
            layers: vec![layer],
            platform,
            flavour: Flavour::Oci,
        })
    }

    /// Builds the image (off the async runtime: it reads and hashes the
    /// binaries) and pushes it to `registry_url` as `repo:tag`.
    pub async fn push(&self, registry_url: &str, repo: &str, tag: &str) -> Result<PushedImage> {
        let me = self.clone();
        let image = tokio::task::spawn_blocking(move || me.build()).await??;
        crate::seed::push_built_image(registry_url, repo, tag, &image).await?;
        Ok(image)
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    h
}

/// The bytes of `host` (symlinks followed); with `strip`, of a copy without
/// debug sections made in `work`.
fn read_file(host: &Path, strip: bool, work: &Path) -> Result<Vec<u8>> {
    if strip {
        let out = work.join("stripped");
        let status = std::process::Command::new(STRIP)
            .arg("--strip-debug")
            .arg("-o")
            .arg(&out)
            .arg(host)
            .status()
            .context("run strip")?;
        ensure!(status.success(), "strip {}: {status}", host.display());
        let bytes = std::fs::read(&out)?;
        std::fs::remove_file(&out)?;
        return Ok(bytes);
    }
    std::fs::read(host).with_context(|| format!("read {}", host.display()))
}

/// UID and GID the shipped images run as (distroless `nonroot`, the
/// `Containerfile`'s `USER 65532:65532`).
pub const NONROOT: u64 = 65532;

/// The `Containerfile`'s `cache` target rebuilt from `binary` (a
/// `regmirror-cache` this build made): `/usr/local/bin/regmirror-cache` as
/// entrypoint, `/var/lib/regmirror` owned by and working directory of user
/// 65532:65532, plus the CA bundle and `/tmp`. Errors when `ldd` fails.
pub fn cache_image(binary: &Path) -> Result<BinaryImage> {
    Ok(shipped_layout(binary, "regmirror-cache")?
        .dir_owned("/var/lib/regmirror", 0o755, NONROOT, NONROOT)
        .workdir("/var/lib/regmirror"))
}

/// The `Containerfile`'s `operator` target rebuilt from `binary` (a
/// `regmirror-operator` this build made): entrypoint
/// `/usr/local/bin/regmirror-operator`, `Cmd ["run"]`, user 65532:65532, plus
/// the CA bundle and `/tmp`. Errors when `ldd` fails.
pub fn operator_image(binary: &Path) -> Result<BinaryImage> {
    Ok(shipped_layout(binary, "regmirror-operator")?.cmd(&["run"]))
}

fn shipped_layout(binary: &Path, name: &str) -> Result<BinaryImage> {
    let path = format!("/usr/local/bin/{name}");
    Ok(BinaryImage::new(&[&path])
        .binary(binary, &path)?
        .ca_bundle()
        .dir("/tmp", 0o1777)
        .user(&format!("{NONROOT}:{NONROOT}")))
}

/// The pause (sandbox) image a [`crate::RealNode`] gives containerd: the
/// host's `sleep` running `sleep infinity`. Errors when `sleep` or its
/// libraries cannot be read.
pub fn pause_image() -> Result<BinaryImage> {
    BinaryImage::new(&["/bin/sleep", "infinity"]).binary(&host_program("sleep")?, "/bin/sleep")
}

/// A workload image with the host's `/bin/sh` (dash on Debian) as its
/// entrypoint: pods give it `-c SCRIPT`. Errors when `sh` or its libraries
/// cannot be read.
pub fn shell_image() -> Result<BinaryImage> {
    BinaryImage::new(&["/bin/sh"]).binary(&host_program("sh")?, "/bin/sh")
}

/// The absolute path of `name` in `/usr/bin` or `/bin`, symlinks resolved.
fn host_program(name: &str) -> Result<PathBuf> {
    for dir in ["/usr/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(std::fs::canonicalize(&p)?);
        }
    }
    bail!("{name} not found in /usr/bin or /bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_library_and_loader_paths_but_not_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f90)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f90)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f90)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn the_cache_image_has_the_containerfile_layout() {
        // Any dynamic executable stands in for the cache binary here.
        let image = cache_image(&host_program("sh").unwrap())
            .unwrap()
            .build()
            .unwrap();
        let config: serde_json::Value = serde_json::from_slice(&image.config.bytes).unwrap();
        assert_eq!(
            config["config"]["Entrypoint"],
            json!(["/usr/local/bin/regmirror-cache"])
        );
        assert_eq!(config["config"]["User"], "65532:65532");
        assert_eq!(config["config"]["WorkingDir"], "/var/lib/regmirror");
        let mut tar = tar::Archive::new(&image.layers[0].bytes[..]);
        let data = tar
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path().unwrap().to_str() == Some("var/lib/regmirror/"))
            .expect("data dir");
        assert_eq!(data.header().uid().unwrap(), NONROOT);
        assert_eq!(data.header().gid().unwrap(), NONROOT);
    }

    #[test]
    fn the_layer_holds_the_binary_its_libraries_and_every_parent_directory() {
        let image = shell_image()
            .unwrap()
            .ca_bundle()
            .dir("/tmp", 0o1777)
            .build()
            .unwrap();
        let layer = &image.layers[0];
        assert_eq!(layer.media_type, OCI_LAYER_TAR);
        assert_eq!(image.diff_ids, std::slice::from_ref(&layer.digest));
        let mut tar = tar::Archive::new(&layer.bytes[..]);
        let mut names = Vec::new();
        for e in tar.entries().unwrap() {
            let e = e.unwrap();
            names.push((
                e.path().unwrap().display().to_string(),
                e.header().mode().unwrap(),
            ));
        }
        let has = |n: &str| names.iter().any(|(p, _)| p == n);
        assert!(
            has("bin/sh") && has("etc/ssl/certs/ca-certificates.crt"),
            "{names:?}"
        );
        assert!(has("etc/") && has("etc/ssl/") && has("bin/"), "{names:?}");
        assert!(
            names.iter().any(|(p, m)| p == "tmp/" && *m == 0o1777),
            "{names:?}"
        );
        for lib in linked_libraries(&host_program("sh").unwrap()).unwrap() {
            let rel = lib.display().to_string().trim_start_matches('/').to_owned();
            assert!(has(&rel), "{rel} missing from {names:?}");
        }
        let config: serde_json::Value = serde_json::from_slice(&image.config.bytes).unwrap();
        assert_eq!(config["config"]["Entrypoint"], json!(["/bin/sh"]));
        assert!(config["config"].get("User").is_none());
        assert_eq!(config["rootfs"]["diff_ids"][0], json!(layer.digest));
    }
}
