//! Operator metrics and the HTTP endpoints: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub mirror: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub mirror: String,
    pub error: String,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<MirrorLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub leader: Gauge,
    /// Set once this process has started its controller or is standing by for the lease.
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("regmirror_operator");
        let reconciles = Family::<MirrorLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciliations of a RegistryMirror",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations of a RegistryMirror, by error kind",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent reconciling one RegistryMirror",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 when this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn observe(&self, mirror: &str, took: Duration, error: Option<&str>) {
        let m = MirrorLabels {
            mirror: mirror.into(),
        };
        self.reconciles.get_or_create(&m).inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(e) = error {
            self.errors
                .get_or_create(&ErrorLabels {
                    mirror: mirror.into(),
                    error: e.into(),
                })
                .inc();
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

pub fn app(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(metrics)
}

async fn metrics_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn ready_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(app: Router, path: &str) -> (StatusCode, String) {
        let resp = app
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn endpoints_report_health_and_counts() {
        let m = Arc::new(Metrics::default());
        m.observe("hub", Duration::from_millis(20), None);
        m.observe("hub", Duration::from_millis(20), Some("kube"));
        let (s, _) = get(app(m.clone()), "/healthz").await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = get(app(m.clone()), "/readyz").await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        m.ready.store(true, Ordering::Relaxed);
        let (s, _) = get(app(m.clone()), "/readyz").await;
        assert_eq!(s, StatusCode::OK);
        let (s, body) = get(app(m), "/metrics").await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            body.contains(r#"regmirror_operator_reconciles_total{mirror="hub"} 2"#),
            "{body}"
        );
        assert!(
            body.contains(
                r#"regmirror_operator_reconcile_errors_total{mirror="hub",error="kube"} 1"#
            )
        );
        assert!(body.contains("regmirror_operator_reconcile_duration_seconds_count 2"));
    }
}
