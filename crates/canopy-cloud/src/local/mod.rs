//! The local provider: the embedded IaaS of a single-machine cloud (it runs as root).
//!
//! A server ("VM") is a network namespace `cnp-<i>-<name>` with a cgroup sized by its
//! flavor and one `canopy agent` running inside both; a tenant network is a bridge in the
//! switch namespace `cnp-<i>-sw`; a port is a veth pair whose switch end is in the bridge.
//! Servers reach the control plane (and only it, on its ports) over a management link to
//! the host. The `net` module describes the isolation; [`names`] how every kernel object is
//! named (derived from object names, so nothing is orphaned that cannot be found again).
//!
//! The state directory is the provider's memory (the `state` module): an object is recorded before
//! its kernel objects are made and forgotten after they are gone, so a crash at any point
//! leaves a record that `open` either completes (networks, ports, built servers) or cleans
//! up (a server cut short while being built), and whatever carries this instance's names
//! without a record is removed. `open` also recreates what the kernel lost (after a host
//! reboot: namespaces, links, cgroups) and restarts agents, like VMs coming back.

mod agent;
mod cgroup;
mod cmd;
mod ipam;
pub mod names;
mod net;
mod state;

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use nix::{sys::signal, unistd::Pid};

use crate::{
    CloudError, CloudProvider, Network, NetworkSpec, Port, PortSpec, PublicIp, PublicIpSpec,
    Server, ServerSpec, ServerStatus, SpareSpec, Subnet,
};
use cmd::Cmd;
use state::{AgentProcess, Kind, NetworkRecord, Phase, PortRecord, ServerRecord, State, Store};

/// How long a server's processes may take to die once SIGKILLed.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The local provider's configuration.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// Where the provider keeps its state (one JSON file per object, written atomically)
    /// and each server's directory.
    pub state_dir: PathBuf,
    /// A short tag (1–4 lowercase alphanumerics) in every kernel object's name, so that
    /// several providers (test clusters) coexist on one host. No tag may be a prefix of
    /// another's on the same host (their management links would be confused).
    pub instance: String,
    /// The `canopy` executable started in each server as `<agent_binary> agent <args…>`.
    pub agent_binary: PathBuf,
    /// The management network: its first host address is the control plane's (added as a
    /// /32 on the host's `lo`); each server gets one of the others as a /32.
    pub management: Subnet,
    /// TCP ports of the control plane that servers may reach on the control-plane address.
    pub control_plane_ports: Vec<u16>,
    /// An agent image store directory, hard-linked (`cp -al`) into each new server's
    /// `root/images` so that servers boot with its images present; `None`: empty.
    pub image_seed: Option<PathBuf>,
    /// The public network public IPs come from; its first address is the host's (on a
    /// link to the switch), its second the switch's. `None`: no public IPs.
    pub public: Option<Subnet>,
}

impl LocalConfig {
    /// The control plane's address: the management subnet's first host address.
    pub fn control_plane_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from((u32::from(self.management.address) & self.management.mask()) + 1)
    }

    fn check(&self) -> Result<()> {
        if !names::valid_instance(&self.instance) {
            bail!(
                "instance tag {:?} must be 1 to 4 lowercase letters or digits",
                self.instance
            );
        }
        ipam::check_subnet(self.management).map_err(|e| anyhow!("management network: {e}"))?;
        if self.management.prefix > 29 {
            bail!(
                "management network {} leaves no address for servers",
                self.management
            );
        }
        if let Some(public) = self.public {
            ipam::check_subnet(public).map_err(|e| anyhow!("public network: {e}"))?;
            if public.prefix > 29 {
                bail!("public network {public} leaves no address for public IPs");
            }
            if public.contains(self.management.address) || self.management.contains(public.address)
            {
                bail!(
                    "public network {public} overlaps the management network {}",
                    self.management
                );
            }
        }
        Ok(())
    }

    /// The paths made absolute: agents run elsewhere than the provider's working
    /// directory and are given paths in the state directory.
    fn absolute(mut self) -> Result<LocalConfig> {
        self.state_dir = std::path::absolute(&self.state_dir)
            .with_context(|| format!("resolving {}", self.state_dir.display()))?;
        // A bare command name is looked up in PATH, as `ip netns exec` would.
        if self.agent_binary.components().count() > 1 {
            self.agent_binary = std::path::absolute(&self.agent_binary)
                .with_context(|| format!("resolving {}", self.agent_binary.display()))?;
        }
        if let Some(seed) = &self.image_seed {
            self.image_seed = Some(
                std::path::absolute(seed)
                    .with_context(|| format!("resolving {}", seed.display()))?,
            );
        }
        Ok(self)
    }
}

/// The local IaaS. Mutations are serialized (`ops`); reads take a snapshot of the state.
pub struct LocalProvider {
    config: LocalConfig,
    kernel: net::Kernel,
    cgroups: cgroup::Layout,
    store: Store,
    state: parking_lot::Mutex<State>,
    ops: tokio::sync::Mutex<()>,
}

fn failed(e: anyhow::Error) -> CloudError {
    CloudError::Failed(format!("{e:#}"))
}

impl LocalProvider {
    /// Loads the state and brings the kernel back to it: recreates what is missing (after
    /// a host reboot, every server's namespace, links, NIC and cgroups, and restarts its
    /// agent), finishes off servers whose creation was cut short, and removes kernel
    /// objects of this instance that no record accounts for. Idempotent.
    pub async fn open(config: LocalConfig) -> Result<LocalProvider> {
        config.check()?;
        let config = config.absolute()?;
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        let store = Store::new(config.state_dir.clone());
        let loaded = {
            let store = store.clone();
            state::blocking(move || store.load()).await?
        };
        let provider = LocalProvider {
            kernel: net::Kernel {
                instance: config.instance.clone(),
                switch: names::switch_netns(&config.instance),
                control_plane: config.control_plane_ip(),
                control_plane_ports: config.control_plane_ports.clone(),
                public: config.public,
            },
            cgroups: cgroup::Layout::detect(),
            store,
            state: parking_lot::Mutex::new(loaded),
            ops: tokio::sync::Mutex::new(()),
            config,
        };
        let started = Instant::now();
        provider.repair().await?;
        tracing::info!(
            instance = %provider.config.instance,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "local provider ready"
        );
        Ok(provider)
    }

