//! regmirror-operator: reconciles `RegistryMirror` resources into a running
//! cache cluster (ConfigMap, ServiceAccount and Role, StatefulSet, headless
//! and NodePort Services), and aggregates the node agents' reports (one
//! agent per node for every mirror, installed with the operator) into each
//! mirror's status.
//!
//! `crd` holds the types, `children` the one list of kinds a mirror owns,
//! `resources` the pure builders, `status` the pure status decisions,
//! `node_status` the pure aggregation of node reports, `node_watch` the
//! stores it reads, `migration` the move from the single-Deployment layout,
//! `agent_migration` the move from per-mirror agent DaemonSets,
//! `controller` the reconcile loop (validate -> build -> migrate -> apply ->
//! prune -> status).

pub mod agent;
pub mod agent_migration;
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
pub mod node_status;
pub mod node_watch;
pub mod quantity;
pub mod quiet;
pub mod resources;
pub mod selection;
pub mod status;
pub mod storage;
pub mod uninstall;
pub mod validation;
