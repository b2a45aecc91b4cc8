//! Endpoints (upstream's `pkg/controller/endpoint`): for every Service with a selector, an
//! Endpoints object of the same name listing the selected pods' addresses, grouped by the
//! ports they serve, ready pods apart from not-ready ones.
//!
//! The pieces the EndpointSlice controller shares (which services a pod change concerns,
//! which pods count, how a service port resolves in a pod, the trigger-time tracker) live
//! here too, as upstream's `endpointslice/util` serves both controllers.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use futures::future::BoxFuture;
use k8s_openapi::{
    api::core::v1::{
        EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service,
        ServicePort,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, PostParams},
};
use parking_lot::Mutex;

use crate::{
    events::Recorder,
    informer::{Change, Informer, ObjectKey},
    manager::Context,
    queue::{Lane, WorkQueue},
    util::{namespace_terminating, not_found, pod_ready, pod_terminal},
    worker::{Outcome, run_workers},
};

/// When the change that caused the current Endpoints (or EndpointSlice) content happened.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Set when the Endpoints hold only part of the addresses.
pub const OVER_CAPACITY: &str = "endpoints.kubernetes.io/over-capacity";
/// On Endpoints and EndpointSlices of services without a cluster IP.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Leader-election records once kept in Endpoints; never treated as leftovers.
const LEADER_ANNOTATION: &str = "control-plane.alpha.kubernetes.io/leader";
/// Most addresses one Endpoints object holds; the rest are left to EndpointSlices.
pub const MAX_CAPACITY: usize = 1000;

/// Errors of the Endpoints controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("API call failed: {0}")]
    Api(#[from] kube::Error),
    /// The cache still shows a version this controller has already replaced.
    #[error("endpoints informer cache is out of date: resource version {0} already processed")]
    Stale(String),
}

// ---------------------------------------------------------------------------------------
// Shared with the EndpointSlice controller.

/// The service's selector when it manages endpoints: upstream leaves services without a
/// selector (their endpoints are written by someone else) and ExternalName services alone.
/// An empty selector is upstream's nil one: it never survives storage there.
pub(crate) fn managed_selector(service: &Service) -> Option<&BTreeMap<String, String>> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    spec.selector.as_ref().filter(|s| !s.is_empty())
}

/// Whether a service's selector (a set of labels, not a LabelSelector) selects `labels`.
fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The pods of the cache a service selects.
pub(crate) fn selected_pods(pods: &Informer<Pod>, service: &Service) -> Vec<Arc<Pod>> {
    let Some(selector) = managed_selector(service) else {
        return Vec::new();
    };
    let mut selected: Vec<Arc<Pod>> = pods
        .in_namespace(service.namespace().as_deref().unwrap_or(""))
        .into_iter()
        .filter(|pod| selector_matches(selector, pod.labels()))
        .collect();
    selected.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    selected
}

/// The services (keys) whose selector selects `pod`: upstream's `GetPodServiceMemberships`.
fn service_memberships(services: &Informer<Service>, pod: &Pod) -> BTreeSet<ObjectKey> {
    let namespace = pod.namespace().unwrap_or_default();
    services
        .in_namespace(&namespace)
        .into_iter()
        .filter(|svc| {
            svc.spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .is_some_and(|sel| !sel.is_empty() && selector_matches(sel, pod.labels()))
        })
        .map(|svc| ObjectKey::of(svc.as_ref()))
        .collect()
}

/// The pod's IPs, `podIPs` or else `podIP` (the API server fills one from the other).
pub(crate) fn pod_ips(pod: &Pod) -> Vec<&str> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let ips: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ip.ip.as_str())
        .filter(|ip| !ip.is_empty())
        .collect();
    if !ips.is_empty() {
        return ips;
    }
    status
        .pod_ip
        .as_deref()
        .filter(|ip| !ip.is_empty())
        .into_iter()
        .collect()
}

/// The node a pod is bound to, if any.
pub(crate) fn pod_node_name(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
}

/// An endpoint's `targetRef` to its pod.
pub(crate) fn pod_reference(pod: &Pod) -> ObjectReference {
    ObjectReference {
        kind: Some("Pod".into()),
        namespace: pod.metadata.namespace.clone(),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone(),
        ..Default::default()
    }
}

/// Whether an address is an IPv6 one (upstream's `utilnet.IsIPv6String`).
pub(crate) fn is_ipv6(ip: &str) -> bool {
    ip.parse::<std::net::Ipv6Addr>().is_ok()
}

