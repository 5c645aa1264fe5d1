//! Which hosts an upstream may send us to (token realms, redirects), so no
//! response can make the cache dial somewhere its configuration did not name.

use url::{Host, Url};

#[derive(Debug, Clone)]
pub struct HostPolicy {
    upstream_host: String,
    /// Extra host patterns: `name` or `*.suffix`.
    allowed: Vec<String>,
}

impl HostPolicy {
    pub fn new(upstream_url: &Url, allowed: &[String]) -> Self {
        Self {
            upstream_host: upstream_url.host_str().unwrap_or("").to_ascii_lowercase(),
            allowed: allowed.iter().map(|a| a.to_ascii_lowercase()).collect(),
        }
    }

    /// Whether `url` is the upstream itself, a host of the same site
    /// (`auth.docker.io` for `registry-1.docker.io`), or explicitly allowed.
    pub fn permits(&self, url: &Url) -> bool {
        if !matches!(url.scheme(), "http" | "https") {
            return false;
        }
        let Some(host) = url.host() else { return false };
        let name = match &host {
            Host::Domain(d) => d.to_ascii_lowercase(),
            // IPs only by exact match: no suffix games.
            Host::Ipv4(ip) => ip.to_string(),
            Host::Ipv6(ip) => format!("[{ip}]"),
        };
        if name == self.upstream_host {
            return true;
        }
        let is_domain = matches!(host, Host::Domain(_));
        if is_domain && self.same_site(&name) {
            return true;
        }
        self.allowed
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(suffix) => is_domain && name.ends_with(&format!(".{suffix}")),
                None => *pattern == name,
            })
    }

    /// Whether credentials for the upstream may be sent to `url`: only to the
    /// upstream's own site, never to an extra allowed host.
    pub fn may_receive_credentials(&self, url: &Url) -> bool {
        match url.host() {
            Some(Host::Domain(d)) => {
                let d = d.to_ascii_lowercase();
                d == self.upstream_host || self.same_site(&d)
            }
            Some(_) => url.host_str() == Some(self.upstream_host.as_str()),
            None => false,
        }
    }

    /// The upstream host without its first label, if two or more labels
    /// remain: `registry-1.docker.io` -> `docker.io`; `ghcr.io` -> `ghcr.io`.
    fn same_site(&self, name: &str) -> bool {
        if self.upstream_host.parse::<std::net::IpAddr>().is_ok() {
            return false;
        }
        let base = match self.upstream_host.split_once('.') {
            Some((_, rest)) if rest.contains('.') => rest,
            _ => self.upstream_host.as_str(),
        };
        name == base || name.ends_with(&format!(".{base}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(url: &str, allowed: &[&str]) -> HostPolicy {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        HostPolicy::new(&url.parse().unwrap(), &allowed)
    }

    fn permits(p: &HostPolicy, url: &str) -> bool {
        p.permits(&url.parse().unwrap())
    }

    #[test]
    fn docker_hub_realm_is_same_site() {
        let p = policy("https://registry-1.docker.io", &[]);
        assert!(permits(&p, "https://auth.docker.io/token"));
        assert!(permits(&p, "https://registry-1.docker.io/v2/"));
        assert!(!permits(&p, "https://docker.io.evil.com/token"));
        assert!(!permits(&p, "https://evildocker.io/token"));
        assert!(!permits(&p, "file:///etc/passwd"));
        assert!(p.may_receive_credentials(&"https://auth.docker.io/token".parse().unwrap()));
    }

    #[test]
    fn two_label_hosts_do_not_widen_to_the_tld() {
        let p = policy("https://ghcr.io", &["pkg-containers.githubusercontent.com"]);
        assert!(permits(&p, "https://ghcr.io/token"));
        assert!(!permits(&p, "https://other.io/token"));
        assert!(permits(
            &p,
            "https://pkg-containers.githubusercontent.com/x"
        ));
        assert!(
            !p.may_receive_credentials(
                &"https://pkg-containers.githubusercontent.com/x"
                    .parse()
                    .unwrap()
            )
        );
    }

    #[test]
    fn ips_match_exactly() {
        let p = policy("http://127.0.0.1:5000", &[]);
        assert!(permits(&p, "http://127.0.0.1:5001/token"));
        assert!(!permits(&p, "http://127.0.0.2/token"));
        assert!(!permits(&p, "http://169.254.169.254/latest"));
        let p = policy("http://127.0.0.1:5000", &["127.0.0.3"]);
        assert!(permits(&p, "http://127.0.0.3:9/blob"));
        assert!(!p.may_receive_credentials(&"http://127.0.0.3:9/blob".parse().unwrap()));
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let p = policy("https://quay.io", &["*.cloudfront.net"]);
        assert!(permits(&p, "https://d1.cloudfront.net/x"));
        assert!(!permits(&p, "https://cloudfront.net.evil/x"));
        assert!(!permits(&p, "https://evilcloudfront.net/x"));
    }
}
