//! Create, update, patch and delete: decoding, admission (defaults, validation, system
//! fields, managed fields), and optimistic concurrency against the store.

use bytes::Bytes;
use canopy_api::{
    ApiError, ApiResult, Cause, ResourceDef, Subresource,
    fieldmanager::{ApplyError, FieldManager, conflict_error},
    kinds, meta, patch,
    schema::{DecodeReport, FieldPath},
};
use canopy_store::{Outcome, Revision};
use http::{Response, StatusCode, header};
use serde_json::{Value, json};

use super::{
    Body, Call, add_warnings, deleted_status, object_response, parse_rv, read, read_body, target,
    tenancy,
};
use crate::{
    body,
    cache::cache_key,
    request::{self, BodyType},
};

/// How many times a write retries after losing a compare-and-swap race it did not ask for.
pub(super) const MAX_RETRIES: usize = 16;

/// How unknown and duplicate fields are handled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

fn field_validation(call: &Call<'_>) -> ApiResult<FieldValidation> {
    match call.query.get("fieldValidation") {
        None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
        Some("Strict") => Ok(FieldValidation::Strict),
        Some("Ignore") => Ok(FieldValidation::Ignore),
        Some(other) => Err(call.invalid_option(
            "fieldValidation",
            other,
            "fieldValidation must be one of \"Ignore\", \"Warn\", or \"Strict\"",
        )),
    }
}

/// What checking a body found that did not fail the request.
struct Checked {
    /// Warnings for the client (unknown and duplicate fields, under `fieldValidation=Warn`).
    warnings: Vec<String>,
    /// Paths of the unknown fields removed, whatever the validation mode.
    unknown: Vec<String>,
}

/// Checks a decoded object against its kind: apiVersion and kind (filled in when missing),
/// types, unknown fields (pruned) and duplicates, per `fieldValidation`.
fn check_object(
    call: &Call<'_>,
    def: &ResourceDef,
    obj: &mut Value,
    duplicates: Vec<String>,
) -> ApiResult<Checked> {
    let Value::Object(map) = obj else {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON or YAML object",
        ));
    };
    let api_version = def.api_version();
    match map.get("apiVersion") {
        None => {
            map.insert("apiVersion".into(), json!(api_version));
        }
        Some(Value::String(v)) if *v == api_version => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({}) does not match the expected API version ({api_version})",
                other.as_str().unwrap_or("<not a string>")
            )));
        }
    }
    match map.get("kind") {
        None => {
            map.insert("kind".into(), json!(def.kind));
        }
        Some(Value::String(k)) if k == def.kind => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({}) does not match the expected kind ({})",
                other.as_str().unwrap_or("<not a string>"),
                def.kind
            )));
        }
    }
    tidy_metadata(obj);
    let schemas = call.ctx.registry.schemas();
    let node = schemas
        .definition(def.definition)
        .ok_or_else(|| ApiError::internal(format!("no schema for {}", def.kind)))?;
    let mut report = DecodeReport::default();
    schemas
        .normalize(node, obj, &FieldPath::default(), &mut report)
        .map_err(|e| {
            ApiError::bad_request(format!(
                "{} in version {:?} cannot be handled as a {}: {e}",
                def.kind, def.version, def.kind
            ))
        })?;
    let problems: Vec<String> = report
        .unknown_fields
        .iter()
        .map(|f| format!("unknown field {f:?}"))
        .chain(duplicates.iter().map(|f| format!("duplicate field {f:?}")))
        .collect();
    let warnings = match field_validation(call)? {
        FieldValidation::Strict if !problems.is_empty() => {
            return Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                problems.join(", ")
            )));
        }
        FieldValidation::Ignore => Vec::new(),
        _ => problems,
    };
    Ok(Checked {
        warnings,
        unknown: report.unknown_fields,
    })
}

/// Drops empty values from `metadata`. Every ObjectMeta field is `omitempty` upstream, so
/// an empty one means "unset"; protobuf bodies (kubectl's typed clients) carry them all.
fn tidy_metadata(obj: &mut Value) {
    if let Some(Value::Object(m)) = obj.get_mut("metadata") {
        m.retain(|k, v| match v {
            Value::String(s) => !s.is_empty(),
            Value::Object(o) => !o.is_empty(),
            Value::Array(a) => !a.is_empty(),
            // generation 0 is unset; deletionGracePeriodSeconds 0 is not.
            Value::Number(n) => k != "generation" || n.as_i64() != Some(0),
            _ => true,
        });
    }
}

/// A request body decoded by its Content-Type: a missing one means JSON, as upstream; an
/// unsupported one is 415. The inner error is the document's own (a parse error).
pub(super) fn decode_body(
    call: &Call<'_>,
    bytes: &[u8],
) -> ApiResult<Result<body::Decoded, String>> {
    let content_type = call
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let kind = request::body_type(content_type);
    let unsupported =
        || ApiError::unsupported_media_type(content_type.unwrap_or(""), request::OBJECT_TYPES);
    if kind.is_none() && content_type.is_some() {
        return Err(unsupported());
    }
    body::by_type(kind, bytes).ok_or_else(unsupported)
}

/// Decodes a create/update body.
fn decode(call: &Call<'_>, def: &ResourceDef, bytes: &Bytes) -> ApiResult<(Value, Vec<String>)> {
    let decoded = decode_body(call, bytes)?.map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })?;
    let mut value = decoded.value;
    let warnings = check_object(call, def, &mut value, decoded.duplicates)?.warnings;
    Ok((value, warnings))
}

