//! The core/v1 kinds other than pods: namespaces, nodes, services, endpoints, config maps,
//! secrets, service accounts and events.

use base64::Engine;
use serde_json::{Map, Value, json};

use super::meta::{
    self, validate_dns1123_label, validate_dns1123_subdomain, validate_kube_finalizer_name,
    validate_label_name, validate_labels, validate_object_meta, validate_object_meta_update,
    validate_qualified_name,
};
use super::names::{self, INVALID_CIDR, INVALID_IP};
use super::pod::{keep_field, keep_status};
use super::podspec::{validate_port_num_or_name, validate_taint_effect};
use super::util::{
    Path, default_str, default_value, duplicate, ensure_obj, forbidden, get, immutable, int_of,
    invalid, items_mut, list, not_supported, obj, obj_mut, opt_str, remove, required, semantic_eq,
    set, str_of, string_map, strings, too_long,
};
use crate::status::Cause;

const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];
/// `core.MaxSecretSize`, the limit of secret and config map data.
pub(crate) const MAX_SECRET_SIZE: usize = 1024 * 1024;
const METADATA_NAME_LABEL: &str = "kubernetes.io/metadata.name";

fn metadata_path() -> Path {
    Path::new("metadata")
}

fn name_of(obj: &Value) -> &str {
    get(obj, "metadata").map_or("", |m| str_of(m, "name"))
}

// ---------------------------------------------------------------------------------------
// Namespaces

/// `SetDefaults_Namespace` and `SetDefaults_NamespaceStatus`.
pub(crate) fn default_namespace(ns: &mut Value) {
    canonicalize_namespace(ns);
    default_value(ns, "spec", json!({}));
    if let Some(status) = ensure_obj(ns, "status") {
        default_str(status, "phase", "Active");
    }
}

/// Keeps the `kubernetes.io/metadata.name` label equal to the name, once there is one.
pub(crate) fn canonicalize_namespace(ns: &mut Value) {
    let name = name_of(ns).to_string();
    if name.is_empty() {
        return;
    }
    if let Some(labels) = ensure_obj(ns, "metadata").and_then(|m| ensure_obj(m, "labels")) {
        set(labels, METADATA_NAME_LABEL, json!(name));
    }
}

/// `namespaceStrategy.PrepareForCreate`.
pub(crate) fn prepare_create_namespace(ns: &mut Value) {
    set(ns, "status", json!({"phase": "Active"}));
    if let Some(spec) = ensure_obj(ns, "spec") {
        let mut finalizers: Vec<Value> = list(spec, "finalizers").to_vec();
        if !finalizers.iter().any(|f| f.as_str() == Some("kubernetes")) {
            finalizers.push(json!("kubernetes"));
        }
        set(spec, "finalizers", Value::Array(finalizers));
    }
    canonicalize_namespace(ns);
}

/// `namespaceStrategy.PrepareForUpdate`: finalizers change only through `/finalize`.
pub(crate) fn prepare_update_namespace(new: &mut Value, old: &Value) {
    let old_finalizers = get(old, "spec").and_then(|s| get(s, "finalizers")).cloned();
    if let Some(spec) = ensure_obj(new, "spec") {
        match old_finalizers {
            Some(f) => set(spec, "finalizers", f),
            None => {
                remove(spec, "finalizers");
            }
        }
    }
    keep_status(new, old);
    canonicalize_namespace(new);
}

/// `ValidateNamespace`.
pub(crate) fn validate_namespace(ns: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta(ns, false, names::name_is_dns_label, &metadata_path());
    let path = Path::new("spec").child("finalizers");
    for finalizer in get(ns, "spec")
        .map(|s| strings(s, "finalizers"))
        .unwrap_or_default()
    {
        causes.extend(validate_qualified_name(finalizer, &path));
        causes.extend(validate_kube_finalizer_name(finalizer, &path));
    }
    causes
}

/// `ValidateNamespaceUpdate`, plus `ValidateNamespaceStatusUpdate`'s phase rule.
pub(crate) fn validate_namespace_update(new: &Value, old: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta_update(new, old, &metadata_path());
    // The phase rule belongs to `/status` writes; main updates keep the old status.
    if semantic_eq(get(new, "status"), get(old, "status")) {
        return causes;
    }
    let phase = get(new, "status").map_or("", |s| str_of(s, "phase"));
    let deleting = get(new, "metadata").is_some_and(|m| get(m, "deletionTimestamp").is_some());
    let path = Path::new("status").child("Phase");
    if !deleting && phase != "Active" {
        causes.push(invalid(
            &path,
            phase,
            "may only be 'Active' if `deletionTimestamp` is empty",
        ));
    } else if deleting && phase != "Terminating" {
        causes.push(invalid(
            &path,
            phase,
            "may only be 'Terminating' if `deletionTimestamp` is not empty",
        ));
    }
    causes
}

// ---------------------------------------------------------------------------------------
// Nodes

const NODE_INFO_FIELDS: &[&str] = &[
    "machineID",
    "systemUUID",
    "bootID",
    "kernelVersion",
    "osImage",
    "containerRuntimeVersion",
    "kubeletVersion",
    "kubeProxyVersion",
    "operatingSystem",
    "architecture",
];

/// `SetDefaults_NodeStatus`, the `podCIDR`/`podCIDRs` conversion, and the struct fields
/// upstream always serializes.
pub(crate) fn default_node(node: &mut Value) {
    if let Some(spec) = ensure_obj(node, "spec") {
        let cidr = str_of(spec, "podCIDR").to_string();
        let first = list(spec, "podCIDRs")
            .first()
            .and_then(Value::as_str)
            .map(str::to_string);
        if !cidr.is_empty() && first.as_deref() != Some(cidr.as_str()) {
            set(spec, "podCIDRs", json!([cidr]));
        } else if let Some(first) = first {
            set(spec, "podCIDR", json!(first));
        }
    }
    if let Some(status) = ensure_obj(node, "status") {
        if get(status, "allocatable").is_none()
            && let Some(capacity) = get(status, "capacity").cloned()
        {
            set(status, "allocatable", capacity);
        }
        default_value(
            status,
            "daemonEndpoints",
            json!({"kubeletEndpoint": {"Port": 0}}),
        );
        if let Some(info) = ensure_obj(status, "nodeInfo") {
            for field in NODE_INFO_FIELDS {
                default_value(info, field, json!(""));
            }
        }
    }
}

/// `nodeStrategy.PrepareForCreate`: the deprecated dynamic kubelet config is dropped.
pub(crate) fn prepare_create_node(node: &mut Value) {
    if let Some(spec) = obj_mut(node, "spec") {
        remove(spec, "configSource");
    }
    if let Some(status) = obj_mut(node, "status") {
        remove(status, "config");
    }
}

/// `nodeStrategy.PrepareForUpdate`.
pub(crate) fn prepare_update_node(new: &mut Value, old: &Value) {
    keep_status(new, old);
    let in_use = get(old, "spec").is_some_and(|s| get(s, "configSource").is_some());
    if !in_use && let Some(spec) = obj_mut(new, "spec") {
        remove(spec, "configSource");
    }
}

/// `nodeStatusStrategy.PrepareForUpdate`.
pub(crate) fn prepare_status_update_node(new: &mut Value, old: &Value) {
    keep_field(new, old, "spec");
    let in_use = get(old, "status").is_some_and(|s| get(s, "config").is_some());
    if !in_use && let Some(status) = obj_mut(new, "status") {
        remove(status, "config");
    }
}

