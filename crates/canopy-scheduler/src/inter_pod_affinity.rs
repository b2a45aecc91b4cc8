//! Upstream's InterPodAffinity filter for required terms
//! (`podAffinity`/`podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution`), over one
//! tenant's partition: its nodes and the pods bound or assumed on them are the only pods that
//! count, since tenants never share nodes.
//!
//! As upstream's PreFilter does, the topology domains (`topologyKey`, value) that hold
//! matching pods are found once per decision, so that each node is then checked with a few
//! hash lookups.
//!
//! Limits:
//! - The scheduler does not watch Namespaces, so a `namespaceSelector` can only be honoured
//!   when it needs no labels: `{}` means every namespace (here: every namespace of the
//!   tenant). A non-empty `namespaceSelector` adds no namespace to `namespaces`: a term with
//!   only a non-empty selector matches no pod.
//! - `matchLabelKeys`/`mismatchLabelKeys` are not read here: the API server folds them into
//!   the term's `labelSelector` when the pod is created, as upstream's does, and the scheduler
//!   matches the result.
//! - A `labelSelector` the API would reject (it validates pods on creation) matches no pod,
//!   as a null one does.

use std::collections::{HashMap, HashSet};

use canopy_api::selector::LabelSelector;
use k8s_openapi::{
    api::core::v1::{Node, Pod, PodAffinityTerm},
    apimachinery::pkg::apis::meta::v1::LabelSelector as K8sLabelSelector,
};

use crate::{filters::Reason, node_info::NodeInfo};

/// The namespaces whose pods a term looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Namespaces {
    /// `namespaceSelector: {}`: all of them (all of the tenant's, in a partition).
    All,
    /// These only.
    Listed(Vec<String>),
}

/// A required (anti-)affinity term, compiled once for the pod that carries it.
#[derive(Clone, Debug)]
pub struct AffinityTerm {
    /// `None` for a null labelSelector, which matches no pod (upstream's
    /// `LabelSelectorAsSelector(nil)`), while `{}` matches every pod.
    selector: Option<LabelSelector>,
    namespaces: Namespaces,
    topology_key: String,
}

fn namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or_default()
}

fn selector_is_empty(selector: &K8sLabelSelector) -> bool {
    selector.match_labels.as_ref().is_none_or(|l| l.is_empty())
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(|e| e.is_empty())
}

impl AffinityTerm {
    fn new(owner: &Pod, term: &PodAffinityTerm) -> Self {
        let selector = term
            .label_selector
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok())
            .and_then(|s| LabelSelector::from_json(&s).ok());
        let listed = term.namespaces.clone().unwrap_or_default();
        let namespaces = match &term.namespace_selector {
            None if listed.is_empty() => Namespaces::Listed(vec![namespace(owner).to_string()]),
            Some(s) if selector_is_empty(s) => Namespaces::All,
            // Namespace labels are unknown here: see the module's limits.
            _ => Namespaces::Listed(listed),
        };
        Self {
            selector,
            namespaces,
            topology_key: term.topology_key.clone(),
        }
    }

    /// Whether a pod is one the term is about (namespace and labels; not where it runs).
    pub fn matches(&self, pod: &Pod) -> bool {
        let Some(selector) = &self.selector else {
            return false;
        };
        let in_namespace = match &self.namespaces {
            Namespaces::All => true,
            Namespaces::Listed(names) => names.iter().any(|n| n == namespace(pod)),
        };
        in_namespace && {
            let labels = pod.metadata.labels.as_ref();
            selector.matches(|key| labels?.get(key).map(String::as_str))
        }
    }

    /// The node label that names the term's topology domains.
    pub fn topology_key(&self) -> &str {
        &self.topology_key
    }
}

fn compile(pod: &Pod, terms: Option<&Vec<PodAffinityTerm>>) -> Vec<AffinityTerm> {
    terms
        .into_iter()
        .flatten()
        .map(|term| AffinityTerm::new(pod, term))
        .collect()
}

