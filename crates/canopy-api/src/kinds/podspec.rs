//! `ValidatePodSpec` and `ValidatePodTemplateSpec` with everything under them: containers,
//! ports, env, mounts, resources, probes, security contexts, affinity, tolerations, DNS and
//! topology spread constraints.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::meta::{
    SelectorOptions, validate_annotations, validate_dns1123_label, validate_dns1123_subdomain,
    validate_label_name, validate_label_selector, validate_labels, validate_qualified_name,
};
use super::names::{self, INVALID_IP};
use super::util::{
    Path, bool_of, duplicate, forbidden, get, int_of, invalid, list, not_found, not_supported, obj,
    opt_str, required, str_of, string_map, strings,
};
use super::volumes::{local_descending_path, path_no_backsteps, validate_volumes};
use crate::quantity::Quantity;
use crate::status::Cause;

/// Whether a spec belongs to a pod (not to a template embedded in another kind).
#[derive(Clone, Copy)]
pub(crate) struct PodOpts {
    /// Upstream's `ResourceIsPod`.
    pub(crate) is_pod: bool,
}

const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];
const PULL_POLICIES: &[&str] = &["Always", "IfNotPresent", "Never"];
const ENV_FIELD_PATHS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.hostIP",
    "status.hostIPs",
    "status.podIP",
    "status.podIPs",
];
const RESOURCE_FIELD_PATHS: &[&str] = &[
    "limits.cpu",
    "limits.ephemeral-storage",
    "limits.memory",
    "requests.cpu",
    "requests.ephemeral-storage",
    "requests.memory",
];
const TAINT_EFFECTS: &[&str] = &["NoSchedule", "PreferNoSchedule", "NoExecute"];
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
const TOLERATIONS_ANNOTATION: &str = "scheduler.alpha.kubernetes.io/tolerations";
const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
const SECCOMP_POD_ANNOTATION: &str = "seccomp.security.alpha.kubernetes.io/pod";
const SECCOMP_CONTAINER_PREFIX: &str = "container.seccomp.security.alpha.kubernetes.io/";
/// The deprecated per-container AppArmor annotation prefix.
pub(crate) const APPARMOR_PREFIX: &str = "container.apparmor.security.beta.kubernetes.io/";
const MAX_USER_ID: i64 = i32::MAX as i64;

/// What containers are validated against.
struct Ctx<'a> {
    volumes: &'a HashMap<String, &'a Value>,
    claims: &'a [&'a str],
    grace: Option<i64>,
    restart_policy: &'a str,
    host_users: bool,
}

/// `ValidatePodSpec`.
pub(crate) fn validate_pod_spec(
    spec: &Value,
    pod_name: Option<&str>,
    path: &Path,
    opts: PodOpts,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    if get(spec, "terminationGracePeriodSeconds").is_none() {
        causes.push(required(&path.child("terminationGracePeriodSeconds"), ""));
    }
    let grace = int_of(spec, "terminationGracePeriodSeconds");
    let host_users = spec
        .get("hostUsers")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let (volumes, errs) = validate_volumes(
        list(spec, "volumes"),
        pod_name,
        &path.child("volumes"),
        opts.is_pod,
    );
    causes.extend(errs);
    let claims: Vec<&str> = list(spec, "resourceClaims")
        .iter()
        .map(|c| str_of(c, "name"))
        .filter(|n| !n.is_empty())
        .collect();
    causes.extend(validate_resource_claims(
        list(spec, "resourceClaims"),
        &path.child("resourceClaims"),
    ));
    let ctx = Ctx {
        volumes: &volumes,
        claims: &claims,
        grace,
        restart_policy: str_of(spec, "restartPolicy"),
        host_users,
    };
    causes.extend(validate_containers(
        list(spec, "containers"),
        &ctx,
        &path.child("containers"),
    ));
    causes.extend(validate_init_containers(
        list(spec, "initContainers"),
        list(spec, "containers"),
        &ctx,
        &path.child("initContainers"),
    ));
    causes.extend(validate_ephemeral_containers(
        spec,
        &ctx,
        &path.child("ephemeralContainers"),
    ));
    causes.extend(validate_host_network_deps(spec, path, opts));
    causes.extend(validate_enum_required(
        str_of(spec, "restartPolicy"),
        &["Always", "OnFailure", "Never"],
        &path.child("restartPolicy"),
    ));
    causes.extend(validate_enum_required(
        str_of(spec, "dnsPolicy"),
        &["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"],
        &path.child("dnsPolicy"),
    ));
    causes.extend(validate_labels(
        &string_map(spec, "nodeSelector"),
        &path.child("nodeSelector"),
    ));
    causes.extend(validate_pod_security_context(
        spec,
        &path.child("securityContext"),
    ));
    if let Some(affinity) = get(spec, "affinity") {
        causes.extend(validate_affinity(affinity, &path.child("affinity")));
    }
    causes.extend(validate_dns_config(spec, &path.child("dnsConfig")));
    for (i, gate) in list(spec, "readinessGates").iter().enumerate() {
        causes.extend(validate_qualified_name(
            str_of(gate, "conditionType"),
            &path.child("readinessGates").index(i).child("conditionType"),
        ));
    }
    let mut seen_gates = HashSet::new();
    for (i, gate) in list(spec, "schedulingGates").iter().enumerate() {
        let name = str_of(gate, "name");
        let p = path.child("schedulingGates").index(i);
        causes.extend(validate_qualified_name(name, &p));
        if !seen_gates.insert(name) {
            causes.push(duplicate(&p, name));
        }
    }
    causes.extend(validate_topology_spread(
        list(spec, "topologySpreadConstraints"),
        &path.child("topologySpreadConstraints"),
    ));
    if !host_users {
        for (field, shown) in [
            ("hostNetwork", "hostNetwork"),
            ("hostPID", "HostPID"),
            ("hostIPC", "HostIPC"),
        ] {
            if bool_of(spec, field) {
                causes.push(forbidden(
                    &path.child(shown),
                    "when `pod.Spec.HostUsers` is false",
                ));
            }
        }
    }
    for (field, name_fn) in [
        (
            "serviceAccountName",
            names::name_is_dns_subdomain as names::NameFn,
        ),
        ("nodeName", names::name_is_dns_subdomain),
    ] {
        let value = str_of(spec, field);
        if !value.is_empty() {
            for msg in name_fn(value, false) {
                causes.push(invalid(&path.child(field), value, &msg));
            }
        }
    }
    if let Some(deadline) = int_of(spec, "activeDeadlineSeconds")
        && !(1..=MAX_USER_ID).contains(&deadline)
    {
        causes.push(invalid(
            &path.child("activeDeadlineSeconds"),
            deadline,
            &names::inclusive_range_error(1, MAX_USER_ID),
        ));
    }
    for field in ["hostname", "subdomain"] {
        let value = str_of(spec, field);
        if !value.is_empty() {
            causes.extend(validate_dns1123_label(value, &path.child(field)));
        }
    }
    causes.extend(validate_tolerations(
        list(spec, "tolerations"),
        &path.child("tolerations"),
    ));
    for (i, alias) in list(spec, "hostAliases").iter().enumerate() {
        let p = path.child("hostAliases").index(i);
        let ip = str_of(alias, "ip");
        if names::parse_ip_sloppy(ip).is_none() {
            causes.push(invalid(&p.child("ip"), ip, INVALID_IP));
        }
        for (j, host) in strings(alias, "hostnames").into_iter().enumerate() {
            causes.extend(validate_dns1123_subdomain(
                host,
                &p.child("hostnames").index(j),
            ));
        }
    }
    let priority_class = str_of(spec, "priorityClassName");
    if !priority_class.is_empty() {
        for msg in names::name_is_dns_subdomain(priority_class, false) {
            causes.push(invalid(
                &path.child("priorityClassName"),
                priority_class,
                &msg,
            ));
        }
    }
    if let Some(runtime_class) = opt_str(spec, "runtimeClassName") {
        for msg in names::name_is_dns_subdomain(runtime_class, false) {
            causes.push(invalid(
                &path.child("runtimeClassName"),
                runtime_class,
                &msg,
            ));
        }
    }
    if let Some(policy) = opt_str(spec, "preemptionPolicy") {
        causes.extend(validate_enum_required(
            policy,
            &["PreemptLowerPriority", "Never"],
            &path.child("preemptionPolicy"),
        ));
    }
    if let Some(overhead) = obj(spec, "overhead") {
        let requirements = serde_json::json!({"limits": overhead});
        causes.extend(validate_resources(
            Some(&requirements),
            &[],
            &path.child("overhead"),
        ));
    }
    if let Some(os) = get(spec, "os") {
        causes.extend(validate_os(spec, os, path));
    }
    causes
}

fn validate_enum_required(value: &str, supported: &[&str], path: &Path) -> Vec<Cause> {
    if value.is_empty() {
        vec![required(path, "")]
    } else if !supported.contains(&value) {
        vec![not_supported(path, value, supported)]
    } else {
        Vec::new()
    }
}

fn validate_resource_claims(claims: &[Value], path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut seen = HashSet::new();
    for (i, claim) in claims.iter().enumerate() {
        let p = path.index(i);
        let name = str_of(claim, "name");
        if name.is_empty() {
            causes.push(required(&p.child("name"), ""));
        } else if seen.contains(name) {
            causes.push(duplicate(&p.child("name"), name));
        } else {
            causes.extend(validate_dns1123_label(name, &p.child("name")));
            seen.insert(name);
        }
        let by_name = opt_str(claim, "resourceClaimName");
        let by_template = opt_str(claim, "resourceClaimTemplateName");
        match (by_name, by_template) {
            (Some(_), Some(_)) => causes.push(invalid(
                &p,
                claim.clone(),
                "at most one of `resourceClaimName` or `resourceClaimTemplateName` may be specified",
            )),
            (None, None) => causes.push(invalid(
                &p,
                claim.clone(),
                "must specify one of: `resourceClaimName`, `resourceClaimTemplateName`",
            )),
            _ => {}
        }
        for (field, value) in [
            ("resourceClaimName", by_name),
            ("resourceClaimTemplateName", by_template),
        ] {
            if let Some(value) = value {
                for msg in names::name_is_dns_subdomain(value, false) {
                    causes.push(invalid(&p.child(field), value, &msg));
                }
            }
        }
    }
    causes
}

fn validate_containers(containers: &[Value], ctx: &Ctx<'_>, path: &Path) -> Vec<Cause> {
    if containers.is_empty() {
        return vec![required(path, "")];
    }
    let mut causes = Vec::new();
    let mut seen = HashSet::new();
    for (i, ctr) in containers.iter().enumerate() {
        let p = path.index(i);
        causes.extend(validate_container_common(ctr, ctx, &p));
        let name = str_of(ctr, "name");
        if !seen.insert(name) {
            causes.push(duplicate(&p.child("name"), name));
        }
        causes.extend(validate_lifecycle_and_probes(ctr, ctx.grace, &p));
        if get(ctr, "restartPolicy").is_some() {
            causes.push(forbidden(
                &p.child("restartPolicy"),
                "may not be set for non-init containers",
            ));
        }
    }
    causes.extend(host_port_conflicts(containers, path));
    causes
}

