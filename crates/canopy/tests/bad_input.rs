//! Bad input, table-driven: each case is a raw request with the status code and `reason`
//! upstream kube-apiserver (v1.33) answers; after each case the server must still be ready
//! and nothing stored may have changed. Then: field validation that succeeds (Warn, Ignore),
//! a lowered request body limit, and the in-flight request limit.

mod common;

use common::enc;

use std::time::{Duration, Instant};

use base64::Engine;
use common::{Backend, Cluster};
use http_body_util::BodyExt;
use kube::Client;
use serde_json::{Value, json};

const JSON: &str = "application/json";
const YAML: &str = "application/yaml";
const MERGE: &str = "application/merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";
const SMP: &str = "application/strategic-merge-patch+json";
const APPLY: &str = "application/apply-patch+yaml";

const CMS: &str = "/api/v1/namespaces/bad/configmaps";
const TARGET: &str = "/api/v1/namespaces/bad/configmaps/target";
const DEPS: &str = "/apis/apps/v1/namespaces/bad/deployments";
const WEB: &str = "/apis/apps/v1/namespaces/bad/deployments/web";
const PODS: &str = "/api/v1/namespaces/bad/pods";
const SVCS: &str = "/api/v1/namespaces/bad/services";

/// Sends a request; returns the status, the headers and the body as JSON (a JSON string
/// when it is not JSON), or the transport error.
async fn try_send(
    client: &Client,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<(u16, http::HeaderMap, Value), String> {
    let mut builder = http::Request::builder().method(method).uri(path);
    for (name, value) in headers {
        builder = builder.header(*name, value.as_str());
    }
    let request = builder.body(body).map_err(|e| e.to_string())?;
    let response = client
        .send(request.map(kube::client::Body::from))
        .await
        .map_err(|e| format!("transport error: {e}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the response: {e}"))?
        .to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, headers, value))
}

async fn send(
    client: &Client,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, http::HeaderMap, Value) {
    try_send(client, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

async fn post(client: &Client, path: &str, body: &Value) -> (u16, Value) {
    let (s, _, v) = send(
        client,
        "POST",
        path,
        &[("content-type", JSON.into())],
        serde_json::to_vec(body).unwrap(),
    )
    .await;
    (s, v)
}

async fn get(client: &Client, path: &str) -> (u16, Value) {
    let (s, _, v) = send(client, "GET", path, &[], Vec::new()).await;
    (s, v)
}

#[track_caller]
fn created(response: (u16, Value)) -> Value {
    assert!(
        response.0 == 201 || response.0 == 200,
        "setup failed: {}",
        response.1
    );
    response.1
}

fn reason_of(v: &Value) -> &str {
    v["reason"].as_str().unwrap_or("")
}

fn configmap(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"a": "1"}})
}

fn deployment(name: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": "nginx:1.27"}]},
            },
        },
    })
}

fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    })
}

/// A kube-rs client from a kubeconfig, without kube-rs's automatic retries of 429, 503 and
/// 504 answers (the tests look at the server's answers themselves).
async fn client_from(kubeconfig: kube::config::Kubeconfig) -> Client {
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kube config");
    config.default_retry = false;
    Client::try_from(config).expect("kube client")
}

async fn client_for(path: &std::path::Path) -> Client {
    client_from(kube::config::Kubeconfig::read_from(path).expect("kubeconfig")).await
}

/// A kube-rs client for the cluster without a client certificate: with a bearer token, or
/// anonymous.
async fn client_without_cert(c: &Cluster, token: Option<&str>) -> Client {
    let text = std::fs::read_to_string(c.kubeconfig()).expect("kubeconfig");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
    for user in doc["users"].as_sequence_mut().expect("users") {
        let auth = user["user"].as_mapping_mut().expect("user");
        auth.remove("client-certificate-data");
        auth.remove("client-key-data");
        auth.remove("client-certificate");
        auth.remove("client-key");
        if let Some(token) = token {
            auth.insert("token".into(), token.into());
        }
    }
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(&serde_yaml::to_string(&doc).unwrap()).unwrap();
    client_from(kubeconfig).await
}

// ---------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------

/// Who sends a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Admin,
    /// A client certificate of a user outside system:masters.
    User,
    /// A bearer token (no token authenticator exists).
    Token,
    /// No credentials at all.
    Anonymous,
}

struct Case {
    what: String,
    who: Who,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Accepted (status, reason) answers; the first is upstream's.
    expect: Vec<(u16, &'static str)>,
    message: Option<&'static str>,
}

fn case(what: impl Into<String>, method: &'static str, path: impl Into<String>) -> Case {
    Case {
        what: what.into(),
        who: Who::Admin,
        method,
        path: path.into(),
        headers: Vec::new(),
        body: Vec::new(),
        expect: Vec::new(),
        message: None,
    }
}

impl Case {
    fn json(self, body: &Value) -> Self {
        self.raw(JSON, serde_json::to_vec(body).unwrap())
    }

    fn patch(self, content_type: &'static str, body: &Value) -> Self {
        self.raw(content_type, serde_json::to_vec(body).unwrap())
    }

    fn raw(mut self, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        self.headers
            .push(("content-type", content_type.to_string()));
        self.body = body.into();
        self
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }

    fn by(mut self, who: Who) -> Self {
        self.who = who;
        self
    }

