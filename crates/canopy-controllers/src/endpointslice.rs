//! EndpointSlices (upstream's `pkg/controller/endpointslice`): for every Service with a
//! selector, slices of at most [`MAX_ENDPOINTS_PER_SLICE`] endpoints, one group of slices
//! per address type and set of ports, owned by the service (the garbage collector removes
//! them with it).
//!
//! Changes are applied minimally, as upstream's reconciler does: endpoints stay in the
//! slice that holds them, a slice is rewritten only when one of its endpoints or its labels
//! changed, new endpoints first fill slices being rewritten anyway, then the fullest
//! unchanged slice they fit in, then new slices; a slice about to be deleted is reused for
//! one about to be created.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use futures::future::BoxFuture;
use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams},
};
use parking_lot::Mutex;

use crate::{
    endpoints::{
        HEADLESS_LABEL, LAST_CHANGE_TRIGGER_TIME, TriggerTimeTracker, find_port, hostname_for,
        is_ipv6, managed_selector, pod_ips, pod_node_name, pod_reference, publish_not_ready,
        queue_services_of_pods, selected_pods, service_ip_set, should_pod_be_in_endpoints,
    },
    events::Recorder,
    informer::{Change, ObjectKey},
    manager::Context,
    queue::{Lane, WorkQueue},
    util::{controller_ref, namespace_terminating, not_found, pod_ready},
    worker::{Outcome, run_workers},
};

/// The label naming a slice's service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming a slice's manager.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// This controller's name in [`MANAGED_BY_LABEL`].
pub const CONTROLLER_NAME: &str = "endpointslice-controller.k8s.io";
/// Upstream's default `--max-endpoints-per-slice`.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;
/// The node label giving an endpoint's zone.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Upstream's `endpointSliceChangeMinSyncDelay`: changes of slices by others are batched.
const SLICE_CHANGE_DELAY: Duration = Duration::from_secs(1);

/// Errors of the EndpointSlice controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("API call failed: {0}")]
    Api(#[from] kube::Error),
    /// The cache does not show this controller's own last writes yet.
    #[error("EndpointSlice informer cache is out of date")]
    Stale,
    /// Pods on nodes the cache does not know were left out; retried later.
    #[error("skipping pods on nodes not found: {0:?}")]
    NodesNotFound(Vec<String>),
}

// ---------------------------------------------------------------------------------------
// Desired state.

type PortsKey = Vec<(String, i32, String, String)>;
/// What identifies an endpoint across syncs (upstream's `hashEndpoint`): its addresses, its
/// pod and its hostname; everything else about it may change in place.
type EndpointKey = (Vec<String>, String, String, String);

fn ports_key(ports: &[EndpointPort]) -> PortsKey {
    let mut key: PortsKey = ports
        .iter()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port.unwrap_or_default(),
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                p.app_protocol.clone().unwrap_or_default(),
            )
        })
        .collect();
    key.sort();
    key
}

fn endpoint_key(endpoint: &Endpoint) -> EndpointKey {
    let mut addresses = endpoint.addresses.clone();
    addresses.sort();
    let target = endpoint.target_ref.as_ref();
    (
        addresses,
        target.and_then(|t| t.namespace.clone()).unwrap_or_default(),
        target.and_then(|t| t.name.clone()).unwrap_or_default(),
        endpoint.hostname.clone().unwrap_or_default(),
    )
}

/// The address types a service's slices carry (upstream's `getAddressTypesForService`):
/// its IP families, else its cluster IP's family, else both for headless services.
pub fn address_types(service: &Service) -> BTreeSet<&'static str> {
    let spec = service.spec.as_ref();
    let mut types: BTreeSet<&'static str> = spec
        .and_then(|s| s.ip_families.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some("IPv4"),
            "IPv6" => Some("IPv6"),
            _ => None,
        })
        .collect();
    if types.is_empty() {
        if service_ip_set(service) {
            let v6 = spec
                .and_then(|s| s.cluster_ip.as_deref())
                .is_some_and(is_ipv6);
            types.insert(if v6 { "IPv6" } else { "IPv4" });
        } else {
            types.extend(["IPv4", "IPv6"]);
        }
    }
    types
}

/// The ports of a pod's endpoint: each service port that resolves in the pod.
pub fn endpoint_ports(service: &Service, pod: &Pod) -> Vec<EndpointPort> {
    let ports = service.spec.as_ref().and_then(|s| s.ports.as_ref());
    ports
        .into_iter()
        .flatten()
        .filter_map(|sp| {
            Some(EndpointPort {
                name: Some(sp.name.clone().unwrap_or_default()),
                port: Some(find_port(pod, sp)?),
                protocol: Some(sp.protocol.clone().unwrap_or_else(|| "TCP".into())),
                app_protocol: sp.app_protocol.clone(),
            })
        })
        .collect()
}

