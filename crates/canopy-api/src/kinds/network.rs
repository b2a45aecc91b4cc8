//! coordination.k8s.io/v1 Leases and discovery.k8s.io/v1 EndpointSlices.

use serde_json::{Value, json};

use super::meta::{
    validate_dns1123_label, validate_labels, validate_object_meta, validate_object_meta_update,
    validate_qualified_name,
};
use super::names;
use super::util::{
    Path, default_value, duplicate, ensure_obj, forbidden, get, immutable, int_of, invalid,
    items_mut, list, not_supported, opt_str, required, str_of, string_map, strings, too_many,
};
use crate::status::Cause;

/// `LeaseSpec` is a struct upstream, so always serialized.
pub(crate) fn default_lease(lease: &mut Value) {
    default_value(lease, "spec", json!({}));
}

fn validate_lease_spec(lease: &Value) -> Vec<Cause> {
    let empty = Value::Null;
    let spec = get(lease, "spec").unwrap_or(&empty);
    let path = Path::new("spec");
    let mut causes = Vec::new();
    if let Some(duration) = int_of(spec, "leaseDurationSeconds")
        && duration <= 0
    {
        causes.push(invalid(
            &path.child("leaseDurationSeconds"),
            duration,
            "must be greater than 0",
        ));
    }
    if let Some(transitions) = int_of(spec, "leaseTransitions")
        && transitions < 0
    {
        causes.push(invalid(
            &path.child("leaseTransitions"),
            transitions,
            "must be greater than or equal to 0",
        ));
    }
    let strategy = opt_str(spec, "strategy").unwrap_or("");
    if opt_str(spec, "preferredHolder").is_some_and(|h| !h.is_empty()) && strategy.is_empty() {
        causes.push(forbidden(
            &path.child("preferredHolder"),
            "may only be specified if `strategy` is defined",
        ));
    }
    causes
}

/// `ValidateLease`.
pub(crate) fn validate_lease(lease: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta(
        lease,
        true,
        names::name_is_dns_subdomain,
        &Path::new("metadata"),
    );
    causes.extend(validate_lease_spec(lease));
    causes
}

/// `ValidateLeaseUpdate`.
pub(crate) fn validate_lease_update(new: &Value, old: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta_update(new, old, &Path::new("metadata"));
    causes.extend(validate_lease_spec(new));
    causes
}

/// `SetDefaults_EndpointPort` and the struct fields upstream always serializes.
pub(crate) fn default_endpoint_slice(slice: &mut Value) {
    for port in items_mut(slice, "ports") {
        default_value(port, "name", json!(""));
        default_value(port, "protocol", json!("TCP"));
    }
    for endpoint in items_mut(slice, "endpoints") {
        ensure_obj(endpoint, "conditions");
    }
}

const ADDRESS_TYPES: &[&str] = &["FQDN", "IPv4", "IPv6"];
const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];

fn validate_fqdn(value: &str, path: &Path) -> Vec<Cause> {
    if value.is_empty() {
        return vec![required(path, "")];
    }
    let name = value.strip_suffix('.').unwrap_or(value);
    let errs = names::dns1123_subdomain(name);
    if !errs.is_empty() {
        return vec![invalid(path, name, &errs.join(","))];
    }
    if name.split('.').count() < 2 {
        return vec![invalid(
            path,
            name,
            "should be a domain with at least two segments separated by dots",
        )];
    }
    for label in name.split('.') {
        let errs = names::dns1123_label(label);
        if !errs.is_empty() {
            return vec![invalid(path, label, &errs.join(","))];
        }
    }
    Vec::new()
}

fn validate_endpoints(slice: &Value, path: &Path) -> Vec<Cause> {
    let endpoints = list(slice, "endpoints");
    if endpoints.len() > 1000 {
        return vec![too_many(path, endpoints.len(), 1000)];
    }
    let address_type = str_of(slice, "addressType");
    let mut causes = Vec::new();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let p = path.index(i);
        let address_path = p.child("addresses");
        let addresses = strings(endpoint, "addresses");
        if addresses.is_empty() {
            causes.push(required(&address_path, "must contain at least 1 address"));
        } else if addresses.len() > 100 {
            causes.push(too_many(&address_path, addresses.len(), 100));
        }
        for (j, address) in addresses.iter().enumerate() {
            let ap = address_path.index(j);
            match address_type {
                "IPv4" | "IPv6" => {
                    let family_ok = match names::parse_ip_sloppy(address) {
                        Some(_) => (address_type == "IPv6") == names::is_ipv6(address),
                        None => false,
                    };
                    if !family_ok {
                        let message = if address_type == "IPv4" {
                            "must be a valid IPv4 address"
                        } else {
                            "must be a valid IPv6 address"
                        };
                        causes.push(invalid(&ap, *address, message));
                    } else {
                        for msg in names::special_ip_errors(address) {
                            causes.push(invalid(&ap, *address, &msg));
                        }
                    }
                }
                "FQDN" => causes.extend(validate_fqdn(address, &ap)),
                _ => {}
            }
        }
        if let Some(node) = opt_str(endpoint, "nodeName") {
            for msg in names::name_is_dns_subdomain(node, false) {
                causes.push(invalid(&p.child("nodeName"), node, &msg));
            }
        }
        let topology_path = p.child("deprecatedTopology");
        let topology = string_map(endpoint, "deprecatedTopology");
        if topology.len() > 16 {
            causes.push(too_many(&topology_path, topology.len(), 16));
        }
        causes.extend(validate_labels(&topology, &topology_path));
        if let Some(zone) = opt_str(endpoint, "zone") {
            causes.extend(validate_labels(
                &[("topology.kubernetes.io/zone", zone)],
                &p.child("zone"),
            ));
        }
        if let Some(hostname) = opt_str(endpoint, "hostname") {
            causes.extend(validate_dns1123_label(hostname, &p.child("hostname")));
        }
        if let Some(hints) = get(endpoint, "hints") {
            let zones_path = p.child("hints").child("forZones");
            let zones = list(hints, "forZones");
            if zones.len() > 8 {
                causes.push(too_many(&zones_path, zones.len(), 8));
            }
            let mut seen = Vec::new();
            for (j, zone) in zones.iter().enumerate() {
                let name = str_of(zone, "name");
                let zp = zones_path.index(j).child("name");
                if seen.contains(&name) {
                    causes.push(duplicate(&zp, name));
                } else {
                    seen.push(name);
                }
                for msg in names::label_value(name) {
                    causes.push(invalid(&zp, name, &msg));
                }
            }
        }
    }
    causes
}

