//! `canopy bench scheduler`: pods bound per second and create→bound latency against a live
//! `canopy server`, with simulated nodes (Node objects, Ready, no agents) spread over tenants.

use std::{
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
    machine, percentiles,
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
    let server = ServerProcess::start(
        &exe,
        dir.path(),
        &args.store,
        &[
            "--disable-controllers",
            "--scheduler-workers",
            &workers,
            "--scheduler-max-inflight-writes",
            &inflight,
        ],
    )?;
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
    println!(
        "set up {} tenants and {} Ready nodes in {:.1} s",
        tenants,
        args.nodes,
        started.elapsed().as_secs_f64()
    );
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
                let event: Value = serde_json::from_slice(&line)?;
                let pod = &event["object"];
                let Some(node) = pod["spec"]["nodeName"].as_str() else {
                    continue;
                };
                let name = pod["metadata"]["name"].as_str().unwrap_or_default();
                if !bound.insert(name.to_string()) {
                    continue;
                }
                last = Instant::now();
                let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
                if !node.ends_with(&format!("-{namespace}")) {
                    wrong_tenant += 1;
                }
                if let Some(sent) = pod["metadata"]["annotations"]["bench/sent"]
                    .as_str()
                    .and_then(|s| s.parse::<i128>().ok())
                {
                    latencies.push((now - sent) as f64 / 1e9);
                }
            }
        }
        Ok::<_, anyhow::Error>((latencies, wrong_tenant, last))
    });

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
    let (mut latencies, wrong_tenant, last) =
        tokio::time::timeout(Duration::from_secs(600), watcher)
            .await
            .context("not every pod was bound within 10 minutes")???;
    let seconds = last.duration_since(created).as_secs_f64();
    let (p50, p99) = percentiles(&mut latencies);
    println!(
        "created {} pods in {:.2} s ({:.0}/s); all bound after {:.2} s: {:.0} pods bound/s",
        args.pods,
        create_seconds,
        args.pods as f64 / create_seconds,
        seconds,
        args.pods as f64 / seconds
    );
    println!(
        "create→bound latency p50 {:.1} ms, p99 {:.1} ms; pods on another tenant's node: {wrong_tenant}",
        p50 * 1e3,
        p99 * 1e3
    );
    drop(server);
    Ok(())
}
