//! Will containerd read the files we write? Read from its `config.toml`, so a
//! node that ignores hosts.toml is reported instead of silently doing nothing.
//! (Facts: shared/design/node-config.md.)

/// What a node's containerd configuration says about `hosts.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// containerd will read hosts.toml from the directory we write to.
    pub reads_hosts: bool,
    /// Config file version (1/2: containerd 1.x-2.x layout, 3: 2.x).
    pub version: i64,
    /// The CRI registry `config_path`, as configured.
    pub config_path: Option<String>,
    /// Legacy `registry.mirrors` are set.
    pub legacy_mirrors: bool,
    /// What a user should know or do, empty when all is well.
    pub message: String,
}

const V2_CRI: &[&str] = &["plugins", "io.containerd.grpc.v1.cri", "registry"];
const V3_IMAGES: &[&str] = &["plugins", "io.containerd.cri.v1.images", "registry"];

fn lookup<'a>(doc: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Table> {
    let mut t = doc;
    for p in path {
        t = t.get(*p)?.as_table()?;
    }
    Some(t)
}

/// Inspects `config` (the text of containerd's config.toml, `None` if the
/// node has none) for whether hosts.toml files in `certs_dir` (the host's
/// path, e.g. `/etc/containerd/certs.d`) take effect.
pub fn inspect(config: Option<&str>, certs_dir: &str) -> Detection {
    let Some(text) = config else {
        return Detection {
            reads_hosts: false,
            version: 0,
            config_path: None,
            legacy_mirrors: false,
            message: format!(
                "no containerd config.toml: containerd before 2.2 reads no hosts.toml; set config_path = {certs_dir:?} in the CRI registry section and restart containerd"
            ),
        };
    };
    let doc: toml::Table = match text.parse() {
        Ok(d) => d,
        Err(e) => {
            return Detection {
                reads_hosts: false,
                version: 0,
                config_path: None,
                legacy_mirrors: false,
                message: format!("containerd config.toml does not parse: {}", e.message()),
            };
        }
    };
    let version = doc.get("version").and_then(|v| v.as_integer()).unwrap_or(1);
    let section = if version >= 3 { V3_IMAGES } else { V2_CRI };
    let registry = lookup(&doc, section);
    let config_path = registry
        .and_then(|r| r.get("config_path"))
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let legacy_mirrors = registry
        .and_then(|r| r.get("mirrors"))
        .and_then(|m| m.as_table())
        .is_some_and(|m| !m.is_empty());
    let section_name = format!("[plugins.\"{}\".registry]", section[1]);
    let want = certs_dir.trim_end_matches('/');
    let (reads_hosts, message) = match (&config_path, legacy_mirrors) {
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
        (None, false) => (
            false,
            format!(
                "{section_name} has no config_path, so hosts.toml is ignored: set config_path = {want:?} and restart containerd"
            ),
        ),
        (Some(p), false) => {
            let dirs: Vec<&str> = p.split(':').map(|d| d.trim_end_matches('/')).collect();
            if !dirs.contains(&want) {
                (
                    false,
                    format!(
                        "config_path is {p:?}, not {want:?}: set the mirror's containerd config directory to it"
                    ),
                )
            } else if dirs.len() > 1 && version >= 3 {
                (
                    false,
                    format!(
                        "config_path {p:?} lists several directories, which containerd 2.x's transfer service reads as one path: set it to {want:?} alone"
                    ),
                )
            } else {
                (true, String::new())
            }
        }
    };
    Detection {
        reads_hosts,
        version,
        config_path,
        legacy_mirrors,
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
}
