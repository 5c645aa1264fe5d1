//! Asking a fellow member for content before the upstream (issue 16,
//! "Handover"): after a join, a scale-down or a restart, the key's new
//! owner finds what the previous owner (now ranked next) stored, so a
//! resize downloads nothing that is cached in the cluster.
//!
//! The request is an ordinary GET with [`super::HOP_HEADER`] (so the peer
//! serves it itself) and [`ONLY_IF_CACHED`] (so it answers from its store
//! alone: 200, or 404 without asking its upstream or starting a fill).

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::Member;
use super::ranking::Key;
use crate::cluster::Cluster;
use crate::metrics::ResultLabels;
use crate::oci::{Digest, RepoName};

/// Request header asking a member for its stored content only: `1`.
pub const ONLY_IF_CACHED: HeaderName = HeaderName::from_static("regmirror-only-if-cached");

/// Whether a request asks for stored content only ([`ONLY_IF_CACHED`]: `1`).
pub fn only_if_cached(headers: &HeaderMap) -> bool {
    headers.get(&ONLY_IF_CACHED).is_some_and(|v| v == "1")
}

/// The member to ask before the upstream: when `me` comes first in
/// `order` (a key's ranking without the members down: `me` owns the key, or
/// takes it over from owners that are down), the member ranked next, which
/// is the previous owner after a join. `None` when `me` does not come first
/// (it serves a hop request for a member whose view differs) or no other
/// member is alive.
pub fn peer_to_ask<'o>(order: &'o [Member], me: &str) -> Option<&'o Member> {
    match order {
        [first, next, ..] if first.name == me => Some(next),
        _ => None,
    }
}

/// The path and query of `repo`'s `kind` (`blobs` or `manifests`) `d` on
/// upstream `host`, as a member routes it to that upstream: by its `ns`
/// parameter, which every member's (identical) configuration resolves.
pub fn path(host: &str, repo: &RepoName, kind: &str, d: &Digest) -> String {
    let ns = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("ns", host)
        .finish();
    format!("/v2/{repo}/{kind}/{d}?{ns}")
}

/// How an [`ONLY_IF_CACHED`] request went, as counted in
/// `regmirror_cluster_handover_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// 200: the peer sends it from its store.
    Hit,
    /// 404: the peer has none.
    Miss,
    /// No answer, or any other status.
    Error,
}

impl Asked {
    /// The peer's answer `status` judged: 200 a hit, 404 a miss, anything
    /// else an error.
    pub fn of(status: StatusCode) -> Self {
        match status {
            StatusCode::OK => Self::Hit,
            StatusCode::NOT_FOUND => Self::Miss,
            _ => Self::Error,
        }
    }

    /// The `result` label: `hit`, `miss` or `error`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Error => "error",
        }
    }
}

/// Where handed-over bytes come from, for errors and logs: `cluster member NAME`.
pub fn source(peer: &str) -> String {
    format!("cluster member {peer}")
}

/// Asks the member ranked after this one for the content `d` of upstream
/// `host` when this one serves the key ([`peer_to_ask`] over
/// [`Cluster::owner_order`]) with GET [`path`],
/// [`ONLY_IF_CACHED`] and the hop header. Returns the peer's name and its
/// 200 response (the body not yet read, nor checked), or `None`: this
/// member does not come first, no other member alive, a 404, another status, or no answer (the peer is then
/// marked down, as a forwarded request would). Counts the outcome.
pub async fn ask(
    cluster: &Cluster,
    host: &str,
    repo: &RepoName,
    kind: &str,
    d: &Digest,
) -> Option<(String, reqwest::Response)> {
    let key = Key::Content {
        upstream: host,
        digest: d,
    };
    let order = cluster.owner_order(&key);
    let peer = peer_to_ask(&order, cluster.me())?;
    let mut headers = HeaderMap::new();
    headers.insert(ONLY_IF_CACHED, HeaderValue::from_static("1"));
    let answer = cluster
        .peers()
        .send(peer, Method::GET, &path(host, repo, kind, d), headers)
        .await;
    let asked = match &answer {
        Ok(resp) => Asked::of(resp.status()),
        Err(e) => {
            tracing::warn!(peer = %peer.name, error = %e, "cluster member unreachable for handover: marked down");
            cluster.mark_down(&peer.name);
            Asked::Error
        }
    };
    cluster
        .metrics()
        .cluster_handover
        .get_or_create(&ResultLabels {
            result: asked.label().to_owned(),
        })
        .inc();
    match (asked, answer) {
        (Asked::Hit, Ok(resp)) => Some((peer.name.clone(), resp)),
        (_, Ok(resp)) => {
            tracing::debug!(peer = %peer.name, status = %resp.status(), %d, "not handed over; asking the upstream");
            None
        }
        (_, Err(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_asks_the_member_ranked_next() {
        // A ranking: c first, then a, then b.
        let sorted =
            crate::cluster::parse_peers(&["a=http://a:1", "b=http://b:1", "c=http://c:1"]).unwrap();
        let order = [sorted[2].clone(), sorted[0].clone(), sorted[1].clone()];
        assert_eq!(peer_to_ask(&order, "c").unwrap().name, "a");
        assert!(peer_to_ask(&order, "a").is_none(), "not the owner");
        assert!(peer_to_ask(&order, "x").is_none(), "not in the view");
        assert!(peer_to_ask(&order[..1], "c").is_none(), "alone");
        assert!(peer_to_ask(&[], "c").is_none());
    }

    #[test]
    fn the_path_routes_to_the_upstream_by_ns() {
        let repo = RepoName::parse("library/app").unwrap();
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let p = path("127.0.0.1:5000", &repo, "blobs", &d);
        assert_eq!(p, format!("/v2/library/app/blobs/{d}?ns=127.0.0.1%3A5000"));
        let (path, query) = p.split_once('?').unwrap();
        let routed =
            crate::route::route(&Method::GET, path, Some(query), &["x.io", "127.0.0.1:5000"]);
        match routed.unwrap() {
            crate::route::Request::Repo(r) => {
                assert_eq!(r.upstream.index(), 1);
                assert_eq!(r.repo, repo);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_a_200_hands_over() {
        assert_eq!(Asked::of(StatusCode::OK), Asked::Hit);
        assert_eq!(Asked::of(StatusCode::NOT_FOUND), Asked::Miss);
        for s in [
            StatusCode::PARTIAL_CONTENT,
            StatusCode::BAD_GATEWAY,
            StatusCode::UNAUTHORIZED,
        ] {
            assert_eq!(Asked::of(s), Asked::Error);
        }
        let mut h = HeaderMap::new();
        assert!(!only_if_cached(&h));
        h.insert(ONLY_IF_CACHED, HeaderValue::from_static("1"));
        assert!(only_if_cached(&h));
        h.insert(ONLY_IF_CACHED, HeaderValue::from_static("0"));
        assert!(!only_if_cached(&h));
    }
}
