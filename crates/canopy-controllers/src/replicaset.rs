//! The ReplicaSet controller (upstream `pkg/controller/replicaset`): keeps as many active
//! pods as each ReplicaSet asks for, adopts matching orphans and releases pods that no
//! longer match, and reports replicas, ready and available pods in the status.
//!
//! As upstream: pods are created in slow-start batches (1, 2, 4, ...) so that a template the
//! API refuses costs one failed request, not hundreds; at most `BURST_REPLICAS` are created
//! or deleted per sync; and *expectations* remember the creations and deletions in flight so
//! that a sync never acts again on a cache that has not seen its own previous writes.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use k8s_openapi::{
    api::{
        apps::v1::{ReplicaSet, ReplicaSetCondition, ReplicaSetStatus},
        core::v1::{Pod, PodTemplateSpec},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
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
    util::{
        self, controller_of, controller_ref, not_found, pod_active, pod_assigned, pod_available,
        pod_phase, pod_ready, pod_ready_since, selector, selects,
    },
    worker::{Outcome, run_workers},
};

/// Most pods created or deleted by one sync (upstream's `BurstReplicas`).
pub const BURST_REPLICAS: usize = 500;

/// How long unfulfilled expectations block a ReplicaSet before they are assumed lost
/// (upstream's `ExpectationsTimeout`).
const EXPECTATIONS_TIMEOUT: Duration = Duration::from_secs(300);

/// Pods by their controller's uid; pods without one under `orphan/<namespace>`. A sync
/// reads its own pods and its namespace's orphans, never every pod of the namespace
/// (upstream lists the namespace), so its cost does not grow with the namespace.
const BY_CONTROLLER: &str = "controller-uid";

fn controller_index(pod: &Pod) -> Vec<String> {
    match controller_of(pod) {
        Some(owner) => vec![owner.uid.clone()],
        None => vec![format!(
            "orphan/{}",
            pod.metadata.namespace.as_deref().unwrap_or("")
        )],
    }
}

/// Errors of a sync.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("{0}")]
    Api(#[from] kube::Error),
    /// Some pod creations or deletions failed.
    #[error("{failed} of {attempted} pod {verb} failed: {first}")]
    Partial {
        /// `creations` or `deletions`.
        verb: &'static str,
        /// Failed calls.
        failed: usize,
        /// Calls attempted.
        attempted: usize,
        /// The first failure.
        first: kube::Error,
    },
}

#[derive(Debug)]
struct Expectation {
    adds: i64,
    deletes: HashSet<String>,
    since: Instant,
}

/// Creations and deletions a ReplicaSet has sent and the cache has not shown yet
/// (upstream's `UIDTrackingControllerExpectations`).
#[derive(Default)]
pub struct Expectations {
    map: Mutex<HashMap<ObjectKey, Expectation>>,
}

impl Expectations {
    /// Whether the cache reflects every write the ReplicaSet made (or they timed out).
    pub fn satisfied(&self, key: &ObjectKey) -> bool {
        match self.map.lock().get(key) {
            None => true,
            Some(e) => {
                (e.adds <= 0 && e.deletes.is_empty()) || e.since.elapsed() > EXPECTATIONS_TIMEOUT
            }
        }
    }

    fn expect(&self, key: &ObjectKey, adds: i64, deletes: HashSet<String>) {
        self.map.lock().insert(
            key.clone(),
            Expectation {
                adds,
                deletes,
                since: Instant::now(),
            },
        );
    }

    fn creation_observed(&self, key: &ObjectKey) {
        if let Some(e) = self.map.lock().get_mut(key) {
            e.adds -= 1;
        }
    }

    fn deletion_observed(&self, key: &ObjectKey, uid: &str) {
        if let Some(e) = self.map.lock().get_mut(key) {
            e.deletes.remove(uid);
        }
    }

    fn forget(&self, key: &ObjectKey) {
        self.map.lock().remove(key);
    }
}

struct Controller {
    client: Client,
    replica_sets: Informer<ReplicaSet>,
    pods: Informer<Pod>,
    queue: WorkQueue<ObjectKey>,
    expectations: Expectations,
    events: Recorder,
}

