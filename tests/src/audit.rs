//! The API server's audit log, for counting who sent which requests when: a
//! [`ControlPlane`](crate::ControlPlane) started with
//! [`StartOptions::audit`](crate::controlplane::StartOptions) logs every
//! request (level `Metadata`, JSON lines) in its directory, and [`AuditLog`]
//! reads them back as [`AuditRequest`]s.
//!
//! Event format: `audit.k8s.io/v1` `Event`
//! (<https://kubernetes.io/docs/reference/config-api/apiserver-audit.v1/>).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::Deserialize;

/// The audit policy the control plane starts with: one event when a request
/// arrives (`RequestReceived`, logged before it is served, so a request is
/// counted even while a watch stays open) and one when it completes, at
/// level `Metadata` (who, verb, object; no bodies). kwok's node heartbeats
/// (`nodes/status`) and node leases are left out: thousands of requests per
/// minute at 200 nodes that no component under test sends.
pub const POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [ResponseStarted]
rules:
  - level: None
    resources: [{group: "", resources: ["nodes/status"]}]
  - level: None
    namespaces: [kube-node-lease]
    resources: [{group: coordination.k8s.io, resources: [leases]}]
  - level: Metadata
"#;

/// The user name a ServiceAccount's token authenticates as:
/// `system:serviceaccount:<namespace>:<name>`.
pub fn service_account_user(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// One request, as the audit log recorded it when it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRequest {
    /// `user.username`, e.g. [`service_account_user`]'s form or `admin`.
    pub user: String,
    /// The Kubernetes verb: `get`, `list`, `watch`, `create`, `update`,
    /// `patch`, `delete`, ...; for non-resource URLs the HTTP method, lower case.
    pub verb: String,
    /// `objectRef.resource`, with `/<subresource>` when there is one
    /// (`registrymirrors/status`); the request path for non-resource URLs
    /// (`/api`, `/version`).
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// `requestReceivedTimestamp`.
    pub received: SystemTime,
}

