//! `metadata.managedFields` in and out: entries, manager identities, ordering, and the cap on
//! the number of update entries (upstream's `managedfields.go`, `buildmanagerinfo.go`,
//! `capmanagers.go`).

use std::collections::BTreeMap;

use chrono::DateTime;
use serde_json::{Map, Value, json};

use super::path::{go_json, go_quote};
use super::set::Set;

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

/// Every entry of an object, with the time each was last changed.
#[derive(Clone, Debug, Default)]
pub(crate) struct Managed {
    pub(crate) fields: BTreeMap<ManagerKey, VersionedSet>,
    pub(crate) times: BTreeMap<ManagerKey, String>,
}

impl Managed {
    pub(crate) fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Removes the given paths from every entry but `except`, dropping entries left empty.
    pub(crate) fn remove_from_others(&mut self, except: Option<&ManagerKey>, paths: &[&Set]) {
        for (key, vs) in self.fields.iter_mut() {
            if Some(key) == except {
                continue;
            }
            for p in paths {
                vs.set = vs.set.difference(p);
            }
        }
        self.drop_empty();
    }

    pub(crate) fn drop_empty(&mut self) {
        self.fields.retain(|_, vs| !vs.set.is_empty());
        let fields = &self.fields;
        self.times.retain(|k, _| fields.contains_key(k));
    }

    /// Everything anyone manages.
    pub(crate) fn union_all(&self) -> Set {
        self.fields
            .values()
            .fold(Set::default(), |acc, vs| acc.union(&vs.set))
    }

    /// Merges the oldest update entries into per-version `ancient-changes` buckets until at
    /// most [`MAX_UPDATE_MANAGERS`] update entries remain.
    pub(crate) fn cap_updaters(&mut self) {
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
            let set = match entry.get("fieldsV1") {
                None | Some(Value::Null) => Set::default(),
                Some(fields) => Set::from_fields_v1(fields)
                    .map_err(|e| format!("error decoding set of entry {i}: {e}"))?,
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
            managed
                .fields
                .insert(key, VersionedSet { set, api_version });
        }
        Ok(managed)
    }

    /// Writes `metadata.managedFields` (upstream's `encodeManagedFields`): `None` when there
    /// is nothing to record.
    pub(crate) fn encode(&self) -> Option<Value> {
        if self.fields.is_empty() {
            return None;
        }
        let mut entries: Vec<(&ManagerKey, &VersionedSet, Option<&String>)> = self
            .fields
            .iter()
            .map(|(k, vs)| (k, vs, self.times.get(k)))
            .collect();
        entries.sort_by(|a, b| {
            a.0.operation
                .as_str()
                .cmp(b.0.operation.as_str())
                .then_with(|| {
                    let secs = |t: Option<&String>| t.map(|t| unix_seconds(t)).unwrap_or(0);
                    secs(a.2).cmp(&secs(b.2))
                })
                .then_with(|| a.0.manager.cmp(&b.0.manager))
                .then_with(|| a.1.api_version.cmp(&b.1.api_version))
                .then_with(|| a.0.subresource.cmp(&b.0.subresource))
        });
        let list = entries
            .into_iter()
            .map(|(key, vs, time)| {
                let mut entry = Map::new();
                entry.insert("manager".into(), json!(key.manager));
                entry.insert("operation".into(), json!(key.operation.as_str()));
                entry.insert("apiVersion".into(), json!(vs.api_version));
                if let Some(time) = time {
                    entry.insert("time".into(), json!(time));
                }
                entry.insert("fieldsType".into(), json!("FieldsV1"));
                entry.insert("fieldsV1".into(), vs.set.to_fields_v1());
                if !key.subresource.is_empty() {
                    entry.insert("subresource".into(), json!(key.subresource));
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
    DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|d| d.to_utc().format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

fn unix_seconds(t: &str) -> i64 {
    DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp())
        .unwrap_or(0)
}
