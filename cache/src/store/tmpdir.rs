//! Each process's own temp directory, and the sweep of those whose process
//! is gone.
//!
//! Several processes can share one storage root: on a ReadWriteMany volume
//! the new pod of a rolling update starts before the old one stops. So each
//! process writes its temp files in a directory of its own
//! ([`layout::process_tmp_dir`]) and holds the lock file inside it
//! ([`layout::process_tmp_lock`]) locked (`flock`, exclusive) for as long
//! as it runs. The kernel drops the lock when the process ends, however it
//! ends, so a process that starts removes exactly the directories whose
//! lock it can take (`kill -9` leftovers) and never one whose lock is held:
//! it cannot cut off another process's downloads.
//!
//! Two things have no lock to tell: files directly in `tmp/`, written by
//! versions from before these directories (which may still run on the same
//! volume during a rolling update), and the directories on a filesystem
//! without locks. Their files are removed only once unmodified for
//! [`STALE_AFTER`] ([`is_stale`]). Locks must hold across every client of
//! the volume (NFSv4 and CephFS locks do); where they are local to a node,
//! processes on different nodes must not share a storage root.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{FlockOperation, Mode, OFlags, flock};
use rustix::io::Errno;

use super::layout;

/// How long a temp file nobody is known to own must have gone unmodified
/// before it is taken for a leftover. A download writes its temp file at
/// least once per `timeouts.body_idle` (30 s by default) or fails and
/// removes it, and a file is renamed into place right after its last write
/// and fsync: an hour leaves a wide margin for every configuration.
pub const STALE_AFTER: Duration = Duration::from_secs(60 * 60);

/// Whether a temp file no lock vouches for, last modified at `modified`,
/// is a leftover at `now`: unmodified for [`STALE_AFTER`] or longer. A
/// modification time in the future (clock skew) is not stale.
pub fn is_stale(modified: SystemTime, now: SystemTime) -> bool {
    now.duration_since(modified)
        .is_ok_and(|age| age >= STALE_AFTER)
}

/// This process's temp directory, locked while the value lives; removed,
/// with whatever is still in it, when it is dropped.
#[derive(Debug)]
pub struct ProcessTmp {
    dir: PathBuf,
    /// The open lock file whose `flock` claims `dir`; `None` on a filesystem
    /// without locks. Dropped (unlocked) after `dir` is removed.
    _lock: Option<File>,
}

impl ProcessTmp {
    /// Creates and locks a new temp directory for this process under
    /// `root`'s `tmp/`: `<root>/tmp/<pid>-<nonce>` with a nonce no existing
    /// directory has. On a filesystem without locks the directory is used
    /// unlocked, and on a read-only one it is only named (a warning says
    /// which), as a read-only store has always opened. Errors: the
    /// directory cannot be created or its lock file opened.
    pub fn claim(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(layout::tmp_dir(root))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        // A sweeper starting at the same moment may take a new directory's
        // lock before its creator does; the creator then takes another one.
        for attempt in 0..16 {
            let dir = layout::process_tmp_dir(root, std::process::id(), nanos + attempt);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                // Stored content can still be served; writes fail (and
                // readiness with them) until the volume is writable.
                Err(e) if e.kind() == io::ErrorKind::ReadOnlyFilesystem => {
                    tracing::warn!(dir = %dir.display(), "the storage is read-only: nothing can be stored");
                    return Ok(Self { dir, _lock: None });
                }
                Err(e) => return Err(e),
            }
            match lock(&dir)? {
                Lock::Held(file) => {
                    return Ok(Self {
                        dir,
                        _lock: Some(file),
                    });
                }
                Lock::Busy | Lock::Gone => continue,
                Lock::Unsupported(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "the storage has no file locks; temp files of other processes are removed only when unmodified for an hour");
                    return Ok(Self { dir, _lock: None });
                }
            }
        }
        Err(io::Error::other("no temp directory could be claimed"))
    }

    /// The directory: `<root>/tmp/<pid>-<nonce>` ([`layout::process_tmp_dir`]).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ProcessTmp {
    fn drop(&mut self) {
        if let Err(e) = remove_locked(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove the temp directory");
        }
    }
}

