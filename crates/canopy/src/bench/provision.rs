//! `canopy bench provision`: how fast a tenant's pod runs on the single-machine cloud. It
//! starts a `canopy server` with the local cloud (root) and a warm pool of one spare VM,
//! then times pod create → Running (a) on a warm VM that has room, (b) when the pod needs a
//! VM and takes the warm pool's spare, and (c) when the pod needs a brand-new VM (create →
//! VM → Node Ready → scheduled → port plugged → container running), and the VM's own part:
//! create → Node Ready. Each VM round uses a pod that fills a whole VM, so that every
//! round needs one; VMs go again after a short idle time. The spares are of the 1-vCPU
//! flavor; brand-new VMs are made for pods that need the 2-vCPU one.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;

use super::{machine, percentiles};
use canopy::procs::ServerProcess;

const IMAGE: &str = "bench.canopy/busybox:1";
const TENANT: &str = "bench";
const NAMESPACE: &str = "bench";

#[derive(clap::Args)]
pub struct ProvisionArgs {
    /// Pods timed on a warm VM, one after another.
    #[arg(long, default_value_t = 50)]
    warm: usize,
    /// Pods timed that each take the warm pool's spare VM, one after another.
    #[arg(long, default_value_t = 20)]
    pool: usize,
    /// Pods timed that each need a new VM, one after another.
    #[arg(long, default_value_t = 20)]
    cold: usize,
}

/// Whether the server's local cloud has a spare VM ready (its record says so).
fn spare_ready(cloud_dir: &Path) -> bool {
    std::fs::read_dir(cloud_dir.join("servers"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .any(|e| {
            std::fs::read_to_string(e.path())
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .is_some_and(|record| record["phase"] == "Spare")
        })
}

async fn wait_spare(cloud_dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !spare_ready(cloud_dir) {
        if Instant::now() > deadline {
            bail!("no spare VM in the warm pool after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn pod(name: &str, cpu: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": IMAGE, "imagePullPolicy": "Never",
                "command": ["sleep", "3600"],
                "resources": {"requests": {"cpu": cpu, "memory": "16Mi"}}}]
        }
    }))
    .unwrap_or_default()
}

