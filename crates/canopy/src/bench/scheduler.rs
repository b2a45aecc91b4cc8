//! `canopy bench scheduler`: pods bound per second and create→bound latency against a live
//! `canopy server`, with simulated nodes (Node objects, Ready, no agents, their Leases renewed
//! every 10 s like kubelets do) spread over tenants. `--backlog` creates the pods first and
//! starts a standalone `canopy scheduler` on them, to measure the scheduler without the
//! creations competing for the API server.

use std::{
    borrow::Cow,
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use canopy::procs::ServerProcess;

use super::{
    client::{Target, in_parallel, ok, request, send},
    cpu_seconds, machine, percentiles,
};

/// Flags of `canopy bench scheduler`.
#[derive(clap::Args, Debug)]
pub struct SchedulerArgs {
    /// Simulated nodes, spread evenly over the tenants.
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    /// Tenants (each with one namespace and nodes/tenants nodes).
    #[arg(long, default_value_t = 100)]
    tenants: usize,
    /// Pods to create and have scheduled.
    #[arg(long, default_value_t = 50_000)]
    pods: usize,
    /// The scheduler's workers (tenants scheduled at once); 1 turns tenant parallelism off.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// The scheduler's bindings in flight at once.
    #[arg(long, default_value_t = 64)]
    inflight_writes: usize,
    /// Concurrent HTTPS clients creating nodes and pods.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Store of the server under test: `embedded` or `etcd=http://host:port`.
    #[arg(long, default_value = "embedded")]
    store: String,
    /// Create every pod first, then start a standalone scheduler on the backlog.
    #[arg(long)]
    backlog: bool,
    /// Seconds between two renewals of a node's Lease (the kubelet's default is 10).
    #[arg(long, default_value_t = 10.0)]
    lease_renew_seconds: f64,
}

/// What the bench reads of a watch event: the watcher shares the machine with the system
/// under test, so it skips everything but the few fields it needs instead of building a
/// whole JSON tree per event.
#[derive(serde::Deserialize)]
struct BoundEvent<'a> {
    #[serde(borrow)]
    object: BoundPod<'a>,
}

#[derive(serde::Deserialize)]
struct BoundPod<'a> {
    #[serde(default, borrow)]
    metadata: BoundMeta<'a>,
    #[serde(default, borrow)]
    spec: BoundSpec<'a>,
}

#[derive(serde::Deserialize, Default)]
struct BoundMeta<'a> {
    #[serde(default, borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    namespace: Cow<'a, str>,
    #[serde(default, borrow)]
    annotations: BenchAnnotations<'a>,
}

#[derive(serde::Deserialize, Default)]
struct BenchAnnotations<'a> {
    #[serde(rename = "bench/sent", borrow)]
    sent: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct BoundSpec<'a> {
    #[serde(borrow)]
    node_name: Option<Cow<'a, str>>,
}

/// Renewals of the simulated nodes' Leases, spread evenly over each period.
struct LeaseRenewals {
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Result<RenewalTally>>>,
}

/// One connection's renewal latencies (seconds) and how many renewals went out late.
type RenewalTally = (Vec<f64>, usize);

const LEASE_CONNECTIONS: usize = 8;

fn micro_time_now() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

fn lease_path(node: &str) -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node}")
}