/// Upstream's `ShouldPodBeInEndpoints`: finished pods and pods without an IP never are;
/// pods being deleted only when `include_terminating`.
pub(crate) fn should_pod_be_in_endpoints(pod: &Pod, include_terminating: bool) -> bool {
    !pod_terminal(pod)
        && !pod_ips(pod).is_empty()
        && (include_terminating || pod.metadata.deletion_timestamp.is_none())
}

/// Upstream's `ShouldSetHostname`: a pod names itself in a headless service's DNS when its
/// subdomain is the service.
pub(crate) fn hostname_for(pod: &Pod, service: &Service) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let hostname = spec.hostname.as_deref().filter(|h| !h.is_empty())?;
    (spec.subdomain.as_deref() == service.metadata.name.as_deref()
        && pod.metadata.namespace == service.metadata.namespace)
        .then(|| hostname.to_string())
}

fn protocol(p: Option<&str>) -> &str {
    p.unwrap_or("TCP")
}

/// The port a service port reaches in `pod` (upstream's `podutil.FindPort`): a number as is,
/// a name looked up among the containers' ports (and sidecars') of the same protocol.
pub fn find_port(pod: &Pod, port: &ServicePort) -> Option<i32> {
    match port.target_port.as_ref() {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            let spec = pod.spec.as_ref()?;
            let sidecars = spec
                .init_containers
                .iter()
                .flatten()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"));
            spec.containers
                .iter()
                .chain(sidecars)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && protocol(p.protocol.as_deref()) == protocol(port.protocol.as_deref())
                })
                .map(|p| p.container_port)
        }
    }
}

/// Whether the service has a cluster IP (upstream's `IsServiceIPSet`); the others are
/// headless.
pub(crate) fn service_ip_set(service: &Service) -> bool {
    service
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .is_some_and(|ip| !ip.is_empty() && ip != "None")
}

pub(crate) fn publish_not_ready(service: &Service) -> bool {
    service
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false)
}

/// Upstream's `podEndpointsChanged`: (whether the pod's endpoint changed, whether its
/// service membership may have).
fn pod_endpoints_changed(old: &Pod, new: &Pod) -> (bool, bool) {
    let naming = |p: &Pod| {
        p.spec
            .as_ref()
            .map(|s| (s.hostname.clone(), s.subdomain.clone()))
    };
    let labels_changed = old.labels() != new.labels() || naming(old) != naming(new);
    let node = |p: &Pod| p.spec.as_ref().and_then(|s| s.node_name.clone());
    let changed = old.metadata.deletion_timestamp != new.metadata.deletion_timestamp
        || pod_ready(old) != pod_ready(new)
        || pod_ips(old) != pod_ips(new)
        || pod_terminal(old) != pod_terminal(new)
        || node(old) != node(new);
    (changed, labels_changed)
}

/// The services a pod change concerns (upstream's `GetServicesToUpdateOnPodChange` and, for
/// additions and deletions, `GetPodServiceMemberships`). Resyncs of pods concern none: the
/// services' own resyncs cover them.
pub(crate) fn services_for_pod_change(
    services: &Informer<Service>,
    change: &Change<Pod>,
) -> BTreeSet<ObjectKey> {
    match change {
        Change::Add(pod) | Change::Delete(pod) => service_memberships(services, pod),
        Change::Sync(_) => BTreeSet::new(),
        Change::Update { old, new } => {
            if old.resource_version().is_some() && old.resource_version() == new.resource_version()
            {
                return BTreeSet::new();
            }
            let (pod_changed, labels_changed) = pod_endpoints_changed(old, new);
            if !pod_changed && !labels_changed {
                return BTreeSet::new();
            }
            let current = service_memberships(services, new);
            if !labels_changed {
                return current;
            }
            let before = service_memberships(services, old);
            if pod_changed {
                current.union(&before).cloned().collect()
            } else {
                current.symmetric_difference(&before).cloned().collect()
            }
        }
    }
}

/// Registers the handler that queues the services a pod change concerns.
pub(crate) fn queue_services_of_pods(
    pods: &Informer<Pod>,
    services: &Informer<Service>,
    queue: &WorkQueue<ObjectKey>,
) {
    let queue = queue.clone();
    let services = services.clone();
    pods.add_handler(move |change| {
        let lane = change.lane();
        for key in services_for_pod_change(&services, change) {
            queue.add(key, lane);
        }
    });
}

/// The time a pod last changed in a way that moves its endpoint: its Ready condition's last
/// transition (upstream's `getPodTriggerTime`).
fn pod_trigger_time(pod: &Pod) -> Option<Timestamp> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?
        .last_transition_time
        .as_ref()
        .map(|t| t.0)
}

