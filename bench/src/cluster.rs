//! Scenario 10 (issue 16): a cache cluster of R = 1, 2, 4 members in front of
//! the upstream. Cold clients spread over the members (one upstream fetch
//! cluster-wide), warm clients spread over the members (aggregate
//! throughput, p99), and what a peer hop costs on warm reads (a GET through
//! a member that does not own the blob, which streams it from the owner).
//!
//! Only regmirror runs here (distribution has no cluster), so rows carry
//! values for "regmirror" alone and the targets are checked on them.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use regmirror_e2e::Cluster;
use tokio::time::Instant;

use crate::http::{self, ms, secs};
use crate::report::{Check, Section};
use crate::stats::{max, percentile};
use crate::systems::{Kind, UPSTREAM_HOST};
use crate::upstream::SeededBlob;
use crate::{Bench, GIB, blob_url, procfs, size_label};

const TIMEOUT: Duration = Duration::from_secs(600);
const SETTLE_QUIET: Duration = Duration::from_secs(1);

/// CPU seconds (utime + stime) of each member of `cluster`, in member order.
fn cpu(cluster: &Cluster) -> Result<Vec<f64>> {
    cluster
        .members()
        .iter()
        .map(|m| procfs::cpu_seconds(m.pid().context("member not running")?))
        .collect()
}

/// Per-member CPU seconds spent between two [`cpu`] samples.
fn spent(before: &[f64], after: &[f64]) -> Vec<f64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// Scenario 10.
pub(crate) async fn cluster(b: &Bench) -> Result<Section> {
    // Members start through the e2e harness, which runs
    // `$REGMIRROR_BIN_DIR/regmirror-cache`: the binary under test only when
    // that is the configured one.
    let harness_bin = std::env::var_os("REGMIRROR_BIN_DIR")
        .map(|d| std::path::PathBuf::from(d).join("regmirror-cache"));
    ensure!(
        harness_bin.as_ref() == Some(&b.cfg.cache_bin),
        "scenario 10 starts members from $REGMIRROR_BIN_DIR: set it to {} (make bench does)",
        b.cfg
            .cache_bin
            .parent()
            .map_or("?".into(), |p| p.display().to_string())
    );
    let blob = &b.content.herd;
    let label = size_label(blob.size);
    let (warm_clients, warm_gets) = b.cfg.cluster_warm;
    let mut sec = Section::new(
        "10. Cache cluster: R members as one cache",
        format!(
            "R `regmirror-cache` members (`--name`/`--peer`, fresh storage each run) in front of \
             the upstream. Cold: N clients GET one uncached {label} blob at once, client i \
             through member i mod R; upstream bytes (x blob, from the upstream's access log \
             once it is quiet for 1 s), worst TTFB and finish over the clients. Warm: \
             {warm_clients} clients spread over the members, {warm_gets} GETs each of the now \
             cached blob; aggregate GB/s, p99 request time, and CPU-s per GiB summed over the \
             members. Peer hop (R > 1): {hop} sequential GETs through the blob's owner, then \
             through a member that does not own it (it streams the blob from the owner), \
             alternated {runs} times (medians); \
             throughput, the serving member's CPU-s per GiB, their ratio (the hop's CPU \
             over the owner's when it serves directly), and what both members spend on a \
             GiB read through the hop.",
            hop = b.cfg.cluster_hop_gets,
            runs = b.cfg.runs.max(1),
        ),
    );
    for &r in &b.cfg.cluster_sizes {
        for &n in &b.cfg.cluster_clients {
            for run in 0..b.cfg.runs {
                eprintln!("[bench] 10: R={r} N={n} run {run}");
                cold_and_warm(
                    b,
                    &mut sec,
                    blob,
                    r,
                    n,
                    run == 0 && n == b.cfg.cluster_clients[0],
                )
                .await?;
            }
            sec.target(
                &format!("R={r} N={n}: upstream bytes (x blob)"),
                "exactly 1x",
                Check::OursAlways(1.0),
            );
        }
        if r > 1 {
            sec.target(
                &format!("R={r}: hop CPU / owner CPU per GiB"),
                "<= 1.3x (median)",
                Check::OursMedianAtMost(1.3),
            );
        }
    }
    Ok(sec)
}

