use std::sync::OnceLock;

use serde_json::{Value, json};

use super::*;
use crate::Registry;

const T0: &str = "2024-05-01T10:00:00Z";
const T1: &str = "2024-05-01T10:01:00Z";
const T2: &str = "2024-05-01T10:02:00Z";
const T3: &str = "2024-05-01T10:03:00Z";

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::builtin)
}

fn manager_for(definition: &str) -> FieldManager<'static> {
    let schemas = registry().schemas();
    let node = schemas.definition(definition).expect("served definition");
    FieldManager::new(schemas, node)
}

fn deployments() -> FieldManager<'static> {
    manager_for("io.k8s.api.apps.v1.Deployment")
}

fn entry<'v>(obj: &'v Value, manager: &str, operation: &str) -> Option<&'v Value> {
    obj["metadata"]["managedFields"]
        .as_array()?
        .iter()
        .find(|e| e["manager"] == manager && e["operation"] == operation)
}

fn fields<'v>(obj: &'v Value, manager: &str, operation: &str) -> &'v Value {
    &entry(obj, manager, operation)
        .unwrap_or_else(|| panic!("no {operation} entry of {manager}: {obj:#}"))["fieldsV1"]
}

/// What `kubectl create deployment nginx --image=nginx` stores, defaulted.
fn created_deployment() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "nginx", "namespace": "default", "uid": "u-1", "generation": 1,
            "creationTimestamp": T0, "labels": {"app": "nginx"}
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "nginx"}},
            "template": {
                "metadata": {"labels": {"app": "nginx"}},
                "spec": {
                    "containers": [{
                        "name": "nginx", "image": "nginx", "resources": {},
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File", "imagePullPolicy": "Always"
                    }],
                    "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
                    "dnsPolicy": "ClusterFirst", "securityContext": {},
                    "schedulerName": "default-scheduler"
                }
            },
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}
            },
            "revisionHistoryLimit": 10,
            "progressDeadlineSeconds": 600
        },
        "status": {}
    })
}

fn create(obj: Value, manager: &str) -> Value {
    let mut obj = obj;
    deployments()
        .update(None, &mut obj, manager, "apps/v1", None, T0)
        .expect("create");
    obj
}

/// An apply configuration of the `nginx` Deployment.
fn config(replicas: i64, containers: Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "nginx", "namespace": "default", "labels": {"app": "nginx"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "nginx"}},
            "template": {
                "metadata": {"labels": {"app": "nginx"}},
                "spec": {"containers": containers}
            }
        }
    })
}

fn apply(
    current: Option<&Value>,
    config: &Value,
    manager: &str,
    force: bool,
) -> Result<Value, ApplyError> {
    deployments().apply(current, config, manager, "apps/v1", None, force, T1)
}

/// The stored object after an apply: the REST layer gives applied objects a uid on create.
fn stored(mut obj: Value) -> Value {
    if meta::uid(&obj).is_empty() {
        meta::set_meta(&mut obj, "uid", json!("u-1"));
    }
    obj
}

fn conflicts(result: Result<Value, ApplyError>) -> Vec<(String, String)> {
    match result {
        Err(ApplyError::Conflicts(c)) => c.into_iter().map(|c| (c.describe(), c.field)).collect(),
        other => panic!("expected conflicts, got {other:?}"),
    }
}