impl AuditRequest {
    /// Whether this is a write: `create`, `update`, `patch`, `delete` or
    /// `deletecollection`.
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event {
    stage: String,
    verb: String,
    #[serde(rename = "requestURI")]
    request_uri: String,
    user: User,
    object_ref: Option<ObjectRef>,
    request_received_timestamp: String,
}

#[derive(Deserialize)]
struct User {
    username: String,
}

#[derive(Deserialize)]
struct ObjectRef {
    resource: Option<String>,
    subresource: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
}

/// The request recorded by one line of the log, `None` for the other stages
/// (each request has one `RequestReceived` event). Errors on a line that is
/// not an audit event.
pub fn parse_line(line: &str) -> Result<Option<AuditRequest>> {
    let e: Event = serde_json::from_str(line).context("audit event")?;
    if e.stage != "RequestReceived" {
        return Ok(None);
    }
    let received = humantime::parse_rfc3339(&e.request_received_timestamp)
        .with_context(|| format!("requestReceivedTimestamp {}", e.request_received_timestamp))?;
    let (resource, namespace, name) = match e.object_ref {
        Some(ObjectRef {
            resource: Some(r),
            subresource,
            namespace,
            name,
        }) => (
            match subresource {
                Some(s) => format!("{r}/{s}"),
                None => r,
            },
            namespace,
            name,
        ),
        _ => (
            e.request_uri
                .split('?')
                .next()
                .unwrap_or_default()
                .to_owned(),
            None,
            None,
        ),
    };
    Ok(Some(AuditRequest {
        user: e.user.username,
        verb: e.verb,
        resource,
        namespace,
        name,
        received,
    }))
}

/// The requests received in `[from, to)`, in log order.
pub fn within(requests: &[AuditRequest], from: SystemTime, to: SystemTime) -> Vec<AuditRequest> {
    requests
        .iter()
        .filter(|r| r.received >= from && r.received < to)
        .cloned()
        .collect()
}

/// How many of `requests` have each `key` (e.g. `|r| (r.verb.clone(),
/// r.resource.clone())`), in key order.
pub fn tally<K: Ord>(
    requests: &[AuditRequest],
    key: impl Fn(&AuditRequest) -> K,
) -> BTreeMap<K, usize> {
    let mut counts = BTreeMap::new();
    for r in requests {
        *counts.entry(key(r)).or_default() += 1;
    }
    counts
}

/// The audit log file of a running control plane.
#[derive(Debug, Clone)]
pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    /// The log at `path` (it need not exist yet).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every request logged so far, in log order (empty when there is no log
    /// yet). A last line still being written is skipped; any other line that
    /// does not parse is an error naming it.
    pub fn requests(&self) -> Result<Vec<AuditRequest>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("read {}", self.path.display())),
        };
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        let mut out = Vec::new();
        for (i, line) in complete.lines().enumerate() {
            if let Some(r) = parse_line(line)
                .with_context(|| format!("{} line {}", self.path.display(), i + 1))?
            {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// The requests received in `[from, to)` ([`within`]).
    pub fn requests_between(&self, from: SystemTime, to: SystemTime) -> Result<Vec<AuditRequest>> {
        Ok(within(&self.requests()?, from, to))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const RECEIVED: &str = r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"a","stage":"RequestReceived","requestURI":"/apis/regmirror.dev/v1alpha1/registrymirrornodes/node-1/status?fieldManager=regmirror-agent\u0026force=true","verb":"patch","user":{"username":"system:serviceaccount:regmirror-system:regmirror-agent","groups":["system:serviceaccounts"]},"sourceIPs":["127.0.0.1"],"objectRef":{"resource":"registrymirrornodes","name":"node-1","apiGroup":"regmirror.dev","apiVersion":"v1alpha1","subresource":"status"},"requestReceivedTimestamp":"2026-11-30T02:36:35.123456Z","stageTimestamp":"2026-11-30T02:36:35.123456Z"}"#;

    #[test]
    fn a_received_event_is_one_request_with_its_subresource_and_time() {
        let r = parse_line(RECEIVED).unwrap().unwrap();
        assert_eq!(
            r.user,
            service_account_user("regmirror-system", "regmirror-agent")
        );
        assert_eq!(
            (r.verb.as_str(), r.resource.as_str()),
            ("patch", "registrymirrornodes/status")
        );
        assert_eq!(
            (r.namespace.as_deref(), r.name.as_deref()),
            (None, Some("node-1"))
        );
        assert!(r.is_write());
        assert_eq!(
            r.received,
            humantime::parse_rfc3339("2026-11-30T02:36:35.123456Z").unwrap()
        );
    }

    #[test]
    fn completion_events_are_not_requests_and_non_resource_urls_are_named_by_path() {
        let done = RECEIVED.replace("RequestReceived", "ResponseComplete");
        assert_eq!(parse_line(&done).unwrap(), None);
        let discovery = r#"{"stage":"RequestReceived","requestURI":"/apis?timeout=32s","verb":"get","user":{"username":"admin"},"requestReceivedTimestamp":"2026-11-30T02:36:35Z"}"#;
        let r = parse_line(discovery).unwrap().unwrap();
        assert_eq!((r.verb.as_str(), r.resource.as_str()), ("get", "/apis"));
        assert!(!r.is_write());
        assert!(parse_line("not json").is_err());
    }

    #[test]
    fn windows_are_half_open_and_tallies_count_by_key() {
        let at = |s: u64| {
            let mut r = parse_line(RECEIVED).unwrap().unwrap();
            r.received = SystemTime::UNIX_EPOCH + Duration::from_secs(s);
            r
        };
        let mut get = at(11);
        get.verb = "get".into();
        let all = [at(9), at(10), get, at(20)];
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let inside = within(&all, t(10), t(20));
        assert_eq!(inside.len(), 2);
        let by_verb = tally(&inside, |r| r.verb.clone());
        assert_eq!(
            by_verb.into_iter().collect::<Vec<_>>(),
            [("get".to_owned(), 1), ("patch".to_owned(), 1)]
        );
    }

    #[test]
    fn a_missing_log_has_no_requests_and_a_partial_last_line_waits() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(&dir.path().join("audit.log"));
        assert!(log.requests().unwrap().is_empty());
        std::fs::write(log.path(), format!("{RECEIVED}\n{}", &RECEIVED[..40])).unwrap();
        assert_eq!(log.requests().unwrap().len(), 1);
    }
}
