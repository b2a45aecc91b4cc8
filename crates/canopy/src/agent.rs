//! `canopy agent` (the node agent), `canopy image` (its image store) and the hidden
//! `canopy shim` (the per-container monitor the agent starts).

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, Result};
use canopy_agent::node::{Capacity, NodeConfig};

/// `canopy agent`: what the node is and where its state lives.
#[derive(clap::Args)]
pub struct AgentArgs {
    /// Kubeconfig of the node's identity: user `system:node:<node-name>` in group
    /// `system:nodes` (`canopy kubeconfig --user system:node:<name> --group system:nodes`).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// The Node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// The tenant whose VM this is: the Node gets label `canopy.io/tenant=<tenant>`, and
    /// only that tenant's pods are placed on it. The node's credential must name the same
    /// tenant (group `canopy:tenant:<tenant>`), or be an administrator's.
    #[arg(long)]
    tenant: Option<String>,
    /// Further Node labels, `key=value,key=value`.
    #[arg(long, value_delimiter = ',')]
    node_labels: Vec<String>,
    /// The node's addresses (InternalIP), comma-separated: the first is the one the control
    /// plane reaches the agent at and the pods' hostIP; further ones are reported too (a VM's
    /// address in its tenant's network).
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<String>,
    /// Persistent state: images, containers' writable layers, pods' volumes.
    #[arg(long, default_value = "/var/lib/canopy/agent")]
    root_dir: PathBuf,
    /// Runtime state cleared by a reboot: bundles, pinned namespaces, the OCI runtime's
    /// state.
    #[arg(long, default_value = "/run/canopy/agent")]
    state_dir: PathBuf,
    /// Containers' logs (upstream's /var/log/pods layout).
    #[arg(long, default_value = "/var/log/pods")]
    log_dir: PathBuf,
    /// The OCI runtime binary: Debian's `runc`, or `crun`, or a path.
    #[arg(long, default_value = "runc")]
    container_runtime: PathBuf,
    /// cgroup under which each pod gets `pod<uid>/<container>`.
    #[arg(long, default_value = "canopy")]
    cgroup_parent: String,
    /// CPU the node offers (e.g. `2` or `1500m`); default: the CPUs of the machine or of
    /// the agent's cgroup.
    #[arg(long)]
    cpu: Option<String>,
    /// Memory the node offers (e.g. `4Gi`); default: the machine's or the agent's cgroup's.
    #[arg(long)]
    memory: Option<String>,
    /// Pods the node takes at most.
    #[arg(long, default_value_t = 110)]
    max_pods: u64,
    /// Cluster DNS nameservers, comma-separated: pods with dnsPolicy ClusterFirst (the
    /// default) resolve through them with the cluster's search paths; without any, pods use
    /// the node's resolver. Where the agent runs the tenant's proxy, the proxy serves DNS at
    /// the first of them (the cloud controller passes the tenant's, the 10th address of its
    /// Service range).
    #[arg(long, value_delimiter = ',')]
    cluster_dns: Vec<String>,
    /// Image GC starts when the disk of --root-dir is fuller than this percentage.
    #[arg(long, default_value_t = 85, value_parser = clap::value_parser!(u8).range(1..=100))]
    image_gc_high_threshold: u8,
    /// Image GC frees unused images until the disk is below this percentage.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_low_threshold: u8,
    /// A container's log file is rotated once it is larger than this (a quantity, e.g.
    /// `10Mi`; the kubelet's containerLogMaxSize).
    #[arg(long, default_value = "10Mi")]
    container_log_max_size: String,
    /// Log files kept per container, the current one included (the kubelet's
    /// containerLogMaxFiles, at least 2).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..))]
    container_log_max_files: u32,
    /// How often log files are checked for rotation (the kubelet's
    /// containerLogMonitorInterval).
    #[arg(long, default_value = "10s", value_parser = crate::server::parse_duration)]
    container_log_monitor_interval: std::time::Duration,
    /// Address of the agent's HTTPS API (container logs for the API server); default: the
    /// --node-ip, else every address.
    #[arg(long)]
    address: Option<std::net::IpAddr>,
    /// Port of the agent's HTTPS API (upstream's kubelet port; 0 picks a free one).
    #[arg(long, default_value_t = 10250)]
    port: u16,
    /// How pods get their network: `none` (their own loopback only) or `canopy` (each pod
    /// gets the port the cloud controller made for it in the tenant's network, moved from
    /// this VM into the pod; what the cloud's VMs use).
    #[arg(long, value_enum, default_value_t = NetworkPlugin::None)]
    network_plugin: NetworkPlugin,
    /// Do not run the tenant's service proxy. By default the agent runs it (in this
    /// network namespace) when its kubeconfig holds a `canopy-proxy` context, as the cloud's
    /// VMs' kubeconfigs do.
    #[arg(long)]
    disable_proxy: bool,
    #[command(flatten)]
    proxy: crate::proxy::ProxyTuning,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum NetworkPlugin {
    None,
    Canopy,
}

fn quantity(text: &str, what: &str) -> Result<canopy_api::quantity::Quantity> {
    canopy_api::quantity::Quantity::parse(text)
        .map_err(|e| anyhow::anyhow!("--{what} {text:?}: {e}"))
}

pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The host's resolver, which pods use until cluster DNS exists (upstream's dnsPolicy
/// `Default`).
fn host_dns() -> canopy_runtime::DnsConfig {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut dns = canopy_runtime::DnsConfig::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => dns.nameservers.extend(words.next().map(str::to_string)),
            Some("search" | "domain") => dns.searches = words.map(str::to_string).collect(),
            Some("options") => dns.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    dns
}

impl AgentArgs {
    fn config(self, client_ca: Vec<Vec<u8>>) -> Result<canopy_agent::AgentConfig> {
        if self.image_gc_low_threshold >= self.image_gc_high_threshold {
            anyhow::bail!(
                "--image-gc-low-threshold ({}) must be below --image-gc-high-threshold ({})",
                self.image_gc_low_threshold,
                self.image_gc_high_threshold
            );
        }
        let mut labels = BTreeMap::new();
        for pair in &self.node_labels {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("--node-labels: {pair:?} is not key=value"))?;
            labels.insert(k.to_string(), v.to_string());
        }
        std::fs::create_dir_all(&self.root_dir)
            .with_context(|| format!("creating {}", self.root_dir.display()))?;
        let mut capacity = Capacity::detect(&self.root_dir);
        if let Some(cpu) = &self.cpu {
            capacity.cpu_millis = quantity(cpu, "cpu")?.milli().max(0) as u64;
        }
        if let Some(memory) = &self.memory {
            capacity.memory_bytes = quantity(memory, "memory")?.value().max(0) as u64;
        }
        capacity.pods = self.max_pods;
        let dns = canopy_agent::dns::PodDns {
            host: host_dns(),
            cluster: (!self.cluster_dns.is_empty()).then(|| canopy_agent::dns::ClusterDns {
                nameservers: self.cluster_dns.clone(),
                domain: self.proxy.cluster_domain.clone(),
            }),
        };
        let shim_binary = std::env::current_exe().context("locating the canopy executable")?;
        for ip in &self.node_ip {
            ip.parse::<std::net::IpAddr>()
                .with_context(|| format!("--node-ip {ip:?} is not an IP address"))?;
        }
        let mut node_ips = self.node_ip.clone().into_iter();
        let primary_ip = node_ips.next();
        let extra_ips: Vec<String> = node_ips.collect();
        let address = match (self.address, &primary_ip) {
            (Some(address), _) => address,
            (None, Some(ip)) => ip
                .parse()
                .with_context(|| format!("--node-ip {ip:?} is not an IP address"))?,
            (None, None) => std::net::IpAddr::from([0, 0, 0, 0]),
        };
        Ok(canopy_agent::AgentConfig {
            node: NodeConfig {
                name: self.node_name.unwrap_or_else(host_name),
                tenant: self.tenant,
                labels,
                internal_ip: primary_ip,
                extra_internal_ips: extra_ips,
                capacity,
                daemon_port: None,
                annotations: BTreeMap::new(),
            },
            root_dir: self.root_dir,
            state_dir: self.state_dir,
            log_dir: self.log_dir,
            runtime_binary: self.container_runtime,
            shim_binary,
            cgroup_parent: self.cgroup_parent,
            dns,
            image_gc_high_percent: self.image_gc_high_threshold,
            image_gc_low_percent: self.image_gc_low_threshold,
            log_rotation: canopy_agent::LogRotation {
                max_size: quantity(&self.container_log_max_size, "container-log-max-size")?
                    .value()
                    .max(1) as u64,
                max_files: self.container_log_max_files as usize,
                interval: self.container_log_monitor_interval,
            },
            listen: std::net::SocketAddr::new(address, self.port),
            client_ca,
            pod_network: match self.network_plugin {
                NetworkPlugin::None => canopy_agent::PodNetwork::Loopback,
                NetworkPlugin::Canopy => canopy_agent::PodNetwork::Ports,
            },
        })
    }
}

