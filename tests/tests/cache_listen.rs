//! The cache binary on `[::]:PORT`, as the operator's generated config says
//! (issue 18): one socket answers over IPv4 and IPv6.

use anyhow::Result;
use regmirror_e2e::CacheProcess;
use regmirror_e2e::util::{free_port, http_client};

#[tokio::test]
async fn a_cache_on_the_ipv6_wildcard_answers_ipv4_and_ipv6_loopback() -> Result<()> {
    let port = free_port();
    let cache = CacheProcess::start(["--listen".to_owned(), format!("[::]:{port}")]).await?;
    let mut urls = vec![format!("http://127.0.0.1:{port}/healthz")];
    // ::1 exists only where the kernel has IPv6 (else the cache fell back to 0.0.0.0).
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        urls.push(format!("http://[::1]:{port}/healthz"));
    }
    for url in urls {
        let status = http_client().get(&url).send().await?.status();
        assert_eq!(status, 200, "{url}; log:\n{}", cache.log());
    }
    Ok(())
}
