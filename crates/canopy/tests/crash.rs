//! Crash safety: SIGKILL the server while clients write, restart it on the same data, and
//! check that every acknowledged write is there, nothing is half-written, and
//! resourceVersions keep increasing.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{Backend, Cluster, client_for};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

/// What a writer was told succeeded: the value it wrote and the resourceVersion returned.
type Acked = Arc<Mutex<HashMap<String, (u32, i64)>>>;

async fn writer(api: Api<ConfigMap>, id: usize, acked: Acked) {
    for i in 0.. {
        let name = format!("w{id}-{i}");
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": name},
            "data": {"value": "0", "padding": "x".repeat(512)},
        }))
        .unwrap();
        let Ok(created) = api.create(&PostParams::default(), &cm).await else {
            return;
        };
        acked
            .lock()
            .unwrap()
            .insert(name.clone(), (0, rv(&created)));
        let Ok(updated) = api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"value": "1"}})),
            )
            .await
        else {
            return;
        };
        acked.lock().unwrap().insert(name, (1, rv(&updated)));
    }
}

fn rv(cm: &ConfigMap) -> i64 {
    cm.resource_version()
        .unwrap_or_default()
        .parse()
        .unwrap_or(0)
}

async fn crash_while_writing(backend: Backend) {
    let mut c = Cluster::start(backend);
    let client = c.client().await;
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "crash"}})).unwrap(),
        )
        .await
        .unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client, "crash");
    let acked: Acked = Arc::default();
    let writers: Vec<_> = (0..16)
        .map(|id| tokio::spawn(writer(api.clone(), id, acked.clone())))
        .collect();
    // Let the writers get going, then pull the plug mid-stream.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 400 {
        assert!(
            std::time::Instant::now() < deadline,
            "writers made too little progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.server.kill();
    for w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(30), w).await;
    }
    let acked = acked.lock().unwrap().clone();
    let max_acked_rv = acked.values().map(|(_, rv)| *rv).max().unwrap();

    c.crash_and_restart();
    let client = client_for(c.kubeconfig()).await;
    let api: Api<ConfigMap> = Api::namespaced(client, "crash");
    // Typed decoding of every object proves none is half-written.
    let list = api
        .list(&ListParams::default())
        .await
        .expect("list after restart");
    let stored: HashMap<String, ConfigMap> = list
        .items
        .into_iter()
        .map(|cm| (cm.name_any(), cm))
        .collect();
    for (name, (value, acked_rv)) in &acked {
        let cm = stored
            .get(name)
            .unwrap_or_else(|| panic!("acknowledged write of {name} (rv {acked_rv}) lost"));
        let stored_value: u32 = cm.data.as_ref().unwrap()["value"].parse().unwrap();
        assert!(
            stored_value >= *value,
            "{name}: acknowledged value {value}, stored {stored_value}"
        );
        assert!(rv(cm) >= *acked_rv, "{name}: resourceVersion went back");
        assert_eq!(cm.data.as_ref().unwrap()["padding"].len(), 512);
    }
    let list_rv: i64 = list.metadata.resource_version.unwrap().parse().unwrap();
    assert!(
        list_rv >= max_acked_rv,
        "list revision {list_rv} < acknowledged {max_acked_rv}"
    );
    let fresh: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "after-restart"}})).unwrap();
    let fresh = api.create(&PostParams::default(), &fresh).await.unwrap();
    assert!(
        rv(&fresh) > max_acked_rv,
        "new writes get higher resourceVersions"
    );
    eprintln!("{} acknowledged writes survived the crash", acked.len());
}

#[tokio::test]
async fn crash_while_writing_on_embedded_store() {
    crash_while_writing(Backend::Embedded).await;
}

#[tokio::test]
async fn crash_while_writing_on_etcd() {
    crash_while_writing(Backend::Etcd).await;
}
