//! Running the cache unattended: byte budget with LRU eviction, age limit, full
//! and read-only disks, crashes, graceful shutdown, metrics, probes and logs.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use regmirror_e2e::process;
use regmirror_e2e::seed::{self, ImageSpec, PushedImage};
use regmirror_e2e::util::{
    bounded, http_client, metric_sample, metric_sum, received_at_least, require_root,
    sha256_digest, wait_until,
};
use regmirror_e2e::{
    Behaviour, CacheOptions, CacheProcess, FakeUpstream, Registry, RequestLog, StoreLayout,
};

/// One incompressible layer of about `size` bytes.
fn one_layer(size: usize, seed: u64) -> Result<PushedImage> {
    seed::build_image(&ImageSpec::oci(&[size]).gzip_level(0).seed(seed))
}

/// Waits until a blob is in the store. A client has its last bytes once
/// they are verified, slightly before the file is synced and renamed into
/// place, so "pulled" does not yet mean "stored".
async fn stored(store: &StoreLayout, digest: &str) -> Result<()> {
    let file = store.blob("docker.io", digest);
    wait_until(Duration::from_secs(10), || async { file.exists() })
        .await
        .with_context(|| format!("{digest} never stored"))
}

/// Bytes per second of the fake's slow bodies in the crash and shutdown tests:
/// their blobs take seconds to send.
const SLOW_BODY: u64 = 1_000_000;
/// Body bytes after which such a download is under way: a fifth of a second
/// in, seconds before its end.
const UNDER_WAY: usize = 200_000;

/// GETs `url` in a task that counts the body bytes received as they arrive;
/// the task ends with the whole body, or the transfer error.
fn spawn_download(url: String) -> (tokio::task::JoinHandle<Result<Vec<u8>>>, Arc<AtomicUsize>) {
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let task = tokio::spawn(async move {
        let mut resp = http_client().get(&url).send().await?;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            body.extend_from_slice(&chunk);
            counter.store(body.len(), Ordering::Relaxed);
        }
        Ok(body)
    });
    (task, received)
}

/// Two clients of one slow blob download: one that keeps up, and one that
/// reads the first chunk and then nothing until told: left far behind the
/// fill it joined (the socket buffers hold far less than the blobs this is
/// used on).
struct FrontAndBehind {
    front: tokio::task::JoinHandle<Result<Vec<u8>>>,
    behind: tokio::task::JoinHandle<Result<Vec<u8>>>,
    resume: Arc<tokio::sync::Notify>,
}

