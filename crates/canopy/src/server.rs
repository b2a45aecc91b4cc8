//! `canopy server`: the whole control plane in one process, started as a readiness chain:
//! store → API server (caches loaded, default namespaces) → controllers.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::Mutex;

use anyhow::{Context, Result};
use canopy_apiserver::{ApiServer, ServerConfig, kubeconfig, pki::Pki};

/// Flags of `canopy server`.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Directory for the store, certificates and kubeconfigs; created on first start.
    #[arg(long, default_value = "./canopy-data", env = "CANOPY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address and port the API server listens on (HTTPS).
    #[arg(long, default_value = "127.0.0.1:6443")]
    pub bind: SocketAddr,
    /// The store: `embedded` (a redb file in the data directory), `embedded:<path>`, or
    /// `etcd=http://host:port[,http://host:port...]` for an etcd v3 cluster.
    #[arg(long, default_value = "embedded", env = "CANOPY_STORE")]
    pub store: String,
    /// Extra DNS names or IP addresses for the serving certificate (repeatable), e.g. the
    /// virtual IP of a load balancer in front of several API servers.
    #[arg(long = "tls-san")]
    pub tls_sans: Vec<String>,
    /// Most read-only requests served at once (watches excluded); more get 429.
    #[arg(long, default_value_t = 400)]
    pub max_requests_inflight: usize,
    /// Most mutating requests served at once; more get 429.
    #[arg(long, default_value_t = 200)]
    pub max_mutating_requests_inflight: usize,
    /// Largest request body in bytes; larger requests get 413.
    #[arg(long, default_value_t = 3 * 1024 * 1024)]
    pub max_request_body_bytes: usize,
    /// Events kept per resource for watches that resume from a past resourceVersion.
    #[arg(long, default_value_t = 50_000)]
    pub watch_cache_size: usize,
    /// Events queued for one watcher before it is dropped as too slow (it then re-watches).
    #[arg(long, default_value_t = 4096)]
    pub watcher_queue: usize,
    /// Seconds between compactions of store history (0 disables).
    #[arg(long, default_value_t = 300)]
    pub compaction_interval_seconds: u64,
    /// Seconds events are kept.
    #[arg(long, default_value_t = 3600)]
    pub event_ttl_seconds: u64,
    /// Watches without timeoutSeconds last between this and twice this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub min_request_timeout_seconds: u64,
    /// Do not run the controllers in this process (run them elsewhere).
    #[arg(long)]
    pub disable_controllers: bool,
    /// Do not run the scheduler in this process (run `canopy scheduler` elsewhere).
    #[arg(long)]
    pub disable_scheduler: bool,
    /// Do not run the cloud controller in this process (run `canopy cloud-controller`
    /// elsewhere). The API server still listens where VMs reach it.
    #[arg(long)]
    pub disable_cloud_controller: bool,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    #[command(flatten)]
    pub controller_manager: ControllerManagerArgs,
    #[command(flatten)]
    pub leader_election: crate::leader::LeaderElectionArgs,
    #[command(flatten)]
    pub cloud: crate::cloud::CloudArgs,
    /// Static bearer tokens, one `token,user,uid[,"group1,group2"]` line each (upstream's
    /// format), for bootstrap. Tenant members are in group `canopy:tenant:<tenant>`.
    #[arg(long)]
    pub token_auth_file: Option<PathBuf>,
    /// PEM ECDSA P-256 private key (PKCS#8) that signs service-account tokens. Every API
    /// server of a cluster needs the same key. Default: `<data-dir>/pki/service-account.key`,
    /// generated on first start.
    #[arg(long)]
    pub service_account_signing_key_file: Option<PathBuf>,
    /// The `iss` claim of service-account tokens, and the only issuer whose tokens are
    /// accepted.
    #[arg(long, default_value = canopy_apiserver::server::DEFAULT_SERVICE_ACCOUNT_ISSUER)]
    pub service_account_issuer: String,
    /// Audiences the API accepts in service-account tokens, comma-separated; tokens
    /// requested without an audience get these. Default: the issuer.
    #[arg(long, value_delimiter = ',')]
    pub api_audiences: Vec<String>,
    /// IPv4 range for the ClusterIPs of Services in the platform's namespaces. A tenant's
    /// Services take theirs from its Tenant's `spec.network.serviceCidr` (10.96.0.0/12 unless
    /// it names another).
    #[arg(long, default_value = canopy_apiserver::services::DEFAULT_SERVICE_CIDR, value_parser = parse_service_range)]
    pub service_cluster_ip_range: canopy_apiserver::services::Ipv4Range,
    /// Ports NodePort and LoadBalancer Services take node ports from, inclusive. Each tenant
    /// has the whole range, as its Services only ever listen on its own VMs.
    #[arg(long, default_value = "30000-32767", value_parser = canopy_apiserver::services::parse_port_range)]
    pub service_node_port_range: (u16, u16),
    /// Keystone identity v3 endpoint whose tokens authenticate users, e.g.
    /// `http://127.0.0.1:5000/v3`. A user with role `member` on a project belongs to that
    /// project's tenant; role `admin` on the admin project makes a cluster admin.
    #[arg(long, env = "CANOPY_KEYSTONE_URL")]
    pub keystone_url: Option<String>,
    /// File (YAML or JSON: username, password, project, domain) with the service account
    /// Canopy validates tokens as. Without it: CANOPY_KEYSTONE_USERNAME, _PASSWORD, _PROJECT
    /// and _DOMAIN from the environment. Never given on the command line.
    #[arg(long)]
    pub keystone_credentials_file: Option<PathBuf>,
    /// Longest time a Keystone validation is trusted before asking Keystone again: how long
    /// a revoked token can keep working. Seconds, or with a unit: 90s, 5m, 1h.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub keystone_cache_ttl: Duration,
    /// Keystone project whose `admin` role makes cluster admins.
    #[arg(long, default_value = "admin")]
    pub keystone_admin_project: String,
}

