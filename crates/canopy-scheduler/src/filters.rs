//! Upstream's filter plugins (NodeUnschedulable, TaintToleration, NodeAffinity, NodePorts,
//! NodeResourcesFit, and InterPodAffinity from the state `inter_pod_affinity` prepares once
//! per decision), with upstream's failure texts, and the `FitError` message that sums them up
//! over all nodes.

use std::{collections::BTreeMap, fmt};

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration,
};

use crate::{
    inter_pod_affinity::InterPodAffinity,
    node_info::{HostPort, NodeInfo},
    resources::Resources,
};

/// Why a node cannot take a pod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Not enough of a resource left.
    Insufficient(String),
    /// The node's `pods` allocatable is used up.
    TooManyPods,
    /// nodeSelector or required node affinity does not match.
    NodeAffinity,
    /// A NoSchedule/NoExecute taint the pod does not tolerate.
    UntoleratedTaint {
        /// Taint key.
        key: String,
        /// Taint value.
        value: String,
    },
    /// `spec.unschedulable`.
    Unschedulable,
    /// A wanted host port is taken.
    HostPorts,
    /// No pod the pod's required affinity asks for in the node's topology domain.
    PodAffinity,
    /// A pod the pod's required anti-affinity rules out is in the node's topology domain.
    PodAntiAffinity,
    /// A pod in the node's topology domain rules this pod out by its required anti-affinity.
    ExistingPodsAntiAffinity,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Insufficient(resource) => write!(f, "Insufficient {resource}"),
            Reason::TooManyPods => f.write_str("Too many pods"),
            Reason::NodeAffinity => {
                f.write_str("node(s) didn't match Pod's node affinity/selector")
            }
            Reason::UntoleratedTaint { key, value } => {
                write!(f, "node(s) had untolerated taint {{{key}: {value}}}")
            }
            Reason::Unschedulable => f.write_str("node(s) were unschedulable"),
            Reason::HostPorts => {
                f.write_str("node(s) didn't have free ports for the requested pod ports")
            }
            Reason::PodAffinity => f.write_str("node(s) didn't match pod affinity rules"),
            Reason::PodAntiAffinity => f.write_str("node(s) didn't match pod anti-affinity rules"),
            Reason::ExistingPodsAntiAffinity => {
                f.write_str("node(s) didn't satisfy existing pods anti-affinity rules")
            }
        }
    }
}

/// What the filters need to know about the pod, computed once per scheduling attempt.
pub struct PodFacts<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// Its requests.
    pub requests: Resources,
    /// Its host ports.
    pub ports: Vec<HostPort>,
    /// The pods around it that its required (anti-)affinity, or theirs, concern; `None`
    /// when there are none. It depends on the whole partition, so the partition sets it.
    pub inter_pod_affinity: Option<InterPodAffinity>,
}

impl<'a> PodFacts<'a> {
    /// Facts of a pod, without inter-pod affinity (see `with_inter_pod_affinity`).
    pub fn new(pod: &'a Pod) -> Self {
        Self {
            requests: crate::resources::pod_requests(pod),
            ports: crate::node_info::host_ports(pod),
            inter_pod_affinity: None,
            pod,
        }
    }

    /// Facts of a pod placed among `nodes`, of which `with_anti_affinity` hold pods with
    /// required anti-affinity.
    pub fn with_inter_pod_affinity<'n>(
        pod: &'a Pod,
        nodes: impl IntoIterator<Item = &'n NodeInfo>,
        with_anti_affinity: impl IntoIterator<Item = &'n NodeInfo>,
    ) -> Self {
        Self {
            inter_pod_affinity: InterPodAffinity::prepare(pod, nodes, with_anti_affinity),
            ..Self::new(pod)
        }
    }

    fn tolerations(&self) -> &[Toleration] {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.as_deref())
            .unwrap_or_default()
    }
}

