//! Tenant isolation, end to end, from an attacker's side.
//!
//! Two tenants (`tenant-a`, whose member is alice, and `tenant-b`, whose member is bob) each
//! get a namespace full of objects and a node. Then tables of requests attack tenant B:
//! alice with her own credentials, node-a's agent (`system:node:node-a`), tenant A's proxy
//! (`system:canopy-proxy:tenant-a`) and a few impostors. Every row says what must happen:
//!
//! - `Denied`: 403 or 404, and the answer names none of B's objects, uids or secret data
//!   (beyond what the request itself named);
//! - `Forbidden`: exactly 403 (where the caller may see the object, or the model says 403);
//! - `Refused(codes)`: one of `codes` (e.g. 403 or 422 for a protected label), nothing leaked;
//! - `Own`: 200, a list (with a valid resourceVersion) or a watch stream holding only the
//!   caller's objects and nothing of B's;
//! - `OwnOrDenied`: either of the above (where the model leaves the choice open);
//! - `Clean`: 200 and nothing of B's (Table output);
//! - `Allowed`: 2xx (positive controls, so that the test cannot pass by refusing everything).
//!
//! Afterwards the admin checks that none of B's objects changed (same uid and
//! resourceVersion) and that nothing an attacker tried to create exists. Positive controls
//! (alice sees her own pods, nodes, namespace and tenant; live watches deliver her new
//! objects and not B's) run before the tables.

mod common;

use common::enc;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use base64::Engine;
use common::{Backend, Cluster, client_for};
use futures::StreamExt;
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use kube::{Api, Client, ResourceExt, api::ListParams};
use serde_json::{Value, json};

const TENANT_LABEL: &str = "canopy.io/tenant";

const JSON: &str = "application/json";
const MERGE: &str = "application/merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";
const STRATEGIC: &str = "application/strategic-merge-patch+json";
const APPLY: &str = "application/apply-patch+yaml";
const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";
const METADATA: &str = "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io";

/// A watch that ends by itself after two seconds.
const W: &str = "watch=1&timeoutSeconds=2";

const NAMESPACES: &str = "/api/v1/namespaces";
const NODES: &str = "/api/v1/nodes";
const TENANTS: &str = "/apis/canopy.io/v1/tenants";
const NODE_LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases";

/// Secret and config values: they must never reach anyone but their tenant.
const A_SECRET: &str = "xk9c1e-a-password";
const A_CONFIG: &str = "xk9c1e-a-config";
const B_SECRET: &str = "zq7f3a-b-password";
const B_CONFIG: &str = "zq7f3a-b-config";
const B_DISPLAY: &str = "zq7f3a-b-display";

/// Every namespaced resource: (API prefix, plural, short name used in object names). Alice's
/// objects are `alice-<short>` in `a-ns`, bob's `bob-<short>` in `b-ns`.
const NAMESPACED: &[(&str, &str, &str)] = &[
    ("/api/v1", "pods", "pod"),
    ("/api/v1", "services", "svc"),
    ("/api/v1", "endpoints", "endpoints"),
    ("/api/v1", "configmaps", "cm"),
    ("/api/v1", "secrets", "secret"),
    ("/api/v1", "serviceaccounts", "sa"),
    ("/api/v1", "events", "event"),
    ("/apis/apps/v1", "deployments", "deploy"),
    ("/apis/apps/v1", "replicasets", "rs"),
    ("/apis/coordination.k8s.io/v1", "leases", "lease"),
    ("/apis/discovery.k8s.io/v1", "endpointslices", "slice"),
];

// ---------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// 403 or 404, nothing of the victim's in the answer.
    Denied,
    /// Exactly 403, nothing of the victim's in the answer.
    Forbidden,
    /// One of these codes, nothing of the victim's in the answer.
    Refused(&'static [u16]),
    /// 200: a list or watch of the caller's own objects only.
    Own,
    /// `Own`, or 403/404.
    OwnOrDenied,
    /// 200 and nothing of the victim's in the answer.
    Clean,
    /// 2xx.
    Allowed,
}

use Expect::{Allowed, Clean, Denied, Forbidden, Own, OwnOrDenied, Refused};

#[derive(Clone, Debug)]
struct Row {
    what: String,
    method: &'static str,
    path: String,
    body: Option<(&'static str, Value)>,
    headers: Vec<(String, String)>,
    expect: Expect,
    /// A name the answer must hold (a list's item, a watch's ADDED event, or a substring).
    must: Option<String>,
    /// Strings the answer may echo though the request does not spell them out.
    echo: Vec<String>,
    /// The watch must send a bookmark.
    bookmark: bool,
    /// Run after every other row of the table (rows whose wrongful success would break
    /// other rows).
    last: bool,
}

fn row(what: impl Into<String>, method: &'static str, path: &str, expect: Expect) -> Row {
    Row {
        what: what.into(),
        method,
        path: path.to_string(),
        body: None,
        headers: Vec::new(),
        expect,
        must: None,
        echo: Vec::new(),
        bookmark: false,
        last: false,
    }
}

impl Row {
    fn body(mut self, content_type: &'static str, body: Value) -> Self {
        self.body = Some((content_type, body));
        self
    }

    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    fn must(mut self, name: &str) -> Self {
        self.must = Some(name.to_string());
        self
    }

    fn echo(mut self, text: &str) -> Self {
        self.echo.push(text.to_string());
        self
    }

    fn bookmark(mut self) -> Self {
        self.bookmark = true;
        self
    }

    fn last(mut self) -> Self {
        self.last = true;
        self
    }

    /// Whether the row runs alone, in order, after the concurrent ones: writes that must
    /// succeed, and rows marked `last`.
    fn serial(&self) -> bool {
        self.last || (self.expect == Allowed && self.method != "GET")
    }
}

/// Whether an object belongs to the caller of a table; `path` is the request's path.
type Owner = fn(&str, &Value) -> bool;

fn tenant_a_owns(path: &str, obj: &Value) -> bool {
    if path.contains("/tenants") {
        name_of(obj) == "tenant-a"
    } else {
        label_of(obj) == Some("tenant-a")
    }
}

fn node_a_owns(path: &str, obj: &Value) -> bool {
    if path.contains("/nodes") {
        name_of(obj) == "node-a"
    } else if path.contains("/pods") {
        obj["spec"]["nodeName"] == "node-a"
    } else if path.contains("/leases") {
        name_of(obj) == "node-a" && ns_of(obj) == "kube-node-lease"
    } else {
        false
    }
}

fn owns_nothing(_path: &str, _obj: &Value) -> bool {
    false
}

// ---------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------

fn name_of(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or("")
}

fn ns_of(obj: &Value) -> &str {
    obj["metadata"]["namespace"].as_str().unwrap_or("")
}

fn uid_of(obj: &Value) -> &str {
    obj["metadata"]["uid"].as_str().unwrap_or("")
}

fn rv_of(obj: &Value) -> &str {
    obj["metadata"]["resourceVersion"].as_str().unwrap_or("")
}

fn label_of(obj: &Value) -> Option<&str> {
    obj["metadata"]["labels"][TENANT_LABEL].as_str()
}

fn items(list: &Value) -> &[Value] {
    list["items"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn describe(obj: &Value) -> String {
    format!(
        "{}/{} (labels {})",
        ns_of(obj),
        name_of(obj),
        obj["metadata"]["labels"]
    )
}

/// A valid object of a resource. Its data depends on whose it is (by name prefix), so that
/// an attacker's request never carries the victim's secret values.
fn object(plural: &str, name: &str, ns: &str) -> Value {
    let (secret, config, pod) = if name.starts_with("bob-") {
        (B_SECRET, B_CONFIG, "bob-pod")
    } else if name.starts_with("alice-") {
        (A_SECRET, A_CONFIG, "alice-pod")
    } else {
        ("intruder-password", "intruder-config", "intruder-pod")
    };
    let meta = json!({"name": name, "namespace": ns, "labels": {"app": name}});
    match plural {
        "pods" => json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        }),
        "services" => json!({
            "apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"selector": {"app": name}, "ports": [{"port": 80}]},
        }),
        "endpoints" => json!({
            "apiVersion": "v1", "kind": "Endpoints", "metadata": meta,
            "subsets": [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}],
        }),
        "configmaps" => json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": config},
        }),
        "secrets" => json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": meta,
            "stringData": {"password": secret},
        }),
        "serviceaccounts" => {
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta})
        }
        "events" => json!({
            "apiVersion": "v1", "kind": "Event", "metadata": meta,
            "involvedObject": {"kind": "Pod", "name": pod, "namespace": ns},
            "reason": "Test", "message": "m", "type": "Normal",
        }),
        "deployments" | "replicasets" => json!({
            "apiVersion": "apps/v1",
            "kind": if plural == "deployments" { "Deployment" } else { "ReplicaSet" },
            "metadata": meta,
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "c", "image": "nginx"}]},
                },
            },
        }),
        "leases" => json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 10},
        }),
        "endpointslices" => json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}],
            "ports": [{"port": 80}],
        }),
        other => panic!("no object for {other}"),
    }
}

/// An attacker's version of someone's object: their name, the attacker's content, and a
/// label claiming it for tenant A.
fn forged(plural: &str, name: &str, ns: &str) -> Value {
    let mut obj = object(plural, "intruder-forged", ns);
    obj["metadata"]["name"] = json!(name);
    obj["metadata"]["labels"] = json!({"canopy.io/tenant": "tenant-a", "pwned": "yes"});
    obj
}

fn pod_on(name: &str, ns: &str, node: &str) -> Value {
    let mut pod = object("pods", name, ns);
    pod["spec"]["nodeName"] = json!(node);
    pod
}

fn namespace(name: &str, tenant: Option<&str>) -> Value {
    let mut ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    if let Some(tenant) = tenant {
        ns["metadata"]["labels"] = json!({"canopy.io/tenant": tenant});
    }
    ns
}

fn node(name: &str, tenant: Option<&str>) -> Value {
    let mut node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
    if let Some(tenant) = tenant {
        node["metadata"]["labels"] = json!({"canopy.io/tenant": tenant});
    }
    node
}

fn lease(name: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40},
    })
}