fn encode(obj: &mut Value) -> Bytes {
    // The resourceVersion is the store's revision, never stored in the value.
    let rv = meta::remove_meta(obj, "resourceVersion");
    let bytes = Bytes::from(serde_json::to_vec(obj).unwrap_or_default());
    if let Some(rv) = rv {
        meta::set_meta(obj, "resourceVersion", rv);
    }
    bytes
}

fn set_rv(obj: &mut Value, rev: Revision) {
    meta::set_meta(obj, "resourceVersion", Value::String(rev.to_string()));
}

fn invalid(def: &ResourceDef, obj: &Value, causes: Vec<Cause>) -> ApiError {
    ApiError::invalid(def.group, def.kind, meta::name(obj), causes)
}

/// A random suffix like upstream's `generateName` (no vowels, no ambiguous characters).
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The current state of an object: the watch cache first, the store when the cache does not
/// have it (yet). A stale answer costs one failed compare-and-swap, never a wrong write.
pub(super) async fn current(
    call: &Call<'_>,
    def: &ResourceDef,
    key: &str,
) -> ApiResult<Option<(Value, Revision)>> {
    Ok(write_start(call, def, key).await?.state)
}

/// The object a write starts from, and where it was read.
struct Start {
    state: Option<(Value, Revision)>,
    /// Read from the store itself (or handed back by it on a conflict). A state from the watch
    /// cache may lag the store, so a write that would end without a compare-and-swap (an
    /// error, a failed precondition, nothing to change, a dry run) must first re-read the
    /// store, as upstream's GuaranteedUpdate does: otherwise a client that just wrote gets an
    /// answer computed on the object before its own write.
    from_store: bool,
}

async fn write_start(call: &Call<'_>, def: &ResourceDef, key: &str) -> ApiResult<Start> {
    match call.ctx.cache(def).get(&cache_key(def, key)) {
        Some(obj) => {
            let state = (obj.value(), obj.revision);
            call.check_scope(&state.0)?;
            Ok(Start {
                state: Some(state),
                from_store: false,
            })
        }
        None => stored_start(call, def, key).await,
    }
}

async fn stored_start(call: &Call<'_>, def: &ResourceDef, key: &str) -> ApiResult<Start> {
    let state = call
        .ctx
        .read_stored(def, key)
        .await?
        .map(|(v, kv)| (v, kv.mod_revision));
    if let Some((obj, _)) = &state {
        call.check_scope(obj)?;
    }
    Ok(Start {
        state,
        from_store: true,
    })
}

/// The state a compare-and-swap that lost returns: the store's own.
fn lost_race(
    call: &Call<'_>,
    def: &ResourceDef,
    latest: Option<canopy_store::KeyValue>,
) -> ApiResult<Start> {
    let state = latest
        .map(|kv| crate::cache::decode(def, &kv).map_err(ApiError::internal))
        .transpose()?;
    if let Some((obj, _)) = &state {
        call.check_scope(obj)?;
    }
    Ok(Start {
        state,
        from_store: true,
    })
}

/// Refuses new objects in a namespace that does not exist or is terminating
/// (upstream's NamespaceLifecycle admission).
async fn check_namespace(
    call: &Call<'_>,
    def: &ResourceDef,
    name: &str,
    namespace: &str,
) -> ApiResult<()> {
    let Some(ns_def) = call.ctx.registry.get("", "v1", "namespaces") else {
        return Ok(());
    };
    let ns = match call.ctx.cache(ns_def).get(namespace) {
        Some(obj) => Some(obj.value()),
        None => call
            .ctx
            .read_stored(ns_def, &ns_def.key("", namespace))
            .await?
            .map(|(v, _)| v),
    };
    let Some(ns) = ns else {
        return Err(ApiError::not_found(target(ns_def, namespace)));
    };
    if meta::is_deleting(&ns) || meta::path_str(&ns, "status.phase") == Some("Terminating") {
        let mut err = ApiError::forbidden(
            target(def, name),
            format!(
                "unable to create new content in namespace {namespace} because it is being terminated"
            ),
        );
        err.causes.push(Cause::new(
            "NamespaceTerminating",
            "metadata.namespace",
            format!("namespace {namespace} is being terminated"),
        ));
        return Err(err);
    }
    Ok(())
}

