//! A cache cluster (issue 16): R `regmirror-cache` members on loopback in
//! front of one upstream (Debian's docker-registry, behind a [`FaultGate`]
//! that throttles it where a fill must stay in flight). Each key has one
//! owner; the others stream from it, so a blob costs one upstream GET and
//! lives on one member's disk whichever members clients ask.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use regmirror_e2e::seed::{self, ImageSpec};
use regmirror_e2e::util::{bounded, http_client, received_at_least, sha256_digest, wait_until};
use regmirror_e2e::{Cluster, FaultGate, Registry, RequestLog};

const HOST: &str = "docker.io";
const REPO: &str = "library/app";

/// The registry, and the gate the members reach it through.
struct Upstream {
    registry: Registry,
    gate: FaultGate,
}

impl Upstream {
    async fn start() -> Result<Self> {
        let registry = Registry::start().await?;
        let gate = FaultGate::start(registry.host().parse()?).await?;
        Ok(Self { registry, gate })
    }

    /// Pushes `size` random bytes as a blob of [`REPO`]; returns its digest.
    async fn blob(&self, size: usize) -> Result<String> {
        let mut bytes = vec![0u8; size];
        aws_lc_rs::rand::fill(&mut bytes).context("random bytes")?;
        seed::push_blob(&self.registry.url(), REPO, bytes).await
    }

    /// GETs of `digest`'s blob the registry answered, and their bytes, once
    /// every answered request is in its log.
    async fn blob_gets(&self, digest: &str) -> Result<(usize, u64)> {
        self.registry.sync_log().await?;
        let path = format!("/blobs/{digest}");
        let gets: Vec<u64> = self
            .registry
            .access_log()
            .into_iter()
            .filter(|e| e.method == "GET" && e.path.contains(&path))
            .map(|e| e.bytes)
            .collect();
        Ok((gets.len(), gets.iter().sum()))
    }

    /// Every request the registry answered so far.
    async fn requests(&self) -> Result<usize> {
        self.registry.sync_log().await?;
        Ok(self.registry.access_log().len())
    }
}

fn blob_url(cluster: &Cluster, member: usize, digest: &str) -> String {
    format!("{}/v2/{REPO}/blobs/{digest}", cluster.url(member))
}

/// How one download ended: its status, and the sha256 digest and length of
/// the body when it arrived whole (`None`: cut short, with the error).
#[derive(Debug)]
struct Got {
    status: u16,
    digest: Option<String>,
    len: usize,
    error: Option<String>,
}

impl Got {
    /// Complete with status 200 and the bytes of `digest`.
    fn ensure_whole(&self, digest: &str) -> Result<()> {
        ensure!(
            self.status == 200 && self.digest.as_deref() == Some(digest),
            "expected {digest} whole, got {self:?}"
        );
        Ok(())
    }
}

/// GETs `url`, hashing the body as it arrives (never held whole: 16 clients
/// of a 40 MB blob); `received` counts its bytes. With `pace`, reads at most
/// that many bytes per second, as a slow client does.
async fn download(url: String, received: Arc<AtomicUsize>, pace: Option<u64>) -> Got {
    let mut got = Got {
        status: 0,
        digest: None,
        len: 0,
        error: None,
    };
    let mut resp = match http_client().get(&url).send().await {
        Ok(r) => r,
        Err(e) => {
            got.error = Some(format!("{e:#}"));
            return got;
        }
    };
    got.status = resp.status().as_u16();
    let mut hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let started = tokio::time::Instant::now();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                hash.update(&chunk);
                got.len += chunk.len();
                received.store(got.len, Ordering::Relaxed);
                if let Some(rate) = pace {
                    let due = started + Duration::from_secs_f64(got.len as f64 / rate as f64);
                    tokio::time::sleep_until(due).await;
                }
            }
            Ok(None) => {
                got.digest = Some(format!("sha256:{}", hex::encode(hash.finish())));
                return got;
            }
            Err(e) => {
                got.error = Some(format!("{e:#}"));
                return got;
            }
        }
    }
}

/// [`download`] in a task, with its byte counter.
fn spawn_download(
    url: String,
    pace: Option<u64>,
) -> (tokio::task::JoinHandle<Got>, Arc<AtomicUsize>) {
    let received = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(download(url, Arc::clone(&received), pace));
    (task, received)
}

