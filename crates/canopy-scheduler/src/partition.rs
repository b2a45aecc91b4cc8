//! One tenant's share of the scheduler: its nodes, its pending pods in priority order, and
//! the decisions made over them. A partition is only ever touched under its own lock, so
//! tenants are scheduled in parallel and two decisions never race for one node.

use std::{
    collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;

use crate::{
    filters::{PodFacts, Reason, filter, fit_error},
    inter_pod_affinity::{AffinityTerm, required_affinity_terms},
    node_info::{NodeInfo, pod_key},
    score::{Strategy, score},
};

/// Where a pending pod is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodState {
    /// Waiting for a worker.
    Active,
    /// Fits nowhere; retried when the tenant's nodes or pods change.
    Unschedulable,
    /// Failed to bind; retried after a delay.
    Backoff,
    /// Assumed on a node while its binding is in flight.
    Binding,
}

/// A pod waiting to be scheduled.
#[derive(Clone, Debug)]
pub struct PendingPod {
    /// The pod as last seen.
    pub pod: Arc<Pod>,
    /// Where it is.
    pub state: PodState,
    /// Failed attempts (for backoff).
    pub attempts: u32,
    seq: u64,
    /// When the pod was first queued (scheduling SLI).
    first_queued: Instant,
    /// When the pod last became active (queue wait).
    queued_at: Instant,
}

/// How long a decision took and waited, for the scheduler's metrics.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// When the pod was first queued.
    pub first_queued: Instant,
    /// From becoming active to being taken by a worker.
    pub waited: Duration,
    /// Filtering and scoring.
    pub decided_in: Duration,
}

#[derive(PartialEq, Eq)]
struct Turn {
    priority: i32,
    seq: u64,
    key: String,
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Higher priority first, then first come first served.
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// What a worker decided for one pod.
#[derive(Debug)]
pub enum Decision {
    /// Bind the pod to the node (already assumed there).
    Bind {
        /// The pod.
        pod: Arc<Pod>,
        /// The node.
        node: String,
        /// Queue wait and decision time.
        timing: Timing,
    },
    /// No node fits; the message says why, upstream style.
    Unschedulable {
        /// The pod.
        pod: Arc<Pod>,
        /// `0/3 nodes are available: ...`.
        message: String,
        /// Queue wait and decision time.
        timing: Timing,
    },
}

impl Decision {
    /// Queue wait and decision time.
    pub fn timing(&self) -> Timing {
        match self {
            Decision::Bind { timing, .. } | Decision::Unschedulable { timing, .. } => *timing,
        }
    }
}

/// A tenant's nodes and pending pods.
#[derive(Default)]
pub struct Partition {
    nodes: BTreeMap<String, NodeInfo>,
    /// Nodes by free cpu (millicores) then name: the pre-filter. Nodes without room for a
    /// pod's cpu are never visited.
    by_free_cpu: BTreeSet<(i64, String)>,
    /// Nodes holding pods with required anti-affinity: the only ones a pod without terms of
    /// its own must be checked against, and none at all in the common case.
    anti_affinity_nodes: BTreeSet<String>,
    /// Unschedulable pods with required pod affinity, with their terms: a pod placed later
    /// may be what they wait for (upstream requeues them when an assigned pod arrives).
    waiting_for_pods: HashMap<String, Vec<AffinityTerm>>,
    pending: HashMap<String, PendingPod>,
    active: BinaryHeap<Turn>,
    next_seq: u64,
}

/// How many feasible nodes are enough to pick from: upstream's adaptive
/// percentageOfNodesToScore (50% of small clusters, down to 5% of large ones, at least 100).
pub fn feasible_nodes_to_find(nodes: usize) -> usize {
    const MIN: usize = 100;
    if nodes <= MIN {
        return nodes;
    }
    let percentage = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * percentage / 100).max(MIN)
}

/// Upstream's message when there is no node at all (here: the tenant has none yet).
pub const NO_NODES: &str = "no nodes available to schedule pods";