    fn expect(mut self, code: u16, reason: &'static str) -> Self {
        self.expect.push((code, reason));
        self
    }

    fn message(mut self, text: &'static str) -> Self {
        self.message = Some(text);
        self
    }
}

/// What the cases must not change: the objects of the test namespace (name and
/// resourceVersion), the namespaces, and the store's revision.
async fn state(client: &Client) -> Value {
    let mut out = serde_json::Map::new();
    for path in [CMS, DEPS, PODS, SVCS, "/api/v1/namespaces", "/api/v1/nodes"] {
        let (status, list) = get(client, path).await;
        assert_eq!(status, 200, "listing {path}: {list}");
        let items: Vec<Value> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| json!([o["metadata"]["name"], o["metadata"]["resourceVersion"]]))
            .collect();
        out.insert(
            path.to_string(),
            json!({"revision": list["metadata"]["resourceVersion"], "items": items}),
        );
    }
    Value::Object(out)
}

struct Clients {
    admin: Client,
    user: Client,
    token: Client,
    anonymous: Client,
}

impl Clients {
    fn of(&self, who: Who) -> &Client {
        match who {
            Who::Admin => &self.admin,
            Who::User => &self.user,
            Who::Token => &self.token,
            Who::Anonymous => &self.anonymous,
        }
    }
}

/// Runs the cases; after each, the server must be ready and the state unchanged.
async fn run(c: &mut Cluster, clients: &Clients, cases: Vec<Case>) {
    let mut baseline = state(&clients.admin).await;
    let mut failures = Vec::new();
    let total = cases.len();
    for case in cases {
        let label = format!("{} ({} {})", case.what, case.method, shorten(&case.path));
        match try_send(
            clients.of(case.who),
            case.method,
            &case.path,
            &case.headers,
            case.body,
        )
        .await
        {
            Err(e) => failures.push(format!("{label}: {e}")),
            Ok((status, _, body)) => {
                let got = (status, reason_of(&body));
                if !case.expect.contains(&got) {
                    failures.push(format!(
                        "{label}: got {got:?}, want {}: {}",
                        case.expect
                            .iter()
                            .map(|w| format!("{w:?}"))
                            .collect::<Vec<_>>()
                            .join(" or "),
                        shorten(&body.to_string())
                    ));
                }
                if let Some(text) = case.message {
                    let message = body["message"].as_str().unwrap_or("");
                    if !message.contains(text) {
                        failures.push(format!(
                            "{label}: the message must contain {text:?}: {message:?}"
                        ));
                    }
                }
            }
        }
        // The server still serves...
        match try_send(&clients.admin, "GET", "/readyz", &[], Vec::new()).await {
            Ok((200, _, _)) => {}
            other => {
                failures.push(format!("{label}: /readyz afterwards: {other:?}"));
                assert!(
                    c.server.is_running(),
                    "the server died on {label}\n{}",
                    c.log()
                );
            }
        }
        // ...and nothing changed.
        let now = state(&clients.admin).await;
        if now != baseline {
            failures.push(format!(
                "{label}: the request changed state:\nbefore {baseline}\nafter  {now}"
            ));
            baseline = now;
        }
    }
    assert!(c.server.is_running(), "the server process must survive");
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn shorten(s: &str) -> String {
    if s.len() > 300 {
        let mut end = 300;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes)", &s[..end], s.len())
    } else {
        s.to_string()
    }
}

