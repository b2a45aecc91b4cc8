//! Writes answered while the watch cache lags the store.
//!
//! A write starts from the watch cache's copy of the object, which trails the store by the
//! time one event takes to arrive (and, with several API servers on one store, by whatever
//! another server wrote). These tests hold the cache's feed back on purpose, so that the
//! cache is certainly stale, and check that every answer a write gives without a
//! compare-and-swap (an error, a failed precondition, a refusal, "nothing to change") is
//! computed on the store's state, never on the cache's.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use canopy_apiserver::pki::Pki;
use canopy_apiserver::server::{ApiServer, ServerConfig};
use canopy_store::{
    EmbeddedOptions, EmbeddedStore, Outcome, RangeRequest, RangeResponse, Revision, Store, Watch,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// The embedded store, with a switch that holds back every watch's responses (so the API
/// server's caches stop following the store) and releases them in order.
struct LaggingStore {
    inner: Arc<EmbeddedStore>,
    held: watch::Sender<bool>,
}

#[async_trait]
impl Store for LaggingStore {
    async fn get(
        &self,
        key: &str,
    ) -> canopy_store::Result<(Option<canopy_store::KeyValue>, Revision)> {
        self.inner.get(key).await
    }
    async fn range(&self, request: RangeRequest) -> canopy_store::Result<RangeResponse> {
        self.inner.range(request).await
    }
    async fn create(&self, key: &str, value: Bytes) -> canopy_store::Result<Outcome> {
        self.inner.create(key, value).await
    }
    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Revision,
    ) -> canopy_store::Result<Outcome> {
        self.inner.update(key, value, expected).await
    }
    async fn delete(&self, key: &str, expected: Option<Revision>) -> canopy_store::Result<Outcome> {
        self.inner.delete(key, expected).await
    }
    async fn watch(&self, prefix: &str, start: Revision) -> canopy_store::Result<Watch> {
        let mut upstream = self.inner.watch(prefix, start).await?;
        let (tx, rx) = mpsc::channel(1024);
        let (progress_tx, mut progress_rx) = mpsc::channel(1);
        let mut held = self.held.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = progress_rx.recv() => upstream.request_progress(),
                    response = upstream.next() => {
                        let Some(response) = response else { return };
                        if held.wait_for(|held| !held).await.is_err()
                            || tx.send(response).await.is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Watch::new(rx, progress_tx))
    }
    async fn current_revision(&self) -> canopy_store::Result<Revision> {
        self.inner.current_revision().await
    }
    async fn compact(&self, revision: Revision) -> canopy_store::Result<()> {
        self.inner.compact(revision).await
    }
    fn describe(&self) -> String {
        format!("lagging {}", self.inner.describe())
    }
}

