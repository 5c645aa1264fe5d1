//! The `Accept` header lines real registry clients send, taken from their
//! source (cited at each), for tests that ask as those clients do.

/// A client: its name and the `Accept` header lines it sends for manifests.
#[derive(Debug)]
pub struct Client {
    pub name: &'static str,
    /// One item per header line, as the client sends them.
    pub accept: &'static [&'static str],
}

/// containerd 1.6 and 2.x resolving a tag: one header line, the same list in
/// both (containerd v1.6.0 `remotes/docker/resolver.go` and v2.0.0
/// `core/remotes/docker/resolver.go`, `NewResolver`). They differ in what
/// they do with the answer: 2.x refuses schema1 manifests itself.
pub const CONTAINERD: Client = Client {
    name: "containerd 1.6/2.x",
    accept: &[
        "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*",
    ],
};

/// containerd fetching a manifest it resolved, by digest: the descriptor's
/// media type and `*/*` (v1.6.0 `remotes/docker/fetcher.go`, `open`).
pub const CONTAINERD_FETCH_OCI: Client = Client {
    name: "containerd fetch",
    accept: &["application/vnd.oci.image.manifest.v1+json, */*"],
};

/// containerd fetching a layer (same `open`, with the layer's media type).
pub const CONTAINERD_FETCH_LAYER: Client = Client {
    name: "containerd fetch",
    accept: &["application/vnd.oci.image.layer.v1.tar+gzip, */*"],
};

/// Docker 20.10+ (moby `distribution/pull_v2.go`, through docker/distribution
/// `registry/client/repository.go` `manifests.Get`): one line per media type
/// registered with `distribution.ManifestMediaTypes()`; moby links schema1
/// (which registers `v1+prettyjws` and `application/json`), schema2,
/// manifestlist (with the OCI index) and ocischema. Map order: any.
pub const DOCKER: Client = Client {
    name: "Docker 20+",
    accept: &[
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/json",
    ],
};

/// A client that takes Docker schema 2 image manifests only: distribution
/// answers it an OCI index tag with 404, and a manifest list tag with its
/// linux/amd64 manifest.
pub const SCHEMA2_ONLY: Client = Client {
    name: "schema2-only",
    accept: &["application/vnd.docker.distribution.manifest.v2+json"],
};

/// A client from before schema 2 (Docker before 1.10, whose distribution
/// client registered only schema1's types): distribution 2.8 with schema1
/// compatibility converts a schema 2 image to a freshly signed schema1
/// manifest for it, whose digest a GET by digest does not find.
pub const SCHEMA1_ONLY: Client = Client {
    name: "schema1-only",
    accept: &[
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/json",
    ],
};

/// A client that takes OCI image manifests only, as artifact tools send.
pub const OCI_ONLY: Client = Client {
    name: "OCI-manifest-only",
    accept: &["application/vnd.oci.image.manifest.v1+json"],
};

/// crane and everything on go-containerregistry's `remote.Get`: one line,
/// comma-joined (`pkg/v1/remote/descriptor.go`, `allManifestMediaTypes`
/// from `acceptableImageMediaTypes` and `acceptableIndexMediaTypes`,
/// `fetchManifest`).
pub const CRANE: Client = Client {
    name: "crane",
    accept: &[
        "application/vnd.docker.distribution.manifest.v1+json,application/vnd.docker.distribution.manifest.v1+prettyjws,application/vnd.docker.distribution.manifest.v2+json,application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.list.v2+json,application/vnd.oci.image.index.v1+json",
    ],
};

/// go-containerregistry asking the referrers API (`fetchReferrers`).
pub const CRANE_REFERRERS: Client = Client {
    name: "crane referrers",
    accept: &["application/vnd.oci.image.index.v1+json"],
};

/// skopeo and podman (containers/image `docker/docker_image_src.go`
/// `fetchManifest`): one line per `manifest.DefaultRequestedManifestMIMETypes`
/// (`manifest/manifest.go`).
pub const SKOPEO: Client = Client {
    name: "skopeo",
    accept: &[
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    ],
};

/// Blob and listing requests: no `Accept`.
pub const PLAIN: Client = Client {
    name: "any",
    accept: &[],
};
