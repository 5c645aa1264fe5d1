//! Routing kept end to end, in-process against fake upstreams on loopback:
//! requests naming no registry go to Docker Hub wherever it is configured,
//! every pagination `Link` the cache writes leads back to the client's
//! upstream (`ns` or host prefix), and tag lists name the repository as the
//! client did, byte for byte otherwise.

use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Request, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use clap::Parser;
use regmirror_cache::config::{Cli, Config};
use regmirror_cache::{mirror::Mirror, server, store::Store};
use sha2::{Digest as _, Sha256};
use tower::ServiceExt;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";
const SUBJECT: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// A registry acting out one upstream: every repository has the tags `t1`
/// to `t5`, each a small OCI manifest naming the upstream, and an empty
/// referrers index. With `pages`, listings honour `n` and `last` and link to
/// the next page (as distribution 3 and Docker Hub do); without, they ignore
/// them (distribution 2.8). `down` answers everything with 500.
struct Fake {
    label: &'static str,
    pages: bool,
    down: Mutex<bool>,
    /// `METHOD path?query` of every request, in order.
    seen: Mutex<Vec<String>>,
}

const TAGS: [&str; 5] = ["t1", "t2", "t3", "t4", "t5"];

impl Fake {
    fn manifest(&self) -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{SUBJECT}","size":0}},"layers":[],"annotations":{{"upstream":"{}"}}}}"#,
            self.label
        )
        .into_bytes()
    }

    /// The upstream's own tag list body for `repo` with `query` applied.
    fn tag_list(&self, repo: &str, query: &str) -> (String, Option<String>) {
        let param = |k: &str| {
            url::form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.into_owned())
        };
        let mut tags: Vec<&str> = TAGS.to_vec();
        let mut link = None;
        if self.pages {
            if let Some(last) = param("last") {
                tags.retain(|t| *t > last.as_str());
            }
            if let Some(n) = param("n").and_then(|n| n.parse::<usize>().ok())
                && tags.len() > n
            {
                tags.truncate(n);
                let last = tags[n - 1];
                link = Some(format!(
                    "</v2/{repo}/tags/list?last={last}&n={n}>; rel=\"next\""
                ));
            }
        }
        // Go's encoding/json spelling, as distribution writes it.
        let tags: Vec<String> = tags.iter().map(|t| format!("\"{t}\"")).collect();
        let body = format!(r#"{{"name":"{repo}","tags":[{}]}}"#, tags.join(","));
        (body, link)
    }

    async fn serve(State(fake): State<Arc<Fake>>, method: Method, uri: Uri) -> Response {
        let query = uri.query().unwrap_or("");
        fake.seen
            .lock()
            .unwrap()
            .push(format!("{method} {}?{query}", uri.path()));
        if *fake.down.lock().unwrap() {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        let path = uri.path().strip_prefix("/v2/").unwrap_or("");
        let mut headers = HeaderMap::new();
        let body = if let Some(repo) = path.strip_suffix("/tags/list") {
            let (body, link) = fake.tag_list(repo, query);
            if let Some(l) = link {
                headers.insert(header::LINK, l.parse().unwrap());
            }
            headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
            body.into_bytes()
        } else if path.contains("/referrers/") {
            headers.insert(header::CONTENT_TYPE, OCI_INDEX.parse().unwrap());
            if query.contains("n=") {
                let repo = path.split("/referrers/").next().unwrap();
                let link = format!("</v2/{repo}/referrers/{SUBJECT}?n=1&last=x>; rel=\"next\"");
                headers.insert(header::LINK, link.parse().unwrap());
            }
            format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#)
                .into_bytes()
        } else if path.contains("/manifests/") {
            let m = fake.manifest();
            let digest = format!("sha256:{}", hex::encode(Sha256::digest(&m)));
            headers.insert(header::CONTENT_TYPE, OCI_MANIFEST.parse().unwrap());
            headers.insert("docker-content-digest", digest.parse().unwrap());
            m
        } else {
            return StatusCode::NOT_FOUND.into_response();
        };
        (headers, body).into_response()
    }
}

/// A fake upstream on a loopback port: its state and its URL.
async fn fake(label: &'static str, pages: bool) -> (Arc<Fake>, String) {
    let state = Arc::new(Fake {
        label,
        pages,
        down: Mutex::new(false),
        seen: Mutex::default(),
    });
    let app = axum::Router::new()
        .fallback(Fake::serve)
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (state, url)
}

