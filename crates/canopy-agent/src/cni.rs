//! Pod networking from the IaaS (seed §8): the cloud controller creates a port (a NIC) in the
//! tenant's network for every pod, plugs it into the pod's VM and records it on the pod
//! ([`canopy_api::POD_PORT_ANNOTATION`]); this plugin moves that NIC from the VM into the
//! pod's network namespace, names it `eth0` and configures its address, MAC and routes. Pods
//! and VMs of a tenant then share one flat L2 network, with no overlay.
//!
//! The same operations serve the agent (in process, when it sets up a pod's sandbox) and the
//! standalone CNI 1.0 plugin (`canopy cni`): ADD, DEL and CHECK.

use std::{net::Ipv4Addr, path::Path};

use serde::{Deserialize, Serialize};

pub use canopy_api::POD_PORT_ANNOTATION;

/// A pod's port, as the cloud controller records it on the pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortInfo {
    /// The port's name in the IaaS.
    pub name: String,
    /// The interface's name inside the VM, where the plugin finds it.
    pub device: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub mac: String,
    pub gateway: Ipv4Addr,
    /// A public IP bound to the port: the pod carries it as a second address and sends
    /// from it to anything beyond its subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<Ipv4Addr>,
    /// The tenant's Service range, routed through the pod's node, whose proxy translates
    /// ClusterIPs (seed §9). Pods of a tenant share its L2 network, so without this route
    /// their Service traffic would go to the gateway, past every proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_route: Option<ServiceRoute>,
}

/// A route for the tenant's Services through the pod's node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRoute {
    /// The tenant's Service range, e.g. `10.96.0.0/12`.
    pub cidr: String,
    /// The node's address in the tenant's network.
    pub via: Ipv4Addr,
}

impl PortInfo {
    /// The port recorded on a pod, if any; a malformed record is an error.
    pub fn of_pod(pod: &k8s_openapi::api::core::v1::Pod) -> Result<Option<PortInfo>, CniError> {
        let Some(text) = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(POD_PORT_ANNOTATION))
        else {
            return Ok(None);
        };
        let port: PortInfo = serde_json::from_str(text)
            .map_err(|e| CniError::Invalid(format!("annotation {POD_PORT_ANNOTATION}: {e}")))?;
        port.validate()?;
        Ok(Some(port))
    }

    /// Refuses what `ip` would misread (the record comes from the API; be strict).
    fn validate(&self) -> Result<(), CniError> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 15
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !name_ok(&self.device) {
            return Err(CniError::Invalid(format!(
                "port device {:?} is not an interface name",
                self.device
            )));
        }
        if self.prefix == 0 || self.prefix > 30 {
            return Err(CniError::Invalid(format!(
                "port prefix /{} is out of range",
                self.prefix
            )));
        }
        let mac_ok = self.mac.len() == 17
            && self.mac.split(':').count() == 6
            && self
                .mac
                .split(':')
                .all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()));
        if !mac_ok {
            return Err(CniError::Invalid(format!(
                "port MAC {:?} is not a MAC address",
                self.mac
            )));
        }
        if let Some(route) = &self.service_route
            && !matches!(
                canopy_api::tenant::parse_cidr(&route.cidr),
                Some((std::net::IpAddr::V4(_), _))
            )
        {
            return Err(CniError::Invalid(format!(
                "service route {:?} is not an IPv4 CIDR",
                route.cidr
            )));
        }
        Ok(())
    }
}

/// Why the plugin failed; codes as CNI 1.0's well-known errors.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The pod has no port yet (the cloud controller has not made it): try again later.
    #[error("the pod has no port yet")]
    NotReady,
    #[error("invalid network configuration: {0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
}

impl CniError {
    /// CNI's error code: 11 "try again later", 7 invalid configuration, 999 other.
    pub fn code(&self) -> u32 {
        match self {
            CniError::NotReady => 11,
            CniError::Invalid(_) => 7,
            CniError::Failed(_) => 999,
        }
    }
}

