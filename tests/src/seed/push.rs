//! Pushing and fetching with the plain distribution API.

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;

use super::{
    ACCEPT_ALL_MANIFESTS, Flavour, ImageSpec, Platform, PushedImage, PushedIndex, build_image,
    build_index,
};
use crate::util::{http_client, sha256_digest};

/// Builds an image per `spec` and pushes it as `repo:tag` (blobs, then the manifest).
pub async fn push_image(
    registry_url: &str,
    repo: &str,
    tag: &str,
    spec: &ImageSpec,
) -> Result<PushedImage> {
    let spec = spec.clone();
    let image = tokio::task::spawn_blocking(move || build_image(&spec)).await??;
    push_built_image(registry_url, repo, tag, &image).await?;
    Ok(image)
}

/// Pushes an already built image under `reference` (tag or its digest).
pub async fn push_built_image(
    registry_url: &str,
    repo: &str,
    reference: &str,
    image: &PushedImage,
) -> Result<()> {
    for blob in image.blobs() {
        push_blob_as(registry_url, repo, &blob.digest, blob.bytes.clone()).await?;
    }
    let got = push_manifest(
        registry_url,
        repo,
        reference,
        &image.media_type,
        image.manifest.clone(),
    )
    .await?;
    ensure!(
        got == image.digest,
        "registry computed {got}, expected {}",
        image.digest
    );
    Ok(())
}

/// Pushes each child by digest, then the index built over them as `repo:tag`.
pub async fn push_index(
    registry_url: &str,
    repo: &str,
    tag: &str,
    flavour: Flavour,
    children: &[(Platform, PushedImage)],
) -> Result<PushedIndex> {
    let index = build_index(flavour, children)?;
    push_built_index(registry_url, repo, tag, &index).await?;
    Ok(index)
}

/// Pushes the children of `index` by digest, then `index` under `reference`.
pub async fn push_built_index(
    registry_url: &str,
    repo: &str,
    reference: &str,
    index: &PushedIndex,
) -> Result<()> {
    for (_, child) in &index.children {
        push_built_image(registry_url, repo, &child.digest, child).await?;
    }
    let got = push_manifest(
        registry_url,
        repo,
        reference,
        &index.media_type,
        index.manifest.clone(),
    )
    .await?;
    ensure!(
        got == index.digest,
        "registry computed {got}, expected {}",
        index.digest
    );
    Ok(())
}

/// Pushes one blob (monolithic upload), returns its digest. Skips it if `HEAD` finds it.
pub async fn push_blob(registry_url: &str, repo: &str, bytes: impl Into<Bytes>) -> Result<String> {
    let bytes = bytes.into();
    let digest = sha256_digest(&bytes);
    push_blob_as(registry_url, repo, &digest, bytes).await?;
    Ok(digest)
}

/// Pushes one blob under `digest` (monolithic upload: POST, then PUT with
/// `?digest=`); skips it if `HEAD` finds it. `digest` may use another
/// algorithm than sha256 (`sha512:<hex>`); the registry checks it.
pub async fn push_blob_as(
    registry_url: &str,
    repo: &str,
    digest: &str,
    bytes: Bytes,
) -> Result<()> {
    let base = registry_url.trim_end_matches('/');
    let client = http_client();
    let head = client
        .head(format!("{base}/v2/{repo}/blobs/{digest}"))
        .send()
        .await
        .context("HEAD blob")?;
    if head.status().is_success() {
        return Ok(());
    }
    let start = client
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .header("content-length", "0")
        .send()
        .await
        .context("POST blob upload")?;
    if start.status() != reqwest::StatusCode::ACCEPTED {
        bail!(
            "POST {base}/v2/{repo}/blobs/uploads/: {} {}",
            start.status(),
            start.text().await.unwrap_or_default()
        );
    }
    let location = start
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .context("upload response without Location")?
        .to_owned();
    let mut url = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location
    };
    url.push(if url.contains('?') { '&' } else { '?' });
    url.push_str("digest=");
    url.push_str(&digest.replace(':', "%3A"));
    let len = bytes.len();
    let put = client
        .put(&url)
        .header("content-type", "application/octet-stream")
        .header("content-length", len.to_string())
        .body(bytes)
        .send()
        .await
        .context("PUT blob")?;
    if put.status() != reqwest::StatusCode::CREATED {
        bail!(
            "PUT blob {digest} ({len} bytes) to {url}: {} {}",
            put.status(),
            put.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// PUTs a manifest body as `repo:reference` with `Content-Type: media_type`.
/// Returns the digest of `body` (checked against `Docker-Content-Digest` if sent).
pub async fn push_manifest(
    registry_url: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: impl Into<Bytes>,
) -> Result<String> {
    let body = body.into();
    let digest = sha256_digest(&body);
    put_manifest(registry_url, repo, reference, media_type, body, &digest).await?;
    Ok(digest)
}

/// PUTs a manifest body as `repo:reference` with `Content-Type: media_type`;
/// errors unless the registry answers 201 and, if it sends
/// `Docker-Content-Digest`, names the manifest `digest`.
pub(crate) async fn put_manifest(
    registry_url: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: Bytes,
    digest: &str,
) -> Result<()> {
    let base = registry_url.trim_end_matches('/');
    let url = format!("{base}/v2/{repo}/manifests/{reference}");
    let resp = http_client()
        .put(&url)
        .header("content-type", media_type)
        .body(body)
        .send()
        .await
        .with_context(|| format!("PUT {url}"))?;
    if resp.status() != reqwest::StatusCode::CREATED {
        bail!(
            "PUT {url}: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    if let Some(d) = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
    {
        ensure!(
            d == digest,
            "PUT {url}: Docker-Content-Digest {d}, expected {digest}"
        );
    }
    Ok(())
}

/// A manifest fetched back: exact body, `Content-Type` and `Docker-Content-Digest`.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub body: Bytes,
    pub content_type: Option<String>,
    pub docker_content_digest: Option<String>,
}

/// `GET /v2/<repo>/manifests/<reference>` accepting all manifest media types; errors on non-200.
pub async fn fetch_manifest(
    registry_url: &str,
    repo: &str,
    reference: &str,
) -> Result<FetchedManifest> {
    let base = registry_url.trim_end_matches('/');
    let url = format!("{base}/v2/{repo}/manifests/{reference}");
    let resp = http_client()
        .get(&url)
        .header("accept", ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if !resp.status().is_success() {
        bail!("GET {url}: {}", resp.status());
    }
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header("content-type");
    let docker_content_digest = header("docker-content-digest");
    Ok(FetchedManifest {
        body: resp.bytes().await?,
        content_type,
        docker_content_digest,
    })
}

/// `GET /v2/<repo>/blobs/<digest>` (following redirects); errors on non-200.
pub async fn fetch_blob(registry_url: &str, repo: &str, digest: &str) -> Result<Bytes> {
    let base = registry_url.trim_end_matches('/');
    let url = format!("{base}/v2/{repo}/blobs/{digest}");
    let resp = http_client()
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if !resp.status().is_success() {
        bail!("GET {url}: {}", resp.status());
    }
    Ok(resp.bytes().await?)
}