/// The taint the node lifecycle controller puts on a node that is not Ready (upstream's
/// TaintNodesByCondition); the scheduler applies it itself from the condition.
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
/// The taint that stands for `spec.unschedulable`.
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Upstream's toleration matching.
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = toleration.effect.as_deref().filter(|e| !e.is_empty())
        && effect != taint.effect
    {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    let operator = toleration.operator.as_deref().unwrap_or("Equal");
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match operator {
        "Exists" => true,
        "Equal" => {
            !key.is_empty()
                && toleration.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

/// Runs the filters in upstream's order and stops at the first plugin that fails (resource
/// fit reports every resource that is short, as upstream does).
pub fn filter(facts: &PodFacts<'_>, info: &NodeInfo) -> Result<(), Vec<Reason>> {
    let node = &info.node;
    let spec = node.spec.as_ref();
    let tolerations = facts.tolerations();
    // NodeUnschedulable.
    if spec.and_then(|s| s.unschedulable).unwrap_or(false) {
        let taint = Taint {
            key: UNSCHEDULABLE_TAINT.into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        if !tolerations.iter().any(|t| tolerates(t, &taint)) {
            return Err(vec![Reason::Unschedulable]);
        }
    }
    // TaintToleration, with the not-ready taint a lifecycle controller would add.
    let not_ready = (!node_ready(node)).then(|| Taint {
        key: NOT_READY_TAINT.into(),
        effect: "NoSchedule".into(),
        ..Default::default()
    });
    let taints = spec
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default()
        .iter()
        .chain(not_ready.as_ref());
    for taint in taints {
        if (taint.effect == "NoSchedule" || taint.effect == "NoExecute")
            && !tolerations.iter().any(|t| tolerates(t, taint))
        {
            return Err(vec![Reason::UntoleratedTaint {
                key: taint.key.clone(),
                value: taint.value.clone().unwrap_or_default(),
            }]);
        }
    }
    // NodeAffinity.
    if !matches_node_selector_and_affinity(facts.pod, node) {
        return Err(vec![Reason::NodeAffinity]);
    }
    // NodePorts.
    if facts.ports.iter().any(|p| info.port_taken(p)) {
        return Err(vec![Reason::HostPorts]);
    }
    // NodeResourcesFit.
    let short = insufficient(&facts.requests, info);
    if !short.is_empty() {
        return Err(short);
    }
    // InterPodAffinity (upstream runs PodTopologySpread and volume plugins in between).
    match &facts.inter_pod_affinity {
        Some(state) => state.check(node).map_err(|reason| vec![reason]),
        None => Ok(()),
    }
}

/// Every resource the node lacks for the request.
pub fn insufficient(request: &Resources, info: &NodeInfo) -> Vec<Reason> {
    let (have, used) = (&info.allocatable, &info.requested);
    let mut short = Vec::new();
    if used.pods + 1 > have.pods {
        short.push(Reason::TooManyPods);
    }
    let mut check = |name: &str, want: i64, have: i64, used: i64| {
        if want > 0 && want > have - used {
            short.push(Reason::Insufficient(name.to_string()));
        }
    };
    check("cpu", request.milli_cpu, have.milli_cpu, used.milli_cpu);
    check("memory", request.memory, have.memory, used.memory);
    check(
        "ephemeral-storage",
        request.ephemeral_storage,
        have.ephemeral_storage,
        used.ephemeral_storage,
    );
    for (name, want) in &request.scalar {
        check(
            name,
            *want,
            have.scalar.get(name).copied().unwrap_or(0),
            used.scalar.get(name).copied().unwrap_or(0),
        );
    }
    short
}

fn matches_node_selector_and_affinity(pod: &Pod, node: &Node) -> bool {
    let labels = node.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    let Some(spec) = &pod.spec else {
        return true;
    };
    if let Some(selector) = &spec.node_selector
        && !selector.iter().all(|(k, v)| label(k) == Some(v.as_str()))
    {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    match required {
        // Terms are ORed; an empty list matches nothing, as upstream.
        Some(selector) => selector
            .node_selector_terms
            .iter()
            .any(|term| term_matches(term, node)),
        None => true,
    }
}

fn term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let mut node_fields = BTreeMap::new();
    if let Some(name) = &node.metadata.name {
        node_fields.insert("metadata.name".to_string(), name.clone());
    }
    expressions.iter().all(|r| requirement_matches(r, &labels))
        && fields.iter().all(|r| requirement_matches(r, &node_fields))
}

fn requirement_matches(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&r.key);
    let values = r.values.as_deref().unwrap_or_default();
    let as_int = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(have), Some(bound)) = (
                value.and_then(|v| as_int(v)),
                values.first().and_then(|v| as_int(v)),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                have > bound
            } else {
                have < bound
            }
        }
        _ => false,
    }
}

