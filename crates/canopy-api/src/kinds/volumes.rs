//! Pod volumes: `SetDefaults_*VolumeSource` and `ValidateVolumes`.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::meta::{SelectorOptions, validate_dns1123_label, validate_label_selector};
use super::names;
use super::util::{
    Path, default_str, default_value, duplicate, forbidden, get, int_of, invalid, items_mut, list,
    not_supported, obj_mut, opt_str, required, str_of, strings, too_long,
};
use crate::status::Cause;

/// Octal 0644, the default mode of projected files.
const DEFAULT_MODE: i64 = 0o644;

/// Every volume source field, in upstream's order, with the name upstream's "more than one
/// volume type" error uses (a few differ from the JSON name).
const SOURCES: &[(&str, &str)] = &[
    ("emptyDir", "emptyDir"),
    ("hostPath", "hostPath"),
    ("gitRepo", "gitRepo"),
    ("gcePersistentDisk", "gcePersistentDisk"),
    ("awsElasticBlockStore", "awsElasticBlockStore"),
    ("secret", "secret"),
    ("nfs", "nfs"),
    ("iscsi", "iscsi"),
    ("glusterfs", "glusterfs"),
    ("flocker", "flocker"),
    ("persistentVolumeClaim", "persistentVolumeClaim"),
    ("rbd", "rbd"),
    ("cinder", "cinder"),
    ("cephfs", "cephFS"),
    ("quobyte", "quobyte"),
    ("downwardAPI", "downwarAPI"),
    ("fc", "fc"),
    ("flexVolume", "flexVolume"),
    ("configMap", "configMap"),
    ("azureFile", "azureFile"),
    ("vsphereVolume", "vsphereVolume"),
    ("photonPersistentDisk", "photonPersistentDisk"),
    ("portworxVolume", "portworxVolume"),
    ("azureDisk", "azureDisk"),
    ("storageos", "storageos"),
    ("projected", "projected"),
    ("scaleIO", "scaleIO"),
    ("csi", "csi"),
    ("ephemeral", "ephemeral"),
    ("image", "image"),
];

const FILE_MODE_ERROR: &str = "must be a number between 0 and 0777 (octal), both inclusive";

const VOLUME_FIELD_PATHS: &[&str] = &[
    "metadata.annotations",
    "metadata.labels",
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
];

/// Volume defaults (`SetDefaults_Volume` and the source defaulters).
pub(crate) fn default_volume(volume: &mut Value) {
    let has_source = volume
        .as_object()
        .is_some_and(|m| m.iter().any(|(k, v)| k != "name" && !v.is_null()));
    if !has_source {
        default_value(volume, "emptyDir", json!({}));
    }
    for key in ["secret", "configMap", "downwardAPI", "projected"] {
        if let Some(source) = obj_mut(volume, key) {
            default_value(source, "defaultMode", json!(DEFAULT_MODE));
            for item in items_mut(source, "items") {
                default_field_ref(item);
            }
        }
    }
    if let Some(projected) = obj_mut(volume, "projected") {
        for source in items_mut(projected, "sources") {
            if let Some(token) = obj_mut(source, "serviceAccountToken") {
                default_value(token, "expirationSeconds", json!(3600));
            }
            if let Some(downward) = obj_mut(source, "downwardAPI") {
                for item in items_mut(downward, "items") {
                    default_field_ref(item);
                }
            }
        }
    }
    if let Some(host_path) = obj_mut(volume, "hostPath") {
        default_value(host_path, "type", json!(""));
    }
    if let Some(iscsi) = obj_mut(volume, "iscsi") {
        default_str(iscsi, "iscsiInterface", "default");
    }
    if let Some(rbd) = obj_mut(volume, "rbd") {
        default_str(rbd, "pool", "rbd");
        default_str(rbd, "user", "admin");
        default_str(rbd, "keyring", "/etc/ceph/keyring");
    }
    if let Some(azure) = obj_mut(volume, "azureDisk") {
        default_value(azure, "cachingMode", json!("ReadWrite"));
        default_value(azure, "fsType", json!("ext4"));
        default_value(azure, "readOnly", json!(false));
        default_value(azure, "kind", json!("Shared"));
    }
    if let Some(scale_io) = obj_mut(volume, "scaleIO") {
        default_str(scale_io, "storageMode", "ThinProvisioned");
        default_str(scale_io, "fsType", "xfs");
    }
    if let Some(template) =
        obj_mut(volume, "ephemeral").and_then(|e| obj_mut(e, "volumeClaimTemplate"))
        && let Some(spec) = obj_mut(template, "spec")
    {
        default_value(spec, "volumeMode", json!("Filesystem"));
    }
    if let Some(image) = obj_mut(volume, "image") {
        let policy = super::pod::pull_policy_for(str_of(image, "reference"));
        default_str(image, "pullPolicy", policy);
    }
}

