//! Manifest media types and `Accept` negotiation.

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema1, signed: its digest covers the payload without the
/// signatures ([`super::schema1`]).
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// Docker schema1, unsigned: digested as bytes, like every other manifest.
pub const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// What we ask an upstream for when the client did not say.
pub const ALL_MANIFESTS: [&str; 4] = [
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST,
];

/// The media types listed in one or more `Accept` header values, without
/// parameters, in order. Empty means "anything".
pub fn parse_accept<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    values
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter_map(|item| {
            let t = item.split(';').next().unwrap_or("").trim();
            (!t.is_empty()).then(|| t.to_ascii_lowercase())
        })
        .collect()
}

/// Whether a client that sent `accept` takes a manifest of `media_type`.
pub fn accepts(accept: &[String], media_type: &str) -> bool {
    accept.is_empty()
        || accept
            .iter()
            .any(|a| a == "*/*" || a == "application/*" || a.eq_ignore_ascii_case(media_type))
}

/// The media type a manifest declares in its body, for content that arrived
/// without a usable `Content-Type`.
pub fn sniff(body: &[u8]) -> Option<&'static str> {
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
        manifests: Option<serde::de::IgnoredAny>,
        config: Option<serde::de::IgnoredAny>,
        signatures: Option<serde::de::IgnoredAny>,
    }
    let shape: Shape = serde_json::from_slice(body).ok()?;
    if let Some(declared) = shape.media_type.as_deref() {
        return [
            DOCKER_MANIFEST,
            DOCKER_MANIFEST_LIST,
            OCI_MANIFEST,
            OCI_INDEX,
        ]
        .into_iter()
        .find(|t| *t == declared);
    }
    match (shape.schema_version, shape.manifests, shape.config) {
        // Schema1 as distribution serves it is signed; without signatures
        // its digest is that of its bytes.
        (Some(1), _, _) if shape.signatures.is_some() => Some(DOCKER_MANIFEST_V1_SIGNED),
        (Some(1), _, _) => Some(DOCKER_MANIFEST_V1),
        (_, Some(_), _) => Some(OCI_INDEX),
        (_, _, Some(_)) => Some(OCI_MANIFEST),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_lists_are_split_and_stripped() {
        let a = parse_accept([
            "application/vnd.oci.image.index.v1+json, application/json;q=0.5",
            "*/*",
        ]);
        assert_eq!(
            a,
            [
                "application/vnd.oci.image.index.v1+json",
                "application/json",
                "*/*"
            ]
        );
    }

    #[test]
    fn accepts_matches_exact_or_wildcard() {
        assert!(accepts(&[], OCI_INDEX));
        assert!(accepts(&[OCI_INDEX.into()], OCI_INDEX));
        assert!(!accepts(&[DOCKER_MANIFEST.into()], OCI_INDEX));
        assert!(accepts(&["*/*".into()], OCI_INDEX));
    }

    #[test]
    fn sniffs_media_types() {
        assert_eq!(sniff(br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#), Some(DOCKER_MANIFEST));
        assert_eq!(
            sniff(br#"{"schemaVersion":2,"manifests":[]}"#),
            Some(OCI_INDEX)
        );
        assert_eq!(
            sniff(br#"{"schemaVersion":2,"config":{}}"#),
            Some(OCI_MANIFEST)
        );
        assert_eq!(
            sniff(br#"{"schemaVersion":1,"fsLayers":[],"signatures":[]}"#),
            Some(DOCKER_MANIFEST_V1_SIGNED)
        );
        assert_eq!(
            sniff(br#"{"schemaVersion":1,"fsLayers":[]}"#),
            Some(DOCKER_MANIFEST_V1)
        );
        assert_eq!(sniff(b"not json"), None);
    }
}
