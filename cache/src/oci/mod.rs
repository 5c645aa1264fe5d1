//! Pure OCI distribution vocabulary: names, references, digests, media types.

pub mod digest;
pub mod media;
pub mod name;

pub use digest::Digest;
pub use name::{Reference, RepoName, Tag};
