//! Protocol fidelity (issue 15): a client gets through the cache what it gets
//! from the upstream directly.
//!
//! A differential test over a table of rows. A row is an upstream, an object
//! on it, a real client's `Accept` list and the route the client takes to the
//! cache (`ns`, a host prefix, or neither as Docker's `registry-mirrors`
//! send). For every row the answer through the cache is compared with the
//! upstream's direct answer ([`answer::differences`]: status,
//! `Docker-Content-Digest`, `Content-Type`, `Content-Length`, body) in these
//! phases, each over all rows:
//! - `first`: the cache has not seen the row's object (HEAD, then GET);
//! - `again`: the cache has (HEAD, GET);
//! - `down`, `silent`, `500`, `429`: every upstream fails so (through a
//!   [`FaultGate`]); here the cache is meant to differ from its failing
//!   upstream, and the row says how ([`Expect`]): it serves what it served
//!   warm, or it fails;
//! - `recovered`: the upstreams are back.
//!
//! Upstreams: Debian's docker-registry (distribution 2.8) with and without
//! schema1 compatibility, and fake upstreams acting out what real registries
//! do (HEAD refused, HEAD without digest, `application/json`, chunked bodies,
//! blob redirects, token response shapes, a realm on another host, paged
//! listings, the referrers API). All on loopback; every request is bounded.
//! Rows never skip: a failing row is reported with every difference, all
//! rows at once, at the end.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::future::join_all;
use http::Method;
use regmirror_e2e::answer::{self, Answer, BodyRule, TypeRule, differences};
use regmirror_e2e::clients::{
    CONTAINERD, CONTAINERD_FETCH_LAYER, CONTAINERD_FETCH_OCI, CRANE, CRANE_REFERRERS, Client,
    DOCKER, OCI_ONLY, PLAIN, SCHEMA1_ONLY, SCHEMA2_ONLY, SKOPEO,
};
use regmirror_e2e::seed::{
    self, Blob, Flavour, ImageSpec, OCI_MANIFEST, Platform, PushedImage, PushedIndex,
};
use regmirror_e2e::util::{bounded, sha512_digest};
use regmirror_e2e::{
    Auth, Behaviour, CacheOptions, CacheProcess, FakeUpstream, FaultGate, Outage, Registry,
    TokenFields,
};
use serde_json::json;

// ---- upstreams ----

/// The upstreams the cache is configured with, in this order: `ghcr.io`
/// first, so a request naming no upstream goes to docker.io only if the
/// cache sends it there on purpose (the failure 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    /// A fake: `org/tool:v2` (not docker.io's) and tag lists.
    Ghcr,
    /// docker-registry: the images, manifest lists, cosign, sha512 blobs.
    Hub,
    /// docker-registry with schema1 compatibility: a signed schema1 image.
    Schema1,
    /// The fake with per-repository behaviours (`b.test`).
    Fake,
    /// Bearer auth, tokens as `token` only, without `expires_in`.
    Token,
    /// Bearer auth, tokens as `access_token` only, without `expires_in`.
    Access,
    /// Bearer auth with the realm on another host (127.0.0.3).
    Realm,
}

const UPSTREAMS: [Up; 7] = [
    Up::Ghcr,
    Up::Hub,
    Up::Schema1,
    Up::Fake,
    Up::Token,
    Up::Access,
    Up::Realm,
];

impl Up {
    /// Its host in the cache's configuration.
    fn host(self) -> &'static str {
        match self {
            Up::Ghcr => "ghcr.io",
            Up::Hub => "docker.io",
            Up::Schema1 => "s1.test",
            Up::Fake => "b.test",
            Up::Token => "token.test",
            Up::Access => "access.test",
            Up::Realm => "realm.test",
        }
    }
}

// ---- rows ----

/// How a client names the upstream to the cache.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// `?ns=<host>` (containerd `hosts.toml` mirrors).
    Ns,
    /// `/v2/<host>/<name>/...` (CRI-O and explicit prefixes).
    Prefix,
    /// Neither (Docker's `registry-mirrors`): docker.io.
    Bare,
}

/// What the cache answers while its upstream fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// What the upstream answered warm: the cache serves what it holds.
    Served,
    /// A 5xx or 429: the cache holds nothing that answers the request.
    Fails,
    /// A 404 or a 5xx or 429: no manifest of an accepted type is known.
    NotFoundOrFails,
}

struct Row {
    name: String,
    up: Up,
    /// `<name>/<endpoint>[?query]` on the upstream, after `/v2/`.
    path: String,
    via: Via,
    client: &'static Client,
    body: BodyRule,
    types: TypeRule,
    outage: Expect,
    /// A listing: GET only, following `Link` to every page.
    pages: bool,
}