/// Test 1 of issue 16: 16 cold clients spread over R = 1, 2, 4 members on
/// one 40 MB blob cost one upstream GET (1x the bytes), every body right;
/// a client that comes 1 s into the fill, on another member, joins it.
#[tokio::test]
async fn cold_clients_on_every_member_share_one_upstream_fetch() {
    bounded(100, async {
        const SIZE: usize = 40 << 20;
        const CLIENTS: usize = 16;
        let up = Upstream::start().await?;
        for r in [1, 2, 4] {
            let cluster = Cluster::start(r, HOST, &up.gate.url(), &[]).await?;
            let digest = up.blob(SIZE).await?;
            // About 2 s of fill: the late client comes in its middle.
            up.gate.throttle(Some(20 << 20));
            let mut clients: Vec<_> = (0..CLIENTS - 1)
                .map(|k| spawn_download(blob_url(&cluster, k % r, &digest), None))
                .collect();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let furthest = clients
                .iter()
                .map(|(_, n)| n.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0);
            ensure!(
                furthest < SIZE,
                "R={r}: the fill was over before the late client came"
            );
            let owner = cluster.ranking(HOST, &digest)[0];
            clients.push(spawn_download(
                blob_url(&cluster, (owner + 1) % r, &digest),
                None,
            ));
            for (k, (task, _)) in clients.into_iter().enumerate() {
                task.await?
                    .ensure_whole(&digest)
                    .with_context(|| format!("R={r}, client {k}"))?;
            }
            let (gets, bytes) = up.blob_gets(&digest).await?;
            ensure!(
                (gets, bytes) == (1, SIZE as u64),
                "R={r}: {gets} upstream GETs, {bytes} bytes for one {SIZE}-byte blob"
            );
            cluster
                .wait_holders(HOST, &digest, &[owner], Duration::from_secs(10))
                .await?;
            up.gate.throttle(None);
        }
        Ok(())
    })
    .await;
}

/// Test 2 of issue 16: content stored via any member costs no upstream
/// request when asked on any other (blob GET and HEAD, manifest by digest,
/// and with a tag TTL the tag too); each blob is on one member's disk; the
/// tag is asked of the upstream once in its TTL window, cluster-wide.
#[tokio::test]
async fn content_stored_via_one_member_is_served_by_all_without_the_upstream() {
    bounded(60, async {
        let up = Upstream::start().await?;
        let image =
            seed::push_image(&up.registry.url(), REPO, "v1", &ImageSpec::oci(&[600_000])).await?;
        let cluster = Cluster::start(3, HOST, &up.gate.url(), &["--tag-ttl", "1h"]).await?;
        let client = http_client();
        // A pull through member 0: tag, manifest by digest, blobs.
        let pull = |member: usize| {
            let cluster = &cluster;
            let image = &image;
            let client = &client;
            async move {
                let m = seed::fetch_manifest(&cluster.url(member), REPO, "v1").await?;
                ensure!(m.body == image.manifest, "m{member}: manifest by tag");
                let m = seed::fetch_manifest(&cluster.url(member), REPO, &image.digest).await?;
                ensure!(m.body == image.manifest, "m{member}: manifest by digest");
                for b in image.blobs() {
                    let url = blob_url(cluster, member, &b.digest);
                    let head = client.head(&url).send().await?;
                    ensure!(
                        head.status() == 200
                            && head.headers()["content-length"] == b.size().to_string().as_str()
                            && head.headers()["docker-content-digest"] == b.digest.as_str(),
                        "m{member}: HEAD {}: {head:?}",
                        b.digest
                    );
                    let body = seed::fetch_blob(&cluster.url(member), REPO, &b.digest).await?;
                    ensure!(body == b.bytes, "m{member}: blob {}", b.digest);
                }
                Ok(())
            }
        };
        pull(0).await?;
        for b in image.blobs() {
            let owner = cluster.ranking(HOST, &b.digest)[0];
            cluster
                .wait_holders(HOST, &b.digest, &[owner], Duration::from_secs(10))
                .await?;
        }
        let before = up.requests().await?;
        pull(1).await?;
        pull(2).await?;
        pull(0).await?;
        let after = up.requests().await?;
        ensure!(
            after == before,
            "{} upstream requests for content stored via m0: {:?}",
            after - before,
            &up.registry.access_log()[before..]
        );
        for b in image.blobs() {
            ensure!(
                cluster.holders(HOST, &b.digest) == [cluster.ranking(HOST, &b.digest)[0]],
                "{} stored on {:?}",
                b.digest,
                cluster.holders(HOST, &b.digest)
            );
        }
        // The manifest is content (kept by its digest's owner) and the
        // tag's answer (kept by the tag's owner): on those two at most.
        let keepers = [
            cluster.ranking(HOST, &image.digest)[0],
            cluster.tag_ranking(HOST, REPO, "v1")[0],
        ];
        let touched = cluster.touched(&image.digest);
        ensure!(
            touched.iter().all(|m| keepers.contains(m)),
            "manifest stored on {touched:?}, kept by {keepers:?}"
        );
        let tag_lookups = up.registry.count("HEAD", "/manifests/v1");
        ensure!(
            tag_lookups <= 1,
            "{tag_lookups} tag HEADs in one TTL window"
        );
        Ok(())
    })
    .await;
}

/// Every stored content file of member `i` with its size and inode (a file
/// replaced or rewritten shows; reads refresh modification times, so those
/// are left out).
fn content_files(cluster: &Cluster, i: usize) -> Result<Vec<(std::path::PathBuf, u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    let mut files = Vec::new();
    for (path, size) in cluster.member(i).store().verified_content()? {
        let ino = std::fs::metadata(&path)?.ino();
        files.push((path, size, ino));
    }
    files.sort();
    Ok(files)
}

