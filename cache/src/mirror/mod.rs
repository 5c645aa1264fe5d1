//! The cache's behaviour, independent of HTTP: where a request's bytes come
//! from (the store, an in-flight fill, the upstream). Split the way
//! distribution splits its pull-through proxy (`registry/proxy`):
//! - [`blobs`]: blobs, from the store or one shared fill per blob;
//! - [`manifests`]: manifests by digest, fetched once and verified;
//! - [`tags`]: tags, their freshness and stale serving ([`tags::TagCache`]);
//! - [`listings`]: the catalog and the listings relayed from the upstream.

pub mod blobs;
pub mod handover;
pub mod listings;
pub mod manifests;
pub mod tags;

use std::sync::Arc;

use crate::cluster::Cluster;
use crate::config::{Config, Timeouts};
use crate::error::Result;
use crate::fill::Fills;
use crate::flight::Flights;
use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::route::UpstreamId;
use crate::store::{Store, StoredManifest};
use crate::upstream::{self, Upstream};

pub use blobs::Blob;
pub use listings::Relayed;
use tags::TagCache;

/// The pull-through cache: every configured upstream, the store, and the
/// work in flight that requests share.
pub struct Mirror {
    /// The configured upstreams in order: `upstreams[id.index()]` is the one
    /// a request routed to `id` goes to.
    upstreams: Vec<Upstream>,
    store: Store,
    fills: Arc<Fills>,
    manifest_flights: Flights<(UpstreamId, Digest), StoredManifest>,
    tags: TagCache,
    timeouts: Timeouts,
    max_manifest_size: u64,
    metrics: Arc<Metrics>,
    registry: prometheus_client::registry::Registry,
    /// The cache cluster this process is a member of; `None`: on its own.
    cluster: Option<Arc<Cluster>>,
}

impl Mirror {
    /// A mirror of `config`'s upstreams over `store`, sharing one HTTP client.
    /// Fails only when the HTTP client cannot be built (see
    /// [`upstream::build_client`]: no CA certificates for an https upstream).
    pub fn new(config: &Config, store: Store) -> Result<Self> {
        let client = upstream::build_client(&config.timeouts, &config.upstreams)?;
        let metrics = Arc::clone(store.metrics());
        let registry = metrics.registry();
        Ok(Self {
            upstreams: config
                .upstreams
                .iter()
                .map(|u| {
                    Upstream::new(
                        u.clone(),
                        client.clone(),
                        config.credentials.clone(),
                        Arc::clone(&metrics),
                    )
                })
                .collect(),
            store,
            fills: Arc::default(),
            manifest_flights: Flights::default(),
            tags: TagCache::default(),
            timeouts: config.timeouts.clone(),
            max_manifest_size: config.max_manifest_size,
            metrics,
            registry,
            cluster: None,
        })
    }

    /// This mirror as a member of `cluster` (see [`crate::cluster`]).
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// The cache cluster this process is a member of, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The metrics every part of the cache counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The `/metrics` exposition, with the store gauges brought up to date.
    pub fn metrics_text(&self) -> String {
        let usage = self.store.usage();
        self.metrics.store_bytes.set(usage.stored_bytes() as i64);
        self.metrics.store_files.set(usage.files() as i64);
        self.metrics.encode(&self.registry)
    }

    /// The configured upstreams in order, for [`crate::route::route`].
    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    /// The upstream a request was routed to.
    ///
    /// Panics for an id routed against another configuration.
    pub fn upstream(&self, id: UpstreamId) -> &Upstream {
        &self.upstreams[id.index()]
    }

    /// The canonical host of the upstream `id`: its name in the store, the
    /// logs and the metrics.
    fn host(&self, id: UpstreamId) -> &str {
        self.upstream(id).host()
    }

    /// The store on disk.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// A header's value, if it is present and visible ASCII.
fn header_str(h: &http::HeaderMap, name: impl http::header::AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}
