//! Cluster DNS for one tenant's pods (upstream runs CoreDNS; Canopy answers on every node).
//!
//! The zone is built from the same Services and EndpointSlices the proxy programs, so a node
//! only ever knows its own tenant's names: another tenant's Service does not exist here, and
//! its name is NXDOMAIN. Records follow the Kubernetes DNS specification:
//! `<svc>.<ns>.svc.<domain>` (A: the ClusterIP, or a headless Service's ready endpoints;
//! CNAME for an ExternalName), `_<port>._<proto>.<svc>.<ns>.svc.<domain>` (SRV),
//! `<hostname>.<svc>.<ns>.svc.<domain>` for a headless Service's endpoints, and
//! `<a-b-c-d>.<ns>.pod.<domain>` (CoreDNS's `pods insecure`). Other names go to the
//! configured upstream resolver, or are REFUSED when there is none.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use hickory_server::proto::{
    op::{Message, Metadata, OpCode, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, CNAME, SOA, SRV},
    },
};
use hickory_server::{
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::rules::{self, NamedPort, Protocol};

/// CoreDNS's `kubernetes` plugin TTL.
const TTL: u32 = 5;

/// A ready endpoint of a headless Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Endpoint {
    ip: Ipv4Addr,
    /// Its hostname, or its dashed address.
    host: String,
    ports: Vec<NamedPort>,
}

/// What one Service publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Published {
    ClusterIp(Ipv4Addr),
    Headless(Vec<Endpoint>),
    External(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    published: Published,
    ports: Vec<NamedPort>,
}

/// The tenant's names: Services by namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Zone {
    services: BTreeMap<(String, String), Entry>,
}

/// The fully qualified name of `text` (no trailing dot).
fn name(text: &str) -> Option<Name> {
    Name::from_str(&format!("{text}.")).ok()
}

fn dashed(ip: Ipv4Addr) -> String {
    ip.to_string().replace('.', "-")
}