fn tenant(name: &str, display: &str) -> Value {
    json!({
        "apiVersion": "canopy.io/v1", "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {
            "projectId": name,
            "displayName": display,
            "quota": {"cpu": "8", "memory": "16Gi", "pods": 20, "vms": 2},
            "network": {"cidr": "10.0.0.0/16"},
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

fn scale(name: &str, ns: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "autoscaling/v1", "kind": "Scale",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": replicas},
    })
}

fn pwn() -> Value {
    json!({"metadata": {"labels": {"canopy.io/tenant": "tenant-a", "pwned": "yes"}}})
}

fn pwn_json_patch() -> Value {
    // Replaces the whole label map: also drops the tenant label.
    json!([{"op": "add", "path": "/metadata/labels", "value": {"pwned": "yes"}}])
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

struct Reply {
    status: u16,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

/// Sends a request and reads the whole answer (a watch's until it ends).
async fn send(
    client: &Client,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> Reply {
    let mut builder = http::Request::builder().method(method).uri(path);
    for (name, value) in headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let request = builder
        .body(body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let exchange = async {
        let response = client
            .send(request.map(kube::client::Body::from))
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>(Reply {
            status,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        })
    };
    match tokio::time::timeout(Duration::from_secs(30), exchange).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => Reply {
            status: 0,
            text: format!("the request failed: {e}"),
        },
        Err(_) => Reply {
            status: 0,
            text: "no complete answer within 30s".into(),
        },
    }
}

async fn call(
    client: &Client,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&Value>,
) -> Reply {
    let mut headers = Vec::new();
    let mut bytes = Vec::new();
    if let Some(body) = body {
        headers.push(("content-type".to_string(), content_type.to_string()));
        bytes = serde_json::to_vec(body).expect("body");
    }
    send(client, method, path, &headers, bytes).await
}

async fn get(client: &Client, path: &str) -> Reply {
    call(client, "GET", path, JSON, None).await
}

/// Creates an object during the setup, which must succeed.
async fn create(client: &Client, who: &str, path: &str, body: &Value) -> Value {
    let reply = call(client, "POST", path, JSON, Some(body)).await;
    assert_eq!(
        reply.status,
        201,
        "setup: {who} creates {} in {path}: {}",
        name_of(body),
        reply.text
    );
    reply.json()
}

/// The current revision, from a list of namespaces.
async fn list_rv(admin: &Client) -> u64 {
    let list = get(admin, NAMESPACES).await.json();
    rv_of(&list)
        .parse()
        .unwrap_or_else(|_| panic!("no list resourceVersion: {list}"))
}

/// Appends query parameters to a path.
fn q(path: &str, query: &str) -> String {
    if path.contains('?') {
        format!("{path}&{query}")
    } else {
        format!("{path}?{query}")
    }
}

fn fs(selector: &str) -> String {
    format!("fieldSelector={}", enc(selector))
}

fn ls(selector: &str) -> String {
    format!("labelSelector={}", enc(selector))
}

fn trunc(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..end], s.len())
}

fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// A watch read event by event (for the live controls).
struct Stream {
    body: kube::client::Body,
    buf: Vec<u8>,
    ended: bool,
}

impl Stream {
    async fn open(client: &Client, path: &str) -> Result<Stream, String> {
        let request = http::Request::builder()
            .method("GET")
            .uri(path)
            .body(Vec::new())
            .expect("request");
        let response = client
            .send(request.map(kube::client::Body::from))
            .await
            .map_err(|e| format!("watch {path}: {e}"))?;
        let status = response.status().as_u16();
        let body = response.into_body();
        if status != 200 {
            let bytes = tokio::time::timeout(Duration::from_secs(5), body.collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(format!(
                "watch {path}: status {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        Ok(Stream {
            body,
            buf: Vec::new(),
            ended: false,
        })
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
                return Some(serde_json::from_slice(&line).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&line).into_owned())
                }));
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return None,
                Ok(None) | Ok(Some(Err(_))) => {
                    self.ended = true;
                    self.buf.push(b'\n');
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Reads a live watch: the first event other than bookmarks must be the ADDED event of
/// `expected` (objects of others created before it must not show), and nothing that is not
/// the caller's may follow in the next second.
async fn first_event(
    stream: &mut Stream,
    path: &str,
    owner: Owner,
    expected: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(event) = stream.next(left).await else {
            return Err(format!(
                "watch {path}: no ADDED event for {expected} within 10s"
            ));
        };
        match event["type"].as_str() {
            Some("BOOKMARK") => continue,
            Some("ADDED") if name_of(&event["object"]) == expected => break,
            _ => {
                return Err(format!(
                    "watch {path}: before the ADDED event of {expected} came {}",
                    trunc(&event.to_string(), 1500)
                ));
            }
        }
    }
    while let Some(event) = stream.next(Duration::from_secs(1)).await {
        if event["type"] != "BOOKMARK" && !owner(path, &event["object"]) {
            return Err(format!(
                "watch {path}: after {expected} came someone else's {}",
                trunc(&event.to_string(), 1500)
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Judging a row
// ---------------------------------------------------------------------------------------

fn is_watch(path: &str) -> bool {
    path.split_once('?').is_some_and(|(_, query)| {
        query
            .split('&')
            .any(|p| p == "watch=1" || p == "watch=true")
    })
}

/// Whether a list answer holds only the caller's objects.
fn list_problem(row: &Row, owner: Owner, text: &str) -> Option<String> {
    let list: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Some(format!("the answer is not JSON: {e}")),
    };
    if !list["kind"].as_str().is_some_and(|k| k.ends_with("List")) {
        return Some("the answer is not a list".into());
    }
    if !rv_of(&list).parse::<u64>().is_ok_and(|rv| rv > 0) {
        return Some(format!(
            "the list's resourceVersion is not valid: {}",
            list["metadata"]["resourceVersion"]
        ));
    }
    let Some(items) = list["items"].as_array() else {
        return Some("the list has no items".into());
    };
    let strangers: Vec<String> = items
        .iter()
        .filter(|item| !owner(&row.path, item))
        .map(describe)
        .collect();
    if !strangers.is_empty() {
        return Some(format!(
            "the list holds objects that are not the caller's: {strangers:?}"
        ));
    }
    if let Some(must) = &row.must
        && !items.iter().any(|item| name_of(item) == must)
    {
        return Some(format!("the list lacks the caller's own {must:?}"));
    }
    None
}

/// Whether a watch stream holds only the caller's objects.
fn watch_problem(row: &Row, owner: Owner, text: &str) -> Option<String> {
    let mut added = Vec::new();
    let mut bookmark = false;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return Some(format!("not a watch event ({e}): {}", trunc(line, 500))),
        };
        let object = &event["object"];
        match event["type"].as_str().unwrap_or("") {
            kind @ ("ADDED" | "MODIFIED" | "DELETED") => {
                if !owner(&row.path, object) {
                    return Some(format!(
                        "the watch delivered a {kind} event of an object that is not the caller's: {}",
                        describe(object)
                    ));
                }
                if kind == "ADDED" {
                    added.push(name_of(object).to_string());
                }
            }
            "BOOKMARK" => bookmark = true,
            // A replay from a revision the server no longer has.
            "ERROR" if object["code"] == 410 => {}
            other => {
                return Some(format!(
                    "unexpected watch event {other:?}: {}",
                    trunc(line, 500)
                ));
            }
        }
    }
    if row.bookmark && !bookmark {
        return Some("the watch sent no bookmark".into());
    }
    if let Some(must) = &row.must
        && !added.contains(must)
    {
        return Some(format!(
            "the watch sent no ADDED event for the caller's own {must:?}"
        ));
    }
    None
}

fn own_problem(row: &Row, owner: Owner, text: &str) -> Option<String> {
    if is_watch(&row.path) {
        watch_problem(row, owner, text)
    } else {
        list_problem(row, owner, text)
    }
}

/// What is wrong with an answer, if anything. `asked` is everything the request itself
/// said (the answer may echo it).
fn judge(row: &Row, owner: Owner, victim: &[String], reply: &Reply, asked: &str) -> Option<String> {
    let status = reply.status;
    let leak = |echo_allowed: bool| -> Option<String> {
        let found: Vec<&str> = victim
            .iter()
            .map(String::as_str)
            .filter(|v| reply.text.contains(*v) && !(echo_allowed && asked.contains(*v)))
            .collect();
        (!found.is_empty()).then(|| format!("the answer reveals {found:?}"))
    };
    let must = || match &row.must {
        Some(m) if !reply.text.contains(m.as_str()) => Some(format!("the answer lacks {m:?}")),
        _ => None,
    };
    match row.expect {
        Denied if matches!(status, 403 | 404) => leak(true),
        Forbidden if status == 403 => leak(true),
        Refused(codes) if codes.contains(&status) => leak(true),
        Allowed if (200..300).contains(&status) => leak(true).or_else(must),
        Clean if status == 200 => leak(false).or_else(must),
        Own | OwnOrDenied if status == 200 => {
            leak(false).or_else(|| own_problem(row, owner, &reply.text))
        }
        OwnOrDenied if matches!(status, 403 | 404) => leak(true),
        _ => Some("unexpected status".into()),
    }
}

async fn check(
    table: &str,
    identity: &str,
    client: &Client,
    row: &Row,
    owner: Owner,
    victim: &[String],
) -> Option<String> {
    let mut headers = row.headers.clone();
    let mut body = Vec::new();
    let mut asked = format!("{identity} {} {:?}", row.path, row.headers);
    if let Some((content_type, value)) = &row.body {
        headers.push(("content-type".to_string(), content_type.to_string()));
        body = serde_json::to_vec(value).expect("body");
        asked.push(' ');
        asked.push_str(&value.to_string());
    }
    for echo in &row.echo {
        asked.push(' ');
        asked.push_str(echo);
    }
    let reply = send(client, row.method, &row.path, &headers, body).await;
    judge(row, owner, victim, &reply, &asked).map(|problem| {
        let headers = if row.headers.is_empty() {
            String::new()
        } else {
            format!(" {:?}", row.headers)
        };
        let body = row
            .body
            .as_ref()
            .map(|(ct, v)| format!("\n    request body ({ct}): {}", trunc(&v.to_string(), 300)))
            .unwrap_or_default();
        format!(
            "[{table}] {}\n    request: {} {}{headers}{body}\n    expected {:?}, got {}: {problem}\n    answer: {}",
            row.what,
            row.method,
            row.path,
            row.expect,
            reply.status,
            trunc(&reply.text, 1500)
        )
    })
}

/// Runs a table: rows concurrently (watches take two seconds each), then the serial ones
/// in order. Returns the failures.
async fn run_table(
    table: &str,
    identity: &str,
    client: &Client,
    rows: &[Row],
    owner: Owner,
    victim: &[String],
) -> Vec<String> {
    let (serial, parallel): (Vec<&Row>, Vec<&Row>) = rows.iter().partition(|r| r.serial());
    let mut failures: Vec<String> = futures::stream::iter(parallel)
        .map(|r| check(table, identity, client, r, owner, victim))
        .buffered(12)
        .filter_map(futures::future::ready)
        .collect()
        .await;
    for r in serial {
        if let Some(failure) = check(table, identity, client, r, owner, victim).await {
            failures.push(failure);
        }
    }
    eprintln!(
        "isolation: table {table}: {} rows, {} failures",
        rows.len(),
        failures.len()
    );
    failures
}

// ---------------------------------------------------------------------------------------
// The tables
// ---------------------------------------------------------------------------------------

/// alice (tenant A) against bob (tenant B), plus alice's own positive controls.
fn alice_rows(early_rv: u64, setup_rv: u64) -> Vec<Row> {
    let mut rows = Vec::new();
    for &(prefix, plural, short) in NAMESPACED {
        let a = format!("alice-{short}");
        let b = format!("bob-{short}");
        let acoll = format!("{prefix}/namespaces/a-ns/{plural}");
        let bcoll = format!("{prefix}/namespaces/b-ns/{plural}");
        let aitem = format!("{acoll}/{a}");
        let bitem = format!("{bcoll}/{b}");
        let every = format!("{prefix}/{plural}");
        let r = |what: &str| format!("{plural}: {what}");

        // Her own.
        rows.push(row(r("get her own"), "GET", &aitem, Allowed).must(&a));
        rows.push(row(r("list her namespace"), "GET", &acoll, Own).must(&a));
        rows.push(row(r("watch her namespace"), "GET", &q(&acoll, W), Own).must(&a));

        // Reading bob's.
        rows.push(row(r("get bob's"), "GET", &bitem, Denied));
        rows.push(row(
            r("get bob's from the cache"),
            "GET",
            &q(&bitem, "resourceVersion=0"),
            Denied,
        ));
        rows.push(row(r("list bob's namespace"), "GET", &bcoll, Denied));
        rows.push(row(
            r("list bob's namespace from the cache"),
            "GET",
            &q(&bcoll, "resourceVersion=0"),
            Denied,
        ));
        rows.push(
            row(r("list bob's namespace as metadata"), "GET", &bcoll, Denied)
                .header("accept", METADATA),
        );
        rows.push(row(
            r("watch bob's namespace"),
            "GET",
            &q(&bcoll, W),
            Denied,
        ));

        // Listing everything.
        rows.push(row(r("list all"), "GET", &every, Own).must(&a));
        rows.push(
            row(
                r("list all from the cache"),
                "GET",
                &q(&every, "resourceVersion=0"),
                Own,
            )
            .must(&a),
        );
        rows.push(
            row(
                r("list all at the setup's exact revision"),
                "GET",
                &q(
                    &every,
                    &format!("resourceVersion={setup_rv}&resourceVersionMatch=Exact"),
                ),
                Own,
            )
            .must(&a),
        );
        rows.push(row(
            r("list all, a page of one"),
            "GET",
            &q(&every, "limit=1"),
            Own,
        ));
        rows.push(
            row(r("list all as metadata"), "GET", &every, Own)
                .header("accept", METADATA)
                .must(&a),
        );
        rows.push(
            row(r("list all as a table"), "GET", &every, Clean)
                .header("accept", TABLE)
                .must(&a),
        );
        rows.push(row(
            r("list all selecting bob's namespace"),
            "GET",
            &q(&every, &fs("metadata.namespace=b-ns")),
            Own,
        ));
        rows.push(row(
            r("list all selecting bob's name"),
            "GET",
            &q(&every, &fs(&format!("metadata.name={b}"))),
            Own,
        ));
        rows.push(row(
            r("list all selecting tenant B's label"),
            "GET",
            &q(&every, &ls("canopy.io/tenant=tenant-b")),
            Own,
        ));
        rows.push(
            row(
                r("list all selecting either tenant's label"),
                "GET",
                &q(&every, &ls("canopy.io/tenant in (tenant-a,tenant-b)")),
                Own,
            )
            .must(&a),
        );
        rows.push(row(
            r("list all selecting objects without a tenant label"),
            "GET",
            &q(&every, &ls("!canopy.io/tenant")),
            Own,
        ));

        // Watching everything.
        rows.push(row(r("watch all"), "GET", &q(&every, W), Own).must(&a));
        rows.push(
            row(
                r("watch all from the cache"),
                "GET",
                &q(&every, &format!("{W}&resourceVersion=0")),
                Own,
            )
            .must(&a),
        );
        rows.push(row(
            r("watch all replaying the history since before the namespaces"),
            "GET",
            &q(&every, &format!("{W}&resourceVersion={early_rv}")),
            Own,
        ));
        rows.push(row(
            r("watch all selecting bob's namespace"),
            "GET",
            &q(&every, &format!("{W}&{}", fs("metadata.namespace=b-ns"))),
            Own,
        ));
        rows.push(row(
            r("watch all selecting tenant B's label"),
            "GET",
            &q(&every, &format!("{W}&{}", ls("canopy.io/tenant=tenant-b"))),
            Own,
        ));

        // Writing bob's.
        rows.push(
            row(r("replace bob's (PUT)"), "PUT", &bitem, Denied)
                .body(JSON, forged(plural, &b, "b-ns")),
        );
        rows.push(row(r("merge-patch bob's"), "PATCH", &bitem, Denied).body(MERGE, pwn()));
        rows.push(
            row(r("JSON-patch bob's"), "PATCH", &bitem, Denied).body(JSON_PATCH, pwn_json_patch()),
        );
        rows.push(
            row(r("strategic-merge-patch bob's"), "PATCH", &bitem, Denied).body(STRATEGIC, pwn()),
        );
        rows.push(
            row(
                r("server-side apply to bob's"),
                "PATCH",
                &q(&bitem, "fieldManager=attacker&force=true"),
                Denied,
            )
            .body(APPLY, forged(plural, &b, "b-ns")),
        );
        rows.push(
            row(r("create in bob's namespace"), "POST", &bcoll, Denied)
                .body(JSON, object(plural, &format!("intruder-{short}"), "b-ns")),
        );
        rows.push(
            row(
                r("create in bob's namespace (dry run)"),
                "POST",
                &q(&bcoll, "dryRun=All"),
                Denied,
            )
            .body(
                JSON,
                object(plural, &format!("intruder-dry-{short}"), "b-ns"),
            ),
        );
        rows.push(
            row(
                r("create in her namespace an object that names bob's namespace"),
                "POST",
                &acoll,
                Refused(&[400, 403, 404, 422]),
            )
            .body(JSON, object(plural, &format!("intruder-x-{short}"), "b-ns")),
        );
        rows.push(row(
            r("delete bob's (dry run)"),
            "DELETE",
            &q(&bitem, "dryRun=All"),
            Denied,
        ));
        rows.push(row(r("delete bob's"), "DELETE", &bitem, Denied).last());
        rows.push(
            row(
                r("delete the collection in bob's namespace"),
                "DELETE",
                &bcoll,
                Denied,
            )
            .last(),
        );
    }

    // Subresources of bob's objects, and her own.
    let bpods = "/api/v1/namespaces/b-ns/pods";
    let apods = "/api/v1/namespaces/a-ns/pods";
    rows.extend([
        row(
            "pods/status: get bob's",
            "GET",
            &format!("{bpods}/bob-pod/status"),
            Denied,
        ),
        row(
            "pods/status: merge-patch bob's",
            "PATCH",
            &format!("{bpods}/bob-pod/status"),
            Denied,
        )
        .body(MERGE, json!({"status": {"message": "pwned"}})),
        row(
            "pods/status: replace bob's",
            "PUT",
            &format!("{bpods}/bob-pod/status"),
            Denied,
        )
        .body(JSON, forged("pods", "bob-pod", "b-ns")),
        row(
            "pods/binding: bind bob's pod",
            "POST",
            &format!("{bpods}/bob-pod/binding"),
            Denied,
        )
        .body(JSON, binding("bob-pod", "node-a")),
        row(
            "pods/log: bob's pod",
            "GET",
            &format!("{bpods}/bob-pod/log"),
            Denied,
        ),
        row(
            "pods/log: bob's pod's container",
            "GET",
            &format!("{bpods}/bob-pod/log?container=c"),
            Denied,
        ),
        row(
            "pods/status: get her own",
            "GET",
            &format!("{apods}/alice-pod/status"),
            Allowed,
        )
        .must("alice-pod"),
        row(
            "pods/binding: bind her own pod (binding is the scheduler's)",
            "POST",
            &format!("{apods}/alice-unsched/binding"),
            Forbidden,
        )
        .body(JSON, binding("alice-unsched", "node-a")),
        row(
            "pods: move her own pod to node-b",
            "PATCH",
            &format!("{apods}/alice-unsched"),
            Refused(&[403, 422]),
        )
        .body(MERGE, json!({"spec": {"nodeName": "node-b"}})),
        row(
            "pods: create hers on node-b (tenant B's)",
            "POST",
            apods,
            Forbidden,
        )
        .body(JSON, pod_on("intruder-on-node-b", "a-ns", "node-b")),
        row(
            "pods: create hers on node-free (no tenant's)",
            "POST",
            apods,
            Forbidden,
        )
        .body(JSON, pod_on("intruder-on-node-free", "a-ns", "node-free")),
        row(
            "pods: create hers on a node that does not exist",
            "POST",
            apods,
            Forbidden,
        )
        .body(
            JSON,
            pod_on("intruder-on-node-missing", "a-ns", "node-missing"),
        ),
        row(
            "services/status: get bob's",
            "GET",
            "/api/v1/namespaces/b-ns/services/bob-svc/status",
            Denied,
        ),
        row(
            "services/status: merge-patch bob's",
            "PATCH",
            "/api/v1/namespaces/b-ns/services/bob-svc/status",
            Denied,
        )
        .body(
            MERGE,
            json!({"status": {"loadBalancer": {"ingress": [{"ip": "6.6.6.6"}]}}}),
        ),
    ]);
    for (plural, short) in [("deployments", "deploy"), ("replicasets", "rs")] {
        let bitem = format!("/apis/apps/v1/namespaces/b-ns/{plural}/bob-{short}");
        let aitem = format!("/apis/apps/v1/namespaces/a-ns/{plural}/alice-{short}");
        rows.extend([
            row(
                format!("{plural}/scale: get bob's"),
                "GET",
                &format!("{bitem}/scale"),
                Denied,
            ),
            row(
                format!("{plural}/scale: replace bob's"),
                "PUT",
                &format!("{bitem}/scale"),
                Denied,
            )
            .body(JSON, scale(&format!("bob-{short}"), "b-ns", 5)),
            row(
                format!("{plural}/scale: merge-patch bob's"),
                "PATCH",
                &format!("{bitem}/scale"),
                Denied,
            )
            .body(MERGE, json!({"spec": {"replicas": 5}})),
            row(
                format!("{plural}/status: get bob's"),
                "GET",
                &format!("{bitem}/status"),
                Denied,
            ),
            row(
                format!("{plural}/status: merge-patch bob's"),
                "PATCH",
                &format!("{bitem}/status"),
                Denied,
            )
            .body(MERGE, json!({"status": {"replicas": 9}})),
            row(
                format!("{plural}/scale: get her own"),
                "GET",
                &format!("{aitem}/scale"),
                Allowed,
            )
            .must(&format!("alice-{short}")),
            row(
                format!("{plural}/scale: scale her own"),
                "PATCH",
                &format!("{aitem}/scale"),
                Allowed,
            )
            .body(MERGE, json!({"spec": {"replicas": 2}})),
        ]);
    }

    // Namespaces.
    let bns = format!("{NAMESPACES}/b-ns");
    let ans = format!("{NAMESPACES}/a-ns");
    let refused = Refused(&[403, 422]);
    rows.extend([
        row("namespaces: get her own", "GET", &ans, Allowed).must("a-ns"),
        row("namespaces: get bob's", "GET", &bns, Denied),
        row("namespaces: get bob's status", "GET", &format!("{bns}/status"), Denied),
        row("namespaces: get bob's, percent-encoded", "GET", &format!("{NAMESPACES}/%62-ns"), Denied)
            .echo("b-ns"),
        row("namespaces: list", "GET", NAMESPACES, Own).must("a-ns"),
        row("namespaces: list from the cache", "GET", &q(NAMESPACES, "resourceVersion=0"), Own)
            .must("a-ns"),
        row(
            "namespaces: list selecting bob's by name",
            "GET",
            &q(NAMESPACES, &fs("metadata.name=b-ns")),
            Own,
        ),
        row(
            "namespaces: list selecting tenant B's label",
            "GET",
            &q(NAMESPACES, &ls("canopy.io/tenant=tenant-b")),
            Own,
        ),
        row(
            "namespaces: list selecting namespaces without a tenant",
            "GET",
            &q(NAMESPACES, &ls("!canopy.io/tenant")),
            Own,
        ),
        row("namespaces: list as a table", "GET", NAMESPACES, Clean)
            .header("accept", TABLE)
            .must("a-ns"),
        row("namespaces: watch", "GET", &q(NAMESPACES, W), Own).must("a-ns"),
        row(
            "namespaces: watch selecting bob's by name",
            "GET",
            &q(NAMESPACES, &format!("{W}&{}", fs("metadata.name=b-ns"))),
            Own,
        ),
        row(
            "namespaces: watch with initial events and bookmarks",
            "GET",
            &q(
                NAMESPACES,
                "watch=1&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=3",
            ),
            Own,
        )
        .must("a-ns")
        .bookmark(),
        row("namespaces: claim bob's for tenant A", "PATCH", &bns, Denied)
            .body(MERGE, json!({"metadata": {"labels": {"canopy.io/tenant": "tenant-a"}}})),
        row("namespaces: label bob's", "PATCH", &bns, Denied)
            .body(MERGE, json!({"metadata": {"labels": {"pwned": "yes"}}})),
        row("namespaces: replace bob's", "PUT", &bns, Denied)
            .body(JSON, namespace("b-ns", Some("tenant-a"))),
        row("namespaces: finalize bob's", "PUT", &format!("{bns}/finalize"), Denied).body(
            JSON,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "b-ns"}, "spec": {"finalizers": []}}),
        ),
        row("namespaces: patch bob's status", "PATCH", &format!("{bns}/status"), Denied)
            .body(MERGE, json!({"status": {"phase": "Terminating"}})),
        row("namespaces: delete bob's", "DELETE", &bns, Denied).last(),
        row("namespaces: relabel her own for tenant B (merge)", "PATCH", &ans, refused)
            .body(MERGE, json!({"metadata": {"labels": {"canopy.io/tenant": "tenant-b"}}})),
        // A write that drops the label keeps it (so that apply and replace of a manifest
        // without it work); the checks after the attacks see a-ns still labelled tenant-a.
        row("namespaces: remove her own's tenant label (merge)", "PATCH", &ans, Clean)
            .body(MERGE, json!({"metadata": {"labels": {"canopy.io/tenant": null}}})),
        row("namespaces: relabel her own for tenant B (JSON patch)", "PATCH", &ans, refused).body(
            JSON_PATCH,
            json!([{"op": "replace", "path": "/metadata/labels/canopy.io~1tenant", "value": "tenant-b"}]),
        ),
        row("namespaces: remove her own's labels (JSON patch)", "PATCH", &ans, Clean)
            .body(JSON_PATCH, json!([{"op": "remove", "path": "/metadata/labels"}])),
        row("namespaces: relabel her own for tenant B (strategic)", "PATCH", &ans, refused)
            .body(STRATEGIC, json!({"metadata": {"labels": {"canopy.io/tenant": "tenant-b"}}})),
        row(
            "namespaces: relabel her own for tenant B (apply)",
            "PATCH",
            &q(&ans, "fieldManager=attacker&force=true"),
            refused,
        )
        .body(APPLY, namespace("a-ns", Some("tenant-b"))),
        row("namespaces: relabel her own for tenant B (PUT)", "PUT", &ans, refused)
            .body(JSON, namespace("a-ns", Some("tenant-b"))),
        row("namespaces: create one labelled for tenant B", "POST", NAMESPACES, Forbidden)
            .body(JSON, namespace("intruder-ns", Some("tenant-b"))),
        row(
            "namespaces: create one with bob's namespace's name",
            "POST",
            NAMESPACES,
            Refused(&[403, 409]),
        )
        .body(JSON, namespace("b-ns", None)),
        row("namespaces: create one labelled for her own tenant", "POST", NAMESPACES, Allowed)
            .body(JSON, namespace("alice-ns2", Some("tenant-a")))
            .must("alice-ns2"),
    ]);

    // Nodes.
    rows.extend([
        row(
            "nodes: get tenant A's node",
            "GET",
            &format!("{NODES}/node-a"),
            Allowed,
        )
        .must("node-a"),
        row(
            "nodes: get tenant B's node",
            "GET",
            &format!("{NODES}/node-b"),
            Denied,
        ),
        row(
            "nodes: get tenant B's node's status",
            "GET",
            &format!("{NODES}/node-b/status"),
            Denied,
        ),
        row(
            "nodes: get a node of no tenant",
            "GET",
            &format!("{NODES}/node-free"),
            Denied,
        ),
        row("nodes: list", "GET", NODES, Own).must("node-a"),
        row(
            "nodes: list from the cache",
            "GET",
            &q(NODES, "resourceVersion=0"),
            Own,
        )
        .must("node-a"),
        row(
            "nodes: list selecting node-b by name",
            "GET",
            &q(NODES, &fs("metadata.name=node-b")),
            Own,
        ),
        row(
            "nodes: list selecting tenant B's label",
            "GET",
            &q(NODES, &ls("canopy.io/tenant=tenant-b")),
            Own,
        ),
        row(
            "nodes: list selecting nodes without a tenant",
            "GET",
            &q(NODES, &ls("!canopy.io/tenant")),
            Own,
        ),
        row("nodes: watch", "GET", &q(NODES, W), Own).must("node-a"),
        row(
            "nodes: watch selecting node-b by name",
            "GET",
            &q(NODES, &format!("{W}&{}", fs("metadata.name=node-b"))),
            Own,
        ),
        row(
            "nodes: claim node-b for tenant A",
            "PATCH",
            &format!("{NODES}/node-b"),
            Denied,
        )
        .body(
            MERGE,
            json!({"metadata": {"labels": {"canopy.io/tenant": "tenant-a"}}}),
        ),
        row(
            "nodes: replace node-b",
            "PUT",
            &format!("{NODES}/node-b"),
            Denied,
        )
        .body(JSON, node("node-b", Some("tenant-a"))),
        row(
            "nodes: patch tenant A's node (read only for tenants)",
            "PATCH",
            &format!("{NODES}/node-a"),
            Forbidden,
        )
        .body(MERGE, json!({"metadata": {"labels": {"pwned": "yes"}}})),
        row(
            "nodes: patch tenant A's node's status",
            "PATCH",
            &format!("{NODES}/node-a/status"),
            Forbidden,
        )
        .body(
            MERGE,
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        ),
        row("nodes: create one", "POST", NODES, Forbidden)
            .body(JSON, node("intruder-node", Some("tenant-a"))),
        row(
            "nodes: delete node-b",
            "DELETE",
            &format!("{NODES}/node-b"),
            Denied,
        )
        .last(),
        row("nodes: delete the collection", "DELETE", NODES, Forbidden).last(),
        row(
            "nodes: delete tenant A's node",
            "DELETE",
            &format!("{NODES}/node-a"),
            Forbidden,
        )
        .last(),
    ]);

    // Tenants.
    rows.extend([
        row(
            "tenants: get her own",
            "GET",
            &format!("{TENANTS}/tenant-a"),
            Allowed,
        )
        .must("tenant-a"),
        row(
            "tenants: get tenant B",
            "GET",
            &format!("{TENANTS}/tenant-b"),
            Denied,
        ),
        row(
            "tenants: get tenant B's status",
            "GET",
            &format!("{TENANTS}/tenant-b/status"),
            Denied,
        ),
        row("tenants: list", "GET", TENANTS, Own).must("tenant-a"),
        row(
            "tenants: list from the cache",
            "GET",
            &q(TENANTS, "resourceVersion=0"),
            Own,
        )
        .must("tenant-a"),
        row(
            "tenants: list selecting tenant B by name",
            "GET",
            &q(TENANTS, &fs("metadata.name=tenant-b")),
            Own,
        ),
        row("tenants: list as a table", "GET", TENANTS, Clean)
            .header("accept", TABLE)
            .must("tenant-a"),
        row("tenants: watch", "GET", &q(TENANTS, W), Own).must("tenant-a"),
        row(
            "tenants: watch selecting tenant B by name",
            "GET",
            &q(TENANTS, &format!("{W}&{}", fs("metadata.name=tenant-b"))),
            Own,
        ),
        row(
            "tenants: patch tenant B",
            "PATCH",
            &format!("{TENANTS}/tenant-b"),
            Denied,
        )
        .body(MERGE, json!({"spec": {"quota": {"pods": 0}}})),
        row(
            "tenants: raise her own quota (merge)",
            "PATCH",
            &format!("{TENANTS}/tenant-a"),
            Forbidden,
        )
        .body(MERGE, json!({"spec": {"quota": {"pods": 100000}}})),
        row(
            "tenants: raise her own quota (JSON patch)",
            "PATCH",
            &format!("{TENANTS}/tenant-a"),
            Forbidden,
        )
        .body(JSON_PATCH, json!([{"op": "remove", "path": "/spec/quota"}])),
        row(
            "tenants: raise her own quota (apply)",
            "PATCH",
            &format!("{TENANTS}/tenant-a?fieldManager=attacker&force=true"),
            Forbidden,
        )
        .body(APPLY, tenant("tenant-a", "pwned")),
        row(
            "tenants: replace her own",
            "PUT",
            &format!("{TENANTS}/tenant-a"),
            Forbidden,
        )
        .body(JSON, tenant("tenant-a", "pwned")),
        row(
            "tenants: patch her own status",
            "PATCH",
            &format!("{TENANTS}/tenant-a/status"),
            Forbidden,
        )
        .body(MERGE, json!({"status": {"usage": {"pods": 0}}})),
        row("tenants: create one", "POST", TENANTS, Forbidden)
            .body(JSON, tenant("intruder-tenant", "intruder")),
        row(
            "tenants: delete tenant B",
            "DELETE",
            &format!("{TENANTS}/tenant-b"),
            Denied,
        )
        .last(),
        row(
            "tenants: delete the collection",
            "DELETE",
            TENANTS,
            Forbidden,
        )
        .last(),
        row(
            "tenants: delete her own",
            "DELETE",
            &format!("{TENANTS}/tenant-a"),
            Forbidden,
        )
        .last(),
    ]);

    // Impersonation.
    let bpods_list = "/api/v1/namespaces/b-ns/pods";
    rows.extend([
        row("impersonate bob", "GET", bpods_list, Forbidden).header("Impersonate-User", "bob"),
        row("impersonate bob in tenant B", "GET", bpods_list, Forbidden)
            .header("Impersonate-User", "bob")
            .header("Impersonate-Group", "canopy:tenant:tenant-b"),
        row(
            "impersonate herself in tenant B",
            "GET",
            bpods_list,
            Forbidden,
        )
        .header("Impersonate-User", "alice")
        .header("Impersonate-Group", "canopy:tenant:tenant-b"),
        // Upstream answers a group without a user with 400.
        row(
            "impersonate tenant B's group alone",
            "GET",
            bpods_list,
            Refused(&[400, 403]),
        )
        .header("Impersonate-Group", "canopy:tenant:tenant-b"),
        row(
            "impersonate bob listing all pods",
            "GET",
            "/api/v1/pods",
            Forbidden,
        )
        .header("Impersonate-User", "bob"),
        row(
            "impersonate an admin",
            "GET",
            "/api/v1/namespaces/b-ns/secrets/bob-secret",
            Forbidden,
        )
        .header("Impersonate-User", "system:admin")
        .header("Impersonate-Group", "system:masters"),
        row(
            "impersonate node-b",
            "GET",
            "/api/v1/namespaces/b-ns/pods/bob-pod",
            Forbidden,
        )
        .header("Impersonate-User", "system:node:node-b")
        .header("Impersonate-Group", "system:nodes"),
        row(
            "impersonate tenant B's proxy",
            "GET",
            "/api/v1/namespaces/b-ns/services",
            Forbidden,
        )
        .header("Impersonate-User", "system:canopy-proxy:tenant-b")
        .header("Impersonate-Group", "canopy:proxies"),
        row(
            "impersonate herself",
            "GET",
            "/api/v1/namespaces/a-ns/pods",
            Forbidden,
        )
        .header("Impersonate-User", "alice"),
    ]);

    // Odd spellings and the rest.
    rows.extend([
        row(
            "pods: list bob's namespace, percent-encoded",
            "GET",
            "/api/v1/namespaces/%62-ns/pods",
            Denied,
        )
        .echo("b-ns"),
        row(
            "secrets: get bob's, namespace percent-encoded",
            "GET",
            "/api/v1/namespaces/%62-ns/secrets/bob-secret",
            Denied,
        )
        .echo("b-ns"),
        row(
            "secrets: get bob's, name percent-encoded",
            "GET",
            "/api/v1/namespaces/b-ns/secrets/bob%2Dsecret",
            Denied,
        )
        .echo("bob-secret"),
        row(
            "secrets: get bob's through a dot-dot path",
            "GET",
            "/api/v1/namespaces/a-ns/../b-ns/secrets/bob-secret",
            Refused(&[400, 403, 404]),
        ),
        row(
            "secrets: get bob's with a trailing slash",
            "GET",
            "/api/v1/namespaces/b-ns/secrets/bob-secret/",
            Denied,
        ),
        row(
            "pods: list all with two namespace field selectors",
            "GET",
            &format!(
                "/api/v1/pods?{}&{}",
                fs("metadata.namespace=a-ns"),
                fs("metadata.namespace=b-ns")
            ),
            Own,
        ),
        row(
            "pods: list all selecting node-b",
            "GET",
            &q("/api/v1/pods", &fs("spec.nodeName=node-b")),
            Own,
        ),
        row(
            "pods: watch all selecting node-b",
            "GET",
            &q("/api/v1/pods", &format!("{W}&{}", fs("spec.nodeName=node-b"))),
            Own,
        ),
        row(
            "pods: list all selecting bob's pod by name",
            "GET",
            &q("/api/v1/pods", &fs("metadata.name=bob-pod")),
            Own,
        ),
        row(
            "pods: watch all with bookmarks",
            "GET",
            "/api/v1/pods?watch=1&allowWatchBookmarks=true&timeoutSeconds=3",
            Own,
        )
        .must("alice-pod")
        .bookmark(),
        row(
            "pods: watch all with initial events and bookmarks",
            "GET",
            "/api/v1/pods?watch=1&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=3",
            Own,
        )
        .must("alice-pod")
        .bookmark(),
        row("metrics", "GET", "/metrics", Denied),
    ]);
    rows
}

/// node-a's agent against node-b, pods elsewhere and everything else.
fn node_rows() -> Vec<Row> {
    let apods = "/api/v1/namespaces/a-ns/pods";
    let bpods = "/api/v1/namespaces/b-ns/pods";
    let mut rows = vec![
        // Its node.
        row(
            "nodes: get its own",
            "GET",
            &format!("{NODES}/node-a"),
            Allowed,
        )
        .must("node-a"),
        row(
            "nodes: get its own status",
            "GET",
            &format!("{NODES}/node-a/status"),
            Allowed,
        )
        .must("node-a"),
        row("nodes: list", "GET", NODES, Own).must("node-a"),
        row(
            "nodes: list from the cache",
            "GET",
            &q(NODES, "resourceVersion=0"),
            Own,
        )
        .must("node-a"),
        row(
            "nodes: list selecting node-b",
            "GET",
            &q(NODES, &fs("metadata.name=node-b")),
            Own,
        ),
        row(
            "nodes: list selecting tenant B's label",
            "GET",
            &q(NODES, &ls("canopy.io/tenant=tenant-b")),
            Own,
        ),
        row("nodes: watch", "GET", &q(NODES, W), Own).must("node-a"),
        row(
            "nodes: watch selecting node-b",
            "GET",
            &q(NODES, &format!("{W}&{}", fs("metadata.name=node-b"))),
            Own,
        ),
        row(
            "nodes: annotate its own",
            "PATCH",
            &format!("{NODES}/node-a"),
            Allowed,
        )
        .body(
            MERGE,
            json!({"metadata": {"annotations": {"canopy.io/heartbeat": "1"}}}),
        ),
        row(
            "nodes: update its own status",
            "PATCH",
            &format!("{NODES}/node-a/status"),
            Allowed,
        )
        .body(
            MERGE,
            json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        ),
        // A node that relabels itself would be offered to tenant B's pods.
        row(
            "nodes: relabel itself for tenant B",
            "PATCH",
            &format!("{NODES}/node-a"),
            Refused(&[403, 422]),
        )
        .body(
            MERGE,
            json!({"metadata": {"labels": {"canopy.io/tenant": "tenant-b"}}}),
        ),
        row(
            "nodes: remove its tenant label",
            "PATCH",
            &format!("{NODES}/node-a"),
            Refused(&[403, 422]),
        )
        .body(
            MERGE,
            json!({"metadata": {"labels": {"canopy.io/tenant": null}}}),
        ),
        // Other nodes.
        row(
            "nodes: get node-b",
            "GET",
            &format!("{NODES}/node-b"),
            Denied,
        ),
        row(
            "nodes: get node-b's status",
            "GET",
            &format!("{NODES}/node-b/status"),
            Denied,
        ),
        row(
            "nodes: get node-free",
            "GET",
            &format!("{NODES}/node-free"),
            Denied,
        ),
        row(
            "nodes: patch node-b",
            "PATCH",
            &format!("{NODES}/node-b"),
            Denied,
        )
        .body(MERGE, json!({"metadata": {"labels": {"pwned": "yes"}}})),
        row(
            "nodes: patch node-b's status",
            "PATCH",
            &format!("{NODES}/node-b/status"),
            Denied,
        )
        .body(
            MERGE,
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        ),
        row(
            "nodes: replace node-b",
            "PUT",
            &format!("{NODES}/node-b"),
            Denied,
        )
        .body(JSON, node("node-b", Some("tenant-a"))),
        row("nodes: create one", "POST", NODES, Forbidden)
            .body(JSON, node("intruder-node", Some("tenant-a"))),
        row(
            "nodes: delete node-b",
            "DELETE",
            &format!("{NODES}/node-b"),
            Denied,
        )
        .last(),
        row("nodes: delete the collection", "DELETE", NODES, Forbidden).last(),
        row(
            "nodes: delete itself",
            "DELETE",
            &format!("{NODES}/node-a"),
            Forbidden,
        )
        .last(),
        // Pods on node-a.
        row(
            "pods: get one on node-a",
            "GET",
            &format!("{apods}/alice-pod"),
            Allowed,
        )
        .must("alice-pod"),
        row(
            "pods: get the status of one on node-a",
            "GET",
            &format!("{apods}/alice-pod/status"),
            Allowed,
        )
        .must("alice-pod"),
        row(
            "pods: update the status of one on node-a",
            "PATCH",
            &format!("{apods}/alice-pod/status"),
            Allowed,
        )
        .body(MERGE, json!({"status": {"message": "node-a was here"}})),
        row("pods: list all", "GET", "/api/v1/pods", Own).must("alice-pod"),
        row(
            "pods: list all from the cache",
            "GET",
            "/api/v1/pods?resourceVersion=0",
            Own,
        )
        .must("alice-pod"),
        row(
            "pods: list all selecting node-b",
            "GET",
            &q("/api/v1/pods", &fs("spec.nodeName=node-b")),
            Own,
        ),
        row(
            "pods: list all selecting bob's namespace",
            "GET",
            &q("/api/v1/pods", &fs("metadata.namespace=b-ns")),
            Own,
        ),
        row(
            "pods: list all selecting tenant B's label",
            "GET",
            &q("/api/v1/pods", &ls("canopy.io/tenant=tenant-b")),
            Own,
        ),
        row("pods: list a-ns", "GET", apods, OwnOrDenied),
        row("pods: list b-ns", "GET", bpods, OwnOrDenied),
        row("pods: watch all", "GET", &q("/api/v1/pods", W), Own).must("alice-pod"),
        row(
            "pods: watch all selecting node-b",
            "GET",
            &q(
                "/api/v1/pods",
                &format!("{W}&{}", fs("spec.nodeName=node-b")),
            ),
            Own,
        ),
        row("pods: watch b-ns", "GET", &q(bpods, W), OwnOrDenied),
        // Pods elsewhere.
        row(
            "pods: get a pod on no node",
            "GET",
            &format!("{apods}/alice-unsched"),
            Denied,
        ),
        row(
            "pods: get bob's pod on node-b",
            "GET",
            &format!("{bpods}/bob-pod"),
            Denied,
        ),
        row(
            "pods: get the status of bob's pod",
            "GET",
            &format!("{bpods}/bob-pod/status"),
            Denied,
        ),
        row(
            "pods: get the log of bob's pod",
            "GET",
            &format!("{bpods}/bob-pod/log"),
            Denied,
        ),
        row(
            "pods: patch bob's pod",
            "PATCH",
            &format!("{bpods}/bob-pod"),
            Denied,
        )
        .body(MERGE, pwn()),
        row(
            "pods: patch the status of bob's pod",
            "PATCH",
            &format!("{bpods}/bob-pod/status"),
            Denied,
        )
        .body(MERGE, json!({"status": {"message": "pwned"}})),
        row(
            "pods: replace the status of bob's pod",
            "PUT",
            &format!("{bpods}/bob-pod/status"),
            Denied,
        )
        .body(JSON, forged("pods", "bob-pod", "b-ns")),
        row(
            "pods: patch a pod on no node",
            "PATCH",
            &format!("{apods}/alice-unsched"),
            Denied,
        )
        .body(MERGE, pwn()),
        row(
            "pods: bind a pod to itself",
            "POST",
            &format!("{apods}/alice-unsched/binding"),
            Denied,
        )
        .body(JSON, binding("alice-unsched", "node-a")),
        row("pods: create one on itself", "POST", apods, Forbidden)
            .body(JSON, pod_on("intruder-node-pod", "a-ns", "node-a")),
        row("pods: create one in b-ns", "POST", bpods, Denied)
            .body(JSON, pod_on("intruder-node-pod", "b-ns", "node-a")),
        row(
            "pods: delete bob's pod",
            "DELETE",
            &format!("{bpods}/bob-pod"),
            Denied,
        )
        .last(),
        row(
            "pods: delete the collection in b-ns",
            "DELETE",
            bpods,
            Denied,
        )
        .last(),
        row(
            "pods: delete one on node-a",
            "DELETE",
            &format!("{apods}/alice-doomed"),
            Allowed,
        )
        .last(),
        // Leases.
        row(
            "leases: get its own",
            "GET",
            &format!("{NODE_LEASES}/node-a"),
            Allowed,
        )
        .must("node-a"),
        row(
            "leases: renew its own",
            "PATCH",
            &format!("{NODE_LEASES}/node-a"),
            Allowed,
        )
        .body(
            MERGE,
            json!({"spec": {"renewTime": "2025-01-01T00:00:00.000000Z"}}),
        ),
        row(
            "leases: list kube-node-lease",
            "GET",
            NODE_LEASES,
            OwnOrDenied,
        ),
        row(
            "leases: list all",
            "GET",
            "/apis/coordination.k8s.io/v1/leases",
            OwnOrDenied,
        ),
        row(
            "leases: get node-b's",
            "GET",
            &format!("{NODE_LEASES}/node-b"),
            Denied,
        ),
        row(
            "leases: renew node-b's",
            "PATCH",
            &format!("{NODE_LEASES}/node-b"),
            Denied,
        )
        .body(MERGE, json!({"spec": {"holderIdentity": "node-a"}})),
        row("leases: create one", "POST", NODE_LEASES, Denied).body(JSON, lease("intruder-lease")),
        row(
            "leases: get alice's",
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/a-ns/leases/alice-lease",
            Denied,
        ),
        row(
            "leases: delete node-b's",
            "DELETE",
            &format!("{NODE_LEASES}/node-b"),
            Denied,
        )
        .last(),
        // Everything else.
        row("namespaces: list", "GET", NAMESPACES, Denied),
        row(
            "namespaces: get a-ns",
            "GET",
            &format!("{NAMESPACES}/a-ns"),
            Denied,
        ),
        row("tenants: list", "GET", TENANTS, Denied),
        row(
            "tenants: get tenant-a",
            "GET",
            &format!("{TENANTS}/tenant-a"),
            Denied,
        ),
        row(
            "events: create one",
            "POST",
            "/api/v1/namespaces/a-ns/events",
            Denied,
        )
        .body(JSON, object("events", "intruder-node-event", "a-ns")),
        row(
            "impersonate node-b",
            "GET",
            &format!("{bpods}/bob-pod"),
            Forbidden,
        )
        .header("Impersonate-User", "system:node:node-b")
        .header("Impersonate-Group", "system:nodes"),
        row("impersonate an admin", "GET", "/api/v1/secrets", Forbidden)
            .header("Impersonate-User", "system:admin")
            .header("Impersonate-Group", "system:masters"),
        row("metrics", "GET", "/metrics", Denied),
    ];
    for &(prefix, plural, short) in NAMESPACED {
        if plural == "pods" || plural == "leases" {
            continue;
        }
        rows.extend([
            row(
                format!("{plural}: get alice's"),
                "GET",
                &format!("{prefix}/namespaces/a-ns/{plural}/alice-{short}"),
                Denied,
            ),
            row(
                format!("{plural}: get bob's"),
                "GET",
                &format!("{prefix}/namespaces/b-ns/{plural}/bob-{short}"),
                Denied,
            ),
            row(
                format!("{plural}: list all"),
                "GET",
                &format!("{prefix}/{plural}"),
                Denied,
            ),
        ]);
    }
    rows
}

/// Tenant A's proxy: reads of tenant A's services, endpoints and endpoint slices only.
fn proxy_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for (prefix, plural, short) in [
        ("/api/v1", "services", "svc"),
        ("/api/v1", "endpoints", "endpoints"),
        ("/apis/discovery.k8s.io/v1", "endpointslices", "slice"),
    ] {
        let a = format!("alice-{short}");
        let b = format!("bob-{short}");
        let acoll = format!("{prefix}/namespaces/a-ns/{plural}");
        let bcoll = format!("{prefix}/namespaces/b-ns/{plural}");
        let aitem = format!("{acoll}/{a}");
        let bitem = format!("{bcoll}/{b}");
        let every = format!("{prefix}/{plural}");
        let r = |what: &str| format!("{plural}: {what}");
        rows.extend([
            row(r("get tenant A's"), "GET", &aitem, Allowed).must(&a),
            row(r("list a-ns"), "GET", &acoll, Own).must(&a),
            row(r("watch a-ns"), "GET", &q(&acoll, W), Own).must(&a),
            row(r("list all"), "GET", &every, Own).must(&a),
            row(
                r("list all from the cache"),
                "GET",
                &q(&every, "resourceVersion=0"),
                Own,
            )
            .must(&a),
            row(
                r("list all selecting b-ns"),
                "GET",
                &q(&every, &fs("metadata.namespace=b-ns")),
                Own,
            ),
            row(
                r("list all selecting tenant B's label"),
                "GET",
                &q(&every, &ls("canopy.io/tenant=tenant-b")),
                Own,
            ),
            row(r("watch all"), "GET", &q(&every, W), Own).must(&a),
            row(
                r("watch all selecting b-ns"),
                "GET",
                &q(&every, &format!("{W}&{}", fs("metadata.namespace=b-ns"))),
                Own,
            ),
            row(r("get bob's"), "GET", &bitem, Denied),
            row(r("list b-ns"), "GET", &bcoll, OwnOrDenied),
            row(r("watch b-ns"), "GET", &q(&bcoll, W), OwnOrDenied),
            row(r("patch tenant A's"), "PATCH", &aitem, Forbidden)
                .body(MERGE, json!({"metadata": {"labels": {"pwned": "yes"}}})),
            row(r("replace tenant A's"), "PUT", &aitem, Forbidden)
                .body(JSON, forged(plural, &a, "a-ns")),
            row(r("create in a-ns"), "POST", &acoll, Forbidden).body(
                JSON,
                object(plural, &format!("intruder-proxy-{short}"), "a-ns"),
            ),
            row(r("patch bob's"), "PATCH", &bitem, Denied).body(MERGE, pwn()),
            row(r("delete bob's"), "DELETE", &bitem, Denied).last(),
            row(r("delete tenant A's"), "DELETE", &aitem, Forbidden).last(),
            row(
                r("delete the collection in a-ns"),
                "DELETE",
                &acoll,
                Forbidden,
            )
            .last(),
        ]);
    }
    rows.push(
        row(
            "services/status: patch tenant A's",
            "PATCH",
            "/api/v1/namespaces/a-ns/services/alice-svc/status",
            Forbidden,
        )
        .body(
            MERGE,
            json!({"status": {"loadBalancer": {"ingress": [{"ip": "6.6.6.6"}]}}}),
        ),
    );
    for &(prefix, plural, short) in NAMESPACED {
        if matches!(plural, "services" | "endpoints" | "endpointslices") {
            continue;
        }
        rows.extend([
            row(
                format!("{plural}: get tenant A's"),
                "GET",
                &format!("{prefix}/namespaces/a-ns/{plural}/alice-{short}"),
                Denied,
            ),
            row(
                format!("{plural}: list all"),
                "GET",
                &format!("{prefix}/{plural}"),
                Denied,
            ),
        ]);
    }
    rows.extend([
        row("namespaces: list", "GET", NAMESPACES, Denied),
        row(
            "namespaces: get a-ns",
            "GET",
            &format!("{NAMESPACES}/a-ns"),
            Denied,
        ),
        row("nodes: list", "GET", NODES, Denied),
        row(
            "nodes: get node-a",
            "GET",
            &format!("{NODES}/node-a"),
            Denied,
        ),
        row("tenants: list", "GET", TENANTS, Denied),
        row(
            "tenants: get tenant-a",
            "GET",
            &format!("{TENANTS}/tenant-a"),
            Denied,
        ),
        row(
            "impersonate tenant B's proxy",
            "GET",
            "/api/v1/namespaces/b-ns/services",
            Forbidden,
        )
        .header("Impersonate-User", "system:canopy-proxy:tenant-b")
        .header("Impersonate-Group", "canopy:proxies"),
        row(
            "impersonate alice",
            "GET",
            "/api/v1/namespaces/a-ns/secrets",
            Forbidden,
        )
        .header("Impersonate-User", "alice")
        .header("Impersonate-Group", "canopy:tenant:tenant-a"),
    ]);
    rows
}

