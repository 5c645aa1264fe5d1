//! Tags: the one mutable name in a registry, so the one thing the cache has
//! to revalidate. Like distribution's `proxytagservice`, a tag is resolved
//! by asking the upstream, with two differences: a tag confirmed within its
//! upstream's `tag_ttl` is served without asking, and when the upstream
//! fails (or is slow) a tag the store knows is served stale.
//!
//! The decisions are pure functions ([`plan`], [`settle`], [`after_head`],
//! [`defines_tag`]); [`TagCache`] holds the state they read (when each tag
//! was confirmed) and the lookups in flight; the IO is `Mirror`'s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use http::{Method, StatusCode};

use super::Mirror;
use crate::error::{Error, Result};
use crate::flight::Flights;
use crate::oci::media::{self, accepts};
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::route::UpstreamId;
use crate::store::{StoredManifest, TagRecord};
use crate::upstream;

/// A tag on one upstream.
type TagName = (UpstreamId, RepoName, Tag);

/// A tag lookup: the tag and the `Accept` list it was made with (joined),
/// since the upstream may answer each list with a different manifest.
type LookupKey = (UpstreamId, RepoName, Tag, String);

/// What the cache knows about tags beyond the store's tag records: when each
/// was last confirmed with its upstream, and the lookups under way.
#[derive(Default)]
pub struct TagCache {
    /// When each tag was last confirmed with its upstream by a lookup that
    /// defines it (see [`defines_tag`]), for the tag TTL.
    confirmed: Mutex<HashMap<TagName, Instant>>,
    /// Revalidations in flight, one per [`LookupKey`]. They run as tasks, so
    /// one goes on refreshing the tag after a stale answer was served.
    lookups: Flights<LookupKey, StoredManifest>,
}

impl TagCache {
    /// How long ago `tag` was last confirmed; `None` if never since start.
    fn age(&self, tag: &TagName) -> Option<Duration> {
        let confirmed = self.confirmed.lock().expect("poisoned");
        confirmed.get(tag).map(Instant::elapsed)
    }

    /// Records that the upstream confirmed `tag` just now.
    fn confirm(&self, tag: TagName) {
        self.confirmed
            .lock()
            .expect("poisoned")
            .insert(tag, Instant::now());
    }

    /// Forgets `tag`'s confirmation (the upstream no longer has the tag).
    fn forget(&self, tag: &TagName) {
        self.confirmed.lock().expect("poisoned").remove(tag);
    }
}

/// What a tag lookup does before asking anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagPlan<'a> {
    /// The record is acceptable and confirmed within the TTL: serve the
    /// manifest it names without asking the upstream. If that manifest is
    /// no longer stored, revalidate with this record as the stale fallback.
    ServeStored(&'a TagRecord),
    /// Ask the upstream. With a `stale` record the wait is bounded by
    /// `stale_after` and an upstream failure serves the record's manifest;
    /// without one the upstream's answer, whatever it is, stands.
    Revalidate { stale: Option<&'a TagRecord> },
}

/// The plan for a lookup of a tag whose stored record is `record`, by a
/// client accepting `accept` (media types; empty for any), the tag having
/// been confirmed `age` ago (`None`: not since start) on an upstream whose
/// tag TTL is `ttl` (zero: always revalidate). A record of a media type the
/// client does not accept counts as none.
pub fn plan<'a>(
    record: Option<&'a TagRecord>,
    accept: &[String],
    age: Option<Duration>,
    ttl: Duration,
) -> TagPlan<'a> {
    let Some(rec) = record.filter(|r| accepts(accept, &r.media_type)) else {
        return TagPlan::Revalidate { stale: None };
    };
    let fresh = !ttl.is_zero() && age.is_some_and(|a| a < ttl);
    if fresh {
        TagPlan::ServeStored(rec)
    } else {
        TagPlan::Revalidate { stale: Some(rec) }
    }
}

/// How the upstream answered a revalidation that has a stale fallback.
#[derive(Debug)]
pub enum Answer<T> {
    /// The lookup finished within the wait, with this result.
    Done(Result<T>),
    /// No answer from `upstream` within `waited`; the lookup goes on in the
    /// background and refreshes the tag when it can.
    Late { upstream: String, waited: Duration },
}

impl<T> Answer<T> {
    /// Whether the stored manifest may be served instead: the upstream
    /// failed ([`Error::is_upstream_failure`]) or did not answer in time.
    /// Other errors (the tag is unknown, our own failures) stand.
    pub fn may_serve_stale(&self) -> bool {
        match self {
            Answer::Done(Ok(_)) => false,
            Answer::Done(Err(e)) => e.is_upstream_failure(),
            Answer::Late { .. } => true,
        }
    }
}

