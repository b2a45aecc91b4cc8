//! Schema-driven walks over objects (structured-merge-diff's `typed` package): field sets,
//! comparison, merge, item removal, and the few facts about upstream's Go types that the
//! compiled schemas do not carry.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::LazyLock;

use serde_json::{Map, Value};

use super::MAX_DEPTH;
use super::path::{PathElement, Val, compare_values, maps_in_key_order, path_string};
use super::set::Set;
use crate::schema::{MergeStrategy, NodeId, Schemas, Shape};

/// List-map keys where upstream's `x-kubernetes-list-map-keys` differ from the strategic merge
/// key the compiled schemas carry, with the key defaults upstream's OpenAPI declares (a port
/// without a protocol is keyed as TCP).
pub(crate) struct Keyed {
    keys: &'static [&'static str],
    defaults: &'static [(&'static str, &'static str)],
}

static CONTAINER_PORTS: Keyed = Keyed {
    keys: &["containerPort", "protocol"],
    defaults: &[("protocol", "TCP")],
};

static SERVICE_PORTS: Keyed = Keyed {
    keys: &["port", "protocol"],
    defaults: &[("protocol", "TCP")],
};

static TOPOLOGY_SPREAD: Keyed = Keyed {
    keys: &["topologyKey", "whenUnsatisfiable"],
    defaults: &[],
};

fn keyed_override(definition: &str, field: &str) -> Option<&'static Keyed> {
    // The field first: this runs for every field the walks visit.
    if !matches!(field, "ports" | "topologySpreadConstraints") {
        return None;
    }
    match (definition, field) {
        ("io.k8s.api.core.v1.Container" | "io.k8s.api.core.v1.EphemeralContainer", "ports") => {
            Some(&CONTAINER_PORTS)
        }
        ("io.k8s.api.core.v1.ServiceSpec", "ports") => Some(&SERVICE_PORTS),
        ("io.k8s.api.core.v1.PodSpec", "topologySpreadConstraints") => Some(&TOPOLOGY_SPREAD),
        _ => None,
    }
}

/// Structs marked `+structType=atomic` upstream: owned and replaced as a whole.
fn is_atomic_struct(definition: &str) -> bool {
    matches!(
        definition,
        "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"
            | "io.k8s.apimachinery.pkg.apis.meta.v1.OwnerReference"
            | "io.k8s.api.core.v1.ObjectReference"
            | "io.k8s.api.core.v1.LocalObjectReference"
            | "io.k8s.api.core.v1.TypedLocalObjectReference"
            | "io.k8s.api.core.v1.SecretReference"
            | "io.k8s.api.core.v1.ConfigMapKeySelector"
            | "io.k8s.api.core.v1.SecretKeySelector"
            | "io.k8s.api.core.v1.ObjectFieldSelector"
            | "io.k8s.api.core.v1.ResourceFieldSelector"
            | "io.k8s.api.core.v1.NodeSelector"
            | "io.k8s.api.core.v1.NodeSelectorTerm"
            | "io.k8s.api.core.v1.TopologySelectorTerm"
            | "io.k8s.api.autoscaling.v1.CrossVersionObjectReference"
    )
}

/// What a Go zero value of a struct holds for a field that is always serialized.
#[derive(Clone, Copy)]
enum Zero {
    Object,
    Null,
}

/// Fields that upstream's Go types always carry (non-pointer structs, slices without
/// `omitempty`). Upstream compares typed Go objects, in which these are present even when
/// empty, so whether a change "adds" them (and gets a `"."` in FieldsV1) depends on it.
fn zero_fields(definition: &str) -> &'static [(&'static str, Zero)] {
    use Zero::{Null, Object};
    match definition {
        "io.k8s.api.apps.v1.Deployment"
        | "io.k8s.api.apps.v1.ReplicaSet"
        | "io.k8s.api.apps.v1.StatefulSet"
        | "io.k8s.api.apps.v1.DaemonSet"
        | "io.k8s.api.core.v1.Pod"
        | "io.k8s.api.core.v1.Service"
        | "io.k8s.api.core.v1.Namespace"
        | "io.k8s.api.core.v1.Node"
        | "io.k8s.api.autoscaling.v1.Scale" => &[("spec", Object), ("status", Object)],
        "io.k8s.api.apps.v1.DeploymentSpec" => &[("template", Object), ("strategy", Object)],
        "io.k8s.api.apps.v1.ReplicaSetSpec" => &[("template", Object)],
        "io.k8s.api.apps.v1.StatefulSetSpec" | "io.k8s.api.apps.v1.DaemonSetSpec" => {
            &[("template", Object), ("updateStrategy", Object)]
        }
        "io.k8s.api.core.v1.PodTemplateSpec" => &[("metadata", Object), ("spec", Object)],
        "io.k8s.api.core.v1.PodSpec" => &[("containers", Null)],
        "io.k8s.api.core.v1.Container" | "io.k8s.api.core.v1.EphemeralContainer" => {
            &[("resources", Object)]
        }
        "io.k8s.api.core.v1.ServiceStatus" => &[("loadBalancer", Object)],
        "io.k8s.api.core.v1.NodeStatus" => &[("daemonEndpoints", Object), ("nodeInfo", Object)],
        "io.k8s.api.core.v1.NodeDaemonEndpoints" => &[("kubeletEndpoint", Object)],
        "io.k8s.api.core.v1.Event" => &[("involvedObject", Object), ("source", Object)],
        "io.k8s.api.coordination.v1.Lease" => &[("spec", Object)],
        "io.k8s.api.core.v1.Binding" => &[("target", Object)],
        _ => &[],
    }
}

