//! Path elements and values, ordered, printed and serialized the way structured-merge-diff
//! does, so that FieldsV1 keys and conflict paths read exactly as upstream's.

use std::cmp::Ordering;
use std::fmt;

use serde_json::{Number, Value};

/// Values nested deeper than this compare equal: such values cannot come out of a JSON or
/// YAML parser, and comparing them must neither recurse without bound nor panic.
const VALUE_DEPTH: usize = 400;

/// A JSON value under structured-merge-diff's total order: numbers (integers and floats
/// compared numerically), then strings, booleans, lists, maps and null.
#[derive(Clone, Debug)]
pub(crate) struct Val(pub(crate) Value);

impl PartialEq for Val {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Val {}

impl PartialOrd for Val {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Val {
    fn cmp(&self, other: &Self) -> Ordering {
        compare_values(&self.0, &other.0)
    }
}

/// Orders two values as structured-merge-diff's `value.Compare`; `Equal` is its `Equals`.
pub(crate) fn compare_values(a: &Value, b: &Value) -> Ordering {
    compare_at(a, b, 0)
}

fn rank(v: &Value) -> u8 {
    match v {
        Value::Number(_) => 0,
        Value::String(_) => 1,
        Value::Bool(_) => 2,
        Value::Array(_) => 3,
        Value::Object(_) => 4,
        Value::Null => 5,
    }
}

fn compare_at(a: &Value, b: &Value, depth: usize) -> Ordering {
    if depth > VALUE_DEPTH {
        return Ordering::Equal;
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => compare_numbers(x, y),
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Array(x), Value::Array(y)) => {
            for (l, r) in x.iter().zip(y) {
                let c = compare_at(l, r, depth + 1);
                if c != Ordering::Equal {
                    return c;
                }
            }
            x.len().cmp(&y.len())
        }
        (Value::Object(x), Value::Object(y)) => {
            for ((lk, lv), (rk, rv)) in x.iter().zip(y) {
                let c = lk.cmp(rk).then_with(|| compare_at(lv, rv, depth + 1));
                if c != Ordering::Equal {
                    return c;
                }
            }
            x.len().cmp(&y.len())
        }
        (Value::Null, Value::Null) => Ordering::Equal,
        _ => rank(a).cmp(&rank(b)),
    }
}

fn compare_numbers(x: &Number, y: &Number) -> Ordering {
    if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64()) {
        return a.cmp(&b);
    }
    if let (Some(a), Some(b)) = (x.as_u64(), y.as_u64()) {
        return a.cmp(&b);
    }
    let a = x.as_f64().unwrap_or(f64::NAN);
    let b = y.as_f64().unwrap_or(f64::NAN);
    a.partial_cmp(&b).unwrap_or_else(|| a.total_cmp(&b))
}

/// One step of a field path (structured-merge-diff's `PathElement`). The derived order is
/// upstream's: field names, then keys, then set values, then indexes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum PathElement {
    /// A struct field or a map key.
    Field(String),
    /// An item of a list map, by its key fields sorted by name.
    Key(Vec<(String, Val)>),
    /// An item of a list set.
    Value(Val),
    /// An item of a list by position (only for lists upstream cannot key).
    Index(usize),
}

impl fmt::Display for PathElement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathElement::Field(name) => write!(f, ".{name}"),
            PathElement::Key(fields) => {
                let parts: Vec<String> = fields
                    .iter()
                    .map(|(name, v)| format!("{name}={}", go_to_string(&v.0)))
                    .collect();
                write!(f, "[{}]", parts.join(","))
            }
            PathElement::Value(v) => write!(f, "[={}]", go_to_string(&v.0)),
            PathElement::Index(i) => write!(f, "[{i}]"),
        }
    }
}

/// A path as upstream prints it in conflicts: `.spec.containers[name="nginx"].image`.
pub(crate) fn path_string(path: &[PathElement]) -> String {
    path.iter().map(ToString::to_string).collect()
}

