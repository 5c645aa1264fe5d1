//! Scenario 9: cached content while the upstream refuses, is silent, slow or resets.

use std::time::Duration;

use anyhow::{Result, ensure};
use tokio::time::Instant;

use crate::http::{self, ACCEPT_ALL_MANIFESTS, ms};
use crate::proxy::{Mode, TcpProxy};
use crate::report::{Check, Section};
use crate::systems::{Kind, System};
use crate::{BLOB_REPO, Bench, SMALL_REPO, TAG, blob_url, manifest_url};

fn mode_name(m: Mode) -> String {
    match m {
        Mode::Pass { .. } => "none".into(),
        Mode::Refuse => "refused".into(),
        Mode::Silent => "silent".into(),
        Mode::Slow { bytes_per_sec } => format!("slow ({bytes_per_sec} B/s)"),
        Mode::Reset => "reset".into(),
    }
}

/// GET with the manifest Accept header; `(milliseconds, ok)`; a timeout counts as the cap.
async fn fetch(client: &reqwest::Client, url: &str, cap: Duration) -> (f64, bool) {
    let start = Instant::now();
    let req = client.get(url).header("accept", ACCEPT_ALL_MANIFESTS);
    match tokio::time::timeout(cap, http::timed(req, start, None)).await {
        Ok(Ok(t)) => (ms(t.total), t.status == 200 && t.bytes > 0),
        Ok(Err(_)) => (ms(start.elapsed()), false),
        Err(_) => (ms(cap), false),
    }
}

pub(crate) async fn faults(b: &Bench) -> Result<Section> {
    let cap = b.cfg.fault_cap;
    let c = &b.content;
    let mut sec = Section::new(
        "9. Upstream faults: time to serve cached content",
        format!(
            "Each run: a fresh system behind a fresh TCP proxy to the upstream; GET the tag \
             `{SMALL_REPO}:{TAG}`, the manifest by digest and a 4 KiB blob (cached), then the \
             proxy starts the fault (open connections are cut) and the same three GETs are \
             timed. refused = listener closed; silent = accepts, never answers; slow = every \
             upstream byte (headers too) at 1000 B/s; reset = reads the request, sends RST. \
             Requests are abandoned after {} s (counted as {} s and as a failure).",
            cap.as_secs(),
            cap.as_secs()
        ),
    );
    let client = http::client(4, cap);
    for &mode in &b.cfg.fault_modes {
        let name = mode_name(mode);
        for run in 0..b.cfg.runs {
            for kind in Kind::BOTH {
                eprintln!("[bench] 9: {name} run {run} {}", kind.name());
                let proxy = TcpProxy::start(
                    b.up.addr(),
                    Mode::Pass {
                        delay: Duration::ZERO,
                    },
                )
                .await?;
                let sys = System::start(kind, &proxy.url(), &b.cfg.cache_bin).await?;
                let base = sys.url();
                let urls = [
                    manifest_url(&base, SMALL_REPO, TAG),
                    manifest_url(&base, SMALL_REPO, &c.small.digest),
                    blob_url(&base, BLOB_REPO, &c.small_blob.digest),
                ];
                for u in &urls {
                    let (_, ok) = fetch(&client, u, cap).await;
                    ensure!(ok, "{}: warming {u} failed", kind.name());
                }
                sys.wait_blob(
                    &c.small_blob.digest,
                    c.small_blob.size,
                    Duration::from_secs(30),
                )
                .await?;
                b.up.settle(Duration::from_millis(300), Duration::from_secs(30))
                    .await?;
                proxy.set_mode(mode);
                tokio::time::sleep(Duration::from_millis(50)).await;
                let mut failures = 0;
                for (what, u) in ["tag", "manifest by digest", "blob by digest"]
                    .iter()
                    .zip(&urls)
                {
                    let (t, ok) = fetch(&client, u, cap).await;
                    if !ok {
                        failures += 1;
                    }
                    sec.add(&format!("{name}: {what} ms"), kind, t);
                }
                sec.add(
                    &format!("{name}: failed requests (of 3)"),
                    kind,
                    f64::from(failures),
                );
                drop(sys);
                drop(proxy);
            }
        }
        for what in ["tag", "manifest by digest", "blob by digest"] {
            sec.target(
                &format!("{name}: {what} ms"),
                "<= 1000 ms in every run",
                Check::OursMaxAtMost(1000.0),
            );
        }
        sec.target(
            &format!("{name}: failed requests (of 3)"),
            "0 in every run",
            Check::OursAlways(0.0),
        );
    }
    Ok(sec)
}
