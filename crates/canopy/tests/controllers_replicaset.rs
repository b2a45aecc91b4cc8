//! The ReplicaSet controller through the API: pods created to match replicas with the
//! ReplicaSet as their controller, status counting ready and available pods, scaling both
//! ways, replacement of deleted pods, adoption of matching orphans and release of pods that
//! stop matching.

mod common;

use std::time::Duration;

use common::{Backend, Cluster, wait_for};
use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    core::v1::{Event, Namespace, Pod},
};
use kube::{
    ResourceExt,
    api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

async fn namespace(client: &kube::Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

fn replica_set(name: &str, replicas: i32, min_ready_seconds: i32) -> ReplicaSet {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "minReadySeconds": min_ready_seconds,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, "tier": "web"}},
                "spec": {"containers": [{"name": "app", "image": "registry.local/app:1"}]},
            },
        },
    }))
    .unwrap()
}

/// Active pods (not being deleted) controlled by the ReplicaSet with `uid`.
async fn owned(pods: &Api<Pod>, uid: &str) -> Vec<Pod> {
    pods.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|r| r.uid == uid && r.controller == Some(true))
        })
        .collect()
}

/// What a kubelet reports once a pod runs: Running, an IP, Ready.
async fn mark_ready(pods: &Api<Pod>, name: &str) {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = json!({"status": {
        "phase": "Running",
        "podIP": "10.0.0.9",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

async fn status_of(api: &Api<ReplicaSet>, name: &str) -> (i32, i32, i32, Option<i64>) {
    let rs = api.get(name).await.unwrap();
    let s = rs.status.unwrap_or_default();
    (
        s.replicas,
        s.ready_replicas.unwrap_or(0),
        s.available_replicas.unwrap_or(0),
        s.observed_generation,
    )
}

#[tokio::test]
async fn replica_set_keeps_its_pods_and_reports_them() {
    let cluster = Cluster::with_controllers(Backend::Embedded, &[]);
    let client = cluster.client().await;
    namespace(&client, "shop").await;
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), "shop");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");

    let rs = rs_api
        .create(&PostParams::default(), &replica_set("web", 3, 0))
        .await
        .unwrap();
    let uid = rs.uid().unwrap();
    let created = wait_for("3 pods", async || {
        let owned = owned(&pods, &uid).await;
        (owned.len() == 3).then_some(owned)
    })
    .await;
    for pod in &created {
        assert!(pod.name_any().starts_with("web-"), "{}", pod.name_any());
        assert_eq!(pod.labels().get("tier").map(String::as_str), Some("web"));
        let owner = &pod.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("ReplicaSet", "web")
        );
        assert_eq!(owner.block_owner_deletion, Some(true));
    }
    wait_for("status replicas 3", async || {
        (status_of(&rs_api, "web").await == (3, 0, 0, Some(1))).then_some(())
    })
    .await;

    for pod in &created {
        mark_ready(&pods, &pod.name_any()).await;
    }
    wait_for("3 ready and available", async || {
        (status_of(&rs_api, "web").await == (3, 3, 3, Some(1))).then_some(())
    })
    .await;

    // Scale up with kubectl (the scale subresource), then down.
    cluster.kubectl_ok(&["-n", "shop", "scale", "replicaset/web", "--replicas=5"]);
    wait_for("5 pods", async || {
        (owned(&pods, &uid).await.len() == 5).then_some(())
    })
    .await;
    wait_for("status 5 with generation 2", async || {
        let (replicas, ready, _, generation) = status_of(&rs_api, "web").await;
        (replicas == 5 && ready == 3 && generation == Some(2)).then_some(())
    })
    .await;
    cluster.kubectl_ok(&["-n", "shop", "scale", "replicaset/web", "--replicas=3"]);
    let left = wait_for("3 pods again", async || {
        let owned = owned(&pods, &uid).await;
        (owned.len() == 3).then_some(owned)
    })
    .await;
    // Not-ready pods go first.
    let mut left: Vec<String> = left.iter().map(|p| p.name_any()).collect();
    let mut ready: Vec<String> = created.iter().map(|p| p.name_any()).collect();
    left.sort();
    ready.sort();
    assert_eq!(
        left, ready,
        "scaling down removed the pods that were not ready"
    );

    // A deleted pod is replaced.
    pods.delete(&ready[0], &DeleteParams::default())
        .await
        .unwrap();
    wait_for("a replacement", async || {
        let owned = owned(&pods, &uid).await;
        (owned.len() == 3 && owned.iter().all(|p| p.name_any() != ready[0])).then_some(())
    })
    .await;

    // Every creation and deletion was recorded as an Event of the ReplicaSet, as upstream's
    // controller records them, and kubectl describe shows them.
    let events: Api<Event> = Api::namespaced(client.clone(), "shop");
    let selector = format!("involvedObject.uid={uid}");
    let recorded = wait_for(
        "6 SuccessfulCreate and 2 SuccessfulDelete events",
        async || {
            let list = events
                .list(&ListParams::default().fields(&selector))
                .await
                .unwrap()
                .items;
            let count = |reason: &str| {
                list.iter()
                    .filter(|e| e.reason.as_deref() == Some(reason))
                    .count()
            };
            (count("SuccessfulCreate") == 6 && count("SuccessfulDelete") == 2).then_some(list)
        },
    )
    .await;
    for event in &recorded {
        assert_eq!(event.type_.as_deref(), Some("Normal"));
        assert_eq!(
            event.source.as_ref().and_then(|s| s.component.as_deref()),
            Some("replicaset-controller")
        );
        assert_eq!(event.involved_object.kind.as_deref(), Some("ReplicaSet"));
        assert_eq!(event.count, Some(1));
        let message = event.message.as_deref().unwrap_or_default();
        assert!(
            message.starts_with("Created pod: web-") || message.starts_with("Deleted pod: web-"),
            "{message}"
        );
    }
    let described = cluster.kubectl_ok(&["-n", "shop", "describe", "replicaset/web"]);
    assert!(
        described.contains("SuccessfulCreate") && described.contains("replicaset-controller"),
        "{described}"
    );
}

#[tokio::test]
async fn replica_set_adopts_orphans_and_releases_pods_that_stop_matching() {
    let cluster = Cluster::with_controllers(Backend::Embedded, &[]);
    let client = cluster.client().await;
    namespace(&client, "adopt").await;
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), "adopt");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "adopt");

    // An orphan that matches exists before the ReplicaSet: it is adopted and counts.
    let orphan: Pod = serde_json::from_value(json!({
        "metadata": {"name": "orphan", "labels": {"app": "api"}},
        "spec": {"containers": [{"name": "app", "image": "registry.local/app:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &orphan).await.unwrap();
    let rs = rs_api
        .create(&PostParams::default(), &replica_set("api", 2, 0))
        .await
        .unwrap();
    let uid = rs.uid().unwrap();
    let owned_now = wait_for("2 pods, one adopted", async || {
        let owned = owned(&pods, &uid).await;
        (owned.len() == 2).then_some(owned)
    })
    .await;
    assert!(
        owned_now.iter().any(|p| p.name_any() == "orphan"),
        "the orphan was adopted"
    );
    // Stays two: the orphan counted instead of a new pod.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(owned(&pods, &uid).await.len(), 2);

    // A pod relabelled out of the selector is released and replaced.
    pods.patch(
        "orphan",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "debugging"}}})),
    )
    .await
    .unwrap();
    wait_for("release and replacement", async || {
        let released = pods.get("orphan").await.unwrap();
        let owned = owned(&pods, &uid).await;
        (released.owner_references().is_empty()
            && owned.len() == 2
            && owned.iter().all(|p| p.name_any() != "orphan"))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn min_ready_seconds_delays_availability() {
    let cluster = Cluster::with_controllers(Backend::Embedded, &[]);
    let client = cluster.client().await;
    namespace(&client, "slow").await;
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), "slow");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "slow");
    let rs = rs_api
        .create(&PostParams::default(), &replica_set("db", 1, 2))
        .await
        .unwrap();
    let uid = rs.uid().unwrap();
    let pod = wait_for("a pod", async || owned(&pods, &uid).await.pop()).await;
    mark_ready(&pods, &pod.name_any()).await;
    wait_for("ready", async || {
        (status_of(&rs_api, "db").await.1 == 1).then_some(())
    })
    .await;
    assert_eq!(
        status_of(&rs_api, "db").await.2,
        0,
        "not available before 2 s"
    );
    // No event happens at the 2 s mark: the controller must look again by itself.
    wait_for("available after minReadySeconds", async || {
        (status_of(&rs_api, "db").await.2 == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_standalone_controller_manager_runs_the_controllers_and_serves_queue_metrics() {
    let cluster = Cluster::start_with(Backend::Embedded, &["--disable-controllers"]);
    let client = cluster.client().await;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _manager = common::Child(
        std::process::Command::new(common::canopy_exe())
            .args(["controller-manager", "--kubeconfig"])
            .arg(cluster.data_dir().join("controller-manager.kubeconfig"))
            .args(["--metrics-bind-address", &addr.to_string()])
            .args(["--controllers", "replicaset,namespace"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the controller manager's /readyz", async || {
        common::http_get(addr, "/readyz").filter(|answer| *answer == (200, "ok".to_string()))
    })
    .await;
    namespace(&client, "alone").await;
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), "alone");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "alone");
    let rs = rs_api
        .create(&PostParams::default(), &replica_set("svc", 2, 0))
        .await
        .unwrap();
    let uid = rs.uid().unwrap();
    wait_for("2 pods", async || {
        (owned(&pods, &uid).await.len() == 2).then_some(())
    })
    .await;

    let (status, exposition) = common::http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    let adds = common::sample(
        &exposition,
        "workqueue_adds_total",
        &[r#"name="replicaset""#, r#"lane="add""#],
    );
    assert!(adds >= Some(1.0), "{exposition}");
    for metric in [
        "workqueue_queue_duration_seconds_count",
        "workqueue_work_duration_seconds_count",
    ] {
        let count = common::sample(
            &exposition,
            metric,
            &[r#"name="replicaset""#, r#"lane="add""#],
        );
        assert!(count >= Some(1.0), "{metric}: {exposition}");
    }
    assert_eq!(
        common::sample(
            &exposition,
            "workqueue_depth",
            &[r#"name="replicaset""#, r#"lane="sync""#]
        ),
        Some(0.0)
    );

    // An unknown controller name is refused with the list of known ones.
    let out = std::process::Command::new(common::canopy_exe())
        .args(["controller-manager", "--kubeconfig"])
        .arg(cluster.data_dir().join("controller-manager.kubeconfig"))
        .args(["--controllers", "replicaset,nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown controller \"nope\""), "{stderr}");
}