fn validate_taints(taints: &[Value], path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for (i, taint) in taints.iter().enumerate() {
        let p = path.index(i);
        let key = str_of(taint, "key");
        let value = str_of(taint, "value");
        let effect = str_of(taint, "effect");
        causes.extend(validate_label_name(key, &p.child("key")));
        let errs = names::label_value(value);
        if !errs.is_empty() {
            causes.push(invalid(&p.child("value"), value, &errs.join(";")));
        }
        causes.extend(validate_taint_effect(effect, false, &p.child("effect")));
        if seen.contains(&(key, effect)) {
            causes.push(Cause::new(
                "FieldValueDuplicate",
                p.as_str(),
                format!("Duplicate value: {taint}: taints must be unique by key and effect pair"),
            ));
            continue;
        }
        seen.push((key, effect));
    }
    causes
}

fn validate_resource_quantity(name: &str, value: &Value, path: &Path) -> Vec<Cause> {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let Ok(q) = crate::quantity::Quantity::parse(&text) else {
        return Vec::new();
    };
    let mut causes = Vec::new();
    if q.milli() < 0 {
        causes.push(invalid(path, text.clone(), super::util::IS_NEGATIVE));
    }
    let integer = [
        "pods",
        "services",
        "replicationcontrollers",
        "resourcequotas",
        "secrets",
        "persistentvolumeclaims",
        "configmaps",
    ]
    .contains(&name)
        || (name.contains('/')
            && !name.contains("kubernetes.io/")
            && !name.starts_with("requests.")
            && names::qualified_name(&format!("requests.{name}")).is_empty());
    if integer && q.milli() % 1000 != 0 {
        causes.push(invalid(path, text, "must be an integer"));
    }
    causes
}

fn validate_node_resources(node: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let empty = Value::Null;
    let status = get(node, "status").unwrap_or(&empty);
    for field in ["capacity", "allocatable"] {
        for (name, value) in obj(status, field).into_iter().flatten() {
            causes.extend(validate_resource_quantity(
                name,
                value,
                &Path::new("status").child(field).child(name),
            ));
        }
    }
    causes
}

fn ip_family(ip: &str) -> Option<bool> {
    names::parse_ip_sloppy(ip).map(|_| names::is_ipv6(ip))
}

/// `ValidateNode`.
pub(crate) fn validate_node(node: &Value) -> Vec<Cause> {
    let mut causes =
        validate_object_meta(node, false, names::name_is_dns_subdomain, &metadata_path());
    let empty = Value::Null;
    let spec = get(node, "spec").unwrap_or(&empty);
    // Upstream roots the taints path at metadata.
    causes.extend(validate_taints(
        list(spec, "taints"),
        &metadata_path().child("taints"),
    ));
    causes.extend(validate_node_resources(node));
    let cidrs = strings(spec, "podCIDRs");
    let path = Path::new("spec").child("podCIDRs");
    for (i, cidr) in cidrs.iter().enumerate() {
        if names::parse_cidr_sloppy(cidr).is_none() {
            causes.push(invalid(&path.index(i), *cidr, INVALID_CIDR));
        }
    }
    if cidrs.len() > 1 {
        let families: Vec<Option<bool>> = cidrs
            .iter()
            .map(|c| c.split_once('/').and_then(|(ip, _)| ip_family(ip)))
            .collect();
        let dual = families.iter().all(Option::is_some)
            && families.contains(&Some(true))
            && families.contains(&Some(false));
        if !dual || cidrs.len() > 2 {
            causes.push(invalid(
                &path,
                Value::from(cidrs.clone()),
                "may specify no more than one CIDR for each IP family",
            ));
        }
        let mut seen = Vec::new();
        for (i, cidr) in cidrs.iter().enumerate() {
            if seen.contains(cidr) {
                causes.push(duplicate(&path.index(i), *cidr));
            }
            seen.push(*cidr);
        }
    }
    causes
}

/// `ValidateNodeUpdate`.
pub(crate) fn validate_node_update(new: &Value, old: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta_update(new, old, &metadata_path());
    causes.extend(validate_node_resources(new));
    let empty = Value::Null;
    let status = get(new, "status").unwrap_or(&empty);
    let mut seen: Vec<&Value> = Vec::new();
    for (i, address) in list(status, "addresses").iter().enumerate() {
        if seen.iter().any(|a| semantic_eq(Some(a), Some(address))) {
            causes.push(duplicate(
                &Path::new("status").child("addresses").index(i),
                address.clone(),
            ));
        }
        seen.push(address);
    }
    let spec = get(new, "spec").unwrap_or(&empty);
    let old_spec = get(old, "spec").unwrap_or(&empty);
    let old_cidrs = strings(old_spec, "podCIDRs");
    let new_cidrs = strings(spec, "podCIDRs");
    let cidr_path = Path::new("spec").child("podCIDRs");
    const CIDR_MSG: &str = "node updates may not change podCIDR except from \"\" to valid";
    if !old_cidrs.is_empty() {
        if old_cidrs.len() != new_cidrs.len() {
            causes.push(forbidden(&cidr_path, CIDR_MSG));
        } else {
            for (o, n) in old_cidrs.iter().zip(&new_cidrs) {
                if o != n {
                    causes.push(forbidden(&cidr_path, CIDR_MSG));
                }
            }
        }
    }
    let old_provider = str_of(old_spec, "providerID");
    if !old_provider.is_empty() && old_provider != str_of(spec, "providerID") {
        causes.push(forbidden(
            &Path::new("spec").child("providerID"),
            "node updates may not change providerID except from \"\" to valid",
        ));
    }
    causes.extend(validate_taints(
        list(spec, "taints"),
        &metadata_path().child("taints"),
    ));
    if str_of(spec, "externalID") != str_of(old_spec, "externalID") {
        causes.push(forbidden(
            &Path::new("spec").child("externalID"),
            "may not be updated",
        ));
    }
    causes
}

// ---------------------------------------------------------------------------------------
// Services

fn svc_type(svc: &Value) -> &str {
    get(svc, "spec").map_or("", |s| str_of(s, "type"))
}

fn externally_accessible(spec: &Value) -> bool {
    let t = str_of(spec, "type");
    t == "LoadBalancer"
        || t == "NodePort"
        || (t == "ClusterIP" && !list(spec, "externalIPs").is_empty())
}

fn needs_health_check(spec: &Value) -> bool {
    str_of(spec, "type") == "LoadBalancer" && str_of(spec, "externalTrafficPolicy") == "Local"
}

fn is_headless(spec: &Value) -> bool {
    let ips = strings(spec, "clusterIPs");
    ips.len() == 1 && ips.first() == Some(&"None")
}

/// `SetDefaults_Service`.
pub(crate) fn default_service(svc: &mut Value) {
    let Some(spec) = ensure_obj(svc, "spec") else {
        return;
    };
    default_str(spec, "sessionAffinity", "None");
    match str_of(spec, "sessionAffinity") {
        "None" => {
            remove(spec, "sessionAffinityConfig");
        }
        "ClientIP" => {
            let has_timeout = get(spec, "sessionAffinityConfig")
                .and_then(|c| get(c, "clientIP"))
                .and_then(|c| get(c, "timeoutSeconds"))
                .is_some();
            if !has_timeout {
                set(
                    spec,
                    "sessionAffinityConfig",
                    json!({"clientIP": {"timeoutSeconds": 10800}}),
                );
            }
        }
        _ => {}
    }
    default_str(spec, "type", "ClusterIP");
    for port in items_mut(spec, "ports") {
        default_str(port, "protocol", "TCP");
        let unset = match get(port, "targetPort") {
            None => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(v) => v.as_i64() == Some(0),
        };
        if unset && let Some(p) = port.get("port").cloned() {
            set(port, "targetPort", p);
        }
    }
    if externally_accessible(spec) {
        default_str(spec, "externalTrafficPolicy", "Cluster");
    }
    if ["NodePort", "LoadBalancer", "ClusterIP"].contains(&str_of(spec, "type")) {
        default_value(spec, "internalTrafficPolicy", json!("Cluster"));
    }
    let load_balancer = str_of(spec, "type") == "LoadBalancer";
    if load_balancer {
        default_value(spec, "allocateLoadBalancerNodePorts", json!(true));
    }
    if let Some(status) = ensure_obj(svc, "status") {
        let lb = ensure_obj(status, "loadBalancer");
        if load_balancer && let Some(lb) = lb {
            for ingress in items_mut(lb, "ingress") {
                if !str_of(ingress, "ip").is_empty() {
                    default_value(ingress, "ipMode", json!("VIP"));
                }
            }
        }
    }
}

