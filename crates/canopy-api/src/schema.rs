//! The structural schemas of the served kinds, compiled from k8s-openapi's (schemars) JSON
//! schemas, with upstream's list and map merge strategies added.
//!
//! One model serves four jobs: decoding request bodies (type checks, pruning of unknown
//! fields, as upstream's typed decoding does), strategic merge patch (list merge keys),
//! server-side apply (list types) and the OpenAPI documents kubectl reads.

use std::collections::{BTreeMap, HashMap};

use schemars::{JsonSchema, generate::SchemaSettings};
use serde_json::{Map, Value, json};

use crate::generated::merge_strategies::MERGE_STRATEGIES;

/// How a list or map merges (upstream `patchStrategy`/`patchMergeKey`,
/// `x-kubernetes-list-type`, `x-kubernetes-map-type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeStrategy {
    /// A list of objects identified by these key fields.
    ListMap(&'static [&'static str]),
    /// A list of unique scalars.
    ListSet,
    /// A list replaced as a whole.
    ListAtomic,
    /// A map replaced as a whole.
    MapAtomic,
}

/// Index of a node in [`Schemas`].
pub type NodeId = usize;

/// What values a schema node accepts.
#[derive(Clone, Debug)]
pub enum Shape {
    /// A struct (`properties`) and/or a map (`additional`).
    Object {
        /// Named fields.
        properties: BTreeMap<String, NodeId>,
        /// Schema of the values of a map.
        additional: Option<NodeId>,
        /// A map that merges as a whole.
        atomic: bool,
    },
    /// A list.
    Array {
        /// Schema of the items.
        items: NodeId,
        /// How the list merges.
        strategy: MergeStrategy,
    },
    /// A string.
    String,
    /// An integer.
    Integer,
    /// Any number.
    Number,
    /// true or false.
    Boolean,
    /// An integer or a string (`IntOrString`).
    IntOrString,
    /// A resource quantity: a string such as `100m`, or a number.
    Quantity,
    /// An RFC 3339 timestamp.
    Time,
    /// Base64-encoded bytes (`[]byte` in Go).
    Bytes,
    /// Anything (`FieldsV1`, `RawExtension`, untyped objects).
    Any,
}

/// One compiled schema node.
#[derive(Clone, Debug)]
pub struct Node {
    /// What it accepts.
    pub shape: Shape,
    /// The definition it came from, e.g. `io.k8s.api.core.v1.Pod`.
    pub definition: Option<String>,
}

/// The compiled schemas of every served kind, plus the raw definitions for OpenAPI.
pub struct Schemas {
    nodes: Vec<Node>,
    by_definition: HashMap<String, NodeId>,
    /// Definition name → JSON schema (refs written as `#/components/schemas/<name>`),
    /// with upstream's `x-kubernetes-*` extensions added.
    definitions: BTreeMap<String, Value>,
}

/// The path of a value inside an object, as upstream prints field paths.
#[derive(Clone, Debug, Default)]
pub struct FieldPath(String);

impl FieldPath {
    /// Path of a field inside this one.
    pub fn field(&self, name: &str) -> FieldPath {
        if self.0.is_empty() {
            FieldPath(name.to_string())
        } else {
            FieldPath(format!("{}.{name}", self.0))
        }
    }

    /// Path of a list item.
    pub fn index(&self, i: usize) -> FieldPath {
        FieldPath(format!("{}[{i}]", self.0))
    }

