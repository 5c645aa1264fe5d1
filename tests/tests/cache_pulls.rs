//! The cache between real clients (skopeo, containerd) and a real upstream
//! (Debian's docker-registry), everything on loopback.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use regmirror_e2e::seed::{self, Flavour, ImageSpec, Platform, PushedImage};
use regmirror_e2e::skopeo::{self, SkopeoOpts};
use regmirror_e2e::util::{bounded, http_client, sha256_digest, wait_until};
use regmirror_e2e::{CacheProcess, Containerd, Registry, RequestLog, write_hosts_toml};

/// Upstream GETs of each blob of `image`, from the registry's access log.
fn blob_gets(reg: &Registry, image: &PushedImage) -> Vec<usize> {
    image
        .blobs()
        .map(|b| reg.count("GET", &format!("/blobs/{}", b.digest)))
        .collect()
}

async fn start_cache(upstreams: &[(&str, &str)]) -> Result<CacheProcess> {
    let mut args = Vec::new();
    for (host, url) in upstreams {
        args.push("--upstream".to_owned());
        args.push(format!("{host}={url}"));
    }
    CacheProcess::start(args).await
}

#[tokio::test]
async fn skopeo_pulls_every_image_kind_through_the_cache() {
    bounded(240, async {
        let mut reg = Registry::start().await?;
        let up = reg.url();
        // A layer of tens of MB, Docker and OCI media types, and both index kinds.
        let docker = seed::push_image(
            &up,
            "library/app",
            "v1",
            &ImageSpec::docker(&[24_000_000, 300_000]),
        )
        .await?;
        let oci =
            seed::push_image(&up, "team/tool", "v2", &ImageSpec::oci(&[500_000, 20_000])).await?;
        let amd = seed::build_image(&ImageSpec::oci(&[40_000]).platform("linux/amd64"))?;
        let arm = seed::build_image(&ImageSpec::oci(&[50_000]).platform("linux/arm64"))?;
        let children = vec![
            (Platform::parse("linux/amd64"), amd.clone()),
            (Platform::parse("linux/arm64"), arm.clone()),
        ];
        let oci_index =
            seed::push_index(&up, "library/multi", "v1", Flavour::Oci, &children).await?;
        let list = seed::push_index(&up, "library/list", "v1", Flavour::Docker, &children).await?;

        let mut cache = start_cache(&[("docker.io", &up)]).await?;
        let host = cache.host();
        let out = tempfile::tempdir()?;

        // Docker-daemon style names (default upstream, `library/` implied).
        let got = skopeo::skopeo_copy(&format!("{host}/app:v1"), &out.path().join("a")).await?;
        assert_eq!(got, docker.digest, "docker manifest digest preserved");
        assert_eq!(
            skopeo::dir_layer_digests(&out.path().join("a"))?,
            docker.layer_digests()
        );
        // CRI-O style prefix.
        let got = skopeo::skopeo_copy(
            &format!("{host}/docker.io/team/tool:v2"),
            &out.path().join("b"),
        )
        .await?;
        assert_eq!(got, oci.digest, "oci manifest digest preserved");
        assert_eq!(
            skopeo::dir_layer_digests(&out.path().join("b"))?,
            oci.layer_digests()
        );
        // Indexes are served byte for byte; a platform is picked from them.
        for (repo, index) in [("library/multi", &oci_index), ("library/list", &list)] {
            let raw = skopeo::skopeo_inspect_raw(&format!("{host}/{repo}:v1")).await?;
            assert_eq!(raw, index.manifest.to_vec(), "{repo} index bytes");
        }
        let opts = SkopeoOpts {
            extra_args: vec!["--override-arch".into(), "arm64".into()],
            ..SkopeoOpts::default()
        };
        let got =
            skopeo::skopeo_copy_opts(&format!("{host}/multi:v1"), &out.path().join("c"), &opts)
                .await?;
        assert_eq!(got, arm.digest, "arm64 child picked from the index");

        // Every blob crossed the upstream exactly once.
        let first = blob_gets(&reg, &docker);
        assert!(first.iter().all(|&n| n == 1), "blob GETs {first:?}");

        // A second pull is served from disk: no blob GET, at most a tag HEAD.
        let heads_before = reg.count("HEAD", "/v2/library/app/manifests/v1");
        let got = skopeo::skopeo_copy(&format!("{host}/app:v1"), &out.path().join("d")).await?;
        assert_eq!(got, docker.digest);
        assert_eq!(blob_gets(&reg, &docker), first, "warm pull refetched blobs");
        assert!(reg.count("HEAD", "/v2/library/app/manifests/v1") <= heads_before + 1);
        assert_eq!(
            reg.count("GET", &format!("/manifests/{}", docker.digest)),
            1,
            "manifest fetched once"
        );

        // With the upstream gone and the cache restarted, cached tags and digests still pull.
        reg.stop().await?;
        cache.restart().await?;
        let started = Instant::now();
        let got = skopeo::skopeo_copy(&format!("{host}/app:v1"), &out.path().join("e")).await?;
        assert_eq!(
            got, docker.digest,
            "served from cache with the upstream down"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "stale serve took {:?}",
            started.elapsed()
        );
        let raw = skopeo::skopeo_inspect_raw(&format!("{host}/multi:v1")).await?;
        assert_eq!(raw, oci_index.manifest.to_vec());
        // What was never cached is an error, not a hang.
        let resp = http_client()
            .get(format!("{}/v2/library/never/manifests/v1", cache.url()))
            .send()
            .await?;
        assert!(
            resp.status().is_server_error(),
            "uncached with upstream down: {}",
            resp.status()
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn containerd_pulls_docker_io_through_the_cache() {
    regmirror_e2e::util::require_root("containerd");
    bounded(300, async {
        let reg = Registry::start().await?;
        let up = reg.url();
        let image = seed::push_image(
            &up,
            "library/web",
            "1.0",
            &ImageSpec::docker(&[6_000_000, 400_000, 10_000]),
        )
        .await?;
        let amd = seed::build_image(&ImageSpec::oci(&[70_000, 1_000]).platform("linux/amd64"))?;
        let arm = seed::build_image(&ImageSpec::oci(&[80_000, 2_000]).platform("linux/arm64"))?;
        let children = vec![
            (amd.platform.clone(), amd.clone()),
            (arm.platform.clone(), arm.clone()),
        ];
        let index = seed::push_index(&up, "library/multi", "v1", Flavour::Oci, &children).await?;

        let cache = start_cache(&[("docker.io", &up)]).await?;
        let ctrd = Containerd::start().await?;
        let hosts = tempfile::tempdir()?;
        // `server` on a closed port: every byte must come through the cache.
        write_hosts_toml(
            hosts.path(),
            "docker.io",
            &cache.url(),
            "http://127.0.0.1:9",
        )?;

        ctrd.pull_ok(hosts.path(), "docker.io/library/web:1.0", None)
            .await?;
        assert_eq!(
            ctrd.image_digest("docker.io/library/web:1.0").await?,
            Some(image.digest.clone())
        );
        let content = ctrd.content_digests().await?;
        for b in image.blobs() {
            assert!(content.contains(&b.digest), "{} not pulled", b.digest);
        }
        // containerd's requests carried ?ns=docker.io, and the cache asked the upstream
        // for each blob once.
        assert!(
            cache.log().contains("ns=docker.io"),
            "cache log: {}",
            cache.log_tail(20)
        );
        let first = blob_gets(&reg, &image);
        assert!(first.iter().all(|&n| n == 1), "blob GETs {first:?}");

        // Pull again from scratch: the cache serves every blob from disk.
        ctrd.remove_all_images().await?;
        ctrd.pull_ok(hosts.path(), "docker.io/library/web:1.0", None)
            .await?;
        assert_eq!(blob_gets(&reg, &image), first, "warm pull reached upstream");

        // An index: only the requested platform's content moves.
        ctrd.pull_ok(
            hosts.path(),
            "docker.io/library/multi:v1",
            Some("linux/arm64"),
        )
        .await?;
        assert_eq!(
            ctrd.image_digest("docker.io/library/multi:v1").await?,
            Some(index.digest.clone())
        );
        let content = ctrd.content_digests().await?;
        for b in arm.blobs() {
            assert!(content.contains(&b.digest), "arm64 blob {}", b.digest);
        }
        assert_eq!(reg.count("GET", &amd.layers[0].digest), 0);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn concurrent_cold_clients_share_one_upstream_fetch() {
    bounded(180, async {
        let reg = Registry::start().await?;
        let up = reg.url();
        let image = seed::push_image(
            &up,
            "library/big",
            "v1",
            &ImageSpec::docker(&[32_000_000]).gzip_level(0),
        )
        .await?;
        let layer = image.layers[0].clone();
        let cache = start_cache(&[("docker.io", &up)]).await?;
        let url = format!("{}/v2/library/big/blobs/{}", cache.url(), layer.digest);

        const CLIENTS: usize = 8;
        let client = http_client();
        let pulls = (0..CLIENTS).map(|i| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                // Half of the clients read a range from the middle.
                let req = if i % 2 == 1 {
                    client.get(&url).header("range", "bytes=1000000-1999999")
                } else {
                    client.get(&url)
                };
                let resp = req.send().await?;
                let status = resp.status().as_u16();
                let body = resp.bytes().await?;
                Ok::<_, anyhow::Error>((i, status, body))
            }
        });
        for r in futures::future::join_all(pulls).await {
            let (i, status, body) = r?;
            if i % 2 == 1 {
                ensure!(status == 206, "client {i}: {status}");
                ensure!(
                    body[..] == layer.bytes[1_000_000..2_000_000],
                    "client {i} range"
                );
            } else {
                ensure!(status == 200, "client {i}: {status}");
                ensure!(sha256_digest(&body) == layer.digest, "client {i} digest");
            }
        }
        let gets = reg.count("GET", &format!("/blobs/{}", layer.digest));
        assert_eq!(gets, 1, "{CLIENTS} cold clients cost {gets} upstream GETs");
        Ok(())
    })
    .await;
}

/// Stored blobs leave through `sendfile` on HTTP/1 and through copies on
/// HTTP/2: both must give exactly the file's bytes, for whole bodies, ranges
/// across the zero-copy chunk size, keep-alive reuse and pipelined requests.
#[tokio::test]
async fn stored_blobs_are_byte_exact_over_http1_and_http2() {
    bounded(180, async {
        let reg = Registry::start().await?;
        let up = reg.url();
        // Three 16 MiB zero-copy chunks, each sent in 4 MiB calls, the last
        // short and not a whole page.
        let image = seed::push_image(
            &up,
            "library/exact",
            "v1",
            &ImageSpec::docker(&[40_000_001]).gzip_level(0),
        )
        .await?;
        let layer = image.layers[0].clone();
        let data = &layer.bytes;
        let len = data.len();
        let cache = start_cache(&[("docker.io", &up)]).await?;
        let path = format!("/v2/library/exact/blobs/{}", layer.digest);
        let url = format!("{}{path}", cache.url());
        let fill = http_client().get(&url).send().await?.bytes().await?;
        ensure!(sha256_digest(&fill) == layer.digest, "cold pull digest");
        let stored = cache.store().blob("docker.io", &layer.digest);
        // The client has its last bytes just before the file is renamed into place.
        wait_until(Duration::from_secs(10), || async { stored.exists() })
            .await
            .context("the filled blob was never stored")?;
        let stored = std::fs::File::open(&stored).with_context(|| stored.display().to_string())?;
        // Half the blob out of the page cache (whole 2 MiB folios): those
        // pages are read in before they are sent, the rest go zero-copy.
        let drop_half = || -> Result<()> {
            for at in (2u64 << 20..40 << 20).step_by(4 << 20) {
                rustix::fs::fadvise(
                    &stored,
                    at,
                    std::num::NonZeroU64::new(2 << 20),
                    rustix::fs::Advice::DontNeed,
                )?;
            }
            Ok(())
        };

        // Ranges across chunk (16, 32 MiB) and call (4, 8 MiB) borders, and
        // at both ends.
        let ranges: [(String, std::ops::Range<usize>); 7] = [
            ("bytes=4194000-4194999".into(), 4_194_000..4_195_000),
            ("bytes=0-0".into(), 0..1),
            ("bytes=-100".into(), len - 100..len),
            (
                format!("bytes={}-", len - 16_777_217),
                len - 16_777_217..len,
            ),
            ("bytes=8388607-8388608".into(), 8_388_607..8_388_609),
            ("bytes=16777000-33554999".into(), 16_777_000..33_555_000),
            ("bytes=33554431-33554432".into(), 33_554_431..33_554_433),
        ];
        let http2 = reqwest::Client::builder()
            .no_proxy()
            .http2_prior_knowledge()
            .timeout(Duration::from_secs(60))
            .build()?;
        for (name, client) in [("HTTP/1.1", http_client()), ("HTTP/2", http2)] {
            for round in 0..2 {
                drop_half()?;
                let resp = client.get(&url).send().await?;
                ensure!(resp.status() == 200, "{name}: {}", resp.status());
                let body = resp.bytes().await?;
                ensure!(
                    sha256_digest(&body) == layer.digest,
                    "{name} round {round}: whole body differs"
                );
            }
            for (header, want) in &ranges {
                drop_half()?;
                let resp = client.get(&url).header("range", header).send().await?;
                ensure!(resp.status() == 206, "{name} {header}: {}", resp.status());
                let body = resp.bytes().await?;
                ensure!(
                    body[..] == data[want.clone()],
                    "{name} {header}: wrong bytes"
                );
            }
        }

        // Pipelined: three requests in one write, answered in order.
        let mut tcp = tokio::net::TcpStream::connect(cache.addr()).await?;
        let req = |extra: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
        let batch = [req(""), req("Range: bytes=20000000-20000009\r\n"), req("")].concat();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, batch.as_bytes()).await?;
        let mut reader = tokio::io::BufReader::new(tcp);
        for (i, want) in [0..len, 20_000_000..20_000_010, 0..len]
            .into_iter()
            .enumerate()
        {
            let body = read_http1_response(&mut reader).await?;
            ensure!(
                body[..] == data[want],
                "pipelined response {i}: wrong bytes"
            );
        }
        // HTTP/1.0 and `Connection: close`: one response, then the end.
        for (i, head) in [
            format!("GET {path} HTTP/1.0\r\n\r\n"),
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        ]
        .into_iter()
        .enumerate()
        {
            drop_half()?;
            let mut tcp = tokio::net::TcpStream::connect(cache.addr()).await?;
            tokio::io::AsyncWriteExt::write_all(&mut tcp, head.as_bytes()).await?;
            let mut reader = tokio::io::BufReader::new(tcp);
            let body = read_http1_response(&mut reader).await?;
            ensure!(body[..] == data[..], "closing request {i}: wrong bytes");
            let mut rest = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut rest).await?;
            ensure!(rest.is_empty(), "closing request {i}: bytes after the body");
        }
        let gets = reg.count("GET", &format!("/blobs/{}", layer.digest));
        ensure!(gets == 1, "warm reads went upstream: {gets} GETs");
        Ok(())
    })
    .await;
}

/// The body of one `Content-Length` response read off a raw HTTP/1.1 stream.
async fn read_http1_response(r: &mut (impl tokio::io::AsyncBufRead + Unpin)) -> Result<Vec<u8>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut length = None;
    loop {
        let mut line = String::new();
        ensure!(r.read_line(&mut line).await? > 0, "connection closed");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = Some(v.trim().parse::<usize>()?);
        }
    }
    let mut body = vec![0; length.context("no content-length")?];
    r.read_exact(&mut body).await?;
    Ok(body)
}

#[tokio::test]
async fn one_cache_serves_several_upstreams() {
    bounded(180, async {
        let hub = Registry::start().await?;
        let other = Registry::start().await?;
        // Same repository name in both, different content.
        let a = seed::push_image(
            &hub.url(),
            "org/app",
            "v1",
            &ImageSpec::oci(&[10_000]).seed(1),
        )
        .await?;
        let b = seed::push_image(
            &other.url(),
            "org/app",
            "v1",
            &ImageSpec::oci(&[12_000]).seed(2),
        )
        .await?;
        let cache = start_cache(&[("docker.io", &hub.url()), ("ghcr.io", &other.url())]).await?;
        let base = cache.url();

        let digest_of = |path: String| {
            let url = format!("{base}{path}");
            async move {
                let resp = http_client()
                    .get(&url)
                    .header("accept", seed::ACCEPT_ALL_MANIFESTS)
                    .send()
                    .await?;
                ensure!(resp.status() == 200, "{url}: {}", resp.status());
                Ok(sha256_digest(&resp.bytes().await?))
            }
        };
        assert_eq!(
            digest_of("/v2/org/app/manifests/v1".into()).await?,
            a.digest
        );
        assert_eq!(
            digest_of("/v2/org/app/manifests/v1?ns=docker.io".into()).await?,
            a.digest
        );
        assert_eq!(
            digest_of("/v2/org/app/manifests/v1?ns=ghcr.io".into()).await?,
            b.digest
        );
        assert_eq!(
            digest_of("/v2/ghcr.io/org/app/manifests/v1".into()).await?,
            b.digest
        );
        // Content is kept per upstream: a digest from one is not served under the other.
        let resp = http_client()
            .get(format!(
                "{base}/v2/org/app/blobs/{}?ns=ghcr.io",
                a.layers[0].digest
            ))
            .send()
            .await?;
        assert_eq!(resp.status(), 404);
        // An upstream that is not configured is refused without dialing anything.
        let sync_logs = || async {
            hub.sync_log().await?;
            other.sync_log().await
        };
        sync_logs().await?;
        let before = (hub.access_log().len(), other.access_log().len());
        for path in [
            "/v2/org/app/manifests/v1?ns=quay.io",
            "/v2/quay.io/org/app/manifests/v1",
        ] {
            let resp = http_client().get(format!("{base}{path}")).send().await?;
            assert_eq!(resp.status(), 404, "{path}");
        }
        sync_logs().await?;
        assert_eq!(
            (hub.access_log().len(), other.access_log().len()),
            before,
            "an unconfigured upstream reached a configured one"
        );

        // The catalog lists what is cached, per upstream.
        let catalog: serde_json::Value = http_client()
            .get(format!("{base}/v2/_catalog"))
            .send()
            .await?
            .bytes()
            .await
            .map(|b| serde_json::from_slice(&b))?
            .context("catalog json")?;
        let repos: Vec<&str> = catalog["repositories"]
            .as_array()
            .context("repositories")?
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(repos.contains(&"org/app"), "{repos:?}");
        assert!(repos.contains(&"ghcr.io/org/app"), "{repos:?}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn tags_list_pages_even_when_the_upstream_does_not() {
    bounded(120, async {
        let reg = Registry::start().await?;
        let img = seed::build_image(&ImageSpec::oci(&[1_000]))?;
        for tag in ["a", "b", "c"] {
            seed::push_built_image(&reg.url(), "library/tagged", tag, &img).await?;
        }
        let cache = start_cache(&[("docker.io", &reg.url())]).await?;
        let list = |base: String, q: &'static str| async move {
            let url = format!("{base}/v2/{q}");
            let resp = http_client().get(&url).send().await?;
            ensure!(resp.status() == 200, "{url}: {}", resp.status());
            let link = resp
                .headers()
                .get("link")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await?)?;
            Ok((v["tags"].clone(), link))
        };
        // Distribution 2.8 ignores `n` and `last`; the cache answers the page asked for.
        let (direct, _) = list(reg.url(), "library/tagged/tags/list?n=2").await?;
        assert_eq!(
            direct.as_array().map(Vec::len),
            Some(3),
            "upstream pages now: {direct}"
        );
        let (all, _) = list(cache.url(), "tagged/tags/list").await?;
        let mut all: Vec<_> = all.as_array().context("tags")?.clone();
        all.sort_by_key(|v| v.to_string());
        assert_eq!(
            serde_json::Value::from(all),
            serde_json::json!(["a", "b", "c"])
        );
        let (page, link) = list(cache.url(), "tagged/tags/list?n=2").await?;
        assert_eq!(page, serde_json::json!(["a", "b"]));
        let link = link.context("a next-page link")?;
        assert!(link.starts_with("</v2/tagged/tags/list?"), "{link}");
        assert!(link.contains("last=b") && link.contains("n=2"), "{link}");
        let (rest, link) = list(cache.url(), "tagged/tags/list?n=2&last=b").await?;
        assert_eq!(rest, serde_json::json!(["c"]));
        assert_eq!(link, None);
        Ok(())
    })
    .await;
}
