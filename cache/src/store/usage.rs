//! What the store holds, how big it is and when each piece was last used:
//! the in-memory index behind the byte budget and least-recently-used eviction.
//!
//! Entries are compact (host id, kind, raw digest: about 100 bytes with
//! their bookkeeping) so that a store of 100k+ files costs a few MB. Recency
//! is kept in memory to the millisecond and survives restarts as the file's
//! mtime, which reads refresh at most once per [`TOUCH_EVERY`], so hot
//! content costs no extra syscalls.

use std::collections::{HashMap, hash_map};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::oci::{Algorithm, Digest};

/// Reads refresh a file's recorded recency at most this often.
pub const TOUCH_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
/// What a stored file holds; each kind has its own directory (see
/// [`layout::digests_dir`](super::layout::digests_dir)).
pub enum Kind {
    Blob,
    Manifest,
}

/// A digest's raw bytes, by algorithm: half the size of its hex, and `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RawDigest {
    Sha256([u8; 32]),
    Sha512([u8; 64]),
}

impl RawDigest {
    /// The raw bytes of `hex` under `algorithm`; `None` unless `hex` is
    /// exactly that algorithm's hex.
    fn decode(algorithm: Algorithm, hex: &str) -> Option<Self> {
        fn bytes<const N: usize>(hex: &str) -> Option<[u8; N]> {
            let mut raw = [0u8; N];
            hex::decode_to_slice(hex, &mut raw).ok()?;
            Some(raw)
        }
        Some(match algorithm {
            Algorithm::Sha256 => Self::Sha256(bytes(hex)?),
            Algorithm::Sha512 => Self::Sha512(bytes(hex)?),
        })
    }

    /// The digest these bytes are.
    pub fn digest(&self) -> Digest {
        let (algorithm, raw) = match self {
            Self::Sha256(b) => (Algorithm::Sha256, &b[..]),
            Self::Sha512(b) => (Algorithm::Sha512, &b[..]),
        };
        format!("{}:{}", algorithm.name(), hex::encode(raw))
            .parse()
            .expect("raw bytes of a registered algorithm make a valid digest")
    }
}

/// One stored file: `upstreams/<host>/<kind>/<algorithm>/<ab>/<hex>`
/// ([`super::layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    host: u32,
    pub kind: Kind,
    pub digest: RawDigest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub size: u64,
    /// Milliseconds since the epoch.
    pub last_used: u64,
    /// When recency was last written to the file's mtime (ms).
    persisted: u64,
    /// Readers currently streaming it: never evicted while > 0.
    pub leases: u32,
}

#[derive(Debug, Default)]
struct Inner {
    hosts: Vec<String>,
    entries: HashMap<Key, Entry>,
    bytes: u64,
    reserved: u64,
    loaded: bool,
}

