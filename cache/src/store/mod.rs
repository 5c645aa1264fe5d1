//! Content-addressed filesystem storage.
//!
//! ```text
//! <root>/tmp/<pid>-<nonce>/                          one process's in-progress writes
//! <root>/tmp/<pid>-<nonce>/.lock                     locked while that process runs
//! <root>/upstreams/<host>/blobs/<alg>/<ab>/<hex>     blob content
//! <root>/upstreams/<host>/manifests/<alg>/<ab>/<hex> manifest bytes, exactly as served
//! <root>/upstreams/<host>/manifests/<alg>/<ab>/<hex>.type   its media type
//! <root>/upstreams/<host>/repositories/<repo>/_tags/<tag>   its answers ([`TagRecord`])
//! ```
//! `<alg>` is the digest's algorithm, `sha256` or `sha512`; `<hex>` its
//! encoded part, `<ab>` that part's first two characters.
//! Every file is written to its process's directory in `tmp/`, fsynced,
//! verified and renamed into place, so a path under `upstreams/` only ever
//! holds complete, verified content. A process that starts removes the
//! temp directories of processes that are gone, and no other
//! ([`tmpdir`]).
//! Content is kept per upstream so that bytes fetched with one upstream's
//! credentials are never served under another upstream's name.
//!
//! [`usage`] indexes what is stored (sizes, recency, leases); [`evict`] keeps
//! it within the byte budget and age limit.

pub mod evict;
mod fsutil;
pub mod layout;
pub mod tmpdir;
pub mod usage;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName, Tag};

pub use evict::{Evicted, Limits};
pub use fsutil::TempFile;
pub use usage::{Kind, Lease, Reservation, Usage};

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// This process's temp directory, claimed while any clone lives.
    tmp: Arc<tmpdir::ProcessTmp>,
    usage: Arc<Usage>,
    /// Shared by every clone: a cluster member's byte budget changes with
    /// its view ([`Store::set_max_size`]).
    limits: Arc<std::sync::RwLock<Limits>>,
    /// One eviction pass at a time.
    evicting: Arc<tokio::sync::Mutex<()>>,
    /// Wakes the sweeper ([`evict::spawn`]) when usage crosses the high watermark.
    pressure: Arc<tokio::sync::Notify>,
    metrics: Arc<Metrics>,
}

/// A stored blob, open, protected from eviction while the lease lives.
#[derive(Debug)]
pub struct StoredBlob {
    pub file: File,
    pub size: u64,
    pub lease: Option<Lease>,
}

/// A manifest as stored and served.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    /// The digest its registry gives it ([`Digest::of_manifest`]): of
    /// `bytes`, except for signed schema1, where it covers the payload.
    pub digest: Digest,
    pub media_type: String,
    /// Exactly as the upstream sent them (signed schema1 with signatures).
    pub bytes: Bytes,
}

/// One answer an upstream gave to a tag lookup: the manifest the tag named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagAnswer {
    /// The manifest's digest, `<algorithm>:<hex>`.
    pub digest: String,
    /// The manifest's media type, as stored beside it.
    pub media_type: String,
}

/// What the store keeps of one tag: the upstream's last successful answer to
/// each class of `Accept` list that got one (the classes and what they
/// decide are [`crate::mirror::tags::AcceptClass`]'s).
///
/// On disk, JSON: the broad class's answer at the top level, as
/// `{"digest","media_type"}`, and the narrower classes' answers under
/// `"narrow"`, by class name:
/// `{"digest":"sha256:…","media_type":"…","narrow":{"<class>":{"digest":"…","media_type":"…"}}}`.
/// Records written before answers were kept per class have the top level
/// only, so they read as the broad answer they were (only lookups accepting
/// every manifest kind wrote them); a cache that predates classes reads the
/// broad answer of a new record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    /// The answer to lookups that accept every manifest kind.
    #[serde(flatten)]
    pub broad: Option<TagAnswer>,
    /// The answers to narrower lookups, by the name of their class.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub narrow: BTreeMap<String, TagAnswer>,
}

impl TagRecord {
    /// Whether the record holds no answer at all.
    pub fn is_empty(&self) -> bool {
        self.broad.is_none() && self.narrow.is_empty()
    }
}