/// Upstream's `podToEndpoint`: `serving` is the pod's readiness, `ready` the same unless the
/// pod is terminating (or always, with `publishNotReadyAddresses`).
fn pod_to_endpoint(
    pod: &Pod,
    zone: Option<String>,
    service: &Service,
    address_type: &str,
) -> Endpoint {
    let serving = pod_ready(pod);
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let ready = publish_not_ready(service) || (serving && !terminating);
    Endpoint {
        addresses: pod_ips(pod)
            .into_iter()
            .filter(|ip| is_ipv6(ip) == (address_type == "IPv6"))
            .map(str::to_string)
            .collect(),
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        hostname: hostname_for(pod, service),
        node_name: pod_node_name(pod),
        target_ref: Some(pod_reference(pod)),
        zone,
        ..Default::default()
    }
}

/// The endpoints of one set of ports.
#[derive(Debug, Default)]
struct Desired {
    ports: Vec<EndpointPort>,
    endpoints: BTreeMap<EndpointKey, Endpoint>,
}

/// Where the nodes of pods are: `None` for a node the cache does not know, else its zone.
pub type NodeZone<'a> = &'a dyn Fn(&str) -> Option<Option<String>>;

/// The desired endpoints of one address type, by set of ports; and the pods left out
/// because their node is unknown.
fn desired_by_ports(
    service: &Service,
    pods: &[Arc<Pod>],
    address_type: &str,
    node_zone: NodeZone<'_>,
) -> (BTreeMap<PortsKey, Desired>, Vec<String>) {
    let mut desired: BTreeMap<PortsKey, Desired> = BTreeMap::new();
    let mut missing = Vec::new();
    for pod in pods {
        if !should_pod_be_in_endpoints(pod, true) {
            continue;
        }
        let ports = endpoint_ports(service, pod);
        let group = desired.entry(ports_key(&ports)).or_insert_with(|| Desired {
            ports,
            endpoints: BTreeMap::new(),
        });
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or("");
        let zone = match node_zone(node) {
            Some(zone) => zone,
            // A pod whose node is gone is left out (retried later) so that it cannot hold
            // the slices back forever, unless the user asked for every address.
            None if !publish_not_ready(service) => {
                missing.push(pod.name_any());
                continue;
            }
            None => None,
        };
        let endpoint = pod_to_endpoint(pod, zone, service, address_type);
        if !endpoint.addresses.is_empty() {
            group.endpoints.insert(endpoint_key(&endpoint), endpoint);
        }
    }
    (desired, missing)
}

/// Upstream's `setEndpointSliceLabels`: the service's labels (but the reserved ones), the
/// headless mark, the service's name and this controller's.
pub fn slice_labels(service: &Service) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = service
        .labels()
        .iter()
        .filter(|(k, _)| {
            ![SERVICE_NAME_LABEL, MANAGED_BY_LABEL, HEADLESS_LABEL].contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !service_ip_set(service) {
        labels.insert(HEADLESS_LABEL.into(), String::new());
    }
    labels.insert(SERVICE_NAME_LABEL.into(), service.name_any());
    labels.insert(MANAGED_BY_LABEL.into(), CONTROLLER_NAME.into());
    labels
}

/// A slice's name prefix: `<service>-` (upstream's `getEndpointSlicePrefix`).
fn name_prefix(service: &str) -> String {
    if service.len() < 253 {
        format!("{service}-")
    } else {
        service.to_string()
    }
}

fn new_slice(service: &Service, ports: &[EndpointPort], address_type: &str) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            generate_name: Some(name_prefix(&service.name_any())),
            namespace: service.metadata.namespace.clone(),
            labels: Some(slice_labels(service)),
            owner_references: Some(vec![controller_ref(service)]),
            ..Default::default()
        },
        address_type: address_type.to_string(),
        endpoints: Vec::new(),
        ports: Some(ports.to_vec()),
    }
}

fn owned_by(slice: &EndpointSlice, service: &Service) -> bool {
    slice.owner_references().iter().any(|r| {
        Some(&r.uid) == service.metadata.uid.as_ref()
            && r.kind == "Service"
            && r.api_version == "v1"
    })
}