    /// Path of a map entry.
    pub fn key(&self, k: &str) -> FieldPath {
        FieldPath(format!("{}[{k}]", self.0))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What decoding found wrong with a body that it could still use.
#[derive(Debug, Default)]
pub struct DecodeReport {
    /// Paths of fields the schema does not know (they were removed).
    pub unknown_fields: Vec<String>,
}

/// A value of the wrong type: decoding must fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeError {
    /// Where.
    pub path: String,
    /// What was expected ("string", "object", ...).
    pub expected: &'static str,
    /// What was found.
    pub found: &'static str,
}

impl std::fmt::Display for TypeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if matches!(self.expected, "quantity" | "RFC 3339 time" | "base64 data") {
            write!(
                f,
                "invalid {} at {}: {}",
                self.expected, self.path, self.found
            )
        } else {
            write!(
                f,
                "json: cannot unmarshal {} into Go struct field {} of type {}",
                self.found, self.path, self.expected
            )
        }
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Collects the schemars definitions of a root type and everything it references.
pub struct SchemaCollector {
    generator: schemars::SchemaGenerator,
    roots: Vec<String>,
}

impl Default for SchemaCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl SchemaCollector {
    /// A collector writing refs as OpenAPI 3 component refs.
    pub fn new() -> Self {
        let mut settings = SchemaSettings::openapi3();
        settings.definitions_path = "#/components/schemas/".into();
        Self {
            generator: settings.into_generator(),
            roots: Vec::new(),
        }
    }

    /// Adds a type (and what it references).
    pub fn add<T: JsonSchema>(&mut self) -> &mut Self {
        let schema = self.generator.subschema_for::<T>();
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            self.roots.push(
                reference
                    .trim_start_matches("#/components/schemas/")
                    .to_string(),
            );
        }
        self
    }

    /// Adds a definition written by hand (for kinds k8s-openapi does not have).
    pub fn add_definition(&mut self, name: &str, schema: Value) -> &mut Self {
        self.generator
            .definitions_mut()
            .insert(name.to_string(), schema);
        self
    }

    /// Compiles everything collected.
    pub fn compile(mut self) -> Schemas {
        let definitions: BTreeMap<String, Value> =
            self.generator.take_definitions(true).into_iter().collect();
        Schemas::compile(definitions)
    }
}