#[derive(Default)]
struct TriggerState {
    pods: HashMap<String, Timestamp>,
    service: Option<Timestamp>,
}

/// Upstream's `TriggerTimeTracker`: the earliest change (a pod's readiness, the service's
/// creation) seen since the service's last sync, which the written objects carry in
/// [`LAST_CHANGE_TRIGGER_TIME`] so that latency from change to endpoints can be measured.
#[derive(Default)]
pub(crate) struct TriggerTimeTracker {
    services: Mutex<HashMap<ObjectKey, TriggerState>>,
}

impl TriggerTimeTracker {
    /// The earliest trigger time that changed since the last call for this service; `None`
    /// the first time a service is seen (nothing to compare with) or when nothing changed.
    pub(crate) fn compute(&self, service: &Service, pods: &[Arc<Pod>]) -> Option<Timestamp> {
        let key = ObjectKey::of(service);
        let mut services = self.services.lock();
        let known = services.contains_key(&key);
        let state = services.entry(key).or_default();
        let mut earliest: Option<Timestamp> = None;
        let mut pod_times = HashMap::new();
        for pod in pods {
            let Some(at) = pod_trigger_time(pod) else {
                continue;
            };
            let name = pod.name_any();
            if state.pods.get(&name).is_none_or(|last| at > *last) {
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
            }
            pod_times.insert(name, at);
        }
        let created = service.metadata.creation_timestamp.as_ref().map(|t| t.0);
        if let Some(at) = created
            && state.service.is_none_or(|last| at > last)
        {
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
        }
        state.pods = pod_times;
        state.service = created;
        if known { earliest } else { None }
    }

    pub(crate) fn forget(&self, key: &ObjectKey) {
        self.services.lock().remove(key);
    }
}

// ---------------------------------------------------------------------------------------
// Subsets.

/// One pod's address serving one service port (`None`: a headless service without ports).
#[derive(Clone, Debug)]
pub struct Member {
    /// The address.
    pub address: EndpointAddress,
    /// Whether it goes to `addresses` (else `notReadyAddresses`).
    pub ready: bool,
    /// The port.
    pub port: Option<EndpointPort>,
}

type AddressKey = (String, String);
type PortKey = (String, i32, String, String);
/// A port and, for each address serving it, whether it is ready there.
type PortMembers = (Option<EndpointPort>, BTreeMap<AddressKey, bool>);

fn address_key(a: &EndpointAddress) -> AddressKey {
    (
        a.ip.clone(),
        a.target_ref
            .as_ref()
            .and_then(|r| r.uid.clone())
            .unwrap_or_default(),
    )
}

fn port_key(p: &EndpointPort) -> PortKey {
    (
        p.name.clone().unwrap_or_default(),
        p.port,
        protocol(p.protocol.as_deref()).to_string(),
        p.app_protocol.clone().unwrap_or_default(),
    )
}

fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

/// Upstream's `RepackSubsets`: groups addresses by the exact set of ports they serve, so
/// that every subset is "these addresses × these ports". An address is ready for a port if
/// any member says so. The result is sorted (addresses by IP and pod, ports, subsets).
pub fn repack(members: impl IntoIterator<Item = Member>) -> Vec<EndpointSubset> {
    let mut addresses: BTreeMap<AddressKey, EndpointAddress> = BTreeMap::new();
    let mut ports: BTreeMap<Option<PortKey>, PortMembers> = BTreeMap::new();
    for member in members {
        let key = address_key(&member.address);
        addresses.entry(key.clone()).or_insert(member.address);
        let entry = ports
            .entry(member.port.as_ref().map(port_key))
            .or_insert_with(|| (member.port.clone(), BTreeMap::new()));
        *entry.1.entry(key).or_insert(false) |= member.ready;
    }
    let mut groups: BTreeMap<Vec<(AddressKey, bool)>, Vec<EndpointPort>> = BTreeMap::new();
    for (port, addrs) in ports.into_values() {
        let set: Vec<(AddressKey, bool)> = addrs.into_iter().collect();
        let group = groups.entry(set).or_default();
        group.extend(port);
    }
    groups
        .into_iter()
        .map(|(set, ports)| {
            let (ready, not_ready): (Vec<_>, Vec<_>) = set.into_iter().partition(|(_, r)| *r);
            let pick = |v: Vec<(AddressKey, bool)>| -> Vec<EndpointAddress> {
                v.into_iter().map(|(k, _)| addresses[&k].clone()).collect()
            };
            EndpointSubset {
                addresses: non_empty(pick(ready)),
                not_ready_addresses: non_empty(pick(not_ready)),
                ports: non_empty(ports),
            }
        })
        .collect()
}

