//! The agent's Node: registration, the Lease that says the node is alive, and the status
//! the scheduler and the node lifecycle controller read.
//!
//! As upstream's kubelet: the Lease in `kube-node-lease` is renewed every quarter of its
//! 40 s duration (it is the cheap heartbeat); the Node's status is computed every 10 s but
//! only written when it changed or 5 minutes have passed, so that a quiet cluster of many
//! nodes does not rewrite every Node every few seconds.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{
            ContainerImage, DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints,
            NodeSpec, NodeStatus, NodeSystemInfo,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, OwnerReference, Time},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;

/// Namespace of node Leases, as upstream.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// Seconds a node's Lease is valid without renewal (upstream's default).
pub const LEASE_DURATION_SECONDS: i32 = 40;
/// How often the status is computed (upstream's nodeStatusUpdateFrequency).
pub const STATUS_UPDATE_INTERVAL: Duration = Duration::from_secs(10);
/// How often an unchanged status is written anyway (upstream's nodeStatusReportFrequency).
pub const STATUS_REPORT_INTERVAL: Duration = Duration::from_secs(300);

/// What the node is: its identity, addresses and size.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The Node's name.
    pub name: String,
    /// The tenant whose VM this is (label `canopy.io/tenant`), if any.
    pub tenant: Option<String>,
    /// Further labels to register with.
    pub labels: BTreeMap<String, String>,
    /// The node's IP address, reported as InternalIP.
    pub internal_ip: Option<String>,
    /// Further addresses reported as InternalIP after it.
    pub extra_internal_ips: Vec<String>,
    /// Capacity: cpu in millicores, memory in bytes, pods, ephemeral storage in bytes.
    pub capacity: Capacity,
    /// Port of the agent's HTTPS endpoint (logs), if it serves one.
    pub daemon_port: Option<u16>,
    /// Annotations the agent keeps on its Node (its serving certificate's pin).
    pub annotations: BTreeMap<String, String>,
}

/// A node's resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub pods: u64,
    pub ephemeral_storage_bytes: u64,
}

impl Capacity {
    /// What this machine (or the cgroup the agent runs in, on a VM sized by its flavor) has,
    /// with the disk of `root_dir` as ephemeral storage.
    pub fn detect(root_dir: &Path) -> Capacity {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let cpu_millis = cgroup_cpu_limit_millis().map_or(cpus * 1000, |c| c.min(cpus * 1000));
        let memory = meminfo_total().unwrap_or(0);
        let memory_bytes = cgroup_memory_limit().map_or(memory, |l| l.min(memory.max(1)));
        let ephemeral_storage_bytes = nix::sys::statvfs::statvfs(root_dir)
            .map(|s| s.blocks() * s.fragment_size())
            .unwrap_or(0);
        Capacity {
            cpu_millis,
            memory_bytes,
            pods: 110,
            ephemeral_storage_bytes,
        }
    }

    fn quantities(&self) -> BTreeMap<String, Quantity> {
        BTreeMap::from([
            ("cpu".to_string(), Quantity(format_millis(self.cpu_millis))),
            (
                "memory".to_string(),
                Quantity(format!("{}Ki", self.memory_bytes / 1024)),
            ),
            ("pods".to_string(), Quantity(self.pods.to_string())),
            (
                "ephemeral-storage".to_string(),
                Quantity(format!("{}Ki", self.ephemeral_storage_bytes / 1024)),
            ),
        ])
    }
}

fn format_millis(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

fn meminfo_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The agent's own cgroup: on a VM of the local provider, the flavor's size.
fn own_cgroup(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        matches.then(|| path.to_string())
    })
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn cgroup_memory_limit() -> Option<u64> {
    // Unlimited v1 cgroups report a huge page-rounded number; anything above the machine's
    // memory means "no limit".
    if let Some(path) = own_cgroup("memory") {
        return read_number(&format!(
            "/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"
        ));
    }
    let path = own_cgroup("")?;
    read_number(&format!("/sys/fs/cgroup{path}/memory.max"))
}

