//! `canopy.io/v1` Tenant: one Keystone project, its quotas, its network and what it uses
//! (seed §2). The typed form is for Canopy's own components (kube-rs `Api<Tenant>`); the
//! apiserver handles it as JSON like every other kind, with this schema.

use k8s_openapi::apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::kinds::util::{Path, invalid, required};
use crate::status::Cause;

/// The label naming the tenant a namespace, a node or a namespaced object belongs to.
pub const TENANT_LABEL: &str = "canopy.io/tenant";

/// The group prefix of a tenant's members: `canopy:tenant:<tenant name>`.
pub const MEMBER_GROUP_PREFIX: &str = "canopy:tenant:";

/// Tenant is one customer of the cloud: a Keystone project with its own namespaces, nodes,
/// network and quotas. Its name is the Keystone project id.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "io.canopy.v1.Tenant")]
pub struct Tenant {
    /// APIVersion defines the versioned schema of this representation of an object.
    #[serde(
        rename = "apiVersion",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub api_version: String,
    /// Kind is a string value representing the REST resource this object represents.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// Standard object's metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What the tenant is and may use.
    #[serde(default)]
    pub spec: TenantSpec,
    /// What the tenant has and uses now, maintained by Canopy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<TenantStatus>,
}

/// What a tenant is and may use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// The Keystone project this tenant is. Immutable.
    #[serde(default)]
    pub project_id: String,
    /// A human-readable name (the Keystone project's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Upper bounds on what the tenant's pods and VMs may use; an absent bound is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<TenantQuota>,
    /// The tenant's private network (VPC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<TenantNetwork>,
}

/// Bounds on a tenant's use of the cloud.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantQuota {
    /// Sum of the CPU requests of the tenant's non-terminated pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Sum of the memory requests of the tenant's non-terminated pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Number of non-terminated pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<i64>,
    /// Number of VMs the cloud may create for the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<i64>,
}

/// A tenant's private network.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantNetwork {
    /// The address range of the tenant's VPC, e.g. `10.0.0.0/16`. Tenants' ranges may
    /// overlap: each tenant has its own virtual network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// The IPv4 range the tenant's Services take their ClusterIPs from, e.g. `10.96.0.0/12`;
    /// it must not overlap `cidr`. Set once: addresses already handed out stay in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_cidr: Option<String>,
}

/// What a tenant has and uses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// The tenant's namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// What the tenant uses, in the units of its quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TenantUsage>,
}

/// A tenant's current use of the cloud.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantUsage {
    /// CPU requested by non-terminated pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory requested by non-terminated pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Non-terminated pods.
    #[serde(default)]
    pub pods: i64,
    /// VMs.
    #[serde(default)]
    pub vms: i64,
}