impl Zone {
    /// The zone of these Services and EndpointSlices.
    pub fn compute<'a>(
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ) -> Zone {
        let mut endpoints: BTreeMap<(String, String), Vec<Endpoint>> = BTreeMap::new();
        for (service, eps) in rules::endpoints_by_service(slices) {
            let ready = eps.into_iter().filter(|e| e.ready).map(|e| Endpoint {
                host: e
                    .hostname
                    .unwrap_or_else(|| dashed(e.ip))
                    .to_ascii_lowercase(),
                ip: e.ip,
                ports: e.ports,
            });
            endpoints.insert(service, ready.collect());
        }
        let mut zone = Zone::default();
        for svc in services {
            let Some(spec) = &svc.spec else { continue };
            let key = (
                svc.metadata.namespace.clone().unwrap_or_default(),
                svc.metadata.name.clone().unwrap_or_default(),
            );
            let ports = spec
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p.name.clone().unwrap_or_default(),
                        Protocol::parse(p.protocol.as_deref())?,
                        u16::try_from(p.port).ok()?,
                    ))
                })
                .collect();
            let published = if spec.type_.as_deref() == Some("ExternalName") {
                match &spec.external_name {
                    Some(name) => Published::External(name.trim_end_matches('.').to_string()),
                    None => continue,
                }
            } else {
                match spec.cluster_ip.as_deref() {
                    Some("None") => {
                        let mut eps = endpoints.get(&key).cloned().unwrap_or_default();
                        eps.sort();
                        eps.dedup_by(|a, b| a.ip == b.ip);
                        Published::Headless(eps)
                    }
                    Some(ip) => match ip.parse() {
                        Ok(ip) => Published::ClusterIp(ip),
                        Err(_) => continue,
                    },
                    None => continue,
                }
            };
            zone.services.insert(key, Entry { published, ports });
        }
        zone
    }

    /// The answer to `qname` (lower case, no trailing dot) of type `qtype`, in `domain`.
    fn answer(&self, domain: &str, qname: &str, qtype: RecordType) -> Answer {
        let Some(relative) = qname
            .strip_suffix(domain)
            .and_then(|r| r.strip_suffix('.').or(r.is_empty().then_some("")))
        else {
            return Answer::NotOurs;
        };
        let labels: Vec<&str> = if relative.is_empty() {
            Vec::new()
        } else {
            relative.split('.').collect()
        };
        let a = |owner: &str, ip: Ipv4Addr| {
            name(owner).map(|n| Record::from_rdata(n, TTL, RData::A(A(ip))))
        };
        let records = |records: Vec<Option<Record>>| {
            let records: Vec<Record> = records.into_iter().flatten().collect();
            if records.is_empty() {
                Answer::NoData
            } else {
                Answer::Records(records)
            }
        };
        match labels.as_slice() {
            [] | ["svc"] | ["pod"] | [_, "svc" | "pod"] => Answer::NoData,
            [pod, _ns, "pod"] => match pod.replace('-', ".").parse::<Ipv4Addr>() {
                Ok(ip) if qtype == RecordType::A || qtype == RecordType::ANY => {
                    records(vec![a(qname, ip)])
                }
                Ok(_) => Answer::NoData,
                Err(_) => Answer::NxDomain,
            },
            [svc, ns, "svc"] => {
                let Some(entry) = self.services.get(&(ns.to_string(), svc.to_string())) else {
                    return Answer::NxDomain;
                };
                match (&entry.published, qtype) {
                    (Published::External(target), _) => records(vec![name(qname).and_then(|n| {
                        Some(Record::from_rdata(
                            n,
                            TTL,
                            RData::CNAME(CNAME(name(target)?)),
                        ))
                    })]),
                    (Published::ClusterIp(ip), RecordType::A | RecordType::ANY) => {
                        records(vec![a(qname, *ip)])
                    }
                    (Published::Headless(eps), RecordType::A | RecordType::ANY) => {
                        records(eps.iter().map(|e| a(qname, e.ip)).collect())
                    }
                    (_, RecordType::SRV) => records(
                        entry
                            .ports
                            .iter()
                            .filter(|(port, _, _)| !port.is_empty())
                            .flat_map(|(port, proto, _)| {
                                self.srv(entry, qname, qname, port, *proto)
                            })
                            .collect(),
                    ),
                    _ => Answer::NoData,
                }
            }
            [host, svc, ns, "svc"] if !host.starts_with('_') => {
                let Some(Entry {
                    published: Published::Headless(eps),
                    ..
                }) = self.services.get(&(ns.to_string(), svc.to_string()))
                else {
                    return Answer::NxDomain;
                };
                let ips: Vec<Option<Record>> = eps
                    .iter()
                    .filter(|e| e.host == *host)
                    .map(|e| a(qname, e.ip))
                    .collect();
                match (ips.is_empty(), qtype) {
                    (true, _) => Answer::NxDomain,
                    (false, RecordType::A | RecordType::ANY) => records(ips),
                    (false, _) => Answer::NoData,
                }
            }
            [port, proto, svc, ns, "svc"] => {
                let (Some(port), Some(proto)) = (port.strip_prefix('_'), proto.strip_prefix('_'))
                else {
                    return Answer::NxDomain;
                };
                let Some(proto) = Protocol::parse(Some(&proto.to_ascii_uppercase())) else {
                    return Answer::NxDomain;
                };
                let Some(entry) = self.services.get(&(ns.to_string(), svc.to_string())) else {
                    return Answer::NxDomain;
                };
                let service = format!("{svc}.{ns}.svc.{domain}");
                let found = self.srv(entry, qname, &service, port, proto);
                match (found.is_empty(), qtype) {
                    (true, _) => Answer::NxDomain,
                    (false, RecordType::SRV | RecordType::ANY) => records(found),
                    (false, _) => Answer::NoData,
                }
            }
            _ => Answer::NxDomain,
        }
    }

    /// SRV records of the service port named `port` over `proto`, owned by `owner`.
    fn srv(
        &self,
        entry: &Entry,
        owner: &str,
        service: &str,
        port: &str,
        proto: Protocol,
    ) -> Vec<Option<Record>> {
        let record = |target: &str, number: u16| {
            Some(Record::from_rdata(
                name(owner)?,
                TTL,
                RData::SRV(SRV::new(0, 100, number, name(target)?)),
            ))
        };
        match &entry.published {
            Published::Headless(eps) => eps
                .iter()
                .filter_map(|e| {
                    let (_, _, number) =
                        e.ports.iter().find(|(n, p, _)| n == port && *p == proto)?;
                    Some(record(&format!("{}.{service}", e.host), *number))
                })
                .collect(),
            _ => entry
                .ports
                .iter()
                .filter(|(n, p, _)| n == port && *p == proto)
                .map(|(_, _, number)| record(service, *number))
                .collect(),
        }
    }
}

