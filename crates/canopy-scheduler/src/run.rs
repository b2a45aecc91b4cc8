//! The scheduler against the API: watches of pods and nodes feed the tenants' partitions, a
//! pool of workers takes one tenant at a time, decides under that tenant's lock, and binds
//! through `pods/binding` outside it. Pods that fit nowhere get `PodScheduled=False`
//! (`Unschedulable`, with upstream's message) and an Event, and are retried as soon as their
//! tenant gains a node or capacity.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, future::join_all};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};

use canopy_controllers::events::{EventSink, Recorder};

use crate::{
    metrics::SchedulerMetrics,
    node_info::{NodeInfo, pod_key},
    partition::{Decision, Partition, Timing},
    score::Strategy,
    watched::WatchedPod,
};

/// The label that puts pods and nodes in a tenant's partition.
pub const TENANT_LABEL: &str = canopy_api::tenant::TENANT_LABEL;

/// How the scheduler runs.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Tenants scheduled at once.
    pub workers: usize,
    /// Pods decided per turn of a worker on a tenant (their bindings run concurrently).
    pub batch: usize,
    /// How nodes are ranked.
    pub strategy: Strategy,
    /// Pods with this `spec.schedulerName` are ours.
    pub scheduler_name: String,
    /// Bindings and status writes in flight at once, across tenants.
    pub max_inflight_writes: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            workers: 16,
            batch: 64,
            strategy: Strategy::LeastAllocated,
            scheduler_name: "default-scheduler".into(),
            max_inflight_writes: 64,
        }
    }
}

/// Where bound pods and nodes are, across partitions.
#[derive(Default)]
struct Placement {
    /// Node name → its tenant (partition key).
    node_tenant: HashMap<String, String>,
    /// Pod key → (node, pod) for every bound, non-terminal pod, including pods on nodes not
    /// seen yet.
    bound: HashMap<String, (String, Arc<Pod>)>,
    /// The scheduling-relevant part of each node, to retry only on real changes.
    fingerprints: HashMap<String, String>,
}

struct Shared {
    client: Client,
    config: SchedulerConfig,
    partitions: Arc<Mutex<HashMap<String, Arc<Mutex<Partition>>>>>,
    placement: Mutex<Placement>,
    queued: Mutex<HashSet<String>>,
    ready: mpsc::UnboundedSender<String>,
    /// Bounds the scheduler's writes in flight across all workers, so that it does not
    /// crowd out other clients of the API server's mutating requests.
    writes: Semaphore,
    metrics: SchedulerMetrics,
    events: Recorder,
}

fn tenant_of<K: kube::Resource>(obj: &K) -> String {
    obj.labels().get(TENANT_LABEL).cloned().unwrap_or_default()
}

fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// What about a node matters to scheduling (not its heartbeats).
fn fingerprint(node: &Node) -> String {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone());
    serde_json::to_string(&json!({
        "labels": node.metadata.labels,
        "spec": node.spec,
        "allocatable": node.status.as_ref().and_then(|s| s.allocatable.clone()),
        "ready": ready,
    }))
    .unwrap_or_default()
}

impl Shared {
    fn partition(&self, tenant: &str) -> Arc<Mutex<Partition>> {
        self.partitions
            .lock()
            .entry(tenant.to_string())
            .or_default()
            .clone()
    }

    fn wake(&self, tenant: &str) {
        if self.queued.lock().insert(tenant.to_string()) {
            let _ = self.ready.send(tenant.to_string());
        }
    }