impl k8s_openapi::Resource for Tenant {
    const API_VERSION: &'static str = "canopy.io/v1";
    const GROUP: &'static str = "canopy.io";
    const KIND: &'static str = "Tenant";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "tenants";
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::ListableResource for Tenant {
    const LIST_KIND: &'static str = "TenantList";
}

impl k8s_openapi::Metadata for Tenant {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The tenant a member group names, if it is one.
pub fn tenant_of_group(group: &str) -> Option<&str> {
    group
        .strip_prefix(MEMBER_GROUP_PREFIX)
        .filter(|t| !t.is_empty())
}

/// The default network of a tenant without one.
pub const DEFAULT_CIDR: &str = "10.0.0.0/16";

/// The Service range of a tenant without one (upstream kubeadm's default).
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";

/// The cluster DNS address of a Service range: its 10th address, as kubeadm's kube-dns
/// (10.96.0.10), kept from Services. Ranges under 32 addresses have none.
pub fn cluster_dns_address(service_cidr: &str) -> Option<std::net::Ipv4Addr> {
    match parse_cidr(service_cidr)? {
        (std::net::IpAddr::V4(base), prefix) if prefix <= 27 => {
            Some(std::net::Ipv4Addr::from(u32::from(base) + 10))
        }
        _ => None,
    }
}

pub(crate) fn default_tenant(obj: &mut Value) {
    let Some(spec) = crate::kinds::util::ensure_obj(obj, "spec") else {
        return;
    };
    let Some(network) = crate::kinds::util::ensure_obj(spec, "network") else {
        return;
    };
    crate::kinds::util::default_str(network, "cidr", DEFAULT_CIDR);
    crate::kinds::util::default_str(network, "serviceCidr", DEFAULT_SERVICE_CIDR);
}

fn overlap(a: (std::net::IpAddr, u8), b: (std::net::IpAddr, u8)) -> bool {
    let (std::net::IpAddr::V4(a_ip), std::net::IpAddr::V4(b_ip)) = (a.0, b.0) else {
        return false;
    };
    let prefix = a.1.min(b.1);
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(a_ip) & mask == u32::from(b_ip) & mask
}

fn validate_quantity(spec: &Value, path: &Path, field: &str, causes: &mut Vec<Cause>) {
    let Some(value) = spec.get(field) else {
        return;
    };
    let text = value
        .as_str()
        .map(str::to_string)
        .unwrap_or(value.to_string());
    match crate::quantity::Quantity::parse(&text) {
        Ok(q) if q.milli() < 0 => causes.push(invalid(
            &path.child(field),
            value.clone(),
            "must be greater than or equal to 0",
        )),
        Ok(_) => {}
        Err(_) => causes.push(invalid(
            &path.child(field),
            value.clone(),
            "must be a quantity such as 4, 500m or 8Gi",
        )),
    }
}

pub(crate) fn validate_tenant(obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let empty = Value::Null;
    let spec = obj.get("spec").unwrap_or(&empty);
    let path = Path::new("spec");
    match spec.get("projectId").and_then(Value::as_str) {
        None | Some("") => causes.push(required(
            &path.child("projectId"),
            "the Keystone project id of the tenant",
        )),
        Some(_) => {}
    }
    if let Some(quota) = spec.get("quota") {
        let path = path.child("quota");
        validate_quantity(quota, &path, "cpu", &mut causes);
        validate_quantity(quota, &path, "memory", &mut causes);
        for field in ["pods", "vms"] {
            if let Some(n) = quota.get(field).and_then(Value::as_i64)
                && n < 0
            {
                causes.push(invalid(
                    &path.child(field),
                    n,
                    "must be greater than or equal to 0",
                ));
            }
        }
    }
    if let Some(cidr) = spec
        .get("network")
        .and_then(|n| n.get("cidr"))
        .and_then(Value::as_str)
        && parse_cidr(cidr).is_none()
    {
        causes.push(invalid(
            &path.child("network").child("cidr"),
            cidr,
            "must be a CIDR such as 10.0.0.0/16",
        ));
    }
    let network = spec.get("network");
    if let Some(service_cidr) = network
        .and_then(|n| n.get("serviceCidr"))
        .and_then(Value::as_str)
    {
        let field = path.child("network").child("serviceCidr");
        match parse_cidr(service_cidr) {
            Some((std::net::IpAddr::V4(_), prefix)) if prefix <= 30 => {
                let vpc = network
                    .and_then(|n| n.get("cidr"))
                    .and_then(Value::as_str)
                    .and_then(parse_cidr);
                if let (Some(vpc), Some(svc)) = (vpc, parse_cidr(service_cidr))
                    && overlap(vpc, svc)
                {
                    causes.push(invalid(
                        &field,
                        service_cidr,
                        "must not overlap spec.network.cidr",
                    ));
                }
            }
            _ => causes.push(invalid(
                &field,
                service_cidr,
                "must be an IPv4 CIDR of at least 4 addresses, such as 10.96.0.0/12",
            )),
        }
    }
    causes
}

pub(crate) fn validate_tenant_update(new: &Value, old: &Value) -> Vec<Cause> {
    let mut causes = validate_tenant(new);
    causes.extend(crate::kinds::util::immutable(
        new.get("spec").and_then(|s| s.get("projectId")),
        old.get("spec").and_then(|s| s.get("projectId")),
        &Path::new("spec").child("projectId"),
    ));
    let service_cidr = |obj: &Value| obj.pointer("/spec/network/serviceCidr").cloned();
    if let Some(old_cidr) = service_cidr(old) {
        causes.extend(crate::kinds::util::immutable(
            service_cidr(new).as_ref(),
            Some(&old_cidr),
            &Path::new("spec").child("network").child("serviceCidr"),
        ));
    }
    causes
}

/// An address and prefix length, when `text` is a CIDR whose host bits are zero.
pub fn parse_cidr(text: &str) -> Option<(std::net::IpAddr, u8)> {
    let (addr, len) = text.split_once('/')?;
    let addr: std::net::IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let bits = match addr {
        std::net::IpAddr::V4(a) => {
            if len > 32 {
                return None;
            }
            let host = u32::from(a) & u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
            host == 0
        }
        std::net::IpAddr::V6(a) => {
            if len > 128 {
                return None;
            }
            let host = u128::from(a) & u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
            host == 0
        }
    };
    bits.then_some((addr, len))
}

/// Resources counted against a tenant's quota, in exact units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU in millicores.
    pub cpu_milli: i128,
    /// Memory in bytes.
    pub memory_bytes: i128,
    /// Pods.
    pub pods: i64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Usage) {
        self.cpu_milli += other.cpu_milli;
        self.memory_bytes += other.memory_bytes;
        self.pods += other.pods;
    }
}