impl Row {
    fn new(
        name: impl Into<String>,
        up: Up,
        path: String,
        via: Via,
        client: &'static Client,
    ) -> Self {
        Self {
            name: name.into(),
            up,
            path,
            via,
            client,
            body: BodyRule::Bytes,
            types: TypeRule::Same,
            outage: Expect::Served,
            pages: false,
        }
    }
    fn body(mut self, body: BodyRule) -> Self {
        self.body = body;
        self
    }
    fn types(mut self, types: TypeRule) -> Self {
        self.types = types;
        self
    }
    fn outage(mut self, outage: Expect) -> Self {
        self.outage = outage;
        self
    }
    fn listing(mut self) -> Self {
        self.pages = true;
        self.outage = Expect::Fails;
        self
    }

    /// `<name> (<client>, <upstream> via <route>)`, the row's name in reports.
    fn name_with_client(&self) -> String {
        format!(
            "{} ({}, {} via {:?})",
            self.name,
            self.client.name,
            self.up.host(),
            self.via
        )
    }

    /// The path through the cache, after `/v2/`.
    fn via_path(&self) -> String {
        let host = self.up.host();
        match self.via {
            Via::Ns => {
                let sep = if self.path.contains('?') { '&' } else { '?' };
                format!("{}{sep}ns={host}", self.path)
            }
            Via::Prefix => format!("{host}/{}", self.path),
            Via::Bare => self.path.clone(),
        }
    }
}

// ---- the world: upstreams, gates, content, the cache ----

/// The upstreams, as a client reaches them directly.
struct Upstreams {
    hub: Registry,
    schema1: Registry,
    ghcr: FakeUpstream,
    fake: FakeUpstream,
    token: FakeUpstream,
    access: FakeUpstream,
    realm: FakeUpstream,
    /// The token service of `realm`, on 127.0.0.3.
    _auth: FakeUpstream,
    /// An allowed redirect target, on 127.0.0.2.
    _elsewhere: FakeUpstream,
    /// Object storage: another loopback server holding blobs.
    _objects: FakeUpstream,
}

impl Upstreams {
    fn url(&self, up: Up) -> String {
        match up {
            Up::Ghcr => self.ghcr.url(),
            Up::Hub => self.hub.url(),
            Up::Schema1 => self.schema1.url(),
            Up::Fake => self.fake.url(),
            Up::Token => self.token.url(),
            Up::Access => self.access.url(),
            Up::Realm => self.realm.url(),
        }
    }
}

/// The upstreams, a [`FaultGate`] in front of each, and the cache, which
/// reaches every upstream through its gate.
struct World {
    ups: Upstreams,
    gates: Vec<FaultGate>,
    cache: CacheProcess,
    _dir: tempfile::TempDir,
}

impl World {
    async fn set_outage(&self, outage: Outage) -> Result<()> {
        for gate in &self.gates {
            gate.set(outage).await?;
        }
        Ok(())
    }
}

/// Short timeouts, so outages settle in seconds; tags always revalidate
/// (`tag_ttl` 0, the default), so every outage phase reaches the upstream.
const TIMEOUTS: &str = "[timeouts]\nconnect = \"2s\"\nresponse_header = \"2s\"\nbody_idle = \"2s\"\nstale_after = \"1s\"\n";

fn oci_image(platform: &str) -> Result<PushedImage> {
    seed::build_image(&ImageSpec::oci(&[3_000]).platform(platform))
}

fn index(flavour: Flavour) -> Result<PushedIndex> {
    let children = ["linux/amd64", "linux/arm64"]
        .into_iter()
        .map(|p| {
            let spec = ImageSpec::new(flavour, &[2_000]).platform(p);
            Ok((Platform::parse(p), seed::build_image(&spec)?))
        })
        .collect::<Result<Vec<_>>>()?;
    seed::build_index(flavour, &children)
}

