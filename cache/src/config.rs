//! Configuration: command-line flags, `REGMIRROR_*` environment variables and
//! an optional TOML file, in that order of precedence, over embedded defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use regmirror_registry::cache_file::{self, DurationText};
use regmirror_registry::docker_hub::{DOCKER_HUB, canonical_host};
use regmirror_registry::known::{default_url, well_known};
use url::Url;

use crate::cluster::{self, ClusterConfig, Discovery, MemberSource};
use crate::store::Limits;

#[derive(Debug, Parser)]
#[command(
    name = "regmirror-cache",
    version,
    about = "Pull-through cache for OCI registries: many upstreams, one fetch per blob, served from disk"
)]
pub struct Cli {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, env = "REGMIRROR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve the registry API on [default: 0.0.0.0:5000].
    #[arg(long, env = "REGMIRROR_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory holding cached content [default: ./data].
    #[arg(long, env = "REGMIRROR_STORAGE")]
    pub storage: Option<PathBuf>,
    /// Upstream registry as HOST=URL (or just HOST for well-known registries);
    /// repeatable. Requests naming no registry (no ns, no host prefix, as
    /// Docker's registry-mirrors send) go to docker.io when it is configured,
    /// else to the first [default: docker.io=https://registry-1.docker.io].
    #[arg(long = "upstream", env = "REGMIRROR_UPSTREAMS", value_delimiter = ',')]
    pub upstreams: Vec<UpstreamArg>,
    /// Docker config.json (or a mounted kubernetes.io/dockerconfigjson Secret) with upstream credentials.
    #[arg(long, env = "REGMIRROR_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// Serve cached tags without asking the upstream for this long (e.g. 5m) [default: 0s].
    #[arg(long, env = "REGMIRROR_TAG_TTL")]
    pub tag_ttl: Option<humantime::Duration>,
    /// Log format [default: text].
    #[arg(long, env = "REGMIRROR_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Byte budget for cached content (e.g. 50Gi); least recently used content
    /// is evicted to stay under it [default: unlimited].
    #[arg(long, env = "REGMIRROR_MAX_SIZE", value_parser = regmirror_registry::size::parse_size)]
    pub max_size: Option<u64>,
    /// Evict content not read for this long (e.g. 30d) [default: never].
    #[arg(long, env = "REGMIRROR_MAX_AGE")]
    pub max_age: Option<humantime::Duration>,
    /// This process's name in a cache cluster (unique, stable: a
    /// StatefulSet pod's name); needs `--peer` or `[cluster.discovery]`.
    #[arg(long, env = "REGMIRROR_NAME")]
    pub name: Option<String>,
    /// A cache cluster member as NAME=URL, every member including this one;
    /// repeatable. Each key is then fetched and stored by one member only.
    #[arg(long = "peer", env = "REGMIRROR_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// A cluster member's cap on its own disk (e.g. 90Gi), whatever its
    /// share of the cluster's --max-size.
    #[arg(long, env = "REGMIRROR_MEMBER_MAX_SIZE", value_parser = regmirror_registry::size::parse_size)]
    pub member_max_size: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The file's `log_format`, as the flag's.
impl From<cache_file::LogFormat> for LogFormat {
    fn from(f: cache_file::LogFormat) -> Self {
        match f {
            cache_file::LogFormat::Text => Self::Text,
            cache_file::LogFormat::Json => Self::Json,
        }
    }
}

/// `HOST=URL` or `HOST`.
#[derive(Debug, Clone)]
pub struct UpstreamArg {
    pub host: String,
    pub url: Option<String>,
}

impl FromStr for UpstreamArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, url) = match s.split_once('=') {
            Some((h, u)) => (h, Some(u.to_owned())),
            None => (s, None),
        };
        Ok(Self {
            host: host.to_owned(),
            url,
        })
    }
}

/// The configuration file's types, shared with the operator that renders it.
pub use regmirror_registry::cache_file::{FileConfig, FileTimeouts, FileUpstream};

