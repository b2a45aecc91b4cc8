//! Upstream kube-apiserver (v1.33) semantics, end to end against a real `canopy server`:
//! system fields and the revision counter, generation, optimistic concurrency, namespace
//! lifecycle, finalizers and propagation policies, graceful pod deletion and binding, the
//! status and scale subresources, label and field selectors on list and watch, pagination
//! (consistent pages, remainingItemCount, expired continue tokens, exact-revision lists),
//! watch resourceVersion semantics (unset, "0", exact, bookmarks, sendInitialEvents,
//! timeouts, too old versions), dry runs, Table and PartialObjectMetadata output,
//! server-side apply, pods/log, and a smoke test of every verb on every served resource.
//!
//! Tests where the store matters (watch and list resourceVersion semantics, pagination)
//! run on the embedded store and on etcd. The clients do not retry 429/503/504 answers
//! (kube-rs does by default), so that the tests see what the server answers.

mod common;

use common::enc;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use base64::Engine;
use common::{Backend, Cluster};
use http_body_util::BodyExt;
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    autoscaling::v1::{Scale, ScaleSpec},
    core::v1::{ConfigMap, Pod},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

const JSON: &str = "application/json";
const MERGE: &str = "application/merge-patch+json";
const APPLY: &str = "application/apply-patch+yaml";
const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";
const METADATA: &str = "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io";
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------------------

/// An admin kube-rs client without kube-rs's automatic retries of 429, 503 and 504 answers
/// (the tests look at the server's answers themselves).
async fn client(c: &Cluster) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(c.kubeconfig()).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kube config");
    config.default_retry = false;
    Client::try_from(config).expect("kube client")
}

async fn open(
    client: &Client,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> http::Response<kube::client::Body> {
    let mut builder = http::Request::builder().method(method).uri(path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(body).expect("request");
    client
        .send(request.map(kube::client::Body::from))
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Sends a request; returns the status, the headers and the body as JSON (a JSON string
/// when the body is not JSON).
async fn send(
    client: &Client,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, http::HeaderMap, Value) {
    let response = open(client, method, path, headers, body).await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("response body")
        .to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, headers, value)
}

async fn call(
    client: &Client,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let bytes = body
        .map(|b| serde_json::to_vec(b).unwrap())
        .unwrap_or_default();
    let headers: &[(&str, &str)] = if body.is_some() {
        &[("content-type", content_type)]
    } else {
        &[]
    };
    let (status, _, value) = send(client, method, path, headers, bytes).await;
    (status, value)
}

async fn get(client: &Client, path: &str) -> (u16, Value) {
    call(client, "GET", path, JSON, None).await
}

async fn get_as(client: &Client, path: &str, accept: &str) -> (u16, Value) {
    let (status, _, value) = send(client, "GET", path, &[("accept", accept)], Vec::new()).await;
    (status, value)
}

async fn post(client: &Client, path: &str, body: &Value) -> (u16, Value) {
    call(client, "POST", path, JSON, Some(body)).await
}

async fn put(client: &Client, path: &str, body: &Value) -> (u16, Value) {
    call(client, "PUT", path, JSON, Some(body)).await
}

async fn patch(client: &Client, path: &str, content_type: &str, body: &Value) -> (u16, Value) {
    call(client, "PATCH", path, content_type, Some(body)).await
}

async fn delete(client: &Client, path: &str) -> (u16, Value) {
    call(client, "DELETE", path, JSON, None).await
}

async fn delete_with(client: &Client, path: &str, options: &Value) -> (u16, Value) {
    call(client, "DELETE", path, JSON, Some(options)).await
}

/// Asserts the status of a response and returns its body.
#[track_caller]
fn expect(response: (u16, Value), code: u16, what: &str) -> Value {
    assert_eq!(
        response.0, code,
        "{what}: unexpected status; body: {}",
        response.1
    );
    response.1
}

/// Asserts the status and reason of an error response and returns its body.
#[track_caller]
fn expect_error(response: (u16, Value), code: u16, reason: &str, what: &str) -> Value {
    assert_eq!(
        (response.0, reason_of(&response.1)),
        (code, reason),
        "{what}: unexpected status/reason; body: {}",
        response.1
    );
    assert_eq!(response.1["kind"], "Status", "{what}: {}", response.1);
    response.1
}

fn reason_of(v: &Value) -> &str {
    v["reason"].as_str().unwrap_or("")
}

fn rv(obj: &Value) -> i64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_else(|| panic!("no resourceVersion in {obj}"))
        .parse()
        .unwrap_or_else(|_| panic!("resourceVersion is not an integer in {obj}"))
}

fn name_of(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or("")
}

fn names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|o| name_of(o).to_string())
        .collect();
    names.sort();
    names
}

fn strs(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Polls GET `path` until `done(status, body)` holds; returns the last response.
async fn poll(
    client: &Client,
    path: &str,
    what: &str,
    done: impl Fn(u16, &Value) -> bool,
) -> (u16, Value) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = get(client, path).await;
        if done(status, &body) {
            return (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}; last answer {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_gone(client: &Client, path: &str) {
    poll(client, path, &format!("{path} to be deleted"), |s, _| {
        s == 404
    })
    .await;
}

fn core(ns: &str, plural: &str) -> String {
    format!("/api/v1/namespaces/{ns}/{plural}")
}

fn apps(ns: &str, plural: &str) -> String {
    format!("/apis/apps/v1/namespaces/{ns}/{plural}")
}

async fn create_namespace(client: &Client, name: &str) {
    expect(
        post(client, "/api/v1/namespaces", &namespace(name)).await,
        201,
        "creating a namespace",
    );
}

/// The store's current revision, as a list reports it.
async fn current_revision(client: &Client) -> i64 {
    let list = expect(get(client, "/api/v1/namespaces").await, 200, "list");
    rv(&list)
}

// ---------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

fn configmap(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {"k": "v"},
    })
}

fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    })
}

fn deployment(name: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": "nginx:1.27"}]},
            },
        },
    })
}

fn replicaset(name: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {
                "matchLabels": {"app": name},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}],
            },
            "template": {
                "metadata": {"labels": {"app": name, "tier": "a"}},
                "spec": {"containers": [{"name": "main", "image": "nginx:1.27"}]},
            },
        },
    })
}

fn binding(pod: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": pod},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    })
}

// ---------------------------------------------------------------------------------------
// Watching
// ---------------------------------------------------------------------------------------

/// A watch stream, read event by event.
struct Watch {
    body: kube::client::Body,
    buf: Vec<u8>,
    ended: bool,
    path: String,
}

impl Watch {
    async fn try_open(client: &Client, path: &str) -> (u16, Watch) {
        let response = open(client, "GET", path, &[], Vec::new()).await;
        let status = response.status().as_u16();
        let watch = Watch {
            body: response.into_body(),
            buf: Vec::new(),
            ended: false,
            path: path.to_string(),
        };
        (status, watch)
    }

    async fn open(client: &Client, path: &str) -> Watch {
        let (status, mut watch) = Self::try_open(client, path).await;
        if status != 200 {
            let rest = watch.rest(Duration::from_secs(5)).await;
            panic!("watch {path}: status {status}: {rest:?}");
        }
        watch
    }

    /// The next event, or None when the stream ends or nothing arrives in time.
    async fn next(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!(
                        "watch {}: bad event {e}: {}",
                        self.path,
                        String::from_utf8_lossy(&line)
                    )
                }));
            }
            if self.ended {
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return None;
                }
                let rest = std::mem::take(&mut self.buf);
                return Some(serde_json::from_slice(&rest).unwrap_or_else(|e| {
                    panic!(
                        "watch {}: bad event {e}: {}",
                        self.path,
                        String::from_utf8_lossy(&rest)
                    )
                }));
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return None,
                Ok(None) | Ok(Some(Err(_))) => self.ended = true,
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The next event, which must arrive within ten seconds.
    async fn event(&mut self) -> Value {
        match self.next(Duration::from_secs(10)).await {
            Some(e) => e,
            None => panic!(
                "watch {}: no event within 10s (stream ended: {})",
                self.path, self.ended
            ),
        }
    }

    /// The next `n` events.
    async fn take(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.event().await);
        }
        out
    }

    /// Everything until the stream ends, which it must within `within`.
    async fn rest(&mut self, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(e) => out.push(e),
                None if self.ended => return out,
                None => panic!(
                    "watch {}: the stream did not end within {within:?}; got {out:?}",
                    self.path
                ),
            }
        }
    }
}

/// (type, name) of a watch event.
fn ev(event: &Value) -> (String, String) {
    (
        event["type"].as_str().unwrap_or("").to_string(),
        name_of(&event["object"]).to_string(),
    )
}

fn evs(events: &[Value]) -> Vec<(String, String)> {
    events.iter().map(ev).collect()
}

fn e(kind: &str, name: &str) -> (String, String) {
    (kind.to_string(), name.to_string())
}