fn cgroup_cpu_limit_millis() -> Option<u64> {
    if let Some(path) = own_cgroup("cpu") {
        let base = format!("/sys/fs/cgroup/cpu,cpuacct{path}");
        let quota: i64 = std::fs::read_to_string(format!("{base}/cpu.cfs_quota_us"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let period = read_number(&format!("{base}/cpu.cfs_period_us"))?;
        return (quota > 0 && period > 0).then(|| quota as u64 * 1000 / period);
    }
    let path = own_cgroup("")?;
    let text = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cpu.max")).ok()?;
    let mut parts = text.split_whitespace();
    let quota: u64 = parts.next()?.parse().ok()?;
    let period: u64 = parts.next()?.parse().ok()?;
    (period > 0).then(|| quota * 1000 / period)
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

/// The version the agent reports as its kubelet version: the API level Canopy serves.
pub fn agent_version() -> String {
    format!(
        "v{}.{}.0-canopy.{}",
        canopy_api::KUBERNETES_MAJOR,
        canopy_api::KUBERNETES_MINOR,
        env!("CARGO_PKG_VERSION")
    )
}

fn system_info(runtime_version: &str) -> NodeSystemInfo {
    NodeSystemInfo {
        architecture: std::env::consts::ARCH
            .replace("x86_64", "amd64")
            .replace("aarch64", "arm64"),
        boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
        container_runtime_version: runtime_version.to_string(),
        kernel_version: read_trimmed("/proc/sys/kernel/osrelease"),
        kube_proxy_version: String::new(),
        kubelet_version: agent_version(),
        machine_id: read_trimmed("/etc/machine-id"),
        operating_system: "linux".into(),
        os_image: os_image(),
        system_uuid: read_trimmed("/sys/class/dmi/id/product_uuid"),
        ..Default::default()
    }
}

/// The labels a node registers with: upstream's well-known ones and the configured ones.
pub fn node_labels(config: &NodeConfig) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), config.name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        (
            "kubernetes.io/arch".to_string(),
            std::env::consts::ARCH
                .replace("x86_64", "amd64")
                .replace("aarch64", "arm64"),
        ),
    ]);
    if let Some(tenant) = &config.tenant {
        labels.insert(canopy_api::tenant::TENANT_LABEL.to_string(), tenant.clone());
    }
    labels.extend(config.labels.clone());
    labels
}

/// Registers the Node, retrying while the API server cannot be reached or refuses, with the
/// kubelet's backoff (100 ms, doubling to 7 s): a VM that boots while the control plane
/// restarts must still join once it is back. `None` when shut down first.
pub async fn register_with_retry(
    client: &Client,
    config: &NodeConfig,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<String> {
    let mut delay = Duration::from_millis(100);
    loop {
        match register(client, config).await {
            Ok(uid) => return Some(uid),
            Err(error) => tracing::warn!(
                node = %config.name,
                error = format!("{error:#}"),
                retry_in_ms = delay.as_millis() as u64,
                "registering the Node failed; retrying"
            ),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(7));
    }
}

/// Creates the Node, or takes over the existing one (a restarted agent, or a Node the cloud
/// controller made first), adding the labels it is missing. Returns its UID.
pub async fn register(client: &Client, config: &NodeConfig) -> Result<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels = node_labels(config);
    if let Some(existing) = nodes.get_opt(&config.name).await? {
        let have = existing.metadata.labels.clone().unwrap_or_default();
        let missing: BTreeMap<_, _> = labels
            .into_iter()
            .filter(|(k, v)| have.get(k) != Some(v))
            .collect();
        let have = existing.metadata.annotations.clone().unwrap_or_default();
        let stale: BTreeMap<_, _> = config
            .annotations
            .iter()
            .filter(|(k, v)| have.get(*k) != Some(*v))
            .collect();
        if !missing.is_empty() || !stale.is_empty() {
            nodes
                .patch(
                    &config.name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": missing, "annotations": stale}})),
                )
                .await
                .with_context(|| format!("updating the labels of Node {}", config.name))?;
        }
        tracing::info!(node = %config.name, "took over the existing Node");
        return existing.metadata.uid.context("the Node has no uid");
    }
    let node = Node {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            labels: Some(labels),
            annotations: Some(config.annotations.clone()),
            ..Default::default()
        },
        spec: Some(NodeSpec::default()),
        status: None,
    };
    let created = nodes
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("registering Node {}", config.name))?;
    tracing::info!(node = %config.name, "registered the Node");
    created.metadata.uid.context("the created Node has no uid")
}

