//! Node lifecycle (upstream's `node_lifecycle_controller` with taint-based eviction, and its
//! `NoExecuteTaintManager`): a node whose Lease in `kube-node-lease` and Ready heartbeat
//! stop being renewed for the grace period goes `Unknown`; nodes get the `NoSchedule` taints
//! of their conditions and the `NoExecute` taint of a Ready condition that is not True; the
//! pods of a node that is not Ready are marked not Ready; and pods on a node with `NoExecute`
//! taints are evicted once their tolerations run out.
//!
//! One key per node. A node is looked at when it, its Lease or one of its pods changes, and
//! again when its grace period or a pod's toleration would run out (`RequeueAfter`).
//! As upstream, a node's health is judged by when *this controller* saw its heartbeat or
//! Lease change, not by the timestamps the kubelet wrote, so clock skew does not matter.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::future::BoxFuture;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Node, NodeCondition, Pod, PodCondition, Taint, Toleration},
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
};
use parking_lot::Mutex;
use serde_json::json;

use crate::{
    events::Recorder,
    informer::{Change, ObjectKey},
    manager::Context,
    queue::{Lane, WorkQueue},
    util::not_found,
    worker::{Outcome, run_workers},
};

/// The namespace of node Leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// Taint of a node whose Ready condition is False.
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
/// Taint of a node whose Ready condition is Unknown.
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
/// Taint of a node marked unschedulable.
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";
/// Nodes with this label do not count towards the disruption check.
pub const EXCLUDE_DISRUPTION_LABEL: &str = "node.kubernetes.io/exclude-disruption";
/// Grace period of a node that never posted a Ready condition (upstream's
/// `--node-startup-grace-period` default).
pub const NODE_STARTUP_GRACE_PERIOD: Duration = Duration::from_secs(60);

/// The conditions set to Unknown when a node stops reporting (not NetworkUnavailable,
/// which the control plane manages).
const MONITORED_CONDITIONS: [&str; 4] = ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"];

/// The NoSchedule taint each condition status calls for (upstream's
/// `nodeConditionToTaintKeyStatusMap`).
const CONDITION_TAINTS: [(&str, &str, &str); 6] = [
    ("Ready", "False", NOT_READY_TAINT),
    ("Ready", "Unknown", UNREACHABLE_TAINT),
    (
        "MemoryPressure",
        "True",
        "node.kubernetes.io/memory-pressure",
    ),
    ("DiskPressure", "True", "node.kubernetes.io/disk-pressure"),
    (
        "NetworkUnavailable",
        "True",
        "node.kubernetes.io/network-unavailable",
    ),
    ("PIDPressure", "True", "node.kubernetes.io/pid-pressure"),
];

const POD_NODE_INDEX: &str = "nodelifecycle.nodeName";

/// Errors of the node lifecycle controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("API call failed: {0}")]
    Api(#[from] kube::Error),
}

/// What the controller last saw of a node's heartbeats (upstream's `nodeHealthData`).
#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    /// The Ready condition as last seen: heartbeat and transition times; `None` if none.
    pub ready: Option<(Option<Timestamp>, Option<Timestamp>)>,
    /// The Lease's renewTime as last seen.
    pub lease_renewed: Option<Timestamp>,
    /// When the controller last saw the node alive.
    pub probe: Timestamp,
    /// When the controller last saw the Ready condition change.
    pub ready_transition: Timestamp,
}

fn condition<'a>(node: &'a Node, type_: &str) -> Option<&'a NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// The status of the node's Ready condition, if it has one.
pub fn ready_status(node: &Node) -> Option<&str> {
    condition(node, "Ready").map(|c| c.status.as_str())
}

fn creation(node: &Node, now: Timestamp) -> Timestamp {
    node.metadata
        .creation_timestamp
        .as_ref()
        .map_or(now, |t| t.0)
}

