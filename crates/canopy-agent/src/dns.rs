//! Pods' resolv.conf, as the kubelet writes it for each `dnsPolicy` and `dnsConfig`.

use canopy_runtime::DnsConfig;
use k8s_openapi::api::core::v1::Pod;

/// The node's resolvers: its own, and the cluster's when there is cluster DNS.
#[derive(Clone, Debug, Default)]
pub struct PodDns {
    /// The node's resolv.conf (dnsPolicy `Default`).
    pub host: DnsConfig,
    /// Cluster DNS (dnsPolicy `ClusterFirst`), if the node has it.
    pub cluster: Option<ClusterDns>,
}

/// Cluster DNS: its nameservers and the cluster domain.
#[derive(Clone, Debug)]
pub struct ClusterDns {
    pub nameservers: Vec<String>,
    pub domain: String,
}

impl PodDns {
    /// The resolv.conf of `pod`.
    pub fn for_pod(&self, pod: &Pod) -> DnsConfig {
        let spec = pod.spec.as_ref();
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let policy = spec
            .and_then(|s| s.dns_policy.as_deref())
            .unwrap_or("ClusterFirst");
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let cluster_first = match policy {
            "ClusterFirstWithHostNet" => true,
            // A host-network pod keeps the node's resolver unless it asks otherwise.
            "ClusterFirst" => !host_network,
            _ => false,
        };
        let mut dns = match (policy, cluster_first, &self.cluster) {
            ("None", _, _) => DnsConfig::default(),
            (_, true, Some(cluster)) => {
                let d = &cluster.domain;
                let mut searches = vec![
                    format!("{namespace}.svc.{d}"),
                    format!("svc.{d}"),
                    d.clone(),
                ];
                searches.extend(self.host.searches.iter().cloned());
                DnsConfig {
                    nameservers: cluster.nameservers.clone(),
                    searches,
                    options: vec!["ndots:5".to_string()],
                }
            }
            _ => self.host.clone(),
        };
        if let Some(config) = spec.and_then(|s| s.dns_config.as_ref()) {
            for ns in config.nameservers.iter().flatten() {
                if !dns.nameservers.contains(ns) {
                    dns.nameservers.push(ns.clone());
                }
            }
            for search in config.searches.iter().flatten() {
                if !dns.searches.contains(search) {
                    dns.searches.push(search.clone());
                }
            }
            for option in config.options.iter().flatten() {
                let Some(name) = option.name.as_deref() else {
                    continue;
                };
                dns.options.retain(|o| o.split(':').next() != Some(name));
                dns.options.push(match &option.value {
                    Some(value) => format!("{name}:{value}"),
                    None => name.to_string(),
                });
            }
        }
        dns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node() -> PodDns {
        PodDns {
            host: DnsConfig {
                nameservers: vec!["192.0.2.53".into()],
                searches: vec!["example.net".into()],
                options: vec!["edns0".into()],
            },
            cluster: Some(ClusterDns {
                nameservers: vec!["10.96.0.10".into()],
                domain: "cluster.local".into(),
            }),
        }
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": "shop"}, "spec": spec}),
        )
        .unwrap()
    }

    #[test]
    fn policies_as_the_kubelet() {
        let dns = node().for_pod(&pod(json!({"containers": []})));
        assert_eq!(dns.nameservers, ["10.96.0.10"]);
        assert_eq!(
            dns.searches,
            [
                "shop.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "example.net"
            ]
        );
        assert_eq!(dns.options, ["ndots:5"]);
        let host_net = node().for_pod(&pod(json!({"containers": [], "hostNetwork": true})));
        assert_eq!(host_net.nameservers, ["192.0.2.53"]);
        let with_host_net = node().for_pod(&pod(
            json!({"containers": [], "hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"}),
        ));
        assert_eq!(with_host_net.nameservers, ["10.96.0.10"]);
        let default = node().for_pod(&pod(json!({"containers": [], "dnsPolicy": "Default"})));
        assert_eq!(default, node().host);
        let none = node().for_pod(&pod(json!({"containers": [], "dnsPolicy": "None",
            "dnsConfig": {"nameservers": ["1.1.1.1"], "searches": ["a.example"],
                "options": [{"name": "ndots", "value": "2"}, {"name": "rotate"}]}})));
        assert_eq!(none.nameservers, ["1.1.1.1"]);
        assert_eq!(none.searches, ["a.example"]);
        assert_eq!(none.options, ["ndots:2", "rotate"]);
        let merged = node().for_pod(&pod(json!({"containers": [],
            "dnsConfig": {"options": [{"name": "ndots", "value": "1"}]}})));
        assert_eq!(merged.options, ["ndots:1"]);
        // No cluster DNS on the node: ClusterFirst falls back to the node's resolver.
        let bare = PodDns {
            cluster: None,
            ..node()
        };
        assert_eq!(bare.for_pod(&pod(json!({"containers": []}))), node().host);
    }
}