/// Starts every upstream and the cache, and loads the content the rows ask
/// for; returns the world and the rows, in the order they run.
async fn world() -> Result<(World, Vec<Row>)> {
    let hub = Registry::start().await?;
    let schema1 = Registry::start_schema1().await?;
    let ghcr = FakeUpstream::start().await?;
    let fake = FakeUpstream::start().await?;
    let elsewhere = FakeUpstream::start_on("127.0.0.2").await?;
    let objects = FakeUpstream::start().await?;
    let auth = FakeUpstream::start_on("127.0.0.3").await?;
    let no_expiry = |token, access_token| TokenFields {
        token,
        access_token,
        expires_in: false,
    };
    let token = FakeUpstream::start().await?;
    token.set_auth(Auth::bearer_anonymous());
    token.set_token_fields(no_expiry(true, false));
    let access = FakeUpstream::start().await?;
    access.set_auth(Auth::bearer_anonymous());
    access.set_token_fields(no_expiry(false, true));
    let realm = FakeUpstream::start().await?;
    realm.set_auth(Auth::Bearer {
        realm_url: Some(format!("{}/token", auth.url())),
        service: "realm-registry".into(),
        username: None,
        password: None,
    });
    auth.set_token_fields(no_expiry(true, false));

    let mut rows = Vec::new();
    load_hub(&hub, &mut rows).await?;
    load_schema1(&schema1, &mut rows).await?;
    load_ghcr(&ghcr, &mut rows)?;
    load_fake(&fake, &elsewhere, &objects, &mut rows)?;
    for (up, f, client, what) in [
        (
            Up::Token,
            &token,
            &CONTAINERD,
            "bearer token as `token`, no expires_in",
        ),
        (
            Up::Access,
            &access,
            &SKOPEO,
            "bearer token as `access_token`, no expires_in",
        ),
        (
            Up::Realm,
            &realm,
            &CRANE,
            "token realm on another host (allowed)",
        ),
    ] {
        let img = oci_image("linux/amd64")?;
        f.add_image("auth/app", Some("v1"), &img);
        let layer = format!("auth/app/blobs/{}", img.layers[0].digest);
        rows.extend([
            Row::new(what, up, "auth/app/manifests/v1".into(), Via::Ns, client),
            Row::new(format!("{what}, layer"), up, layer, Via::Prefix, &PLAIN),
        ]);
    }

    let ups = Upstreams {
        hub,
        schema1,
        ghcr,
        fake,
        token,
        access,
        realm,
        _auth: auth,
        _elsewhere: elsewhere,
        _objects: objects,
    };
    let mut config = String::from(TIMEOUTS);
    let mut gates = Vec::new();
    for up in UPSTREAMS {
        let url = ups.url(up);
        let addr: SocketAddr = url
            .trim_start_matches("http://")
            .parse()
            .with_context(|| format!("address of {url}"))?;
        let gate = FaultGate::start(addr).await?;
        let _ = writeln!(
            config,
            "\n[[upstream]]\nhost = \"{}\"\nurl = \"{}\"",
            up.host(),
            gate.url()
        );
        let allowed = match up {
            Up::Fake => Some("127.0.0.2"),
            Up::Realm => Some("127.0.0.3"),
            _ => None,
        };
        if let Some(a) = allowed {
            let _ = writeln!(config, "allowed_hosts = [\"{a}\"]");
        }
        gates.push(gate);
    }
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("config.toml");
    std::fs::write(&file, config)?;
    let cache = CacheProcess::start_with(CacheOptions::new().config(&file)).await?;
    Ok((
        World {
            ups,
            gates,
            cache,
            _dir: dir,
        },
        rows,
    ))
}

