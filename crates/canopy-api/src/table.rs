//! Server-side printing: the `meta.k8s.io/v1` Table columns and row cells of each built-in
//! resource, as upstream's printers (`pkg/printers/internalversion/printers.go`) produce
//! them for `kubectl get`.
//!
//! kube-apiserver always prints with the wide option and lets the client hide columns of
//! priority 1, so [`cells`] returns a cell for every column of [`columns`].
//!
//! Upstream prints objects after decoding, which applies defaults. The few defaulted fields
//! a printer reads (`spec.replicas`, a service's `type`, port protocols and `clusterIPs`, a
//! secret's `type`) are read here with the same defaults, so a stored object prints the same
//! whether or not those fields were written out.

use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value, json};

use crate::ResourceDef;
use crate::selector::LabelSelector;

/// One column of a Table (`TableColumnDefinition`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Column {
    /// Header, e.g. `Name`; kubectl upper-cases it.
    pub name: &'static str,
    /// OpenAPI type of the cells: `string`, `integer`, `date`...
    pub type_: &'static str,
    /// OpenAPI format; `name` marks the column that holds the object's name.
    pub format: &'static str,
    /// What the column shows.
    pub description: &'static str,
    /// 0 for `kubectl get`, 1 for columns shown only by `kubectl get -o wide`.
    pub priority: i32,
}

const fn col(name: &'static str, type_: &'static str, description: &'static str) -> Column {
    Column {
        name,
        type_,
        format: "",
        description,
        priority: 0,
    }
}

const fn wide(name: &'static str, description: &'static str) -> Column {
    Column {
        name,
        type_: "string",
        format: "",
        description,
        priority: 1,
    }
}

const NAME_DESC: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const AGE_DESC: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";
const CONTAINERS_DESC: &str = "Names of each container in the template.";
const IMAGES_DESC: &str = "Images referenced by each container in the template.";

const NAME: Column = Column {
    name: "Name",
    type_: "string",
    format: "name",
    description: NAME_DESC,
    priority: 0,
};
const AGE: Column = col("Age", "string", AGE_DESC);

static POD_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Ready",
        "string",
        "The aggregate readiness state of this pod for accepting traffic.",
    ),
    col(
        "Status",
        "string",
        "The aggregate status of the containers in this pod.",
    ),
    col(
        "Restarts",
        "string",
        "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
    ),
    AGE,
    wide(
        "IP",
        "podIP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
    ),
    wide(
        "Node",
        "NodeName indicates in which node this pod is scheduled. If empty, this pod is a candidate for scheduling by the scheduler defined in schedulerName. Once this field is set, the kubelet for this node becomes responsible for the lifecycle of this pod. This field should not be used to express a desire for the pod to be scheduled on a specific node. https://kubernetes.io/docs/concepts/scheduling-eviction/assign-pod-node/#nodename",
    ),
    wide(
        "Nominated Node",
        "nominatedNodeName is set only when this pod preempts other pods on the node, but it cannot be scheduled right away as preemption victims receive their graceful termination periods. This field does not guarantee that the pod will be scheduled on this node. Scheduler may decide to place the pod elsewhere if other nodes become available sooner. Scheduler may also decide to give the resources on this node to a higher priority pod that is created after preemption. As a result, this field may be different than PodSpec.nodeName when the pod is scheduled.",
    ),
    wide(
        "Readiness Gates",
        "If specified, all readiness gates will be evaluated for pod readiness. A pod is ready when all its containers are ready AND all conditions specified in the readiness gates have status equal to \"True\" More info: https://git.k8s.io/enhancements/keps/sig-network/580-pod-readiness-gates",
    ),
];

const NODE_ADDRESSES_DESC: &str = "List of addresses reachable to the node. Queried from cloud provider, if available. More info: https://kubernetes.io/docs/reference/node/node-status/#addresses Note: This field is declared as mergeable, but the merge key is not sufficiently unique, which can cause data corruption when it is merged. Callers should instead use a full-replacement patch. See https://pr.k8s.io/79391 for an example. Consumers should assume that addresses can change during the lifetime of a Node. However, there are some exceptions where this may not be possible, such as Pods that inherit a Node's address in its own status or consumers of the downward API (status.hostIP).";

static NODE_COLUMNS: &[Column] = &[
    NAME,
    col("Status", "string", "The status of the node"),
    col("Roles", "string", "The roles of the node"),
    AGE,
    col("Version", "string", "Kubelet Version reported by the node."),
    wide("Internal-IP", NODE_ADDRESSES_DESC),
    wide("External-IP", NODE_ADDRESSES_DESC),
    wide(
        "OS-Image",
        "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).",
    ),
    wide(
        "Kernel-Version",
        "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).",
    ),
    wide(
        "Container-Runtime",
        "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).",
    ),
];

static NAMESPACE_COLUMNS: &[Column] = &[
    NAME,
    col("Status", "string", "The status of the namespace"),
    AGE,
];

static SERVICE_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Type",
        "string",
        "type determines how the Service is exposed. Defaults to ClusterIP. Valid options are ExternalName, ClusterIP, NodePort, and LoadBalancer. \"ClusterIP\" allocates a cluster-internal IP address for load-balancing to endpoints. Endpoints are determined by the selector or if that is not specified, by manual construction of an Endpoints object or EndpointSlice objects. If clusterIP is \"None\", no virtual IP is allocated and the endpoints are published as a set of endpoints rather than a virtual IP. \"NodePort\" builds on ClusterIP and allocates a port on every node which routes to the same endpoints as the clusterIP. \"LoadBalancer\" builds on NodePort and creates an external load-balancer (if supported in the current cloud) which routes to the same endpoints as the clusterIP. \"ExternalName\" aliases this service to the specified externalName. Several other fields do not apply to ExternalName services. More info: https://kubernetes.io/docs/concepts/services-networking/service/#publishing-services-service-types",
    ),
    col(
        "Cluster-IP",
        "string",
        "clusterIP is the IP address of the service and is usually assigned randomly. If an address is specified manually, is in-range (as per system configuration), and is not in use, it will be allocated to the service; otherwise creation of the service will fail. This field may not be changed through updates unless the type field is also being changed to ExternalName (which requires this field to be blank) or the type field is being changed from ExternalName (in which case this field may optionally be specified, as describe above).  Valid values are \"None\", empty string (\"\"), or a valid IP address. Setting this to \"None\" makes a \"headless service\" (no virtual IP), which is useful when direct endpoint connections are preferred and proxying is not required.  Only applies to types ClusterIP, NodePort, and LoadBalancer. If this field is specified when creating a Service of type ExternalName, creation will fail. This field will be wiped when updating a Service to type ExternalName. More info: https://kubernetes.io/docs/concepts/services-networking/service/#virtual-ips-and-service-proxies",
    ),
    col(
        "External-IP",
        "string",
        "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.  These IPs are not managed by Kubernetes.  The user is responsible for ensuring that traffic arrives at a node with this IP.  A common example is external load-balancers that are not part of the Kubernetes system.",
    ),
    col(
        "Port(s)",
        "string",
        "The list of ports that are exposed by this service. More info: https://kubernetes.io/docs/concepts/services-networking/service/#virtual-ips-and-service-proxies",
    ),
    AGE,
    wide(
        "Selector",
        "Route service traffic to pods with label keys and values matching this selector. If empty or not present, the service is assumed to have an external process managing its endpoints, which Kubernetes will not modify. Only applies to types ClusterIP, NodePort, and LoadBalancer. Ignored if type is ExternalName. More info: https://kubernetes.io/docs/concepts/services-networking/service/",
    ),
];

static ENDPOINTS_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Endpoints",
        "string",
        "The set of all endpoints is the union of all subsets. Addresses are placed into subsets according to the IPs they share. A single address with multiple ports, some of which are ready and some of which are not (because they come from different containers) will result in the address being displayed in different subsets for the different ports. No address will appear in both Addresses and NotReadyAddresses in the same subset. Sets of addresses and ports that comprise a service.",
    ),
    AGE,
];

static CONFIGMAP_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Data",
        "string",
        "Data contains the configuration data. Each key must consist of alphanumeric characters, '-', '_' or '.'. Values with non-UTF-8 byte sequences must use the BinaryData field. The keys stored in Data must not overlap with the keys in the BinaryData field, this is enforced during validation process.",
    ),
    AGE,
];

