//! What is checked before any child of a mirror is written (issue 18): a
//! spec the CRD schema accepts but the cache or the API server would refuse
//! must not stop a working cache (the cache crash-looped on its config;
//! children were half-applied). Pure checks here; the controller runs them,
//! then a server-side dry run of every child, and only then applies.

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::core::Status;

use crate::crd::RegistryMirror;
use crate::resources::{CONFIG_KEY, Children};

/// Whether `q` is a Kubernetes quantity (apimachinery `resource.Quantity`
/// grammar: a signed decimal number, then a binary SI suffix (`Ki`..`Ei`), a
/// decimal SI suffix (`m`, ``, `k`, `M`, `G`, `T`, `P`, `E`) or a decimal
/// exponent (`e3`, `E-2`)).
pub fn is_quantity(q: &str) -> bool {
    let rest = q.strip_prefix(['+', '-']).unwrap_or(q);
    let digits_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(digits_end);
    let valid_number =
        number.matches('.').count() <= 1 && number.chars().any(|c| c.is_ascii_digit());
    if !valid_number {
        return false;
    }
    match suffix {
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            true
        }
        s if s.starts_with(['e', 'E']) => {
            let exp = &s[1..];
            let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            !exp.is_empty() && exp.chars().all(|c| c.is_ascii_digit())
        }
        _ => false,
    }
}

/// The first quantity in `spec.cache.resources` that is not one, as a
/// message naming the field (the API server answers a bad one with a 500 and
/// a decoding error).
fn check_resources(resources: Option<&ResourceRequirements>) -> Result<(), String> {
    let Some(r) = resources else { return Ok(()) };
    for (part, map) in [("limits", &r.limits), ("requests", &r.requests)] {
        for (name, q) in map.iter().flatten() {
            if !is_quantity(&q.0) {
                return Err(format!(
                    "spec.cache.resources.{part}.{name}: {:?} is not a quantity (such as 500m, 512Mi or 2Gi)",
                    q.0
                ));
            }
            if q.0.starts_with('-') {
                return Err(format!(
                    "spec.cache.resources.{part}.{name}: {:?} must not be negative",
                    q.0
                ));
            }
        }
    }
    Ok(())
}

/// Checks `children`, built from `mirror`, before anything is written:
/// `spec.cache.resources` quantities, then the rendered cache configuration
/// through the cache's own parser ([`regmirror_cache::Config::check_file`],
/// as a member named `<statefulset>-0` would read it). `Err` is the message
/// for an `InvalidSpec` condition.
pub fn check(mirror: &RegistryMirror, children: &Children) -> Result<(), String> {
    check_resources(mirror.spec.cache.resources.as_ref())?;
    let text = children
        .config_map
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIG_KEY))
        .map(String::as_str)
        .unwrap_or_default();
    let member = format!(
        "{}-0",
        children
            .stateful_set
            .metadata
            .name
            .as_deref()
            .unwrap_or("cache")
    );
    regmirror_cache::Config::check_file(text, CONFIG_KEY, &member)
        .map(|_| ())
        .map_err(|e| {
            let e = e.to_string();
            let fields: Vec<&str> = RENDERED_FROM
                .iter()
                .filter(|(key, _)| names_key(&e, key) && sets(mirror, key))
                .map(|(_, field)| *field)
                .collect();
            if fields.is_empty() {
                format!("the cache would refuse its configuration: {e}")
            } else {
                format!(
                    "{}: the cache would refuse its configuration: {e}",
                    fields.join(", ")
                )
            }
        })
}

/// Whether `mirror` sets what the configuration key `key` is rendered from
/// (a default it did not write is not the user's to fix).
fn sets(mirror: &RegistryMirror, key: &str) -> bool {
    let spec = &mirror.spec;
    match key {
        "max_size" => spec.cache.max_size.is_some(),
        "max_age" => spec.cache.max_age.is_some(),
        "tag_ttl" => {
            spec.cache.tag_ttl.is_some() || spec.upstreams.iter().any(|u| u.tag_ttl.is_some())
        }
        _ => true,
    }
}

/// Whether `text` names the configuration key `key` as a whole word
/// (`max_size` is not named by `member_max_size`).
fn names_key(text: &str, key: &str) -> bool {
    text.match_indices(key).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + key.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !word(before) && !word(after)
    })
}

/// The mirror fields each cache configuration key is rendered from, so a
/// refusal names what the user wrote.
const RENDERED_FROM: [(&str, &str); 5] = [
    ("member_max_size", "spec.storage.size (90% of it)"),
    ("max_size", "spec.cache.maxSize"),
    ("max_age", "spec.cache.maxAge"),
    ("tag_ttl", "tagTTL"),
    ("upstream", "spec.upstreams"),
];