    /// Removes everything this instance made: every server (its processes killed), port
    /// and network, the switch namespace, the host's table, the control-plane address,
    /// the cgroups, and the state directory. The provider is unusable afterwards. Goes on
    /// past failures and reports them all.
    pub async fn destroy_all(&self) -> Result<()> {
        let _ops = self.ops.lock().await;
        let mut errors = Vec::new();
        let servers: Vec<String> = self.state.lock().servers.keys().cloned().collect();
        for name in servers {
            if let Err(e) = self.teardown_server(&name).await {
                errors.push(format!("server {name}: {e:#}"));
            }
        }
        // Whatever a failed teardown left is, from here on, an orphan like any other.
        self.state.lock().servers.clear();
        if let Err(e) = self.collect_orphans().await {
            errors.push(format!("{e:#}"));
        }
        let top = names::instance_cgroup(&self.config.instance);
        if let Err(e) = self.cgroups.kill_all(&top, KILL_TIMEOUT).await {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = self.cgroups.remove(&top).await {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = net::delete_netns(&self.kernel.switch).await {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = self.kernel.teardown_host().await {
            errors.push(format!("{e:#}"));
        }
        *self.state.lock() = State::default();
        let dir = self.config.state_dir.clone();
        if let Err(e) = state::blocking(move || remove_dir_all(&dir)).await {
            errors.push(format!("{e:#}"));
        }
        if errors.is_empty() {
            tracing::info!(instance = %self.config.instance, "local cloud destroyed");
            Ok(())
        } else {
            bail!(
                "destroying the local cloud {}: {}",
                self.config.instance,
                errors.join("; ")
            )
        }
    }

    // ----- open -----

    async fn repair(&self) -> Result<()> {
        let _ops = self.ops.lock().await;
        let clashing = self.kernel.clashing_instances().await?;
        if !clashing.is_empty() {
            bail!(
                "instance tag {:?} clashes with the local cloud(s) {clashing:?} on this host: no tag may be a prefix of another",
                self.config.instance
            );
        }
        self.kernel
            .check_management_free(self.config.management)
            .await?;
        self.kernel.check_public_free().await?;
        self.kernel.ensure_host().await?;
        let (networks, ports, attached) = {
            let state = self.state.lock();
            let attached: HashSet<String> = state
                .ports
                .values()
                .filter(|p| p.port.server.is_some())
                .map(|p| p.port.name.clone())
                .collect();
            (
                state.networks.values().cloned().collect::<Vec<_>>(),
                state
                    .ports
                    .values()
                    .map(|p| p.port.clone())
                    .collect::<Vec<_>>(),
                attached,
            )
        };
        // A public IP bound to a port that is gone (a crash while deleting it) is unbound.
        let dangling: Vec<PublicIp> = {
            let state = self.state.lock();
            state
                .public_ips
                .values()
                .filter(|ip| {
                    ip.port
                        .as_ref()
                        .is_some_and(|p| !state.ports.contains_key(p))
                })
                .cloned()
                .collect()
        };
        for mut ip in dangling {
            ip.port = None;
            self.put_public_ip(ip).await?;
        }
        let bindings = self.bindings();
        self.kernel
            .ensure_switch(&networks, &ports, &attached, &bindings)
            .await?;
        let servers: Vec<ServerRecord> = self.state.lock().servers.values().cloned().collect();
        for rec in servers {
            match rec.phase {
                Phase::Building => {
                    tracing::warn!(server = %rec.name, "creation was interrupted; cleaning up");
                    let msg = "creation was interrupted (the provider stopped)".to_string();
                    self.fail_server(rec, msg).await?;
                }
                Phase::Ready => {
                    if let Err(e) = self.repair_server(&rec).await {
                        // One broken server must not keep the cloud from starting: it
                        // shows as Shutoff, and the next open tries again.
                        tracing::error!(server = %rec.name, error = %format!("{e:#}"), "could not bring the server back");
                    }
                }
                Phase::Spare => {
                    if let Err(e) = self.build_kernel(&rec).await {
                        tracing::error!(server = %rec.name, error = %format!("{e:#}"), "could not bring the spare server back");
                    }
                }
                Phase::Failed(_) => {}
            }
        }
        self.collect_orphans().await
    }

    /// Brings one built server back: its kernel objects, and its agent unless it runs.
    async fn repair_server(&self, rec: &ServerRecord) -> Result<()> {
        let netns = names::server_netns(&self.config.instance, &rec.name);
        let mut running = rec.agent.as_ref().is_some_and(agent::is_alive);
        if running
            && !rec
                .agent
                .as_ref()
                .is_some_and(|a| agent::in_netns(a, &netns))
        {
            // Its namespace was deleted (or replaced) under it: the agent and its pods
            // are cut off in a namespace nobody can name. Reboot the "VM".
            tracing::warn!(server = %rec.name, "agent runs outside the server's namespace; restarting the server");
            self.cgroups
                .kill_all(
                    &names::server_cgroup(&self.config.instance, &rec.name),
                    KILL_TIMEOUT,
                )
                .await?;
            running = false;
        }
        self.build_kernel(rec).await?;
        if !running {
            tracing::info!(server = %rec.name, "starting the server's agent again");
            let process = self.start_agent(rec)?;
            let mut rec = rec.clone();
            rec.agent = Some(process);
            self.put_server(rec).await?;
        }
        Ok(())
    }

    /// Removes kernel objects, records and directories of this instance that no server
    /// accounts for (left by a crash between making and recording, or recording and
    /// forgetting).
    async fn collect_orphans(&self) -> Result<()> {
        let (servers, orphan_nics): (HashSet<String>, Vec<PortRecord>) = {
            let state = self.state.lock();
            (
                state.servers.keys().cloned().collect(),
                state
                    .ports
                    .values()
                    .filter(|p| {
                        p.nic_of
                            .as_ref()
                            .is_some_and(|s| !state.servers.contains_key(s))
                    })
                    .cloned()
                    .collect(),
            )
        };
        for port in orphan_nics {
            self.kernel.unplug(&port.port.name).await?;
            self.kernel.unguard_port(&port.port).await?;
            self.drop_port(&port.port.name).await?;
        }
        let prefix = format!("cnp-{}-", self.config.instance);
        let mut orphans: HashSet<String> = net::netns_list()
            .iter()
            .filter_map(|ns| ns.strip_prefix(&prefix))
            .filter(|name| *name != "sw" && !servers.contains(*name))
            .map(str::to_string)
            .collect();
        for dir in self
            .cgroups
            .dirs(&names::instance_cgroup(&self.config.instance))
        {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.path().is_dir() && !servers.contains(&name) {
                    orphans.insert(name);
                }
            }
        }
        let server_dirs = self.store.root().join("servers");
        for entry in std::fs::read_dir(&server_dirs)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && !servers.contains(&name) {
                orphans.insert(name);
            }
        }
        for name in orphans {
            tracing::info!(server = %name, "removing what is left of an unrecorded server");
            self.teardown_server(&name).await?;
        }
        let links: HashSet<String> = servers
            .iter()
            .map(|s| names::mgmt_host_link(&self.config.instance, s))
            .collect();
        for link in net::links(None).await? {
            if names::is_mgmt_host_link(&self.config.instance, &link) && !links.contains(&link) {
                tracing::info!(link, "removing a management link of no server");
                net::delete_link(None, &link).await?;
            }
        }
        Ok(())
    }

    // ----- records -----

    async fn put_server(&self, rec: ServerRecord) -> Result<()> {
        self.store.save(Kind::Server, &rec.name, &rec).await?;
        self.state.lock().servers.insert(rec.name.clone(), rec);
        Ok(())
    }

    async fn drop_server(&self, name: &str) -> Result<()> {
        self.store.remove(Kind::Server, name).await?;
        self.state.lock().servers.remove(name);
        Ok(())
    }

    async fn put_port(&self, rec: PortRecord) -> Result<()> {
        self.store.save(Kind::Port, &rec.port.name, &rec).await?;
        self.state.lock().ports.insert(rec.port.name.clone(), rec);
        Ok(())
    }

    async fn drop_port(&self, name: &str) -> Result<()> {
        self.store.remove(Kind::Port, name).await?;
        self.state.lock().ports.remove(name);
        Ok(())
    }

    async fn put_network(&self, rec: NetworkRecord) -> Result<()> {
        self.store
            .save(Kind::Network, &rec.network.name, &rec)
            .await?;
        self.state
            .lock()
            .networks
            .insert(rec.network.name.clone(), rec);
        Ok(())
    }

    async fn put_public_ip(&self, rec: PublicIp) -> Result<()> {
        self.store.save(Kind::PublicIp, &rec.name, &rec).await?;
        self.state.lock().public_ips.insert(rec.name.clone(), rec);
        Ok(())
    }

    async fn drop_public_ip(&self, name: &str) -> Result<()> {
        self.store.remove(Kind::PublicIp, name).await?;
        self.state.lock().public_ips.remove(name);
        Ok(())
    }

    /// Every bound public IP with its port, as the switch needs them. A binding whose
    /// port record is gone (a crash in between) is left out; `open` unbinds it.
    fn bindings(&self) -> Vec<net::Binding> {
        let state = self.state.lock();
        state
            .public_ips
            .values()
            .filter_map(|ip| {
                let port = state.ports.get(ip.port.as_ref()?)?;
                Some(net::Binding {
                    address: ip.address,
                    port: port.port.clone(),
                })
            })
            .collect()
    }

    /// Unbinds the public IPs bound to a port (the port is going).
    async fn unbind_port_public_ips(&self, port: &PortRecord) -> Result<()> {
        let bound: Vec<PublicIp> = self
            .state
            .lock()
            .public_ips
            .values()
            .filter(|ip| ip.port.as_deref() == Some(port.port.name.as_str()))
            .cloned()
            .collect();
        for mut ip in bound {
            self.kernel
                .unbind_public(&net::Binding {
                    address: ip.address,
                    port: port.port.clone(),
                })
                .await?;
            ip.port = None;
            self.put_public_ip(ip).await?;
        }
        Ok(())
    }

    fn public_network(&self) -> Result<Subnet, CloudError> {
        self.config.public.ok_or_else(|| {
            CloudError::Invalid("this cloud has no public network (no public IPs)".into())
        })
    }

    async fn drop_network(&self, name: &str) -> Result<()> {
        self.store.remove(Kind::Network, name).await?;
        self.state.lock().networks.remove(name);
        Ok(())
    }

    // ----- servers -----

    fn server_view(rec: &ServerRecord) -> Server {
        let status = match &rec.phase {
            Phase::Building => ServerStatus::Building,
            Phase::Failed(msg) => ServerStatus::Error(msg.clone()),
            Phase::Ready if rec.agent.as_ref().is_some_and(agent::is_alive) => ServerStatus::Active,
            Phase::Ready => ServerStatus::Shutoff,
            Phase::Spare => ServerStatus::Spare,
        };
        Server {
            name: rec.name.clone(),
            tenant: rec.tenant.clone(),
            flavor: rec.flavor.clone(),
            status,
            management_ip: rec.management_ip,
            ip: rec.ip,
            network: rec.network.clone(),
            tags: rec.tags.clone(),
            created_at: rec.created_at,
        }
    }

    fn check_server_spec(spec: &ServerSpec) -> Result<(), CloudError> {
        names::check_server_name(&spec.name).map_err(CloudError::Invalid)?;
        if spec.tenant.is_empty() {
            return Err(CloudError::Invalid("the server has no tenant".into()));
        }
        Self::check_flavor(&spec.flavor)?;
        if spec.bootstrap.node_name.is_empty() || spec.bootstrap.kubeconfig.is_empty() {
            return Err(CloudError::Invalid(
                "the bootstrap needs a node name and a kubeconfig".into(),
            ));
        }
        for pair in &spec.nic.allowed_address_pairs {
            Subnet::parse(pair)
                .map_err(|e| CloudError::Invalid(format!("allowed address pair: {e}")))?;
        }
        Ok(())
    }

    /// The agent's command line (after the binary).
    fn agent_args(&self, rec: &ServerRecord) -> Vec<String> {
        let dir = self.store.server_dir(&rec.name);
        let path = |p: &str| dir.join(p).to_string_lossy().into_owned();
        let mgmt = rec
            .management_ip
            .map(|ip| ip.to_string())
            .unwrap_or_default();
        let mut args = vec![
            "agent".to_string(),
            "--kubeconfig".into(),
            path("kubeconfig"),
            "--node-name".into(),
            rec.node_name.clone(),
            "--tenant".into(),
            rec.tenant.clone(),
            // The management address first (the control plane reaches the agent there),
            // then the VM's address in its tenant's network, which its pods reach.
            "--node-ip".into(),
            match rec.ip {
                Some(ip) => format!("{mgmt},{ip}"),
                None => mgmt.clone(),
            },
            "--address".into(),
            mgmt,
            "--cpu".into(),
            rec.flavor.vcpus.to_string(),
            "--memory".into(),
            format!("{}Mi", rec.flavor.memory_mib),
            "--root-dir".into(),
            path("root"),
            "--state-dir".into(),
            path("state"),
            "--log-dir".into(),
            path("logs"),
            "--cgroup-parent".into(),
            names::pods_cgroup(&self.config.instance, &rec.name),
        ];
        args.extend(rec.agent_args.iter().cloned());
        args
    }

    fn start_agent(&self, rec: &ServerRecord) -> Result<AgentProcess> {
        let dir = self.store.server_dir(&rec.name);
        let kubeconfig = dir.join("kubeconfig");
        if !kubeconfig.exists() {
            bail!(
                "{} is missing: the agent cannot join without it",
                kubeconfig.display()
            );
        }
        agent::start(agent::Launch {
            server: &rec.name,
            netns: &names::server_netns(&self.config.instance, &rec.name),
            binary: &self.config.agent_binary,
            args: self.agent_args(rec),
            cgroup_procs: self
                .cgroups
                .agent_procs_files(&self.config.instance, &rec.name),
            log: dir.join("agent.log"),
            pid_file: dir.join("agent.pid"),
        })
    }

    /// The server's files: its directory (0700: it holds the node's credential), the
    /// kubeconfig (0600, never logged), and the seeded image store.
    async fn prepare_files(&self, name: &str, kubeconfig: Option<&str>) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.store.server_dir(name);
        let seed = self.config.image_seed.clone();
        let kubeconfig = kubeconfig.map(|k| k.as_bytes().to_vec());
        let seeding = dir.join("root/.images.seeding");
        let images = dir.join("root/images");
        let interrupted = seeding.clone();
        state::blocking(move || {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
            for sub in ["root", "state", "logs"] {
                std::fs::create_dir_all(dir.join(sub))?;
            }
            if let Some(kubeconfig) = kubeconfig {
                state::write_atomic(&dir.join("kubeconfig"), &kubeconfig, 0o600)?;
            }
            // An interrupted seeding is redone whole.
            remove_dir_all(&interrupted)?;
            Ok(())
        })
        .await?;
        let Some(seed) = seed else {
            return Ok(());
        };
        if images.exists() {
            return Ok(());
        }
        if !seed.is_dir() {
            bail!("the image seed {} is not a directory", seed.display());
        }
        // Hard links: instant and free, and safe because the image store never changes a
        // file in place (blobs and layers are immutable, the index is replaced by rename).
        let linked = Cmd::new("cp")
            .arg("-al")
            .arg(&seed)
            .arg(&seeding)
            .run()
            .await;
        if let Err(e) = linked {
            if !format!("{e:#}").contains("cross-device") {
                return Err(e);
            }
            tracing::warn!(
                server = name,
                "the image seed is on another file system than the state directory: copying it instead of hard-linking"
            );
            remove_dir_all(&seeding)?;
            Cmd::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(&seed)
                .arg(&seeding)
                .run()
                .await?;
        }
        std::fs::rename(&seeding, &images)
            .with_context(|| format!("renaming {} to {}", seeding.display(), images.display()))
    }