    fn on_pod(&self, pod: Arc<Pod>) {
        let key = pod_key(&pod);
        let tenant = tenant_of(&*pod);
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        if finished(&pod) {
            self.pod_gone(&key, &tenant);
            return;
        }
        match node {
            Some(node) => {
                let mut placement = self.placement.lock();
                placement
                    .bound
                    .insert(key.clone(), (node.clone(), pod.clone()));
                let partition = placement.node_tenant.get(&node).cloned();
                drop(placement);
                // A bound peer may satisfy a waiting pod's required affinity.
                if let Some(node_tenant) = &partition
                    && self.partition(node_tenant).lock().bound(pod, &node)
                {
                    self.wake(node_tenant);
                }
                // A pod bound by someone else no longer waits in its own tenant's queue.
                if partition.as_deref() != Some(tenant.as_str()) {
                    self.partition(&tenant).lock().remove_pod(&key, None);
                }
            }
            None => {
                let ours = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.scheduler_name.as_deref())
                    .unwrap_or("default-scheduler")
                    == self.config.scheduler_name;
                if !ours || pod.metadata.deletion_timestamp.is_some() {
                    return;
                }
                if self.partition(&tenant).lock().enqueue(pod) {
                    self.wake(&tenant);
                }
            }
        }
    }

    fn pod_gone(&self, key: &str, tenant: &str) {
        let mut placement = self.placement.lock();
        let bound = placement.bound.remove(key);
        let node_tenant = bound
            .as_ref()
            .and_then(|(node, _)| placement.node_tenant.get(node).cloned());
        drop(placement);
        self.partition(tenant).lock().remove_pod(key, None);
        if let (Some((node, _)), Some(node_tenant)) = (bound, node_tenant) {
            let partition = self.partition(&node_tenant);
            let mut partition = partition.lock();
            // Freed capacity: the tenant's unschedulable pods may fit now.
            if partition.remove_pod(key, Some(&node)) && partition.activate_unschedulable() {
                drop(partition);
                self.wake(&node_tenant);
            }
        }
    }

    fn on_node(&self, node: Arc<Node>) {
        let name = node.name_any();
        let tenant = tenant_of(&*node);
        let print = fingerprint(&node);
        let mut placement = self.placement.lock();
        let previous = placement.node_tenant.insert(name.clone(), tenant.clone());
        let changed = placement.fingerprints.insert(name.clone(), print.clone()) != Some(print);
        drop(placement);
        match previous {
            Some(old) if old == tenant => {
                self.partition(&tenant).lock().update_node(node);
            }
            _ => {
                // New, or moved to another tenant: it takes its pods along.
                let mut info =
                    match previous.and_then(|old| self.partition(&old).lock().take_node(&name)) {
                        Some(info) => info,
                        None => self.new_node_info(&node),
                    };
                info.set_node(node);
                self.partition(&tenant).lock().put_node(info);
            }
        }
        if changed && self.partition(&tenant).lock().activate_unschedulable() {
            self.wake(&tenant);
        }
    }

    /// A node seen for the first time, with the pods already bound to it.
    fn new_node_info(&self, node: &Arc<Node>) -> NodeInfo {
        let name = node.name_any();
        let mut info = NodeInfo::new(node.clone());
        for (bound_to, pod) in self.placement.lock().bound.values() {
            if *bound_to == name {
                info.add_pod(pod.clone());
            }
        }
        info
    }

    fn on_node_deleted(&self, name: &str) {
        let mut placement = self.placement.lock();
        placement.fingerprints.remove(name);
        if let Some(tenant) = placement.node_tenant.remove(name) {
            drop(placement);
            self.partition(&tenant).lock().take_node(name);
        }
    }

    /// One turn on a tenant: decide a batch under its lock, then write outside it.
    async fn turn(self: Arc<Self>, tenant: String) {
        self.queued.lock().remove(&tenant);
        let partition = self.partition(&tenant);
        let decisions = partition
            .lock()
            .decide(self.config.batch, self.config.strategy);
        let profile = &self.config.scheduler_name;
        for decision in &decisions {
            let timing = decision.timing();
            let result = match decision {
                Decision::Bind { .. } => "scheduled",
                Decision::Unschedulable { .. } => "unschedulable",
            };
            self.metrics
                .attempt(result, profile, timing.decided_in, timing.waited);
        }
        let writes = decisions.into_iter().map(|decision| {
            let this = self.clone();
            let partition = partition.clone();
            let tenant = tenant.clone();
            async move {
                let Ok(_slot) = this.writes.acquire().await else {
                    return;
                };
                match decision {
                    Decision::Bind { pod, node, timing } => {
                        this.bind(&partition, &tenant, pod, node, timing).await
                    }
                    Decision::Unschedulable { pod, message, .. } => {
                        this.report_unschedulable(&pod, &message).await
                    }
                }
            }
        });
        join_all(writes).await;
        if partition.lock().has_active() {
            self.wake(&tenant);
        }
    }

    async fn bind(
        &self,
        partition: &Arc<Mutex<Partition>>,
        tenant: &str,
        pod: Arc<Pod>,
        node: String,
        timing: Timing,
    ) {
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": namespace},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        let started = Instant::now();
        let result = api
            .create_subresource::<_, serde_json::Value>(
                "binding",
                &name,
                &PostParams::default(),
                &binding,
            )
            .await;
        let took = started.elapsed();
        let key = pod_key(&pod);
        let profile = &self.config.scheduler_name;
        match result {
            Ok(_) => {
                self.metrics.bound("Success", profile, took);
                self.metrics.scheduled(timing.first_queued.elapsed());
                tracing::debug!(pod = %key, %node, "bound");
            }
            // Gone, or bound by someone else: the pod watch says what became of it.
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
                self.metrics.bound("Conflict", profile, took);
                partition.lock().binding_failed(&key, &node);
                partition.lock().remove_pod(&key, None);
            }
            Err(err) => {
                self.metrics.bound("Error", profile, took);
                self.metrics.error(profile);
                tracing::warn!(pod = %key, %node, error = %err, "binding failed; retrying");
                let attempts = partition.lock().binding_failed(&key, &node).unwrap_or(1);
                let delay = Duration::from_secs(1 << attempts.min(4));
                let partition = partition.clone();
                let ready = self.ready.clone();
                let tenant = tenant.to_string();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if partition.lock().activate(&key) {
                        let _ = ready.send(tenant);
                    }
                });
            }
        }
    }

    async fn report_unschedulable(&self, pod: &Pod, message: &str) {
        let current = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"));
        if current.is_some_and(|c| c.status == "False" && c.message.as_deref() == Some(message)) {
            return;
        }
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let patch = json!({"status": {"conditions": [{
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastTransitionTime": now,
        }]}});
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        if let Err(err) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            tracing::debug!(pod = %name, error = %err, "could not mark a pod unschedulable");
            return;
        }
        self.events.warning(pod, "FailedScheduling", message);
    }
}