/// docker.io: docker-registry with images, indexes, a cosign signature,
/// a sha512 blob and Docker Hub's side of the routing rows.
async fn load_hub(hub: &Registry, rows: &mut Vec<Row>) -> Result<()> {
    let url = hub.url();
    let oci_index = index(Flavour::Oci)?;
    seed::push_built_index(&url, "fid/oci-index", "v1", &oci_index).await?;
    let docker_list = index(Flavour::Docker)?;
    seed::push_built_index(&url, "fid/docker-list", "v1", &docker_list).await?;
    let oci = oci_image("linux/amd64")?;
    seed::push_built_image(&url, "fid/oci-image", "v1", &oci).await?;
    seed::push_built_image(&url, "fid/artifact", "v1", &oci_image("linux/amd64")?).await?;
    let docker = seed::build_image(&ImageSpec::docker(&[3_000]).platform("linux/amd64"))?;
    seed::push_built_image(&url, "fid/docker-image", "v1", &docker).await?;
    let sig_tag = cosign_signature(&url, "fid/oci-image", &oci.digest).await?;
    let tool = seed::build_image(&ImageSpec::docker(&[1_000]).platform("linux/amd64"))?;
    seed::push_built_image(&url, "org/tool", "v2", &tool).await?;
    for tag in ["a1", "a2", "a3"] {
        seed::push_built_image(&url, "owner/app", tag, &tool).await?;
    }
    let sha512_blob = Bytes::from(vec![0x5a; 5_000]);
    let sha512 = sha512_digest(&sha512_blob);
    seed::push_blob_as(&url, "fid/sha512", &sha512, sha512_blob).await?;

    let amd64 = oci_index.child("linux/amd64").context("amd64 child")?;
    rows.extend([
        Row::new(
            "OCI index",
            Up::Hub,
            "fid/oci-index/manifests/v1".into(),
            Via::Ns,
            &CONTAINERD,
        ),
        Row::new(
            "OCI index",
            Up::Hub,
            "fid/oci-index/manifests/v1".into(),
            Via::Prefix,
            &CRANE,
        ),
        // After the two above in every phase: the 404 it gets must not
        // cost them their cached index (failure 2).
        Row::new(
            "OCI index, Accept-dependent 404",
            Up::Hub,
            "fid/oci-index/manifests/v1".into(),
            Via::Ns,
            &SCHEMA2_ONLY,
        )
        .outage(Expect::NotFoundOrFails),
        Row::new(
            "OCI index child by digest",
            Up::Hub,
            format!("fid/oci-index/manifests/{}", amd64.digest),
            Via::Ns,
            &CONTAINERD_FETCH_OCI,
        ),
        Row::new(
            "Docker manifest list",
            Up::Hub,
            "fid/docker-list/manifests/v1".into(),
            Via::Ns,
            &SKOPEO,
        ),
        Row::new(
            "Docker manifest list",
            Up::Hub,
            "fid/docker-list/manifests/v1".into(),
            Via::Bare,
            &DOCKER,
        ),
        // Distribution answers with the linux/amd64 manifest; the cache
        // serves that to such clients when the upstream fails (failure 3).
        Row::new(
            "Docker manifest list, narrow client",
            Up::Hub,
            "fid/docker-list/manifests/v1".into(),
            Via::Ns,
            &SCHEMA2_ONLY,
        ),
        Row::new(
            "OCI manifest",
            Up::Hub,
            "fid/oci-image/manifests/v1".into(),
            Via::Ns,
            &CONTAINERD,
        ),
        // Served from the record the row above left.
        Row::new(
            "OCI manifest, narrow client",
            Up::Hub,
            "fid/oci-image/manifests/v1".into(),
            Via::Prefix,
            &OCI_ONLY,
        ),
        // Nobody else pulls this tag: served when the upstream fails, all
        // the same (failure 3).
        Row::new(
            "OCI manifest pulled by narrow clients only",
            Up::Hub,
            "fid/artifact/manifests/v1".into(),
            Via::Ns,
            &OCI_ONLY,
        ),
        Row::new(
            "Docker v2 manifest",
            Up::Hub,
            "fid/docker-image/manifests/v1".into(),
            Via::Prefix,
            &SKOPEO,
        ),
        Row::new(
            "cosign signature tag",
            Up::Hub,
            format!("fid/oci-image/manifests/{sig_tag}"),
            Via::Ns,
            &CRANE,
        ),
        Row::new(
            "layer",
            Up::Hub,
            format!("fid/oci-image/blobs/{}", oci.layers[0].digest),
            Via::Ns,
            &CONTAINERD_FETCH_LAYER,
        ),
        Row::new(
            "sha512 blob",
            Up::Hub,
            format!("fid/sha512/blobs/{sha512}"),
            Via::Ns,
            &PLAIN,
        ),
        // distribution 2.8 has no referrers API: a 404, relayed.
        Row::new(
            "referrers API absent",
            Up::Hub,
            format!("fid/oci-image/referrers/{}", oci.digest),
            Via::Ns,
            &CRANE_REFERRERS,
        )
        .outage(Expect::Fails),
        // ghcr.io holds another org/tool:v2 (failure 7).
        Row::new(
            "Docker mirror request for org/tool:v2, ghcr.io configured first",
            Up::Hub,
            "org/tool/manifests/v2".into(),
            Via::Bare,
            &DOCKER,
        ),
    ]);
    Ok(())
}

/// Pushes a cosign signature for `subject` in `repo` (an OCI manifest whose
/// layer is the simple-signing payload), tagged as cosign tags it:
/// `sha256-<hex>.sig`. Returns the tag.
async fn cosign_signature(url: &str, repo: &str, subject: &str) -> Result<String> {
    let payload = Blob::new(
        "application/vnd.dev.cosign.simplesigning.v1+json",
        json!({
            "critical": {
                "identity": {"docker-reference": format!("docker.io/{repo}")},
                "image": {"docker-manifest-digest": subject},
                "type": "cosign container image signature",
            },
            "optional": null,
        })
        .to_string(),
    );
    let config = Blob::new("application/vnd.oci.image.config.v1+json", "{}");
    for b in [&payload, &config] {
        seed::push_blob_as(url, repo, &b.digest, b.bytes.clone()).await?;
    }
    let mut layer =
        json!({"mediaType": payload.media_type, "size": payload.size(), "digest": payload.digest});
    layer["annotations"] = json!({"dev.cosignproject.cosign/signature": "MEUCIQDfidelity"});
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config.media_type, "size": config.size(), "digest": config.digest},
        "layers": [layer],
    });
    let tag = format!("{}.sig", subject.replace(':', "-"));
    seed::push_manifest(url, repo, &tag, OCI_MANIFEST, manifest.to_string()).await?;
    Ok(tag)
}

