//! The local cloud's networking, made of kernel objects with `ip` and `nft`.
//!
//! * The switch namespace holds one bridge per tenant network, with the network's gateway
//!   address on it. Forwarding is off there and `table inet guard` drops anything routed,
//!   so networks never connect. Tenants choose overlapping subnets, so the switch cannot
//!   route by destination even for its own replies: each network has a packet mark, set on
//!   everything arriving from its bridge, that selects a routing table holding only that
//!   network's subnet, and `fwmark_reflect` makes the kernel's replies (ICMP echo replies,
//!   errors) carry the mark of what they answer. The main table has no subnet route at all
//!   (addresses are `noprefixroute`), so an unmarked packet has nowhere to go.
//! * `table bridge guard` admits a frame from a port only with that port's MAC and IPv4
//!   address (ARP: sender hardware and protocol address too): one set element per port.
//! * The public network (when configured) is one more bridge in the switch namespace,
//!   `bpub`, linked to the host, which holds its first address (the host stands for the
//!   internet). A public IP bound to a port is routed there 1:1, without NAT: the main
//!   table (which only unmarked packets, i.e. the public bridge's, reach) sends it to the
//!   port's fixed address, the pod carries it as a second address, and `proxy_arp` on the
//!   public bridge answers ARP for it. Every network's table routes the public subnet to
//!   the public bridge for the replies. Forwarding is on, and the forward chain passes
//!   exactly the public IPs, each only to and from its own port's bridge
//!   (`set floating`); the port's guard admits the public address from its port only.
//! * In the host, each server's management link ends in a `/32` route to the server, and
//!   `table inet canopy_<i>` lets servers reach the control plane's ports and nothing
//!   else, and never each other.

use std::{collections::HashSet, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result, bail};

use super::{cmd::Cmd, names, state::NetworkRecord};
use crate::{Port, Subnet};

/// The preference of every network's `fwmark` rule in the switch namespace: before the
/// main table, which holds no subnet route anyway.
const RULE_PREF: u32 = 1000;

/// First mark (and routing table) handed to a network; below are the kernel's tables.
pub const FIRST_MARK: u32 = 1000;

/// The kernel objects of one provider instance.
pub struct Kernel {
    pub instance: String,
    pub switch: String,
    pub control_plane: Ipv4Addr,
    pub control_plane_ports: Vec<u16>,
    /// The public network, if any.
    pub public: Option<Subnet>,
}

/// The host's address on the public network (its first) and the switch's (its second, the
/// source of the switch's ARP requests there); public IPs come from the rest.
pub fn public_reserved(public: Subnet) -> [Ipv4Addr; 2] {
    [
        public.nth(1).unwrap_or(public.address),
        public.nth(2).unwrap_or(public.address),
    ]
}

/// A public IP bound to a port, as the switch needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub address: Ipv4Addr,
    pub port: Port,
}

/// A server NIC's configuration inside the server.
pub struct NicConfig {
    pub ip: Ipv4Addr,
    pub subnet: Subnet,
    pub gateway: Ipv4Addr,
}

pub fn netns_exists(netns: &str) -> bool {
    Path::new("/run/netns").join(netns).exists()
}

/// Every network namespace's name.
pub fn netns_list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

pub async fn ensure_netns(netns: &str) -> Result<()> {
    if !netns_exists(netns) {
        Cmd::ip(None).args(["netns", "add", netns]).run().await?;
    }
    Ok(())
}

pub async fn delete_netns(netns: &str) -> Result<()> {
    if netns_exists(netns) {
        Cmd::ip(None)
            .args(["netns", "del", netns])
            .run_absent_ok()
            .await?;
    }
    Ok(())
}

/// The names of the links in a namespace (`None`: the host's).
pub async fn links(netns: Option<&str>) -> Result<HashSet<String>> {
    let out = Cmd::ip(netns).args(["-j", "link", "show"]).run().await?;
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&out).context("parsing `ip -j link show`")?;
    Ok(list
        .iter()
        .filter_map(|l| l.get("ifname")?.as_str().map(str::to_string))
        .collect())
}

pub async fn link_exists(netns: Option<&str>, link: &str) -> Result<bool> {
    Cmd::ip(netns)
        .args(["link", "show", "dev", link])
        .probe()
        .await
}

pub async fn delete_link(netns: Option<&str>, link: &str) -> Result<()> {
    Cmd::ip(netns)
        .args(["link", "del", "dev", link])
        .run_absent_ok()
        .await
}

