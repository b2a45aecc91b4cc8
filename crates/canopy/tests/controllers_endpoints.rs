//! The Endpoints, EndpointSlice and ServiceAccount controllers through the API: services get
//! Endpoints and EndpointSlices listing the pods they select as the pods' readiness (set by
//! the test, as a kubelet would) changes; every namespace gets a `default` ServiceAccount.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{Backend, Cluster, wait_for};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Endpoints, Namespace, Node, Pod, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// The server with every controller but node lifecycle: the test's node has no kubelet
/// renewing its Lease, and its pods must not be marked not ready behind the test's back.
fn cluster() -> Cluster {
    Cluster::with_controllers(Backend::Embedded, &["--controllers=*,-nodelifecycle"])
}

async fn create_namespace(client: &kube::Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

async fn create_node(client: &kube::Client, name: &str) {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
    }))
    .unwrap();
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
}

async fn create_service(client: &kube::Client, ns: &str, name: &str, spec: serde_json::Value) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"tier": "front"}},
        "spec": spec,
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
}

/// A pod on `node` with a container port named `http`.
async fn create_pod(client: &kube::Client, ns: &str, name: &str, port: i32) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "registry.local/app:1",
            "ports": [{"name": "http", "containerPort": port}]}]},
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
}

/// What a kubelet reports: running with an IP, ready or not.
async fn set_status(client: &kube::Client, ns: &str, name: &str, ip: &str, ready: bool) {
    // Transition times have second precision: each report a second after the previous one,
    // so that every readiness change is a new trigger time whatever the test's speed.
    static CLOCK: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let tick = CLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = (chrono::Utc::now() + chrono::Duration::seconds(tick))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = if ready { "True" } else { "False" };
    let patch = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": status, "lastTransitionTime": now}],
    }});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// The Endpoints' (ready IPs, not-ready IPs, ports), each sorted.