async fn wait_running(pods: &Api<Pod>, name: &str, timeout: Duration) -> Result<Pod> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(pod) = pods.get(name).await
            && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        {
            return Ok(pod);
        }
        if Instant::now() > deadline {
            bail!("pod {name} not Running after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_ready_since(nodes: &Api<Node>, name: &str) -> Option<Instant> {
    let node = nodes.get(name).await.ok()?;
    node.status?
        .conditions?
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
        .then(Instant::now)
}

/// Deletes a round's pod and waits until its VM is gone after the idle time, so that the
/// next round finds no VM with room.
async fn release_vm(pods: &Api<Pod>, nodes: &Api<Node>, running: Pod) -> Result<()> {
    let name = running.metadata.name.clone().unwrap_or_default();
    let node = running
        .spec
        .and_then(|s| s.node_name)
        .context("a running pod without a node")?;
    pods.delete(&name, &DeleteParams::default().grace_period(0))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while nodes.get_opt(&node).await?.is_some() {
        if Instant::now() > deadline {
            bail!("VM {node} not removed after its idle time");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn image_store(dir: &Path) -> Result<std::path::PathBuf> {
    let root = dir.join("vm-image");
    let archive = dir.join("image.tar");
    canopy_image::testing::busybox_oci_archive(&archive, IMAGE)?;
    canopy_image::ImageStore::open(root.join("images"))?.import_archive(&archive)?;
    Ok(root.join("images"))
}

fn report(what: &str, samples: &mut [f64]) {
    let (p50, p99) = percentiles(samples);
    let max = samples.iter().copied().fold(0.0, f64::max);
    println!(
        "{what}: n={} p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms",
        samples.len()
    );
}

pub async fn run(args: ProvisionArgs) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("canopy bench provision creates VMs (network namespaces): run it as root");
    }
    println!(
        "canopy bench provision: {} pods on a warm VM, {} taking a spare VM, {} needing a new VM; machine {}",
        args.warm,
        args.pool,
        args.cold,
        machine()
    );
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe().context("locating the canopy binary")?;
    let images = image_store(dir.path())?;
    let management = format!("100.{}.0.0/16", 64 + (std::process::id() % 60));
    let server = ServerProcess::start(
        &exe,
        &dir.path().join("server"),
        "embedded",
        &[
            "--cloud",
            "local",
            "--cleanup",
            "--cloud-flavors",
            "c1m1:1:1024,c2m1:2:1024",
            "--cloud-warm-pool",
            "1",
            "--cloud-idle-timeout",
            "2s",
            "--cloud-management-cidr",
            &management,
            "--cloud-image-store",
            images.to_str().context("image store path")?,
        ],
    )?;
    let admin = crate::server::client_from(&server.kubeconfig).await?;
    let ns: Namespace = serde_json::from_value(
        json!({"metadata": {"name": NAMESPACE, "labels": {"canopy.io/tenant": TENANT}}}),
    )?;
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
    let nodes: Api<Node> = Api::all(admin.clone());

    let cloud_dir = dir.path().join("server/cloud");
    // (b) The warm pool's spare: a pod that fills a 1-vCPU VM, each round once the previous
    // VM went and the pool has a spare again.
    let mut pool = Vec::new();
    for i in 0..args.pool {
        wait_spare(&cloud_dir).await?;
        let name = format!("pool-{i}");
        let started = Instant::now();
        pods.create(&PostParams::default(), &pod(&name, "1"))
            .await?;
        let running = wait_running(&pods, &name, Duration::from_secs(60)).await?;
        pool.push(started.elapsed().as_secs_f64() * 1000.0);
        release_vm(&pods, &nodes, running).await?;
    }

    // (c) Brand-new VMs: a pod that only a 2-vCPU VM takes (the spare has one), each round
    // after the previous VM went.
    let mut cold = Vec::new();
    let mut boot = Vec::new();
    for i in 0..args.cold {
        let name = format!("cold-{i}");
        let started = Instant::now();
        pods.create(&PostParams::default(), &pod(&name, "1500m"))
            .await?;
        // The VM's part: from the moment its Node appears Ready.
        let mut node_ready = None;
        let deadline = started + Duration::from_secs(60);
        let running = loop {
            if let Ok(p) = pods.get(&name).await {
                if node_ready.is_none()
                    && let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone())
                {
                    node_ready = wait_ready_since(&nodes, &node).await;
                }
                if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
                    break p;
                }
            }
            if Instant::now() > deadline {
                bail!("pod {name} not Running after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        cold.push(started.elapsed().as_secs_f64() * 1000.0);
        if let Some(ready) = node_ready {
            boot.push(ready.duration_since(started).as_secs_f64() * 1000.0);
        }
        release_vm(&pods, &nodes, running).await?;
    }

    // (a) A warm VM with room: small pods, one after another.
    pods.create(&PostParams::default(), &pod("anchor", "100m"))
        .await?;
    wait_running(&pods, "anchor", Duration::from_secs(60)).await?;
    let mut warm = Vec::new();
    for i in 0..args.warm {
        let name = format!("warm-{i}");
        let started = Instant::now();
        pods.create(&PostParams::default(), &pod(&name, "10m"))
            .await?;
        wait_running(&pods, &name, Duration::from_secs(60)).await?;
        warm.push(started.elapsed().as_secs_f64() * 1000.0);
        pods.delete(&name, &DeleteParams::default().grace_period(0))
            .await?;
    }
    let vms = nodes
        .list(&ListParams::default().labels("canopy.io/provider=local"))
        .await?
        .items
        .len();

    if !warm.is_empty() {
        report("(a) pod create → Running, warm VM", &mut warm);
    }
    if !pool.is_empty() {
        report("(b) pod create → Running, warm-pool VM", &mut pool);
    }
    if !cold.is_empty() {
        report("(c) pod create → Running, new VM", &mut cold);
    }
    if !boot.is_empty() {
        report("    of which pod create → VM's Node Ready", &mut boot);
    }
    println!("VMs at the end: {vms} (the warm one; the spare has no Node)");
    drop(server);
    Ok(())
}