/// Registers the controller's handlers and returns its workers.
pub fn start(ctx: &Arc<Context>) -> BoxFuture<'static, ()> {
    let informers = &ctx.informers;
    informers.pods.add_index(BY_CONTROLLER, controller_index);
    let controller = Arc::new(Controller {
        client: ctx.client.clone(),
        replica_sets: informers.replica_sets.clone(),
        pods: informers.pods.clone(),
        queue: ctx.queue("replicaset"),
        expectations: Expectations::default(),
        events: ctx.events.recorder("replicaset-controller"),
    });
    {
        let c = controller.clone();
        informers.replica_sets.add_handler(move |change| {
            let key = ObjectKey::of(change.object().as_ref());
            if let Change::Delete(_) = change {
                c.expectations.forget(&key);
            }
            c.queue.add(key, change.lane());
        });
    }
    {
        let c = controller.clone();
        informers
            .pods
            .add_handler(move |change| c.pod_changed(change));
    }
    let workers = ctx.config.workers;
    Box::pin(async move {
        controller.replica_sets.wait_synced().await;
        controller.pods.wait_synced().await;
        let queue = controller.queue.clone();
        run_workers(queue, workers, move |key| {
            let c = controller.clone();
            async move { c.sync(&key).await }
        })
        .await;
    })
}

impl Controller {
    /// The ReplicaSet a controller reference points at, if it is one we know with that uid.
    fn owner_of(&self, pod: &Pod) -> Option<(ObjectKey, Arc<ReplicaSet>)> {
        let owner = controller_of(pod)?;
        if owner.kind != "ReplicaSet" || !owner.api_version.starts_with("apps/") {
            return None;
        }
        let key = ObjectKey::new(pod.metadata.namespace.as_deref()?, &owner.name);
        let rs = self.replica_sets.get(&key)?;
        (rs.metadata.uid.as_deref() == Some(owner.uid.as_str())).then_some((key, rs))
    }

    /// ReplicaSets of the pod's namespace whose selector matches it (adoption candidates).
    fn selecting(&self, pod: &Pod) -> Vec<ObjectKey> {
        let Some(ns) = pod.metadata.namespace.as_deref() else {
            return Vec::new();
        };
        let labels = pod.labels();
        self.replica_sets
            .in_namespace(ns)
            .iter()
            .filter(|rs| selects(&selector(rs.spec.as_ref().map(|s| &s.selector)), labels))
            .map(|rs| ObjectKey::of(rs.as_ref()))
            .collect()
    }

    /// upstream's addPod / updatePod / deletePod: which ReplicaSets a pod change concerns.
    fn pod_changed(&self, change: &Change<Pod>) {
        let lane = change.lane();
        match change {
            // As upstream's updatePod: a periodic resync of pods says nothing new about
            // them; the ReplicaSets' own resync already looks at every ReplicaSet.
            Change::Sync(_) => {}
            Change::Add(pod) => {
                if pod.metadata.deletion_timestamp.is_some() {
                    return self.pod_gone(pod, lane);
                }
                match self.owner_of(pod) {
                    Some((key, _)) => {
                        self.expectations.creation_observed(&key);
                        self.queue.add(key, lane);
                    }
                    None if controller_of(pod.as_ref()).is_none() => {
                        for key in self.selecting(pod) {
                            self.queue.add(key, lane);
                        }
                    }
                    None => {}
                }
            }
            Change::Update { old, new } => {
                if new.metadata.deletion_timestamp.is_some()
                    && old.metadata.deletion_timestamp.is_none()
                {
                    // Graceful deletion: the pod counts as gone as soon as it is marked.
                    self.pod_gone(new, lane);
                    if old.labels() != new.labels() {
                        self.queue_owner_or_selecting(old, lane);
                    }
                    return;
                }
                let old_ref = controller_of(old.as_ref());
                let new_ref = controller_of(new.as_ref());
                if old_ref.map(|r| &r.uid) != new_ref.map(|r| &r.uid) && old_ref.is_some() {
                    self.queue_owner_or_selecting(old, lane);
                }
                match self.owner_of(new) {
                    Some((key, rs)) => {
                        self.queue.add(key.clone(), lane);
                        // A pod that just turned ready becomes available after
                        // minReadySeconds, with no event then: look again at that time.
                        let min_ready = rs.spec.as_ref().and_then(|s| s.min_ready_seconds);
                        if let Some(seconds) = min_ready.filter(|s| *s > 0)
                            && !pod_ready(old)
                            && pod_ready(new)
                        {
                            self.queue.add_after(
                                key,
                                Lane::Update,
                                Duration::from_secs(seconds as u64 + 1),
                            );
                        }
                    }
                    None if new_ref.is_none()
                        && (old.labels() != new.labels() || old_ref.is_some()) =>
                    {
                        for key in self.selecting(new) {
                            self.queue.add(key, lane);
                        }
                    }
                    None => {}
                }
            }
            Change::Delete(pod) => self.pod_gone(pod, lane),
        }
    }

