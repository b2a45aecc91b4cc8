//! The OpenAPI documents (`/openapi/v2`, `/openapi/v3` and one v3 document per
//! group/version), computed once from the registry's schemas.
//!
//! kubectl reads them for `explain`, for client-side apply's patch strategies and to decide
//! whether the server validates fields itself (it looks for the `fieldValidation` parameter
//! on each kind's PATCH operation, identified by `x-kubernetes-group-version-kind`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use canopy_api::{Registry, ResourceDef, Subresource, registry::list_definition, schema};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// The precomputed documents.
pub struct OpenApi {
    v2: Bytes,
    v3_root: Bytes,
    v3: HashMap<String, Bytes>,
}

struct Param {
    name: &'static str,
    kind: &'static str,
    description: &'static str,
}

const fn p(name: &'static str, kind: &'static str, description: &'static str) -> Param {
    Param {
        name,
        kind,
        description,
    }
}

const PRETTY: Param = p(
    "pretty",
    "string",
    "If 'true', then the output is pretty printed.",
);
const DRY_RUN: Param = p(
    "dryRun",
    "string",
    "When present, indicates that modifications should not be persisted. Valid values are: - All: all dry run stages will be processed",
);
const FIELD_MANAGER: Param = p(
    "fieldManager",
    "string",
    "fieldManager is a name associated with the actor or entity that is making these changes.",
);
const FIELD_VALIDATION: Param = p(
    "fieldValidation",
    "string",
    "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore - Warn (default) - Strict",
);
const FORCE: Param = p(
    "force",
    "boolean",
    "Force is going to \"force\" Apply requests. It means user will re-acquire conflicting fields owned by other people.",
);
const LIST_PARAMS: &[Param] = &[
    p(
        "allowWatchBookmarks",
        "boolean",
        "allowWatchBookmarks requests watch events with type \"BOOKMARK\".",
    ),
    p(
        "continue",
        "string",
        "The continue option should be set when retrieving more results from the server.",
    ),
    p(
        "fieldSelector",
        "string",
        "A selector to restrict the list of returned objects by their fields. Defaults to everything.",
    ),
    p(
        "labelSelector",
        "string",
        "A selector to restrict the list of returned objects by their labels. Defaults to everything.",
    ),
    p(
        "limit",
        "integer",
        "limit is a maximum number of responses to return for a list call.",
    ),
    p(
        "resourceVersion",
        "string",
        "resourceVersion sets a constraint on what resource versions a request may be served from.",
    ),
    p(
        "resourceVersionMatch",
        "string",
        "resourceVersionMatch determines how resourceVersion is applied to list calls.",
    ),
    p(
        "sendInitialEvents",
        "boolean",
        "`sendInitialEvents=true` may be set together with `watch=true`: the stream begins with synthetic events for the current state, then a bookmark annotated \"k8s.io/initial-events-end\".",
    ),
    p(
        "timeoutSeconds",
        "integer",
        "Timeout for the list/watch call.",
    ),
    p(
        "watch",
        "boolean",
        "Watch for changes to the described resources and return them as a stream of add, update, and remove notifications.",
    ),
];
const DELETE_PARAMS: &[Param] = &[
    p(
        "gracePeriodSeconds",
        "integer",
        "The duration in seconds before the object should be deleted.",
    ),
    p(
        "propagationPolicy",
        "string",
        "Whether and how garbage collection will be performed: Orphan, Background or Foreground.",
    ),
    p(
        "orphanDependents",
        "boolean",
        "Deprecated: please use the PropagationPolicy.",
    ),
];

fn group_prefix(group: &str) -> String {
    let name = group.split('.').next().unwrap_or("");
    if name.is_empty() {
        "Core".to_string()
    } else {
        let mut c = name.chars();
        c.next()
            .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
            .unwrap_or_default()
    }
}

fn gv_path(def: &ResourceDef) -> String {
    if def.group.is_empty() {
        format!("/api/{}", def.version)
    } else {
        format!("/apis/{}/{}", def.group, def.version)
    }
}

/// One operation to describe.
struct Op {
    method: &'static str,
    action: &'static str,
    id: String,
    params: Vec<&'static Param>,
    body: Option<String>,
    response: String,
    gvk: (String, String, String),
    patch: bool,
}

