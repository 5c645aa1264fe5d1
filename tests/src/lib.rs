//! End-to-end test harness for regmirror.
//!
//! - [`Registry`]: Debian's `docker-registry` (distribution 2.8) on loopback, plain or proxy.
//! - [`seed`]: synthetic images (real tar+gzip layers) pushed with the distribution API.
//! - [`Containerd`]: a private containerd driven by `ctr`, plus [`write_hosts_toml`].
//! - [`skopeo`]: `skopeo copy` / `inspect --raw` wrappers.
//! - [`CacheProcess`]: the `regmirror-cache` binary under test.
//! - [`Cluster`]: R cache processes as one cache cluster (`--name`, `--peer`).
//! - [`ControlPlane`]: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok.
//! - [`audit`]: the API server's audit log: who sent which requests when.
//! - [`AgentFleet`]: one node agent process per (kwok) node, for load measurements.
//! - [`RealNode`]: one real kubelet on a private containerd, registered against a
//!   [`ControlPlane`] (one per machine).
//! - [`images`]: runnable images built from host binaries (the binaries under test,
//!   a pause image, a shell) with exactly the libraries they link.
//! - [`helm`]: the Helm chart, `helm`, and kubeconform with schemas from the API server.
//! - [`OperatorProcess`]: the `regmirror-operator` binary under test.
//! - [`FakeUpstream`]: programmable in-process registry for fault and auth tests.
//! - [`FaultGate`]: a relay in front of any upstream that acts out outages
//!   or throttles it.
//! - [`answer`]: one request as a client makes it, and when two answers match.
//! - [`clients`]: the `Accept` lists real clients send.
//! - [`RequestLog`]: counting and awaiting the requests either upstream received.
//! - [`util`]: ports, polling, digests, HTTP client.
//!
//! Every peer lives in its own temp dir on 127.0.0.1 with a free port and is killed on
//! drop. Child processes are started under `setpriv --pdeathsig KILL`, so they also die
//! when the thread that started them exits: start peers from the test's own thread
//! (`#[tokio::test]`), not from `spawn_blocking` or a shared static.

pub mod answer;
pub mod audit;
pub mod cache;
pub mod clients;
pub mod cluster;
pub mod containerd;
pub mod controlplane;
pub mod fake;
pub mod fleet;
pub mod gate;
pub mod helm;
pub mod images;
pub mod kubelet;
pub mod operator;
pub mod process;
pub mod registry;
pub mod request_log;
pub mod seed;
pub mod skopeo;
pub mod tools;
pub mod util;

pub use audit::{AuditLog, AuditRequest};
pub use cache::{CacheOptions, CacheProcess, StoreLayout, cache_binary};
pub use cluster::Cluster;
pub use containerd::{Containerd, cri_tables, write_hosts_toml};
pub use controlplane::{ControlPlane, StartOptions, tools_bin_dir};
pub use fake::{Auth, Behaviour, FakeUpstream, RecordedRequest, TokenFields};
pub use fleet::{AgentFleet, FleetOptions, FleetUsage};
pub use gate::{FaultGate, Outage};
pub use images::BinaryImage;
pub use kubelet::RealNode;
pub use operator::{AgentOptions, AgentProcess, OperatorProcess, operator_binary};
pub use process::ensure_success;
pub use registry::{AccessEntry, Registry};
pub use request_log::RequestLog;
pub use seed::{
    Blob, Flavour, ImageSpec, Platform, PushedImage, PushedIndex, build_image, build_index,
    push_blob, push_built_image, push_built_index, push_image, push_index, push_manifest,
};
pub use skopeo::{skopeo_copy, skopeo_inspect_raw};
pub use util::{free_port, http_client, sha256_digest, sha512_digest, wait_until};