/// Someone who is no tenant's member, node or proxy.
fn stranger_rows(who: &str) -> Vec<Row> {
    vec![
        row(
            "pods: get bob's",
            "GET",
            "/api/v1/namespaces/b-ns/pods/bob-pod",
            Denied,
        ),
        row(
            "pods: get alice's",
            "GET",
            "/api/v1/namespaces/a-ns/pods/alice-pod",
            Denied,
        ),
        row(
            "secrets: get bob's",
            "GET",
            "/api/v1/namespaces/b-ns/secrets/bob-secret",
            Denied,
        ),
        row(
            "secrets: get alice's",
            "GET",
            "/api/v1/namespaces/a-ns/secrets/alice-secret",
            Denied,
        ),
        row(
            "services: get bob's",
            "GET",
            "/api/v1/namespaces/b-ns/services/bob-svc",
            Denied,
        ),
        row(
            "namespaces: get b-ns",
            "GET",
            &format!("{NAMESPACES}/b-ns"),
            Denied,
        ),
        row(
            "nodes: get node-a",
            "GET",
            &format!("{NODES}/node-a"),
            Denied,
        ),
        row(
            "tenants: get tenant-a",
            "GET",
            &format!("{TENANTS}/tenant-a"),
            Denied,
        ),
        row("pods: list all", "GET", "/api/v1/pods", OwnOrDenied),
        row("pods: watch all", "GET", &q("/api/v1/pods", W), OwnOrDenied),
        row("secrets: list all", "GET", "/api/v1/secrets", OwnOrDenied),
        row("services: list all", "GET", "/api/v1/services", OwnOrDenied),
        row(
            "endpointslices: list all",
            "GET",
            "/apis/discovery.k8s.io/v1/endpointslices",
            OwnOrDenied,
        ),
        row("namespaces: list", "GET", NAMESPACES, OwnOrDenied),
        row("nodes: list", "GET", NODES, OwnOrDenied),
        row("tenants: list", "GET", TENANTS, OwnOrDenied),
        row("namespaces: create one", "POST", NAMESPACES, Forbidden)
            .body(JSON, namespace(&format!("intruder-{who}-ns"), None)),
        row(
            "namespaces: create one for tenant B",
            "POST",
            NAMESPACES,
            Forbidden,
        )
        .body(
            JSON,
            namespace(&format!("intruder-{who}-ns-b"), Some("tenant-b")),
        ),
        row(
            "configmaps: create in b-ns",
            "POST",
            "/api/v1/namespaces/b-ns/configmaps",
            Denied,
        )
        .body(
            JSON,
            object("configmaps", &format!("intruder-{who}-cm"), "b-ns"),
        ),
    ]
}

