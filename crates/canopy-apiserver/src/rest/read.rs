//! GET, LIST and WATCH, served from the watch cache with upstream's resourceVersion
//! semantics.

use std::{convert::Infallible, sync::Arc, time::Duration};

use base64::Engine;
use bytes::Bytes;
use canopy_api::{
    ApiError, ApiResult, Cause, ResourceDef, meta,
    selector::{FieldSelector, LabelSelector},
    table,
};
use canopy_store::{RangeRequest, Revision};
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Body, Call, Context, cache_error, json_response, object_response, parse_rv, target};
use crate::{
    cache::{CacheError, CachedObject, EventType, Filter, ListPage, WatchCache, WatchItem, frame},
    request::Output,
};

/// Whether a Table row carries the whole object, its metadata, or nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Include {
    None,
    Metadata,
    Object,
}

fn include(call: &Call<'_>) -> ApiResult<Include> {
    match call.query.get("includeObject") {
        None | Some("") | Some("Metadata") => Ok(Include::Metadata),
        Some("Object") => Ok(Include::Object),
        Some("None") => Ok(Include::None),
        Some(other) => Err(ApiError::bad_request(format!(
            "invalid includeObject {other:?}: must be None, Metadata or Object"
        ))),
    }
}

/// The selection a list or watch asks for.
pub(super) fn filter(call: &Call<'_>) -> ApiResult<Filter> {
    let def = call.req.def;
    let labels = match call.query.get("labelSelector") {
        Some(text) => LabelSelector::parse(text)
            .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?,
        None => LabelSelector::default(),
    };
    let fields = match call.query.get("fieldSelector") {
        Some(text) => FieldSelector::parse(text)
            .map_err(|e| ApiError::bad_request(format!("invalid field selector: {e}")))?,
        None => FieldSelector::default(),
    };
    for field in fields.fields() {
        let supported = field == "metadata.name"
            || field == "metadata.namespace"
            || def.field_selectors.contains(&field);
        if !supported {
            return Err(ApiError::bad_request(format!(
                "field label not supported: {field}"
            )));
        }
    }
    // The requester's scope narrows what they select: a tenant lists its own objects.
    let scope = &call.access.scope;
    Ok(Filter {
        namespace: call.req.namespace.clone(),
        labels: labels.and(&scope.labels),
        fields: fields.and(&scope.fields),
    })
}

/// `metadata` without `managedFields`, as PartialObjectMetadata in Table rows.
fn partial_metadata(obj: &Value) -> Value {
    let mut m = meta::metadata(obj).cloned().unwrap_or_default();
    m.remove("managedFields");
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": m})
}

fn table_row(
    def: &ResourceDef,
    obj: &Value,
    include: Include,
    now: chrono::DateTime<chrono::Utc>,
) -> Value {
    let mut row = json!({"cells": table::cells(def, obj, now)});
    match include {
        Include::None => {}
        Include::Metadata => row["object"] = partial_metadata(obj),
        Include::Object => row["object"] = obj.clone(),
    }
    row
}

fn table(
    def: &ResourceDef,
    objects: &[Value],
    include: Include,
    list_meta: Value,
    headers: bool,
) -> Value {
    let now = chrono::Utc::now();
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "rows": objects.iter().map(|o| table_row(def, o, include, now)).collect::<Vec<_>>(),
    });
    if headers {
        t["columnDefinitions"] = table::column_definitions(def);
    }
    t
}

