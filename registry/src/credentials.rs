//! How credentials name a registry. The cache reads a docker `config.json`;
//! the operator builds that file from `kubernetes.io/dockerconfigjson` Secrets,
//! keyed so that the cache finds each upstream's entry.

use crate::docker_hub::canonical_host;

/// The data key of a `kubernetes.io/dockerconfigjson` Secret, holding a docker
/// `config.json` (Kubernetes' `corev1.DockerConfigJsonKey`).
pub const DOCKERCONFIGJSON: &str = ".dockerconfigjson";

/// The canonical registry host an `auths` key of a docker `config.json` names:
/// the Docker CLI writes URLs (`https://index.docker.io/v1/`), `docker login`
/// for other registries and most tools write bare hosts (`ghcr.io`,
/// `registry.local:5000`). Scheme and path are dropped, then the host is
/// canonical ([`canonical_host`]): `https://index.docker.io/v1/` ->
/// `docker.io`. A canonical host is its own key, so a file keyed by upstream
/// hosts is found under them.
pub fn registry_key(key: &str) -> String {
    let no_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = no_scheme.split('/').next().unwrap_or(no_scheme);
    canonical_host(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_aliases_name_their_host() {
        assert_eq!(registry_key("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(registry_key("http://registry-1.docker.io"), "docker.io");
        assert_eq!(registry_key("registry.hub.docker.com"), "docker.io");
        assert_eq!(registry_key("https://ghcr.io"), "ghcr.io");
        assert_eq!(
            registry_key("https://Registry.Local:5000/v2/"),
            "registry.local:5000"
        );
    }

    #[test]
    fn canonical_hosts_are_their_own_key() {
        for host in [
            "docker.io",
            "ghcr.io",
            "registry.local:5000",
            "10.0.0.5:5000",
        ] {
            assert_eq!(registry_key(host), host);
        }
    }
}