    /// Makes (or repairs) a built server's kernel objects: namespace, management link,
    /// NIC, cgroups, and its attached ports' pairs.
    async fn build_kernel(&self, rec: &ServerRecord) -> Result<()> {
        let instance = &self.config.instance;
        let netns = names::server_netns(instance, &rec.name);
        net::ensure_netns(&netns).await?;
        self.kernel.check_netns(&netns).await?;
        // A spare has no NIC until it is claimed.
        let (nic, attached) = {
            let state = self.state.lock();
            let nic = if rec.phase == Phase::Spare {
                None
            } else {
                let nic = state
                    .ports
                    .get(&names::nic_port(&rec.name))
                    .map(|p| p.port.clone())
                    .with_context(|| format!("server {} has no NIC port", rec.name))?;
                let network = state
                    .networks
                    .get(&nic.network)
                    .map(|n| n.network.clone())
                    .with_context(|| {
                        format!("the network {} of server {} is gone", nic.network, rec.name)
                    })?;
                Some((nic, network))
            };
            let attached: Vec<Port> = state
                .ports
                .values()
                .filter(|p| {
                    p.nic_of.is_none() && p.port.server.as_deref() == Some(rec.name.as_str())
                })
                .map(|p| p.port.clone())
                .collect();
            (nic, attached)
        };
        let management_ip = rec
            .management_ip
            .with_context(|| format!("server {} has no management address", rec.name))?;
        if let Some((nic, _)) = &nic {
            self.kernel.guard_port(nic).await?;
            let has_nic = self.kernel.port_plugged(&nic.name).await?
                && net::link_exists(Some(&netns), names::NIC_DEVICE).await?;
            if !has_nic {
                net::delete_link(Some(&netns), names::NIC_DEVICE).await?;
                self.kernel.plug(nic, &netns, names::NIC_DEVICE).await?;
            }
        }
        let nic_config = nic.as_ref().map(|(nic, network)| net::NicConfig {
            ip: nic.ip,
            subnet: network.subnet,
            gateway: network.gateway,
        });
        self.kernel
            .ensure_server_links(&rec.name, management_ip, nic_config.as_ref())
            .await?;
        self.cgroups.ensure_server(
            instance,
            &rec.name,
            cgroup::Limits {
                memory_bytes: rec.flavor.memory_mib << 20,
                vcpus: rec.flavor.vcpus,
            },
        )?;
        for port in attached {
            self.kernel.guard_port(&port).await?;
            if !self.kernel.port_plugged(&port.name).await? {
                self.kernel.plug(&port, &netns, &port.device).await?;
            }
        }
        Ok(())
    }

