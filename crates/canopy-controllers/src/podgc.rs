//! Pod garbage collection (upstream's `pod-garbage-collector`):
//!
//! - a pod bound to a node that no longer exists is marked Failed with a `DisruptionTarget`
//!   condition (reason `DeletionByPodGC`) and deleted at once, after a quarantine
//!   (upstream's 40 s) and a live read confirming the node is gone: nobody else would ever
//!   finish it, since the agent that ran it went with its node;
//! - a pod being deleted that was never scheduled is deleted at once (no agent will);
//! - terminated pods beyond `--terminated-pod-gc-threshold` are deleted, oldest first.

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;

use k8s_openapi::{
    api::core::v1::{Node, Pod, PodCondition},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams, Preconditions},
};

use crate::{
    informer::{Change, ObjectKey},
    manager::Context,
    queue::{Lane, WorkQueue},
    util::not_found,
    worker::{Outcome, run_workers},
};

/// Pods by the node they are bound to.
const POD_NODE_INDEX: &str = "podgc-node";
/// How often terminated pods are counted (upstream's `gcCheckPeriod`).
const CHECK_PERIOD: Duration = Duration::from_secs(20);

/// Errors of the pod garbage collector.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("API call failed: {0}")]
    Api(#[from] kube::Error),
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

fn terminated(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Registers the collector's handlers and returns its workers and its terminated-pod check.
pub fn start(ctx: &Arc<Context>) -> BoxFuture<'static, ()> {
    let queue: WorkQueue<ObjectKey> = ctx.queue("podgc");
    let informers = &ctx.informers;
    let quarantine = ctx.config.pod_gc_quarantine;
    informers.pods.add_index(POD_NODE_INDEX, |pod: &Pod| {
        node_of(pod).map(str::to_string).into_iter().collect()
    });
    {
        let (queue, nodes) = (queue.clone(), informers.nodes.clone());
        informers.pods.add_handler(move |change| {
            if matches!(change, Change::Delete(_)) {
                return;
            }
            let pod = change.object();
            let key = ObjectKey::of(pod.as_ref());
            match node_of(pod) {
                Some(node) if nodes.get(&ObjectKey::cluster(node)).is_none() => {
                    queue.add_after(key, change.lane(), quarantine);
                }
                None if pod.metadata.deletion_timestamp.is_some() => {
                    queue.add(key, change.lane());
                }
                _ => {}
            }
        });
    }
    {
        let (queue, pods) = (queue.clone(), informers.pods.clone());
        informers.nodes.add_handler(move |change| {
            if let Change::Delete(node) = change {
                for pod in pods.by_index(POD_NODE_INDEX, &node.name_any()) {
                    queue.add_after(ObjectKey::of(pod.as_ref()), Lane::Delete, quarantine);
                }
            }
        });
    }
    let ctx = ctx.clone();
    Box::pin(async move {
        ctx.informers.pods.wait_synced().await;
        ctx.informers.nodes.wait_synced().await;
        let check = {
            let ctx = ctx.clone();
            async move {
                loop {
                    if let Err(err) = collect_terminated(&ctx).await {
                        tracing::warn!(error = %err, "collecting terminated pods failed");
                    }
                    tokio::time::sleep(CHECK_PERIOD).await;
                }
            }
        };
        let workers = ctx.config.workers;
        let work = run_workers(queue, workers, move |key: ObjectKey| {
            let ctx = ctx.clone();
            async move {
                match ctx.informers.pods.get(&key) {
                    Some(pod) => sync(&ctx, &pod).await,
                    None => Ok(Outcome::Done),
                }
            }
        });
        futures::future::join(check, work).await;
    })
}

async fn sync(ctx: &Context, pod: &Pod) -> Result<Outcome, Error> {
    match node_of(pod) {
        None if pod.metadata.deletion_timestamp.is_some() => {
            tracing::info!(pod = %format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()), "deleting a terminating pod that was never scheduled");
            force_delete(ctx, pod).await?;
        }
        Some(node) if ctx.informers.nodes.get(&ObjectKey::cluster(node)).is_none() => {
            // The cache may be behind a node that just registered: ask the API.
            let nodes: Api<Node> = Api::all(ctx.client.clone());
            if nodes.get_opt(node).await?.is_some() {
                return Ok(Outcome::Done);
            }
            tracing::info!(pod = %format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()), node, "deleting a pod bound to a node that no longer exists");
            if !terminated(pod) {
                mark_failed(ctx, pod).await?;
            }
            force_delete(ctx, pod).await?;
        }
        _ => {}
    }
    Ok(Outcome::Done)
}

/// Upstream's `DisruptionTarget` condition and Failed phase, so that the pod's owner and
/// its users see why it ended.
async fn mark_failed(ctx: &Context, pod: &Pod) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let mut updated = pod.clone();
    let status = updated.status.get_or_insert_default();
    status.phase = Some("Failed".into());
    let conditions = status.conditions.get_or_insert_default();
    conditions.retain(|c| c.type_ != "DisruptionTarget");
    conditions.push(PodCondition {
        type_: "DisruptionTarget".into(),
        status: "True".into(),
        reason: Some("DeletionByPodGC".into()),
        message: Some("PodGC: node no longer exists".into()),
        last_transition_time: Some(Time(Timestamp::now())),
        ..Default::default()
    });
    match api
        .replace_status(&pod.name_any(), &PostParams::default(), &updated)
        .await
    {
        Ok(_) => Ok(()),
        // Gone, or changed meanwhile: the delete below still applies to this pod only.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Deletes this pod (its UID: never a successor of the same name) without a grace period.
async fn force_delete(ctx: &Context, pod: &Pod) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&pod.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(err) if not_found(&err) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Deletes the oldest terminated pods beyond the threshold (0: never).
async fn collect_terminated(ctx: &Context) -> Result<(), Error> {
    let threshold = ctx.config.terminated_pod_gc_threshold;
    if threshold == 0 {
        return Ok(());
    }
    let mut done: Vec<Arc<Pod>> = ctx
        .informers
        .pods
        .list()
        .into_iter()
        .filter(|p| terminated(p) && p.metadata.deletion_timestamp.is_none())
        .collect();
    if done.len() <= threshold {
        return Ok(());
    }
    done.sort_by(|a, b| {
        let created = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        created(a)
            .cmp(&created(b))
            .then_with(|| a.name_any().cmp(&b.name_any()))
    });
    let excess = done.len() - threshold;
    tracing::info!(
        terminated = done.len(),
        threshold,
        deleting = excess,
        "deleting the oldest terminated pods"
    );
    for pod in done.iter().take(excess) {
        force_delete(ctx, pod).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_node_and_terminal_phase() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Succeeded"}}))
        .unwrap();
        assert_eq!(node_of(&pod), Some("n1"));
        assert!(terminated(&pod));
        let unbound: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"}, "spec": {"nodeName": "", "containers": []},
            "status": {"phase": "Running"}}))
        .unwrap();
        assert_eq!(node_of(&unbound), None);
        assert!(!terminated(&unbound));
    }
}
