//! The scheduler through the API: a tenant's pods land only on that tenant's nodes, pods that
//! fit nowhere say why (condition and Event, upstream's wording), and are placed as soon as
//! their tenant gains a node.

mod common;

use std::time::{Duration, Instant};

use canopy::procs::{Etcd, ServerProcess};
use common::{Backend, Child, Cluster, client_for, http_get, sample, wait_for};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Event, Namespace, Node, Pod},
};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

async fn add_node(admin: &kube::Client, name: &str, tenant: &str, cpu: &str) {
    add_labelled_node(admin, name, tenant, cpu, json!({})).await
}

/// A node with labels besides its tenant's, set at creation so that the scheduler never sees
/// the node without them.
async fn add_labelled_node(
    admin: &kube::Client,
    name: &str,
    tenant: &str,
    cpu: &str,
    mut labels: serde_json::Value,
) {
    let nodes: Api<Node> = Api::all(admin.clone());
    labels["canopy.io/tenant"] = json!(tenant);
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let status = json!({"status": {
        "allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
        "capacity": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// Creates namespace `name` (with `labels`; a tenant's user needs none, admission sets its
/// tenant) and returns its pods.
async fn namespace_pods(client: &kube::Client, name: &str, labels: serde_json::Value) -> Api<Pod> {
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    Api::namespaced(client.clone(), name)
}

fn pod(name: &str, cpu: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "app", "image": "registry.local/app:1",
            "resources": {"requests": {"cpu": cpu, "memory": "256Mi"}}}]},
    }))
    .unwrap()
}

/// The message of a pod's `PodScheduled=False, Unschedulable` condition, once it has one.
async fn unschedulable(pods: &Api<Pod>, name: &str) -> Option<String> {
    pods.get(name)
        .await
        .ok()?
        .status?
        .conditions?
        .into_iter()
        .find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
        .map(|c| c.message.unwrap_or_default())
}

async fn node_of(pods: &Api<Pod>, name: &str) -> Option<String> {
    pods.get(name).await.ok()?.spec?.node_name
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_go_to_their_tenants_nodes_and_wait_for_room() {
    let cluster = Cluster::with_scheduler(Backend::Embedded);
    let admin = cluster.client().await;
    add_node(&admin, "acme-1", "acme", "2").await;
    add_node(&admin, "other-1", "other", "16").await;

    let acme = client_for(&cluster.user_kubeconfig("alice", Some("canopy:tenant:acme"))).await;
    let pods = namespace_pods(&acme, "shop", json!({})).await;
    pods.create(&PostParams::default(), &pod("web", "1500m"))
        .await
        .unwrap();
    let node = wait_for("web to be bound", async || node_of(&pods, "web").await).await;
    assert_eq!(node, "acme-1");

    // No room left on acme's node; the other tenant's big node does not count.
    pods.create(&PostParams::default(), &pod("worker", "1"))
        .await
        .unwrap();
    let message = wait_for("worker to be marked unschedulable", async || {
        unschedulable(&pods, "worker").await
    })
    .await;
    assert_eq!(message, "0/1 nodes are available: 1 Insufficient cpu.");
    assert!(node_of(&pods, "worker").await.is_none());
    let events: Api<Event> = Api::namespaced(acme.clone(), "shop");
    let failed = wait_for("a FailedScheduling event", async || {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("FailedScheduling"))
    })
    .await;
    assert_eq!(failed.involved_object.name.as_deref(), Some("worker"));
    assert_eq!(failed.message.as_deref(), Some(message.as_str()));

    // A new node for acme: the waiting pod is placed at once, on it.
    let added = Instant::now();
    add_node(&admin, "acme-2", "acme", "4").await;
    let node = wait_for("worker to be bound", async || {
        node_of(&pods, "worker").await
    })
    .await;
    assert_eq!(node, "acme-2");
    assert!(
        added.elapsed() < Duration::from_secs(5),
        "retried on the node's arrival, not on a timer"
    );

    // Freed capacity works the same way.
    pods.create(&PostParams::default(), &pod("batch", "3500m"))
        .await
        .unwrap();
    wait_for("batch to be unschedulable", async || {
        unschedulable(&pods, "batch").await
    })
    .await;
    pods.delete(
        "worker",
        &kube::api::DeleteParams::default().grace_period(0),
    )
    .await
    .unwrap();
    let node = wait_for("batch to be bound", async || node_of(&pods, "batch").await).await;
    assert_eq!(node, "acme-2");
}