    fn queue_owner_or_selecting(&self, pod: &Pod, lane: Lane) {
        match self.owner_of(pod) {
            Some((key, _)) => self.queue.add(key, lane),
            None => {
                for key in self.selecting(pod) {
                    self.queue.add(key, lane);
                }
            }
        }
    }

    fn pod_gone(&self, pod: &Pod, lane: Lane) {
        if let Some((key, _)) = self.owner_of(pod) {
            if let Some(uid) = pod.metadata.uid.as_deref() {
                self.expectations.deletion_observed(&key, uid);
            }
            self.queue.add(key, lane);
        }
    }

    async fn sync(&self, key: &ObjectKey) -> Result<Outcome, Error> {
        let Some(rs) = self.replica_sets.get(key) else {
            self.expectations.forget(key);
            return Ok(Outcome::Done);
        };
        let needs_sync = self.expectations.satisfied(key);
        let selector = selector(rs.spec.as_ref().map(|s| &s.selector));
        let uid = rs.metadata.uid.clone().unwrap_or_default();

        // Claim: owned pods that still match stay, owned ones that do not are released,
        // matching orphans are adopted (unless the ReplicaSet is going away).
        let pods_api = Api::<Pod>::namespaced(self.client.clone(), key.ns());
        let mut pods: Vec<Arc<Pod>> = Vec::new();
        let mut claim_error = None;
        let mut can_adopt: Option<bool> = None;
        let candidates = self.pods.by_index(BY_CONTROLLER, &uid).into_iter().chain(
            self.pods
                .by_index(BY_CONTROLLER, &format!("orphan/{}", key.ns())),
        );
        for pod in candidates {
            if !pod_active(&pod) {
                continue;
            }
            let matches = selects(&selector, pod.labels());
            match controller_of(pod.as_ref()) {
                Some(r) if r.uid == uid => {
                    if matches || rs.metadata.deletion_timestamp.is_some() {
                        pods.push(pod);
                    } else if let Err(err) = util::release(&pods_api, pod.as_ref(), &uid).await {
                        claim_error.get_or_insert(err);
                    }
                }
                Some(_) => {}
                None if matches && rs.metadata.deletion_timestamp.is_none() => {
                    if can_adopt.is_none() {
                        let rs_api = Api::<ReplicaSet>::namespaced(self.client.clone(), key.ns());
                        match util::can_adopt(&rs_api, rs.as_ref()).await {
                            Ok(can) => can_adopt = Some(can),
                            Err(err) => {
                                claim_error.get_or_insert(err);
                                break;
                            }
                        }
                    }
                    if can_adopt != Some(true) {
                        continue;
                    }
                    match util::adopt(&pods_api, pod.as_ref(), rs.as_ref()).await {
                        Ok(Some(_)) => pods.push(pod),
                        Ok(None) => {}
                        Err(err) => {
                            claim_error.get_or_insert(err);
                        }
                    }
                }
                None => {}
            }
        }

        let mut manage_error = None;
        if needs_sync && rs.metadata.deletion_timestamp.is_none() {
            manage_error = self.manage_replicas(key, &rs, &pods).await.err();
        }

        let now = Timestamp::now();
        let status = calculate_status(&rs, &pods, manage_error.as_ref(), now);
        self.update_status(&rs, status.clone()).await?;
        if let Some(err) = manage_error {
            return Err(err);
        }
        if let Some(err) = claim_error {
            return Err(err.into());
        }
        // Pods ready but not yet available: look again once minReadySeconds have passed.
        let min_ready = rs
            .spec
            .as_ref()
            .and_then(|s| s.min_ready_seconds)
            .unwrap_or(0);
        let replicas = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        if min_ready > 0
            && status.ready_replicas.unwrap_or(0) == replicas
            && status.available_replicas.unwrap_or(0) != replicas
        {
            return Ok(Outcome::RequeueAfter(Duration::from_secs(min_ready as u64)));
        }
        Ok(Outcome::Done)
    }

