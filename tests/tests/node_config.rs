//! The node agent's file work against a real containerd: hosts.toml written by
//! `regmirror-node` makes `ctr` and the CRI (`crictl pull`, the kubelet's path)
//! pull docker.io images through the cache, fall back to the upstream when
//! the cache is down, and removal leaves only the user's files; and what
//! `regmirror-node` reads from containerd's configuration (imports included)
//! matches what that containerd does.

use std::path::Path;
use std::time::Duration;

use anyhow::ensure;
use regmirror_e2e::seed::{self, ImageSpec};
use regmirror_e2e::util::bounded;
use regmirror_e2e::{CacheProcess, Containerd, Registry, RequestLog, cri_tables, write_hosts_toml};
use regmirror_node::{
    Apply, HostState, HostsToml, MergeMode, apply, inspect, inspect_file, remove_owned,
};

fn configure(dir: &Path, cache: &str, upstream: &str) -> Vec<HostState> {
    let want = HostsToml {
        registry: "docker.io".into(),
        server: upstream.into(),
        mirrors: vec![cache.into()],
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

/// The Node's `status.nodeInfo.containerRuntimeVersion` as the kubelet builds
/// it from the CRI `Version` call (`containerd://1.6.20~ds1`).
async fn runtime_version(ctrd: &Containerd) -> anyhow::Result<String> {
    let out = ctrd.crictl(&["version"]).await?;
    let v = out
        .lines()
        .find_map(|l| l.strip_prefix("RuntimeVersion:"))
        .map(str::trim)
        .ok_or_else(|| anyhow::anyhow!("no RuntimeVersion in:\n{out}"))?;
    Ok(format!("containerd://{v}"))
}

#[tokio::test]
async fn config_path_from_an_imported_file_is_read_as_containerd_reads_it() {
    bounded(240, async {
        let reg = Registry::start().await?;
        let image = seed::push_image(
            &reg.url(),
            "library/web",
            "1.0",
            &ImageSpec::oci(&[300_000]),
        )
        .await?;
        // The registry is named by a closed loopback port: only the
        // hosts.toml mirror can deliver, and nothing leaves the machine.
        let certs = tempfile::tempdir()?;
        write_hosts_toml(
            certs.path(),
            "127.0.0.1:9",
            &reg.url(),
            "http://127.0.0.1:9",
        )?;
        let certs_dir = certs.path().display().to_string();
        let image_ref = "127.0.0.1:9/library/web:1.0";

        // config_path only in an imported file (the main config.toml has no
        // CRI table): containerd pulls through the mirror...
        // An absolute glob: containerd 1.6 before 1.6.29 (Debian's) resolves
        // a relative one against its working directory.
        let conf_d = |d: &Path| vec![format!("{}/conf.d/*.toml", d.display())];
        let ctrd = Containerd::start_with_imports(|d| {
            let cri = format!("version = 2\n{}", cri_tables(d, Some(certs.path()))?);
            Ok((conf_d(d), vec![("conf.d/10-cri.toml".to_owned(), cri)]))
        })
        .await?;
        let runtime = runtime_version(&ctrd).await?;
        println!("containerd: {runtime}");
        ctrd.crictl(&["pull", image_ref]).await?;
        ensure!(
            reg.count("GET", &image.layers[0].digest) >= 1,
            "the layer did not come from the mirror"
        );
        // ...and inspect_file says so, known release or not, where the main
        // file alone said NotEffective.
        let main = ctrd.config_file().display().to_string();
        let root = Path::new("/");
        for rv in [Some(runtime.as_str()), None] {
            let d = inspect_file(root, &main, &certs_dir, rv);
            ensure!(d.reads_hosts, "{rv:?}: {d:?}");
        }
        let alone = inspect(Some(&std::fs::read_to_string(&main)?), &certs_dir);
        ensure!(
            !alone.reads_hosts && alone.message.contains("no config_path"),
            "{alone:?}"
        );
        drop(ctrd);

        // A later import with its own CRI table but no registry: containerd
        // 1.x replaces the whole table, so config_path is gone and the pull
        // cannot reach the mirror; inspect_file for this release agrees.
        let before = reg.count("GET", "/manifests/1.0");
        let ctrd = Containerd::start_with_imports(|d| {
            let with = format!("version = 2\n{}", cri_tables(d, Some(certs.path()))?);
            let without = format!("version = 2\n{}", cri_tables(d, None)?);
            Ok((
                conf_d(d),
                vec![
                    ("conf.d/10-cri.toml".to_owned(), with),
                    ("conf.d/20-cri.toml".to_owned(), without),
                ],
            ))
        })
        .await?;
        let main = ctrd.config_file().display().to_string();
        ensure!(ctrd.plugin_status("cri").await?.as_deref() == Some("ok"));
        let pulled = ctrd.crictl(&["pull", image_ref]).await;
        let d = inspect_file(root, &main, &certs_dir, Some(&runtime));
        if runtime.starts_with("containerd://1.") {
            ensure!(pulled.is_err(), "pulled without config_path: {pulled:?}");
            ensure!(reg.count("GET", "/manifests/1.0") == before);
            ensure!(
                !d.reads_hosts && d.message.contains("20-cri.toml replaces the whole"),
                "{d:?}"
            );
        } else {
            ensure!(pulled.is_ok() && d.reads_hosts, "{pulled:?} {d:?}");
        }
        Ok(())
    })
    .await;
}
