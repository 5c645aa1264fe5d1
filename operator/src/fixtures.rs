//! A mocked API server for reconcile tests, after kube-rs controller-rs's
//! `fixtures.rs`: a test names the calls it expects, in order, and what each
//! is answered; a call out of order fails the test, and [`ApiServer::done`]
//! fails if the reconcile made any call the test did not expect.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector;
use kube::{Client, Resource};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

use kube::runtime::controller::Action;

use crate::controller::{self, Context, Error, FINALIZER};
use crate::crd::{NodeState, RegistryMirror};
use crate::metrics::Metrics;
use crate::node_report::RegistryMirrorNode;
use crate::node_watch::NodeViews;
use crate::resources::Settings;
use k8s_openapi::api::core::v1::Node;

/// The namespace of the children in these tests.
pub const NS: &str = "regmirror-system";

/// The mocked API server's side of a client.
pub struct ApiServer(Handle<Request<Body>, Response<Body>>);

/// One call the operator made.
#[derive(Debug)]
pub struct Call {
    pub method: Method,
    /// Path without the query.
    pub path: String,
    pub query: String,
    /// `application/json` or the apply patch type.
    pub content_type: String,
    /// The body as JSON; `Null` when empty.
    pub body: Value,
}

/// One node `n1` whose agent reports [`mirror`] `hub` Configured.
pub fn one_node_configured() -> NodeViews {
    nodes_reporting(&[("n1", NodeState::Configured)])
}

/// Nodes, each with a report of [`mirror`] `hub` (uid `uid-hub`) in the
/// given state.
pub fn nodes_reporting(nodes: &[(&str, NodeState)]) -> NodeViews {
    let node = |name: &str| -> Node {
        serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
    };
    let report = |name: &str, state: NodeState| -> RegistryMirrorNode {
        serde_json::from_value(json!({
            "apiVersion": "regmirror.dev/v1alpha1", "kind": "RegistryMirrorNode",
            "metadata": {"name": name},
            "spec": {"nodeName": name},
            "status": {"mirrors": [{"mirror": "hub", "uid": "uid-hub", "state": state,
                                     "configDir": "/etc/containerd/certs.d"}]},
        }))
        .unwrap()
    };
    NodeViews::of(
        nodes.iter().map(|(n, _)| node(n)).collect(),
        nodes.iter().map(|(n, s)| report(n, *s)).collect(),
    )
}

/// A context whose client talks to the returned mocked API server, with an
/// empty store of mirrors (so no host conflicts) and the Nodes and reports
/// of `views`.
pub fn context_seeing(views: NodeViews) -> (Arc<Context>, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (store, _writer) = reflector::store();
    let reporter = Reporter {
        controller: "regmirror-operator".into(),
        instance: None,
    };
    let ctx = Context::new(
        client.clone(),
        settings(),
        Recorder::new(client, reporter),
        Arc::new(Metrics::default()),
        store,
        views,
    );
    (Arc::new(ctx), ApiServer(handle))
}

/// Operator settings with the children in [`NS`].
pub fn settings() -> Settings {
    Settings {
        namespace: NS.into(),
        cache_image: "regmirror/cache:test".into(),
        agent_image: "regmirror/operator:test".into(),
        agent_host_dirs: vec!["/etc/containerd".into()],
        agent_daemon_set: "regmirror-agent".into(),
        kubernetes_service: None,
    }
}

/// Runs one [`controller::reconcile`] of `mirror` while `script` plays the API
/// server, then checks that no call was left unanswered by the script. Fails
/// after 5 s (a call the script waits for never came).
pub async fn reconcile<F>(
    mirror: RegistryMirror,
    script: impl FnOnce(ApiServer) -> F,
) -> Result<Action, Error>
where
    F: Future<Output = ApiServer>,
{
    reconcile_seeing(mirror, one_node_configured(), script).await
}

/// [`reconcile`] with the Nodes and reports of `views`.
pub async fn reconcile_seeing<F>(
    mirror: RegistryMirror,
    views: NodeViews,
    script: impl FnOnce(ApiServer) -> F,
) -> Result<Action, Error>
where
    F: Future<Output = ApiServer>,
{
    let (ctx, server) = context_seeing(views);
    // `ctx` (and so every client) is dropped when the reconcile returns.
    // Boxed: the reconcile future is large, and a test thread has 2 MiB of stack.
    let work = Box::pin(controller::reconcile(Arc::new(mirror), ctx));
    let limit = Duration::from_secs(5);
    let (result, server) =
        tokio::time::timeout(limit, async { tokio::join!(work, script(server)) })
            .await
            .expect("the reconcile and the expected calls finish");
    tokio::time::timeout(limit, server.done())
        .await
        .expect("the client is dropped after the reconcile");
    result
}

