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

impl CloudArgs {
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
        ..Default::default()
    }
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
        Ok(kubeconfig::render(
            &self.server_url,
            &self.ca_pem,
            &pair,
            &user,
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
