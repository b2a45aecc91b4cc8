//! Subresources with their own representation: `scale`, `pods/binding`, `pods/log`,
//! `serviceaccounts/token`.
//! (`status` and `namespaces/finalize` are updates of the object itself, in `write`.)

use std::{collections::BTreeMap, sync::Arc};

use bytes::Bytes;
use canopy_api::{
    ApiError, ApiResult, Cause, ResourceDef, meta, patch, selector::LabelSelector, status,
};
use canopy_store::{KeyValue, Outcome};
use http::{Response, StatusCode, header};
use serde_json::{
    Value, json,
    value::{RawValue, to_raw_value},
};

use super::write::{MAX_RETRIES, admit_update, current, decode_body, guaranteed_update};
use super::{Body, Call, object_response, parse_rv, read_body, target};
use crate::{
    body,
    cache::{CachedObject, cache_key},
    request::{self, BodyType, Verb},
};

/// The `autoscaling/v1` Scale view of a deployment or replica set.
fn to_scale(obj: &Value) -> Value {
    let selector = meta::path(obj, "spec.selector")
        .and_then(|s| LabelSelector::from_json(s).ok())
        .map(|s| s.to_string())
        .unwrap_or_default();
    let mut metadata = serde_json::Map::new();
    for field in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = meta::metadata(obj).and_then(|m| m.get(field)) {
            metadata.insert(field.into(), v.clone());
        }
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": metadata,
        "spec": {"replicas": meta::path(obj, "spec.replicas").and_then(Value::as_i64).unwrap_or(0)},
        "status": {
            "replicas": meta::path(obj, "status.replicas").and_then(Value::as_i64).unwrap_or(0),
            "selector": selector,
        },
    })
}

pub(super) async fn get_scale(call: &Call<'_>) -> ApiResult<Response<Body>> {
    let def = call.req.def;
    let output = call.output()?;
    // An unversioned GET reads the store, as the object's own GET does.
    let (obj, _) = call
        .ctx
        .read_stored(def, &call.key())
        .await?
        .ok_or_else(|| ApiError::not_found(target(def, call.name())))?;
    call.check_scope(&obj)?;
    Ok(object_response(StatusCode::OK, output, &to_scale(&obj)))
}

/// What a Scale write asks for: a whole Scale (update) or a patch of it.
enum ScaleChange {
    Replace(Value),
    Patch(BodyType, Value),
}

pub(super) async fn write_scale(
    call: &Call<'_>,
    body: hyper::body::Incoming,
) -> ApiResult<Response<Body>> {
    let def = call.req.def;
    let output = call.output()?;
    let bytes = read_body(body, call.ctx.options.max_body_bytes).await?;
    let content_type = call
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let kind = request::body_type(content_type);
    let (change, required) = match (call.req.verb, kind) {
        (Verb::Update, Some(BodyType::Json | BodyType::Yaml | BodyType::Protobuf) | None) => {
            let decoded = body::by_type(kind, &bytes)
                .unwrap_or_else(|| Err("unsupported media type".into()))
                .map_err(|e| ApiError::bad_request(format!("error decoding Scale: {e}")))?;
            let required = match meta::resource_version(&decoded.value) {
                "" => None,
                rv => Some(parse_rv(rv)?),
            };
            (ScaleChange::Replace(decoded.value), required)
        }
        (
            Verb::Patch,
            Some(k @ (BodyType::JsonPatch | BodyType::MergePatch | BodyType::StrategicMergePatch)),
        ) => {
            let document = body::json(&bytes)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?
                .value;
            let required = meta::path_str(&document, "metadata.resourceVersion")
                .filter(|r| !r.is_empty())
                .map(parse_rv)
                .transpose()?;
            (ScaleChange::Patch(k, document), required)
        }
        _ => {
            return Err(ApiError::unsupported_media_type(
                content_type.unwrap_or(""),
                if call.req.verb == Verb::Patch {
                    request::PATCH_TYPES
                } else {
                    request::OBJECT_TYPES
                },
            ));
        }
    };
    // A patch applies to the Scale of the object as it is written (upstream patches it
    // inside GuaranteedUpdate too), so a retry after a conflict patches the newer object.
    let (updated, code) = guaranteed_update(call, required, false, |old| {
        let Some(old) = old else {
            return Err(ApiError::not_found(target(def, call.name())));
        };
        let patched;
        let scale = match &change {
            ScaleChange::Replace(scale) => scale,
            ScaleChange::Patch(kind, document) => {
                patched = patched_scale(call, *kind, &to_scale(old), document)?;
                &patched
            }
        };
        let mut new = old.clone();
        meta::set_path(
            &mut new,
            "spec.replicas",
            json!(scale_replicas(call, scale)?),
        );
        admit_update(call, &mut new, old, None, true)?;
        Ok(new)
    })
    .await?;
    Ok(object_response(code, output, &to_scale(&updated)))
}