/// A reference to the type of a value.
#[derive(Clone, Copy)]
pub(crate) enum TypeRef {
    /// A compiled schema node.
    Node(NodeId),
    /// A list node with upstream's list-map keys (see [`keyed_override`]).
    Keyed(NodeId, &'static Keyed),
    /// No schema: maps are granular, lists atomic (upstream's "deduced" type).
    Deduced,
}

/// A granular map or struct.
#[derive(Clone, Copy)]
struct MapType<'s> {
    definition: Option<&'s str>,
    fields: Option<&'s BTreeMap<String, NodeId>>,
    elem: Option<NodeId>,
}

impl MapType<'_> {
    fn is_field(&self, key: &str) -> bool {
        self.fields.is_some_and(|f| f.contains_key(key))
    }

    /// The struct field named `key`, if any.
    fn field(&self, key: &str) -> Option<NodeId> {
        self.fields.and_then(|f| f.get(key)).copied()
    }

    fn field_type(&self, key: &str) -> TypeRef {
        self.type_of(key, self.field(key))
    }

    /// The type of the value at `key`, given the struct field of that name, if any.
    fn type_of(&self, key: &str, field: Option<NodeId>) -> TypeRef {
        if let Some(id) = field {
            return match self.definition.and_then(|d| keyed_override(d, key)) {
                Some(keyed) => TypeRef::Keyed(id, keyed),
                None => TypeRef::Node(id),
            };
        }
        match (self.fields, self.elem) {
            (_, Some(elem)) => TypeRef::Node(elem),
            _ => TypeRef::Deduced,
        }
    }
}

/// How items of an associative list are identified.
#[derive(Clone, Copy)]
enum Keys {
    Set,
    Map(
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
    ),
}

/// An associative (set or map) list.
#[derive(Clone, Copy)]
struct ListType {
    elem: TypeRef,
    keys: Keys,
}

/// How a walk treats a value.
enum Kind<'s> {
    /// Owned and compared as a whole: scalars, atomic lists and maps, and values whose JSON
    /// type does not fit the schema.
    Leaf,
    Map(MapType<'s>),
    List(ListType),
}

/// An error of a walk, with upstream's `<path>: <message>` form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TypedError {
    path: String,
    message: String,
}

impl TypedError {
    fn at(path: &[PathElement], message: String) -> Self {
        Self {
            path: path_string(path),
            message,
        }
    }

    /// The error of a value below `pe`, seen from where `pe` is.
    fn within(mut self, pe: &PathElement) -> Self {
        self.path.insert_str(0, &pe.to_string());
        self
    }
}

impl fmt::Display for TypedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// The three sets a comparison yields (upstream's `typed.Comparison`).
#[derive(Default, Debug)]
pub(crate) struct Comparison {
    pub(crate) added: Set,
    pub(crate) modified: Set,
    pub(crate) removed: Set,
}

impl Comparison {
    /// Drops everything at or below the given paths (reset fields).
    pub(crate) fn exclude(mut self, fields: &Set) -> Comparison {
        self.added.remove_recursive(fields);
        self.modified.remove_recursive(fields);
        self.removed.remove_recursive(fields);
        self
    }

    /// Records one child of the level this comparison describes: how the child itself
    /// changed, and what changed below it, which is taken out of `below` (the level's scratch
    /// for its children, left empty for the next). The element is only made when there is
    /// something to record, so that unchanged parts of objects cost no allocation, and it is
    /// copied only where it is recorded more than once.
    fn attach(
        &mut self,
        change: Change,
        below: &mut Comparison,
        pe: impl FnOnce() -> PathElement,
        siblings: usize,
    ) {
        let mut uses = usize::from(change != Change::Same)
            + usize::from(!below.added.is_empty())
            + usize::from(!below.modified.is_empty())
            + usize::from(!below.removed.is_empty());
        if uses == 0 {
            return;
        }
        let mut pe = Some(pe());
        let mut next = || {
            uses = uses.saturating_sub(1);
            if uses == 0 { pe.take() } else { pe.clone() }
        };
        let members = match change {
            Change::Same => None,
            Change::Added => Some(&mut self.added.members),
            Change::Modified => Some(&mut self.modified.members),
            Change::Removed => Some(&mut self.removed.members),
        };
        if let Some(members) = members {
            reserve_once(members, siblings);
            members.extend(next());
        }
        for (set, below) in [
            (&mut self.added, &mut below.added),
            (&mut self.modified, &mut below.modified),
            (&mut self.removed, &mut below.removed),
        ] {
            if !below.is_empty() {
                reserve_once(&mut set.children, siblings);
                let below = std::mem::take(below);
                set.children.extend(next().map(|pe| (pe, below)));
            }
        }
    }

