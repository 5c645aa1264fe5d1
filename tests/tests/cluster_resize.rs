//! A cache cluster's budget and its resizes (issue 16, tests 3, 6 and 9):
//! every member a real `regmirror-cache` process on loopback.
//!
//! - T3: `--max-size` is the cluster's budget; each member keeps its share,
//!   so the disk across members stays within it.
//! - T6: a member added or removed (members restarted with the new
//!   `--peer` list) under load: content cached anywhere is never fetched
//!   again, and about 1/N of the keys move (the new owner asks the previous
//!   one first: handover).
//! - T9: containerd pulls an image through any member of a 3-member cluster.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use regmirror_cache::cluster::ranking::{Key, rank};
use regmirror_cache::oci::Digest;
use regmirror_e2e::util::{bounded, http_client, metric_sum, sha256_digest, wait_until};
use regmirror_e2e::{CacheOptions, CacheProcess, Cluster, FakeUpstream, RequestLog, free_port};

const HOST: &str = "docker.io";
const REPO: &str = "library/app";

/// Deterministic pseudo-random bytes (xorshift), so every blob differs.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// GETs blob `digest` through the cache at `url`; its body, checked
/// against the digest.
async fn get_blob(client: &reqwest::Client, url: &str, digest: &str) -> Result<Vec<u8>> {
    let resp = client
        .get(format!("{url}/v2/{REPO}/blobs/{digest}"))
        .send()
        .await?;
    ensure!(resp.status() == 200, "{url}: {digest}: {}", resp.status());
    let body = resp.bytes().await?.to_vec();
    ensure!(
        sha256_digest(&body) == digest,
        "{url}: wrong body for {digest}"
    );
    Ok(body)
}

