//! The cloud controller (seed §1, §2, §8): everything that talks to the IaaS.
//!
//! - **Provisioning.** Pods the scheduler found no room for (`PodScheduled=False`,
//!   `Unschedulable`, for lack of capacity) are packed into the room the tenant's VMs still
//!   have, then into new VMs of the smallest flavor that takes them ([`plan`]), within the
//!   tenant's VM quota. A VM boots straight into `canopy agent` with a credential for its
//!   own Node and its tenant, and the scheduler places the pods as the Node joins. A pod no
//!   flavor can take gets a Warning Event saying so.
//! - **Pod NICs.** Every pod bound to one of the cloud's VMs gets a port in its tenant's
//!   network, plugged into that VM and recorded on the pod
//!   ([`canopy_api::POD_PORT_ANNOTATION`]), where the node agent's CNI plugin finds it. The
//!   port goes when the pod does. A pod annotated `canopy.io/public-ip: "true"` also gets a
//!   public IP bound to its port (recorded in the port record and in
//!   [`canopy_api::POD_PUBLIC_IP_ADDRESS_ANNOTATION`]), released with the pod.
//! - **Warm pool.** A configured number of spare VMs of one flavor wait, booted but bound
//!   to no tenant; a tenant that needs a VM of that flavor takes a spare (its NIC and
//!   agent are added) instead of booting one, and the pool is filled up again.
//! - **Scale-down.** A VM that ran no pods for the idle time is cordoned and deleted with its
//!   Node; a VM whose Node never became Ready in the boot time is replaced.
//!
//! Data flows one way: informers on pods, nodes and tenants and the provider's lists are
//! read, decisions are made, and the IaaS and the API are written. Every IaaS object is
//! named after what it serves (a tenant, a pod's uid), so a controller restarted at any
//! point finds what it made and nothing is orphaned.

pub mod metrics;
pub mod plan;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use canopy_api::tenant::{TENANT_LABEL, Tenant};
use canopy_cloud::{
    Bootstrap, CloudProvider, Flavor, Network, NetworkSpec, NicSpec, PortSpec, PublicIpSpec,
    Server, ServerSpec, ServerStatus, SpareSpec, Subnet,
};
use canopy_controllers::{
    events::Recorder,
    informer::{Informer, ObjectKey},
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::watcher,
};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::Notify;

use crate::plan::{Pending, Resources};

/// Label on the Nodes of the cloud's VMs: the provider that made them.
pub const PROVIDER_LABEL: &str = "canopy.io/provider";
/// Upstream's label for a node's machine type.
pub const INSTANCE_TYPE_LABEL: &str = "node.kubernetes.io/instance-type";

/// How the cloud controller behaves.
#[derive(Clone, Debug)]
pub struct Config {
    /// VM sizes, from the smallest.
    pub flavors: Vec<Flavor>,
    /// A tenant's network when its Tenant names none (tenants' ranges may overlap).
    pub default_subnet: Subnet,
    /// A VM without pods for this long is removed.
    pub idle_timeout: Duration,
    /// A VM whose Node is not Ready this long after creation is replaced.
    pub boot_timeout: Duration,
    /// How often everything is looked at again when nothing changed.
    pub resync: Duration,
    /// Pods a VM's agent takes at most.
    pub max_pods: u64,
    /// Further arguments for every VM's agent.
    pub agent_args: Vec<String>,
    /// Spare VMs kept ready for any tenant (0: none).
    pub warm_pool: usize,
    /// The spares' flavor (one of `flavors`); `None`: the smallest.
    pub warm_pool_flavor: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            flavors: vec![Flavor {
                name: "c2m4".into(),
                vcpus: 2,
                memory_mib: 4096,
            }],
            default_subnet: Subnet::parse("10.0.0.0/16").unwrap_or(Subnet {
                address: std::net::Ipv4Addr::new(10, 0, 0, 0),
                prefix: 16,
            }),
            idle_timeout: Duration::from_secs(300),
            boot_timeout: Duration::from_secs(180),
            resync: Duration::from_secs(10),
            max_pods: 110,
            agent_args: Vec::new(),
            warm_pool: 0,
            warm_pool_flavor: None,
        }
    }
}

/// Credentials for the cloud's VMs.
pub trait NodeCredentials: Send + Sync {
    /// A kubeconfig for the agent of `node`, a VM of `tenant`: user `system:node:<node>` in
    /// `system:nodes` and the tenant's group, and the control plane's address as the VM
    /// reaches it.
    fn kubeconfig(&self, node: &str, tenant: &str) -> Result<String>;
}

