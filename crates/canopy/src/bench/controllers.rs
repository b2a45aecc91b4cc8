//! `canopy bench controllers`: how long a new ReplicaSet waits for its pods while the
//! ReplicaSet controller resyncs every ReplicaSet and pod, with the priority lanes and with
//! upstream's single FIFO (seed §6).
//!
//! A `canopy server` runs without controllers; the bench runs the ReplicaSet controller in
//! its own process (the same code `canopy controller-manager` runs) so that it can trigger a
//! full resync and read the queue depth. Set-up: namespaces, ReplicaSets and their pods,
//! created by that controller. Then, for each queue mode: a fresh controller syncs the whole
//! cluster once (its initial list), new ReplicaSets are created at a steady rate while idle,
//! then a full resync is triggered and the same number are created during it, for
//! `--rounds` rounds whose samples are pooled. Latency is
//! from the moment the ReplicaSet's create is sent to the moment a watch sees its last pod.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use canopy_controllers::{
    manager::{self, ManagerConfig},
    queue::{Lane, QueueConfig, QueueMetrics},
};
use futures::StreamExt;
use k8s_openapi::api::{apps::v1::ReplicaSet, core::v1::Pod};
use kube::{
    Api, ResourceExt,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};
use parking_lot::Mutex;
use serde_json::json;

use canopy::procs::ServerProcess;

use super::{
    client::{Target, in_parallel, request},
    cpu_seconds, machine, percentiles,
};

/// Flags of `canopy bench controllers`.
#[derive(clap::Args, Debug)]
pub struct ControllersArgs {
    /// ReplicaSets present before the measurement.
    #[arg(long, default_value_t = 10_000)]
    replica_sets: usize,
    /// Pods of each ReplicaSet (existing and new).
    #[arg(long, default_value_t = 10)]
    replicas: usize,
    /// Namespaces the ReplicaSets are spread over.
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    /// New ReplicaSets created in each measured phase (idle, during the resync).
    #[arg(long, default_value_t = 100)]
    new_replica_sets: usize,
    /// Rounds of an idle phase and a resync phase per queue mode; their samples are pooled.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// New ReplicaSets created per second in each measured phase.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// The ReplicaSet controller's workers.
    #[arg(long, default_value_t = 5)]
    workers: usize,
    /// The share of the workers' time the resync may take (lanes mode; see
    /// `canopy controller-manager --resync-share`).
    #[arg(long, default_value_t = 0.1, value_parser = crate::server::parse_share)]
    resync_share: f64,
    /// Concurrent HTTPS clients for the set-up.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Store of the server: `embedded` or `etcd=http://host:port`.
    #[arg(long, default_value = "embedded")]
    store: String,
    /// Queue modes to measure, in order: `lanes`, `fifo`.
    #[arg(long, value_delimiter = ',', default_value = "lanes,fifo")]
    modes: Vec<String>,
}

/// One new ReplicaSet being timed.
struct Tracked {
    sent: Instant,
    pods: HashSet<String>,
    done: Option<Instant>,
}

type Tracking = Arc<Mutex<HashMap<String, Tracked>>>;

const NEW_LABEL: &str = "canopy-bench";

fn replica_set(name: &str, replicas: usize, new: bool) -> serde_json::Value {
    let mut labels = json!({"app": name});
    if new {
        labels[NEW_LABEL] = json!("new");
    }
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "registry.local/app:1",
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]},
            },
        },
    })
}

/// Follows the new ReplicaSets' pods and records when each ReplicaSet has all of them.
fn follow_new_pods(client: kube::Client, tracking: Tracking, replicas: usize) {
    tokio::spawn(async move {
        let api: Api<Pod> = Api::all(client);
        let config = watcher::Config::default().labels(&format!("{NEW_LABEL}=new"));
        let mut events = watcher(api, config)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            let Ok(pod) = event else { continue };
            let Some(owner) = pod.owner_references().first() else {
                continue;
            };
            let key = format!("{}/{}", pod.namespace().unwrap_or_default(), owner.name);
            let mut tracking = tracking.lock();
            if let Some(tracked) = tracking.get_mut(&key) {
                tracked.pods.insert(pod.name_any());
                if tracked.done.is_none() && tracked.pods.len() >= replicas {
                    tracked.done = Some(Instant::now());
                }
            }
        }
    });
}