fn token(rv: i64, start: &str) -> String {
    base64::engine::general_purpose::URL_SAFE.encode(
        serde_json::to_vec(&json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start})).unwrap(),
    )
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let mut c = Cluster::start(Backend::Embedded);
    let admin = client_for(c.kubeconfig()).await;
    created(
        post(
            &admin,
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bad"}}),
        )
        .await,
    );
    let target = created(post(&admin, CMS, &configmap("target")).await);
    created(post(&admin, DEPS, &deployment("web")).await);
    created(post(&admin, PODS, &pod("p")).await);
    created(post(&admin, PODS, &pod("q")).await);
    created(
        post(
            &admin,
            &format!("{PODS}/p/binding"),
            &json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"}, "target": {"kind": "Node", "name": "node-a"}}),
        )
        .await,
    );
    let bob = client_for(&c.user_kubeconfig("bob", None)).await;
    let clients = Clients {
        user: bob,
        token: client_without_cert(&c, Some("not-a-valid-token")).await,
        anonymous: client_without_cert(&c, None).await,
        admin,
    };
    let target_pod = get(&clients.admin, &format!("{PODS}/p")).await.1;
    let web = get(&clients.admin, WEB).await.1;
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = target.clone();
        f(&mut v);
        v
    };

    let big = "x".repeat(3 * 1024 * 1024 + 1024);
    let deep_array = "[".repeat(100_000) + &"]".repeat(100_000);
    let deep_object = "{\"a\":".repeat(100_000) + "1" + &"}".repeat(100_000);
    let nested = |levels: usize| "{\"a\":".repeat(levels) + "1" + &"}".repeat(levels);
    let deep_patch = format!("{{\"metadata\":{{\"annotations\":{}}}}}", nested(10_000));
    let deep_json_patch = format!(
        "[{{\"op\":\"add\",\"path\":\"/data/deep\",\"value\":{}}}]",
        nested(10_000)
    );
    let long = "a".repeat(254);
    let strict_unknown = {
        let mut d = deployment("strict");
        d["spec"]["bogus"] = json!(true);
        d
    };

    let cases = vec![
        // --- Bodies that do not decode.
        case("malformed JSON", "POST", CMS)
            .raw(JSON, r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x""#)
            .expect(400, "BadRequest"),
        case("malformed YAML", "POST", CMS)
            .raw(YAML, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [x\n")
            .expect(400, "BadRequest"),
        case("YAML with a tab indentation", "POST", CMS)
            .raw(YAML, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n\tname: x\n")
            .expect(400, "BadRequest"),
        case("a JSON array", "POST", CMS)
            .raw(JSON, r#"[{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"}}]"#)
            .expect(400, "BadRequest"),
        case("a JSON string", "POST", CMS).raw(JSON, r#""configmap""#).expect(400, "BadRequest"),
        case("JSON null", "POST", CMS).raw(JSON, "null").expect(400, "BadRequest"),
        case("an empty body", "POST", CMS).raw(JSON, "").expect(400, "BadRequest"),
        case("bytes that are not UTF-8", "POST", CMS)
            .raw(JSON, vec![0xff, 0xfe, 0x00, 0x7b])
            .expect(400, "BadRequest"),
        case("malformed JSON in an update", "PUT", TARGET)
            .raw(JSON, r#"{"metadata": "#)
            .expect(400, "BadRequest"),
        case("metadata that is not an object", "POST", CMS)
            .json(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": "x"}))
            .expect(400, "BadRequest"),
        // --- Wrong apiVersion or kind.
        case("the apiVersion of another group", "POST", CMS)
            .json(&json!({"apiVersion": "apps/v1", "kind": "ConfigMap", "metadata": {"name": "x"}}))
            .expect(400, "BadRequest"),
        case("an apiVersion that does not exist", "POST", CMS)
            .json(&json!({"apiVersion": "v2", "kind": "ConfigMap", "metadata": {"name": "x"}}))
            .expect(400, "BadRequest"),
        case("a Service posted to the pods URL", "POST", PODS)
            .json(&json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": 80}]}}))
            .expect(400, "BadRequest"),
        case("a Secret put to a configmap URL", "PUT", TARGET)
            .json(&with(&|v| v["kind"] = json!("Secret")))
            .expect(400, "BadRequest"),
        case("a kind that is not a string", "POST", CMS)
            .json(&json!({"apiVersion": "v1", "kind": 5, "metadata": {"name": "x"}}))
            .expect(400, "BadRequest"),
        // --- Names.
        case("an upper-case name", "POST", CMS).json(&configmap("Upper")).expect(422, "Invalid"),
        case("a 254-character name", "POST", CMS).json(&configmap(&long)).expect(422, "Invalid"),
        case("the name ..", "POST", CMS).json(&configmap("..")).expect(422, "Invalid"),
        case("a name with a slash", "POST", CMS).json(&configmap("a/b")).expect(422, "Invalid"),
        case("a service name longer than a DNS label", "POST", SVCS)
            .json(&json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s".repeat(64)}, "spec": {"ports": [{"port": 80}]}}))
            .expect(422, "Invalid"),
        case("no name and no generateName", "POST", CMS)
            .json(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}))
            .expect(422, "Invalid"),
        case("an invalid namespace name", "POST", "/api/v1/namespaces")
            .json(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "Bad_NS"}}))
            .expect(422, "Invalid"),
        case("an update renaming the object", "PUT", TARGET)
            .json(&with(&|v| v["metadata"]["name"] = json!("renamed")))
            .expect(400, "BadRequest"),
        case("an update without a name", "PUT", TARGET)
            .json(&with(&|v| {
                v["metadata"].as_object_mut().unwrap().remove("name");
            }))
            .expect(400, "BadRequest"),
        // --- Namespaces.
        case("a namespace mismatch on create", "POST", CMS)
            .json(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "other"}}))
            .expect(400, "BadRequest"),
        case("a namespace mismatch on update", "PUT", TARGET)
            .json(&with(&|v| v["metadata"]["namespace"] = json!("other")))
            .expect(400, "BadRequest"),
        case("creating in a missing namespace", "POST", "/api/v1/namespaces/nope/configmaps")
            .json(&configmap("x"))
            .expect(404, "NotFound"),
        case("deleting the default namespace", "DELETE", "/api/v1/namespaces/default")
            .expect(403, "Forbidden"),
        // --- Size.
        case("a body over 3 MiB", "POST", CMS)
            .json(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"}, "data": {"a": big}}))
            .expect(413, "RequestEntityTooLarge"),
        // --- Field validation.
        case("an unknown field with fieldValidation=Strict", "POST", format!("{DEPS}?fieldValidation=Strict"))
            .json(&strict_unknown)
            .expect(400, "BadRequest")
            .message(r#"unknown field "spec.bogus""#),
        case("an unknown top-level field with Strict", "POST", format!("{CMS}?fieldValidation=Strict"))
            .json(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "bogus": 1}))
            .expect(400, "BadRequest")
            .message(r#"unknown field "bogus""#),
        case("a duplicate field with Strict", "POST", format!("{CMS}?fieldValidation=Strict"))
            .raw(JSON, r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"dup","name":"dup2"},"data":{}}"#)
            .expect(400, "BadRequest")
            .message(r#"duplicate field "metadata.name""#),
        case("an unknown field in an update with Strict", "PUT", format!("{TARGET}?fieldValidation=Strict"))
            .json(&with(&|v| v["bogus"] = json!(1)))
            .expect(400, "BadRequest")
            .message(r#"unknown field "bogus""#),
        case("an unknown field in a merge patch with Strict", "PATCH", format!("{TARGET}?fieldValidation=Strict"))
            .patch(MERGE, &json!({"bogus": 1}))
            .expect(422, "Invalid")
            .message(r#"unknown field "bogus""#),
        // Upstream rejects apply configurations with fields outside the schema ("failed to
        // create typed patch object ... field not declared in schema", as a 500 for want of
        // mapping that error); a client error is the sane answer.
        case("an unknown field in an apply patch", "PATCH", format!("{WEB}?fieldManager=x"))
            .patch(APPLY, &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"bogus": 1}}))
            .expect(400, "BadRequest")
            .expect(422, "Invalid"),
        case("an unsupported fieldValidation value", "POST", format!("{CMS}?fieldValidation=Bogus"))
            .json(&configmap("x"))
            .expect(422, "Invalid"),
        // --- Wrong types.
        case("a string for an integer", "POST", DEPS)
            .json(&{
                let mut d = deployment("typed");
                d["spec"]["replicas"] = json!("three");
                d
            })
            .expect(400, "BadRequest"),
        case("a number for a string", "POST", CMS)
            .json(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": 1}}))
            .expect(400, "BadRequest"),
        case("a string for a map in an update", "PUT", TARGET)
            .json(&with(&|v| v["data"] = json!("not a map")))
            .expect(400, "BadRequest"),
        case("a string for an integer in a merge patch", "PATCH", WEB)
            .patch(MERGE, &json!({"spec": {"replicas": "three"}}))
            .expect(422, "Invalid"),
        // --- Selectors.
        case("label selector `a in (`", "GET", format!("{CMS}?labelSelector={}", enc("a in (")))
            .expect(400, "BadRequest"),
        case("label selector `!`", "GET", format!("{CMS}?labelSelector={}", enc("!")))
            .expect(400, "BadRequest"),
        case("label selector `a==b==c`", "GET", format!("{CMS}?labelSelector={}", enc("a==b==c")))
            .expect(400, "BadRequest"),
        case("a bad label selector on watch", "GET", format!("{CMS}?watch=true&labelSelector={}", enc("a in (")))
            .expect(400, "BadRequest"),
        case("a bad label selector on deletecollection", "DELETE", format!("{CMS}?labelSelector={}", enc("a in (")))
            .expect(400, "BadRequest"),
        case("a field selector on an unsupported field", "GET", format!("{CMS}?fieldSelector={}", enc("spec.bogus=1")))
            .expect(400, "BadRequest"),
        case("an unsupported field selector on watch", "GET", format!("{CMS}?watch=true&fieldSelector={}", enc("data.a=1")))
            .expect(400, "BadRequest"),
        case("an unsupported field selector on deletecollection", "DELETE", format!("{CMS}?fieldSelector={}", enc("data.a=1")))
            .expect(400, "BadRequest"),
        case("a field selector without an operator", "GET", format!("{CMS}?fieldSelector={}", enc("metadata.name")))
            .expect(400, "BadRequest"),
        // --- resourceVersion, resourceVersionMatch, continue.
        case("resourceVersion=abc on get", "GET", format!("{TARGET}?resourceVersion=abc")).expect(400, "BadRequest"),
        case("resourceVersion=-1 on get", "GET", format!("{TARGET}?resourceVersion=-1")).expect(400, "BadRequest"),
        case("resourceVersion=abc on list", "GET", format!("{CMS}?resourceVersion=abc")).expect(400, "BadRequest"),
        case("resourceVersion=-1 on list", "GET", format!("{CMS}?resourceVersion=-1")).expect(400, "BadRequest"),
        case("resourceVersion=abc on watch", "GET", format!("{CMS}?watch=true&resourceVersion=abc")).expect(400, "BadRequest"),
        case("resourceVersion=-1 on watch", "GET", format!("{CMS}?watch=true&resourceVersion=-1")).expect(400, "BadRequest"),
        case("resourceVersionMatch without resourceVersion", "GET", format!("{CMS}?resourceVersionMatch=NotOlderThan"))
            .expect(422, "Invalid"),
        case("an unknown resourceVersionMatch", "GET", format!("{CMS}?resourceVersion=1&resourceVersionMatch=Bogus"))
            .expect(422, "Invalid"),
        case("resourceVersionMatch=Exact with resourceVersion 0", "GET", format!("{CMS}?resourceVersion=0&resourceVersionMatch=Exact"))
            .expect(422, "Invalid"),
        case("sendInitialEvents on a list", "GET", format!("{CMS}?sendInitialEvents=true"))
            .expect(422, "Invalid"),
        case("sendInitialEvents on a watch without resourceVersionMatch", "GET", format!("{CMS}?watch=true&sendInitialEvents=true&allowWatchBookmarks=true"))
            .expect(422, "Invalid"),
        case("a continue token that is not base64", "GET", format!("{CMS}?limit=1&continue=garbage!"))
            .expect(400, "BadRequest"),
        case("a continue token that is not JSON", "GET", format!("{CMS}?limit=1&continue={}", base64::engine::general_purpose::URL_SAFE.encode("{not json")))
            .expect(400, "BadRequest"),
        case("continue with a resourceVersion", "GET", format!("{CMS}?limit=1&resourceVersion=5&continue={}", enc(&token(5, "bad/target"))))
            .expect(400, "BadRequest"),
        case("limit that is not a number", "GET", format!("{CMS}?limit=ten")).expect(400, "BadRequest"),
        // --- Patches.
        case("a JSON patch that is not an array", "PATCH", TARGET)
            .patch(JSON_PATCH, &json!({"op": "add", "path": "/data/b", "value": "2"}))
            .expect(400, "BadRequest"),
        case("a JSON patch with an unknown op", "PATCH", TARGET)
            .patch(JSON_PATCH, &json!([{"op": "frobnicate", "path": "/data/a", "value": "2"}]))
            .expect(422, "Invalid"),
        case("a JSON patch op without a path", "PATCH", TARGET)
            .patch(JSON_PATCH, &json!([{"op": "add", "value": "2"}]))
            .expect(422, "Invalid"),
        case("a JSON patch test that fails", "PATCH", TARGET)
            .patch(JSON_PATCH, &json!([{"op": "test", "path": "/data/a", "value": "wrong"}, {"op": "replace", "path": "/data/a", "value": "2"}]))
            .expect(422, "Invalid"),
        case("a JSON patch renaming the object", "PATCH", TARGET)
            .patch(JSON_PATCH, &json!([{"op": "replace", "path": "/metadata/name", "value": "other"}]))
            .expect(400, "BadRequest"),
        case("a merge patch that is not JSON", "PATCH", TARGET).raw(MERGE, "{bad").expect(400, "BadRequest"),
        case("an empty merge patch body", "PATCH", TARGET).raw(MERGE, "").expect(400, "BadRequest"),
        case("a merge patch with a stale resourceVersion", "PATCH", TARGET)
            .patch(MERGE, &json!({"metadata": {"resourceVersion": "1"}, "data": {"a": "2"}}))
            .expect(409, "Conflict"),
        // Upstream answers 500 here (strategicpatch's ErrBadPatchType is not mapped); a
        // client error is what a well-behaved server returns.
        case("a strategic merge patch with an invalid $patch", "PATCH", WEB)
            .patch(SMP, &json!({"spec": {"template": {"spec": {"containers": [{"name": "main", "$patch": "frobnicate"}]}}}}))
            .expect(400, "BadRequest")
            .expect(422, "Invalid"),
        case("a strategic merge patch with an invalid $patch on a map", "PATCH", WEB)
            .patch(SMP, &json!({"spec": {"$patch": "frobnicate"}}))
            .expect(400, "BadRequest")
            .expect(422, "Invalid"),
        case("an unsupported patch content type", "PATCH", TARGET)
            .raw("text/plain", r#"{"data":{"a":"2"}}"#)
            .expect(415, "UnsupportedMediaType"),
        case("application/json as a patch type", "PATCH", TARGET)
            .raw(JSON, r#"{"data":{"a":"2"}}"#)
            .expect(415, "UnsupportedMediaType"),
        case("an apply patch without fieldManager", "PATCH", TARGET)
            .patch(APPLY, &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "target"}, "data": {"a": "2"}}))
            .expect(422, "Invalid"),
        case("force on a merge patch", "PATCH", format!("{TARGET}?force=true"))
            .patch(MERGE, &json!({"data": {"a": "2"}}))
            .expect(422, "Invalid"),
        case("an apply patch that is not YAML", "PATCH", format!("{TARGET}?fieldManager=x"))
            .raw(APPLY, "data: [unclosed\n")
            .expect(400, "BadRequest"),
        case("a fieldManager longer than 128 characters", "PATCH", format!("{TARGET}?fieldManager={}", "m".repeat(129)))
            .patch(MERGE, &json!({"data": {"a": "2"}}))
            .expect(422, "Invalid"),
        // --- Media types.
        case("text/plain on create", "POST", CMS)
            .raw("text/plain", serde_json::to_vec(&configmap("x")).unwrap())
            .expect(415, "UnsupportedMediaType"),
        case("a patch media type on create", "POST", CMS)
            .raw(MERGE, serde_json::to_vec(&configmap("x")).unwrap())
            .expect(415, "UnsupportedMediaType"),
        case("a patch media type on update", "PUT", TARGET)
            .raw(MERGE, serde_json::to_vec(&target).unwrap())
            .expect(415, "UnsupportedMediaType"),
        case("an Accept the server cannot produce", "GET", TARGET)
            .header("accept", "text/html")
            .expect(406, "NotAcceptable"),
        // --- Routes and methods.
        case("POST to an item URL", "POST", TARGET).json(&configmap("target")).expect(405, "MethodNotAllowed"),
        case("PUT to a collection URL", "PUT", CMS).json(&configmap("x")).expect(405, "MethodNotAllowed"),
        case("PATCH to a collection URL", "PATCH", CMS).patch(MERGE, &json!({})).expect(405, "MethodNotAllowed"),
        case("an unknown resource", "GET", "/api/v1/namespaces/bad/widgets").expect(404, "NotFound"),
        case("an unknown group", "GET", "/apis/widgets.example.com/v1/widgets").expect(404, "NotFound"),
        case("an unknown version", "GET", "/apis/apps/v9/deployments").expect(404, "NotFound"),
        case("an unknown subresource", "GET", format!("{TARGET}/bogus")).expect(404, "NotFound"),
        case("a missing object", "GET", format!("{CMS}/missing")).expect(404, "NotFound"),
        case("an update of a missing object", "PUT", format!("{CMS}/missing"))
            .json(&configmap("missing"))
            .expect(404, "NotFound"),
        // An encoded slash may not reach another object or a subresource: upstream decodes
        // the path (404: no such route); refusing the name outright is as good.
        case("an encoded slash deleting another path", "DELETE", format!("{CMS}/target%2Fx"))
            .expect(404, "NotFound")
            .expect(400, "BadRequest"),
        case("an encoded slash reaching a subresource", "PUT", format!("{PODS}/p%2Fstatus"))
            .json(&{
                let mut p = target_pod.clone();
                p["status"]["phase"] = json!("Failed");
                p
            })
            .expect(404, "NotFound")
            .expect(400, "BadRequest"),
        case("an encoded ..", "GET", format!("{CMS}/%2E%2E"))
            .expect(404, "NotFound")
            .expect(400, "BadRequest"),
        // --- Nesting.
        case("100k nested arrays", "POST", CMS).raw(JSON, deep_array.clone()).expect(400, "BadRequest"),
        case("100k nested objects", "POST", CMS).raw(JSON, deep_object).expect(400, "BadRequest"),
        case("100k nested YAML flow sequences", "POST", CMS).raw(YAML, deep_array).expect(400, "BadRequest"),
        case("a merge patch nested 10k levels", "PATCH", TARGET).raw(MERGE, deep_patch.clone()).expect(400, "BadRequest"),
        case("a strategic merge patch nested 10k levels", "PATCH", WEB).raw(SMP, deep_patch.clone()).expect(400, "BadRequest"),
        case("a JSON patch value nested 10k levels", "PATCH", TARGET).raw(JSON_PATCH, deep_json_patch).expect(400, "BadRequest"),
        case("an apply patch nested 10k levels", "PATCH", format!("{TARGET}?fieldManager=x")).raw(APPLY, deep_patch).expect(400, "BadRequest"),
        // --- Deletion.
        case("gracePeriodSeconds=abc", "DELETE", format!("{PODS}/p?gracePeriodSeconds=abc")).expect(400, "BadRequest"),
        case("gracePeriodSeconds as a string in DeleteOptions", "DELETE", format!("{PODS}/p"))
            .json(&json!({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": "abc"}))
            .expect(400, "BadRequest"),
        case("DeleteOptions with a wrong uid precondition", "DELETE", TARGET)
            .json(&json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": "00000000-0000-0000-0000-000000000000"}}))
            .expect(409, "Conflict"),
        case("DeleteOptions with a stale resourceVersion precondition", "DELETE", TARGET)
            .json(&json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"resourceVersion": "1"}}))
            .expect(409, "Conflict"),
        case("an unknown propagationPolicy", "DELETE", format!("{TARGET}?propagationPolicy=Bogus")).expect(422, "Invalid"),
        case("orphanDependents and propagationPolicy together", "DELETE", TARGET)
            .json(&json!({"kind": "DeleteOptions", "apiVersion": "v1", "orphanDependents": true, "propagationPolicy": "Background"}))
            .expect(422, "Invalid"),
        case("malformed DeleteOptions", "DELETE", TARGET).raw(JSON, "{nope").expect(400, "BadRequest"),
        case("deleting a missing object", "DELETE", format!("{CMS}/missing")).expect(404, "NotFound"),
        case("an unsupported dryRun value", "POST", format!("{CMS}?dryRun=Bogus"))
            .json(&configmap("x"))
            .expect(422, "Invalid"),
        // --- Updates.
        case("an update with a stale resourceVersion", "PUT", TARGET)
            .json(&with(&|v| {
                v["metadata"]["resourceVersion"] = json!("1");
                v["data"]["a"] = json!("2");
            }))
            .expect(409, "Conflict"),
        case("an update with another uid", "PUT", TARGET)
            .json(&with(&|v| {
                v["metadata"]["uid"] = json!("00000000-0000-0000-0000-000000000000");
                v["metadata"].as_object_mut().unwrap().remove("resourceVersion");
                v["data"]["a"] = json!("2");
            }))
            .expect(409, "Conflict"),
        case("a deployment update with a negative replica count", "PUT", WEB)
            .json(&{
                let mut d = web.clone();
                d["spec"]["replicas"] = json!(-1);
                d
            })
            .expect(422, "Invalid"),
        // --- Binding.
        case("binding a bound pod", "POST", format!("{PODS}/p/binding"))
            .json(&json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"}, "target": {"kind": "Node", "name": "node-b"}}))
            .expect(409, "Conflict"),
        case("a binding without a target node", "POST", format!("{PODS}/q/binding"))
            .json(&json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "q"}, "target": {}}))
            .expect(422, "Invalid"),
        // --- Credentials.
        case("a bearer token", "GET", CMS).by(Who::Token).expect(401, "Unauthorized"),
        case("a bearer token on /version", "GET", "/version").by(Who::Token).expect(401, "Unauthorized"),
        case("a bearer token writing", "POST", CMS).by(Who::Token).json(&configmap("x")).expect(401, "Unauthorized"),
        case("a non-admin user reading", "GET", CMS).by(Who::User).expect(403, "Forbidden"),
        case("a non-admin user writing", "POST", CMS).by(Who::User).json(&configmap("x")).expect(403, "Forbidden"),
        case("a non-admin user deleting", "DELETE", TARGET).by(Who::User).expect(403, "Forbidden"),
        case("a non-admin user on /healthz", "GET", "/healthz").by(Who::User).expect(200, ""),
        case("a non-admin user on /version", "GET", "/version").by(Who::User).expect(200, ""),
        case("a non-admin user on /readyz", "GET", "/readyz").by(Who::User).expect(200, ""),
        // Upstream's default (--anonymous-auth=true) answers 403; with anonymous requests
        // disabled it is 401.
        case("no credentials", "GET", CMS).by(Who::Anonymous).expect(403, "Forbidden").expect(401, "Unauthorized"),
        case("no credentials writing", "POST", CMS)
            .by(Who::Anonymous)
            .json(&configmap("x"))
            .expect(403, "Forbidden")
            .expect(401, "Unauthorized"),
        case("no credentials on /healthz", "GET", "/healthz").by(Who::Anonymous).expect(200, ""),
        case("no credentials on /version", "GET", "/version").by(Who::Anonymous).expect(200, ""),
    ];
    run(&mut c, &clients, cases).await;

    // The objects the cases aimed at are as they were.
    let now = get(&clients.admin, TARGET).await.1;
    assert_eq!(now["data"], json!({"a": "1"}));
    assert_eq!(
        now["metadata"]["resourceVersion"],
        target["metadata"]["resourceVersion"]
    );
    let now = get(&clients.admin, &format!("{PODS}/p")).await.1;
    assert_eq!(
        now["metadata"]["resourceVersion"],
        target_pod["metadata"]["resourceVersion"]
    );
    assert!(c.server.is_running());
}

