//! What one node's rules must say, computed from its tenant's Services and EndpointSlices
//! with upstream kube-proxy's meaning: which endpoints serve a ClusterIP or a node port, when
//! only this node's endpoints count (`internalTrafficPolicy` / `externalTrafficPolicy:
//! Local`), and what happens to a service nobody serves (reject when it has no endpoints at
//! all, drop when it has some but none this node may use).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A transport protocol a Service port may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub(crate) fn parse(text: Option<&str>) -> Option<Self> {
        match text.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// nftables' name.
    pub fn nft(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

/// Where traffic arrives: a ClusterIP and port, or a node port on any of the node's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Frontend {
    Cluster(Ipv4Addr, Protocol, u16),
    NodePort(Protocol, u16),
}

/// A pod address and port serving a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// What a frontend does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Spread new connections at random over these backends (sorted, never empty).
    Balance(Vec<Backend>),
    /// As `Balance`, but a client keeps its backend for `timeout` seconds since its last
    /// new connection (`sessionAffinity: ClientIP`).
    Sticky(Vec<Backend>, u32),
    /// The service has no endpoints: refuse (ICMP port unreachable), as upstream.
    Reject,
    /// The service has endpoints, none of which this node may use: drop, as upstream.
    Drop,
}

/// Every frontend of a tenant's Services on one node.
pub type Rules = BTreeMap<Frontend, Target>;

/// A port's name, protocol and number.
pub(crate) type NamedPort = (String, Protocol, u16);

/// One address of an EndpointSlice, with what the slice says of it.
pub(crate) struct Endpoint {
    pub ip: Ipv4Addr,
    pub hostname: Option<String>,
    pub node: Option<String>,
    pub ports: Vec<NamedPort>,
    pub ready: bool,
    pub serving_terminating: bool,
}

/// The IPv4 endpoints of `slices`, by their Service's namespace and name.
pub(crate) fn endpoints_by_service<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> BTreeMap<(String, String), Vec<Endpoint>> {
    let mut endpoints: BTreeMap<(String, String), Vec<Endpoint>> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let labels = slice.metadata.labels.as_ref();
        let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            continue;
        };
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        let ports: Vec<NamedPort> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let number = u16::try_from(p.port?).ok()?;
                let protocol = Protocol::parse(p.protocol.as_deref())?;
                Some((p.name.clone().unwrap_or_default(), protocol, number))
            })
            .collect();
        let into = endpoints.entry((namespace, service.clone())).or_default();
        for ep in &slice.endpoints {
            let conditions = ep.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            for address in &ep.addresses {
                if let Ok(ip) = address.parse() {
                    into.push(Endpoint {
                        ip,
                        hostname: ep.hostname.clone(),
                        node: ep.node_name.clone(),
                        ports: ports.clone(),
                        ready,
                        serving_terminating: serving && terminating,
                    });
                }
            }
        }
    }
    endpoints
}

/// The rules for `services`, served by `slices`, as seen from node `node`.
pub fn compute<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &str,
) -> Rules {
    let endpoints = endpoints_by_service(slices);
    let mut rules = Rules::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        if kind == "ExternalName" {
            continue;
        }
        let Some(cluster_ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let key = (
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        );
        let eps = endpoints.get(&key).map_or(&[][..], Vec::as_slice);
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(10800)
        });
        for port in spec.ports.iter().flatten() {
            let Some(protocol) = Protocol::parse(port.protocol.as_deref()) else {
                continue;
            };
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            let name = port.name.clone().unwrap_or_default();
            let all = usable(eps, &name, protocol, None);
            let target = |local_only: bool| {
                let chosen = if local_only {
                    usable(eps, &name, protocol, Some(node))
                } else {
                    all.clone()
                };
                match (chosen.is_empty(), all.is_empty(), affinity) {
                    (_, true, _) => Target::Reject,
                    (true, false, _) => Target::Drop,
                    (false, _, Some(timeout)) => Target::Sticky(chosen, timeout),
                    (false, _, None) => Target::Balance(chosen),
                }
            };
            rules.insert(
                Frontend::Cluster(cluster_ip, protocol, number),
                target(internal_local),
            );
            if matches!(kind, "NodePort" | "LoadBalancer")
                && let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok())
                && node_port != 0
            {
                rules.insert(
                    Frontend::NodePort(protocol, node_port),
                    target(external_local),
                );
            }
        }
    }
    rules
}

