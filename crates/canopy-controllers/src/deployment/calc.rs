//! The pure part of the deployment controller, after upstream's
//! `pkg/controller/deployment/util`: template hashes, revisions, the maxSurge/maxUnavailable
//! arithmetic, proportional scaling, conditions and the computed status. Nothing here calls
//! the API, so all of it is unit tested below.

use std::{cmp::Ordering, collections::BTreeMap};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet},
        core::v1::PodTemplateSpec,
    },
    apimachinery::pkg::{apis::meta::v1::Time, util::intstr::IntOrString},
    jiff::Timestamp,
};
use serde_json::Value;

/// The label that tells a deployment's replica sets (and their pods) apart.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// The rollout sequence number of a replica set (and of its deployment).
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// The earlier revisions a replica set served, when a rollback made it new again.
pub const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
/// The deployment's replicas when the replica set was last scaled.
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
/// The deployment's replicas plus maxSurge when the replica set was last scaled.
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
/// Upstream's `kubectl.kubernetes.io/last-applied-configuration`, never copied to replica sets.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// The extensions/v1beta1 rollback request, never copied to replica sets.
const DEPRECATED_ROLLBACK_TO: &str = "deprecated.deployment.rollback.to";
/// Upstream keeps the revision history annotation under this many characters.
pub const MAX_REV_HISTORY_CHARS: usize = 2000;

/// The Progressing condition's reasons, as upstream writes them.
pub mod reason {
    /// A replica set of the deployment was scaled as part of the rollout.
    pub const REPLICA_SET_UPDATED: &str = "ReplicaSetUpdated";
    /// The new replica set could not be created.
    pub const FAILED_RS_CREATE: &str = "ReplicaSetCreateError";
    /// The controller created the new replica set.
    pub const NEW_RS_CREATED: &str = "NewReplicaSetCreated";
    /// The controller found (adopted) the new replica set.
    pub const FOUND_NEW_RS: &str = "FoundNewReplicaSet";
    /// The new replica set is complete and available.
    pub const NEW_RS_AVAILABLE: &str = "NewReplicaSetAvailable";
    /// No progress within `progressDeadlineSeconds`.
    pub const TIMED_OUT: &str = "ProgressDeadlineExceeded";
    /// The deployment is paused.
    pub const PAUSED: &str = "DeploymentPaused";
    /// The deployment was resumed.
    pub const RESUMED: &str = "DeploymentResumed";
    /// Available condition: enough replicas are available.
    pub const MIN_AVAILABLE: &str = "MinimumReplicasAvailable";
    /// Available condition: too few replicas are available.
    pub const MIN_UNAVAILABLE: &str = "MinimumReplicasUnavailable";
}

/// Condition types.
pub const PROGRESSING: &str = "Progressing";
/// Condition types.
pub const AVAILABLE: &str = "Available";
/// Condition types.
pub const REPLICA_FAILURE: &str = "ReplicaFailure";

/// The strategy types.
pub const RECREATE: &str = "Recreate";
/// The strategy types.
pub const ROLLING_UPDATE: &str = "RollingUpdate";

// ---------------------------------------------------------------------------------------
// Field access with upstream's defaults.

