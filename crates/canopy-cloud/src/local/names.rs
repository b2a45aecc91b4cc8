//! How the local provider names what it makes in the kernel. Every name is derived from the
//! object's name (and the provider's instance tag), never allocated, so whatever a crashed
//! provider left behind can be found again from the state alone, and tooling can find a
//! server's namespace or a port's device without asking the provider.

use sha2::{Digest, Sha256};

/// The network namespace that holds every tenant network's bridge.
pub fn switch_netns(instance: &str) -> String {
    format!("cnp-{instance}-sw")
}

/// The network namespace of a server (its "VM").
pub fn server_netns(instance: &str, server: &str) -> String {
    format!("cnp-{instance}-{server}")
}

/// A network's bridge, inside the switch namespace.
pub fn bridge(network: &str) -> String {
    format!("b{}", short_hash(network))
}

/// The public network's bridge, inside the switch namespace (tenant bridges are
/// `b<8 hex>`, so never this).
pub const PUBLIC_BRIDGE: &str = "bpub";

/// The switch end of the host's link to the public network.
pub const PUBLIC_SWITCH_LINK: &str = "pubhost";

/// The links of the public network's bridge: the host's, and any client plugged in (a
/// test's namespace, an uplink) must be named so. The public network is not a tenant's:
/// its frames are not checked against ports (tenant port links are `p<8 hex>`, never
/// `pub…`).
pub const PUBLIC_PORT_PATTERN: &str = "pub*";

/// The host end of its link to the public network.
pub fn public_host_link(instance: &str) -> String {
    format!("v{instance}pub")
}

/// The switch end of a port's veth pair, plugged into its network's bridge.
pub fn port_switch_link(port: &str) -> String {
    format!("p{}", short_hash(port))
}

/// The server end of a port's veth pair: [`crate::Port::device`] of a plain port.
pub fn port_device(port: &str) -> String {
    format!("e{}", short_hash(port))
}

/// The device name of a server's own NIC inside it.
pub const NIC_DEVICE: &str = "eth0";

/// The server end of the management link.
pub const MGMT_DEVICE: &str = "mgmt0";

/// The host end of a server's management link. The fixed-length hash makes the name's
/// length tell the instance tag's length, so another instance's links never match.
pub fn mgmt_host_link(instance: &str, server: &str) -> String {
    format!("m{instance}{}", &short_hash(server)[..6])
}

