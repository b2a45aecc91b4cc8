//! The garbage collector (upstream's `pkg/controller/garbagecollector`): objects whose owners
//! are all gone are deleted, owners deleted in the foreground wait for their blocking
//! dependents, and owners deleted with the `orphan` finalizer release their dependents.
//!
//! As upstream, it watches the metadata of every resource the server serves that can be
//! listed, watched and deleted (found by discovery, again every 30 seconds), and keeps its
//! own graph of objects by uid: each node knows its owners (its ownerReferences) and its
//! dependents. One task applies the watch events to the graph (`processGraphChanges`) and
//! queues the uids that need a look into two work queues: `attemptToDelete` (is this
//! object garbage? are this owner's dependents gone?) and `attemptToOrphan`. An owner the
//! graph has not seen is a *virtual* node, whose existence is checked with a live GET;
//! absence is always verified against the API server before anything is deleted.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt,
    sync::Arc,
    time::Duration,
};

use futures::{StreamExt, future::BoxFuture};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{
    Api, Client,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
        Preconditions, PropagationPolicy,
    },
    core::PartialObjectMeta,
    discovery::{Discovery, Scope, verbs},
    runtime::{WatchStreamExt, watcher},
};
use parking_lot::{Mutex, RwLock};
use serde_json::json;
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    informer::{Change, Informer},
    manager::Context,
    queue::{Lane, WorkQueue},
    util::not_found,
    worker::{Outcome, run_workers},
};

/// The finalizer of an owner deleted in the foreground (`propagationPolicy: Foreground`).
pub const FOREGROUND: &str = "foregroundDeletion";
/// The finalizer of an owner deleted with `propagationPolicy: Orphan`.
pub const ORPHAN: &str = "orphan";

/// How often discovery runs again, to watch resources that appeared (upstream's
/// `--garbage-collector` resync of monitors, 30 s).
const RESYNC_MONITORS: Duration = Duration::from_secs(30);
/// How long the workers wait for the first lists before starting anyway.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// How soon a virtual node that was found by a live GET, but not yet seen by a watch, is
/// looked at again; doubling on each further look, up to `UNOBSERVED_RETRY_MAX`.
const UNOBSERVED_RETRY: Duration = Duration::from_secs(1);
const UNOBSERVED_RETRY_MAX: Duration = Duration::from_secs(300);
/// Size of the cache of owners known to be absent (upstream: an LRU of 500).
const ABSENT_OWNER_CACHE: usize = 500;

type Meta = PartialObjectMeta<DynamicObject>;

/// Errors of the garbage collector.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("API call failed: {0}")]
    Api(#[from] kube::Error),
    /// An ownerReference names a kind the server does not serve (yet): retried, as
    /// upstream's restMappingError, since a CRD may appear.
    #[error("unable to map {0} to a served resource")]
    UnknownKind(String),
}

/// Where an object is: upstream's `objectReference` (ownerReference coordinates and the
/// namespace). Fields are in the order upstream's `referenceLessThan` compares them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// The kind.
    pub kind: String,
    /// The apiVersion (`group/version`, or `version` for the core group).
    pub api_version: String,
    /// The namespace, `""` for cluster-scoped objects.
    pub namespace: String,
    /// The name.
    pub name: String,
    /// The uid.
    pub uid: String,
}

impl Identity {
    /// The identity an ownerReference gives its owner, seen from a dependent in `namespace`.
    pub fn of_owner(owner: &OwnerReference, namespace: &str) -> Self {
        Self {
            kind: owner.kind.clone(),
            api_version: owner.api_version.clone(),
            namespace: namespace.to_string(),
            name: owner.name.clone(),
            uid: owner.uid.clone(),
        }
    }

    /// Whether the reference names this object's apiVersion, kind, name and uid
    /// (upstream's `ownerReferenceMatchesCoordinates`).
    pub fn matches(&self, owner: &OwnerReference) -> bool {
        owner.uid == self.uid
            && owner.api_version == self.api_version
            && owner.kind == self.kind
            && owner.name == self.name
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.api_version, self.kind)?;
        if !self.namespace.is_empty() {
            write!(f, " {}/{}", self.namespace, self.name)?;
        } else {
            write!(f, " {}", self.name)?;
        }
        write!(f, " (uid {})", self.uid)
    }
}

/// An object of the graph.
#[derive(Clone, Debug, Default)]
pub struct GraphNode {
    /// Where it is.
    pub identity: Identity,
    /// Its ownerReferences, as last observed.
    pub owners: Vec<OwnerReference>,
    /// The uids of the objects that name it as an owner.
    pub dependents: HashSet<String>,
    /// It has a deletionTimestamp.
    pub being_deleted: bool,
    /// It has a deletionTimestamp and the `foregroundDeletion` finalizer.
    pub deleting_dependents: bool,
    /// Known only from its dependents' ownerReferences, not (yet) from a watch.
    pub virtual_: bool,
}

/// What a watch (or the collector itself) reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// Added.
    Add,
    /// Changed.
    Update,
    /// Deleted.
    Delete,
}

/// A change to apply to the graph.
#[derive(Clone, Debug)]
pub struct GraphEvent {
    /// Added, changed, deleted.
    pub event_type: EventType,
    /// Made up by the collector after a live GET found nothing (upstream's virtual delete).
    pub virtual_: bool,
    /// The resource's apiVersion.
    pub api_version: String,
    /// The resource's kind.
    pub kind: String,
    /// The object's metadata.
    pub meta: ObjectMeta,
    /// The metadata before an update.
    pub old: Option<ObjectMeta>,
    /// The work queue lane of the work this causes.
    pub lane: Lane,
}

/// Work the graph asks for after a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Look at this uid in `attemptToDelete`.
    AttemptToDelete(String),
    /// The same, after a backoff (a virtual node that changed identity).
    AttemptToDeleteLater(String),
    /// Orphan this owner's dependents.
    AttemptToOrphan(String),
    /// This identity is known not to exist.
    Absent(Identity),
}

fn being_deleted(meta: &ObjectMeta) -> bool {
    meta.deletion_timestamp.is_some()
}

fn has_finalizer(meta: &ObjectMeta, finalizer: &str) -> bool {
    meta.finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == finalizer))
}

/// Whether the object starts being deleted with `finalizer` in this change (upstream's
/// `deletionStartsWithFinalizer`).
pub fn deletion_starts_with_finalizer(
    old: Option<&ObjectMeta>,
    new: &ObjectMeta,
    finalizer: &str,
) -> bool {
    if !being_deleted(new) || !has_finalizer(new, finalizer) {
        return false;
    }
    match old {
        None => true,
        Some(old) => !being_deleted(old) || !has_finalizer(old, finalizer),
    }
}

fn blocks(owner: &OwnerReference) -> bool {
    owner.block_owner_deletion == Some(true)
}