/// The address of `pod` for `service`: its IP of the service's family (upstream's
/// `podToEndpointAddressForService`).
fn pod_address(service: &Service, pod: &Pod) -> Option<EndpointAddress> {
    let spec = service.spec.as_ref();
    let ips = pod_ips(pod);
    let want_v6 = if service_ip_set(service) {
        spec.and_then(|s| s.cluster_ip.as_deref())
            .is_some_and(is_ipv6)
    } else {
        match spec
            .and_then(|s| s.ip_families.as_ref())
            .and_then(|f| f.first())
        {
            Some(family) => family == "IPv6",
            None => ips.first().is_some_and(|ip| is_ipv6(ip)),
        }
    };
    let ip = ips.into_iter().find(|ip| is_ipv6(ip) == want_v6)?;
    Some(EndpointAddress {
        ip: ip.to_string(),
        hostname: hostname_for(pod, service),
        node_name: pod_node_name(pod),
        target_ref: Some(pod_reference(pod)),
    })
}

/// The subsets of a service's Endpoints given the pods it selects.
pub fn desired_subsets(service: &Service, pods: &[Arc<Pod>]) -> Vec<EndpointSubset> {
    let tolerate_unready = publish_not_ready(service);
    let spec = service.spec.clone().unwrap_or_default();
    let service_ports = spec.ports.unwrap_or_default();
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let mut members = Vec::new();
    for pod in pods {
        if !should_pod_be_in_endpoints(pod, tolerate_unready) {
            continue;
        }
        let Some(address) = pod_address(service, pod) else {
            tracing::debug!(pod = %pod.name_any(), service = %service.name_any(), "no pod IP of the service's family");
            continue;
        };
        let ready = tolerate_unready || pod_ready(pod);
        if service_ports.is_empty() {
            // Headless services may have no ports; others without ports get no addresses.
            if headless {
                members.push(Member {
                    address,
                    ready,
                    port: None,
                });
            }
            continue;
        }
        for sp in &service_ports {
            let Some(port) = find_port(pod, sp) else {
                tracing::debug!(pod = %pod.name_any(), service = %service.name_any(), port = ?sp.name, "no suitable port in pod");
                continue;
            };
            members.push(Member {
                address: address.clone(),
                ready,
                port: Some(EndpointPort {
                    name: sp.name.clone(),
                    port,
                    protocol: sp.protocol.clone(),
                    app_protocol: sp.app_protocol.clone(),
                }),
            });
        }
    }
    repack(members)
}

/// Upstream's `truncateEndpoints`: keeps at most [`MAX_CAPACITY`] addresses, ready ones
/// first, each subset keeping its share (rounded up). Returns whether it truncated.
pub fn truncate(subsets: &mut [EndpointSubset]) -> bool {
    let count = |v: &Option<Vec<EndpointAddress>>| v.as_ref().map_or(0, Vec::len);
    let ready: usize = subsets.iter().map(|s| count(&s.addresses)).sum();
    let not_ready: usize = subsets.iter().map(|s| count(&s.not_ready_addresses)).sum();
    if ready + not_ready <= MAX_CAPACITY {
        return false;
    }
    let truncate_ready = ready > MAX_CAPACITY;
    let (max, total) = if truncate_ready {
        (MAX_CAPACITY, ready)
    } else {
        (MAX_CAPACITY - ready, not_ready)
    };
    let mut room = max;
    for subset in subsets.iter_mut() {
        let list = if truncate_ready {
            subset.not_ready_addresses = None;
            &mut subset.addresses
        } else {
            &mut subset.not_ready_addresses
        };
        let here = count(list);
        let share = (here * max).div_ceil(total).min(room);
        if let Some(addrs) = list.as_mut() {
            addrs.truncate(share);
        }
        room -= count(list);
        if list.as_ref().is_some_and(Vec::is_empty) {
            *list = None;
        }
    }
    true
}

