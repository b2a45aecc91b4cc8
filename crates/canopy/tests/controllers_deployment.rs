//! The deployment controller end to end, driven by kubectl as a user would: rollouts
//! (RollingUpdate within maxSurge/maxUnavailable, Recreate), `kubectl rollout
//! status/history/undo/pause/resume`, `kubectl scale`, and the progress deadline. The
//! ReplicaSet controller makes the pods; the test plays the kubelet and marks them Ready.

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::{Backend, Cluster, eventually, wait_for};
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::{Event, Pod},
};
use kube::{
    ResourceExt,
    api::{Api, ListParams, Patch, PatchParams},
};
use serde_json::json;

/// A simulated kubelet for one namespace: every pod that is not Ready yet (and whose image
/// is not `broken`) is set Running and Ready through the status subresource.
fn start_kubelet(client: kube::Client, namespace: &str) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let flag = stop.clone();
    tokio::spawn(async move {
        let mut ip = 10;
        while !flag.load(Ordering::Relaxed) {
            if let Ok(list) = pods.list(&ListParams::default()).await {
                for pod in list.items {
                    let ready = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    let broken = pod.spec.as_ref().is_some_and(|s| {
                        s.containers
                            .iter()
                            .any(|c| c.image.as_deref().unwrap_or("").contains("broken"))
                    });
                    if ready || broken || pod.metadata.deletion_timestamp.is_some() {
                        continue;
                    }
                    ip += 1;
                    let now = k8s_openapi::jiff::Timestamp::now().to_string();
                    let status = json!({"status": {
                        "phase": "Running",
                        "podIP": format!("10.0.{}.{}", ip / 250, ip % 250),
                        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
                    }});
                    let name = pod.metadata.name.unwrap_or_default();
                    let _ = pods
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    stop
}

fn deployment_yaml(
    name: &str,
    replicas: i32,
    image: &str,
    strategy: &str,
    extra_spec: &str,
) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: {name}
  strategy:
{strategy}
{extra_spec}
  template:
    metadata:
      labels:
        app: {name}
    spec:
      containers:
      - name: app
        image: {image}
"#
    )
}

/// Blocking kubectl/eventually calls must not hold the runtime's worker threads.
/// `kubectl rollout status` of a deployment, which must succeed within a minute.
fn rollout_status(cluster: &Cluster, ns: &str, name: &str) -> String {
    cluster.kubectl_ok(&[
        "-n",
        ns,
        "rollout",
        "status",
        &format!("deployment/{name}"),
        "--timeout=60s",
    ])
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn replica_sets(client: &kube::Client, ns: &str) -> Vec<ReplicaSet> {
    Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

async fn live_pods(client: &kube::Client, ns: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

fn image_of(pod: &Pod) -> String {
    pod.spec.as_ref().unwrap().containers[0]
        .image
        .clone()
        .unwrap_or_default()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn annotation(rs: &ReplicaSet, key: &str) -> Option<String> {
    rs.metadata.annotations.as_ref()?.get(key).cloned()
}

fn rs_image(rs: &ReplicaSet) -> String {
    rs.spec
        .as_ref()
        .unwrap()
        .template
        .as_ref()
        .unwrap()
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone()
        .unwrap_or_default()
}

fn progressing_reason(d: &Deployment) -> Option<String> {
    d.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Progressing")?
        .reason
        .clone()
}

/// Samples the namespace during a rollout: the most pods that existed at once, and the
/// fewest Ready ones.
fn sample_rollout(
    client: kube::Client,
    ns: &'static str,
) -> (
    Arc<AtomicBool>,
    tokio::task::JoinHandle<(usize, usize, i32)>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = tokio::spawn(async move {
        let (mut max_pods, mut min_ready, mut max_rs_total) = (0, usize::MAX, 0);
        while !flag.load(Ordering::Relaxed) {
            let pods = live_pods(&client, ns).await;
            max_pods = max_pods.max(pods.len());
            min_ready = min_ready.min(pods.iter().filter(|p| is_ready(p)).count());
            let total: i32 = replica_sets(&client, ns)
                .await
                .iter()
                .map(|rs| rs.spec.as_ref().unwrap().replicas.unwrap_or(0))
                .sum();
            max_rs_total = max_rs_total.max(total);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (max_pods, min_ready, max_rs_total)
    });
    (stop, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_update_history_undo_pause_and_scale() {
    let cluster = Arc::new(Cluster::with_controllers(Backend::Embedded, &[]));
    let client = cluster.client().await;
    const NS: &str = "shop";
    cluster.kubectl_ok(&["create", "namespace", NS]);
    let kubelet = start_kubelet(client.clone(), NS);

    let yaml = deployment_yaml(
        "web",
        4,
        "registry.local/web:1",
        "    type: RollingUpdate\n    rollingUpdate:\n      maxSurge: 1\n      maxUnavailable: 1",
        "",
    );
    let c = cluster.clone();
    blocking(move || {
        c.kubectl_stdin(&["-n", NS, "apply", "-f", "-"], &yaml);
        rollout_status(&c, NS, "web");
    })
    .await;

    // One replica set, named after its template hash, which labels it and its pods.
    let rss = replica_sets(&client, NS).await;
    assert_eq!(rss.len(), 1, "{rss:?}");
    let first = &rss[0];
    let hash = first.metadata.labels.as_ref().unwrap()["pod-template-hash"].clone();
    assert_eq!(
        first.metadata.name.as_deref(),
        Some(format!("web-{hash}").as_str())
    );
    assert_eq!(
        first
            .spec
            .as_ref()
            .unwrap()
            .selector
            .match_labels
            .as_ref()
            .unwrap()["pod-template-hash"],
        hash
    );
    assert_eq!(
        annotation(first, "deployment.kubernetes.io/revision").as_deref(),
        Some("1")
    );
    assert_eq!(
        annotation(first, "deployment.kubernetes.io/desired-replicas").as_deref(),
        Some("4")
    );
    assert_eq!(
        annotation(first, "deployment.kubernetes.io/max-replicas").as_deref(),
        Some("5")
    );
    let pods = live_pods(&client, NS).await;
    assert_eq!(pods.len(), 4);
    assert!(
        pods.iter()
            .all(|p| p.metadata.labels.as_ref().unwrap()["pod-template-hash"] == hash)
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let d = deployments.get("web").await.unwrap();
    let status = d.status.clone().unwrap();
    assert_eq!(status.observed_generation, d.metadata.generation);
    assert_eq!(
        (
            status.replicas,
            status.updated_replicas,
            status.ready_replicas,
            status.available_replicas
        ),
        (Some(4), Some(4), Some(4), Some(4))
    );
    let conditions: BTreeMap<String, (String, String)> = status
        .conditions
        .unwrap()
        .into_iter()
        .map(|c| (c.type_, (c.status, c.reason.unwrap_or_default())))
        .collect();
    assert_eq!(
        conditions["Available"],
        ("True".into(), "MinimumReplicasAvailable".into())
    );
    assert_eq!(
        conditions["Progressing"],
        ("True".into(), "NewReplicaSetAvailable".into())
    );
    assert_eq!(
        d.metadata.annotations.as_ref().unwrap()["deployment.kubernetes.io/revision"],
        "1"
    );

    // A rolling update stays within maxSurge (5 pods at most) and maxUnavailable (3 Ready
    // at least).
    let (stop, sampler) = sample_rollout(client.clone(), NS);
    let c = cluster.clone();
    blocking(move || {
        c.kubectl_ok(&[
            "-n",
            NS,
            "set",
            "image",
            "deployment/web",
            "app=registry.local/web:2",
        ]);
        c.kubectl_ok(&[
            "-n",
            NS,
            "annotate",
            "deployment/web",
            "kubernetes.io/change-cause=web version 2",
        ]);
        rollout_status(&c, NS, "web");
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (max_pods, min_ready, max_rs_total) = sampler.await.unwrap();
    assert!(
        max_rs_total <= 5,
        "replica sets asked for {max_rs_total} pods at once"
    );
    assert!(
        max_pods <= 5,
        "{max_pods} pods at once, beyond replicas + maxSurge"
    );
    assert!(min_ready >= 3, "only {min_ready} ready pods at one point");
    let pods = live_pods(&client, NS).await;
    assert_eq!(pods.len(), 4);
    assert!(pods.iter().all(|p| image_of(p) == "registry.local/web:2"));

    let c = cluster.clone();
    let history = blocking(move || {
        // The change cause reaches the new replica set on the sync after the annotation.
        let ok = eventually(Duration::from_secs(10), || {
            c.kubectl_ok(&["-n", NS, "rollout", "history", "deployment/web"])
                .contains("web version 2")
        });
        assert!(ok, "change cause never copied");
        c.kubectl_ok(&["-n", NS, "rollout", "history", "deployment/web"])
    })
    .await;
    let revisions: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.parse::<u32>().is_ok())
        .collect();
    assert_eq!(revisions, ["1", "2"], "{history}");

    // Undo brings back the first template: its replica set becomes revision 3 and remembers
    // it was revision 1.
    let c = cluster.clone();
    blocking(move || {
        c.kubectl_ok(&["-n", NS, "rollout", "undo", "deployment/web"]);
        rollout_status(&c, NS, "web");
    })
    .await;
    let rss = replica_sets(&client, NS).await;
    let back = rss
        .iter()
        .find(|rs| rs.metadata.name == first.metadata.name)
        .unwrap();
    assert_eq!(
        annotation(back, "deployment.kubernetes.io/revision").as_deref(),
        Some("3")
    );
    assert_eq!(
        annotation(back, "deployment.kubernetes.io/revision-history").as_deref(),
        Some("1")
    );
    assert_eq!(back.spec.as_ref().unwrap().replicas, Some(4));
    let pods = live_pods(&client, NS).await;
    assert!(pods.len() == 4 && pods.iter().all(|p| image_of(p) == "registry.local/web:1"));
    let c = cluster.clone();
    let history =
        blocking(move || c.kubectl_ok(&["-n", NS, "rollout", "history", "deployment/web"])).await;
    let revisions: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.parse::<u32>().is_ok())
        .collect();
    assert_eq!(revisions, ["2", "3"], "{history}");

    // Paused: a template change rolls nothing out, but scaling applies.
    let c = cluster.clone();
    blocking(move || {
        c.kubectl_ok(&["-n", NS, "rollout", "pause", "deployment/web"]);
        c.kubectl_ok(&[
            "-n",
            NS,
            "set",
            "image",
            "deployment/web",
            "app=registry.local/web:3",
        ]);
        c.kubectl_ok(&["-n", NS, "scale", "deployment/web", "--replicas=6"]);
    })
    .await;
    let mut scaled = false;
    for _ in 0..100 {
        let pods = live_pods(&client, NS).await;
        if pods.len() == 6 && pods.iter().filter(|p| is_ready(p)).count() == 6 {
            scaled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(scaled, "a paused deployment must still scale");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = replica_sets(&client, NS).await;
    assert!(
        rss.iter().all(|rs| rs_image(rs) != "registry.local/web:3"),
        "a paused deployment rolled out"
    );
    assert!(
        live_pods(&client, NS)
            .await
            .iter()
            .all(|p| image_of(p) == "registry.local/web:1")
    );
    let d = deployments.get("web").await.unwrap();
    assert_eq!(progressing_reason(&d).as_deref(), Some("DeploymentPaused"));

    let c = cluster.clone();
    blocking(move || {
        c.kubectl_ok(&["-n", NS, "rollout", "resume", "deployment/web"]);
        rollout_status(&c, NS, "web");
    })
    .await;
    let pods = live_pods(&client, NS).await;
    assert_eq!(pods.len(), 6);
    assert!(pods.iter().all(|p| image_of(p) == "registry.local/web:3"));
    let d = deployments.get("web").await.unwrap();
    assert_eq!(
        progressing_reason(&d).as_deref(),
        Some("NewReplicaSetAvailable")
    );

    // Scale down.
    let c = cluster.clone();
    blocking(move || c.kubectl_ok(&["-n", NS, "scale", "deployment/web", "--replicas=2"])).await;
    let mut down = false;
    for _ in 0..100 {
        let d = deployments.get("web").await.unwrap();
        let s = d.status.unwrap_or_default();
        if live_pods(&client, NS).await.len() == 2
            && s.replicas == Some(2)
            && s.available_replicas == Some(2)
        {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(down, "scaling down to 2 did not happen\n{}", cluster.log());
    kubelet.store(true, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recreate_replaces_all_pods_at_once() {
    let cluster = Arc::new(Cluster::with_controllers(Backend::Embedded, &[]));
    let client = cluster.client().await;
    const NS: &str = "batch";
    cluster.kubectl_ok(&["create", "namespace", NS]);
    let kubelet = start_kubelet(client.clone(), NS);
    let yaml = deployment_yaml("db", 3, "registry.local/db:1", "    type: Recreate", "");
    let c = cluster.clone();
    blocking(move || {
        c.kubectl_stdin(&["-n", NS, "apply", "-f", "-"], &yaml);
        rollout_status(&c, NS, "db");
    })
    .await;
    assert_eq!(live_pods(&client, NS).await.len(), 3);

    // Old and new pods never run together.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let sampler_client = client.clone();
    let sampler = tokio::spawn(async move {
        let mut mixed = None;
        while !flag.load(Ordering::Relaxed) {
            let pods = Api::<Pod>::namespaced(sampler_client.clone(), NS)
                .list(&ListParams::default())
                .await
                .unwrap()
                .items;
            let images: std::collections::BTreeSet<String> = pods.iter().map(image_of).collect();
            if images.len() > 1 {
                mixed = Some(images);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        mixed
    });
    let c = cluster.clone();
    blocking(move || {
        c.kubectl_ok(&[
            "-n",
            NS,
            "set",
            "image",
            "deployment/db",
            "app=registry.local/db:2",
        ]);
        rollout_status(&c, NS, "db");
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(
        sampler.await.unwrap(),
        None,
        "old and new pods ran together"
    );
    let pods = live_pods(&client, NS).await;
    assert_eq!(pods.len(), 3);
    assert!(pods.iter().all(|p| image_of(p) == "registry.local/db:2"));
    let rss = replica_sets(&client, NS).await;
    assert_eq!(rss.len(), 2);
    let old = rss
        .iter()
        .find(|rs| rs_image(rs) == "registry.local/db:1")
        .unwrap();
    assert_eq!(old.spec.as_ref().unwrap().replicas, Some(0));
    assert_eq!(
        annotation(old, "deployment.kubernetes.io/revision").as_deref(),
        Some("1")
    );
    let new = rss
        .iter()
        .find(|rs| rs_image(rs) == "registry.local/db:2")
        .unwrap();

    // The scaling is told by the Deployment's Events, as upstream words them.
    let expected = [
        format!("Scaled up replica set {} from 0 to 3", old.name_any()),
        format!("Scaled down replica set {} from 3 to 0", old.name_any()),
        format!("Scaled up replica set {} from 0 to 3", new.name_any()),
    ];
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    wait_for("the ScalingReplicaSet events", async || {
        let messages: Vec<String> = events
            .list(&ListParams::default().fields(
                "involvedObject.kind=Deployment,involvedObject.name=db,reason=ScalingReplicaSet",
            ))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| {
                e.source.as_ref().and_then(|s| s.component.as_deref())
                    == Some("deployment-controller")
            })
            .filter_map(|e| e.message)
            .collect();
        expected.iter().all(|m| messages.contains(m)).then_some(())
    })
    .await;
    let c = cluster.clone();
    let described = blocking(move || c.kubectl_ok(&["-n", NS, "describe", "deployment/db"])).await;
    assert!(described.contains("ScalingReplicaSet"), "{described}");
    kubelet.store(true, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn progress_deadline_exceeded_when_pods_never_become_ready() {
    let cluster = Arc::new(Cluster::with_controllers(Backend::Embedded, &[]));
    let client = cluster.client().await;
    const NS: &str = "stuck";
    cluster.kubectl_ok(&["create", "namespace", NS]);
    let kubelet = start_kubelet(client.clone(), NS);
    let yaml = deployment_yaml(
        "api",
        2,
        "registry.local/api:broken",
        "    type: RollingUpdate",
        "  progressDeadlineSeconds: 3\n  revisionHistoryLimit: 1",
    );
    let c = cluster.clone();
    let out = blocking(move || {
        c.kubectl_stdin(&["-n", NS, "apply", "-f", "-"], &yaml);
        c.kubectl(&[
            "-n",
            NS,
            "rollout",
            "status",
            "deployment/api",
            "--timeout=60s",
        ])
    })
    .await;
    assert!(!out.status.success(), "rollout status must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exceeded its progress deadline"),
        "{stderr}"
    );
    let d = Api::<Deployment>::namespaced(client.clone(), NS)
        .get("api")
        .await
        .unwrap();
    assert_eq!(
        progressing_reason(&d).as_deref(),
        Some("ProgressDeadlineExceeded")
    );
    let available = d
        .status
        .as_ref()
        .unwrap()
        .conditions
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.type_ == "Available")
        .cloned()
        .unwrap();
    assert_eq!(
        (available.status.as_str(), available.reason.as_deref()),
        ("False", Some("MinimumReplicasUnavailable"))
    );

    // A fixed template makes progress again, and the revision history limit keeps one old
    // replica set.
    let c = cluster.clone();
    blocking(move || {
        c.kubectl_ok(&[
            "-n",
            NS,
            "set",
            "image",
            "deployment/api",
            "app=registry.local/api:2",
        ]);
        rollout_status(&c, NS, "api");
        c.kubectl_ok(&[
            "-n",
            NS,
            "set",
            "image",
            "deployment/api",
            "app=registry.local/api:3",
        ]);
        rollout_status(&c, NS, "api");
    })
    .await;
    let d = Api::<Deployment>::namespaced(client.clone(), NS)
        .get("api")
        .await
        .unwrap();
    assert_eq!(
        progressing_reason(&d).as_deref(),
        Some("NewReplicaSetAvailable")
    );
    let mut cleaned = false;
    for _ in 0..100 {
        if replica_sets(&client, NS).await.len() == 2 {
            cleaned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let names: Vec<_> = replica_sets(&client, NS)
        .await
        .into_iter()
        .map(|rs| (rs.metadata.name.clone(), rs_image(&rs)))
        .collect();
    assert!(
        cleaned,
        "old replica sets beyond revisionHistoryLimit remain: {names:?}"
    );
    kubelet.store(true, Ordering::Relaxed);
}

async fn rs_sizes(client: &kube::Client, ns: &str) -> BTreeMap<String, i32> {
    replica_sets(client, ns)
        .await
        .iter()
        .map(|rs| {
            (
                rs_image(rs),
                rs.spec.as_ref().unwrap().replicas.unwrap_or(0),
            )
        })
        .collect()
}

async fn wait_sizes(
    client: &kube::Client,
    ns: &str,
    want: &[(&str, i32)],
) -> BTreeMap<String, i32> {
    let want: BTreeMap<String, i32> = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let mut got = BTreeMap::new();
    for _ in 0..150 {
        got = rs_sizes(client, ns).await;
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scaling_mid_rollout_is_proportional_and_orphans_are_adopted() {
    let cluster = Arc::new(Cluster::with_controllers(Backend::Embedded, &[]));
    let client = cluster.client().await;
    const NS: &str = "grow";
    cluster.kubectl_ok(&["create", "namespace", NS]);
    let kubelet = start_kubelet(client.clone(), NS);
    let yaml = deployment_yaml(
        "web",
        4,
        "registry.local/web:1",
        "    type: RollingUpdate\n    rollingUpdate:\n      maxSurge: 1\n      maxUnavailable: 1",
        "",
    );
    let c = cluster.clone();
    blocking(move || {
        c.kubectl_stdin(&["-n", NS, "apply", "-f", "-"], &yaml);
        rollout_status(&c, NS, "web");
        c.kubectl_ok(&[
            "-n",
            NS,
            "set",
            "image",
            "deployment/web",
            "app=registry.local/web:broken",
        ]);
    })
    .await;
    // The new pods never get ready: the rollout stops at 3 old + 2 new (4 + maxSurge 1,
    // at most 1 unavailable).
    let got = wait_sizes(
        &client,
        NS,
        &[
            ("registry.local/web:1", 3),
            ("registry.local/web:broken", 2),
        ],
    )
    .await;
    assert_eq!(got["registry.local/web:1"], 3, "{got:?}");
    assert_eq!(got["registry.local/web:broken"], 2, "{got:?}");

    // Scaling to 8 (9 with the surge) shares the 4 more replicas 3:2 (rounded), as
    // upstream's proportional scaling: 5 and 4.
    let c = cluster.clone();
    blocking(move || c.kubectl_ok(&["-n", NS, "scale", "deployment/web", "--replicas=8"])).await;
    let got = wait_sizes(
        &client,
        NS,
        &[
            ("registry.local/web:1", 5),
            ("registry.local/web:broken", 4),
        ],
    )
    .await;
    assert_eq!(
        (
            got["registry.local/web:1"],
            got["registry.local/web:broken"]
        ),
        (5, 4),
        "{got:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = rs_sizes(&client, NS).await;
    assert_eq!(
        (
            got["registry.local/web:1"],
            got["registry.local/web:broken"]
        ),
        (5, 4),
        "{got:?}"
    );

    // An orphan replica set the selector matches, with the deployment's template, is
    // adopted as its new replica set instead of a second one being made.
    let orphan = r#"apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: legacy
  labels:
    app: legacy
spec:
  replicas: 2
  selector:
    matchLabels:
      app: legacy
  template:
    metadata:
      labels:
        app: legacy
    spec:
      containers:
      - name: app
        image: registry.local/legacy:1
"#;
    let yaml = deployment_yaml(
        "legacy",
        3,
        "registry.local/legacy:1",
        "    type: RollingUpdate",
        "",
    );
    let c = cluster.clone();
    blocking(move || {
        c.kubectl_stdin(&["-n", NS, "apply", "-f", "-"], orphan);
        c.kubectl_stdin(&["-n", NS, "apply", "-f", "-"], &yaml);
        rollout_status(&c, NS, "legacy");
    })
    .await;
    let legacy: Vec<ReplicaSet> = replica_sets(&client, NS)
        .await
        .into_iter()
        .filter(|rs| rs_image(rs) == "registry.local/legacy:1")
        .collect();
    assert_eq!(legacy.len(), 1, "{legacy:?}");
    let rs = &legacy[0];
    assert_eq!(rs.metadata.name.as_deref(), Some("legacy"));
    let owner = &rs.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("Deployment", "legacy", Some(true))
    );
    assert_eq!(rs.spec.as_ref().unwrap().replicas, Some(3));
    assert_eq!(
        annotation(rs, "deployment.kubernetes.io/revision").as_deref(),
        Some("1")
    );
    kubelet.store(true, Ordering::Relaxed);
}
