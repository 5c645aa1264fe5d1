//! The OCI distribution-spec conformance suite (`oci-conformance`, built by
//! scripts/install-go-tools.sh) in its read-only mode: push, delete and
//! referrers off, the pull and tag-list tests run against content seeded in
//! the upstream (`OCI_RO_DATA_*`). It runs once against the upstream itself,
//! which proves the configuration and the content, then against the cache in
//! front of it, cold and warm.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use regmirror_e2e::seed::{self, Flavour, ImageSpec, Platform};
use regmirror_e2e::tools::tool;
use regmirror_e2e::util::{bounded, wait_until};
use regmirror_e2e::{CacheProcess, Registry, RequestLog};

const REPO: &str = "conformance/repo1";
const SUITE_TIMEOUT: Duration = Duration::from_secs(120);
const PREFIX: &str = "OCI Conformance Test/";

/// Tests Debian's docker-registry (distribution 2.8) fails, with the reason.
/// The cache must pass them all.
const UPSTREAM_EXPECTED_FAILURES: &[(&str, &str)] = &[
    (
        "read-only/tag-list",
        "distribution 2.8 ignores `last` (and `n`) on tags/list: it always sends every tag",
    ),
    (
        "invalid-digest-format/manifest-get",
        "distribution 2.8 answers 500 to GET /manifests/sha256:baddigeststring (400 or 404 expected)",
    ),
];

/// What the suite is pointed at: every tag, manifest and blob of `REPO`.
struct Seeded {
    tags: Vec<String>,
    manifests: Vec<String>,
    blobs: Vec<String>,
}

/// An OCI image under two tags, an OCI index of two more images, and a
/// zero-byte blob (the suite checks its body and `Content-Length: 0`).
async fn seed_content(up: &str) -> Result<Seeded> {
    let image = seed::push_image(
        up,
        REPO,
        "v1",
        &ImageSpec::oci(&[300_000, 20_000, 500]).seed(11),
    )
    .await?;
    seed::push_built_image(up, REPO, "latest", &image).await?;
    let mut children = Vec::new();
    for (platform, seed) in [("linux/amd64", 12), ("linux/arm64", 13)] {
        let spec = ImageSpec::oci(&[40_000]).platform(platform).seed(seed);
        let child = tokio::task::spawn_blocking(move || seed::build_image(&spec)).await??;
        children.push((Platform::parse(platform), child));
    }
    let index = seed::push_index(up, REPO, "multi", Flavour::Oci, &children).await?;
    let empty = seed::push_blob(up, REPO, Bytes::new()).await?;

    let mut manifests = vec![image.digest.clone(), index.digest.clone()];
    let mut blobs: Vec<String> = image.blobs().map(|b| b.digest.clone()).collect();
    for (_, child) in &index.children {
        manifests.push(child.digest.clone());
        blobs.extend(child.blobs().map(|b| b.digest.clone()));
    }
    blobs.push(empty);
    blobs.sort();
    blobs.dedup();
    Ok(Seeded {
        tags: ["v1", "latest", "multi"].map(str::to_owned).to_vec(),
        manifests,
        blobs,
    })
}

/// One `<testcase>` of the suite's junit.xml.
#[derive(Debug)]
struct Case {
    /// Without the `OCI Conformance Test/` prefix.
    name: String,
    /// passed, skipped, failure or error.
    status: String,
    /// The failure text (the suite writes it to `<system-out>`).
    message: String,
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let len = tag[start..].find('"')?;
    Some(xml_unescape(&tag[start..start + len]))
}