/// Upstream's FitError text: `0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't
/// match Pod's node affinity/selector.` Each reason is counted over the nodes it applied to,
/// and the parts are sorted as strings, as upstream sorts them.
pub fn fit_error(total_nodes: usize, reasons: &BTreeMap<Reason, usize>) -> String {
    let mut parts: Vec<String> = reasons
        .iter()
        .map(|(reason, count)| format!("{count} {reason}"))
        .collect();
    parts.sort();
    if parts.is_empty() {
        format!("0/{total_nodes} nodes are available.")
    } else {
        format!("0/{total_nodes} nodes are available: {}.", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::{Node, Pod};
    use serde_json::json;

    use super::*;
    use crate::score::{Strategy, score};

    fn node(name: &str, cpu: &str, memory: &str, extra: serde_json::Value) -> NodeInfo {
        let mut value = json!({
            "metadata": {"name": name, "labels": {"zone": "a", "size": "8"}},
            "spec": {},
            "status": {
                "allocatable": {"cpu": cpu, "memory": memory, "pods": "3"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        });
        merge(&mut value, extra);
        NodeInfo::new(Arc::new(serde_json::from_value::<Node>(value).unwrap()))
    }

    fn pod(name: &str, cpu: &str, extra: serde_json::Value) -> Pod {
        let mut value = json!({
            "metadata": {"name": name, "namespace": "t"},
            "spec": {"containers": [{"name": "c", "image": "i",
                "resources": {"requests": {"cpu": cpu, "memory": "1Gi"}}}]},
        });
        merge(&mut value, extra);
        serde_json::from_value(value).unwrap()
    }

    fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
        match (base, extra) {
            (serde_json::Value::Object(b), serde_json::Value::Object(e)) => {
                for (k, v) in e {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (b, e) => *b = e,
        }
    }

    fn check(pod: &Pod, info: &NodeInfo) -> Result<(), Vec<Reason>> {
        filter(&PodFacts::new(pod), info)
    }

    #[test]
    fn resources_count_bound_pods_init_containers_and_overhead() {
        let mut info = node("n", "2", "4Gi", json!({}));
        assert!(check(&pod("a", "1500m", json!({})), &info).is_ok());
        info.add_pod(Arc::new(pod("a", "1500m", json!({}))));
        assert_eq!(
            check(&pod("b", "1", json!({})), &info),
            Err(vec![Reason::Insufficient("cpu".into())])
        );
        // The largest init container counts when it exceeds the containers' sum.
        let init = pod(
            "c",
            "100m",
            json!({"spec": {"initContainers": [{"name": "i", "image": "i",
                "resources": {"requests": {"cpu": "1", "memory": "5Gi"}}}]}}),
        );
        assert_eq!(
            check(&init, &info),
            Err(vec![
                Reason::Insufficient("cpu".into()),
                Reason::Insufficient("memory".into())
            ])
        );
        assert!(check(&pod("d", "500m", json!({})), &info).is_ok());
        info.add_pod(Arc::new(pod("d", "500m", json!({}))));
        info.add_pod(Arc::new(pod("e", "0", json!({}))));
        assert!(
            check(&pod("f", "0", json!({})), &info)
                .unwrap_err()
                .contains(&Reason::TooManyPods)
        );
        // A pod leaving frees its share; placing a pod twice counts it once.
        info.add_pod(Arc::new(pod("e", "0", json!({}))));
        assert!(info.remove_pod("t/a"));
        assert_eq!(info.requested.milli_cpu, 500);
        assert_eq!(info.requested.pods, 2);
        // Extended resources.
        let gpu = pod(
            "g",
            "1",
            json!({"spec": {"containers": [{"name": "c", "image": "i",
                "resources": {"limits": {"example.com/gpu": "1"}}}]}}),
        );
        assert_eq!(
            check(&gpu, &info),
            Err(vec![Reason::Insufficient("example.com/gpu".into())])
        );
    }

    #[test]
    fn selectors_affinity_taints_and_conditions() {
        let info = node("n1", "4", "8Gi", json!({}));
        let selected = pod("a", "1", json!({"spec": {"nodeSelector": {"zone": "b"}}}));
        assert_eq!(check(&selected, &info), Err(vec![Reason::NodeAffinity]));
        let affinity = |op: &str, values: serde_json::Value| {
            pod(
                "a",
                "1",
                json!({"spec": {"affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "size", "operator": op, "values": values}]}
                ]}}}}}),
            )
        };
        assert!(check(&affinity("Gt", json!(["4"])), &info).is_ok());
        assert!(check(&affinity("Lt", json!(["4"])), &info).is_err());
        assert!(check(&affinity("In", json!(["8", "16"])), &info).is_ok());
        assert!(check(&affinity("NotIn", json!(["8"])), &info).is_err());
        assert!(check(&affinity("Exists", json!([])), &info).is_ok());
        let by_name = pod(
            "a",
            "1",
            json!({"spec": {"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}
            ]}}}}}),
        );
        assert!(check(&by_name, &info).is_ok(), "terms are ORed");

        let tainted = node(
            "n2",
            "4",
            "8Gi",
            json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"},
                                        {"key": "soft", "effect": "PreferNoSchedule"}]}}),
        );
        assert_eq!(
            check(&pod("a", "1", json!({})), &tainted),
            Err(vec![Reason::UntoleratedTaint {
                key: "dedicated".into(),
                value: "db".into()
            }])
        );
        let tolerant = |t: serde_json::Value| pod("a", "1", json!({"spec": {"tolerations": [t]}}));
        assert!(
            check(
                &tolerant(json!({"key": "dedicated", "value": "db"})),
                &tainted
            )
            .is_ok()
        );
        assert!(
            check(
                &tolerant(json!({"key": "dedicated", "operator": "Exists"})),
                &tainted
            )
            .is_ok()
        );
        assert!(check(&tolerant(json!({"operator": "Exists"})), &tainted).is_ok());
        assert!(
            check(
                &tolerant(json!({"key": "dedicated", "value": "web"})),
                &tainted
            )
            .is_err()
        );
        assert!(
            check(
                &tolerant(json!({"key": "dedicated", "operator": "Exists", "effect": "NoExecute"})),
                &tainted
            )
            .is_err()
        );

        let not_ready = node(
            "n3",
            "4",
            "8Gi",
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        );
        assert_eq!(
            check(&pod("a", "1", json!({})), &not_ready),
            Err(vec![Reason::UntoleratedTaint {
                key: NOT_READY_TAINT.into(),
                value: String::new()
            }])
        );
        let cordoned = node("n4", "4", "8Gi", json!({"spec": {"unschedulable": true}}));
        assert_eq!(
            check(&pod("a", "1", json!({})), &cordoned),
            Err(vec![Reason::Unschedulable])
        );
    }

    #[test]
    fn host_ports_collide_by_protocol_ip_and_port() {
        let mut info = node("n", "4", "8Gi", json!({}));
        let with_port = |name: &str, port: serde_json::Value| {
            pod(
                name,
                "100m",
                json!({"spec": {"containers": [{"name": "c", "image": "i",
                "ports": [port]}]}}),
            )
        };
        info.add_pod(Arc::new(with_port(
            "a",
            json!({"containerPort": 80, "hostPort": 8080}),
        )));
        assert_eq!(
            check(
                &with_port("b", json!({"containerPort": 80, "hostPort": 8080})),
                &info
            ),
            Err(vec![Reason::HostPorts])
        );
        assert!(
            check(
                &with_port(
                    "c",
                    json!({"containerPort": 80, "hostPort": 8080, "protocol": "UDP"})
                ),
                &info
            )
            .is_ok()
        );
        assert!(
            check(
                &with_port(
                    "d",
                    json!({"containerPort": 80, "hostPort": 8080, "hostIP": "10.0.0.1"})
                ),
                &info
            )
            .is_err(),
            "0.0.0.0 covers every address"
        );
        assert!(check(&with_port("e", json!({"containerPort": 80})), &info).is_ok());
    }

    #[test]
    fn fit_error_reads_like_upstream() {
        let mut reasons = BTreeMap::new();
        reasons.insert(Reason::Insufficient("cpu".into()), 2);
        reasons.insert(Reason::NodeAffinity, 1);
        assert_eq!(
            fit_error(3, &reasons),
            "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 2 Insufficient cpu."
        );
        assert_eq!(fit_error(0, &BTreeMap::new()), "0/0 nodes are available.");
        let mut reasons = BTreeMap::new();
        reasons.insert(Reason::PodAffinity, 1);
        reasons.insert(Reason::PodAntiAffinity, 2);
        reasons.insert(Reason::ExistingPodsAntiAffinity, 3);
        assert_eq!(
            fit_error(6, &reasons),
            "0/6 nodes are available: 1 node(s) didn't match pod affinity rules, 2 node(s) \
             didn't match pod anti-affinity rules, 3 node(s) didn't satisfy existing pods \
             anti-affinity rules."
        );
    }

    #[test]
    fn inter_pod_affinity_comes_after_resource_fit() {
        let mut info = node(
            "n",
            "2",
            "4Gi",
            json!({"metadata": {"labels": {"host": "n"}}}),
        );
        info.add_pod(Arc::new(pod(
            "web-1",
            "1",
            json!({"metadata": {"labels": {"app": "web"}}}),
        )));
        let anti = |cpu: &str| {
            pod(
                "web-2",
                cpu,
                json!({"metadata": {"labels": {"app": "web"}},
                "spec": {"affinity": {"podAntiAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [
                        {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "host"}
                    ]}}}}),
            )
        };
        let nodes = [info];
        let verdict = |p: &Pod| {
            let facts = PodFacts::with_inter_pod_affinity(p, &nodes, []);
            filter(&facts, &nodes[0])
        };
        assert_eq!(verdict(&anti("500m")), Err(vec![Reason::PodAntiAffinity]));
        assert_eq!(
            verdict(&anti("2")),
            Err(vec![Reason::Insufficient("cpu".into())])
        );
        // Facts without the partition's view do not check inter-pod affinity.
        assert!(check(&anti("500m"), &nodes[0]).is_ok());
    }

    #[test]
    fn least_allocated_spreads_and_most_allocated_packs() {
        let empty = node("empty", "4", "8Gi", json!({}));
        let mut busy = node("busy", "4", "8Gi", json!({}));
        busy.add_pod(Arc::new(pod("x", "2", json!({}))));
        let request = crate::resources::pod_requests(&pod("p", "1", json!({})));
        assert!(
            score(Strategy::LeastAllocated, &request, &empty)
                > score(Strategy::LeastAllocated, &request, &busy)
        );
        assert!(
            score(Strategy::MostAllocated, &request, &busy)
                > score(Strategy::MostAllocated, &request, &empty)
        );
    }
}