/// `spec.replicas` (defaulted to 1 by the API server).
pub fn replicas(d: &Deployment) -> i32 {
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

/// The strategy type, `RollingUpdate` unless set.
pub fn strategy_type(d: &Deployment) -> &str {
    d.spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        .unwrap_or(ROLLING_UPDATE)
}

/// Whether the deployment rolls with maxSurge/maxUnavailable.
pub fn is_rolling_update(d: &Deployment) -> bool {
    strategy_type(d) == ROLLING_UPDATE
}

/// `spec.paused`.
pub fn paused(d: &Deployment) -> bool {
    d.spec.as_ref().and_then(|s| s.paused).unwrap_or(false)
}

/// `spec.minReadySeconds`.
pub fn min_ready_seconds(d: &Deployment) -> i32 {
    d.spec
        .as_ref()
        .and_then(|s| s.min_ready_seconds)
        .unwrap_or(0)
}

/// `spec.progressDeadlineSeconds`, unless unset or "never" (MaxInt32): `HasProgressDeadline`.
pub fn progress_deadline(d: &Deployment) -> Option<i32> {
    d.spec
        .as_ref()
        .and_then(|s| s.progress_deadline_seconds)
        .filter(|s| *s != i32::MAX)
}

/// `spec.revisionHistoryLimit`, unless unset or "keep all" (MaxInt32).
pub fn revision_history_limit(d: &Deployment) -> Option<i32> {
    d.spec
        .as_ref()
        .and_then(|s| s.revision_history_limit)
        .filter(|s| *s != i32::MAX)
}

/// The deployment's pod template (an empty one if the spec is missing).
pub fn template(d: &Deployment) -> PodTemplateSpec {
    d.spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default()
}

/// A replica set's `spec.replicas` (defaulted to 1 by the API server).
pub fn rs_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

/// Sets a replica set's `spec.replicas`.
pub fn set_rs_replicas(rs: &mut ReplicaSet, replicas: i32) {
    rs.spec.get_or_insert_with(Default::default).replicas = Some(replicas);
}

/// `status.replicas` of a replica set: the pods it has.
pub fn rs_actual(rs: &ReplicaSet) -> i32 {
    rs.status.as_ref().map_or(0, |s| s.replicas)
}

/// `status.readyReplicas` of a replica set.
pub fn rs_ready(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

/// `status.availableReplicas` of a replica set.
pub fn rs_available(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

/// The annotations of a replica set.
fn annotations(rs: &ReplicaSet) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    rs.metadata.annotations.as_ref().unwrap_or(&EMPTY)
}

fn int_annotation(rs: &ReplicaSet, key: &str) -> Option<i32> {
    annotations(rs).get(key)?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// The template hash.

/// The alphabet of `rand.SafeEncodeString`: no vowels (no words) and no confusable
/// characters.
const SAFE_ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Upstream's `rand.SafeEncodeString`: every byte mapped into [`SAFE_ALPHANUMS`].
pub fn safe_encode(s: &str) -> String {
    s.bytes()
        .map(|b| SAFE_ALPHANUMS[usize::from(b) % SAFE_ALPHANUMS.len()] as char)
        .collect()
}

fn fnv32a(hash: u32, bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(hash, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// The pod-template-hash of a template, as upstream's `controller.ComputeHash`: FNV-32a of
/// the template, then of `collisionCount` (8 bytes, little endian) when it is set, the
/// decimal sum rendered with the safe alphabet. Upstream hashes Go's printout of the
/// struct; here the template's JSON (fields in schema order, maps sorted) is hashed, which
/// is as stable but gives other values.
pub fn compute_hash(template: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let json = serde_json::to_vec(template).unwrap_or_default();
    let mut hash = fnv32a(0x811c_9dc5, &json);
    if let Some(count) = collision_count {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&(count as u32).to_le_bytes());
        hash = fnv32a(hash, &bytes);
    }
    safe_encode(&hash.to_string())
}

/// Drops what upstream's semantic equality does not tell apart: nulls, empty lists and
/// empty maps (Go's nil and empty are equal there).
pub fn normalized(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, normalized(v)))
                .filter(|(_, v)| !is_empty(v))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(normalized).collect()),
        other => other,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn template_without_hash(template: &PodTemplateSpec) -> Value {
    let mut template = template.clone();
    if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(POD_TEMPLATE_HASH);
    }
    normalized(serde_json::to_value(template).unwrap_or(Value::Null))
}

/// `EqualIgnoreHash`: the templates are semantically equal, pod-template-hash aside.
pub fn equal_ignore_hash(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    template_without_hash(a) == template_without_hash(b)
}

/// The template of a replica set.
pub fn rs_template(rs: &ReplicaSet) -> PodTemplateSpec {
    rs.spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Ordering.

fn created(rs: &ReplicaSet) -> Option<Timestamp> {
    rs.metadata.creation_timestamp.as_ref().map(|t| t.0)
}

/// `ReplicaSetsByCreationTimestamp`: oldest first, by name when created in the same second.
pub fn by_creation(a: &ReplicaSet, b: &ReplicaSet) -> Ordering {
    created(a)
        .cmp(&created(b))
        .then_with(|| a.metadata.name.cmp(&b.metadata.name))
}

/// `ReplicaSetsBySizeNewer`: largest first, newer first among equals (scaling up).
pub fn by_size_newer(a: &ReplicaSet, b: &ReplicaSet) -> Ordering {
    rs_replicas(b)
        .cmp(&rs_replicas(a))
        .then_with(|| by_creation(b, a))
}

/// `ReplicaSetsBySizeOlder`: largest first, older first among equals (scaling down).
pub fn by_size_older(a: &ReplicaSet, b: &ReplicaSet) -> Ordering {
    rs_replicas(b)
        .cmp(&rs_replicas(a))
        .then_with(|| by_creation(a, b))
}

/// `ReplicaSetsByRevision`: lowest revision first, by creation among equals or unparsable.
pub fn by_revision(a: &ReplicaSet, b: &ReplicaSet) -> Ordering {
    match (revision(a), revision(b)) {
        (Ok(x), Ok(y)) if x != y => x.cmp(&y),
        _ => by_creation(a, b),
    }
}

// ---------------------------------------------------------------------------------------
// Revisions and annotations.

/// The revision of a replica set: 0 without the annotation, an error if it does not parse.
pub fn revision(rs: &ReplicaSet) -> Result<i64, std::num::ParseIntError> {
    match annotations(rs).get(REVISION) {
        None => Ok(0),
        Some(v) => v.parse(),
    }
}

/// `MaxRevision`: the highest parsable revision.
pub fn max_revision<'a>(rss: impl IntoIterator<Item = &'a ReplicaSet>) -> i64 {
    rss.into_iter()
        .filter_map(|rs| revision(rs).ok())
        .max()
        .unwrap_or(0)
        .max(0)
}

fn skip_copy_annotation(key: &str) -> bool {
    matches!(
        key,
        LAST_APPLIED
            | REVISION
            | REVISION_HISTORY
            | DESIRED_REPLICAS
            | MAX_REPLICAS
            | DEPRECATED_ROLLBACK_TO
    )
}

/// Copies the deployment's annotations (`kubernetes.io/change-cause` among them) to the
/// replica set, except the controller's own; whether anything changed.
fn copy_deployment_annotations(d: &Deployment, rs: &mut ReplicaSet) -> bool {
    let target = rs.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let mut changed = false;
    for (k, v) in d.metadata.annotations.iter().flatten() {
        if skip_copy_annotation(k) || target.get(k) == Some(v) {
            continue;
        }
        target.insert(k.clone(), v.clone());
        changed = true;
    }
    changed
}

/// `SetReplicasAnnotations`: records desired and max replicas; whether anything changed.
pub fn set_replicas_annotations(rs: &mut ReplicaSet, desired: i32, max: i32) -> bool {
    let target = rs.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let mut changed = false;
    for (key, value) in [(DESIRED_REPLICAS, desired), (MAX_REPLICAS, max)] {
        let value = value.to_string();
        if target.get(key) != Some(&value) {
            target.insert(key.to_string(), value);
            changed = true;
        }
    }
    changed
}

/// `ReplicasAnnotationsNeedUpdate`.
pub fn replicas_annotations_need_update(rs: &ReplicaSet, desired: i32, max: i32) -> bool {
    let a = annotations(rs);
    a.get(DESIRED_REPLICAS) != Some(&desired.to_string())
        || a.get(MAX_REPLICAS) != Some(&max.to_string())
}

/// `SetNewReplicaSetAnnotations`: copies the deployment's annotations, raises the revision
/// to `new_revision` (remembering the old one in the revision history: a rollback), and for
/// a replica set about to be created, records desired and max replicas. Whether anything
/// changed.
pub fn set_new_rs_annotations(
    d: &Deployment,
    rs: &mut ReplicaSet,
    new_revision: i64,
    exists: bool,
) -> bool {
    let mut changed = copy_deployment_annotations(d, rs);
    let target = rs.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let old = target.get(REVISION).cloned();
    let old_int = match old.as_deref() {
        None | Some("") => 0,
        Some(v) => match v.parse::<i64>() {
            Ok(v) => v,
            // Upstream leaves a replica set with a garbled revision alone.
            Err(_) => return false,
        },
    };
    if old_int < new_revision {
        target.insert(REVISION.into(), new_revision.to_string());
        changed = true;
        if let Some(old) = old.filter(|o| !o.is_empty()) {
            let history = target.get(REVISION_HISTORY).cloned().unwrap_or_default();
            if history.is_empty() {
                target.insert(REVISION_HISTORY.into(), old);
            } else {
                let mut revisions: Vec<&str> = history.split(',').collect();
                let mut total = history.len() + old.len() + 1;
                let mut start = 0;
                while total > MAX_REV_HISTORY_CHARS && start < revisions.len() {
                    total -= revisions[start].len() + 1;
                    start += 1;
                }
                if total <= MAX_REV_HISTORY_CHARS {
                    revisions = revisions.split_off(start);
                    revisions.push(&old);
                    target.insert(REVISION_HISTORY.into(), revisions.join(","));
                }
            }
        }
    }
    if !exists {
        let desired = replicas(d);
        changed |= set_replicas_annotations(rs, desired, desired + max_surge(d));
    }
    changed
}

/// `SetDeploymentRevision`: whether the deployment's revision annotation changed.
pub fn set_deployment_revision(d: &mut Deployment, revision: &str) -> bool {
    let target = d.metadata.annotations.get_or_insert_with(BTreeMap::new);
    if target.get(REVISION).map(String::as_str) == Some(revision) {
        return false;
    }
    target.insert(REVISION.into(), revision.to_string());
    true
}

/// The revision annotation of a replica set, `""` without one.
pub fn revision_annotation(rs: &ReplicaSet) -> String {
    annotations(rs).get(REVISION).cloned().unwrap_or_default()
}

/// `GetDesiredReplicasAnnotation`.
pub fn desired_replicas_annotation(rs: &ReplicaSet) -> Option<i32> {
    int_annotation(rs, DESIRED_REPLICAS)
}

// ---------------------------------------------------------------------------------------
// maxSurge / maxUnavailable.

/// `GetScaledValueFromIntOrPercent`: an int as is, a percentage of `total` rounded up or
/// down.
pub fn scaled_value(value: &IntOrString, total: i32, round_up: bool) -> Result<i32, String> {
    match value {
        IntOrString::Int(i) => Ok(*i),
        IntOrString::String(s) => {
            let Some(percent) = s.strip_suffix('%') else {
                return Err(format!(
                    "invalid value for IntOrString: invalid type: string is not a percentage: {s:?}"
                ));
            };
            let percent: i64 = percent
                .parse()
                .map_err(|_| format!("invalid value {s:?}: not an integer percentage"))?;
            let product = percent * i64::from(total);
            let value = if round_up {
                product.div_euclid(100) + i64::from(product.rem_euclid(100) != 0)
            } else {
                product.div_euclid(100)
            };
            Ok(value as i32)
        }
    }
}

/// `ResolveFenceposts`: maxSurge (rounded up) and maxUnavailable (rounded down) for
/// `desired` replicas; if both come out 0, maxUnavailable is 1 so the rollout can move.
pub fn resolve_fenceposts(
    max_surge: Option<&IntOrString>,
    max_unavailable: Option<&IntOrString>,
    desired: i32,
) -> Result<(i32, i32), String> {
    let zero = IntOrString::Int(0);
    let surge = scaled_value(max_surge.unwrap_or(&zero), desired, true)?;
    let mut unavailable = scaled_value(max_unavailable.unwrap_or(&zero), desired, false)?;
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    Ok((surge, unavailable))
}

/// The deployment's maxSurge and maxUnavailable settings; the API server's defaults (25%)
/// when the rolling update parameters are missing.
fn rolling_params(d: &Deployment) -> (IntOrString, IntOrString) {
    let default = || IntOrString::String("25%".into());
    let params = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.as_ref());
    match params {
        None => (default(), default()),
        Some(p) => (
            p.max_surge.clone().unwrap_or_else(default),
            p.max_unavailable.clone().unwrap_or_else(default),
        ),
    }
}

