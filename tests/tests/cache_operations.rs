//! Running the cache unattended: byte budget with LRU eviction, age limit, full
//! and read-only disks, crashes, graceful shutdown, metrics, probes and logs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use regmirror_e2e::seed::{self, ImageSpec, PushedImage};
use regmirror_e2e::util::{
    bounded, http_client, metric_sample, metric_sum, require_root, sha256_digest, wait_until,
};
use regmirror_e2e::{Behaviour, CacheOptions, CacheProcess, FakeUpstream, Registry};

/// One incompressible layer of about `size` bytes.
fn one_layer(size: usize, seed: u64) -> Result<PushedImage> {
    seed::build_image(&ImageSpec::oci(&[size]).gzip_level(0).seed(seed))
}

fn blob_file(storage: &Path, host: &str, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    storage
        .join("upstreams")
        .join(host)
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
}

/// Waits until a blob is in the store. A client has its last bytes once
/// they are verified, slightly before the file is synced and renamed into
/// place, so "pulled" does not yet mean "stored".
async fn stored(storage: &Path, digest: &str) -> Result<()> {
    let file = blob_file(storage, "docker.io", digest);
    wait_until(Duration::from_secs(10), || async { file.exists() })
        .await
        .with_context(|| format!("{digest} never stored"))
}

/// Every content file under `upstreams/` with its size; fails if any does not
/// hash to its name.
fn verify_store(storage: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![storage.join("upstreams")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if !p.ends_with("repositories") {
                    stack.push(p);
                }
                continue;
            }
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.len() != 64 {
                continue;
            }
            let bytes = std::fs::read(&p)?;
            ensure!(
                sha256_digest(&bytes) == format!("sha256:{name}"),
                "{} does not match its digest",
                p.display()
            );
            out.push((p, bytes.len() as u64));
        }
    }
    Ok(out)
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
        let storage = cache.storage().to_path_buf();
        let layer = |i: usize| images[i].layers[0].digest.clone();

        pull(&cache, "img0", "v1", &images[0]).await?;
        stored(&storage, &layer(0)).await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
        pull(&cache, "img1", "v1", &images[1]).await?;
        stored(&storage, &layer(1)).await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
        // Reading img0's layer again makes img1's the least recently used.
        get_blob(&cache, "img0", &layer(0)).await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
        pull(&cache, "img2", "v1", &images[2]).await?;

        wait_until(Duration::from_secs(10), || async {
            !blob_file(&storage, "docker.io", &layer(1)).exists()
        })
        .await
        .context("img1's layer should be evicted")?;
        assert!(
            blob_file(&storage, "docker.io", &layer(0)).exists(),
            "recently read layer evicted"
        );
        assert!(
            blob_file(&storage, "docker.io", &layer(2)).exists(),
            "newest layer evicted"
        );
        let total: u64 = verify_store(&storage)?.iter().map(|(_, s)| s).sum();
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
        stored(cache.storage(), &img.layers[0].digest).await?;
        let file = blob_file(cache.storage(), "docker.io", &img.layers[0].digest);
        wait_until(Duration::from_secs(15), || async { !file.exists() })
            .await
            .context("aged content should be removed")?;
        let m = cache.metrics().await?;
        assert!(
            metric_sum(&m, "regmirror_evictions_total", &[r#"reason="age""#]) >= 1.0,
            "{m}"
        );
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

        // Larger than the whole disk: served, not stored.
        pull(&cache, "big", "v1", &big).await?;
        assert!(!blob_file(&storage, "docker.io", &big.layers[0].digest).exists());
        let m = cache.metrics().await?;
        assert!(metric_sample(&m, "regmirror_disk_full_passthrough_total") >= 1.0, "{m}");
        assert!(metric_sum(&m, "regmirror_served_bytes_total", &[r#"source="passthrough""#]) >= 6_000_000.0);
        assert_eq!(std::fs::read_dir(storage.join("tmp"))?.count(), 0, "temp files left");

        // A disk filled by someone else: still served.
        let filler = disk.path().join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()))
            .output()?;
        pull(&cache, "small", "v1", &small).await?;
        assert!(!blob_file(&storage, "docker.io", &small.layers[0].digest).exists());

        // Space returns: caching resumes.
        std::fs::remove_file(&filler)?;
        pull(&cache, "later", "v1", &later).await?;
        stored(&storage, &later.layers[0].digest).await?;
        verify_store(&storage)?;

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
        let storage = cache.storage().to_path_buf();
        fake.set_behaviour(Behaviour::SlowBody {
            bytes_per_sec: 1_000_000,
        });
        let url = format!("{}/v2/library/app/blobs/{layer}", cache.url());
        let download = tokio::spawn(async move {
            let resp = http_client().get(&url).send().await?;
            Ok::<_, anyhow::Error>(resp.bytes().await.map(|b| b.len()))
        });
        // Wait until the fill is writing, then crash.
        wait_until(Duration::from_secs(10), || async {
            std::fs::read_dir(storage.join("tmp")).is_ok_and(|mut d| d.next().is_some())
        })
        .await
        .context("fill never started")?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        cache.kill9();
        if let Ok(Ok(n)) = download.await? {
            assert!(n < img.layers[0].bytes.len(), "whole blob delivered");
        }
        assert!(
            !blob_file(&storage, "docker.io", &layer).exists(),
            "partial blob in the store"
        );

        fake.set_behaviour(Behaviour::Normal);
        cache.restart().await?;
        assert_eq!(
            std::fs::read_dir(storage.join("tmp"))?.count(),
            0,
            "temp files not swept"
        );
        pull(&cache, "app", "v1", &img).await?;
        stored(&storage, &layer).await?;
        let files = verify_store(&storage)?;
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
            bytes_per_sec: 1_000_000,
        });
        let url = format!("{}/v2/library/app/blobs/{layer}", cache.url());
        let addr = cache.addr();
        let download = tokio::spawn(async move {
            let resp = http_client().get(&url).send().await?;
            let body = resp.bytes().await?;
            Ok::<_, anyhow::Error>(sha256_digest(&body))
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
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
        assert_eq!(download.await??, layer, "in-flight download cut short");
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
        let base = storage.join("upstreams/docker.io/blobs/sha256");
        for i in 0..FILES {
            let hex = format!("{:064x}", (i as u128) * 0x9e37_79b9_7f4a_7c15 + 1);
            let d = base.join(&hex[..2]);
            if i < 256 || !d.exists() {
                std::fs::create_dir_all(&d)?;
            }
            std::fs::write(d.join(&hex), b"x")?;
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
        .await?;
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
        tokio::time::sleep(Duration::from_secs(2)).await;
        cache.kill9();
        for t in crash_clients {
            t.await?;
        }
        cache.restart().await?;
        assert_eq!(std::fs::read_dir(cache.storage().join("tmp"))?.count(), 0);
        verify_store(cache.storage())?;
        for (i, img) in images.iter().enumerate() {
            pull(&cache, &format!("soak{i}"), "v1", img).await?;
        }
        verify_store(cache.storage())?;
        Ok(())
    })
    .await;
}
