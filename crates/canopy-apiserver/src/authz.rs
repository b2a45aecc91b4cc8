//! Authorization of resource requests, and the scope a request is confined to.
//!
//! Canopy's identities are few and fixed, so the rules are code rather than RBAC objects:
//!
//! - cluster admins (`system:masters`) may do everything;
//! - a tenant's members (group `canopy:tenant:<tenant>`) may do everything inside their
//!   tenant's namespaces except binding pods to nodes, create namespaces (which become theirs),
//!   read their own Tenant and the nodes labelled with their tenant. Lists and watches across
//!   namespaces show them only their tenant's objects: a private-cluster view;
//! - a node agent (`system:node:<node>` in `system:nodes`) may touch only its own Node, its
//!   Lease in `kube-node-lease` and the pods bound to it, read (get, by name) the
//!   ConfigMaps and Secrets those pods reference, ask for service-account tokens bound to
//!   those pods, as upstream's node authorizer and NodeRestriction, and record Events in its
//!   tenant's namespaces (the tenant its credential names);
//! - a service account (a token from `serviceaccounts/token`) may learn the API and nothing
//!   more: upstream grants service accounts nothing by default, and Canopy has no RBAC to
//!   grant them more;
//! - a tenant's proxy (`system:canopy-proxy:<tenant>` in `canopy:proxies`) may only read that
//!   tenant's services, endpoints and endpoint slices.
//!
//! A rule that depends on the object (whose node a pod is bound to, whose namespace an object
//! is in) is a [`Scope`]: selectors every object the request reads or writes must match. The
//! REST layer adds a scope to the selectors of lists and watches and checks it on every object
//! it reads, creates or updates, so a scoped request cannot reach past it by any verb or path.

use canopy_api::{
    ApiError, ApiResult, ResourceDef, Subresource, Target,
    selector::{FieldSelector, LabelSelector},
    tenant::{TENANT_LABEL, tenant_of_group},
};
use serde_json::Value;

use crate::{
    auth::User,
    cache::CachedObject,
    request::{ResourceRequest, Verb},
};

/// Group of node agents, as upstream.
pub const NODES_GROUP: &str = "system:nodes";
/// User name prefix of node agents, as upstream.
pub const NODE_USER_PREFIX: &str = "system:node:";
/// Group of tenant proxies.
pub const PROXIES_GROUP: &str = "canopy:proxies";
/// User name prefix of a tenant's proxy.
pub const PROXY_USER_PREFIX: &str = "system:canopy-proxy:";
/// Namespace of node leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// What kind of principal a user is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// May do everything.
    Admin,
    /// A node agent.
    Node(String),
    /// A tenant's service proxy.
    Proxy(String),
    /// A member of a tenant.
    Member(String),
    /// Authenticated, with no rights on resources.
    Other,
}

impl Principal {
    /// Classifies a user by name and groups.
    pub fn of(user: &User) -> ApiResult<Principal> {
        if user.is_admin() {
            return Ok(Principal::Admin);
        }
        let in_group = |g: &str| user.groups.iter().any(|x| x == g);
        if let Some(node) = user.name.strip_prefix(NODE_USER_PREFIX)
            && in_group(NODES_GROUP)
            && !node.is_empty()
        {
            return Ok(Principal::Node(node.to_string()));
        }
        if let Some(tenant) = user.name.strip_prefix(PROXY_USER_PREFIX)
            && in_group(PROXIES_GROUP)
            && !tenant.is_empty()
        {
            return Ok(Principal::Proxy(tenant.to_string()));
        }
        let mut tenants = user.groups.iter().filter_map(|g| tenant_of_group(g));
        match (tenants.next(), tenants.next()) {
            (Some(tenant), None) => Ok(Principal::Member(tenant.to_string())),
            (Some(_), Some(_)) => Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "forbidden: User {:?} is a member of several tenants; a credential must name one",
                    user.name
                ),
            )),
            (None, _) => Ok(Principal::Other),
        }
    }
}