/// A pod labelled `app=<app>` with one required term of `kind` (`podAffinity` or
/// `podAntiAffinity`) on `app=web` per host.
fn with_web_term(name: &str, app: &str, kind: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "containers": [{"name": "app", "image": "registry.local/app:1",
                "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}}],
            "affinity": {kind: {"requiredDuringSchedulingIgnoredDuringExecution": [{
                "labelSelector": {"matchLabels": {"app": "web"}},
                "topologyKey": "kubernetes.io/hostname",
            }]}},
        },
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn required_pod_affinity_and_anti_affinity_per_host() {
    let cluster = Cluster::with_scheduler(Backend::Embedded);
    let admin = cluster.client().await;
    for name in ["acme-1", "acme-2"] {
        let labels = json!({"kubernetes.io/hostname": name});
        add_labelled_node(&admin, name, "acme", "4", labels).await;
    }
    let acme = client_for(&cluster.user_kubeconfig("alice", Some("canopy:tenant:acme"))).await;
    let pods = namespace_pods(&acme, "shop", json!({})).await;
    let create = async |pod: Pod| {
        pods.create(&PostParams::default(), &pod).await.unwrap();
    };

    create(with_web_term("web-1", "web", "podAntiAffinity")).await;
    let first = wait_for("web-1 to be bound", async || node_of(&pods, "web-1").await).await;
    // web-1's node is the busier one: spreading alone would pick the other.
    create(with_web_term("cache", "cache", "podAffinity")).await;
    let cache = wait_for("cache to be bound", async || node_of(&pods, "cache").await).await;
    assert_eq!(cache, first, "the cache joins a web pod");

    create(with_web_term("web-2", "web", "podAntiAffinity")).await;
    let second = wait_for("web-2 to be bound", async || node_of(&pods, "web-2").await).await;
    assert_ne!(second, first, "web pods on different hosts");

    create(with_web_term("web-3", "web", "podAntiAffinity")).await;
    let message = wait_for("web-3 to be unschedulable", async || {
        unschedulable(&pods, "web-3").await
    })
    .await;
    assert_eq!(
        message,
        "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules."
    );
    assert!(node_of(&pods, "web-3").await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_without_nodes_is_told_so() {
    let cluster = Cluster::with_scheduler(Backend::Embedded);
    let admin = cluster.client().await;
    add_node(&admin, "other-1", "other", "16").await;
    let acme = client_for(&cluster.user_kubeconfig("alice", Some("canopy:tenant:acme"))).await;
    let pods = namespace_pods(&acme, "shop", json!({})).await;
    pods.create(&PostParams::default(), &pod("web", "100m"))
        .await
        .unwrap();
    let message = wait_for("web to be unschedulable", async || {
        unschedulable(&pods, "web").await
    })
    .await;
    assert_eq!(message, "no nodes available to schedule pods");
}

/// The pid in a lease holder's identity (`host_pid_suffix`).
async fn leader_pid(admin: &kube::Client, lease: &str) -> Option<u32> {
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "kube-system");
    let holder = leases.get(lease).await.ok()?.spec?.holder_identity?;
    holder.split('_').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn another_replica_schedules_when_the_leader_dies() {
    let etcd = Etcd::start().expect("etcd");
    let store = format!("etcd={}", etcd.url);
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let election = [
        "--leader-elect-lease-duration",
        "4s",
        "--leader-elect-renew-deadline",
        "3s",
        "--leader-elect-retry-period",
        "500ms",
    ];
    let start = |dir: &std::path::Path| {
        ServerProcess::start(&common::canopy_exe(), dir, &store, &election).expect("server")
    };
    let mut servers = [start(dirs.0.path()), start(dirs.1.path())];
    let admin = client_for(&servers[0].kubeconfig).await;
    let leader = wait_for("a scheduler leader", async || {
        leader_pid(&admin, "kube-scheduler").await
    })
    .await;
    let (leader_at, survivor_at) = if servers[0].pid() == leader {
        (0, 1)
    } else {
        (1, 0)
    };
    assert_eq!(
        servers[leader_at].pid(),
        leader,
        "the leader is one of the replicas"
    );
    // One leader for the controllers too.
    wait_for("a controller-manager leader", async || {
        leader_pid(&admin, "kube-controller-manager").await
    })
    .await;

    let survivor = client_for(&servers[survivor_at].kubeconfig).await;
    add_node(&survivor, "acme-1", "acme", "8").await;
    let pods = namespace_pods(&survivor, "shop", json!({"canopy.io/tenant": "acme"})).await;
    pods.create(&PostParams::default(), &pod("before", "1"))
        .await
        .unwrap();
    wait_for("before to be bound", async || {
        node_of(&pods, "before").await
    })
    .await;

    // Only the leader schedules.
    let leads = |dir: &std::path::Path| {
        std::fs::read_to_string(dir.join("server.log"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("became leader") && l.contains("kube-scheduler"))
    };
    assert_eq!(
        [leads(dirs.0.path()), leads(dirs.1.path())]
            .iter()
            .filter(|l| **l)
            .count(),
        1
    );
    servers[leader_at].kill();
    let killed = Instant::now();
    pods.create(&PostParams::default(), &pod("after", "1"))
        .await
        .unwrap();
    let node = wait_for("after to be bound by the new leader", async || {
        node_of(&pods, "after").await
    })
    .await;
    assert_eq!(node, "acme-1");
    assert!(
        killed.elapsed() < Duration::from_secs(12),
        "taken over within the lease duration (took {:?})",
        killed.elapsed()
    );
    assert_eq!(
        leader_pid(&survivor, "kube-scheduler").await,
        Some(servers[survivor_at].pid())
    );
}

/// The value of the first sample of `metric` whose labels include every one of `labels`.
/// One pod bound and one unschedulable in a fresh tenant `acme` with a 2-cpu node.
async fn bind_one_and_strand_one(admin: &kube::Client) {
    add_node(admin, "acme-1", "acme", "2").await;
    let pods = namespace_pods(admin, "shop", json!({"canopy.io/tenant": "acme"})).await;
    pods.create(&PostParams::default(), &pod("web", "1500m"))
        .await
        .unwrap();
    wait_for("web to be bound", async || node_of(&pods, "web").await).await;
    pods.create(&PostParams::default(), &pod("worker", "1"))
        .await
        .unwrap();
    wait_for("worker to be marked unschedulable", async || {
        unschedulable(&pods, "worker").await
    })
    .await;
}

fn assert_scheduler_metrics(exposition: &str) {
    let scheduled = sample(
        exposition,
        "scheduler_schedule_attempts_total",
        &[r#"result="scheduled""#, r#"profile="default-scheduler""#],
    );
    assert_eq!(scheduled, Some(1.0), "{exposition}");
    let unschedulable = sample(
        exposition,
        "scheduler_schedule_attempts_total",
        &[r#"result="unschedulable""#],
    );
    assert!(unschedulable >= Some(1.0), "{exposition}");
    assert_eq!(
        sample(
            exposition,
            "scheduler_pending_pods",
            &[r#"queue="unschedulable""#]
        ),
        Some(1.0),
        "{exposition}"
    );
    assert_eq!(
        sample(exposition, "scheduler_pending_pods", &[r#"queue="active""#]),
        Some(0.0),
        "{exposition}"
    );
    for histogram in [
        "scheduler_pod_scheduling_sli_duration_seconds_count",
        "canopy_scheduler_queue_wait_duration_seconds_count",
    ] {
        assert!(
            sample(exposition, histogram, &[]) >= Some(1.0),
            "{histogram}: {exposition}"
        );
    }
    assert_eq!(
        sample(
            exposition,
            "scheduler_framework_extension_point_duration_seconds_count",
            &[r#"extension_point="Bind""#, r#"status="Success""#],
        ),
        Some(1.0),
        "{exposition}"
    );
}

#[tokio::test]
async fn scheduler_metrics_show_on_the_servers_metrics() {
    let cluster = Cluster::with_scheduler(Backend::Embedded);
    let admin = cluster.client().await;
    bind_one_and_strand_one(&admin).await;
    let exposition = admin
        .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
        .await
        .unwrap();
    assert_scheduler_metrics(&exposition);
    // One end-of-file marker, at the end, after the API server's own metrics.
    assert_eq!(exposition.matches("# EOF").count(), 1);
    assert!(exposition.trim_end().ends_with("# EOF"));
    assert!(exposition.contains("apiserver_request_total"));
}

#[tokio::test]
async fn a_standalone_scheduler_serves_metrics_and_health() {
    let cluster = Cluster::start(Backend::Embedded);
    let admin = cluster.client().await;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _scheduler = Child(
        std::process::Command::new(common::canopy_exe())
            .arg("scheduler")
            .arg("--kubeconfig")
            .arg(cluster.kubeconfig())
            .arg("--metrics-bind-address")
            .arg(addr.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the scheduler's /readyz", async || {
        http_get(addr, "/readyz").filter(|answer| *answer == (200, "ok".to_string()))
    })
    .await;
    assert_eq!(http_get(addr, "/healthz"), Some((200, "ok".to_string())));
    assert_eq!(http_get(addr, "/nope").map(|(s, _)| s), Some(404));
    bind_one_and_strand_one(&admin).await;
    let (status, exposition) = http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert_scheduler_metrics(&exposition);
}
