//! What a client gets for one registry request, and when the answer a client
//! gets through the cache is the one it gets from the upstream directly: the
//! rules of the differential test (`tests/tests/fidelity.rs`).
//!
//! [`fetch`] asks like a registry client: with the client's `Accept` header
//! lines, following redirects, answering a bearer challenge anonymously
//! (the token service may answer `token` or `access_token`).
//! [`differences`] compares two answers: status, `Docker-Content-Digest`,
//! `Content-Type`, `Content-Length` and body.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::Method;
use serde_json::Value;

use crate::seed::schema1_payload;
use crate::util::{sha256_digest, sha512_digest};

/// Bound on one request (headers and body), for every request [`fetch`] makes.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One answer: the status, the headers the differential test compares and
/// the body (empty for HEAD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// `Docker-Content-Digest`.
    pub digest: Option<String>,
    /// `Content-Type`, as sent.
    pub content_type: Option<String>,
    /// `Content-Length` in bytes; `None` for a chunked body.
    pub content_length: Option<u64>,
    /// `Link`, for listings.
    pub link: Option<String>,
    pub body: Bytes,
}

/// A client for [`fetch`]: loopback only, redirects followed, bounded.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("build reqwest client")
}

/// `method url`, with one `Accept` header line per item of `accept`,
/// answering one bearer challenge with an anonymous token. Errors only when
/// no answer arrives (connection failure, timeout, broken body).
pub async fn fetch(
    client: &reqwest::Client,
    method: Method,
    url: &str,
    accept: &[&str],
) -> Result<Answer> {
    let send = |token: Option<String>| {
        let mut req = client.request(method.clone(), url);
        for a in accept {
            req = req.header(http::header::ACCEPT, *a);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let mut resp = send(None)
        .await
        .with_context(|| format!("{method} {url}"))?;
    if resp.status() == 401 {
        let challenge = resp
            .headers()
            .get(http::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(token) = anonymous_token(client, challenge.as_deref()).await? {
            resp = send(Some(token))
                .await
                .with_context(|| format!("{method} {url} with a token"))?;
        }
    }
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (digest, content_type, link) = (
        header("docker-content-digest"),
        header("content-type"),
        header("link"),
    );
    let content_length = header("content-length").and_then(|l| l.parse().ok());
    let status = resp.status().as_u16();
    let body = resp
        .bytes()
        .await
        .with_context(|| format!("body of {method} {url}"))?;
    Ok(Answer {
        status,
        digest,
        content_type,
        content_length,
        link,
        body,
    })
}

/// Every page of a listing (`tags/list`, `referrers`), GETting `first`
/// on `base` (`http://host:port`) and following each `Link: <...>;
/// rel="next"` (relative to `base`, or absolute), at most 10 pages.
pub async fn fetch_pages(
    client: &reqwest::Client,
    base: &str,
    first: &str,
    accept: &[&str],
) -> Result<Vec<Answer>> {
    let mut url = format!("{base}{first}");
    let mut out = Vec::new();
    for _ in 0..10 {
        let a = fetch(client, Method::GET, &url, accept).await?;
        let next = a
            .link
            .as_deref()
            .and_then(|l| Some(l.split_once('<')?.1.split_once('>')?.0.to_owned()));
        out.push(a);
        match next {
            Some(t) if t.starts_with('/') => url = format!("{base}{t}"),
            Some(t) => url = t,
            None => break,
        }
    }
    Ok(out)
}

/// A token for `challenge` (`Bearer realm=..,service=..,scope=..`) from its
/// realm, read from `token` or `access_token`; `None` for other challenges.
async fn anonymous_token(
    client: &reqwest::Client,
    challenge: Option<&str>,
) -> Result<Option<String>> {
    let Some(params) = challenge.and_then(|c| c.strip_prefix("Bearer ")) else {
        return Ok(None);
    };
    let param = |name: &str| {
        params.split(',').find_map(|p| {
            let (k, v) = p.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"').to_owned())
        })
    };
    let Some(realm) = param("realm") else {
        return Ok(None);
    };
    let query: Vec<(&str, String)> = [("service", param("service")), ("scope", param("scope"))]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect();
    let url = reqwest::Url::parse_with_params(&realm, &query)
        .with_context(|| format!("token realm {realm}"))?;
    let bytes = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("token from {realm}"))?
        .bytes()
        .await
        .with_context(|| format!("token response from {realm}"))?;
    let body: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    Ok(body["token"]
        .as_str()
        .or_else(|| body["access_token"].as_str())
        .map(str::to_owned))
}

/// How a row's bodies are compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRule {
    /// Byte for byte.
    Bytes,
    /// Signed schema1 manifests: the same payload (the manifest without its
    /// signatures, which distribution makes afresh for every response).
    Schema1Payload,
    /// A tag list: the same tags and fields, `name` being the repository as
    /// the client named it (which the cache's answer must say).
    TagList { name: String },
}

/// How a row's `Content-Type`s are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeRule {
    /// The same media type (parameters aside).
    Same,
    /// The cache names the media type the manifest declares in its body,
    /// where the upstream said only `application/json`.
    Declared,
}

