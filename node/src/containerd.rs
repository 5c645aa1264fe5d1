//! Will containerd read the files we write? Read from its `config.toml`, so a
//! node that ignores hosts.toml is reported instead of silently doing nothing.
//! (Facts: shared/design/node-config.md.)

use std::path::Path;

use crate::containerd_imports::{self, ConfigFile, HostRoot, Loaded, NodeFiles};
use crate::containerd_merge::{self, Registry, Rules};

/// What a node's containerd configuration says about `hosts.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// containerd will read hosts.toml from the directory we write to.
    pub reads_hosts: bool,
    /// The main config file's version (1/2: containerd 1.x-2.x layout, 3: 2.x;
    /// 0 without a readable config).
    pub version: i64,
    /// The CRI registry `config_path` in effect after imports and migration,
    /// as configured (not containerd 2.2+'s default).
    pub config_path: Option<String>,
    /// Legacy `registry.mirrors` are set.
    pub legacy_mirrors: bool,
    /// What a user should know or do, empty when all is well.
    pub message: String,
}

/// Inspects `config` (the text of containerd's config.toml, `None` if the
/// node has none) for whether hosts.toml files in `certs_dir` (the host's
/// path, e.g. `/etc/containerd/certs.d`) take effect, on a containerd of
/// unknown version. `imports` are not followed (see [`inspect_file`]).
pub fn inspect(config: Option<&str>, certs_dir: &str) -> Detection {
    let Some(text) = config else {
        return no_config(certs_dir);
    };
    let doc: toml::Table = match text.parse() {
        Ok(d) => d,
        Err(e) => {
            return refused(format!(
                "containerd config.toml does not parse: {}",
                e.message()
            ));
        }
    };
    let loaded = Loaded {
        files: vec![ConfigFile {
            path: "config.toml".to_owned(),
            doc,
        }],
        unmatched: Vec::new(),
    };
    decide(&Rules::all().map(|r| (r, Ok(loaded.clone()))), certs_dir)
}

/// Inspects the node's containerd configuration as containerd reads it: the
/// main file `config_on_node` and every file its `imports` pull in (globs,
/// paths relative to the importing file, imports of imports, cycles), merged
/// and migrated as the node's containerd release does
/// ([`crate::containerd_merge`]), for whether hosts.toml files in
/// `certs_dir_on_node` take effect. Node paths are read under `host_root`
/// (`/host` in the agent pod, `/` on the node itself); messages name node
/// paths. `runtime_version` is the Node's
/// `status.nodeInfo.containerRuntimeVersion` (`containerd://1.7.12`); when it
/// is `None` or unreadable, every release is considered and a configuration
/// whose effect depends on the release is reported as not effective, saying
/// how each reads it. A missing main file is containerd's defaults (as
/// containerd starts without one); a missing, unreadable or unparsable import
/// is reported as making containerd refuse to start.
pub fn inspect_file(
    host_root: &Path,
    config_on_node: &str,
    certs_dir_on_node: &str,
    runtime_version: Option<&str>,
) -> Detection {
    let files = HostRoot(host_root);
    match files.read(config_on_node) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return no_config(certs_dir_on_node);
        }
        _ => {}
    }
    let rules: Vec<Rules> = match runtime_version.and_then(Rules::of_runtime_version) {
        Some(r) => vec![r],
        None => Rules::all().to_vec(),
    };
    // Loading differs only in how relative globs resolve.
    let by_rules: Vec<(Rules, Result<Loaded, String>)> = rules
        .into_iter()
        .map(|r| {
            (
                r,
                containerd_imports::load(&files, config_on_node, r.globs_from_dir),
            )
        })
        .collect();
    decide(&by_rules, certs_dir_on_node)
}

fn no_config(certs_dir: &str) -> Detection {
    Detection {
        reads_hosts: false,
        version: 0,
        config_path: None,
        legacy_mirrors: false,
        message: format!(
            "no containerd config.toml: containerd before 2.2 reads no hosts.toml; set config_path = {certs_dir:?} in the CRI registry section and restart containerd"
        ),
    }
}

fn refused(message: String) -> Detection {
    Detection {
        reads_hosts: false,
        version: 0,
        config_path: None,
        legacy_mirrors: false,
        message,
    }
}