fn operations(def: &ResourceDef) -> Vec<(String, Vec<Op>, bool)> {
    let gv = gv_path(def);
    let version = {
        let mut c = def.version.chars();
        c.next()
            .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
            .unwrap_or_default()
    };
    let prefix = format!("{}{}", group_prefix(def.group), version);
    let scope = if def.namespaced { "Namespaced" } else { "" };
    let gvk = (
        def.group.to_string(),
        def.version.to_string(),
        def.kind.to_string(),
    );
    let kind = def.kind;
    let item = def.definition.to_string();
    let list = list_definition(def);
    let write = || vec![&PRETTY, &DRY_RUN, &FIELD_MANAGER, &FIELD_VALIDATION];
    let collection_path = if def.namespaced {
        format!("{gv}/namespaces/{{namespace}}/{}", def.plural)
    } else {
        format!("{gv}/{}", def.plural)
    };
    let item_path = format!("{collection_path}/{{name}}");
    let mk =
        |method, action, id: String, params, body: Option<String>, response: String, patch| Op {
            method,
            action,
            id,
            params,
            body,
            response,
            gvk: gvk.clone(),
            patch,
        };
    let mut out = Vec::new();
    out.push((
        collection_path.clone(),
        vec![
            mk(
                "get",
                "list",
                format!("list{prefix}{scope}{kind}"),
                LIST_PARAMS.iter().chain([&PRETTY]).collect(),
                None,
                list.clone(),
                false,
            ),
            mk(
                "post",
                "post",
                format!("create{prefix}{scope}{kind}"),
                write(),
                Some(item.clone()),
                item.clone(),
                false,
            ),
            mk(
                "delete",
                "deletecollection",
                format!("deleteCollection{prefix}{scope}{kind}"),
                LIST_PARAMS
                    .iter()
                    .chain(DELETE_PARAMS)
                    .chain([&PRETTY, &DRY_RUN])
                    .collect(),
                None,
                "io.k8s.apimachinery.pkg.apis.meta.v1.Status".into(),
                false,
            ),
        ],
        def.namespaced,
    ));
    out.push((
        item_path.clone(),
        vec![
            mk(
                "get",
                "get",
                format!("read{prefix}{scope}{kind}"),
                vec![&PRETTY],
                None,
                item.clone(),
                false,
            ),
            mk(
                "put",
                "put",
                format!("replace{prefix}{scope}{kind}"),
                write(),
                Some(item.clone()),
                item.clone(),
                false,
            ),
            mk(
                "patch",
                "patch",
                format!("patch{prefix}{scope}{kind}"),
                write().into_iter().chain([&FORCE]).collect(),
                Some("io.k8s.apimachinery.pkg.apis.meta.v1.Patch".into()),
                item.clone(),
                true,
            ),
            mk(
                "delete",
                "delete",
                format!("delete{prefix}{scope}{kind}"),
                DELETE_PARAMS.iter().chain([&PRETTY, &DRY_RUN]).collect(),
                None,
                item.clone(),
                false,
            ),
        ],
        def.namespaced,
    ));
    if def.namespaced {
        out.push((
            format!("{gv}/{}", def.plural),
            vec![mk(
                "get",
                "list",
                format!("list{prefix}{kind}ForAllNamespaces"),
                LIST_PARAMS.iter().chain([&PRETTY]).collect(),
                None,
                list,
                false,
            )],
            false,
        ));
    }
    for sub in def.subresources {
        let suffix = {
            let n = sub.name();
            n[..1].to_ascii_uppercase() + &n[1..]
        };
        let path = format!("{item_path}/{}", sub.name());
        let (sub_item, sub_gvk) = match sub {
            Subresource::Scale => (
                "io.k8s.api.autoscaling.v1.Scale".to_string(),
                (
                    "autoscaling".to_string(),
                    "v1".to_string(),
                    "Scale".to_string(),
                ),
            ),
            Subresource::Binding => (
                "io.k8s.api.core.v1.Binding".to_string(),
                (String::new(), "v1".to_string(), "Binding".to_string()),
            ),
            Subresource::Token => (
                "io.k8s.api.authentication.v1.TokenRequest".to_string(),
                (
                    "authentication.k8s.io".to_string(),
                    "v1".to_string(),
                    "TokenRequest".to_string(),
                ),
            ),
            _ => (item.clone(), gvk.clone()),
        };
        let ops = match sub {
            Subresource::Status | Subresource::Scale => vec![
                Op {
                    gvk: sub_gvk.clone(),
                    ..mk(
                        "get",
                        "get",
                        format!("read{prefix}{scope}{kind}{suffix}"),
                        vec![&PRETTY],
                        None,
                        sub_item.clone(),
                        false,
                    )
                },
                Op {
                    gvk: sub_gvk.clone(),
                    ..mk(
                        "put",
                        "put",
                        format!("replace{prefix}{scope}{kind}{suffix}"),
                        write(),
                        Some(sub_item.clone()),
                        sub_item.clone(),
                        false,
                    )
                },
                Op {
                    gvk: sub_gvk.clone(),
                    ..mk(
                        "patch",
                        "patch",
                        format!("patch{prefix}{scope}{kind}{suffix}"),
                        write().into_iter().chain([&FORCE]).collect(),
                        Some("io.k8s.apimachinery.pkg.apis.meta.v1.Patch".into()),
                        sub_item.clone(),
                        true,
                    )
                },
            ],
            Subresource::Binding | Subresource::Token => vec![Op {
                gvk: sub_gvk.clone(),
                ..mk(
                    "post",
                    "post",
                    format!("create{prefix}{scope}{kind}{suffix}"),
                    write(),
                    Some(sub_item.clone()),
                    sub_item.clone(),
                    false,
                )
            }],
            Subresource::Log => vec![mk(
                "get",
                "connect",
                format!("read{prefix}{scope}{kind}Log"),
                vec![&PRETTY],
                None,
                "string".into(),
                false,
            )],
            sub @ (Subresource::Exec | Subresource::Attach | Subresource::PortForward) => {
                let name = match sub {
                    Subresource::Exec => "Exec",
                    Subresource::Attach => "Attach",
                    _ => "Portforward",
                };
                ["get", "post"]
                    .into_iter()
                    .map(|method| {
                        let verb = if method == "get" {
                            "connectGet"
                        } else {
                            "connectPost"
                        };
                        mk(
                            method,
                            "connect",
                            format!("{verb}{prefix}{scope}{kind}{name}"),
                            vec![],
                            None,
                            "string".into(),
                            false,
                        )
                    })
                    .collect()
            }
            Subresource::Finalize => vec![mk(
                "put",
                "put",
                format!("replace{prefix}{scope}{kind}Finalize"),
                write(),
                Some(sub_item.clone()),
                sub_item.clone(),
                false,
            )],
        };
        out.push((path, ops, def.namespaced));
    }
    out
}

