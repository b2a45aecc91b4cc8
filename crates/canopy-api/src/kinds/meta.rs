//! Validation of `metadata` (apimachinery's `ValidateObjectMeta*` plus core's finalizer
//! rule), of labels and annotations, and `metav1.LabelSelector` validation and matching.

use serde_json::{Map, Value};

use super::names::{self, NameFn};
use super::util::{
    Path, forbidden, get, immutable, int_of, invalid, list, obj, required, str_of, string_map,
    strings, too_long,
};
use crate::status::Cause;

/// Upstream's limit on the total size of annotation keys and values.
pub(crate) const TOTAL_ANNOTATION_SIZE_LIMIT: usize = 256 * 1024;

/// Finalizers core accepts without a `/` prefix.
const STANDARD_FINALIZERS: &[&str] = &["kubernetes", "orphan", "foregroundDeletion"];

fn meta(obj: &Value) -> &Value {
    static EMPTY: Value = Value::Null;
    get(obj, "metadata").unwrap_or(&EMPTY)
}

/// `ValidateLabels` of `meta/v1/validation`: keys are qualified names, values label values.
pub(crate) fn validate_labels(labels: &[(&str, &str)], path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    for (k, v) in labels {
        causes.extend(validate_label_name(k, path));
        for msg in names::label_value(v) {
            causes.push(invalid(path, *v, &msg));
        }
    }
    causes
}

/// `ValidateLabelName`.
pub(crate) fn validate_label_name(name: &str, path: &Path) -> Vec<Cause> {
    names::qualified_name(name)
        .into_iter()
        .map(|msg| invalid(path, name, &msg))
        .collect()
}

/// `ValidateQualifiedName`.
pub(crate) fn validate_qualified_name(name: &str, path: &Path) -> Vec<Cause> {
    validate_label_name(name, path)
}

/// `ValidateDNS1123Label`.
pub(crate) fn validate_dns1123_label(value: &str, path: &Path) -> Vec<Cause> {
    names::dns1123_label(value)
        .into_iter()
        .map(|msg| invalid(path, value, &msg))
        .collect()
}

/// `ValidateDNS1123Subdomain`.
pub(crate) fn validate_dns1123_subdomain(value: &str, path: &Path) -> Vec<Cause> {
    names::dns1123_subdomain(value)
        .into_iter()
        .map(|msg| invalid(path, value, &msg))
        .collect()
}

/// `ValidateAnnotations`: keys are case-insensitive qualified names, 256KiB in total.
pub(crate) fn validate_annotations(annotations: &[(&str, &str)], path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut total = 0usize;
    for (k, v) in annotations {
        for msg in names::qualified_name(&k.to_lowercase()) {
            causes.push(invalid(path, *k, &msg));
        }
        total = total.saturating_add(k.len()).saturating_add(v.len());
    }
    if total > TOTAL_ANNOTATION_SIZE_LIMIT {
        causes.push(too_long(path, TOTAL_ANNOTATION_SIZE_LIMIT));
    }
    causes
}

fn validate_owner_references(refs: &[Value], path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut first_controller: Option<String> = None;
    for r in refs {
        let api_version = str_of(r, "apiVersion");
        let kind = str_of(r, "kind");
        let (group, version) = match api_version.matches('/').count() {
            0 => ("", api_version),
            1 => api_version.split_once('/').unwrap_or(("", "")),
            _ => ("", ""),
        };
        if version.is_empty() {
            causes.push(invalid(
                &path.child("apiVersion"),
                api_version,
                "version must not be empty",
            ));
        }
        if kind.is_empty() {
            causes.push(invalid(&path.child("kind"), kind, "must not be empty"));
        }
        if str_of(r, "name").is_empty() {
            causes.push(invalid(&path.child("name"), "", "must not be empty"));
        }
        if str_of(r, "uid").is_empty() {
            causes.push(invalid(&path.child("uid"), "", "must not be empty"));
        }
        // Events may not own anything (apimachinery's BannedOwners).
        if group.is_empty() && version == "v1" && kind == "Event" {
            causes.push(invalid(
                path,
                r.clone(),
                "/v1, Kind=Event is disallowed from being an owner",
            ));
        }
        if r.get("controller").and_then(Value::as_bool) == Some(true) {
            let current = format!("{kind}/{}", str_of(r, "name"));
            match &first_controller {
                Some(first) => causes.push(invalid(
                    path,
                    Value::Array(refs.to_vec()),
                    &format!(
                        "Only one reference can have Controller set to true. Found \"true\" in references for {first} and {current}"
                    ),
                )),
                None => first_controller = Some(current),
            }
        }
    }
    causes
}

