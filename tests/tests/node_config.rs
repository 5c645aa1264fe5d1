//! The node agent's file work against a real containerd: hosts.toml written by
//! `regmirror-node` makes `ctr` and the CRI (`crictl pull`, the kubelet's path)
//! pull docker.io images through the cache, fall back to the upstream when
//! the cache is down, and removal leaves only the user's files.

use std::path::Path;
use std::time::Duration;

use anyhow::ensure;
use regmirror_e2e::seed::{self, ImageSpec};
use regmirror_e2e::util::bounded;
use regmirror_e2e::{CacheProcess, Containerd, Registry, RequestLog};
use regmirror_node::{Apply, HostState, HostsToml, MergeMode, apply, inspect, remove_owned};

fn configure(dir: &Path, cache: &str, upstream: &str) -> Vec<HostState> {
    let want = HostsToml {
        registry: "docker.io".into(),
        server: upstream.into(),
        mirror: cache.into(),
        dial_timeout: Duration::from_secs(1),
        owner: "hub".into(),
    };
    apply(
        Apply {
            dir,
            owner: "hub",
            merge: MergeMode::Never,
        },
        &[want],
    )
    .into_iter()
    .map(|r| r.state)
    .collect()
}

#[tokio::test]
async fn ctr_pulls_through_the_cache_and_falls_back_to_the_upstream() {
    bounded(240, async {
        let reg = Registry::start().await?;
        let image = seed::push_image(
            &reg.url(),
            "library/app",
            "v1",
            &ImageSpec::docker(&[3_000_000, 50_000]),
        )
        .await?;
        let mut cache =
            CacheProcess::start(["--upstream".to_owned(), format!("docker.io={}", reg.url())])
                .await?;
        let certs = tempfile::tempdir()?;
        // A user's file for another registry, which must survive everything.
        let user_file = certs.path().join("quay.io/hosts.toml");
        std::fs::create_dir_all(user_file.parent().unwrap())?;
        std::fs::write(&user_file, "server = \"https://quay.io\"\n")?;
        assert_eq!(
            configure(certs.path(), &cache.url(), &reg.url()),
            [HostState::Configured]
        );

        let ctrd = Containerd::start().await?;
        ctrd.pull_ok(certs.path(), "docker.io/library/app:v1", None)
            .await?;
        assert_eq!(
            ctrd.image_digest("docker.io/library/app:v1").await?,
            Some(image.digest.clone())
        );
        let through_cache = cache.served_bytes().await?;
        assert!(
            through_cache >= image.layers[0].size() as f64,
            "the layer did not come through the cache ({through_cache} bytes)"
        );

        // Cache down: containerd falls back to `server`, the upstream itself.
        cache.stop().await?;
        ctrd.remove_all_images().await?;
        let direct_before = reg.count("GET", &image.layers[0].digest);
        ctrd.pull_ok(certs.path(), "docker.io/library/app:v1", None)
            .await?;
        assert_eq!(
            reg.count("GET", &image.layers[0].digest),
            direct_before + 1,
            "fallback pull did not reach the upstream"
        );

        // Removal: exactly our files go.
        let removed = remove_owned(certs.path(), "hub");
        assert_eq!(removed.len(), 1);
        assert!(!certs.path().join("docker.io").exists());
        assert_eq!(
            std::fs::read_to_string(&user_file)?,
            "server = \"https://quay.io\"\n"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn cri_pulls_docker_io_images_through_the_cache() {
    bounded(240, async {
        let reg = Registry::start().await?;
        let image = seed::push_image(
            &reg.url(),
            "library/web",
            "1.0",
            &ImageSpec::oci(&[2_000_000, 20_000]),
        )
        .await?;
        let cache =
            CacheProcess::start(["--upstream".to_owned(), format!("docker.io={}", reg.url())])
                .await?;
        let certs = tempfile::tempdir()?;
        // `server` on a closed port: only the cache can deliver.
        configure(certs.path(), &cache.url(), "http://127.0.0.1:9");
        let ctrd = Containerd::start_with_cri(certs.path()).await?;
        let detection = inspect(
            Some(&std::fs::read_to_string(ctrd.config_file())?),
            &certs.path().display().to_string(),
        );
        ensure!(detection.reads_hosts, "{detection:?}");

        // CRI expands short names as the kubelet does.
        ctrd.crictl(&["pull", "web:1.0"]).await?;
        let listed = ctrd.crictl(&["images", "--digests"]).await?;
        let short = &image.digest.trim_start_matches("sha256:")[..13];
        ensure!(
            listed.contains("docker.io/library/web") && listed.contains(short),
            "crictl images:\n{listed}"
        );
        ensure!(
            cache.served_bytes().await? >= image.layers[0].size() as f64,
            "layer not served by the cache"
        );
        let log = cache.log();
        ensure!(
            log.contains("/v2/library/web/manifests/1.0?ns=docker.io"),
            "cache log: {}",
            cache.log_tail(20)
        );
        Ok(())
    })
    .await;
}