/// A pod's required pod-affinity terms (none for most pods, at the cost of a few `None`s).
pub fn required_affinity_terms(pod: &Pod) -> Vec<AffinityTerm> {
    let terms = pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.pod_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    compile(pod, terms)
}

/// A pod's required pod-anti-affinity terms.
pub fn required_anti_affinity_terms(pod: &Pod) -> Vec<AffinityTerm> {
    let terms = pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    compile(pod, terms)
}

/// Topology domains, by key then value, so that a node's label is looked up without
/// building a pair.
#[derive(Debug, Default)]
struct Domains(HashMap<String, HashSet<String>>);

impl Domains {
    fn insert(&mut self, key: &str, value: &str) {
        let values = match self.0.get_mut(key) {
            Some(values) => values,
            None => self.0.entry(key.to_string()).or_default(),
        };
        if !values.contains(value) {
            values.insert(value.to_string());
        }
    }

    fn contains(&self, key: &str, value: &str) -> bool {
        self.0.get(key).is_some_and(|values| values.contains(value))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn node_label<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

/// What one decision knows about the pods around a pod (upstream's PreFilter state).
#[derive(Debug)]
pub struct InterPodAffinity {
    affinity: Vec<AffinityTerm>,
    anti_affinity: Vec<AffinityTerm>,
    /// Domains holding a pod that matches all of the pod's affinity terms (one domain per
    /// term, upstream's `affinityCounts`).
    affinity_domains: Domains,
    /// Domains holding a pod that matches one of the pod's anti-affinity terms.
    anti_affinity_domains: Domains,
    /// Domains holding a pod whose own required anti-affinity matches the pod.
    existing_anti_affinity_domains: Domains,
    /// Upstream's first pod of a group with affinity to itself: no pod anywhere matches its
    /// terms, and it matches them itself, so it may go wherever the topology keys exist.
    first_of_group: bool,
}

impl InterPodAffinity {
    /// The state for deciding where `pod` goes, or `None` when the filter has nothing to
    /// check: the pod has no required terms and no placed pod has required anti-affinity
    /// matching it. `nodes` is visited only for a pod with terms; `with_anti_affinity` are
    /// the nodes holding pods with required anti-affinity.
    pub fn prepare<'a>(
        pod: &Pod,
        nodes: impl IntoIterator<Item = &'a NodeInfo>,
        with_anti_affinity: impl IntoIterator<Item = &'a NodeInfo>,
    ) -> Option<Self> {
        let affinity = required_affinity_terms(pod);
        let anti_affinity = required_anti_affinity_terms(pod);
        let mut existing_anti_affinity_domains = Domains::default();
        for info in with_anti_affinity {
            for placed in info.pods.values() {
                for term in &placed.anti_affinity {
                    if let Some(value) = node_label(&info.node, &term.topology_key)
                        && term.matches(pod)
                    {
                        existing_anti_affinity_domains.insert(&term.topology_key, value);
                    }
                }
            }
        }
        if affinity.is_empty() && anti_affinity.is_empty() {
            if existing_anti_affinity_domains.is_empty() {
                return None;
            }
            return Some(Self {
                affinity,
                anti_affinity,
                affinity_domains: Domains::default(),
                anti_affinity_domains: Domains::default(),
                existing_anti_affinity_domains,
                first_of_group: false,
            });
        }
        let mut affinity_domains = Domains::default();
        let mut anti_affinity_domains = Domains::default();
        for info in nodes {
            let node = &info.node;
            // Pods on a node without any of the topology keys count in no domain.
            if !affinity
                .iter()
                .chain(&anti_affinity)
                .any(|t| node_label(node, &t.topology_key).is_some())
            {
                continue;
            }
            for placed in info.pods.values() {
                let other = &placed.pod;
                if !affinity.is_empty() && affinity.iter().all(|t| t.matches(other)) {
                    for term in &affinity {
                        if let Some(value) = node_label(node, &term.topology_key) {
                            affinity_domains.insert(&term.topology_key, value);
                        }
                    }
                }
                for term in &anti_affinity {
                    if let Some(value) = node_label(node, &term.topology_key)
                        && term.matches(other)
                    {
                        anti_affinity_domains.insert(&term.topology_key, value);
                    }
                }
            }
        }
        let first_of_group = affinity_domains.is_empty()
            && !affinity.is_empty()
            && affinity.iter().all(|t| t.matches(pod));
        Some(Self {
            affinity,
            anti_affinity,
            affinity_domains,
            anti_affinity_domains,
            existing_anti_affinity_domains,
            first_of_group,
        })
    }

    /// Upstream's Filter: affinity, then the pod's anti-affinity, then the anti-affinity of
    /// the pods already placed.
    pub fn check(&self, node: &Node) -> Result<(), Reason> {
        let mut pods_exist = true;
        for term in &self.affinity {
            // A node without a term's topology key is in no domain at all.
            let Some(value) = node_label(node, &term.topology_key) else {
                return Err(Reason::PodAffinity);
            };
            if !self.affinity_domains.contains(&term.topology_key, value) {
                pods_exist = false;
            }
        }
        if !pods_exist && !self.first_of_group {
            return Err(Reason::PodAffinity);
        }
        if !self.anti_affinity_domains.is_empty() {
            for term in &self.anti_affinity {
                if let Some(value) = node_label(node, &term.topology_key)
                    && self
                        .anti_affinity_domains
                        .contains(&term.topology_key, value)
                {
                    return Err(Reason::PodAntiAffinity);
                }
            }
        }
        for (key, values) in &self.existing_anti_affinity_domains.0 {
            if node_label(node, key).is_some_and(|value| values.contains(value)) {
                return Err(Reason::ExistingPodsAntiAffinity);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    const HOST: &str = "kubernetes.io/hostname";
    const ZONE: &str = "topology.kubernetes.io/zone";

    fn node(name: &str, zone: Option<&str>) -> NodeInfo {
        let mut labels = json!({HOST: name});
        if let Some(zone) = zone {
            labels[ZONE] = json!(zone);
        }
        NodeInfo::new(Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap(),
        ))
    }

    fn pod(name: &str, namespace: &str, labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
        }))
        .unwrap()
    }