/// Test 4 of issue 16: a member that stops, restarts, is killed (-9) and
/// starts again hurts no other member: slow readers of a blob its owner
/// holds, on the owner and through a third member, finish with the right
/// bytes, and no other member's files change.
#[tokio::test]
async fn restarting_or_killing_one_member_hurts_no_other() {
    bounded(90, async {
        const SIZE: usize = 12 << 20;
        let up = Upstream::start().await?;
        let mut cluster = Cluster::start(3, HOST, &up.gate.url(), &[]).await?;
        let digest = up.blob(SIZE).await?;
        let ranking = cluster.ranking(HOST, &digest);
        let (owner, other, victim) = (ranking[0], ranking[1], ranking[2]);
        // Fetched through a member that does not own it: stored on the owner.
        download(blob_url(&cluster, other, &digest), Arc::default(), None)
            .await
            .ensure_whole(&digest)?;
        cluster
            .wait_holders(HOST, &digest, &[owner], Duration::from_secs(10))
            .await?;
        let files = [
            content_files(&cluster, owner)?,
            content_files(&cluster, other)?,
        ];
        // About 12 s each, longer than what the victim goes through (a 5 s
        // drain on SIGTERM, two starts).
        let pace = Some((SIZE / 12) as u64);
        let readers = [
            spawn_download(blob_url(&cluster, owner, &digest), pace),
            spawn_download(blob_url(&cluster, other, &digest), pace),
        ];
        for (_, received) in &readers {
            received_at_least(received, 1 << 20).await?;
        }
        cluster.restart(victim).await?;
        cluster.kill9(victim);
        cluster.restart(victim).await?;
        ensure!(
            readers
                .iter()
                .all(|(_, received)| received.load(Ordering::Relaxed) < SIZE),
            "a reader finished before the victim was done: not slow enough to tell"
        );
        for (task, _) in readers {
            task.await?.ensure_whole(&digest)?;
        }
        ensure!(
            [
                content_files(&cluster, owner)?,
                content_files(&cluster, other)?
            ] == files,
            "files of other members changed"
        );
        let (gets, _) = up.blob_gets(&digest).await?;
        ensure!(gets == 1, "{gets} upstream GETs");
        Ok(())
    })
    .await;
}

/// Test 5 of issue 16: the owner killed (-9) mid-fill: no client anywhere
/// gets wrong bytes (cut transfers are allowed), the next-ranked member
/// takes the blob over with exactly one more upstream GET, and the killed
/// member starts again with a store that verifies and no temp files left.
#[tokio::test]
async fn killing_the_owner_mid_fill_costs_one_more_fetch_and_never_wrong_bytes() {
    bounded(90, async {
        const SIZE: usize = 8 << 20;
        let up = Upstream::start().await?;
        let mut cluster = Cluster::start(3, HOST, &up.gate.url(), &[]).await?;
        let digest = up.blob(SIZE).await?;
        let ranking = cluster.ranking(HOST, &digest);
        let (owner, next) = (ranking[0], ranking[1]);
        up.gate.throttle(Some(4 << 20));
        let first: Vec<_> = (0..6)
            .map(|k| spawn_download(blob_url(&cluster, k % 3, &digest), None))
            .collect();
        for (_, received) in &first {
            received_at_least(received, 1 << 20).await?;
        }
        cluster.kill9(owner);
        let mut results = Vec::new();
        for (task, _) in first {
            results.push(task.await?);
        }
        // Whoever was cut asks again, on a member still running.
        let survivors: Vec<usize> = (0..3).filter(|&i| i != owner).collect();
        let again: Vec<_> = (0..4)
            .map(|k| spawn_download(blob_url(&cluster, survivors[k % 2], &digest), None))
            .collect();
        for (task, _) in again {
            let got = task.await?;
            got.ensure_whole(&digest).context("after the takeover")?;
            results.push(got);
        }
        for got in &results {
            if got.error.is_none() && got.status == 200 {
                ensure!(
                    got.digest.as_deref() == Some(digest.as_str()),
                    "a complete body with wrong bytes: {got:?}"
                );
            }
        }
        cluster
            .wait_holders(HOST, &digest, &[next], Duration::from_secs(10))
            .await?;
        ensure!(
            cluster
                .metric(next, "regmirror_cluster_takeovers_total", &[])
                .await?
                >= 1.0,
            "m{next} counted no takeover"
        );
        // The killed fill's GET is logged once the registry notices the cut.
        up.registry
            .wait_count(
                "GET",
                &format!("/blobs/{digest}"),
                2,
                Duration::from_secs(10),
            )
            .await?;
        let (gets, _) = up.blob_gets(&digest).await?;
        ensure!(
            gets == 2,
            "{gets} upstream GETs: expected the owner's and one takeover"
        );
        cluster.restart(owner).await?;
        let store = cluster.member(owner).store();
        wait_until(Duration::from_secs(10), || async {
            store.temp_files().is_ok_and(|n| n == 0)
        })
        .await
        .context("temp files of the killed fill left")?;
        store.verified_content()?;
        Ok(())
    })
    .await;
}

