//! Asking fellow members for content before the upstream (issue 16,
//! "Handover"): after a join, a scale-down or a restart, the key's new
//! owner finds what the previous owner stored (and a content owner what a
//! tag owner stored with the tag), so a resize downloads nothing that is
//! cached in the cluster.
//!
//! The request is an ordinary GET with [`super::HOP_HEADER`] (so the peer
//! serves it itself) and [`ONLY_IF_CACHED`] (so it answers from its store
//! alone: 200, or 404 without asking its upstream or starting a fill).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::join_all;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::Member;
use super::forward::{STORED_ANSWER_TIMEOUT, Unreachable};
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

/// The members to ask before the upstream, in the order to prefer them:
/// when `me` comes first in `order` (a key's ranking without the members
/// down: `me` owns the key, or takes it over from owners that are down),
/// every other member, best-ranked first. The previous owner after one
/// join ranks right behind `me`; after several joins at once (a scale-up
/// of a `Parallel` StatefulSet), a scale-down or with a tag owner holding
/// the manifest too it may rank anywhere, so all are asked (at once: one
/// round trip however many). Empty when `me` does not come first (it serves
/// a hop request for a member whose view differs) or no other member is
/// alive.
pub fn peers_to_ask<'o>(order: &'o [Member], me: &str) -> &'o [Member] {
    match order {
        [first, rest @ ..] if first.name == me => rest,
        _ => &[],
    }
}

/// How long a member remembers content handed over to it (see
/// [`HandedOver`]).
pub const HANDED_OVER_MEMORY: Duration = Duration::from_secs(600);
/// Keys remembered at most (older ones are forgotten first).
const HANDED_OVER_MAX: usize = 4096;

/// Content this member took from a fellow member recently. Asked again for
/// the same content within [`HANDED_OVER_MEMORY`], it did not make it into
/// the store (the peer's copy failed verification, or the fill failed):
/// the next fill goes to the upstream rather than to the same copy again,
/// which would fail the same way for ever.
#[derive(Default)]
pub struct HandedOver(Mutex<HashMap<(String, Digest), Instant>>);

impl HandedOver {
    /// Records that `d` of upstream `host` was handed over at `now`.
    pub fn record(&self, host: &str, d: &Digest, now: Instant) {
        let mut map = self.0.lock().expect("not poisoned");
        map.retain(|_, at| now.saturating_duration_since(*at) < HANDED_OVER_MEMORY);
        if map.len() >= HANDED_OVER_MAX
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert((host.to_owned(), d.clone()), now);
    }

    /// Whether `d` of upstream `host` was handed over within
    /// [`HANDED_OVER_MEMORY`] before `now`.
    pub fn recently(&self, host: &str, d: &Digest, now: Instant) -> bool {
        let map = self.0.lock().expect("not poisoned");
        map.get(&(host.to_owned(), d.clone()))
            .is_some_and(|at| now.saturating_duration_since(*at) < HANDED_OVER_MEMORY)
    }
}

