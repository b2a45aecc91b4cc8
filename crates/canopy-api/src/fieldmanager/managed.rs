//! `metadata.managedFields` in and out: entries, manager identities, ordering, and the cap on
//! the number of update entries (upstream's `managedfields.go`, `buildmanagerinfo.go`,
//! `capmanagers.go`).

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::DateTime;
use serde_json::{Map, Value, json};

use super::path::{go_json, go_quote, maps_in_key_order};
use super::set::{Set, fields_v1_remove, fields_v1_union, is_canonical_fields_v1};

/// Upstream keeps at most this many `Update` entries; older ones merge into buckets.
const MAX_UPDATE_MANAGERS: usize = 10;

/// The manager name of the buckets old update entries merge into.
const ANCIENT_CHANGES: &str = "ancient-changes";

/// `Apply` or `Update`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Operation {
    Apply,
    Update,
}

impl Operation {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// What identifies an entry: entries with the same identity are one entry. Appliers are one
/// entry whatever version they apply with, so their key has no version.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ManagerKey {
    pub(crate) manager: String,
    pub(crate) operation: Operation,
    pub(crate) api_version: String,
    pub(crate) subresource: String,
}

impl ManagerKey {
    pub(crate) fn new(
        manager: &str,
        operation: Operation,
        api_version: &str,
        subresource: Option<&str>,
    ) -> Self {
        Self {
            manager: if manager.is_empty() {
                "unknown".to_string()
            } else {
                manager.to_string()
            },
            operation,
            api_version: match operation {
                Operation::Apply => String::new(),
                Operation::Update => api_version.to_string(),
            },
            subresource: subresource.unwrap_or_default().to_string(),
        }
    }

    /// Upstream's identifier string (the entry's JSON without fields and time), by which it
    /// orders managers in conflict messages and among equally old update entries.
    pub(crate) fn identifier(&self) -> String {
        let mut out = String::from("{");
        let mut sep = "";
        for (name, value) in [
            ("manager", self.manager.as_str()),
            ("operation", self.operation.as_str()),
            ("apiVersion", self.api_version.as_str()),
            ("subresource", self.subresource.as_str()),
        ] {
            if !value.is_empty() {
                out.push_str(sep);
                out.push_str(&format!("\"{name}\":{}", go_json(&json!(value))));
                sep = ",";
            }
        }
        out.push('}');
        out
    }

    /// How upstream names the manager in conflicts: `"name"`, plus the subresource, plus the
    /// version for updaters.
    pub(crate) fn describe(
        manager: &str,
        operation: &str,
        api_version: &str,
        subresource: Option<&str>,
    ) -> String {
        let mut out = go_quote(manager);
        if let Some(sub) = subresource.filter(|s| !s.is_empty()) {
            out.push_str(&format!(" with subresource {}", go_quote(sub)));
        }
        if operation == Operation::Update.as_str() {
            out.push_str(&format!(" using {api_version}"));
        }
        out
    }
}

/// One entry's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VersionedSet {
    pub(crate) set: Set,
    pub(crate) api_version: String,
}

/// An entry's fields kept as read: FieldsV1 that is exactly what encoding the set it reads as
/// gives (see [`is_canonical_fields_v1`]), changed in place as the set would be.
#[derive(Clone, Debug)]
struct RawSet {
    fields_v1: Value,
    api_version: String,
}

impl RawSet {
    fn decode(self) -> VersionedSet {
        // Canonical FieldsV1 reads without error; the default is never taken.
        let set = Set::from_fields_v1(&self.fields_v1).unwrap_or_default();
        VersionedSet {
            set,
            api_version: self.api_version,
        }
    }

    fn is_empty(&self) -> bool {
        self.fields_v1.as_object().is_none_or(Map::is_empty)
    }

    /// Whether FieldsV1 can be kept as read. In maps that keep their keys in the order read,
    /// it would keep that order where encoding sorts.
    fn keeps(fields_v1: &Value) -> bool {
        maps_in_key_order()
            && fields_v1.as_object().is_some_and(|m| !m.is_empty())
            && is_canonical_fields_v1(fields_v1)
    }
}

