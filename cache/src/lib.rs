//! regmirror-cache: a pull-through cache for OCI registries.
//!
//! `route` decides what a request is and which configured upstream it goes
//! to (an `UpstreamId`); `mirror` decides where its bytes come from (`store`
//! on disk, a shared `fill` in flight, or an `upstream`), in one module per
//! kind of content: `mirror::blobs`, `mirror::manifests`, `mirror::tags`
//! (tag freshness and stale serving) and `mirror::listings`; `server` speaks
//! HTTP. `oci` is the distribution spec's vocabulary (names, digests, media
//! types, pagination); `store::usage` indexes what is stored and
//! `store::evict` keeps it within its limits.
//! Every blob body from an upstream, filled or passed through, goes out
//! through `verify`, which releases its last bytes only once they match the
//! digest.

pub mod absorb;
pub mod cluster;
pub mod config;
pub mod error;
pub mod fill;
pub mod flight;
#[doc(hidden)]
pub mod fuzzing;
pub mod listen;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod range;
pub mod read;
pub mod route;
pub mod server;
pub mod store;
pub mod upstream;
pub mod verify;
pub mod zerocopy;

use std::future::Future;
use std::sync::Arc;

pub use config::Config;
pub use error::{Error, Result};

/// Runs the cache on `listener` until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::new());
    let store = store::Store::open_with(&config.storage, config.limits, Arc::clone(&metrics))
        .await
        .map_err(|e| anyhow::anyhow!("cannot open storage {}: {e}", config.storage.display()))?;
    let mut mirror = mirror::Mirror::new(&config, store.clone())?;
    if let Some(c) = &config.cluster {
        let membership = cluster::membership(c).await?;
        let cluster = Arc::new(cluster::Cluster::new(
            membership,
            &config.timeouts,
            metrics,
        )?);
        tracing::info!(
            name = %c.name,
            members = ?cluster.membership().view().iter().map(|m| format!("{}={}", m.name, m.url)).collect::<Vec<_>>(),
            "cache cluster member"
        );
        cluster.spawn_view_gauge();
        // In a cluster `max_size` is the cluster's: this member keeps its share.
        cluster::budget::spawn(
            store.clone(),
            config.limits.max_size,
            c.member_max_size,
            cluster.membership(),
        );
        mirror = mirror.with_cluster(cluster);
    }
    let mirror = Arc::new(mirror);
    let _sweeper = store::evict::spawn(store);
    tracing::info!(
        listen = %listener.local_addr()?,
        storage = %config.storage.display(),
        upstreams = ?config.upstreams.iter().map(|u| format!("{}={}", u.host, u.url)).collect::<Vec<_>>(),
        "regmirror-cache serving"
    );
    let cluster = mirror.cluster().cloned();
    let shutdown = async move {
        shutdown.await;
        if let Some(cluster) = cluster {
            drain(&cluster).await;
        }
    };
    listen::serve(
        listener,
        server::app(mirror),
        shutdown,
        listen::SHUTDOWN_GRACE,
        config.max_connections,
    )
    .await;
    Ok(())
}

/// A cluster member's first step on shutdown: `/readyz` fails, and requests
/// are still served for [`cluster::router::DRAIN`], so that clients and
/// fellow members move away before it stops accepting them (issue 16).
async fn drain(cluster: &cluster::Cluster) {
    cluster.start_draining();
    tracing::info!(drain = ?cluster::router::DRAIN, "draining: not ready, still serving");
    tokio::time::sleep(cluster::router::DRAIN).await;
}