/// The references added, removed and changed between two ownerReferences lists, by uid
/// (upstream's `referencesDiffs`).
pub fn references_diffs(
    old: &[OwnerReference],
    new: &[OwnerReference],
) -> (
    Vec<OwnerReference>,
    Vec<OwnerReference>,
    Vec<(OwnerReference, OwnerReference)>,
) {
    let old_by_uid: HashMap<&str, &OwnerReference> =
        old.iter().map(|r| (r.uid.as_str(), r)).collect();
    let mut seen = HashSet::new();
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for r in new {
        match old_by_uid.get(r.uid.as_str()) {
            Some(o) => {
                seen.insert(r.uid.as_str());
                if *o != r {
                    changed.push(((*o).clone(), r.clone()));
                }
            }
            None => added.push(r.clone()),
        }
    }
    let removed = old
        .iter()
        .filter(|r| !seen.contains(r.uid.as_str()))
        .cloned()
        .collect();
    (added, removed, changed)
}

/// What the collector knows of one uid, for a worker.
#[derive(Clone, Debug)]
pub struct Item {
    /// Where it is.
    pub identity: Identity,
    /// Not yet seen by a watch.
    pub virtual_: bool,
    /// Has a deletionTimestamp.
    pub being_deleted: bool,
    /// Being deleted in the foreground.
    pub deleting_dependents: bool,
    /// Its dependents: uid, identity and whether each is itself deleting its dependents.
    pub dependents: Vec<(String, Identity, bool)>,
    /// Dependents whose reference to it has `blockOwnerDeletion: true`: uid and whether
    /// each is itself deleting its dependents.
    pub blocking_dependents: Vec<(String, bool)>,
}

/// The dependency graph (upstream's `GraphBuilder.uidToNode`).
#[derive(Default, Debug)]
pub struct Graph {
    nodes: HashMap<String, GraphNode>,
}

impl Graph {
    /// The node of a uid.
    pub fn get(&self, uid: &str) -> Option<&GraphNode> {
        self.nodes.get(uid)
    }

    /// How many nodes the graph holds.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the graph is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A worker's view of a uid.
    pub fn item(&self, uid: &str) -> Option<Item> {
        let node = self.nodes.get(uid)?;
        let mut dependents = Vec::new();
        let mut blocking = Vec::new();
        for dep_uid in &node.dependents {
            let Some(dep) = self.nodes.get(dep_uid) else {
                continue;
            };
            dependents.push((
                dep_uid.clone(),
                dep.identity.clone(),
                dep.deleting_dependents,
            ));
            if dep.owners.iter().any(|o| o.uid == uid && blocks(o)) {
                blocking.push((dep_uid.clone(), dep.deleting_dependents));
            }
        }
        dependents.sort_by(|a, b| a.0.cmp(&b.0));
        blocking.sort();
        Some(Item {
            identity: node.identity.clone(),
            virtual_: node.virtual_,
            being_deleted: node.being_deleted,
            deleting_dependents: node.deleting_dependents,
            dependents,
            blocking_dependents: blocking,
        })
    }

    /// Applies one change; returns the work it causes (upstream's `processGraphChanges`).
    pub fn process(&mut self, event: &GraphEvent) -> Vec<Action> {
        let mut actions = Vec::new();
        let meta = &event.meta;
        let Some(uid) = meta.uid.clone().filter(|u| !u.is_empty()) else {
            return actions;
        };
        let observed = Identity {
            kind: event.kind.clone(),
            api_version: event.api_version.clone(),
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid: uid.clone(),
        };
        let found = self.nodes.contains_key(&uid);
        if found && !event.virtual_ && self.nodes[&uid].virtual_ {
            // A watch now shows the object a virtual node stood for: dependents that named
            // it by other coordinates may be wrong, so have them checked.
            if self.nodes[&uid].identity != observed {
                let (_, nonmatching) = self.partition_dependents(&uid, &observed);
                for dep in nonmatching {
                    actions.push(Action::AttemptToDelete(dep));
                }
                if let Some(node) = self.nodes.get_mut(&uid) {
                    node.identity = observed.clone();
                }
            }
            if let Some(node) = self.nodes.get_mut(&uid) {
                node.virtual_ = false;
            }
        }
        let owners = meta.owner_references.clone().unwrap_or_default();
        match event.event_type {
            EventType::Add | EventType::Update if !found => {
                let node = GraphNode {
                    identity: observed,
                    owners: owners.clone(),
                    dependents: HashSet::new(),
                    being_deleted: being_deleted(meta),
                    deleting_dependents: being_deleted(meta) && has_finalizer(meta, FOREGROUND),
                    virtual_: false,
                };
                self.nodes.insert(uid.clone(), node);
                self.add_dependent_to_owners(&uid, &owners, &mut actions);
                self.process_transitions(event.old.as_ref(), meta, &uid, &mut actions);
            }
            EventType::Add | EventType::Update => {
                if !event.virtual_
                    && let Some(node) = self.nodes.get_mut(&uid)
                    && (node.identity.api_version != event.api_version
                        || node.identity.kind != event.kind)
                {
                    node.identity.api_version = event.api_version.clone();
                    node.identity.kind = event.kind.clone();
                }
                let old_owners = self.nodes[&uid].owners.clone();
                let (added, removed, changed) = references_diffs(&old_owners, &owners);
                if !added.is_empty() || !removed.is_empty() || !changed.is_empty() {
                    // An owner waiting for its blocking dependents may be unblocked.
                    for r in &removed {
                        if blocks(r) && self.nodes.contains_key(&r.uid) {
                            actions.push(Action::AttemptToDelete(r.uid.clone()));
                        }
                    }
                    for (old, new) in &changed {
                        if blocks(old) && !blocks(new) && self.nodes.contains_key(&new.uid) {
                            actions.push(Action::AttemptToDelete(new.uid.clone()));
                        }
                    }
                    if let Some(node) = self.nodes.get_mut(&uid) {
                        node.owners = owners.clone();
                    }
                    self.add_dependent_to_owners(&uid, &added, &mut actions);
                    for r in &removed {
                        if let Some(owner) = self.nodes.get_mut(&r.uid) {
                            owner.dependents.remove(&uid);
                        }
                    }
                }
                if being_deleted(meta)
                    && let Some(node) = self.nodes.get_mut(&uid)
                {
                    node.being_deleted = true;
                }
                self.process_transitions(event.old.as_ref(), meta, &uid, &mut actions);
            }
            EventType::Delete => {
                if !found {
                    return actions;
                }
                let mut remove = true;
                if event.virtual_ {
                    let deleted = observed.clone();
                    let existing = &self.nodes[&uid];
                    if existing.virtual_ {
                        // Dependents may name this uid with other coordinates: only the
                        // ones matching the identity verified absent are garbage.
                        let existing_identity = existing.identity.clone();
                        let (matching, nonmatching) = self.partition_dependents(&uid, &deleted);
                        if !nonmatching.is_empty() {
                            remove = false;
                            if !matching.is_empty() {
                                actions.push(Action::Absent(deleted.clone()));
                                for dep in matching {
                                    actions.push(Action::AttemptToDelete(dep));
                                }
                            }
                            if existing_identity == deleted
                                && let Some(replacement) =
                                    self.alternate_owner_identity(&nonmatching, &deleted)
                            {
                                if let Some(node) = self.nodes.get_mut(&uid) {
                                    node.identity = replacement;
                                }
                                actions.push(Action::AttemptToDeleteLater(uid.clone()));
                            }
                        }
                    } else if existing.identity != deleted {
                        // A watch shows the object under other coordinates: it exists.
                        remove = false;
                        let (matching, _) = self.partition_dependents(&uid, &deleted);
                        if !matching.is_empty() {
                            actions.push(Action::Absent(deleted.clone()));
                            for dep in matching {
                                actions.push(Action::AttemptToDelete(dep));
                            }
                        }
                    }
                }
                if remove && let Some(node) = self.nodes.remove(&uid) {
                    for owner in &node.owners {
                        if let Some(o) = self.nodes.get_mut(&owner.uid) {
                            o.dependents.remove(&uid);
                        }
                    }
                    if !node.dependents.is_empty() {
                        actions.push(Action::Absent(observed));
                    }
                    let mut deps: Vec<&String> = node.dependents.iter().collect();
                    deps.sort();
                    for dep in deps {
                        actions.push(Action::AttemptToDelete(dep.clone()));
                    }
                    for owner in &node.owners {
                        // An owner deleting in the foreground may have lost its last
                        // blocking dependent.
                        if self
                            .nodes
                            .get(&owner.uid)
                            .is_some_and(|o| o.deleting_dependents)
                        {
                            actions.push(Action::AttemptToDelete(owner.uid.clone()));
                        }
                    }
                }
            }
        }
        actions
    }