/// An entry's fields, decoded or as read.
enum Fields {
    Decoded(Set),
    AsRead(Value),
}

/// Every entry of an object, with the time each was last changed.
#[derive(Clone, Debug, Default)]
pub(crate) struct Managed {
    pub(crate) fields: BTreeMap<ManagerKey, VersionedSet>,
    pub(crate) times: BTreeMap<ManagerKey, String>,
    /// Entries that [`Managed::decode_lazily`] kept as read, apart from `fields`. Decoding
    /// and encoding every entry would be most of the cost of a write, which changes few of
    /// them: these are changed in place, and decoded only where every set is needed.
    raw: BTreeMap<ManagerKey, RawSet>,
}

impl Managed {
    pub(crate) fn is_empty(&self) -> bool {
        self.fields.is_empty() && self.raw.is_empty()
    }

    /// Decodes the entries kept as read, for the operations that look at every set.
    fn decode_all(&mut self) {
        for (key, raw) in std::mem::take(&mut self.raw) {
            self.fields.insert(key, raw.decode());
        }
    }

    /// Adds fields to an entry, or creates it, which then records them with `api_version`.
    pub(crate) fn add(&mut self, key: ManagerKey, own: Set, api_version: &str) {
        if let Some(raw) = self.raw.get_mut(&key)
            && let Some(fields_v1) = raw.fields_v1.as_object_mut()
        {
            fields_v1_union(fields_v1, &own);
            raw.api_version = api_version.to_string();
            return;
        }
        let set = match self.fields.remove(&key) {
            Some(previous) => previous.set.union_owned(own),
            None => own,
        };
        let api_version = api_version.to_string();
        self.fields.insert(key, VersionedSet { set, api_version });
    }

    /// Removes the given paths from every entry but `except`, dropping entries left empty.
    pub(crate) fn remove_from_others(&mut self, except: Option<&ManagerKey>, paths: &[&Set]) {
        for (key, raw) in self.raw.iter_mut() {
            if Some(key) == except {
                continue;
            }
            if let Some(fields_v1) = raw.fields_v1.as_object_mut() {
                for p in paths {
                    fields_v1_remove(fields_v1, p);
                }
            }
        }
        for (key, vs) in self.fields.iter_mut() {
            if Some(key) == except {
                continue;
            }
            for p in paths {
                vs.set.remove(p);
            }
        }
        self.drop_empty();
    }

    pub(crate) fn drop_empty(&mut self) {
        self.fields.retain(|_, vs| !vs.set.is_empty());
        self.raw.retain(|_, raw| !raw.is_empty());
        let (fields, raw) = (&self.fields, &self.raw);
        self.times
            .retain(|k, _| fields.contains_key(k) || raw.contains_key(k));
    }

    /// Everything anyone manages.
    pub(crate) fn union_all(&self) -> Set {
        let raw = self.raw.values().map(|raw| raw.clone().decode().set);
        self.fields
            .values()
            .map(|vs| vs.set.clone())
            .chain(raw)
            .fold(Set::default(), Set::union_owned)
    }