/// `SetDefaults_ObjectFieldSelector` inside a downward API item.
fn default_field_ref(item: &mut Value) {
    if let Some(field_ref) = obj_mut(item, "fieldRef") {
        default_str(field_ref, "apiVersion", "v1");
    }
}

/// `ValidateVolumes`: the valid volumes by name, and the errors.
pub(crate) fn validate_volumes<'a>(
    volumes: &'a [Value],
    pod_name: Option<&str>,
    path: &Path,
    is_pod: bool,
) -> (HashMap<String, &'a Value>, Vec<Cause>) {
    let mut causes = Vec::new();
    let mut valid: HashMap<String, &Value> = HashMap::new();
    let created_claims: Vec<String> = match pod_name.filter(|n| !n.is_empty()) {
        Some(pod) => volumes
            .iter()
            .filter(|v| get(v, "ephemeral").is_some())
            .map(|v| format!("{pod}-{}", str_of(v, "name")))
            .collect(),
        None => Vec::new(),
    };
    for (i, vol) in volumes.iter().enumerate() {
        let idx = path.index(i);
        let name_path = idx.child("name");
        let name = str_of(vol, "name");
        let mut errs = validate_source(vol, &idx, name, pod_name, is_pod);
        if name.is_empty() {
            errs.push(required(&name_path, ""));
        } else {
            errs.extend(validate_dns1123_label(name, &name_path));
        }
        if valid.contains_key(name) {
            errs.push(duplicate(&name_path, name));
        }
        if errs.is_empty() {
            valid.insert(name.to_string(), vol);
        } else {
            causes.extend(errs);
        }
        if let Some(claim) = get(vol, "persistentVolumeClaim").map(|c| str_of(c, "claimName"))
            && created_claims.iter().any(|c| c == claim)
        {
            causes.push(invalid(
                &idx.child("persistentVolumeClaim").child("claimName"),
                claim,
                "must not reference a PVC that gets created for an ephemeral volume",
            ));
        }
    }
    (valid, causes)
}