    /// Kills everything of a server and removes its kernel objects and directory; its
    /// NIC port is released, its other ports detached. The record is the caller's.
    /// Works from the name alone, for servers nobody recorded.
    async fn teardown_server(&self, name: &str) -> Result<()> {
        let instance = &self.config.instance;
        let netns = names::server_netns(instance, name);
        let cgroup = names::server_cgroup(instance, name);
        self.cgroups.kill_all(&cgroup, KILL_TIMEOUT).await?;
        // Processes that entered the namespace but not the cgroup (`ip netns exec` by
        // hand) would keep the namespace, and its links, alive.
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let pids = net::netns_pids(&netns).await?;
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!("processes {pids:?} in namespace {netns} survive SIGKILL");
            }
            for pid in pids {
                let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.cgroups.remove(&cgroup).await?;
        let ports: Vec<PortRecord> = self
            .state
            .lock()
            .ports
            .values()
            .filter(|p| p.port.server.as_deref() == Some(name) || p.nic_of.as_deref() == Some(name))
            .cloned()
            .collect();
        for mut rec in ports {
            // Deleting the switch end now (rather than letting the namespace's end go
            // with it, asynchronously) lets the port be attached elsewhere at once.
            self.kernel.unplug(&rec.port.name).await?;
            if rec.nic_of.as_deref() == Some(name) {
                self.kernel.unguard_port(&rec.port).await?;
                self.drop_port(&rec.port.name).await?;
            } else {
                rec.port.server = None;
                self.put_port(rec).await?;
            }
        }
        self.kernel.remove_server_links(name).await?;
        let dir = self.store.server_dir(name);
        state::blocking(move || {
            remove_pod_netns_files(&dir);
            remove_dir_all(&dir)
        })
        .await
    }

    /// Cleans up after a failed creation and records the failure.
    async fn fail_server(&self, mut rec: ServerRecord, msg: String) -> Result<()> {
        if let Err(e) = self.teardown_server(&rec.name).await {
            tracing::error!(server = %rec.name, error = %format!("{e:#}"), "cleaning up after a failed creation");
        }
        rec.phase = Phase::Failed(msg);
        rec.management_ip = None;
        rec.ip = None;
        rec.agent = None;
        self.put_server(rec).await
    }

    async fn delete_server_locked(&self, name: &str) -> Result<(), CloudError> {
        if !self.state.lock().servers.contains_key(name) {
            return Ok(());
        }
        let started = Instant::now();
        self.teardown_server(name).await.map_err(failed)?;
        self.drop_server(name).await.map_err(failed)?;
        tracing::info!(
            server = name,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "server deleted"
        );
        Ok(())
    }

