//! Tags: the one mutable name in a registry, so the one thing the cache has
//! to revalidate. Like distribution's `proxytagservice`, a tag is resolved
//! by asking the upstream, with two differences: a tag confirmed within its
//! upstream's `tag_ttl` is served without asking, and when the upstream
//! fails (or is slow) a tag the store knows is served stale.
//!
//! A registry answers a tag according to the client's `Accept` list (an
//! index to clients that take one; to others one platform's manifest, or a
//! 404), so the cache keeps the upstream's last answer per [`AcceptClass`]
//! ([`TagRecord`]), confirms each for the TTL on its own, and serves it stale
//! to its own class. A narrow client's answer never replaces the broad one,
//! and only a broad lookup's 404 says the tag is gone ([`forgotten_by_404`]).
//!
//! The decisions are pure functions ([`AcceptClass::of`], [`plan`],
//! [`settle`], [`forgotten_by_404`], [`with_answer`]); [`TagCache`] holds
//! the state they read (when each answer was confirmed) and the lookups in
//! flight; the IO is `Mirror`'s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;

use super::Mirror;
use crate::error::{Error, Result};
use crate::flight::Flights;
use crate::oci::media::{self, accepts};
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::route::UpstreamId;
use crate::store::{StoredManifest, TagAnswer, TagRecord};
use crate::upstream;

/// A tag on one upstream.
type TagName = (UpstreamId, RepoName, Tag);

/// A tag lookup: the tag and the `Accept` list it was made with (joined),
/// since the upstream may answer each list with a different manifest.
type LookupKey = (UpstreamId, RepoName, Tag, String);

/// The class of an `Accept` list: which of the four manifest kinds a
/// registry chooses between by that list ([`media::ALL_MANIFESTS`]: OCI
/// index, OCI manifest, Docker manifest list, Docker v2 manifest) it admits,
/// as [`media::accepts`] reads it. This is what a registry's answer for a tag
/// depends on (distribution's manifest handler serves the tag's manifest if
/// the list admits its kind, else one platform's manifest of a list, else
/// 404), so two lists of one class get one answer. Schema1 types and other
/// entries do not count: registries serve a schema1 tag whatever the list.
///
/// The broad class, [`AcceptClass::BROAD`], admits all four: no `Accept`, a
/// wildcard, or every kind listed, as containerd, Docker, crane and skopeo
/// send. Its answer is the tag's own manifest, whatever the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AcceptClass(u8);

impl AcceptClass {
    /// Lists that admit every manifest kind.
    pub const BROAD: Self = Self((1 << media::ALL_MANIFESTS.len()) - 1);

    /// The class of `accept` (media types as [`media::parse_accept`] gives
    /// them; empty for no `Accept`, which admits anything).
    pub fn of(accept: &[String]) -> Self {
        let bits = media::ALL_MANIFESTS
            .iter()
            .enumerate()
            .filter(|(_, kind)| accepts(accept, kind))
            .fold(0, |bits, (i, _)| bits | 1 << i);
        Self(bits)
    }

    /// Whether lists of this class admit every manifest kind.
    pub fn is_broad(self) -> bool {
        self == Self::BROAD
    }

    /// The class's name in a [`TagRecord`]: the media types it admits, in
    /// [`media::ALL_MANIFESTS`]' order, joined by `,`; `none` when it admits
    /// none of them.
    pub fn name(self) -> String {
        let admitted: Vec<&str> = media::ALL_MANIFESTS
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & 1 << i != 0)
            .map(|(_, kind)| *kind)
            .collect();
        if admitted.is_empty() {
            "none".to_owned()
        } else {
            admitted.join(",")
        }
    }
}

/// The answer `record` holds for lookups of `class`.
pub fn answer_of(record: &TagRecord, class: AcceptClass) -> Option<&TagAnswer> {
    if class.is_broad() {
        record.broad.as_ref()
    } else {
        record.narrow.get(&class.name())
    }
}

