//! `canopy cni`: the agent's pod-network plugin as a standalone CNI 1.0 plugin, for container
//! runtimes that call plugins themselves (containerd, CRI-O). Installed as
//! `/opt/cni/bin/canopy` (a link to the `canopy` binary: invoked with `CNI_COMMAND` set and no
//! arguments, `canopy` is the plugin), with a network configuration such as
//! `{"cniVersion": "1.0.0", "name": "canopy", "type": "canopy", "kubeconfig": "/etc/canopy/node.kubeconfig"}`.
//!
//! ADD reads the pod's port from the pod (`CNI_ARGS`' `K8S_POD_NAMESPACE` and `K8S_POD_NAME`)
//! through the API with the node's kubeconfig, then does what the agent does in process
//! ([`canopy_agent::cni`]); DEL removes the interface; CHECK verifies it; VERSION lists the
//! versions spoken. Results and errors are CNI's JSON on stdout.

use std::{collections::HashMap, io::Read, path::PathBuf};

use canopy_agent::cni::{CniError, PortInfo};
use serde::Deserialize;
use serde_json::{Value, json};

const VERSIONS: &[&str] = &["0.4.0", "1.0.0"];

/// The network configuration on stdin: CNI's fields and ours.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[allow(dead_code)]
    name: String,
    /// The node's kubeconfig, to read pods' ports.
    kubeconfig: Option<PathBuf>,
}

/// Runs the plugin for the environment and stdin of this process; returns the exit code.
pub async fn main() -> i32 {
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let (version, result) = run(&env, &stdin).await;
    match result {
        Ok(Some(out)) => {
            println!("{out}");
            0
        }
        Ok(None) => 0,
        Err(error) => {
            println!(
                "{}",
                json!({"cniVersion": version, "code": error.code(), "msg": error.to_string()})
            );
            1
        }
    }
}

fn get<'a>(env: &'a HashMap<String, String>, name: &str) -> Result<&'a str, CniError> {
    env.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::Invalid(format!("{name} is not set")))
}

/// The named namespace `ip` can use: runtimes pin sandboxes under /run/netns or
/// /var/run/netns (the same directory).
fn netns_path(value: &str) -> Result<PathBuf, CniError> {
    let name = value
        .strip_prefix("/var/run/netns/")
        .or_else(|| value.strip_prefix("/run/netns/"))
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| {
            CniError::Invalid(format!(
                "CNI_NETNS {value:?}: the canopy plugin works with namespaces pinned under /run/netns"
            ))
        })?;
    Ok(PathBuf::from("/run/netns").join(name))
}

