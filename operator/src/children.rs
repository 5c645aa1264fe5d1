//! The kinds of object a mirror owns, listed once. The controller watches,
//! applies, prunes and deletes children by walking [`ChildKind::ALL`], so a
//! new kind is added here (and built in [`crate::resources::build`]) and
//! nowhere else.
//!
//! Pruning follows Stackable operator-rs's
//! `ClusterResources::delete_orphaned_resources`: list every kind by the
//! mirror's labels and delete what the mirror owns but no longer wants.

use k8s_openapi::Resource as _;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::core::ApiResource;
use serde_json::Value;

use crate::resources::{self, Children};

/// One kind of child of a `RegistryMirror`. Every child lives in the
/// operator's namespace. Two kinds may share an API resource (the two
/// Services); [`ChildKind::resources`] lists each resource once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChildKind {
    /// The cache configuration file.
    ConfigMap,
    /// The merged upstream credentials (only when an upstream has some).
    Secret,
    /// The cache members' identity (discovery reads EndpointSlices as it).
    ServiceAccount,
    /// What that identity may do: watch EndpointSlices, nothing else.
    Role,
    /// Grants the Role to the ServiceAccount.
    RoleBinding,
    /// The headless Service listing the ready cache members.
    MembersService,
    /// The cache members.
    StatefulSet,
    /// The cache's NodePort.
    Service,
}

impl ChildKind {
    /// Every kind, in apply order: what a child refers to is applied before
    /// it (the cache StatefulSet mounts the ConfigMap and the credentials
    /// Secret, runs as the ServiceAccount, names the members Service). The
    /// node agents are no child: the chart installs one DaemonSet for all
    /// mirrors (issue 17).
    pub const ALL: [Self; 8] = [
        Self::ConfigMap,
        Self::Secret,
        Self::ServiceAccount,
        Self::Role,
        Self::RoleBinding,
        Self::MembersService,
        Self::StatefulSet,
        Self::Service,
    ];

    /// The kinds of [`Self::ALL`] with a distinct API resource, one each:
    /// what is watched and listed for pruning (once per resource).
    pub fn resources() -> impl Iterator<Item = Self> {
        Self::ALL
            .into_iter()
            .enumerate()
            .filter(|(i, k)| !Self::ALL[..*i].iter().any(|o| o.as_str() == k.as_str()))
            .map(|(_, k)| k)
    }

    /// The kind as the API spells it (`"StatefulSet"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConfigMap => ConfigMap::KIND,
            Self::Secret => Secret::KIND,
            Self::ServiceAccount => ServiceAccount::KIND,
            Self::Role => Role::KIND,
            Self::RoleBinding => RoleBinding::KIND,
            Self::MembersService | Self::Service => Service::KIND,
            Self::StatefulSet => StatefulSet::KIND,
        }
    }

    /// Group, version and plural of the kind, for an `Api<DynamicObject>`.
    pub fn api_resource(self) -> ApiResource {
        match self {
            Self::ConfigMap => ApiResource::erase::<ConfigMap>(&()),
            Self::Secret => ApiResource::erase::<Secret>(&()),
            Self::ServiceAccount => ApiResource::erase::<ServiceAccount>(&()),
            Self::Role => ApiResource::erase::<Role>(&()),
            Self::RoleBinding => ApiResource::erase::<RoleBinding>(&()),
            Self::MembersService | Self::Service => ApiResource::erase::<Service>(&()),
            Self::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
        }
    }

    /// Name of the child of this kind of the mirror named `mirror` (see
    /// [`resources::child_name`]).
    pub fn child_name(self, mirror: &str) -> String {
        match self {
            Self::ConfigMap => resources::config_map_name(mirror),
            Self::Secret => resources::credentials_name(mirror),
            Self::ServiceAccount | Self::Role | Self::RoleBinding => {
                resources::cache_account_name(mirror)
            }
            Self::MembersService => resources::members_service_name(mirror),
            Self::StatefulSet => resources::stateful_set_name(mirror),
            Self::Service => resources::service_name(mirror),
        }
    }

    /// Every kind in the order the finalizer deletes them: the cache's
    /// StatefulSet (with its claims) and Services before what its pods use.
    pub fn deletion_order() -> [Self; 8] {
        let mut kinds = Self::ALL;
        // Stable: kinds of one stage keep their apply order.
        kinds.sort_by_key(|k| match k {
            Self::StatefulSet => 0,
            Self::MembersService | Self::Service => 1,
            Self::ConfigMap
            | Self::Secret
            | Self::ServiceAccount
            | Self::Role
            | Self::RoleBinding => 2,
        });
        kinds
    }
}

