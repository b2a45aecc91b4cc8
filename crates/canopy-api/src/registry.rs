//! The served resources, described as data. The REST layer is generic: everything it knows
//! about a kind comes from its [`ResourceDef`] and the per-kind hooks in [`crate::kinds`].

use std::collections::HashMap;

use crate::schema::{SchemaCollector, Schemas};

/// A subresource a kind serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subresource {
    /// `/status`: updates only `.status`.
    Status,
    /// `/scale`: an `autoscaling/v1` Scale view of `.spec.replicas`.
    Scale,
    /// `pods/binding`: assigns a node.
    Binding,
    /// `pods/log`: container logs, served by the node.
    Log,
    /// `namespaces/finalize`: updates `.spec.finalizers`.
    Finalize,
    /// `pods/exec`: a command in a container, streamed (connect).
    Exec,
    /// `pods/attach`: the streams of a container's main process (connect).
    Attach,
    /// `pods/portforward`: TCP to a pod's ports (connect).
    PortForward,
    /// `serviceaccounts/token`: issues a token (TokenRequest).
    Token,
}

impl Subresource {
    /// The URL segment.
    pub fn name(self) -> &'static str {
        match self {
            Subresource::Status => "status",
            Subresource::Scale => "scale",
            Subresource::Binding => "binding",
            Subresource::Log => "log",
            Subresource::Finalize => "finalize",
            Subresource::Exec => "exec",
            Subresource::Attach => "attach",
            Subresource::PortForward => "portforward",
            Subresource::Token => "token",
        }
    }

    /// Whether the subresource upgrades the connection to a stream (upstream's connect
    /// verbs), so that POST on it does not create anything.
    pub fn is_stream(self) -> bool {
        matches!(
            self,
            Subresource::Exec | Subresource::Attach | Subresource::PortForward
        )
    }
}

/// Everything the generic REST layer needs to know about one resource.
#[derive(Debug)]
pub struct ResourceDef {
    /// API group ("" for core).
    pub group: &'static str,
    /// Version.
    pub version: &'static str,
    /// Kind, e.g. `Pod`.
    pub kind: &'static str,
    /// Plural resource name, e.g. `pods`.
    pub plural: &'static str,
    /// Singular resource name, e.g. `pod`.
    pub singular: &'static str,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// kubectl short names.
    pub short_names: &'static [&'static str],
    /// kubectl categories (`all`).
    pub categories: &'static [&'static str],
    /// The schema definition of the kind.
    pub definition: &'static str,
    /// Subresources served.
    pub subresources: &'static [Subresource],
    /// Field selector labels beyond `metadata.name` and `metadata.namespace`.
    pub field_selectors: &'static [&'static str],
    /// Has a status that the main resource does not write (only `/status` does).
    pub status: bool,
    /// `metadata.generation` starts at 1 and grows with every change of `.spec`.
    pub generation: bool,
    /// Segment under `/registry/` in the store.
    pub storage: &'static str,
}

impl ResourceDef {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `PodList`.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Whether it serves a subresource.
    pub fn has(&self, sub: Subresource) -> bool {
        self.subresources.contains(&sub)
    }

    /// `/registry/pods/`.
    pub fn key_prefix(&self) -> String {
        format!("/registry/{}/", self.storage)
    }

    /// `/registry/pods/<ns>/` (or the whole prefix for cluster scope or all namespaces).
    pub fn namespace_prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("/registry/{}/{ns}/", self.storage),
            _ => self.key_prefix(),
        }
    }

    /// The store key of an object.
    pub fn key(&self, namespace: &str, name: &str) -> String {
        if self.namespaced {
            format!("/registry/{}/{namespace}/{name}", self.storage)
        } else {
            format!("/registry/{}/{name}", self.storage)
        }
    }

    /// The resource with its group, as upstream names it in messages: `deployments.apps`.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

use Subresource::*;

const ALL: &[&str] = &["all"];