static SECRET_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Type",
        "string",
        "Used to facilitate programmatic handling of secret data. More info: https://kubernetes.io/docs/concepts/configuration/secret/#secret-types",
    ),
    col(
        "Data",
        "string",
        "Data contains the secret data. Each key must consist of alphanumeric characters, '-', '_' or '.'. The serialized form of the secret data is a base64 encoded string, representing the arbitrary (possibly non-string) data value here. Described in https://tools.ietf.org/html/rfc4648#section-4",
    ),
    AGE,
];

static SERVICEACCOUNT_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Secrets",
        "string",
        "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use. Pods are only limited to this list if this service account has a \"kubernetes.io/enforce-mountable-secrets\" annotation set to \"true\". The \"kubernetes.io/enforce-mountable-secrets\" annotation is deprecated since v1.32. Prefer separate namespaces to isolate access to mounted secrets. This field should not be used to find auto-generated service account token secrets for use outside of pods. Instead, tokens can be requested directly using the TokenRequest API, or service account token secrets can be manually created. More info: https://kubernetes.io/docs/concepts/configuration/secret",
    ),
    AGE,
];

static EVENT_COLUMNS: &[Column] = &[
    col(
        "Last Seen",
        "string",
        "The time at which the most recent occurrence of this event was recorded.",
    ),
    col(
        "Type",
        "string",
        "Type of this event (Normal, Warning), new types could be added in the future",
    ),
    col(
        "Reason",
        "string",
        "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
    ),
    col("Object", "string", "The object that this event is about."),
    wide(
        "Subobject",
        "If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement, such as desiredState.manifest.containers[2]. For example, if the object reference is to a container within a pod, this would take on a value like: \"spec.containers{name}\" (where \"name\" refers to the name of the container that triggered the event) or if no container name is specified \"spec.containers[2]\" (container with index 2 in this pod). This syntax is chosen only to have some well-defined way of referencing a part of an object.",
    ),
    wide(
        "Source",
        "The component reporting this event. Should be a short machine understandable string.",
    ),
    col(
        "Message",
        "string",
        "A human-readable description of the status of this operation.",
    ),
    wide(
        "First Seen",
        "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)",
    ),
    wide("Count", "The number of times this event has occurred."),
    Column {
        priority: 1,
        ..NAME
    },
];

// Upstream describes these columns with the extensions/v1beta1 and discovery/v1beta1 docs.
static DEPLOYMENT_COLUMNS: &[Column] = &[
    NAME,
    col("Ready", "string", "Number of the pod with ready state"),
    col(
        "Up-to-date",
        "string",
        "Total number of non-terminating pods targeted by this deployment that have the desired template spec.",
    ),
    col(
        "Available",
        "string",
        "Total number of available non-terminating pods (ready for at least minReadySeconds) targeted by this deployment.",
    ),
    AGE,
    wide("Containers", CONTAINERS_DESC),
    wide("Images", IMAGES_DESC),
    wide(
        "Selector",
        "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment.",
    ),
];

static REPLICASET_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Desired",
        "integer",
        "Replicas is the number of desired replicas. This is a pointer to distinguish between explicit zero and unspecified. Defaults to 1. More info: https://kubernetes.io/docs/concepts/workloads/controllers/replicationcontroller/#what-is-a-replicationcontroller",
    ),
    col(
        "Current",
        "integer",
        "Replicas is the most recently observed number of non-terminating pods. More info: https://kubernetes.io/docs/concepts/workloads/controllers/replicationcontroller/#what-is-a-replicationcontroller",
    ),
    col(
        "Ready",
        "integer",
        "The number of non-terminating pods targeted by this ReplicaSet with a Ready Condition.",
    ),
    AGE,
    wide("Containers", CONTAINERS_DESC),
    wide("Images", IMAGES_DESC),
    wide(
        "Selector",
        "Selector is a label query over pods that should match the replica count. If the selector is empty, it is defaulted to the labels present on the pod template. Label keys and values that must match in order to be controlled by this replica set. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#label-selectors",
    ),
];

static LEASE_COLUMNS: &[Column] = &[
    NAME,
    col(
        "Holder",
        "string",
        "holderIdentity contains the identity of the holder of a current lease. If Coordinated Leader Election is used, the holder identity must be equal to the elected LeaseCandidate.metadata.name field.",
    ),
    AGE,
];

static TENANT_COLUMNS: &[Column] = &[
    NAME,
    col("Display Name", "string", "The Keystone project's name."),
    col(
        "Pods",
        "string",
        "Pods in use, and the quota when there is one.",
    ),
    col(
        "CPU",
        "string",
        "CPU requested by the tenant's pods, and the quota when there is one.",
    ),
    col(
        "Memory",
        "string",
        "Memory requested by the tenant's pods, and the quota when there is one.",
    ),
    wide("Network", "The tenant's network."),
    wide("Namespaces", "How many namespaces the tenant has."),
    AGE,
];

static ENDPOINTSLICE_COLUMNS: &[Column] = &[
    NAME,
    col(
        "AddressType",
        "string",
        "addressType specifies the type of address carried by this EndpointSlice. All addresses in this slice must be the same type. This field is immutable after creation. The following address types are currently supported: * IPv4: Represents an IPv4 Address. * IPv6: Represents an IPv6 Address. * FQDN: Represents a Fully Qualified Domain Name.",
    ),
    col(
        "Ports",
        "string",
        "ports specifies the list of network ports exposed by each endpoint in this slice. Each port must have a unique name. When ports is empty, it indicates that there are no defined ports. When a port is defined with a nil port value, it indicates \"all ports\". Each slice may include a maximum of 100 ports.",
    ),
    col(
        "Endpoints",
        "string",
        "endpoints is a list of unique endpoints in this slice. Each slice may include a maximum of 1000 endpoints.",
    ),
    AGE,
];

/// Upstream's default table (`rest.NewDefaultTableConvertor`) for kinds without a printer.
static DEFAULT_COLUMNS: &[Column] = &[NAME, col("Created At", "date", AGE_DESC)];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Printer {
    Tenant,
    Pod,
    Node,
    Namespace,
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
    Default,
}

fn printer(def: &ResourceDef) -> Printer {
    match (def.group, def.plural) {
        ("", "pods") => Printer::Pod,
        ("", "nodes") => Printer::Node,
        ("", "namespaces") => Printer::Namespace,
        ("", "services") => Printer::Service,
        ("", "endpoints") => Printer::Endpoints,
        ("", "configmaps") => Printer::ConfigMap,
        ("", "secrets") => Printer::Secret,
        ("", "serviceaccounts") => Printer::ServiceAccount,
        ("", "events") => Printer::Event,
        ("apps", "deployments") => Printer::Deployment,
        ("apps", "replicasets") => Printer::ReplicaSet,
        ("coordination.k8s.io", "leases") => Printer::Lease,
        ("discovery.k8s.io", "endpointslices") => Printer::EndpointSlice,
        ("canopy.io", "tenants") => Printer::Tenant,
        _ => Printer::Default,
    }
}

/// The Table columns of a resource, default and wide.
pub fn columns(def: &ResourceDef) -> &'static [Column] {
    match printer(def) {
        Printer::Pod => POD_COLUMNS,
        Printer::Node => NODE_COLUMNS,
        Printer::Namespace => NAMESPACE_COLUMNS,
        Printer::Service => SERVICE_COLUMNS,
        Printer::Endpoints => ENDPOINTS_COLUMNS,
        Printer::ConfigMap => CONFIGMAP_COLUMNS,
        Printer::Secret => SECRET_COLUMNS,
        Printer::ServiceAccount => SERVICEACCOUNT_COLUMNS,
        Printer::Event => EVENT_COLUMNS,
        Printer::Deployment => DEPLOYMENT_COLUMNS,
        Printer::ReplicaSet => REPLICASET_COLUMNS,
        Printer::Lease => LEASE_COLUMNS,
        Printer::EndpointSlice => ENDPOINTSLICE_COLUMNS,
        Printer::Tenant => TENANT_COLUMNS,
        Printer::Default => DEFAULT_COLUMNS,
    }
}

/// The Table's `columnDefinitions` for a resource.
pub fn column_definitions(def: &ResourceDef) -> Value {
    Value::Array(
        columns(def)
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "type": c.type_,
                    "format": c.format,
                    "description": c.description,
                    "priority": c.priority,
                })
            })
            .collect(),
    )
}