/// s1.test: a signed schema1 image pushed to docker-registry, which re-signs
/// it on every GET: bodies are compared by payload.
async fn load_schema1(registry: &Registry, rows: &mut Vec<Row>) -> Result<()> {
    let layer = oci_image("linux/amd64")?.layers[0].clone();
    let signed = seed::sign_schema1("fid/schema1", "v1", "amd64", std::slice::from_ref(&layer))?;
    seed::push_schema1(&registry.url(), "fid/schema1", "v1", &signed).await?;
    // A schema 2 image, converted to schema1 for a client that cannot take
    // schema 2: the HEAD names a digest only the tag's GET serves.
    let converted = seed::build_image(&ImageSpec::docker(&[1_500]).platform("linux/amd64"))?;
    seed::push_built_image(&registry.url(), "fid/converted", "v1", &converted).await?;
    let payload = BodyRule::Schema1Payload;
    rows.extend([
        Row::new(
            "schema 2 image converted to schema1",
            Up::Schema1,
            "fid/converted/manifests/v1".into(),
            Via::Ns,
            &SCHEMA1_ONLY,
        )
        .body(payload.clone()),
        // A client admitting neither schema 2 nor schema1 gets the converted
        // schema1 too: the cache relays what the registry chose, it does not
        // refuse it for the Accept list.
        Row::new(
            "schema 2 image converted to schema1",
            Up::Schema1,
            "fid/converted/manifests/v1".into(),
            Via::Ns,
            &OCI_ONLY,
        )
        .body(payload.clone()),
        Row::new(
            "signed schema1, narrow client",
            Up::Schema1,
            "fid/schema1/manifests/v1".into(),
            Via::Ns,
            &OCI_ONLY,
        )
        .body(payload.clone()),
        Row::new(
            "signed schema1, narrow client",
            Up::Schema1,
            "fid/schema1/manifests/v1".into(),
            Via::Prefix,
            &SCHEMA2_ONLY,
        )
        .body(payload.clone()),
        Row::new(
            "signed schema1",
            Up::Schema1,
            "fid/schema1/manifests/v1".into(),
            Via::Ns,
            &CONTAINERD,
        )
        .body(payload.clone()),
        Row::new(
            "signed schema1",
            Up::Schema1,
            "fid/schema1/manifests/v1".into(),
            Via::Prefix,
            &SKOPEO,
        )
        .body(payload.clone()),
        Row::new(
            "signed schema1 by digest",
            Up::Schema1,
            format!("fid/schema1/manifests/{}", signed.digest),
            Via::Ns,
            &CRANE,
        )
        .body(payload),
        Row::new(
            "schema1 layer",
            Up::Schema1,
            format!("fid/schema1/blobs/{}", layer.digest),
            Via::Ns,
            &PLAIN,
        ),
    ]);
    Ok(())
}

/// ghcr.io: its own org/tool:v2, and tag lists.
fn load_ghcr(ghcr: &FakeUpstream, rows: &mut Vec<Row>) -> Result<()> {
    let img = oci_image("linux/amd64")?;
    ghcr.add_image("org/tool", Some("v2"), &img);
    for tag in ["g1", "g2", "g3"] {
        ghcr.add_image("owner/app", Some(tag), &img);
    }
    for tag in ["1.0", "1.1"] {
        ghcr.add_image("org/lib", Some(tag), &img);
    }
    rows.extend([
        // The body names the repository as the client did (failure 8).
        Row::new(
            "tags/list",
            Up::Ghcr,
            "org/lib/tags/list".into(),
            Via::Prefix,
            &PLAIN,
        )
        .body(BodyRule::TagList {
            name: "ghcr.io/org/lib".into(),
        })
        .listing(),
        Row::new(
            "tags/list",
            Up::Ghcr,
            "org/lib/tags/list".into(),
            Via::Ns,
            &PLAIN,
        )
        .body(BodyRule::TagList {
            name: "org/lib".into(),
        })
        .listing(),
    ]);
    Ok(())
}

