//! Pure request routing: which upstream, which repository, which endpoint.
//!
//! Order of precedence for the upstream: the `ns` query parameter (containerd
//! hosts.toml mirrors), then a first path segment naming a configured upstream
//! host (CRI-O and explicit prefixes), then the default upstream (Docker's
//! `registry-mirrors`; see [`default_upstream`]). An `ns` or host-like prefix
//! that is not configured is refused: the cache only ever dials hosts in its
//! configuration. URLs the cache writes for a client ([`RepoRequest::client_url`])
//! keep the client's routing, so following them reaches the same upstream.

use http::Method;
use regmirror_registry::docker_hub::DOCKER_HUB;

use crate::error::{Error, Result};
use crate::oci::{Digest, Reference, RepoName};

/// A request the cache understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET /v2/`
    Base,
    /// `GET /v2/_catalog`
    Catalog {
        n: Option<usize>,
        last: Option<String>,
    },
    Repo(RepoRequest),
}

/// Which configured upstream a request goes to: its position in the cache's
/// upstream list (`--upstream` flags or the config file's `upstreams`, in
/// order). Requests get one from [`route`], which only ever names a
/// configured upstream, so looking an id up in the list it was routed against
/// cannot fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamId(usize);

impl UpstreamId {
    /// The id of the upstream at `position` in the configured list.
    pub(crate) fn at(position: usize) -> Self {
        Self(position)
    }

