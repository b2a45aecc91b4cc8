//! Tenants through the API: static bearer tokens, Tenant objects with kubectl, and quotas
//! enforced at pod admission.

mod common;

use std::time::Duration;

use common::{Backend, Cluster};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, PostParams};
use serde_json::json;

async fn token_client(cluster: &Cluster, token: &str) -> kube::Client {
    common::token_client(cluster.kubeconfig(), token).await
}

fn pod(name: &str, cpu: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "busybox",
            "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}}}]}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn static_tokens_tenants_and_quotas() {
    let tokens = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        tokens.path(),
        "carol-secret-token,carol,1001,\"canopy:tenant:acme\"\n",
    )
    .unwrap();
    let cluster = Cluster::start_with(
        Backend::Embedded,
        &["--token-auth-file", tokens.path().to_str().unwrap()],
    );
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: canopy.io/v1\nkind: Tenant\nmetadata:\n  name: acme\nspec:\n  projectId: acme\n  displayName: ACME\n  quota:\n    pods: 2\n    cpu: 1500m\n",
    );
    let table = cluster.kubectl_ok(&["get", "tenants"]);
    assert!(table.contains("ACME") && table.contains("0/2"), "{table}");
    let explained = cluster.kubectl_ok(&["explain", "tenant.spec.quota"]);
    assert!(explained.contains("pods"), "{explained}");
    // The default network was filled in.
    let cidr = cluster.kubectl_ok(&[
        "get",
        "tenant",
        "acme",
        "-o",
        "jsonpath={.spec.network.cidr}",
    ]);
    assert_eq!(cidr, "10.0.0.0/16");

    let carol = token_client(&cluster, "carol-secret-token").await;
    let namespaces: Api<Namespace> = Api::all(carol.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "acme-web"}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(carol.clone(), "acme-web");
    pods.create(&PostParams::default(), &pod("one", "1"))
        .await
        .unwrap();
    // Over the CPU quota.
    match pods.create(&PostParams::default(), &pod("big", "1")).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403);
            assert!(
                status.message.contains("exceeded quota"),
                "{}",
                status.message
            );
            assert!(status.message.contains("cpu"), "{}", status.message);
        }
        other => panic!("expected 403, got {other:?}"),
    }
    pods.create(&PostParams::default(), &pod("two", "250m"))
        .await
        .unwrap();
    // Over the pod count.
    match pods
        .create(&PostParams::default(), &pod("three", "10m"))
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403);
            assert!(status.message.contains("pods"), "{}", status.message);
        }
        other => panic!("expected 403, got {other:?}"),
    }
    // Deleting a pod frees its share.
    pods.delete(
        "one",
        &kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    pods.create(&PostParams::default(), &pod("three", "10m"))
        .await
        .unwrap();

    // The Tenant's status follows: its namespaces and what its pods use.
    let mut status = String::new();
    let settled = common::eventually(Duration::from_secs(20), || {
        status = cluster.kubectl_ok(&["get", "tenant", "acme", "-o", "jsonpath={.status}"]);
        let status: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
        status["namespaces"] == json!(["acme-web"])
            && status["usage"]["pods"] == 2
            && status["usage"]["cpu"] == "260m"
            && status["usage"]["vms"] == 0
    });
    assert!(settled, "tenant status: {status}");
    let table = cluster.kubectl_ok(&["get", "tenants"]);
    assert!(table.contains("2/2"), "{table}");

    // A wrong token is 401; the token never reaches the log.
    let stranger = token_client(&cluster, "wrong-token").await;
    match Api::<Namespace>::all(stranger)
        .list(&Default::default())
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 401),
        other => panic!("expected 401, got {other:?}"),
    }
    assert!(!cluster.log().contains("carol-secret-token"));
}
