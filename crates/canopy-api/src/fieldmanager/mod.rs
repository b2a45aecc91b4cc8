//! Field management and server-side apply: `metadata.managedFields` kept as upstream's
//! apiserver field manager keeps it, and apply merged as structured-merge-diff (v4) merges.
//!
//! Every write records, per manager, the fields it set ([`FieldManager::update`]); an apply
//! ([`FieldManager::apply`]) merges a partial configuration into the object by the schema,
//! fails on fields another manager set to a different value unless forced, and removes what
//! the applier stopped applying when nobody else manages it.

mod managed;
mod path;
mod set;
mod typed;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::LazyLock;

use serde_json::{Map, Value};

use crate::meta;
use crate::schema::{NodeId, Schemas};
use crate::status::{ApiError, Cause};

use managed::{Managed, ManagerKey, Operation, VersionedSet, is_reset};
use path::{PathElement, compare_values, go_json, path_string};
use set::Set;
use typed::{Comparison, TypeRef, Typed, TypedError};

/// How deep the walks go into objects and field sets. Deeper parts are handled as leaves
/// (objects) or rejected (field sets), so that client data cannot exhaust the stack.
pub(crate) const MAX_DEPTH: usize = 200;

/// The annotation of client-side `kubectl apply`.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The manager upstream gives to fields that existed before the first apply to an object
/// whose fields were not tracked.
const BEFORE_FIRST_APPLY: &str = "before-first-apply";

/// The manager of `kubectl apply --server-side`, which upstream lets take over fields of
/// client-side apply and keeps the client-side annotation up to date for.
const KUBECTL: &str = "kubectl";

/// Tracks managed fields and performs server-side apply for one kind.
pub struct FieldManager<'a> {
    schemas: &'a Schemas,
    node: NodeId,
}

/// Managed fields could not be computed for a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedFieldsError(pub String);

impl fmt::Display for ManagedFieldsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "failed to update managed fields: {}", self.0)
    }
}

impl std::error::Error for ManagedFieldsError {}

/// Why an apply failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyError {
    /// Fields of the configuration that other managers set to other values.
    Conflicts(Vec<Conflict>),
    /// The configuration cannot be applied (upstream answers 400 Bad Request or 500).
    Invalid(String),
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApplyError::Conflicts(conflicts) => f.write_str(&conflict_message(conflicts)),
            ApplyError::Invalid(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ApplyError {}

impl ApplyError {
    /// The error as an API error: 409 for conflicts, 400 otherwise.
    pub fn to_api_error(&self) -> ApiError {
        match self {
            ApplyError::Conflicts(conflicts) => conflict_error(conflicts),
            ApplyError::Invalid(message) => ApiError::bad_request(message.clone()),
        }
    }
}

/// A field of an apply configuration that another manager owns with another value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager.
    pub manager: String,
    /// Its operation: `Apply` or `Update`.
    pub operation: String,
    /// The version it wrote with.
    pub api_version: String,
    /// The subresource it wrote through, if any.
    pub subresource: Option<String>,
    /// The field, as upstream prints it: `.spec.containers[name="nginx"].image`.
    pub field: String,
}

impl Conflict {
    fn new(key: &ManagerKey, vs: &VersionedSet, path: &[PathElement]) -> Self {
        Self {
            manager: key.manager.clone(),
            operation: key.operation.as_str().to_string(),
            api_version: vs.api_version.clone(),
            subresource: (!key.subresource.is_empty()).then(|| key.subresource.clone()),
            field: path_string(path),
        }
    }

    fn key(&self) -> ManagerKey {
        let operation = if self.operation == Operation::Apply.as_str() {
            Operation::Apply
        } else {
            Operation::Update
        };
        ManagerKey::new(
            &self.manager,
            operation,
            &self.api_version,
            self.subresource.as_deref(),
        )
    }

    /// `"mgr"`, `"mgr" using apps/v1`, `"mgr" with subresource "scale" using apps/v1`.
    fn describe(&self) -> String {
        ManagerKey::describe(
            &self.manager,
            &self.operation,
            &self.api_version,
            self.subresource.as_deref(),
        )
    }
}