/// Whether an existing slice is the placeholder this controller would create (upstream's
/// `placeholderSliceCompare`), so that it is kept rather than deleted and made again.
fn same_placeholder(existing: &EndpointSlice, placeholder: &EndpointSlice) -> bool {
    let refs = |s: &EndpointSlice| -> Vec<OwnerReference> { s.owner_references().to_vec() };
    existing.metadata.namespace == placeholder.metadata.namespace
        && existing.labels() == placeholder.labels()
        && refs(existing) == refs(placeholder)
        && existing.address_type == placeholder.address_type
        && existing.endpoints.is_empty()
        && existing.ports.as_ref().is_none_or(Vec::is_empty)
}

/// The writes that bring a service's slices to the desired state.
#[derive(Debug, Default)]
pub struct Plan {
    /// New slices (no name yet: `generateName`).
    pub create: Vec<EndpointSlice>,
    /// Slices to replace (with the resource version they were read at).
    pub update: Vec<EndpointSlice>,
    /// Slices to delete.
    pub delete: Vec<EndpointSlice>,
}

impl Plan {
    /// Whether nothing is to be written.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }
}

/// Upstream's `getSliceToFill`: the unchanged slice that `count` endpoints fill the most.
fn slice_to_fill<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
    count: usize,
    max: usize,
) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for slice in slices {
        let Some(room) = max.checked_sub(count + slice.endpoints.len()) else {
            continue;
        };
        if best.as_ref().is_none_or(|(r, _)| room < *r) {
            best = Some((room, slice.name_any()));
            if room == 0 {
                break;
            }
        }
    }
    best.map(|(_, name)| name)
}

/// Upstream's `reconcileByPortMapping`: the slices of one set of ports.
fn reconcile_ports(
    service: &Service,
    existing: &[EndpointSlice],
    desired: Desired,
    address_type: &str,
    max: usize,
    plan: &mut Plan,
) {
    let Desired {
        ports,
        endpoints: mut wanted,
    } = desired;
    let labels = slice_labels(service);
    let mut by_name: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    let mut unchanged: BTreeSet<String> = BTreeSet::new();
    let mut to_update: BTreeSet<String> = BTreeSet::new();
    let mut to_delete: BTreeSet<String> = BTreeSet::new();

    // 1. Keep the wanted endpoints where they are, updated; drop the others.
    for slice in existing {
        let name = slice.name_any();
        let mut kept = Vec::new();
        let mut changed = false;
        for endpoint in &slice.endpoints {
            if let Some(want) = wanted.remove(&endpoint_key(endpoint)) {
                changed |= &want != endpoint;
                kept.push(want);
            }
        }
        let labels_changed = slice.labels() != &labels;
        if changed || kept.len() != slice.endpoints.len() {
            if kept.is_empty() {
                to_delete.insert(name.clone());
                by_name.insert(name, slice.clone());
            } else {
                let mut slice = slice.clone();
                slice.endpoints = kept;
                slice.metadata.labels = Some(labels.clone());
                to_update.insert(name.clone());
                by_name.insert(name, slice);
            }
        } else if labels_changed {
            let mut slice = slice.clone();
            slice.metadata.labels = Some(labels.clone());
            to_update.insert(name.clone());
            by_name.insert(name, slice);
        } else {
            unchanged.insert(name.clone());
            by_name.insert(name, slice.clone());
        }
    }

    // 2. New endpoints first go to slices rewritten anyway, the fullest first.
    if !wanted.is_empty() && !to_update.is_empty() {
        let mut names: Vec<String> = to_update.iter().cloned().collect();
        names.sort_by_key(|n| std::cmp::Reverse(by_name[n].endpoints.len()));
        for name in names {
            let slice = by_name.get_mut(&name).expect("slice to update");
            while slice.endpoints.len() < max
                && let Some((_, endpoint)) = wanted.pop_first()
            {
                slice.endpoints.push(endpoint);
            }
        }
    }

    // 3. The rest fill the unchanged slice they fit best (if they fit in one), else new ones.
    while !wanted.is_empty() {
        let reuse = if wanted.len() < max && !unchanged.is_empty() {
            slice_to_fill(unchanged.iter().map(|n| &by_name[n]), wanted.len(), max)
        } else {
            None
        };
        let mut slice = match &reuse {
            Some(name) => by_name.remove(name).expect("unchanged slice"),
            None => new_slice(service, &ports, address_type),
        };
        while slice.endpoints.len() < max
            && let Some((_, endpoint)) = wanted.pop_first()
        {
            slice.endpoints.push(endpoint);
        }
        match reuse {
            Some(name) => {
                unchanged.remove(&name);
                to_update.insert(name.clone());
                by_name.insert(name, slice);
            }
            None => plan.create.push(slice),
        }
    }
    for name in to_update {
        plan.update.extend(by_name.remove(&name));
    }
    for name in to_delete {
        plan.delete.extend(by_name.remove(&name));
    }
}