struct Cluster {
    base: String,
    http: reqwest::Client,
    held: watch::Sender<bool>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let inner = Arc::new(
            EmbeddedStore::open(&dir.path().join("store.redb"), EmbeddedOptions::default())
                .unwrap(),
        );
        let (held, _) = watch::channel(false);
        let store = Arc::new(LaggingStore {
            inner,
            held: held.clone(),
        });
        let config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
        let server = ApiServer::new(config, store).await.unwrap();
        server.wait_ready().await;
        server.bootstrap().await.unwrap();
        let base = format!("https://{}", server.local_addr());
        let pki = Pki::new(dir.path());
        let ca = pki.ensure_ca().unwrap();
        let admin = pki
            .ensure_client("admin", "admin", &["system:masters"])
            .unwrap();
        let identity =
            reqwest::Identity::from_pem(format!("{}{}", admin.cert_pem, admin.key_pem).as_bytes())
                .unwrap();
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap())
            .identity(identity)
            .build()
            .unwrap();
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            let _ = stop.await;
        }));
        Self {
            base,
            http,
            held,
            shutdown: Some(shutdown),
            _dir: dir,
        }
    }

    /// Sends a request; returns the status code and the JSON answer.
    async fn call(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Value,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if !body.is_null() {
            request = request
                .header("content-type", content_type)
                .body(serde_json::to_vec(&body).unwrap());
        }
        let response = request.send().await.unwrap();
        let code = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn hold_cache(&self) {
        self.held.send_replace(true);
    }

    fn release_cache(&self) {
        self.held.send_replace(false);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.release_cache();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

const JSON: &str = "application/json";
const MERGE: &str = "application/merge-patch+json";
const APPLY: &str = "application/apply-patch+yaml";
const CM: &str = "/api/v1/namespaces/default/configmaps";

/// ConfigMap `cfg` with `data.a` set to `a`.
fn config_map(a: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": a}})
}

fn rv(obj: &Value) -> String {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_a_lagging_cache_answer_from_the_store() {
    let cluster = Cluster::start().await;
    let (code, created) = cluster
        .call(
            "POST",
            &format!("{CM}?fieldManager=editor"),
            JSON,
            config_map("10"),
        )
        .await;
    assert_eq!(code, 201, "{created}");
    // A read waits for the cache to hold this server's own writes.
    let (code, _) = cluster
        .call("GET", &format!("{CM}/cfg"), JSON, Value::Null)
        .await;
    assert_eq!(code, 200);

    cluster.hold_cache();
    // From here the cache keeps the ConfigMap as created: "a" is 10, owned by "editor".
    let (code, forced) = cluster
        .call(
            "PATCH",
            &format!("{CM}/cfg?fieldManager=mgr-a&force=true"),
            APPLY,
            config_map("1"),
        )
        .await;
    assert_eq!(code, 200, "{forced}");
    assert_eq!(forced["data"]["a"], "1");

    // The store says mgr-a owns "a" = 1 now, so applying the same value shares the field. On
    // the cache's state it would conflict with "editor".
    let (code, shared) = cluster
        .call(
            "PATCH",
            &format!("{CM}/cfg?fieldManager=mgr-b"),
            APPLY,
            config_map("1"),
        )
        .await;
    assert_eq!(code, 200, "shared apply on a lagging cache: {shared}");

    // Setting "a" back to 10 is a change to the store's object; on the cache's (where "a" is
    // still 10) it would look like nothing to write, and the write would be lost.
    let (code, reverted) = cluster
        .call(
            "PATCH",
            &format!("{CM}/cfg?fieldManager=editor"),
            MERGE,
            json!({"data": {"a": "10"}}),
        )
        .await;
    assert_eq!(code, 200, "{reverted}");
    assert_eq!(reverted["data"]["a"], "10");
    assert_ne!(rv(&reverted), rv(&created), "the revert must be written");

    // A precondition on the latest resourceVersion holds against the store, not the cache.
    let (code, deleted) = cluster
        .call(
            "DELETE",
            &format!("{CM}/cfg"),
            JSON,
            json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"resourceVersion": rv(&reverted)}}),
        )
        .await;
    assert_eq!(
        code, 200,
        "delete with the latest resourceVersion: {deleted}"
    );

    cluster.release_cache();
    let (code, gone) = cluster
        .call("GET", &format!("{CM}/cfg"), JSON, Value::Null)
        .await;
    assert_eq!(code, 404, "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_on_a_lagging_cache_answers_from_the_store() {
    let cluster = Cluster::start().await;
    let pods = "/api/v1/namespaces/default/pods";
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    let binding = |node: &str| {
        json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "web"},
            "target": {"kind": "Node", "name": node}})
    };
    let (code, body) = cluster.call("POST", pods, JSON, pod.clone()).await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = cluster
        .call("POST", &format!("{pods}/web/binding"), JSON, binding("n1"))
        .await;
    assert_eq!(code, 201, "{body}");
    let (code, bound) = cluster
        .call("GET", &format!("{pods}/web"), JSON, Value::Null)
        .await;
    assert_eq!(
        (code, bound["spec"]["nodeName"].as_str()),
        (200, Some("n1"))
    );

    cluster.hold_cache();
    // The pod is replaced by a new one of the same name, not yet scheduled; the cache still
    // has the old one, bound to n1.
    let (code, body) = cluster
        .call(
            "DELETE",
            &format!("{pods}/web"),
            JSON,
            json!({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = cluster.call("POST", pods, JSON, pod).await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = cluster
        .call("POST", &format!("{pods}/web/binding"), JSON, binding("n2"))
        .await;
    assert_eq!(code, 201, "binding the new pod on a lagging cache: {body}");
    // And a second binding of the same pod is refused with what the store says.
    let (code, body) = cluster
        .call("POST", &format!("{pods}/web/binding"), JSON, binding("n3"))
        .await;
    assert_eq!(code, 409, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("already assigned to node \"n2\""),
        "{message}"
    );

    cluster.release_cache();
    let (code, bound) = cluster
        .call("GET", &format!("{pods}/web"), JSON, Value::Null)
        .await;
    assert_eq!(
        (code, bound["spec"]["nodeName"].as_str()),
        (200, Some("n2"))
    );
}