/// The built-in resources.
pub static BUILTIN: &[ResourceDef] = &[
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        namespaced: false,
        short_names: &["ns"],
        categories: &[],
        definition: "io.k8s.api.core.v1.Namespace",
        subresources: &[Status, Finalize],
        field_selectors: &["status.phase"],
        status: true,
        generation: false,
        storage: "namespaces",
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        singular: "pod",
        namespaced: true,
        short_names: &["po"],
        categories: ALL,
        definition: "io.k8s.api.core.v1.Pod",
        subresources: &[Status, Binding, Log, Exec, Attach, PortForward],
        field_selectors: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.podIPs",
            "status.nominatedNodeName",
        ],
        status: true,
        generation: true,
        storage: "pods",
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        singular: "node",
        namespaced: false,
        short_names: &["no"],
        categories: &[],
        definition: "io.k8s.api.core.v1.Node",
        subresources: &[Status],
        field_selectors: &["spec.unschedulable"],
        status: true,
        generation: false,
        storage: "nodes",
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        singular: "service",
        namespaced: true,
        short_names: &["svc"],
        categories: ALL,
        definition: "io.k8s.api.core.v1.Service",
        subresources: &[Status],
        field_selectors: &["spec.clusterIP", "spec.type"],
        status: true,
        generation: false,
        storage: "services",
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Endpoints",
        plural: "endpoints",
        singular: "endpoints",
        namespaced: true,
        short_names: &["ep"],
        categories: &[],
        definition: "io.k8s.api.core.v1.Endpoints",
        subresources: &[],
        field_selectors: &[],
        status: false,
        generation: false,
        storage: "endpoints",
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        singular: "configmap",
        namespaced: true,
        short_names: &["cm"],
        categories: &[],
        definition: "io.k8s.api.core.v1.ConfigMap",
        subresources: &[],
        field_selectors: &[],
        status: false,
        generation: false,
        storage: "configmaps",
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Secret",
        plural: "secrets",
        singular: "secret",
        namespaced: true,
        short_names: &[],
        categories: &[],
        definition: "io.k8s.api.core.v1.Secret",
        subresources: &[],
        field_selectors: &["type"],
        status: false,
        generation: false,
        storage: "secrets",
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        namespaced: true,
        short_names: &["sa"],
        categories: &[],
        definition: "io.k8s.api.core.v1.ServiceAccount",
        subresources: &[Subresource::Token],
        field_selectors: &[],
        status: false,
        generation: false,
        storage: "serviceaccounts",
    },
    ResourceDef {
        group: "",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        namespaced: true,
        short_names: &["ev"],
        categories: &[],
        definition: "io.k8s.api.core.v1.Event",
        subresources: &[],
        field_selectors: &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        status: false,
        generation: false,
        storage: "events",
    },
    ResourceDef {
        group: "apps",
        version: "v1",
        kind: "Deployment",
        plural: "deployments",
        singular: "deployment",
        namespaced: true,
        short_names: &["deploy"],
        categories: ALL,
        definition: "io.k8s.api.apps.v1.Deployment",
        subresources: &[Status, Scale],
        field_selectors: &[],
        status: true,
        generation: true,
        storage: "deployments",
    },
    ResourceDef {
        group: "apps",
        version: "v1",
        kind: "ReplicaSet",
        plural: "replicasets",
        singular: "replicaset",
        namespaced: true,
        short_names: &["rs"],
        categories: ALL,
        definition: "io.k8s.api.apps.v1.ReplicaSet",
        subresources: &[Status, Scale],
        field_selectors: &["status.replicas"],
        status: true,
        generation: true,
        storage: "replicasets",
    },
    ResourceDef {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        plural: "leases",
        singular: "lease",
        namespaced: true,
        short_names: &[],
        categories: &[],
        definition: "io.k8s.api.coordination.v1.Lease",
        subresources: &[],
        field_selectors: &[],
        status: false,
        generation: false,
        storage: "leases",
    },
    ResourceDef {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        singular: "endpointslice",
        namespaced: true,
        short_names: &[],
        categories: &[],
        definition: "io.k8s.api.discovery.v1.EndpointSlice",
        subresources: &[],
        field_selectors: &[],
        status: false,
        generation: false,
        storage: "endpointslices",
    },
    ResourceDef {
        group: "canopy.io",
        version: "v1",
        kind: "Tenant",
        plural: "tenants",
        singular: "tenant",
        namespaced: false,
        short_names: &["tn"],
        categories: &[],
        definition: "io.canopy.v1.Tenant",
        subresources: &[Status],
        field_selectors: &[],
        status: true,
        generation: true,
        storage: "canopy.io/tenants",
    },
];

/// The schema definition name of a kind's list: `io.k8s.api.core.v1.PodList`.
pub fn list_definition(r: &ResourceDef) -> String {
    format!("{}List", r.definition)
}

