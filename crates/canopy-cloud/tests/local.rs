//! The local provider against the real kernel: namespaces, bridges, veths, nftables,
//! cgroups, processes. Run as root (as CI does); each test is its own cloud (a random
//! instance tag and management /24), so they run in parallel, and each destroys its cloud
//! even when it fails.

use std::{
    collections::{BTreeMap, HashSet},
    hash::{BuildHasher, Hasher},
    net::Ipv4Addr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use canopy_cloud::{
    Bootstrap, CloudError, CloudProvider, Flavor, NetworkSpec, NicSpec, Port, PortSpec,
    PublicIpSpec, Server, ServerSpec, ServerStatus, SpareSpec, Subnet,
    local::{LocalConfig, LocalProvider, names},
};
use tokio::{io::AsyncWriteExt, net::TcpListener, process::Command};

// ----- harness -----

fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// A cloud of its own, destroyed on drop (also when the test panics).
struct Cloud {
    provider: Option<LocalProvider>,
    config: LocalConfig,
    /// Namespaces the test made itself (the "pods").
    extra_netns: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Cloud {
    async fn new() -> Cloud {
        Cloud::with(|_| {}).await
    }

    async fn with(adjust: impl FnOnce(&mut LocalConfig)) -> Cloud {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the local provider's tests run as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, "#!/bin/sh\nexec sleep 3600\n").unwrap();
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut bits = random();
        let instance: String = (0..4)
            .map(|_| {
                let c = alphabet[(bits % alphabet.len() as u64) as usize] as char;
                bits /= alphabet.len() as u64;
                c
            })
            .collect();
        let management = free_management_block().await;
        let mut config = LocalConfig {
            state_dir: dir.path().join("state"),
            instance,
            agent_binary: agent,
            management,
            control_plane_ports: vec![],
            image_seed: None,
            public: None,
        };
        adjust(&mut config);
        let provider = LocalProvider::open(config.clone())
            .await
            .expect("opening the local provider");
        Cloud {
            provider: Some(provider),
            config,
            extra_netns: Vec::new(),
            _dir: dir,
        }
    }

    fn p(&self) -> &LocalProvider {
        self.provider.as_ref().expect("provider open")
    }

    fn i(&self) -> &str {
        &self.config.instance
    }

    fn netns(&self, server: &str) -> String {
        names::server_netns(self.i(), server)
    }

    fn switch(&self) -> String {
        names::switch_netns(self.i())
    }

    /// Drops the provider (the controller stops) and opens it again.
    async fn reopen(&mut self) -> Duration {
        drop(self.provider.take());
        let started = Instant::now();
        self.provider = Some(
            LocalProvider::open(self.config.clone())
                .await
                .expect("reopening the local provider"),
        );
        started.elapsed()
    }

    /// A namespace of the test's own, like one the agent's CNI makes for a pod.
    async fn pod_netns(&mut self, name: &str) -> String {
        let netns = format!("tpod-{}-{name}", self.i());
        run(&["ip", "netns", "add", &netns]).await;
        self.extra_netns.push(netns.clone());
        netns
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        for netns in &self.extra_netns {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", netns])
                .status();
        }
        let provider = self.provider.take();
        let config = self.config.clone();
        let result = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                let provider = match provider {
                    Some(p) => p,
                    None => LocalProvider::open(config).await?,
                };
                provider.destroy_all().await
            })
        });
        if let Err(e) = result {
            eprintln!("destroying the test cloud: {e:#}");
            if !std::thread::panicking() {
                panic!("destroying the test cloud: {e:#}");
            }
        }
    }
}

/// A random /24 of 100.64.0.0/10 that no address or route of the host is in: other clouds
/// (end-to-end tests of `canopy server`) may run on the host, and the provider refuses a
/// management network that overlaps one in use. From the upper half, 100.96.0.0/11, to
/// stay clear of the /16s those take from the bottom (the default 100.64.0.0/16 and
/// neighbours), whose clouds would otherwise find our test routes inside theirs.
async fn free_management_block() -> Subnet {
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    let mut used = HashSet::new();
    let routes = run(&["ip", "-4", "-j", "route", "show", "table", "main"]).await;
    let addresses = run(&["ip", "-4", "-j", "addr", "show"]).await;
    let mut found: Vec<(Ipv4Addr, u8)> = Vec::new();
    for route in serde_json::from_str::<Vec<serde_json::Value>>(&routes).unwrap() {
        let dst = route["dst"].as_str().unwrap_or("default");
        if let Ok(subnet) = Subnet::parse(dst) {
            found.push((subnet.address, subnet.prefix));
        } else if let Ok(addr) = dst.parse() {
            found.push((addr, 32));
        }
    }
    for link in serde_json::from_str::<Vec<serde_json::Value>>(&addresses).unwrap() {
        for info in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(addr) = info["local"].as_str().and_then(|a| a.parse().ok()) {
                found.push((addr, 32));
            }
        }
    }
    for (addr, prefix) in found {
        let start = u32::from(addr);
        let size = 1u64 << (32 - u32::from(prefix));
        if start >= base && u64::from(start) < u64::from(base) + (1 << 22) && prefix >= 10 {
            let first = (start - base) >> 8;
            let blocks = (size >> 8).max(1) as u32;
            used.extend(first..first + blocks);
        }
    }
    loop {
        let block = (1 << 13) + (random() % (1 << 13)) as u32;
        if !used.contains(&block) {
            return Subnet {
                address: Ipv4Addr::from(base + (block << 8)),
                prefix: 24,
            };
        }
    }
}

/// A random /24 of 198.18.128.0/17 that no address of the host is in, for a public network.
async fn free_public_block() -> Subnet {
    let addresses = run(&["ip", "-4", "-o", "addr", "show"]).await;
    loop {
        let third = 128 + (random() % 128) as u8;
        if !addresses.contains(&format!(" 198.18.{third}.")) {
            return Subnet::parse(&format!("198.18.{third}.0/24")).unwrap();
        }
    }
}