pub(super) async fn get(call: &Call<'_>) -> ApiResult<Response<Body>> {
    let def = call.req.def;
    let output = call.output()?;
    let key = call.key();
    // Upstream serves an unversioned GET from the store (a quorum read) and a versioned one
    // from the watch cache.
    let obj = match call.query.get("resourceVersion").filter(|v| !v.is_empty()) {
        None => call.ctx.read_stored(def, &key).await?.map(|(v, _)| v),
        Some(rv) => {
            let rv = parse_rv(rv)?;
            let cache = call.ctx.cache(def);
            match cache.wait_for(rv, call.ctx.options.cache_wait).await {
                Ok(()) => {
                    own_writes(call.ctx, cache).await?;
                    cache
                        .get(&crate::cache::cache_key(def, &key))
                        .map(|o| o.value())
                }
                // The cache cannot show it reached `rv`; the store has.
                Err(CacheError::TooNew { .. }) => {
                    call.ctx.read_stored(def, &key).await?.map(|(v, _)| v)
                }
                Err(err) => return Err(cache_error(err)),
            }
        }
    };
    let obj = obj.ok_or_else(|| ApiError::not_found(target(def, call.name())))?;
    call.check_scope(&obj)?;
    Ok(match output {
        Output::Table => {
            let include = include(call)?;
            let rv = meta::resource_version(&obj).to_string();
            object_response(
                StatusCode::OK,
                Output::Json,
                &table(def, &[obj], include, json!({"resourceVersion": rv}), true),
            )
        }
        Output::Metadata => object_response(StatusCode::OK, Output::Json, &partial_metadata(&obj)),
        _ => object_response(StatusCode::OK, output, &obj),
    })
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    v: String,
    rv: Revision,
    start: String,
}

fn encode_continue(rv: Revision, start: &str) -> String {
    let token = ContinueToken {
        v: "meta.k8s.io/v1".into(),
        rv,
        start: start.to_string(),
    };
    base64::engine::general_purpose::URL_SAFE.encode(serde_json::to_vec(&token).unwrap_or_default())
}

fn decode_continue(text: &str) -> ApiResult<(Revision, String)> {
    let bad = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let bytes = base64::engine::general_purpose::URL_SAFE
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(text))
        .map_err(|_| bad("incorrect encoded start resourceVersion (version meta.k8s.io/v1)"))?;
    let token: ContinueToken =
        serde_json::from_slice(&bytes).map_err(|_| bad("malformed token"))?;
    if token.v != "meta.k8s.io/v1" {
        return Err(bad("unknown version"));
    }
    if token.start.is_empty() || token.start.contains("..") {
        return Err(bad("invalid start key"));
    }
    Ok((token.rv, token.start))
}

fn list_invalid(causes: Vec<Cause>) -> ApiError {
    ApiError::invalid("meta.k8s.io", "ListOptions", "", causes)
}