/// The cache over `upstreams` (`HOST=URL`, in order) on `storage`.
async fn cache(storage: &Path, upstreams: &[String]) -> axum::Router {
    let mut args = vec![
        "regmirror-cache".to_owned(),
        "--storage".to_owned(),
        storage.display().to_string(),
    ];
    for u in upstreams {
        args.extend(["--upstream".to_owned(), u.clone()]);
    }
    let config = Config::resolve(Cli::try_parse_from(args).unwrap()).unwrap();
    let store = Store::open(&config.storage).await.unwrap();
    server::app(Arc::new(Mirror::new(&config, store).unwrap()))
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn link(&self) -> Option<&str> {
        self.headers.get(header::LINK).map(|v| v.to_str().unwrap())
    }

    /// The target of the `Link`, for following it.
    fn next(&self) -> String {
        let link = self.link().expect("a next-page link");
        link.split_once('<')
            .unwrap()
            .1
            .split_once('>')
            .unwrap()
            .0
            .to_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn get(app: &axum::Router, uri: &str) -> Answer {
    let req = Request::get(uri)
        .header(header::ACCEPT, ACCEPT_ALL)
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap()
        .to_vec();
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        assert_eq!(len.to_str().unwrap(), body.len().to_string(), "{uri}");
    }
    Answer {
        status,
        headers,
        body,
    }
}

fn seen(f: &Fake) -> Vec<String> {
    f.seen.lock().unwrap().clone()
}

#[tokio::test]
async fn requests_naming_no_registry_go_to_docker_hub_wherever_it_is_listed() {
    let (ghcr, ghcr_url) = fake("ghcr", false).await;
    let (hub, hub_url) = fake("hub", false).await;
    let dir = tempfile::tempdir().unwrap();
    let app = cache(
        dir.path(),
        &[
            format!("ghcr.io={ghcr_url}"),
            format!("docker.io={hub_url}"),
        ],
    )
    .await;

    // `docker pull org/tool:v2` through registry-mirrors.
    let a = get(&app, "/v2/org/tool/manifests/v2").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, hub.manifest(), "Docker Hub's image, not ghcr.io's");
    assert!(seen(&ghcr).is_empty(), "ghcr.io asked: {:?}", seen(&ghcr));
    assert!(
        seen(&hub)
            .iter()
            .all(|r| r.contains("/v2/org/tool/manifests/")),
        "{:?}",
        seen(&hub)
    );
    // Single names are Docker Hub's library/ images.
    let a = get(&app, "/v2/alpine/manifests/3").await;
    assert_eq!(a.status, StatusCode::OK);
    let last = seen(&hub).pop().unwrap();
    assert!(last.contains(" /v2/library/alpine/manifests/3?"), "{last}");
    // Named upstreams are still theirs.
    let a = get(&app, "/v2/org/tool/manifests/v2?ns=ghcr.io").await;
    assert_eq!(a.body, ghcr.manifest());
    let a = get(&app, "/v2/ghcr.io/org/tool/manifests/v2").await;
    assert_eq!(a.body, ghcr.manifest());

    // The catalog lists Docker Hub's repositories unprefixed: the names that
    // reach them.
    let a = get(&app, "/v2/_catalog").await;
    let repos = a.json()["repositories"].clone();
    assert_eq!(
        repos,
        serde_json::json!(["ghcr.io/org/tool", "library/alpine", "org/tool"])
    );
}

