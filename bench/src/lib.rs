//! regmirror-bench: issue 7's scenarios, run against regmirror-cache and CNCF
//! distribution's proxy mode side by side (A B A B), both in front of one seeded
//! upstream on loopback. See `README.md`, section Benchmarks.
//!
//! Start processes from the thread that runs [`run`] (the harness kills children when
//! the thread that spawned them exits): call it from `#[tokio::main]`/`#[tokio::test]`.

pub mod ceiling;
pub mod clients;
pub mod http;
pub mod machine;
pub mod pin;
pub mod procfs;
pub mod proxy;
pub mod report;
pub mod stats;
pub mod systems;
pub mod upstream;

mod cluster;
mod cold;
mod faults;
mod tags;
mod warm;

use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use regmirror_e2e::{ImageSpec, PushedImage, push_image};

use crate::proxy::Mode;
use crate::report::Section;
use crate::upstream::{SeededBlob, Upstream};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// Sizes, counts and durations of one benchmark run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Label shown in the report (`full`, `quick`, `micro`).
    pub profile: String,
    pub cache_bin: PathBuf,
    /// The `regmirror-bench` binary: scenario 1 runs it again as the
    /// reference `sendfile` server.
    pub bench_bin: PathBuf,
    /// Runs per system for most scenarios.
    pub runs: usize,
    /// Runs per system for the 1 GiB cases (scenarios 1 at 1 GiB, 4, 8).
    pub big_runs: usize,
    /// Scenario numbers to run (1..=10).
    pub scenarios: Vec<u32>,
    /// Scenario 1: (size, GETs per run).
    pub warm_sizes: Vec<(u64, usize)>,
    /// Scenario 2: seconds of load per run, and connection counts.
    pub small_secs: f64,
    pub small_conns: Vec<usize>,
    /// Scenario 3: upstream latency, sequential lookups, (concurrency, lookups each).
    pub tag_latency: Duration,
    pub tag_sequential: usize,
    pub tag_concurrent: (usize, usize),
    /// The big blob (scenarios 1, 4, 8): 1 GiB.
    pub big_size: u64,
    /// Scenario 5: blob size and client counts.
    pub herd_size: u64,
    pub herd_clients: Vec<usize>,
    /// Scenario 6: layer sizes (bytes).
    pub image_layers: Vec<usize>,
    /// Scenario 7: blob size, concurrent streams, idle connections wanted.
    pub load_size: u64,
    pub load_streams: usize,
    pub idle_conns: usize,
    /// Scenario 9: faults, and the longest we wait for one request.
    pub fault_modes: Vec<Mode>,
    pub fault_cap: Duration,
    /// Scenario 10: cluster sizes R, cold client counts N (on the herd
    /// blob), warm (clients, GETs each), and sequential GETs per peer-hop
    /// measurement.
    pub cluster_sizes: Vec<usize>,
    pub cluster_clients: Vec<usize>,
    pub cluster_warm: (usize, usize),
    pub cluster_hop_gets: usize,
}

impl Config {
    /// Issue 7 as written.
    pub fn full(cache_bin: PathBuf, bench_bin: PathBuf) -> Self {
        Self {
            profile: "full".into(),
            cache_bin,
            bench_bin,
            runs: 5,
            big_runs: 5,
            scenarios: (1..=10).collect(),
            warm_sizes: vec![(MIB, 200), (100 * MIB, 10), (GIB, 3)],
            small_secs: 2.0,
            small_conns: vec![1, 64],
            tag_latency: Duration::from_millis(20),
            tag_sequential: 30,
            tag_concurrent: (32, 5),
            big_size: GIB,
            herd_size: 64 * MIB,
            herd_clients: vec![1, 8, 64],
            image_layers: [1, 10, 50, 100, 500]
                .iter()
                .map(|m| m * MIB as usize)
                .collect(),
            load_size: 16 * MIB,
            load_streams: 256,
            idle_conns: 10_000,
            fault_modes: vec![
                Mode::Refuse,
                Mode::Silent,
                Mode::Slow {
                    bytes_per_sec: 1000,
                },
                Mode::Reset,
            ],
            fault_cap: Duration::from_secs(20),
            cluster_sizes: vec![1, 2, 4],
            cluster_clients: vec![1, 16],
            cluster_warm: (8, 4),
            // 2 GiB of the 64 MiB blob per side and run: ~100 CPU ticks.
            cluster_hop_gets: 32,
        }
    }