/// Test 7 of issue 16: while members see different memberships (m2 does
/// not know m0 yet), clients on every member cost at most 2 upstream GETs
/// per blob, and every body is right (no request loops between members).
#[tokio::test]
async fn members_with_different_views_fetch_a_blob_at_most_twice() {
    bounded(60, async {
        const SIZE: usize = 1 << 20;
        let up = Upstream::start().await?;
        let views = [vec![0, 1, 2], vec![0, 1, 2], vec![1, 2]];
        let cluster = Cluster::start_with_views(&views, HOST, &up.gate.url(), &[]).await?;
        let mut digests = Vec::new();
        for _ in 0..6 {
            digests.push(up.blob(SIZE).await?);
        }
        // Fills take a moment, so that requests on all members meet them.
        up.gate.throttle(Some(4 << 20));
        let downloads: Vec<_> = digests
            .iter()
            .flat_map(|d| (0..6).map(move |k| (d.clone(), k % 3)))
            .map(|(d, member)| {
                (
                    d.clone(),
                    spawn_download(blob_url(&cluster, member, &d), None),
                )
            })
            .collect();
        for (d, (task, _)) in downloads {
            task.await?.ensure_whole(&d)?;
        }
        for d in &digests {
            let (gets, _) = up.blob_gets(d).await?;
            ensure!(gets <= 2, "{gets} upstream GETs of {d}");
        }
        Ok(())
    })
    .await;
}

/// One answer as compared between members: status, the headers that are
/// the answer's (not the connection's or the moment's), and the body.
async fn answer(
    req: reqwest::RequestBuilder,
) -> Result<(u16, Vec<(String, String)>, bytes::Bytes)> {
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let mut headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .filter(|(n, _)| !matches!(n.as_str(), "date" | "connection" | "keep-alive"))
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    headers.sort();
    Ok((status, headers, resp.bytes().await?))
}

/// Through a member that does not own a blob, HEAD and Range requests (206
/// with `Content-Range`, 416), a manifest by digest and an unknown blob
/// (404) answer byte for byte as the owner does, and cost no upstream GET;
/// a request carrying `Regmirror-Hop` is served by the member it reaches.
#[tokio::test]
async fn a_non_owner_answers_as_the_owner_and_a_hop_request_is_served_locally() {
    bounded(60, async {
        let up = Upstream::start().await?;
        let image = seed::push_image(
            &up.registry.url(),
            REPO,
            "v1",
            &ImageSpec::oci(&[3_000_000]),
        )
        .await?;
        let cluster = Cluster::start(2, HOST, &up.gate.url(), &[]).await?;
        let layer = &image.layers[0];
        let ranking = cluster.ranking(HOST, &layer.digest);
        let (owner, other) = (ranking[0], ranking[1]);
        let client = http_client();
        download(
            blob_url(&cluster, owner, &layer.digest),
            Arc::default(),
            None,
        )
        .await
        .ensure_whole(&layer.digest)?;
        let unknown = format!("sha256:{}", "0".repeat(64));
        let manifest = format!("/v2/{REPO}/manifests/{}", image.digest);
        let blob = format!("/v2/{REPO}/blobs/{}", layer.digest);
        let requests: Vec<(&str, reqwest::Method, String, Option<&str>)> = vec![
            ("HEAD", reqwest::Method::HEAD, blob.clone(), None),
            ("GET", reqwest::Method::GET, blob.clone(), None),
            (
                "range",
                reqwest::Method::GET,
                blob.clone(),
                Some("bytes=100-1099"),
            ),
            (
                "suffix",
                reqwest::Method::GET,
                blob.clone(),
                Some("bytes=-500"),
            ),
            (
                "unsatisfiable",
                reqwest::Method::GET,
                blob.clone(),
                Some("bytes=9000000-"),
            ),
            ("manifest", reqwest::Method::GET, manifest.clone(), None),
            ("manifest HEAD", reqwest::Method::HEAD, manifest, None),
            (
                "unknown",
                reqwest::Method::GET,
                format!("/v2/{REPO}/blobs/{unknown}"),
                None,
            ),
        ];
        for (what, method, path, range) in requests {
            let ask = |member: usize| {
                let mut req = client
                    .request(method.clone(), format!("{}{path}", cluster.url(member)))
                    .header("accept", seed::ACCEPT_ALL_MANIFESTS);
                if let Some(r) = range {
                    req = req.header("range", r);
                }
                answer(req)
            };
            let (from_owner, via_other) = (ask(owner).await?, ask(other).await?);
            ensure!(
                from_owner == via_other,
                "{what}: owner answered {:?} {:?}, the other member {:?} {:?}",
                from_owner.0,
                from_owner.1,
                via_other.0,
                via_other.1
            );
            if what == "range" {
                ensure!(
                    from_owner.0 == 206 && from_owner.2 == layer.bytes[100..1100],
                    "{what}"
                );
            }
        }
        let (gets, _) = up.blob_gets(&layer.digest).await?;
        ensure!(
            gets == 1,
            "{gets} upstream GETs of a blob stored on its owner"
        );
        ensure!(
            cluster.holders(HOST, &layer.digest) == [owner],
            "stored on {:?}",
            cluster.holders(HOST, &layer.digest)
        );
        let forwarded = cluster
            .metric(
                other,
                "regmirror_cluster_peer_requests_total",
                &[&format!("peer=\"{}\"", cluster.name(owner))],
            )
            .await?;
        // The five blob requests at least (the manifest's and the unknown
        // digest's keys may belong to either member).
        ensure!(
            forwarded >= 5.0,
            "{forwarded} requests forwarded to the owner"
        );

        // With the hop header the other member serves it itself.
        let body = client
            .get(blob_url(&cluster, other, &layer.digest))
            .header("regmirror-hop", "test")
            .send()
            .await?
            .bytes()
            .await?;
        ensure!(body == layer.bytes, "hop request body");
        let (gets, _) = up.blob_gets(&layer.digest).await?;
        ensure!(
            gets == 2,
            "{gets} upstream GETs: the hop request was not served locally"
        );
        cluster
            .wait_holders(HOST, &layer.digest, &[0, 1], Duration::from_secs(10))
            .await?;
        if cluster
            .metric(other, "regmirror_cluster_owner_requests_total", &[])
            .await?
            < 1.0
        {
            bail!("the hop request was not counted as served as owner");
        }
        Ok(())
    })
    .await;
}