/// What a request with a stale fallback gets.
#[derive(Debug)]
pub enum Settled<T> {
    /// The upstream's answer.
    Fresh(T),
    /// The stored manifest, because the upstream failed with `cause`.
    Stale { manifest: T, cause: Error },
    /// An error: the upstream's, or its failure with nothing stored.
    Failed(Error),
}

/// Settles a revalidation's `answer` given the manifest the stale record
/// names, `stored` (`None` when no longer stored; only read when
/// [`Answer::may_serve_stale`]). A late answer fails as
/// [`Error::UpstreamUnavailable`].
pub fn settle<T>(answer: Answer<T>, stored: Option<T>) -> Settled<T> {
    let cause = match answer {
        Answer::Done(Ok(m)) => return Settled::Fresh(m),
        Answer::Done(Err(e)) if !e.is_upstream_failure() => return Settled::Failed(e),
        Answer::Done(Err(e)) => e,
        Answer::Late { upstream, waited } => Error::UpstreamUnavailable {
            upstream,
            detail: format!("no answer within {waited:?}"),
        },
    };
    match stored {
        Some(manifest) => Settled::Stale { manifest, cause },
        None => Settled::Failed(cause),
    }
}

/// What a manifest HEAD's status means for the tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadOutcome {
    /// The tag exists: go on to its manifest.
    Found,
    /// 404: the upstream no longer has the tag; forget the stored record, so
    /// it is neither served stale nor listed.
    Forget,
    /// Any other status: an upstream error ([`upstream::status_error`]).
    Failed,
}

/// The outcome of the HEAD that revalidates a tag, by its status (after
/// [`crate::upstream::Upstream::send`] answered challenges, rate limits and
/// redirects).
pub fn after_head(status: StatusCode) -> HeadOutcome {
    if status == StatusCode::NOT_FOUND {
        HeadOutcome::Forget
    } else if status.is_success() {
        HeadOutcome::Found
    } else {
        HeadOutcome::Failed
    }
}

/// Whether a lookup made with `accept` defines the tag: records what it
/// resolved to and confirms it. Only lookups that accept every kind of
/// manifest do, so a narrow client never replaces an index with one
/// platform's manifest.
pub fn defines_tag(accept: &[String]) -> bool {
    accepts(accept, media::OCI_INDEX) && accepts(accept, media::DOCKER_MANIFEST_LIST)
}

impl Mirror {
    /// The manifest `tag` names in `repo` on upstream `up`, for a client
    /// accepting `accept`, as [`plan`] and [`settle`] decide.
    pub(super) async fn manifest_by_tag(
        self: &Arc<Self>,
        up: UpstreamId,
        repo: &RepoName,
        tag: &Tag,
        accept: &[String],
    ) -> Result<StoredManifest> {
        let host = self.host(up);
        let record = self.store.tag(host, repo, tag).await;
        let name: TagName = (up, repo.clone(), tag.clone());
        let ttl = self.upstream(up).config.tag_ttl;
        let stale = match plan(record.as_ref(), accept, self.tags.age(&name), ttl) {
            TagPlan::ServeStored(rec) => {
                if let Some(m) = self.stored_for(host, rec).await {
                    self.metrics.hit(host, "manifest");
                    return Ok(m);
                }
                Some(rec)
            }
            TagPlan::Revalidate { stale } => stale,
        };

        let this = Arc::clone(self);
        let key: LookupKey = (up, repo.clone(), tag.clone(), accept.join(","));
        let (r, t, a) = (repo.clone(), tag.clone(), accept.to_vec());
        let lookup = self.tags.lookups.run(key, move || {
            async move { this.revalidate(up, &r, &t, &a).await }.boxed()
        });
        let Some(rec) = stale else {
            return lookup.await.0;
        };
        let waited = self.timeouts.stale_after;
        let answer = match tokio::time::timeout(waited, lookup).await {
            Ok((r, _)) => Answer::Done(r),
            Err(_) => Answer::Late {
                upstream: host.to_owned(),
                waited,
            },
        };
        let stored = if answer.may_serve_stale() {
            self.stored_for(host, rec).await
        } else {
            None
        };
        match settle(answer, stored) {
            Settled::Fresh(m) => Ok(m),
            Settled::Stale { manifest, cause } => {
                tracing::warn!(upstream = %host, %repo, %tag, error = %cause, "upstream failed; serving cached tag");
                self.metrics
                    .stale_serves
                    .get_or_create(&self.metrics.upstream(host))
                    .inc();
                Ok(manifest)
            }
            Settled::Failed(e) => Err(e),
        }
    }