fn fenceposts(d: &Deployment) -> (i32, i32) {
    let (surge, unavailable) = rolling_params(d);
    // Validation rejects bad values; one that slipped through counts as 0, as upstream.
    resolve_fenceposts(Some(&surge), Some(&unavailable), replicas(d)).unwrap_or((0, 0))
}

/// `MaxSurge`: 0 unless rolling.
pub fn max_surge(d: &Deployment) -> i32 {
    if !is_rolling_update(d) {
        return 0;
    }
    fenceposts(d).0
}

/// `MaxUnavailable`: 0 unless rolling or with 0 replicas; never more than the replicas.
pub fn max_unavailable(d: &Deployment) -> i32 {
    let desired = replicas(d);
    if !is_rolling_update(d) || desired == 0 {
        return 0;
    }
    fenceposts(d).1.min(desired)
}

/// Sum of `spec.replicas`.
pub fn replica_count<'a>(rss: impl IntoIterator<Item = &'a ReplicaSet>) -> i32 {
    rss.into_iter().map(rs_replicas).sum()
}

/// Sum of `status.replicas`.
pub fn actual_count<'a>(rss: impl IntoIterator<Item = &'a ReplicaSet>) -> i32 {
    rss.into_iter().map(rs_actual).sum()
}

/// Sum of `status.availableReplicas`.
pub fn available_count<'a>(rss: impl IntoIterator<Item = &'a ReplicaSet>) -> i32 {
    rss.into_iter().map(rs_available).sum()
}