/// The processes whose network namespace is `netns`.
pub async fn netns_pids(netns: &str) -> Result<Vec<i32>> {
    if !netns_exists(netns) {
        return Ok(Vec::new());
    }
    let out = Cmd::ip(None).args(["netns", "pids", netns]).run().await?;
    Ok(out.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Sets sysctls inside a namespace; keys the kernel lacks (no IPv6, no br_netfilter) are
/// left out, the others must succeed.
async fn sysctls(netns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let present: Vec<String> = settings
        .iter()
        .filter(|(key, _)| Path::new("/proc/sys").join(key.replace('.', "/")).exists())
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    Cmd::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-q", "-w"])
        .args(present)
        .run()
        .await
        .map(drop)
}

fn nft_set_elements(elements: &[String]) -> String {
    if elements.is_empty() {
        String::new()
    } else {
        format!("\t\telements = {{ {} }}\n", elements.join(", "))
    }
}

fn network_elements(rec: &NetworkRecord) -> (String, String) {
    let bridge = names::bridge(&rec.network.name);
    (
        format!("\"{bridge}\" : {}", rec.mark),
        format!("\"{bridge}\" . {}", rec.network.gateway),
    )
}

fn port_element(port: &Port) -> String {
    port_element_with(port, port.ip)
}

/// A port's guard element for one of its addresses (its own, or a public IP bound to it).
fn port_element_with(port: &Port, ip: Ipv4Addr) -> String {
    format!(
        "\"{}\" . {} . {}",
        names::port_switch_link(&port.name),
        port.mac,
        ip
    )
}

/// A port's guard elements for the ranges it may also send from.
fn allowed_elements(port: &Port) -> Vec<String> {
    port.allowed_address_pairs
        .iter()
        .map(|cidr| {
            format!(
                "\"{}\" . {} . {cidr}",
                names::port_switch_link(&port.name),
                port.mac
            )
        })
        .collect()
}

fn floating_element(binding: &Binding) -> String {
    format!(
        "{} . \"{}\"",
        binding.address,
        names::bridge(&binding.port.network)
    )
}

impl Kernel {
    // ----- host -----

    /// The control-plane address on `lo` and the host's table; both idempotent.
    pub async fn ensure_host(&self) -> Result<()> {
        Cmd::ip(None)
            .args(["addr", "replace"])
            .arg(format!("{}/32", self.control_plane))
            .args(["dev", "lo"])
            .run()
            .await?;
        Cmd::nft(None, self.host_script()).run().await?;
        Ok(())
    }

    fn host_script(&self) -> String {
        let table = names::host_table(&self.instance);
        let links = format!("\"m{}*\"", self.instance);
        let allow = if self.control_plane_ports.is_empty() {
            String::new()
        } else {
            let ports: Vec<String> = self
                .control_plane_ports
                .iter()
                .map(u16::to_string)
                .collect();
            format!(
                "\t\tiifname {links} ip daddr {} tcp dport {{ {} }} accept\n",
                self.control_plane,
                ports.join(", ")
            )
        };
        // Deleting and redefining the table in one transaction replaces it atomically:
        // the rules are exactly the current configuration's, with no moment without them.
        format!(
            "add table inet {table}\n\
             delete table inet {table}\n\
             table inet {table} {{\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname {links} ct state established,related accept\n\
             {allow}\
             \t\tiifname {links} drop\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname {links} drop\n\
             \t\toifname {links} drop\n\
             \t}}\n\
             }}\n"
        )
    }

    /// The instance tags of the other providers on this host whose management links our
    /// `m<i>*` rules would also match (or theirs ours): one tag a prefix of the other.
    pub async fn clashing_instances(&self) -> Result<Vec<String>> {
        let out = Cmd::new("nft").args(["list", "tables"]).run().await?;
        Ok(out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("table inet canopy_"))
            .filter(|other| {
                *other != self.instance
                    && (other.starts_with(&self.instance) || self.instance.starts_with(other))
            })
            .map(str::to_string)
            .collect())
    }

    /// Fails if the host already uses addresses of the management network: routes inside
    /// it through links that are not this instance's, or its addresses on interfaces. Two
    /// clouds sharing management addresses would take each other's routes and, on
    /// destruction, each other's control-plane address. The control-plane address on `lo`
    /// is allowed: it is ours from before, or put there by our user so that the API server
    /// could bind it before the provider opened.
    pub async fn check_management_free(&self, management: Subnet) -> Result<()> {
        for (subnet, dev) in routes(None).await? {
            let inside = subnet.prefix >= management.prefix && management.contains(subnet.address);
            if inside && !names::is_mgmt_host_link(&self.instance, &dev) {
                bail!(
                    "the management network {management} is in use on this host: route {subnet} dev {dev}"
                );
            }
        }
        for (ifname, local) in addresses(None).await? {
            let control_plane = ifname == "lo" && local == self.control_plane;
            if management.contains(local) && !control_plane {
                bail!(
                    "the management network {management} is in use on this host: address {local} on {ifname}"
                );
            }
        }
        Ok(())
    }

    pub async fn teardown_host(&self) -> Result<()> {
        let table = names::host_table(&self.instance);
        Cmd::nft(
            None,
            format!("add table inet {table}\ndelete table inet {table}\n"),
        )
        .run()
        .await?;
        let out = Cmd::ip(None)
            .args(["-j", "addr", "show", "dev", "lo"])
            .run()
            .await?;
        if out.contains(&format!("\"{}\"", self.control_plane)) {
            Cmd::ip(None)
                .args(["addr", "del"])
                .arg(format!("{}/32", self.control_plane))
                .args(["dev", "lo"])
                .run()
                .await?;
        }
        for link in links(None).await? {
            if names::is_mgmt_host_link(&self.instance, &link)
                || link == names::public_host_link(&self.instance)
            {
                delete_link(None, &link).await?;
            }
        }
        Ok(())
    }

    /// Fails if the host uses addresses of the public network other than through this
    /// instance's public link.
    pub async fn check_public_free(&self) -> Result<()> {
        let Some(public) = self.public else {
            return Ok(());
        };
        let ours = names::public_host_link(&self.instance);
        for (ifname, local) in addresses(None).await? {
            if ifname != ours && public.contains(local) {
                bail!(
                    "the public network {public} is in use on this host: address {local} on {ifname}"
                );
            }
        }
        Ok(())
    }

    // ----- switch -----

    /// Brings the switch namespace to what the state says: its settings, its nftables
    /// tables (rebuilt whole in one transaction), every network's bridge; links no network
    /// or attached port accounts for are removed.
    pub async fn ensure_switch(
        &self,
        networks: &[NetworkRecord],
        ports: &[Port],
        attached: &HashSet<String>,
        bindings: &[Binding],
    ) -> Result<()> {
        ensure_netns(&self.switch).await?;
        // Without a public network nothing is ever routed; with one, the forward chain
        // passes public IPs' traffic only.
        let forward = if self.public.is_some() { "1" } else { "0" };
        sysctls(
            &self.switch,
            &[
                ("net.ipv4.ip_forward", forward),
                ("net.ipv4.conf.all.send_redirects", "0"),
                ("net.ipv4.conf.default.send_redirects", "0"),
                // Clients of the public network have no route back in the main table;
                // the guard checks sources, not the reverse path.
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                // Replies carry the mark of the packet they answer: see the module doc.
                ("net.ipv4.fwmark_reflect", "1"),
                // A gateway answers ARP only on its own bridge: another network's
                // gateway address must not be discoverable (or pingable) from this one.
                ("net.ipv4.conf.all.arp_ignore", "1"),
                // Tenant networks are IPv4: no link-local addresses or IPv6 chatter.
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv6.conf.default.disable_ipv6", "1"),
                // With br_netfilter loaded, bridged frames would also traverse the inet
                // forward chain, whose drop policy would cut every network in two.
                ("net.bridge.bridge-nf-call-iptables", "0"),
                ("net.bridge.bridge-nf-call-ip6tables", "0"),
                ("net.bridge.bridge-nf-call-arptables", "0"),
            ],
        )
        .await?;
        Cmd::ip(Some(&self.switch))
            .args(["link", "set", "lo", "up"])
            .run()
            .await?;
        Cmd::nft(Some(&self.switch), switch_script(networks, ports, bindings))
            .run()
            .await?;
        let present = links(Some(&self.switch)).await?;
        let mut expected: HashSet<String> = HashSet::from(["lo".to_string()]);
        if self.public.is_some() {
            expected.insert(names::PUBLIC_BRIDGE.to_string());
            expected.insert(names::PUBLIC_SWITCH_LINK.to_string());
            // Clients someone plugged into the public network stay.
            expected.extend(self.bridge_ports(names::PUBLIC_BRIDGE).await?);
        }
        for rec in networks {
            expected.insert(names::bridge(&rec.network.name));
        }
        for port in attached {
            expected.insert(names::port_switch_link(port));
        }
        for link in present.difference(&expected) {
            tracing::info!(link, "removing a link no network or port accounts for");
            delete_link(Some(&self.switch), link).await?;
        }
        if self.public.is_some() {
            self.ensure_public(&present).await?;
        }
        let rules = self.rules().await?;
        for rec in networks {
            self.ensure_bridge(rec, &present, &rules).await?;
        }
        if let Some(public) = self.public {
            // Routes of public IPs: exactly the bound ones.
            let bound: HashSet<Ipv4Addr> = bindings.iter().map(|b| b.address).collect();
            for (subnet, _) in routes(Some(&self.switch)).await? {
                if subnet.prefix == 32
                    && public.contains(subnet.address)
                    && !bound.contains(&subnet.address)
                {
                    Cmd::ip(Some(&self.switch))
                        .args(["route", "del"])
                        .arg(format!("{}/32", subnet.address))
                        .run_absent_ok()
                        .await?;
                }
            }
            for binding in bindings {
                self.route_public(binding).await?;
            }
        }
        Ok(())
    }

    /// The links enslaved to a bridge of the switch.
    async fn bridge_ports(&self, bridge: &str) -> Result<Vec<String>> {
        if !link_exists(Some(&self.switch), bridge).await? {
            return Ok(Vec::new());
        }
        let out = Cmd::ip(Some(&self.switch))
            .args(["-j", "link", "show", "master", bridge])
            .run()
            .await?;
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&out).context("parsing `ip -j link show`")?;
        Ok(list
            .iter()
            .filter_map(|l| l.get("ifname")?.as_str().map(str::to_string))
            .collect())
    }

    /// The public bridge, with proxy ARP for the public IPs routed behind it, and the
    /// host's link to it carrying the public network's first address.
    async fn ensure_public(&self, present: &HashSet<String>) -> Result<()> {
        let Some(public) = self.public else {
            return Ok(());
        };
        let sw = Some(self.switch.as_str());
        let [host_ip, switch_ip] = public_reserved(public);
        if !present.contains(names::PUBLIC_BRIDGE) {
            Cmd::ip(sw)
                .args(["link", "add", names::PUBLIC_BRIDGE, "type", "bridge"])
                .run()
                .await?;
        }
        // The bridge exists only in the switch namespace: `sysctls` would look for its key
        // in the host's /proc and leave it out.
        Cmd::new("ip")
            .args(["netns", "exec", &self.switch, "sysctl", "-q", "-w"])
            .arg(format!(
                "net.ipv4.conf.{}.proxy_arp=1",
                names::PUBLIC_BRIDGE
            ))
            .run()
            .await?;
        Cmd::ip(sw)
            .args(["addr", "replace"])
            .arg(format!("{switch_ip}/{}", public.prefix))
            .args(["dev", names::PUBLIC_BRIDGE, "noprefixroute"])
            .run()
            .await?;
        Cmd::ip(sw)
            .args(["link", "set", names::PUBLIC_BRIDGE, "up"])
            .run()
            .await?;
        let host_link = names::public_host_link(&self.instance);
        let host_has = link_exists(None, &host_link).await?;
        let switch_has = present.contains(names::PUBLIC_SWITCH_LINK);
        if !(host_has && switch_has) {
            delete_link(None, &host_link).await?;
            delete_link(sw, names::PUBLIC_SWITCH_LINK).await?;
            Cmd::ip(None)
                .args(["link", "add", &host_link, "type", "veth", "peer", "name"])
                .arg(names::PUBLIC_SWITCH_LINK)
                .args(["netns", &self.switch])
                .run()
                .await?;
        }
        Cmd::ip(sw)
            .args(["link", "set", names::PUBLIC_SWITCH_LINK, "master"])
            .arg(names::PUBLIC_BRIDGE)
            .arg("up")
            .run()
            .await?;
        Cmd::ip(None)
            .args(["addr", "replace"])
            .arg(format!("{host_ip}/{}", public.prefix))
            .args(["dev", &host_link])
            .run()
            .await?;
        Cmd::ip(None)
            .args(["link", "set", &host_link, "up"])
            .run()
            .await?;
        Ok(())
    }

    /// The main-table route of a public IP to its port's fixed address.
    async fn route_public(&self, binding: &Binding) -> Result<()> {
        Cmd::ip(Some(&self.switch))
            .args(["route", "replace"])
            .arg(format!("{}/32", binding.address))
            .arg("via")
            .arg(binding.port.ip.to_string())
            .arg("dev")
            .arg(names::bridge(&binding.port.network))
            // The main table has no route to the subnet: the port is on the bridge.
            .arg("onlink")
            .run()
            .await
            .map(drop)
    }

    /// Lets a public IP through to its port and out of it.
    pub async fn bind_public(&self, binding: &Binding) -> Result<()> {
        Cmd::nft(
            Some(&self.switch),
            format!(
                "add element bridge guard ports {{ {} }}\n\
                 add element inet guard floating {{ {} }}\n",
                port_element_with(&binding.port, binding.address),
                floating_element(binding)
            ),
        )
        .run()
        .await?;
        self.route_public(binding).await
    }

    pub async fn unbind_public(&self, binding: &Binding) -> Result<()> {
        if !netns_exists(&self.switch) {
            return Ok(());
        }
        Cmd::ip(Some(&self.switch))
            .args(["route", "del"])
            .arg(format!("{}/32", binding.address))
            .run_absent_ok()
            .await?;
        let guard = port_element_with(&binding.port, binding.address);
        let floating = floating_element(binding);
        Cmd::nft(
            Some(&self.switch),
            format!(
                "add element bridge guard ports {{ {guard} }}\n\
                 add element inet guard floating {{ {floating} }}\n\
                 delete element bridge guard ports {{ {guard} }}\n\
                 delete element inet guard floating {{ {floating} }}\n"
            ),
        )
        .run()
        .await
        .map(drop)
    }

    /// Whether the network with this mark has its rule in the switch namespace.
    async fn has_rule(&self, mark: u32) -> Result<bool> {
        let out = Cmd::ip(Some(&self.switch))
            .args(["-j", "rule", "show", "fwmark"])
            .arg(mark.to_string())
            .run()
            .await?;
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&out).context("parsing `ip -j rule show`")?;
        Ok(!list.is_empty())
    }

    /// The marks that have a rule in the switch namespace.
    async fn rules(&self) -> Result<HashSet<u32>> {
        let out = Cmd::ip(Some(&self.switch))
            .args(["-j", "rule", "show"])
            .run()
            .await?;
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&out).context("parsing `ip -j rule show`")?;
        Ok(list
            .iter()
            .filter_map(|r| {
                let mark = r.get("fwmark")?.as_str()?;
                u32::from_str_radix(mark.trim_start_matches("0x"), 16).ok()
            })
            .collect())
    }

    async fn ensure_bridge(
        &self,
        rec: &NetworkRecord,
        links: &HashSet<String>,
        rules: &HashSet<u32>,
    ) -> Result<()> {
        let sw = Some(self.switch.as_str());
        let bridge = names::bridge(&rec.network.name);
        let mark = rec.mark.to_string();
        if !links.contains(&bridge) {
            Cmd::ip(sw)
                .args(["link", "add", &bridge, "address"])
                .arg(names::bridge_mac(&rec.network.name))
                .args(["type", "bridge"])
                .run()
                .await?;
        }
        Cmd::ip(sw)
            .args(["addr", "replace"])
            .arg(format!(
                "{}/{}",
                rec.network.gateway, rec.network.subnet.prefix
            ))
            .args(["dev", &bridge, "noprefixroute"])
            .run()
            .await?;
        Cmd::ip(sw)
            .args(["link", "set", &bridge, "up"])
            .run()
            .await?;
        if !rules.contains(&rec.mark) {
            Cmd::ip(sw)
                .args(["rule", "add", "pref"])
                .arg(RULE_PREF.to_string())
                .args(["fwmark", &mark, "lookup", &mark])
                .run()
                .await?;
        }
        Cmd::ip(sw)
            .args(["route", "replace"])
            .arg(rec.network.subnet.to_string())
            .args(["dev", &bridge, "table", &mark])
            .run()
            .await?;
        if let Some(public) = self.public {
            // Replies from public IPs to the public network's clients.
            Cmd::ip(sw)
                .args(["route", "replace"])
                .arg(public.to_string())
                .args(["dev", names::PUBLIC_BRIDGE, "table", &mark])
                .run()
                .await?;
        }
        Ok(())
    }

    /// Creates a network's bridge, routing and guard entries.
    pub async fn add_network(&self, rec: &NetworkRecord) -> Result<()> {
        let (mark, gateway) = network_elements(rec);
        Cmd::nft(
            Some(&self.switch),
            format!(
                "add element inet guard networks {{ {mark} }}\n\
                 add element inet guard gateways {{ {gateway} }}\n"
            ),
        )
        .run()
        .await?;
        let bridge = names::bridge(&rec.network.name);
        let links: HashSet<String> = link_exists(Some(&self.switch), &bridge)
            .await?
            .then_some(bridge)
            .into_iter()
            .collect();
        let rules: HashSet<u32> = self
            .has_rule(rec.mark)
            .await?
            .then_some(rec.mark)
            .into_iter()
            .collect();
        self.ensure_bridge(rec, &links, &rules).await
    }

    /// Removes a network's bridge (its ports' switch ends must be gone), rule and guard
    /// entries; whatever is already gone is skipped.
    pub async fn remove_network(&self, rec: &NetworkRecord) -> Result<()> {
        if !netns_exists(&self.switch) {
            return Ok(());
        }
        let sw = Some(self.switch.as_str());
        delete_link(sw, &names::bridge(&rec.network.name)).await?;
        if self.has_rule(rec.mark).await? {
            let mark = rec.mark.to_string();
            Cmd::ip(sw)
                .args(["rule", "del", "pref"])
                .arg(RULE_PREF.to_string())
                .args(["fwmark", &mark, "lookup", &mark])
                .run()
                .await?;
        }
        let (mark, gateway) = network_elements(rec);
        // `add` first makes the `delete` of an absent element a no-op.
        Cmd::nft(
            sw,
            format!(
                "add element inet guard networks {{ {mark} }}\n\
                 add element inet guard gateways {{ {gateway} }}\n\
                 delete element inet guard networks {{ {mark} }}\n\
                 delete element inet guard gateways {{ {gateway} }}\n"
            ),
        )
        .run()
        .await?;
        Ok(())
    }

    /// Lets frames with the port's MAC and address in from its switch end.
    pub async fn guard_port(&self, port: &Port) -> Result<()> {
        let element = port_element(port);
        let mut script = format!("add element bridge guard ports {{ {element} }}\n");
        for allowed in allowed_elements(port) {
            script.push_str(&format!(
                "add element bridge guard allowed {{ {allowed} }}\n"
            ));
        }
        Cmd::nft(Some(&self.switch), script).run().await.map(drop)
    }

    pub async fn unguard_port(&self, port: &Port) -> Result<()> {
        if !netns_exists(&self.switch) {
            // No switch, no guard: nothing to remove (tearing down a damaged cloud).
            return Ok(());
        }
        let element = port_element(port);
        let mut script = format!(
            "add element bridge guard ports {{ {element} }}\n\
             delete element bridge guard ports {{ {element} }}\n"
        );
        for allowed in allowed_elements(port) {
            script.push_str(&format!(
                "add element bridge guard allowed {{ {allowed} }}\n\
                 delete element bridge guard allowed {{ {allowed} }}\n"
            ));
        }
        Cmd::nft(Some(&self.switch), script).run().await.map(drop)
    }

    /// Whether the port's switch end exists, i.e. its veth pair does (wherever the other
    /// end has been moved to).
    pub async fn port_plugged(&self, port: &str) -> Result<bool> {
        link_exists(Some(&self.switch), &names::port_switch_link(port)).await
    }

    /// Creates the port's veth pair: the switch end in the network's bridge and up, the
    /// other end named `device`, with the port's MAC, down and without address, directly
    /// in `netns` (so no name of it ever exists in the switch namespace to clash).
    pub async fn plug(&self, port: &Port, netns: &str, device: &str) -> Result<()> {
        let sw = Some(self.switch.as_str());
        let link = names::port_switch_link(&port.name);
        // A pair left over from an attachment that is no more (its server's namespace
        // going away takes a moment to destroy it) would block the new one.
        delete_link(sw, &link).await?;
        Cmd::ip(sw)
            .args(["link", "add", &link, "master"])
            .arg(names::bridge(&port.network))
            .args(["up", "type", "veth", "peer", "name", device, "address"])
            .arg(&port.mac)
            .args(["netns", netns])
            .run()
            .await
            .map(drop)
    }

    pub async fn unplug(&self, port: &str) -> Result<()> {
        if !netns_exists(&self.switch) {
            return Ok(());
        }
        delete_link(Some(&self.switch), &names::port_switch_link(port)).await
    }

    // ----- servers -----

    /// The management link between the host and a server, its host route, and the
    /// server's side of it (and its NIC's configuration, when it has one): one `ip -batch`
    /// inside the server. Idempotent.
    pub async fn ensure_server_links(
        &self,
        server: &str,
        management_ip: Ipv4Addr,
        nic: Option<&NicConfig>,
    ) -> Result<()> {
        let netns = names::server_netns(&self.instance, server);
        let host_link = names::mgmt_host_link(&self.instance, server);
        let host_mac = names::mgmt_host_mac(&self.instance, server);
        let host_has = link_exists(None, &host_link).await?;
        let server_has = link_exists(Some(&netns), names::MGMT_DEVICE).await?;
        if !(host_has && server_has) {
            // Half a pair is a server whose namespace was replaced: start over.
            delete_link(None, &host_link).await?;
            delete_link(Some(&netns), names::MGMT_DEVICE).await?;
            Cmd::ip(None)
                .args(["link", "add", &host_link, "address", &host_mac])
                .args(["type", "veth", "peer", "name", names::MGMT_DEVICE])
                .args(["netns", &netns])
                .run()
                .await?;
        }
        // The host end needs no IPv6 link-local address (and the servers no path to it).
        let ipv6 = Path::new("/proc/sys/net/ipv6/conf")
            .join(&host_link)
            .join("disable_ipv6");
        if ipv6.exists() {
            std::fs::write(&ipv6, "1").with_context(|| format!("writing {}", ipv6.display()))?;
        }
        Cmd::ip(None)
            .args(["link", "set", &host_link, "up"])
            .run()
            .await?;
        // The host speaks to servers from the control plane's address: the only one they
        // have a route back to.
        Cmd::ip(None)
            .args(["route", "replace"])
            .arg(format!("{management_ip}/32"))
            .args(["dev", &host_link, "src"])
            .arg(self.control_plane.to_string())
            .run()
            .await?;
        let cp = self.control_plane;
        let mgmt = names::MGMT_DEVICE;
        // A permanent neighbour entry: hosts with arp_ignore set (kube-proxy's IPVS mode
        // does) would not answer ARP for an address on `lo` from the management link.
        let mut batch = format!(
            "link set lo up\n\
             addr replace {management_ip}/32 dev {mgmt}\n\
             link set {mgmt} up\n\
             route replace {cp}/32 dev {mgmt} src {management_ip}\n\
             neigh replace {cp} lladdr {host_mac} dev {mgmt} nud permanent\n"
        );
        if let Some(nic) = nic {
            let dev = names::NIC_DEVICE;
            batch.push_str(&format!(
                "addr replace {}/{} dev {dev}\n\
                 link set {dev} up\n\
                 route replace default via {} dev {dev}\n",
                nic.ip, nic.subnet.prefix, nic.gateway
            ));
        }
        Cmd::ip(Some(&netns))
            .args(["-batch", "-"])
            .stdin(batch)
            .run()
            .await
            .with_context(|| format!("configuring the network of server {server}"))?;
        Ok(())
    }

    /// Deletes a server's namespace (its links go with it) and the host end of its
    /// management link, which the kernel would otherwise remove only once the namespace
    /// is freed.
    pub async fn remove_server_links(&self, server: &str) -> Result<()> {
        delete_netns(&names::server_netns(&self.instance, server)).await?;
        delete_link(None, &names::mgmt_host_link(&self.instance, server)).await
    }

    /// Fails unless the namespace can be entered: `ip netns add` leaves a file that a
    /// crash can leave unmounted.
    pub async fn check_netns(&self, netns: &str) -> Result<()> {
        if !netns_exists(netns) {
            bail!("network namespace {netns} does not exist");
        }
        links(Some(netns)).await.map(drop)
    }
}