/// The cells of an object's Table row, one per column of [`columns`], computed as upstream's
/// printers do. Missing or mistyped fields print as upstream prints their zero values.
pub fn cells(def: &ResourceDef, obj: &Value, now: DateTime<Utc>) -> Vec<Value> {
    match printer(def) {
        Printer::Pod => pod_cells(obj, now),
        Printer::Node => node_cells(obj, now),
        Printer::Namespace => vec![
            json!(name(obj)),
            json!(string(obj, &["status", "phase"])),
            json!(age(obj, now)),
        ],
        Printer::Service => service_cells(obj, now),
        Printer::Endpoints => vec![
            json!(name(obj)),
            json!(format_endpoints(obj)),
            json!(age(obj, now)),
        ],
        Printer::ConfigMap => vec![
            json!(name(obj)),
            json!(map_len(obj, &["data"]) + map_len(obj, &["binaryData"])),
            json!(age(obj, now)),
        ],
        Printer::Secret => secret_cells(obj, now),
        Printer::ServiceAccount => vec![
            json!(name(obj)),
            json!(list(obj, &["secrets"]).len()),
            json!(age(obj, now)),
        ],
        Printer::Event => event_cells(obj, now),
        Printer::Deployment => deployment_cells(obj, now),
        Printer::ReplicaSet => replicaset_cells(obj, now),
        Printer::Lease => vec![
            json!(name(obj)),
            json!(string(obj, &["spec", "holderIdentity"])),
            json!(age(obj, now)),
        ],
        Printer::EndpointSlice => vec![
            json!(name(obj)),
            json!(string(obj, &["addressType"])),
            json!(format_discovery_ports(list(obj, &["ports"]))),
            json!(format_discovery_endpoints(list(obj, &["endpoints"]))),
            json!(age(obj, now)),
        ],
        Printer::Tenant => tenant_cells(obj, now),
        Printer::Default => {
            // Go formats an unset creationTimestamp as its zero time.
            let created = timestamp(obj, &["metadata", "creationTimestamp"]).map_or_else(
                || "0001-01-01T00:00:00Z".to_string(),
                |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            );
            vec![json!(name(obj)), json!(created)]
        }
    }
}

fn tenant_cells(obj: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let used = |field: &str| match obj.pointer(&format!("/status/usage/{field}")) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => "0".to_string(),
    };
    let of = |field: &str| {
        let quota = match obj.pointer(&format!("/spec/quota/{field}")) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        match quota {
            Some(q) => format!("{}/{q}", used(field)),
            None => used(field),
        }
    };
    vec![
        json!(name(obj)),
        json!(string(obj, &["spec", "displayName"])),
        json!(of("pods")),
        json!(of("cpu")),
        json!(of("memory")),
        json!(string(obj, &["spec", "network", "cidr"])),
        json!(list(obj, &["status", "namespaces"]).len()),
        json!(age(obj, now)),
    ]
}

/// Upstream's `duration.HumanDuration`: about two significant figures, e.g. `45s`, `5m30s`,
/// `3h2m`, `6d2h`, `2y30d`; `<invalid>` for more than a second in the future.
pub fn human_duration(d: Duration) -> String {
    // Go's time.Duration is i64 nanoseconds and time.Since saturates at its bounds.
    let nanos = d.num_nanoseconds().unwrap_or(if d < Duration::zero() {
        i64::MIN
    } else {
        i64::MAX
    });
    let seconds = nanos / 1_000_000_000;
    if seconds < -1 {
        return "<invalid>".to_string();
    }
    if seconds < 0 {
        return "0s".to_string();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = nanos / 60_000_000_000;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = nanos / 3_600_000_000_000;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

// ---- Field access that tolerates anything. ----

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, key| cur.get(key))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path)?.as_str()
}

fn string<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    str_at(v, path).unwrap_or("")
}

fn int(v: &Value, path: &[&str]) -> i64 {
    at(v, path).and_then(Value::as_i64).unwrap_or(0)
}

fn boolean(v: &Value, path: &[&str]) -> bool {
    at(v, path).and_then(Value::as_bool).unwrap_or(false)
}

fn list<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn map<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Map<String, Value>> {
    at(v, path)?.as_object()
}

fn map_len(v: &Value, path: &[&str]) -> usize {
    map(v, path).map_or(0, Map::len)
}

/// Whether a pointer field is set (`null` decodes to a nil pointer in Go).
fn present(v: &Value, path: &[&str]) -> bool {
    at(v, path).is_some_and(|x| !x.is_null())
}

fn name(obj: &Value) -> &str {
    string(obj, &["metadata", "name"])
}

/// A `metav1.Time`; the zero time and unparseable text count as unset.
fn timestamp(v: &Value, path: &[&str]) -> Option<DateTime<Utc>> {
    let t = DateTime::parse_from_rfc3339(str_at(v, path)?)
        .ok()?
        .with_timezone(&Utc);
    // Go's zero time.Time, 0001-01-01T00:00:00Z, means "not set".
    let zero = t.timestamp() == -62_135_596_800 && t.timestamp_subsec_nanos() == 0;
    (!zero).then_some(t)
}

/// Upstream's `translateTimestampSince`.
fn since(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        Some(t) => human_duration(now.signed_duration_since(t)),
        None => "<unknown>".to_string(),
    }
}

fn age(obj: &Value, now: DateTime<Utc>) -> String {
    since(timestamp(obj, &["metadata", "creationTimestamp"]), now)
}

/// Upstream's `labels.FormatLabels`: sorted `k=v` pairs, `<none>` when empty.
fn format_labels(labels: Option<&Map<String, Value>>) -> String {
    let mut pairs: Vec<String> = labels
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some(format!("{k}={}", v.as_str()?)))
        .collect();
    pairs.sort_unstable();
    if pairs.is_empty() {
        "<none>".to_string()
    } else {
        pairs.join(",")
    }
}

/// Upstream's `layoutContainerCells`: names and images, comma-separated.
fn container_cells(containers: &[Value]) -> (String, String) {
    let names: Vec<&str> = containers.iter().map(|c| string(c, &["name"])).collect();
    let images: Vec<&str> = containers.iter().map(|c| string(c, &["image"])).collect();
    (names.join(","), images.join(","))
}

// ---- Pods. ----

fn condition_true(conditions: &[Value], kind: &str) -> bool {
    conditions
        .iter()
        .any(|c| string(c, &["type"]) == kind && string(c, &["status"]) == "True")
}

fn later(
    current: Option<DateTime<Utc>>,
    candidate: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    match (current, candidate) {
        (Some(a), Some(b)) if b > a => Some(b),
        (None, Some(b)) => Some(b),
        (a, _) => a,
    }
}

fn last_termination(status: &Value) -> Option<DateTime<Utc>> {
    timestamp(status, &["lastState", "terminated", "finishedAt"])
}