/// A member of tenant A whose name pretends to be node-b or tenant B's proxy: the name
/// alone gives nothing.
fn impostor_rows() -> Vec<Row> {
    vec![
        row(
            "nodes: get node-b",
            "GET",
            &format!("{NODES}/node-b"),
            Denied,
        ),
        row(
            "nodes: patch node-b's status",
            "PATCH",
            &format!("{NODES}/node-b/status"),
            Denied,
        )
        .body(
            MERGE,
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        ),
        row(
            "pods: get bob's",
            "GET",
            "/api/v1/namespaces/b-ns/pods/bob-pod",
            Denied,
        ),
        row(
            "pods: patch bob's status",
            "PATCH",
            "/api/v1/namespaces/b-ns/pods/bob-pod/status",
            Denied,
        )
        .body(MERGE, json!({"status": {"message": "pwned"}})),
        row(
            "leases: get node-b's",
            "GET",
            &format!("{NODE_LEASES}/node-b"),
            Denied,
        ),
        row(
            "services: get bob's",
            "GET",
            "/api/v1/namespaces/b-ns/services/bob-svc",
            Denied,
        ),
        row(
            "endpoints: list b-ns",
            "GET",
            "/api/v1/namespaces/b-ns/endpoints",
            Denied,
        ),
        row("pods: list all", "GET", "/api/v1/pods", OwnOrDenied),
        row("pods: watch all", "GET", &q("/api/v1/pods", W), OwnOrDenied),
        row("services: list all", "GET", "/api/v1/services", OwnOrDenied),
        row(
            "endpointslices: watch all",
            "GET",
            &q("/apis/discovery.k8s.io/v1/endpointslices", W),
            OwnOrDenied,
        ),
        row("nodes: list", "GET", NODES, OwnOrDenied),
    ]
}