    fn sort(&mut self) {
        self.added.sort();
        self.modified.sort();
        self.removed.sort();
    }
}

/// A level that records one child usually records many (a new map, a new list): it is sized
/// once, for all the siblings it may record.
fn reserve_once<T>(level: &mut Vec<T>, siblings: usize) {
    if level.capacity() == 0 {
        level.reserve_exact(siblings);
    }
}

/// How a compared value changed, as a member of its parent's level.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Same,
    Added,
    Modified,
    Removed,
}

impl Change {
    /// A map or list that exists on one side only is itself added or removed.
    fn presence(lhs: Option<&Value>, rhs: Option<&Value>) -> Change {
        match (lhs, rhs) {
            (None, _) => Change::Added,
            (_, None) => Change::Removed,
            _ => Change::Same,
        }
    }

    fn leaf(
        lhs: Option<&Value>,
        rhs: Option<&Value>,
        equal: impl FnOnce(&Value, &Value) -> bool,
    ) -> Change {
        match (lhs, rhs) {
            (Some(l), Some(r)) if !equal(l, r) => Change::Modified,
            _ => Change::presence(lhs, rhs),
        }
    }
}

fn equal_values(l: &Value, r: &Value) -> bool {
    compare_values(l, r) == std::cmp::Ordering::Equal
}

/// How a comparison sees the objects it walks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum View {
    /// As they are.
    Raw,
    /// As upstream's typed conversion sees a stored object (what `FieldManager::as_typed`
    /// makes of it by copying): the fields Go types always carry (see [`zero_fields`]) are
    /// visited as their zero values where absent, and `metadata.managedFields` is not
    /// visited. `TypedRoot` is the object itself, which also gets an empty `metadata` when
    /// its schema has one; `TypedMetadata` is its `metadata`.
    Typed,
    TypedRoot {
        metadata: bool,
    },
    TypedMetadata,
}

impl View {
    fn field(self, key: &str) -> View {
        match self {
            View::Raw => View::Raw,
            View::TypedRoot { .. } if key == "metadata" => View::TypedMetadata,
            _ => View::Typed,
        }
    }

    fn item(self) -> View {
        match self {
            View::Raw => View::Raw,
            _ => View::Typed,
        }
    }
}

static EMPTY_OBJECT: LazyLock<Value> = LazyLock::new(|| Value::Object(Map::new()));
static NULL: Value = Value::Null;

/// The entries of a map in key order, as a [`View`] sees them.
enum Entries<'v> {
    InOrder(serde_json::map::Iter<'v>),
    Listed(std::vec::IntoIter<(&'v str, &'v Value)>),
}

impl<'v> Entries<'v> {
    /// The entries of `map`, of type `m`, whose zero fields (see [`Entries::zeros`]) are
    /// `zeros`.
    fn of(
        map: &'v Map<String, Value>,
        m: &MapType<'_>,
        view: View,
        zeros: &[(&'static str, Zero)],
    ) -> Entries<'v> {
        let missing = |field: &str| !map.contains_key(field) && m.is_field(field);
        let root_metadata =
            matches!(view, View::TypedRoot { metadata: true }) && !map.contains_key("metadata");
        let skip_managed = view == View::TypedMetadata && map.contains_key("managedFields");
        let add_zeros = zeros.iter().any(|(field, _)| missing(field));
        if !root_metadata && !skip_managed && !add_zeros && maps_in_key_order() {
            return Entries::InOrder(map.iter());
        }
        let mut listed: Vec<(&'v str, &'v Value)> = map
            .iter()
            .filter(|(k, _)| !(skip_managed && *k == "managedFields"))
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        if root_metadata {
            listed.push(("metadata", &EMPTY_OBJECT));
        }
        for (field, zero) in zeros {
            if missing(field) && !(root_metadata && *field == "metadata") {
                let value = match zero {
                    Zero::Object => &*EMPTY_OBJECT,
                    Zero::Null => &NULL,
                };
                listed.push((field, value));
            }
        }
        listed.sort_by(|a, b| a.0.cmp(b.0));
        Entries::Listed(listed.into_iter())
    }

    /// The zero fields a view adds to maps of type `m`.
    fn zeros(m: &MapType<'_>, view: View) -> &'static [(&'static str, Zero)] {
        match (view, m.definition) {
            (View::Raw, _) | (_, None) => &[],
            (_, Some(definition)) => zero_fields(definition),
        }
    }

    fn len(&self) -> usize {
        match self {
            Entries::InOrder(it) => it.len(),
            Entries::Listed(it) => it.len(),
        }
    }
}

impl<'v> Iterator for Entries<'v> {
    type Item = (&'v str, &'v Value);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Entries::InOrder(it) => it.next().map(|(k, v)| (k.as_str(), v)),
            Entries::Listed(it) => it.next(),
        }
    }
}

/// The entries of two maps paired by key, in key order.
struct Paired<'v> {
    l: Option<Entries<'v>>,
    r: Option<Entries<'v>>,
    l_next: Option<(&'v str, &'v Value)>,
    r_next: Option<(&'v str, &'v Value)>,
}

