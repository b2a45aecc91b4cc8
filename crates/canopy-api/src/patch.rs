//! The three PATCH formats of the apiserver: JSON patch (RFC 6902), JSON merge patch
//! (RFC 7386) and strategic merge patch.
//!
//! Each follows what Kubernetes v1.33's apiserver does rather than the letter of the RFCs:
//! JSON patch behaves like `gopkg.in/evanphx/json-patch.v4` (a `replace` of a missing object
//! key adds it, negative array indices count from the end, a `test` of a missing key against
//! `null` passes), merge patch like evanphx's `MergePatch`, and strategic merge patch like
//! `k8s.io/apimachinery/pkg/util/strategicpatch` (the server-side half: `StrategicMergeMapPatch`).
//! Error messages keep upstream's wording, because clients and people match on them.
//!
//! Patches are untrusted: nothing here panics, documents nest at most [`MAX_DEPTH`] levels,
//! and list merges use hashed lookups so a large list costs linear, not quadratic, time.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use json_patch::jsonptr::{PointerBuf, Token};
use json_patch::{AddOperation, PatchOperation, RemoveOperation, ReplaceOperation};
use serde_json::{Map, Number, Value};

use crate::schema::{MergeStrategy, NodeId, Schemas, Shape};

/// How deeply objects and arrays may nest, in the patch, the original and the result. It is
/// serde_json's own parsing limit, so every result can be read back.
pub const MAX_DEPTH: usize = 128;

/// Upstream's limit on the operations of one JSON patch (`maxJSONPatchOperations`). The
/// REST layer answers a longer patch with 413 before calling [`json_patch`].
pub const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

/// How many bytes the `copy` operations of one JSON patch may add in total (upstream's
/// default `--json-patch-max-copy-bytes`).
pub const MAX_JSON_PATCH_COPY_BYTES: usize = 3 * 1024 * 1024;

/// Why a patch was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The patch document is malformed: 400 Bad Request.
    #[error("{0}")]
    BadRequest(String),
    /// The patch is well formed but does not apply to this object: 422 Unprocessable Entity.
    #[error("{0}")]
    Invalid(String),
}

impl PatchError {
    /// The message, as upstream words it.
    pub fn message(&self) -> &str {
        match self {
            PatchError::BadRequest(m) | PatchError::Invalid(m) => m,
        }
    }
}

fn bad(message: impl Into<String>) -> PatchError {
    PatchError::BadRequest(message.into())
}

fn invalid(message: impl Into<String>) -> PatchError {
    PatchError::Invalid(message.into())
}

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

/// Whether a value nests more than `limit` levels of objects and arrays. Iterative, so that
/// measuring a hostile document cannot itself overflow the stack.
fn deeper_than(value: &Value, limit: usize) -> bool {
    let mut stack = vec![(value, 1usize)];
    while let Some((v, level)) = stack.pop() {
        match v {
            Value::Object(_) | Value::Array(_) if level > limit => return true,
            Value::Object(map) => stack.extend(map.values().map(|c| (c, level + 1))),
            Value::Array(items) => stack.extend(items.iter().map(|c| (c, level + 1))),
            _ => {}
        }
    }
    false
}

fn check_patch_depth(patch: &Value) -> Result<(), PatchError> {
    if deeper_than(patch, MAX_DEPTH) {
        return Err(bad(format!(
            "the patch nests deeper than {MAX_DEPTH} levels"
        )));
    }
    Ok(())
}

fn check_object_depth(original: &Value) -> Result<(), PatchError> {
    if deeper_than(original, MAX_DEPTH) {
        return Err(invalid(format!(
            "the object nests deeper than {MAX_DEPTH} levels"
        )));
    }
    Ok(())
}

/// The JSON type name Go's decoder uses in "cannot unmarshal X into ..." errors.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Formats a value as Go's `%v` prints the decoded `interface{}`, for upstream's messages.
fn go_fmt(value: &Value) -> String {
    let mut out = String::new();
    write_go(value, &mut out);
    out
}

fn write_go(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("<nil>"),
        Value::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Value::Number(n) => write_go_number(n, out),
        Value::String(s) => out.push_str(s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                write_go(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Go prints map keys sorted.
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push_str("map[");
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                out.push_str(k);
                out.push(':');
                write_go(v, out);
            }
            out.push(']');
        }
    }
}

fn write_go_number(n: &Number, out: &mut String) {
    if n.is_i64() || n.is_u64() {
        let _ = write!(out, "{n}");
        return;
    }
    let f = n.as_f64().unwrap_or_default();
    // Go's %v is %g with the shortest precision: exponent form below 1e-4 and from 1e6.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or_default();
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        let _ = write!(out, "{mantissa}e{sign}{:02}", exp.unsigned_abs());
    } else {
        let _ = write!(out, "{f}");
    }
}

// ---------------------------------------------------------------------------------------
// JSON patch (RFC 6902, as evanphx/json-patch v4 applies it)
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum OpKind {
    Add,
    Remove,
    Replace,
    Move,
    Copy,
    Test,
}

impl OpKind {
    fn name(self) -> &'static str {
        match self {
            OpKind::Add => "add",
            OpKind::Remove => "remove",
            OpKind::Replace => "replace",
            OpKind::Move => "move",
            OpKind::Copy => "copy",
            OpKind::Test => "test",
        }
    }
}

struct Operation<'a> {
    kind: OpKind,
    path: &'a str,
    from: &'a str,
    /// `None` when the operation has no `value` member.
    value: Option<&'a Value>,
}

/// Applies an `application/json-patch+json` patch.
///
/// A patch that is not a list of operation objects is a [`PatchError::BadRequest`]; an
/// operation without a known `op` or a string `path` (or `from` for move and copy), or one
/// that does not apply (a failed `test`, a missing path), is a [`PatchError::Invalid`], as
/// upstream only finds those when applying. A `null` patch changes nothing, as upstream decodes it to an
/// empty list. The caller enforces [`MAX_JSON_PATCH_OPERATIONS`].
pub fn json_patch(original: &Value, patch: &Value) -> Result<Value, PatchError> {
    let items = match patch {
        Value::Null => return Ok(original.clone()),
        Value::Array(items) => items,
        other => {
            return Err(bad(format!(
                "json: cannot unmarshal {} into Go value of type jsonpatch.Patch",
                json_kind(other)
            )));
        }
    };
    check_patch_depth(patch)?;
    check_object_depth(original)?;
    let operations = items
        .iter()
        .map(decode_operation)
        .collect::<Result<Vec<_>, _>>()?;
    let mut doc = original.clone();
    let mut copied = 0usize;
    for op in &operations {
        apply_operation(&mut doc, op, &mut copied)?;
    }
    Ok(doc)
}

fn decode_operation(item: &Value) -> Result<Operation<'_>, PatchError> {
    let Value::Object(fields) = item else {
        return Err(bad(format!(
            "json: cannot unmarshal {} into Go value of type jsonpatch.Operation",
            json_kind(item)
        )));
    };
    let op = fields.get("op").and_then(Value::as_str);
    let kind = match op {
        Some("add") => OpKind::Add,
        Some("remove") => OpKind::Remove,
        Some("replace") => OpKind::Replace,
        Some("move") => OpKind::Move,
        Some("copy") => OpKind::Copy,
        Some("test") => OpKind::Test,
        // Upstream decodes operations lazily: a bad op or path fails when the patch is
        // applied, which it reports as 422.
        other => {
            return Err(invalid(format!(
                "Unexpected kind: {}",
                other.unwrap_or("unknown")
            )));
        }
    };
    let path = fields.get("path").and_then(Value::as_str).ok_or_else(|| {
        invalid(format!(
            "{} operation failed to decode path: missing value",
            kind.name()
        ))
    })?;
    let from = match kind {
        OpKind::Move | OpKind::Copy => fields
            .get("from")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                invalid(format!(
                    "{} operation failed to decode from: operation, missing from field: missing value",
                    kind.name()
                ))
            })?,
        _ => "",
    };
    Ok(Operation {
        kind,
        path,
        from,
        value: fields.get("value"),
    })
}

/// Where a path points, resolved the way evanphx's `findObject` walks it.
struct Location {
    /// Decoded tokens of the parent, array indices made canonical.
    parent: Vec<String>,
    /// The decoded last token.
    key: String,
}

/// evanphx decodes `~1` and `~0` and leaves any other `~` alone.
fn decode_token(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('~', Some('1')) => {
                out.push('/');
                chars.next();
            }
            ('~', Some('0')) => {
                out.push('~');
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// Go's `strconv.Atoi`, with its error text.
fn atoi(s: &str) -> Result<i64, String> {
    s.parse::<i64>().map_err(|e| {
        let why = match e.kind() {
            std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
                "value out of range"
            }
            _ => "invalid syntax",
        };
        format!("strconv.Atoi: parsing \"{s}\": {why}")
    })
}

/// An index into an existing element (`get`, `remove`, `replace`, `test`); negative indices
/// count from the end.
fn existing_index(key: &str, len: usize) -> Result<usize, String> {
    let idx = atoi(key)?;
    let len = i64::try_from(len).unwrap_or(i64::MAX);
    let resolved = if idx < 0 {
        idx.saturating_add(len)
    } else {
        idx
    };
    if idx >= len || resolved < 0 {
        return Err(format!(
            "Unable to access invalid index: {idx}: invalid index referenced"
        ));
    }
    usize::try_from(resolved).map_err(|_| format!("Unable to access invalid index: {idx}"))
}

/// An insertion position for `add`: `-` appends, negative indices count from the end of the
/// grown array.
fn insert_index(key: &str, len: usize) -> Result<usize, String> {
    if key == "-" {
        return Ok(len);
    }
    let idx = atoi(key).map_err(|e| format!("value was not a proper array index: '{key}': {e}"))?;
    let grown = i64::try_from(len).unwrap_or(i64::MAX).saturating_add(1);
    let resolved = if idx < 0 {
        idx.saturating_add(grown)
    } else {
        idx
    };
    if idx >= grown || resolved < 0 {
        return Err(format!(
            "Unable to access invalid index: {idx}: invalid index referenced"
        ));
    }
    usize::try_from(resolved).map_err(|_| format!("Unable to access invalid index: {idx}"))
}

/// Resolves the parent of a path; `None` where evanphx's `findObject` finds nothing (no
/// `/`, a missing, null or scalar intermediate, a bad index).
fn locate(doc: &Value, path: &str) -> Option<Location> {
    // evanphx ignores whatever precedes the first `/`, so `a/b` means `/b`.
    let mut parts = path.split('/');
    parts.next();
    let mut rest: Vec<&str> = parts.collect();
    let key = rest.pop()?;
    let mut current = doc;
    let mut parent = Vec::with_capacity(rest.len());
    for part in rest {
        let token = decode_token(part);
        let (next, canonical) = match current {
            Value::Object(map) => (map.get(&token)?, token),
            Value::Array(items) => {
                let i = existing_index(&token, items.len()).ok()?;
                (items.get(i)?, i.to_string())
            }
            _ => return None,
        };
        if !(next.is_object() || next.is_array()) {
            return None;
        }
        parent.push(canonical);
        current = next;
    }
    if !(current.is_object() || current.is_array()) {
        return None;
    }
    Some(Location {
        parent,
        key: decode_token(key),
    })
}

fn parent_of<'v>(doc: &'v Value, loc: &Location) -> Option<&'v Value> {
    let pointer = PointerBuf::from_tokens(loc.parent.iter().map(|t| Token::new(t.as_str())));
    doc.pointer(pointer.as_str())
}

