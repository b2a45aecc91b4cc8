//! What each built-in kind does beyond its schema, as upstream Kubernetes 1.33 does it:
//! defaulting (`pkg/apis/*/v1/defaults.go`, plus the `Priority` and
//! `DefaultTolerationSeconds` admission plugins for pods), validation
//! (`pkg/apis/*/validation`, apimachinery's object metadata rules), the registry strategies
//! (`pkg/registry/*/strategy.go`), field selectors and the spec changes that count as a new
//! generation.
//!
//! Objects are JSON values already type-checked against their schema; any field may be
//! absent, and no input makes these functions panic.

mod apps;
mod core;
mod meta;
mod names;
mod network;
mod pod;
mod podspec;
pub(crate) mod util;
mod volumes;

use serde_json::Value;

use crate::registry::ResourceDef;
use crate::status::Cause;
use util::Path;

pub use pod::pod_qos_class;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Namespace,
    Pod,
    Node,
    Service,
    Endpoints,
    ConfigMap,
    Secret,
    ServiceAccount,
    Event,
    Deployment,
    ReplicaSet,
    Lease,
    EndpointSlice,
    Tenant,
    Other,
}

fn kind_of(def: &ResourceDef) -> Kind {
    match (def.group, def.kind) {
        ("", "Namespace") => Kind::Namespace,
        ("", "Pod") => Kind::Pod,
        ("", "Node") => Kind::Node,
        ("", "Service") => Kind::Service,
        ("", "Endpoints") => Kind::Endpoints,
        ("", "ConfigMap") => Kind::ConfigMap,
        ("", "Secret") => Kind::Secret,
        ("", "ServiceAccount") => Kind::ServiceAccount,
        ("", "Event") => Kind::Event,
        ("apps", "Deployment") => Kind::Deployment,
        ("apps", "ReplicaSet") => Kind::ReplicaSet,
        ("coordination.k8s.io", "Lease") => Kind::Lease,
        ("discovery.k8s.io", "EndpointSlice") => Kind::EndpointSlice,
        ("canopy.io", "Tenant") => Kind::Tenant,
        _ => Kind::Other,
    }
}

fn name_fn(def: &ResourceDef) -> names::NameFn {
    match kind_of(def) {
        // Tenant names are label values (`canopy.io/tenant`) too.
        Kind::Namespace | Kind::Tenant => names::name_is_dns_label,
        Kind::Service => names::name_is_dns1035_label,
        Kind::Event => names::path_segment_name,
        _ => names::name_is_dns_subdomain,
    }
}

/// Upstream's name rules for a kind: the messages of what is wrong with `name`, empty when
/// it is valid (DNS-1123 subdomain for most kinds, DNS-1123 label for namespaces, DNS-1035
/// label for services, a path segment for events).
pub fn validate_name(def: &ResourceDef, name: &str) -> Vec<String> {
    name_fn(def)(name, false)
}

/// Fills in defaults as the v1 decoding of a request body does (`SetObjectDefaults_*` and
/// the conversions that keep paired fields in step).
pub fn apply_defaults(def: &ResourceDef, obj: &mut Value) {
    if !obj.is_object() {
        return;
    }
    match kind_of(def) {
        Kind::Pod => pod::default_pod(obj),
        Kind::Deployment => apps::default_deployment(obj),
        Kind::ReplicaSet => apps::default_replica_set(obj),
        Kind::Service => core::default_service(obj),
        Kind::Namespace => core::default_namespace(obj),
        Kind::Node => core::default_node(obj),
        Kind::Secret => core::default_secret(obj),
        Kind::Endpoints => core::default_endpoints(obj),
        Kind::Event => core::default_event(obj),
        Kind::Lease => network::default_lease(obj),
        Kind::EndpointSlice => network::default_endpoint_slice(obj),
        Kind::Tenant => crate::tenant::default_tenant(obj),
        Kind::ConfigMap | Kind::ServiceAccount | Kind::Other => {}
    }
}

fn metadata() -> Path {
    Path::new("metadata")
}