/// On SIGTERM a member first fails readiness and keeps serving for its drain
/// period (5 s), so that clients and fellow members move away before it
/// stops accepting requests; then it exits.
#[tokio::test]
async fn a_member_told_to_stop_fails_readiness_then_drains() {
    bounded(60, async {
        let up = Upstream::start().await?;
        let mut cluster = Cluster::start(2, HOST, &up.gate.url(), &[]).await?;
        let digest = up.blob(100_000).await?;
        let client = http_client();
        let ready = format!("{}/readyz", cluster.url(0));
        ensure!(
            client.get(&ready).send().await?.status() == 200,
            "ready at first"
        );
        let pid = cluster.member(0).pid().context("m0 runs")?;
        let term = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        ensure!(term.success(), "kill -TERM {pid}");
        let stopping = std::time::Instant::now();
        wait_until(Duration::from_secs(3), || async {
            matches!(client.get(&ready).send().await, Ok(r) if r.status() == 503)
        })
        .await
        .context("/readyz never failed after SIGTERM")?;
        // Still serving, through the other member too.
        for member in [0, 1] {
            download(blob_url(&cluster, member, &digest), Arc::default(), None)
                .await
                .ensure_whole(&digest)
                .with_context(|| format!("m{member} while m0 drains"))?;
        }
        ensure!(
            stopping.elapsed() < Duration::from_secs(4),
            "too slow to tell draining from stopped"
        );
        let status = cluster
            .member_mut(0)
            .wait_exit(Duration::from_secs(15))
            .await?;
        ensure!(
            stopping.elapsed() >= Duration::from_secs(5),
            "exited {:?} after SIGTERM, before its drain period",
            stopping.elapsed()
        );
        ensure!(status.success(), "exit status {status}");
        Ok(())
    })
    .await;
}

// Regressions of the review findings fixed in 3dfdf6f: each test failed on
// the commit before it.

/// A running member stopped with SIGSTOP (a stalled process: it accepts
/// connections, answers nothing); resumed with SIGCONT when dropped, so a
/// failing test leaves nothing stopped.
struct Stalled(u32);

impl Stalled {
    fn stop(pid: u32) -> Result<Self> {
        signal("-STOP", pid)?;
        Ok(Self(pid))
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        let _ = signal("-CONT", self.0);
    }
}

fn signal(sig: &str, pid: u32) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill {sig} {pid}: {status}");
    Ok(())
}

/// `GET` of `repo`'s manifest `reference` through `base`, accepting every
/// manifest type: the status and body, whatever the status.
async fn get_manifest(base: &str, reference: &str) -> Result<(u16, bytes::Bytes)> {
    let resp = http_client()
        .get(format!("{base}/v2/{REPO}/manifests/{reference}"))
        .header("accept", seed::ACCEPT_ALL_MANIFESTS)
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.bytes().await?))
}

/// Review finding 1: a member forwards a request with the upstream it
/// routed it to (`ns`), so the member it reaches answers for that upstream
/// (or refuses, when it has no such upstream), never with what its own
/// default upstream holds under the same name. Two registries hold
/// different images as `library/app:<tag>`; m0's default is X, m1 knows
/// only Y, m2 knows Y (its default) and X.
#[tokio::test]
async fn a_forwarded_request_is_answered_for_the_upstream_it_was_routed_to() {
    bounded(60, async {
        let (x, y) = (Registry::start().await?, Registry::start().await?);
        let upstream =
            |r: &Registry| ["--upstream".to_owned(), format!("{}={}", r.host(), r.url())];
        let cluster = Cluster::start_each(3, |i, urls| {
            let mut args: Vec<String> = match i {
                0 => [upstream(&x), upstream(&y)].concat(),
                1 => upstream(&y).to_vec(),
                _ => [upstream(&y), upstream(&x)].concat(),
            };
            for (j, url) in urls.iter().enumerate() {
                args.extend(["--peer".to_owned(), format!("m{j}={url}")]);
            }
            args
        })
        .await?;
        // A tag whose key (on X, m0's default) m1 owns, and one m2 owns.
        let owned_by = |member: usize| {
            (0..200)
                .map(|k| format!("t{k}"))
                .find(|t| cluster.tag_ranking(&x.host(), REPO, t)[0] == member)
                .with_context(|| format!("no tag owned by m{member}"))
        };
        for owner in [1, 2] {
            let tag = owned_by(owner)?;
            let spec = ImageSpec::oci(&[1000]);
            let on_x = seed::push_image(&x.url(), REPO, &tag, &spec).await?;
            let on_y = seed::push_image(&y.url(), REPO, &tag, &spec).await?;
            ensure!(
                on_x.digest != on_y.digest,
                "the registries hold the same image"
            );
            let (status, body) = get_manifest(&cluster.url(0), &tag).await?;
            ensure!(
                body != on_y.manifest,
                "m0 (default X) answered {REPO}:{tag} with Y's manifest {} (owner m{owner})",
                on_y.digest
            );
            if owner == 2 || status == 200 {
                ensure!(
                    status == 200 && body == on_x.manifest,
                    "m0 asked for {REPO}:{tag} (owner m{owner}): {status} {:?}, expected X's {}",
                    String::from_utf8_lossy(&body),
                    on_x.digest
                );
            }
        }
        Ok(())
    })
    .await;
}