// ---------------------------------------------------------------------------------------
// Setup checks, snapshots
// ---------------------------------------------------------------------------------------

fn stamped(failures: &mut Vec<String>, who: &str, obj: &Value, tenant: &str) {
    if label_of(obj) != Some(tenant) {
        failures.push(format!(
            "setup: {who}'s {} {} is not labelled {TENANT_LABEL}={tenant}: {}",
            obj["kind"],
            describe(obj),
            trunc(&obj.to_string(), 600)
        ));
    }
}

/// Names and uids of everything in a namespace, the namespace itself and `extra` objects.
async fn fingerprint(admin: &Client, ns: &str, extra: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for &(prefix, plural, _) in NAMESPACED {
        let list = get(admin, &format!("{prefix}/namespaces/{ns}/{plural}"))
            .await
            .json();
        for item in items(&list) {
            out.push(name_of(item).to_string());
            out.push(uid_of(item).to_string());
        }
    }
    let mut paths = vec![format!("{NAMESPACES}/{ns}")];
    paths.extend(extra.iter().map(|p| p.to_string()));
    for path in paths {
        let obj = get(admin, &path).await.json();
        out.push(name_of(&obj).to_string());
        out.push(uid_of(&obj).to_string());
    }
    out.retain(|s| !s.is_empty());
    out.sort();
    out.dedup();
    out
}