/// Runs a command; its success and combined output. A command that hangs is a test
/// failure, not a hung test run.
async fn try_run(argv: &[&str]) -> (bool, String) {
    let output = Command::new(argv[0])
        .args(&argv[1..])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .unwrap_or_else(|_| panic!("{argv:?} still runs after a minute"))
        .unwrap_or_else(|e| panic!("running {argv:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn run(argv: &[&str]) -> String {
    let (ok, out) = try_run(argv).await;
    assert!(ok, "{argv:?} failed: {out}");
    out
}

/// `argv` inside a namespace (`None`: the host).
fn inside<'a>(netns: Option<&'a str>, argv: &[&'a str]) -> Vec<&'a str> {
    let mut full = Vec::new();
    if let Some(ns) = netns {
        full.extend(["ip", "netns", "exec", ns]);
    }
    full.extend(argv);
    full
}

async fn ping_once(netns: Option<&str>, ip: Ipv4Addr) -> bool {
    let ip = ip.to_string();
    try_run(&inside(netns, &["busybox", "ping", "-c1", "-W1", &ip]))
        .await
        .0
}

/// Reachable: a few tries, since a fresh link may take a moment to forward.
async fn assert_reaches(netns: Option<&str>, ip: Ipv4Addr) {
    for _ in 0..5 {
        if ping_once(netns, ip).await {
            return;
        }
    }
    panic!("{} cannot ping {ip}", netns.unwrap_or("the host"));
}

/// Unreachable: callers first show the same source reaches something, so that a failure
/// here is isolation, not a link that is not up yet.
async fn assert_cannot_reach(netns: Option<&str>, ip: Ipv4Addr) {
    for _ in 0..2 {
        assert!(
            !ping_once(netns, ip).await,
            "{} can ping {ip}, which it must not",
            netns.unwrap_or("the host")
        );
    }
}

fn netns_exists(netns: &str) -> bool {
    Path::new("/run/netns").join(netns).exists()
}

async fn link_in(netns: Option<&str>, link: &str) -> Option<serde_json::Value> {
    let mut argv = vec!["ip"];
    if let Some(ns) = netns {
        argv.extend(["-n", ns]);
    }
    argv.extend(["-j", "link", "show", "dev", link]);
    let (ok, out) = try_run(&argv).await;
    if !ok {
        return None;
    }
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    list.into_iter().next()
}

fn flavor(vcpus: u32, memory_mib: u64) -> Flavor {
    Flavor {
        name: format!("c{vcpus}m{memory_mib}"),
        vcpus,
        memory_mib,
    }
}

fn server_spec(name: &str, tenant: &str, network: &str, ip: Option<Ipv4Addr>) -> ServerSpec {
    ServerSpec {
        name: name.into(),
        tenant: tenant.into(),
        flavor: flavor(1, 256),
        nic: NicSpec {
            network: network.into(),
            ip,
            allowed_address_pairs: Vec::new(),
        },
        bootstrap: Bootstrap {
            node_name: format!("node-{name}"),
            kubeconfig: "apiVersion: v1\nkind: Config\n# not a real key\n".into(),
            agent_args: vec!["--max-pods".into(), "30".into()],
        },
        tags: BTreeMap::from([("canopy.io/pool".to_string(), "default".to_string())]),
    }
}

fn network_spec(name: &str, tenant: &str, subnet: &str) -> NetworkSpec {
    NetworkSpec {
        name: name.into(),
        tenant: tenant.into(),
        subnet: Subnet::parse(subnet).unwrap(),
        gateway: None,
    }
}

fn ip(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

async fn create_server_timed(cloud: &Cloud, spec: &ServerSpec) -> Server {
    let started = Instant::now();
    let server = cloud.p().create_server(spec).await.unwrap();
    eprintln!(
        "create_server {} took {} ms",
        spec.name,
        started.elapsed().as_millis()
    );
    server
}

fn agent_pid(cloud: &Cloud, server: &str) -> i32 {
    let file = cloud
        .config
        .state_dir
        .join("servers")
        .join(server)
        .join("agent.pid");
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .parse()
        .unwrap()
}

fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !matches!(
            s.rsplit(')').next().unwrap().trim().chars().next(),
            Some('Z')
        )
    })
}

fn pure_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// Every directory of a cgroup, one per hierarchy.
fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    if pure_v2() {
        return vec![Path::new("/sys/fs/cgroup").join(rel)];
    }
    std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.path().join(rel))
        .collect()
}

fn read_trimmed(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// The server is a "VM": namespace, cgroup with its flavor's limits, and the agent running
/// inside both with the expected command line.
async fn assert_server_running(cloud: &Cloud, server: &Server) {
    let name = &server.name;
    let netns = cloud.netns(name);
    assert!(netns_exists(&netns), "namespace {netns}");
    assert_eq!(server.status, ServerStatus::Active);
    let cgroup = names::server_cgroup(cloud.i(), name);
    let memory = server.flavor.memory_mib << 20;
    let quota = u64::from(server.flavor.vcpus) * 100_000;
    if pure_v2() {
        let dir = Path::new("/sys/fs/cgroup").join(&cgroup);
        assert_eq!(read_trimmed(dir.join("memory.max")), memory.to_string());
        assert_eq!(read_trimmed(dir.join("cpu.max")), format!("{quota} 100000"));
    } else {
        let dir = Path::new("/sys/fs/cgroup/memory").join(&cgroup);
        assert_eq!(
            read_trimmed(dir.join("memory.limit_in_bytes")),
            memory.to_string()
        );
        let cpu = Path::new("/sys/fs/cgroup/cpu").join(&cgroup);
        assert_eq!(
            read_trimmed(cpu.join("cpu.cfs_quota_us")),
            quota.to_string()
        );
        assert_eq!(read_trimmed(cpu.join("cpu.cfs_period_us")), "100000");
        let pids: u64 = read_trimmed(
            Path::new("/sys/fs/cgroup/pids")
                .join(&cgroup)
                .join("pids.max"),
        )
        .parse()
        .unwrap();
        assert!(pids >= 1024, "pids.max {pids}");
    }
    let pods = Path::new(if pure_v2() {
        "/sys/fs/cgroup"
    } else {
        "/sys/fs/cgroup/memory"
    })
    .join(names::pods_cgroup(cloud.i(), name));
    assert!(pods.is_dir(), "{}", pods.display());
    let pid = agent_pid(cloud, name);
    assert!(process_alive(pid), "agent {pid} of {name}");
    // The launcher execs `ip netns exec`, which execs the agent, which execs sleep: the
    // same process all along, once the execs are done.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let cmdline = read_trimmed(format!("/proc/{pid}/cmdline"));
        if cmdline.starts_with("sleep") {
            break;
        }
        assert!(Instant::now() < deadline, "agent {pid} runs {cmdline:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
    let ours = std::fs::metadata(Path::new("/run/netns").join(&netns)).unwrap();
    assert_eq!(
        (theirs.dev(), theirs.ino()),
        (ours.dev(), ours.ino()),
        "agent in the server's namespace"
    );
    let cgroups = read_trimmed(format!("/proc/{pid}/cgroup"));
    let expected = if pure_v2() {
        format!("0::/{cgroup}/agent")
    } else {
        format!(":memory:/{cgroup}")
    };
    assert!(
        cgroups.lines().any(|l| l.ends_with(&expected)),
        "agent in cgroup {cgroup}: {cgroups}"
    );
}

// ----- tests -----

/// Two servers of a tenant on one network: they are VMs (namespace, cgroup, agent), the
/// host and the servers reach each other over management, the servers reach the control
/// plane's ports (only those), each other and their gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_boot_and_reach_each_other_and_the_control_plane() {
    // Servers may reach the control plane on `allowed`, and not on `denied`.
    let allowed = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let denied = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let allowed_port = allowed.local_addr().unwrap().port();
    let denied_port = denied.local_addr().unwrap().port();
    let cloud = Cloud::with(|c| c.control_plane_ports = vec![allowed_port]).await;
    let p = cloud.p();
    let network = p
        .ensure_network(&network_spec("a-net", "tenant-a", "10.10.0.0/24"))
        .await
        .unwrap();
    assert_eq!(network.gateway, ip("10.10.0.1"));
    let s1 = create_server_timed(&cloud, &server_spec("s1", "tenant-a", "a-net", None)).await;
    let mut spec2 = server_spec("s2", "tenant-a", "a-net", Some(ip("10.10.0.50")));
    spec2.flavor = flavor(2, 512);
    let s2 = create_server_timed(&cloud, &spec2).await;
    assert_eq!(s1.ip, Some(ip("10.10.0.2")), "the first free address");
    assert_eq!(s2.ip, Some(ip("10.10.0.50")), "the requested address");
    assert_eq!(s1.tags, spec2.tags);
    let cp = cloud.config.control_plane_ip();
    let m1 = s1.management_ip.unwrap();
    let m2 = s2.management_ip.unwrap();
    assert!(cloud.config.management.contains(m1) && m1 != cp && m1 != m2);
    for server in [&s1, &s2] {
        assert_server_running(&cloud, server).await;
    }
    // The agent's command line and files.
    let pid = agent_pid(&cloud, "s2");
    let dir = cloud.config.state_dir.join("servers/s2");
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap();
    assert!(log.contains("starting the agent of server s2"), "{log}");
    let kubeconfig = std::fs::metadata(dir.join("kubeconfig")).unwrap();
    assert_eq!(kubeconfig.permissions().mode() & 0o777, 0o600);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains("CANOPY_CGROUP_PROCS"),
        "the launcher's variable does not reach the agent"
    );

    let ns1 = cloud.netns("s1");
    let ns2 = cloud.netns("s2");
    // Management: host to servers, servers to the control plane's port only.
    assert_reaches(None, m1).await;
    assert_reaches(None, m2).await;
    // Both listeners answer and hang up, so that a connection that gets through shows.
    let serve = |listener: TcpListener| {
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let _ = conn.write_all(b"pong\n").await;
            }
        })
    };
    let accept = serve(allowed);
    let reject = serve(denied);
    let (ok, out) = try_run(&inside(
        Some(&ns1),
        &[
            "busybox",
            "nc",
            "-w",
            "3",
            &cp.to_string(),
            &allowed_port.to_string(),
        ],
    ))
    .await;
    assert!(ok && out.contains("pong"), "server to control plane: {out}");
    let (ok, out) = try_run(&inside(
        Some(&ns1),
        &[
            "busybox",
            "nc",
            "-w",
            "2",
            &cp.to_string(),
            &denied_port.to_string(),
        ],
    ))
    .await;
    assert!(!ok && !out.contains("pong"), "another port: {out}");
    accept.abort();
    reject.abort();
    assert_cannot_reach(Some(&ns1), cp).await;
    // Not each other through the host, even with a route the tenant adds itself (via the
    // host's end, which the server has a neighbour entry for).
    let cp_text = cp.to_string();
    run(&[
        "ip",
        "-n",
        &ns1,
        "route",
        "add",
        &format!("{m2}/32"),
        "via",
        &cp_text,
        "dev",
        "mgmt0",
    ])
    .await;
    assert_cannot_reach(Some(&ns1), m2).await;
    let table = run(&[
        "nft",
        "list",
        "table",
        "inet",
        &names::host_table(cloud.i()),
    ])
    .await;
    assert!(
        table.contains(&format!("oifname \"m{}*\" drop", cloud.i())),
        "{table}"
    );

    // The tenant network.
    assert_reaches(Some(&ns1), network.gateway).await;
    assert_reaches(Some(&ns2), network.gateway).await;
    assert_reaches(Some(&ns1), s2.ip.unwrap()).await;
    assert_reaches(Some(&ns2), s1.ip.unwrap()).await;
    // eth0 carries the NIC port's MAC and address.
    let eth0 = link_in(Some(&ns1), "eth0").await.expect("eth0 in s1");
    assert_eq!(eth0["address"], names::port_mac("s1-nic"));
    let nic = p
        .list_ports()
        .await
        .unwrap()
        .into_iter()
        .find(|port| port.name == "s1-nic")
        .expect("the NIC is a port");
    assert_eq!(nic.server.as_deref(), Some("s1"));
    assert_eq!(nic.device, "eth0");
    assert_eq!(Some(nic.ip), s1.ip);
}