impl FrontAndBehind {
    /// Starts both GETs of `url`; returns once the front one is under way.
    async fn start(url: String) -> Result<Self> {
        let (front, received) = spawn_download(url.clone());
        let resume = Arc::new(tokio::sync::Notify::new());
        let wait = resume.clone();
        let behind = tokio::spawn(async move {
            let mut resp = http_client().get(&url).send().await?;
            ensure!(resp.status() == 200, "GET {url}: {}", resp.status());
            let mut body = resp.chunk().await?.context("empty body")?.to_vec();
            wait.notified().await;
            while let Some(chunk) = resp.chunk().await? {
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        });
        received_at_least(&received, UNDER_WAY).await?;
        Ok(Self {
            front,
            behind,
            resume,
        })
    }

    /// Waits for the front client's whole body, which must be `digest`'s;
    /// then lets the one behind read on, and checks its body the same way.
    /// `between` runs in between: the fill is over, its file stored or not.
    async fn finish(self, digest: &str, between: impl Future<Output = Result<()>>) -> Result<()> {
        let body = self.front.await??;
        ensure!(sha256_digest(&body) == digest, "the download was cut short");
        between.await?;
        self.resume.notify_one();
        let body = self.behind.await??;
        ensure!(
            sha256_digest(&body) == digest,
            "the client behind was cut short"
        );
        Ok(())
    }
}

async fn get_blob(cache: &CacheProcess, repo: &str, digest: &str) -> Result<bytes::Bytes> {
    let url = format!("{}/v2/{repo}/blobs/{digest}", cache.url());
    let resp = http_client().get(&url).send().await?;
    ensure!(resp.status() == 200, "GET {url}: {}", resp.status());
    let body = resp.bytes().await?;
    ensure!(sha256_digest(&body) == digest, "GET {url}: wrong bytes");
    Ok(body)
}

/// Pulls an image the way a client does: manifest by tag, then every blob.
async fn pull(cache: &CacheProcess, repo: &str, tag: &str, image: &PushedImage) -> Result<()> {
    let m = seed::fetch_manifest(&cache.url(), repo, tag).await?;
    ensure!(m.body == image.manifest, "{repo}:{tag} manifest");
    for b in image.blobs() {
        get_blob(cache, repo, &b.digest).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_byte_budget_evicts_least_recently_used_content() {
    bounded(120, async {
        let reg = Registry::start().await?;
        let images: Vec<PushedImage> = (0..3)
            .map(|i| one_layer(3_000_000, 100 + i))
            .collect::<Result<_>>()?;
        for (i, img) in images.iter().enumerate() {
            seed::push_built_image(&reg.url(), &format!("library/img{i}"), "v1", img).await?;
        }
        let cache = CacheProcess::start(
            [
                "--upstream".to_owned(),
                format!("docker.io={}", reg.url()),
                "--max-size".into(),
                "8000000".into(),
            ]
            .map(String::from),
        )
        .await?;
        let store = cache.store();
        let layer = |i: usize| images[i].layers[0].digest.clone();
        // The store ranks recency by the millisecond: the pauses between
        // accesses give each a later time than the one before, which is the
        // order under test.
        let tick = || tokio::time::sleep(Duration::from_millis(30));

        pull(&cache, "img0", "v1", &images[0]).await?;
        stored(&store, &layer(0)).await?;
        tick().await;
        pull(&cache, "img1", "v1", &images[1]).await?;
        stored(&store, &layer(1)).await?;
        tick().await;
        // Reading img0's layer again makes img1's the least recently used.
        get_blob(&cache, "img0", &layer(0)).await?;
        tick().await;
        pull(&cache, "img2", "v1", &images[2]).await?;

        wait_until(Duration::from_secs(10), || async {
            !store.blob("docker.io", &layer(1)).exists()
        })
        .await
        .context("img1's layer should be evicted")?;
        assert!(
            store.blob("docker.io", &layer(0)).exists(),
            "recently read layer evicted"
        );
        assert!(
            store.blob("docker.io", &layer(2)).exists(),
            "newest layer evicted"
        );
        let total: u64 = store.verified_content()?.iter().map(|(_, s)| s).sum();
        assert!(
            total <= 8_000_000,
            "store holds {total} bytes over its budget"
        );

        let m = cache.metrics().await?;
        assert!(
            metric_sum(&m, "regmirror_evictions_total", &[r#"reason="size""#]) >= 1.0,
            "{m}"
        );
        assert!(
            metric_sum(&m, "regmirror_evicted_bytes_total", &[r#"reason="size""#]) >= 3_000_000.0
        );
        assert_eq!(metric_sample(&m, "regmirror_store_max_bytes"), 8_000_000.0);
        assert_eq!(
            metric_sample(&m, "regmirror_store_bytes"),
            total as f64,
            "{m}"
        );

        // Evicted content is fetched again on demand.
        let before = reg.count("GET", &format!("/blobs/{}", layer(1)));
        get_blob(&cache, "img1", &layer(1)).await?;
        assert_eq!(
            reg.count("GET", &format!("/blobs/{}", layer(1))),
            before + 1
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn content_not_read_for_max_age_is_removed() {
    bounded(60, async {
        let fake = FakeUpstream::start().await?;
        let img = one_layer(50_000, 7)?;
        fake.add_image("library/app", Some("v1"), &img);
        let cache = CacheProcess::start_with(
            CacheOptions::new()
                .upstream("docker.io", &fake.url())
                .arg("--max-age")
                .arg("2s"),
        )
        .await?;
        pull(&cache, "app", "v1", &img).await?;
        stored(&cache.store(), &img.layers[0].digest).await?;
        let file = cache.store().blob("docker.io", &img.layers[0].digest);
        wait_until(Duration::from_secs(15), || async { !file.exists() })
            .await
            .context("aged content should be removed")?;
        // The eviction pass counts what it removed once it is through.
        let counted = || async {
            let m = cache.metrics().await.unwrap_or_default();
            metric_sum(&m, "regmirror_evictions_total", &[r#"reason="age""#]) >= 1.0
        };
        wait_until(Duration::from_secs(10), counted)
            .await
            .with_context(|| format!("no age eviction counted: {}", cache.log_tail(20)))?;
        Ok(())
    })
    .await;
}

/// A size-limited tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Self> {
        require_root("mounting a tmpfs");
        let dir = tempfile::tempdir()?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()?;
        ensure!(st.success(), "mount tmpfs failed");
        Ok(Self { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn remount(&self, opts: &str) -> Result<()> {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(self.dir.path())
            .status()?;
        ensure!(st.success(), "remount {opts} failed");
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_passes_blobs_through_and_recovers() {
    bounded(90, async {
        let disk = Tmpfs::mount("4m")?;
        let storage = disk.path().join("store");
        let fake = FakeUpstream::start().await?;
        let big = one_layer(6_000_000, 11)?;
        let small = one_layer(200_000, 12)?;
        let later = one_layer(200_000, 13)?;
        fake.add_image("library/big", Some("v1"), &big);
        fake.add_image("library/small", Some("v1"), &small);
        fake.add_image("library/later", Some("v1"), &later);
        let mut cache = CacheProcess::start_with(
            CacheOptions::new()
                .upstream("docker.io", &fake.url())
                .arg("--storage")
                .arg(storage.display().to_string()),
        )
        .await?;
        let store = cache.store();

        // Larger than the whole disk: served, not stored.
        pull(&cache, "big", "v1", &big).await?;
        assert!(!store.blob("docker.io", &big.layers[0].digest).exists());
        let m = cache.metrics().await?;
        assert!(metric_sample(&m, "regmirror_disk_full_passthrough_total") >= 1.0, "{m}");
        assert!(metric_sum(&m, "regmirror_served_bytes_total", &[r#"source="passthrough""#]) >= 6_000_000.0);
        assert_eq!(store.temp_files()?, 0, "temp files left");

        // A disk filled by someone else: still served.
        let filler = disk.path().join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()))
            .output()?;
        pull(&cache, "small", "v1", &small).await?;
        assert!(!store.blob("docker.io", &small.layers[0].digest).exists());

        // Space returns: caching resumes.
        std::fs::remove_file(&filler)?;
        pull(&cache, "later", "v1", &later).await?;
        stored(&store, &later.layers[0].digest).await?;
        store.verified_content()?;

        // A read-only volume: not ready, still alive, cached content still served.
        disk.remount("ro")?;
        let status = |path: &'static str| {
            let url = format!("{}{path}", cache.url());
            async move { Ok::<_, anyhow::Error>(http_client().get(url).send().await?.status().as_u16()) }
        };
        assert_eq!(status("/readyz").await?, 503);
        assert_eq!(status("/healthz").await?, 200);
        get_blob(&cache, "later", &later.layers[0].digest).await?;
        disk.remount("rw")?;
        assert_eq!(status("/readyz").await?, 200);
        cache.stop().await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn kill_9_mid_download_leaves_nothing_servable() {
    bounded(90, async {
        let fake = FakeUpstream::start().await?;
        let img = one_layer(3_000_000, 21)?;
        fake.add_image("library/app", Some("v1"), &img);
        let layer = img.layers[0].digest.clone();
        let mut cache =
            CacheProcess::start(["--upstream".to_owned(), format!("docker.io={}", fake.url())])
                .await?;
        let store = cache.store();
        fake.set_behaviour(Behaviour::SlowBody {
            bytes_per_sec: SLOW_BODY,
        });
        let url = format!("{}/v2/library/app/blobs/{layer}", cache.url());
        let (download, received) = spawn_download(url);
        // Wait until the fill is writing and bytes are flowing, then crash.
        wait_until(Duration::from_secs(10), || async {
            store.temp_files().is_ok_and(|n| n > 0)
        })
        .await
        .context("fill never started")?;
        received_at_least(&received, UNDER_WAY).await?;
        cache.kill9();
        if let Ok(body) = download.await? {
            assert!(
                body.len() < img.layers[0].bytes.len(),
                "whole blob delivered"
            );
        }
        assert!(
            !store.blob("docker.io", &layer).exists(),
            "partial blob in the store"
        );

        fake.set_behaviour(Behaviour::Normal);
        cache.restart().await?;
        assert_eq!(store.temp_files()?, 0, "temp files not swept");
        pull(&cache, "app", "v1", &img).await?;
        stored(&store, &layer).await?;
        let files = store.verified_content()?;
        assert!(
            files
                .iter()
                .any(|(p, _)| p.ends_with(layer.trim_start_matches("sha256:")))
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn sigterm_lets_in_flight_downloads_finish() {
    bounded(60, async {
        let fake = FakeUpstream::start().await?;
        let img = one_layer(2_000_000, 31)?;
        fake.add_image("library/app", Some("v1"), &img);
        let layer = img.layers[0].digest.clone();
        let mut cache =
            CacheProcess::start(["--upstream".to_owned(), format!("docker.io={}", fake.url())])
                .await?;
        fake.set_behaviour(Behaviour::SlowBody {
            bytes_per_sec: SLOW_BODY,
        });
        let url = format!("{}/v2/library/app/blobs/{layer}", cache.url());
        let addr = cache.addr();
        let (download, received) = spawn_download(url);
        received_at_least(&received, UNDER_WAY).await?;
        let stopping = tokio::spawn(async move {
            let status = cache.stop().await;
            (cache, status)
        });
        // New connections are refused once the signal is handled.
        wait_until(Duration::from_secs(5), || async {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await
        .context("still accepting after SIGTERM")?;
        assert_eq!(
            sha256_digest(&download.await??),
            layer,
            "in-flight download cut short"
        );
        let (_cache, status) = stopping.await?;
        let status = status?;
        if !status.success() {
            bail!("cache exited with {status}");
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn metrics_account_for_the_traffic_that_produced_them() {
    bounded(90, async {
        let reg = Registry::start().await?;
        let img = seed::build_image(&ImageSpec::oci(&[2_000_000, 30_000]).gzip_level(0))?;
        seed::push_built_image(&reg.url(), "library/app", "v1", &img).await?;
        let cache =
            CacheProcess::start(["--upstream".to_owned(), format!("docker.io={}", reg.url())])
                .await?;

        // Cold: four clients at once on the big layer, then the rest once.
        let big = img.layers[0].digest.clone();
        let pulls = (0..4).map(|_| get_blob(&cache, "app", &big));
        for r in futures::future::join_all(pulls).await {
            r?;
        }
        pull(&cache, "app", "v1", &img).await?; // manifest miss, 2 blob misses, 1 blob hit
        pull(&cache, "app", "v1", &img).await?; // all hits but the tag's revalidation
        let m = cache.metrics().await?;

        let blob_bytes: u64 = img.blobs().map(|b| b.size()).sum();
        let big_size = img.layers[0].size() as f64;
        // Upstream: one GET per blob, whatever the number of clients.
        assert_eq!(
            metric_sum(
                &m,
                "regmirror_upstream_bytes_total",
                &[r#"upstream="docker.io""#]
            ),
            blob_bytes as f64,
            "{m}"
        );
        // Hits and misses by kind.
        let hits = |kind: &str| {
            metric_sample(
                &m,
                &format!(r#"regmirror_cache_hits_total{{upstream="docker.io",kind="{kind}"}}"#),
            )
        };
        let misses = |kind: &str| {
            metric_sample(
                &m,
                &format!(r#"regmirror_cache_misses_total{{upstream="docker.io",kind="{kind}"}}"#),
            )
        };
        assert_eq!(misses("blob"), 4.0 + 2.0, "{m}"); // 4 cold clients, config and small layer
        assert_eq!(hits("blob"), 1.0 + 3.0, "{m}");
        assert_eq!(misses("manifest"), 1.0, "{m}");
        assert!(hits("manifest") >= 1.0, "{m}");
        assert_eq!(metric_sample(&m, "regmirror_fill_joins_total"), 3.0, "{m}");
        // Requests by endpoint and status.
        let requests = |endpoint: &str| {
            metric_sum(
                &m,
                "regmirror_http_requests_total",
                &[&format!(r#"endpoint="{endpoint}""#), r#"status="200""#],
            )
        };
        assert_eq!(requests("blob"), 4.0 + 3.0 + 3.0, "{m}");
        assert_eq!(requests("manifest"), 2.0, "{m}");
        // Served bytes: every body the clients received.
        let served = metric_sum(&m, "regmirror_served_bytes_total", &[]);
        assert_eq!(served, 4.0 * big_size + 2.0 * blob_bytes as f64, "{m}");
        assert!(
            metric_sum(
                &m,
                "regmirror_upstream_requests_total",
                &[r#"method="GET""#, r#"status="200""#]
            ) >= 4.0
        );
        assert!(m.contains("regmirror_http_request_duration_seconds_bucket"));
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_large_store_is_indexed_in_the_background() {
    bounded(120, async {
        const FILES: usize = 100_000;
        let dir = tempfile::tempdir()?;
        let storage = dir.path().join("store");
        // Synthetic files named like blobs: the index only stats them.
        let store = StoreLayout::new(&storage);
        for i in 0..FILES {
            let hex = format!("{:064x}", (i as u128) * 0x9e37_79b9_7f4a_7c15 + 1);
            let file = store.blob("docker.io", &format!("sha256:{hex}"));
            let d = file.parent().context("blob path has a directory")?;
            if i < 256 || !d.exists() {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(&file, b"x")?;
        }
        let fake = FakeUpstream::start().await?;
        let cache = CacheProcess::start_with(
            CacheOptions::new()
                .upstream("docker.io", &fake.url())
                .arg("--storage")
                .arg(storage.display().to_string()),
        )
        .await?;
        wait_until(Duration::from_secs(60), || async {
            cache
                .metrics()
                .await
                .is_ok_and(|m| metric_sample(&m, "regmirror_store_files") == FILES as f64)
        })
        .await
        .context("index never reached the file count")?;
        let m = cache.metrics().await?;
        assert_eq!(metric_sample(&m, "regmirror_store_bytes"), FILES as f64);
        let pid = cache.pid().context("pid")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmRSS")?;
        assert!(
            rss_kb < 128 * 1024,
            "RSS {rss_kb} kB with {FILES} files indexed"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn json_logs_have_one_line_per_request() {
    bounded(30, async {
        let fake = FakeUpstream::start().await?;
        let cache = CacheProcess::start_with(
            CacheOptions::new()
                .upstream("docker.io", &fake.url())
                .arg("--log-format")
                .arg("json"),
        )
        .await?;
        let resp = http_client()
            .get(format!("{}/v2/library/nothing/manifests/v1", cache.url()))
            .send()
            .await?;
        assert_eq!(resp.status(), 404);
        let mut request_lines = 0;
        wait_until(Duration::from_secs(5), || async {
            cache.log().contains("nothing")
        })
        .await
        .context("the request never logged")?;
        for line in cache.log().lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
            if v["fields"]["message"] == "request"
                && v["fields"]["uri"]
                    .as_str()
                    .is_some_and(|u| u.contains("nothing"))
            {
                assert_eq!(v["fields"]["status"], 404);
                assert_eq!(v["level"], "INFO");
                request_lines += 1;
            }
        }
        assert_eq!(request_lines, 1, "{}", cache.log());
        Ok(())
    })
    .await;
}

fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

/// Dozens of clients pulling a mix of cold and warm images for a bounded time,
/// under a budget small enough that eviction runs throughout; then `kill -9`
/// in the middle of it all and a restart. Every pull must succeed with the
/// right bytes, memory must stay flat, and every stored file must verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_mixed_pulls_under_eviction_then_crash() {
    bounded(150, async {
        const CLIENTS: usize = 24;
        const SOAK: Duration = Duration::from_secs(25);
        let reg = Registry::start().await?;
        let mut images = Vec::new();
        for i in 0..6u64 {
            let sizes = [300_000 + 400_000 * i as usize, 40_000];
            let img = seed::build_image(&ImageSpec::oci(&sizes).gzip_level(0).seed(500 + i))?;
            seed::push_built_image(&reg.url(), &format!("library/soak{i}"), "v1", &img).await?;
            images.push(img);
        }
        let total: u64 = images.iter().map(|i| i.total_size()).sum();
        let budget = total / 2;
        let mut cache = CacheProcess::start([
            "--upstream".to_owned(),
            format!("docker.io={}", reg.url()),
            "--max-size".into(),
            budget.to_string(),
        ])
        .await?;
        let images = std::sync::Arc::new(images);
        let base = cache.url();

        let run_clients = |until: tokio::time::Instant, tolerate_errors: bool| {
            (0..CLIENTS)
                .map(|c| {
                    let images = images.clone();
                    let base = base.clone();
                    tokio::spawn(async move {
                        let (mut ok, mut failed) = (0u64, Vec::new());
                        let mut n = c;
                        while tokio::time::Instant::now() < until {
                            n = n.wrapping_mul(31).wrapping_add(7);
                            let i = n % images.len();
                            let img = &images[i];
                            let repo = format!("soak{i}");
                            let result = async {
                                let m = seed::fetch_manifest(&base, &repo, "v1").await?;
                                ensure!(m.body == img.manifest, "manifest bytes");
                                for b in img.blobs() {
                                    let url = format!("{base}/v2/{repo}/blobs/{}", b.digest);
                                    let body =
                                        http_client().get(&url).send().await?.bytes().await?;
                                    ensure!(sha256_digest(&body) == b.digest, "{url}: wrong bytes");
                                }
                                Ok::<_, anyhow::Error>(())
                            }
                            .await;
                            match result {
                                Ok(()) => ok += 1,
                                Err(e) if !tolerate_errors => failed.push(e.to_string()),
                                // Expected while the cache is down: pace the retries.
                                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                            }
                        }
                        (ok, failed)
                    })
                })
                .collect::<Vec<_>>()
        };

        // Warm-up, then the soak proper with memory sampled along the way.
        let pid = cache.pid().context("pid")?;
        let warm = run_clients(tokio::time::Instant::now() + Duration::from_secs(5), false);
        for t in warm {
            let (_, failed) = t.await?;
            ensure!(failed.is_empty(), "warm-up failures: {failed:?}");
        }
        let rss_start = rss_kb(pid)?;
        let clients = run_clients(tokio::time::Instant::now() + SOAK, false);
        let mut rss_max = rss_start;
        for _ in 0..(SOAK.as_secs() * 2) {
            // The sampling period, for the whole soak.
            tokio::time::sleep(Duration::from_millis(500)).await;
            rss_max = rss_max.max(rss_kb(pid).unwrap_or(0));
        }
        let (mut pulls, mut failures) = (0, Vec::new());
        for t in clients {
            let (ok, failed) = t.await?;
            pulls += ok;
            failures.extend(failed);
        }
        assert!(
            failures.is_empty(),
            "{} failed pulls: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        assert!(
            pulls >= CLIENTS as u64 * 5,
            "only {pulls} pulls in {SOAK:?}"
        );
        assert!(
            rss_max <= rss_start * 2 + 32 * 1024,
            "memory grew from {rss_start} kB to {rss_max} kB"
        );
        let m = cache.metrics().await?;
        assert!(
            metric_sum(&m, "regmirror_evictions_total", &[]) >= 1.0,
            "no eviction happened"
        );
        assert!(metric_sample(&m, "regmirror_store_bytes") <= budget as f64);

        // Crash in the middle of fills and evictions, restart, verify everything.
        let crash_clients = run_clients(tokio::time::Instant::now() + Duration::from_secs(4), true);
        // Halfway through their run, whatever the clients are doing then:
        // the crash lands at an arbitrary point of the load, not at a chosen one.
        tokio::time::sleep(Duration::from_secs(2)).await;
        cache.kill9();
        for t in crash_clients {
            t.await?;
        }
        cache.restart().await?;
        let store = cache.store();
        assert_eq!(store.temp_files()?, 0);
        store.verified_content()?;
        for (i, img) in images.iter().enumerate() {
            pull(&cache, &format!("soak{i}"), "v1", img).await?;
        }
        store.verified_content()?;
        Ok(())
    })
    .await;
}

/// Starts a cache on `storage`, shared with other processes, in front of `fake`.
async fn start_on(storage: &Path, fake: &FakeUpstream) -> Result<CacheProcess> {
    CacheProcess::start_with(
        CacheOptions::new()
            .upstream("docker.io", &fake.url())
            .arg("--storage")
            .arg(storage.display().to_string()),
    )
    .await
}

/// The temp directory of `cache`'s process on `store`, which must have one.
fn tmp_dir_of(store: &StoreLayout, cache: &CacheProcess) -> Result<std::path::PathBuf> {
    let pid = cache.pid().context("not running")?;
    store
        .process_tmp_dir(pid)?
        .with_context(|| format!("process {pid} has no temp directory"))
}

/// Whether `dir` holds a temp file besides its lock file.
fn holds_temp_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|files| {
        files
            .flatten()
            .any(|f| f.file_name() != regmirror_cache::store::layout::TMP_LOCK)
    })
}

#[tokio::test]
async fn a_process_starting_on_the_same_storage_leaves_downloads_in_flight_alone() {
    bounded(90, async {
        let fake = FakeUpstream::start().await?;
        let img = one_layer(8_000_000, 41)?;
        fake.add_image("library/app", Some("v1"), &img);
        let layer = img.layers[0].digest.clone();
        let shared = tempfile::tempdir()?;
        let storage = shared.path().join("store");
        let a = start_on(&storage, &fake).await?;
        let store = a.store();
        let a_tmp = tmp_dir_of(&store, &a)?;
        fake.set_behaviour(Behaviour::SlowBody {
            bytes_per_sec: 2 * SLOW_BODY,
        });
        let clients =
            FrontAndBehind::start(format!("{}/v2/library/app/blobs/{layer}", a.url())).await?;

        // A rolling update's new pod on a ReadWriteMany volume: it starts
        // while the old one is serving.
        let b = start_on(&storage, &fake).await?;
        let b_tmp = tmp_dir_of(&store, &b)?;
        assert_ne!(a_tmp, b_tmp);
        assert!(
            holds_temp_files(&a_tmp),
            "the download's temp file was swept"
        );
        clients.finish(&layer, stored(&store, &layer)).await?;
        store.verified_content()?;
        // The other process reads it from disk.
        fake.set_behaviour(Behaviour::Normal);
        fake.clear_requests();
        get_blob(&b, "library/app", &layer).await?;
        assert!(
            fake.requests().iter().all(|r| !r.path.contains("/blobs/")),
            "fetched again"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn the_next_process_sweeps_a_killed_ones_temp_files_and_no_live_ones() {
    bounded(90, async {
        let fake = FakeUpstream::start().await?;
        let live = one_layer(6_000_000, 42)?;
        let killed = one_layer(3_000_000, 43)?;
        fake.add_image("library/live", Some("v1"), &live);
        fake.add_image("library/killed", Some("v1"), &killed);
        let (live_layer, killed_layer) = (&live.layers[0].digest, &killed.layers[0].digest);
        let shared = tempfile::tempdir()?;
        let storage = shared.path().join("store");
        let a = start_on(&storage, &fake).await?;
        let mut b = start_on(&storage, &fake).await?;
        let store = a.store();
        let (a_tmp, b_tmp) = (tmp_dir_of(&store, &a)?, tmp_dir_of(&store, &b)?);
        fake.set_behaviour(Behaviour::SlowBody {
            bytes_per_sec: SLOW_BODY,
        });
        let (download, received) =
            spawn_download(format!("{}/v2/library/live/blobs/{live_layer}", a.url()));
        let (doomed, doomed_received) = spawn_download(format!(
            "{}/v2/library/killed/blobs/{killed_layer}",
            b.url()
        ));
        received_at_least(&received, UNDER_WAY).await?;
        received_at_least(&doomed_received, UNDER_WAY).await?;
        assert!(holds_temp_files(&b_tmp), "no temp file mid-download");
        b.kill9();
        let _ = doomed.await?;
        assert!(
            b_tmp.exists(),
            "a killed process's temp files are left to the next one"
        );

        let c = start_on(&storage, &fake).await?;
        assert!(!b_tmp.exists(), "the killed process's temp files were kept");
        assert!(
            holds_temp_files(&a_tmp),
            "a live process's temp files were swept"
        );
        let mut dirs: Vec<_> = store
            .process_tmp_dirs()?
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        dirs.sort();
        let mut expected = vec![a_tmp, tmp_dir_of(&store, &c)?];
        expected.sort();
        assert_eq!(dirs, expected);
        assert!(
            !store.blob("docker.io", killed_layer).exists(),
            "partial blob in the store"
        );
        let body = download.await??;
        assert_eq!(
            sha256_digest(&body),
            *live_layer,
            "the live download was cut short"
        );
        stored(&store, live_layer).await?;
        store.verified_content()?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_failed_rename_still_serves_the_verified_blob_to_every_client() {
    bounded(90, async {
        let fake = FakeUpstream::start().await?;
        let img = one_layer(8_000_000, 44)?;
        fake.add_image("library/app", Some("v1"), &img);
        let layer = img.layers[0].digest.clone();
        let dir = tempfile::tempdir()?;
        let cache = start_on(&dir.path().join("store"), &fake).await?;
        let store = cache.store();
        fake.set_behaviour(Behaviour::SlowBody {
            bytes_per_sec: 2 * SLOW_BODY,
        });
        let clients =
            FrontAndBehind::start(format!("{}/v2/library/app/blobs/{layer}", cache.url())).await?;
        // A file where the blob's directory must be: the rename fails.
        let blob = store.blob("docker.io", &layer);
        let obstacle = blob.parent().context("blob path has a directory")?;
        std::fs::create_dir_all(obstacle.parent().context("and a parent")?)?;
        std::fs::write(obstacle, b"in the way")?;

        let not_stored = async {
            wait_until(Duration::from_secs(10), || async {
                cache.log().contains("blob verified but not stored")
            })
            .await
            .with_context(|| cache.log_tail(20))
        };
        clients.finish(&layer, not_stored).await?;
        assert_eq!(store.temp_files()?, 0, "the temp file was kept");
        let m = cache.metrics().await?;
        assert_eq!(
            metric_sample(&m, "regmirror_unstored_blobs_total"),
            1.0,
            "{m}"
        );
        assert_eq!(metric_sample(&m, "regmirror_store_bytes"), 0.0, "{m}");

        // The next request fetches it again, and this time stores it.
        std::fs::remove_file(obstacle)?;
        fake.set_behaviour(Behaviour::Normal);
        fake.clear_requests();
        get_blob(&cache, "library/app", &layer).await?;
        stored(&store, &layer).await?;
        let gets = fake
            .requests()
            .iter()
            .filter(|r| r.path.contains("/blobs/"))
            .count();
        assert_eq!(gets, 1, "blob GETs upstream");
        store.verified_content()?;
        Ok(())
    })
    .await;
}

/// A cold body arrives in a new receive buffer per read while several MiB of
/// earlier ones are queued to be written and hashed. Their memory must be
/// reused: glibc's malloc gave it back to the kernel on every free, so each
/// buffer was faulted in and zeroed again (about 170 faults per MiB in a debug
/// build, 40 in a release one, 7% of a cold GiB's CPU; issue 20). With
/// mimalloc: under 1 per MiB here.
#[tokio::test]
async fn a_cold_fill_reuses_the_memory_of_its_receive_buffers() {
    bounded(90, async {
        let reg = Registry::start().await?;
        let warm_up = one_layer(8_000_000, 21)?;
        let measured = one_layer(48_000_000, 22)?;
        seed::push_built_image(&reg.url(), "library/warm-up", "v1", &warm_up).await?;
        seed::push_built_image(&reg.url(), "library/measured", "v1", &measured).await?;
        let cache =
            CacheProcess::start(["--upstream".to_owned(), format!("docker.io={}", reg.url())])
                .await?;
        let pid = cache.pid().context("pid")?;
        // The first fill grows the heap to its working size.
        get_blob(&cache, "warm-up", &warm_up.layers[0].digest).await?;
        let before = process::minor_faults(pid)?;
        let blob = get_blob(&cache, "measured", &measured.layers[0].digest).await?;
        let faults = process::minor_faults(pid)? - before;
        let per_mib = faults as f64 / (blob.len() as f64 / f64::from(1 << 20));
        ensure!(
            per_mib < 8.0,
            "{faults} page faults in the cache for a cold fill of {} bytes: {per_mib:.1} per MiB",
            blob.len()
        );
        Ok(())
    })
    .await;
}
