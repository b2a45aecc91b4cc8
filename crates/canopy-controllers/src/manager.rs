//! The controller manager: shared informers, one work queue per controller, and the
//! controllers themselves, as upstream's kube-controller-manager runs them.
//!
//! Start-up follows upstream: every controller registers its informer handlers, the informers
//! list and watch, and each controller's workers start once the caches it reads have synced.

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    coordination::v1::Lease,
    core::v1::{Endpoints, Namespace, Node, Pod, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::{Api, Client, runtime::watcher};

use crate::{
    events::EventSink,
    informer::Informer,
    queue::{QueueConfig, QueueMetrics, WorkQueue},
};

/// Every controller this manager can run, by upstream's names.
pub const CONTROLLERS: &[&str] = &[
    "replicaset",
    "deployment",
    "endpoint",
    "endpointslice",
    "namespace",
    "nodelifecycle",
    "garbagecollector",
    "serviceaccount",
    "podgc",
    "tenant",
];

/// How the controllers run.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Work queue order and retries.
    pub queue: QueueConfig,
    /// How often every informer reports every object again (the SYNC lane); `None`: never.
    pub resync_period: Option<Duration>,
    /// Workers per controller (upstream's `--concurrent-*-syncs`).
    pub workers: usize,
    /// Controllers to run: names from [`CONTROLLERS`], `*` for all, `-name` to leave one out.
    pub controllers: Vec<String>,
    /// How long a node's Lease may go unrenewed before the node is marked Unknown.
    pub node_monitor_grace_period: Duration,
    /// How long pods stay on a node that is not Ready before they are evicted.
    pub pod_eviction_timeout: Duration,
    /// How long a pod bound to a vanished node waits before the pod GC deletes it.
    pub pod_gc_quarantine: Duration,
    /// Terminated pods kept before the oldest are deleted (0: all kept).
    pub terminated_pod_gc_threshold: usize,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            queue: QueueConfig::default(),
            resync_period: None,
            workers: 5,
            controllers: vec!["*".into()],
            node_monitor_grace_period: Duration::from_secs(40),
            pod_eviction_timeout: Duration::from_secs(300),
            pod_gc_quarantine: Duration::from_secs(40),
            terminated_pod_gc_threshold: 12_500,
        }
    }
}

impl ManagerConfig {
    /// Whether the controller `name` runs, by upstream's `--controllers` rules.
    pub fn enabled(&self, name: &str) -> bool {
        let mut all = false;
        for entry in &self.controllers {
            if entry == name {
                return true;
            }
            if entry.strip_prefix('-') == Some(name) {
                return false;
            }
            all |= entry == "*";
        }
        all
    }
}

/// The shared informers: one watch per resource, whatever the number of controllers.
#[derive(Clone)]
pub struct Informers {
    /// Pods.
    pub pods: Informer<Pod>,
    /// ReplicaSets.
    pub replica_sets: Informer<ReplicaSet>,
    /// Deployments.
    pub deployments: Informer<Deployment>,
    /// Services.
    pub services: Informer<Service>,
    /// Endpoints.
    pub endpoints: Informer<Endpoints>,
    /// EndpointSlices.
    pub endpoint_slices: Informer<EndpointSlice>,
    /// Namespaces.
    pub namespaces: Informer<Namespace>,
    /// Nodes.
    pub nodes: Informer<Node>,
    /// Node Leases (namespace `kube-node-lease`).
    pub node_leases: Informer<Lease>,
    /// ServiceAccounts.
    pub service_accounts: Informer<ServiceAccount>,
}

impl Informers {
    /// Informers whose resyncs take at most `resync_share` of the time.
    fn new(resync_share: f64) -> Self {
        let share = resync_share;
        Self {
            pods: Informer::with_resync_share("pods", share),
            replica_sets: Informer::with_resync_share("replicasets", share),
            deployments: Informer::with_resync_share("deployments", share),
            services: Informer::with_resync_share("services", share),
            endpoints: Informer::with_resync_share("endpoints", share),
            endpoint_slices: Informer::with_resync_share("endpointslices", share),
            namespaces: Informer::with_resync_share("namespaces", share),
            nodes: Informer::with_resync_share("nodes", share),
            node_leases: Informer::with_resync_share("leases", share),
            service_accounts: Informer::with_resync_share("serviceaccounts", share),
        }
    }