/// Upstream's `reconcileByAddressType` and `finalize`'s reuse of slices being deleted.
fn reconcile_address_type(
    service: &Service,
    pods: &[Arc<Pod>],
    existing: &[EndpointSlice],
    address_type: &str,
    node_zone: NodeZone<'_>,
    max: usize,
) -> (Plan, Vec<String>) {
    let mut plan = Plan::default();
    let mut by_ports: BTreeMap<PortsKey, Vec<EndpointSlice>> = BTreeMap::new();
    for slice in existing {
        if owned_by(slice, service) {
            by_ports
                .entry(ports_key(slice.ports.as_deref().unwrap_or_default()))
                .or_default()
                .push(slice.clone());
        } else {
            // A slice of an earlier service of the same name.
            plan.delete.push(slice.clone());
        }
    }
    let (desired, missing) = desired_by_ports(service, pods, address_type, node_zone);
    for (key, slices) in &by_ports {
        if !desired.contains_key(key) {
            plan.delete.extend(slices.iter().cloned());
        }
    }
    for (key, group) in desired {
        let slices = by_ports.get(&key).map(Vec::as_slice).unwrap_or_default();
        reconcile_ports(service, slices, group, address_type, max, &mut plan);
    }
    // A service without endpoints still has one (empty) slice, so that its consumers can
    // tell "no endpoints" from "not processed yet".
    if existing.len() == plan.delete.len() && plan.create.is_empty() {
        let placeholder = new_slice(service, &[], address_type);
        if plan.delete.len() == 1 && same_placeholder(&plan.delete[0], &placeholder) {
            plan.delete.clear();
        } else {
            plan.create.push(placeholder);
        }
    }
    // Creating and deleting at once: rewrite the slices being deleted instead.
    let mut i = 0;
    while i < plan.delete.len() && !plan.create.is_empty() {
        let old = &plan.delete[i];
        if old.address_type == address_type && owned_by(old, service) {
            let old = plan.delete.remove(i);
            let mut slice = plan.create.pop().expect("a slice to create");
            slice.metadata.name = old.metadata.name;
            slice.metadata.resource_version = old.metadata.resource_version;
            slice.metadata.uid = old.metadata.uid;
            plan.update.push(slice);
        } else {
            i += 1;
        }
    }
    (plan, missing)
}

/// The writes that bring `existing` (the service's slices, none being deleted) to what the
/// service and its pods want, and the pods left out for unknown nodes.
pub fn reconcile(
    service: &Service,
    pods: &[Arc<Pod>],
    existing: &[Arc<EndpointSlice>],
    node_zone: NodeZone<'_>,
    max: usize,
) -> (Plan, Vec<String>) {
    let types = address_types(service);
    let mut plan = Plan::default();
    let mut missing = BTreeSet::new();
    let mut by_type: BTreeMap<&str, Vec<EndpointSlice>> = BTreeMap::new();
    let mut unsupported = Vec::new();
    for slice in existing {
        match types.get(slice.address_type.as_str()) {
            Some(t) => by_type.entry(t).or_default().push((**slice).clone()),
            None => unsupported.push((**slice).clone()),
        }
    }
    for address_type in types {
        let slices = by_type
            .get(address_type)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let (part, left_out) =
            reconcile_address_type(service, pods, slices, address_type, node_zone, max);
        plan.create.extend(part.create);
        plan.update.extend(part.update);
        plan.delete.extend(part.delete);
        missing.extend(left_out);
    }
    plan.delete.extend(unsupported);
    (plan, missing.into_iter().collect())
}

// ---------------------------------------------------------------------------------------
// Tracking our own writes.

enum Expect {
    /// Written at `rv`, replacing `replaced` (none for a creation).
    Written {
        rv: String,
        replaced: Option<String>,
    },
    /// Deleted.
    Deleted,
}

/// Upstream's `EndpointSliceTracker`: what this controller last did to each slice of each
/// service, so that a sync does not act on a cache that does not show it yet (it would
/// create duplicate slices), and so that the cache's echo of our own writes is no news.
/// Tracked by resource versions replaced, as EndpointSlices here have no `generation`.
#[derive(Default)]
struct SliceTracker {
    services: Mutex<HashMap<ObjectKey, HashMap<String, Expect>>>,
}

impl SliceTracker {
    fn written(&self, service: &ObjectKey, slice: &EndpointSlice, replaced: Option<String>) {
        let (Some(uid), Some(rv)) = (slice.uid(), slice.resource_version()) else {
            return;
        };
        // A write that changed nothing keeps its resource version: nothing to wait for.
        let replaced = replaced.filter(|r| *r != rv);
        self.services
            .lock()
            .entry(service.clone())
            .or_default()
            .insert(uid, Expect::Written { rv, replaced });
    }