/// The node's health after looking at it and its Lease at `now`, and the grace period it is
/// entitled to (upstream's `tryUpdateNodeHealth`, before any write).
pub fn observe_health(
    saved: Option<&Health>,
    node: &Node,
    lease: Option<&Lease>,
    now: Timestamp,
    grace: Duration,
) -> (Health, Duration) {
    let current = condition(node, "Ready").map(|c| {
        (
            c.last_heartbeat_time.as_ref().map(|t| t.0),
            c.last_transition_time.as_ref().map(|t| t.0),
        )
    });
    let grace = if current.is_none() {
        NODE_STARTUP_GRACE_PERIOD
    } else {
        grace
    };
    let fresh = |lease_renewed| Health {
        ready: current,
        lease_renewed,
        probe: now,
        ready_transition: now,
    };
    let mut health = match (saved, current) {
        // Never reported: it has had since its creation.
        (None, None) => Health {
            ready: None,
            lease_renewed: None,
            probe: creation(node, now),
            ready_transition: creation(node, now),
        },
        (None, Some(_)) => fresh(None),
        (Some(saved), None) if saved.ready.is_some() => fresh(saved.lease_renewed),
        (Some(saved), None) => saved.clone(),
        (Some(saved), Some(_)) if saved.ready.is_none() => fresh(saved.lease_renewed),
        (Some(saved), Some((heartbeat, transition))) => {
            let (saved_heartbeat, saved_transition) = saved.ready.unwrap_or_default();
            if saved_heartbeat != heartbeat {
                Health {
                    ready: current,
                    lease_renewed: saved.lease_renewed,
                    probe: now,
                    ready_transition: if saved_transition != transition {
                        now
                    } else {
                        saved.ready_transition
                    },
                }
            } else {
                saved.clone()
            }
        }
    };
    // A renewed Lease is a heartbeat too: a kubelet that renews its Lease but never posts
    // its status is taken as healthy, as upstream.
    let renewed = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0);
    if let Some(renewed) = renewed
        && saved
            .and_then(|s| s.lease_renewed)
            .is_none_or(|seen| seen < renewed)
    {
        health.lease_renewed = Some(renewed);
        health.probe = now;
    }
    (health, grace)
}

