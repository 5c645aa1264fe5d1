//! Warm scenarios on one long-lived pair of systems: 1 (blob GET throughput),
//! 2 (small objects), 7 (256 streams plus idle keep-alive connections).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::ceiling::Ceiling;
use crate::clients::ExternalClient;
use crate::http::{self, ACCEPT_ALL_MANIFESTS, ms, secs};
use crate::report::{Check, Section};
use crate::stats::{median, percentile};
use crate::systems::{Kind, System};
use crate::upstream::SeededBlob;
use crate::{
    BLOB_REPO, Bench, GIB, SMALL_REPO, blob_url, manifest_url, or_failed, procfs, size_label,
};

const WAIT_STORED: Duration = Duration::from_secs(300);

/// Starts both systems and pulls everything the warm scenarios read through them.
async fn warm_pair(b: &Bench) -> Result<Vec<System>> {
    let c = &b.content;
    let client = http::client(4, Duration::from_secs(600));
    let mut systems = Vec::new();
    for kind in Kind::BOTH {
        let sys = System::start(kind, &b.up.url(), &b.cfg.cache_bin).await?;
        let base = sys.url();
        let mut blobs: Vec<_> = c.warm.iter().map(|(bl, _)| bl).collect();
        blobs.extend([&c.load, &c.small_blob]);
        for bl in &blobs {
            http::get_ok(&client, &blob_url(&base, &bl.repo, &bl.digest), bl.size).await?;
            sys.wait_blob(&bl.digest, bl.size, WAIT_STORED).await?;
        }
        let m = client
            .get(manifest_url(&base, SMALL_REPO, &c.small.digest))
            .header("accept", ACCEPT_ALL_MANIFESTS)
            .send()
            .await?;
        ensure!(m.status().is_success(), "warm manifest: {}", m.status());
        m.bytes().await?;
        systems.push(sys);
    }
    b.up.settle(Duration::from_millis(500), Duration::from_secs(300))
        .await?;
    Ok(systems)
}

pub(crate) async fn run(b: &Bench) -> Vec<Section> {
    eprintln!("[bench] warm scenarios: starting and warming both systems");
    let systems = match warm_pair(b).await {
        Ok(s) => s,
        Err(e) => {
            return vec![or_failed(Err(e), "Warm scenarios (1, 2, 7)")];
        }
    };
    let mark = b.up.mark();
    let mut out = Vec::new();
    if b.cfg.wants(1) {
        out.push(or_failed(warm_blobs(b, &systems).await, "1. Warm blob GET"));
    }
    if b.cfg.wants(2) {
        out.push(or_failed(
            small_objects(b, &systems).await,
            "2. Small objects",
        ));
    }
    if b.cfg.wants(7) {
        out.push(or_failed(
            streams_and_idle(b, &systems).await,
            "7. Concurrent streams",
        ));
    }
    let leaked = b.up.since(mark);
    if let Some(first) = out.first_mut() {
        first.note(format!(
            "Upstream requests during all warm scenarios (1, 2, 7): {} (expected 0).",
            leaked.requests()
        ));
    }
    out
}