fn containers(obj: &Value) -> Vec<(String, String)> {
    obj["spec"]["template"]["spec"]["containers"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|c| {
                    (
                        c["name"].as_str().unwrap_or("").to_string(),
                        c["image"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn created_deployment_fields_look_like_upstreams() {
    let obj = create(created_deployment(), "kubectl-create");
    let entries = obj["metadata"]["managedFields"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0],
        json!({
            "manager": "kubectl-create",
            "operation": "Update",
            "apiVersion": "apps/v1",
            "time": T0,
            "fieldsType": "FieldsV1",
            "fieldsV1": {
                "f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                "f:spec": {
                    "f:progressDeadlineSeconds": {},
                    "f:replicas": {},
                    "f:revisionHistoryLimit": {},
                    "f:selector": {},
                    "f:strategy": {
                        "f:rollingUpdate": {".": {}, "f:maxSurge": {}, "f:maxUnavailable": {}},
                        "f:type": {}
                    },
                    "f:template": {
                        "f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                        "f:spec": {
                            "f:containers": {
                                "k:{\"name\":\"nginx\"}": {
                                    ".": {},
                                    "f:image": {},
                                    "f:imagePullPolicy": {},
                                    "f:name": {},
                                    "f:resources": {},
                                    "f:terminationMessagePath": {},
                                    "f:terminationMessagePolicy": {}
                                }
                            },
                            "f:dnsPolicy": {},
                            "f:restartPolicy": {},
                            "f:schedulerName": {},
                            "f:securityContext": {},
                            "f:terminationGracePeriodSeconds": {}
                        }
                    }
                }
            }
        })
    );
}

#[test]
fn server_side_apply_creates_with_upstreams_fields() {
    let cfg = config(
        3,
        json!([{"name": "nginx", "image": "nginx:1.14.2", "ports": [{"containerPort": 80}]}]),
    );
    let obj = apply(None, &cfg, "kubectl", false).unwrap();
    assert_eq!(obj["spec"], cfg["spec"]);
    assert_eq!(
        entry(&obj, "kubectl", "Apply").unwrap(),
        &json!({
            "manager": "kubectl",
            "operation": "Apply",
            "apiVersion": "apps/v1",
            "time": T1,
            "fieldsType": "FieldsV1",
            "fieldsV1": {
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {
                    "f:replicas": {},
                    "f:selector": {},
                    "f:template": {
                        "f:metadata": {"f:labels": {"f:app": {}}},
                        "f:spec": {
                            "f:containers": {
                                "k:{\"name\":\"nginx\"}": {
                                    ".": {},
                                    "f:image": {},
                                    "f:name": {},
                                    "f:ports": {
                                        "k:{\"containerPort\":80,\"protocol\":\"TCP\"}": {
                                            ".": {},
                                            "f:containerPort": {}
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        })
    );
    assert_eq!(
        obj["metadata"]["managedFields"].as_array().unwrap().len(),
        1
    );
}

#[test]
fn apply_after_create_conflicts_on_changed_fields_only() {
    let live = create(created_deployment(), "kubectl-create");
    // The same values: ownership is shared, nothing conflicts.
    let same = config(1, json!([{"name": "nginx", "image": "nginx"}]));
    let shared = apply(Some(&live), &same, "kubectl", false).unwrap();
    assert_eq!(shared["spec"], live["spec"]);
    assert!(fields(&shared, "kubectl", "Apply")["f:spec"]["f:replicas"].is_object());
    assert!(fields(&shared, "kubectl-create", "Update")["f:spec"]["f:replicas"].is_object());
    // A no-op apply does not stamp a time.
    assert!(
        entry(&shared, "kubectl", "Apply")
            .unwrap()
            .get("time")
            .is_none()
    );

    let changed = config(1, json!([{"name": "nginx", "image": "nginx:1.25"}]));
    assert_eq!(
        conflicts(apply(Some(&shared), &changed, "kubectl", false)),
        vec![(
            "\"kubectl-create\" using apps/v1".to_string(),
            ".spec.template.spec.containers[name=\"nginx\"].image".to_string()
        )]
    );
    let forced = apply(Some(&shared), &changed, "kubectl", true).unwrap();
    assert_eq!(
        containers(&forced),
        vec![("nginx".into(), "nginx:1.25".into())]
    );
    let create_fields = fields(&forced, "kubectl-create", "Update");
    let item =
        &create_fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"nginx\"}"];
    assert!(item.get("f:image").is_none());
    assert!(item.get("f:imagePullPolicy").is_some());
    assert_eq!(entry(&forced, "kubectl", "Apply").unwrap()["time"], T1);
}

#[test]
fn a_field_dropped_from_the_configuration_disappears() {
    let mut first = config(3, json!([{"name": "nginx", "image": "nginx"}]));
    first["metadata"]["labels"]["tier"] = json!("web");
    first["spec"]["template"]["spec"]["hostname"] = json!("web-0");
    let live = stored(apply(None, &first, "mgr", false).unwrap());
    assert_eq!(live["spec"]["template"]["spec"]["hostname"], "web-0");

    let second = config(3, json!([{"name": "nginx", "image": "nginx"}]));
    let mut second = second;
    second["spec"].as_object_mut().unwrap().remove("replicas");
    let out = apply(Some(&live), &second, "mgr", false).unwrap();
    assert!(out["spec"]["template"]["spec"].get("hostname").is_none());
    assert!(out["spec"].get("replicas").is_none());
    assert_eq!(out["metadata"]["labels"], json!({"app": "nginx"}));
    assert_eq!(out["metadata"]["uid"], "u-1");
    assert_eq!(containers(&out), vec![("nginx".into(), "nginx".into())]);
    let set = fields(&out, "mgr", "Apply");
    assert!(set["f:spec"].get("f:replicas").is_none());
    assert!(set["f:metadata"]["f:labels"].get("f:tier").is_none());
}

#[test]
fn two_appliers_conflict_share_and_force() {
    let a = config(3, json!([{"name": "nginx", "image": "nginx"}]));
    let live = stored(apply(None, &a, "a", false).unwrap());

    let mut b = config(5, json!([]));
    b["spec"].as_object_mut().unwrap().remove("template");
    let found = conflicts(apply(Some(&live), &b, "b", false));
    assert_eq!(
        found,
        vec![("\"a\"".to_string(), ".spec.replicas".to_string())]
    );
    assert_eq!(
        conflict_error(&[Conflict {
            manager: "a".into(),
            operation: "Apply".into(),
            api_version: "apps/v1".into(),
            subresource: None,
            field: ".spec.replicas".into(),
        }])
        .message,
        "Apply failed with 1 conflict: conflict with \"a\": .spec.replicas"
    );

    // Agreeing on the value shares the field; then neither may change it alone.
    b["spec"]["replicas"] = json!(3);
    let live = apply(Some(&live), &b, "b", false).unwrap();
    let mut a4 = a.clone();
    a4["spec"]["replicas"] = json!(4);
    assert_eq!(
        conflicts(apply(Some(&live), &a4, "a", false)),
        vec![("\"b\"".to_string(), ".spec.replicas".to_string())]
    );

    // Forcing takes the field from every other manager.
    b["spec"]["replicas"] = json!(5);
    let live = apply(Some(&live), &b, "b", true).unwrap();
    assert_eq!(live["spec"]["replicas"], 5);
    assert!(
        fields(&live, "a", "Apply")["f:spec"]
            .get("f:replicas")
            .is_none()
    );
    assert_eq!(
        conflicts(apply(Some(&live), &a, "a", false)),
        vec![("\"b\"".to_string(), ".spec.replicas".to_string())]
    );
}

#[test]
fn scale_takes_replicas_and_the_next_apply_conflicts() {
    let cfg = config(3, json!([{"name": "nginx", "image": "nginx"}]));
    let live = stored(apply(None, &cfg, "kubectl", false).unwrap());
    let mut scaled = live.clone();
    scaled["spec"]["replicas"] = json!(5);
    deployments()
        .update(
            Some(&live),
            &mut scaled,
            "kubectl",
            "apps/v1",
            Some("scale"),
            T2,
        )
        .unwrap();
    let scale = entry(&scaled, "kubectl", "Update").unwrap();
    assert_eq!(scale["subresource"], "scale");
    assert_eq!(scale["fieldsV1"], json!({"f:spec": {"f:replicas": {}}}));
    assert!(
        fields(&scaled, "kubectl", "Apply")["f:spec"]
            .get("f:replicas")
            .is_none()
    );

    let result = apply(Some(&scaled), &cfg, "kubectl", false);
    let err = match &result {
        Err(ApplyError::Conflicts(c)) => conflict_error(c),
        other => panic!("expected a conflict, got {other:?}"),
    };
    assert_eq!(err.code, 409);
    assert_eq!(err.reason, "Conflict");
    assert_eq!(
        err.message,
        "Apply failed with 1 conflict: conflict with \"kubectl\" with subresource \"scale\" using apps/v1: .spec.replicas"
    );
    assert_eq!(err.causes[0].reason, "FieldManagerConflict");
    assert_eq!(err.causes[0].field, ".spec.replicas");
    assert_eq!(
        err.causes[0].message,
        "conflict with \"kubectl\" with subresource \"scale\" using apps/v1"
    );
    let status = err.to_status();
    assert_eq!(
        status["details"]["causes"][0]["reason"],
        "FieldManagerConflict"
    );
}

#[test]
fn list_map_items_have_their_own_owners() {
    let a = config(1, json!([{"name": "a", "image": "img-a"}]));
    let live = stored(apply(None, &a, "mgr-a", false).unwrap());
    let mut b = config(1, json!([{"name": "b", "image": "img-b"}]));
    b["spec"].as_object_mut().unwrap().remove("replicas");
    let live = apply(Some(&live), &b, "mgr-b", false).unwrap();
    assert_eq!(
        containers(&live),
        vec![("a".into(), "img-a".into()), ("b".into(), "img-b".into())]
    );
    let a_items =
        &fields(&live, "mgr-a", "Apply")["f:spec"]["f:template"]["f:spec"]["f:containers"];
    let b_items =
        &fields(&live, "mgr-b", "Apply")["f:spec"]["f:template"]["f:spec"]["f:containers"];
    assert_eq!(
        a_items.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["k:{\"name\":\"a\"}"]
    );
    assert_eq!(
        b_items.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["k:{\"name\":\"b\"}"]
    );

    // Each changes its own item freely; touching the other's is a conflict.
    let mut a2 = a.clone();
    a2["spec"]["template"]["spec"]["containers"][0]["image"] = json!("img-a2");
    let live = apply(Some(&live), &a2, "mgr-a", false).unwrap();
    assert_eq!(
        containers(&live),
        vec![("a".into(), "img-a2".into()), ("b".into(), "img-b".into())]
    );
    let mut a3 = a2.clone();
    a3["spec"]["template"]["spec"]["containers"] =
        json!([{"name": "a", "image": "img-a2"}, {"name": "b", "image": "other"}]);
    assert_eq!(
        conflicts(apply(Some(&live), &a3, "mgr-a", false)),
        vec![(
            "\"mgr-b\"".to_string(),
            ".spec.template.spec.containers[name=\"b\"].image".to_string()
        )]
    );
}

#[test]
fn a_dropped_item_stays_while_another_manager_owns_it() {
    let all = config(
        1,
        json!([
            {"name": "a", "image": "img-a"},
            {"name": "b", "image": "img-b"},
            {"name": "c", "image": "img-c"}
        ]),
    );
    let live = stored(apply(None, &all, "one", false).unwrap());
    let mut b = config(1, json!([{"name": "b", "image": "img-b"}]));
    b["spec"].as_object_mut().unwrap().remove("replicas");
    let live = apply(Some(&live), &b, "two", false).unwrap();

    let only_a = config(1, json!([{"name": "a", "image": "img-a"}]));
    let out = apply(Some(&live), &only_a, "one", false).unwrap();
    assert_eq!(
        containers(&out),
        vec![("a".into(), "img-a".into()), ("b".into(), "img-b".into())]
    );
    let one = &fields(&out, "one", "Apply")["f:spec"]["f:template"]["f:spec"]["f:containers"];
    assert!(one.get("k:{\"name\":\"b\"}").is_none());
    assert!(one.get("k:{\"name\":\"c\"}").is_none());
    let two = &fields(&out, "two", "Apply")["f:spec"]["f:template"]["f:spec"]["f:containers"];
    assert!(two["k:{\"name\":\"b\"}"]["f:image"].is_object());
}

#[test]
fn updates_move_ownership_and_forget_removed_fields() {
    let cfg = config(3, json!([{"name": "nginx", "image": "nginx"}]));
    let mut with_label = cfg.clone();
    with_label["metadata"]["labels"]["extra"] = json!("x");
    let live = stored(apply(None, &with_label, "applier", false).unwrap());

    let mut edited = live.clone();
    edited["spec"]["replicas"] = json!(7);
    edited["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("extra");
    deployments()
        .update(
            Some(&live),
            &mut edited,
            "kubectl-edit",
            "apps/v1",
            None,
            T2,
        )
        .unwrap();
    assert_eq!(
        fields(&edited, "kubectl-edit", "Update"),
        &json!({"f:spec": {"f:replicas": {}}})
    );
    assert_eq!(
        entry(&edited, "kubectl-edit", "Update").unwrap()["time"],
        T2
    );
    let applier = fields(&edited, "applier", "Apply");
    assert!(applier["f:spec"].get("f:replicas").is_none());
    assert!(applier["f:metadata"]["f:labels"].get("f:extra").is_none());
    assert_eq!(entry(&edited, "applier", "Apply").unwrap()["time"], T1);

    // A write that changes nothing leaves the entries, and their times, alone.
    let mut again = edited.clone();
    deployments()
        .update(
            Some(&edited),
            &mut again,
            "kubectl-edit",
            "apps/v1",
            None,
            T3,
        )
        .unwrap();
    assert_eq!(again, edited);
}

#[test]
fn clients_may_reset_managed_fields_but_not_through_subresources() {
    let live = create(created_deployment(), "kubectl-create");
    let mut reset = live.clone();
    reset["metadata"]["managedFields"] = json!([{}]);
    reset["spec"]["replicas"] = json!(2);
    deployments()
        .update(Some(&live), &mut reset, "kubectl", "apps/v1", None, T1)
        .unwrap();
    assert!(
        meta::metadata(&reset)
            .unwrap()
            .get("managedFields")
            .is_none()
    );
    // Untracked objects stay untracked until the next apply.
    let mut later = reset.clone();
    later["spec"]["replicas"] = json!(4);
    deployments()
        .update(Some(&reset), &mut later, "kubectl", "apps/v1", None, T2)
        .unwrap();
    assert!(
        meta::metadata(&later)
            .unwrap()
            .get("managedFields")
            .is_none()
    );

    // Through a subresource the request's managedFields are ignored.
    let mut status = live.clone();
    status["metadata"]["managedFields"] = json!([{}]);
    status["status"] = json!({"replicas": 1});
    deployments()
        .update(
            Some(&live),
            &mut status,
            "controller",
            "apps/v1",
            Some("status"),
            T1,
        )
        .unwrap();
    assert!(entry(&status, "kubectl-create", "Update").is_some());
    let controller = entry(&status, "controller", "Update").unwrap();
    assert_eq!(controller["subresource"], "status");
    assert_eq!(
        controller["fieldsV1"],
        json!({"f:status": {"f:replicas": {}}})
    );

    // A request's own valid entries replace the stored ones; invalid ones are ignored.
    let mut own = live.clone();
    own["metadata"]["managedFields"] = json!([{
        "manager": "someone", "operation": "Update", "apiVersion": "apps/v1",
        "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:paused": {}}}
    }]);
    deployments()
        .update(Some(&live), &mut own, "kubectl", "apps/v1", None, T1)
        .unwrap();
    assert!(entry(&own, "someone", "Update").is_some());
    assert!(entry(&own, "kubectl-create", "Update").is_none());
    let mut bad = live.clone();
    bad["metadata"]["managedFields"] =
        json!([{"manager": "x", "operation": "Apply", "fieldsType": ""}]);
    deployments()
        .update(Some(&live), &mut bad, "kubectl", "apps/v1", None, T1)
        .unwrap();
    assert_eq!(
        bad["metadata"]["managedFields"],
        live["metadata"]["managedFields"]
    );
}

#[test]
fn main_resource_writes_do_not_own_status() {
    let mut obj = created_deployment();
    obj["status"] = json!({"replicas": 3});
    let obj = create(obj, "creator");
    assert!(fields(&obj, "creator", "Update").get("f:status").is_none());
}

#[test]
fn the_first_apply_to_an_untracked_object_meets_its_fields() {
    let untracked = created_deployment();
    let cfg = config(3, json!([{"name": "nginx", "image": "nginx"}]));
    assert_eq!(
        conflicts(apply(Some(&untracked), &cfg, "kubectl", false)),
        vec![(
            "\"before-first-apply\" using apps/v1".to_string(),
            ".spec.replicas".to_string()
        )]
    );
    let forced = apply(Some(&untracked), &cfg, "kubectl", true).unwrap();
    assert!(entry(&forced, "before-first-apply", "Update").is_some());
    assert_eq!(forced["spec"]["replicas"], 3);
}

#[test]
fn kubectl_takes_over_from_client_side_apply() {
    let cfg = config(1, json!([{"name": "nginx", "image": "nginx"}]));
    let mut obj = created_deployment();
    obj["metadata"]["annotations"] = json!({LAST_APPLIED: go_json(&cfg) + "\n"});
    let live = create(obj, "kubectl-client-side-apply");

    let mut changed = config(1, json!([{"name": "nginx", "image": "nginx:2"}]));
    let out = apply(Some(&live), &changed, "kubectl", false).unwrap();
    assert_eq!(containers(&out), vec![("nginx".into(), "nginx:2".into())]);
    let annotation = out["metadata"]["annotations"][LAST_APPLIED]
        .as_str()
        .unwrap();
    assert_eq!(annotation, go_json(&changed) + "\n");
    // Another manager gets the conflict.
    changed["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:3");
    assert!(matches!(
        apply(Some(&live), &changed, "other", false),
        Err(ApplyError::Conflicts(_))
    ));
}

#[test]
fn invalid_configurations_are_refused() {
    let live = create(created_deployment(), "kubectl-create");
    let invalid = |cfg: Value| match apply(Some(&live), &cfg, "m", false) {
        Err(ApplyError::Invalid(msg)) => msg,
        other => panic!("expected invalid, got {other:?}"),
    };
    let mut with_fields = config(1, json!([]));
    with_fields["metadata"]["managedFields"] = json!([]);
    assert_eq!(invalid(with_fields), "metadata.managedFields must be nil");
    let mut wrong_kind = config(1, json!([]));
    wrong_kind["kind"] = json!("Pod");
    assert_eq!(
        invalid(wrong_kind),
        "invalid object type: apps/v1, Kind=Pod"
    );
    let mut no_name = config(1, json!([]));
    no_name["metadata"].as_object_mut().unwrap().remove("name");
    assert!(invalid(no_name).contains("metadata.name"));
    assert!(
        invalid(config(1, json!([{"name": "a"}, {"name": "a"}])))
            .ends_with(".spec.template.spec.containers: duplicate entries for key [name=\"a\"]")
    );
    assert_eq!(
        invalid(config(1, json!([{"image": "x"}]))),
        "failed to create typed patch object (default/nginx; apps/v1, Kind=Deployment): .spec.template.spec.containers: element 0: associative list with keys has an element that omits key field \"name\" (and doesn't have default value)"
    );
    let mut garbage = live.clone();
    garbage["metadata"]["managedFields"] = json!("nope");
    assert!(matches!(
        apply(Some(&garbage), &config(1, json!([])), "m", false),
        Err(ApplyError::Invalid(msg)) if msg.starts_with("failed to decode managed fields")
    ));
}

#[test]
fn odd_values_do_not_panic() {
    let live = create(created_deployment(), "kubectl-create");
    let mut deep = json!("bottom");
    for _ in 0..120 {
        deep = json!({ "x": deep });
    }
    let odd = [
        json!(5),
        json!(null),
        json!({"spec": 5}),
        json!({"replicas": "many", "template": []}),
        json!({"template": {"spec": {"containers": "nope"}}}),
        json!({"template": {"spec": {"containers": [null, 1, [], {"name": {"x": 1}}]}}}),
        json!({"template": {"metadata": {"finalizers": [{}, [], null]}}}),
        json!({"template": {"spec": {"unknown": deep}}}),
    ];
    for spec in odd {
        let mut cfg = config(1, json!([]));
        cfg["spec"] = spec.clone();
        let _ = apply(Some(&live), &cfg, "m", false);
        let _ = apply(None, &cfg, "m", true);
        let mut new = live.clone();
        new["spec"] = spec;
        let _ = deployments().update(Some(&live), &mut new, "m", "apps/v1", None, T1);
    }
    let mut weird_meta = config(1, json!([]));
    weird_meta["metadata"]["labels"] = json!([1, 2]);
    let _ = apply(Some(&live), &weird_meta, "m", false);
    let mut not_object = json!([1, 2, 3]);
    assert!(
        deployments()
            .update(Some(&live), &mut not_object, "m", "apps/v1", None, T1)
            .is_err()
    );
    for bad in [
        json!(null),
        json!("x"),
        json!([{"fieldsV1": 3}]),
        json!([{"operation": "Update", "apiVersion": "apps/v1", "fieldsType": "FieldsV1", "fieldsV1": {"k:{\"a\":": {}}}]),
    ] {
        let mut obj = live.clone();
        obj["metadata"]["managedFields"] = bad;
        let _ = apply(Some(&obj), &config(1, json!([])), "m", false);
        let mut new = obj.clone();
        let _ = deployments().update(Some(&obj), &mut new, "m", "apps/v1", None, T1);
    }
}

#[test]
fn pods_key_ports_by_port_and_protocol() {
    let pods = manager_for("io.k8s.api.core.v1.Pod");
    let cfg = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "i", "ports": [
            {"containerPort": 53, "protocol": "UDP"}, {"containerPort": 53}
        ]}]}
    });
    let obj = pods.apply(None, &cfg, "m", "v1", None, false, T1).unwrap();
    let ports =
        &fields(&obj, "m", "Apply")["f:spec"]["f:containers"]["k:{\"name\":\"c\"}"]["f:ports"];
    assert!(
        ports
            .get("k:{\"containerPort\":53,\"protocol\":\"UDP\"}")
            .is_some()
    );
    assert!(
        ports
            .get("k:{\"containerPort\":53,\"protocol\":\"TCP\"}")
            .is_some()
    );
    let wrong_version = pods.apply(None, &cfg, "m", "apps/v1", None, false, T1);
    assert!(matches!(wrong_version, Err(ApplyError::Invalid(_))));
}

#[test]
fn list_sets_are_owned_per_value() {
    let cms = manager_for("io.k8s.api.core.v1.ConfigMap");
    let cfg = |finalizers: Value| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "c", "finalizers": finalizers}, "data": {"k": "v"}})
    };
    let live = stored(
        cms.apply(None, &cfg(json!(["a", "b"])), "one", "v1", None, false, T1)
            .unwrap(),
    );
    let live = cms
        .apply(
            Some(&live),
            &cfg(json!(["b", "c"])),
            "two",
            "v1",
            None,
            false,
            T2,
        )
        .unwrap();
    assert_eq!(live["metadata"]["finalizers"], json!(["a", "b", "c"]));
    assert_eq!(
        fields(&live, "two", "Apply")["f:metadata"]["f:finalizers"],
        json!({"v:\"b\"": {}, "v:\"c\"": {}})
    );
    // Dropping "a" and "b": "b" stays, "two" applies it too.
    let live = cms
        .apply(Some(&live), &cfg(json!([])), "one", "v1", None, false, T3)
        .unwrap();
    assert_eq!(live["metadata"]["finalizers"], json!(["b", "c"]));
    assert_eq!(live["data"], json!({"k": "v"}));
}