/// Flags of the scheduler, in `canopy server` and `canopy scheduler`.
#[derive(clap::Args, Debug, Clone)]
pub struct SchedulerArgs {
    /// Tenants the scheduler works on at once (each tenant's pods over its own nodes).
    #[arg(long, default_value_t = 16)]
    pub scheduler_workers: usize,
    /// Pods decided per turn on a tenant; their bindings are sent concurrently.
    #[arg(long, default_value_t = 64)]
    pub scheduler_batch: usize,
    /// Bindings and status writes the scheduler has in flight at once, across tenants (the
    /// API server refuses mutating requests beyond --max-mutating-requests-inflight).
    #[arg(long, default_value_t = 64)]
    pub scheduler_max_inflight_writes: usize,
    /// How nodes are ranked: `least-allocated` spreads pods (upstream's default),
    /// `most-allocated` packs them so that idle VMs can be removed.
    #[arg(long, value_enum, default_value_t = ScoringStrategy::LeastAllocated)]
    pub scheduler_strategy: ScoringStrategy,
}

/// Node ranking.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ScoringStrategy {
    /// Prefer the emptiest node.
    LeastAllocated,
    /// Prefer the fullest node that fits.
    MostAllocated,
}

impl SchedulerArgs {
    /// The scheduler's configuration.
    pub fn config(&self) -> canopy_scheduler::run::SchedulerConfig {
        canopy_scheduler::run::SchedulerConfig {
            workers: self.scheduler_workers.max(1),
            batch: self.scheduler_batch.max(1),
            max_inflight_writes: self.scheduler_max_inflight_writes.max(1),
            strategy: match self.scheduler_strategy {
                ScoringStrategy::LeastAllocated => {
                    canopy_scheduler::score::Strategy::LeastAllocated
                }
                ScoringStrategy::MostAllocated => canopy_scheduler::score::Strategy::MostAllocated,
            },
            ..Default::default()
        }
    }
}