// ---------------------------------------------------------------------------------------
// System fields, revisions, generation, optimistic concurrency
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn system_fields_revisions_generation_and_concurrency() {
    let c = Cluster::start(Backend::Embedded);
    let client = client(&c).await;

    // One revision counter across kinds: every write gets a larger resourceVersion.
    let cm = expect(
        post(
            &client,
            &core("default", "configmaps"),
            &configmap("one", json!({})),
        )
        .await,
        201,
        "create configmap",
    );
    let secret = expect(
        post(
            &client,
            &core("default", "secrets"),
            &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "one"}, "stringData": {"k": "v"}}),
        )
        .await,
        201,
        "create secret",
    );
    let ns = expect(
        post(&client, "/api/v1/namespaces", &namespace("meta")).await,
        201,
        "create namespace",
    );
    let dep = expect(
        post(
            &client,
            &apps("default", "deployments"),
            &deployment("web", 1),
        )
        .await,
        201,
        "create deployment",
    );
    let created = [&cm, &secret, &ns, &dep];
    let revisions: Vec<i64> = created.iter().map(|o| rv(o)).collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "resourceVersions must come from one increasing counter: {revisions:?}"
    );
    let mut uids = BTreeSet::new();
    for obj in created {
        let uid = obj["metadata"]["uid"].as_str().unwrap_or("");
        assert_eq!(uid.len(), 36, "uid must be a UUID: {obj}");
        uids.insert(uid.to_string());
        let stamp = obj["metadata"]["creationTimestamp"].as_str().unwrap_or("");
        assert!(
            stamp.len() == 20 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "creationTimestamp must be RFC 3339 in UTC: {obj}"
        );
    }
    assert_eq!(uids.len(), 4, "uids must be unique");
    // Lists of any kind report the store's revision, not the kind's last write.
    let list = expect(
        get(&client, &core("default", "configmaps")).await,
        200,
        "list",
    );
    assert!(
        rv(&list) >= revisions[3],
        "list revision {} < {}",
        rv(&list),
        revisions[3]
    );
    // The read-back object is what was returned.
    let read = expect(
        get(&client, &core("default", "configmaps/one")).await,
        200,
        "get",
    );
    assert_eq!(read["metadata"], cm["metadata"]);

    // The server owns uid, creationTimestamp and deletion fields on create.
    let mut forged = configmap("forged", json!({}));
    forged["metadata"]["uid"] = json!("00000000-0000-0000-0000-000000000000");
    forged["metadata"]["creationTimestamp"] = json!("2000-01-01T00:00:00Z");
    forged["metadata"]["deletionTimestamp"] = json!("2000-01-01T00:00:00Z");
    let forged = expect(
        post(&client, &core("default", "configmaps"), &forged).await,
        201,
        "create with system fields",
    );
    assert_ne!(
        forged["metadata"]["uid"],
        "00000000-0000-0000-0000-000000000000"
    );
    assert_ne!(
        forged["metadata"]["creationTimestamp"],
        "2000-01-01T00:00:00Z"
    );
    assert!(
        forged["metadata"].get("deletionTimestamp").is_none(),
        "{forged}"
    );

    // generateName: a random five-character suffix, a new name each time.
    let generated =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "gen-"}});
    let g1 = expect(
        post(&client, &core("default", "configmaps"), &generated).await,
        201,
        "generateName",
    );
    let g2 = expect(
        post(&client, &core("default", "configmaps"), &generated).await,
        201,
        "generateName",
    );
    for g in [&g1, &g2] {
        let name = name_of(g);
        assert!(
            name.starts_with("gen-") && name.len() == 9,
            "generated name {name:?}"
        );
        assert_eq!(g["metadata"]["generateName"], "gen-");
    }
    assert_ne!(name_of(&g1), name_of(&g2));

    // generation: 1 on create, +1 on spec changes; deployments also count annotation
    // changes (upstream copies them to replica sets); labels and status do not count.
    let dpath = apps("default", "deployments/web");
    assert_eq!(dep["metadata"]["generation"], 1, "{dep}");
    let d = expect(
        patch(&client, &dpath, MERGE, &json!({"spec": {"replicas": 3}})).await,
        200,
        "spec patch",
    );
    assert_eq!(
        d["metadata"]["generation"], 2,
        "spec change bumps generation"
    );
    let d = expect(
        patch(
            &client,
            &dpath,
            MERGE,
            &json!({"metadata": {"labels": {"team": "a"}}}),
        )
        .await,
        200,
        "label patch",
    );
    assert_eq!(
        d["metadata"]["generation"], 2,
        "a label change does not bump generation"
    );
    let d = expect(
        patch(
            &client,
            &dpath,
            MERGE,
            &json!({"metadata": {"annotations": {"note": "x"}}}),
        )
        .await,
        200,
        "annotation patch",
    );
    assert_eq!(
        d["metadata"]["generation"], 3,
        "an annotation change bumps a deployment's generation"
    );
    let d = expect(
        patch(
            &client,
            &format!("{dpath}/status"),
            MERGE,
            &json!({"status": {"replicas": 3, "observedGeneration": 3}}),
        )
        .await,
        200,
        "status patch",
    );
    assert_eq!(
        d["metadata"]["generation"], 3,
        "a status change does not bump generation"
    );
    assert_eq!(d["status"]["replicas"], 3);

    let rs = expect(
        post(
            &client,
            &apps("default", "replicasets"),
            &replicaset("rs", 1),
        )
        .await,
        201,
        "create replicaset",
    );
    assert_eq!(rs["metadata"]["generation"], 1);
    let rspath = apps("default", "replicasets/rs");
    let r = expect(
        patch(
            &client,
            &rspath,
            MERGE,
            &json!({"metadata": {"annotations": {"note": "x"}, "labels": {"x": "y"}}}),
        )
        .await,
        200,
        "replicaset metadata patch",
    );
    assert_eq!(
        r["metadata"]["generation"], 1,
        "metadata changes do not bump a replica set's generation"
    );
    let r = expect(
        patch(&client, &rspath, MERGE, &json!({"spec": {"replicas": 2}})).await,
        200,
        "rs spec",
    );
    assert_eq!(r["metadata"]["generation"], 2);

    // Optimistic concurrency through kube-rs.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let stale = cms.get("one").await.expect("get");
    let mut next = stale.clone();
    next.data = Some([("k".to_string(), "v2".to_string())].into());
    let updated = cms
        .replace("one", &PostParams::default(), &next)
        .await
        .expect("update");
    let stale_rv: i64 = stale
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    let updated_rv: i64 = updated
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(updated_rv > stale_rv);
    let mut conflicting = stale.clone();
    conflicting.data = Some([("k".to_string(), "v3".to_string())].into());
    match cms
        .replace("one", &PostParams::default(), &conflicting)
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                (status.code, status.reason.as_str()),
                (409, "Conflict"),
                "{status:?}"
            );
            assert!(
                status.message.contains("the object has been modified"),
                "{}",
                status.message
            );
        }
        other => panic!("an update with a stale resourceVersion must conflict: {other:?}"),
    }
    // An update without a resourceVersion is unconditional.
    let mut blind = stale.clone();
    blind.metadata.resource_version = None;
    blind.data = Some([("k".to_string(), "v4".to_string())].into());
    let blind = cms
        .replace("one", &PostParams::default(), &blind)
        .await
        .expect("unconditional update");
    assert_eq!(blind.data.as_ref().unwrap()["k"], "v4");
    // An update that changes nothing is not written.
    let current = cms.get("one").await.unwrap();
    let same = cms
        .replace("one", &PostParams::default(), &current)
        .await
        .unwrap();
    assert_eq!(
        same.metadata.resource_version, current.metadata.resource_version,
        "a no-op update must keep the resourceVersion"
    );
    // A stale resourceVersion in a patch is a precondition too.
    expect_error(
        patch(
            &client,
            &core("default", "configmaps/one"),
            MERGE,
            &json!({"metadata": {"resourceVersion": stale_rv.to_string()}, "data": {"k": "v5"}}),
        )
        .await,
        409,
        "Conflict",
        "patch with a stale resourceVersion",
    );
    // Creating an existing name.
    let exists = expect_error(
        post(
            &client,
            &core("default", "configmaps"),
            &configmap("one", json!({})),
        )
        .await,
        409,
        "AlreadyExists",
        "create an existing name",
    );
    assert_eq!(exists["details"]["name"], "one");
    assert_eq!(exists["details"]["kind"], "configmaps");
}

// ---------------------------------------------------------------------------------------
// Namespace lifecycle
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn namespace_lifecycle() {
    let c = Cluster::start(Backend::Embedded);
    let client = client(&c).await;

    // Creating in a namespace that does not exist.
    let missing = expect_error(
        post(
            &client,
            &core("missing", "configmaps"),
            &configmap("x", json!({})),
        )
        .await,
        404,
        "NotFound",
        "create in a missing namespace",
    );
    assert_eq!(missing["details"]["kind"], "namespaces", "{missing}");
    assert_eq!(missing["details"]["name"], "missing", "{missing}");

    // A namespace held by a metadata finalizer stays Terminating.
    let held = expect(
        post(
            &client,
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "held", "finalizers": ["example.com/hold"]}}),
        )
        .await,
        201,
        "create namespace",
    );
    assert_eq!(held["status"]["phase"], "Active");
    assert_eq!(held["spec"]["finalizers"], json!(["kubernetes"]));
    expect(
        post(
            &client,
            &core("held", "configmaps"),
            &configmap("content", json!({})),
        )
        .await,
        201,
        "content",
    );
    let deleting = expect(
        delete(&client, "/api/v1/namespaces/held").await,
        200,
        "delete namespace",
    );
    assert_eq!(deleting["kind"], "Namespace", "{deleting}");
    assert_eq!(deleting["status"]["phase"], "Terminating", "{deleting}");
    assert!(
        deleting["metadata"]["deletionTimestamp"].is_string(),
        "{deleting}"
    );
    let refused = expect_error(
        post(
            &client,
            &core("held", "configmaps"),
            &configmap("late", json!({})),
        )
        .await,
        403,
        "Forbidden",
        "create in a terminating namespace",
    );
    assert_eq!(
        refused["details"]["causes"][0]["reason"], "NamespaceTerminating",
        "{refused}"
    );
    // The namespace controller deletes the content and removes its own finalizer.
    wait_gone(&client, &core("held", "configmaps/content")).await;
    poll(
        &client,
        "/api/v1/namespaces/held",
        "the namespace to be finalized",
        |s, ns| {
            s == 200
                && ns["spec"]["finalizers"]
                    .as_array()
                    .is_none_or(|f| f.is_empty())
        },
    )
    .await;
    let still = expect(
        get(&client, "/api/v1/namespaces/held").await,
        200,
        "held namespace",
    );
    assert_eq!(still["status"]["phase"], "Terminating");
    assert_eq!(still["metadata"]["finalizers"], json!(["example.com/hold"]));
    // Removing the last finalizer deletes it.
    expect(
        patch(
            &client,
            "/api/v1/namespaces/held",
            MERGE,
            &json!({"metadata": {"finalizers": null}}),
        )
        .await,
        200,
        "remove the finalizer",
    );
    wait_gone(&client, "/api/v1/namespaces/held").await;

    // A plain namespace goes once its content is deleted.
    create_namespace(&client, "plain").await;
    expect(
        post(
            &client,
            &core("plain", "configmaps"),
            &configmap("a", json!({})),
        )
        .await,
        201,
        "content",
    );
    expect(
        post(&client, &core("plain", "pods"), &pod("p")).await,
        201,
        "content",
    );
    let deleting = expect(
        delete(&client, "/api/v1/namespaces/plain").await,
        200,
        "delete namespace",
    );
    assert_eq!(deleting["status"]["phase"], "Terminating");
    wait_gone(&client, "/api/v1/namespaces/plain").await;
    assert_eq!(get(&client, &core("plain", "configmaps/a")).await.0, 404);
    assert_eq!(get(&client, &core("plain", "pods/p")).await.0, 404);
    // The name can be used again.
    create_namespace(&client, "plain").await;
    expect(
        post(
            &client,
            &core("plain", "configmaps"),
            &configmap("a", json!({})),
        )
        .await,
        201,
        "reuse",
    );
}