/// Selectors every object a request touches must match; empty when unrestricted.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Labels the objects must have.
    pub labels: LabelSelector,
    /// Fields the objects must have.
    pub fields: FieldSelector,
}

impl Scope {
    fn label(key: &str, value: &str) -> Scope {
        Scope {
            labels: LabelSelector::exactly(key, value),
            fields: FieldSelector::default(),
        }
    }

    fn field(field: &str, value: &str) -> Scope {
        Scope {
            labels: LabelSelector::default(),
            fields: FieldSelector::exactly(field, value),
        }
    }

    /// Whether the scope restricts anything.
    pub fn is_unrestricted(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    /// Whether a cached object is inside the scope.
    pub fn contains_cached(&self, def: &ResourceDef, obj: &CachedObject) -> bool {
        (self.labels.is_empty() || self.labels.matches(|key| obj.label(key)))
            && (self.fields.is_empty() || self.fields.matches(|f| obj.field(def, f)))
    }

    /// Whether an object is inside the scope.
    pub fn contains(&self, def: &ResourceDef, obj: &Value) -> bool {
        (self.labels.is_empty() || self.labels.matches_object(obj))
            && (self.fields.is_empty()
                || self
                    .fields
                    .matches(|f| canopy_api::kinds::field_value(def, obj, f)))
    }
}

/// What a request may do: who asks, and the scope they are confined to.
#[derive(Clone, Debug)]
pub struct Access {
    /// What kind of principal asks.
    pub principal: Principal,
    /// The requester's scope.
    pub scope: Scope,
    /// A node that may read the object only if one of the pods bound to it references it
    /// (upstream's node authorizer graph); checked by the REST layer, which has the pods.
    pub referenced_by_pods_of: Option<String>,
}

impl Access {
    fn unscoped(principal: Principal) -> Access {
        Access {
            principal,
            scope: Scope::default(),
            referenced_by_pods_of: None,
        }
    }

    /// The tenant the requester is a member of (new namespaces become this tenant's).
    pub fn tenant(&self) -> Option<&str> {
        match &self.principal {
            Principal::Member(tenant) => Some(tenant),
            _ => None,
        }
    }

    /// Whether the requester is a cluster admin.
    pub fn is_admin(&self) -> bool {
        self.principal == Principal::Admin
    }

    /// Checks that an object is inside the requester's scope.
    pub fn check(&self, user: &User, req: &ResourceRequest, obj: &Value) -> ApiResult<()> {
        let inside = self.scope.contains(req.def, obj);
        Self::verdict(user, req, inside, canopy_api::meta::name(obj))
    }

    /// Checks that a cached object is inside the requester's scope.
    pub fn check_cached(
        &self,
        user: &User,
        req: &ResourceRequest,
        obj: &CachedObject,
    ) -> ApiResult<()> {
        let inside = self.scope.contains_cached(req.def, obj);
        Self::verdict(user, req, inside, obj.name())
    }

    fn verdict(user: &User, req: &ResourceRequest, inside: bool, name: &str) -> ApiResult<()> {
        if inside {
            return Ok(());
        }
        Err(denied(
            user,
            req,
            name,
            "the object is outside the user's scope",
        ))
    }
}

/// The owner of a namespace as far as authorization needs: whether it exists and whose it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceOwner {
    /// No such namespace.
    Missing,
    /// A namespace of the platform, no tenant's.
    Platform,
    /// A tenant's namespace.
    Tenant(String),
}

impl NamespaceOwner {
    /// The owner of an existing namespace with this tenant label.
    pub fn from_label(label: Option<&str>) -> NamespaceOwner {
        match label {
            Some(tenant) if !tenant.is_empty() => NamespaceOwner::Tenant(tenant.to_string()),
            _ => NamespaceOwner::Platform,
        }
    }

