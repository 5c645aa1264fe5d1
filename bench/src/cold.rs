//! Cold scenarios, each run on a fresh system: 4 (big blob), 5 (thundering herd),
//! 6 (full image pull with skopeo), 8 (Range).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use crate::http::{self, ms, secs};
use crate::report::{Check, Section};
use crate::stats::{max, median};
use crate::systems::{Kind, System};
use crate::upstream::SeededBlob;
use crate::{Bench, IMAGE_REPO, TAG, blob_url, size_label};

const BIG_TIMEOUT: Duration = Duration::from_secs(600);
const SETTLE_QUIET: Duration = Duration::from_secs(1);

/// Direct GET from the upstream: (TTFB ms, total s, last MiB ms).
async fn direct(b: &Bench, blob: &SeededBlob) -> Result<(f64, f64, f64)> {
    let client = http::client(1, BIG_TIMEOUT);
    let t = http::get_ok(
        &client,
        &blob_url(&b.up.url(), &blob.repo, &blob.digest),
        blob.size,
    )
    .await?;
    Ok((ms(t.ttfb), secs(t.total), ms(t.last_mib)))
}

/// Seconds SHA-256 takes over `size` bytes on one core of this machine (the
/// `sha2` crate the cache uses, over a 1 MiB buffer in the CPU cache): the
/// least a system that checks what it relays can take, whatever else it does.
async fn sha256_secs(size: u64) -> Result<f64> {
    Ok(tokio::task::spawn_blocking(move || {
        let buf: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let start = std::time::Instant::now();
        let mut hasher = Sha256::new();
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        std::hint::black_box(hasher.finalize());
        secs(start.elapsed())
    })
    .await?)
}

/// Scenario 4.
pub(crate) async fn cold_big(b: &Bench) -> Result<Section> {
    let blob = &b.content.big;
    let label = size_label(blob.size);
    let mut sec = Section::new(
        format!("4. Cold {label} blob"),
        format!(
            "One GET of an uncached {label} blob through a fresh system. Reference: the same GET \
             straight from the upstream, in the same run. Upstream bytes are the access log's \
             body bytes for that digest once the upstream has been quiet for 1 s (background \
             copies included), in multiples of the blob size. Time to local: from the end of \
             the client's download until the blob is committed in the system's storage (later \
             requests are served locally from then on). SHA-256 on one core: the \
             same number of bytes hashed by one thread of the bench (the cache's `sha2` \
             crate, data in the CPU cache), the physical limit of a system that checks the \
             digest, measured in every run."
        ),
    );
    let sha = "SHA-256 of as many bytes on one core, s";
    for run in 0..b.cfg.big_runs {
        let (d_ttfb, d_total, d_tail) = direct(b, blob).await?;
        let sha_s = sha256_secs(blob.size).await?;
        for kind in Kind::BOTH {
            eprintln!("[bench] 4: run {run} {}", kind.name());
            let sys = System::start(kind, &b.up.url(), &b.cfg.cache_bin).await?;
            b.up.settle(Duration::from_millis(200), Duration::from_secs(30))
                .await?;
            let mark = b.up.mark();
            let client = http::client(1, BIG_TIMEOUT);
            let t = http::get_ok(
                &client,
                &blob_url(&sys.url(), &blob.repo, &blob.digest),
                blob.size,
            )
            .await
            .with_context(|| sys.log_tail())?;
            let local = sys.wait_blob(&blob.digest, blob.size, BIG_TIMEOUT).await?;
            b.up.settle(SETTLE_QUIET, BIG_TIMEOUT).await?;
            let up_bytes = b.up.since(mark).bytes_for(&blob.digest);
            sec.add("total s", kind, secs(t.total));
            sec.add("time / direct upstream time", kind, secs(t.total) / d_total);
            sec.add("time / SHA-256 time", kind, secs(t.total) / sha_s);
            sec.add("TTFB ms", kind, ms(t.ttfb));
            sec.add("TTFB over upstream TTFB, ms", kind, ms(t.ttfb) - d_ttfb);
            sec.add("last MiB of the body took, ms", kind, ms(t.last_mib));
            sec.add(
                "upstream bytes (x blob)",
                kind,
                up_bytes as f64 / blob.size as f64,
            );
            sec.add("time to local after download, ms", kind, ms(local));
        }
        sec.add_reference("total s", d_total);
        sec.add_reference(sha, sha_s);
        sec.add_reference("TTFB ms", d_ttfb);
        sec.add_reference("last MiB of the body took, ms", d_tail);
    }
    sec.target("total s", "lower than distribution", Check::Lower);
    sec.target(
        "time / direct upstream time",
        "<= 1.25",
        Check::OursMedianAtMost(1.25),
    );
    sec.target(
        "upstream bytes (x blob)",
        "exactly 1x",
        Check::OursAlways(1.0),
    );
    sec.target(
        "TTFB over upstream TTFB, ms",
        "< 100 ms",
        Check::OursMaxAtMost(100.0),
    );
    Ok(sec)
}