fn free_cpu(info: &NodeInfo) -> i64 {
    info.allocatable.milli_cpu - info.requested.milli_cpu
}

fn priority(pod: &Pod) -> i32 {
    pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

impl Partition {
    /// Whether a worker has something to do here (a turn may turn out stale; a worker
    /// then finds nothing, which is cheaper than scanning every pending pod).
    pub fn has_active(&self) -> bool {
        !self.active.is_empty()
    }

    /// Nodes in the partition.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// A node, for tests and inspection.
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    /// Pending pods, for tests and inspection.
    pub fn pending(&self, key: &str) -> Option<&PendingPod> {
        self.pending.get(key)
    }

    fn with_node<R>(&mut self, name: &str, f: impl FnOnce(&mut NodeInfo) -> R) -> Option<R> {
        let info = self.nodes.get_mut(name)?;
        self.by_free_cpu.remove(&(free_cpu(info), name.to_string()));
        let result = f(info);
        self.by_free_cpu.insert((free_cpu(info), name.to_string()));
        let anti_affinity = info.has_pods_with_required_anti_affinity();
        self.index_anti_affinity(name, anti_affinity);
        Some(result)
    }

    fn index_anti_affinity(&mut self, name: &str, has: bool) {
        if !has {
            self.anti_affinity_nodes.remove(name);
        } else if !self.anti_affinity_nodes.contains(name) {
            self.anti_affinity_nodes.insert(name.to_string());
        }
    }

    /// Adds or replaces a node, keeping the pods already placed on it.
    pub fn put_node(&mut self, info: NodeInfo) {
        let name = info.name().to_string();
        if let Some(old) = self.nodes.get(&name) {
            self.by_free_cpu.remove(&(free_cpu(old), name.clone()));
        }
        self.by_free_cpu.insert((free_cpu(&info), name.clone()));
        self.index_anti_affinity(&name, info.has_pods_with_required_anti_affinity());
        self.nodes.insert(name, info);
    }

    /// Updates a node's object in place.
    pub fn update_node(&mut self, node: Arc<k8s_openapi::api::core::v1::Node>) -> bool {
        let name = node.metadata.name.clone().unwrap_or_default();
        self.with_node(&name, |info| info.set_node(node)).is_some()
    }

    /// Removes a node and returns it (with its pods).
    pub fn take_node(&mut self, name: &str) -> Option<NodeInfo> {
        let info = self.nodes.remove(name)?;
        self.by_free_cpu
            .remove(&(free_cpu(&info), name.to_string()));
        self.anti_affinity_nodes.remove(name);
        Some(info)
    }

    /// Records a pod bound to one of this partition's nodes; it is no longer pending.
    /// Returns whether unschedulable pods waiting for such a pod (required affinity) were
    /// put back in the queue, so that the caller wakes the tenant.
    pub fn bound(&mut self, pod: Arc<Pod>, node: &str) -> bool {
        let key = pod_key(&pod);
        self.pending.remove(&key);
        self.waiting_for_pods.remove(&key);
        // A pod this scheduler assumed is already there: only a newcomer can unblock anyone,
        // and status updates of bound pods must not retry the waiting ones each time.
        let arrived = self
            .with_node(node, |info| {
                let arrived = !info.pods.contains_key(&key);
                info.add_pod(pod.clone());
                arrived
            })
            .unwrap_or(false);
        arrived && self.activate_waiting_for(&pod)
    }

    /// Puts back in the queue the unschedulable pods whose required affinity a newly placed
    /// pod matches (upstream's queueing hint for InterPodAffinity).
    fn activate_waiting_for(&mut self, placed: &Pod) -> bool {
        if self.waiting_for_pods.is_empty() {
            return false;
        }
        let keys: Vec<String> = self
            .waiting_for_pods
            .iter()
            .filter(|(_, terms)| terms.iter().any(|t| t.matches(placed)))
            .map(|(key, _)| key.clone())
            .collect();
        let mut any = false;
        for key in keys {
            any |= self.activate(&key);
        }
        any
    }

    /// Forgets a pod wherever it is; returns whether it held resources on a node.
    pub fn remove_pod(&mut self, key: &str, node: Option<&str>) -> bool {
        self.pending.remove(key);
        self.waiting_for_pods.remove(key);
        match node {
            Some(node) => self
                .with_node(node, |info| info.remove_pod(key))
                .unwrap_or(false),
            None => false,
        }
    }

    /// A pod waiting for a node: new ones join the queue; known ones are refreshed where they
    /// are (an update of an unschedulable pod, such as its own condition, does not retry it).
    pub fn enqueue(&mut self, pod: Arc<Pod>) -> bool {
        let key = pod_key(&pod);
        if let Some(pending) = self.pending.get_mut(&key) {
            pending.pod = pod;
            return false;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.active.push(Turn {
            priority: priority(&pod),
            seq,
            key: key.clone(),
        });
        let now = Instant::now();
        self.pending.insert(
            key,
            PendingPod {
                pod,
                state: PodState::Active,
                attempts: 0,
                seq,
                first_queued: now,
                queued_at: now,
            },
        );
        true
    }

    /// Puts a pod back in the queue (after backoff, or when the cluster changed).
    pub fn activate(&mut self, key: &str) -> bool {
        self.waiting_for_pods.remove(key);
        let Some(pending) = self.pending.get_mut(key) else {
            return false;
        };
        if pending.state == PodState::Active || pending.state == PodState::Binding {
            return false;
        }
        pending.state = PodState::Active;
        pending.queued_at = Instant::now();
        self.active.push(Turn {
            priority: priority(&pending.pod),
            seq: pending.seq,
            key: key.to_string(),
        });
        true
    }

    /// Pending pods: active, in backoff, unschedulable (pods being bound are not pending).
    pub fn pending_counts(&self) -> [usize; 3] {
        let mut counts = [0; 3];
        for pending in self.pending.values() {
            match pending.state {
                PodState::Active => counts[0] += 1,
                PodState::Backoff => counts[1] += 1,
                PodState::Unschedulable => counts[2] += 1,
                PodState::Binding => {}
            }
        }
        counts
    }

    /// Retries every unschedulable pod: a node joined or changed, or capacity was freed.
    pub fn activate_unschedulable(&mut self) -> bool {
        let keys: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.state == PodState::Unschedulable)
            .map(|(k, _)| k.clone())
            .collect();
        let any = !keys.is_empty();
        for key in keys {
            self.activate(&key);
        }
        any
    }

    /// A binding failed: the pod leaves its node and waits `attempts`-long backoff.
    pub fn binding_failed(&mut self, key: &str, node: &str) -> Option<u32> {
        self.with_node(node, |info| info.remove_pod(key));
        let pending = self.pending.get_mut(key)?;
        pending.state = PodState::Backoff;
        pending.attempts += 1;
        Some(pending.attempts)
    }

    /// Decides for up to `limit` pods, best first. Chosen pods are assumed on their node at
    /// once, so the next decision sees the capacity they take and the (anti-)affinity they
    /// bring.
    pub fn decide(&mut self, limit: usize, strategy: Strategy) -> Vec<Decision> {
        let mut decisions = Vec::new();
        while decisions.len() < limit {
            let Some(turn) = self.active.pop() else {
                break;
            };
            let Some(pending) = self.pending.get(&turn.key) else {
                continue;
            };
            // Stale turns (the pod moved since) are skipped.
            if pending.state != PodState::Active || pending.seq != turn.seq {
                continue;
            }
            let pod = pending.pod.clone();
            let taken = Instant::now();
            let mut timing = Timing {
                first_queued: pending.first_queued,
                waited: taken.saturating_duration_since(pending.queued_at),
                decided_in: Duration::ZERO,
            };
            let placed = self.place(&pod, strategy);
            timing.decided_in = taken.elapsed();
            match placed {
                Ok(node) => {
                    self.with_node(&node, |info| info.add_pod(pod.clone()));
                    if let Some(p) = self.pending.get_mut(&turn.key) {
                        p.state = PodState::Binding;
                    }
                    decisions.push(Decision::Bind { pod, node, timing });
                }
                Err(message) => {
                    if let Some(p) = self.pending.get_mut(&turn.key) {
                        p.state = PodState::Unschedulable;
                    }
                    let terms = required_affinity_terms(&pod);
                    if !terms.is_empty() {
                        self.waiting_for_pods.insert(turn.key.clone(), terms);
                    }
                    decisions.push(Decision::Unschedulable {
                        pod,
                        message,
                        timing,
                    });
                }
            }
        }
        // Pods these placements unblock are decided in a later turn, once the Unschedulable
        // status this batch may hold for them has been written, not in a race with it.
        if !self.waiting_for_pods.is_empty() {
            for decision in &decisions {
                if let Decision::Bind { pod, .. } = decision {
                    self.activate_waiting_for(pod);
                }
            }
        }
        decisions
    }

    /// The best node for a pod, or why there is none.
    fn place(&self, pod: &Pod, strategy: Strategy) -> Result<String, String> {
        if self.nodes.is_empty() {
            return Err(NO_NODES.into());
        }
        let with_anti_affinity = self
            .anti_affinity_nodes
            .iter()
            .filter_map(|name| self.nodes.get(name));
        let facts = PodFacts::with_inter_pod_affinity(pod, self.nodes.values(), with_anti_affinity);
        let want_cpu = facts.requests.milli_cpu;
        let mut reasons: BTreeMap<Reason, usize> = BTreeMap::new();
        let mut best: Option<(i64, &str)> = None;
        let mut visited = 0;
        let mut feasible = 0;
        let enough = feasible_nodes_to_find(self.nodes.len());
        // The index yields the best candidates for the strategy first (most free cpu for
        // spreading, least for packing), so stopping after `enough` feasible nodes, as
        // upstream's percentageOfNodesToScore does, rarely misses the best node.
        let candidates = self.by_free_cpu.range((want_cpu, String::new())..);
        let candidates: Box<dyn Iterator<Item = &(i64, String)>> = match strategy {
            Strategy::LeastAllocated => Box::new(candidates.rev()),
            Strategy::MostAllocated => Box::new(candidates),
        };
        for (_, name) in candidates {
            if feasible >= enough {
                break;
            }
            let Some(info) = self.nodes.get(name) else {
                continue;
            };
            visited += 1;
            match filter(&facts, info) {
                Ok(()) => {
                    feasible += 1;
                    let s = score(strategy, &facts.requests, info);
                    // Ties go to the first found, so that decisions are reproducible.
                    if best.is_none_or(|(b, _)| s > b) {
                        best = Some((s, name));
                    }
                }
                Err(found) => {
                    for reason in found {
                        *reasons.entry(reason).or_default() += 1;
                    }
                }
            }
        }
        if let Some((_, name)) = best {
            return Ok(name.to_string());
        }
        // Nodes the pre-filter skipped lack cpu.
        let skipped = self.nodes.len() - visited;
        if skipped > 0 {
            *reasons
                .entry(Reason::Insufficient("cpu".into()))
                .or_default() += skipped;
        }
        Err(fit_error(self.nodes.len(), &reasons))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cpu: &str) -> NodeInfo {
        NodeInfo::new(Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                "status": {"allocatable": {"cpu": cpu, "memory": "64Gi", "pods": "110"},
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }))
            .unwrap(),
        ))
    }

    fn pod(name: &str, cpu: &str, priority: i32) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "t"},
                "spec": {"priority": priority, "containers": [{"name": "c", "image": "i",
                    "resources": {"requests": {"cpu": cpu}}}]},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn priority_then_fifo_and_no_double_booking() {
        let mut p = Partition::default();
        p.put_node(node("n1", "2"));
        p.put_node(node("n2", "1"));
        p.enqueue(pod("low", "1", 0));
        p.enqueue(pod("first", "1", 10));
        p.enqueue(pod("second", "1", 10));
        p.enqueue(pod("late", "1", 0));
        let decisions = p.decide(10, Strategy::LeastAllocated);
        let order: Vec<String> = decisions
            .iter()
            .map(|d| match d {
                Decision::Bind { pod, .. } | Decision::Unschedulable { pod, .. } => {
                    pod.metadata.name.clone().unwrap()
                }
            })
            .collect();
        assert_eq!(order, ["first", "second", "low", "late"]);
        // Three cpus for four one-cpu pods: the last one does not fit anywhere.
        let bound = decisions
            .iter()
            .filter(|d| matches!(d, Decision::Bind { .. }))
            .count();
        assert_eq!(bound, 3);
        match &decisions[3] {
            Decision::Unschedulable { message, .. } => {
                assert_eq!(message, "0/2 nodes are available: 2 Insufficient cpu.")
            }
            other => panic!("{other:?}"),
        }
        for name in ["n1", "n2"] {
            let info = p.node(name).unwrap();
            assert!(info.requested.milli_cpu <= info.allocatable.milli_cpu);
        }
        // Freed capacity brings the unschedulable pod back.
        assert!(p.remove_pod("t/first", Some("n1")) || p.remove_pod("t/first", Some("n2")));
        assert!(p.activate_unschedulable());
        let again = p.decide(10, Strategy::LeastAllocated);
        assert!(matches!(again.as_slice(), [Decision::Bind { .. }]));
    }

    #[test]
    fn enough_feasible_nodes_like_upstream() {
        assert_eq!(feasible_nodes_to_find(50), 50);
        assert_eq!(feasible_nodes_to_find(1000), 420);
        assert_eq!(feasible_nodes_to_find(5000), 500);
        assert_eq!(feasible_nodes_to_find(100_000), 5000);
    }

    #[test]
    fn most_allocated_packs_onto_one_node() {
        let mut p = Partition::default();
        for n in ["a", "b", "c"] {
            p.put_node(node(n, "4"));
        }
        for i in 0..4 {
            p.enqueue(pod(&format!("p{i}"), "1", 0));
        }
        let nodes: std::collections::HashSet<String> = p
            .decide(10, Strategy::MostAllocated)
            .into_iter()
            .filter_map(|d| match d {
                Decision::Bind { node, .. } => Some(node),
                _ => None,
            })
            .collect();
        assert_eq!(nodes.len(), 1, "{nodes:?}");
    }

    /// A pod labelled `app` with required terms of `kind` over `kubernetes.io/hostname`.
    fn affine(name: &str, app: &str, kind: &str, wants: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "t", "labels": {"app": app}},
                "spec": {"containers": [{"name": "c", "image": "i",
                    "resources": {"requests": {"cpu": "100m"}}}],
                    "affinity": {kind: {"requiredDuringSchedulingIgnoredDuringExecution": [
                        {"labelSelector": {"matchLabels": {"app": wants}},
                         "topologyKey": "kubernetes.io/hostname"}]}}},
            }))
            .unwrap(),
        )
    }

    fn bound_to(decisions: &[Decision]) -> Vec<(String, String)> {
        decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Bind { pod, node, .. } => {
                    Some((pod.metadata.name.clone()?, node.clone()))
                }
                Decision::Unschedulable { .. } => None,
            })
            .collect()
    }

    #[test]
    fn anti_affine_pods_decided_in_one_batch_spread_out() {
        let mut p = Partition::default();
        p.put_node(node("n1", "4"));
        p.put_node(node("n2", "4"));
        for name in ["web-1", "web-2", "web-3"] {
            p.enqueue(affine(name, "web", "podAntiAffinity", "web"));
        }
        // Packing would put them all on one node: only the assumed pods keep them apart.
        let decisions = p.decide(10, Strategy::MostAllocated);
        let bound = bound_to(&decisions);
        assert_eq!(bound.len(), 2, "{decisions:?}");
        assert_ne!(bound[0].1, bound[1].1);
        match &decisions[2] {
            Decision::Unschedulable { message, .. } => assert_eq!(
                message,
                "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules."
            ),
            other => panic!("{other:?}"),
        }
        // A plain pod the placed ones repel is kept away by their terms.
        let plain: Arc<Pod> = Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "intruder", "namespace": "t", "labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            }))
            .unwrap(),
        );
        p.enqueue(plain);
        match p.decide(10, Strategy::MostAllocated).as_slice() {
            [Decision::Unschedulable { message, .. }] => assert_eq!(
                message,
                "0/2 nodes are available: 2 node(s) didn't satisfy existing pods anti-affinity rules."
            ),
            other => panic!("{other:?}"),
        }
        // A failed binding takes its pod's rule along: the node is open again.
        let (name, node) = &bound[0];
        p.binding_failed(&format!("t/{name}"), node);
        assert_eq!(p.anti_affinity_nodes.len(), 1);
        p.activate_unschedulable();
        let again = bound_to(&p.decide(10, Strategy::MostAllocated));
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(&again[0].1, node);
    }

    #[test]
    fn a_pod_waiting_for_its_peer_is_retried_when_the_peer_is_placed() {
        let mut p = Partition::default();
        p.put_node(node("n1", "4"));
        p.put_node(node("n2", "4"));
        p.enqueue(affine("cache", "cache", "podAffinity", "db"));
        match p.decide(10, Strategy::LeastAllocated).as_slice() {
            [Decision::Unschedulable { message, .. }] => assert_eq!(
                message,
                "0/2 nodes are available: 2 node(s) didn't match pod affinity rules."
            ),
            other => panic!("{other:?}"),
        }
        assert!(!p.has_active());
        // The peer is decided in this turn; the waiting pod in the next one, beside it.
        p.enqueue(affine("db", "db", "podAntiAffinity", "db"));
        let first = bound_to(&p.decide(10, Strategy::LeastAllocated));
        assert_eq!(first.len(), 1);
        assert!(p.has_active());
        let second = bound_to(&p.decide(10, Strategy::LeastAllocated));
        assert_eq!(second, [("cache".to_string(), first[0].1.clone())]);

        // A peer bound by someone else wakes a waiting pod too; a bound pod's updates do not.
        p.enqueue(affine("queue", "queue", "podAffinity", "broker"));
        p.decide(10, Strategy::LeastAllocated);
        let broker = affine("broker", "broker", "podAffinity", "none");
        assert!(p.bound(broker.clone(), "n2"));
        assert!(!p.bound(broker, "n2"));
        let third = bound_to(&p.decide(10, Strategy::LeastAllocated));
        assert_eq!(third, [("queue".to_string(), "n2".to_string())]);
    }

    #[test]
    fn the_first_pod_of_a_self_affine_group_is_placed() {
        let mut p = Partition::default();
        p.put_node(node("n1", "4"));
        p.put_node(node("n2", "4"));
        for name in ["a", "b", "c"] {
            p.enqueue(affine(name, "web", "podAffinity", "web"));
        }
        // The first goes anywhere; the group then gathers around it.
        let bound = bound_to(&p.decide(10, Strategy::LeastAllocated));
        assert_eq!(bound.len(), 3);
        assert!(
            bound.iter().all(|(_, node)| *node == bound[0].1),
            "{bound:?}"
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use serde_json::json;

    /// A small deterministic generator (no extra dependency): xorshift64*.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self, bound: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound.max(1)
        }
    }

    fn node(name: &str, rng: &mut Rng) -> NodeInfo {
        NodeInfo::new(Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                "status": {"allocatable": {"cpu": (1 + rng.next(8)).to_string(),
                    "memory": format!("{}Gi", 1 + rng.next(16)),
                    "pods": (1 + rng.next(6)).to_string()},
                    "conditions": [{"type": "Ready", "status": "True"}]},
            }))
            .unwrap(),
        ))
    }

    /// Random arrivals of nodes and pods, departures of pods, and decisions in between: no
    /// node is ever given more cpu, memory or pods than it has, every decision names a node
    /// of the partition, and the accounting matches the pods placed.
    #[test]
    fn decisions_never_overcommit_a_node() {
        let mut bindings = 0;
        for seed in 1..=50u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut p = Partition::default();
            let mut placed: Vec<(String, String)> = Vec::new();
            for step in 0..400 {
                match rng.next(10) {
                    0 => {
                        let name = format!("n{}", rng.next(12));
                        if p.node(&name).is_none() {
                            p.put_node(node(&name, &mut rng));
                            p.activate_unschedulable();
                        }
                    }
                    1 if !placed.is_empty() => {
                        let at = rng.next(placed.len() as u64) as usize;
                        let (key, node) = placed.swap_remove(at);
                        assert!(p.remove_pod(&key, Some(&node)));
                        p.activate_unschedulable();
                    }
                    2..=6 => {
                        let mut pod = json!({
                            "metadata": {"name": format!("p{step}"), "namespace": "t"},
                            "spec": {"priority": rng.next(3) as i32, "containers": [{
                                "name": "c", "image": "i", "resources": {"requests": {
                                    "cpu": format!("{}m", 100 + rng.next(3000)),
                                    "memory": format!("{}Mi", 64 + rng.next(4096))}}}]},
                        });
                        // Some pods belong to a group; some of those shun their group.
                        let group = format!("g{}", rng.next(3));
                        match rng.next(4) {
                            0 => {
                                pod["metadata"]["labels"] = json!({"group": group});
                                pod["spec"]["affinity"] = json!({"podAntiAffinity": {
                                    "requiredDuringSchedulingIgnoredDuringExecution": [{
                                        "labelSelector": {"matchLabels": {"group": group}},
                                        "topologyKey": "kubernetes.io/hostname"}]}});
                            }
                            1 => pod["metadata"]["labels"] = json!({"group": group}),
                            _ => {}
                        }
                        p.enqueue(Arc::new(serde_json::from_value(pod).unwrap()));
                    }
                    _ => {
                        let strategy = if rng.next(2) == 0 {
                            Strategy::LeastAllocated
                        } else {
                            Strategy::MostAllocated
                        };
                        for decision in p.decide(1 + rng.next(8) as usize, strategy) {
                            if let Decision::Bind { pod, node, .. } = decision {
                                assert!(p.node(&node).is_some(), "seed {seed}: {node}");
                                // The binding succeeds: the pod is seen bound.
                                p.bound(pod.clone(), &node);
                                placed.push((pod_key(&pod), node));
                                bindings += 1;
                            }
                        }
                    }
                }
                for info in p.nodes.values() {
                    let (have, used) = (&info.allocatable, &info.requested);
                    assert!(used.milli_cpu <= have.milli_cpu, "seed {seed}: cpu");
                    assert!(used.memory <= have.memory, "seed {seed}: memory");
                    assert!(used.pods <= have.pods, "seed {seed}: pods");
                    let sum: i64 = info.pods.values().map(|pp| pp.requests.milli_cpu).sum();
                    assert_eq!(sum, used.milli_cpu, "seed {seed}: accounting");
                    // A pod that shuns its group is alone of its group on its node.
                    for placed in info.pods.values() {
                        let group = |pod: &Pod| pod.metadata.labels.as_ref()?.get("group").cloned();
                        if placed.anti_affinity.is_empty() {
                            continue;
                        }
                        let mine = group(&placed.pod);
                        let same = info.pods.values().filter(|o| group(&o.pod) == mine).count();
                        assert_eq!(same, 1, "seed {seed}: anti-affinity on {}", info.name());
                    }
                    assert_eq!(
                        p.anti_affinity_nodes.contains(info.name()),
                        info.has_pods_with_required_anti_affinity(),
                        "seed {seed}: anti-affinity index"
                    );
                }
            }
        }
        assert!(
            bindings > 1000,
            "the run must place pods to test anything ({bindings})"
        );
    }
}
