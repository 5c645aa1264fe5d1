//! Upstream credentials: the `credentialsSecret`s of a mirror's upstreams,
//! merged into the one docker `config.json` the cache reads.
//!
//! Referenced Secrets must live in the operator's namespace. Copying a Secret
//! from any namespace would let whoever may create a (cluster-scoped)
//! `RegistryMirror` send any Secret in the cluster to a URL of their choosing
//! (the upstream `url`), and would need cluster-wide Secret read access.
//! Only the entry for each upstream's host is copied, keyed by that host,
//! so one Secret's other registries never reach the cache. There is no
//! fallback to a Secret's only entry: an entry for another registry would be
//! sent to this upstream (a ghcr.io token to quay.io).
//!
//! Only `kubernetes.io/dockerconfigjson` Secrets are accepted: the API server
//! checks their `config.json` when they are written, and the type says what
//! the Secret is for. An `Opaque` Secret is refused with a message saying how
//! to create the right type.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use regmirror_registry::credentials::registry_key;
use serde_json::{Map, Value, json};

use crate::crd::RegistryMirror;

pub use regmirror_registry::credentials::DOCKERCONFIGJSON;

/// The only Secret type accepted as upstream credentials (Kubernetes'
/// `corev1.SecretTypeDockerConfigJson`).
pub const DOCKERCONFIGJSON_TYPE: &str = "kubernetes.io/dockerconfigjson";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "credentialsSecret of {host} is in namespace {namespace}; only the operator's namespace {operator_namespace} is allowed: copy the Secret there"
    )]
    ForeignNamespace {
        host: String,
        namespace: String,
        operator_namespace: String,
    },
    #[error("credentialsSecret {namespace}/{name} of {host} does not exist")]
    Missing {
        host: String,
        namespace: String,
        name: String,
    },
    #[error(
        "credentialsSecret {name} of {host} has no {DOCKERCONFIGJSON} key: create it with `kubectl create secret docker-registry`"
    )]
    NotDockerConfig { host: String, name: String },
    #[error(
        "credentialsSecret {name} of {host} has type {type_}; only {DOCKERCONFIGJSON_TYPE} is accepted: create it with `kubectl create secret docker-registry`"
    )]
    WrongType {
        host: String,
        name: String,
        type_: String,
    },
    #[error("credentialsSecret {name} of {host} is not a docker config.json: {reason}")]
    Invalid {
        host: String,
        name: String,
        reason: String,
    },
    #[error(
        "credentialsSecret {name} has no entry for {host} (it has: {found}); add one keyed by {host}"
    )]
    NoEntry {
        host: String,
        name: String,
        found: String,
    },
}

/// Secrets a mirror refers to, `(namespace, name)`, checking namespaces first.
pub fn referenced_secrets(
    mirror: &RegistryMirror,
    operator_namespace: &str,
) -> Result<Vec<String>, CredentialsError> {
    let mut names = Vec::new();
    for u in &mirror.spec.upstreams {
        let Some(r) = &u.credentials_secret else {
            continue;
        };
        if let Some(ns) = &r.namespace
            && ns != operator_namespace
        {
            return Err(CredentialsError::ForeignNamespace {
                host: u.host.clone(),
                namespace: ns.clone(),
                operator_namespace: operator_namespace.into(),
            });
        }
        if !names.contains(&r.name) {
            names.push(r.name.clone());
        }
    }
    Ok(names)
}

