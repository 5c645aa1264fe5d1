//! A cache cluster: N `regmirror-cache` processes acting as one cache, with
//! one upstream fetch per key cluster-wide (issue 16).
//!
//! Each key ([`ranking::Key`]) has one owner, chosen by rendezvous hashing
//! over the member names ([`ranking::rank`]); the ranking is also the order to
//! fall back in when the owner is down. A member that is not a key's owner
//! streams the request from the owner (with a hop header, so nothing loops)
//! and stores nothing; the owner runs the ordinary fill, so clients on every
//! member share one upstream fetch.
//!
//! Membership is a [`View`] that changes over time ([`Membership`]): static
//! (`--peer`) or discovered from a Kubernetes headless Service's
//! EndpointSlices. One process without a cluster behaves as a lone cache.

pub mod budget;
pub mod discovery;
pub mod down;
pub mod forward;
pub mod handover;
pub mod ranking;
pub mod relay;
pub mod router;

pub use router::{Cluster, key_of};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;
use url::Url;

/// The request header a member adds when it forwards a request to another
/// (its value: the sender's name). A request carrying it is always served
/// by the member that receives it, so a request never travels further.
/// (`Regmirror-Hop`; header names are case-insensitive.)
pub const HOP_HEADER: http::HeaderName = http::HeaderName::from_static("regmirror-hop");

/// Names a member on both legs of a request between members. On the
/// request, the member it is meant for: a member that is someone else
/// refuses it with `421 Misdirected Request` and serves nothing (so a
/// swapped `--peer` URL stores nothing on the wrong member). On the answer
/// to a [`HOP_HEADER`] request, the member answering: the sender checks it
/// names the member it meant to ask, and marks a URL that reaches another
/// member, or something that is not a regmirror member at all, down rather
/// than trusting it.
pub const MEMBER_HEADER: http::HeaderName = http::HeaderName::from_static("regmirror-member");

/// One member: its name (unique, stable, hashed for ownership) and the base
/// URL of its registry API (`http://10.0.0.7:5000`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    pub name: String,
    pub url: Url,
}

impl AsRef<str> for Member {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

/// The members one process knows of at a moment, sorted by name, each name
/// once. Every member ranks keys over its view, so members with the same
/// view agree on every owner.
pub type View = Arc<[Member]>;

/// How this process finds its fellow members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberSource {
    /// A fixed list (`--peer NAME=URL`, this member included).
    Static(Vec<Member>),
    /// The ready, non-terminating endpoints of a Kubernetes headless
    /// Service, named by their pod (`[cluster.discovery]`).
    Kubernetes(Discovery),
}

/// Where to discover members in Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// The headless Service whose EndpointSlices list the members.
    pub service: String,
    /// Its namespace; `None`: the pod's own.
    pub namespace: Option<String>,
    /// The endpoint port's name to reach members on; `None`: the only port.
    pub port_name: Option<String>,
}

/// This process as a member of a cluster: its name and where the others are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This member's name, as the others see it in their views.
    pub name: String,
    pub source: MemberSource,
    /// This member's cap in bytes on its own disk, whatever its share of the
    /// cluster's budget (`max_size`); `None`: its share alone.
    pub member_max_size: Option<u64>,
}

/// A static member list from `NAME=URL` texts, sorted by name. Errors name
/// the entry: a missing `=`, an empty or repeated name, a URL that is not
/// `http(s)://host[:port]` without path, query or credentials.
pub fn parse_peers<S: AsRef<str>>(peers: &[S]) -> Result<Vec<Member>, String> {
    let mut members = Vec::with_capacity(peers.len());
    for text in peers {
        // `REGMIRROR_PEERS="a=..., b=..."` reads naturally with spaces.
        let text = text.as_ref().trim();
        let (name, url) = text
            .split_once('=')
            .ok_or_else(|| format!("peer {text:?}: expected NAME=URL"))?;
        if !valid_member_name(name) {
            return Err(format!(
                "peer {text:?}: name must be 1-253 characters of a-z, 0-9, '-' and '.' (a pod name)"
            ));
        }
        let url: Url = url.parse().map_err(|e| match e {
            url::ParseError::RelativeUrlWithoutBase => {
                format!("peer {text:?}: URL must start with http:// or https://")
            }
            e => format!("peer {text:?}: invalid URL: {e}"),
        })?;
        if !matches!(url.scheme(), "http" | "https")
            || url.host_str().is_none()
            || url.path() != "/"
            || url.query().is_some()
            || url.fragment().is_some()
            || !url.username().is_empty()
        {
            return Err(format!(
                "peer {text:?}: URL must be http(s)://host[:port] without path, query or credentials"
            ));
        }
        members.push(Member {
            name: name.to_owned(),
            url,
        });
    }
    members.sort();
    if let Some(w) = members.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(format!("peer {:?} is listed twice", w[0].name));
    }
    // One process has one name: two names at one URL would make that
    // process serve both members' keys while the budget is split for two.
    for (i, a) in members.iter().enumerate() {
        if let Some(b) = members[i + 1..].iter().find(|b| b.url == a.url) {
            return Err(format!(
                "peers {:?} and {:?} have the same URL {}: each member needs its own",
                a.name,
                b.name,
                a.url.as_str().trim_end_matches('/')
            ));
        }
    }
    Ok(members)
}

