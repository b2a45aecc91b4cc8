//! The generic REST layer: one implementation of every verb, driven by the resource's
//! [`ResourceDef`](canopy_api::ResourceDef) and the per-kind hooks of `canopy_api::kinds`.

mod read;
mod subresource;
mod tenancy;
mod write;

pub use tenancy::QuotaLocks;

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use canopy_api::{ApiError, ApiResult, Registry, ResourceDef, Subresource, Target, meta, status};
use canopy_store::{KeyValue, Revision, Store};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use serde_json::Value;

use crate::{
    cache::{CacheError, WatchCache},
    metrics::{Metrics, StoreLabels},
    request::{Output, Query, ResourceRequest, Verb, negotiate},
};

/// The response body type of every handler.
pub type Body = BoxBody<Bytes, Infallible>;

/// Tuning of the REST layer.
#[derive(Clone, Debug)]
pub struct RestOptions {
    /// Largest request body accepted (upstream: 3 MiB).
    pub max_body_bytes: usize,
    /// Watches last between this and twice this, unless the client asks for less.
    pub min_request_timeout: Duration,
    /// How long a read waits for the watch cache to reach a requested revision.
    pub cache_wait: Duration,
    /// Whether consistent lists may be served from the watch cache (needs a store whose
    /// progress notifications are ordered with its events).
    pub consistent_reads_from_cache: bool,
}

impl Default for RestOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: 3 * 1024 * 1024,
            min_request_timeout: Duration::from_secs(1800),
            cache_wait: Duration::from_secs(3),
            consistent_reads_from_cache: true,
        }
    }
}

/// Everything a request handler needs.
pub struct Context {
    /// The served resources.
    pub registry: Arc<Registry>,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The watch cache of every resource.
    pub caches: HashMap<(&'static str, &'static str), Arc<WatchCache>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Options.
    pub options: RestOptions,
    /// Cancelled when the server shuts down: long-running requests end.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Serializes quota checks per tenant.
    pub quota_locks: QuotaLocks,
    /// The API server's credential towards node agents (`pods/log`).
    pub nodes: Option<Arc<crate::nodeproxy::NodeClient>>,
    /// Hands out Services' ClusterIPs and node ports.
    pub services: Arc<crate::services::Allocator>,
    /// Signs service-account tokens (`serviceaccounts/token`).
    pub service_accounts: Option<Arc<crate::serviceaccount::TokenSigner>>,
}

impl Context {
    /// The watch cache of a resource.
    pub fn cache(&self, def: &ResourceDef) -> &Arc<WatchCache> {
        &self.caches[&(def.group, def.plural)]
    }

    /// Times a store operation.
    pub async fn timed<T>(
        &self,
        operation: &str,
        def: &ResourceDef,
        f: impl std::future::Future<Output = canopy_store::Result<T>>,
    ) -> ApiResult<T> {
        let started = std::time::Instant::now();
        let result = f.await;
        self.metrics
            .store_duration
            .get_or_create(&StoreLabels {
                operation: operation.to_string(),
                resource: def.plural.to_string(),
            })
            .observe(started.elapsed().as_secs_f64());
        result.map_err(store_error)
    }

    /// Who owns a namespace: the watch cache first, the store when the cache does not have
    /// it (a namespace just created through another server).
    pub async fn namespace_owner(
        &self,
        namespace: &str,
    ) -> ApiResult<crate::authz::NamespaceOwner> {
        use crate::authz::NamespaceOwner;
        let Some(def) = self.registry.get("", "v1", "namespaces") else {
            return Ok(NamespaceOwner::Missing);
        };
        use canopy_api::tenant::TENANT_LABEL;
        if let Some(obj) = self.cache(def).get(namespace) {
            return Ok(NamespaceOwner::from_label(obj.label(TENANT_LABEL)));
        }
        Ok(
            match self.read_stored(def, &def.key("", namespace)).await? {
                Some((obj, _)) => NamespaceOwner::from_label(meta::label(&obj, TENANT_LABEL)),
                None => NamespaceOwner::Missing,
            },
        )
    }

    /// The current stored state of an object, from the store.
    pub async fn read_stored(
        &self,
        def: &ResourceDef,
        key: &str,
    ) -> ApiResult<Option<(Value, KeyValue)>> {
        let (kv, _) = self.timed("get", def, self.store.get(key)).await?;
        match kv {
            Some(kv) => {
                let (value, _) = crate::cache::decode(def, &kv).map_err(ApiError::internal)?;
                Ok(Some((value, kv)))
            }
            None => Ok(None),
        }
    }
}

/// Maps a store error to an API error, keeping internals out of client messages.
pub fn store_error(err: canopy_store::Error) -> ApiError {
    use canopy_store::Error as E;
    match err {
        E::Compacted {
            requested,
            compacted,
        } => ApiError::expired(format!(
            "too old resource version: {requested} ({compacted})"
        )),
        E::FutureRevision(rev) => ApiError::timeout(format!("Too large resource version: {rev}")),
        E::TooLarge { limit, .. } => ApiError::too_large(limit),
        E::Unavailable(msg) => {
            tracing::warn!(error = %msg, "store unavailable");
            ApiError::unavailable("the storage backend is unavailable, please try again later")
        }
        other => {
            tracing::error!(error = %other, "store error");
            ApiError::internal("storage error")
        }
    }
}