    /// The tenant, if a tenant owns it.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            NamespaceOwner::Tenant(t) => Some(t),
            _ => None,
        }
    }
}

fn resource_name(req: &ResourceRequest) -> String {
    match req.subresource {
        Some(sub) => format!("{}/{}", req.def.plural, sub.name()),
        None => req.def.plural.to_string(),
    }
}

/// Upstream's 403 for a request, with why.
pub fn denied(user: &User, req: &ResourceRequest, name: &str, why: &str) -> ApiError {
    let resource = resource_name(req);
    let scope = match &req.namespace {
        Some(ns) => format!(" in the namespace {ns:?}"),
        None => " at the cluster scope".to_string(),
    };
    ApiError::forbidden(
        Target {
            group: req.def.group,
            resource: &resource,
            name,
        },
        format!(
            "User {:?} cannot {} resource {:?} in API group {:?}{scope}: {why}",
            user.name,
            req.verb.as_str(),
            resource,
            req.def.group
        ),
    )
}

fn is_read(verb: Verb) -> bool {
    matches!(verb, Verb::Get | Verb::List | Verb::Watch)
}

/// Decides a resource request. `namespace_owner` is the owner of the namespace in the URL
/// (`Missing` when there is none).
pub fn authorize(
    user: &User,
    req: &ResourceRequest,
    namespace_owner: &NamespaceOwner,
) -> ApiResult<Access> {
    if user.is_anonymous() {
        return Err(ApiError::unauthorized());
    }
    let principal = Principal::of(user)?;
    let name = req.name.as_deref().unwrap_or("");
    let deny = |why: &str| Err(denied(user, req, name, why));
    let def = req.def;
    let sub = req.subresource;
    let scoped = |scope: Scope| {
        Ok(Access {
            principal: principal.clone(),
            scope,
            referenced_by_pods_of: None,
        })
    };
    match &principal {
        Principal::Admin => Ok(Access::unscoped(Principal::Admin)),
        Principal::Other => deny("no rule allows it"),
        Principal::Member(tenant) => {
            let scope = Scope::label(TENANT_LABEL, tenant);
            let access = scoped;
            if def.namespaced {
                if sub == Some(Subresource::Binding) {
                    return deny("only the scheduler binds pods to nodes");
                }
                if req.namespace.is_some() && namespace_owner.tenant() != Some(tenant.as_str()) {
                    return deny("the namespace does not belong to the user's tenant");
                }
                return access(scope);
            }
            match (def.group, def.plural) {
                ("", "namespaces") => match (sub, req.verb) {
                    (Some(Subresource::Finalize), _) => {
                        deny("only the namespace controller finalizes namespaces")
                    }
                    (Some(_), v) if !is_read(v) => {
                        deny("namespace status is written by the control plane")
                    }
                    (_, Verb::DeleteCollection) => deny("namespaces are deleted one by one"),
                    _ => access(scope),
                },
                ("", "nodes") if is_read(req.verb) => access(scope),
                ("canopy.io", "tenants") if is_read(req.verb) => {
                    access(Scope::field("metadata.name", tenant))
                }
                _ => deny("tenants may only use their own namespaces, nodes and Tenant"),
            }
        }
        Principal::Node(node) => {
            let own = || {
                let field = if def.plural == "pods" {
                    "spec.nodeName"
                } else {
                    "metadata.name"
                };
                scoped(Scope::field(field, node))
            };
            match (def.group, def.plural, sub, req.verb) {
                ("", "nodes", None | Some(Subresource::Status), v)
                    if !matches!(v, Verb::Delete | Verb::DeleteCollection) =>
                {
                    own()
                }
                ("", "pods", None | Some(Subresource::Status), v)
                    if !matches!(v, Verb::Create | Verb::DeleteCollection) =>
                {
                    own()
                }
                // Events about its pods (the kubelet's), in its tenant's namespaces only.
                ("", "events", None, Verb::Create | Verb::Patch | Verb::Update) => {
                    let tenant = user.groups.iter().find_map(|g| tenant_of_group(g));
                    match tenant {
                        Some(tenant)
                            if req.namespace.is_some()
                                && namespace_owner.tenant() == Some(tenant) =>
                        {
                            scoped(Scope::label(TENANT_LABEL, tenant))
                        }
                        _ => deny("a node records events only in its tenant's namespaces"),
                    }
                }
                // Which pod and service account the token is for is checked when it is
                // issued: a node gets tokens only for the pods bound to it.
                ("", "serviceaccounts", Some(Subresource::Token), Verb::Create) => Ok(Access {
                    principal: principal.clone(),
                    scope: Scope::default(),
                    referenced_by_pods_of: None,
                }),
                ("", "configmaps" | "secrets", None, Verb::Get) => Ok(Access {
                    principal: principal.clone(),
                    scope: Scope::default(),
                    referenced_by_pods_of: Some(node.clone()),
                }),
                ("coordination.k8s.io", "leases", None, v)
                    if v != Verb::DeleteCollection
                        && req.namespace.as_deref() == Some(NODE_LEASE_NAMESPACE) =>
                {
                    own()
                }
                _ => deny(
                    "a node may only use its own Node, its Lease, the pods bound to it and what they reference",
                ),
            }
        }
        Principal::Proxy(tenant) => match (def.group, def.plural, sub) {
            ("", "services" | "endpoints", None) | ("discovery.k8s.io", "endpointslices", None)
                if is_read(req.verb) =>
            {
                scoped(Scope::label(TENANT_LABEL, tenant))
            }
            _ => deny("a proxy may only read its tenant's services and endpoints"),
        },
    }
}

