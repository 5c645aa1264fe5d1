//! Docker Hub's names. One registry answers to several host names; image
//! references, containerd's `certs.d` lookup, the cache's routing and its
//! credentials all use [`DOCKER_HUB`], so every other spelling is normalised
//! to it.

/// The name image references give Docker Hub (`alpine` is
/// `docker.io/library/alpine`), and the directory containerd looks up in
/// `certs.d` for it.
pub const DOCKER_HUB: &str = "docker.io";

/// Other spellings of [`DOCKER_HUB`]:
/// - `index.docker.io`: Docker's legacy default domain, which its reference
///   parser rewrites to `docker.io` (distribution/reference `normalize.go`),
///   and under which the Docker CLI stores credentials
///   (`https://index.docker.io/v1/` in `config.json`);
/// - `registry-1.docker.io`: where the registry API is served (containerd's
///   resolver sends `docker.io` there);
/// - `registry.hub.docker.com`: an older name of the same API.
pub const ALIASES: [&str; 3] = [
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
];

/// Whether `host` is one of [`ALIASES`] (ASCII case ignored); `docker.io`
/// itself is not an alias.
pub fn is_alias(host: &str) -> bool {
    ALIASES.iter().any(|a| a.eq_ignore_ascii_case(host))
}

/// The canonical form of a registry host as image references name it:
/// trimmed, lowercase, and [`DOCKER_HUB`] for any of its [`ALIASES`].
/// `Index.Docker.IO` -> `docker.io`; `ghcr.io` -> `ghcr.io`;
/// `registry.local:5000` keeps its port.
pub fn canonical_host(host: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    if is_alias(&h) {
        DOCKER_HUB.to_owned()
    } else {
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_become_docker_io() {
        for alias in ALIASES {
            assert!(is_alias(alias));
            assert_eq!(canonical_host(alias), "docker.io");
        }
        assert_eq!(canonical_host(" Index.Docker.IO "), "docker.io");
        assert!(!is_alias("docker.io"));
        assert_eq!(canonical_host("docker.io"), "docker.io");
    }

    #[test]
    fn other_hosts_are_only_lowercased() {
        assert_eq!(canonical_host("GHCR.io"), "ghcr.io");
        assert_eq!(canonical_host("registry.local:5000"), "registry.local:5000");
        assert_eq!(canonical_host("auth.docker.io"), "auth.docker.io");
        assert!(!is_alias("docker.io.evil.com"));
    }
}
