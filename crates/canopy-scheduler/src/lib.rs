//! Canopy's scheduler (seed §5). Tenants never share nodes, so each tenant is scheduled over
//! its own nodes only, tenants in parallel, and no two decisions race for one node.
//!
//! `resources`, `node_info`, `filters`, `inter_pod_affinity`, `score` and `partition` are the
//! scheduling core without I/O (what a pod asks for, what a node has left, upstream's filters
//! and scores, a tenant's queue and decisions); `run` connects it to the API through kube-rs, `metrics` says how it goes, `watched` is the
//! slim pod its watch decodes.

pub mod filters;
pub mod inter_pod_affinity;
pub mod metrics;
pub mod node_info;
pub mod partition;
pub mod resources;
pub mod run;
pub mod score;
pub mod watched;
