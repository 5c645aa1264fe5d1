//! regmirror-operator: reconciles `RegistryMirror` resources into a running
//! cache (ConfigMap, PVC, Deployment, Service) and the node agent DaemonSet.
//!
//! `crd` holds the types, `resources` the pure builders, `controller` the
//! reconcile loop (validate -> build -> apply -> prune -> status).

pub mod agent;
pub mod controller;
pub mod crd;
pub mod credentials;
pub mod leader;
pub mod metrics;
pub mod quantity;
pub mod resources;
pub mod status;