    /// A short smoke run of every scenario (`BENCH_QUICK=1`).
    pub fn quick(cache_bin: PathBuf, bench_bin: PathBuf) -> Self {
        Self {
            profile: "quick".into(),
            runs: 1,
            big_runs: 1,
            warm_sizes: vec![(64 * KIB, 20), (MIB, 4), (8 * MIB, 1)],
            small_secs: 0.3,
            small_conns: vec![1, 8],
            tag_sequential: 5,
            tag_concurrent: (8, 2),
            big_size: 8 * MIB,
            herd_size: MIB,
            herd_clients: vec![1, 8],
            image_layers: vec![16_000, 32_000, 64_000, 128_000, 256_000],
            load_size: 256 * KIB,
            load_streams: 16,
            idle_conns: 50,
            fault_cap: Duration::from_secs(5),
            cluster_clients: vec![4],
            cluster_warm: (4, 4),
            // 256 MiB of the 1 MiB blob: enough CPU ticks to compare.
            cluster_hop_gets: 256,
            ..Self::full(cache_bin, bench_bin)
        }
    }

    /// Tiny sizes and a few scenarios, for the smoke test under `make test`.
    pub fn micro(cache_bin: PathBuf, bench_bin: PathBuf) -> Self {
        Self {
            profile: "micro".into(),
            scenarios: vec![1, 4, 5, 8, 9],
            warm_sizes: vec![(64 * KIB, 4)],
            big_size: MIB,
            herd_clients: vec![1, 4],
            herd_size: 256 * KIB,
            fault_modes: vec![Mode::Refuse],
            fault_cap: Duration::from_secs(3),
            ..Self::quick(cache_bin, bench_bin)
        }
    }

    fn wants(&self, n: u32) -> bool {
        self.scenarios.contains(&n)
    }
}

/// Human size: `1 MiB`, `4 KiB`, `1 GiB`.
pub fn size_label(b: u64) -> String {
    if b >= GIB && b.is_multiple_of(GIB) {
        format!("{} GiB", b / GIB)
    } else if b >= MIB && b.is_multiple_of(MIB) {
        format!("{} MiB", b / MIB)
    } else if b >= KIB && b.is_multiple_of(KIB) {
        format!("{} KiB", b / KIB)
    } else {
        format!("{b} B")
    }
}

/// Content seeded into the upstream before any system starts.
#[derive(Debug)]
pub(crate) struct Content {
    pub warm: Vec<(SeededBlob, usize)>,
    pub big: SeededBlob,
    pub herd: SeededBlob,
    pub load: SeededBlob,
    pub small_blob: SeededBlob,
    /// `bench/small:v1`, one 4 KiB-ish layer.
    pub small: PushedImage,
    /// `bench/image:v1`, five layers.
    pub image: Option<PushedImage>,
}

pub(crate) const BLOB_REPO: &str = "bench/blobs";
pub(crate) const SMALL_REPO: &str = "bench/small";
pub(crate) const IMAGE_REPO: &str = "bench/image";
pub(crate) const TAG: &str = "v1";

pub(crate) fn blob_url(base: &str, repo: &str, digest: &str) -> String {
    format!("{base}/v2/{repo}/blobs/{digest}")
}

pub(crate) fn manifest_url(base: &str, repo: &str, reference: &str) -> String {
    format!("{base}/v2/{repo}/manifests/{reference}")
}

/// Everything a scenario needs.
pub(crate) struct Bench {
    pub cfg: Config,
    pub up: Upstream,
    pub content: Content,
}

async fn seed(cfg: &Config, up: &Upstream) -> Result<Content> {
    let mut warm = Vec::new();
    for (i, (size, reps)) in cfg.warm_sizes.iter().enumerate() {
        // The largest warm size is the big blob itself when they match.
        warm.push((up.seed_blob(BLOB_REPO, *size, 100 + i as u64).await?, *reps));
    }
    let big = match warm.iter().find(|(b, _)| b.size == cfg.big_size) {
        Some((b, _)) => b.clone(),
        None => up.seed_blob(BLOB_REPO, cfg.big_size, 200).await?,
    };
    let herd = up.seed_blob(BLOB_REPO, cfg.herd_size, 300).await?;
    let load = up.seed_blob(BLOB_REPO, cfg.load_size, 400).await?;
    let small_blob = up.seed_blob(BLOB_REPO, 4 * KIB, 500).await?;
    let small = push_image(&up.url(), SMALL_REPO, TAG, &ImageSpec::oci(&[4096]).seed(7)).await?;
    let image = if cfg.wants(6) {
        Some(
            push_image(
                &up.url(),
                IMAGE_REPO,
                TAG,
                &ImageSpec::oci(&cfg.image_layers).seed(8),
            )
            .await?,
        )
    } else {
        None
    };
    Ok(Content {
        warm,
        big,
        herd,
        load,
        small_blob,
        small,
        image,
    })
}

