//! Pure OCI distribution vocabulary: names, references, digests, media types,
//! listing pagination.

pub mod digest;
pub mod media;
pub mod name;
pub mod pagination;

pub use digest::Digest;
pub use name::{Reference, RepoName, Tag};
