//! Listings: the catalog of cached repositories, and the tag lists and
//! referrers relayed from the upstream (tag lists fall back on the cached
//! tags when the upstream fails).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, header};

use super::Mirror;
use crate::error::{Error, Result};
use crate::oci::pagination::{next_page_link, page_params, page_tags, paginate};
use crate::oci::{Digest, RepoName};
use crate::route::{UpstreamId, default_upstream};
use crate::upstream;

/// Largest relayed listing body, in bytes; a larger one is an upstream error.
const MAX_PASSTHROUGH_BODY: u64 = 8 << 20;

/// An upstream answer relayed to the client: its status, the headers a
/// client may use (`Content-Type`, `Link`, `OCI-Filters-Applied`) and body.
/// A `Link` here still has the upstream's path (or `/v2/tags/list` for pages
/// the cache cut itself): only its query counts, and the server points it at
/// the URL the client used ([`crate::route::RepoRequest::client_url`]).
pub struct Relayed {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Relayed {
    /// The tag list the cache answers from `tags` (sorted), the tags it
    /// holds for `repo`, when the upstream fails: `query`'s page of them,
    /// with a `Link` (on the path `/v2/tags/list`, see [`Relayed`]) when
    /// more follow.
    fn cached_tags(repo: &RepoName, tags: &[String], query: Option<&str>) -> Self {
        let (n, last) = page_params(query);
        let page = paginate(tags, n, last.as_deref());
        let body = serde_json::json!({"name": repo.as_str(), "tags": page}).to_string();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let next = next_page_link("tags/list", tags, page, n);
        if let Some(v) = next.and_then(|l| HeaderValue::from_str(&l).ok()) {
            headers.insert(header::LINK, v);
        }
        Self {
            status: http::StatusCode::OK,
            headers,
            body: body.into(),
        }
    }

    /// A tag list with `query`'s page cut here when the upstream ignored
    /// `n` and `last` (see [`page_tags`]), its `Link` replaced by ours; any
    /// other answer as it came.
    fn paged_tags(mut self, query: Option<&str>) -> Self {
        if self.status != http::StatusCode::OK {
            return self;
        }
        let Some(page) = page_tags(&self.body, query) else {
            return self;
        };
        self.headers.remove(header::LINK);
        // The server rewrites the path to the one the client used.
        if let Some(v) = page.next.and_then(|l| HeaderValue::from_str(&l).ok()) {
            self.headers.insert(header::LINK, v);
        }
        self.body = page.body;
        self
    }
}

impl Mirror {
    /// Cached repositories, as a client would name them: unprefixed for the
    /// default upstream ([`default_upstream`]: where requests naming no
    /// upstream go), `host/name` for the others; sorted.
    pub async fn catalog(&self) -> Result<Vec<String>> {
        let default = default_upstream(&self.upstreams);
        let mut names = Vec::new();
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let host = upstream.host();
            for repo in self.store.repositories(host).await? {
                names.push(if UpstreamId::at(i) == default {
                    repo
                } else {
                    format!("{host}/{repo}")
                });
            }
        }
        names.sort();
        Ok(names)
    }