// ---------------------------------------------------------------------------------------
// Finalizers and propagation policies
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn finalizers_and_propagation_policies() {
    let c = Cluster::start(Backend::Embedded);
    let client = client(&c).await;
    create_namespace(&client, "fin").await;
    let cms = core("fin", "configmaps");

    let mut held = configmap("held", json!({}));
    held["metadata"]["finalizers"] = json!(["example.com/f"]);
    expect(post(&client, &cms, &held).await, 201, "create");
    let path = format!("{cms}/held");
    // Deleting an object with a finalizer marks it and keeps it.
    let marked = expect(delete(&client, &path).await, 200, "delete");
    assert_eq!(
        marked["kind"], "ConfigMap",
        "the pending object is returned: {marked}"
    );
    let stamp = marked["metadata"]["deletionTimestamp"].clone();
    assert!(stamp.is_string(), "{marked}");
    assert_eq!(
        marked["metadata"]["deletionGracePeriodSeconds"], 0,
        "{marked}"
    );
    let still = expect(get(&client, &path).await, 200, "get");
    assert_eq!(still["metadata"]["finalizers"], json!(["example.com/f"]));
    assert_eq!(still["metadata"]["deletionTimestamp"], stamp);
    // Deleting again changes nothing.
    let again = expect(delete(&client, &path).await, 200, "delete again");
    assert_eq!(again["metadata"]["deletionTimestamp"], stamp);
    // Updates are still allowed, but no new finalizers.
    expect(
        patch(&client, &path, MERGE, &json!({"data": {"k": "changed"}})).await,
        200,
        "update while deleting",
    );
    expect_error(
        patch(
            &client,
            &path,
            MERGE,
            &json!({"metadata": {"finalizers": ["example.com/f", "example.com/g"]}}),
        )
        .await,
        422,
        "Invalid",
        "adding a finalizer to an object being deleted",
    );
    // Removing the finalizer deletes it.
    expect(
        patch(
            &client,
            &path,
            MERGE,
            &json!({"metadata": {"finalizers": null}}),
        )
        .await,
        200,
        "remove finalizer",
    );
    assert_eq!(get(&client, &path).await.0, 404, "the object must be gone");

    // propagationPolicy=Foreground adds foregroundDeletion; Orphan adds orphan; Background
    // deletes at once.
    for (name, how, finalizer) in [
        ("fg", "body", "foregroundDeletion"),
        ("orphan", "query", "orphan"),
    ] {
        expect(
            post(&client, &cms, &configmap(name, json!({}))).await,
            201,
            "create",
        );
        let item = format!("{cms}/{name}");
        let policy = if finalizer == "orphan" {
            "Orphan"
        } else {
            "Foreground"
        };
        let marked = if how == "body" {
            delete_with(
                &client,
                &item,
                &json!({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": policy}),
            )
            .await
        } else {
            delete(&client, &format!("{item}?propagationPolicy={policy}")).await
        };
        let marked = expect(marked, 200, "delete with a propagation policy");
        assert!(
            marked["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == finalizer)),
            "{policy}: the {finalizer} finalizer must be added: {marked}"
        );
        assert!(
            marked["metadata"]["deletionTimestamp"].is_string(),
            "{marked}"
        );
        let stored = expect(get(&client, &item).await, 200, "get");
        assert!(stored["metadata"]["deletionTimestamp"].is_string());
    }
    // Through kube-rs.
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "fin");
    api.create(
        &PostParams::default(),
        &serde_json::from_value(configmap("fg2", json!({}))).unwrap(),
    )
    .await
    .unwrap();
    let pending = api
        .delete("fg2", &DeleteParams::foreground())
        .await
        .expect("delete")
        .left()
        .expect("a foreground deletion must not complete at once");
    assert!(
        pending
            .metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"foregroundDeletion".to_string()),
        "foreground deletion must add its finalizer"
    );
    expect(
        post(&client, &cms, &configmap("bg", json!({}))).await,
        201,
        "create",
    );
    let done = expect(
        delete(&client, &format!("{cms}/bg?propagationPolicy=Background")).await,
        200,
        "delete",
    );
    assert_eq!(done["kind"], "Status", "{done}");
    assert_eq!(done["status"], "Success", "{done}");
    assert_eq!(get(&client, &format!("{cms}/bg")).await.0, 404);
}

// ---------------------------------------------------------------------------------------
// Pods: binding and graceful deletion
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn pod_binding_and_graceful_deletion() {
    let c = Cluster::start(Backend::Embedded);
    let client = client(&c).await;
    create_namespace(&client, "pods").await;
    let pods = core("pods", "pods");
    let bind = |name: &str| format!("{pods}/{name}/binding");

    let created = expect(post(&client, &pods, &pod("web")).await, 201, "create pod");
    assert_eq!(created["status"]["phase"], "Pending", "{created}");
    assert!(created["spec"].get("nodeName").is_none());
    let bound = expect(
        post(&client, &bind("web"), &binding("web", "node-a")).await,
        201,
        "bind",
    );
    assert_eq!(bound["kind"], "Status", "{bound}");
    assert_eq!(bound["status"], "Success", "{bound}");
    let scheduled = expect(get(&client, &format!("{pods}/web")).await, 200, "get");
    assert_eq!(scheduled["spec"]["nodeName"], "node-a");
    let conditions = scheduled["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "PodScheduled" && c["status"] == "True"),
        "{scheduled}"
    );
    // A bound pod cannot be bound again; a missing pod cannot be bound at all.
    expect_error(
        post(&client, &bind("web"), &binding("web", "node-b")).await,
        409,
        "Conflict",
        "rebind",
    );
    assert_eq!(
        expect(get(&client, &format!("{pods}/web")).await, 200, "get")["spec"]["nodeName"],
        "node-a"
    );
    expect_error(
        post(&client, &bind("nope"), &binding("nope", "node-a")).await,
        404,
        "NotFound",
        "bind missing",
    );

    // Deleting a scheduled pod is graceful: 30 seconds by default.
    let marked = expect(delete(&client, &format!("{pods}/web")).await, 200, "delete");
    assert_eq!(marked["kind"], "Pod", "{marked}");
    assert_eq!(
        marked["metadata"]["deletionGracePeriodSeconds"], 30,
        "{marked}"
    );
    assert!(
        marked["metadata"]["deletionTimestamp"].is_string(),
        "{marked}"
    );
    let still = expect(
        get(&client, &format!("{pods}/web")).await,
        200,
        "the pod stays until its grace period ends",
    );
    assert_eq!(still["metadata"]["deletionGracePeriodSeconds"], 30);
    // A longer grace period does not extend it.
    let longer = expect(
        delete(&client, &format!("{pods}/web?gracePeriodSeconds=60")).await,
        200,
        "delete again",
    );
    assert_eq!(
        longer["metadata"]["deletionGracePeriodSeconds"], 30,
        "{longer}"
    );
    // gracePeriodSeconds=0 deletes at once.
    expect(
        delete(&client, &format!("{pods}/web?gracePeriodSeconds=0")).await,
        200,
        "force delete",
    );
    assert_eq!(get(&client, &format!("{pods}/web")).await.0, 404);

    // The grace period given, shortened, then zero in DeleteOptions.
    expect(post(&client, &pods, &pod("short")).await, 201, "create");
    expect(
        post(&client, &bind("short"), &binding("short", "node-a")).await,
        201,
        "bind",
    );
    let marked = expect(
        delete(&client, &format!("{pods}/short?gracePeriodSeconds=10")).await,
        200,
        "delete",
    );
    assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 10);
    let shorter = expect(
        delete_with(
            &client,
            &format!("{pods}/short"),
            &json!({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 3}),
        )
        .await,
        200,
        "shorten",
    );
    assert_eq!(shorter["metadata"]["deletionGracePeriodSeconds"], 3);
    expect(
        delete_with(
            &client,
            &format!("{pods}/short"),
            &json!({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0}),
        )
        .await,
        200,
        "delete now",
    );
    assert_eq!(get(&client, &format!("{pods}/short")).await.0, 404);

    // spec.terminationGracePeriodSeconds is the default.
    let mut custom = pod("custom");
    custom["spec"]["terminationGracePeriodSeconds"] = json!(5);
    expect(post(&client, &pods, &custom).await, 201, "create");
    expect(
        post(&client, &bind("custom"), &binding("custom", "node-a")).await,
        201,
        "bind",
    );
    let marked = expect(
        delete(&client, &format!("{pods}/custom")).await,
        200,
        "delete",
    );
    assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 5);

    // A pod that never ran (unscheduled) or has finished is deleted at once.
    expect(post(&client, &pods, &pod("unbound")).await, 201, "create");
    let gone = expect(
        delete(&client, &format!("{pods}/unbound")).await,
        200,
        "delete",
    );
    assert!(
        gone["metadata"].get("deletionGracePeriodSeconds").is_none()
            || gone["metadata"]["deletionGracePeriodSeconds"] == 0,
        "{gone}"
    );
    assert_eq!(get(&client, &format!("{pods}/unbound")).await.0, 404);
    expect(post(&client, &pods, &pod("done")).await, 201, "create");
    expect(
        post(&client, &bind("done"), &binding("done", "node-a")).await,
        201,
        "bind",
    );
    expect(
        patch(
            &client,
            &format!("{pods}/done/status"),
            MERGE,
            &json!({"status": {"phase": "Succeeded"}}),
        )
        .await,
        200,
        "finish",
    );
    expect(
        delete(&client, &format!("{pods}/done")).await,
        200,
        "delete",
    );
    assert_eq!(
        get(&client, &format!("{pods}/done")).await.0,
        404,
        "a finished pod is deleted at once"
    );

    // Binding through kube-rs's subresource API.
    let api: Api<Pod> = Api::namespaced(client.clone(), "pods");
    api.create(
        &PostParams::default(),
        &serde_json::from_value(pod("typed")).unwrap(),
    )
    .await
    .unwrap();
    let _: Value = api
        .create_subresource(
            "binding",
            "typed",
            &PostParams::default(),
            &binding("typed", "node-c"),
        )
        .await
        .expect("binding through kube-rs");
    assert_eq!(
        api.get("typed")
            .await
            .unwrap()
            .spec
            .unwrap()
            .node_name
            .as_deref(),
        Some("node-c")
    );
}

/// Upstream's pod strategy (CheckGracefulDelete) turns a negative grace period into one
/// second; DeleteOptions validation does not reject it.
#[tokio::test]
async fn negative_grace_period_means_one_second_for_pods() {
    let c = Cluster::start(Backend::Embedded);
    let client = client(&c).await;
    let pods = core("default", "pods");
    expect(post(&client, &pods, &pod("neg")).await, 201, "create");
    expect(
        post(
            &client,
            &format!("{pods}/neg/binding"),
            &binding("neg", "node-a"),
        )
        .await,
        201,
        "bind",
    );
    let marked = expect(
        delete(&client, &format!("{pods}/neg?gracePeriodSeconds=-1")).await,
        200,
        "DELETE .../pods/neg?gracePeriodSeconds=-1 (upstream: 200, deletionGracePeriodSeconds 1)",
    );
    assert_eq!(
        marked["metadata"]["deletionGracePeriodSeconds"], 1,
        "{marked}"
    );
}