/// Everything that happens to a new object before it is stored, except the namespace's
/// existence ([`check_namespace`], which needs the store and runs first).
fn admit_create(call: &Call<'_>, obj: &mut Value, managed: bool) -> ApiResult<()> {
    let def = call.req.def;
    if def.namespaced {
        let url_ns = call.req.namespace.clone().unwrap_or_default();
        match meta::meta_str(obj, "namespace") {
            Some(ns) if !ns.is_empty() && ns != url_ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => meta::set_meta(obj, "namespace", json!(url_ns)),
        }
    } else {
        meta::remove_meta(obj, "namespace");
    }
    if !meta::resource_version(obj).is_empty() {
        return Err(ApiError::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    if meta::name(obj).is_empty() {
        match meta::meta_str(obj, "generateName").filter(|g| !g.is_empty()) {
            Some(prefix) => {
                let name = format!("{prefix}{}", random_suffix());
                meta::set_meta(obj, "name", json!(name));
            }
            None => {
                return Err(invalid(
                    def,
                    obj,
                    vec![Cause::required(
                        "metadata.name",
                        "name or generateName is required",
                    )],
                ));
            }
        }
    }
    // System fields: the server owns these.
    meta::set_meta(obj, "uid", json!(uuid::Uuid::new_v4().to_string()));
    meta::set_meta(obj, "creationTimestamp", json!(meta::now_rfc3339()));
    meta::remove_meta(obj, "deletionTimestamp");
    meta::remove_meta(obj, "deletionGracePeriodSeconds");
    meta::remove_meta(obj, "selfLink");
    if def.generation {
        meta::set_meta(obj, "generation", json!(1));
    } else {
        meta::remove_meta(obj, "generation");
    }
    tenancy::admit(call, obj, None)?;
    kinds::prepare_create(def, obj);
    kinds::apply_defaults(def, obj);
    let causes = kinds::validate_create(def, obj);
    if !causes.is_empty() {
        return Err(invalid(def, obj, causes));
    }
    call.check_scope(obj)?;
    if managed {
        let manager = call.field_manager()?;
        field_manager(call, def)?
            .update(
                None,
                obj,
                &manager,
                &def.api_version(),
                None,
                &meta::now_rfc3339(),
            )
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    Ok(())
}

fn field_manager<'a>(call: &'a Call<'_>, def: &ResourceDef) -> ApiResult<FieldManager<'a>> {
    let schemas = call.ctx.registry.schemas();
    let node = schemas
        .definition(def.definition)
        .ok_or_else(|| ApiError::internal(format!("no schema for {}", def.kind)))?;
    Ok(FieldManager::new(schemas, node))
}

/// Everything that happens to an updated object before it is stored. `managed`: record
/// managed fields for this write (false when server-side apply already did).
pub(super) fn admit_update(
    call: &Call<'_>,
    new: &mut Value,
    old: &Value,
    sub: Option<Subresource>,
    managed: bool,
) -> ApiResult<()> {
    let def = call.req.def;
    let name = call.name();
    if meta::name(new) != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            meta::name(new)
        )));
    }
    if def.namespaced {
        let url_ns = call.req.namespace.clone().unwrap_or_default();
        match meta::meta_str(new, "namespace") {
            Some(ns) if !ns.is_empty() && ns != url_ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => meta::set_meta(new, "namespace", json!(url_ns)),
        }
    } else {
        meta::remove_meta(new, "namespace");
    }
    // A different uid means the client wrote against another incarnation of the object.
    if let (Some(given), Some(current)) = (
        meta::meta_str(new, "uid").filter(|u| !u.is_empty()),
        meta::meta_str(old, "uid"),
    ) && given != current
    {
        return Err(ApiError::conflict(
            target(def, name),
            &format!(
                "Precondition failed: UID in precondition: {given}, UID in object meta: {current}"
            ),
        ));
    }
    for field in ["uid", "creationTimestamp"] {
        if let (None | Some(""), Some(value)) = (
            meta::meta_str(new, field),
            meta::metadata(old).and_then(|m| m.get(field)),
        ) {
            meta::set_meta(new, field, value.clone());
        }
    }
    // Only deletion sets these.
    for field in [
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match meta::metadata(old).and_then(|m| m.get(field)).cloned() {
            Some(v) => meta::set_meta(new, field, v),
            None => {
                meta::remove_meta(new, field);
            }
        }
    }
    meta::remove_meta(new, "selfLink");
    match sub {
        None => kinds::prepare_update(def, new, old),
        Some(Subresource::Status) => kinds::prepare_status_update(def, new, old),
        Some(Subresource::Finalize) => {
            // Only spec.finalizers changes through /finalize.
            let finalizers = meta::path(new, "spec.finalizers").cloned();
            *new = old.clone();
            match finalizers {
                Some(f) => meta::set_path(new, "spec.finalizers", f),
                None => {
                    if let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut) {
                        spec.remove("finalizers");
                    }
                }
            }
        }
        Some(_) => {}
    }
    tenancy::admit(call, new, Some(old))?;
    kinds::apply_defaults(def, new);
    if def.generation && kinds::spec_changed(def, new, old) {
        let generation = meta::metadata(old)
            .and_then(|m| m.get("generation"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        meta::set_meta(new, "generation", json!(generation + 1));
    }
    let causes = kinds::validate_update(def, new, old);
    if !causes.is_empty() {
        return Err(invalid(def, new, causes));
    }
    call.check_scope(new)?;
    if managed {
        let manager = call.field_manager()?;
        field_manager(call, def)?
            .update(
                Some(old),
                new,
                &manager,
                &def.api_version(),
                // The request's subresource (`scale` too), as upstream labels the entry.
                call.req.subresource.map(|s| s.name()),
                &meta::now_rfc3339(),
            )
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    Ok(())
}

/// Whether an update leaves an object that must now be deleted: being deleted, with no
/// finalizers left and no grace period running (upstream's shouldDeleteDuringUpdate).
fn should_delete(def: &ResourceDef, obj: &Value) -> bool {
    if !meta::is_deleting(obj) || !meta::finalizers(obj).is_empty() {
        return false;
    }
    let grace = meta::metadata(obj)
        .and_then(|m| m.get("deletionGracePeriodSeconds"))
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if grace > 0 {
        return false;
    }
    if def.kind == "Namespace" {
        return meta::path(obj, "spec.finalizers")
            .and_then(Value::as_array)
            .is_none_or(|f| f.is_empty());
    }
    true
}

pub(super) async fn create(
    call: &Call<'_>,
    body: hyper::body::Incoming,
) -> ApiResult<Response<Body>> {
    let def = call.req.def;
    let output = call.output()?;
    let bytes = read_body(body, call.ctx.options.max_body_bytes).await?;
    let (mut obj, warnings) = decode(call, def, &bytes)?;
    if let Some(ns) = &call.req.namespace {
        check_namespace(call, def, meta::name(&obj), ns).await?;
    }
    admit_create(call, &mut obj, true)?;
    let dry_run = call.dry_run()?;
    if dry_run {
        allocate(call, def, &mut obj, None, true).await?;
    } else {
        store_create(call, def, &mut obj).await?;
    }
    let mut response = object_response(StatusCode::CREATED, output, &obj);
    add_warnings(&mut response, &warnings);
    Ok(response)
}

async fn store_create(call: &Call<'_>, def: &ResourceDef, obj: &mut Value) -> ApiResult<()> {
    let _quota = if def.group.is_empty() && def.plural == "pods" {
        tenancy::reserve_quota(call, obj).await?
    } else {
        None
    };
    let reservation = allocate(call, def, obj, None, false).await?;
    let key = def.key(meta::namespace(obj), meta::name(obj));
    let bytes = encode(obj);
    call.ctx.cache(def).prime(obj, &bytes);
    let outcome = call
        .ctx
        .timed("create", def, call.ctx.store.create(&key, bytes))
        .await;
    settle(call, &outcome, reservation).await;
    match outcome? {
        Outcome::Committed(kv) => {
            set_rv(obj, kv.mod_revision);
            call.ctx.cache(def).note_write(kv.mod_revision);
            Ok(())
        }
        Outcome::Conflict(_) => {
            let mut err = ApiError::already_exists(target(def, meta::name(obj)));
            if meta::meta_str(obj, "generateName").is_some() {
                err.message
                    .push_str(": the server was not able to generate a unique name for the object");
            }
            Err(err)
        }
    }
}

fn is_service(def: &ResourceDef) -> bool {
    def.group.is_empty() && def.plural == "services"
}

/// Gives a Service its ClusterIP and node ports before it is written (reserving what it
/// newly holds, unless `dry_run`); other kinds pass through.
async fn allocate(
    call: &Call<'_>,
    def: &ResourceDef,
    obj: &mut Value,
    old: Option<&Value>,
    dry_run: bool,
) -> ApiResult<Option<crate::services::Reservation>> {
    if !is_service(def) {
        return Ok(None);
    }
    let scope = crate::services::scope_of(obj);
    // A tenant's range is its Tenant's (the Tenant default when it names none, as the cloud
    // controller routes it); the server's range is the platform's.
    let cluster_ips = match call.namespace_owner.tenant() {
        Some(tenant) => Some(match tenancy::service_range(call, tenant).await? {
            Some(range) => range,
            None => canopy_api::tenant::DEFAULT_SERVICE_CIDR
                .parse()
                .map_err(ApiError::internal)?,
        }),
        None => None,
    };
    let target = crate::services::Target {
        scope: &scope,
        cluster_ips,
        dry_run,
    };
    call.ctx
        .services
        .allocate(&target, obj, old)
        .await
        .map(Some)
}

/// Keeps what `allocate` reserved only if the write it was for committed.
async fn settle(
    call: &Call<'_>,
    outcome: &ApiResult<Outcome>,
    reservation: Option<crate::services::Reservation>,
) {
    if let Some(reservation) = reservation
        && !matches!(outcome, Ok(Outcome::Committed(_)))
    {
        reservation.rollback(call.ctx.store.as_ref()).await;
    }
}

/// Frees what a Service held before a committed write (`new` None: it was deleted).
async fn release(call: &Call<'_>, def: &ResourceDef, old: &Value, new: Option<&Value>) {
    if is_service(def) {
        call.ctx.services.release(old, new).await;
    }
}

/// A precondition on the resourceVersion the client based its write on.
fn precondition(obj: &Value) -> ApiResult<Option<Revision>> {
    match meta::resource_version(obj) {
        "" => Ok(None),
        rv => parse_rv(rv).map(Some).map_err(|_| {
            ApiError::invalid(
                "",
                "",
                meta::name(obj),
                vec![Cause::invalid(
                    "metadata.resourceVersion",
                    &json!(rv),
                    "must be a non-negative integer",
                )],
            )
        }),
    }
}

/// Compare-and-swap loop shared by update and patch. `mutate` turns the current object into
/// the new one (or an error); it runs again on every lost race.
pub(super) async fn guaranteed_update<F>(
    call: &Call<'_>,
    required_rv: Option<Revision>,
    allow_create: bool,
    mut mutate: F,
) -> ApiResult<(Value, StatusCode)>
where
    F: FnMut(Option<&Value>) -> ApiResult<Value>,
{
    let def = call.req.def;
    let key = call.key();
    let dry_run = call.dry_run()?;
    let mut start = write_start(call, def, &key).await?;
    for _ in 0..MAX_RETRIES {
        let Some((old, old_rev)) = &start.state else {
            if !allow_create {
                return Err(ApiError::not_found(target(def, call.name())));
            }
            let mut obj = mutate(None)?;
            if dry_run {
                allocate(call, def, &mut obj, None, true).await?;
                return Ok((obj, StatusCode::CREATED));
            }
            match store_create(call, def, &mut obj).await {
                Ok(()) => return Ok((obj, StatusCode::CREATED)),
                Err(err) if err.reason == "AlreadyExists" => {
                    start = stored_start(call, def, &key).await?;
                    continue;
                }
                Err(err) => return Err(err),
            }
        };
        let fresh = start.from_store;
        if let Some(required) = required_rv
            && required != *old_rev
        {
            if !fresh {
                start = stored_start(call, def, &key).await?;
                continue;
            }
            return Err(ApiError::conflict(
                target(def, call.name()),
                ApiError::MODIFIED,
            ));
        }
        let mut new = match mutate(Some(old)) {
            Ok(new) => new,
            Err(_) if !fresh => {
                start = stored_start(call, def, &key).await?;
                continue;
            }
            Err(err) => return Err(err),
        };
        set_rv(&mut new, *old_rev);
        // An update that changes nothing is not written (and keeps its resourceVersion); nor
        // is a dry run. Both answer without the store's compare-and-swap, so from its state.
        if (&new == old || dry_run) && !fresh {
            start = stored_start(call, def, &key).await?;
            continue;
        }
        if &new == old {
            return Ok((new, StatusCode::OK));
        }
        if dry_run {
            if !should_delete(def, &new) {
                allocate(call, def, &mut new, Some(old), true).await?;
            }
            return Ok((new, StatusCode::OK));
        }
        let deleting = should_delete(def, &new);
        let outcome = if deleting {
            call.ctx
                .timed("delete", def, call.ctx.store.delete(&key, Some(*old_rev)))
                .await?
        } else {
            let reservation = allocate(call, def, &mut new, Some(old), false).await?;
            let bytes = encode(&mut new);
            call.ctx.cache(def).prime(&new, &bytes);
            let outcome = call
                .ctx
                .timed("update", def, call.ctx.store.update(&key, bytes, *old_rev))
                .await;
            settle(call, &outcome, reservation).await;
            outcome?
        };
        match outcome {
            Outcome::Committed(kv) => {
                set_rv(&mut new, kv.mod_revision);
                call.ctx.cache(def).note_write(kv.mod_revision);
                release(call, def, old, (!deleting).then_some(&new)).await;
                return Ok((new, StatusCode::OK));
            }
            Outcome::Conflict(latest) => {
                start = lost_race(call, def, latest)?;
                if required_rv.is_some() {
                    return Err(ApiError::conflict(
                        target(def, call.name()),
                        ApiError::MODIFIED,
                    ));
                }
            }
        }
    }
    Err(ApiError::conflict(
        target(def, call.name()),
        "too many concurrent updates; please try again",
    ))
}

pub(super) async fn update(
    call: &Call<'_>,
    body: hyper::body::Incoming,
    sub: Option<Subresource>,
) -> ApiResult<Response<Body>> {
    let def = call.req.def;
    let output = call.output()?;
    let bytes = read_body(body, call.ctx.options.max_body_bytes).await?;
    let (given, warnings) = decode(call, def, &bytes)?;
    let required = precondition(&given)?;
    let (obj, code) = guaranteed_update(call, required, false, |old| {
        let mut new = given.clone();
        match old {
            Some(old) => admit_update(call, &mut new, old, sub, true)?,
            None => return Err(ApiError::not_found(target(def, call.name()))),
        }
        Ok(new)
    })
    .await?;
    let mut response = object_response(code, output, &obj);
    add_warnings(&mut response, &warnings);
    Ok(response)
}

/// Whether a patch document sets metadata.resourceVersion (then it is a precondition).
fn patch_precondition(kind: BodyType, patch: &Value) -> ApiResult<Option<Revision>> {
    let rv = match kind {
        BodyType::JsonPatch => patch.as_array().and_then(|ops| {
            ops.iter().rev().find_map(|op| {
                (op.get("path").and_then(Value::as_str) == Some("/metadata/resourceVersion")
                    && matches!(
                        op.get("op").and_then(Value::as_str),
                        Some("add" | "replace")
                    ))
                .then(|| op.get("value").and_then(Value::as_str).map(str::to_string))
                .flatten()
            })
        }),
        _ => meta::path_str(patch, "metadata.resourceVersion").map(str::to_string),
    };
    rv.filter(|r| !r.is_empty())
        .map(|r| parse_rv(&r))
        .transpose()
}

pub(super) async fn patch(
    call: &Call<'_>,
    body: hyper::body::Incoming,
    sub: Option<Subresource>,
) -> ApiResult<Response<Body>> {
    let def = call.req.def;
    let output = call.output()?;
    let content_type = call
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let kind = match request::body_type(content_type) {
        Some(
            k @ (BodyType::JsonPatch
            | BodyType::MergePatch
            | BodyType::StrategicMergePatch
            | BodyType::ApplyPatch),
        ) => k,
        _ => {
            return Err(ApiError::unsupported_media_type(
                content_type.unwrap_or(""),
                request::PATCH_TYPES,
            ));
        }
    };
    let bytes = read_body(body, call.ctx.options.max_body_bytes).await?;
    let document = match kind {
        BodyType::ApplyPatch => body::yaml(&bytes),
        _ => body::json(&bytes),
    }
    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?
    .value;
    if kind == BodyType::ApplyPatch {
        return apply(call, document, sub, output).await;
    }
    if kind == BodyType::JsonPatch
        && document
            .as_array()
            .is_some_and(|ops| ops.len() > patch::MAX_JSON_PATCH_OPERATIONS)
    {
        return Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!(
                "The allowed maximum operations in a JSON patch is {}, got {}",
                patch::MAX_JSON_PATCH_OPERATIONS,
                document.as_array().map_or(0, Vec::len)
            ),
        ));
    }
    if call.query.get("force").is_some() {
        return Err(ApiError::invalid(
            "meta.k8s.io",
            "PatchOptions",
            "",
            vec![Cause::forbidden(
                "force",
                "may not be specified for non-apply patch",
            )],
        ));
    }
    let required = patch_precondition(kind, &document)?;
    let schemas = call.ctx.registry.schemas();
    let node = schemas
        .definition(def.definition)
        .ok_or_else(|| ApiError::internal(format!("no schema for {}", def.kind)))?;
    let mut warnings = Vec::new();
    let (obj, code) = guaranteed_update(call, required, false, |old| {
        let Some(old) = old else {
            return Err(ApiError::not_found(target(def, call.name())));
        };
        let patched = match kind {
            BodyType::JsonPatch => patch::json_patch(old, &document),
            BodyType::MergePatch => patch::merge_patch(old, &document),
            _ => patch::strategic_merge_patch(schemas, node, old, &document),
        }
        .map_err(|e| match e {
            patch::PatchError::BadRequest(msg) => ApiError::bad_request(msg),
            patch::PatchError::Invalid(msg) => ApiError::invalid(
                def.group,
                def.kind,
                call.name(),
                vec![Cause::invalid("", &Value::Null, &msg)],
            ),
        })?;
        let mut new = patched;
        // The patched object failing to decode is the patch's fault: upstream answers 422.
        warnings = check_object(call, def, &mut new, Vec::new())
            .map(|c| c.warnings)
            .map_err(|e| {
                if e.code == 400 {
                    ApiError::invalid(
                        def.group,
                        def.kind,
                        call.name(),
                        vec![Cause::invalid("", &Value::Null, &e.message)],
                    )
                } else {
                    e
                }
            })?;
        // A patch may not rename the object.
        admit_update(call, &mut new, old, sub, true)?;
        Ok(new)
    })
    .await?;
    let mut response = object_response(code, output, &obj);
    add_warnings(&mut response, &warnings);
    Ok(response)
}