#[test]
fn several_conflicts_are_grouped_by_manager() {
    let c = |manager: &str, operation: &str, field: &str| Conflict {
        manager: manager.into(),
        operation: operation.into(),
        api_version: "apps/v1".into(),
        subresource: None,
        field: field.into(),
    };
    let err = conflict_error(&[
        c("b", "Update", ".spec.replicas"),
        c("a", "Apply", ".spec.paused"),
        c("b", "Update", ".spec.minReadySeconds"),
    ]);
    assert_eq!(
        err.message,
        "Apply failed with 3 conflicts: conflicts with \"a\":\n- .spec.paused\nconflicts with \"b\" using apps/v1:\n- .spec.replicas\n- .spec.minReadySeconds"
    );
    assert_eq!(err.causes.len(), 3);
    assert_eq!(err.causes[0].message, "conflict with \"b\" using apps/v1");
}

#[test]
fn applying_status_owns_only_status() {
    let live = create(created_deployment(), "kubectl-create");
    let mut cfg = config(9, json!([]));
    cfg["status"] = json!({"replicas": 1, "readyReplicas": 1});
    let out = deployments()
        .apply(
            Some(&live),
            &cfg,
            "controller",
            "apps/v1",
            Some("status"),
            false,
            T1,
        )
        .unwrap();
    let entry = entry(&out, "controller", "Apply").unwrap();
    assert_eq!(entry["subresource"], "status");
    // Deployments' status strategy also resets labels, so the applier does not own them.
    assert_eq!(
        entry["fieldsV1"],
        json!({"f:status": {"f:readyReplicas": {}, "f:replicas": {}}})
    );
    assert_eq!(out["status"]["readyReplicas"], 1);
}