fn pointer_to(loc: &Location, last: &str) -> PointerBuf {
    PointerBuf::from_tokens(
        loc.parent
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(last))
            .map(Token::new),
    )
}

/// What the last token of a location means for an operation that reads an existing value.
enum Target<'v> {
    /// An object member; `None` when absent.
    Member(Option<&'v Value>, String),
    /// An array element at this canonical index.
    Element(&'v Value, usize),
}

fn target<'v>(doc: &'v Value, loc: &Location) -> Result<Target<'v>, String> {
    match parent_of(doc, loc) {
        Some(Value::Object(map)) => Ok(Target::Member(map.get(&loc.key), loc.key.clone())),
        Some(Value::Array(items)) => {
            let i = existing_index(&loc.key, items.len())?;
            items
                .get(i)
                .map(|v| Target::Element(v, i))
                .ok_or_else(|| format!("Unable to access invalid index: {i}"))
        }
        _ => Err("unknown object type".to_string()),
    }
}

/// The pointer an `add` at this location writes to, with upstream's index rules applied.
fn insertion_pointer(doc: &Value, loc: &Location) -> Result<PointerBuf, String> {
    match parent_of(doc, loc) {
        Some(Value::Array(items)) => {
            let i = insert_index(&loc.key, items.len())?;
            Ok(pointer_to(loc, &i.to_string()))
        }
        _ => Ok(pointer_to(loc, &loc.key)),
    }
}

fn ensure_fits(kind: OpKind, loc: &Location, value: &Value) -> Result<(), PatchError> {
    let level = loc.parent.len() + 1;
    if level > MAX_DEPTH || deeper_than(value, MAX_DEPTH - level) {
        return Err(invalid(format!(
            "{} operation does not apply: the result would nest deeper than {MAX_DEPTH} levels",
            kind.name()
        )));
    }
    Ok(())
}

fn run(doc: &mut Value, op: PatchOperation) -> Result<(), PatchError> {
    // Each operation runs on the caller's private copy, which is dropped on error, so the
    // crate's undo log is not needed.
    json_patch::patch_unsafe(doc, std::slice::from_ref(&op)).map_err(|e| invalid(e.to_string()))
}

/// Go's `json.Marshal` length of a value, without building the text.
fn encoded_len(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// evanphx's `lazyNode.equal`: keys present only in the patch's value are ignored.
fn lazy_equal(doc: &Value, expected: &Value) -> bool {
    match (doc, expected) {
        (Value::Object(d), Value::Object(e)) => d.iter().all(|(k, v)| match e.get(k) {
            Some(ev) if v.is_null() && ev.is_null() => true,
            Some(ev) if !v.is_null() && !ev.is_null() => lazy_equal(v, ev),
            _ => false,
        }),
        (Value::Array(d), Value::Array(e)) => {
            d.len() == e.len()
                && d.iter().zip(e).all(|(v, ev)| {
                    (v.is_null() && ev.is_null()) || (!v.is_null() && lazy_equal(v, ev))
                })
        }
        (Value::Object(_) | Value::Array(_), _) | (_, Value::Object(_) | Value::Array(_)) => false,
        (d, e) => d == e,
    }
}

fn apply_operation(
    doc: &mut Value,
    op: &Operation<'_>,
    copied: &mut usize,
) -> Result<(), PatchError> {
    let path = op.path;
    match op.kind {
        OpKind::Add => {
            let loc = locate(doc, path).ok_or_else(|| {
                invalid(format!(
                    "add operation does not apply: doc is missing path: \"{path}\": missing value"
                ))
            })?;
            let value = op.value.cloned().unwrap_or(Value::Null);
            ensure_fits(op.kind, &loc, &value)?;
            let pointer = insertion_pointer(doc, &loc)
                .map_err(|e| invalid(format!("error in add for path: '{path}': {e}")))?;
            run(
                doc,
                PatchOperation::Add(AddOperation {
                    path: pointer,
                    value,
                }),
            )
        }
        OpKind::Remove => {
            let loc = locate(doc, path).ok_or_else(|| {
                invalid(format!(
                    "remove operation does not apply: doc is missing path: \"{path}\": missing value"
                ))
            })?;
            let pointer = match target(doc, &loc) {
                Ok(Target::Member(Some(_), key)) => pointer_to(&loc, &key),
                Ok(Target::Member(None, key)) => {
                    return Err(invalid(format!(
                        "error in remove for path: '{path}': Unable to remove nonexistent key: {key}: missing value"
                    )));
                }
                Ok(Target::Element(_, i)) => pointer_to(&loc, &i.to_string()),
                Err(e) => return Err(invalid(format!("error in remove for path: '{path}': {e}"))),
            };
            run(
                doc,
                PatchOperation::Remove(RemoveOperation { path: pointer }),
            )
        }
        OpKind::Replace => {
            let value = op.value.cloned().unwrap_or(Value::Null);
            if path.is_empty() {
                if !(value.is_object() || value.is_array()) {
                    return Err(invalid(
                        "replace operation value must be object or array: %!w(<nil>)",
                    ));
                }
                check_object_depth(&value)?;
                *doc = value;
                return Ok(());
            }
            let loc = locate(doc, path).ok_or_else(|| {
                invalid(format!(
                    "replace operation does not apply: doc is missing path: {path}: missing value"
                ))
            })?;
            ensure_fits(op.kind, &loc, &value)?;
            match target(doc, &loc) {
                // evanphx finds no error for an absent member, so replace adds it.
                Ok(Target::Member(_, key)) => run(
                    doc,
                    PatchOperation::Add(AddOperation {
                        path: pointer_to(&loc, &key),
                        value,
                    }),
                ),
                Ok(Target::Element(_, i)) => run(
                    doc,
                    PatchOperation::Replace(ReplaceOperation {
                        path: pointer_to(&loc, &i.to_string()),
                        value,
                    }),
                ),
                Err(_) => Err(invalid(format!(
                    "replace operation does not apply: doc is missing key: {path}: missing value"
                ))),
            }
        }
        OpKind::Test => {
            let failed = || invalid(format!("testing value {path} failed: test failed"));
            if path.is_empty() {
                return match op.value {
                    Some(expected) if lazy_equal(doc, expected) => Ok(()),
                    _ => Err(failed()),
                };
            }
            let loc = locate(doc, path).ok_or_else(|| {
                invalid(format!(
                    "test operation does not apply: is missing path: {path}: missing value"
                ))
            })?;
            let actual = match target(doc, &loc) {
                Ok(Target::Member(v, _)) => v.filter(|v| !v.is_null()),
                Ok(Target::Element(v, _)) => Some(v).filter(|v| !v.is_null()),
                Err(e) => return Err(invalid(format!("error in test for path: '{path}': {e}"))),
            };
            match (actual, op.value) {
                (None, None | Some(Value::Null)) => Ok(()),
                (Some(actual), Some(expected)) if lazy_equal(actual, expected) => Ok(()),
                _ => Err(failed()),
            }
        }
        OpKind::Move => {
            let from = op.from;
            let from_loc = locate(doc, from).ok_or_else(|| {
                invalid(format!(
                    "move operation does not apply: doc is missing from path: {from}: missing value"
                ))
            })?;
            let from_pointer = match target(doc, &from_loc) {
                Ok(Target::Member(Some(_), key)) => pointer_to(&from_loc, &key),
                Ok(Target::Member(None, key)) => {
                    return Err(invalid(format!(
                        "error in move for path: '{key}': Unable to remove nonexistent key: {key}: missing value"
                    )));
                }
                Ok(Target::Element(_, i)) => pointer_to(&from_loc, &i.to_string()),
                Err(e) => {
                    return Err(invalid(format!(
                        "error in move for path: '{}': {e}",
                        from_loc.key
                    )));
                }
            };
            // Taking the value out leaves a placeholder the remove then drops: no copy.
            let value = doc
                .pointer_mut(from_pointer.as_str())
                .map(std::mem::take)
                .unwrap_or(Value::Null);
            run(
                doc,
                PatchOperation::Remove(RemoveOperation { path: from_pointer }),
            )?;
            let loc = locate(doc, path).ok_or_else(|| {
                invalid(format!(
                    "move operation does not apply: doc is missing destination path: {path}: missing value"
                ))
            })?;
            ensure_fits(op.kind, &loc, &value)?;
            let pointer = insertion_pointer(doc, &loc)
                .map_err(|e| invalid(format!("error in move for path: '{path}': {e}")))?;
            run(
                doc,
                PatchOperation::Add(AddOperation {
                    path: pointer,
                    value,
                }),
            )
        }
        OpKind::Copy => {
            let from = op.from;
            let from_loc = locate(doc, from).ok_or_else(|| {
                invalid(format!(
                    "copy operation does not apply: doc is missing from path: {from}: missing value"
                ))
            })?;
            // evanphx copies an absent member as null.
            let source = match target(doc, &from_loc) {
                Ok(Target::Member(v, _)) => v.filter(|v| !v.is_null()),
                Ok(Target::Element(v, _)) => Some(v).filter(|v| !v.is_null()),
                Err(e) => return Err(invalid(format!("error in copy for from: '{from}': {e}"))),
            };
            let loc = locate(doc, path).ok_or_else(|| {
                invalid(format!(
                    "copy operation does not apply: doc is missing destination path: {path}: missing value"
                ))
            })?;
            let size = source.map(encoded_len).unwrap_or(0);
            *copied = copied.saturating_add(size);
            if *copied > MAX_JSON_PATCH_COPY_BYTES {
                return Err(invalid(format!(
                    "Unable to complete the copy, the accumulated size increase of copy is {}, exceeding the limit {MAX_JSON_PATCH_COPY_BYTES}",
                    *copied
                )));
            }
            if let Some(source) = source {
                ensure_fits(op.kind, &loc, source)?;
            }
            let value = source.cloned().unwrap_or(Value::Null);
            let pointer = insertion_pointer(doc, &loc)
                .map_err(|e| invalid(format!("error while adding value during copy: {e}")))?;
            run(
                doc,
                PatchOperation::Add(AddOperation {
                    path: pointer,
                    value,
                }),
            )
        }
    }
}

// ---------------------------------------------------------------------------------------
// JSON merge patch (RFC 7386, as evanphx/json-patch v4 applies it)
// ---------------------------------------------------------------------------------------

/// Applies an `application/merge-patch+json` patch.
///
/// The patch must be an object ([`PatchError::BadRequest`] otherwise, with upstream's
/// messages for strict decoding and for `null`).
pub fn merge_patch(original: &Value, patch: &Value) -> Result<Value, PatchError> {
    match patch {
        Value::Object(_) => {}
        Value::Null => return Err(bad("Invalid JSON Patch")),
        other => {
            return Err(bad(format!(
                "error decoding patch: json: cannot unmarshal {} into Go value of type map[string]interface {{}}",
                json_kind(other)
            )));
        }
    }
    check_patch_depth(patch)?;
    check_object_depth(original)?;
    let mut patch = patch.clone();
    prune_nulls_in_lists(&mut patch);
    let mut doc = original.clone();
    json_patch::merge(&mut doc, &patch);
    Ok(doc)
}

/// evanphx drops null members of objects nested in a list the patch sets, where RFC 7386
/// (and the crate) keeps list contents verbatim.
fn prune_nulls_in_lists(value: &mut Value) {
    match value {
        Value::Object(map) => map.values_mut().for_each(prune_nulls_in_lists),
        Value::Array(items) => items.iter_mut().for_each(prune_nulls),
        _ => {}
    }
}

fn prune_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(prune_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(prune_nulls),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------
// Strategic merge patch
// ---------------------------------------------------------------------------------------

const DIRECTIVE_MARKER: &str = "$patch";
const DELETE_DIRECTIVE: &str = "delete";
const REPLACE_DIRECTIVE: &str = "replace";
const MERGE_DIRECTIVE: &str = "merge";
const RETAIN_KEYS_DIRECTIVE: &str = "$retainKeys";
const DELETE_FROM_PRIMITIVE_LIST_PREFIX: &str = "$deleteFromPrimitiveList";
const SET_ELEMENT_ORDER_PREFIX: &str = "$setElementOrder";

const ERR_NO_LIST_OF_LISTS: &str = "lists of lists are not supported";
const ERR_BAD_PATCH_FORMAT_FOR_PRIMITIVE_LIST: &str = "invalid patch format of primitive list";
const ERR_BAD_PATCH_FORMAT_FOR_RETAIN_KEYS: &str = "invalid patch format of retainKeys";
const ERR_BAD_PATCH_FORMAT_FOR_SET_ELEMENT_ORDER_LIST: &str =
    "invalid patch format of setElementOrder list";

/// Applies an `application/strategic-merge-patch+json` patch to an object of the kind whose
/// schema is `node` (from the same `schemas`).
///
/// Lists merge as the schema says (by merge key, as sets, or atomically); fields the schema
/// does not know merge as maps and replace as lists. A `null` patch changes nothing, as
/// upstream decodes it to an empty map. Malformed patches and directives are
/// [`PatchError::BadRequest`]; lists of lists are [`PatchError::Invalid`], as upstream
/// answers 422 for them.
pub fn strategic_merge_patch(
    schemas: &Schemas,
    node: NodeId,
    original: &Value,
    patch: &Value,
) -> Result<Value, PatchError> {
    let patch_map = match patch {
        Value::Null => return Ok(original.clone()),
        Value::Object(map) => map,
        other => {
            return Err(bad(format!(
                "json: cannot unmarshal {} into Go value of type map[string]interface {{}}",
                json_kind(other)
            )));
        }
    };
    check_patch_depth(patch)?;
    check_object_depth(original)?;
    let original = match original {
        Value::Object(map) => map.clone(),
        // Upstream treats a missing original as an empty map.
        _ => Map::new(),
    };
    let merged = Strategic { schemas }.merge_map(original, patch_map.clone(), Some(node))?;
    Ok(Value::Object(merged))
}

/// Go's dynamic types of decoded JSON: upstream compares them, and `int64` and `float64`
/// differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GoType {
    Nil,
    Bool,
    Int64,
    Float64,
    String,
    Slice,
    Map,
}

impl GoType {
    fn of(value: &Value) -> GoType {
        match value {
            Value::Null => GoType::Nil,
            Value::Bool(_) => GoType::Bool,
            Value::Number(n) if n.is_i64() => GoType::Int64,
            Value::Number(_) => GoType::Float64,
            Value::String(_) => GoType::String,
            Value::Array(_) => GoType::Slice,
            Value::Object(_) => GoType::Map,
        }
    }

    fn name(self) -> &'static str {
        match self {
            GoType::Nil => "%!s(<nil>)",
            GoType::Bool => "bool",
            GoType::Int64 => "int64",
            GoType::Float64 => "float64",
            GoType::String => "string",
            GoType::Slice => "[]interface {}",
            GoType::Map => "map[string]interface {}",
        }
    }
}