/// Review finding 2: a stalled member (SIGSTOP: it accepts connections and
/// answers nothing) delays a request whose owner is healthy by at most the
/// owner's wait for stored answers (2 s), not the upstream timeouts: the
/// asking member does not give up on the owner (no error counted for it, no
/// takeover) and the blob costs one upstream GET.
#[tokio::test]
async fn a_stalled_member_does_not_stall_requests_a_healthy_owner_serves() {
    bounded(60, async {
        const STORED_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
        let up = Upstream::start().await?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("cache.toml");
        // Upstream timeouts of 6 s in all (what the owner waited for the
        // stalled member before the fix), longer than the stored-answer
        // timeout plus the margin below.
        std::fs::write(
            &config,
            "[timeouts]\nconnect = \"1s\"\nresponse_header = \"5s\"\n",
        )?;
        let config = config.display().to_string();
        let cluster = Cluster::start(3, HOST, &up.gate.url(), &["--config", &config]).await?;
        let digest = up.blob(1 << 20).await?;
        // The stalled member ranks right behind the owner (the one member
        // the owner asked before the fix).
        let ranking = cluster.ranking(HOST, &digest);
        let (owner, stalled, asker) = (ranking[0], ranking[1], ranking[2]);
        let paused = Stalled::stop(cluster.member(stalled).pid().context("running")?)?;
        let started = std::time::Instant::now();
        let got = download(blob_url(&cluster, asker, &digest), Arc::default(), None).await;
        let took = started.elapsed();
        drop(paused);
        got.ensure_whole(&digest)?;
        ensure!(
            took < STORED_ANSWER_TIMEOUT + Duration::from_secs(3),
            "m{stalled} stalled a request m{owner} serves for {took:?}"
        );
        let errors = cluster
            .metric(
                asker,
                "regmirror_cluster_peer_errors_total",
                &[&format!("peer=\"{}\"", cluster.name(owner))],
            )
            .await?;
        ensure!(
            errors == 0.0,
            "m{asker} counted {errors} errors of the healthy owner m{owner}"
        );
        let (gets, _) = up.blob_gets(&digest).await?;
        ensure!(gets == 1, "{gets} upstream GETs");
        cluster
            .wait_holders(HOST, &digest, &[owner], Duration::from_secs(10))
            .await?;
        Ok(())
    })
    .await;
}

/// Review finding 3: a corrupt copy on another member (one byte flipped in
/// its store while it was down) is handed over at most once: the owner's
/// fill rejects it (that client's transfer is cut), and a retry gets the
/// blob from the upstream, with one GET; no complete answer is ever wrong.
#[tokio::test]
async fn a_corrupt_copy_on_another_member_is_not_handed_over_again() {
    bounded(60, async {
        let up = Upstream::start().await?;
        let mut cluster = Cluster::start(2, HOST, &up.gate.url(), &[]).await?;
        let digest = up.blob(2 << 20).await?;
        let ranking = cluster.ranking(HOST, &digest);
        let (owner, other) = (ranking[0], ranking[1]);
        // A hop request is served, and stored, where it lands.
        let body = http_client()
            .get(blob_url(&cluster, other, &digest))
            .header("regmirror-hop", "test")
            .send()
            .await?
            .bytes()
            .await?;
        ensure!(sha256_digest(&body) == digest, "stored on m{other}");
        cluster
            .wait_holders(HOST, &digest, &[other], Duration::from_secs(10))
            .await?;
        cluster.kill9(other);
        let file = cluster.member(other).store().blob(HOST, &digest);
        let mut bytes = std::fs::read(&file)?;
        bytes[1000] ^= 1;
        std::fs::write(&file, bytes)?;
        cluster.restart(other).await?;
        let (before, _) = up.blob_gets(&digest).await?;
        let mut attempts = Vec::new();
        for _ in 0..4 {
            let got = download(blob_url(&cluster, owner, &digest), Arc::default(), None).await;
            let complete = got.status == 200 && got.error.is_none();
            ensure!(
                !complete || got.digest.as_deref() == Some(digest.as_str()),
                "a complete answer with wrong bytes: {got:?}"
            );
            attempts.push(got);
            if complete {
                break;
            }
        }
        ensure!(
            attempts.len() <= 2
                && attempts
                    .last()
                    .is_some_and(|g| g.ensure_whole(&digest).is_ok()),
            "no good answer in the first two attempts: {attempts:?}"
        );
        let (after, _) = up.blob_gets(&digest).await?;
        ensure!(after - before == 1, "{} upstream GETs", after - before);
        Ok(())
    })
    .await;
}

