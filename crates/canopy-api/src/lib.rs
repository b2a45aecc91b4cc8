//! Canopy's API machinery, without I/O: what the resources are, what their objects may
//! contain, how they default, validate, patch, merge and print.
//!
//! Objects are handled as JSON values (`serde_json::Value`) shaped by the schemas of
//! k8s-openapi's types, so one generic REST implementation serves every kind.

#![deny(missing_docs)]

pub mod fieldmanager;
mod generated;
pub mod kinds;
pub mod meta;
pub mod patch;
pub mod protobuf;
pub mod quantity;
pub mod registry;
pub mod schema;
pub mod selector;
pub mod status;
pub mod table;
pub mod tenant;

pub use registry::{Registry, ResourceDef, Subresource};
pub use status::{ApiError, ApiResult, Cause, Target};

/// The Kubernetes version Canopy serves the API of. kubectl's version dispatcher picks its
/// binary from the minor version.
pub const KUBERNETES_MAJOR: &str = "1";
/// See [`KUBERNETES_MAJOR`].
pub const KUBERNETES_MINOR: &str = "33";

/// The Node annotation where a node agent publishes the hex SHA-256 of its serving
/// certificate (DER): the API server pins it when it calls the agent. Only the node itself
/// (or an administrator) can write its Node.
pub const AGENT_SERVING_CERT_ANNOTATION: &str = "canopy.io/agent-serving-cert-sha256";

/// The user (certificate CN) of the API server towards node agents: the only caller an agent
/// serves, as upstream's kubelet serves its apiserver's kubelet-client identity.
pub const AGENT_API_CLIENT_USER: &str = "canopy:apiserver-node-client";

/// The pod's NIC in its tenant's network, recorded on the pod by the cloud controller and
/// plugged into the pod by the node agent's CNI plugin (JSON: name, device, ip, prefix, mac,
/// gateway).
pub const POD_PORT_ANNOTATION: &str = "canopy.io/port";

/// A pod asks for a public IP with this annotation set to `"true"`: the cloud controller
/// binds one to the pod's port, and the pod is reached at it from the public network.
pub const POD_PUBLIC_IP_ANNOTATION: &str = "canopy.io/public-ip";

/// The public IP the cloud controller bound to the pod (set by it; read it, e.g. through
/// the downward API, to learn the pod's public address).
pub const POD_PUBLIC_IP_ADDRESS_ANNOTATION: &str = "canopy.io/public-ip-address";
