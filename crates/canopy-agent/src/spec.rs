//! From a pod's container to what the runtime runs: the command line (the image's
//! entrypoint and cmd against the container's command and args), the environment with
//! upstream's `$(VAR)` expansion, the working directory, the user and the resources.

use std::collections::HashMap;

use canopy_api::quantity::Quantity as ParsedQuantity;
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};

use crate::volumes::Sources;

/// Why a container cannot be configured (upstream's CreateContainerConfigError).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The argv: upstream's rules for command/args over the image's Entrypoint/Cmd.
pub fn command_line(
    container: &Container,
    entrypoint: &[String],
    cmd: &[String],
    env: &[(String, String)],
) -> Result<Vec<String>, ConfigError> {
    let command = container.command.clone().unwrap_or_default();
    let args = container.args.clone().unwrap_or_default();
    let argv: Vec<String> = if !command.is_empty() {
        command.into_iter().chain(args).collect()
    } else if !args.is_empty() {
        entrypoint.iter().cloned().chain(args).collect()
    } else {
        entrypoint.iter().chain(cmd).cloned().collect()
    };
    if argv.is_empty() {
        return Err(ConfigError(
            "no command specified: neither the container nor its image has one".into(),
        ));
    }
    let lookup: HashMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Ok(argv.iter().map(|a| expand(a, &lookup)).collect())
}

/// Upstream's `$(VAR)` expansion: a defined variable is replaced, `$$` escapes, anything
/// else is kept as written.
pub fn expand(input: &str, env: &HashMap<&str, &str>) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            match bytes[i + 1] {
                b'$' => {
                    out.push('$');
                    i += 2;
                    continue;
                }
                b'(' => {
                    if let Some(end) = input[i + 2..].find(')') {
                        let name = &input[i + 2..i + 2 + end];
                        match env.get(name) {
                            Some(value) => out.push_str(value),
                            None => out.push_str(&input[i..i + 3 + end]),
                        }
                        i += 3 + end;
                        continue;
                    }
                }
                _ => {}
            }
        }
        let ch = input[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

/// The value of a `fieldRef` as upstream's downward API gives it.
fn field_value(pod: &Pod, path: &str, host_ip: Option<&str>) -> Result<String, ConfigError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let map_entry = |map: &Option<std::collections::BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key))
            .cloned()
            .unwrap_or_default()
    };
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" => host_ip.unwrap_or_default().to_string(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.podIPs" => status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .map(|ip| ip.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        other => {
            if let Some(key) = other
                .strip_prefix("metadata.labels['")
                .and_then(|k| k.strip_suffix("']"))
            {
                map_entry(&meta.labels, key)
            } else if let Some(key) = other
                .strip_prefix("metadata.annotations['")
                .and_then(|k| k.strip_suffix("']"))
            {
                map_entry(&meta.annotations, key)
            } else {
                return Err(ConfigError(format!(
                    "unsupported fieldRef {other:?} in the downward API"
                )));
            }
        }
    };
    Ok(value)
}