fn xml_unescape(s: &str) -> String {
    s.replace("&#34;", "\"")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&#xA;", "\n")
        .replace("&#x9;", "\t")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The test cases of a junit.xml as the suite writes it (flat, one suite).
fn parse_junit(xml: &str) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for chunk in xml.split("<testcase ").skip(1) {
        let open = &chunk[..chunk.find('>').context("unterminated <testcase>")?];
        let body = &chunk[..chunk.find("</testcase>").unwrap_or(chunk.len())];
        let name = attr(&format!(" {open}"), "name").context("testcase without a name")?;
        let status = attr(&format!(" {open}"), "status").unwrap_or_default();
        let message = body
            .split_once("<system-out>")
            .and_then(|(_, rest)| rest.split_once("</system-out>"))
            .map(|(m, _)| xml_unescape(m))
            .unwrap_or_default();
        cases.push(Case {
            name: name.strip_prefix(PREFIX).unwrap_or(&name).to_owned(),
            status,
            message,
        });
    }
    ensure!(!cases.is_empty(), "junit.xml has no test cases");
    Ok(cases)
}

/// Runs the suite against `host` (plain HTTP) with only the settings below:
/// no inherited `OCI_*` variable, and a working directory without an
/// `oci-conformance.yaml`.
async fn run_suite(host: &str, content: &Seeded, dir: &Path) -> Result<Vec<Case>> {
    let results = dir.join("results");
    let env: &[(&str, String)] = &[
        ("OCI_REGISTRY", host.to_owned()),
        ("OCI_TLS", "disabled".into()),
        ("OCI_VERSION", "1.1".into()),
        ("OCI_REPO1", REPO.into()),
        ("OCI_REPO2", "conformance/repo2".into()),
        ("OCI_RESULTS_DIR", results.display().to_string()),
        ("OCI_LOG", "warn".into()),
        // A read-only registry: no push, no deletes.
        ("OCI_API_PUSH", "false".into()),
        ("OCI_API_BLOBS_DELETE", "false".into()),
        ("OCI_API_MANIFESTS_DELETE", "false".into()),
        ("OCI_API_TAGS_DELETE", "false".into()),
        ("OCI_API_TAGS_LIST", "true".into()),
        // distribution 2.8 has no referrers API (404): the cache relays the
        // upstream's answer, so neither can pass the referrers tests.
        ("OCI_API_REFERRER", "false".into()),
        ("OCI_RO_DATA_TAGS", content.tags.join(" ")),
        ("OCI_RO_DATA_MANIFESTS", content.manifests.join(" ")),
        ("OCI_RO_DATA_BLOBS", content.blobs.join(" ")),
    ];
    let child = tokio::process::Command::new(tool("oci-conformance"))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn oci-conformance")?;
    let out = tokio::time::timeout(SUITE_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("oci-conformance against {host} took over {SUITE_TIMEOUT:?}"))??;
    let shown = || {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // 0: all passed, 1: some test failed; anything else is the suite breaking.
    if !matches!(out.status.code(), Some(0 | 1)) {
        bail!(
            "oci-conformance against {host}: {}\n{}",
            out.status,
            shown()
        );
    }
    let xml = std::fs::read_to_string(results.join("junit.xml"))
        .with_context(|| format!("junit.xml of the run against {host}\n{}", shown()))?;
    parse_junit(&xml)
}

/// Fails listing every failed test not in `expected`, every expected failure
/// that passed, and any pull test that did not run once per seeded item.
fn check(what: &str, cases: &[Case], content: &Seeded, expected: &[(&str, &str)]) -> Result<()> {
    let mut problems = Vec::new();
    for c in cases {
        let failed = c.status == "failure" || c.status == "error";
        if failed && !expected.iter().any(|(name, _)| *name == c.name) {
            problems.push(format!(
                "FAILED {} ({}): {}",
                c.name,
                c.status,
                c.message.trim()
            ));
        }
    }
    for (name, why) in expected {
        let ran: Vec<&Case> = cases.iter().filter(|c| c.name == *name).collect();
        if ran.is_empty() || ran.iter().all(|c| c.status == "passed") {
            problems.push(format!(
                "expected failure no longer fails, remove it from the list: {name} ({why})"
            ));
        }
    }
    let passed = |name: &str| {
        cases
            .iter()
            .filter(|c| c.name == name && c.status == "passed")
            .count()
    };
    let expected_failure = |name: &str| expected.iter().any(|(n, _)| *n == name);
    for (name, want) in [
        ("ping", 1),
        ("empty/tag list", 1),
        ("read-only/tag-list", 1),
        ("read-only/head/manifest-head-by-tag", content.tags.len()),
        (
            "read-only/head/manifest-head-by-digest",
            content.manifests.len(),
        ),
        ("read-only/head/blob-head", content.blobs.len()),
        ("read-only/pull/manifest-by-tag", content.tags.len()),
        ("read-only/pull/manifest-by-digest", content.manifests.len()),
        ("read-only/pull/blob-get", content.blobs.len()),
        ("missing-manifest/by-digest", 1),
        ("missing-manifest/by-tag", 1),
        ("invalid-digest-format/manifest-get", 1),
    ] {
        if !expected_failure(name) && passed(name) != want {
            problems.push(format!(
                "{name}: {} passed, {want} expected (one per seeded item)",
                passed(name)
            ));
        }
    }
    if !problems.is_empty() {
        bail!(
            "OCI conformance against {what}: {} problem(s):\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    Ok(())
}

#[tokio::test]
async fn oci_conformance_pull_suite_passes_against_the_cache() {
    bounded(300, async {
        let reg = Registry::start().await?;
        let content = seed_content(&reg.url()).await?;

        // The configuration and the content, against the upstream itself.
        let dir = tempfile::tempdir()?;
        let cases = run_suite(&reg.host(), &content, dir.path()).await?;
        check(
            "the upstream (docker-registry)",
            &cases,
            &content,
            UPSTREAM_EXPECTED_FAILURES,
        )?;

        // The cache in front of it: every test passes, cold and then warm.
        let cache = CacheProcess::start([
            "--upstream".to_owned(),
            format!("{}={}", reg.host(), reg.url()),
        ])
        .await?;
        let blob_gets = || {
            content
                .blobs
                .iter()
                .map(|b| reg.count("GET", &format!("/blobs/{b}")))
                .sum::<usize>()
        };
        let mut after_cold = 0;
        for run in ["cold", "warm"] {
            let dir = tempfile::tempdir()?;
            let cases = run_suite(&cache.host(), &content, dir.path()).await?;
            if let Err(e) = check(&format!("the cache ({run})"), &cases, &content, &[]) {
                bail!("{e:#}\ncache log tail:\n{}", cache.log_tail(30));
            }
            if run == "cold" {
                // Every fill is over (each seeded blob stored) and logged.
                let store = cache.store();
                wait_until(Duration::from_secs(10), || async {
                    content
                        .blobs
                        .iter()
                        .all(|b| store.blob(&reg.host(), b).exists())
                })
                .await
                .context("the cold run did not store every seeded blob")?;
                reg.sync_log().await?;
                after_cold = blob_gets();
            }
        }
        // Warm means from disk: no blob fetched from the upstream again.
        reg.sync_log().await?;
        ensure!(
            blob_gets() == after_cold,
            "the warm run fetched blobs upstream: {after_cold} GETs before it, {} after",
            blob_gets()
        );
        Ok(())
    })
    .await;
}

#[test]
fn junit_cases_are_parsed() {
    let xml = r#"<testsuites><testsuite name="OCI Conformance Test" tests="2">
    <testcase name="OCI Conformance Test/ping" classname="" time="0.1" status="passed">
      <system-err>req</system-err>
    </testcase>
    <testcase name="OCI Conformance Test/read-only/tag-list" classname="" status="failure">
      <system-out>tag &#34;v1&#34; returned&#xA;when last set</system-out>
    </testcase></testsuite></testsuites>"#;
    let cases = parse_junit(xml).unwrap();
    assert_eq!(cases.len(), 2);
    assert_eq!(
        (cases[0].name.as_str(), cases[0].status.as_str()),
        ("ping", "passed")
    );
    assert_eq!(cases[1].name, "read-only/tag-list");
    assert_eq!(cases[1].status, "failure");
    assert_eq!(cases[1].message, "tag \"v1\" returned\nwhen last set");
}