/// Where the answer through the cache (`cached`) differs from the upstream's
/// `direct` GET answer, in words; empty when it does not. For a HEAD through
/// the cache (`head`) the headers are compared with the direct GET's, as
/// HTTP defines HEAD, and there is no body.
///
/// The rules: the statuses are equal. An error (4xx, 5xx) matches when its
/// OCI error codes do (messages are free). A success matches when:
/// - `Docker-Content-Digest` is the upstream's, or names the same bytes by
///   another algorithm or, for schema1, by its payload; a cache may add one
///   the upstream left out, if it names the body;
/// - `Content-Type` follows `types`;
/// - `Content-Length` is the upstream's; where the upstream sent the body
///   chunked, or the body rule lets the bytes differ, a length is allowed if
///   it is the body's;
/// - the bodies match by `body`.
pub fn differences(
    direct: &Answer,
    cached: &Answer,
    head: bool,
    body: &BodyRule,
    types: TypeRule,
) -> Vec<String> {
    let mut out = Vec::new();
    if direct.status != cached.status {
        out.push(format!(
            "status {} (upstream {})",
            cached.status, direct.status
        ));
        return out;
    }
    if direct.status >= 400 {
        let (d, c) = (error_codes(&direct.body), error_codes(&cached.body));
        if !head && d.is_some() && c.is_some() && d != c {
            out.push(format!("error codes {c:?} (upstream {d:?})"));
        }
        return out;
    }
    let reference = &direct.body;
    match (&direct.digest, &cached.digest) {
        (None, None) => {}
        (Some(d), None) => out.push(format!("no Docker-Content-Digest (upstream {d})")),
        (Some(d), Some(c)) if d == c => {}
        (_, Some(c)) if names(c, reference) => {}
        (d, Some(c)) => out.push(format!(
            "Docker-Content-Digest {c} (upstream {}) does not name the content",
            d.as_deref().unwrap_or("none")
        )),
    }
    let want_type = match types {
        TypeRule::Same => direct.content_type.as_deref().map(media_type),
        TypeRule::Declared => declared_media_type(reference),
    };
    let got_type = cached.content_type.as_deref().map(media_type);
    if want_type != got_type {
        out.push(format!(
            "Content-Type {} (expected {})",
            shown(got_type.as_ref()),
            shown(want_type.as_ref())
        ));
    }
    let own_length = (!head).then_some(cached.body.len() as u64);
    let length_ok = match (direct.content_length, cached.content_length) {
        _ if *body != BodyRule::Bytes => cached
            .content_length
            .is_none_or(|l| own_length.is_none_or(|o| o == l)),
        (Some(d), Some(c)) => d == c,
        (Some(_), None) => false,
        (None, c) => c.is_none_or(|c| c == reference.len() as u64),
    };
    if !length_ok {
        out.push(format!(
            "Content-Length {} (upstream {}, body {} bytes)",
            shown(cached.content_length.as_ref()),
            shown(direct.content_length.as_ref()),
            reference.len()
        ));
    }
    if !head && let Some(d) = body_difference(reference, &cached.body, body) {
        out.push(d);
    }
    out
}

/// A header's value in a message: the value, or `none`.
fn shown(value: Option<&impl std::fmt::Display>) -> String {
    value.map_or_else(|| "none".to_owned(), ToString::to_string)
}

/// Whether `digest` names `content`: its sha256 or sha512, or for a signed
/// schema1 manifest the sha256 of its payload.
pub fn names(digest: &str, content: &[u8]) -> bool {
    digest == sha256_digest(content)
        || digest == sha512_digest(content)
        || schema1_payload(content).is_some_and(|p| digest == sha256_digest(&p))
}

/// The media type of a `Content-Type` value, without parameters, lowercase.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The `mediaType` a manifest declares in its body.
fn declared_media_type(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v["mediaType"].as_str().map(str::to_owned)
}

/// The `errors[].code`s of an OCI error body, sorted; `None` if it is not one.
fn error_codes(body: &[u8]) -> Option<Vec<String>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let mut codes: Vec<String> = v["errors"]
        .as_array()?
        .iter()
        .filter_map(|e| e["code"].as_str().map(str::to_owned))
        .collect();
    codes.sort();
    Some(codes)
}

