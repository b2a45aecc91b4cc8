//! The garbage collector and the node lifecycle controller through the API: background,
//! foreground and orphan deletion by ownerReferences; nodes that stop renewing their Lease
//! go Unknown, are tainted, their pods marked not Ready and evicted as their tolerations
//! say, and come back when the kubelet does.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Backend, Cluster, wait_until};
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{ConfigMap, Event, Node, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
    jiff::Timestamp,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use serde_json::json;

async fn config_map(
    api: &Api<ConfigMap>,
    name: &str,
    owners: &[&ConfigMap],
    block: bool,
    finalizers: &[&str],
) -> ConfigMap {
    let refs: Vec<_> = owners
        .iter()
        .map(|o| {
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "name": o.metadata.name, "uid": o.metadata.uid, "blockOwnerDeletion": block})
        })
        .collect();
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": name, "ownerReferences": refs, "finalizers": finalizers},
        "data": {"k": "v"},
    }))
    .unwrap();
    api.create(&PostParams::default(), &cm).await.unwrap()
}

async fn gone(api: &Api<ConfigMap>, name: &str) -> Option<()> {
    api.get_opt(name).await.unwrap().is_none().then_some(())
}

const GC_WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn background_deletion_removes_dependents() {
    let cluster = Cluster::with_controllers(Backend::Embedded, &[]);
    let client = cluster.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let parent = config_map(&cms, "parent", &[], false, &[]).await;
    let child = config_map(&cms, "child", &[&parent], false, &[]).await;
    config_map(&cms, "grandchild", &[&child], false, &[]).await;
    let unrelated = config_map(&cms, "unrelated", &[], false, &[]).await;
    // A reference to an owner that never existed is garbage too.
    let mut ghost = unrelated.clone();
    ghost.metadata.name = Some("ghost".into());
    ghost.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
    config_map(&cms, "orphaned-from-birth", &[&ghost], false, &[]).await;

    cluster.kubectl_ok(&["delete", "configmap", "parent"]);
    wait_until("the child to be collected", GC_WAIT, async || {
        gone(&cms, "child").await
    })
    .await;
    wait_until("the grandchild to be collected", GC_WAIT, async || {
        gone(&cms, "grandchild").await
    })
    .await;
    wait_until(
        "a dependent of a missing owner to be collected",
        GC_WAIT,
        async || gone(&cms, "orphaned-from-birth").await,
    )
    .await;
    assert!(cms.get_opt("unrelated").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn foreground_deletion_waits_for_blocking_dependents() {
    let cluster = Cluster::with_controllers(Backend::Embedded, &[]);
    let client = cluster.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let parent = config_map(&cms, "parent", &[], false, &[]).await;
    // The dependent holds on with a finalizer of its own, so the owner must wait for it.
    config_map(&cms, "child", &[&parent], true, &["example.com/hold"]).await;

    cluster.kubectl_ok(&[
        "delete",
        "configmap",
        "parent",
        "--cascade=foreground",
        "--wait=false",
    ]);
    wait_until("the dependent to be deleted", GC_WAIT, async || {
        let child = cms.get("child").await.unwrap();
        child.metadata.deletion_timestamp.map(|_| ())
    })
    .await;
    let owner = cms.get("parent").await.unwrap();
    assert!(owner.metadata.deletion_timestamp.is_some());
    assert!(
        owner
            .metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"foregroundDeletion".to_string())
    );
    // The dependent is still there: so is its owner.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(cms.get_opt("parent").await.unwrap().is_some());

    cms.patch(
        "child",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    wait_until("the dependent to go", GC_WAIT, async || {
        gone(&cms, "child").await
    })
    .await;
    wait_until("the owner to go after its dependent", GC_WAIT, async || {
        gone(&cms, "parent").await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn foreground_deletion_through_the_api_deletes_a_chain() {
    let cluster = Cluster::with_controllers(Backend::Embedded, &[]);
    let client = cluster.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let parent = config_map(&cms, "parent", &[], false, &[]).await;
    let child = config_map(&cms, "child", &[&parent], true, &[]).await;
    config_map(&cms, "grandchild", &[&child], true, &[]).await;
    cms.delete("parent", &DeleteParams::foreground())
        .await
        .unwrap();
    for name in ["grandchild", "child", "parent"] {
        wait_until(name, GC_WAIT, async || gone(&cms, name).await).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn orphan_deletion_keeps_dependents_without_the_reference() {
    let cluster = Cluster::with_controllers(Backend::Embedded, &[]);
    let client = cluster.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let parent = config_map(&cms, "parent", &[], false, &[]).await;
    config_map(&cms, "child", &[&parent], true, &[]).await;

    cluster.kubectl_ok(&["delete", "configmap", "parent", "--cascade=orphan"]);
    wait_until("the owner to go", GC_WAIT, async || {
        gone(&cms, "parent").await
    })
    .await;
    let child = cms.get("child").await.unwrap();
    assert!(child.metadata.deletion_timestamp.is_none());
    assert!(
        child
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty(),
        "the orphan keeps no reference to its deleted owner"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(cms.get_opt("child").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dependent_of_two_owners_goes_with_the_last() {
    let cluster = Cluster::with_controllers(Backend::Embedded, &[]);
    let client = cluster.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let first = config_map(&cms, "first", &[], false, &[]).await;
    let second = config_map(&cms, "second", &[], false, &[]).await;
    config_map(&cms, "shared", &[&first, &second], false, &[]).await;

    cms.delete("first", &DeleteParams::background())
        .await
        .unwrap();
    wait_until(
        "the dangling reference to be removed",
        GC_WAIT,
        async || {
            let shared = cms.get("shared").await.unwrap();
            let refs = shared.metadata.owner_references.unwrap_or_default();
            (refs.len() == 1).then_some(refs)
        },
    )
    .await
    .iter()
    .for_each(|r| assert_eq!(r.name, "second"));
    assert!(
        cms.get("shared")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none()
    );

    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    cms.delete("second", &params).await.unwrap();
    wait_until(
        "the shared dependent to go with its last owner",
        GC_WAIT,
        async || gone(&cms, "shared").await,
    )
    .await;
}

// --- node lifecycle ---

fn now() -> serde_json::Value {
    serde_json::to_value(Time(Timestamp::now())).unwrap()
}

async fn post_ready(nodes: &Api<Node>, name: &str) {
    let status = json!({"status": {
        "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
        "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                        "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

async fn add_node(client: &kube::Client, name: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    post_ready(&nodes, name).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40},
    }))
    .unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    renew(&leases, name).await;
}

async fn renew(leases: &Api<Lease>, name: &str) {
    let renew_time = serde_json::to_value(MicroTime(Timestamp::now())).unwrap();
    leases
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"renewTime": renew_time}})),
        )
        .await
        .unwrap();
}

/// A pod bound to `node`, running and Ready, with these tolerations.
async fn running_pod(pods: &Api<Pod>, name: &str, node: &str, tolerations: serde_json::Value) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "tolerations": tolerations,
                 "containers": [{"name": "app", "image": "registry.local/app:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let status = json!({"status": {
        "phase": "Running", "podIP": "10.0.0.9",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now()}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

fn condition(node: &Node, type_: &str) -> Option<(String, Option<String>, Option<String>)> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn taints(node: &Node) -> Vec<String> {
    let mut taints: Vec<String> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .iter()
        .map(|t| format!("{}:{}", t.key, t.effect))
        .collect();
    taints.sort();
    taints
}

fn pod_ready(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

/// The pod is being deleted (or gone).
async fn evicted(pods: &Api<Pod>, name: &str) -> bool {
    match pods.get_opt(name).await.unwrap() {
        None => true,
        Some(pod) => pod.metadata.deletion_timestamp.is_some(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_nodes_are_tainted_and_their_pods_evicted() {
    let cluster = Cluster::with_controllers(
        Backend::Embedded,
        &[
            "--node-monitor-grace-period",
            "3s",
            "--pod-eviction-timeout",
            "5s",
        ],
    );
    let client = cluster.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    add_node(&client, "alive").await;
    add_node(&client, "lost").await;

    // The kubelets: `alive` renews its Lease all along, `lost` until told to stop.
    let lost_renews = Arc::new(AtomicBool::new(true));
    let kubelets = {
        let leases = leases.clone();
        let lost_renews = lost_renews.clone();
        tokio::spawn(async move {
            loop {
                renew(&leases, "alive").await;
                if lost_renews.load(Ordering::SeqCst) {
                    renew(&leases, "lost").await;
                }
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
        })
    };

    let unreachable = "node.kubernetes.io/unreachable";
    running_pod(
        &pods,
        "short",
        "lost",
        json!([{"key": unreachable, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 6}]),
    )
    .await;
    running_pod(
        &pods,
        "forever",
        "lost",
        json!([{"key": unreachable, "operator": "Exists", "effect": "NoExecute"}]),
    )
    .await;
    running_pod(&pods, "elsewhere", "alive", json!([])).await;

    // Renewed Leases keep both nodes Ready, well past the grace period.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for name in ["alive", "lost"] {
        let node = nodes.get(name).await.unwrap();
        assert_eq!(condition(&node, "Ready").unwrap().0, "True", "{name}");
        assert!(taints(&node).is_empty(), "{name}: {:?}", taints(&node));
    }

    lost_renews.store(false, Ordering::SeqCst);
    let stopped = Instant::now();
    let node = wait_until(
        "the lost node to go Unknown",
        Duration::from_secs(20),
        async || {
            let node = nodes.get("lost").await.unwrap();
            (condition(&node, "Ready")?.0 == "Unknown").then_some(node)
        },
    )
    .await;
    assert!(
        stopped.elapsed() >= Duration::from_secs(2),
        "Unknown only after the grace period"
    );
    assert_eq!(
        condition(&node, "Ready").unwrap(),
        (
            "Unknown".to_string(),
            Some("NodeStatusUnknown".to_string()),
            Some("Kubelet stopped posting node status.".to_string())
        )
    );
    for type_ in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
        assert_eq!(condition(&node, type_).unwrap().0, "Unknown", "{type_}");
    }
    let tainted = wait_until(
        "the unreachable taints",
        Duration::from_secs(10),
        async || {
            let node = nodes.get("lost").await.unwrap();
            (taints(&node).len() == 2).then_some(taints(&node))
        },
    )
    .await;
    assert_eq!(
        tainted,
        vec![
            format!("{unreachable}:NoExecute"),
            format!("{unreachable}:NoSchedule")
        ]
    );
    let alive = nodes.get("alive").await.unwrap();
    assert_eq!(condition(&alive, "Ready").unwrap().0, "True");
    assert!(taints(&alive).is_empty());

    for name in ["short", "forever"] {
        wait_until(
            "pods on the lost node to be marked not Ready",
            Duration::from_secs(10),
            async || {
                let pod = pods.get(name).await.unwrap();
                (pod_ready(&pod).as_deref() == Some("False")).then_some(())
            },
        )
        .await;
    }
    assert_eq!(
        pod_ready(&pods.get("elsewhere").await.unwrap()).as_deref(),
        Some("True")
    );
    assert!(
        !evicted(&pods, "short").await,
        "a tolerated taint does not evict at once"
    );

    wait_until(
        "the pod to be evicted once its toleration ran out",
        Duration::from_secs(20),
        async || evicted(&pods, "short").await.then_some(()),
    )
    .await;
    if let Some(pod) = pods.get_opt("short").await.unwrap() {
        let conditions = pod.status.unwrap().conditions.unwrap_or_default();
        assert!(
            conditions.iter().any(|c| c.type_ == "DisruptionTarget"
                && c.reason.as_deref() == Some("DeletionByTaintManager")),
            "{conditions:?}"
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !evicted(&pods, "forever").await,
        "a pod tolerating the taint forever stays"
    );
    assert!(!evicted(&pods, "elsewhere").await);

    // What happened is told by Events, as upstream's node and taint-eviction controllers
    // record them: on the node (cluster-scoped: namespace default) and on the pods.
    let reasons = async |namespace: &str, name: &str| -> Vec<(String, String, String)> {
        let api: Api<Event> = Api::namespaced(client.clone(), namespace);
        let selector = format!("involvedObject.name={name}");
        api.list(&ListParams::default().fields(&selector))
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| {
                (
                    e.reason.unwrap_or_default(),
                    e.source.and_then(|s| s.component).unwrap_or_default(),
                    e.message.unwrap_or_default(),
                )
            })
            .collect()
    };
    let node_events = reasons("default", "lost").await;
    for expected in [
        (
            "RegisteredNode",
            "Node lost event: Registered Node lost in Controller",
        ),
        ("NodeNotReady", "Node lost status is now: NodeNotReady"),
    ] {
        assert!(
            node_events
                .iter()
                .any(|(r, c, m)| (r.as_str(), m.as_str()) == expected && c == "node-controller"),
            "{expected:?} in {node_events:?}"
        );
    }
    let pod_events = reasons("default", "short").await;
    assert!(
        pod_events
            .iter()
            .any(|(r, c, _)| r == "NodeNotReady" && c == "node-controller"),
        "{pod_events:?}"
    );
    assert!(
        pod_events
            .iter()
            .any(|(r, c, m)| r == "TaintManagerEviction"
                && c == "taint-eviction-controller"
                && m == "Marking for deletion Pod default/short"),
        "{pod_events:?}"
    );

    // The kubelet is back: Ready again, taints removed.
    post_ready(&nodes, "lost").await;
    lost_renews.store(true, Ordering::SeqCst);
    wait_until(
        "the taints to be removed",
        Duration::from_secs(10),
        async || {
            let node = nodes.get("lost").await.unwrap();
            (condition(&node, "Ready")?.0 == "True" && taints(&node).is_empty()).then_some(())
        },
    )
    .await;
    kubelets.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_gc_deletes_pods_of_vanished_nodes_and_old_terminated_pods() {
    let cluster = Cluster::with_controllers(
        Backend::Embedded,
        &[
            "--pod-gc-quarantine",
            "1s",
            "--terminated-pod-gc-threshold",
            "2",
        ],
    );
    let client = cluster.client().await;
    add_node(&client, "stays").await;
    add_node(&client, "goes").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    running_pod(&pods, "orphan", "goes", json!([])).await;
    running_pod(&pods, "kept", "stays", json!([])).await;

    // The node goes (`kubectl delete node`): its pod is failed and deleted after the
    // quarantine; the other node's pod stays.
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .delete("goes", &DeleteParams::default())
        .await
        .unwrap();
    let deleted_after = Instant::now();
    wait_until("the orphaned pod to be deleted", GC_WAIT, async || {
        pods.get_opt("orphan")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        deleted_after.elapsed() >= Duration::from_millis(900),
        "deleted before the quarantine"
    );
    assert!(pods.get_opt("kept").await.unwrap().is_some());

    // Terminated pods beyond the threshold (2) go, oldest first.
    for name in ["done-1", "done-2", "done-3", "done-4"] {
        running_pod(&pods, name, "stays", json!([])).await;
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"phase": "Succeeded"}})),
        )
        .await
        .unwrap();
        // Creation timestamps have one-second steps: order them.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    wait_until(
        "the oldest terminated pods to be deleted",
        Duration::from_secs(30),
        async || {
            let names: Vec<String> = pods
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .filter_map(|p| p.metadata.name)
                .collect();
            (names == ["done-3", "done-4", "kept"]).then_some(())
        },
    )
    .await;
}
