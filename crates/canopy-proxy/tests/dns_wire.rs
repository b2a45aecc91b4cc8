//! Cluster DNS over the wire: a tenant's server answers its zone over UDP and TCP, says
//! NXDOMAIN for names it does not hold, forwards other names to its upstream resolver (here a
//! second server, for another domain) and REFUSES them without one.

use std::{net::SocketAddr, str::FromStr, sync::Arc, time::Duration};

use canopy_proxy::dns::{ClusterDns, Zone, serve};
use hickory_server::proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RecordType},
};
use k8s_openapi::api::core::v1::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn zone(namespace: &str, name: &str, ip: &str) -> Arc<parking_lot::RwLock<Arc<Zone>>> {
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }))
    .unwrap();
    Arc::new(parking_lot::RwLock::new(Arc::new(Zone::compute(
        [&svc],
        [],
    ))))
}

fn free_address() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

async fn start(handler: ClusterDns, shutdown: &CancellationToken) -> SocketAddr {
    let address = free_address();
    tokio::spawn(serve(address, handler, shutdown.clone()));
    // Serving once it answers.
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            return address;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the DNS server did not start on {address}");
}

fn query(name: &str, kind: RecordType) -> Vec<u8> {
    let mut message = Message::new(4242, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_str(name).unwrap(), kind));
    message.to_vec().unwrap()
}

async fn ask_udp(server: SocketAddr, name: &str, kind: RecordType) -> Message {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(&query(name, kind), server).await.unwrap();
    let mut buffer = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buffer))
        .await
        .expect("an answer")
        .unwrap();
    Message::from_vec(&buffer[..n]).unwrap()
}

async fn ask_tcp(server: SocketAddr, name: &str, kind: RecordType) -> Message {
    let mut stream = tokio::net::TcpStream::connect(server).await.unwrap();
    let bytes = query(name, kind);
    stream
        .write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&bytes).await.unwrap();
    let mut length = [0u8; 2];
    stream.read_exact(&mut length).await.unwrap();
    let mut reply = vec![0u8; u16::from_be_bytes(length) as usize];
    stream.read_exact(&mut reply).await.unwrap();
    Message::from_vec(&reply).unwrap()
}

fn answers(message: &Message) -> Vec<String> {
    message.answers.iter().map(|r| r.data.to_string()).collect()
}

#[tokio::test]
async fn answers_forwards_and_refuses() {
    let shutdown = CancellationToken::new();
    // The "upstream": another server, authoritative for example.test.
    let upstream = start(
        ClusterDns::new("example.test", zone("ns", "www", "192.0.2.80"), None),
        &shutdown,
    )
    .await;
    let tenant = start(
        ClusterDns::new(
            "cluster.local",
            zone("shop", "web", "10.96.0.20"),
            Some(upstream),
        ),
        &shutdown,
    )
    .await;
    let lonely = start(
        ClusterDns::new("cluster.local", zone("shop", "web", "10.96.0.20"), None),
        &shutdown,
    )
    .await;

    let reply = ask_udp(tenant, "web.shop.svc.cluster.local.", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(reply.metadata.authoritative);
    assert_eq!(reply.metadata.id, 4242);
    assert_eq!(answers(&reply), ["10.96.0.20"]);
    let reply = ask_tcp(tenant, "web.shop.svc.cluster.local.", RecordType::A).await;
    assert_eq!(answers(&reply), ["10.96.0.20"], "over TCP");

    let reply = ask_udp(tenant, "web.other.svc.cluster.local.", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(reply.authorities.len(), 1, "the SOA, for negative caching");

    // Outside the cluster domain: forwarded, over the client's protocol.
    let reply = ask_udp(tenant, "www.ns.svc.example.test.", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(answers(&reply), ["192.0.2.80"]);
    let reply = ask_tcp(tenant, "www.ns.svc.example.test.", RecordType::A).await;
    assert_eq!(answers(&reply), ["192.0.2.80"], "forwarded over TCP");
    let reply = ask_udp(tenant, "nope.ns.svc.example.test.", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);

    // Without an upstream: refused.
    let reply = ask_udp(lonely, "www.ns.svc.example.test.", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    shutdown.cancel();
}
