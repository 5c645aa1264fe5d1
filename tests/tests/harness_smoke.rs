//! Proves the harness works without the cache: real registry, containerd, skopeo, fake upstream.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use regmirror_e2e::fake::{Auth, Behaviour, FakeUpstream};
use regmirror_e2e::seed::{self, Flavour, ImageSpec, Platform, PushedImage};
use regmirror_e2e::skopeo::{self, SkopeoOpts};
use regmirror_e2e::util::{bounded, http_client, http_client_no_redirect, sha256_digest};
use regmirror_e2e::{
    CacheOptions, CacheProcess, Containerd, Registry, RequestLog, write_hosts_toml,
};

async fn assert_manifest_round_trip(
    url: &str,
    repo: &str,
    reference: &str,
    body: &[u8],
    media_type: &str,
) -> Result<()> {
    let got = seed::fetch_manifest(url, repo, reference).await?;
    assert_eq!(&got.body[..], body, "manifest bytes for {repo}:{reference}");
    let digest = sha256_digest(body);
    assert_eq!(got.docker_content_digest.as_deref(), Some(digest.as_str()));
    assert_eq!(got.content_type.as_deref(), Some(media_type));
    Ok(())
}

#[tokio::test]
async fn registry_push_read_back_skopeo_and_restart() {
    bounded(120, async {
        let mut reg = Registry::start().await?;
        let url = reg.url();
        let docker = seed::push_image(
            &url,
            "smoke/docker",
            "v1",
            &ImageSpec::docker(&[300_000, 50_000]),
        )
        .await?;
        let oci =
            seed::push_image(&url, "smoke/oci", "v1", &ImageSpec::oci(&[200_000, 10_000])).await?;
        let amd = seed::build_image(&ImageSpec::oci(&[20_000, 1_000]).platform("linux/amd64"))?;
        let arm = seed::build_image(&ImageSpec::oci(&[30_000, 2_000]).platform("linux/arm64"))?;
        let children = vec![
            (Platform::parse("linux/amd64"), amd),
            (Platform::parse("linux/arm64"), arm),
        ];
        let index = seed::push_index(&url, "smoke/multi", "v1", Flavour::Oci, &children).await?;

        assert_manifest_round_trip(
            &url,
            "smoke/docker",
            "v1",
            &docker.manifest,
            seed::DOCKER_MANIFEST,
        )
        .await?;
        assert_manifest_round_trip(
            &url,
            "smoke/docker",
            &docker.digest,
            &docker.manifest,
            seed::DOCKER_MANIFEST,
        )
        .await?;
        assert_manifest_round_trip(&url, "smoke/oci", "v1", &oci.manifest, seed::OCI_MANIFEST)
            .await?;
        assert_manifest_round_trip(&url, "smoke/multi", "v1", &index.manifest, seed::OCI_INDEX)
            .await?;
        for (_, child) in &index.children {
            assert_manifest_round_trip(
                &url,
                "smoke/multi",
                &child.digest,
                &child.manifest,
                seed::OCI_MANIFEST,
            )
            .await?;
        }
        let layer = seed::fetch_blob(&url, "smoke/docker", &docker.layers[0].digest).await?;
        assert_eq!(layer, docker.layers[0].bytes);

        // Raw blob and raw manifest helpers.
        let raw = seed::push_blob(&url, "smoke/raw", &b"hello blob"[..]).await?;
        assert_eq!(raw, sha256_digest(b"hello blob"));
        let d = seed::push_manifest(
            &url,
            "smoke/raw",
            "m",
            seed::DOCKER_MANIFEST,
            docker.manifest.clone(),
        )
        .await;
        // distribution refuses a manifest whose blobs are not in the repository.
        assert!(
            d.is_err(),
            "manifest with unknown blobs should be rejected: {d:?}"
        );

        // skopeo straight from the registry.
        let out = tempfile::tempdir()?;
        let dest = out.path().join("docker");
        let digest = skopeo::skopeo_copy(&format!("{}/smoke/docker:v1", reg.host()), &dest).await?;
        assert_eq!(digest, docker.digest);
        assert_eq!(skopeo::dir_layer_digests(&dest)?, docker.layer_digests());
        let raw = skopeo::skopeo_inspect_raw(&format!("{}/smoke/multi:v1", reg.host())).await?;
        assert_eq!(raw, index.manifest);

        // skopeo with the registry as a docker.io mirror (registries.conf).
        let conf = out.path().join("registries.conf");
        skopeo::write_registries_conf(&conf, "docker.io", &reg.host())?;
        let docker_io =
            seed::push_image(&url, "library/smoke", "v1", &ImageSpec::oci(&[1_000])).await?;
        let opts = SkopeoOpts {
            registries_conf: Some(conf),
            ..SkopeoOpts::default()
        };
        let d = skopeo::skopeo_copy_opts(
            "docker.io/library/smoke:v1",
            &out.path().join("mirrored"),
            &opts,
        )
        .await?;
        assert_eq!(d, docker_io.digest);

        // Access log: skopeo pings /v2/ first; counts see the pushes and pulls.
        reg.wait_count("GET", "/v2/smoke/docker/blobs/", 3, Duration::from_secs(5))
            .await?;
        let log = reg.access_log();
        assert!(
            log.iter()
                .any(|e| e.method == "GET" && e.path == "/v2/" && e.status == 200)
        );
        assert_eq!(reg.count("PUT", "/v2/smoke/multi/manifests/"), 3);
        let put = log
            .iter()
            .find(|e| e.method == "PUT" && e.path.contains("/blobs/uploads/"))
            .unwrap();
        assert!(
            put.path.contains("digest=sha256"),
            "query kept in access log: {put:?}"
        );
        assert_eq!(put.status, 201);

        // Outage and recovery on the same port and storage.
        reg.stop().await?;
        assert!(
            seed::fetch_manifest(&url, "smoke/docker", "v1")
                .await
                .is_err()
        );
        reg.start_again().await?;
        assert_eq!(reg.url(), url);
        assert_manifest_round_trip(
            &url,
            "smoke/docker",
            "v1",
            &docker.manifest,
            seed::DOCKER_MANIFEST,
        )
        .await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn registry_proxy_mode_pulls_through() {
    bounded(60, async {
        let upstream = Registry::start().await?;
        let image = seed::push_image(
            &upstream.url(),
            "library/px",
            "v1",
            &ImageSpec::docker(&[40_000]),
        )
        .await?;
        let proxy = Registry::start_proxy(&upstream.url()).await?;
        assert_manifest_round_trip(
            &proxy.url(),
            "library/px",
            "v1",
            &image.manifest,
            seed::DOCKER_MANIFEST,
        )
        .await?;
        let layer = seed::fetch_blob(&proxy.url(), "library/px", &image.layers[0].digest).await?;
        assert_eq!(layer, image.layers[0].bytes);
        upstream
            .wait_count("GET", &image.layers[0].digest, 1, Duration::from_secs(5))
            .await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn containerd_pulls_docker_io_through_mirror() {
    bounded(240, async {
        let reg = Registry::start().await?;
        let url = reg.url();
        let image = seed::push_image(
            &url,
            "library/smoke",
            "v1",
            &ImageSpec::docker(&[2_000_000, 100_000]),
        )
        .await?;
        let amd = seed::build_image(&ImageSpec::oci(&[50_000, 1_000]).platform("linux/amd64"))?;
        let arm = seed::build_image(&ImageSpec::oci(&[60_000, 2_000]).platform("linux/arm64"))?;
        let children = vec![
            (amd.platform.clone(), amd.clone()),
            (arm.platform.clone(), arm.clone()),
        ];
        let index = seed::push_index(&url, "library/multi", "v1", Flavour::Oci, &children).await?;

        let ctrd = Containerd::start().await?;
        let hosts = tempfile::tempdir()?;
        // server on a closed loopback port: nothing may reach the internet.
        write_hosts_toml(hosts.path(), "docker.io", &url, "http://127.0.0.1:9")?;

        ctrd.pull_ok(hosts.path(), "docker.io/library/smoke:v1", None)
            .await?;
        assert_eq!(
            ctrd.image_digest("docker.io/library/smoke:v1").await?,
            Some(image.digest.clone())
        );
        let content = ctrd.content_digests().await?;
        for b in image.blobs() {
            assert!(
                content.contains(&b.digest),
                "{} missing from {content:?}",
                b.digest
            );
        }
        assert!(content.contains(&image.digest));
        // containerd asks the mirror with ?ns=docker.io.
        assert!(
            reg.count("GET", "/v2/library/smoke/manifests/v1?ns=docker.io")
                + reg.count("HEAD", "/v2/library/smoke/manifests/v1?ns=docker.io")
                >= 1
        );

        ctrd.remove_all_images().await?;
        assert!(ctrd.content_digests().await?.is_empty());
        assert_eq!(ctrd.image_digest("docker.io/library/smoke:v1").await?, None);

        // A second pull is cold again: the layer is fetched a second time.
        let before = reg.count("GET", &image.layers[0].digest);
        ctrd.pull_ok(hosts.path(), "docker.io/library/smoke:v1", None)
            .await?;
        reg.wait_count(
            "GET",
            &image.layers[0].digest,
            before + 1,
            Duration::from_secs(5),
        )
        .await?;

        // Index with --platform linux/arm64.
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
            assert!(
                content.contains(&b.digest),
                "arm64 blob {} missing",
                b.digest
            );
        }
        assert!(
            !content.contains(&amd.layers[0].digest),
            "amd64 layer should not be pulled"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn containerd_with_cri_plugin_starts() {
    bounded(60, async {
        let certs = tempfile::tempdir()?;
        let ctrd = Containerd::start_with_cri(certs.path()).await?;
        let status = ctrd.plugin_status("cri").await?;
        assert_eq!(
            status.as_deref(),
            Some("ok"),
            "cri plugin; containerd log:\n{}",
            ctrd.log()
        );
        Ok(())
    })
    .await;
}

fn parse_challenge(v: &str) -> (String, String, String) {
    let get = |k: &str| {
        let start = v.find(&format!("{k}=\"")).map(|i| i + k.len() + 2).unwrap();
        let end = v[start..].find('"').unwrap() + start;
        v[start..end].to_owned()
    };
    (get("realm"), get("service"), get("scope"))
}

#[tokio::test]
async fn fake_upstream_bearer_auth_round_trip() {
    bounded(60, async {
        let fake = FakeUpstream::start().await?;
        // Seeding uses the push API, before auth is switched on.
        let image = seed::push_image(
            &fake.url(),
            "library/app",
            "1.0",
            &ImageSpec::docker(&[10_000]),
        )
        .await?;
        fake.clear_requests();
        fake.set_auth(Auth::bearer_with_credentials("alice", "s3cret"));
        let client = http_client();
        let manifest_url = format!("{}/v2/library/app/manifests/1.0", fake.url());

        let r = client
            .get(&manifest_url)
            .header("accept", seed::DOCKER_MANIFEST)
            .send()
            .await?;
        assert_eq!(r.status(), 401);
        let challenge = r.headers()["www-authenticate"].to_str()?.to_owned();
        let (realm, service, scope) = parse_challenge(&challenge);
        assert_eq!(realm, format!("{}/token", fake.url()));
        assert_eq!(service, "fake-registry");
        assert_eq!(scope, "repository:library/app:pull");

        let token_url = format!("{realm}?service={service}&scope={scope}");
        let bad = client
            .get(&token_url)
            .basic_auth("alice", Some("wrong"))
            .send()
            .await?;
        assert_eq!(bad.status(), 401);
        let tok = client
            .get(&token_url)
            .basic_auth("alice", Some("s3cret"))
            .send()
            .await?;
        assert_eq!(tok.status(), 200);
        let tok: serde_json::Value = serde_json::from_slice(&tok.bytes().await?)?;
        assert_eq!(tok["expires_in"], 300);
        let token = tok["token"].as_str().context("token")?.to_owned();

        let r = client.get(&manifest_url).bearer_auth(&token).send().await?;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"].to_str()?, image.digest);
        assert_eq!(r.bytes().await?, image.manifest);
        // The token is scoped to library/app only.
        let other = client
            .get(format!("{}/v2/library/other/manifests/1.0", fake.url()))
            .bearer_auth(&token)
            .send()
            .await?;
        assert_eq!(other.status(), 401);
        fake.revoke_tokens();
        assert_eq!(
            client
                .get(&manifest_url)
                .bearer_auth(&token)
                .send()
                .await?
                .status(),
            401
        );

        assert_eq!(fake.token_requests(), 2);
        assert_eq!(fake.count("GET", "/v2/library/app/manifests/1.0"), 3);
        let seen = fake.requests();
        assert!(
            seen.iter()
                .any(|r| r.header("authorization") == Some(&format!("Bearer {token}")))
        );

        // Basic mode.
        fake.set_auth(Auth::Basic {
            username: "bob".into(),
            password: "pw".into(),
        });
        let r = client.get(&manifest_url).send().await?;
        assert_eq!(r.status(), 401);
        assert!(
            r.headers()["www-authenticate"]
                .to_str()?
                .starts_with("Basic ")
        );
        assert_eq!(
            client
                .get(&manifest_url)
                .basic_auth("bob", Some("pw"))
                .send()
                .await?
                .status(),
            200
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn fake_upstream_fault_behaviours() {
    bounded(90, async {
        let fake = FakeUpstream::start().await?;
        let image: PushedImage = seed::build_image(&ImageSpec::oci(&[64_000]))?;
        fake.add_image("repo", Some("t"), &image);
        let client = http_client();
        let blob = &image.layers[0];
        let blob_url = format!("{}/v2/repo/blobs/{}", fake.url(), blob.digest);
        let manifest_url = format!("{}/v2/repo/manifests/t", fake.url());

        // Normal, HEAD and Range.
        let r = client.head(&blob_url).send().await?;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-length"].to_str()?,
            blob.size().to_string()
        );
        let r = client
            .get(&blob_url)
            .header("range", "bytes=10-19")
            .send()
            .await?;
        assert_eq!(r.status(), 206);
        assert_eq!(r.bytes().await?, blob.bytes.slice(10..20));

        fake.set_behaviour(Behaviour::CorruptBlobs);
        let got = client.get(&blob_url).send().await?.bytes().await?;
        assert_eq!(got.len(), blob.bytes.len());
        assert_ne!(sha256_digest(&got), blob.digest);

        fake.set_behaviour(Behaviour::CorruptManifests);
        let r = client.get(&manifest_url).send().await?;
        assert_eq!(r.headers()["docker-content-digest"].to_str()?, image.digest);
        let got = r.bytes().await?;
        assert_eq!(got.len(), image.manifest.len());
        assert_ne!(sha256_digest(&got), image.digest);
        serde_json::from_slice::<serde_json::Value>(&got)?;

        fake.set_behaviour(Behaviour::Status(500));
        assert_eq!(client.get(&manifest_url).send().await?.status(), 500);
        assert_eq!(
            client
                .get(format!("{}/v2/", fake.url()))
                .send()
                .await?
                .status(),
            500
        );

        fake.set_behaviour(Behaviour::TooManyRequests {
            retry_after_secs: 7,
            count: 2,
        });
        for _ in 0..2 {
            let r = client.get(&manifest_url).send().await?;
            assert_eq!(r.status(), 429);
            assert_eq!(r.headers()["retry-after"].to_str()?, "7");
        }
        assert_eq!(client.get(&manifest_url).send().await?.status(), 200);
        assert_eq!(fake.behaviour(), Behaviour::Normal);

        fake.set_behaviour(Behaviour::ResetMidBlob);
        let r = client.get(&blob_url).send().await?;
        assert_eq!(r.status(), 200);
        assert!(r.bytes().await.is_err(), "body must be cut short");

        // Redirect to a second fake holding the blob under the same path.
        let cdn = FakeUpstream::start().await?;
        cdn.add_blob("repo", blob.bytes.clone());
        fake.set_behaviour(Behaviour::RedirectBlobs { to: cdn.url() });
        let r = http_client_no_redirect().get(&blob_url).send().await?;
        assert_eq!(r.status(), 307);
        assert_eq!(
            r.headers()["location"].to_str()?,
            format!("{}/v2/repo/blobs/{}", cdn.url(), blob.digest)
        );
        assert_eq!(
            client.get(&blob_url).send().await?.bytes().await?,
            blob.bytes
        );
        assert_eq!(cdn.count("GET", &blob.digest), 1);

        fake.set_behaviour(Behaviour::SlowBody {
            bytes_per_sec: 200_000,
        });
        let t = Instant::now();
        let got = client.get(&blob_url).send().await?.bytes().await?;
        assert_eq!(got, blob.bytes);
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "64 KB at 200 KB/s took {:?}",
            t.elapsed()
        );

        fake.set_behaviour(Behaviour::Hang);
        let quick = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(500))
            .build()?;
        let e = quick.get(&manifest_url).send().await.unwrap_err();
        assert!(e.is_timeout(), "{e}");

        // Path-scoped rule: manifests fine, blobs 404.
        fake.set_behaviour(Behaviour::Normal);
        fake.set_behaviour_for("/blobs/", Behaviour::Status(404));
        assert_eq!(client.get(&manifest_url).send().await?.status(), 200);
        assert_eq!(client.get(&blob_url).send().await?.status(), 404);
        fake.clear_behaviour_rules();
        assert_eq!(client.get(&blob_url).send().await?.status(), 200);

        assert!(fake.count("GET", &blob.digest) >= 8);
        assert_eq!(fake.count("HEAD", &blob.digest), 1);
        Ok(())
    })
    .await;
}

/// `CacheProcess` machinery, with a stand-in "cache": a shell script that takes the same
/// `--listen`/`--storage` flags and runs docker-registry.
#[tokio::test]
async fn cache_process_control_with_stand_in_binary() {
    bounded(90, async {
        let bin_dir = tempfile::tempdir()?;
        let stub = bin_dir.path().join("regmirror-cache");
        std::fs::write(
            &stub,
            r#"#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in
    --listen) L="$2"; shift 2;;
    --storage) S="$2"; shift 2;;
    *) shift;;
  esac
done
cat > "$S/../stub.yml" <<EOF
version: 0.1
log: {level: info, accesslog: {disabled: false}}
storage: {filesystem: {rootdirectory: $S}}
http: {addr: $L, secret: x}
EOF
echo "stub cache on $L"
exec docker-registry serve "$S/../stub.yml"
"#,
        )?;
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&stub)
            .status()?;
        let opts = CacheOptions {
            binary: Some(stub),
            ..CacheOptions::new().upstream("docker.io", "http://127.0.0.1:9")
        };
        let mut cache = CacheProcess::start_with(opts).await?;
        let url = cache.url();
        assert!(
            cache
                .log()
                .contains(&format!("stub cache on {}", cache.host()))
        );
        assert!(
            cache
                .args()
                .contains(&"docker.io=http://127.0.0.1:9".to_owned())
        );
        let digest = seed::push_blob(&url, "x/y", &b"persist me"[..]).await?;

        let status = cache.stop().await?;
        assert!(!cache.is_running(), "stopped: {status}");
        cache.restart().await?;
        assert_eq!(cache.url(), url);
        assert_eq!(
            seed::fetch_blob(&url, "x/y", &digest).await?,
            &b"persist me"[..]
        );
        assert_eq!(cache.log().matches("stub cache on").count(), 2);

        cache.kill9();
        assert!(
            http_client()
                .get(format!("{url}/v2/"))
                .send()
                .await
                .is_err()
        );
        cache.restart().await?;
        assert!(cache.storage().exists());
        Ok(())
    })
    .await;
}