/// The detection over the candidate releases (each with its loaded files):
/// those that refuse the configuration cannot be the running containerd;
/// the rest must agree, else the answer depends on the release.
fn decide(by_rules: &[(Rules, Result<Loaded, String>)], certs_dir: &str) -> Detection {
    let main_version = by_rules
        .iter()
        .find_map(|(_, l)| {
            l.as_ref()
                .ok()?
                .files
                .first()?
                .doc
                .get("version")?
                .as_integer()
        })
        .unwrap_or(1);
    let outcomes: Vec<(Rules, Result<Detection, String>)> = by_rules
        .iter()
        .map(|(rules, loaded)| {
            let d = loaded.as_ref().map_err(String::clone).and_then(|l| {
                let reg = containerd_merge::registry(&l.files, rules)?;
                Ok(judge(&reg, rules, main_version, &l.unmatched, certs_dir))
            });
            (*rules, d)
        })
        .collect();
    // Newest first, then the releases of the main file's dialect first.
    let mut preferred: Vec<&(Rules, Result<Detection, String>)> = outcomes.iter().rev().collect();
    preferred.sort_by_key(|(r, _)| r.whole_plugin_tables != (main_version <= 2));
    let accepted: Vec<(&Rules, &Detection)> = preferred
        .iter()
        .filter_map(|(r, d)| Some((r, d.as_ref().ok()?)))
        .collect();
    let Some((_, first)) = accepted.first() else {
        let why = preferred
            .first()
            .and_then(|(_, d)| d.as_ref().err())
            .cloned()
            .unwrap_or_default();
        return refused(format!("containerd would refuse this configuration: {why}"));
    };
    if accepted
        .iter()
        .all(|(_, d)| d.reads_hosts == first.reads_hosts)
    {
        return (*first).clone();
    }
    // Group the releases by what they make of it, in release order.
    let mut groups: Vec<(Vec<&str>, String)> = Vec::new();
    for (r, d) in outcomes
        .iter()
        .filter_map(|(r, d)| Some((r, d.as_ref().ok()?)))
    {
        let what = if d.reads_hosts {
            "reads hosts.toml".to_owned()
        } else {
            d.message.clone()
        };
        match groups.iter_mut().find(|(_, w)| *w == what) {
            Some((labels, _)) => labels.push(r.label),
            None => groups.push((vec![r.label], what)),
        }
    }
    let detail: Vec<String> = groups
        .into_iter()
        .map(|(labels, what)| format!("{}: {what}", labels.join(", ")))
        .collect();
    Detection {
        reads_hosts: false,
        message: format!(
            "whether containerd reads hosts.toml with this configuration depends on its version, which the node does not report: {}",
            detail.join("; ")
        ),
        ..(*first).clone()
    }
}