pub(super) async fn list(call: &Call<'_>) -> ApiResult<Response<Body>> {
    let def = call.req.def;
    let ctx = call.ctx;
    let filter = filter(call)?;
    let output = call.output()?;
    let limit = call.query.int("limit")?.unwrap_or(0).max(0) as usize;
    let cont = call.query.get("continue").filter(|c| !c.is_empty());
    let rv = call.query.get("resourceVersion").filter(|v| !v.is_empty());
    let rvm = call
        .query
        .get("resourceVersionMatch")
        .filter(|v| !v.is_empty());
    if cont.is_some() && rv.is_some() && rv != Some("0") {
        return Err(ApiError::bad_request(
            "specifying resource version is not allowed when using continue",
        ));
    }
    if call
        .query
        .get("sendInitialEvents")
        .is_some_and(|v| !v.is_empty())
    {
        return Err(list_invalid(vec![Cause::forbidden(
            "sendInitialEvents",
            "sendInitialEvents is forbidden for list",
        )]));
    }
    if rvm.is_some() && rv.is_none() {
        return Err(list_invalid(vec![Cause::forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch is forbidden unless resourceVersion is provided",
        )]));
    }
    let cache = ctx.cache(def);
    let page = if let Some(token) = cont {
        let (at, start) = decode_continue(token)?;
        if at < 0 {
            cache
                .list(&filter, limit, Some(&start), None)
                .map_err(cache_error)?
        } else {
            match cache.list(&filter, limit, Some(&start), Some(at)) {
                Ok(page) => page,
                Err(CacheError::TooOld { .. }) => {
                    match store_list(ctx, def, &filter, limit, Some(&start), Some(at)).await {
                        Ok(page) => page,
                        Err(err) if err.code == 410 => {
                            let mut expired = ApiError::expired(
                                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                            );
                            expired.continue_token = Some(encode_continue(-1, &start));
                            return Err(expired);
                        }
                        Err(err) => return Err(err),
                    }
                }
                Err(err) => return Err(cache_error(err)),
            }
        }
    } else {
        // A paginated list at a given version, without a match rule, is an exact read
        // (upstream's legacy rule for resourceVersion with limit).
        let rvm = match (rv, rvm) {
            (Some(v), None) if v != "0" && limit > 0 => Some("Exact"),
            (_, rvm) => rvm,
        };
        match (rv, rvm) {
            (None, _) => consistent_list(ctx, cache, &filter, limit).await?,
            (Some(rv), None | Some("NotOlderThan")) => {
                let rv = parse_rv(rv)?;
                match cache.wait_for(rv, ctx.options.cache_wait).await {
                    Ok(()) => {
                        own_writes(ctx, cache).await?;
                        cache
                            .list(&filter, limit, None, None)
                            .map_err(cache_error)?
                    }
                    // The cache cannot show it reached `rv` (an idle resource on a store
                    // without ordered progress): a consistent store read is at least as new.
                    Err(CacheError::TooNew { requested, .. }) => {
                        let current = ctx
                            .timed("current_revision", def, ctx.store.current_revision())
                            .await?;
                        if requested > current {
                            return Err(ApiError::timeout(format!(
                                "Timeout: Too large resource version: {requested}, current: {current}"
                            )));
                        }
                        store_list(ctx, def, &filter, limit, None, None).await?
                    }
                    Err(err) => return Err(cache_error(err)),
                }
            }
            (Some(rv), Some("Exact")) => {
                let rv = parse_rv(rv)?;
                if rv == 0 {
                    return Err(list_invalid(vec![Cause::forbidden(
                        "resourceVersionMatch",
                        "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                    )]));
                }
                if rv == cache.revision() {
                    cache
                        .list(&filter, limit, None, None)
                        .map_err(cache_error)?
                } else {
                    store_list(ctx, def, &filter, limit, None, Some(rv)).await?
                }
            }
            (Some(_), Some(other)) => {
                return Err(list_invalid(vec![Cause::not_supported(
                    "resourceVersionMatch",
                    &Value::String(other.to_string()),
                    &["Exact", "NotOlderThan", ""],
                )]));
            }
        }
    };
    render_list(call, output, page)
}

/// A list consistent with the store's current state: from the cache once it has caught up,
/// else (store without ordered progress, or the cache lagging) from the store.
async fn consistent_list(
    ctx: &Context,
    cache: &Arc<WatchCache>,
    filter: &Filter,
    limit: usize,
) -> ApiResult<ListPage> {
    let def = cache.def();
    if ctx.options.consistent_reads_from_cache {
        let current = ctx
            .timed("current_revision", def, ctx.store.current_revision())
            .await?;
        match cache.wait_for(current, ctx.options.cache_wait).await {
            Ok(()) => return cache.list(filter, limit, None, None).map_err(cache_error),
            Err(CacheError::NotReady(_)) => {}
            Err(err) => {
                tracing::warn!(resource = def.plural, error = %err, "watch cache not fresh in time; reading from the store");
            }
        }
        ctx.metrics
            .cache_fallbacks
            .get_or_create(&crate::metrics::ResourceLabels {
                resource: def.plural.to_string(),
            })
            .inc();
    }
    store_list(ctx, def, filter, limit, None, None).await
}

/// Lists from the store, filtering as it goes, paging the store until the page is full.
async fn store_list(
    ctx: &Context,
    def: &'static ResourceDef,
    filter: &Filter,
    limit: usize,
    start_after: Option<&str>,
    at: Option<Revision>,
) -> ApiResult<ListPage> {
    let prefix = def.namespace_prefix(filter.namespace.as_deref());
    let mut after = start_after.map(|k| format!("{}{k}", def.key_prefix()));
    let mut items: Vec<Arc<CachedObject>> = Vec::new();
    let mut revision = at;
    let chunk = if limit > 0 { (limit + 1).max(100) } else { 0 };
    loop {
        let page = ctx
            .timed(
                "range",
                def,
                ctx.store.range(RangeRequest {
                    prefix: prefix.clone(),
                    start_after: after.clone(),
                    limit: chunk,
                    revision,
                }),
            )
            .await?;
        // Later pages must read the same revision as the first.
        revision = Some(page.revision);
        for kv in &page.kvs {
            let obj =
                Arc::new(CachedObject::from_stored(def, kv, None).map_err(ApiError::internal)?);
            if filter.matches(def, &obj) {
                if limit > 0 && items.len() == limit {
                    let last = items.last().map(|o| o.key.clone());
                    // Unfiltered, every key of the range is an item: the rest are remaining.
                    let unfiltered = filter.labels.is_empty() && filter.fields.is_empty();
                    let returned_from_page = page
                        .kvs
                        .iter()
                        .position(|kv| kv.key == def.key(obj.namespace(), obj.name()))
                        .unwrap_or(page.kvs.len());
                    return Ok(ListPage {
                        items,
                        revision: page.revision,
                        more_after: last,
                        remaining: unfiltered
                            .then(|| page.count.saturating_sub(returned_from_page)),
                    });
                }
                items.push(obj);
            }
        }
        after = page.kvs.last().map(|kv| kv.key.clone());
        if !page.more || after.is_none() {
            return Ok(ListPage {
                items,
                revision: page.revision,
                more_after: None,
                remaining: None,
            });
        }
    }
}

fn render_list(call: &Call<'_>, output: Output, page: ListPage) -> ApiResult<Response<Body>> {
    let def = call.req.def;
    let mut list_meta = json!({"resourceVersion": page.revision.to_string()});
    if let Some(after) = &page.more_after {
        list_meta["continue"] = json!(encode_continue(page.revision, after));
        if let Some(remaining) = page.remaining {
            list_meta["remainingItemCount"] = json!(remaining);
        }
    }
    match output {
        Output::Json => {
            let mut out = Vec::with_capacity(
                page.items.iter().map(|o| o.json_len() + 1).sum::<usize>() + 256,
            );
            out.extend_from_slice(b"{\"kind\":\"");
            out.extend_from_slice(def.list_kind().as_bytes());
            out.extend_from_slice(b"\",\"apiVersion\":\"");
            out.extend_from_slice(def.api_version().as_bytes());
            out.extend_from_slice(b"\",\"metadata\":");
            out.extend_from_slice(&serde_json::to_vec(&list_meta).unwrap_or_default());
            out.extend_from_slice(b",\"items\":[");
            for (i, obj) in page.items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                obj.append_json(&mut out);
            }
            out.extend_from_slice(b"]}");
            Ok(json_response(StatusCode::OK, Bytes::from(out)))
        }
        Output::Yaml => {
            let items: Vec<Value> = page.items.iter().map(|o| o.value()).collect();
            let list = json!({"kind": def.list_kind(), "apiVersion": def.api_version(), "metadata": list_meta, "items": items});
            Ok(object_response(StatusCode::OK, Output::Yaml, &list))
        }
        Output::Table => {
            let include = include(call)?;
            let items: Vec<Value> = page.items.iter().map(|o| o.value()).collect();
            Ok(object_response(
                StatusCode::OK,
                Output::Json,
                &table(def, &items, include, list_meta, true),
            ))
        }
        Output::Metadata => {
            let items: Vec<Value> = page
                .items
                .iter()
                .map(|o| partial_metadata(&o.value()))
                .collect();
            let list = json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta, "items": items});
            Ok(object_response(StatusCode::OK, Output::Json, &list))
        }
    }
}