// ---------------------------------------------------------------------------------------
// status and scale subresources
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn status_and_scale_subresources() {
    let c = Cluster::start(Backend::Embedded);
    let client = client(&c).await;
    create_namespace(&client, "sub").await;
    let dpath = apps("sub", "deployments/web");

    // Status in a create is dropped.
    let mut with_status = deployment("web", 2);
    with_status["status"] = json!({"replicas": 9, "readyReplicas": 9});
    let created = expect(
        post(&client, &apps("sub", "deployments"), &with_status).await,
        201,
        "create",
    );
    assert!(
        created["status"].get("replicas").is_none(),
        "status must be reset on create: {created}"
    );

    // The main resource cannot change status.
    let mut d = expect(get(&client, &dpath).await, 200, "get");
    d["status"] = json!({"replicas": 5});
    d["spec"]["paused"] = json!(true);
    let updated = expect(put(&client, &dpath, &d).await, 200, "update");
    assert_eq!(updated["spec"]["paused"], true);
    assert!(
        updated["status"].get("replicas").is_none(),
        "an update of the main resource must keep status: {updated}"
    );
    let patched = expect(
        patch(&client, &dpath, MERGE, &json!({"status": {"replicas": 6}})).await,
        200,
        "patch",
    );
    assert!(
        patched["status"].get("replicas").is_none(),
        "a patch of the main resource must keep status: {patched}"
    );

    // The status subresource changes only status (and keeps spec and labels).
    let mut d = expect(
        get(&client, &format!("{dpath}/status")).await,
        200,
        "get status",
    );
    assert_eq!(
        d["kind"], "Deployment",
        "GET .../status returns the whole object"
    );
    d["status"] = json!({"replicas": 2, "observedGeneration": 1});
    d["spec"]["replicas"] = json!(7);
    d["metadata"]["labels"]["extra"] = json!("yes");
    let updated = expect(
        put(&client, &format!("{dpath}/status"), &d).await,
        200,
        "update status",
    );
    assert_eq!(updated["status"]["replicas"], 2);
    assert_eq!(
        updated["spec"]["replicas"], 2,
        "a status update must not change spec: {updated}"
    );
    assert!(
        updated["metadata"]["labels"].get("extra").is_none(),
        "a status update must not change labels: {updated}"
    );
    let patched = expect(
        patch(
            &client,
            &format!("{dpath}/status"),
            MERGE,
            &json!({"status": {"readyReplicas": 1, "availableReplicas": 1}, "spec": {"replicas": 8}}),
        )
        .await,
        200,
        "patch status",
    );
    assert_eq!(patched["status"]["availableReplicas"], 1);
    assert_eq!(patched["status"]["replicas"], 2);
    assert_eq!(patched["spec"]["replicas"], 2);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "sub");
    deployments
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"readyReplicas": 1}})),
        )
        .await
        .expect("patch_status");
    let status = deployments.get_status("web").await.expect("get_status");
    assert_eq!(status.status.unwrap().ready_replicas, Some(1));

    // scale: autoscaling/v1 Scale with status.selector.
    let scale = expect(
        get(&client, &format!("{dpath}/scale")).await,
        200,
        "get scale",
    );
    assert_eq!(
        (scale["apiVersion"].as_str(), scale["kind"].as_str()),
        (Some("autoscaling/v1"), Some("Scale")),
        "{scale}"
    );
    assert_eq!(scale["metadata"]["name"], "web");
    assert_eq!(scale["spec"]["replicas"], 2);
    assert_eq!(scale["status"]["replicas"], 2);
    assert_eq!(scale["status"]["selector"], "app=web");
    let generation = expect(get(&client, &dpath).await, 200, "get")["metadata"]["generation"]
        .as_i64()
        .unwrap();
    let typed = deployments.get_scale("web").await.expect("get_scale");
    let mut wanted = Scale {
        metadata: typed.metadata.clone(),
        spec: Some(ScaleSpec { replicas: Some(5) }),
        status: None,
    };
    let scaled = deployments
        .replace_scale("web", &PostParams::default(), &wanted)
        .await
        .expect("replace_scale");
    assert_eq!(scaled.spec.unwrap().replicas, Some(5));
    let d = expect(get(&client, &dpath).await, 200, "get");
    assert_eq!(d["spec"]["replicas"], 5);
    assert_eq!(
        d["metadata"]["generation"].as_i64(),
        Some(generation + 1),
        "scaling changes spec: {d}"
    );
    let scaled = deployments
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .expect("patch_scale");
    assert_eq!(scaled.spec.unwrap().replicas, Some(3));
    // A stale resourceVersion in a Scale conflicts.
    wanted.spec = Some(ScaleSpec { replicas: Some(4) });
    match deployments
        .replace_scale("web", &PostParams::default(), &wanted)
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => panic!("a stale Scale must conflict: {other:?}"),
    }
    expect_error(
        put(&client, &format!("{dpath}/scale"), &json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "web"}, "spec": {"replicas": -1}})).await,
        422,
        "Invalid",
        "negative replicas",
    );
    assert_eq!(
        expect(get(&client, &dpath).await, 200, "get")["spec"]["replicas"],
        3
    );

    // Replica sets, with a set-based selector.
    expect(
        post(&client, &apps("sub", "replicasets"), &replicaset("rs", 1)).await,
        201,
        "create rs",
    );
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), "sub");
    let scale = expect(
        get(&client, &apps("sub", "replicasets/rs/scale")).await,
        200,
        "rs scale",
    );
    assert_eq!(
        scale["status"]["selector"], "app=rs,tier in (a,b)",
        "{scale}"
    );
    let typed = rss.get_scale("rs").await.expect("get_scale");
    let scaled = rss
        .replace_scale(
            "rs",
            &PostParams::default(),
            &Scale {
                metadata: typed.metadata,
                spec: Some(ScaleSpec { replicas: Some(4) }),
                status: None,
            },
        )
        .await
        .expect("replace_scale");
    assert_eq!(scaled.spec.unwrap().replicas, Some(4));
    let scaled = rss
        .patch_scale(
            "rs",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .expect("patch_scale");
    assert_eq!(scaled.spec.unwrap().replicas, Some(0));
    assert_eq!(rss.get("rs").await.unwrap().spec.unwrap().replicas, Some(0));
    // A status update of a replica set.
    let mut rs = expect(
        get(&client, &apps("sub", "replicasets/rs")).await,
        200,
        "get",
    );
    rs["status"] = json!({"replicas": 0, "fullyLabeledReplicas": 0, "observedGeneration": 3});
    let updated = expect(
        put(&client, &apps("sub", "replicasets/rs/status"), &rs).await,
        200,
        "rs status",
    );
    assert_eq!(updated["status"]["observedGeneration"], 3);
}

// ---------------------------------------------------------------------------------------
// Label and field selectors on list and watch
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn label_and_field_selectors() {
    let c = Cluster::start(Backend::Embedded);
    let client = client(&c).await;
    create_namespace(&client, "sel").await;
    let cms = core("sel", "configmaps");
    for (name, labels) in [
        ("a", json!({"env": "prod", "tier": "web"})),
        ("b", json!({"env": "dev", "tier": "db"})),
        ("c", json!({"env": "prod"})),
        ("d", json!({})),
    ] {
        expect(
            post(&client, &cms, &configmap(name, labels)).await,
            201,
            "create",
        );
    }
    let cases: &[(&str, &[&str])] = &[
        ("env=prod", &["a", "c"]),
        ("env==prod", &["a", "c"]),
        ("env!=prod", &["b", "d"]),
        ("env in (prod,dev)", &["a", "b", "c"]),
        ("env notin (prod)", &["b", "d"]),
        ("tier", &["a", "b"]),
        ("!tier", &["c", "d"]),
        ("env=prod,tier=web", &["a"]),
        ("env in (prod),!tier", &["c"]),
        ("env", &["a", "b", "c"]),
        ("", &["a", "b", "c", "d"]),
    ];
    for (selector, want) in cases {
        let list = expect(
            get(&client, &format!("{cms}?labelSelector={}", enc(selector))).await,
            200,
            selector,
        );
        assert_eq!(names(&list), strs(want), "labelSelector {selector:?}");
    }
    let typed: Api<ConfigMap> = Api::namespaced(client.clone(), "sel");
    let listed = typed
        .list(&ListParams::default().labels("env in (prod),tier notin (db)"))
        .await
        .unwrap();
    let mut got: Vec<String> = listed
        .items
        .iter()
        .map(|o| o.metadata.name.clone().unwrap())
        .collect();
    got.sort();
    assert_eq!(got, strs(&["a", "c"]));

    let field_cases: &[(&str, &[&str])] = &[
        ("metadata.name=a", &["a"]),
        ("metadata.name==a", &["a"]),
        ("metadata.name!=a", &["b", "c", "d"]),
        ("metadata.name=a,metadata.namespace=sel", &["a"]),
        ("metadata.namespace=other", &[]),
    ];
    for (selector, want) in field_cases {
        let list = expect(
            get(&client, &format!("{cms}?fieldSelector={}", enc(selector))).await,
            200,
            selector,
        );
        assert_eq!(names(&list), strs(want), "fieldSelector {selector:?}");
    }
    let across = expect(
        get(
            &client,
            &format!(
                "/api/v1/configmaps?fieldSelector={}",
                enc("metadata.namespace=sel")
            ),
        )
        .await,
        200,
        "all namespaces",
    );
    assert_eq!(names(&across), strs(&["a", "b", "c", "d"]));
    let both = expect(
        get(
            &client,
            &format!(
                "{cms}?labelSelector={}&fieldSelector={}",
                enc("env=prod"),
                enc("metadata.name!=a")
            ),
        )
        .await,
        200,
        "both",
    );
    assert_eq!(names(&both), strs(&["c"]));
    expect_error(
        get(&client, &format!("{cms}?fieldSelector={}", enc("data.k=v"))).await,
        400,
        "BadRequest",
        "unsupported field on list",
    );
    expect_error(
        get(
            &client,
            &format!("{cms}?watch=true&fieldSelector={}", enc("data.k=v")),
        )
        .await,
        400,
        "BadRequest",
        "unsupported field on watch",
    );

    // Pod fields: spec.nodeName and status.phase.
    let pods = core("sel", "pods");
    expect(post(&client, &pods, &pod("p1")).await, 201, "create");
    expect(post(&client, &pods, &pod("p2")).await, 201, "create");
    expect(
        post(
            &client,
            &format!("{pods}/p1/binding"),
            &binding("p1", "node-a"),
        )
        .await,
        201,
        "bind",
    );
    for (selector, want) in [
        ("spec.nodeName=node-a", vec!["p1"]),
        ("spec.nodeName=", vec!["p2"]),
        ("spec.nodeName!=", vec!["p1"]),
        ("status.phase=Pending", vec!["p1", "p2"]),
        ("status.phase!=Pending", vec![]),
    ] {
        let list = expect(
            get(&client, &format!("{pods}?fieldSelector={}", enc(selector))).await,
            200,
            selector,
        );
        assert_eq!(names(&list), strs(&want), "fieldSelector {selector:?}");
    }
    expect(
        patch(
            &client,
            &format!("{pods}/p1/status"),
            MERGE,
            &json!({"status": {"phase": "Running"}}),
        )
        .await,
        200,
        "phase",
    );
    let running = expect(
        get(
            &client,
            &format!("{pods}?fieldSelector={}", enc("status.phase=Running")),
        )
        .await,
        200,
        "running",
    );
    assert_eq!(names(&running), strs(&["p1"]));
    let everywhere = expect(
        get(
            &client,
            &format!("/api/v1/pods?fieldSelector={}", enc("spec.nodeName=node-a")),
        )
        .await,
        200,
        "pods on node-a",
    );
    assert_eq!(names(&everywhere), strs(&["p1"]));

    // Watches filter the same way, and report transitions: an object that stops matching
    // arrives as DELETED, one that starts matching as ADDED.
    let from = rv(&expect(get(&client, &cms).await, 200, "list"));
    let mut labels = Watch::open(
        &client,
        &format!(
            "{cms}?watch=true&resourceVersion={from}&labelSelector={}&timeoutSeconds=60",
            enc("env=prod")
        ),
    )
    .await;
    let mut fields = Watch::open(
        &client,
        &format!(
            "{cms}?watch=true&resourceVersion={from}&fieldSelector={}&timeoutSeconds=60",
            enc("metadata.name=c")
        ),
    )
    .await;
    let mut nodes = Watch::open(
        &client,
        &format!(
            "{pods}?watch=true&resourceVersion={from}&fieldSelector={}&timeoutSeconds=60",
            enc("spec.nodeName=node-b")
        ),
    )
    .await;
    expect(
        post(&client, &cms, &configmap("e", json!({"env": "prod"}))).await,
        201,
        "create e",
    );
    let left = expect(
        patch(
            &client,
            &format!("{cms}/a"),
            MERGE,
            &json!({"metadata": {"labels": {"env": "dev"}}}),
        )
        .await,
        200,
        "a leaves",
    );
    expect(
        patch(
            &client,
            &format!("{cms}/b"),
            MERGE,
            &json!({"metadata": {"labels": {"env": "prod"}}}),
        )
        .await,
        200,
        "b joins",
    );
    expect(
        patch(
            &client,
            &format!("{cms}/d"),
            MERGE,
            &json!({"data": {"k": "d2"}}),
        )
        .await,
        200,
        "d changes",
    );
    expect(
        patch(
            &client,
            &format!("{cms}/c"),
            MERGE,
            &json!({"data": {"k": "c2"}}),
        )
        .await,
        200,
        "c changes",
    );
    let seen = labels.take(4).await;
    assert_eq!(
        evs(&seen),
        vec![
            e("ADDED", "e"),
            e("DELETED", "a"),
            e("ADDED", "b"),
            e("MODIFIED", "c")
        ],
        "label-filtered watch: {seen:?}"
    );
    // Upstream sends the object as it last matched, at the revision of the change.
    assert_eq!(rv(&seen[1]["object"]), rv(&left), "{}", seen[1]);
    assert_eq!(
        seen[1]["object"]["metadata"]["labels"]["env"], "prod",
        "{}",
        seen[1]
    );
    assert_eq!(evs(&[fields.event().await]), vec![e("MODIFIED", "c")]);
    expect(
        post(
            &client,
            &format!("{pods}/p2/binding"),
            &binding("p2", "node-b"),
        )
        .await,
        201,
        "bind p2",
    );
    assert_eq!(
        evs(&[nodes.event().await]),
        vec![e("ADDED", "p2")],
        "binding to node-b makes p2 match"
    );
    // status.phase on a watch: p2 starts running and so starts matching; p1 (already
    // Running) stops when it succeeds.
    let from = rv(&expect(get(&client, &pods).await, 200, "list"));
    let mut phases = Watch::open(
        &client,
        &format!(
            "{pods}?watch=true&resourceVersion={from}&fieldSelector={}&timeoutSeconds=60",
            enc("status.phase=Running")
        ),
    )
    .await;
    // metadata.namespace on a watch across all namespaces.
    let mut across = Watch::open(
        &client,
        &format!(
            "/api/v1/configmaps?watch=true&resourceVersion={from}&fieldSelector={}&timeoutSeconds=60",
            enc("metadata.namespace=sel")
        ),
    )
    .await;
    expect(
        patch(
            &client,
            &format!("{pods}/p2/status"),
            MERGE,
            &json!({"status": {"phase": "Running"}}),
        )
        .await,
        200,
        "p2 runs",
    );
    expect(
        patch(
            &client,
            &format!("{pods}/p1/status"),
            MERGE,
            &json!({"status": {"phase": "Succeeded"}}),
        )
        .await,
        200,
        "p1 succeeds",
    );
    assert_eq!(
        evs(&phases.take(2).await),
        vec![e("ADDED", "p2"), e("DELETED", "p1")]
    );
    create_namespace(&client, "other").await;
    expect(
        post(
            &client,
            &core("other", "configmaps"),
            &configmap("elsewhere", json!({})),
        )
        .await,
        201,
        "create elsewhere",
    );
    expect(
        post(&client, &cms, &configmap("f", json!({}))).await,
        201,
        "create f",
    );
    assert_eq!(evs(&[across.event().await]), vec![e("ADDED", "f")]);
    // Nothing else arrived on the field-filtered watch.
    assert!(fields.next(Duration::from_millis(500)).await.is_none());
}

