//! apps/v1 Deployments and ReplicaSets.

use serde_json::{Value, json};

use super::meta::{
    Selector, SelectorOptions, labels_of, validate_label_selector, validate_object_meta,
    validate_object_meta_update,
};
use super::names;
use super::pod::{default_pod_template, keep_field, keep_status};
use super::podspec::validate_pod_template_spec;
use super::util::{
    Path, default_value, ensure_obj, forbidden, get, immutable, int_of, invalid, nonnegative,
    not_supported, required, set, str_of, string_map,
};
use crate::status::Cause;

/// `SetDefaults_Deployment` and the template's pod spec defaults.
pub(crate) fn default_deployment(deploy: &mut Value) {
    let Some(spec) = ensure_obj(deploy, "spec") else {
        return;
    };
    default_value(spec, "replicas", json!(1));
    if let Some(strategy) = ensure_obj(spec, "strategy") {
        super::util::default_str(strategy, "type", "RollingUpdate");
        if str_of(strategy, "type") == "RollingUpdate"
            && let Some(rolling) = ensure_obj(strategy, "rollingUpdate")
        {
            default_value(rolling, "maxUnavailable", json!("25%"));
            default_value(rolling, "maxSurge", json!("25%"));
        }
    }
    default_value(spec, "revisionHistoryLimit", json!(10));
    default_value(spec, "progressDeadlineSeconds", json!(600));
    if let Some(template) = ensure_obj(spec, "template") {
        default_pod_template(template);
    }
}

/// `SetDefaults_ReplicaSet` and the template's pod spec defaults.
pub(crate) fn default_replica_set(rs: &mut Value) {
    let Some(spec) = ensure_obj(rs, "spec") else {
        return;
    };
    default_value(spec, "replicas", json!(1));
    if let Some(template) = ensure_obj(spec, "template") {
        default_pod_template(template);
    }
}

/// `PrepareForCreate` of both strategies: status starts empty.
pub(crate) fn prepare_create(obj: &mut Value) {
    set(obj, "status", json!({}));
}

/// `PrepareForUpdate` of both strategies: the main resource keeps the old status.
pub(crate) fn prepare_update(new: &mut Value, old: &Value) {
    keep_status(new, old);
}

/// `deploymentStatusStrategy.PrepareForUpdate`: spec and labels stay as they were.
pub(crate) fn prepare_deployment_status_update(new: &mut Value, old: &Value) {
    keep_field(new, old, "spec");
    let old_labels = get(old, "metadata").and_then(|m| get(m, "labels")).cloned();
    if let Some(meta) = ensure_obj(new, "metadata") {
        match old_labels {
            Some(labels) => set(meta, "labels", labels),
            None => {
                super::util::remove(meta, "labels");
            }
        }
    }
}

/// `ValidatePositiveIntOrPercent`.
fn validate_int_or_percent(value: Option<&Value>, path: &Path) -> Vec<Cause> {
    match value {
        Some(Value::String(s)) => names::percent(s)
            .into_iter()
            .map(|msg| invalid(path, s.as_str(), &msg))
            .collect(),
        Some(v) => nonnegative(v.as_i64().unwrap_or(0), path),
        None => nonnegative(0, path),
    }
}

fn percent_value(value: Option<&Value>) -> Option<i64> {
    let s = value?.as_str()?;
    if !names::percent(s).is_empty() {
        return None;
    }
    s.strip_suffix('%')?.parse().ok()
}

fn int_or_percent_value(value: Option<&Value>) -> i64 {
    percent_value(value).unwrap_or_else(|| value.and_then(Value::as_i64).unwrap_or(0))
}

fn validate_not_more_than_100_percent(value: Option<&Value>, path: &Path) -> Vec<Cause> {
    match percent_value(value) {
        Some(p) if p > 100 => vec![invalid(
            path,
            value.cloned().unwrap_or(Value::Null),
            "must not be greater than 100%",
        )],
        _ => Vec::new(),
    }
}