fn schema_ref(name: &str, v3: bool) -> Value {
    if name == "string" {
        return json!({"type": "string"});
    }
    if v3 {
        json!({"$ref": format!("#/components/schemas/{name}")})
    } else {
        json!({"$ref": format!("#/definitions/{name}")})
    }
}

fn path_params(namespaced: bool, path: &str, v3: bool) -> Vec<Value> {
    let mut out = Vec::new();
    let mut add = |name: &str, description: &str| {
        if v3 {
            out.push(json!({"name": name, "in": "path", "required": true, "description": description, "schema": {"type": "string", "uniqueItems": true}}));
        } else {
            out.push(json!({"name": name, "in": "path", "required": true, "description": description, "type": "string", "uniqueItems": true}));
        }
    };
    if path.contains("{name}") {
        add("name", "name of the resource");
    }
    if namespaced {
        add(
            "namespace",
            "object name and auth scope, such as for teams and projects",
        );
    }
    out
}

fn operation(op: &Op, v3: bool) -> Value {
    let params: Vec<Value> = op
        .params
        .iter()
        .map(|p| {
            if v3 {
                json!({"name": p.name, "in": "query", "description": p.description, "schema": {"type": p.kind, "uniqueItems": true}})
            } else {
                json!({"name": p.name, "in": "query", "description": p.description, "type": p.kind, "uniqueItems": true})
            }
        })
        .chain(op.body.iter().map(|body| {
            if v3 {
                Value::Null
            } else {
                json!({"name": "body", "in": "body", "required": true, "schema": schema_ref(body, false)})
            }
        }))
        .filter(|v| !v.is_null())
        .collect();
    let ok_code = if op.method == "post" { "201" } else { "200" };
    let mut value = json!({
        "operationId": op.id,
        "parameters": params,
        "x-kubernetes-action": op.action,
        "x-kubernetes-group-version-kind": {"group": op.gvk.0, "version": op.gvk.1, "kind": op.gvk.2},
    });
    if v3 {
        value["responses"] = json!({
            ok_code: {"description": "OK", "content": {"application/json": {"schema": schema_ref(&op.response, true)}}},
            "401": {"description": "Unauthorized"},
        });
        if let Some(body) = &op.body {
            let types: Vec<&str> = if op.patch {
                vec![
                    "application/apply-patch+yaml",
                    "application/json-patch+json",
                    "application/merge-patch+json",
                    "application/strategic-merge-patch+json",
                ]
            } else {
                vec!["*/*"]
            };
            let content: Map<String, Value> = types
                .into_iter()
                .map(|t| (t.to_string(), json!({"schema": schema_ref(body, true)})))
                .collect();
            value["requestBody"] = json!({"required": true, "content": content});
        }
    } else {
        value["responses"] = json!({
            ok_code: {"description": "OK", "schema": schema_ref(&op.response, false)},
            "401": {"description": "Unauthorized"},
        });
        value["consumes"] = if op.patch {
            json!([
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
                "application/apply-patch+yaml"
            ])
        } else {
            json!(["*/*"])
        };
        value["produces"] = json!(["application/json", "application/yaml"]);
        value["schemes"] = json!(["https"]);
    }
    value
}