fn validate_source(
    vol: &Value,
    path: &Path,
    vol_name: &str,
    pod_name: Option<&str>,
    is_pod: bool,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut count = 0;
    for (key, forbidden_name) in SOURCES {
        let Some(source) = get(vol, key) else {
            continue;
        };
        if count > 0 {
            causes.push(forbidden(
                &path.child(forbidden_name),
                "may not specify more than 1 volume type",
            ));
            continue;
        }
        count += 1;
        let p = path.child(key);
        causes.extend(match *key {
            "emptyDir" => validate_empty_dir(source, &p),
            "hostPath" => validate_host_path(source, &p),
            "gitRepo" => {
                let mut c = require_fields(source, &p, &["repository"]);
                c.extend(local_descending_path(
                    str_of(source, "directory"),
                    &p.child("directory"),
                ));
                c
            }
            "gcePersistentDisk" => {
                let q = path.child("persistentDisk");
                let mut c = require_fields(source, &q, &["pdName"]);
                c.extend(partition(source, &q));
                c
            }
            "awsElasticBlockStore" => {
                let mut c = require_fields(source, &p, &["volumeID"]);
                c.extend(partition(source, &p));
                c
            }
            "secret" => validate_keyed_source(source, &p, "secretName"),
            "configMap" => validate_keyed_source(source, &p, "name"),
            "nfs" => {
                let mut c = require_fields(source, &p, &["server", "path"]);
                if !str_of(source, "path").starts_with('/') {
                    c.push(invalid(
                        &p.child("path"),
                        str_of(source, "path"),
                        "must be an absolute path",
                    ));
                }
                c
            }
            "iscsi" => validate_iscsi(source, &p, vol_name, path),
            "glusterfs" => {
                let mut c = Vec::new();
                if str_of(source, "endpoints").is_empty() {
                    c.push(required(&p.child("endpoints"), ""));
                }
                c.extend(require_fields(source, &p, &["path"]));
                c
            }
            "flocker" => validate_flocker(source, &p),
            "persistentVolumeClaim" => require_fields(source, &p, &["claimName"]),
            "rbd" => {
                let mut c = Vec::new();
                if list(source, "monitors").is_empty() {
                    c.push(required(&p.child("monitors"), ""));
                }
                c.extend(require_fields(source, &p, &["image"]));
                c
            }
            "cinder" => require_fields(source, &p, &["volumeID"]),
            "cephfs" => {
                if list(source, "monitors").is_empty() {
                    vec![required(&path.child("cephfs").child("monitors"), "")]
                } else {
                    Vec::new()
                }
            }
            "quobyte" => require_fields(source, &p, &["registry", "volume"]),
            "downwardAPI" => validate_downward_api(source, &p),
            "fc" => validate_fc(source, &p),
            "flexVolume" => require_fields(source, &p, &["driver"]),
            "azureFile" => require_fields(source, &p, &["secretName", "shareName"]),
            "vsphereVolume" => require_fields(source, &p, &["volumePath"]),
            "photonPersistentDisk" => require_fields(source, &p, &["pdID"]),
            "portworxVolume" => require_fields(source, &p, &["volumeID"]),
            "azureDisk" => {
                let mut c = require_fields(source, &p, &["diskName"]);
                if str_of(source, "diskURI").is_empty() {
                    c.push(required(&p.child("diskURI"), ""));
                }
                c
            }
            "storageos" => {
                let mut c = Vec::new();
                let name = str_of(source, "volumeName");
                if name.is_empty() {
                    c.push(required(&p.child("volumeName"), ""));
                } else {
                    c.extend(validate_dns1123_label(name, &p.child("volumeName")));
                }
                c
            }
            "projected" => validate_projected(source, &p),
            "scaleIO" => require_fields(source, &p, &["gateway", "system", "volumeName"]),
            "csi" => validate_csi(source, &p),
            "ephemeral" => validate_ephemeral(source, &p, path, vol_name, pod_name),
            "image" => {
                let mut c = Vec::new();
                if is_pod && str_of(source, "reference").is_empty() {
                    c.push(required(&p.child("reference"), ""));
                }
                c.extend(super::podspec::validate_pull_policy(
                    str_of(source, "pullPolicy"),
                    &p.child("pullPolicy"),
                ));
                c
            }
            _ => Vec::new(),
        });
    }
    if count == 0 {
        causes.push(required(path, "must specify a volume type"));
    }
    causes
}

fn require_fields(source: &Value, path: &Path, fields: &[&str]) -> Vec<Cause> {
    fields
        .iter()
        .filter(|f| str_of(source, f).is_empty())
        .map(|f| required(&path.child(f), ""))
        .collect()
}

fn partition(source: &Value, path: &Path) -> Vec<Cause> {
    match int_of(source, "partition") {
        Some(p) if !(0..=255).contains(&p) => vec![invalid(
            &path.child("partition"),
            p,
            &names::inclusive_range_error(1, 255),
        )],
        _ => Vec::new(),
    }
}

fn validate_empty_dir(source: &Value, path: &Path) -> Vec<Cause> {
    let negative = opt_str(source, "sizeLimit")
        .and_then(|s| crate::quantity::Quantity::parse(s).ok())
        .is_some_and(|q| q.milli() < 0);
    if negative {
        vec![forbidden(
            &path.child("sizeLimit"),
            "SizeLimit field must be a valid resource quantity",
        )]
    } else {
        Vec::new()
    }
}

const HOST_PATH_TYPES: &[&str] = &[
    "",
    "BlockDevice",
    "CharDevice",
    "Directory",
    "DirectoryOrCreate",
    "File",
    "FileOrCreate",
    "Socket",
];

