//! The nftables form of [`Rules`]: one table whose chains never change and whose maps carry
//! every service, so that a change is a handful of map elements in one atomic transaction
//! (`nft -f`), and a resync replaces the whole table in one transaction too.
//!
//! Balancing: every balanced frontend owns one interval element per backend in a map keyed
//! by `address . protocol . port . numgen random mod 65536`, the 65536 slots split evenly
//! over its backends; one lookup picks a backend at random. Client-IP affinity needs state,
//! so each sticky frontend gets chains and sets of its own (rare, as upstream's are).
//! Traffic that was DNATed is masqueraded: pods' replies go straight onto the tenant's L2
//! network otherwise, past the node that translated the request.

use std::{
    collections::hash_map::DefaultHasher,
    fmt::Write as _,
    hash::{Hash, Hasher},
};

use crate::rules::{Backend, Frontend, Rules, Target};

/// The table's name (family `ip`).
pub const TABLE: &str = "canopy_proxy";
const SLOTS: u32 = 65536;
const L4: &str = "meta l4proto { tcp, udp, sctp }";

/// The chains and maps, without elements.
fn skeleton() -> String {
    format!(
        r#"table ip {TABLE} {{
  map cluster_ips {{
    typeof ip daddr . meta l4proto . th dport . numgen random mod {SLOTS} : ip daddr . th dport
    flags interval
  }}
  map node_ports {{
    typeof meta l4proto . th dport . numgen random mod {SLOTS} : ip daddr . th dport
    flags interval
  }}
  map cluster_sticky {{
    typeof ip daddr . meta l4proto . th dport : verdict
  }}
  map node_port_sticky {{
    typeof meta l4proto . th dport : verdict
  }}
  map cluster_refused {{
    typeof ip daddr . meta l4proto . th dport : verdict
  }}
  map node_port_refused {{
    typeof meta l4proto . th dport : verdict
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @cluster_sticky
    {L4} dnat ip to ip daddr . meta l4proto . th dport . numgen random mod {SLOTS} map @cluster_ips
    fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @node_port_sticky
    fib daddr type local ip daddr != 127.0.0.0/8 {L4} dnat ip to meta l4proto . th dport . numgen random mod {SLOTS} map @node_ports
  }}
  chain nat_prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    {L4} jump services
  }}
  chain nat_output {{
    type nat hook output priority -100; policy accept;
    {L4} jump services
  }}
  chain nat_postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ct status dnat masquerade
  }}
  chain refuse {{
    reject
  }}
  chain filter_forward {{
    type filter hook forward priority filter; policy accept;
    ct state new {L4} ip daddr . meta l4proto . th dport vmap @cluster_refused
  }}
  chain filter_input {{
    type filter hook input priority filter; policy accept;
    ct state new {L4} meta l4proto . th dport vmap @node_port_refused
  }}
  chain filter_output {{
    type filter hook output priority filter; policy accept;
    ct state new {L4} ip daddr . meta l4proto . th dport vmap @cluster_refused
    ct state new {L4} fib daddr type local meta l4proto . th dport vmap @node_port_refused
  }}
}}
"#
    )
}

fn key(frontend: &Frontend) -> String {
    match frontend {
        Frontend::Cluster(ip, proto, port) => format!("{ip} . {} . {port}", proto.nft()),
        Frontend::NodePort(proto, port) => format!("{} . {port}", proto.nft()),
    }
}

fn is_cluster(frontend: &Frontend) -> bool {
    matches!(frontend, Frontend::Cluster(..))
}

fn map_of(frontend: &Frontend, cluster: &'static str, node_port: &'static str) -> &'static str {
    if is_cluster(frontend) {
        cluster
    } else {
        node_port
    }
}

/// The slot interval of backend `i` of `n`.
fn slots(i: usize, n: usize) -> (u32, u32) {
    let (i, n) = (i as u64, n as u64);
    let low = i * u64::from(SLOTS) / n;
    let high = (i + 1) * u64::from(SLOTS) / n - 1;
    (low as u32, high as u32)
}

fn balance_elements(frontend: &Frontend, backends: &[Backend], with_values: bool) -> Vec<String> {
    let n = backends.len();
    backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let (low, high) = slots(i, n);
            let k = format!("{} . {low}-{high}", key(frontend));
            if with_values {
                format!("{k} : {} . {}", b.ip, b.port)
            } else {
                k
            }
        })
        .collect()
}

/// The name of a sticky frontend's chain (`of` a frontend), or of one backend's chain and
/// set (`of` a frontend and backend). Names only live as long as the table, which a restart
/// replaces, so the process's hasher is stable enough.
fn sticky_name(of: impl Hash) -> String {
    let mut h = DefaultHasher::new();
    of.hash(&mut h);
    format!("sticky_{:016x}", h.finish())
}

