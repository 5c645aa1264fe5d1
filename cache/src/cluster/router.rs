//! This process as a running cluster member: which member serves a request
//! (the key's first alive member in the ranking), and serving it from there
//! when that is another member (issue 16, "Routing" and "Failures").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::response::Response;
use http::{HeaderMap, Method};

use super::down::{self, DownList};
use super::forward::PeerClient;
use super::ranking::{Key, rank};
use super::{HOP_HEADER, Member, Membership};
use crate::config::Timeouts;
use crate::error::Result;
use crate::metrics::{Metrics, PeerLabels};
use crate::oci::Reference;
use crate::route::{Endpoint, RepoRequest};
use crate::zerocopy::SendQueue;
use prometheus_client::metrics::counter::Counter;

/// How long a member that got SIGTERM keeps serving with `/readyz` failing,
/// so that load balancers and fellow members stop sending it requests
/// before it stops accepting them.
pub const DRAIN: Duration = Duration::from_secs(5);

/// This process in a cache cluster: its membership, how it reaches the
/// others, which of them it found down, and whether it is draining.
pub struct Cluster {
    membership: Membership,
    peers: PeerClient,
    down: DownList,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    handed_over: super::handover::HandedOver,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.membership.me())
            .field("view", &self.membership.view())
            .finish_non_exhaustive()
    }
}

/// The ownership key of a repository request: content (blobs, manifests by
/// digest) by (upstream, digest), a manifest by tag by (upstream,
/// repository, tag). `None` for what every member serves itself: tag lists
/// and referrers (relayed from the upstream, not stored).
pub fn key_of<'r>(upstream: &'r str, r: &'r RepoRequest) -> Option<Key<'r>> {
    match &r.endpoint {
        Endpoint::Blob(digest) | Endpoint::Manifest(Reference::Digest(digest)) => {
            Some(Key::Content { upstream, digest })
        }
        Endpoint::Manifest(Reference::Tag(tag)) => Some(Key::Tag {
            upstream,
            repo: &r.repo,
            tag,
        }),
        Endpoint::TagsList | Endpoint::Referrers(_) => None,
    }
}

/// The path and query to ask the member that serves `r` with, `r` routed to
/// upstream `host`: the repository and reference as routed, and the
/// upstream named by `ns`, never left to the receiver's default upstream
/// (which differs while configurations roll out, and would answer for
/// another registry). `None` for requests without a [`key_of`].
pub fn forward_path(host: &str, r: &RepoRequest) -> Option<String> {
    match &r.endpoint {
        Endpoint::Blob(d) => Some(super::handover::path(host, &r.repo, "blobs", d)),
        Endpoint::Manifest(reference) => {
            Some(super::handover::path(host, &r.repo, "manifests", reference))
        }
        Endpoint::TagsList | Endpoint::Referrers(_) => None,
    }
}

impl Cluster {
    /// This process as a member of `membership`, reaching the others with
    /// `timeouts` (see [`PeerClient::new`]) and counting into `metrics`.
    ///
    /// # Errors
    /// The HTTP client for the members cannot be built.
    pub fn new(membership: Membership, timeouts: &Timeouts, metrics: Arc<Metrics>) -> Result<Self> {
        let peers = PeerClient::new(membership.me(), timeouts)?;
        metrics.cluster_members.set(membership.view().len() as i64);
        Ok(Self {
            membership,
            peers,
            down: DownList::default(),
            draining: AtomicBool::new(false),
            metrics,
            handed_over: Default::default(),
        })
    }

    /// This member's name.
    pub fn me(&self) -> &str {
        self.membership.me()
    }

    /// The membership as this process sees it.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The metrics this member counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Content other members handed over to this one lately.
    pub fn handed_over(&self) -> &super::handover::HandedOver {
        &self.handed_over
    }

    /// How this member reaches the others.
    pub fn peers(&self) -> &PeerClient {
        &self.peers
    }

    /// The members of the current view ranked for `key`, without those
    /// marked down: the first is who serves the key now, the rest the order
    /// to fall back in (this member included, wherever it ranks).
    pub fn owner_order(&self, key: &Key<'_>) -> Vec<Member> {
        let view = self.membership.view();
        self.down.alive(rank(&view, key), Instant::now())
    }

