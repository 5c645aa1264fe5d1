//! The cache's configuration file (`regmirror-cache --config FILE`, TOML):
//! the operator renders it into the cache's ConfigMap from these types, and
//! the cache reads it into them.
//!
//! Reading checks what the file alone can tell: unknown keys, types,
//! durations, sizes, addresses, each reported at its place in the file.
//! Everything else (URLs, host names, watermarks, defaults, merging with
//! flags) is the cache's, in `cache/src/config.rs`. Writing leaves out unset
//! fields, so a rendered file says only what its writer chose.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// The whole file. Every field is optional; the README's example lists them all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct FileConfig {
    /// Address to serve the registry API on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Directory holding cached content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<PathBuf>,
    /// A docker `config.json` with upstream credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<PathBuf>,
    /// Default for every upstream: serve cached tags without asking the
    /// upstream for this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_ttl: Option<DurationText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    #[serde(default, skip_serializing_if = "FileTimeouts::is_empty")]
    pub timeouts: FileTimeouts,
    /// Larger manifests are refused, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_manifest_size: Option<u64>,
    /// Byte budget for cached content. Read from a number of bytes or a size
    /// such as `"50Gi"` ([`crate::size::parse_size`]); written as bytes.
    #[serde(
        default,
        deserialize_with = "size_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_size: Option<u64>,
    /// Evict content not read for this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<DurationText>,
    /// Eviction starts above this fraction of `max_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_watermark: Option<f64>,
    /// And stops at this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_watermark: Option<f64>,
    /// Open client connections at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// The upstreams in order; `[[upstream]]` tables. Requests naming no
    /// upstream go to `docker.io` when it is one of them, else to the first.
    #[serde(default, rename = "upstream", skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<FileUpstream>,
    /// `[cluster]`: this process as one member of a cache cluster.
    #[serde(default, skip_serializing_if = "FileCluster::is_empty")]
    pub cluster: FileCluster,
}

/// `[cluster]`: the members of a cache cluster, each owning a share of the
/// keys (rendezvous hashing), and how this process finds them. Empty: one
/// process on its own, as without the table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    /// This member's name: unique in the cluster, stable across restarts (a
    /// StatefulSet pod's name). Ownership hashes it, so renaming a member
    /// moves its keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A static membership: every member, this one included, as `NAME=URL`
    /// (`URL` its registry API base, e.g. `http://10.0.0.7:5000`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// This member's cap on its own disk, whatever its share of the
    /// top-level `max_size` (the cluster's budget): the lower one holds.
    /// Read like `max_size`.
    #[serde(
        default,
        deserialize_with = "size_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub member_max_size: Option<u64>,
    /// A membership discovered from a Kubernetes headless Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<FileDiscovery>,
}

impl FileCluster {
    /// Whether nothing is set (the table is then left out of a written file).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// `[cluster.discovery]`: members are the ready, non-terminating endpoints
/// of a headless Service's EndpointSlices, named by their pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDiscovery {
    /// The headless Service's name.
    pub service: String,
    /// Its namespace; the pod's own (the service account's namespace file)
    /// when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The endpoint port's name whose number members serve on; the
    /// endpoint's only port when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
}

/// `[timeouts]`: how long the cache waits for an upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTimeouts {
    /// TCP/TLS connect to an upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<DurationText>,
    /// Until an upstream's response headers arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header: Option<DurationText>,
    /// Longest silence inside an upstream body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_idle: Option<DurationText>,
    /// How long a tag lookup waits for the upstream before serving the cached copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after: Option<DurationText>,
}

impl FileTimeouts {
    /// Whether no timeout is set (the table is then left out of a written file).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One `[[upstream]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    /// The registry as image references name it: `docker.io`, `registry.local:5000`.
    pub host: String,
    /// Where its API is served; [`crate::known::default_url`] when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Overrides the file's `tag_ttl` for this upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_ttl: Option<DurationText>,
    /// Hosts beyond the upstream's own site (and a well-known registry's
    /// [`crate::known::KnownRegistry::allowed_hosts`]) it may redirect to or
    /// name as a token realm: `name` or `*.suffix`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
}

/// `log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A duration as the file writes it: humantime's syntax (`900ms`, `30s`,
/// `5m`, `1h30m`, `30d`), kept as written so a rendered file says what its
/// source said.
///
/// Reading a file checks the text (a bad one fails the read with humantime's
/// message at its place in the file). [`DurationText::new`] takes a writer's
/// text unchecked: whoever reads the file checks it, as it would a
/// hand-written one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct DurationText(String);