/// Tenants choose the same subnet and addresses; their networks still never meet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_with_the_same_subnet_are_isolated() {
    let cloud = Cloud::new().await;
    let p = cloud.p();
    p.ensure_network(&network_spec("a-net", "tenant-a", "10.20.0.0/24"))
        .await
        .unwrap();
    p.ensure_network(&network_spec("b-net", "tenant-b", "10.20.0.0/24"))
        .await
        .unwrap();
    p.ensure_network(&network_spec("b-other", "tenant-b", "10.30.0.0/24"))
        .await
        .unwrap();
    let same = ip("10.20.0.10");
    let a1 = create_server_timed(&cloud, &server_spec("a1", "tenant-a", "a-net", Some(same))).await;
    let a2 = create_server_timed(&cloud, &server_spec("a2", "tenant-a", "a-net", None)).await;
    let b1 = create_server_timed(&cloud, &server_spec("b1", "tenant-b", "b-net", Some(same))).await;
    let b3 = create_server_timed(
        &cloud,
        &server_spec("b3", "tenant-b", "b-net", Some(ip("10.20.0.50"))),
    )
    .await;
    let b4 = create_server_timed(&cloud, &server_spec("b4", "tenant-b", "b-other", None)).await;
    assert_eq!(a1.ip, b1.ip);
    let (na1, na2, nb1, nb3) = (
        cloud.netns("a1"),
        cloud.netns("a2"),
        cloud.netns("b1"),
        cloud.netns("b3"),
    );
    // Both gateways are 10.20.0.1, on two bridges of one namespace: each answers its own.
    for ns in [&na1, &na2, &nb1, &nb3] {
        assert_reaches(Some(ns), ip("10.20.0.1")).await;
    }
    // The same address is a1 for tenant A and b1 for tenant B.
    assert_reaches(Some(&na2), same).await;
    assert_reaches(Some(&nb3), same).await;
    let neighbour =
        |ns: String| async move { run(&["ip", "-n", &ns, "neigh", "show", "10.20.0.10"]).await };
    let seen_by_a = neighbour(na2.clone()).await;
    let seen_by_b = neighbour(nb3.clone()).await;
    assert!(
        seen_by_a.contains(&names::port_mac("a1-nic")),
        "{seen_by_a}"
    );
    assert!(
        seen_by_b.contains(&names::port_mac("b1-nic")),
        "{seen_by_b}"
    );
    // What exists only in B is not there for A, and the other way round.
    assert_cannot_reach(Some(&na1), b3.ip.unwrap()).await;
    assert_cannot_reach(Some(&nb1), a2.ip.unwrap()).await;
    // Not through another network's gateway either, even with a route the tenant adds.
    run(&[
        "ip",
        "-n",
        &na1,
        "route",
        "add",
        "10.30.0.0/24",
        "dev",
        "eth0",
    ])
    .await;
    assert_cannot_reach(Some(&na1), ip("10.30.0.1")).await;
    assert_cannot_reach(Some(&na1), b4.ip.unwrap()).await;
    // No route leaks: the switch routes no subnet in its main table and never forwards,
    // the host has no route into tenant networks.
    let sw = cloud.switch();
    let main = run(&["ip", "-n", &sw, "route", "show", "table", "main"]).await;
    assert!(
        !main.contains("10.20.0.0") && !main.contains("10.30.0.0"),
        "{main}"
    );
    let forward = run(&[
        "ip",
        "netns",
        "exec",
        &sw,
        "sysctl",
        "-n",
        "net.ipv4.ip_forward",
    ])
    .await;
    assert_eq!(forward.trim(), "0");
    let host = run(&["ip", "route", "get", "10.20.0.10"]).await;
    assert!(!host.contains(&names::bridge("a-net")), "{host}");
    // Crossing tenants through the API is refused.
    let b_port = p
        .create_port(&PortSpec {
            name: "b-port".into(),
            network: "b-net".into(),
            ip: None,
            mac: None,
            tags: BTreeMap::new(),
        })
        .await
        .unwrap();
    assert!(matches!(
        p.attach_port(&b_port.name, "a1").await,
        Err(CloudError::Conflict(_))
    ));
    assert!(matches!(
        p.create_server(&server_spec("a9", "tenant-a", "b-net", None))
            .await,
        Err(CloudError::Conflict(_))
    ));
    assert!(matches!(
        p.ensure_network(&network_spec("a-net", "tenant-b", "10.20.0.0/24"))
            .await,
        Err(CloudError::Conflict(_))
    ));
}

