//! Deployments (upstream's `pkg/controller/deployment`): a deployment owns one ReplicaSet per
//! pod template it has had, named `<deployment>-<pod-template-hash>`; the one whose template
//! is the deployment's is the *new* replica set, the others are *old*. A rollout scales the
//! new one up and the old ones down, within maxSurge/maxUnavailable (RollingUpdate) or all
//! old first and then the new one once the old pods are gone (Recreate). A change of
//! `spec.replicas` mid-rollout is shared out proportionally; a paused deployment is only
//! scaled. The status (replicas, conditions, progress deadline) is written through the
//! status subresource.
//!
//! Watch: deployments; replica sets (by their controllerRef, orphans by selector for
//! adoption); pod deletions (a Recreate rollout waits for the old pods to be gone).
//! Decide: [`calc`] (pure, unit tested). Write: replica sets (create, scale, adopt, release,
//! delete old revisions) and the deployment's status.

pub mod calc;

use std::{collections::HashSet, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentCondition, ReplicaSet, ReplicaSetSpec},
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, PostParams},
};

use crate::{
    events::Recorder,
    informer::{Change, Informer, ObjectKey},
    manager::Context,
    queue::WorkQueue,
    util::{self, controller_of, controller_ref, selector, selects},
    worker::{Outcome, run_workers},
};
use calc::*;

/// Errors of the deployment controller; the sync is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("API call failed: {0}")]
    Api(#[from] kube::Error),
    /// The deployment cannot be acted on as it is (the sync is retried, as upstream's).
    #[error("{0}")]
    Invalid(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone)]
struct Controller {
    client: Client,
    deployments: Informer<Deployment>,
    replica_sets: Informer<ReplicaSet>,
    pods: Informer<Pod>,
    queue: WorkQueue<ObjectKey>,
    events: Recorder,
}

/// Registers the controller's handlers and returns its workers.
pub fn start(ctx: &Arc<Context>) -> BoxFuture<'static, ()> {
    let controller = Controller {
        client: ctx.client.clone(),
        deployments: ctx.informers.deployments.clone(),
        replica_sets: ctx.informers.replica_sets.clone(),
        pods: ctx.informers.pods.clone(),
        queue: ctx.queue("deployment"),
        events: ctx.events.recorder("deployment-controller"),
    };
    {
        let queue = controller.queue.clone();
        controller.deployments.add_handler(move |change| {
            queue.add(ObjectKey::of(change.object().as_ref()), change.lane());
        });
    }
    {
        let c = controller.clone();
        controller
            .replica_sets
            .add_handler(move |change| c.on_replica_set(change));
    }
    {
        let c = controller.clone();
        controller.pods.add_handler(move |change| {
            if let Change::Delete(pod) = change {
                c.on_pod_deleted(pod);
            }
        });
    }
    let workers = ctx.config.workers;
    Box::pin(async move {
        controller.deployments.wait_synced().await;
        controller.replica_sets.wait_synced().await;
        controller.pods.wait_synced().await;
        let queue = controller.queue.clone();
        run_workers(queue, workers, move |key: ObjectKey| {
            let c = controller.clone();
            async move { c.sync(&key).await }
        })
        .await;
    })
}

