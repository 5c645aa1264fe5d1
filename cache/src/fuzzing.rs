//! Properties of the parsers that face untrusted input, as functions of raw
//! bytes: the `cargo fuzz` targets in `fuzz/` call them, and a unit test
//! replays the checked-in corpus through them on every `make test`.
//! Each panics when a property does not hold.

use http::Method;

use crate::oci::{Digest, RepoName, Tag};
use crate::range::{RangeRequest, resolve};
use crate::route::{Endpoint, Request, route};

fn text(data: &[u8]) -> &str {
    std::str::from_utf8(data).unwrap_or("")
}

/// Routing never panics, never names an unconfigured upstream, and every
/// name it accepts is a valid repository name without traversal.
pub fn route_request(data: &[u8]) {
    let s = text(data);
    let (method, rest) = match data.first().map(|b| b % 3) {
        Some(0) => (Method::GET, s.get(1..).unwrap_or("")),
        Some(1) => (Method::HEAD, s.get(1..).unwrap_or("")),
        _ => (Method::DELETE, s.get(1..).unwrap_or("")),
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let hosts = [
        "docker.io".to_owned(),
        "ghcr.io".to_owned(),
        "127.0.0.1:5000".to_owned(),
    ];
    if let Ok(Request::Repo(r)) = route(&method, path, query, &hosts) {
        assert!(r.upstream.index() < hosts.len());
        let name = r.repo.as_str();
        assert!(RepoName::parse(name).is_ok(), "{name:?}");
        assert!(
            name.split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."),
            "{name:?}"
        );
        assert!(!name.contains('\\') && !name.contains('%'), "{name:?}");
        if let Endpoint::Blob(d) | Endpoint::Referrers(d) = &r.endpoint {
            assert_eq!(d.hex().len(), d.algorithm().hex_len());
            assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert!(method == Method::GET || method == Method::HEAD);
    }
}

/// A satisfiable range always lies inside the blob.
pub fn range_header(data: &[u8]) {
    let (size, header) = match data.split_first() {
        Some((n, rest)) => (u64::from(*n) * 1000, text(rest)),
        None => (0, ""),
    };
    if let RangeRequest::Partial { start, end } = resolve(Some(header), size) {
        assert!(
            start <= end && end < size,
            "{header:?} on {size}: {start}-{end}"
        );
    }
}

/// Challenges parse or not, never panic.
pub fn www_authenticate(data: &[u8]) {
    let _ = crate::upstream::challenge::parse(text(data));
}

/// Credentials files parse or fail with a message, never panic.
pub fn credentials(data: &[u8]) {
    let _ = crate::upstream::credentials::parse(data);
}

/// Manifest sniffing and Accept parsing never panic; accepted names,
/// tags and digests print back as given.
pub fn references(data: &[u8]) {
    let s = text(data);
    let _ = crate::oci::media::sniff(data);
    let accept = crate::oci::media::parse_accept(s.split('\n'));
    let _ = crate::oci::media::accepts(&accept, "application/vnd.oci.image.index.v1+json");
    if let Ok(n) = RepoName::parse(s) {
        assert_eq!(n.as_str(), s);
    }
    if let Ok(t) = Tag::parse(s) {
        assert_eq!(t.as_str(), s);
    }
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s);
    }
}

/// A fuzz target: raw input in, panics on a broken property.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay and the fuzz crate.
pub const TARGETS: &[(&str, Target)] = &[
    ("route", route_request),
    ("range", range_header),
    ("www_authenticate", www_authenticate),
    ("credentials", credentials),
    ("references", references),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays `fuzz/corpus/<target>/*` (what fuzzing found interesting) on
    /// stable Rust, so a regression in a parser fails `make test`.
    #[test]
    fn corpus_replays_cleanly() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let mut replayed = 0;
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let entries = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("corpus {} missing: {e}", dir.display()));
            for e in entries {
                let path = e.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let result = std::panic::catch_unwind(|| target(&data));
                assert!(result.is_ok(), "{name}: {} fails", path.display());
                replayed += 1;
            }
        }
        assert!(
            replayed >= TARGETS.len() * 3,
            "corpus too small: {replayed}"
        );
    }
}
