//! Signed schema1 manifests (`application/vnd.docker.distribution.manifest.v1+prettyjws`),
//! written the way libtrust writes them, so distribution 2.8 with schema1
//! compatibility accepts their push.
//!
//! The format (docker/libtrust `jsonsign.go`): the manifest JSON, indented
//! with three spaces, is the payload; its last `}` and the whitespace before
//! it are cut off and a `"signatures"` member is appended. Each signature's
//! protected header carries `formatLength` (the length of the payload's kept
//! part) and `formatTail` (what was cut, base64url), so a reader rebuilds the
//! payload as `bytes[..formatLength] + formatTail`. The signature is ES256
//! (raw `r || s`) over `protected + "." + base64url(payload)`, and the header
//! carries the public key as a JWK. Distribution's digest of the manifest is
//! the sha256 of the payload, not of the bytes served (`manifest/schema1`).

use anyhow::{Context, Result, anyhow, ensure};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};

use super::Blob;
use super::push::{push_blob_as, put_manifest};
use crate::util::sha256_digest;

/// The media type of a signed schema1 manifest.
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// A signed schema1 manifest over some layers.
#[derive(Debug, Clone)]
pub struct SignedSchema1 {
    /// The whole document, signatures included, as pushed (and as served by
    /// a registry that keeps signatures).
    pub bytes: Bytes,
    /// The manifest without its signatures: what the signature covers.
    pub payload: Bytes,
    /// `sha256:<hex>` of `payload`: the manifest's digest in distribution.
    pub digest: String,
    /// The layers its `fsLayers` name, top first.
    pub layers: Vec<Blob>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<'a> {
    schema_version: u32,
    name: &'a str,
    tag: &'a str,
    architecture: &'a str,
    fs_layers: Vec<Value>,
    history: Vec<Value>,
}

/// Signs a schema1 manifest for `name:tag` over `layers` (top first) with a
/// fresh P-256 key. Errors only if the key cannot be made or used.
pub fn sign_schema1(
    name: &str,
    tag: &str,
    architecture: &str,
    layers: &[Blob],
) -> Result<SignedSchema1> {
    // v1Compatibility: one image per layer, each the parent of the one above.
    let ids: Vec<String> = layers
        .iter()
        .map(|l| sha256_digest(format!("v1 image of {}", l.digest).as_bytes())[7..].to_owned())
        .collect();
    let history = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut v1 = json!({
                "id": id,
                "created": "2024-01-01T00:00:00Z",
                "architecture": architecture,
                "os": "linux",
                "container_config": {"Cmd": ["/bin/sh"]},
            });
            if let Some(parent) = ids.get(i + 1) {
                v1["parent"] = json!(parent);
            }
            json!({"v1Compatibility": v1.to_string()})
        })
        .collect();
    let manifest = Manifest {
        schema_version: 1,
        name,
        tag,
        architecture,
        fs_layers: layers
            .iter()
            .map(|l| json!({"blobSum": l.digest}))
            .collect(),
        history,
    };
    let payload = indented(&manifest)?;
    let format_length = payload
        .iter()
        .rposition(|b| *b == b'}')
        .and_then(|close| {
            payload[..close]
                .iter()
                .rposition(|b| !b.is_ascii_whitespace())
        })
        .map(|last| last + 1)
        .context("payload is not a JSON object")?;
    let tail = &payload[format_length..];
    let protected = URL_SAFE_NO_PAD.encode(
        json!({
            "formatLength": format_length,
            "formatTail": URL_SAFE_NO_PAD.encode(tail),
            "time": "2024-01-01T00:00:00Z",
        })
        .to_string(),
    );
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
        .map_err(|_| anyhow!("cannot generate a P-256 key"))?;
    let signed = format!("{protected}.{}", URL_SAFE_NO_PAD.encode(&payload));
    let signature = key
        .sign(&SystemRandom::new(), signed.as_bytes())
        .map_err(|_| anyhow!("cannot sign"))?;
    // Uncompressed point: 0x04 || x || y, 32 bytes each.
    let point = key.public_key().as_ref();
    ensure!(point.len() == 65, "unexpected P-256 public key encoding");
    let signatures = json!([{
        "header": {
            "jwk": {
                "crv": "P-256",
                "kty": "EC",
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..]),
            },
            "alg": "ES256",
        },
        "signature": URL_SAFE_NO_PAD.encode(signature.as_ref()),
        "protected": protected,
    }]);
    let mut bytes = payload[..format_length].to_vec();
    bytes.extend_from_slice(b",\n   \"signatures\": ");
    bytes.extend_from_slice(&indented(&signatures)?);
    bytes.extend_from_slice(b"\n}");
    Ok(SignedSchema1 {
        bytes: bytes.into(),
        digest: sha256_digest(&payload),
        payload: payload.into(),
        layers: layers.to_vec(),
    })
}