    async fn manage_replicas(
        &self,
        key: &ObjectKey,
        rs: &ReplicaSet,
        pods: &[Arc<Pod>],
    ) -> Result<(), Error> {
        let wanted = rs
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1)
            .max(0) as usize;
        let api = Api::<Pod>::namespaced(self.client.clone(), key.ns());
        if pods.len() < wanted {
            let missing = (wanted - pods.len()).min(BURST_REPLICAS);
            self.expectations
                .expect(key, missing as i64, HashSet::new());
            let template = pod_from_template(rs);
            let (created, failure) = slow_start(missing, |_| {
                let api = api.clone();
                let pod = template.clone();
                let events = self.events.clone();
                async move {
                    match api.create(&PostParams::default(), &pod).await {
                        Ok(pod) => {
                            events.normal(
                                rs,
                                "SuccessfulCreate",
                                format!("Created pod: {}", pod.name_any()),
                            );
                            Ok(())
                        }
                        Err(err) => {
                            events.warning(rs, "FailedCreate", format!("Error creating: {err}"));
                            Err(err)
                        }
                    }
                }
            })
            .await;
            if let Some((failed, first)) = failure {
                // The creations that were never sent will never be observed.
                let never = missing - created;
                if let Some(e) = self.expectations.map.lock().get_mut(key) {
                    e.adds -= never as i64;
                }
                return Err(Error::Partial {
                    verb: "creations",
                    failed,
                    attempted: missing,
                    first,
                });
            }
        } else if pods.len() > wanted {
            let excess = (pods.len() - wanted).min(BURST_REPLICAS);
            let doomed = pods_to_delete(pods, excess);
            let uids: HashSet<String> = doomed
                .iter()
                .filter_map(|p| p.metadata.uid.clone())
                .collect();
            self.expectations.expect(key, 0, uids);
            let results = futures::future::join_all(doomed.iter().map(|pod| {
                let api = api.clone();
                async move {
                    let result = api
                        .delete(
                            &pod.name_any(),
                            &DeleteParams {
                                preconditions: pod.metadata.uid.clone().map(|uid| {
                                    kube::api::Preconditions {
                                        uid: Some(uid),
                                        resource_version: None,
                                    }
                                }),
                                ..Default::default()
                            },
                        )
                        .await;
                    (pod, result)
                }
            }))
            .await;
            let mut failed = 0;
            let mut first = None;
            for (pod, result) in results {
                match result {
                    Ok(_) => self.events.normal(
                        rs,
                        "SuccessfulDelete",
                        format!("Deleted pod: {}", pod.name_any()),
                    ),
                    Err(err) if not_found(&err) => {
                        if let Some(uid) = pod.metadata.uid.as_deref() {
                            self.expectations.deletion_observed(key, uid);
                        }
                    }
                    Err(err) => {
                        if let Some(uid) = pod.metadata.uid.as_deref() {
                            self.expectations.deletion_observed(key, uid);
                        }
                        self.events
                            .warning(rs, "FailedDelete", format!("Error deleting: {err}"));
                        failed += 1;
                        first.get_or_insert(err);
                    }
                }
            }
            if let Some(first) = first {
                return Err(Error::Partial {
                    verb: "deletions",
                    failed,
                    attempted: excess,
                    first,
                });
            }
        }
        Ok(())
    }

    async fn update_status(
        &self,
        rs: &ReplicaSet,
        status: ReplicaSetStatus,
    ) -> Result<(), kube::Error> {
        if rs.status.as_ref() == Some(&status) {
            return Ok(());
        }
        let mut updated = rs.clone();
        updated.status = Some(status);
        let api =
            Api::<ReplicaSet>::namespaced(self.client.clone(), &rs.namespace().unwrap_or_default());
        api.replace_status(&rs.name_any(), &PostParams::default(), &updated)
            .await
            .map(|_| ())
    }
}

/// Runs `count` calls in batches of 1, 2, 4, ... and stops after the first batch with a
/// failure (upstream's `slowStartBatch`). Returns how many calls were made, and the number
/// of failures with the first one.
pub async fn slow_start<F, Fut, E>(count: usize, call: F) -> (usize, Option<(usize, E)>)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let mut done = 0;
    let mut batch = 1;
    while done < count {
        let size = batch.min(count - done);
        let results = futures::future::join_all((done..done + size).map(&call)).await;
        done += size;
        let mut failed = 0;
        let mut first = None;
        for result in results {
            if let Err(err) = result {
                failed += 1;
                first.get_or_insert(err);
            }
        }
        if let Some(first) = first {
            return (done, Some((failed, first)));
        }
        batch *= 2;
    }
    (done, None)
}