impl Children {
    /// The built child of `kind` as JSON (with `apiVersion` and `kind`), ready
    /// for a server-side apply; `None` when the mirror has no child of that
    /// kind (the credentials Secret when no upstream has credentials).
    pub fn object(&self, kind: ChildKind) -> Option<Value> {
        let value = match kind {
            ChildKind::ConfigMap => serde_json::to_value(&self.config_map),
            ChildKind::Secret => serde_json::to_value(self.credentials.as_ref()?),
            ChildKind::ServiceAccount => serde_json::to_value(&self.service_account),
            ChildKind::Role => serde_json::to_value(&self.role),
            ChildKind::RoleBinding => serde_json::to_value(&self.role_binding),
            ChildKind::MembersService => serde_json::to_value(&self.members_service),
            ChildKind::StatefulSet => serde_json::to_value(&self.stateful_set),
            ChildKind::Service => serde_json::to_value(&self.service),
        };
        Some(value.expect("Kubernetes objects serialize"))
    }

    /// `(kind, name)` of every child the mirror wants, in apply order: what
    /// pruning keeps.
    pub fn wanted(&self) -> Vec<(ChildKind, String)> {
        ChildKind::ALL
            .into_iter()
            .filter_map(|kind| {
                let object = self.object(kind)?;
                Some((kind, object["metadata"]["name"].as_str()?.to_owned()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn children(credentials: Option<&[u8]>) -> Children {
        resources::build(&fixtures::mirror(true), &fixtures::settings(), credentials)
    }

    /// The chart's Role grants, for each kind, what watching, applying and
    /// pruning it takes: a kind added to [`ChildKind::ALL`] without its RBAC
    /// rule fails here, not on a live cluster.
    #[test]
    fn the_charts_role_covers_every_child_kind() {
        let rbac = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/regmirror/templates/rbac.yaml"
        ))
        .expect("chart RBAC template");
        let lines: Vec<&str> = rbac.lines().map(str::trim).collect();
        for kind in ChildKind::ALL {
            let ar = kind.api_resource();
            let plural = format!("\"{}\"", ar.plural);
            let group = format!("\"{}\"", ar.group);
            let rule = lines.iter().enumerate().find(|(i, l)| {
                l.starts_with("resources:")
                    && l.contains(&plural)
                    && *i > 0
                    && lines[i - 1].starts_with("- apiGroups:")
                    && lines[i - 1].contains(&group)
            });
            let (i, _) = rule.unwrap_or_else(|| panic!("no RBAC rule for {}", ar.plural));
            let verbs = lines.get(i + 1).copied().unwrap_or_default();
            for verb in ["list", "watch", "create", "patch", "delete"] {
                assert!(
                    verbs.starts_with("verbs:") && verbs.contains(&format!("\"{verb}\"")),
                    "the chart's Role lacks {verb} on {}: {verbs}",
                    ar.plural
                );
            }
        }
    }

    #[test]
    fn every_built_child_is_of_its_kind_and_named_by_it() {
        let c = children(Some(b"{}"));
        for kind in ChildKind::ALL {
            let o = c.object(kind).expect("every kind built with credentials");
            let ar = kind.api_resource();
            assert_eq!(o["kind"], kind.as_str());
            assert_eq!(o["kind"], ar.kind.as_str());
            assert_eq!(o["apiVersion"], ar.api_version.as_str());
            assert_eq!(o["metadata"]["name"], kind.child_name("hub").as_str());
        }
        assert_eq!(c.wanted().len(), ChildKind::ALL.len());
    }

    #[test]
    fn without_credentials_no_secret_is_wanted() {
        let c = children(None);
        assert_eq!(c.object(ChildKind::Secret), None);
        assert_eq!(
            c.wanted(),
            [
                (ChildKind::ConfigMap, "regmirror-hub".to_owned()),
                (ChildKind::ServiceAccount, "regmirror-hub-cache".into()),
                (ChildKind::Role, "regmirror-hub-cache".into()),
                (ChildKind::RoleBinding, "regmirror-hub-cache".into()),
                (ChildKind::MembersService, "regmirror-hub-members".into()),
                (ChildKind::StatefulSet, "regmirror-hub".into()),
                (ChildKind::Service, "regmirror-hub".into()),
            ]
        );
    }

    #[test]
    fn deletion_takes_the_cache_first() {
        assert_eq!(
            ChildKind::deletion_order(),
            [
                ChildKind::StatefulSet,
                ChildKind::MembersService,
                ChildKind::Service,
                ChildKind::ConfigMap,
                ChildKind::Secret,
                ChildKind::ServiceAccount,
                ChildKind::Role,
                ChildKind::RoleBinding,
            ]
        );
    }

    #[test]
    fn each_api_resource_is_watched_and_pruned_once() {
        let kinds: Vec<ChildKind> = ChildKind::resources().collect();
        assert_eq!(kinds.len(), ChildKind::ALL.len() - 1);
        assert!(kinds.contains(&ChildKind::MembersService));
        assert!(!kinds.contains(&ChildKind::Service), "shares Services");
    }
}