// ---------------------------------------------------------------------------------------
// Pagination
// ---------------------------------------------------------------------------------------

async fn pagination(backend: Backend) {
    let c = Cluster::start(backend);
    let client = client(&c).await;
    create_namespace(&client, "page").await;
    let cms = core("page", "configmaps");
    for i in 0..10 {
        let parity = if i % 2 == 0 { "even" } else { "odd" };
        expect(
            post(
                &client,
                &cms,
                &configmap(&format!("cm-{i:02}"), json!({"parity": parity})),
            )
            .await,
            201,
            "create",
        );
    }
    let total = names(&expect(
        get(&client, "/api/v1/configmaps").await,
        200,
        "all",
    ))
    .len();

    let first = expect(get(&client, &format!("{cms}?limit=3")).await, 200, "page 1");
    let at = rv(&first);
    assert_eq!(names(&first), strs(&["cm-00", "cm-01", "cm-02"]));
    let mut token = first["metadata"]["continue"]
        .as_str()
        .expect("a continue token")
        .to_string();
    // Changes between pages do not show in later pages.
    expect(
        delete(&client, &format!("{cms}/cm-04")).await,
        200,
        "delete",
    );
    expect(
        post(
            &client,
            &cms,
            &configmap("cm-10", json!({"parity": "even"})),
        )
        .await,
        201,
        "create",
    );
    expect(
        patch(
            &client,
            &format!("{cms}/cm-05"),
            MERGE,
            &json!({"data": {"k": "changed"}}),
        )
        .await,
        200,
        "patch",
    );
    // Read the remaining pages, then check them: (revision, names, (name, rv, data.k)).
    let mut pages = vec![(at, names(&first))];
    let mut items = Vec::new();
    loop {
        let page = expect(
            get(&client, &format!("{cms}?limit=3&continue={}", enc(&token))).await,
            200,
            "next page",
        );
        for item in page["items"].as_array().unwrap() {
            items.push((
                name_of(item).to_string(),
                rv(item),
                item["data"]["k"].as_str().unwrap_or("").to_string(),
            ));
        }
        pages.push((rv(&page), names(&page)));
        match page["metadata"]["continue"].as_str() {
            Some(t) if !t.is_empty() => token = t.to_string(),
            _ => {
                assert!(
                    page["metadata"].get("remainingItemCount").is_none(),
                    "{page}"
                );
                break;
            }
        }
    }
    let seen: Vec<String> = pages.iter().flat_map(|(_, n)| n.clone()).collect();
    let expected: Vec<String> = (0..10).map(|i| format!("cm-{i:02}")).collect();
    assert_eq!(
        seen, expected,
        "the pages must make up the list at the first page's revision {at} \
         (cm-04 deleted, cm-10 created, cm-05 changed after page 1); pages (revision, names): {pages:?}"
    );
    for (name, item_rv, k) in &items {
        assert!(
            *item_rv <= at && (name != "cm-05" || k == "v"),
            "later pages must show the objects as of revision {at}: {items:?}"
        );
    }
    let sizes: Vec<usize> = pages.iter().map(|(_, n)| n.len()).collect();
    assert_eq!(sizes, vec![3, 3, 3, 1]);
    assert!(
        pages.iter().all(|(r, _)| *r == at),
        "every page must report the first page's revision {at}: {pages:?}"
    );
    // A new list sees the changes.
    let now = expect(get(&client, &cms).await, 200, "list");
    assert!(
        names(&now).contains(&"cm-10".to_string()) && !names(&now).contains(&"cm-04".to_string())
    );

    // With a selector, pages are filled with matching objects.
    let mut pages = Vec::new();
    let mut path = format!("{cms}?limit=2&labelSelector={}", enc("parity=even"));
    loop {
        let page = expect(get(&client, &path).await, 200, "filtered page");
        pages.push(names(&page));
        match page["metadata"]["continue"].as_str() {
            Some(t) if !t.is_empty() => {
                path = format!(
                    "{cms}?limit=2&labelSelector={}&continue={}",
                    enc("parity=even"),
                    enc(t)
                )
            }
            _ => break,
        }
    }
    assert_eq!(
        pages,
        vec![
            strs(&["cm-00", "cm-02"]),
            strs(&["cm-06", "cm-08"]),
            strs(&["cm-10"])
        ]
    );

    // remainingItemCount on an unfiltered cluster-wide list, on the first and later pages.
    let first = expect(
        get(&client, "/api/v1/configmaps?limit=3").await,
        200,
        "cluster page 1",
    );
    let total_now = total; // cm-04 deleted, cm-10 created
    assert_eq!(
        first["metadata"]["remainingItemCount"],
        json!(total_now - 3),
        "{}",
        first["metadata"]
    );
    let token = first["metadata"]["continue"].as_str().unwrap().to_string();
    expect(
        post(&client, &cms, &configmap("cm-11", json!({}))).await,
        201,
        "create",
    );
    let second = expect(
        get(
            &client,
            &format!("/api/v1/configmaps?limit=3&continue={}", enc(&token)),
        )
        .await,
        200,
        "cluster page 2",
    );
    assert_eq!(
        second["metadata"]["remainingItemCount"],
        json!(total_now - 6),
        "{}",
        second["metadata"]
    );

    // kube-rs paging.
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "page");
    let mut params = ListParams::default().limit(4);
    let mut all = Vec::new();
    loop {
        let page = api.list(&params).await.expect("list");
        assert!(page.items.len() <= 4);
        all.extend(page.items.iter().map(|o| o.metadata.name.clone().unwrap()));
        match page.metadata.continue_.filter(|t| !t.is_empty()) {
            Some(t) => params = ListParams::default().limit(4).continue_token(&t),
            None => break,
        }
    }
    assert_eq!(all, names(&expect(get(&client, &cms).await, 200, "list")));
}

#[tokio::test]
async fn pagination_on_embedded_store() {
    pagination(Backend::Embedded).await;
}

#[tokio::test]
async fn pagination_on_etcd() {
    pagination(Backend::Etcd).await;
}