fn validate_lifecycle_and_probes(ctr: &Value, grace: Option<i64>, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    if let Some(lifecycle) = get(ctr, "lifecycle") {
        for hook in ["postStart", "preStop"] {
            if let Some(handler) = get(lifecycle, hook) {
                causes.extend(validate_handler(
                    handler,
                    grace,
                    &path.child("lifecycle").child(hook),
                ));
            }
        }
    }
    for (probe, kind) in [
        ("livenessProbe", ProbeKind::Liveness),
        ("readinessProbe", ProbeKind::Readiness),
        ("startupProbe", ProbeKind::Startup),
    ] {
        if let Some(p) = get(ctr, probe) {
            causes.extend(validate_probe(p, kind, grace, &path.child(probe)));
        }
    }
    causes
}

fn validate_init_containers(
    containers: &[Value],
    regular: &[Value],
    ctx: &Ctx<'_>,
    path: &Path,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut seen: HashSet<&str> = regular.iter().map(|c| str_of(c, "name")).collect();
    for (i, ctr) in containers.iter().enumerate() {
        let p = path.index(i);
        causes.extend(validate_container_common(ctr, ctx, &p));
        let mut restart_always = false;
        if let Some(policy) = opt_str(ctr, "restartPolicy") {
            if policy != "Always" {
                causes.push(not_supported(
                    &p.child("restartPolicy"),
                    policy,
                    &["Always"],
                ));
            }
            restart_always = policy == "Always";
        }
        let name = str_of(ctr, "name");
        if seen.contains(name) {
            causes.push(duplicate(&p.child("name"), name));
        } else if !name.is_empty() {
            seen.insert(name);
        }
        causes.extend(host_port_conflicts(std::slice::from_ref(ctr), path));
        if restart_always {
            causes.extend(validate_lifecycle_and_probes(ctr, ctx.grace, &p));
        } else {
            for field in [
                "lifecycle",
                "livenessProbe",
                "readinessProbe",
                "startupProbe",
            ] {
                if get(ctr, field).is_some() {
                    causes.push(forbidden(
                        &p.child(field),
                        "may not be set for init containers without restartPolicy=Always",
                    ));
                }
            }
        }
    }
    causes
}

/// Fields an ephemeral container may set (upstream's `allowedEphemeralContainerFields`).
const EPHEMERAL_ALLOWED: &[&str] = &[
    "name",
    "image",
    "command",
    "args",
    "workingDir",
    "envFrom",
    "env",
    "volumeMounts",
    "volumeDevices",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "imagePullPolicy",
    "securityContext",
    "stdin",
    "stdinOnce",
    "tty",
    "targetContainerName",
];

fn validate_ephemeral_containers(spec: &Value, ctx: &Ctx<'_>, path: &Path) -> Vec<Cause> {
    let ephemeral = list(spec, "ephemeralContainers");
    let mut causes = Vec::new();
    if ephemeral.is_empty() {
        return causes;
    }
    let others: Vec<&str> = list(spec, "containers")
        .iter()
        .chain(list(spec, "initContainers"))
        .map(|c| str_of(c, "name"))
        .collect();
    let mut all: HashSet<&str> = others.iter().copied().collect();
    for (i, ec) in ephemeral.iter().enumerate() {
        let p = path.index(i);
        causes.extend(validate_container_common(ec, ctx, &p));
        causes.extend(validate_image_whitespace(ec, &p));
        let name = str_of(ec, "name");
        if !all.insert(name) {
            causes.push(duplicate(&p.child("name"), name));
        }
        let target = str_of(ec, "targetContainerName");
        if !target.is_empty() && !others.contains(&target) {
            causes.push(not_found(&p.child("targetContainerName"), target));
        }
        if let Some(fields) = ec.as_object() {
            for (key, value) in fields {
                let zero = match value {
                    Value::Null => true,
                    Value::Object(m) => m.is_empty() && key == "resources",
                    Value::Array(l) => l.is_empty(),
                    _ => false,
                };
                if !zero && !EPHEMERAL_ALLOWED.contains(&key.as_str()) {
                    causes.push(forbidden(
                        &p.child(key),
                        "cannot be set for an Ephemeral Container",
                    ));
                }
            }
        }
        for (j, mount) in list(ec, "volumeMounts").iter().enumerate() {
            for field in ["subPath", "subPathExpr"] {
                if !str_of(mount, field).is_empty() {
                    causes.push(forbidden(
                        &p.child("volumeMounts").index(j).child(field),
                        "cannot be set for an Ephemeral Container",
                    ));
                }
            }
        }
    }
    causes
}

/// `validateContainerOnlyForPod`.
pub(crate) fn validate_image_whitespace(ctr: &Value, path: &Path) -> Vec<Cause> {
    let image = str_of(ctr, "image");
    if image.trim() != image {
        vec![invalid(
            &path.child("image"),
            image,
            "must not have leading or trailing whitespace",
        )]
    } else {
        Vec::new()
    }
}

fn host_port_conflicts(containers: &[Value], path: &Path) -> Vec<Cause> {
    let mut seen = HashSet::new();
    let mut causes = Vec::new();
    for (i, ctr) in containers.iter().enumerate() {
        for (j, port) in list(ctr, "ports").iter().enumerate() {
            let host_port = int_of(port, "hostPort").unwrap_or(0);
            if host_port == 0 {
                continue;
            }
            let key = format!(
                "{}/{}/{host_port}",
                str_of(port, "protocol"),
                str_of(port, "hostIP")
            );
            let p = path.index(i).child("ports").index(j).child("hostPort");
            if !seen.insert(key.clone()) {
                causes.push(duplicate(&p, key));
            }
        }
    }
    causes
}

fn validate_container_common(ctr: &Value, ctx: &Ctx<'_>, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let name = str_of(ctr, "name");
    if name.is_empty() {
        causes.push(required(&path.child("name"), ""));
    } else {
        causes.extend(validate_dns1123_label(name, &path.child("name")));
    }
    if str_of(ctr, "image").is_empty() {
        causes.push(required(&path.child("image"), ""));
    }
    causes.extend(validate_enum_required(
        str_of(ctr, "terminationMessagePolicy"),
        &["File", "FallbackToLogsOnError"],
        &path.child("terminationMessagePolicy"),
    ));
    causes.extend(validate_container_ports(
        list(ctr, "ports"),
        &path.child("ports"),
    ));
    causes.extend(validate_env(list(ctr, "env"), &path.child("env")));
    causes.extend(validate_env_from(
        list(ctr, "envFrom"),
        &path.child("envFrom"),
    ));
    causes.extend(validate_volume_mounts(
        ctr,
        ctx.volumes,
        &path.child("volumeMounts"),
    ));
    causes.extend(validate_volume_devices(
        ctr,
        ctx.volumes,
        &path.child("volumeDevices"),
    ));
    causes.extend(validate_pull_policy(
        str_of(ctr, "imagePullPolicy"),
        &path.child("imagePullPolicy"),
    ));
    causes.extend(validate_resources(
        get(ctr, "resources"),
        ctx.claims,
        &path.child("resources"),
    ));
    causes.extend(validate_resize_policy(
        list(ctr, "resizePolicy"),
        ctx.restart_policy,
        &path.child("resizePolicy"),
    ));
    causes.extend(validate_security_context(
        get(ctr, "securityContext"),
        &path.child("securityContext"),
        ctx.host_users,
    ));
    causes
}

/// `validatePullPolicy`.
pub(crate) fn validate_pull_policy(policy: &str, path: &Path) -> Vec<Cause> {
    validate_enum_required(policy, PULL_POLICIES, path)
}

fn validate_container_ports(ports: &[Value], path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut names_seen = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let p = path.index(i);
        let name = str_of(port, "name");
        if !name.is_empty() {
            let msgs = names::port_name(name);
            if !msgs.is_empty() {
                for msg in msgs {
                    causes.push(invalid(&p.child("name"), name, &msg));
                }
            } else if !names_seen.insert(name) {
                causes.push(duplicate(&p.child("name"), name));
            }
        }
        let container_port = int_of(port, "containerPort").unwrap_or(0);
        if container_port == 0 {
            causes.push(required(&p.child("containerPort"), ""));
        } else {
            for msg in names::port_num(container_port) {
                causes.push(invalid(&p.child("containerPort"), container_port, &msg));
            }
        }
        let host_port = int_of(port, "hostPort").unwrap_or(0);
        if host_port != 0 {
            for msg in names::port_num(host_port) {
                causes.push(invalid(&p.child("hostPort"), host_port, &msg));
            }
        }
        causes.extend(validate_enum_required(
            str_of(port, "protocol"),
            PROTOCOLS,
            &p.child("protocol"),
        ));
    }
    causes
}

fn validate_env(env: &[Value], path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    for (i, var) in env.iter().enumerate() {
        let p = path.index(i);
        let name = str_of(var, "name");
        if name.is_empty() {
            causes.push(required(&p.child("name"), ""));
        } else {
            for msg in names::relaxed_env_var_name(name) {
                causes.push(invalid(&p.child("name"), name, &msg));
            }
        }
        causes.extend(validate_env_value_from(var, &p.child("valueFrom")));
    }
    causes
}

fn validate_env_value_from(var: &Value, path: &Path) -> Vec<Cause> {
    let Some(from) = get(var, "valueFrom") else {
        return Vec::new();
    };
    let mut causes = Vec::new();
    let mut sources = 0;
    if let Some(field_ref) = get(from, "fieldRef") {
        sources += 1;
        causes.extend(validate_object_field_selector(
            field_ref,
            ENV_FIELD_PATHS,
            &path.child("fieldRef"),
        ));
    }
    if let Some(resource_ref) = get(from, "resourceFieldRef") {
        sources += 1;
        causes.extend(validate_resource_field_selector(
            resource_ref,
            &path.child("resourceFieldRef"),
            false,
        ));
    }
    for key in ["configMapKeyRef", "secretKeyRef"] {
        if let Some(selector) = get(from, key) {
            sources += 1;
            causes.extend(validate_key_selector(selector, &path.child(key)));
        }
    }
    if sources == 0 {
        causes.push(invalid(
            path,
            "",
            "must specify one of: `fieldRef`, `resourceFieldRef`, `configMapKeyRef` or `secretKeyRef`",
        ));
    } else if !str_of(var, "value").is_empty() {
        causes.push(invalid(
            path,
            "",
            "may not be specified when `value` is not empty",
        ));
    } else if sources > 1 {
        causes.push(invalid(
            path,
            "",
            "may not have more than one field specified at a time",
        ));
    }
    causes
}

fn split_subscripted(path: &str) -> Option<(&str, &str)> {
    let s = path.strip_suffix("']")?;
    let (head, sub) = s.split_once("['")?;
    (!head.is_empty()).then_some((head, sub))
}