fn patched_scale(
    call: &Call<'_>,
    kind: BodyType,
    scale_now: &Value,
    document: &Value,
) -> ApiResult<Value> {
    let schemas = call.ctx.registry.schemas();
    let node = schemas
        .definition("io.k8s.api.autoscaling.v1.Scale")
        .ok_or_else(|| ApiError::internal("no Scale schema"))?;
    match kind {
        BodyType::JsonPatch => patch::json_patch(scale_now, document),
        BodyType::MergePatch => patch::merge_patch(scale_now, document),
        _ => patch::strategic_merge_patch(schemas, node, scale_now, document),
    }
    .map_err(|e| match e {
        patch::PatchError::BadRequest(m) => ApiError::bad_request(m),
        patch::PatchError::Invalid(m) => ApiError::invalid(
            "autoscaling",
            "Scale",
            call.name(),
            vec![Cause::invalid("", &Value::Null, &m)],
        ),
    })
}

fn scale_replicas(call: &Call<'_>, scale: &Value) -> ApiResult<i64> {
    match meta::path(scale, "spec.replicas") {
        None => Ok(0),
        Some(v) => match v.as_i64() {
            Some(n) if n >= 0 && n <= i32::MAX as i64 => Ok(n),
            _ => Err(ApiError::invalid(
                "autoscaling",
                "Scale",
                call.name(),
                vec![Cause::invalid(
                    "spec.replicas",
                    v,
                    "must be greater than or equal to 0",
                )],
            )),
        },
    }
}

/// The object a subresource request posts (`kind` names it in errors), as JSON, YAML or
/// protobuf by its Content-Type.
async fn request_object(
    call: &Call<'_>,
    body: hyper::body::Incoming,
    kind: &str,
) -> ApiResult<Value> {
    let bytes = read_body(body, call.ctx.options.max_body_bytes).await?;
    Ok(decode_body(call, &bytes)?
        .map_err(|e| ApiError::bad_request(format!("error decoding {kind}: {e}")))?
        .value)
}

pub(super) async fn bind(
    call: &Call<'_>,
    body: hyper::body::Incoming,
) -> ApiResult<Response<Body>> {
    let def = call.req.def;
    let output = call.output()?;
    let binding = request_object(call, body, "Binding").await?;
    let node = meta::path_str(&binding, "target.name")
        .unwrap_or("")
        .to_string();
    if node.is_empty() {
        return Err(ApiError::invalid(
            "",
            "Binding",
            call.name(),
            vec![Cause::required("target.name", "")],
        ));
    }
    if let Some(name) = meta::meta_str(&binding, "name")
        && !name.is_empty()
        && name != call.name()
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({})",
            call.name()
        )));
    }
    let annotations = meta::metadata(&binding)
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let dry_run = call.dry_run()?;
    // Upstream binds straight through storage (BindingREST.setPodHostAndAnnotations): the
    // Binding is not persisted and the pod's managedFields are left as they were. Binding is
    // the scheduler's hot path, so the pod is changed as stored JSON, without decoding it
    // whole (see `bound_json`), and its cached form is derived from the current one.
    let key = call.key();
    let cache = call.ctx.cache(def);
    let read_store = async || -> ApiResult<_> {
        let (kv, _) = call.ctx.timed("get", def, call.ctx.store.get(&key)).await?;
        stored_object(def, kv)
    };
    // Whether `state` is the store's own rather than the cache's, which may lag: a refusal or a
    // dry run answers without a compare-and-swap, so only from the store's state.
    let mut from_store = false;
    let mut state = match cache.get(&cache_key(def, &key)) {
        Some(obj) => Some(obj),
        None => {
            from_store = true;
            read_store().await?
        }
    };
    for _ in 0..MAX_RETRIES {
        let Some(old) = state else {
            return Err(ApiError::not_found(target(def, call.name())));
        };
        call.check_scope_cached(&old)?;
        let conflict = |message: String| ApiError::conflict(target(def, call.name()), &message);
        let bound = bound_json(&old.stored_json(), &node, &annotations);
        if !from_store && (bound.is_err() || dry_run) {
            state = read_store().await?;
            from_store = true;
            continue;
        }
        let stored = match bound {
            Ok(stored) => Bytes::from(stored),
            Err(BindRefusal::Deleting) => {
                return Err(conflict(format!(
                    "pod {} is being deleted, cannot be assigned to a host",
                    call.name()
                )));
            }
            Err(BindRefusal::Assigned(current)) => {
                return Err(conflict(format!(
                    "pod {} is already assigned to node {current:?}",
                    call.name()
                )));
            }
            Err(BindRefusal::Malformed(err)) => {
                return Err(ApiError::internal(format!("stored pod {key}: {err}")));
            }
        };
        if !dry_run {
            let dictionary = cache.dictionary();
            let updated = old.updated(
                def,
                stored.clone(),
                ("spec.nodeName", &node),
                dictionary.as_ref(),
            );
            cache.prime_object(updated, &stored);
            let outcome = call
                .ctx
                .timed(
                    "update",
                    def,
                    call.ctx.store.update(&key, stored, old.revision),
                )
                .await?;
            match outcome {
                Outcome::Committed(kv) => cache.note_write(kv.mod_revision),
                Outcome::Conflict(latest) => {
                    state = stored_object(def, latest)?;
                    from_store = true;
                    continue;
                }
            }
        }
        let ok = status::success_status(target(def, call.name()), None);
        return Ok(object_response(StatusCode::CREATED, output, &ok));
    }
    Err(ApiError::conflict(
        target(def, call.name()),
        "too many concurrent updates; please try again",
    ))
}

