//! The CRI registry settings containerd ends up with after merging its
//! configuration files, per containerd release, as containerd's own code does
//! (`LoadConfig`/`mergeConfig`/`MigrateConfig` in
//! `services/server/config/config.go` (1.x) and
//! `cmd/containerd/server/config/config.go` (2.x), `configMigration` in
//! `plugins/cri/images/plugin.go` (2.x)):
//!
//! - 1.6/1.7: a file's `[plugins.<id>]` table replaces the whole table of an
//!   earlier file; the last file with a `version` sets it; version 1 keys the
//!   CRI plugin as `cri`, version 2 as `io.containerd.grpc.v1.cri`; version 3
//!   or a short plugin key in a version 2 config makes containerd refuse.
//! - 2.x: plugin tables merge key by key (tables recursively, values and
//!   lists replaced). Files of version 0/1 get plugin names migrated (`cri` ->
//!   `io.containerd.grpc.v1.cri`). The registry moves from
//!   `io.containerd.grpc.v1.cri` to `io.containerd.cri.v1.images` (replacing
//!   it whole) when the config is migrated: in 2.0-2.2 once after merging,
//!   only if the merged version is below 3 (so a version 1 main file, brought
//!   to version 3 before the merge, keeps its registry where 2.x never reads
//!   it); in 2.3+ for each file of version below 4 before merging. 2.3.0-2.3.4
//!   refuse an import whose version is above the main file's.

use toml::{Table, Value};

use crate::containerd_imports::ConfigFile;

const CRI_V1: &str = "cri";
const CRI_V2: &str = "io.containerd.grpc.v1.cri";
const IMAGES_V3: &str = "io.containerd.cri.v1.images";
/// containerd 2.2+'s `config_path` when neither it nor `mirrors` is set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/containerd/certs.d:/etc/docker/certs.d";

/// How one containerd release reads its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Who this is, for messages ("containerd 1.7.16+").
    pub label: &'static str,
    /// 1.x: a later file's plugin table replaces the earlier one whole.
    pub whole_plugin_tables: bool,
    /// Highest config `version` accepted (1.x: 2, 2.0-2.2: 3, 2.3+: 4).
    pub max_version: i64,
    /// 2.3+: each file is migrated before merging (else after, 2.0-2.2).
    pub migrate_each_file: bool,
    /// Relative glob imports are joined to the importing file's directory
    /// (1.6.29+, 1.7.16+, 2.x), not to containerd's working directory.
    pub globs_from_dir: bool,
    /// 2.2+: empty `config_path` without `mirrors` means
    /// [`DEFAULT_CONFIG_PATH`].
    pub default_config_path: bool,
    /// 2.3.0-2.3.4: an import of a higher version than the main file is refused.
    pub refuse_newer_imports: bool,
}

const V1_OLD: Rules = Rules {
    label: "containerd 1.x before 1.6.29/1.7.16",
    whole_plugin_tables: true,
    max_version: 2,
    migrate_each_file: false,
    globs_from_dir: false,
    default_config_path: false,
    refuse_newer_imports: false,
};
const V1: Rules = Rules {
    label: "containerd 1.6.29+/1.7.16+",
    globs_from_dir: true,
    ..V1_OLD
};
const V2_0: Rules = Rules {
    label: "containerd 2.0-2.1",
    whole_plugin_tables: false,
    max_version: 3,
    ..V1
};
const V2_2: Rules = Rules {
    label: "containerd 2.2",
    default_config_path: true,
    ..V2_0
};
const V2_3_EARLY: Rules = Rules {
    label: "containerd 2.3.0-2.3.4",
    max_version: 4,
    migrate_each_file: true,
    refuse_newer_imports: true,
    ..V2_2
};
const V2_3: Rules = Rules {
    label: "containerd 2.3.5+",
    refuse_newer_imports: false,
    ..V2_3_EARLY
};