    /// A pod with required terms: `kind` is `podAffinity` or `podAntiAffinity`.
    fn with_terms(p: Pod, kind: &str, terms: serde_json::Value) -> Pod {
        let mut value = serde_json::to_value(&p).unwrap();
        value["spec"]["affinity"] =
            json!({kind: {"requiredDuringSchedulingIgnoredDuringExecution": terms}});
        serde_json::from_value(value).unwrap()
    }

    fn term(selector: serde_json::Value, key: &str) -> serde_json::Value {
        json!({"labelSelector": selector, "topologyKey": key})
    }

    /// Which of the nodes take the pod, and why the others do not.
    fn verdicts(p: &Pod, nodes: &[NodeInfo]) -> Vec<Result<(), Reason>> {
        let anti = nodes
            .iter()
            .filter(|n| n.has_pods_with_required_anti_affinity());
        let Some(state) = InterPodAffinity::prepare(p, nodes, anti) else {
            return vec![Ok(()); nodes.len()];
        };
        nodes.iter().map(|n| state.check(&n.node)).collect()
    }

    #[test]
    fn nothing_to_check_without_terms_or_anti_affine_pods() {
        let mut nodes = vec![node("n1", None)];
        nodes[0].add_pod(Arc::new(pod("web", "t", json!({"app": "web"}))));
        let plain = pod("p", "t", json!({"app": "web"}));
        assert!(InterPodAffinity::prepare(&plain, &nodes, []).is_none());
        assert!(!nodes[0].has_pods_with_required_anti_affinity());
    }