fn validate_finalizers(finalizers: &[&str], path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    for f in finalizers {
        for msg in names::qualified_name(f) {
            causes.push(invalid(path, *f, &msg));
        }
    }
    if finalizers.contains(&"orphan") && finalizers.contains(&"foregroundDeletion") {
        causes.push(invalid(
            path,
            Value::from(
                finalizers
                    .iter()
                    .map(|s| Value::from(*s))
                    .collect::<Vec<_>>(),
            ),
            "finalizer orphan and foregroundDeletion cannot be both set",
        ));
    }
    causes
}

/// Core's `validateKubeFinalizerName`: a finalizer without a `/` must be a standard one.
pub(crate) fn validate_kube_finalizer_name(name: &str, path: &Path) -> Vec<Cause> {
    if !name.contains('/') && !STANDARD_FINALIZERS.contains(&name) {
        vec![invalid(
            path,
            name,
            "name is neither a standard finalizer name nor is it fully qualified",
        )]
    } else {
        Vec::new()
    }
}

/// apimachinery's `ValidateObjectMetaAccessor`, the form every object passes.
pub(crate) fn validate_generic_object_meta(
    obj: &Value,
    namespaced: bool,
    name_fn: NameFn,
    path: &Path,
) -> Vec<Cause> {
    let m = meta(obj);
    let mut causes = Vec::new();
    let generate_name = str_of(m, "generateName");
    if !generate_name.is_empty() {
        for msg in name_fn(generate_name, true) {
            causes.push(invalid(&path.child("generateName"), generate_name, &msg));
        }
    }
    let name = str_of(m, "name");
    if name.is_empty() {
        causes.push(required(
            &path.child("name"),
            "name or generateName is required",
        ));
    } else {
        for msg in name_fn(name, false) {
            causes.push(invalid(&path.child("name"), name, &msg));
        }
    }
    let namespace = str_of(m, "namespace");
    if namespaced {
        if namespace.is_empty() {
            causes.push(required(&path.child("namespace"), ""));
        } else {
            for msg in names::name_is_dns_label(namespace, false) {
                causes.push(invalid(&path.child("namespace"), namespace, &msg));
            }
        }
    } else if !namespace.is_empty() {
        causes.push(forbidden(
            &path.child("namespace"),
            "not allowed on this type",
        ));
    }
    causes.extend(validate_common_meta(m, path));
    causes.extend(validate_finalizers(
        &strings(m, "finalizers"),
        &path.child("finalizers"),
    ));
    causes
}

fn validate_common_meta(m: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = validate_labels(&string_map(m, "labels"), &path.child("labels"));
    causes.extend(validate_annotations(
        &string_map(m, "annotations"),
        &path.child("annotations"),
    ));
    causes.extend(validate_owner_references(
        list(m, "ownerReferences"),
        &path.child("ownerReferences"),
    ));
    causes
}

