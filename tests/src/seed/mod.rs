//! Synthetic images (real tar+gzip layers of random bytes) and pushing them with the
//! plain distribution API, to a [`crate::Registry`] or a [`crate::FakeUpstream`].

mod build;
mod push;
mod schema1;

use std::fmt;

use bytes::Bytes;
use serde_json::{Value, json};

use crate::util::sha256_digest;

pub use build::{build_image, build_index};
pub use push::{
    FetchedManifest, fetch_blob, fetch_manifest, push_blob, push_blob_as, push_built_image,
    push_built_index, push_image, push_index, push_manifest,
};
pub use schema1::{
    DOCKER_SCHEMA1_SIGNED, SignedSchema1, push_schema1, schema1_payload, sign_schema1,
};

/// Docker schema 2 or OCI media types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavour {
    Docker,
    Oci,
}

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// `Accept` value listing all four manifest media types.
pub const ACCEPT_ALL_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

impl Flavour {
    pub fn manifest_media_type(self) -> &'static str {
        match self {
            Flavour::Docker => DOCKER_MANIFEST,
            Flavour::Oci => OCI_MANIFEST,
        }
    }
    pub fn index_media_type(self) -> &'static str {
        match self {
            Flavour::Docker => DOCKER_MANIFEST_LIST,
            Flavour::Oci => OCI_INDEX,
        }
    }
    pub fn config_media_type(self) -> &'static str {
        match self {
            Flavour::Docker => DOCKER_CONFIG,
            Flavour::Oci => OCI_CONFIG,
        }
    }
    pub fn layer_media_type(self) -> &'static str {
        match self {
            Flavour::Docker => DOCKER_LAYER,
            Flavour::Oci => OCI_LAYER,
        }
    }
}

/// OS/architecture(/variant), e.g. `linux/arm64`, `linux/arm/v7`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn new(os: &str, architecture: &str) -> Self {
        Self {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: None,
        }
    }

    /// Parses `os/arch[/variant]`; panics on malformed input (test code).
    pub fn parse(s: &str) -> Self {
        let parts: Vec<&str> = s.split('/').collect();
        assert!(
            (2..=3).contains(&parts.len()),
            "platform must be os/arch[/variant]: {s}"
        );
        Self {
            os: parts[0].to_owned(),
            architecture: parts[1].to_owned(),
            variant: parts.get(2).map(|v| (*v).to_owned()),
        }
    }

    /// `linux/<arch of this machine>` (what `ctr pull` picks without `--platform`).
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Self::new("linux", arch)
    }

    pub(crate) fn to_json(&self) -> Value {
        let mut v = json!({"architecture": self.architecture, "os": self.os});
        if let Some(variant) = &self.variant {
            v["variant"] = json!(variant);
        }
        v
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// What to build: one layer per entry of `layers` (approximate uncompressed size in bytes
/// of incompressible random data), media type flavour, platform.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub layers: Vec<usize>,
    pub flavour: Flavour,
    pub platform: Platform,
    /// Seed for reproducible content (same seed + spec = same digests); random if `None`.
    pub seed: Option<u64>,
    /// gzip level 0..=9. Default 0: valid gzip made of stored blocks, the fastest in
    /// unoptimised builds (random data does not compress at any level).
    pub gzip_level: u32,
}

impl ImageSpec {
    /// Host platform, random content, gzip level 0.
    pub fn new(flavour: Flavour, layers: &[usize]) -> Self {
        Self {
            layers: layers.to_vec(),
            flavour,
            platform: Platform::host(),
            seed: None,
            gzip_level: 0,
        }
    }
    pub fn docker(layers: &[usize]) -> Self {
        Self::new(Flavour::Docker, layers)
    }
    pub fn oci(layers: &[usize]) -> Self {
        Self::new(Flavour::Oci, layers)
    }
    pub fn platform(mut self, platform: &str) -> Self {
        self.platform = Platform::parse(platform);
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
    pub fn gzip_level(mut self, level: u32) -> Self {
        self.gzip_level = level;
        self
    }
}

/// A content-addressed blob held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    pub media_type: String,
    pub bytes: Bytes,
}

impl Blob {
    pub fn new(media_type: &str, bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self {
            digest: sha256_digest(&bytes),
            media_type: media_type.to_owned(),
            bytes,
        }
    }
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    pub(crate) fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "size": self.size(), "digest": self.digest})
    }
}

/// A built image (returned by [`build_image`] and [`push_image`]): exact manifest bytes
/// and every blob.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// Manifest bytes exactly as pushed.
    pub manifest: Bytes,
    /// `sha256:<hex>` of `manifest`.
    pub digest: String,
    pub media_type: String,
    pub config: Blob,
    /// Compressed layers (tar+gzip), in manifest order.
    pub layers: Vec<Blob>,
    /// sha256 of each uncompressed layer tar (the config's `rootfs.diff_ids`).
    pub diff_ids: Vec<String>,
    pub platform: Platform,
    pub flavour: Flavour,
}

impl PushedImage {
    /// Config then layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }
    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.digest.clone()).collect()
    }
    /// Manifest + config + layers, in bytes.
    pub fn total_size(&self) -> u64 {
        self.manifest.len() as u64 + self.blobs().map(Blob::size).sum::<u64>()
    }
    /// Descriptor of this manifest (for an index).
    pub fn descriptor(&self, platform: Option<&Platform>) -> Value {
        let mut d = json!({"mediaType": self.media_type, "size": self.manifest.len(), "digest": self.digest});
        if let Some(p) = platform {
            d["platform"] = p.to_json();
        }
        d
    }
}

/// A built Docker manifest list / OCI index and its children.
#[derive(Debug, Clone)]
pub struct PushedIndex {
    pub manifest: Bytes,
    pub digest: String,
    pub media_type: String,
    pub flavour: Flavour,
    pub children: Vec<(Platform, PushedImage)>,
}

impl PushedIndex {
    /// The child for `os/arch[/variant]`.
    pub fn child(&self, platform: &str) -> Option<&PushedImage> {
        let p = Platform::parse(platform);
        self.children
            .iter()
            .find(|(cp, _)| *cp == p)
            .map(|(_, i)| i)
    }
}