/// The node's status as the agent sees it now.
pub fn status(
    config: &NodeConfig,
    runtime_version: &str,
    images: Vec<ContainerImage>,
    ready: Result<(), String>,
    previous: Option<&NodeStatus>,
) -> NodeStatus {
    let now = Time(Timestamp::now());
    let condition = |kind: &str, status: bool, reason: &str, message: String| {
        let status = if status { "True" } else { "False" }.to_string();
        // The transition time moves only when the status does, as upstream.
        let last_transition = previous
            .and_then(|p| p.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == kind))
            .filter(|c| c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        NodeCondition {
            type_: kind.to_string(),
            status,
            reason: Some(reason.to_string()),
            message: Some(message),
            last_heartbeat_time: Some(now.clone()),
            last_transition_time: Some(last_transition),
        }
    };
    let (ready_ok, ready_reason, ready_message) = match ready {
        Ok(()) => (
            true,
            "KubeletReady",
            "canopy agent is posting ready status".to_string(),
        ),
        Err(why) => (false, "KubeletNotReady", why),
    };
    let capacity = config.capacity.quantities();
    NodeStatus {
        capacity: Some(capacity.clone()),
        allocatable: Some(capacity),
        conditions: Some(vec![
            condition(
                "MemoryPressure",
                false,
                "KubeletHasSufficientMemory",
                "canopy agent has sufficient memory available".into(),
            ),
            condition(
                "DiskPressure",
                false,
                "KubeletHasNoDiskPressure",
                "canopy agent has no disk pressure".into(),
            ),
            condition(
                "PIDPressure",
                false,
                "KubeletHasSufficientPID",
                "canopy agent has sufficient PID available".into(),
            ),
            condition("Ready", ready_ok, ready_reason, ready_message),
        ]),
        addresses: Some(
            config
                .internal_ip
                .iter()
                .chain(&config.extra_internal_ips)
                .map(|ip| NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.clone(),
                })
                .chain(std::iter::once(NodeAddress {
                    type_: "Hostname".into(),
                    address: config.name.clone(),
                }))
                .collect(),
        ),
        daemon_endpoints: config.daemon_port.map(|port| NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint { port: port as i32 }),
        }),
        node_info: Some(system_info(runtime_version)),
        images: Some(images),
        ..Default::default()
    }
}

/// Whether two statuses differ in anything but heartbeat times.
pub fn status_changed(a: &NodeStatus, b: &NodeStatus) -> bool {
    fn strip(s: &NodeStatus) -> serde_json::Value {
        let mut v = serde_json::to_value(s).unwrap_or_default();
        if let Some(conditions) = v.get_mut("conditions").and_then(|c| c.as_array_mut()) {
            for c in conditions {
                if let Some(c) = c.as_object_mut() {
                    c.remove("lastHeartbeatTime");
                }
            }
        }
        v
    }
    strip(a) != strip(b)
}

/// Writes the Node's status.
pub async fn write_status(client: &Client, name: &str, status: &NodeStatus) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .with_context(|| format!("writing the status of Node {name}"))?;
    Ok(())
}

/// Renews (or creates) the node's Lease, owned by its Node so that deleting the Node
/// removes it.
pub async fn renew_lease(client: &Client, name: &str, node_uid: &str) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NODE_LEASE_NAMESPACE);
    let now = MicroTime(Timestamp::now());
    match leases.get_opt(name).await? {
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            spec.holder_identity = Some(name.to_string());
            spec.lease_duration_seconds = Some(LEASE_DURATION_SECONDS);
            spec.renew_time = Some(now);
            leases
                .replace(name, &PostParams::default(), &lease)
                .await
                .with_context(|| format!("renewing the Lease of node {name}"))?;
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some(NODE_LEASE_NAMESPACE.to_string()),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Node".into(),
                        name: name.to_string(),
                        uid: node_uid.to_string(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(name.to_string()),
                    lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
                    renew_time: Some(now),
                    ..Default::default()
                }),
            };
            leases
                .create(&PostParams::default(), &lease)
                .await
                .with_context(|| format!("creating the Lease of node {name}"))?;
        }
    }
    Ok(())
}