    /// Merges the oldest update entries into per-version `ancient-changes` buckets until at
    /// most [`MAX_UPDATE_MANAGERS`] update entries remain.
    pub(crate) fn cap_updaters(&mut self) {
        let count = self
            .fields
            .keys()
            .chain(self.raw.keys())
            .filter(|k| k.operation == Operation::Update)
            .count();
        if count <= MAX_UPDATE_MANAGERS {
            return;
        }
        self.decode_all();
        let mut updaters: Vec<ManagerKey> = self
            .fields
            .keys()
            .filter(|k| k.operation == Operation::Update)
            .cloned()
            .collect();
        if updaters.len() <= MAX_UPDATE_MANAGERS {
            return;
        }
        let seconds = |k: &ManagerKey| self.times.get(k).map(|t| unix_seconds(t)).unwrap_or(0);
        updaters.sort_by(|a, b| {
            seconds(a)
                .cmp(&seconds(b))
                .then_with(|| a.identifier().cmp(&b.identifier()))
        });
        let mut first_of_version: BTreeMap<String, ManagerKey> = BTreeMap::new();
        let mut remaining = updaters.len();
        for key in updaters {
            if remaining <= MAX_UPDATE_MANAGERS {
                break;
            }
            let Some(vs) = self.fields.get(&key).cloned() else {
                continue;
            };
            let time = self.times.get(&key).cloned();
            let bucket = ManagerKey::new(ANCIENT_CHANGES, Operation::Update, &vs.api_version, None);
            let Some(first) = first_of_version.get(&vs.api_version).cloned() else {
                first_of_version.insert(vs.api_version.clone(), key);
                continue;
            };
            if !self.fields.contains_key(&bucket)
                && let Some(moved) = self.fields.remove(&first)
            {
                self.times.remove(&first);
                self.fields.insert(bucket.clone(), moved);
            }
            let merged = match self.fields.get(&bucket) {
                Some(existing) => existing.set.union(&vs.set),
                None => vs.set.clone(),
            };
            self.fields.insert(
                bucket.clone(),
                VersionedSet {
                    set: merged,
                    api_version: vs.api_version.clone(),
                },
            );
            self.fields.remove(&key);
            self.times.remove(&key);
            remaining -= 1;
            match time {
                Some(t) => self.times.insert(bucket, t),
                None => self.times.remove(&bucket),
            };
        }
    }

    /// Reads `metadata.managedFields` (upstream's `DecodeManagedFields`).
    pub(crate) fn decode(entries: Option<&Value>) -> Result<Managed, String> {
        Self::read(entries, false, Vec::new())
    }

    /// [`Managed::decode`], keeping the entries it can as read (see `Managed::raw`).
    pub(crate) fn decode_lazily(entries: Option<&Value>) -> Result<Managed, String> {
        Self::read(entries, true, Vec::new())
    }

    /// [`Managed::decode_lazily`] of entries the caller owns: the FieldsV1 kept as read are
    /// moved, not copied.
    pub(crate) fn decode_owned(mut entries: Option<Value>) -> Result<Managed, String> {
        let taken = match &mut entries {
            Some(Value::Array(list)) => list
                .iter_mut()
                .map(|e| e.as_object_mut().and_then(|e| e.remove("fieldsV1")))
                .collect(),
            _ => Vec::new(),
        };
        Self::read(entries.as_ref(), true, taken)
    }

    /// Reads entries; `taken` holds the `fieldsV1` of entries that were moved out of them.
    fn read(
        entries: Option<&Value>,
        lazy: bool,
        mut taken: Vec<Option<Value>>,
    ) -> Result<Managed, String> {
        let mut managed = Managed::default();
        let entries = match entries {
            None | Some(Value::Null) => return Ok(managed),
            Some(Value::Array(entries)) => entries,
            Some(_) => return Err("managedFields must be a list".to_string()),
        };
        for (i, entry) in entries.iter().enumerate() {
            let Value::Object(entry) = entry else {
                return Err(format!("managed fields entry {i} is not an object"));
            };
            let text = |name: &str| -> Result<String, String> {
                match entry.get(name) {
                    None | Some(Value::Null) => Ok(String::new()),
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(_) => Err(format!(
                        "{name} of managed fields entry {i} is not a string"
                    )),
                }
            };
            let operation = match text("operation")?.as_str() {
                "Apply" => Operation::Apply,
                "Update" => Operation::Update,
                _ => return Err("operation must be `Apply` or `Update`".to_string()),
            };
            let api_version = text("apiVersion")?;
            if api_version.is_empty() {
                return Err("apiVersion must not be empty".to_string());
            }
            match text("fieldsType")?.as_str() {
                "FieldsV1" => {}
                "" => return Err(format!("missing fieldsType in managed fields entry {i}")),
                other => {
                    return Err(format!(
                        "invalid fieldsType {other:?} in managed fields entry {i}"
                    ));
                }
            }
            let fields_v1 = match taken.get_mut(i).and_then(Option::take) {
                Some(owned) => Some(Cow::Owned(owned)),
                None => entry.get("fieldsV1").map(Cow::Borrowed),
            };
            let fields = match fields_v1 {
                None => Fields::Decoded(Set::default()),
                Some(fields) if fields.is_null() => Fields::Decoded(Set::default()),
                Some(fields) if lazy && RawSet::keeps(&fields) => {
                    Fields::AsRead(fields.into_owned())
                }
                Some(fields) => Fields::Decoded(
                    Set::from_fields_v1(&fields)
                        .map_err(|e| format!("error decoding set of entry {i}: {e}"))?,
                ),
            };
            let time = match text("time")?.as_str() {
                "" => None,
                t => Some(
                    normalize_time(t)
                        .ok_or_else(|| format!("invalid time {t:?} in managed fields entry {i}"))?,
                ),
            };
            let subresource = text("subresource")?;
            let manager = text("manager")?;
            let key = ManagerKey {
                manager,
                operation,
                api_version: match operation {
                    Operation::Apply => String::new(),
                    Operation::Update => api_version.clone(),
                },
                subresource,
            };
            match time {
                Some(t) => managed.times.insert(key.clone(), t),
                None => managed.times.remove(&key),
            };
            // A later entry with the same identity replaces an earlier one.
            match fields {
                Fields::Decoded(set) => {
                    managed.raw.remove(&key);
                    managed
                        .fields
                        .insert(key, VersionedSet { set, api_version });
                }
                Fields::AsRead(fields_v1) => {
                    managed.fields.remove(&key);
                    managed.raw.insert(
                        key,
                        RawSet {
                            fields_v1,
                            api_version,
                        },
                    );
                }
            }
        }
        Ok(managed)
    }