/// `validateObjectFieldSelector` (downward API `fieldRef`).
pub(crate) fn validate_object_field_selector(
    selector: &Value,
    expressions: &[&str],
    path: &Path,
) -> Vec<Cause> {
    let api_version = str_of(selector, "apiVersion");
    if api_version.is_empty() {
        return vec![required(&path.child("apiVersion"), "")];
    }
    let field_path = str_of(selector, "fieldPath");
    if field_path.is_empty() {
        return vec![required(&path.child("fieldPath"), "")];
    }
    let conversion_error = |detail: String| {
        vec![invalid(
            &path.child("fieldPath"),
            field_path,
            &format!("error converting fieldPath: {detail}"),
        )]
    };
    if api_version != "v1" {
        return conversion_error(format!("unsupported pod version: {api_version}"));
    }
    const CONVERTIBLE: &[&str] = &[
        "metadata.annotations",
        "metadata.labels",
        "metadata.name",
        "metadata.namespace",
        "metadata.uid",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.serviceAccountName",
        "spec.schedulerName",
        "status.phase",
        "status.hostIP",
        "status.hostIPs",
        "status.podIP",
        "status.podIPs",
    ];
    let internal = match split_subscripted(field_path) {
        Some((head, _)) if head != "metadata.annotations" && head != "metadata.labels" => {
            return conversion_error(format!(
                "field label does not support subscript: {field_path}"
            ));
        }
        Some(_) => field_path,
        None if field_path == "spec.host" => "spec.nodeName",
        None if CONVERTIBLE.contains(&field_path) => field_path,
        None => return conversion_error(format!("field label not supported: {field_path}")),
    };
    match split_subscripted(internal) {
        Some(("metadata.annotations", sub)) => validate_qualified_name(&sub.to_lowercase(), path),
        Some(("metadata.labels", sub)) => validate_qualified_name(sub, path),
        Some((head, _)) => vec![invalid(path, head, "does not support subscript")],
        None if !expressions.contains(&internal) => {
            vec![not_supported(
                &path.child("fieldPath"),
                internal,
                expressions,
            )]
        }
        None => Vec::new(),
    }
}

fn quantity_milli(value: &Value) -> Option<i128> {
    match value {
        Value::String(s) => Quantity::parse(s).ok().map(|q| q.milli()),
        Value::Number(n) => Quantity::parse(&n.to_string()).ok().map(|q| q.milli()),
        _ => None,
    }
}

/// `validateContainerResourceFieldSelector` (downward API `resourceFieldRef`).
pub(crate) fn validate_resource_field_selector(
    selector: &Value,
    path: &Path,
    volume: bool,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    let resource = str_of(selector, "resource");
    let hugepages =
        resource.starts_with("requests.hugepages-") || resource.starts_with("limits.hugepages-");
    if volume && str_of(selector, "containerName").is_empty() {
        causes.push(required(&path.child("containerName"), ""));
    } else if resource.is_empty() {
        causes.push(required(&path.child("resource"), ""));
    } else if !RESOURCE_FIELD_PATHS.contains(&resource) && !hugepages {
        causes.push(not_supported(
            &path.child("resource"),
            resource,
            RESOURCE_FIELD_PATHS,
        ));
    }
    let divisor = get(selector, "divisor").and_then(quantity_milli);
    if let Some(divisor) = divisor.filter(|d| *d != 0) {
        const BYTES: &[&str] = &[
            "1", "1k", "1M", "1G", "1T", "1P", "1E", "1Ki", "1Mi", "1Gi", "1Ti", "1Pi", "1Ei",
        ];
        let allowed = |list: &[&str]| {
            list.iter()
                .any(|q| Quantity::parse(q).is_ok_and(|q| q.milli() == divisor))
        };
        let message = match resource {
            "limits.cpu" | "requests.cpu" if !allowed(&["1m", "1"]) => {
                Some("only divisor's values 1m and 1 are supported with the cpu resource")
            }
            "limits.memory" | "requests.memory" if !allowed(BYTES) => Some(
                "only divisor's values 1, 1k, 1M, 1G, 1T, 1P, 1E, 1Ki, 1Mi, 1Gi, 1Ti, 1Pi, 1Ei are supported with the memory resource",
            ),
            "limits.ephemeral-storage" | "requests.ephemeral-storage" if !allowed(BYTES) => Some(
                "only divisor's values 1, 1k, 1M, 1G, 1T, 1P, 1E, 1Ki, 1Mi, 1Gi, 1Ti, 1Pi, 1Ei are supported with the local ephemeral storage resource",
            ),
            _ if hugepages && !allowed(BYTES) => Some(
                "only divisor's values 1, 1k, 1M, 1G, 1T, 1P, 1E, 1Ki, 1Mi, 1Gi, 1Ti, 1Pi, 1Ei are supported with the hugepages resource",
            ),
            _ => None,
        };
        if let Some(message) = message {
            causes.push(invalid(&path.child("divisor"), resource, message));
        }
    }
    causes
}

fn validate_key_selector(selector: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let name = str_of(selector, "name");
    for msg in names::name_is_dns_subdomain(name, false) {
        causes.push(invalid(&path.child("name"), name, &msg));
    }
    let key = str_of(selector, "key");
    if key.is_empty() {
        causes.push(required(&path.child("key"), ""));
    } else {
        for msg in names::config_map_key(key) {
            causes.push(invalid(&path.child("key"), key, &msg));
        }
    }
    causes
}

fn validate_env_from(sources: &[Value], path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let p = path.index(i);
        let prefix = str_of(source, "prefix");
        if !prefix.is_empty() {
            for msg in names::relaxed_env_var_name(prefix) {
                causes.push(invalid(&p.child("prefix"), prefix, &msg));
            }
        }
        let mut count = 0;
        for key in ["configMapRef", "secretRef"] {
            let Some(reference) = get(source, key) else {
                continue;
            };
            count += 1;
            let name = str_of(reference, "name");
            let name_path = p.child(key).child("name");
            if name.is_empty() {
                causes.push(required(&name_path, ""));
            } else {
                for msg in names::name_is_dns_subdomain(name, true) {
                    causes.push(invalid(&name_path, name, &msg));
                }
            }
        }
        if count == 0 {
            causes.push(invalid(
                path,
                "",
                "must specify one of: `configMapRef` or `secretRef`",
            ));
        } else if count > 1 {
            causes.push(invalid(
                path,
                "",
                "may not have more than one field specified at a time",
            ));
        }
    }
    causes
}

fn is_privileged(ctr: &Value) -> bool {
    get(ctr, "securityContext").is_some_and(|sc| bool_of(sc, "privileged"))
}

fn validate_volume_mounts(
    ctr: &Value,
    volumes: &HashMap<String, &Value>,
    path: &Path,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    let devices: Vec<(&str, &str)> = list(ctr, "volumeDevices")
        .iter()
        .map(|d| (str_of(d, "name"), str_of(d, "devicePath")))
        .collect();
    let mut mount_points = HashSet::new();
    for (i, mount) in list(ctr, "volumeMounts").iter().enumerate() {
        let p = path.index(i);
        let name = str_of(mount, "name");
        let mount_path = str_of(mount, "mountPath");
        if name.is_empty() {
            causes.push(required(&p.child("name"), ""));
        }
        if !volumes.contains_key(name) {
            causes.push(not_found(&p.child("name"), name));
        }
        if mount_path.is_empty() {
            causes.push(required(&p.child("mountPath"), ""));
        }
        if !mount_points.insert(mount_path) {
            causes.push(invalid(&p.child("mountPath"), mount_path, "must be unique"));
        }
        if devices.iter().any(|(n, _)| *n == name) {
            causes.push(invalid(
                &p.child("name"),
                name,
                "must not already exist in volumeDevices",
            ));
        }
        if devices.iter().any(|(_, dp)| *dp == mount_path) {
            causes.push(invalid(
                &p.child("mountPath"),
                mount_path,
                "must not already exist as a path in volumeDevices",
            ));
        }
        let sub_path = str_of(mount, "subPath");
        let sub_path_expr = str_of(mount, "subPathExpr");
        if volumes.get(name).is_some_and(|v| get(v, "image").is_some()) {
            if !sub_path.is_empty() {
                causes.push(invalid(
                    &p.child("subPath"),
                    sub_path,
                    "not allowed in image volume sources",
                ));
            }
            if !sub_path_expr.is_empty() {
                causes.push(invalid(
                    &p.child("subPathExpr"),
                    sub_path_expr,
                    "not allowed in image volume sources",
                ));
            }
        }
        if !sub_path.is_empty() {
            causes.extend(local_descending_path(sub_path, &path.child("subPath")));
        }
        if !sub_path_expr.is_empty() {
            if !sub_path.is_empty() {
                causes.push(invalid(
                    &p.child("subPathExpr"),
                    sub_path_expr,
                    "subPathExpr and subPath are mutually exclusive",
                ));
            }
            causes.extend(local_descending_path(
                sub_path_expr,
                &path.child("subPathExpr"),
            ));
        }
        let propagation = opt_str(mount, "mountPropagation");
        if let Some(mode) = propagation {
            const MODES: &[&str] = &["Bidirectional", "HostToContainer", "None"];
            let p = path.child("mountPropagation");
            if !MODES.contains(&mode) {
                causes.push(not_supported(&p, mode, MODES));
            }
            if mode == "Bidirectional" && !is_privileged(ctr) {
                causes.push(forbidden(
                    &p,
                    "Bidirectional mount propagation is available only to privileged containers",
                ));
            }
        }
        if let Some(rro) = opt_str(mount, "recursiveReadOnly") {
            let p = path.child("recursiveReadOnly");
            match rro {
                "Disabled" => {}
                "Enabled" | "IfPossible" => {
                    if !bool_of(mount, "readOnly") {
                        causes.push(forbidden(&p, "may only be specified when readOnly is true"));
                    }
                    if propagation.is_some_and(|m| m != "None") {
                        causes.push(forbidden(
                            &p,
                            "may only be specified when mountPropagation is None or not specified",
                        ));
                    }
                }
                other => causes.push(not_supported(
                    &p,
                    other,
                    &["Disabled", "Enabled", "IfPossible"],
                )),
            }
        }
    }
    causes
}