/// Core's `ValidateObjectMeta`: apimachinery's plus the standard finalizer names.
pub(crate) fn validate_object_meta(
    obj: &Value,
    namespaced: bool,
    name_fn: NameFn,
    path: &Path,
) -> Vec<Cause> {
    let mut causes = validate_generic_object_meta(obj, namespaced, name_fn, path);
    for (i, f) in strings(meta(obj), "finalizers").into_iter().enumerate() {
        causes.extend(validate_kube_finalizer_name(
            f,
            &path.child("finalizers").index(i),
        ));
    }
    causes
}

/// apimachinery's `ValidateObjectMetaAccessorUpdate`, without the fields the REST layer owns
/// (`uid`, `resourceVersion`, `generation`, timestamps, `managedFields`).
pub(crate) fn validate_generic_object_meta_update(
    new: &Value,
    old: &Value,
    path: &Path,
) -> Vec<Cause> {
    let (nm, om) = (meta(new), meta(old));
    let mut causes = Vec::new();
    if get(om, "deletionTimestamp").is_some() {
        let old_finalizers = strings(om, "finalizers");
        let mut extra: Vec<&str> = strings(nm, "finalizers")
            .into_iter()
            .filter(|f| !old_finalizers.contains(f))
            .collect();
        extra.sort_unstable();
        extra.dedup();
        if !extra.is_empty() {
            let listed: Vec<String> = extra.iter().map(|f| format!("{f:?}")).collect();
            causes.push(forbidden(
                &path.child("finalizers"),
                &format!(
                    "no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                    listed.join(", ")
                ),
            ));
        }
    }
    for field in ["name", "namespace"] {
        causes.extend(immutable(
            Some(&Value::from(str_of(nm, field))),
            Some(&Value::from(str_of(om, field))),
            &path.child(field),
        ));
    }
    causes.extend(validate_common_meta(nm, path));
    causes
}

/// Core's `ValidateObjectMetaUpdate`.
pub(crate) fn validate_object_meta_update(new: &Value, old: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = validate_generic_object_meta_update(new, old, path);
    for (i, f) in strings(meta(new), "finalizers").into_iter().enumerate() {
        causes.extend(validate_kube_finalizer_name(
            f,
            &path.child("finalizers").index(i),
        ));
    }
    causes
}

/// The labels of `metadata`.
pub(crate) fn labels_of(obj: &Value) -> Vec<(&str, &str)> {
    string_map(meta(obj), "labels")
}

/// The annotations of `metadata`.
pub(crate) fn annotations_of(obj: &Value) -> Vec<(&str, &str)> {
    string_map(meta(obj), "annotations")
}

/// One annotation.
pub(crate) fn annotation<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj_meta_map(obj, "annotations")?.get(key)?.as_str()
}

fn obj_meta_map<'a>(obj_: &'a Value, key: &str) -> Option<&'a Map<String, Value>> {
    obj(meta(obj_), key)
}

/// `metadata.deletionGracePeriodSeconds`.
pub(crate) fn deletion_grace_period(obj: &Value) -> Option<i64> {
    int_of(meta(obj), "deletionGracePeriodSeconds")
}

/// Options of label selector validation (`LabelSelectorValidationOptions`).
#[derive(Clone, Copy, Default)]
pub(crate) struct SelectorOptions {
    /// Skip label value checks of `matchExpressions` values.
    pub(crate) allow_invalid_label_value: bool,
}

/// `ValidateLabelSelector`.
pub(crate) fn validate_label_selector(
    selector: Option<&Value>,
    opts: SelectorOptions,
    path: &Path,
) -> Vec<Cause> {
    let Some(selector) = selector else {
        return Vec::new();
    };
    let mut causes = validate_labels(
        &string_map(selector, "matchLabels"),
        &path.child("matchLabels"),
    );
    for (i, expr) in list(selector, "matchExpressions").iter().enumerate() {
        causes.extend(validate_selector_requirement(
            expr,
            opts,
            &path.child("matchExpressions").index(i),
        ));
    }
    causes
}

