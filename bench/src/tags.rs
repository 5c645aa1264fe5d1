//! Scenario 3: tag HEAD through an upstream with added latency.

use std::time::Duration;

use anyhow::{Result, ensure};
use tokio::time::Instant;

use crate::http::{self, ACCEPT_ALL_MANIFESTS, ms};
use crate::proxy::{Mode, TcpProxy};
use crate::report::{Check, Section};
use crate::stats::percentile;
use crate::systems::{Kind, System};
use crate::{Bench, SMALL_REPO, TAG, manifest_url};

async fn head_tag(client: &reqwest::Client, url: &str) -> Result<f64> {
    let t = http::timed(
        client.head(url).header("accept", ACCEPT_ALL_MANIFESTS),
        Instant::now(),
        None,
    )
    .await?;
    ensure!(t.status == 200, "HEAD {url}: {}", t.status);
    Ok(ms(t.total))
}

pub(crate) async fn tag_lookups(b: &Bench) -> Result<Section> {
    let lat = b.cfg.tag_latency;
    let (conc, each) = b.cfg.tag_concurrent;
    let mut sec = Section::new(
        "3. Tag HEAD, upstream with added latency",
        format!(
            "`HEAD /v2/{SMALL_REPO}/manifests/{TAG}` on a cached tag. The upstream sits behind a \
             TCP proxy in the bench that delivers every upstream byte {} ms late and delays \
             each new upstream connection by {} ms. 1 client: {} sequential lookups; {conc} \
             clients: {each} lookups each, all at once. Upstream requests per lookup counts \
             every upstream access-log line (pings, HEADs, GETs).",
            lat.as_millis(),
            lat.as_millis(),
            b.cfg.tag_sequential
        ),
    );
    let proxy = TcpProxy::start(b.up.addr(), Mode::Pass { delay: lat }).await?;
    let client = http::client(conc, Duration::from_secs(60));
    let mut systems = Vec::new();
    for kind in Kind::BOTH {
        let sys = System::start(kind, &proxy.url(), &b.cfg.cache_bin).await?;
        // First lookup caches the tag.
        let url = manifest_url(&sys.url(), SMALL_REPO, TAG);
        let r = client
            .get(&url)
            .header("accept", ACCEPT_ALL_MANIFESTS)
            .send()
            .await?;
        ensure!(r.status().is_success(), "GET {url}: {}", r.status());
        r.bytes().await?;
        head_tag(&client, &url).await?;
        systems.push(sys);
    }
    for run in 0..b.cfg.runs {
        for sys in &systems {
            eprintln!("[bench] 3: run {run} {}", sys.kind.name());
            let url = manifest_url(&sys.url(), SMALL_REPO, TAG);
            // 1 client.
            b.up.settle(Duration::from_millis(200), Duration::from_secs(30))
                .await?;
            let mark = b.up.mark();
            let mut lats = Vec::new();
            for _ in 0..b.cfg.tag_sequential {
                lats.push(head_tag(&client, &url).await?);
            }
            b.up.settle(Duration::from_millis(300), Duration::from_secs(30))
                .await?;
            let n = b.up.since(mark).requests();
            sec.add("1 client: p50 ms", sys.kind, percentile(&lats, 50.0));
            sec.add("1 client: p99 ms", sys.kind, percentile(&lats, 99.0));
            sec.add(
                "1 client: upstream requests per lookup",
                sys.kind,
                n as f64 / b.cfg.tag_sequential as f64,
            );
            // `conc` clients at once.
            let mark = b.up.mark();
            let mut tasks = Vec::new();
            for _ in 0..conc {
                let (client, url) = (client.clone(), url.clone());
                tasks.push(tokio::spawn(async move {
                    let mut l = Vec::new();
                    for _ in 0..each {
                        l.push(head_tag(&client, &url).await?);
                    }
                    anyhow::Ok(l)
                }));
            }
            let mut lats = Vec::new();
            for t in tasks {
                lats.extend(t.await??);
            }
            b.up.settle(Duration::from_millis(300), Duration::from_secs(30))
                .await?;
            let n = b.up.since(mark).requests();
            let name = |m: &str| format!("{conc} clients: {m}");
            sec.add(&name("p50 ms"), sys.kind, percentile(&lats, 50.0));
            sec.add(&name("p99 ms"), sys.kind, percentile(&lats, 99.0));
            sec.add(
                &name("upstream requests per lookup"),
                sys.kind,
                n as f64 / (conc * each) as f64,
            );
        }
    }
    for c in ["1 client".to_owned(), format!("{conc} clients")] {
        sec.target(
            &format!("{c}: upstream requests per lookup"),
            "<= 0.5x distribution",
            Check::RatioAtMost(0.5),
        );
        sec.target(
            &format!("{c}: p99 ms"),
            "lower than distribution",
            Check::Lower,
        );
    }
    Ok(sec)
}