/// Whether a host interface name is a management link of this instance.
pub fn is_mgmt_host_link(instance: &str, link: &str) -> bool {
    link.strip_prefix('m')
        .and_then(|rest| rest.strip_prefix(instance))
        .is_some_and(|hex| hex.len() == 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The port a server's own NIC is.
pub fn nic_port(server: &str) -> String {
    format!("{server}-nic")
}

/// The host's nftables table (family `inet`) that confines the management links.
pub fn host_table(instance: &str) -> String {
    format!("canopy_{instance}")
}

/// The cgroup (relative to every hierarchy's root) under which all servers live.
pub fn instance_cgroup(instance: &str) -> String {
    format!("canopy-{instance}")
}

/// A server's cgroup, sized by its flavor.
pub fn server_cgroup(instance: &str, server: &str) -> String {
    format!("canopy-{instance}/{server}")
}

/// The cgroup its agent puts pods under (`--cgroup-parent`).
pub fn pods_cgroup(instance: &str, server: &str) -> String {
    format!("canopy-{instance}/{server}/pods")
}

/// A port's MAC: locally administered, unicast, stable for the port's name.
pub fn port_mac(port: &str) -> String {
    mac_from(&format!("port/{port}"))
}

/// The bridge's own MAC (the gateway's). Fixed, because a bridge otherwise takes the
/// lowest MAC of its ports and changes it as ports come and go, leaving servers with a
/// stale ARP entry for their gateway.
pub fn bridge_mac(network: &str) -> String {
    mac_from(&format!("gateway/{network}"))
}

/// The host end of a server's management link; servers keep a permanent neighbour entry
/// for the control plane's address with it.
pub fn mgmt_host_mac(instance: &str, server: &str) -> String {
    mac_from(&format!("mgmt/{instance}/{server}"))
}

fn mac_from(seed: &str) -> String {
    let digest = Sha256::digest(seed.as_bytes());
    let mut mac = String::from("02");
    for byte in &digest[..5] {
        mac.push_str(&format!(":{byte:02x}"));
    }
    mac
}

/// The first 8 hex digits of the name's SHA-256.
pub fn short_hash(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// 1–4 lowercase alphanumerics.
pub fn valid_instance(instance: &str) -> bool {
    (1..=4).contains(&instance.len())
        && instance
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Longest server name: the namespace, cgroup and directory names stay short.
pub const MAX_SERVER_NAME: usize = 40;

/// A server name: a DNS label of at most [`MAX_SERVER_NAME`] characters, and not `sw`
/// (whose namespace name is the switch's).
pub fn check_server_name(name: &str) -> Result<(), String> {
    let label = !name.is_empty()
        && name.len() <= MAX_SERVER_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !label {
        return Err(format!(
            "server name {name:?} must be a DNS label (lowercase alphanumerics and '-') of at most {MAX_SERVER_NAME} characters"
        ));
    }
    if name == "sw" {
        return Err("server name \"sw\" is reserved (the switch namespace)".into());
    }
    Ok(())
}

/// A network or port name: it names a state file, so no path separators or leading dot.
pub fn check_object_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} name {name:?} must be 1 to 253 characters of letters, digits, '-', '_' and '.', not starting with '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_derived_and_fit_interface_limits() {
        // Pinned: changing a derivation orphans every kernel object of existing clouds.
        assert_eq!(short_hash("net-a"), "1d509e1a");
        assert_eq!(bridge("net-a"), "b1d509e1a");
        assert_eq!(port_switch_link("net-a"), "p1d509e1a");
        assert_eq!(port_device("net-a"), "e1d509e1a");
        assert_eq!(mgmt_host_link("t1", "net-a"), "mt11d509e");
        assert_eq!(switch_netns("t1"), "cnp-t1-sw");
        assert_eq!(server_netns("t1", "vm-1"), "cnp-t1-vm-1");
        assert_eq!(nic_port("vm-1"), "vm-1-nic");
        assert_eq!(host_table("t1"), "canopy_t1");
        assert_eq!(server_cgroup("t1", "vm-1"), "canopy-t1/vm-1");
        assert_eq!(pods_cgroup("t1", "vm-1"), "canopy-t1/vm-1/pods");
        let longest = "x".repeat(MAX_SERVER_NAME);
        for name in [
            bridge(&longest),
            port_switch_link(&longest),
            port_device(&longest),
            mgmt_host_link("abcd", &longest),
        ] {
            assert!(name.len() <= 15, "{name}");
        }
    }

    #[test]
    fn macs_are_stable_unicast_and_locally_administered() {
        let mac = port_mac("p1");
        assert_eq!(mac, port_mac("p1"));
        assert_ne!(mac, port_mac("p2"));
        assert_ne!(bridge_mac("p1"), port_mac("p1"));
        assert_eq!(mac.len(), 17);
        assert!(mac.starts_with("02:"));
        assert!(
            mac.split(':')
                .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok())
        );
    }

    #[test]
    fn management_links_are_told_apart_by_instance() {
        let link = mgmt_host_link("ab", "vm");
        assert!(is_mgmt_host_link("ab", &link));
        assert!(!is_mgmt_host_link("a", &link));
        assert!(!is_mgmt_host_link("abc", &link));
        assert!(!is_mgmt_host_link("ab", &mgmt_host_link("abc", "vm")));
        assert!(!is_mgmt_host_link("ab", "eth0"));
    }

    #[test]
    fn validation() {
        assert!(valid_instance("a"));
        assert!(valid_instance("ab12"));
        assert!(!valid_instance(""));
        assert!(!valid_instance("abcde"));
        assert!(!valid_instance("Ab"));
        assert!(!valid_instance("a-b"));
        assert!(check_server_name("vm-1").is_ok());
        assert!(check_server_name(&"a".repeat(40)).is_ok());
        assert!(check_server_name(&"a".repeat(41)).is_err());
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "sw"] {
            assert!(check_server_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_object_name("port", "pod.ns_1-x").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "a b"] {
            assert!(check_object_name("port", bad).is_err(), "{bad:?}");
        }
    }
}
