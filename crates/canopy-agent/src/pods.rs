//! The pods bound to this node: one watch (`fieldSelector=spec.nodeName=<node>`), one worker
//! task per pod, as upstream's kubelet pod workers.
//!
//! A worker compares what the pod asks for with what the runtime has, acts (creates the
//! sandbox, starts init containers one after another, then the containers, restarts exited
//! ones per `restartPolicy` with upstream's crash-loop back-off), and writes the pod's
//! status when it changed. It runs again when the pod changes, when one of its containers
//! starts or exits (the runtime's events), or when a back-off expires. A pod being deleted
//! gets its containers stopped within its grace period, its sandbox removed, and is then
//! deleted for good with grace 0, as the kubelet does.
//!
//! Nothing of a pod lives only in memory: after a restart the agent finds its containers in
//! the runtime and carries on (adoption), and removes sandboxes of pods no longer bound here.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use canopy_image::{Image, ImageStore};
use canopy_runtime::{
    BindMount, ContainerSpec, ContainerState, ContainerStatus, Runtime, SandboxSpec,
};
use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Container, Pod},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::watcher,
};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    probe,
    spec::{self, ConfigError, NodeAllocatable},
    status::{self, ContainerView, Run, RunState},
    volumes::{self, Prepared, Sources},
};

/// How often a pod's ConfigMap, Secret and downward API volumes are refreshed when nothing
/// else wakes its worker (upstream: the kubelet's one-minute sync).
const VOLUME_REFRESH: Duration = Duration::from_secs(60);

/// What a pod's containers are configured from: the objects it references and its volumes
/// on the node, or why they could not be had.
type PodConfig = Result<(Sources, Prepared), ConfigError>;

/// Upstream's crash-loop back-off: 10 s, doubling, at most 5 minutes; forgotten once a
/// container ran for twice the maximum.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(10);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Prefix of container IDs in pod statuses (upstream writes `<runtime>://<id>`).
pub const CONTAINER_ID_PREFIX: &str = "canopy://";

/// What every pod worker shares.
pub struct Context {
    pub client: Client,
    pub runtime: Runtime,
    pub images: Arc<ImageStore>,
    pub node_name: String,
    pub host_ip: Option<String>,
    pub node: NodeAllocatable,
    /// Where pods' volumes live (`<dir>/<uid>/volumes/...`).
    pub pods_dir: PathBuf,
    /// Where containers' logs go (`<dir>/<namespace>_<name>_<uid>/<container>/<n>.log`).
    pub log_dir: PathBuf,
    /// The resolvers pods' resolv.conf names, per their dnsPolicy.
    pub dns: crate::dns::PodDns,
    /// How pods get their network.
    pub pod_network: crate::PodNetwork,
    workers: Mutex<HashMap<String, Worker>>,
    probes: Arc<probe::Results>,
    tokens: volumes::Tokens,
    /// Events about the node's pods, as upstream's kubelet records them.
    pub events: canopy_controllers::events::Recorder,
}

struct Worker {
    pod: watch::Sender<Update>,
    wake: Arc<Notify>,
}