/// Whether a pod references a ConfigMap (`configmaps`) or Secret (`secrets`) by this name:
/// through a volume (also projected), an env or envFrom of any container, or an image pull
/// secret. This is the edge of upstream's node authorizer graph from pod to object.
pub fn pod_references(pod: &Value, plural: &str, name: &str) -> bool {
    let spec = &pod["spec"];
    let is = |v: &Value| v.as_str() == Some(name);
    let (volume_key, volume_name, projected_key, key_ref, from_ref) = match plural {
        "configmaps" => (
            "configMap",
            "name",
            "configMap",
            "configMapKeyRef",
            "configMapRef",
        ),
        "secrets" => (
            "secret",
            "secretName",
            "secret",
            "secretKeyRef",
            "secretRef",
        ),
        _ => return false,
    };
    let items = |v: &Value| v.as_array().cloned().unwrap_or_default();
    if plural == "secrets"
        && items(&spec["imagePullSecrets"])
            .iter()
            .any(|s| is(&s["name"]))
    {
        return true;
    }
    for volume in items(&spec["volumes"]) {
        if is(&volume[volume_key][volume_name]) {
            return true;
        }
        if items(&volume["projected"]["sources"])
            .iter()
            .any(|source| is(&source[projected_key]["name"]))
        {
            return true;
        }
    }
    ["containers", "initContainers", "ephemeralContainers"]
        .iter()
        .flat_map(|list| items(&spec[*list]))
        .any(|container| {
            items(&container["env"])
                .iter()
                .any(|env| is(&env["valueFrom"][key_ref]["name"]))
                || items(&container["envFrom"])
                    .iter()
                    .any(|from| is(&from[from_ref]["name"]))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> User {
        User {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn principals() {
        assert_eq!(
            Principal::of(&user("a", &["system:masters"])).unwrap(),
            Principal::Admin
        );
        assert_eq!(
            Principal::of(&user("system:node:n1", &[NODES_GROUP])).unwrap(),
            Principal::Node("n1".into())
        );
        // The name alone is not enough.
        assert_eq!(
            Principal::of(&user("system:node:n1", &[])).unwrap(),
            Principal::Other
        );
        assert_eq!(
            Principal::of(&user("alice", &["canopy:tenant:t1"])).unwrap(),
            Principal::Member("t1".into())
        );
        assert!(Principal::of(&user("x", &["canopy:tenant:t1", "canopy:tenant:t2"])).is_err());
    }

    #[test]
    fn nodes_record_events_in_their_tenants_namespaces_only() {
        let registry = canopy_api::Registry::builtin();
        let events = registry.get("", "v1", "events").unwrap();
        let request = |verb: Verb| ResourceRequest {
            def: events,
            namespace: Some("shop".into()),
            name: None,
            subresource: None,
            verb,
        };
        let node = user("system:node:n1", &[NODES_GROUP, "canopy:tenant:acme"]);
        let acme = NamespaceOwner::Tenant("acme".into());
        let evil = NamespaceOwner::Tenant("evil".into());
        for verb in [Verb::Create, Verb::Patch, Verb::Update] {
            let access = authorize(&node, &request(verb), &acme).unwrap();
            let event = |tenant: &str| serde_json::json!({"metadata": {"name": "e", "labels": {TENANT_LABEL: tenant}}});
            assert!(access.scope.contains(events, &event("acme")));
            assert!(!access.scope.contains(events, &event("evil")));
            assert!(authorize(&node, &request(verb), &evil).is_err());
            assert!(authorize(&node, &request(verb), &NamespaceOwner::Platform).is_err());
        }
        // Reading events, or recording them without a tenant, is not a node's business.
        assert!(authorize(&node, &request(Verb::List), &acme).is_err());
        assert!(authorize(&node, &request(Verb::Delete), &acme).is_err());
        let tenantless = user("system:node:n1", &[NODES_GROUP]);
        assert!(authorize(&tenantless, &request(Verb::Create), &acme).is_err());
    }

    #[test]
    fn scopes_match_objects() {
        let registry = canopy_api::Registry::builtin();
        let pods = registry.get("", "v1", "pods").unwrap();
        let pod = serde_json::json!({"metadata": {"name": "p", "labels": {TENANT_LABEL: "t1"}}, "spec": {"nodeName": "n1"}});
        assert!(Scope::label(TENANT_LABEL, "t1").contains(pods, &pod));
        assert!(!Scope::label(TENANT_LABEL, "t2").contains(pods, &pod));
        assert!(Scope::field("spec.nodeName", "n1").contains(pods, &pod));
        assert!(!Scope::field("spec.nodeName", "n2").contains(pods, &pod));
        assert!(Scope::default().contains(pods, &pod));
    }

    #[test]
    fn pod_references_follow_every_path() {
        let pod = serde_json::json!({"spec": {
            "imagePullSecrets": [{"name": "pull"}],
            "volumes": [
                {"name": "a", "configMap": {"name": "cm-vol"}},
                {"name": "b", "secret": {"secretName": "s-vol"}},
                {"name": "c", "projected": {"sources": [{"configMap": {"name": "cm-proj"}}, {"secret": {"name": "s-proj"}}]}}
            ],
            "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "s-init"}}]}],
            "containers": [{"name": "c", "env": [
                {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "k"}}},
                {"name": "Y", "valueFrom": {"secretKeyRef": {"name": "s-env", "key": "k"}}}
            ], "envFrom": [{"configMapRef": {"name": "cm-from"}}]}]
        }});
        for name in ["cm-vol", "cm-proj", "cm-env", "cm-from"] {
            assert!(pod_references(&pod, "configmaps", name), "{name}");
            assert!(!pod_references(&pod, "secrets", name), "{name} as a secret");
        }
        for name in ["pull", "s-vol", "s-proj", "s-init", "s-env"] {
            assert!(pod_references(&pod, "secrets", name), "{name}");
            assert!(
                !pod_references(&pod, "configmaps", name),
                "{name} as a configmap"
            );
        }
        assert!(!pod_references(&pod, "secrets", "other"));
        assert!(!pod_references(&pod, "pods", "cm-vol"));
    }
}
