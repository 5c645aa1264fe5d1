//! Content digests: `sha256` and `sha512`, the algorithms the OCI image spec
//! registers (descriptor.md, "Registered algorithms"). Any other algorithm is
//! refused up front, so that nothing unverifiable ever reaches the store.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

use super::{media, schema1};

/// A registered digest algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// Every algorithm the cache verifies and stores.
    pub const ALL: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];

    /// The algorithm's name in a digest string (`sha256`), also the name of
    /// its directory in the store.
    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// The length of its encoded part in lowercase hex characters: 64 for
    /// sha256, 128 for sha512 (twice the hash's size in bytes).
    pub const fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    /// The algorithm named `name`, if registered.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// A hasher that computes this algorithm's digests.
    pub fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    /// The digest of `bytes` with this algorithm.
    pub fn digest(self, bytes: &[u8]) -> Digest {
        let mut h = self.hasher();
        h.update(bytes);
        h.finish()
    }
}

/// Hashes a body piece by piece with one [`Algorithm`]; [`Hasher::finish`]
/// gives its [`Digest`].
#[derive(Clone)]
pub enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    /// Adds `bytes` to what has been hashed.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything hashed.
    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Hasher::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest { algorithm, hex }
    }
}

/// A validated `<algorithm>:<lowercase hex>` digest of a registered
/// [`Algorithm`], with exactly [`Algorithm::hex_len`] hex characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error(
        "digest must look like sha256:<64 hex characters> or sha512:<128 hex characters>, in lowercase"
    )]
    Malformed,
    #[error("unsupported digest algorithm {0:?}; only sha256 and sha512 are supported")]
    UnsupportedAlgorithm(String),
}

impl Digest {
    /// The sha256 digest of `bytes`: sha256 is the algorithm content is
    /// addressed by unless a digest names another.
    pub fn of(bytes: &[u8]) -> Self {
        Algorithm::Sha256.digest(bytes)
    }

    /// The digest a registry gives the manifest `bytes` of `media_type`
    /// under `algorithm`: of the bytes themselves, except for a signed
    /// schema1 manifest ([`media::DOCKER_MANIFEST_V1_SIGNED`]), whose digest
    /// covers its JWS payload without the signatures
    /// ([`schema1::signed_payload`]), as distribution computes it.
    ///
    /// Errors: a signed schema1 manifest without a usable payload.
    pub fn of_manifest(
        algorithm: Algorithm,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Self, schema1::PayloadError> {
        if media_type == media::DOCKER_MANIFEST_V1_SIGNED {
            Ok(algorithm.digest(&schema1::signed_payload(bytes)?))
        } else {
            Ok(algorithm.digest(bytes))
        }
    }

    /// The encoded part, lowercase hex ([`Algorithm::hex_len`] characters),
    /// safe to use as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The algorithm it names, which checks content against it.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, encoded) = s.split_once(':').ok_or(DigestError::Malformed)?;
        // OCI grammar: algorithm-component = [a-z0-9]+, joined by [+._-].
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
        if !name_ok {
            return Err(DigestError::Malformed);
        }
        let algorithm = Algorithm::from_name(name)
            .ok_or_else(|| DigestError::UnsupportedAlgorithm(name.to_owned()))?;
        // Registered algorithms are lowercase hex of a fixed length (the
        // image spec's descriptor section): anything else names no content.
        let hex_ok = encoded.len() == algorithm.hex_len()
            && encoded
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err(DigestError::Malformed);
        }
        Ok(Self {
            algorithm,
            hex: encoded.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    /// `printf '' | sha512sum`
    const EMPTY_512: &str = "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e";

    #[test]
    fn digest_of_empty_input() {
        assert_eq!(Digest::of(b"").to_string(), EMPTY);
        assert_eq!(EMPTY.parse::<Digest>().unwrap(), Digest::of(b""));
        let d = Algorithm::Sha512.digest(b"");
        assert_eq!(d.to_string(), EMPTY_512);
        assert_eq!(EMPTY_512.parse::<Digest>().unwrap(), d);
        assert_eq!(d.algorithm(), Algorithm::Sha512);
        assert_eq!(d.hex().len(), 128);
    }

    #[test]
    fn a_hasher_fed_in_pieces_gives_the_digest_of_the_whole() {
        for a in Algorithm::ALL {
            let mut h = a.hasher();
            h.update(b"hello ");
            h.update(b"world");
            assert_eq!(h.finish(), a.digest(b"hello world"), "{a:?}");
        }
        // The same bytes under two algorithms are two different digests.
        assert_ne!(
            Algorithm::Sha256.digest(b"x"),
            Algorithm::Sha512.digest(b"x")
        );
    }

    #[test]
    fn algorithms_are_known_by_name() {
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::from_name(a.name()), Some(a));
        }
        assert_eq!(Algorithm::from_name("SHA256"), None);
        assert_eq!(Algorithm::from_name("sha384"), None);
    }

    #[test]
    fn rejects_malformed_digests() {
        let hex512 = &EMPTY_512["sha512:".len()..];
        let upper512 = format!("sha512:{}", hex512.to_ascii_uppercase());
        let short512 = format!("sha512:{}", &hex512[..127]);
        let long512 = format!("sha512:{hex512}0");
        let sha256_length_as_512 = format!("sha512:{}", &hex512[..64]);
        let sha512_length_as_256 = format!("sha256:{hex512}");
        for bad in [
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85/",
            "sha256:../../../../etc/passwd000000000000000000000000000000000000000000",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555",
            "sha512:abcd",
            "sha512:",
            &upper512,
            &short512,
            &long512,
            &sha256_length_as_512,
            &sha512_length_as_256,
        ] {
            assert_eq!(bad.parse::<Digest>(), Err(DigestError::Malformed), "{bad}");
        }
    }

    #[test]
    fn rejects_other_algorithms_with_a_clear_error() {
        for (s, name) in [
            ("sha384:abcd", "sha384"),
            ("md5:abc", "md5"),
            ("blake3:abcd", "blake3"),
        ] {
            let err = s.parse::<Digest>().unwrap_err();
            assert_eq!(err, DigestError::UnsupportedAlgorithm(name.into()));
        }
    }

    #[test]
    fn manifests_are_digested_as_bytes_except_signed_schema1() {
        let body = br#"{"schemaVersion":2}"#;
        for a in Algorithm::ALL {
            for t in [
                media::OCI_MANIFEST,
                media::DOCKER_MANIFEST,
                media::DOCKER_MANIFEST_V1,
            ] {
                assert_eq!(Digest::of_manifest(a, t, body), Ok(a.digest(body)), "{t}");
            }
        }
        // Signed schema1 covers the payload (see schema1's tests for a real
        // manifest); a body without one is refused.
        assert!(
            Digest::of_manifest(Algorithm::Sha256, media::DOCKER_MANIFEST_V1_SIGNED, body).is_err()
        );
    }
}
