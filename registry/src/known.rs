//! Well-known registries: the API endpoint behind the host people write, and
//! the hosts they send clients to for blobs and tokens.
//!
//! The cache uses both (its default upstream URL, and the hosts it may follow
//! a redirect or a token realm to); the operator uses the URL (the cache's
//! upstream, and the `server` nodes fall back to when the cache is down).

/// One well-known registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownRegistry {
    /// The host image references name, canonical (see
    /// [`crate::docker_hub::canonical_host`]): `docker.io`, `ghcr.io`.
    pub host: &'static str,
    /// Where its registry API is served, without a trailing slash.
    pub url: &'static str,
    /// Hosts beyond its own site that its blob redirects and token realms
    /// point to: `name` (exactly) or `*.suffix` (any subdomain of `suffix`,
    /// not `suffix` itself). The cache follows redirects and realms only to
    /// the upstream's own site and these, and never sends credentials here.
    pub allowed_hosts: &'static [&'static str],
}

/// The registries whose URL and redirect hosts need not be configured.
/// Hosts are what their blob redirects and token realms use: Docker Hub's CDN
/// (`production.cloudflare.docker.com`), ghcr.io's blob host, quay.io's and
/// public.ecr.aws' CloudFront and S3, registry.k8s.io's Artifact Registry
/// (`*.pkg.dev`) and S3 mirrors, gcr.io's Cloud Storage, mcr's data hosts.
pub const KNOWN_REGISTRIES: [KnownRegistry; 7] = [
    KnownRegistry {
        host: "docker.io",
        url: "https://registry-1.docker.io",
        allowed_hosts: &["*.docker.com", "*.docker.io"],
    },
    KnownRegistry {
        host: "ghcr.io",
        url: "https://ghcr.io",
        allowed_hosts: &["pkg-containers.githubusercontent.com"],
    },
    KnownRegistry {
        host: "quay.io",
        url: "https://quay.io",
        allowed_hosts: &["*.quay.io", "*.cloudfront.net", "*.amazonaws.com"],
    },
    KnownRegistry {
        host: "registry.k8s.io",
        url: "https://registry.k8s.io",
        allowed_hosts: &["*.pkg.dev", "*.amazonaws.com"],
    },
    KnownRegistry {
        host: "gcr.io",
        url: "https://gcr.io",
        allowed_hosts: &["*.gcr.io", "storage.googleapis.com"],
    },
    KnownRegistry {
        host: "mcr.microsoft.com",
        url: "https://mcr.microsoft.com",
        allowed_hosts: &["*.microsoft.com"],
    },
    KnownRegistry {
        host: "public.ecr.aws",
        url: "https://public.ecr.aws",
        allowed_hosts: &["*.amazonaws.com", "*.cloudfront.net"],
    },
];

/// The well-known registry named `host` (canonical: `docker.io`, not an
/// alias), if it is one.
pub fn well_known(host: &str) -> Option<&'static KnownRegistry> {
    KNOWN_REGISTRIES.iter().find(|k| k.host == host)
}

/// The URL an upstream named `host` (canonical) is fetched from when its
/// configuration names none: a well-known registry's API endpoint, otherwise
/// `https://<host>` (OCI registries serve `/v2/` at their own name). No
/// trailing slash.
pub fn default_url(host: &str) -> String {
    match well_known(host) {
        Some(k) => k.url.to_owned(),
        None => format!("https://{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker_hub::{DOCKER_HUB, canonical_host};

    #[test]
    fn docker_hub_is_served_elsewhere_and_others_by_themselves() {
        assert_eq!(default_url(DOCKER_HUB), "https://registry-1.docker.io");
        assert_eq!(default_url("ghcr.io"), "https://ghcr.io");
        assert_eq!(
            default_url("registry.local:5000"),
            "https://registry.local:5000"
        );
        assert_eq!(well_known("quay.io").unwrap().url, "https://quay.io");
        // Aliases are normalised before the lookup, not by it.
        assert_eq!(well_known("index.docker.io"), None);
    }

    #[test]
    fn table_is_canonical_and_well_formed() {
        for (i, k) in KNOWN_REGISTRIES.iter().enumerate() {
            assert_eq!(canonical_host(k.host), k.host);
            assert!(
                KNOWN_REGISTRIES[..i].iter().all(|p| p.host != k.host),
                "{} twice",
                k.host
            );
            assert!(
                k.url.starts_with("https://") && !k.url.ends_with('/'),
                "{}",
                k.url
            );
            for pattern in k.allowed_hosts {
                let name = pattern.strip_prefix("*.").unwrap_or(pattern);
                assert!(
                    name.contains('.') && !name.contains('*') && name == name.to_ascii_lowercase(),
                    "{}: {pattern}",
                    k.host
                );
            }
        }
    }
}