    fn process_transitions(
        &mut self,
        old: Option<&ObjectMeta>,
        new: &ObjectMeta,
        uid: &str,
        actions: &mut Vec<Action>,
    ) {
        if deletion_starts_with_finalizer(old, new, ORPHAN) {
            actions.push(Action::AttemptToOrphan(uid.to_string()));
            return;
        }
        if deletion_starts_with_finalizer(old, new, FOREGROUND)
            && let Some(node) = self.nodes.get_mut(uid)
        {
            node.deleting_dependents = true;
            let mut deps: Vec<&String> = node.dependents.iter().collect();
            deps.sort();
            for dep in deps {
                actions.push(Action::AttemptToDelete(dep.clone()));
            }
            actions.push(Action::AttemptToDelete(uid.to_string()));
        }
    }

    /// Adds `uid` to its owners' dependents, making virtual nodes for owners not seen yet
    /// (upstream's `addDependentToOwners`).
    fn add_dependent_to_owners(
        &mut self,
        uid: &str,
        owners: &[OwnerReference],
        actions: &mut Vec<Action>,
    ) {
        let Some(namespace) = self.nodes.get(uid).map(|n| n.identity.namespace.clone()) else {
            return;
        };
        let mut potentially_invalid = false;
        for owner in owners {
            match self.nodes.get_mut(&owner.uid) {
                None => {
                    let mut node = GraphNode {
                        identity: Identity::of_owner(owner, &namespace),
                        virtual_: true,
                        ..Default::default()
                    };
                    node.dependents.insert(uid.to_string());
                    self.nodes.insert(owner.uid.clone(), node);
                    // A live GET will tell whether the owner exists.
                    actions.push(Action::AttemptToDelete(owner.uid.clone()));
                }
                Some(node) => {
                    node.dependents.insert(uid.to_string());
                    if potentially_invalid {
                        continue;
                    }
                    // The reference may be wrong when it names the owner in another
                    // namespace, by other coordinates, or (for a virtual, cluster-scoped
                    // owner) from another namespace: a namespaced kind named as if it
                    // were cluster-scoped (kubernetes#98040). The dependent is checked.
                    let owner_namespaced = !node.identity.namespace.is_empty();
                    let other_namespace = node.identity.namespace != namespace;
                    potentially_invalid = !node.identity.matches(owner)
                        || (other_namespace && (owner_namespaced || node.virtual_));
                }
            }
        }
        if potentially_invalid {
            actions.push(Action::AttemptToDelete(uid.to_string()));
        }
    }

    /// The dependents of `owner_uid` whose reference matches `identity`, and those with a
    /// reference to that uid that does not (upstream's `partitionDependents`).
    fn partition_dependents(
        &self,
        owner_uid: &str,
        identity: &Identity,
    ) -> (Vec<String>, Vec<String>) {
        let mut matching = Vec::new();
        let mut nonmatching = Vec::new();
        let Some(owner) = self.nodes.get(owner_uid) else {
            return (matching, nonmatching);
        };
        let mut deps: Vec<&String> = owner.dependents.iter().collect();
        deps.sort();
        for dep_uid in deps {
            let Some(dep) = self.nodes.get(dep_uid) else {
                continue;
            };
            let mut found_match = false;
            let mut found_mismatch = false;
            if !identity.namespace.is_empty() && identity.namespace != dep.identity.namespace {
                found_mismatch = true;
            } else {
                for r in &dep.owners {
                    if r.uid == identity.uid {
                        if identity.matches(r) {
                            found_match = true;
                        } else {
                            found_mismatch = true;
                        }
                    }
                }
            }
            if found_match {
                matching.push(dep_uid.clone());
            }
            if found_mismatch {
                nonmatching.push(dep_uid.clone());
            }
        }
        (matching, nonmatching)
    }

    /// Another identity the dependents give the absent uid: the first after `absent` in
    /// upstream's order, else the first (upstream's `getAlternateOwnerIdentity`).
    fn alternate_owner_identity(&self, deps: &[String], absent: &Identity) -> Option<Identity> {
        let cluster_scoped = absent.namespace.is_empty();
        let mut seen: HashSet<Identity> = HashSet::from([absent.clone()]);
        let mut first: Option<Identity> = None;
        let mut first_following: Option<Identity> = None;
        for dep_uid in deps {
            let Some(dep) = self.nodes.get(dep_uid) else {
                continue;
            };
            for r in &dep.owners {
                if r.uid != absent.uid {
                    continue;
                }
                if absent.matches(r)
                    && (cluster_scoped || absent.namespace == dep.identity.namespace)
                {
                    continue;
                }
                let mut candidate = Identity::of_owner(r, &dep.identity.namespace);
                if cluster_scoped
                    && candidate.api_version == absent.api_version
                    && candidate.kind == absent.kind
                {
                    candidate.namespace.clear();
                }
                if !seen.insert(candidate.clone()) {
                    continue;
                }
                if first.as_ref().is_none_or(|f| candidate < *f) {
                    first = Some(candidate.clone());
                }
                if *absent < candidate && first_following.as_ref().is_none_or(|f| candidate < *f) {
                    first_following = Some(candidate);
                }
            }
        }
        first_following.or(first)
    }
}