fn validate_volume_devices(
    ctr: &Value,
    volumes: &HashMap<String, &Value>,
    path: &Path,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mounts: Vec<(&str, &str)> = list(ctr, "volumeMounts")
        .iter()
        .map(|m| (str_of(m, "name"), str_of(m, "mountPath")))
        .collect();
    let mut device_paths = HashSet::new();
    let mut device_names = HashSet::new();
    for (i, device) in list(ctr, "volumeDevices").iter().enumerate() {
        let p = path.index(i);
        let name = str_of(device, "name");
        let device_path = str_of(device, "devicePath");
        let source = volumes.get(name);
        let is_claim = source.is_some_and(|v| {
            get(v, "persistentVolumeClaim").is_some() || get(v, "ephemeral").is_some()
        });
        if name.is_empty() {
            causes.push(required(&p.child("name"), ""));
        }
        if device_names.contains(name) {
            causes.push(invalid(&p.child("name"), name, "must be unique"));
        }
        if source.is_some() && !is_claim {
            causes.push(invalid(
                &p.child("name"),
                name,
                "can only use volume source type of PersistentVolumeClaim or Ephemeral for block mode",
            ));
        }
        if source.is_none() {
            causes.push(not_found(&p.child("name"), name));
        }
        if device_path.is_empty() {
            causes.push(required(&p.child("devicePath"), ""));
        }
        if device_paths.contains(device_path) {
            causes.push(invalid(
                &p.child("devicePath"),
                device_path,
                "must be unique",
            ));
        }
        if !device_path.is_empty()
            && !path_no_backsteps(device_path, &path.child("devicePath")).is_empty()
        {
            causes.push(invalid(
                &p.child("devicePath"),
                device_path,
                "can not contain backsteps ('..')",
            ));
        } else {
            device_paths.insert(device_path);
        }
        if mounts.iter().any(|(n, _)| *n == name) {
            causes.push(invalid(
                &p.child("name"),
                name,
                "must not already exist in volumeMounts",
            ));
        }
        if mounts.iter().any(|(_, mp)| *mp == device_path) {
            causes.push(invalid(
                &p.child("devicePath"),
                device_path,
                "must not already exist as a path in volumeMounts",
            ));
        }
        if !name.is_empty() {
            device_names.insert(name);
        }
    }
    causes
}

const STANDARD_CONTAINER_RESOURCES: &[&str] = &["cpu", "memory", "ephemeral-storage"];
const STANDARD_RESOURCES: &[&str] = &[
    "cpu",
    "memory",
    "ephemeral-storage",
    "requests.cpu",
    "requests.memory",
    "requests.ephemeral-storage",
    "limits.cpu",
    "limits.memory",
    "limits.ephemeral-storage",
    "pods",
    "services",
    "replicationcontrollers",
    "resourcequotas",
    "secrets",
    "persistentvolumeclaims",
    "requests.storage",
    "configmaps",
    "services.nodeports",
    "services.loadbalancers",
];
const INTEGER_RESOURCES: &[&str] = &[
    "pods",
    "quota",
    "services",
    "replicationcontrollers",
    "resourcequotas",
    "secrets",
    "persistentvolumeclaims",
    "configmaps",
    "services.nodeports",
    "services.loadbalancers",
];

fn is_hugepages(name: &str) -> bool {
    name.starts_with("hugepages-")
}

fn is_native(name: &str) -> bool {
    !name.contains('/') || name.contains("kubernetes.io/")
}

fn is_extended(name: &str) -> bool {
    !is_native(name)
        && !name.starts_with("requests.")
        && names::qualified_name(&format!("requests.{name}")).is_empty()
}

fn overcommit_allowed(name: &str) -> bool {
    is_native(name) && !is_hugepages(name)
}

fn validate_container_resource_name(name: &str, path: &Path) -> Vec<Cause> {
    let mut causes: Vec<Cause> = names::qualified_name(name)
        .into_iter()
        .map(|msg| invalid(path, name, &msg))
        .collect();
    if causes.is_empty()
        && !name.contains('/')
        && !(STANDARD_RESOURCES.contains(&name)
            || is_hugepages(name)
            || name.starts_with("requests.hugepages-"))
    {
        causes.push(invalid(
            path,
            name,
            "must be a standard resource type or fully qualified",
        ));
    }
    if !name.contains('/') {
        if !(STANDARD_CONTAINER_RESOURCES.contains(&name) || is_hugepages(name)) {
            causes.push(invalid(
                path,
                name,
                "must be a standard resource for containers",
            ));
        }
    } else if !is_native(name) && !is_extended(name) {
        causes.push(invalid(
            path,
            name,
            "doesn't follow extended resource name standard",
        ));
    }
    causes
}

fn quantity_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn validate_quantity_value(name: &str, value: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let Some(milli) = quantity_milli(value) else {
        return causes;
    };
    if milli < 0 {
        causes.push(invalid(
            path,
            quantity_text(value),
            super::util::IS_NEGATIVE,
        ));
    }
    if (INTEGER_RESOURCES.contains(&name) || is_extended(name)) && milli % 1000 != 0 {
        causes.push(invalid(path, quantity_text(value), "must be an integer"));
    }
    causes
}

fn hugepages_error(name: &str, value: &Value) -> Option<String> {
    let size = Quantity::parse(name.strip_prefix("hugepages-")?).ok();
    let divisible = size
        .filter(|s| s.milli() > 0 && s.milli() % 1000 == 0)
        .zip(quantity_milli(value))
        .is_some_and(|(size, milli)| {
            let bytes = Quantity::from_milli(milli).value();
            bytes % size.value() == 0
        });
    (!divisible).then(|| {
        format!(
            "{} is not positive integer multiple of {name}",
            quantity_text(value)
        )
    })
}

/// `ValidateContainerResourceRequirements`.
pub(crate) fn validate_resources(
    resources: Option<&Value>,
    claims: &[&str],
    path: &Path,
) -> Vec<Cause> {
    let Some(resources) = resources else {
        return Vec::new();
    };
    let mut causes = Vec::new();
    let limits_path = path.child("limits");
    let requests_path = path.child("requests");
    let limits = obj(resources, "limits");
    let mut cpu_or_memory = false;
    let mut hugepages = false;
    for (name, quantity) in limits.into_iter().flatten() {
        let p = limits_path.key(name);
        causes.extend(validate_container_resource_name(name, &p));
        causes.extend(validate_quantity_value(name, quantity, &p));
        if is_hugepages(name) {
            hugepages = true;
            if let Some(msg) = hugepages_error(name, quantity) {
                causes.push(invalid(&p, quantity_text(quantity), &msg));
            }
        }
        cpu_or_memory |= name == "cpu" || name == "memory";
    }
    for (name, quantity) in obj(resources, "requests").into_iter().flatten() {
        let p = requests_path.key(name);
        causes.extend(validate_container_resource_name(name, &p));
        causes.extend(validate_quantity_value(name, quantity, &p));
        match limits.and_then(|l| l.get(name)) {
            Some(limit) => {
                let (req, lim) = (quantity_milli(quantity), quantity_milli(limit));
                if let (Some(req), Some(lim)) = (req, lim) {
                    if req != lim && !overcommit_allowed(name) {
                        causes.push(invalid(
                            &requests_path,
                            quantity_text(quantity),
                            &format!("must be equal to {name} limit of {}", quantity_text(limit)),
                        ));
                    } else if req > lim {
                        causes.push(invalid(
                            &requests_path,
                            quantity_text(quantity),
                            &format!(
                                "must be less than or equal to {name} limit of {}",
                                quantity_text(limit)
                            ),
                        ));
                    }
                }
            }
            None if !overcommit_allowed(name) => causes.push(required(
                &limits_path,
                "Limit must be set for non overcommitable resources",
            )),
            None => {}
        }
        if is_hugepages(name) {
            hugepages = true;
            if let Some(msg) = hugepages_error(name, quantity) {
                causes.push(invalid(&p, quantity_text(quantity), &msg));
            }
        }
        cpu_or_memory |= name == "cpu" || name == "memory";
    }
    if hugepages && !cpu_or_memory {
        causes.push(forbidden(path, "HugePages require cpu or memory"));
    }
    let claims_path = path.child("claims");
    let mut seen: Vec<String> = Vec::new();
    for (i, claim) in list(resources, "claims").iter().enumerate() {
        let p = claims_path.index(i);
        let name = str_of(claim, "name");
        if name.is_empty() {
            causes.push(required(&p, ""));
            continue;
        }
        let request = str_of(claim, "request");
        if seen.iter().any(|s| s == name) {
            causes.push(duplicate(&p, name));
        } else {
            let mut key = name.to_string();
            if !request.is_empty() {
                causes.extend(validate_dns1123_label(request, &p.child("request")));
                key = format!("{name}/{request}");
            }
            if seen.contains(&key) {
                causes.push(duplicate(&p, key.clone()));
            } else if request.is_empty() {
                for existing in &seen {
                    if existing.split_once('/').is_some_and(|(n, _)| n == name) {
                        causes.push(duplicate(&p, name));
                    }
                }
            }
            seen.push(key);
        }
        if !claims.contains(&name) {
            let mut sorted: Vec<&str> = claims.to_vec();
            sorted.sort_unstable();
            let detail = if sorted.is_empty() {
                "must be one of the names in pod.spec.resourceClaims which is empty".to_string()
            } else {
                format!(
                    "must be one of the names in pod.spec.resourceClaims: {}",
                    sorted.join(", ")
                )
            };
            causes.push(Cause::new(
                "FieldValueNotFound",
                p.as_str(),
                format!("Not found: {}: {detail}", Value::from(name)),
            ));
        }
    }
    causes
}

fn validate_resize_policy(policies: &[Value], pod_restart: &str, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut seen = HashSet::new();
    for (i, policy) in policies.iter().enumerate() {
        let name = str_of(policy, "resourceName");
        if !seen.insert(name) {
            causes.push(duplicate(&path.index(i), name));
        }
        match name {
            "cpu" | "memory" => {}
            "" => causes.push(required(path, "")),
            other => causes.push(not_supported(path, other, &["cpu", "memory"])),
        }
        let restart = str_of(policy, "restartPolicy");
        match restart {
            "NotRequired" | "RestartContainer" => {}
            "" => causes.push(required(path, "")),
            other => causes.push(not_supported(
                path,
                other,
                &["NotRequired", "RestartContainer"],
            )),
        }
        if pod_restart == "Never" && restart != "NotRequired" {
            causes.push(invalid(
                path,
                restart,
                "must be 'NotRequired' when `restartPolicy` is 'Never'",
            ));
        }
    }
    causes
}

fn id_range(value: Option<i64>, path: &Path) -> Vec<Cause> {
    match value {
        Some(id) if !(0..=MAX_USER_ID).contains(&id) => vec![invalid(
            path,
            id,
            &names::inclusive_range_error(0, MAX_USER_ID),
        )],
        _ => Vec::new(),
    }
}

fn validate_seccomp(profile: Option<&Value>, path: &Path) -> Vec<Cause> {
    let Some(profile) = profile else {
        return Vec::new();
    };
    let mut causes = Vec::new();
    let kind = str_of(profile, "type");
    match kind {
        "Localhost" | "RuntimeDefault" | "Unconfined" => {}
        "" => causes.push(required(
            &path.child("type"),
            "type is required when seccompProfile is set",
        )),
        other => causes.push(not_supported(
            &path.child("type"),
            other,
            &["Localhost", "RuntimeDefault", "Unconfined"],
        )),
    }
    let local = opt_str(profile, "localhostProfile");
    if kind == "Localhost" {
        match local {
            None => causes.push(required(
                &path.child("localhostProfile"),
                "must be set when seccomp type is Localhost",
            )),
            Some(local) => causes.extend(local_descending_path(
                local,
                &path.child("localhostProfile"),
            )),
        }
    } else if local.is_some() {
        causes.push(invalid(
            &path.child("localhostProfile"),
            profile.clone(),
            "can only be set when seccomp type is Localhost",
        ));
    }
    causes
}

