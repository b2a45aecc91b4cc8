//! Writing kubeconfig files for Canopy's users and components.

use std::path::Path;

use anyhow::Result;
use base64::Engine;

use crate::pki::{CertPair, write_private};

/// Renders a kubeconfig with one cluster, one user (a client certificate) and one context.
pub fn render(server_url: &str, ca_pem: &str, client: &CertPair, user: &str) -> String {
    render_contexts(server_url, ca_pem, &[("canopy", user, client)])
}

/// Renders a kubeconfig with one cluster and a context per `(context, user, certificate)`;
/// the first is the current one.
pub fn render_contexts(
    server_url: &str,
    ca_pem: &str,
    contexts: &[(&str, &str, &CertPair)],
) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let users: Vec<_> = contexts
        .iter()
        .map(|(_, user, client)| {
            serde_json::json!({"name": user, "user": {
                "client-certificate-data": b64(&client.cert_pem),
                "client-key-data": b64(&client.key_pem),
            }})
        })
        .collect();
    let named: Vec<_> = contexts
        .iter()
        .map(|(name, user, _)| {
            serde_json::json!({"name": name, "context": {"cluster": "canopy", "user": user}})
        })
        .collect();
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "canopy", "cluster": {
            "server": server_url,
            "certificate-authority-data": b64(ca_pem),
        }}],
        "users": users,
        "contexts": named,
        "current-context": contexts.first().map_or("canopy", |c| c.0),
        "preferences": {},
    });
    serde_yaml::to_string(&config).unwrap_or_default()
}

/// Writes a kubeconfig readable only by its owner (it holds a private key).
pub fn write(
    path: &Path,
    server_url: &str,
    ca_pem: &str,
    client: &CertPair,
    user: &str,
) -> Result<()> {
    write_private(path, render(server_url, ca_pem, client, user).as_bytes())
}