/// Owners known not to exist (upstream's `absentOwnerCache`): bounded, oldest out first.
#[derive(Default, Debug)]
struct AbsentOwners {
    set: HashSet<Identity>,
    order: VecDeque<Identity>,
}

impl AbsentOwners {
    fn add(&mut self, identity: Identity) {
        if self.set.insert(identity.clone()) {
            self.order.push_back(identity);
            while self.order.len() > ABSENT_OWNER_CACHE {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn has(&self, identity: &Identity) -> bool {
        self.set.contains(identity)
    }
}

/// How an item's ownerReferences stand (upstream's `classifyReferences`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Classified {
    /// Owners that exist and are not deleting their dependents.
    pub solid: Vec<OwnerReference>,
    /// Owners that do not exist.
    pub dangling: Vec<OwnerReference>,
    /// Owners that exist and are deleting their dependents in the foreground.
    pub waiting: Vec<OwnerReference>,
}

/// What `attemptToDelete` does with an object that has owners (upstream's
/// `attemptToDeleteItem` switch).
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// An owner exists: keep the object as it is.
    Keep,
    /// An owner exists, but some references are dangling or wait for the object's
    /// deletion: remove those references (by uid).
    RemoveReferences(Vec<String>),
    /// Its owners are deleting their dependents in the foreground and it has dependents of
    /// its own: delete it in the foreground too, first making its references
    /// non-blocking if a dependent of it is also deleting its dependents (a cycle).
    DeleteForeground {
        /// Make its ownerReferences non-blocking first.
        unblock: bool,
    },
    /// It is garbage: delete it with this policy.
    Delete(PropagationPolicy),
}

/// Decides the fate of an object with ownerReferences.
pub fn decide(
    classified: &Classified,
    finalizers: &[String],
    has_dependents: bool,
    dependent_deleting_dependents: bool,
) -> Decision {
    if !classified.solid.is_empty() {
        if classified.dangling.is_empty() && classified.waiting.is_empty() {
            return Decision::Keep;
        }
        // References to owners waiting for this object must go too, or those owners would
        // wait forever.
        let uids = classified
            .dangling
            .iter()
            .chain(&classified.waiting)
            .map(|r| r.uid.clone())
            .collect();
        return Decision::RemoveReferences(uids);
    }
    if !classified.waiting.is_empty() && has_dependents {
        return Decision::DeleteForeground {
            unblock: dependent_deleting_dependents,
        };
    }
    // No solid owner: garbage. An existing finalizer says how its own dependents go.
    let policy = if finalizers.iter().any(|f| f == ORPHAN) {
        PropagationPolicy::Orphan
    } else if finalizers.iter().any(|f| f == FOREGROUND) {
        PropagationPolicy::Foreground
    } else {
        PropagationPolicy::Background
    };
    Decision::Delete(policy)
}

/// The resources worth watching: listable, watchable, deletable; not events.
pub fn deletable(group: &str, resource: &ApiResource, verbs_: &[String]) -> bool {
    let supports = |v: &str| verbs_.iter().any(|x| x == v);
    if resource.plural == "events" && (group.is_empty() || group == "events.k8s.io") {
        return false;
    }
    supports(verbs::LIST) && supports(verbs::WATCH) && supports(verbs::DELETE)
}

struct Gc {
    client: Client,
    graph: Mutex<Graph>,
    /// Virtual nodes found to exist but not yet seen by a watch: how often looked at.
    unobserved: Mutex<HashMap<String, u32>>,
    absent: Mutex<AbsentOwners>,
    discovery: RwLock<Option<Arc<Discovery>>>,
    events: mpsc::UnboundedSender<GraphEvent>,
    attempt_to_delete: WorkQueue<String>,
    attempt_to_orphan: WorkQueue<String>,
}

/// Starts the garbage collector: its own metadata watches of every deletable resource, the
/// graph builder, and the `attemptToDelete` and `attemptToOrphan` workers.
pub fn start(ctx: &Arc<Context>) -> BoxFuture<'static, ()> {
    let (tx, rx) = mpsc::unbounded_channel();
    let gc = Arc::new(Gc {
        client: ctx.client.clone(),
        graph: Mutex::new(Graph::default()),
        unobserved: Mutex::new(HashMap::new()),
        absent: Mutex::new(AbsentOwners::default()),
        discovery: RwLock::new(None),
        events: tx,
        attempt_to_delete: ctx.queue("garbagecollector"),
        attempt_to_orphan: ctx.queue("garbagecollector-orphan"),
    });
    let workers = ctx.config.workers;
    Box::pin(gc.run(rx, workers))
}

struct Monitor {
    informer: Informer<Meta>,
    task: tokio::task::AbortHandle,
}