fn list_schema(r: &ResourceDef) -> serde_json::Value {
    serde_json::json!({
        "description": format!("{}List is a list of {} objects.", r.kind, r.kind),
        "type": "object",
        "required": ["items"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."},
            "kind": {"type": "string", "description": "Kind is a string value representing the REST resource this object represents."},
            "items": {
                "type": "array",
                "description": format!("List of {}.", r.plural),
                "items": {"$ref": format!("#/components/schemas/{}", r.definition)}
            },
            "metadata": {
                "description": "Standard list metadata.",
                "allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta"}]
            }
        }
    })
}

/// The served resources and their schemas, with lookups.
pub struct Registry {
    resources: Vec<&'static ResourceDef>,
    by_path: HashMap<(String, String, String), usize>,
    schemas: Schemas,
}

impl Registry {
    /// The built-in resources.
    pub fn builtin() -> Self {
        use k8s_openapi::api::{apps, coordination, core, discovery};
        let mut collector = SchemaCollector::new();
        collector
            .add::<core::v1::Namespace>()
            .add::<core::v1::Pod>()
            .add::<core::v1::Binding>()
            .add::<core::v1::Node>()
            .add::<core::v1::Service>()
            .add::<core::v1::Endpoints>()
            .add::<core::v1::ConfigMap>()
            .add::<core::v1::Secret>()
            .add::<core::v1::ServiceAccount>()
            .add::<k8s_openapi::api::authentication::v1::TokenRequest>()
            .add::<core::v1::Event>()
            .add::<apps::v1::Deployment>()
            .add::<apps::v1::ReplicaSet>()
            .add::<coordination::v1::Lease>()
            .add::<discovery::v1::EndpointSlice>()
            .add::<crate::tenant::Tenant>()
            .add::<k8s_openapi::api::autoscaling::v1::Scale>()
            .add::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>()
            .add::<k8s_openapi::apimachinery::pkg::apis::meta::v1::DeleteOptions>()
            .add::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta>()
            .add::<k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList>();
        collector.add_definition(
            "io.k8s.apimachinery.pkg.apis.meta.v1.WatchEvent",
            serde_json::json!({
                "description": "Event represents a single event to a watched resource.",
                "type": "object",
                "required": ["type", "object"],
                "properties": {
                    "type": {"type": "string"},
                    "object": {
                        "description": "Object is:\n * If Type is Added or Modified: the new state of the object.\n * If Type is Deleted: the state of the object immediately before deletion.\n * If Type is Error: *Status is recommended; other types may make sense\n   depending on context.",
                        "allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.runtime.RawExtension"}]
                    }
                }
            }),
        );
        collector.add_definition(
            "io.k8s.apimachinery.pkg.runtime.RawExtension",
            serde_json::json!({
                "description": "RawExtension is used to hold extensions in external versions.",
                "type": "object"
            }),
        );
        for r in BUILTIN {
            collector.add_definition(&list_definition(r), list_schema(r));
        }
        Self::new(BUILTIN.iter().collect(), collector.compile())
    }

    fn new(resources: Vec<&'static ResourceDef>, schemas: Schemas) -> Self {
        let by_path = resources
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    (
                        r.group.to_string(),
                        r.version.to_string(),
                        r.plural.to_string(),
                    ),
                    i,
                )
            })
            .collect();
        Self {
            resources,
            by_path,
            schemas,
        }
    }

    /// Every served resource.
    pub fn resources(&self) -> &[&'static ResourceDef] {
        &self.resources
    }

    /// A resource by group, version and plural.
    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
        self.by_path
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .map(|i| self.resources[*i])
    }

    /// A resource by group and kind.
    pub fn by_kind(&self, group: &str, kind: &str) -> Option<&'static ResourceDef> {
        self.resources
            .iter()
            .find(|r| r.group == group && r.kind == kind)
            .copied()
    }

    /// The schemas.
    pub fn schemas(&self) -> &Schemas {
        &self.schemas
    }

    /// The served group/versions, core first, in a stable order.
    pub fn group_versions(&self) -> Vec<(&'static str, &'static str)> {
        let mut out: Vec<(&'static str, &'static str)> = Vec::new();
        for r in &self.resources {
            if !out.contains(&(r.group, r.version)) {
                out.push((r.group, r.version));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resource_has_a_schema() {
        let registry = Registry::builtin();
        for r in registry.resources() {
            assert!(
                registry.schemas().definition(r.definition).is_some(),
                "{} has no schema {}",
                r.plural,
                r.definition
            );
        }
        assert_eq!(
            registry
                .get("apps", "v1", "deployments")
                .unwrap()
                .key("ns", "d"),
            "/registry/deployments/ns/d"
        );
    }
}