impl Store {
    /// Opens (creating) the store and removes the temp files of processes
    /// that are gone ([`tmpdir::sweep`]).
    pub async fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        Self::open_with(root, Limits::default(), Arc::default()).await
    }

    /// Opens the store: sweeps the temp directories of processes that are
    /// gone ([`tmpdir::sweep`]) and claims one for this process
    /// ([`tmpdir::ProcessTmp`]). Its index is built in the background (stat
    /// only), so serving starts at once however much is stored.
    pub async fn open_with(
        root: impl Into<PathBuf>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> io::Result<Self> {
        let root = root.into();
        metrics
            .store_max_bytes
            .set(limits.max_size.unwrap_or(0) as i64);
        let r = root.clone();
        let tmp = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(layout::upstreams_dir(&r))?;
            let swept = tmpdir::sweep(&r, std::time::SystemTime::now())?;
            if swept != tmpdir::Swept::default() {
                tracing::info!(
                    dirs = swept.dirs,
                    files = swept.files,
                    "removed temp files of processes that are gone"
                );
            }
            tmpdir::ProcessTmp::claim(&r)
        })
        .await??;
        let store = Self {
            root,
            tmp: Arc::new(tmp),
            usage: Arc::default(),
            limits: Arc::new(std::sync::RwLock::new(limits)),
            evicting: Arc::default(),
            pressure: Arc::default(),
            metrics,
        };
        let s = store.clone();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            match s.usage.load(&s.root) {
                Ok(()) => tracing::info!(
                    files = s.usage.files(),
                    bytes = s.usage.stored_bytes(),
                    ms = started.elapsed().as_millis() as u64,
                    "store index loaded"
                ),
                Err(e) => tracing::error!(error = %e, "cannot scan the store; eviction is off"),
            }
            s.pressure.notify_one();
        });
        Ok(store)
    }

    pub fn usage(&self) -> &Arc<Usage> {
        &self.usage
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The limits in force now (the byte budget may change at runtime,
    /// [`Store::set_max_size`]).
    pub fn limits(&self) -> Limits {
        *self.limits.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the byte budget (`None`: unlimited) from now on, for every
    /// clone of this store: `regmirror_store_max_bytes` shows it, and when
    /// usage is above the new high watermark the sweeper ([`evict::spawn`],
    /// running when the store was opened with a limit) starts an eviction
    /// pass at once. A cluster member's share of the cluster's budget
    /// changes this way with its view (`cluster::budget`).
    pub fn set_max_size(&self, max_size: Option<u64>) {
        self.limits
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .max_size = max_size;
        self.metrics
            .store_max_bytes
            .set(max_size.unwrap_or(0) as i64);
        self.wake_sweeper_if_over();
    }

    fn key(&self, host: &str, kind: Kind, d: &Digest) -> Option<usage::Key> {
        self.usage.key(host, kind, d.algorithm(), d.hex())
    }

    /// Records a file just renamed into place.
    pub fn record(&self, host: &str, kind: Kind, d: &Digest, size: u64) {
        if let Some(k) = self.key(host, kind, d) {
            self.usage.insert(k, size, usage::now_ms());
        }
        self.wake_sweeper_if_over();
    }

    /// Where the file `key` names is stored.
    fn key_path(&self, key: &usage::Key) -> PathBuf {
        let (host, d) = (self.usage.host_of(key), key.digest.digest());
        match key.kind {
            Kind::Blob => self.blob_path(&host, &d),
            Kind::Manifest => self.manifest_path(&host, &d),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This process's temp directory, where [`Store::temp_file`] creates
    /// files: `<root>/tmp/<pid>-<nonce>` ([`layout::process_tmp_dir`]).
    pub fn temp_dir(&self) -> &Path {
        self.tmp.dir()
    }

    /// How many temp files this process has: the entries of its temp
    /// directory besides the lock file.
    #[cfg(test)]
    pub(crate) fn temp_files(&self) -> usize {
        std::fs::read_dir(self.temp_dir()).map_or(0, |d| {
            d.filter(|e| {
                e.as_ref()
                    .map_or(true, |e| e.file_name() != layout::TMP_LOCK)
            })
            .count()
        })
    }

    /// Where the blob `d` of upstream `host` is stored: [`layout::blob_path`].
    pub fn blob_path(&self, host: &str, d: &Digest) -> PathBuf {
        layout::blob_path(&self.root, host, d)
    }

    fn manifest_path(&self, host: &str, d: &Digest) -> PathBuf {
        layout::manifest_path(&self.root, host, d)
    }

    fn tag_path(&self, host: &str, repo: &RepoName, tag: &Tag) -> PathBuf {
        layout::tag_path(&self.root, host, repo, tag)
    }

    /// A new temp file inside the store (same filesystem, so rename is atomic).
    pub fn temp_file(&self) -> io::Result<TempFile> {
        TempFile::create_in(self.temp_dir())
    }

    /// An open cached blob, leased against eviction, its recency refreshed.
    pub async fn blob(&self, host: &str, d: &Digest) -> io::Result<Option<StoredBlob>> {
        let path = self.blob_path(host, d);
        let key = self.key(host, Kind::Blob, d);
        let usage = Arc::clone(&self.usage);
        blocking(move || match File::open(&path) {
            Ok(file) => {
                let size = file.metadata()?.len();
                let lease = key.map(|k| {
                    if usage.touch(&k) {
                        let _ = file.set_modified(std::time::SystemTime::now());
                    }
                    usage.lease(k)
                });
                Ok(Some(StoredBlob { file, size, lease }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(k) = key {
                    usage.forget(&k);
                }
                Ok(None)
            }
            Err(e) => Err(e),
        })
        .await
    }

    pub async fn has_blob(&self, host: &str, d: &Digest) -> bool {
        tokio::fs::metadata(self.blob_path(host, d)).await.is_ok()
    }

    pub async fn manifest(&self, host: &str, d: &Digest) -> io::Result<Option<StoredManifest>> {
        let path = self.manifest_path(host, d);
        let digest = d.clone();
        let key = self.key(host, Kind::Manifest, d);
        let usage = Arc::clone(&self.usage);
        blocking(move || {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            if key.is_some_and(|k| usage.touch(&k)) {
                let _ =
                    File::open(&path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
            }
            let media_type = std::fs::read_to_string(path.with_extension("type"))
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .or_else(|| crate::oci::media::sniff(&bytes).map(str::to_owned))
                .unwrap_or_else(|| crate::oci::media::OCI_MANIFEST.to_owned());
            Ok(Some(StoredManifest {
                digest,
                media_type,
                bytes: Bytes::from(bytes),
            }))
        })
        .await
    }

    /// Stores a manifest whose digest the caller verified
    /// ([`Digest::of_manifest`]). The media type goes first so the content
    /// never appears without it.
    pub async fn put_manifest(&self, host: &str, m: &StoredManifest) -> io::Result<()> {
        debug_assert_eq!(
            Digest::of_manifest(m.digest.algorithm(), &m.media_type, &m.bytes).as_ref(),
            Ok(&m.digest)
        );
        let path = self.manifest_path(host, &m.digest);
        let store = self.clone();
        let m = m.clone();
        let host = host.to_owned();
        blocking(move || {
            store.write_atomic(&path.with_extension("type"), m.media_type.as_bytes())?;
            store.write_atomic(&path, &m.bytes)?;
            store.record(&host, Kind::Manifest, &m.digest, m.bytes.len() as u64);
            Ok(())
        })
        .await
    }

    /// The record of `tag` in `repo` on upstream `host`; `None` when there
    /// is none, it cannot be read or it holds no answer.
    pub async fn tag(&self, host: &str, repo: &RepoName, tag: &Tag) -> Option<TagRecord> {
        let bytes = tokio::fs::read(self.tag_path(host, repo, tag)).await.ok()?;
        serde_json::from_slice::<TagRecord>(&bytes)
            .ok()
            .filter(|r| !r.is_empty())
    }

    /// Replaces the record of `tag` in `repo` on upstream `host`.
    pub async fn put_tag(
        &self,
        host: &str,
        repo: &RepoName,
        tag: &Tag,
        rec: &TagRecord,
    ) -> io::Result<()> {
        let path = self.tag_path(host, repo, tag);
        let bytes = serde_json::to_vec(rec).map_err(io::Error::other)?;
        let store = self.clone();
        blocking(move || store.write_atomic(&path, &bytes)).await
    }

    /// Removes the record of `tag` (all its answers); a missing one is fine.
    pub async fn remove_tag(&self, host: &str, repo: &RepoName, tag: &Tag) -> io::Result<()> {
        match tokio::fs::remove_file(self.tag_path(host, repo, tag)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Cached tags of one repository, sorted.
    pub async fn tags(&self, host: &str, repo: &RepoName) -> io::Result<Vec<String>> {
        let dir = layout::tags_dir(&self.root, host, repo);
        blocking(move || {
            let mut tags: Vec<String> = match std::fs::read_dir(&dir) {
                Ok(rd) => rd
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| Tag::parse(n).is_ok())
                    .collect(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e),
            };
            tags.sort();
            Ok(tags)
        })
        .await
    }

    /// Repositories with at least one cached tag, sorted.
    pub async fn repositories(&self, host: &str) -> io::Result<Vec<String>> {
        let dir = layout::repositories_dir(&self.root, host);
        blocking(move || {
            let mut out = Vec::new();
            fsutil::find_repositories(&dir, "", &mut out)?;
            out.sort();
            Ok(out)
        })
        .await
    }

    /// Writes `bytes` to `dest` through a fsynced temp file and a rename.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.temp_file()?;
        std::io::Write::write_all(&mut tmp.file(), bytes)?;
        tmp.persist(dest)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    #[tokio::test]
    async fn manifests_round_trip_with_media_type() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let body = Bytes::from_static(br#"{"schemaVersion":2}"#);
        let m = StoredManifest {
            digest: Digest::of(&body),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            bytes: body.clone(),
        };
        assert!(
            store
                .manifest("docker.io", &m.digest)
                .await
                .unwrap()
                .is_none()
        );
        store.put_manifest("docker.io", &m).await.unwrap();
        let got = store
            .manifest("docker.io", &m.digest)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.bytes, body);
        assert_eq!(got.media_type, m.media_type);
        // Per-upstream: another upstream does not see it.
        assert!(
            store
                .manifest("ghcr.io", &m.digest)
                .await
                .unwrap()
                .is_none()
        );
        // No temp files are left behind.
        assert_eq!(store.temp_files(), 0);
    }

    #[tokio::test]
    async fn sha512_content_is_stored_indexed_and_evicted_under_its_algorithm() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let body = Bytes::from_static(br#"{"schemaVersion":2,"config":{}}"#);
        let m = StoredManifest {
            digest: Algorithm::Sha512.digest(&body),
            media_type: crate::oci::media::OCI_MANIFEST.into(),
            bytes: body.clone(),
        };
        store.put_manifest("r.example", &m).await.unwrap();
        let got = store
            .manifest("r.example", &m.digest)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((got.digest, got.bytes), (m.digest.clone(), body.clone()));
        // The same bytes under sha256 are another manifest, not stored.
        assert!(
            store
                .manifest("r.example", &Digest::of(&body))
                .await
                .unwrap()
                .is_none()
        );
        let blob = Algorithm::Sha512.digest(b"layer");
        let path = store.blob_path("r.example", &blob);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"layer").unwrap();
        let manifest = layout::manifest_path(dir.path(), "r.example", &m.digest);
        let stored = [path, manifest.with_extension("type"), manifest];
        for p in &stored {
            assert!(p.exists(), "{}", p.display());
            assert!(p.to_string_lossy().contains("/sha512/"), "{}", p.display());
        }

        // A restart finds both; an age limit then evicts both, sidecar and all.
        let limits = Limits {
            max_age: Some(std::time::Duration::from_millis(1)),
            ..Limits::default()
        };
        let store = Store::open_with(dir.path(), limits, Arc::default())
            .await
            .unwrap();
        for _ in 0..500 {
            if store.usage().is_loaded() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(store.usage().files(), 2);
        assert_eq!(store.usage().stored_bytes(), body.len() as u64 + 5);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let ev = store.evict().await.unwrap();
        assert_eq!(ev.by_age, (2, body.len() as u64 + 5));
        for p in &stored {
            assert!(!p.exists(), "{} was not evicted", p.display());
        }
    }

    #[tokio::test]
    async fn tags_and_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let rec = TagRecord {
            broad: Some(TagAnswer {
                digest: Digest::of(b"x").to_string(),
                media_type: "t".into(),
            }),
            narrow: BTreeMap::new(),
        };
        for (repo, tag) in [
            ("library/alpine", "3"),
            ("library/alpine", "latest"),
            ("a/b/c", "v1"),
        ] {
            let repo = RepoName::parse(repo).unwrap();
            store
                .put_tag("docker.io", &repo, &Tag::parse(tag).unwrap(), &rec)
                .await
                .unwrap();
        }
        let alpine = RepoName::parse("library/alpine").unwrap();
        assert_eq!(
            store.tags("docker.io", &alpine).await.unwrap(),
            ["3", "latest"]
        );
        assert_eq!(
            store
                .tag("docker.io", &alpine, &Tag::parse("3").unwrap())
                .await,
            Some(rec)
        );
        assert_eq!(
            store.repositories("docker.io").await.unwrap(),
            ["a/b/c", "library/alpine"]
        );
        store
            .remove_tag("docker.io", &alpine, &Tag::parse("3").unwrap())
            .await
            .unwrap();
        assert_eq!(store.tags("docker.io", &alpine).await.unwrap(), ["latest"]);
    }

    fn answer(body: &[u8], media_type: &str) -> TagAnswer {
        TagAnswer {
            digest: Digest::of(body).to_string(),
            media_type: media_type.into(),
        }
    }

    #[test]
    fn a_record_from_before_accept_classes_reads_as_the_broad_answer() {
        let old = br#"{"digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","media_type":"application/vnd.oci.image.index.v1+json"}"#;
        let rec: TagRecord = serde_json::from_slice(old).unwrap();
        assert_eq!(
            rec,
            TagRecord {
                broad: Some(answer(b"", crate::oci::media::OCI_INDEX)),
                narrow: BTreeMap::new(),
            }
        );
        // Written back unchanged: a broad answer alone is the old format.
        assert_eq!(serde_json::to_vec(&rec).unwrap(), old);
    }

    #[test]
    fn records_keep_every_class_and_old_readers_see_the_broad_answer() {
        let rec = TagRecord {
            broad: Some(answer(b"index", crate::oci::media::OCI_INDEX)),
            narrow: BTreeMap::from([(
                "a-class".to_owned(),
                answer(b"one platform", crate::oci::media::DOCKER_MANIFEST),
            )]),
        };
        let json = serde_json::to_vec(&rec).unwrap();
        assert_eq!(serde_json::from_slice::<TagRecord>(&json).unwrap(), rec);
        // A cache from before classes reads `{"digest","media_type"}`.
        assert_eq!(
            serde_json::from_slice::<TagAnswer>(&json).unwrap(),
            rec.broad.clone().unwrap()
        );
        // Narrow answers only: no top-level answer for anyone to misread.
        let narrow = TagRecord { broad: None, ..rec };
        let json = serde_json::to_vec(&narrow).unwrap();
        assert!(serde_json::from_slice::<TagAnswer>(&json).is_err());
        assert_eq!(serde_json::from_slice::<TagRecord>(&json).unwrap(), narrow);
        assert!(!narrow.is_empty());
        assert!(TagRecord::default().is_empty());
    }

    #[tokio::test]
    async fn open_sweeps_the_temp_files_of_processes_that_are_gone_only() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = layout::tmp_dir(dir.path());
        // A process killed mid-write: its directory, lock file unlocked.
        let dead = layout::process_tmp_dir(dir.path(), 1, 1);
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(layout::process_tmp_lock(&dead), b"").unwrap();
        std::fs::write(dead.join("partial"), b"half a blob").unwrap();
        // A loose file an older version left long ago.
        let legacy = tmp.join("1-0-1");
        std::fs::write(&legacy, b"half a blob").unwrap();
        File::options()
            .write(true)
            .open(&legacy)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - 2 * tmpdir::STALE_AFTER)
            .unwrap();
        let first = Store::open(dir.path()).await.unwrap();
        assert!(!dead.exists(), "a dead process's temp files were kept");
        assert!(!legacy.exists(), "a stale loose temp file was kept");
        let partial = first.temp_file().unwrap();

        // A second process on the same root leaves the first one's alone.
        let second = Store::open(dir.path()).await.unwrap();
        assert_ne!(first.temp_dir(), second.temp_dir());
        assert_eq!(first.temp_files(), 1);
        drop(partial);
        assert_eq!(first.temp_files(), 0);
        let first_dir = first.temp_dir().to_owned();
        drop(first);
        // The index loads in the background, on a clone of the store.
        for _ in 0..500 {
            if !first_dir.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            !first_dir.exists(),
            "a closed store kept its temp directory"
        );
        assert!(second.temp_dir().exists());
    }
}