/// Runs the agent until SIGTERM or SIGINT; its pods' containers keep running.
pub async fn run(args: AgentArgs) -> Result<()> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let kube_config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .context("loading the kubeconfig")?;
    // Callers of the agent's API must hold certificates of the cluster's CA.
    let client_ca = kube_config.root_cert.clone().unwrap_or_default();
    if client_ca.is_empty() {
        anyhow::bail!(
            "{} names no certificate authority: the agent needs the cluster CA to know the API server's calls",
            args.kubeconfig.display()
        );
    }
    let run_proxy = !args.disable_proxy && crate::proxy::has_proxy_context(&args.kubeconfig);
    let (kubeconfig_path, tuning) = (args.kubeconfig.clone(), args.proxy.clone());
    let dns = args
        .cluster_dns
        .first()
        .and_then(|ip| ip.parse().ok())
        .map(|address| tuning.dns_at(address));
    let config = args.config(client_ca)?;
    let client = kube::Client::try_from(kube_config).context("building the API client")?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        crate::server::shutdown_signal().await;
        token.cancel();
    });
    let proxy = run_proxy.then(|| {
        let (node, shutdown) = (config.node.name.clone(), shutdown.clone());
        tokio::spawn(async move {
            let result = crate::proxy::run_proxy(
                &kubeconfig_path,
                crate::proxy::PROXY_CONTEXT,
                node,
                vec!["nft".to_string()],
                &tuning,
                dns,
                shutdown.clone(),
            )
            .await;
            if let Err(err) = result {
                // The node keeps running pods; its Services do not work, which the log says.
                tracing::error!(error = format!("{err:#}"), "the service proxy stopped");
            }
        })
    });
    let result = canopy_agent::run(client, config, shutdown.clone()).await;
    // The agent stopped, by signal or by failure: the proxy stops with it, so that a failed
    // agent exits (and says why) instead of living on as a VM without a Node.
    shutdown.cancel();
    if let Some(proxy) = proxy {
        let _ = proxy.await;
    }
    result
}

