//! The cache against a programmable upstream: corrupt bytes, hangs, errors, rate
//! limits, resets, authentication, and fills that outlive their clients.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use base64::Engine;
use regmirror_e2e::seed::{self, ImageSpec, PushedImage};
use regmirror_e2e::util::{bounded, http_client, sha256_digest, wait_until};
use regmirror_e2e::{Auth, Behaviour, CacheOptions, CacheProcess, FakeUpstream, RequestLog};

/// Short timeouts so that fault tests finish in seconds.
const FAST_TIMEOUTS: &str = "[timeouts]\nconnect = \"2s\"\nresponse_header = \"2s\"\nbody_idle = \"2s\"\nstale_after = \"1s\"\n";

struct Setup {
    fake: FakeUpstream,
    cache: CacheProcess,
    _dir: tempfile::TempDir,
}

/// A fake upstream holding `image` as `library/app:v1`, and a cache in front of it
/// (as `host`) with short timeouts and the extra `config` lines.
async fn setup(host: &str, image: &PushedImage, config: &str) -> Result<Setup> {
    let fake = FakeUpstream::start().await?;
    fake.add_image("library/app", Some("v1"), image);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("config.toml");
    std::fs::write(&file, format!("{config}\n{FAST_TIMEOUTS}"))?;
    let cache = CacheProcess::start_with(
        CacheOptions::new()
            .config(&file)
            .upstream(host, &fake.url()),
    )
    .await?;
    Ok(Setup {
        fake,
        cache,
        _dir: dir,
    })
}

fn image(layers: &[usize]) -> Result<PushedImage> {
    seed::build_image(&ImageSpec::oci(layers).gzip_level(0))
}

/// GET through the cache: status and the body, or the transfer error.
async fn get(url: &str, accept: Option<&str>) -> Result<(u16, Result<bytes::Bytes>)> {
    let mut req = http_client().get(url);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    Ok((status, resp.bytes().await.map_err(Into::into)))
}

async fn get_ok(url: &str) -> Result<bytes::Bytes> {
    let (status, body) = get(url, Some(seed::ACCEPT_ALL_MANIFESTS)).await?;
    ensure!(status == 200, "GET {url}: {status}");
    body
}