/// Upstream's apply conflict error: 409 `Conflict`, one `FieldManagerConflict` cause per
/// field.
pub fn conflict_error(conflicts: &[Conflict]) -> ApiError {
    let mut err = ApiError::new(409, "Conflict", conflict_message(conflicts));
    err.causes = conflicts
        .iter()
        .map(|c| {
            Cause::new(
                "FieldManagerConflict",
                c.field.clone(),
                format!("conflict with {}", c.describe()),
            )
        })
        .collect();
    err
}

fn conflict_message(conflicts: &[Conflict]) -> String {
    if let [only] = conflicts {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            only.describe(),
            only.field
        );
    }
    let mut groups: Vec<(String, &Conflict, Vec<&str>)> = Vec::new();
    for c in conflicts {
        let id = c.key().identifier();
        match groups.iter_mut().find(|(gid, _, _)| *gid == id) {
            Some((_, _, fields)) => fields.push(&c.field),
            None => groups.push((id, c, vec![&c.field])),
        }
    }
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    let mut lines = Vec::new();
    for (_, c, fields) in groups {
        lines.push(format!("conflicts with {}:", c.describe()));
        lines.extend(fields.into_iter().map(|f| format!("- {f}")));
    }
    format!(
        "Apply failed with {} conflicts: {}",
        conflicts.len(),
        lines.join("\n")
    )
}

/// The fields no manager ever owns (upstream's stripped metadata, plus the deletion fields
/// only the server writes).
fn strip_set() -> &'static Set {
    static STRIP: LazyLock<Set> = LazyLock::new(build_strip_set);
    &STRIP
}

fn build_strip_set() -> Set {
    let mut set = Set::default();
    let field = |name: &str| PathElement::Field(name.to_string());
    set.insert(&[field("apiVersion")]);
    set.insert(&[field("kind")]);
    set.insert(&[field("metadata")]);
    for name in [
        "name",
        "namespace",
        "creationTimestamp",
        "selfLink",
        "uid",
        "clusterName",
        "generation",
        "managedFields",
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        set.insert(&[field("metadata"), field(name)]);
    }
    set
}

/// A copy without `metadata.managedFields`, which must not track itself.
fn without_managed_fields(v: &Value) -> Value {
    let mut v = v.clone();
    meta::remove_meta(&mut v, "managedFields");
    v
}

fn managed_fields_of(v: &Value) -> Option<&Value> {
    meta::metadata(v).and_then(|m| m.get("managedFields"))
}

/// Stores entries into an object, removing the field when there are none.
fn write_managed(obj: &mut Value, managed: Managed) {
    match managed.encode() {
        Some(entries) if obj.is_object() => meta::set_meta(obj, "managedFields", entries),
        _ => {
            meta::remove_meta(obj, "managedFields");
        }
    }
}

impl<'a> FieldManager<'a> {
    /// A field manager for the kind whose schema is `node`.
    pub fn new(schemas: &'a Schemas, node: NodeId) -> Self {
        Self { schemas, node }
    }