impl PathElement {
    /// The FieldsV1 key: `f:name`, `k:{"name":"x"}`, `v:"x"` or `i:0`.
    pub(crate) fn serialize(&self) -> String {
        match self {
            PathElement::Field(name) => format!("f:{name}"),
            PathElement::Key(fields) => {
                let mut out = String::from("k:{");
                for (i, (name, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_go_string(&mut out, name);
                    out.push(':');
                    write_go_json(&mut out, &v.0, 0);
                }
                out.push('}');
                out
            }
            PathElement::Value(v) => format!("v:{}", go_json(&v.0)),
            PathElement::Index(i) => format!("i:{i}"),
        }
    }

    /// Parses a FieldsV1 key. `Ok(None)` for a key of an unknown kind, which upstream skips
    /// so that a newer format does not break an older reader.
    pub(crate) fn parse(s: &str) -> Result<Option<PathElement>, String> {
        let bytes = s.as_bytes();
        let (Some(kind), Some(sep)) = (bytes.first(), bytes.get(1)) else {
            return Err(format!("key must be 2 characters long: {s:?}"));
        };
        if *sep != b':' {
            return Err(format!("missing colon: {s}"));
        }
        if !matches!(kind, b'f' | b'v' | b'k' | b'i') {
            return Ok(None);
        }
        // Both leading bytes are ASCII here, so byte 2 is a character boundary.
        let rest = s.get(2..).unwrap_or_default();
        match kind {
            b'f' => Ok(Some(PathElement::Field(rest.to_string()))),
            b'v' => serde_json::from_str::<Value>(rest)
                .map(|v| Some(PathElement::Value(Val(v))))
                .map_err(|e| format!("invalid value in {s:?}: {e}")),
            b'k' => {
                let parsed: Value =
                    serde_json::from_str(rest).map_err(|e| format!("invalid key in {s:?}: {e}"))?;
                let Value::Object(map) = parsed else {
                    return Err(format!("invalid key in {s:?}: not an object"));
                };
                let mut fields: Vec<(String, Val)> =
                    map.into_iter().map(|(k, v)| (k, Val(v))).collect();
                fields.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(Some(PathElement::Key(fields)))
            }
            _ => rest
                .parse::<usize>()
                .map(|i| Some(PathElement::Index(i)))
                .map_err(|e| format!("invalid index in {s:?}: {e}")),
        }
    }
}

/// Go's `value.ToString`: how a key value is printed inside a conflict path.
fn go_to_string(v: &Value) -> String {
    go_to_string_at(v, 0)
}

fn go_to_string_at(v: &Value, depth: usize) -> String {
    if depth > VALUE_DEPTH {
        return String::from("...");
    }
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => number_text(n),
        Value::String(s) => go_quote(s),
        Value::Array(items) => {
            let parts: Vec<String> = items
                .iter()
                .map(|i| go_to_string_at(i, depth + 1))
                .collect();
            format!("[{}]", parts.join(","))
        }
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k}={}", go_to_string_at(v, depth + 1)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
    }
}

/// Go's `strconv.Quote` (`%q`), as upstream quotes manager names and key values.
pub(crate) fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => {
                let n = c as u32;
                if n < 0x10000 {
                    out.push_str(&format!("\\u{n:04x}"));
                } else {
                    out.push_str(&format!("\\U{n:08x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Compact JSON as Go's `encoding/json` writes it: sorted keys, HTML characters escaped.
pub(crate) fn go_json(v: &Value) -> String {
    let mut out = String::new();
    write_go_json(&mut out, v, 0);
    out
}

fn write_go_json(out: &mut String, v: &Value, depth: usize) {
    if depth > VALUE_DEPTH {
        out.push_str("null");
        return;
    }
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&number_text(n)),
        Value::String(s) => write_go_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_go_json(out, item, depth + 1);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_go_string(out, k);
                out.push(':');
                write_go_json(out, item, depth + 1);
            }
            out.push('}');
        }
    }
}

/// Numbers as Go prints them: integral floats without a fraction.
fn number_text(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    match n.as_f64() {
        Some(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e21 => {
            format!("{}", f as i128)
        }
        Some(f) => f.to_string(),
        None => n.to_string(),
    }
}

fn write_go_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}
