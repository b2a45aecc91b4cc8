//! kube-rs 5, unchanged, against Canopy: typed CRUD, list and watch, the streaming-list
//! watcher (sendInitialEvents) and a reflector.

mod common;

use std::time::Duration;

use common::{Backend, Cluster};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    runtime::{WatchStreamExt, reflector, watcher},
};
use serde_json::json;

fn configmap(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"suite": "kube-rs"}},
        "data": {"value": value},
    }))
    .unwrap()
}

async fn crud(backend: Backend) {
    let c = Cluster::start(backend);
    let client = c.client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "krs"}})).unwrap(),
        )
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "krs");

    let created = cms
        .create(&PostParams::default(), &configmap("a", "1"))
        .await
        .unwrap();
    let uid = created.uid().unwrap();
    let rv1: i64 = created.resource_version().unwrap().parse().unwrap();
    assert_eq!(cms.get("a").await.unwrap().data.unwrap()["value"], "1");

    // Replace with the current resourceVersion; a stale one conflicts.
    let mut next = created.clone();
    next.data = Some([("value".to_string(), "2".to_string())].into());
    let replaced = cms
        .replace("a", &PostParams::default(), &next)
        .await
        .unwrap();
    let rv2: i64 = replaced.resource_version().unwrap().parse().unwrap();
    assert!(rv2 > rv1);
    let stale = cms
        .replace("a", &PostParams::default(), &next)
        .await
        .unwrap_err();
    assert!(
        matches!(stale, kube::Error::Api(ref e) if e.code == 409),
        "{stale:?}"
    );

    // Patches: merge, and server-side apply.
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"extra": "x"}})),
    )
    .await
    .unwrap();
    let applied = cms
        .patch(
            "b",
            &PatchParams::apply("kube-rs-test"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}, "data": {"k": "v"}})),
        )
        .await
        .unwrap();
    assert_eq!(applied.data.unwrap()["k"], "v");
    assert!(
        applied
            .metadata
            .managed_fields
            .unwrap()
            .iter()
            .any(|m| m.manager.as_deref() == Some("kube-rs-test"))
    );

    // List with a label selector, and pagination.
    for i in 0..5 {
        cms.create(
            &PostParams::default(),
            &configmap(&format!("page-{i}"), "p"),
        )
        .await
        .unwrap();
    }
    let listed = cms
        .list(&ListParams::default().labels("suite=kube-rs"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 6);
    let first = cms.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("continue token");
    let second = cms
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(second.items.len(), 5);
    assert_eq!(
        second.metadata.resource_version, first.metadata.resource_version,
        "pages share a revision"
    );

    // Delete.
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    let gone = cms.get("a").await.unwrap_err();
    assert!(
        matches!(gone, kube::Error::Api(ref e) if e.code == 404),
        "{gone:?}"
    );
    assert!(cms.get_opt("a").await.unwrap().is_none());
    let _ = uid;
}

/// The next event of a watch, within 10 s.
async fn next_event(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin),
) -> WatchEvent<ConfigMap> {
    tokio::time::timeout(Duration::from_secs(10), stream.try_next())
        .await
        .expect("watch event in time")
        .unwrap()
        .expect("stream open")
}

async fn list_and_watch(backend: Backend) {
    let c = Cluster::start(backend);
    let client = c.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let list = cms.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let stream = cms
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .unwrap();
    let mut stream = stream.boxed();
    cms.create(&PostParams::default(), &configmap("w", "1"))
        .await
        .unwrap();
    cms.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"value": "2"}})),
    )
    .await
    .unwrap();
    cms.delete("w", &DeleteParams::default()).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let event = next_event(&mut stream).await;
        match event {
            WatchEvent::Added(cm) => kinds.push(("ADDED", cm.data.unwrap()["value"].clone())),
            WatchEvent::Modified(cm) => kinds.push(("MODIFIED", cm.data.unwrap()["value"].clone())),
            WatchEvent::Deleted(cm) => kinds.push(("DELETED", cm.data.unwrap()["value"].clone())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("watch error: {e:?}"),
        }
    }
    assert_eq!(
        kinds,
        vec![
            ("ADDED", "1".to_string()),
            ("MODIFIED", "2".to_string()),
            ("DELETED", "2".to_string())
        ]
    );
}

