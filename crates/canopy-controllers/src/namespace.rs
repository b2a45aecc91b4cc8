//! Namespace lifecycle (upstream's namespace controller): when a namespace is being deleted,
//! delete everything in it, then remove the `kubernetes` finalizer so the API server can
//! delete the namespace itself.

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams, PostParams},
    discovery::{Discovery, Scope, verbs},
};

use crate::{
    informer::{Change, ObjectKey},
    manager::Context,
    queue::WorkQueue,
    worker::{Outcome, run_workers},
};

/// The finalizer the API server puts on every namespace.
pub const FINALIZER: &str = "kubernetes";

/// Errors of the namespace controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("API call failed: {0}")]
    Api(#[from] kube::Error),
}

/// Registers the controller's handlers and returns its workers: a namespace is synced when
/// it is added, changes, or at a resync.
pub fn start(ctx: &Arc<Context>) -> BoxFuture<'static, ()> {
    let queue: WorkQueue<ObjectKey> = ctx.queue("namespace");
    let namespaces = ctx.informers.namespaces.clone();
    {
        let queue = queue.clone();
        namespaces.add_handler(move |change| {
            if !matches!(change, Change::Delete(_)) {
                queue.add(ObjectKey::of(change.object().as_ref()), change.lane());
            }
        });
    }
    let ctx = ctx.clone();
    Box::pin(async move {
        namespaces.wait_synced().await;
        let workers = ctx.config.workers;
        run_workers(queue, workers, move |key: ObjectKey| {
            let ctx = ctx.clone();
            async move {
                match ctx.informers.namespaces.get(&key) {
                    Some(ns) => reconcile(ns, &ctx.client).await,
                    None => Ok(Outcome::Done),
                }
            }
        })
        .await;
    })
}

async fn reconcile(ns: Arc<Namespace>, client: &Client) -> Result<Outcome, Error> {
    if ns.metadata.deletion_timestamp.is_none() {
        return Ok(Outcome::Done);
    }
    let finalizers = ns
        .spec
        .as_ref()
        .and_then(|s| s.finalizers.clone())
        .unwrap_or_default();
    if !finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(Outcome::Done);
    }
    let name = ns.name_any();
    let remaining = delete_content(client, &name).await?;
    if remaining > 0 {
        // Content with finalizers or grace periods goes later; look again soon rather than
        // backing off as for a failure.
        tracing::debug!(namespace = %name, remaining, "namespace content still being deleted");
        return Ok(Outcome::RequeueAfter(Duration::from_secs(1)));
    }
    let mut finalized = (*ns).clone();
    if let Some(spec) = finalized.spec.as_mut() {
        spec.finalizers = Some(finalizers.into_iter().filter(|f| f != FINALIZER).collect());
    }
    let api: Api<Namespace> = Api::all(client.clone());
    api.replace_subresource("finalize", &name, &PostParams::default(), &finalized)
        .await?;
    tracing::info!(namespace = %name, "namespace content deleted; finalized");
    Ok(Outcome::Done)
}

/// Deletes every namespaced object in `namespace`; returns how many remain.
async fn delete_content(client: &Client, namespace: &str) -> Result<usize, Error> {
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut remaining = 0;
    for group in discovery.groups() {
        for (resource, caps) in group.recommended_resources() {
            if caps.scope != Scope::Namespaced
                || !caps.supports_operation(verbs::DELETE_COLLECTION)
                || !caps.supports_operation(verbs::LIST)
            {
                continue;
            }
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), namespace, &resource);
            api.delete_collection(&DeleteParams::background(), &ListParams::default())
                .await?;
            remaining += api.list_metadata(&ListParams::default()).await?.items.len();
        }
    }
    Ok(remaining)
}
