//! Membership from a Kubernetes headless Service's EndpointSlices.
//!
//! The EndpointSlice controller lists a Service's pods in slices labelled
//! `kubernetes.io/service-name=<service>`; a kube-runtime watcher keeps them
//! here, and every change is turned into a [`View`] by [`view_from_slices`]:
//! the ready, non-terminating endpoints, named by their pod (`targetRef`).
//! The cache's ServiceAccount needs `get`, `list` and `watch` on
//! `endpointslices` in the Service's namespace, nothing more.
//!
//! The view always holds this member itself, listed by the slices or not.
//! A member that is not ready yet, or is draining after SIGTERM, is left out
//! of its slices (the headless Service does not publish not-ready
//! addresses), yet it still gets requests (a hop request from a member with
//! an older view, a client connected before it turned unready) and must
//! divide the budget by at least one: ranking over a view without itself
//! would forward every key away, and an empty view would rank no owner at
//! all. So it serves the keys it ranks first for itself; the others do not
//! route to it until it is ready, so at worst a key is fetched once more
//! while the views differ (issue 16, test 7). Its own URL is never dialled
//! by itself (a member serves its own keys locally), so until a slice names
//! it, it stands in as [`SELF_URL`].

use std::collections::{BTreeMap, HashMap};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use url::Url;

use super::{Discovery, Member, Membership, View};

/// Label the EndpointSlice controller puts on a Service's slices.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Where a pod finds its own namespace.
pub const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// Test-only: `ADDR=HOST:PORT,...` maps an endpoint address to the loopback
/// address a test member listens on (the API server refuses loopback
/// endpoint addresses, so tests publish pod IPs and map them back).
pub const TEST_PEER_ADDRESSES_ENV: &str = "REGMIRROR_TEST_PEER_ADDRESSES";
/// This member's URL while no slice names it; never dialled (see the module docs).
pub const SELF_URL: &str = "http://localhost/";

/// The membership `me` sees through `discovery`, kept current in the
/// background by an EndpointSlice watcher that retries with kube-runtime's
/// default backoff. The first view is `me` alone; the watcher's first list
/// replaces it within moments. Errors: no Kubernetes client configuration
/// (neither in-cluster nor `KUBECONFIG`), no namespace to watch, or a bad
/// [`TEST_PEER_ADDRESSES_ENV`].
pub async fn membership(me: &str, discovery: &Discovery) -> anyhow::Result<Membership> {
    let client = Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "member {me}: no Kubernetes API access for discovery through Service {:?}: {e}",
            discovery.service
        )
    })?;
    let namespace = match &discovery.namespace {
        Some(ns) => ns.clone(),
        None => match std::fs::read_to_string(NAMESPACE_FILE) {
            Ok(ns) if !ns.trim().is_empty() => ns.trim().to_owned(),
            // Outside a pod: the client configuration's namespace.
            _ => client.default_namespace().to_owned(),
        },
    };
    let addresses = match std::env::var(TEST_PEER_ADDRESSES_ENV) {
        Ok(text) => parse_address_map(&text).map_err(|e| anyhow::anyhow!("{e}"))?,
        Err(_) => HashMap::new(),
    };
    let watched = Watched {
        me: me.to_owned(),
        port_name: discovery.port_name.clone(),
        addresses,
    };
    let (tx, rx) = watch::channel(watched.view(&[]));
    let (membership, known) = Membership::unknown(me.to_owned(), rx);
    // Without an API server at start a member would never be ready: after
    // a while it serves on the view it has (itself), as a lone cache would.
    let fallback = std::sync::Arc::clone(&known);
    let member = me.to_owned();
    tokio::spawn(async move {
        tokio::time::sleep(FIRST_LIST_WAIT).await;
        if !fallback.swap(true, std::sync::atomic::Ordering::AcqRel) {
            tracing::warn!(%member, wait = ?FIRST_LIST_WAIT, "no EndpointSlice list yet; ready on the view so far (this member alone), fellow members join it when the list comes");
        }
    });
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config =
        watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", discovery.service));
    tracing::info!(member = me, service = %discovery.service, %namespace, "discovering members from EndpointSlices");
    tokio::spawn(watch_slices(api, config, watched, tx, known));
    Ok(membership)
}