/// The finished report.
#[derive(Debug)]
pub struct Report {
    pub sections: Vec<Section>,
    pub markdown: String,
}

/// Runs the configured scenarios; a failing scenario is reported, not fatal.
pub async fn run(cfg: Config) -> Result<Report> {
    let started = std::time::Instant::now();
    let load_before = machine::loadavg();
    if pin::wanted() {
        pin::pin(std::process::id(), &pin::client_cpus()?)?;
    }
    let up = Upstream::start().await?;
    eprintln!("[bench] seeding upstream {}", up.url());
    let content = seed(&cfg, &up).await?;
    let bench = Bench { cfg, up, content };
    let mut sections = Vec::new();

    if [1, 2, 7].iter().any(|n| bench.cfg.wants(*n)) {
        sections.extend(warm::run(&bench).await);
    }
    if bench.cfg.wants(3) {
        sections.push(or_failed(
            tags::tag_lookups(&bench).await,
            "3. Tag HEAD, upstream +latency",
        ));
    }
    if bench.cfg.wants(4) {
        sections.push(or_failed(cold::cold_big(&bench).await, "4. Cold big blob"));
    }
    if bench.cfg.wants(5) {
        sections.push(or_failed(cold::herd(&bench).await, "5. Thundering herd"));
    }
    if bench.cfg.wants(6) {
        sections.push(or_failed(
            cold::image_pull(&bench).await,
            "6. Full image pull",
        ));
    }
    if bench.cfg.wants(8) {
        sections.push(or_failed(cold::range(&bench).await, "8. Range"));
    }
    if bench.cfg.wants(9) {
        sections.push(or_failed(
            faults::faults(&bench).await,
            "9. Upstream faults",
        ));
    }
    if bench.cfg.wants(10) {
        sections.push(or_failed(
            cluster::cluster(&bench).await,
            "10. Cache cluster",
        ));
    }

    let markdown = render(&bench.cfg, &sections, &load_before, started.elapsed());
    Ok(Report { sections, markdown })
}

pub(crate) fn or_failed(r: Result<Section>, title: &str) -> Section {
    r.unwrap_or_else(|e| {
        eprintln!("[bench] {title} failed: {e:#}");
        let mut s = Section::new(title, "");
        s.note(format!("**scenario failed**: {e:#}"));
        s
    })
}

fn git_rev() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into())
}

fn render(cfg: &Config, sections: &[Section], load_before: &str, took: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# regmirror vs CNCF distribution (proxy mode): benchmark results\n\n\
         Generated by `make bench` (`regmirror-bench`, profile **{}**) at commit `{}`; took {:.0} s.\n\
         Both systems run with fresh storage in front of one seeded upstream (Debian's \
         `docker-registry`) on loopback; runs alternate A B A B. Every figure is the median \
         over runs (`runs a/b` = runs of regmirror / distribution); ratios are ours / \
         distribution. Load is generated in-process (reqwest, HTTP/1.1); CPU is utime+stime \
         of the server process from `/proc/<pid>/stat`, RSS `VmRSS` from `/proc/<pid>/status`, \
         upstream requests and bytes from the upstream's access log.\n",
        cfg.profile,
        git_rev(),
        took.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "## Machine\n\n{}- load average (1/5/15 min) at start: {load_before}; at end: {}\n\
         - open-files limit (soft): {}\n\n{}",
        machine::describe(),
        machine::loadavg(),
        procfs::nofile_limit(),
        if pin::wanted() {
            "CPUs pinned (`BENCH_PIN=1`): the systems under test and the reference server on \
             CPU 0, the load generator and the upstream on the others. This machine is shared \
             with other builds: treat small differences as noise.\n"
        } else {
            "The load generator shares the CPUs with the server under test, and this machine \
             is shared with other builds: treat small differences as noise.\n"
        },
    );
    let _ = writeln!(s, "## Targets (issue 7)\n");
    let _ = writeln!(
        s,
        "| scenario | metric | target | holds |\n| --- | --- | --- | --- |"
    );
    for sec in sections {
        for (metric, target, holds) in sec.verdicts() {
            let h = match holds {
                Some(true) => "yes",
                Some(false) => "**NO**",
                None => "no data",
            };
            let _ = writeln!(s, "| {} | {metric} | {target} | {h} |", sec.title);
        }
    }
    s.push('\n');
    for sec in sections {
        s.push_str(&sec.markdown());
    }
    s
}