fn err_bad_arg_type(expected: GoType, actual: &Value) -> PatchError {
    bad(format!(
        "expected a {}, but received a {}",
        expected.name(),
        GoType::of(actual).name()
    ))
}

fn err_no_merge_key(map: &Map<String, Value>, key: &str) -> PatchError {
    bad(format!(
        "map: {} does not contain declared merge key: {key}",
        go_fmt(&Value::Object(map.clone()))
    ))
}

fn err_bad_patch_type(directive: &Value, map: &Map<String, Value>) -> PatchError {
    let directive = match directive {
        Value::String(s) => s.clone(),
        other => format!("%!s({}={})", GoType::of(other).name(), go_fmt(other)),
    };
    bad(format!(
        "unknown patch type: {directive} in map: {}",
        go_fmt(&Value::Object(map.clone()))
    ))
}

/// `extractKey`: the field a `$prefix/field` directive names.
fn extract_key<'k>(key: &'k str, prefix: &str, error: &str) -> Result<&'k str, PatchError> {
    match key.split_once('/') {
        Some((head, field)) if head == prefix => Ok(field),
        _ => Err(bad(error)),
    }
}

/// Identity of a value for set membership, as Go's `==` on decoded values: `1` and `1.0`
/// differ, object keys are sorted by serde_json's map.
fn identity(value: &Value) -> String {
    match value {
        Value::Number(n) if n.is_f64() && n.as_f64() == Some(0.0) => "0.0".to_string(),
        other => other.to_string(),
    }
}

/// Identity of a list item for ordering: its merge key's value for maps, itself otherwise.
/// An absent key reads as nil, as in Go.
fn item_identity(item: &Value, merge_key: &str, kind: GoType) -> String {
    if kind == GoType::Map {
        let v = item
            .as_object()
            .and_then(|m| m.get(merge_key))
            .unwrap_or(&Value::Null);
        identity(v)
    } else {
        identity(item)
    }
}

/// First positions of items in a list, for upstream's `index` lookups.
struct Positions(HashMap<String, usize>);

impl Positions {
    fn of(list: &[Value], merge_key: &str, kind: GoType) -> Positions {
        let mut map = HashMap::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            map.entry(item_identity(item, merge_key, kind)).or_insert(i);
        }
        Positions(map)
    }

    fn from_identities(ids: impl IntoIterator<Item = String>) -> Positions {
        let mut map = HashMap::new();
        for (i, id) in ids.into_iter().enumerate() {
            map.entry(id).or_insert(i);
        }
        Positions(map)
    }

    fn get(&self, item: &Value, merge_key: &str, kind: GoType) -> Option<usize> {
        self.0.get(&item_identity(item, merge_key, kind)).copied()
    }
}

fn has_directive(value: &Value) -> bool {
    value
        .as_object()
        .is_some_and(|m| m.contains_key(DIRECTIVE_MARKER))
}

fn is_delete_item(value: &Value) -> bool {
    value
        .as_object()
        .and_then(|m| m.get(DIRECTIVE_MARKER))
        .and_then(Value::as_str)
        == Some(DELETE_DIRECTIVE)
}

/// `removeDirectives`: drops maps carrying `$patch` (None when the value itself is one).
fn remove_directives(value: Value) -> Option<Value> {
    match value {
        Value::Object(map) => {
            if map.contains_key(DIRECTIVE_MARKER) {
                return None;
            }
            Some(Value::Object(
                map.into_iter()
                    .filter_map(|(k, v)| remove_directives(v).map(|v| (k, v)))
                    .collect(),
            ))
        }
        Value::Array(items) => Some(Value::Array(
            items.into_iter().filter_map(remove_directives).collect(),
        )),
        other => Some(other),
    }
}

/// `discardNullValuesFromPatch`: a patch value taken whole has no deletions to express.
fn discard_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(discard_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(discard_nulls),
        _ => {}
    }
}

/// `sliceElementType`: the one Go type of all items of the lists.
fn slice_element_type(lists: &[&[Value]]) -> Result<GoType, PatchError> {
    let mut found: Option<GoType> = None;
    for item in lists.iter().flat_map(|l| l.iter()) {
        let t = GoType::of(item);
        match found {
            None if t == GoType::Slice => return Err(invalid(ERR_NO_LIST_OF_LISTS)),
            // Go panics on a leading nil; any nil makes the list unmergeable.
            None if t != GoType::Nil => found = Some(t),
            Some(prev) if prev == t => {}
            _ => {
                let all: Vec<Value> = lists.iter().map(|l| Value::Array(l.to_vec())).collect();
                return Err(bad(format!(
                    "list element types are not identical: {}",
                    go_fmt(&Value::Array(all))
                )));
            }
        }
    }
    found.ok_or_else(|| bad("no elements in any of the given slices"))
}

/// `validateMergeKeyInLists`.
fn validate_merge_key(merge_key: &str, lists: &[&[Value]]) -> Result<(), PatchError> {
    for item in lists.iter().flat_map(|l| l.iter()) {
        let Value::Object(map) = item else {
            return Err(err_bad_arg_type(GoType::Map, item));
        };
        if !map.contains_key(merge_key) {
            return Err(err_no_merge_key(map, merge_key));
        }
    }
    Ok(())
}

/// `normalizeSliceOrder`: sorts items by their position in `order` (Go's stable sort with
/// upstream's comparator, which calls items missing from `order` smaller than anything);
/// `$patch: delete` items go last.
fn normalize_slice_order(
    to_sort: Vec<Value>,
    order: &Positions,
    merge_key: &str,
    kind: GoType,
) -> Vec<Value> {
    let (keep, deleted): (Vec<Value>, Vec<Value>) = if kind == GoType::Map {
        to_sort.into_iter().partition(|v| !is_delete_item(v))
    } else {
        (to_sort, Vec::new())
    };
    let mut keyed: Vec<(Option<usize>, Value)> = keep
        .into_iter()
        .map(|v| (order.get(&v, merge_key, kind), v))
        .collect();
    go_stable_sort(&mut keyed, |a, b| match (a.0, b.0) {
        (Some(x), Some(y)) => x < y,
        _ => true,
    });
    keyed.into_iter().map(|(_, v)| v).chain(deleted).collect()
}

/// `normalizeElementOrder` + `mergeSortedSlice`: patch items keep the patch's order and
/// server-only items are slotted in before the first patch item they precede on the server.
fn normalize_element_order(
    patch_items: Vec<Value>,
    server_only: Vec<Value>,
    patch_order: &Positions,
    server_order: &Positions,
    merge_key: &str,
    kind: GoType,
) -> Vec<Value> {
    let patch_items = normalize_slice_order(patch_items, patch_order, merge_key, kind);
    let server_only = normalize_slice_order(server_only, server_order, merge_key, kind);
    let rank = |v: Value| (server_order.get(&v, merge_key, kind), v);
    let mut left = server_only.into_iter().map(rank).peekable();
    let mut right = patch_items.into_iter().map(rank).peekable();
    let mut out = Vec::with_capacity(left.len() + right.len());
    loop {
        let take_left = match (left.peek(), right.peek()) {
            (Some((Some(l), _)), Some((Some(r), _))) => l < r,
            (Some(_), Some(_)) => false,
            _ => break,
        };
        let next = if take_left { left.next() } else { right.next() };
        out.extend(next.map(|(_, v)| v));
    }
    out.extend(left.map(|(_, v)| v));
    out.extend(right.map(|(_, v)| v));
    out
}