fn key_of(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

fn is_deleting<K: kube::Resource>(obj: &K) -> bool {
    obj.meta().deletion_timestamp.is_some()
}

/// A selector that selects nothing-or-everything (upstream refuses to act on one that
/// selects every pod of the namespace).
fn selector_is_empty(s: &LabelSelector) -> bool {
    s.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && s.match_expressions.as_ref().is_none_or(|m| m.is_empty())
}

fn deployment_selector(d: &Deployment) -> Option<LabelSelector> {
    d.spec.as_ref().map(|s| s.selector.clone())
}

fn name(rs: &ReplicaSet) -> String {
    rs.metadata.name.clone().unwrap_or_default()
}

/// Replaces the copy of `updated` (same uid) in `list`.
fn refresh(list: &mut [ReplicaSet], updated: &ReplicaSet) {
    if let Some(slot) = list
        .iter_mut()
        .find(|rs| rs.metadata.uid == updated.metadata.uid)
    {
        *slot = updated.clone();
    }
}

impl Controller {
    // -----------------------------------------------------------------------------------
    // Watch: which deployment a change concerns.

    /// The deployment a controllerRef names, if it is the one in the cache (same uid).
    fn resolve(&self, namespace: &str, owner: &OwnerReference) -> Option<Arc<Deployment>> {
        if owner.kind != "Deployment" {
            return None;
        }
        self.deployments
            .get(&key_of(namespace, &owner.name))
            .filter(|d| d.metadata.uid.as_deref() == Some(owner.uid.as_str()))
    }

    /// The deployments whose selector matches an orphan replica set (upstream's
    /// `getDeploymentsForReplicaSet`); they will try to adopt it.
    fn deployments_for_orphan(&self, rs: &ReplicaSet) -> Vec<Arc<Deployment>> {
        let labels = rs.labels();
        if labels.is_empty() {
            return Vec::new();
        }
        self.deployments
            .in_namespace(rs.metadata.namespace.as_deref().unwrap_or(""))
            .into_iter()
            .filter(|d| {
                let Some(s) = deployment_selector(d) else {
                    return false;
                };
                !selector_is_empty(&s) && selects(&selector(Some(&s)), labels)
            })
            .collect()
    }

    fn enqueue(&self, d: &Deployment, lane: crate::queue::Lane) {
        self.queue.add(ObjectKey::of(d), lane);
    }

    fn enqueue_owner(
        &self,
        rs: &ReplicaSet,
        owner: Option<&OwnerReference>,
        lane: crate::queue::Lane,
    ) {
        let ns = rs.metadata.namespace.as_deref().unwrap_or("");
        if let Some(d) = owner.and_then(|r| self.resolve(ns, r)) {
            self.enqueue(&d, lane);
        }
    }

    fn on_replica_set(&self, change: &Change<ReplicaSet>) {
        let lane = change.lane();
        match change {
            Change::Add(rs) => {
                if let Some(owner) = controller_of(rs.as_ref()) {
                    self.enqueue_owner(rs, Some(owner), lane);
                    return;
                }
                if is_deleting(rs.as_ref()) {
                    return;
                }
                for d in self.deployments_for_orphan(rs) {
                    self.enqueue(&d, lane);
                }
            }
            Change::Update { old, new } => {
                if old.resource_version() == new.resource_version() {
                    return;
                }
                let old_ref = controller_of(old.as_ref());
                let new_ref = controller_of(new.as_ref());
                let ref_changed = old_ref.map(|r| &r.uid) != new_ref.map(|r| &r.uid);
                if ref_changed {
                    // The previous owner must notice it lost the replica set.
                    self.enqueue_owner(old, old_ref, lane);
                }
                if new_ref.is_some() {
                    self.enqueue_owner(new, new_ref, lane);
                    return;
                }
                if ref_changed || old.labels() != new.labels() {
                    for d in self.deployments_for_orphan(new) {
                        self.enqueue(&d, lane);
                    }
                }
            }
            Change::Delete(rs) => self.enqueue_owner(rs, controller_of(rs.as_ref()), lane),
            // Deployments resync themselves; their replica sets add nothing.
            Change::Sync(_) => {}
        }
    }

    /// A Recreate rollout waits until the old pods are gone: when the last pod of a
    /// Recreate deployment is deleted, look again.
    fn on_pod_deleted(&self, pod: &Pod) {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("");
        let Some(owner) = controller_of(pod).filter(|r| r.kind == "ReplicaSet") else {
            return;
        };
        let Some(rs) = self
            .replica_sets
            .get(&key_of(ns, &owner.name))
            .filter(|rs| rs.metadata.uid.as_deref() == Some(owner.uid.as_str()))
        else {
            return;
        };
        let Some(d) = controller_of(rs.as_ref()).and_then(|r| self.resolve(ns, r)) else {
            return;
        };
        if strategy_type(&d) != RECREATE {
            return;
        }
        let owned: HashSet<String> = self
            .replica_sets
            .in_namespace(ns)
            .iter()
            .filter(|rs| controller_of(rs.as_ref()).map(|r| &r.uid) == d.metadata.uid.as_ref())
            .filter_map(|rs| rs.metadata.uid.clone())
            .collect();
        let remaining = self
            .pods
            .in_namespace(ns)
            .iter()
            .filter(|p| controller_of(p.as_ref()).is_some_and(|r| owned.contains(&r.uid)))
            .count();
        if remaining == 0 {
            self.enqueue(&d, crate::queue::Lane::Delete);
        }
    }

    // -----------------------------------------------------------------------------------
    // Writes.

    fn rs_api(&self, ns: &str) -> Api<ReplicaSet> {
        Api::namespaced(self.client.clone(), ns)
    }

    fn deployment_api(&self, ns: &str) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Writes the deployment's status (and, as upstream's status update allows, its
    /// annotations: the revision) and keeps the answer, so later writes of the same sync
    /// do not conflict with this one.
    async fn update_status(&self, d: &mut Deployment) -> Result<()> {
        let api: Api<Deployment> = Api::namespaced(
            self.client.clone(),
            d.metadata.namespace.as_deref().unwrap_or(""),
        );
        *d = api
            .replace_status(&d.name_any(), &PostParams::default(), d)
            .await?;
        Ok(())
    }

    /// `scaleReplicaSet`: sets the size and the desired/max replicas annotations; whether
    /// the size changed, and the replica set as written.
    async fn scale_replica_set(
        &self,
        rs: &ReplicaSet,
        new_scale: i32,
        d: &Deployment,
        operation: &str,
    ) -> Result<(bool, ReplicaSet)> {
        let size_changes = rs_replicas(rs) != new_scale;
        let desired = replicas(d);
        let max = desired + max_surge(d);
        if !size_changes && !replicas_annotations_need_update(rs, desired, max) {
            return Ok((false, rs.clone()));
        }
        let mut copy = rs.clone();
        let old_scale = rs_replicas(rs);
        set_rs_replicas(&mut copy, new_scale);
        set_replicas_annotations(&mut copy, desired, max);
        let ns = copy.metadata.namespace.clone().unwrap_or_default();
        let updated = self
            .rs_api(&ns)
            .replace(&name(&copy), &PostParams::default(), &copy)
            .await?;
        if size_changes {
            let message = format!(
                "Scaled {operation} replica set {} from {old_scale} to {new_scale}",
                name(&updated)
            );
            tracing::info!(deployment = %ObjectKey::of(d), replica_set = %name(&updated), "{message}");
            self.events.normal(d, "ScalingReplicaSet", message);
        }
        Ok((size_changes, updated))
    }

    /// `scaleReplicaSetAndRecordEvent`.
    async fn scale_to(
        &self,
        rs: &ReplicaSet,
        new_scale: i32,
        d: &Deployment,
    ) -> Result<(bool, ReplicaSet)> {
        let current = rs_replicas(rs);
        if current == new_scale {
            return Ok((false, rs.clone()));
        }
        let operation = if current < new_scale { "up" } else { "down" };
        self.scale_replica_set(rs, new_scale, d, operation).await
    }

    // -----------------------------------------------------------------------------------
    // Claiming replica sets (upstream's ControllerRefManager).

    /// The deployment's replica sets: those it controls and its selector matches, after
    /// adopting matching orphans and releasing owned ones its selector no longer matches.
    async fn claim_replica_sets(&self, d: &Deployment) -> Result<Vec<ReplicaSet>> {
        let ns = d.metadata.namespace.clone().unwrap_or_default();
        let uid = d.metadata.uid.clone().unwrap_or_default();
        let sel = selector(deployment_selector(d).as_ref());
        let mut claimed = Vec::new();
        let mut can_adopt: Option<bool> = None;
        for rs in self.replica_sets.in_namespace(&ns) {
            let matches = selects(&sel, rs.labels());
            match controller_of(rs.as_ref()) {
                Some(owner) if owner.uid == uid => {
                    if matches {
                        claimed.push((*rs).clone());
                    } else if !is_deleting(d) {
                        util::release(&self.rs_api(&ns), rs.as_ref(), &uid).await?;
                        tracing::info!(replica_set = %name(&rs), "released replica set its deployment no longer selects");
                    }
                }
                Some(_) => {}
                None => {
                    if is_deleting(d) || !matches || is_deleting(rs.as_ref()) {
                        continue;
                    }
                    if can_adopt.is_none() {
                        can_adopt = Some(util::can_adopt(&self.deployment_api(&ns), d).await?);
                    }
                    if can_adopt != Some(true) {
                        continue;
                    }
                    let rs_api = self.rs_api(&ns);
                    if let Some(adopted) = util::adopt(&rs_api, rs.as_ref(), d).await? {
                        tracing::info!(deployment = %ObjectKey::of(d), replica_set = %name(&adopted), "adopted replica set");
                        claimed.push(adopted);
                    }
                }
            }
        }
        Ok(claimed)
    }

    // -----------------------------------------------------------------------------------
    // Decide and act: `syncDeployment`.

    async fn sync(&self, key: &ObjectKey) -> Result<Outcome> {
        let Some(cached) = self.deployments.get(key) else {
            return Ok(Outcome::Done);
        };
        let mut d = (*cached).clone();
        let Some(sel) = deployment_selector(&d) else {
            return Ok(Outcome::Done);
        };
        if selector_is_empty(&sel) {
            // Upstream refuses to select every pod of the namespace; it only records that
            // it saw this generation.
            tracing::warn!(deployment = %key, "deployment has an empty selector; selecting all pods is not allowed");
            self.events.warning(
                &d,
                "SelectingAll",
                "This deployment is selecting all pods. A non-empty selector is required.",
            );
            let generation = d.metadata.generation.unwrap_or(0);
            let status = d.status.get_or_insert_with(Default::default);
            if status.observed_generation.unwrap_or(0) < generation {
                status.observed_generation = Some(generation);
                self.update_status(&mut d).await?;
            }
            return Ok(Outcome::Done);
        }
        let mut rs_list = self.claim_replica_sets(&d).await?;
        if is_deleting(&d) {
            self.sync_status_only(&mut d, &mut rs_list).await?;
            return Ok(Outcome::Done);
        }
        self.check_paused_conditions(&mut d).await?;
        if paused(&d) {
            self.sync_scale(&mut d, &mut rs_list).await?;
            return Ok(Outcome::Done);
        }
        if self.is_scaling_event(&mut d, &mut rs_list).await? {
            self.sync_scale(&mut d, &mut rs_list).await?;
            return Ok(Outcome::Done);
        }
        match strategy_type(&d) {
            RECREATE => self.rollout_recreate(&mut d, &mut rs_list).await,
            ROLLING_UPDATE => self.rollout_rolling(&mut d, &mut rs_list).await,
            other => Err(Error::Invalid(format!(
                "unexpected deployment strategy type: {other}"
            ))),
        }
    }

    /// `getAllReplicaSetsAndSyncRevision`: the new replica set (created if asked and
    /// missing) with its revision synced, and the old ones.
    async fn get_all(
        &self,
        d: &mut Deployment,
        rs_list: &mut Vec<ReplicaSet>,
        create: bool,
    ) -> Result<(Option<ReplicaSet>, Vec<ReplicaSet>)> {
        rs_list.sort_by(by_creation);
        let desired = template(d);
        // The oldest replica set with the template is the new one (upstream, #40415).
        let new_index = rs_list
            .iter()
            .position(|rs| equal_ignore_hash(&rs_template(rs), &desired));
        let old: Vec<ReplicaSet> = rs_list
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != new_index)
            .map(|(_, rs)| rs.clone())
            .collect();
        let new_rs = self.get_new_rs(d, rs_list, new_index, &old, create).await?;
        Ok((new_rs, old))
    }

    /// `getNewReplicaSet`.
    async fn get_new_rs(
        &self,
        d: &mut Deployment,
        rs_list: &mut Vec<ReplicaSet>,
        new_index: Option<usize>,
        old: &[ReplicaSet],
        create: bool,
    ) -> Result<Option<ReplicaSet>> {
        let new_revision = max_revision(old) + 1;
        let ns = d.metadata.namespace.clone().unwrap_or_default();
        if let Some(i) = new_index {
            let mut copy = rs_list[i].clone();
            let annotations_changed = set_new_rs_annotations(d, &mut copy, new_revision, true);
            let spec = copy.spec.get_or_insert_with(Default::default);
            let min_ready_changed = spec.min_ready_seconds.unwrap_or(0) != min_ready_seconds(d);
            if annotations_changed || min_ready_changed {
                spec.min_ready_seconds = Some(min_ready_seconds(d));
                let updated = self
                    .rs_api(&ns)
                    .replace(&name(&copy), &PostParams::default(), &copy)
                    .await?;
                rs_list[i] = updated.clone();
                return Ok(Some(updated));
            }
            // The replica set's revision is the reliable one; the deployment copies it.
            let mut changed = set_deployment_revision(d, &revision_annotation(&copy));
            if progress_deadline(d).is_some()
                && get_condition(d.status.as_ref(), PROGRESSING).is_none()
            {
                let condition = new_condition(
                    PROGRESSING,
                    "True",
                    reason::FOUND_NEW_RS,
                    format!("Found new replica set {:?}", name(&copy)),
                    now(),
                );
                set_condition(d.status.get_or_insert_with(Default::default), condition);
                changed = true;
            }
            if changed {
                self.update_status(d).await?;
            }
            return Ok(Some(copy));
        }
        if !create {
            return Ok(None);
        }

        let collision_count = d.status.as_ref().and_then(|s| s.collision_count);
        let mut new_template = template(d);
        let hash = compute_hash(&new_template, collision_count);
        new_template
            .metadata
            .get_or_insert_with(Default::default)
            .labels
            .get_or_insert_with(Default::default)
            .insert(POD_TEMPLATE_HASH.into(), hash.clone());
        let mut new_selector = deployment_selector(d).unwrap_or_default();
        new_selector
            .match_labels
            .get_or_insert_with(Default::default)
            .insert(POD_TEMPLATE_HASH.into(), hash.clone());
        let rs_name = format!("{}-{hash}", d.name_any());
        let mut new_rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(rs_name.clone()),
                namespace: Some(ns.clone()),
                owner_references: Some(vec![controller_ref(d)]),
                labels: new_template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.labels.clone()),
                ..Default::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(0),
                min_ready_seconds: Some(min_ready_seconds(d)),
                selector: new_selector,
                template: Some(new_template),
            }),
            status: None,
        };
        let all: Vec<&ReplicaSet> = old.iter().chain(std::iter::once(&new_rs)).collect();
        let count = new_rs_new_replicas(d, &all, &new_rs);
        set_rs_replicas(&mut new_rs, count);
        set_new_rs_annotations(d, &mut new_rs, new_revision, false);

        let mut already_exists = false;
        let created = match self
            .rs_api(&ns)
            .create(&PostParams::default(), &new_rs)
            .await
        {
            Ok(created) => created,
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                // A slow cache, or a hash collision with a replica set of another template.
                let existing = match self.replica_sets.get(&key_of(&ns, &rs_name)) {
                    Some(rs) => (*rs).clone(),
                    None => self.rs_api(&ns).get(&rs_name).await?,
                };
                let ours = controller_of(&existing).map(|r| &r.uid) == d.metadata.uid.as_ref();
                if ours && equal_ignore_hash(&template(d), &rs_template(&existing)) {
                    already_exists = true;
                    existing
                } else {
                    let status_ = d.status.get_or_insert_with(Default::default);
                    let before = status_.collision_count.unwrap_or(0);
                    status_.collision_count = Some(before + 1);
                    self.update_status(d).await?;
                    tracing::info!(deployment = %ObjectKey::of(d), old = before, new = before + 1,
                        "found a hash collision for deployment; bumping collisionCount to resolve it");
                    return Err(kube::Error::Api(status).into());
                }
            }
            Err(err) => {
                let message = format!("Failed to create new replica set {rs_name:?}: {err}");
                tracing::warn!(deployment = %ObjectKey::of(d), "{message}");
                self.events
                    .warning(d, reason::FAILED_RS_CREATE, message.clone());
                if progress_deadline(d).is_some() {
                    let condition = new_condition(
                        PROGRESSING,
                        "False",
                        reason::FAILED_RS_CREATE,
                        message,
                        now(),
                    );
                    set_condition(d.status.get_or_insert_with(Default::default), condition);
                    // The creation error matters more than this write's.
                    let _ = self.update_status(d).await;
                }
                return Err(err.into());
            }
        };
        if !already_exists && count > 0 {
            let message = format!("Scaled up replica set {rs_name} from 0 to {count}");
            tracing::info!(deployment = %ObjectKey::of(d), "{message}");
            self.events.normal(d, "ScalingReplicaSet", message);
        }
        rs_list.push(created.clone());
        let mut changed = set_deployment_revision(d, &new_revision.to_string());
        if !already_exists && progress_deadline(d).is_some() {
            let condition = new_condition(
                PROGRESSING,
                "True",
                reason::NEW_RS_CREATED,
                format!("Created new replica set {rs_name:?}"),
                now(),
            );
            set_condition(d.status.get_or_insert_with(Default::default), condition);
            changed = true;
        }
        if changed {
            self.update_status(d).await?;
        }
        Ok(Some(created))
    }

    /// `checkPausedConditions`: a paused deployment's Progressing condition says so, so
    /// that the time spent paused is not counted against the progress deadline.
    async fn check_paused_conditions(&self, d: &mut Deployment) -> Result<()> {
        if progress_deadline(d).is_none() {
            return Ok(());
        }
        let current =
            get_condition(d.status.as_ref(), PROGRESSING).map(|c| condition_reason(c).to_string());
        if current.as_deref() == Some(reason::TIMED_OUT) {
            return Ok(());
        }
        let paused_condition = current.as_deref() == Some(reason::PAUSED);
        let condition = if paused(d) && !paused_condition {
            new_condition(
                PROGRESSING,
                "Unknown",
                reason::PAUSED,
                "Deployment is paused".into(),
                now(),
            )
        } else if !paused(d) && paused_condition {
            new_condition(
                PROGRESSING,
                "Unknown",
                reason::RESUMED,
                "Deployment is resumed".into(),
                now(),
            )
        } else {
            return Ok(());
        };
        set_condition(d.status.get_or_insert_with(Default::default), condition);
        self.update_status(d).await
    }

    /// `isScalingEvent`: an active replica set was sized for another `spec.replicas`.
    async fn is_scaling_event(
        &self,
        d: &mut Deployment,
        rs_list: &mut Vec<ReplicaSet>,
    ) -> Result<bool> {
        let (new_rs, old) = self.get_all(d, rs_list, false).await?;
        let desired = replicas(d);
        Ok(old
            .iter()
            .chain(new_rs.iter())
            .filter(|rs| rs_replicas(rs) > 0)
            .filter_map(desired_replicas_annotation)
            .any(|annotated| annotated != desired))
    }

    /// Upstream's `sync`: scaling and paused deployments.
    async fn sync_scale(&self, d: &mut Deployment, rs_list: &mut Vec<ReplicaSet>) -> Result<()> {
        let (mut new_rs, mut old) = self.get_all(d, rs_list, false).await?;
        self.scale(d, &mut new_rs, &mut old).await?;
        if paused(d) {
            self.cleanup_deployment(d, &old).await?;
        }
        self.sync_deployment_status(d, &old, new_rs.as_ref()).await
    }

    async fn sync_status_only(
        &self,
        d: &mut Deployment,
        rs_list: &mut Vec<ReplicaSet>,
    ) -> Result<()> {
        let (new_rs, old) = self.get_all(d, rs_list, false).await?;
        self.sync_deployment_status(d, &old, new_rs.as_ref()).await
    }

    /// `scale`: a deployment whose size changed. One active replica set takes it all; a
    /// saturated new one means the old ones go; otherwise (rolling) every active replica
    /// set changes in proportion to its size, so the rollout neither speeds up nor slows.
    async fn scale(
        &self,
        d: &Deployment,
        new_rs: &mut Option<ReplicaSet>,
        old: &mut [ReplicaSet],
    ) -> Result<()> {
        if let Some(target) = find_active_or_latest(new_rs.as_ref(), old).cloned() {
            if rs_replicas(&target) == replicas(d) {
                return Ok(());
            }
            let (_, updated) = self.scale_to(&target, replicas(d), d).await?;
            refresh(old, &updated);
            if let Some(n) = new_rs
                .as_mut()
                .filter(|n| n.metadata.uid == updated.metadata.uid)
            {
                *n = updated;
            }
            return Ok(());
        }
        if is_saturated(d, new_rs.as_ref()) {
            for rs in old.iter_mut().filter(|rs| rs_replicas(rs) > 0) {
                let (_, updated) = self.scale_to(rs, 0, d).await?;
                *rs = updated;
            }
            return Ok(());
        }
        if !is_rolling_update(d) {
            return Ok(());
        }
        let active: Vec<&ReplicaSet> = old
            .iter()
            .chain(new_rs.iter())
            .filter(|rs| rs_replicas(rs) > 0)
            .collect();
        let (sizes, operation) = proportional_sizes(d, &active);
        for (rs_name, size) in sizes {
            let current = old
                .iter()
                .chain(new_rs.iter())
                .find(|rs| name(rs) == rs_name)
                .cloned();
            let Some(current) = current else { continue };
            let (_, updated) = self.scale_replica_set(&current, size, d, operation).await?;
            refresh(old, &updated);
            if let Some(n) = new_rs
                .as_mut()
                .filter(|n| n.metadata.uid == updated.metadata.uid)
            {
                *n = updated;
            }
        }
        Ok(())
    }

    /// `cleanupDeployment`: deletes the oldest old replica sets beyond
    /// `revisionHistoryLimit`, only those scaled to zero with no pods left.
    async fn cleanup_deployment(&self, d: &Deployment, old: &[ReplicaSet]) -> Result<()> {
        let Some(limit) = revision_history_limit(d) else {
            return Ok(());
        };
        let mut cleanable: Vec<&ReplicaSet> = old.iter().filter(|rs| !is_deleting(*rs)).collect();
        let excess = cleanable.len() as i64 - i64::from(limit);
        if excess <= 0 {
            return Ok(());
        }
        cleanable.sort_by(|a, b| by_revision(a, b));
        for rs in cleanable.into_iter().take(excess as usize) {
            let observed = rs
                .status
                .as_ref()
                .and_then(|s| s.observed_generation)
                .unwrap_or(0);
            if rs_actual(rs) != 0
                || rs_replicas(rs) != 0
                || rs.metadata.generation.unwrap_or(0) > observed
            {
                continue;
            }
            let ns = rs.metadata.namespace.clone().unwrap_or_default();
            match self
                .rs_api(&ns)
                .delete(&name(rs), &DeleteParams::default())
                .await
            {
                Ok(_) => {
                    tracing::info!(deployment = %ObjectKey::of(d), replica_set = %name(rs), "deleted old replica set beyond the revision history limit");
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                // Stop at the first failure rather than pile more on a struggling server.
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }

    /// `syncDeploymentStatus`.
    async fn sync_deployment_status(
        &self,
        d: &mut Deployment,
        old: &[ReplicaSet],
        new_rs: Option<&ReplicaSet>,
    ) -> Result<()> {
        let all: Vec<&ReplicaSet> = old.iter().chain(new_rs).collect();
        let status = calculate_status(&all, new_rs, d, now());
        if same_status(d.status.as_ref(), &status) {
            return Ok(());
        }
        d.status = Some(status);
        self.update_status(d).await
    }

    /// `syncRolloutStatus`: the status with the Progressing condition (complete, progressing
    /// or timed out) and replica failures; when nothing changed and the rollout is under
    /// way, asks to look again when the progress deadline would pass.
    async fn sync_rollout_status(
        &self,
        d: &mut Deployment,
        old: &[ReplicaSet],
        new_rs: Option<&ReplicaSet>,
    ) -> Result<Outcome> {
        let now = now();
        let all: Vec<&ReplicaSet> = old.iter().chain(new_rs).collect();
        let mut status = calculate_status(&all, new_rs, d, now);
        if progress_deadline(d).is_none() {
            remove_condition(&mut status, PROGRESSING);
        }
        let current = get_condition(d.status.as_ref(), PROGRESSING).cloned();
        let complete_before = status.replicas == status.updated_replicas
            && current.as_ref().map(condition_reason) == Some(reason::NEW_RS_AVAILABLE);
        if progress_deadline(d).is_some() && !complete_before {
            let subject = match new_rs {
                Some(rs) => format!("ReplicaSet {:?}", name(rs)),
                None => format!("Deployment {:?}", d.name_any()),
            };
            if deployment_complete(d, &status) {
                let condition = new_condition(
                    PROGRESSING,
                    "True",
                    reason::NEW_RS_AVAILABLE,
                    format!("{subject} has successfully progressed."),
                    now,
                );
                set_condition(&mut status, condition);
            } else if deployment_progressing(d, &status) {
                let mut condition = new_condition(
                    PROGRESSING,
                    "True",
                    reason::REPLICA_SET_UPDATED,
                    format!("{subject} is progressing."),
                    now,
                );
                // Progress refreshes lastUpdateTime even with the same reason, which
                // set_condition would not do.
                if let Some(current) = &current {
                    if current.status == "True" {
                        condition.last_transition_time = current.last_transition_time.clone();
                    }
                    remove_condition(&mut status, PROGRESSING);
                }
                set_condition(&mut status, condition);
            } else if deployment_timed_out(d, &status, now) {
                let condition = new_condition(
                    PROGRESSING,
                    "False",
                    reason::TIMED_OUT,
                    format!("{subject} has timed out progressing."),
                    now,
                );
                set_condition(&mut status, condition);
            }
        }
        match replica_failure(old, new_rs) {
            Some(condition) => set_condition(&mut status, condition),
            None => remove_condition(&mut status, REPLICA_FAILURE),
        }
        if same_status(d.status.as_ref(), &status) {
            return Ok(requeue_stuck(d, &status, now));
        }
        d.status = Some(status);
        self.update_status(d).await?;
        // The status write comes back as an update of the deployment, which syncs it again
        // and sets the deadline timer then.
        Ok(Outcome::Done)
    }

    // -----------------------------------------------------------------------------------
    // RollingUpdate.

    /// `rolloutRolling`.
    async fn rollout_rolling(
        &self,
        d: &mut Deployment,
        rs_list: &mut Vec<ReplicaSet>,
    ) -> Result<Outcome> {
        let (new_rs, mut old) = self.get_all(d, rs_list, true).await?;
        let Some(mut new_rs) = new_rs else {
            return Err(Error::Invalid(format!(
                "no new replica set for deployment {}",
                ObjectKey::of(d)
            )));
        };
        if let Some(updated) = self.reconcile_new_rs(d, &old, &new_rs).await? {
            new_rs = updated;
            return self.sync_rollout_status(d, &old, Some(&new_rs)).await;
        }
        if self.reconcile_old_rss(d, &mut old, &new_rs).await? {
            return self.sync_rollout_status(d, &old, Some(&new_rs)).await;
        }
        if d.status.as_ref().is_some_and(|s| deployment_complete(d, s)) {
            self.cleanup_deployment(d, &old).await?;
        }
        self.sync_rollout_status(d, &old, Some(&new_rs)).await
    }

    /// `reconcileNewReplicaSet`: the new replica set, if it was scaled.
    async fn reconcile_new_rs(
        &self,
        d: &Deployment,
        old: &[ReplicaSet],
        new_rs: &ReplicaSet,
    ) -> Result<Option<ReplicaSet>> {
        let desired = replicas(d);
        let current = rs_replicas(new_rs);
        if current == desired {
            return Ok(None);
        }
        let target = if current > desired {
            desired
        } else {
            let all: Vec<&ReplicaSet> = old.iter().chain(std::iter::once(new_rs)).collect();
            new_rs_new_replicas(d, &all, new_rs)
        };
        let (scaled, updated) = self.scale_to(new_rs, target, d).await?;
        Ok(scaled.then_some(updated))
    }

    /// `reconcileOldReplicaSets`: scales old replica sets down as far as availability
    /// allows, their unhealthy replicas first; whether anything was scaled.
    async fn reconcile_old_rss(
        &self,
        d: &Deployment,
        old: &mut [ReplicaSet],
        new_rs: &ReplicaSet,
    ) -> Result<bool> {
        let mut active: Vec<ReplicaSet> = old
            .iter()
            .filter(|rs| rs_replicas(rs) > 0)
            .cloned()
            .collect();
        let old_pods = replica_count(&active);
        if old_pods == 0 {
            return Ok(false);
        }
        let all_pods = old_pods + rs_replicas(new_rs);
        let min_available = replicas(d) - max_unavailable(d);
        // Unavailable new pods count against the budget, so a broken new template cannot
        // make the rollout take down more old pods.
        let new_unavailable = rs_replicas(new_rs) - rs_available(new_rs);
        let max_scaled_down = all_pods - min_available - new_unavailable;
        if max_scaled_down <= 0 {
            return Ok(false);
        }
        // Upstream reports failures here as "nothing scaled" and lets the next sync retry.
        let cleaned = match self
            .cleanup_unhealthy(d, &mut active, max_scaled_down)
            .await
        {
            Ok(n) => n,
            Err(err) => {
                tracing::debug!(deployment = %ObjectKey::of(d), %err, "cleaning up unhealthy replicas failed");
                return Ok(false);
            }
        };
        for rs in &active {
            refresh(old, rs);
        }
        let scaled = match self
            .scale_down_old_for_rolling(d, &mut active, new_rs)
            .await
        {
            Ok(n) => n,
            Err(err) => {
                tracing::debug!(deployment = %ObjectKey::of(d), %err, "scaling down old replica sets failed");
                0
            }
        };
        for rs in &active {
            refresh(old, rs);
        }
        Ok(cleaned + scaled > 0)
    }

    /// `cleanupUnhealthyReplicas`: old replica sets lose their unavailable replicas first,
    /// which costs no availability.
    async fn cleanup_unhealthy(
        &self,
        d: &Deployment,
        old: &mut [ReplicaSet],
        max_cleanup: i32,
    ) -> Result<i32> {
        old.sort_by(by_creation);
        let mut total = 0;
        for rs in old.iter_mut() {
            if total >= max_cleanup {
                break;
            }
            let size = rs_replicas(rs);
            let available = rs_available(rs);
            if size == 0 || size == available {
                continue;
            }
            let count = (max_cleanup - total).min(size - available);
            let (_, updated) = self.scale_to(rs, size - count, d).await?;
            *rs = updated;
            total += count;
        }
        Ok(total)
    }

    /// `scaleDownOldReplicaSetsForRollingUpdate`: oldest first, as far as the available
    /// replicas exceed replicas − maxUnavailable.
    async fn scale_down_old_for_rolling(
        &self,
        d: &Deployment,
        old: &mut [ReplicaSet],
        new_rs: &ReplicaSet,
    ) -> Result<i32> {
        let min_available = replicas(d) - max_unavailable(d);
        let available = available_count(old.iter().chain(std::iter::once(new_rs)));
        if available <= min_available {
            return Ok(0);
        }
        old.sort_by(by_creation);
        let to_scale_down = available - min_available;
        let mut total = 0;
        for rs in old.iter_mut() {
            if total >= to_scale_down {
                break;
            }
            let size = rs_replicas(rs);
            if size == 0 {
                continue;
            }
            let count = size.min(to_scale_down - total);
            let (_, updated) = self.scale_to(rs, size - count, d).await?;
            *rs = updated;
            total += count;
        }
        Ok(total)
    }

    // -----------------------------------------------------------------------------------
    // Recreate.

    /// `rolloutRecreate`: old replica sets to zero, wait for their pods to be gone, then the
    /// new replica set at full size.
    async fn rollout_recreate(
        &self,
        d: &mut Deployment,
        rs_list: &mut Vec<ReplicaSet>,
    ) -> Result<Outcome> {
        let (mut new_rs, mut old) = self.get_all(d, rs_list, false).await?;
        let mut scaled_down = false;
        for rs in old.iter_mut().filter(|rs| rs_replicas(rs) > 0) {
            let (scaled, updated) = self.scale_to(rs, 0, d).await?;
            scaled_down |= scaled;
            *rs = updated;
        }
        if scaled_down {
            return self.sync_rollout_status(d, &old, new_rs.as_ref()).await;
        }
        if self.old_pods_running(d, new_rs.as_ref(), &old, rs_list) {
            return self.sync_rollout_status(d, &old, new_rs.as_ref()).await;
        }
        if new_rs.is_none() {
            (new_rs, old) = self.get_all(d, rs_list, true).await?;
        }
        if let Some(rs) = new_rs.as_mut() {
            let (_, updated) = self.scale_to(rs, replicas(d), d).await?;
            *rs = updated;
        }
        if d.status.as_ref().is_some_and(|s| deployment_complete(d, s)) {
            self.cleanup_deployment(d, &old).await?;
        }
        self.sync_rollout_status(d, &old, new_rs.as_ref()).await
    }

    /// `oldPodsRunning`: old replica sets still report pods, or a pod of theirs is not
    /// finished yet (an Unknown phase counts as running: it may be).
    fn old_pods_running(
        &self,
        d: &Deployment,
        new_rs: Option<&ReplicaSet>,
        old: &[ReplicaSet],
        rs_list: &[ReplicaSet],
    ) -> bool {
        if actual_count(old) > 0 {
            return true;
        }
        let owned: HashSet<&str> = rs_list
            .iter()
            .filter(|rs| new_rs.is_none_or(|n| n.metadata.uid != rs.metadata.uid))
            .filter_map(|rs| rs.metadata.uid.as_deref())
            .collect();
        let sel = selector(deployment_selector(d).as_ref());
        self.pods
            .in_namespace(d.metadata.namespace.as_deref().unwrap_or(""))
            .iter()
            .filter(|p| selects(&sel, p.labels()))
            .filter(|p| controller_of(p.as_ref()).is_some_and(|r| owned.contains(r.uid.as_str())))
            .any(|p| !matches!(crate::util::pod_phase(p), "Failed" | "Succeeded"))
    }
}

/// `getReplicaFailures`: the new replica set's ReplicaFailure condition, else any old one's.
fn replica_failure(old: &[ReplicaSet], new_rs: Option<&ReplicaSet>) -> Option<DeploymentCondition> {
    let failure = |rs: &ReplicaSet| {
        rs.status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == REPLICA_FAILURE)
            .map(|c| DeploymentCondition {
                type_: c.type_.clone(),
                status: c.status.clone(),
                last_transition_time: c.last_transition_time.clone(),
                last_update_time: c.last_transition_time.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
            })
    };
    new_rs
        .and_then(failure)
        .or_else(|| new_rs.into_iter().chain(old).find_map(failure))
}

/// `requeueStuckDeployment`: a rollout under way is looked at again when its progress
/// deadline passes, so the timeout is reported without waiting for a resync.
fn requeue_stuck(
    d: &Deployment,
    status: &k8s_openapi::api::apps::v1::DeploymentStatus,
    now: Timestamp,
) -> Outcome {
    let Some(deadline) = progress_deadline(d) else {
        return Outcome::Done;
    };
    let Some(current) = get_condition(d.status.as_ref(), PROGRESSING) else {
        return Outcome::Done;
    };
    if deployment_complete(d, status) || condition_reason(current) == reason::TIMED_OUT {
        return Outcome::Done;
    }
    let Some(updated) = current.last_update_time.as_ref() else {
        return Outcome::Done;
    };
    let after = updated.0.as_second() + i64::from(deadline) - now.as_second();
    if after < 1 {
        return Outcome::RequeueAfter(Duration::from_secs(1));
    }
    // A second more so that the deadline has surely passed when the sync runs.
    Outcome::RequeueAfter(Duration::from_secs(after as u64 + 1))
}