/// The path and query of `repo`'s `kind` (`blobs` or `manifests`)
/// `reference` (a digest, or a tag) on upstream `host`, as a member routes
/// it to that upstream: by its `ns` parameter, which every member's
/// configuration resolves the same way whatever its default upstream.
pub fn path(host: &str, repo: &RepoName, kind: &str, reference: &impl std::fmt::Display) -> String {
    let ns = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("ns", host)
        .finish();
    format!("/v2/{repo}/{kind}/{reference}?{ns}")
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

/// Asks the other members for the content `d` of upstream `host` when
/// this one serves the key ([`peers_to_ask`] over
/// [`Cluster::owner_order`]): a HEAD with [`ONLY_IF_CACHED`] and the hop
/// header to all of them at once, then a GET of [`path`] to the
/// best-ranked one that has it, each answer awaited for at most
/// [`STORED_ANSWER_TIMEOUT`]. Returns that peer's name and its 200 response
/// (the body not yet read, nor checked), or `None`: this member does not
/// come first, no other member is alive, none has it, or they fail. A peer
/// that cannot be connected to, or is not the member it should be, is
/// marked down as a forwarded request would; a slow one only skipped.
/// Counts the outcome (`hit`, `miss` when all answered 404, else `error`).
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
    let peers = peers_to_ask(&order, cluster.me());
    if peers.is_empty() {
        return None;
    }
    let path = path(host, repo, kind, d);
    let request = |peer: &Member, method: Method| {
        let mut headers = HeaderMap::new();
        headers.insert(ONLY_IF_CACHED, HeaderValue::from_static("1"));
        let peers = cluster.peers();
        let path = path.as_str();
        let peer = peer.clone();
        async move {
            let answer = peers
                .send_within(&peer, method, path, headers, STORED_ANSWER_TIMEOUT)
                .await;
            if let Err(e) = &answer {
                if matches!(e, Unreachable::Timeout(_)) {
                    tracing::debug!(peer = %peer.name, error = %e, "cluster member slow to answer for stored content; skipped");
                } else {
                    tracing::warn!(peer = %peer.name, error = %e, "cluster member unreachable for handover: marked down");
                    cluster.peer_failed(&peer.name);
                }
            }
            answer
        }
    };
    let heads = join_all(peers.iter().map(|p| request(p, Method::HEAD))).await;
    let mut asked = if heads
        .iter()
        .all(|a| matches!(a, Ok(r) if Asked::of(r.status()) == Asked::Miss))
    {
        Asked::Miss
    } else {
        Asked::Error
    };
    let mut handed = None;
    for (peer, head) in peers.iter().zip(heads) {
        if !matches!(head, Ok(r) if Asked::of(r.status()) == Asked::Hit) {
            continue;
        }
        match request(peer, Method::GET).await {
            Ok(resp) if Asked::of(resp.status()) == Asked::Hit => {
                asked = Asked::Hit;
                handed = Some((peer.name.clone(), resp));
                break;
            }
            Ok(resp) => {
                // Evicted between the HEAD and the GET: ask the next.
                tracing::debug!(peer = %peer.name, status = %resp.status(), %d, "not handed over");
            }
            Err(_) => {}
        }
    }
    cluster
        .metrics()
        .cluster_handover
        .get_or_create(&ResultLabels {
            result: asked.label().to_owned(),
        })
        .inc();
    handed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_asks_every_other_member_best_ranked_first() {
        // A ranking: c first, then a, then b.
        let sorted =
            crate::cluster::parse_peers(&["a=http://a:1", "b=http://b:1", "c=http://c:1"]).unwrap();
        let order = [sorted[2].clone(), sorted[0].clone(), sorted[1].clone()];
        let names = |ms: &[Member]| ms.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(peers_to_ask(&order, "c")), ["a", "b"]);
        assert!(peers_to_ask(&order, "a").is_empty(), "not the owner");
        assert!(peers_to_ask(&order, "x").is_empty(), "not in the view");
        assert!(peers_to_ask(&order[..1], "c").is_empty(), "alone");
        assert!(peers_to_ask(&[], "c").is_empty());
    }

    #[test]
    fn handed_over_content_is_remembered_for_a_while() {
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let e: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        let t0 = Instant::now();
        let m = HandedOver::default();
        assert!(!m.recently("h", &d, t0));
        m.record("h", &d, t0);
        assert!(m.recently("h", &d, t0 + Duration::from_secs(1)));
        assert!(!m.recently("other", &d, t0), "per upstream");
        assert!(!m.recently("h", &e, t0));
        assert!(!m.recently("h", &d, t0 + HANDED_OVER_MEMORY), "forgotten");
        // Bounded: the oldest goes first.
        let m = HandedOver::default();
        for i in 0..=HANDED_OVER_MAX {
            let k: Digest = format!("sha256:{i:064x}").parse().unwrap();
            m.record("h", &k, t0 + Duration::from_millis(i as u64));
        }
        let first: Digest = format!("sha256:{:064x}", 0).parse().unwrap();
        let last: Digest = format!("sha256:{HANDED_OVER_MAX:064x}").parse().unwrap();
        let now = t0 + Duration::from_secs(5);
        assert!(!m.recently("h", &first, now));
        assert!(m.recently("h", &last, now));
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