/// The cached form of a store record, if there is one.
fn stored_object(def: &ResourceDef, kv: Option<KeyValue>) -> ApiResult<Option<Arc<CachedObject>>> {
    kv.map(|kv| CachedObject::from_stored(def, &kv, None).map(Arc::new))
        .transpose()
        .map_err(ApiError::internal)
}

/// Why a pod cannot be bound.
#[derive(Debug, PartialEq)]
enum BindRefusal {
    Deleting,
    Assigned(String),
    Malformed(String),
}

impl From<serde_json::Error> for BindRefusal {
    fn from(err: serde_json::Error) -> Self {
        BindRefusal::Malformed(err.to_string())
    }
}

/// Whether an object's metadata marks it as being deleted; its other fields are skipped
/// without being copied.
#[derive(serde::Deserialize)]
struct DeletionMark<'a> {
    #[serde(rename = "deletionTimestamp", borrow, default)]
    deletion_timestamp: Option<&'a RawValue>,
}

/// An object's fields with their values as JSON text: reading it only checks the values'
/// syntax, and writing it copies them as they are.
type RawFields = BTreeMap<String, Box<RawValue>>;

fn raw_fields(value: Option<&RawValue>) -> Result<RawFields, serde_json::Error> {
    match value {
        Some(raw) if raw.get() != "null" => serde_json::from_str(raw.get()),
        _ => Ok(RawFields::new()),
    }
}

/// A stored pod's JSON bound to `node`: `spec.nodeName` set, the binding's annotations
/// added, condition PodScheduled True. Only the objects on the way are decoded, the rest is
/// copied as JSON text; fields come out in the order a decoded object would be written in,
/// so the bytes are those decoding, changing and encoding the whole pod would give.
fn bound_json(
    stored: &[u8],
    node: &str,
    annotations: &serde_json::Map<String, Value>,
) -> Result<Vec<u8>, BindRefusal> {
    let mut pod: RawFields = serde_json::from_slice(stored)?;
    let metadata_json = pod
        .get("metadata")
        .map(|m| m.get())
        .filter(|m| *m != "null")
        .unwrap_or("{}");
    if serde_json::from_str::<DeletionMark>(metadata_json)?
        .deletion_timestamp
        .is_some()
    {
        return Err(BindRefusal::Deleting);
    }
    let mut spec = raw_fields(pod.get("spec").map(|v| &**v))?;
    if let Some(current) = spec.get("nodeName") {
        let current: Option<String> = serde_json::from_str(current.get())?;
        if let Some(current) = current.filter(|n| !n.is_empty()) {
            return Err(BindRefusal::Assigned(current));
        }
    }
    spec.insert("nodeName".into(), to_raw_value(node)?);
    pod.insert("spec".into(), to_raw_value(&spec)?);
    if !annotations.is_empty() {
        let mut metadata = raw_fields(pod.get("metadata").map(|v| &**v))?;
        let mut merged: serde_json::Map<String, Value> = match metadata.get("annotations") {
            Some(raw) if raw.get() != "null" => serde_json::from_str(raw.get())?,
            _ => serde_json::Map::new(),
        };
        merged.extend(annotations.iter().map(|(k, v)| (k.clone(), v.clone())));
        metadata.insert("annotations".into(), to_raw_value(&merged)?);
        pod.insert("metadata".into(), to_raw_value(&metadata)?);
    }
    let mut status: Value = match pod.get("status") {
        Some(raw) => serde_json::from_str(raw.get())?,
        None => json!({}),
    };
    set_condition(&mut status, "PodScheduled", "True");
    pod.insert("status".into(), to_raw_value(&status)?);
    Ok(serde_json::to_vec(&pod)?)
}

