//! Access to loosely typed JSON objects, upstream's field paths and `field.Error` shapes.
//!
//! Objects reach the kinds already type-checked, but any field may be absent, and nothing
//! here may panic whatever the input: every accessor treats a value of an unexpected type
//! as absent.

use serde_json::{Map, Value};

use crate::status::Cause;

/// A field path as upstream prints it: `spec.containers[0].image`, `data[key]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Path(String);

impl Path {
    /// A path starting at a top-level field.
    pub(crate) fn new(root: &str) -> Self {
        Path(root.to_string())
    }

    /// A field inside this one.
    pub(crate) fn child(&self, name: &str) -> Self {
        if self.0.is_empty() {
            Path(name.to_string())
        } else {
            Path(format!("{}.{name}", self.0))
        }
    }

    /// A list item.
    pub(crate) fn index(&self, i: usize) -> Self {
        Path(format!("{}[{i}]", self.0))
    }

    /// A map entry.
    pub(crate) fn key(&self, k: &str) -> Self {
        Path(format!("{}[{k}]", self.0))
    }

    /// The path as text.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// `field.Required`.
pub(crate) fn required(path: &Path, detail: &str) -> Cause {
    Cause::required(path.as_str(), detail)
}

/// `field.Invalid`.
pub(crate) fn invalid(path: &Path, value: impl Into<Value>, detail: &str) -> Cause {
    Cause::invalid(path.as_str(), &value.into(), detail)
}

/// `field.NotSupported`.
pub(crate) fn not_supported(path: &Path, value: impl Into<Value>, supported: &[&str]) -> Cause {
    Cause::not_supported(path.as_str(), &value.into(), supported)
}

/// `field.Duplicate`.
pub(crate) fn duplicate(path: &Path, value: impl Into<Value>) -> Cause {
    Cause::duplicate(path.as_str(), &value.into())
}

/// `field.Forbidden`.
pub(crate) fn forbidden(path: &Path, detail: &str) -> Cause {
    Cause::forbidden(path.as_str(), detail)
}

/// `field.TooLong`.
pub(crate) fn too_long(path: &Path, max: usize) -> Cause {
    Cause::too_long(path.as_str(), max)
}

/// `field.NotFound`.
pub(crate) fn not_found(path: &Path, value: impl Into<Value>) -> Cause {
    Cause::new(
        "FieldValueNotFound",
        path.as_str(),
        format!("Not found: {}", value.into()),
    )
}

/// `field.TooMany`.
pub(crate) fn too_many(path: &Path, actual: usize, max: usize) -> Cause {
    Cause::new(
        "FieldValueTooMany",
        path.as_str(),
        format!("Too many: {actual}: must have at most {max} items"),
    )
}

/// `ValidateNonnegativeField`.
pub(crate) fn nonnegative(value: i64, path: &Path) -> Vec<Cause> {
    if value < 0 {
        vec![invalid(path, value, IS_NEGATIVE)]
    } else {
        Vec::new()
    }
}

/// `apimachineryvalidation.ValidateImmutableField`.
pub(crate) fn immutable(new: Option<&Value>, old: Option<&Value>, path: &Path) -> Vec<Cause> {
    if semantic_eq(new, old) {
        Vec::new()
    } else {
        vec![invalid(
            path,
            new.cloned().unwrap_or(Value::Null),
            FIELD_IMMUTABLE,
        )]
    }
}

/// Upstream's `IsNegativeErrorMsg`.
pub(crate) const IS_NEGATIVE: &str = "must be greater than or equal to 0";
/// Upstream's `FieldImmutableErrorMsg`.
pub(crate) const FIELD_IMMUTABLE: &str = "field is immutable";

/// A field, with `null` read as absent.
pub(crate) fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

/// A string field; absent (or not a string) reads as `""`, like a Go zero value.
pub(crate) fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A string field that may be absent (a Go `*string`).
pub(crate) fn opt_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// An integer field that may be absent.
pub(crate) fn int_of(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

/// A boolean field; absent reads as false.
pub(crate) fn bool_of(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// A list field; absent reads as empty.
pub(crate) fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// An object field that may be absent.
pub(crate) fn obj<'a>(v: &'a Value, key: &str) -> Option<&'a Map<String, Value>> {
    v.get(key).and_then(Value::as_object)
}

/// A `map[string]string` field as pairs; non-string values are skipped.
pub(crate) fn string_map<'a>(v: &'a Value, key: &str) -> Vec<(&'a str, &'a str)> {
    obj(v, key)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// A list of strings; non-strings are skipped.
pub(crate) fn strings<'a>(v: &'a Value, key: &str) -> Vec<&'a str> {
    list(v, key).iter().filter_map(Value::as_str).collect()
}

/// An existing object child, mutable.
pub(crate) fn obj_mut<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    v.get_mut(key).filter(|x| x.is_object())
}

/// An object child, created empty when absent or null. `None` when `v` is not an object or
/// the child holds something else.
pub(crate) fn ensure_obj<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    let map = v.as_object_mut()?;
    let child = map
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if child.is_null() {
        *child = Value::Object(Map::new());
    }
    child.is_object().then_some(child)
}