/// Keeps the Lease renewed every quarter of its duration, retrying sooner after a failure,
/// until `shutdown` fires.
pub async fn lease_loop(
    client: Client,
    name: String,
    node_uid: String,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let interval = Duration::from_secs(LEASE_DURATION_SECONDS as u64 / 4);
    loop {
        let wait = match renew_lease(&client, &name, &node_uid).await {
            Ok(()) => interval,
            Err(error) => {
                tracing::warn!(node = %name, error = format!("{error:#}"), "renewing the node Lease failed");
                Duration::from_millis(500)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Tracks when the status was last written, to write it on change or every 5 minutes.
pub struct StatusReporter {
    last: Option<(NodeStatus, Instant)>,
}

impl Default for StatusReporter {
    fn default() -> Self {
        Self::new()
    }
}

impl StatusReporter {
    pub fn new() -> Self {
        StatusReporter { last: None }
    }

    /// The status last written.
    pub fn previous(&self) -> Option<&NodeStatus> {
        self.last.as_ref().map(|(s, _)| s)
    }

    /// Whether `status` should be written now.
    pub fn due(&self, status: &NodeStatus) -> bool {
        match &self.last {
            None => true,
            Some((last, at)) => {
                at.elapsed() >= STATUS_REPORT_INTERVAL || status_changed(last, status)
            }
        }
    }

    /// Records a written status.
    pub fn written(&mut self, status: NodeStatus) {
        self.last = Some((status, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        NodeConfig {
            name: "n1".into(),
            tenant: Some("acme".into()),
            labels: BTreeMap::from([("zone".into(), "a".into())]),
            internal_ip: Some("10.0.0.5".into()),
            extra_internal_ips: Vec::new(),
            capacity: Capacity {
                cpu_millis: 2500,
                memory_bytes: 4 << 30,
                pods: 110,
                ephemeral_storage_bytes: 10 << 30,
            },
            daemon_port: Some(10250),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn labels_carry_hostname_tenant_and_extra() {
        let labels = node_labels(&config());
        assert_eq!(labels["kubernetes.io/hostname"], "n1");
        assert_eq!(labels["canopy.io/tenant"], "acme");
        assert_eq!(labels["zone"], "a");
        assert_eq!(labels["kubernetes.io/os"], "linux");
    }

    #[test]
    fn capacity_quantities_are_upstream_formats() {
        let q = config().capacity.quantities();
        assert_eq!(q["cpu"].0, "2500m");
        assert_eq!(q["memory"].0, "4194304Ki");
        assert_eq!(q["pods"].0, "110");
        assert_eq!(format_millis(3000), "3");
    }

    #[test]
    fn heartbeat_alone_is_no_change_but_readiness_is() {
        let c = config();
        let a = status(&c, "runc 1.1.5", vec![], Ok(()), None);
        std::thread::sleep(Duration::from_millis(5));
        let b = status(&c, "runc 1.1.5", vec![], Ok(()), Some(&a));
        assert!(!status_changed(&a, &b));
        let not_ready = status(
            &c,
            "runc 1.1.5",
            vec![],
            Err("runtime down".into()),
            Some(&a),
        );
        assert!(status_changed(&a, &not_ready));
        let ready = not_ready
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .cloned()
            .unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.message.as_deref(), Some("runtime down"));
        // Unchanged conditions keep their transition time.
        let mp = |s: &NodeStatus| {
            s.conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "MemoryPressure")
                .and_then(|c| c.last_transition_time.clone())
        };
        assert_eq!(mp(&a), mp(&b));
    }

    #[test]
    fn reporter_writes_on_change_only() {
        let c = config();
        let mut reporter = StatusReporter::new();
        let a = status(&c, "r", vec![], Ok(()), None);
        assert!(reporter.due(&a));
        reporter.written(a.clone());
        let b = status(&c, "r", vec![], Ok(()), reporter.previous());
        assert!(!reporter.due(&b));
        let mut changed = c.clone();
        changed.capacity.pods = 50;
        let d = status(&changed, "r", vec![], Ok(()), reporter.previous());
        assert!(reporter.due(&d));
    }

    #[test]
    fn detected_capacity_is_plausible() {
        let cap = Capacity::detect(Path::new("/"));
        assert!(cap.cpu_millis >= 1000);
        assert!(cap.memory_bytes > 64 << 20);
        assert!(cap.ephemeral_storage_bytes > 0);
    }
}