    fn typed(&self) -> Typed<'a> {
        Typed::new(self.schemas)
    }

    fn root(&self) -> TypeRef {
        TypeRef::Node(self.node)
    }

    fn definition(&self) -> Option<&'a str> {
        self.schemas.node(self.node).definition.as_deref()
    }

    fn has_root_field(&self, name: &str) -> bool {
        self.schemas.field(self.node, name).is_some()
    }

    /// The fields a write through `subresource` does not own, because the strategy resets
    /// them (upstream's per-strategy `GetResetFields`).
    fn reset_fields(&self, subresource: Option<&str>) -> Set {
        let field = |name: &str| PathElement::Field(name.to_string());
        let mut set = Set::default();
        let mut reset = |path: &[&str]| {
            if self.has_root_field(path.first().copied().unwrap_or_default()) {
                let path: Vec<PathElement> = path.iter().map(|p| field(p)).collect();
                set.insert(&path);
            }
        };
        match subresource {
            None | Some("finalize") => reset(&["status"]),
            Some("status") => {
                reset(&["spec"]);
                match self.definition().unwrap_or_default() {
                    "io.k8s.api.apps.v1.Deployment"
                    | "io.k8s.api.apps.v1.ReplicaSet"
                    | "io.k8s.api.apps.v1.StatefulSet"
                    | "io.k8s.api.apps.v1.DaemonSet" => reset(&["metadata", "labels"]),
                    "io.k8s.api.core.v1.Pod" => {
                        reset(&["metadata", "deletionTimestamp"]);
                        reset(&["metadata", "ownerReferences"]);
                    }
                    _ => {}
                }
            }
            Some(_) => {}
        }
        set
    }

    /// An object as upstream's typed conversion sees it: with the fields Go types always
    /// carry, and without managed fields.
    fn as_typed(&self, v: &Value) -> Value {
        let mut v = without_managed_fields(v);
        if let Value::Object(map) = &mut v
            && self.has_root_field("metadata")
            && !map.contains_key("metadata")
        {
            map.insert("metadata".to_string(), Value::Object(Map::new()));
        }
        self.typed().fill_zero_fields(&mut v, self.root());
        v
    }

    /// Records managed fields after a non-apply write (create, update, patch) by `manager`:
    /// `old` is the stored object (`None` on create), `new` the object about to be stored.
    ///
    /// As upstream: the manager's `Update` entry gains the fields that changed and every
    /// other entry loses them; fields that disappeared leave every entry. If the request
    /// carries its own `managedFields` (a changed list, or `[{}]`/`[]` to reset them) those
    /// are honoured, except through a subresource. An object without managed fields stays
    /// untracked until it is created or applied to.
    ///
    /// An object upstream could not type (an item missing its list-map key, which validation
    /// rejects anyway) keeps `old`'s managed fields, as upstream's `UpdateNoErrors` does. The
    /// only error is a `new` that is not an object.
    pub fn update(
        &self,
        old: Option<&Value>,
        new: &mut Value,
        manager: &str,
        api_version: &str,
        subresource: Option<&str>,
        now: &str,
    ) -> Result<(), ManagedFieldsError> {
        if !new.is_object() {
            return Err(ManagedFieldsError("the object is not a JSON object".into()));
        }
        let live_fields = old.and_then(managed_fields_of);
        let live = || Managed::decode_lazily(live_fields).unwrap_or_default();
        let sent = meta::remove_meta(new, "managedFields");
        let managed = if subresource.is_some() {
            live()
        } else if is_reset(sent.as_ref()) {
            Managed::default()
        } else {
            match Managed::decode_owned(sent) {
                Ok(m) if !m.is_empty() => m,
                _ => live(),
            }
        };
        let creating = old.is_none_or(|o| meta::uid(o).is_empty());
        if managed.is_empty() && !creating {
            return Ok(());
        }
        // A created object is compared with the empty one, which its typed view fills in.
        let empty = Value::Object(Map::new());
        let key = ManagerKey::new(manager, Operation::Update, api_version, subresource);
        let ignored = self.reset_fields(subresource);
        let compared = self
            .typed()
            .compare_typed(old.unwrap_or(&empty), new, self.root());
        match compared {
            Ok(cmp) => {
                let managed = self.record_update(cmp, managed, key, api_version, &ignored, now);
                write_managed(new, managed);
            }
            Err(_) => {
                if let Some(fields) = live_fields {
                    meta::set_meta(new, "managedFields", fields.clone());
                }
            }
        }
        Ok(())
    }

    /// Upstream's update path: the structured-merge-diff `Update` under a temporary manager,
    /// given the comparison of the old and new typed objects, merged into the manager's
    /// entry (stamped `now`) only if it took any field.
    fn record_update(
        &self,
        cmp: Comparison,
        mut managed: Managed,
        key: ManagerKey,
        api_version: &str,
        ignored: &Set,
        now: &str,
    ) -> Managed {
        let Comparison {
            added,
            modified,
            removed,
        } = cmp.exclude(ignored);
        let changed = modified.union_owned(added);
        managed.remove_from_others(None, &[&changed, &removed]);
        let mut own = changed;
        own.remove(&removed);
        own.remove_recursive(ignored);
        own.remove(strip_set());
        if !own.is_empty() {
            managed.add(key.clone(), own, api_version);
            managed.times.insert(key, now.to_string());
        }
        managed.cap_updaters();
        managed
    }

    /// Server-side apply of `config` by `manager` onto `current` (`None` when the object
    /// does not exist yet): the merged object, with its managed fields, or the conflicts.
    ///
    /// The configuration's fields become exactly the manager's `Apply` entry. Fields it set
    /// before and no longer does are removed from the object unless another manager owns
    /// them. With `force`, conflicting fields are taken from their managers.
    #[allow(clippy::too_many_arguments)] // the REST layer's call, mirroring upstream's
    pub fn apply(
        &self,
        current: Option<&Value>,
        config: &Value,
        manager: &str,
        api_version: &str,
        subresource: Option<&str>,
        force: bool,
        now: &str,
    ) -> Result<Value, ApplyError> {
        self.check_config(config, api_version)?;
        let live = current.map_or_else(|| Value::Object(Map::new()), without_managed_fields);
        // Apply reads every entry's set (conflicts, pruning): all are decoded.
        let managed = Managed::decode(current.and_then(managed_fields_of))
            .map_err(|e| ApplyError::Invalid(format!("failed to decode managed fields: {e}")))?;
        let gvknn = || {
            format!(
                "{}/{}; {}",
                meta::namespace(config),
                meta::name(config),
                gvk(config)
            )
        };
        self.typed().validate(config, self.root()).map_err(|e| {
            ApplyError::Invalid(format!(
                "failed to create typed patch object ({}): {e}",
                gvknn()
            ))
        })?;
        let request = ApplyRequest {
            live: &live,
            live_typed: self.as_typed(&live),
            config,
            key: ManagerKey::new(manager, Operation::Apply, api_version, subresource),
            api_version,
            subresource,
            ignored: self.reset_fields(subresource),
            now,
        };
        let typed_error = |e: TypedError| {
            ApplyError::Invalid(format!(
                "failed to create typed live object ({}): {e}",
                gvknn()
            ))
        };
        let outcome = match self.apply_once(&request, managed.clone(), force) {
            Err(Failure::Conflicts(conflicts)) if manager == KUBECTL => {
                // kubectl moving from client-side apply: conflicts on fields its last
                // client-side apply set are not conflicts.
                match self.allowed_by_last_applied(&request) {
                    Some(allowed) => {
                        let remaining: Vec<_> = conflicts
                            .into_iter()
                            .filter(|(path, _)| !allowed.has(path))
                            .collect();
                        if remaining.is_empty() {
                            self.apply_once(&request, managed, true)
                        } else {
                            Err(Failure::Conflicts(remaining))
                        }
                    }
                    None => Err(Failure::Conflicts(conflicts)),
                }
            }
            other => other,
        };
        let (mut object, managed) = match outcome {
            Ok(done) => done,
            Err(Failure::Conflicts(conflicts)) => {
                return Err(ApplyError::Conflicts(
                    conflicts.into_iter().map(|(_, c)| c).collect(),
                ));
            }
            Err(Failure::Typed(e)) => return Err(typed_error(e)),
        };
        if manager == KUBECTL {
            keep_last_applied_in_sync(&mut object, config);
        }
        write_managed(&mut object, managed);
        Ok(object)
    }

    /// What upstream checks of a configuration before applying it.
    fn check_config(&self, config: &Value, api_version: &str) -> Result<(), ApplyError> {
        if !config.is_object() {
            return Err(ApplyError::Invalid(
                "the apply configuration must be an object".into(),
            ));
        }
        let kind = self
            .definition()
            .and_then(|d| d.rsplit('.').next())
            .unwrap_or_default();
        let config_kind = config
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let config_version = config
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if config_version != api_version
            || config_kind.is_empty()
            || (!kind.is_empty() && config_kind != kind)
        {
            return Err(ApplyError::Invalid(format!(
                "invalid object type: {}",
                gvk(config)
            )));
        }
        if managed_fields_of(config).is_some_and(|m| !m.is_null()) {
            return Err(ApplyError::Invalid(
                "metadata.managedFields must be nil".into(),
            ));
        }
        if meta::name(config).is_empty() {
            return Err(ApplyError::Invalid(
                "metadata.name: Required value: name is required in an apply configuration".into(),
            ));
        }
        Ok(())
    }

    /// One pass of upstream's apply (from its skip-non-applied manager inwards).
    fn apply_once(
        &self,
        req: &ApplyRequest<'_>,
        mut managed: Managed,
        force: bool,
    ) -> Result<(Value, Managed), Failure> {
        let typed = self.typed();
        let root = self.root();
        if managed.is_empty() {
            // Fields that exist before the first tracked apply belong to someone.
            let key = ManagerKey::new(
                BEFORE_FIRST_APPLY,
                Operation::Update,
                req.api_version,
                req.subresource,
            );
            let empty = Value::Object(Map::new());
            let cmp = typed.compare_typed(&empty, req.live, root)?;
            managed = self.record_update(cmp, managed, key, req.api_version, &req.ignored, req.now);
        }
        let mut applied = typed.field_set(req.config, root)?;
        applied.remove_recursive(&req.ignored);
        let last = managed
            .fields
            .insert(
                req.key.clone(),
                VersionedSet {
                    set: applied,
                    api_version: req.api_version.to_string(),
                },
            )
            .map(|previous| previous.set);
        let merged = typed
            .merge(Some(&req.live_typed), Some(req.config), root)?
            .unwrap_or_else(|| Value::Object(Map::new()));
        let removed = match &last {
            Some(last) => self.prune(&merged, &managed, last)?,
            None => Set::default(),
        };
        let new_typed = typed
            .remove_items(&merged, &removed, root)
            .unwrap_or_else(|| Value::Object(Map::new()));

        let Comparison {
            added,
            modified,
            removed: gone,
        } = typed
            .compare(&req.live_typed, &new_typed, root)?
            .exclude(&req.ignored);
        let changed = modified.union_owned(added);
        let mut conflicts = Vec::new();
        for (key, vs) in &managed.fields {
            if *key == req.key {
                continue;
            }
            for path in vs.set.intersection(&changed).paths() {
                let conflict = Conflict::new(key, vs, &path);
                conflicts.push((key.identifier(), path, conflict));
            }
        }
        if !force && !conflicts.is_empty() {
            conflicts.sort_by(|a, b| a.0.cmp(&b.0));
            return Err(Failure::Conflicts(
                conflicts.into_iter().map(|(_, p, c)| (p, c)).collect(),
            ));
        }
        managed.remove_from_others(Some(&req.key), &[&changed, &gone]);
        if let Some(vs) = managed.fields.get_mut(&req.key) {
            vs.set.remove(strip_set());
        }
        managed.drop_empty();

        if compare_values(&req.live_typed, &new_typed) == std::cmp::Ordering::Equal {
            // A no-op apply leaves the object, and the entry's time, as they were.
            return Ok((req.live.clone(), managed));
        }
        if managed.fields.contains_key(&req.key) {
            managed.times.insert(req.key.clone(), req.now.to_string());
        }
        // The object returned is merged from the stored one, without the fields added only
        // to compare as upstream does.
        let merged = typed
            .merge(Some(req.live), Some(req.config), root)?
            .unwrap_or_else(|| Value::Object(Map::new()));
        let object = typed
            .remove_items(&merged, &removed, root)
            .unwrap_or_else(|| Value::Object(Map::new()));
        Ok((object, managed))
    }

    /// The fields to remove because the applier dropped them and nobody else manages them
    /// (upstream's `prune`, with its add-back of owned and dangling items).
    fn prune(&self, merged: &Value, managed: &Managed, last: &Set) -> Result<Set, TypedError> {
        if last.is_empty() {
            return Ok(Set::default());
        }
        let typed = self.typed();
        let root = self.root();
        let named = |s: Set| typed.ensure_named_fields(s, root);
        let field_set =
            |v: &Value| -> Result<Set, TypedError> { Ok(named(typed.field_set(v, root)?)) };
        let empty = || Value::Object(Map::new());
        let last = named(last.clone());
        let merged_set = field_set(merged)?;
        let pruned = typed
            .remove_items(merged, &last, root)
            .unwrap_or_else(empty);
        let owned = named(managed.union_all());
        let unowned = merged_set.difference(&field_set(&pruned)?.union_owned(owned));
        let pruned = typed
            .remove_items(merged, &unowned, root)
            .unwrap_or_else(empty);
        let mut removed = merged_set;
        removed.remove(&field_set(&pruned)?);
        Ok(removed.intersection(&last))
    }

    /// The fields kubectl's client-side annotation shows it set and that still hold their
    /// values (upstream's `lastAppliedManager`).
    fn allowed_by_last_applied(&self, req: &ApplyRequest<'_>) -> Option<Set> {
        let text = meta::metadata(req.live)?
            .get("annotations")?
            .get(LAST_APPLIED)?
            .as_str()
            .filter(|s| !s.is_empty())?;
        let last_applied: Value = serde_json::from_str(text).ok()?;
        if last_applied.get("apiVersion").and_then(Value::as_str) != Some(req.api_version) {
            return None;
        }
        let typed = self.typed();
        let mut set = typed.field_set(&last_applied, self.root()).ok()?;
        let cmp = typed
            .compare(&last_applied, &req.live_typed, self.root())
            .ok()?;
        for changed in [&cmp.modified, &cmp.added, &cmp.removed] {
            set.remove(changed);
        }
        Some(set)
    }
}

