//! Canopy's controllers. Each one reads the API through kube-rs watches, decides, and
//! writes back through the API, as upstream's controllers do.

pub mod namespace;
pub mod tenant;