fn validate_apparmor(profile: Option<&Value>, path: &Path) -> Vec<Cause> {
    let Some(profile) = profile else {
        return Vec::new();
    };
    let mut causes = Vec::new();
    let local = opt_str(profile, "localhostProfile");
    let local_path = path.child("localhostProfile");
    match str_of(profile, "type") {
        "Localhost" => match local {
            None => causes.push(required(
                &local_path,
                "must be set when AppArmor type is Localhost",
            )),
            Some(local) => {
                if local.trim() != local {
                    causes.push(invalid(
                        &local_path,
                        local,
                        "must not be padded with whitespace",
                    ));
                } else if local.is_empty() {
                    causes.push(required(
                        &local_path,
                        "must be set when AppArmor type is Localhost",
                    ));
                }
                if local.len() > 4095 {
                    causes.push(super::util::too_long(&local_path, 4095));
                }
            }
        },
        "RuntimeDefault" | "Unconfined" => {
            if let Some(local) = local {
                causes.push(invalid(
                    &local_path,
                    local,
                    "can only be set when AppArmor type is Localhost",
                ));
            }
        }
        "" => causes.push(required(
            &path.child("type"),
            "type is required when appArmorProfile is set",
        )),
        other => causes.push(not_supported(
            &path.child("type"),
            other,
            &["Localhost", "RuntimeDefault", "Unconfined"],
        )),
    }
    causes
}

/// `ValidateSecurityContext` of a container.
fn validate_security_context(sc: Option<&Value>, path: &Path, host_users: bool) -> Vec<Cause> {
    let Some(sc) = sc else {
        return Vec::new();
    };
    let mut causes = Vec::new();
    causes.extend(id_range(int_of(sc, "runAsUser"), &path.child("runAsUser")));
    causes.extend(id_range(
        int_of(sc, "runAsGroup"),
        &path.child("runAsGroup"),
    ));
    if let Some(proc_mount) = opt_str(sc, "procMount") {
        if !["Default", "Unmasked"].contains(&proc_mount) {
            causes.push(not_supported(
                &path.child("procMount"),
                proc_mount,
                &["Default", "Unmasked"],
            ));
        }
        if host_users && proc_mount == "Unmasked" {
            causes.push(invalid(
                &path.child("procMount"),
                proc_mount,
                "`hostUsers` must be false to use `Unmasked`",
            ));
        }
    }
    causes.extend(validate_seccomp(
        get(sc, "seccompProfile"),
        &path.child("seccompProfile"),
    ));
    if sc.get("allowPrivilegeEscalation").and_then(Value::as_bool) == Some(false) {
        if bool_of(sc, "privileged") {
            causes.push(invalid(
                path,
                sc.clone(),
                "cannot set `allowPrivilegeEscalation` to false and `privileged` to true",
            ));
        }
        let adds_sys_admin =
            get(sc, "capabilities").is_some_and(|c| strings(c, "add").contains(&"CAP_SYS_ADMIN"));
        if adds_sys_admin {
            causes.push(invalid(
                path,
                sc.clone(),
                "cannot set `allowPrivilegeEscalation` to false and `capabilities.Add` CAP_SYS_ADMIN",
            ));
        }
    }
    causes.extend(validate_apparmor(
        get(sc, "appArmorProfile"),
        &path.child("appArmorProfile"),
    ));
    causes
}

const SYSCTL_REGEX: &str =
    "^([a-z0-9]([-_a-z0-9]*[a-z0-9])?[\\./])*[a-z0-9]([-_a-z0-9]*[a-z0-9])?$";

fn valid_sysctl_name(name: &str) -> bool {
    if name.len() > 253 {
        return false;
    }
    name.split(['.', '/']).all(|segment| {
        let (Some(first), Some(last)) = (segment.chars().next(), segment.chars().last()) else {
            return false;
        };
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        ok(first) && ok(last) && segment.chars().all(|c| ok(c) || c == '-' || c == '_')
    })
}

/// Which namespace a sysctl lives in (`utilsysctl.GetNamespace`).
fn sysctl_namespace(name: &str) -> Option<&'static str> {
    let normalized = match name.find(['.', '/']) {
        Some(i) if name.get(i..).is_some_and(|rest| rest.starts_with('/')) => name
            .chars()
            .map(|c| match c {
                '/' => '.',
                '.' => '/',
                other => other,
            })
            .collect(),
        _ => name.to_string(),
    };
    if normalized == "kernel.sem"
        || ["kernel.shm", "kernel.msg", "fs.mqueue."]
            .iter()
            .any(|p| normalized.starts_with(p))
    {
        Some("ipc")
    } else if normalized.starts_with("net.") {
        Some("net")
    } else {
        None
    }
}

fn validate_pod_security_context(spec: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let empty = Value::Null;
    let sc = get(spec, "securityContext").unwrap_or(&empty);
    causes.extend(id_range(int_of(sc, "fsGroup"), &path.child("fsGroup")));
    causes.extend(id_range(int_of(sc, "runAsUser"), &path.child("runAsUser")));
    causes.extend(id_range(
        int_of(sc, "runAsGroup"),
        &path.child("runAsGroup"),
    ));
    for (i, gid) in list(sc, "supplementalGroups").iter().enumerate() {
        causes.extend(id_range(
            gid.as_i64(),
            &path.child("supplementalGroups").index(i),
        ));
    }
    if bool_of(spec, "shareProcessNamespace") && bool_of(spec, "hostPID") {
        causes.push(invalid(
            &path.child("shareProcessNamespace"),
            true,
            "ShareProcessNamespace and HostPID cannot both be enabled",
        ));
    }
    let mut seen = HashSet::new();
    for (i, sysctl) in list(sc, "sysctls").iter().enumerate() {
        let p = path.child("sysctls").index(i).child("name");
        let name = str_of(sysctl, "name");
        if name.is_empty() {
            causes.push(required(&p, ""));
        } else if !valid_sysctl_name(name) {
            causes.push(invalid(
                &p,
                name,
                &format!("must have at most 253 characters and match regex {SYSCTL_REGEX}"),
            ));
        } else if seen.contains(name) {
            causes.push(duplicate(&p, name));
        }
        match sysctl_namespace(name) {
            Some("net") if bool_of(spec, "hostNetwork") => causes.push(invalid(
                &p,
                name,
                "may not be specified when 'hostNetwork' is true",
            )),
            Some("ipc") if bool_of(spec, "hostIPC") => causes.push(invalid(
                &p,
                name,
                "may not be specified when 'hostIPC' is true",
            )),
            _ => {}
        }
        seen.insert(name);
    }
    if let Some(policy) = opt_str(sc, "fsGroupChangePolicy")
        && !["Always", "OnRootMismatch"].contains(&policy)
    {
        causes.push(not_supported(
            &path.child("fsGroupChangePolicy"),
            policy,
            &["Always", "OnRootMismatch"],
        ));
    }
    causes.extend(validate_seccomp(
        get(sc, "seccompProfile"),
        &path.child("seccompProfile"),
    ));
    causes.extend(validate_apparmor(
        get(sc, "appArmorProfile"),
        &path.child("appArmorProfile"),
    ));
    if let Some(policy) = opt_str(sc, "supplementalGroupsPolicy")
        && !["Merge", "Strict"].contains(&policy)
    {
        causes.push(not_supported(
            &path.child("supplementalGroupsPolicy"),
            policy,
            &["Merge", "Strict"],
        ));
    }
    // SELinuxMount is off in 1.33, so only Recursive is accepted.
    if let Some(policy) = opt_str(sc, "seLinuxChangePolicy")
        && policy != "Recursive"
    {
        causes.push(not_supported(
            &path.child("seLinuxChangePolicy"),
            policy,
            &["Recursive"],
        ));
    }
    causes
}