/// A new pod of the ReplicaSet (upstream's `GetPodFromTemplate`).
pub fn pod_from_template(rs: &ReplicaSet) -> Pod {
    let template: PodTemplateSpec = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .unwrap_or_default();
    let meta = template.metadata.unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", rs.name_any())),
            namespace: rs.namespace(),
            labels: meta.labels,
            annotations: meta.annotations,
            finalizers: meta.finalizers,
            owner_references: Some(vec![controller_ref(rs)]),
            ..Default::default()
        },
        spec: template.spec,
        status: None,
    }
}

/// The order in which surplus pods go (upstream's `ActivePodsWithRanks` without the
/// co-location rank): unscheduled before scheduled, pending before unknown before running,
/// not ready before ready, the most recently ready first, the most restarted first, the
/// newest first.
fn pods_to_delete(pods: &[Arc<Pod>], count: usize) -> Vec<Arc<Pod>> {
    let mut ranked: Vec<Arc<Pod>> = pods.to_vec();
    let phase_rank = |p: &Pod| match pod_phase(p) {
        "Pending" | "" => 0,
        "Unknown" => 1,
        "Running" => 2,
        _ => 3,
    };
    let restarts = |p: &Pod| -> i32 {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|c| c.iter().map(|c| c.restart_count).max().unwrap_or(0))
            .unwrap_or(0)
    };
    let created = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let ready_since = |p: &Pod| pod_ready_since(p).flatten();
    ranked.sort_by(|a, b| {
        pod_assigned(a)
            .cmp(&pod_assigned(b))
            .then(phase_rank(a).cmp(&phase_rank(b)))
            .then(pod_ready(a).cmp(&pod_ready(b)))
            .then(ready_since(b).cmp(&ready_since(a)))
            .then(restarts(b).cmp(&restarts(a)))
            .then(created(b).cmp(&created(a)))
    });
    ranked.truncate(count);
    ranked
}

/// The status a ReplicaSet should report (upstream's `calculateStatus`).
pub fn calculate_status(
    rs: &ReplicaSet,
    pods: &[Arc<Pod>],
    manage_error: Option<&Error>,
    now: Timestamp,
) -> ReplicaSetStatus {
    let spec = rs.spec.as_ref();
    let template_labels: BTreeMap<String, String> = spec
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let min_ready = spec.and_then(|s| s.min_ready_seconds).unwrap_or(0);
    let fully_labeled = pods
        .iter()
        .filter(|p| {
            let labels = p.labels();
            template_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        })
        .count() as i32;
    let ready = pods.iter().filter(|p| pod_ready(p)).count() as i32;
    let available = pods
        .iter()
        .filter(|p| pod_available(p, min_ready, now))
        .count() as i32;
    let old = rs.status.clone().unwrap_or_default();
    let mut conditions: Vec<ReplicaSetCondition> = old.conditions.clone().unwrap_or_default();
    let wanted = spec.and_then(|s| s.replicas).unwrap_or(1);
    match manage_error {
        Some(err) if (pods.len() as i32) < wanted => {
            if !conditions.iter().any(|c| c.type_ == "ReplicaFailure") {
                conditions.push(ReplicaSetCondition {
                    type_: "ReplicaFailure".into(),
                    status: "True".into(),
                    reason: Some("FailedCreate".into()),
                    message: Some(err.to_string()),
                    last_transition_time: Some(Time(now)),
                });
            }
        }
        Some(err) => {
            if !conditions.iter().any(|c| c.type_ == "ReplicaFailure") {
                conditions.push(ReplicaSetCondition {
                    type_: "ReplicaFailure".into(),
                    status: "True".into(),
                    reason: Some("FailedDelete".into()),
                    message: Some(err.to_string()),
                    last_transition_time: Some(Time(now)),
                });
            }
        }
        None => conditions.retain(|c| c.type_ != "ReplicaFailure"),
    }
    // Zero counts are left out, as upstream's `omitempty` serialises them, so that an
    // unchanged status compares equal to the stored one.
    let nonzero = |n: i32| (n != 0).then_some(n);
    ReplicaSetStatus {
        replicas: pods.len() as i32,
        fully_labeled_replicas: nonzero(fully_labeled),
        ready_replicas: nonzero(ready),
        available_replicas: nonzero(available),
        observed_generation: rs.metadata.generation,
        conditions: (!conditions.is_empty()).then_some(conditions),
        terminating_replicas: old.terminating_replicas,
    }
}