/// Server-side apply.
async fn apply(
    call: &Call<'_>,
    mut config: Value,
    sub: Option<Subresource>,
    output: request::Output,
) -> ApiResult<Response<Body>> {
    let def = call.req.def;
    let Some(manager) = call.query.get("fieldManager").filter(|m| !m.is_empty()) else {
        return Err(ApiError::invalid(
            "meta.k8s.io",
            "PatchOptions",
            "",
            vec![Cause::required(
                "fieldManager",
                "is required for apply patch",
            )],
        ));
    };
    let manager = manager.to_string();
    let force = call.query.bool("force")?.unwrap_or(false);
    // An apply configuration is typed against the schema as a whole: upstream refuses one
    // that names fields the schema does not have, whatever fieldValidation says.
    let checked = check_object(call, def, &mut config, Vec::new())?;
    if let Some(field) = checked.unknown.first() {
        return Err(ApiError::bad_request(format!(
            "failed to create typed patch object ({}, Kind={}): .{field}: field not declared in schema",
            def.api_version(),
            def.kind,
        )));
    }
    let warnings = checked.warnings;
    if meta::name(&config) != call.name() {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({})",
            meta::name(&config),
            call.name()
        )));
    }
    let now = meta::now_rfc3339();
    let fm = field_manager(call, def)?;
    if let Some(ns) = &call.req.namespace
        && sub.is_none()
        && current(call, def, &call.key()).await?.is_none()
    {
        check_namespace(call, def, call.name(), ns).await?;
    }
    let (obj, code) = guaranteed_update(call, None, sub.is_none(), |old| {
        let mut merged = fm
            .apply(
                old,
                &config,
                &manager,
                &def.api_version(),
                sub.map(|s| s.name()),
                force,
                &now,
            )
            .map_err(|e| match e {
                ApplyError::Conflicts(conflicts) => conflict_error(&conflicts),
                ApplyError::Invalid(msg) => ApiError::bad_request(msg),
            })?;
        match old {
            Some(old) => admit_update(call, &mut merged, old, sub, false)?,
            None => {
                // Creating through apply: the create admission, keeping apply's managed fields.
                meta::remove_meta(&mut merged, "resourceVersion");
                admit_create(call, &mut merged, false)?;
            }
        }
        Ok(merged)
    })
    .await?;
    let mut response = object_response(code, output, &obj);
    add_warnings(&mut response, &warnings);
    Ok(response)
}