/// The backends of one service port: ready endpoints, or (when none is ready) the serving
/// ones that are terminating, as upstream falls back to them.
/// `on_node`: only the endpoints of that node.
fn usable(
    eps: &[Endpoint],
    port_name: &str,
    protocol: Protocol,
    on_node: Option<&str>,
) -> Vec<Backend> {
    let pick = |want_ready: bool| -> BTreeSet<Backend> {
        eps.iter()
            .filter(|e| on_node.is_none() || e.node.as_deref() == on_node)
            .filter(|e| {
                if want_ready {
                    e.ready
                } else {
                    e.serving_terminating
                }
            })
            .filter_map(|e| {
                let (_, _, port) = e
                    .ports
                    .iter()
                    .find(|(n, p, _)| n == port_name && *p == protocol)?;
                Some(Backend {
                    ip: e.ip,
                    port: *port,
                })
            })
            .collect()
    };
    let ready = pick(true);
    let chosen = if ready.is_empty() { pick(false) } else { ready };
    chosen.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({"metadata": {"namespace": "a", "name": "web"}, "spec": spec}))
            .unwrap()
    }

    fn slice(endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"namespace": "a", "name": "web-1",
                "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn backend(ip: &str) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            port: 8080,
        }
    }

    const VIP: Frontend = Frontend::Cluster(Ipv4Addr::new(10, 96, 0, 10), Protocol::Tcp, 80);

    #[test]
    fn ready_endpoints_serve_and_unready_ones_do_not() {
        let svc = service(json!({"clusterIP": "10.96.0.10",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}));
        let eps = slice(json!([
            {"addresses": ["10.0.0.5"], "conditions": {"ready": true}, "nodeName": "n1"},
            {"addresses": ["10.0.0.6"], "nodeName": "n2"},
            {"addresses": ["10.0.0.7"], "conditions": {"ready": false}},
        ]));
        let rules = compute([&svc], [&eps], "n1");
        assert_eq!(
            rules[&VIP],
            Target::Balance(vec![backend("10.0.0.5"), backend("10.0.0.6")])
        );
        // No endpoints at all: reject.
        assert_eq!(compute([&svc], [], "n1")[&VIP], Target::Reject);
        // Only terminating ones that still serve: used, as upstream.
        let draining = slice(json!([{"addresses": ["10.0.0.8"],
            "conditions": {"ready": false, "serving": true, "terminating": true}}]));
        assert_eq!(
            compute([&svc], [&draining], "n1")[&VIP],
            Target::Balance(vec![backend("10.0.0.8")])
        );
    }

    #[test]
    fn local_policies_node_ports_and_affinity() {
        let svc = service(json!({"type": "NodePort", "clusterIP": "10.96.0.10",
            "internalTrafficPolicy": "Local", "externalTrafficPolicy": "Cluster",
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}));
        let eps = slice(json!([{"addresses": ["10.0.0.6"], "nodeName": "n2"}]));
        let rules = compute([&svc], [&eps], "n1");
        assert_eq!(rules[&VIP], Target::Drop, "no local endpoint");
        assert_eq!(
            rules[&Frontend::NodePort(Protocol::Tcp, 30080)],
            Target::Sticky(vec![backend("10.0.0.6")], 60)
        );
        let rules = compute([&svc], [&eps], "n2");
        assert_eq!(rules[&VIP], Target::Sticky(vec![backend("10.0.0.6")], 60));
    }

    #[test]
    fn headless_external_name_and_unmatched_ports_have_no_rules() {
        let headless = service(json!({"clusterIP": "None", "ports": [{"port": 80}]}));
        let external = service(json!({"type": "ExternalName", "externalName": "x.example"}));
        assert!(compute([&headless, &external], [], "n1").is_empty());
        // The slice names its port "http"; an unnamed service port finds no backend.
        let svc = service(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let eps = slice(json!([{"addresses": ["10.0.0.5"]}]));
        assert_eq!(compute([&svc], [&eps], "n1")[&VIP], Target::Reject);
    }
}