impl DurationText {
    /// `text` as is, unchecked.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The duration the text names; humantime's error when it names none
    /// (never for a value read from a file, which was checked then).
    pub fn to_duration(&self) -> Result<Duration, humantime::DurationError> {
        humantime::parse_duration(&self.0)
    }
}

impl fmt::Display for DurationText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Self(String::deserialize(d)?);
        text.to_duration().map_err(serde::de::Error::custom)?;
        Ok(text)
    }
}

/// A size as a number of bytes or a string such as `"50Gi"`.
fn size_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(None),
        Some(Size::Bytes(n)) => Ok(Some(n)),
        Some(Size::Text(s)) => crate::size::parse_size(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_file_survives_writing_and_reading() {
        let file = FileConfig {
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            storage: Some("/srv/cache".into()),
            credentials: Some("/etc/regmirror/config.json".into()),
            tag_ttl: Some(DurationText::new("1m")),
            log_format: Some(LogFormat::Json),
            timeouts: FileTimeouts {
                connect: Some(DurationText::new("5s")),
                response_header: Some(DurationText::new("20s")),
                body_idle: Some(DurationText::new("30s")),
                stale_after: Some(DurationText::new("900ms")),
            },
            max_manifest_size: Some(4 << 20),
            max_size: Some(50 << 30),
            max_age: Some(DurationText::new("30d")),
            high_watermark: Some(0.9),
            low_watermark: Some(0.8),
            max_connections: Some(100),
            upstreams: vec![
                FileUpstream {
                    host: "docker.io".into(),
                    url: Some("https://registry-1.docker.io".into()),
                    tag_ttl: Some(DurationText::new("1h30m")),
                    allowed_hosts: vec!["*.example.com".into()],
                },
                FileUpstream {
                    host: "ghcr.io".into(),
                    url: None,
                    tag_ttl: None,
                    allowed_hosts: vec![],
                },
            ],
            cluster: FileCluster {
                name: Some("cache-0".into()),
                peers: vec!["cache-0=http://10.0.0.1:5000".into()],
                member_max_size: Some(10 << 30),
                discovery: Some(FileDiscovery {
                    service: "cache-peers".into(),
                    namespace: Some("regmirror".into()),
                    port_name: Some("registry".into()),
                }),
            },
        };
        let text = toml::to_string(&file).unwrap();
        assert_eq!(read(&text).unwrap(), file, "{text}");
        assert!(
            text.contains("tag_ttl = \"1h30m\""),
            "kept as written: {text}"
        );
    }

    #[test]
    fn unset_fields_are_left_out() {
        let file = FileConfig {
            listen: Some("0.0.0.0:5000".parse().unwrap()),
            upstreams: vec![FileUpstream {
                host: "ghcr.io".into(),
                url: None,
                tag_ttl: None,
                allowed_hosts: vec![],
            }],
            ..FileConfig::default()
        };
        assert_eq!(
            toml::to_string(&file).unwrap(),
            "listen = \"0.0.0.0:5000\"\n\n[[upstream]]\nhost = \"ghcr.io\"\n"
        );
        assert_eq!(toml::to_string(&FileConfig::default()).unwrap(), "");
    }

    #[test]
    fn sizes_read_as_bytes_or_text() {
        assert_eq!(read("max_size = 1024").unwrap().max_size, Some(1024));
        assert_eq!(read("max_size = \"2Ki\"").unwrap().max_size, Some(2048));
        let e = read("max_size = \"5 parsecs\"").unwrap_err();
        assert!(e.contains("unknown unit") && e.contains("max_size"), "{e}");
    }

    #[test]
    fn bad_values_fail_the_read_where_they_are() {
        let e = read("tag_ttl = \"soon\"").unwrap_err();
        assert!(e.contains("line 1") && e.contains("tag_ttl"), "{e}");
        let e = read("[timeouts]\nconnect = \"5 fortnights\"").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = read("listen = \"nowhere\"").unwrap_err();
        assert!(e.contains("listen"), "{e}");
        let e = read("log_format = \"xml\"").unwrap_err();
        assert!(e.contains("json"), "{e}");
        let e = read("listn = \"x\"").unwrap_err();
        assert!(e.contains("listn"), "{e}");
        let e = read("[[upstream]]\nurl = \"https://x\"").unwrap_err();
        assert!(e.contains("host"), "{e}");
    }

    #[test]
    fn duration_text_names_its_duration() {
        let d = DurationText::new("1h30m");
        assert_eq!(d.to_duration().unwrap(), Duration::from_secs(5400));
        assert_eq!(d.to_string(), "1h30m");
        assert!(DurationText::new("soon").to_duration().is_err());
    }
}