#[derive(Debug, Default)]
pub struct Usage {
    inner: Mutex<Inner>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Usage {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key of `host`'s file of `kind` whose digest is `hex` under
    /// `algorithm`; `None` when `hex` is not that algorithm's hex (a file in
    /// the store that is not content, such as a `.type` sidecar).
    pub fn key(&self, host: &str, kind: Kind, algorithm: Algorithm, hex: &str) -> Option<Key> {
        let digest = RawDigest::decode(algorithm, hex)?;
        let mut inner = self.lock();
        let host = match inner.hosts.iter().position(|h| h == host) {
            Some(i) => i,
            None => {
                inner.hosts.push(host.to_owned());
                inner.hosts.len() - 1
            }
        } as u32;
        Some(Key { host, kind, digest })
    }

    pub fn host_of(&self, key: &Key) -> String {
        self.lock().hosts[key.host as usize].clone()
    }

    /// Bytes stored plus bytes reserved by fills in progress.
    pub fn committed(&self) -> u64 {
        let i = self.lock();
        i.bytes + i.reserved
    }

    pub fn stored_bytes(&self) -> u64 {
        self.lock().bytes
    }

    pub fn files(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_loaded(&self) -> bool {
        self.lock().loaded
    }

    /// Records a file (new, or found at startup). Idempotent.
    pub fn insert(&self, key: Key, size: u64, last_used: u64) {
        let mut i = self.lock();
        let old = i.entries.insert(
            key,
            Entry {
                size,
                last_used,
                persisted: last_used,
                leases: 0,
            },
        );
        match old {
            Some(o) => {
                i.bytes = i.bytes - o.size + size;
                // Keep leases and the newer recency of the existing entry.
                let e = i.entries.get_mut(&key).expect("just inserted");
                e.leases = o.leases;
                e.last_used = e.last_used.max(o.last_used);
            }
            None => i.bytes += size,
        }
    }

    /// Marks a file used now; true when its on-disk recency is due a refresh.
    pub fn touch(&self, key: &Key) -> bool {
        let now = now_ms();
        let mut i = self.lock();
        match i.entries.get_mut(key) {
            Some(e) => {
                e.last_used = e.last_used.max(now);
                let due = now.saturating_sub(e.persisted) >= TOUCH_EVERY.as_millis() as u64;
                if due {
                    e.persisted = now;
                }
                due
            }
            None => false,
        }
    }

    pub fn last_used(&self, key: &Key) -> Option<u64> {
        self.lock().entries.get(key).map(|e| e.last_used)
    }

    /// Forgets a file; returns its size if it was known and unleased.
    pub fn remove_if_unleased(&self, key: &Key) -> Option<u64> {
        let mut i = self.lock();
        match i.entries.get(key) {
            Some(e) if e.leases == 0 => {
                let size = e.size;
                i.entries.remove(key);
                i.bytes -= size;
                Some(size)
            }
            _ => None,
        }
    }

    /// Forgets a file that disappeared from disk.
    pub fn forget(&self, key: &Key) {
        let mut i = self.lock();
        if let Some(e) = i.entries.remove(key) {
            i.bytes -= e.size;
        }
    }

    /// Keeps the file from eviction until the lease is dropped.
    pub fn lease(self: &Arc<Self>, key: Key) -> Lease {
        let mut i = self.lock();
        if let Some(e) = i.entries.get_mut(&key) {
            e.leases += 1;
        }
        Lease {
            usage: Arc::clone(self),
            key,
        }
    }

    /// Accounts for bytes a fill is about to write.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Reservation {
        self.lock().reserved += bytes;
        Reservation {
            usage: Arc::clone(self),
            bytes,
        }
    }

    /// `f` applied to every entry, under the index lock (so nothing is
    /// added, leased or removed meanwhile): how eviction plans a pass.
    pub fn scan<R>(&self, f: impl FnOnce(hash_map::Iter<'_, Key, Entry>) -> R) -> R {
        f(self.lock().entries.iter())
    }

    /// Scans the store under `root` (stat only, no reads: every file where
    /// [`layout`](super::layout) puts content) and marks the index loaded.
    pub fn load(&self, root: &Path) -> io::Result<()> {
        let hosts = match std::fs::read_dir(super::layout::upstreams_dir(root)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.lock().loaded = true;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for host in hosts {
            let host = host?;
            let Ok(name) = host.file_name().into_string() else {
                continue;
            };
            for kind in [Kind::Blob, Kind::Manifest] {
                for algorithm in Algorithm::ALL {
                    let dir = super::layout::digests_dir(root, &name, kind, algorithm);
                    self.load_dir(&dir, &name, kind, algorithm)?;
                }
            }
        }
        self.lock().loaded = true;
        Ok(())
    }

    /// Indexes `dir` (`<host>/<kind>/<algorithm>`, if it exists): its
    /// `<ab>/<hex>` files, skipping anything else (`.type` sidecars).
    fn load_dir(&self, dir: &Path, host: &str, kind: Kind, algorithm: Algorithm) -> io::Result<()> {
        let Ok(prefixes) = std::fs::read_dir(dir) else {
            return Ok(());
        };
        for prefix in prefixes {
            let Ok(files) = std::fs::read_dir(prefix?.path()) else {
                continue;
            };
            for f in files {
                let f = f?;
                let Ok(fname) = f.file_name().into_string() else {
                    continue;
                };
                let Some(key) = self.key(host, kind, algorithm, &fname) else {
                    continue;
                };
                let Ok(meta) = f.metadata() else { continue };
                let used = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64);
                self.insert(key, meta.len(), used);
            }
        }
        Ok(())
    }
}

/// Held by a reader for as long as it streams a stored file.
#[derive(Debug)]
pub struct Lease {
    usage: Arc<Usage>,
    key: Key,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut i = self.usage.lock();
        if let Some(e) = i.entries.get_mut(&self.key) {
            e.leases = e.leases.saturating_sub(1);
        }
    }
}

/// Bytes a fill in progress will add; released when the fill ends.
#[derive(Debug)]
pub struct Reservation {
    usage: Arc<Usage>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.usage.lock().reserved -= self.bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    #[test]
    fn reservations_count_until_dropped_and_reinsert_is_idempotent() {
        let u = Arc::new(Usage::default());
        let k = u.key("h", Kind::Blob, Algorithm::Sha256, &hex(3)).unwrap();
        u.insert(k, 10, 1);
        u.insert(k, 10, 5);
        assert_eq!(u.stored_bytes(), 10);
        let r = u.reserve(50);
        assert_eq!(u.committed(), 60);
        drop(r);
        assert_eq!(u.committed(), 10);
        assert!(
            u.key("h", Kind::Blob, Algorithm::Sha256, "not-hex")
                .is_none()
        );
    }