fn pod_cells(pod: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let spec_containers = list(pod, &["spec", "containers"]);
    let init_containers = list(pod, &["spec", "initContainers"]);
    let conditions = list(pod, &["status", "conditions"]);
    let phase = string(pod, &["status", "phase"]);

    let mut restarts: i64 = 0;
    let mut restartable_init_restarts: i64 = 0;
    let mut total = spec_containers.len();
    let mut ready = 0usize;
    let mut last_restart: Option<DateTime<Utc>> = None;
    let mut last_restartable_init_restart: Option<DateTime<Utc>> = None;

    let mut reason = match string(pod, &["status", "reason"]) {
        "" => phase.to_string(),
        r => r.to_string(),
    };
    if conditions.iter().any(|c| {
        string(c, &["type"]) == "PodScheduled" && string(c, &["reason"]) == "SchedulingGated"
    }) {
        reason = "SchedulingGated".to_string();
    }

    let is_sidecar = |container: &Value| string(container, &["restartPolicy"]) == "Always";
    let sidecar_by_name = |name: &str| {
        init_containers
            .iter()
            .find(|c| string(c, &["name"]) == name)
            .is_some_and(is_sidecar)
    };
    total += init_containers.iter().filter(|c| is_sidecar(c)).count();

    let mut initializing = false;
    for (i, status) in list(pod, &["status", "initContainerStatuses"])
        .iter()
        .enumerate()
    {
        let count = int(status, &["restartCount"]);
        restarts += count;
        last_restart = later(last_restart, last_termination(status));
        let sidecar = sidecar_by_name(string(status, &["name"]));
        if sidecar {
            restartable_init_restarts += count;
            last_restartable_init_restart =
                later(last_restartable_init_restart, last_termination(status));
        }
        let terminated = present(status, &["state", "terminated"]);
        // Empty when the container is not waiting.
        let waiting_reason = string(status, &["state", "waiting", "reason"]);
        if terminated && int(status, &["state", "terminated", "exitCode"]) == 0 {
            continue;
        }
        if sidecar && boolean(status, &["started"]) {
            if boolean(status, &["ready"]) {
                ready += 1;
            }
            continue;
        }
        if terminated {
            let term_reason = string(status, &["state", "terminated", "reason"]);
            reason = if !term_reason.is_empty() {
                format!("Init:{term_reason}")
            } else {
                let signal = int(status, &["state", "terminated", "signal"]);
                if signal != 0 {
                    format!("Init:Signal:{signal}")
                } else {
                    format!(
                        "Init:ExitCode:{}",
                        int(status, &["state", "terminated", "exitCode"])
                    )
                }
            };
        } else if !waiting_reason.is_empty() && waiting_reason != "PodInitializing" {
            reason = format!("Init:{waiting_reason}");
        } else {
            reason = format!("Init:{i}/{}", init_containers.len());
        }
        initializing = true;
        break;
    }

    if !initializing || condition_true(conditions, "Initialized") {
        restarts = restartable_init_restarts;
        last_restart = last_restartable_init_restart;
        let mut has_running = false;
        for status in list(pod, &["status", "containerStatuses"]).iter().rev() {
            restarts += int(status, &["restartCount"]);
            last_restart = later(last_restart, last_termination(status));
            let waiting_reason = string(status, &["state", "waiting", "reason"]);
            let terminated = present(status, &["state", "terminated"]);
            let term_reason = string(status, &["state", "terminated", "reason"]);
            if !waiting_reason.is_empty() {
                reason = waiting_reason.to_string();
            } else if terminated && !term_reason.is_empty() {
                reason = term_reason.to_string();
            } else if terminated {
                let signal = int(status, &["state", "terminated", "signal"]);
                reason = if signal != 0 {
                    format!("Signal:{signal}")
                } else {
                    format!(
                        "ExitCode:{}",
                        int(status, &["state", "terminated", "exitCode"])
                    )
                };
            } else if boolean(status, &["ready"]) && present(status, &["state", "running"]) {
                has_running = true;
                ready += 1;
            }
        }
        // A pod whose last container completed still runs while another container does.
        if reason == "Completed" && has_running {
            reason = if condition_true(conditions, "Ready") {
                "Running".to_string()
            } else {
                "NotReady".to_string()
            };
        }
    }

    let deleting = present(pod, &["metadata", "deletionTimestamp"]);
    if deleting && string(pod, &["status", "reason"]) == "NodeLost" {
        reason = "Unknown".to_string();
    } else if deleting && phase != "Succeeded" && phase != "Failed" {
        reason = "Terminating".to_string();
    }

    let restarts_cell = match last_restart {
        Some(t) if restarts != 0 => format!("{restarts} ({} ago)", since(Some(t), now)),
        _ => restarts.to_string(),
    };

    // Upstream's conversion makes status.podIP authoritative over status.podIPs.
    let pod_ip = match string(pod, &["status", "podIP"]) {
        "" => list(pod, &["status", "podIPs"])
            .first()
            .map_or("", |ip| string(ip, &["ip"])),
        ip => ip,
    };
    let readiness_gates = list(pod, &["spec", "readinessGates"]);
    let gates = if readiness_gates.is_empty() {
        "<none>".to_string()
    } else {
        let satisfied = readiness_gates
            .iter()
            .filter(|gate| {
                let kind = string(gate, &["conditionType"]);
                conditions
                    .iter()
                    .find(|c| string(c, &["type"]) == kind)
                    .is_some_and(|c| string(c, &["status"]) == "True")
            })
            .count();
        format!("{satisfied}/{}", readiness_gates.len())
    };

    vec![
        json!(name(pod)),
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts_cell),
        json!(age(pod, now)),
        json!(or_none(pod_ip)),
        json!(or_none(string(pod, &["spec", "nodeName"]))),
        json!(or_none(string(pod, &["status", "nominatedNodeName"]))),
        json!(gates),
    ]
}

fn or_none(s: &str) -> &str {
    if s.is_empty() { "<none>" } else { s }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "<unknown>" } else { s }
}

// ---- Nodes. ----

fn node_cells(node: &Value, now: DateTime<Utc>) -> Vec<Value> {
    // Only the Ready condition is reported; the last entry of a type wins, as in upstream's map.
    let ready = list(node, &["status", "conditions"])
        .iter()
        .rev()
        .find(|c| string(c, &["type"]) == "Ready");
    let mut status = vec![match ready {
        Some(c) if string(c, &["status"]) == "True" => "Ready",
        Some(_) => "NotReady",
        None => "Unknown",
    }];
    if boolean(node, &["spec", "unschedulable"]) {
        status.push("SchedulingDisabled");
    }

    let mut roles: Vec<&str> = map(node, &["metadata", "labels"])
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            if let Some(role) = k.strip_prefix("node-role.kubernetes.io/") {
                (!role.is_empty()).then_some(role)
            } else if k == "kubernetes.io/role" {
                v.as_str().filter(|r| !r.is_empty())
            } else {
                None
            }
        })
        .collect();
    roles.sort_unstable();
    roles.dedup();
    let roles = if roles.is_empty() {
        "<none>".to_string()
    } else {
        roles.join(",")
    };

    let address = |kind: &str| {
        list(node, &["status", "addresses"])
            .iter()
            .find(|a| string(a, &["type"]) == kind)
            .map_or("<none>", |a| string(a, &["address"]))
    };
    let info = |field: &str| string(node, &["status", "nodeInfo", field]);

    vec![
        json!(name(node)),
        json!(status.join(",")),
        json!(roles),
        json!(age(node, now)),
        json!(info("kubeletVersion")),
        json!(address("InternalIP")),
        json!(address("ExternalIP")),
        json!(or_unknown(info("osImage"))),
        json!(or_unknown(info("kernelVersion"))),
        json!(or_unknown(info("containerRuntimeVersion"))),
    ]
}

// ---- Services and endpoints. ----

fn strings(values: &[Value]) -> Vec<&str> {
    values.iter().filter_map(Value::as_str).collect()
}

fn service_external_ip(svc: &Value, service_type: &str) -> String {
    let external_ips = strings(list(svc, &["spec", "externalIPs"]));
    match service_type {
        "ClusterIP" | "NodePort" => {
            if external_ips.is_empty() {
                "<none>".to_string()
            } else {
                external_ips.join(",")
            }
        }
        "LoadBalancer" => {
            // Server-side printing is wide, so upstream does not truncate this list.
            let mut ingress: Vec<&str> = list(svc, &["status", "loadBalancer", "ingress"])
                .iter()
                .filter_map(|i| match (string(i, &["ip"]), string(i, &["hostname"])) {
                    ("", "") => None,
                    ("", host) => Some(host),
                    (ip, _) => Some(ip),
                })
                .collect();
            ingress.sort_unstable();
            ingress.dedup();
            if !external_ips.is_empty() {
                let mut all = ingress;
                all.extend(external_ips);
                return all.join(",");
            }
            if ingress.is_empty() {
                "<pending>".to_string()
            } else {
                ingress.join(",")
            }
        }
        "ExternalName" => string(svc, &["spec", "externalName"]).to_string(),
        _ => "<unknown>".to_string(),
    }
}

fn service_ports(svc: &Value) -> String {
    let pieces: Vec<String> = list(svc, &["spec", "ports"])
        .iter()
        .map(|p| {
            let port = int(p, &["port"]);
            let protocol = str_at(p, &["protocol"])
                .filter(|s| !s.is_empty())
                .unwrap_or("TCP");
            let node_port = int(p, &["nodePort"]);
            if node_port > 0 {
                format!("{port}:{node_port}/{protocol}")
            } else {
                format!("{port}/{protocol}")
            }
        })
        .collect();
    if pieces.is_empty() {
        "<none>".to_string()
    } else {
        pieces.join(",")
    }
}

fn service_cells(svc: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let service_type = str_at(svc, &["spec", "type"])
        .filter(|s| !s.is_empty())
        .unwrap_or("ClusterIP");
    // Defaulting copies clusterIP into clusterIPs; the printer reads the latter.
    let cluster_ip = list(svc, &["spec", "clusterIPs"])
        .first()
        .and_then(Value::as_str)
        .or_else(|| str_at(svc, &["spec", "clusterIP"]).filter(|s| !s.is_empty()))
        .unwrap_or("<none>");
    vec![
        json!(name(svc)),
        json!(service_type),
        json!(cluster_ip),
        json!(service_external_ip(svc, service_type)),
        json!(service_ports(svc)),
        json!(age(svc, now)),
        json!(format_labels(map(svc, &["spec", "selector"]))),
    ]
}