fn validate_strategy(strategy: Option<&Value>, path: &Path) -> Vec<Cause> {
    let empty = Value::Null;
    let strategy = strategy.unwrap_or(&empty);
    let rolling = get(strategy, "rollingUpdate");
    match str_of(strategy, "type") {
        "Recreate" => match rolling {
            Some(_) => vec![forbidden(
                &path.child("rollingUpdate"),
                "may not be specified when strategy `type` is 'Recreate'",
            )],
            None => Vec::new(),
        },
        "RollingUpdate" => match rolling {
            None => vec![required(
                &path.child("rollingUpdate"),
                "this should be defaulted and never be nil",
            )],
            Some(rolling) => {
                let rp = path.child("rollingUpdate");
                let unavailable = get(rolling, "maxUnavailable");
                let surge = get(rolling, "maxSurge");
                let mut causes = validate_int_or_percent(unavailable, &rp.child("maxUnavailable"));
                causes.extend(validate_int_or_percent(surge, &rp.child("maxSurge")));
                if int_or_percent_value(unavailable) == 0 && int_or_percent_value(surge) == 0 {
                    causes.push(invalid(
                        &rp.child("maxUnavailable"),
                        unavailable.cloned().unwrap_or(Value::Null),
                        "may not be 0 when `maxSurge` is 0",
                    ));
                }
                causes.extend(validate_not_more_than_100_percent(
                    unavailable,
                    &rp.child("maxUnavailable"),
                ));
                causes
            }
        },
        _ => vec![not_supported(
            path,
            strategy.clone(),
            &["Recreate", "RollingUpdate"],
        )],
    }
}

/// `ValidatePodTemplateSpecForReplicaSet` after the selector checks.
fn validate_template(spec: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let selector = get(spec, "selector");
    let template_path = path.child("template");
    let Ok(parsed) = Selector::parse(selector) else {
        causes.push(invalid(
            &path.child("selector"),
            selector.cloned().unwrap_or(Value::Null),
            "invalid label selector",
        ));
        return causes;
    };
    let empty = Value::Null;
    let template = get(spec, "template").unwrap_or(&empty);
    let template_labels = labels_of(template);
    if !parsed.is_empty() && !parsed.matches(&template_labels) {
        causes.push(invalid(
            &template_path.child("metadata").child("labels"),
            get(template, "metadata")
                .and_then(|m| get(m, "labels"))
                .cloned()
                .unwrap_or(Value::Null),
            "`selector` does not match template `labels`",
        ));
    }
    causes.extend(validate_pod_template_spec(template, &template_path));
    let template_spec = get(template, "spec").unwrap_or(&empty);
    let restart = str_of(template_spec, "restartPolicy");
    if restart != "Always" {
        causes.push(not_supported(
            &template_path.child("spec").child("restartPolicy"),
            restart,
            &["Always"],
        ));
    }
    if get(template_spec, "activeDeadlineSeconds").is_some() {
        causes.push(forbidden(
            &template_path.child("spec").child("activeDeadlineSeconds"),
            "activeDeadlineSeconds in ReplicaSet is not Supported",
        ));
    }
    causes
}

fn validate_selector_presence(spec: &Value, path: &Path) -> Vec<Cause> {
    let selector_path = path.child("selector");
    match get(spec, "selector") {
        None => vec![required(&selector_path, "")],
        Some(selector) => {
            let mut causes =
                validate_label_selector(Some(selector), SelectorOptions::default(), &selector_path);
            let empty = string_map(selector, "matchLabels").is_empty()
                && super::util::list(selector, "matchExpressions").is_empty();
            if empty {
                causes.push(invalid(
                    &selector_path,
                    selector.clone(),
                    "empty selector is invalid for deployment",
                ));
            }
            causes
        }
    }
}

/// `ValidateDeploymentSpec`.
fn validate_deployment_spec(deploy: &Value) -> Vec<Cause> {
    let empty = Value::Null;
    let spec = get(deploy, "spec").unwrap_or(&empty);
    let path = Path::new("spec");
    let mut causes = nonnegative(
        int_of(spec, "replicas").unwrap_or(0),
        &path.child("replicas"),
    );
    causes.extend(validate_selector_presence(spec, &path));
    causes.extend(validate_template(spec, &path));
    causes.extend(validate_strategy(
        get(spec, "strategy"),
        &path.child("strategy"),
    ));
    let min_ready = int_of(spec, "minReadySeconds").unwrap_or(0);
    causes.extend(nonnegative(min_ready, &path.child("minReadySeconds")));
    if let Some(limit) = int_of(spec, "revisionHistoryLimit") {
        causes.extend(nonnegative(limit, &path.child("revisionHistoryLimit")));
    }
    if let Some(rollback) = get(spec, "rollbackTo") {
        causes.extend(nonnegative(
            int_of(rollback, "revision").unwrap_or(0),
            &path.child("rollback").child("version"),
        ));
    }
    if let Some(deadline) = int_of(spec, "progressDeadlineSeconds") {
        causes.extend(nonnegative(
            deadline,
            &path.child("progressDeadlineSeconds"),
        ));
        if deadline <= min_ready {
            causes.push(invalid(
                &path.child("progressDeadlineSeconds"),
                deadline,
                "must be greater than minReadySeconds",
            ));
        }
    }
    causes
}