fn validate_host_path(source: &Value, path: &Path) -> Vec<Cause> {
    let p = str_of(source, "path");
    if p.is_empty() {
        return vec![required(&path.child("path"), "")];
    }
    let mut causes = path_no_backsteps(p, &path.child("path"));
    if let Some(t) = opt_str(source, "type")
        && !HOST_PATH_TYPES.contains(&t)
    {
        causes.push(not_supported(&path.child("type"), t, HOST_PATH_TYPES));
    }
    causes
}

/// `validatePathNoBacksteps`.
pub(crate) fn path_no_backsteps(target: &str, path: &Path) -> Vec<Cause> {
    if target
        .replace('\\', "/")
        .split('/')
        .any(|part| part == "..")
    {
        vec![invalid(path, target, "must not contain '..'")]
    } else {
        Vec::new()
    }
}

/// `validateLocalDescendingPath`.
pub(crate) fn local_descending_path(target: &str, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    if target.starts_with('/') {
        causes.push(invalid(path, target, "must be a relative path"));
    }
    causes.extend(path_no_backsteps(target, path));
    causes
}

/// `ValidateLocalNonReservedPath`.
fn local_non_reserved_path(target: &str, path: &Path) -> Vec<Cause> {
    let mut causes = local_descending_path(target, path);
    if target.starts_with("..") && !target.starts_with("../") {
        causes.push(invalid(path, target, "must not start with '..'"));
    }
    causes
}

fn validate_mode(source: &Value, key: &str, path: &Path) -> Vec<Cause> {
    match int_of(source, key) {
        Some(mode) if !(0..=0o777).contains(&mode) => {
            vec![invalid(&path.child(key), mode, FILE_MODE_ERROR)]
        }
        _ => Vec::new(),
    }
}

fn validate_key_to_path(item: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    if str_of(item, "key").is_empty() {
        causes.push(required(&path.child("key"), ""));
    }
    let p = str_of(item, "path");
    if p.is_empty() {
        causes.push(required(&path.child("path"), ""));
    }
    causes.extend(local_non_reserved_path(p, &path.child("path")));
    causes.extend(validate_mode(item, "mode", path));
    causes
}

fn validate_keyed_source(source: &Value, path: &Path, name_key: &str) -> Vec<Cause> {
    let mut causes = require_fields(source, path, &[name_key]);
    causes.extend(validate_mode(source, "defaultMode", path));
    for (i, item) in list(source, "items").iter().enumerate() {
        causes.extend(validate_key_to_path(item, &path.child("items").index(i)));
    }
    causes
}

fn validate_iscsi(source: &Value, path: &Path, vol_name: &str, vol_path: &Path) -> Vec<Cause> {
    let mut causes = require_fields(source, path, &["targetPortal"]);
    let iqn = str_of(source, "iqn");
    if iqn.is_empty() {
        causes.push(required(&path.child("iqn"), ""));
    } else if !["iqn", "eui", "naa"].iter().any(|p| iqn.starts_with(p)) {
        causes.push(invalid(
            &path.child("iqn"),
            iqn,
            "must be valid format starting with iqn, eui, or naa",
        ));
    }
    if let Some(lun) = int_of(source, "lun")
        && !(0..=255).contains(&lun)
    {
        causes.push(invalid(
            &path.child("lun"),
            lun,
            &names::inclusive_range_error(0, 255),
        ));
    }
    let chap = super::util::bool_of(source, "chapAuthDiscovery")
        || super::util::bool_of(source, "chapAuthSession");
    if chap && get(source, "secretRef").is_none() {
        causes.push(required(&path.child("secretRef"), ""));
    }
    if get(source, "initiatorName").is_some()
        && vol_name.len() + 1 + str_of(source, "targetPortal").len() > 64
    {
        causes.push(invalid(
            &vol_path.child("name"),
            vol_name,
            "Total length of <volume name>:<iscsi.targetPortal> must be under 64 characters if iscsi.initiatorName is specified.",
        ));
    }
    causes
}

