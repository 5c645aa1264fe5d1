//! `regmirror-bench`: runs issue 7's scenarios and writes `bench/results/latest.md`.
//!
//! Environment: `BENCH_QUICK=1` (short smoke run), `BENCH_RUNS`, `BENCH_BIG_RUNS`,
//! `BENCH_ONLY=1,4,5` (scenario numbers), `BENCH_OUT` (report path), `BENCH_PIN=1`
//! (systems under test on CPU 0, everything else on the other CPUs),
//! `REGMIRROR_BIN_DIR` (directory of the `regmirror-cache` binary; default
//! `target/release`).

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use regmirror_bench::{Config, ceiling, run};

fn env_num(name: &str) -> Result<Option<usize>> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.parse().with_context(|| format!("{name}={v}")))
        .transpose()
}

fn main() -> Result<()> {
    if let Some(file) = std::env::var_os(ceiling::SERVE_ENV) {
        return ceiling::serve_forever(
            std::path::Path::new(&file),
            std::env::var_os(ceiling::COPY_ENV).is_some(),
        );
    }
    tokio::runtime::Runtime::new()?.block_on(bench())
}

async fn bench() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let bin_dir = std::env::var_os("REGMIRROR_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release"));
    let cache_bin = bin_dir.join("regmirror-cache");
    ensure!(
        cache_bin.is_file(),
        "{} not found: cargo build --release -p regmirror-cache",
        cache_bin.display()
    );
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let bench_bin = std::env::current_exe().context("locate regmirror-bench")?;
    let mut cfg = if quick {
        Config::quick(cache_bin, bench_bin)
    } else {
        Config::full(cache_bin, bench_bin)
    };
    if let Some(n) = env_num("BENCH_RUNS")? {
        cfg.runs = n;
    }
    if let Some(n) = env_num("BENCH_BIG_RUNS")? {
        cfg.big_runs = n;
    }
    if let Ok(only) = std::env::var("BENCH_ONLY")
        && !only.is_empty()
    {
        cfg.scenarios = only
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .with_context(|| format!("BENCH_ONLY={only}"))
            })
            .collect::<Result<_>>()?;
    }
    let out = std::env::var_os("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("bench/results/latest.md"));
    eprintln!("[bench] profile {}, writing {}", cfg.profile, out.display());
    let report = run(cfg).await?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &report.markdown)?;
    println!("{}", report.markdown);
    eprintln!("[bench] wrote {}", out.display());
    Ok(())
}
