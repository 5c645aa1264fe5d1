//! The operator's view of the nodes (issue 17): reflector stores of the
//! Nodes and of the node agents' reports (`RegistryMirrorNode`), each filled
//! by one watch with backoff, and the reconciles their changes are worth, at
//! a bounded rate ([`throttled`]). What a change is worth is decided by
//! [`crate::node_status`]: a report's entries, a Node's existence, labels
//! and taints; heartbeats and Node status updates trigger nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::crd::RegistryMirror;
use crate::node_report::RegistryMirrorNode;
use crate::node_status;
use crate::quiet::{FailureLog, Say};

/// At most one reconcile per mirror per this long is triggered by reports
/// and Nodes: a rollout of agents on 200 nodes becomes a handful of status
/// writes, not 200.
pub const AGGREGATE_EVERY: Duration = Duration::from_secs(2);

/// The stores the status is aggregated from.
#[derive(Clone)]
pub struct NodeViews {
    /// Every Node (labels, taints, uid; status dropped).
    pub nodes: Store<Node>,
    /// Every node agent's report.
    pub reports: Store<RegistryMirrorNode>,
    /// Whether each store has been listed once: Nodes, reports.
    listed: Arc<[AtomicBool; 2]>,
}

impl NodeViews {
    /// Whether both stores have been listed: before, nothing may be
    /// concluded from them (a node configuration is not absent because it
    /// has not been read).
    pub fn ready(&self) -> bool {
        self.listed.iter().all(|l| l.load(Ordering::Relaxed))
    }

    /// Stores holding `nodes` and `reports`, listed (for tests and tools
    /// that aggregate without watching).
    pub fn of(nodes: Vec<Node>, reports: Vec<RegistryMirrorNode>) -> Self {
        fn filled<K>(objects: Vec<K>) -> Store<K>
        where
            K: Resource<DynamicType = ()> + Clone + 'static,
        {
            let mut writer = Writer::default();
            writer.apply_watcher_event(&watcher::Event::Init);
            for o in objects {
                writer.apply_watcher_event(&watcher::Event::InitApply(o));
            }
            writer.apply_watcher_event(&watcher::Event::InitDone);
            writer.as_reader()
        }
        Self {
            nodes: filled(nodes),
            reports: filled(reports),
            listed: Arc::new([AtomicBool::new(true), AtomicBool::new(true)]),
        }
    }
}

/// What a change is worth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// Reconcile these mirrors (by name).
    Mirrors(Vec<String>),
    /// Reconcile every mirror (a Node's selection changed; a store was listed).
    All,
}

/// Starts the two watches (tasks that run for the life of the process) and
/// returns the stores with the triggers their changes produce.
pub fn start(client: &Client) -> (NodeViews, mpsc::UnboundedReceiver<Trigger>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let listed = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
    let (nodes, node_writer) = reflector::store::<Node>();
    let (reports, report_writer) = reflector::store::<RegistryMirrorNode>();
    {
        let (tx, listed) = (tx.clone(), listed.clone());
        let api = Api::<Node>::all(client.clone());
        tokio::spawn(async move {
            let slim_node = |n: &mut Node| {
                slim(n);
                n.status = None;
            };
            watch(
                api,
                node_writer,
                slim_node,
                &listed[0],
                &tx,
                "Nodes",
                |old, new| node_status::selection_changed(old, new).then_some(Trigger::All),
            )
            .await
        });
    }
    {
        let listed = listed.clone();
        let api = Api::<RegistryMirrorNode>::all(client.clone());
        tokio::spawn(async move {
            watch(
                api,
                report_writer,
                slim,
                &listed[1],
                &tx,
                "node reports (RegistryMirrorNodes)",
                |old, new| {
                    let changed = node_status::changed_entries(old, new);
                    (!changed.is_empty()).then_some(Trigger::Mirrors(changed))
                },
            )
            .await
        });
    }
    (
        NodeViews {
            nodes,
            reports,
            listed,
        },
        rx,
    )
}

/// Drops what the aggregation never reads (a Node's status with its images
/// and conditions, every object's managed fields), to keep the stores small.
fn slim<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
    object.meta_mut().annotations = None;
}

