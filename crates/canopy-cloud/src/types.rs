//! The objects of the provider interface.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

/// An IPv4 subnet, `address/prefix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Subnet {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// Parses `10.0.0.0/16`; the address is masked to the network.
    pub fn parse(text: &str) -> Result<Subnet, String> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR (address/prefix)"))?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("{address:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=30).contains(p))
            .ok_or_else(|| format!("prefix {prefix:?} must be 1 to 30"))?;
        Ok(Subnet {
            address: Ipv4Addr::from(u32::from(address) & Self::mask_of(prefix)),
            prefix,
        })
    }

    fn mask_of(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    /// The netmask.
    pub fn mask(&self) -> u32 {
        Self::mask_of(self.prefix)
    }

    /// Whether an address is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.address)
    }

    /// The n-th address of the subnet (0 is the network address).
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - self.prefix);
        (u64::from(n) < size).then(|| Ipv4Addr::from(u32::from(self.address) + n))
    }

    /// Usable host addresses: not the network or broadcast address.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let size = 1u64 << (32 - self.prefix.clamp(1, 32));
        (1..size.saturating_sub(1)).filter_map(move |n| self.nth(n as u32))
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// A tenant network (a VPC with one subnet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub name: String,
    pub tenant: String,
    pub subnet: Subnet,
    /// The gateway's address; by default the subnet's first address.
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub tenant: String,
    pub subnet: Subnet,
    pub gateway: Ipv4Addr,
}

/// A server's size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flavor {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// What the server's agent needs to join the cluster; the provider turns it into the
/// server's configuration (the local provider: files and the agent's command line; an
/// OpenStack one: the image's configuration drive). Nothing else runs at boot (seed §7).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrap {
    /// The Node's name.
    pub node_name: String,
    /// A kubeconfig with the node's credential.
    pub kubeconfig: String,
    /// Further `canopy agent` arguments.
    pub agent_args: Vec<String>,
}

/// The server's own NIC: a static address in a tenant network (no DHCP; seed §7).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub network: String,
    /// An address of the network's subnet; allocated by the provider when absent.
    pub ip: Option<Ipv4Addr>,
    /// IPv4 CIDRs the NIC may also send from ([`Port::allowed_address_pairs`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_address_pairs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSpec {
    pub name: String,
    pub tenant: String,
    pub flavor: Flavor,
    pub nic: NicSpec,
    pub bootstrap: Bootstrap,
    /// Free-form labels kept with the server (the controller records what it needs to find
    /// its servers again).
    pub tags: BTreeMap<String, String>,
}

/// A spare server of the warm pool: sized, booted, on the management network, nothing of
/// any tenant's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpareSpec {
    pub name: String,
    pub flavor: Flavor,
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerStatus {
    /// Created, not yet running its agent.
    Building,
    /// Running.
    Active,
    /// Built and waiting in the warm pool: no tenant, no NIC, no agent yet
    /// ([`crate::CloudProvider::claim_spare`]).
    Spare,
    /// Stopped without being deleted (its agent exited, the host rebooted).
    Shutoff,
    /// Could not be created or started.
    Error(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub name: String,
    pub tenant: String,
    pub flavor: Flavor,
    pub status: ServerStatus,
    /// The address its agent serves on and reaches the control plane from.
    pub management_ip: Option<Ipv4Addr>,
    /// Its address in the tenant network.
    pub ip: Option<Ipv4Addr>,
    pub network: String,
    pub tags: BTreeMap<String, String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub name: String,
    pub network: String,
    /// An address of the network's subnet; allocated by the provider when absent.
    pub ip: Option<Ipv4Addr>,
    /// A unicast MAC (`aa:bb:cc:dd:ee:ff`); chosen by the provider when absent.
    #[serde(default)]
    pub mac: Option<String>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub name: String,
    pub network: String,
    pub ip: Ipv4Addr,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The server it is plugged into.
    pub server: Option<String>,
    /// The interface's name inside that server (at most 15 bytes).
    pub device: String,
    pub tags: BTreeMap<String, String>,
    /// Further source ranges the port may send from (Neutron's allowed address pairs,
    /// with the port's own MAC): a VM's NIC sends from its tenant's Service range, as its
    /// service proxy answers pods on behalf of ClusterIPs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_address_pairs: Vec<String>,
}

/// A public IP (a floating IP): an address of the public network that reaches a port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicIpSpec {
    pub name: String,
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicIp {
    pub name: String,
    pub address: Ipv4Addr,
    /// The port it is bound to: traffic to the address reaches that port's address, and
    /// the port sends from it.
    pub port: Option<String>,
    pub tags: BTreeMap<String, String>,
}

/// Whether `mac` is a unicast MAC written `aa:bb:cc:dd:ee:ff` (lowercase or not).
pub fn valid_unicast_mac(mac: &str) -> bool {
    let octets: Vec<&str> = mac.split(':').collect();
    octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(octets[0], 16).is_ok_and(|first| first & 1 == 0)
        && mac != "00:00:00:00:00:00"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_checked() {
        assert!(valid_unicast_mac("02:aa:bb:cc:dd:ee"));
        assert!(valid_unicast_mac("FA:16:3E:00:00:01"));
        for bad in [
            "",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
            "02:aa:bb:cc:dd",
            "02:aa:bb:cc:dd:eg",
            "02-aa-bb-cc-dd-ee",
        ] {
            assert!(!valid_unicast_mac(bad), "{bad}");
        }
    }
}