/// Sets a condition in a pod's status, keeping its transition time when the status does not
/// change.
fn set_condition(status: &mut Value, kind: &str, value: &str) {
    let now = meta::now_rfc3339();
    if !status.is_object() {
        *status = json!({});
    }
    let conditions = match status.get_mut("conditions").map(Value::take) {
        Some(Value::Array(conditions)) => conditions,
        _ => Vec::new(),
    };
    let mut found = false;
    let mut out: Vec<Value> = conditions
        .into_iter()
        .map(|mut c| {
            if c.get("type").and_then(Value::as_str) == Some(kind) {
                found = true;
                if c.get("status").and_then(Value::as_str) != Some(value) {
                    c["lastTransitionTime"] = json!(now);
                }
                c["status"] = json!(value);
                if let Some(m) = c.as_object_mut() {
                    m.remove("reason");
                    m.remove("message");
                }
            }
            c
        })
        .collect();
    if !found {
        out.push(json!({"type": kind, "status": value, "lastProbeTime": null, "lastTransitionTime": now}));
    }
    status["conditions"] = Value::Array(out);
}

pub(super) async fn log(call: &Call<'_>) -> ApiResult<Response<Body>> {
    let def: &ResourceDef = call.req.def;
    let (pod, _) = current(call, def, &call.key())
        .await?
        .ok_or_else(|| ApiError::not_found(target(def, call.name())))?;
    let container = pick_container(call, &pod)?;
    let node_name = assigned_node(call, &pod)?;
    let query = log_query(call)?;
    let (nodes, node) = agent_of(call, node_name).await?;
    let path = format!(
        "/containerLogs/{}/{}/{}{query}",
        enc(meta::namespace(&pod)),
        enc(meta::name(&pod)),
        enc(&container)
    );
    let response = nodes.get(&node, &path).await?;
    if response.status() != StatusCode::OK {
        return Err(agent_error(call, response).await);
    }
    Ok(stream_logs(response.into_body(), call.ctx.shutdown.clone()))
}

/// The node a pod is bound to, which logs and streams are served by.
fn assigned_node<'p>(call: &Call<'_>, pod: &'p Value) -> ApiResult<&'p str> {
    meta::path_str(pod, "spec.nodeName")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(format!("pod {} does not have a host assigned", call.name()))
        })
}

/// The API server's client towards agents, and the Node whose agent to call.
async fn agent_of(
    call: &Call<'_>,
    node_name: &str,
) -> ApiResult<(std::sync::Arc<crate::nodeproxy::NodeClient>, Value)> {
    let Some(nodes) = call.ctx.nodes.clone() else {
        return Err(ApiError::unavailable(
            "this API server does not reach node agents",
        ));
    };
    let node = node_object(call, node_name)
        .await?
        .ok_or_else(|| ApiError::unavailable(format!("node {node_name:?} does not exist")))?;
    Ok((nodes, node))
}

/// An agent's refusal as the client's error: the agent answers errors with a Status, as the
/// kubelet does; the node is its tenant's, so what it says is bounded.
async fn agent_error(call: &Call<'_>, response: http::Response<hyper::body::Incoming>) -> ApiError {
    use http_body_util::BodyExt;
    let code = response.status().as_u16();
    let bytes = http_body_util::Limited::new(response.into_body(), 64 << 10)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let message = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    match code {
        400 => ApiError::bad_request(message),
        404 => ApiError::not_found(target(call.req.def, call.name())),
        _ => ApiError::unavailable(message),
    }
}

/// The container a log or stream request is for: the one named, or the pod's only one
/// (init containers aside), with upstream's errors.
fn pick_container(call: &Call<'_>, pod: &Value) -> ApiResult<String> {
    let names = |path: &str| -> Vec<String> {
        meta::path(pod, path)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
            .collect()
    };
    let (containers, init_containers) = (names("spec.containers"), names("spec.initContainers"));
    match call.query.get("container").filter(|c| !c.is_empty()) {
        Some(container) => {
            if !containers
                .iter()
                .chain(&init_containers)
                .any(|c| c == container)
            {
                return Err(ApiError::bad_request(format!(
                    "container {container} is not valid for pod {}",
                    call.name()
                )));
            }
            Ok(container.to_string())
        }
        None if containers.len() == 1 => Ok(containers[0].clone()),
        None => {
            let mut message = format!(
                "a container name must be specified for pod {}, choose one of: [{}]",
                call.name(),
                containers.join(" ")
            );
            if !init_containers.is_empty() {
                message.push_str(&format!(
                    " or one of the init containers: [{}]",
                    init_containers.join(" ")
                ));
            }
            Err(ApiError::bad_request(message))
        }
    }
}