/// Go's `net.JoinHostPort`.
fn join_host_port(host: &str, port: i64) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Upstream's `formatEndpoints` with every port: at most three addresses, then a count.
fn format_endpoints(endpoints: &Value) -> String {
    let subsets = list(endpoints, &["subsets"]);
    if subsets.is_empty() {
        return "<none>".to_string();
    }
    const MAX: usize = 3;
    let mut shown: Vec<String> = Vec::new();
    let mut more = false;
    let mut count = 0usize;
    for subset in subsets {
        let addresses = list(subset, &["addresses"]);
        let ports = list(subset, &["ports"]);
        if ports.is_empty() {
            // Headless services may have no ports.
            count += addresses.len();
            for address in addresses {
                if shown.len() == MAX {
                    more = true;
                    break;
                }
                shown.push(string(address, &["ip"]).to_string());
            }
            continue;
        }
        for port in ports {
            count += addresses.len();
            for address in addresses {
                if shown.len() == MAX {
                    more = true;
                    break;
                }
                shown.push(join_host_port(
                    string(address, &["ip"]),
                    int(port, &["port"]),
                ));
            }
        }
    }
    let joined = shown.join(",");
    if more {
        format!("{joined} + {} more...", count.saturating_sub(MAX))
    } else {
        joined
    }
}

/// Upstream's `listWithMoreString`.
fn list_with_more(shown: &[String], more: bool, count: usize, max: usize) -> String {
    let joined = shown.join(",");
    if more {
        return format!("{joined} + {} more...", count.saturating_sub(max));
    }
    if joined.is_empty() {
        "<unset>".to_string()
    } else {
        joined
    }
}

fn format_discovery_ports(ports: &[Value]) -> String {
    const MAX: usize = 3;
    let mut shown = Vec::new();
    let mut more = false;
    for port in ports {
        if shown.len() < MAX {
            let text = match (
                at(port, &["port"]).and_then(Value::as_i64),
                str_at(port, &["name"]),
            ) {
                (Some(n), _) => n.to_string(),
                (None, Some(name)) => name.to_string(),
                (None, None) => "*".to_string(),
            };
            shown.push(text);
        } else if shown.len() == MAX {
            more = true;
        }
    }
    list_with_more(&shown, more, ports.len(), MAX)
}

fn format_discovery_endpoints(endpoints: &[Value]) -> String {
    const MAX: usize = 3;
    let mut shown = Vec::new();
    let mut more = false;
    let mut count = 0;
    for endpoint in endpoints {
        for address in list(endpoint, &["addresses"]) {
            if shown.len() < MAX {
                shown.push(address.as_str().unwrap_or("").to_string());
            } else if shown.len() == MAX {
                more = true;
            }
            count += 1;
        }
    }
    list_with_more(&shown, more, count, MAX)
}

// ---- Secrets. ----

fn secret_cells(secret: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let secret_type = str_at(secret, &["type"])
        .filter(|s| !s.is_empty())
        .unwrap_or("Opaque");
    // Decoding merges stringData into data, so a key in both counts once.
    let data = map(secret, &["data"]);
    let extra = map(secret, &["stringData"])
        .into_iter()
        .flatten()
        .filter(|(k, _)| !data.is_some_and(|d| d.contains_key(*k)))
        .count();
    vec![
        json!(name(secret)),
        json!(secret_type),
        json!(map_len(secret, &["data"]) + extra),
        json!(age(secret, now)),
    ]
}

// ---- Events. ----

fn event_cells(event: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let first = match timestamp(event, &["firstTimestamp"]) {
        Some(t) => since(Some(t), now),
        None => since(timestamp(event, &["eventTime"]), now),
    };
    let mut last = match timestamp(event, &["lastTimestamp"]) {
        Some(t) => since(Some(t), now),
        None => first.clone(),
    };
    let mut count = int(event, &["count"]);
    if present(event, &["series"]) {
        last = since(timestamp(event, &["series", "lastObservedTime"]), now);
        count = int(event, &["series", "count"]);
    } else if count == 0 {
        // Events of the newer API leave count unset for a single occurrence.
        count = 1;
    }
    let kind = string(event, &["involvedObject", "kind"]).to_lowercase();
    let target = match string(event, &["involvedObject", "name"]) {
        "" => kind,
        object => format!("{kind}/{object}"),
    };
    let component = first_non_empty(
        string(event, &["source", "component"]),
        string(event, &["reportingComponent"]),
    );
    let instance = first_non_empty(
        string(event, &["source", "host"]),
        string(event, &["reportingInstance"]),
    );
    let source = if instance.is_empty() {
        component.to_string()
    } else {
        format!("{component}, {instance}")
    };
    vec![
        json!(last),
        json!(string(event, &["type"])),
        json!(string(event, &["reason"])),
        json!(target),
        json!(string(event, &["involvedObject", "fieldPath"])),
        json!(source),
        json!(string(event, &["message"]).trim()),
        json!(first),
        json!(count),
        json!(name(event)),
    ]
}

fn first_non_empty<'a>(a: &'a str, b: &'a str) -> &'a str {
    if a.is_empty() { b } else { a }
}

// ---- Workloads. ----

/// `spec.replicas`, which defaulting sets to 1 when absent.
fn desired_replicas(obj: &Value) -> i64 {
    match at(obj, &["spec", "replicas"]) {
        None | Some(Value::Null) => 1,
        Some(v) => v.as_i64().unwrap_or(0),
    }
}

fn deployment_cells(deployment: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let (names, images) = container_cells(list(
        deployment,
        &["spec", "template", "spec", "containers"],
    ));
    let selector = match LabelSelector::from_json(
        at(deployment, &["spec", "selector"]).unwrap_or(&Value::Null),
    ) {
        Ok(s) => s.to_string(),
        Err(_) => "<invalid>".to_string(),
    };
    vec![
        json!(name(deployment)),
        json!(format!(
            "{}/{}",
            int(deployment, &["status", "readyReplicas"]),
            desired_replicas(deployment)
        )),
        json!(int(deployment, &["status", "updatedReplicas"])),
        json!(int(deployment, &["status", "availableReplicas"])),
        json!(age(deployment, now)),
        json!(names),
        json!(images),
        json!(selector),
    ]
}