/// Ports: allocation, attachment (idempotent, exclusive), a device the "CNI" moved into a
/// pod reaches the network, spoofing does not, and deletion takes it all away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_attach_move_into_pods_and_are_guarded() {
    let mut cloud = Cloud::new().await;
    let p = cloud.p();
    let network = p
        .ensure_network(&network_spec("net", "t", "10.40.0.0/24"))
        .await
        .unwrap();
    let s1 = create_server_timed(&cloud, &server_spec("s1", "t", "net", None)).await;
    let s2 = create_server_timed(&cloud, &server_spec("s2", "t", "net", None)).await;
    let port_spec = |name: &str, ip: Option<Ipv4Addr>| PortSpec {
        name: name.into(),
        network: "net".into(),
        ip,
        mac: None,
        tags: BTreeMap::from([("pod".to_string(), name.to_string())]),
    };
    let a = p.create_port(&port_spec("pod-a", None)).await.unwrap();
    let taken: HashSet<Ipv4Addr> = [network.gateway, s1.ip.unwrap(), s2.ip.unwrap()].into();
    assert!(network.subnet.contains(a.ip) && !taken.contains(&a.ip));
    assert_ne!(a.ip, network.subnet.address);
    assert_eq!(a.mac, names::port_mac("pod-a"));
    assert_eq!(a.device, names::port_device("pod-a"));
    assert_eq!(a.server, None);
    // Idempotent by name; conflicting or impossible requests are refused.
    assert_eq!(p.create_port(&port_spec("pod-a", None)).await.unwrap(), a);
    assert_eq!(
        p.create_port(&port_spec("pod-a", Some(a.ip)))
            .await
            .unwrap(),
        a
    );
    assert!(matches!(
        p.create_port(&port_spec("pod-a", Some(ip("10.40.0.99"))))
            .await,
        Err(CloudError::Conflict(_))
    ));
    assert!(matches!(
        p.create_port(&port_spec("pod-x", Some(a.ip))).await,
        Err(CloudError::Conflict(_))
    ));
    for bad in ["10.40.0.1", "10.40.0.0", "10.40.0.255", "10.41.0.5"] {
        assert!(
            matches!(
                p.create_port(&port_spec("pod-x", Some(ip(bad)))).await,
                Err(CloudError::Invalid(_))
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        p.attach_port("pod-a", "nope").await,
        Err(CloudError::NotFound { .. })
    ));
    // A requested MAC is the port's; unique in its network; checked.
    let with_mac = |name: &str, mac: &str| PortSpec {
        mac: Some(mac.into()),
        ..port_spec(name, None)
    };
    let m = p
        .create_port(&with_mac("pod-m", "02:12:34:56:78:9A"))
        .await
        .unwrap();
    assert_eq!(m.mac, "02:12:34:56:78:9a");
    assert!(matches!(
        p.create_port(&with_mac("pod-n", "02:12:34:56:78:9a")).await,
        Err(CloudError::Conflict(_))
    ));
    assert!(matches!(
        p.create_port(&with_mac("pod-m", "02:00:00:00:00:01")).await,
        Err(CloudError::Conflict(_))
    ));
    assert!(matches!(
        p.create_port(&with_mac("pod-n", "01:00:5e:00:00:01")).await,
        Err(CloudError::Invalid(_))
    ));
    p.delete_port("pod-m").await.unwrap();
    let b = p
        .create_port(&port_spec("pod-b", Some(ip("10.40.0.77"))))
        .await
        .unwrap();
    assert_eq!(b.ip, ip("10.40.0.77"));

    // Attach: the device appears in the server with the port's MAC, down, no address.
    let attached = p.attach_port("pod-a", "s1").await.unwrap();
    assert_eq!(attached.server.as_deref(), Some("s1"));
    let ns1 = cloud.netns("s1");
    let device = link_in(Some(&ns1), &a.device).await.expect("device in s1");
    assert_eq!(device["address"], a.mac);
    let addresses = run(&["ip", "-n", &ns1, "-4", "addr", "show", "dev", &a.device]).await;
    assert!(!addresses.contains("inet "), "{addresses}");
    assert_eq!(p.attach_port("pod-a", "s1").await.unwrap(), attached);
    assert!(matches!(
        p.attach_port("pod-a", "s2").await,
        Err(CloudError::Conflict(_))
    ));
    assert!(matches!(
        p.attach_port("s2-nic", "s1").await,
        Err(CloudError::Conflict(_))
    ));
    assert!(matches!(
        p.delete_port("s2-nic").await,
        Err(CloudError::Conflict(_))
    ));
    p.attach_port("pod-b", "s2").await.unwrap();

    // The "CNI" moves each device on into a pod and configures the port's address.
    let mut pods = Vec::new();
    for (port, server) in [(&a, "s1"), (&b, "s2")] {
        let pod = cloud.pod_netns(&port.name).await;
        let server_ns = cloud.netns(server);
        run(&[
            "ip",
            "-n",
            &server_ns,
            "link",
            "set",
            &port.device,
            "netns",
            &pod,
        ])
        .await;
        let cidr = format!("{}/{}", port.ip, network.subnet.prefix);
        run(&["ip", "-n", &pod, "addr", "add", &cidr, "dev", &port.device]).await;
        run(&["ip", "-n", &pod, "link", "set", &port.device, "up"]).await;
        run(&["ip", "-n", &pod, "link", "set", "lo", "up"]).await;
        pods.push(pod);
    }
    let p = cloud.p();
    // Re-attaching a port whose device is in a pod changes nothing.
    assert_eq!(p.attach_port("pod-a", "s1").await.unwrap(), attached);
    assert!(link_in(Some(&ns1), &a.device).await.is_none());
    assert!(link_in(Some(&pods[0]), &a.device).await.is_some());
    let pod_a = Some(pods[0].as_str());
    assert_reaches(pod_a, s1.ip.unwrap()).await;
    assert_reaches(pod_a, s2.ip.unwrap()).await;
    assert_reaches(pod_a, b.ip).await;
    assert_reaches(pod_a, network.gateway).await;

    // Spoofing: the same device with another address (a free one) reaches nothing...
    let cidr = |ip: Ipv4Addr| format!("{ip}/{}", network.subnet.prefix);
    let swap = |from: String, to: String| {
        let pod = pods[0].clone();
        let device = a.device.clone();
        async move {
            run(&["ip", "-n", &pod, "addr", "del", &from, "dev", &device]).await;
            run(&["ip", "-n", &pod, "addr", "add", &to, "dev", &device]).await;
        }
    };
    swap(cidr(a.ip), cidr(ip("10.40.0.200"))).await;
    assert_cannot_reach(pod_a, s1.ip.unwrap()).await;
    assert_cannot_reach(pod_a, b.ip).await;
    assert_cannot_reach(pod_a, network.gateway).await;
    // ...nor with another port's address...
    swap(cidr(ip("10.40.0.200")), cidr(b.ip)).await;
    assert_cannot_reach(pod_a, s1.ip.unwrap()).await;
    // ...nor with its own address behind another MAC; its own identity works again.
    swap(cidr(b.ip), cidr(a.ip)).await;
    run(&[
        "ip",
        "-n",
        &pods[0],
        "link",
        "set",
        &a.device,
        "address",
        "02:00:00:00:00:99",
    ])
    .await;
    assert_cannot_reach(pod_a, s1.ip.unwrap()).await;
    run(&[
        "ip", "-n", &pods[0], "link", "set", &a.device, "address", &a.mac,
    ])
    .await;
    assert_reaches(pod_a, s1.ip.unwrap()).await;

    // Detach: pod-b's device leaves its pod, the port stays with its address; attached
    // again (to the other server), it is plugged there.
    let detached = p.detach_port("pod-b").await.unwrap();
    assert_eq!(detached.server, None);
    assert_eq!(detached.ip, b.ip);
    assert_eq!(
        p.detach_port("pod-b").await.unwrap(),
        detached,
        "idempotent"
    );
    assert!(
        link_in(Some(&pods[1]), &b.device).await.is_none(),
        "the device left the pod"
    );
    assert!(matches!(
        p.detach_port("s1-nic").await,
        Err(CloudError::Conflict(_))
    ));
    let moved = p.attach_port("pod-b", "s1").await.unwrap();
    assert_eq!(moved.server.as_deref(), Some("s1"));
    assert!(link_in(Some(&ns1), &b.device).await.is_some());

    // Delete: the pair goes (from the pod too), the guard entry and the address with it.
    p.delete_port("pod-a").await.unwrap();
    p.delete_port("pod-a").await.unwrap();
    let sw = cloud.switch();
    assert!(
        link_in(Some(&sw), &names::port_switch_link("pod-a"))
            .await
            .is_none()
    );
    let mut gone = false;
    for _ in 0..50 {
        if link_in(pod_a, &a.device).await.is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the pod's end of a deleted port is gone");
    let guard = run(&[
        "ip", "netns", "exec", &sw, "nft", "list", "set", "bridge", "guard", "ports",
    ])
    .await;
    assert!(
        !guard.contains(&names::port_switch_link("pod-a")),
        "{guard}"
    );
    assert!(guard.contains(&names::port_switch_link("pod-b")), "{guard}");
    let names_left: Vec<String> = p
        .list_ports()
        .await
        .unwrap()
        .into_iter()
        .map(|port: Port| port.name)
        .collect();
    assert_eq!(names_left, ["pod-b", "s1-nic", "s2-nic"]);
    let again = p.create_port(&port_spec("pod-c", None)).await.unwrap();
    assert_eq!(again.ip, a.ip, "the released address is handed out again");
}

/// Creating twice is creating once; the state survives the provider; what the kernel loses
/// behind the provider's back, `open` brings back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_restarts_and_open_repairs_servers() {
    let mut cloud = Cloud::new().await;
    let p = cloud.p();
    p.ensure_network(&network_spec("net", "t", "10.50.0.0/24"))
        .await
        .unwrap();
    let spec = server_spec("s1", "t", "net", None);
    let first = create_server_timed(&cloud, &spec).await;
    let second = p.create_server(&spec).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(
        p.ensure_network(&network_spec("net", "t", "10.50.0.0/24"))
            .await
            .unwrap()
            .gateway,
        ip("10.50.0.1")
    );
    let mut other = spec.clone();
    other.tenant = "u".into();
    assert!(matches!(
        p.create_server(&other).await,
        Err(CloudError::Conflict(_))
    ));
    p.create_port(&PortSpec {
        name: "pod".into(),
        network: "net".into(),
        ip: None,
        mac: None,
        tags: BTreeMap::new(),
    })
    .await
    .unwrap();
    let port = p.attach_port("pod", "s1").await.unwrap();
    let servers = p.list_servers().await.unwrap();
    let networks = p.list_networks().await.unwrap();
    let ports = p.list_ports().await.unwrap();
    let pid = agent_pid(&cloud, "s1");

    // The controller restarts: same state, the running agent is left alone.
    let took = cloud.reopen().await;
    eprintln!("open with a healthy server took {} ms", took.as_millis());
    let p = cloud.p();
    assert_eq!(p.list_servers().await.unwrap(), servers);
    assert_eq!(p.list_networks().await.unwrap(), networks);
    assert_eq!(p.list_ports().await.unwrap(), ports);
    assert_eq!(agent_pid(&cloud, "s1"), pid);
    assert_eq!(p.create_server(&spec).await.unwrap(), first);

    // The "VM" loses everything (a host reboot, or someone's `ip netns del` and kill).
    let netns = cloud.netns("s1");
    run(&["ip", "netns", "del", &netns]).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) {
        assert!(Instant::now() < deadline, "agent {pid} survived SIGKILL");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let server = p.server("s1").await.unwrap().unwrap();
    assert_eq!(server.status, ServerStatus::Shutoff);
    assert!(!netns_exists(&netns));

    let took = cloud.reopen().await;
    eprintln!("open repairing a server took {} ms", took.as_millis());
    let p = cloud.p();
    let repaired = p.server("s1").await.unwrap().unwrap();
    assert_eq!(repaired.status, ServerStatus::Active);
    assert_eq!(repaired.ip, first.ip);
    assert_eq!(repaired.management_ip, first.management_ip);
    assert_ne!(agent_pid(&cloud, "s1"), pid, "a new agent");
    assert_server_running(&cloud, &repaired).await;
    assert_reaches(None, repaired.management_ip.unwrap()).await;
    assert_reaches(Some(&netns), ip("10.50.0.1")).await;
    let device = link_in(Some(&netns), &port.device).await;
    assert!(device.is_some(), "the attached port is plugged in again");
    assert_eq!(p.list_ports().await.unwrap(), ports);
    assert_eq!(p.attach_port("pod", "s1").await.unwrap(), port);
}

