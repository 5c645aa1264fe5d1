//! Registry credentials from a docker `config.json`, which is also the format
//! of a `kubernetes.io/dockerconfigjson` Secret mounted as a file.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use regmirror_registry::credentials::registry_key;
use regmirror_registry::docker_hub::canonical_host;

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// Never print a password, even in debug logs.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read credentials file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("credentials file {path} is not a docker config.json: {reason}")]
    Invalid { path: String, reason: String },
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Credentials by canonical registry host.
pub fn parse(json: &[u8]) -> Result<HashMap<String, Credentials>, String> {
    let config: DockerConfig = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for (key, entry) in config.auths {
        let creds = match (entry.auth, entry.username, entry.password) {
            (_, Some(username), Some(password)) => Credentials { username, password },
            (Some(auth), _, _) => {
                let decoded = STANDARD
                    .decode(auth.trim())
                    .map_err(|_| format!("auth for {key:?} is not base64"))?;
                let decoded = String::from_utf8(decoded)
                    .map_err(|_| format!("auth for {key:?} is not UTF-8"))?;
                let (u, p) = decoded
                    .split_once(':')
                    .ok_or_else(|| format!("auth for {key:?} is not user:password"))?;
                Credentials {
                    username: u.to_owned(),
                    password: p.to_owned(),
                }
            }
            _ => continue,
        };
        out.insert(registry_key(&key), creds);
    }
    Ok(out)
}

/// Reads the file afresh each time: a mounted Secret changes under us.
pub fn load(path: &Path, host: &str) -> Result<Option<Credentials>, CredentialsError> {
    let bytes = std::fs::read(path).map_err(|source| CredentialsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut all = parse(&bytes).map_err(|reason| CredentialsError::Invalid {
        path: path.display().to_string(),
        reason,
    })?;
    Ok(all.remove(&canonical_host(host)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_auth_and_username_password_entries() {
        let json = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},
            "ghcr.io":{"username":"me","password":"tok"},
            "quay.io":{}
        }}"#;
        let c = parse(json).unwrap();
        assert_eq!(c["docker.io"].username, "user");
        assert_eq!(c["docker.io"].password, "pa:ss");
        assert_eq!(c["ghcr.io"].password, "tok");
        assert!(!c.contains_key("quay.io"));
    }

    #[test]
    fn rejects_bad_files_with_reasons() {
        assert!(parse(b"nope").is_err());
        let e = parse(br#"{"auths":{"x.io":{"auth":"!!"}}}"#).unwrap_err();
        assert!(e.contains("base64"), "{e}");
    }

    #[test]
    fn debug_redacts_password() {
        let c = Credentials {
            username: "u".into(),
            password: "secret".into(),
        };
        assert!(!format!("{c:?}").contains("secret"));
    }
}