struct Controller {
    client: Client,
    cloud: Arc<dyn CloudProvider>,
    credentials: Arc<dyn NodeCredentials>,
    config: Config,
    recorder: Recorder,
    pods: Informer<Pod>,
    nodes: Informer<Node>,
    tenants: Informer<Tenant>,
    /// Since when each VM runs no pods.
    idle_since: Mutex<HashMap<String, Instant>>,
    /// Pods already told they fit no flavor (told once).
    told_unfit: Mutex<HashSet<String>>,
}

/// Runs the cloud controller until the future is dropped.
pub async fn run(
    client: Client,
    cloud: Arc<dyn CloudProvider>,
    credentials: Arc<dyn NodeCredentials>,
    mut config: Config,
    recorder: Recorder,
    metrics: metrics::Metrics,
) {
    let cloud = metrics.instrument(cloud);
    config
        .flavors
        .sort_by_key(|f| (u64::from(f.vcpus) * 1024 + f.memory_mib, f.name.clone()));
    let wake = Arc::new(Notify::new());
    let pods = Informer::<Pod>::new("cloud-pods");
    let nodes = Informer::<Node>::new("cloud-nodes");
    let tenants = Informer::<Tenant>::new("cloud-tenants");
    {
        let wake = wake.clone();
        pods.add_handler(move |_| wake.notify_one());
    }
    {
        let wake = wake.clone();
        nodes.add_handler(move |_| wake.notify_one());
    }
    {
        let wake = wake.clone();
        tenants.add_handler(move |_| wake.notify_one());
    }
    let _informers = AbortOnDrop(vec![
        tokio::spawn(
            pods.clone()
                .run(Api::all(client.clone()), watcher::Config::default(), None),
        ),
        tokio::spawn(
            nodes
                .clone()
                .run(Api::all(client.clone()), watcher::Config::default(), None),
        ),
        tokio::spawn(tenants.clone().run(
            Api::all(client.clone()),
            watcher::Config::default(),
            None,
        )),
    ]);
    let controller = Controller {
        client,
        cloud,
        credentials,
        config,
        recorder,
        pods,
        nodes,
        tenants,
        idle_since: Mutex::default(),
        told_unfit: Mutex::default(),
    };
    controller.pods.wait_synced().await;
    controller.nodes.wait_synced().await;
    controller.tenants.wait_synced().await;
    tracing::info!(
        provider = controller.cloud.name(),
        "cloud controller running"
    );
    loop {
        let started = Instant::now();
        let result = controller.reconcile().await;
        metrics.pass(started, result.is_ok());
        if let Err(error) = result {
            tracing::warn!(
                error = format!("{error:#}"),
                "cloud reconcile failed; retrying"
            );
        }
        tokio::select! {
            _ = wake.notified() => {
                // Changes come in bursts (a Deployment's pods): take them together.
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            _ = tokio::time::sleep(controller.config.resync) => {}
        }
    }
}

/// The informers' tasks end with the controller.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The tenant's network's name in the IaaS.
fn network_name(tenant: &str) -> String {
    format!("t-{tenant}")
}

/// A pod's port's name in the IaaS.
fn port_name(uid: &str) -> String {
    format!("pod-{uid}")
}

/// A pod's public IP's name in the IaaS.
fn public_ip_name(uid: &str) -> String {
    format!("pip-{uid}")
}

fn wants_public_ip(pod: &Pod) -> bool {
    pod.annotations()
        .get(canopy_api::POD_PUBLIC_IP_ANNOTATION)
        .is_some_and(|v| v == "true")
}

fn pod_tenant(pod: &Pod) -> Option<&str> {
    pod.labels().get(TENANT_LABEL).map(String::as_str)
}

fn quantity(q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>) -> (u64, u64) {
    let parsed = q.and_then(|q| canopy_api::quantity::Quantity::parse(&q.0).ok());
    parsed.map_or((0, 0), |p| {
        (p.milli().max(0) as u64, p.value().max(0) as u64)
    })
}

/// What a pod asks for, as the scheduler counts it: its containers' requests summed, or its
/// largest init container's if bigger.
fn pod_needs(pod: &Pod) -> Resources {
    let Some(spec) = &pod.spec else {
        return Resources::default();
    };
    let of = |c: &k8s_openapi::api::core::v1::Container| {
        let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
        let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
        let get = |name: &str| {
            requests
                .and_then(|r| r.get(name))
                .or_else(|| limits.and_then(|l| l.get(name)))
        };
        (quantity(get("cpu")).0, quantity(get("memory")).1)
    };
    let (mut cpu, mut memory) = (0, 0);
    for c in &spec.containers {
        let (c_cpu, c_mem) = of(c);
        cpu += c_cpu;
        memory += c_mem;
    }
    for c in spec.init_containers.iter().flatten() {
        let (c_cpu, c_mem) = of(c);
        cpu = cpu.max(c_cpu);
        memory = memory.max(c_mem);
    }
    Resources {
        cpu_millis: cpu,
        memory_bytes: memory,
        pods: 1,
    }
}

fn pod_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Whether the scheduler found no room for the pod (as opposed to constraints a new VM
/// would not meet either).
fn waits_for_capacity(pod: &Pod) -> bool {
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some()
        || pod_finished(pod)
    {
        return false;
    }
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
                && c.message.as_deref().is_some_and(|m| {
                    m.starts_with("0/0 nodes")
                        || m.contains("Insufficient")
                        || m.contains("Too many pods")
                        || m.contains("no nodes available")
                })
        })
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A DNS-label-safe part of a tenant's name for VM names.
fn name_part(tenant: &str) -> String {
    let cleaned: String = tenant
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(24)
        .collect();
    let trimmed = cleaned.trim_matches('-');
    if trimmed.is_empty() {
        "tenant".into()
    } else {
        trimmed.to_string()
    }
}

fn random_suffix() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

impl Controller {
    async fn reconcile(&self) -> Result<()> {
        let servers = self.cloud.list_servers().await.context("listing servers")?;
        let nodes: HashMap<String, Arc<Node>> = self
            .nodes
            .list()
            .into_iter()
            .map(|n| (n.name_any(), n))
            .collect();
        let pods = self.pods.list();
        // Memory of pods and VMs that are gone is dropped.
        {
            let live: HashSet<String> = pods.iter().filter_map(|p| p.uid()).collect();
            self.told_unfit.lock().retain(|uid| live.contains(uid));
            let names: HashSet<&str> = servers.iter().map(|s| s.name.as_str()).collect();
            self.idle_since
                .lock()
                .retain(|name, _| names.contains(name.as_str()));
        }
        let made_vms = self.provision(&servers, &nodes, &pods).await?;
        let ports_needed = self.plug_ports(&servers, &pods).await?;
        self.release_ports(&pods).await?;
        self.scale_down(&servers, &nodes, &pods).await?;
        self.forget_nodes(&servers, &nodes).await?;
        // The pool is filled when the cloud is quiet: a spare being built holds the IaaS
        // (and the machine) while a tenant's new VM boots and its pods' ports wait.
        let booting = servers.iter().any(|s| {
            matches!(s.status, ServerStatus::Building | ServerStatus::Active)
                && !s.tenant.is_empty()
                && !nodes.get(&s.name).is_some_and(|n| node_ready(n))
        });
        if !made_vms && ports_needed == 0 && !booting {
            // No spare was claimed in this pass: the list's spares are the pool.
            self.replenish(&servers).await?;
        }
        Ok(())
    }

    fn tenant(&self, name: &str) -> Option<Arc<Tenant>> {
        self.tenants.get(&ObjectKey::cluster(name))
    }

    fn tenant_subnet(&self, tenant: &str) -> Subnet {
        self.tenant(tenant)
            .and_then(|t| t.spec.network.as_ref()?.cidr.clone())
            .and_then(|cidr| Subnet::parse(&cidr).ok())
            .unwrap_or(self.config.default_subnet)
    }

    /// The tenant's Service range (the API server's default for Tenants that name none).
    fn tenant_service_cidr(&self, tenant: &str) -> String {
        self.tenant(tenant)
            .and_then(|t| t.spec.network.as_ref()?.service_cidr.clone())
            .unwrap_or_else(|| canopy_api::tenant::DEFAULT_SERVICE_CIDR.to_string())
    }

    fn tenant_vm_quota(&self, tenant: &str) -> Option<i64> {
        self.tenant(tenant).and_then(|t| t.spec.quota.as_ref()?.vms)
    }

    /// New VMs for tenants whose pods wait for room.
    async fn provision(
        &self,
        servers: &[Server],
        nodes: &HashMap<String, Arc<Node>>,
        pods: &[Arc<Pod>],
    ) -> Result<bool> {
        let mut made_vms = false;
        let mut spares: Vec<&Server> = servers
            .iter()
            .filter(|s| s.status == ServerStatus::Spare)
            .collect();
        let mut waiting: BTreeMap<&str, Vec<&Arc<Pod>>> = BTreeMap::new();
        for pod in pods.iter().filter(|p| waits_for_capacity(p)) {
            if let Some(tenant) = pod_tenant(pod) {
                waiting.entry(tenant).or_default().push(pod);
            }
        }
        for (tenant, waiting) in waiting {
            let mine: Vec<&Server> = servers.iter().filter(|s| s.tenant == tenant).collect();
            // Room: what Ready VMs have left, whole flavors on VMs still booting.
            let room: Vec<Resources> = mine
                .iter()
                .filter(|s| !matches!(s.status, ServerStatus::Error(_) | ServerStatus::Shutoff))
                .map(|s| match nodes.get(&s.name) {
                    Some(node) if node_ready(node) => self.free_room(node, pods),
                    _ => Resources::of_flavor(&s.flavor, self.config.max_pods),
                })
                .collect();
            let pending: Vec<Pending> = waiting
                .iter()
                .map(|p| Pending {
                    key: format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()),
                    needs: pod_needs(p),
                })
                .collect();
            let plan = plan::plan(&pending, &room, &self.config.flavors, self.config.max_pods);
            for key in &plan.unfit {
                let Some(pod) = waiting.iter().find(|p| {
                    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()) == *key
                }) else {
                    continue;
                };
                let uid = pod.uid().unwrap_or_default();
                if self.told_unfit.lock().insert(uid) {
                    let largest = self.config.flavors.last();
                    self.recorder.warning(
                        pod.as_ref(),
                        "NotTriggerScaleUp",
                        format!(
                            "pod didn't trigger scale-up: it does not fit any VM flavor (the largest, {}, has {} vCPU and {} MiB)",
                            largest.map_or("-", |f| f.name.as_str()),
                            largest.map_or(0, |f| f.vcpus),
                            largest.map_or(0, |f| f.memory_mib)
                        ),
                    );
                }
            }
            let Some(flavor) = plan.flavor else { continue };
            let mut new_vms = plan.new_vms;
            if let Some(quota) = self.tenant_vm_quota(tenant) {
                let allowed = (quota - mine.len() as i64).max(0) as usize;
                if allowed < new_vms {
                    for pod in &waiting {
                        self.recorder.warning(
                            pod.as_ref(),
                            "NotTriggerScaleUp",
                            format!(
                                "pod didn't trigger scale-up: tenant {tenant:?} has {} of its {quota} VMs",
                                mine.len()
                            ),
                        );
                    }
                    new_vms = allowed;
                }
            }
            if new_vms == 0 {
                continue;
            }
            let network = self
                .cloud
                .ensure_network(&NetworkSpec {
                    name: network_name(tenant),
                    tenant: tenant.to_string(),
                    subnet: self.tenant_subnet(tenant),
                    gateway: None,
                })
                .await
                .with_context(|| format!("the network of tenant {tenant}"))?;
            for _ in 0..new_vms {
                let started = Instant::now();
                let spare = spares
                    .iter()
                    .position(|s| s.flavor == flavor)
                    .map(|at| spares.swap_remove(at));
                let (server, source) = match spare {
                    Some(spare) => {
                        let spec = self.server_spec(&spare.name, tenant, &flavor, &network.name)?;
                        (self.cloud.claim_spare(&spec).await?, "from the warm pool")
                    }
                    None => {
                        let name = format!("{}-{}", name_part(tenant), random_suffix());
                        let spec = self.server_spec(&name, tenant, &flavor, &network.name)?;
                        (self.cloud.create_server(&spec).await?, "new")
                    }
                };
                made_vms = true;
                tracing::info!(server = %server.name, tenant, flavor = %flavor.name, source, elapsed_ms = started.elapsed().as_millis() as u64, "created a VM");
                for pod in &waiting {
                    self.recorder.normal(
                        pod.as_ref(),
                        "TriggeredScaleUp",
                        format!(
                            "pod triggered scale-up: VM {} ({}, {source}) for tenant {tenant}",
                            server.name, flavor.name
                        ),
                    );
                }
            }
        }
        Ok(made_vms)
    }

    /// The warm pool's flavor.
    fn pool_flavor(&self) -> Option<&Flavor> {
        match &self.config.warm_pool_flavor {
            Some(name) => self.config.flavors.iter().find(|f| &f.name == name),
            None => self.config.flavors.first(),
        }
    }

    /// Fills the warm pool up to its size, or trims it.
    async fn replenish(&self, servers: &[Server]) -> Result<()> {
        let Some(flavor) = self.pool_flavor().cloned() else {
            return Ok(());
        };
        let spares: Vec<&Server> = servers
            .iter()
            .filter(|s| s.status == ServerStatus::Spare)
            .collect();
        for extra in spares.iter().skip(self.config.warm_pool) {
            tracing::info!(server = %extra.name, "removing a spare VM the warm pool no longer needs");
            self.cloud.delete_server(&extra.name).await?;
        }
        for _ in spares.len()..self.config.warm_pool {
            let name = format!("vm-{}", random_suffix());
            let started = Instant::now();
            self.cloud
                .create_spare(&SpareSpec {
                    name: name.clone(),
                    flavor: flavor.clone(),
                    tags: BTreeMap::from([("pool".to_string(), "warm".to_string())]),
                })
                .await?;
            tracing::info!(server = %name, flavor = %flavor.name, elapsed_ms = started.elapsed().as_millis() as u64, "added a spare VM to the warm pool");
        }
        Ok(())
    }

    /// What a Ready VM's Node has left for pods.
    fn free_room(&self, node: &Node, pods: &[Arc<Pod>]) -> Resources {
        let allocatable = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
        let get = |name: &str| quantity(allocatable.and_then(|a| a.get(name)));
        let mut room = Resources {
            cpu_millis: get("cpu").0,
            memory_bytes: get("memory").1,
            pods: get("pods").1,
        };
        let name = node.name_any();
        for pod in pods.iter().filter(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
                && !pod_finished(p)
        }) {
            let needs = pod_needs(pod);
            room.cpu_millis = room.cpu_millis.saturating_sub(needs.cpu_millis);
            room.memory_bytes = room.memory_bytes.saturating_sub(needs.memory_bytes);
            room.pods = room.pods.saturating_sub(1);
        }
        room
    }

    /// What a tenant's VM is made from.
    fn server_spec(
        &self,
        name: &str,
        tenant: &str,
        flavor: &Flavor,
        network: &str,
    ) -> Result<ServerSpec> {
        let kubeconfig = self
            .credentials
            .kubeconfig(name, tenant)
            .context("issuing the VM's node credential")?;
        let mut agent_args = vec![
            "--network-plugin".to_string(),
            "canopy".to_string(),
            "--node-labels".to_string(),
            format!(
                "{PROVIDER_LABEL}={},{INSTANCE_TYPE_LABEL}={}",
                self.cloud.name(),
                flavor.name
            ),
            "--max-pods".to_string(),
            self.config.max_pods.to_string(),
        ];
        // The VM's proxy serves the tenant's cluster DNS at this address, which pods reach
        // through their node with the rest of the Service range.
        if let Some(dns) =
            canopy_api::tenant::cluster_dns_address(&self.tenant_service_cidr(tenant))
        {
            agent_args.extend(["--cluster-dns".to_string(), dns.to_string()]);
        }
        agent_args.extend(self.config.agent_args.iter().cloned());
        let spec = ServerSpec {
            name: name.to_string(),
            tenant: tenant.to_string(),
            flavor: flavor.clone(),
            nic: NicSpec {
                network: network.to_string(),
                ip: None,
                // The VM's proxy answers its pods on behalf of the tenant's ClusterIPs.
                allowed_address_pairs: vec![self.tenant_service_cidr(tenant)],
            },
            bootstrap: Bootstrap {
                node_name: name.to_string(),
                kubeconfig,
                agent_args,
            },
            tags: BTreeMap::from([("tenant".to_string(), tenant.to_string())]),
        };
        Ok(spec)
    }

    /// Ports for pods bound to the cloud's VMs that have none yet; how many needed one.
    async fn plug_ports(&self, servers: &[Server], pods: &[Arc<Pod>]) -> Result<usize> {
        let mut needed = 0;
        let by_name: HashMap<&str, &Server> =
            servers.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut networks: Option<HashMap<String, Network>> = None;
        for pod in pods {
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
                continue;
            };
            let Some(server) = by_name.get(node) else {
                continue;
            };
            if pod_finished(pod)
                || pod.metadata.deletion_timestamp.is_some()
                || pod
                    .annotations()
                    .contains_key(canopy_api::POD_PORT_ANNOTATION)
                || pod.spec.as_ref().and_then(|s| s.host_network) == Some(true)
            {
                continue;
            }
            needed += 1;
            // The networks are read once per pass, and only when a pod needs a port.
            if networks.is_none() {
                networks = Some(
                    self.cloud
                        .list_networks()
                        .await?
                        .into_iter()
                        .map(|n| (n.name.clone(), n))
                        .collect(),
                );
            }
            let Some(network) = networks.as_ref().and_then(|n| n.get(&server.network)) else {
                tracing::warn!(server = %server.name, network = %server.network, "a VM's network is missing");
                continue;
            };
            if let Err(error) = self.plug_port(pod, server, network).await {
                tracing::warn!(pod = %format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()), error = format!("{error:#}"), "giving a pod its port failed");
                self.recorder.warning(
                    pod.as_ref(),
                    "FailedNetworkSetup",
                    format!("the pod's NIC could not be set up: {error:#}"),
                );
            }
        }
        Ok(needed)
    }

    async fn plug_port(&self, pod: &Pod, server: &Server, network: &Network) -> Result<()> {
        let uid = pod.uid().context("pod without uid")?;
        let port = self
            .cloud
            .create_port(&PortSpec {
                name: port_name(&uid),
                network: network.name.clone(),
                ip: None,
                mac: None,
                tags: BTreeMap::from([
                    (
                        "pod".to_string(),
                        format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
                    ),
                    ("uid".to_string(), uid.clone()),
                ]),
            })
            .await?;
        let port = self.cloud.attach_port(&port.name, &server.name).await?;
        let public_ip = if wants_public_ip(pod) {
            let public = self
                .cloud
                .create_public_ip(&PublicIpSpec {
                    name: public_ip_name(&uid),
                    tags: BTreeMap::from([("uid".to_string(), uid.clone())]),
                })
                .await
                .context("allocating a public IP")?;
            self.cloud
                .bind_public_ip(&public.name, &port.name)
                .await
                .context("binding the public IP")?;
            Some(public.address)
        } else {
            None
        };
        let mut record = json!({
            "name": port.name,
            "device": port.device,
            "ip": port.ip.to_string(),
            "prefix": network.subnet.prefix,
            "mac": port.mac,
            "gateway": network.gateway.to_string(),
        });
        if let Some(node_ip) = server.ip {
            record["serviceRoute"] = json!({
                "cidr": self.tenant_service_cidr(&server.tenant),
                "via": node_ip.to_string(),
            });
        }
        let mut annotations = serde_json::Map::new();
        if let Some(public) = public_ip {
            record["publicIp"] = json!(public.to_string());
            annotations.insert(
                canopy_api::POD_PUBLIC_IP_ADDRESS_ANNOTATION.to_string(),
                json!(public.to_string()),
            );
        }
        annotations.insert(
            canopy_api::POD_PORT_ANNOTATION.to_string(),
            json!(record.to_string()),
        );
        let patch = json!({
            "metadata": {
                "annotations": annotations,
                // Guards against a pod re-created under the same name meanwhile.
                "uid": uid,
            }
        });
        Api::<Pod>::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default())
            .patch(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .context("recording the port on the pod")?;
        tracing::info!(pod = %pod.name_any(), port = %port.name, ip = %port.ip, public_ip = ?public_ip, server = %server.name, "plugged a pod's port");
        Ok(())
    }

    /// Ports and public IPs of pods that are gone.
    async fn release_ports(&self, pods: &[Arc<Pod>]) -> Result<()> {
        let live: HashSet<String> = pods.iter().filter_map(|p| p.uid()).collect();
        match self.cloud.list_public_ips().await {
            Ok(public_ips) => {
                for public in public_ips {
                    let Some(uid) = public.name.strip_prefix("pip-") else {
                        continue;
                    };
                    if !live.contains(uid) {
                        self.cloud.delete_public_ip(&public.name).await?;
                        tracing::info!(public_ip = %public.name, address = %public.address, "released the public IP of a deleted pod");
                    }
                }
            }
            // A cloud without a public network has none to release.
            Err(canopy_cloud::CloudError::Invalid(_)) => {}
            Err(error) => return Err(error.into()),
        }
        for port in self.cloud.list_ports().await? {
            let Some(uid) = port.name.strip_prefix("pod-") else {
                continue;
            };
            if !live.contains(uid) {
                self.cloud.delete_port(&port.name).await?;
                tracing::info!(port = %port.name, "released the port of a deleted pod");
            }
        }
        Ok(())
    }

    /// Idle VMs, and VMs that never became nodes, go.
    async fn scale_down(
        &self,
        servers: &[Server],
        nodes: &HashMap<String, Arc<Node>>,
        pods: &[Arc<Pod>],
    ) -> Result<()> {
        let now = Instant::now();
        for server in servers.iter().filter(|s| s.status != ServerStatus::Spare) {
            let node = nodes.get(&server.name);
            let age = chrono::Utc::now()
                .signed_duration_since(server.created_at)
                .to_std()
                .unwrap_or_default();
            if let ServerStatus::Error(why) = &server.status {
                // A creation that failed (or was cut short by a crash) is final: its Node,
                // if its agent got as far as registering one, goes now rather than after
                // the boot timeout, with any pod placed on it.
                tracing::warn!(server = %server.name, error = %why, "removing a VM whose creation failed");
                self.remove_vm(&server.name).await?;
                continue;
            }
            if !node.is_some_and(|n| node_ready(n)) {
                if age > self.config.boot_timeout {
                    tracing::warn!(server = %server.name, status = ?server.status, "the VM's node never became Ready; replacing it");
                    self.remove_vm(&server.name).await?;
                }
                continue;
            }
            let busy = pods.iter().any(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(server.name.as_str())
                    && !pod_finished(p)
                    && !p.owner_references().iter().any(|o| o.kind == "DaemonSet")
            });
            let idle_for = {
                let mut idle = self.idle_since.lock();
                if busy {
                    idle.remove(&server.name);
                    continue;
                }
                now.duration_since(*idle.entry(server.name.clone()).or_insert(now))
            };
            if idle_for >= self.config.idle_timeout {
                tracing::info!(server = %server.name, idle_s = idle_for.as_secs(), "removing an idle VM");
                self.remove_vm(&server.name).await?;
                self.idle_since.lock().remove(&server.name);
            }
        }
        Ok(())
    }

    async fn remove_vm(&self, name: &str) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        // Cordoned first, so that nothing is placed on it while it goes.
        let cordon = json!({"spec": {"unschedulable": true}});
        let _ = nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(&cordon))
            .await;
        self.cloud.delete_server(name).await?;
        self.forget_node(name).await
    }

    /// Deletes the Node of a VM that is gone, and the pods still bound to it: they died
    /// with the VM, and their controllers make new ones only once these are gone
    /// (upstream's pod GC does the same for pods of vanished nodes, after a quarantine the
    /// IaaS's word makes needless here).
    async fn forget_node(&self, name: &str) -> Result<()> {
        match Api::<Node>::all(self.client.clone())
            .delete(name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error).context("deleting the VM's Node"),
        }
        for pod in self.pods.list().iter().filter(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name)
                && p.metadata.deletion_timestamp.is_none()
        }) {
            let namespace = pod.namespace().unwrap_or_default();
            let mut params = DeleteParams::default().grace_period(0);
            params.preconditions = Some(kube::api::Preconditions {
                uid: pod.uid(),
                resource_version: None,
            });
            match Api::<Pod>::namespaced(self.client.clone(), &namespace)
                .delete(&pod.name_any(), &params)
                .await
            {
                Ok(_) => {
                    tracing::info!(pod = %format!("{namespace}/{}", pod.name_any()), node = name, "deleted a pod of a VM that is gone");
                }
                Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
                Err(error) => return Err(error).context("deleting a pod of a VM that is gone"),
            }
        }
        Ok(())
    }

    /// Nodes of this provider's VMs that no longer exist.
    async fn forget_nodes(
        &self,
        servers: &[Server],
        nodes: &HashMap<String, Arc<Node>>,
    ) -> Result<()> {
        let names: HashSet<&str> = servers.iter().map(|s| s.name.as_str()).collect();
        for (name, node) in nodes {
            if node.labels().get(PROVIDER_LABEL).map(String::as_str) != Some(self.cloud.name())
                || names.contains(name.as_str())
            {
                continue;
            }
            tracing::info!(node = %name, "deleting the Node of a VM that is gone");
            self.forget_node(name).await?;
        }
        Ok(())
    }
}
