//! Writing and removing `hosts.toml` files in a containerd registry config
//! directory (`/etc/containerd/certs.d`), without ever clobbering a file or
//! directory regmirror did not write.
//!
//! Writes are atomic (temp file in the same directory, fsync, rename, fsync
//! the directory) and skipped when the content is already right, so
//! containerd, which re-reads the file on every pull, never sees half a file.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::hosts_toml::{self, HostsToml, owner_of, render};

/// Where a user's own `hosts.toml` is kept while merge mode extends it.
pub const BACKUP: &str = "hosts.toml.regmirror-orig";
const TEMP: &str = ".hosts.toml.regmirror-tmp";

/// What to do with a `hosts.toml` regmirror did not write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeMode {
    /// Leave it alone and report a conflict.
    #[default]
    Never,
    /// Keep it (backed up, restored on removal) and put the cache in front of
    /// the user's own `[host]` entries.
    KeepUserHosts,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostState {
    /// Written now.
    Configured,
    /// Already as wanted.
    Unchanged,
    /// Left alone: something regmirror does not own is in the way.
    Conflict(String),
    /// Our file for a host no longer wanted, removed (or the user's restored).
    Removed,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    pub registry: String,
    pub state: HostState,
}

/// One directory, one mirror.
#[derive(Debug, Clone, Copy)]
pub struct Apply<'a> {
    pub dir: &'a Path,
    pub owner: &'a str,
    pub merge: MergeMode,
}

/// Makes `dir` hold exactly `desired` for `owner`: writes what is missing or
/// different, removes this owner's files for registries no longer wanted.
/// A failure's message starts with the registry's directory (an OS error
/// alone does not say which file it is about).
pub fn apply(a: Apply<'_>, desired: &[HostsToml]) -> Vec<HostReport> {
    let failed = |registry: &str, e: io::Error| {
        HostState::Failed(format!("{}: {e}", a.dir.join(registry).display()))
    };
    let mut out: Vec<HostReport> = desired
        .iter()
        .map(|h| HostReport {
            registry: h.registry.clone(),
            state: apply_one(a, h).unwrap_or_else(|e| failed(&h.registry, e)),
        })
        .collect();
    for registry in owned_registries(a.dir, a.owner) {
        if desired.iter().any(|h| h.registry == registry) {
            continue;
        }
        let state = match remove_one(&a.dir.join(&registry)) {
            Ok(()) => HostState::Removed,
            Err(e) => failed(&registry, e),
        };
        out.push(HostReport { registry, state });
    }
    out
}

/// Removes every file `owner` wrote under `dir`, restoring merged users' files.
pub fn remove_owned(dir: &Path, owner: &str) -> Vec<HostReport> {
    apply(
        Apply {
            dir,
            owner,
            merge: MergeMode::Never,
        },
        &[],
    )
}

/// A registry name that is safe as one directory name.
fn valid_registry(r: &str) -> bool {
    !r.is_empty()
        && r != "."
        && r != ".."
        && r != "_default"
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
}

/// containerd looks for `host_port_` before `host:port`: such a directory
/// would shadow ours.
fn shadowing_dir(registry: &str) -> Option<String> {
    let (host, port) = registry.rsplit_once(':')?;
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("{host}_{port}_"))
}

