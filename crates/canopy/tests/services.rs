//! Service ClusterIPs and NodePorts through a real `canopy server` (issue 8, point 1): each
//! tenant allocates from its own range (ranges may overlap across tenants), requested values
//! are checked, values are freed when a Service lets them go, nothing is handed out twice
//! across a crash or between two API servers sharing one etcd.

mod common;

use std::collections::HashSet;

use canopy::procs::{Etcd, ServerProcess};
use common::{Backend, Cluster, client_for, raw};
use serde_json::{Value, json};

async fn send(client: &kube::Client, method: &str, path: &str, body: Value) -> (u16, Value) {
    let content_type = match method {
        "PATCH" => "application/merge-patch+json",
        _ => "application/json",
    };
    let (code, _, value) = raw(
        client,
        method,
        path,
        Some(content_type),
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    (code, value)
}

async fn tenant_namespace(admin: &kube::Client, tenant: &str, namespace: &str, service_cidr: &str) {
    let (code, body) = send(
        admin,
        "POST",
        "/apis/canopy.io/v1/tenants",
        json!({"apiVersion": "canopy.io/v1", "kind": "Tenant", "metadata": {"name": tenant},
            "spec": {"projectId": format!("p-{tenant}"),
                "network": {"serviceCidr": service_cidr}}}),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = send(
        admin,
        "POST",
        "/api/v1/namespaces",
        json!({"metadata": {"name": namespace, "labels": {"canopy.io/tenant": tenant}}}),
    )
    .await;
    assert_eq!(code, 201, "{body}");
}

fn service(name: &str, spec: Value) -> Value {
    let mut spec = spec;
    if spec.get("ports").is_none() && spec["type"] != "ExternalName" {
        spec["ports"] = json!([{"port": 80}]);
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})
}

async fn create_service(client: &kube::Client, ns: &str, name: &str, spec: Value) -> (u16, Value) {
    send(
        client,
        "POST",
        &format!("/api/v1/namespaces/{ns}/services"),
        service(name, spec),
    )
    .await
}

fn message(body: &Value) -> &str {
    body["message"].as_str().unwrap_or_default()
}

fn node_ports(svc: &Value) -> Vec<u64> {
    svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["nodePort"].as_u64().unwrap_or(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ips_and_node_ports_are_allocated_per_tenant() {
    let cluster = Cluster::start_with(
        Backend::Embedded,
        &["--service-node-port-range", "30000-30004"],
    );
    let admin = cluster.client().await;
    // Six usable addresses each, the same six in both tenants.
    tenant_namespace(&admin, "acme", "a", "10.100.0.0/29").await;
    tenant_namespace(&admin, "beta", "b", "10.100.0.0/29").await;

    // A requested address is checked against the tenant's range and its other Services.
    let (code, body) =
        create_service(&admin, "a", "fixed", json!({"clusterIP": "10.100.0.2"})).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["spec"]["clusterIPs"], json!(["10.100.0.2"]));
    assert_eq!(body["spec"]["ipFamilies"], json!(["IPv4"]));
    let (code, body) =
        create_service(&admin, "a", "again", json!({"clusterIP": "10.100.0.2"})).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(
        message(&body),
        "Service \"again\" is invalid: spec.clusterIPs[0]: Invalid value: \"10.100.0.2\": failed to allocate IP 10.100.0.2: provided IP is already allocated"
    );
    let (code, body) =
        create_service(&admin, "a", "outside", json!({"clusterIP": "10.96.0.10"})).await;
    assert_eq!(code, 422, "{body}");
    assert!(
        message(&body).contains("The range of valid IPs is 10.100.0.0/29"),
        "{body}"
    );
    // Tenant beta's network never meets acme's: the same address is beta's to take.
    let (code, body) =
        create_service(&admin, "b", "fixed", json!({"clusterIP": "10.100.0.2"})).await;
    assert_eq!(code, 201, "{body}");

    // Headless and ExternalName Services take no address.
    let (code, body) = create_service(&admin, "a", "headless", json!({"clusterIP": "None"})).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["spec"]["clusterIPs"], json!(["None"]));
    let (code, body) = create_service(
        &admin,
        "a",
        "external",
        json!({"type": "ExternalName", "externalName": "example.com"}),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    assert!(body["spec"].get("clusterIP").is_none(), "{body}");

    // A dry run shows an address without taking it.
    let (code, body) = send(
        &admin,
        "POST",
        "/api/v1/namespaces/a/services?dryRun=All",
        service("dry", json!({})),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let dry_ip = body["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(dry_ip.starts_with("10.100.0."), "{body}");

    // The other five addresses go to five Services; the range is then full.
    let mut seen: HashSet<String> = ["10.100.0.2".to_string()].into();
    for i in 0..5 {
        let (code, body) = create_service(&admin, "a", &format!("s{i}"), json!({})).await;
        assert_eq!(code, 201, "{body}");
        let ip = body["spec"]["clusterIP"].as_str().unwrap().to_string();
        assert_eq!(body["spec"]["clusterIPs"], json!([ip]));
        assert!(seen.insert(ip.clone()), "{ip} handed out twice");
    }
    assert!(seen.contains(&dry_ip), "the dry run's address was free");
    let (code, body) = create_service(&admin, "a", "full", json!({})).await;
    assert_eq!(code, 500, "{body}");
    assert_eq!(
        message(&body),
        "Internal error occurred: failed to allocate a serviceIP: range is full"
    );
    // Deleting a Service frees its address; turning one into an ExternalName too.
    let (code, _, _) = raw(
        &admin,
        "DELETE",
        "/api/v1/namespaces/a/services/fixed",
        None,
        vec![],
    )
    .await;
    assert_eq!(code, 200);
    let (code, body) =
        create_service(&admin, "a", "reuse", json!({"clusterIP": "10.100.0.2"})).await;
    assert_eq!(code, 201, "{body}");
    let (_, s0) = send(&admin, "GET", "/api/v1/namespaces/a/services/s0", json!({})).await;
    let s0_ip = s0["spec"]["clusterIP"].as_str().unwrap().to_string();
    let (code, body) = send(
        &admin,
        "PATCH",
        "/api/v1/namespaces/a/services/s0",
        json!({"spec": {"type": "ExternalName", "externalName": "example.org",
            "clusterIP": null, "clusterIPs": null, "ports": null}}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = create_service(&admin, "a", "after", json!({})).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["spec"]["clusterIP"], json!(s0_ip));

    // Node ports: from the range, distinct, checked when requested, per tenant, freed when
    // the Service stops being a NodePort.
    let (code, _, _) = raw(
        &admin,
        "DELETE",
        "/api/v1/namespaces/a/services/s1",
        None,
        vec![],
    )
    .await;
    assert_eq!(code, 200);
    let (code, np) = create_service(
        &admin,
        "a",
        "np",
        json!({"type": "NodePort", "ports": [
            {"name": "web", "port": 80}, {"name": "tls", "port": 443},
            {"name": "fixed", "port": 8080, "nodePort": 30004}]}),
    )
    .await;
    assert_eq!(code, 201, "{np}");
    let ports = node_ports(&np);
    assert!(
        ports.iter().all(|p| (30000..=30004).contains(p)),
        "{ports:?}"
    );
    assert_eq!(ports.iter().collect::<HashSet<_>>().len(), 3, "{ports:?}");
    assert_eq!(ports[2], 30004);
    let (code, body) = send(
        &admin,
        "PATCH",
        "/api/v1/namespaces/a/services/reuse",
        json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30004}]}}),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(
        message(&body),
        "Service \"reuse\" is invalid: spec.ports[0].nodePort: Invalid value: 30004: provided port is already allocated"
    );
    let (code, body) = create_service(
        &admin,
        "b",
        "np3",
        json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 31000}]}),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        message(&body).contains("The range of valid ports is 30000-30004"),
        "{body}"
    );
    let (code, body) = create_service(
        &admin,
        "b",
        "np",
        json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30004}]}),
    )
    .await;
    assert_eq!(code, 201, "tenant beta's node ports are its own: {body}");
    // NodePort → ClusterIP frees the ports (kubectl sends the node ports away with the type).
    let (code, body) = send(
        &admin,
        "PATCH",
        "/api/v1/namespaces/a/services/np",
        json!({"spec": {"type": "ClusterIP", "ports": [{"name": "web", "port": 80}]}}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(node_ports(&body), vec![0]);
    let (code, body) = send(
        &admin,
        "PATCH",
        "/api/v1/namespaces/a/services/reuse",
        json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30004}]}}),
    )
    .await;
    assert_eq!(code, 200, "{body}");

    // Single-stack: IPv6 is refused as upstream refuses it on an IPv4 cluster.
    let (code, body) = create_service(&admin, "a", "v6", json!({"ipFamilies": ["IPv6"]})).await;
    assert_eq!(code, 422, "{body}");
    assert!(message(&body).contains("spec.ipFamilies[0]"), "{body}");

    // kubectl's own path.
    let out = cluster.kubectl_ok(&[
        "-n",
        "b",
        "create",
        "service",
        "clusterip",
        "web",
        "--tcp=80:8080",
    ]);
    assert!(out.contains("service/web created"), "{out}");
    let ip = cluster.kubectl_ok(&[
        "-n",
        "b",
        "get",
        "service",
        "web",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert!(ip.starts_with("10.100.0."), "{ip}");

    // A Tenant's range is fixed once set, and may not overlap its network.
    let (code, body) = send(
        &admin,
        "PATCH",
        "/apis/canopy.io/v1/tenants/acme",
        json!({"spec": {"network": {"serviceCidr": "10.101.0.0/24"}}}),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(message(&body).contains("field is immutable"), "{body}");
    let (code, body) = send(
        &admin,
        "POST",
        "/apis/canopy.io/v1/tenants",
        json!({"apiVersion": "canopy.io/v1", "kind": "Tenant", "metadata": {"name": "gamma"},
            "spec": {"projectId": "p", "network": {"cidr": "10.0.0.0/8"}}}),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        message(&body).contains("spec.network.serviceCidr: Invalid value: \"10.96.0.0/12\": must not overlap spec.network.cidr"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_survive_a_crash() {
    let mut cluster = Cluster::start(Backend::Embedded);
    let admin = cluster.client().await;
    tenant_namespace(&admin, "acme", "a", "10.100.0.0/24").await;
    let (code, body) = create_service(
        &admin,
        "a",
        "web",
        json!({"type": "NodePort", "ports": [{"port": 80}]}),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let ip = body["spec"]["clusterIP"].as_str().unwrap().to_string();
    let port = node_ports(&body)[0];
    cluster.crash_and_restart();
    let admin = cluster.client().await;
    let (code, body) = create_service(&admin, "a", "copy", json!({"clusterIP": ip})).await;
    assert_eq!(code, 422, "{body}");
    let (code, body) = create_service(
        &admin,
        "a",
        "copy",
        json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": port}]}),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        message(&body).contains("provided port is already allocated"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_api_servers_never_hand_out_one_address_twice() {
    common::require("etcd", "install Debian's etcd-server (.ci/run does)");
    let etcd = Etcd::start().expect("etcd");
    let store = format!("etcd={}", etcd.url);
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let flags = ["--disable-scheduler", "--controllers=namespace,tenant"];
    let start = |dir: &std::path::Path| {
        ServerProcess::start(&common::canopy_exe(), dir, &store, &flags).expect("server")
    };
    let servers = [start(dirs.0.path()), start(dirs.1.path())];
    let clients = [
        client_for(&servers[0].kubeconfig).await,
        client_for(&servers[1].kubeconfig).await,
    ];
    // 29 usable addresses (30 less the cluster DNS address, 10.100.0.10), 29 Services
    // created at once through both servers.
    tenant_namespace(&clients[0], "acme", "a", "10.100.0.0/27").await;
    let creates = (0..29).map(|i| {
        let client = clients[i % 2].clone();
        async move { create_service(&client, "a", &format!("s{i}"), json!({})).await }
    });
    let results = futures::future::join_all(creates).await;
    let mut ips = HashSet::new();
    for (code, body) in &results {
        assert_eq!(*code, 201, "{body}");
        assert!(
            ips.insert(body["spec"]["clusterIP"].as_str().unwrap().to_string()),
            "an address was handed out twice: {body}"
        );
    }
    assert!(
        !ips.contains("10.100.0.10"),
        "the DNS address went to a Service"
    );
    let (code, body) =
        create_service(&clients[0], "a", "dns", json!({"clusterIP": "10.100.0.10"})).await;
    assert_eq!(code, 422, "{body}");
    assert!(
        message(&body).contains("reserved for the cluster DNS"),
        "{body}"
    );
    let (code, body) = create_service(&clients[1], "a", "one-more", json!({})).await;
    assert_eq!(code, 500, "{body}");
}
