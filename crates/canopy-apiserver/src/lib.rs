//! Canopy's Kubernetes-compatible API server.
//!
//! Request flow: TLS (client certificates identify users) → authentication and authorization
//! ([`auth`]) → routing ([`request`]) → the generic REST layer ([`rest`]), which reads from
//! the per-resource watch caches ([`cache`]) and writes to the store with compare-and-swap.
//! The caches follow the store through one watch per resource; every list and watch is served
//! from them.

pub mod auth;
pub mod authz;
mod body;
pub mod cache;
pub mod discovery;
pub mod keystone;
pub mod kubeconfig;
pub mod metrics;
pub mod nodeproxy;
pub mod openapi;
pub mod pki;
pub mod request;
pub mod rest;
pub mod server;
pub mod serviceaccount;
pub mod services;
pub mod tokenfile;

pub use server::{ApiServer, ServerConfig};