/// A burst of writes reaches a watcher whole and in order: events queued together leave the
/// server as one frame of several lines, which kube-rs must split back into every event.
async fn a_burst_of_writes_reaches_a_watch_whole_and_in_order(backend: Backend) {
    let c = Cluster::start(backend);
    let client = c.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let rv = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = cms
        .watch(&WatchParams::default().timeout(60), &rv)
        .await
        .unwrap()
        .boxed();
    const WRITES: usize = 300;
    futures::stream::iter(0..WRITES)
        .for_each_concurrent(32, |i| {
            let cms = cms.clone();
            async move {
                cms.create(&PostParams::default(), &configmap(&format!("b{i}"), "1"))
                    .await
                    .unwrap();
            }
        })
        .await;
    let mut seen = std::collections::BTreeSet::new();
    let mut last_rv = 0u64;
    while seen.len() < WRITES {
        let event = next_event(&mut stream).await;
        match event {
            WatchEvent::Added(cm) => {
                let rv: u64 = cm.resource_version().unwrap().parse().unwrap();
                assert!(rv > last_rv, "events out of order: {rv} after {last_rv}");
                last_rv = rv;
                assert!(seen.insert(cm.name_any()), "{} seen twice", cm.name_any());
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected event {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_burst_of_writes_reaches_a_watch_on_embedded_store() {
    a_burst_of_writes_reaches_a_watch_whole_and_in_order(Backend::Embedded).await;
}

#[tokio::test]
async fn a_burst_of_writes_reaches_a_watch_on_etcd() {
    a_burst_of_writes_reaches_a_watch_whole_and_in_order(Backend::Etcd).await;
}

async fn streaming_watcher_and_reflector(backend: Backend) {
    let c = Cluster::start(backend);
    let client = c.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        }))
        .unwrap()
    };
    for i in 0..3 {
        pods.create(&PostParams::default(), &pod(&format!("pre-{i}")))
            .await
            .unwrap();
    }

    // The streaming-list watcher sends sendInitialEvents=true and needs the
    // k8s.io/initial-events-end bookmark to finish its initial list.
    let mut events = watcher(pods.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut initial = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.try_next())
            .await
            .expect("initial events in time")
            .unwrap()
            .unwrap();
        match event {
            watcher::Event::Init => {}
            watcher::Event::InitApply(p) => initial.push(p.name_any()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected event before InitDone: {other:?}"),
        }
    }
    initial.sort();
    assert_eq!(initial, ["pre-0", "pre-1", "pre-2"]);
    pods.create(&PostParams::default(), &pod("live"))
        .await
        .unwrap();
    let live = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::Apply(p) => break p,
            _ => continue,
        }
    };
    assert_eq!(live.name_any(), "live");

    // A reflector keeps a local store current.
    let (reader, writer) = reflector::store::<Pod>();
    let stream = reflector::reflector(writer, watcher(pods.clone(), watcher::Config::default()))
        .applied_objects()
        .boxed();
    let driver = tokio::spawn(async move {
        stream.for_each(|_| async {}).await;
    });
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reader.state().len(), 4);
    pods.delete("pre-0", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reader.state().len() != 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "reflector did not see the deletion"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    driver.abort();
}

#[tokio::test]
async fn crud_on_embedded_store() {
    crud(Backend::Embedded).await;
}

#[tokio::test]
async fn crud_on_etcd() {
    crud(Backend::Etcd).await;
}

#[tokio::test]
async fn list_and_watch_on_embedded_store() {
    list_and_watch(Backend::Embedded).await;
}

#[tokio::test]
async fn list_and_watch_on_etcd() {
    list_and_watch(Backend::Etcd).await;
}

#[tokio::test]
async fn streaming_watcher_and_reflector_on_embedded_store() {
    streaming_watcher_and_reflector(Backend::Embedded).await;
}

#[tokio::test]
async fn streaming_watcher_and_reflector_on_etcd() {
    streaming_watcher_and_reflector(Backend::Etcd).await;
}