/// What no attacker may change: each of B's objects (uid and resourceVersion), the node and
/// lease of node-b, node-free, the tenant labels of a-ns and node-a, both tenants' specs
/// (their status is Canopy's to maintain), and the sets of nodes and tenants.
async fn snapshot(admin: &Client) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for &(prefix, plural, _) in NAMESPACED {
        let reply = get(admin, &format!("{prefix}/namespaces/b-ns/{plural}")).await;
        assert_eq!(
            reply.status, 200,
            "admin lists {plural} in b-ns: {}",
            reply.text
        );
        let list = reply.json();
        for item in items(&list) {
            out.insert(
                format!("{plural} b-ns/{}", name_of(item)),
                format!("uid={} resourceVersion={}", uid_of(item), rv_of(item)),
            );
        }
    }
    for path in [
        format!("{NAMESPACES}/b-ns"),
        format!("{NODES}/node-b"),
        format!("{NODES}/node-free"),
        format!("{NODE_LEASES}/node-b"),
    ] {
        let reply = get(admin, &path).await;
        let obj = reply.json();
        out.insert(
            path,
            format!(
                "status={} uid={} resourceVersion={}",
                reply.status,
                uid_of(&obj),
                rv_of(&obj)
            ),
        );
    }
    for path in [
        format!("{NAMESPACES}/a-ns"),
        format!("{NODES}/node-a"),
        format!("{TENANTS}/tenant-a"),
        format!("{TENANTS}/tenant-b"),
    ] {
        let reply = get(admin, &path).await;
        let obj = reply.json();
        let spec = if path.starts_with(TENANTS) {
            obj["spec"].to_string()
        } else {
            String::new()
        };
        out.insert(
            path,
            format!(
                "status={} uid={} labels={} spec={spec}",
                reply.status,
                uid_of(&obj),
                obj["metadata"]["labels"]
            ),
        );
    }
    for (key, path) in [("all node names", NODES), ("all tenant names", TENANTS)] {
        let list = get(admin, path).await.json();
        let mut names: Vec<&str> = items(&list).iter().map(name_of).collect();
        names.sort_unstable();
        out.insert(key.to_string(), names.join(","));
    }
    out
}