/// b.test: one repository per behaviour of real registries.
fn load_fake(
    fake: &FakeUpstream,
    elsewhere: &FakeUpstream,
    objects: &FakeUpstream,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let manifest = |name: &str,
                    repo: &str,
                    behaviour: Behaviour,
                    client: &'static Client,
                    via: Via|
     -> Result<Row> {
        fake.add_image(repo, Some("v1"), &oci_image("linux/amd64")?);
        fake.set_behaviour_for(&format!("/v2/{repo}/"), behaviour);
        Ok(Row::new(
            name,
            Up::Fake,
            format!("{repo}/manifests/v1"),
            via,
            client,
        ))
    };
    let refused = |code| Behaviour::HeadRefused(code);
    rows.extend([
        // HEAD refused while GET works (failure 1).
        manifest(
            "HEAD refused (405)",
            "head405/app",
            refused(405),
            &CONTAINERD,
            Via::Ns,
        )?,
        manifest(
            "HEAD refused (403)",
            "head403/app",
            refused(403),
            &CRANE,
            Via::Prefix,
        )?,
        manifest(
            "HEAD refused (404)",
            "head404/app",
            refused(404),
            &SKOPEO,
            Via::Ns,
        )?,
        manifest(
            "HEAD refused (501)",
            "head501/app",
            refused(501),
            &CONTAINERD,
            Via::Prefix,
        )?,
        manifest(
            "HEAD without Docker-Content-Digest",
            "nodigest/app",
            Behaviour::HeadWithoutDigest,
            &CONTAINERD,
            Via::Ns,
        )?,
        manifest(
            "manifest served as application/json",
            "json/app",
            Behaviour::ManifestsAsJson,
            &CRANE,
            Via::Ns,
        )?
        .types(TypeRule::Declared),
        manifest(
            "chunked manifest",
            "chunked/app",
            Behaviour::Chunked,
            &SKOPEO,
            Via::Prefix,
        )?,
    ]);
    let blob = |name: &str, repo: &str, behaviour: Behaviour, holders: &[&FakeUpstream]| {
        let img = oci_image("linux/amd64")?;
        for f in holders {
            f.add_image(repo, Some("v1"), &img);
        }
        fake.set_behaviour_for(&format!("/v2/{repo}/"), behaviour);
        let path = format!("{repo}/blobs/{}", img.layers[0].digest);
        anyhow::Ok(Row::new(name, Up::Fake, path, Via::Ns, &PLAIN))
    };
    rows.extend([
        // The blob HEAD a client makes before a GET (failure 1).
        blob(
            "blob HEAD refused (405)",
            "head405/layer",
            refused(405),
            &[fake],
        )?,
        blob("chunked blob", "chunked/layer", Behaviour::Chunked, &[fake])?,
        blob(
            "blob redirect, relative Location",
            "redirect/relative",
            Behaviour::RedirectBlobsToObjects { base: None },
            &[fake],
        )?,
        blob(
            "blob redirect to an allowed host",
            "redirect/allowed",
            Behaviour::RedirectBlobs {
                to: elsewhere.url(),
            },
            &[fake, elsewhere],
        )?,
        blob(
            "blob redirect to object storage",
            "redirect/objects",
            Behaviour::RedirectBlobsToObjects {
                base: Some(objects.url()),
            },
            &[fake, objects],
        )?,
    ]);

    // sha512 content: a manifest naming sha512 blobs (failure 6).
    let config = Bytes::from_static(b"{\"architecture\":\"amd64\",\"os\":\"linux\"}");
    let layer = Bytes::from(vec![0x51; 4_000]);
    let (config_d, layer_d) = (sha512_digest(&config), sha512_digest(&layer));
    fake.add_blob_as("sha512/app", &config_d, config.clone());
    fake.add_blob_as("sha512/app", &layer_d, layer.clone());
    let m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": config.len(), "digest": config_d},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": layer.len(), "digest": layer_d}],
    })
    .to_string();
    let m_digest = sha512_digest(m.as_bytes());
    fake.add_manifest_as("sha512/app", None, OCI_MANIFEST, m, &m_digest);
    rows.push(Row::new(
        "sha512 manifest",
        Up::Fake,
        format!("sha512/app/manifests/{m_digest}"),
        Via::Ns,
        &CRANE,
    ));
    rows.push(Row::new(
        "sha512 layer",
        Up::Fake,
        format!("sha512/app/blobs/{layer_d}"),
        Via::Ns,
        &PLAIN,
    ));

    // Signed schema1, served with the signature it was pushed with (failure 5).
    let s1_layer = oci_image("linux/amd64")?.layers[0].clone();
    fake.add_blob("schema1/app", s1_layer.bytes.clone());
    let signed = seed::sign_schema1("schema1/app", "v1", "amd64", &[s1_layer])?;
    fake.add_manifest_as(
        "schema1/app",
        Some("v1"),
        seed::DOCKER_SCHEMA1_SIGNED,
        signed.bytes.clone(),
        &signed.digest,
    );
    rows.push(Row::new(
        "signed schema1 with its own signature",
        Up::Fake,
        "schema1/app/manifests/v1".into(),
        Via::Ns,
        &CONTAINERD,
    ));

    // The referrers API, one page and paged (failure 4 for its Link).
    let subject = oci_image("linux/amd64")?;
    fake.add_image("refs/app", Some("v1"), &subject);
    let empty = Blob::new("application/vnd.oci.empty.v1+json", "{}");
    fake.add_blob("refs/app", empty.bytes.clone());
    for i in 0..3 {
        let sbom = Blob::new("application/spdx+json", format!("{{\"sbom\":{i}}}"));
        fake.add_blob("refs/app", sbom.bytes.clone());
        let referrer = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/spdx+json",
            "config": {"mediaType": empty.media_type, "size": empty.size(), "digest": empty.digest},
            "layers": [{"mediaType": sbom.media_type, "size": sbom.size(), "digest": sbom.digest}],
            "subject": {"mediaType": OCI_MANIFEST, "size": subject.manifest.len(), "digest": subject.digest},
            "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
        });
        fake.add_manifest("refs/app", None, OCI_MANIFEST, referrer.to_string());
    }
    let referrers = format!("refs/app/referrers/{}", subject.digest);
    rows.push(
        Row::new(
            "referrers",
            Up::Fake,
            referrers.clone(),
            Via::Ns,
            &CRANE_REFERRERS,
        )
        .listing(),
    );
    rows.push(
        Row::new(
            "referrers, paged",
            Up::Fake,
            format!("{referrers}?n=1"),
            Via::Ns,
            &CRANE_REFERRERS,
        )
        .listing(),
    );
    // A tag list paged by the upstream: its Link keeps `ns` (failure 4).
    let img = oci_image("linux/amd64")?;
    for tag in ["t1", "t2", "t3", "t4", "t5"] {
        fake.add_image("owner/app", Some(tag), &img);
    }
    rows.push(
        Row::new(
            "tags/list, paged",
            Up::Fake,
            "owner/app/tags/list?n=2".into(),
            Via::Ns,
            &PLAIN,
        )
        .body(BodyRule::TagList {
            name: "owner/app".into(),
        })
        .listing(),
    );
    Ok(())
}