    /// The position in the configured upstream list.
    pub fn index(self) -> usize {
        self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRequest {
    /// The configured upstream this request goes to.
    pub upstream: UpstreamId,
    /// The repository on the upstream (with `library/` added for Docker Hub).
    pub repo: RepoName,
    /// The name as the client wrote it (with its host prefix, if it used
    /// one), for the URLs the cache writes and the names it answers with.
    pub client_name: String,
    /// The `ns` query parameter as the client sent it (percent-decoded), if
    /// it sent one: put back into the URLs the cache writes.
    pub ns: Option<String>,
    pub endpoint: Endpoint,
    /// The query string minus `ns`, forwarded for pass-through endpoints.
    pub query: Option<String>,
}

impl RepoRequest {
    /// The path and query of `rest` (e.g. `tags/list`) in this request's
    /// repository as the client named it, for a URL the cache writes (a
    /// pagination `Link`): `/v2/{client_name}/{rest}?{query}`, with the
    /// client's `ns` appended when it sent one, so the client following it
    /// reaches the same upstream (its host prefix is in `client_name`).
    /// `query` (without `?`, possibly empty) is kept byte for byte, less any
    /// `ns` of its own.
    pub fn client_url(&self, rest: &str, query: &str) -> String {
        let is_ns = |pair: &&str| {
            url::form_urlencoded::parse(pair.as_bytes())
                .next()
                .is_some_and(|(k, _)| k == "ns")
        };
        let mut pairs: Vec<String> = query
            .split('&')
            .filter(|p| !p.is_empty() && !is_ns(p))
            .map(str::to_owned)
            .collect();
        if let Some(ns) = &self.ns {
            pairs.push(
                url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("ns", ns)
                    .finish(),
            );
        }
        let path = format!("/v2/{}/{rest}", self.client_name);
        if pairs.is_empty() {
            path
        } else {
            format!("{path}?{}", pairs.join("&"))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Manifest(Reference),
    Blob(Digest),
    TagsList,
    Referrers(Digest),
}

/// The canonical form of a registry host as image references name it
/// (Docker Hub's aliases are `docker.io`).
pub use regmirror_registry::docker_hub::canonical_host;

/// Docker's rule for telling a registry host from a first path component.
fn looks_like_host(segment: &str) -> bool {
    let (name, port) = match segment.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (segment, None),
    };
    let labels_ok = name
        .split('.')
        .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && port_ok && (name.contains('.') || port.is_some() || name == "localhost")
}

/// The upstream for requests that name none (no `ns`, no host prefix):
/// Docker Hub ([`DOCKER_HUB`]) wherever it is in `hosts` (canonical hosts,
/// so its aliases are `docker.io` too), else the first. Such requests come
/// from Docker's `registry-mirrors`, which only ever stand in for Docker Hub
/// (the daemon sends nothing else to a mirror), so answering them from
/// another registry would install its image under a Docker Hub name.
pub fn default_upstream(hosts: &[impl AsRef<str>]) -> UpstreamId {
    let hub = hosts.iter().position(|h| h.as_ref() == DOCKER_HUB);
    UpstreamId(hub.unwrap_or(0))
}

/// Route one request. `hosts` are the configured upstreams' canonical hosts
/// in configuration order (position `i` is `UpstreamId` `i`; requests naming
/// no upstream go to [`default_upstream`]).
pub fn route(
    method: &Method,
    path: &str,
    query: Option<&str>,
    hosts: &[impl AsRef<str>],
) -> Result<Request> {
    let rest = if path == "/v2" || path == "/v2/" {
        ""
    } else {
        path.strip_prefix("/v2/").ok_or(Error::NotFound)?
    };
    // No decoding: a valid path never needs it, so any escape is refused
    // before it can smuggle `..` or `/` past the grammar.
    if rest.contains('%') || rest.contains('\\') {
        return Err(Error::NameInvalid(
            "repository names may not contain escapes".into(),
        ));
    }
    let read_only = |m: &Method| m == Method::GET || m == Method::HEAD;
    if rest.is_empty() {
        return read_only(method)
            .then_some(Request::Base)
            .ok_or_else(push_unsupported);
    }
    let params = QueryParams::parse(query);
    if rest == "_catalog" {
        if !read_only(method) {
            return Err(push_unsupported());
        }
        let n = match params.get("n") {
            Some(v) => Some(
                v.parse()
                    .map_err(|_| Error::NameInvalid("invalid n".into()))?,
            ),
            None => None,
        };
        return Ok(Request::Catalog {
            n,
            last: params.get("last").map(str::to_owned),
        });
    }

    let segments: Vec<&str> = rest.split('/').collect();
    let (name_segments, endpoint) = split_endpoint(&segments)?;
    let endpoint = match endpoint {
        Some(e) if read_only(method) => e,
        // Uploads, pushes and deletes: we are a read-only mirror.
        _ => return Err(push_unsupported()),
    };
    let client_name = name_segments.join("/");
    let (upstream, name) = pick_upstream(&client_name, params.get("ns"), hosts)?;
    let mut repo = RepoName::parse(name)?;
    if hosts[upstream.index()].as_ref() == DOCKER_HUB {
        repo = repo.with_library_prefix();
    }
    Ok(Request::Repo(RepoRequest {
        upstream,
        repo,
        client_name,
        ns: params.get("ns").map(str::to_owned),
        endpoint,
        query: params.without("ns"),
    }))
}

fn push_unsupported() -> Error {
    Error::Unsupported("this registry is a read-only pull-through cache".into())
}

type Split<'a> = (&'a [&'a str], Option<Endpoint>);

/// Splits `<name>/<endpoint...>`. `None` endpoint means a write-only endpoint
/// (uploads).
fn split_endpoint<'a>(s: &'a [&'a str]) -> Result<Split<'a>> {
    let n = s.len();
    let unknown = || Error::NotFound;
    if n >= 3 && s[n - 3] == "blobs" && s[n - 2] == "uploads" {
        return Ok((&s[..n - 3], None));
    }
    if n >= 2 && s[n - 2] == "blobs" && s[n - 1] == "uploads" {
        return Ok((&s[..n - 2], None));
    }
    if n < 3 {
        return Err(unknown());
    }
    let name = &s[..n - 2];
    let endpoint = match (s[n - 2], s[n - 1]) {
        ("manifests", r) => Endpoint::Manifest(Reference::parse(r)?),
        ("blobs", d) => Endpoint::Blob(parse_digest(d)?),
        ("tags", "list") => Endpoint::TagsList,
        ("referrers", d) => Endpoint::Referrers(parse_digest(d)?),
        _ => return Err(unknown()),
    };
    Ok((name, Some(endpoint)))
}

fn parse_digest(s: &str) -> Result<Digest> {
    s.parse()
        .map_err(|e: crate::oci::digest::DigestError| Error::DigestInvalid(e.to_string()))
}

fn pick_upstream<'n>(
    name: &'n str,
    ns: Option<&str>,
    hosts: &[impl AsRef<str>],
) -> Result<(UpstreamId, &'n str)> {
    let find = |h: &str| {
        let h = canonical_host(h);
        hosts.iter().position(|c| c.as_ref() == h).map(UpstreamId)
    };
    let unknown =
        |h: &str| Error::NameUnknown(format!("upstream {h:?} is not configured on this cache"));
    if let Some(ns) = ns {
        let idx = find(ns).ok_or_else(|| unknown(ns))?;
        // A prefix naming the same upstream is tolerated (belt and braces clients).
        let name = match name.split_once('/') {
            Some((first, rest)) if find(first) == Some(idx) => rest,
            _ => name,
        };
        return Ok((idx, name));
    }
    if let Some((first, rest)) = name.split_once('/') {
        if let Some(idx) = find(first) {
            return Ok((idx, rest));
        }
        if looks_like_host(first) {
            return Err(unknown(first));
        }
    }
    Ok((default_upstream(hosts), name))
}

/// Query parameters, percent-decoded.
struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    fn parse(q: Option<&str>) -> Self {
        Self(
            url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn without(&self, key: &str) -> Option<String> {
        let kept: Vec<_> = self.0.iter().filter(|(k, _)| k != key).collect();
        if kept.is_empty() {
            return None;
        }
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in kept {
            s.append_pair(k, v);
        }
        Some(s.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn hosts() -> Vec<String> {
        vec![
            "docker.io".into(),
            "ghcr.io".into(),
            "127.0.0.1:5999".into(),
        ]
    }

    fn get(path: &str, query: Option<&str>) -> Result<Request> {
        route(&Method::GET, path, query, &hosts())
    }

    fn repo(r: Result<Request>) -> RepoRequest {
        match r {
            Ok(Request::Repo(r)) => r,
            other => panic!("expected a repository request, got {other:?}"),
        }
    }

    #[test]
    fn base_and_catalog() {
        assert_eq!(get("/v2/", None).unwrap(), Request::Base);
        assert_eq!(get("/v2", None).unwrap(), Request::Base);
        assert_eq!(
            get("/v2/_catalog", Some("n=10&last=a")).unwrap(),
            Request::Catalog {
                n: Some(10),
                last: Some("a".into())
            }
        );
    }

    #[test]
    fn docker_daemon_mirror_goes_to_default_upstream() {
        let r = repo(get("/v2/library/alpine/manifests/latest", None));
        assert_eq!(r.upstream, UpstreamId(0));
        assert_eq!(r.repo.as_str(), "library/alpine");
        assert!(matches!(r.endpoint, Endpoint::Manifest(Reference::Tag(_))));
    }

    #[test]
    fn single_segment_docker_hub_names_get_library() {
        let r = repo(get("/v2/alpine/manifests/3.19", None));
        assert_eq!(r.repo.as_str(), "library/alpine");
        assert_eq!(r.client_name, "alpine");
    }

    #[test]
    fn sha512_digests_address_blobs_manifests_and_referrers() {
        let d512 = crate::oci::Algorithm::Sha512.digest(b"x").to_string();
        let r = repo(get(&format!("/v2/ghcr.io/a/blobs/{d512}"), None));
        assert_eq!(r.endpoint, Endpoint::Blob(d512.parse().unwrap()));
        let r = repo(get(&format!("/v2/a/manifests/{d512}"), None));
        assert_eq!(
            r.endpoint,
            Endpoint::Manifest(Reference::Digest(d512.parse().unwrap()))
        );
        let r = repo(get(&format!("/v2/a/referrers/{d512}"), None));
        assert_eq!(r.endpoint, Endpoint::Referrers(d512.parse().unwrap()));
        // Wrong lengths and uppercase stay invalid, as for sha256.
        for bad in [
            format!("/v2/a/blobs/{}", &d512[..d512.len() - 1]),
            format!("/v2/a/blobs/{d512}0"),
            format!("/v2/a/blobs/{}", d512.to_ascii_uppercase()),
            format!("/v2/a/blobs/sha512:{}", &D["sha256:".len()..]),
            format!("/v2/a/manifests/sha384:{}", &d512["sha512:".len()..][..96]),
        ] {
            let e = get(&bad, None).unwrap_err();
            assert_eq!(e.code(), "DIGEST_INVALID", "{bad}: {e:?}");
        }
    }

    #[test]
    fn ns_parameter_selects_upstream() {
        let r = repo(get(&format!("/v2/owner/app/blobs/{D}"), Some("ns=ghcr.io")));
        assert_eq!(r.upstream, UpstreamId(1));
        assert_eq!(r.repo.as_str(), "owner/app");
        assert_eq!(r.endpoint, Endpoint::Blob(D.parse().unwrap()));
        assert_eq!(r.query, None);
        // containerd URL-encodes ports in ns.
        let r = repo(get("/v2/app/manifests/v1", Some("ns=127.0.0.1%3A5999")));
        assert_eq!(r.upstream, UpstreamId(2));
        assert_eq!(r.repo.as_str(), "app");
        // Docker Hub aliases.
        let r = repo(get("/v2/x/manifests/v1", Some("ns=index.docker.io")));
        assert_eq!((r.upstream, r.repo.as_str()), (UpstreamId(0), "library/x"));
    }

    #[test]
    fn prefix_selects_upstream() {
        let r = repo(get("/v2/docker.io/library/alpine/manifests/latest", None));
        assert_eq!(
            (r.upstream, r.repo.as_str()),
            (UpstreamId(0), "library/alpine")
        );
        let r = repo(get("/v2/ghcr.io/owner/app/tags/list", Some("n=5&last=v1")));
        assert_eq!((r.upstream, r.repo.as_str()), (UpstreamId(1), "owner/app"));
        assert_eq!(r.endpoint, Endpoint::TagsList);
        assert_eq!(r.query.as_deref(), Some("n=5&last=v1"));
        assert_eq!(r.client_name, "ghcr.io/owner/app");
    }

    #[test]
    fn unknown_upstreams_are_refused() {
        let e = get("/v2/x/manifests/latest", Some("ns=evil.example")).unwrap_err();
        assert!(matches!(e, Error::NameUnknown(_)), "{e:?}");
        let e = get("/v2/evil.example/x/manifests/latest", None).unwrap_err();
        assert!(matches!(e, Error::NameUnknown(_)), "{e:?}");
        let e = get("/v2/169.254.169.254:80/x/manifests/latest", None).unwrap_err();
        assert!(matches!(e, Error::NameUnknown(_)), "{e:?}");
    }

    #[test]
    fn writes_are_unsupported() {
        for (m, p) in [
            (Method::POST, "/v2/a/blobs/uploads/"),
            (Method::PATCH, "/v2/a/blobs/uploads/some-uuid"),
            (Method::PUT, "/v2/a/manifests/latest"),
            (Method::DELETE, "/v2/a/manifests/latest"),
            (Method::DELETE, &format!("/v2/a/blobs/{D}")),
            (Method::GET, "/v2/a/blobs/uploads/x"),
        ] {
            let e = route(&m, p, None, &hosts()).unwrap_err();
            assert!(matches!(e, Error::Unsupported(_)), "{m} {p}: {e:?}");
        }
    }

    #[test]
    fn bad_input_is_rejected() {
        let cases: &[(&str, &str)] = &[
            ("/v2/../etc/manifests/latest", "NAME_INVALID"),
            ("/v2/a/%2e%2e/manifests/latest", "NAME_INVALID"),
            ("/v2/a%2fb/manifests/latest", "NAME_INVALID"),
            ("/v2/A/manifests/latest", "NAME_INVALID"),
            ("/v2/a/manifests/..", "MANIFEST_INVALID"),
            ("/v2/a/blobs/sha256:abc", "DIGEST_INVALID"),
            ("/v2/a/blobs/md5:abc", "DIGEST_INVALID"),
            ("/v2/a/referrers/latest", "DIGEST_INVALID"),
            ("/v2/a/whatever", "NOT_FOUND"),
            ("/v2/manifests/latest", "NOT_FOUND"),
            ("/other", "NOT_FOUND"),
        ];
        for (p, code) in cases {
            let e = get(p, None).unwrap_err();
            assert_eq!(e.code(), *code, "{p}: {e:?}");
        }
    }

    #[test]
    fn requests_naming_no_upstream_go_to_docker_hub_wherever_it_is() {
        // Docker's registry-mirrors: `docker pull org/tool:v2` must not get
        // ghcr.io's org/tool because ghcr.io comes first.
        let hosts = ["ghcr.io", "127.0.0.1:5999", "docker.io"];
        assert_eq!(default_upstream(&hosts), UpstreamId(2));
        let r = repo(route(
            &Method::GET,
            "/v2/org/tool/manifests/v2",
            None,
            &hosts,
        ));
        assert_eq!((r.upstream, r.repo.as_str()), (UpstreamId(2), "org/tool"));
        let r = repo(route(&Method::GET, "/v2/alpine/tags/list", None, &hosts));
        assert_eq!(
            (r.upstream, r.repo.as_str()),
            (UpstreamId(2), "library/alpine")
        );
        // Named upstreams are still theirs.
        let r = repo(route(
            &Method::GET,
            "/v2/org/tool/manifests/v2",
            Some("ns=ghcr.io"),
            &hosts,
        ));
        assert_eq!(r.upstream, UpstreamId(0));
        // Without Docker Hub the first upstream takes them, as they are.
        let hosts = ["ghcr.io", "quay.io"];
        assert_eq!(default_upstream(&hosts), UpstreamId(0));
        let r = repo(route(&Method::GET, "/v2/alpine/manifests/3", None, &hosts));
        assert_eq!((r.upstream, r.repo.as_str()), (UpstreamId(0), "alpine"));
    }

    #[test]
    fn client_urls_keep_the_clients_routing() {
        // ns: kept, whatever else the query says; ports encoded as containerd does.
        let r = repo(get("/v2/owner/app/tags/list", Some("ns=ghcr.io&n=2")));
        assert_eq!(r.ns.as_deref(), Some("ghcr.io"));
        assert_eq!(
            r.client_url("tags/list", "n=2&last=t2"),
            "/v2/owner/app/tags/list?n=2&last=t2&ns=ghcr.io"
        );
        assert_eq!(
            r.client_url("tags/list", "ns=quay.io&last=t2&n%73=x"),
            "/v2/owner/app/tags/list?last=t2&ns=ghcr.io",
            "an ns of the upstream's own is not the client's"
        );
        let r = repo(get("/v2/app/tags/list", Some("ns=127.0.0.1%3A5999")));
        assert_eq!(
            r.client_url("tags/list", "last=b"),
            "/v2/app/tags/list?last=b&ns=127.0.0.1%3A5999"
        );
        // A host prefix is part of the client's name.
        let r = repo(get(&format!("/v2/ghcr.io/owner/app/referrers/{D}"), None));
        assert_eq!(r.ns, None);
        assert_eq!(
            r.client_url(&format!("referrers/{D}"), "last=x&n=1"),
            format!("/v2/ghcr.io/owner/app/referrers/{D}?last=x&n=1")
        );
        // The default upstream: the name as the client wrote it, nothing added.
        let r = repo(get("/v2/alpine/tags/list", None));
        assert_eq!(r.client_url("tags/list", ""), "/v2/alpine/tags/list");
    }

    #[test]
    fn names_may_contain_endpoint_words() {
        let r = repo(get("/v2/manifests/blobs/manifests/latest", None));
        assert_eq!(r.repo.as_str(), "manifests/blobs");
    }
}