/// `ValidateReplicaSetSpec`.
fn validate_replica_set_spec(rs: &Value) -> Vec<Cause> {
    let empty = Value::Null;
    let spec = get(rs, "spec").unwrap_or(&empty);
    let path = Path::new("spec");
    let mut causes = nonnegative(
        int_of(spec, "replicas").unwrap_or(0),
        &path.child("replicas"),
    );
    causes.extend(nonnegative(
        int_of(spec, "minReadySeconds").unwrap_or(0),
        &path.child("minReadySeconds"),
    ));
    causes.extend(validate_selector_presence(spec, &path));
    causes.extend(validate_template(spec, &path));
    causes
}

fn validate_status(obj: &Value, fields: &[&str], ready_checks: &[&str]) -> Vec<Cause> {
    let empty = Value::Null;
    let status = get(obj, "status").unwrap_or(&empty);
    let path = Path::new("status");
    let mut causes = Vec::new();
    for field in fields {
        causes.extend(nonnegative(
            int_of(status, field).unwrap_or(0),
            &path.child(field),
        ));
    }
    if let Some(collisions) = int_of(status, "collisionCount") {
        causes.extend(nonnegative(collisions, &path.child("collisionCount")));
    }
    let replicas = int_of(status, "replicas").unwrap_or(0);
    for field in ready_checks {
        let value = int_of(status, field).unwrap_or(0);
        if value > replicas {
            causes.push(invalid(
                &path.child(field),
                value,
                "cannot be greater than status.replicas",
            ));
        }
    }
    let available = int_of(status, "availableReplicas").unwrap_or(0);
    if available > int_of(status, "readyReplicas").unwrap_or(0) {
        causes.push(invalid(
            &path.child("availableReplicas"),
            available,
            "cannot be greater than readyReplicas",
        ));
    }
    causes
}

fn collision_count_decrement(new: &Value, old: &Value) -> Vec<Cause> {
    let count = |o: &Value| get(o, "status").and_then(|s| int_of(s, "collisionCount"));
    match (count(new), count(old)) {
        (None, Some(_)) => vec![invalid(
            &Path::new("status").child("collisionCount"),
            0,
            "cannot be decremented",
        )],
        (Some(n), Some(o)) if n < o => vec![invalid(
            &Path::new("status").child("collisionCount"),
            n,
            "cannot be decremented",
        )],
        _ => Vec::new(),
    }
}

fn selector_immutable(new: &Value, old: &Value) -> Vec<Cause> {
    fn selector(o: &Value) -> Option<&Value> {
        get(o, "spec").and_then(|s| get(s, "selector"))
    }
    immutable(
        selector(new),
        selector(old),
        &Path::new("spec").child("selector"),
    )
}

const DEPLOYMENT_STATUS: &[&str] = &[
    "observedGeneration",
    "replicas",
    "updatedReplicas",
    "readyReplicas",
    "availableReplicas",
    "unavailableReplicas",
];
const REPLICA_SET_STATUS: &[&str] = &[
    "replicas",
    "fullyLabeledReplicas",
    "readyReplicas",
    "availableReplicas",
    "observedGeneration",
];

/// `ValidateDeployment`.
pub(crate) fn validate_deployment(deploy: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta(
        deploy,
        true,
        names::name_is_dns_subdomain,
        &Path::new("metadata"),
    );
    causes.extend(validate_deployment_spec(deploy));
    causes
}

/// `ValidateDeploymentUpdate`, the selector rule of apps/v1, and the status rules that
/// matter for `/status` writes.
pub(crate) fn validate_deployment_update(new: &Value, old: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta_update(new, old, &Path::new("metadata"));
    causes.extend(validate_deployment_spec(new));
    causes.extend(selector_immutable(new, old));
    causes.extend(validate_status(
        new,
        DEPLOYMENT_STATUS,
        &["updatedReplicas", "readyReplicas", "availableReplicas"],
    ));
    causes.extend(collision_count_decrement(new, old));
    causes
}

/// `ValidateReplicaSet`.
pub(crate) fn validate_replica_set(rs: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta(
        rs,
        true,
        names::name_is_dns_subdomain,
        &Path::new("metadata"),
    );
    causes.extend(validate_replica_set_spec(rs));
    causes
}

/// `ValidateReplicaSetUpdate`, the selector rule of apps/v1, and the status rules.
pub(crate) fn validate_replica_set_update(new: &Value, old: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta_update(new, old, &Path::new("metadata"));
    causes.extend(validate_replica_set_spec(new));
    causes.extend(selector_immutable(new, old));
    causes.extend(validate_status(
        new,
        REPLICA_SET_STATUS,
        &["fullyLabeledReplicas", "readyReplicas", "availableReplicas"],
    ));
    causes
}

