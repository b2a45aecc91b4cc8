//! A node as the scheduler sees it: the Node, what it offers, and the pods placed on it
//! (bound, or assumed: chosen by this scheduler and not yet seen bound).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Node, Pod};

use crate::{
    inter_pod_affinity::{AffinityTerm, required_anti_affinity_terms},
    resources::{Resources, node_allocatable, pod_requests},
};

/// A host port a pod holds: protocol, host IP (`0.0.0.0` for all) and port.
pub type HostPort = (String, String, i32);

/// The host ports a pod asks for.
pub fn host_ports(pod: &Pod) -> Vec<HostPort> {
    let mut ports = Vec::new();
    let Some(spec) = &pod.spec else {
        return ports;
    };
    for container in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for port in container.ports.iter().flatten() {
            if let Some(host_port) = port.host_port.filter(|p| *p > 0) {
                ports.push((
                    port.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    port.host_ip
                        .clone()
                        .filter(|ip| !ip.is_empty())
                        .unwrap_or_else(|| "0.0.0.0".into()),
                    host_port,
                ));
            }
        }
    }
    ports
}

/// What one placed pod holds on its node.
#[derive(Clone, Debug)]
pub struct PlacedPod {
    /// The pod.
    pub pod: Arc<Pod>,
    /// Its requests.
    pub requests: Resources,
    /// Its host ports.
    pub ports: Vec<HostPort>,
    /// Its required anti-affinity terms, compiled once: every later pod is checked against
    /// them.
    pub anti_affinity: Vec<AffinityTerm>,
}

/// A node and what is placed on it.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// The Node.
    pub node: Arc<Node>,
    /// What it offers.
    pub allocatable: Resources,
    /// What its pods request.
    pub requested: Resources,
    /// Its pods by `namespace/name`.
    pub pods: HashMap<String, PlacedPod>,
    used_ports: HashMap<HostPort, usize>,
    /// Pods here with required anti-affinity, so that the partition knows which nodes to
    /// visit for them (upstream's `PodsWithRequiredAntiAffinity`).
    anti_affinity_pods: usize,
}

/// `namespace/name` of a pod.
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

impl NodeInfo {
    /// A node with nothing on it.
    pub fn new(node: Arc<Node>) -> Self {
        Self {
            allocatable: node_allocatable(&node),
            node,
            requested: Resources::default(),
            pods: HashMap::new(),
            used_ports: HashMap::new(),
            anti_affinity_pods: 0,
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        self.node.metadata.name.as_deref().unwrap_or_default()
    }

    /// Replaces the Node (labels, taints, allocatable may have changed); pods stay.
    pub fn set_node(&mut self, node: Arc<Node>) {
        self.allocatable = node_allocatable(&node);
        self.node = node;
    }

    /// Places a pod (again: a pod already here is replaced).
    pub fn add_pod(&mut self, pod: Arc<Pod>) {
        let key = pod_key(&pod);
        self.remove_pod(&key);
        let placed = PlacedPod {
            requests: pod_requests(&pod),
            ports: host_ports(&pod),
            anti_affinity: required_anti_affinity_terms(&pod),
            pod,
        };
        self.requested.add(&placed.requests);
        if !placed.anti_affinity.is_empty() {
            self.anti_affinity_pods += 1;
        }
        for port in &placed.ports {
            *self.used_ports.entry(port.clone()).or_default() += 1;
        }
        self.pods.insert(key, placed);
    }

    /// Removes a pod; returns whether it was here.
    pub fn remove_pod(&mut self, key: &str) -> bool {
        let Some(placed) = self.pods.remove(key) else {
            return false;
        };
        self.requested.sub(&placed.requests);
        if !placed.anti_affinity.is_empty() {
            self.anti_affinity_pods -= 1;
        }
        for port in &placed.ports {
            if let Some(n) = self.used_ports.get_mut(port) {
                *n -= 1;
                if *n == 0 {
                    self.used_ports.remove(port);
                }
            }
        }
        true
    }

    /// Whether a wanted host port collides with one in use: same protocol and port, and the
    /// same IP or either side on all addresses (upstream's NodePorts).
    pub fn port_taken(&self, wanted: &HostPort) -> bool {
        let (protocol, ip, port) = wanted;
        self.used_ports.keys().any(|(p, i, n)| {
            p == protocol && n == port && (i == ip || i == "0.0.0.0" || ip == "0.0.0.0")
        })
    }

    /// Whether a pod here has required anti-affinity terms.
    pub fn has_pods_with_required_anti_affinity(&self) -> bool {
        self.anti_affinity_pods > 0
    }

    /// Distinct host ports in use (for tests and metrics).
    pub fn used_ports(&self) -> HashSet<HostPort> {
        self.used_ports.keys().cloned().collect()
    }
}
