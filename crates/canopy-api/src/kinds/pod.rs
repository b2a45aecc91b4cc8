//! Pods: defaulting (`SetDefaults_Pod`, `SetDefaults_PodSpec`, containers, probes), the
//! `Priority`, `DefaultTolerationSeconds` and (its default account) `ServiceAccount` admission plugins, the registry strategy, QoS
//! classes and `ValidatePodCreate`/`ValidatePodUpdate`.

use serde_json::{Map, Value, json};

use super::meta::{self, validate_object_meta, validate_object_meta_update};
use super::names;
use super::podspec::{
    APPARMOR_PREFIX, PodOpts, validate_image_whitespace, validate_pod_spec,
    validate_pod_specific_annotations, validate_tolerations,
};
use super::util::{
    Path, default_int, default_str, default_value, diff, duplicate, ensure_obj, forbidden, get,
    immutable, int_of, invalid, items_mut, list, obj, obj_mut, opt_str, required, semantic_eq, set,
    str_of, strings,
};
use super::volumes::default_volume;
use crate::quantity::Quantity;
use crate::status::Cause;

/// The pull policy upstream picks for an image reference: `Always` for `:latest` or no tag,
/// `IfNotPresent` otherwise (including references that do not parse).
pub(crate) fn pull_policy_for(image: &str) -> &'static str {
    match image_tag(image) {
        Some(tag) if tag == "latest" => "Always",
        _ => "IfNotPresent",
    }
}

/// The tag of an image reference as `parsers.ParseImageName` sees it: the explicit tag,
/// `""` for a digest-only reference, `latest` when neither is given, `None` on parse errors.
fn image_tag(image: &str) -> Option<String> {
    let (name_tag, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let (algorithm, hex) = digest.split_once(':')?;
        let algorithm_ok = !algorithm.is_empty()
            && algorithm
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+' | '.'));
        if !algorithm_ok || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
    }
    let (prefix, last) = match name_tag.rsplit_once('/') {
        Some((prefix, last)) => (Some(prefix), last),
        None => (None, name_tag),
    };
    let (last_name, tag) = match last.rsplit_once(':') {
        Some((n, t)) => (n, Some(t)),
        None => (last, None),
    };
    let name = match prefix {
        Some(prefix) => format!("{prefix}/{last_name}"),
        None => last_name.to_string(),
    };
    if !valid_repository(&name) {
        return None;
    }
    match tag {
        Some(tag) => {
            let ok = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            ok.then(|| tag.to_string())
        }
        None if digest.is_some() => Some(String::new()),
        None => Some("latest".to_string()),
    }
}

fn valid_repository(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    let mut components: Vec<&str> = name.split('/').collect();
    if components.len() > 1
        && let Some(first) = components.first()
        && (first.contains('.') || first.contains(':') || *first == "localhost")
    {
        if !valid_domain(first) {
            return false;
        }
        components.remove(0);
    }
    components.iter().all(|c| valid_path_component(c))
}

