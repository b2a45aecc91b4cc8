//! Tenant admission (seed §2): which tenant every object belongs to, where a tenant's pods
//! may run, and the tenant's quota.
//!
//! The tenant label on a namespace is fixed when the namespace is created. Every object in a
//! tenant's namespace carries the same label, stamped here on every write whoever writes, so
//! that "this tenant's objects" is a label selector the watch cache can answer for lists and
//! watches across namespaces, and so that no write can move an object to another tenant.

use std::{collections::HashMap, sync::Arc};

use canopy_api::{
    ApiError, ApiResult, Cause, ResourceDef, meta,
    selector::LabelSelector,
    tenant::{Limits, TENANT_LABEL, Usage, pod_counts, pod_usage},
};
use serde_json::{Value, json};

use super::{Call, target};
use crate::{authz::NamespaceOwner, cache::Filter};

fn invalid_label(def: &ResourceDef, obj: &Value, detail: &str, value: &str) -> ApiError {
    ApiError::invalid(
        def.group,
        def.kind,
        meta::name(obj),
        vec![Cause::invalid(
            format!("metadata.labels[{TENANT_LABEL}]"),
            &json!(value),
            detail,
        )],
    )
}

fn set_label(obj: &mut Value, value: Option<&str>) {
    let metadata = meta::metadata_mut(obj);
    match value {
        Some(value) => {
            let labels = metadata
                .entry("labels")
                .or_insert_with(|| Value::Object(Default::default()));
            if !labels.is_object() {
                *labels = Value::Object(Default::default());
            }
            if let Some(labels) = labels.as_object_mut() {
                labels.insert(TENANT_LABEL.into(), json!(value));
            }
        }
        None => {
            if let Some(labels) = metadata.get_mut("labels").and_then(Value::as_object_mut) {
                labels.remove(TENANT_LABEL);
            }
        }
    }
}