/// `NewRSNewReplicas`: the size the new replica set may grow to now. Rolling: up to
/// replicas + maxSurge pods in all, never past the deployment's replicas. Recreate: all.
pub fn new_rs_new_replicas(d: &Deployment, all: &[&ReplicaSet], new_rs: &ReplicaSet) -> i32 {
    if !is_rolling_update(d) {
        return replicas(d);
    }
    let current = replica_count(all.iter().copied());
    let max_total = replicas(d) + max_surge(d);
    let new_size = rs_replicas(new_rs);
    if current >= max_total {
        return new_size;
    }
    let scale_up = (max_total - current).min(replicas(d) - new_size);
    new_size + scale_up
}

/// `IsSaturated`: the new replica set holds, and both sides agree it should hold, all the
/// deployment's replicas, all available.
pub fn is_saturated(d: &Deployment, rs: Option<&ReplicaSet>) -> bool {
    let Some(rs) = rs else { return false };
    let desired = replicas(d);
    desired_replicas_annotation(rs) == Some(desired)
        && rs_replicas(rs) == desired
        && rs_available(rs) == desired
}

/// `FindActiveOrLatest`: the only replica set with replicas, or the newest if none has
/// any; `None` when several do (they are scaled proportionally).
pub fn find_active_or_latest<'a>(
    new_rs: Option<&'a ReplicaSet>,
    old: &'a [ReplicaSet],
) -> Option<&'a ReplicaSet> {
    if new_rs.is_none() && old.is_empty() {
        return None;
    }
    let mut old_sorted: Vec<&ReplicaSet> = old.iter().collect();
    old_sorted.sort_by(|a, b| by_creation(b, a));
    let active: Vec<&ReplicaSet> = old_sorted
        .iter()
        .copied()
        .chain(new_rs)
        .filter(|rs| rs_replicas(rs) > 0)
        .collect();
    match active.len() {
        0 => new_rs.or(old_sorted.first().copied()),
        1 => Some(active[0]),
        _ => None,
    }
}

/// `integer.RoundToInt32`: halves away from zero.
fn round_to_i32(a: f64) -> i32 {
    if a < 0.0 {
        (a - 0.5) as i32
    } else {
        (a + 0.5) as i32
    }
}

/// `getReplicaSetFraction`: the share of a size change this replica set takes, from its
/// size relative to the deployment size it was scaled for (its max-replicas annotation).
fn rs_fraction(rs: &ReplicaSet, d: &Deployment) -> i32 {
    let desired = replicas(d);
    if desired == 0 {
        return -rs_replicas(rs);
    }
    let deployment_replicas = desired + max_surge(d);
    let annotated = int_annotation(rs, MAX_REPLICAS).unwrap_or_else(|| {
        // Without the annotation, the deployment's current size is the best guess; the
        // min/max in `get_proportion` keeps the result in bounds.
        d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0)
    });
    if annotated == 0 {
        return 0;
    }
    let size = f64::from(rs_replicas(rs)) * f64::from(deployment_replicas) / f64::from(annotated);
    round_to_i32(size) - rs_replicas(rs)
}

/// `GetProportion`: how many replicas this replica set gains (or loses) of `to_add`, given
/// `added` already handed out.
pub fn get_proportion(rs: &ReplicaSet, d: &Deployment, to_add: i32, added: i32) -> i32 {
    if rs_replicas(rs) == 0 || to_add == 0 || to_add == added {
        return 0;
    }
    let fraction = rs_fraction(rs, d);
    let allowed = to_add - added;
    if to_add > 0 {
        fraction.min(allowed)
    } else {
        fraction.max(allowed)
    }
}