fn validate_flocker(source: &Value, path: &Path) -> Vec<Cause> {
    let name = str_of(source, "datasetName");
    let uuid = str_of(source, "datasetUUID");
    let mut causes = Vec::new();
    if name.is_empty() && uuid.is_empty() {
        causes.push(required(
            path,
            "one of datasetName and datasetUUID is required",
        ));
    }
    if !name.is_empty() && !uuid.is_empty() {
        causes.push(invalid(
            path,
            "resource",
            "datasetName and datasetUUID can not be specified simultaneously",
        ));
    }
    if name.contains('/') {
        causes.push(invalid(
            &path.child("datasetName"),
            name,
            "must not contain '/'",
        ));
    }
    causes
}

fn validate_fc(source: &Value, path: &Path) -> Vec<Cause> {
    let wwns = list(source, "targetWWNs");
    let wwids = list(source, "wwids");
    let mut causes = Vec::new();
    if wwns.is_empty() && wwids.is_empty() {
        causes.push(required(
            &path.child("targetWWNs"),
            "must specify either targetWWNs or wwids, but not both",
        ));
    }
    if !wwns.is_empty() && !wwids.is_empty() {
        causes.push(invalid(
            &path.child("targetWWNs"),
            Value::Array(wwns.to_vec()),
            "targetWWNs and wwids can not be specified simultaneously",
        ));
    }
    if !wwns.is_empty() {
        match int_of(source, "lun") {
            None => causes.push(required(
                &path.child("lun"),
                "lun is required if targetWWNs is specified",
            )),
            Some(lun) if !(0..=255).contains(&lun) => causes.push(invalid(
                &path.child("lun"),
                lun,
                &names::inclusive_range_error(0, 255),
            )),
            Some(_) => {}
        }
    }
    causes
}

fn validate_downward_file(item: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = Vec::new();
    let p = str_of(item, "path");
    if p.is_empty() {
        causes.push(required(&path.child("path"), ""));
    }
    causes.extend(local_non_reserved_path(p, &path.child("path")));
    if let Some(field_ref) = get(item, "fieldRef") {
        causes.extend(super::podspec::validate_object_field_selector(
            field_ref,
            VOLUME_FIELD_PATHS,
            &path.child("fieldRef"),
        ));
        if get(item, "resourceFieldRef").is_some() {
            causes.push(invalid(
                path,
                "resource",
                "fieldRef and resourceFieldRef can not be specified simultaneously",
            ));
        }
    } else if let Some(resource_ref) = get(item, "resourceFieldRef") {
        causes.extend(super::podspec::validate_resource_field_selector(
            resource_ref,
            &path.child("resourceFieldRef"),
            true,
        ));
    } else {
        causes.push(required(
            path,
            "one of fieldRef and resourceFieldRef is required",
        ));
    }
    causes.extend(validate_mode(item, "mode", path));
    causes
}

fn validate_downward_api(source: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = validate_mode(source, "defaultMode", path);
    for item in list(source, "items") {
        causes.extend(validate_downward_file(item, path));
    }
    causes
}