/// The items of a list child, mutable; nothing when absent.
pub(crate) fn items_mut<'a>(v: &'a mut Value, key: &str) -> impl Iterator<Item = &'a mut Value> {
    v.get_mut(key)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flat_map(|l| l.iter_mut())
}

/// Sets a field when `v` is an object.
pub(crate) fn set(v: &mut Value, key: &str, value: Value) {
    if let Some(map) = v.as_object_mut() {
        map.insert(key.to_string(), value);
    }
}

/// Removes a field when `v` is an object.
pub(crate) fn remove(v: &mut Value, key: &str) -> Option<Value> {
    v.as_object_mut()?.remove(key)
}

/// Sets a field that is absent or null (a nil Go pointer).
pub(crate) fn default_value(v: &mut Value, key: &str, value: Value) {
    if let Some(map) = v.as_object_mut() {
        match map.get(key) {
            None | Some(Value::Null) => {
                map.insert(key.to_string(), value);
            }
            Some(_) => {}
        }
    }
}

/// Sets a string field that is absent or empty (a Go `string` at its zero value).
pub(crate) fn default_str(v: &mut Value, key: &str, value: &str) {
    if let Some(map) = v.as_object_mut() {
        let unset = match map.get(key) {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(_) => false,
        };
        if unset {
            map.insert(key.to_string(), Value::String(value.to_string()));
        }
    }
}

/// Sets an integer field that is absent or zero (a Go `int32` at its zero value).
pub(crate) fn default_int(v: &mut Value, key: &str, value: i64) {
    if let Some(map) = v.as_object_mut() {
        let unset = match map.get(key) {
            None | Some(Value::Null) => true,
            Some(n) => n.as_i64() == Some(0),
        };
        if unset {
            map.insert(key.to_string(), Value::from(value));
        }
    }
}

/// Upstream's `apiequality.Semantic.DeepEqual` on JSON: nil and empty lists are equal, and
/// so are absent and null fields.
pub(crate) fn semantic_eq(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a.filter(|v| !is_void(v)), b.filter(|v| !is_void(v))) {
        (None, None) => true,
        (Some(a), Some(b)) => value_eq(a, b),
        _ => false,
    }
}

fn is_void(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(l) => l.is_empty(),
        _ => false,
    }
}

fn value_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let keys = a.keys().chain(b.keys());
            keys.into_iter()
                .all(|k| semantic_eq(a.get(k.as_str()), b.get(k.as_str())))
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| value_eq(x, y))
        }
        _ => a == b,
    }
}

/// Lines describing where two values differ, for messages that show a diff.
pub(crate) fn diff(old: Option<&Value>, new: Option<&Value>, path: &Path, out: &mut Vec<String>) {
    if semantic_eq(old, new) {
        return;
    }
    match (old, new) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                diff(a.get(k.as_str()), b.get(k.as_str()), &path.child(k), out);
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(Some(x), Some(y), &path.index(i), out);
            }
        }
        _ => {
            let show =
                |v: Option<&Value>| v.map_or_else(|| "<unset>".to_string(), Value::to_string);
            out.push(format!("-\t{}: {}", path.as_str(), show(old)));
            out.push(format!("+\t{}: {}", path.as_str(), show(new)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_print_like_upstream() {
        let p = Path::new("spec")
            .child("containers")
            .index(0)
            .child("image");
        assert_eq!(p.as_str(), "spec.containers[0].image");
        assert_eq!(Path::new("data").key("a.b").as_str(), "data[a.b]");
        assert_eq!(Path::default().child("x").as_str(), "x");
    }

    #[test]
    fn semantic_equality_ignores_empty_lists_and_nulls() {
        let a = json!({"x": [], "y": null, "z": {"a": 1}});
        let b = json!({"z": {"a": 1}});
        assert!(semantic_eq(Some(&a), Some(&b)));
        assert!(!semantic_eq(Some(&json!({"z": {}})), Some(&json!({}))));
        assert!(semantic_eq(None, Some(&json!([]))));
    }

    #[test]
    fn accessors_tolerate_wrong_types() {
        let v = json!({"a": 1, "b": "x", "c": [1, "y"], "d": {"k": "v", "n": 2}});
        assert_eq!(str_of(&v, "a"), "");
        assert_eq!(int_of(&v, "b"), None);
        assert_eq!(strings(&v, "c"), vec!["y"]);
        assert_eq!(string_map(&v, "d"), vec![("k", "v")]);
        let mut s = json!("scalar");
        assert!(ensure_obj(&mut s, "x").is_none());
        default_str(&mut s, "x", "y");
        assert_eq!(s, json!("scalar"));
    }

    #[test]
    fn defaults_respect_go_zero_values() {
        let mut v = json!({"a": "", "b": 0, "c": null, "d": "set"});
        default_str(&mut v, "a", "A");
        default_int(&mut v, "b", 3);
        default_value(&mut v, "c", json!(true));
        default_str(&mut v, "d", "D");
        assert_eq!(v, json!({"a": "A", "b": 3, "c": true, "d": "set"}));
    }
}