/// One run: a fresh `r`-member cluster, `n` cold clients; then, when
/// `warm` (once per cluster size), the warm and peer-hop measurements on it.
async fn cold_and_warm(
    b: &Bench,
    sec: &mut Section,
    blob: &SeededBlob,
    r: usize,
    n: usize,
    warm: bool,
) -> Result<()> {
    let cluster = Cluster::start(r, UPSTREAM_HOST, &b.up.url(), &[]).await?;
    b.up.settle(Duration::from_millis(200), Duration::from_secs(30))
        .await?;
    let mark = b.up.mark();
    let client = http::client(n, TIMEOUT);
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (client, size) = (client.clone(), blob.size);
            let url = blob_url(&cluster.url(i % r), &blob.repo, &blob.digest);
            tokio::spawn(async move { http::get_ok_from(&client, &url, start, size).await })
        })
        .collect();
    let (mut ttfb, mut fin) = (Vec::new(), Vec::new());
    for t in tasks {
        let t = t.await??;
        ttfb.push(ms(t.ttfb));
        fin.push(ms(t.total));
    }
    let owner = cluster.ranking(UPSTREAM_HOST, &blob.digest)[0];
    cluster
        .wait_holders(UPSTREAM_HOST, &blob.digest, &[owner], TIMEOUT)
        .await?;
    b.up.settle(SETTLE_QUIET, TIMEOUT).await?;
    let bytes = b.up.since(mark).bytes_for(&blob.digest);
    let ours = Kind::Ours;
    sec.add(
        &format!("R={r} N={n}: upstream bytes (x blob)"),
        ours,
        bytes as f64 / blob.size as f64,
    );
    sec.add(
        &format!("R={r} N={n}: cold TTFB worst ms"),
        ours,
        max(&ttfb),
    );
    sec.add(
        &format!("R={r} N={n}: cold finish worst ms"),
        ours,
        max(&fin),
    );
    if !warm {
        return Ok(());
    }

    // Warm: clients spread over the members.
    let (clients, gets) = b.cfg.cluster_warm;
    let cpu0 = cpu(&cluster)?;
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let client = http::client(1, TIMEOUT);
            let url = blob_url(&cluster.url(i % r), &blob.repo, &blob.digest);
            let size = blob.size;
            tokio::spawn(async move {
                let mut took = Vec::with_capacity(gets);
                for _ in 0..gets {
                    took.push(ms(http::get_ok(&client, &url, size).await?.total));
                }
                anyhow::Ok(took)
            })
        })
        .collect();
    let mut took = Vec::new();
    for t in tasks {
        took.extend(t.await??);
    }
    let wall = secs(start.elapsed());
    let cpu_all: f64 = spent(&cpu0, &cpu(&cluster)?).iter().sum();
    let total = (blob.size * (clients * gets) as u64) as f64;
    sec.add(
        &format!("R={r}: warm aggregate GB/s"),
        ours,
        total / wall / 1e9,
    );
    sec.add(
        &format!("R={r}: warm p99 ms"),
        ours,
        percentile(&took, 99.0),
    );
    sec.add(
        &format!("R={r}: warm CPU-s per GiB, all members"),
        ours,
        cpu_all / (total / GIB as f64),
    );

    // Peer hop: the owner serving directly, then a non-owner relaying it,
    // side by side `runs` times (each row reports the median): one pair is
    // a few dozen 10 ms CPU ticks, too few to compare once.
    let other = (0..r).find(|&i| i != owner);
    for _ in 0..b.cfg.runs.max(1) {
        let Some(other) = other else { break };
        let (owner_gbps, owner_cpu) = sequential(b, &cluster, blob, owner).await?;
        let (hop_gbps, hop_cpu) = sequential(b, &cluster, blob, other).await?;
        sec.add(&format!("R={r}: via owner GB/s"), ours, owner_gbps);
        sec.add(&format!("R={r}: via non-owner (hop) GB/s"), ours, hop_gbps);
        sec.add(
            &format!("R={r}: owner CPU-s per GiB"),
            ours,
            owner_cpu[owner],
        );
        sec.add(
            &format!("R={r}: hop member CPU-s per GiB"),
            ours,
            hop_cpu[other],
        );
        sec.add(
            &format!("R={r}: hop CPU / owner CPU per GiB"),
            ours,
            hop_cpu[other] / owner_cpu[owner],
        );
        sec.add(
            &format!("R={r}: via hop, owner + hop CPU-s per GiB"),
            ours,
            hop_cpu[other] + hop_cpu[owner],
        );
    }
    Ok(())
}

/// Sequential GETs of `blob` through member `via` on one connection
/// ([`crate::Config::cluster_hop_gets`] of them, after one untimed GET):
/// GB/s, and every member's CPU-s per GiB sent (in member order).
async fn sequential(
    b: &Bench,
    cluster: &Cluster,
    blob: &SeededBlob,
    via: usize,
) -> Result<(f64, Vec<f64>)> {
    let gets = b.cfg.cluster_hop_gets;
    ensure!(gets > 0, "no hop GETs configured");
    let client = http::client(1, TIMEOUT);
    let url = blob_url(&cluster.url(via), &blob.repo, &blob.digest);
    http::get_ok(&client, &url, blob.size).await?;
    let cpu0 = cpu(cluster)?;
    let start = Instant::now();
    for _ in 0..gets {
        http::get_ok(&client, &url, blob.size).await?;
    }
    let wall = secs(start.elapsed());
    let gib = (blob.size * gets as u64) as f64 / GIB as f64;
    let per_gib = spent(&cpu0, &cpu(cluster)?)
        .iter()
        .map(|c| c / gib)
        .collect();
    Ok((gib * GIB as f64 / wall / 1e9, per_gib))
}
