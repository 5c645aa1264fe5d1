//! Pure OCI distribution vocabulary: names, references, digests (and what a
//! signed schema1 manifest's digest covers), media types, listing pagination.

pub mod digest;
pub mod media;
pub mod name;
pub mod pagination;
pub mod schema1;

pub use digest::{Algorithm, Digest};
pub use name::{Reference, RepoName, Tag};
