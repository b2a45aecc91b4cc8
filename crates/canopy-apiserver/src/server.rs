//! The HTTPS server: TLS (with optional client certificates), HTTP/1.1 and HTTP/2,
//! authentication and authorization, in-flight limits, non-resource endpoints, metrics and
//! the background loops (compaction, event expiry).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use canopy_api::{ApiError, Registry, kinds, meta};
use canopy_store::{Outcome, Store};
use http::{Request, Response, StatusCode, header};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{self, User},
    authz::{self, NamespaceOwner},
    cache::{CacheOptions, WatchCache},
    discovery::{Aggregated, Discovery},
    metrics::{KindLabels, LatencyLabels, Metrics, RequestLabels},
    openapi::OpenApi,
    pki::{self, Pki},
    request::{self, HealthKind, Query, Route},
    rest::{self, Body, Context, RestOptions, bytes_response, error_response, json_response},
};

/// Configuration of the API server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Further addresses served the same way (the local cloud's VMs reach the control plane
    /// on their management network's address); they are added to the certificate.
    pub extra_binds: Vec<SocketAddr>,
    /// Where certificates live.
    pub data_dir: PathBuf,
    /// Extra names and addresses for the serving certificate.
    pub tls_sans: Vec<String>,
    /// Most concurrent read-only requests (watches excluded) before 429.
    pub max_requests_inflight: usize,
    /// Most concurrent mutating requests before 429.
    pub max_mutating_requests_inflight: usize,
    /// REST tuning.
    pub rest: RestOptions,
    /// Watch cache tuning.
    pub cache: CacheOptions,
    /// How often old store history is compacted (0: never).
    pub compaction_interval: Duration,
    /// How long events are kept.
    pub event_ttl: Duration,
    /// Static bearer tokens (upstream's token file format).
    pub token_auth_file: Option<PathBuf>,
    /// Keystone token authentication.
    pub keystone: Option<crate::keystone::KeystoneConfig>,
    /// The ECDSA P-256 key that signs service-account tokens (PEM); generated in the PKI
    /// directory when unset.
    pub service_account_signing_key_file: Option<PathBuf>,
    /// The `iss` of service-account tokens.
    pub service_account_issuer: String,
    /// Audiences the API accepts in service-account tokens (empty: the issuer).
    pub api_audiences: Vec<String>,
    /// The ranges Services' ClusterIPs and node ports come from.
    pub service_ranges: crate::services::ServiceRanges,
    /// How often leaked or missing Service allocation records are repaired (0: never).
    pub service_repair_interval: Duration,
    /// Metrics of components running in the same process (the scheduler, ...), shown on
    /// this server's `/metrics` after its own.
    pub extra_metrics: Vec<Arc<prometheus_client::registry::Registry>>,
}

/// The service-account token issuer kubeadm and k3s configure.
pub const DEFAULT_SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

impl ServerConfig {
    /// A configuration with upstream's defaults.
    pub fn new(bind: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            bind,
            extra_binds: Vec::new(),
            data_dir,
            tls_sans: Vec::new(),
            max_requests_inflight: 400,
            max_mutating_requests_inflight: 200,
            rest: RestOptions::default(),
            cache: CacheOptions::default(),
            compaction_interval: Duration::from_secs(300),
            event_ttl: Duration::from_secs(3600),
            token_auth_file: None,
            keystone: None,
            service_account_signing_key_file: None,
            service_account_issuer: DEFAULT_SERVICE_ACCOUNT_ISSUER.to_string(),
            api_audiences: Vec::new(),
            service_ranges: Default::default(),
            service_repair_interval: Duration::from_secs(180),
            extra_metrics: Vec::new(),
        }
    }
}

struct State {
    ctx: Arc<Context>,
    discovery: Discovery,
    openapi: OpenApi,
    read_slots: Semaphore,
    write_slots: Semaphore,
    authenticator: auth::Authenticator,
    extra_metrics: Vec<Arc<prometheus_client::registry::Registry>>,
}