/// How `cached` differs from `direct` by `rule`, if it does.
fn body_difference(direct: &[u8], cached: &[u8], rule: &BodyRule) -> Option<String> {
    match rule {
        BodyRule::Bytes => (direct != cached).then(|| {
            format!(
                "body {} bytes {} (upstream {} bytes {})",
                cached.len(),
                sha256_digest(cached),
                direct.len(),
                sha256_digest(direct)
            )
        }),
        BodyRule::Schema1Payload => {
            let (d, c) = (schema1_payload(direct), schema1_payload(cached));
            match (d, c) {
                (Some(d), Some(c)) if d == c => None,
                (_, None) => Some("body is not a signed schema1 manifest".into()),
                _ => Some("schema1 payload differs from the upstream's".into()),
            }
        }
        BodyRule::TagList { name } => {
            let (Ok(mut d), Ok(c)) = (
                serde_json::from_slice::<Value>(direct),
                serde_json::from_slice::<Value>(cached),
            ) else {
                return Some("tag list is not JSON".into());
            };
            d["name"] = Value::String(name.clone());
            (d != c).then(|| format!("tag list {c} (expected {d})"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &'static [u8], digest: Option<&str>, len: Option<u64>) -> Answer {
        Answer {
            status: 200,
            digest: digest.map(str::to_owned),
            content_type: Some("application/vnd.oci.image.manifest.v1+json".into()),
            content_length: len,
            link: None,
            body: Bytes::from_static(body),
        }
    }

    #[test]
    fn equal_answers_match_and_any_header_difference_shows() {
        let body = br#"{"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
        let d = sha256_digest(body);
        let direct = ok(body, Some(&d), Some(body.len() as u64));
        let same =
            |a: &Answer, head| differences(&direct, a, head, &BodyRule::Bytes, TypeRule::Same);
        assert!(same(&direct, false).is_empty());
        let mut head = direct.clone();
        head.body = Bytes::new();
        assert!(same(&head, true).is_empty());
        assert!(!same(&head, false).is_empty(), "a GET needs the body");

        let mut other = direct.clone();
        other.digest = Some(sha256_digest(b"other"));
        assert_eq!(same(&other, false).len(), 1);
        other = direct.clone();
        other.content_type = Some("application/json".into());
        assert_eq!(same(&other, false).len(), 1);
        other = direct.clone();
        other.content_length = None;
        assert_eq!(same(&other, false).len(), 1);
        other = direct.clone();
        other.status = 503;
        assert_eq!(same(&other, false), ["status 503 (upstream 200)"]);
    }

    #[test]
    fn a_cache_may_add_what_names_the_content() {
        let body = b"blob";
        // Chunked and without a digest upstream (object storage).
        let direct = ok(body, None, None);
        let cached = ok(body, Some(&sha512_digest(body)), Some(4));
        assert!(differences(&direct, &cached, false, &BodyRule::Bytes, TypeRule::Same).is_empty());
        let wrong = ok(body, Some(&sha256_digest(b"x")), Some(5));
        assert_eq!(
            differences(&direct, &wrong, false, &BodyRule::Bytes, TypeRule::Same).len(),
            2
        );
    }

    #[test]
    fn errors_match_by_status_and_code() {
        let e = |status, body: &'static [u8]| Answer {
            status,
            digest: None,
            content_type: Some("application/json".into()),
            content_length: None,
            link: None,
            body: Bytes::from_static(body),
        };
        let direct = e(
            404,
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"a"}]}"#,
        );
        let cached = e(
            404,
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"b"}]}"#,
        );
        let other = e(
            404,
            br#"{"errors":[{"code":"NAME_UNKNOWN","message":"a"}]}"#,
        );
        let cmp = |c: &Answer| differences(&direct, c, false, &BodyRule::Bytes, TypeRule::Same);
        assert!(cmp(&cached).is_empty());
        assert_eq!(cmp(&other).len(), 1);
    }

    #[test]
    fn tag_lists_carry_the_name_the_client_used() {
        let direct = ok(br#"{"name":"org/tool","tags":["a"]}"#, None, Some(32));
        let named = ok(
            br#"{"name":"ghcr.io/org/tool","tags":["a"]}"#,
            None,
            Some(40),
        );
        let rule = BodyRule::TagList {
            name: "ghcr.io/org/tool".into(),
        };
        assert!(differences(&direct, &named, false, &rule, TypeRule::Same).is_empty());
        assert_eq!(
            differences(&direct, &direct, false, &rule, TypeRule::Same).len(),
            1
        );
    }

    #[test]
    fn declared_types_come_from_the_body() {
        let body = br#"{"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
        let mut direct = ok(body, None, None);
        direct.content_type = Some("application/json".into());
        let cached = ok(body, None, None);
        assert!(
            differences(
                &direct,
                &cached,
                false,
                &BodyRule::Bytes,
                TypeRule::Declared
            )
            .is_empty()
        );
        assert_eq!(
            differences(&direct, &cached, false, &BodyRule::Bytes, TypeRule::Same).len(),
            1
        );
    }
}