/// Whether `reg` makes containerd read hosts.toml from `certs_dir`.
fn judge(
    reg: &Registry,
    rules: &Rules,
    main_version: i64,
    unmatched: &[String],
    certs_dir: &str,
) -> Detection {
    let section_name = &reg.section;
    let want = certs_dir.trim_end_matches('/');
    let (reads_hosts, message) = match (&reg.config_path, reg.legacy_mirrors) {
        (Some(_), true) => (
            false,
            format!(
                "{section_name} sets both config_path and mirrors, which containerd rejects: remove the mirrors"
            ),
        ),
        (None, true) => (
            false,
            format!(
                "containerd uses the legacy {section_name} mirrors, so hosts.toml is ignored; replace them with config_path = {want:?} (regmirror will not edit config.toml)"
            ),
        ),
        (None, false) => {
            let why: Vec<&str> = reg
                .lost
                .iter()
                .chain(unmatched)
                .map(String::as_str)
                .collect();
            let why = if why.is_empty() {
                String::new()
            } else {
                format!(" in effect ({})", why.join("; "))
            };
            (
                false,
                format!(
                    "{section_name} has no config_path{why}, so hosts.toml is ignored: set config_path = {want:?} and restart containerd"
                ),
            )
        }
        (Some(p), false) => {
            let dirs: Vec<&str> = p.split(':').map(|d| d.trim_end_matches('/')).collect();
            if !dirs.contains(&want) {
                (
                    false,
                    format!(
                        "config_path is {p:?}, not {want:?}: set the mirror's spec.nodes.containerdConfigDir to it"
                    ),
                )
            } else if dirs.len() > 1 && !rules.whole_plugin_tables {
                let what = if reg.defaulted {
                    format!(
                        "{section_name} has no config_path, and containerd 2.2+'s default {p:?}"
                    )
                } else {
                    format!("config_path {p:?}")
                };
                (
                    false,
                    format!(
                        "{what} lists several directories, which containerd 2.x's transfer service reads as one path: set it to {want:?} alone"
                    ),
                )
            } else {
                (true, String::new())
            }
        }
    };
    Detection {
        reads_hosts,
        version: main_version.max(1),
        config_path: reg.config_path.clone().filter(|_| !reg.defaulted),
        legacy_mirrors: reg.legacy_mirrors,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = "/etc/containerd/certs.d";

    #[test]
    fn containerd_1_with_config_path_reads_hosts() {
        let d = inspect(
            Some(
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
            ),
            DIR,
        );
        assert!(d.reads_hosts, "{d:?}");
        assert_eq!(d.message, "");
    }

    #[test]
    fn containerd_2_config_version_3() {
        let ok = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d/\"\n";
        assert!(inspect(Some(ok), DIR).reads_hosts);
        let list = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n";
        let d = inspect(Some(list), DIR);
        assert!(!d.reads_hosts);
        assert!(d.message.contains("several directories"), "{}", d.message);
        // The v2 section means nothing to a version 3 config.
        let wrong = "version = 3\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        assert!(!inspect(Some(wrong), DIR).reads_hosts);
    }

    #[test]
    fn unset_legacy_and_conflicting_configs_are_explained() {
        let none = inspect(Some("version = 2\n"), DIR);
        assert!(!none.reads_hosts && none.message.contains("no config_path"));
        let legacy = inspect(
            Some(
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\nendpoint = [\"https://m\"]\n",
            ),
            DIR,
        );
        assert!(legacy.legacy_mirrors && !legacy.reads_hosts);
        assert!(legacy.message.contains("legacy"), "{}", legacy.message);
        let both = inspect(
            Some(
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\nendpoint = [\"https://m\"]\n",
            ),
            DIR,
        );
        assert!(!both.reads_hosts && both.message.contains("both"));
        let elsewhere = inspect(
            Some(
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/var/lib/certs\"\n",
            ),
            DIR,
        );
        assert!(!elsewhere.reads_hosts && elsewhere.message.contains("/var/lib/certs"));
        assert!(!inspect(None, DIR).reads_hosts);
        assert!(
            inspect(Some("version = ["), DIR)
                .message
                .contains("does not parse")
        );
    }

    /// A host root holding `files` (node path -> text).
    fn node(files: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = root.path().join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        root
    }

    const MAIN: &str = "/etc/containerd/config.toml";
    const V2_REGISTRY: &str = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";

    #[test]
    fn config_path_set_by_an_import_is_read() {
        let main = "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n";
        let root = node(&[
            (MAIN, main),
            ("/etc/containerd/conf.d/10-registry.toml", V2_REGISTRY),
        ]);
        let d = inspect_file(root.path(), MAIN, DIR, None);
        assert!(d.reads_hosts, "{d:?}");
        assert_eq!(d.config_path.as_deref(), Some(DIR));
        // The main file alone says otherwise (what the agent reported before).
        assert!(!inspect(Some(main), DIR).reads_hosts);
        // A relative path is relative to the importing file.
        let root = node(&[
            (MAIN, "version = 2\nimports = [\"conf.d/registry.toml\"]\n"),
            ("/etc/containerd/conf.d/registry.toml", V2_REGISTRY),
        ]);
        assert!(inspect_file(root.path(), MAIN, DIR, None).reads_hosts);
    }

    #[test]
    fn relative_globs_depend_on_the_release() {
        let root = node(&[
            (MAIN, "version = 2\nimports = [\"conf.d/*.toml\"]\n"),
            ("/etc/containerd/conf.d/10-registry.toml", V2_REGISTRY),
        ]);
        let at = |v| inspect_file(root.path(), MAIN, DIR, Some(v));
        assert!(at("containerd://1.7.16").reads_hosts);
        assert!(at("containerd://2.1.0").reads_hosts);
        // Before 1.6.29/1.7.16 the glob is relative to containerd's cwd.
        let old = at("containerd://1.6.20~ds1");
        assert!(
            !old.reads_hosts && old.message.contains("no config_path"),
            "{old:?}"
        );
        let unknown = inspect_file(root.path(), MAIN, DIR, None);
        assert!(!unknown.reads_hosts);
        assert!(
            unknown.message.contains("depends on its version")
                && unknown
                    .message
                    .contains("containerd 1.x before 1.6.29/1.7.16: ")
                && unknown.message.contains("containerd 1.6.29+/1.7.16+, "),
            "{}",
            unknown.message
        );
    }

    #[test]
    fn later_files_override_earlier_ones_as_the_release_merges() {
        let cni = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".cni]\nbin_dir = \"/opt/cni/bin\"\n";
        let root = node(&[
            (
                MAIN,
                "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n",
            ),
            ("/etc/containerd/conf.d/10-registry.toml", V2_REGISTRY),
            ("/etc/containerd/conf.d/20-cni.toml", cni),
        ]);
        // containerd 1.x: 20-cni.toml replaces the whole CRI table.
        let v1 = inspect_file(root.path(), MAIN, DIR, Some("containerd://1.7.20"));
        assert!(!v1.reads_hosts);
        assert!(
            v1.message
                .contains("/etc/containerd/conf.d/20-cni.toml replaces the whole [plugins.\"io.containerd.grpc.v1.cri\"] table"),
            "{}",
            v1.message
        );
        // containerd 2.x merges the tables key by key.
        let v2 = inspect_file(root.path(), MAIN, DIR, Some("containerd://2.0.4"));
        assert!(v2.reads_hosts, "{v2:?}");
        // The later of two config_paths wins.
        let root = node(&[
            (
                MAIN,
                "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n",
            ),
            ("/etc/containerd/conf.d/10-registry.toml", V2_REGISTRY),
            (
                "/etc/containerd/conf.d/20-other.toml",
                &V2_REGISTRY.replace("/etc/containerd/certs.d", "/var/certs"),
            ),
        ]);
        let d = inspect_file(root.path(), MAIN, DIR, None);
        assert_eq!(d.config_path.as_deref(), Some("/var/certs"));
        assert!(!d.reads_hosts && d.message.contains("/var/certs"));
    }

    #[test]
    fn version_1_registry_section() {
        let v1 = "[plugins.cri.registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        let root = node(&[(MAIN, v1)]);
        for runtime in [
            "containerd://1.6.20~ds1",
            "containerd://1.7.20",
            "containerd://2.3.5",
        ] {
            let d = inspect_file(root.path(), MAIN, DIR, Some(runtime));
            assert!(d.reads_hosts, "{runtime}: {d:?}");
            assert_eq!(d.version, 1);
        }
        // 2.0-2.2 migrate a version 1 file's plugin names but not its registry.
        let d = inspect_file(root.path(), MAIN, DIR, Some("containerd://2.1.3"));
        assert!(!d.reads_hosts);
        assert!(
            d.message
                .contains("[plugins.\"io.containerd.cri.v1.images\".registry]"),
            "{}",
            d.message
        );
        // In an import too.
        let root = node(&[
            (MAIN, "imports = [\"/etc/containerd/conf.d/*.toml\"]\n"),
            ("/etc/containerd/conf.d/registry.toml", v1),
        ]);
        assert!(inspect_file(root.path(), MAIN, DIR, Some("containerd://1.7.20")).reads_hosts);
    }

    #[test]
    fn version_3_in_imports_and_refusals() {
        let v3 = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        let root = node(&[
            (MAIN, "version = 3\nimports = [\"conf.d/*.toml\"]\n"),
            ("/etc/containerd/conf.d/registry.toml", v3),
        ]);
        // Only containerd 2.x takes version 3, and all of them read it.
        let d = inspect_file(root.path(), MAIN, DIR, None);
        assert!(d.reads_hosts, "{d:?}");
        assert_eq!(d.version, 3);
        let d = inspect_file(root.path(), MAIN, DIR, Some("containerd://1.7.20"));
        assert!(!d.reads_hosts && d.message.contains("refuse"), "{d:?}");
        // A missing import: containerd does not start.
        let root = node(&[(MAIN, "version = 3\nimports = [\"conf.d/gone.toml\"]\n")]);
        let d = inspect_file(root.path(), MAIN, DIR, None);
        assert!(!d.reads_hosts);
        assert!(
            d.message.starts_with("containerd would refuse this configuration: cannot read /etc/containerd/conf.d/gone.toml"),
            "{}",
            d.message
        );
        assert!(!d.message.contains(&root.path().display().to_string()));
        // Cycles end.
        let root = node(&[
            (MAIN, "version = 3\nimports = [\"b.toml\"]\n"),
            (
                "/etc/containerd/b.toml",
                &format!("imports = [\"config.toml\"]\n{}", &v3[12..]),
            ),
        ]);
        assert!(inspect_file(root.path(), MAIN, DIR, None).reads_hosts);
        // No main file: containerd's defaults.
        let d = inspect_file(root.path(), "/etc/containerd/none.toml", DIR, None);
        assert!(!d.reads_hosts && d.message.starts_with("no containerd config.toml"));
    }
}