async fn ip(args: &[&str], batch: Option<&str>) -> Result<String, CniError> {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new("ip");
    command
        .args(args)
        .stdin(if batch.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| CniError::Failed(format!("running ip: {e}")))?;
    if let Some(batch) = batch
        && let Some(mut stdin) = child.stdin.take()
    {
        stdin
            .write_all(batch.as_bytes())
            .await
            .map_err(|e| CniError::Failed(format!("writing to ip: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| CniError::Failed(format!("running ip: {e}")))?;
    if !out.status.success() {
        return Err(CniError::Failed(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The name `ip` knows a namespace by: pod sandboxes are pinned under `/run/netns`.
fn netns_name(netns: &Path) -> Result<&str, CniError> {
    if netns.parent() != Some(Path::new("/run/netns")) {
        return Err(CniError::Invalid(format!(
            "network namespace {} is not under /run/netns",
            netns.display()
        )));
    }
    netns
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| CniError::Invalid(format!("network namespace {}", netns.display())))
}

/// What ADD set up (CNI's result, in its shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub interface: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub public_ip: Option<Ipv4Addr>,
}

/// Whether `ifname` in the namespace already carries the port's addresses.
async fn configured(ns: &str, ifname: &str, port: &PortInfo) -> bool {
    match ip(&["-n", ns, "-o", "-4", "addr", "show", "dev", ifname], None).await {
        Ok(out) => {
            out.contains(&format!(" {}/{} ", port.ip, port.prefix))
                && port
                    .public_ip
                    .is_none_or(|public| out.contains(&format!(" {public}/32 ")))
        }
        Err(_) => false,
    }
}

/// ADD: moves the port's device from this (the VM's) namespace into the pod's, as `ifname`.
/// Idempotent: a pod whose interface is already configured is left as it is.
pub async fn add(netns: &Path, ifname: &str, port: &PortInfo) -> Result<Attached, CniError> {
    port.validate()?;
    let ns = netns_name(netns)?;
    let attached = Attached {
        interface: ifname.to_string(),
        mac: port.mac.clone(),
        ip: port.ip,
        prefix: port.prefix,
        gateway: port.gateway,
        public_ip: port.public_ip,
    };
    if configured(ns, ifname, port).await {
        return Ok(attached);
    }
    // The device must be here, in the VM, where the cloud plugged it in.
    if ip(&["link", "show", "dev", &port.device], None)
        .await
        .is_err()
    {
        // Moved already (a retry after a partial ADD)? Then finish inside the pod.
        if ip(&["-n", ns, "link", "show", "dev", &port.device], None)
            .await
            .is_err()
            && ip(&["-n", ns, "link", "show", "dev", ifname], None)
                .await
                .is_err()
        {
            return Err(CniError::NotReady);
        }
    } else {
        ip(&["link", "set", "dev", &port.device, "netns", ns], None).await?;
    }
    let rename = if ip(&["-n", ns, "link", "show", "dev", ifname], None)
        .await
        .is_ok()
    {
        String::new()
    } else {
        format!("link set dev {} name {ifname}\n", port.device)
    };
    // With a public IP, the pod is reached at it from the public network and answers
    // from it; what it starts beyond its subnet leaves from it too (the subnet's own route
    // keeps the fixed address for the tenant's network).
    let (public_addr, source) = match port.public_ip {
        Some(public) => (
            format!("addr replace {public}/32 dev {ifname}\n"),
            format!(" src {public}"),
        ),
        None => (String::new(), String::new()),
    };
    let service_route = match &port.service_route {
        Some(route) => format!(
            "route replace {} via {} dev {ifname} src {}\n",
            route.cidr, route.via, port.ip
        ),
        None => String::new(),
    };
    let batch = format!(
        "{rename}link set dev {ifname} address {mac}\n\
         addr replace {ip}/{prefix} dev {ifname}\n\
         {public_addr}\
         link set dev {ifname} up\n\
         link set dev lo up\n\
         route replace default via {gateway} dev {ifname}{source}\n\
         {service_route}",
        mac = port.mac,
        ip = port.ip,
        prefix = port.prefix,
        gateway = port.gateway,
    );
    ip(&["-n", ns, "-batch", "-"], Some(&batch)).await?;
    Ok(attached)
}

/// DEL: removes the pod's interface (the port's veth pair goes with it). Missing is fine.
pub async fn del(netns: &Path, ifname: &str) -> Result<(), CniError> {
    let ns = netns_name(netns)?;
    if !Path::new(netns).exists() {
        return Ok(());
    }
    if ip(&["-n", ns, "link", "show", "dev", ifname], None)
        .await
        .is_err()
    {
        return Ok(());
    }
    ip(&["-n", ns, "link", "del", "dev", ifname], None)
        .await
        .map(|_| ())
}

/// CHECK: the interface exists with the port's address.
pub async fn check(netns: &Path, ifname: &str, port: &PortInfo) -> Result<(), CniError> {
    let ns = netns_name(netns)?;
    if configured(ns, ifname, port).await {
        Ok(())
    } else {
        Err(CniError::Failed(format!(
            "{ifname} in {ns} does not carry {}/{}",
            port.ip, port.prefix
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> PortInfo {
        PortInfo {
            name: "pod-1".into(),
            device: "e0123abcd".into(),
            ip: Ipv4Addr::new(10, 0, 0, 5),
            prefix: 16,
            mac: "02:aa:bb:cc:dd:ee".into(),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            public_ip: None,
            service_route: Some(ServiceRoute {
                cidr: "10.96.0.0/12".into(),
                via: Ipv4Addr::new(10, 0, 0, 2),
            }),
        }
    }

    #[test]
    fn records_are_checked_before_reaching_ip() {
        assert!(port().validate().is_ok());
        for bad in ["", "eth0 up", "a;b", "sixteen-chars-xx"] {
            let p = PortInfo {
                device: bad.into(),
                ..port()
            };
            assert!(p.validate().is_err(), "{bad:?}");
        }
        let p = PortInfo {
            mac: "02:aa:bb:cc:dd".into(),
            ..port()
        };
        assert!(p.validate().is_err());
        let p = PortInfo {
            prefix: 0,
            ..port()
        };
        assert!(p.validate().is_err());
        let p = PortInfo {
            service_route: Some(ServiceRoute {
                cidr: "10.96.0.0/12 dev lo".into(),
                via: Ipv4Addr::new(10, 0, 0, 2),
            }),
            ..port()
        };
        assert!(p.validate().is_err());
        assert!(netns_name(Path::new("/tmp/x")).is_err());
        assert_eq!(
            netns_name(Path::new("/run/netns/canopy-1")).unwrap(),
            "canopy-1"
        );
    }

    #[test]
    fn the_annotation_round_trips() {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "annotations": {
                POD_PORT_ANNOTATION: serde_json::to_string(&port()).unwrap()}}
        }))
        .unwrap();
        assert_eq!(PortInfo::of_pod(&pod).unwrap(), Some(port()));
        let bare: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}})).unwrap();
        assert_eq!(PortInfo::of_pod(&bare).unwrap(), None);
    }
}