fn replicaset_cells(rs: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let (names, images) = container_cells(list(rs, &["spec", "template", "spec", "containers"]));
    // Upstream's metav1.FormatLabelSelector.
    let selector =
        match LabelSelector::from_json(at(rs, &["spec", "selector"]).unwrap_or(&Value::Null)) {
            Ok(s) if s.is_empty() => "<none>".to_string(),
            Ok(s) => s.to_string(),
            Err(_) => "<error>".to_string(),
        };
    vec![
        json!(name(rs)),
        json!(desired_replicas(rs)),
        json!(int(rs, &["status", "replicas"])),
        json!(int(rs, &["status", "readyReplicas"])),
        json!(age(rs, now)),
        json!(names),
        json!(images),
        json!(selector),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::BUILTIN;

    fn def(plural: &str) -> &'static ResourceDef {
        BUILTIN
            .iter()
            .find(|r| r.plural == plural)
            .unwrap_or_else(|| panic!("no builtin {plural}"))
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2024-05-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn ago(seconds: i64) -> String {
        (now() - Duration::seconds(seconds))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    }

    fn row(plural: &str, obj: Value) -> Vec<Value> {
        let cells = cells(def(plural), &obj, now());
        assert_eq!(
            cells.len(),
            columns(def(plural)).len(),
            "{plural}: {cells:?}"
        );
        cells
    }

    fn names(plural: &str) -> Vec<(&'static str, i32)> {
        columns(def(plural))
            .iter()
            .map(|c| (c.name, c.priority))
            .collect()
    }

    #[test]
    fn human_duration_matches_upstream() {
        let cases: &[(i64, &str)] = &[
            (-3, "<invalid>"),
            (-2, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (5, "5s"),
            (119, "119s"),
            (120, "2m"),
            (150, "2m30s"),
            (599, "9m59s"),
            (600, "10m"),
            (3 * 3600 - 1, "179m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 120, "3h2m"),
            (8 * 3600, "8h"),
            (47 * 3600 + 59 * 60, "47h"),
            (48 * 3600, "2d"),
            (50 * 3600, "2d2h"),
            (8 * 86400, "8d"),
            (729 * 86400, "729d"),
            (730 * 86400, "2y"),
            (760 * 86400, "2y30d"),
            (8 * 365 * 86400, "8y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(Duration::seconds(*secs)), *want, "{secs}s");
        }
        assert_eq!(human_duration(Duration::milliseconds(-1500)), "0s");
        assert_eq!(human_duration(Duration::milliseconds(1999)), "1s");
        // Go's durations saturate at about 292 years.
        assert_eq!(human_duration(Duration::days(365 * 1000)), "292y");
        assert_eq!(human_duration(Duration::days(-365 * 1000)), "<invalid>");
    }

    #[test]
    fn column_sets_match_upstream() {
        assert_eq!(
            names("pods"),
            vec![
                ("Name", 0),
                ("Ready", 0),
                ("Status", 0),
                ("Restarts", 0),
                ("Age", 0),
                ("IP", 1),
                ("Node", 1),
                ("Nominated Node", 1),
                ("Readiness Gates", 1)
            ]
        );
        assert_eq!(
            names("events"),
            vec![
                ("Last Seen", 0),
                ("Type", 0),
                ("Reason", 0),
                ("Object", 0),
                ("Subobject", 1),
                ("Source", 1),
                ("Message", 0),
                ("First Seen", 1),
                ("Count", 1),
                ("Name", 1)
            ]
        );
        assert_eq!(
            names("nodes"),
            vec![
                ("Name", 0),
                ("Status", 0),
                ("Roles", 0),
                ("Age", 0),
                ("Version", 0),
                ("Internal-IP", 1),
                ("External-IP", 1),
                ("OS-Image", 1),
                ("Kernel-Version", 1),
                ("Container-Runtime", 1)
            ]
        );
        assert_eq!(
            names("leases"),
            vec![("Name", 0), ("Holder", 0), ("Age", 0)]
        );
        for r in BUILTIN {
            let cols = columns(r);
            assert_eq!(
                cols.iter().filter(|c| c.format == "name").count(),
                1,
                "{}",
                r.plural
            );
            assert!(cols.iter().all(|c| !c.description.is_empty()));
        }
    }

    #[test]
    fn column_definitions_json() {
        let defs = column_definitions(def("leases"));
        assert_eq!(defs[0]["name"], "Name");
        assert_eq!(defs[0]["format"], "name");
        assert_eq!(defs[0]["type"], "string");
        assert_eq!(defs[0]["priority"], 0);
        assert_eq!(defs[1]["format"], "");
        assert_eq!(defs.as_array().map(Vec::len), Some(3));
        let ev = column_definitions(def("events"));
        assert_eq!(ev[9]["name"], "Name");
        assert_eq!(ev[9]["priority"], 1);
        assert_eq!(ev[9]["format"], "name");
    }

    #[test]
    fn running_pod() {
        let cells = row(
            "pods",
            json!({
                "metadata": {"name": "web", "creationTimestamp": ago(300)},
                "spec": {"nodeName": "n1", "containers": [{"name": "a"}, {"name": "b"}]},
                "status": {
                    "phase": "Running",
                    "podIP": "10.0.0.5",
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "containerStatuses": [
                        {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {}}},
                        {"name": "b", "ready": true, "restartCount": 2,
                         "state": {"running": {}},
                         "lastState": {"terminated": {"exitCode": 1, "finishedAt": ago(600)}}}
                    ]
                }
            }),
        );
        assert_eq!(
            cells,
            vec![
                json!("web"),
                json!("2/2"),
                json!("Running"),
                json!("2 (10m ago)"),
                json!("5m"),
                json!("10.0.0.5"),
                json!("n1"),
                json!("<none>"),
                json!("<none>")
            ]
        );
    }

    #[test]
    fn pending_and_container_creating() {
        let cells = row(
            "pods",
            json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "a"}]},
                "status": {"phase": "Pending"}
            }),
        );
        assert_eq!(cells[1], "0/1");
        assert_eq!(cells[2], "Pending");
        assert_eq!(cells[3], "0");
        assert_eq!(cells[4], "<unknown>");
        assert_eq!(cells[5], "<none>");
        assert_eq!(cells[6], "<none>");

        let cells = row(
            "pods",
            json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "a"}]},
                "status": {"phase": "Pending", "containerStatuses": [
                    {"name": "a", "state": {"waiting": {"reason": "ContainerCreating"}}}
                ]}
            }),
        );
        assert_eq!(cells[2], "ContainerCreating");
    }

    #[test]
    fn crash_loop_and_terminated_reasons() {
        let pod = |state: Value| {
            json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "a"}]},
                "status": {"phase": "Running", "containerStatuses": [
                    {"name": "a", "restartCount": 4, "state": state}
                ]}
            })
        };
        let cells = row(
            "pods",
            pod(json!({"waiting": {"reason": "CrashLoopBackOff"}})),
        );
        assert_eq!(cells[2], "CrashLoopBackOff");
        // No last termination time: the count alone.
        assert_eq!(cells[3], "4");
        assert_eq!(
            row("pods", pod(json!({"terminated": {"reason": "Completed"}})))[2],
            "Completed"
        );
        assert_eq!(
            row("pods", pod(json!({"terminated": {"exitCode": 3}})))[2],
            "ExitCode:3"
        );
        assert_eq!(
            row(
                "pods",
                pod(json!({"terminated": {"exitCode": 3, "signal": 9}}))
            )[2],
            "Signal:9"
        );
    }

    #[test]
    fn completed_with_running_sidecar_container() {
        let pod = |ready_condition: &str| {
            json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
                "status": {"phase": "Running",
                    "conditions": [{"type": "Ready", "status": ready_condition}],
                    "containerStatuses": [
                        {"name": "a", "state": {"terminated": {"reason": "Completed"}}},
                        {"name": "b", "ready": true, "state": {"running": {}}}
                    ]}
            })
        };
        // Statuses are walked from the last, so "a" sets Completed after "b" ran.
        assert_eq!(row("pods", pod("True"))[2], "Running");
        assert_eq!(row("pods", pod("False"))[2], "NotReady");
        assert_eq!(row("pods", pod("True"))[1], "1/2");
    }

    #[test]
    fn init_container_progress() {
        let pod = |statuses: Value| {
            json!({
                "metadata": {"name": "p"},
                "spec": {"initContainers": [{"name": "i1"}, {"name": "i2"}],
                         "containers": [{"name": "a"}]},
                "status": {"phase": "Pending", "initContainerStatuses": statuses,
                           "containerStatuses": [{"name": "a", "restartCount": 7,
                               "state": {"waiting": {"reason": "PodInitializing"}}}]}
            })
        };
        let cells = row(
            "pods",
            pod(json!([
                {"name": "i1", "state": {"terminated": {"exitCode": 0}}},
                {"name": "i2", "restartCount": 1, "state": {"running": {}}}
            ])),
        );
        assert_eq!(cells[2], "Init:1/2");
        // While initializing, only init containers' restarts count.
        assert_eq!(cells[3], "1");
        assert_eq!(
            row(
                "pods",
                pod(json!([{"name": "i1", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]))
            )[2],
            "Init:ImagePullBackOff"
        );
        assert_eq!(
            row(
                "pods",
                pod(json!([{"name": "i1", "state": {"waiting": {"reason": "PodInitializing"}}}]))
            )[2],
            "Init:0/2"
        );
        assert_eq!(
            row(
                "pods",
                pod(json!([{"name": "i1", "state": {"terminated": {"exitCode": 2}}}]))
            )[2],
            "Init:ExitCode:2"
        );
        assert_eq!(
            row(
                "pods",
                pod(
                    json!([{"name": "i1", "state": {"terminated": {"exitCode": 2, "signal": 15}}}])
                )
            )[2],
            "Init:Signal:15"
        );
        assert_eq!(
            row(
                "pods",
                pod(
                    json!([{"name": "i1", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}])
                )
            )[2],
            "Init:Error"
        );
        // Once all init containers are done, the app containers decide.
        let done = row(
            "pods",
            pod(json!([
                {"name": "i1", "state": {"terminated": {"exitCode": 0}}},
                {"name": "i2", "state": {"terminated": {"exitCode": 0}}}
            ])),
        );
        assert_eq!(done[2], "PodInitializing");
        assert_eq!(done[3], "7");
    }

    #[test]
    fn restartable_init_containers_count_as_containers() {
        let cells = row(
            "pods",
            json!({
                "metadata": {"name": "p"},
                "spec": {"initContainers": [{"name": "side", "restartPolicy": "Always"}],
                         "containers": [{"name": "a"}]},
                "status": {"phase": "Running",
                    "conditions": [{"type": "Initialized", "status": "True"}],
                    "initContainerStatuses": [{"name": "side", "started": true, "ready": true,
                        "restartCount": 3, "state": {"running": {}},
                        "lastState": {"terminated": {"finishedAt": ago(7200)}}}],
                    "containerStatuses": [{"name": "a", "ready": true, "restartCount": 1,
                        "state": {"running": {}},
                        "lastState": {"terminated": {"finishedAt": ago(60)}}}]}
            }),
        );
        assert_eq!(cells[1], "2/2");
        assert_eq!(cells[2], "Running");
        assert_eq!(cells[3], "4 (60s ago)");
    }

    #[test]
    fn terminating_scheduling_gated_and_node_lost() {
        let base = |extra_meta: Value, status: Value| {
            let mut pod = json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "a"}]},
                "status": status
            });
            if let (Some(m), Some(extra)) =
                (pod["metadata"].as_object_mut(), extra_meta.as_object())
            {
                m.extend(extra.clone());
            }
            pod
        };
        let deleting = json!({"deletionTimestamp": ago(1)});
        assert_eq!(
            row("pods", base(deleting.clone(), json!({"phase": "Running"})))[2],
            "Terminating"
        );
        assert_eq!(
            row(
                "pods",
                base(deleting.clone(), json!({"phase": "Succeeded"}))
            )[2],
            "Succeeded"
        );
        assert_eq!(
            row(
                "pods",
                base(deleting, json!({"phase": "Running", "reason": "NodeLost"}))
            )[2],
            "Unknown"
        );
        assert_eq!(
            row(
                "pods",
                base(
                    json!({}),
                    json!({"phase": "Pending", "conditions": [
                        {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}
                    ]})
                )
            )[2],
            "SchedulingGated"
        );
        assert_eq!(
            row(
                "pods",
                base(json!({}), json!({"phase": "Failed", "reason": "Evicted"}))
            )[2],
            "Evicted"
        );
    }

    #[test]
    fn pod_wide_columns() {
        let cells = row(
            "pods",
            json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [], "readinessGates": [
                    {"conditionType": "a"}, {"conditionType": "b"}, {"conditionType": "c"}
                ]},
                "status": {
                    "podIPs": [{"ip": "fd00::1"}, {"ip": "10.0.0.1"}],
                    "nominatedNodeName": "n2",
                    "conditions": [
                        {"type": "a", "status": "True"},
                        {"type": "b", "status": "False"},
                        {"type": "a", "status": "False"}
                    ]
                }
            }),
        );
        assert_eq!(cells[1], "0/0");
        assert_eq!(cells[2], "");
        assert_eq!(cells[5], "fd00::1");
        assert_eq!(cells[7], "n2");
        assert_eq!(cells[8], "1/3");
    }

    #[test]
    fn malformed_objects_do_not_panic() {
        let junk = [
            json!(null),
            json!(42),
            json!("pod"),
            json!([]),
            json!({"metadata": "x", "spec": [], "status": 7}),
            json!({"metadata": {"name": 5, "creationTimestamp": "yesterday", "labels": []},
                   "spec": {"containers": "a", "initContainers": [1, null],
                            "ports": {"a": 1}, "selector": "x", "replicas": "3",
                            "template": {"spec": {"containers": [{"name": 1}]}}},
                   "status": {"containerStatuses": [null, 3, {"state": "x"}],
                              "initContainerStatuses": [{"state": {"terminated": 1}}],
                              "conditions": {"type": "Ready"}, "addresses": [1],
                              "loadBalancer": {"ingress": [{}]}},
                   "subsets": [{"addresses": [{}], "ports": [{}]}, 1],
                   "ports": [null], "endpoints": [{"addresses": [1]}],
                   "series": 1, "involvedObject": "x"}),
        ];
        for r in BUILTIN {
            for obj in &junk {
                let cells = cells(r, obj, now());
                assert_eq!(cells.len(), columns(r).len(), "{}", r.plural);
            }
        }
    }

    #[test]
    fn nodes() {
        let node = |conditions: Value, unschedulable: bool, labels: Value| {
            json!({
                "metadata": {"name": "n1", "creationTimestamp": ago(3 * 86400), "labels": labels},
                "spec": {"unschedulable": unschedulable},
                "status": {
                    "conditions": conditions,
                    "nodeInfo": {"kubeletVersion": "v1.33.0", "osImage": "Debian",
                                 "kernelVersion": "6.1", "containerRuntimeVersion": "containerd://2.0"},
                    "addresses": [{"type": "Hostname", "address": "n1"},
                                  {"type": "InternalIP", "address": "192.168.0.2"}]
                }
            })
        };
        let cells = row(
            "nodes",
            node(
                json!([{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": "True"}]),
                false,
                json!({"node-role.kubernetes.io/control-plane": "", "node-role.kubernetes.io/": "",
                       "kubernetes.io/role": "master"}),
            ),
        );
        assert_eq!(
            cells,
            vec![
                json!("n1"),
                json!("Ready"),
                json!("control-plane,master"),
                json!("3d"),
                json!("v1.33.0"),
                json!("192.168.0.2"),
                json!("<none>"),
                json!("Debian"),
                json!("6.1"),
                json!("containerd://2.0")
            ]
        );
        let cells = row(
            "nodes",
            node(
                json!([{"type": "Ready", "status": "Unknown"}]),
                true,
                json!({}),
            ),
        );
        assert_eq!(cells[1], "NotReady,SchedulingDisabled");
        assert_eq!(cells[2], "<none>");
        let cells = row("nodes", json!({"metadata": {"name": "bare"}}));
        assert_eq!(cells[1], "Unknown");
        assert_eq!(cells[4], "");
        assert_eq!(cells[7], "<unknown>");
        assert_eq!(cells[5], "<none>");
    }

    #[test]
    fn namespaces_configmaps_secrets_serviceaccounts_leases() {
        assert_eq!(
            row(
                "namespaces",
                json!({"metadata": {"name": "default", "creationTimestamp": ago(45)},
                       "status": {"phase": "Active"}})
            ),
            vec![json!("default"), json!("Active"), json!("45s")]
        );
        assert_eq!(
            row(
                "configmaps",
                json!({"metadata": {"name": "c"}, "data": {"a": "1", "b": "2"}, "binaryData": {"c": ""}})
            ),
            vec![json!("c"), json!(3), json!("<unknown>")]
        );
        assert_eq!(
            row(
                "secrets",
                json!({"metadata": {"name": "s"}, "type": "kubernetes.io/tls",
                       "data": {"tls.crt": "", "tls.key": ""}, "stringData": {"tls.key": "x", "ca": "y"}})
            ),
            vec![
                json!("s"),
                json!("kubernetes.io/tls"),
                json!(3),
                json!("<unknown>")
            ]
        );
        assert_eq!(
            row("secrets", json!({"metadata": {"name": "s"}}))[1],
            "Opaque"
        );
        assert_eq!(
            row(
                "serviceaccounts",
                json!({"metadata": {"name": "default"}, "secrets": [{"name": "t"}]})
            )[1],
            1
        );
        assert_eq!(
            row(
                "leases",
                json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "me_123"}})
            ),
            vec![json!("l"), json!("me_123"), json!("<unknown>")]
        );
        assert_eq!(row("leases", json!({"metadata": {"name": "l"}}))[1], "");
    }

    #[test]
    fn services() {
        let cells = row(
            "services",
            json!({
                "metadata": {"name": "web", "creationTimestamp": ago(7200)},
                "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                         "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"},
                                   {"port": 53, "protocol": "UDP"}],
                         "selector": {"app": "web", "a.b": "c"}}
            }),
        );
        assert_eq!(
            cells,
            vec![
                json!("web"),
                json!("NodePort"),
                json!("10.96.0.10"),
                json!("<none>"),
                json!("80:30080/TCP,53/UDP"),
                json!("120m"),
                json!("a.b=c,app=web")
            ]
        );
        let cells = row(
            "services",
            json!({"metadata": {"name": "kubernetes"},
                   "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 443}]}}),
        );
        assert_eq!(cells[1], "ClusterIP");
        assert_eq!(cells[2], "10.96.0.1");
        assert_eq!(cells[4], "443/TCP");
        assert_eq!(cells[6], "<none>");
        let bare = row("services", json!({"metadata": {"name": "x"}}));
        assert_eq!(bare[2], "<none>");
        assert_eq!(bare[4], "<none>");

        let lb = |external: Value, ingress: Value| {
            row(
                "services",
                json!({"metadata": {"name": "lb"},
                       "spec": {"type": "LoadBalancer", "externalIPs": external},
                       "status": {"loadBalancer": {"ingress": ingress}}}),
            )[3]
            .clone()
        };
        assert_eq!(lb(json!([]), json!([])), "<pending>");
        assert_eq!(
            lb(
                json!([]),
                json!([{"ip": "5.6.7.8"}, {"hostname": "a.example.com"}, {"ip": "1.2.3.4"}])
            ),
            "1.2.3.4,5.6.7.8,a.example.com"
        );
        assert_eq!(
            lb(json!(["9.9.9.9"]), json!([{"ip": "1.2.3.4"}])),
            "1.2.3.4,9.9.9.9"
        );
        assert_eq!(
            row(
                "services",
                json!({"metadata": {"name": "ext"},
                       "spec": {"type": "ExternalName", "externalName": "db.example.com"}})
            )[3],
            "db.example.com"
        );
        assert_eq!(
            row(
                "services",
                json!({"metadata": {"name": "c"},
                       "spec": {"type": "ClusterIP", "externalIPs": ["1.1.1.1", "2.2.2.2"]}})
            )[3],
            "1.1.1.1,2.2.2.2"
        );
        assert_eq!(
            row("services", json!({"spec": {"type": "Weird"}}))[3],
            "<unknown>"
        );
    }

    #[test]
    fn endpoints() {
        let cells = row(
            "endpoints",
            json!({"metadata": {"name": "web"}, "subsets": [
                {"addresses": [{"ip": "10.0.0.1"}, {"ip": "fd00::2"}],
                 "ports": [{"port": 80}, {"port": 443}]},
                {"addresses": [{"ip": "10.0.0.3"}]}
            ]}),
        );
        assert_eq!(
            cells[1],
            "10.0.0.1:80,[fd00::2]:80,10.0.0.1:443 + 2 more..."
        );
        assert_eq!(
            row(
                "endpoints",
                json!({"metadata": {"name": "h"}, "subsets": [{"addresses": [{"ip": "10.0.0.1"}]}]})
            )[1],
            "10.0.0.1"
        );
        assert_eq!(
            row("endpoints", json!({"metadata": {"name": "e"}}))[1],
            "<none>"
        );
        assert_eq!(
            row(
                "endpoints",
                json!({"metadata": {"name": "e"}, "subsets": [{}]})
            )[1],
            ""
        );
    }

    #[test]
    fn endpoint_slices() {
        let cells = row(
            "endpointslices",
            json!({"metadata": {"name": "web-abc"}, "addressType": "IPv4",
                   "ports": [{"port": 80}, {"name": "https"}, {}, {"port": 9090}],
                   "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2", "10.0.0.3", "10.0.0.4"]}]}),
        );
        assert_eq!(cells[1], "IPv4");
        assert_eq!(cells[2], "80,https,* + 1 more...");
        assert_eq!(cells[3], "10.0.0.1,10.0.0.2,10.0.0.3 + 1 more...");
        let empty = row("endpointslices", json!({"metadata": {"name": "e"}}));
        assert_eq!(empty[2], "<unset>");
        assert_eq!(empty[3], "<unset>");
    }

    #[test]
    fn events() {
        let cells = row(
            "events",
            json!({
                "metadata": {"name": "web.17a", "creationTimestamp": ago(600)},
                "involvedObject": {"kind": "Pod", "name": "web", "fieldPath": "spec.containers{a}"},
                "reason": "Pulled", "type": "Normal", "message": "  pulled image\n",
                "source": {"component": "kubelet", "host": "n1"},
                "firstTimestamp": ago(600), "lastTimestamp": ago(30), "count": 3
            }),
        );
        assert_eq!(
            cells,
            vec![
                json!("30s"),
                json!("Normal"),
                json!("Pulled"),
                json!("pod/web"),
                json!("spec.containers{a}"),
                json!("kubelet, n1"),
                json!("pulled image"),
                json!("10m"),
                json!(3),
                json!("web.17a")
            ]
        );
        // An events.k8s.io-style event: eventTime, series and reporting fields.
        let cells = row(
            "events",
            json!({
                "metadata": {"name": "e"},
                "involvedObject": {"kind": "Node"},
                "eventTime": "2024-05-01T11:55:00.123456Z",
                "series": {"count": 9, "lastObservedTime": "2024-05-01T11:59:00.000000Z"},
                "reportingComponent": "scheduler"
            }),
        );
        assert_eq!(cells[0], "60s");
        assert_eq!(cells[3], "node");
        assert_eq!(cells[5], "scheduler");
        // Microsecond precision: 4m59.877s before now.
        assert_eq!(cells[7], "4m59s");
        assert_eq!(cells[8], 9);
        let single = row("events", json!({"metadata": {"name": "e"}}));
        assert_eq!(single[0], "<unknown>");
        assert_eq!(single[7], "<unknown>");
        assert_eq!(single[8], 1);
        assert_eq!(single[5], "");
    }

    #[test]
    fn deployments_and_replicasets() {
        let cells = row(
            "deployments",
            json!({
                "metadata": {"name": "web", "creationTimestamp": ago(86400)},
                "spec": {"replicas": 3,
                         "selector": {"matchLabels": {"app": "web"}},
                         "template": {"spec": {"containers": [
                             {"name": "nginx", "image": "nginx:1.27"},
                             {"name": "side", "image": "busybox"}]}}},
                "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}
            }),
        );
        assert_eq!(
            cells,
            vec![
                json!("web"),
                json!("2/3"),
                json!(3),
                json!(2),
                json!("24h"),
                json!("nginx,side"),
                json!("nginx:1.27,busybox"),
                json!("app=web")
            ]
        );
        let bare = row("deployments", json!({"metadata": {"name": "d"}}));
        assert_eq!(bare[1], "0/1");
        assert_eq!(bare[7], "");
        let invalid = row(
            "deployments",
            json!({"spec": {"selector": {"matchExpressions": [{"key": "a", "operator": "Bad"}]}}}),
        );
        assert_eq!(invalid[7], "<invalid>");

        let cells = row(
            "replicasets",
            json!({
                "metadata": {"name": "web-5d9", "creationTimestamp": ago(90)},
                "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "web", "pod-template-hash": "5d9"}},
                         "template": {"spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}},
                "status": {"replicas": 1}
            }),
        );
        assert_eq!(
            cells,
            vec![
                json!("web-5d9"),
                json!(0),
                json!(1),
                json!(0),
                json!("90s"),
                json!("nginx"),
                json!("nginx"),
                json!("app=web,pod-template-hash=5d9")
            ]
        );
        let bare = row("replicasets", json!({"metadata": {"name": "r"}}));
        assert_eq!(bare[1], 1);
        assert_eq!(bare[7], "<none>");
        let invalid = row(
            "replicasets",
            json!({"spec": {"selector": {"matchLabels": {"bad key": "x"}}}}),
        );
        assert_eq!(invalid[7], "<error>");
    }

    #[test]
    fn default_table() {
        static WIDGETS: ResourceDef = ResourceDef {
            group: "example.com",
            version: "v1",
            kind: "Widget",
            plural: "widgets",
            singular: "widget",
            namespaced: true,
            short_names: &[],
            categories: &[],
            definition: "com.example.v1.Widget",
            subresources: &[],
            field_selectors: &[],
            status: false,
            generation: false,
            storage: "widgets",
        };
        let cols = columns(&WIDGETS);
        assert_eq!(cols.len(), 2);
        assert_eq!(cols[1].name, "Created At");
        assert_eq!(cols[1].type_, "date");
        assert_eq!(
            cells(
                &WIDGETS,
                &json!({"metadata": {"name": "w", "creationTimestamp": "2024-05-01T14:00:00+02:00"}}),
                now()
            ),
            vec![json!("w"), json!("2024-05-01T12:00:00Z")]
        );
        assert_eq!(
            cells(&WIDGETS, &json!({}), now()),
            vec![json!(""), json!("0001-01-01T00:00:00Z")]
        );
    }

    #[test]
    fn future_and_zero_timestamps() {
        let future = (now() + Duration::seconds(30))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        assert_eq!(
            row(
                "leases",
                json!({"metadata": {"name": "l", "creationTimestamp": future}})
            )[2],
            "<invalid>"
        );
        assert_eq!(
            row(
                "leases",
                json!({"metadata": {"name": "l", "creationTimestamp": "0001-01-01T00:00:00Z"}})
            )[2],
            "<unknown>"
        );
    }
}