/// A mirror `hub` of docker.io as read from the API server (name, uid,
/// generation), carrying the finalizer when `finalized`.
pub fn mirror(finalized: bool) -> RegistryMirror {
    let mut m = RegistryMirror::new(
        "hub",
        serde_json::from_value(json!({"upstreams": [{"host": "docker.io"}]})).unwrap(),
    );
    m.metadata.uid = Some("uid-hub".into());
    m.metadata.generation = Some(1);
    if finalized {
        m.metadata.finalizers = Some(vec![FINALIZER.into()]);
    }
    m
}

/// Path of the mirror `name` (cluster-scoped), plus `sub` (`""` or `"/status"`).
fn mirror_path(name: &str, sub: &str) -> String {
    let url = RegistryMirror::url_path(&(), None);
    format!("{url}/{name}{sub}")
}

/// The API server's answer for an object that does not exist.
pub fn not_found() -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found",
    })
}

/// A `PartialObjectMetadataList` of `items` (each a `metadata`), as answered
/// to a metadata-only list.
pub fn metadata_list(items: &[Value]) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadataList",
        "metadata": {},
        "items": items.iter().map(|m| json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": m,
        })).collect::<Vec<_>>(),
    })
}

/// `a` with the fields of `b` merged in (objects recursively, anything else replaced).
pub fn merged(mut a: Value, b: &Value) -> Value {
    match (&mut a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                let slot = a.remove(k).unwrap_or(Value::Null);
                a.insert(k.clone(), merged(slot, v));
            }
        }
        (a, b) => *a = b.clone(),
    }
    a
}

impl ApiServer {
    /// Waits for the next call, fails unless it is `method path` (query
    /// aside), answers it with `status` and `answer(&call)`, and returns it.
    pub async fn expect(
        &mut self,
        method: Method,
        path: &str,
        status: StatusCode,
        answer: impl FnOnce(&Call) -> Value,
    ) -> Call {
        let (request, send) = self
            .0
            .next_request()
            .await
            .unwrap_or_else(|| panic!("expected {method} {path}, but the client is gone"));
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.expect("request body");
        let call = Call {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            body: if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("JSON request body")
            },
        };
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&method, path),
            "unexpected call (query {:?}, body {})",
            call.query,
            call.body
        );
        let answer = answer(&call);
        let response = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(&answer).unwrap()))
            .unwrap();
        send.send_response(response);
        call
    }

    /// Expects a server-side apply (as the operator's field manager, forced)
    /// of `path`, and answers what was applied with `stored` merged in
    /// (status, allocated fields).
    pub async fn expect_apply(&mut self, path: &str, stored: Value) -> Call {
        let call = self
            .expect(Method::PATCH, path, StatusCode::OK, |c| {
                merged(c.body.clone(), &stored)
            })
            .await;
        assert_eq!(call.content_type, "application/apply-patch+yaml", "{path}");
        assert!(
            call.query.contains("fieldManager=regmirror-operator")
                && call.query.contains("force=true"),
            "{path}: {}",
            call.query
        );
        call
    }

    /// Expects a call of `method path` and answers 404 Not Found.
    pub async fn expect_not_found(&mut self, method: Method, path: &str) -> Call {
        self.expect(method, path, StatusCode::NOT_FOUND, |_| not_found())
            .await
    }

    /// Expects a JSON patch of the mirror `hub` itself (the finalizer's),
    /// answers the mirror as it is then (`finalized`: carrying the
    /// finalizer), and returns the patch.
    pub async fn expect_finalizer_patch(&mut self, finalized: bool) -> Value {
        let mut call = self
            .expect(
                Method::PATCH,
                &mirror_path("hub", ""),
                StatusCode::OK,
                |_| serde_json::to_value(mirror(finalized)).unwrap(),
            )
            .await;
        assert_eq!(call.content_type, "application/json-patch+json");
        call.body.take()
    }

    /// Expects the status of the mirror `hub` to be server-side applied,
    /// answers the mirror, and returns the applied `status`.
    pub async fn expect_status(&mut self) -> Value {
        let mut call = self
            .expect(
                Method::PATCH,
                &mirror_path("hub", "/status"),
                StatusCode::OK,
                |_| serde_json::to_value(mirror(true)).unwrap(),
            )
            .await;
        assert_eq!(call.content_type, "application/apply-patch+yaml");
        call.body["status"].take()
    }

    /// Expects an event about the mirror `hub` and answers it as created;
    /// returns its `(type, reason)`.
    pub async fn expect_event(&mut self) -> (String, String) {
        let call = self
            .expect(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/default/events",
                StatusCode::CREATED,
                |c| c.body.clone(),
            )
            .await;
        assert_eq!(call.body["regarding"]["name"], "hub");
        (
            call.body["type"].as_str().unwrap_or_default().to_owned(),
            call.body["reason"].as_str().unwrap_or_default().to_owned(),
        )
    }

    /// Fails if any further call arrives; returns once every client is gone.
    pub async fn done(mut self) {
        if let Some((request, _)) = self.0.next_request().await {
            panic!(
                "unexpected call {} {}",
                request.method(),
                request.uri().path()
            );
        }
    }
}