/// Merges the credentials of every upstream into one `config.json`, or `None`
/// when no upstream has credentials. `secrets` holds the referenced Secrets by name
/// (all from the operator's namespace), each of type [`DOCKERCONFIGJSON_TYPE`].
/// An upstream's entry is chosen by [`entry_for`]; without one the error is
/// [`CredentialsError::NoEntry`], naming the key to add.
pub fn merge(
    mirror: &RegistryMirror,
    operator_namespace: &str,
    secrets: &BTreeMap<String, Secret>,
) -> Result<Option<Vec<u8>>, CredentialsError> {
    referenced_secrets(mirror, operator_namespace)?;
    let mut auths = Map::new();
    for u in &mirror.spec.upstreams {
        let Some(r) = &u.credentials_secret else {
            continue;
        };
        let secret = secrets
            .get(&r.name)
            .ok_or_else(|| CredentialsError::Missing {
                host: u.host.clone(),
                namespace: operator_namespace.into(),
                name: r.name.clone(),
            })?;
        // The API server defaults a Secret without a type to Opaque.
        let type_ = secret.type_.as_deref().unwrap_or("Opaque");
        if type_ != DOCKERCONFIGJSON_TYPE {
            return Err(CredentialsError::WrongType {
                host: u.host.clone(),
                name: r.name.clone(),
                type_: type_.to_owned(),
            });
        }
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(DOCKERCONFIGJSON))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(DOCKERCONFIGJSON))
                    .map(|s| s.clone().into_bytes())
            })
            .ok_or_else(|| CredentialsError::NotDockerConfig {
                host: u.host.clone(),
                name: r.name.clone(),
            })?;
        let invalid = |reason: String| CredentialsError::Invalid {
            host: u.host.clone(),
            name: r.name.clone(),
            reason,
        };
        let config: Value = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        let entries = config
            .get("auths")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid("no \"auths\" object".into()))?;
        let entry = entry_for(&u.host, &u.effective_url(), entries)
            .cloned()
            .ok_or_else(|| CredentialsError::NoEntry {
                host: u.host.clone(),
                name: r.name.clone(),
                found: entries.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
        auths.insert(u.host.clone(), entry);
    }
    if auths.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        serde_json::to_vec(&json!({ "auths": auths })).expect("json serializes"),
    ))
}

