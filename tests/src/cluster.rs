//! A cache cluster under test: R `regmirror-cache` members on loopback, each
//! a real process with its own port, storage and name (`m0`, `m1`, ...),
//! knowing the others through `--peer NAME=URL` (issue 16).
//!
//! Ports are picked before any member starts, since every member's command
//! line names every other member's URL. Members are [`CacheProcess`]es, so
//! everything a lone cache offers (logs, store layout, restart, kill -9)
//! works on each; the cluster adds who owns a key ([`Cluster::ranking`]),
//! who holds a blob ([`Cluster::holders`]) and metrics across members.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use regmirror_cache::cluster::ranking::{Key, rank};
use regmirror_cache::oci::{Digest, RepoName, Tag};

use crate::cache::{CacheOptions, CacheProcess};
use crate::util::{free_port, metric_sum};

/// R cache members on loopback; every one is killed on drop.
#[derive(Debug)]
pub struct Cluster {
    members: Vec<CacheProcess>,
    names: Vec<String>,
}

impl Cluster {
    /// Starts `r` members, each seeing all `r` (`--peer` for every member,
    /// itself included), with `--upstream {upstream_host}={upstream_url}`
    /// and `extra` arguments on each; returns once every member answers
    /// `GET /v2/`.
    pub async fn start(
        r: usize,
        upstream_host: &str,
        upstream_url: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let everyone: Vec<usize> = (0..r).collect();
        let views = vec![everyone; r];
        Self::start_with_views(&views, upstream_host, upstream_url, extra).await
    }

    /// Starts one member per entry of `views`: member `i` is `m{i}` and gets
    /// `--peer` for each member listed in `views[i]` and for itself, so
    /// members can be started with views that differ (as while a change of
    /// membership reaches them one by one). Otherwise as [`Cluster::start`].
    pub async fn start_with_views(
        views: &[Vec<usize>],
        upstream_host: &str,
        upstream_url: &str,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_each(views.len(), |i, urls| {
            let mut args = vec![
                "--upstream".to_owned(),
                format!("{upstream_host}={upstream_url}"),
            ];
            let mut seen: Vec<usize> = views[i].iter().copied().chain([i]).collect();
            seen.sort_unstable();
            seen.dedup();
            for j in seen {
                args.push("--peer".to_owned());
                args.push(format!("m{j}={}", urls[j]));
            }
            args.extend(extra.iter().map(|a| (*a).to_owned()));
            args
        })
        .await
    }

    /// Starts `r` members, each with arguments of its own: member `i` is
    /// `m{i}` (`--name`), listens on `urls[i]` (`--listen`; `urls` holds
    /// every member's base URL, `http://127.0.0.1:PORT`, picked before any
    /// starts) and gets `args(i, urls)` besides: its `--upstream`s and
    /// `--peer`s (none are added) and anything else, so members can differ in
    /// upstreams, peer URLs or storage. Returns once every member answers
    /// `GET /v2/`.
    pub async fn start_each(
        r: usize,
        args: impl Fn(usize, &[String]) -> Vec<String>,
    ) -> Result<Self> {
        ensure!(r > 0, "a cluster has at least one member");
        let names: Vec<String> = (0..r).map(|i| format!("m{i}")).collect();
        let mut ports: Vec<u16> = Vec::with_capacity(r);
        while ports.len() < r {
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let starts = (0..r).map(|i| {
            let mut opts = CacheOptions::new()
                .arg("--listen")
                .arg(format!("127.0.0.1:{}", ports[i]))
                .arg("--name")
                .arg(names[i].clone());
            for a in args(i, &urls) {
                opts = opts.arg(a);
            }
            async move {
                CacheProcess::start_with(opts)
                    .await
                    .with_context(|| format!("member m{i}"))
            }
        });
        let members = futures::future::try_join_all(starts).await?;
        Ok(Self { members, names })
    }

    /// Number of members (running or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members (never, once started).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member `i`'s name (`m{i}`).
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Member `i`'s process. Panics when `i` is out of range.
    pub fn member(&self, i: usize) -> &CacheProcess {
        &self.members[i]
    }

    /// Member `i`'s process, to stop, restart or kill it.
    pub fn member_mut(&mut self, i: usize) -> &mut CacheProcess {
        &mut self.members[i]
    }

    /// Every member's process, in order.
    pub fn members(&self) -> &[CacheProcess] {
        &self.members
    }

    /// Member `i`'s base URL (`http://127.0.0.1:PORT`).
    pub fn url(&self, i: usize) -> String {
        self.members[i].url()
    }

    /// SIGKILL member `i` (a crash); its port and storage stay for
    /// [`Cluster::restart`].
    pub fn kill9(&mut self, i: usize) {
        self.members[i].kill9();
    }

    /// Starts member `i` again on the same port and storage with the same
    /// arguments (stopping it first with SIGTERM if it runs); returns once
    /// it answers `GET /v2/`.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.members[i]
            .restart()
            .await
            .with_context(|| format!("restart member m{i}"))
    }