/// Statements that add a frontend's target (its elements, or its chains and sets).
fn add(out: &mut String, frontend: &Frontend, target: &Target) {
    let k = key(frontend);
    match target {
        Target::Balance(backends) => {
            let map = map_of(frontend, "cluster_ips", "node_ports");
            let elements = balance_elements(frontend, backends, true).join(", ");
            let _ = writeln!(out, "add element ip {TABLE} {map} {{ {elements} }}");
        }
        Target::Reject | Target::Drop => {
            let map = map_of(frontend, "cluster_refused", "node_port_refused");
            let verdict = if *target == Target::Reject {
                "goto refuse"
            } else {
                "drop"
            };
            let _ = writeln!(out, "add element ip {TABLE} {map} {{ {k} : {verdict} }}");
        }
        Target::Sticky(backends, timeout) => {
            let chain = sticky_name(frontend);
            let _ = writeln!(out, "add chain ip {TABLE} {chain}");
            let mut picks = Vec::new();
            for (i, b) in backends.iter().enumerate() {
                let set = sticky_name((frontend, b));
                let _ = writeln!(
                    out,
                    "add set ip {TABLE} {set} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}"
                );
                let _ = writeln!(out, "add chain ip {TABLE} {set}");
                let _ = writeln!(
                    out,
                    "add rule ip {TABLE} {set} update @{set} {{ ip saddr }} {L4} dnat ip to {}:{}",
                    b.ip, b.port
                );
                let _ = writeln!(
                    out,
                    "add rule ip {TABLE} {chain} ip saddr @{set} goto {set}"
                );
                picks.push(format!("{i} : goto {set}"));
            }
            let _ = writeln!(
                out,
                "add rule ip {TABLE} {chain} numgen random mod {} vmap {{ {} }}",
                backends.len(),
                picks.join(", ")
            );
            let map = map_of(frontend, "cluster_sticky", "node_port_sticky");
            let _ = writeln!(out, "add element ip {TABLE} {map} {{ {k} : goto {chain} }}");
        }
    }
}

/// Statements that remove what [`add`] added for this frontend and target.
fn remove(out: &mut String, frontend: &Frontend, target: &Target) {
    let k = key(frontend);
    match target {
        Target::Balance(backends) => {
            let map = map_of(frontend, "cluster_ips", "node_ports");
            let elements = balance_elements(frontend, backends, false).join(", ");
            let _ = writeln!(out, "delete element ip {TABLE} {map} {{ {elements} }}");
        }
        Target::Reject | Target::Drop => {
            let map = map_of(frontend, "cluster_refused", "node_port_refused");
            let _ = writeln!(out, "delete element ip {TABLE} {map} {{ {k} }}");
        }
        Target::Sticky(backends, _) => {
            let map = map_of(frontend, "cluster_sticky", "node_port_sticky");
            let chain = sticky_name(frontend);
            let _ = writeln!(out, "delete element ip {TABLE} {map} {{ {k} }}");
            let _ = writeln!(out, "flush chain ip {TABLE} {chain}");
            let _ = writeln!(out, "delete chain ip {TABLE} {chain}");
            for b in backends {
                let set = sticky_name((frontend, b));
                let _ = writeln!(out, "flush chain ip {TABLE} {set}");
                let _ = writeln!(out, "delete chain ip {TABLE} {set}");
                let _ = writeln!(out, "delete set ip {TABLE} {set}");
            }
        }
    }
}

/// One transaction that replaces whatever table is there with exactly `rules`.
pub fn full(rules: &Rules) -> String {
    // `add` then `delete` succeeds whether or not the table exists.
    let mut out = format!("add table ip {TABLE}\ndelete table ip {TABLE}\n");
    out.push_str(&skeleton());
    for (frontend, target) in rules {
        add(&mut out, frontend, target);
    }
    out
}

/// One transaction that turns the table holding `old` into one holding `new`; None when
/// nothing changed.
pub fn diff(old: &Rules, new: &Rules) -> Option<String> {
    let mut out = String::new();
    for (frontend, target) in old {
        if new.get(frontend) != Some(target) {
            remove(&mut out, frontend, target);
        }
    }
    for (frontend, target) in new {
        if old.get(frontend) != Some(target) {
            add(&mut out, frontend, target);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Counts of what a table holds, for logs and the benchmark.
pub fn element_count(rules: &Rules) -> usize {
    rules
        .values()
        .map(|t| match t {
            Target::Balance(b) | Target::Sticky(b, _) => b.len(),
            Target::Reject | Target::Drop => 1,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Protocol;

    #[test]
    fn slots_split_evenly_and_cover_everything() {
        for n in 1..50 {
            let mut next = 0;
            for i in 0..n {
                let (low, high) = slots(i, n);
                assert_eq!(low, next);
                assert!(high >= low);
                next = high + 1;
            }
            assert_eq!(next, SLOTS);
        }
    }

    #[test]
    fn diff_touches_only_what_changed() {
        let vip = Frontend::Cluster("10.96.0.10".parse().unwrap(), Protocol::Tcp, 80);
        let other = Frontend::Cluster("10.96.0.11".parse().unwrap(), Protocol::Udp, 53);
        let b = |ip: &str| Backend {
            ip: ip.parse().unwrap(),
            port: 8080,
        };
        let old: Rules = [
            (vip, Target::Balance(vec![b("10.0.0.5"), b("10.0.0.6")])),
            (other, Target::Reject),
        ]
        .into();
        let mut new = old.clone();
        new.insert(vip, Target::Balance(vec![b("10.0.0.5")]));
        let script = diff(&old, &new).unwrap();
        assert_eq!(
            script,
            "delete element ip canopy_proxy cluster_ips { 10.96.0.10 . tcp . 80 . 0-32767, 10.96.0.10 . tcp . 80 . 32768-65535 }\n\
             add element ip canopy_proxy cluster_ips { 10.96.0.10 . tcp . 80 . 0-65535 : 10.0.0.5 . 8080 }\n"
        );
        assert_eq!(diff(&new, &new), None);
        let full = full(&new);
        assert!(full.starts_with("add table ip canopy_proxy\ndelete table ip canopy_proxy\n"));
        assert!(full.contains(
            "add element ip canopy_proxy cluster_refused { 10.96.0.11 . udp . 53 : goto refuse }"
        ));
    }
}