    fn run(&self, client: &Client, resync: Option<Duration>) -> Vec<BoxFuture<'static, ()>> {
        let cfg = watcher::Config::default;
        vec![
            Box::pin(
                self.pods
                    .clone()
                    .run(Api::all(client.clone()), cfg(), resync),
            ),
            Box::pin(
                self.replica_sets
                    .clone()
                    .run(Api::all(client.clone()), cfg(), resync),
            ),
            Box::pin(
                self.deployments
                    .clone()
                    .run(Api::all(client.clone()), cfg(), resync),
            ),
            Box::pin(
                self.services
                    .clone()
                    .run(Api::all(client.clone()), cfg(), resync),
            ),
            Box::pin(
                self.endpoints
                    .clone()
                    .run(Api::all(client.clone()), cfg(), resync),
            ),
            Box::pin(
                self.endpoint_slices
                    .clone()
                    .run(Api::all(client.clone()), cfg(), resync),
            ),
            Box::pin(
                self.namespaces
                    .clone()
                    .run(Api::all(client.clone()), cfg(), resync),
            ),
            Box::pin(
                self.nodes
                    .clone()
                    .run(Api::all(client.clone()), cfg(), resync),
            ),
            Box::pin(self.node_leases.clone().run(
                Api::namespaced(client.clone(), "kube-node-lease"),
                cfg(),
                resync,
            )),
            Box::pin(
                self.service_accounts
                    .clone()
                    .run(Api::all(client.clone()), cfg(), resync),
            ),
        ]
    }
}

/// What every controller is given.
pub struct Context {
    /// The API client (the controller manager's identity).
    pub client: Client,
    /// The shared informers.
    pub informers: Informers,
    /// The configuration.
    pub config: ManagerConfig,
    /// The work queues' metrics.
    pub metrics: QueueMetrics,
    /// Where the controllers' Events go.
    pub events: EventSink,
}

impl Context {
    /// A context; nothing runs until [`run`].
    pub fn new(client: Client, config: ManagerConfig, metrics: QueueMetrics) -> Arc<Self> {
        Arc::new(Self {
            client,
            informers: Informers::new(if config.queue.fifo {
                1.0
            } else {
                config.queue.sync_share
            }),
            config,
            metrics,
            events: EventSink::default(),
        })
    }

    /// A work queue for the controller `name`, configured as the manager says.
    pub fn queue<K: Clone + Eq + std::hash::Hash + Send + 'static>(
        &self,
        name: &str,
    ) -> WorkQueue<K> {
        WorkQueue::new(name, self.config.queue.clone(), &self.metrics)
    }
}

/// Runs the enabled controllers until the future is dropped (leadership lost, shutdown).
pub async fn run(ctx: Arc<Context>) {
    let config = &ctx.config;
    let mut controllers: Vec<BoxFuture<'static, ()>> = Vec::new();
    if config.enabled("replicaset") {
        controllers.push(crate::replicaset::start(&ctx));
    }
    if config.enabled("deployment") {
        controllers.push(crate::deployment::start(&ctx));
    }
    if config.enabled("namespace") {
        controllers.push(crate::namespace::start(&ctx));
    }
    if config.enabled("endpoint") {
        controllers.push(crate::endpoints::start(&ctx));
    }
    if config.enabled("endpointslice") {
        controllers.push(crate::endpointslice::start(&ctx));
    }
    if config.enabled("serviceaccount") {
        controllers.push(crate::serviceaccount::start(&ctx));
    }
    if config.enabled("garbagecollector") {
        controllers.push(crate::garbagecollector::start(&ctx));
    }
    if config.enabled("nodelifecycle") {
        controllers.push(crate::nodelifecycle::start(&ctx));
    }
    if config.enabled("podgc") {
        controllers.push(crate::podgc::start(&ctx));
    }
    if config.enabled("tenant") {
        controllers.push(Box::pin(crate::tenant::run(ctx.client.clone())));
    }
    let informers = ctx.informers.run(&ctx.client, config.resync_period);
    tracing::info!(
        controllers = controllers.len(),
        "controller manager running"
    );
    // Each informer on a task of its own, so that one busy informer (a resync of every pod)
    // never holds up the events of another; the set aborts them when this future is dropped.
    let mut watches = tokio::task::JoinSet::new();
    for informer in informers {
        watches.spawn(informer);
    }
    {
        let (events, client) = (ctx.events.clone(), ctx.client.clone());
        watches.spawn(async move { events.run(client).await });
    }
    futures::future::join(watches.join_all(), futures::future::join_all(controllers)).await;
}