/// `NormalizeClusterIPs`: keeps `clusterIP` and `clusterIPs` in step for old clients.
fn normalize_cluster_ips(new: &mut Value, old: Option<&Value>) {
    let Some(spec) = obj_mut(new, "spec") else {
        return;
    };
    let ip = str_of(spec, "clusterIP").to_string();
    let ips: Vec<String> = strings(spec, "clusterIPs")
        .into_iter()
        .map(str::to_string)
        .collect();
    let Some(old_spec) = old.and_then(|o| get(o, "spec")) else {
        if !ip.is_empty() && ips.is_empty() {
            set(spec, "clusterIPs", json!([ip]));
        }
        return;
    };
    let old_ip = str_of(old_spec, "clusterIP");
    let old_ips = strings(old_spec, "clusterIPs");
    let same_ips = |ips: &[String]| {
        ips.len() == old_ips.len() && ips.iter().zip(&old_ips).all(|(a, b)| a == b)
    };
    let mut ips = ips;
    if !old_ips.is_empty() && ips.is_empty() && old_ip == ip {
        ips = old_ips.iter().map(|s| s.to_string()).collect();
        set(spec, "clusterIPs", json!(ips));
    }
    if old_ip != ip {
        if !old_ip.is_empty() && ip.is_empty() {
            if same_ips(&ips) {
                remove(spec, "clusterIPs");
            }
        } else if same_ips(&ips) {
            set(spec, "clusterIPs", json!([ip]));
        }
    }
}

/// `patchAllocatedValues`: values a client omitted on update are kept from the old object.
fn patch_allocated_values(new: &mut Value, old: &Value) {
    let empty = Value::Null;
    let old_spec = get(old, "spec").unwrap_or(&empty);
    let Some(spec) = obj_mut(new, "spec") else {
        return;
    };
    let needs_cluster_ip = |s: &Value| str_of(s, "type") != "ExternalName";
    let needs_node_port = |s: &Value| ["NodePort", "LoadBalancer"].contains(&str_of(s, "type"));
    if needs_cluster_ip(old_spec) && needs_cluster_ip(spec) {
        if str_of(spec, "clusterIP").is_empty()
            && let Some(ip) = get(old_spec, "clusterIP")
        {
            set(spec, "clusterIP", ip.clone());
        }
        if list(spec, "clusterIPs").is_empty() && !list(old_spec, "clusterIPs").is_empty() {
            set(
                spec,
                "clusterIPs",
                Value::Array(list(old_spec, "clusterIPs").to_vec()),
            );
        }
    }
    if needs_node_port(old_spec) && needs_node_port(spec) {
        let node_ports = |s: &Value| -> Vec<i64> {
            list(s, "ports")
                .iter()
                .filter_map(|p| int_of(p, "nodePort"))
                .filter(|n| *n != 0)
                .collect()
        };
        let new_ports = node_ports(spec);
        let used: Vec<i64> = node_ports(old_spec)
            .into_iter()
            .filter(|p| new_ports.contains(p))
            .collect();
        let by_name: Vec<(String, i64)> = list(old_spec, "ports")
            .iter()
            .map(|p| {
                (
                    str_of(p, "name").to_string(),
                    int_of(p, "nodePort").unwrap_or(0),
                )
            })
            .collect();
        for port in items_mut(spec, "ports") {
            if int_of(port, "nodePort").unwrap_or(0) == 0 {
                let name = str_of(port, "name");
                let old_value = by_name
                    .iter()
                    .rev()
                    .find(|(n, _)| n == name)
                    .map_or(0, |(_, v)| *v);
                if !used.contains(&old_value) && old_value != 0 {
                    set(port, "nodePort", json!(old_value));
                }
            }
        }
    }
    if needs_health_check(old_spec)
        && needs_health_check(spec)
        && int_of(spec, "healthCheckNodePort").unwrap_or(0) == 0
        && let Some(port) = get(old_spec, "healthCheckNodePort")
    {
        set(spec, "healthCheckNodePort", port.clone());
    }
}

/// `dropTypeDependentFields`: fields that no longer apply after a type change are wiped
/// when the client left them as they were.
fn drop_type_dependent_fields(new: &mut Value, old: &Value) {
    let empty = Value::Null;
    let old_spec = get(old, "spec").unwrap_or(&empty).clone();
    let Some(spec) = obj_mut(new, "spec") else {
        return;
    };
    let same = |spec: &Value, field: &str| semantic_eq(get(spec, field), get(&old_spec, field));
    let old_type = str_of(&old_spec, "type");
    let new_type = str_of(spec, "type").to_string();
    if old_type != "ExternalName" && new_type == "ExternalName" {
        if same(spec, "clusterIP") && same(spec, "clusterIPs") {
            remove(spec, "clusterIP");
            remove(spec, "clusterIPs");
        }
        if same(spec, "ipFamilies") {
            remove(spec, "ipFamilies");
        }
        if same(spec, "ipFamilyPolicy") {
            remove(spec, "ipFamilyPolicy");
        }
    }
    let node_port_type = |t: &str| t == "NodePort" || t == "LoadBalancer";
    let node_ports = |s: &Value| -> Vec<i64> {
        list(s, "ports")
            .iter()
            .map(|p| int_of(p, "nodePort").unwrap_or(0))
            .collect()
    };
    if node_port_type(old_type)
        && !node_port_type(&new_type)
        && node_ports(spec) == node_ports(&old_spec)
    {
        for port in items_mut(spec, "ports") {
            remove(port, "nodePort");
        }
    }
    if needs_health_check(&old_spec)
        && !needs_health_check(spec)
        && int_of(spec, "healthCheckNodePort") == int_of(&old_spec, "healthCheckNodePort")
    {
        remove(spec, "healthCheckNodePort");
    }
    if old_type == "LoadBalancer" && new_type != "LoadBalancer" {
        let new_alloc = spec
            .get("allocateLoadBalancerNodePorts")
            .and_then(Value::as_bool);
        let old_alloc = old_spec
            .get("allocateLoadBalancerNodePorts")
            .and_then(Value::as_bool);
        if new_alloc.is_some() && new_alloc == old_alloc {
            remove(spec, "allocateLoadBalancerNodePorts");
        }
        if same(spec, "loadBalancerClass") {
            remove(spec, "loadBalancerClass");
        }
    }
    if externally_accessible(&old_spec)
        && !externally_accessible(spec)
        && same(spec, "externalTrafficPolicy")
    {
        remove(spec, "externalTrafficPolicy");
    }
    if new_type != "LoadBalancer"
        && let Some(status) = obj_mut(new, "status")
    {
        set(status, "loadBalancer", json!({}));
    }
}

/// The IP family defaulting of the service REST storage (`initIPFamilyFields`) for a
/// single-stack IPv4 cluster: policy and families are inferred, never the addresses.
fn init_ip_families(new: &mut Value, old: Option<&Value>) {
    let old_policy = old
        .and_then(|o| get(o, "spec"))
        .and_then(|s| get(s, "ipFamilyPolicy"))
        .cloned();
    let Some(spec) = obj_mut(new, "spec") else {
        return;
    };
    if str_of(spec, "type") == "ExternalName" {
        return;
    }
    let headless_selectorless =
        str_of(spec, "clusterIP") == "None" && string_map(spec, "selector").is_empty();
    if get(spec, "ipFamilyPolicy").is_none() {
        let policy = match old_policy {
            Some(p) => p,
            None if headless_selectorless => json!("RequireDualStack"),
            None => json!("SingleStack"),
        };
        set(spec, "ipFamilyPolicy", policy);
    }
    let mut families: Vec<String> = strings(spec, "ipFamilies")
        .into_iter()
        .map(str::to_string)
        .collect();
    for (i, ip) in strings(spec, "clusterIPs").into_iter().enumerate() {
        if ip == "None" {
            break;
        }
        if i >= families.len()
            && let Some(v6) = ip_family(ip)
        {
            families.push(if v6 { "IPv6" } else { "IPv4" }.to_string());
        }
    }
    if families.is_empty() {
        families.push("IPv4".to_string());
    }
    if headless_selectorless
        && families.len() < 2
        && str_of(spec, "ipFamilyPolicy") != "SingleStack"
    {
        let other = if families.first().map(String::as_str) == Some("IPv4") {
            "IPv6"
        } else {
            "IPv4"
        };
        families.push(other.to_string());
    }
    set(spec, "ipFamilies", json!(families));
}

