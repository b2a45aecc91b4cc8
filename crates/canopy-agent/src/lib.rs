//! Canopy's node agent, `canopy agent`: Canopy's kubelet. It runs on a tenant's VM, registers
//! the VM as a Node, renews the node's Lease, runs the pods bound to it in OCI containers and
//! reports their status, all through the Kubernetes API with the node's own identity
//! (`system:node:<name>`, which the API server confines to this Node, its Lease and the pods
//! bound to it).
//!
//! Data flows one way: the pods' watch and the runtime's container events wake a pod's
//! worker ([`pods`]), which compares the pod with the runtime's containers, acts, and writes
//! the pod's status. The Node's status and Lease are written by their own loops ([`node`]).

pub mod api;
pub mod cni;
pub mod dns;
pub mod logs;
pub mod node;
pub mod pods;
pub mod probe;
pub mod spdy;
pub mod spec;
pub mod status;
pub mod stream;
pub mod volumes;

pub use logs::LogRotation;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use canopy_image::ImageStore;
use canopy_runtime::{Runtime, RuntimeConfig};
use k8s_openapi::api::core::v1::ContainerImage;
use kube::Client;
use tokio_util::sync::CancellationToken;

/// Everything `canopy agent` is told.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node: node::NodeConfig,
    /// Persistent state: images, containers' writable layers, pods' volumes.
    pub root_dir: PathBuf,
    /// Runtime state that a reboot clears: bundles, namespaces, the OCI runtime's state.
    pub state_dir: PathBuf,
    /// Containers' logs, as upstream's `/var/log/pods`.
    pub log_dir: PathBuf,
    /// The OCI runtime (`runc`, `crun`...).
    pub runtime_binary: PathBuf,
    /// The `canopy` executable, whose `shim` subcommand monitors each container.
    pub shim_binary: PathBuf,
    /// cgroup under which pods' cgroups are made.
    pub cgroup_parent: String,
    /// The resolvers pods' resolv.conf names, per their dnsPolicy.
    pub dns: dns::PodDns,
    /// Image GC starts above this percentage of the disk in use...
    pub image_gc_high_percent: u8,
    /// ...and frees images until usage is below this one (upstream's 85 and 80).
    pub image_gc_low_percent: u8,
    /// When containers' log files are rotated.
    pub log_rotation: LogRotation,
    /// Where the agent's HTTPS API listens (logs for the API server).
    pub listen: std::net::SocketAddr,
    /// The cluster CA (DER), whose administrators may call the agent's API.
    pub client_ca: Vec<Vec<u8>>,
    /// How pods get their network.
    pub pod_network: PodNetwork,
}

/// How pods get their network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodNetwork {
    /// Only their own loopback (a node without a cloud).
    Loopback,
    /// A port of the tenant's network each, from the cloud controller ([`cni`]).
    Ports,
}

/// Runs the agent until `shutdown`. Pods' containers keep running after it returns.
pub async fn run(
    client: Client,
    mut config: AgentConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    // The API endpoint first: the Node advertises its port and certificate.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the agent API to {}", config.listen))?;
    let serving = api::ensure_serving_cert(
        &config.root_dir.join("pki"),
        &config.node.name,
        &config.node.internal_ip.iter().cloned().collect::<Vec<_>>(),
    )?;
    config.node.daemon_port = Some(listener.local_addr()?.port());
    config.node.annotations.insert(
        canopy_api::AGENT_SERVING_CERT_ANNOTATION.to_string(),
        serving.sha256.clone(),
    );
    let images = Arc::new(
        ImageStore::open(config.root_dir.join("images")).context("opening the image store")?,
    );
    let runtime = Runtime::new(RuntimeConfig {
        runtime_binary: config.runtime_binary.clone(),
        shim_binary: config.shim_binary.clone(),
        root_dir: config.root_dir.join("containers"),
        state_dir: config.state_dir.clone(),
        cgroup_parent: config.cgroup_parent.clone(),
    })
    .context("starting the container runtime")?;
    let runtime_version = runtime_version(&config.runtime_binary).await;

    let Some(node_uid) = node::register_with_retry(&client, &config.node, &shutdown).await else {
        return Ok(());
    };
    let lease = tokio::spawn(node::lease_loop(
        client.clone(),
        config.node.name.clone(),
        node_uid,
        shutdown.clone(),
    ));
    // Events about pods (Pulled, Created, Started, Killing, BackOff, Unhealthy, Failed), written
    // with client-go's correlation as upstream's kubelet does.
    let event_sink = canopy_controllers::events::EventSink::default();
    let events = {
        let (sink, client) = (event_sink.clone(), client.clone());
        tokio::spawn(async move { sink.run(client).await })
    };
    let ctx = pods::Context::new(
        client.clone(),
        runtime.clone(),
        images.clone(),
        config.node.name.clone(),
        config.node.internal_ip.clone(),
        spec::NodeAllocatable {
            cpu_millis: config.node.capacity.cpu_millis,
            memory_bytes: config.node.capacity.memory_bytes,
        },
        config.root_dir.join("pods"),
        config.log_dir.clone(),
        config.dns.clone(),
        config.pod_network,
        event_sink.recorder("kubelet"),
    );
    let status = tokio::spawn(status_loop(
        client.clone(),
        config.clone(),
        runtime_version,
        images.clone(),
        shutdown.clone(),
    ));
    let gc = tokio::spawn(image_gc_loop(ctx.clone(), config.clone(), shutdown.clone()));
    let rotation = tokio::spawn(logs::rotation_loop(
        config.log_dir.clone(),
        config.log_rotation,
        shutdown.clone(),
    ));
    let api = {
        let (ctx, shutdown, client_ca) = (ctx.clone(), shutdown.clone(), config.client_ca.clone());
        tokio::spawn(async move {
            if let Err(error) = api::serve(ctx, listener, &serving, &client_ca, shutdown).await {
                tracing::error!(error = format!("{error:#}"), "the agent API stopped");
            }
        })
    };
    tracing::info!(node = %config.node.name, "agent running");
    pods::run(ctx, shutdown.clone()).await;
    shutdown.cancel();
    let _ = tokio::join!(lease, status, gc, api, rotation);
    events.abort();
    tracing::info!(node = %config.node.name, "agent stopped; containers keep running");
    Ok(())
}

