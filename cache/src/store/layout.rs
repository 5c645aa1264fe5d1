//! Where the store keeps each thing under its root: the one definition of the
//! on-disk layout drawn in the [`store`](super) module's docs. Pure path
//! arithmetic, no IO and no open [`Store`](super::Store), so tests can find
//! (or plant) stored files with the same rules the store uses.
//!
//! `host` is an upstream's configured name (`docker.io`, `127.0.0.1:5000`),
//! used as one path component; callers pass only configured hosts, never
//! client input.

use std::path::{Path, PathBuf};

use super::usage::Kind;
use crate::oci::{Algorithm, Digest, RepoName, Tag};

/// `<root>/tmp`: in-progress writes, renamed into place when complete. Each
/// running process writes in a directory of its own in here
/// ([`process_tmp_dir`]); files directly in it were written by versions
/// from before those directories.
pub fn tmp_dir(root: &Path) -> PathBuf {
    root.join("tmp")
}

/// The name of the lock file in each process's temp directory
/// ([`process_tmp_lock`]).
pub const TMP_LOCK: &str = ".lock";

/// `<root>/tmp/<pid>-<nonce>`: the temp files of the process `pid`, `nonce`
/// (in hex) telling apart the processes that had the same pid (a restart,
/// another container). Swept by the next process that starts once its lock
/// ([`process_tmp_lock`]) is free, that is once its process is gone.
pub fn process_tmp_dir(root: &Path, pid: u32, nonce: u64) -> PathBuf {
    tmp_dir(root).join(format!("{pid}-{nonce:x}"))
}

/// `<dir>/.lock` ([`TMP_LOCK`]) in a process's temp directory `dir`
/// ([`process_tmp_dir`]): held locked (`flock`, exclusive) by that process
/// for as long as it runs. Inside the directory, not beside it, because
/// versions from before process directories remove every file directly in
/// `tmp/` when they start, and leave directories alone.
pub fn process_tmp_lock(dir: &Path) -> PathBuf {
    dir.join(TMP_LOCK)
}

/// The pid a process temp directory (a [`process_tmp_dir`]) is named after,
/// `None` for any other path. A name, not proof of life: pids are reused.
pub fn tmp_dir_pid(dir: &Path) -> Option<u32> {
    let name = dir.file_name()?.to_str()?;
    let (pid, nonce) = name.split_once('-')?;
    u64::from_str_radix(nonce, 16).ok()?;
    pid.parse().ok()
}

/// `<root>/upstreams`: everything complete and verified, one directory per upstream.
pub fn upstreams_dir(root: &Path) -> PathBuf {
    root.join("upstreams")
}

/// `<root>/upstreams/<host>`: one upstream's content, kept apart from every
/// other upstream's.
pub fn upstream_dir(root: &Path, host: &str) -> PathBuf {
    upstreams_dir(root).join(host)
}

/// `<root>/upstreams/<host>/blobs`: the upstream's blobs by digest.
pub fn blobs_dir(root: &Path, host: &str) -> PathBuf {
    upstream_dir(root, host).join("blobs")
}

/// `<root>/upstreams/<host>/manifests`: the upstream's manifests by digest.
pub fn manifests_dir(root: &Path, host: &str) -> PathBuf {
    upstream_dir(root, host).join("manifests")
}

/// `<root>/upstreams/<host>/<blobs|manifests>/<algorithm>`: every stored
/// `kind` of content addressed by `algorithm`, fanned out as [`blob_path`]
/// and [`manifest_path`] say.
pub fn digests_dir(root: &Path, host: &str, kind: Kind, algorithm: Algorithm) -> PathBuf {
    let dir = match kind {
        Kind::Blob => blobs_dir(root, host),
        Kind::Manifest => manifests_dir(root, host),
    };
    dir.join(algorithm.name())
}

/// `<root>/upstreams/<host>/blobs/<algorithm>/<ab>/<hex>`: a blob's bytes.
pub fn blob_path(root: &Path, host: &str, d: &Digest) -> PathBuf {
    by_digest(root, host, Kind::Blob, d)
}