    /// Writes `metadata.managedFields` (upstream's `encodeManagedFields`): `None` when there
    /// is nothing to record.
    pub(crate) fn encode(self) -> Option<Value> {
        if self.is_empty() {
            return None;
        }
        let Managed {
            fields,
            mut times,
            raw,
        } = self;
        struct Entry {
            key: ManagerKey,
            api_version: String,
            fields: Fields,
            time: Option<String>,
            seconds: i64,
        }
        let decoded = fields
            .into_iter()
            .map(|(key, vs)| (key, vs.api_version, Fields::Decoded(vs.set)));
        let as_read = raw
            .into_iter()
            .map(|(key, raw)| (key, raw.api_version, Fields::AsRead(raw.fields_v1)));
        let mut entries: Vec<Entry> = decoded
            .chain(as_read)
            .map(|(key, api_version, fields)| {
                let time = times.remove(&key);
                let seconds = time.as_deref().map(unix_seconds).unwrap_or(0);
                Entry {
                    key,
                    api_version,
                    fields,
                    time,
                    seconds,
                }
            })
            .collect();
        entries.sort_by(|a, b| {
            a.key
                .operation
                .as_str()
                .cmp(b.key.operation.as_str())
                .then_with(|| a.seconds.cmp(&b.seconds))
                .then_with(|| a.key.manager.cmp(&b.key.manager))
                .then_with(|| a.api_version.cmp(&b.api_version))
                .then_with(|| a.key.subresource.cmp(&b.key.subresource))
                // Entries are taken from two maps; their order by identity breaks ties.
                .then_with(|| a.key.cmp(&b.key))
        });
        let list = entries
            .into_iter()
            .map(|e| {
                let mut entry = Map::new();
                entry.insert("manager".into(), Value::String(e.key.manager));
                entry.insert("operation".into(), json!(e.key.operation.as_str()));
                entry.insert("apiVersion".into(), Value::String(e.api_version));
                if let Some(time) = e.time {
                    entry.insert("time".into(), Value::String(time));
                }
                entry.insert("fieldsType".into(), json!("FieldsV1"));
                let fields_v1 = match e.fields {
                    Fields::Decoded(set) => set.into_fields_v1(),
                    Fields::AsRead(fields_v1) => fields_v1,
                };
                entry.insert("fieldsV1".into(), fields_v1);
                if !e.key.subresource.is_empty() {
                    entry.insert("subresource".into(), Value::String(e.key.subresource));
                }
                Value::Object(entry)
            })
            .collect();
        Some(Value::Array(list))
    }
}

