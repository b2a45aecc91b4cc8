//! Resource arithmetic with upstream's meaning: a pod requests the larger of the sum of its
//! containers' requests and its largest init container's, plus its overhead; a node offers
//! its allocatable (capacity when allocatable is absent).

use std::collections::BTreeMap;

use canopy_api::quantity::Quantity;
use k8s_openapi::{
    api::core::v1::{Container, Node, Pod},
    apimachinery::pkg::api::resource::Quantity as K8sQuantity,
};

/// Amounts of every resource the scheduler counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// CPU in millicores.
    pub milli_cpu: i64,
    /// Memory in bytes.
    pub memory: i64,
    /// Ephemeral storage in bytes.
    pub ephemeral_storage: i64,
    /// Pods (a pod counts 1 against a node's `pods`).
    pub pods: i64,
    /// Extended resources (`example.com/gpu`, `hugepages-2Mi`, ...), in units.
    pub scalar: BTreeMap<String, i64>,
}

fn amount(name: &str, q: &K8sQuantity) -> i64 {
    let Ok(parsed) = Quantity::parse(&q.0) else {
        return 0;
    };
    let exact = if name == "cpu" {
        parsed.milli()
    } else {
        parsed.value()
    };
    exact.clamp(0, i64::MAX as i128) as i64
}

impl Resources {
    /// Adds a resource list (`requests`, `overhead`, `allocatable`).
    pub fn add_list(&mut self, list: &BTreeMap<String, K8sQuantity>) {
        for (name, q) in list {
            let v = amount(name, q);
            match name.as_str() {
                "cpu" => self.milli_cpu = self.milli_cpu.saturating_add(v),
                "memory" => self.memory = self.memory.saturating_add(v),
                "ephemeral-storage" => {
                    self.ephemeral_storage = self.ephemeral_storage.saturating_add(v)
                }
                "pods" => self.pods = self.pods.saturating_add(v),
                _ => {
                    let slot = self.scalar.entry(name.clone()).or_default();
                    *slot = slot.saturating_add(v);
                }
            }
        }
    }

    /// Adds another set of amounts.
    pub fn add(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.saturating_add(other.milli_cpu);
        self.memory = self.memory.saturating_add(other.memory);
        self.ephemeral_storage = self
            .ephemeral_storage
            .saturating_add(other.ephemeral_storage);
        self.pods = self.pods.saturating_add(other.pods);
        for (name, v) in &other.scalar {
            let slot = self.scalar.entry(name.clone()).or_default();
            *slot = slot.saturating_add(*v);
        }
    }

    /// Subtracts another set of amounts (for a pod leaving a node).
    pub fn sub(&mut self, other: &Resources) {
        self.milli_cpu -= other.milli_cpu;
        self.memory -= other.memory;
        self.ephemeral_storage -= other.ephemeral_storage;
        self.pods -= other.pods;
        for (name, v) in &other.scalar {
            if let Some(slot) = self.scalar.get_mut(name) {
                *slot -= v;
                if *slot == 0 {
                    self.scalar.remove(name);
                }
            }
        }
    }

    /// Each resource the larger of the two.
    fn max(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.max(other.milli_cpu);
        self.memory = self.memory.max(other.memory);
        self.ephemeral_storage = self.ephemeral_storage.max(other.ephemeral_storage);
        for (name, v) in &other.scalar {
            let slot = self.scalar.entry(name.clone()).or_default();
            *slot = (*slot).max(*v);
        }
    }
}

fn container_requests(container: &Container) -> Resources {
    let mut r = Resources::default();
    if let Some(resources) = &container.resources {
        // Limits stand in for absent requests, as the API server defaults them.
        if let Some(limits) = &resources.limits {
            r.add_list(limits);
        }
        if let Some(requests) = &resources.requests {
            let mut from_requests = Resources::default();
            from_requests.add_list(requests);
            if requests.contains_key("cpu") {
                r.milli_cpu = from_requests.milli_cpu;
            }
            if requests.contains_key("memory") {
                r.memory = from_requests.memory;
            }
            if requests.contains_key("ephemeral-storage") {
                r.ephemeral_storage = from_requests.ephemeral_storage;
            }
            for (name, v) in from_requests.scalar {
                r.scalar.insert(name, v);
            }
        }
    }
    r
}

/// What a pod needs on a node, `pods: 1` included.
pub fn pod_requests(pod: &Pod) -> Resources {
    let mut total = Resources::default();
    let Some(spec) = &pod.spec else {
        total.pods = 1;
        return total;
    };
    for container in &spec.containers {
        total.add(&container_requests(container));
    }
    // Init containers run one at a time before the others: the pod needs the largest.
    for init in spec.init_containers.iter().flatten() {
        total.max(&container_requests(init));
    }
    if let Some(overhead) = &spec.overhead {
        total.add_list(overhead);
    }
    total.pods = 1;
    total
}

/// What a node offers pods.
pub fn node_allocatable(node: &Node) -> Resources {
    let mut r = Resources::default();
    if let Some(status) = &node.status {
        match (&status.allocatable, &status.capacity) {
            (Some(list), _) | (None, Some(list)) => r.add_list(list),
            (None, None) => {}
        }
    }
    r
}