    #[test]
    fn touch_refreshes_stale_recency_only() {
        let u = Usage::default();
        let k = u.key("h", Kind::Blob, Algorithm::Sha256, &hex(4)).unwrap();
        u.insert(k, 1, 0);
        assert!(u.touch(&k), "an old entry is due a refresh");
        assert!(!u.touch(&k), "a fresh one is not");
    }

    #[test]
    fn keys_are_per_algorithm_and_give_back_their_digest() {
        let u = Usage::default();
        for a in Algorithm::ALL {
            let d = a.digest(b"x");
            let k = u.key("h", Kind::Blob, a, d.hex()).unwrap();
            assert_eq!(k.digest.digest(), d);
            // A hex of the other length names nothing under this algorithm.
            let other = Algorithm::ALL.into_iter().find(|o| *o != a).unwrap();
            assert!(u.key("h", Kind::Blob, other, d.hex()).is_none());
        }
        // The same leading bytes under two algorithms are two keys.
        let short = u.key("h", Kind::Blob, Algorithm::Sha256, &hex(5)).unwrap();
        let long = u
            .key("h", Kind::Blob, Algorithm::Sha512, &hex(5).repeat(2))
            .unwrap();
        assert_ne!(short, long);
    }

    #[test]
    fn load_scans_the_layout_and_skips_sidecars() {
        let dir = tempfile::tempdir().unwrap();
        let up = dir.path().join("upstreams");
        let b = up.join("docker.io/blobs/sha256/aa");
        let m = up.join("ghcr.io/manifests/sha256/bb");
        std::fs::create_dir_all(&b).unwrap();
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(b.join("aa".repeat(32)), vec![0u8; 300]).unwrap();
        std::fs::write(m.join("bb".repeat(32)), vec![0u8; 20]).unwrap();
        std::fs::write(m.join(format!("{}.type", "bb".repeat(32))), "x").unwrap();
        // sha512 content beside it, and names of the wrong length for their
        // algorithm (never written by the store) skipped.
        let b512 = up.join("docker.io/blobs/sha512/cc");
        let m512 = up.join("ghcr.io/manifests/sha512/dd");
        std::fs::create_dir_all(&b512).unwrap();
        std::fs::create_dir_all(&m512).unwrap();
        std::fs::write(b512.join("cc".repeat(64)), vec![0u8; 4000]).unwrap();
        std::fs::write(b512.join("cc".repeat(32)), vec![0u8; 1]).unwrap();
        std::fs::write(b.join("aa".repeat(64)), vec![0u8; 1]).unwrap();
        std::fs::write(m512.join("dd".repeat(64)), vec![0u8; 5]).unwrap();
        std::fs::write(m512.join(format!("{}.type", "dd".repeat(64))), "x").unwrap();
        let u = Usage::default();
        assert!(!u.is_loaded());
        u.load(dir.path()).unwrap();
        assert!(u.is_loaded());
        assert_eq!((u.files(), u.stored_bytes()), (4, 4325));
        let k = u
            .key("docker.io", Kind::Blob, Algorithm::Sha512, &"cc".repeat(64))
            .unwrap();
        assert!(u.last_used(&k).is_some(), "the sha512 blob is indexed");
    }
}