/// The resolved configuration the cache runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub storage: PathBuf,
    /// The upstreams in configured order, none twice; requests naming none
    /// go to [`crate::route::default_upstream`] of them.
    pub upstreams: Vec<UpstreamConfig>,
    pub credentials: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub max_manifest_size: u64,
    pub log_format: LogFormat,
    pub limits: Limits,
    /// Open client connections at most.
    pub max_connections: usize,
    /// This process as a member of a cache cluster; `None`: on its own.
    pub cluster: Option<ClusterConfig>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Canonical host as image references name it, e.g. `docker.io`.
    pub host: String,
    pub url: Url,
    /// Cached tags younger than this are served without asking the upstream.
    pub tag_ttl: Duration,
    /// Hosts beyond the upstream's own site that it may redirect to or name
    /// as a token realm (`name` or `*.suffix`).
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub connect: Duration,
    /// Until the upstream's response headers arrive.
    pub response_header: Duration,
    /// Longest silence inside a response body.
    pub body_idle: Duration,
    /// How long a request waits for the upstream before serving a cached copy.
    pub stale_after: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            response_header: Duration::from_secs(20),
            body_idle: Duration::from_secs(30),
            stale_after: Duration::from_millis(900),
        }
    }
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:5000";
pub const DEFAULT_STORAGE: &str = "./data";
/// Manifests are small JSON; anything larger is refused rather than buffered.
pub const DEFAULT_MAX_MANIFEST_SIZE: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid upstream {0}")]
    Upstream(String),
    #[error("invalid storage limits: {0}")]
    Limits(String),
    #[error("invalid cluster: {0}")]
    Cluster(String),
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
}

