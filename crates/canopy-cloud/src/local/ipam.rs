//! Address allocation. The provider's state is the allocator's memory: an address is in use
//! exactly while a port (or, on the management network, a server) holding it is recorded,
//! so allocation needs no separate bitmap that could disagree with the objects.

use std::{collections::HashSet, net::Ipv4Addr};

use crate::Subnet;

/// Whether the subnet is usable as a network: a masked address and room for a gateway and
/// at least one more host.
pub fn check_subnet(subnet: Subnet) -> Result<(), String> {
    // `Subnet::hosts` cannot count the 2^32 addresses of a /0, and no network is that big.
    if !(1..=30).contains(&subnet.prefix) {
        return Err(format!("subnet {subnet}: the prefix must be 1 to 30"));
    }
    if u32::from(subnet.address) & subnet.mask() != u32::from(subnet.address) {
        return Err(format!(
            "subnet {subnet} has host bits set (did you mean {}/{}?)",
            Ipv4Addr::from(u32::from(subnet.address) & subnet.mask()),
            subnet.prefix
        ));
    }
    Ok(())
}

/// The network and broadcast addresses, which no host may use.
fn is_host(subnet: Subnet, ip: Ipv4Addr) -> bool {
    let last = u32::from(subnet.address) | !subnet.mask();
    subnet.contains(ip) && ip != subnet.address && u32::from(ip) != last
}

/// The gateway of a network: the requested one, or the subnet's first host.
pub fn gateway(subnet: Subnet, requested: Option<Ipv4Addr>) -> Result<Ipv4Addr, String> {
    let gateway = requested.unwrap_or_else(|| Ipv4Addr::from(u32::from(subnet.address) + 1));
    if !is_host(subnet, gateway) {
        return Err(format!(
            "gateway {gateway} is not a host address of {subnet}"
        ));
    }
    Ok(gateway)
}

/// Why an address someone asked for cannot be theirs: outside the subnet, not a host
/// address, or reserved (the gateway, the control plane); `None` when it is acceptable
/// (whether another object holds it is the caller's question).
pub fn check_requested(subnet: Subnet, reserved: &[Ipv4Addr], ip: Ipv4Addr) -> Option<String> {
    if !subnet.contains(ip) {
        return Some(format!("{ip} is not in {subnet}"));
    }
    if !is_host(subnet, ip) {
        return Some(format!(
            "{ip} is the network or broadcast address of {subnet}"
        ));
    }
    if reserved.contains(&ip) {
        return Some(format!("{ip} is reserved in {subnet}"));
    }
    None
}

/// The lowest host address of the subnet that is neither reserved nor used. Lowest-first
/// keeps addresses small and predictable, and a released address is the next one handed
/// out, which is what a cloud user expects of a small network.
pub fn allocate(
    subnet: Subnet,
    reserved: &[Ipv4Addr],
    used: &HashSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    subnet
        .hosts()
        .find(|ip| !reserved.contains(ip) && !used.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(text: &str) -> Subnet {
        Subnet::parse(text).unwrap()
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    #[test]
    fn allocates_lowest_free_host_never_network_gateway_or_broadcast() {
        let net = subnet("10.1.2.0/29");
        let gw = gateway(net, None).unwrap();
        assert_eq!(gw, ip("10.1.2.1"));
        let mut used = HashSet::new();
        let mut got = Vec::new();
        while let Some(next) = allocate(net, &[gw], &used) {
            used.insert(next);
            got.push(next);
        }
        let expected: Vec<Ipv4Addr> = (2..=6).map(|n| ip(&format!("10.1.2.{n}"))).collect();
        assert_eq!(got, expected, "a /29 has hosts .1–.6 and .1 is the gateway");
        used.remove(&ip("10.1.2.4"));
        assert_eq!(allocate(net, &[gw], &used), Some(ip("10.1.2.4")));
    }

    #[test]
    fn custom_gateway_is_skipped_wherever_it_is() {
        let net = subnet("192.168.0.0/30");
        let gw = gateway(net, Some(ip("192.168.0.2"))).unwrap();
        let used = HashSet::new();
        assert_eq!(allocate(net, &[gw], &used), Some(ip("192.168.0.1")));
        let used: HashSet<_> = [ip("192.168.0.1")].into();
        assert_eq!(allocate(net, &[gw], &used), None, "exhausted");
    }

    #[test]
    fn gateway_and_requests_are_checked() {
        let net = subnet("10.0.0.0/24");
        assert!(gateway(net, Some(ip("10.0.0.0"))).is_err());
        assert!(gateway(net, Some(ip("10.0.0.255"))).is_err());
        assert!(gateway(net, Some(ip("10.0.1.1"))).is_err());
        assert_eq!(gateway(net, Some(ip("10.0.0.254"))), Ok(ip("10.0.0.254")));
        let reserved = [ip("10.0.0.1")];
        assert!(check_requested(net, &reserved, ip("10.0.0.7")).is_none());
        assert!(check_requested(net, &reserved, ip("10.0.0.1")).is_some());
        assert!(check_requested(net, &reserved, ip("10.0.0.0")).is_some());
        assert!(check_requested(net, &reserved, ip("10.0.0.255")).is_some());
        assert!(check_requested(net, &reserved, ip("10.0.1.7")).is_some());
    }

    #[test]
    fn subnets_are_checked() {
        assert!(check_subnet(subnet("10.0.0.0/30")).is_ok());
        let unmasked = Subnet {
            address: ip("10.0.0.5"),
            prefix: 24,
        };
        assert!(check_subnet(unmasked).is_err());
        let tiny = Subnet {
            address: ip("10.0.0.0"),
            prefix: 31,
        };
        assert!(check_subnet(tiny).is_err());
    }
}