/// Validation of a new object: the kind's own rules, then (only when those pass, as
/// upstream's `BeforeCreate` does) the generic object metadata rules.
pub fn validate_create(def: &ResourceDef, obj: &Value) -> Vec<Cause> {
    let mut causes = match kind_of(def) {
        Kind::Pod => pod::validate_create(obj),
        Kind::Namespace => core::validate_namespace(obj),
        Kind::Node => core::validate_node(obj),
        Kind::Service => core::validate_service(obj),
        Kind::Endpoints => core::validate_endpoints(obj),
        Kind::ConfigMap => core::validate_config_map(obj),
        Kind::Secret => core::validate_secret(obj),
        Kind::Event => core::validate_event(obj),
        Kind::Deployment => apps::validate_deployment(obj),
        Kind::ReplicaSet => apps::validate_replica_set(obj),
        Kind::Lease => network::validate_lease(obj),
        Kind::EndpointSlice => network::validate_endpoint_slice(obj),
        Kind::Tenant => {
            let mut causes =
                meta::validate_object_meta(obj, def.namespaced, name_fn(def), &metadata());
            causes.extend(crate::tenant::validate_tenant(obj));
            causes
        }
        Kind::ServiceAccount | Kind::Other => {
            meta::validate_object_meta(obj, def.namespaced, name_fn(def), &metadata())
        }
    };
    if causes.is_empty() {
        causes = meta::validate_generic_object_meta(
            obj,
            def.namespaced,
            names::path_segment_name,
            &metadata(),
        );
    }
    causes
}

/// Validation of an update (through the main resource or `/status`, after the matching
/// `prepare_*`): upstream's common metadata checks followed by the kind's update rules.
pub fn validate_update(def: &ResourceDef, new: &Value, old: &Value) -> Vec<Cause> {
    let mut causes = meta::validate_generic_object_meta(
        new,
        def.namespaced,
        names::path_segment_name,
        &metadata(),
    );
    causes.extend(meta::validate_generic_object_meta_update(
        new,
        old,
        &metadata(),
    ));
    causes.extend(match kind_of(def) {
        Kind::Pod => pod::validate_update(new, old),
        Kind::Namespace => core::validate_namespace_update(new, old),
        Kind::Node => core::validate_node_update(new, old),
        Kind::Service => core::validate_service_update(new, old),
        Kind::ConfigMap => core::validate_config_map_update(new, old),
        Kind::Secret => core::validate_secret_update(new, old),
        Kind::Event => core::validate_event(new),
        Kind::Deployment => apps::validate_deployment_update(new, old),
        Kind::ReplicaSet => apps::validate_replica_set_update(new, old),
        Kind::Lease => network::validate_lease_update(new, old),
        Kind::EndpointSlice => network::validate_endpoint_slice_update(new, old),
        Kind::Tenant => {
            let mut causes = meta::validate_object_meta_update(new, old, &metadata());
            causes.extend(crate::tenant::validate_tenant_update(new, old));
            causes
        }
        Kind::Endpoints => {
            let mut causes = meta::validate_object_meta_update(new, old, &metadata());
            causes.extend(core::validate_endpoints(new));
            causes
        }
        Kind::ServiceAccount | Kind::Other => {
            let mut causes = meta::validate_object_meta_update(new, old, &metadata());
            causes.extend(meta::validate_object_meta(
                new,
                def.namespaced,
                name_fn(def),
                &metadata(),
            ));
            causes
        }
    });
    causes
}

/// The strategy's `PrepareForCreate` (after the mutating admission upstream runs before
/// it): clears or initializes what clients may not set on create.
pub fn prepare_create(def: &ResourceDef, obj: &mut Value) {
    if !obj.is_object() {
        return;
    }
    match kind_of(def) {
        Kind::Pod => pod::prepare_create(obj),
        Kind::Namespace => core::prepare_create_namespace(obj),
        Kind::Node => core::prepare_create_node(obj),
        Kind::Service => core::prepare_create_service(obj),
        Kind::Deployment | Kind::ReplicaSet => apps::prepare_create(obj),
        Kind::ServiceAccount => core::prepare_service_account(obj),
        Kind::Endpoints
        | Kind::ConfigMap
        | Kind::Secret
        | Kind::Event
        | Kind::Lease
        | Kind::EndpointSlice
        | Kind::Tenant
        | Kind::Other => {}
    }
}