/// What one apply works on.
struct ApplyRequest<'r> {
    live: &'r Value,
    live_typed: Value,
    config: &'r Value,
    key: ManagerKey,
    api_version: &'r str,
    subresource: Option<&'r str>,
    ignored: Set,
    now: &'r str,
}

/// Why one pass of apply failed.
enum Failure {
    Conflicts(Vec<(Vec<PathElement>, Conflict)>),
    Typed(TypedError),
}

impl From<TypedError> for Failure {
    fn from(e: TypedError) -> Self {
        Failure::Typed(e)
    }
}

/// `apps/v1, Kind=Deployment`, as upstream prints a GroupVersionKind.
fn gvk(config: &Value) -> String {
    let api_version = config
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = config
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    format!("{group}/{version}, Kind={kind}")
}

/// Keeps client-side apply's annotation equal to what was applied, so that a later
/// client-side `kubectl apply` starts from it (upstream's `lastAppliedUpdater`).
fn keep_last_applied_in_sync(object: &mut Value, config: &Value) {
    let has_annotation = meta::metadata(object)
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(LAST_APPLIED))
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    if !has_annotation {
        return;
    }
    let mut applied = config.clone();
    if let Some(metadata) = applied.get_mut("metadata").and_then(Value::as_object_mut) {
        let now_empty = match metadata
            .get_mut("annotations")
            .and_then(Value::as_object_mut)
        {
            Some(annotations) => {
                annotations.remove(LAST_APPLIED);
                annotations.is_empty()
            }
            None => false,
        };
        if now_empty {
            metadata.remove("annotations");
        }
    }
    let text = format!("{}\n", go_json(&applied));
    if let Some(annotations) = meta::metadata_mut(object)
        .get_mut("annotations")
        .and_then(Value::as_object_mut)
    {
        annotations.insert(LAST_APPLIED.to_string(), Value::String(text));
    }
}
