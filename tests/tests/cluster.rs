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
use regmirror_e2e::util::{bounded, http_client, received_at_least, wait_until};
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