/// Runs the scheduler until its watches end.
pub async fn run(client: Client, config: SchedulerConfig, metrics: SchedulerMetrics) {
    let (ready, mut tenants) = mpsc::unbounded_channel::<String>();
    let workers = Arc::new(Semaphore::new(config.workers.max(1)));
    let event_sink = EventSink::default();
    let events = event_sink.recorder(config.scheduler_name.clone());
    let event_client = client.clone();
    let config_writes = config.max_inflight_writes.max(1);
    let shared = Arc::new(Shared {
        client: client.clone(),
        config,
        partitions: Default::default(),
        placement: Default::default(),
        queued: Default::default(),
        ready,
        writes: Semaphore::new(config_writes),
        events,
        metrics,
    });
    shared.metrics.watch_queues(shared.partitions.clone());

    let nodes = {
        let shared = shared.clone();
        let mut seen: HashSet<String> = HashSet::new();
        let mut relisted: Option<HashSet<String>> = None;
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .for_each(move |event| {
                match event {
                    Ok(watcher::Event::Apply(node)) | Ok(watcher::Event::InitApply(node)) => {
                        if let Some(fresh) = relisted.as_mut() {
                            fresh.insert(node.name_any());
                        }
                        seen.insert(node.name_any());
                        shared.on_node(Arc::new(node));
                    }
                    Ok(watcher::Event::Delete(node)) => {
                        seen.remove(&node.name_any());
                        shared.on_node_deleted(&node.name_any());
                    }
                    Ok(watcher::Event::Init) => relisted = Some(HashSet::new()),
                    Ok(watcher::Event::InitDone) => {
                        let fresh = relisted.take().unwrap_or_default();
                        for gone in seen.difference(&fresh) {
                            shared.on_node_deleted(gone);
                        }
                        seen = fresh;
                    }
                    Err(err) => tracing::debug!(error = %err, "node watch failed; retrying"),
                }
                futures::future::ready(())
            })
    };
    let pods = {
        let shared = shared.clone();
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut relisted: Option<HashMap<String, String>> = None;
        watcher(Api::<WatchedPod>::all(client), watcher::Config::default())
            .default_backoff()
            .for_each(move |event| {
                match event {
                    Ok(watcher::Event::Apply(WatchedPod(pod)))
                    | Ok(watcher::Event::InitApply(WatchedPod(pod))) => {
                        let key = pod_key(&pod);
                        let tenant = tenant_of(&pod);
                        if let Some(fresh) = relisted.as_mut() {
                            fresh.insert(key.clone(), tenant.clone());
                        }
                        seen.insert(key, tenant);
                        shared.on_pod(Arc::new(pod));
                    }
                    Ok(watcher::Event::Delete(WatchedPod(pod))) => {
                        let key = pod_key(&pod);
                        seen.remove(&key);
                        shared.pod_gone(&key, &tenant_of(&pod));
                    }
                    Ok(watcher::Event::Init) => relisted = Some(HashMap::new()),
                    Ok(watcher::Event::InitDone) => {
                        let fresh = relisted.take().unwrap_or_default();
                        for (key, tenant) in &seen {
                            if !fresh.contains_key(key) {
                                shared.pod_gone(key, tenant);
                            }
                        }
                        seen = fresh;
                    }
                    Err(err) => tracing::debug!(error = %err, "pod watch failed; retrying"),
                }
                futures::future::ready(())
            })
    };
    let dispatch = async move {
        while let Some(tenant) = tenants.recv().await {
            let Ok(permit) = workers.clone().acquire_owned().await else {
                return;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                shared.turn(tenant).await;
                drop(permit);
            });
        }
    };
    tokio::join!(nodes, pods, dispatch, event_sink.run(event_client));
}
