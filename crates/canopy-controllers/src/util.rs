//! Helpers several controllers share, after upstream's `pkg/controller` and `podutil`.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference},
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    core::{Selector, SelectorExt},
};

/// A label selector that can be matched; `None` (no selector, or one that does not parse)
/// matches nothing, as upstream's `labels.Nothing()`.
pub fn selector(selector: Option<&LabelSelector>) -> Option<Selector> {
    Selector::try_from(selector?.clone()).ok()
}

/// Whether `selector` selects an object with `labels`.
pub fn selects(selector: &Option<Selector>, labels: &BTreeMap<String, String>) -> bool {
    selector.as_ref().is_some_and(|s| s.matches(labels))
}

/// The owner reference with `controller: true`, if any.
pub fn controller_of<K: Resource>(obj: &K) -> Option<&OwnerReference> {
    obj.meta()
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))
}

/// An owner reference naming `owner` as the controller (with `blockOwnerDeletion`).
pub fn controller_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.meta().name.clone().unwrap_or_default(),
        uid: owner.meta().uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Finished: phase `Succeeded` or `Failed`.
pub fn pod_terminal(pod: &Pod) -> bool {
    matches!(pod_phase(pod), "Succeeded" | "Failed")
}

/// Not finished and not being deleted: upstream's `IsPodActive`.
pub fn pod_active(pod: &Pod) -> bool {
    !pod_terminal(pod) && pod.metadata.deletion_timestamp.is_none()
}

/// The time the pod's `Ready` condition last turned true, if it is true.
pub fn pod_ready_since(pod: &Pod) -> Option<Option<Timestamp>> {
    let condition = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    (condition.status == "True").then(|| condition.last_transition_time.as_ref().map(|t| t.0))
}

/// Whether the pod's `Ready` condition is true.
pub fn pod_ready(pod: &Pod) -> bool {
    pod_ready_since(pod).is_some()
}

/// Ready for at least `min_ready_seconds` at `now`: upstream's `IsPodAvailable`.
pub fn pod_available(pod: &Pod, min_ready_seconds: i32, now: Timestamp) -> bool {
    match pod_ready_since(pod) {
        None => false,
        Some(_) if min_ready_seconds <= 0 => true,
        Some(None) => false,
        Some(Some(since)) => now.as_second() - since.as_second() >= i64::from(min_ready_seconds),
    }
}

/// The pod's phase, `""` when it has none yet.
pub fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// Whether the pod is bound to a node.
pub fn pod_assigned(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty())
}

// Claiming: upstream's `ControllerRefManager`, shared by every controller that owns objects
// through a controller reference.

/// Whether `owner` may adopt orphans: a live read (not the cache) shows it is still the
/// object we saw, with the same uid, and not being deleted. A sync asks once, before its
/// first adoption.
pub async fn can_adopt<O>(api: &Api<O>, owner: &O) -> Result<bool, kube::Error>
where
    O: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(fresh) = api.get_opt(&owner.name_any()).await? else {
        return Ok(false);
    };
    Ok(fresh.meta().uid == owner.meta().uid && fresh.meta().deletion_timestamp.is_none())
}

/// Makes `owner` the controller of `child` with upstream's strategic merge patch, guarded by
/// the child's uid. `None` when the child is gone, was changed meanwhile or already has
/// another controller: the next event decides again.
pub async fn adopt<K, O>(api: &Api<K>, child: &K, owner: &O) -> Result<Option<K>, kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    O: Resource<DynamicType = ()>,
{
    let patch = serde_json::json!({"metadata": {
        "ownerReferences": [controller_ref(owner)],
        "uid": child.meta().uid,
    }});
    match api
        .patch(
            &child.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(patch),
        )
        .await
    {
        Ok(adopted) => Ok(Some(adopted)),
        Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409 | 422) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Removes the reference to the owner with `owner_uid` from `child`, which the owner's
/// selector no longer matches. A child that is gone needs nothing.
pub async fn release<K>(api: &Api<K>, child: &K, owner_uid: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({"metadata": {
        "ownerReferences": [{"$patch": "delete", "uid": owner_uid}],
        "uid": child.meta().uid,
    }});
    match api
        .patch(
            &child.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(patch),
        )
        .await
    {
        Err(kube::Error::Api(s)) if matches!(s.code, 404 | 422) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Whether an API error says the namespace is being deleted (creations there are refused
/// until it is gone; nothing to retry).
pub fn namespace_terminating(err: &kube::Error) -> bool {
    let kube::Error::Api(status) = err else {
        return false;
    };
    status.code == 403
        && status
            .details
            .as_ref()
            .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"))
}

/// Whether an API error says the object does not exist (any longer).
pub fn not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 404)
}