/// `partitionPrimitivesByPresentInList`: items present in the set first, in their order.
fn partition_primitives(merged: Vec<Value>, present: &HashSet<String>) -> (Vec<Value>, Vec<Value>) {
    merged
        .into_iter()
        .partition(|v| present.contains(&identity(v)))
}

/// Which merge-key values a list holds, for `partitionMapsByPresentInList`.
struct Presence {
    first_match: HashMap<String, usize>,
    /// Upstream scans the list from the start and fails at its first non-map unless a
    /// match comes earlier.
    first_non_map: Option<usize>,
}

impl Presence {
    fn of(list: &[Value], merge_key: &str) -> Presence {
        let mut first_match = HashMap::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            if let Some(v) = item.as_object().and_then(|m| m.get(merge_key)) {
                first_match.entry(identity(v)).or_insert(i);
            }
        }
        Presence {
            first_match,
            first_non_map: list.iter().position(|v| !v.is_object()),
        }
    }
}

/// `partitionMapsByPresentInList`, including its errors for items that are not maps or lack
/// the merge key.
fn partition_maps(
    merged: Vec<Value>,
    presence: &Presence,
    merge_key: &str,
) -> Result<(Vec<Value>, Vec<Value>), PatchError> {
    let mut present = Vec::new();
    let mut absent = Vec::new();
    for item in merged {
        let Value::Object(map) = &item else {
            return Err(err_bad_arg_type(GoType::Map, &item));
        };
        let Some(value) = map.get(merge_key) else {
            return Err(err_no_merge_key(map, merge_key));
        };
        let hit = presence.first_match.get(&identity(value)).copied();
        match (hit, presence.first_non_map) {
            (Some(i), Some(n)) if n < i => {
                return Err(bad(format!("value for key {n} is not a map")));
            }
            (None, Some(n)) => return Err(bad(format!("value for key {n} is not a map"))),
            (Some(_), _) => present.push(item),
            (None, None) => absent.push(item),
        }
    }
    Ok((present, absent))
}

/// `mergeKeyValueEqual`.
fn merge_key_value_equal(left: &Value, right: &Value, merge_key: &str) -> Result<bool, PatchError> {
    if merge_key.is_empty() {
        return Ok(identity(left) == identity(right));
    }
    let Value::Object(l) = left else {
        return Err(err_bad_arg_type(GoType::Map, left));
    };
    let Value::Object(r) = right else {
        return Err(err_bad_arg_type(GoType::Map, right));
    };
    let lv = l
        .get(merge_key)
        .ok_or_else(|| err_no_merge_key(l, merge_key))?;
    let rv = r
        .get(merge_key)
        .ok_or_else(|| err_no_merge_key(r, merge_key))?;
    Ok(identity(lv) == identity(rv))
}

/// `validatePatchWithSetOrderList`: the patch list must be a subsequence of the order list,
/// deletions and other directives aside.
fn validate_set_order(
    patch_list: &[Value],
    order: &[Value],
    merge_key: &str,
) -> Result<(), PatchError> {
    if order.is_empty() || patch_list.is_empty() {
        return Ok(());
    }
    let candidates: Vec<&Value> = if merge_key.is_empty() {
        patch_list.iter().collect()
    } else {
        if let Some(v) = patch_list.iter().find(|v| !v.is_object()) {
            return Err(err_bad_arg_type(GoType::Map, v));
        }
        patch_list.iter().filter(|v| !is_delete_item(v)).collect()
    };
    let mut pending = candidates.iter().peekable();
    let mut order_items = order.iter();
    loop {
        let Some(item) = pending.peek() else {
            return Ok(());
        };
        if has_directive(item) {
            pending.next();
            continue;
        }
        let Some(ordered) = order_items.next() else {
            return Err(bad(format!(
                "the order in patch list:\n{}\n doesn't match {SET_ELEMENT_ORDER_PREFIX} list:\n{}",
                go_fmt(&Value::Array(patch_list.to_vec())),
                go_fmt(&Value::Array(order.to_vec()))
            )));
        };
        if merge_key_value_equal(item, ordered, merge_key)? {
            pending.next();
        }
    }
}

/// How a list field merges: upstream's `patchStrategy` and `patchMergeKey`.
struct ListMeta {
    /// Schema of the items, when known.
    items: Option<NodeId>,
    /// `patchStrategy: merge`.
    merge: bool,
    /// `patchMergeKey`; empty for none.
    merge_key: &'static str,
}

struct Strategic<'s> {
    schemas: &'s Schemas,
}

impl Strategic<'_> {
    /// The schema of a field's value; `None` where the schema does not know the field,
    /// which then merges as unstructured data.
    fn field(&self, node: Option<NodeId>, name: &str) -> Option<NodeId> {
        node.and_then(|n| self.schemas.field(n, name))
    }

    fn list_meta(&self, node: Option<NodeId>, name: &str) -> ListMeta {
        let unknown = ListMeta {
            items: None,
            merge: false,
            merge_key: "",
        };
        let Some(child) = self.field(node, name) else {
            return unknown;
        };
        match &self.schemas.node(child).shape {
            Shape::Array { items, strategy } => {
                let (merge, merge_key) = match strategy {
                    MergeStrategy::ListMap(keys) => (true, keys.first().copied().unwrap_or("")),
                    MergeStrategy::ListSet => (true, ""),
                    MergeStrategy::ListAtomic | MergeStrategy::MapAtomic => (false, ""),
                };
                ListMeta {
                    items: Some(*items),
                    merge,
                    merge_key,
                }
            }
            _ => unknown,
        }
    }

    /// The Go kind name of a list's items, for "cannot merge lists without merge key".
    fn kind_name(&self, items: Option<NodeId>) -> &'static str {
        match items.map(|n| &self.schemas.node(n).shape) {
            Some(Shape::Object { properties, .. }) if !properties.is_empty() => "struct",
            Some(Shape::Object { .. }) => "map",
            Some(Shape::Array { .. }) => "slice",
            Some(Shape::Boolean) => "bool",
            Some(Shape::Integer) => "int64",
            Some(Shape::Number) => "float64",
            Some(Shape::String | Shape::Time | Shape::Bytes) => "string",
            Some(Shape::IntOrString | Shape::Quantity) => "struct",
            Some(Shape::Any) | None => "interface",
        }
    }

    /// `mergeMap`.
    fn merge_map(
        &self,
        mut original: Map<String, Value>,
        mut patch: Map<String, Value>,
        node: Option<NodeId>,
    ) -> Result<Map<String, Value>, PatchError> {
        if let Some(directive) = patch.get(DIRECTIVE_MARKER) {
            return match directive.as_str() {
                // Taken verbatim, nested directives included, as upstream does.
                Some(REPLACE_DIRECTIVE) => {
                    patch.remove(DIRECTIVE_MARKER);
                    Ok(patch)
                }
                Some(DELETE_DIRECTIVE) => Ok(Map::new()),
                _ => Err(err_bad_patch_type(directive, &patch)),
            };
        }
        apply_retain_keys(&mut original, &mut patch)?;
        self.apply_set_element_order(&mut original, &mut patch, node)?;

        for (key, patch_value) in patch {
            let (key, is_delete_list) = if key.starts_with(DELETE_FROM_PRIMITIVE_LIST_PREFIX) {
                let field = extract_key(
                    &key,
                    DELETE_FROM_PRIMITIVE_LIST_PREFIX,
                    ERR_BAD_PATCH_FORMAT_FOR_PRIMITIVE_LIST,
                )?;
                if field.is_empty() {
                    (key, true)
                } else {
                    (field.to_string(), true)
                }
            } else {
                (key, false)
            };

            if patch_value.is_null() {
                original.remove(&key);
                continue;
            }
            let Some(slot) = original.get_mut(&key) else {
                if !is_delete_list {
                    take_patch_value(&mut original, key, patch_value);
                }
                continue;
            };
            if GoType::of(slot) != GoType::of(&patch_value) {
                if !is_delete_list {
                    take_patch_value(&mut original, key, patch_value);
                }
                continue;
            }
            match (slot, patch_value) {
                (Value::Object(current), Value::Object(patch_map)) => {
                    let child = self.field(node, &key);
                    *current = self.merge_map(std::mem::take(current), patch_map, child)?;
                }
                (Value::Array(current), Value::Array(patch_list)) => {
                    let meta = self.list_meta(node, &key);
                    // Deletion lists apply whatever the field's strategy.
                    *current = if meta.merge || is_delete_list {
                        self.merge_slice(
                            std::mem::take(current),
                            patch_list,
                            &meta,
                            is_delete_list,
                        )?
                    } else {
                        patch_list
                    };
                }
                (slot, scalar) => *slot = scalar,
            }
        }
        Ok(original)
    }

    /// `mergePatchIntoOriginal`: applies each `$setElementOrder/<field>` together with the
    /// field's patch list, then orders the result as the directive lists it.
    fn apply_set_element_order(
        &self,
        original: &mut Map<String, Value>,
        patch: &mut Map<String, Value>,
        node: Option<NodeId>,
    ) -> Result<(), PatchError> {
        let directives: Vec<String> = patch
            .keys()
            .filter(|k| k.starts_with(SET_ELEMENT_ORDER_PREFIX))
            .cloned()
            .collect();
        for directive in directives {
            let Some(order) = patch.remove(&directive) else {
                continue;
            };
            let Value::Array(order) = order else {
                return Err(err_bad_arg_type(GoType::Slice, &order));
            };
            let field = extract_key(
                &directive,
                SET_ELEMENT_ORDER_PREFIX,
                ERR_BAD_PATCH_FORMAT_FOR_SET_ELEMENT_ORDER_LIST,
            )?
            .to_string();
            let current = take_list(original, &field)?;
            let patch_list = take_list(patch, &field)?;
            let meta = self.list_meta(node, &field);
            let merge_key = meta.merge_key;
            validate_set_order(patch_list.as_deref().unwrap_or(&[]), &order, merge_key)?;
            if current.is_none() && patch_list.is_none() {
                continue;
            }
            let current_items = current.as_deref().unwrap_or(&[]);
            let kind = slice_element_type(&[current_items, patch_list.as_deref().unwrap_or(&[])])?;
            if kind == GoType::Map {
                validate_merge_key(merge_key, &[current_items, &order])?;
            }
            // Taken before the merge consumes the list; merging never changes an item's
            // merge key.
            let server_order = match &patch_list {
                Some(list) if meta.merge && kind == GoType::Map && current.is_some() => {
                    Positions::from_identities(aliased_server_order(current_items, list, merge_key))
                }
                _ => Positions::of(current_items, merge_key, kind),
            };
            let order_positions = Positions::of(&order, merge_key, kind);
            let merged = match (current, patch_list) {
                (Some(current), None) => current,
                (None, Some(list)) => list.into_iter().filter_map(remove_directives).collect(),
                (Some(current), Some(list)) if meta.merge => {
                    self.merge_slice(current, list, &meta, false)?
                }
                (_, Some(list)) => list,
                (None, None) => continue,
            };
            let (listed, unlisted) = if merge_key.is_empty() {
                let present: HashSet<String> = order.iter().map(identity).collect();
                let (listed, unlisted) = partition_primitives(merged, &present);
                if kind == GoType::Map {
                    validate_merge_key(merge_key, &[&listed, &unlisted])?;
                }
                (listed, unlisted)
            } else {
                partition_maps(merged, &Presence::of(&order, merge_key), merge_key)?
            };
            let items = normalize_element_order(
                listed,
                unlisted,
                &order_positions,
                &server_order,
                merge_key,
                kind,
            );
            original.insert(field, Value::Array(items));
        }
        Ok(())
    }

    /// `mergeSlice`.
    fn merge_slice(
        &self,
        original: Vec<Value>,
        patch: Vec<Value>,
        meta: &ListMeta,
        is_delete_list: bool,
    ) -> Result<Vec<Value>, PatchError> {
        if original.is_empty() && patch.is_empty() {
            return Ok(original);
        }
        let kind = slice_element_type(&[&original, &patch])?;
        let merge_key = meta.merge_key;
        if kind != GoType::Map {
            let present: HashSet<String> = patch.iter().map(identity).collect();
            if is_delete_list {
                return Ok(original
                    .into_iter()
                    .filter(|v| !present.contains(&identity(v)))
                    .collect());
            }
            let server_order = Positions::of(&original, "", kind);
            let patch_order = Positions::of(&patch, "", kind);
            let mut seen = HashSet::new();
            let merged: Vec<Value> = original
                .into_iter()
                .chain(patch)
                .filter(|v| seen.insert(identity(v)))
                .collect();
            let (patch_items, server_only) = partition_primitives(merged, &present);
            return Ok(normalize_element_order(
                patch_items,
                server_only,
                &patch_order,
                &server_order,
                "",
                kind,
            ));
        }
        if merge_key.is_empty() {
            return Err(bad(format!(
                "cannot merge lists without merge key for {}",
                self.kind_name(meta.items)
            )));
        }
        let (original, patch) = merge_slice_with_special_elements(original, patch, merge_key)?;
        // Upstream validates both lists when ordering; every item reaches the partition
        // below, which checks the same (each is a map with the merge key).
        let server_order = Positions::of(&original, merge_key, kind);
        let patch_order = Positions::of(&patch, merge_key, kind);
        let presence = Presence::of(&patch, merge_key);
        let merged = self.merge_slice_items(original, patch, merge_key, meta.items)?;
        let (patch_items, server_only) = partition_maps(merged, &presence, merge_key)?;
        Ok(normalize_element_order(
            patch_items,
            server_only,
            &patch_order,
            &server_order,
            merge_key,
            kind,
        ))
    }

    /// `mergeSliceWithoutSpecialElements`: merges patch items into the items with the same
    /// merge key and appends the rest, as they are.
    fn merge_slice_items(
        &self,
        mut original: Vec<Value>,
        patch: Vec<Value>,
        merge_key: &str,
        items: Option<NodeId>,
    ) -> Result<Vec<Value>, PatchError> {
        let mut index: HashMap<String, usize> = HashMap::with_capacity(original.len());
        for (i, item) in original.iter().enumerate() {
            if let Some(v) = item.as_object().and_then(|m| m.get(merge_key)) {
                index.entry(identity(v)).or_insert(i);
            }
        }
        for item in patch {
            let Value::Object(patch_map) = item else {
                return Err(err_bad_arg_type(GoType::Map, &item));
            };
            let Some(key_value) = patch_map.get(merge_key) else {
                return Err(err_no_merge_key(&patch_map, merge_key));
            };
            let id = identity(key_value);
            match index.get(&id).and_then(|&i| original.get_mut(i)) {
                Some(slot) => {
                    let current = match std::mem::take(slot) {
                        Value::Object(m) => m,
                        _ => Map::new(),
                    };
                    *slot = Value::Object(self.merge_map(current, patch_map, items)?);
                }
                None => {
                    index.insert(id, original.len());
                    original.push(Value::Object(patch_map));
                }
            }
        }
        Ok(original)
    }
}