/// A list at an exact revision shows the objects as they were then, and says so; with a
/// limit, a non-zero resourceVersion means Exact too (the API concepts' "legacy" rule).
async fn exact_lists(backend: Backend) {
    let c = Cluster::start(backend);
    let client = client(&c).await;
    create_namespace(&client, "exact").await;
    let cms = core("exact", "configmaps");
    expect(
        post(&client, &cms, &configmap("a", json!({}))).await,
        201,
        "create",
    );
    let old = rv(&expect(get(&client, &cms).await, 200, "list"));
    expect(
        patch(
            &client,
            &format!("{cms}/a"),
            MERGE,
            &json!({"data": {"k": "new"}}),
        )
        .await,
        200,
        "patch",
    );
    expect(
        post(&client, &cms, &configmap("b", json!({}))).await,
        201,
        "create",
    );
    for query in [
        format!("resourceVersion={old}&resourceVersionMatch=Exact"),
        format!("resourceVersion={old}&limit=10"),
    ] {
        let list = expect(get(&client, &format!("{cms}?{query}")).await, 200, &query);
        let items: Vec<(String, String)> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    name_of(o).to_string(),
                    o["data"]["k"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert_eq!(
            (rv(&list), items.clone()),
            (old, vec![("a".to_string(), "v".to_string())]),
            "GET {cms}?{query}: upstream answers the list as of revision {old}; got revision {} and {items:?}",
            rv(&list)
        );
    }
}

#[tokio::test]
async fn exact_lists_on_embedded_store() {
    exact_lists(Backend::Embedded).await;
}

#[tokio::test]
async fn exact_lists_on_etcd() {
    exact_lists(Backend::Etcd).await;
}

/// Upstream counts the rest of the namespace (etcd's range count, or the watch cache's) in
/// remainingItemCount for namespaced lists too.
#[tokio::test]
async fn namespaced_pages_report_remaining_item_count() {
    let c = Cluster::start(Backend::Embedded);
    let client = client(&c).await;
    create_namespace(&client, "page").await;
    let cms = core("page", "configmaps");
    for i in 0..10 {
        expect(
            post(&client, &cms, &configmap(&format!("cm-{i:02}"), json!({}))).await,
            201,
            "create",
        );
    }
    let first = expect(get(&client, &format!("{cms}?limit=3")).await, 200, "page 1");
    assert_eq!(
        first["metadata"]["remainingItemCount"],
        json!(7),
        "GET {cms}?limit=3 with 10 configmaps: upstream answers metadata.remainingItemCount 7; got metadata {}",
        first["metadata"]
    );
    let token = first["metadata"]["continue"].as_str().unwrap();
    let second = expect(
        get(&client, &format!("{cms}?limit=3&continue={}", enc(token))).await,
        200,
        "page 2",
    );
    assert_eq!(
        second["metadata"]["remainingItemCount"],
        json!(4),
        "{}",
        second["metadata"]
    );
}

async fn expired_continue(backend: Backend) {
    let c = Cluster::start_with(backend, &["--compaction-interval-seconds", "1"]);
    let client = client(&c).await;
    create_namespace(&client, "page").await;
    let cms = core("page", "configmaps");
    for i in 0..6 {
        expect(
            post(&client, &cms, &configmap(&format!("cm-{i:02}"), json!({}))).await,
            201,
            "create",
        );
    }
    let old = rv(&expect(get(&client, &cms).await, 200, "list"));
    for i in 0..3 {
        expect(
            patch(
                &client,
                &format!("{cms}/cm-00"),
                MERGE,
                &json!({"data": {"k": i.to_string()}}),
            )
            .await,
            200,
            "patch",
        );
    }
    // Wait until the store has compacted past `old` (two compactions: each compacts to the
    // revision that was current one interval earlier).
    let (_, compacted) = poll(
        &client,
        &format!("{cms}?resourceVersion={old}&resourceVersionMatch=Exact"),
        "the old revision to be compacted",
        |s, _| s == 410,
    )
    .await;
    let token = base64::engine::general_purpose::URL_SAFE.encode(
        serde_json::to_vec(&json!({"v": "meta.k8s.io/v1", "rv": old, "start": "page/cm-01"}))
            .unwrap(),
    );
    let expired = expect_error(
        get(&client, &format!("{cms}?limit=2&continue={}", enc(&token))).await,
        410,
        "Expired",
        "a continue token for a compacted revision",
    );
    let fresh = expired["metadata"]["continue"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        !fresh.is_empty(),
        "the 410 carries a token to continue inconsistently: {expired}"
    );
    let rest = expect(
        get(&client, &format!("{cms}?limit=2&continue={}", enc(&fresh))).await,
        200,
        "continue",
    );
    assert!(!names(&rest).is_empty(), "{rest}");
    assert!(names(&rest).iter().all(|n| n.as_str() > "cm-00"), "{rest}");
    // Upstream answers a list at a compacted exact revision with 410 Expired
    // (apierrors.NewResourceExpired in the etcd3 store).
    assert_eq!(
        reason_of(&compacted),
        "Expired",
        "GET {cms}?resourceVersion={old}&resourceVersionMatch=Exact after compaction: {compacted}"
    );
}

#[tokio::test]
async fn expired_continue_token_on_embedded_store() {
    expired_continue(Backend::Embedded).await;
}

#[tokio::test]
async fn expired_continue_token_on_etcd() {
    expired_continue(Backend::Etcd).await;
}

// ---------------------------------------------------------------------------------------
// Watch
// ---------------------------------------------------------------------------------------

async fn watch_semantics(backend: Backend) {
    let c = Cluster::start(backend);
    let client = client(&c).await;
    create_namespace(&client, "w").await;
    let cms = core("w", "configmaps");
    expect(
        post(&client, &cms, &configmap("a", json!({}))).await,
        201,
        "create a",
    );
    let b = expect(
        post(&client, &cms, &configmap("b", json!({}))).await,
        201,
        "create b",
    );
    let rv_b = rv(&b);

    // No resourceVersion: the current state as ADDED events, then the changes.
    let mut w = Watch::open(&client, &format!("{cms}?watch=true&timeoutSeconds=60")).await;
    let initial = w.take(2).await;
    let initial: BTreeSet<_> = evs(&initial).into_iter().collect();
    assert_eq!(
        initial,
        [e("ADDED", "a"), e("ADDED", "b")].into_iter().collect()
    );
    let c_obj = expect(
        post(&client, &cms, &configmap("c", json!({}))).await,
        201,
        "create c",
    );
    let a2 = expect(
        patch(
            &client,
            &format!("{cms}/a"),
            MERGE,
            &json!({"data": {"k": "a2"}}),
        )
        .await,
        200,
        "patch a",
    );
    expect(delete(&client, &format!("{cms}/b")).await, 200, "delete b");
    let events = w.take(3).await;
    assert_eq!(
        evs(&events),
        vec![e("ADDED", "c"), e("MODIFIED", "a"), e("DELETED", "b")]
    );
    assert_eq!(rv(&events[0]["object"]), rv(&c_obj));
    assert_eq!(rv(&events[1]["object"]), rv(&a2));
    assert_eq!(events[1]["object"]["data"]["k"], "a2");
    assert!(
        rv(&events[2]["object"]) > rv(&a2),
        "a deletion has its own revision: {}",
        events[2]
    );
    let deleted_at = rv(&events[2]["object"]);

    // "0": the state at any recent revision as ADDED events, then changes.
    let mut w0 = Watch::open(
        &client,
        &format!("{cms}?watch=true&resourceVersion=0&timeoutSeconds=60"),
    )
    .await;
    let initial: BTreeSet<_> = evs(&w0.take(2).await).into_iter().collect();
    assert_eq!(
        initial,
        [e("ADDED", "a"), e("ADDED", "c")].into_iter().collect()
    );
    let d = expect(
        post(&client, &cms, &configmap("d", json!({}))).await,
        201,
        "create d",
    );
    assert_eq!(evs(&[w0.event().await]), vec![e("ADDED", "d")]);

    // An exact version: only what happened after it, in order.
    let mut wx = Watch::open(
        &client,
        &format!("{cms}?watch=true&resourceVersion={rv_b}&timeoutSeconds=60"),
    )
    .await;
    assert_eq!(
        evs(&wx.take(4).await),
        vec![
            e("ADDED", "c"),
            e("MODIFIED", "a"),
            e("DELETED", "b"),
            e("ADDED", "d")
        ]
    );
    let mut wd = Watch::open(
        &client,
        &format!("{cms}?watch=true&resourceVersion={deleted_at}&timeoutSeconds=60"),
    )
    .await;
    assert_eq!(evs(&[wd.event().await]), vec![e("ADDED", "d")]);
    // Through kube-rs.
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "w");
    {
        use futures::TryStreamExt;
        let stream = api
            .watch(
                &kube::api::WatchParams::default().timeout(30),
                &rv(&d).to_string(),
            )
            .await
            .expect("watch");
        futures::pin_mut!(stream);
        expect(
            patch(
                &client,
                &format!("{cms}/d"),
                MERGE,
                &json!({"data": {"k": "d2"}}),
            )
            .await,
            200,
            "patch d",
        );
        let event = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
            .await
            .expect("an event within 10s")
            .expect("watch event")
            .expect("stream open");
        match event {
            kube::api::WatchEvent::Modified(cm) => {
                assert_eq!(cm.metadata.name.as_deref(), Some("d"))
            }
            other => panic!("expected MODIFIED d, got {other:?}"),
        }
    }

    // timeoutSeconds ends the stream.
    let started = Instant::now();
    let mut wt = Watch::open(&client, &format!("{cms}?watch=true&timeoutSeconds=1")).await;
    let rest = wt.rest(Duration::from_secs(15)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the watch ended early"
    );
    assert_eq!(rest.len(), 3, "only the initial events: {rest:?}");

    // sendInitialEvents: the state as ADDED events, then a BOOKMARK annotated
    // k8s.io/initial-events-end, then changes.
    let latest = current_revision(&client).await;
    let mut existing = vec!["a".to_string(), "c".to_string(), "d".to_string()];
    for rv_param in [String::new(), format!("&resourceVersion={latest}")] {
        let mut wi = Watch::open(
            &client,
            &format!("{cms}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=60{rv_param}"),
        )
        .await;
        let initial: BTreeSet<_> = evs(&wi.take(existing.len()).await).into_iter().collect();
        let want: BTreeSet<_> = existing.iter().map(|n| e("ADDED", n)).collect();
        assert_eq!(initial, want);
        let mark = wi.event().await;
        assert_eq!(mark["type"], "BOOKMARK", "{mark}");
        assert_eq!(mark["object"]["kind"], "ConfigMap", "{mark}");
        assert_eq!(
            mark["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true",
            "{mark}"
        );
        assert!(rv(&mark["object"]) >= latest, "{mark}");
        let name = format!("after-{}", rv_param.len());
        expect(
            post(&client, &cms, &configmap(&name, json!({}))).await,
            201,
            "create",
        );
        assert_eq!(evs(&[wi.event().await]), vec![e("ADDED", &name)]);
        existing.push(name);
    }

    // allowWatchBookmarks: upstream's watch cache sends a BOOKMARK two seconds before the
    // watch's deadline (cacheWatcher.nextBookmarkTime), so a client resuming after the
    // timeout has a recent resourceVersion.
    let now = current_revision(&client).await;
    let mut wb = Watch::open(
        &client,
        &format!(
            "{cms}?watch=true&allowWatchBookmarks=true&resourceVersion={now}&timeoutSeconds=5"
        ),
    )
    .await;
    let events = wb.rest(Duration::from_secs(20)).await;
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "BOOKMARK" && rv(&e["object"]) >= now),
        "GET {cms}?watch=true&allowWatchBookmarks=true&resourceVersion={now}&timeoutSeconds=5 ended without a BOOKMARK: {events:?}"
    );
}

#[tokio::test]
async fn watch_semantics_on_embedded_store() {
    watch_semantics(Backend::Embedded).await;
}

#[tokio::test]
async fn watch_semantics_on_etcd() {
    watch_semantics(Backend::Etcd).await;
}

async fn watch_too_old(backend: Backend) {
    let c = Cluster::start_with(backend, &["--watch-cache-size", "5"]);
    let client = client(&c).await;
    create_namespace(&client, "w").await;
    let cms = core("w", "configmaps");
    let first = rv(&expect(
        post(&client, &cms, &configmap("churn", json!({}))).await,
        201,
        "create",
    ));
    for i in 0..20 {
        expect(
            patch(
                &client,
                &format!("{cms}/churn"),
                MERGE,
                &json!({"data": {"k": i.to_string()}}),
            )
            .await,
            200,
            "patch",
        );
    }
    let (status, mut w) = Watch::try_open(
        &client,
        &format!("{cms}?watch=true&resourceVersion={first}&timeoutSeconds=30"),
    )
    .await;
    assert_eq!(
        status, 200,
        "upstream reports a too old resourceVersion in the stream"
    );
    let error = w.event().await;
    assert_eq!(error["type"], "ERROR", "{error}");
    assert_eq!(error["object"]["kind"], "Status", "{error}");
    assert_eq!(error["object"]["code"], 410, "{error}");
    assert_eq!(error["object"]["reason"], "Expired", "{error}");
    assert!(
        w.rest(Duration::from_secs(10)).await.is_empty(),
        "the stream ends after the error"
    );
    // From the current revision all is well.
    let now = rv(&expect(get(&client, &cms).await, 200, "list"));
    let mut w = Watch::open(
        &client,
        &format!("{cms}?watch=true&resourceVersion={now}&timeoutSeconds=30"),
    )
    .await;
    expect(
        patch(
            &client,
            &format!("{cms}/churn"),
            MERGE,
            &json!({"data": {"k": "last"}}),
        )
        .await,
        200,
        "patch",
    );
    assert_eq!(evs(&[w.event().await]), vec![e("MODIFIED", "churn")]);
}

