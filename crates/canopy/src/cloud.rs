//! The cloud in `canopy server`: the IaaS provider (the local one: network namespaces as VMs)
//! and the cloud controller that creates tenants' VMs and pods' NICs on it.

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use canopy_apiserver::{kubeconfig, pki::Pki};
use canopy_cloud::{Flavor, Subnet};

use crate::server::parse_duration;

/// The IaaS the cloud controller uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CloudKind {
    /// VMs are network namespaces with their own cgroups on this machine, tenant networks
    /// are Linux bridges (needs root).
    Local,
    /// No cloud: nodes join by hand (`canopy agent`).
    None,
}

/// Flags of the cloud, in `canopy server`.
#[derive(clap::Args, Debug, Clone)]
pub struct CloudArgs {
    /// The IaaS tenants' VMs are created on: `local` (this machine; needs root) or `none`.
    /// Default: `local` when running as root, else `none`.
    #[arg(long, value_enum)]
    pub cloud: Option<CloudKind>,
    /// On shutdown, delete every VM, network and port of the local cloud and everything it
    /// added to this machine (namespaces, nftables tables, addresses, cgroups). Without it
    /// the VMs keep running and are found again at the next start.
    #[arg(long)]
    pub cleanup: bool,
    /// VM flavors, `name:vcpus:memoryMiB`, comma-separated; new VMs take the smallest that
    /// fits the pods waiting for them.
    #[arg(long, value_delimiter = ',', default_value = "c1m2:1:2048,c2m4:2:4096,c4m8:4:8192", value_parser = parse_flavor)]
    pub cloud_flavors: Vec<Flavor>,
    /// Spare VMs kept booted for any tenant: a tenant that needs a VM of their flavor takes
    /// one (its NIC and agent are added) instead of booting one. 0: no warm pool.
    #[arg(long, default_value_t = 0)]
    pub cloud_warm_pool: usize,
    /// The warm pool's flavor, one of --cloud-flavors (default: the smallest).
    #[arg(long)]
    pub cloud_warm_pool_flavor: Option<String>,
    /// A tenant's network when its Tenant names none; tenants' ranges may overlap.
    #[arg(long, default_value = "10.0.0.0/16", value_parser = parse_subnet)]
    pub cloud_default_cidr: Subnet,
    /// A VM that runs no pods for this long is deleted (seconds, or 90s, 5m, 1h).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub cloud_idle_timeout: Duration,
    /// A VM whose Node is not Ready this long after it was created is replaced.
    #[arg(long, default_value = "3m", value_parser = parse_duration)]
    pub cloud_boot_timeout: Duration,
    /// The local cloud's management network: its first address is where VMs reach the API
    /// server (added to this machine's loopback), each VM's agent gets one of the others.
    #[arg(long, default_value = "100.64.0.0/16", value_parser = parse_subnet)]
    pub cloud_management_cidr: Subnet,
    /// The port VMs reach the API server at, on the management network's first address. It
    /// stays the same across restarts (VMs keep their kubeconfigs), whatever --bind says.
    #[arg(long, default_value_t = 6443)]
    pub cloud_api_port: u16,
    /// The local cloud's public network, where pods annotated `canopy.io/public-ip: "true"`
    /// get their public IP; this machine takes its first address (and reaches the public
    /// IPs), or `none` for no public network.
    #[arg(long, default_value = "198.18.0.0/24", value_parser = parse_public)]
    pub cloud_public_cidr: PublicNetwork,
    /// An agent image store (`canopy image import --root-dir DIR`, then DIR/images) copied
    /// into each new local VM, like a VM image with container images preloaded.
    #[arg(long)]
    pub cloud_image_store: Option<PathBuf>,
}

fn parse_flavor(text: &str) -> Result<Flavor, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let [name, vcpus, memory] = parts.as_slice() else {
        return Err(format!("{text:?} is not name:vcpus:memoryMiB"));
    };
    let valid_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid_name {
        return Err(format!(
            "flavor name {name:?}: lowercase letters, digits and '-'"
        ));
    }
    let vcpus: u32 = vcpus
        .parse()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("vcpus {vcpus:?} must be a positive integer"))?;
    let memory_mib: u64 = memory
        .parse()
        .ok()
        .filter(|m| *m >= 64)
        .ok_or_else(|| format!("memory {memory:?} must be at least 64 (MiB)"))?;
    Ok(Flavor {
        name: name.to_string(),
        vcpus,
        memory_mib,
    })
}

fn parse_subnet(text: &str) -> Result<Subnet, String> {
    Subnet::parse(text)
}

/// `--cloud-public-cidr`: a subnet, or none.
#[derive(Clone, Copy, Debug)]
pub struct PublicNetwork(pub Option<Subnet>);

fn parse_public(text: &str) -> Result<PublicNetwork, String> {
    if text == "none" {
        Ok(PublicNetwork(None))
    } else {
        Subnet::parse(text).map(|s| PublicNetwork(Some(s)))
    }
}