/// JSON indented with three spaces, as libtrust writes it.
fn indented(value: &impl Serialize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"   ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    value.serialize(&mut ser)?;
    Ok(out)
}

/// The payload of a signed schema1 document (the manifest without its
/// signatures), rebuilt from its first signature's `formatLength` and
/// `formatTail` as libtrust's `ParsePrettySignature` does; `None` when
/// `bytes` is not such a document. Two documents with the same payload are
/// the same manifest, however they were signed.
pub fn schema1_payload(bytes: &[u8]) -> Option<Vec<u8>> {
    let doc: Value = serde_json::from_slice(bytes).ok()?;
    let protected = doc["signatures"][0]["protected"].as_str()?;
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(protected).ok()?).ok()?;
    let length = usize::try_from(header["formatLength"].as_u64()?).ok()?;
    let tail = URL_SAFE_NO_PAD
        .decode(header["formatTail"].as_str()?)
        .ok()?;
    let mut payload = bytes.get(..length)?.to_vec();
    payload.extend_from_slice(&tail);
    Some(payload)
}

/// Pushes `manifest`'s layers to `repo` on the registry at `registry_url`,
/// then the manifest as `repo:tag`; checks that the registry names it by
/// its payload digest.
pub async fn push_schema1(
    registry_url: &str,
    repo: &str,
    tag: &str,
    manifest: &SignedSchema1,
) -> Result<()> {
    for layer in &manifest.layers {
        push_blob_as(registry_url, repo, &layer.digest, layer.bytes.clone()).await?;
    }
    put_manifest(
        registry_url,
        repo,
        tag,
        DOCKER_SCHEMA1_SIGNED,
        manifest.bytes.clone(),
        &manifest.digest,
    )
    .await
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    use super::*;

    #[test]
    fn signatures_cover_the_payload_libtrust_rebuilds() {
        let layer = Blob::new("application/octet-stream", &b"layer"[..]);
        let m = sign_schema1("fid/app", "v1", "amd64", &[layer]).unwrap();
        let payload = schema1_payload(&m.bytes).unwrap();
        assert_eq!(payload, m.payload);
        assert_eq!(sha256_digest(&payload), m.digest);
        assert_ne!(sha256_digest(&m.bytes), m.digest);

        let doc: Value = serde_json::from_slice(&m.bytes).unwrap();
        assert_eq!(doc["schemaVersion"], 1);
        assert_eq!(doc["fsLayers"][0]["blobSum"], m.layers[0].digest.as_str());
        let sig = &doc["signatures"][0];
        let jwk = &sig["header"]["jwk"];
        let mut point = vec![4u8];
        for c in ["x", "y"] {
            point.extend(URL_SAFE_NO_PAD.decode(jwk[c].as_str().unwrap()).unwrap());
        }
        let signed = format!(
            "{}.{}",
            sig["protected"].as_str().unwrap(),
            URL_SAFE_NO_PAD.encode(&payload)
        );
        let raw = URL_SAFE_NO_PAD
            .decode(sig["signature"].as_str().unwrap())
            .unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(signed.as_bytes(), &raw)
            .expect("ES256 signature verifies");
        // Signed again (another key): the same manifest in other bytes.
        let again = sign_schema1("fid/app", "v1", "amd64", &m.layers).unwrap();
        assert_eq!(again.digest, m.digest);
        assert_ne!(again.bytes, m.bytes);
        assert_eq!(schema1_payload(b"{\"schemaVersion\": 2}"), None);
    }
}
