//! Discovery documents, computed once from the registry: `/api`, `/apis`, `/apis/<g>`,
//! `/api/v1`, `/apis/<g>/<v>`, and aggregated discovery (`apidiscovery.k8s.io` v2 and
//! v2beta1) that kubectl 1.27+ asks for.

use std::collections::HashMap;

use bytes::Bytes;
use canopy_api::{Registry, ResourceDef, Subresource};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// Verbs, response kind and their group/version of a subresource.
fn subresource_info(
    def: &ResourceDef,
    sub: Subresource,
) -> (
    &'static [&'static str],
    (&'static str, &'static str, &'static str),
) {
    match sub {
        Subresource::Status => (
            &["get", "patch", "update"],
            (def.group, def.version, def.kind),
        ),
        Subresource::Scale => (&["get", "patch", "update"], ("autoscaling", "v1", "Scale")),
        Subresource::Binding => (&["create"], ("", "v1", "Binding")),
        Subresource::Log => (&["get"], ("", "v1", "Pod")),
        Subresource::Finalize => (&["update"], (def.group, def.version, def.kind)),
        Subresource::Exec => (&["create", "get"], ("", "v1", "PodExecOptions")),
        Subresource::Attach => (&["create", "get"], ("", "v1", "PodAttachOptions")),
        Subresource::PortForward => (&["create", "get"], ("", "v1", "PodPortForwardOptions")),
        Subresource::Token => (&["create"], ("authentication.k8s.io", "v1", "TokenRequest")),
    }
}

/// A short, stable hash like upstream's storageVersionHash.
fn version_hash(def: &ResourceDef) -> String {
    use base64::Engine;
    let digest = Sha256::digest(format!("{}/{}/{}", def.group, def.version, def.kind));
    base64::engine::general_purpose::STANDARD.encode(&digest[..8])
}

/// The precomputed discovery documents.
pub struct Discovery {
    core_versions: Bytes,
    groups: Bytes,
    group: HashMap<String, Bytes>,
    resources: HashMap<(String, String), Bytes>,
    aggregated_core: [Bytes; 2],
    aggregated_groups: [Bytes; 2],
    /// ETag of the aggregated documents.
    pub etag: String,
}

/// Which aggregated discovery version a client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregated {
    /// `apidiscovery.k8s.io/v2`.
    V2,
    /// `apidiscovery.k8s.io/v2beta1`.
    V2Beta1,
}

impl Aggregated {
    /// The content type of the response.
    pub fn content_type(self) -> &'static str {
        match self {
            Aggregated::V2 => {
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
            }
            Aggregated::V2Beta1 => {
                "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
            }
        }
    }

    /// The aggregated version an Accept header asks for first, if any.
    pub fn from_accept(accept: Option<&str>) -> Option<Self> {
        for entry in accept?.split(',') {
            let params: Vec<&str> = entry.split(';').map(str::trim).collect();
            if !params.contains(&"as=APIGroupDiscoveryList")
                || !params.contains(&"g=apidiscovery.k8s.io")
            {
                // The first acceptable plain representation wins over later aggregated ones.
                if params
                    .first()
                    .is_some_and(|m| *m == "application/json" || *m == "*/*")
                {
                    return None;
                }
                continue;
            }
            if params.contains(&"v=v2") {
                return Some(Aggregated::V2);
            }
            if params.contains(&"v=v2beta1") {
                return Some(Aggregated::V2Beta1);
            }
        }
        None
    }
}