// ---- running rows ----

/// One difference, for the report.
struct Finding {
    row: String,
    phase: String,
    what: String,
}

/// Compares `row` through the cache with the upstream directly: HEAD (unless
/// a listing) and GET, or every page. Returns the upstream's GET answer (its
/// first page for a listing) for the outage phases, and the differences.
async fn compare(w: &World, row: &Row, client: &reqwest::Client) -> (Option<Answer>, Vec<String>) {
    let direct_base = w.ups.url(row.up);
    let cache_base = w.cache.url();
    let accept = row.client.accept;
    let mut out = Vec::new();
    if row.pages {
        let direct =
            answer::fetch_pages(client, &direct_base, &format!("/v2/{}", row.path), accept).await;
        let cached = answer::fetch_pages(
            client,
            &cache_base,
            &format!("/v2/{}", row.via_path()),
            accept,
        )
        .await;
        let (direct, cached) = match (direct, cached) {
            (Ok(d), Ok(c)) => (d, c),
            (d, c) => {
                out.push(format!(
                    "no answer: direct {:?}, cache {:?}",
                    d.err(),
                    c.err()
                ));
                return (None, out);
            }
        };
        if direct.len() != cached.len() {
            out.push(format!(
                "{} pages (upstream {})",
                cached.len(),
                direct.len()
            ));
        }
        for (i, (d, c)) in direct.iter().zip(&cached).enumerate() {
            for diff in differences(d, c, false, &row.body, row.types) {
                out.push(format!("page {}: {diff}", i + 1));
            }
        }
        return (direct.into_iter().next(), out);
    }
    let direct_url = format!("{direct_base}/v2/{}", row.path);
    let cache_url = format!("{cache_base}/v2/{}", row.via_path());
    let direct = match answer::fetch(client, Method::GET, &direct_url, accept).await {
        Ok(d) => d,
        Err(e) => {
            out.push(format!("upstream did not answer: {e:#}"));
            return (None, out);
        }
    };
    for method in [Method::HEAD, Method::GET] {
        let head = method == Method::HEAD;
        match answer::fetch(client, method.clone(), &cache_url, accept).await {
            Ok(c) => out.extend(
                differences(&direct, &c, head, &row.body, row.types)
                    .into_iter()
                    .map(|d| format!("{method}: {d}")),
            ),
            Err(e) => out.push(format!("{method}: no answer: {e:#}")),
        }
    }
    (Some(direct), out)
}

/// What `row` gets through the cache while every upstream fails, against
/// what it should: [`Expect`], with `warm` the upstream's answer before.
async fn during_outage(
    w: &World,
    row: &Row,
    warm: Option<&Answer>,
    client: &reqwest::Client,
) -> Vec<String> {
    let url = format!("{}/v2/{}", w.cache.url(), row.via_path());
    let methods: &[Method] = if row.pages {
        &[Method::GET]
    } else {
        &[Method::HEAD, Method::GET]
    };
    let mut out = Vec::new();
    for method in methods {
        let got = match answer::fetch(client, method.clone(), &url, row.client.accept).await {
            Ok(a) => a,
            Err(e) => {
                out.push(format!("{method}: no answer: {e:#}"));
                continue;
            }
        };
        let failing = got.status >= 500 || got.status == 429;
        let diffs = match (row.outage, warm) {
            (Expect::Served, Some(warm)) => {
                differences(warm, &got, *method == Method::HEAD, &row.body, row.types)
            }
            (Expect::Served, None) => vec!["no warm answer to serve".into()],
            (Expect::Fails, _) if failing => vec![],
            (Expect::NotFoundOrFails, _) if failing || got.status == 404 => vec![],
            (expect, _) => vec![format!("status {} (expected {expect:?})", got.status)],
        };
        out.extend(diffs.into_iter().map(|d| format!("{method}: {d}")));
    }
    out
}