/// The strategy's `PrepareForUpdate` for writes through the main resource: the old status
/// is kept (for kinds that have one), plus each kind's own rules.
pub fn prepare_update(def: &ResourceDef, new: &mut Value, old: &Value) {
    if !new.is_object() {
        return;
    }
    match kind_of(def) {
        Kind::Pod => pod::prepare_update(new, old),
        Kind::Namespace => core::prepare_update_namespace(new, old),
        Kind::Node => core::prepare_update_node(new, old),
        Kind::Service => core::prepare_update_service(new, old),
        Kind::Deployment | Kind::ReplicaSet => apps::prepare_update(new, old),
        Kind::ServiceAccount => core::prepare_service_account(new),
        _ if def.status => pod::keep_status(new, old),
        _ => {}
    }
}

/// The status strategy's `PrepareForUpdate` for writes through `/status`: the old spec is
/// kept, and whatever else upstream's status strategy resets.
pub fn prepare_status_update(def: &ResourceDef, new: &mut Value, old: &Value) {
    if !new.is_object() {
        return;
    }
    match kind_of(def) {
        Kind::Pod => pod::prepare_status_update(new, old),
        Kind::Node => core::prepare_status_update_node(new, old),
        Kind::Deployment => apps::prepare_deployment_status_update(new, old),
        Kind::Namespace => {
            pod::keep_field(new, old, "spec");
            core::canonicalize_namespace(new);
        }
        _ => pod::keep_field(new, old, "spec"),
    }
}

fn text<'a>(obj: &'a Value, dotted: &str) -> &'a str {
    crate::meta::path_str(obj, dotted).unwrap_or("")
}

/// The value of a field selector label on an object (upstream's `ToSelectableFields`):
/// absent fields read as `""`; `None` when the label is not selectable for the kind.
pub fn field_value(def: &ResourceDef, obj: &Value, field: &str) -> Option<String> {
    match field {
        "metadata.name" => return Some(crate::meta::name(obj).to_string()),
        "metadata.namespace" => return Some(crate::meta::namespace(obj).to_string()),
        _ => {}
    }
    let value = match (kind_of(def), field) {
        (
            Kind::Pod,
            "spec.nodeName"
            | "spec.restartPolicy"
            | "spec.schedulerName"
            | "spec.serviceAccountName"
            | "status.phase"
            | "status.nominatedNodeName",
        ) => text(obj, field).to_string(),
        // Old v1 clients select on `spec.host`, which converts to `spec.nodeName`.
        (Kind::Pod, "spec.host") => text(obj, "spec.nodeName").to_string(),
        (Kind::Pod, "spec.hostNetwork") => {
            let host_network = crate::meta::path(obj, "spec.hostNetwork")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            host_network.to_string()
        }
        (Kind::Pod, "status.podIP") => crate::meta::path(obj, "status.podIPs")
            .and_then(Value::as_array)
            .and_then(|ips| ips.first())
            .map(|ip| util::str_of(ip, "ip"))
            .unwrap_or_else(|| text(obj, "status.podIP"))
            .to_string(),
        // Accepted as a label upstream but never put in the field set, so it reads as "".
        (Kind::Pod, "status.podIPs") => String::new(),
        (Kind::Node, "spec.unschedulable") => crate::meta::path(obj, "spec.unschedulable")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            .to_string(),
        (Kind::Namespace, "status.phase") => text(obj, field).to_string(),
        (Kind::Secret, "type") => text(obj, field).to_string(),
        (Kind::Service, "spec.clusterIP" | "spec.type") => text(obj, field).to_string(),
        (Kind::ReplicaSet, "status.replicas") => crate::meta::path(obj, "status.replicas")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            .to_string(),
        (
            Kind::Event,
            "involvedObject.kind"
            | "involvedObject.namespace"
            | "involvedObject.name"
            | "involvedObject.uid"
            | "involvedObject.apiVersion"
            | "involvedObject.resourceVersion"
            | "involvedObject.fieldPath"
            | "reason"
            | "reportingComponent"
            | "type",
        ) => text(obj, field).to_string(),
        (Kind::Event, "source") => {
            let component = text(obj, "source.component");
            if component.is_empty() {
                text(obj, "reportingComponent").to_string()
            } else {
                component.to_string()
            }
        }
        _ => return None,
    };
    Some(value)
}