fn valid_domain(domain: &str) -> bool {
    let (host, port) = match domain.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (domain, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    let host_ok = host.split('.').all(|label| {
        let (Some(first), Some(last)) = (label.chars().next(), label.chars().last()) else {
            return false;
        };
        first.is_ascii_alphanumeric()
            && last.is_ascii_alphanumeric()
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    port_ok && host_ok
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`
fn valid_path_component(component: &str) -> bool {
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = component.as_bytes();
    let mut i = 0;
    loop {
        let start = i;
        while i < bytes.len() && bytes.get(i).is_some_and(|c| alnum(*c)) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        let sep_start = i;
        match bytes.get(i) {
            Some(b'.') => i += 1,
            Some(b'_') => {
                i += 1;
                if bytes.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            Some(b'-') => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == sep_start || i == bytes.len() {
            return false;
        }
    }
}

/// `SetDefaults_Container` and the defaulters of what a container holds.
fn default_container(ctr: &mut Value) {
    if str_of(ctr, "imagePullPolicy").is_empty() {
        let policy = pull_policy_for(str_of(ctr, "image"));
        set(ctr, "imagePullPolicy", json!(policy));
    }
    default_str(ctr, "terminationMessagePath", "/dev/termination-log");
    default_str(ctr, "terminationMessagePolicy", "File");
    for port in items_mut(ctr, "ports") {
        default_str(port, "protocol", "TCP");
    }
    for var in items_mut(ctr, "env") {
        if let Some(field_ref) = obj_mut(var, "valueFrom").and_then(|f| obj_mut(f, "fieldRef")) {
            default_str(field_ref, "apiVersion", "v1");
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = obj_mut(ctr, probe) {
            default_int(p, "timeoutSeconds", 1);
            default_int(p, "periodSeconds", 10);
            default_int(p, "successThreshold", 1);
            default_int(p, "failureThreshold", 3);
            default_handler(p);
        }
    }
    if let Some(lifecycle) = obj_mut(ctr, "lifecycle") {
        for hook in ["postStart", "preStop"] {
            if let Some(h) = obj_mut(lifecycle, hook) {
                default_handler(h);
            }
        }
    }
    // `resources` is a struct, not a pointer, so upstream always serializes it.
    default_value(ctr, "resources", json!({}));
}

fn default_handler(handler: &mut Value) {
    if let Some(http) = obj_mut(handler, "httpGet") {
        default_str(http, "path", "/");
        default_str(http, "scheme", "HTTP");
    }
    if let Some(grpc) = obj_mut(handler, "grpc") {
        default_value(grpc, "service", json!(""));
    }
}

/// `SetDefaults_PodSpec` plus the defaulters of containers and volumes, as
/// `SetObjectDefaults_*` runs them for every embedded pod spec.
pub(crate) fn default_pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    default_str(spec, "dnsPolicy", "ClusterFirst");
    default_str(spec, "restartPolicy", "Always");
    default_value(spec, "securityContext", json!({}));
    default_value(spec, "terminationGracePeriodSeconds", json!(30));
    default_str(spec, "schedulerName", "default-scheduler");
    // An empty nodeName is no node. Protobuf bodies carry Go's zero value, which upstream's
    // JSON leaves out; kept, it would read as bound to every client that tests presence.
    if spec.get("nodeName").and_then(Value::as_str) == Some("") {
        super::util::remove(spec, "nodeName");
    }
    // The v1 conversion treats `serviceAccount` as an alias, the newer field winning.
    if str_of(spec, "serviceAccountName").is_empty()
        && let Some(alias) = opt_str(spec, "serviceAccount").map(str::to_string)
    {
        set(spec, "serviceAccountName", json!(alias));
    }
    match str_of(spec, "serviceAccountName").to_string() {
        name if name.is_empty() => {
            super::util::remove(spec, "serviceAccountName");
            super::util::remove(spec, "serviceAccount");
        }
        name => set(spec, "serviceAccount", json!(name)),
    }
    for key in ["initContainers", "containers", "ephemeralContainers"] {
        for ctr in items_mut(spec, key) {
            default_container(ctr);
        }
    }
    for volume in items_mut(spec, "volumes") {
        default_volume(volume);
    }
}

/// Defaults of a pod template (`metadata` is a struct upstream, so always present).
pub(crate) fn default_pod_template(template: &mut Value) {
    if ensure_obj(template, "metadata").is_none() {
        return;
    }
    if let Some(spec) = ensure_obj(template, "spec") {
        default_pod_spec(spec);
    }
}

/// `SetObjectDefaults_Pod`: `SetDefaults_Pod` (only pods, not templates) then the spec.
pub(crate) fn default_pod(pod: &mut Value) {
    convert_ip_lists(pod);
    let Some(spec) = ensure_obj(pod, "spec") else {
        return;
    };
    for key in ["containers", "initContainers"] {
        for ctr in items_mut(spec, key) {
            copy_limits_to_requests(ctr);
        }
    }
    default_value(spec, "enableServiceLinks", json!(true));
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        for key in ["containers", "initContainers"] {
            for ctr in items_mut(spec, key) {
                for port in items_mut(ctr, "ports") {
                    if int_of(port, "hostPort").unwrap_or(0) == 0
                        && let Some(container_port) = int_of(port, "containerPort")
                    {
                        set(port, "hostPort", json!(container_port));
                    }
                }
            }
        }
    }
    default_pod_spec(spec);
}

fn copy_limits_to_requests(ctr: &mut Value) {
    let Some(resources) = obj_mut(ctr, "resources") else {
        return;
    };
    let limits: Map<String, Value> = match obj(resources, "limits") {
        Some(l) if !l.is_empty() => l.clone(),
        _ => return,
    };
    if let Some(requests) = ensure_obj(resources, "requests").and_then(Value::as_object_mut) {
        for (k, v) in limits {
            requests.entry(k).or_insert(v);
        }
    }
}

/// The v1 conversion keeps `podIP`/`podIPs` and `hostIP`/`hostIPs` in step, the singular
/// field winning when both are set and disagree.
fn convert_ip_lists(pod: &mut Value) {
    let Some(status) = obj_mut(pod, "status") else {
        return;
    };
    for (single, plural) in [("podIP", "podIPs"), ("hostIP", "hostIPs")] {
        let ip = str_of(status, single).to_string();
        let first = list(status, plural)
            .first()
            .map(|p| str_of(p, "ip").to_string());
        if !ip.is_empty() && first.as_deref() != Some(ip.as_str()) {
            set(status, plural, json!([{"ip": ip}]));
        } else if let Some(first) = first {
            set(status, single, json!(first));
        }
    }
}

fn quantity_of(value: &Value) -> Option<Quantity> {
    match value {
        Value::String(s) => Quantity::parse(s).ok(),
        Value::Number(n) => Quantity::parse(&n.to_string()).ok(),
        _ => None,
    }
}

/// `ComputePodQOS`: Guaranteed, Burstable or BestEffort from the cpu and memory requests and
/// limits of the regular and init containers.
pub fn pod_qos_class(pod: &Value) -> &'static str {
    let empty = Value::Null;
    let spec = get(pod, "spec").unwrap_or(&empty);
    fn add(sums: &mut Vec<(String, i128)>, name: &str, milli: i128) {
        match sums.iter_mut().find(|(n, _)| n == name) {
            Some((_, total)) => *total = total.saturating_add(milli),
            None => sums.push((name.to_string(), milli)),
        }
    }
    let mut requests: Vec<(String, i128)> = Vec::new();
    let mut limits: Vec<(String, i128)> = Vec::new();
    let mut guaranteed = true;
    for ctr in list(spec, "containers")
        .iter()
        .chain(list(spec, "initContainers"))
    {
        let resources = get(ctr, "resources").unwrap_or(&empty);
        for (name, q) in obj(resources, "requests").into_iter().flatten() {
            if name != "cpu" && name != "memory" {
                continue;
            }
            if let Some(q) = quantity_of(q).filter(|q| q.milli() > 0) {
                add(&mut requests, name, q.milli());
            }
        }
        let mut found = Vec::new();
        for (name, q) in obj(resources, "limits").into_iter().flatten() {
            if name != "cpu" && name != "memory" {
                continue;
            }
            if let Some(q) = quantity_of(q).filter(|q| q.milli() > 0) {
                found.push(name.as_str());
                add(&mut limits, name, q.milli());
            }
        }
        if !(found.contains(&"cpu") && found.contains(&"memory")) {
            guaranteed = false;
        }
    }
    if requests.is_empty() && limits.is_empty() {
        return "BestEffort";
    }
    if guaranteed {
        guaranteed = requests
            .iter()
            .all(|(name, req)| limits.iter().any(|(n, lim)| n == name && lim == req));
    }
    if guaranteed && requests.len() == limits.len() {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

/// The `DefaultTolerationSeconds` admission plugin: tolerate not-ready and unreachable
/// nodes for 300 seconds unless the pod already tolerates them.
fn add_default_tolerations(spec: &mut Value) {
    let tolerates = |taint: &str| {
        list(spec, "tolerations").iter().any(|t| {
            let key = str_of(t, "key");
            let effect = str_of(t, "effect");
            (key == taint || key.is_empty()) && (effect == "NoExecute" || effect.is_empty())
        })
    };
    let missing: Vec<&str> = [NOT_READY_TAINT, UNREACHABLE_TAINT]
        .into_iter()
        .filter(|t| !tolerates(t))
        .collect();
    if missing.is_empty() {
        return;
    }
    let Some(map) = spec.as_object_mut() else {
        return;
    };
    let tolerations = map
        .entry("tolerations")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !tolerations.is_array() {
        *tolerations = Value::Array(Vec::new());
    }
    if let Some(list) = tolerations.as_array_mut() {
        for taint in missing {
            list.push(json!({
                "key": taint,
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            }));
        }
    }
}

/// The `ServiceAccount` admission plugin's default: a pod that names no service account
/// runs as its namespace's `default` one (so that a projected token has an account).
fn default_service_account(spec: &mut Value) {
    if str_of(spec, "serviceAccountName").is_empty() && str_of(spec, "serviceAccount").is_empty() {
        set(spec, "serviceAccountName", json!("default"));
        set(spec, "serviceAccount", json!("default"));
    }
}

/// The built-in priority classes every cluster has.
fn priority_of_class(class: &str) -> Option<i64> {
    match class {
        "" => Some(0),
        "system-cluster-critical" => Some(2_000_000_000),
        "system-node-critical" => Some(2_000_001_000),
        _ => None,
    }
}

/// The `Priority` admission plugin on create. A priority that disagrees with the class is
/// left in place for [`validate_create`] to reject, as upstream's plugin refuses it.
fn resolve_priority(spec: &mut Value) {
    let Some(priority) = priority_of_class(str_of(spec, "priorityClassName")) else {
        return;
    };
    if int_of(spec, "priority").is_none_or(|p| p == priority) {
        set(spec, "priority", json!(priority));
    }
    if opt_str(spec, "preemptionPolicy").is_none() {
        set(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
    }
}

fn spec_of(pod: &mut Value) -> Option<&mut Value> {
    ensure_obj(pod, "spec")
}

/// `podStrategy.PrepareForCreate`, after the mutating admission plugins.
pub(crate) fn prepare_create(pod: &mut Value) {
    if let Some(spec) = spec_of(pod) {
        default_service_account(spec);
        add_default_tolerations(spec);
        resolve_priority(spec);
    }
    let qos = pod_qos_class(pod);
    set(pod, "status", json!({"phase": "Pending", "qosClass": qos}));
    let gated = get(pod, "spec").is_some_and(|s| !list(s, "schedulingGates").is_empty());
    if gated && let Some(status) = obj_mut(pod, "status") {
        set(
            status,
            "conditions",
            json!([{
                "type": "PodScheduled",
                "status": "False",
                "reason": "SchedulingGated",
                "message": "Scheduling is blocked due to non-empty scheduling gates",
            }]),
        );
    }
    mutate_pod_affinity(pod);
}

/// `mutatePodAffinity` (`MatchLabelKeysInPodAffinity`): fold `matchLabelKeys` and
/// `mismatchLabelKeys` into the term's label selector using the pod's own labels.
fn mutate_pod_affinity(pod: &mut Value) {
    let labels: Vec<(String, String)> = meta::labels_of(pod)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let Some(affinity) = obj_mut(pod, "spec").and_then(|s| obj_mut(s, "affinity")) else {
        return;
    };
    for kind in ["podAffinity", "podAntiAffinity"] {
        let Some(terms) = obj_mut(affinity, kind) else {
            continue;
        };
        for term in items_mut(terms, "requiredDuringSchedulingIgnoredDuringExecution") {
            apply_label_keys(term, &labels);
        }
        for weighted in items_mut(terms, "preferredDuringSchedulingIgnoredDuringExecution") {
            if let Some(term) = obj_mut(weighted, "podAffinityTerm") {
                apply_label_keys(term, &labels);
            }
        }
    }
}

fn apply_label_keys(term: &mut Value, labels: &[(String, String)]) {
    let match_keys: Vec<String> = strings(term, "matchLabelKeys")
        .into_iter()
        .map(str::to_string)
        .collect();
    let mismatch_keys: Vec<String> = strings(term, "mismatchLabelKeys")
        .into_iter()
        .map(str::to_string)
        .collect();
    if match_keys.is_empty() && mismatch_keys.is_empty() {
        return;
    }
    let Some(selector) = obj_mut(term, "labelSelector") else {
        return;
    };
    let mut added = Vec::new();
    for (keys, op) in [(&match_keys, "In"), (&mismatch_keys, "NotIn")] {
        for key in keys {
            if let Some((_, value)) = labels.iter().find(|(k, _)| k == key) {
                added.push(json!({"key": key, "operator": op, "values": [value]}));
            }
        }
    }
    if added.is_empty() {
        return;
    }
    if let Some(map) = selector.as_object_mut() {
        let exprs = map
            .entry("matchExpressions")
            .or_insert_with(|| Value::Array(Vec::new()));
        if !exprs.is_array() {
            *exprs = Value::Array(Vec::new());
        }
        if let Some(list) = exprs.as_array_mut() {
            list.extend(added);
        }
    }
}

/// `podStrategy.PrepareForUpdate`, after the mutating admission plugins.
pub(crate) fn prepare_update(new: &mut Value, old: &Value) {
    let empty = Value::Null;
    let old_spec = get(old, "spec").unwrap_or(&empty);
    if let Some(spec) = spec_of(new) {
        add_default_tolerations(spec);
        // The Priority plugin ignores updates to these; validation rejects other changes.
        for field in ["priority", "preemptionPolicy"] {
            match get(old_spec, field) {
                Some(v) => set(spec, field, v.clone()),
                None => {
                    super::util::remove(spec, field);
                }
            }
        }
    }
    keep_status(new, old);
}

/// Copies the old status (or its absence) onto the new object.
pub(crate) fn keep_status(new: &mut Value, old: &Value) {
    match get(old, "status") {
        Some(status) => set(new, "status", status.clone()),
        None => {
            super::util::remove(new, "status");
        }
    }
}

/// Copies an old top-level field (or its absence) onto the new object.
pub(crate) fn keep_field(new: &mut Value, old: &Value, field: &str) {
    match get(old, field) {
        Some(v) => set(new, field, v.clone()),
        None => {
            super::util::remove(new, field);
        }
    }
}

/// `podStatusStrategy.PrepareForUpdate`.
pub(crate) fn prepare_status_update(new: &mut Value, old: &Value) {
    keep_field(new, old, "spec");
    let old_refs = get(old, "metadata")
        .and_then(|m| get(m, "ownerReferences"))
        .cloned();
    if let Some(meta) = ensure_obj(new, "metadata") {
        match old_refs {
            Some(refs) => set(meta, "ownerReferences", refs),
            None => {
                super::util::remove(meta, "ownerReferences");
            }
        }
    }
    let empty = Value::Null;
    let old_status = get(old, "status").unwrap_or(&empty);
    if let Some(status) = ensure_obj(new, "status") {
        if str_of(status, "qosClass").is_empty()
            && let Some(qos) = get(old_status, "qosClass")
        {
            set(status, "qosClass", qos.clone());
        }
        if int_of(status, "observedGeneration").unwrap_or(0) == 0
            && let Some(generation) = get(old_status, "observedGeneration")
        {
            set(status, "observedGeneration", generation.clone());
        }
        let mut old_generations: Vec<(String, i64)> = list(old_status, "conditions")
            .iter()
            .map(|c| {
                (
                    str_of(c, "type").to_string(),
                    int_of(c, "observedGeneration").unwrap_or(0),
                )
            })
            .collect();
        for condition in items_mut(status, "conditions") {
            let kind = str_of(condition, "type").to_string();
            let previous = old_generations
                .iter()
                .position(|(t, _)| *t == kind)
                .map(|i| old_generations.remove(i).1)
                .unwrap_or(0);
            if int_of(condition, "observedGeneration").unwrap_or(0) == 0 && previous != 0 {
                set(condition, "observedGeneration", json!(previous));
            }
        }
    }
}

fn validate_metadata_and_spec(pod: &Value) -> Vec<Cause> {
    let empty = Value::Null;
    let spec = get(pod, "spec").unwrap_or(&empty);
    let meta_path = Path::new("metadata");
    let spec_path = Path::new("spec");
    let mut causes = validate_object_meta(pod, true, names::name_is_dns_subdomain, &meta_path);
    causes.extend(validate_pod_specific_annotations(
        &meta::annotations_of(pod),
        spec,
        &meta_path.child("annotations"),
    ));
    let name = get(pod, "metadata").map(|m| str_of(m, "name"));
    causes.extend(validate_pod_spec(
        spec,
        name,
        &spec_path,
        PodOpts { is_pod: true },
    ));
    if str_of(spec, "serviceAccountName").is_empty() {
        for (vi, volume) in list(spec, "volumes").iter().enumerate() {
            let Some(projected) = get(volume, "projected") else {
                continue;
            };
            for (si, source) in list(projected, "sources").iter().enumerate() {
                if get(source, "serviceAccountToken").is_some() {
                    causes.push(forbidden(
                        &spec_path
                            .child("volumes")
                            .index(vi)
                            .child("projected")
                            .child("sources")
                            .index(si)
                            .child("serviceAccountToken"),
                        "must not be specified when serviceAccountName is not set",
                    ));
                }
            }
        }
    }
    for key in ["containers", "initContainers"] {
        for (i, ctr) in list(spec, key).iter().enumerate() {
            causes.extend(validate_image_whitespace(
                ctr,
                &spec_path.child(key).index(i),
            ));
        }
    }
    causes
}

/// `ValidatePodCreate`, plus the `Priority` plugin's refusal of a mismatched priority.
pub(crate) fn validate_create(pod: &Value) -> Vec<Cause> {
    let mut causes = validate_metadata_and_spec(pod);
    let empty = Value::Null;
    let spec = get(pod, "spec").unwrap_or(&empty);
    let spec_path = Path::new("spec");
    if !list(spec, "ephemeralContainers").is_empty() {
        causes.push(forbidden(
            &spec_path.child("ephemeralContainers"),
            "cannot be set on create",
        ));
    }
    if !str_of(spec, "nodeName").is_empty() && !list(spec, "schedulingGates").is_empty() {
        causes.push(forbidden(
            &spec_path.child("nodeName"),
            "cannot be set until all schedulingGates have been cleared",
        ));
    }
    let class = str_of(spec, "priorityClassName");
    if priority_of_class(class).is_none() {
        // Only the built-in classes exist here; upstream's plugin refuses any other name.
        causes.push(forbidden(
            &spec_path.child("priorityClassName"),
            &format!("no PriorityClass with name {class} was found"),
        ));
    }
    if let (Some(expected), Some(given)) = (
        priority_of_class(str_of(spec, "priorityClassName")),
        int_of(spec, "priority"),
    ) && expected != given
    {
        causes.push(forbidden(
            &spec_path.child("priority"),
            &format!(
                "the integer value of priority ({given}) must not be provided in pod spec; priority admission controller computed {expected} from the given PriorityClass name"
            ),
        ));
    }
    causes
}

const UPDATABLE_FIELDS: &[&str] = &[
    "`spec.containers[*].image`",
    "`spec.initContainers[*].image`",
    "`spec.activeDeadlineSeconds`",
    "`spec.tolerations` (only additions to existing tolerations)",
    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
];

fn validate_container_updates(new: &[Value], old: &[Value], path: &Path) -> (Vec<Cause>, bool) {
    if new.len() != old.len() {
        return (
            vec![forbidden(
                path,
                "pod updates may not add or remove containers",
            )],
            true,
        );
    }
    let mut causes = Vec::new();
    for (i, ctr) in new.iter().enumerate() {
        if str_of(ctr, "image").is_empty() {
            causes.push(required(&path.index(i).child("image"), ""));
        }
        causes.extend(validate_image_whitespace(ctr, &path.index(i)));
    }
    (causes, false)
}

fn tolerations_equal_but_seconds(old: &Value, new: &Value) -> bool {
    ["key", "operator", "value", "effect"]
        .iter()
        .all(|f| str_of(old, f) == str_of(new, f))
}

fn validate_only_added_tolerations(new: &[Value], old: &[Value], path: &Path) -> Vec<Cause> {
    for o in old {
        if !new.iter().any(|n| tolerations_equal_but_seconds(o, n)) {
            return vec![forbidden(
                path,
                "existing toleration can not be modified except its tolerationSeconds",
            )];
        }
    }
    validate_tolerations(new, path)
}

fn validate_annotation_updates(new: &Value, old: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let new_annotations = meta::annotations_of(new);
    let old_annotations = meta::annotations_of(old);
    for (k, v) in &old_annotations {
        if new_annotations.iter().any(|(nk, nv)| nk == k && nv == v) {
            continue;
        }
        if k.starts_with(APPARMOR_PREFIX) {
            causes.push(forbidden(
                &path.key(k),
                "may not remove or update AppArmor annotations",
            ));
        }
        if *k == "kubernetes.io/config.mirror" {
            causes.push(forbidden(
                &path.key(k),
                "may not remove or update mirror pod annotation",
            ));
        }
    }
    for (k, _) in &new_annotations {
        if old_annotations.iter().any(|(ok, _)| ok == k) {
            continue;
        }
        if k.starts_with(APPARMOR_PREFIX) {
            causes.push(forbidden(&path.key(k), "may not add AppArmor annotations"));
        }
        if *k == "kubernetes.io/config.mirror" {
            causes.push(forbidden(&path.key(k), "may not add mirror pod annotation"));
        }
    }
    causes
}

fn node_affinity_required_terms(spec: &Value) -> Option<&[Value]> {
    let required = get(spec, "affinity")
        .and_then(|a| get(a, "nodeAffinity"))
        .and_then(|n| get(n, "requiredDuringSchedulingIgnoredDuringExecution"))?;
    Some(list(required, "nodeSelectorTerms"))
}

fn term_only_adds(new: &Value, old: &Value) -> bool {
    let (old_exprs, old_fields) = (list(old, "matchExpressions"), list(old, "matchFields"));
    let (new_exprs, new_fields) = (list(new, "matchExpressions"), list(new, "matchFields"));
    if old_exprs.is_empty()
        && old_fields.is_empty()
        && !(new_exprs.is_empty() && new_fields.is_empty())
    {
        return false;
    }
    let prefix_kept = |new: &[Value], old: &[Value]| {
        old.is_empty()
            || (new.len() >= old.len()
                && new
                    .iter()
                    .zip(old)
                    .all(|(n, o)| semantic_eq(Some(n), Some(o))))
    };
    prefix_kept(new_exprs, old_exprs) && prefix_kept(new_fields, old_fields)
}

/// Relaxations for pods still gated from scheduling: node selectors and required node
/// affinity may grow. Returns the errors and rewrites the munged spec to the old values.
fn gated_pod_mutations(munged: &mut Value, old_spec: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    if !semantic_eq(get(munged, "nodeSelector"), get(old_spec, "nodeSelector")) {
        let new_selector = super::util::string_map(munged, "nodeSelector");
        let mutated = super::util::string_map(old_spec, "nodeSelector")
            .into_iter()
            .any(|(k, v)| !new_selector.contains(&(k, v)));
        if mutated {
            causes.push(invalid(
                &path.child("nodeSelector"),
                get(munged, "nodeSelector").cloned().unwrap_or(Value::Null),
                "only additions to spec.nodeSelector are allowed (no mutations or deletions)",
            ));
        }
        keep_field(munged, old_spec, "nodeSelector");
    }
    let old_affinity = get(old_spec, "affinity").and_then(|a| get(a, "nodeAffinity"));
    let new_affinity = get(munged, "affinity").and_then(|a| get(a, "nodeAffinity"));
    if !semantic_eq(old_affinity, new_affinity) {
        let affinity_path = path.child("affinity").child("nodeAffinity");
        let terms_path = affinity_path
            .child("requiredDuringSchedulingIgnoredDuringExecution")
            .child("nodeSelectorTerms");
        let old_terms = node_affinity_required_terms(old_spec).unwrap_or(&[]);
        let new_terms = node_affinity_required_terms(munged).unwrap_or(&[]);
        if !old_terms.is_empty() && old_terms.len() != new_terms.len() {
            causes.push(invalid(
                &terms_path,
                Value::Array(new_terms.to_vec()),
                "no additions/deletions to non-empty NodeSelectorTerms list are allowed",
            ));
        } else {
            for (i, (o, n)) in old_terms.iter().zip(new_terms).enumerate() {
                if !term_only_adds(n, o) {
                    causes.push(invalid(
                        &terms_path.index(i),
                        n.clone(),
                        "only additions are allowed (no mutations or deletions)",
                    ));
                }
            }
        }
        let old_node_affinity = old_affinity.cloned();
        let old_has_affinity = get(old_spec, "affinity").is_some();
        let only_node = get(munged, "affinity").is_some_and(|a| {
            get(a, "podAffinity").is_none() && get(a, "podAntiAffinity").is_none()
        });
        match (get(munged, "affinity").is_some(), old_node_affinity) {
            (false, None) => {}
            (false, Some(old_na)) => set(munged, "affinity", json!({"nodeAffinity": old_na})),
            (true, _) if !old_has_affinity && only_node => {
                super::util::remove(munged, "affinity");
            }
            (true, old_na) => {
                if let Some(affinity) = obj_mut(munged, "affinity") {
                    match old_na {
                        Some(na) => set(affinity, "nodeAffinity", na),
                        None => {
                            super::util::remove(affinity, "nodeAffinity");
                        }
                    }
                }
            }
        }
    }
    causes
}

fn validate_status(new: &Value, old: &Value) -> Vec<Cause> {
    let empty = Value::Null;
    let status = get(new, "status").unwrap_or(&empty);
    let old_status = get(old, "status").unwrap_or(&empty);
    let old_spec = get(old, "spec").unwrap_or(&empty);
    let status_path = Path::new("status");
    let mut causes = Vec::new();
    for (i, condition) in list(status, "conditions").iter().enumerate() {
        let kind = str_of(condition, "type");
        if !["PodScheduled", "Ready", "Initialized"].contains(&kind) {
            // Upstream roots this path at metadata.
            causes.extend(meta::validate_qualified_name(
                kind,
                &Path::new("metadata")
                    .child("conditions")
                    .index(i)
                    .child("Type"),
            ));
        }
    }
    let nominated = str_of(status, "nominatedNodeName");
    if nominated != str_of(old_status, "nominatedNodeName") && !nominated.is_empty() {
        for msg in names::name_is_dns_subdomain(nominated, false) {
            causes.push(invalid(
                &status_path.child("nominatedNodeName"),
                nominated,
                &msg,
            ));
        }
    }
    causes.extend(immutable(
        Some(&json!(str_of(status, "qosClass"))),
        Some(&json!(str_of(old_status, "qosClass"))),
        &status_path.child("qosClass"),
    ));
    let restart = str_of(old_spec, "restartPolicy");
    let init_restartable: Vec<&str> = list(old_spec, "initContainers")
        .iter()
        .filter(|c| str_of(c, "restartPolicy") == "Always")
        .map(|c| str_of(c, "name"))
        .collect();
    for (field, policy, skip) in [
        ("containerStatuses", restart, &[][..]),
        (
            "initContainerStatuses",
            restart,
            init_restartable.as_slice(),
        ),
        ("ephemeralContainerStatuses", "Never", &[][..]),
    ] {
        if policy == "Always" {
            continue;
        }
        for (i, old_cs) in list(old_status, field).iter().enumerate() {
            let Some(terminated) = get(old_cs, "state").and_then(|s| get(s, "terminated")) else {
                continue;
            };
            if int_of(terminated, "exitCode").unwrap_or(0) != 0 && policy == "OnFailure" {
                continue;
            }
            let name = str_of(old_cs, "name");
            if skip.contains(&name) {
                continue;
            }
            let revived = list(status, field).iter().any(|cs| {
                str_of(cs, "name") == name
                    && get(cs, "state")
                        .and_then(|s| get(s, "terminated"))
                        .is_none()
            });
            if revived {
                causes.push(forbidden(
                    &status_path.child(field).index(i).child("state"),
                    "may not be transitioned to non-terminated state",
                ));
            }
        }
    }
    causes.extend(validate_ip_list(status, "podIPs", &status_path));
    let host_ips = list(status, "hostIPs");
    if let Some(first) = host_ips.first()
        && str_of(status, "hostIP") != str_of(first, "ip")
    {
        causes.push(invalid(
            &status_path.child("hostIPs").index(0).child("ip"),
            str_of(first, "ip"),
            "must be equal to `hostIP`",
        ));
    }
    causes.extend(validate_ip_list(status, "hostIPs", &status_path));
    causes
}

fn validate_ip_list(status: &Value, field: &str, status_path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let path = status_path.child(field);
    let entries = list(status, field);
    let ips: Vec<&str> = entries.iter().map(|e| str_of(e, "ip")).collect();
    for (i, ip) in ips.iter().enumerate() {
        if names::parse_ip_sloppy(ip).is_none() {
            causes.push(invalid(&path.index(i), *ip, names::INVALID_IP));
        }
    }
    if ips.len() > 1 {
        let v6 = ips.iter().filter(|ip| names::is_ipv6(ip)).count();
        let dual =
            ips.iter().all(|ip| names::parse_ip_sloppy(ip).is_some()) && v6 >= 1 && v6 < ips.len();
        if !dual || ips.len() > 2 {
            causes.push(invalid(
                &path,
                Value::Array(entries.to_vec()),
                "may specify no more than one IP for each IP family",
            ));
        }
        let mut seen = Vec::new();
        for (i, (ip, entry)) in ips.iter().zip(entries).enumerate() {
            if seen.contains(ip) {
                causes.push(duplicate(&path.index(i), entry.clone()));
            }
            seen.push(*ip);
        }
    }
    causes
}

/// `ValidatePodUpdate`, plus the checks of `ValidatePodStatusUpdate` that only concern
/// status (they pass trivially on main-resource updates, which keep the old status).
pub(crate) fn validate_update(new: &Value, old: &Value) -> Vec<Cause> {
    let meta_path = Path::new("metadata");
    let spec_path = Path::new("spec");
    let mut causes = validate_object_meta_update(new, old, &meta_path);
    causes.extend(validate_metadata_and_spec(new));
    causes.extend(validate_annotation_updates(
        new,
        old,
        &meta_path.child("annotations"),
    ));
    causes.extend(validate_status(new, old));
    let empty = Value::Null;
    let new_spec = get(new, "spec").unwrap_or(&empty);
    let old_spec = get(old, "spec").unwrap_or(&empty);
    for key in ["containers", "initContainers"] {
        let (errs, stop) = validate_container_updates(
            list(new_spec, key),
            list(old_spec, key),
            &spec_path.child(key),
        );
        causes.extend(errs);
        if stop {
            return causes;
        }
    }
    let deadline_path = spec_path.child("activeDeadlineSeconds");
    match (
        int_of(new_spec, "activeDeadlineSeconds"),
        int_of(old_spec, "activeDeadlineSeconds"),
    ) {
        (Some(new_deadline), old_deadline) => {
            if !(0..=i64::from(i32::MAX)).contains(&new_deadline) {
                causes.push(invalid(
                    &deadline_path,
                    new_deadline,
                    &names::inclusive_range_error(0, i64::from(i32::MAX)),
                ));
                return causes;
            }
            if old_deadline.is_some_and(|o| o < new_deadline) {
                causes.push(invalid(
                    &deadline_path,
                    new_deadline,
                    "must be less than or equal to previous value",
                ));
                return causes;
            }
        }
        (None, Some(_)) => causes.push(invalid(
            &deadline_path,
            Value::Null,
            "must not update from a positive integer to nil value",
        )),
        (None, None) => {}
    }
    causes.extend(validate_only_added_tolerations(
        list(new_spec, "tolerations"),
        list(old_spec, "tolerations"),
        &spec_path.child("tolerations"),
    ));
    let old_gates: Vec<&str> = list(old_spec, "schedulingGates")
        .iter()
        .map(|g| str_of(g, "name"))
        .collect();
    for (i, gate) in list(new_spec, "schedulingGates").iter().enumerate() {
        let name = str_of(gate, "name");
        if !old_gates.contains(&name) {
            causes.push(forbidden(
                &spec_path.child("schedulingGates").index(i).child("name"),
                &format!("only deletion is allowed, but found new scheduling gate '{name}'"),
            ));
        }
    }
    if semantic_eq(Some(new_spec), Some(old_spec)) {
        return causes;
    }
    let mut munged = new_spec.clone();
    for key in ["containers", "initContainers"] {
        let old_list = list(old_spec, key);
        for (ctr, old_ctr) in items_mut(&mut munged, key).zip(old_list) {
            match get(old_ctr, "image") {
                Some(image) => set(ctr, "image", image.clone()),
                None => {
                    super::util::remove(ctr, "image");
                }
            }
        }
    }
    for field in ["activeDeadlineSeconds", "schedulingGates", "tolerations"] {
        keep_field(&mut munged, old_spec, field);
    }
    if int_of(old_spec, "terminationGracePeriodSeconds").is_some_and(|g| g < 0)
        && int_of(&munged, "terminationGracePeriodSeconds") == Some(1)
    {
        keep_field(&mut munged, old_spec, "terminationGracePeriodSeconds");
    }
    if !old_gates.is_empty() {
        causes.extend(gated_pod_mutations(&mut munged, old_spec, &spec_path));
    }
    if !semantic_eq(Some(&munged), Some(old_spec)) {
        let mut lines = Vec::new();
        diff(Some(old_spec), Some(&munged), &spec_path, &mut lines);
        causes.push(forbidden(
            &spec_path,
            &format!(
                "pod updates may not change fields other than {}\n{}",
                UPDATABLE_FIELDS.join(","),
                lines.join("\n")
            ),
        ));
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_pull_policies() {
        assert_eq!(pull_policy_for("nginx"), "Always");
        assert_eq!(pull_policy_for("nginx:latest"), "Always");
        assert_eq!(pull_policy_for("nginx:1.25"), "IfNotPresent");
        assert_eq!(pull_policy_for("localhost:5000/app"), "Always");
        assert_eq!(pull_policy_for("localhost:5000/app:v1"), "IfNotPresent");
        assert_eq!(pull_policy_for("registry.k8s.io/pause:3.9"), "IfNotPresent");
        assert_eq!(
            pull_policy_for(
                "nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            ),
            "IfNotPresent"
        );
        assert_eq!(pull_policy_for("NGINX"), "IfNotPresent");
        assert_eq!(pull_policy_for(""), "IfNotPresent");
        assert_eq!(pull_policy_for("a__b/c-d.e_f"), "Always");
        assert_eq!(pull_policy_for("a___b"), "IfNotPresent");
    }

    #[test]
    fn qos_classes() {
        let pod = |resources: Value| json!({"spec": {"containers": [{"name": "c", "resources": resources}]}});
        assert_eq!(pod_qos_class(&pod(json!({}))), "BestEffort");
        assert_eq!(
            pod_qos_class(&pod(json!({"requests": {"cpu": "100m"}}))),
            "Burstable"
        );
        assert_eq!(
            pod_qos_class(&pod(json!({
                "limits": {"cpu": "1", "memory": "1Gi"},
                "requests": {"cpu": "1000m", "memory": "1Gi"}
            }))),
            "Guaranteed"
        );
        assert_eq!(
            pod_qos_class(&pod(
                json!({"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m", "memory": "1Gi"}})
            )),
            "Burstable"
        );
        assert_eq!(
            pod_qos_class(&pod(json!({"requests": {"example.com/gpu": "1"}}))),
            "BestEffort"
        );
        assert_eq!(pod_qos_class(&json!("not a pod")), "BestEffort");
    }

    #[test]
    fn an_empty_node_name_is_no_node() {
        let mut spec = json!({"nodeName": "", "containers": []});
        default_pod_spec(&mut spec);
        assert!(spec.get("nodeName").is_none(), "{spec}");
        let mut bound = json!({"nodeName": "n1", "containers": []});
        default_pod_spec(&mut bound);
        assert_eq!(bound["nodeName"], "n1");
    }

    #[test]
    fn default_tolerations_only_when_missing() {
        let mut spec = json!({"tolerations": [{"operator": "Exists"}]});
        add_default_tolerations(&mut spec);
        assert_eq!(list(&spec, "tolerations").len(), 1);
        let mut spec = json!({"tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}]});
        add_default_tolerations(&mut spec);
        assert_eq!(list(&spec, "tolerations").len(), 2);
        assert_eq!(
            spec["tolerations"][1]["key"],
            "node.kubernetes.io/unreachable"
        );
    }

    #[test]
    fn affinity_label_keys_are_folded_in() {
        let mut pod = json!({"metadata": {"labels": {"app": "web", "ver": "1"}}, "spec": {"affinity": {"podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "k", "matchLabelKeys": ["ver"], "mismatchLabelKeys": ["missing"]}]}}}});
        mutate_pod_affinity(&mut pod);
        assert_eq!(
            pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                [0]["labelSelector"]["matchExpressions"],
            json!([{"key": "ver", "operator": "In", "values": ["1"]}])
        );
    }

    #[test]
    fn ip_lists_are_kept_in_step() {
        let mut pod = json!({"status": {"podIP": "10.0.0.1"}});
        convert_ip_lists(&mut pod);
        assert_eq!(pod["status"]["podIPs"], json!([{"ip": "10.0.0.1"}]));
        let mut pod = json!({"status": {"hostIPs": [{"ip": "10.0.0.2"}]}});
        convert_ip_lists(&mut pod);
        assert_eq!(pod["status"]["hostIP"], "10.0.0.2");
    }
}