/// What [`sweep`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Temp directories of processes that are gone.
    pub dirs: usize,
    /// Files: those in the removed directories, and stale ones no lock
    /// vouches for ([`is_stale`]).
    pub files: usize,
}

/// Removes the leftovers in `root`'s `tmp/` (creating it if missing): every
/// process temp directory whose lock is free, with its files; on a
/// filesystem without locks, the files of such directories that are stale
/// at `now`; and the stale files directly in `tmp/`. Never touches a
/// directory whose lock is held. An entry that cannot be removed is logged
/// and left. Errors: `tmp/` cannot be created or listed.
pub fn sweep(root: &Path, now: SystemTime) -> io::Result<Swept> {
    let tmp = layout::tmp_dir(root);
    std::fs::create_dir_all(&tmp)?;
    let mut swept = Swept::default();
    for entry in std::fs::read_dir(&tmp)? {
        let entry = entry?;
        let path = entry.path();
        let result = match entry.file_type() {
            Ok(t) if t.is_dir() => sweep_dir(&path, now, &mut swept),
            Ok(t) if t.is_file() => remove_if_stale(&path, now).map(|gone| {
                swept.files += usize::from(gone);
            }),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot sweep a temp file");
        }
    }
    Ok(swept)
}

/// Removes `dir` if its process is gone (its lock is free), or its stale
/// files if the filesystem cannot tell.
fn sweep_dir(dir: &Path, now: SystemTime, swept: &mut Swept) -> io::Result<()> {
    match lock(dir)? {
        Lock::Held(_lock) => {
            swept.files += remove_locked(dir)?;
            swept.dirs += 1;
        }
        Lock::Busy | Lock::Gone => {}
        Lock::Unsupported(_) => {
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                if entry.file_name() != layout::TMP_LOCK && entry.file_type()?.is_file() {
                    swept.files += usize::from(remove_if_stale(&entry.path(), now)?);
                }
            }
        }
    }
    Ok(())
}

/// Removes the file at `path` if it is stale at `now`; whether it did.
fn remove_if_stale(path: &Path, now: SystemTime) -> io::Result<bool> {
    if !is_stale(std::fs::metadata(path)?.modified()?, now) {
        return Ok(false);
    }
    ignore_not_found(std::fs::remove_file(path))?;
    Ok(true)
}

/// What taking the lock of a process temp directory gave.
enum Lock {
    /// Taken: the directory is the caller's while the file stays open.
    Held(File),
    /// Held by a live process (maybe this one, through another handle).
    Busy,
    /// The directory or its lock file went away meanwhile: another process
    /// swept it.
    Gone,
    /// The filesystem has no `flock`.
    Unsupported(io::Error),
}

/// Tries, without waiting, to lock `dir`'s lock file (creating it: a
/// directory whose creator died before making it is anybody's).
fn lock(dir: &Path) -> io::Result<Lock> {
    let path = layout::process_tmp_lock(dir);
    // Open for reading only (`flock` needs no more): a file open for
    // writing would keep the volume from being remounted read-only.
    let flags = OFlags::RDONLY | OFlags::CREATE | OFlags::CLOEXEC;
    let file = match rustix::fs::open(&path, flags, Mode::from_raw_mode(0o644)) {
        Ok(fd) => File::from(fd),
        Err(e) if e == Errno::NOENT => return Ok(Lock::Gone),
        Err(e) => return Err(e.into()),
    };
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == Errno::WOULDBLOCK => return Ok(Lock::Busy),
        Err(e) => return Ok(Lock::Unsupported(e.into())),
    }
    // A sweeper that held the lock unlinks the file before letting go: a
    // lock on a file no longer at the path claims nothing.
    let here = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Lock::Gone),
        Err(e) => return Err(e),
    };
    let locked = file.metadata()?;
    if (here.dev(), here.ino()) != (locked.dev(), locked.ino()) {
        return Ok(Lock::Gone);
    }
    Ok(Lock::Held(file))
}