/// Review finding 4: growing from 1 member to 3 (every member restarted
/// with the new `--peer` list, m0 keeping its storage) downloads nothing
/// again, also for blobs whose new owner ranks m0 last (before the fix the
/// owner asked only the member ranked next); each blob ends up on its new
/// owner.
#[tokio::test]
async fn growing_from_one_member_to_three_downloads_nothing_again() {
    bounded(60, async {
        const N: usize = 10;
        let up = Upstream::start().await?;
        let storage = tempfile::tempdir()?;
        let storage = storage.path().display().to_string();
        let mut digests: Vec<String> = Vec::new();
        let m0_last = |ds: &[String]| {
            ds.iter()
                .filter(|d| Cluster::ranking_among(3, HOST, d)[2] == 0)
                .count()
        };
        while digests.len() < N || m0_last(&digests) < 3 {
            ensure!(digests.len() < 40, "too few blobs rank m0 last");
            digests.push(up.blob(50_000).await?);
        }
        let alone = Cluster::start(1, HOST, &up.gate.url(), &["--storage", &storage]).await?;
        for d in &digests {
            download(blob_url(&alone, 0, d), Arc::default(), None)
                .await
                .ensure_whole(d)?;
            alone
                .wait_holders(HOST, d, &[0], Duration::from_secs(10))
                .await?;
        }
        drop(alone);
        let cluster = Cluster::start_each(3, |i, urls| {
            let mut args = vec!["--upstream".to_owned(), format!("{HOST}={}", up.gate.url())];
            for (j, url) in urls.iter().enumerate() {
                args.extend(["--peer".to_owned(), format!("m{j}={url}")]);
            }
            if i == 0 {
                args.extend(["--storage".to_owned(), storage.clone()]);
            }
            args
        })
        .await?;
        for d in &digests {
            for m in 0..3 {
                download(blob_url(&cluster, m, d), Arc::default(), None)
                    .await
                    .ensure_whole(d)
                    .with_context(|| format!("through m{m}"))?;
            }
        }
        for d in &digests {
            let (gets, _) = up.blob_gets(d).await?;
            ensure!(
                gets == 1,
                "{d} (ranking {:?}): {} upstream GETs after the resize",
                cluster.ranking(HOST, d),
                gets - 1
            );
            let owner = cluster.ranking(HOST, d)[0];
            wait_until(Duration::from_secs(10), || async {
                cluster.holders(HOST, d).contains(&owner)
            })
            .await
            .with_context(|| format!("{d} not on its owner m{owner}"))?;
        }
        Ok(())
    })
    .await;
}

/// Review finding 5: a manifest pulled by tag is stored by the tag's owner;
/// asked by digest, its content owner finds it there (even ranked last for
/// the content), so the manifest costs one upstream GET.
#[tokio::test]
async fn a_manifest_the_tag_owner_stored_is_not_fetched_again_by_digest() {
    bounded(60, async {
        let up = Upstream::start().await?;
        let cluster = Cluster::start(3, HOST, &up.gate.url(), &[]).await?;
        let image =
            seed::push_image(&up.registry.url(), REPO, "v0", &ImageSpec::oci(&[10_000])).await?;
        let ranking = cluster.ranking(HOST, &image.digest);
        let (content_owner, next, tag_owner) = (ranking[0], ranking[1], ranking[2]);
        let tag = (0..200)
            .map(|k| format!("t{k}"))
            .find(|t| cluster.tag_ranking(HOST, REPO, t)[0] == tag_owner)
            .context("no tag owned by the member ranked last for the content")?;
        seed::push_manifest(
            &up.registry.url(),
            REPO,
            &tag,
            &image.media_type,
            image.manifest.clone(),
        )
        .await?;
        up.registry.sync_log().await?;
        let before = up.registry.count("GET", "/manifests/");
        let m = seed::fetch_manifest(&cluster.url(content_owner), REPO, &tag).await?;
        ensure!(m.body == image.manifest, "by tag");
        let m = seed::fetch_manifest(&cluster.url(next), REPO, &image.digest).await?;
        ensure!(m.body == image.manifest, "by digest");
        up.registry.sync_log().await?;
        let gets = up.registry.count("GET", "/manifests/") - before;
        ensure!(
            gets == 1,
            "{gets} upstream manifest GETs (tag owner m{tag_owner}, content owner m{content_owner}): {:?}",
            up.registry.access_log()
        );
        Ok(())
    })
    .await;
}