    /// Allocates a server's addresses and records the server (phase Building) and its
    /// NIC port, in that order: a crash after this is cleaned up by `open`.
    async fn record_new_server(
        &self,
        spec: &ServerSpec,
        spare: Option<&ServerRecord>,
    ) -> Result<ServerRecord, CloudError> {
        let nic_name = names::nic_port(&spec.name);
        let (rec, nic) = {
            let state = self.state.lock();
            let network = state
                .networks
                .get(&spec.nic.network)
                .ok_or_else(|| CloudError::not_found("network", &spec.nic.network))?;
            if network.network.tenant != spec.tenant {
                return Err(CloudError::Conflict(format!(
                    "network {:?} belongs to tenant {:?}, not {:?}",
                    spec.nic.network, network.network.tenant, spec.tenant
                )));
            }
            if let Some(port) = state.ports.get(&nic_name) {
                return Err(CloudError::Conflict(format!(
                    "port {:?} (the name of this server's NIC) exists on network {:?}",
                    nic_name, port.port.network
                )));
            }
            self.check_mgmt_link_free(&state, &spec.name)?;
            let ip = port_address(&state, &network.network, spec.nic.ip)?;
            // A claimed spare keeps its management address.
            let management_ip = match spare.and_then(|s| s.management_ip) {
                Some(ip) => ip,
                None => self.allocate_management_ip(&state)?,
            };
            let rec = ServerRecord {
                name: spec.name.clone(),
                tenant: spec.tenant.clone(),
                flavor: spec.flavor.clone(),
                network: spec.nic.network.clone(),
                tags: spec.tags.clone(),
                created_at: chrono::Utc::now(),
                phase: Phase::Building,
                management_ip: Some(management_ip),
                ip: Some(ip),
                node_name: spec.bootstrap.node_name.clone(),
                agent_args: spec.bootstrap.agent_args.clone(),
                agent: None,
            };
            let nic = PortRecord {
                port: Port {
                    name: nic_name.clone(),
                    network: spec.nic.network.clone(),
                    ip,
                    mac: names::port_mac(&nic_name),
                    server: Some(spec.name.clone()),
                    device: names::NIC_DEVICE.into(),
                    tags: BTreeMap::new(),
                    allowed_address_pairs: spec.nic.allowed_address_pairs.clone(),
                },
                nic_of: Some(spec.name.clone()),
            };
            (rec, nic)
        };
        self.put_server(rec.clone()).await.map_err(failed)?;
        self.put_port(nic).await.map_err(failed)?;
        Ok(rec)
    }

    async fn build_server(&self, rec: &ServerRecord, spec: &ServerSpec) -> Result<AgentProcess> {
        self.prepare_files(&rec.name, Some(&spec.bootstrap.kubeconfig))
            .await?;
        self.build_kernel(rec).await?;
        self.start_agent(rec)
    }

    /// Refuses a server name whose management link name another server's already has.
    fn check_mgmt_link_free(&self, state: &State, name: &str) -> Result<(), CloudError> {
        let link = names::mgmt_host_link(&self.config.instance, name);
        match state
            .servers
            .keys()
            .find(|s| *s != name && names::mgmt_host_link(&self.config.instance, s) == link)
        {
            Some(other) => Err(CloudError::Conflict(format!(
                "server names {name:?} and {other:?} hash to the same management link {link}; choose another name"
            ))),
            None => Ok(()),
        }
    }

    fn allocate_management_ip(&self, state: &State) -> Result<Ipv4Addr, CloudError> {
        let used: HashSet<Ipv4Addr> = state
            .servers
            .values()
            .filter_map(|s| s.management_ip)
            .collect();
        let control_plane = self.config.control_plane_ip();
        ipam::allocate(self.config.management, &[control_plane], &used)
            .ok_or_else(|| CloudError::Exhausted("management".into()))
    }

    fn check_flavor(flavor: &crate::Flavor) -> Result<(), CloudError> {
        if flavor.vcpus == 0 || flavor.memory_mib == 0 {
            return Err(CloudError::Invalid(format!(
                "flavor {:?} must have at least one vCPU and some memory",
                flavor.name
            )));
        }
        if flavor.memory_mib > u64::MAX >> 20 {
            return Err(CloudError::Invalid(format!(
                "flavor {:?}: {} MiB is not a memory size",
                flavor.name, flavor.memory_mib
            )));
        }
        Ok(())
    }

    /// Builds a recorded server (its files, kernel objects and agent) and records it
    /// Ready; a failure is cleaned up and recorded.
    async fn finish_server(
        &self,
        rec: ServerRecord,
        spec: &ServerSpec,
        started: Instant,
    ) -> Result<Server, CloudError> {
        match self.build_server(&rec, spec).await {
            Ok(process) => {
                let mut rec = rec;
                rec.phase = Phase::Ready;
                rec.agent = Some(process);
                self.put_server(rec.clone()).await.map_err(failed)?;
                tracing::info!(
                    server = %rec.name,
                    tenant = %rec.tenant,
                    management_ip = ?rec.management_ip,
                    ip = ?rec.ip,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "server created"
                );
                Ok(Self::server_view(&rec))
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!(server = %spec.name, error = %msg, "server creation failed");
                self.fail_server(rec, msg.clone()).await.map_err(failed)?;
                Err(CloudError::Failed(msg))
            }
        }
    }

    // ----- ports -----

    async fn delete_port_locked(&self, name: &str) -> Result<(), CloudError> {
        let Some(rec) = self.state.lock().ports.get(name).cloned() else {
            return Ok(());
        };
        if let Some(server) = &rec.nic_of {
            return Err(CloudError::Conflict(format!(
                "port {name:?} is the NIC of server {server:?}: delete the server"
            )));
        }
        self.unbind_port_public_ips(&rec).await.map_err(failed)?;
        self.kernel.unplug(name).await.map_err(failed)?;
        self.kernel.unguard_port(&rec.port).await.map_err(failed)?;
        self.drop_port(name).await.map_err(failed)
    }
}

/// The address of a new port on `network`: the requested one if it is a free host
/// address, else the lowest free one.
fn port_address(
    state: &State,
    network: &Network,
    requested: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, CloudError> {
    let used: HashSet<Ipv4Addr> = state
        .ports
        .values()
        .filter(|p| p.port.network == network.name)
        .map(|p| p.port.ip)
        .collect();
    match requested {
        Some(ip) => {
            if let Some(why) = ipam::check_requested(network.subnet, &[network.gateway], ip) {
                return Err(CloudError::Invalid(why));
            }
            if used.contains(&ip) {
                return Err(CloudError::Conflict(format!(
                    "{ip} is in use on network {:?}",
                    network.name
                )));
            }
            Ok(ip)
        }
        None => ipam::allocate(network.subnet, &[network.gateway], &used)
            .ok_or_else(|| CloudError::Exhausted(network.name.clone())),
    }
}

/// The agent pins each pod's network namespace under `/run/netns`; the mount lives in the
/// server's own mount namespace and went with it, but the file is the host's. A server torn
/// down with pods still running leaves them: its agent's runtime state names them.
fn remove_pod_netns_files(server_dir: &Path) {
    for file in canopy_runtime::recorded_netns_files(&server_dir.join("state")) {
        // Mounted here only if someone bound it in the host's namespace; detach then.
        let _ = nix::mount::umount2(&file, nix::mount::MntFlags::MNT_DETACH);
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(file = %file.display(), error = %e, "could not remove a pod's network namespace file");
            }
            _ => {}
        }
    }
}