/// Deleting a server leaves nothing of it; destroying the cloud leaves nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_server_and_destroy_all_leave_nothing() {
    let mut cloud = Cloud::new().await;
    let i = cloud.i().to_string();
    let p = cloud.p();
    p.ensure_network(&network_spec("net", "t", "10.60.0.0/24"))
        .await
        .unwrap();
    create_server_timed(&cloud, &server_spec("s1", "t", "net", None)).await;
    let s2 = create_server_timed(&cloud, &server_spec("s2", "t", "net", None)).await;
    p.create_port(&PortSpec {
        name: "pod".into(),
        network: "net".into(),
        ip: None,
        mac: None,
        tags: BTreeMap::new(),
    })
    .await
    .unwrap();
    p.attach_port("pod", "s1").await.unwrap();
    let pid = agent_pid(&cloud, "s1");
    // A process in the server's cgroup that is not the agent (a pod's).
    let cgroup = names::server_cgroup(&i, "s1");
    let (ok, out) = try_run(&[
        "sh",
        "-c",
        &format!(
            "ip netns exec {} sh -c 'for f in {}; do echo $$ > $f; done; exec sleep 1000' >/dev/null 2>&1 & echo $!",
            cloud.netns("s1"),
            cgroup_dirs(&names::pods_cgroup(&i, "s1"))
                .iter()
                .map(|d| d.join("cgroup.procs").to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        ),
    ])
    .await;
    assert!(ok, "{out}");
    let pod_pid: i32 = out.trim().parse().unwrap();

    let started = Instant::now();
    p.delete_server("s1").await.unwrap();
    eprintln!("delete_server took {} ms", started.elapsed().as_millis());
    p.delete_server("s1").await.unwrap();
    assert!(!netns_exists(&cloud.netns("s1")));
    assert!(
        link_in(None, &names::mgmt_host_link(&i, "s1"))
            .await
            .is_none()
    );
    for dir in cgroup_dirs(&cgroup) {
        assert!(!dir.exists(), "{}", dir.display());
    }
    assert!(!process_alive(pid), "agent");
    assert!(!process_alive(pod_pid), "pod process");
    assert!(!cloud.config.state_dir.join("servers/s1").exists());
    assert_eq!(p.server("s1").await.unwrap(), None);
    let ports = p.list_ports().await.unwrap();
    let pod = ports.iter().find(|port| port.name == "pod").unwrap();
    assert_eq!(pod.server, None, "detached, still allocated");
    assert!(
        !ports.iter().any(|port| port.name == "s1-nic"),
        "NIC released"
    );
    let sw = cloud.switch();
    for port in ["pod", "s1-nic"] {
        assert!(
            link_in(Some(&sw), &names::port_switch_link(port))
                .await
                .is_none()
        );
    }
    // s2 is untouched.
    assert_reaches(Some(&cloud.netns("s2")), ip("10.60.0.1")).await;
    // A detached port can go to another server at once.
    p.attach_port("pod", "s2").await.unwrap();

    // A process someone started in s2's namespace by hand, outside its cgroup.
    let mut stray = std::process::Command::new("ip")
        .args(["netns", "exec", &cloud.netns("s2"), "sleep", "1000"])
        .spawn()
        .unwrap();
    let s2_pid = agent_pid(&cloud, "s2");
    let cp = cloud.config.control_plane_ip();
    let state_dir = cloud.config.state_dir.clone();

    let started = Instant::now();
    let provider = cloud.provider.take().unwrap();
    provider.destroy_all().await.unwrap();
    eprintln!("destroy_all took {} ms", started.elapsed().as_millis());
    // The guard must not find anything to destroy again: open + destroy of nothing.
    let leftovers: Vec<String> = std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("cnp-{i}-")))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let tables = run(&["nft", "list", "tables"]).await;
    assert!(!tables.contains(&names::host_table(&i)), "{tables}");
    let lo = run(&["ip", "-4", "addr", "show", "dev", "lo"]).await;
    assert!(!lo.contains(&format!("{cp}/32")), "{lo}");
    let links = run(&["ip", "-br", "link"]).await;
    assert!(
        !links
            .lines()
            .any(|l| names::is_mgmt_host_link(&i, l.split(['@', ' ']).next().unwrap())),
        "{links}"
    );
    for dir in cgroup_dirs(&names::instance_cgroup(&i)) {
        assert!(!dir.exists(), "{}", dir.display());
    }
    assert!(!process_alive(s2_pid));
    assert!(stray.wait().is_ok());
    assert!(!state_dir.exists());
    assert!(s2.management_ip.is_some());
    // Nothing left for the guard: open on the empty state, then destroy, on drop.
}