async fn runtime_version(binary: &std::path::Path) -> String {
    let output = tokio::process::Command::new(binary)
        .arg("--version")
        .output()
        .await;
    let name = binary
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "runc".into());
    let version = output
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().last().map(str::to_string))
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{name}://{version}")
}

fn image_list(images: &ImageStore) -> Vec<ContainerImage> {
    let mut list: Vec<ContainerImage> = images
        .list()
        .unwrap_or_default()
        .into_iter()
        .map(|image| ContainerImage {
            names: Some(
                image
                    .repo_digests
                    .iter()
                    .chain(image.names.iter())
                    .cloned()
                    .collect(),
            ),
            size_bytes: Some(image.size as i64),
        })
        .collect();
    // Upstream reports the 50 largest images.
    list.sort_by_key(|i| std::cmp::Reverse(i.size_bytes));
    list.truncate(50);
    list
}

async fn status_loop(
    client: Client,
    config: AgentConfig,
    runtime_version: String,
    images: Arc<ImageStore>,
    shutdown: CancellationToken,
) {
    let mut reporter = node::StatusReporter::new();
    loop {
        let store = images.clone();
        let list = tokio::task::spawn_blocking(move || image_list(&store))
            .await
            .unwrap_or_default();
        let ready = if config.runtime_binary.is_absolute() && !config.runtime_binary.exists() {
            Err(format!(
                "container runtime {} is missing",
                config.runtime_binary.display()
            ))
        } else {
            Ok(())
        };
        let status = node::status(
            &config.node,
            &runtime_version,
            list,
            ready,
            reporter.previous(),
        );
        if reporter.due(&status) {
            match node::write_status(&client, &config.node.name, &status).await {
                Ok(()) => reporter.written(status),
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "writing the node status failed"
                    )
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(node::STATUS_UPDATE_INTERVAL) => {}
        }
    }
}

/// Upstream's image GC: when the disk holding the images is fuller than the high mark,
/// remove the least recently used images that no pod here uses until it is below the low.
async fn image_gc_loop(ctx: Arc<pods::Context>, config: AgentConfig, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(300)) => {}
        }
        let in_use = ctx.images_in_use();
        let images = ctx.images.clone();
        let root = config.root_dir.clone();
        let (high, low) = (config.image_gc_high_percent, config.image_gc_low_percent);
        let result = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            let fs = nix::sys::statvfs::statvfs(&root)?;
            let total = fs.blocks() as u64 * fs.fragment_size() as u64;
            let free = fs.blocks_available() as u64 * fs.fragment_size() as u64;
            let used = total.saturating_sub(free);
            if total == 0 || used * 100 < total * high as u64 {
                return Ok(Vec::new());
            }
            let store = images.disk_usage()?;
            let to_free = used.saturating_sub(total * low as u64 / 100);
            let target = store.saturating_sub(to_free);
            Ok(images.garbage_collect(&in_use, target, target)?)
        })
        .await;
        match result {
            Ok(Ok(removed)) if !removed.is_empty() => {
                tracing::info!(images = ?removed, "image garbage collection removed unused images")
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(
                error = format!("{error:#}"),
                "image garbage collection failed"
            ),
            Err(error) => tracing::warn!(error = %error, "image garbage collection panicked"),
        }
    }
}