/// Whether `name` is usable as a member name: what a pod name allows
/// (a DNS subdomain), since StatefulSet members are named by their pods.
pub fn valid_member_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}

/// The changing membership of a cluster as this process sees it.
#[derive(Clone)]
pub struct Membership {
    me: String,
    view: watch::Receiver<View>,
    known: Arc<AtomicBool>,
}

impl Membership {
    /// This process as `me`, with views as `view` publishes them, the first
    /// one already the membership as it is.
    pub fn new(me: String, view: watch::Receiver<View>) -> Self {
        Self {
            me,
            view,
            known: Arc::new(AtomicBool::new(true)),
        }
    }

    /// As [`Membership::new`], but not yet known (its first view is a
    /// placeholder) until the returned flag is set: a discovered membership
    /// before its first complete list. A member fails readiness meanwhile,
    /// so it neither takes traffic while it believes it owns every key nor
    /// skips asking the others for content.
    pub fn unknown(me: String, view: watch::Receiver<View>) -> (Self, Arc<AtomicBool>) {
        let known = Arc::new(AtomicBool::new(false));
        let membership = Self {
            me,
            view,
            known: Arc::clone(&known),
        };
        (membership, known)
    }

    /// Whether the view is the membership as discovered (not a placeholder).
    pub fn is_known(&self) -> bool {
        self.known.load(Ordering::Acquire)
    }

    /// A membership that never changes (`--peer`).
    pub fn fixed(me: String, members: Vec<Member>) -> Self {
        let (_tx, rx) = watch::channel(View::from(members));
        Self::new(me, rx)
    }

    /// This member's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The current view.
    pub fn view(&self) -> View {
        Arc::clone(&self.view.borrow())
    }

    /// A receiver that wakes on every new view (to resize budgets, log
    /// changes, count keys taken over).
    pub fn changes(&self) -> watch::Receiver<View> {
        self.view.clone()
    }
}

/// The membership `config` describes, kept current in the background for
/// a discovered one. Errors: discovery cannot start (no API server access).
pub async fn membership(config: &ClusterConfig) -> anyhow::Result<Membership> {
    match &config.source {
        MemberSource::Static(members) => {
            Ok(Membership::fixed(config.name.clone(), members.clone()))
        }
        MemberSource::Kubernetes(d) => discovery::membership(&config.name, d).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_names_at_one_url_are_refused() {
        let e = parse_peers(&["a=http://127.0.0.1:5000", "b=http://127.0.0.1:5000/"]).unwrap_err();
        assert!(e.contains("same URL http://127.0.0.1:5000"), "{e}");
        assert!(parse_peers(&["a=http://127.0.0.1:5000", "b=http://127.0.0.1:5001"]).is_ok());
    }

    #[test]
    fn a_discovered_membership_is_unknown_until_its_first_list() {
        let (_tx, rx) = watch::channel(View::from(Vec::new()));
        assert!(Membership::new("a".into(), rx.clone()).is_known());
        assert!(Membership::fixed("a".into(), Vec::new()).is_known());
        let (m, known) = Membership::unknown("a".into(), rx);
        assert!(!m.is_known());
        known.store(true, Ordering::Release);
        assert!(m.is_known() && m.clone().is_known());
    }

    #[test]
    fn peers_parse_sorted_and_bad_ones_are_named() {
        let m = parse_peers(&["b=http://127.0.0.1:5001", "a=http://127.0.0.1:5000"]).unwrap();
        assert_eq!(
            m.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(m[0].url.as_str(), "http://127.0.0.1:5000/");
        let spaced = parse_peers(&[" a=http://127.0.0.1:5000", " b=http://127.0.0.1:5001 "]);
        assert_eq!(spaced.unwrap().len(), 2, "spaces around entries");
        for (bad, says) in [
            ("a", "NAME=URL"),
            ("=http://x:1", "name must be"),
            ("A=http://x:1", "name must be"),
            ("a=ftp://x", "URL must be"),
            ("a=http://x:1/v2", "URL must be"),
            ("a=http://u:p@x:1", "URL must be"),
            ("a=not a url", "http:// or https://"),
            ("a=127.0.0.1:1", "http:// or https://"),
            ("a=http://[::1", "invalid URL"),
        ] {
            let e = parse_peers(&[bad]).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = parse_peers(&["a=http://x:1", "a=http://x:2"]).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
    }
}
