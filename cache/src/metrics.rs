//! Prometheus metrics, served at `GET /metrics` in the text exposition format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `manifest`, `blob`, `tags`, `referrers`, `catalog`, `base`, `other`
    pub endpoint: String,
    pub method: String,
    pub status: u16,
    /// Upstream host, or empty when the request named none.
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub upstream: String,
    /// `manifest` or `blob`
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamRequestLabels {
    pub upstream: String,
    pub method: String,
    /// HTTP status, or 0 when no response arrived.
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `disk` (stored), `fill` (an upstream fetch in progress), `passthrough`
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// How a handover request went: `hit`, `miss` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// A cluster member's name.
    pub peer: String,
}

/// Every metric the cache exports.
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    pub hits: Family<KindLabels, Counter>,
    pub misses: Family<KindLabels, Counter>,
    pub served_bytes: Family<SourceLabels, Counter>,
    pub upstream_requests: Family<UpstreamRequestLabels, Counter>,
    pub upstream_bytes: Family<UpstreamLabels, Counter>,
    pub upstream_errors: Family<UpstreamLabels, Counter>,
    pub upstream_rate_limited: Family<UpstreamLabels, Counter>,
    pub fill_joins: Counter,
    pub stale_serves: Family<UpstreamLabels, Counter>,
    pub evictions: Family<ReasonLabels, Counter>,
    pub evicted_bytes: Family<ReasonLabels, Counter>,
    pub store_bytes: Gauge,
    pub store_files: Gauge,
    pub store_max_bytes: Gauge,
    pub disk_full_passthrough: Counter,
    /// Blobs fetched and verified whose rename into the store failed: their
    /// clients got them from the open temp file, and the next request
    /// fetches them again.
    pub unstored_blobs: Counter,
    /// Members in this process's view of its cache cluster (0: no cluster).
    pub cluster_members: Gauge,
    /// Requests this member served as the key's owner (hop requests included).
    pub cluster_owner_requests: Counter,
    /// Requests this member sent to another member, by member.
    pub cluster_peer_requests: Family<PeerLabels, Counter>,
    /// Requests to another member that failed (no answer, or its body cut
    /// short), by member.
    pub cluster_peer_errors: Family<PeerLabels, Counter>,
    /// Requests this member served for a key whose owner (and every member
    /// ranked ahead of this one) was down.
    pub cluster_takeovers: Counter,
    /// Requests for stored content only that this member, missing content
    /// it owns, sent to the next-ranked member, by how they went.
    pub cluster_handover: Family<ResultLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
            hits: Family::default(),
            misses: Family::default(),
            served_bytes: Family::default(),
            upstream_requests: Family::default(),
            upstream_bytes: Family::default(),
            upstream_errors: Family::default(),
            upstream_rate_limited: Family::default(),
            fill_joins: Counter::default(),
            stale_serves: Family::default(),
            evictions: Family::default(),
            evicted_bytes: Family::default(),
            store_bytes: Gauge::default(),
            store_files: Gauge::default(),
            store_max_bytes: Gauge::default(),
            disk_full_passthrough: Counter::default(),
            unstored_blobs: Counter::default(),
            cluster_members: Gauge::default(),
            cluster_owner_requests: Counter::default(),
            cluster_peer_requests: Family::default(),
            cluster_peer_errors: Family::default(),
            cluster_takeovers: Counter::default(),
            cluster_handover: Family::default(),
        }
    }

    /// The registry these metrics are encoded from.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("regmirror");
        r.register(
            "http_requests",
            "Registry API requests by endpoint, method, status and upstream",
            self.requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time until response headers, by endpoint",
            self.request_seconds.clone(),
        );
        r.register(
            "cache_hits",
            "Manifests and blobs served from disk",
            self.hits.clone(),
        );
        r.register(
            "cache_misses",
            "Manifests and blobs that needed the upstream",
            self.misses.clone(),
        );
        r.register(
            "served_bytes",
            "Blob bytes sent to clients, by source",
            self.served_bytes.clone(),
        );
        r.register(
            "upstream_requests",
            "Requests sent to upstreams, by status (0: no response)",
            self.upstream_requests.clone(),
        );
        r.register(
            "upstream_bytes",
            "Blob bytes received from upstreams",
            self.upstream_bytes.clone(),
        );
        r.register(
            "upstream_errors",
            "Upstream failures: transport errors, timeouts, 5xx, invalid content",
            self.upstream_errors.clone(),
        );
        r.register(
            "upstream_rate_limited",
            "429 answers from upstreams",
            self.upstream_rate_limited.clone(),
        );
        r.register(
            "fill_joins",
            "Requests that joined a blob fetch already in flight",
            self.fill_joins.clone(),
        );
        r.register(
            "stale_serves",
            "Cached tags served because the upstream failed or was slow",
            self.stale_serves.clone(),
        );
        r.register(
            "evictions",
            "Files evicted, by reason (size, age)",
            self.evictions.clone(),
        );
        r.register(
            "evicted_bytes",
            "Bytes evicted, by reason",
            self.evicted_bytes.clone(),
        );
        r.register(
            "store_bytes",
            "Bytes of content on disk",
            self.store_bytes.clone(),
        );
        r.register(
            "store_files",
            "Content files on disk",
            self.store_files.clone(),
        );
        r.register(
            "store_max_bytes",
            "Configured byte budget (0: unlimited)",
            self.store_max_bytes.clone(),
        );
        r.register(
            "disk_full_passthrough",
            "Blobs streamed from the upstream uncached because the disk or budget was full",
            self.disk_full_passthrough.clone(),
        );
        r.register(
            "unstored_blobs",
            "Verified blobs served from their temp file because the rename into the store failed",
            self.unstored_blobs.clone(),
        );
        r.register(
            "cluster_members",
            "Members in this process's view of its cache cluster (0: no cluster)",
            self.cluster_members.clone(),
        );
        r.register(
            "cluster_owner_requests",
            "Requests served as the key's owner, forwarded ones included",
            self.cluster_owner_requests.clone(),
        );
        r.register(
            "cluster_peer_requests",
            "Requests forwarded to another cluster member, by member",
            self.cluster_peer_requests.clone(),
        );
        r.register(
            "cluster_peer_errors",
            "Requests to another cluster member that got no answer or were cut short, by member",
            self.cluster_peer_errors.clone(),
        );
        r.register(
            "cluster_takeovers",
            "Requests served for a key whose owner was down",
            self.cluster_takeovers.clone(),
        );
        r.register(
            "cluster_handover",
            "Content this member missed asked of the next-ranked member before the upstream, by result (hit, miss, error)",
            self.cluster_handover.clone(),
        );
        r
    }

    pub fn upstream(&self, host: &str) -> UpstreamLabels {
        UpstreamLabels {
            upstream: host.to_owned(),
        }
    }

    pub fn hit(&self, host: &str, kind: &str) {
        self.hits
            .get_or_create(&KindLabels {
                upstream: host.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn miss(&self, host: &str, kind: &str) {
        self.misses
            .get_or_create(&KindLabels {
                upstream: host.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn served(&self, source: &str, bytes: u64) {
        self.served_bytes
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
            })
            .inc_by(bytes);
    }

    pub fn upstream_request(&self, host: &str, method: &str, status: u16) {
        self.upstream_requests
            .get_or_create(&UpstreamRequestLabels {
                upstream: host.to_owned(),
                method: method.to_owned(),
                status,
            })
            .inc();
        if status == 429 {
            self.upstream_rate_limited
                .get_or_create(&self.upstream(host))
                .inc();
        }
        if status == 0 || status >= 500 {
            self.upstream_errors
                .get_or_create(&self.upstream(host))
                .inc();
        }
    }

    /// The exposition text.
    pub fn encode(&self, registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_labelled_counters() {
        let m = Metrics::new();
        let reg = m.registry();
        m.hit("docker.io", "blob");
        m.upstream_request("ghcr.io", "GET", 503);
        m.upstream_request("ghcr.io", "GET", 429);
        let size = ReasonLabels {
            reason: "size".into(),
        };
        m.evicted_bytes.get_or_create(&size).inc_by(42);
        let text = m.encode(&reg);
        assert!(
            text.contains(r#"regmirror_cache_hits_total{upstream="docker.io",kind="blob"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"regmirror_upstream_errors_total{upstream="ghcr.io"} 1"#));
        assert!(text.contains(r#"regmirror_upstream_rate_limited_total{upstream="ghcr.io"} 1"#));
        assert!(text.contains(r#"regmirror_evicted_bytes_total{reason="size"} 42"#));
        assert!(text.ends_with("# EOF\n"));
    }
}