    /// The sum of member `i`'s samples whose line starts with `prefix` and
    /// contains each of `labels` (see [`metric_sum`]), e.g.
    /// `metric(0, "regmirror_cluster_peer_requests_total", &["peer=\"m1\""])`.
    pub async fn metric(&self, i: usize, prefix: &str, labels: &[&str]) -> Result<f64> {
        let text = self.members[i].metrics().await?;
        Ok(metric_sum(&text, prefix, labels))
    }

    /// [`Cluster::metric`] summed over the members that are running.
    pub async fn metric_total(&mut self, prefix: &str, labels: &[&str]) -> Result<f64> {
        let mut sum = 0.0;
        for i in 0..self.len() {
            if self.members[i].is_running() {
                sum += self.metric(i, prefix, labels).await?;
            }
        }
        Ok(sum)
    }

    /// The members (indices) ranked for the content `digest` of upstream
    /// `host`, over the full membership, as the cache ranks them: the first
    /// is the owner, the rest the fallback order.
    pub fn ranking(&self, host: &str, digest: &str) -> Vec<usize> {
        Self::ranking_among(self.len(), host, digest)
    }

    /// [`Cluster::ranking`] over members `m0`..`m{r-1}`, whether or not they
    /// run (to plan what a cluster resized to `r` members will do).
    pub fn ranking_among(r: usize, host: &str, digest: &str) -> Vec<usize> {
        let d: Digest = digest
            .parse()
            .unwrap_or_else(|e| panic!("{digest:?} is not a digest: {e}"));
        let names: Vec<String> = (0..r).map(|i| format!("m{i}")).collect();
        ranked(
            &names,
            &Key::Content {
                upstream: host,
                digest: &d,
            },
        )
    }

    /// The members ranked for the tag lookup `repo:tag` of upstream `host`
    /// (`repo` as the upstream names it, `library/` included for Docker Hub).
    pub fn tag_ranking(&self, host: &str, repo: &str, tag: &str) -> Vec<usize> {
        let repo = RepoName::parse(repo).expect("repository name");
        let tag = Tag::parse(tag).expect("tag");
        ranked(
            &self.names,
            &Key::Tag {
                upstream: host,
                repo: &repo,
                tag: &tag,
            },
        )
    }

    /// The members whose store holds the complete blob `digest` of upstream
    /// `host` ([`crate::StoreLayout::blob`]).
    pub fn holders(&self, host: &str, digest: &str) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.members[i].store().blob(host, digest).exists())
            .collect()
    }

    /// The members with any file named like `digest` (complete or in
    /// progress, blob or manifest; [`crate::StoreLayout::files_named`]).
    pub fn touched(&self, digest: &str) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| !self.members[i].store().files_named(digest).is_empty())
            .collect()
    }

    /// Waits until exactly the members `expected` hold the blob (a client
    /// has its last bytes slightly before the file is renamed into place).
    /// Errors after `timeout`, naming who holds it then.
    pub async fn wait_holders(
        &self,
        host: &str,
        digest: &str,
        expected: &[usize],
        timeout: Duration,
    ) -> Result<()> {
        crate::util::wait_until(timeout, || async { self.holders(host, digest) == expected })
            .await
            .with_context(|| {
                format!(
                    "{digest} held by {:?}, expected {expected:?}",
                    self.holders(host, digest)
                )
            })
    }
}

/// `names` (indices) in the order the cache ranks them for `key`.
fn ranked(names: &[String], key: &Key<'_>) -> Vec<usize> {
    rank(names, key)
        .into_iter()
        .map(|n| names.iter().position(|m| m == n).expect("ranked a member"))
        .collect()
}