/// Whether a request's `managedFields` asks to reset them: an empty list, or a list of one
/// empty entry (upstream's `isResetManagedFields`).
pub(crate) fn is_reset(entries: Option<&Value>) -> bool {
    match entries {
        Some(Value::Array(list)) => match list.as_slice() {
            [] => true,
            [Value::Object(entry)] => entry.values().all(|v| match v {
                Value::Null => true,
                Value::String(s) => s.is_empty(),
                _ => false,
            }),
            _ => false,
        },
        _ => false,
    }
}

/// `metav1.Time` keeps seconds, in UTC.
fn normalize_time(t: &str) -> Option<String> {
    let time = DateTime::parse_from_rfc3339(t).ok()?;
    if is_normal_time(t) {
        // Valid, and what formatting it would give: as times written by this server are.
        return Some(t.to_string());
    }
    Some(time.to_utc().format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// Whether a time has the form `YYYY-MM-DDTHH:MM:SSZ`, which normalized times have.
fn is_normal_time(t: &str) -> bool {
    t.len() == 20
        && t.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            19 => b == b'Z',
            _ => b.is_ascii_digit(),
        })
}

fn unix_seconds(t: &str) -> i64 {
    DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_encodes_entries() {
        let v = json!([
            {"manager": "kubectl", "operation": "Apply", "apiVersion": "v1",
             "time": "2024-01-01T00:00:00.000Z", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:data": {"f:a": {}}}},
            {"manager": "ctl", "operation": "Update", "apiVersion": "v1",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:b": {}}}, "subresource": "status"}
        ]);
        let m = Managed::decode(Some(&v)).unwrap();
        assert_eq!(m.fields.len(), 2);
        let out = m.encode().unwrap();
        assert_eq!(out[0]["time"], "2024-01-01T00:00:00Z");
        assert_eq!(out[1]["subresource"], "status");
        assert!(out[1].get("time").is_none());
    }

    #[test]
    fn rejects_bad_entries() {
        for bad in [
            json!([{"operation": "Apply", "apiVersion": "v1", "fieldsType": ""}]),
            json!([{"operation": "Patch", "apiVersion": "v1", "fieldsType": "FieldsV1"}]),
            json!([{"operation": "Apply", "fieldsType": "FieldsV1"}]),
            json!([{"operation": "Apply", "apiVersion": "v1", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:a": 3}}]),
            json!([{"operation": 1}]),
            json!([1]),
            json!({}),
        ] {
            assert!(Managed::decode(Some(&bad)).is_err(), "{bad}");
        }
        assert!(is_reset(Some(&json!([{}]))));
        assert!(is_reset(Some(&json!([]))));
        assert!(!is_reset(Some(&json!([{}, {}]))));
        assert!(!is_reset(None));
    }

    #[test]
    fn times_in_normal_form_are_kept_as_formatting_would_write_them() {
        for t in [
            "2024-05-01T10:00:00Z",
            "2016-12-31T23:59:60Z",
            "2024-05-01T10:00:60Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "2024-02-29T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01t10:00:00z",
            "2024-05-01 10:00:00Z",
            "2024-05-01T10:00:00.5Z",
            "2024-05-01T10:00:00+00:00",
            "+002024-05-01T10:00:00Z",
        ] {
            let formatted = DateTime::parse_from_rfc3339(t)
                .ok()
                .map(|d| d.to_utc().format("%Y-%m-%dT%H:%M:%SZ").to_string());
            assert_eq!(normalize_time(t), formatted, "{t}");
        }
    }

    #[test]
    fn caps_update_entries() {
        let mut m = Managed::default();
        for i in 0..12 {
            let key = ManagerKey::new(&format!("m{i:02}"), Operation::Update, "v1", None);
            let mut set = Set::default();
            set.insert(&[super::super::path::PathElement::Field(format!("f{i}"))]);
            m.fields.insert(
                key.clone(),
                VersionedSet {
                    set,
                    api_version: "v1".into(),
                },
            );
            m.times.insert(key, format!("2024-01-01T00:00:{i:02}Z"));
        }
        m.cap_updaters();
        assert_eq!(m.fields.len(), 10);
        let bucket = ManagerKey::new(ANCIENT_CHANGES, Operation::Update, "v1", None);
        assert_eq!(m.fields[&bucket].set.members.len(), 3);
    }
}