enum Answer {
    Records(Vec<Record>),
    NoData,
    NxDomain,
    NotOurs,
}

/// Serves a tenant's zone.
pub struct ClusterDns {
    /// The cluster domain, lower case, no trailing dot (`cluster.local`).
    domain: String,
    zone: Arc<parking_lot::RwLock<Arc<Zone>>>,
    upstream: Option<SocketAddr>,
}

impl ClusterDns {
    /// A server over `zone` (replaced as the tenant's Services change).
    pub fn new(
        domain: &str,
        zone: Arc<parking_lot::RwLock<Arc<Zone>>>,
        upstream: Option<SocketAddr>,
    ) -> Self {
        Self {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            zone,
            upstream,
        }
    }

    fn soa(&self) -> Option<Record> {
        let origin = name(&self.domain)?;
        let mname = name(&format!("ns.dns.{}", self.domain))?;
        let rname = name(&format!("hostmaster.{}", self.domain))?;
        Some(Record::from_rdata(
            origin,
            TTL,
            RData::SOA(SOA::new(mname, rname, 1, 7200, 1800, 86400, TTL)),
        ))
    }

    /// Asks the upstream resolver, over the protocol the client used.
    async fn forward(&self, upstream: SocketAddr, request: &Request) -> Option<Message> {
        let query = request.as_slice();
        let exchange = async {
            if request.protocol() == hickory_server::net::xfer::Protocol::Tcp {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut stream = tokio::net::TcpStream::connect(upstream).await.ok()?;
                let length = u16::try_from(query.len()).ok()?.to_be_bytes();
                stream.write_all(&length).await.ok()?;
                stream.write_all(query).await.ok()?;
                let mut length = [0u8; 2];
                stream.read_exact(&mut length).await.ok()?;
                let mut reply = vec![0u8; u16::from_be_bytes(length) as usize];
                stream.read_exact(&mut reply).await.ok()?;
                Message::from_vec(&reply).ok()
            } else {
                let bind: SocketAddr = if upstream.is_ipv4() {
                    "0.0.0.0:0".parse().ok()?
                } else {
                    "[::]:0".parse().ok()?
                };
                let socket = tokio::net::UdpSocket::bind(bind).await.ok()?;
                socket.send_to(query, upstream).await.ok()?;
                let mut reply = vec![0u8; 4096];
                loop {
                    let (n, from) = socket.recv_from(&mut reply).await.ok()?;
                    let Ok(message) = Message::from_vec(&reply[..n]) else {
                        continue;
                    };
                    if from == upstream && message.metadata.id == request.metadata.id {
                        return Some(message);
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(2), exchange)
            .await
            .ok()
            .flatten()
    }
}

#[async_trait::async_trait]
impl RequestHandler for ClusterDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let fail = |code: ResponseCode| {
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = code;
            ResponseInfo::from(hickory_server::proto::op::Header {
                metadata,
                counts: Default::default(),
            })
        };
        let info = match (request.metadata.op_code, request.request_info()) {
            (OpCode::Query, Ok(info)) => info,
            (op_code, _) => {
                let code = if op_code == OpCode::Query {
                    ResponseCode::FormErr
                } else {
                    ResponseCode::NotImp
                };
                let message = builder.error_msg(&request.metadata, code);
                return response
                    .send_response(message)
                    .await
                    .unwrap_or_else(|_| fail(ResponseCode::ServFail));
            }
        };
        let qname = info.query.name().to_string().to_ascii_lowercase();
        let qname = qname.trim_end_matches('.');
        let qtype = info.query.query_type();
        let zone = self.zone.read().clone();
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let soa: Vec<Record> = self.soa().into_iter().collect();
        let sent = match zone.answer(&self.domain, qname, qtype) {
            Answer::Records(records) => {
                response
                    .send_response(builder.build(metadata, &records, [], [], []))
                    .await
            }
            Answer::NoData => {
                response
                    .send_response(builder.build(metadata, [], [], &soa, []))
                    .await
            }
            Answer::NxDomain => {
                metadata.response_code = ResponseCode::NXDomain;
                response
                    .send_response(builder.build(metadata, [], [], &soa, []))
                    .await
            }
            Answer::NotOurs => match self.upstream {
                None => {
                    let message = builder.error_msg(&request.metadata, ResponseCode::Refused);
                    response.send_response(message).await
                }
                Some(upstream) => match self.forward(upstream, request).await {
                    Some(reply) => {
                        let mut metadata = Metadata::response_from_request(&request.metadata);
                        metadata.response_code = reply.metadata.response_code;
                        metadata.recursion_available = reply.metadata.recursion_available;
                        metadata.truncation = reply.metadata.truncation;
                        response
                            .send_response(builder.build(
                                metadata,
                                &reply.answers,
                                &reply.authorities,
                                [],
                                &reply.additionals,
                            ))
                            .await
                    }
                    None => {
                        let message = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                        response.send_response(message).await
                    }
                },
            },
        };
        sent.unwrap_or_else(|_| fail(ResponseCode::ServFail))
    }
}

/// Serves `handler` on UDP and TCP at `address` until `shutdown`.
pub async fn serve(
    address: SocketAddr,
    handler: ClusterDns,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let udp = tokio::net::UdpSocket::bind(address)
        .await
        .with_context(|| format!("binding DNS on udp {address}"))?;
    let tcp = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding DNS on tcp {address}"))?;
    let mut server = hickory_server::server::Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 65535);
    tracing::info!(%address, "serving cluster DNS");
    shutdown.cancelled().await;
    let _ = server.shutdown_gracefully().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::SERVICE_NAME_LABEL;
    use serde_json::json;