impl Schemas {
    fn compile(mut definitions: BTreeMap<String, Value>) -> Schemas {
        let mut strategies: HashMap<(&str, &str), MergeStrategy> = HashMap::new();
        for (def, field, strategy) in MERGE_STRATEGIES {
            strategies.insert((def, field), *strategy);
        }
        // Annotate the served definitions with upstream's extensions.
        for (name, schema) in definitions.iter_mut() {
            let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
                continue;
            };
            for (field, prop) in props.iter_mut() {
                if let Some(strategy) = strategies.get(&(name.as_str(), field.as_str())) {
                    annotate(prop, *strategy);
                }
            }
        }
        let mut schemas = Schemas {
            nodes: Vec::new(),
            by_definition: HashMap::new(),
            definitions: BTreeMap::new(),
        };
        let names: Vec<String> = definitions.keys().cloned().collect();
        for name in &names {
            schemas.compile_definition(name, &definitions, &strategies);
        }
        schemas.definitions = definitions;
        schemas
    }

    fn compile_definition(
        &mut self,
        name: &str,
        definitions: &BTreeMap<String, Value>,
        strategies: &HashMap<(&str, &str), MergeStrategy>,
    ) -> NodeId {
        if let Some(id) = self.by_definition.get(name) {
            return *id;
        }
        let special = match name {
            "io.k8s.apimachinery.pkg.api.resource.Quantity" => Some(Shape::Quantity),
            "io.k8s.apimachinery.pkg.util.intstr.IntOrString" => Some(Shape::IntOrString),
            "io.k8s.apimachinery.pkg.apis.meta.v1.Time"
            | "io.k8s.apimachinery.pkg.apis.meta.v1.MicroTime" => Some(Shape::Time),
            "io.k8s.apimachinery.pkg.apis.meta.v1.FieldsV1"
            | "io.k8s.apimachinery.pkg.runtime.RawExtension" => Some(Shape::Any),
            _ => None,
        };
        // Reserve the slot first: definitions may be recursive.
        let id = self.nodes.len();
        self.nodes.push(Node {
            shape: Shape::Any,
            definition: Some(name.to_string()),
        });
        self.by_definition.insert(name.to_string(), id);
        let shape = match special {
            Some(shape) => shape,
            None => match definitions.get(name) {
                Some(schema) => self.compile_shape(schema, Some(name), definitions, strategies),
                None => Shape::Any,
            },
        };
        self.nodes[id].shape = shape;
        id
    }

    fn compile_node(
        &mut self,
        schema: &Value,
        definitions: &BTreeMap<String, Value>,
        strategies: &HashMap<(&str, &str), MergeStrategy>,
        strategy: Option<MergeStrategy>,
    ) -> NodeId {
        if let Some(target) = reference(schema) {
            return self.compile_definition(target, definitions, strategies);
        }
        let mut shape = self.compile_shape(schema, None, definitions, strategies);
        match (&mut shape, strategy) {
            (Shape::Array { strategy: s, .. }, Some(given)) => *s = given,
            (Shape::Object { atomic, .. }, Some(MergeStrategy::MapAtomic)) => *atomic = true,
            _ => {}
        }
        self.nodes.push(Node {
            shape,
            definition: None,
        });
        self.nodes.len() - 1
    }

    fn compile_shape(
        &mut self,
        schema: &Value,
        definition: Option<&str>,
        definitions: &BTreeMap<String, Value>,
        strategies: &HashMap<(&str, &str), MergeStrategy>,
    ) -> Shape {
        if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
            return Shape::IntOrString;
        }
        if let Some(target) = reference(schema) {
            let id = self.compile_definition(target, definitions, strategies);
            return self.nodes[id].shape.clone();
        }
        match schema.get("type").and_then(Value::as_str) {
            Some("object") => {
                let mut properties = BTreeMap::new();
                if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                    for (field, prop) in props {
                        let strategy =
                            definition.and_then(|d| strategies.get(&(d, field.as_str())).copied());
                        let id = self.compile_node(prop, definitions, strategies, strategy);
                        properties.insert(field.clone(), id);
                    }
                }
                let additional = match schema.get("additionalProperties") {
                    Some(Value::Object(inner)) if !inner.is_empty() => Some(self.compile_node(
                        &Value::Object(inner.clone()),
                        definitions,
                        strategies,
                        None,
                    )),
                    Some(Value::Object(_)) | Some(Value::Bool(true)) => {
                        self.nodes.push(Node {
                            shape: Shape::Any,
                            definition: None,
                        });
                        Some(self.nodes.len() - 1)
                    }
                    _ => None,
                };
                if properties.is_empty() && additional.is_none() {
                    return Shape::Any;
                }
                Shape::Object {
                    properties,
                    additional,
                    atomic: false,
                }
            }
            Some("array") => {
                let items = match schema.get("items") {
                    Some(items) => self.compile_node(items, definitions, strategies, None),
                    None => {
                        self.nodes.push(Node {
                            shape: Shape::Any,
                            definition: None,
                        });
                        self.nodes.len() - 1
                    }
                };
                Shape::Array {
                    items,
                    strategy: MergeStrategy::ListAtomic,
                }
            }
            Some("string") => match schema.get("format").and_then(Value::as_str) {
                Some("date-time") => Shape::Time,
                Some("byte") => Shape::Bytes,
                _ => Shape::String,
            },
            Some("integer") => Shape::Integer,
            Some("number") => Shape::Number,
            Some("boolean") => Shape::Boolean,
            _ => Shape::Any,
        }
    }

    /// The node of a definition such as `io.k8s.api.core.v1.Pod`.
    pub fn definition(&self, name: &str) -> Option<NodeId> {
        self.by_definition.get(name).copied()
    }

    /// A node.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// The child node of a field of an object node (struct field or map value).
    pub fn field(&self, id: NodeId, name: &str) -> Option<NodeId> {
        match &self.nodes[id].shape {
            Shape::Object {
                properties,
                additional,
                ..
            } => properties.get(name).copied().or(*additional),
            _ => None,
        }
    }

    /// The raw definitions, for the OpenAPI documents.
    pub fn definitions(&self) -> &BTreeMap<String, Value> {
        &self.definitions
    }

    /// Checks types, removes unknown fields (recording them) and nulls, and normalises
    /// quantities given as numbers, the way upstream's typed decoding does.
    pub fn normalize(
        &self,
        id: NodeId,
        value: &mut Value,
        path: &FieldPath,
        report: &mut DecodeReport,
    ) -> Result<(), TypeError> {
        let fail = |expected: &'static str, value: &Value| TypeError {
            path: path.as_str().to_string(),
            expected,
            found: json_type(value),
        };
        match &self.nodes[id].shape {
            Shape::Any => Ok(()),
            Shape::Object {
                properties,
                additional,
                ..
            } => {
                let Value::Object(map) = value else {
                    return Err(fail("object", value));
                };
                let mut remove = Vec::new();
                for (key, child) in map.iter_mut() {
                    if child.is_null() {
                        remove.push(key.clone());
                        continue;
                    }
                    match properties.get(key).or(additional.as_ref()) {
                        Some(child_id) => {
                            let child_path = if properties.contains_key(key) {
                                path.field(key)
                            } else {
                                path.key(key)
                            };
                            self.normalize(*child_id, child, &child_path, report)?;
                        }
                        None => {
                            report
                                .unknown_fields
                                .push(path.field(key).as_str().to_string());
                            remove.push(key.clone());
                        }
                    }
                }
                for key in remove {
                    map.remove(&key);
                }
                Ok(())
            }
            Shape::Array { items, .. } => {
                let Value::Array(list) = value else {
                    return Err(fail("array", value));
                };
                for (i, item) in list.iter_mut().enumerate() {
                    self.normalize(*items, item, &path.index(i), report)?;
                }
                Ok(())
            }
            Shape::String => match value {
                Value::String(_) => Ok(()),
                _ => Err(fail("string", value)),
            },
            Shape::Integer => match value {
                Value::Number(n) if n.is_i64() || n.is_u64() => Ok(()),
                // Go decodes 3.0 into an int field; anything fractional fails.
                Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
                    *value = json!(n.as_f64().unwrap_or_default() as i64);
                    Ok(())
                }
                _ => Err(fail("integer", value)),
            },
            Shape::Number => match value {
                Value::Number(_) => Ok(()),
                _ => Err(fail("number", value)),
            },
            Shape::Boolean => match value {
                Value::Bool(_) => Ok(()),
                _ => Err(fail("boolean", value)),
            },
            Shape::IntOrString => match value {
                Value::String(_) => Ok(()),
                Value::Number(n) if n.is_i64() => Ok(()),
                _ => Err(fail("IntOrString", value)),
            },
            Shape::Quantity => match value {
                Value::String(s) => match crate::quantity::Quantity::parse(s) {
                    Ok(_) => Ok(()),
                    Err(_) => Err(TypeError {
                        path: path.as_str().to_string(),
                        expected: "quantity",
                        found: "a string that is not a quantity",
                    }),
                },
                Value::Number(n) => {
                    *value = Value::String(n.to_string());
                    Ok(())
                }
                _ => Err(fail("quantity", value)),
            },
            Shape::Bytes => match value {
                Value::String(s) => {
                    use base64::Engine;
                    match base64::engine::general_purpose::STANDARD.decode(s) {
                        Ok(_) => Ok(()),
                        Err(_) => Err(TypeError {
                            path: path.as_str().to_string(),
                            expected: "base64 data",
                            found: "a string that is not base64",
                        }),
                    }
                }
                _ => Err(fail("string", value)),
            },
            Shape::Time => match value {
                Value::String(s) if chrono::DateTime::parse_from_rfc3339(s).is_ok() => Ok(()),
                Value::String(_) => Err(TypeError {
                    path: path.as_str().to_string(),
                    expected: "RFC 3339 time",
                    found: "a string that is not an RFC 3339 time",
                }),
                _ => Err(fail("string", value)),
            },
        }
    }
}

