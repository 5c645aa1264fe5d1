//! What the node agent does to a node, as plain functions over a directory:
//! render containerd `hosts.toml` files ([`hosts_toml`]), write and remove
//! them without ever clobbering what regmirror did not write ([`apply`]), and
//! tell whether containerd will read them at all ([`containerd`]).

pub mod apply;
pub mod containerd;
pub mod hosts_toml;

pub use apply::{Apply, HostReport, HostState, MergeMode, apply, owners, remove_owned};
pub use containerd::{Detection, inspect};
pub use hosts_toml::{HostsToml, MARKER, owner_of, render};