#[tokio::test]
async fn watch_too_old_on_embedded_store() {
    watch_too_old(Backend::Embedded).await;
}

#[tokio::test]
async fn watch_too_old_on_etcd() {
    watch_too_old(Backend::Etcd).await;
}

// ---------------------------------------------------------------------------------------
// dryRun
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn dry_run_changes_nothing() {
    let c = Cluster::start(Backend::Embedded);
    let client = client(&c).await;
    create_namespace(&client, "dry").await;
    let cms = core("dry", "configmaps");
    let existing = expect(
        post(&client, &cms, &configmap("existing", json!({}))).await,
        201,
        "create",
    );
    let before = current_revision(&client).await;
    let path = format!("{cms}/existing");

    let ghost = expect(
        post(
            &client,
            &format!("{cms}?dryRun=All"),
            &configmap("ghost", json!({})),
        )
        .await,
        201,
        "dry create",
    );
    assert_eq!(name_of(&ghost), "ghost");
    assert!(
        ghost["metadata"]["uid"].is_string(),
        "a dry run shows the object as it would be: {ghost}"
    );
    assert_eq!(get(&client, &format!("{cms}/ghost")).await.0, 404);

    let mut changed = existing.clone();
    changed["data"]["k"] = json!("changed");
    let shown = expect(
        put(&client, &format!("{path}?dryRun=All"), &changed).await,
        200,
        "dry update",
    );
    assert_eq!(shown["data"]["k"], "changed");
    let shown = expect(
        patch(
            &client,
            &format!("{path}?dryRun=All"),
            MERGE,
            &json!({"data": {"k": "patched"}}),
        )
        .await,
        200,
        "dry patch",
    );
    assert_eq!(shown["data"]["k"], "patched");
    expect(
        delete(&client, &format!("{path}?dryRun=All")).await,
        200,
        "dry delete",
    );
    expect(
        delete(&client, &format!("{cms}?dryRun=All")).await,
        200,
        "dry deletecollection",
    );
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "dry");
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    api.create(
        &pp,
        &serde_json::from_value(configmap("typed", json!({}))).unwrap(),
    )
    .await
    .expect("dry create");

    let now = expect(get(&client, &path).await, 200, "still there");
    assert_eq!(now["data"]["k"], "v");
    assert_eq!(rv(&now), rv(&existing));
    assert_eq!(
        names(&expect(get(&client, &cms).await, 200, "list")),
        strs(&["existing"])
    );
    assert_eq!(
        current_revision(&client).await,
        before,
        "dry runs must not write"
    );

    // DeleteOptions may carry dryRun in the body, as kube-rs and client-go send it.
    let options = json!({"kind": "DeleteOptions", "apiVersion": "v1", "dryRun": ["All"]});
    expect(
        delete_with(&client, &path, &options).await,
        200,
        "DELETE with DeleteOptions {dryRun: [All]}",
    );
    let (status, body) = get(&client, &path).await;
    assert_eq!(
        status, 200,
        "DELETE {path} with the body {options} must not delete the object; it is gone: {body}"
    );
    expect(
        delete_with(&client, &cms, &options).await,
        200,
        "DELETE collection with DeleteOptions {dryRun: [All]}",
    );
    let (status, body) = get(&client, &path).await;
    assert_eq!(
        status, 200,
        "DELETE {cms} with the body {options} must not delete anything; {path} is gone: {body}"
    );
    api.delete("existing", &DeleteParams::default().dry_run())
        .await
        .expect("dry delete through kube-rs");
    assert_eq!(get(&client, &path).await.0, 200);
    assert_eq!(
        current_revision(&client).await,
        before,
        "dry runs must not write"
    );
}

// ---------------------------------------------------------------------------------------
// Table and PartialObjectMetadata output
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn table_and_metadata_output() {
    let c = Cluster::start(Backend::Embedded);
    let client = client(&c).await;
    create_namespace(&client, "tbl").await;
    expect(
        post(&client, &core("tbl", "pods"), &pod("p")).await,
        201,
        "pod",
    );
    expect(
        post(
            &client,
            "/api/v1/nodes",
            &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-t"}}),
        )
        .await,
        201,
        "node",
    );
    expect(
        post(&client, &core("tbl", "services"), &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"}, "spec": {"ports": [{"port": 80}], "selector": {"app": "p"}}})).await,
        201,
        "service",
    );
    expect(
        post(&client, &apps("tbl", "deployments"), &deployment("dep", 1)).await,
        201,
        "deployment",
    );
    expect(
        post(&client, &apps("tbl", "replicasets"), &replicaset("rs", 1)).await,
        201,
        "replicaset",
    );
    expect(
        post(
            &client,
            &core("tbl", "events"),
            &json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "ev"},
                    "involvedObject": {"kind": "Pod", "name": "p", "namespace": "tbl"},
                    "reason": "Tested", "message": "hello", "type": "Normal", "count": 1,
                    "source": {"component": "test"}}),
        )
        .await,
        201,
        "event",
    );
    let cases: &[(String, &str, &[&str])] = &[
        (
            core("tbl", "pods"),
            "p",
            &[
                "Name",
                "Ready",
                "Status",
                "Restarts",
                "Age",
                "IP",
                "Node",
                "Nominated Node",
                "Readiness Gates",
            ],
        ),
        (
            "/api/v1/nodes".into(),
            "node-t",
            &[
                "Name",
                "Status",
                "Roles",
                "Age",
                "Version",
                "Internal-IP",
                "External-IP",
                "OS-Image",
                "Kernel-Version",
                "Container-Runtime",
            ],
        ),
        (
            "/api/v1/namespaces".into(),
            "tbl",
            &["Name", "Status", "Age"],
        ),
        (
            core("tbl", "services"),
            "svc",
            &[
                "Name",
                "Type",
                "Cluster-IP",
                "External-IP",
                "Port(s)",
                "Age",
                "Selector",
            ],
        ),
        (
            apps("tbl", "deployments"),
            "dep",
            &[
                "Name",
                "Ready",
                "Up-to-date",
                "Available",
                "Age",
                "Containers",
                "Images",
                "Selector",
            ],
        ),
        (
            apps("tbl", "replicasets"),
            "rs",
            &[
                "Name",
                "Desired",
                "Current",
                "Ready",
                "Age",
                "Containers",
                "Images",
                "Selector",
            ],
        ),
        (
            core("tbl", "events"),
            "ev",
            &[
                "Last Seen",
                "Type",
                "Reason",
                "Object",
                "Subobject",
                "Source",
                "Message",
                "First Seen",
                "Count",
                "Name",
            ],
        ),
    ];
    for (path, name, columns) in cases {
        let table = expect(get_as(&client, path, TABLE).await, 200, path);
        assert_eq!(
            (table["kind"].as_str(), table["apiVersion"].as_str()),
            (Some("Table"), Some("meta.k8s.io/v1")),
            "{table}"
        );
        let got: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(&got, columns, "{path}: column names");
        let rows = table["rows"].as_array().unwrap();
        let row = rows
            .iter()
            .find(|r| r["object"]["metadata"]["name"] == *name)
            .unwrap_or_else(|| panic!("{path}: no row for {name}: {table}"));
        assert_eq!(
            row["cells"].as_array().unwrap().len(),
            columns.len(),
            "{row}"
        );
        assert_eq!(row["object"]["kind"], "PartialObjectMetadata", "{row}");
        let name_column = columns.iter().position(|c| *c == "Name").unwrap();
        assert_eq!(row["cells"][name_column], *name, "{row}");
        assert!(table["metadata"]["resourceVersion"].is_string(), "{table}");
    }
    // A single object, and includeObject.
    let one = expect(
        get_as(&client, &core("tbl", "pods/p"), TABLE).await,
        200,
        "pod table",
    );
    assert_eq!(one["rows"].as_array().unwrap().len(), 1);
    assert_eq!(one["rows"][0]["cells"][0], "p");
    assert_eq!(one["rows"][0]["cells"][2], "Pending");
    let full = expect(
        get_as(
            &client,
            &format!("{}?includeObject=Object", core("tbl", "pods")),
            TABLE,
        )
        .await,
        200,
        "Object",
    );
    assert_eq!(full["rows"][0]["object"]["kind"], "Pod");
    let none = expect(
        get_as(
            &client,
            &format!("{}?includeObject=None", core("tbl", "pods")),
            TABLE,
        )
        .await,
        200,
        "None",
    );
    assert!(
        none["rows"][0].get("object").is_none_or(Value::is_null),
        "{none}"
    );

    // PartialObjectMetadata.
    let meta = expect(
        get_as(&client, &core("tbl", "pods/p"), METADATA).await,
        200,
        "metadata",
    );
    assert_eq!(
        (meta["kind"].as_str(), meta["apiVersion"].as_str()),
        (Some("PartialObjectMetadata"), Some("meta.k8s.io/v1"))
    );
    assert_eq!(meta["metadata"]["name"], "p");
    assert!(meta.get("spec").is_none(), "{meta}");
    let list = expect(
        get_as(
            &client,
            &core("tbl", "pods"),
            "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io",
        )
        .await,
        200,
        "metadata list",
    );
    assert_eq!(list["kind"], "PartialObjectMetadataList");
    assert_eq!(names(&list), strs(&["p"]));
    assert!(list["items"][0].get("spec").is_none());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "tbl");
    let typed = pods.get_metadata("p").await.expect("get_metadata");
    assert_eq!(typed.metadata.name.as_deref(), Some("p"));
    let typed = pods
        .list_metadata(&ListParams::default())
        .await
        .expect("list_metadata");
    assert_eq!(typed.items.len(), 1);
}

// ---------------------------------------------------------------------------------------
// Server-side apply
// ---------------------------------------------------------------------------------------