/// Flags of the controller manager, in `canopy server` and `canopy controller-manager`.
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerManagerArgs {
    /// Controllers to run, comma-separated: `*` for all, `-name` to leave one out
    /// (upstream's --controllers). Names: replicaset, deployment, endpoint, endpointslice,
    /// namespace, nodelifecycle, garbagecollector, serviceaccount, podgc, tenant.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    pub controllers: Vec<String>,
    /// Keys each controller syncs at once (upstream's --concurrent-*-syncs).
    #[arg(long, default_value_t = 5)]
    pub concurrent_syncs: usize,
    /// How often the controllers look at every object again (queued in the SYNC lane, behind
    /// all new work); 0 turns periodic resyncs off. Upstream's --min-resync-period.
    #[arg(long, default_value = "12h", value_parser = parse_duration)]
    pub resync_period: Duration,
    /// Serve the work queues as one FIFO, as upstream does, instead of the priority lanes
    /// ADD > UPDATE > DELETE > SYNC. For comparison only.
    #[arg(long)]
    pub fifo_work_queues: bool,
    /// The share of its workers' time a controller may spend on a resync, in (0, 1]. A
    /// resync is background work: paced, it leaves the CPU to objects created meanwhile
    /// (and to the API server on the same machine). 1 does not pace. At 0.1 a full resync
    /// of 10,000 ReplicaSets takes about 2.5 s instead of 0.3 s, which a 12 h period affords.
    #[arg(long, default_value_t = 0.1, value_parser = parse_share)]
    pub resync_share: f64,
    /// How long a node's Lease may go unrenewed before the node is marked Unknown.
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    pub node_monitor_grace_period: Duration,
    /// How long pods without a toleration for the not-ready/unreachable taints stay on a
    /// node that is not Ready before they are evicted. Pods created through the API get such
    /// tolerations for 300 s (upstream's DefaultTolerationSeconds admission), which decide.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub pod_eviction_timeout: Duration,
    /// Terminated pods (Succeeded or Failed) kept before the pod GC deletes the oldest; 0
    /// keeps them all (upstream's --terminated-pod-gc-threshold).
    #[arg(long, default_value_t = 12_500)]
    pub terminated_pod_gc_threshold: usize,
    /// How long a pod bound to a node that no longer exists waits before the pod GC fails
    /// and deletes it (upstream's fixed 40 s quarantine).
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    pub pod_gc_quarantine: Duration,
}

impl ControllerManagerArgs {
    /// The controller manager's configuration.
    pub fn config(&self) -> canopy_controllers::manager::ManagerConfig {
        canopy_controllers::manager::ManagerConfig {
            queue: canopy_controllers::queue::QueueConfig {
                fifo: self.fifo_work_queues,
                sync_share: self.resync_share,
                ..Default::default()
            },
            resync_period: (!self.resync_period.is_zero()).then_some(self.resync_period),
            workers: self.concurrent_syncs.max(1),
            controllers: self.controllers.clone(),
            node_monitor_grace_period: self.node_monitor_grace_period,
            pod_eviction_timeout: self.pod_eviction_timeout,
            pod_gc_quarantine: self.pod_gc_quarantine,
            terminated_pod_gc_threshold: self.terminated_pod_gc_threshold,
        }
    }

    /// Unknown controller names, as an error.
    pub fn validate(&self) -> Result<()> {
        for name in &self.controllers {
            let bare = name.strip_prefix('-').unwrap_or(name);
            if bare != "*" && !canopy_controllers::manager::CONTROLLERS.contains(&bare) {
                anyhow::bail!(
                    "--controllers: unknown controller {bare:?}; known: {}",
                    canopy_controllers::manager::CONTROLLERS.join(", ")
                );
            }
        }
        Ok(())
    }
}

/// A share of time: a number above 0 and at most 1.
pub fn parse_share(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(share) if share > 0.0 && share <= 1.0 => Ok(share),
        _ => Err(format!(
            "{text:?} is not a share above 0 and at most 1, such as 0.25"
        )),
    }
}

/// `90`, `90s`, `5m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 90s, 5m or 1h"))?;
    let seconds = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{text:?}: unit must be ms, s, m or h")),
    };
    Ok(Duration::from_secs(seconds))
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("received SIGINT"),
        _ = term.recv() => tracing::info!("received SIGTERM"),
    }
}

/// The URL clients on this machine use to reach the server.
fn local_url(addr: SocketAddr) -> String {
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    format!("https://{host}:{}", addr.port())
}