/// The proportional part of upstream's `scale`: the new size of every active replica set
/// (`active`: those with replicas) when the deployment's size changed mid-rollout. Returns
/// the sizes in the order the replica sets should be updated, and whether it is a scale
/// "up" or "down".
pub fn proportional_sizes(
    d: &Deployment,
    active: &[&ReplicaSet],
) -> (Vec<(String, i32)>, &'static str) {
    let current = replica_count(active.iter().copied());
    let desired = replicas(d);
    let allowed = if desired > 0 {
        desired + max_surge(d)
    } else {
        0
    };
    let to_add = allowed - current;
    let mut sorted: Vec<&ReplicaSet> = active.to_vec();
    let operation = match to_add.cmp(&0) {
        Ordering::Greater => {
            sorted.sort_by(|a, b| by_size_newer(a, b));
            "up"
        }
        Ordering::Less => {
            sorted.sort_by(|a, b| by_size_older(a, b));
            "down"
        }
        Ordering::Equal => "",
    };
    let mut added = 0;
    let mut sizes: Vec<(String, i32)> = sorted
        .iter()
        .map(|rs| {
            let name = rs.metadata.name.clone().unwrap_or_default();
            if to_add == 0 {
                return (name, rs_replicas(rs));
            }
            let proportion = get_proportion(rs, d, to_add, added);
            added += proportion;
            (name, rs_replicas(rs) + proportion)
        })
        .collect();
    // Leftovers from rounding go to the largest replica set.
    if to_add != 0
        && let Some(first) = sizes.first_mut()
    {
        first.1 = (first.1 + to_add - added).max(0);
    }
    (sizes, operation)
}

// ---------------------------------------------------------------------------------------
// Conditions and status.

/// Now, to the second: the API keeps times to the second, and a condition written with a
/// finer time would never compare equal to itself read back.
pub fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now())
}

/// `NewDeploymentCondition`.
pub fn new_condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    now: Timestamp,
) -> DeploymentCondition {
    DeploymentCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    }
}

/// `GetDeploymentCondition`.
pub fn get_condition<'a>(
    status: Option<&'a DeploymentStatus>,
    type_: &str,
) -> Option<&'a DeploymentCondition> {
    status?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// The reason of a condition, `""` without one.
pub fn condition_reason(c: &DeploymentCondition) -> &str {
    c.reason.as_deref().unwrap_or("")
}

/// `SetDeploymentCondition`: replaces the condition of that type unless it already has the
/// same status and reason; keeps the transition time while the status stays.
pub fn set_condition(status: &mut DeploymentStatus, mut condition: DeploymentCondition) {
    if let Some(current) = get_condition(Some(status), &condition.type_) {
        if current.status == condition.status && current.reason == condition.reason {
            return;
        }
        if current.status == condition.status {
            condition.last_transition_time = current.last_transition_time.clone();
        }
    }
    remove_condition(status, &condition.type_.clone());
    status
        .conditions
        .get_or_insert_with(Vec::new)
        .push(condition);
}

/// `RemoveDeploymentCondition`.
pub fn remove_condition(status: &mut DeploymentStatus, type_: &str) {
    if let Some(conditions) = status.conditions.as_mut() {
        conditions.retain(|c| c.type_ != type_);
        if conditions.is_empty() {
            status.conditions = None;
        }
    }
}

/// Go's `omitempty` on the status integers: 0 is not written.
fn nonzero(v: i32) -> Option<i32> {
    (v != 0).then_some(v)
}

/// `calculateStatus`: the deployment's status from its replica sets, with the Available
/// condition.
pub fn calculate_status(
    all: &[&ReplicaSet],
    new_rs: Option<&ReplicaSet>,
    d: &Deployment,
    now: Timestamp,
) -> DeploymentStatus {
    let available = available_count(all.iter().copied());
    let total = replica_count(all.iter().copied());
    let unavailable = (total - available).max(0);
    let current = d.status.clone().unwrap_or_default();
    let mut status = DeploymentStatus {
        observed_generation: d.metadata.generation.filter(|g| *g != 0),
        replicas: nonzero(actual_count(all.iter().copied())),
        updated_replicas: nonzero(new_rs.map_or(0, rs_actual)),
        ready_replicas: nonzero(all.iter().map(|rs| rs_ready(rs)).sum()),
        available_replicas: nonzero(available),
        unavailable_replicas: nonzero(unavailable),
        collision_count: current.collision_count,
        conditions: current.conditions.clone(),
        terminating_replicas: current.terminating_replicas,
    };
    if available >= replicas(d) - max_unavailable(d) {
        set_condition(
            &mut status,
            new_condition(
                AVAILABLE,
                "True",
                reason::MIN_AVAILABLE,
                "Deployment has minimum availability.".into(),
                now,
            ),
        );
    } else {
        set_condition(
            &mut status,
            new_condition(
                AVAILABLE,
                "False",
                reason::MIN_UNAVAILABLE,
                "Deployment does not have minimum availability.".into(),
                now,
            ),
        );
    }
    status
}

fn count(v: Option<i32>) -> i32 {
    v.unwrap_or(0)
}

/// `DeploymentComplete`: every desired replica updated and available, no old ones left, the
/// latest spec observed.
pub fn deployment_complete(d: &Deployment, status: &DeploymentStatus) -> bool {
    let desired = replicas(d);
    count(status.updated_replicas) == desired
        && count(status.replicas) == desired
        && count(status.available_replicas) == desired
        && status.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
}