impl CloudArgs {
    /// Checks what clap cannot: the warm pool's flavor is one of the flavors.
    pub fn validate(&self) -> Result<()> {
        if let Some(name) = &self.cloud_warm_pool_flavor
            && !self.cloud_flavors.iter().any(|f| &f.name == name)
        {
            bail!(
                "--cloud-warm-pool-flavor {name:?} is not one of --cloud-flavors ({})",
                self.cloud_flavors
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(())
    }

    /// The cloud to run, resolving the default.
    pub fn kind(&self) -> CloudKind {
        self.cloud.unwrap_or_else(|| {
            if nix::unistd::Uid::effective().is_root() {
                CloudKind::Local
            } else {
                CloudKind::None
            }
        })
    }

    /// The address VMs reach the control plane at.
    pub fn control_plane_ip(&self) -> Ipv4Addr {
        self.cloud_management_cidr
            .nth(1)
            .unwrap_or(Ipv4Addr::new(100, 64, 0, 1))
    }
}

/// Makes the control plane's management address exist on this machine before the API
/// server binds it (the provider keeps it; `--cleanup` removes it).
pub async fn prepare_host(args: &CloudArgs) -> Result<()> {
    if args.kind() != CloudKind::Local {
        return Ok(());
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("--cloud local needs root: VMs are network namespaces with their own cgroups");
    }
    let address = format!("{}/32", args.control_plane_ip());
    let out = tokio::process::Command::new("ip")
        .args(["addr", "replace", &address, "dev", "lo"])
        .output()
        .await
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "adding {address} to lo: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A short tag of this server's data directory in the kernel objects' names, so that
/// several servers (tests) on one machine keep their clouds apart.
fn instance_tag(data_dir: &std::path::Path) -> String {
    use sha2::Digest;
    let path = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let digest = sha2::Sha256::digest(path.to_string_lossy().as_bytes());
    digest[..2].iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens the local provider.
pub async fn open_local(
    args: &CloudArgs,
    data_dir: &std::path::Path,
    api_port: u16,
) -> Result<Arc<canopy_cloud::local::LocalProvider>> {
    let config = canopy_cloud::local::LocalConfig {
        state_dir: data_dir.join("cloud"),
        instance: instance_tag(data_dir),
        agent_binary: std::env::current_exe().context("locating the canopy executable")?,
        management: args.cloud_management_cidr,
        control_plane_ports: vec![api_port],
        image_seed: args.cloud_image_store.clone(),
        public: args.cloud_public_cidr.0,
    };
    let provider = canopy_cloud::local::LocalProvider::open(config)
        .await
        .context("opening the local cloud")?;
    Ok(Arc::new(provider))
}

/// The cloud controller's configuration from the flags.
pub fn controller_config(args: &CloudArgs) -> canopy_cloud_controller::Config {
    canopy_cloud_controller::Config {
        flavors: args.cloud_flavors.clone(),
        default_subnet: args.cloud_default_cidr,
        idle_timeout: args.cloud_idle_timeout,
        boot_timeout: args.cloud_boot_timeout,
        warm_pool: args.cloud_warm_pool,
        warm_pool_flavor: args.cloud_warm_pool_flavor.clone(),
        ..Default::default()
    }
}

/// What every term of a cloud controller as leader runs with, in `canopy server` and in
/// `canopy cloud-controller`.
#[derive(Clone)]
pub struct ControllerTerm {
    pub client: kube::Client,
    pub credentials: Arc<dyn canopy_cloud_controller::NodeCredentials>,
    pub recorder: canopy_controllers::events::Recorder,
    pub metrics: canopy_cloud_controller::metrics::Metrics,
    pub config: canopy_cloud_controller::Config,
}

impl ControllerTerm {
    /// Runs the controller on `provider` until the term ends.
    pub async fn run(self, provider: Arc<dyn canopy_cloud::CloudProvider>) {
        canopy_cloud_controller::run(
            self.client,
            provider,
            self.credentials,
            self.config,
            self.recorder,
            self.metrics,
        )
        .await
    }
}

/// Opens the local cloud, retrying with backoff: a standalone controller's term as leader
/// starts so (only the leader touches the cloud; replicas share its state directory).
async fn open_local_retrying(
    args: &CloudArgs,
    data_dir: &std::path::Path,
    api_port: u16,
) -> Arc<dyn canopy_cloud::CloudProvider> {
    let mut delay = Duration::from_secs(1);
    loop {
        match open_local(args, data_dir, api_port).await {
            Ok(provider) => return provider,
            Err(error) => {
                tracing::error!(
                    error = format!("{error:#}"),
                    "opening the local cloud failed; retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// `canopy cloud-controller`: the cloud controller alone, with leader election, against
/// a `canopy server --disable-cloud-controller` on this machine.
#[derive(clap::Args, Debug)]
pub struct CloudControllerCmd {
    /// Kubeconfig of the cloud controller's identity (`canopy server` writes
    /// <data-dir>/cloud-controller.kubeconfig).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// The server's data directory: its cluster CA signs the VMs' node credentials, and the
    /// local cloud keeps its state in <data-dir>/cloud (replicas share it; only the leader
    /// uses it).
    #[arg(long, default_value = "./canopy-data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub cloud: CloudArgs,
    #[command(flatten)]
    pub leader_election: crate::leader::LeaderElectionArgs,
    /// Address of the plain-HTTP endpoint with /metrics, /healthz, /livez and /readyz
    /// (upstream's cloud-controller-manager port; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:10258")]
    pub metrics_bind_address: std::net::SocketAddr,
}

/// Runs `canopy cloud-controller` until SIGTERM; with `--cleanup`, the cloud is destroyed
/// on the way out.
pub async fn run_standalone(cmd: CloudControllerCmd) -> Result<()> {
    cmd.cloud.validate()?;
    if cmd.cloud.kind() != CloudKind::Local {
        bail!("the cloud controller needs a cloud: --cloud local (as root)");
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("--cloud local needs root: VMs are network namespaces with their own cgroups");
    }
    let pki = Pki::new(&cmd.data_dir);
    if !pki.ca_cert_path().exists() {
        bail!(
            "no cluster CA in {}: give the data directory of the `canopy server` this controller serves",
            cmd.data_dir.display()
        );
    }
    let ca = pki.ensure_ca()?;
    let client = crate::server::client_from(&cmd.kubeconfig).await?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = canopy_cloud_controller::metrics::Metrics::register(&mut registry);
    let served =
        crate::component_http::serve(cmd.metrics_bind_address, Arc::new(registry), client.clone())
            .await?;
    tracing::info!(address = %served, "serving /metrics, /healthz and /readyz");
    let vm_url = format!(
        "https://{}:{}",
        cmd.cloud.control_plane_ip(),
        cmd.cloud.cloud_api_port
    );
    let credentials: Arc<dyn canopy_cloud_controller::NodeCredentials> = Arc::new(CaCredentials {
        pki: Pki::new(&cmd.data_dir),
        ca_pem: ca.cert_pem,
        server_url: vm_url,
    });
    let events = canopy_controllers::events::EventSink::default();
    let recorder = events.recorder("cloud-controller");
    let event_writer = {
        let client = client.clone();
        tokio::spawn(async move { events.run(client).await })
    };
    let term = ControllerTerm {
        client: client.clone(),
        credentials,
        recorder,
        metrics,
        config: controller_config(&cmd.cloud),
    };
    let args = cmd.cloud.clone();
    let data_dir = cmd.data_dir.clone();
    crate::leader::run_elected(
        client,
        "cloud-controller",
        cmd.leader_election,
        crate::server::shutdown_signal(),
        move || {
            let (term, args, data_dir) = (term.clone(), args.clone(), data_dir.clone());
            async move {
                let provider = open_local_retrying(&args, &data_dir, args.cloud_api_port).await;
                term.run(provider).await
            }
        },
    )
    .await;
    event_writer.abort();
    if cmd.cloud.cleanup {
        tracing::info!("--cleanup: deleting the local cloud's VMs, networks and ports");
        open_local(&cmd.cloud, &cmd.data_dir, cmd.cloud.cloud_api_port)
            .await?
            .destroy_all()
            .await
            .context("cleaning up the local cloud")?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Node credentials issued by the cluster CA, for the API server at `server_url` as VMs
/// reach it.
pub struct CaCredentials {
    pub pki: Pki,
    pub ca_pem: String,
    pub server_url: String,
}

impl canopy_cloud_controller::NodeCredentials for CaCredentials {
    fn kubeconfig(&self, node: &str, tenant: &str) -> Result<String> {
        let user = format!("system:node:{node}");
        let tenant_group = format!("canopy:tenant:{tenant}");
        let pair = self
            .pki
            .issue_client(&user, &["system:nodes", tenant_group.as_str()])?;
        // The VM's service proxy reads its tenant's Services under an identity of its own,
        // which can read nothing else.
        let proxy_user = format!("{}{tenant}", canopy_apiserver::authz::PROXY_USER_PREFIX);
        let proxy_pair = self
            .pki
            .issue_client(&proxy_user, &[canopy_apiserver::authz::PROXIES_GROUP])?;
        Ok(kubeconfig::render_contexts(
            &self.server_url,
            &self.ca_pem,
            &[
                ("canopy", &user, &pair),
                (crate::proxy::PROXY_CONTEXT, &proxy_user, &proxy_pair),
            ],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavors_parse_strictly() {
        assert_eq!(
            parse_flavor("c2m4:2:4096").unwrap(),
            Flavor {
                name: "c2m4".into(),
                vcpus: 2,
                memory_mib: 4096
            }
        );
        for bad in ["c2m4", "c2m4:0:4096", "c2m4:2:10", "C2:2:4096", "a:b:c"] {
            assert!(parse_flavor(bad).is_err(), "{bad}");
        }
    }
}