/// Creates `count` new ReplicaSets at `rate` per second; returns their keys.
async fn create_new(
    client: &kube::Client,
    tracking: &Tracking,
    args: &ControllersArgs,
    prefix: &str,
) -> Result<Vec<String>> {
    let mut timer = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(0.01)));
    let mut creations = Vec::new();
    let mut keys = Vec::new();
    for i in 0..args.new_replica_sets {
        timer.tick().await;
        let ns = format!("t{}", i % args.namespaces);
        let name = format!("{prefix}-{i}");
        let key = format!("{ns}/{name}");
        let rs: ReplicaSet = serde_json::from_value(replica_set(&name, args.replicas, true))?;
        let api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
        tracking.lock().insert(
            key.clone(),
            Tracked {
                sent: Instant::now(),
                pods: HashSet::new(),
                done: None,
            },
        );
        keys.push(key);
        creations.push(tokio::spawn(async move {
            api.create(&PostParams::default(), &rs).await
        }));
    }
    for creation in creations {
        creation.await?.context("creating a new ReplicaSet")?;
    }
    Ok(keys)
}

/// Waits until every key has its pods; returns the latencies in seconds.
async fn latencies(tracking: &Tracking, keys: &[String]) -> Result<Vec<f64>> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        {
            let tracking = tracking.lock();
            let done: Vec<f64> = keys
                .iter()
                .filter_map(|k| tracking.get(k))
                .filter_map(|t| t.done.map(|d| d.duration_since(t.sent).as_secs_f64()))
                .collect();
            if done.len() == keys.len() {
                return Ok(done);
            }
        }
        if Instant::now() > deadline {
            bail!("new ReplicaSets did not get their pods within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the ReplicaSet queue has been empty for a moment.
async fn queue_idle(metrics: &QueueMetrics) {
    let mut quiet_since = None;
    loop {
        let depth: i64 = Lane::ALL
            .iter()
            .map(|l| metrics.depth("replicaset", *l))
            .sum();
        if depth == 0 {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(500) {
                return;
            }
        } else {
            quiet_since = None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Figures {
    mode: String,
    idle: (f64, f64),
    resync: (f64, f64),
    after: (f64, f64),
    resync_seconds: f64,
    resync_cpu: f64,
    during: usize,
}

pub async fn run(args: ControllersArgs) -> Result<()> {
    for mode in &args.modes {
        if mode != "lanes" && mode != "fifo" {
            bail!("--modes: {mode:?} is neither lanes nor fifo");
        }
    }
    if args.namespaces == 0 {
        bail!("--namespaces must be at least 1");
    }
    println!(
        "canopy bench controllers: {} ReplicaSets × {} pods in {} namespaces, {} new ReplicaSets per phase at {}/s, {} workers (resync share {}), store {}, machine {}",
        args.replica_sets,
        args.replicas,
        args.namespaces,
        args.new_replica_sets,
        args.rate,
        args.workers,
        args.resync_share,
        args.store,
        machine()
    );
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe().context("locating the canopy binary")?;
    let server = ServerProcess::start(
        &exe,
        dir.path(),
        &args.store,
        &["--disable-controllers", "--disable-scheduler"],
    )?;
    let target = Target::from_kubeconfig(&server.kubeconfig)?;
    let client = crate::server::client_from(&server.kubeconfig).await?;

    let started = Instant::now();
    let namespaces = args.namespaces;
    in_parallel(&target, args.clients, namespaces, "creating a namespace", Arc::new(move |t| {
        let body = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("t{t}"), "labels": {"canopy.io/tenant": format!("t{t}")}}});
        request("POST", "/api/v1/namespaces", Some(Bytes::from(serde_json::to_vec(&body)?)))
    }))
    .await?;
    let replicas = args.replicas;
    in_parallel(
        &target,
        args.clients,
        args.replica_sets,
        "creating a ReplicaSet",
        Arc::new(move |i| {
            let body = replica_set(&format!("rs-{i}"), replicas, false);
            request(
                "POST",
                &format!("/apis/apps/v1/namespaces/t{}/replicasets", i % namespaces),
                Some(Bytes::from(serde_json::to_vec(&body)?)),
            )
        }),
    )
    .await?;
    println!(
        "created {} ReplicaSets in {:.1} s",
        args.replica_sets,
        started.elapsed().as_secs_f64()
    );

    let tracking: Tracking = Arc::default();
    follow_new_pods(client.clone(), tracking.clone(), args.replicas);

    let mut figures = Vec::new();
    for (round, mode) in args.modes.iter().enumerate() {
        let metrics = QueueMetrics::unregistered();
        let config = ManagerConfig {
            queue: QueueConfig {
                fifo: mode == "fifo",
                sync_share: args.resync_share,
                ..QueueConfig::default()
            },
            workers: args.workers,
            controllers: vec!["replicaset".into()],
            ..ManagerConfig::default()
        };
        let ctx = manager::Context::new(client.clone(), config, metrics.clone());
        let controller = tokio::spawn(manager::run(ctx.clone()));

        // The controller's initial sync (and, the first time, the creation of every pod).
        let phase = Instant::now();
        let expected_pods = args.replica_sets * args.replicas;
        let mut last_report = Instant::now();
        loop {
            let pods = ctx.informers.pods.len();
            if ctx.informers.pods.has_synced() && pods >= expected_pods {
                break;
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                println!("  {mode}: {pods}/{expected_pods} pods");
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        queue_idle(&metrics).await;
        println!(
            "{mode}: controller synced {} ReplicaSets and {} pods in {:.1} s",
            ctx.informers.replica_sets.len(),
            ctx.informers.pods.len(),
            phase.elapsed().as_secs_f64()
        );

        let (mut idle, mut during_only, mut after) = (Vec::new(), Vec::new(), Vec::new());
        let (mut resync_seconds, mut resync_cpus) = (Vec::new(), Vec::new());
        for r in 0..args.rounds.max(1) {
            println!(
                "{mode}: round {}: creating {} new ReplicaSets, idle",
                r + 1,
                args.new_replica_sets
            );
            let keys = create_new(&client, &tracking, &args, &format!("idle{round}-{r}")).await?;
            idle.extend(latencies(&tracking, &keys).await?);
            queue_idle(&metrics).await;

            // A full resync of both informers, with new ReplicaSets arriving during it. It has
            // ended once both informers have handed every object to the controller and the SYNC
            // lane is empty.
            let (rs_before, pods_before) = (
                ctx.informers.replica_sets.resyncs_done(),
                ctx.informers.pods.resyncs_done(),
            );
            let resync_started = Instant::now();
            let cpu_before = cpu_seconds(std::process::id()).unwrap_or(f64::NAN);
            ctx.informers.replica_sets.resync();
            ctx.informers.pods.resync();
            let resync_end = {
                let ctx = ctx.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    loop {
                        if resync_started.elapsed() > Duration::from_secs(600) {
                            bail!("the resync did not end within 10 minutes");
                        }
                        let delivered = ctx.informers.replica_sets.resyncs_done() > rs_before
                            && ctx.informers.pods.resyncs_done() > pods_before;
                        if delivered && metrics.depth("replicaset", Lane::Sync) == 0 {
                            return Ok((
                                resync_started.elapsed(),
                                cpu_seconds(std::process::id()).unwrap_or(f64::NAN) - cpu_before,
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
            };
            println!(
                "{mode}: round {}: full resync triggered; creating {} new ReplicaSets",
                r + 1,
                args.new_replica_sets
            );
            let keys = create_new(&client, &tracking, &args, &format!("resync{round}-{r}")).await?;
            let (resync_took, resync_cpu) = resync_end.await??;
            after.extend(latencies(&tracking, &keys).await?);
            // Only the ReplicaSets created while the resync ran say what a resync costs them.
            during_only.extend({
                let tracking = tracking.lock();
                keys.iter()
                    .filter_map(|k| tracking.get(k))
                    .filter(|t| t.sent.duration_since(resync_started) < resync_took)
                    .filter_map(|t| t.done.map(|d| d.duration_since(t.sent).as_secs_f64()))
                    .collect::<Vec<_>>()
            });
            resync_seconds.push(resync_took.as_secs_f64());
            resync_cpus.push(resync_cpu);
            queue_idle(&metrics).await;
        }
        let during = during_only.len();
        let phase_total = after.len();
        controller.abort();
        let _ = controller.await;
        let f = Figures {
            mode: mode.clone(),
            idle: percentiles(&mut idle),
            resync: percentiles(&mut during_only),
            after: percentiles(&mut after),
            resync_seconds: percentiles(&mut resync_seconds).0,
            resync_cpu: percentiles(&mut resync_cpus).0,
            during,
        };
        println!(
            "{mode}: ReplicaSet created → all {} pods: idle p50 {:.0} ms p99 {:.0} ms; the {} created during the resyncs (median {:.2} s, {:.2} CPU seconds in this process) p50 {:.0} ms p99 {:.0} ms; all {} of those phases p50 {:.0} ms p99 {:.0} ms",
            args.replicas,
            f.idle.0 * 1e3,
            f.idle.1 * 1e3,
            f.during,
            f.resync_seconds,
            f.resync_cpu,
            f.resync.0 * 1e3,
            f.resync.1 * 1e3,
            phase_total,
            f.after.0 * 1e3,
            f.after.1 * 1e3,
        );
        figures.push(f);
    }

    println!();
    println!("mode   idle p50  idle p99  during-resync p50  p99  (n)  p99 ratio  resync took");
    for f in &figures {
        println!(
            "{:<6} {:>5.0} ms {:>5.0} ms {:>14.0} ms {:>4.0} ms ({}) {:>8.1}× {:>9.2} s",
            f.mode,
            f.idle.0 * 1e3,
            f.idle.1 * 1e3,
            f.resync.0 * 1e3,
            f.resync.1 * 1e3,
            f.during,
            f.resync.1 / f.idle.1,
            f.resync_seconds
        );
    }
    drop(server);
    Ok(())
}