/// The `auths` entry of `entries` (a docker `config.json`'s `auths` object)
/// meant for the upstream `host` served at `url`: the one whose key names
/// `host`, else the one whose key names the URL's host (where the credentials
/// are sent), keys compared by [`registry_key`] (scheme and path dropped,
/// Docker Hub's aliases are `docker.io`). `None` when no key names either:
/// another registry's entry is never used, even when it is the only one.
pub fn entry_for<'a>(host: &str, url: &str, entries: &'a Map<String, Value>) -> Option<&'a Value> {
    let url_host = registry_key(url);
    entries
        .iter()
        .find(|(k, _)| registry_key(k) == host)
        .or_else(|| entries.iter().find(|(k, _)| registry_key(k) == url_host))
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn mirror(spec: Value) -> RegistryMirror {
        RegistryMirror::new("hub", serde_json::from_value(spec).unwrap())
    }

    fn secret(json: &str) -> Secret {
        Secret {
            type_: Some(DOCKERCONFIGJSON_TYPE.to_owned()),
            data: Some(BTreeMap::from([(
                DOCKERCONFIGJSON.to_owned(),
                ByteString(json.as_bytes().to_vec()),
            )])),
            ..Default::default()
        }
    }

    #[test]
    fn entries_are_picked_per_host_and_rekeyed() {
        let m = mirror(json!({"upstreams": [
            {"host": "docker.io", "credentialsSecret": {"name": "all"}},
            {"host": "ghcr.io", "credentialsSecret": {"name": "all", "namespace": "ops"}},
            {"host": "quay.io", "url": "https://quay-mirror.local", "credentialsSecret": {"name": "single"}},
            {"host": "gcr.io"},
        ]}));
        let secrets = BTreeMap::from([
            (
                "all".to_owned(),
                secret(
                    r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"ghcr.io":{"username":"g","password":"p"},"other.io":{"auth":"eDp5"}}}"#,
                ),
            ),
            (
                "single".to_owned(),
                secret(r#"{"auths":{"quay-mirror.local":{"auth":"cTpx"}}}"#),
            ),
        ]);
        let out = merge(&m, "ops", &secrets).unwrap().unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({"auths": {
                "docker.io": {"auth": "dTpw"},
                "ghcr.io": {"username": "g", "password": "p"},
                "quay.io": {"auth": "cTpx"},
            }})
        );
    }

    #[test]
    fn problems_are_explained() {
        let m = mirror(
            json!({"upstreams": [{"host": "docker.io", "credentialsSecret": {"name": "s", "namespace": "default"}}]}),
        );
        let e = merge(&m, "ops", &BTreeMap::new()).unwrap_err();
        assert!(
            matches!(e, CredentialsError::ForeignNamespace { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("only the operator's namespace ops"));

        let m = mirror(
            json!({"upstreams": [{"host": "docker.io", "credentialsSecret": {"name": "s"}}]}),
        );
        let e = merge(&m, "ops", &BTreeMap::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "credentialsSecret ops/s of docker.io does not exist"
        );

        let two = secret(r#"{"auths":{"a.io":{"auth":"x"},"b.io":{"auth":"y"}}}"#);
        let e = merge(&m, "ops", &BTreeMap::from([("s".to_owned(), two)])).unwrap_err();
        assert!(
            e.to_string()
                .contains("no entry for docker.io (it has: a.io, b.io)"),
            "{e}"
        );

        let bad = secret("{");
        let e = merge(&m, "ops", &BTreeMap::from([("s".to_owned(), bad)])).unwrap_err();
        assert!(matches!(e, CredentialsError::Invalid { .. }));

        let empty = Secret {
            type_: Some(DOCKERCONFIGJSON_TYPE.to_owned()),
            ..Default::default()
        };
        let e = merge(&m, "ops", &BTreeMap::from([("s".to_owned(), empty)])).unwrap_err();
        assert!(matches!(e, CredentialsError::NotDockerConfig { .. }));

        // Opaque (also the API server's default) is refused, saying how to fix it.
        for type_ in [None, Some("Opaque")] {
            let mut opaque = secret(r#"{"auths":{"docker.io":{"auth":"x"}}}"#);
            opaque.type_ = type_.map(str::to_owned);
            let e = merge(&m, "ops", &BTreeMap::from([("s".to_owned(), opaque)])).unwrap_err();
            assert_eq!(
                e.to_string(),
                "credentialsSecret s of docker.io has type Opaque; only kubernetes.io/dockerconfigjson is accepted: create it with `kubectl create secret docker-registry`"
            );
        }

        let none = mirror(json!({"upstreams": [{"host": "docker.io"}]}));
        assert_eq!(merge(&none, "ops", &BTreeMap::new()).unwrap(), None);
    }

    #[test]
    fn another_registrys_only_entry_is_never_used() {
        // The ghcr.io token must not be sent to quay.io (issue 18).
        let m = mirror(
            json!({"upstreams": [{"host": "quay.io", "credentialsSecret": {"name": "ghcr"}}]}),
        );
        let ghcr = secret(r#"{"auths":{"ghcr.io":{"username":"g","password":"ghcr-token"}}}"#);
        let e = merge(&m, "ops", &BTreeMap::from([("ghcr".to_owned(), ghcr)])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "credentialsSecret ghcr has no entry for quay.io (it has: ghcr.io); add one keyed by quay.io"
        );
    }

    #[test]
    fn an_entry_is_found_by_host_url_host_or_docker_hub_alias() {
        let entries = |keys: &[&str]| -> Map<String, Value> {
            keys.iter().map(|k| ((*k).to_owned(), json!(k))).collect()
        };
        let hub = "https://registry-1.docker.io";
        let e = entries(&["https://index.docker.io/v1/"]);
        assert_eq!(
            entry_for("docker.io", hub, &e),
            Some(&json!("https://index.docker.io/v1/"))
        );
        let e = entries(&["mirror.local:5000", "quay.io"]);
        assert_eq!(
            entry_for("quay.io", "http://mirror.local:5000", &e),
            Some(&json!("quay.io"))
        );
        let e = entries(&["mirror.local:5000", "ghcr.io"]);
        assert_eq!(
            entry_for("quay.io", "http://mirror.local:5000", &e),
            Some(&json!("mirror.local:5000"))
        );
        let e = entries(&["ghcr.io"]);
        assert_eq!(entry_for("quay.io", "https://quay.io", &e), None);
        assert_eq!(entry_for("docker.io", hub, &e), None);
        assert_eq!(entry_for("quay.io", "https://quay.io", &Map::new()), None);
    }
}