fn validate_selector_requirement(expr: &Value, opts: SelectorOptions, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let values = strings(expr, "values");
    match str_of(expr, "operator") {
        "In" | "NotIn" => {
            if values.is_empty() {
                causes.push(required(
                    &path.child("values"),
                    "must be specified when `operator` is 'In' or 'NotIn'",
                ));
            }
        }
        "Exists" | "DoesNotExist" => {
            if !values.is_empty() {
                causes.push(forbidden(
                    &path.child("values"),
                    "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                ));
            }
        }
        other => causes.push(invalid(
            &path.child("operator"),
            other,
            "not a valid selector operator",
        )),
    }
    causes.extend(validate_label_name(str_of(expr, "key"), &path.child("key")));
    if !opts.allow_invalid_label_value {
        for (i, v) in values.iter().enumerate() {
            for msg in names::label_value(v) {
                causes.push(invalid(&path.child("values").index(i), *v, &msg));
            }
        }
    }
    causes
}

/// A parsed `metav1.LabelSelector` (`LabelSelectorAsSelector`).
#[derive(Debug)]
pub(crate) enum Selector {
    /// A nil selector, which matches nothing.
    Nothing,
    /// Requirements that must all hold; none means everything matches.
    All(Vec<Requirement>),
}

/// One requirement of a selector.
#[derive(Debug)]
pub(crate) struct Requirement {
    key: String,
    op: Op,
    values: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    /// Parses a selector; `Err` when upstream's conversion would fail.
    pub(crate) fn parse(selector: Option<&Value>) -> Result<Selector, ()> {
        let Some(selector) = selector else {
            return Ok(Selector::Nothing);
        };
        if !validate_label_selector(Some(selector), SelectorOptions::default(), &Path::default())
            .is_empty()
        {
            return Err(());
        }
        let mut reqs = Vec::new();
        for (k, v) in string_map(selector, "matchLabels") {
            reqs.push(Requirement {
                key: k.to_string(),
                op: Op::In,
                values: vec![v.to_string()],
            });
        }
        for expr in list(selector, "matchExpressions") {
            let op = match str_of(expr, "operator") {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                _ => return Err(()),
            };
            reqs.push(Requirement {
                key: str_of(expr, "key").to_string(),
                op,
                values: strings(expr, "values")
                    .into_iter()
                    .map(str::to_string)
                    .collect(),
            });
        }
        Ok(Selector::All(reqs))
    }

    /// `Selector.Empty()`: matches everything.
    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, Selector::All(reqs) if reqs.is_empty())
    }

    /// Whether a label set satisfies the selector.
    pub(crate) fn matches(&self, labels: &[(&str, &str)]) -> bool {
        let Selector::All(reqs) = self else {
            return false;
        };
        reqs.iter().all(|r| {
            let value = labels.iter().find(|(k, _)| *k == r.key).map(|(_, v)| *v);
            match r.op {
                Op::In => value.is_some_and(|v| r.values.iter().any(|x| x == v)),
                Op::NotIn => value.is_none_or(|v| !r.values.iter().any(|x| x == v)),
                Op::Exists => value.is_some(),
                Op::DoesNotExist => value.is_none(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(causes: &[Cause]) -> Vec<(&str, &str)> {
        causes
            .iter()
            .map(|c| (c.field.as_str(), c.reason.as_str()))
            .collect()
    }

    #[test]
    fn object_meta_create() {
        let obj = json!({"metadata": {
            "name": "Bad_Name",
            "labels": {"ok": "fine", "bad key!": "v", "k": "bad value!"},
            "annotations": {"Example.com/Key": "x", "bad key": "y"},
            "finalizers": ["example.com/f", "custom"],
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Event", "name": "e", "uid": "u"},
                {"apiVersion": "", "kind": "", "name": "", "uid": ""},
            ]
        }});
        let causes = validate_object_meta(
            &obj,
            true,
            names::name_is_dns_subdomain,
            &Path::new("metadata"),
        );
        let f = fields(&causes);
        assert!(f.contains(&("metadata.name", "FieldValueInvalid")));
        assert!(f.contains(&("metadata.namespace", "FieldValueRequired")));
        assert_eq!(f.iter().filter(|(p, _)| *p == "metadata.labels").count(), 2);
        assert!(f.contains(&("metadata.annotations", "FieldValueInvalid")));
        assert!(f.contains(&("metadata.finalizers[1]", "FieldValueInvalid")));
        assert!(f.contains(&("metadata.ownerReferences", "FieldValueInvalid")));
        assert!(f.contains(&("metadata.ownerReferences.apiVersion", "FieldValueInvalid")));
        assert!(f.contains(&("metadata.ownerReferences.uid", "FieldValueInvalid")));
    }

    #[test]
    fn cluster_scoped_rejects_namespace_and_name_is_required() {
        let obj = json!({"metadata": {"namespace": "x"}});
        let causes = validate_object_meta(
            &obj,
            false,
            names::name_is_dns_label,
            &Path::new("metadata"),
        );
        assert_eq!(
            causes[0].message,
            "Required value: name or generateName is required"
        );
        assert_eq!(causes[1].field, "metadata.namespace");
        assert_eq!(causes[1].message, "Forbidden: not allowed on this type");
    }

    #[test]
    fn annotation_size_limit() {
        let big = "x".repeat(TOTAL_ANNOTATION_SIZE_LIMIT);
        let causes =
            validate_annotations(&[("a", big.as_str())], &Path::new("metadata.annotations"));
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].reason, "FieldValueTooLong");
    }

    #[test]
    fn two_controllers() {
        let refs = json!([
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "a", "uid": "1", "controller": true},
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "b", "uid": "2", "controller": true},
        ]);
        let causes = validate_owner_references(
            refs.as_array().map(Vec::as_slice).unwrap_or(&[]),
            &Path::new("o"),
        );
        assert_eq!(causes.len(), 1);
        assert!(causes[0].message.contains("ReplicaSet/a and ReplicaSet/b"));
    }

    #[test]
    fn update_keeps_name_and_blocks_finalizers_when_deleting() {
        let old = json!({"metadata": {"name": "a", "deletionTimestamp": "2024-01-01T00:00:00Z", "finalizers": ["x/a"]}});
        let new = json!({"metadata": {"name": "b", "finalizers": ["x/a", "x/b"]}});
        let causes = validate_object_meta_update(&new, &old, &Path::new("metadata"));
        let f = fields(&causes);
        assert!(f.contains(&("metadata.finalizers", "FieldValueForbidden")));
        assert!(f.contains(&("metadata.name", "FieldValueInvalid")));
    }

    #[test]
    fn selectors() {
        let sel = json!({"matchLabels": {"app": "web"}, "matchExpressions": [
            {"key": "tier", "operator": "NotIn", "values": ["db"]},
            {"key": "env", "operator": "Exists"}
        ]});
        let parsed = Selector::parse(Some(&sel)).unwrap_or(Selector::Nothing);
        assert!(parsed.matches(&[("app", "web"), ("env", "x")]));
        assert!(!parsed.matches(&[("app", "web"), ("env", "x"), ("tier", "db")]));
        assert!(!parsed.matches(&[("app", "web")]));
        assert!(Selector::parse(Some(&json!({}))).is_ok_and(|s| s.is_empty()));
        assert!(!Selector::parse(None).is_ok_and(|s| s.matches(&[])));
        let bad = json!({"matchExpressions": [{"key": "a", "operator": "In"}]});
        assert!(Selector::parse(Some(&bad)).is_err());
        let causes = validate_label_selector(
            Some(&bad),
            SelectorOptions::default(),
            &Path::new("spec.selector"),
        );
        assert_eq!(causes[0].field, "spec.selector.matchExpressions[0].values");
    }
}
