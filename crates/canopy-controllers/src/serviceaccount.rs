//! ServiceAccounts (upstream's `serviceaccounts-controller`): every active namespace has a
//! `default` ServiceAccount, made again if deleted. Namespaces being deleted get none.

use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::{
    api::core::v1::{Namespace, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, api::PostParams};

use crate::{
    informer::{Change, ObjectKey},
    manager::Context,
    queue::{Lane, WorkQueue},
    util::namespace_terminating,
    worker::{Outcome, run_workers},
};

/// The ServiceAccounts every namespace has (upstream's `--service-accounts` default).
pub const ENSURED: &[&str] = &["default"];

/// Errors of the ServiceAccount controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("API call failed: {0}")]
    Api(#[from] kube::Error),
}

/// Registers the controller's handlers and returns its workers: a namespace is synced when
/// it is added or changes, and when one of its ServiceAccounts is deleted.
pub fn start(ctx: &Arc<Context>) -> BoxFuture<'static, ()> {
    let queue: WorkQueue<ObjectKey> = ctx.queue("serviceaccount");
    let informers = &ctx.informers;
    {
        let queue = queue.clone();
        informers.namespaces.add_handler(move |change| {
            if !matches!(change, Change::Delete(_)) {
                queue.add(ObjectKey::of(change.object().as_ref()), change.lane());
            }
        });
    }
    {
        let queue = queue.clone();
        informers.service_accounts.add_handler(move |change| {
            if let Change::Delete(sa) = change
                && let Some(namespace) = sa.metadata.namespace.as_deref()
            {
                queue.add(ObjectKey::cluster(namespace), Lane::Delete);
            }
        });
    }
    let ctx = ctx.clone();
    Box::pin(async move {
        ctx.informers.namespaces.wait_synced().await;
        ctx.informers.service_accounts.wait_synced().await;
        let workers = ctx.config.workers;
        run_workers(queue, workers, move |key: ObjectKey| {
            let ctx = ctx.clone();
            async move {
                match ctx.informers.namespaces.get(&key) {
                    Some(ns) => sync(&ctx, &ns).await,
                    None => Ok(Outcome::Done),
                }
            }
        })
        .await;
    })
}

fn active(ns: &Namespace) -> bool {
    ns.metadata.deletion_timestamp.is_none()
        && ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Active")
}

async fn sync(ctx: &Context, ns: &Namespace) -> Result<Outcome, Error> {
    if !active(ns) {
        return Ok(Outcome::Done);
    }
    let namespace = ns.metadata.name.as_deref().unwrap_or("");
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), namespace);
    for name in ENSURED {
        if ctx
            .informers
            .service_accounts
            .get(&ObjectKey::new(namespace, name))
            .is_some()
        {
            continue;
        }
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some((*name).to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &sa).await {
            Ok(_) => tracing::info!(namespace, name, "service account created"),
            // Our cache was behind, or the namespace went meanwhile: nothing to do.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(err) if namespace_terminating(&err) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_active_namespaces_get_accounts() {
        let ns = |v: serde_json::Value| -> Namespace { serde_json::from_value(v).unwrap() };
        assert!(active(&ns(
            json!({"metadata": {"name": "a"}, "status": {"phase": "Active"}})
        )));
        assert!(!active(&ns(
            json!({"metadata": {"name": "a"}, "status": {"phase": "Terminating"}})
        )));
        assert!(!active(&ns(
            json!({"metadata": {"name": "a", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Active"}})
        )));
    }
}