pub async fn run(args: ServerArgs) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let store = canopy_store::open(&args.store, &args.data_dir)
        .await
        .with_context(|| format!("opening store {:?}", args.store))?;
    tracing::info!(store = %store.describe(), "store ready");
    let mut config = ServerConfig::new(args.bind, args.data_dir.clone());
    config.tls_sans = args.tls_sans.clone();
    config.max_requests_inflight = args.max_requests_inflight;
    config.max_mutating_requests_inflight = args.max_mutating_requests_inflight;
    config.rest.max_body_bytes = args.max_request_body_bytes;
    config.rest.min_request_timeout = Duration::from_secs(args.min_request_timeout_seconds.max(1));
    config.rest.consistent_reads_from_cache = store.ordered_progress();
    config.cache.window = args.watch_cache_size.max(1);
    config.cache.watcher_queue = args.watcher_queue.max(1);
    config.compaction_interval = Duration::from_secs(args.compaction_interval_seconds);
    config.event_ttl = Duration::from_secs(args.event_ttl_seconds);
    config.token_auth_file = args.token_auth_file.clone();
    config.service_account_signing_key_file = args.service_account_signing_key_file.clone();
    config.service_account_issuer = args.service_account_issuer.clone();
    config.api_audiences = args.api_audiences.clone();
    config.service_ranges = canopy_apiserver::services::ServiceRanges {
        cluster_ips: args.service_cluster_ip_range,
        node_ports: args.service_node_port_range,
    };
    if let Some(url) = &args.keystone_url {
        config.keystone = Some(canopy_apiserver::keystone::KeystoneConfig {
            url: url.trim_end_matches('/').to_string(),
            credentials: canopy_apiserver::keystone::ServiceCredentials::load(
                args.keystone_credentials_file.as_deref(),
            )?,
            cache_ttl: args.keystone_cache_ttl,
            admin_project: args.keystone_admin_project.clone(),
        });
    }
    args.controller_manager.validate()?;
    // The controllers' queue metrics show on this server's /metrics.
    let mut controllers_registry = prometheus_client::registry::Registry::default();
    let queue_metrics =
        canopy_controllers::queue::QueueMetrics::register(&mut controllers_registry);
    if !args.disable_controllers {
        config.extra_metrics.push(Arc::new(controllers_registry));
    }
    // The scheduler's metrics outlive its terms as leader, and show on this server's /metrics.
    let mut scheduler_registry = prometheus_client::registry::Registry::default();
    let scheduler_metrics =
        canopy_scheduler::metrics::SchedulerMetrics::register(&mut scheduler_registry);
    if !args.disable_scheduler {
        config.extra_metrics.push(Arc::new(scheduler_registry));
    }
    // The cloud controller's metrics, likewise.
    let mut cloud_registry = prometheus_client::registry::Registry::default();
    let cloud_metrics = canopy_cloud_controller::metrics::Metrics::register(&mut cloud_registry);
    args.cloud.validate()?;
    let cloud_kind = args.cloud.kind();
    if cloud_kind == crate::cloud::CloudKind::Local && !args.disable_cloud_controller {
        config.extra_metrics.push(Arc::new(cloud_registry));
    }
    if cloud_kind == crate::cloud::CloudKind::Local {
        crate::cloud::prepare_host(&args.cloud).await?;
        // A wildcard --bind on the same port already covers the management address.
        if !(args.bind.ip().is_unspecified() && args.bind.port() == args.cloud.cloud_api_port) {
            config.extra_binds.push(SocketAddr::new(
                args.cloud.control_plane_ip().into(),
                args.cloud.cloud_api_port,
            ));
        }
    }
    let server = ApiServer::new(config, store.clone()).await?;
    let url = local_url(server.local_addr());
    let cloud = match cloud_kind {
        crate::cloud::CloudKind::Local if !args.disable_cloud_controller => {
            let port = server
                .extra_local_addrs()
                .first()
                .map(|a| a.port())
                .unwrap_or(args.cloud.cloud_api_port);
            let provider = crate::cloud::open_local(&args.cloud, &args.data_dir, port).await?;
            Some((
                provider,
                format!("https://{}:{port}", args.cloud.control_plane_ip()),
            ))
        }
        _ => None,
    };

    // Credentials: the administrator's kubeconfig, and the controllers' own identity.
    let pki = Pki::new(&args.data_dir);
    let ca = pki.ensure_ca()?;
    let admin = pki.ensure_client("admin", "canopy-admin", &["system:masters"])?;
    let admin_path = args.data_dir.join("admin.kubeconfig");
    kubeconfig::write(&admin_path, &url, &ca.cert_pem, &admin, "canopy-admin")?;
    let controllers_cert = pki.ensure_client(
        "controller-manager",
        "system:kube-controller-manager",
        &["system:masters"],
    )?;
    let controllers_path = args.data_dir.join("controller-manager.kubeconfig");
    kubeconfig::write(
        &controllers_path,
        &url,
        &ca.cert_pem,
        &controllers_cert,
        "system:kube-controller-manager",
    )?;

    let scheduler_cert =
        pki.ensure_client("scheduler", "system:kube-scheduler", &["system:masters"])?;
    let scheduler_path = args.data_dir.join("scheduler.kubeconfig");
    kubeconfig::write(
        &scheduler_path,
        &url,
        &ca.cert_pem,
        &scheduler_cert,
        "system:kube-scheduler",
    )?;

    let cloud_cert = pki.ensure_client(
        "cloud-controller",
        "system:cloud-controller",
        &["system:masters"],
    )?;
    let cloud_path = args.data_dir.join("cloud-controller.kubeconfig");
    kubeconfig::write(
        &cloud_path,
        &url,
        &ca.cert_pem,
        &cloud_cert,
        "system:cloud-controller",
    )?;

    server.wait_ready().await;
    server.bootstrap().await?;
    // On SIGTERM the elected components stop and release their leases (so another replica
    // takes over at once) before the API server stops serving.
    let stop = tokio_util::sync::CancellationToken::new();
    let components: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Default::default();
    let serving = {
        let stop = stop.clone();
        let components = components.clone();
        tokio::spawn(server.run(async move {
            shutdown_signal().await;
            stop.cancel();
            let handles: Vec<_> = std::mem::take(&mut *components.lock().await);
            let _ =
                tokio::time::timeout(Duration::from_secs(3), futures::future::join_all(handles))
                    .await;
        }))
    };

    if !args.disable_controllers {
        let client = client_from(&controllers_path).await?;
        let manager_config = args.controller_manager.config();
        components
            .lock()
            .await
            .push(tokio::spawn(crate::leader::run_elected(
                client.clone(),
                "kube-controller-manager",
                args.leader_election.clone(),
                stop.clone().cancelled_owned(),
                move || {
                    canopy_controllers::manager::run(canopy_controllers::manager::Context::new(
                        client.clone(),
                        manager_config.clone(),
                        queue_metrics.clone(),
                    ))
                },
            )));
    }
    if !args.disable_scheduler {
        let client = client_from(&scheduler_path).await?;
        let config = args.scheduler.config();
        components
            .lock()
            .await
            .push(tokio::spawn(crate::leader::run_elected(
                client.clone(),
                "kube-scheduler",
                args.leader_election.clone(),
                stop.clone().cancelled_owned(),
                move || {
                    canopy_scheduler::run::run(
                        client.clone(),
                        config.clone(),
                        scheduler_metrics.clone(),
                    )
                },
            )));
    }

    if let Some((provider, vm_url)) = &cloud {
        let client = client_from(&cloud_path).await?;
        let events = canopy_controllers::events::EventSink::default();
        let recorder = events.recorder("cloud-controller");
        {
            let client = client.clone();
            components
                .lock()
                .await
                .push(tokio::spawn(async move { events.run(client).await }));
        }
        let credentials: Arc<dyn canopy_cloud_controller::NodeCredentials> =
            Arc::new(crate::cloud::CaCredentials {
                pki: Pki::new(&args.data_dir),
                ca_pem: ca.cert_pem.clone(),
                server_url: vm_url.clone(),
            });
        let provider: Arc<dyn canopy_cloud::CloudProvider> = provider.clone();
        let term = crate::cloud::ControllerTerm {
            client: client.clone(),
            credentials,
            recorder,
            metrics: cloud_metrics,
            config: crate::cloud::controller_config(&args.cloud),
        };
        components
            .lock()
            .await
            .push(tokio::spawn(crate::leader::run_elected(
                client,
                "cloud-controller",
                args.leader_election.clone(),
                stop.clone().cancelled_owned(),
                move || term.clone().run(provider.clone()),
            )));
        tracing::info!(vm_api = %vm_url, "local cloud ready: tenants' pods get VMs on this machine");
    }
    println!(
        "Canopy is serving the Kubernetes API at {url}; use it with: export KUBECONFIG={}",
        std::fs::canonicalize(&admin_path)
            .unwrap_or(admin_path)
            .display()
    );
    let result = serving.await.context("API server task failed")?;
    for task in components.lock().await.drain(..) {
        task.abort();
    }
    if args.cloud.cleanup
        && let Some((provider, _)) = &cloud
    {
        tracing::info!("--cleanup: deleting the local cloud's VMs, networks and ports");
        provider
            .destroy_all()
            .await
            .context("cleaning up the local cloud")?;
    }
    drop(store);
    tracing::info!("stopped");
    result
}

/// A kube-rs client from a kubeconfig file.
pub async fn client_from(path: &std::path::Path) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .context("loading kubeconfig")?;
    kube::Client::try_from(config).context("building the API client")
}

fn parse_service_range(text: &str) -> Result<canopy_apiserver::services::Ipv4Range, String> {
    text.parse()
}