/// When a node whose health is `health` runs out of grace.
pub fn expires_at(health: &Health, grace: Duration) -> Timestamp {
    health
        .probe
        .checked_add(SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

/// The node's conditions after it stopped reporting: the monitored ones set to Unknown.
/// `None` when the Ready condition is already Unknown (nothing to write, as upstream).
pub fn unknown_conditions(node: &Node, now: Timestamp) -> Option<Vec<NodeCondition>> {
    let mut conditions = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let before = conditions.iter().find(|c| c.type_ == "Ready").cloned();
    for type_ in MONITORED_CONDITIONS {
        match conditions.iter_mut().find(|c| c.type_ == type_) {
            None => conditions.push(NodeCondition {
                type_: type_.to_string(),
                status: "Unknown".into(),
                reason: Some("NodeStatusNeverUpdated".into()),
                message: Some("Kubelet never posted node status.".into()),
                last_heartbeat_time: node.metadata.creation_timestamp.clone(),
                last_transition_time: Some(Time(now)),
            }),
            Some(c) if c.status != "Unknown" => {
                c.status = "Unknown".into();
                c.reason = Some("NodeStatusUnknown".into());
                c.message = Some("Kubelet stopped posting node status.".into());
                c.last_transition_time = Some(Time(now));
            }
            Some(_) => {}
        }
    }
    let after = conditions.iter().find(|c| c.type_ == "Ready").cloned();
    (before != after).then_some(conditions)
}

/// The node's taints as they should be: the NoSchedule taints of its conditions and
/// `spec.unschedulable` (upstream's `doNoScheduleTaintingPass`), and the NoExecute taint of
/// a Ready condition that is False or Unknown (`processTaintBaseEviction`), none while every
/// node is down (`disrupted`: the control plane, not the nodes, is likely the problem).
/// Other taints are kept as they are.
pub fn desired_taints(node: &Node, disrupted: bool, now: Timestamp) -> Vec<Taint> {
    let current = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let status_of = |type_: &str| condition(node, type_).map(|c| c.status.as_str());
    let mut no_schedule: Vec<&str> = CONDITION_TAINTS
        .iter()
        .filter(|(type_, status, _)| status_of(type_) == Some(*status))
        .map(|(_, _, key)| *key)
        .collect();
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        no_schedule.push(UNSCHEDULABLE_TAINT);
    }
    let managed_no_schedule = |key: &str| {
        key == UNSCHEDULABLE_TAINT || CONDITION_TAINTS.iter().any(|(_, _, k)| *k == key)
    };
    // Without a Ready condition the NoExecute taints are left as they are.
    let no_execute: Option<Option<&str>> = match (ready_status(node), disrupted) {
        (None, false) => None,
        (_, true) | (Some("True"), _) => Some(None),
        (Some("False"), _) => Some(Some(NOT_READY_TAINT)),
        (Some(_), _) => Some(Some(UNREACHABLE_TAINT)),
    };
    let mut taints: Vec<Taint> = current
        .into_iter()
        .filter(|t| match t.effect.as_str() {
            "NoSchedule" => !managed_no_schedule(&t.key) || no_schedule.contains(&t.key.as_str()),
            "NoExecute" => match no_execute {
                Some(wanted) => {
                    !(t.key == NOT_READY_TAINT || t.key == UNREACHABLE_TAINT)
                        || wanted == Some(t.key.as_str())
                }
                None => true,
            },
            _ => true,
        })
        .collect();
    for key in no_schedule {
        if !taints
            .iter()
            .any(|t| t.key == key && t.effect == "NoSchedule")
        {
            taints.push(Taint {
                key: key.to_string(),
                effect: "NoSchedule".into(),
                value: None,
                time_added: None,
            });
        }
    }
    if let Some(Some(key)) = no_execute
        && !taints
            .iter()
            .any(|t| t.key == key && t.effect == "NoExecute")
    {
        taints.push(Taint {
            key: key.to_string(),
            effect: "NoExecute".into(),
            value: None,
            time_added: Some(Time(now)),
        });
    }
    taints
}

/// Whether a toleration tolerates a taint (upstream's `ToleratesTaint`).
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = toleration.effect.as_deref().filter(|e| !e.is_empty())
        && effect != taint.effect
    {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "Equal" | "" => {
            toleration.value.as_deref().unwrap_or_default()
                == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

/// When a pod on a node with these NoExecute taints is to be evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Never: no NoExecute taint, or every one tolerated forever.
    Never,
    /// At once: a taint is not tolerated.
    Now,
    /// Once it has been on the tainted node this long.
    After(Duration),
}

/// The eviction of a pod with `tolerations` on a node with `taints` (upstream's taint
/// manager: the first toleration matching each taint is used, and the shortest
/// `tolerationSeconds` among them wins). A pod without a toleration for the not-ready or
/// unreachable taint tolerates it for `default_timeout`, as the `DefaultTolerationSeconds`
/// admission plugin would have given it.
pub fn eviction(
    tolerations: &[Toleration],
    taints: &[Taint],
    default_timeout: Duration,
) -> Eviction {
    let default_seconds = i64::try_from(default_timeout.as_secs()).unwrap_or(i64::MAX);
    let mut min: Option<i64> = None;
    for taint in taints.iter().filter(|t| t.effect == "NoExecute") {
        let seconds = match tolerations.iter().find(|t| tolerates(t, taint)) {
            Some(toleration) => toleration.toleration_seconds,
            None if taint.key == NOT_READY_TAINT || taint.key == UNREACHABLE_TAINT => {
                Some(default_seconds)
            }
            None => return Eviction::Now,
        };
        if let Some(seconds) = seconds {
            min = Some(min.map_or(seconds, |m| m.min(seconds)));
        }
    }
    match min {
        None => Eviction::Never,
        Some(s) if s <= 0 => Eviction::Now,
        Some(s) => Eviction::After(Duration::from_secs(s.unsigned_abs())),
    }
}

/// Whether every node is down (upstream's "master disruption mode", all zones in full
/// disruption): then no node is NoExecute-tainted, since the fault is likely on this side.
pub fn all_disrupted<'a>(ready: impl IntoIterator<Item = Option<&'a str>>) -> bool {
    let mut any = false;
    for status in ready {
        if status == Some("True") {
            return false;
        }
        any = true;
    }
    any
}

struct Controller {
    ctx: Arc<Context>,
    queue: WorkQueue<String>,
    health: Mutex<HashMap<String, Health>>,
    /// Pods (by uid) waiting out a toleration: since when.
    evictions: Mutex<HashMap<String, Timestamp>>,
    /// Pods (by uid) bound to each node since it was last looked at.
    newly_bound: Mutex<HashMap<String, HashSet<String>>>,
    disrupted: Mutex<bool>,
    events: Recorder,
    eviction_events: Recorder,
}

/// Registers the controller's handlers and returns its workers.
pub fn start(ctx: &Arc<Context>) -> BoxFuture<'static, ()> {
    let controller = Arc::new(Controller {
        ctx: ctx.clone(),
        queue: ctx.queue("nodelifecycle"),
        health: Mutex::new(HashMap::new()),
        evictions: Mutex::new(HashMap::new()),
        newly_bound: Mutex::new(HashMap::new()),
        disrupted: Mutex::new(false),
        events: ctx.events.recorder("node-controller"),
        eviction_events: ctx.events.recorder("taint-eviction-controller"),
    });
    let informers = &ctx.informers;
    informers.pods.add_index(POD_NODE_INDEX, |pod: &Pod| {
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty())
            .into_iter()
            .collect()
    });
    {
        let queue = controller.queue.clone();
        informers.nodes.add_handler(move |change| {
            queue.add(change.object().name_any(), change.lane());
        });
    }
    {
        let queue = controller.queue.clone();
        informers.node_leases.add_handler(move |change| {
            if change.object().namespace().as_deref() == Some(NODE_LEASE_NAMESPACE) {
                queue.add(change.object().name_any(), change.lane());
            }
        });
    }
    {
        let controller = controller.clone();
        informers.pods.add_handler(move |change| {
            let node_of = |pod: &Pod| pod.spec.as_ref().and_then(|s| s.node_name.clone());
            let tolerations_of = |pod: &Pod| pod.spec.as_ref().and_then(|s| s.tolerations.clone());
            match change {
                // A pod bound to a node may have to be marked not Ready (upstream's
                // `processPod`) or evicted; one whose tolerations changed, evicted.
                Change::Add(pod) => {
                    if let Some(node) = node_of(pod) {
                        controller.bound(&node, pod);
                        controller.queue.add(node, change.lane());
                    }
                }
                Change::Update { old, new } => {
                    if let Some(node) = node_of(new) {
                        let rebound = node_of(old) != node_of(new);
                        if rebound {
                            controller.bound(&node, new);
                        }
                        if rebound || tolerations_of(old) != tolerations_of(new) {
                            controller.queue.add(node, change.lane());
                        }
                    }
                }
                Change::Delete(pod) => {
                    if let Some(uid) = pod.uid() {
                        controller.evictions.lock().remove(&uid);
                    }
                }
                Change::Sync(_) => {}
            }
        });
    }
    let nodes = informers.nodes.clone();
    let leases = informers.node_leases.clone();
    let pods = informers.pods.clone();
    Box::pin(async move {
        nodes.wait_synced().await;
        leases.wait_synced().await;
        pods.wait_synced().await;
        let workers = controller.ctx.config.workers;
        let queue = controller.queue.clone();
        run_workers(queue, workers, move |name: String| {
            let controller = controller.clone();
            async move { controller.sync(&name).await }
        })
        .await;
    })
}