/// The value of a `fieldRef` in a downward API volume: metadata only, and the whole
/// label and annotation maps as upstream formats them (`key="value"` lines, sorted).
pub fn field_value_in_volume(
    pod: &Pod,
    path: &str,
    host_ip: Option<&str>,
) -> Result<String, ConfigError> {
    let format_map = |map: &Option<std::collections::BTreeMap<String, String>>| {
        map.iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    match path {
        "metadata.labels" => Ok(format_map(&pod.metadata.labels)),
        "metadata.annotations" => Ok(format_map(&pod.metadata.annotations)),
        p if p.starts_with("metadata.") => field_value(pod, p, host_ip),
        other => Err(ConfigError(format!(
            "fieldRef {other:?} is not supported in downward API volumes (only metadata fields are)"
        ))),
    }
}

/// A resource of the container in the downward API's units.
pub fn resource_value(
    container: &Container,
    resource: &str,
    divisor: Option<&str>,
    node_allocatable: &NodeAllocatable,
) -> Result<String, ConfigError> {
    let resources = container.resources.as_ref();
    let (kind, name) = resource
        .split_once('.')
        .ok_or_else(|| ConfigError(format!("unsupported resourceFieldRef {resource:?}")))?;
    let map = match kind {
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        _ => {
            return Err(ConfigError(format!(
                "unsupported resourceFieldRef {resource:?}"
            )));
        }
    };
    let parse = |text: &str| {
        ParsedQuantity::parse(text)
            .map_err(|e| ConfigError(format!("invalid quantity {text:?}: {e}")))
    };
    // An unset limit reads as the node's allocatable, as upstream.
    let value_millis = match map.and_then(|m| m.get(name)) {
        Some(q) => parse(&q.0)?.milli(),
        None if kind == "limits" && name == "cpu" => node_allocatable.cpu_millis as i128,
        None if kind == "limits" && name == "memory" => {
            node_allocatable.memory_bytes as i128 * 1000
        }
        None => 0,
    };
    let divisor_millis = match divisor {
        Some(d) if !d.is_empty() => parse(d)?.milli(),
        _ => 1000,
    };
    if divisor_millis <= 0 {
        return Err(ConfigError(
            "resourceFieldRef divisor must be positive".into(),
        ));
    }
    // Rounded up, as upstream's ExtractContainerResourceValue.
    let value = (value_millis + divisor_millis - 1) / divisor_millis;
    Ok(value.to_string())
}

/// What the downward API reads of the node.
#[derive(Clone, Copy, Debug)]
pub struct NodeAllocatable {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// The container's environment: the image's, then the container's `envFrom` sources, then
/// its `env` in order, each value expanded against the variables before it (upstream's
/// order).
pub fn environment(
    pod: &Pod,
    container: &Container,
    image_env: &[String],
    host_ip: Option<&str>,
    node: &NodeAllocatable,
    sources: &Sources,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut env: Vec<(String, String)> = image_env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let set = |env: &mut Vec<(String, String)>, name: String, value: String| match env
        .iter_mut()
        .find(|(k, _)| *k == name)
    {
        Some(slot) => slot.1 = value,
        None => env.push((name, value)),
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (data, kind, name, optional) = if let Some(r) = &from.config_map_ref {
            (
                sources.config_map(&r.name),
                "configmap",
                &r.name,
                r.optional == Some(true),
            )
        } else if let Some(r) = &from.secret_ref {
            (
                sources.secret(&r.name),
                "secret",
                &r.name,
                r.optional == Some(true),
            )
        } else {
            continue;
        };
        let Some(data) = data else {
            if optional {
                continue;
            }
            return Err(ConfigError(format!("{kind} {name:?} not found")));
        };
        for (key, value) in data {
            let var = format!("{prefix}{key}");
            // Upstream skips (and reports) keys that are not valid variable names.
            if var.is_empty() || var.contains('=') || var.chars().any(|c| c.is_control()) {
                continue;
            }
            set(&mut env, var, String::from_utf8_lossy(&value).into_owned());
        }
    }
    for EnvVar {
        name,
        value,
        value_from,
    } in container.env.iter().flatten()
    {
        let resolved = match (value, value_from) {
            (_, Some(from)) => {
                if let Some(field) = &from.field_ref {
                    field_value(pod, &field.field_path, host_ip)?
                } else if let Some(resource) = &from.resource_field_ref {
                    resource_value(
                        container,
                        &resource.resource,
                        resource.divisor.as_ref().map(|d| d.0.as_str()),
                        node,
                    )?
                } else if let Some(r) = &from.config_map_key_ref {
                    match key_value(
                        sources.config_map(&r.name),
                        "configmap",
                        &r.name,
                        &r.key,
                        r.optional,
                    )? {
                        Some(v) => v,
                        None => continue,
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    match key_value(
                        sources.secret(&r.name),
                        "secret",
                        &r.name,
                        &r.key,
                        r.optional,
                    )? {
                        Some(v) => v,
                        None => continue,
                    }
                } else {
                    return Err(ConfigError(format!(
                        "env {name}: valueFrom names no source"
                    )));
                }
            }
            (Some(value), None) => {
                let lookup: HashMap<&str, &str> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                expand(value, &lookup)
            }
            (None, None) => String::new(),
        };
        set(&mut env, name.clone(), resolved);
    }
    Ok(env)
}

/// One key of a ConfigMap or Secret for an env var; `None` when optional and absent.
fn key_value(
    data: Option<std::collections::BTreeMap<String, Vec<u8>>>,
    kind: &str,
    name: &str,
    key: &str,
    optional: Option<bool>,
) -> Result<Option<String>, ConfigError> {
    let optional = optional == Some(true);
    match data {
        None if optional => Ok(None),
        None => Err(ConfigError(format!("{kind} {name:?} not found"))),
        Some(data) => match data.get(key) {
            Some(value) => Ok(Some(String::from_utf8_lossy(value).into_owned())),
            None if optional => Ok(None),
            None => Err(ConfigError(format!(
                "couldn't find key {key} in {kind} {name}"
            ))),
        },
    }
}

/// A container's resources in the runtime's units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request_millis: Option<u64>,
    pub cpu_limit_millis: Option<u64>,
    pub memory_request_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
}

/// The container's cpu in millicores and memory in bytes; a limit without a request
/// requests the limit, as upstream's defaulting.
pub fn resources(container: &Container) -> Result<Resources, ConfigError> {
    type Map =
        std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>;
    let get = |map: Option<&Map>, name: &str| -> Result<Option<u64>, ConfigError> {
        map.and_then(|m| m.get(name))
            .map(|q| {
                ParsedQuantity::parse(&q.0)
                    .map(|p| if name == "cpu" { p.milli() } else { p.value() }.max(0) as u64)
                    .map_err(|e| ConfigError(format!("invalid {name} quantity {:?}: {e}", q.0)))
            })
            .transpose()
    };
    let resources = container.resources.as_ref();
    let requests = resources.and_then(|r| r.requests.as_ref());
    let limits = resources.and_then(|r| r.limits.as_ref());
    let cpu_limit_millis = get(limits, "cpu")?;
    let memory_limit_bytes = get(limits, "memory")?;
    Ok(Resources {
        cpu_request_millis: get(requests, "cpu")?.or(cpu_limit_millis),
        cpu_limit_millis,
        memory_request_bytes: get(requests, "memory")?.or(memory_limit_bytes),
        memory_limit_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(json: serde_json::Value) -> Container {
        serde_json::from_value(json).unwrap()
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn command_rules_follow_upstream() {
        let ep = strings(&["/entry"]);
        let cmd = strings(&["default"]);
        let none = container(serde_json::json!({"name": "c"}));
        assert_eq!(
            command_line(&none, &ep, &cmd, &[]).unwrap(),
            ["/entry", "default"]
        );
        let args = container(serde_json::json!({"name": "c", "args": ["x"]}));
        assert_eq!(
            command_line(&args, &ep, &cmd, &[]).unwrap(),
            ["/entry", "x"]
        );
        let command = container(
            serde_json::json!({"name": "c", "command": ["sh"], "args": ["-c", "$(GREETING) $$(HOME) $(MISSING)"]}),
        );
        let env = vec![("GREETING".to_string(), "hi".to_string())];
        assert_eq!(
            command_line(&command, &ep, &cmd, &env).unwrap(),
            ["sh", "-c", "hi $(HOME) $(MISSING)"]
        );
        assert!(command_line(&none, &[], &[], &[]).is_err());
    }

    #[test]
    fn environment_resolves_fields_resources_and_expansion() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": []}
        }))
        .unwrap();
        let c = container(serde_json::json!({"name": "c",
        "resources": {"limits": {"memory": "64Mi"}, "requests": {"cpu": "250m"}},
        "env": [
            {"name": "PATH", "value": "/custom"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
            {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
            {"name": "CPULIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "WHO", "value": "$(POD) in $(APP)"}
        ]}));
        let node = NodeAllocatable {
            cpu_millis: 2000,
            memory_bytes: 1 << 30,
        };
        let env = environment(
            &pod,
            &c,
            &strings(&["PATH=/bin", "LANG=C"]),
            Some("10.1.1.1"),
            &node,
            &Sources::default(),
        )
        .unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some("/custom"));
        assert_eq!(get("LANG"), Some("C"));
        assert_eq!(get("POD"), Some("p"));
        assert_eq!(get("APP"), Some("web"));
        assert_eq!(get("HOST"), Some("10.1.1.1"));
        assert_eq!(get("MEM"), Some("64"));
        assert_eq!(get("CPU"), Some("250"));
        assert_eq!(get("CPULIMIT"), Some("2"));
        assert_eq!(get("WHO"), Some("p in web"));
        let secret = container(serde_json::json!({"name": "c", "env": [{"name": "S",
            "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}));
        let missing = environment(&pod, &secret, &[], None, &node, &Sources::default());
        assert_eq!(missing.unwrap_err().0, "secret \"s\" not found");
    }

    #[test]
    fn environment_from_config_maps_and_secrets() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns"}, "spec": {"containers": []}
        }))
        .unwrap();
        let config_map: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "cm"}, "data": {"A": "from-cm", "B": "b", "bad=key": "x"}}),
        )
        .unwrap();
        let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "s"}, "data": {"password": "aHVudGVyMg=="}}),
        )
        .unwrap();
        let sources = Sources::from_objects(vec![config_map], vec![secret]);
        let c = container(serde_json::json!({"name": "c",
        "envFrom": [{"configMapRef": {"name": "cm"}}, {"secretRef": {"name": "s"}, "prefix": "S_"},
                    {"configMapRef": {"name": "absent", "optional": true}}],
        "env": [
            {"name": "B", "value": "env wins"},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "password"}}},
            {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "nope", "optional": true}}},
            {"name": "BOTH", "value": "$(A)/$(PW)"}
        ]}));
        let node = NodeAllocatable {
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
        };
        let env = environment(&pod, &c, &[], None, &node, &sources).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("A"), Some("from-cm"));
        assert_eq!(get("B"), Some("env wins"));
        assert_eq!(get("S_password"), Some("hunter2"));
        assert_eq!(get("PW"), Some("hunter2"));
        assert_eq!(get("OPT"), None);
        assert_eq!(get("BOTH"), Some("from-cm/hunter2"));
        assert_eq!(get("bad=key"), None);
        let missing_key = container(serde_json::json!({"name": "c", "env": [{"name": "X",
            "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "nope"}}}]}));
        assert_eq!(
            environment(&pod, &missing_key, &[], None, &node, &sources)
                .unwrap_err()
                .0,
            "couldn't find key nope in configmap cm"
        );
    }

    #[test]
    fn resources_in_runtime_units() {
        let c = container(serde_json::json!({"name": "c", "resources": {
            "limits": {"cpu": "1500m", "memory": "128Mi"}}}));
        assert_eq!(
            resources(&c).unwrap(),
            Resources {
                cpu_request_millis: Some(1500),
                cpu_limit_millis: Some(1500),
                memory_request_bytes: Some(128 << 20),
                memory_limit_bytes: Some(128 << 20),
            }
        );
        let none = container(serde_json::json!({"name": "c"}));
        assert_eq!(resources(&none).unwrap(), Resources::default());
    }
}
