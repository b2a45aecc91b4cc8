//! Property tests: the field manager behaves exactly as the reference implementation (the
//! code before its walks and sets were optimised, in `reference`) on random sequences of
//! updates and applies to realistic objects, randomly mutated, including their managed
//! fields.

use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::{Map, Value, json};

use super::FieldManager;
use super::reference;
use super::set::{Set, fields_v1_remove, fields_v1_union, is_canonical_fields_v1};
use super::typed::{TypeRef, Typed};
use crate::{Registry, ResourceDef, kinds, meta};

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::builtin)
}

/// A kind the tests write: its resource and the apply configuration they start from.
struct Kind {
    def: &'static ResourceDef,
    api_version: &'static str,
    base: fn() -> Value,
    config: fn() -> Value,
}

fn kinds() -> [Kind; 3] {
    let def = |group: &str, plural: &str| {
        registry()
            .get(group, "v1", plural)
            .expect("served resource")
    };
    [
        Kind {
            def: def("", "pods"),
            api_version: "v1",
            base: || {
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "p", "namespace": "default",
                                 "labels": {"app": "web", "shard": "3"}},
                    "spec": {"containers": [{
                        "name": "app", "image": "registry.local/app:1.0",
                        "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}],
                        "env": [{"name": "A", "value": "1"}],
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}
                    }]}
                })
            },
            config: || {
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "p", "namespace": "default", "labels": {"app": "web"}},
                    "spec": {"containers": [{
                        "name": "app", "image": "registry.local/app:2.0",
                        "ports": [{"containerPort": 8080}]
                    }]}
                })
            },
        },
        Kind {
            def: def("apps", "deployments"),
            api_version: "apps/v1",
            base: || {
                json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "d", "namespace": "default", "labels": {"app": "web"},
                                 "finalizers": ["a", "b"]},
                    "spec": {
                        "replicas": 2,
                        "selector": {"matchLabels": {"app": "web"}},
                        "template": {
                            "metadata": {"labels": {"app": "web"}},
                            "spec": {"containers": [
                                {"name": "web", "image": "web:1",
                                 "ports": [{"containerPort": 80, "name": "http"}]},
                                {"name": "side", "image": "side:1"}
                            ]}
                        }
                    }
                })
            },
            config: || {
                json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "d", "namespace": "default", "labels": {"app": "web"}},
                    "spec": {
                        "replicas": 3,
                        "selector": {"matchLabels": {"app": "web"}},
                        "template": {
                            "metadata": {"labels": {"app": "web"}},
                            "spec": {"containers": [
                                {"name": "web", "image": "web:2",
                                 "env": [{"name": "MODE", "value": "prod"}]}
                            ]}
                        }
                    }
                })
            },
        },
        Kind {
            def: def("", "services"),
            api_version: "v1",
            base: || {
                json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "s", "namespace": "default"},
                    "spec": {"selector": {"app": "web"},
                             "ports": [{"port": 80, "targetPort": 8080, "name": "http"}]}
                })
            },
            config: || {
                json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "s", "namespace": "default"},
                    "spec": {"selector": {"app": "web"},
                             "ports": [{"port": 80, "targetPort": 8080, "name": "http"},
                                       {"port": 53, "protocol": "UDP", "name": "dns"}]}
                })
            },
        },
    ]
}

/// A new object as the REST layer hands it to the field manager.
fn admitted(def: &ResourceDef, mut obj: Value) -> Value {
    meta::set_meta(&mut obj, "uid", json!("u-1"));
    meta::set_meta(&mut obj, "creationTimestamp", json!("2024-05-01T10:00:00Z"));
    kinds::prepare_create(def, &mut obj);
    kinds::apply_defaults(def, &mut obj);
    obj
}

/// Names the mutations use for new keys: fields of the schemas (of several types, so that
/// values land where they do not fit), map keys and the fields the field manager treats
/// specially.
const NAMES: &[&str] = &[
    "name",
    "image",
    "labels",
    "app",
    "spec",
    "status",
    "metadata",
    "resources",
    "requests",
    "containers",
    "ports",
    "protocol",
    "containerPort",
    "template",
    "strategy",
    "finalizers",
    "annotations",
    "managedFields",
    "selector",
    "x",
];