/// `pods/exec`, `pods/attach`, `pods/portforward`: authorized here, then the upgraded
/// connection is relayed byte for byte to the node's agent, which speaks the stream
/// protocol (upstream's apiserver proxies to the kubelet the same way).
pub(super) async fn stream(call: &Call<'_>) -> ApiResult<Response<Body>> {
    let def: &ResourceDef = call.req.def;
    let sub = call
        .req
        .subresource
        .ok_or_else(|| ApiError::internal("a stream without a subresource"))?;
    let (pod, _) = current(call, def, &call.key())
        .await?
        .ok_or_else(|| ApiError::not_found(target(def, call.name())))?;
    let upgrade = call.headers.get(header::UPGRADE).cloned();
    if upgrade.is_none() {
        return Err(ApiError::bad_request(
            "Upgrade request required: exec, attach and port-forward stream over an upgraded connection (WebSocket)",
        ));
    }
    let phase = meta::path_str(&pod, "status.phase").unwrap_or("");
    if matches!(phase, "Succeeded" | "Failed") {
        return Err(ApiError::bad_request(format!(
            "cannot {} a container in a completed pod; current phase is {phase}",
            if sub == canopy_api::Subresource::Attach {
                "attach to"
            } else {
                "exec into"
            }
        )));
    }
    let node_name = assigned_node(call, &pod)?;
    let path = agent_stream_path(call, sub, &pod)?;
    let (nodes, node) = agent_of(call, node_name).await?;
    let mut upgrade_headers = http::HeaderMap::new();
    for name in [
        header::UPGRADE,
        header::CONNECTION,
        header::SEC_WEBSOCKET_KEY,
        header::SEC_WEBSOCKET_VERSION,
        header::SEC_WEBSOCKET_PROTOCOL,
        header::HeaderName::from_static("x-stream-protocol-version"),
    ] {
        for value in call.headers.get_all(&name) {
            upgrade_headers.append(name.clone(), value.clone());
        }
    }
    let client_side = call
        .upgrade
        .lock()
        .take()
        .ok_or_else(|| ApiError::bad_request("the connection cannot be upgraded"))?;
    let mut response = nodes.upgrade(&node, &path, &upgrade_headers).await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(agent_error(call, response).await);
    }
    let node_side = hyper::upgrade::on(&mut response);
    let mut answer = Response::new(http_body_util::BodyExt::boxed(http_body_util::Empty::new()));
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for name in [
        header::UPGRADE,
        header::CONNECTION,
        header::SEC_WEBSOCKET_ACCEPT,
        header::SEC_WEBSOCKET_PROTOCOL,
        header::HeaderName::from_static("x-stream-protocol-version"),
    ] {
        for value in response.headers().get_all(&name) {
            answer.headers_mut().append(name.clone(), value.clone());
        }
    }
    let shutdown = call.ctx.shutdown.clone();
    let who = format!("{}/{}", meta::namespace(&pod), meta::name(&pod));
    tokio::spawn(async move {
        let (client, node) = match tokio::try_join!(client_side, node_side) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(pod = %who, error = %error, "a stream failed to upgrade");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut node = hyper_util::rt::TokioIo::new(node);
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut node) => {}
            _ = shutdown.cancelled() => {}
        }
    });
    Ok(answer)
}

/// The agent's path for a stream, with the kubelet's parameter names (as upstream's
/// apiserver translates them).
fn agent_stream_path(
    call: &Call<'_>,
    sub: canopy_api::Subresource,
    pod: &Value,
) -> ApiResult<String> {
    let mut params = form_urlencoded::Serializer::new(String::new());
    let flags = [
        ("stdin", "input"),
        ("stdout", "output"),
        ("stderr", "error"),
        ("tty", "tty"),
    ];
    let path = match sub {
        canopy_api::Subresource::PortForward => {
            for port in call.query.all("ports").collect::<Vec<_>>() {
                for p in port.split(',') {
                    params.append_pair("port", p.trim());
                }
            }
            format!(
                "/portForward/{}/{}",
                enc(meta::namespace(pod)),
                enc(meta::name(pod))
            )
        }
        _ => {
            let container = pick_container(call, pod)?;
            for (ours, kubelet) in flags {
                if call.query.flag(ours) {
                    params.append_pair(kubelet, "1");
                }
            }
            if sub == canopy_api::Subresource::Exec {
                let commands: Vec<&str> = call.query.all("command").collect();
                if commands.is_empty() {
                    return Err(ApiError::bad_request(
                        "you must specify at least one command for the container",
                    ));
                }
                for command in commands {
                    params.append_pair("command", command);
                }
            }
            format!(
                "/{}/{}/{}/{}",
                sub.name(),
                enc(meta::namespace(pod)),
                enc(meta::name(pod)),
                enc(&container)
            )
        }
    };
    let query = params.finish();
    Ok(if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    })
}