/// The server order `mergePatchIntoOriginal` really uses when a `$setElementOrder` list
/// is merged. Upstream passes the live slice on, and `mergeSlice` deletes from it in place
/// (shifting the survivors left) and then appends new items to the shortened slice, which
/// overwrites the vacated tail of the very array the order is later read from. So the
/// first as many new items as were deleted take the place of the deleted ones, and the
/// interleaving of server-only and new items follows from that (upstream's own test
/// "add map and delete map from merging list" depends on it).
fn aliased_server_order(original: &[Value], patch: &[Value], merge_key: &str) -> Vec<String> {
    let key_of = |v: &Value| v.as_object().and_then(|m| m.get(merge_key)).map(identity);
    let mut doomed = HashSet::new();
    let mut replace = false;
    for item in patch {
        let directive = item
            .as_object()
            .and_then(|m| m.get(DIRECTIVE_MARKER))
            .and_then(Value::as_str);
        match directive {
            Some(DELETE_DIRECTIVE) => doomed.extend(key_of(item)),
            Some(REPLACE_DIRECTIVE) => replace = true,
            _ => {}
        }
    }
    // Items without the merge key are never deleted, and read as nil when ordering.
    let survivors: Vec<Option<String>> = original
        .iter()
        .map(key_of)
        .filter(|k| k.as_ref().is_none_or(|k| !doomed.contains(k)))
        .collect();
    let vacated = original.len().saturating_sub(survivors.len());
    let mut known: HashSet<String> = survivors.iter().flatten().cloned().collect();
    let appended: Vec<String> = if replace {
        Vec::new()
    } else {
        patch
            .iter()
            .filter(|v| !has_directive(v))
            .filter_map(key_of)
            .filter(|k| known.insert(k.clone()))
            .take(vacated)
            .collect()
    };
    let nil = identity(&Value::Null);
    survivors
        .into_iter()
        .map(|k| k.unwrap_or_else(|| nil.clone()))
        .chain(appended)
        .collect()
}

/// Takes a list field out of a map; an error when it is not a list.
fn take_list(map: &mut Map<String, Value>, field: &str) -> Result<Option<Vec<Value>>, PatchError> {
    match map.remove(field) {
        None => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(other) => Err(err_bad_arg_type(GoType::Slice, &other)),
    }
}

/// Stores a patch value the original lacks (or has with another type): nulls and
/// directive-carrying maps inside it are dropped.
fn take_patch_value(original: &mut Map<String, Value>, key: String, mut value: Value) {
    discard_nulls(&mut value);
    match remove_directives(value) {
        Some(value) => {
            original.insert(key, value);
        }
        None => {
            original.remove(&key);
        }
    }
}

/// `applyRetainKeysDirective`: clears the fields `$retainKeys` does not list, after checking
/// that the patch sets only listed fields.
fn apply_retain_keys(
    original: &mut Map<String, Value>,
    patch: &mut Map<String, Value>,
) -> Result<(), PatchError> {
    let Some(retain) = patch.remove(RETAIN_KEYS_DIRECTIVE) else {
        return Ok(());
    };
    let Value::Array(retain) = retain else {
        return Err(bad(ERR_BAD_PATCH_FORMAT_FOR_RETAIN_KEYS));
    };
    let retained: HashSet<&str> = retain.iter().filter_map(Value::as_str).collect();
    let violates = patch.iter().any(|(k, v)| {
        !v.is_null()
            && !k.starts_with(DELETE_FROM_PRIMITIVE_LIST_PREFIX)
            && !k.starts_with(SET_ELEMENT_ORDER_PREFIX)
            && !retained.contains(k.as_str())
    });
    if violates {
        return Err(bad(ERR_BAD_PATCH_FORMAT_FOR_RETAIN_KEYS));
    }
    original.retain(|k, _| retained.contains(k.as_str()));
    Ok(())
}

/// `mergeSliceWithSpecialElements`: applies `$patch: delete` items and `$patch: replace`,
/// returning the original and the patch without directive items.
fn merge_slice_with_special_elements(
    original: Vec<Value>,
    patch: Vec<Value>,
    merge_key: &str,
) -> Result<(Vec<Value>, Vec<Value>), PatchError> {
    let mut plain = Vec::with_capacity(patch.len());
    let mut replace = false;
    let mut doomed: HashSet<String> = HashSet::new();
    for item in patch {
        let Value::Object(map) = &item else {
            return Err(err_bad_arg_type(GoType::Map, &item));
        };
        let Some(directive) = map.get(DIRECTIVE_MARKER) else {
            plain.push(item);
            continue;
        };
        match directive.as_str() {
            Some(DELETE_DIRECTIVE) => match map.get(merge_key) {
                Some(v) => {
                    doomed.insert(identity(v));
                }
                None => return Err(err_no_merge_key(map, merge_key)),
            },
            Some(REPLACE_DIRECTIVE) => replace = true,
            Some(MERGE_DIRECTIVE) => {
                return Err(bad("merging lists cannot yet be specified in the patch"));
            }
            _ => return Err(err_bad_patch_type(directive, map)),
        }
    }
    if replace {
        return Ok((plain, Vec::new()));
    }
    let original = if doomed.is_empty() {
        original
    } else {
        original
            .into_iter()
            .filter(|v| {
                v.as_object()
                    .and_then(|m| m.get(merge_key))
                    .is_none_or(|k| !doomed.contains(&identity(k)))
            })
            .collect()
    };
    Ok((original, plain))
}

// ---------------------------------------------------------------------------------------
// Go's sort.SliceStable
// ---------------------------------------------------------------------------------------

/// A port of Go's `sort.SliceStable` (insertion sort on blocks of 20, then SymMerge).
/// Upstream's ordering comparator is not a strict weak order when items are missing from
/// the order list, so only Go's exact algorithm reproduces its results; this one also
/// cannot panic on such a comparator.
fn go_stable_sort<T>(data: &mut [T], less: impl Fn(&T, &T) -> bool) {
    let less_at = |data: &[T], i: usize, j: usize| match (data.get(i), data.get(j)) {
        (Some(a), Some(b)) => less(a, b),
        _ => false,
    };
    let n = data.len();
    let mut block = 20;
    let (mut a, mut b) = (0, block);
    while b <= n {
        insertion_sort(data, a, b, &less_at);
        a = b;
        b += block;
    }
    insertion_sort(data, a, n, &less_at);
    while block < n {
        a = 0;
        b = 2 * block;
        while b <= n {
            sym_merge(data, a, a + block, b, &less_at);
            a = b;
            b += 2 * block;
        }
        let m = a + block;
        if m < n {
            sym_merge(data, a, m, n, &less_at);
        }
        block *= 2;
    }
}

fn swap_at<T>(data: &mut [T], i: usize, j: usize) {
    if i < data.len() && j < data.len() {
        data.swap(i, j);
    }
}

fn insertion_sort<T>(
    data: &mut [T],
    a: usize,
    b: usize,
    less: &impl Fn(&[T], usize, usize) -> bool,
) {
    for i in a + 1..b {
        let mut j = i;
        while j > a && less(data, j, j - 1) {
            swap_at(data, j, j - 1);
            j -= 1;
        }
    }
}