impl Controller {
    fn client(&self) -> &Client {
        &self.ctx.client
    }

    async fn sync(&self, name: &str) -> Result<Outcome, Error> {
        let informers = &self.ctx.informers;
        let Some(cached) = informers.nodes.get(&ObjectKey::cluster(name)) else {
            self.health.lock().remove(name);
            self.newly_bound.lock().remove(name);
            return Ok(Outcome::Done);
        };
        let now = Timestamp::now();
        let lease = informers
            .node_leases
            .get(&ObjectKey::new(NODE_LEASE_NAMESPACE, name));
        let (health, grace) = {
            let mut map = self.health.lock();
            if !map.contains_key(name) {
                self.events.normal(
                    cached.as_ref(),
                    "RegisteredNode",
                    format!("Node {name} event: Registered Node {name} in Controller"),
                );
            }
            let (health, grace) = observe_health(
                map.get(name),
                &cached,
                lease.as_deref(),
                now,
                self.ctx.config.node_monitor_grace_period,
            );
            map.insert(name.to_string(), health.clone());
            (health, grace)
        };
        let mut node = (*cached).clone();
        let mut next: Option<Duration> = None;
        let expires = expires_at(&health, grace);
        if now > expires {
            if let Some(conditions) = unknown_conditions(&node, now) {
                tracing::info!(
                    node = name,
                    "node stopped posting its status; marking it Unknown"
                );
                let was_ready = ready_status(&node) == Some("True");
                node.status.get_or_insert_default().conditions = Some(conditions);
                let api: Api<Node> = Api::all(self.client().clone());
                node = api
                    .replace_status(name, &PostParams::default(), &node)
                    .await?;
                if was_ready {
                    self.events.normal(
                        &node,
                        "NodeNotReady",
                        format!("Node {name} status is now: NodeNotReady"),
                    );
                }
                let mut map = self.health.lock();
                if let Some(h) = map.get_mut(name) {
                    let ready = condition(&node, "Ready").map(|c| {
                        (
                            c.last_heartbeat_time.as_ref().map(|t| t.0),
                            c.last_transition_time.as_ref().map(|t| t.0),
                        )
                    });
                    h.ready = ready;
                    h.ready_transition = now;
                }
            }
        } else {
            // Look again when the grace period would run out without a heartbeat.
            next = Some(duration_until(now, expires) + Duration::from_millis(10));
        }

        let disrupted = self.disruption(&node);
        let taints = desired_taints(&node, disrupted, now);
        let current = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        if taints != current {
            tracing::info!(node = name, ready = ?ready_status(&node), taints = ?taints.iter().map(|t| format!("{}:{}", t.key, t.effect)).collect::<Vec<_>>(), "updating node taints");
            let patch = json!({
                "metadata": {"resourceVersion": node.metadata.resource_version},
                "spec": {"taints": if taints.is_empty() { serde_json::Value::Null } else { serde_json::to_value(&taints).unwrap_or_default() }},
            });
            let api: Api<Node> = Api::all(self.client().clone());
            node = api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }

        let pods: Vec<Arc<Pod>> = informers
            .pods
            .by_index(POD_NODE_INDEX, name)
            .into_iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name))
            .collect();
        // Upstream's MarkPodsNotReady. While the node is Unknown nobody reports its pods'
        // readiness, so all of them are marked (which also covers a transition missed across
        // a restart); while it is NotReady its kubelet still does, so only pods bound to it
        // since are.
        let newly_bound = self.newly_bound.lock().remove(name).unwrap_or_default();
        let ready = ready_status(&node);
        if ready.is_some_and(|s| s != "True") {
            for pod in &pods {
                let is_new = pod.uid().is_some_and(|uid| newly_bound.contains(&uid));
                if (ready == Some("Unknown") || is_new)
                    && let Err(err) = self.mark_pod_not_ready(pod, now).await
                {
                    // Retried with the node: the pods bound since must still be looked at.
                    self.newly_bound
                        .lock()
                        .entry(name.to_string())
                        .or_default()
                        .extend(newly_bound);
                    return Err(err);
                }
            }
        }

        let no_execute: Vec<Taint> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.effect == "NoExecute")
            .collect();
        for pod in &pods {
            let Some(uid) = pod.uid() else { continue };
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let tolerations = pod
                .spec
                .as_ref()
                .and_then(|s| s.tolerations.clone())
                .unwrap_or_default();
            let decision = eviction(
                &tolerations,
                &no_execute,
                self.ctx.config.pod_eviction_timeout,
            );
            let due = match decision {
                Eviction::Never => {
                    self.evictions.lock().remove(&uid);
                    continue;
                }
                Eviction::Now => true,
                Eviction::After(after) => {
                    let since = *self.evictions.lock().entry(uid.clone()).or_insert(now);
                    let at = since
                        .checked_add(SignedDuration::try_from(after).unwrap_or(SignedDuration::MAX))
                        .unwrap_or(Timestamp::MAX);
                    if now >= at {
                        true
                    } else {
                        let wait = duration_until(now, at) + Duration::from_millis(10);
                        next = Some(next.map_or(wait, |n| n.min(wait)));
                        false
                    }
                }
            };
            if due {
                self.evict(pod, now).await?;
                self.evictions.lock().remove(&uid);
            }
        }
        Ok(next.map_or(Outcome::Done, Outcome::RequeueAfter))
    }

    fn bound(&self, node: &str, pod: &Pod) {
        if let Some(uid) = pod.uid() {
            self.newly_bound
                .lock()
                .entry(node.to_string())
                .or_default()
                .insert(uid);
        }
    }

    /// Whether every node is down, counting `node` as it is now; entering or leaving that
    /// state has every node looked at again.
    fn disruption(&self, node: &Node) -> bool {
        let nodes = self.ctx.informers.nodes.list();
        let name = node.name_any();
        let counted = |n: &Node| !n.labels().contains_key(EXCLUDE_DISRUPTION_LABEL);
        let mut statuses: Vec<Option<String>> = nodes
            .iter()
            .filter(|n| n.name_any() != name && counted(n))
            .map(|n| ready_status(n).map(str::to_string))
            .collect();
        if counted(node) {
            statuses.push(ready_status(node).map(str::to_string));
        }
        let disrupted = all_disrupted(statuses.iter().map(|s| s.as_deref()));
        let changed = {
            let mut state = self.disrupted.lock();
            let changed = *state != disrupted;
            *state = disrupted;
            changed
        };
        if changed {
            if disrupted {
                tracing::warn!(
                    "every node is not Ready: entering disruption mode, no NoExecute taints"
                );
            } else {
                tracing::info!("some node is Ready again: leaving disruption mode");
                // Nodes get a fresh grace period, as upstream, rather than being tainted at
                // once for heartbeats missed while the control plane was cut off.
                let now = Timestamp::now();
                for health in self.health.lock().values_mut() {
                    health.probe = now;
                    health.ready_transition = now;
                }
            }
            for n in &nodes {
                if n.name_any() != name {
                    self.queue.add(n.name_any(), Lane::Update);
                }
            }
        }
        disrupted
    }

    /// Upstream's `MarkPodsNotReady`: the pod's Ready condition becomes False.
    async fn mark_pod_not_ready(&self, pod: &Pod, now: Timestamp) -> Result<(), Error> {
        let mut pod = pod.clone();
        let Some(ready) = pod
            .status
            .as_mut()
            .and_then(|s| s.conditions.as_mut())
            .and_then(|c| c.iter_mut().find(|c| c.type_ == "Ready"))
        else {
            return Ok(());
        };
        if ready.status == "False" {
            return Ok(());
        }
        ready.status = "False".into();
        ready.last_transition_time = Some(Time(now));
        let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        tracing::info!(pod = %format!("{namespace}/{name}"), node = ?pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), "node is not Ready; marking pod not Ready");
        let api: Api<Pod> = Api::namespaced(self.client().clone(), &namespace);
        match api
            .replace_status(&name, &PostParams::default(), &pod)
            .await
        {
            Ok(_) => {
                self.events
                    .warning(&pod, "NodeNotReady", "Node is not ready");
                Ok(())
            }
            Err(err) if not_found(&err) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// Evicts a pod as the taint manager does: a DisruptionTarget condition, then a delete.
    async fn evict(&self, pod: &Pod, now: Timestamp) -> Result<(), Error> {
        let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        tracing::info!(pod = %format!("{namespace}/{name}"), "evicting pod from a node with a NoExecute taint it does not tolerate (any longer)");
        let api: Api<Pod> = Api::namespaced(self.client().clone(), &namespace);
        let mut updated = pod.clone();
        let conditions = updated
            .status
            .get_or_insert_default()
            .conditions
            .get_or_insert_default();
        let disruption = PodCondition {
            type_: "DisruptionTarget".into(),
            status: "True".into(),
            reason: Some("DeletionByTaintManager".into()),
            message: Some("Taint manager: deleting due to NoExecute taint".into()),
            last_transition_time: Some(Time(now)),
            ..Default::default()
        };
        match conditions
            .iter_mut()
            .find(|c| c.type_ == "DisruptionTarget")
        {
            Some(c) if c.status == "True" => {}
            Some(c) => *c = disruption,
            None => conditions.push(disruption),
        }
        if &updated != pod {
            match api
                .replace_status(&name, &PostParams::default(), &updated)
                .await
            {
                Ok(_) => {}
                Err(err) if not_found(&err) => return Ok(()),
                Err(err) => return Err(err.into()),
            }
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        self.eviction_events.normal(
            pod,
            "TaintManagerEviction",
            format!("Marking for deletion Pod {namespace}/{name}"),
        );
        match api.delete(&name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
            Err(err) => Err(err.into()),
        }
    }
}

fn duration_until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            coordination::v1::LeaseSpec,
            core::v1::{NodeSpec, NodeStatus},
        },
        apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    };

    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    fn node(ready: Option<(&str, i64)>, taints: Vec<Taint>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n".into()),
                creation_timestamp: Some(Time(at(0))),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: (!taints.is_empty()).then_some(taints),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                conditions: ready.map(|(status, heartbeat)| {
                    vec![NodeCondition {
                        type_: "Ready".into(),
                        status: status.into(),
                        last_heartbeat_time: Some(Time(at(heartbeat))),
                        last_transition_time: Some(Time(at(0))),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
        }
    }

    fn lease(renewed: i64) -> Lease {
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(at(renewed))),
                ..Default::default()
            }),
        }
    }

    const GRACE: Duration = Duration::from_secs(40);

    #[test]
    fn health_follows_the_lease_and_the_heartbeat_as_seen_locally() {
        let n = node(Some(("True", 5)), vec![]);
        let (h, grace) = observe_health(None, &n, Some(&lease(5)), at(10), GRACE);
        assert_eq!(grace, GRACE);
        assert_eq!(h.probe, at(10));
        // Nothing renewed: the probe time stays, and the node expires 40 s after it.
        let (h2, _) = observe_health(Some(&h), &n, Some(&lease(5)), at(30), GRACE);
        assert_eq!(h2.probe, at(10));
        assert_eq!(expires_at(&h2, grace), at(50));
        // The Lease renewed: seen alive now.
        let (h3, _) = observe_health(Some(&h2), &n, Some(&lease(29)), at(31), GRACE);
        assert_eq!(h3.probe, at(31));
        // A new heartbeat alone does it too.
        let n2 = node(Some(("True", 40)), vec![]);
        let (h4, _) = observe_health(Some(&h3), &n2, Some(&lease(29)), at(45), GRACE);
        assert_eq!(h4.probe, at(45));
    }

    #[test]
    fn a_node_that_never_reported_gets_the_startup_grace_from_its_creation() {
        let n = node(None, vec![]);
        let (h, grace) = observe_health(None, &n, None, at(10), GRACE);
        assert_eq!(grace, NODE_STARTUP_GRACE_PERIOD);
        assert_eq!(h.probe, at(0));
    }

    #[test]
    fn stopped_nodes_go_unknown_once() {
        let n = node(Some(("True", 5)), vec![]);
        let conditions = unknown_conditions(&n, at(60)).unwrap();
        let ready = conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "Unknown");
        assert_eq!(ready.reason.as_deref(), Some("NodeStatusUnknown"));
        assert_eq!(
            ready.message.as_deref(),
            Some("Kubelet stopped posting node status.")
        );
        let never = conditions
            .iter()
            .find(|c| c.type_ == "PIDPressure")
            .unwrap();
        assert_eq!(never.reason.as_deref(), Some("NodeStatusNeverUpdated"));
        let mut unknown = n.clone();
        unknown.status.as_mut().unwrap().conditions = Some(conditions);
        assert!(unknown_conditions(&unknown, at(70)).is_none());
    }

    fn keys(taints: &[Taint]) -> Vec<String> {
        let mut k: Vec<String> = taints
            .iter()
            .map(|t| format!("{}:{}", t.key, t.effect))
            .collect();
        k.sort();
        k
    }

    #[test]
    fn taints_follow_the_ready_condition() {
        let unknown = node(Some(("Unknown", 0)), vec![]);
        let taints = desired_taints(&unknown, false, at(1));
        assert_eq!(
            keys(&taints),
            vec![
                format!("{UNREACHABLE_TAINT}:NoExecute"),
                format!("{UNREACHABLE_TAINT}:NoSchedule")
            ]
        );
        assert!(
            taints
                .iter()
                .any(|t| t.effect == "NoExecute" && t.time_added == Some(Time(at(1))))
        );
        // Not ready: the not-ready taints replace the unreachable ones.
        let not_ready = node(Some(("False", 0)), taints.clone());
        assert_eq!(
            keys(&desired_taints(&not_ready, false, at(2))),
            vec![
                format!("{NOT_READY_TAINT}:NoExecute"),
                format!("{NOT_READY_TAINT}:NoSchedule")
            ]
        );
        // Ready again: they go, other taints stay.
        let mut kept = taints.clone();
        kept.push(Taint {
            key: "dedicated".into(),
            effect: "NoExecute".into(),
            ..Default::default()
        });
        let ready = node(Some(("True", 0)), kept);
        assert_eq!(
            keys(&desired_taints(&ready, false, at(3))),
            vec!["dedicated:NoExecute"]
        );
        // Every node down: no NoExecute taint.
        assert_eq!(
            keys(&desired_taints(&unknown, true, at(1))),
            vec![format!("{UNREACHABLE_TAINT}:NoSchedule")]
        );
        // The taint's time is kept on later passes.
        let tainted = node(Some(("Unknown", 0)), taints.clone());
        assert_eq!(desired_taints(&tainted, false, at(9)), taints);
    }

    fn toleration(key: &str, seconds: Option<i64>) -> Toleration {
        Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: seconds,
            value: None,
        }
    }

    fn no_execute(key: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: "NoExecute".into(),
            ..Default::default()
        }
    }

    #[test]
    fn evictions_follow_tolerations() {
        let timeout = Duration::from_secs(300);
        let unreachable = [no_execute(UNREACHABLE_TAINT)];
        assert_eq!(eviction(&[], &[], timeout), Eviction::Never);
        assert_eq!(
            eviction(&[], &unreachable, timeout),
            Eviction::After(timeout)
        );
        assert_eq!(
            eviction(
                &[toleration(UNREACHABLE_TAINT, Some(5))],
                &unreachable,
                timeout
            ),
            Eviction::After(Duration::from_secs(5))
        );
        assert_eq!(
            eviction(
                &[toleration(UNREACHABLE_TAINT, None)],
                &unreachable,
                timeout
            ),
            Eviction::Never
        );
        assert_eq!(
            eviction(
                &[toleration(UNREACHABLE_TAINT, Some(0))],
                &unreachable,
                timeout
            ),
            Eviction::Now
        );
        // A taint nobody tolerates: at once.
        let other = [no_execute(UNREACHABLE_TAINT), no_execute("dedicated")];
        assert_eq!(
            eviction(&[toleration(UNREACHABLE_TAINT, None)], &other, timeout),
            Eviction::Now
        );
        // The shortest toleration wins.
        let both = [
            toleration(UNREACHABLE_TAINT, Some(50)),
            toleration("dedicated", Some(7)),
        ];
        assert_eq!(
            eviction(&both, &other, timeout),
            Eviction::After(Duration::from_secs(7))
        );
        // An Exists toleration without a key tolerates everything, forever.
        let all = Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        };
        assert_eq!(eviction(&[all], &other, timeout), Eviction::Never);
    }

    #[test]
    fn disruption_is_every_node_down() {
        assert!(!all_disrupted([]));
        assert!(all_disrupted([Some("Unknown"), Some("False"), None]));
        assert!(!all_disrupted([Some("Unknown"), Some("True")]));
    }
}