/// Upstream's log options, checked as upstream checks them and passed on to the agent.
fn log_query(call: &Call<'_>) -> ApiResult<String> {
    let mut out = Vec::new();
    let int = |name: &str, min: i64| -> ApiResult<Option<i64>> {
        match call.query.get(name) {
            None => Ok(None),
            Some(text) => match text.parse::<i64>() {
                Ok(n) if n >= min => Ok(Some(n)),
                _ => Err(ApiError::bad_request(format!(
                    "{name}: Invalid value: {text:?}: must be an integer of at least {min}"
                ))),
            },
        }
    };
    let boolean = |name: &str| -> ApiResult<bool> {
        match call.query.get(name) {
            None | Some("false") | Some("0") => Ok(false),
            Some("") | Some("true") | Some("1") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "{name}: Invalid value: {other:?}: must be a boolean"
            ))),
        }
    };
    for flag in ["follow", "previous", "timestamps"] {
        if boolean(flag)? {
            out.push(format!("{flag}=true"));
        }
    }
    let since_seconds = int("sinceSeconds", 1)?;
    let since_time = call.query.get("sinceTime").filter(|t| !t.is_empty());
    if since_seconds.is_some() && since_time.is_some() {
        return Err(ApiError::bad_request(
            "at most one of sinceTime or sinceSeconds may be specified",
        ));
    }
    if let Some(n) = since_seconds {
        out.push(format!("sinceSeconds={n}"));
    }
    if let Some(t) = since_time {
        if chrono::DateTime::parse_from_rfc3339(t).is_err() {
            return Err(ApiError::bad_request(format!(
                "sinceTime: Invalid value: {t:?}: must be an RFC 3339 time"
            )));
        }
        out.push(format!("sinceTime={}", enc(t)));
    }
    if let Some(n) = int("tailLines", 0)? {
        out.push(format!("tailLines={n}"));
    }
    if let Some(n) = int("limitBytes", 1)? {
        out.push(format!("limitBytes={n}"));
    }
    Ok(if out.is_empty() {
        String::new()
    } else {
        format!("?{}", out.join("&"))
    })
}

/// Percent-encodes a path segment or query value: everything but unreserved characters.
fn enc(text: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, RESERVED).to_string()
}

/// The Node a pod runs on, read as the API server itself (not with the requester's scope:
/// a tenant may read its pod's logs without reading the node).
async fn node_object(call: &Call<'_>, name: &str) -> ApiResult<Option<Value>> {
    let Some(def) = call.ctx.registry.get("", "v1", "nodes") else {
        return Ok(None);
    };
    let key = def.key("", name);
    if let Some(obj) = call.ctx.cache(def).get(&crate::cache::cache_key(def, &key)) {
        return Ok(Some(obj.value()));
    }
    Ok(call.ctx.read_stored(def, &key).await?.map(|(v, _)| v))
}

/// The agent's log stream, passed through as upstream's `text/plain` until either side
/// ends or the server shuts down.
fn stream_logs(
    mut body: hyper::body::Incoming,
    shutdown: tokio_util::sync::CancellationToken,
) -> Response<Body> {
    use http_body_util::{BodyExt, StreamBody};
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tx.closed() => break,
                frame = body.frame() => frame,
            };
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && tx.send(data).await.is_err()
                    {
                        break;
                    }
                }
                _ => break,
            }
        }
    });
    let stream = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |b| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    response
}