fn apply_one(a: Apply<'_>, h: &HostsToml) -> io::Result<HostState> {
    if !valid_registry(&h.registry) {
        return Ok(HostState::Failed(format!(
            "{:?} is not a registry host name",
            h.registry
        )));
    }
    if let Some(shadow) = shadowing_dir(&h.registry).filter(|s| a.dir.join(s).exists()) {
        return Ok(HostState::Conflict(format!(
            "{} exists and containerd reads it instead of {}",
            a.dir.join(shadow).display(),
            h.registry
        )));
    }
    let host_dir = a.dir.join(&h.registry);
    let file = host_dir.join("hosts.toml");
    let backup = host_dir.join(BACKUP);
    let current = read_if_exists(&file)?;
    let user_hosts = match current.as_deref().map(owner_of) {
        Some(Some(owner)) if owner != a.owner => {
            return Ok(HostState::Conflict(format!(
                "{} belongs to RegistryMirror {owner:?}",
                file.display()
            )));
        }
        // Ours: keep merging from the user's backup, if any; with merging
        // turned off since, the user's file comes back as it was (and is in
        // the way, as it was before merging).
        Some(Some(_)) => match read_if_exists(&backup)? {
            Some(_) if a.merge == MergeMode::Never => {
                remove_one(&host_dir)?;
                return Ok(not_ours(&file));
            }
            Some(text) => user_hosts(&text, &backup)?,
            None => Vec::new(),
        },
        Some(None) => match a.merge {
            MergeMode::Never => return Ok(not_ours(&file)),
            MergeMode::KeepUserHosts => {
                let text = current.clone().unwrap_or_default();
                let hosts = user_hosts(&text, &file)?;
                write_atomic(&host_dir, BACKUP, text.as_bytes())?;
                hosts
            }
        },
        None => {
            let foreign = match fs::read_dir(&host_dir) {
                Ok(rd) => rd.filter_map(|e| e.ok()).any(|e| e.file_name() != TEMP),
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(e),
            };
            if foreign && a.merge == MergeMode::Never {
                return Ok(HostState::Conflict(format!(
                    "{} exists with files regmirror did not write",
                    host_dir.display()
                )));
            }
            Vec::new()
        }
    };
    let text = render(h, &user_hosts);
    if current.as_deref() == Some(text.as_str()) {
        return Ok(HostState::Unchanged);
    }
    fs::create_dir_all(&host_dir)?;
    write_atomic(&host_dir, "hosts.toml", text.as_bytes())?;
    Ok(HostState::Configured)
}

/// A user's `file` in the way of a mirror that does not merge.
fn not_ours(file: &Path) -> HostState {
    HostState::Conflict(format!(
        "{} was not written by regmirror (set the mirror's spec.nodes.mergeExisting: true to keep its hosts behind the cache)",
        file.display()
    ))
}

fn user_hosts(text: &str, from: &Path) -> io::Result<hosts_toml::HostTables> {
    hosts_toml::parse_user(text)
        .map(|(_, hosts)| hosts)
        .map_err(|e| {
            let name = from.file_name().map(Path::new).unwrap_or(from);
            io::Error::other(format!("cannot merge {}: {e}", name.display()))
        })
}

/// The owners (RegistryMirror names) of every `hosts.toml` under `dir` that
/// carries our marker, sorted, each once; empty when `dir` cannot be read.
/// The node agent removes the files of owners that no mirror wants here
/// (issue 17: orphans of deleted mirrors blocked later ones).
pub fn owners(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = marked(dir).into_iter().map(|(_, o)| o).collect();
    out.sort();
    out.dedup();
    out
}

/// Registries under `dir` whose `hosts.toml` names `owner`, sorted.
fn owned_registries(dir: &Path, owner: &str) -> Vec<String> {
    marked(dir)
        .into_iter()
        .filter(|(_, o)| o == owner)
        .map(|(registry, _)| registry)
        .collect()
}

/// Every (registry, owner) under `dir` whose `hosts.toml` carries our
/// marker, sorted by registry; empty when `dir` cannot be read.
fn marked(dir: &Path) -> Vec<(String, String)> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| {
            let text = fs::read_to_string(dir.join(&name).join("hosts.toml")).ok()?;
            let owner = owner_of(&text)?.to_owned();
            Some((name, owner))
        })
        .collect();
    out.sort();
    out
}

/// Removes our file: restores the user's backup, or deletes the file and the
/// directory if that leaves it empty.
fn remove_one(host_dir: &Path) -> io::Result<()> {
    let file = host_dir.join("hosts.toml");
    let backup = host_dir.join(BACKUP);
    if backup.exists() {
        fs::rename(&backup, &file)?;
    } else {
        match fs::remove_file(&file) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let _ = fs::remove_file(host_dir.join(TEMP));
        // Fails, as it should, when anything else is in the directory.
        let _ = fs::remove_dir(host_dir);
    }
    sync_dir(host_dir.parent().unwrap_or(host_dir))
}