// ---------------------------------------------------------------------------------------
// Field validation that succeeds
// ---------------------------------------------------------------------------------------

fn warnings(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::WARNING)
        .iter()
        .map(|v| v.to_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn unknown_fields_with_warn_and_ignore() {
    let c = Cluster::start(Backend::Embedded);
    let client = client_for(c.kubeconfig()).await;
    let with_bogus = |name: &str| {
        let mut d = deployment(name);
        d["spec"]["bogus"] = json!(true);
        serde_json::to_vec(&d).unwrap()
    };
    let json_ct = [("content-type", JSON.to_string())];
    let deps = "/apis/apps/v1/namespaces/default/deployments";

    // Warn (also the default): created, a Warning header names the field, not stored.
    for (name, query) in [("warn", "?fieldValidation=Warn"), ("default", "")] {
        let (status, headers, body) = send(
            &client,
            "POST",
            &format!("{deps}{query}"),
            &json_ct,
            with_bogus(name),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let warned = warnings(&headers);
        assert!(
            warned
                .iter()
                .any(|w| w.starts_with("299 ") && w.contains(r#"unknown field \"spec.bogus\""#)),
            "{query:?}: a Warning header must name the field: {warned:?}"
        );
        assert!(body["spec"].get("bogus").is_none(), "{body}");
        let (_, stored) = get(&client, &format!("{deps}/{name}")).await;
        assert!(
            stored["spec"].get("bogus").is_none(),
            "unknown fields are not stored: {stored}"
        );
    }
    // Ignore: created, no warning.
    let (status, headers, body) = send(
        &client,
        "POST",
        &format!("{deps}?fieldValidation=Ignore"),
        &json_ct,
        with_bogus("ignore"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert!(warnings(&headers).is_empty(), "{:?}", warnings(&headers));
    assert!(body["spec"].get("bogus").is_none(), "{body}");
    // Strict without problems is fine.
    let (status, _, body) = send(
        &client,
        "POST",
        &format!("{deps}?fieldValidation=Strict"),
        &json_ct,
        serde_json::to_vec(&deployment("strict")).unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // A duplicate field with Warn: the last value wins, with a warning.
    let (status, headers, body) = send(
        &client,
        "POST",
        "/api/v1/namespaces/default/configmaps?fieldValidation=Warn",
        &json_ct,
        br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"dup"},"data":{"a":"1","a":"2"}}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"]["a"], "2");
    assert!(
        warnings(&headers)
            .iter()
            .any(|w| w.contains(r#"duplicate field \"data.a\""#)),
        "{:?}",
        warnings(&headers)
    );
    // Updates and patches warn too.
    let (_, mut current) = get(&client, &format!("{deps}/warn")).await;
    current["spec"]["bogus"] = json!(1);
    let (status, headers, body) = send(
        &client,
        "PUT",
        &format!("{deps}/warn?fieldValidation=Warn"),
        &json_ct,
        serde_json::to_vec(&current).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        warnings(&headers)
            .iter()
            .any(|w| w.contains(r#"unknown field \"spec.bogus\""#)),
        "{:?}",
        warnings(&headers)
    );
    let (status, headers, body) = send(
        &client,
        "PATCH",
        &format!("{deps}/warn?fieldValidation=Warn"),
        &[("content-type", MERGE.to_string())],
        br#"{"spec":{"bogus":2,"replicas":2}}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["spec"]["replicas"], 2);
    assert!(
        warnings(&headers)
            .iter()
            .any(|w| w.contains(r#"unknown field \"spec.bogus\""#)),
        "{:?}",
        warnings(&headers)
    );
}

// ---------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn lowered_request_body_limit() {
    let mut c = Cluster::start_with(Backend::Embedded, &["--max-request-body-bytes", "1000"]);
    let client = client_for(c.kubeconfig()).await;
    let cms = "/api/v1/namespaces/default/configmaps";
    let big = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"}, "data": {"a": "x".repeat(2048)}});
    let small = configmap("small");
    let json_ct = [("content-type", JSON.to_string())];
    let (status, _, body) = send(
        &client,
        "POST",
        cms,
        &json_ct,
        serde_json::to_vec(&big).unwrap(),
    )
    .await;
    assert_eq!(
        (status, reason_of(&body)),
        (413, "RequestEntityTooLarge"),
        "{body}"
    );
    let (status, _, body) = send(
        &client,
        "POST",
        cms,
        &json_ct,
        serde_json::to_vec(&small).unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, _, body) = send(
        &client,
        "PUT",
        &format!("{cms}/small"),
        &json_ct,
        serde_json::to_vec(&{
            let mut b = big.clone();
            b["metadata"]["name"] = json!("small");
            b
        })
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, reason_of(&body)),
        (413, "RequestEntityTooLarge"),
        "{body}"
    );
    let (status, _, body) = send(
        &client,
        "PATCH",
        &format!("{cms}/small"),
        &[("content-type", MERGE.to_string())],
        serde_json::to_vec(&json!({"data": {"a": "y".repeat(2048)}})).unwrap(),
    )
    .await;
    assert_eq!(
        (status, reason_of(&body)),
        (413, "RequestEntityTooLarge"),
        "{body}"
    );
    let (_, stored) = get(&client, &format!("{cms}/small")).await;
    assert_eq!(stored["data"]["a"], "1");
    assert_eq!(get(&client, "/readyz").await.0, 200);
    assert!(c.server.is_running());
}

#[tokio::test]
async fn too_many_requests_in_flight() {
    let mut c = Cluster::start_with(Backend::Embedded, &["--max-requests-inflight", "1"]);
    let client = client_for(c.kubeconfig()).await;
    let cms = "/api/v1/namespaces/default/configmaps";
    let list = get_through_429(&client, cms).await;
    let now: i64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // A read of a revision the store has not reached waits (for the watch cache to catch
    // up) and holds its slot meanwhile.
    let slow_path = format!("{cms}?resourceVersion={}", now + 1_000_000);
    // Separate clients (connection pools), so that the requests really are concurrent.
    let slow_client = client_for(c.kubeconfig()).await;
    let mut others = Vec::new();
    for _ in 0..8 {
        others.push(client_for(c.kubeconfig()).await);
    }
    let spawn_slow = || {
        let client = slow_client.clone();
        let path = slow_path.clone();
        tokio::spawn(async move { get(&client, &path).await })
    };
    let mut slow = spawn_slow();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refused = None;
    let mut answers = Vec::new();
    while refused.is_none() {
        assert!(
            Instant::now() < deadline,
            "no request was refused with 429: {answers:?}"
        );
        let batch = futures::future::join_all(
            others
                .iter()
                .map(|other| try_send(other, "GET", cms, &[], Vec::new())),
        )
        .await;
        for answer in batch {
            let (status, headers, body) = answer.expect("transport");
            answers.push(status);
            if status == 429 {
                refused = Some((headers, body));
            }
        }
        if refused.is_none() && slow.is_finished() {
            slow = spawn_slow();
        }
    }
    let (headers, body) = refused.unwrap();
    assert_eq!(reason_of(&body), "TooManyRequests", "{body}");
    let retry = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        retry.is_some_and(|s| s >= 1),
        "a 429 carries Retry-After: {headers:?}"
    );
    // Writes have their own budget.
    let (status, body) = post(&client, cms, &configmap("written")).await;
    assert_eq!(status, 201, "{body}");
    // The slow read (unless it was itself refused) ends with upstream's answer to a
    // revision from the future; alone, it certainly does.
    let (status, body) = slow.await.unwrap();
    assert!(
        matches!(
            (status, reason_of(&body)),
            (504, "Timeout") | (429, "TooManyRequests")
        ),
        "{status}: {body}"
    );
    let (status, body) = spawn_slow().await.unwrap();
    assert_eq!((status, reason_of(&body)), (504, "Timeout"), "{body}");
    // Afterwards reads are served again.
    get_through_429(&client, cms).await;
    assert!(c.server.is_running());
}

/// With one slot in flight, the server's own controllers (their lists at start-up) can
/// take the slot a test's request wanted; a real client retries after a 429, so does this.
async fn get_through_429(client: &Client, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(client, path).await;
        if status == 200 {
            return body;
        }
        assert!(
            status == 429 && Instant::now() < deadline,
            "GET {path}: {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