    fn zone() -> Zone {
        let services: Vec<Service> = [
            json!({"metadata": {"namespace": "a", "name": "web"},
                "spec": {"clusterIP": "10.96.0.20",
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
            json!({"metadata": {"namespace": "a", "name": "db"},
                "spec": {"clusterIP": "None",
                    "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]}}),
            json!({"metadata": {"namespace": "a", "name": "ext"},
                "spec": {"type": "ExternalName", "externalName": "example.com"}}),
        ]
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "a", "name": "db-1", "labels": {SERVICE_NAME_LABEL: "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 5433, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.0.0.7"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.0.0.8"]},
                {"addresses": ["10.0.0.9"], "conditions": {"ready": false}},
            ]
        }))
        .unwrap();
        Zone::compute(&services, [&slice])
    }

    fn ips(answer: Answer) -> Vec<String> {
        match answer {
            Answer::Records(records) => records.iter().map(|r| r.data.to_string()).collect(),
            Answer::NoData => vec!["nodata".into()],
            Answer::NxDomain => vec!["nxdomain".into()],
            Answer::NotOurs => vec!["notours".into()],
        }
    }

    #[test]
    fn names_follow_the_kubernetes_dns_specification() {
        let z = zone();
        let d = "cluster.local";
        let q = |name: &str, t| ips(z.answer(d, name, t));
        assert_eq!(q("web.a.svc.cluster.local", RecordType::A), ["10.96.0.20"]);
        assert_eq!(q("web.a.svc.cluster.local", RecordType::AAAA), ["nodata"]);
        assert_eq!(
            q("db.a.svc.cluster.local", RecordType::A),
            ["10.0.0.7", "10.0.0.8"],
            "a headless service answers with its ready endpoints"
        );
        assert_eq!(
            q("db-0.db.a.svc.cluster.local", RecordType::A),
            ["10.0.0.7"]
        );
        assert_eq!(
            q("10-0-0-8.db.a.svc.cluster.local", RecordType::A),
            ["10.0.0.8"]
        );
        assert_eq!(
            q("_http._tcp.web.a.svc.cluster.local", RecordType::SRV),
            ["0 100 80 web.a.svc.cluster.local."]
        );
        assert_eq!(
            q("_pg._tcp.db.a.svc.cluster.local", RecordType::SRV),
            [
                "0 100 5433 db-0.db.a.svc.cluster.local.",
                "0 100 5433 10-0-0-8.db.a.svc.cluster.local."
            ]
        );
        assert_eq!(
            q("_pg._udp.db.a.svc.cluster.local", RecordType::SRV),
            ["nxdomain"]
        );
        assert_eq!(
            q("ext.a.svc.cluster.local", RecordType::A),
            ["example.com."]
        );
        assert_eq!(
            q("10-1-2-3.a.pod.cluster.local", RecordType::A),
            ["10.1.2.3"]
        );
        assert_eq!(q("web.b.svc.cluster.local", RecordType::A), ["nxdomain"]);
        assert_eq!(q("nope.a.svc.cluster.local", RecordType::A), ["nxdomain"]);
        assert_eq!(q("example.com", RecordType::A), ["notours"]);
        assert_eq!(q("evilcluster.local", RecordType::A), ["notours"]);
    }
}
