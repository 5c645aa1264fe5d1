//! Fake token service and request authorisation.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use super::Auth;

pub(crate) fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Token: `fake.<b64url(scopes joined by ' ')>.<issued_ms>.<expires_ms>.<nonce>`.
pub(crate) fn issue_token(scopes: &[String], expires_in: u64) -> String {
    let now = now_ms();
    format!(
        "fake.{}.{}.{}.{:016x}",
        URL_SAFE_NO_PAD.encode(scopes.join(" ")),
        now,
        now + u128::from(expires_in) * 1000,
        rand::random::<u64>()
    )
}

struct Token {
    scopes: Vec<String>,
    issued_ms: u128,
    expires_ms: u128,
}

fn parse_token(t: &str) -> Option<Token> {
    let mut p = t.split('.');
    if p.next()? != "fake" {
        return None;
    }
    let scopes = String::from_utf8(URL_SAFE_NO_PAD.decode(p.next()?).ok()?).ok()?;
    let issued_ms = p.next()?.parse().ok()?;
    let expires_ms = p.next()?.parse().ok()?;
    Some(Token {
        scopes: scopes
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        issued_ms,
        expires_ms,
    })
}

/// Whether `scopes` grant `action` (`pull`/`push`) on repository `repo`.
fn grants(scopes: &[String], repo: &str, action: &str) -> bool {
    scopes.iter().any(|s| {
        let mut parts = s.splitn(3, ':');
        let (Some(kind), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        kind == "repository" && name == repo && actions.split(',').any(|a| a == action || a == "*")
    })
}

/// `(user, password)` from an `Authorization: Basic ...` value.
pub(crate) fn parse_basic(header: Option<&str>) -> Option<(String, String)> {
    let v = header?
        .strip_prefix("Basic ")
        .or_else(|| header?.strip_prefix("basic "))?;
    let decoded = String::from_utf8(STANDARD.decode(v.trim()).ok()?).ok()?;
    let (u, p) = decoded.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

/// What a request needs: `None` for `/v2/`, else (repo, action).
pub(crate) type Need<'a> = Option<(&'a str, &'a str)>;

/// `Ok(())` if authorised, else the `WWW-Authenticate` value for a 401.
pub(crate) fn check(
    auth: &Auth,
    base_url: &str,
    not_before_ms: u128,
    authorization: Option<&str>,
    need: Need<'_>,
) -> Result<(), String> {
    match auth {
        Auth::None => Ok(()),
        Auth::Basic { username, password } => match parse_basic(authorization) {
            Some((u, p)) if &u == username && &p == password => Ok(()),
            _ => Err("Basic realm=\"regmirror-fake\"".to_owned()),
        },
        Auth::Bearer {
            realm_url, service, ..
        } => {
            let token = authorization
                .and_then(|h| {
                    h.strip_prefix("Bearer ")
                        .or_else(|| h.strip_prefix("bearer "))
                })
                .and_then(|t| parse_token(t.trim()));
            let now = now_ms();
            let ok = token.is_some_and(|t| {
                t.issued_ms >= not_before_ms
                    && t.expires_ms > now
                    && need.is_none_or(|(repo, action)| grants(&t.scopes, repo, action))
            });
            if ok {
                return Ok(());
            }
            let realm = realm_url
                .clone()
                .unwrap_or_else(|| format!("{base_url}/token"));
            let mut challenge = format!("Bearer realm=\"{realm}\",service=\"{service}\"");
            if let Some((repo, action)) = need {
                let actions = if action == "push" {
                    "pull,push"
                } else {
                    "pull"
                };
                challenge.push_str(&format!(",scope=\"repository:{repo}:{actions}\""));
            }
            Err(challenge)
        }
    }
}

/// Checks token-endpoint credentials against the configured bearer auth.
pub(crate) fn token_credentials_ok(auth: &Auth, given: Option<(String, String)>) -> bool {
    match auth {
        Auth::Bearer {
            username: Some(u),
            password: Some(p),
            ..
        } => given.is_some_and(|(gu, gp)| &gu == u && &gp == p),
        Auth::Bearer {
            username: Some(u), ..
        } => given.is_some_and(|(gu, _)| &gu == u),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_scopes() {
        let t = issue_token(&["repository:library/a:pull".into()], 60);
        let auth = Auth::bearer_anonymous();
        let h = format!("Bearer {t}");
        assert!(check(&auth, "http://x", 0, Some(&h), Some(("library/a", "pull"))).is_ok());
        assert!(check(&auth, "http://x", 0, Some(&h), None).is_ok());
        let err = check(&auth, "http://x", 0, Some(&h), Some(("library/b", "pull"))).unwrap_err();
        assert_eq!(
            err,
            "Bearer realm=\"http://x/token\",service=\"fake-registry\",scope=\"repository:library/b:pull\""
        );
        assert!(check(&auth, "http://x", u128::MAX, Some(&h), None).is_err());
    }
}