/// Keeps `writer`'s store in line with the API server's objects of `api`
/// (less what `strip` drops) and sends what each change is worth (`worth(old, new)`, `None` for a
/// deleted object; [`Trigger::All`] once listed). Backs off with
/// kube-runtime's `DefaultBackoff` (client-go's reflector parameters) and
/// logs a repeating failure once a minute ([`FailureLog`]).
async fn watch<K>(
    api: Api<K>,
    mut writer: Writer<K>,
    strip: fn(&mut K),
    listed: &AtomicBool,
    tx: &mpsc::UnboundedSender<Trigger>,
    what: &str,
    worth: impl Fn(Option<&K>, Option<&K>) -> Option<Trigger>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let store = writer.as_reader();
    // `Init` comes before each (re-)list is even tried, and the backoff
    // resets on any `Ok`: filtered out (as in the node agent) so a failing
    // list backs off; the store's buffer is started at a list's first object.
    let events = watcher(api, watcher::Config::default())
        .modify(strip)
        .filter(|e| std::future::ready(!matches!(e, Ok(watcher::Event::Init))))
        .default_backoff();
    let mut events = std::pin::pin!(events);
    let mut listing = false;
    let mut failures = FailureLog::default();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                listing = false;
                if let Some(Say::Failure { suppressed }) =
                    failures.failure(&e.to_string(), Instant::now())
                {
                    tracing::warn!(error = %e, suppressed, "cannot watch {what}; retrying");
                }
                continue;
            }
        };
        if let Some(Say::Recovered { failures, .. }) = failures.success(Instant::now()) {
            tracing::info!(failures, "watching {what} works again");
        }
        if matches!(
            event,
            watcher::Event::InitApply(_) | watcher::Event::InitDone
        ) && !listing
        {
            writer.apply_watcher_event(&watcher::Event::Init);
            listing = true;
        }
        let trigger = match &event {
            watcher::Event::Apply(o) => {
                let old = store.get(&ObjectRef::from_obj(o));
                worth(old.as_deref(), Some(o))
            }
            watcher::Event::Delete(o) => worth(Some(o), None),
            watcher::Event::InitDone => {
                listing = false;
                listed.store(true, Ordering::Relaxed);
                Some(Trigger::All)
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => None,
        };
        writer.apply_watcher_event(&event);
        if let Some(t) = trigger {
            let _ = tx.send(t);
        }
    }
}

/// The mirrors `triggers` name (every mirror in `mirrors` for
/// [`Trigger::All`]), each at most once per `every`: the first trigger after
/// a quiet `every` at once, later ones gathered until `every` after the last
/// batch. Ends when `triggers` ends.
pub fn throttled(
    triggers: mpsc::UnboundedReceiver<Trigger>,
    mirrors: Store<RegistryMirror>,
    every: Duration,
) -> impl Stream<Item = ObjectRef<RegistryMirror>> + Send + 'static {
    struct State {
        rx: mpsc::UnboundedReceiver<Trigger>,
        mirrors: Store<RegistryMirror>,
        last: Option<tokio::time::Instant>,
        ready: std::vec::IntoIter<ObjectRef<RegistryMirror>>,
    }
    let state = State {
        rx: triggers,
        mirrors,
        last: None,
        ready: Vec::new().into_iter(),
    };
    futures::stream::unfold(state, move |mut s| async move {
        loop {
            if let Some(r) = s.ready.next() {
                return Some((r, s));
            }
            let first = s.rx.recv().await?;
            if let Some(last) = s.last {
                tokio::time::sleep_until(last + every).await;
            }
            let mut all = false;
            let mut names = BTreeSet::new();
            let mut take = |t: Trigger| match t {
                Trigger::All => all = true,
                Trigger::Mirrors(m) => names.extend(m),
            };
            take(first);
            while let Ok(t) = s.rx.try_recv() {
                take(t);
            }
            if all {
                names.extend(s.mirrors.state().iter().map(|m| m.name_any()));
            }
            s.last = Some(tokio::time::Instant::now());
            s.ready = names
                .iter()
                .map(|n| ObjectRef::new(n))
                .collect::<Vec<_>>()
                .into_iter();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(refs: &[ObjectRef<RegistryMirror>]) -> Vec<String> {
        refs.iter().map(|r| r.name.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn triggers_are_gathered_and_each_mirror_reconciled_at_a_bounded_rate() {
        let (tx, rx) = mpsc::unbounded_channel();
        let views_mirrors = {
            let mut w = Writer::<RegistryMirror>::default();
            for n in ["a", "b"] {
                let m = RegistryMirror::new(
                    n,
                    serde_json::from_value(serde_json::json!({"upstreams": [{"host": "x.io"}]}))
                        .unwrap(),
                );
                w.apply_watcher_event(&watcher::Event::Apply(m));
            }
            w.as_reader()
        };
        let out = throttled(rx, views_mirrors, Duration::from_secs(2));
        let mut out = std::pin::pin!(out);
        let start = tokio::time::Instant::now();
        tx.send(Trigger::Mirrors(vec!["a".into()])).unwrap();
        let first = out.next().await.unwrap();
        assert_eq!(first.name, "a");
        assert_eq!(start.elapsed(), Duration::ZERO, "the first at once");
        // A burst within the period: one batch, each mirror once, after it.
        for _ in 0..50 {
            tx.send(Trigger::Mirrors(vec!["a".into(), "b".into()]))
                .unwrap();
        }
        let batch = vec![out.next().await.unwrap(), out.next().await.unwrap()];
        assert_eq!(names(&batch), ["a", "b"]);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        tx.send(Trigger::All).unwrap();
        let batch = vec![out.next().await.unwrap(), out.next().await.unwrap()];
        assert_eq!(names(&batch), ["a", "b"]);
        assert_eq!(start.elapsed(), Duration::from_secs(4));
        drop(tx);
        assert!(out.next().await.is_none());
    }

    #[test]
    fn views_of_objects_are_listed() {
        let v = NodeViews::of(
            vec![serde_json::from_value(serde_json::json!({"metadata": {"name": "n1"}})).unwrap()],
            vec![],
        );
        assert!(v.ready());
        assert_eq!(v.nodes.state().len(), 1);
    }
}