/// The mirror field a refusal of the child `kind` is about, from the field
/// path the API server names in its message.
fn field_of(kind: &str, message: &str) -> Option<&'static str> {
    [
        ("Service", "nodePort", "spec.cache.nodePort"),
        ("Service", "spec.ports", "spec.cache.port"),
        (
            "StatefulSet",
            "storageClassName",
            "spec.storage.storageClassName",
        ),
        ("StatefulSet", "volumeClaimTemplates", "spec.storage"),
        ("StatefulSet", "resources", "spec.cache.resources"),
        ("StatefulSet", "image", "spec.cache.image"),
    ]
    .into_iter()
    .find(|(k, needle, _)| *k == kind && message.contains(needle))
    .map(|(_, _, field)| field)
}

/// Whether an API answer to a dry run of the child `kind` `name` means the
/// spec is invalid (400 Bad Request, 422 Invalid: the same request for real
/// would fail the same way), and if so the message for `InvalidSpec`,
/// naming the mirror's field when the API's field path tells it. Other
/// answers (403, 409, 5xx, timeouts) are not the spec's fault: `None`.
pub fn refused(kind: &str, name: &str, status: &Status) -> Option<String> {
    if status.code != 400 && status.code != 422 {
        return None;
    }
    let what = format!(
        "the API server refuses the cache's {kind} {name}: {}",
        status.message
    );
    Some(match field_of(kind, &status.message) {
        Some(field) => format!("{field}: {what}"),
        None => what,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    #[test]
    fn quantities_follow_the_apimachinery_grammar() {
        for ok in [
            "1", "0", "100m", "0.5", ".5", "1.", "512Mi", "2Gi", "1e3", "1E-2", "+1k", "-1",
        ] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "lots", "1.2.3", "5Xi", "Mi", "1e", "1 Gi", "1gi", "."] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    fn mirror(spec: serde_json::Value) -> RegistryMirror {
        let mut m = RegistryMirror::new("hub", serde_json::from_value(spec).unwrap());
        m.metadata.uid = Some("uid-hub".into());
        m
    }

    fn check_spec(spec: serde_json::Value) -> Result<(), String> {
        let m = mirror(spec);
        let children = crate::resources::build(&m, &fixtures::settings(), None);
        check(&m, &children)
    }

    #[test]
    fn a_spec_the_cache_accepts_passes() {
        check_spec(serde_json::json!({"upstreams": [{"host": "docker.io"}, {"host": "r.local:5000", "url": "http://10.0.0.1:5000"}],
            "cache": {"maxSize": "10Gi", "maxAge": "30d", "tagTTL": "5m", "replicas": 3}}))
        .unwrap();
    }

    #[test]
    fn what_the_cache_would_refuse_is_refused_with_its_message() {
        for (spec, needle) in [
            (
                serde_json::json!({"upstreams": [{"host": "r.local", "url": "http://:80"}]}),
                "r.local",
            ),
            (
                serde_json::json!({"upstreams": [{"host": "r.local:99999"}]}),
                "r.local:99999",
            ),
            (
                serde_json::json!({"upstreams": [{"host": "docker.io"}], "cache": {"maxSize": "0"}}),
                "max_size",
            ),
            (
                serde_json::json!({"upstreams": [{"host": "docker.io"}], "cache": {"maxSize": "0.5"}}),
                "spec.cache.maxSize: the cache would refuse",
            ),
            (
                serde_json::json!({"upstreams": [{"host": "docker.io"}], "storage": {"size": "1"}}),
                "spec.storage.size (90% of it): the cache would refuse",
            ),
            (
                serde_json::json!({"upstreams": [{"host": "docker.io"}], "cache": {"maxAge": "0s"}}),
                "max_age",
            ),
            (
                serde_json::json!({"upstreams": [{"host": "docker.io", "tagTTL": "99999999999999999999d"}]}),
                "tag_ttl",
            ),
            (
                serde_json::json!({"upstreams": [{"host": "docker.io"}], "storage": {"size": "0"}}),
                "member_max_size",
            ),
            (
                serde_json::json!({"upstreams": [{"host": "docker.io"}], "cache": {"resources": {"limits": {"memory": "lots"}}}}),
                "spec.cache.resources.limits.memory",
            ),
        ] {
            let e = check_spec(spec.clone()).expect_err(&spec.to_string());
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn only_bad_request_and_invalid_mean_an_invalid_spec() {
        let status = |code: u16, message: &str| Status {
            code,
            message: message.into(),
            ..Default::default()
        };
        let port = "Service \"regmirror-hub\" is invalid: spec.ports[0].nodePort: Invalid value: 80: provided port is not in the valid range. The range of valid ports is 30000-32767";
        let m = refused("Service", "regmirror-hub", &status(422, port)).unwrap();
        assert!(
            m.starts_with(
                "spec.cache.nodePort: the API server refuses the cache's Service regmirror-hub: "
            ),
            "{m}"
        );
        assert!(refused("Service", "regmirror-hub", &status(500, port)).is_none());
        assert!(refused("Service", "regmirror-hub", &status(403, "forbidden")).is_none());
        let other = refused("ConfigMap", "regmirror-hub", &status(400, "bad")).unwrap();
        assert_eq!(
            other,
            "the API server refuses the cache's ConfigMap regmirror-hub: bad"
        );
    }
}