/// The IPv4 routes of a namespace's main table (`None`: the host's), as destination and
/// device; routes without a device (blackholes) are left out.
async fn routes(netns: Option<&str>) -> Result<Vec<(Subnet, String)>> {
    let out = Cmd::ip(netns)
        .args(["-4", "-j", "route", "show", "table", "main"])
        .run()
        .await?;
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&out).context("parsing `ip -j route show`")?;
    Ok(list
        .iter()
        .filter_map(|route| {
            let dst = parse_route_dst(route.get("dst")?.as_str()?)?;
            Some((dst, route.get("dev")?.as_str()?.to_string()))
        })
        .collect())
}

/// Every IPv4 address of a namespace (`None`: the host's), with its interface.
async fn addresses(netns: Option<&str>) -> Result<Vec<(String, Ipv4Addr)>> {
    let out = Cmd::ip(netns)
        .args(["-4", "-j", "addr", "show"])
        .run()
        .await?;
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&out).context("parsing `ip -j addr show`")?;
    let mut found = Vec::new();
    for link in &list {
        let ifname = link.get("ifname").and_then(|n| n.as_str()).unwrap_or("");
        let infos = link.get("addr_info").and_then(|a| a.as_array());
        for info in infos.into_iter().flatten() {
            if let Some(local) = info
                .get("local")
                .and_then(|l| l.as_str())
                .and_then(|l| l.parse().ok())
            {
                found.push((ifname.to_string(), local));
            }
        }
    }
    Ok(found)
}