impl<'v> Paired<'v> {
    fn new(mut l: Option<Entries<'v>>, mut r: Option<Entries<'v>>) -> Self {
        let l_next = l.as_mut().and_then(Iterator::next);
        let r_next = r.as_mut().and_then(Iterator::next);
        Self {
            l,
            r,
            l_next,
            r_next,
        }
    }
}

impl<'v> Iterator for Paired<'v> {
    type Item = (&'v str, Option<&'v Value>, Option<&'v Value>);

    fn next(&mut self) -> Option<Self::Item> {
        let order = match (self.l_next, self.r_next) {
            (Some((lk, _)), Some((rk, _))) => lk.cmp(rk),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => return None,
        };
        let take_l = order != std::cmp::Ordering::Greater;
        let take_r = order != std::cmp::Ordering::Less;
        let l = if take_l {
            std::mem::replace(&mut self.l_next, self.l.as_mut().and_then(Iterator::next))
        } else {
            None
        };
        let r = if take_r {
            std::mem::replace(&mut self.r_next, self.r.as_mut().and_then(Iterator::next))
        } else {
            None
        };
        let key = l.or(r).map(|(k, _)| k)?;
        Some((key, l.map(|(_, v)| v), r.map(|(_, v)| v)))
    }
}

/// Index of the items of a list by path element, keeping first-seen order. Items sharing a
/// key (which live objects may have) are all kept, in order.
type ItemIndex<'v> = (Vec<PathElement>, BTreeMap<PathElement, Vec<&'v Value>>);

/// The walks, over one set of compiled schemas.
#[derive(Clone, Copy)]
pub(crate) struct Typed<'s> {
    schemas: &'s Schemas,
}

impl<'s> Typed<'s> {
    pub(crate) fn new(schemas: &'s Schemas) -> Self {
        Self { schemas }
    }