    fn deleted(&self, service: &ObjectKey, uid: Option<String>) {
        if let Some(uid) = uid {
            self.services
                .lock()
                .entry(service.clone())
                .or_default()
                .insert(uid, Expect::Deleted);
        }
    }

    /// Whether `slices` (from the cache) miss one of our writes; forgets the writes the
    /// cache shows.
    fn stale(&self, service: &ObjectKey, slices: &[Arc<EndpointSlice>]) -> bool {
        let mut services = self.services.lock();
        let Some(expected) = services.get_mut(service) else {
            return false;
        };
        let cached: HashMap<String, Option<String>> = slices
            .iter()
            .filter_map(|s| Some((s.uid()?, s.resource_version())))
            .collect();
        let mut stale = false;
        expected.retain(|uid, expect| {
            let behind = match expect {
                Expect::Written { replaced, .. } => match cached.get(uid) {
                    None => true,
                    Some(rv) => replaced.is_some() && rv == replaced,
                },
                Expect::Deleted => cached.contains_key(uid),
            };
            stale |= behind;
            behind
        });
        stale
    }

    /// Whether a slice's new state is our own write.
    fn own_write(&self, service: &ObjectKey, slice: &EndpointSlice) -> bool {
        let services = self.services.lock();
        let (Some(uid), Some(rv)) = (slice.uid(), slice.resource_version()) else {
            return false;
        };
        matches!(
            services.get(service).and_then(|e| e.get(&uid)),
            Some(Expect::Written { rv: written, .. }) if *written == rv
        )
    }

    /// Forgets a deleted slice; whether we deleted it.
    fn handle_deletion(&self, service: &ObjectKey, slice: &EndpointSlice) -> bool {
        let mut services = self.services.lock();
        let Some(uid) = slice.uid() else {
            return false;
        };
        matches!(
            services.get_mut(service).and_then(|e| e.remove(&uid)),
            Some(Expect::Deleted)
        )
    }

    fn forget(&self, service: &ObjectKey) {
        self.services.lock().remove(service);
    }
}

// ---------------------------------------------------------------------------------------
// The controller.

/// The service of a slice this controller manages.
fn managed_service(slice: &EndpointSlice) -> Option<ObjectKey> {
    let labels = slice.labels();
    if labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(CONTROLLER_NAME) {
        return None;
    }
    let name = labels.get(SERVICE_NAME_LABEL)?;
    Some(ObjectKey::new(
        slice.metadata.namespace.as_deref().unwrap_or(""),
        name,
    ))
}

struct Controller {
    ctx: Arc<Context>,
    triggers: TriggerTimeTracker,
    tracker: SliceTracker,
    events: Recorder,
}