fn remove_dir_all(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[async_trait]
impl CloudProvider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<Network, CloudError> {
        names::check_object_name("network", &spec.name).map_err(CloudError::Invalid)?;
        if spec.tenant.is_empty() {
            return Err(CloudError::Invalid("the network has no tenant".into()));
        }
        ipam::check_subnet(spec.subnet).map_err(CloudError::Invalid)?;
        let gateway = ipam::gateway(spec.subnet, spec.gateway).map_err(CloudError::Invalid)?;
        let _ops = self.ops.lock().await;
        let rec = {
            let state = self.state.lock();
            if let Some(existing) = state.networks.get(&spec.name) {
                let n = &existing.network;
                if n.tenant != spec.tenant {
                    return Err(CloudError::Conflict(format!(
                        "network {:?} belongs to another tenant",
                        spec.name
                    )));
                }
                if n.subnet != spec.subnet || n.gateway != gateway {
                    return Err(CloudError::Conflict(format!(
                        "network {:?} exists with subnet {} and gateway {}",
                        spec.name, n.subnet, n.gateway
                    )));
                }
                return Ok(n.clone());
            }
            let bridge = names::bridge(&spec.name);
            if let Some(other) = state.networks.keys().find(|n| names::bridge(n) == bridge) {
                return Err(CloudError::Conflict(format!(
                    "network names {:?} and {other:?} hash to the same bridge {bridge}; choose another name",
                    spec.name
                )));
            }
            let taken: HashSet<u32> = state.networks.values().map(|n| n.mark).collect();
            let mark = (net::FIRST_MARK..)
                .find(|m| !taken.contains(m))
                .ok_or_else(|| CloudError::Failed("no routing table left".into()))?;
            NetworkRecord {
                network: Network {
                    name: spec.name.clone(),
                    tenant: spec.tenant.clone(),
                    subnet: spec.subnet,
                    gateway,
                },
                mark,
            }
        };
        self.put_network(rec.clone()).await.map_err(failed)?;
        if let Err(e) = self.kernel.add_network(&rec).await {
            let _ = self.kernel.remove_network(&rec).await;
            let _ = self.drop_network(&spec.name).await;
            return Err(failed(e));
        }
        tracing::info!(network = %spec.name, tenant = %spec.tenant, subnet = %spec.subnet, "network created");
        Ok(rec.network)
    }

    async fn delete_network(&self, name: &str) -> Result<(), CloudError> {
        let _ops = self.ops.lock().await;
        let Some(rec) = self.state.lock().networks.get(name).cloned() else {
            return Ok(());
        };
        // "Everything still on it": its servers (through their NICs) and ports.
        let servers: Vec<String> = self
            .state
            .lock()
            .servers
            .values()
            .filter(|s| s.network == name)
            .map(|s| s.name.clone())
            .collect();
        for server in servers {
            self.delete_server_locked(&server).await?;
        }
        let ports: Vec<String> = self
            .state
            .lock()
            .ports
            .values()
            .filter(|p| p.port.network == name)
            .map(|p| p.port.name.clone())
            .collect();
        for port in ports {
            self.delete_port_locked(&port).await?;
        }
        self.kernel.remove_network(&rec).await.map_err(failed)?;
        self.drop_network(name).await.map_err(failed)?;
        tracing::info!(network = name, "network deleted");
        Ok(())
    }

    async fn list_networks(&self) -> Result<Vec<Network>, CloudError> {
        Ok(self
            .state
            .lock()
            .networks
            .values()
            .map(|n| n.network.clone())
            .collect())
    }

    async fn create_server(&self, spec: &ServerSpec) -> Result<Server, CloudError> {
        Self::check_server_spec(spec)?;
        let _ops = self.ops.lock().await;
        let existing = self.state.lock().servers.get(&spec.name).cloned();
        if let Some(existing) = existing {
            if matches!(existing.phase, Phase::Failed(_)) {
                // A failed creation was cleaned up when it failed; clean again in case
                // that cleanup itself failed, then start afresh with this spec.
                self.teardown_server(&spec.name).await.map_err(failed)?;
                self.drop_server(&spec.name).await.map_err(failed)?;
            } else if existing.phase == Phase::Spare
                || existing.tenant != spec.tenant
                || existing.network != spec.nic.network
            {
                return Err(CloudError::Conflict(format!(
                    "server {:?} exists for tenant {:?} on network {:?}",
                    spec.name, existing.tenant, existing.network
                )));
            } else {
                return Ok(Self::server_view(&existing));
            }
        }
        let started = Instant::now();
        let rec = self.record_new_server(spec, None).await?;
        self.finish_server(rec, spec, started).await
    }

    async fn create_spare(&self, spec: &SpareSpec) -> Result<Server, CloudError> {
        names::check_server_name(&spec.name).map_err(CloudError::Invalid)?;
        Self::check_flavor(&spec.flavor)?;
        let _ops = self.ops.lock().await;
        let started = Instant::now();
        let rec = {
            let state = self.state.lock();
            if let Some(existing) = state.servers.get(&spec.name) {
                return match existing.phase {
                    Phase::Spare if existing.flavor == spec.flavor => {
                        Ok(Self::server_view(existing))
                    }
                    _ => Err(CloudError::Conflict(format!(
                        "server {:?} exists and is not a spare of flavor {:?}",
                        spec.name, spec.flavor.name
                    ))),
                };
            }
            self.check_mgmt_link_free(&state, &spec.name)?;
            ServerRecord {
                name: spec.name.clone(),
                tenant: String::new(),
                flavor: spec.flavor.clone(),
                network: String::new(),
                tags: spec.tags.clone(),
                created_at: chrono::Utc::now(),
                phase: Phase::Building,
                management_ip: Some(self.allocate_management_ip(&state)?),
                ip: None,
                node_name: String::new(),
                agent_args: Vec::new(),
                agent: None,
            }
        };
        self.put_server(rec.clone()).await.map_err(failed)?;
        let built = async {
            self.prepare_files(&rec.name, None).await?;
            let mut spare = rec.clone();
            spare.phase = Phase::Spare;
            self.build_kernel(&spare).await?;
            Ok::<_, anyhow::Error>(spare)
        };
        match built.await {
            Ok(spare) => {
                self.put_server(spare.clone()).await.map_err(failed)?;
                tracing::info!(
                    server = %spare.name,
                    flavor = %spare.flavor.name,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "spare server created"
                );
                Ok(Self::server_view(&spare))
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!(server = %spec.name, error = %msg, "spare server creation failed");
                self.fail_server(rec, msg.clone()).await.map_err(failed)?;
                Err(CloudError::Failed(msg))
            }
        }
    }

    async fn claim_spare(&self, spec: &ServerSpec) -> Result<Server, CloudError> {
        Self::check_server_spec(spec)?;
        let _ops = self.ops.lock().await;
        let started = Instant::now();
        let existing = self
            .state
            .lock()
            .servers
            .get(&spec.name)
            .cloned()
            .ok_or_else(|| CloudError::not_found("server", &spec.name))?;
        match existing.phase {
            Phase::Spare => {}
            Phase::Ready | Phase::Building
                if existing.tenant == spec.tenant && existing.network == spec.nic.network =>
            {
                return Ok(Self::server_view(&existing));
            }
            _ => {
                return Err(CloudError::Conflict(format!(
                    "server {:?} is not a spare",
                    spec.name
                )));
            }
        }
        if existing.flavor != spec.flavor {
            return Err(CloudError::Conflict(format!(
                "spare {:?} is of flavor {:?}, not {:?}",
                spec.name, existing.flavor.name, spec.flavor.name
            )));
        }
        // From here it is a new server of the tenant's (created now, for boot timeouts),
        // built on what the spare already has; a crash midway cleans it up like any
        // creation cut short.
        let rec = self.record_new_server(spec, Some(&existing)).await?;
        self.finish_server(rec, spec, started).await
    }

    async fn delete_server(&self, name: &str) -> Result<(), CloudError> {
        let _ops = self.ops.lock().await;
        self.delete_server_locked(name).await
    }

    async fn server(&self, name: &str) -> Result<Option<Server>, CloudError> {
        let rec = self.state.lock().servers.get(name).cloned();
        Ok(rec.as_ref().map(Self::server_view))
    }

    async fn list_servers(&self) -> Result<Vec<Server>, CloudError> {
        // The views read /proc: outside the lock.
        let records: Vec<ServerRecord> = self.state.lock().servers.values().cloned().collect();
        Ok(records.iter().map(Self::server_view).collect())
    }

    async fn create_port(&self, spec: &PortSpec) -> Result<Port, CloudError> {
        names::check_object_name("port", &spec.name).map_err(CloudError::Invalid)?;
        let _ops = self.ops.lock().await;
        let rec = {
            let state = self.state.lock();
            let mac = match &spec.mac {
                Some(mac) if !crate::valid_unicast_mac(mac) => {
                    return Err(CloudError::Invalid(format!(
                        "{mac:?} is not a unicast MAC address (aa:bb:cc:dd:ee:ff)"
                    )));
                }
                Some(mac) => mac.to_ascii_lowercase(),
                None => names::port_mac(&spec.name),
            };
            if let Some(existing) = state.ports.get(&spec.name) {
                let p = &existing.port;
                if p.network != spec.network
                    || spec.ip.is_some_and(|ip| ip != p.ip)
                    || spec.mac.is_some() && mac != p.mac
                {
                    return Err(CloudError::Conflict(format!(
                        "port {:?} exists on network {:?} with address {} and MAC {}",
                        spec.name, p.network, p.ip, p.mac
                    )));
                }
                return Ok(p.clone());
            }
            if let Some(other) = state
                .ports
                .values()
                .find(|p| p.port.network == spec.network && p.port.mac == mac)
            {
                return Err(CloudError::Conflict(format!(
                    "MAC {mac} is in use by port {:?} on network {:?}",
                    other.port.name, spec.network
                )));
            }
            let link = names::port_switch_link(&spec.name);
            if let Some(other) = state
                .ports
                .keys()
                .find(|p| names::port_switch_link(p) == link)
            {
                return Err(CloudError::Conflict(format!(
                    "port names {:?} and {other:?} hash to the same link {link}; choose another name",
                    spec.name
                )));
            }
            let network = state
                .networks
                .get(&spec.network)
                .ok_or_else(|| CloudError::not_found("network", &spec.network))?;
            let ip = port_address(&state, &network.network, spec.ip)?;
            PortRecord {
                port: Port {
                    name: spec.name.clone(),
                    network: spec.network.clone(),
                    ip,
                    mac,
                    server: None,
                    device: names::port_device(&spec.name),
                    tags: spec.tags.clone(),
                    allowed_address_pairs: Vec::new(),
                },
                nic_of: None,
            }
        };
        self.put_port(rec.clone()).await.map_err(failed)?;
        if let Err(e) = self.kernel.guard_port(&rec.port).await {
            let _ = self.drop_port(&spec.name).await;
            return Err(failed(e));
        }
        Ok(rec.port)
    }

    async fn attach_port(&self, port: &str, server: &str) -> Result<Port, CloudError> {
        let _ops = self.ops.lock().await;
        let (mut rec, server_rec, tenant) = {
            let state = self.state.lock();
            let rec = state
                .ports
                .get(port)
                .cloned()
                .ok_or_else(|| CloudError::not_found("port", port))?;
            let server_rec = state
                .servers
                .get(server)
                .cloned()
                .ok_or_else(|| CloudError::not_found("server", server))?;
            let tenant = state
                .networks
                .get(&rec.port.network)
                .map(|n| n.network.tenant.clone())
                .unwrap_or_default();
            (rec, server_rec, tenant)
        };
        if let Some(owner) = &rec.nic_of {
            return if owner == server {
                Ok(rec.port)
            } else {
                Err(CloudError::Conflict(format!(
                    "port {port:?} is the NIC of server {owner:?}"
                )))
            };
        }
        if let Some(current) = &rec.port.server
            && current != server
        {
            return Err(CloudError::Conflict(format!(
                "port {port:?} is attached to server {current:?}"
            )));
        }
        // A tenant's port in another tenant's server would join their networks.
        if tenant != server_rec.tenant {
            return Err(CloudError::Conflict(format!(
                "port {port:?} is in a network of another tenant than server {server:?}"
            )));
        }
        if server_rec.phase != Phase::Ready {
            return Err(CloudError::Conflict(format!(
                "server {server:?} is not built"
            )));
        }
        // Plugged already: the device is in the server, or the agent moved it on into a
        // pod, where only the switch end still tells it exists.
        if rec.port.server.is_some() && self.kernel.port_plugged(port).await.map_err(failed)? {
            return Ok(rec.port);
        }
        let netns = names::server_netns(&self.config.instance, server);
        let plugged = async {
            self.kernel.check_netns(&netns).await?;
            self.kernel.guard_port(&rec.port).await?;
            self.kernel.plug(&rec.port, &netns, &rec.port.device).await
        };
        if let Err(e) = plugged.await {
            let _ = self.kernel.unplug(port).await;
            return Err(failed(e));
        }
        rec.port.server = Some(server.to_string());
        self.put_port(rec.clone()).await.map_err(failed)?;
        Ok(rec.port)
    }

    async fn detach_port(&self, port: &str) -> Result<Port, CloudError> {
        let _ops = self.ops.lock().await;
        let mut rec = self
            .state
            .lock()
            .ports
            .get(port)
            .cloned()
            .ok_or_else(|| CloudError::not_found("port", port))?;
        if let Some(server) = &rec.nic_of {
            return Err(CloudError::Conflict(format!(
                "port {port:?} is the NIC of server {server:?}"
            )));
        }
        // Deleting the switch end takes the other end wherever it is (server or pod).
        self.kernel.unplug(port).await.map_err(failed)?;
        if rec.port.server.take().is_some() {
            self.put_port(rec.clone()).await.map_err(failed)?;
        }
        Ok(rec.port)
    }

    async fn delete_port(&self, name: &str) -> Result<(), CloudError> {
        let _ops = self.ops.lock().await;
        self.delete_port_locked(name).await
    }

    async fn list_ports(&self) -> Result<Vec<Port>, CloudError> {
        Ok(self
            .state
            .lock()
            .ports
            .values()
            .map(|p| p.port.clone())
            .collect())
    }

    async fn create_public_ip(&self, spec: &PublicIpSpec) -> Result<PublicIp, CloudError> {
        names::check_object_name("public IP", &spec.name).map_err(CloudError::Invalid)?;
        let public = self.public_network()?;
        let _ops = self.ops.lock().await;
        let rec = {
            let state = self.state.lock();
            if let Some(existing) = state.public_ips.get(&spec.name) {
                return Ok(existing.clone());
            }
            let used: HashSet<Ipv4Addr> = state.public_ips.values().map(|p| p.address).collect();
            let address = ipam::allocate(public, &net::public_reserved(public), &used)
                .ok_or_else(|| CloudError::Exhausted("public".into()))?;
            PublicIp {
                name: spec.name.clone(),
                address,
                port: None,
                tags: spec.tags.clone(),
            }
        };
        self.put_public_ip(rec.clone()).await.map_err(failed)?;
        tracing::info!(public_ip = %rec.name, address = %rec.address, "public IP allocated");
        Ok(rec)
    }

    async fn bind_public_ip(&self, name: &str, port: &str) -> Result<PublicIp, CloudError> {
        let _ops = self.ops.lock().await;
        let (mut rec, port_rec) = {
            let state = self.state.lock();
            let rec = state
                .public_ips
                .get(name)
                .cloned()
                .ok_or_else(|| CloudError::not_found("public IP", name))?;
            let port_rec = state
                .ports
                .get(port)
                .cloned()
                .ok_or_else(|| CloudError::not_found("port", port))?;
            (rec, port_rec)
        };
        match rec.port.as_deref() {
            Some(current) if current == port => {
                // Bound: make sure the kernel says so too (idempotent).
            }
            Some(current) => {
                return Err(CloudError::Conflict(format!(
                    "public IP {name:?} is bound to port {current:?}"
                )));
            }
            None => {
                rec.port = Some(port.to_string());
                // Recorded first: a crash before the kernel has it is repaired by `open`.
                self.put_public_ip(rec.clone()).await.map_err(failed)?;
            }
        }
        self.kernel
            .bind_public(&net::Binding {
                address: rec.address,
                port: port_rec.port,
            })
            .await
            .map_err(failed)?;
        tracing::info!(public_ip = %name, address = %rec.address, port, "public IP bound");
        Ok(rec)
    }

    async fn delete_public_ip(&self, name: &str) -> Result<(), CloudError> {
        let _ops = self.ops.lock().await;
        let (rec, port) = {
            let state = self.state.lock();
            let Some(rec) = state.public_ips.get(name).cloned() else {
                return Ok(());
            };
            let port = rec
                .port
                .as_ref()
                .and_then(|p| state.ports.get(p))
                .map(|p| p.port.clone());
            (rec, port)
        };
        if let Some(port) = port {
            self.kernel
                .unbind_public(&net::Binding {
                    address: rec.address,
                    port,
                })
                .await
                .map_err(failed)?;
        }
        self.drop_public_ip(name).await.map_err(failed)?;
        tracing::info!(public_ip = %name, address = %rec.address, "public IP released");
        Ok(())
    }

    async fn list_public_ips(&self) -> Result<Vec<PublicIp>, CloudError> {
        Ok(self.state.lock().public_ips.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LocalConfig {
        LocalConfig {
            state_dir: "/var/lib/canopy/cloud".into(),
            instance: "t1".into(),
            agent_binary: "/usr/bin/canopy".into(),
            management: Subnet::parse("100.64.0.0/16").unwrap(),
            control_plane_ports: vec![6443],
            image_seed: None,
            public: None,
        }
    }

    #[test]
    fn control_plane_is_the_first_management_host() {
        assert_eq!(config().control_plane_ip(), Ipv4Addr::new(100, 64, 0, 1));
    }

    #[test]
    fn configuration_is_checked() {
        assert!(config().check().is_ok());
        for bad in [
            LocalConfig {
                instance: "TOOLONG".into(),
                ..config()
            },
            LocalConfig {
                management: Subnet::parse("100.64.0.0/30").unwrap(),
                ..config()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        let relative = LocalConfig {
            state_dir: "data/cloud".into(),
            agent_binary: "target/canopy".into(),
            image_seed: Some("seed".into()),
            public: None,
            ..config()
        }
        .absolute()
        .unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(relative.state_dir, cwd.join("data/cloud"));
        assert_eq!(relative.agent_binary, cwd.join("target/canopy"));
        assert_eq!(relative.image_seed, Some(cwd.join("seed")));
        let bare = LocalConfig {
            agent_binary: "canopy".into(),
            ..config()
        }
        .absolute()
        .unwrap();
        assert_eq!(
            bare.agent_binary,
            PathBuf::from("canopy"),
            "looked up in PATH"
        );
    }

    #[test]
    fn port_addresses_skip_gateway_and_used_and_honour_requests() {
        let network = Network {
            name: "n".into(),
            tenant: "t".into(),
            subnet: Subnet::parse("10.0.0.0/29").unwrap(),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
        };
        let mut state = State::default();
        let port = |name: &str, ip: Ipv4Addr| PortRecord {
            port: Port {
                name: name.into(),
                network: "n".into(),
                ip,
                mac: names::port_mac(name),
                server: None,
                device: names::port_device(name),
                tags: BTreeMap::new(),
                allowed_address_pairs: Vec::new(),
            },
            nic_of: None,
        };
        assert_eq!(
            port_address(&state, &network, None).unwrap(),
            Ipv4Addr::new(10, 0, 0, 2)
        );
        state
            .ports
            .insert("a".into(), port("a", Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(
            port_address(&state, &network, None).unwrap(),
            Ipv4Addr::new(10, 0, 0, 3)
        );
        assert!(matches!(
            port_address(&state, &network, Some(Ipv4Addr::new(10, 0, 0, 2))),
            Err(CloudError::Conflict(_))
        ));
        for bad in [[10, 0, 0, 1], [10, 0, 0, 0], [10, 0, 0, 7], [10, 0, 1, 2]] {
            assert!(matches!(
                port_address(&state, &network, Some(Ipv4Addr::from(bad))),
                Err(CloudError::Invalid(_))
            ));
        }
        for n in 3..=6 {
            state.ports.insert(
                format!("p{n}"),
                port(&format!("p{n}"), Ipv4Addr::new(10, 0, 0, n)),
            );
        }
        assert!(matches!(
            port_address(&state, &network, None),
            Err(CloudError::Exhausted(_))
        ));
    }
}
