//! regmirror-registry: what the cache and the operator both know about
//! registries, written once.
//!
//! - [`docker_hub`]: Docker Hub's names and their normalisation to `docker.io`.
//! - [`known`]: well-known registries, their API endpoints and the hosts they
//!   send clients to.
//! - [`credentials`]: how a docker `config.json` names a registry, and the key
//!   under which Kubernetes stores one in a Secret.
//! - [`cache_file`]: the cache's configuration file, which the operator writes
//!   into a ConfigMap and the cache reads.
//! - [`size`]: byte sizes as that file and the cache's flags write them.
//!
//! Pure data and functions, no IO.

pub mod cache_file;
pub mod credentials;
pub mod docker_hub;
pub mod known;
pub mod size;
