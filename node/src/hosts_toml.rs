//! Rendering containerd `hosts.toml` for one registry host.
//!
//! The cache goes first, as `[host]` tables limited to pull and resolve
//! (omitted capabilities would include push), one per address the cache is
//! reached at, tried in order; the real upstream is `server`, the fallback
//! containerd uses when every cache address is down or answers >= 400
//! (containerd's `docs/hosts.md`: hosts are tried in file order, then `server`).

use std::time::Duration;

/// First line of every file we write; what we may overwrite or remove.
pub const MARKER: &str = "# managed-by: regmirror";

/// One registry host's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsToml {
    /// Registry as image references name it: `docker.io`, `registry.local:5000`.
    pub registry: String,
    /// The upstream itself: `https://registry-1.docker.io`.
    pub server: String,
    /// The cache as this node reaches it, in the order containerd should try:
    /// `["http://10.0.0.5:30500"]` (a NodePort), or one URL per node a
    /// host-network cache member runs on. Never empty.
    pub mirrors: Vec<String>,
    /// How long containerd (2.1+) waits to connect to the cache before falling back.
    pub dial_timeout: Duration,
    /// The `RegistryMirror` that owns the file.
    pub owner: String,
}

/// The owner named in a file's marker line, if we wrote it.
pub fn owner_of(text: &str) -> Option<&str> {
    let first = text.lines().next()?;
    let rest = first.strip_prefix(MARKER)?;
    rest.trim()
        .strip_prefix("mirror=")
        .map(str::trim)
        .filter(|o| !o.is_empty())
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The file's text. `user_hosts` are `[host]` tables kept from a file the user
/// wrote (merge mode), tried after the cache.
pub fn render(h: &HostsToml, user_hosts: &[(String, toml::Table)]) -> String {
    let mut out = format!(
        "{MARKER} mirror={owner}\n\
         # Written by the regmirror node agent; edits are overwritten. Delete the\n\
         # RegistryMirror {owner:?} to remove this file.\n\
         server = {server}\n",
        owner = h.owner,
        server = quote(&h.server),
    );
    for mirror in &h.mirrors {
        out.push_str(&format!(
            "\n[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = {}\n",
            quote(mirror),
            quote(&duration(h.dial_timeout)),
        ));
    }
    for (url, table) in user_hosts {
        if h.mirrors.contains(url) {
            continue;
        }
        out.push_str(&format!("\n[host.{}]\n", quote(url)));
        for (k, v) in table {
            out.push_str(&format!("  {} = {}\n", key(k), v));
        }
    }
    out
}

fn key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        k.to_owned()
    } else {
        quote(k)
    }
}

/// `[host."<url>"]` tables in file order.
pub type HostTables = Vec<(String, toml::Table)>;

/// A user's file, parsed: its `server` and its `[host]` tables in order.
pub fn parse_user(text: &str) -> Result<(Option<String>, HostTables), String> {
    let doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_owned())?;
    let server = doc
        .get("server")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let mut hosts = Vec::new();
    if let Some(t) = doc.get("host").and_then(|v| v.as_table()) {
        for (url, v) in t {
            let table = v
                .as_table()
                .ok_or_else(|| format!("[host.{url:?}] is not a table"))?;
            hosts.push((url.clone(), table.clone()));
        }
    }
    Ok((server, hosts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> HostsToml {
        HostsToml {
            registry: "docker.io".into(),
            server: "https://registry-1.docker.io".into(),
            mirrors: vec!["http://10.0.0.5:30500".into()],
            dial_timeout: Duration::from_millis(1500),
            owner: "hub".into(),
        }
    }

    #[test]
    fn renders_the_cache_first_then_the_upstream_as_server() {
        let text = render(&hub(), &[]);
        assert_eq!(
            text,
            "# managed-by: regmirror mirror=hub\n\
             # Written by the regmirror node agent; edits are overwritten. Delete the\n\
             # RegistryMirror \"hub\" to remove this file.\n\
             server = \"https://registry-1.docker.io\"\n\n\
             [host.\"http://10.0.0.5:30500\"]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = \"1500ms\"\n"
        );
        // It is valid TOML with the shape containerd reads.
        let doc: toml::Table = text.parse().unwrap();
        assert_eq!(doc["server"].as_str(), Some("https://registry-1.docker.io"));
        let host = doc["host"]["http://10.0.0.5:30500"].as_table().unwrap();
        assert_eq!(host["capabilities"].as_array().unwrap().len(), 2);
        assert_eq!(owner_of(&text), Some("hub"));
    }

    #[test]
    fn several_cache_addresses_are_tried_in_order_before_the_server() {
        let h = HostsToml {
            mirrors: vec!["http://10.0.0.7:5000".into(), "http://10.0.0.5:5000".into()],
            ..hub()
        };
        let user = "[host.\"http://10.0.0.5:5000\"]\n  capabilities = [\"pull\"]\n\
                    [host.\"https://mine.example\"]\n  capabilities = [\"pull\"]\n";
        let text = render(&h, &parse_user(user).unwrap().1);
        let doc: toml::Table = text.parse().unwrap();
        assert_eq!(doc["host"].as_table().unwrap().len(), 3, "{text}");
        let seven = text.find("10.0.0.7").unwrap();
        let five = text.find("10.0.0.5").unwrap();
        let mine = text.find("mine.example").unwrap();
        assert!(seven < five && five < mine, "{text}");
        assert_eq!(
            doc["host"]["http://10.0.0.5:5000"]["capabilities"]
                .as_array()
                .unwrap()
                .len(),
            2,
            "a user's table for a cache address is replaced by ours: {text}"
        );
    }

    #[test]
    fn markers_are_recognised_only_on_the_first_line() {
        assert_eq!(
            owner_of("server = \"x\"\n# managed-by: regmirror mirror=a"),
            None
        );
        assert_eq!(owner_of("# managed-by: regmirror"), None);
        assert_eq!(owner_of("# managed-by: regmirror mirror=b\n"), Some("b"));
    }

    #[test]
    fn merge_keeps_the_users_hosts_after_the_cache_in_their_order() {
        let user = "server = \"https://mine.example\"\n\
                    [host.\"https://z-mirror.example\"]\n  capabilities = [\"pull\"]\n  skip_verify = true\n\
                    [host.\"https://a-mirror.example\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"/etc/certs/ca.pem\"\n";
        let (server, hosts) = parse_user(user).unwrap();
        assert_eq!(server.as_deref(), Some("https://mine.example"));
        let text = render(&hub(), &hosts);
        let z = text.find("z-mirror").unwrap();
        let a = text.find("a-mirror").unwrap();
        let ours = text.find("10.0.0.5").unwrap();
        assert!(ours < z && z < a, "{text}");
        let doc: toml::Table = text.parse().unwrap();
        assert_eq!(
            doc["host"]["https://a-mirror.example"]["ca"].as_str(),
            Some("/etc/certs/ca.pem")
        );
        assert_eq!(
            doc["host"]["https://z-mirror.example"]["skip_verify"].as_bool(),
            Some(true)
        );
        assert!(parse_user("server = [").is_err());
    }
}