fn endpoints_shape(ep: &Endpoints) -> (Vec<String>, Vec<String>, Vec<(String, i32)>) {
    let mut ready = Vec::new();
    let mut not_ready = Vec::new();
    let mut ports = Vec::new();
    for subset in ep.subsets.iter().flatten() {
        ready.extend(subset.addresses.iter().flatten().map(|a| a.ip.clone()));
        not_ready.extend(
            subset
                .not_ready_addresses
                .iter()
                .flatten()
                .map(|a| a.ip.clone()),
        );
        for p in subset.ports.iter().flatten() {
            let port = (p.name.clone().unwrap_or_default(), p.port);
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
    }
    ready.sort();
    not_ready.sort();
    ports.sort();
    (ready, not_ready, ports)
}

async fn endpoints_of(client: &kube::Client, ns: &str, name: &str) -> Option<Endpoints> {
    Api::<Endpoints>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

async fn slices_of(client: &kube::Client, ns: &str, service: &str) -> Vec<EndpointSlice> {
    Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .unwrap()
        .items
}

/// Every endpoint of the slices: IP → ready condition.
fn slice_readiness(slices: &[EndpointSlice]) -> BTreeMap<String, bool> {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .map(|e| {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false);
            (e.addresses[0].clone(), ready)
        })
        .collect()
}

fn strings(ips: &[&str]) -> Vec<String> {
    ips.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_and_slices_follow_the_selected_ready_pods() {
    let cluster = cluster();
    let client = cluster.client().await;
    create_namespace(&client, "shop").await;
    create_node(&client, "node-1").await;
    create_service(
        &client,
        "shop",
        "web",
        json!({"selector": {"app": "web"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    )
    .await;
    // A service without a selector is left alone.
    create_service(
        &client,
        "shop",
        "external",
        json!({"ports": [{"port": 5432}]}),
    )
    .await;

    create_pod(&client, "shop", "web-1", 8080).await;
    create_pod(&client, "shop", "web-2", 8080).await;
    create_pod(&client, "shop", "web-3", 8080).await;
    // Selected but without an IP yet: listed nowhere.
    create_pod(&client, "shop", "web-4", 8080).await;
    set_status(&client, "shop", "web-1", "10.1.0.1", true).await;
    set_status(&client, "shop", "web-2", "10.1.0.2", true).await;
    set_status(&client, "shop", "web-3", "10.1.0.3", false).await;

    let expected = (
        strings(&["10.1.0.1", "10.1.0.2"]),
        strings(&["10.1.0.3"]),
        vec![("http".to_string(), 8080)],
    );
    let ep = wait_for("endpoints of the ready and not-ready pods", async || {
        let ep = endpoints_of(&client, "shop", "web").await?;
        (endpoints_shape(&ep) == expected).then_some(ep)
    })
    .await;
    assert_eq!(ep.metadata.labels.as_ref().unwrap()["tier"], "front");
    let address = &ep.subsets.as_ref().unwrap()[0].addresses.as_ref().unwrap()[0];
    assert_eq!(address.node_name.as_deref(), Some("node-1"));
    let target = address.target_ref.as_ref().unwrap();
    let web1 = Api::<Pod>::namespaced(client.clone(), "shop")
        .get("web-1")
        .await
        .unwrap();
    assert_eq!(target.kind.as_deref(), Some("Pod"));
    assert_eq!(target.name.as_deref(), Some("web-1"));
    assert_eq!(target.uid, web1.metadata.uid);

    let slices = wait_for("an endpoint slice of the three pods", async || {
        let slices = slices_of(&client, "shop", "web").await;
        (slice_readiness(&slices).len() == 3).then_some(slices)
    })
    .await;
    assert_eq!(slices.len(), 1);
    let slice = &slices[0];
    assert!(slice.metadata.name.as_ref().unwrap().starts_with("web-"));
    assert_eq!(slice.address_type, "IPv4");
    let labels = slice.metadata.labels.as_ref().unwrap();
    assert_eq!(
        labels["endpointslice.kubernetes.io/managed-by"],
        "endpointslice-controller.k8s.io"
    );
    assert_eq!(labels["tier"], "front");
    let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
    let svc = Api::<Service>::namespaced(client.clone(), "shop")
        .get("web")
        .await
        .unwrap();
    assert_eq!(owner.kind, "Service");
    assert_eq!(Some(&owner.uid), svc.metadata.uid.as_ref());
    assert_eq!(owner.controller, Some(true));
    let port = &slice.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.port),
        (Some("http"), Some(8080))
    );
    let readiness = slice_readiness(&slices);
    assert_eq!(
        readiness,
        BTreeMap::from([
            ("10.1.0.1".to_string(), true),
            ("10.1.0.2".to_string(), true),
            ("10.1.0.3".to_string(), false),
        ])
    );
    let endpoint = slice
        .endpoints
        .iter()
        .find(|e| e.addresses[0] == "10.1.0.1")
        .unwrap();
    assert_eq!(endpoint.node_name.as_deref(), Some("node-1"));
    assert_eq!(endpoint.zone.as_deref(), Some("zone-a"));
    assert_eq!(endpoint.target_ref.as_ref().unwrap().uid, web1.metadata.uid);
    let conditions = endpoint.conditions.as_ref().unwrap();
    assert_eq!(
        (conditions.ready, conditions.serving, conditions.terminating),
        (Some(true), Some(true), Some(false))
    );

    // Readiness changes move addresses; the trigger time says when.
    set_status(&client, "shop", "web-3", "10.1.0.3", true).await;
    set_status(&client, "shop", "web-1", "10.1.0.1", false).await;
    let expected = (
        strings(&["10.1.0.2", "10.1.0.3"]),
        strings(&["10.1.0.1"]),
        vec![("http".to_string(), 8080)],
    );
    // The trigger-time annotation is covered by the tracker's unit tests: through the API it
    // depends on how the readiness changes fall into syncs, which a loaded machine reorders.
    wait_for("web-1 not ready, web-3 ready", async || {
        let ep = endpoints_of(&client, "shop", "web").await?;
        (endpoints_shape(&ep) == expected).then_some(())
    })
    .await;
    wait_for("slices to follow readiness", async || {
        let readiness = slice_readiness(&slices_of(&client, "shop", "web").await);
        (readiness.get("10.1.0.1") == Some(&false) && readiness.get("10.1.0.3") == Some(&true))
            .then_some(())
    })
    .await;

    // A pod leaving the selector leaves both.
    let relabel = json!({"metadata": {"labels": {"app": "other"}}});
    Api::<Pod>::namespaced(client.clone(), "shop")
        .patch("web-2", &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .unwrap();
    let expected = (
        strings(&["10.1.0.3"]),
        strings(&["10.1.0.1"]),
        vec![("http".to_string(), 8080)],
    );
    wait_for("web-2 gone from the endpoints", async || {
        let ep = endpoints_of(&client, "shop", "web").await?;
        (endpoints_shape(&ep) == expected).then_some(())
    })
    .await;
    wait_for("web-2 gone from the slices", async || {
        let readiness = slice_readiness(&slices_of(&client, "shop", "web").await);
        (readiness.len() == 2 && !readiness.contains_key("10.1.0.2")).then_some(())
    })
    .await;

    // Endpoints deleted by hand come back.
    Api::<Endpoints>::namespaced(client.clone(), "shop")
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the endpoints to be written again", async || {
        let ep = endpoints_of(&client, "shop", "web").await?;
        (endpoints_shape(&ep) == expected).then_some(())
    })
    .await;

    // kubectl shows them.
    let out = cluster.kubectl_ok(&["get", "endpoints,endpointslices", "-n", "shop"]);
    assert!(out.contains("endpoints/web"), "{out}");
    assert!(out.contains("10.1.0.3:8080"), "{out}");
    assert!(out.contains("endpointslice.discovery.k8s.io/web-"), "{out}");
    assert!(out.contains("IPv4"), "{out}");

    // The selector-less service got nothing.
    assert!(endpoints_of(&client, "shop", "external").await.is_none());
    assert!(slices_of(&client, "shop", "external").await.is_empty());

    // Deleting the service deletes its Endpoints, and its slices through their owner.
    Api::<Service>::namespaced(client.clone(), "shop")
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the endpoints to be deleted", async || {
        endpoints_of(&client, "shop", "web")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    wait_for("the slices to be garbage collected", async || {
        slices_of(&client, "shop", "web")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn named_ports_publish_not_ready_and_headless_services() {
    let cluster = cluster();
    let client = cluster.client().await;
    create_namespace(&client, "apps").await;
    create_node(&client, "node-1").await;
    // Same named port, different numbers: one subset (and one slice) per number.
    create_pod(&client, "apps", "a", 8080).await;
    create_pod(&client, "apps", "b", 9090).await;
    set_status(&client, "apps", "a", "10.2.0.1", true).await;
    set_status(&client, "apps", "b", "10.2.0.2", false).await;
    create_service(
        &client,
        "apps",
        "named",
        json!({"selector": {"app": "web"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    )
    .await;
    create_service(
        &client,
        "apps",
        "everyone",
        json!({"selector": {"app": "web"}, "clusterIP": "None",
               "publishNotReadyAddresses": true}),
    )
    .await;

    let ep = wait_for("named ports resolved per pod", async || {
        let ep = endpoints_of(&client, "apps", "named").await?;
        (ep.subsets.as_ref().map_or(0, Vec::len) == 2).then_some(ep)
    })
    .await;
    let mut by_port: Vec<(i32, Vec<String>, Vec<String>)> = ep
        .subsets
        .unwrap()
        .into_iter()
        .map(|s| {
            let ips = |v: Option<Vec<k8s_openapi::api::core::v1::EndpointAddress>>| {
                v.into_iter().flatten().map(|a| a.ip).collect::<Vec<_>>()
            };
            (
                s.ports.unwrap()[0].port,
                ips(s.addresses),
                ips(s.not_ready_addresses),
            )
        })
        .collect();
    by_port.sort();
    assert_eq!(
        by_port,
        [
            (8080, strings(&["10.2.0.1"]), vec![]),
            (9090, vec![], strings(&["10.2.0.2"])),
        ]
    );
    let slices = wait_for("one slice per port", async || {
        let slices = slices_of(&client, "apps", "named").await;
        (slice_readiness(&slices).len() == 2).then_some(slices)
    })
    .await;
    let mut ports: Vec<i32> = slices
        .iter()
        .map(|s| s.ports.as_ref().unwrap()[0].port.unwrap())
        .collect();
    ports.sort();
    assert_eq!(ports, [8080, 9090]);

    // Headless, publishing not-ready pods: every address ready, no ports, marked headless.
    let ep = wait_for("headless endpoints", async || {
        let ep = endpoints_of(&client, "apps", "everyone").await?;
        (endpoints_shape(&ep).0.len() == 2).then_some(ep)
    })
    .await;
    assert_eq!(
        endpoints_shape(&ep),
        (strings(&["10.2.0.1", "10.2.0.2"]), vec![], vec![])
    );
    assert_eq!(
        ep.metadata.labels.as_ref().unwrap()["service.kubernetes.io/headless"],
        ""
    );
    let readiness = wait_for("headless slices", async || {
        let readiness = slice_readiness(&slices_of(&client, "apps", "everyone").await);
        (readiness.len() == 2).then_some(readiness)
    })
    .await;
    assert!(readiness.values().all(|r| *r), "{readiness:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn more_than_a_hundred_pods_make_two_slices() {
    let cluster = cluster();
    let client = cluster.client().await;
    create_namespace(&client, "big").await;
    create_node(&client, "node-1").await;
    create_service(
        &client,
        "big",
        "web",
        json!({"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}),
    )
    .await;
    let pods = 105;
    for i in 0..pods {
        let name = format!("web-{i:03}");
        create_pod(&client, "big", &name, 8080).await;
        set_status(&client, "big", &name, &format!("10.3.0.{}", i + 1), true).await;
    }
    let slices = wait_for("105 endpoints in slices", async || {
        let slices = slices_of(&client, "big", "web").await;
        (slice_readiness(&slices).len() == pods).then_some(slices)
    })
    .await;
    let mut sizes: Vec<usize> = slices.iter().map(|s| s.endpoints.len()).collect();
    sizes.sort();
    assert_eq!(sizes, [5, 100]);
    wait_for("105 ready addresses in the endpoints", async || {
        let ep = endpoints_of(&client, "big", "web").await?;
        (endpoints_shape(&ep).0.len() == pods).then_some(())
    })
    .await;
}

async fn default_account(client: &kube::Client, ns: &str) -> Option<ServiceAccount> {
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get_opt("default")
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_active_namespace_has_a_default_service_account() {
    let cluster = cluster();
    let client = cluster.client().await;
    for ns in ["default", "kube-system"] {
        wait_for(&format!("the default account of {ns}"), async || {
            default_account(&client, ns).await
        })
        .await;
    }
    create_namespace(&client, "team").await;
    let first = wait_for("the default account of team", async || {
        default_account(&client, "team").await
    })
    .await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "team");
    accounts
        .delete("default", &DeleteParams::default())
        .await
        .unwrap();
    let second = wait_for("the default account to come back", async || {
        default_account(&client, "team")
            .await
            .filter(|sa| sa.metadata.uid != first.metadata.uid)
    })
    .await;
    assert_eq!(second.metadata.name.as_deref(), Some("default"));
    let out = cluster.kubectl_ok(&["get", "serviceaccounts", "-n", "team"]);
    assert!(out.contains("default"), "{out}");

    // A terminating namespace gets none: hold the namespace in Terminating with a finalizer
    // on its content, then delete its account.
    let hold: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "hold", "finalizers": ["example.com/hold"]},
    }))
    .unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "team");
    configmaps
        .create(&PostParams::default(), &hold)
        .await
        .unwrap();
    Api::<Namespace>::all(client.clone())
        .delete("team", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the namespace to terminate and its account to go",
        async || {
            let ns = Api::<Namespace>::all(client.clone())
                .get("team")
                .await
                .ok()?;
            let terminating = ns.status?.phase.as_deref() == Some("Terminating");
            if !terminating {
                return None;
            }
            // The namespace controller deletes the account; delete it too in case it has not.
            let _ = accounts.delete("default", &DeleteParams::default()).await;
            default_account(&client, "team")
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        default_account(&client, "team").await.is_none(),
        "a default account was made in a terminating namespace"
    );
    // Let the namespace go.
    let release = json!({"metadata": {"finalizers": null}});
    configmaps
        .patch("hold", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    wait_for("the namespace to be gone", async || {
        Api::<Namespace>::all(client.clone())
            .get_opt("team")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}
