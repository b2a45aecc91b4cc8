//! The proxy's nftables rules against real traffic (root): a "node" network namespace
//! forwards between a client and two backends, each in a namespace of its own, and a
//! client's connections show which backend answered. Covers balancing, client-IP affinity,
//! reject and drop, node ports, hairpin, the node's own connections, incremental changes,
//! a refused transaction leaving the live rules whole, and removal.

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
};

use canopy_proxy::{Backend, Frontend, Protocol, Rules, Target, apply, nft};

const SERVER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(128)
while True:
    c, a = s.accept(); c.send((sys.argv[1] + " " + a[0]).encode()); c.close()
"#;

const CLIENT: &str = r#"
import socket, sys, collections
seen = collections.Counter()
for _ in range(int(sys.argv[3])):
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
        seen[c.recv(100).decode().split()[0]] += 1; c.close()
    except ConnectionRefusedError: seen["refused"] += 1
    except OSError: seen["timeout"] += 1
print(" ".join(f"{k}={v}" for k, v in seen.items()))
"#;

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Topology {
    tag: String,
    servers: Vec<Child>,
}

impl Topology {
    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    /// node: 10.0.1.1 (client side, default route there as a VM's), 10.0.2.1, 10.0.3.1;
    /// client 10.0.1.2; backends b1 10.0.2.2 and b2 10.0.3.2 answer on 8080.
    fn build() -> Self {
        let tag = format!("pxt{}", std::process::id());
        let mut topology = Self {
            tag,
            servers: Vec::new(),
        };
        for n in ["node", "cli", "b1", "b2"] {
            let ns = topology.ns(n);
            run(&["ip", "netns", "add", &ns]);
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        let node = topology.ns("node");
        for (i, n) in ["cli", "b1", "b2"].iter().enumerate() {
            let ns = topology.ns(n);
            let host_end = format!("v{}{i}", std::process::id() % 100000);
            run(&[
                "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            run(&["ip", "link", "set", &host_end, "netns", &node]);
            let net = i + 1;
            run(&[
                "ip",
                "-n",
                &node,
                "addr",
                "add",
                &format!("10.0.{net}.1/24"),
                "dev",
                &host_end,
            ]);
            run(&["ip", "-n", &node, "link", "set", &host_end, "up"]);
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.0.{net}.2/24"),
                "dev",
                "eth0",
            ]);
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            run(&[
                "ip",
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.0.{net}.1"),
            ]);
        }
        run(&[
            "ip",
            "-n",
            &node,
            "route",
            "add",
            "default",
            "via",
            "10.0.1.254",
        ]);
        // What the proxy does in its own namespace at start.
        run(&[
            "ip",
            "netns",
            "exec",
            &node,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward; for f in /proc/sys/net/ipv4/conf/*/send_redirects; do echo 0 > $f; done",
        ]);
        for b in ["b1", "b2"] {
            let child = Command::new("ip")
                .args(["netns", "exec", &topology.ns(b), "python3", "-c", SERVER, b])
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            topology.servers.push(child);
        }
        topology
    }

    fn nft(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.ns("node"), "nft"]
            .map(String::from)
            .to_vec()
    }

    /// Who answered `n` connections from namespace `from` to `ip:port`.
    fn probe(
        &self,
        from: &str,
        ip: &str,
        port: u16,
        n: usize,
        timeout: f64,
    ) -> HashMap<String, usize> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(from), "python3", "-c", CLIENT, ip])
            .arg(port.to_string())
            .arg(n.to_string())
            .arg(timeout.to_string())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    fn wait_for_servers(&self) {
        for _ in 0..100 {
            let seen = self.probe("node", "10.0.2.2", 8080, 1, 0.5);
            let seen2 = self.probe("node", "10.0.3.2", 8080, 1, 0.5);
            if seen.contains_key("b1") && seen2.contains_key("b2") {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the backends did not start");
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        for n in ["node", "cli", "b1", "b2"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .status();
        }
    }
}

fn backend(ip: &str) -> Backend {
    Backend {
        ip: ip.parse().unwrap(),
        port: 8080,
    }
}

fn vip(last: u8) -> Frontend {
    Frontend::Cluster(std::net::Ipv4Addr::new(10, 96, 0, last), Protocol::Tcp, 80)
}

#[tokio::test]
async fn rules_carry_real_traffic() {
    if !nix_is_root() {
        panic!(
            "this test needs root (network namespaces and nftables); run the suite as root as .ci/run does"
        );
    }
    let topo = Topology::build();
    topo.wait_for_servers();
    let both = vec![backend("10.0.2.2"), backend("10.0.3.2")];
    let rules: Rules = [
        (vip(10), Target::Balance(both.clone())),
        (vip(11), Target::Sticky(both.clone(), 60)),
        (vip(12), Target::Reject),
        (vip(13), Target::Drop),
        (
            Frontend::NodePort(Protocol::Tcp, 30080),
            Target::Balance(both.clone()),
        ),
    ]
    .into();
    let nft_cmd = topo.nft();
    apply(&nft_cmd, &nft::full(&rules)).await.unwrap();

    let seen = topo.probe("cli", "10.96.0.10", 80, 40, 1.0);
    assert!(seen["b1"] >= 5 && seen["b2"] >= 5, "balanced: {seen:?}");
    let seen = topo.probe("cli", "10.96.0.11", 80, 20, 1.0);
    assert_eq!(seen.len(), 1, "a client keeps its backend: {seen:?}");
    let seen = topo.probe("cli", "10.96.0.12", 80, 3, 2.0);
    assert_eq!(
        seen.get("refused"),
        Some(&3),
        "no endpoints: refused: {seen:?}"
    );
    let seen = topo.probe("cli", "10.96.0.13", 80, 1, 0.5);
    assert_eq!(
        seen.get("timeout"),
        Some(&1),
        "no usable endpoint: dropped: {seen:?}"
    );
    let seen = topo.probe("cli", "10.0.1.1", 30080, 20, 1.0);
    assert!(
        seen.contains_key("b1") && seen.contains_key("b2"),
        "node port: {seen:?}"
    );
    let seen = topo.probe("b1", "10.96.0.10", 80, 20, 1.0);
    assert!(
        seen.contains_key("b1"),
        "hairpin: a backend reaches itself: {seen:?}"
    );
    let seen = topo.probe("node", "10.96.0.10", 80, 20, 1.0);
    assert!(
        seen.contains_key("b1") && seen.contains_key("b2"),
        "from the node: {seen:?}"
    );

    // One backend goes: the change is a diff, and traffic follows it at once.
    let mut next = rules.clone();
    next.insert(vip(10), Target::Balance(vec![backend("10.0.3.2")]));
    next.insert(vip(11), Target::Sticky(vec![backend("10.0.3.2")], 60));
    next.insert(vip(12), Target::Balance(vec![backend("10.0.2.2")]));
    next.remove(&vip(13));
    let script = nft::diff(&rules, &next).unwrap();
    assert!(
        !script.contains("table"),
        "a diff touches elements, not the table:\n{script}"
    );
    apply(&nft_cmd, &script).await.unwrap();
    assert_eq!(
        topo.probe("cli", "10.96.0.10", 80, 20, 1.0),
        [("b2".to_string(), 20)].into()
    );
    assert_eq!(
        topo.probe("cli", "10.96.0.11", 80, 10, 1.0),
        [("b2".to_string(), 10)].into()
    );
    assert_eq!(
        topo.probe("cli", "10.96.0.12", 80, 5, 1.0),
        [("b1".to_string(), 5)].into()
    );

    // A transaction nft refuses changes nothing: never a half-applied rule set.
    let mut broken = nft::diff(&next, &rules).unwrap();
    broken.push_str("add element ip canopy_proxy no_such_map { 1.2.3.4 }\n");
    assert!(apply(&nft_cmd, &broken).await.is_err());
    assert_eq!(
        topo.probe("cli", "10.96.0.10", 80, 10, 1.0),
        [("b2".to_string(), 10)].into()
    );

    // A full resync replaces everything in one go, whatever was there.
    apply(&nft_cmd, &nft::full(&rules)).await.unwrap();
    let seen = topo.probe("cli", "10.96.0.10", 80, 40, 1.0);
    assert!(seen["b1"] >= 5 && seen["b2"] >= 5, "after resync: {seen:?}");

    canopy_proxy::remove_table(&nft_cmd).await.unwrap();
    let seen = topo.probe("cli", "10.96.0.10", 80, 1, 0.5);
    assert!(
        !seen.contains_key("b1") && !seen.contains_key("b2"),
        "{seen:?}"
    );
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