/// `svcStrategy.PrepareForCreate` with the REST storage's IP family defaulting.
pub(crate) fn prepare_create_service(svc: &mut Value) {
    set(svc, "status", json!({"loadBalancer": {}}));
    normalize_cluster_ips(svc, None);
    init_ip_families(svc, None);
}

/// `svcStrategy.PrepareForUpdate` with the REST storage's IP family defaulting.
pub(crate) fn prepare_update_service(new: &mut Value, old: &Value) {
    keep_status(new, old);
    patch_allocated_values(new, old);
    normalize_cluster_ips(new, Some(old));
    drop_type_dependent_fields(new, old);
    init_ip_families(new, Some(old));
}

fn validate_service_port(
    port: &Value,
    require_name: bool,
    seen: &mut Vec<String>,
    path: &Path,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    let name = str_of(port, "name");
    if require_name && name.is_empty() {
        causes.push(required(&path.child("name"), ""));
    } else if !name.is_empty() {
        causes.extend(validate_dns1123_label(name, &path.child("name")));
        if seen.iter().any(|s| s == name) {
            causes.push(duplicate(&path.child("name"), name));
        } else {
            seen.push(name.to_string());
        }
    }
    let number = int_of(port, "port").unwrap_or(0);
    for msg in names::port_num(number) {
        causes.push(invalid(&path.child("port"), number, &msg));
    }
    let protocol = str_of(port, "protocol");
    if protocol.is_empty() {
        causes.push(required(&path.child("protocol"), ""));
    } else if !PROTOCOLS.contains(&protocol) {
        causes.push(not_supported(&path.child("protocol"), protocol, PROTOCOLS));
    }
    causes.extend(validate_port_num_or_name(
        get(port, "targetPort"),
        &path.child("targetPort"),
    ));
    if let Some(app_protocol) = opt_str(port, "appProtocol") {
        causes.extend(validate_qualified_name(
            app_protocol,
            &path.child("appProtocol"),
        ));
    }
    causes
}

fn validate_cluster_ips(spec: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    if str_of(spec, "type") == "ExternalName" {
        return causes;
    }
    let ips_path = path.child("clusterIPs");
    let ip = str_of(spec, "clusterIP");
    let ips = strings(spec, "clusterIPs");
    let ips_value = || Value::from(ips.clone());
    if !ip.is_empty() {
        if ips.is_empty() {
            causes.push(required(&ips_path, ""));
        } else if ips.first() != Some(&ip) {
            causes.push(invalid(
                &ips_path,
                ips_value(),
                "first value must match `clusterIP`",
            ));
        }
    } else if !ips.is_empty() {
        causes.push(invalid(
            &ips_path,
            ips_value(),
            "must be empty when `clusterIP` is not specified",
        ));
    }
    let families = strings(spec, "ipFamilies");
    let mut seen = Vec::new();
    for (i, family) in families.iter().enumerate() {
        if !["IPv4", "IPv6"].contains(family) {
            causes.push(not_supported(
                &path.child("ipFamilies").index(i),
                *family,
                &["IPv4", "IPv6"],
            ));
        }
        if seen.contains(family) {
            causes.push(duplicate(&path.child("ipFamilies").index(i), *family));
        }
        seen.push(*family);
    }
    if let Some(policy) = opt_str(spec, "ipFamilyPolicy") {
        const POLICIES: &[&str] = &["PreferDualStack", "RequireDualStack", "SingleStack"];
        if !POLICIES.contains(&policy) {
            causes.push(not_supported(
                &path.child("ipFamilyPolicy"),
                policy,
                POLICIES,
            ));
        }
    }
    let mut bad = false;
    for (i, cluster_ip) in ips.iter().enumerate() {
        if i == 0 && *cluster_ip == "None" {
            if ips.len() > 1 {
                bad = true;
                causes.push(invalid(
                    &ips_path,
                    ips_value(),
                    "'None' must be the first and only value",
                ));
            }
            continue;
        }
        if names::parse_ip_sloppy(cluster_ip).is_none() {
            bad = true;
            causes.push(invalid(&ips_path.index(i), *cluster_ip, INVALID_IP));
        }
    }
    if ips.len() > 2 {
        causes.push(invalid(
            &ips_path,
            ips_value(),
            "may only hold up to 2 values",
        ));
    }
    if bad {
        return causes;
    }
    if ips.len() > 1 {
        let v6 = ips.iter().filter(|ip| names::is_ipv6(ip)).count();
        if v6 == 0 || v6 == ips.len() {
            causes.push(invalid(
                &ips_path,
                ips_value(),
                "may specify no more than one IP for each IP family",
            ));
        }
    }
    if !is_headless(spec) {
        for (i, (ip, family)) in ips.iter().zip(&families).enumerate() {
            let v6 = names::is_ipv6(ip);
            if *family == "IPv4" && v6 {
                causes.push(invalid(
                    &ips_path.index(i),
                    *ip,
                    &format!("expected an IPv4 value as indicated by `ipFamilies[{i}]`"),
                ));
            }
            if *family == "IPv6" && !v6 {
                causes.push(invalid(
                    &ips_path.index(i),
                    *ip,
                    &format!("expected an IPv6 value as indicated by `ipFamilies[{i}]`"),
                ));
            }
        }
    }
    causes
}