    /// Skips `member` for [`down::DOWN_FOR`] from now.
    pub fn mark_down(&self, member: &str) {
        self.down.mark(member, Instant::now());
    }

    /// `regmirror_cluster_peer_errors_total` of `peer`.
    pub fn peer_errors(&self, peer: &str) -> Counter {
        self.metrics
            .cluster_peer_errors
            .get_or_create(&PeerLabels {
                peer: peer.to_owned(),
            })
            .clone()
    }

    /// A request to `peer` got no usable answer: counted in
    /// `regmirror_cluster_peer_errors_total`, and `peer` skipped for
    /// [`down::DOWN_FOR`] ([`Cluster::mark_down`]).
    pub fn peer_failed(&self, peer: &str) {
        self.peer_errors(peer).inc();
        self.mark_down(peer);
    }

    /// From now on `/readyz` fails (see [`DRAIN`]).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether this member is draining before it shuts down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Keeps `regmirror_cluster_members` at the size of the view until the
    /// membership stops changing (a static one never changes).
    pub fn spawn_view_gauge(&self) -> tokio::task::JoinHandle<()> {
        let mut changes = self.membership.changes();
        let metrics = Arc::clone(&self.metrics);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let size = changes.borrow_and_update().len();
                metrics.cluster_members.set(size as i64);
            }
        })
    }

    /// Serves a request for `key` from the member it belongs to, when that
    /// is another one: the first member of [`Cluster::owner_order`] that
    /// answers, asked in order up to this member; a member that gives no
    /// response headers is marked down and the next one asked. Returns its
    /// answer (any status, relayed as it is), or `None` when this process
    /// serves the request itself: it carries [`HOP_HEADER`] (so nothing
    /// loops), this member comes first, or every member ahead is down.
    /// `zero_copy`: the client connection's queue when the answer may be
    /// relayed without copies (see [`PeerClient::forward`]).
    pub async fn serve_elsewhere(
        &self,
        key: &Key<'_>,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        zero_copy: Option<SendQueue>,
    ) -> Option<Response> {
        if headers.contains_key(HOP_HEADER) {
            self.metrics.cluster_owner_requests.inc();
            return None;
        }
        let me = self.me();
        let view = self.membership.view();
        let ranked = rank(&view, key);
        let owner_is_me = ranked.first().is_some_and(|m| m.name == me);
        let order = self.down.alive(ranked, Instant::now());
        for peer in down::ahead_of(&order, me) {
            self.metrics
                .cluster_peer_requests
                .get_or_create(&PeerLabels {
                    peer: peer.name.clone(),
                })
                .inc();
            let errors = self.peer_errors(&peer.name);
            let on_body_error = move || {
                errors.inc();
            };
            match self
                .peers
                .forward(
                    peer,
                    method,
                    path_and_query,
                    headers,
                    zero_copy.clone(),
                    on_body_error,
                )
                .await
            {
                Ok(resp) => return Some(resp),
                Err(e) => {
                    tracing::warn!(
                        peer = %peer.name,
                        error = %e,
                        down_for = ?down::DOWN_FOR,
                        "cluster member unreachable: marked down, asking the next"
                    );
                    self.peer_failed(&peer.name);
                }
            }
        }
        if owner_is_me {
            self.metrics.cluster_owner_requests.inc();
        } else {
            self.metrics.cluster_takeovers.inc();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::UpstreamId;

    fn request(endpoint: Endpoint) -> RepoRequest {
        RepoRequest {
            upstream: UpstreamId::at(0),
            repo: crate::oci::RepoName::parse("library/app").unwrap(),
            client_name: "app".into(),
            ns: None,
            endpoint,
            query: None,
        }
    }

    #[test]
    fn content_is_keyed_by_digest_tags_by_name_listings_not_at_all() {
        let d: crate::oci::Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let blob = request(Endpoint::Blob(d.clone()));
        let by_digest = request(Endpoint::Manifest(Reference::Digest(d.clone())));
        let by_tag = request(Endpoint::Manifest(Reference::Tag(
            crate::oci::Tag::parse("v1").unwrap(),
        )));
        let bytes = |r: &RepoRequest| key_of("docker.io", r).map(|k| k.bytes());
        // A blob and a manifest with one digest are one piece of content.
        assert_eq!(bytes(&blob), bytes(&by_digest));
        assert_eq!(
            bytes(&by_tag).unwrap(),
            b"tag\0docker.io\0library/app\0v1".to_vec()
        );
        assert!(key_of("docker.io", &request(Endpoint::TagsList)).is_none());
        assert!(key_of("docker.io", &request(Endpoint::Referrers(d))).is_none());
    }

    fn members(names: &[&str]) -> Vec<Member> {
        names
            .iter()
            .map(|n| Member {
                name: (*n).into(),
                url: format!("http://{n}:5000").parse().unwrap(),
            })
            .collect()
    }

    fn cluster(me: &str, names: &[&str]) -> Cluster {
        Cluster::new(
            Membership::fixed(me.into(), members(names)),
            &Timeouts::default(),
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    #[test]
    fn members_down_drop_out_of_the_owner_order() {
        let c = cluster("a", &["a", "b", "c"]);
        let d: crate::oci::Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        let key = Key::Content {
            upstream: "docker.io",
            digest: &d,
        };
        let full: Vec<String> = c.owner_order(&key).into_iter().map(|m| m.name).collect();
        assert_eq!(full.len(), 3);
        c.mark_down(&full[0]);
        let after: Vec<String> = c.owner_order(&key).into_iter().map(|m| m.name).collect();
        assert_eq!(after, full[1..]);
        assert_eq!(c.metrics.cluster_members.get(), 3);
    }

    #[tokio::test]
    async fn hop_requests_and_owned_keys_are_served_here() {
        let c = cluster("a", &["a"]);
        let d: crate::oci::Digest = format!("sha256:{}", "c".repeat(64)).parse().unwrap();
        let key = Key::Content {
            upstream: "docker.io",
            digest: &d,
        };
        let uri = "/v2/app/blobs/x";
        let mut hop = HeaderMap::new();
        hop.insert(HOP_HEADER, http::HeaderValue::from_static("b"));
        assert!(
            c.serve_elsewhere(&key, &Method::GET, uri, &hop, None)
                .await
                .is_none()
        );
        assert!(
            c.serve_elsewhere(&key, &Method::GET, uri, &HeaderMap::new(), None)
                .await
                .is_none()
        );
        assert_eq!(c.metrics.cluster_owner_requests.get(), 2);
        assert_eq!(c.metrics.cluster_takeovers.get(), 0);
    }

    #[tokio::test]
    async fn an_unreachable_owner_is_marked_down_and_its_key_taken_over() {
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut ms = members(&["a"]);
        ms.push(Member {
            name: "b".into(),
            url: format!("http://127.0.0.1:{port}").parse().unwrap(),
        });
        let c = Cluster::new(
            Membership::fixed("a".into(), ms),
            &Timeouts::default(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        // A digest whose key "b" owns.
        let d: crate::oci::Digest = (0..)
            .map(|i| format!("sha256:{i:064x}").parse().unwrap())
            .find(|d| {
                let key = Key::Content {
                    upstream: "docker.io",
                    digest: d,
                };
                rank(&["a", "b"], &key)[0] == &"b"
            })
            .unwrap();
        let key = Key::Content {
            upstream: "docker.io",
            digest: &d,
        };
        let uri = "/v2/app/blobs/x";
        let answer = c
            .serve_elsewhere(&key, &Method::GET, uri, &HeaderMap::new(), None)
            .await;
        assert!(answer.is_none(), "served here");
        assert!(c.down.is_down("b", Instant::now()));
        assert_eq!(c.metrics.cluster_takeovers.get(), 1);
        let b = PeerLabels { peer: "b".into() };
        assert_eq!(c.metrics.cluster_peer_requests.get_or_create(&b).get(), 1);
        assert_eq!(c.metrics.cluster_peer_errors.get_or_create(&b).get(), 1);
        // While down, "b" is not asked again.
        assert!(
            c.serve_elsewhere(&key, &Method::GET, uri, &HeaderMap::new(), None)
                .await
                .is_none()
        );
        assert_eq!(c.metrics.cluster_peer_requests.get_or_create(&b).get(), 1);
    }
}