#[tokio::test]
async fn every_client_gets_through_the_cache_what_the_upstream_gives_it() {
    bounded(240, async {
        let (w, rows) = world().await?;
        let client = answer::client();
        let mut findings = Vec::new();
        let mut warm: Vec<Option<Answer>> = Vec::new();
        for phase in ["first", "again"] {
            warm.clear();
            // In order: rows on one tag run in the order the table gives.
            for row in &rows {
                let (direct, diffs) = compare(&w, row, &client).await;
                warm.push(direct);
                findings.extend(diffs.into_iter().map(|what| Finding {
                    row: row.name_with_client(),
                    phase: phase.into(),
                    what,
                }));
            }
        }
        for outage in [
            Outage::Down,
            Outage::Silent,
            Outage::Status(500),
            Outage::Status(429),
        ] {
            w.set_outage(outage).await?;
            // All rows at once: each may wait `stale_after` for a silent upstream.
            let results = join_all(
                rows.iter()
                    .zip(&warm)
                    .map(|(row, warm)| during_outage(&w, row, warm.as_ref(), &client)),
            )
            .await;
            for (row, diffs) in rows.iter().zip(results) {
                findings.extend(diffs.into_iter().map(|what| Finding {
                    row: row.name_with_client(),
                    phase: format!("{outage:?}"),
                    what,
                }));
            }
            w.set_outage(Outage::None).await?;
        }
        for row in &rows {
            let (_, diffs) = compare(&w, row, &client).await;
            findings.extend(diffs.into_iter().map(|what| Finding {
                row: row.name_with_client(),
                phase: "recovered".into(),
                what,
            }));
        }
        assert!(findings.is_empty(), "{}", report(&rows, &findings, &w));
        Ok(())
    })
    .await;
}

/// The failing rows with every difference (each once, with the phases it
/// showed in), then the rows that match.
fn report(rows: &[Row], findings: &[Finding], w: &World) -> String {
    let mut s = String::new();
    let failing: Vec<String> = rows
        .iter()
        .map(Row::name_with_client)
        .filter(|n| findings.iter().any(|f| &f.row == n))
        .collect();
    let _ = writeln!(
        s,
        "{} of {} rows differ from their upstream:",
        failing.len(),
        rows.len()
    );
    for name in &failing {
        let _ = writeln!(s, "\n✗ {name}");
        let mut seen: Vec<(&str, Vec<&str>)> = Vec::new();
        for f in findings.iter().filter(|f| &f.row == name) {
            match seen.iter_mut().find(|(what, _)| *what == f.what) {
                Some((_, phases)) => phases.push(&f.phase),
                None => seen.push((&f.what, vec![&f.phase])),
            }
        }
        for (what, phases) in seen {
            let _ = writeln!(s, "    [{}] {what}", phases.join(", "));
        }
    }
    let _ = writeln!(s, "\nrows that match:");
    for row in rows {
        let name = row.name_with_client();
        if !failing.contains(&name) {
            let _ = writeln!(s, "✓ {name}");
        }
    }
    let _ = writeln!(s, "\ncache log tail:\n{}", w.cache.log_tail(15));
    s
}

/// The failure 9: without a CA bundle on the machine (rustls finds
/// no roots: `SSL_CERT_FILE` and `SSL_CERT_DIR` name an empty file and an
/// empty directory, the only places it then looks) a cache whose upstreams
/// are all plain http starts, and serves as its upstream does.
#[tokio::test]
async fn a_cache_of_http_upstreams_starts_and_serves_without_ca_certificates() {
    bounded(60, async {
        let fake = FakeUpstream::start().await?;
        let img = oci_image("linux/amd64")?;
        fake.add_image("fid/app", Some("v1"), &img);
        let dir = tempfile::tempdir()?;
        let (file, certs) = (dir.path().join("ca.pem"), dir.path().join("certs"));
        std::fs::write(&file, "")?;
        std::fs::create_dir(&certs)?;
        let cache = CacheProcess::start_with(
            CacheOptions::new()
                .upstream("docker.io", &fake.url())
                .env("SSL_CERT_FILE", &path_str(&file))
                .env("SSL_CERT_DIR", &path_str(&certs)),
        )
        .await
        .context("start without CA certificates")?;
        let client = answer::client();
        for (path, accept) in [
            ("fid/app/manifests/v1", CONTAINERD.accept),
            (
                &*format!("fid/app/blobs/{}", img.layers[0].digest),
                PLAIN.accept,
            ),
        ] {
            let direct = answer::fetch(
                &client,
                Method::GET,
                &format!("{}/v2/{path}", fake.url()),
                accept,
            )
            .await?;
            let cached = answer::fetch(
                &client,
                Method::GET,
                &format!("{}/v2/{path}", cache.url()),
                accept,
            )
            .await?;
            let diffs = differences(&direct, &cached, false, &BodyRule::Bytes, TypeRule::Same);
            assert!(diffs.is_empty(), "{path}: {diffs:?}");
        }
        Ok(())
    })
    .await;
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}