impl UpstreamConfig {
    pub fn new(host: &str, url: Option<&str>) -> Result<Self, ConfigError> {
        let host = canonical_host(host);
        if !valid_host(&host) {
            return Err(ConfigError::Upstream(format!(
                "{host:?}: host must be a registry host name such as docker.io or registry.local:5000"
            )));
        }
        let url = url.map_or_else(|| default_url(&host), str::to_owned);
        let parsed: Url = url
            .parse()
            .map_err(|e| ConfigError::Upstream(format!("{host}={url}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https")
            || parsed.host_str().is_none()
            || parsed.query().is_some()
            || parsed.fragment().is_some()
            || !parsed.username().is_empty()
        {
            return Err(ConfigError::Upstream(format!(
                "{host}={url}: URL must be http(s)://host[:port][/path] without credentials, query or fragment"
            )));
        }
        let allowed_hosts = well_known(&host)
            .map(|k| k.allowed_hosts.iter().map(|h| h.to_string()).collect())
            .unwrap_or_default();
        Ok(Self {
            host,
            url: parsed,
            tag_ttl: Duration::ZERO,
            allowed_hosts,
        })
    }
}

impl Config {
    /// Merges flags and environment (already in `cli`) over the file over defaults.
    pub fn resolve(cli: Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        Self::resolve_with(cli, file)
    }

    /// What this cache would make of the configuration file `text` if
    /// started with `--config <file_name>` and `--name member` (the name a
    /// StatefulSet member gets from `REGMIRROR_NAME`), nothing else set and
    /// no environment read: the operator checks what it renders with this
    /// before touching a running cache (issue 18: specs the cache refuses
    /// made it crash-loop). Errors are the cache's own, naming the field.
    pub fn check_file(text: &str, file_name: &str, member: &str) -> Result<Self, ConfigError> {
        let file = parse_file(text, file_name)?;
        let cli = Cli {
            config: Some(PathBuf::from(file_name)),
            listen: None,
            storage: None,
            upstreams: Vec::new(),
            credentials: None,
            tag_ttl: None,
            log_format: None,
            max_size: None,
            max_age: None,
            name: Some(member.to_owned()),
            peers: Vec::new(),
            member_max_size: None,
        };
        Self::resolve_with(cli, file)
    }

    fn resolve_with(cli: Cli, file: FileConfig) -> Result<Self, ConfigError> {
        let config_path = cli.config.clone();
        let duration = |field: &str, d: &Option<DurationText>| {
            file_duration(config_path.as_deref(), field, d.as_ref())
        };
        let file_ttl = duration("tag_ttl", &file.tag_ttl)?;
        let default_ttl = cli.tag_ttl.map(Into::into).or(file_ttl);

        let mut upstreams = Vec::new();
        for fu in &file.upstreams {
            let mut u = UpstreamConfig::new(&fu.host, fu.url.as_deref())?;
            u.tag_ttl = duration("upstream.tag_ttl", &fu.tag_ttl)?
                .or(default_ttl)
                .unwrap_or_default();
            u.allowed_hosts.extend(fu.allowed_hosts.iter().cloned());
            upstreams.push(u);
        }
        if !cli.upstreams.is_empty() {
            // Flags define the list; file entries for the same host keep
            // their other settings.
            let mut from_flags = Vec::new();
            for arg in &cli.upstreams {
                let mut u = UpstreamConfig::new(&arg.host, arg.url.as_deref())?;
                match upstreams
                    .iter()
                    .find(|f: &&UpstreamConfig| f.host == u.host)
                {
                    Some(f) => {
                        u.tag_ttl = f.tag_ttl;
                        u.allowed_hosts = f.allowed_hosts.clone();
                    }
                    None => u.tag_ttl = default_ttl.unwrap_or_default(),
                }
                from_flags.push(u);
            }
            upstreams = from_flags;
        }
        if upstreams.is_empty() {
            let mut u = UpstreamConfig::new(DOCKER_HUB, None)?;
            u.tag_ttl = default_ttl.unwrap_or_default();
            upstreams.push(u);
        }
        for (i, u) in upstreams.iter().enumerate() {
            if upstreams[..i].iter().any(|p| p.host == u.host) {
                return Err(ConfigError::Upstream(format!(
                    "{} is configured twice",
                    u.host
                )));
            }
        }

        let dl = Limits::default();
        let limits = Limits {
            max_size: cli.max_size.or(file.max_size),
            max_age: match cli.max_age {
                Some(age) => Some(age.into()),
                None => duration("max_age", &file.max_age)?,
            },
            high_watermark: file.high_watermark.unwrap_or(dl.high_watermark),
            low_watermark: file.low_watermark.unwrap_or(dl.low_watermark),
        };
        if !(limits.low_watermark > 0.0
            && limits.low_watermark < limits.high_watermark
            && limits.high_watermark <= 1.0)
        {
            return Err(ConfigError::Limits(format!(
                "watermarks must satisfy 0 < low_watermark ({}) < high_watermark ({}) <= 1",
                limits.low_watermark, limits.high_watermark
            )));
        }
        if limits.max_size == Some(0) || limits.max_age == Some(Duration::ZERO) {
            return Err(ConfigError::Limits(
                "max_size and max_age must be greater than zero (omit them for no limit)".into(),
            ));
        }

        let mut file_cluster = file.cluster.clone();
        file_cluster.member_max_size = cli.member_max_size.or(file_cluster.member_max_size);
        let cluster = resolve_cluster(cli.name, cli.peers, file_cluster)?;

        let d = Timeouts::default();
        let t = &file.timeouts;
        Ok(Self {
            listen: cli
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            storage: cli
                .storage
                .or(file.storage)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STORAGE)),
            upstreams,
            credentials: cli.credentials.or(file.credentials),
            timeouts: Timeouts {
                connect: duration("timeouts.connect", &t.connect)?.unwrap_or(d.connect),
                response_header: duration("timeouts.response_header", &t.response_header)?
                    .unwrap_or(d.response_header),
                body_idle: duration("timeouts.body_idle", &t.body_idle)?.unwrap_or(d.body_idle),
                stale_after: duration("timeouts.stale_after", &t.stale_after)?
                    .unwrap_or(d.stale_after),
            },
            max_manifest_size: file.max_manifest_size.unwrap_or(DEFAULT_MAX_MANIFEST_SIZE),
            log_format: cli
                .log_format
                .or(file.log_format.map(Into::into))
                .unwrap_or_default(),
            limits,
            max_connections: file
                .max_connections
                .unwrap_or(crate::listen::DEFAULT_MAX_CONNECTIONS),
            cluster,
        })
    }

    pub fn upstream_hosts(&self) -> Vec<String> {
        self.upstreams.iter().map(|u| u.host.clone()).collect()
    }
}

