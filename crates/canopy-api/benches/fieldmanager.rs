//! Field management on the write path: `FieldManager::update` runs on every create, update
//! and patch, `FieldManager::apply` on every server-side apply.
//!
//! Run with `cargo bench -p canopy-api --bench fieldmanager`. The update benchmarks clone
//! their input outside the timed part, since `update` writes the managed fields into the
//! object, and right before it: the server updates an object it has just decoded, defaulted
//! and validated, which is in the caches.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

use canopy_api::fieldmanager::FieldManager;
use canopy_api::{Registry, ResourceDef, kinds, meta};

// The API server's allocator: allocation is much of what these operations cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const T0: &str = "2024-05-01T10:00:00Z";
const T1: &str = "2024-05-01T10:01:00Z";
const T2: &str = "2024-05-01T10:02:00Z";

fn resource(registry: &Registry, group: &str, plural: &str) -> &'static ResourceDef {
    let version = "v1";
    match registry.get(group, version, plural) {
        Some(def) => def,
        None => panic!("{group}/{version} {plural} is not served"),
    }
}

fn manager<'a>(registry: &'a Registry, def: &ResourceDef) -> FieldManager<'a> {
    let schemas = registry.schemas();
    match schemas.definition(def.definition) {
        Some(node) => FieldManager::new(schemas, node),
        None => panic!("no schema for {}", def.kind),
    }
}

/// What the REST layer does to a new object before it records managed fields.
fn admitted(def: &ResourceDef, mut obj: Value) -> Value {
    meta::set_meta(
        &mut obj,
        "uid",
        json!("6f0c9a36-3c1e-4a8e-9d55-0b7f5c2a1e11"),
    );
    meta::set_meta(&mut obj, "creationTimestamp", json!(T0));
    if def.generation {
        meta::set_meta(&mut obj, "generation", json!(1));
    }
    kinds::prepare_create(def, &mut obj);
    kinds::apply_defaults(def, &mut obj);
    obj
}

/// The pod `canopy bench api` creates, as stored after defaulting and admission.
fn created_pod(def: &ResourceDef) -> Value {
    admitted(
        def,
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "bench-0", "namespace": "default",
                "labels": {"app": "bench", "shard": "3"}
            },
            "spec": {"containers": [{
                "name": "app",
                "image": "registry.local/bench/app:1.0",
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}
            }]}
        }),
    )
}

/// The configuration of the `web` Deployment, with the given image.
fn deployment_config(image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{
                    "name": "web",
                    "image": image,
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "env": [{"name": "MODE", "value": "production"}],
                    "resources": {
                        "requests": {"cpu": "250m", "memory": "128Mi"},
                        "limits": {"memory": "256Mi"}
                    }
                }]}
            }
        }
    })
}

/// A created Deployment whose status the controller has since written, so that it has two
/// managed fields entries.
fn tracked_deployment(fm: &FieldManager<'_>, def: &ResourceDef) -> Value {
    let mut created = admitted(def, deployment_config("registry.local/web:1.0"));
    fm.update(None, &mut created, "kubectl-create", "apps/v1", None, T0)
        .unwrap_or_else(|e| panic!("create: {e}"));
    let mut with_status = created.clone();
    with_status["metadata"]["annotations"] = json!({"deployment.kubernetes.io/revision": "1"});
    fm.update(
        Some(&created),
        &mut with_status,
        "kube-controller-manager",
        "apps/v1",
        None,
        T1,
    )
    .unwrap_or_else(|e| panic!("annotate: {e}"));
    let mut stored = with_status.clone();
    stored["status"] = json!({
        "observedGeneration": 1, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 3,
        "availableReplicas": 3,
        "conditions": [{
            "type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
            "message": "Deployment has minimum availability.",
            "lastUpdateTime": T1, "lastTransitionTime": T1
        }]
    });
    fm.update(
        Some(&with_status),
        &mut stored,
        "kube-controller-manager",
        "apps/v1",
        Some("status"),
        T1,
    )
    .unwrap_or_else(|e| panic!("status: {e}"));
    stored
}

fn bench_update(c: &mut Criterion) {
    let registry = Registry::builtin();
    let pods = resource(&registry, "", "pods");
    let deployments = resource(&registry, "apps", "deployments");
    let pod_fm = manager(&registry, pods);
    let deploy_fm = manager(&registry, deployments);

    let pod = created_pod(pods);
    c.bench_function("update/create_pod", |b| {
        b.iter_batched(
            || pod.clone(),
            |mut new| pod_fm.update(None, &mut new, "kubectl-create", "v1", None, T0),
            BatchSize::PerIteration,
        )
    });

    let old = tracked_deployment(&deploy_fm, deployments);
    let mut relabelled = old.clone();
    relabelled["metadata"]["labels"]["tier"] = json!("frontend");
    c.bench_function("update/deployment_label", |b| {
        b.iter_batched(
            || relabelled.clone(),
            |mut new| deploy_fm.update(Some(&old), &mut new, "kubectl-label", "apps/v1", None, T2),
            BatchSize::PerIteration,
        )
    });

    let mut reimaged = old.clone();
    reimaged["spec"]["template"]["spec"]["containers"][0]["image"] =
        json!("registry.local/web:1.1");
    c.bench_function("update/deployment_image", |b| {
        b.iter_batched(
            || reimaged.clone(),
            |mut new| deploy_fm.update(Some(&old), &mut new, "kubectl-set", "apps/v1", None, T2),
            BatchSize::PerIteration,
        )
    });
}

fn bench_apply(c: &mut Criterion) {
    let registry = Registry::builtin();
    let deployments = resource(&registry, "apps", "deployments");
    let fm = manager(&registry, deployments);

    let first = deployment_config("registry.local/web:1.0");
    let mut current = match fm.apply(None, &first, "deployer", "apps/v1", None, false, T0) {
        Ok(obj) => admitted(deployments, obj),
        Err(e) => panic!("first apply: {e}"),
    };
    // The controller's status write, as on a live Deployment.
    let before = current.clone();
    current["status"] = json!({"observedGeneration": 1, "replicas": 3, "readyReplicas": 3});
    if let Err(e) = fm.update(
        Some(&before),
        &mut current,
        "kube-controller-manager",
        "apps/v1",
        Some("status"),
        T1,
    ) {
        panic!("status: {e}");
    }

    let next = deployment_config("registry.local/web:1.1");
    for config in [&first, &next] {
        if let Err(e) = fm.apply(
            Some(&current),
            config,
            "deployer",
            "apps/v1",
            None,
            false,
            T2,
        ) {
            panic!("apply: {e}");
        }
    }
    c.bench_function("apply/deployment_image", |b| {
        b.iter(|| {
            fm.apply(
                Some(&current),
                &next,
                "deployer",
                "apps/v1",
                None,
                false,
                T2,
            )
        })
    });
    c.bench_function("apply/deployment_unchanged", |b| {
        b.iter(|| {
            fm.apply(
                Some(&current),
                &first,
                "deployer",
                "apps/v1",
                None,
                false,
                T2,
            )
        })
    });
}

criterion_group!(benches, bench_update, bench_apply);
criterion_main!(benches);