fn cni_args(env: &HashMap<String, String>) -> HashMap<String, String> {
    env.get("CNI_ARGS")
        .map(|a| {
            a.split(';')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

async fn pod_port(conf: &NetConf, args: &HashMap<String, String>) -> Result<PortInfo, CniError> {
    let (Some(namespace), Some(name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"))
    else {
        return Err(CniError::Invalid(
            "CNI_ARGS must name the pod (K8S_POD_NAMESPACE, K8S_POD_NAME)".into(),
        ));
    };
    let kubeconfig = conf.kubeconfig.as_ref().ok_or_else(|| {
        CniError::Invalid("the network configuration has no \"kubeconfig\"".into())
    })?;
    let client = crate::server::client_from(kubeconfig)
        .await
        .map_err(|e| CniError::Failed(format!("{e:#}")))?;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, namespace);
    let pod = pods
        .get(name)
        .await
        .map_err(|e| CniError::Failed(format!("reading pod {namespace}/{name}: {e}")))?;
    if let Some(uid) = args.get("K8S_POD_UID")
        && pod.metadata.uid.as_deref() != Some(uid.as_str())
    {
        return Err(CniError::Failed(format!(
            "pod {namespace}/{name} is not the one with uid {uid}"
        )));
    }
    PortInfo::of_pod(&pod)?.ok_or(CniError::NotReady)
}

/// The plugin's answer: `Ok(Some(json))` to print, or an error with the config's version.
async fn run(
    env: &HashMap<String, String>,
    stdin: &str,
) -> (String, Result<Option<Value>, CniError>) {
    let command = match get(env, "CNI_COMMAND") {
        Ok(c) => c.to_string(),
        Err(e) => return ("1.0.0".into(), Err(e)),
    };
    if command == "VERSION" {
        return (
            "1.0.0".into(),
            Ok(Some(
                json!({"cniVersion": "1.0.0", "supportedVersions": VERSIONS}),
            )),
        );
    }
    let conf: NetConf = match serde_json::from_str(stdin) {
        Ok(c) => c,
        Err(e) => {
            return (
                "1.0.0".into(),
                Err(CniError::Invalid(format!("network configuration: {e}"))),
            );
        }
    };
    let version = conf.cni_version.clone();
    if !VERSIONS.contains(&version.as_str()) {
        return (
            "1.0.0".into(),
            Err(CniError::Invalid(format!(
                "cniVersion {version:?} is not one of {VERSIONS:?}"
            ))),
        );
    }
    let result = async {
        let ifname = get(env, "CNI_IFNAME")?;
        match command.as_str() {
            "ADD" => {
                let netns = netns_path(get(env, "CNI_NETNS")?)?;
                let port = pod_port(&conf, &cni_args(env)).await?;
                let attached = canopy_agent::cni::add(&netns, ifname, &port).await?;
                let mut ips = vec![
                    json!({"address": format!("{}/{}", attached.ip, attached.prefix),
                    "gateway": attached.gateway.to_string(), "interface": 0}),
                ];
                if let Some(public) = attached.public_ip {
                    ips.push(json!({"address": format!("{public}/32"), "interface": 0}));
                }
                Ok(Some(json!({
                    "cniVersion": version,
                    "interfaces": [{"name": attached.interface, "mac": attached.mac,
                        "sandbox": netns.display().to_string()}],
                    "ips": ips,
                    "routes": [{"dst": "0.0.0.0/0", "gw": attached.gateway.to_string()}],
                    "dns": {}
                })))
            }
            "DEL" => {
                // DEL must succeed whatever is left, even without a namespace.
                if let Ok(netns) = get(env, "CNI_NETNS").and_then(netns_path) {
                    canopy_agent::cni::del(&netns, ifname).await?;
                }
                Ok(None)
            }
            "CHECK" => {
                let netns = netns_path(get(env, "CNI_NETNS")?)?;
                let port = pod_port(&conf, &cni_args(env)).await?;
                canopy_agent::cni::check(&netns, ifname, &port).await?;
                Ok(None)
            }
            "STATUS" | "GC" => Ok(None),
            other => Err(CniError::Invalid(format!("unknown CNI_COMMAND {other:?}"))),
        }
    }
    .await;
    (version, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn version_and_errors_follow_the_spec() {
        let (_, out) = run(&env(&[("CNI_COMMAND", "VERSION")]), "").await;
        assert_eq!(out.unwrap().unwrap()["supportedVersions"], json!(VERSIONS));
        let (_, out) = run(&env(&[]), "").await;
        assert_eq!(out.unwrap_err().code(), 7);
        let conf = r#"{"cniVersion": "1.0.0", "name": "canopy", "type": "canopy"}"#;
        let (version, out) = run(
            &env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/proc/1/ns/net"),
            ]),
            conf,
        )
        .await;
        assert_eq!(version, "1.0.0");
        assert_eq!(out.unwrap_err().code(), 7, "only pinned namespaces");
        let (_, out) = run(
            &env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/var/run/netns/x"),
            ]),
            conf,
        )
        .await;
        assert!(out.unwrap_err().to_string().contains("K8S_POD_NAMESPACE"));
        let old = r#"{"cniVersion": "0.3.1", "name": "canopy", "type": "canopy"}"#;
        let (_, out) = run(&env(&[("CNI_COMMAND", "ADD")]), old).await;
        assert_eq!(out.unwrap_err().code(), 7);
        // DEL of something long gone succeeds.
        let (_, out) = run(
            &env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/run/netns/does-not-exist"),
            ]),
            conf,
        )
        .await;
        assert!(out.unwrap().is_none());
    }
}