/// Whether an update changes what `metadata.generation` counts: the spec, for pods also a
/// new graceful deletion period, for deployments also the annotations.
pub fn spec_changed(def: &ResourceDef, new: &Value, old: &Value) -> bool {
    match kind_of(def) {
        Kind::Deployment => apps::deployment_changed(new, old),
        kind => {
            let spec_differs = !util::semantic_eq(util::get(new, "spec"), util::get(old, "spec"));
            let grace_changed = kind == Kind::Pod
                && match (
                    meta::deletion_grace_period(new),
                    meta::deletion_grace_period(old),
                ) {
                    (Some(n), Some(o)) => n != o,
                    (Some(_), None) => true,
                    _ => false,
                };
            spec_differs || grace_changed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::BUILTIN;
    use serde_json::json;

    fn def(kind: &str) -> &'static ResourceDef {
        BUILTIN
            .iter()
            .find(|d| d.kind == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    }

    fn created(kind: &str, mut obj: Value) -> Value {
        apply_defaults(def(kind), &mut obj);
        prepare_create(def(kind), &mut obj);
        obj
    }

    fn fields(causes: &[Cause]) -> Vec<(&str, &str)> {
        causes
            .iter()
            .map(|c| (c.field.as_str(), c.reason.as_str()))
            .collect()
    }

    #[test]
    fn minimal_pod_matches_upstream() {
        let pod = created(
            "Pod",
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}),
        );
        assert_eq!(
            pod,
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {
                    "containers": [{
                        "image": "nginx",
                        "imagePullPolicy": "Always",
                        "name": "nginx",
                        "resources": {},
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File"
                    }],
                    "dnsPolicy": "ClusterFirst",
                    "enableServiceLinks": true,
                    "preemptionPolicy": "PreemptLowerPriority",
                    "priority": 0,
                    "restartPolicy": "Always",
                    "schedulerName": "default-scheduler",
                    "securityContext": {},
                    "serviceAccount": "default",
                    "serviceAccountName": "default",
                    "terminationGracePeriodSeconds": 30,
                    "tolerations": [
                        {"effect": "NoExecute", "key": "node.kubernetes.io/not-ready",
                            "operator": "Exists", "tolerationSeconds": 300},
                        {"effect": "NoExecute", "key": "node.kubernetes.io/unreachable",
                            "operator": "Exists", "tolerationSeconds": 300}
                    ]
                },
                "status": {"phase": "Pending", "qosClass": "BestEffort"}})
        );
        assert!(validate_create(def("Pod"), &pod).is_empty());
    }

    #[test]
    fn pod_defaults_in_depth() {
        let pod = created(
            "Pod",
            json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {
                "hostNetwork": true,
                "serviceAccount": "builder",
                "containers": [{"name": "c", "image": "app:1.0",
                    "ports": [{"containerPort": 8080}],
                    "env": [{"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                    "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
                    "livenessProbe": {"httpGet": {"port": 8080}},
                    "readinessProbe": {"grpc": {"port": 9090}}}],
                "volumes": [{"name": "cache"}, {"name": "cfg", "configMap": {"name": "cfg"}}]}}),
        );
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(
            c["ports"][0],
            json!({"containerPort": 8080, "hostPort": 8080, "protocol": "TCP"})
        );
        assert_eq!(c["env"][0]["valueFrom"]["fieldRef"]["apiVersion"], "v1");
        assert_eq!(
            c["resources"]["requests"],
            json!({"cpu": "1", "memory": "1Gi"})
        );
        assert_eq!(
            c["livenessProbe"],
            json!({"httpGet": {"path": "/", "port": 8080, "scheme": "HTTP"}, "timeoutSeconds": 1,
                "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3})
        );
        assert_eq!(c["readinessProbe"]["grpc"]["service"], "");
        assert_eq!(
            pod["spec"]["volumes"][0],
            json!({"name": "cache", "emptyDir": {}})
        );
        assert_eq!(pod["spec"]["volumes"][1]["configMap"]["defaultMode"], 420);
        assert_eq!(pod["spec"]["serviceAccountName"], "builder");
        assert_eq!(pod["status"]["qosClass"], "Guaranteed");
    }

    #[test]
    fn minimal_deployment_matches_upstream() {
        let deploy = created(
            "Deployment",
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27"}]}}}}),
        );
        assert_eq!(
            deploy,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {
                    "progressDeadlineSeconds": 600,
                    "replicas": 1,
                    "revisionHistoryLimit": 10,
                    "selector": {"matchLabels": {"app": "web"}},
                    "strategy": {"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
                        "type": "RollingUpdate"},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {
                            "containers": [{
                                "image": "nginx:1.27",
                                "imagePullPolicy": "IfNotPresent",
                                "name": "nginx",
                                "resources": {},
                                "terminationMessagePath": "/dev/termination-log",
                                "terminationMessagePolicy": "File"
                            }],
                            "dnsPolicy": "ClusterFirst",
                            "restartPolicy": "Always",
                            "schedulerName": "default-scheduler",
                            "securityContext": {},
                            "terminationGracePeriodSeconds": 30
                        }
                    }
                },
                "status": {}})
        );
        assert!(validate_create(def("Deployment"), &deploy).is_empty());
        let rs = created(
            "ReplicaSet",
            json!({"metadata": {"name": "web-1", "namespace": "default"},
                "spec": {"selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}}}),
        );
        assert_eq!(rs["spec"]["replicas"], 1);
        assert!(
            rs["spec"]["template"]["spec"]
                .get("enableServiceLinks")
                .is_none()
        );
        assert!(validate_create(def("ReplicaSet"), &rs).is_empty());
    }

    #[test]
    fn invalid_pod_reports_upstream_paths() {
        let pod = created(
            "Pod",
            json!({"metadata": {"name": "Bad_Name", "namespace": "default", "labels": {"a": "-x"}},
                "spec": {"containers": [
                    {"name": "c", "image": "", "ports": [{"containerPort": 0}],
                        "volumeMounts": [{"name": "nope", "mountPath": "/x"}]},
                    {"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}],
                    "volumes": [{"name": "v", "emptyDir": {}, "hostPath": {"path": "/tmp"}}],
                    "restartPolicy": "Sometimes"}}),
        );
        let causes = validate_create(def("Pod"), &pod);
        let f = fields(&causes);
        for expected in [
            ("metadata.name", "FieldValueInvalid"),
            ("metadata.labels", "FieldValueInvalid"),
            ("spec.volumes[0].hostPath", "FieldValueForbidden"),
            ("spec.containers[0].image", "FieldValueRequired"),
            (
                "spec.containers[0].ports[0].containerPort",
                "FieldValueRequired",
            ),
            (
                "spec.containers[0].volumeMounts[0].name",
                "FieldValueNotFound",
            ),
            ("spec.containers[1].resources.requests", "FieldValueInvalid"),
            ("spec.containers[1].name", "FieldValueDuplicate"),
            ("spec.restartPolicy", "FieldValueNotSupported"),
        ] {
            assert!(f.contains(&expected), "{expected:?} missing from {f:?}");
        }
        let restart = causes
            .iter()
            .find(|c| c.field == "spec.restartPolicy")
            .map(|c| c.message.as_str());
        assert_eq!(
            restart,
            Some(
                "Unsupported value: \"Sometimes\": supported values: \"Always\", \"OnFailure\", \"Never\""
            )
        );
        let no_containers = created(
            "Pod",
            json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": []}}),
        );
        let causes = validate_create(def("Pod"), &no_containers);
        assert_eq!(
            fields(&causes),
            vec![("spec.containers", "FieldValueRequired")]
        );
        assert_eq!(causes[0].message, "Required value");
    }

    #[test]
    fn pod_update_immutability() {
        let old = created(
            "Pod",
            json!({"metadata": {"name": "p", "namespace": "d", "resourceVersion": "1"},
                "spec": {"containers": [{"name": "c", "image": "nginx:1"}], "activeDeadlineSeconds": 100}}),
        );
        let update = |f: &dyn Fn(&mut Value)| {
            let mut new = old.clone();
            f(&mut new);
            apply_defaults(def("Pod"), &mut new);
            prepare_update(def("Pod"), &mut new, &old);
            validate_update(def("Pod"), &new, &old)
        };
        assert!(update(&|p| p["spec"]["containers"][0]["image"] = json!("nginx:2")).is_empty());
        assert!(update(&|p| p["spec"]["activeDeadlineSeconds"] = json!(50)).is_empty());
        assert!(
            update(&|p| {
                if let Some(t) = p["spec"]["tolerations"].as_array_mut() {
                    t.push(json!({"key": "x", "operator": "Exists"}));
                }
            })
            .is_empty()
        );
        let causes = update(&|p| p["spec"]["activeDeadlineSeconds"] = json!(200));
        assert_eq!(
            fields(&causes),
            vec![("spec.activeDeadlineSeconds", "FieldValueInvalid")]
        );
        let causes = update(&|p| p["spec"]["restartPolicy"] = json!("Never"));
        assert_eq!(fields(&causes), vec![("spec", "FieldValueForbidden")]);
        assert!(causes[0].message.starts_with(
            "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)\n"
        ));
        assert!(causes[0].message.contains("spec.restartPolicy"));
        let causes = update(&|p| {
            if let Some(c) = p["spec"]["containers"].as_array_mut() {
                c.push(json!({"name": "d", "image": "x"}));
            }
        });
        assert!(fields(&causes).contains(&("spec.containers", "FieldValueForbidden")));
        let causes = update(&|p| p["spec"]["tolerations"] = json!([]));
        assert!(
            fields(&causes).contains(&("spec.tolerations", "FieldValueForbidden"))
                || causes.is_empty()
        );
        // Priority is fixed at create; clients cannot move it.
        let mut new = old.clone();
        new["spec"]["priority"] = json!(1000);
        prepare_update(def("Pod"), &mut new, &old);
        assert_eq!(new["spec"]["priority"], 0);
    }

    #[test]
    fn pod_status_update_keeps_spec_and_owner() {
        let old = created(
            "Pod",
            json!({"metadata": {"name": "p", "namespace": "d",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "1"}]},
                "spec": {"containers": [{"name": "c", "image": "nginx"}]}}),
        );
        let mut new = old.clone();
        new["spec"]["nodeName"] = json!("n1");
        new["metadata"]["ownerReferences"] = json!([]);
        new["status"] = json!({"phase": "Running", "podIPs": [{"ip": "10.1.0.4"}]});
        prepare_status_update(def("Pod"), &mut new, &old);
        assert_eq!(new["spec"], old["spec"]);
        assert_eq!(
            new["metadata"]["ownerReferences"],
            old["metadata"]["ownerReferences"]
        );
        assert_eq!(new["status"]["qosClass"], "BestEffort");
        assert!(validate_update(def("Pod"), &new, &old).is_empty());
        assert_eq!(
            field_value(def("Pod"), &new, "status.podIP").as_deref(),
            Some("10.1.0.4")
        );
        let mut bad = new.clone();
        bad["status"]["qosClass"] = json!("Guaranteed");
        assert!(
            fields(&validate_update(def("Pod"), &bad, &old))
                .contains(&("status.qosClass", "FieldValueInvalid"))
        );
    }

    #[test]
    fn mismatched_priority_is_refused() {
        let pod = created(
            "Pod",
            json!({"metadata": {"name": "p", "namespace": "d"},
                "spec": {"priority": 5, "containers": [{"name": "c", "image": "nginx"}]}}),
        );
        let causes = validate_create(def("Pod"), &pod);
        assert_eq!(
            fields(&causes),
            vec![("spec.priority", "FieldValueForbidden")]
        );
        let critical = created(
            "Pod",
            json!({"metadata": {"name": "p", "namespace": "d"},
                "spec": {"priorityClassName": "system-node-critical", "containers": [{"name": "c", "image": "nginx"}]}}),
        );
        assert_eq!(critical["spec"]["priority"], 2_000_001_000);
        let unknown = created(
            "Pod",
            json!({"metadata": {"name": "p", "namespace": "d"},
                "spec": {"priorityClassName": "batch-low", "containers": [{"name": "c", "image": "nginx"}]}}),
        );
        let causes = validate_create(def("Pod"), &unknown);
        assert_eq!(
            fields(&causes),
            vec![("spec.priorityClassName", "FieldValueForbidden")]
        );
        assert_eq!(
            causes[0].message,
            "Forbidden: no PriorityClass with name batch-low was found"
        );
    }

    #[test]
    fn generic_metadata_rules_run_after_kind_rules() {
        let event = created(
            "Event",
            json!({"metadata": {"name": "a/b", "namespace": "default"}, "involvedObject": {"kind": "Pod", "namespace": "default"}}),
        );
        let causes = validate_create(def("Event"), &event);
        assert_eq!(
            fields(&causes),
            vec![("metadata.name", "FieldValueInvalid")]
        );
        assert_eq!(
            causes[0].message,
            "Invalid value: \"a/b\": may not contain '/'"
        );
        let ok = created(
            "Event",
            json!({"metadata": {"name": "web.17a", "namespace": "default"}, "involvedObject": {"kind": "Pod"}}),
        );
        assert!(validate_create(def("Event"), &ok).is_empty());
        let cm = json!({"metadata": {"name": "c"}});
        assert_eq!(
            fields(&validate_create(def("ConfigMap"), &cm)),
            vec![("metadata.namespace", "FieldValueRequired")]
        );
        let node = json!({"metadata": {"name": "n", "namespace": "x"}});
        assert_eq!(
            fields(&validate_create(def("Node"), &node)),
            vec![("metadata.namespace", "FieldValueForbidden")]
        );
    }

    #[test]
    fn namespace_status_phase_follows_deletion() {
        let old = created("Namespace", json!({"metadata": {"name": "team"}}));
        let mut new = old.clone();
        new["status"]["phase"] = json!("Terminating");
        prepare_status_update(def("Namespace"), &mut new, &old);
        let causes = validate_update(def("Namespace"), &new, &old);
        assert_eq!(fields(&causes), vec![("status.Phase", "FieldValueInvalid")]);
        let mut deleting = old.clone();
        deleting["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        let mut finalizers_gone = deleting.clone();
        finalizers_gone["metadata"]["labels"]["extra"] = json!("x");
        prepare_update(def("Namespace"), &mut finalizers_gone, &deleting);
        assert!(validate_update(def("Namespace"), &finalizers_gone, &deleting).is_empty());
    }

    #[test]
    fn names_per_kind() {
        assert!(validate_name(def("Pod"), "a.b-c").is_empty());
        assert_eq!(
            validate_name(def("Namespace"), "a.b"),
            vec!["must not contain dots"]
        );
        assert_eq!(validate_name(def("Service"), "1abc").len(), 1);
        assert!(validate_name(def("Event"), "Anything.Goes_Here").is_empty());
        assert_eq!(validate_name(def("Event"), "."), vec!["may not be '.'"]);
        assert_eq!(validate_name(def("Lease"), "UPPER").len(), 1);
    }

    #[test]
    fn field_selectors_cover_the_registry() {
        for d in BUILTIN {
            let obj = json!({"metadata": {"name": "n", "namespace": "ns"}});
            assert_eq!(field_value(d, &obj, "metadata.name").as_deref(), Some("n"));
            for field in d.field_selectors {
                assert!(field_value(d, &obj, field).is_some(), "{} {field}", d.kind);
            }
            assert_eq!(field_value(d, &obj, "spec.bogus"), None);
        }
        let pod = json!({"spec": {"nodeName": "n1", "hostNetwork": true}, "status": {"phase": "Running"}});
        assert_eq!(
            field_value(def("Pod"), &pod, "spec.nodeName").as_deref(),
            Some("n1")
        );
        assert_eq!(
            field_value(def("Pod"), &pod, "spec.host").as_deref(),
            Some("n1")
        );
        assert_eq!(
            field_value(def("Pod"), &pod, "spec.hostNetwork").as_deref(),
            Some("true")
        );
        assert_eq!(
            field_value(def("Pod"), &json!({}), "spec.hostNetwork").as_deref(),
            Some("false")
        );
        assert_eq!(
            field_value(def("Pod"), &pod, "spec.restartPolicy").as_deref(),
            Some("")
        );
        let event = json!({"reportingComponent": "kubelet", "source": {}});
        assert_eq!(
            field_value(def("Event"), &event, "source").as_deref(),
            Some("kubelet")
        );
        let rs = json!({"status": {"replicas": 3}});
        assert_eq!(
            field_value(def("ReplicaSet"), &rs, "status.replicas").as_deref(),
            Some("3")
        );
        assert_eq!(
            field_value(def("Node"), &json!({}), "spec.unschedulable").as_deref(),
            Some("false")
        );
    }

    #[test]
    fn generation_follows_spec() {
        let a = json!({"metadata": {"annotations": {"x": "1"}}, "spec": {"replicas": 1, "paused": null, "x": []}});
        let mut b = json!({"metadata": {"annotations": {"x": "1"}}, "spec": {"replicas": 1}});
        assert!(!spec_changed(def("Deployment"), &a, &b));
        b["metadata"]["annotations"]["x"] = json!("2");
        assert!(spec_changed(def("Deployment"), &a, &b));
        assert!(!spec_changed(def("ReplicaSet"), &a, &b));
        let old = json!({"metadata": {}, "spec": {}});
        let deleting = json!({"metadata": {"deletionGracePeriodSeconds": 30}, "spec": {}});
        assert!(spec_changed(def("Pod"), &deleting, &old));
        assert!(!spec_changed(def("Pod"), &deleting, &deleting));
    }

    #[test]
    fn main_updates_keep_status() {
        for kind in ["Service", "Node", "Namespace", "ReplicaSet"] {
            let old = json!({"metadata": {"name": "x"}, "spec": {}, "status": {"phase": "Active", "k": 1}});
            let mut new = json!({"metadata": {"name": "x"}, "spec": {}, "status": {"k": 2}});
            prepare_update(def(kind), &mut new, &old);
            // Services also reset `status.loadBalancer` when they are not load balancers.
            assert_eq!(new["status"]["k"], 1, "{kind}");
            assert_eq!(new["status"]["phase"], "Active", "{kind}");
            let mut status_write =
                json!({"metadata": {"name": "x"}, "spec": {"changed": true}, "status": {"k": 3}});
            prepare_status_update(def(kind), &mut status_write, &old);
            assert_eq!(status_write["spec"], old["spec"], "{kind}");
            assert_eq!(status_write["status"]["k"], 3, "{kind}");
        }
    }

    #[test]
    fn nothing_panics_on_odd_input() {
        let odd = [
            json!(null),
            json!("x"),
            json!([1, 2]),
            json!({}),
            json!({"metadata": "x", "spec": 3, "status": []}),
            json!({"metadata": {"name": 1, "labels": [], "annotations": "a", "finalizers": {}, "ownerReferences": [1]},
                "spec": {"containers": [null, 1, {"ports": "x", "resources": {"limits": {"cpu": []}}}],
                    "volumes": [{"name": "v", "projected": {"sources": [1, {"secret": 2}]}}],
                    "selector": 5, "template": [], "ports": [{"port": "x"}], "taints": [null],
                    "strategy": {"rollingUpdate": {"maxSurge": []}}},
                "data": {"k": 1}, "stringData": {"a": 1}, "endpoints": [{"addresses": [1]}],
                "subsets": [{"ports": [1]}], "involvedObject": 1, "status": {"podIPs": [1], "conditions": [1]}}),
        ];
        for d in BUILTIN {
            for a in &odd {
                for b in &odd {
                    let mut x = a.clone();
                    apply_defaults(d, &mut x);
                    prepare_create(d, &mut x);
                    let _ = validate_create(d, &x);
                    let mut y = b.clone();
                    apply_defaults(d, &mut y);
                    prepare_update(d, &mut y, &x);
                    let _ = validate_update(d, &y, &x);
                    prepare_status_update(d, &mut y, &x);
                    let _ = validate_update(d, &y, &x);
                    let _ = spec_changed(d, &y, &x);
                    let _ = pod_qos_class(&y);
                    for f in d.field_selectors {
                        let _ = field_value(d, &y, f);
                    }
                }
            }
            let _ = validate_name(d, "");
            let _ = validate_name(d, "-");
            let _ = validate_name(d, "é-");
        }
    }
}