/// Maps a watch cache error to an API error.
pub fn cache_error(err: CacheError) -> ApiError {
    match err {
        CacheError::TooOld { .. } => ApiError::gone(err.to_string()),
        CacheError::TooNew { .. } => ApiError::timeout(format!("Timeout: {err}")),
        CacheError::NotReady(_) => ApiError::unavailable(err.to_string()),
    }
}

/// A JSON response.
pub fn json_response(code: StatusCode, body: Bytes) -> Response<Body> {
    bytes_response(code, "application/json", body)
}

/// A response with a content type.
pub fn bytes_response(code: StatusCode, content_type: &str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body).boxed());
    *response.status_mut() = code;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    response
}

/// An object response in the representation the client accepts.
pub fn object_response(code: StatusCode, output: Output, obj: &Value) -> Response<Body> {
    match output {
        Output::Yaml => match serde_yaml::to_string(obj) {
            Ok(text) => bytes_response(code, "application/yaml", Bytes::from(text)),
            Err(_) => error_response(&ApiError::internal("encoding YAML")),
        },
        _ => json_response(
            code,
            Bytes::from(serde_json::to_vec(obj).unwrap_or_default()),
        ),
    }
}

/// The Status response of an error.
pub fn error_response(err: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(
        code,
        Bytes::from(serde_json::to_vec(&err.to_status()).unwrap_or_default()),
    );
    if let Some(secs) = err.retry_after_seconds {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// Adds `Warning: 299 - "..."` headers, as upstream reports dropped unknown fields.
pub fn add_warnings(response: &mut Response<Body>, warnings: &[String]) {
    for w in warnings.iter().take(50) {
        let text = format!("299 - {:?}", w);
        if let Ok(v) = HeaderValue::from_str(&text) {
            response.headers_mut().append(header::WARNING, v);
        }
    }
}

/// The error target of a request.
pub fn target<'a>(def: &'a ResourceDef, name: &'a str) -> Target<'a> {
    Target {
        group: def.group,
        resource: def.plural,
        name,
    }
}

/// Parses a resourceVersion parameter.
pub fn parse_rv(text: &str) -> ApiResult<Revision> {
    text.parse::<Revision>()
        .ok()
        .filter(|r| *r >= 0)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "invalid resource version {text:?}: must be a non-negative integer"
            ))
        })
}

/// The namespace a namespaced request acts in; None for cluster-scoped kinds.
fn request_namespace(req: &ResourceRequest) -> ApiResult<Option<&str>> {
    match (req.def.namespaced, &req.namespace) {
        (true, Some(ns)) => Ok(Some(ns.as_str())),
        (true, None) if matches!(req.verb, Verb::List | Verb::Watch) => Ok(None),
        (true, None) => Err(ApiError::no_route()),
        (false, _) => Ok(None),
    }
}

/// A resource request with its decoded query, headers and (unread) body.
pub struct Call<'a> {
    /// The context.
    pub ctx: &'a Context,
    /// What is asked for.
    pub req: &'a ResourceRequest,
    /// Query parameters.
    pub query: &'a Query,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// Who asks (for field manager names and logs).
    pub user: &'a crate::auth::User,
    /// What the requester may reach.
    pub access: &'a crate::authz::Access,
    /// The owner of the namespace in the URL.
    pub namespace_owner: &'a crate::authz::NamespaceOwner,
    /// The client connection's upgrade, taken by the stream subresources.
    pub upgrade: &'a parking_lot::Mutex<Option<hyper::upgrade::OnUpgrade>>,
}