impl LeaseRenewals {
    fn start(target: &Target, nodes: usize, tenants: usize, period: Duration) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let origin = tokio::time::Instant::now();
        let tasks = (0..LEASE_CONNECTIONS)
            .map(|c| {
                let target = target.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut conn = target.http1().await?;
                    let mut latencies = Vec::new();
                    let mut late = 0usize;
                    for round in 0u32.. {
                        for j in (c..nodes).step_by(LEASE_CONNECTIONS) {
                            let due =
                                origin + period * round + period.mul_f64(j as f64 / nodes as f64);
                            tokio::select! {
                                _ = stop.cancelled() => return Ok((latencies, late)),
                                _ = tokio::time::sleep_until(due) => {}
                            }
                            if tokio::time::Instant::now() > due + period / 4 {
                                late += 1;
                            }
                            let body = json!({"spec": {"renewTime": micro_time_now()}});
                            let mut req = request(
                                "PATCH",
                                &lease_path(&node_name(j, tenants)),
                                Some(Bytes::from(serde_json::to_vec(&body)?)),
                            )?;
                            req.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/merge-patch+json"),
                            );
                            let started = Instant::now();
                            let (code, body) = send(&mut conn, req).await?;
                            ok(code, &body, "renewing a node Lease")?;
                            latencies.push(started.elapsed().as_secs_f64());
                        }
                    }
                    Ok((latencies, late))
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops renewing; prints how the renewals went.
    async fn finish(self, seconds: f64) -> Result<()> {
        self.stop.cancel();
        let mut latencies = Vec::new();
        let mut late = 0;
        for task in self.tasks {
            let (l, n) = task.await??;
            latencies.extend(l);
            late += n;
        }
        let count = latencies.len();
        let (p50, p99) = percentiles(&mut latencies);
        println!(
            "node Lease renewals: {count} ({:.0}/s), latency p50 {:.1} ms, p99 {:.1} ms; {late} later than a quarter period",
            count as f64 / seconds.max(f64::EPSILON),
            p50 * 1e3,
            p99 * 1e3
        );
        Ok(())
    }
}

/// Sum and count of a histogram's samples with the given label, from a text exposition.
fn histogram_mean(exposition: &str, metric: &str, label: &str) -> Option<f64> {
    let value = |suffix: &str| {
        exposition.lines().find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            (series.starts_with(&format!("{metric}_{suffix}")) && series.contains(label))
                .then(|| value.parse::<f64>().ok())?
        })
    };
    let count = value("count")?;
    (count > 0.0).then(|| value("sum").map(|sum| sum / count))?
}

/// GET over plain HTTP/1.1 (the standalone scheduler's endpoint).
async fn plain_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: scheduler\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

fn now_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or_default()
}

fn node_name(j: usize, tenants: usize) -> String {
    format!("n{j:05}-t{}", j % tenants)
}