/// The latest word on a pod.
#[derive(Clone)]
enum Update {
    Present(Arc<Pod>),
    /// Deleted from the API (or no longer bound here) without the agent finishing it.
    Gone(Arc<Pod>),
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        runtime: Runtime,
        images: Arc<ImageStore>,
        node_name: String,
        host_ip: Option<String>,
        node: NodeAllocatable,
        pods_dir: PathBuf,
        log_dir: PathBuf,
        dns: crate::dns::PodDns,
        pod_network: crate::PodNetwork,
        events: canopy_controllers::events::Recorder,
    ) -> Arc<Context> {
        Arc::new(Context {
            client,
            runtime,
            images,
            node_name,
            host_ip,
            node,
            pods_dir,
            log_dir,
            dns,
            pod_network,
            workers: Mutex::new(HashMap::new()),
            tokens: volumes::Tokens::default(),
            probes: Arc::default(),
            events,
        })
    }

    /// The pod bound here with this namespace and name.
    pub fn pod_named(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        let workers = self.workers.lock();
        workers.values().find_map(|w| match &*w.pod.borrow() {
            Update::Present(pod)
                if pod.metadata.namespace.as_deref() == Some(namespace)
                    && pod.metadata.name.as_deref() == Some(name) =>
            {
                Some(pod.clone())
            }
            _ => None,
        })
    }

    /// The image IDs that pods of this node use, which image GC must keep.
    pub fn images_in_use(&self) -> HashSet<String> {
        let names: HashSet<String> = {
            let workers = self.workers.lock();
            workers
                .values()
                .filter_map(|w| match &*w.pod.borrow() {
                    Update::Present(pod) => Some(pod.clone()),
                    Update::Gone(_) => None,
                })
                .flat_map(|pod| {
                    pod.spec
                        .iter()
                        .flat_map(|s| {
                            s.containers
                                .iter()
                                .chain(s.init_containers.iter().flatten())
                        })
                        .filter_map(|c| {
                            c.image
                                .as_deref()
                                .and_then(|i| canopy_image::normalize(i).ok())
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        // One read of the store's index for all pods, outside the workers' lock.
        self.images
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|image| {
                image
                    .names
                    .iter()
                    .chain(&image.repo_digests)
                    .any(|name| names.contains(name))
            })
            .map(|image| image.id)
            .collect()
    }

    fn deliver(self: &Arc<Self>, uid: &str, update: Update) {
        let mut workers = self.workers.lock();
        match workers.get(uid) {
            Some(worker) => {
                worker.pod.send_replace(update);
            }
            None => {
                let (tx, rx) = watch::channel(update);
                let wake = Arc::new(Notify::new());
                workers.insert(
                    uid.to_string(),
                    Worker {
                        pod: tx,
                        wake: wake.clone(),
                    },
                );
                tokio::spawn(run_worker(self.clone(), uid.to_string(), rx, wake));
            }
        }
    }

    fn wake(&self, uid: &str) {
        if let Some(worker) = self.workers.lock().get(uid) {
            worker.wake.notify_one();
        }
    }
}

fn uid_of(pod: &Pod) -> Option<&str> {
    pod.metadata.uid.as_deref()
}

/// Watches the node's pods and feeds their workers until `shutdown`. Containers keep
/// running when the agent stops: the next agent adopts them.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node_name));
    let mut pods = watcher(api, config).boxed();
    let mut events = ctx.runtime.subscribe();
    let mut known: HashMap<String, Arc<Pod>> = HashMap::new();
    let mut relisting: Option<HashMap<String, Arc<Pod>>> = None;
    let mut orphans_checked = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.recv() => match event {
                Ok(event) => ctx.wake(&event.pod_uid),
                // Missed events: wake everyone, they re-read the runtime.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for uid in known.keys() {
                        ctx.wake(uid);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    events = ctx.runtime.subscribe();
                }
            },
            event = pods.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(watcher::Event::Apply(pod)) => {
                        if let Some(uid) = uid_of(&pod).map(str::to_string) {
                            let pod = Arc::new(pod);
                            known.insert(uid.clone(), pod.clone());
                            ctx.deliver(&uid, Update::Present(pod));
                        }
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        if let Some(uid) = uid_of(&pod).map(str::to_string) {
                            known.remove(&uid);
                            ctx.deliver(&uid, Update::Gone(Arc::new(pod)));
                        }
                    }
                    Ok(watcher::Event::Init) => relisting = Some(HashMap::new()),
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let (Some(list), Some(uid)) = (relisting.as_mut(), uid_of(&pod)) {
                            list.insert(uid.to_string(), Arc::new(pod));
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        let listed = relisting.take().unwrap_or_default();
                        for (uid, pod) in &known {
                            if !listed.contains_key(uid) {
                                ctx.deliver(uid, Update::Gone(pod.clone()));
                            }
                        }
                        for (uid, pod) in &listed {
                            ctx.deliver(uid, Update::Present(pod.clone()));
                        }
                        known = listed;
                        if !orphans_checked {
                            orphans_checked = true;
                            remove_orphans(&ctx, &known).await;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, "watching the node's pods failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }
}

/// Sandboxes of pods that are no longer bound here (deleted while the agent was down).
async fn remove_orphans(ctx: &Arc<Context>, known: &HashMap<String, Arc<Pod>>) {
    let sandboxes = match ctx.runtime.list_sandboxes().await {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(error = %error, "listing sandboxes failed");
            return;
        }
    };
    for sandbox in sandboxes {
        if known.contains_key(&sandbox.pod_uid) {
            continue;
        }
        tracing::info!(pod_uid = %sandbox.pod_uid, "removing the sandbox of a pod no longer bound here");
        if let Err(error) = ctx.runtime.remove_sandbox(&sandbox.pod_uid).await {
            tracing::warn!(pod_uid = %sandbox.pod_uid, error = %error, "removing an orphaned sandbox failed");
        }
        remove_pod_dirs(ctx, &sandbox.pod_uid, None);
    }
    // After a reboot the sandboxes (runtime state, on tmpfs) are gone while volumes and logs
    // (on disk) stay: sweep those of pods no longer bound here too.
    let known: HashSet<String> = known.keys().cloned().collect();
    let (pods_dir, log_dir) = (ctx.pods_dir.clone(), ctx.log_dir.clone());
    let _ = tokio::task::spawn_blocking(move || sweep_dirs(&pods_dir, &log_dir, &known)).await;
}

fn sweep_dirs(pods_dir: &std::path::Path, log_dir: &std::path::Path, known: &HashSet<String>) {
    for entry in std::fs::read_dir(pods_dir).into_iter().flatten().flatten() {
        let uid = entry.file_name().to_string_lossy().into_owned();
        if !known.contains(&uid) {
            tracing::info!(pod_uid = %uid, "removing the volumes of a pod no longer bound here");
            volumes::unmount_all(&entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    for entry in std::fs::read_dir(log_dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // `<namespace>_<name>_<uid>`: names and namespaces hold no `_`, uids none either.
        if let Some((_, uid)) = name.rsplit_once('_')
            && !known.contains(uid)
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn remove_pod_dirs(ctx: &Context, uid: &str, pod: Option<&Pod>) {
    ctx.tokens.forget(uid);
    let volumes = ctx.pods_dir.join(uid);
    volumes::unmount_all(&volumes);
    let _ = std::fs::remove_dir_all(&volumes);
    if let Some(pod) = pod {
        let _ = std::fs::remove_dir_all(ctx.log_dir.join(log_dir_name(pod)));
    } else if let Ok(entries) = std::fs::read_dir(&ctx.log_dir) {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .ends_with(&format!("_{uid}"))
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn log_dir_name(pod: &Pod) -> String {
    format!(
        "{}_{}_{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default()
    )
}

/// A worker's memory between syncs; none of it is needed to recover after a restart.
#[derive(Default)]
struct WorkerState {
    /// Crash-loop back-off per container name.
    backoff: HashMap<String, Duration>,
    /// Image pull failures per image, with their back-off.
    pull_backoff: HashMap<String, (Timestamp, Duration, String)>,
    /// The status last written, not to write it again unchanged.
    written: Option<serde_json::Value>,
    start_time: Option<Timestamp>,
}

async fn run_worker(
    ctx: Arc<Context>,
    uid: String,
    mut updates: watch::Receiver<Update>,
    wake: Arc<Notify>,
) {
    let mut state = WorkerState::default();
    loop {
        let update = updates.borrow_and_update().clone();
        let next = match update {
            Update::Present(pod) if pod.metadata.deletion_timestamp.is_none() => {
                sync(&ctx, &pod, &mut state, &wake).await
            }
            Update::Present(pod) => match terminate(&ctx, &pod, true, &mut state).await {
                Ok(()) => break,
                Err(error) => Err(error),
            },
            Update::Gone(pod) => match terminate(&ctx, &pod, false, &mut state).await {
                Ok(()) => break,
                Err(error) => Err(error),
            },
        };
        let wait = match next {
            Ok(wait) => wait,
            Err(error) => {
                tracing::warn!(pod_uid = %uid, error = format!("{error:#}"), "syncing a pod failed; retrying");
                Some(Duration::from_secs(1))
            }
        };
        tokio::select! {
            changed = updates.changed() => if changed.is_err() { break },
            _ = wake.notified() => {}
            _ = async {
                match wait {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
    let mut workers = ctx.workers.lock();
    // A pod re-created with the same uid cannot happen; a late update after termination
    // finds no worker and starts a new one, which finds nothing to do.
    workers.remove(&uid);
}

fn container_views_of(
    containers: &[Container],
    runs: &HashMap<String, Vec<ContainerStatus>>,
    probes: &probe::Results,
) -> Vec<ContainerView> {
    containers
        .iter()
        .map(|c| {
            let mut history: Vec<&ContainerStatus> =
                runs.get(&c.name).into_iter().flatten().collect();
            history.sort_by_key(|r| r.attempt);
            let current = history.last().and_then(|r| to_run(r));
            let previous = history
                .len()
                .checked_sub(2)
                .and_then(|i| to_run(history[i]));
            ContainerView {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                image_id: history
                    .last()
                    .and_then(|r| r.labels.get(IMAGE_ID_LABEL).cloned())
                    .unwrap_or_default(),
                ready: history.last().is_some_and(|r| probes.ready(&r.id, c)),
                started: history.last().is_some_and(|r| probes.started(&r.id, c)),
                current,
                previous,
                waiting: None,
            }
        })
        .collect()
}

const IMAGE_ID_LABEL: &str = "io.canopy.image-id";
/// The hash of the container's spec it was started from (upstream's label name): a running
/// container whose pod now says otherwise (a new image) is restarted.
const HASH_LABEL: &str = "io.kubernetes.container.hash";

/// A stable hash of a container's spec: the first 8 bytes of the SHA-256 of its JSON.
fn container_hash(container: &Container) -> String {
    use sha2::{Digest, Sha256};
    let json = serde_json::to_vec(container).unwrap_or_default();
    Sha256::digest(json)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The runtime id of the container's current run when it was started from another spec
/// than the pod's current one. Containers started before the hash was recorded count as
/// unchanged.
fn changed_run<'a>(
    runs: &'a HashMap<String, Vec<ContainerStatus>>,
    container: &Container,
    run: &Run,
) -> Option<&'a str> {
    let current = runs
        .get(&container.name)?
        .iter()
        .find(|r| r.attempt == run.attempt)?;
    let hash = current.labels.get(HASH_LABEL)?;
    (*hash != container_hash(container)).then_some(current.id.as_str())
}

fn chrono_to_jiff(t: &chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32)
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

fn to_run(status: &ContainerStatus) -> Option<Run> {
    let state = match &status.state {
        ContainerState::Created => return None,
        ContainerState::Running { started_at, .. } => RunState::Running {
            started_at: chrono_to_jiff(started_at),
        },
        ContainerState::Exited {
            exit_code,
            signal,
            oom_killed,
            started_at,
            finished_at,
        } => RunState::Exited {
            exit_code: *exit_code,
            signal: *signal,
            reason: status::exit_reason(*exit_code, *oom_killed).into(),
            message: None,
            started_at: started_at.as_ref().map(chrono_to_jiff),
            finished_at: chrono_to_jiff(finished_at),
        },
    };
    Some(Run {
        container_id: format!("{CONTAINER_ID_PREFIX}{}", status.id),
        attempt: status.attempt,
        state,
    })
}

/// What to do with a container whose latest run exited (or that never ran).
enum Next {
    Start(u32),
    Wait,
    Done,
}

fn restart_needed(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

async fn sync(
    ctx: &Arc<Context>,
    pod: &Arc<Pod>,
    state: &mut WorkerState,
    wake: &Arc<Notify>,
) -> Result<Option<Duration>> {
    let uid = uid_of(pod).context("pod without uid")?.to_string();
    let spec = pod.spec.as_ref().context("pod without spec")?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let start_time = *state.start_time.get_or_insert_with(Timestamp::now);
    let restart_policy = spec.restart_policy.as_deref().unwrap_or("Always");
    let init = spec.init_containers.clone().unwrap_or_default();
    let mut wake_after: Option<Duration> = None;
    let mut soonest = |d: Duration| {
        wake_after = Some(wake_after.map_or(d, |w: Duration| w.min(d)));
    };
    // A pod that finished stays finished: nothing is restarted.
    let terminal = matches!(phase, Some("Succeeded" | "Failed"));

    let runs = group_runs(ctx.runtime.list_containers(&uid).await?);
    let mut pod_ip: Option<std::net::Ipv4Addr> = None;
    let mut init_views = container_views_of(&init, &runs, &ctx.probes);
    let mut views = container_views_of(&spec.containers, &runs, &ctx.probes);

    if !terminal {
        let sandbox = ctx
            .runtime
            .create_sandbox(&SandboxSpec {
                pod_uid: uid.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
                hostname: spec.hostname.clone().unwrap_or_else(|| name.clone()),
                dns: ctx.dns.for_pod(pod),
                hosts: Vec::new(),
            })
            .await
            .with_context(|| format!("creating the sandbox of pod {namespace}/{name}"))?;
        let network_ready = match ctx.pod_network {
            crate::PodNetwork::Loopback => true,
            crate::PodNetwork::Ports => match pod_network(pod, &sandbox).await {
                Ok(ip) => {
                    pod_ip = Some(ip);
                    true
                }
                Err(retry) => {
                    if let Some(retry) = retry {
                        soonest(retry);
                    }
                    false
                }
            },
        };
        let config = pod_config(ctx, pod, &uid).await;
        if let Err(error) = &config {
            tracing::warn!(pod = %pod_ref(pod), error = %error, "the pod's volumes or configuration cannot be set up");
        }
        if volumes::has_live_content(pod) {
            soonest(VOLUME_REFRESH);
        }
        // Init containers, one at a time, in order; nothing starts before the pod's network.
        let mut init_done = network_ready;
        for (i, container) in init.iter().enumerate().filter(|_| network_ready) {
            let view = &init_views[i];
            let next = match &view.current {
                Some(run) if run.running() => {
                    init_done = false;
                    break;
                }
                Some(run) if run.exit_code() == Some(0) => continue,
                Some(run) => {
                    init_done = false;
                    if restart_policy == "Never" {
                        break;
                    }
                    backoff_next(state, &container.name, run)
                }
                None => {
                    init_done = false;
                    Next::Start(0)
                }
            };
            if let Err(wait) = act(
                ctx,
                pod,
                &sandbox,
                &config,
                container,
                next,
                state,
                &mut init_views[i],
            )
            .await
            {
                soonest(wait);
            }
            break;
        }
        if init_done {
            for (i, container) in spec.containers.iter().enumerate() {
                let view = &views[i];
                let next = match &view.current {
                    Some(run)
                        if let Some(id) =
                            changed_run(&runs, container, run).filter(|_| run.running()) =>
                    {
                        let message = format!(
                            "Container {} definition changed, will be restarted",
                            container.name
                        );
                        tracing::info!(pod = %pod_ref(pod), container = %container.name, "{message}");
                        ctx.events.normal(&**pod, "Killing", message);
                        let grace = Duration::from_secs(
                            spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64,
                        );
                        ctx.runtime.stop_container(id, grace, None).await?;
                        // A new definition is no crash: it starts without back-off.
                        state.backoff.remove(&container.name);
                        Next::Start(run.attempt + 1)
                    }
                    Some(run) if run.running() => continue,
                    Some(run) => {
                        if !restart_needed(restart_policy, run.exit_code().unwrap_or(1)) {
                            continue;
                        }
                        backoff_next(state, &container.name, run)
                    }
                    None => Next::Start(0),
                };
                if let Err(wait) = act(
                    ctx,
                    pod,
                    &sandbox,
                    &config,
                    container,
                    next,
                    state,
                    &mut views[i],
                )
                .await
                {
                    soonest(wait);
                }
            }
        }
        // Started containers show as running at once, with the probes of running ones
        // started before the views read their results.
        let runs = group_runs(ctx.runtime.list_containers(&uid).await?);
        remove_old_runs(ctx, &runs).await;
        watch_probes(ctx, pod, &sandbox, &runs, wake);
        let waiting: HashMap<String, (String, String)> = init_views
            .iter()
            .chain(views.iter())
            .filter_map(|v| v.waiting.clone().map(|w| (v.name.clone(), w)))
            .collect();
        init_views = container_views_of(&init, &runs, &ctx.probes);
        views = container_views_of(&spec.containers, &runs, &ctx.probes);
        for view in init_views.iter_mut().chain(views.iter_mut()) {
            if let Some(w) = waiting.get(&view.name)
                && !view.current.as_ref().is_some_and(Run::running)
            {
                view.waiting = Some(w.clone());
            }
        }
    }

    let pod_ip = pod_ip.map(|ip| ip.to_string());
    let status = status::pod_status(
        pod,
        ctx.host_ip.as_deref(),
        pod_ip.as_deref(),
        !terminal,
        &init_views,
        &views,
        start_time,
    );
    write_status(ctx, pod, &status, state).await?;
    Ok(wake_after)
}

/// Starts the probes of the pod's running containers and forgets those of its containers
/// that stopped.
fn watch_probes(
    ctx: &Arc<Context>,
    pod: &Pod,
    sandbox: &canopy_runtime::Sandbox,
    runs: &HashMap<String, Vec<ContainerStatus>>,
    wake: &Arc<Notify>,
) {
    let uid = uid_of(pod).unwrap_or_default();
    let running: HashSet<&str> = runs
        .values()
        .flatten()
        .filter(|r| matches!(r.state, ContainerState::Running { .. }))
        .map(|r| r.id.as_str())
        .collect();
    ctx.probes
        .retain(&|id: &str| !id.starts_with(uid) || running.contains(id));
    let grace = Duration::from_secs(
        pod.spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
            .max(0) as u64,
    );
    // Events name the pod; its metadata is all they need.
    let mut subject: Option<Arc<Pod>> = None;
    for container in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        let has_probes = container.liveness_probe.is_some()
            || container.readiness_probe.is_some()
            || container.startup_probe.is_some();
        let current = runs
            .get(&container.name)
            .and_then(|h| h.iter().max_by_key(|r| r.attempt));
        if let Some(run) = current
            && has_probes
            && running.contains(run.id.as_str())
        {
            probe::ensure(
                &ctx.probes,
                probe::Target {
                    runtime: ctx.runtime.clone(),
                    container_id: run.id.clone(),
                    container: container.clone(),
                    netns: sandbox.netns_path.clone(),
                    grace,
                    wake: wake.clone(),
                    pod: pod_ref(pod),
                    subject: subject
                        .get_or_insert_with(|| {
                            Arc::new(Pod {
                                metadata: pod.metadata.clone(),
                                ..Pod::default()
                            })
                        })
                        .clone(),
                    events: ctx.events.clone(),
                },
            );
        }
    }
}

fn pod_ref(pod: &Pod) -> String {
    format!(
        "{}_{}({})",
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default()
    )
}

/// Upstream's crash-loop back-off, counted from when the container exited.
fn backoff_next(state: &mut WorkerState, name: &str, run: &Run) -> Next {
    let RunState::Exited {
        finished_at,
        started_at,
        ..
    } = &run.state
    else {
        return Next::Done;
    };
    // A container that ran long enough is forgiven its earlier crashes.
    if let Some(started) = started_at
        && finished_at.duration_since(*started)
            > SignedDuration::try_from(2 * BACKOFF_MAX).unwrap_or(SignedDuration::MAX)
    {
        state.backoff.remove(name);
    }
    if let Some(delay) = state.backoff.get(name) {
        let since = Timestamp::now().duration_since(*finished_at);
        let delay_signed = SignedDuration::try_from(*delay).unwrap_or(SignedDuration::MAX);
        if since < delay_signed {
            return Next::Wait;
        }
    }
    Next::Start(run.attempt + 1)
}

/// Starts a container (or records why it waits). `Err(wait)` asks for another sync then.
#[allow(clippy::too_many_arguments)]
async fn act(
    ctx: &Arc<Context>,
    pod: &Pod,
    sandbox: &canopy_runtime::Sandbox,
    config: &PodConfig,
    container: &Container,
    next: Next,
    state: &mut WorkerState,
    view: &mut ContainerView,
) -> Result<(), Duration> {
    match next {
        Next::Done => Ok(()),
        Next::Wait => {
            let delay = state
                .backoff
                .get(&container.name)
                .copied()
                .unwrap_or(BACKOFF_INITIAL);
            ctx.events.warning(
                pod,
                "BackOff",
                format!(
                    "Back-off restarting failed container {} in pod {}",
                    container.name,
                    pod_ref(pod)
                ),
            );
            view.waiting = Some((
                "CrashLoopBackOff".into(),
                format!(
                    "back-off {} restarting failed container={} pod={}",
                    humanize(delay),
                    container.name,
                    pod_ref(pod)
                ),
            ));
            let finished = view.current.as_ref().and_then(|r| match &r.state {
                RunState::Exited { finished_at, .. } => Some(*finished_at),
                RunState::Running { .. } => None,
            });
            let elapsed = finished
                .map(|f| Timestamp::now().duration_since(f).unsigned_abs())
                .unwrap_or_default();
            Err(delay.saturating_sub(elapsed).max(Duration::from_millis(50)))
        }
        Next::Start(attempt) => {
            match start(ctx, pod, sandbox, config, container, attempt, state).await {
                Ok(()) => {
                    ctx.events.normal(
                        pod,
                        "Created",
                        format!("Created container: {}", container.name),
                    );
                    ctx.events.normal(
                        pod,
                        "Started",
                        format!("Started container {}", container.name),
                    );
                    if attempt > 0 {
                        let delay = state
                            .backoff
                            .get(&container.name)
                            .map_or(BACKOFF_INITIAL, |d| (*d * 2).min(BACKOFF_MAX));
                        state.backoff.insert(container.name.clone(), delay);
                    }
                    Ok(())
                }
                Err(StartFailure {
                    reason,
                    message,
                    retry,
                }) => {
                    ctx.events
                        .warning(pod, "Failed", format!("Error: {message}"));
                    view.waiting = Some((reason, message));
                    Err(retry)
                }
            }
        }
    }
}

fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m0s", secs / 60)
    } else if secs >= 60 {
        format!("{}m{}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

struct StartFailure {
    reason: String,
    message: String,
    retry: Duration,
}

impl StartFailure {
    fn config(error: ConfigError) -> Self {
        StartFailure {
            reason: "CreateContainerConfigError".into(),
            message: error.0,
            retry: Duration::from_secs(2),
        }
    }
}

/// The image a container runs, as its pull policy says.
async fn ensure_image(
    ctx: &Arc<Context>,
    pod: &Pod,
    container: &Container,
    state: &mut WorkerState,
) -> Result<Image, StartFailure> {
    let reference = container.image.clone().unwrap_or_default();
    let normalized = canopy_image::normalize(&reference).map_err(|e| StartFailure {
        reason: "InvalidImageName".into(),
        message: format!("Failed to apply default image tag {reference:?}: {e}"),
        retry: Duration::from_secs(10),
    })?;
    // Normalizing tags an untagged reference `latest`; a digest reference has no tag.
    let latest = normalized.ends_with(":latest");
    let policy = container
        .image_pull_policy
        .clone()
        .unwrap_or_else(|| if latest { "Always" } else { "IfNotPresent" }.into());
    let images = ctx.images.clone();
    let lookup = normalized.clone();
    let lookup_failed = |message: String| StartFailure {
        reason: "ErrImagePull".into(),
        message,
        retry: Duration::from_secs(1),
    };
    let present = tokio::task::spawn_blocking(move || images.get(&lookup))
        .await
        .map_err(|e| lookup_failed(e.to_string()))?
        .map_err(|e| lookup_failed(e.to_string()))?;
    match (policy.as_str(), present) {
        ("Never", Some(image)) | ("IfNotPresent", Some(image)) => {
            ctx.events.normal(
                pod,
                "Pulled",
                format!("Container image {reference:?} already present on machine"),
            );
            Ok(image)
        }
        ("Never", None) => Err(StartFailure {
            reason: "ErrImageNeverPull".into(),
            message: format!(
                "Container image {reference:?} is not present with pull policy of Never"
            ),
            retry: Duration::from_secs(10),
        }),
        (_, present) => {
            if let Some((failed_at, delay, message)) = state.pull_backoff.get(&normalized)
                && Timestamp::now().duration_since(*failed_at).unsigned_abs() < *delay
            {
                if let Some(image) = present {
                    return Ok(image);
                }
                return Err(StartFailure {
                    reason: "ImagePullBackOff".into(),
                    message: format!("Back-off pulling image {reference:?}: {message}"),
                    retry: delay
                        .saturating_sub(Timestamp::now().duration_since(*failed_at).unsigned_abs()),
                });
            }
            ctx.events
                .normal(pod, "Pulling", format!("Pulling image {reference:?}"));
            let pulling = std::time::Instant::now();
            match ctx
                .images
                .pull(&normalized, &canopy_image::RegistryAuth::Anonymous)
                .await
            {
                Ok(image) => {
                    state.pull_backoff.remove(&normalized);
                    ctx.events.normal(
                        pod,
                        "Pulled",
                        format!(
                            "Successfully pulled image {reference:?} in {} ms",
                            pulling.elapsed().as_millis()
                        ),
                    );
                    Ok(image)
                }
                Err(error) => {
                    // A registry that cannot be reached does not stop a present image.
                    if let Some(image) = present {
                        tracing::warn!(image = %reference, error = %error, "pulling failed; using the local image");
                        return Ok(image);
                    }
                    let delay = state
                        .pull_backoff
                        .get(&normalized)
                        .map_or(BACKOFF_INITIAL, |(_, d, _)| (*d * 2).min(BACKOFF_MAX));
                    let message = format!("failed to pull image {reference:?}: {error}");
                    state
                        .pull_backoff
                        .insert(normalized, (Timestamp::now(), delay, error.to_string()));
                    Err(StartFailure {
                        reason: "ErrImagePull".into(),
                        message,
                        retry: delay,
                    })
                }
            }
        }
    }
}

/// Plugs the pod's port into its sandbox. `Err(retry)`: not yet (no port recorded, or the
/// cloud has not plugged it into this VM yet), with when to look again if no pod update
/// will say.
async fn pod_network(
    pod: &Pod,
    sandbox: &canopy_runtime::Sandbox,
) -> Result<std::net::Ipv4Addr, Option<Duration>> {
    let port = match crate::cni::PortInfo::of_pod(pod) {
        Ok(Some(port)) => port,
        // The cloud controller records the port on the pod: that update wakes the worker.
        Ok(None) => return Err(None),
        Err(error) => {
            tracing::warn!(pod = %pod_ref(pod), error = %error, "the pod's port record is unusable");
            return Err(None);
        }
    };
    match crate::cni::add(&sandbox.netns_path, "eth0", &port).await {
        Ok(attached) => Ok(attached.ip),
        Err(crate::cni::CniError::NotReady) => Err(Some(Duration::from_millis(200))),
        Err(error) => {
            tracing::warn!(pod = %pod_ref(pod), error = %error, "plugging the pod's port failed; retrying");
            Err(Some(Duration::from_secs(2)))
        }
    }
}

/// Reads what the pod references and sets up (or refreshes) its volumes.
async fn pod_config(ctx: &Arc<Context>, pod: &Arc<Pod>, uid: &str) -> PodConfig {
    let sources = Sources::fetch(&ctx.client, pod, &ctx.tokens)
        .await
        .map_err(|e| ConfigError(format!("{e:#}")))?;
    let dir = ctx.pods_dir.join(uid).join("volumes");
    let host_ip = ctx.host_ip.clone();
    let node = ctx.node;
    let pod = pod.clone();
    tokio::task::spawn_blocking(move || {
        let host = volumes::VolumeHost {
            dir,
            host_ip: host_ip.as_deref(),
            node: &node,
        };
        volumes::prepare(&host, &pod, &sources).map(|prepared| (sources, prepared))
    })
    .await
    .map_err(|e| ConfigError(format!("setting up volumes: {e}")))?
}

/// The container's volume mounts as bind mounts of the pod's volume directories.
fn mounts(container: &Container, prepared: &Prepared) -> Result<Vec<BindMount>, ConfigError> {
    let mut out = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let (host_path, forced_read_only) =
            prepared.get(&mount.name).cloned().ok_or_else(|| {
                ConfigError(format!("volume {:?} is not defined in the pod", mount.name))
            })?;
        // A subPath is resolved on the host, through whatever the pod's containers left in
        // the volume (a symlink to / would hand the host to the pod); until it is resolved
        // safely (openat beneath the volume, mounting the opened descriptor), it is refused.
        if mount.sub_path.as_deref().is_some_and(|p| !p.is_empty())
            || mount
                .sub_path_expr
                .as_deref()
                .is_some_and(|p| !p.is_empty())
        {
            return Err(ConfigError(format!(
                "volume mount {:?}: subPath and subPathExpr are not supported by this agent yet",
                mount.name
            )));
        }
        out.push(BindMount {
            host_path,
            container_path: mount.mount_path.clone(),
            read_only: forced_read_only || mount.read_only.unwrap_or(false),
        });
    }
    Ok(out)
}

async fn start(
    ctx: &Arc<Context>,
    pod: &Pod,
    sandbox: &canopy_runtime::Sandbox,
    config: &PodConfig,
    container: &Container,
    attempt: u32,
    state: &mut WorkerState,
) -> Result<(), StartFailure> {
    if container.restart_policy.as_deref() == Some("Always") {
        return Err(StartFailure::config(ConfigError(
            "init containers with restartPolicy Always (sidecars) are not supported by this agent yet".into(),
        )));
    }
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Err(StartFailure::config(ConfigError(
            "hostNetwork pods are not supported by this agent".into(),
        )));
    }
    let (sources, prepared) = config
        .as_ref()
        .map_err(|e| StartFailure::config(ConfigError(e.0.clone())))?;
    let image = ensure_image(ctx, pod, container, state).await?;
    let env = spec::environment(
        pod,
        container,
        &image.config.env,
        ctx.host_ip.as_deref(),
        &ctx.node,
        sources,
    )
    .map_err(StartFailure::config)?;
    let args = spec::command_line(container, &image.config.entrypoint, &image.config.cmd, &env)
        .map_err(StartFailure::config)?;
    let resources = spec::resources(container).map_err(StartFailure::config)?;
    let mounts = mounts(container, prepared).map_err(StartFailure::config)?;
    let pod_security = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let security = container.security_context.as_ref();
    let run_as_user = security
        .and_then(|s| s.run_as_user)
        .or(pod_security.and_then(|s| s.run_as_user));
    let run_as_group = security
        .and_then(|s| s.run_as_group)
        .or(pod_security.and_then(|s| s.run_as_group));
    let log_path = ctx
        .log_dir
        .join(log_dir_name(pod))
        .join(&container.name)
        .join(format!("{attempt}.log"));
    let uid = uid_of(pod).unwrap_or_default().to_string();
    let labels = BTreeMap::from([
        (
            "io.kubernetes.pod.name".to_string(),
            pod.metadata.name.clone().unwrap_or_default(),
        ),
        (
            "io.kubernetes.pod.namespace".to_string(),
            pod.metadata.namespace.clone().unwrap_or_default(),
        ),
        ("io.kubernetes.pod.uid".to_string(), uid.clone()),
        (
            "io.kubernetes.container.name".to_string(),
            container.name.clone(),
        ),
        (IMAGE_ID_LABEL.to_string(), image.id.clone()),
        (HASH_LABEL.to_string(), container_hash(container)),
    ]);
    let spec = ContainerSpec {
        pod_uid: uid,
        name: container.name.clone(),
        attempt,
        lower_dirs: image.layers.clone(),
        args,
        env,
        working_dir: container
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .or(image.config.working_dir.clone()),
        user: image.config.user.clone(),
        run_as_user,
        run_as_group,
        // fsGroup joins every container's groups, as upstream, so that the volumes it owns
        // are the containers' to use.
        supplemental_groups: pod_security
            .and_then(|s| s.supplemental_groups.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(pod_security.and_then(|s| s.fs_group))
            .collect(),
        privileged: security.and_then(|s| s.privileged).unwrap_or(false),
        read_only_rootfs: security
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
        cpu_request_millis: resources.cpu_request_millis,
        cpu_limit_millis: resources.cpu_limit_millis,
        memory_limit_bytes: resources.memory_limit_bytes,
        oom_score_adj: Some(oom_score_adj(
            pod,
            resources.memory_request_bytes,
            ctx.node.memory_bytes,
        )),
        mounts,
        log_path,
        labels,
        stdin: container.stdin.unwrap_or(false),
        stdin_once: container.stdin_once.unwrap_or(false),
        tty: container.tty.unwrap_or(false),
    };
    let images = ctx.images.clone();
    let id = image.id.clone();
    let _ = tokio::task::spawn_blocking(move || images.mark_used(&id)).await;
    match ctx.runtime.start_container(sandbox, &spec).await {
        Ok(_) => Ok(()),
        Err(error) => Err(StartFailure {
            reason: "RunContainerError".into(),
            message: error.to_string(),
            retry: state
                .backoff
                .get(&container.name)
                .copied()
                .unwrap_or(BACKOFF_INITIAL),
        }),
    }
}

/// Upstream's OOM score adjustment by QoS class: Guaranteed pods are killed last,
/// BestEffort first, Burstable in between by their share of the node's memory.
fn oom_score_adj(pod: &Pod, memory_request: Option<u64>, node_memory: u64) -> i32 {
    match status::qos_class(pod).as_str() {
        "Guaranteed" => -997,
        "BestEffort" => 1000,
        _ => {
            let request = memory_request.unwrap_or(0) as i128;
            let adj = 1000 - (1000 * request) / (node_memory.max(1) as i128);
            adj.clamp(2, 999) as i32
        }
    }
}

fn group_runs(statuses: Vec<ContainerStatus>) -> HashMap<String, Vec<ContainerStatus>> {
    let mut runs: HashMap<String, Vec<ContainerStatus>> = HashMap::new();
    for status in statuses {
        runs.entry(status.name.clone()).or_default().push(status);
    }
    runs
}

/// Keeps a container's latest two runs (the current one and upstream's lastState, whose log
/// `kubectl logs --previous` reads) and removes older ones.
async fn remove_old_runs(ctx: &Arc<Context>, runs: &HashMap<String, Vec<ContainerStatus>>) {
    for history in runs.values() {
        let mut history: Vec<&ContainerStatus> = history.iter().collect();
        history.sort_by_key(|r| std::cmp::Reverse(r.attempt));
        for old in history.iter().skip(2) {
            if matches!(old.state, ContainerState::Exited { .. })
                && let Err(error) = ctx.runtime.remove_container(&old.id).await
            {
                tracing::warn!(container = %old.id, error = %error, "removing an old container failed");
            }
        }
    }
}

async fn write_status(
    ctx: &Arc<Context>,
    pod: &Pod,
    status: &k8s_openapi::api::core::v1::PodStatus,
    state: &mut WorkerState,
) -> Result<()> {
    let value = serde_json::to_value(status)?;
    if state.written.as_ref() == Some(&value) {
        return Ok(());
    }
    let api: Api<Pod> = Api::namespaced(
        ctx.client.clone(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    match api
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": value })),
        )
        .await
    {
        Ok(_) => {
            state.written = Some(value);
            Ok(())
        }
        // Deleted meanwhile: its Delete event finishes the worker.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(error) => Err(error).with_context(|| format!("writing the status of pod {name}")),
    }
}

/// Stops a deleted pod's containers within its grace period, removes its sandbox and
/// volumes, and deletes it from the API for good.
async fn terminate(
    ctx: &Arc<Context>,
    pod: &Arc<Pod>,
    in_api: bool,
    state: &mut WorkerState,
) -> Result<()> {
    let uid = uid_of(pod).context("pod without uid")?.to_string();
    let grace = pod
        .metadata
        .deletion_grace_period_seconds
        .or(pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds))
        .unwrap_or(30)
        .max(0) as u64;
    let grace = Duration::from_secs(grace);
    let containers = ctx.runtime.list_containers(&uid).await?;
    let netns = ctx
        .runtime
        .list_sandboxes()
        .await?
        .into_iter()
        .find(|s| s.pod_uid == uid)
        .map(|s| s.netns_path);
    let stops = containers
        .iter()
        .filter(|c| matches!(c.state, ContainerState::Running { .. }))
        .map(|c| {
            ctx.events
                .normal(&**pod, "Killing", format!("Stopping container {}", c.name));
            let runtime = ctx.runtime.clone();
            let id = c.id.clone();
            let spec = pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .find(|s| s.name == c.name)
                .cloned();
            let netns = netns.clone();
            async move {
                let started = std::time::Instant::now();
                // Upstream's preStop: run first, within the grace period; the container
                // gets the rest of it (at least 2 s) after SIGTERM.
                let hook = spec
                    .as_ref()
                    .and_then(|s| s.lifecycle.as_ref()?.pre_stop.as_ref());
                let mut remaining = grace;
                if let (Some(handler), Some(spec), Some(netns)) = (hook, spec.as_ref(), &netns)
                    && !grace.is_zero()
                {
                    let target = probe::CheckTarget {
                        runtime: &runtime,
                        container_id: &id,
                        container: spec,
                        netns,
                    };
                    if let Err(why) = probe::run_handler(&target, handler, grace).await {
                        tracing::warn!(pod = %pod_ref(pod), container = %spec.name, error = %why, "the preStop hook failed");
                        ctx.events.warning(
                            &**pod,
                            "FailedPreStopHook",
                            format!("PreStopHook failed: {why}"),
                        );
                    }
                    remaining = grace
                        .saturating_sub(started.elapsed())
                        .max(Duration::from_secs(2));
                }
                if let Err(error) = runtime.stop_container(&id, remaining, None).await {
                    tracing::warn!(container = %id, error = %error, "stopping a container failed");
                }
            }
        });
    futures::future::join_all(stops).await;
    if in_api {
        // The final status: every container terminated.
        let spec = pod.spec.as_ref();
        let runs = group_runs(ctx.runtime.list_containers(&uid).await?);
        let init = container_views_of(
            &spec
                .and_then(|s| s.init_containers.clone())
                .unwrap_or_default(),
            &runs,
            &ctx.probes,
        );
        let views = container_views_of(
            &spec.map(|s| s.containers.clone()).unwrap_or_default(),
            &runs,
            &ctx.probes,
        );
        let status = status::pod_status(
            pod,
            ctx.host_ip.as_deref(),
            None,
            false,
            &init,
            &views,
            state.start_time.unwrap_or_else(Timestamp::now),
        );
        if let Err(error) = write_status(ctx, pod, &status, state).await {
            tracing::debug!(error = format!("{error:#}"), "final pod status not written");
        }
    }
    ctx.probes.retain(&|id: &str| !id.starts_with(&uid));
    ctx.runtime.remove_sandbox(&uid).await?;
    remove_pod_dirs(ctx, &uid, Some(pod));
    if in_api {
        let api: Api<Pod> = Api::namespaced(
            ctx.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api
            .delete(pod.metadata.name.as_deref().unwrap_or_default(), &params)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(error) => return Err(error).context("deleting the terminated pod"),
        }
    }
    tracing::info!(pod = %pod_ref(pod), "pod terminated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited_run(attempt: u32, ago: Duration, ran: Duration) -> Run {
        let finished = Timestamp::now() - SignedDuration::try_from(ago).unwrap();
        Run {
            container_id: "canopy://x".into(),
            attempt,
            state: RunState::Exited {
                exit_code: 1,
                signal: None,
                reason: "Error".into(),
                message: None,
                started_at: Some(finished - SignedDuration::try_from(ran).unwrap()),
                finished_at: finished,
            },
        }
    }

    #[test]
    fn first_restart_is_immediate_then_backs_off() {
        let mut state = WorkerState::default();
        let run = exited_run(0, Duration::from_millis(10), Duration::from_secs(1));
        assert!(matches!(
            backoff_next(&mut state, "c", &run),
            Next::Start(1)
        ));
        state.backoff.insert("c".into(), BACKOFF_INITIAL);
        let run = exited_run(1, Duration::from_secs(1), Duration::from_secs(1));
        assert!(matches!(backoff_next(&mut state, "c", &run), Next::Wait));
        let run = exited_run(1, Duration::from_secs(11), Duration::from_secs(1));
        assert!(matches!(
            backoff_next(&mut state, "c", &run),
            Next::Start(2)
        ));
        // A long run forgives the back-off.
        state.backoff.insert("c".into(), BACKOFF_MAX);
        let run = exited_run(5, Duration::from_secs(1), Duration::from_secs(700));
        assert!(matches!(
            backoff_next(&mut state, "c", &run),
            Next::Start(6)
        ));
        assert!(!state.backoff.contains_key("c"));
    }

    #[test]
    fn restart_policies() {
        assert!(restart_needed("Always", 0));
        assert!(!restart_needed("OnFailure", 0));
        assert!(restart_needed("OnFailure", 2));
        assert!(!restart_needed("Never", 2));
    }

    #[test]
    fn humanized_delays_match_upstream() {
        assert_eq!(humanize(Duration::from_secs(10)), "10s");
        assert_eq!(humanize(Duration::from_secs(80)), "1m20s");
        assert_eq!(humanize(Duration::from_secs(300)), "5m0s");
    }
}