#[tokio::test]
async fn pagination_links_lead_back_to_the_clients_upstream() {
    // a.test ignores n and last (the cache cuts pages); b.test pages itself.
    let (a_up, a_url) = fake("a", false).await;
    let (b_up, b_url) = fake("b", true).await;
    let dir = tempfile::tempdir().unwrap();
    let app = cache(
        dir.path(),
        &[format!("a.test={a_url}"), format!("b.test={b_url}")],
    )
    .await;

    // ns: the upstream's Link keeps the client's ns, and page 2 comes from b.test.
    let p1 = get(&app, "/v2/owner/app/tags/list?ns=b.test&n=2").await;
    assert_eq!(p1.status, StatusCode::OK);
    assert_eq!(p1.json()["tags"], serde_json::json!(["t1", "t2"]));
    assert_eq!(
        p1.link(),
        Some(r#"</v2/owner/app/tags/list?last=t2&n=2&ns=b.test>; rel="next""#)
    );
    let p2 = get(&app, &p1.next()).await;
    assert_eq!(p2.json()["tags"], serde_json::json!(["t3", "t4"]));
    let p3 = get(&app, &p2.next()).await;
    assert_eq!(p3.json()["tags"], serde_json::json!(["t5"]));
    assert_eq!(p3.link(), None);
    assert!(seen(&a_up).is_empty(), "a.test asked: {:?}", seen(&a_up));
    assert_eq!(seen(&b_up).len(), 3);

    // Host prefix: kept in the path.
    let p1 = get(&app, "/v2/b.test/owner/app/tags/list?n=2").await;
    assert_eq!(
        p1.link(),
        Some(r#"</v2/b.test/owner/app/tags/list?last=t2&n=2>; rel="next""#)
    );
    let p2 = get(&app, &p1.next()).await;
    assert_eq!(p2.json()["tags"], serde_json::json!(["t3", "t4"]));

    // Pages the cache cuts itself carry the routing too.
    let p1 = get(&app, "/v2/owner/app/tags/list?ns=a.test&n=2").await;
    assert_eq!(p1.json()["tags"], serde_json::json!(["t1", "t2"]));
    assert_eq!(
        p1.link(),
        Some(r#"</v2/owner/app/tags/list?n=2&last=t2&ns=a.test>; rel="next""#)
    );
    let p2 = get(&app, &p1.next()).await;
    assert_eq!(p2.json()["tags"], serde_json::json!(["t3", "t4"]));

    // Referrers go through the same rewriting.
    let r = get(
        &app,
        &format!("/v2/owner/app/referrers/{SUBJECT}?ns=b.test&n=1"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.link(),
        Some(
            format!(r#"</v2/owner/app/referrers/{SUBJECT}?n=1&last=x&ns=b.test>; rel="next""#)
                .as_str()
        )
    );
    assert!(seen(&a_up).iter().all(|s| !s.contains("referrers")));

    // The cached tags listed while the upstream is down: paged, linked, routed.
    for tag in ["t1", "t2", "t3"] {
        let m = get(&app, &format!("/v2/owner/app/manifests/{tag}?ns=b.test")).await;
        assert_eq!(m.status, StatusCode::OK, "{tag}");
    }
    *b_up.down.lock().unwrap() = true;
    let p1 = get(&app, "/v2/owner/app/tags/list?ns=b.test&n=2").await;
    assert_eq!(p1.status, StatusCode::OK);
    assert_eq!(
        p1.body,
        br#"{"name":"owner/app","tags":["t1","t2"]}"#.to_vec()
    );
    assert_eq!(
        p1.link(),
        Some(r#"</v2/owner/app/tags/list?n=2&last=t2&ns=b.test>; rel="next""#)
    );
    let p2 = get(&app, &p1.next()).await;
    assert_eq!(p2.json()["tags"], serde_json::json!(["t3"]));
    assert_eq!(p2.link(), None);
    let p = get(&app, "/v2/b.test/owner/app/tags/list").await;
    assert_eq!(p.json()["name"], "b.test/owner/app", "the client's name");
}

#[tokio::test]
async fn tag_lists_name_the_repository_as_the_client_did() {
    let (ghcr, ghcr_url) = fake("ghcr", false).await;
    let (_hub, hub_url) = fake("hub", false).await;
    let dir = tempfile::tempdir().unwrap();
    let app = cache(
        dir.path(),
        &[
            format!("docker.io={hub_url}"),
            format!("ghcr.io={ghcr_url}"),
        ],
    )
    .await;
    let upstream_body = ghcr.tag_list("org/tool", "").0;

    // Prefix: only the name differs from the upstream's body.
    let a = get(&app, "/v2/ghcr.io/org/tool/tags/list").await;
    assert_eq!(a.status, StatusCode::OK);
    let want = upstream_body.replace(r#""name":"org/tool""#, r#""name":"ghcr.io/org/tool""#);
    assert_eq!(String::from_utf8(a.body).unwrap(), want);
    // ns: the client's name is the upstream's; the body is the upstream's.
    let a = get(&app, "/v2/org/tool/tags/list?ns=ghcr.io").await;
    assert_eq!(String::from_utf8(a.body).unwrap(), upstream_body);
    // Docker Hub's implicit library/: the name the client asked for.
    let a = get(&app, "/v2/alpine/tags/list").await;
    assert_eq!(a.json()["name"], "alpine");
    let a = get(&app, "/v2/alpine/tags/list?ns=docker.io").await;
    assert_eq!(a.json()["name"], "alpine");
    let a = get(&app, "/v2/library/alpine/tags/list").await;
    assert_eq!(a.json()["name"], "library/alpine");
}