/// A `python3 -m http.server` on loopback: an HTTP server that is no
/// registry (404 for every `/v2/` path); killed on drop.
struct NotARegistry {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl NotARegistry {
    async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = regmirror_e2e::free_port();
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("python3 -m http.server")?;
        let me = Self {
            child,
            port,
            _dir: dir,
        };
        wait_until(Duration::from_secs(10), || async {
            http_client().get(me.url()).send().await.is_ok()
        })
        .await
        .context("http.server not answering")?;
        Ok(me)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for NotARegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 3-member cluster in which m2's `--peer` URL for m0 is m1's (it
/// reaches another member) and its URL for m1 is `www` (it reaches no
/// regmirror member); m0 and m1 are configured right.
async fn cluster_with_wrong_peer_urls(up: &Upstream, www: &NotARegistry) -> Result<Cluster> {
    Cluster::start_each(3, |i, urls| {
        let mut args = vec!["--upstream".to_owned(), format!("{HOST}={}", up.gate.url())];
        for (j, url) in urls.iter().enumerate() {
            let url = match (i, j) {
                (2, 0) => urls[1].clone(),
                (2, 1) => www.url(),
                _ => url.clone(),
            };
            args.extend(["--peer".to_owned(), format!("m{j}={url}")]);
        }
        args
    })
    .await
}

/// Pushes blobs of 100 kB until one ranks the members `first` (a prefix of
/// the ranking); its digest.
async fn blob_ranked(up: &Upstream, cluster: &Cluster, first: &[usize]) -> Result<String> {
    for _ in 0..60 {
        let d = up.blob(100_000).await?;
        if cluster.ranking(HOST, &d).starts_with(first) {
            return Ok(d);
        }
    }
    bail!("no blob ranked {first:?} first in 60")
}

/// Waits until no member has a fill in progress (temp files), so that
/// what members store is final.
async fn fills_done(cluster: &Cluster) -> Result<()> {
    wait_until(Duration::from_secs(10), || async {
        cluster
            .members()
            .iter()
            .all(|m| m.store().temp_files().is_ok_and(|n| n == 0))
    })
    .await
    .context("fills still in progress")
}

/// Review finding 8: a `--peer` URL that reaches another member (m2's
/// `m0=` URL is m1's) or no regmirror member (m2's `m1=` URL is an HTTP
/// server answering 404) gets that member marked down on m2 (counted in
/// `regmirror_cluster_peer_errors_total`), which then serves the key
/// itself: the right bytes (not the HTTP server's 404), and while they are
/// down, blobs of m0 and m1 stored on m2 alone, never by the member the
/// wrong URL reaches.
#[tokio::test]
async fn a_peer_url_that_reaches_the_wrong_server_is_marked_down() {
    bounded(60, async {
        let up = Upstream::start().await?;
        let www = NotARegistry::start().await?;
        let cluster = cluster_with_wrong_peer_urls(&up, &www).await?;
        // The first blob ranks m0, m1: m2 tries both wrong URLs for it.
        let mut blobs = vec![blob_ranked(&up, &cluster, &[0, 1]).await?];
        for owner in [0, 1, 0, 1] {
            blobs.push(blob_ranked(&up, &cluster, &[owner]).await?);
        }
        for d in &blobs {
            download(blob_url(&cluster, 2, d), Arc::default(), None)
                .await
                .ensure_whole(d)
                .with_context(|| format!("through m2, ranking {:?}", cluster.ranking(HOST, d)))?;
        }
        for peer in ["m0", "m1"] {
            let errors = cluster
                .metric(
                    2,
                    "regmirror_cluster_peer_errors_total",
                    &[&format!("peer=\"{peer}\"")],
                )
                .await?;
            ensure!(errors > 0.0, "m2 counted no error for {peer}");
        }
        fills_done(&cluster).await?;
        for d in &blobs[1..] {
            let holders = cluster.holders(HOST, d);
            ensure!(
                holders == [2],
                "{d} (ranking {:?}) stored on {holders:?}, expected m2 alone (m0, m1 down on m2)",
                cluster.ranking(HOST, d)
            );
        }
        Ok(())
    })
    .await;
}

/// Review finding 8, the first request: m2 forwards a blob of m0 to its
/// wrong `m0=` URL, which reaches m1. The request names the member it is
/// meant for (`Regmirror-Member: m0`), so m1 refuses it (421) without
/// serving or storing; m2 marks m0 down and takes the blob over, and the
/// blob is on one member's disk only. (Before, m1 served and stored it
/// too: `[1, 2]`.)
#[tokio::test]
async fn a_peer_url_that_reaches_another_member_stores_nothing_there() {
    bounded(60, async {
        let up = Upstream::start().await?;
        let www = NotARegistry::start().await?;
        let cluster = cluster_with_wrong_peer_urls(&up, &www).await?;
        let d = blob_ranked(&up, &cluster, &[0, 1]).await?;
        download(blob_url(&cluster, 2, &d), Arc::default(), None)
            .await
            .ensure_whole(&d)?;
        fills_done(&cluster).await?;
        let holders = cluster.holders(HOST, &d);
        ensure!(
            holders.len() == 1,
            "{d} of m0 asked through m2 stored on {holders:?}"
        );
        Ok(())
    })
    .await;
}