impl Rules {
    /// The rules of the containerd a Node reports in
    /// `status.nodeInfo.containerRuntimeVersion` (`containerd://1.7.12`,
    /// `containerd://1.6.20~ds1`, `containerd://v2.0.0-k3s1`); `None` for
    /// another runtime or an unreadable version.
    pub fn of_runtime_version(runtime_version: &str) -> Option<Self> {
        let v = runtime_version
            .strip_prefix("containerd://")?
            .trim_start_matches('v');
        let mut nums = v
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().ok());
        let major = nums.next()??;
        let minor = nums.next()??;
        let patch = nums.next().flatten().unwrap_or(0);
        Some(match (major, minor) {
            (0, _) => return None,
            (1, 6) if patch >= 29 => V1,
            (1, 7) if patch >= 16 => V1,
            (1, m) if m > 7 => V1,
            (1, _) => V1_OLD,
            (2, 0 | 1) => V2_0,
            (2, 2) => V2_2,
            (2, 3) if patch <= 4 => V2_3_EARLY,
            _ => V2_3,
        })
    }

    /// The releases a node may run when its version is unknown, oldest first.
    pub fn all() -> [Self; 6] {
        [V1_OLD, V1, V2_0, V2_2, V2_3_EARLY, V2_3]
    }
}

/// The merged CRI registry settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// The merged config's version (containerd's `Config.Version`).
    pub version: i64,
    /// `config_path`, empty treated as unset, after 2.2's default.
    pub config_path: Option<String>,
    /// Whether `config_path` is 2.2's default rather than configured.
    pub defaulted: bool,
    /// Legacy `mirrors` are set.
    pub legacy_mirrors: bool,
    /// The table to tell a user to edit, in the dialect of the main file.
    pub section: String,
    /// Why a `config_path` written in the files is not what containerd uses
    /// (`None` when nothing was lost).
    pub lost: Option<String>,
}

fn version_of(f: &ConfigFile) -> Result<i64, String> {
    match f.doc.get("version") {
        None => Ok(0),
        Some(v) => v
            .as_integer()
            .ok_or_else(|| format!("{}: version is not a number", f.path)),
    }
}

fn plugins_of(f: &ConfigFile) -> Result<Table, String> {
    match f.doc.get("plugins") {
        None => Ok(Table::new()),
        Some(Value::Table(t)) => Ok(t.clone()),
        Some(_) => Err(format!("{}: plugins is not a table", f.path)),
    }
}

fn registry_in<'a>(plugins: &'a Table, key: &str) -> Option<&'a Table> {
    plugins.get(key)?.as_table()?.get("registry")?.as_table()
}