/// Whether an update changes what the generation counts: the spec, and for deployments
/// also the annotations (they are copied to the replica sets).
pub(crate) fn deployment_changed(new: &Value, old: &Value) -> bool {
    fn annotations(o: &Value) -> Option<&Value> {
        get(o, "metadata").and_then(|m| get(m, "annotations"))
    }
    !super::util::semantic_eq(get(new, "spec"), get(old, "spec"))
        || !super::util::semantic_eq(annotations(new), annotations(old))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(causes: &[Cause]) -> Vec<(&str, &str)> {
        causes
            .iter()
            .map(|c| (c.field.as_str(), c.reason.as_str()))
            .collect()
    }

    fn minimal() -> Value {
        json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}}})
    }

    #[test]
    fn strategy_rules() {
        let causes = validate_strategy(
            Some(
                &json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": "0%"}}),
            ),
            &Path::new("spec.strategy"),
        );
        assert_eq!(
            fields(&causes),
            vec![(
                "spec.strategy.rollingUpdate.maxUnavailable",
                "FieldValueInvalid"
            )]
        );
        assert_eq!(
            causes[0].message,
            "Invalid value: 0: may not be 0 when `maxSurge` is 0"
        );
        let causes = validate_strategy(
            Some(
                &json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "150%", "maxSurge": "x"}}),
            ),
            &Path::new("s"),
        );
        assert_eq!(causes.len(), 2);
        let causes = validate_strategy(
            Some(&json!({"type": "Recreate", "rollingUpdate": {}})),
            &Path::new("s"),
        );
        assert_eq!(
            fields(&causes),
            vec![("s.rollingUpdate", "FieldValueForbidden")]
        );
        let causes = validate_strategy(Some(&json!({"type": "Blue"})), &Path::new("s"));
        assert_eq!(fields(&causes), vec![("s", "FieldValueNotSupported")]);
    }

    #[test]
    fn selector_must_match_template() {
        let mut d = minimal();
        d["spec"]["template"]["metadata"]["labels"] = json!({"app": "other"});
        default_deployment(&mut d);
        let causes = validate_deployment(&d);
        assert_eq!(
            fields(&causes),
            vec![("spec.template.metadata.labels", "FieldValueInvalid")]
        );
        let mut d = minimal();
        d["spec"]["selector"] = json!({});
        default_deployment(&mut d);
        assert_eq!(
            fields(&validate_deployment(&d)),
            vec![("spec.selector", "FieldValueInvalid")]
        );
        let mut d = minimal();
        d["spec"].as_object_mut().map(|s| s.remove("selector"));
        default_deployment(&mut d);
        assert_eq!(
            fields(&validate_deployment(&d)),
            vec![
                ("spec.selector", "FieldValueRequired"),
                ("spec.template.metadata.labels", "FieldValueInvalid")
            ]
        );
    }

    #[test]
    fn template_restart_policy_and_replicas() {
        let mut rs = minimal();
        rs["spec"]["replicas"] = json!(-1);
        rs["spec"]["template"]["spec"]["restartPolicy"] = json!("Never");
        default_replica_set(&mut rs);
        let causes = validate_replica_set(&rs);
        assert_eq!(
            fields(&causes),
            vec![
                ("spec.replicas", "FieldValueInvalid"),
                ("spec.template.spec.restartPolicy", "FieldValueNotSupported")
            ]
        );
    }

    #[test]
    fn selector_is_immutable_and_status_is_kept() {
        let mut old = minimal();
        default_deployment(&mut old);
        prepare_create(&mut old);
        old["status"] = json!({"replicas": 1});
        let mut new = old.clone();
        new["spec"]["selector"] = json!({"matchLabels": {"app": "web", "x": "y"}});
        new["spec"]["template"]["metadata"]["labels"]["x"] = json!("y");
        new["status"] = json!({});
        prepare_update(&mut new, &old);
        assert_eq!(new["status"], json!({"replicas": 1}));
        let causes = validate_deployment_update(&new, &old);
        assert_eq!(
            fields(&causes),
            vec![("spec.selector", "FieldValueInvalid")]
        );
        assert_eq!(
            causes[0].message.rsplit(": ").next(),
            Some("field is immutable")
        );
    }

    #[test]
    fn status_update_keeps_spec_and_labels() {
        let mut old = minimal();
        default_deployment(&mut old);
        let mut new = old.clone();
        new["spec"]["replicas"] = json!(5);
        new["metadata"]["labels"] = json!({"x": "y"});
        new["status"] = json!({"replicas": 3, "readyReplicas": 4});
        prepare_deployment_status_update(&mut new, &old);
        assert_eq!(new["spec"], old["spec"]);
        assert!(new["metadata"].get("labels").is_none());
        let causes = validate_deployment_update(&new, &old);
        assert_eq!(
            fields(&causes),
            vec![("status.readyReplicas", "FieldValueInvalid")]
        );
    }
}