/// `record` with the answer for `class` replaced by `answer` (removed for
/// `None`); every other class's answer as it was.
pub fn with_answer(
    mut record: TagRecord,
    class: AcceptClass,
    answer: Option<TagAnswer>,
) -> TagRecord {
    match (class.is_broad(), answer) {
        (true, answer) => record.broad = answer,
        (false, Some(a)) => {
            record.narrow.insert(class.name(), a);
        }
        (false, None) => {
            record.narrow.remove(&class.name());
        }
    }
    record
}

/// What the cache knows about tags beyond the store's tag records: when each
/// answer was last confirmed with its upstream, and the lookups under way.
#[derive(Default)]
pub struct TagCache {
    /// When each tag's answer for each class was last confirmed with its
    /// upstream, for the tag TTL.
    confirmed: Mutex<HashMap<(TagName, AcceptClass), Instant>>,
    /// Revalidations in flight, one per [`LookupKey`]. They run as tasks, so
    /// one goes on refreshing the tag after a stale answer was served.
    lookups: Flights<LookupKey, StoredManifest>,
    /// Held while a tag record is read, changed and written back, so that
    /// answers recorded for two classes at once are both kept.
    records: tokio::sync::Mutex<()>,
}

impl TagCache {
    /// How long ago `tag`'s answer for `class` was last confirmed; `None` if
    /// never since start.
    fn age(&self, tag: &TagName, class: AcceptClass) -> Option<Duration> {
        let confirmed = self.confirmed.lock().expect("poisoned");
        confirmed.get(&(tag.clone(), class)).map(Instant::elapsed)
    }

    /// Records that the upstream confirmed `tag`'s answer for `class` just now.
    fn confirm(&self, tag: TagName, class: AcceptClass) {
        self.confirmed
            .lock()
            .expect("poisoned")
            .insert((tag, class), Instant::now());
    }

    /// Forgets the confirmations `what` names of `tag`.
    fn forget(&self, tag: &TagName, what: Forget) {
        let mut confirmed = self.confirmed.lock().expect("poisoned");
        match what {
            Forget::Tag => confirmed.retain(|(t, _), _| t != tag),
            Forget::Answer(class) => {
                confirmed.remove(&(tag.clone(), class));
            }
        }
    }
}

/// What a tag lookup does before asking anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagPlan<'a> {
    /// The answer is acceptable and confirmed within the TTL: serve the
    /// manifest it names without asking the upstream. If that manifest is
    /// no longer stored, revalidate with this answer as the stale fallback.
    ServeStored(&'a TagAnswer),
    /// Ask the upstream. With a `stale` answer the wait is bounded by
    /// `stale_after` and an upstream failure serves the answer's manifest;
    /// without one the upstream's answer, whatever it is, stands.
    Revalidate { stale: Option<&'a TagAnswer> },
}

/// The plan for a lookup of a tag whose stored record is `record`, by a
/// client accepting `accept` (media types; empty for any), on an upstream
/// whose tag TTL is `ttl` (zero: always revalidate); `age(class)` is how long
/// ago the tag's answer for `class` was confirmed (`None`: not since start).
///
/// The answers that may serve the client: its own class's, and the broad
/// answer if the client accepts its media type (that is the tag's own
/// manifest, which the upstream gives every list that admits its kind). Of
/// these the more recently confirmed one counts (its own class's on a tie).
/// The class's own answer serves whatever its media type (it is what the
/// upstream gave lists of this class: distribution gives schema1 to lists
/// that do not name it); the broad answer only if the client accepts its
/// media type; a broad client is never given a narrower class's answer.
pub fn plan<'a>(
    record: Option<&'a TagRecord>,
    accept: &[String],
    age: impl Fn(AcceptClass) -> Option<Duration>,
    ttl: Duration,
) -> TagPlan<'a> {
    let class = AcceptClass::of(accept);
    let usable = |a: &&TagAnswer| accepts(accept, &a.media_type);
    // The class's own answer is what the upstream chose for lists like this
    // one, whatever its media type (distribution answers schema1 to lists
    // that do not name it): it serves as it was given.
    let own = record
        .and_then(|r| answer_of(r, class))
        .map(|a| (a, age(class)));
    let broad = record
        .filter(|_| !class.is_broad())
        .and_then(|r| r.broad.as_ref())
        .filter(usable)
        .map(|a| (a, age(AcceptClass::BROAD)));
    let best = match (own, broad) {
        (Some(o), Some(b)) if confirmed_later(b.1, o.1) => Some(b),
        (Some(o), _) => Some(o),
        (None, b) => b,
    };
    let Some((answer, age)) = best else {
        return TagPlan::Revalidate { stale: None };
    };
    let fresh = !ttl.is_zero() && age.is_some_and(|a| a < ttl);
    if fresh {
        TagPlan::ServeStored(answer)
    } else {
        TagPlan::Revalidate {
            stale: Some(answer),
        }
    }
}