/// How long a member stays unready waiting for its first EndpointSlice
/// list (see [`Membership::unknown`]).
pub const FIRST_LIST_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What turns slices into a view for this member.
struct Watched {
    me: String,
    port_name: Option<String>,
    addresses: HashMap<String, String>,
}

impl Watched {
    fn view(&self, slices: &[&EndpointSlice]) -> View {
        view_from_slices(&self.me, self.port_name.as_deref(), &self.addresses, slices)
    }
}

/// Follows the slices until every receiver of the view is gone, publishing
/// each view that differs from the last.
async fn watch_slices(
    api: Api<EndpointSlice>,
    config: watcher::Config,
    watched: Watched,
    tx: watch::Sender<View>,
    known: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    // Slices by name; during a relist the new set is gathered apart and
    // swapped in whole, so a relist never shows a half view.
    let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    let mut relisting: Option<BTreeMap<String, EndpointSlice>> = None;
    let mut failing: Option<String> = None;
    let mut events = watcher(api, config).default_backoff().boxed();
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            () = tx.closed() => return,
        };
        let Some(event) = event else { return };
        let (changed, listed) = match event {
            Ok(event) => {
                if let Some(what) = failing.take() {
                    tracing::info!(member = %watched.me, "watching EndpointSlices again (after: {what})");
                }
                let listed = matches!(event, watcher::Event::InitDone);
                (apply_event(&mut slices, &mut relisting, event), listed)
            }
            Err(e) => {
                // A repeating failure is logged once at warn and then only
                // at debug (the backoff spaces the retries); a different one
                // at once, the recovery once.
                let what = e.to_string();
                if failing.as_deref() == Some(what.as_str()) {
                    tracing::debug!(member = %watched.me, error = %what, "watching EndpointSlices failed again; retrying");
                } else {
                    tracing::warn!(member = %watched.me, error = %what, "watching EndpointSlices failed; keeping the last view, retrying with backoff");
                    failing = Some(what);
                }
                (false, false)
            }
        };
        if changed {
            publish(&watched, &slices, &tx);
        }
        if listed {
            // The view just published is the membership as listed.
            known.store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

/// Sends the view `slices` make, if it differs from the last, and logs it.
fn publish(watched: &Watched, slices: &BTreeMap<String, EndpointSlice>, tx: &watch::Sender<View>) {
    let view = watched.view(&slices.values().collect::<Vec<_>>());
    let sent = tx.send_if_modified(|current| {
        let new = *current != view;
        if new {
            *current = view.clone();
        }
        new
    });
    if sent {
        let names: Vec<&str> = view.iter().map(|m| m.name.as_str()).collect();
        tracing::info!(member = %watched.me, members = names.len(), "cluster members: {}", names.join(","));
    }
}

/// Applies one watcher event to the slices by name; returns whether the
/// set of slices may have changed (so the view is recomputed).
fn apply_event(
    slices: &mut BTreeMap<String, EndpointSlice>,
    relisting: &mut Option<BTreeMap<String, EndpointSlice>>,
    event: watcher::Event<EndpointSlice>,
) -> bool {
    let key = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
    match event {
        watcher::Event::Apply(s) => {
            slices.insert(key(&s), s);
            true
        }
        watcher::Event::Delete(s) => slices.remove(&key(&s)).is_some(),
        watcher::Event::Init => {
            *relisting = Some(BTreeMap::new());
            false
        }
        watcher::Event::InitApply(s) => {
            relisting
                .get_or_insert_with(BTreeMap::new)
                .insert(key(&s), s);
            false
        }
        watcher::Event::InitDone => {
            *slices = relisting.take().unwrap_or_default();
            true
        }
    }
}

/// The view `me` has from a Service's EndpointSlices: every endpoint whose
/// `conditions.ready` is true and `conditions.terminating` is not (an unset
/// condition counts as ready and not terminating, as the EndpointSlice API
/// documents: "nil should be interpreted as true/false"), named by its
/// `targetRef.name` (the pod; endpoints without one are skipped), at
/// `http://<address>:<port>` (the first address; `port` the slice's port
/// named `port_name`, else its only port; a slice without that port is
/// skipped). `addresses` maps an endpoint address to `HOST:PORT` (tests).
/// Slices of all address types are merged; a name seen twice keeps its
/// lowest URL. Sorted by name, and `me` is always in it (with [`SELF_URL`]
/// when no slice names it; see the module docs for why).
pub fn view_from_slices(
    me: &str,
    port_name: Option<&str>,
    addresses: &HashMap<String, String>,
    slices: &[&EndpointSlice],
) -> View {
    let mut members: BTreeMap<String, Url> = BTreeMap::new();
    for slice in slices {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let port = match port_name {
            Some(name) => ports.iter().find(|p| p.name.as_deref() == Some(name)),
            None if ports.len() == 1 => ports.first(),
            None => None,
        };
        let Some(port) = port.and_then(|p| p.port) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            if !conditions.ready.unwrap_or(true) || conditions.terminating.unwrap_or(false) {
                continue;
            }
            let Some(name) = endpoint.target_ref.as_ref().and_then(|r| r.name.clone()) else {
                continue;
            };
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let authority = match addresses.get(address) {
                Some(mapped) => mapped.clone(),
                None if address.contains(':') => format!("[{address}]:{port}"),
                None => format!("{address}:{port}"),
            };
            let Ok(url) = Url::parse(&format!("http://{authority}")) else {
                continue;
            };
            match members.get(&name) {
                Some(known) if *known <= url => {}
                _ => {
                    members.insert(name, url);
                }
            }
        }
    }
    if !members.contains_key(me) {
        members.insert(
            me.to_owned(),
            Url::parse(SELF_URL).expect("a valid constant"),
        );
    }
    members
        .into_iter()
        .map(|(name, url)| Member { name, url })
        .collect()
}