/// `DeploymentProgressing`: new pods were added, became ready or available, or old pods
/// went away, compared with the recorded status.
pub fn deployment_progressing(d: &Deployment, new: &DeploymentStatus) -> bool {
    let old = d.status.clone().unwrap_or_default();
    let old_old = count(old.replicas) - count(old.updated_replicas);
    let new_old = count(new.replicas) - count(new.updated_replicas);
    count(new.updated_replicas) > count(old.updated_replicas)
        || new_old < old_old
        || count(new.ready_replicas) > count(old.ready_replicas)
        || count(new.available_replicas) > count(old.available_replicas)
}

/// `DeploymentTimedOut`: the Progressing condition was last updated longer ago than the
/// progress deadline (or already says so).
pub fn deployment_timed_out(d: &Deployment, status: &DeploymentStatus, now: Timestamp) -> bool {
    let Some(deadline) = progress_deadline(d) else {
        return false;
    };
    let Some(condition) = get_condition(Some(status), PROGRESSING) else {
        return false;
    };
    match condition_reason(condition) {
        reason::NEW_RS_AVAILABLE => false,
        reason::TIMED_OUT => true,
        _ => {
            let Some(from) = condition.last_update_time.as_ref() else {
                return false;
            };
            from.0.as_second() + i64::from(deadline) < now.as_second()
        }
    }
}