/// Sets and checks the tenant label of a new (`old` None) or updated object, and checks
/// where a tenant's pod may run.
pub(super) fn admit(call: &Call<'_>, obj: &mut Value, old: Option<&Value>) -> ApiResult<()> {
    let def = call.req.def;
    if def.namespaced {
        let owner = call.namespace_owner.tenant();
        if let Some(given) = meta::label(obj, TENANT_LABEL)
            && Some(given) != owner
        {
            return Err(invalid_label(
                def,
                obj,
                "set by the server to the tenant of the object's namespace",
                given,
            ));
        }
        set_label(obj, owner);
        if def.group.is_empty() && def.plural == "pods" {
            if let Some(tenant) = owner {
                check_host_paths(call, obj, tenant)?;
            }
            check_node(call, obj, old)?;
        }
        return Ok(());
    }
    if def.group.is_empty() && def.plural == "nodes" {
        // Whose VM a node is decides whose pods it may run: only admins (the cloud
        // controller) say so, never the node itself.
        let given = meta::label(obj, TENANT_LABEL);
        let before = old.and_then(|o| meta::label(o, TENANT_LABEL));
        // A node agent may label its own Node once, with the tenant its credential names
        // (the cloud controller issues a tenant VM's credential with group
        // `canopy:tenant:<tenant>`); it can never move to another tenant.
        let credential_names = |tenant: &str| {
            matches!(call.access.principal, crate::authz::Principal::Node(_))
                && call
                    .user
                    .groups
                    .iter()
                    .any(|g| canopy_api::tenant::tenant_of_group(g) == Some(tenant))
        };
        let labelled_by_its_agent = before.is_none() && given.is_some_and(credential_names);
        if given != before && !call.access.is_admin() && !labelled_by_its_agent {
            return Err(crate::authz::denied(
                call.user,
                call.req,
                meta::name(obj),
                "only cluster admins assign nodes to tenants",
            ));
        }
        return Ok(());
    }
    if def.group.is_empty() && def.plural == "namespaces" {
        let given = meta::label(obj, TENANT_LABEL).map(str::to_string);
        match old {
            None => {
                if let Some(tenant) = call.access.tenant() {
                    if given.as_deref().is_some_and(|g| g != tenant) {
                        return Err(crate::authz::denied(
                            call.user,
                            call.req,
                            meta::name(obj),
                            "a tenant's namespaces belong to that tenant",
                        ));
                    }
                    set_label(obj, Some(tenant));
                } else if let Some(given) = &given
                    && !call.access.is_admin()
                {
                    return Err(invalid_label(
                        def,
                        obj,
                        "only cluster admins may assign namespaces to tenants",
                        given,
                    ));
                }
            }
            Some(old) => {
                let before = meta::label(old, TENANT_LABEL).map(str::to_string);
                match (&before, &given) {
                    // Dropped by a write that did not mention it (apply, replace): kept.
                    (Some(before), None) => set_label(obj, Some(before)),
                    (before, given) if before != given => {
                        return Err(invalid_label(
                            def,
                            obj,
                            "field is immutable: a namespace stays with the tenant it was created for",
                            given.as_deref().unwrap_or(""),
                        ));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// A hostPath volume hands a directory of the node (the agent's state, its credential) to
/// the pod, so it is for the platform's own pods only. The rule is on the namespace, not on
/// who writes: a tenant's pods are created by controllers with cluster rights from the
/// tenant's templates. Worded as upstream's PodSecurity admission.
fn check_host_paths(call: &Call<'_>, pod: &Value, tenant: &str) -> ApiResult<()> {
    let host_paths: Vec<&str> = pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v.get("hostPath").is_some_and(|h| !h.is_null()))
        .filter_map(|v| v["name"].as_str())
        .collect();
    if host_paths.is_empty() {
        return Ok(());
    }
    let names = host_paths
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(ApiError::forbidden(
        target(call.req.def, call.name()),
        format!(
            "violates the tenant pod policy: hostPath volumes ({names}) are not allowed in namespaces of tenant {tenant:?}; only the platform's namespaces may use them"
        ),
    ))
}

/// A tenant's pod may only be placed on that tenant's nodes: tenants never share a VM.
fn check_node(call: &Call<'_>, pod: &Value, old: Option<&Value>) -> ApiResult<()> {
    let node = meta::path_str(pod, "spec.nodeName").unwrap_or("");
    let before = old.and_then(|o| meta::path_str(o, "spec.nodeName"));
    if node.is_empty() || before == Some(node) {
        return Ok(());
    }
    let Some(tenant) = call.namespace_owner.tenant() else {
        return Ok(());
    };
    let Some(nodes) = call.ctx.registry.get("", "v1", "nodes") else {
        return Ok(());
    };
    let owner = call
        .ctx
        .cache(nodes)
        .get(node)
        .and_then(|n| n.label(TENANT_LABEL).map(str::to_string));
    if owner.as_deref() == Some(tenant) {
        return Ok(());
    }
    Err(ApiError::forbidden(
        target(call.req.def, call.name()),
        format!(
            "pods of tenant {tenant:?} may only run on the tenant's own nodes, and node {node:?} is not one of them"
        ),
    ))
}

/// Serializes the quota checks of one tenant's pod creations in this server, so that two
/// concurrent creations cannot both fit into the last free slot.
#[derive(Default)]
pub struct QuotaLocks {
    locks: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl QuotaLocks {
    fn get(&self, tenant: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock();
        if locks.len() > 10_000 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(tenant.to_string()).or_default().clone()
    }
}

/// What the tenant's pods use now, from the watch caches (after this server's own writes).
/// Walks only the tenant's namespaces: a pod create costs the tenant's size, not the cloud's.
async fn tenant_usage(call: &Call<'_>, tenant: &str) -> ApiResult<Usage> {
    let tenant_label = LabelSelector::exactly(TENANT_LABEL, tenant);
    let Some(namespaces_def) = call.ctx.registry.get("", "v1", "namespaces") else {
        return Ok(Usage::default());
    };
    let pods = call.ctx.cache(call.req.def);
    for cache in [pods, call.ctx.cache(namespaces_def)] {
        cache
            .wait_for_own_writes(call.ctx.options.cache_wait)
            .await
            .map_err(super::cache_error)?;
    }
    let namespaces = call
        .ctx
        .cache(namespaces_def)
        .list(
            &Filter {
                namespace: None,
                labels: tenant_label.clone(),
                fields: Default::default(),
            },
            0,
            None,
            None,
        )
        .map_err(super::cache_error)?;
    let mut usage = Usage::default();
    for namespace in namespaces.items {
        let filter = Filter {
            namespace: Some(namespace.name().to_string()),
            labels: tenant_label.clone(),
            fields: Default::default(),
        };
        let page = pods
            .list(&filter, 0, None, None)
            .map_err(super::cache_error)?;
        for pod in page.items {
            let value = pod.value();
            if pod_counts(&value) {
                usage += pod_usage(&value);
            }
        }
    }
    Ok(usage)
}

/// Admits a new pod against its tenant's quota. The returned guard must be held until the
/// pod is stored (and so visible to the next check).
/// The Service range a tenant's Tenant names, if any.
pub(super) async fn service_range(
    call: &Call<'_>,
    tenant: &str,
) -> ApiResult<Option<crate::services::Ipv4Range>> {
    let Some(tenants) = call.ctx.registry.get("canopy.io", "v1", "tenants") else {
        return Ok(None);
    };
    let obj = match call.ctx.cache(tenants).get(tenant) {
        Some(obj) => Some(obj.value()),
        None => call
            .ctx
            .read_stored(tenants, &tenants.key("", tenant))
            .await?
            .map(|(obj, _)| obj),
    };
    Ok(obj
        .as_ref()
        .and_then(|t| t.pointer("/spec/network/serviceCidr"))
        .and_then(Value::as_str)
        .and_then(|cidr| cidr.parse().ok()))
}

pub(super) async fn reserve_quota(
    call: &Call<'_>,
    pod: &Value,
) -> ApiResult<Option<tokio::sync::OwnedMutexGuard<()>>> {
    let NamespaceOwner::Tenant(tenant) = call.namespace_owner else {
        return Ok(None);
    };
    let Some(tenants) = call.ctx.registry.get("canopy.io", "v1", "tenants") else {
        return Ok(None);
    };
    let limits = match call.ctx.cache(tenants).get(tenant) {
        Some(obj) => Limits::of(&obj.value()),
        None => match call
            .ctx
            .read_stored(tenants, &tenants.key("", tenant))
            .await?
        {
            Some((obj, _)) => Limits::of(&obj),
            None => Limits::default(),
        },
    };
    if limits.is_unlimited() || !pod_counts(pod) {
        return Ok(None);
    }
    let guard = call.ctx.quota_locks.get(tenant).lock_owned().await;
    let used = tenant_usage(call, tenant).await?;
    let requested = pod_usage(pod);
    let exceeded = limits.exceeded(&used, &requested);
    if !exceeded.is_empty() {
        return Err(ApiError::forbidden(
            target(call.req.def, meta::name(pod)),
            format!(
                "exceeded quota of tenant {tenant:?}: {}",
                exceeded.join("; ")
            ),
        ));
    }
    Ok(Some(guard))
}
