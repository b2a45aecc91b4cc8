//! Service-account tokens through a real `canopy server`: TokenRequest
//! (`serviceaccounts/<name>/token`, what `kubectl create token` and the kubelet use), its
//! validation, who may ask for which token (a node only for the pods bound to it, a tenant
//! only in its namespaces), and what a token authenticates as and for how long (until its
//! pod or service account goes, only for the API's audience).

mod common;

use common::{Backend, Cluster, client_for, raw, token_client};
use serde_json::{Value, json};

async fn create(client: &kube::Client, path: &str, body: Value) -> (u16, Value) {
    let (code, _, value) = raw(
        client,
        "POST",
        path,
        Some("application/json"),
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    (code, value)
}

async fn token_request(client: &kube::Client, account: &str, spec: Value) -> (u16, Value) {
    create(
        client,
        &format!("/api/v1/namespaces/app/serviceaccounts/{account}/token"),
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}),
    )
    .await
}

fn bound_to(pod: &str) -> Value {
    json!({"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod}})
}

/// What a token gets: (status of a discovery read, status and message of a pod list).
async fn use_token(cluster: &Cluster, token: &str) -> (u16, u16, String) {
    let client = token_client(cluster.kubeconfig(), token).await;
    let (discovery, _, _) = raw(&client, "GET", "/api", None, vec![]).await;
    let (list, _, body) = raw(&client, "GET", "/api/v1/namespaces/app/pods", None, vec![]).await;
    let message = body["message"].as_str().unwrap_or_default().to_string();
    (discovery, list, message)
}

/// Deletes an object (as admin) and waits until a token tied to it no longer authenticates.
async fn delete_then_refused(cluster: &Cluster, path: &str, token: &str) {
    let admin = cluster.client().await;
    let (code, _, _) = raw(&admin, "DELETE", path, None, vec![]).await;
    assert_eq!(code, 200, "DELETE {path}");
    common::wait_until(
        &format!("the token to stop authenticating after DELETE {path}"),
        std::time::Duration::from_secs(10),
        async || (use_token(cluster, token).await.1 == 401).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_issued_checked_and_bound_to_their_pod() {
    let cluster = Cluster::start(Backend::Embedded);
    let admin = cluster.client().await;
    assert_eq!(
        create(
            &admin,
            "/api/v1/namespaces",
            json!({"metadata": {"name": "app",
            "labels": {"canopy.io/tenant": "acme"}}})
        )
        .await
        .0,
        201
    );
    for account in ["robot", "other"] {
        let (code, body) = create(
            &admin,
            "/api/v1/namespaces/app/serviceaccounts",
            json!({"metadata": {"name": account}}),
        )
        .await;
        assert_eq!(code, 201, "{body}");
    }
    for node in ["n1", "n2"] {
        create(
            &admin,
            "/api/v1/nodes",
            json!({"metadata": {"name": node, "labels": {"canopy.io/tenant": "acme"}}}),
        )
        .await;
    }
    for (pod, node, account) in [
        ("p1", "n1", "robot"),
        ("p2", "n2", "robot"),
        ("p3", "n1", "other"),
    ] {
        let (code, body) = create(
            &admin,
            "/api/v1/namespaces/app/pods",
            json!({"metadata": {"name": pod}, "spec": {"nodeName": node,
                "serviceAccountName": account,
                "containers": [{"name": "c", "image": "busybox"}]}}),
        )
        .await;
        assert_eq!(code, 201, "{body}");
    }

    // Issued with upstream's shape and defaults.
    let (code, issued) = token_request(&admin, "robot", bound_to("p1")).await;
    assert_eq!(code, 201, "{issued}");
    assert_eq!(issued["kind"], "TokenRequest");
    assert_eq!(issued["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(issued["spec"]["expirationSeconds"], 3600);
    assert_eq!(
        issued["spec"]["audiences"],
        json!(["https://kubernetes.default.svc.cluster.local"])
    );
    assert!(issued["status"]["expirationTimestamp"].is_string());
    let pod_token = issued["status"]["token"].as_str().unwrap().to_string();
    assert_eq!(pod_token.split('.').count(), 3, "a JWT");
    // Upstream's claims: who, for what, bound to which pod on which node.
    use base64::Engine;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(pod_token.split('.').nth(1).unwrap())
        .unwrap();
    let claims: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(claims["sub"], "system:serviceaccount:app:robot");
    assert_eq!(
        claims["iss"],
        "https://kubernetes.default.svc.cluster.local"
    );
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3600
    );
    let k8s = &claims["kubernetes.io"];
    assert_eq!(k8s["namespace"], "app");
    assert_eq!(k8s["serviceaccount"]["name"], "robot");
    assert_eq!(k8s["pod"]["name"], "p1");
    assert_eq!(k8s["node"]["name"], "n1");
    for object in ["serviceaccount", "pod", "node"] {
        assert!(!k8s[object]["uid"].as_str().unwrap().is_empty(), "{claims}");
    }

    // It authenticates as the service account, which may learn the API and nothing more.
    let (discovery, list, message) = use_token(&cluster, &pod_token).await;
    assert_eq!(discovery, 200);
    assert_eq!(list, 403);
    assert!(
        message.contains("system:serviceaccount:app:robot"),
        "{message}"
    );
    // The token never reaches the log.
    assert!(!cluster.log().contains(&pod_token));

    // Bad requests, with upstream's answers.
    let (code, body) = token_request(&admin, "robot", json!({"expirationSeconds": 60})).await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("may not specify a duration less than 10 minutes")
    );
    assert_eq!(token_request(&admin, "missing", json!({})).await.0, 404);
    let (code, body) = token_request(&admin, "robot", bound_to("p3")).await;
    assert_eq!(code, 400, "a pod running as another account: {body}");
    let (code, _) = token_request(
        &admin,
        "robot",
        json!({"boundObjectRef": {"kind": "Pod", "name": "p1", "uid": "not-its-uid"}}),
    )
    .await;
    assert_eq!(code, 409);
    let (code, _) = token_request(
        &admin,
        "robot",
        json!({"boundObjectRef": {"kind": "Secret", "name": "s"}}),
    )
    .await;
    assert_eq!(code, 422);
    assert_eq!(
        token_request(&admin, "robot", bound_to("nope")).await.0,
        404
    );

    // A node gets tokens only for the pods bound to it.
    let n1 = client_for(&cluster.kubeconfig_file(
        "system:node:n1",
        &["system:nodes", "canopy:tenant:acme"],
        "n1.kubeconfig",
    ))
    .await;
    assert_eq!(token_request(&n1, "robot", bound_to("p1")).await.0, 201);
    assert_eq!(token_request(&n1, "robot", bound_to("p2")).await.0, 403);
    assert_eq!(token_request(&n1, "robot", json!({})).await.0, 403);

    // A tenant's member asks in its own namespaces only.
    let member = client_for(&cluster.user_kubeconfig("alice", Some("canopy:tenant:acme"))).await;
    let (code, unbound) = token_request(&member, "robot", json!({})).await;
    assert_eq!(code, 201, "{unbound}");
    let unbound_token = unbound["status"]["token"].as_str().unwrap().to_string();
    let stranger =
        client_for(&cluster.user_kubeconfig("mallory", Some("canopy:tenant:evil"))).await;
    assert_eq!(token_request(&stranger, "robot", json!({})).await.0, 403);

    // A token for another audience is no key to the API.
    let (code, vault) = token_request(&admin, "robot", json!({"audiences": ["vault"]})).await;
    assert_eq!(code, 201);
    let vault_token = vault["status"]["token"].as_str().unwrap();
    assert_eq!(use_token(&cluster, vault_token).await.1, 401);

    // `kubectl create token` speaks the same API.
    let printed =
        cluster.kubectl_ok(&["create", "token", "robot", "-n", "app", "--duration", "15m"]);
    assert_eq!(use_token(&cluster, printed.trim()).await.1, 403);

    // A pod's token ends with its pod; every token ends with its service account.
    delete_then_refused(
        &cluster,
        "/api/v1/namespaces/app/pods/p1?gracePeriodSeconds=0",
        &pod_token,
    )
    .await;
    assert_eq!(use_token(&cluster, &unbound_token).await.1, 403);
    delete_then_refused(
        &cluster,
        "/api/v1/namespaces/app/serviceaccounts/robot",
        &unbound_token,
    )
    .await;
    // A forged token (another key) is refused, not passed on.
    let mut forged = unbound_token.clone();
    forged.truncate(forged.rfind('.').unwrap() + 1);
    forged.push_str("AAAA");
    assert_eq!(use_token(&cluster, &forged).await.1, 401);
}