/// A route's destination as `ip -j` prints it (`10.0.0.0/24`, `10.0.0.5`, `default`).
fn parse_route_dst(dst: &str) -> Option<Subnet> {
    if dst.contains('/') {
        Subnet::parse(dst).ok()
    } else {
        Some(Subnet {
            address: dst.parse().ok()?,
            prefix: 32,
        })
    }
}

/// The switch namespace's nftables tables, whole. Deleting and defining them in one
/// transaction swaps them atomically: no frame ever passes unguarded.
fn switch_script(networks: &[NetworkRecord], ports: &[Port], bindings: &[Binding]) -> String {
    let (marks, gateways): (Vec<String>, Vec<String>) =
        networks.iter().map(network_elements).unzip();
    let allowed: Vec<String> = ports.iter().flat_map(allowed_elements).collect();
    let mut ports: Vec<String> = ports.iter().map(port_element).collect();
    ports.extend(
        bindings
            .iter()
            .map(|b| port_element_with(&b.port, b.address)),
    );
    let floating: Vec<String> = bindings.iter().map(floating_element).collect();
    format!(
        "add table inet guard\n\
         delete table inet guard\n\
         add table bridge guard\n\
         delete table bridge guard\n\
         table inet guard {{\n\
         \tmap networks {{\n\
         \t\ttype ifname : mark\n\
         {marks}\
         \t}}\n\
         \tset gateways {{\n\
         \t\ttype ifname . ipv4_addr\n\
         {gateways}\
         \t}}\n\
         \tset floating {{\n\
         \t\ttype ipv4_addr . ifname\n\
         {floating}\
         \t}}\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority mangle; policy accept;\n\
         \t\tmeta mark set iifname map @networks\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy drop;\n\
         \t\tiifname . ip daddr @gateways icmp type echo-request accept\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy drop;\n\
         \t\tiifname \"{public}\" ip daddr . oifname @floating accept\n\
         \t\toifname \"{public}\" ip saddr . iifname @floating accept\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority filter; policy drop;\n\
         \t\tmeta mark != 0 icmp type {{ echo-reply, destination-unreachable }} accept\n\
         \t}}\n\
         }}\n\
         table bridge guard {{\n\
         \tset ports {{\n\
         \t\ttype ifname . ether_addr . ipv4_addr\n\
         {ports}\
         \t}}\n\
         \tset allowed {{\n\
         \t\ttype ifname . ether_addr . ipv4_addr\n\
         \t\tflags interval\n\
         {allowed}\
         \t}}\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority filter; policy drop;\n\
         \t\tiifname \"{public_ports}\" accept\n\
         \t\tether type ip iifname . ether saddr . ip saddr @ports accept\n\
         \t\tether type ip iifname . ether saddr . ip saddr @allowed accept\n\
         \t\tether type arp iifname . ether saddr . arp saddr ip @ports iifname . arp saddr ether . arp saddr ip @ports accept\n\
         \t}}\n\
         }}\n",
        marks = nft_set_elements(&marks),
        gateways = nft_set_elements(&gateways),
        ports = nft_set_elements(&ports),
        allowed = nft_set_elements(&allowed),
        floating = nft_set_elements(&floating),
        public = names::PUBLIC_BRIDGE,
        public_ports = names::PUBLIC_PORT_PATTERN,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Network;

    #[test]
    fn switch_script_lists_every_network_and_port() {
        let rec = NetworkRecord {
            network: Network {
                name: "n".into(),
                tenant: "t".into(),
                subnet: Subnet::parse("10.0.0.0/24").unwrap(),
                gateway: "10.0.0.1".parse().unwrap(),
            },
            mark: 1001,
        };
        let port = Port {
            name: "p".into(),
            network: "n".into(),
            ip: "10.0.0.2".parse().unwrap(),
            mac: names::port_mac("p"),
            server: None,
            device: names::port_device("p"),
            tags: Default::default(),
            allowed_address_pairs: Vec::new(),
        };
        let binding = Binding {
            address: "198.18.0.7".parse().unwrap(),
            port: port.clone(),
        };
        let script = switch_script(&[rec], std::slice::from_ref(&port), &[binding]);
        let bridge = names::bridge("n");
        assert!(
            script.contains(&format!("198.18.0.7 . \"{bridge}\"")),
            "the public IP passes to its port's bridge only: {script}"
        );
        assert!(
            script.contains(&format!(
                "\"{}\" . {} . 198.18.0.7",
                names::port_switch_link("p"),
                port.mac
            )),
            "its port may send from it: {script}"
        );
        assert!(script.contains(&format!("\"{bridge}\" : 1001")), "{script}");
        assert!(
            script.contains(&format!("\"{bridge}\" . 10.0.0.1")),
            "{script}"
        );
        assert!(
            script.contains(&format!(
                "\"{}\" . {} . 10.0.0.2",
                names::port_switch_link("p"),
                port.mac
            )),
            "{script}"
        );
        let empty = switch_script(&[], &[], &[]);
        assert!(!empty.contains("elements"), "{empty}");
    }

    #[test]
    fn route_destinations() {
        assert_eq!(
            parse_route_dst("100.64.0.5"),
            Some(Subnet {
                address: "100.64.0.5".parse().unwrap(),
                prefix: 32
            })
        );
        assert_eq!(
            parse_route_dst("10.0.0.0/8"),
            Some(Subnet::parse("10.0.0.0/8").unwrap())
        );
        assert_eq!(parse_route_dst("default"), None);
    }
}