/// `ValidateService`.
pub(crate) fn validate_service(svc: &Value) -> Vec<Cause> {
    let meta_path = metadata_path();
    let mut causes = validate_object_meta(svc, true, names::name_is_dns1035_label, &meta_path);
    let hints = meta::annotation(svc, "service.kubernetes.io/topology-aware-hints");
    let mode = meta::annotation(svc, "service.kubernetes.io/topology-mode");
    if let (Some(hints), Some(mode)) = (hints, mode)
        && hints != mode
    {
        causes.push(invalid(
            &meta_path
                .child("annotations")
                .key("service.kubernetes.io/topology-mode"),
            mode,
            "must match annotations[service.kubernetes.io/topology-aware-hints] when both are specified",
        ));
    }
    let empty = Value::Null;
    let spec = get(svc, "spec").unwrap_or(&empty);
    let path = Path::new("spec");
    let kind = str_of(spec, "type");
    let ports = list(spec, "ports");
    let headless = is_headless(spec);
    if ports.is_empty() && !headless && kind != "ExternalName" {
        causes.push(required(&path.child("ports"), ""));
    }
    match kind {
        "LoadBalancer" | "NodePort" if headless => causes.push(invalid(
            &path.child("clusterIPs").index(0),
            "None",
            &format!("may not be set to 'None' for {kind} services"),
        )),
        "ExternalName" => {
            for field in ["clusterIPs", "ipFamilies"] {
                if !list(spec, field).is_empty() {
                    causes.push(forbidden(
                        &path.child(field),
                        "may not be set for ExternalName services",
                    ));
                }
            }
            if get(spec, "ipFamilyPolicy").is_some() {
                causes.push(forbidden(
                    &path.child("ipFamilyPolicy"),
                    "may not be set for ExternalName services",
                ));
            }
            let external = str_of(spec, "externalName");
            let cname = external.strip_suffix('.').unwrap_or(external);
            if cname.is_empty() {
                causes.push(required(&path.child("externalName"), ""));
            } else {
                causes.extend(validate_dns1123_subdomain(
                    cname,
                    &path.child("externalName"),
                ));
            }
        }
        _ => {}
    }
    let mut port_names = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        causes.extend(validate_service_port(
            port,
            ports.len() > 1,
            &mut port_names,
            &path.child("ports").index(i),
        ));
    }
    if get(spec, "selector").is_some() {
        causes.extend(validate_labels(
            &string_map(spec, "selector"),
            &path.child("selector"),
        ));
    }
    let affinity = str_of(spec, "sessionAffinity");
    let affinity_config = path.child("sessionAffinityConfig");
    match affinity {
        "" => causes.push(required(&path.child("sessionAffinity"), "")),
        "ClientIP" => {
            const DETAIL: &str = "when session affinity type is ClientIP";
            let client = get(spec, "sessionAffinityConfig").map(|c| get(c, "clientIP"));
            match client {
                None => causes.push(required(&affinity_config, DETAIL)),
                Some(None) => causes.push(required(&affinity_config.child("clientIP"), DETAIL)),
                Some(Some(client)) => match int_of(client, "timeoutSeconds") {
                    None => causes.push(required(
                        &affinity_config.child("clientIP").child("timeoutSeconds"),
                        DETAIL,
                    )),
                    Some(t) if t <= 0 || t > 86400 => causes.push(invalid(
                        &affinity_config.child("clientIP").child("timeoutSeconds"),
                        t,
                        "must be greater than 0 and less than 86400",
                    )),
                    Some(_) => {}
                },
            }
        }
        "None" => {
            if get(spec, "sessionAffinityConfig").is_some() {
                causes.push(forbidden(
                    &affinity_config,
                    "must not be set when session affinity is None",
                ));
            }
        }
        other => causes.push(not_supported(
            &path.child("sessionAffinity"),
            other,
            &["ClientIP", "None"],
        )),
    }
    causes.extend(validate_cluster_ips(spec, &path));
    for (i, ip) in strings(spec, "externalIPs").into_iter().enumerate() {
        let p = path.child("externalIPs").index(i);
        if names::parse_ip_sloppy(ip).is_none() {
            causes.push(invalid(&p, ip, INVALID_IP));
        } else {
            for msg in names::special_ip_errors(ip) {
                causes.push(invalid(&p, ip, &msg));
            }
        }
    }
    const TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
    if kind.is_empty() {
        causes.push(required(&path.child("type"), ""));
    } else if !TYPES.contains(&kind) {
        causes.push(not_supported(&path.child("type"), kind, TYPES));
    }
    if kind == "ClusterIP" {
        for (i, port) in ports.iter().enumerate() {
            if int_of(port, "nodePort").unwrap_or(0) != 0 {
                causes.push(forbidden(
                    &path.child("ports").index(i).child("nodePort"),
                    "may not be used when `type` is 'ClusterIP'",
                ));
            }
        }
    }
    let mut node_ports: Vec<(&str, i64)> = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let node_port = int_of(port, "nodePort").unwrap_or(0);
        if node_port == 0 {
            continue;
        }
        let key = (str_of(port, "protocol"), node_port);
        if node_ports.contains(&key) {
            causes.push(duplicate(
                &path.child("ports").index(i).child("nodePort"),
                node_port,
            ));
        }
        node_ports.push(key);
    }
    let mut port_keys: Vec<(&str, i64)> = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let key = (str_of(port, "protocol"), int_of(port, "port").unwrap_or(0));
        if port_keys.contains(&key) {
            causes.push(duplicate(
                &path.child("ports").index(i),
                json!({"port": key.1, "protocol": key.0}),
            ));
        }
        port_keys.push(key);
    }
    let ranges = strings(spec, "loadBalancerSourceRanges");
    const LB_ONLY: &str = "may only be used when `type` is 'LoadBalancer'";
    if !ranges.is_empty() {
        let p = path.child("LoadBalancerSourceRanges");
        if kind != "LoadBalancer" {
            causes.push(forbidden(&p, LB_ONLY));
        }
        for (i, range) in ranges.iter().enumerate() {
            let range = range.trim();
            if names::parse_cidr_sloppy(range).is_none() {
                causes.push(invalid(&p.index(i), range, INVALID_CIDR));
            }
        }
    } else if let Some(annotation) = meta::annotation(
        svc,
        "service.beta.kubernetes.io/load-balancer-source-ranges",
    ) {
        let p = meta_path
            .child("annotations")
            .key("service.beta.kubernetes.io/load-balancer-source-ranges");
        if kind != "LoadBalancer" {
            causes.push(forbidden(&p, LB_ONLY));
        }
        let annotation = annotation.trim();
        if !annotation.is_empty() {
            for range in annotation.split(',') {
                let range = range.trim();
                if names::parse_cidr_sloppy(range).is_none() {
                    causes.push(invalid(&p, range, INVALID_CIDR));
                }
            }
        }
    }
    let allocate = get(spec, "allocateLoadBalancerNodePorts");
    if allocate.is_some() && kind != "LoadBalancer" {
        causes.push(forbidden(
            &path.child("allocateLoadBalancerNodePorts"),
            LB_ONLY,
        ));
    }
    if kind == "LoadBalancer" && allocate.is_none() {
        // Upstream reports this one without the `spec.` prefix.
        causes.push(required(&Path::new("allocateLoadBalancerNodePorts"), ""));
    }
    let class = opt_str(spec, "loadBalancerClass");
    if kind == "LoadBalancer" {
        if let Some(class) = class {
            causes.extend(validate_qualified_name(
                class,
                &path.child("loadBalancerClass"),
            ));
        }
    } else if class.is_some() {
        causes.push(forbidden(&path.child("loadBalancerClass"), LB_ONLY));
    }
    let etp = str_of(spec, "externalTrafficPolicy");
    if !externally_accessible(spec) {
        if !etp.is_empty() {
            causes.push(invalid(
                &path.child("externalTrafficPolicy"),
                etp,
                "may only be set for externally-accessible services",
            ));
        }
    } else if etp.is_empty() {
        causes.push(required(&path.child("externalTrafficPolicy"), ""));
    } else if !["Cluster", "Local"].contains(&etp) {
        causes.push(not_supported(
            &path.child("externalTrafficPolicy"),
            etp,
            &["Cluster", "Local"],
        ));
    }
    let health_port = int_of(spec, "healthCheckNodePort").unwrap_or(0);
    if !needs_health_check(spec) {
        if health_port != 0 {
            causes.push(invalid(
                &path.child("healthCheckNodePort"),
                health_port,
                "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
            ));
        }
    } else if health_port != 0 {
        // A zero port is left to the allocator, which fills it in after validation here.
        for msg in names::port_num(health_port) {
            causes.push(invalid(
                &path.child("healthCheckNodePort"),
                health_port,
                &msg,
            ));
        }
    }
    match opt_str(spec, "internalTrafficPolicy") {
        None if ["NodePort", "LoadBalancer", "ClusterIP"].contains(&kind) => {
            causes.push(required(&path.child("internalTrafficPolicy"), ""));
        }
        Some(policy) if !["Cluster", "Local"].contains(&policy) => {
            causes.push(not_supported(
                &path.child("internalTrafficPolicy"),
                policy,
                &["Cluster", "Local"],
            ));
        }
        _ => {}
    }
    if let Some(distribution) = opt_str(spec, "trafficDistribution")
        && distribution != "PreferClose"
    {
        causes.push(not_supported(
            &path.child("trafficDistribution"),
            distribution,
            &["PreferClose"],
        ));
    }
    causes
}