/// Whether two statuses are the same once Go's empty values (`omitempty` zeros, nil and
/// empty lists) are disregarded.
pub fn same_status(a: Option<&DeploymentStatus>, b: &DeploymentStatus) -> bool {
    fn canonical(status: &DeploymentStatus) -> Value {
        let mut value = normalized(serde_json::to_value(status).unwrap_or(Value::Null));
        if let Value::Object(map) = &mut value {
            // collisionCount is a pointer upstream: its 0 counts.
            map.retain(|k, v| k == "collisionCount" || v.as_i64() != Some(0));
        }
        value
    }
    canonical(&a.cloned().unwrap_or_default()) == canonical(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::apps::v1::{
            DeploymentSpec, DeploymentStrategy, ReplicaSetSpec, ReplicaSetStatus,
            RollingUpdateDeployment,
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };
    use serde_json::json;

    fn int(i: i32) -> IntOrString {
        IntOrString::Int(i)
    }
    fn pct(s: &str) -> IntOrString {
        IntOrString::String(s.into())
    }

    fn deployment(replicas: i32, surge: IntOrString, unavailable: IntOrString) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                generation: Some(1),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                strategy: Some(DeploymentStrategy {
                    type_: Some(ROLLING_UPDATE.into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(surge),
                        max_unavailable: Some(unavailable),
                    }),
                }),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn rs(
        name: &str,
        created: i64,
        replicas: i32,
        available: i32,
        max_replicas: Option<i32>,
    ) -> ReplicaSet {
        let mut annotations = BTreeMap::new();
        if let Some(m) = max_replicas {
            annotations.insert(MAX_REPLICAS.to_string(), m.to_string());
        }
        ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(Time(Timestamp::from_second(created).unwrap())),
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(replicas),
                ..Default::default()
            }),
            status: Some(ReplicaSetStatus {
                replicas,
                available_replicas: Some(available),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn hash_is_stable_and_safe() {
        let template: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app", "image": "nginx:1"}]}
        }))
        .unwrap();
        let a = compute_hash(&template, None);
        assert_eq!(a, compute_hash(&template.clone(), None));
        assert!(a.bytes().all(|b| SAFE_ALPHANUMS.contains(&b)), "{a}");
        assert!(!a.is_empty() && a.len() <= 10);
        assert_ne!(a, compute_hash(&template, Some(1)));
        assert_ne!(
            compute_hash(&template, Some(1)),
            compute_hash(&template, Some(2))
        );
        let mut other = template.clone();
        other.spec.as_mut().unwrap().containers[0].image = Some("nginx:2".into());
        assert_ne!(a, compute_hash(&other, None));
    }

    #[test]
    fn fnv_and_safe_encoding_match_go() {
        // hash/fnv New32a over "a" is 0xe40c292c; rand.SafeEncodeString("abc") is "vwx"
        // (bytes modulo 27).
        assert_eq!(fnv32a(0x811c_9dc5, b"a"), 0xe40c_292c);
        assert_eq!(fnv32a(0x811c_9dc5, b""), 0x811c_9dc5);
        assert_eq!(safe_encode("abc"), "vwx");
        assert_eq!(safe_encode("0"), "4");
    }

    #[test]
    fn equal_ignore_hash_disregards_the_hash_label_and_empties() {
        let a: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "web", POD_TEMPLATE_HASH: "abc"}},
            "spec": {"containers": [{"name": "app", "image": "nginx:1", "env": []}]}
        }))
        .unwrap();
        let b: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app", "image": "nginx:1"}]}
        }))
        .unwrap();
        assert!(equal_ignore_hash(&a, &b));
        let mut c = b.clone();
        c.spec.as_mut().unwrap().containers[0].image = Some("nginx:2".into());
        assert!(!equal_ignore_hash(&a, &c));
    }

    #[test]
    fn percentages_round_as_upstream() {
        assert_eq!(scaled_value(&pct("25%"), 10, true), Ok(3));
        assert_eq!(scaled_value(&pct("25%"), 10, false), Ok(2));
        assert_eq!(scaled_value(&pct("100%"), 7, false), Ok(7));
        assert_eq!(scaled_value(&pct("0%"), 7, true), Ok(0));
        assert_eq!(scaled_value(&int(4), 7, true), Ok(4));
        assert!(scaled_value(&pct("25"), 10, true).is_err());
    }

    #[test]
    fn fenceposts_as_upstream() {
        // ResolveFenceposts' own examples.
        assert_eq!(
            resolve_fenceposts(Some(&pct("0%")), Some(&pct("1%")), 2),
            Ok((0, 1))
        );
        assert_eq!(
            resolve_fenceposts(Some(&pct("1%")), Some(&pct("25%")), 2),
            Ok((1, 0))
        );
        assert_eq!(
            resolve_fenceposts(Some(&pct("1%")), Some(&pct("0%")), 1),
            Ok((1, 0))
        );
        assert_eq!(resolve_fenceposts(None, None, 5), Ok((0, 1)));
        assert_eq!(
            resolve_fenceposts(Some(&int(3)), Some(&int(2)), 10),
            Ok((3, 2))
        );
        let d = deployment(10, pct("25%"), pct("25%"));
        assert_eq!((max_surge(&d), max_unavailable(&d)), (3, 2));
        // maxUnavailable never above replicas, and 0 at 0 replicas.
        let d = deployment(2, int(0), int(5));
        assert_eq!(max_unavailable(&d), 2);
        let d = deployment(0, int(1), int(1));
        assert_eq!(max_unavailable(&d), 0);
        // Recreate has neither.
        let mut d = deployment(4, int(1), int(1));
        d.spec.as_mut().unwrap().strategy.as_mut().unwrap().type_ = Some(RECREATE.into());
        assert_eq!((max_surge(&d), max_unavailable(&d)), (0, 0));
    }

    #[test]
    fn new_replica_set_grows_within_surge() {
        let d = deployment(10, int(3), int(2));
        let old = rs("old", 1, 10, 10, Some(13));
        let new = rs("new", 2, 0, 0, None);
        assert_eq!(new_rs_new_replicas(&d, &[&old, &new], &new), 3);
        let old = rs("old", 1, 8, 8, Some(13));
        let new = rs("new", 2, 3, 0, None);
        assert_eq!(new_rs_new_replicas(&d, &[&old, &new], &new), 5);
        // At the surge limit: no growth.
        let new = rs("new", 2, 5, 0, None);
        assert_eq!(new_rs_new_replicas(&d, &[&old, &new], &new), 5);
        // Never past the desired replicas.
        let old = rs("old", 1, 0, 0, Some(13));
        let new = rs("new", 2, 9, 9, None);
        assert_eq!(new_rs_new_replicas(&d, &[&old, &new], &new), 10);
    }

    #[test]
    fn proportional_scaling_as_upstream() {
        // Upstream's TestScale "proportional scaling: 5 -> 10" style case: 10 replicas,
        // surge 3, two active sets of 8 (old) and 5 (new) scaled for 13; scale to 20
        // (max 23): +10 shared 8:5.
        let mut d = deployment(20, int(3), int(2));
        let old = rs("old", 1, 8, 8, Some(13));
        let new = rs("new", 2, 5, 0, Some(13));
        let (sizes, op) = proportional_sizes(&d, &[&new, &old]);
        assert_eq!(op, "up");
        let total: i32 = sizes.iter().map(|s| s.1).sum();
        assert_eq!(total, 23);
        let get = |n: &str| sizes.iter().find(|s| s.0 == n).unwrap().1;
        assert_eq!(get("old"), 14); // 8*23/13 = 14.15
        assert_eq!(get("new"), 9); // 5*23/13 = 8.85
        // Scale down to 5 (max 8): sets shrink in proportion, largest first.
        d.spec.as_mut().unwrap().replicas = Some(5);
        let (sizes, op) = proportional_sizes(&d, &[&new, &old]);
        assert_eq!(op, "down");
        let get = |n: &str| sizes.iter().find(|s| s.0 == n).unwrap().1;
        assert_eq!(get("old") + get("new"), 8);
        assert_eq!(get("old"), 5); // 8*8/13 = 4.9
        assert_eq!(get("new"), 3); // 5*8/13 = 3.1
        // Scale to 0: everything goes.
        d.spec.as_mut().unwrap().replicas = Some(0);
        let (sizes, _) = proportional_sizes(&d, &[&new, &old]);
        assert!(sizes.iter().all(|s| s.1 == 0), "{sizes:?}");
    }

    #[test]
    fn proportion_leftovers_go_to_the_largest() {
        // Three equal sets of 1 for 3 (+0 surge) scaled to 4: the rounding leftover goes
        // to the first in the scale-up order (newest among equals).
        let d = deployment(4, int(0), int(1));
        let a = rs("a", 1, 1, 1, Some(3));
        let b = rs("b", 2, 1, 1, Some(3));
        let c = rs("c", 3, 1, 1, Some(3));
        let (sizes, _) = proportional_sizes(&d, &[&a, &b, &c]);
        assert_eq!(sizes.iter().map(|s| s.1).sum::<i32>(), 4);
        assert_eq!(sizes[0], ("c".to_string(), 2));
    }

    #[test]
    fn active_or_latest() {
        let old1 = rs("o1", 1, 0, 0, None);
        let old2 = rs("o2", 2, 0, 0, None);
        let new = rs("n", 3, 0, 0, None);
        let olds = [old1.clone(), old2.clone()];
        assert_eq!(
            find_active_or_latest(Some(&new), &olds)
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("n")
        );
        assert_eq!(
            find_active_or_latest(None, &olds)
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("o2")
        );
        let olds = [rs("o1", 1, 3, 3, None), old2];
        assert_eq!(
            find_active_or_latest(Some(&new), &olds)
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("o1")
        );
        let busy_new = rs("n", 3, 1, 0, None);
        assert!(find_active_or_latest(Some(&busy_new), &olds).is_none());
    }

    #[test]
    fn revisions_and_history() {
        let d = deployment(3, int(1), int(1));
        let mut r = rs("a", 1, 0, 0, None);
        assert!(set_new_rs_annotations(&d, &mut r, 1, false));
        assert_eq!(revision(&r), Ok(1));
        assert_eq!(desired_replicas_annotation(&r), Some(3));
        assert_eq!(
            annotations(&r).get(MAX_REPLICAS).map(String::as_str),
            Some("4")
        );
        // Rolled back to: revision 3, history keeps 1.
        assert!(set_new_rs_annotations(&d, &mut r, 3, true));
        assert_eq!(revision(&r), Ok(3));
        assert_eq!(
            annotations(&r).get(REVISION_HISTORY).map(String::as_str),
            Some("1")
        );
        assert!(set_new_rs_annotations(&d, &mut r, 5, true));
        assert_eq!(
            annotations(&r).get(REVISION_HISTORY).map(String::as_str),
            Some("1,3")
        );
        // Never lowered.
        assert!(!set_new_rs_annotations(&d, &mut r, 2, true));
        assert_eq!(max_revision([&r, &rs("b", 1, 0, 0, None)]), 5);
    }

    #[test]
    fn change_cause_is_copied_but_not_controller_annotations() {
        let mut d = deployment(3, int(1), int(1));
        d.metadata.annotations = Some(BTreeMap::from([
            (
                "kubernetes.io/change-cause".to_string(),
                "kubectl set image".to_string(),
            ),
            (REVISION.to_string(), "9".to_string()),
            (LAST_APPLIED.to_string(), "{}".to_string()),
        ]));
        let mut r = rs("a", 1, 0, 0, None);
        set_new_rs_annotations(&d, &mut r, 1, true);
        let a = annotations(&r);
        assert_eq!(
            a.get("kubernetes.io/change-cause").map(String::as_str),
            Some("kubectl set image")
        );
        assert_eq!(a.get(REVISION).map(String::as_str), Some("1"));
        assert!(!a.contains_key(LAST_APPLIED));
    }

    #[test]
    fn conditions_keep_transition_time() {
        let t0 = Timestamp::from_second(1000).unwrap();
        let t1 = Timestamp::from_second(2000).unwrap();
        let mut status = DeploymentStatus::default();
        set_condition(
            &mut status,
            new_condition(PROGRESSING, "True", reason::NEW_RS_CREATED, "a".into(), t0),
        );
        set_condition(
            &mut status,
            new_condition(
                PROGRESSING,
                "True",
                reason::REPLICA_SET_UPDATED,
                "b".into(),
                t1,
            ),
        );
        let c = get_condition(Some(&status), PROGRESSING).unwrap();
        assert_eq!(c.last_transition_time, Some(Time(t0)));
        assert_eq!(c.last_update_time, Some(Time(t1)));
        // Same status and reason: left alone.
        set_condition(
            &mut status,
            new_condition(
                PROGRESSING,
                "True",
                reason::REPLICA_SET_UPDATED,
                "c".into(),
                t1,
            ),
        );
        assert_eq!(
            get_condition(Some(&status), PROGRESSING)
                .unwrap()
                .message
                .as_deref(),
            Some("b")
        );
        set_condition(
            &mut status,
            new_condition(PROGRESSING, "False", reason::TIMED_OUT, "d".into(), t1),
        );
        assert_eq!(
            get_condition(Some(&status), PROGRESSING)
                .unwrap()
                .last_transition_time,
            Some(Time(t1))
        );
        assert_eq!(status.conditions.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn status_and_deadline() {
        let mut d = deployment(3, int(1), int(1));
        d.spec.as_mut().unwrap().progress_deadline_seconds = Some(10);
        let old = rs("old", 1, 1, 1, None);
        let new = rs("new", 2, 3, 2, None);
        let now = Timestamp::from_second(5000).unwrap();
        let status = calculate_status(&[&old, &new], Some(&new), &d, now);
        assert_eq!(status.replicas, Some(4));
        assert_eq!(status.updated_replicas, Some(3));
        assert_eq!(status.available_replicas, Some(3));
        assert_eq!(status.unavailable_replicas, Some(1));
        assert_eq!(status.observed_generation, Some(1));
        let available = get_condition(Some(&status), AVAILABLE).unwrap();
        assert_eq!(condition_reason(available), reason::MIN_AVAILABLE);
        assert!(!deployment_complete(&d, &status));
        assert!(deployment_progressing(&d, &status));
        let mut with_cond = status.clone();
        set_condition(
            &mut with_cond,
            new_condition(
                PROGRESSING,
                "True",
                reason::REPLICA_SET_UPDATED,
                "x".into(),
                Timestamp::from_second(4000).unwrap(),
            ),
        );
        assert!(deployment_timed_out(&d, &with_cond, now));
        assert!(!deployment_timed_out(
            &d,
            &with_cond,
            Timestamp::from_second(4005).unwrap()
        ));
        // Zeros and empties compare equal to absent fields.
        let zero = calculate_status(&[], None, &deployment(0, int(1), int(1)), now);
        let mut read_back = zero.clone();
        read_back.replicas = Some(0);
        assert!(same_status(Some(&read_back), &zero));
    }
}