fn reference(schema: &Value) -> Option<&str> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        return Some(r.trim_start_matches("#/components/schemas/"));
    }
    match schema.get("allOf").and_then(Value::as_array) {
        Some(all) if all.len() == 1 => all[0]
            .get("$ref")
            .and_then(Value::as_str)
            .map(|r| r.trim_start_matches("#/components/schemas/")),
        _ => None,
    }
}

/// Adds upstream's merge extensions to a property schema.
fn annotate(prop: &mut Value, strategy: MergeStrategy) {
    let Some(obj) = prop.as_object_mut() else {
        return;
    };
    let mut put = |k: &str, v: Value| {
        obj.insert(k.to_string(), v);
    };
    match strategy {
        MergeStrategy::ListMap(keys) => {
            put("x-kubernetes-list-type", json!("map"));
            put("x-kubernetes-list-map-keys", json!(keys));
            put("x-kubernetes-patch-strategy", json!("merge"));
            put("x-kubernetes-patch-merge-key", json!(keys[0]));
        }
        MergeStrategy::ListSet => {
            put("x-kubernetes-list-type", json!("set"));
            put("x-kubernetes-patch-strategy", json!("merge"));
        }
        MergeStrategy::ListAtomic => put("x-kubernetes-list-type", json!("atomic")),
        MergeStrategy::MapAtomic => put("x-kubernetes-map-type", json!("atomic")),
    }
}

