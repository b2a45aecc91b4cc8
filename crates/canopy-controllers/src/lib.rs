//! Canopy's controllers. Each one reads the API through kube-rs watches (shared
//! [`informer`]s), decides, and writes back through the API, as upstream's controllers do;
//! their work goes through prioritised [`queue`]s (seed §6).

pub mod deployment;
pub mod endpoints;
pub mod endpointslice;
pub mod events;
pub mod garbagecollector;
pub mod informer;
pub mod manager;
pub mod namespace;
pub mod nodelifecycle;
pub mod pace;
pub mod podgc;
pub mod queue;
pub mod replicaset;
pub mod serviceaccount;
pub mod tenant;
pub mod util;
pub mod worker;