/// Scenario 1.
async fn warm_blobs(b: &Bench, systems: &[System]) -> Result<Section> {
    let mut sec = Section::new(
        "1. Warm blob GET, one stream",
        "Sequential GETs of a cached blob on one keep-alive connection (1 MiB: 200 GETs a run, \
         100 MiB: 10, 1 GiB: 3). Reference: the same file from a minimal blocking \
         `sendfile(2)` HTTP server in a process of its own (for the in-process client, the \
         ceiling of this machine; its CPU, measured like the systems', is the floor of what \
         sending these bytes costs here).",
    );
    let biggest = b.content.warm.iter().map(|(bl, _)| bl.size).max();
    for (blob, reps) in &b.content.warm {
        let label = size_label(blob.size);
        let runs = if blob.size >= GIB {
            b.cfg.big_runs
        } else {
            b.cfg.runs
        };
        eprintln!("[bench] 1: warm {label} x{reps}, {runs} runs");
        let ceiling = Ceiling::start(&b.cfg.bench_bin, &blob.path)?;
        let gbps = format!("{label}: throughput GB/s");
        let ttfb = format!("{label}: TTFB ms");
        let cpu = format!("{label}: server CPU-s per GiB");
        let (gbps_ref, cpu_ref) = (
            format!("{label}: throughput / reference"),
            format!("{label}: server CPU / reference"),
        );
        for _ in 0..runs {
            // This run's (throughput, CPU) of ours, to set against the reference's.
            let mut ours = (f64::NAN, f64::NAN);
            for sys in systems {
                let client = http::client(1, Duration::from_secs(600));
                let url = blob_url(&sys.url(), &blob.repo, &blob.digest);
                // One untimed GET opens the connection.
                http::get_ok(&client, &url, blob.size).await?;
                let pid = sys.pid()?;
                let cpu0 = procfs::cpu_seconds(pid)?;
                let t0 = Instant::now();
                let mut ttfbs = Vec::new();
                for _ in 0..*reps {
                    ttfbs.push(ms(http::get_ok(&client, &url, blob.size).await?.ttfb));
                }
                let took = secs(t0.elapsed());
                let cpu1 = procfs::cpu_seconds(pid)?;
                let bytes = (blob.size * *reps as u64) as f64;
                let figures = (bytes / took / 1e9, (cpu1 - cpu0) / (bytes / GIB as f64));
                if sys.kind == Kind::Ours {
                    ours = figures;
                }
                sec.add(&gbps, sys.kind, figures.0);
                sec.add(&ttfb, sys.kind, median(&ttfbs));
                sec.add(&cpu, sys.kind, figures.1);
            }
            let client = http::client(1, Duration::from_secs(600));
            http::get_ok(&client, &ceiling.url(), blob.size).await?;
            let cpu0 = ceiling.cpu_seconds()?;
            let t0 = Instant::now();
            let mut ttfbs = Vec::new();
            for _ in 0..*reps {
                ttfbs.push(ms(http::get_ok(&client, &ceiling.url(), blob.size)
                    .await?
                    .ttfb));
            }
            let bytes = (blob.size * *reps as u64) as f64;
            let reference = (
                bytes / secs(t0.elapsed()) / 1e9,
                (ceiling.cpu_seconds()? - cpu0) / (bytes / GIB as f64),
            );
            sec.add_reference(&gbps, reference.0);
            sec.add_reference(&ttfb, median(&ttfbs));
            sec.add_reference(&cpu, reference.1);
            sec.add(&gbps_ref, Kind::Ours, ours.0 / reference.0);
            sec.add(&cpu_ref, Kind::Ours, ours.1 / reference.1);
        }
        sec.target(&gbps, ">= distribution", Check::RatioAtLeast(1.0));
        sec.target(&cpu, "<= 0.5x distribution", Check::RatioAtMost(0.5));
        reference_targets(&mut sec, &gbps_ref, &cpu_ref);
        if Some(blob.size) == biggest {
            external_clients(b, systems, blob, &ceiling, &mut sec).await?;
        }
    }
    sec.note(format!(
        "CPU-s per GiB comes from clock ticks of {} ms: small transfers round coarsely.",
        1000 / procfs::clk_tck()
    ));
    Ok(sec)
}

/// Targets against the bare `sendfile` reference of the same run (issue 20):
/// throughput at least 0.95x its, server CPU per GiB at most 1.15x its.
fn reference_targets(sec: &mut Section, gbps_ref: &str, cpu_ref: &str) {
    sec.target(gbps_ref, ">= 0.95", Check::OursMedianAtLeast(0.95));
    sec.target(cpu_ref, "<= 1.15", Check::OursMedianAtMost(1.15));
}