/// `<root>/upstreams/<host>/manifests/<algorithm>/<ab>/<hex>`: a manifest's bytes
/// exactly as served (its media type beside it, with the extension `.type`).
pub fn manifest_path(root: &Path, host: &str, d: &Digest) -> PathBuf {
    by_digest(root, host, Kind::Manifest, d)
}

/// `<root>/upstreams/<host>/repositories`: the upstream's repositories, by name.
pub fn repositories_dir(root: &Path, host: &str) -> PathBuf {
    upstream_dir(root, host).join("repositories")
}

/// `<root>/upstreams/<host>/repositories/<repo>/_tags`: one repository's
/// cached tags, one file each.
pub fn tags_dir(root: &Path, host: &str, repo: &RepoName) -> PathBuf {
    repositories_dir(root, host)
        .join(repo.as_str())
        .join("_tags")
}

/// `<root>/upstreams/<host>/repositories/<repo>/_tags/<tag>`: a tag's record
/// (its answers per `Accept` class, [`super::TagRecord`]).
pub fn tag_path(root: &Path, host: &str, repo: &RepoName, tag: &Tag) -> PathBuf {
    tags_dir(root, host, repo).join(tag.as_str())
}

/// `<kind dir>/<algorithm>/<first two hex>/<hex>` (`sha256` or `sha512`):
/// each algorithm apart, so a store from before sha512 keeps its paths; two
/// hex characters of fan-out keep directories small.
fn by_digest(root: &Path, host: &str, kind: Kind, d: &Digest) -> PathBuf {
    let hex = d.hex();
    digests_dir(root, host, kind, d.algorithm())
        .join(&hex[..2])
        .join(hex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    #[test]
    fn paths_follow_the_documented_layout() {
        let root = Path::new("/s");
        let d = Digest::of(b"x");
        let hex = d.hex();
        assert_eq!(tmp_dir(root), Path::new("/s/tmp"));
        let mine = process_tmp_dir(root, 42, 0xbeef);
        assert_eq!(mine, Path::new("/s/tmp/42-beef"));
        assert_eq!(process_tmp_lock(&mine), Path::new("/s/tmp/42-beef/.lock"));
        assert_eq!(tmp_dir_pid(&mine), Some(42));
        // Temp files of older versions, directly in `tmp/`, name no process.
        assert_eq!(
            tmp_dir_pid(Path::new("/s/tmp/42-7-1700000000000000000")),
            None
        );
        assert_eq!(tmp_dir_pid(&tmp_dir(root)), None);
        assert_eq!(
            blob_path(root, "docker.io", &d),
            PathBuf::from(format!(
                "/s/upstreams/docker.io/blobs/sha256/{}/{hex}",
                &hex[..2]
            ))
        );
        assert_eq!(
            manifest_path(root, "127.0.0.1:5000", &d),
            PathBuf::from(format!(
                "/s/upstreams/127.0.0.1:5000/manifests/sha256/{}/{hex}",
                &hex[..2]
            ))
        );
        let d512 = Algorithm::Sha512.digest(b"x");
        let hex = d512.hex();
        assert_eq!(
            blob_path(root, "docker.io", &d512),
            PathBuf::from(format!(
                "/s/upstreams/docker.io/blobs/sha512/{}/{hex}",
                &hex[..2]
            ))
        );
        assert_eq!(
            manifest_path(root, "docker.io", &d512),
            PathBuf::from(format!(
                "/s/upstreams/docker.io/manifests/sha512/{}/{hex}",
                &hex[..2]
            ))
        );
        let repo = RepoName::parse("library/alpine").unwrap();
        let tag = Tag::parse("3.20").unwrap();
        assert_eq!(
            tag_path(root, "docker.io", &repo, &tag),
            Path::new("/s/upstreams/docker.io/repositories/library/alpine/_tags/3.20")
        );
        assert!(
            tag_path(root, "docker.io", &repo, &tag).starts_with(tags_dir(
                root,
                "docker.io",
                &repo
            ))
        );
    }
}
