//! Namespace lifecycle (upstream's namespace controller): when a namespace is being deleted,
//! delete everything in it, then remove the `kubernetes` finalizer so the API server can
//! delete the namespace itself.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams, PostParams},
    discovery::{Discovery, Scope, verbs},
    runtime::{Controller, controller::Action, watcher},
};

/// The finalizer the API server puts on every namespace.
pub const FINALIZER: &str = "kubernetes";

/// Errors of the namespace controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("API call failed: {0}")]
    Api(#[from] kube::Error),
    /// Content is still being deleted (finalizers or grace periods).
    #[error("namespace {namespace} still has {remaining} objects")]
    ContentRemaining {
        /// The namespace.
        namespace: String,
        /// Objects left.
        remaining: usize,
    },
}

struct Ctx {
    client: Client,
}

/// Runs the controller until the stream of namespaces ends.
pub async fn run(client: Client) {
    let api: Api<Namespace> = Api::all(client.clone());
    Controller::new(api, watcher::Config::default())
        .run(reconcile, error_policy, Arc::new(Ctx { client }))
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "namespace reconcile failed");
            }
        })
        .await;
}

fn error_policy(_ns: Arc<Namespace>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    match err {
        Error::ContentRemaining { .. } => Action::requeue(Duration::from_secs(2)),
        Error::Api(_) => Action::requeue(Duration::from_secs(5)),
    }
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if ns.metadata.deletion_timestamp.is_none() {
        return Ok(Action::await_change());
    }
    let finalizers = ns
        .spec
        .as_ref()
        .and_then(|s| s.finalizers.clone())
        .unwrap_or_default();
    if !finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let name = ns.name_any();
    let remaining = delete_content(&ctx.client, &name).await?;
    if remaining > 0 {
        return Err(Error::ContentRemaining {
            namespace: name,
            remaining,
        });
    }
    let mut finalized = (*ns).clone();
    if let Some(spec) = finalized.spec.as_mut() {
        spec.finalizers = Some(finalizers.into_iter().filter(|f| f != FINALIZER).collect());
    }
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    api.replace_subresource("finalize", &name, &PostParams::default(), &finalized)
        .await?;
    tracing::info!(namespace = %name, "namespace content deleted; finalized");
    Ok(Action::await_change())
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
