//! Pods as the scheduler's watch decodes them: only the fields scheduling reads.
//!
//! A whole `Pod` carries managedFields, annotations, container statuses and the rest of the
//! status; the scheduler reads none of them, yet decoding them was most of its CPU per pod
//! (each pod arrives at least twice: created, then bound) and most of its memory (it keeps
//! every bound pod). Unknown fields are skipped by the JSON parser without allocating.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::{Deserialize, Deserializer};

/// A `Pod` holding only what the scheduler reads: name, namespace, uid, resourceVersion,
/// labels and deletionTimestamp; the whole spec; the status's phase and conditions.
#[derive(Clone, Debug)]
pub struct WatchedPod(pub Pod);

#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    metadata: WireMeta,
    #[serde(default)]
    spec: Option<PodSpec>,
    #[serde(default)]
    status: Option<WireStatus>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WireMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    deletion_timestamp: Option<Time>,
}

#[derive(Deserialize)]
struct WireStatus {
    phase: Option<String>,
    conditions: Option<Vec<PodCondition>>,
}

impl<'de> Deserialize<'de> for WatchedPod {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        let meta = wire.metadata;
        Ok(WatchedPod(Pod {
            metadata: ObjectMeta {
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                resource_version: meta.resource_version,
                labels: meta.labels,
                deletion_timestamp: meta.deletion_timestamp,
                ..ObjectMeta::default()
            },
            spec: wire.spec,
            status: wire.status.map(|status| PodStatus {
                phase: status.phase,
                conditions: status.conditions,
                ..PodStatus::default()
            }),
        }))
    }
}

impl kube::Resource for WatchedPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Pod")
    }
    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }
    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("pods")
    }
    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    #[test]
    fn keeps_what_scheduling_reads_and_drops_the_rest() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web", "namespace": "acme", "uid": "u1", "resourceVersion": "42",
                "labels": {"canopy.io/tenant": "acme"},
                "annotations": {"big": "x"},
                "deletionTimestamp": "2026-01-01T00:00:00Z",
                "managedFields": [{"manager": "kubectl", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {}}}],
            },
            "spec": {"nodeName": "n1", "priority": 7, "containers": [{"name": "app",
                "resources": {"requests": {"cpu": "100m"}}}]},
            "status": {"phase": "Pending", "qosClass": "Burstable",
                "conditions": [{"type": "PodScheduled", "status": "False", "message": "m"}]},
        });
        let pod = serde_json::from_value::<WatchedPod>(json).unwrap().0;
        assert_eq!(pod.metadata.name.as_deref(), Some("web"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("acme"));
        assert_eq!(pod.metadata.uid.as_deref(), Some("u1"));
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(pod.metadata.labels.unwrap()["canopy.io/tenant"], "acme");
        assert!(pod.metadata.deletion_timestamp.is_some());
        assert!(pod.metadata.annotations.is_none());
        assert!(pod.metadata.managed_fields.is_none());
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(spec.priority, Some(7));
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        assert_eq!(status.conditions.unwrap()[0].message.as_deref(), Some("m"));
        assert!(status.qos_class.is_none());
        assert_eq!(
            WatchedPod::url_path(&(), Some("acme")),
            "/api/v1/namespaces/acme/pods"
        );
    }
}