/// `serviceaccounts/<name>/token`: issues a token for the service account, bound to a pod
/// when the request names one (upstream's TokenRequest REST).
pub(super) async fn token(
    call: &Call<'_>,
    body: hyper::body::Incoming,
) -> ApiResult<Response<Body>> {
    use crate::serviceaccount::{
        Claims, DEFAULT_EXPIRATION_SECONDS, KubernetesClaims, MIN_EXPIRATION_SECONDS, ObjectRef,
    };
    let def = call.req.def;
    let name = call.name();
    let namespace = call.req.namespace.clone().unwrap_or_default();
    let output = call.output()?;
    let Some(signer) = call.ctx.service_accounts.clone() else {
        return Err(ApiError::new(
            503,
            "ServiceUnavailable",
            "this server issues no service-account tokens",
        ));
    };
    let request = request_object(call, body, "TokenRequest").await?;
    let invalid = |causes: Vec<Cause>| {
        ApiError::invalid("authentication.k8s.io", "TokenRequest", name, causes)
    };
    let spec = meta::path(&request, "spec").cloned().unwrap_or(json!({}));
    let expiration = match spec.get("expirationSeconds") {
        None | Some(Value::Null) => DEFAULT_EXPIRATION_SECONDS,
        Some(v) => v.as_i64().ok_or_else(|| {
            invalid(vec![Cause::invalid(
                "spec.expirationSeconds",
                v,
                "must be an integer",
            )])
        })?,
    };
    if expiration < MIN_EXPIRATION_SECONDS {
        return Err(invalid(vec![Cause::invalid(
            "spec.expirationSeconds",
            &json!(expiration),
            "may not specify a duration less than 10 minutes",
        )]));
    }
    if expiration >= 1 << 32 {
        return Err(invalid(vec![Cause::invalid(
            "spec.expirationSeconds",
            &json!(expiration),
            "may not specify a duration larger than 2^32 seconds",
        )]));
    }
    let mut audiences: Vec<String> = Vec::new();
    for (i, audience) in spec
        .get("audiences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        match audience.as_str() {
            Some(a) if !a.is_empty() => audiences.push(a.to_string()),
            _ => {
                return Err(invalid(vec![Cause::invalid(
                    format!("spec.audiences[{i}]"),
                    audience,
                    "must be a non-empty string",
                )]));
            }
        }
    }
    if audiences.is_empty() {
        audiences = signer.audiences().to_vec();
    }

    let Some((account, _)) = current(call, def, &call.key()).await? else {
        return Err(ApiError::not_found(target(def, name)));
    };
    if meta::is_deleting(&account) {
        return Err(ApiError::forbidden(
            target(def, name),
            "the service account is being deleted",
        ));
    }
    let mut pod_ref = None;
    let mut node_ref = None;
    let bound = spec.get("boundObjectRef").filter(|b| !b.is_null());
    if let Some(bound) = bound {
        let kind = bound.get("kind").and_then(Value::as_str).unwrap_or("");
        if kind != "Pod" {
            return Err(invalid(vec![Cause::not_supported(
                "spec.boundObjectRef.kind",
                &json!(kind),
                &["Pod"],
            )]));
        }
        let pod_name = bound.get("name").and_then(Value::as_str).unwrap_or("");
        let Some(pod) =
            crate::serviceaccount::lookup(call.ctx, "pods", &namespace, pod_name).await?
        else {
            return Err(ApiError::not_found(canopy_api::Target {
                group: "",
                resource: "pods",
                name: pod_name,
            }));
        };
        let wanted_uid = bound.get("uid").and_then(Value::as_str).unwrap_or("");
        if !wanted_uid.is_empty() && wanted_uid != meta::uid(&pod) {
            return Err(ApiError::conflict(
                target(def, name),
                &format!(
                    "the UID in the bound object reference ({wanted_uid}) does not match the UID in record. The object might have been deleted and then recreated"
                ),
            ));
        }
        let account_of_pod = meta::path_str(&pod, "spec.serviceAccountName")
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        if account_of_pod != name {
            return Err(ApiError::bad_request(format!(
                "cannot bind token for serviceaccount {name:?} to pod running with different serviceaccount name."
            )));
        }
        let node = meta::path_str(&pod, "spec.nodeName")
            .unwrap_or("")
            .to_string();
        if !node.is_empty() {
            let uid = crate::serviceaccount::lookup(call.ctx, "nodes", "", &node)
                .await?
                .map(|n| meta::uid(&n).to_string())
                .unwrap_or_default();
            node_ref = Some(ObjectRef { name: node, uid });
        }
        pod_ref = Some(ObjectRef {
            name: pod_name.to_string(),
            uid: meta::uid(&pod).to_string(),
        });
    }
    // Upstream's NodeRestriction: a node asks only for tokens bound to pods it runs.
    if let crate::authz::Principal::Node(node) = &call.access.principal
        && node_ref.as_ref().map(|n| n.name.as_str()) != Some(node.as_str())
    {
        return Err(ApiError::forbidden(
            target(def, name),
            format!("node {node:?} may only request tokens bound to a pod bound to it"),
        ));
    }

    let now = chrono::Utc::now();
    let issued = now.timestamp();
    let claims = Claims {
        iss: signer.issuer().to_string(),
        sub: format!("{}{namespace}:{name}", crate::serviceaccount::USER_PREFIX),
        aud: audiences.clone(),
        exp: issued + expiration,
        iat: issued,
        nbf: issued,
        jti: uuid::Uuid::new_v4().to_string(),
        kubernetes: KubernetesClaims {
            namespace: namespace.clone(),
            serviceaccount: ObjectRef {
                name: name.to_string(),
                uid: meta::uid(&account).to_string(),
            },
            pod: pod_ref,
            node: node_ref,
        },
    };
    let token = signer
        .sign(&claims)
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    // The credential id goes to the log; the token never does.
    tracing::info!(
        serviceaccount = %format!("{namespace}/{name}"),
        user = %call.user.name,
        credential_id = %claims.jti,
        expiration_seconds = expiration,
        "issued a service-account token"
    );
    let expires = now + chrono::Duration::seconds(expiration);
    let mut spec_out = json!({"audiences": audiences, "expirationSeconds": expiration});
    if let Some(bound) = bound {
        spec_out["boundObjectRef"] = bound.clone();
    }
    let response = json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "creationTimestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        },
        "spec": spec_out,
        "status": {
            "token": token,
            "expirationTimestamp": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        },
    });
    Ok(object_response(StatusCode::CREATED, output, &response))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending_pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "acme", "uid": "u1",
                "labels": {"app": "web"}, "annotations": {"a": "1"},
                "managedFields": [{"manager": "kubectl", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:containers": {}}}}]},
            "spec": {"containers": [{"name": "app", "image": "busybox",
                "resources": {"requests": {"cpu": "100m"}}}],
                "schedulerName": "default-scheduler", "priority": 0},
            "status": {"phase": "Pending", "qosClass": "Burstable", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/3 nodes are available", "lastProbeTime": null,
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
        })
    }

    #[test]
    fn binding_changes_the_stored_json_as_decoding_the_pod_would() {
        let pod = pending_pod();
        let mut annotations = serde_json::Map::new();
        annotations.insert("b".into(), json!("2"));
        let bound = bound_json(&serde_json::to_vec(&pod).unwrap(), "n1", &annotations).unwrap();
        let got: Value = serde_json::from_slice(&bound).unwrap();

        let mut expected = pod.clone();
        meta::set_path(&mut expected, "spec.nodeName", json!("n1"));
        expected["metadata"]["annotations"]["b"] = json!("2");
        let time = got["status"]["conditions"][0]["lastTransitionTime"].clone();
        assert_ne!(time, json!("2026-01-01T00:00:00Z"), "the status changed");
        expected["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "True",
            "lastProbeTime": null, "lastTransitionTime": time}]);
        assert_eq!(got, expected);
        // Byte for byte what encoding the decoded, changed pod gives.
        assert_eq!(bound, serde_json::to_vec(&expected).unwrap());
    }

    #[test]
    fn binding_adds_what_is_missing() {
        let pod = json!({"metadata": {"name": "web", "deletionTimestamp": null},
            "spec": {"nodeName": ""}});
        let bound = bound_json(pod.to_string().as_bytes(), "n2", &Default::default()).unwrap();
        let got: Value = serde_json::from_slice(&bound).unwrap();
        assert_eq!(got["spec"]["nodeName"], "n2");
        assert_eq!(got["status"]["conditions"][0]["type"], "PodScheduled");
        assert_eq!(got["status"]["conditions"][0]["status"], "True");
        assert!(got["metadata"].get("annotations").is_none());
        let no_metadata = bound_json(br#"{"metadata":null}"#, "n3", &Default::default()).unwrap();
        assert!(
            String::from_utf8(no_metadata)
                .unwrap()
                .contains(r#""nodeName":"n3""#)
        );
    }

    #[test]
    fn binding_refuses_bound_deleting_and_malformed_pods() {
        let mut pod = pending_pod();
        meta::set_path(&mut pod, "spec.nodeName", json!("n1"));
        let refuse =
            |pod: &Value| bound_json(pod.to_string().as_bytes(), "n2", &Default::default());
        assert_eq!(refuse(&pod), Err(BindRefusal::Assigned("n1".into())));
        let mut deleting = pending_pod();
        meta::set_meta(
            &mut deleting,
            "deletionTimestamp",
            json!("2026-01-01T00:00:00Z"),
        );
        assert_eq!(refuse(&deleting), Err(BindRefusal::Deleting));
        assert!(matches!(
            bound_json(b"[1]", "n2", &Default::default()),
            Err(BindRefusal::Malformed(_))
        ));
        assert!(matches!(
            refuse(&json!({"spec": {"nodeName": 7}})),
            Err(BindRefusal::Malformed(_))
        ));
    }
}