/// A creation that fails half-way is cleaned up and shows as Error; creating it again
/// retries from scratch. Also: image seeding by hard links, and request validation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_creation_is_cleaned_up_and_retried() {
    let seed_dir = tempfile::tempdir().unwrap();
    let seed = seed_dir.path().join("images");
    let seed_for_config = seed.clone();
    let cloud = Cloud::with(move |c| c.image_seed = Some(seed_for_config)).await;
    let p = cloud.p();
    p.ensure_network(&network_spec("net", "t", "10.70.0.0/24"))
        .await
        .unwrap();
    for (spec, what) in [
        (server_spec("Bad_Name", "t", "net", None), "name"),
        (server_spec("sw", "t", "net", None), "reserved name"),
        (server_spec(&"x".repeat(41), "t", "net", None), "long name"),
    ] {
        assert!(
            matches!(p.create_server(&spec).await, Err(CloudError::Invalid(_))),
            "{what}"
        );
    }
    assert!(matches!(
        p.create_server(&server_spec("s1", "t", "nope", None)).await,
        Err(CloudError::NotFound { .. })
    ));

    // The seed does not exist yet: seeding fails after the server's directory exists.
    let err = p
        .create_server(&server_spec("s1", "t", "net", None))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Failed(msg) if msg.contains("image seed")),
        "{err}"
    );
    assert!(!cloud.config.state_dir.join("servers/s1").exists());
    let failed = p.server("s1").await.unwrap().expect("recorded as failed");
    assert!(
        matches!(failed.status, ServerStatus::Error(_)),
        "{failed:?}"
    );
    assert!(!netns_exists(&cloud.netns("s1")));
    assert!(
        p.list_ports().await.unwrap().is_empty(),
        "the NIC's address is released"
    );
    for dir in cgroup_dirs(&names::server_cgroup(cloud.i(), "s1")) {
        assert!(!dir.exists(), "{}", dir.display());
    }

    std::fs::create_dir_all(seed.join("blobs")).unwrap();
    std::fs::write(seed.join("blobs/layer"), b"layer bytes").unwrap();
    let server = create_server_timed(&cloud, &server_spec("s1", "t", "net", None)).await;
    assert_server_running(&cloud, &server).await;
    let copied = cloud
        .config
        .state_dir
        .join("servers/s1/root/images/blobs/layer");
    assert_eq!(
        std::fs::metadata(&copied).unwrap().ino(),
        std::fs::metadata(seed.join("blobs/layer")).unwrap().ino(),
        "hard-linked"
    );
    assert_eq!(server.ip, Some(ip("10.70.0.2")));
}