/// A tenant's quota in exact units; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPU in millicores.
    pub cpu_milli: Option<i128>,
    /// Memory in bytes.
    pub memory_bytes: Option<i128>,
    /// Pods.
    pub pods: Option<i64>,
}

impl Limits {
    /// The quota of a Tenant object.
    pub fn of(tenant: &Value) -> Limits {
        let quantity = |field: &str| {
            tenant
                .pointer(&format!("/spec/quota/{field}"))
                .and_then(quantity_of)
        };
        Limits {
            cpu_milli: quantity("cpu").map(|q| q.milli()),
            memory_bytes: quantity("memory").map(|q| q.value()),
            pods: tenant.pointer("/spec/quota/pods").and_then(Value::as_i64),
        }
    }

    /// Whether there is any bound.
    pub fn is_unlimited(&self) -> bool {
        self.cpu_milli.is_none() && self.memory_bytes.is_none() && self.pods.is_none()
    }

    /// What `usage` exceeds, as upstream's quota messages word it.
    pub fn exceeded(&self, usage: &Usage, requested: &Usage) -> Vec<String> {
        let mut out = Vec::new();
        let total_cpu = usage.cpu_milli + requested.cpu_milli;
        if let Some(limit) = self.cpu_milli
            && requested.cpu_milli > 0
            && total_cpu > limit
        {
            out.push(format!(
                "requested: cpu={}m, used: cpu={}m, limited: cpu={limit}m",
                requested.cpu_milli, usage.cpu_milli
            ));
        }
        let total_memory = usage.memory_bytes + requested.memory_bytes;
        if let Some(limit) = self.memory_bytes
            && requested.memory_bytes > 0
            && total_memory > limit
        {
            out.push(format!(
                "requested: memory={}, used: memory={}, limited: memory={limit}",
                requested.memory_bytes, usage.memory_bytes
            ));
        }
        if let Some(limit) = self.pods
            && usage.pods + requested.pods > limit
        {
            out.push(format!(
                "requested: pods={}, used: pods={}, limited: pods={limit}",
                requested.pods, usage.pods
            ));
        }
        out
    }
}

fn quantity_of(value: &Value) -> Option<crate::quantity::Quantity> {
    match value {
        Value::String(s) => crate::quantity::Quantity::parse(s).ok(),
        Value::Number(n) => crate::quantity::Quantity::parse(&n.to_string()).ok(),
        _ => None,
    }
}