/// `canopy image`: the node's local image store.
#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Import images from an OCI image-layout archive or a `docker save` archive.
    Import {
        /// The archive (a .tar file).
        archive: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List the images in the store.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write an OCI archive of a runnable busybox image made from this machine's static
    /// busybox (/bin/busybox, Debian's busybox-static), to try Canopy without a registry:
    /// `canopy image busybox busybox.tar`, then `canopy image import busybox.tar`.
    Busybox {
        /// Where to write the archive.
        output: PathBuf,
        /// The image's name.
        #[arg(long, default_value = "busybox:latest")]
        name: String,
    },
    /// Remove an image (by name or ID).
    Remove {
        reference: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(clap::Args)]
pub struct StoreArgs {
    /// The agent's --root-dir (the store is its `images` directory).
    #[arg(long, default_value = "/var/lib/canopy/agent")]
    root_dir: PathBuf,
}

impl StoreArgs {
    fn open(&self) -> Result<canopy_image::ImageStore> {
        let dir = self.root_dir.join("images");
        canopy_image::ImageStore::open(&dir)
            .with_context(|| format!("opening the image store in {}", dir.display()))
    }
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

pub fn image(command: ImageCommand) -> Result<()> {
    match command {
        ImageCommand::Import { archive, store } => {
            let store = store.open()?;
            eprintln!("importing {} ...", archive.display());
            let images = store
                .import_archive(&archive)
                .with_context(|| format!("importing {}", archive.display()))?;
            for image in images {
                println!(
                    "imported {} {}",
                    short_id(&image.id),
                    image.names.join(", ")
                );
            }
        }
        ImageCommand::List { store } => {
            let store = store.open()?;
            println!("{:<14} {:>10}  NAMES", "IMAGE ID", "SIZE");
            for image in store.list()? {
                println!(
                    "{:<14} {:>9.1}M  {}",
                    short_id(&image.id),
                    image.size as f64 / (1 << 20) as f64,
                    image.names.join(", ")
                );
            }
        }
        ImageCommand::Busybox { output, name } => {
            canopy_image::testing::busybox_oci_archive(&output, &name).with_context(|| {
                format!(
                    "writing {} (needs /bin/busybox, a static build: Debian's busybox-static)",
                    output.display()
                )
            })?;
            println!("wrote {} ({name})", output.display());
        }
        ImageCommand::Remove { reference, store } => {
            store.open()?.remove(&reference)?;
            println!("removed {reference}");
        }
    }
    Ok(())
}