/// Registers the controller's handlers and returns its workers: a service is synced when it
/// changes, when a pod it selects (or selected) changes, and when someone else changes one
/// of its slices.
pub fn start(ctx: &Arc<Context>) -> BoxFuture<'static, ()> {
    let queue: WorkQueue<ObjectKey> = ctx.queue("endpointslice");
    let informers = &ctx.informers;
    let controller = Arc::new(Controller {
        ctx: ctx.clone(),
        triggers: TriggerTimeTracker::default(),
        tracker: SliceTracker::default(),
        events: ctx.events.recorder("endpoint-slice-controller"),
    });
    {
        let queue = queue.clone();
        informers.services.add_handler(move |change| {
            queue.add(ObjectKey::of(change.object().as_ref()), change.lane());
        });
    }
    queue_services_of_pods(&informers.pods, &informers.services, &queue);
    {
        let queue = queue.clone();
        let controller = controller.clone();
        informers.endpoint_slices.add_handler(move |change| {
            let later = |key: ObjectKey, lane: Lane| queue.add_after(key, lane, SLICE_CHANGE_DELAY);
            match change {
                Change::Add(slice) => {
                    if let Some(key) = managed_service(slice)
                        && !controller.tracker.own_write(&key, slice)
                    {
                        later(key, Lane::Add);
                    }
                }
                Change::Update { old, new } => {
                    let (before, after) = (managed_service(old), managed_service(new));
                    if before != after {
                        before.into_iter().for_each(|k| later(k, Lane::Update));
                        after.into_iter().for_each(|k| later(k, Lane::Update));
                    } else if let Some(key) = after
                        && !controller.tracker.own_write(&key, new)
                    {
                        later(key, Lane::Update);
                    }
                }
                Change::Delete(slice) => {
                    if let Some(key) = managed_service(slice)
                        && !controller.tracker.handle_deletion(&key, slice)
                    {
                        later(key, Lane::Delete);
                    }
                }
                Change::Sync(_) => {}
            }
        });
    }
    Box::pin(async move {
        let informers = &controller.ctx.informers;
        informers.services.wait_synced().await;
        informers.pods.wait_synced().await;
        informers.endpoint_slices.wait_synced().await;
        informers.nodes.wait_synced().await;
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
        let informers = &self.ctx.informers;
        let Some(service) = informers.services.get(&key) else {
            // The service's slices go with it through their owner reference.
            self.triggers.forget(&key);
            self.tracker.forget(&key);
            return Ok(Outcome::Done);
        };
        if managed_selector(&service).is_none() {
            return Ok(Outcome::Done);
        }
        let pods = selected_pods(&informers.pods, &service);
        let slices: Vec<Arc<EndpointSlice>> = informers
            .endpoint_slices
            .in_namespace(key.ns())
            .into_iter()
            .filter(|s| managed_service(s).as_ref() == Some(&key))
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .collect();
        if self.tracker.stale(&key, &slices) {
            return Err(Error::Stale);
        }
        let trigger = self.triggers.compute(&service, &pods);
        let nodes = &informers.nodes;
        let node_zone = |name: &str| {
            nodes
                .get(&ObjectKey::cluster(name))
                .map(|n| n.labels().get(ZONE_LABEL).cloned())
        };
        let (plan, missing) = reconcile(
            &service,
            &pods,
            &slices,
            &node_zone,
            MAX_ENDPOINTS_PER_SLICE,
        );
        if !plan.is_empty() {
            tracing::debug!(service = %key, create = plan.create.len(), update = plan.update.len(),
                delete = plan.delete.len(), "writing endpoint slices");
        }
        let api: Api<EndpointSlice> = Api::namespaced(self.ctx.client.clone(), key.ns());
        let annotate = |slice: &mut EndpointSlice| {
            let annotations = slice.annotations_mut();
            match trigger {
                Some(at) => annotations.insert(LAST_CHANGE_TRIGGER_TIME.into(), at.to_string()),
                None => annotations.remove(LAST_CHANGE_TRIGGER_TIME),
            };
        };
        let written: Result<(), Error> = async {
            // No new slices for a service being deleted: the garbage collector is removing them.
            if service.metadata.deletion_timestamp.is_none() {
                for mut slice in plan.create {
                    annotate(&mut slice);
                    match api.create(&PostParams::default(), &slice).await {
                        Ok(created) => self.tracker.written(&key, &created, None),
                        Err(err) if namespace_terminating(&err) => return Ok(()),
                        Err(err) => return Err(err.into()),
                    }
                }
            }
            for mut slice in plan.update {
                annotate(&mut slice);
                let replaced = slice.resource_version();
                let written = api
                    .replace(&slice.name_any(), &PostParams::default(), &slice)
                    .await?;
                self.tracker.written(&key, &written, replaced);
            }
            for slice in plan.delete {
                match api
                    .delete(&slice.name_any(), &DeleteParams::default())
                    .await
                {
                    Ok(_) => self.tracker.deleted(&key, slice.uid()),
                    Err(err) if not_found(&err) => {}
                    Err(err) => return Err(err.into()),
                }
            }
            if !missing.is_empty() {
                return Err(Error::NodesNotFound(missing));
            }
            Ok(())
        }
        .await;
        if let Err(err) = written {
            self.events.warning(
                service.as_ref(),
                "FailedToUpdateEndpointSlices",
                format!("Error updating Endpoint Slices for Service {key}: {err}"),
            );
            return Err(err);
        }
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "svc-uid", "labels": {"tier": "front"}},
            "spec": {"clusterIP": "10.0.0.1", "ipFamilies": ["IPv4"], "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
        }))
        .unwrap()
    }

    fn pod(i: usize, ready: bool) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("p{i:03}"), "namespace": "ns", "uid": format!("uid-{i}"),
                             "labels": {"app": "web"}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c",
                         "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
                "status": {"phase": "Running", "podIPs": [{"ip": format!("10.1.{}.{}", i / 200, i % 200)}],
                           "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
            }))
            .unwrap(),
        )
    }

    fn zone(name: &str) -> Option<Option<String>> {
        (name == "n1").then(|| Some("z1".to_string()))
    }

    /// Applies a plan to a set of slices as the API would.
    fn apply(slices: &mut Vec<Arc<EndpointSlice>>, plan: Plan, next: &mut usize) {
        for gone in plan.delete {
            slices.retain(|s| s.name_any() != gone.name_any());
        }
        for mut updated in plan.update {
            *next += 1;
            updated.metadata.resource_version = Some(next.to_string());
            let name = updated.name_any();
            match slices.iter_mut().find(|s| s.name_any() == name) {
                Some(s) => *s = Arc::new(updated),
                None => slices.push(Arc::new(updated)),
            }
        }
        for mut created in plan.create {
            *next += 1;
            created.metadata.name = Some(format!("web-{next}"));
            created.metadata.uid = Some(format!("slice-{next}"));
            created.metadata.resource_version = Some(next.to_string());
            slices.push(Arc::new(created));
        }
    }

    fn sizes(slices: &[Arc<EndpointSlice>]) -> Vec<usize> {
        let mut v: Vec<usize> = slices.iter().map(|s| s.endpoints.len()).collect();
        v.sort();
        v
    }

    #[test]
    fn endpoints_carry_conditions_ports_and_references() {
        let svc = service();
        let pods = [pod(1, true), pod(2, false)];
        let (plan, missing) = reconcile(&svc, &pods, &[], &zone, 100);
        assert!(missing.is_empty());
        assert_eq!(plan.create.len(), 1);
        let slice = &plan.create[0];
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(slice.metadata.generate_name.as_deref(), Some("web-"));
        assert_eq!(slice.labels()[SERVICE_NAME_LABEL], "web");
        assert_eq!(slice.labels()[MANAGED_BY_LABEL], CONTROLLER_NAME);
        assert_eq!(slice.labels()["tier"], "front");
        assert!(!slice.labels().contains_key(HEADLESS_LABEL));
        let owner = &slice.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Service", "svc-uid")
        );
        assert_eq!(owner.controller, Some(true));
        let port = &slice.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.port),
            (Some("http"), Some(8080))
        );
        let ready: Vec<(Option<bool>, Option<bool>)> = slice
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref().unwrap();
                (c.ready, c.serving)
            })
            .collect();
        assert_eq!(
            ready,
            [(Some(true), Some(true)), (Some(false), Some(false))]
        );
        let e = &slice.endpoints[0];
        assert_eq!(e.addresses, ["10.1.0.1"]);
        assert_eq!(e.node_name.as_deref(), Some("n1"));
        assert_eq!(e.zone.as_deref(), Some("z1"));
        assert_eq!(e.target_ref.as_ref().unwrap().uid.as_deref(), Some("uid-1"));
    }

    #[test]
    fn terminating_pods_stay_as_terminating_not_ready() {
        let svc = service();
        let mut going = (*pod(1, true)).clone();
        going.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let (plan, _) = reconcile(&svc, &[Arc::new(going)], &[], &zone, 100);
        let c = plan.create[0].endpoints[0].conditions.clone().unwrap();
        assert_eq!(
            (c.ready, c.serving, c.terminating),
            (Some(false), Some(true), Some(true))
        );
    }

    #[test]
    fn slices_hold_at_most_max_endpoints_and_change_minimally() {
        let svc = service();
        let mut pods: Vec<Arc<Pod>> = (0..150).map(|i| pod(i, true)).collect();
        let mut slices = Vec::new();
        let mut rv = 0;
        let (plan, _) = reconcile(&svc, &pods, &slices, &zone, 100);
        assert_eq!(plan.create.len(), 2);
        apply(&mut slices, plan, &mut rv);
        assert_eq!(sizes(&slices), [50, 100]);

        // Nothing changed: nothing to write.
        let (plan, _) = reconcile(&svc, &pods, &slices, &zone, 100);
        assert!(plan.is_empty(), "{plan:?}");

        // One pod turns not ready: only its slice is rewritten.
        pods[3] = pod(3, false);
        let (plan, _) = reconcile(&svc, &pods, &slices, &zone, 100);
        assert_eq!(
            (plan.create.len(), plan.update.len(), plan.delete.len()),
            (0, 1, 0)
        );
        apply(&mut slices, plan, &mut rv);

        // Ten new pods fit in the half-full slice.
        pods.extend((150..160).map(|i| pod(i, true)));
        let (plan, _) = reconcile(&svc, &pods, &slices, &zone, 100);
        assert_eq!(
            (plan.create.len(), plan.update.len(), plan.delete.len()),
            (0, 1, 0)
        );
        assert_eq!(plan.update[0].endpoints.len(), 60);
        apply(&mut slices, plan, &mut rv);
        assert_eq!(sizes(&slices), [60, 100]);

        // Down to 5 pods: one slice emptied is deleted, the other shrinks.
        pods.truncate(5);
        let (plan, _) = reconcile(&svc, &pods, &slices, &zone, 100);
        apply(&mut slices, plan, &mut rv);
        assert_eq!(sizes(&slices), [5]);

        // No pods at all: an empty placeholder slice, kept as is afterwards.
        pods.clear();
        let (plan, _) = reconcile(&svc, &pods, &slices, &zone, 100);
        apply(&mut slices, plan, &mut rv);
        assert_eq!(sizes(&slices), [0]);
        assert!(slices[0].ports.as_ref().unwrap().is_empty());
        let (plan, _) = reconcile(&svc, &pods, &slices, &zone, 100);
        assert!(plan.is_empty(), "{plan:?}");

        // Pods again: the placeholder is rewritten rather than deleted and made anew.
        let name = slices[0].name_any();
        let (plan, _) = reconcile(&svc, &[pod(1, true)], &slices, &zone, 100);
        assert_eq!(
            (plan.create.len(), plan.update.len(), plan.delete.len()),
            (0, 1, 0)
        );
        assert_eq!(plan.update[0].name_any(), name);
    }

    #[test]
    fn pods_on_unknown_nodes_are_left_out_and_reported() {
        let svc = service();
        let mut lost = (*pod(2, true)).clone();
        lost.spec.as_mut().unwrap().node_name = Some("gone".into());
        let (plan, missing) = reconcile(&svc, &[pod(1, true), Arc::new(lost)], &[], &zone, 100);
        assert_eq!(missing, ["p002"]);
        assert_eq!(plan.create[0].endpoints.len(), 1);
    }

    #[test]
    fn slices_of_another_service_generation_are_replaced() {
        let svc = service();
        let (plan, _) = reconcile(&svc, &[pod(1, true)], &[], &zone, 100);
        let mut old = plan.create[0].clone();
        old.metadata.name = Some("web-old".into());
        old.metadata.owner_references.as_mut().unwrap()[0].uid = "previous".into();
        let (plan, _) = reconcile(&svc, &[pod(1, true)], &[Arc::new(old)], &zone, 100);
        assert_eq!(
            (plan.create.len(), plan.update.len(), plan.delete.len()),
            (1, 0, 1)
        );
    }

    #[test]
    fn address_types_follow_families() {
        let mut svc = service();
        assert_eq!(address_types(&svc), BTreeSet::from(["IPv4"]));
        let spec = svc.spec.as_mut().unwrap();
        spec.ip_families = Some(vec!["IPv6".into()]);
        assert_eq!(address_types(&svc), BTreeSet::from(["IPv6"]));
        let spec = svc.spec.as_mut().unwrap();
        spec.ip_families = None;
        spec.cluster_ip = Some("None".into());
        assert_eq!(address_types(&svc), BTreeSet::from(["IPv4", "IPv6"]));
        // A v6 pod in a v6 service.
        let spec = svc.spec.as_mut().unwrap();
        spec.ip_families = Some(vec!["IPv6".into()]);
        let mut p = (*pod(1, true)).clone();
        p.status.as_mut().unwrap().pod_ips = Some(vec![
            k8s_openapi::api::core::v1::PodIP {
                ip: "10.1.0.1".into(),
            },
            k8s_openapi::api::core::v1::PodIP {
                ip: "fd00::1".into(),
            },
        ]);
        let (plan, _) = reconcile(&svc, &[Arc::new(p)], &[], &zone, 100);
        assert_eq!(plan.create[0].address_type, "IPv6");
        assert_eq!(plan.create[0].endpoints[0].addresses, ["fd00::1"]);
        assert_eq!(plan.create[0].labels()[HEADLESS_LABEL], "");
    }

    #[test]
    fn tracker_waits_for_the_cache_to_show_our_writes() {
        let tracker = SliceTracker::default();
        let key = ObjectKey::new("ns", "web");
        let mut slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some("web-1".into()),
                uid: Some("u1".into()),
                resource_version: Some("5".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        tracker.written(&key, &slice, None);
        assert!(tracker.own_write(&key, &slice));
        assert!(tracker.stale(&key, &[]), "created slice not yet cached");
        assert!(!tracker.stale(&key, &[Arc::new(slice.clone())]));
        let old = slice.clone();
        slice.metadata.resource_version = Some("7".into());
        tracker.written(&key, &slice, Some("5".into()));
        assert!(
            tracker.stale(&key, &[Arc::new(old.clone())]),
            "cache still at 5"
        );
        assert!(!tracker.stale(&key, &[Arc::new(slice.clone())]));
        tracker.deleted(&key, slice.uid());
        assert!(tracker.stale(&key, &[Arc::new(slice.clone())]));
        assert!(tracker.handle_deletion(&key, &slice));
        assert!(!tracker.stale(&key, &[]));
    }
}