impl Call<'_> {
    /// The representation the client accepts.
    pub fn output(&self) -> ApiResult<Output> {
        negotiate(
            self.headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok()),
        )
    }

    /// Checks that an object is inside the requester's scope.
    pub fn check_scope(&self, obj: &Value) -> ApiResult<()> {
        self.access.check(self.user, self.req, obj)
    }

    /// Checks that a cached object is inside the requester's scope.
    pub fn check_scope_cached(&self, obj: &crate::cache::CachedObject) -> ApiResult<()> {
        self.access.check_cached(self.user, self.req, obj)
    }

    /// The name from the URL (item requests only).
    pub fn name(&self) -> &str {
        self.req.name.as_deref().unwrap_or("")
    }

    /// The store key of the named object.
    pub fn key(&self) -> String {
        self.req
            .def
            .key(self.req.namespace.as_deref().unwrap_or(""), self.name())
    }

    /// The options kind upstream validates this request's query against.
    pub fn options_kind(&self) -> &'static str {
        match self.req.verb {
            Verb::Create => "CreateOptions",
            Verb::Update => "UpdateOptions",
            Verb::Patch => "PatchOptions",
            Verb::Delete | Verb::DeleteCollection => "DeleteOptions",
            _ => "ListOptions",
        }
    }

    /// A 422 for a bad query option, as upstream's option validation.
    pub fn invalid_option(&self, field: &str, value: &str, detail: &str) -> ApiError {
        ApiError::invalid(
            "meta.k8s.io",
            self.options_kind(),
            "",
            vec![canopy_api::Cause::invalid(
                field,
                &Value::String(value.to_string()),
                detail,
            )],
        )
    }

    /// `dryRun=All`.
    pub fn dry_run(&self) -> ApiResult<bool> {
        let mut dry = false;
        for v in self.query.all("dryRun") {
            match v {
                "All" => dry = true,
                "" => {}
                other => {
                    return Err(self.invalid_option("dryRun", other, "supported values: \"All\""));
                }
            }
        }
        Ok(dry)
    }

    /// The field manager: `fieldManager`, else the User-Agent's first word (upstream).
    pub fn field_manager(&self) -> ApiResult<String> {
        if let Some(manager) = self.query.get("fieldManager") {
            if manager.len() > 128 || manager.chars().any(|c| c.is_control()) {
                return Err(ApiError::invalid(
                    "",
                    "",
                    "",
                    vec![canopy_api::Cause::invalid(
                        "fieldManager",
                        &Value::String(manager.to_string()),
                        "must be no more than 128 printable characters",
                    )],
                ));
            }
            if !manager.is_empty() {
                return Ok(manager.to_string());
            }
        }
        let agent = self
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .filter(|s| !s.is_empty())
            .unwrap_or("unknown");
        Ok(agent.chars().take(128).collect())
    }
}

/// Serves one resource request.
pub async fn serve(call: &Call<'_>, body: hyper::body::Incoming) -> ApiResult<Response<Body>> {
    let req = call.req;
    request_namespace(req)?;
    if let Some(node) = &call.access.referenced_by_pods_of {
        check_node_reference(call, node)?;
    }
    match (req.subresource, req.verb) {
        (None, Verb::Get) => read::get(call).await,
        (None, Verb::List) => read::list(call).await,
        (None, Verb::Watch) => read::watch(call).await,
        (None, Verb::Create) => write::create(call, body).await,
        (None, Verb::Update) => write::update(call, body, None).await,
        (None, Verb::Patch) => write::patch(call, body, None).await,
        (None, Verb::Delete) => write::delete(call, body).await,
        (None, Verb::DeleteCollection) => write::delete_collection(call, body).await,
        (Some(Subresource::Status), Verb::Get) => read::get(call).await,
        (Some(sub @ (Subresource::Status | Subresource::Finalize)), Verb::Update) => {
            write::update(call, body, Some(sub)).await
        }
        (Some(Subresource::Status), Verb::Patch) => {
            write::patch(call, body, Some(Subresource::Status)).await
        }
        (Some(Subresource::Scale), Verb::Get) => subresource::get_scale(call).await,
        (Some(Subresource::Scale), Verb::Update | Verb::Patch) => {
            subresource::write_scale(call, body).await
        }
        (Some(Subresource::Binding), Verb::Create) => subresource::bind(call, body).await,
        (Some(Subresource::Token), Verb::Create) => subresource::token(call, body).await,
        (Some(Subresource::Log), Verb::Get) => subresource::log(call).await,
        (Some(sub), Verb::Get | Verb::Create) if sub.is_stream() => subresource::stream(call).await,
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// Upstream's node authorizer edge: a node reads a ConfigMap or Secret only while a pod
/// bound to it (in the watch cache, which the agent's own pod watch is served from)
/// references it.
fn check_node_reference(call: &Call<'_>, node: &str) -> ApiResult<()> {
    let req = call.req;
    let name = req.name.as_deref().unwrap_or("");
    let referenced = call.ctx.registry.get("", "v1", "pods").is_some_and(|pods| {
        let filter = crate::cache::Filter {
            namespace: req.namespace.clone(),
            labels: Default::default(),
            fields: canopy_api::selector::FieldSelector::exactly("spec.nodeName", node),
        };
        call.ctx
            .cache(pods)
            .list(&filter, usize::MAX, None, None)
            .is_ok_and(|page| {
                page.items
                    .iter()
                    .any(|pod| crate::authz::pod_references(&pod.value(), req.def.plural, name))
            })
    });
    if referenced {
        return Ok(());
    }
    Err(crate::authz::denied(
        call.user,
        req,
        name,
        &format!("no relationship found between node {node:?} and this object"),
    ))
}

/// Reads a request body within the size limit.
pub async fn read_body(body: hyper::body::Incoming, limit: usize) -> ApiResult<Bytes> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) => {
            if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(ApiError::too_large(limit))
            } else {
                Err(ApiError::bad_request(format!(
                    "reading request body: {err}"
                )))
            }
        }
    }
}

/// A `Status` of success for a deleted object.
pub fn deleted_status(def: &ResourceDef, obj: &Value) -> Value {
    status::success_status(target(def, meta::name(obj)), Some(meta::uid(obj)))
}