/// Scenario 1, the biggest blob again, one GET per client process: curl and crane
/// (`ceiling` serves the same file; a copying reference started here too).
async fn external_clients(
    b: &Bench,
    systems: &[System],
    blob: &SeededBlob,
    ceiling: &Ceiling,
    sec: &mut Section,
) -> Result<()> {
    let label = size_label(blob.size);
    let copying = Ceiling::start_copying(&b.cfg.bench_bin, &blob.path)?;
    for client in ExternalClient::ALL {
        if let Err(e) = client.program() {
            sec.note(format!("{label} via {}: not run: {e:#}", client.name()));
            continue;
        }
        eprintln!(
            "[bench] 1: warm {label} via {}, {} runs",
            client.name(),
            b.cfg.big_runs
        );
        let name = |what: &str| format!("{label} via {}: {what}", client.name());
        let metrics = [
            name("throughput GB/s"),
            name("server CPU-s per GiB"),
            name("client CPU-s per GiB"),
        ];
        let (gbps_ref, cpu_ref) = (
            name("throughput / reference"),
            name("server CPU / reference"),
        );
        // The same client from the copying reference: what sendfile costs it.
        let (copy_gbps, copy_client) = (
            name("throughput GB/s from a copying server"),
            name("client CPU-s per GiB from a copying server"),
        );
        let runs = async {
            for _ in 0..b.cfg.big_runs {
                let mut ours = [f64::NAN; 3];
                for sys in systems {
                    let figures = measured_fetch(client, sys.host(), blob, sys.pid()?).await?;
                    if sys.kind == Kind::Ours {
                        ours = figures;
                    }
                    for (metric, v) in metrics.iter().zip(figures) {
                        sec.add(metric, sys.kind, v);
                    }
                }
                let figures = measured_fetch(client, ceiling.host(), blob, ceiling.pid()).await?;
                for (metric, v) in metrics.iter().zip(figures) {
                    sec.add_reference(metric, v);
                }
                sec.add(&gbps_ref, Kind::Ours, ours[0] / figures[0]);
                sec.add(&cpu_ref, Kind::Ours, ours[1] / figures[1]);
                let copied = measured_fetch(client, copying.host(), blob, copying.pid()).await?;
                sec.add_reference(&copy_gbps, copied[0]);
                sec.add_reference(&copy_client, copied[2]);
            }
            anyhow::Ok(())
        };
        if let Err(e) = runs.await {
            // Keep the rows measured so far (and the section's other rows).
            sec.note(format!("{label} via {}: stopped: {e:#}", client.name()));
        }
        sec.target(&metrics[0], ">= distribution", Check::RatioAtLeast(1.0));
        sec.target(&metrics[1], "<= 0.5x distribution", Check::RatioAtMost(0.5));
        reference_targets(sec, &gbps_ref, &cpu_ref);
    }
    sec.note(format!(
        "\"{label} via curl / crane\": one GET per run from a client process of its own \
         (`curl -o /dev/null`; `crane blob`, which verifies the digest as it reads); \
         throughput is over the client's whole life (start-up, registry ping and connect \
         included: a few ms), client CPU is its utime+stime. \"from a copying server\": \
         the same GET from a reference that sends the file through a 32 KiB buffer with \
         read/write (as Go's `io.Copy`, distribution's) instead of `sendfile`."
    ));
    Ok(())
}

/// One fetch of `blob` from `host` by `client`: GB/s, CPU-s per GiB of the server
/// process `server_pid` meanwhile, and the client's own CPU-s per GiB.
async fn measured_fetch(
    client: ExternalClient,
    host: String,
    blob: &SeededBlob,
    server_pid: u32,
) -> Result<[f64; 3]> {
    let (repo, digest, size) = (blob.repo.clone(), blob.digest.clone(), blob.size);
    let cpu0 = procfs::cpu_seconds(server_pid)?;
    let run =
        tokio::task::spawn_blocking(move || client.fetch(&host, &repo, &digest, size)).await??;
    let server = procfs::cpu_seconds(server_pid)? - cpu0;
    let gib = size as f64 / GIB as f64;
    Ok([
        size as f64 / run.secs / 1e9,
        server / gib,
        run.cpu_secs / gib,
    ])
}