pub async fn run(args: SchedulerArgs) -> Result<()> {
    if args.tenants == 0 || args.nodes < args.tenants {
        bail!("need at least one node per tenant");
    }
    println!(
        "canopy bench scheduler: {} nodes, {} tenants, {} pods, {} workers, store {}, machine {}",
        args.nodes,
        args.tenants,
        args.pods,
        args.workers,
        args.store,
        machine()
    );
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe().context("locating the canopy binary")?;
    let workers = args.workers.to_string();
    let inflight = args.inflight_writes.to_string();
    let scheduler_flags = [
        "--scheduler-workers",
        &workers,
        "--scheduler-max-inflight-writes",
        &inflight,
    ];
    let mut server_flags = vec!["--disable-controllers"];
    if args.backlog {
        server_flags.push("--disable-scheduler");
    } else {
        server_flags.extend(scheduler_flags);
    }
    let server = ServerProcess::start(&exe, dir.path(), &args.store, &server_flags)?;
    let target = Target::from_kubeconfig(&server.kubeconfig)?;
    let tenants = args.tenants;

    let started = Instant::now();
    in_parallel(&target, args.clients, tenants, "creating a namespace", Arc::new(move |t| {
        let body = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("t{t}"), "labels": {"canopy.io/tenant": format!("t{t}")}}});
        request("POST", "/api/v1/namespaces", Some(Bytes::from(serde_json::to_vec(&body)?)))
    }))
    .await?;
    in_parallel(
        &target,
        args.clients,
        args.nodes,
        "creating a node",
        Arc::new(move |j| {
            let body = json!({"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": node_name(j, tenants),
            "labels": {"canopy.io/tenant": format!("t{}", j % tenants)}}});
            request(
                "POST",
                "/api/v1/nodes",
                Some(Bytes::from(serde_json::to_vec(&body)?)),
            )
        }),
    )
    .await?;
    in_parallel(&target, args.clients, args.nodes, "making a node Ready", Arc::new(move |j| {
        let body = json!({"status": {
            "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
            "capacity": {"cpu": "32", "memory": "128Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        let mut req = request(
            "PATCH",
            &format!("/api/v1/nodes/{}/status", node_name(j, tenants)),
            Some(Bytes::from(serde_json::to_vec(&body)?)),
        )?;
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/merge-patch+json"),
        );
        Ok(req)
    }))
    .await?;
    in_parallel(&target, args.clients, args.nodes, "creating a node Lease", Arc::new(move |j| {
        let node = node_name(j, tenants);
        let body = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": node, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": micro_time_now()}});
        request(
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
            Some(Bytes::from(serde_json::to_vec(&body)?)),
        )
    }))
    .await?;
    println!(
        "set up {} tenants and {} Ready nodes with Leases in {:.1} s",
        tenants,
        args.nodes,
        started.elapsed().as_secs_f64()
    );
    let renewals = LeaseRenewals::start(
        &target,
        args.nodes,
        tenants,
        Duration::from_secs_f64(args.lease_renew_seconds.max(0.1)),
    );
    let renewals_started = Instant::now();
    // Let the scheduler see every node before pods arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // One watch of all pods: the time each pod is first seen bound.
    let mut conn = target.http1().await?;
    let (code, list) = send(&mut conn, request("GET", "/api/v1/pods?limit=1", None)?).await?;
    ok(code, &list, "listing pods")?;
    let rv = serde_json::from_slice::<Value>(&list)?["metadata"]["resourceVersion"]
        .as_str()
        .context("no resourceVersion")?
        .to_string();
    let mut h2 = target.http2().await?;
    h2.ready().await?;
    let response = h2
        .send_request(request(
            "GET",
            &format!("/api/v1/pods?watch=1&resourceVersion={rv}&allowWatchBookmarks=false"),
            None,
        )?)
        .await?;
    if !response.status().is_success() {
        bail!("watch failed: HTTP {}", response.status());
    }
    let total = args.pods;
    let watcher = tokio::spawn(async move {
        let mut body = response.into_body();
        let mut carry = Vec::new();
        let mut bound: HashSet<String> = HashSet::with_capacity(total);
        let mut latencies = Vec::with_capacity(total);
        let mut wrong_tenant = 0usize;
        let mut first = None;
        let mut last = Instant::now();
        while bound.len() < total {
            let Some(frame) = body.frame().await else {
                break;
            };
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            let now = now_nanos();
            carry.extend_from_slice(&data);
            while let Some(end) = carry.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = carry.drain(..=end).collect();
                let pod = serde_json::from_slice::<BoundEvent>(&line)?.object;
                let Some(node) = pod.spec.node_name else {
                    continue;
                };
                if !bound.insert(pod.metadata.name.to_string()) {
                    continue;
                }
                last = Instant::now();
                first.get_or_insert(last);
                if !node.ends_with(&format!("-{}", pod.metadata.namespace)) {
                    wrong_tenant += 1;
                }
                if let Some(sent) = pod
                    .metadata
                    .annotations
                    .sent
                    .and_then(|s| s.parse::<i128>().ok())
                {
                    latencies.push((now - sent) as f64 / 1e9);
                }
            }
        }
        Ok::<_, anyhow::Error>((latencies, wrong_tenant, first.unwrap_or(last), last))
    });

    let cpu_at_creation = cpu_seconds(server.pid()).unwrap_or_default();
    let created = Instant::now();
    in_parallel(
        &target,
        args.clients,
        args.pods,
        "creating a pod",
        Arc::new(move |i| {
            let t = i % tenants;
            let body = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": format!("p{i:06}"), "namespace": format!("t{t}"),
                "annotations": {"bench/sent": now_nanos().to_string()}},
            "spec": {"containers": [{"name": "app", "image": "registry.local/app:1",
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}});
            request(
                "POST",
                &format!("/api/v1/namespaces/t{t}/pods"),
                Some(Bytes::from(serde_json::to_vec(&body)?)),
            )
        }),
    )
    .await?;
    let create_seconds = created.elapsed().as_secs_f64();
    println!(
        "created {} pods in {:.2} s ({:.0}/s)",
        args.pods,
        create_seconds,
        args.pods as f64 / create_seconds,
    );
    let mut scheduler = None;
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let server_cpu_before = cpu_seconds(server.pid()).unwrap_or_default();
    let bench_cpu_before = cpu_seconds(std::process::id()).unwrap_or_default();
    let scheduler_started = Instant::now();
    if args.backlog {
        let log = std::fs::File::create(dir.path().join("scheduler.log"))?;
        scheduler = Some(
            std::process::Command::new(&exe)
                .args(["--log", "info", "scheduler", "--kubeconfig"])
                .arg(&server.kubeconfig)
                .arg("--metrics-bind-address")
                .arg(metrics_addr.to_string())
                .args(scheduler_flags)
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting canopy scheduler")?,
        );
    }
    let waited = tokio::time::timeout(Duration::from_secs(600), watcher).await;
    let server_cpu_now = cpu_seconds(server.pid()).unwrap_or_default();
    let bench_cpu = cpu_seconds(std::process::id()).unwrap_or_default() - bench_cpu_before;
    let mut scheduler_report = None;
    if let Some(mut child) = scheduler {
        let cpu = cpu_seconds(child.id()).unwrap_or_default();
        let exposition = plain_get(metrics_addr, "/metrics")
            .await
            .unwrap_or_default();
        scheduler_report = Some((cpu, exposition));
        let _ = child.kill();
        let _ = child.wait();
    }
    let (mut latencies, wrong_tenant, first, last) =
        waited.context("not every pod was bound within 10 minutes")???;
    renewals
        .finish(renewals_started.elapsed().as_secs_f64())
        .await?;
    if args.backlog {
        let seconds = last.duration_since(scheduler_started).as_secs_f64();
        let binding = last.duration_since(first).as_secs_f64();
        println!(
            "scheduler started on a backlog of {} pods; all bound {:.2} s later: {:.0} pods bound/s ({:.0}/s from first to last binding, start-up {:.2} s)",
            args.pods,
            seconds,
            args.pods as f64 / seconds,
            args.pods as f64 / binding.max(f64::EPSILON),
            first.duration_since(scheduler_started).as_secs_f64()
        );
        if let Some((cpu, exposition)) = scheduler_report {
            let decide = histogram_mean(
                &exposition,
                "scheduler_scheduling_attempt_duration_seconds",
                r#"result="scheduled""#,
            )
            .unwrap_or_default();
            let bind = histogram_mean(
                &exposition,
                "scheduler_framework_extension_point_duration_seconds",
                r#"status="Success""#,
            )
            .unwrap_or_default();
            println!(
                "CPU per bound pod: API server {:.0} µs, scheduler process {:.0} µs, of which filtering and scoring {:.1} µs, this bench's watch and Lease renewals {:.0} µs; binding request latency mean {:.1} ms",
                (server_cpu_now - server_cpu_before) / args.pods as f64 * 1e6,
                cpu / args.pods as f64 * 1e6,
                decide * 1e6,
                bench_cpu / args.pods as f64 * 1e6,
                bind * 1e3
            );
        }
    } else {
        let seconds = last.duration_since(created).as_secs_f64();
        let (p50, p99) = percentiles(&mut latencies);
        println!(
            "all bound {:.2} s after the first creation: {:.0} pods bound/s",
            seconds,
            args.pods as f64 / seconds
        );
        println!(
            "API server CPU (its scheduler included) per pod created and bound: {:.0} µs",
            (server_cpu_now - cpu_at_creation) / args.pods as f64 * 1e6
        );
        println!(
            "create→bound latency p50 {:.1} ms, p99 {:.1} ms",
            p50 * 1e3,
            p99 * 1e3
        );
    }
    println!("pods on another tenant's node: {wrong_tenant}");
    if wrong_tenant > 0 {
        bail!("{wrong_tenant} pods were placed on another tenant's node");
    }
    drop(server);
    Ok(())
}