    /// `tags/list` from the upstream (paged here if it ignored `n`/`last`),
    /// or the tags we know when it fails, paged here with a `Link` to the
    /// next page. The body names the upstream's repository; the server
    /// renames it to the client's.
    pub async fn tags_list(
        &self,
        up: UpstreamId,
        repo: &RepoName,
        query: Option<&str>,
    ) -> Result<Relayed> {
        let host = self.host(up);
        // With tags to fall back on, a silent upstream gets `stale_after`, as
        // a cached tag's revalidation does, not the whole header timeout.
        let cached = self.store.tags(host, repo).await.unwrap_or_default();
        let relay = self.relay(up, repo, "tags/list", query);
        let answer = if cached.is_empty() {
            relay.await
        } else {
            let waited = self.timeouts.stale_after;
            tokio::time::timeout(waited, relay)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::UpstreamUnavailable {
                        upstream: host.to_owned(),
                        detail: format!("no answer within {waited:?}"),
                    })
                })
        };
        match answer {
            Err(e) if e.is_upstream_failure() && !cached.is_empty() => {
                tracing::warn!(upstream = %host, %repo, error = %e, "upstream failed; listing cached tags");
                Ok(Relayed::cached_tags(repo, &cached, query))
            }
            Ok(relayed) => Ok(relayed.paged_tags(query)),
            other => other,
        }
    }

    /// `referrers/<d>` from the upstream, relayed.
    pub async fn referrers(
        &self,
        up: UpstreamId,
        repo: &RepoName,
        d: &Digest,
        query: Option<&str>,
    ) -> Result<Relayed> {
        self.relay(up, repo, &format!("referrers/{d}"), query).await
    }

    /// GET `repo`'s `rest` on upstream `up`. Client errors (4xx) are relayed
    /// as the upstream's registry error bodies; server errors become ours.
    async fn relay(
        &self,
        up: UpstreamId,
        repo: &RepoName,
        rest: &str,
        query: Option<&str>,
    ) -> Result<Relayed> {
        let upstream = self.upstream(up);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, */*"),
        );
        let resp = upstream
            .send(
                Method::GET,
                repo,
                rest,
                query,
                headers,
                self.timeouts.response_header,
            )
            .await?;
        let status = resp.status();
        if status.is_server_error() {
            return Err(upstream::status_error(upstream.host(), rest, status));
        }
        let mut out = HeaderMap::new();
        for name in [header::CONTENT_TYPE, header::LINK] {
            if let Some(v) = resp.headers().get(&name) {
                out.insert(name, v.clone());
            }
        }
        if let Some(v) = resp.headers().get("oci-filters-applied") {
            out.insert("oci-filters-applied", v.clone());
        }
        let body = upstream::read_limited(resp, MAX_PASSTHROUGH_BODY, upstream.host()).await?;
        Ok(Relayed {
            status,
            headers: out,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag_list(tags: &[&str], link: Option<&str>) -> Relayed {
        let mut headers = HeaderMap::new();
        if let Some(l) = link {
            headers.insert(header::LINK, HeaderValue::from_str(l).unwrap());
        }
        Relayed {
            status: http::StatusCode::OK,
            headers,
            body: serde_json::json!({"name": "app", "tags": tags})
                .to_string()
                .into(),
        }
    }

    fn tags_of(r: &Relayed) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["name"], "app", "other fields kept");
        serde_json::from_value(v["tags"].clone()).unwrap()
    }

    #[test]
    fn tag_pages_cut_here_carry_our_link() {
        let all = ["v2", "latest", "v1", "multi"];
        let upstream_link = r#"</v2/app/tags/list?n=100>; rel="next""#;
        let r = tag_list(&all, Some(upstream_link)).paged_tags(Some("last=latest"));
        assert_eq!(tags_of(&r), ["multi", "v1", "v2"]);
        assert!(r.headers.get(header::LINK).is_none());
        let r = tag_list(&all, None).paged_tags(Some("n=2"));
        assert_eq!(tags_of(&r), ["latest", "multi"]);
        assert_eq!(
            r.headers[header::LINK],
            r#"</v2/tags/list?n=2&last=multi>; rel="next""#
        );
    }

    #[test]
    fn tag_pages_the_upstream_made_are_relayed_untouched() {
        let link = r#"</v2/app/tags/list?last=b&n=2>; rel="next""#;
        for (tags, query) in [
            (&["b", "a"][..], None),
            (&["b", "a"][..], Some("ns=docker.io")),
            (&["a", "b"][..], Some("n=2")),
            (&["c", "b"][..], Some("n=2&last=a")),
        ] {
            let before = tag_list(tags, Some(link));
            let r = tag_list(tags, Some(link)).paged_tags(query);
            assert_eq!(r.body, before.body, "{query:?}");
            assert_eq!(r.headers[header::LINK], link, "{query:?}");
        }
        let mut not_found = tag_list(&["a"], None);
        not_found.status = http::StatusCode::NOT_FOUND;
        let r = not_found.paged_tags(Some("last=z"));
        assert_eq!(tags_of(&r), ["a"]);
    }

    #[test]
    fn cached_tag_pages_link_to_the_next() {
        let repo = RepoName::parse("app").unwrap();
        let tags: Vec<String> = ["a", "b", "c"].map(String::from).into();
        let r = Relayed::cached_tags(&repo, &tags, Some("n=2"));
        assert_eq!(tags_of(&r), ["a", "b"]);
        assert_eq!(
            r.headers[header::LINK],
            r#"</v2/tags/list?n=2&last=b>; rel="next""#
        );
        let r = Relayed::cached_tags(&repo, &tags, Some("n=2&last=b"));
        assert_eq!(tags_of(&r), ["c"]);
        assert!(r.headers.get(header::LINK).is_none(), "last page");
        let r = Relayed::cached_tags(&repo, &tags, None);
        assert_eq!(tags_of(&r), ["a", "b", "c"]);
        assert!(r.headers.get(header::LINK).is_none());
    }
}