/// How a watch presents objects.
#[derive(Clone, Copy)]
struct Presentation {
    output: Output,
    include: Include,
}

impl Presentation {
    /// The frame of an event for this watcher.
    fn frame(&self, def: &ResourceDef, seen: EventType, object: &[u8], first: &mut bool) -> Bytes {
        match self.output {
            Output::Json | Output::Yaml => frame(seen, object),
            Output::Table => {
                let obj: Value = serde_json::from_slice(object).unwrap_or(Value::Null);
                let rv = meta::resource_version(&obj).to_string();
                let t = table(
                    def,
                    &[obj],
                    self.include,
                    json!({"resourceVersion": rv}),
                    *first,
                );
                *first = false;
                frame(seen, &serde_json::to_vec(&t).unwrap_or_default())
            }
            Output::Metadata => {
                let obj: Value = serde_json::from_slice(object).unwrap_or(Value::Null);
                frame(
                    seen,
                    &serde_json::to_vec(&partial_metadata(&obj)).unwrap_or_default(),
                )
            }
        }
    }
}

fn bookmark(def: &ResourceDef, output: Output, revision: Revision, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let object = match output {
        Output::Metadata => {
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": metadata})
        }
        _ => json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": metadata}),
    };
    let mut out = Vec::new();
    out.extend_from_slice(b"{\"type\":\"BOOKMARK\",\"object\":");
    out.extend_from_slice(&serde_json::to_vec(&object).unwrap_or_default());
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

fn error_frame(err: &ApiError) -> Bytes {
    let mut out = Vec::new();
    out.extend_from_slice(b"{\"type\":\"ERROR\",\"object\":");
    out.extend_from_slice(&serde_json::to_vec(&err.to_status()).unwrap_or_default());
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

fn streaming_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    use futures::StreamExt;
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

pub(super) async fn watch(call: &Call<'_>) -> ApiResult<Response<Body>> {
    let def = call.req.def;
    let ctx = call.ctx;
    let filter = Arc::new(filter(call)?);
    let output = call.output()?;
    let presentation = Presentation {
        output,
        include: include(call)?,
    };
    let rv = call.query.get("resourceVersion").filter(|v| !v.is_empty());
    let rvm = call
        .query
        .get("resourceVersionMatch")
        .filter(|v| !v.is_empty());
    let send_initial = call.query.bool("sendInitialEvents")?;
    let bookmarks = call.query.flag("allowWatchBookmarks");
    if send_initial.is_some() && rvm != Some("NotOlderThan") {
        return Err(list_invalid(vec![Cause::forbidden(
            "sendInitialEvents",
            "sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan",
        )]));
    }
    if send_initial == Some(true) && !bookmarks {
        return Err(list_invalid(vec![Cause::forbidden(
            "allowWatchBookmarks",
            "allowWatchBookmarks must be true when sendInitialEvents is true",
        )]));
    }
    if rvm.is_some() && send_initial.is_none() {
        return Err(list_invalid(vec![Cause::forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        )]));
    }
    let timeout = match call.query.int("timeoutSeconds")? {
        Some(secs) if secs > 0 => Duration::from_secs(secs as u64),
        _ => {
            let min = ctx.options.min_request_timeout;
            min + min.mul_f64(rand::random::<f64>())
        }
    };
    let cache = ctx.cache(def).clone();
    // Where the stream starts, and whether it opens with the current state.
    let start = match (send_initial, rv) {
        (initial, None) => Start::Consistent(initial.unwrap_or(true)),
        (Some(initial), Some(rv)) => match parse_rv(rv)? {
            0 => Start::Any(initial),
            rv => Start::AtLeast(rv, initial),
        },
        (None, Some("0")) => Start::Any(true),
        (None, Some(rv)) => Start::After(parse_rv(rv)?),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let subscription = match start {
        Start::Consistent(initial) if ctx.options.consistent_reads_from_cache => {
            wait_consistent(ctx, &cache).await?;
            cache.subscribe(filter.clone(), initial, cache.revision())
        }
        Start::Consistent(initial) => from_store(ctx, &cache, &filter, initial).await,
        Start::AtLeast(rv, initial) => match cache.wait_for(rv, ctx.options.cache_wait).await {
            Ok(()) => {
                own_writes(ctx, &cache).await?;
                cache.subscribe(filter.clone(), initial, cache.revision())
            }
            // The cache cannot show it has reached `rv`; a consistent read has.
            Err(CacheError::TooNew { .. }) => from_store(ctx, &cache, &filter, initial).await,
            Err(err) => return Err(cache_error(err)),
        },
        Start::Any(initial) => {
            own_writes(ctx, &cache).await?;
            cache.subscribe(filter.clone(), initial, cache.revision())
        }
        Start::After(rv) => {
            // Events after `rv` flow from the cache whether or not it has reached `rv` yet;
            // only a revision the store has not reached is refused, as upstream does.
            if rv > cache.revision() {
                let current = ctx
                    .timed("current_revision", def, ctx.store.current_revision())
                    .await?;
                if rv > current {
                    return Err(ApiError::timeout(format!(
                        "Timeout: Too large resource version: {rv}, current: {current}"
                    )));
                }
            }
            cache.subscribe(filter.clone(), false, rv)
        }
    };
    let subscription = match subscription {
        Ok(sub) => sub,
        Err(CacheError::TooOld { requested, oldest }) => {
            // Upstream reports an expired start point as an ERROR event in a 200 stream.
            let err =
                ApiError::expired(format!("too old resource version: {requested} ({oldest})"));
            let _ = tx.send(error_frame(&err)).await;
            return Ok(streaming_response(rx));
        }
        Err(err) => return Err(cache_error(err)),
    };
    let initial_end = send_initial == Some(true);
    let metrics = ctx.metrics.clone();
    let shutdown = ctx.shutdown.clone();
    tokio::spawn(async move {
        let frames = watch_frames(
            def,
            cache,
            subscription,
            filter,
            presentation,
            bookmarks,
            initial_end,
            timeout,
            tx,
            metrics,
        );
        tokio::select! {
            _ = frames => {}
            _ = shutdown.cancelled() => {}
        }
    });
    Ok(streaming_response(rx))
}

/// Reads at "any" resourceVersion still see what this server acknowledged.
async fn own_writes(ctx: &Context, cache: &Arc<WatchCache>) -> ApiResult<()> {
    match cache.wait_for_own_writes(ctx.options.cache_wait).await {
        Ok(()) | Err(CacheError::TooNew { .. }) => Ok(()),
        Err(err) => Err(cache_error(err)),
    }
}

/// Where a watch starts.
enum Start {
    /// At the store's current state (`resourceVersion` unset), with or without it first.
    Consistent(bool),
    /// At a state no older than a revision, with or without it first.
    AtLeast(Revision, bool),
    /// At any state the cache has, with or without it first.
    Any(bool),
    /// After a revision, without initial state.
    After(Revision),
}

/// A subscription whose initial state comes from a consistent store read and whose events
/// come from the cache after that read's revision.
async fn from_store(
    ctx: &Context,
    cache: &Arc<WatchCache>,
    filter: &Arc<Filter>,
    initial: bool,
) -> Result<crate::cache::Subscription, CacheError> {
    let page = match store_list(ctx, cache.def(), filter, 0, None, None).await {
        Ok(page) => page,
        Err(_) => return Err(CacheError::NotReady(cache.def().plural)),
    };
    let mut sub = cache.subscribe(filter.clone(), false, page.revision)?;
    if initial {
        sub.initial = page.items;
    }
    Ok(sub)
}

async fn wait_consistent(ctx: &Context, cache: &Arc<WatchCache>) -> ApiResult<()> {
    let current = ctx
        .timed(
            "current_revision",
            cache.def(),
            ctx.store.current_revision(),
        )
        .await?;
    match cache.wait_for(current, ctx.options.cache_wait).await {
        Ok(()) => Ok(()),
        // The cache follows the store; it will deliver what it has not reached yet as
        // events, so a watch may start from where it is.
        Err(CacheError::TooNew { .. }) => Ok(()),
        Err(err) => Err(cache_error(err)),
    }
}

/// How many bytes of queued watch events go out as one frame at most.
const WATCH_BATCH_BYTES: usize = 64 << 10;

/// The frames of `first` and of the events queued behind it (up to about `limit` bytes) as
/// one frame, with how many events it holds: a burst (a scheduler's bindings, a rollout)
/// costs one chunk, one TLS record and one write instead of one per event. Events at or
/// before `sent` are skipped, and `sent` moves past the ones taken. None when nothing new
/// is queued.
fn take_queued(
    first: Option<WatchItem>,
    events: &mut mpsc::Receiver<WatchItem>,
    limit: usize,
    sent: &mut Revision,
    mut render: impl FnMut(&WatchItem) -> Bytes,
) -> Option<(Bytes, u64)> {
    let mut frames: Vec<Bytes> = Vec::new();
    let mut bytes = 0;
    let mut next = first.or_else(|| events.try_recv().ok());
    while let Some(item) = next.take() {
        if item.event.revision > *sent {
            let frame = render(&item);
            bytes += frame.len();
            frames.push(frame);
            *sent = item.event.revision;
        }
        if bytes < limit {
            next = events.try_recv().ok();
        }
    }
    let count = frames.len() as u64;
    let frame = match frames.len() {
        0 => return None,
        1 => frames.pop()?,
        _ => Bytes::from(frames.concat()),
    };
    Some((frame, count))
}

/// Writes a watch's frames until it times out, its client goes away or the cache drops it.
#[allow(clippy::too_many_arguments)]
async fn watch_frames(
    def: &'static ResourceDef,
    cache: Arc<WatchCache>,
    mut sub: crate::cache::Subscription,
    filter: Arc<Filter>,
    presentation: Presentation,
    bookmarks: bool,
    initial_end: bool,
    timeout: Duration,
    tx: mpsc::Sender<Bytes>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<(), ()> {
    let events_sent = metrics
        .watch_events
        .get_or_create(&crate::metrics::ResourceLabels {
            resource: def.plural.to_string(),
        })
        .clone();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut first = true;
    let mut last_sent = sub.revision;
    for obj in std::mem::take(&mut sub.initial) {
        let f = presentation.frame(def, EventType::Added, &obj.json(), &mut first);
        tx.send(f).await.map_err(|_| ())?;
        events_sent.inc();
    }
    if initial_end {
        tx.send(bookmark(def, presentation.output, sub.revision, true))
            .await
            .map_err(|_| ())?;
    }
    for event in std::mem::take(&mut sub.backlog) {
        if let Some(seen) = event.seen_by(def, &filter) {
            let f = presentation.frame(def, seen, &event.object_json(seen), &mut first);
            tx.send(f).await.map_err(|_| ())?;
            events_sent.inc();
            last_sent = event.revision;
        }
    }
    // Backlog events predate the subscription's revision: live events resume after both.
    last_sent = last_sent.max(sub.revision);
    let render = |item: &WatchItem, first: &mut bool| {
        // Plain JSON watchers share the frame the cache rendered once for the event.
        if presentation.output == Output::Json {
            return item.frame.clone();
        }
        presentation.frame(def, item.seen, &item.event.object_json(item.seen), first)
    };
    // Bookmarks every minute, and one shortly before the watch ends so that its client can
    // resume from a recent revision (upstream's cacheWatcher does the same).
    let period = Duration::from_secs(60);
    let now = tokio::time::Instant::now();
    let first_bookmark =
        (now + period).min(deadline.checked_sub(Duration::from_secs(2)).unwrap_or(now));
    let mut ticker = tokio::time::interval_at(first_bookmark.max(now), period);
    loop {
        tokio::select! {
            item = sub.events.recv() => {
                // None: the cache dropped this watcher (too slow) or was reset; ending the
                // stream makes the client re-establish it.
                let Some(item) = item else { return Ok(()) };
                if let Some((frame, count)) = take_queued(Some(item), &mut sub.events, WATCH_BATCH_BYTES, &mut last_sent, |i| render(i, &mut first)) {
                    tx.send(frame).await.map_err(|_| ())?;
                    events_sent.inc_by(count);
                }
            }
            _ = ticker.tick(), if bookmarks => {
                // Everything dispatched up to `revision` is already queued: drain it first.
                let revision = cache.revision();
                while let Some((frame, count)) = take_queued(None, &mut sub.events, WATCH_BATCH_BYTES, &mut last_sent, |i| render(i, &mut first)) {
                    tx.send(frame).await.map_err(|_| ())?;
                    events_sent.inc_by(count);
                }
                let revision = revision.max(last_sent);
                tx.send(bookmark(def, presentation.output, revision, false)).await.map_err(|_| ())?;
            }
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            _ = tx.closed() => return Err(()),
        }
    }
}