fn validate_host_network_deps(spec: &Value, path: &Path, opts: PodOpts) -> Vec<Cause> {
    let mut causes = Vec::new();
    if !bool_of(spec, "hostNetwork") {
        return causes;
    }
    for (i, ctr) in list(spec, "containers").iter().enumerate() {
        for (j, port) in list(ctr, "ports").iter().enumerate() {
            let host_port = int_of(port, "hostPort").unwrap_or(0);
            let container_port = int_of(port, "containerPort").unwrap_or(0);
            if (opts.is_pod || host_port != 0) && host_port != container_port {
                causes.push(invalid(
                    &path
                        .child("containers")
                        .index(i)
                        .child("ports")
                        .index(j)
                        .child("hostPort"),
                    host_port,
                    "must match `containerPort` when `hostNetwork` is true",
                ));
            }
        }
    }
    causes
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

fn validate_probe(probe: &Value, kind: ProbeKind, grace: Option<i64>, path: &Path) -> Vec<Cause> {
    let mut causes = validate_handler(probe, grace, path);
    for field in [
        "initialDelaySeconds",
        "timeoutSeconds",
        "periodSeconds",
        "successThreshold",
        "failureThreshold",
    ] {
        causes.extend(super::util::nonnegative(
            int_of(probe, field).unwrap_or(0),
            &path.child(field),
        ));
    }
    if let Some(seconds) = int_of(probe, "terminationGracePeriodSeconds")
        && seconds <= 0
    {
        causes.push(invalid(
            &path.child("terminationGracePeriodSeconds"),
            seconds,
            "must be greater than 0",
        ));
    }
    match kind {
        ProbeKind::Liveness | ProbeKind::Startup => {
            let threshold = int_of(probe, "successThreshold").unwrap_or(0);
            if threshold != 1 {
                causes.push(invalid(
                    &path.child("successThreshold"),
                    threshold,
                    "must be 1",
                ));
            }
        }
        ProbeKind::Readiness => {
            if let Some(seconds) = get(probe, "terminationGracePeriodSeconds") {
                causes.push(invalid(
                    &path.child("terminationGracePeriodSeconds"),
                    seconds.clone(),
                    "must not be set for readinessProbes",
                ));
            }
        }
    }
    causes
}

/// `ValidatePortNumOrName` on an `IntOrString`.
pub(crate) fn validate_port_num_or_name(port: Option<&Value>, path: &Path) -> Vec<Cause> {
    match port {
        Some(Value::String(name)) => names::port_name(name)
            .into_iter()
            .map(|msg| invalid(path, name.as_str(), &msg))
            .collect(),
        other => {
            let n = other.and_then(Value::as_i64).unwrap_or(0);
            names::port_num(n)
                .into_iter()
                .map(|msg| invalid(path, n, &msg))
                .collect()
        }
    }
}

fn validate_handler(handler: &Value, grace: Option<i64>, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut count = 0;
    for key in ["exec", "httpGet", "tcpSocket", "grpc", "sleep"] {
        let Some(action) = get(handler, key) else {
            continue;
        };
        let p = path.child(key);
        if count > 0 {
            causes.push(forbidden(&p, "may not specify more than 1 handler type"));
            continue;
        }
        count += 1;
        match key {
            "exec" => {
                if list(action, "command").is_empty() {
                    causes.push(required(&p.child("command"), ""));
                }
            }
            "httpGet" => {
                if str_of(action, "path").is_empty() {
                    causes.push(required(&p.child("path"), ""));
                }
                causes.extend(validate_port_num_or_name(
                    get(action, "port"),
                    &p.child("port"),
                ));
                let scheme = str_of(action, "scheme");
                if !["HTTP", "HTTPS"].contains(&scheme) {
                    causes.push(not_supported(
                        &p.child("scheme"),
                        scheme,
                        &["HTTP", "HTTPS"],
                    ));
                }
                for header in list(action, "httpHeaders") {
                    let name = str_of(header, "name");
                    for msg in names::http_header_name(name) {
                        causes.push(invalid(&p.child("httpHeaders"), name, &msg));
                    }
                }
            }
            "tcpSocket" => {
                causes.extend(validate_port_num_or_name(
                    get(action, "port"),
                    &p.child("port"),
                ));
            }
            "grpc" => {
                let port = int_of(action, "port").unwrap_or(0);
                for msg in names::port_num(port) {
                    causes.push(invalid(&p.child("port"), port, &msg));
                }
            }
            _ => {
                let seconds = int_of(action, "seconds").unwrap_or(0);
                if let Some(grace) = grace
                    && (seconds < 0 || seconds > grace)
                {
                    causes.push(invalid(
                        &p,
                        seconds,
                        &format!(
                            "must be non-negative and less than terminationGracePeriodSeconds ({grace})"
                        ),
                    ));
                }
            }
        }
    }
    if count == 0 {
        causes.push(required(path, "must specify a handler type"));
    }
    causes
}

/// `ValidateTolerations`.
pub(crate) fn validate_tolerations(tolerations: &[Value], path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    for (i, t) in tolerations.iter().enumerate() {
        let p = path.index(i);
        let key = str_of(t, "key");
        let operator = str_of(t, "operator");
        let value = str_of(t, "value");
        let effect = str_of(t, "effect");
        if !key.is_empty() {
            causes.extend(validate_label_name(key, &p.child("key")));
        }
        if key.is_empty() && operator != "Exists" {
            causes.push(invalid(
                &p.child("operator"),
                operator,
                "operator must be Exists when `key` is empty, which means \"match all values and all keys\"",
            ));
        }
        if get(t, "tolerationSeconds").is_some() && effect != "NoExecute" {
            causes.push(invalid(
                &p.child("effect"),
                effect,
                "effect must be 'NoExecute' when `tolerationSeconds` is set",
            ));
        }
        match operator {
            "Equal" | "" => {
                let errs = names::label_value(value);
                if !errs.is_empty() {
                    causes.push(invalid(&p.child("operator"), value, &errs.join(";")));
                }
            }
            "Exists" => {
                if !value.is_empty() {
                    causes.push(invalid(
                        &p.child("operator"),
                        value,
                        "value must be empty when `operator` is 'Exists'",
                    ));
                }
            }
            other => causes.push(not_supported(
                &p.child("operator"),
                other,
                &["Equal", "Exists"],
            )),
        }
        if !effect.is_empty() {
            causes.extend(validate_taint_effect(effect, true, &p.child("effect")));
        }
    }
    causes
}

/// `validateTaintEffect`.
pub(crate) fn validate_taint_effect(effect: &str, allow_empty: bool, path: &Path) -> Vec<Cause> {
    if !allow_empty && effect.is_empty() {
        return vec![required(path, "")];
    }
    if TAINT_EFFECTS.contains(&effect) {
        Vec::new()
    } else {
        vec![not_supported(path, effect, TAINT_EFFECTS)]
    }
}

fn validate_node_selector_requirement(
    req: &Value,
    allow_invalid_values: bool,
    path: &Path,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    let values = strings(req, "values");
    match str_of(req, "operator") {
        "In" | "NotIn" => {
            if values.is_empty() {
                causes.push(required(
                    &path.child("values"),
                    "must be specified when `operator` is 'In' or 'NotIn'",
                ));
            }
        }
        "Exists" | "DoesNotExist" => {
            if !values.is_empty() {
                causes.push(forbidden(
                    &path.child("values"),
                    "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                ));
            }
        }
        "Gt" | "Lt" => {
            if values.len() != 1 {
                causes.push(required(
                    &path.child("values"),
                    "must be specified single value when `operator` is 'Lt' or 'Gt'",
                ));
            }
        }
        other => causes.push(invalid(
            &path.child("operator"),
            other,
            "not a valid selector operator",
        )),
    }
    causes.extend(validate_label_name(str_of(req, "key"), &path.child("key")));
    if !allow_invalid_values {
        for (i, v) in values.iter().enumerate() {
            for msg in names::label_value(v) {
                causes.push(invalid(&path.child("values").index(i), *v, &msg));
            }
        }
    }
    causes
}

fn validate_node_selector_term(
    term: &Value,
    allow_invalid_values: bool,
    path: &Path,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    for (j, req) in list(term, "matchExpressions").iter().enumerate() {
        causes.extend(validate_node_selector_requirement(
            req,
            allow_invalid_values,
            &path.child("matchExpressions").index(j),
        ));
    }
    for (j, req) in list(term, "matchFields").iter().enumerate() {
        let p = path.child("matchFields").index(j);
        let values = strings(req, "values");
        match str_of(req, "operator") {
            "In" | "NotIn" => {
                if values.len() != 1 {
                    causes.push(required(
                        &p.child("values"),
                        "must be only one value when `operator` is 'In' or 'NotIn' for node field selector",
                    ));
                }
            }
            other => causes.push(invalid(
                &p.child("operator"),
                other,
                "not a valid selector operator",
            )),
        }
        let key = str_of(req, "key");
        if key != "metadata.name" {
            causes.push(invalid(
                &p.child("key"),
                key,
                "not a valid field selector key",
            ));
        } else {
            for (k, v) in values.iter().enumerate() {
                for msg in names::name_is_dns_subdomain(v, false) {
                    causes.push(invalid(&p.child("values").index(k), *v, &msg));
                }
            }
        }
    }
    causes
}

fn validate_pod_affinity_term(term: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let selector = get(term, "labelSelector");
    causes.extend(validate_label_selector(
        selector,
        SelectorOptions::default(),
        &path.child("labelSelector"),
    ));
    causes.extend(validate_label_selector(
        get(term, "namespaceSelector"),
        SelectorOptions::default(),
        &path.child("namespaceSelector"),
    ));
    for ns in strings(term, "namespaces") {
        for msg in names::name_is_dns_label(ns, false) {
            causes.push(invalid(&path.child("namespace"), ns, &msg));
        }
    }
    let match_keys = strings(term, "matchLabelKeys");
    let mismatch_keys = strings(term, "mismatchLabelKeys");
    for (field, keys) in [
        ("matchLabelKeys", &match_keys),
        ("mismatchLabelKeys", &mismatch_keys),
    ] {
        if keys.is_empty() {
            continue;
        }
        let p = path.child(field);
        if selector.is_none() {
            causes.push(forbidden(
                &p,
                "must not be specified when labelSelector is not set",
            ));
            continue;
        }
        for (i, key) in keys.iter().enumerate() {
            causes.extend(validate_label_name(key, &p.index(i)));
        }
    }
    if let Some(selector) = selector {
        let mut selector_keys: HashSet<&str> = string_map(selector, "matchLabels")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for expr in list(selector, "matchExpressions") {
            let key = str_of(expr, "key");
            if let Some(i) = match_keys.iter().rposition(|k| *k == key)
                && selector_keys.contains(key)
            {
                causes.push(invalid(
                    &path.index(i),
                    key,
                    "exists in both matchLabelKeys and labelSelector",
                ));
            }
            selector_keys.insert(key);
        }
    }
    for (i, key) in match_keys.iter().enumerate() {
        if mismatch_keys.contains(key) {
            causes.push(invalid(
                &path.child("matchLabelKeys").index(i),
                *key,
                "exists in both matchLabelKeys and mismatchLabelKeys",
            ));
        }
    }
    let topology_key = str_of(term, "topologyKey");
    if topology_key.is_empty() {
        causes.push(required(&path.child("topologyKey"), "can not be empty"));
    }
    causes.extend(validate_label_name(
        topology_key,
        &path.child("topologyKey"),
    ));
    causes
}

fn validate_weight(weight: i64, path: &Path) -> Vec<Cause> {
    if (1..=100).contains(&weight) {
        Vec::new()
    } else {
        vec![invalid(path, weight, "must be in the range 1-100")]
    }
}

fn validate_affinity(affinity: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    if let Some(node) = get(affinity, "nodeAffinity") {
        let p = path.child("nodeAffinity");
        if let Some(required_terms) = get(node, "requiredDuringSchedulingIgnoredDuringExecution") {
            let rp = p
                .child("requiredDuringSchedulingIgnoredDuringExecution")
                .child("nodeSelectorTerms");
            let terms = list(required_terms, "nodeSelectorTerms");
            if terms.is_empty() {
                causes.push(required(&rp, "must have at least one node selector term"));
            }
            for (i, term) in terms.iter().enumerate() {
                causes.extend(validate_node_selector_term(term, false, &rp.index(i)));
            }
        }
        let pp = p.child("preferredDuringSchedulingIgnoredDuringExecution");
        for (i, term) in list(node, "preferredDuringSchedulingIgnoredDuringExecution")
            .iter()
            .enumerate()
        {
            causes.extend(validate_weight(
                int_of(term, "weight").unwrap_or(0),
                &pp.index(i).child("weight"),
            ));
            if let Some(preference) = get(term, "preference") {
                causes.extend(validate_node_selector_term(
                    preference,
                    true,
                    &pp.index(i).child("preference"),
                ));
            }
        }
    }
    for kind in ["podAffinity", "podAntiAffinity"] {
        let Some(pod) = get(affinity, kind) else {
            continue;
        };
        let p = path.child(kind);
        let rp = p.child("requiredDuringSchedulingIgnoredDuringExecution");
        for (i, term) in list(pod, "requiredDuringSchedulingIgnoredDuringExecution")
            .iter()
            .enumerate()
        {
            causes.extend(validate_pod_affinity_term(term, &rp.index(i)));
        }
        let pp = p.child("preferredDuringSchedulingIgnoredDuringExecution");
        for (i, weighted) in list(pod, "preferredDuringSchedulingIgnoredDuringExecution")
            .iter()
            .enumerate()
        {
            causes.extend(validate_weight(
                int_of(weighted, "weight").unwrap_or(0),
                &pp.index(i).child("weight"),
            ));
            let empty = Value::Null;
            causes.extend(validate_pod_affinity_term(
                get(weighted, "podAffinityTerm").unwrap_or(&empty),
                &pp.index(i).child("podAffinityTerm"),
            ));
        }
    }
    causes
}

fn dns1123_subdomain_with_underscore(value: &str) -> Vec<String> {
    let label_ok = |l: &str| {
        let l = l.strip_prefix('_').unwrap_or(l);
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        match (l.chars().next(), l.chars().last()) {
            (Some(f), Some(e)) => {
                ok(f) && ok(e) && l.chars().all(|c| ok(c) || c == '-' || c == '_')
            }
            _ => false,
        }
    };
    let mut errs = Vec::new();
    if value.len() > names::DNS1123_SUBDOMAIN_MAX {
        errs.push(names::max_len_error(names::DNS1123_SUBDOMAIN_MAX));
    }
    if !value.split('.').all(label_ok) {
        errs.push(names::regex_error(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '_', '-' or '.', and must start and end with an alphanumeric character",
            "_?[a-z0-9]([-_a-z0-9]*[a-z0-9])?(\\._?[a-z0-9]([-_a-z0-9]*[a-z0-9])?)*",
            &["example.com"],
        ));
    }
    errs
}

fn validate_dns_config(spec: &Value, path: &Path) -> Vec<Cause> {
    let config = get(spec, "dnsConfig");
    if str_of(spec, "dnsPolicy") == "None" {
        match config {
            None => {
                return vec![required(
                    path,
                    "must provide `dnsConfig` when `dnsPolicy` is None",
                )];
            }
            Some(c) if list(c, "nameservers").is_empty() => {
                return vec![required(
                    &path.child("nameservers"),
                    "must provide at least one DNS nameserver when `dnsPolicy` is None",
                )];
            }
            Some(_) => {}
        }
    }
    let Some(config) = config else {
        return Vec::new();
    };
    let mut causes = Vec::new();
    let nameservers = list(config, "nameservers");
    if nameservers.len() > 3 {
        causes.push(invalid(
            &path.child("nameservers"),
            Value::Array(nameservers.to_vec()),
            "must not have more than 3 nameservers",
        ));
    }
    for (i, ns) in nameservers.iter().enumerate() {
        let ns = ns.as_str().unwrap_or("");
        if names::parse_ip_sloppy(ns).is_none() {
            causes.push(invalid(&path.child("nameservers").index(i), ns, INVALID_IP));
        }
    }
    let searches = strings(config, "searches");
    if searches.len() > 32 {
        causes.push(invalid(
            &path.child("searches"),
            Value::from(searches.clone()),
            "must not have more than 32 search paths",
        ));
    }
    if searches.join(" ").len() > 2048 {
        causes.push(invalid(
            &path.child("searches"),
            Value::from(searches.clone()),
            "must not have more than 2048 characters (including spaces) in the search list",
        ));
    }
    for (i, search) in searches.iter().enumerate() {
        if *search == "." {
            continue;
        }
        let trimmed = search.strip_suffix('.').unwrap_or(search);
        for msg in dns1123_subdomain_with_underscore(trimmed) {
            causes.push(invalid(&path.child("searches").index(i), trimmed, &msg));
        }
    }
    for (i, option) in list(config, "options").iter().enumerate() {
        if str_of(option, "name").is_empty() {
            causes.push(required(
                &path.child("options").index(i),
                "must not be empty",
            ));
        }
    }
    causes
}

fn validate_topology_spread(constraints: &[Value], path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    for (i, c) in constraints.iter().enumerate() {
        let p = path.index(i);
        let max_skew = int_of(c, "maxSkew").unwrap_or(0);
        if max_skew <= 0 {
            causes.push(invalid(
                &p.child("maxSkew"),
                max_skew,
                "must be greater than zero",
            ));
        }
        let topology_key = str_of(c, "topologyKey");
        if topology_key.is_empty() {
            causes.push(required(&p.child("topologyKey"), "can not be empty"));
        }
        let action = str_of(c, "whenUnsatisfiable");
        if !["DoNotSchedule", "ScheduleAnyway"].contains(&action) {
            causes.push(not_supported(
                &p.child("whenUnsatisfiable"),
                action,
                &["DoNotSchedule", "ScheduleAnyway"],
            ));
        }
        let repeated = constraints.iter().skip(i + 1).any(|other| {
            str_of(other, "topologyKey") == topology_key
                && str_of(other, "whenUnsatisfiable") == action
        });
        if repeated {
            causes.push(duplicate(
                &p.child("{topologyKey, whenUnsatisfiable}"),
                format!("{{{topology_key}, {action}}}"),
            ));
        }
        if let Some(min_domains) = int_of(c, "minDomains") {
            if min_domains <= 0 {
                causes.push(invalid(
                    &p.child("minDomains"),
                    min_domains,
                    "must be greater than zero",
                ));
            }
            if action != "DoNotSchedule" {
                causes.push(invalid(
                    &p.child("minDomains"),
                    min_domains,
                    &format!(
                        "can only use minDomains if whenUnsatisfiable=DoNotSchedule, not {action}"
                    ),
                ));
            }
        }
        for field in ["nodeAffinityPolicy", "nodeTaintsPolicy"] {
            if let Some(policy) = opt_str(c, field)
                && !["Honor", "Ignore"].contains(&policy)
            {
                causes.push(not_supported(&p.child(field), policy, &["Honor", "Ignore"]));
            }
        }
        let selector = get(c, "labelSelector");
        let keys = strings(c, "matchLabelKeys");
        if !keys.is_empty() {
            let kp = p.child("matchLabelKeys");
            let selector_keys: HashSet<&str> = match selector {
                Some(s) => string_map(s, "matchLabels")
                    .into_iter()
                    .map(|(k, _)| k)
                    .chain(list(s, "matchExpressions").iter().map(|e| str_of(e, "key")))
                    .collect(),
                None => {
                    causes.push(forbidden(
                        &kp,
                        "must not be specified when labelSelector is not set",
                    ));
                    HashSet::new()
                }
            };
            for (j, key) in keys.iter().enumerate() {
                causes.extend(validate_label_name(key, &kp.index(j)));
                if selector_keys.contains(key) {
                    causes.push(invalid(
                        &kp.index(j),
                        *key,
                        "exists in both matchLabelKeys and labelSelector",
                    ));
                }
            }
        }
        causes.extend(validate_label_selector(
            selector,
            SelectorOptions::default(),
            &p.child("labelSelector"),
        ));
    }
    causes
}

fn validate_os(spec: &Value, os: &Value, path: &Path) -> Vec<Cause> {
    let p = path.child("os");
    let name = str_of(os, "name");
    if name.is_empty() {
        return vec![required(&p.child("name"), "cannot be empty")];
    }
    if !["linux", "windows"].contains(&name) {
        return vec![not_supported(&p, name, &["linux", "windows"])];
    }
    let mut causes = Vec::new();
    let pod_sc = get(spec, "securityContext");
    let containers = ["initContainers", "containers", "ephemeralContainers"]
        .into_iter()
        .flat_map(|key| {
            list(spec, key)
                .iter()
                .enumerate()
                .map(move |(i, c)| (path.child(key).index(i), c))
        });
    if name == "linux" {
        if pod_sc.is_some_and(|sc| get(sc, "windowsOptions").is_some()) {
            causes.push(forbidden(
                &path.child("securityContext").child("windowsOptions"),
                "windows options cannot be set for a linux pod",
            ));
        }
        for (cp, c) in containers {
            if get(c, "securityContext").is_some_and(|sc| get(sc, "windowsOptions").is_some()) {
                causes.push(forbidden(
                    &cp.child("securityContext").child("windowsOptions"),
                    "windows options cannot be set for a linux pod",
                ));
            }
        }
        return causes;
    }
    const WINDOWS_MSG: &str = "cannot be set for a windows pod";
    if let Some(sc) = pod_sc {
        let sp = path.child("securityContext");
        for field in ["appArmorProfile", "seLinuxOptions"] {
            if get(sc, field).is_some() {
                causes.push(forbidden(&sp.child(field), WINDOWS_MSG));
            }
        }
        if get(spec, "hostUsers").is_some() {
            causes.push(forbidden(&path.child("hostUsers"), WINDOWS_MSG));
        }
        for field in ["hostPID", "hostIPC"] {
            if bool_of(spec, field) {
                causes.push(forbidden(&path.child(field), WINDOWS_MSG));
            }
        }
        for field in ["seccompProfile", "fsGroup", "fsGroupChangePolicy"] {
            if get(sc, field).is_some() {
                causes.push(forbidden(&sp.child(field), WINDOWS_MSG));
            }
        }
        if !list(sc, "sysctls").is_empty() {
            causes.push(forbidden(&sp.child("sysctls"), WINDOWS_MSG));
        }
        if get(spec, "shareProcessNamespace").is_some() {
            causes.push(forbidden(&path.child("shareProcessNamespace"), WINDOWS_MSG));
        }
        for field in [
            "runAsUser",
            "runAsGroup",
            "supplementalGroups",
            "supplementalGroupsPolicy",
            "seLinuxChangePolicy",
        ] {
            if get(sc, field).is_some() {
                causes.push(forbidden(&sp.child(field), WINDOWS_MSG));
            }
        }
    }
    for (cp, c) in containers {
        let Some(sc) = get(c, "securityContext") else {
            continue;
        };
        let sp = cp.child("securityContext");
        for field in [
            "appArmorProfile",
            "seLinuxOptions",
            "seccompProfile",
            "capabilities",
            "readOnlyRootFilesystem",
            "privileged",
            "allowPrivilegeEscalation",
            "procMount",
            "runAsUser",
            "runAsGroup",
        ] {
            if get(sc, field).is_some() {
                causes.push(forbidden(&sp.child(field), WINDOWS_MSG));
            }
        }
    }
    causes
}

fn validate_seccomp_annotation(profile: &str, path: &Path) -> Vec<Cause> {
    match profile {
        "runtime/default" | "docker/default" | "unconfined" => Vec::new(),
        p => match p.strip_prefix("localhost/") {
            Some(local) => local_descending_path(local, path),
            None => vec![invalid(path, p, "must be a valid seccomp profile")],
        },
    }
}

fn spec_has_container(spec: &Value, name: &str) -> bool {
    ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|key| list(spec, key))
        .any(|c| str_of(c, "name") == name)
}

/// `ValidatePodSpecificAnnotations`.
pub(crate) fn validate_pod_specific_annotations(
    annotations: &[(&str, &str)],
    spec: &Value,
    path: &Path,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    let find = |key: &str| annotations.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    if let Some(mirror) = find(MIRROR_ANNOTATION)
        && str_of(spec, "nodeName").is_empty()
    {
        causes.push(invalid(
            &path.key(MIRROR_ANNOTATION),
            mirror,
            "must set spec.nodeName if mirror pod annotation is set",
        ));
    }
    if let Some(raw) = find(TOLERATIONS_ANNOTATION).filter(|v| !v.is_empty()) {
        match serde_json::from_str::<Vec<Value>>(raw) {
            Ok(tolerations) => causes.extend(validate_tolerations(
                &tolerations,
                &path.child(TOLERATIONS_ANNOTATION),
            )),
            Err(e) => causes.push(invalid(path, TOLERATIONS_ANNOTATION, &e.to_string())),
        }
    }
    if let Some(cost) = find(DELETION_COST_ANNOTATION)
        && cost.parse::<i32>().is_err()
    {
        causes.push(invalid(
            &path.key(DELETION_COST_ANNOTATION),
            cost,
            "must be a 32bit integer",
        ));
    }
    if let Some(profile) = find(SECCOMP_POD_ANNOTATION) {
        causes.extend(validate_seccomp_annotation(
            profile,
            &path.child(SECCOMP_POD_ANNOTATION),
        ));
    }
    for (k, v) in annotations {
        if k.starts_with(SECCOMP_CONTAINER_PREFIX) {
            causes.extend(validate_seccomp_annotation(v, &path.child(k)));
        }
        if let Some(container) = k.strip_prefix(APPARMOR_PREFIX) {
            if !spec_has_container(spec, container) {
                causes.push(invalid(&path.key(k), container, "container not found"));
            }
            let valid = v.is_empty()
                || *v == "runtime/default"
                || *v == "unconfined"
                || v.starts_with("localhost/");
            if !valid {
                causes.push(invalid(
                    &path.key(k),
                    *v,
                    &format!("invalid AppArmor profile name: {v:?}"),
                ));
            }
        }
    }
    causes
}

/// `ValidatePodTemplateSpec`.
pub(crate) fn validate_pod_template_spec(template: &Value, path: &Path) -> Vec<Cause> {
    let empty = Value::Null;
    let meta = get(template, "metadata").unwrap_or(&empty);
    let spec = get(template, "spec").unwrap_or(&empty);
    let annotations = string_map(meta, "annotations");
    let mut causes = validate_labels(&string_map(meta, "labels"), &path.child("labels"));
    causes.extend(validate_annotations(
        &annotations,
        &path.child("annotations"),
    ));
    causes.extend(validate_pod_specific_annotations(
        &annotations,
        spec,
        &path.child("annotations"),
    ));
    causes.extend(validate_pod_spec(
        spec,
        None,
        &path.child("spec"),
        PodOpts { is_pod: false },
    ));
    if !list(spec, "ephemeralContainers").is_empty() {
        causes.push(forbidden(
            &path.child("spec").child("ephemeralContainers"),
            "ephemeral containers not allowed in pod template",
        ));
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec_causes(spec: Value) -> Vec<(String, String)> {
        validate_pod_spec(
            &spec,
            Some("p"),
            &Path::new("spec"),
            PodOpts { is_pod: true },
        )
        .into_iter()
        .map(|c| (c.field, c.reason))
        .collect()
    }

    fn has(causes: &[(String, String)], field: &str, reason: &str) -> bool {
        causes.iter().any(|(f, r)| f == field && r == reason)
    }

    fn valid_spec() -> Value {
        json!({
            "containers": [{"name": "c", "image": "nginx", "imagePullPolicy": "Always",
                "terminationMessagePolicy": "File", "resources": {}}],
            "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "terminationGracePeriodSeconds": 30, "securityContext": {}
        })
    }

    #[test]
    fn valid_spec_passes() {
        assert_eq!(spec_causes(valid_spec()), Vec::<(String, String)>::new());
    }

    #[test]
    fn containers_required_and_unique() {
        let mut spec = valid_spec();
        spec["containers"] = json!([]);
        assert!(has(
            &spec_causes(spec.clone()),
            "spec.containers",
            "FieldValueRequired"
        ));
        let c = valid_spec()["containers"][0].clone();
        spec["containers"] = json!([c.clone(), c.clone()]);
        spec["initContainers"] = json!([c]);
        let causes = spec_causes(spec);
        assert!(has(
            &causes,
            "spec.containers[1].name",
            "FieldValueDuplicate"
        ));
        assert!(has(
            &causes,
            "spec.initContainers[0].name",
            "FieldValueDuplicate"
        ));
    }

    #[test]
    fn container_fields() {
        let mut spec = valid_spec();
        spec["containers"][0] = json!({
            "name": "Bad_Name", "image": "", "imagePullPolicy": "Sometimes",
            "terminationMessagePolicy": "",
            "ports": [{"containerPort": 70000, "protocol": "TCP", "name": "http"},
                      {"containerPort": 80, "protocol": "TCP", "name": "http"},
                      {"protocol": "XYZ"}],
            "env": [{"name": ""}, {"name": "A=B"}, {"name": "X", "valueFrom": {}}],
            "volumeMounts": [{"name": "missing", "mountPath": "/a"}],
            "resources": {"limits": {"cpu": "100m"}, "requests": {"cpu": "200m", "memory": "-1"}}
        });
        let causes = spec_causes(spec);
        for (field, reason) in [
            ("spec.containers[0].name", "FieldValueInvalid"),
            ("spec.containers[0].image", "FieldValueRequired"),
            (
                "spec.containers[0].imagePullPolicy",
                "FieldValueNotSupported",
            ),
            (
                "spec.containers[0].terminationMessagePolicy",
                "FieldValueRequired",
            ),
            (
                "spec.containers[0].ports[0].containerPort",
                "FieldValueInvalid",
            ),
            ("spec.containers[0].ports[1].name", "FieldValueDuplicate"),
            (
                "spec.containers[0].ports[2].containerPort",
                "FieldValueRequired",
            ),
            (
                "spec.containers[0].ports[2].protocol",
                "FieldValueNotSupported",
            ),
            ("spec.containers[0].env[0].name", "FieldValueRequired"),
            ("spec.containers[0].env[1].name", "FieldValueInvalid"),
            ("spec.containers[0].env[2].valueFrom", "FieldValueInvalid"),
            (
                "spec.containers[0].volumeMounts[0].name",
                "FieldValueNotFound",
            ),
            ("spec.containers[0].resources.requests", "FieldValueInvalid"),
            (
                "spec.containers[0].resources.requests[memory]",
                "FieldValueInvalid",
            ),
        ] {
            assert!(has(&causes, field, reason), "{field} {reason}: {causes:?}");
        }
    }

    #[test]
    fn request_above_limit_message() {
        let res = json!({"limits": {"cpu": "100m"}, "requests": {"cpu": "200m"}});
        let causes = validate_resources(Some(&res), &[], &Path::new("r"));
        assert_eq!(
            causes[0].message,
            "Invalid value: \"200m\": must be less than or equal to cpu limit of 100m"
        );
        let res = json!({"requests": {"example.com/gpu": "1"}, "limits": {"foo": "1"}});
        let causes = validate_resources(Some(&res), &[], &Path::new("r"));
        assert!(causes.iter().any(|c| {
            c.message
                .contains("must be a standard resource type or fully qualified")
        }));
        assert!(causes.iter().any(|c| {
            c.message
                .contains("Limit must be set for non overcommitable resources")
        }));
    }

    #[test]
    fn enums_and_probes() {
        let mut spec = valid_spec();
        spec["restartPolicy"] = json!("Sometimes");
        spec["dnsPolicy"] = json!("");
        spec["containers"][0]["livenessProbe"] = json!({"successThreshold": 2});
        spec["containers"][0]["readinessProbe"] = json!({"httpGet": {"path": "/", "port": "http", "scheme": "HTTP"}, "exec": {"command": ["x"]}});
        let causes = spec_causes(spec);
        assert!(has(&causes, "spec.restartPolicy", "FieldValueNotSupported"));
        assert!(has(&causes, "spec.dnsPolicy", "FieldValueRequired"));
        assert!(has(
            &causes,
            "spec.containers[0].livenessProbe",
            "FieldValueRequired"
        ));
        assert!(has(
            &causes,
            "spec.containers[0].livenessProbe.successThreshold",
            "FieldValueInvalid"
        ));
        assert!(has(
            &causes,
            "spec.containers[0].readinessProbe.httpGet",
            "FieldValueForbidden"
        ));
    }

    #[test]
    fn tolerations_and_affinity() {
        let tolerations = json!([
            {"operator": "Equal", "value": "x"},
            {"key": "k", "operator": "Exists", "value": "v", "effect": "Bogus"},
            {"key": "k", "tolerationSeconds": 5, "effect": "NoSchedule"}
        ]);
        let causes = validate_tolerations(
            tolerations.as_array().map(Vec::as_slice).unwrap_or(&[]),
            &Path::new("spec.tolerations"),
        );
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.tolerations[0].operator",
                "spec.tolerations[1].operator",
                "spec.tolerations[1].effect",
                "spec.tolerations[2].effect"
            ]
        );
        let mut spec = valid_spec();
        spec["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}},
            "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}}]}});
        let causes = spec_causes(spec);
        assert!(has(
            &causes,
            "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms",
            "FieldValueRequired"
        ));
        assert!(has(
            &causes,
            "spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey",
            "FieldValueRequired"
        ));
    }

    #[test]
    fn template_restrictions() {
        let tpl = json!({"metadata": {"labels": {"a b": "c"}}, "spec": {
            "containers": [{"name": "c", "image": "i", "imagePullPolicy": "Always", "terminationMessagePolicy": "File",
                "ports": [{"containerPort": 80, "protocol": "TCP"}]}],
            "hostNetwork": true,
            "ephemeralContainers": [{"name": "e", "image": "i", "imagePullPolicy": "Always", "terminationMessagePolicy": "File"}],
            "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "terminationGracePeriodSeconds": 30}});
        let causes: Vec<(String, String)> =
            validate_pod_template_spec(&tpl, &Path::new("spec.template"))
                .into_iter()
                .map(|c| (c.field, c.reason))
                .collect();
        assert!(has(&causes, "spec.template.labels", "FieldValueInvalid"));
        assert!(has(
            &causes,
            "spec.template.spec.ephemeralContainers",
            "FieldValueForbidden"
        ));
        // A template may leave hostPort at 0 under hostNetwork; a pod may not.
        assert!(!causes.iter().any(|(f, _)| f.ends_with("hostPort")));
    }

    #[test]
    fn field_refs() {
        let fr = json!({"apiVersion": "v1", "fieldPath": "metadata.labels['app']"});
        assert!(validate_object_field_selector(&fr, ENV_FIELD_PATHS, &Path::new("f")).is_empty());
        let fr = json!({"apiVersion": "v1", "fieldPath": "status.phase"});
        let causes = validate_object_field_selector(&fr, ENV_FIELD_PATHS, &Path::new("f"));
        assert_eq!(causes[0].reason, "FieldValueNotSupported");
        let fr = json!({"apiVersion": "v1", "fieldPath": "spec.bogus"});
        let causes = validate_object_field_selector(&fr, ENV_FIELD_PATHS, &Path::new("f"));
        assert!(
            causes[0]
                .message
                .contains("field label not supported: spec.bogus")
        );
    }

    #[test]
    fn sysctls() {
        assert!(valid_sysctl_name("net.ipv4.ip_forward"));
        assert!(valid_sysctl_name("kernel/shm_rmid_forced"));
        assert!(!valid_sysctl_name("Net.x"));
        assert_eq!(sysctl_namespace("net.core.somaxconn"), Some("net"));
        assert_eq!(sysctl_namespace("kernel/shm_rmid_forced"), Some("ipc"));
        assert_eq!(sysctl_namespace("vm.x"), None);
    }
}