/// Scenario 2.
async fn small_objects(b: &Bench, systems: &[System]) -> Result<Section> {
    let c = &b.content;
    let mut sec = Section::new(
        "2. Small objects",
        format!(
            "Closed-loop load for {} s a run: each connection sends its next request when the \
             previous one is answered. Objects: manifest GET by digest ({} bytes), 4 KiB blob \
             GET, 4 KiB blob HEAD.",
            b.cfg.small_secs,
            c.small.manifest.len()
        ),
    );
    let kinds: [(&str, bool); 3] = [
        ("manifest GET", true),
        ("4 KiB blob GET", false),
        ("blob HEAD", false),
    ];
    for &conns in &b.cfg.small_conns {
        for (ki, (what, _)) in kinds.iter().enumerate() {
            eprintln!("[bench] 2: {what} at {conns} connections");
            let rps = format!("{what}, {conns} conn: req/s");
            let p50 = format!("{what}, {conns} conn: p50 ms");
            let p99 = format!("{what}, {conns} conn: p99 ms");
            for _ in 0..b.cfg.runs {
                for sys in systems {
                    let base = sys.url();
                    let url = match ki {
                        0 => manifest_url(&base, SMALL_REPO, &c.small.digest),
                        _ => blob_url(&base, BLOB_REPO, &c.small_blob.digest),
                    };
                    let (n, lats, errors) =
                        closed_loop(&url, ki, conns, Duration::from_secs_f64(b.cfg.small_secs))
                            .await?;
                    ensure!(
                        errors == 0,
                        "{}: {errors} failed requests on {url}",
                        sys.kind.name()
                    );
                    sec.add(&rps, sys.kind, n as f64 / b.cfg.small_secs);
                    sec.add(&p50, sys.kind, percentile(&lats, 50.0));
                    sec.add(&p99, sys.kind, percentile(&lats, 99.0));
                }
            }
        }
    }
    Ok(sec)
}

/// `conns` workers hammer `url` for `dur`; kind 0 = manifest GET, 1 = blob GET, 2 = HEAD.
async fn closed_loop(
    url: &str,
    kind: usize,
    conns: usize,
    dur: Duration,
) -> Result<(usize, Vec<f64>, usize)> {
    let client = http::client(conns, Duration::from_secs(30));
    // Open the connections first.
    let mut warm = Vec::new();
    for _ in 0..conns {
        let (client, url) = (client.clone(), url.to_owned());
        warm.push(tokio::spawn(async move { http::get(&client, &url).await }));
    }
    for w in warm {
        w.await??;
    }
    let deadline = Instant::now() + dur;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (client, url) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut lats = Vec::new();
            let mut errors = 0usize;
            while Instant::now() < deadline {
                let req = match kind {
                    0 => client.get(&url).header("accept", ACCEPT_ALL_MANIFESTS),
                    1 => client.get(&url),
                    _ => client.head(&url),
                };
                match http::timed(req, Instant::now(), None).await {
                    Ok(t) if t.status == 200 => lats.push(ms(t.total)),
                    _ => errors += 1,
                }
            }
            (lats, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    Ok((all.len(), all, errors))
}

/// Opens one keep-alive connection and completes one `GET /v2/` on it.
async fn idle_conn(addr: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        ensure!(n > 0, "closed before the response");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= pos + 4 + len {
                return Ok(s);
            }
        }
    }
}