/// `ValidateServiceUpdate`.
pub(crate) fn validate_service_update(new: &Value, old: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta_update(new, old, &metadata_path());
    let empty = Value::Null;
    let spec = get(new, "spec").unwrap_or(&empty);
    let old_spec = get(old, "spec").unwrap_or(&empty);
    let ips_path = Path::new("spec").child("clusterIPs");
    let families_path = Path::new("spec").child("ipFamilies");
    let policy_path = Path::new("spec").child("ipFamilyPolicy");
    let external_name = svc_type(new) == "ExternalName" || svc_type(old) == "ExternalName";
    let single_stack = opt_str(spec, "ipFamilyPolicy") == Some("SingleStack");
    let policy_value = || get(spec, "ipFamilyPolicy").cloned().unwrap_or(Value::Null);
    if !external_name {
        let (new_ips, old_ips) = (strings(spec, "clusterIPs"), strings(old_spec, "clusterIPs"));
        let shown = Value::from(new_ips.clone());
        if !(is_headless(spec) && is_headless(old_spec)) {
            if old_ips.len() == new_ips.len() {
                for (i, (o, n)) in old_ips.iter().zip(&new_ips).enumerate() {
                    if o != n {
                        causes.push(invalid(
                            &ips_path.index(i),
                            shown.clone(),
                            "may not change once set",
                        ));
                    }
                }
            } else if old_ips.len() > new_ips.len() {
                if new_ips.is_empty() {
                    causes.push(invalid(
                        &ips_path.index(0),
                        shown.clone(),
                        "primary clusterIP can not be unset",
                    ));
                }
                if let (Some(o), Some(n)) = (old_ips.first(), new_ips.first())
                    && o != n
                {
                    causes.push(invalid(
                        &ips_path.index(0),
                        shown.clone(),
                        "may not change once set",
                    ));
                }
                if new_ips.len() == 1 && !single_stack {
                    causes.push(invalid(
                        &policy_path,
                        policy_value(),
                        "must be set to 'SingleStack' when releasing the secondary clusterIP",
                    ));
                }
            } else if let (Some(o), Some(n)) = (old_ips.first(), new_ips.first())
                && o != n
            {
                causes.push(invalid(
                    &ips_path.index(0),
                    shown.clone(),
                    "may not change once set",
                ));
            }
        }
        let (new_families, old_families) =
            (strings(spec, "ipFamilies"), strings(old_spec, "ipFamilies"));
        if is_headless(spec) == is_headless(old_spec) && !is_headless(spec) {
            let families_value = Value::from(new_families.clone());
            if old_families.len() == new_families.len() {
                for (o, n) in old_families.iter().zip(&new_families) {
                    if o != n {
                        causes.push(invalid(
                            &families_path.index(0),
                            families_value.clone(),
                            "may not change once set",
                        ));
                    }
                }
            } else if old_families.len() > new_families.len() {
                if new_ips.is_empty() {
                    causes.push(invalid(
                        &families_path.index(0),
                        families_value.clone(),
                        "primary ipFamily can not be unset",
                    ));
                }
                if let (Some(o), Some(n)) = (old_families.first(), new_families.first())
                    && o != n
                {
                    causes.push(invalid(
                        &families_path.index(0),
                        shown.clone(),
                        "may not change once set",
                    ));
                }
                if new_families.len() == 1 && !single_stack {
                    causes.push(invalid(
                        &policy_path,
                        policy_value(),
                        "must be set to 'SingleStack' when releasing the secondary ipFamily",
                    ));
                }
            } else if let (Some(o), Some(n)) = (old_families.first(), new_families.first())
                && o != n
            {
                causes.push(invalid(
                    &families_path.index(0),
                    shown.clone(),
                    "may not change once set",
                ));
            }
        }
    }
    if svc_type(new) == "LoadBalancer"
        && svc_type(old) == "LoadBalancer"
        && !semantic_eq(
            get(spec, "loadBalancerClass"),
            get(old_spec, "loadBalancerClass"),
        )
    {
        causes.push(invalid(
            &Path::new("spec").child("loadBalancerClass"),
            get(spec, "loadBalancerClass")
                .cloned()
                .unwrap_or(Value::Null),
            "may not change once set",
        ));
    }
    if needs_health_check(spec)
        && needs_health_check(old_spec)
        && int_of(spec, "healthCheckNodePort") != int_of(old_spec, "healthCheckNodePort")
    {
        causes.push(forbidden(
            &Path::new("spec").child("healthCheckNodePort"),
            "field is immutable",
        ));
    }
    causes.extend(validate_service(new));
    causes
}

// ---------------------------------------------------------------------------------------
// Endpoints

/// `SetDefaults_Endpoints`.
pub(crate) fn default_endpoints(ep: &mut Value) {
    for subset in items_mut(ep, "subsets") {
        for port in items_mut(subset, "ports") {
            default_str(port, "protocol", "TCP");
        }
    }
}

fn validate_endpoint_address(address: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let ip = str_of(address, "ip");
    if names::parse_ip_sloppy(ip).is_none() {
        causes.push(invalid(&path.child("ip"), ip, INVALID_IP));
    }
    let hostname = str_of(address, "hostname");
    if !hostname.is_empty() {
        causes.extend(validate_dns1123_label(hostname, &path.child("hostname")));
    }
    if let Some(node) = opt_str(address, "nodeName") {
        for msg in names::name_is_dns_subdomain(node, false) {
            causes.push(invalid(&path.child("nodeName"), node, &msg));
        }
    }
    for msg in names::special_ip_errors(ip) {
        causes.push(invalid(&path.child("ip"), ip, &msg));
    }
    causes
}

/// `ValidateEndpoints`.
pub(crate) fn validate_endpoints(ep: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta(ep, true, names::name_is_dns_subdomain, &metadata_path());
    for (i, subset) in list(ep, "subsets").iter().enumerate() {
        let p = Path::new("subsets").index(i);
        let addresses = list(subset, "addresses");
        let not_ready = list(subset, "notReadyAddresses");
        if addresses.is_empty() && not_ready.is_empty() {
            causes.push(required(
                &p,
                "must specify `addresses` or `notReadyAddresses`",
            ));
        }
        for (field, entries) in [("addresses", addresses), ("notReadyAddresses", not_ready)] {
            for (j, address) in entries.iter().enumerate() {
                causes.extend(validate_endpoint_address(address, &p.child(field).index(j)));
            }
        }
        let ports = list(subset, "ports");
        for (j, port) in ports.iter().enumerate() {
            let pp = p.child("ports").index(j);
            let name = str_of(port, "name");
            if ports.len() > 1 && name.is_empty() {
                causes.push(required(&pp.child("name"), ""));
            } else if !name.is_empty() {
                causes.extend(validate_dns1123_label(name, &pp.child("name")));
            }
            let number = int_of(port, "port").unwrap_or(0);
            for msg in names::port_num(number) {
                causes.push(invalid(&pp.child("port"), number, &msg));
            }
            let protocol = str_of(port, "protocol");
            if protocol.is_empty() {
                causes.push(required(&pp.child("protocol"), ""));
            } else if !PROTOCOLS.contains(&protocol) {
                causes.push(not_supported(&pp.child("protocol"), protocol, PROTOCOLS));
            }
            if let Some(app_protocol) = opt_str(port, "appProtocol") {
                causes.extend(validate_qualified_name(
                    app_protocol,
                    &pp.child("appProtocol"),
                ));
            }
        }
    }
    causes
}

// ---------------------------------------------------------------------------------------
// ConfigMaps and Secrets

fn decoded_len(value: &Value) -> usize {
    value
        .as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .map_or(0, |b| b.len())
}