/// Scenario 5.
pub(crate) async fn herd(b: &Bench) -> Result<Section> {
    let blob = &b.content.herd;
    let label = size_label(blob.size);
    let mut sec = Section::new(
        "5. Thundering herd: N concurrent cold clients on one blob",
        format!(
            "N clients GET the same uncached {label} blob at the same instant from a fresh system. \
             Per run: upstream bytes (x blob, after the upstream is quiet for 1 s), and over the \
             clients the median and worst TTFB and finish time (from the common start). \
             Reference: one direct GET from the upstream in the same run."
        ),
    );
    for &n in &b.cfg.herd_clients {
        let up = format!("N={n}: upstream bytes (x blob)");
        let over = format!("N={n}: worst TTFB over upstream TTFB, ms");
        for run in 0..b.cfg.runs {
            let (d_ttfb, d_total, _) = direct(b, blob).await?;
            for kind in Kind::BOTH {
                eprintln!("[bench] 5: N={n} run {run} {}", kind.name());
                let sys = System::start(kind, &b.up.url(), &b.cfg.cache_bin).await?;
                b.up.settle(Duration::from_millis(200), Duration::from_secs(30))
                    .await?;
                let mark = b.up.mark();
                let client = http::client(n, BIG_TIMEOUT);
                let url = blob_url(&sys.url(), &blob.repo, &blob.digest);
                let start = Instant::now();
                let mut tasks = Vec::new();
                for _ in 0..n {
                    let (client, url, size) = (client.clone(), url.clone(), blob.size);
                    tasks.push(tokio::spawn(async move {
                        http::get_ok_from(&client, &url, start, size).await
                    }));
                }
                let (mut ttfb, mut fin) = (Vec::new(), Vec::new());
                for t in tasks {
                    let t = t.await?.with_context(|| sys.log_tail())?;
                    ttfb.push(ms(t.ttfb));
                    fin.push(ms(t.total));
                }
                sys.wait_blob(&blob.digest, blob.size, BIG_TIMEOUT).await?;
                b.up.settle(SETTLE_QUIET, BIG_TIMEOUT).await?;
                let bytes = b.up.since(mark).bytes_for(&blob.digest);
                sec.add(&up, kind, bytes as f64 / blob.size as f64);
                sec.add(&format!("N={n}: TTFB median ms"), kind, median(&ttfb));
                sec.add(&format!("N={n}: TTFB worst ms"), kind, max(&ttfb));
                sec.add(&over, kind, max(&ttfb) - d_ttfb);
                sec.add(&format!("N={n}: finish median ms"), kind, median(&fin));
                sec.add(&format!("N={n}: finish worst ms"), kind, max(&fin));
            }
            sec.add_reference(&format!("N={n}: TTFB median ms"), d_ttfb);
            sec.add_reference(&format!("N={n}: finish median ms"), d_total * 1000.0);
        }
        sec.target(&up, "exactly 1x", Check::OursAlways(1.0));
        sec.target(&over, "< 100 ms", Check::OursMaxAtMost(100.0));
        for which in ["median", "worst"] {
            sec.target(
                &format!("N={n}: finish {which} ms"),
                "lower than distribution",
                Check::Lower,
            );
        }
    }
    Ok(sec)
}

