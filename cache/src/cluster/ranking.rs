//! Who owns a key: rendezvous (highest-random-weight) hashing, as Kraken's
//! origin cluster places blobs. Every member ranks the same members the same
//! way from their names alone, with no coordination; adding or removing one
//! member moves only the keys it wins or held (about 1/N of them).

use sha2::{Digest as _, Sha256};

use crate::oci::{Digest, RepoName, Tag};

/// What a request is about, for ownership. Content (blobs and manifests) is
/// keyed by digest, so one owner stores it whichever repository names it; a
/// tag lookup by its repository and tag, so one owner asks the upstream.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    /// A blob or manifest: (upstream host, digest).
    Content {
        upstream: &'a str,
        digest: &'a Digest,
    },
    /// A manifest by tag: (upstream host, repository, tag).
    Tag {
        upstream: &'a str,
        repo: &'a RepoName,
        tag: &'a Tag,
    },
}

impl Key<'_> {
    /// The key's bytes as hashed: the kind, then the fields, separated by
    /// NUL (which no host, digest, repository or tag contains).
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Key::Content { upstream, digest } => format!("content\0{upstream}\0{digest}"),
            Key::Tag {
                upstream,
                repo,
                tag,
            } => format!("tag\0{upstream}\0{}\0{}", repo.as_str(), tag.as_str()),
        }
        .into_bytes()
    }
}

/// The weight of `member` for `key`: SHA-256 over (member name, NUL, key).
/// Ties (equal digests) cannot happen between distinct names in practice;
/// [`rank`] breaks them by name so the order is total anyway.
pub fn weight(member: &str, key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(member.as_bytes());
    h.update([0]);
    h.update(key);
    h.finalize().into()
}

/// `members` (names) ranked for `key`, highest weight first: the first is
/// the key's owner, the rest the order to fall back in. Pure: every member
/// with the same view computes the same ranking.
pub fn rank<'m, M: AsRef<str>>(members: &'m [M], key: &Key<'_>) -> Vec<&'m M> {
    let key = key.bytes();
    let mut ranked: Vec<(&M, [u8; 32])> = members
        .iter()
        .map(|m| (m, weight(m.as_ref(), &key)))
        .collect();
    ranked.sort_by(|(a, wa), (b, wb)| wb.cmp(wa).then_with(|| a.as_ref().cmp(b.as_ref())));
    ranked.into_iter().map(|(m, _)| m).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: usize) -> Digest {
        let hex = format!("{:064x}", i);
        format!("sha256:{hex}").parse().unwrap()
    }

    fn owner<'a>(members: &'a [&'a str], d: &Digest) -> &'a str {
        rank(
            members,
            &Key::Content {
                upstream: "docker.io",
                digest: d,
            },
        )[0]
    }

    #[test]
    fn every_member_ranks_alike_whatever_the_order_it_lists_them() {
        let a = ["m0", "m1", "m2", "m3"];
        let b = ["m3", "m1", "m0", "m2"];
        for i in 0..200 {
            let d = digest(i);
            let key = Key::Content {
                upstream: "docker.io",
                digest: &d,
            };
            assert_eq!(rank(&a, &key), rank(&b, &key));
        }
    }

    #[test]
    fn keys_spread_evenly_and_a_new_member_takes_about_one_nth() {
        let three = ["cache-0", "cache-1", "cache-2"];
        let four = ["cache-0", "cache-1", "cache-2", "cache-3"];
        let n = 4000;
        let mut per_member = [0usize; 3];
        let mut moved = 0;
        for i in 0..n {
            let d = digest(i);
            let before = owner(&three, &d);
            let after = owner(&four, &d);
            per_member[three.iter().position(|m| *m == before).unwrap()] += 1;
            if before != after {
                // Only to the new member: no key moves between old ones.
                assert_eq!(after, "cache-3");
                moved += 1;
            }
        }
        for count in per_member {
            assert!(
                (n / 3 - n / 15..n / 3 + n / 15).contains(&count),
                "{per_member:?}"
            );
        }
        assert!(
            (n / 4 - n / 20..n / 4 + n / 20).contains(&moved),
            "{moved} of {n} moved"
        );
    }

    #[test]
    fn the_previous_owner_ranks_second_after_a_join() {
        let three = ["a", "b", "c"];
        let four = ["a", "b", "c", "d"];
        for i in 0..500 {
            let d = digest(i);
            let key = Key::Content {
                upstream: "docker.io",
                digest: &d,
            };
            let before = rank(&three, &key);
            let after = rank(&four, &key);
            if *after[0] == "d" {
                assert_eq!(after[1], before[0]);
            }
        }
    }

    #[test]
    fn content_and_tag_keys_differ_and_hosts_separate_keys() {
        let d = digest(1);
        let repo = RepoName::parse("library/busybox").unwrap();
        let tag = Tag::parse("latest").unwrap();
        let a = Key::Content {
            upstream: "docker.io",
            digest: &d,
        };
        let b = Key::Content {
            upstream: "ghcr.io",
            digest: &d,
        };
        let t = Key::Tag {
            upstream: "docker.io",
            repo: &repo,
            tag: &tag,
        };
        assert_ne!(a.bytes(), b.bytes());
        assert_ne!(a.bytes(), t.bytes());
        // Pinned: every member of a cluster, whatever its version, must hash
        // alike, so the key encoding and the weight never change silently.
        assert_eq!(
            hex::encode(weight("cache-0", &t.bytes())),
            hex::encode(weight(
                "cache-0",
                b"tag\0docker.io\0library/busybox\0latest"
            ))
        );
    }
}