fn config_path_in(plugins: &Table, key: &str) -> Option<String> {
    registry_in(plugins, key)?
        .get("config_path")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn section_name(key: &str) -> String {
    if key.contains('.') {
        format!("[plugins.\"{key}\".registry]")
    } else {
        format!("[plugins.{key}.registry]")
    }
}

/// containerd 2.x `v1MigratePluginName` for the names that matter here.
fn v1_migrate(plugins: Table) -> Table {
    plugins
        .into_iter()
        .map(|(k, v)| {
            if k == CRI_V1 {
                (CRI_V2.to_owned(), v)
            } else {
                (k, v)
            }
        })
        .collect()
}

/// The CRI images plugin's `configMigration`: the v2 registry replaces the
/// images plugin's registry.
fn migrate_registry(plugins: &mut Table) {
    let Some(registry) = plugins
        .get(CRI_V2)
        .and_then(Value::as_table)
        .and_then(|t| t.get("registry"))
        .cloned()
    else {
        return;
    };
    let images = plugins
        .entry(IMAGES_V3)
        .or_insert_with(|| Value::Table(Table::new()));
    if let Value::Table(t) = images {
        t.insert("registry".to_owned(), registry);
    }
}

/// mergo's `Merge(WithOverride)` on `map[string]any`: tables merge key by
/// key, anything else is replaced.
fn deep_merge(to: &mut Table, from: Table) {
    for (k, v) in from {
        match (to.get_mut(&k), v) {
            (Some(Value::Table(dst)), Value::Table(src)) => deep_merge(dst, src),
            (_, v) => {
                to.insert(k, v);
            }
        }
    }
}

/// Merges `files` (in load order, the main file first) as `rules`' containerd
/// does and returns its CRI registry settings. Errors: why that containerd
/// refuses the configuration.
pub fn registry(files: &[ConfigFile], rules: &Rules) -> Result<Registry, String> {
    let main_version = files.first().map(version_of).transpose()?.unwrap_or(0);
    let (version, plugins, lost) = if rules.whole_plugin_tables {
        merge_1x(files)?
    } else {
        merge_2x(files, rules)?
    };
    if version > rules.max_version {
        return Err(format!(
            "config version {version} is above {}, the highest {} accepts",
            rules.max_version, rules.label
        ));
    }
    let key = if rules.whole_plugin_tables {
        if version <= 1 {
            CRI_V1
        } else {
            if let Some(bad) = plugins
                .keys()
                .find(|p| !p.starts_with("io.containerd.") || p.splitn(4, '.').count() < 4)
            {
                return Err(format!(
                    "plugin key {bad:?} is not a plugin URI, which {} refuses in a version 2 config",
                    rules.label
                ));
            }
            CRI_V2
        }
    } else {
        IMAGES_V3
    };
    let table = registry_in(&plugins, key);
    let legacy_mirrors = table
        .and_then(|r| r.get("mirrors"))
        .and_then(Value::as_table)
        .is_some_and(|m| !m.is_empty());
    let mut config_path = config_path_in(&plugins, key);
    let defaulted = rules.default_config_path && config_path.is_none() && !legacy_mirrors;
    if defaulted {
        config_path = Some(DEFAULT_CONFIG_PATH.to_owned());
    }
    // Where a user should set config_path: the main file's own dialect where
    // this release reads (or migrates) it, else the version 3 table.
    let section = match main_version {
        _ if rules.whole_plugin_tables => section_name(key),
        0 | 1 if rules.migrate_each_file => section_name(CRI_V1),
        2 => section_name(CRI_V2),
        _ => section_name(IMAGES_V3),
    };
    let lost = lost.or_else(|| {
        // A config_path in a table this release does not read.
        let unread = [CRI_V1, CRI_V2, IMAGES_V3]
            .into_iter()
            .find(|k| *k != key && config_path_in(&plugins, k).is_some())?;
        let unread = if unread == CRI_V2 && main_version <= 1 && !rules.whole_plugin_tables {
            // Renamed from the version 1 table, whose registry 2.0-2.2 do not move.
            format!(
                "{} (from a version 1 config, whose registry {} does not migrate)",
                section_name(CRI_V1),
                rules.label
            )
        } else {
            section_name(unread)
        };
        (config_path_in(&plugins, key).is_none()).then(|| {
            format!(
                "{} reads {}, not the config_path in {unread}",
                rules.label,
                section_name(key),
            )
        })
    });
    Ok(Registry {
        version,
        config_path,
        defaulted,
        legacy_mirrors,
        section,
        lost,
    })
}

/// The merged version, plugin tables, and why a config_path was lost.
type Merged = (i64, Table, Option<String>);

fn merge_1x(files: &[ConfigFile]) -> Result<Merged, String> {
    // defaultConfig() is version 1; mergo overrides it with a non-zero one.
    let mut version = 1;
    let mut plugins = Table::new();
    // The file whose config_path the last whole-table replacement dropped.
    let mut lost = None;
    for f in files {
        let v = version_of(f)?;
        if v != 0 {
            version = v;
        }
        for (k, val) in plugins_of(f)? {
            let had = config_path_in(&plugins, &k).map(|_| f.path.clone());
            plugins.insert(k.clone(), val);
            if config_path_in(&plugins, &k).is_none() {
                if let Some(by) = had {
                    lost = Some((k, by));
                }
            } else if lost.as_ref().is_some_and(|(l, _)| *l == k) {
                lost = None;
            }
        }
    }
    let lost = lost.map(|(k, by)| {
        format!(
            "{by} replaces the whole [plugins.{}] table, dropping the config_path set before it: containerd 1.x does not merge plugin tables across imports, so put config_path in the last file that sets this table",
            if k.contains('.') { format!("{k:?}") } else { k }
        )
    });
    Ok((version, plugins, lost))
}

fn merge_2x(files: &[ConfigFile], rules: &Rules) -> Result<Merged, String> {
    // defaultConfig() has the release's newest version.
    let newest = rules.max_version;
    let mut version = newest;
    let mut plugins = Table::new();
    let mut root_version = 0;
    for f in files {
        let v = version_of(f)?;
        if root_version == 0 {
            root_version = v;
        }
        if rules.refuse_newer_imports && v > root_version {
            return Err(format!(
                "{}: drop-in config version {v} higher than root config version {root_version}, which {} refuses",
                f.path, rules.label
            ));
        }
        let mut p = plugins_of(f)?;
        let mut v_after = v;
        if rules.migrate_each_file {
            if v < version {
                if v <= 1 {
                    p = v1_migrate(p);
                }
                // The images plugin migrates every version below the newest.
                migrate_registry(&mut p);
                v_after = version;
            }
        } else if v <= 1 {
            p = v1_migrate(p);
            v_after = version;
        }
        deep_merge(&mut plugins, p);
        if v_after != 0 {
            version = v_after;
        }
    }
    if !rules.migrate_each_file && version < newest {
        migrate_registry(&mut plugins);
    }
    Ok((version, plugins, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(texts: &[&str]) -> Vec<ConfigFile> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| ConfigFile {
                path: format!("/etc/containerd/{i}.toml"),
                doc: t.parse().unwrap(),
            })
            .collect()
    }

    fn path_for(texts: &[&str], rules: Rules) -> Option<String> {
        registry(&files(texts), &rules).unwrap().config_path
    }

    const V2_REG: &str =
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/a\"\n";
    const V2_CNI: &str =
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".cni]\nbin_dir = \"/b\"\n";
    const V1_REG: &str = "[plugins.cri.registry]\nconfig_path = \"/a\"\n";
    const V3_REG: &str =
        "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/a\"\n";

    #[test]
    fn runtime_versions_pick_the_rules() {
        let of = |s| Rules::of_runtime_version(s);
        assert_eq!(of("containerd://1.6.20~ds1"), Some(V1_OLD));
        assert_eq!(of("containerd://1.6.29"), Some(V1));
        assert_eq!(of("containerd://1.7.15"), Some(V1_OLD));
        assert_eq!(of("containerd://1.7.23-k3s2"), Some(V1));
        assert_eq!(of("containerd://v2.0.0-k3s1"), Some(V2_0));
        assert_eq!(of("containerd://2.2.1"), Some(V2_2));
        assert_eq!(of("containerd://2.3.4"), Some(V2_3_EARLY));
        assert_eq!(of("containerd://2.3.5"), Some(V2_3));
        assert_eq!(of("containerd://3.0.0"), Some(V2_3));
        assert_eq!(of("cri-o://1.30.0"), None);
        assert_eq!(of("containerd://"), None);
    }

    #[test]
    fn containerd_1_replaces_plugin_tables_whole() {
        // The registry set first is dropped by a later CRI table...
        let r = registry(&files(&[V2_REG, V2_CNI]), &V1).unwrap();
        assert_eq!(r.config_path, None);
        assert!(
            r.lost
                .unwrap()
                .contains("/etc/containerd/1.toml replaces the whole")
        );
        // ...and kept when it comes last.
        assert_eq!(path_for(&[V2_CNI, V2_REG], V1).as_deref(), Some("/a"));
        // containerd 2.x merges the tables.
        assert_eq!(path_for(&[V2_REG, V2_CNI], V2_0).as_deref(), Some("/a"));
        assert_eq!(path_for(&[V2_REG, V2_CNI], V2_3).as_deref(), Some("/a"));
        // Later values win in both.
        let b = V2_REG.replace("/a", "/b");
        assert_eq!(path_for(&[V2_REG, &b], V1).as_deref(), Some("/b"));
        assert_eq!(path_for(&[V2_REG, &b], V2_3).as_deref(), Some("/b"));
        assert_eq!(path_for(&[&b, V2_REG], V2_0).as_deref(), Some("/a"));
    }

    #[test]
    fn version_1_configs_per_release() {
        for rules in [V1_OLD, V1, V2_3_EARLY, V2_3] {
            assert_eq!(
                path_for(&[V1_REG], rules).as_deref(),
                Some("/a"),
                "{}",
                rules.label
            );
        }
        // 2.0-2.2 migrate a version 1 file to version 3 before merging, so the
        // registry never moves to the images plugin.
        let r = registry(&files(&[V1_REG]), &V2_0).unwrap();
        assert_eq!(r.config_path, None);
        assert!(
            r.lost.unwrap().contains(
                "not the config_path in [plugins.cri.registry] (from a version 1 config, whose registry containerd 2.0-2.1 does not migrate)"
            )
        );
        assert!(registry(&files(&[V1_REG]), &V2_2).unwrap().defaulted);
        // A version 2 main file importing a version 1 drop-in: 2.0 migrates the
        // merged version 2 config.
        assert_eq!(
            path_for(&["version = 2", V1_REG], V2_0).as_deref(),
            Some("/a")
        );
        // 1.x: the version 1 key means nothing in a version 2 config (refused).
        let e = registry(&files(&["version = 2", V1_REG]), &V1).unwrap_err();
        assert!(e.contains("\"cri\""), "{e}");
        // The section to name follows the main file's dialect.
        assert_eq!(
            registry(&files(&[V1_REG]), &V1).unwrap().section,
            "[plugins.cri.registry]"
        );
    }

    #[test]
    fn version_2_and_3_per_release() {
        assert_eq!(path_for(&[V2_REG], V1).as_deref(), Some("/a"));
        assert_eq!(path_for(&[V2_REG], V2_0).as_deref(), Some("/a"));
        assert_eq!(path_for(&[V2_REG], V2_3).as_deref(), Some("/a"));
        assert!(
            registry(&files(&[V3_REG]), &V1)
                .unwrap_err()
                .contains("above 2")
        );
        assert_eq!(path_for(&[V3_REG], V2_0).as_deref(), Some("/a"));
        assert_eq!(path_for(&[V3_REG], V2_3).as_deref(), Some("/a"));
        // A v2 table in a version 3 file: ignored by 2.0-2.2, migrated by 2.3+
        // (its images plugin migrates every version below 4).
        let v3_with_v2 = V2_REG.replace("version = 2", "version = 3");
        assert_eq!(path_for(&[&v3_with_v2], V2_0), None);
        assert_eq!(path_for(&[&v3_with_v2], V2_3).as_deref(), Some("/a"));
        // Mixed versions: a v3 main with a v2 drop-in.
        assert_eq!(path_for(&[V3_REG, V2_CNI], V2_0).as_deref(), Some("/a"));
        assert_eq!(
            path_for(&["version = 3", V2_REG], V2_0).as_deref(),
            Some("/a")
        );
        assert_eq!(
            path_for(&["version = 3", V2_REG], V2_3).as_deref(),
            Some("/a")
        );
        // 2.3.0-2.3.4 refuse a drop-in newer than the main file.
        let e = registry(&files(&["version = 2", V3_REG]), &V2_3_EARLY).unwrap_err();
        assert!(
            e.contains("drop-in config version 3 higher than root config version 2"),
            "{e}"
        );
        assert_eq!(
            path_for(&["version = 2", V3_REG], V2_3).as_deref(),
            Some("/a")
        );
    }

    #[test]
    fn mirrors_and_defaults() {
        let mirrors = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\nendpoint = [\"https://m\"]\n";
        let r = registry(&files(&[mirrors]), &V2_2).unwrap();
        assert!(r.legacy_mirrors && r.config_path.is_none() && !r.defaulted);
        let r = registry(&files(&["version = 3"]), &V2_2).unwrap();
        assert_eq!(r.config_path.as_deref(), Some(DEFAULT_CONFIG_PATH));
        assert!(r.defaulted);
        assert_eq!(path_for(&["version = 3"], V2_0), None);
    }
}