/// How many of `conns` the server has not closed.
fn still_open(conns: &[TcpStream]) -> usize {
    let mut probe = [0u8; 1];
    conns
        .iter()
        .filter(|c| matches!(c.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
        .count()
}

/// Scenario 7.
async fn streams_and_idle(b: &Bench, systems: &[System]) -> Result<Section> {
    let limit = procfs::nofile_limit() as usize;
    // This process holds the idle connections plus the streams; leave headroom.
    let idle = b
        .cfg
        .idle_conns
        .min(limit.saturating_sub(b.cfg.load_streams + 1000));
    let blob = &b.content.load;
    let streams = b.cfg.load_streams;
    let mut sec = Section::new(
        "7. Concurrent warm downloads plus idle keep-alive connections",
        format!(
            "{idle} idle keep-alive connections (each completed one `GET /v2/`) are opened, then \
             {streams} clients download a cached {} blob at once. RSS/fds sampled every 10 ms; \
             RSS per stream = (peak RSS - RSS with the idle connections) / {streams}. \
             Finally, how many idle connections the server still holds 11 s after they were opened.",
            size_label(blob.size)
        ),
    );
    if idle < b.cfg.idle_conns {
        sec.note(format!(
            "Only {idle} idle connections instead of {}: open-files limit {limit}.",
            b.cfg.idle_conns
        ));
    }
    for run in 0..b.cfg.runs {
        for sys in systems {
            eprintln!("[bench] 7: run {run} {}", sys.kind.name());
            let pid = sys.pid()?;
            let rss_start = procfs::rss_bytes(pid)? as f64;
            // Open the idle connections, 200 at a time.
            let host = sys.host();
            let opening = Instant::now();
            let mut conns = Vec::with_capacity(idle);
            let mut open_failures = 0usize;
            let mut pending = Vec::new();
            for i in 0..idle {
                let h = host.clone();
                pending.push(tokio::spawn(async move { idle_conn(&h).await }));
                if pending.len() == 200 || i + 1 == idle {
                    for p in pending.drain(..) {
                        match p.await? {
                            Ok(s) => conns.push(s),
                            Err(_) => open_failures += 1,
                        }
                    }
                }
            }
            let open_secs = secs(opening.elapsed());
            tokio::time::sleep(Duration::from_millis(200)).await;
            let alive_before = still_open(&conns);
            let rss_idle = procfs::rss_bytes(pid)? as f64;
            let fds_idle = procfs::fd_count(pid)? as f64;

            let client = http::client(streams, Duration::from_secs(600));
            let url = blob_url(&sys.url(), &blob.repo, &blob.digest);
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let sampler = {
                let done = done.clone();
                tokio::spawn(async move {
                    let (mut rss, mut fds) = (0u64, 0usize);
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        rss = rss.max(procfs::rss_bytes(pid).unwrap_or(0));
                        fds = fds.max(procfs::fd_count(pid).unwrap_or(0));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    (rss, fds)
                })
            };
            let start = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..streams {
                let (client, url, size) = (client.clone(), url.clone(), blob.size);
                tasks.push(tokio::spawn(async move {
                    http::get_ok_from(&client, &url, start, size).await
                }));
            }
            let mut finish = Vec::new();
            let mut ttfb = Vec::new();
            for t in tasks {
                let t = t.await?.context("download")?;
                finish.push(ms(t.total));
                ttfb.push(ms(t.ttfb));
            }
            let wall = secs(start.elapsed());
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let (rss_peak, fds_peak) = sampler.await?;
            let alive = still_open(&conns);
            // Does the server keep idle keep-alive connections beyond 10 s?
            tokio::time::sleep(Duration::from_secs(11).saturating_sub(opening.elapsed())).await;
            let alive_11s = still_open(&conns);
            drop(conns);
            let k = sys.kind;
            sec.add(
                "RSS per stream KiB",
                k,
                (rss_peak as f64 - rss_idle).max(0.0) / streams as f64 / 1024.0,
            );
            sec.add(
                "RSS per idle connection KiB",
                k,
                (rss_idle - rss_start).max(0.0) / idle.max(1) as f64 / 1024.0,
            );
            sec.add("RSS peak MiB", k, rss_peak as f64 / 1048576.0);
            sec.add("open fds with idle connections", k, fds_idle);
            sec.add("open fds peak", k, fds_peak as f64);
            sec.add("download finish p50 ms", k, percentile(&finish, 50.0));
            sec.add("download finish p99 ms", k, percentile(&finish, 99.0));
            sec.add("download TTFB p99 ms", k, percentile(&ttfb, 99.0));
            sec.add(
                "aggregate GB/s",
                k,
                (blob.size * streams as u64) as f64 / wall / 1e9,
            );
            sec.add("seconds to open the idle connections", k, open_secs);
            sec.add(
                "idle connections open when the downloads start",
                k,
                alive_before as f64,
            );
            sec.add(
                "idle connections still open after the downloads",
                k,
                alive as f64,
            );
            sec.add(
                "idle connections still open 11 s after opening",
                k,
                alive_11s as f64,
            );
            sec.add(
                "idle connections that failed to open",
                k,
                open_failures as f64,
            );
            // Let closed sockets drain before the next run.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    sec.target(
        "RSS per stream KiB",
        "< 1 MiB (1024 KiB)",
        Check::OursMaxAtMost(1024.0),
    );
    sec.target(
        "download finish p99 ms",
        "lower than distribution",
        Check::Lower,
    );
    Ok(sec)
}
