//! Signed Docker schema1 manifests
//! (`application/vnd.docker.distribution.manifest.v1+prettyjws`): what their
//! digest covers.
//!
//! A signed schema1 manifest is libtrust's "pretty signature": the manifest
//! JSON with a `signatures` array spliced in before its closing brace. Its
//! digest is not that of the bytes served but of the JWS payload, the
//! manifest without the signatures, which each signature's protected header
//! describes: the first `formatLength` bytes of the served manifest followed
//! by `formatTail` (base64url), the whitespace and `}` that closed it.
//! Distribution computes the digest this way (`schema1.SignedManifest`'s
//! `UnmarshalJSON` through libtrust's `ParsePrettySignature`, digest of
//! `Canonical`), and re-signs on every GET, so the same digest comes with
//! different bytes each time.

use base64::Engine as _;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// Why a signed schema1 manifest has no payload to digest; the message says
/// which part is missing or broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("signed schema1 manifest: {0}")]
pub struct PayloadError(&'static str);

/// JOSE base64url: unpadded (padding tolerated), as libtrust's
/// `joseBase64UrlDecode` reads it through Go's lenient decoder.
const JOSE: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

#[derive(serde::Deserialize)]
struct Pretty {
    signatures: Vec<Signature>,
}

#[derive(serde::Deserialize)]
struct Signature {
    protected: String,
}

#[derive(serde::Deserialize)]
struct Protected {
    #[serde(rename = "formatLength")]
    format_length: serde_json::Number,
    #[serde(rename = "formatTail")]
    format_tail: String,
}

/// The JWS payload of the signed schema1 manifest `bytes`: the bytes its
/// registry digests. `bytes[..formatLength]` followed by the decoded
/// `formatTail`, both from the signatures' protected headers, which must
/// all agree (libtrust `ParsePrettySignature`); the payload must be JSON
/// (distribution unmarshals it).
///
/// Errors ([`PayloadError`]): not a JSON object with a `signatures` array,
/// no signature, a protected header that does not decode or lacks
/// `formatLength`/`formatTail`, signatures that disagree, a `formatLength`
/// beyond the manifest, a payload that is not JSON.
pub fn signed_payload(bytes: &[u8]) -> Result<Vec<u8>, PayloadError> {
    let pretty: Pretty = serde_json::from_slice(bytes)
        .map_err(|_| PayloadError("not a JSON object with a signatures array"))?;
    let mut format: Option<(usize, Vec<u8>)> = None;
    for sig in &pretty.signatures {
        let header = JOSE
            .decode(&sig.protected)
            .map_err(|_| PayloadError("protected header is not base64url"))?;
        let header: Protected = serde_json::from_slice(&header)
            .map_err(|_| PayloadError("protected header without formatLength and formatTail"))?;
        // Go reads the number as a float and truncates it.
        let length = header
            .format_length
            .as_u64()
            .or_else(|| {
                header
                    .format_length
                    .as_f64()
                    .filter(|f| *f >= 0.0)
                    .map(|f| f as u64)
            })
            .and_then(|l| usize::try_from(l).ok())
            .ok_or(PayloadError("formatLength is not a length"))?;
        let tail = JOSE
            .decode(&header.format_tail)
            .map_err(|_| PayloadError("formatTail is not base64url"))?;
        match &format {
            None => format = Some((length, tail)),
            Some(f) if *f == (length, tail) => {}
            Some(_) => return Err(PayloadError("signatures disagree on the payload's format")),
        }
    }
    let (length, tail) = format.ok_or(PayloadError("no signatures"))?;
    let head = bytes
        .get(..length)
        .ok_or(PayloadError("formatLength beyond the manifest"))?;
    let payload = [head, &tail[..]].concat();
    serde_json::from_slice::<serde::de::IgnoredAny>(&payload)
        .map_err(|_| PayloadError("payload is not JSON"))?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Digest;

    /// A real signed schema1 manifest, made by distribution 2.8.2 (Debian's
    /// docker-registry, `compatibility.schema1.enabled`) converting a schema2
    /// image `legacy/app:v1` for a client that accepts only
    /// `application/vnd.docker.distribution.manifest.v1+prettyjws`, as
    /// received; the registry answered with [`DIGEST`].
    const SIGNED: &[u8] = include_bytes!("testdata/schema1-signed.json");
    /// The same manifest from a second GET: distribution re-signs on every
    /// GET, so the signature differs and the digest does not.
    const RESIGNED: &[u8] = include_bytes!("testdata/schema1-resigned.json");
    /// Distribution's `Docker-Content-Digest` for both.
    const DIGEST: &str = "sha256:ce59cb8e67dc80e59be17057e749154b3b2b386ddded5256c5a6f1d36693e602";

    fn b64(s: &[u8]) -> String {
        JOSE.encode(s).trim_end_matches('=').to_owned()
    }

    /// A pretty signature over `manifest` (which ends in `\n}`) with one
    /// signature per protected header in `headers`.
    fn signed(manifest: &str, headers: &[String]) -> Vec<u8> {
        let body = manifest.strip_suffix("\n}").expect("ends in \\n}");
        let sigs: Vec<String> = headers
            .iter()
            .map(|h| {
                format!(
                    r#"{{"header":{{"alg":"ES256"}},"signature":"c2ln","protected":"{}"}}"#,
                    b64(h.as_bytes())
                )
            })
            .collect();
        format!("{body},\n\"signatures\": [{}]\n}}", sigs.join(",")).into_bytes()
    }

    fn header(length: usize, tail: &[u8]) -> String {
        format!(
            r#"{{"formatLength":{length},"formatTail":"{}","time":"2026-01-01T00:00:00Z"}}"#,
            b64(tail)
        )
    }

    #[test]
    fn a_real_signed_manifest_digests_to_its_registry_digest() {
        assert_ne!(SIGNED, RESIGNED, "the fixtures differ in their signatures");
        for bytes in [SIGNED, RESIGNED] {
            let payload = signed_payload(bytes).unwrap();
            assert_eq!(Digest::of(&payload).to_string(), DIGEST);
            assert_ne!(
                Digest::of(bytes).to_string(),
                DIGEST,
                "bytes are not the payload"
            );
            assert!(
                payload.ends_with(b"   ]\n}"),
                "payload ends with formatTail"
            );
            assert!(!payload.windows(10).any(|w| w == b"signatures"));
        }
    }

    #[test]
    fn the_payload_is_the_head_and_the_tail() {
        let manifest = "{\n   \"schemaVersion\": 1,\n   \"name\": \"a\"\n}";
        let length = manifest.len() - 2;
        let bytes = signed(manifest, &[header(length, b"\n}")]);
        assert_eq!(signed_payload(&bytes).unwrap(), manifest.as_bytes());
        // Every signature agreeing: the same payload.
        let two = signed(manifest, &[header(length, b"\n}"), header(length, b"\n}")]);
        assert_eq!(signed_payload(&two).unwrap(), manifest.as_bytes());
        // A padded tail is read too.
        let padded = format!(r#"{{"formatLength":{length},"formatTail":"Cn0="}}"#);
        assert_eq!(
            signed_payload(&signed(manifest, &[padded])).unwrap(),
            manifest.as_bytes()
        );
    }

    #[test]
    fn manifests_without_a_usable_payload_are_refused() {
        let manifest = "{\n   \"schemaVersion\": 1,\n   \"name\": \"a\"\n}";
        let length = manifest.len() - 2;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not json".to_vec(), "not a JSON object"),
            (manifest.as_bytes().to_vec(), "not a JSON object"),
            (signed(manifest, &[]), "no signatures"),
            (
                signed(
                    manifest,
                    &[header(length, b"\n}"), header(length - 1, b"\n}")],
                ),
                "disagree",
            ),
            (
                signed(manifest, &[header(length, b"\n}"), header(length, b" }")]),
                "disagree",
            ),
            (
                signed(manifest, &[header(100_000, b"\n}")]),
                "beyond the manifest",
            ),
            (
                signed(manifest, &[header(length, b"")]),
                "payload is not JSON",
            ),
            (
                signed(manifest, &[header(length - 5, b"\n}")]),
                "payload is not JSON",
            ),
            (
                signed(manifest, &[r#"{"formatTail":"Cn0"}"#.to_owned()]),
                "without formatLength",
            ),
            (
                signed(
                    manifest,
                    &[r#"{"formatLength":-1,"formatTail":"Cn0"}"#.to_owned()],
                ),
                "not a length",
            ),
            (
                signed(
                    manifest,
                    &[format!(r#"{{"formatLength":{length},"formatTail":"%%"}}"#)],
                ),
                "formatTail is not base64url",
            ),
        ];
        for (bytes, want) in cases {
            let err = signed_payload(&bytes).unwrap_err().to_string();
            assert!(err.contains(want), "{err} (wanted {want})");
        }
        let mut broken = SIGNED.to_vec();
        let at = broken
            .windows(11)
            .position(|w| w == b"\"protected\"")
            .unwrap();
        broken[at + 14] = b'!';
        let err = signed_payload(&broken).unwrap_err().to_string();
        assert!(err.contains("protected header is not base64url"), "{err}");
    }
}