/// `ValidateConfigMap`.
pub(crate) fn validate_config_map(cm: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta(cm, true, names::name_is_dns_subdomain, &metadata_path());
    let binary = obj(cm, "binaryData");
    let mut total = 0usize;
    for (key, value) in obj(cm, "data").into_iter().flatten() {
        let p = Path::new("data").key(key);
        for msg in names::config_map_key(key) {
            causes.push(invalid(&p, key.as_str(), &msg));
        }
        if binary.is_some_and(|b| b.contains_key(key)) {
            causes.push(invalid(
                &p,
                key.as_str(),
                "duplicate of key present in binaryData",
            ));
        }
        total = total.saturating_add(value.as_str().map_or(0, str::len));
    }
    for (key, value) in binary.into_iter().flatten() {
        for msg in names::config_map_key(key) {
            causes.push(invalid(
                &Path::new("binaryData").key(key),
                key.as_str(),
                &msg,
            ));
        }
        total = total.saturating_add(decoded_len(value));
    }
    if total > MAX_SECRET_SIZE {
        causes.push(too_long(&Path::default(), MAX_SECRET_SIZE));
    }
    causes
}

fn immutable_data_rules(new: &Value, old: &Value, fields: &[&str]) -> Vec<Cause> {
    let mut causes = Vec::new();
    if old.get("immutable").and_then(Value::as_bool) != Some(true) {
        return causes;
    }
    const DETAIL: &str = "field is immutable when `immutable` is set";
    if new.get("immutable").and_then(Value::as_bool) != Some(true) {
        causes.push(forbidden(&Path::new("immutable"), DETAIL));
    }
    for field in fields {
        let (n, o) = (obj(new, field), obj(old, field));
        let same = match (n, o) {
            (None, None) => true,
            (Some(n), Some(o)) => n == o,
            // reflect.DeepEqual tells a nil map from an empty one.
            _ => false,
        };
        if !same {
            causes.push(forbidden(&Path::new(field), DETAIL));
        }
    }
    causes
}

/// `ValidateConfigMapUpdate`.
pub(crate) fn validate_config_map_update(new: &Value, old: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta_update(new, old, &metadata_path());
    causes.extend(immutable_data_rules(new, old, &["data", "binaryData"]));
    causes.extend(validate_config_map(new));
    causes
}