/// Collects the definitions reachable from `roots`.
fn closure(
    definitions: &BTreeMap<String, Value>,
    roots: impl IntoIterator<Item = String>,
) -> BTreeSet<String> {
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref")
                    && let Some(name) = r.rsplit('/').next()
                {
                    out.push(name.to_string());
                }
                m.values().for_each(|c| refs(c, out));
            }
            Value::Array(a) => a.iter().for_each(|c| refs(c, out)),
            _ => {}
        }
    }
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = roots.into_iter().collect();
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Some(def) = definitions.get(&name) {
            refs(def, &mut todo);
        }
    }
    seen
}

impl OpenApi {
    /// Builds every document.
    pub fn new(registry: &Registry) -> Self {
        let mut definitions = registry.schemas().definitions().clone();
        // Kinds carry their group/version/kind, which kubectl explain and validation use.
        let mut gvks: Vec<(String, String, String, String)> = Vec::new();
        for def in registry.resources() {
            gvks.push((
                def.definition.to_string(),
                def.group.into(),
                def.version.into(),
                def.kind.into(),
            ));
            gvks.push((
                list_definition(def),
                def.group.into(),
                def.version.into(),
                def.list_kind(),
            ));
        }
        gvks.push((
            "io.k8s.api.autoscaling.v1.Scale".into(),
            "autoscaling".into(),
            "v1".into(),
            "Scale".into(),
        ));
        gvks.push((
            "io.k8s.api.core.v1.Binding".into(),
            String::new(),
            "v1".into(),
            "Binding".into(),
        ));
        gvks.push((
            "io.k8s.apimachinery.pkg.apis.meta.v1.Status".into(),
            String::new(),
            "v1".into(),
            "Status".into(),
        ));
        for (name, group, version, kind) in gvks {
            if let Some(Value::Object(def)) = definitions.get_mut(&name) {
                def.insert(
                    "x-kubernetes-group-version-kind".into(),
                    json!([{"group": group, "version": version, "kind": kind}]),
                );
            }
        }
        definitions.insert(
            "io.k8s.apimachinery.pkg.apis.meta.v1.Patch".into(),
            json!({"description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body.", "type": "object"}),
        );
        let info = json!({"title": "Kubernetes", "version": format!("v{}.{}.0", canopy_api::KUBERNETES_MAJOR, canopy_api::KUBERNETES_MINOR)});
        let to_bytes = |v: &Value| Bytes::from(serde_json::to_vec(v).unwrap_or_default());

        // v3: one document per group/version.
        let mut v3 = HashMap::new();
        let mut root_paths = Map::new();
        for (group, version) in registry.group_versions() {
            let defs: Vec<&ResourceDef> = registry
                .resources()
                .iter()
                .copied()
                .filter(|r| r.group == group && r.version == version)
                .collect();
            let mut paths = Map::new();
            let mut roots = vec![
                "io.k8s.apimachinery.pkg.apis.meta.v1.Status".to_string(),
                "io.k8s.apimachinery.pkg.apis.meta.v1.Patch".to_string(),
                "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions".to_string(),
            ];
            for def in &defs {
                for (path, ops, namespaced) in operations(def) {
                    let mut item = Map::new();
                    for op in &ops {
                        item.insert(op.method.into(), operation(op, true));
                        roots.extend(op.body.iter().cloned());
                        roots.push(op.response.clone());
                    }
                    item.insert(
                        "parameters".into(),
                        Value::Array(path_params(namespaced, &path, true)),
                    );
                    paths.insert(path, Value::Object(item));
                }
            }
            let schemas: Map<String, Value> = closure(&definitions, roots)
                .into_iter()
                .filter_map(|name| definitions.get(&name).map(|d| (name, d.clone())))
                .collect();
            let doc = json!({
                "openapi": "3.0.0",
                "info": info,
                "paths": paths,
                "components": {"schemas": schemas},
            });
            let key = if group.is_empty() {
                format!("api/{version}")
            } else {
                format!("apis/{group}/{version}")
            };
            let bytes = to_bytes(&doc);
            let hash = format!("{:X}", Sha256::digest(&bytes));
            root_paths.insert(
                key.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash={hash}")}),
            );
            v3.insert(key, bytes);
        }
        let v3_root = to_bytes(&json!({"paths": root_paths}));

        // v2: one document for everything.
        let mut v2_definitions = definitions.clone();
        for def in v2_definitions.values_mut() {
            schema::rewrite_refs(def, "#/definitions/");
        }
        let mut paths = Map::new();
        for def in registry.resources() {
            for (path, ops, namespaced) in operations(def) {
                let mut item = Map::new();
                for op in &ops {
                    item.insert(op.method.into(), operation(op, false));
                }
                item.insert(
                    "parameters".into(),
                    Value::Array(path_params(namespaced, &path, false)),
                );
                paths.insert(path, Value::Object(item));
            }
        }
        let v2 = to_bytes(&json!({
            "swagger": "2.0",
            "info": info,
            "paths": paths,
            "definitions": v2_definitions,
        }));
        Self { v2, v3_root, v3 }
    }

