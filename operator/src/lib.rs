//! regmirror-operator: reconciles `RegistryMirror` resources into a running
//! cache cluster (ConfigMap, ServiceAccount and Role, StatefulSet, headless
//! and NodePort Services) and the node agent DaemonSet.
//!
//! `crd` holds the types, `children` the one list of kinds a mirror owns,
//! `resources` the pure builders, `status` the pure status decisions,
//! `migration` the move from the single-Deployment layout, `controller` the
//! reconcile loop (validate -> build -> migrate -> apply -> prune -> status).

pub mod agent;
pub mod children;
pub mod controller;
pub mod crd;
pub mod credentials;
#[cfg(test)]
mod fixtures;
pub mod installation;
pub mod leader;
pub mod metrics;
pub mod migration;
pub mod node_report;
pub mod quantity;
pub mod quiet;
pub mod resources;
pub mod selection;
pub mod status;
pub mod uninstall;
pub mod validation;