impl Discovery {
    /// Computes every document. `server_address` is what `/api` advertises.
    pub fn new(registry: &Registry, server_address: &str) -> Self {
        let to_bytes = |v: Value| Bytes::from(serde_json::to_vec(&v).unwrap_or_default());
        let core_versions = to_bytes(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
        }));
        let mut group_docs = Vec::new();
        let mut group = HashMap::new();
        let mut resources = HashMap::new();
        let gvs = registry.group_versions();
        for (g, v) in &gvs {
            let defs: Vec<&ResourceDef> = registry
                .resources()
                .iter()
                .copied()
                .filter(|r| r.group == *g && r.version == *v)
                .collect();
            let gv = if g.is_empty() {
                v.to_string()
            } else {
                format!("{g}/{v}")
            };
            resources.insert(
                (g.to_string(), v.to_string()),
                to_bytes(resource_list(&gv, &defs)),
            );
            if !g.is_empty() {
                let doc = json!({
                    "name": g,
                    "versions": [{"groupVersion": gv, "version": v}],
                    "preferredVersion": {"groupVersion": gv, "version": v},
                });
                let mut with_kind = doc.clone();
                with_kind["kind"] = json!("APIGroup");
                with_kind["apiVersion"] = json!("v1");
                group.insert(g.to_string(), to_bytes(with_kind));
                group_docs.push(doc);
            }
        }
        let groups =
            to_bytes(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": group_docs}));
        let aggregated = |core: bool, version: &str| {
            let items: Vec<Value> = gvs
                .iter()
                .filter(|(g, _)| g.is_empty() == core)
                .map(|(g, v)| {
                    let defs: Vec<&ResourceDef> = registry
                        .resources()
                        .iter()
                        .copied()
                        .filter(|r| r.group == *g && r.version == *v)
                        .collect();
                    json!({
                        "metadata": {"name": g, "creationTimestamp": null},
                        "versions": [{
                            "version": v,
                            "resources": defs.iter().map(|d| aggregated_resource(d)).collect::<Vec<_>>(),
                            "freshness": "Current",
                        }],
                    })
                })
                .collect();
            to_bytes(json!({
                "kind": "APIGroupDiscoveryList",
                "apiVersion": format!("apidiscovery.k8s.io/{version}"),
                "metadata": {},
                "items": items,
            }))
        };
        let aggregated_core = [aggregated(true, "v2"), aggregated(true, "v2beta1")];
        let aggregated_groups = [aggregated(false, "v2"), aggregated(false, "v2beta1")];
        let etag = {
            let mut h = Sha256::new();
            h.update(&aggregated_core[0]);
            h.update(&aggregated_groups[0]);
            format!("\"{:x}\"", h.finalize())
        };
        Self {
            core_versions,
            groups,
            group,
            resources,
            aggregated_core,
            aggregated_groups,
            etag,
        }
    }

    /// `/api`.
    pub fn core_versions(&self, aggregated: Option<Aggregated>) -> Bytes {
        match aggregated {
            Some(Aggregated::V2) => self.aggregated_core[0].clone(),
            Some(Aggregated::V2Beta1) => self.aggregated_core[1].clone(),
            None => self.core_versions.clone(),
        }
    }

    /// `/apis`.
    pub fn groups(&self, aggregated: Option<Aggregated>) -> Bytes {
        match aggregated {
            Some(Aggregated::V2) => self.aggregated_groups[0].clone(),
            Some(Aggregated::V2Beta1) => self.aggregated_groups[1].clone(),
            None => self.groups.clone(),
        }
    }

    /// `/apis/<group>`.
    pub fn group(&self, group: &str) -> Option<Bytes> {
        self.group.get(group).cloned()
    }

    /// `/api/v1`, `/apis/<group>/<version>`.
    pub fn resources(&self, group: &str, version: &str) -> Option<Bytes> {
        self.resources
            .get(&(group.to_string(), version.to_string()))
            .cloned()
    }
}

fn resource_list(gv: &str, defs: &[&ResourceDef]) -> Value {
    let mut resources = Vec::new();
    for d in defs {
        let mut entry = json!({
            "name": d.plural,
            "singularName": d.singular,
            "namespaced": d.namespaced,
            "kind": d.kind,
            "verbs": VERBS,
            "storageVersionHash": version_hash(d),
        });
        if !d.short_names.is_empty() {
            entry["shortNames"] = json!(d.short_names);
        }
        if !d.categories.is_empty() {
            entry["categories"] = json!(d.categories);
        }
        resources.push(entry);
        for sub in d.subresources {
            let (verbs, (group, version, kind)) = subresource_info(d, *sub);
            let mut entry = json!({
                "name": format!("{}/{}", d.plural, sub.name()),
                "singularName": "",
                "namespaced": d.namespaced,
                "kind": kind,
                "verbs": verbs,
            });
            if group != d.group || version != d.version {
                entry["group"] = json!(group);
                entry["version"] = json!(version);
            }
            resources.push(entry);
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn aggregated_resource(d: &ResourceDef) -> Value {
    let mut entry = json!({
        "resource": d.plural,
        "responseKind": {"group": d.group, "version": d.version, "kind": d.kind},
        "scope": if d.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": d.singular,
        "verbs": VERBS,
    });
    if !d.short_names.is_empty() {
        entry["shortNames"] = json!(d.short_names);
    }
    if !d.categories.is_empty() {
        entry["categories"] = json!(d.categories);
    }
    if !d.subresources.is_empty() {
        entry["subresources"] = Value::Array(
            d.subresources
                .iter()
                .map(|sub| {
                    let (verbs, (group, version, kind)) = subresource_info(d, *sub);
                    json!({
                        "subresource": sub.name(),
                        "responseKind": {"group": group, "version": version, "kind": kind},
                        "verbs": verbs,
                    })
                })
                .collect(),
        );
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers() {
        assert_eq!(
            Aggregated::from_accept(Some(
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json"
            )),
            Some(Aggregated::V2)
        );
        assert_eq!(
            Aggregated::from_accept(Some(
                "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json"
            )),
            Some(Aggregated::V2Beta1)
        );
        assert_eq!(Aggregated::from_accept(Some("application/json")), None);
        assert_eq!(Aggregated::from_accept(None), None);
    }

    #[test]
    fn documents_list_every_resource() {
        let registry = Registry::builtin();
        let d = Discovery::new(&registry, "127.0.0.1:6443");
        let v1: Value = serde_json::from_slice(&d.resources("", "v1").unwrap()).unwrap();
        let names: Vec<&str> = v1["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"pods/binding"));
        assert!(names.contains(&"namespaces/finalize"));
        let agg: Value = serde_json::from_slice(&d.groups(Some(Aggregated::V2))).unwrap();
        let apps = &agg["items"].as_array().unwrap()[0];
        assert_eq!(apps["metadata"]["name"], "apps");
        let deploy = &apps["versions"][0]["resources"][0];
        assert_eq!(deploy["subresources"][1]["responseKind"]["kind"], "Scale");
    }
}