/// The duration a file field names. Reading the file checked its durations;
/// this reports one that was not read from a file (a [`FileConfig`] built in
/// code) as the file's, naming the field.
/// The cluster this process is a member of: flags (`--name`, `--peer`)
/// over the file's `[cluster]` (`file.member_max_size` already merged with
/// its flag). Static peers and discovery exclude each other; either needs a
/// valid name, and static peers must list it; a member cap needs a cluster.
fn resolve_cluster(
    name: Option<String>,
    peers: Vec<String>,
    file: cache_file::FileCluster,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let name = name.or(file.name);
    let member_max_size = file.member_max_size;
    if member_max_size == Some(0) {
        return Err(ConfigError::Limits(
            "member_max_size must be greater than zero (omit it for no cap)".into(),
        ));
    }
    let peers = if peers.is_empty() { file.peers } else { peers };
    let source = match (peers.is_empty(), file.discovery) {
        (true, None) if member_max_size.is_some() => {
            return Err(ConfigError::Cluster(
                "member_max_size caps a cluster member's share: add --peer or [cluster.discovery], or use max_size alone".into(),
            ));
        }
        (true, None) => {
            return match name {
                None => Ok(None),
                Some(n) => Err(ConfigError::Cluster(format!(
                    "name {n:?} given without members: add --peer NAME=URL for every member, or [cluster.discovery]"
                ))),
            };
        }
        (false, Some(_)) => {
            return Err(ConfigError::Cluster(
                "static peers and [cluster.discovery] exclude each other: choose one".into(),
            ));
        }
        (false, None) => {
            MemberSource::Static(cluster::parse_peers(&peers).map_err(ConfigError::Cluster)?)
        }
        (true, Some(d)) => MemberSource::Kubernetes(Discovery {
            service: d.service,
            namespace: d.namespace,
            port_name: d.port_name,
        }),
    };
    let name = name.ok_or_else(|| {
        ConfigError::Cluster(
            "a cluster member needs its name: --name NAME (REGMIRROR_NAME, [cluster] name)".into(),
        )
    })?;
    if !cluster::valid_member_name(&name) {
        return Err(ConfigError::Cluster(format!(
            "name {name:?} must be 1-253 characters of a-z, 0-9, '-' and '.' (a pod name)"
        )));
    }
    if let MemberSource::Static(members) = &source
        && !members.iter().any(|m| m.name == name)
    {
        return Err(ConfigError::Cluster(format!(
            "--peer must list every member including this one ({name:?})"
        )));
    }
    Ok(Some(ClusterConfig {
        name,
        source,
        member_max_size,
    }))
}

fn file_duration(
    path: Option<&Path>,
    field: &str,
    d: Option<&DurationText>,
) -> Result<Option<Duration>, ConfigError> {
    d.map(|d| {
        d.to_duration().map_err(|e| ConfigError::Parse {
            path: path.map(|p| p.display().to_string()).unwrap_or_default(),
            message: format!("{field}: {e}"),
        })
    })
    .transpose()
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_file(&text, &path.display().to_string())
}