/// Subsets as compared: sorted, empty lists as absent, and without the pods' resource
/// versions (a pod change that moves no endpoint must not rewrite the Endpoints).
fn canonical(subsets: Option<&Vec<EndpointSubset>>) -> Vec<EndpointSubset> {
    let mut out: Vec<EndpointSubset> = subsets
        .into_iter()
        .flatten()
        .map(|s| {
            let clean = |v: &Option<Vec<EndpointAddress>>| {
                let mut v: Vec<EndpointAddress> = v
                    .iter()
                    .flatten()
                    .cloned()
                    .map(|mut a| {
                        if let Some(r) = a.target_ref.as_mut() {
                            r.resource_version = None;
                        }
                        a
                    })
                    .collect();
                v.sort_by_key(address_key);
                non_empty(v)
            };
            let mut ports: Vec<EndpointPort> = s.ports.iter().flatten().cloned().collect();
            ports.sort_by_key(port_key);
            EndpointSubset {
                addresses: clean(&s.addresses),
                not_ready_addresses: clean(&s.not_ready_addresses),
                ports: non_empty(ports),
            }
        })
        .collect();
    out.sort_by_cached_key(|s| serde_json::to_string(s).unwrap_or_default());
    out
}

/// The labels of a service's Endpoints: the service's, marked headless if it has no
/// cluster IP.
fn desired_labels(service: &Service) -> BTreeMap<String, String> {
    let mut labels = service.labels().clone();
    if service_ip_set(service) {
        labels.remove(HEADLESS_LABEL);
    } else {
        labels.insert(HEADLESS_LABEL.into(), String::new());
    }
    labels
}

/// The Endpoints to write for `service`, or `None` when `current` already says it. The
/// trigger time only decides the annotation of a write, never whether to write.
pub fn desired_endpoints(
    service: &Service,
    pods: &[Arc<Pod>],
    current: Option<&Endpoints>,
    trigger: Option<Timestamp>,
) -> Option<Endpoints> {
    let mut subsets = desired_subsets(service, pods);
    let truncated = truncate(&mut subsets);
    let labels = desired_labels(service);
    if let Some(current) = current {
        let over = current.annotations().contains_key(OVER_CAPACITY);
        if canonical(current.subsets.as_ref()) == canonical(Some(&subsets))
            && current.labels() == &labels
            && over == truncated
        {
            return None;
        }
    }
    let mut endpoints = current.cloned().unwrap_or_else(|| Endpoints {
        metadata: ObjectMeta {
            name: service.metadata.name.clone(),
            namespace: service.metadata.namespace.clone(),
            ..Default::default()
        },
        ..Default::default()
    });
    endpoints.subsets = non_empty(subsets);
    endpoints.metadata.labels = Some(labels);
    let annotations = endpoints.annotations_mut();
    match trigger {
        Some(at) => {
            annotations.insert(LAST_CHANGE_TRIGGER_TIME.into(), at.to_string());
        }
        None => {
            annotations.remove(LAST_CHANGE_TRIGGER_TIME);
        }
    }
    if truncated {
        annotations.insert(OVER_CAPACITY.into(), "truncated".into());
    } else {
        annotations.remove(OVER_CAPACITY);
    }
    Some(endpoints)
}

// ---------------------------------------------------------------------------------------
// The controller.

struct Controller {
    ctx: Arc<Context>,
    triggers: TriggerTimeTracker,
    /// Per Endpoints, the resource version this controller last replaced: a cache still
    /// showing it is behind our own write (upstream's `staleEndpointsTracker`).
    replaced: Mutex<HashMap<ObjectKey, String>>,
    events: Recorder,
}

/// Registers the controller's handlers and returns its workers: a service is synced when it
/// or its Endpoints change, or a pod it selects (or selected) does.
pub fn start(ctx: &Arc<Context>) -> BoxFuture<'static, ()> {
    let queue: WorkQueue<ObjectKey> = ctx.queue("endpoint");
    let informers = &ctx.informers;
    {
        let queue = queue.clone();
        informers.services.add_handler(move |change| {
            queue.add(ObjectKey::of(change.object().as_ref()), change.lane());
        });
    }
    queue_services_of_pods(&informers.pods, &informers.services, &queue);
    {
        // Deleted Endpoints of a live service are written again.
        let queue = queue.clone();
        informers.endpoints.add_handler(move |change| {
            if let Change::Delete(ep) = change {
                queue.add(ObjectKey::of(ep.as_ref()), Lane::Delete);
            }
        });
    }
    let controller = Arc::new(Controller {
        ctx: ctx.clone(),
        triggers: TriggerTimeTracker::default(),
        replaced: Mutex::new(HashMap::new()),
        events: ctx.events.recorder("endpoint-controller"),
    });
    Box::pin(async move {
        let informers = &controller.ctx.informers;
        informers.services.wait_synced().await;
        informers.pods.wait_synced().await;
        informers.endpoints.wait_synced().await;
        // Endpoints whose service went while no controller ran (upstream's
        // `checkLeftoverEndpoints`); syncing a key without a service deletes its Endpoints.
        for ep in informers.endpoints.list() {
            if !ep.annotations().contains_key(LEADER_ANNOTATION) {
                let key = ObjectKey::of(ep.as_ref());
                if informers.services.get(&key).is_none() {
                    queue.add(key, Lane::Sync);
                }
            }
        }
        let workers = controller.ctx.config.workers;
        run_workers(queue, workers, move |key: ObjectKey| {
            let controller = controller.clone();
            async move { controller.sync(key).await }
        })
        .await;
    })
}