    /// `/openapi/v2`.
    pub fn v2(&self) -> Bytes {
        self.v2.clone()
    }

    /// `/openapi/v3`.
    pub fn v3_root(&self) -> Bytes {
        self.v3_root.clone()
    }

    /// `/openapi/v3/<api/v1 | apis/g/v>`.
    pub fn v3(&self, path: &str) -> Option<Bytes> {
        self.v3.get(path.trim_matches('/')).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_documents_carry_gvk_and_field_validation() {
        let registry = Registry::builtin();
        let docs = OpenApi::new(&registry);
        let root: Value = serde_json::from_slice(&docs.v3_root()).unwrap();
        assert!(
            root["paths"]["apis/apps/v1"]["serverRelativeURL"]
                .as_str()
                .unwrap()
                .starts_with("/openapi/v3/apis/apps/v1?hash=")
        );
        let apps: Value = serde_json::from_slice(&docs.v3("apis/apps/v1").unwrap()).unwrap();
        let patch =
            &apps["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        let deploy = &apps["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            deploy["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        assert!(apps["components"]["schemas"]["io.k8s.api.core.v1.PodSpec"].is_object());
        let v2: Value = serde_json::from_slice(&docs.v2()).unwrap();
        assert!(
            v2["definitions"]["io.k8s.api.core.v1.Pod"]["properties"]["spec"]["allOf"][0]["$ref"]
                .as_str()
                .unwrap()
                .starts_with("#/definitions/")
        );
    }
}