/// After a host reboot nothing of the cloud is in the kernel; `open` brings every server
/// back (namespace, links, NIC, ports, cgroups, a new agent) with the switch and the
/// host's side. It also finishes off a creation that was cut short and whatever of this
/// instance no record accounts for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_after_a_reboot_restores_everything_and_removes_orphans() {
    let mut cloud = Cloud::new().await;
    let i = cloud.i().to_string();
    let p = cloud.p();
    let network = p
        .ensure_network(&network_spec("net", "t", "10.80.0.0/24"))
        .await
        .unwrap();
    let s1 = create_server_timed(&cloud, &server_spec("s1", "t", "net", None)).await;
    let s2 = create_server_timed(&cloud, &server_spec("s2", "t", "net", None)).await;
    create_server_timed(&cloud, &server_spec("s3", "t", "net", None)).await;
    p.create_port(&PortSpec {
        name: "pod".into(),
        network: "net".into(),
        ip: None,
        mac: None,
        tags: BTreeMap::new(),
    })
    .await
    .unwrap();
    let port = p.attach_port("pod", "s2").await.unwrap();
    let cp = cloud.config.control_plane_ip();
    let s3_pid = agent_pid(&cloud, "s3");
    let pids = [agent_pid(&cloud, "s1"), agent_pid(&cloud, "s2")];
    drop(cloud.provider.take());

    // The "reboot": s1's and s2's processes, namespaces, cgroups, the switch, the host's
    // table and address are gone. (s3 stays: its record is about to say its creation
    // was interrupted.)
    for pid in pids {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    for server in ["s1", "s2"] {
        run(&["ip", "netns", "del", &cloud.netns(server)]).await;
    }
    run(&["ip", "netns", "del", &cloud.switch()]).await;
    run(&["nft", "delete", "table", "inet", &names::host_table(&i)]).await;
    run(&["ip", "addr", "del", &format!("{cp}/32"), "dev", "lo"]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for server in ["s1", "s2"] {
        for dir in cgroup_dirs(&names::server_cgroup(&i, server)) {
            for rel in ["pods", "agent", ""] {
                let dir = dir.join(rel);
                while dir.exists() && std::fs::remove_dir(&dir).is_err() {
                    assert!(Instant::now() < deadline, "{} stays busy", dir.display());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    // s3 was being built when the provider stopped.
    let record = cloud.config.state_dir.join("servers/s3.json");
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(text.contains("\"phase\": \"Ready\""), "{text}");
    std::fs::write(
        &record,
        text.replace("\"phase\": \"Ready\"", "\"phase\": \"Building\""),
    )
    .unwrap();
    // Leftovers of a server nobody recorded, and a bridge of no network.
    run(&["ip", "netns", "add", &cloud.netns("ghost")]).await;
    let ghost_link = names::mgmt_host_link(&i, "ghost");
    run(&[
        "ip",
        "link",
        "add",
        &ghost_link,
        "type",
        "veth",
        "peer",
        "name",
        "mgmt0",
        "netns",
        &cloud.netns("ghost"),
    ])
    .await;
    let ghost_cgroups = cgroup_dirs(&names::server_cgroup(&i, "ghost"));
    for dir in &ghost_cgroups {
        std::fs::create_dir_all(dir).unwrap();
    }

    let took = cloud.reopen().await;
    eprintln!("open after a reboot took {} ms", took.as_millis());
    let p = cloud.p();
    for (server, pid) in [(&s1, pids[0]), (&s2, pids[1])] {
        let now = p.server(&server.name).await.unwrap().unwrap();
        assert_eq!(now.status, ServerStatus::Active, "{}", server.name);
        assert_ne!(agent_pid(&cloud, &server.name), pid);
        assert_server_running(&cloud, &now).await;
        assert_reaches(None, now.management_ip.unwrap()).await;
        assert_reaches(Some(&cloud.netns(&server.name)), network.gateway).await;
    }
    let ns1 = cloud.netns("s1");
    assert_reaches(Some(&ns1), s2.ip.unwrap()).await;
    let device = link_in(Some(&cloud.netns("s2")), &port.device).await;
    assert_eq!(
        device.expect("the port is plugged in again")["address"],
        port.mac
    );
    let tables = run(&["nft", "list", "tables"]).await;
    assert!(tables.contains(&names::host_table(&i)), "{tables}");
    // The interrupted creation is cleaned up and shows as failed.
    let s3 = p.server("s3").await.unwrap().unwrap();
    assert!(matches!(s3.status, ServerStatus::Error(_)), "{s3:?}");
    assert!(!netns_exists(&cloud.netns("s3")));
    assert!(!process_alive(s3_pid));
    assert!(
        !p.list_ports()
            .await
            .unwrap()
            .iter()
            .any(|p| p.name == "s3-nic")
    );
    // The orphans are gone.
    assert!(!netns_exists(&cloud.netns("ghost")));
    assert!(link_in(None, &ghost_link).await.is_none());
    for dir in &ghost_cgroups {
        assert!(!dir.exists(), "{}", dir.display());
    }
    // And a failed server can be created again.
    let again = p
        .create_server(&server_spec("s3", "t", "net", None))
        .await
        .unwrap();
    assert_eq!(again.status, ServerStatus::Active);
}

/// Public IPs: allocated from the public network, bound to one port, reached there from
/// the public network (a client plugged into it, and the host) and from nowhere else;
/// another tenant's port cannot send from it; unbound with its port, released on delete;
/// kept across a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_ips_reach_their_port_only() {
    let public = free_public_block().await;
    let mut cloud = Cloud::with(|c| c.public = Some(public)).await;
    let p = cloud.p();
    for (net, tenant) in [("net-t", "t"), ("net-u", "u")] {
        p.ensure_network(&network_spec(net, tenant, "10.50.0.0/24"))
            .await
            .unwrap();
    }
    create_server_timed(&cloud, &server_spec("s1", "t", "net-t", None)).await;
    create_server_timed(&cloud, &server_spec("s2", "u", "net-u", None)).await;
    // The same fixed address in both tenants' networks.
    let mut pods = Vec::new();
    for (port, net, server) in [("pod-a", "net-t", "s1"), ("pod-b", "net-u", "s2")] {
        let p = cloud.p();
        let created = p
            .create_port(&PortSpec {
                name: port.into(),
                network: net.into(),
                ip: Some(ip("10.50.0.50")),
                mac: None,
                tags: BTreeMap::new(),
            })
            .await
            .unwrap();
        p.attach_port(port, server).await.unwrap();
        let pod = cloud.pod_netns(port).await;
        let server_ns = cloud.netns(server);
        run(&[
            "ip",
            "-n",
            &server_ns,
            "link",
            "set",
            &created.device,
            "netns",
            &pod,
        ])
        .await;
        run(&[
            "ip",
            "-n",
            &pod,
            "addr",
            "add",
            "10.50.0.50/24",
            "dev",
            &created.device,
        ])
        .await;
        run(&["ip", "-n", &pod, "link", "set", &created.device, "up"]).await;
        run(&["ip", "-n", &pod, "link", "set", "lo", "up"]).await;
        run(&[
            "ip",
            "-n",
            &pod,
            "route",
            "add",
            "default",
            "via",
            "10.50.0.1",
            "dev",
            &created.device,
        ])
        .await;
        pods.push((pod, created));
    }

    let p = cloud.p();
    let spec = PublicIpSpec {
        name: "pip-a".into(),
        tags: BTreeMap::from([("pod".to_string(), "a".to_string())]),
    };
    let fip = p.create_public_ip(&spec).await.unwrap();
    assert!(public.contains(fip.address), "{fip:?}");
    let reserved = [public.nth(1).unwrap(), public.nth(2).unwrap()];
    assert!(!reserved.contains(&fip.address), "{fip:?}");
    assert_eq!(fip.port, None);
    assert_eq!(p.create_public_ip(&spec).await.unwrap(), fip, "idempotent");
    let other = p
        .create_public_ip(&PublicIpSpec {
            name: "pip-b".into(),
            tags: BTreeMap::new(),
        })
        .await
        .unwrap();
    assert_ne!(other.address, fip.address);
    assert!(matches!(
        p.bind_public_ip("pip-a", "nope").await,
        Err(CloudError::NotFound { .. })
    ));
    let bound = p.bind_public_ip("pip-a", "pod-a").await.unwrap();
    assert_eq!(bound.port.as_deref(), Some("pod-a"));
    assert_eq!(p.bind_public_ip("pip-a", "pod-a").await.unwrap(), bound);
    assert!(matches!(
        p.bind_public_ip("pip-a", "pod-b").await,
        Err(CloudError::Conflict(_))
    ));
    // The pod carries its public IP, as the CNI plugin sets it up.
    let (pod_a, port_a) = &pods[0];
    let fip_cidr = format!("{}/32", fip.address);
    run(&[
        "ip",
        "-n",
        pod_a,
        "addr",
        "add",
        &fip_cidr,
        "dev",
        &port_a.device,
    ])
    .await;

    // A client on the public network (its switch-side link named pub*, as documented).
    let client = format!("tpub-{}", cloud.i());
    run(&["ip", "netns", "add", &client]).await;
    cloud.extra_netns.push(client.clone());
    let client_link = format!("pubt{}", cloud.i());
    let sw = cloud.switch();
    run(&[
        "ip",
        "link",
        "add",
        &client_link,
        "netns",
        &sw,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &client,
    ])
    .await;
    run(&[
        "ip",
        "-n",
        &sw,
        "link",
        "set",
        &client_link,
        "master",
        "bpub",
        "up",
    ])
    .await;
    let client_ip = public.nth(200).unwrap();
    let client_cidr = format!("{client_ip}/24");
    run(&[
        "ip",
        "-n",
        &client,
        "addr",
        "add",
        &client_cidr,
        "dev",
        "eth0",
    ])
    .await;
    run(&["ip", "-n", &client, "link", "set", "eth0", "up"]).await;

    let client_ns = Some(client.as_str());
    assert_reaches(client_ns, fip.address).await;
    assert_reaches(None, fip.address).await;
    // Tenant u's pod, with the same fixed address, reaches its gateway but not the
    // public IP, nor the client: it has no public IP...
    let pod_b = Some(pods[1].0.as_str());
    assert_reaches(pod_b, ip("10.50.0.1")).await;
    assert_cannot_reach(pod_b, client_ip).await;
    // ...and cannot send from one that is not its own.
    let port_b = &pods[1].1;
    run(&[
        "ip",
        "-n",
        &pods[1].0,
        "addr",
        "add",
        &fip_cidr,
        "dev",
        &port_b.device,
    ])
    .await;
    let fip_text = fip.address.to_string();
    let client_text = client_ip.to_string();
    let spoofed = try_run(&inside(
        pod_b,
        &[
            "busybox",
            "ping",
            "-c1",
            "-W1",
            "-I",
            &fip_text,
            &client_text,
        ],
    ))
    .await;
    assert!(
        !spoofed.0,
        "tenant u sent from tenant t's public IP: {}",
        spoofed.1
    );
    // The unbound public IP leads nowhere.
    assert_cannot_reach(client_ns, other.address).await;

    // Reopening keeps the binding working.
    cloud.reopen().await;
    assert_reaches(client_ns, fip.address).await;
    let p = cloud.p();
    let listed = p.list_public_ips().await.unwrap();
    assert_eq!(listed.len(), 2);

    // Deleting the port unbinds its public IP (kept, free to bind again).
    p.delete_port("pod-a").await.unwrap();
    let kept: Vec<_> = p
        .list_public_ips()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.name == "pip-a")
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].port, None);
    assert_eq!(kept[0].address, fip.address);
    assert_cannot_reach(client_ns, fip.address).await;
    let routes = run(&["ip", "-n", &sw, "route", "show"]).await;
    assert!(!routes.contains(&fip_text), "{routes}");
    let floating = run(&[
        "ip", "netns", "exec", &sw, "nft", "list", "set", "inet", "guard", "floating",
    ])
    .await;
    assert!(!floating.contains(&fip_text), "{floating}");

    p.delete_public_ip("pip-a").await.unwrap();
    p.delete_public_ip("pip-a").await.unwrap();
    p.delete_public_ip("pip-b").await.unwrap();
    assert!(p.list_public_ips().await.unwrap().is_empty());
    let again = p
        .create_public_ip(&PublicIpSpec {
            name: "pip-c".into(),
            tags: BTreeMap::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        again.address, fip.address,
        "a released address is handed out again"
    );
}

/// Without a public network, public IPs are refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_public_network_no_public_ips() {
    let cloud = Cloud::new().await;
    let err = cloud
        .p()
        .create_public_ip(&PublicIpSpec {
            name: "pip".into(),
            tags: BTreeMap::new(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("no public network"), "{err}");
}

/// The warm pool's spares: built (namespace, management link, cgroup) with no tenant, NIC
/// or agent; kept by a reopen; claimed by a tenant, they become that tenant's server on its
/// network with its agent running; claims that do not fit are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_wait_without_a_tenant_and_are_claimed() {
    let mut cloud = Cloud::new().await;
    let p = cloud.p();
    let network = p
        .ensure_network(&network_spec("net", "t", "10.60.0.0/24"))
        .await
        .unwrap();
    let spare_spec = SpareSpec {
        name: "vm-a".into(),
        flavor: flavor(1, 256),
        tags: BTreeMap::from([("canopy.io/pool".to_string(), "warm".to_string())]),
    };
    let started = Instant::now();
    let spare = p.create_spare(&spare_spec).await.unwrap();
    eprintln!("create_spare took {} ms", started.elapsed().as_millis());
    assert_eq!(spare.status, ServerStatus::Spare);
    assert_eq!(spare.tenant, "");
    assert_eq!(spare.ip, None);
    assert!(spare.management_ip.is_some());
    assert_eq!(
        p.create_spare(&spare_spec).await.unwrap(),
        spare,
        "idempotent"
    );
    let netns = cloud.netns("vm-a");
    assert!(netns_exists(&netns));
    assert!(link_in(Some(&netns), names::MGMT_DEVICE).await.is_some());
    assert!(link_in(Some(&netns), names::NIC_DEVICE).await.is_none());
    let pid_file = cloud.config.state_dir.join("servers/vm-a/agent.pid");
    assert!(!pid_file.exists(), "a spare runs no agent");
    // Reachable over management like any server.
    assert_reaches(None, spare.management_ip.unwrap()).await;

    // Kept across a reopen, still a spare.
    cloud.reopen().await;
    let p = cloud.p();
    assert_eq!(
        p.server("vm-a").await.unwrap().map(|s| s.status),
        Some(ServerStatus::Spare)
    );
    // Not a name for a regular server; claims that do not fit are refused.
    assert!(matches!(
        p.create_server(&server_spec("vm-a", "t", "net", None))
            .await,
        Err(CloudError::Conflict(_))
    ));
    let mut wrong = server_spec("vm-a", "t", "net", None);
    wrong.flavor = flavor(2, 512);
    assert!(matches!(
        p.claim_spare(&wrong).await,
        Err(CloudError::Conflict(_))
    ));
    assert!(matches!(
        p.claim_spare(&server_spec("vm-nope", "t", "net", None))
            .await,
        Err(CloudError::NotFound { .. })
    ));

    let started = Instant::now();
    let claimed = p
        .claim_spare(&server_spec("vm-a", "t", "net", None))
        .await
        .unwrap();
    eprintln!("claim_spare took {} ms", started.elapsed().as_millis());
    assert_eq!(claimed.tenant, "t");
    assert_eq!(claimed.network, "net");
    assert_eq!(
        claimed.management_ip, spare.management_ip,
        "it keeps its address"
    );
    let ip = claimed.ip.expect("an address in the tenant's network");
    assert!(network.subnet.contains(ip));
    assert_server_running(&cloud, &claimed).await;
    assert_reaches(Some(&netns), network.gateway).await;
    // Claiming again is a no-op; it is no spare any more.
    assert_eq!(
        p.claim_spare(&server_spec("vm-a", "t", "net", None))
            .await
            .unwrap()
            .name,
        "vm-a"
    );
    assert!(matches!(
        p.claim_spare(&server_spec("vm-a", "u", "net", None)).await,
        Err(CloudError::Conflict(_))
    ));

    // A spare is deleted like any server.
    let other = SpareSpec {
        name: "vm-b".into(),
        ..spare_spec
    };
    p.create_spare(&other).await.unwrap();
    p.delete_server("vm-b").await.unwrap();
    assert!(!netns_exists(&cloud.netns("vm-b")));
    assert!(p.server("vm-b").await.unwrap().is_none());
}