/// Objects an attacker tried to create (all named `intruder…`) that exist.
async fn intruders(admin: &Client) -> Vec<String> {
    let mut paths: Vec<String> = NAMESPACED
        .iter()
        .map(|(prefix, plural, _)| format!("{prefix}/{plural}"))
        .collect();
    paths.extend([NAMESPACES, NODES, TENANTS, NODE_LEASES].map(String::from));
    let mut found = Vec::new();
    for path in paths {
        let list = get(admin, &path).await.json();
        for item in items(&list) {
            if name_of(item).starts_with("intruder") {
                found.push(format!("{path}: {}", describe(item)));
            }
        }
    }
    found
}

async fn kube_names<K>(api: Api<K>) -> Result<Vec<String>, String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut names: Vec<String> = list.items.iter().map(|o| o.name_any()).collect();
    names.sort();
    Ok(names)
}

// ---------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn tenants_nodes_and_proxies_cannot_reach_what_is_not_theirs() {
    let cluster = Cluster::start(Backend::Embedded);
    let admin = cluster.client().await;
    let mut failures: Vec<String> = Vec::new();

    // ---- Setup: tenants, nodes, node leases (admin).
    create(&admin, "admin", TENANTS, &tenant("tenant-a", "Tenant A")).await;
    create(&admin, "admin", TENANTS, &tenant("tenant-b", B_DISPLAY)).await;
    create(&admin, "admin", NODES, &node("node-a", Some("tenant-a"))).await;
    create(&admin, "admin", NODES, &node("node-b", Some("tenant-b"))).await;
    create(&admin, "admin", NODES, &node("node-free", None)).await;
    for name in ["node-a", "node-b"] {
        create(&admin, "admin", NODE_LEASES, &lease(name)).await;
    }
    let early_rv = list_rv(&admin).await;

    let user = |name: &str, group: Option<&str>| cluster.user_kubeconfig(name, group);
    let alice = client_for(&user("alice", Some("canopy:tenant:tenant-a"))).await;
    let bob = client_for(&user("bob", Some("canopy:tenant:tenant-b"))).await;
    let node_a = client_for(&user("system:node:node-a", Some("system:nodes"))).await;
    let proxy_a = client_for(&user(
        "system:canopy-proxy:tenant-a",
        Some("canopy:proxies"),
    ))
    .await;

    // ---- Setup: each tenant's member creates a namespace and one object of every kind in
    // it (bob's pod, bound to node-b at creation, is the admin's).
    for (client, who, ns, tenant) in [
        (&alice, "alice", "a-ns", "tenant-a"),
        (&bob, "bob", "b-ns", "tenant-b"),
    ] {
        let created = create(client, who, NAMESPACES, &namespace(ns, None)).await;
        stamped(&mut failures, who, &created, tenant);
        for &(prefix, plural, short) in NAMESPACED {
            let path = format!("{prefix}/namespaces/{ns}/{plural}");
            let name = format!("{who}-{short}");
            let created = match (plural, who) {
                ("pods", "alice") => create(client, who, &path, &pod_on(&name, ns, "node-a")).await,
                ("pods", _) => create(&admin, "admin", &path, &pod_on(&name, ns, "node-b")).await,
                _ => create(client, who, &path, &object(plural, &name, ns)).await,
            };
            stamped(&mut failures, who, &created, tenant);
        }
    }
    let apods = "/api/v1/namespaces/a-ns/pods";
    create(
        &alice,
        "alice",
        apods,
        &object("pods", "alice-unsched", "a-ns"),
    )
    .await;
    create(
        &alice,
        "alice",
        apods,
        &pod_on("alice-doomed", "a-ns", "node-a"),
    )
    .await;
    let setup_rv = list_rv(&admin).await;

    // ---- Positive controls: each sees their own, through kube-rs too.
    let mut control = |what: &str, ok: bool, detail: String| {
        if !ok {
            failures.push(format!("control: {what}: {detail}"));
        }
    };
    match kube_names(Api::<Pod>::namespaced(alice.clone(), "a-ns")).await {
        Ok(names) => control(
            "alice lists her pods in a-ns",
            names.contains(&"alice-pod".to_string())
                && names.iter().all(|n| n.starts_with("alice-")),
            format!("{names:?}"),
        ),
        Err(e) => control("alice lists her pods in a-ns", false, e),
    }
    match kube_names(Api::<Pod>::all(alice.clone())).await {
        Ok(names) => control(
            "alice lists all pods and sees only hers",
            names.contains(&"alice-pod".to_string())
                && names.iter().all(|n| n.starts_with("alice-")),
            format!("{names:?}"),
        ),
        Err(e) => control("alice lists all pods", false, e),
    }
    match kube_names(Api::<Pod>::all(bob.clone())).await {
        Ok(names) => control(
            "bob lists all pods and sees only his",
            names.contains(&"bob-pod".to_string()) && names.iter().all(|n| n.starts_with("bob-")),
            format!("{names:?}"),
        ),
        Err(e) => control("bob lists all pods", false, e),
    }
    match kube_names(Api::<ConfigMap>::all(alice.clone())).await {
        Ok(names) => control(
            "alice lists all configmaps and sees only hers",
            names.contains(&"alice-cm".to_string())
                && names.iter().all(|n| n.starts_with("alice-")),
            format!("{names:?}"),
        ),
        Err(e) => control("alice lists all configmaps", false, e),
    }
    match kube_names(Api::<Node>::all(alice.clone())).await {
        Ok(names) => control(
            "alice lists nodes and sees node-a only",
            names == ["node-a"],
            format!("{names:?}"),
        ),
        Err(e) => control("alice lists nodes", false, e),
    }
    match kube_names(Api::<Node>::all(node_a.clone())).await {
        Ok(names) => control(
            "node-a lists nodes and sees itself only",
            names == ["node-a"],
            format!("{names:?}"),
        ),
        Err(e) => control("node-a lists nodes", false, e),
    }
    match kube_names(Api::<Namespace>::all(alice.clone())).await {
        Ok(names) => control(
            "alice lists namespaces and sees a-ns only",
            names == ["a-ns"],
            format!("{names:?}"),
        ),
        Err(e) => control("alice lists namespaces", false, e),
    }
    match kube_names(Api::<Namespace>::all(bob.clone())).await {
        Ok(names) => control(
            "bob lists namespaces and sees b-ns only",
            names == ["b-ns"],
            format!("{names:?}"),
        ),
        Err(e) => control("bob lists namespaces", false, e),
    }
    let reply = get(&alice, &format!("{TENANTS}/tenant-a")).await;
    control("alice gets tenant-a", reply.status == 200, reply.text);
    let reply = get(&alice, TENANTS).await;
    let names: Vec<String> = items(&reply.json())
        .iter()
        .map(|t| name_of(t).to_string())
        .collect();
    control(
        "alice lists tenants and sees tenant-a only",
        reply.status == 200 && names == ["tenant-a"],
        format!("{} {names:?}", reply.status),
    );

    // ---- Live watches of everything: the watcher's new object arrives, and the other
    // tenant's, created just before it, does not.
    struct Live<'a> {
        what: &'static str,
        watcher: &'a Client,
        path: &'static str,
        owner: Owner,
        before: (&'a Client, String, Value),
        after: (&'a Client, String, Value),
        expected: &'static str,
    }
    let lives = [
        Live {
            what: "alice watches all configmaps",
            watcher: &alice,
            path: "/api/v1/configmaps",
            owner: tenant_a_owns,
            before: (
                &bob,
                "/api/v1/namespaces/b-ns/configmaps".into(),
                object("configmaps", "bob-late-cm", "b-ns"),
            ),
            after: (
                &alice,
                "/api/v1/namespaces/a-ns/configmaps".into(),
                object("configmaps", "alice-late-cm", "a-ns"),
            ),
            expected: "alice-late-cm",
        },
        Live {
            what: "node-a watches all pods",
            watcher: &node_a,
            path: "/api/v1/pods",
            owner: node_a_owns,
            before: (
                &admin,
                "/api/v1/namespaces/b-ns/pods".into(),
                pod_on("bob-late-pod", "b-ns", "node-b"),
            ),
            after: (
                &alice,
                "/api/v1/namespaces/a-ns/pods".into(),
                pod_on("alice-late-pod", "a-ns", "node-a"),
            ),
            expected: "alice-late-pod",
        },
        Live {
            what: "tenant A's proxy watches all services",
            watcher: &proxy_a,
            path: "/api/v1/services",
            owner: tenant_a_owns,
            before: (
                &bob,
                "/api/v1/namespaces/b-ns/services".into(),
                object("services", "bob-late-svc", "b-ns"),
            ),
            after: (
                &alice,
                "/api/v1/namespaces/a-ns/services".into(),
                object("services", "alice-late-svc", "a-ns"),
            ),
            expected: "alice-late-svc",
        },
    ];
    for live in &lives {
        let list = get(live.watcher, live.path).await;
        let rv = rv_of(&list.json()).to_string();
        if list.status != 200 || rv.is_empty() {
            control(
                live.what,
                false,
                format!(
                    "the list to start from: {} {}",
                    list.status,
                    trunc(&list.text, 1500)
                ),
            );
            continue;
        }
        let path = format!(
            "{}?watch=1&allowWatchBookmarks=true&timeoutSeconds=60&resourceVersion={rv}",
            live.path
        );
        let mut stream = match Stream::open(live.watcher, &path).await {
            Ok(stream) => stream,
            Err(e) => {
                control(live.what, false, e);
                continue;
            }
        };
        let (client, coll, body) = &live.before;
        create(client, "the other tenant", coll, body).await;
        let (client, coll, body) = &live.after;
        create(client, "the watcher's tenant", coll, body).await;
        if let Err(e) = first_event(&mut stream, live.path, live.owner, live.expected).await {
            control(live.what, false, e);
        }
    }

    // ---- Paging through all configmaps: every page is alice's, and remainingItemCount
    // does not count bob's.
    let full = get(&alice, "/api/v1/configmaps").await.json();
    let mut all_names: Vec<String> = items(&full)
        .iter()
        .map(|i| name_of(i).to_string())
        .collect();
    all_names.sort();
    let mut paged = Vec::new();
    let mut token = String::new();
    for _ in 0..100 {
        let path = if token.is_empty() {
            "/api/v1/configmaps?limit=1".to_string()
        } else {
            format!("/api/v1/configmaps?limit=1&continue={}", enc(&token))
        };
        let reply = get(&alice, &path).await;
        let page = reply.json();
        if reply.status != 200 {
            control(
                "alice pages through all configmaps",
                false,
                format!("{path}: {} {}", reply.status, reply.text),
            );
            break;
        }
        for item in items(&page) {
            if !tenant_a_owns(&path, item) {
                control(
                    "alice pages through all configmaps",
                    false,
                    format!("{path}: {}", describe(item)),
                );
            }
            paged.push(name_of(item).to_string());
        }
        if let Some(remaining) = page["metadata"]["remainingItemCount"].as_u64() {
            control(
                "alice's pages count only her configmaps as remaining",
                paged.len() + remaining as usize <= all_names.len(),
                format!(
                    "{path}: remainingItemCount {remaining} after {} of {}",
                    paged.len(),
                    all_names.len()
                ),
            );
        }
        token = page["metadata"]["continue"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if token.is_empty() {
            break;
        }
    }
    paged.sort();
    control(
        "alice's pages add up to her list",
        paged == all_names && all_names.contains(&"alice-cm".to_string()),
        format!("pages {paged:?}, list {all_names:?}"),
    );

    // ---- alice labels her own objects as tenant B's: refused, or the server keeps (or
    // restamps) tenant A's label; bob never sees them.
    let acms = "/api/v1/namespaces/a-ns/configmaps";
    let mut spoof = object("configmaps", "alice-spoof", "a-ns");
    spoof["metadata"]["labels"] = json!({"canopy.io/tenant": "tenant-b"});
    let reply = call(&alice, "POST", acms, JSON, Some(&spoof)).await;
    control(
        "alice creates a configmap labelled for tenant B",
        matches!(reply.status, 403 | 422)
            || (reply.status == 201 && label_of(&reply.json()) == Some("tenant-a")),
        format!("{} {}", reply.status, trunc(&reply.text, 1500)),
    );
    for (what, content_type, body) in [
        (
            "relabels her configmap for tenant B (merge)",
            MERGE,
            json!({"metadata": {"labels": {"canopy.io/tenant": "tenant-b"}}}),
        ),
        (
            "removes her configmap's tenant label (merge)",
            MERGE,
            json!({"metadata": {"labels": {"canopy.io/tenant": null}}}),
        ),
        (
            "removes her configmap's labels (JSON patch)",
            JSON_PATCH,
            json!([{"op": "remove", "path": "/metadata/labels"}]),
        ),
        ("relabels her configmap for tenant B (apply)", APPLY, {
            let mut cm = object("configmaps", "alice-cm", "a-ns");
            cm["metadata"]["labels"] = json!({"canopy.io/tenant": "tenant-b"});
            cm
        }),
    ] {
        let path = if content_type == APPLY {
            format!("{acms}/alice-cm?fieldManager=attacker&force=true")
        } else {
            format!("{acms}/alice-cm")
        };
        let reply = call(&alice, "PATCH", &path, content_type, Some(&body)).await;
        control(
            &format!("alice {what}"),
            matches!(reply.status, 403 | 422)
                || (reply.status == 200 && label_of(&reply.json()) == Some("tenant-a")),
            format!("{} {}", reply.status, trunc(&reply.text, 1500)),
        );
    }
    for name in ["alice-cm", "alice-spoof"] {
        let reply = get(&admin, &format!("{acms}/{name}")).await;
        control(
            &format!("{name} is still labelled for tenant A"),
            (reply.status == 404 && name == "alice-spoof")
                || label_of(&reply.json()) == Some("tenant-a"),
            format!("{} {}", reply.status, trunc(&reply.text, 600)),
        );
        let reply = get(&bob, &format!("{acms}/{name}")).await;
        control(
            &format!("bob cannot get {name}"),
            matches!(reply.status, 403 | 404) && !reply.text.contains(A_CONFIG),
            format!("{} {}", reply.status, trunc(&reply.text, 600)),
        );
    }
    match kube_names(Api::<ConfigMap>::all(bob.clone())).await {
        Ok(names) => control(
            "bob lists all configmaps and sees none of alice's",
            names.iter().all(|n| n.starts_with("bob-")),
            format!("{names:?}"),
        ),
        Err(e) => control("bob lists all configmaps", false, e),
    }

    // ---- What B has, before the attacks (once quiet: nothing may be settling).
    let mut before = snapshot(&admin).await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let again = snapshot(&admin).await;
        if again == before {
            break;
        }
        before = again;
    }
    let (node_a_path, node_b_path) = (format!("{NODES}/node-a"), format!("{NODES}/node-b"));
    let (tenant_a_path, tenant_b_path) =
        (format!("{TENANTS}/tenant-a"), format!("{TENANTS}/tenant-b"));
    let a_private: Vec<String> = vec![
        A_SECRET.into(),
        base64::engine::general_purpose::STANDARD.encode(A_SECRET),
        A_CONFIG.into(),
    ];
    let mut victim_b = fingerprint(
        &admin,
        "b-ns",
        &[node_b_path.as_str(), tenant_b_path.as_str()],
    )
    .await;
    victim_b.extend([
        B_SECRET.to_string(),
        base64::engine::general_purpose::STANDARD.encode(B_SECRET),
        B_CONFIG.to_string(),
        B_DISPLAY.to_string(),
    ]);
    let node_b_lease = get(&admin, &format!("{NODE_LEASES}/node-b")).await.json();
    let unsched = get(&admin, &format!("{apods}/alice-unsched")).await.json();
    let mut victim_of_node = victim_b.clone();
    victim_of_node.extend(a_private.iter().cloned());
    victim_of_node.extend([
        uid_of(&node_b_lease).to_string(),
        "alice-unsched".to_string(),
        uid_of(&unsched).to_string(),
    ]);
    let mut victim_of_proxy = victim_b.clone();
    victim_of_proxy.extend(a_private.iter().cloned());
    let mut victim_of_stranger = victim_b.clone();
    victim_of_stranger.extend(
        fingerprint(
            &admin,
            "a-ns",
            &[node_a_path.as_str(), tenant_a_path.as_str()],
        )
        .await,
    );
    victim_of_stranger.extend(a_private.iter().cloned());
    for victim in [
        &mut victim_of_node,
        &mut victim_of_proxy,
        &mut victim_of_stranger,
    ] {
        victim.retain(|s| !s.is_empty());
    }

    // ---- The attacks.
    let mut rows_run = 0;
    let rows = alice_rows(early_rv, setup_rv);
    rows_run += rows.len();
    failures.extend(
        run_table(
            "alice",
            "alice canopy:tenant:tenant-a",
            &alice,
            &rows,
            tenant_a_owns,
            &victim_b,
        )
        .await,
    );
    let rows = node_rows();
    rows_run += rows.len();
    failures.extend(
        run_table(
            "node-a",
            "system:node:node-a system:nodes",
            &node_a,
            &rows,
            node_a_owns,
            &victim_of_node,
        )
        .await,
    );
    let rows = proxy_rows();
    rows_run += rows.len();
    failures.extend(
        run_table(
            "proxy-a",
            "system:canopy-proxy:tenant-a canopy:proxies",
            &proxy_a,
            &rows,
            tenant_a_owns,
            &victim_of_proxy,
        )
        .await,
    );
    // Strangers: no group, the nodes' group without a node's name, the proxies' group
    // without a proxy's name, an empty tenant name.
    for (table, name, group) in [
        ("mallory", "mallory", None),
        ("kubelet-impostor", "kubelet-impostor", Some("system:nodes")),
        ("proxy-impostor", "proxy-impostor", Some("canopy:proxies")),
        ("eve", "eve", Some("canopy:tenant:")),
    ] {
        let client = client_for(&user(name, group)).await;
        let rows = stranger_rows(table);
        rows_run += rows.len();
        let identity = format!("{name} {}", group.unwrap_or(""));
        failures.extend(
            run_table(
                table,
                &identity,
                &client,
                &rows,
                owns_nothing,
                &victim_of_stranger,
            )
            .await,
        );
    }
    // Members of tenant A named like node-b and like tenant B's proxy.
    for (table, name) in [
        ("fake-node-b", "system:node:node-b"),
        ("fake-proxy-b", "system:canopy-proxy:tenant-b"),
    ] {
        let client = client_for(&user(name, Some("canopy:tenant:tenant-a"))).await;
        let rows = impostor_rows();
        rows_run += rows.len();
        let identity = format!("{name} canopy:tenant:tenant-a");
        failures
            .extend(run_table(table, &identity, &client, &rows, tenant_a_owns, &victim_b).await);
    }
    eprintln!("isolation: {rows_run} rows in all");

    // ---- Afterwards: nothing of B's changed, nothing an attacker created exists, alice
    // still has her namespace.
    let after = snapshot(&admin).await;
    for key in before
        .keys()
        .chain(after.keys().filter(|k| !before.contains_key(*k)))
    {
        let (was, is) = (before.get(key), after.get(key));
        if was != is {
            failures.push(format!(
                "after the attacks: {key} changed: before {was:?}, after {is:?}"
            ));
        }
    }
    for intruder in intruders(&admin).await {
        failures.push(format!(
            "after the attacks: an attacker's object exists: {intruder}"
        ));
    }
    let a_ns = get(&admin, &format!("{NAMESPACES}/a-ns")).await.json();
    if label_of(&a_ns) != Some("tenant-a") {
        failures.push(format!(
            "after the attacks: a-ns is not tenant A's: {}",
            describe(&a_ns)
        ));
    }
    match kube_names(Api::<Pod>::namespaced(alice.clone(), "a-ns")).await {
        Ok(names) if names.contains(&"alice-pod".to_string()) => {}
        other => failures.push(format!(
            "after the attacks: alice cannot list her pods: {other:?}"
        )),
    }

    assert!(
        failures.is_empty(),
        "{} isolation failures (of {rows_run} rows and the controls):\n\n{}\n\nserver log (end):\n{}",
        failures.len(),
        failures.join("\n\n"),
        tail(&cluster.log(), 4000)
    );
}