impl Controller {
    async fn sync(&self, key: ObjectKey) -> Result<Outcome, Error> {
        let client: &Client = &self.ctx.client;
        let api: Api<Endpoints> = Api::namespaced(client.clone(), key.ns());
        let Some(service) = self.ctx.informers.services.get(&key) else {
            match api.delete(&key.name, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(endpoints = %key, "service gone; endpoints deleted"),
                Err(err) if not_found(&err) => {}
                Err(err) => return Err(err.into()),
            }
            self.triggers.forget(&key);
            self.replaced.lock().remove(&key);
            return Ok(Outcome::Done);
        };
        if managed_selector(&service).is_none() {
            return Ok(Outcome::Done);
        }
        let pods = selected_pods(&self.ctx.informers.pods, &service);
        // Computed on every sync so that the tracker's state follows even no-op syncs.
        let trigger = self.triggers.compute(&service, &pods);
        let current = self.ctx.informers.endpoints.get(&key);
        if let Some(current) = &current
            && self.replaced.lock().get(&key).map(String::as_str)
                == current.metadata.resource_version.as_deref()
        {
            return Err(Error::Stale(
                current
                    .metadata
                    .resource_version
                    .clone()
                    .unwrap_or_default(),
            ));
        }
        let Some(endpoints) = desired_endpoints(&service, &pods, current.as_deref(), trigger)
        else {
            return Ok(Outcome::Done);
        };
        match &current {
            None => match api.create(&PostParams::default(), &endpoints).await {
                Ok(_) => tracing::debug!(endpoints = %key, "endpoints created"),
                Err(err) if namespace_terminating(&err) => {}
                Err(err) => {
                    self.events.warning(
                        &endpoints,
                        "FailedToCreateEndpoint",
                        format!("Failed to create endpoint for service {key}: {err}"),
                    );
                    return Err(err.into());
                }
            },
            Some(current) => {
                let written = match api
                    .replace(&key.name, &PostParams::default(), &endpoints)
                    .await
                {
                    Ok(written) => written,
                    Err(err) => {
                        self.events.warning(
                            &endpoints,
                            "FailedToUpdateEndpoint",
                            format!("Failed to update endpoint {key}: {err}"),
                        );
                        return Err(err.into());
                    }
                };
                tracing::debug!(endpoints = %key, "endpoints updated");
                if written.metadata.resource_version != current.metadata.resource_version
                    && let Some(rv) = current.metadata.resource_version.clone()
                {
                    self.replaced.lock().insert(key, rv);
                }
            }
        }
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ip: &str, ready: bool, ports: serde_json::Value) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                             "labels": {"app": "web"}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": ports}]},
                "status": {"phase": "Running", "podIP": ip,
                           "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"},
                                           "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
            }))
            .unwrap(),
        )
    }

    fn service(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "svc-uid", "labels": {"tier": "front"}},
            "spec": spec,
        }))
        .unwrap()
    }

    fn ips(addresses: &Option<Vec<EndpointAddress>>) -> Vec<&str> {
        addresses.iter().flatten().map(|a| a.ip.as_str()).collect()
    }

    #[test]
    fn ready_and_not_ready_pods_share_a_subset() {
        let svc = service(json!({"clusterIP": "10.0.0.1", "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}));
        let pods = [
            pod("b", "10.1.0.2", true, json!([])),
            pod("a", "10.1.0.1", true, json!([])),
            pod("c", "10.1.0.3", false, json!([])),
        ];
        let subsets = desired_subsets(&svc, &pods);
        assert_eq!(subsets.len(), 1);
        assert_eq!(ips(&subsets[0].addresses), ["10.1.0.1", "10.1.0.2"]);
        assert_eq!(ips(&subsets[0].not_ready_addresses), ["10.1.0.3"]);
        let ports = subsets[0].ports.as_ref().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].port, 8080);
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        let a = &subsets[0].addresses.as_ref().unwrap()[0];
        assert_eq!(a.node_name.as_deref(), Some("n1"));
        let target = a.target_ref.as_ref().unwrap();
        assert_eq!(target.kind.as_deref(), Some("Pod"));
        assert_eq!(target.uid.as_deref(), Some("uid-a"));
    }

    #[test]
    fn publish_not_ready_lists_every_pod_as_ready() {
        let svc = service(json!({"clusterIP": "10.0.0.1", "selector": {"app": "web"},
            "publishNotReadyAddresses": true, "ports": [{"port": 80}]}));
        let pods = [pod("a", "10.1.0.1", false, json!([]))];
        let subsets = desired_subsets(&svc, &pods);
        assert_eq!(ips(&subsets[0].addresses), ["10.1.0.1"]);
        assert!(subsets[0].not_ready_addresses.is_none());
    }

    #[test]
    fn pods_without_ip_finished_or_terminating_are_left_out() {
        let svc = service(json!({"clusterIP": "10.0.0.1", "selector": {"app": "web"},
            "ports": [{"port": 80}]}));
        let mut done = (*pod("done", "10.1.0.2", false, json!([]))).clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut going = (*pod("going", "10.1.0.3", true, json!([]))).clone();
        going.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
        );
        let pods = [
            pod("noip", "", true, json!([])),
            Arc::new(done),
            Arc::new(going),
        ];
        assert!(desired_subsets(&svc, &pods).is_empty());
    }

    #[test]
    fn named_ports_resolve_per_pod_and_split_subsets() {
        let svc = service(json!({"clusterIP": "10.0.0.1", "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"}]}));
        let pods = [
            pod(
                "a",
                "10.1.0.1",
                true,
                json!([{"name": "web", "containerPort": 8080}]),
            ),
            pod(
                "b",
                "10.1.0.2",
                true,
                json!([{"name": "web", "containerPort": 9090}]),
            ),
            pod(
                "c",
                "10.1.0.3",
                true,
                json!([{"name": "web", "containerPort": 8080, "protocol": "UDP"}]),
            ),
            pod(
                "d",
                "10.1.0.4",
                true,
                json!([{"name": "web", "containerPort": 8080, "protocol": "TCP"}]),
            ),
        ];
        let subsets = desired_subsets(&svc, &pods);
        let mut found: Vec<(i32, Vec<&str>)> = subsets
            .iter()
            .map(|s| (s.ports.as_ref().unwrap()[0].port, ips(&s.addresses)))
            .collect();
        found.sort();
        assert_eq!(
            found,
            [
                (8080, vec!["10.1.0.1", "10.1.0.4"]),
                (9090, vec!["10.1.0.2"])
            ]
        );
    }

    #[test]
    fn find_port_cases() {
        let p = pod(
            "a",
            "10.1.0.1",
            true,
            json!([{"name": "dns", "containerPort": 53, "protocol": "UDP"}]),
        );
        let port = |v: serde_json::Value| -> ServicePort { serde_json::from_value(v).unwrap() };
        assert_eq!(find_port(&p, &port(json!({"port": 80}))), Some(80));
        assert_eq!(
            find_port(&p, &port(json!({"port": 80, "targetPort": 81}))),
            Some(81)
        );
        assert_eq!(
            find_port(
                &p,
                &port(json!({"port": 53, "targetPort": "dns", "protocol": "UDP"}))
            ),
            Some(53)
        );
        assert_eq!(
            find_port(&p, &port(json!({"port": 53, "targetPort": "dns"}))),
            None
        );
        assert_eq!(
            find_port(
                &p,
                &port(json!({"port": 53, "targetPort": "nope", "protocol": "UDP"}))
            ),
            None
        );
        let sidecar: Pod = serde_json::from_value(json!({
            "metadata": {"name": "s"},
            "spec": {"containers": [{"name": "c"}],
                     "initContainers": [{"name": "proxy", "restartPolicy": "Always",
                                         "ports": [{"name": "p", "containerPort": 15001}]}]},
        }))
        .unwrap();
        assert_eq!(
            find_port(&sidecar, &port(json!({"port": 1, "targetPort": "p"}))),
            Some(15001)
        );
    }

    #[test]
    fn repack_groups_addresses_by_port_set() {
        let addr = |ip: &str| EndpointAddress {
            ip: ip.into(),
            ..Default::default()
        };
        let port = |n: i32| {
            Some(EndpointPort {
                name: Some(format!("p{n}")),
                port: n,
                protocol: Some("TCP".into()),
                app_protocol: None,
            })
        };
        let m = |ip: &str, ready: bool, p: i32| Member {
            address: addr(ip),
            ready,
            port: port(p),
        };
        // a serves 1 and 2, b serves 1 only; c serves 1 and 2, ready only for 2.
        let subsets = repack([
            m("a", true, 1),
            m("a", true, 2),
            m("b", true, 1),
            m("c", false, 1),
            m("c", true, 2),
        ]);
        let shape: Vec<(Vec<i32>, Vec<&str>, Vec<&str>)> = subsets
            .iter()
            .map(|s| {
                (
                    s.ports.iter().flatten().map(|p| p.port).collect(),
                    ips(&s.addresses),
                    ips(&s.not_ready_addresses),
                )
            })
            .collect();
        assert_eq!(shape.len(), 2);
        assert!(shape.contains(&(vec![1], vec!["a", "b"], vec!["c"])));
        assert!(shape.contains(&(vec![2], vec!["a", "c"], vec![])));
        // Same addresses for two ports: one subset.
        let subsets = repack([m("a", true, 1), m("a", true, 2)]);
        assert_eq!(subsets.len(), 1);
        assert_eq!(subsets[0].ports.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn headless_without_ports_lists_addresses_without_ports() {
        let svc = service(json!({"clusterIP": "None", "selector": {"app": "web"}}));
        let subsets = desired_subsets(&svc, &[pod("a", "10.1.0.1", true, json!([]))]);
        assert_eq!(subsets.len(), 1);
        assert!(subsets[0].ports.is_none());
        assert_eq!(
            desired_labels(&svc).get(HEADLESS_LABEL).map(String::as_str),
            Some("")
        );
        let no_ports = service(json!({"clusterIP": "10.0.0.1", "selector": {"app": "web"}}));
        assert!(desired_subsets(&no_ports, &[pod("a", "10.1.0.1", true, json!([]))]).is_empty());
    }

    #[test]
    fn unchanged_endpoints_are_not_rewritten() {
        let svc = service(json!({"clusterIP": "10.0.0.1", "selector": {"app": "web"},
            "ports": [{"port": 80}]}));
        let pods = [pod("a", "10.1.0.1", true, json!([]))];
        let first = desired_endpoints(&svc, &pods, None, None).unwrap();
        assert_eq!(
            first.labels().get("tier").map(String::as_str),
            Some("front")
        );
        assert!(!first.labels().contains_key(HEADLESS_LABEL));
        assert!(
            desired_endpoints(&svc, &pods, Some(&first), Some(Timestamp::UNIX_EPOCH)).is_none()
        );
        let more = [pods[0].clone(), pod("b", "10.1.0.2", true, json!([]))];
        let second =
            desired_endpoints(&svc, &more, Some(&first), Some(Timestamp::UNIX_EPOCH)).unwrap();
        assert_eq!(
            second
                .annotations()
                .get(LAST_CHANGE_TRIGGER_TIME)
                .map(String::as_str),
            Some("1970-01-01T00:00:00Z")
        );
    }

    #[test]
    fn truncation_keeps_ready_addresses_first() {
        let addrs = |n: usize, base: usize| {
            Some(
                (0..n)
                    .map(|i| EndpointAddress {
                        ip: format!("10.0.{}.{}", (base + i) / 250, (base + i) % 250),
                        ..Default::default()
                    })
                    .collect(),
            )
        };
        let mut subsets = vec![EndpointSubset {
            addresses: addrs(900, 0),
            not_ready_addresses: addrs(300, 900),
            ports: None,
        }];
        assert!(truncate(&mut subsets));
        assert_eq!(subsets[0].addresses.as_ref().unwrap().len(), 900);
        assert_eq!(subsets[0].not_ready_addresses.as_ref().unwrap().len(), 100);
        let mut small = vec![EndpointSubset {
            addresses: addrs(10, 0),
            ..Default::default()
        }];
        assert!(!truncate(&mut small));
    }

    #[test]
    fn trigger_times_report_changes_since_the_last_sync() {
        let tracker = TriggerTimeTracker::default();
        let mut svc = service(json!({"selector": {"app": "web"}}));
        svc.metadata.creation_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
        );
        let pods = [pod("a", "10.1.0.1", true, json!([]))];
        assert_eq!(tracker.compute(&svc, &pods), None, "first sight");
        assert_eq!(tracker.compute(&svc, &pods), None, "nothing changed");
        let mut later = (*pods[0]).clone();
        let at: Timestamp = "2026-02-01T00:00:00Z".parse().unwrap();
        later.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].last_transition_time =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
        assert_eq!(tracker.compute(&svc, &[Arc::new(later)]), Some(at));
    }
}