/// Whether an answer confirmed `a` ago is newer than one confirmed `b` ago
/// (`None`: not since start, older than any).
fn confirmed_later(a: Option<Duration>, b: Option<Duration>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a < b,
        (Some(_), None) => true,
        (None, _) => false,
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

/// Settles a revalidation's `answer` given the manifest the stale answer
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

/// What the cache forgets of a tag when the upstream answers its lookup
/// with 404.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forget {
    /// The tag: every answer and confirmation, so it is neither served stale
    /// nor listed.
    Tag,
    /// The answer for this class and its confirmation; the other classes'
    /// answers stay, served to their clients (stale too) as before.
    Answer(AcceptClass),
}

/// What a 404 to a tag lookup of `class` forgets. Only a broad lookup's 404
/// says the tag is gone: a narrower list's may say only that the tag names
/// nothing it admits (distribution: "OCI index found, but accept header does
/// not support OCI indexes").
pub fn forgotten_by_404(class: AcceptClass) -> Forget {
    if class.is_broad() {
        Forget::Tag
    } else {
        Forget::Answer(class)
    }
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
        let age = |class| self.tags.age(&name, class);
        let stale = match plan(record.as_ref(), accept, age, ttl) {
            TagPlan::ServeStored(answer) => {
                if let Some(m) = self.stored_for(host, answer).await {
                    self.metrics.hit(host, "manifest");
                    return Ok(m);
                }
                Some(answer)
            }
            TagPlan::Revalidate { stale } => stale,
        };

        let this = Arc::clone(self);
        let key: LookupKey = (up, repo.clone(), tag.clone(), accept.join(","));
        let (r, t, a) = (repo.clone(), tag.clone(), accept.to_vec());
        let lookup = self.tags.lookups.run(key, move || {
            async move { this.revalidate(up, &r, &t, &a).await }.boxed()
        });
        let Some(answer) = stale else {
            return lookup.await.0;
        };
        let waited = self.timeouts.stale_after;
        let result = match tokio::time::timeout(waited, lookup).await {
            Ok((r, _)) => Answer::Done(r),
            Err(_) => Answer::Late {
                upstream: host.to_owned(),
                waited,
            },
        };
        let stored = if result.may_serve_stale() {
            self.stored_for(host, answer).await
        } else {
            None
        };
        match settle(result, stored) {
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

    /// The stored manifest `answer` names, if it is still stored and readable.
    async fn stored_for(&self, host: &str, answer: &TagAnswer) -> Option<StoredManifest> {
        let d: Digest = answer.digest.parse().ok()?;
        self.store.manifest(host, &d).await.ok().flatten()
    }

    /// One HEAD to learn the tag's digest; a GET only for content we lack,
    /// or when the upstream refuses HEAD ([`upstream::Upstream::head`]).
    /// The answer is recorded for the class of `accept`.
    async fn revalidate(
        self: &Arc<Self>,
        up: UpstreamId,
        repo: &RepoName,
        tag: &Tag,
        accept: &[String],
    ) -> Result<StoredManifest> {
        let host = self.host(up);
        let name: TagName = (up, repo.clone(), tag.clone());
        let class = AcceptClass::of(accept);
        let m = match self.manifest_head(up, repo, tag, accept).await? {
            // HEAD refused: the GET by tag answers instead.
            None => self.fetch_tag(&name, class, accept).await?,
            Some(resp) if resp.status().is_success() => {
                let digest = super::header_str(resp.headers(), "docker-content-digest")
                    .and_then(|v| v.parse::<Digest>().ok());
                match digest {
                    Some(d) => match self.store.manifest(host, &d).await? {
                        Some(m) => {
                            self.metrics.hit(host, "manifest");
                            m
                        }
                        // A digest the registry names but does not serve by
                        // digest (distribution 2.8 converting an image to
                        // schema1 for a schema1-only client): the tag's GET.
                        None => match self.manifest_by_digest(up, repo, &d).await {
                            Err(Error::ManifestUnknown(_)) => {
                                self.fetch_tag(&name, class, accept).await?
                            }
                            other => other?,
                        },
                    },
                    // Registries that do not report digests on HEAD.
                    None => self.fetch_tag(&name, class, accept).await?,
                }
            }
            Some(resp) => {
                return Err(upstream::status_error(host, "manifest HEAD", resp.status()));
            }
        };
        self.record_answer(&name, class, &m).await;
        Ok(m)
    }

    /// The manifest `tag` names, by a GET of the tag (verified and stored as
    /// every fetch is). On a 404 it forgets what [`forgotten_by_404`] says.
    async fn fetch_tag(
        &self,
        name: &TagName,
        class: AcceptClass,
        accept: &[String],
    ) -> Result<StoredManifest> {
        let (up, repo, tag) = name;
        let by_tag = Reference::Tag(tag.clone());
        match self.fetch_manifest(*up, repo, &by_tag, accept).await {
            Err(Error::ManifestUnknown(_)) => {
                self.forget_tag(name, forgotten_by_404(class)).await?;
                Err(Error::ManifestUnknown(format!("{repo}:{tag}")))
            }
            other => other,
        }
    }

    /// Records `m` as `name`'s answer for `class`, confirmed just now. The
    /// record is rewritten only when the answer changed; failing to write it
    /// costs caching, not the answer.
    async fn record_answer(&self, name: &TagName, class: AcceptClass, m: &StoredManifest) {
        let (up, repo, tag) = name;
        let host = self.host(*up);
        let answer = TagAnswer {
            digest: m.digest.to_string(),
            media_type: m.media_type.clone(),
        };
        // Mostly the answer is what the record holds already: that read
        // needs no lock. Only a change takes it (one for every tag, so that
        // answers recorded for two classes at once are both kept) and reads
        // the record again under it.
        let unchanged = |record: &TagRecord| answer_of(record, class) == Some(&answer);
        let current = self.store.tag(host, repo, tag).await.unwrap_or_default();
        if !unchanged(&current) {
            let _writing = self.tags.records.lock().await;
            let record = self.store.tag(host, repo, tag).await.unwrap_or_default();
            if !unchanged(&record) {
                let record = with_answer(record, class, Some(answer));
                if let Err(e) = self.store.put_tag(host, repo, tag, &record).await {
                    tracing::warn!(upstream = %host, %repo, %tag, error = %e, "cannot record tag");
                }
            }
        }
        self.tags.confirm(name.clone(), class);
    }

    /// Forgets `what` of `name`, in memory and in the store (the record goes
    /// when no answer is left in it).
    async fn forget_tag(&self, name: &TagName, what: Forget) -> Result<()> {
        let (up, repo, tag) = name;
        let host = self.host(*up);
        self.tags.forget(name, what);
        let _writing = self.tags.records.lock().await;
        let record = match what {
            Forget::Tag => None,
            Forget::Answer(class) => match self.store.tag(host, repo, tag).await {
                Some(r) if answer_of(&r, class).is_none() => return Ok(()),
                Some(r) => Some(with_answer(r, class, None)).filter(|r| !r.is_empty()),
                None => return Ok(()),
            },
        };
        match record {
            Some(r) => self.store.put_tag(host, repo, tag, &r).await?,
            None => self.store.remove_tag(host, repo, tag).await?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    const MIN: Duration = Duration::from_secs(60);

    fn answer(body: &[u8], media_type: &str) -> TagAnswer {
        TagAnswer {
            digest: Digest::of(body).to_string(),
            media_type: media_type.into(),
        }
    }

    /// A record holding only a broad answer naming a manifest of `media_type`.
    fn record(media_type: &str) -> TagRecord {
        TagRecord {
            broad: Some(answer(b"m", media_type)),
            ..TagRecord::default()
        }
    }

    fn list(types: &[&str]) -> Vec<String> {
        types.iter().map(|t| t.to_string()).collect()
    }

    /// Every answer confirmed `age` ago.
    fn all(age: Option<Duration>) -> impl Fn(AcceptClass) -> Option<Duration> {
        move |_| age
    }

    #[test]
    fn a_tag_confirmed_within_its_ttl_is_served_from_the_store() {
        let rec = record(media::OCI_INDEX);
        let stored = rec.broad.as_ref().unwrap();
        let any = list(&[]);
        assert_eq!(
            plan(Some(&rec), &any, all(Some(MIN)), 5 * MIN),
            TagPlan::ServeStored(stored)
        );
        let wide = list(&[media::OCI_INDEX, media::OCI_MANIFEST]);
        assert_eq!(
            plan(Some(&rec), &wide, all(Some(Duration::ZERO)), 5 * MIN),
            TagPlan::ServeStored(stored)
        );
    }

    #[test]
    fn an_expired_or_unconfirmed_tag_is_revalidated_with_its_record_as_fallback() {
        let rec = record(media::OCI_INDEX);
        let stale = TagPlan::Revalidate {
            stale: rec.broad.as_ref(),
        };
        assert_eq!(
            plan(Some(&rec), &[], all(Some(5 * MIN)), 5 * MIN),
            stale,
            "expired"
        );
        assert_eq!(plan(Some(&rec), &[], all(Some(6 * MIN)), 5 * MIN), stale);
        assert_eq!(
            plan(Some(&rec), &[], all(None), 5 * MIN),
            stale,
            "not since start"
        );
        assert_eq!(
            plan(Some(&rec), &[], all(Some(Duration::ZERO)), Duration::ZERO),
            stale,
            "a zero TTL always asks"
        );
    }

    #[test]
    fn without_an_acceptable_record_the_upstream_answer_stands() {
        let none = TagPlan::Revalidate { stale: None };
        assert_eq!(plan(None, &[], all(Some(Duration::ZERO)), 5 * MIN), none);
        // A client that cannot take an index neither gets the stored index
        // nor has it served stale.
        let rec = record(media::OCI_INDEX);
        let narrow = list(&[media::OCI_MANIFEST]);
        assert_eq!(
            plan(Some(&rec), &narrow, all(Some(Duration::ZERO)), 5 * MIN),
            none
        );
        assert_eq!(plan(Some(&rec), &narrow, all(None), Duration::ZERO), none);
    }

    #[test]
    fn a_narrow_answer_is_kept_beside_the_broad_one_and_serves_its_class() {
        let index = answer(b"index", media::OCI_INDEX);
        let amd64 = answer(b"amd64", media::DOCKER_MANIFEST);
        let schema2 = list(&[media::DOCKER_MANIFEST]);
        let class = AcceptClass::of(&schema2);
        let rec = with_answer(
            with_answer(
                TagRecord::default(),
                AcceptClass::BROAD,
                Some(index.clone()),
            ),
            class,
            Some(amd64.clone()),
        );
        assert_eq!(answer_of(&rec, AcceptClass::BROAD), Some(&index));
        assert_eq!(answer_of(&rec, class), Some(&amd64));
        // The narrow client is served its own class's answer, fresh or stale.
        assert_eq!(
            plan(Some(&rec), &schema2, all(Some(MIN)), 5 * MIN),
            TagPlan::ServeStored(&amd64)
        );
        assert_eq!(
            plan(Some(&rec), &schema2, all(None), 5 * MIN),
            TagPlan::Revalidate {
                stale: Some(&amd64)
            }
        );
        // Broad clients never get it: the index stays theirs.
        for broad in [list(&[]), list(&["*/*"]), list(&media::ALL_MANIFESTS)] {
            assert_eq!(
                plan(Some(&rec), &broad, all(None), 5 * MIN),
                TagPlan::Revalidate {
                    stale: Some(&index)
                },
                "{broad:?}"
            );
        }
        // Another narrow class has no answer of its own, and cannot take
        // the index.
        let oci_only = list(&[media::OCI_MANIFEST]);
        assert_eq!(
            plan(Some(&rec), &oci_only, all(None), 5 * MIN),
            TagPlan::Revalidate { stale: None }
        );
        // Answers of one class leave the others as they were.
        let without = with_answer(rec.clone(), class, None);
        assert_eq!(without, record_with_broad(index.clone()));
        assert_eq!(
            with_answer(rec.clone(), AcceptClass::BROAD, None).narrow,
            rec.narrow
        );
    }

    fn record_with_broad(a: TagAnswer) -> TagRecord {
        TagRecord {
            broad: Some(a),
            ..TagRecord::default()
        }
    }

    /// distribution answers schema1 (pushed, or converted from schema 2) to
    /// lists that name neither it nor the tag's own kind: that answer is the
    /// class's, and serves it, stale too, although the list does not name it.
    #[test]
    fn a_class_answer_of_a_type_the_list_does_not_name_still_serves_it() {
        let signed = answer(b"s1", media::DOCKER_MANIFEST_V1_SIGNED);
        let oci_only = list(&[media::OCI_MANIFEST]);
        let class = AcceptClass::of(&oci_only);
        let rec = with_answer(TagRecord::default(), class, Some(signed.clone()));
        assert_eq!(
            plan(Some(&rec), &oci_only, all(None), 5 * MIN),
            TagPlan::Revalidate {
                stale: Some(&signed)
            }
        );
        // A broad answer of that type is not given to the narrow list.
        let rec = record_with_broad(signed);
        assert_eq!(
            plan(Some(&rec), &oci_only, all(None), 5 * MIN),
            TagPlan::Revalidate { stale: None }
        );
    }

    #[test]
    fn a_broad_answer_the_client_accepts_serves_a_narrow_class_too() {
        let manifest = answer(b"m", media::OCI_MANIFEST);
        let rec = record_with_broad(manifest.clone());
        let oci_only = list(&[media::OCI_MANIFEST]);
        let broad_age = |c: AcceptClass| c.is_broad().then_some(MIN);
        assert_eq!(
            plan(Some(&rec), &oci_only, broad_age, 5 * MIN),
            TagPlan::ServeStored(&manifest),
            "confirmed for broad clients within the TTL"
        );
        assert_eq!(
            plan(Some(&rec), &oci_only, all(None), 5 * MIN),
            TagPlan::Revalidate {
                stale: Some(&manifest)
            }
        );
        // Of the class's own answer and the broad one, the more recently
        // confirmed counts; the class's own on a tie.
        let older = answer(b"older", media::OCI_MANIFEST);
        let class = AcceptClass::of(&oci_only);
        let both = with_answer(rec.clone(), class, Some(older.clone()));
        let ages = |own: Option<Duration>, broad: Option<Duration>| {
            move |c: AcceptClass| if c.is_broad() { broad } else { own }
        };
        for (own, broad, want) in [
            (Some(6 * MIN), Some(5 * MIN), &manifest),
            (None, Some(9 * MIN), &manifest),
            (Some(5 * MIN), Some(6 * MIN), &older),
            (Some(5 * MIN), None, &older),
            (None, None, &older),
            (Some(5 * MIN), Some(5 * MIN), &older),
        ] {
            assert_eq!(
                plan(Some(&both), &oci_only, ages(own, broad), MIN),
                TagPlan::Revalidate { stale: Some(want) },
                "{own:?} {broad:?}"
            );
        }
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
    fn a_404_forgets_the_tag_only_for_a_lookup_accepting_every_kind() {
        assert_eq!(forgotten_by_404(AcceptClass::BROAD), Forget::Tag);
        for narrow in [
            list(&[media::DOCKER_MANIFEST]),
            list(&[media::OCI_MANIFEST]),
            list(&[media::OCI_INDEX, media::DOCKER_MANIFEST_LIST]),
            list(&[media::DOCKER_MANIFEST_V1_SIGNED]),
        ] {
            let class = AcceptClass::of(&narrow);
            assert_eq!(forgotten_by_404(class), Forget::Answer(class), "{narrow:?}");
        }
    }

    #[test]
    fn only_lookups_accepting_every_manifest_kind_are_broad() {
        let broad = |a: &[&str]| AcceptClass::of(&list(a)).is_broad();
        assert!(broad(&[]), "no Accept: anything");
        assert!(broad(&["*/*"]));
        assert!(broad(&["application/*"]));
        assert!(broad(&media::ALL_MANIFESTS));
        assert!(broad(&[
            media::DOCKER_MANIFEST_V1_SIGNED,
            media::DOCKER_MANIFEST,
            media::DOCKER_MANIFEST_LIST,
            media::OCI_MANIFEST,
            media::OCI_INDEX,
            "application/json",
        ]));
        // Every kind counts: a list without the Docker v2 manifest gets a
        // 404 for a tag naming one (distribution).
        assert!(!broad(&[
            media::OCI_INDEX,
            media::DOCKER_MANIFEST_LIST,
            media::OCI_MANIFEST,
        ]));
        assert!(!broad(&[media::OCI_MANIFEST, media::DOCKER_MANIFEST]));
        assert!(!broad(&[media::OCI_INDEX]));
        assert!(!broad(&[media::DOCKER_MANIFEST_LIST]));
    }

    #[test]
    fn lists_admitting_the_same_kinds_are_one_class() {
        let class = |a: &[&str]| AcceptClass::of(&list(a));
        assert_eq!(
            class(&[media::OCI_MANIFEST, media::DOCKER_MANIFEST]),
            class(&[
                media::DOCKER_MANIFEST,
                media::DOCKER_MANIFEST_V1_SIGNED,
                media::OCI_MANIFEST
            ]),
            "order and schema1 do not count"
        );
        assert_ne!(
            class(&[media::OCI_MANIFEST]),
            class(&[media::DOCKER_MANIFEST])
        );
        assert_eq!(
            class(&[media::DOCKER_MANIFEST, media::OCI_MANIFEST]).name(),
            format!("{},{}", media::OCI_MANIFEST, media::DOCKER_MANIFEST)
        );
        assert_eq!(class(&["application/json"]).name(), "none");
        assert_eq!(AcceptClass::BROAD.name(), media::ALL_MANIFESTS.join(","));
    }

    #[test]
    fn confirmations_age_and_are_forgotten() {
        let cache = TagCache::default();
        let tag: TagName = (
            UpstreamId::at(0),
            RepoName::parse("library/app").unwrap(),
            Tag::parse("v1").unwrap(),
        );
        let broad = AcceptClass::BROAD;
        assert_eq!(cache.age(&tag, broad), None);
        cache.confirm(tag.clone(), broad);
        assert!(cache.age(&tag, broad).is_some_and(|a| a < MIN));
        let other = (UpstreamId::at(1), tag.1.clone(), tag.2.clone());
        assert_eq!(cache.age(&other, broad), None, "per upstream");
        cache.forget(&tag, Forget::Tag);
        assert_eq!(cache.age(&tag, broad), None);
    }

    #[test]
    fn confirmations_are_per_class_and_a_narrow_404_forgets_its_own() {
        let cache = TagCache::default();
        let tag: TagName = (
            UpstreamId::at(0),
            RepoName::parse("library/app").unwrap(),
            Tag::parse("v1").unwrap(),
        );
        let narrow = AcceptClass::of(&list(&[media::OCI_MANIFEST]));
        cache.confirm(tag.clone(), narrow);
        assert_eq!(cache.age(&tag, AcceptClass::BROAD), None);
        cache.confirm(tag.clone(), AcceptClass::BROAD);
        cache.forget(&tag, Forget::Answer(narrow));
        assert_eq!(cache.age(&tag, narrow), None);
        assert!(cache.age(&tag, AcceptClass::BROAD).is_some());
        cache.confirm(tag.clone(), narrow);
        cache.forget(&tag, Forget::Tag);
        assert_eq!(cache.age(&tag, narrow), None);
        assert_eq!(cache.age(&tag, AcceptClass::BROAD), None);
    }
}