/// DeleteOptions from the body (if any) and the query.
struct DeleteOptions {
    dry_run: bool,
    grace_period: Option<i64>,
    propagation: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
}

/// 422 for a bad request option, as upstream validates CreateOptions, DeleteOptions etc.
fn invalid_option(kind: &str, field: &str, value: &Value, detail: &str) -> ApiError {
    ApiError::invalid(
        "meta.k8s.io",
        kind,
        "",
        vec![Cause::invalid(field, value, detail)],
    )
}

fn delete_options(call: &Call<'_>, bytes: &Bytes) -> ApiResult<DeleteOptions> {
    let body = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        Value::Object(Default::default())
    } else {
        let kind = request::body_type(
            call.headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
        );
        body::by_type(kind, bytes)
            .unwrap_or_else(|| Err("unsupported media type".into()))
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
            .value
    };
    if !body.is_object() {
        return Err(ApiError::bad_request("DeleteOptions must be an object"));
    }
    // dryRun may come in the query or in the body (kube-rs and client-go use the body).
    let body_dry_run = match body.get("dryRun") {
        None | Some(Value::Null) => false,
        Some(Value::Array(values)) => {
            if let Some(bad) = values.iter().find(|v| v.as_str() != Some("All")) {
                return Err(invalid_option(
                    "DeleteOptions",
                    "dryRun",
                    bad,
                    "supported values: \"All\"",
                ));
            }
            !values.is_empty()
        }
        Some(other) => {
            return Err(invalid_option(
                "DeleteOptions",
                "dryRun",
                other,
                "must be a list",
            ));
        }
    };
    let dry_run = call.dry_run()? || body_dry_run;
    let grace_period =
        match call.query.int("gracePeriodSeconds")? {
            Some(g) => Some(g),
            None => match body.get("gracePeriodSeconds") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_i64().ok_or_else(|| {
                    ApiError::bad_request("gracePeriodSeconds must be an integer")
                })?),
            },
        };
    // Upstream's BeforeDelete: a negative grace period means one second.
    let grace_period = grace_period.map(|g| if g < 0 { 1 } else { g });
    let orphan = call
        .query
        .bool("orphanDependents")?
        .or_else(|| body.get("orphanDependents").and_then(Value::as_bool));
    let mut propagation = call
        .query
        .get("propagationPolicy")
        .map(str::to_string)
        .or_else(|| {
            body.get("propagationPolicy")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|p| !p.is_empty());
    if let Some(p) = &propagation {
        if !matches!(p.as_str(), "Orphan" | "Background" | "Foreground") {
            return Err(ApiError::invalid(
                "meta.k8s.io",
                "DeleteOptions",
                "",
                vec![Cause::not_supported(
                    "propagationPolicy",
                    &json!(p),
                    &["Foreground", "Background", "Orphan"],
                )],
            ));
        }
        if orphan.is_some() {
            return Err(invalid_option(
                "DeleteOptions",
                "propagationPolicy",
                &json!(p),
                "orphanDependents and deletionPropagation cannot be both set",
            ));
        }
    } else if orphan == Some(true) {
        propagation = Some("Orphan".into());
    }
    let pre = body.get("preconditions");
    Ok(DeleteOptions {
        dry_run,
        grace_period,
        propagation,
        uid: pre
            .and_then(|p| p.get("uid"))
            .and_then(Value::as_str)
            .map(str::to_string),
        resource_version: pre
            .and_then(|p| p.get("resourceVersion"))
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// Namespaces the cluster itself needs.
const PROTECTED_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

pub(super) async fn delete(
    call: &Call<'_>,
    body: hyper::body::Incoming,
) -> ApiResult<Response<Body>> {
    let def = call.req.def;
    let output = call.output()?;
    let bytes = read_body(body, call.ctx.options.max_body_bytes).await?;
    let options = delete_options(call, &bytes)?;
    if def.kind == "Namespace" && PROTECTED_NAMESPACES.contains(&call.name()) {
        return Err(ApiError::forbidden(
            target(def, call.name()),
            "this namespace may not be deleted",
        ));
    }
    let key = call.key();
    let (obj, code) = delete_one(call, def, &key, &options).await?;
    Ok(match obj {
        Deleted::Gone(obj) if !matches!(def.kind, "Pod" | "Namespace") => {
            object_response(code, output, &deleted_status(def, &obj))
        }
        Deleted::Gone(obj) | Deleted::Pending(obj) => object_response(code, output, &obj),
    })
}

enum Deleted {
    /// Removed from the store.
    Gone(Value),
    /// Marked for deletion; finalizers or a grace period remain.
    Pending(Value),
}

async fn delete_one(
    call: &Call<'_>,
    def: &ResourceDef,
    key: &str,
    options: &DeleteOptions,
) -> ApiResult<(Deleted, StatusCode)> {
    let name = key.rsplit('/').next().unwrap_or("").to_string();
    let dry_run = options.dry_run;
    let mut start = write_start(call, def, key).await?;
    for _ in 0..MAX_RETRIES {
        let Some((old, old_rev)) = &start.state else {
            return Err(ApiError::not_found(target(def, &name)));
        };
        let fresh = start.from_store;
        let failed = failed_precondition(options, old, *old_rev, def, &name);
        // Every answer but a compare-and-swap's is given from the store's state (see `Start`).
        if !fresh && (failed.is_some() || dry_run) {
            start = stored_start(call, def, key).await?;
            continue;
        }
        if let Some(err) = failed {
            return Err(err);
        }
        let mut new = old.clone();
        let mut finalizers = meta::finalizers(&new);
        let add = match options.propagation.as_deref() {
            Some("Orphan") => Some("orphan"),
            Some("Foreground") => Some("foregroundDeletion"),
            _ => None,
        };
        if let Some(f) = add
            && !finalizers.iter().any(|x| x == f)
            && !meta::is_deleting(old)
        {
            finalizers.push(f.to_string());
            meta::set_meta(&mut new, "finalizers", json!(finalizers));
        }
        let grace = grace_period(def, old, options);
        let namespace_pending = def.kind == "Namespace"
            && meta::path(old, "spec.finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty());
        let pending = !finalizers.is_empty() || grace > 0 || namespace_pending;
        if pending {
            let already = meta::is_deleting(old);
            let current_grace = meta::metadata(old)
                .and_then(|m| m.get("deletionGracePeriodSeconds"))
                .and_then(Value::as_i64);
            // A second delete may only shorten a running grace period.
            if !already || current_grace.is_some_and(|g| grace < g) {
                meta::set_meta(
                    &mut new,
                    "deletionTimestamp",
                    json!(meta::rfc3339_in(grace)),
                );
                meta::set_meta(&mut new, "deletionGracePeriodSeconds", json!(grace));
            }
            if def.kind == "Namespace" {
                meta::set_path(&mut new, "status.phase", json!("Terminating"));
            }
            if &new == old {
                if !fresh {
                    start = stored_start(call, def, key).await?;
                    continue;
                }
                return Ok((Deleted::Pending(new), StatusCode::OK));
            }
            if !should_delete(def, &new) {
                if dry_run {
                    return Ok((Deleted::Pending(new), StatusCode::OK));
                }
                let bytes = encode(&mut new);
                call.ctx.cache(def).prime(&new, &bytes);
                match call
                    .ctx
                    .timed("update", def, call.ctx.store.update(key, bytes, *old_rev))
                    .await?
                {
                    Outcome::Committed(kv) => {
                        set_rv(&mut new, kv.mod_revision);
                        call.ctx.cache(def).note_write(kv.mod_revision);
                        return Ok((Deleted::Pending(new), StatusCode::OK));
                    }
                    Outcome::Conflict(latest) => {
                        start = lost_race(call, def, latest)?;
                        continue;
                    }
                }
            }
        }
        if dry_run {
            return Ok((Deleted::Gone(old.clone()), StatusCode::OK));
        }
        match call
            .ctx
            .timed("delete", def, call.ctx.store.delete(key, Some(*old_rev)))
            .await?
        {
            Outcome::Committed(kv) => {
                call.ctx.cache(def).note_write(kv.mod_revision);
                release(call, def, old, None).await;
                let mut gone = old.clone();
                set_rv(&mut gone, kv.mod_revision);
                return Ok((Deleted::Gone(gone), StatusCode::OK));
            }
            Outcome::Conflict(latest) => start = lost_race(call, def, latest)?,
        }
    }
    Err(ApiError::conflict(
        target(def, &name),
        "too many concurrent updates; please try again",
    ))
}

/// The error of a delete whose UID or resourceVersion precondition `old` does not meet.
fn failed_precondition(
    options: &DeleteOptions,
    old: &Value,
    old_rev: Revision,
    def: &ResourceDef,
    name: &str,
) -> Option<ApiError> {
    let message = if let Some(uid) = options.uid.as_ref().filter(|uid| *uid != meta::uid(old)) {
        format!(
            "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
            meta::uid(old)
        )
    } else {
        let rv = options
            .resource_version
            .as_ref()
            .filter(|rv| **rv != old_rev.to_string())?;
        format!(
            "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {old_rev}"
        )
    };
    Some(ApiError::conflict(target(def, name), &message))
}

/// The grace period of a deletion: only pods that may be running on a node have one
/// (upstream's pod strategy CheckGracefulDelete).
fn grace_period(def: &ResourceDef, obj: &Value, options: &DeleteOptions) -> i64 {
    if def.kind != "Pod" {
        return 0;
    }
    let scheduled = meta::path_str(obj, "spec.nodeName").is_some_and(|n| !n.is_empty());
    let terminal = matches!(
        meta::path_str(obj, "status.phase"),
        Some("Succeeded" | "Failed")
    );
    if !scheduled || terminal {
        return 0;
    }
    options.grace_period.unwrap_or_else(|| {
        meta::path(obj, "spec.terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(30)
    })
}

pub(super) async fn delete_collection(
    call: &Call<'_>,
    body: hyper::body::Incoming,
) -> ApiResult<Response<Body>> {
    let def = call.req.def;
    let output = call.output()?;
    let bytes = read_body(body, call.ctx.options.max_body_bytes).await?;
    let options = delete_options(call, &bytes)?;
    let filter = read::filter(call)?;
    let page = call
        .ctx
        .cache(def)
        .list(&filter, 0, None, None)
        .map_err(super::cache_error)?;
    let mut items = Vec::new();
    for obj in &page.items {
        if def.kind == "Namespace" && PROTECTED_NAMESPACES.contains(&obj.name()) {
            continue;
        }
        let key = def.key(obj.namespace(), obj.name());
        match delete_one(call, def, &key, &options).await {
            Ok((Deleted::Gone(v) | Deleted::Pending(v), _)) => items.push(v),
            // Deleted meanwhile: nothing to do.
            Err(err) if err.code == 404 => {}
            Err(err) => return Err(err),
        }
    }
    let list = json!({
        "kind": def.list_kind(),
        "apiVersion": def.api_version(),
        "metadata": {"resourceVersion": page.revision.to_string()},
        "items": items,
    });
    Ok(object_response(StatusCode::OK, output, &list))
}