fn parse_file(text: &str, path: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["regmirror-cache"];
        argv.extend_from_slice(args);
        Config::resolve(Cli::try_parse_from(argv).unwrap())
    }

    #[test]
    fn embedded_defaults_serve_docker_hub() {
        let c = resolve(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.storage, PathBuf::from("./data"));
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].host, "docker.io");
        assert_eq!(c.upstreams[0].url.as_str(), "https://registry-1.docker.io/");
    }

    #[test]
    fn repeated_upstream_flags_keep_order() {
        let c = resolve(&[
            "--upstream",
            "docker.io=http://127.0.0.1:5999",
            "--upstream",
            "ghcr.io",
            "--upstream",
            "registry.local:5000=http://127.0.0.1:6000/",
        ])
        .unwrap();
        let hosts = c.upstream_hosts();
        assert_eq!(hosts, ["docker.io", "ghcr.io", "registry.local:5000"]);
        assert_eq!(c.upstreams[1].url.as_str(), "https://ghcr.io/");
    }

    #[test]
    fn docker_hub_takes_unnamed_requests_wherever_it_is_listed() {
        use crate::route::{UpstreamId, default_upstream};
        // Any spelling of Docker Hub is docker.io, so it is found by routing.
        let c = resolve(&[
            "--upstream",
            "ghcr.io",
            "--upstream",
            "registry-1.docker.io=http://127.0.0.1:5999",
        ])
        .unwrap();
        assert_eq!(c.upstream_hosts(), ["ghcr.io", "docker.io"]);
        assert_eq!(default_upstream(&c.upstream_hosts()), UpstreamId::at(1));
        let c = resolve(&["--upstream", "ghcr.io", "--upstream", "quay.io"]).unwrap();
        assert_eq!(default_upstream(&c.upstream_hosts()), UpstreamId::at(0));
    }

    #[test]
    fn bad_upstreams_are_explained() {
        for bad in [
            "x=ftp://h",
            "x=http://u:p@h",
            "bad/host=http://h",
            "x=http://h?q=1",
            "x=::",
        ] {
            let e = resolve(&["--upstream", bad]).unwrap_err();
            assert!(matches!(e, ConfigError::Upstream(_)), "{bad}: {e}");
        }
        let e = resolve(&["--upstream", "docker.io", "--upstream", "index.docker.io"]).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn file_values_are_overridden_by_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
listen = "127.0.0.1:7000"
storage = "/srv/cache"
tag_ttl = "1m"
[timeouts]
stale_after = "2s"
[[upstream]]
host = "docker.io"
url = "http://127.0.0.1:5999"
tag_ttl = "10m"
allowed_hosts = ["blobs.example"]
[[upstream]]
host = "quay.io"
"#,
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = resolve(&["--config", p]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(c.upstreams[0].tag_ttl, Duration::from_secs(600));
        assert_eq!(c.upstreams[1].tag_ttl, Duration::from_secs(60));
        assert!(
            c.upstreams[0]
                .allowed_hosts
                .contains(&"blobs.example".to_string())
        );
        assert_eq!(c.timeouts.stale_after, Duration::from_secs(2));

        let c = resolve(&[
            "--config",
            p,
            "--listen",
            "127.0.0.1:7001",
            "--upstream",
            "docker.io=http://127.0.0.1:1",
        ])
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7001");
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].url.as_str(), "http://127.0.0.1:1/");
        assert_eq!(
            c.upstreams[0].tag_ttl,
            Duration::from_secs(600),
            "file settings kept"
        );
    }

    #[test]
    fn bad_file_values_are_parse_errors_at_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        for (text, line) in [
            ("tag_ttl = \"soon\"\n", "line 1"),
            ("[timeouts]\nconnect = \"5 fortnights\"\n", "line 2"),
            ("max_size = \"5 parsecs\"\n", "line 1"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = resolve(&["--config", path.to_str().unwrap()]).unwrap_err();
            assert!(matches!(e, ConfigError::Parse { .. }), "{text}: {e}");
            assert!(e.to_string().contains(line), "{text}: {e}");
        }
    }

    #[test]
    fn durations_not_read_from_a_file_are_checked_too() {
        let path = Path::new("/etc/c.toml");
        let ok = file_duration(Some(path), "max_age", Some(&DurationText::new("1h30m")));
        assert_eq!(ok.unwrap(), Some(Duration::from_secs(5400)));
        assert_eq!(file_duration(Some(path), "max_age", None).unwrap(), None);
        let e = file_duration(Some(path), "max_age", Some(&DurationText::new("soon"))).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid config file /etc/c.toml: max_age: "),
            "{e}"
        );
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listn = \"x\"\n").unwrap();
        let e = resolve(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
    }

    #[test]
    fn cluster_membership_from_flags_or_file() {
        assert!(resolve(&[]).unwrap().cluster.is_none());
        let c = resolve(&[
            "--name",
            "b",
            "--peer",
            "b=http://127.0.0.1:5001",
            "--peer",
            "a=http://127.0.0.1:5000",
        ])
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(c.name, "b");
        let MemberSource::Static(m) = c.source else {
            panic!("static")
        };
        assert_eq!(m.len(), 2);
        assert_eq!(c.member_max_size, None);
        let c = resolve(&[
            "--name",
            "a",
            "--peer",
            "a=http://x:1",
            "--member-max-size",
            "2Gi",
        ])
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(c.member_max_size, Some(2 << 30));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[cluster]\nname = \"cache-1\"\n[cluster.discovery]\nservice = \"peers\"\n",
        )
        .unwrap();
        let c = resolve(&["--config", path.to_str().unwrap()])
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.name, "cache-1");
        assert!(matches!(c.source, MemberSource::Kubernetes(ref d) if d.service == "peers"));

        for (args, says) in [
            (vec!["--name", "a"], "without members"),
            (vec!["--peer", "a=http://x:1"], "needs its name"),
            (
                vec!["--name", "b", "--peer", "a=http://x:1"],
                "including this one",
            ),
            (
                vec!["--name", "B", "--peer", "B=http://x:1"],
                "name must be",
            ),
            (
                vec![
                    "--config",
                    path.to_str().unwrap(),
                    "--peer",
                    "cache-1=http://x:1",
                ],
                "exclude each other",
            ),
        ] {
            let e = resolve(&args).unwrap_err().to_string();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }
}