/// Removes `dir`, whose lock the caller holds: its files, then the lock
/// file, then the directory (left if another sweeper has meanwhile made a
/// new lock file in it; that one removes it). Returns how many entries
/// besides the lock file it held.
fn remove_locked(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name() == layout::TMP_LOCK {
            continue;
        }
        let path = entry.path();
        ignore_not_found(if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        })?;
        removed += 1;
    }
    ignore_not_found(std::fs::remove_file(layout::process_tmp_lock(dir)))?;
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => Ok(removed),
        other => ignore_not_found(other).map(|()| removed),
    }
}

fn ignore_not_found(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_unmodified_for_an_hour_are_stale() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert!(!is_stale(now, now));
        assert!(!is_stale(now - STALE_AFTER + Duration::from_secs(1), now));
        assert!(is_stale(now - STALE_AFTER, now));
        assert!(is_stale(now - 10 * STALE_AFTER, now));
        // Written "later" by a host whose clock is ahead: in use.
        assert!(!is_stale(now + Duration::from_secs(5), now));
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_claimed_directory_is_left_alone_and_removed_when_released() {
        let root = tempfile::tempdir().unwrap();
        let mine = ProcessTmp::claim(root.path()).unwrap();
        let dir = mine.dir().to_owned();
        assert_eq!(dir.parent(), Some(layout::tmp_dir(root.path()).as_path()));
        assert_eq!(layout::tmp_dir_pid(&dir), Some(std::process::id()));
        std::fs::write(dir.join("partial"), b"half a blob").unwrap();
        // Another claimant (the lock is per open file, so this process's
        // second handle counts as another process) sweeps around it.
        let other = ProcessTmp::claim(root.path()).unwrap();
        assert_ne!(other.dir(), dir);
        let now = SystemTime::now() + 2 * STALE_AFTER;
        assert_eq!(sweep(root.path(), now).unwrap(), Swept::default());
        assert_eq!(files_in(&dir), [layout::TMP_LOCK, "partial"]);
        drop(mine);
        assert!(!dir.exists(), "a released directory was kept");
        assert!(other.dir().exists());
    }

    #[test]
    fn directories_whose_lock_is_free_are_swept_whatever_their_age() {
        let root = tempfile::tempdir().unwrap();
        let tmp = layout::tmp_dir(root.path());
        // A process killed mid-download: its lock file is there, unlocked.
        let dead = layout::process_tmp_dir(root.path(), 7, 1);
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(layout::process_tmp_lock(&dead), b"").unwrap();
        std::fs::write(dead.join("7-0-1"), b"half a blob").unwrap();
        // One killed before it made its lock file.
        let unborn = layout::process_tmp_dir(root.path(), 8, 1);
        std::fs::create_dir_all(&unborn).unwrap();
        let live = ProcessTmp::claim(root.path()).unwrap();
        std::fs::write(live.dir().join("9-0-1"), b"in progress").unwrap();

        let swept = sweep(root.path(), SystemTime::now()).unwrap();
        assert_eq!(swept, Swept { dirs: 2, files: 1 });
        let live_name = live.dir().file_name().unwrap().to_str().unwrap();
        assert_eq!(files_in(&tmp), [live_name]);
        assert_eq!(files_in(live.dir()), [layout::TMP_LOCK, "9-0-1"]);
    }

    #[test]
    fn loose_files_of_older_versions_are_swept_only_when_stale() {
        let root = tempfile::tempdir().unwrap();
        let tmp = layout::tmp_dir(root.path());
        std::fs::create_dir_all(&tmp).unwrap();
        let (old, new) = (tmp.join("1-0-1"), tmp.join("1-1-2"));
        std::fs::write(&old, b"left by a crash").unwrap();
        std::fs::write(&new, b"an older process still writing").unwrap();
        let hours_ago = SystemTime::now() - 2 * STALE_AFTER;
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(hours_ago)
            .unwrap();
        let swept = sweep(root.path(), SystemTime::now()).unwrap();
        assert_eq!(swept, Swept { dirs: 0, files: 1 });
        assert_eq!(files_in(&tmp), ["1-1-2"]);
    }
}