/// [`TEST_PEER_ADDRESSES_ENV`]'s `ADDR=HOST:PORT,...` as a map. Errors
/// name the entry that is not `ADDR=HOST:PORT`.
pub fn parse_address_map(text: &str) -> Result<HashMap<String, String>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|entry| {
            let (addr, target) = entry
                .split_once('=')
                .filter(|(a, t)| !a.is_empty() && t.rsplit_once(':').is_some())
                .ok_or_else(|| {
                    format!("{TEST_PEER_ADDRESSES_ENV}: {entry:?} is not ADDR=HOST:PORT")
                })?;
            Ok((addr.to_owned(), target.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(name: &str, ports: serde_json::Value, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn endpoint(pod: &str, address: &str, conditions: serde_json::Value) -> serde_json::Value {
        json!({
            "addresses": [address],
            "conditions": conditions,
            "targetRef": {"kind": "Pod", "name": pod},
        })
    }

    fn names_urls(view: &View) -> Vec<(String, String)> {
        view.iter()
            .map(|m| (m.name.clone(), m.url.to_string()))
            .collect()
    }

    #[test]
    fn ready_non_terminating_endpoints_of_all_slices_sorted_with_me() {
        let port = json!([{"name": "registry", "port": 5000}]);
        let a = slice(
            "svc-a",
            port.clone(),
            json!([
                endpoint("c-2", "10.0.0.12", json!({"ready": true})),
                endpoint("c-0", "10.0.0.10", json!({})),
                endpoint("c-5", "10.0.0.15", json!({"ready": false})),
                endpoint("c-6", "10.0.0.16", json!({"ready": true, "terminating": true})),
                {"addresses": ["10.0.0.17"], "conditions": {"ready": true}},
            ]),
        );
        let b = slice(
            "svc-b",
            port,
            json!([
                endpoint(
                    "c-1",
                    "10.0.0.11",
                    json!({"ready": true, "terminating": false})
                ),
                // The same pod in a second slice: listed once.
                endpoint("c-2", "10.0.0.12", json!({"ready": true})),
            ]),
        );
        let view = view_from_slices("c-1", Some("registry"), &HashMap::new(), &[&a, &b]);
        assert_eq!(
            names_urls(&view),
            [
                ("c-0".into(), "http://10.0.0.10:5000/".into()),
                ("c-1".into(), "http://10.0.0.11:5000/".into()),
                ("c-2".into(), "http://10.0.0.12:5000/".into()),
            ]
        );
    }

    #[test]
    fn me_is_in_the_view_even_when_no_slice_lists_me() {
        let s = slice(
            "svc",
            json!([{"port": 5000}]),
            json!([endpoint("c-0", "10.0.0.10", json!({"ready": true}))]),
        );
        let view = view_from_slices("c-1", None, &HashMap::new(), &[&s]);
        assert_eq!(
            names_urls(&view),
            [
                ("c-0".into(), "http://10.0.0.10:5000/".into()),
                ("c-1".into(), SELF_URL.into()),
            ]
        );
        assert_eq!(
            names_urls(&view_from_slices("c-1", None, &HashMap::new(), &[])),
            [("c-1".into(), SELF_URL.into())]
        );
    }

    #[test]
    fn the_port_is_the_named_one_or_the_only_one() {
        let two = json!([{"name": "metrics", "port": 9090}, {"name": "registry", "port": 5001}]);
        let eps = json!([endpoint("c-0", "fd00::a", json!({}))]);
        let s = slice("svc", two, eps.clone());
        let view = view_from_slices("me", Some("registry"), &HashMap::new(), &[&s]);
        assert_eq!(view[0].url.as_str(), "http://[fd00::a]:5001/");
        // Two ports and no name: ambiguous, the slice is skipped.
        assert_eq!(
            view_from_slices("me", None, &HashMap::new(), &[&s]).len(),
            1
        );
        // A name the slice does not have: skipped too.
        let one = slice("svc", json!([{"name": "http", "port": 80}]), eps);
        assert_eq!(
            view_from_slices("me", Some("registry"), &HashMap::new(), &[&one]).len(),
            1
        );
    }

    #[test]
    fn test_addresses_map_endpoints_to_loopback() {
        let map = parse_address_map("10.0.0.10=127.0.0.1:41000, 10.0.0.11=[::1]:41001").unwrap();
        let s = slice(
            "svc",
            json!([{"port": 5000}]),
            json!([
                endpoint("c-0", "10.0.0.10", json!({})),
                endpoint("c-1", "10.0.0.11", json!({})),
                endpoint("c-2", "10.0.0.12", json!({})),
            ]),
        );
        assert_eq!(
            names_urls(&view_from_slices("c-0", None, &map, &[&s])),
            [
                ("c-0".into(), "http://127.0.0.1:41000/".into()),
                ("c-1".into(), "http://[::1]:41001/".into()),
                ("c-2".into(), "http://10.0.0.12:5000/".into()),
            ]
        );
        for bad in ["10.0.0.1", "=127.0.0.1:1", "10.0.0.1=localhost"] {
            let e = parse_address_map(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("ADDR=HOST:PORT"), "{e}");
        }
        assert!(parse_address_map("").unwrap().is_empty());
    }

    #[test]
    fn a_relist_replaces_the_slices_at_once_and_deletes_remove() {
        let s = |n: &str| slice(n, json!([{"port": 1}]), json!([]));
        let mut slices = BTreeMap::new();
        let mut relisting = None;
        assert!(apply_event(
            &mut slices,
            &mut relisting,
            watcher::Event::Apply(s("a"))
        ));
        assert!(apply_event(
            &mut slices,
            &mut relisting,
            watcher::Event::Apply(s("b"))
        ));
        assert!(!apply_event(
            &mut slices,
            &mut relisting,
            watcher::Event::Init
        ));
        assert!(!apply_event(
            &mut slices,
            &mut relisting,
            watcher::Event::InitApply(s("c"))
        ));
        assert_eq!(
            slices.len(),
            2,
            "the old set stays until the relist is done"
        );
        assert!(apply_event(
            &mut slices,
            &mut relisting,
            watcher::Event::InitDone
        ));
        assert_eq!(slices.keys().collect::<Vec<_>>(), ["c"]);
        assert!(apply_event(
            &mut slices,
            &mut relisting,
            watcher::Event::Delete(s("c"))
        ));
        assert!(!apply_event(
            &mut slices,
            &mut relisting,
            watcher::Event::Delete(s("c"))
        ));
        assert!(slices.is_empty());
    }
}