fn scalar(n: u8) -> Value {
    match n % 8 {
        0 => json!(format!("v{}", n / 8)),
        1 => json!(n),
        2 => json!(f64::from(n) + 0.5),
        3 => json!(true),
        4 => Value::Null,
        5 => json!({}),
        6 => json!([]),
        _ => json!({"name": format!("n{}", n / 8), "containerPort": n}),
    }
}

/// One random change: at the `at`-th value of the object (in a depth-first walk), do `what`
/// with the parameter `n`.
#[derive(Clone, Debug)]
struct Op {
    at: usize,
    what: u8,
    n: u8,
}

fn op() -> impl Strategy<Value = Op> {
    (any::<usize>(), 0u8..7, any::<u8>()).prop_map(|(at, what, n)| Op { at, what, n })
}

/// The pointers of every value of `v`, depth first.
fn pointers(v: &Value, prefix: &str, out: &mut Vec<String>) {
    out.push(prefix.to_string());
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let k = k.replace('~', "~0").replace('/', "~1");
                pointers(child, &format!("{prefix}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                pointers(child, &format!("{prefix}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn mutate(v: &mut Value, ops: &[Op]) {
    for op in ops {
        let mut all = Vec::new();
        pointers(v, "", &mut all);
        let Some(pointer) = all.get(op.at % all.len()).cloned() else {
            continue;
        };
        let (parent, last) = pointer.rsplit_once('/').unwrap_or(("", ""));
        let name = NAMES[usize::from(op.n) % NAMES.len()];
        let Some(target) = v.pointer_mut(&pointer) else {
            continue;
        };
        match op.what {
            0 => *target = scalar(op.n),
            1 if !pointer.is_empty() => match v.pointer_mut(parent) {
                Some(Value::Object(map)) => {
                    map.remove(&last.replace("~1", "/").replace("~0", "~"));
                }
                Some(Value::Array(items)) => {
                    if let Ok(i) = last.parse::<usize>()
                        && i < items.len()
                    {
                        items.remove(i);
                    }
                }
                _ => {}
            },
            2 => match target {
                Value::Object(map) => {
                    map.insert(name.to_string(), scalar(op.n / 3));
                }
                Value::Array(items) => {
                    let item = match items.first() {
                        Some(Value::Object(first)) => {
                            let mut item = first.clone();
                            for key in ["name", "containerPort", "port"] {
                                if item.contains_key(key) {
                                    item.insert(
                                        key.to_string(),
                                        scalar((op.n / 3).wrapping_mul(8)),
                                    );
                                }
                            }
                            Value::Object(item)
                        }
                        _ => scalar(op.n),
                    };
                    items.push(item);
                }
                other => *other = json!({ name: scalar(op.n / 3) }),
            },
            // Repeated list items, which live objects may have and configurations may not.
            3 => {
                if let Value::Array(items) = target
                    && let Some(item) = items.get(usize::from(op.n) % items.len().max(1))
                {
                    items.push(item.clone());
                }
            }
            4 => {
                if let Value::Array(items) = target {
                    items.reverse();
                } else if let Value::Object(map) = target {
                    map.clear();
                }
            }
            5 => {
                if let Value::String(s) = target {
                    s.push_str(&op.n.to_string());
                } else if let Value::Object(map) = target {
                    let keys: Vec<String> = map.keys().cloned().collect();
                    if let Some(k) = keys.get(usize::from(op.n) % keys.len().max(1))
                        && let Some(value) = map.remove(k)
                    {
                        map.insert(format!("{k}2"), value);
                    }
                }
            }
            _ => {
                if let Value::Number(n) = target {
                    *target = json!(n.as_f64().unwrap_or(0.0) + 1.0);
                } else {
                    *target = json!({});
                }
            }
        }
    }
}

/// One write of a sequence.
#[derive(Clone, Debug)]
enum Step {
    /// A create, update or patch by `manager` of the current object, changed by `ops`.
    Update {
        ops: Vec<Op>,
        manager: u8,
        subresource: u8,
        keep_managed: bool,
    },
    /// An apply of the kind's configuration, changed by `ops`.
    Apply {
        ops: Vec<Op>,
        manager: u8,
        subresource: u8,
        force: bool,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let ops = || prop::collection::vec(op(), 0..4);
    prop_oneof![
        3 => (ops(), 0u8..12, 0u8..6, any::<bool>()).prop_map(
            |(ops, manager, subresource, keep_managed)| Step::Update {
                ops,
                manager,
                subresource,
                keep_managed,
            }
        ),
        2 => (ops(), 0u8..4, 0u8..6, any::<bool>()).prop_map(
            |(ops, manager, subresource, force)| Step::Apply {
                ops,
                manager,
                subresource,
                force,
            }
        ),
    ]
}

fn manager_name(n: u8) -> String {
    match n {
        0 => "kubectl".to_string(),
        1 => String::new(),
        n => format!("m{n}"),
    }
}

fn subresource(n: u8) -> Option<&'static str> {
    match n {
        0 => Some("status"),
        1 => Some("scale"),
        _ => None,
    }
}

fn time(i: usize) -> String {
    // Equal times for some steps, so that ties between entries are broken as upstream does.
    format!("2024-05-01T10:{:02}:00Z", i / 2)
}

/// Runs the steps through both implementations, failing at the first difference. With
/// `own_labels`, each update is by a manager of its own that also sets a label of its own,
/// so that entries pile up.
fn same_as_reference(kind: &Kind, steps: &[Step], own_labels: bool) -> Result<(), TestCaseError> {
    let schemas = registry().schemas();
    let node = schemas
        .definition(kind.def.definition)
        .expect("served definition");
    let optimised = FieldManager::new(schemas, node);
    let reference = reference::FieldManager::new(schemas, node);
    let mut current: Option<Value> = None;
    for (i, step) in steps.iter().enumerate() {
        let now = time(i);
        match step {
            Step::Update {
                ops,
                manager,
                subresource: sub,
                keep_managed,
            } => {
                let mut new = match &current {
                    Some(obj) => obj.clone(),
                    None => admitted(kind.def, (kind.base)()),
                };
                if !keep_managed {
                    meta::remove_meta(&mut new, "managedFields");
                }
                mutate(&mut new, ops);
                let manager = match own_labels {
                    true => format!("u{i}"),
                    false => manager_name(*manager),
                };
                if own_labels && let Some(Value::Object(metadata)) = new.get_mut("metadata") {
                    let labels = metadata.entry("labels").or_insert_with(|| json!({}));
                    if !labels.is_object() {
                        *labels = json!({});
                    }
                    labels[format!("by-{manager}")] = json!(i.to_string());
                }
                let mut expected = new.clone();
                let sub = subresource(*sub);
                let want = reference
                    .update(
                        current.as_ref(),
                        &mut expected,
                        &manager,
                        kind.api_version,
                        sub,
                        &now,
                    )
                    .map_err(|e| e.to_string());
                let got = optimised
                    .update(
                        current.as_ref(),
                        &mut new,
                        &manager,
                        kind.api_version,
                        sub,
                        &now,
                    )
                    .map_err(|e| e.to_string());
                prop_assert_eq!(got, want, "step {}", i);
                prop_assert_eq!(&new, &expected, "step {}", i);
                if new.is_object() {
                    current = Some(new);
                }
            }
            Step::Apply {
                ops,
                manager,
                subresource: sub,
                force,
            } => {
                let mut config = (kind.config)();
                mutate(&mut config, ops);
                let manager = manager_name(*manager);
                let sub = subresource(*sub);
                let want = reference.apply(
                    current.as_ref(),
                    &config,
                    &manager,
                    kind.api_version,
                    sub,
                    *force,
                    &now,
                );
                let got = optimised.apply(
                    current.as_ref(),
                    &config,
                    &manager,
                    kind.api_version,
                    sub,
                    *force,
                    &now,
                );
                // The error types differ, but print alike.
                prop_assert_eq!(format!("{got:?}"), format!("{want:?}"), "step {}", i);
                if let Ok(mut obj) = got {
                    if meta::uid(&obj).is_empty() {
                        meta::set_meta(&mut obj, "uid", json!("u-1"));
                    }
                    current = Some(obj);
                }
            }
        }
    }
    Ok(())
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config(192))]

    #[test]
    fn writes_match_the_reference(
        kind in 0usize..3,
        steps in prop::collection::vec(step(), 1..6),
    ) {
        let kinds = kinds();
        same_as_reference(&kinds[kind], &steps, false)?;
    }
}

proptest! {
    #![proptest_config(config(32))]

    /// Long histories, with enough updaters for the oldest to merge into buckets.
    #[test]
    fn long_histories_match_the_reference(
        kind in 0usize..3,
        steps in prop::collection::vec(step(), 16..32),
    ) {
        let kinds = kinds();
        same_as_reference(&kinds[kind], &steps, true)?;
    }
}

proptest! {
    #![proptest_config(config(96))]

    /// Managed fields entries as clients may send them: odd FieldsV1, repeated and
    /// unordered entries, times in other forms.
    #[test]
    fn sent_managed_fields_match_the_reference(
        kind in 0usize..3,
        entries in prop::collection::vec(entry(), 0..4),
        ops in prop::collection::vec(op(), 0..3),
        manager in 0u8..4,
    ) {
        let kinds = kinds();
        let kind = &kinds[kind];
        let schemas = registry().schemas();
        let node = schemas.definition(kind.def.definition).expect("served definition");
        let optimised = FieldManager::new(schemas, node);
        let reference = reference::FieldManager::new(schemas, node);
        let mut old = admitted(kind.def, (kind.base)());
        optimised
            .update(None, &mut old, "creator", kind.api_version, None, &time(0))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut new = old.clone();
        meta::set_meta(&mut new, "managedFields", Value::Array(entries));
        mutate(&mut new, &ops);
        let mut expected = new.clone();
        let manager = manager_name(manager);
        let want = reference
            .update(Some(&old), &mut expected, &manager, kind.api_version, None, &time(3))
            .map_err(|e| e.to_string());
        let got = optimised
            .update(Some(&old), &mut new, &manager, kind.api_version, None, &time(3))
            .map_err(|e| e.to_string());
        prop_assert_eq!(got, want);
        prop_assert_eq!(new, expected);
    }
}

fn fields_v1() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("f:metadata".to_string()),
        Just("f:labels".to_string()),
        Just("f:spec".to_string()),
        Just("f:replicas".to_string()),
        Just("f:containers".to_string()),
        Just("f:managedFields".to_string()),
        Just(".".to_string()),
        Just(r#"k:{"name":"web"}"#.to_string()),
        Just(r#"k:{"name":"app"}"#.to_string()),
        Just(r#"k:{"protocol":"TCP","containerPort":80}"#.to_string()),
        Just(r#"k:{"containerPort":80,"protocol":"TCP"}"#.to_string()),
        Just(r#"k:{"containerPort":80.0,"protocol":"TCP"}"#.to_string()),
        Just(r#"v:"a""#.to_string()),
        Just("v:1".to_string()),
        Just("i:0".to_string()),
        Just("x:unknown".to_string()),
    ];
    let leaf = prop_oneof![
        Just(json!({})),
        Just(json!({".": {}})),
        Just(json!({".": 1}))
    ];
    leaf.prop_recursive(4, 24, 4, move |inner| {
        prop::collection::vec((key.clone(), inner), 0..4)
            .prop_map(|entries| Value::Object(entries.into_iter().collect::<Map<_, _>>()))
    })
}

fn entry() -> impl Strategy<Value = Value> {
    (
        0u8..4,
        prop_oneof![Just("Update"), Just("Apply"), Just("Patch")],
        prop_oneof![Just("v1"), Just("apps/v1"), Just("")],
        prop_oneof![
            Just(Value::Null),
            Just(json!("2024-05-01T10:00:00Z")),
            Just(json!("2024-05-01T12:00:00.123+02:00")),
            Just(json!("2024-05-01t10:00:00z")),
            Just(json!("2016-12-31T23:59:60Z")),
            Just(json!("2024-02-30T10:00:00Z")),
            Just(json!("0000-01-01T00:00:00Z")),
            Just(json!("2024-05-01T10:00:00.000Z")),
            Just(json!("yesterday")),
        ],
        prop_oneof![Just(Value::Null), Just(json!("status")), Just(json!(""))],
        fields_v1(),
        any::<bool>(),
    )
        .prop_map(
            |(manager, operation, api_version, time, subresource, fields, extra)| {
                let mut entry = json!({
                    "manager": manager_name(manager),
                    "operation": operation,
                    "apiVersion": api_version,
                    "time": time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields,
                    "subresource": subresource,
                });
                if extra {
                    entry["extra"] = json!(1);
                }
                entry
            },
        )
}

/// A set's paths, the way both implementations print them.
fn printed(paths: Vec<Vec<impl std::fmt::Display>>) -> Vec<String> {
    paths
        .into_iter()
        .map(|p| p.iter().map(ToString::to_string).collect())
        .collect()
}

proptest! {
    #![proptest_config(config(1000))]

    /// FieldsV1 reads and writes, and the set operations, as the reference's.
    #[test]
    fn sets_match_the_reference(a in fields_v1(), b in fields_v1()) {
        let decode = |v: &Value| Set::from_fields_v1(v);
        let decode_ref = |v: &Value| reference::set::Set::from_fields_v1(v);
        let (sa, ra) = (decode(&a), decode_ref(&a));
        let (sb, rb) = (decode(&b), decode_ref(&b));
        prop_assert_eq!(sa.as_ref().err(), ra.as_ref().err());
        prop_assert_eq!(sb.as_ref().err(), rb.as_ref().err());
        let (Ok(sa), Ok(ra), Ok(sb), Ok(rb)) = (sa, ra, sb, rb) else {
            return Ok(());
        };
        prop_assert_eq!(sa.to_fields_v1(), ra.to_fields_v1());
        prop_assert_eq!(printed(sa.paths()), printed(ra.paths()));
        prop_assert_eq!(sa.is_empty(), ra.is_empty());
        let pairs = [
            (sa.union(&sb), ra.union(&rb)),
            (sa.clone().union_owned(sb.clone()), ra.union(&rb)),
            (sa.intersection(&sb), ra.intersection(&rb)),
            (sa.difference(&sb), ra.difference(&rb)),
            (sb.difference(&sa), rb.difference(&ra)),
            (sa.recursive_difference(&sb), ra.recursive_difference(&rb)),
            (sb.recursive_difference(&sa), rb.recursive_difference(&ra)),
        ];
        for (i, (got, want)) in pairs.into_iter().enumerate() {
            prop_assert_eq!(got.to_fields_v1(), want.to_fields_v1(), "operation {}", i);
            prop_assert_eq!(got.is_empty(), want.is_empty(), "operation {}", i);
        }
        // FieldsV1 kept as read must be what encoding gives, and change as the set would.
        if let Value::Object(a) = &a && is_canonical_fields_v1(&json!(a)) {
            prop_assert_eq!(sa.to_fields_v1(), json!(a));
            let mut removed = a.clone();
            fields_v1_remove(&mut removed, &sb);
            prop_assert_eq!(json!(removed), ra.difference(&rb).to_fields_v1());
            let mut added = a.clone();
            fields_v1_union(&mut added, &sb);
            prop_assert_eq!(json!(added), ra.union(&rb).to_fields_v1());
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// The comparison of stored objects as typed, without copying them, finds exactly what
    /// the reference's comparison of typed copies finds.
    #[test]
    fn typed_comparisons_match_the_reference(
        kind in 0usize..3,
        old_ops in prop::collection::vec(op(), 0..4),
        new_ops in prop::collection::vec(op(), 0..4),
        created in any::<bool>(),
        keep_managed in any::<bool>(),
        bare_metadata in any::<bool>(),
    ) {
        let kinds = kinds();
        let kind = &kinds[kind];
        let schemas = registry().schemas();
        let node = schemas.definition(kind.def.definition).expect("served definition");
        let mut old = admitted(kind.def, (kind.base)());
        FieldManager::new(schemas, node)
            .update(None, &mut old, "creator", kind.api_version, None, &time(0))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        if bare_metadata {
            // Metadata holding nothing but managed fields is empty once typed.
            let managed = old["metadata"]["managedFields"].take();
            old["metadata"] = json!({"managedFields": managed});
        }
        mutate(&mut old, &old_ops);
        let mut new = old.clone();
        if !keep_managed {
            meta::remove_meta(&mut new, "managedFields");
        }
        mutate(&mut new, &new_ops);
        if created {
            old = json!({});
        }

        let got = Typed::new(schemas)
            .compare_typed(&old, &new, TypeRef::Node(node))
            .map(|c| [c.added, c.modified, c.removed].map(|s| s.to_fields_v1()))
            .map_err(|e| e.to_string());
        let fm = reference::FieldManager::new(schemas, node);
        let want = reference::typed::Typed::new(schemas)
            .compare(
                &fm.as_typed(&old),
                &fm.as_typed(&new),
                reference::typed::TypeRef::Node(node),
            )
            .map(|c| [c.added, c.modified, c.removed].map(|s| s.to_fields_v1()))
            .map_err(|e| e.to_string());
        prop_assert_eq!(got, want);
    }
}