fn validate_projected(source: &Value, path: &Path) -> Vec<Cause> {
    let mut causes = validate_mode(source, "defaultMode", path);
    let mut all_paths: Vec<String> = Vec::new();
    let mut note_path = |p: &str, causes: &mut Vec<Cause>, shown: Value| {
        if all_paths.iter().any(|x| x == p) {
            causes.push(invalid(path, shown, "conflicting duplicate paths"));
        } else {
            all_paths.push(p.to_string());
        }
    };
    for (i, src) in list(source, "sources").iter().enumerate() {
        let src_path = path.child("sources").index(i);
        let mut count = 0;
        for key in ["secret", "configMap"] {
            let Some(s) = get(src, key) else { continue };
            count += 1;
            let p = src_path.child(key);
            if str_of(s, "name").is_empty() {
                causes.push(required(&p.child("name"), ""));
            }
            for (j, item) in list(s, "items").iter().enumerate() {
                causes.extend(validate_key_to_path(item, &p.child("items").index(j)));
                let item_path = str_of(item, "path");
                if !item_path.is_empty() {
                    note_path(item_path, &mut causes, Value::from(str_of(s, "name")));
                }
            }
        }
        if let Some(d) = get(src, "downwardAPI") {
            count += 1;
            let p = src_path.child("downwardAPI");
            for item in list(d, "items") {
                causes.extend(validate_downward_file(item, &p));
                let item_path = str_of(item, "path");
                if !item_path.is_empty() {
                    note_path(item_path, &mut causes, Value::from(item_path));
                }
            }
        }
        if let Some(t) = get(src, "serviceAccountToken") {
            count += 1;
            let p = src_path.child("serviceAccountToken");
            let seconds = int_of(t, "expirationSeconds").unwrap_or(0);
            if seconds < 600 {
                causes.push(invalid(
                    &p.child("expirationSeconds"),
                    seconds,
                    "may not specify a duration less than 10 minutes",
                ));
            }
            if seconds > 1 << 32 {
                causes.push(invalid(
                    &p.child("expirationSeconds"),
                    seconds,
                    "may not specify a duration larger than 2^32 seconds",
                ));
            }
            let token_path = str_of(t, "path");
            if token_path.is_empty() {
                causes.push(required(&path.child("path"), ""));
            } else {
                // Only pods created before the check existed may keep non-local paths.
                causes.extend(local_non_reserved_path(token_path, &path.child("path")));
            }
        }
        if let Some(b) = get(src, "clusterTrustBundle") {
            count += 1;
            let p = src_path.child("clusterTrustBundle");
            match (opt_str(b, "name"), opt_str(b, "signerName")) {
                (Some(_), Some(_)) => causes.push(invalid(
                    &p,
                    b.clone(),
                    "only one of name and signerName may be used",
                )),
                (Some(name), None) => {
                    if name.is_empty() {
                        causes.push(required(&p.child("name"), "must be a valid object name"));
                    }
                    if get(b, "labelSelector").is_some() {
                        causes.push(invalid(
                            &p.child("labelSelector"),
                            b.get("labelSelector").cloned().unwrap_or(Value::Null),
                            "labelSelector must be unset if name is specified",
                        ));
                    }
                }
                (None, Some(signer)) => {
                    if signer.is_empty() {
                        causes.push(required(
                            &p.child("signerName"),
                            "must be a valid signer name",
                        ));
                    }
                    causes.extend(validate_label_selector(
                        get(b, "labelSelector"),
                        SelectorOptions::default(),
                        &p.child("labelSelector"),
                    ));
                }
                (None, None) => {
                    causes.push(required(&p, "either name or signerName must be specified"))
                }
            }
            let bundle_path = str_of(b, "path");
            if bundle_path.is_empty() {
                causes.push(required(&p.child("path"), ""));
            }
            causes.extend(local_non_reserved_path(bundle_path, &p.child("path")));
            note_path(bundle_path, &mut causes, Value::from(bundle_path));
        }
        if count > 1 {
            causes.push(forbidden(
                &src_path,
                "may not specify more than 1 volume type per source",
            ));
        }
    }
    causes
}

fn validate_csi(source: &Value, path: &Path) -> Vec<Cause> {
    let driver = str_of(source, "driver");
    let p = path.child("driver");
    let mut causes = Vec::new();
    if driver.is_empty() {
        causes.push(required(&p, ""));
    }
    if driver.len() > 63 {
        causes.push(too_long(&p, 63));
    }
    for msg in names::dns1123_subdomain(&driver.to_lowercase()) {
        causes.push(invalid(&p, driver, &msg));
    }
    if let Some(secret) = get(source, "nodePublishSecretRef") {
        let name = str_of(secret, "name");
        if name.is_empty() {
            causes.push(required(
                &path.child("nodePublishSecretRef").child("name"),
                "",
            ));
        } else {
            for msg in names::name_is_dns_subdomain(name, false) {
                causes.push(invalid(&path.child("name"), name, &msg));
            }
        }
    }
    causes
}