fn read_if_exists(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp: PathBuf = dir.join(TEMP);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn entry(registry: &str, owner: &str) -> HostsToml {
        HostsToml {
            registry: registry.into(),
            server: format!("https://{registry}"),
            mirrors: vec!["http://10.0.0.5:30500".into()],
            dial_timeout: Duration::from_secs(1),
            owner: owner.into(),
        }
    }

    fn run(dir: &Path, owner: &str, desired: &[HostsToml], merge: MergeMode) -> Vec<HostState> {
        apply(Apply { dir, owner, merge }, desired)
            .into_iter()
            .map(|r| r.state)
            .collect()
    }

    #[test]
    fn writes_then_skips_identical_then_removes_exactly_its_own() {
        let d = tempfile::tempdir().unwrap();
        let want = [entry("docker.io", "hub"), entry("ghcr.io", "hub")];
        assert_eq!(
            run(d.path(), "hub", &want, MergeMode::Never),
            [HostState::Configured, HostState::Configured]
        );
        let text = fs::read_to_string(d.path().join("docker.io/hosts.toml")).unwrap();
        assert_eq!(owner_of(&text), Some("hub"));
        assert_eq!(
            run(d.path(), "hub", &want, MergeMode::Never),
            [HostState::Unchanged, HostState::Unchanged]
        );
        // A user's directory next to ours is untouched throughout.
        fs::create_dir_all(d.path().join("quay.io")).unwrap();
        fs::write(
            d.path().join("quay.io/hosts.toml"),
            "server = \"https://quay.io\"\n",
        )
        .unwrap();
        // ghcr.io no longer wanted: removed, directory and all.
        assert_eq!(
            run(d.path(), "hub", &want[..1], MergeMode::Never),
            [HostState::Unchanged, HostState::Removed]
        );
        assert!(!d.path().join("ghcr.io").exists());
        let reports = remove_owned(d.path(), "hub");
        assert_eq!(reports.len(), 1);
        assert!(!d.path().join("docker.io").exists());
        assert!(d.path().join("quay.io/hosts.toml").exists());
        // No temp files anywhere.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_wiped_file_is_rewritten_and_an_edited_one_restored() {
        let d = tempfile::tempdir().unwrap();
        let want = [entry("docker.io", "hub")];
        run(d.path(), "hub", &want, MergeMode::Never);
        let file = d.path().join("docker.io/hosts.toml");
        let good = fs::read_to_string(&file).unwrap();
        fs::remove_file(&file).unwrap();
        assert_eq!(
            run(d.path(), "hub", &want, MergeMode::Never),
            [HostState::Configured]
        );
        fs::write(&file, good.replace("30500", "1")).unwrap();
        assert_eq!(
            run(d.path(), "hub", &want, MergeMode::Never),
            [HostState::Configured]
        );
        assert_eq!(fs::read_to_string(&file).unwrap(), good);
    }

    #[test]
    fn messages_say_which_file_and_which_field_to_change() {
        let d = tempfile::tempdir().unwrap();
        // A user's file: the conflict names the spec field that keeps it.
        fs::create_dir_all(d.path().join("docker.io")).unwrap();
        fs::write(d.path().join("docker.io/hosts.toml"), "server = \"x\"\n").unwrap();
        // A plain file where the registry's directory goes: an OS error,
        // which alone would not say where.
        fs::write(d.path().join("ghcr.io"), "not a directory").unwrap();
        let states = run(
            d.path(),
            "hub",
            &[entry("docker.io", "hub"), entry("ghcr.io", "hub")],
            MergeMode::Never,
        );
        let HostState::Conflict(conflict) = &states[0] else {
            panic!("{states:?}")
        };
        assert!(conflict.contains("spec.nodes.mergeExisting"), "{conflict}");
        let HostState::Failed(failed) = &states[1] else {
            panic!("{states:?}")
        };
        let dir = d.path().join("ghcr.io").display().to_string();
        assert!(failed.starts_with(&format!("{dir}: ")), "{failed}");
    }

    #[test]
    fn never_clobbers_what_it_did_not_write() {
        let d = tempfile::tempdir().unwrap();
        let user = "server = \"https://registry-1.docker.io\"\n[host.\"https://corp-mirror\"]\n  capabilities = [\"pull\"]\n";
        fs::create_dir_all(d.path().join("docker.io")).unwrap();
        fs::write(d.path().join("docker.io/hosts.toml"), user).unwrap();
        // Only certificates in a directory: still not ours.
        fs::create_dir_all(d.path().join("ghcr.io")).unwrap();
        fs::write(d.path().join("ghcr.io/ca.crt"), "cert").unwrap();
        // Another mirror's file.
        run(
            d.path(),
            "other",
            &[entry("quay.io", "other")],
            MergeMode::Never,
        );
        // A shadowing directory for a host with a port.
        fs::create_dir_all(d.path().join("reg.local_5000_")).unwrap();

        let states = run(
            d.path(),
            "hub",
            &[
                entry("docker.io", "hub"),
                entry("ghcr.io", "hub"),
                entry("quay.io", "hub"),
                entry("reg.local:5000", "hub"),
                entry("../etc", "hub"),
            ],
            MergeMode::Never,
        );
        assert!(
            matches!(&states[0], HostState::Conflict(m) if m.contains("not written by regmirror")),
            "{states:?}"
        );
        assert!(matches!(&states[1], HostState::Conflict(m) if m.contains("did not write")));
        assert!(matches!(&states[2], HostState::Conflict(m) if m.contains("\"other\"")));
        assert!(matches!(&states[3], HostState::Conflict(m) if m.contains("reg.local_5000_")));
        assert!(matches!(&states[4], HostState::Failed(_)));
        assert_eq!(
            fs::read_to_string(d.path().join("docker.io/hosts.toml")).unwrap(),
            user
        );
        assert_eq!(fs::read_dir(d.path().join("ghcr.io")).unwrap().count(), 1);
        assert!(!d.path().join("etc").exists());
        // Removing hub's files touches none of these.
        assert!(remove_owned(d.path(), "hub").is_empty());
        assert!(
            owner_of(&fs::read_to_string(d.path().join("quay.io/hosts.toml")).unwrap())
                == Some("other")
        );
    }

    #[test]
    fn owners_lists_each_marked_owner_once_and_never_a_users_file() {
        let d = tempfile::tempdir().unwrap();
        assert!(owners(&d.path().join("missing")).is_empty());
        run(
            d.path(),
            "hub",
            &[entry("docker.io", "hub"), entry("ghcr.io", "hub")],
            MergeMode::Never,
        );
        run(
            d.path(),
            "hub2",
            &[entry("quay.io", "hub2")],
            MergeMode::Never,
        );
        fs::create_dir_all(d.path().join("gcr.io")).unwrap();
        fs::write(d.path().join("gcr.io/hosts.toml"), "server = \"x\"\n").unwrap();
        assert_eq!(owners(d.path()), ["hub", "hub2"]);
    }

    #[test]
    fn merge_mode_keeps_the_users_hosts_and_restores_them_on_removal() {
        let d = tempfile::tempdir().unwrap();
        let user = "server = \"https://registry-1.docker.io\"\n[host.\"https://corp-mirror\"]\n  capabilities = [\"pull\"]\n";
        fs::create_dir_all(d.path().join("docker.io")).unwrap();
        fs::write(d.path().join("docker.io/hosts.toml"), user).unwrap();
        let want = [entry("docker.io", "hub")];
        assert_eq!(
            run(d.path(), "hub", &want, MergeMode::KeepUserHosts),
            [HostState::Configured]
        );
        let text = fs::read_to_string(d.path().join("docker.io/hosts.toml")).unwrap();
        assert!(
            text.find("10.0.0.5").unwrap() < text.find("corp-mirror").unwrap(),
            "{text}"
        );
        // Stable on the next pass (merged from the backup).
        assert_eq!(
            run(d.path(), "hub", &want, MergeMode::KeepUserHosts),
            [HostState::Unchanged]
        );
        remove_owned(d.path(), "hub");
        assert_eq!(
            fs::read_to_string(d.path().join("docker.io/hosts.toml")).unwrap(),
            user
        );
        assert!(!d.path().join("docker.io").join(BACKUP).exists());
    }

    #[test]
    fn turning_merging_off_gives_the_user_their_file_back() {
        let d = tempfile::tempdir().unwrap();
        let user = "server = \"https://ghcr.io\"\n[host.\"https://corp-mirror\"]\n  capabilities = [\"pull\"]\n";
        fs::create_dir_all(d.path().join("ghcr.io")).unwrap();
        fs::write(d.path().join("ghcr.io/hosts.toml"), user).unwrap();
        let want = [entry("ghcr.io", "hub")];
        assert_eq!(
            run(d.path(), "hub", &want, MergeMode::KeepUserHosts),
            [HostState::Configured]
        );
        // mergeExisting back to false: the original returns, and is in the way.
        let states = run(d.path(), "hub", &want, MergeMode::Never);
        assert!(
            matches!(&states[..], [HostState::Conflict(m)] if m.contains("mergeExisting: true")),
            "{states:?}"
        );
        assert_eq!(
            fs::read_to_string(d.path().join("ghcr.io/hosts.toml")).unwrap(),
            user
        );
        assert!(!d.path().join("ghcr.io").join(BACKUP).exists());
        // And stays so on the next pass.
        assert!(matches!(
            &run(d.path(), "hub", &want, MergeMode::Never)[..],
            [HostState::Conflict(_)]
        ));
    }
}