fn sym_merge<T>(
    data: &mut [T],
    a: usize,
    m: usize,
    b: usize,
    less: &impl Fn(&[T], usize, usize) -> bool,
) {
    if m.saturating_sub(a) == 1 {
        let (mut i, mut j) = (m, b);
        while i < j {
            let h = (i + j) / 2;
            if less(data, h, a) {
                i = h + 1;
            } else {
                j = h;
            }
        }
        for k in a..i.saturating_sub(1) {
            swap_at(data, k, k + 1);
        }
        return;
    }
    if b.saturating_sub(m) == 1 {
        let (mut i, mut j) = (a, m);
        while i < j {
            let h = (i + j) / 2;
            if !less(data, m, h) {
                i = h + 1;
            } else {
                j = h;
            }
        }
        let mut k = m;
        while k > i {
            swap_at(data, k, k - 1);
            k -= 1;
        }
        return;
    }
    let mid = (a + b) / 2;
    let n = mid + m;
    let (mut start, mut r) = if m > mid {
        (n.saturating_sub(b), mid)
    } else {
        (a, m)
    };
    let p = n.saturating_sub(1);
    while start < r {
        let c = (start + r) / 2;
        if !less(data, p.saturating_sub(c), c) {
            start = c + 1;
        } else {
            r = c;
        }
    }
    let end = n.saturating_sub(start);
    if start < m && m < end {
        rotate(data, start, m, end);
    }
    if a < start && start < mid {
        sym_merge(data, a, start, mid, less);
    }
    if mid < end && end < b {
        sym_merge(data, mid, end, b, less);
    }
}

fn rotate<T>(data: &mut [T], a: usize, m: usize, b: usize) {
    let mut i = m.saturating_sub(a);
    let mut j = b.saturating_sub(m);
    while i != j && i > 0 && j > 0 {
        if i > j {
            swap_range(data, m - i, m, j);
            i -= j;
        } else {
            swap_range(data, m - i, m + j - i, i);
            j -= i;
        }
    }
    swap_range(data, m.saturating_sub(i), m, i);
}