/// A running API server.
pub struct ApiServer {
    state: Arc<State>,
    listener: TcpListener,
    extra_listeners: Vec<TcpListener>,
    acceptor: TlsAcceptor,
    config: ServerConfig,
}

/// The names the serving certificate covers by default.
pub fn default_sans(bind: &SocketAddr) -> Vec<String> {
    let mut sans = vec![
        "127.0.0.1".to_string(),
        "::1".to_string(),
        "localhost".to_string(),
    ];
    if !bind.ip().is_unspecified() {
        sans.push(bind.ip().to_string());
    }
    if let Ok(host) = hostname() {
        sans.push(host);
    }
    sans
}

fn hostname() -> std::io::Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string())
}

impl ApiServer {
    /// Prepares certificates, caches and documents, and binds the listener.
    pub async fn new(config: ServerConfig, store: Arc<dyn Store>) -> Result<Self> {
        let pki = Pki::new(&config.data_dir);
        let mut sans = default_sans(&config.bind);
        sans.extend(config.tls_sans.iter().cloned());
        sans.extend(config.extra_binds.iter().map(|b| b.ip().to_string()));
        let ca = pki.ensure_ca()?;
        let serving = pki.ensure_serving(&sans)?;
        let acceptor = tls_acceptor(&ca.cert_pem, &serving.cert_pem, &serving.key_pem)?;
        let registry = Arc::new(Registry::builtin());
        let metrics = Arc::new(Metrics::new());
        let mut caches = HashMap::new();
        for def in registry.resources() {
            caches.insert(
                (def.group, def.plural),
                WatchCache::start(def, store.clone(), config.cache.clone(), metrics.clone()),
            );
        }
        let listener = TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("binding {}", config.bind))?;
        let mut extra_listeners = Vec::new();
        for bind in &config.extra_binds {
            // Port 0 means the main listener's port, so that one port serves everywhere.
            let mut bind = *bind;
            if bind.port() == 0 {
                bind.set_port(listener.local_addr()?.port());
            }
            extra_listeners.push(
                TcpListener::bind(bind)
                    .await
                    .with_context(|| format!("binding {bind}"))?,
            );
        }
        let local = listener.local_addr()?;
        let discovery = Discovery::new(&registry, &local.to_string());
        let openapi = OpenApi::new(&registry);
        let signing_key = config
            .service_account_signing_key_file
            .clone()
            .unwrap_or_else(|| pki.dir().join("service-account.key"));
        let service_accounts = Arc::new(crate::serviceaccount::TokenSigner::load_or_generate(
            &signing_key,
            &config.service_account_issuer,
            &config.api_audiences,
        )?);
        let services = Arc::new(crate::services::Allocator::new(
            store.clone(),
            config.service_ranges.clone(),
        ));
        let ctx = Arc::new(Context {
            services,
            registry,
            store,
            caches,
            metrics,
            options: config.rest.clone(),
            shutdown: CancellationToken::new(),
            quota_locks: Default::default(),
            nodes: Some(Arc::new(node_client(&pki)?)),
            service_accounts: Some(service_accounts.clone()),
        });
        let tokens = match &config.token_auth_file {
            Some(path) => {
                let tokens = crate::tokenfile::TokenFile::load(path)?;
                tracing::info!(path = %path.display(), tokens = tokens.len(), "loaded static tokens");
                Some(tokens)
            }
            None => None,
        };
        let keystone = match &config.keystone {
            Some(keystone) => {
                tracing::info!(url = %keystone.url, user = %keystone.credentials.username, "authenticating Keystone tokens");
                Some(crate::keystone::Keystone::new(
                    keystone.clone(),
                    ctx.store.clone(),
                    crate::keystone::KeystoneStats::registered(&ctx.metrics),
                )?)
            }
            None => None,
        };
        let state = Arc::new(State {
            authenticator: auth::Authenticator {
                tokens,
                keystone,
                service_accounts: Some(crate::serviceaccount::TokenAuthenticator {
                    signer: service_accounts,
                    ctx: ctx.clone(),
                }),
            },
            ctx,
            discovery,
            openapi,
            read_slots: Semaphore::new(config.max_requests_inflight),
            write_slots: Semaphore::new(config.max_mutating_requests_inflight),
            extra_metrics: config.extra_metrics.clone(),
        });
        Ok(Self {
            state,
            listener,
            extra_listeners,
            acceptor,
            config,
        })
    }

    /// The further addresses the server listens on.
    pub fn extra_local_addrs(&self) -> Vec<SocketAddr> {
        self.extra_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.bind)
    }

    /// The request context (for in-process components and tests).
    pub fn context(&self) -> Arc<Context> {
        self.state.ctx.clone()
    }

    /// Waits until every watch cache has loaded.
    pub async fn wait_ready(&self) {
        loop {
            if self.state.ctx.caches.values().all(|c| c.is_ready()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Creates the namespaces every cluster has, if missing.
    pub async fn bootstrap(&self) -> Result<()> {
        let ctx = &self.state.ctx;
        let Some(def) = ctx.registry.get("", "v1", "namespaces") else {
            return Ok(());
        };
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let mut ns = json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": name,
                    "uid": uuid::Uuid::new_v4().to_string(),
                    "creationTimestamp": meta::now_rfc3339(),
                },
            });
            kinds::prepare_create(def, &mut ns);
            kinds::apply_defaults(def, &mut ns);
            let bytes = Bytes::from(serde_json::to_vec(&ns)?);
            match ctx.store.create(&def.key("", name), bytes).await? {
                Outcome::Committed(_) => tracing::info!(namespace = name, "created namespace"),
                Outcome::Conflict(_) => {}
            }
        }
        Ok(())
    }

    /// Serves until `shutdown` resolves, then stops accepting, ends watches and waits
    /// (briefly) for requests in flight.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let background = spawn_background(self.state.ctx.clone(), &self.config);
        let keystone = self
            .state
            .authenticator
            .keystone
            .clone()
            .map(|k| tokio::spawn(k.run(self.state.ctx.shutdown.clone())));
        tokio::pin!(shutdown);
        // The extra listeners feed the same loop.
        let (extra_tx, mut extra_rx) = tokio::sync::mpsc::channel(64);
        let mut extra_tasks = Vec::new();
        for listener in std::mem::take(&mut self.extra_listeners) {
            let tx = extra_tx.clone();
            extra_tasks.push(tokio::spawn(async move {
                loop {
                    let accepted = listener.accept().await;
                    if tx.send(accepted).await.is_err() {
                        return;
                    }
                }
            }));
        }
        drop(extra_tx);
        loop {
            tokio::select! {
                accepted = async {
                    tokio::select! {
                        accepted = self.listener.accept() => accepted,
                        Some(accepted) = extra_rx.recv() => accepted,
                    }
                } => {
                    let (tcp, peer) = match accepted {
                        Ok(a) => a,
                        Err(err) => {
                            tracing::warn!(error = %err, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = tcp.set_nodelay(true);
                    let acceptor = self.acceptor.clone();
                    let state = self.state.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(err)) => {
                                tracing::debug!(%peer, error = %err, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                        let identity = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .and_then(|cert| pki::identity_of(cert))
                            .map(|(name, groups)| User { name, groups });
                        let service = service_fn(move |req| {
                            let state = state.clone();
                            let identity = identity.clone();
                            async move { Ok::<_, Infallible>(handle(state, identity, req).await) }
                        });
                        let mut builder = auto::Builder::new(TokioExecutor::new());
                        builder.http2().max_concurrent_streams(1000);
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                        let conn = watcher.watch(conn.into_owned());
                        if let Err(err) = conn.await {
                            tracing::debug!(%peer, error = %err, "connection ended with an error");
                        }
                    });
                }
                _ = &mut shutdown => break,
            }
        }
        for task in extra_tasks {
            task.abort();
        }
        tracing::info!("shutting down: no new connections; ending watches");
        self.state.ctx.shutdown.cancel();
        background.abort();
        if let Some(keystone) = keystone {
            keystone.abort();
        }
        drop(self.listener);
        if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("requests still in flight after 10s; closing anyway");
        }
        Ok(())
    }
}