    /// The schema's view of a value, given the values it will be walked with.
    fn kind(&self, t: TypeRef, values: &[Option<&Value>]) -> Kind<'s> {
        let present = || values.iter().flatten();
        let all_objects = || present().all(|v| v.is_null() || v.is_object());
        let all_arrays = || present().all(|v| v.is_null() || v.is_array());
        let deduced = || {
            if present().any(|v| v.is_object()) && all_objects() {
                Kind::Map(MapType {
                    definition: None,
                    fields: None,
                    elem: None,
                })
            } else {
                Kind::Leaf
            }
        };
        let id = match t {
            TypeRef::Deduced => return deduced(),
            TypeRef::Node(id) | TypeRef::Keyed(id, _) => id,
        };
        let node = self.schemas.node(id);
        match &node.shape {
            Shape::Object {
                properties,
                additional,
                atomic,
            } => {
                let definition = node.definition.as_deref();
                if *atomic || definition.is_some_and(is_atomic_struct) || !all_objects() {
                    return Kind::Leaf;
                }
                Kind::Map(MapType {
                    definition,
                    fields: Some(properties),
                    elem: *additional,
                })
            }
            Shape::Array { items, strategy } => {
                let keys = match (t, strategy) {
                    (TypeRef::Keyed(_, keyed), _) => Keys::Map(keyed.keys, keyed.defaults),
                    (_, MergeStrategy::ListMap(keys)) => Keys::Map(keys, &[]),
                    (_, MergeStrategy::ListSet) => Keys::Set,
                    _ => return Kind::Leaf,
                };
                if !all_arrays() {
                    return Kind::Leaf;
                }
                Kind::List(ListType {
                    elem: TypeRef::Node(*items),
                    keys,
                })
            }
            Shape::Any => deduced(),
            _ => Kind::Leaf,
        }
    }

    /// The path element of a list item (upstream's `listItemToPathElement`).
    fn item_element(list: &ListType, item: &Value) -> Result<PathElement, String> {
        match list.keys {
            Keys::Map(keys, defaults) => {
                let map =
                    match item {
                        Value::Object(map) => map,
                        Value::Null => {
                            return Err("associative list with keys may not have a null element"
                                .to_string());
                        }
                        _ => {
                            return Err("associative list with keys may not have non-map elements"
                                .to_string());
                        }
                    };
                let mut fields = Vec::with_capacity(keys.len());
                for key in keys {
                    let value = match map.get(*key) {
                        Some(v) => v.clone(),
                        None => match defaults.iter().find(|(name, _)| name == key) {
                            Some((_, default)) => Value::String((*default).to_string()),
                            None => {
                                return Err(format!(
                                    "associative list with keys has an element that omits key field {key:?} (and doesn't have default value)"
                                ));
                            }
                        },
                    };
                    fields.push(((*key).to_string(), Val(value)));
                }
                fields.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(PathElement::Key(fields))
            }
            Keys::Set => match item {
                Value::Object(_) => Err(
                    "associative list without keys has an element that's a map type".to_string(),
                ),
                Value::Array(_) => {
                    Err("not supported: associative list with lists as elements".to_string())
                }
                Value::Null => Err(
                    "associative list without keys has an element that's an explicit null"
                        .to_string(),
                ),
                scalar => Ok(PathElement::Value(Val(scalar.clone()))),
            },
        }
    }

    fn index<'v>(
        list: &ListType,
        items: &'v [Value],
        path: &[PathElement],
    ) -> Result<ItemIndex<'v>, TypedError> {
        let mut order = Vec::with_capacity(items.len());
        let mut by_key: BTreeMap<PathElement, Vec<&'v Value>> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            let pe = Self::item_element(list, item)
                .map_err(|m| TypedError::at(path, format!("element {i}: {m}")))?;
            match by_key.get_mut(&pe) {
                Some(same) => same.push(item),
                None => {
                    order.push(pe.clone());
                    by_key.insert(pe, vec![item]);
                }
            }
        }
        Ok((order, by_key))
    }

    /// Checks what the walks need of an apply configuration: list items carry their keys and
    /// are unique (upstream validates the configuration this strictly; live objects less).
    pub(crate) fn validate(&self, v: &Value, t: TypeRef) -> Result<(), TypedError> {
        self.validate_at(v, t, 0)
    }

    /// Errors carry the path below `v`; the callers add theirs as the error goes up.
    fn validate_at(&self, v: &Value, t: TypeRef, depth: usize) -> Result<(), TypedError> {
        if depth > MAX_DEPTH {
            return Err(TypedError::at(&[], "nested too deeply".to_string()));
        }
        match self.kind(t, &[Some(v)]) {
            Kind::Leaf => Ok(()),
            Kind::Map(m) => {
                if let Value::Object(map) = v {
                    for (k, child) in map {
                        self.validate_at(child, m.field_type(k), depth + 1)
                            .map_err(|e| e.within(&PathElement::field(k)))?;
                    }
                }
                Ok(())
            }
            Kind::List(l) => {
                let Value::Array(items) = v else {
                    return Ok(());
                };
                let (order, by_key) = Self::index(&l, items, &[])?;
                for pe in &order {
                    if by_key.get(pe).is_some_and(|same| same.len() > 1) {
                        return Err(TypedError::at(
                            &[],
                            format!("duplicate entries for key {pe}"),
                        ));
                    }
                }
                for (pe, same) in by_key {
                    for item in same {
                        self.validate_at(item, l.elem, depth + 1)
                            .map_err(|e| e.within(&pe))?;
                    }
                }
                Ok(())
            }
        }
    }

    /// The fields a value sets (upstream's `ToFieldSet`): leaves, list items, and map
    /// entries; struct fields only as leaves.
    pub(crate) fn field_set(&self, v: &Value, t: TypeRef) -> Result<Set, TypedError> {
        // The value itself is the empty path, which no set holds.
        let (_, below) = self.fields_of(v, t, 0)?;
        Ok(below)
    }

    /// Whether a value is itself a field (a leaf), and the fields below it. Errors carry the
    /// path below `v`; the callers add theirs as the error goes up.
    fn fields_of(&self, v: &Value, t: TypeRef, depth: usize) -> Result<(bool, Set), TypedError> {
        if depth > MAX_DEPTH {
            return Ok((true, Set::default()));
        }
        let mut below = Set::default();
        match self.kind(t, &[Some(v)]) {
            Kind::Leaf => return Ok((true, below)),
            Kind::Map(m) => {
                if let Value::Object(map) = v {
                    for (k, child) in map {
                        let field = m.field(k);
                        let (leaf, below_child) = self
                            .fields_of(child, m.type_of(k, field), depth + 1)
                            .map_err(|e| e.within(&PathElement::field(k)))?;
                        // Map entries are fields; struct fields only as leaves.
                        below.append(PathElement::field(k), leaf || field.is_none(), below_child);
                    }
                }
            }
            Kind::List(l) => {
                if let Value::Array(items) = v {
                    let (_, by_key) = Self::index(&l, items, &[])?;
                    for (pe, same) in by_key {
                        let mut fields = Set::default();
                        for item in same {
                            let (_, of_item) = self
                                .fields_of(item, l.elem, depth + 1)
                                .map_err(|e| e.within(&pe))?;
                            fields = fields.union_owned(of_item);
                        }
                        below.append(pe, true, fields);
                    }
                }
            }
        }
        below.sort();
        Ok((false, below))
    }

    /// What changed from `lhs` to `rhs` (upstream's `Compare`).
    pub(crate) fn compare(
        &self,
        lhs: &Value,
        rhs: &Value,
        t: TypeRef,
    ) -> Result<Comparison, TypedError> {
        self.compare_root(lhs, rhs, t, View::Raw)
    }

    /// What changed from `lhs` to `rhs` once both are seen as upstream's typed conversion
    /// sees stored objects: the same as comparing `FieldManager::as_typed` copies of them.
    pub(crate) fn compare_typed(
        &self,
        lhs: &Value,
        rhs: &Value,
        t: TypeRef,
    ) -> Result<Comparison, TypedError> {
        let metadata = match t {
            TypeRef::Node(id) | TypeRef::Keyed(id, _) => {
                self.schemas.field(id, "metadata").is_some()
            }
            TypeRef::Deduced => false,
        };
        self.compare_root(lhs, rhs, t, View::TypedRoot { metadata })
    }

    fn compare_root(
        &self,
        lhs: &Value,
        rhs: &Value,
        t: TypeRef,
        view: View,
    ) -> Result<Comparison, TypedError> {
        let mut c = Comparison::default();
        // The object itself is the empty path, which no set holds.
        self.compare_at(Some(lhs), Some(rhs), t, view, &mut c, 0)?;
        Ok(c)
    }

    /// Compares two values (`None` is absent), recording in `c` what changed below them and
    /// answering how they changed themselves. Errors carry the path below this value; the
    /// callers add theirs as the error goes up.
    fn compare_at(
        &self,
        lhs: Option<&Value>,
        rhs: Option<&Value>,
        t: TypeRef,
        view: View,
        c: &mut Comparison,
        depth: usize,
    ) -> Result<Change, TypedError> {
        if lhs.is_none() && rhs.is_none() {
            return Ok(Change::Same);
        }
        let kind = if depth > MAX_DEPTH {
            Kind::Leaf
        } else {
            self.kind(t, &[lhs, rhs])
        };
        match kind {
            Kind::Leaf => Ok(Change::leaf(lhs, rhs, equal_values)),
            Kind::Map(m) => {
                let zeros = Entries::zeros(&m, view);
                let (l, r) = (
                    lhs.and_then(Value::as_object)
                        .map(|map| Entries::of(map, &m, view, zeros)),
                    rhs.and_then(Value::as_object)
                        .map(|map| Entries::of(map, &m, view, zeros)),
                );
                let (l_len, r_len) = (
                    l.as_ref().map_or(0, Entries::len),
                    r.as_ref().map_or(0, Entries::len),
                );
                if l_len == 0 && r_len == 0 {
                    // Maps that are empty as the view sees them are equal, whatever fields
                    // it does not visit they hold.
                    return Ok(Change::leaf(lhs, rhs, |l, r| {
                        (l.is_object() && r.is_object()) || equal_values(l, r)
                    }));
                }
                let mut below = Comparison::default();
                for (k, lv, rv) in Paired::new(l, r) {
                    let field = || PathElement::field(k);
                    let t = m.field_type(k);
                    let change = self
                        .compare_at(lv, rv, t, view.field(k), &mut below, depth + 1)
                        .map_err(|e| e.within(&field()))?;
                    c.attach(change, &mut below, field, l_len.max(r_len));
                }
                Ok(Change::presence(lhs, rhs))
            }
            Kind::List(list) => {
                let (l, r) = (
                    lhs.and_then(Value::as_array).map(Vec::as_slice),
                    rhs.and_then(Value::as_array).map(Vec::as_slice),
                );
                if l.is_none_or(<[Value]>::is_empty) && r.is_none_or(<[Value]>::is_empty) {
                    return Ok(Change::leaf(lhs, rhs, equal_values));
                }
                let (l_order, l_items) = Self::index(&list, l.unwrap_or_default(), &[])?;
                let (r_order, r_items) = Self::index(&list, r.unwrap_or_default(), &[])?;
                // Upstream compares the first item of each key and ignores repeats.
                fn first<'v>(
                    items: &BTreeMap<PathElement, Vec<&'v Value>>,
                    pe: &PathElement,
                ) -> Option<&'v Value> {
                    items.get(pe).and_then(|v| v.first().copied())
                }
                let siblings = l_order.len().max(r_order.len());
                let only_left = l_order.iter().filter(|pe| !r_items.contains_key(*pe));
                let mut below = Comparison::default();
                for pe in r_order.iter().chain(only_left) {
                    let (lv, rv) = (first(&l_items, pe), first(&r_items, pe));
                    let change = self
                        .compare_at(lv, rv, list.elem, view.item(), &mut below, depth + 1)
                        .map_err(|e| e.within(pe))?;
                    c.attach(change, &mut below, || pe.clone(), siblings);
                }
                c.sort();
                Ok(Change::presence(lhs, rhs))
            }
        }
    }

    /// Merges `rhs` into `lhs`, `rhs` winning on leaves (upstream's `Merge` with its
    /// keep-RHS rule). `None` is an absent value.
    pub(crate) fn merge(
        &self,
        lhs: Option<&Value>,
        rhs: Option<&Value>,
        t: TypeRef,
    ) -> Result<Option<Value>, TypedError> {
        self.merge_at(lhs, rhs, t, 0)
    }

    /// Errors carry the path below the merged values; the callers add theirs as the error
    /// goes up.
    fn merge_at(
        &self,
        lhs: Option<&Value>,
        rhs: Option<&Value>,
        t: TypeRef,
        depth: usize,
    ) -> Result<Option<Value>, TypedError> {
        let keep_rhs = || rhs.or(lhs).cloned();
        if depth > MAX_DEPTH {
            return Ok(keep_rhs());
        }
        match self.kind(t, &[lhs, rhs]) {
            Kind::Leaf => Ok(keep_rhs()),
            Kind::Map(m) => {
                let (l, r) = (
                    lhs.and_then(Value::as_object),
                    rhs.and_then(Value::as_object),
                );
                if l.is_none_or(Map::is_empty) && r.is_none_or(Map::is_empty) {
                    return Ok(keep_rhs());
                }
                let mut out = Vec::with_capacity(l.map_or(0, Map::len).max(r.map_or(0, Map::len)));
                let paired = Paired::new(
                    l.map(|map| Entries::of(map, &m, View::Raw, &[])),
                    r.map(|map| Entries::of(map, &m, View::Raw, &[])),
                );
                for (k, lv, rv) in paired {
                    let t = m.field_type(k);
                    let merged = self
                        .merge_at(lv, rv, t, depth + 1)
                        .map_err(|e| e.within(&PathElement::field(k)))?;
                    // A null leaves the field unset once the object is typed again.
                    if let Some(v) = merged.filter(|v| !v.is_null()) {
                        out.push((k.to_string(), v));
                    }
                }
                Ok(Some(Value::Object(out.into_iter().collect())))
            }
            Kind::List(list) => {
                let (l, r) = (
                    lhs.and_then(Value::as_array).map(Vec::as_slice),
                    rhs.and_then(Value::as_array).map(Vec::as_slice),
                );
                if l.is_none_or(<[Value]>::is_empty) && r.is_none_or(<[Value]>::is_empty) {
                    return Ok(keep_rhs());
                }
                let items =
                    self.merge_list(&list, l.unwrap_or_default(), r.unwrap_or_default(), depth)?;
                Ok(Some(Value::Array(items)))
            }
        }
    }

    /// Merges list items by key, in upstream's order: live items keep their places, new items
    /// come where the configuration puts them relative to the items both share.
    fn merge_list(
        &self,
        list: &ListType,
        lhs: &[Value],
        rhs: &[Value],
        depth: usize,
    ) -> Result<Vec<Value>, TypedError> {
        let (r_order, r_items) = Self::index(list, rhs, &[])?;
        if let Some(pe) = r_order
            .iter()
            .find(|pe| r_items.get(*pe).is_some_and(|v| v.len() > 1))
        {
            return Err(TypedError::at(
                &[],
                format!("duplicate entries for key {pe}"),
            ));
        }
        let (l_order, l_items) = Self::index(list, lhs, &[])?;
        let mut shared = r_order
            .iter()
            .filter(|pe| l_items.contains_key(*pe))
            .collect::<Vec<_>>()
            .into_iter();
        let mut next_shared = shared.next();
        let mut out = Vec::with_capacity(lhs.len().max(rhs.len()));
        let place = |pe: &PathElement, out: &mut Vec<Value>| {
            let live = l_items.get(pe).map(Vec::as_slice).unwrap_or_default();
            let config = r_items.get(pe).and_then(|v| v.first().copied());
            if live.len() > 1 {
                // Live items sharing a key are kept as they are, or replaced together by the
                // configuration's item.
                match config {
                    Some(item) => out.push(item.clone()),
                    None => out.extend(live.iter().map(|v| (*v).clone())),
                }
                return Ok(());
            }
            let merged = self
                .merge_at(live.first().copied(), config, list.elem, depth + 1)
                .map_err(|e| e.within(pe))?;
            if let Some(v) = merged {
                out.push(v);
            }
            Ok::<(), TypedError>(())
        };
        let (mut li, mut ri) = (0, 0);
        while li < l_order.len() || ri < r_order.len() {
            let before = (li, ri);
            if let (Some(lpe), Some(rpe)) = (l_order.get(li), r_order.get(ri)) {
                if lpe == rpe {
                    place(lpe, &mut out)?;
                    li += 1;
                    ri += 1;
                    next_shared = shared.next();
                    continue;
                }
                if r_items.contains_key(lpe) && next_shared.is_some_and(|n| n != lpe) {
                    // A shared item, but not the one to place now: it comes with the
                    // configuration's order.
                    li += 1;
                    continue;
                }
            }
            if let Some(lpe) = l_order.get(li)
                && !r_items.contains_key(lpe)
            {
                place(lpe, &mut out)?;
                li += 1;
                continue;
            }
            if let Some(rpe) = r_order.get(ri) {
                place(rpe, &mut out)?;
                ri += 1;
                if next_shared == Some(rpe) {
                    next_shared = shared.next();
                }
            }
            if (li, ri) == before {
                // A shared live item whose configuration item is already placed.
                li += 1;
            }
        }
        Ok(out)
    }

    /// Removes the paths of `set` that are members (upstream's `RemoveItems`). `None` when
    /// nothing is left of a map or list.
    pub(crate) fn remove_items(&self, v: &Value, set: &Set, t: TypeRef) -> Option<Value> {
        self.remove_at(v, set, t, 0)
    }

    fn remove_at(&self, v: &Value, set: &Set, t: TypeRef, depth: usize) -> Option<Value> {
        if depth > MAX_DEPTH {
            return Some(v.clone());
        }
        match self.kind(t, &[Some(v)]) {
            Kind::Leaf => Some(v.clone()),
            Kind::Map(m) => {
                let map = v.as_object().filter(|m| !m.is_empty())?;
                let mut out = Vec::with_capacity(map.len());
                for (k, child) in map {
                    if set.has_field(k) {
                        continue;
                    }
                    match set.field_child(k) {
                        Some(sub) => {
                            if let Some(kept) =
                                self.remove_at(child, sub, m.field_type(k), depth + 1)
                            {
                                out.push((k.clone(), kept));
                            }
                        }
                        None => out.push((k.clone(), child.clone())),
                    }
                }
                (!out.is_empty()).then(|| Value::Object(out.into_iter().collect()))
            }
            Kind::List(list) => {
                let items = v.as_array().filter(|a| !a.is_empty())?;
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    let Ok(pe) = Self::item_element(&list, item) else {
                        out.push(item.clone());
                        continue;
                    };
                    if set.has_member(&pe) {
                        continue;
                    }
                    match set.child(&pe) {
                        Some(sub) => out.push(
                            self.remove_at(item, sub, list.elem, depth + 1)
                                .unwrap_or(Value::Null),
                        ),
                        None => out.push(item.clone()),
                    }
                }
                (!out.is_empty()).then_some(Value::Array(out))
            }
        }
    }

    /// Adds as members the struct fields that only have children in `set` (upstream's
    /// `EnsureNamedFieldsAreMembers`), so that removing them removes whole structs.
    pub(crate) fn ensure_named_fields(&self, mut set: Set, t: TypeRef) -> Set {
        self.ensure_at(&mut set, Some(t));
        set
    }

    fn ensure_at(&self, set: &mut Set, t: Option<TypeRef>) {
        let (map, list) = match t.map(|t| self.schema_kind(t)) {
            Some(Kind::Map(m)) => (Some(m), None),
            Some(Kind::List(l)) => (None, Some(l)),
            _ => (None, None),
        };
        let mut named = Vec::new();
        for (pe, child) in &mut set.children {
            let child_type = match (&*pe, map, list) {
                (PathElement::Field(name), Some(m), _) => {
                    if m.is_field(name) {
                        named.push(pe.clone());
                    }
                    Some(m.field_type(name))
                }
                (PathElement::Key(_), _, Some(l)) => Some(l.elem),
                _ => None,
            };
            self.ensure_at(child, child_type);
        }
        if !named.is_empty() {
            set.add_members(named);
        }
    }

    /// The kind of a type regardless of any value: what `ensure_named_fields` walks by.
    fn schema_kind(&self, t: TypeRef) -> Kind<'s> {
        match t {
            TypeRef::Deduced => Kind::Map(MapType {
                definition: None,
                fields: None,
                elem: None,
            }),
            TypeRef::Node(id) | TypeRef::Keyed(id, _) => {
                let node = self.schemas.node(id);
                match &node.shape {
                    Shape::Object {
                        properties,
                        additional,
                        ..
                    } => Kind::Map(MapType {
                        definition: node.definition.as_deref(),
                        fields: Some(properties),
                        elem: *additional,
                    }),
                    Shape::Any => self.schema_kind(TypeRef::Deduced),
                    Shape::Array { .. } => self.kind(t, &[]),
                    _ => Kind::Leaf,
                }
            }
        }
    }

    /// Adds the fields a Go zero value always carries (see [`zero_fields`]), for
    /// comparisons that must see objects as upstream's typed conversion does.
    pub(crate) fn fill_zero_fields(&self, v: &mut Value, t: TypeRef) {
        self.fill_at(v, t, 0);
    }

    fn fill_at(&self, v: &mut Value, t: TypeRef, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        match self.kind(t, &[Some(v)]) {
            Kind::Leaf => {}
            Kind::Map(m) => {
                let Value::Object(map) = v else {
                    return;
                };
                for (field, zero) in m.definition.map(zero_fields).unwrap_or_default() {
                    if m.is_field(field) && !map.contains_key(*field) {
                        let value = match zero {
                            Zero::Object => Value::Object(Map::new()),
                            Zero::Null => Value::Null,
                        };
                        map.insert((*field).to_string(), value);
                    }
                }
                for (k, child) in map.iter_mut() {
                    self.fill_at(child, m.field_type(k), depth + 1);
                }
            }
            Kind::List(list) => {
                if let Value::Array(items) = v {
                    for item in items {
                        self.fill_at(item, list.elem, depth + 1);
                    }
                }
            }
        }
    }
}