fn validate_ephemeral(
    source: &Value,
    path: &Path,
    vol_path: &Path,
    vol_name: &str,
    pod_name: Option<&str>,
) -> Vec<Cause> {
    let Some(template) = get(source, "volumeClaimTemplate") else {
        return vec![required(&path.child("volumeClaimTemplate"), "")];
    };
    let mut causes = Vec::new();
    let tpl_path = path.child("volumeClaimTemplate");
    let meta_path = tpl_path.child("metadata");
    if let Some(meta) = get(template, "metadata") {
        causes.extend(super::meta::validate_annotations(
            &super::util::string_map(meta, "annotations"),
            &meta_path.child("annotations"),
        ));
        causes.extend(super::meta::validate_labels(
            &super::util::string_map(meta, "labels"),
            &meta_path.child("labels"),
        ));
        if let Some(m) = meta.as_object() {
            for key in m.keys() {
                if key != "labels" && key != "annotations" {
                    causes.push(forbidden(&meta_path.child(key), "cannot be set"));
                }
            }
        }
    }
    let spec_path = tpl_path.child("spec");
    let spec = get(template, "spec");
    if spec.is_none_or(|s| list(s, "accessModes").is_empty()) {
        causes.push(required(&spec_path.child("accessModes"), ""));
    }
    for mode in spec.map(|s| strings(s, "accessModes")).unwrap_or_default() {
        const MODES: &[&str] = &[
            "ReadOnlyMany",
            "ReadWriteMany",
            "ReadWriteOnce",
            "ReadWriteOncePod",
        ];
        if !MODES.contains(&mode) {
            causes.push(not_supported(&spec_path.child("accessModes"), mode, MODES));
        }
    }
    let has_storage = spec
        .and_then(|s| get(s, "resources"))
        .and_then(|r| get(r, "requests"))
        .and_then(|r| get(r, "storage"))
        .is_some();
    if !has_storage {
        causes.push(required(&spec_path.child("resources").key("storage"), ""));
    }
    if let Some(pod) = pod_name.filter(|p| !p.is_empty())
        && !vol_name.is_empty()
    {
        let claim = format!("{pod}-{vol_name}");
        for msg in names::name_is_dns_subdomain(&claim, false) {
            causes.push(invalid(
                &vol_path.child("name"),
                vol_name,
                &format!("PVC name {claim:?}: {msg}"),
            ));
        }
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let mut v = json!({"name": "a"});
        default_volume(&mut v);
        assert_eq!(v, json!({"name": "a", "emptyDir": {}}));
        let mut v = json!({"name": "s", "secret": {"secretName": "x"}});
        default_volume(&mut v);
        assert_eq!(v["secret"]["defaultMode"], 420);
        let mut v = json!({"name": "p", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token"}},
            {"downwardAPI": {"items": [{"path": "n", "fieldRef": {"fieldPath": "metadata.name"}}]}}
        ]}});
        default_volume(&mut v);
        assert_eq!(v["projected"]["defaultMode"], 420);
        assert_eq!(
            v["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"],
            3600
        );
        assert_eq!(
            v["projected"]["sources"][1]["downwardAPI"]["items"][0]["fieldRef"]["apiVersion"],
            "v1"
        );
        let mut v = json!({"name": "h", "hostPath": {"path": "/x"}});
        default_volume(&mut v);
        assert_eq!(v["hostPath"]["type"], "");
    }

    #[test]
    fn validation() {
        let vols = json!([
            {"name": "a", "emptyDir": {}},
            {"name": "a", "emptyDir": {}},
            {"name": "Bad"},
            {"name": "two", "emptyDir": {}, "secret": {"secretName": "s"}},
            {"name": "cm", "configMap": {"name": "", "defaultMode": 1000, "items": [{"key": "k", "path": "../x"}]}},
        ]);
        let (valid, causes) = validate_volumes(
            vols.as_array().map(Vec::as_slice).unwrap_or(&[]),
            None,
            &Path::new("spec").child("volumes"),
            true,
        );
        assert!(valid.contains_key("a"));
        let fields: Vec<(&str, &str)> = causes
            .iter()
            .map(|c| (c.field.as_str(), c.reason.as_str()))
            .collect();
        assert!(fields.contains(&("spec.volumes[1].name", "FieldValueDuplicate")));
        assert!(fields.contains(&("spec.volumes[2]", "FieldValueRequired")));
        assert!(fields.contains(&("spec.volumes[2].name", "FieldValueInvalid")));
        assert!(fields.contains(&("spec.volumes[3].secret", "FieldValueForbidden")));
        assert!(fields.contains(&("spec.volumes[4].configMap.name", "FieldValueRequired")));
        assert!(fields.contains(&("spec.volumes[4].configMap.defaultMode", "FieldValueInvalid")));
        assert!(fields.contains(&(
            "spec.volumes[4].configMap.items[0].path",
            "FieldValueInvalid"
        )));
    }
}