/// Rewrites every `$ref` in a schema from OpenAPI 3 component refs to another prefix
/// (`#/definitions/` for OpenAPI v2).
pub fn rewrite_refs(value: &mut Value, prefix: &str) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get_mut("$ref")
                && let Some(name) = r.strip_prefix("#/components/schemas/")
            {
                *r = format!("{prefix}{name}");
            }
            for v in map.values_mut() {
                rewrite_refs(v, prefix);
            }
        }
        Value::Array(list) => list.iter_mut().for_each(|v| rewrite_refs(v, prefix)),
        _ => {}
    }
}

/// An empty JSON object.
pub fn empty_object() -> Value {
    Value::Object(Map::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn pod_schemas() -> (Schemas, NodeId) {
        let mut c = SchemaCollector::new();
        c.add::<Pod>();
        let s = c.compile();
        let id = s.definition("io.k8s.api.core.v1.Pod").unwrap();
        (s, id)
    }

    #[test]
    fn prunes_unknown_fields_and_reports_paths() {
        let (s, pod) = pod_schemas();
        let mut v = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"a": "b"}, "bogus": 1},
            "spec": {"containers": [{"name": "c", "image": "i", "extra": true,
                     "resources": {"requests": {"cpu": 1}}}], "nodeName": null}
        });
        let mut report = DecodeReport::default();
        s.normalize(pod, &mut v, &FieldPath::default(), &mut report)
            .unwrap();
        assert_eq!(
            report.unknown_fields,
            vec!["metadata.bogus", "spec.containers[0].extra"]
        );
        assert!(v["metadata"].get("bogus").is_none());
        assert!(v["spec"].get("nodeName").is_none());
        assert_eq!(
            v["spec"]["containers"][0]["resources"]["requests"]["cpu"],
            "1"
        );
    }

    #[test]
    fn rejects_wrong_types() {
        let (s, pod) = pod_schemas();
        let mut v = json!({"spec": {"containers": "nope"}});
        let err = s
            .normalize(
                pod,
                &mut v,
                &FieldPath::default(),
                &mut DecodeReport::default(),
            )
            .unwrap_err();
        assert_eq!(err.path, "spec.containers");
        let mut v =
            json!({"spec": {"containers": [{"name": "c", "ports": [{"containerPort": "80"}]}]}});
        assert!(
            s.normalize(
                pod,
                &mut v,
                &FieldPath::default(),
                &mut DecodeReport::default()
            )
            .is_err()
        );
    }

    #[test]
    fn merge_strategies_are_attached() {
        let (s, pod) = pod_schemas();
        let spec = s.field(pod, "spec").unwrap();
        let containers = s.field(spec, "containers").unwrap();
        match &s.node(containers).shape {
            Shape::Array { strategy, .. } => {
                assert_eq!(*strategy, MergeStrategy::ListMap(&["name"]))
            }
            other => panic!("{other:?}"),
        }
        let def = &s.definitions()["io.k8s.api.core.v1.PodSpec"];
        assert_eq!(
            def["properties"]["containers"]["x-kubernetes-patch-merge-key"],
            "name"
        );
    }
}