/// Bytes of every file under `root` (content, temp files, sidecars).
fn disk_bytes(root: &Path) -> u64 {
    let mut dirs = vec![root.to_path_buf()];
    let mut total = 0;
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => dirs.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Samples the summed disk usage of `roots` every 100 ms on its own thread
/// until dropped; keeps the largest sample.
struct DiskSampler {
    max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiskSampler {
    fn start(roots: Vec<PathBuf>) -> Self {
        let (max, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (m, s) = (Arc::clone(&max), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let total: u64 = roots.iter().map(|r| disk_bytes(r)).sum();
                m.fetch_max(total, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            max,
            stop,
            thread: Some(thread),
        }
    }

    /// The largest total seen so far, in bytes.
    fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for DiskSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// T3: 2x the cluster's budget pulled through random members: the disk
/// across members stays within the budget plus one blob's reservation, and
/// the members' `regmirror_store_bytes` add up to what is on disk.
#[tokio::test]
async fn the_cluster_budget_holds_across_members() {
    bounded(120, async {
        const BUDGET: u64 = 3_000_000;
        const BLOB: usize = 250_000;
        let fake = FakeUpstream::start().await?;
        let digests: Vec<String> = (0..2 * BUDGET as usize / BLOB)
            .map(|i| fake.add_blob(REPO, bytes(BLOB, i as u64 + 1)))
            .collect();
        let cluster =
            Cluster::start(3, HOST, &fake.url(), &["--max-size", &BUDGET.to_string()]).await?;
        for i in 0..cluster.len() {
            let max = cluster.metric(i, "regmirror_store_max_bytes", &[]).await?;
            ensure!(max == (BUDGET / 3) as f64, "m{i}'s share: {max}");
        }
        let roots: Vec<PathBuf> = cluster
            .members()
            .iter()
            .map(|m| m.storage().to_path_buf())
            .collect();
        let sampler = DiskSampler::start(roots.clone());
        let client = http_client();
        // Four clients at a time, each blob through a pseudo-random member.
        let next = Arc::new(AtomicUsize::new(0));
        let pullers = (0..4).map(|_| {
            let (next, digests, client) = (Arc::clone(&next), digests.clone(), client.clone());
            let urls: Vec<String> = (0..cluster.len()).map(|i| cluster.url(i)).collect();
            async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(d) = digests.get(i) else {
                        return Ok::<_, anyhow::Error>(());
                    };
                    get_blob(&client, &urls[(i * 7 + 3) % urls.len()], d).await?;
                }
            }
        });
        futures::future::try_join_all(pullers).await?;
        // Settled: no fill in flight, evictions done.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let peak = sampler.max();
        drop(sampler);
        ensure!(
            peak <= BUDGET + BLOB as u64,
            "disk across members reached {peak} bytes, over the budget {BUDGET} + one blob {BLOB}"
        );
        let on_disk: u64 = cluster
            .members()
            .iter()
            .map(|m| {
                m.store()
                    .verified_content()
                    .map(|c| c.iter().map(|(_, s)| s).sum::<u64>())
            })
            .sum::<Result<u64>>()?;
        let mut counted = 0.0;
        for i in 0..cluster.len() {
            counted += cluster.metric(i, "regmirror_store_bytes", &[]).await?;
        }
        ensure!(
            counted == on_disk as f64,
            "members count {counted} bytes stored, {on_disk} are on disk"
        );
        ensure!(on_disk > 0, "nothing stored");
        let evictions = {
            let mut n = 0.0;
            for i in 0..cluster.len() {
                n += cluster.metric(i, "regmirror_evictions_total", &[]).await?;
            }
            n
        };
        ensure!(evictions > 0.0, "2x the budget pulled without an eviction");
        Ok(())
    })
    .await;
}

/// Members started by hand, so that each can be restarted with another
/// `--peer` list: names `m{i}`, fixed ports and storage directories.
struct Members {
    upstream: String,
    ports: Vec<u16>,
    storage: Vec<tempfile::TempDir>,
    running: Vec<Option<CacheProcess>>,
}

impl Members {
    fn new(n: usize, upstream: String) -> Result<Self> {
        let mut ports = Vec::new();
        while ports.len() < n {
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        Ok(Self {
            upstream,
            ports,
            storage: (0..n)
                .map(|_| tempfile::tempdir())
                .collect::<std::io::Result<_>>()?,
            running: (0..n).map(|_| None).collect(),
        })
    }

    fn name(i: usize) -> String {
        format!("m{i}")
    }

    fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    /// (Re)starts member `i` seeing `view` (member indices, itself
    /// included); a running one is stopped first, as a rolling update does
    /// (SIGTERM: it drains, its fills in flight end and are stored).
    async fn start(&mut self, i: usize, view: &[usize]) -> Result<()> {
        if let Some(mut p) = self.running[i].take() {
            p.stop().await?;
        }
        let mut opts = CacheOptions::new()
            .upstream(HOST, &self.upstream)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.ports[i]))
            .arg("--storage")
            .arg(self.storage[i].path().display().to_string())
            .arg("--name")
            .arg(Self::name(i));
        for &j in view {
            opts = opts
                .arg("--peer")
                .arg(format!("{}={}", Self::name(j), self.url(j)));
        }
        self.running[i] = Some(
            CacheProcess::start_with(opts)
                .await
                .with_context(|| format!("member m{i}"))?,
        );
        Ok(())
    }

    /// Stops member `i` for good (SIGKILL: nothing of it runs any more).
    fn remove(&mut self, i: usize) {
        if let Some(mut p) = self.running[i].take() {
            p.kill9();
        }
    }

    /// The members holding blob `digest` in their store.
    fn holders(&self, digest: &str) -> Vec<usize> {
        (0..self.storage.len())
            .filter(|&i| {
                regmirror_e2e::StoreLayout::new(self.storage[i].path())
                    .blob(HOST, digest)
                    .exists()
            })
            .collect()
    }
}

/// The owner (a member index of `view`) of blob `digest`.
fn owner(view: &[usize], digest: &str) -> usize {
    let names: Vec<String> = view.iter().map(|&i| Members::name(i)).collect();
    let d: Digest = digest.parse().expect("digest");
    let key = Key::Content {
        upstream: HOST,
        digest: &d,
    };
    let first = rank(&names, &key)[0];
    view[names.iter().position(|n| n == first).expect("ranked")]
}

/// Clients pulling random blobs through random running members until
/// stopped; a restart takes the write side of `gate`, so the load pauses
/// only while a member's process is down. Every answer must be the blob.
struct Load {
    stop: Arc<AtomicBool>,
    gate: Arc<tokio::sync::RwLock<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<Result<usize>>>,
}

impl Load {
    fn start(urls: Vec<String>, digests: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(tokio::sync::RwLock::new(urls));
        let tasks = (0..3u64)
            .map(|c| {
                let (stop, gate, digests) = (Arc::clone(&stop), Arc::clone(&gate), digests.clone());
                tokio::spawn(async move {
                    let client = http_client();
                    let mut n = 0usize;
                    let mut x = c * 7919 + 1;
                    while !stop.load(Ordering::Relaxed) {
                        x = x
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407);
                        let r = (x >> 33) as usize;
                        let urls = gate.read().await;
                        get_blob(
                            &client,
                            &urls[r % urls.len()],
                            &digests[(r / 7) % digests.len()],
                        )
                        .await?;
                        drop(urls);
                        n += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Ok(n)
                })
            })
            .collect();
        Self { stop, gate, tasks }
    }

    /// Stops the clients; the number of blobs they pulled, or the first error.
    async fn finish(self) -> Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for t in self.tasks {
            total += t.await??;
        }
        Ok(total)
    }
}

/// Restarts `members` with `view` one by one while `load` pauses for the
/// moment each is down, then points the load at `view`.
async fn roll(m: &mut Members, load: &Load, restart: &[usize], view: &[usize]) -> Result<()> {
    for &i in restart {
        let mut urls = load.gate.write().await;
        m.start(i, view).await?;
        *urls = view.iter().map(|&j| m.url(j)).collect();
    }
    Ok(())
}

/// T6: a member added, then one removed, under load: not one upstream GET
/// for content cached on a remaining member, and about 1/N of the keys
/// change owner (their new owner gets them from the previous one).
#[tokio::test]
async fn resizing_under_load_downloads_nothing_cached() {
    bounded(180, async {
        const KEYS: usize = 60;
        let fake = FakeUpstream::start().await?;
        let digests: Vec<String> = (0..KEYS)
            .map(|i| fake.add_blob(REPO, bytes(20_000, 1000 + i as u64)))
            .collect();
        let mut m = Members::new(4, fake.url())?;
        let three = [0, 1, 2];
        for i in three {
            m.start(i, &three).await?;
        }
        let client = http_client();
        for (k, d) in digests.iter().enumerate() {
            get_blob(&client, &m.url(k % 3), d).await?;
        }
        for d in &digests {
            wait_until(Duration::from_secs(10), || async {
                m.holders(d) == [owner(&three, d)]
            })
            .await
            .with_context(|| format!("{d} held by {:?}", m.holders(d)))?;
        }
        let gets = |d: &str| fake.count("GET", &format!("/blobs/{d}"));
        ensure!(
            digests.iter().all(|d| gets(d) == 1),
            "one upstream GET per blob"
        );

        // Add m3: start it, then restart the others with it in their view.
        let four = [0, 1, 2, 3];
        let load = Load::start(three.iter().map(|&i| m.url(i)).collect(), digests.clone());
        roll(&mut m, &load, &[3, 0, 1, 2], &four).await?;
        for d in &digests {
            get_blob(&client, &m.url(0), d).await?;
        }
        let pulled = load.finish().await?;
        ensure!(pulled > 0, "the load pulled nothing");
        let moved: Vec<&String> = digests
            .iter()
            .filter(|d| owner(&four, d) != owner(&three, d))
            .collect();
        let (n, keys) = (4, KEYS);
        ensure!(
            moved.len() * 2 * n >= keys && moved.len() * n <= 2 * keys,
            "{} of {keys} keys moved with {n} members: not about 1/{n}",
            moved.len()
        );
        for d in &moved {
            ensure!(owner(&four, d) == 3, "{d} moved to an old member");
            wait_until(Duration::from_secs(10), || async {
                m.holders(d).contains(&3)
            })
            .await
            .with_context(|| format!("moved {d} not on m3: {:?}", m.holders(d)))?;
        }
        for d in &digests {
            ensure!(
                gets(d) == 1,
                "{d} ({}moved) fetched {} times from the upstream after m3 joined",
                if moved.contains(&d) { "" } else { "not " },
                gets(d)
            );
        }
        let handed: f64 = {
            let mut sum = 0.0;
            for i in four {
                let text = m.running[i].as_ref().expect("running").metrics().await?;
                sum += metric_sum(
                    &text,
                    "regmirror_cluster_handover_total",
                    &[r#"result="hit""#],
                );
            }
            sum
        };
        ensure!(
            handed >= moved.len() as f64,
            "{handed} handovers for {} moved keys",
            moved.len()
        );

        // Remove m1: the others restart without it.
        let rest = [0, 2, 3];
        let cached_on_rest: Vec<bool> = digests
            .iter()
            .map(|d| m.holders(d).iter().any(|h| rest.contains(h)))
            .collect();
        let before: Vec<usize> = digests.iter().map(|d| gets(d)).collect();
        let load = Load::start(rest.iter().map(|&i| m.url(i)).collect(), digests.clone());
        {
            let _paused = load.gate.write().await;
            m.remove(1);
        }
        roll(&mut m, &load, &rest, &rest).await?;
        for d in &digests {
            get_blob(&client, &m.url(2), d).await?;
        }
        load.finish().await?;
        let moved = digests
            .iter()
            .filter(|d| owner(&rest, d) != owner(&four, d))
            .count();
        ensure!(
            moved * 2 * 4 >= KEYS && moved * 4 <= 2 * KEYS,
            "{moved} of {KEYS} keys moved when one of 4 members left"
        );
        for (k, d) in digests.iter().enumerate() {
            let extra = gets(d) - before[k];
            if cached_on_rest[k] {
                ensure!(
                    extra == 0,
                    "{d}, cached on a remaining member, fetched again"
                );
            } else {
                ensure!(extra <= 1, "{d} fetched {extra} times after m1 left");
            }
        }
        Ok(())
    })
    .await;
}

/// T9: containerd pulls an image through each member of a 3-member cluster
/// in turn, from scratch each time: the right digests every time, and the
/// upstream asked for each blob once in all (its owner fetched it; the
/// other members streamed it from there).
#[tokio::test]
async fn containerd_pulls_through_any_member_with_one_upstream_fetch_per_blob() {
    regmirror_e2e::util::require_root("containerd");
    bounded(300, async {
        let reg = regmirror_e2e::Registry::start().await?;
        let image = regmirror_e2e::seed::push_image(
            &reg.url(),
            REPO,
            "1.0",
            &regmirror_e2e::seed::ImageSpec::docker(&[3_000_000, 400_000, 10_000]),
        )
        .await?;
        let cluster = Cluster::start(3, HOST, &reg.url(), &[]).await?;
        let ctrd = regmirror_e2e::Containerd::start().await?;
        let image_ref = format!("{HOST}/{REPO}:1.0");
        for i in 0..cluster.len() {
            let hosts = tempfile::tempdir()?;
            // `server` on a closed port: every byte comes through member i.
            regmirror_e2e::write_hosts_toml(
                hosts.path(),
                HOST,
                &cluster.url(i),
                "http://127.0.0.1:9",
            )?;
            ctrd.remove_all_images().await?;
            ctrd.pull_ok(hosts.path(), &image_ref, None)
                .await
                .with_context(|| format!("pull through m{i}"))?;
            ensure!(
                ctrd.image_digest(&image_ref).await? == Some(image.digest.clone()),
                "pull through m{i}: wrong image digest"
            );
            let content = ctrd.content_digests().await?;
            for b in image.blobs() {
                ensure!(content.contains(&b.digest), "m{i}: {} not pulled", b.digest);
            }
        }
        reg.sync_log().await?;
        for b in image.blobs() {
            let gets = reg.count("GET", &format!("/blobs/{}", b.digest));
            ensure!(
                gets == 1,
                "{} fetched {gets} times from the upstream",
                b.digest
            );
            ensure!(
                cluster.holders(HOST, &b.digest) == [cluster.ranking(HOST, &b.digest)[0]],
                "{} stored on {:?}, not on its owner alone",
                b.digest,
                cluster.holders(HOST, &b.digest)
            );
        }
        Ok(())
    })
    .await;
}