/// Scenario 6.
pub(crate) async fn image_pull(b: &Bench) -> Result<Section> {
    let image = b.content.image.as_ref().context("image not seeded")?;
    let sizes: Vec<String> = image
        .layers
        .iter()
        .map(|l| format!("{:.1}", l.size() as f64 / 1048576.0))
        .collect();
    let mut sec = Section::new(
        "6. Full image pull with skopeo",
        format!(
            "`skopeo copy docker://HOST/{IMAGE_REPO}:{TAG} dir:...` (skopeo 1.9 fetches the \
             layers in parallel and verifies them), image of 5 gzip layers of {} MiB ({:.0} MiB \
             in all). Cold: fresh system. Warm: the same pull again once every blob is stored. \
             Reference: the same pull straight from the upstream.",
            sizes.join(", "),
            image.total_size() as f64 / 1048576.0
        ),
    );
    let dir = tempfile::tempdir()?;
    let pull = |host: String, n: usize| {
        let dest = dir.path().join(format!("pull-{n}"));
        async move {
            let _ = std::fs::remove_dir_all(&dest);
            let start = Instant::now();
            regmirror_e2e::skopeo_copy(&format!("{host}/{IMAGE_REPO}:{TAG}"), &dest).await?;
            let took = secs(start.elapsed());
            let _ = std::fs::remove_dir_all(&dest);
            anyhow::Ok(took)
        }
    };
    let mut n = 0;
    for run in 0..b.cfg.runs {
        n += 1;
        let direct_s = pull(b.up.reg.host(), n).await?;
        for kind in Kind::BOTH {
            eprintln!("[bench] 6: run {run} {}", kind.name());
            let sys = System::start(kind, &b.up.url(), &b.cfg.cache_bin).await?;
            b.up.settle(Duration::from_millis(200), Duration::from_secs(30))
                .await?;
            let mark = b.up.mark();
            n += 1;
            let cold = pull(sys.host(), n).await.with_context(|| sys.log_tail())?;
            for bl in image.blobs() {
                sys.wait_blob(&bl.digest, bl.size(), BIG_TIMEOUT).await?;
            }
            b.up.settle(SETTLE_QUIET, BIG_TIMEOUT).await?;
            let served = b.up.since(mark);
            let blob_bytes: u64 = image.blobs().map(|bl| served.bytes_for(&bl.digest)).sum();
            let blobs_size: u64 = image.blobs().map(|bl| bl.size()).sum();
            let mark = b.up.mark();
            n += 1;
            let warm = pull(sys.host(), n).await?;
            b.up.settle(Duration::from_millis(300), Duration::from_secs(30))
                .await?;
            let warm_up = b.up.since(mark);
            sec.add("cold pull s", kind, cold);
            sec.add("cold pull / direct pull", kind, cold / direct_s);
            sec.add("warm pull s", kind, warm);
            sec.add("warm pull / direct pull", kind, warm / direct_s);
            sec.add(
                "cold: upstream blob bytes (x image blobs)",
                kind,
                blob_bytes as f64 / blobs_size as f64,
            );
            sec.add("cold: upstream requests", kind, served.requests() as f64);
            sec.add("warm: upstream requests", kind, warm_up.requests() as f64);
        }
        sec.add_reference("cold pull s", direct_s);
        sec.add_reference("warm pull s", direct_s);
    }
    sec.target(
        "cold: upstream blob bytes (x image blobs)",
        "exactly 1x",
        Check::OursAlways(1.0),
    );
    sec.target("warm pull s", "faster than distribution", Check::Lower);
    sec.target(
        "cold pull / direct pull",
        "<= 1.1",
        Check::OursMedianAtMost(1.1),
    );
    // skopeo has no `sendfile` reference here: the direct pull (the upstream
    // serves files with `sendfile` too) stands for it, at 0.95x throughput.
    sec.target(
        "warm pull / direct pull",
        "<= 1.05 (>= 0.95x throughput)",
        Check::OursMedianAtMost(1.0 / 0.95),
    );
    Ok(sec)
}

/// Scenario 8.
pub(crate) async fn range(b: &Bench) -> Result<Section> {
    let blob = &b.content.big;
    let off = blob.size / 2;
    let len = 1024u64;
    let range = format!("bytes={off}-{}", off + len - 1);
    let mut sec = Section::new(
        "8. Range: 1 KiB in the middle of a big blob",
        format!(
            "`Range: {range}` on the {} blob: cold (fresh system), then warm (same system, once \
             the blob is stored, or after the upstream is quiet if it never is). \"time to the \
             bytes\" is until the requested 1 KiB has arrived: with a 200 (Range ignored) the \
             client reads up to the offset, then disconnects. Upstream bytes: access-log body \
             bytes for the digest, x blob size, once the upstream is quiet for 1 s.",
            size_label(blob.size)
        ),
    );
    for run in 0..b.cfg.big_runs {
        for kind in Kind::BOTH {
            eprintln!("[bench] 8: run {run} {}", kind.name());
            let sys = System::start(kind, &b.up.url(), &b.cfg.cache_bin).await?;
            b.up.settle(Duration::from_millis(200), Duration::from_secs(30))
                .await?;
            let url = blob_url(&sys.url(), &blob.repo, &blob.digest);
            let client = http::client(1, BIG_TIMEOUT);
            for phase in ["cold", "warm"] {
                let mark = b.up.mark();
                let start = Instant::now();
                let t = http::timed(
                    client.get(&url).header("range", &range),
                    start,
                    Some(off + len),
                )
                .await?;
                ensure!(
                    t.status == 206 || t.status == 200,
                    "{phase} range: status {}",
                    t.status
                );
                if phase == "cold" {
                    // Let a background fill finish before the warm request.
                    let _ = sys.wait_blob(&blob.digest, blob.size, BIG_TIMEOUT).await;
                }
                b.up.settle(SETTLE_QUIET, BIG_TIMEOUT).await?;
                let up_bytes = b.up.since(mark).bytes_for(&blob.digest);
                sec.add(
                    &format!("{phase}: status (206 = honoured)"),
                    kind,
                    f64::from(t.status),
                );
                sec.add(&format!("{phase}: TTFB ms"), kind, ms(t.ttfb));
                sec.add(&format!("{phase}: time to the bytes ms"), kind, ms(t.total));
                sec.add(
                    &format!("{phase}: upstream bytes (x blob)"),
                    kind,
                    up_bytes as f64 / blob.size as f64,
                );
            }
        }
    }
    sec.target(
        "cold: upstream bytes (x blob)",
        "<= 1x",
        Check::OursMaxAtMost(1.0),
    );
    sec.target("warm: upstream bytes (x blob)", "0", Check::OursAlways(0.0));
    Ok(sec)
}