fn swap_range<T>(data: &mut [T], a: usize, b: usize, n: usize) {
    for k in 0..n {
        swap_at(data, a + k, b + k);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use serde_json::json;

    use super::*;
    use crate::Registry;

    fn registry() -> &'static Registry {
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        REGISTRY.get_or_init(Registry::builtin)
    }

    fn smp(definition: &str, original: Value, patch: Value) -> Result<Value, PatchError> {
        let schemas = registry().schemas();
        let node = schemas
            .definition(definition)
            .expect("definition is served");
        strategic_merge_patch(schemas, node, &original, &patch)
    }

    fn pod(original: Value, patch: Value) -> Result<Value, PatchError> {
        smp("io.k8s.api.core.v1.Pod", original, patch)
    }

    fn deployment(original: Value, patch: Value) -> Result<Value, PatchError> {
        smp("io.k8s.api.apps.v1.Deployment", original, patch)
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_array()
            .map(|items| items.iter().filter_map(|i| i["name"].as_str()).collect())
            .unwrap_or_default()
    }

    fn bad_request(r: Result<Value, PatchError>) -> String {
        match r {
            Err(PatchError::BadRequest(m)) => m,
            other => panic!("expected BadRequest, got {other:?}"),
        }
    }

    fn invalid(r: Result<Value, PatchError>) -> String {
        match r {
            Err(PatchError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// Nested `{"x": ...}` objects, `levels` deep.
    fn nested(levels: usize) -> Value {
        let mut v = json!({});
        for _ in 1..levels {
            v = json!({ "x": v });
        }
        v
    }

    // ------------------------------------------------------------------ JSON patch

    #[test]
    fn json_patch_adds_replaces_and_removes() {
        let doc = json!({"metadata": {"name": "p", "labels": {"a": "1", "b": "2"}}});
        let out = json_patch(
            &doc,
            &json!([
                {"op": "test", "path": "/metadata/name", "value": "p"},
                {"op": "add", "path": "/metadata/labels/c", "value": "3"},
                {"op": "replace", "path": "/metadata/labels/a", "value": "9"},
                {"op": "remove", "path": "/metadata/labels/b"},
                {"op": "add", "path": "/metadata/annotations", "value": {"example.com/x": "y"}},
                {"op": "replace", "path": "/metadata/annotations/example.com~1x", "value": "z"}
            ]),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"name": "p", "labels": {"a": "9", "c": "3"},
                   "annotations": {"example.com/x": "z"}}})
        );
    }

    #[test]
    fn json_patch_arrays_follow_evanphx() {
        let doc = json!({"l": [1, 2, 3]});
        let apply = |p: Value| json_patch(&doc, &p);
        assert_eq!(
            apply(json!([{"op": "add", "path": "/l/-", "value": 4}])).unwrap(),
            json!({"l": [1, 2, 3, 4]})
        );
        assert_eq!(
            apply(json!([{"op": "add", "path": "/l/0", "value": 0}])).unwrap(),
            json!({"l": [0, 1, 2, 3]})
        );
        // Negative indices count from the end (SupportNegativeIndices).
        assert_eq!(
            apply(json!([{"op": "remove", "path": "/l/-1"}])).unwrap(),
            json!({"l": [1, 2]})
        );
        assert_eq!(
            apply(json!([{"op": "replace", "path": "/l/1", "value": 7}])).unwrap(),
            json!({"l": [1, 7, 3]})
        );
        assert_eq!(
            invalid(apply(json!([{"op": "remove", "path": "/l/5"}]))),
            "error in remove for path: '/l/5': Unable to access invalid index: 5: invalid index referenced"
        );
        assert_eq!(
            invalid(apply(
                json!([{"op": "replace", "path": "/l/3", "value": 1}])
            )),
            "replace operation does not apply: doc is missing key: /l/3: missing value"
        );
        assert_eq!(
            invalid(apply(json!([{"op": "add", "path": "/l/x", "value": 1}]))),
            "error in add for path: '/l/x': value was not a proper array index: 'x': strconv.Atoi: parsing \"x\": invalid syntax"
        );
    }

    #[test]
    fn json_patch_move_and_copy() {
        let doc = json!({"a": {"b": 1}, "l": ["x", "y"]});
        let out = json_patch(
            &doc,
            &json!([
                {"op": "copy", "from": "/a", "path": "/c"},
                {"op": "move", "from": "/a/b", "path": "/d"},
                {"op": "move", "from": "/l/0", "path": "/l/-"}
            ]),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"a": {}, "c": {"b": 1}, "d": 1, "l": ["y", "x"]})
        );
        assert_eq!(
            invalid(json_patch(
                &doc,
                &json!([{"op": "move", "from": "/a/zz", "path": "/q"}])
            )),
            "error in move for path: 'zz': Unable to remove nonexistent key: zz: missing value"
        );
        assert_eq!(
            invalid(json_patch(
                &doc,
                &json!([{"op": "copy", "from": "/n/o", "path": "/q"}])
            )),
            "copy operation does not apply: doc is missing from path: /n/o: missing value"
        );
    }

    #[test]
    fn json_patch_failures_are_invalid_with_upstream_messages() {
        let doc = json!({"metadata": {"name": "p", "labels": {"a": "1"}}});
        assert_eq!(
            invalid(json_patch(
                &doc,
                &json!([{"op": "test", "path": "/metadata/name", "value": "q"}])
            )),
            "testing value /metadata/name failed: test failed"
        );
        assert_eq!(
            invalid(json_patch(
                &doc,
                &json!([{"op": "remove", "path": "/metadata/labels/zz"}])
            )),
            "error in remove for path: '/metadata/labels/zz': Unable to remove nonexistent key: zz: missing value"
        );
        assert_eq!(
            invalid(json_patch(
                &doc,
                &json!([{"op": "remove", "path": "/spec/x"}])
            )),
            "remove operation does not apply: doc is missing path: \"/spec/x\": missing value"
        );
        assert_eq!(
            invalid(json_patch(
                &doc,
                &json!([{"op": "replace", "path": "/spec/x", "value": 1}])
            )),
            "replace operation does not apply: doc is missing path: /spec/x: missing value"
        );
        assert_eq!(
            invalid(json_patch(
                &doc,
                &json!([{"op": "add", "path": "/a/b", "value": 1}])
            )),
            "add operation does not apply: doc is missing path: \"/a/b\": missing value"
        );
        // The whole document cannot be added to.
        assert_eq!(
            invalid(json_patch(
                &doc,
                &json!([{"op": "add", "path": "", "value": {}}])
            )),
            "add operation does not apply: doc is missing path: \"\": missing value"
        );
        // A later failure discards earlier operations.
        assert!(
            json_patch(
                &doc,
                &json!([
                    {"op": "add", "path": "/metadata/labels/b", "value": "2"},
                    {"op": "test", "path": "/metadata/labels/b", "value": "3"}
                ])
            )
            .is_err()
        );
    }

    #[test]
    fn json_patch_keeps_evanphx_quirks() {
        let doc = json!({"metadata": {"labels": {"a": "1"}}});
        // v4 finds no error for an absent member, so replace adds it.
        assert_eq!(
            json_patch(
                &doc,
                &json!([{"op": "replace", "path": "/metadata/labels/b", "value": "2"}])
            )
            .unwrap(),
            json!({"metadata": {"labels": {"a": "1", "b": "2"}}})
        );
        // Testing an absent member against null passes.
        assert_eq!(
            json_patch(
                &doc,
                &json!([{"op": "test", "path": "/metadata/labels/zz", "value": null}])
            )
            .unwrap(),
            doc
        );
        // The whole document may be replaced by an object, and tested.
        assert_eq!(
            json_patch(
                &doc,
                &json!([{"op": "replace", "path": "", "value": {"x": 1}}])
            )
            .unwrap(),
            json!({"x": 1})
        );
        assert!(
            json_patch(
                &doc,
                &json!([{"op": "test", "path": "", "value": doc.clone()}])
            )
            .is_ok()
        );
        // add without a value adds null.
        assert_eq!(
            json_patch(&doc, &json!([{"op": "add", "path": "/spec"}])).unwrap(),
            json!({"metadata": {"labels": {"a": "1"}}, "spec": null})
        );
    }

    #[test]
    fn json_patch_malformed_is_bad_request_bad_operations_are_invalid() {
        let doc = json!({"a": 1});
        assert_eq!(
            bad_request(json_patch(&doc, &json!({"op": "add"}))),
            "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
        );
        assert_eq!(
            bad_request(json_patch(&doc, &json!(["add"]))),
            "json: cannot unmarshal string into Go value of type jsonpatch.Operation"
        );
        assert_eq!(
            invalid(json_patch(&doc, &json!([{"path": "/a", "value": 2}]))),
            "Unexpected kind: unknown"
        );
        assert_eq!(
            invalid(json_patch(&doc, &json!([{"op": "frob", "path": "/a"}]))),
            "Unexpected kind: frob"
        );
        assert!(invalid(json_patch(&doc, &json!([{"op": "remove"}]))).contains("path"));
        assert!(invalid(json_patch(&doc, &json!([{"op": "move", "path": "/b"}]))).contains("from"));
        // Upstream decodes null into an empty patch.
        assert_eq!(json_patch(&doc, &Value::Null).unwrap(), doc);
    }

    #[test]
    fn json_patch_limits_copies_and_depth() {
        let big = "x".repeat(2 * 1024 * 1024);
        let doc = json!({"a": big});
        let once = json!([{"op": "copy", "from": "/a", "path": "/b"}]);
        assert!(json_patch(&doc, &once).is_ok());
        let twice = json!([
            {"op": "copy", "from": "/a", "path": "/b"},
            {"op": "copy", "from": "/a", "path": "/c"}
        ]);
        assert!(
            invalid(json_patch(&doc, &twice)).starts_with(
                "Unable to complete the copy, the accumulated size increase of copy is"
            )
        );

        let deep_patch = json!([{"op": "add", "path": "/a", "value": nested(MAX_DEPTH + 1)}]);
        assert!(bad_request(json_patch(&doc, &deep_patch)).contains("nests deeper"));

        // Moving one deep branch under another would nest past the limit.
        let doc = json!({"a": nested(100), "b": nested(100)});
        let path = format!("/a{}/y", "/x".repeat(99));
        let r = json_patch(&doc, &json!([{"op": "move", "from": "/b", "path": path}]));
        assert!(invalid(r).contains("deeper than"));
    }

    // ------------------------------------------------------------------ merge patch

    #[test]
    fn merge_patch_merges_objects_and_replaces_lists() {
        let doc = json!({"metadata": {"labels": {"a": "1", "b": "2"}},
                         "spec": {"replicas": 1, "list": [1, 2]}});
        let out = merge_patch(
            &doc,
            &json!({"metadata": {"labels": {"b": null, "c": "3"}},
                    "spec": {"replicas": 3, "list": [{"k": 1, "drop": null}]}}),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"labels": {"a": "1", "c": "3"}},
                   "spec": {"replicas": 3, "list": [{"k": 1}]}})
        );
    }

    #[test]
    fn merge_patch_rejects_non_objects() {
        let doc = json!({"a": 1});
        assert_eq!(
            bad_request(merge_patch(&doc, &Value::Null)),
            "Invalid JSON Patch"
        );
        assert_eq!(
            bad_request(merge_patch(&doc, &json!([1]))),
            "error decoding patch: json: cannot unmarshal array into Go value of type map[string]interface {}"
        );
        assert!(
            bad_request(merge_patch(&doc, &json!({"a": nested(MAX_DEPTH)}))).contains("deeper")
        );
    }

    // ------------------------------------------------------------------ strategic

    fn two_container_pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "labels": {"app": "web", "tier": "front"},
                         "finalizers": ["a", "b", "c"]},
            "spec": {
                "containers": [
                    {"name": "app", "image": "app:1",
                     "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                     "ports": [{"containerPort": 80, "name": "http"}]},
                    {"name": "sidecar", "image": "sidecar:1", "args": ["--a", "--b"]}
                ],
                "nodeSelector": {"disk": "ssd"},
                "tolerations": [{"key": "k", "operator": "Exists"}]
            }
        })
    }

    #[test]
    fn smp_adds_env_var_by_name() {
        // kubectl edit/apply send the order alongside the change.
        let out = pod(
            two_container_pod(),
            json!({"spec": {"containers": [{
                "name": "app",
                "$setElementOrder/env": [{"name": "A"}, {"name": "B"}, {"name": "C"}],
                "env": [{"name": "C", "value": "3"}]
            }]}}),
        )
        .unwrap();
        let app = &out["spec"]["containers"][0];
        assert_eq!(names(&app["env"]), ["A", "B", "C"]);
        assert_eq!(app["env"][2], json!({"name": "C", "value": "3"}));
        assert_eq!(app["image"], "app:1");
    }

    #[test]
    fn smp_new_items_precede_unordered_server_items() {
        // Without $setElementOrder, upstream's mergeSortedSlice cannot place a new item
        // relative to the server's, and emits it first.
        let out = pod(
            two_container_pod(),
            json!({"spec": {"containers": [{"name": "app", "env": [{"name": "C", "value": "3"}]}]}}),
        )
        .unwrap();
        assert_eq!(names(&out["spec"]["containers"][0]["env"]), ["C", "A", "B"]);
    }

    #[test]
    fn smp_set_image_changes_one_of_two_containers() {
        // What `kubectl set image pod/web sidecar=sidecar:2` sends.
        let out = pod(
            two_container_pod(),
            json!({"spec": {
                "$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}],
                "containers": [{"name": "sidecar", "image": "sidecar:2"}]
            }}),
        )
        .unwrap();
        let containers = &out["spec"]["containers"];
        assert_eq!(names(containers), ["app", "sidecar"]);
        assert_eq!(containers[0]["image"], "app:1");
        assert_eq!(containers[1]["image"], "sidecar:2");
        assert_eq!(containers[1]["args"], json!(["--a", "--b"]));
        assert_eq!(
            containers[0]["env"],
            two_container_pod()["spec"]["containers"][0]["env"]
        );

        // And without the order: the merged item keeps its place.
        let out = pod(
            two_container_pod(),
            json!({"spec": {"containers": [{"name": "sidecar", "image": "sidecar:2"}]}}),
        )
        .unwrap();
        assert_eq!(names(&out["spec"]["containers"]), ["app", "sidecar"]);
    }

    #[test]
    fn smp_null_removes_a_label() {
        let out = pod(
            two_container_pod(),
            json!({"metadata": {"labels": {"tier": null, "new": "x"}}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"app": "web", "new": "x"}));
    }

    #[test]
    fn smp_set_element_order_reorders() {
        let out = pod(
            two_container_pod(),
            json!({"spec": {"$setElementOrder/containers": [{"name": "sidecar"}, {"name": "app"}]}}),
        )
        .unwrap();
        assert_eq!(names(&out["spec"]["containers"]), ["sidecar", "app"]);

        let out = pod(
            two_container_pod(),
            json!({"metadata": {"$setElementOrder/finalizers": ["c", "a", "b"]}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["c", "a", "b"]));
    }

    #[test]
    fn smp_retain_keys_switches_rolling_update_to_recreate() {
        let original = json!({
            "spec": {"replicas": 2,
                     "strategy": {"type": "RollingUpdate",
                                  "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}}
        });
        let out = deployment(
            original.clone(),
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate",
                                         "rollingUpdate": null}}}),
        )
        .unwrap();
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        assert_eq!(out["spec"]["replicas"], 2);

        // The directive alone clears the unlisted field, as kubectl edit may send it.
        let out = deployment(
            original,
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
        )
        .unwrap();
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
    }

    #[test]
    fn smp_delete_directive_removes_list_item_and_map() {
        let out = pod(
            two_container_pod(),
            json!({"spec": {"containers": [{"name": "sidecar", "$patch": "delete"}]}}),
        )
        .unwrap();
        assert_eq!(names(&out["spec"]["containers"]), ["app"]);

        let out = pod(
            two_container_pod(),
            json!({"spec": {"containers": [{"name": "app",
                "env": [{"name": "A", "$patch": "delete"}]}]}}),
        )
        .unwrap();
        assert_eq!(names(&out["spec"]["containers"][0]["env"]), ["B"]);

        // On a map, delete leaves it empty.
        let out = pod(
            two_container_pod(),
            json!({"metadata": {"labels": {"$patch": "delete"}}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["labels"], json!({}));
    }

    #[test]
    fn smp_replace_directive_on_map_and_list() {
        let out = pod(
            two_container_pod(),
            json!({"metadata": {"labels": {"$patch": "replace", "only": "this"}}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"only": "this"}));

        let out = pod(
            two_container_pod(),
            json!({"spec": {"containers": [{"name": "solo", "image": "solo:1"},
                                           {"$patch": "replace"}]}}),
        )
        .unwrap();
        assert_eq!(
            out["spec"]["containers"],
            json!([{"name": "solo", "image": "solo:1"}])
        );
    }

    #[test]
    fn smp_finalizers_merge_as_a_set() {
        let out = pod(
            two_container_pod(),
            json!({"metadata": {"finalizers": ["b", "d"]}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b", "d", "c"]));

        let out = pod(
            two_container_pod(),
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["b", "zz"]}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "c"]));

        // What kubectl apply sends to drop one finalizer and add another.
        let out = pod(
            two_container_pod(),
            json!({"metadata": {
                "$setElementOrder/finalizers": ["a", "c", "d"],
                "$deleteFromPrimitiveList/finalizers": ["b"],
                "finalizers": ["d"]
            }}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "c", "d"]));
    }

    #[test]
    fn smp_atomic_lists_are_replaced_and_maps_merged() {
        let out = pod(
            two_container_pod(),
            json!({"spec": {
                "tolerations": [{"key": "other", "operator": "Exists"}],
                "nodeSelector": {"zone": "a"},
                "containers": [{"name": "sidecar", "args": ["--c"]}]
            }}),
        )
        .unwrap();
        assert_eq!(
            out["spec"]["tolerations"],
            json!([{"key": "other", "operator": "Exists"}])
        );
        // SMP ignores mapType=atomic: nodeSelector merges key by key, as upstream.
        assert_eq!(
            out["spec"]["nodeSelector"],
            json!({"disk": "ssd", "zone": "a"})
        );
        assert_eq!(out["spec"]["containers"][1]["args"], json!(["--c"]));
    }

    #[test]
    fn smp_merges_ports_by_number_and_owner_references_by_uid() {
        let out = pod(
            two_container_pod(),
            json!({"spec": {"containers": [{"name": "app",
                "ports": [{"containerPort": 80, "protocol": "TCP"}]}]}}),
        )
        .unwrap();
        assert_eq!(
            out["spec"]["containers"][0]["ports"],
            json!([{"containerPort": 80, "name": "http", "protocol": "TCP"}])
        );

        let original = json!({"metadata": {"ownerReferences": [
            {"uid": "1", "kind": "ReplicaSet", "name": "rs"}]}});
        let out = pod(
            original,
            json!({"metadata": {"ownerReferences": [{"uid": "1", "controller": true}]}}),
        )
        .unwrap();
        assert_eq!(
            out["metadata"]["ownerReferences"],
            json!([{"uid": "1", "kind": "ReplicaSet", "name": "rs", "controller": true}])
        );
    }

    #[test]
    fn smp_new_values_lose_directives_and_nulls() {
        let out = pod(
            json!({"spec": {}}),
            json!({"spec": {"affinity": {
                "nodeAffinity": null,
                "podAffinity": {"$patch": "delete"},
                "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}
            }}}),
        )
        .unwrap();
        assert_eq!(
            out["spec"]["affinity"],
            json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}})
        );
    }

    #[test]
    fn smp_unknown_fields_merge_maps_and_replace_lists() {
        let out = pod(
            json!({"extra": {"a": 1, "list": [1, 2], "keep": true}}),
            json!({"extra": {"b": 2, "list": [3], "keep": null}}),
        )
        .unwrap();
        assert_eq!(out["extra"], json!({"a": 1, "b": 2, "list": [3]}));
    }

    #[test]
    fn smp_kubectl_apply_patch() {
        let live = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "old",
                "deployment.kubernetes.io/revision": "3"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "strategy": {"type": "RollingUpdate",
                             "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [{"name": "web", "image": "nginx:1.25",
                            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                            "terminationMessagePath": "/dev/termination-log"}],
                        "volumes": [{"name": "data", "emptyDir": {}}]
                    }
                }
            }
        });
        let patch = json!({
            "metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": "new"}},
            "spec": {
                "strategy": {"$retainKeys": ["type"], "rollingUpdate": null, "type": "Recreate"},
                "template": {"spec": {
                    "$setElementOrder/containers": [{"name": "web"}],
                    "$setElementOrder/volumes": [{"name": "data"}],
                    "containers": [{
                        "$setElementOrder/env": [{"name": "A"}, {"name": "C"}],
                        "env": [{"name": "C", "value": "3"}, {"$patch": "delete", "name": "B"}],
                        "image": "nginx:1.26",
                        "name": "web"
                    }],
                    "volumes": [{"$retainKeys": ["configMap", "name"],
                                 "configMap": {"name": "cfg"}, "emptyDir": null, "name": "data"}]
                }}
            }
        });
        let out = deployment(live, patch).unwrap();
        assert_eq!(
            out["metadata"]["annotations"],
            json!({"kubectl.kubernetes.io/last-applied-configuration": "new",
                   "deployment.kubernetes.io/revision": "3"})
        );
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        let spec = &out["spec"]["template"]["spec"];
        assert_eq!(
            spec["containers"],
            json!([{"name": "web", "image": "nginx:1.26",
                    "env": [{"name": "A", "value": "1"}, {"name": "C", "value": "3"}],
                    "terminationMessagePath": "/dev/termination-log"}])
        );
        assert_eq!(
            spec["volumes"],
            json!([{"name": "data", "configMap": {"name": "cfg"}}])
        );
        assert_eq!(out["spec"]["replicas"], 2);
    }

    #[test]
    fn smp_rollout_restart_and_scale() {
        let out = deployment(
            json!({"spec": {"replicas": 1, "template": {"metadata": {"labels": {"app": "w"}}}}}),
            json!({"spec": {"replicas": 5, "template": {"metadata": {"annotations": {
                "kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z"}}}}}),
        )
        .unwrap();
        assert_eq!(out["spec"]["replicas"], 5);
        assert_eq!(
            out["spec"]["template"]["metadata"],
            json!({"labels": {"app": "w"},
                   "annotations": {"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z"}})
        );
    }

    /// Cases from upstream's patch_test.go (`strategicMergePatchRawTestCases`, applying the
    /// three-way patch to the current object), on a list merged by `name`.
    #[test]
    fn smp_matches_upstream_ordering_fixtures() {
        let cases = [
            // add map and delete map from merging list
            (
                json!([{"name": "1"}, {"name": "2", "other": "b"}, {"name": "4", "other": "c"}]),
                json!({"$setElementOrder/containers": [{"name": "2"}, {"name": "3"}],
                       "containers": [{"name": "3"}, {"name": "1", "$patch": "delete"}]}),
                vec!["2", "4", "3"],
            ),
            // add map and delete map from merging list with conflict
            (
                json!([{"name": "1", "other": "a"}, {"name": "4", "other": "c"}]),
                json!({"$setElementOrder/containers": [{"name": "2"}, {"name": "3"}],
                       "containers": [{"name": "2"}, {"name": "3"},
                                      {"name": "1", "$patch": "delete"}]}),
                vec!["4", "2", "3"],
            ),
            // merge lists of maps
            (
                json!([{"name": "1", "other": "a"}, {"name": "2", "value": "2"}]),
                json!({"$setElementOrder/containers": [{"name": "4"}, {"name": "1"},
                                                       {"name": "2"}, {"name": "3"}],
                       "containers": [{"name": "4", "value": "4"}, {"name": "3", "value": "3"}]}),
                vec!["4", "1", "2", "3"],
            ),
            // add field to map in merging list with conflict
            (
                json!([{"name": "1", "other": "a"}, {"name": "3", "other": "b"}]),
                json!({"$setElementOrder/containers": [{"name": "1"}, {"name": "2"}],
                       "containers": [{"name": "1", "value": "1"}, {"name": "2", "value": "2"}]}),
                vec!["1", "2", "3"],
            ),
            // add map to merging list by pointer
            (
                json!([{"name": "1", "other": "a"}, {"name": "3"}]),
                json!({"$setElementOrder/containers": [{"name": "1"}, {"name": "2"}],
                       "containers": [{"name": "2"}]}),
                vec!["1", "2", "3"],
            ),
            // delete missing map from merging list with conflict
            (
                json!([{"name": "3", "other": "a"}]),
                json!({"$setElementOrder/containers": [{"name": "2"}],
                       "containers": [{"name": "2"}, {"name": "1", "$patch": "delete"}]}),
                vec!["2", "3"],
            ),
            // nested patch merge with empty list
            (
                json!([{"name": "hello2"}]),
                json!({"$setElementOrder/containers": [{"name": "hello"}, {"name": "doesntexist"}],
                       "containers": [{"name": "hello"}]}),
                vec!["hello", "hello2"],
            ),
            // the design proposal's example without $setElementOrder
            (
                json!([{"name": "B"}, {"name": "C"}, {"name": "A"}]),
                json!({"containers": [{"name": "A", "image": "a"}, {"name": "B", "image": "b"},
                                      {"name": "D"}]}),
                vec!["C", "A", "B", "D"],
            ),
        ];
        for (live, patch, want) in cases {
            let out = pod(
                json!({"spec": {"containers": live}}),
                json!({"spec": patch}),
            )
            .unwrap();
            assert_eq!(names(&out["spec"]["containers"]), want, "patch {patch}");
        }

        // delete items in lists of scalars
        let out = pod(
            json!({"metadata": {"finalizers": ["1", "2", "3", "4"]}}),
            json!({"metadata": {"$setElementOrder/finalizers": ["1", "2"],
                                "$deleteFromPrimitiveList/finalizers": ["3"]}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["1", "2", "4"]));
    }

    #[test]
    fn smp_malformed_patches_are_bad_requests() {
        let p = two_container_pod;
        assert_eq!(
            bad_request(pod(
                p(),
                json!({"metadata": {"labels": {"$patch": "bogus"}}})
            )),
            "unknown patch type: bogus in map: map[$patch:bogus]"
        );
        assert_eq!(
            bad_request(pod(
                p(),
                json!({"spec": {"containers": [{"name": "app", "$patch": "merge"}]}})
            )),
            "merging lists cannot yet be specified in the patch"
        );
        assert!(
            bad_request(pod(
                p(),
                json!({"spec": {"containers": [{"name": "x", "$patch": "frob"}]}})
            ))
            .starts_with("unknown patch type: frob")
        );
        assert_eq!(
            bad_request(pod(
                p(),
                json!({"spec": {"containers": [{"$patch": "delete"}]}})
            )),
            "map: map[$patch:delete] does not contain declared merge key: name"
        );
        assert_eq!(
            bad_request(pod(p(), json!({"spec": {"containers": [{"image": "x"}]}}))),
            "map: map[image:x] does not contain declared merge key: name"
        );
        assert_eq!(
            bad_request(deployment(
                json!({"spec": {"strategy": {"type": "Recreate"}}}),
                json!({"spec": {"strategy": {"$retainKeys": "type"}}})
            )),
            "invalid patch format of retainKeys"
        );
        assert_eq!(
            bad_request(deployment(
                json!({"spec": {"strategy": {"type": "Recreate"}}}),
                json!({"spec": {"strategy": {"$retainKeys": ["type"], "rollingUpdate": {}}}})
            )),
            "invalid patch format of retainKeys"
        );
        assert_eq!(
            bad_request(pod(
                p(),
                json!({"metadata": {"$deleteFromPrimitiveList": ["a"]}})
            )),
            "invalid patch format of primitive list"
        );
        assert_eq!(
            bad_request(pod(
                p(),
                json!({"spec": {"$setElementOrderX/containers": []}})
            )),
            "invalid patch format of setElementOrder list"
        );
        assert_eq!(
            bad_request(pod(
                p(),
                json!({"spec": {"$setElementOrder/containers": "app"}})
            )),
            "expected a []interface {}, but received a string"
        );
        assert!(
            bad_request(pod(
                p(),
                json!({"spec": {
                    "$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}],
                    "containers": [{"name": "sidecar", "image": "s"}, {"name": "app", "image": "a"}]
                }})
            ))
            .starts_with("the order in patch list:")
        );
        assert!(
            bad_request(pod(p(), json!({"metadata": {"finalizers": ["x", 1]}})))
                .starts_with("list element types are not identical")
        );
        assert_eq!(
            bad_request(pod(p(), json!(["not", "an", "object"]))),
            "json: cannot unmarshal array into Go value of type map[string]interface {}"
        );
        assert!(bad_request(pod(p(), json!({"spec": nested(MAX_DEPTH)}))).contains("deeper"));
    }

    #[test]
    fn smp_lists_of_lists_are_invalid() {
        let r = pod(
            json!({"metadata": {"finalizers": []}}),
            json!({"metadata": {"finalizers": [["x"]]}}),
        );
        assert_eq!(invalid(r), "lists of lists are not supported");
    }

    #[test]
    fn smp_null_patch_changes_nothing() {
        assert_eq!(
            pod(two_container_pod(), Value::Null).unwrap(),
            two_container_pod()
        );
        let out = pod(two_container_pod(), json!({"$patch": "delete"})).unwrap();
        assert_eq!(out, json!({}));
    }

    #[test]
    fn smp_large_lists_stay_linear() {
        let live: Vec<Value> = (0..20_000)
            .map(|i| json!({"name": format!("e{i}")}))
            .collect();
        let patch: Vec<Value> = (0..20_000)
            .rev()
            .map(|i| json!({"name": format!("e{i}"), "value": "v"}))
            .collect();
        let out = pod(
            json!({"spec": {"containers": [{"name": "app", "env": live}]}}),
            json!({"spec": {"containers": [{"name": "app", "env": patch}]}}),
        )
        .unwrap();
        let env = &out["spec"]["containers"][0]["env"];
        assert_eq!(env.as_array().map(Vec::len), Some(20_000));
        // The patch's order wins for the items it lists.
        assert_eq!(env[0]["name"], "e19999");
    }

    #[test]
    fn go_formatting_matches_go() {
        assert_eq!(
            go_fmt(&json!({"b": [1, 2.5], "a": null})),
            "map[a:<nil> b:[1 2.5]]"
        );
        assert_eq!(go_fmt(&json!(1_000_000.0)), "1e+06");
        assert_eq!(go_fmt(&json!(123_456.0)), "123456");
        assert_eq!(go_fmt(&json!(0.000_01)), "1e-05");
    }

    #[test]
    fn go_stable_sort_survives_inconsistent_comparators() {
        // Upstream's comparator calls unordered items smaller than anything.
        let mut v: Vec<Option<usize>> = (0..97).map(|i| (i % 3 != 0).then_some(i % 7)).collect();
        go_stable_sort(&mut v, |a, b| match (a, b) {
            (Some(x), Some(y)) => x < y,
            _ => true,
        });
        assert_eq!(v.len(), 97);
        // Go's insertion sort moves an unordered item in front of its predecessor.
        let mut small = vec![Some(0), None];
        go_stable_sort(&mut small, |a, b| match (a, b) {
            (Some(x), Some(y)) => x < y,
            _ => true,
        });
        assert_eq!(small, [None, Some(0)]);
    }

    #[test]
    fn go_stable_sort_matches_go_on_consistent_orders() {
        let mut v: Vec<(usize, usize)> = (0..100).map(|i| ((i * 37) % 10, i)).collect();
        let mut expected = v.clone();
        expected.sort_by_key(|p| p.0);
        go_stable_sort(&mut v, |a, b| a.0 < b.0);
        assert_eq!(v, expected);
    }
}