/// The v1 conversion of secrets: `stringData` overwrites `data` and is not stored; and
/// `SetDefaults_Secret`.
pub(crate) fn default_secret(secret: &mut Value) {
    if let Some(string_data) = remove(secret, "stringData")
        && let Some(entries) = string_data.as_object().filter(|m| !m.is_empty())
        && let Some(data) = ensure_obj(secret, "data").and_then(Value::as_object_mut)
    {
        for (k, v) in entries {
            let bytes = v.as_str().unwrap_or("").as_bytes();
            data.insert(
                k.clone(),
                json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
        }
    }
    default_str(secret, "type", "Opaque");
}

/// `ValidateSecret`.
pub(crate) fn validate_secret(secret: &Value) -> Vec<Cause> {
    let mut causes =
        validate_object_meta(secret, true, names::name_is_dns_subdomain, &metadata_path());
    let data_path = Path::new("data");
    let data: Map<String, Value> = obj(secret, "data").cloned().unwrap_or_default();
    let mut total = 0usize;
    for (key, value) in &data {
        for msg in names::config_map_key(key) {
            causes.push(invalid(&data_path.key(key), key.as_str(), &msg));
        }
        total = total.saturating_add(decoded_len(value));
    }
    if total > MAX_SECRET_SIZE {
        causes.push(too_long(&data_path, MAX_SECRET_SIZE));
    }
    let decoded = |key: &str| -> Option<Vec<u8>> {
        data.get(key)
            .and_then(Value::as_str)
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
    };
    let json_check = |key: &str, causes: &mut Vec<Cause>| match decoded(key) {
        None if !data.contains_key(key) => causes.push(required(&data_path.key(key), "")),
        bytes => {
            let parsed = serde_json::from_slice::<Map<String, Value>>(&bytes.unwrap_or_default());
            if let Err(e) = parsed {
                causes.push(invalid(
                    &data_path.key(key),
                    "<secret contents redacted>",
                    &e.to_string(),
                ));
            }
        }
    };
    match str_of(secret, "type") {
        "kubernetes.io/service-account-token" => {
            let name = meta::annotation(secret, "kubernetes.io/service-account.name");
            if name.is_none_or(str::is_empty) {
                causes.push(required(
                    &metadata_path()
                        .child("annotations")
                        .key("kubernetes.io/service-account.name"),
                    "",
                ));
            }
        }
        "kubernetes.io/dockercfg" => json_check(".dockercfg", &mut causes),
        "kubernetes.io/dockerconfigjson" => json_check(".dockerconfigjson", &mut causes),
        "kubernetes.io/basic-auth"
            if !data.contains_key("username") && !data.contains_key("password") =>
        {
            causes.push(required(&data_path.key("username"), ""));
            causes.push(required(&data_path.key("password"), ""));
        }
        "kubernetes.io/ssh-auth" if decoded("ssh-privatekey").is_none_or(|b| b.is_empty()) => {
            causes.push(required(&data_path.key("ssh-privatekey"), ""));
        }
        "kubernetes.io/tls" => {
            for key in ["tls.crt", "tls.key"] {
                if !data.contains_key(key) {
                    causes.push(required(&data_path.key(key), ""));
                }
            }
        }
        _ => {}
    }
    causes
}

/// `ValidateSecretUpdate`.
pub(crate) fn validate_secret_update(new: &Value, old: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta_update(new, old, &metadata_path());
    causes.extend(immutable(
        Some(&json!(str_of(new, "type"))),
        Some(&json!(str_of(old, "type"))),
        &Path::new("type"),
    ));
    causes.extend(immutable_data_rules(new, old, &["data"]));
    causes.extend(validate_secret(new));
    causes
}

// ---------------------------------------------------------------------------------------
// ServiceAccounts

/// `cleanSecretReferences`: references to secrets keep only their names.
pub(crate) fn prepare_service_account(sa: &mut Value) {
    for secret in items_mut(sa, "secrets") {
        let name = secret.get("name").cloned();
        let mut cleaned = Map::new();
        if let Some(name) = name {
            cleaned.insert("name".to_string(), name);
        }
        *secret = Value::Object(cleaned);
    }
}

// ---------------------------------------------------------------------------------------
// Events

/// The struct fields of an event upstream always serializes.
pub(crate) fn default_event(event: &mut Value) {
    default_value(event, "involvedObject", json!({}));
    default_value(event, "source", json!({}));
}

/// `legacyValidateEvent`, the whole validation of core/v1 events.
pub(crate) fn validate_event(event: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let namespace = get(event, "metadata").map_or("", |m| str_of(m, "namespace"));
    let empty = Value::Null;
    let involved = get(event, "involvedObject").unwrap_or(&empty);
    let involved_ns = str_of(involved, "namespace");
    let ns_path = Path::new("involvedObject").child("namespace");
    const MISMATCH: &str = "does not match event.namespace";
    if get(event, "eventTime").is_none() {
        if involved_ns.is_empty() {
            if !namespace.is_empty() && namespace != "default" {
                causes.push(invalid(&ns_path, involved_ns, MISMATCH));
            }
        } else if namespace != involved_ns {
            causes.push(invalid(&ns_path, involved_ns, MISMATCH));
        }
    } else {
        if involved_ns.is_empty() && namespace != "default" && namespace != "kube-system" {
            causes.push(invalid(&ns_path, involved_ns, MISMATCH));
        }
        let controller = str_of(event, "reportingComponent");
        let controller_path = Path::new("reportingComponent");
        if controller.is_empty() {
            causes.push(required(&controller_path, ""));
        }
        causes.extend(validate_qualified_name(controller, &controller_path));
        for (field, limit) in [("reportingInstance", 128), ("action", 128), ("reason", 128)] {
            let value = str_of(event, field);
            if value.is_empty() {
                causes.push(required(&Path::new(field), ""));
            }
            if value.len() > limit {
                causes.push(invalid(
                    &Path::new(field),
                    "",
                    &format!("can have at most {limit} characters"),
                ));
            }
        }
        if str_of(event, "message").len() > 1024 {
            causes.push(invalid(
                &Path::new("message"),
                "",
                "can have at most 1024 characters",
            ));
        }
    }
    for msg in names::dns1123_subdomain(namespace) {
        causes.push(invalid(&Path::new("namespace"), namespace, &msg));
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(causes: &[Cause]) -> Vec<(&str, &str)> {
        causes
            .iter()
            .map(|c| (c.field.as_str(), c.reason.as_str()))
            .collect()
    }

    #[test]
    fn namespace_lifecycle() {
        let mut ns = json!({"metadata": {"name": "team-a"}});
        default_namespace(&mut ns);
        prepare_create_namespace(&mut ns);
        assert_eq!(ns["metadata"]["labels"][METADATA_NAME_LABEL], "team-a");
        assert_eq!(ns["spec"]["finalizers"], json!(["kubernetes"]));
        assert_eq!(ns["status"], json!({"phase": "Active"}));
        assert!(validate_namespace(&ns).is_empty());
        let mut changed = ns.clone();
        changed["spec"]["finalizers"] = json!([]);
        changed["status"]["phase"] = json!("Terminating");
        prepare_update_namespace(&mut changed, &ns);
        assert_eq!(changed["spec"]["finalizers"], json!(["kubernetes"]));
        assert_eq!(changed["status"]["phase"], "Active");
        let bad = json!({"metadata": {"name": "Team.A"}, "spec": {"finalizers": ["bogus"]}});
        let causes = validate_namespace(&bad);
        assert!(fields(&causes).contains(&("metadata.name", "FieldValueInvalid")));
        assert!(fields(&causes).contains(&("spec.finalizers", "FieldValueInvalid")));
    }

    #[test]
    fn node_defaults_and_validation() {
        let mut node = json!({"metadata": {"name": "n1"}, "spec": {"podCIDR": "10.244.0.0/24",
            "taints": [{"key": "k", "effect": "NoSchedule"}, {"key": "k", "effect": "NoSchedule"}, {"key": "x", "effect": "Bad"}]},
            "status": {"capacity": {"cpu": "-1", "pods": "110"}}});
        default_node(&mut node);
        assert_eq!(node["spec"]["podCIDRs"], json!(["10.244.0.0/24"]));
        assert_eq!(node["status"]["allocatable"], node["status"]["capacity"]);
        assert_eq!(
            node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"],
            0
        );
        let causes = validate_node(&node);
        let f = fields(&causes);
        assert!(f.contains(&("metadata.taints[1]", "FieldValueDuplicate")));
        assert!(f.contains(&("metadata.taints[2].effect", "FieldValueNotSupported")));
        assert!(f.contains(&("status.capacity.cpu", "FieldValueInvalid")));
        let mut new = node.clone();
        new["spec"]["podCIDRs"] = json!(["10.245.0.0/24"]);
        let causes = validate_node_update(&new, &node);
        assert!(fields(&causes).contains(&("spec.podCIDRs", "FieldValueForbidden")));
    }

    #[test]
    fn service_defaults_and_prepare() {
        let mut svc = json!({"metadata": {"name": "web", "namespace": "d"}, "spec": {
            "selector": {"app": "web"}, "ports": [{"port": 80}]}});
        default_service(&mut svc);
        prepare_create_service(&mut svc);
        assert_eq!(
            svc["spec"],
            json!({"selector": {"app": "web"}, "ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}],
                "sessionAffinity": "None", "type": "ClusterIP", "internalTrafficPolicy": "Cluster",
                "ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv4"]})
        );
        assert_eq!(svc["status"], json!({"loadBalancer": {}}));
        assert!(
            validate_service(&svc).is_empty(),
            "{:?}",
            validate_service(&svc)
        );
        let mut np = json!({"metadata": {"name": "np", "namespace": "d"}, "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}});
        default_service(&mut np);
        assert_eq!(np["spec"]["externalTrafficPolicy"], "Cluster");
    }

    #[test]
    fn service_validation() {
        let mut svc = json!({"metadata": {"name": "1web", "namespace": "d"}, "spec": {
            "type": "ClusterIP", "ports": [{"port": 0, "nodePort": 30000}, {"port": 0}],
            "sessionAffinity": "Sticky", "clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.2"]}});
        default_service(&mut svc);
        let causes = validate_service(&svc);
        let f = fields(&causes);
        for expected in [
            ("metadata.name", "FieldValueInvalid"),
            ("spec.ports[0].name", "FieldValueRequired"),
            ("spec.ports[0].port", "FieldValueInvalid"),
            ("spec.sessionAffinity", "FieldValueNotSupported"),
            ("spec.clusterIPs", "FieldValueInvalid"),
            ("spec.ports[0].nodePort", "FieldValueForbidden"),
            ("spec.ports[1]", "FieldValueDuplicate"),
        ] {
            assert!(f.contains(&expected), "{expected:?} in {f:?}");
        }
    }

    #[test]
    fn service_cluster_ip_is_immutable_but_kept_when_omitted() {
        let mut old = json!({"metadata": {"name": "web", "namespace": "d"}, "spec": {"ports": [{"port": 80}], "clusterIP": "10.0.0.5"}});
        default_service(&mut old);
        prepare_create_service(&mut old);
        let mut new = json!({"metadata": {"name": "web", "namespace": "d"}, "spec": {"ports": [{"port": 80}]}});
        default_service(&mut new);
        prepare_update_service(&mut new, &old);
        assert_eq!(new["spec"]["clusterIP"], "10.0.0.5");
        assert_eq!(new["spec"]["clusterIPs"], json!(["10.0.0.5"]));
        assert!(validate_service_update(&new, &old).is_empty());
        let mut changed = new.clone();
        changed["spec"]["clusterIP"] = json!("10.0.0.6");
        prepare_update_service(&mut changed, &old);
        let causes = validate_service_update(&changed, &old);
        assert!(fields(&causes).contains(&("spec.clusterIPs[0]", "FieldValueInvalid")));
    }

    #[test]
    fn secret_and_config_map_data() {
        let mut secret = json!({"metadata": {"name": "s", "namespace": "d"}, "stringData": {"user": "admin"}, "data": {"bad key": "YQ=="}});
        default_secret(&mut secret);
        assert_eq!(secret["type"], "Opaque");
        assert_eq!(secret["data"]["user"], "YWRtaW4=");
        assert!(secret.get("stringData").is_none());
        assert!(
            fields(&validate_secret(&secret)).contains(&("data[bad key]", "FieldValueInvalid"))
        );
        let tls = json!({"metadata": {"name": "t", "namespace": "d"}, "type": "kubernetes.io/tls", "data": {}});
        assert_eq!(validate_secret(&tls).len(), 2);
        let big = "x".repeat(MAX_SECRET_SIZE + 1);
        let cm = json!({"metadata": {"name": "c", "namespace": "d"}, "data": {"a": big}});
        let causes = validate_config_map(&cm);
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "");
        assert_eq!(causes[0].reason, "FieldValueTooLong");
        let old = json!({"metadata": {"name": "c", "namespace": "d"}, "immutable": true, "data": {"a": "1"}});
        let new = json!({"metadata": {"name": "c", "namespace": "d"}, "immutable": true, "data": {"a": "2"}});
        assert!(
            fields(&validate_config_map_update(&new, &old))
                .contains(&("data", "FieldValueForbidden"))
        );
    }

    #[test]
    fn events_must_match_their_namespace() {
        let ev = json!({"metadata": {"name": "e", "namespace": "d"}, "involvedObject": {"namespace": "other"}});
        assert_eq!(
            fields(&validate_event(&ev)),
            vec![("involvedObject.namespace", "FieldValueInvalid")]
        );
        let ev = json!({"metadata": {"name": "e", "namespace": "default"}, "involvedObject": {"kind": "Node"}});
        assert!(validate_event(&ev).is_empty());
    }
}