    #[test]
    fn affinity_needs_a_matching_pod_in_the_same_domain() {
        let mut nodes = vec![
            node("n1", Some("a")),
            node("n2", Some("a")),
            node("n3", Some("b")),
            node("n4", None),
        ];
        nodes[0].add_pod(Arc::new(pod("db", "t", json!({"app": "db"}))));
        let by_zone = with_terms(
            pod("p", "t", json!({})),
            "podAffinity",
            json!([term(json!({"matchLabels": {"app": "db"}}), ZONE)]),
        );
        assert_eq!(
            verdicts(&by_zone, &nodes),
            [
                Ok(()),
                Ok(()),
                Err(Reason::PodAffinity),
                // Without the topology key a node is in no domain: affinity fails.
                Err(Reason::PodAffinity),
            ]
        );
        let by_host = with_terms(
            pod("p", "t", json!({})),
            "podAffinity",
            json!([term(
                json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["db", "cache"]}]}),
                HOST
            )]),
        );
        assert_eq!(
            verdicts(&by_host, &nodes),
            [
                Ok(()),
                Err(Reason::PodAffinity),
                Err(Reason::PodAffinity),
                Err(Reason::PodAffinity)
            ]
        );
        // Nothing matches: unsatisfiable for a pod that does not match its own term.
        let missing = with_terms(
            pod("p", "t", json!({})),
            "podAffinity",
            json!([term(json!({"matchLabels": {"app": "queue"}}), ZONE)]),
        );
        assert!(verdicts(&missing, &nodes).iter().all(Result::is_err));
        // A null labelSelector matches nothing; `{}` matches every pod.
        let null = with_terms(
            pod("p", "t", json!({})),
            "podAffinity",
            json!([{"topologyKey": HOST}]),
        );
        assert!(verdicts(&null, &nodes).iter().all(Result::is_err));
        let everything = with_terms(
            pod("p", "t", json!({})),
            "podAffinity",
            json!([term(json!({}), HOST)]),
        );
        assert_eq!(verdicts(&everything, &nodes)[0], Ok(()));
        assert_eq!(verdicts(&everything, &nodes)[1], Err(Reason::PodAffinity));
    }

    #[test]
    fn all_affinity_terms_must_match_one_pod() {
        let mut nodes = vec![node("n1", Some("a")), node("n2", Some("a"))];
        nodes[0].add_pod(Arc::new(pod("db", "t", json!({"app": "db"}))));
        nodes[1].add_pod(Arc::new(pod("cache", "t", json!({"tier": "cache"}))));
        let two_terms = json!([
            term(json!({"matchLabels": {"app": "db"}}), ZONE),
            term(json!({"matchLabels": {"tier": "cache"}}), ZONE)
        ]);
        let p = with_terms(pod("p", "t", json!({})), "podAffinity", two_terms.clone());
        // Upstream counts only pods that match every term: none here.
        assert!(verdicts(&p, &nodes).iter().all(Result::is_err));
        nodes[1].add_pod(Arc::new(pod(
            "both",
            "t",
            json!({"app": "db", "tier": "cache"}),
        )));
        assert!(verdicts(&p, &nodes).iter().all(Result::is_ok));
    }

    #[test]
    fn the_first_pod_of_a_group_may_go_anywhere_with_the_topology_key() {
        let nodes = vec![node("n1", Some("a")), node("n2", None)];
        let first = with_terms(
            pod("web-0", "t", json!({"app": "web"})),
            "podAffinity",
            json!([term(json!({"matchLabels": {"app": "web"}}), ZONE)]),
        );
        assert_eq!(verdicts(&first, &nodes), [Ok(()), Err(Reason::PodAffinity)]);
        // Once a member exists, the others must join its domain.
        let mut nodes = vec![node("n1", Some("a")), node("n2", Some("b"))];
        nodes[1].add_pod(Arc::new(pod("web-0", "t", json!({"app": "web"}))));
        let second = with_terms(
            pod("web-1", "t", json!({"app": "web"})),
            "podAffinity",
            json!([term(json!({"matchLabels": {"app": "web"}}), ZONE)]),
        );
        assert_eq!(
            verdicts(&second, &nodes),
            [Err(Reason::PodAffinity), Ok(())]
        );
    }

    #[test]
    fn anti_affinity_by_hostname_and_by_zone() {
        let mut nodes = vec![
            node("n1", Some("a")),
            node("n2", Some("a")),
            node("n3", Some("b")),
            node("n4", None),
        ];
        nodes[0].add_pod(Arc::new(pod("web-0", "t", json!({"app": "web"}))));
        let web = json!({"matchLabels": {"app": "web"}});
        let by_host = with_terms(
            pod("p", "t", json!({})),
            "podAntiAffinity",
            json!([term(web.clone(), HOST)]),
        );
        assert_eq!(
            verdicts(&by_host, &nodes),
            [Err(Reason::PodAntiAffinity), Ok(()), Ok(()), Ok(())]
        );
        let by_zone = with_terms(
            pod("p", "t", json!({})),
            "podAntiAffinity",
            json!([term(web, ZONE)]),
        );
        assert_eq!(
            verdicts(&by_zone, &nodes),
            // A node without the key is in no domain, so no matching pod shares it.
            [
                Err(Reason::PodAntiAffinity),
                Err(Reason::PodAntiAffinity),
                Ok(()),
                Ok(())
            ]
        );
    }

    #[test]
    fn placed_pods_anti_affinity_keeps_matching_pods_away() {
        let mut nodes = vec![
            node("n1", Some("a")),
            node("n2", Some("a")),
            node("n3", Some("b")),
        ];
        let loner = with_terms(
            pod("loner", "t", json!({"app": "loner"})),
            "podAntiAffinity",
            json!([term(json!({"matchLabels": {"app": "web"}}), ZONE)]),
        );
        nodes[0].add_pod(Arc::new(loner));
        assert!(nodes[0].has_pods_with_required_anti_affinity());
        // A plain pod the placed one repels: the whole zone is closed to it.
        let web = pod("web", "t", json!({"app": "web"}));
        assert_eq!(
            verdicts(&web, &nodes),
            [
                Err(Reason::ExistingPodsAntiAffinity),
                Err(Reason::ExistingPodsAntiAffinity),
                Ok(())
            ]
        );
        // Pods it does not match, or in another namespace, are not concerned.
        assert!(
            verdicts(&pod("db", "t", json!({"app": "db"})), &nodes)
                .iter()
                .all(Result::is_ok)
        );
        assert!(
            verdicts(&pod("web", "u", json!({"app": "web"})), &nodes)
                .iter()
                .all(Result::is_ok)
        );
        // Leaving lifts the rule.
        assert!(nodes[0].remove_pod("t/loner"));
        assert!(!nodes[0].has_pods_with_required_anti_affinity());
        assert!(verdicts(&web, &nodes).iter().all(Result::is_ok));
    }

    #[test]
    fn namespaces_own_listed_all_and_selector() {
        let mut nodes = vec![node("n1", None), node("n2", None)];
        nodes[0].add_pod(Arc::new(pod("web", "shop", json!({"app": "web"}))));
        let anti = |extra: serde_json::Value| {
            let mut t = term(json!({"matchLabels": {"app": "web"}}), HOST);
            for (k, v) in extra.as_object().unwrap() {
                t[k] = v.clone();
            }
            with_terms(pod("p", "blog", json!({})), "podAntiAffinity", json!([t]))
        };
        let repelled = [Err(Reason::PodAntiAffinity), Ok(())];
        let free = [Ok(()), Ok(())];
        // Own namespace by default: "blog" has no web pod.
        assert_eq!(verdicts(&anti(json!({})), &nodes), free);
        assert_eq!(
            verdicts(&anti(json!({"namespaces": ["shop"]})), &nodes),
            repelled
        );
        assert_eq!(
            verdicts(&anti(json!({"namespaces": ["blog", "news"]})), &nodes),
            free
        );
        // `{}`: every namespace of the tenant.
        assert_eq!(
            verdicts(&anti(json!({"namespaceSelector": {}})), &nodes),
            repelled
        );
        // Namespace labels are unknown: a non-empty selector adds nothing to the list.
        let labelled = json!({"matchLabels": {"team": "shop"}});
        assert_eq!(
            verdicts(&anti(json!({"namespaceSelector": labelled})), &nodes),
            free
        );
        assert_eq!(
            verdicts(
                &anti(json!({"namespaceSelector": labelled, "namespaces": ["shop"]})),
                &nodes
            ),
            repelled
        );
    }
}