#[tokio::test]
async fn corrupt_blob_is_never_stored_nor_completed_then_recovers() {
    bounded(60, async {
        let img = image(&[3_000_000])?;
        let s = setup("docker.io", &img, "").await?;
        let layer = &img.layers[0];
        let url = format!("{}/v2/library/app/blobs/{}", s.cache.url(), layer.digest);

        s.fake.set_behaviour(Behaviour::CorruptBlobs);
        let (status, body) = get(&url, None).await?;
        match (status, body) {
            // Headers may already be out: then the transfer must fail, never complete.
            (200, Ok(b)) => {
                assert!(
                    b.len() < layer.bytes.len(),
                    "a corrupt blob was delivered whole"
                );
            }
            (200, Err(_)) => {}
            (s, _) => assert!(s >= 500, "corrupt upstream blob answered {s}"),
        }
        assert!(
            s.cache.store().files_named(&layer.digest).is_empty(),
            "corrupt blob left on disk"
        );

        s.fake.set_behaviour(Behaviour::Normal);
        let body = get_ok(&url).await?;
        assert_eq!(sha256_digest(&body), layer.digest);
        wait_until(Duration::from_secs(5), || async {
            s.cache.store().files_named(&layer.digest).len() == 1
        })
        .await
        .context("verified blob stored")?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn reset_mid_blob_fails_the_transfer_and_stores_nothing() {
    bounded(60, async {
        let img = image(&[2_000_000])?;
        let s = setup("docker.io", &img, "").await?;
        let layer = &img.layers[0];
        let url = format!("{}/v2/library/app/blobs/{}", s.cache.url(), layer.digest);
        s.fake.set_behaviour(Behaviour::ResetMidBlob);
        let (status, body) = get(&url, None).await?;
        assert!(
            status >= 500 || body.as_ref().map_or(true, |b| b.len() < layer.bytes.len()),
            "a truncated blob was delivered whole ({status})"
        );
        assert!(s.cache.store().files_named(&layer.digest).is_empty());
        s.fake.set_behaviour(Behaviour::Normal);
        assert_eq!(sha256_digest(&get_ok(&url).await?), layer.digest);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn corrupt_manifest_is_refused_and_never_stored() {
    bounded(60, async {
        let img = image(&[1_000])?;
        let s = setup("docker.io", &img, "").await?;
        let base = format!("{}/v2/library/app/manifests", s.cache.url());
        s.fake.set_behaviour(Behaviour::CorruptManifests);
        for reference in ["v1", img.digest.as_str()] {
            let (status, _) = get(
                &format!("{base}/{reference}"),
                Some(seed::ACCEPT_ALL_MANIFESTS),
            )
            .await?;
            assert_eq!(status, 502, "corrupt manifest by {reference}");
        }
        assert!(s.cache.store().files_named(&img.digest).is_empty());
        s.fake.set_behaviour(Behaviour::Normal);
        let body = get_ok(&format!("{base}/v1")).await?;
        assert_eq!(body, img.manifest);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn cached_content_is_served_when_the_upstream_fails() {
    bounded(90, async {
        let img = image(&[100_000])?;
        let s = setup("docker.io", &img, "").await?;
        let base = format!("{}/v2/library/app", s.cache.url());
        let tag_url = format!("{base}/manifests/v1");
        let digest_url = format!("{base}/manifests/{}", img.digest);
        let blob_url = format!("{base}/blobs/{}", img.layers[0].digest);
        // Warm the cache.
        assert_eq!(get_ok(&tag_url).await?, img.manifest);
        get_ok(&blob_url).await?;

        for fault in [
            Behaviour::Status(500),
            Behaviour::Status(503),
            Behaviour::TooManyRequests {
                retry_after_secs: 60,
                count: 100,
            },
            Behaviour::Hang,
            Behaviour::SlowBody { bytes_per_sec: 10 },
        ] {
            s.fake.set_behaviour(fault.clone());
            let started = Instant::now();
            assert_eq!(get_ok(&tag_url).await?, img.manifest, "{fault:?}");
            let took = started.elapsed();
            // stale_after is 1 s; allow for scheduling.
            assert!(
                took < Duration::from_secs(4),
                "{fault:?}: tag took {took:?}"
            );
            let started = Instant::now();
            assert_eq!(get_ok(&digest_url).await?, img.manifest);
            assert_eq!(
                sha256_digest(&get_ok(&blob_url).await?),
                img.layers[0].digest
            );
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "{fault:?}: digests must not wait for the upstream"
            );
        }
        // Something never cached fails in bounded time with a 5xx, never a 401.
        s.fake.set_behaviour(Behaviour::Hang);
        let started = Instant::now();
        let (status, _) = get(&format!("{base}/manifests/other"), None).await?;
        assert!(
            status >= 500,
            "uncached tag with hanging upstream: {status}"
        );
        assert!(started.elapsed() < Duration::from_secs(8));
        // The upstream recovers: the next lookup reaches it again.
        s.fake.set_behaviour(Behaviour::Normal);
        s.fake.clear_requests();
        assert_eq!(get_ok(&tag_url).await?, img.manifest);
        assert!(s.fake.count("HEAD", "/manifests/v1") + s.fake.count("GET", "/manifests/v1") >= 1);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_short_retry_after_is_waited_out_once() {
    bounded(60, async {
        let img = image(&[50_000])?;
        let s = setup("docker.io", &img, "").await?;
        let layer = &img.layers[0];
        s.fake.set_behaviour(Behaviour::TooManyRequests {
            retry_after_secs: 1,
            count: 1,
        });
        let url = format!("{}/v2/library/app/blobs/{}", s.cache.url(), layer.digest);
        assert_eq!(sha256_digest(&get_ok(&url).await?), layer.digest);
        assert_eq!(s.fake.count("GET", &layer.digest), 2, "one 429, one retry");
        // A long Retry-After is not waited out: the client gets 429 at once.
        let other = image(&[60_000])?;
        s.fake.add_image("library/other", Some("v1"), &other);
        s.fake.set_behaviour(Behaviour::TooManyRequests {
            retry_after_secs: 120,
            count: 10,
        });
        let started = Instant::now();
        let (status, _) = get(
            &format!(
                "{}/v2/library/other/blobs/{}",
                s.cache.url(),
                other.layers[0].digest
            ),
            None,
        )
        .await?;
        assert_eq!(status, 429);
        assert!(started.elapsed() < Duration::from_secs(3));
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn in_flight_blobs_serve_ranges_and_outlive_their_clients() {
    bounded(90, async {
        let img = image(&[4_000_000])?;
        let s = setup("docker.io", &img, "").await?;
        let layer = &img.layers[0];
        let url = format!("{}/v2/library/app/blobs/{}", s.cache.url(), layer.digest);
        // About 2 s for the whole blob.
        s.fake.set_behaviour(Behaviour::SlowBody {
            bytes_per_sec: 2_000_000,
        });

        // The first client reads the headers and a little, then goes away.
        let started = Instant::now();
        let resp = http_client().get(&url).send().await?;
        assert_eq!(resp.status(), 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "headers waited for the body"
        );
        assert_eq!(
            resp.content_length(),
            Some(layer.bytes.len() as u64),
            "length announced before the body"
        );
        drop(resp);

        // Others join the same fill: a HEAD, a range, a whole read.
        let head = http_client().head(&url).send().await?;
        assert_eq!(head.status(), 200);
        assert_eq!(
            head.headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok()),
            Some(layer.bytes.len().to_string().as_str())
        );
        let range = http_client()
            .get(&url)
            .header("range", "bytes=3000000-3000999")
            .send()
            .await?;
        assert_eq!(range.status(), 206);
        assert_eq!(
            range
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok()),
            Some(format!("bytes 3000000-3000999/{}", layer.bytes.len()).as_str())
        );
        assert_eq!(
            range.bytes().await?,
            layer.bytes.slice(3_000_000..3_001_000)
        );
        assert_eq!(sha256_digest(&get_ok(&url).await?), layer.digest);

        // The fill finished although its first client left; one upstream GET in all.
        wait_until(Duration::from_secs(10), || async {
            s.cache.store().files_named(&layer.digest).len() == 1
        })
        .await
        .context("fill completed")?;
        assert_eq!(s.fake.count("GET", &layer.digest), 1);
        assert_eq!(
            s.fake.count("HEAD", &layer.digest),
            0,
            "HEAD joined the fill"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn bearer_tokens_from_a_credentials_file_are_reused_and_never_leak() {
    bounded(60, async {
        const SECRET: &str = "s3cr3t-Pa55word";
        let img = image(&[20_000, 30_000])?;
        let fake = FakeUpstream::start().await?;
        fake.add_image("team/app", Some("v1"), &img);
        fake.set_auth(Auth::bearer_with_credentials("robot", SECRET));
        let dir = tempfile::tempdir()?;
        let creds = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("robot:{SECRET}"));
        std::fs::write(
            &creds,
            serde_json::json!({"auths": {"private.example": {"auth": auth}}}).to_string(),
        )?;
        let cache = CacheProcess::start_with(
            CacheOptions::new()
                .upstream("private.example", &fake.url())
                .arg("--credentials")
                .arg(creds.display().to_string()),
        )
        .await?;
        let base = format!("{}/v2/team/app", cache.url());
        let q = "?ns=private.example";
        let manifest = get_ok(&format!("{base}/manifests/v1{q}")).await?;
        assert_eq!(manifest, img.manifest);
        for b in img.blobs() {
            let body = get_ok(&format!("{base}/blobs/{}{q}", b.digest)).await?;
            assert_eq!(sha256_digest(&body), b.digest);
        }
        assert_eq!(fake.token_requests(), 1, "one token for one scope, reused");
        // Credentials went to the token endpoint only; registry calls carry the token.
        for r in fake.requests() {
            if let Some(a) = r.header("authorization") {
                assert!(
                    r.path.starts_with("/token") || a.starts_with("Bearer "),
                    "{} {} carried {a}",
                    r.method,
                    r.path
                );
            }
        }
        let log = cache.log();
        assert!(!log.contains(SECRET), "password in the cache log");
        assert!(!log.contains(&auth), "credentials in the cache log");

        // Wrong or missing credentials: the cache never challenges its client,
        // and no secret shows in bodies, logs or metrics.
        const WRONG: &str = "wr0ng-Pa55word";
        let wrong = base64::engine::general_purpose::STANDARD.encode(format!("robot:{WRONG}"));
        for file in [
            serde_json::json!({"auths": {"private.example": {"auth": wrong}}}).to_string(),
            r#"{"auths": {}}"#.to_owned(),
        ] {
            std::fs::write(&creds, file)?;
            fake.revoke_tokens();
            let (status, body) = get(&format!("{base}/manifests/{}{q}", "v2"), None).await?;
            assert_ne!(status, 401);
            assert!(status == 403 || status == 404, "{status}");
            let body = String::from_utf8_lossy(&body?).into_owned();
            assert!(!body.contains(SECRET) && !body.contains(WRONG), "{body}");
        }
        let metrics = http_client()
            .get(format!("{}/metrics", cache.url()))
            .send()
            .await?
            .text()
            .await?;
        let log = cache.log();
        for text in [&metrics, &log] {
            assert!(!text.contains(SECRET) && !text.contains(WRONG) && !text.contains(&wrong));
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn tag_list_queries_reach_the_upstream_as_sent() {
    bounded(30, async {
        let img = image(&[1_000])?;
        let s = setup("docker.io", &img, "").await?;
        let url = format!("{}/v2/library/app/tags/list?n=2&last=b", s.cache.url());
        let (status, _) = get(&url, None).await?;
        assert_eq!(status, 200);
        let seen: Vec<String> = s
            .fake
            .requests()
            .into_iter()
            .filter(|r| r.path.contains("/tags/list"))
            .map(|r| r.path)
            .collect();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].contains("n=2") && seen[0].contains("last=b"),
            "{seen:?}"
        );
        Ok(())
    })
    .await;
}

/// Sends raw request bytes (no client-side normalisation) and returns the status line.
async fn raw_status(addr: std::net::SocketAddr, request: &[u8]) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    // The server may answer and close before it has read everything we send.
    let _ = sock.write_all(request).await;
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf))
            .await
            .context("no answer")??;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    Ok(text.lines().next().unwrap_or("").to_owned())
}

#[tokio::test]
async fn hostile_requests_are_refused_and_touch_nothing() {
    bounded(60, async {
        let img = image(&[1_000])?;
        let s = setup("docker.io", &img, "").await?;
        let addr = s.cache.addr();
        let before = s.cache.store().files_named("x").len();
        for path in [
            "/v2/library/../../../etc/passwd/manifests/v1",
            "/v2/library/%2e%2e/%2e%2e/etc/manifests/v1",
            "/v2/library/app%2f..%2f..%2fx/manifests/v1",
            "/v2/library/app/blobs/sha256:..%2f..%2fetc",
            "/v2/library/app/manifests/..%2f..%2fv1",
            "/v2/library/app/manifests/v1?ns=127.0.0.1%3A22",
            "/v2/LIBRARY/App/manifests/v1",
            "/v2/library/app\u{ff0e}\u{ff0e}/manifests/v1",
        ] {
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let line = raw_status(addr, req.as_bytes()).await?;
            assert!(
                line.contains(" 400 ") || line.contains(" 404 "),
                "{path}: {line}"
            );
        }
        // Oversized request headers are refused before any routing.
        let big = "a".repeat(200_000);
        let req = format!("GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
        let line = raw_status(addr, req.as_bytes()).await?;
        assert!(line.contains(" 431 "), "{line}");
        // Nothing reached the upstream, nothing was written, and the cache still serves.
        assert_eq!(s.fake.requests().len(), 0, "{:?}", s.fake.requests());
        assert_eq!(s.cache.store().files_named("x").len(), before);
        assert_eq!(
            get_ok(&format!("{}/v2/library/app/manifests/v1", s.cache.url())).await?,
            img.manifest
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn redirects_and_token_realms_reach_only_allowed_hosts() {
    bounded(60, async {
        let img = image(&[100_000])?;
        let layer = img.layers[0].digest.clone();
        // Another host (127.0.0.2) holding the same content, standing for object storage.
        let elsewhere = FakeUpstream::start_on("127.0.0.2").await?;
        elsewhere.add_image("library/app", Some("v1"), &img);

        // Not allowed: the redirect is refused and never followed.
        let s = setup("docker.io", &img, "").await?;
        s.fake.set_behaviour(Behaviour::RedirectBlobs {
            to: elsewhere.url(),
        });
        let url = format!("{}/v2/library/app/blobs/{layer}", s.cache.url());
        let (status, _) = get(&url, None).await?;
        assert_eq!(status, 502);
        assert_eq!(
            elsewhere.requests().len(),
            0,
            "the cache dialled a host it may not"
        );

        // Allowed by configuration: followed, without the upstream's credentials.
        let allowed = "[[upstream]]\nhost = \"docker.io\"\nallowed_hosts = [\"127.0.0.2\"]\n";
        let s = setup("docker.io", &img, allowed).await?;
        s.fake.set_behaviour(Behaviour::RedirectBlobs {
            to: elsewhere.url(),
        });
        let url = format!("{}/v2/library/app/blobs/{layer}", s.cache.url());
        assert_eq!(sha256_digest(&get_ok(&url).await?), layer);
        let followed = elsewhere.requests();
        assert_eq!(followed.len(), 1, "{followed:?}");
        assert!(followed[0].header("authorization").is_none());

        // A token realm on another host is never contacted.
        let fake = FakeUpstream::start().await?;
        fake.add_image("library/app", Some("v1"), &img);
        fake.set_auth(Auth::Bearer {
            realm_url: Some(format!("{}/token", elsewhere.url())),
            service: "fake-registry".into(),
            username: None,
            password: None,
        });
        elsewhere.clear_requests();
        let cache =
            CacheProcess::start_with(CacheOptions::new().upstream("docker.io", &fake.url()))
                .await?;
        let (status, _) = get(
            &format!("{}/v2/library/app/manifests/v1", cache.url()),
            None,
        )
        .await?;
        assert_eq!(status, 403);
        assert_eq!(
            elsewhere.requests().len(),
            0,
            "token realm on another host was dialled"
        );
        assert_eq!(elsewhere.token_requests(), 0);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn an_oversized_manifest_is_refused_and_not_stored() {
    bounded(30, async {
        let img = image(&[1_000])?;
        let s = setup("docker.io", &img, "max_manifest_size = 65536").await?;
        let mut huge = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","annotations":{"x":""#.to_vec();
        huge.extend(std::iter::repeat_n(b'a', 200_000));
        huge.extend_from_slice(br#""}}"#);
        let digest = s.fake.add_manifest("library/huge", Some("v1"), seed::OCI_MANIFEST, huge);
        for reference in ["v1", digest.as_str()] {
            let (status, _) = get(
                &format!("{}/v2/library/huge/manifests/{reference}", s.cache.url()),
                Some(seed::ACCEPT_ALL_MANIFESTS),
            )
            .await?;
            assert_eq!(status, 502, "{reference}");
        }
        assert!(s.cache.store().files_named(&digest).is_empty());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_slowloris_client_is_disconnected() {
    bounded(40, async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let img = image(&[1_000])?;
        let s = setup("docker.io", &img, "").await?;
        let mut sock = tokio::net::TcpStream::connect(s.cache.addr()).await?;
        sock.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").await?;
        let started = Instant::now();
        let mut buf = [0u8; 512];
        // The header block never completes: the cache must hang up on its own.
        let n = tokio::time::timeout(Duration::from_secs(30), sock.read(&mut buf))
            .await
            .context("connection still open after 30 s")?
            .unwrap_or(0);
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            started.elapsed() >= Duration::from_secs(5),
            "closed too early"
        );
        // Meanwhile and afterwards, others are served.
        assert_eq!(
            get_ok(&format!("{}/v2/library/app/manifests/v1", s.cache.url())).await?,
            img.manifest
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_their_turn() {
    bounded(30, async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let img = image(&[1_000])?;
        let s = setup("docker.io", &img, "max_connections = 2").await?;
        let addr = s.cache.addr();
        let request = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n";
        // Two keep-alive connections, each answered once and left open.
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut c = tokio::net::TcpStream::connect(addr).await?;
            c.write_all(request).await?;
            let mut buf = [0u8; 1024];
            let n = c.read(&mut buf).await?;
            ensure!(
                buf[..n].starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            open.push(c);
        }
        // A third waits in the accept queue...
        let mut third = tokio::net::TcpStream::connect(addr).await?;
        third.write_all(request).await?;
        let mut buf = [0u8; 1024];
        let early = tokio::time::timeout(Duration::from_millis(800), third.read(&mut buf)).await;
        assert!(early.is_err(), "answered beyond the connection limit");
        // ...and is served once a slot frees.
        drop(open.pop());
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .context("not served after a slot freed")??;
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        Ok(())
    })
    .await;
}