fn validate_ports(ports: &[Value], path: &Path) -> Vec<Cause> {
    if ports.len() > 20000 {
        return vec![too_many(path, ports.len(), 20000)];
    }
    let mut causes = Vec::new();
    let mut names_seen: Vec<&str> = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let p = path.index(i);
        let name = str_of(port, "name");
        if !name.is_empty() {
            causes.extend(validate_dns1123_label(name, &p.child("name")));
        }
        if names_seen.contains(&name) {
            causes.push(duplicate(&p.child("name"), name));
        } else {
            names_seen.push(name);
        }
        match opt_str(port, "protocol") {
            None => causes.push(required(&p.child("protocol"), "")),
            Some(protocol) if !PROTOCOLS.contains(&protocol) => {
                causes.push(not_supported(&p.child("protocol"), protocol, PROTOCOLS));
            }
            Some(_) => {}
        }
        if let Some(app_protocol) = opt_str(port, "appProtocol") {
            causes.extend(validate_qualified_name(
                app_protocol,
                &p.child("appProtocol"),
            ));
        }
    }
    causes
}

/// `ValidateEndpointSlice`.
pub(crate) fn validate_endpoint_slice(slice: &Value) -> Vec<Cause> {
    let mut causes = validate_object_meta(
        slice,
        true,
        names::name_is_dns_subdomain,
        &Path::new("metadata"),
    );
    let address_type = str_of(slice, "addressType");
    let type_path = Path::new("addressType");
    if address_type.is_empty() {
        causes.push(required(&type_path, ""));
    } else if !ADDRESS_TYPES.contains(&address_type) {
        causes.push(not_supported(&type_path, address_type, ADDRESS_TYPES));
    }
    causes.extend(validate_endpoints(slice, &Path::new("endpoints")));
    causes.extend(validate_ports(list(slice, "ports"), &Path::new("ports")));
    causes
}

/// `ValidateEndpointSliceUpdate`.
pub(crate) fn validate_endpoint_slice_update(new: &Value, old: &Value) -> Vec<Cause> {
    let mut causes = validate_endpoint_slice(new);
    causes.extend(immutable(
        get(new, "addressType"),
        get(old, "addressType"),
        &Path::new("addressType"),
    ));
    causes
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

    #[test]
    fn leases() {
        let lease = json!({"metadata": {"name": "node-1", "namespace": "kube-node-lease"},
            "spec": {"leaseDurationSeconds": 0, "leaseTransitions": -1, "preferredHolder": "x"}});
        assert_eq!(
            fields(&validate_lease(&lease)),
            vec![
                ("spec.leaseDurationSeconds", "FieldValueInvalid"),
                ("spec.leaseTransitions", "FieldValueInvalid"),
                ("spec.preferredHolder", "FieldValueForbidden")
            ]
        );
        let mut ok = json!({"metadata": {"name": "node-1", "namespace": "kube-node-lease"}});
        default_lease(&mut ok);
        assert_eq!(ok["spec"], json!({}));
        assert!(validate_lease(&ok).is_empty());
    }

    #[test]
    fn endpoint_slices() {
        let mut slice = json!({"metadata": {"name": "web-abc", "namespace": "d"}, "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1", "::1", "127.0.0.1"]}, {"addresses": []}],
            "ports": [{"port": 80}, {"port": 81, "protocol": "HTTP"}]});
        default_endpoint_slice(&mut slice);
        assert_eq!(
            slice["ports"][0],
            json!({"port": 80, "name": "", "protocol": "TCP"})
        );
        assert_eq!(slice["endpoints"][0]["conditions"], json!({}));
        let causes = validate_endpoint_slice(&slice);
        assert_eq!(
            fields(&causes),
            vec![
                ("endpoints[0].addresses[1]", "FieldValueInvalid"),
                ("endpoints[0].addresses[2]", "FieldValueInvalid"),
                ("endpoints[1].addresses", "FieldValueRequired"),
                ("ports[1].name", "FieldValueDuplicate"),
                ("ports[1].protocol", "FieldValueNotSupported")
            ]
        );
        let mut changed = slice.clone();
        changed["addressType"] = json!("IPv6");
        assert!(
            fields(&validate_endpoint_slice_update(&changed, &slice))
                .contains(&("addressType", "FieldValueInvalid"))
        );
    }
}