fn managers(obj: &ConfigMap) -> Vec<(String, String, String)> {
    obj.metadata
        .managed_fields
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            (
                m.manager.unwrap_or_default(),
                m.operation.unwrap_or_default(),
                m.fields_v1.map(|f| f.0.to_string()).unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn server_side_apply() {
    let c = Cluster::start(Backend::Embedded);
    let client = client(&c).await;
    create_namespace(&client, "ssa").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "ssa");
    let config = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "1", "b": "2"}});

    // Apply creates, and records the manager.
    let created = cms
        .patch("cfg", &PatchParams::apply("mgr-a"), &Patch::Apply(&config))
        .await
        .expect("apply");
    let m = managers(&created);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!((m[0].0.as_str(), m[0].1.as_str()), ("mgr-a", "Apply"));
    assert!(m[0].2.contains("f:a") && m[0].2.contains("f:b"), "{m:?}");
    let (status, _) = patch(
        &client,
        "/api/v1/namespaces/ssa/configmaps/fresh?fieldManager=mgr-a",
        APPLY,
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fresh"}, "data": {"x": "y"}}),
    )
    .await;
    assert_eq!(status, 201, "an apply that creates answers 201");

    // An update by another manager is recorded as an Update.
    let mut current = cms.get("cfg").await.unwrap();
    current
        .data
        .as_mut()
        .unwrap()
        .insert("a".into(), "10".into());
    let pp = PostParams {
        field_manager: Some("editor".into()),
        ..Default::default()
    };
    let updated = cms.replace("cfg", &pp, &current).await.expect("update");
    let m = managers(&updated);
    assert!(
        m.iter()
            .any(|(n, op, f)| n == "editor" && op == "Update" && f.contains("f:a")),
        "{m:?}"
    );
    assert!(
        m.iter().any(|(n, op, f)| n == "mgr-a"
            && op == "Apply"
            && f.contains("f:b")
            && !f.contains("f:a")),
        "{m:?}"
    );

    // Applying a value another manager owns conflicts...
    match cms
        .patch("cfg", &PatchParams::apply("mgr-a"), &Patch::Apply(&config))
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"), "{s:?}");
            assert!(
                s.message.contains("conflict with \"editor\"") && s.message.contains(".data.a"),
                "{}",
                s.message
            );
        }
        other => panic!("apply over another manager's field must conflict: {other:?}"),
    }
    assert_eq!(cms.get("cfg").await.unwrap().data.unwrap()["a"], "10");
    // ...unless forced, which takes the field over.
    let forced = cms
        .patch(
            "cfg",
            &PatchParams::apply("mgr-a").force(),
            &Patch::Apply(&config),
        )
        .await
        .expect("force");
    assert_eq!(forced.data.as_ref().unwrap()["a"], "1");
    let m = managers(&forced);
    assert!(
        !m.iter().any(|(n, _, f)| n == "editor" && f.contains("f:a")),
        "{m:?}"
    );
    // Applying the same value as another applier shares the field.
    cms.patch("cfg", &PatchParams::apply("mgr-b"), &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "1"}})))
        .await
        .expect("shared apply");
    // Dropping a field from the applied configuration removes it when no one else owns it.
    let smaller = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "1"}});
    let after = cms
        .patch("cfg", &PatchParams::apply("mgr-a"), &Patch::Apply(&smaller))
        .await
        .expect("apply");
    let data = after.data.clone().unwrap();
    assert!(!data.contains_key("b"), "b was only mgr-a's: {data:?}");
    assert_eq!(data["a"], "1");
    let m = managers(&after);
    assert!(
        m.iter().any(|(n, _, f)| n == "mgr-b" && f.contains("f:a")),
        "{m:?}"
    );
    // Shared ownership is not a licence: a different value from mgr-b conflicts with mgr-a.
    match cms
        .patch("cfg", &PatchParams::apply("mgr-b"), &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "2"}})))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 409, "{s:?}"),
        other => panic!("must conflict with mgr-a: {other:?}"),
    }

    // Typed apply of a deployment; re-applying the same configuration writes nothing.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "ssa");
    let d = deployments
        .patch(
            "web",
            &PatchParams::apply("mgr-a"),
            &Patch::Apply(deployment("web", 2)),
        )
        .await
        .expect("apply");
    assert_eq!(d.metadata.generation, Some(1));
    assert!(
        d.metadata
            .managed_fields
            .as_ref()
            .is_some_and(|m| !m.is_empty())
    );
    let again = deployments
        .patch(
            "web",
            &PatchParams::apply("mgr-a"),
            &Patch::Apply(deployment("web", 2)),
        )
        .await
        .expect("apply");
    assert_eq!(
        again.metadata.resource_version, d.metadata.resource_version,
        "a no-op apply must not write"
    );
    let scaled = deployments
        .patch(
            "web",
            &PatchParams::apply("mgr-a"),
            &Patch::Apply(deployment("web", 4)),
        )
        .await
        .expect("apply");
    assert_eq!(scaled.spec.unwrap().replicas, Some(4));
    assert_eq!(scaled.metadata.generation, Some(2));
}

// ---------------------------------------------------------------------------------------
// pods/log
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn pod_logs() {
    let c = Cluster::start(Backend::Embedded);
    let client = client(&c).await;
    let pods = core("default", "pods");
    expect(
        post(&client, &pods, &pod("unscheduled")).await,
        201,
        "create",
    );
    expect(post(&client, &pods, &pod("scheduled")).await, 201, "create");
    expect(
        post(
            &client,
            &format!("{pods}/scheduled/binding"),
            &binding("scheduled", "node-a"),
        )
        .await,
        201,
        "bind",
    );
    expect_error(
        get(&client, &format!("{pods}/missing/log")).await,
        404,
        "NotFound",
        "log of a missing pod",
    );
    expect_error(
        get(&client, &format!("{pods}/unscheduled/log")).await,
        400,
        "BadRequest",
        "log of an unscheduled pod",
    );
    expect_error(
        get(&client, &format!("{pods}/scheduled/log")).await,
        503,
        "ServiceUnavailable",
        "log without node agents",
    );
    expect_error(
        get(&client, &format!("{pods}/scheduled/log?container=nope")).await,
        400,
        "BadRequest",
        "log of a container the pod does not have",
    );
    let api: Api<Pod> = Api::default_namespaced(client.clone());
    match api.logs("missing", &LogParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Every verb on every served resource
// ---------------------------------------------------------------------------------------

/// (API prefix, plural, namespaced).
const RESOURCES: &[(&str, &str, bool)] = &[
    ("/api/v1", "namespaces", false),
    ("/api/v1", "pods", true),
    ("/api/v1", "nodes", false),
    ("/api/v1", "services", true),
    ("/api/v1", "endpoints", true),
    ("/api/v1", "configmaps", true),
    ("/api/v1", "secrets", true),
    ("/api/v1", "serviceaccounts", true),
    ("/api/v1", "events", true),
    ("/apis/apps/v1", "deployments", true),
    ("/apis/apps/v1", "replicasets", true),
    ("/apis/coordination.k8s.io/v1", "leases", true),
    ("/apis/discovery.k8s.io/v1", "endpointslices", true),
];

/// A minimal valid object of a resource.
fn minimal(plural: &str, name: &str) -> Value {
    let meta = json!({"name": name});
    match plural {
        "namespaces" => json!({"apiVersion": "v1", "kind": "Namespace", "metadata": meta}),
        "pods" => {
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
        }
        "nodes" => json!({"apiVersion": "v1", "kind": "Node", "metadata": meta}),
        "services" => {
            json!({"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {"ports": [{"port": 80}]}})
        }
        "endpoints" => {
            json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": meta, "subsets": [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}]})
        }
        "configmaps" => {
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}})
        }
        "secrets" => {
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": {"k": "v"}})
        }
        "serviceaccounts" => {
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta})
        }
        "events" => {
            json!({"apiVersion": "v1", "kind": "Event", "metadata": meta, "involvedObject": {"kind": "Pod", "name": "p", "namespace": "smoke"}, "reason": "Smoke", "message": "m", "type": "Normal"})
        }
        "deployments" => {
            let mut d = deployment(name, 1);
            d["metadata"] = meta;
            d
        }
        "replicasets" => {
            let mut r = replicaset(name, 1);
            r["metadata"] = meta;
            r
        }
        "leases" => {
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": {"holderIdentity": "me", "leaseDurationSeconds": 10}})
        }
        "endpointslices" => {
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta, "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}], "ports": [{"port": 80}]})
        }
        other => panic!("no minimal object for {other}"),
    }
}

#[tokio::test]
async fn every_verb_on_every_resource() {
    let c = Cluster::start(Backend::Embedded);
    let client = client(&c).await;
    create_namespace(&client, "smoke").await;
    for (prefix, plural, namespaced) in RESOURCES {
        let coll = if *namespaced {
            format!("{prefix}/namespaces/smoke/{plural}")
        } else {
            format!("{prefix}/{plural}")
        };
        let item = |name: &str| format!("{coll}/{name}");
        let what = |verb: &str| format!("{verb} {plural}");

        // list, then watch from the list's revision.
        let list = expect(get(&client, &coll).await, 200, &what("list"));
        let mut watch = Watch::open(
            &client,
            &format!(
                "{coll}?watch=true&resourceVersion={}&fieldSelector={}&timeoutSeconds=120",
                rv(&list),
                enc("metadata.name=smoke-1")
            ),
        )
        .await;
        // create, get, list
        let created = expect(
            post(&client, &coll, &minimal(plural, "smoke-1")).await,
            201,
            &what("create"),
        );
        assert_eq!(name_of(&created), "smoke-1");
        let got = expect(get(&client, &item("smoke-1")).await, 200, &what("get"));
        assert_eq!(got["metadata"]["uid"], created["metadata"]["uid"]);
        let list = expect(get(&client, &coll).await, 200, &what("list"));
        assert!(
            names(&list).contains(&"smoke-1".to_string()),
            "{plural}: {list}"
        );
        // update, patch
        let mut changed = got.clone();
        changed["metadata"]["labels"] = json!({"updated": "yes"});
        let updated = expect(
            put(&client, &item("smoke-1"), &changed).await,
            200,
            &what("update"),
        );
        assert_eq!(updated["metadata"]["labels"]["updated"], "yes");
        let patched = expect(
            patch(
                &client,
                &item("smoke-1"),
                MERGE,
                &json!({"metadata": {"labels": {"patched": "yes"}}}),
            )
            .await,
            200,
            &what("patch"),
        );
        assert_eq!(patched["metadata"]["labels"]["updated"], "yes");
        assert_eq!(patched["metadata"]["labels"]["patched"], "yes");
        // delete (namespaces go through Terminating first).
        expect(
            delete(&client, &item("smoke-1")).await,
            200,
            &what("delete"),
        );
        wait_gone(&client, &item("smoke-1")).await;
        // The watch saw all of it.
        let mut seen = Vec::new();
        loop {
            let event = watch.event().await;
            let kind = event["type"].as_str().unwrap_or("").to_string();
            seen.push(kind.clone());
            if kind == "DELETED" {
                break;
            }
        }
        assert_eq!(
            &seen[..3],
            &["ADDED", "MODIFIED", "MODIFIED"],
            "{plural}: {seen:?}"
        );
        assert!(
            seen[3..].iter().all(|k| k == "MODIFIED" || k == "DELETED"),
            "{plural}: {seen:?}"
        );

        // deletecollection with a label selector spares the rest.
        for name in ["smoke-2", "smoke-3", "smoke-keep"] {
            let mut obj = minimal(plural, name);
            if name != "smoke-keep" {
                obj["metadata"]["labels"] = json!({"group": "smoke"});
            }
            expect(post(&client, &coll, &obj).await, 201, &what("create"));
        }
        let removed = expect(
            delete(
                &client,
                &format!("{coll}?labelSelector={}", enc("group=smoke")),
            )
            .await,
            200,
            &what("deletecollection"),
        );
        assert_eq!(
            names(&removed),
            strs(&["smoke-2", "smoke-3"]),
            "{plural}: {removed}"
        );
        poll(
            &client,
            &format!("{coll}?labelSelector={}", enc("group=smoke")),
            &what("deletecollection to finish"),
            |s, l| s == 200 && l["items"].as_array().is_some_and(Vec::is_empty),
        )
        .await;
        expect(
            get(&client, &item("smoke-keep")).await,
            200,
            &what("get the unselected object"),
        );
    }
}