impl Gc {
    async fn run(self: Arc<Self>, rx: mpsc::UnboundedReceiver<GraphEvent>, workers: usize) {
        // Everything runs in this set, so that dropping the future (leadership lost) stops
        // the watches and workers with it.
        let mut tasks = JoinSet::new();
        tasks.spawn(self.clone().process_graph_changes(rx));
        let mut monitors: HashMap<String, Monitor> = HashMap::new();
        loop {
            match self.sync_monitors(&mut monitors, &mut tasks).await {
                Ok(()) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "garbage collector: discovery failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let synced = futures::future::join_all(
            monitors
                .values()
                .map(|m| m.informer.clone())
                .collect::<Vec<_>>()
                .into_iter()
                .map(|i| async move { i.wait_synced().await }),
        );
        if tokio::time::timeout(SYNC_TIMEOUT, synced).await.is_err() {
            // Deletions are verified with live GETs, so an incomplete graph is only slower.
            tracing::warn!("garbage collector: not every resource listed in time; starting anyway");
        }
        tracing::info!(
            resources = monitors.len(),
            objects = self.graph.lock().len(),
            "garbage collector synced"
        );
        {
            let gc = self.clone();
            tasks.spawn(run_workers(
                self.attempt_to_delete.clone(),
                workers,
                move |uid: String| {
                    let gc = gc.clone();
                    async move { gc.attempt_to_delete_worker(&uid).await }
                },
            ));
        }
        {
            let gc = self.clone();
            tasks.spawn(run_workers(
                self.attempt_to_orphan.clone(),
                workers,
                move |uid: String| {
                    let gc = gc.clone();
                    async move { gc.attempt_to_orphan(&uid).await }
                },
            ));
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RESYNC_MONITORS) => {
                    if let Err(err) = self.sync_monitors(&mut monitors, &mut tasks).await {
                        tracing::warn!(error = %err, "garbage collector: discovery failed");
                    }
                }
                done = tasks.join_next() => {
                    if done.is_none() {
                        break;
                    }
                }
            }
        }
    }

    /// Runs discovery; watches resources that appeared and stops watching those gone.
    async fn sync_monitors(
        self: &Arc<Self>,
        monitors: &mut HashMap<String, Monitor>,
        tasks: &mut JoinSet<()>,
    ) -> Result<(), Error> {
        let discovery = Discovery::new(self.client.clone()).run().await?;
        let mut wanted: HashMap<String, ApiResource> = HashMap::new();
        for group in discovery.groups() {
            for (resource, caps) in group.recommended_resources() {
                let verbs_: Vec<String> = caps.operations.clone();
                if !deletable(&resource.group, &resource, &verbs_) {
                    continue;
                }
                let key = format!("{}/{}", resource.api_version, resource.plural);
                wanted.insert(key, resource);
            }
        }
        *self.discovery.write() = Some(Arc::new(discovery));
        monitors.retain(|key, monitor| {
            let keep = wanted.contains_key(key);
            if !keep {
                tracing::info!(resource = %key, "garbage collector: resource gone; no longer watched");
                monitor.task.abort();
            }
            keep
        });
        for (key, resource) in wanted {
            if monitors.contains_key(&key) {
                continue;
            }
            let informer: Informer<Meta> = Informer::new(&format!("gc:{key}"));
            let tx = self.events.clone();
            let api_version = resource.api_version.clone();
            let kind = resource.kind.clone();
            informer.add_handler(move |change: &Change<Meta>| {
                let send = |event_type, meta: &ObjectMeta, old: Option<&ObjectMeta>| {
                    let _ = tx.send(GraphEvent {
                        event_type,
                        virtual_: false,
                        api_version: api_version.clone(),
                        kind: kind.clone(),
                        meta: meta.clone(),
                        old: old.cloned(),
                        lane: change.lane(),
                    });
                };
                match change {
                    Change::Add(obj) => send(EventType::Add, &obj.metadata, None),
                    // The cache is keyed by name: after a relist, an object deleted and
                    // recreated under the same name shows as an update. They are two
                    // objects to the graph.
                    Change::Update { old, new } if old.metadata.uid != new.metadata.uid => {
                        send(EventType::Delete, &old.metadata, None);
                        send(EventType::Add, &new.metadata, None);
                    }
                    Change::Update { old, new } => {
                        send(EventType::Update, &new.metadata, Some(&old.metadata))
                    }
                    Change::Delete(obj) => send(EventType::Delete, &obj.metadata, None),
                    Change::Sync(obj) => {
                        send(EventType::Update, &obj.metadata, Some(&obj.metadata))
                    }
                }
            });
            let api: Api<Meta> = Api::all_with(self.client.clone(), &resource);
            let events = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            let task = tasks.spawn(informer.clone().run_stream(events, None));
            monitors.insert(key, Monitor { informer, task });
        }
        Ok(())
    }

    async fn process_graph_changes(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<GraphEvent>) {
        while let Some(event) = rx.recv().await {
            let actions = self.graph.lock().process(&event);
            for action in actions {
                match action {
                    Action::AttemptToDelete(uid) => self.attempt_to_delete.add(uid, event.lane),
                    Action::AttemptToDeleteLater(uid) => {
                        self.attempt_to_delete.add_rate_limited(uid, Lane::Update)
                    }
                    Action::AttemptToOrphan(uid) => self.attempt_to_orphan.add(uid, event.lane),
                    Action::Absent(identity) => self.absent.lock().add(identity),
                }
            }
        }
    }

    fn enqueue_virtual_delete(&self, identity: &Identity) {
        let _ = self.events.send(GraphEvent {
            event_type: EventType::Delete,
            virtual_: true,
            api_version: identity.api_version.clone(),
            kind: identity.kind.clone(),
            meta: ObjectMeta {
                namespace: (!identity.namespace.is_empty()).then(|| identity.namespace.clone()),
                name: Some(identity.name.clone()),
                uid: Some(identity.uid.clone()),
                ..Default::default()
            },
            old: None,
            lane: Lane::Delete,
        });
    }

    /// The resource of an apiVersion and kind, and whether it is namespaced.
    fn resource(&self, api_version: &str, kind: &str) -> Result<(ApiResource, bool), Error> {
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let discovery = self.discovery.read().clone();
        discovery
            .and_then(|d| d.resolve_gvk(&gvk))
            .map(|(ar, caps)| (ar, caps.scope == Scope::Namespaced))
            .ok_or_else(|| Error::UnknownKind(format!("{api_version}/{kind}")))
    }

    fn api(&self, identity: &Identity) -> Result<Option<Api<DynamicObject>>, Error> {
        let (resource, namespaced) = self.resource(&identity.api_version, &identity.kind)?;
        Ok(match (namespaced, identity.namespace.is_empty()) {
            // A namespaced kind without a namespace names nothing.
            (true, true) => None,
            (true, false) => Some(Api::namespaced_with(
                self.client.clone(),
                &identity.namespace,
                &resource,
            )),
            (false, _) => Some(Api::all_with(self.client.clone(), &resource)),
        })
    }

    /// The live metadata of an object, `None` if it does not exist.
    async fn get_object(&self, identity: &Identity) -> Result<Option<ObjectMeta>, Error> {
        let Some(api) = self.api(identity)? else {
            return Ok(None);
        };
        Ok(api
            .get_metadata_opt(&identity.name)
            .await?
            .map(|m| m.metadata))
    }

    async fn attempt_to_delete_worker(&self, uid: &str) -> Result<Outcome, Error> {
        let Some(item) = self.graph.lock().item(uid) else {
            self.unobserved.lock().remove(uid);
            return Ok(Outcome::Done);
        };
        let processed = self.attempt_to_delete_item(&item).await?;
        if matches!(processed, Processed::Done) && item.virtual_ {
            // Found by a live GET but not yet by a watch: look again until the watch shows
            // it, or a virtual node for an object created and deleted while the watch was
            // down would stay in the graph (kubernetes#56121). Backing off, as upstream
            // requeues with its rate limiter: the kind may be one nothing watches.
            let mut unobserved = self.unobserved.lock();
            let looks = unobserved.entry(uid.to_string()).or_insert(0);
            let delay = UNOBSERVED_RETRY
                .saturating_mul(1 << (*looks).min(16))
                .min(UNOBSERVED_RETRY_MAX);
            *looks += 1;
            return Ok(Outcome::RequeueAfter(delay));
        }
        self.unobserved.lock().remove(uid);
        Ok(Outcome::Done)
    }

    async fn attempt_to_delete_item(&self, item: &Item) -> Result<Processed, Error> {
        tracing::debug!(item = %item.identity, virtual_ = item.virtual_, "garbage collector: processing");
        // Being deleted is a one-way trip: its dependents are handled once it is gone.
        if item.being_deleted && !item.deleting_dependents {
            return Ok(Processed::Done);
        }
        let latest = match self.get_object(&item.identity).await? {
            Some(latest) if latest.uid.as_deref() == Some(item.identity.uid.as_str()) => latest,
            _ => {
                self.enqueue_virtual_delete(&item.identity);
                return Ok(Processed::VirtualDeleteQueued);
            }
        };
        if item.deleting_dependents {
            self.process_deleting_dependents(item).await?;
            return Ok(Processed::Done);
        }
        let owners = latest.owner_references.clone().unwrap_or_default();
        if owners.is_empty() {
            return Ok(Processed::Done);
        }
        let classified = match self.classify_references(item, &owners).await? {
            Some(c) => c,
            None => return Ok(Processed::Invalid),
        };
        let finalizers = latest.finalizers.clone().unwrap_or_default();
        let dependent_deleting = item.dependents.iter().any(|(_, _, d)| *d);
        let decision = decide(
            &classified,
            &finalizers,
            !item.dependents.is_empty(),
            dependent_deleting,
        );
        tracing::debug!(item = %item.identity, ?decision, "garbage collector: decided");
        match decision {
            Decision::Keep => Ok(Processed::Done),
            Decision::RemoveReferences(uids) => {
                tracing::info!(item = %item.identity, owners = ?uids, "garbage collector: removing dangling ownerReferences");
                self.patch_owner_references(&item.identity, &latest, |refs| {
                    refs.retain(|r| !uids.contains(&r.uid));
                })
                .await?;
                Ok(Processed::Done)
            }
            Decision::DeleteForeground { unblock } => {
                let mut latest = latest;
                if unblock {
                    // Its owner and a dependent of its both delete in the foreground: a
                    // possible cycle, which blocking references would deadlock.
                    if let Some(patched) = self
                        .patch_owner_references(&item.identity, &latest, |refs| {
                            for r in refs.iter_mut() {
                                if blocks(r) {
                                    r.block_owner_deletion = Some(false);
                                }
                            }
                        })
                        .await?
                    {
                        latest = patched;
                    }
                }
                tracing::info!(item = %item.identity, "garbage collector: deleting in the foreground, as its owner");
                self.delete_object(&item.identity, &latest, PropagationPolicy::Foreground)
                    .await
            }
            Decision::Delete(policy) => {
                tracing::info!(item = %item.identity, ?policy, "garbage collector: deleting an object whose owners are gone");
                self.delete_object(&item.identity, &latest, policy).await
            }
        }
    }

    /// An owner deleting in the foreground: its finalizer goes once no dependent blocks it;
    /// until then its blocking dependents are deleted.
    async fn process_deleting_dependents(&self, item: &Item) -> Result<(), Error> {
        if item.blocking_dependents.is_empty() {
            tracing::info!(item = %item.identity, "garbage collector: dependents gone; removing the foregroundDeletion finalizer");
            return self.remove_finalizer(&item.identity, FOREGROUND).await;
        }
        for (dep, deleting) in &item.blocking_dependents {
            if !deleting {
                self.attempt_to_delete.add(dep.clone(), Lane::Update);
            }
        }
        Ok(())
    }

    /// Sorts references into solid, dangling and waiting, with live GETs of the owners.
    /// `None`: a cluster-scoped object names a namespaced owner, which cannot be resolved.
    async fn classify_references(
        &self,
        item: &Item,
        owners: &[OwnerReference],
    ) -> Result<Option<Classified>, Error> {
        let mut classified = Classified::default();
        for reference in owners {
            match self.is_dangling(reference, item).await? {
                Dangling::Invalid => return Ok(None),
                Dangling::Yes => classified.dangling.push(reference.clone()),
                Dangling::No(owner) => {
                    if being_deleted(&owner) && has_finalizer(&owner, FOREGROUND) {
                        classified.waiting.push(reference.clone());
                    } else {
                        classified.solid.push(reference.clone());
                    }
                }
            }
        }
        Ok(Some(classified))
    }

    async fn is_dangling(
        &self,
        reference: &OwnerReference,
        item: &Item,
    ) -> Result<Dangling, Error> {
        let mut key = Identity::of_owner(reference, "");
        if self.absent.lock().has(&key) {
            return Ok(Dangling::Yes);
        }
        key.namespace = item.identity.namespace.clone();
        if self.absent.lock().has(&key) {
            return Ok(Dangling::Yes);
        }
        let (resource, namespaced) = self.resource(&reference.api_version, &reference.kind)?;
        if !namespaced {
            key.namespace.clear();
        }
        if item.identity.namespace.is_empty() && namespaced {
            tracing::info!(item = %item.identity, owner = %reference.name, "garbage collector: a cluster-scoped object names a namespaced owner");
            return Ok(Dangling::Invalid);
        }
        let api: Api<DynamicObject> = if namespaced {
            Api::namespaced_with(self.client.clone(), &item.identity.namespace, &resource)
        } else {
            Api::all_with(self.client.clone(), &resource)
        };
        match api.get_metadata_opt(&reference.name).await? {
            Some(owner) if owner.metadata.uid.as_deref() == Some(reference.uid.as_str()) => {
                Ok(Dangling::No(Box::new(owner.metadata)))
            }
            // Not found, or a namesake with another uid: the owner is gone.
            _ => {
                self.absent.lock().add(key);
                Ok(Dangling::Yes)
            }
        }
    }

    /// Rewrites an object's ownerReferences, on the version read (a conflict is retried
    /// by the worker). Returns the patched metadata, `None` if nothing changed or the
    /// object is gone.
    async fn patch_owner_references(
        &self,
        identity: &Identity,
        latest: &ObjectMeta,
        change: impl FnOnce(&mut Vec<OwnerReference>),
    ) -> Result<Option<ObjectMeta>, Error> {
        let Some(api) = self.api(identity)? else {
            return Ok(None);
        };
        let old = latest.owner_references.clone().unwrap_or_default();
        let mut refs = old.clone();
        change(&mut refs);
        if refs == old {
            return Ok(None);
        }
        let value = if refs.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::to_value(&refs).unwrap_or_default()
        };
        let metadata = json!({
            "resourceVersion": latest.resource_version,
            "ownerReferences": value,
        });
        merge_metadata(&api, &identity.name, metadata).await
    }

    /// Deletes an object, on the version read unless only unrelated fields changed since
    /// (upstream's `deleteObject`).
    async fn delete_object(
        &self,
        identity: &Identity,
        latest: &ObjectMeta,
        policy: PropagationPolicy,
    ) -> Result<Processed, Error> {
        let Some(api) = self.api(identity)? else {
            self.enqueue_virtual_delete(identity);
            return Ok(Processed::VirtualDeleteQueued);
        };
        let params = |rv: Option<String>| DeleteParams {
            propagation_policy: Some(policy.clone()),
            preconditions: Some(Preconditions {
                uid: Some(identity.uid.clone()),
                resource_version: rv,
            }),
            ..Default::default()
        };
        let result = match api
            .delete(&identity.name, &params(latest.resource_version.clone()))
            .await
        {
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Changed since read: delete anyway if its ownerReferences did not change.
                match api.get_metadata_opt(&identity.name).await? {
                    None => {
                        self.enqueue_virtual_delete(identity);
                        return Ok(Processed::VirtualDeleteQueued);
                    }
                    Some(live)
                        if live.metadata.uid.as_deref() == Some(identity.uid.as_str())
                            && live.metadata.owner_references == latest.owner_references =>
                    {
                        api.delete(&identity.name, &params(None)).await
                    }
                    Some(_) => return Err(Error::Api(kube::Error::Api(status))),
                }
            }
            other => other,
        };
        match result {
            Ok(_) => Ok(Processed::Done),
            Err(err) if not_found(&err) => {
                self.enqueue_virtual_delete(identity);
                Ok(Processed::VirtualDeleteQueued)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Removes a finalizer from an object, on the version read.
    async fn remove_finalizer(&self, identity: &Identity, finalizer: &str) -> Result<(), Error> {
        let Some(api) = self.api(identity)? else {
            return Ok(());
        };
        let Some(live) = api.get_metadata_opt(&identity.name).await? else {
            return Ok(());
        };
        if live.metadata.uid.as_deref() != Some(identity.uid.as_str()) {
            return Ok(());
        }
        let finalizers = live.metadata.finalizers.clone().unwrap_or_default();
        if !finalizers.iter().any(|f| f == finalizer) {
            return Ok(());
        }
        let rest: Vec<&String> = finalizers.iter().filter(|f| *f != finalizer).collect();
        let metadata = json!({
            "resourceVersion": live.metadata.resource_version,
            "finalizers": rest,
        });
        merge_metadata(&api, &identity.name, metadata).await?;
        Ok(())
    }

    /// An owner deleted with the `orphan` finalizer: its dependents lose their reference to
    /// it, then the finalizer goes.
    async fn attempt_to_orphan(&self, uid: &str) -> Result<Outcome, Error> {
        let Some(owner) = self.graph.lock().item(uid) else {
            return Ok(Outcome::Done);
        };
        let results = futures::future::join_all(
            owner
                .dependents
                .iter()
                .map(|(_, dep, _)| self.orphan_dependent(dep, uid)),
        )
        .await;
        for result in results {
            result?;
        }
        tracing::info!(owner = %owner.identity, dependents = owner.dependents.len(), "garbage collector: dependents orphaned; removing the orphan finalizer");
        self.remove_finalizer(&owner.identity, ORPHAN).await?;
        Ok(Outcome::Done)
    }

    async fn orphan_dependent(&self, dependent: &Identity, owner_uid: &str) -> Result<(), Error> {
        let Some(latest) = self.get_object(dependent).await? else {
            return Ok(());
        };
        if latest.uid.as_deref() != Some(dependent.uid.as_str()) {
            return Ok(());
        }
        self.patch_owner_references(dependent, &latest, |refs| {
            refs.retain(|r| r.uid != owner_uid);
        })
        .await?;
        Ok(())
    }
}

enum Dangling {
    Yes,
    No(Box<ObjectMeta>),
    Invalid,
}

enum Processed {
    Done,
    VirtualDeleteQueued,
    Invalid,
}

/// Merge-patches an object's metadata (with its resourceVersion in `metadata`, so that a
/// concurrent change is a conflict the worker retries); `None` when the object is gone.
async fn merge_metadata(
    api: &Api<DynamicObject>,
    name: &str,
    metadata: serde_json::Value,
) -> Result<Option<ObjectMeta>, Error> {
    let patch = json!({ "metadata": metadata });
    match api
        .patch_metadata(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(patched) => Ok(Some(patched.metadata)),
        Err(err) if not_found(&err) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner_ref(kind: &str, name: &str, uid: &str, block: bool) -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            controller: None,
            block_owner_deletion: block.then_some(true),
        }
    }

    fn meta(name: &str, uid: &str, owners: Vec<OwnerReference>) -> ObjectMeta {
        ObjectMeta {
            namespace: Some("ns".into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            owner_references: (!owners.is_empty()).then_some(owners),
            ..Default::default()
        }
    }

    fn event(event_type: EventType, meta: ObjectMeta, old: Option<ObjectMeta>) -> GraphEvent {
        GraphEvent {
            event_type,
            virtual_: false,
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            meta,
            old,
            lane: Lane::Add,
        }
    }

    #[test]
    fn a_dependent_of_an_unseen_owner_makes_a_virtual_node_to_check() {
        let mut graph = Graph::default();
        let actions = graph.process(&event(
            EventType::Add,
            meta(
                "child",
                "c",
                vec![owner_ref("ConfigMap", "parent", "p", false)],
            ),
            None,
        ));
        assert_eq!(actions, vec![Action::AttemptToDelete("p".into())]);
        let owner = graph.get("p").unwrap();
        assert!(owner.virtual_);
        assert!(owner.dependents.contains("c"));
        assert_eq!(owner.identity.namespace, "ns");
        // The watch then shows the owner: no longer virtual, nothing to do.
        let actions = graph.process(&event(EventType::Add, meta("parent", "p", vec![]), None));
        assert!(actions.is_empty());
        assert!(!graph.get("p").unwrap().virtual_);
    }

    #[test]
    fn deleting_an_owner_queues_its_dependents_and_records_it_absent() {
        let mut graph = Graph::default();
        graph.process(&event(EventType::Add, meta("parent", "p", vec![]), None));
        graph.process(&event(
            EventType::Add,
            meta(
                "child",
                "c",
                vec![owner_ref("ConfigMap", "parent", "p", false)],
            ),
            None,
        ));
        let actions = graph.process(&event(EventType::Delete, meta("parent", "p", vec![]), None));
        assert!(actions.contains(&Action::AttemptToDelete("c".into())));
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Absent(i) if i.uid == "p"))
        );
        assert!(graph.get("p").is_none());
    }

    #[test]
    fn foreground_deletion_queues_dependents_and_the_owner() {
        let mut graph = Graph::default();
        let parent = meta("parent", "p", vec![]);
        graph.process(&event(EventType::Add, parent.clone(), None));
        graph.process(&event(
            EventType::Add,
            meta(
                "child",
                "c",
                vec![owner_ref("ConfigMap", "parent", "p", true)],
            ),
            None,
        ));
        let mut deleting = parent.clone();
        deleting.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        deleting.finalizers = Some(vec![FOREGROUND.into()]);
        let actions = graph.process(&event(EventType::Update, deleting, Some(parent)));
        assert_eq!(
            actions,
            vec![
                Action::AttemptToDelete("c".into()),
                Action::AttemptToDelete("p".into())
            ]
        );
        let item = graph.item("p").unwrap();
        assert!(item.deleting_dependents);
        assert_eq!(item.blocking_dependents, vec![("c".to_string(), false)]);
        // The dependent goes: the owner is looked at again.
        let actions = graph.process(&event(
            EventType::Delete,
            meta(
                "child",
                "c",
                vec![owner_ref("ConfigMap", "parent", "p", true)],
            ),
            None,
        ));
        assert_eq!(actions, vec![Action::AttemptToDelete("p".into())]);
        assert!(graph.item("p").unwrap().blocking_dependents.is_empty());
    }

    #[test]
    fn orphan_deletion_queues_the_owner_for_orphaning() {
        let mut graph = Graph::default();
        let parent = meta("parent", "p", vec![]);
        graph.process(&event(EventType::Add, parent.clone(), None));
        let mut deleting = parent.clone();
        deleting.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        deleting.finalizers = Some(vec![ORPHAN.into()]);
        let actions = graph.process(&event(EventType::Update, deleting.clone(), Some(parent)));
        assert_eq!(actions, vec![Action::AttemptToOrphan("p".into())]);
        // Not again on a later update.
        let actions = graph.process(&event(EventType::Update, deleting.clone(), Some(deleting)));
        assert!(actions.is_empty());
    }

    #[test]
    fn removing_a_blocking_reference_unblocks_the_owner() {
        let mut graph = Graph::default();
        graph.process(&event(EventType::Add, meta("parent", "p", vec![]), None));
        let child = meta(
            "child",
            "c",
            vec![owner_ref("ConfigMap", "parent", "p", true)],
        );
        graph.process(&event(EventType::Add, child.clone(), None));
        let actions = graph.process(&event(
            EventType::Update,
            meta("child", "c", vec![]),
            Some(child),
        ));
        assert_eq!(actions, vec![Action::AttemptToDelete("p".into())]);
        assert!(graph.get("p").unwrap().dependents.is_empty());
    }

    #[test]
    fn a_virtual_delete_of_a_virtual_node_removes_it_and_queues_dependents() {
        let mut graph = Graph::default();
        graph.process(&event(
            EventType::Add,
            meta(
                "child",
                "c",
                vec![owner_ref("ConfigMap", "parent", "p", false)],
            ),
            None,
        ));
        let mut virtual_delete = event(EventType::Delete, meta("parent", "p", vec![]), None);
        virtual_delete.virtual_ = true;
        let actions = graph.process(&virtual_delete);
        assert!(actions.contains(&Action::AttemptToDelete("c".into())));
        assert!(graph.get("p").is_none());
    }

    #[test]
    fn a_virtual_delete_under_other_coordinates_keeps_an_observed_node() {
        let mut graph = Graph::default();
        graph.process(&event(EventType::Add, meta("parent", "p", vec![]), None));
        // A dependent names the same uid as a Secret: that identity does not exist.
        graph.process(&event(
            EventType::Add,
            meta(
                "child",
                "c",
                vec![owner_ref("Secret", "parent", "p", false)],
            ),
            None,
        ));
        let mut virtual_delete = event(EventType::Delete, meta("parent", "p", vec![]), None);
        virtual_delete.kind = "Secret".into();
        virtual_delete.virtual_ = true;
        let actions = graph.process(&virtual_delete);
        assert!(graph.get("p").is_some());
        assert!(actions.contains(&Action::AttemptToDelete("c".into())));
    }

    fn classified(solid: &[&str], dangling: &[&str], waiting: &[&str]) -> Classified {
        let refs = |uids: &[&str]| {
            uids.iter()
                .map(|u| owner_ref("ConfigMap", u, u, false))
                .collect()
        };
        Classified {
            solid: refs(solid),
            dangling: refs(dangling),
            waiting: refs(waiting),
        }
    }

    #[test]
    fn decisions_follow_upstream() {
        assert_eq!(
            decide(&classified(&["a"], &[], &[]), &[], false, false),
            Decision::Keep
        );
        assert_eq!(
            decide(&classified(&["a"], &["b"], &["c"]), &[], false, false),
            Decision::RemoveReferences(vec!["b".into(), "c".into()])
        );
        assert_eq!(
            decide(&classified(&[], &["b"], &[]), &[], false, false),
            Decision::Delete(PropagationPolicy::Background)
        );
        assert_eq!(
            decide(
                &classified(&[], &["b"], &[]),
                &[ORPHAN.into()],
                false,
                false
            ),
            Decision::Delete(PropagationPolicy::Orphan)
        );
        assert_eq!(
            decide(
                &classified(&[], &[], &["c"]),
                &[FOREGROUND.into()],
                false,
                false
            ),
            Decision::Delete(PropagationPolicy::Foreground)
        );
        assert_eq!(
            decide(&classified(&[], &[], &["c"]), &[], true, false),
            Decision::DeleteForeground { unblock: false }
        );
        assert_eq!(
            decide(&classified(&[], &[], &["c"]), &[], true, true),
            Decision::DeleteForeground { unblock: true }
        );
        assert_eq!(
            decide(&classified(&[], &[], &["c"]), &[], false, false),
            Decision::Delete(PropagationPolicy::Background)
        );
    }

    #[test]
    fn reference_diffs_by_uid() {
        let a = owner_ref("ConfigMap", "a", "a", false);
        let b = owner_ref("ConfigMap", "b", "b", true);
        let b2 = owner_ref("ConfigMap", "b", "b", false);
        let c = owner_ref("ConfigMap", "c", "c", false);
        let (added, removed, changed) =
            references_diffs(&[a.clone(), b.clone()], &[b2.clone(), c.clone()]);
        assert_eq!(added, vec![c]);
        assert_eq!(removed, vec![a]);
        assert_eq!(changed, vec![(b, b2)]);
    }

    #[test]
    fn events_are_not_collected() {
        let ar = |group: &str, plural: &str| ApiResource {
            group: group.into(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "X".into(),
            plural: plural.into(),
        };
        let all: Vec<String> = ["list", "watch", "delete"].map(String::from).to_vec();
        assert!(!deletable("", &ar("", "events"), &all));
        assert!(!deletable(
            "events.k8s.io",
            &ar("events.k8s.io", "events"),
            &all
        ));
        assert!(deletable("", &ar("", "configmaps"), &all));
        assert!(!deletable("", &ar("", "configmaps"), &all[..2]));
    }
}