/// The API server's client certificate towards node agents, the one identity they serve.
fn node_client(pki: &Pki) -> Result<crate::nodeproxy::NodeClient> {
    let pair = pki.ensure_client(
        "apiserver-node-client",
        canopy_api::AGENT_API_CLIENT_USER,
        &["system:masters"],
    )?;
    crate::nodeproxy::NodeClient::from_pem(&pair.cert_pem, &pair.key_pem)
}

fn tls_acceptor(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())?
        .context("no private key in the serving key file")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn spawn_background(ctx: Arc<Context>, config: &ServerConfig) -> tokio::task::JoinHandle<()> {
    let compaction = config.compaction_interval;
    let event_ttl = config.event_ttl;
    let repair_interval = config.service_repair_interval;
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        if !repair_interval.is_zero()
            && let Some(services) = ctx.registry.get("", "v1", "services")
        {
            tasks.spawn(crate::services::repair_loop(
                ctx.store.clone(),
                services.key_prefix(),
                repair_interval,
            ));
        }
        if !compaction.is_zero() {
            let ctx = ctx.clone();
            tasks.spawn(async move { compact_loop(ctx, compaction).await });
        }
        if !event_ttl.is_zero() {
            let ctx = ctx.clone();
            tasks.spawn(async move { expire_events(ctx, event_ttl).await });
        }
        {
            let ctx = ctx.clone();
            tasks.spawn(async move {
                loop {
                    for cache in ctx.caches.values() {
                        ctx.metrics
                            .objects
                            .get_or_create(&crate::metrics::ResourceLabels {
                                resource: cache.def().plural.to_string(),
                            })
                            .set(cache.len() as i64);
                    }
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    })
}

/// Compacts the store like upstream's compactor: every interval, to the revision that was
/// current one interval ago, so history covers at least one interval.
async fn compact_loop(ctx: Arc<Context>, interval: Duration) {
    let mut previous = None;
    loop {
        tokio::time::sleep(interval).await;
        let current = match ctx.store.current_revision().await {
            Ok(rev) => rev,
            Err(err) => {
                tracing::warn!(error = %err, "compaction: cannot read the store revision");
                continue;
            }
        };
        if let Some(target) = previous.filter(|t: &i64| *t > 0) {
            let started = Instant::now();
            match ctx.store.compact(target).await {
                Ok(()) => tracing::info!(
                    revision = target,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "compacted store"
                ),
                // Another API server compacted first.
                Err(canopy_store::Error::Compacted { .. }) => {}
                Err(err) => tracing::warn!(error = %err, "compaction failed"),
            }
        }
        previous = Some(current);
    }
}

/// Deletes events older than the TTL (upstream gives events an etcd lease of `--event-ttl`).
async fn expire_events(ctx: Arc<Context>, ttl: Duration) {
    let Some(def) = ctx.registry.get("", "v1", "events") else {
        return;
    };
    loop {
        tokio::time::sleep(Duration::from_secs(60).min(ttl)).await;
        let cutoff = chrono::Utc::now() - chrono::Duration::from_std(ttl).unwrap_or_default();
        let Ok(page) = ctx.cache(def).list(&Default::default(), 0, None, None) else {
            continue;
        };
        let mut expired = 0;
        for obj in page.items {
            let value = obj.value();
            let stamp = ["lastTimestamp", "eventTime"]
                .iter()
                .find_map(|f| value.get(*f).and_then(Value::as_str))
                .or_else(|| meta::meta_str(&value, "creationTimestamp"))
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
            if stamp.is_some_and(|t| t < cutoff) {
                let key = def.key(obj.namespace(), obj.name());
                if ctx.store.delete(&key, Some(obj.revision)).await.is_ok() {
                    expired += 1;
                }
            }
        }
        if expired > 0 {
            tracing::info!(expired, "expired old events");
        }
    }
}

async fn handle(
    state: Arc<State>,
    identity: Option<User>,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let upgrade = parking_lot::Mutex::new(parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    let path = parts.uri.path().to_string();
    let query = Query::parse(parts.uri.query());
    let ctx = &state.ctx;
    let registry = &ctx.registry;
    let mut verb = parts.method.as_str().to_ascii_lowercase();
    let mut resource = String::new();
    let mut subresource = String::new();
    let result: Result<Response<Body>, ApiError> = async {
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let user = state
            .authenticator
            .authenticate(identity.as_ref(), authorization)
            .await?;
        let user = auth::impersonate(user, &parts.headers)?;
        let route = request::route(registry, &parts.method, &path, &query)?;
        match route {
            Route::Resource(req) => {
                verb = req.verb.as_str().to_string();
                resource = req.def.plural.to_string();
                subresource = req
                    .subresource
                    .map(|s| s.name().to_string())
                    .unwrap_or_default();
                let namespace_owner = match (&req.namespace, req.def.namespaced) {
                    (Some(ns), true) => ctx.namespace_owner(ns).await?,
                    _ => NamespaceOwner::Missing,
                };
                let access = authz::authorize(&user, &req, &namespace_owner)?;
                let long_running = req.verb == request::Verb::Watch;
                let slots = if req.verb.is_mutating() {
                    &state.write_slots
                } else {
                    &state.read_slots
                };
                let _permit = if long_running {
                    None
                } else {
                    Some(
                        slots
                            .try_acquire()
                            .map_err(|_| ApiError::too_many_requests(1))?,
                    )
                };
                let kind = if req.verb.is_mutating() {
                    "mutating"
                } else {
                    "readOnly"
                };
                let gauge = ctx
                    .metrics
                    .inflight
                    .get_or_create(&KindLabels {
                        request_kind: kind.into(),
                    })
                    .clone();
                gauge.inc();
                let call = rest::Call {
                    ctx,
                    req: &req,
                    query: &query,
                    headers: &parts.headers,
                    user: &user,
                    access: &access,
                    namespace_owner: &namespace_owner,
                    upgrade: &upgrade,
                };
                let result = rest::serve(&call, body).await;
                gauge.dec();
                result
            }
            other => {
                auth::authorize_path(&user, &path)?;
                if parts.method != http::Method::GET && parts.method != http::Method::HEAD {
                    return Err(ApiError::method_not_allowed());
                }
                non_resource(&state, other, &parts.headers).await
            }
        }
    }
    .await;
    let response = match result {
        Ok(r) => r,
        Err(err) => {
            if err.code >= 500 {
                tracing::warn!(method = %parts.method, %path, code = err.code, message = %err.message, "request failed");
            }
            error_response(&err)
        }
    };
    let code = response.status().as_u16();
    let elapsed = started.elapsed();
    ctx.metrics
        .requests
        .get_or_create(&RequestLabels {
            verb: verb.clone(),
            resource: resource.clone(),
            subresource,
            code: code.to_string(),
        })
        .inc();
    if verb != "watch" {
        ctx.metrics
            .request_duration
            .get_or_create(&LatencyLabels {
                verb: verb.clone(),
                resource,
            })
            .observe(elapsed.as_secs_f64());
    }
    tracing::debug!(
        method = %parts.method,
        %path,
        code,
        latency_us = elapsed.as_micros() as u64,
        user = identity.as_ref().map(|u| u.name.as_str()).unwrap_or("-"),
        "request"
    );
    response
}

async fn non_resource(
    state: &State,
    route: Route,
    headers: &http::HeaderMap,
) -> Result<Response<Body>, ApiError> {
    let ctx = &state.ctx;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    Ok(match route {
        Route::Version => json_response(StatusCode::OK, version_document()),
        Route::Health(kind) => health(ctx, kind).await,
        Route::Metrics => bytes_response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(ctx.metrics.render(&state.extra_metrics)),
        ),
        Route::OpenApiV2 => json_response(StatusCode::OK, state.openapi.v2()),
        Route::OpenApiV3Root => json_response(StatusCode::OK, state.openapi.v3_root()),
        Route::OpenApiV3(path) => json_response(
            StatusCode::OK,
            state.openapi.v3(&path).ok_or_else(ApiError::no_route)?,
        ),
        Route::CoreVersions => discovery_response(state, Aggregated::from_accept(accept), true),
        Route::Groups => discovery_response(state, Aggregated::from_accept(accept), false),
        Route::Group(group) => json_response(
            StatusCode::OK,
            state
                .discovery
                .group(&group)
                .ok_or_else(ApiError::no_route)?,
        ),
        Route::Resources(group, version) => json_response(
            StatusCode::OK,
            state
                .discovery
                .resources(&group, &version)
                .ok_or_else(ApiError::no_route)?,
        ),
        Route::Resource(_) => return Err(ApiError::no_route()),
    })
}

fn discovery_response(state: &State, aggregated: Option<Aggregated>, core: bool) -> Response<Body> {
    let body = if core {
        state.discovery.core_versions(aggregated)
    } else {
        state.discovery.groups(aggregated)
    };
    let mut response = match aggregated {
        Some(a) => bytes_response(StatusCode::OK, a.content_type(), body),
        None => json_response(StatusCode::OK, body),
    };
    response
        .headers_mut()
        .insert(header::VARY, http::HeaderValue::from_static("Accept"));
    if aggregated.is_some()
        && let Ok(v) = http::HeaderValue::from_str(&state.discovery.etag)
    {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

fn version_document() -> Bytes {
    let minor = canopy_api::KUBERNETES_MINOR;
    Bytes::from(
        serde_json::to_vec(&json!({
            "major": canopy_api::KUBERNETES_MAJOR,
            "minor": minor,
            "emulationMajor": canopy_api::KUBERNETES_MAJOR,
            "emulationMinor": minor,
            "gitVersion": format!("v{}.{minor}.0-canopy.{}", canopy_api::KUBERNETES_MAJOR, env!("CARGO_PKG_VERSION")),
            "gitCommit": "",
            "gitTreeState": "clean",
            "buildDate": "",
            "goVersion": "",
            "compiler": "rustc",
            "platform": format!("{}/{}", std::env::consts::OS, match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", other => other }),
        }))
        .unwrap_or_default(),
    )
}

async fn health(ctx: &Context, kind: HealthKind) -> Response<Body> {
    let mut checks: Vec<(String, bool)> = vec![("ping".into(), true)];
    if kind != HealthKind::Livez {
        let store_ok = tokio::time::timeout(Duration::from_secs(2), ctx.store.current_revision())
            .await
            .is_ok_and(|r| r.is_ok());
        checks.push(("store".into(), store_ok));
    }
    if kind == HealthKind::Readyz {
        let pending: Vec<&str> = ctx
            .caches
            .values()
            .filter(|c| !c.is_ready())
            .map(|c| c.def().plural)
            .collect();
        checks.push((
            if pending.is_empty() {
                "watch-cache-sync".into()
            } else {
                format!("watch-cache-sync ({} pending)", pending.join(","))
            },
            pending.is_empty(),
        ));
        checks.push(("shutdown".into(), !ctx.shutdown.is_cancelled()));
    }
    let ok = checks.iter().all(|(_, ok)| *ok);
    let mut text = String::new();
    for (name, passed) in &checks {
        text.push_str(&format!(
            "[{}]{name} {}\n",
            if *passed { "+" } else { "-" },
            if *passed { "ok" } else { "failed" }
        ));
    }
    if ok {
        bytes_response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"ok"),
        )
    } else {
        text.push_str("check failed\n");
        bytes_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            Bytes::from(text),
        )
    }
}