    /// The stored manifest `rec` names, if it is still stored and readable.
    async fn stored_for(&self, host: &str, rec: &TagRecord) -> Option<StoredManifest> {
        let d: Digest = rec.digest.parse().ok()?;
        self.store.manifest(host, &d).await.ok().flatten()
    }

    /// One HEAD to learn the tag's digest; a GET only for content we lack.
    async fn revalidate(
        self: &Arc<Self>,
        up: UpstreamId,
        repo: &RepoName,
        tag: &Tag,
        accept: &[String],
    ) -> Result<StoredManifest> {
        let host = self.host(up);
        let resp = self
            .manifest_request(up, Method::HEAD, repo, tag, accept)
            .await?;
        match after_head(resp.status()) {
            HeadOutcome::Found => {}
            HeadOutcome::Forget => {
                self.store.remove_tag(host, repo, tag).await?;
                self.tags.forget(&(up, repo.clone(), tag.clone()));
                return Err(Error::ManifestUnknown(format!("{repo}:{tag}")));
            }
            HeadOutcome::Failed => {
                return Err(upstream::status_error(host, "manifest HEAD", resp.status()));
            }
        }
        let digest = super::header_str(resp.headers(), "docker-content-digest")
            .and_then(|v| v.parse::<Digest>().ok());
        let m = match digest {
            Some(d) => match self.store.manifest(host, &d).await? {
                Some(m) => {
                    self.metrics.hit(host, "manifest");
                    m
                }
                None => self.manifest_by_digest(up, repo, &d).await?,
            },
            // Registries that do not report digests on HEAD.
            None => {
                self.fetch_manifest(up, repo, &Reference::Tag(tag.clone()), accept)
                    .await?
            }
        };
        if defines_tag(accept) {
            let rec = TagRecord {
                digest: m.digest.to_string(),
                media_type: m.media_type.clone(),
            };
            if self.store.tag(host, repo, tag).await.as_ref() != Some(&rec) {
                if let Err(e) = self.store.put_tag(host, repo, tag, &rec).await {
                    tracing::warn!(upstream = %host, %repo, %tag, error = %e, "cannot record tag");
                }
            }
            self.tags.confirm((up, repo.clone(), tag.clone()));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn record(media_type: &str) -> TagRecord {
        TagRecord {
            digest: Digest::of(b"m").to_string(),
            media_type: media_type.into(),
        }
    }

    fn list(types: &[&str]) -> Vec<String> {
        types.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn a_tag_confirmed_within_its_ttl_is_served_from_the_store() {
        let rec = record(media::OCI_INDEX);
        let any = list(&[]);
        assert_eq!(
            plan(Some(&rec), &any, Some(MIN), 5 * MIN),
            TagPlan::ServeStored(&rec)
        );
        let wide = list(&[media::OCI_INDEX, media::OCI_MANIFEST]);
        assert_eq!(
            plan(Some(&rec), &wide, Some(Duration::ZERO), 5 * MIN),
            TagPlan::ServeStored(&rec)
        );
    }

    #[test]
    fn an_expired_or_unconfirmed_tag_is_revalidated_with_its_record_as_fallback() {
        let rec = record(media::OCI_INDEX);
        let stale = TagPlan::Revalidate { stale: Some(&rec) };
        assert_eq!(
            plan(Some(&rec), &[], Some(5 * MIN), 5 * MIN),
            stale,
            "expired"
        );
        assert_eq!(plan(Some(&rec), &[], Some(6 * MIN), 5 * MIN), stale);
        assert_eq!(
            plan(Some(&rec), &[], None, 5 * MIN),
            stale,
            "not since start"
        );
        assert_eq!(
            plan(Some(&rec), &[], Some(Duration::ZERO), Duration::ZERO),
            stale,
            "a zero TTL always asks"
        );
    }

    #[test]
    fn without_an_acceptable_record_the_upstream_answer_stands() {
        let none = TagPlan::Revalidate { stale: None };
        assert_eq!(plan(None, &[], Some(Duration::ZERO), 5 * MIN), none);
        // A client that cannot take an index neither gets the stored index
        // nor has it served stale.
        let rec = record(media::OCI_INDEX);
        let narrow = list(&[media::OCI_MANIFEST]);
        assert_eq!(
            plan(Some(&rec), &narrow, Some(Duration::ZERO), 5 * MIN),
            none
        );
        assert_eq!(plan(Some(&rec), &narrow, None, Duration::ZERO), none);
    }

    fn unavailable() -> Error {
        Error::UpstreamUnavailable {
            upstream: "r.example".into(),
            detail: "manifest HEAD answered 503 Service Unavailable".into(),
        }
    }

    #[test]
    fn a_fresh_answer_is_served_whatever_is_stored() {
        let ok = Answer::Done(Ok("fresh"));
        assert!(!ok.may_serve_stale());
        assert!(matches!(
            settle(ok, Some("stored")),
            Settled::Fresh("fresh")
        ));
        assert!(matches!(
            settle(Answer::Done(Ok("fresh")), None),
            Settled::Fresh("fresh")
        ));
    }

    #[test]
    fn errors_that_are_not_upstream_failures_stand() {
        for e in [
            Error::ManifestUnknown("app:gone".into()),
            Error::Internal("disk".into()),
            Error::NameInvalid("x".into()),
        ] {
            let code = e.code();
            let answer: Answer<&str> = Answer::Done(Err(e));
            assert!(!answer.may_serve_stale(), "{code}");
            match settle(answer, Some("stored")) {
                Settled::Failed(e) => assert_eq!(e.code(), code),
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[test]
    fn upstream_failures_serve_the_stored_manifest() {
        for e in [
            unavailable(),
            Error::UpstreamInvalid {
                upstream: "r.example".into(),
                detail: "x".into(),
            },
            Error::Denied {
                upstream: "r.example".into(),
                detail: "x".into(),
            },
            Error::TooManyRequests {
                upstream: "r.example".into(),
                retry_after: None,
            },
        ] {
            let answer = Answer::Done(Err(e.clone()));
            assert!(answer.may_serve_stale(), "{e:?}");
            match settle(answer, Some("stored")) {
                Settled::Stale { manifest, cause } => {
                    assert_eq!(manifest, "stored");
                    assert_eq!(cause.to_string(), e.to_string());
                }
                other => panic!("{e:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_upstream_failure_with_nothing_stored_fails_with_its_error() {
        let answer: Answer<&str> = Answer::Done(Err(unavailable()));
        match settle(answer, None) {
            Settled::Failed(e) => assert_eq!(e.to_string(), unavailable().to_string()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_answer_in_time_serves_stale_or_fails_as_unavailable() {
        let late = || Answer::<&str>::Late {
            upstream: "r.example".into(),
            waited: Duration::from_millis(900),
        };
        assert!(late().may_serve_stale());
        match settle(late(), Some("stored")) {
            Settled::Stale { manifest, cause } => {
                assert_eq!(manifest, "stored");
                assert!(matches!(cause, Error::UpstreamUnavailable { .. }));
            }
            other => panic!("{other:?}"),
        }
        match settle(late(), None) {
            Settled::Failed(e) => {
                assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(
                    e.to_string(),
                    "upstream r.example is unavailable: no answer within 900ms"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_404_forgets_the_tag_and_other_failures_are_errors() {
        assert_eq!(after_head(StatusCode::OK), HeadOutcome::Found);
        assert_eq!(after_head(StatusCode::NOT_FOUND), HeadOutcome::Forget);
        for s in [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_REQUEST,
            StatusCode::NOT_MODIFIED,
        ] {
            assert_eq!(after_head(s), HeadOutcome::Failed, "{s}");
        }
    }

    #[test]
    fn only_lookups_accepting_every_manifest_kind_define_the_tag() {
        assert!(defines_tag(&[]), "no Accept: anything");
        assert!(defines_tag(&list(&["*/*"])));
        assert!(defines_tag(&list(&[
            media::OCI_INDEX,
            media::DOCKER_MANIFEST_LIST,
            media::OCI_MANIFEST,
        ])));
        assert!(!defines_tag(&list(&[
            media::OCI_MANIFEST,
            media::DOCKER_MANIFEST
        ])));
        assert!(!defines_tag(&list(&[media::OCI_INDEX])));
        assert!(!defines_tag(&list(&[media::DOCKER_MANIFEST_LIST])));
    }

    #[test]
    fn confirmations_age_and_are_forgotten() {
        let cache = TagCache::default();
        let tag: TagName = (
            UpstreamId::at(0),
            RepoName::parse("library/app").unwrap(),
            Tag::parse("v1").unwrap(),
        );
        assert_eq!(cache.age(&tag), None);
        cache.confirm(tag.clone());
        assert!(cache.age(&tag).is_some_and(|a| a < MIN));
        let other = (UpstreamId::at(1), tag.1.clone(), tag.2.clone());
        assert_eq!(cache.age(&other), None, "per upstream");
        cache.forget(&tag);
        assert_eq!(cache.age(&tag), None);
    }
}