/// Whether a pod counts against its tenant's quota: until it has terminated, as upstream's
/// pod quota evaluator.
pub fn pod_counts(pod: &Value) -> bool {
    !matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

/// What a pod asks for: the larger of the sum of its containers' requests and its largest
/// init container's (upstream's effective pod request), limits standing in for absent
/// requests, plus its overhead.
pub fn pod_usage(pod: &Value) -> Usage {
    let request = |container: &Value, resource: &str| -> i128 {
        let q = container
            .pointer(&format!("/resources/requests/{resource}"))
            .or_else(|| container.pointer(&format!("/resources/limits/{resource}")))
            .and_then(quantity_of);
        match (q, resource) {
            (Some(q), "cpu") => q.milli(),
            (Some(q), _) => q.value(),
            (None, _) => 0,
        }
    };
    let containers = |field: &str| {
        pod.pointer(&format!("/spec/{field}"))
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    };
    let mut usage = Usage {
        pods: 1,
        ..Usage::default()
    };
    for c in containers("containers") {
        usage.cpu_milli += request(c, "cpu");
        usage.memory_bytes += request(c, "memory");
    }
    for c in containers("initContainers") {
        usage.cpu_milli = usage.cpu_milli.max(request(c, "cpu"));
        usage.memory_bytes = usage.memory_bytes.max(request(c, "memory"));
    }
    if let Some(overhead) = pod.pointer("/spec/overhead") {
        usage.cpu_milli += overhead
            .get("cpu")
            .and_then(quantity_of)
            .map_or(0, |q| q.milli());
        usage.memory_bytes += overhead
            .get("memory")
            .and_then(quantity_of)
            .map_or(0, |q| q.value());
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert!(parse_cidr("10.0.0.0/16").is_some());
        assert!(parse_cidr("10.0.0.1/16").is_none());
        assert!(parse_cidr("0.0.0.0/0").is_some());
        assert!(parse_cidr("fd00::/8").is_some());
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("10.0.0.0").is_none());
    }

    #[test]
    fn validation() {
        let ok = serde_json::json!({"spec": {"projectId": "p", "quota": {"cpu": "2", "memory": "4Gi", "pods": 10}, "network": {"cidr": "10.1.0.0/16"}}});
        assert!(validate_tenant(&ok).is_empty());
        let bad = serde_json::json!({"spec": {"quota": {"cpu": "x", "pods": -1}, "network": {"cidr": "nope"}}});
        let fields: Vec<String> = validate_tenant(&bad).into_iter().map(|c| c.field).collect();
        assert_eq!(
            fields,
            [
                "spec.projectId",
                "spec.quota.cpu",
                "spec.quota.pods",
                "spec.network.cidr"
            ]
        );
    }

    #[test]
    fn pod_usage_and_limits() {
        let pod = serde_json::json!({"spec": {
            "containers": [
                {"resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}},
                {"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}
            ],
            "initContainers": [{"resources": {"requests": {"cpu": "2"}}}]
        }});
        let usage = pod_usage(&pod);
        assert_eq!(
            usage,
            Usage {
                cpu_milli: 2000,
                memory_bytes: (64 << 20) + (1 << 30),
                pods: 1
            }
        );
        let limits =
            Limits::of(&serde_json::json!({"spec": {"quota": {"cpu": "2500m", "pods": 2}}}));
        assert!(limits.exceeded(&Usage::default(), &usage).is_empty());
        let used = Usage {
            cpu_milli: 1000,
            memory_bytes: 0,
            pods: 1,
        };
        assert_eq!(limits.exceeded(&used, &usage).len(), 1);
        let full = Usage {
            cpu_milli: 0,
            memory_bytes: 0,
            pods: 2,
        };
        assert!(limits.exceeded(&full, &usage)[0].contains("pods"));
        assert!(!pod_counts(
            &serde_json::json!({"status": {"phase": "Succeeded"}})
        ));
    }

    #[test]
    fn member_groups() {
        assert_eq!(tenant_of_group("canopy:tenant:abc"), Some("abc"));
        assert_eq!(tenant_of_group("canopy:tenant:"), None);
        assert_eq!(tenant_of_group("system:masters"), None);
    }
}
