//! The single-machine cloud end to end: `canopy server` with the local provider creates VMs
//! (network namespaces running `canopy agent`) for a tenant whose pods do not fit, gives
//! each pod a NIC in the tenant's network, removes idle VMs, keeps tenants' networks apart
//! even with the same address range, and leaves nothing behind with `--cleanup`.
//!
//! Needs root, iproute2, nftables, runc and busybox-static (`.ci/run` installs them).

mod common;

use std::{net::Ipv4Addr, path::Path, process::Command, time::Duration};

use common::Cluster;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Node, Pod},
};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const IMAGE: &str = "canopy.test/busybox:1.35";

fn require_root_tools() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the cloud tests create network namespaces and must run as root (CI does)"
    );
    common::require("runc", "install Debian's runc (.ci/run does)");
    common::require("ip", "install Debian's iproute2 (.ci/run does)");
    common::require("nft", "install Debian's nftables (.ci/run does)");
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is required: install Debian's busybox-static (.ci/run does)"
    );
}

/// An agent image store with the test image, which every new VM starts with.
fn image_store(dir: &Path) -> std::path::PathBuf {
    common::import_busybox(&dir.join("vm-image"), IMAGE)
}

async fn tenant_namespace(admin: &kube::Client, name: &str, tenant: &str) -> Api<Pod> {
    let ns: Namespace = serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"canopy.io/tenant": tenant}}}),
    )
    .unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    Api::namespaced(admin.clone(), name)
}

fn deployment(name: &str, replicas: i32, cpu: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": IMAGE,
                    "command": ["sleep", "3600"],
                    "resources": {"requests": {"cpu": cpu, "memory": "32Mi"}}}]}}}
    }))
    .unwrap()
}

async fn running_pods(
    cluster: &Cluster,
    pods: &Api<Pod>,
    selector: &str,
    count: usize,
) -> Vec<Pod> {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let list = pods
            .list(&ListParams::default().labels(selector))
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let running: Vec<Pod> = list
            .iter()
            .filter(|p| {
                let status = p.status.as_ref();
                status.and_then(|s| s.phase.as_deref()) == Some("Running")
                    && status.and_then(|s| s.pod_ip.as_deref()).is_some()
            })
            .cloned()
            .collect();
        if running.len() == count {
            return running;
        }
        if std::time::Instant::now() > deadline {
            let summary: Vec<String> = list.iter().map(pod_summary).collect();
            panic!(
                "timed out waiting for {count} running pods with {selector}:\n{}\n{}",
                summary.join("\n"),
                failure_logs(cluster)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `wait_until`, failing with the server's and the VMs' logs.
async fn wait_logged<T>(
    cluster: &Cluster,
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if std::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}\n{}", failure_logs(cluster));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One line per pod: where it is and why, as `kubectl get pods -o wide` would show it,
/// so that a failure's first lines say what went wrong before the logs do.
fn pod_summary(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let conditions: Vec<String> = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| c.status != "True")
        .map(|c| format!("{}={} {}", c.type_, c.status, why(&c.reason, &c.message)))
        .collect();
    let waiting: Vec<String> = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .map(|w| format!("waiting {}", why(&w.reason, &w.message)))
        .collect();
    format!(
        "  {} node={:?} phase={:?} ip={:?} {:?} {:?}",
        pod.metadata.name.as_deref().unwrap_or("?"),
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        status.and_then(|s| s.phase.as_deref()),
        status.and_then(|s| s.pod_ip.as_deref()),
        conditions,
        waiting
    )
}

/// A status's reason and message, as one text.
fn why(reason: &Option<String>, message: &Option<String>) -> String {
    format!(
        "{} {}",
        reason.as_deref().unwrap_or(""),
        message.as_deref().unwrap_or("")
    )
}

/// The logs of a failed wait: warnings and errors of the server and the VMs first (CI shows
/// only the start and the end of a failure's output), then the whole logs.
fn failure_logs(cluster: &Cluster) -> String {
    let server = cluster.log();
    let agents = agent_logs(cluster.data_dir());
    let notable: Vec<&str> = server
        .lines()
        .chain(agents.lines())
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.starts_with("== "))
        .collect();
    format!(
        "warnings and errors:\n{}\nserver log:\n{server}\nagents:\n{agents}",
        notable.join("\n")
    )
}

/// The VMs' agents' logs, after those of cloud controllers running alone
/// (`cloud-controller-*.log` in the data directory).
fn agent_logs(data_dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(data_dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("cloud-controller-") && name.ends_with(".log") {
            out.push_str(&format!("== {}\n", entry.path().display()));
            out.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    for entry in std::fs::read_dir(data_dir.join("cloud/servers"))
        .into_iter()
        .flatten()
        .flatten()
    {
        out.push_str(&format!("== {}\n", entry.path().display()));
        out.push_str(&std::fs::read_to_string(entry.path().join("agent.log")).unwrap_or_default());
    }
    out
}

fn pod_ip(pod: &Pod) -> Ipv4Addr {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .unwrap()
        .parse()
        .unwrap()
}

/// Whether a ping from inside a pod (kubectl exec) reaches `ip`.
fn pings(cluster: &Cluster, namespace: &str, pod: &str, ip: Ipv4Addr) -> bool {
    cluster
        .kubectl(&[
            "-n",
            namespace,
            "exec",
            pod,
            "--",
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            &ip.to_string(),
        ])
        .status
        .success()
}

fn namespaces_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// A server with the local cloud: 1-vCPU VMs, a short idle time, the test image preloaded,
/// a management network of its own (tests run side by side), and `--cleanup`.
fn cloud_cluster(scratch: &Path, nets: &TestNetworks) -> Cluster {
    cloud_cluster_with(scratch, nets, &[])
}

fn cloud_cluster_with(scratch: &Path, nets: &TestNetworks, extra: &[&str]) -> Cluster {
    let images = image_store(scratch);
    let management = nets.management();
    let public = nets.public();
    let mut flags = vec![
        "--cloud",
        "local",
        "--cleanup",
        "--cloud-flavors",
        "c1m1:1:1024",
        "--cloud-idle-timeout",
        "5s",
        "--cloud-management-cidr",
        &management,
        "--cloud-public-cidr",
        &public,
        "--cloud-image-store",
        images.to_str().unwrap(),
    ];
    flags.extend_from_slice(extra);
    Cluster::with_scheduler_and(common::Backend::Embedded, &flags)
}

/// A management network (a /16 of 100.64.0.0/10) and a public network (a /24 of
/// 198.18.0.0/16) of the test's own: tests run side by side, each in its own process, and
/// two clouds on one machine must not share addresses. Each slot is held by an exclusive
/// lock on a file for the test's life (the kernel drops it when the process ends, however it
/// ends). Slot 0, the servers' default 100.64.0.0/16 and 198.18.0.0/24, is left to people.
struct TestNetworks {
    _lock: std::fs::File,
    slot: u32,
}

impl TestNetworks {
    fn take() -> TestNetworks {
        // 100.65–100.95: the local provider's own tests take /24s of 100.96.0.0/11 and
        // public /24s of 198.18.128.0/17.
        let start = std::process::id() % 31;
        for i in 0..31 {
            let slot = 1 + (start + i) % 31;
            let path = std::env::temp_dir().join(format!("canopy-test-cloud-{slot}.lock"));
            let file = std::fs::File::create(&path).unwrap();
            if file.try_lock().is_ok() {
                return TestNetworks { _lock: file, slot };
            }
        }
        panic!("every test network slot is taken");
    }

    fn management(&self) -> String {
        format!("100.{}.0.0/16", 64 + self.slot)
    }

    fn public(&self) -> String {
        format!("198.18.{}.0/24", self.slot)
    }

    /// The public network's first three octets.
    fn public_prefix(&self) -> [u8; 3] {
        [198, 18, self.slot as u8]
    }
}

/// Plugs a client namespace of the test's into the public network of the cloud `tag` (its
/// switch-side link named `pub…`, as the local provider wants), at `address/24`.
fn public_client(tag: &str, address: Ipv4Addr) -> String {
    let client = format!("tpub-{tag}");
    let switch = format!("cnp-{tag}-sw");
    let link = format!("pubt{tag}");
    let run = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let _ = Command::new("ip").args(["netns", "del", &client]).status();
    run(&["netns", "add", &client]);
    run(&[
        "link", "add", &link, "netns", &switch, "type", "veth", "peer", "name", "eth0", "netns",
        &client,
    ]);
    run(&["-n", &switch, "link", "set", &link, "master", "bpub", "up"]);
    run(&[
        "-n",
        &client,
        "addr",
        "add",
        &format!("{address}/24"),
        "dev",
        "eth0",
    ]);
    run(&["-n", &client, "link", "set", "eth0", "up"]);
    client
}

/// The body of `GET /index.html` from `ip:port`, asked with busybox nc from inside a
/// namespace (Debian's static busybox's wget crashes on the host).
fn fetch_from(netns: &str, ip: Ipv4Addr, port: u16) -> Option<String> {
    fetch_with(
        &["ip", "netns", "exec", netns],
        &ip.to_string(),
        port,
        "/index.html",
    )
}

/// The body of `GET <path>`, with busybox nc run by `enter` (a command that enters a
/// namespace).
fn fetch_with(enter: &[&str], ip: &str, port: u16, path: &str) -> Option<String> {
    use std::io::Write;
    let mut child = Command::new(enter[0])
        .args(&enter[1..])
        .args(["busybox", "nc", "-w", "2", ip])
        .arg(port.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    http_body(&String::from_utf8_lossy(&out.stdout))
}

/// The body of a 200 response.
fn http_body(response: &str) -> Option<String> {
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?;
    (status == "200").then(|| body.to_string())
}

/// The same from this machine, which is on the public network too.
fn fetch(ip: Ipv4Addr, port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&(ip, port).into(), timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    http_body(&response)
}

/// The local cloud's instance tag of a server: a hash of its data directory, as the server
/// derives it.
fn instance_of(cluster: &Cluster) -> String {
    use sha2::Digest;
    let dir = std::fs::canonicalize(cluster.data_dir()).unwrap();
    let digest = sha2::Sha256::digest(dir.to_string_lossy().as_bytes());
    digest[..2].iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_get_vms_pods_get_nics_and_idle_vms_go() {
    require_root_tools();
    let scratch = tempfile::tempdir().unwrap();
    let nets = TestNetworks::take();
    let cluster = cloud_cluster(scratch.path(), &nets);
    let admin = cluster.client().await;
    let shop = tenant_namespace(&admin, "shop", "acme").await;
    let rival = tenant_namespace(&admin, "rival", "globex").await;

    // A tenant with no VMs: three pods of 600m each need three 1-vCPU VMs.
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), "shop");
    deployments
        .create(&PostParams::default(), &deployment("web", 3, "600m"))
        .await
        .unwrap();
    let web = running_pods(&cluster, &shop, "app=web", 3).await;
    let nodes: Vec<String> = web
        .iter()
        .map(|p| p.spec.as_ref().unwrap().node_name.clone().unwrap())
        .collect();
    let mut distinct = nodes.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "one VM per pod: {nodes:?}");
    let node_api: Api<Node> = Api::all(admin.clone());
    for name in &distinct {
        let node = node_api.get(name).await.unwrap();
        let labels = node.metadata.labels.unwrap();
        assert_eq!(labels["canopy.io/tenant"], "acme");
        assert_eq!(labels["canopy.io/provider"], "local");
        assert_eq!(labels["node.kubernetes.io/instance-type"], "c1m1");
    }
    let subnet_a: Vec<Ipv4Addr> = web.iter().map(pod_ip).collect();
    for ip in &subnet_a {
        assert_eq!(
            ip.octets()[..2],
            [10, 0],
            "{ip} is in the tenant's 10.0.0.0/16"
        );
    }
    // Pods on different VMs talk directly, on one flat network.
    let first = web[0].metadata.name.clone().unwrap();
    for ip in &subnet_a[1..] {
        assert!(
            pings(&cluster, "shop", &first, *ip),
            "{first} cannot reach {ip}"
        );
    }
    // ...and their VMs, whose tenant address is the Node's second InternalIP.
    for pod in &web {
        let node = node_api
            .get(pod.spec.as_ref().unwrap().node_name.as_deref().unwrap())
            .await
            .unwrap();
        let vm_ip: Ipv4Addr = node
            .status
            .unwrap()
            .addresses
            .unwrap()
            .iter()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .find(|ip: &Ipv4Addr| ip.octets()[..2] == [10, 0])
            .expect("the VM's address in its tenant's network");
        assert!(
            pings(&cluster, "shop", &first, vm_ip),
            "{first} cannot reach VM {vm_ip}"
        );
    }
    // The port is recorded on the pod, and the pod sees it as eth0 with its MAC.
    let record: serde_json::Value = serde_json::from_str(
        &web[0].metadata.annotations.as_ref().unwrap()[canopy_api::POD_PORT_ANNOTATION],
    )
    .unwrap();
    let link = cluster.kubectl_ok(&[
        "-n", "shop", "exec", &first, "--", "ip", "link", "show", "eth0",
    ]);
    assert!(
        link.contains(record["mac"].as_str().unwrap()),
        "{link} / {record}"
    );

    // A server in a pod answers on its pod IP, to another pod of the tenant, and on its
    // public IP, to the public network.
    let httpd: Pod = serde_json::from_value(json!({
        "metadata": {"name": "httpd", "labels": {"app": "httpd"},
            "annotations": {"canopy.io/public-ip": "true"}},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "main", "image": IMAGE,
            "command": ["sh", "-c", "mkdir -p /www && echo served on the pod IP > /www/index.html && exec httpd -f -p 8080 -h /www"],
            "resources": {"requests": {"cpu": "100m"}}}]}
    }))
    .unwrap();
    shop.create(&PostParams::default(), &httpd).await.unwrap();
    let httpd = running_pods(&cluster, &shop, "app=httpd", 1).await;
    let url = format!("http://{}:8080/index.html", pod_ip(&httpd[0]));
    let page = wait_logged(
        &cluster,
        "the page from the pod IP",
        Duration::from_secs(20),
        async || {
            let out = cluster.kubectl(&["-n", "shop", "exec", &first, "--", "wget", "-qO-", &url]);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .await;
    assert_eq!(page, "served on the pod IP\n");
    let public_ip: Ipv4Addr = httpd[0].metadata.annotations.as_ref().unwrap()
        [canopy_api::POD_PUBLIC_IP_ADDRESS_ANNOTATION]
        .parse()
        .unwrap();
    let public = nets.public_prefix();
    assert_eq!(public_ip.octets()[..3], public[..], "{public_ip}");
    let addresses = cluster.kubectl_ok(&[
        "-n", "shop", "exec", "httpd", "--", "ip", "addr", "show", "eth0",
    ]);
    assert!(
        addresses.contains(&format!("inet {public_ip}/32")),
        "the pod sees its public IP: {addresses}"
    );
    let tag = instance_of(&cluster);
    let client = public_client(&tag, Ipv4Addr::new(public[0], public[1], public[2], 250));
    let page = wait_logged(
        &cluster,
        "the page from the public IP",
        Duration::from_secs(20),
        async || fetch_from(&client, public_ip, 8080),
    )
    .await;
    assert_eq!(page, "served on the pod IP\n");
    assert_eq!(
        fetch(public_ip, 8080).as_deref(),
        Some("served on the pod IP\n"),
        "this machine reaches the public IP"
    );
    // The pod's fixed address is not on the public network.
    assert!(fetch_from(&client, pod_ip(&httpd[0]), 8080).is_none());
    shop.delete("httpd", &Default::default()).await.unwrap();
    // The public IP goes with the pod.
    wait_logged(
        &cluster,
        "the public IP to be released",
        Duration::from_secs(30),
        async || {
            let dir = cluster.data_dir().join("cloud/public-ips");
            let left = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
            (left == 0).then_some(())
        },
    )
    .await;
    assert!(fetch_from(&client, public_ip, 8080).is_none());
    let _ = Command::new("ip").args(["netns", "del", &client]).status();

    // Tenant B, with the same address range, reaches none of A's pods.
    // Made with kubectl (a protobuf body, whose template carries Go's empty nodeName).
    cluster.kubectl_ok(&[
        "-n",
        "rival",
        "create",
        "deployment",
        "spy",
        "--image",
        IMAGE,
        "--",
        "sleep",
        "3600",
    ]);
    let spy = running_pods(&cluster, &rival, "app=spy", 1).await;
    let spy_name = spy[0].metadata.name.clone().unwrap();
    let spy_node = spy[0].spec.as_ref().unwrap().node_name.clone().unwrap();
    assert!(!distinct.contains(&spy_node), "tenants never share a VM");
    let spy_ip = pod_ip(&spy[0]);
    assert_eq!(spy_ip.octets()[..2], [10, 0]);
    for ip in subnet_a.iter().filter(|ip| **ip != spy_ip) {
        assert!(
            !pings(&cluster, "rival", &spy_name, *ip),
            "tenant B reached tenant A's {ip}"
        );
    }

    // Scale to zero: the VMs go after the idle time, with their Nodes.
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .unwrap();
    wait_logged(
        &cluster,
        "tenant A's VMs to be removed",
        Duration::from_secs(90),
        async || {
            let left = node_api
                .list(&ListParams::default().labels("canopy.io/tenant=acme"))
                .await
                .ok()?
                .items;
            left.is_empty().then_some(())
        },
    )
    .await;
    let instance_namespaces = namespaces_with("cnp-");
    for name in &distinct {
        assert!(
            !instance_namespaces
                .iter()
                .any(|n| n.ends_with(name.as_str())),
            "the namespace of VM {name} is left: {instance_namespaces:?}"
        );
    }
    assert!(
        node_api.get(&spy_node).await.is_ok(),
        "tenant B's busy VM stays"
    );

    // --cleanup on shutdown: nothing of the cloud is left on the machine.
    assert!(!namespaces_with(&format!("cnp-{tag}-")).is_empty());
    drop(cluster);
    let after = namespaces_with(&format!("cnp-{tag}-"));
    assert!(after.is_empty(), "namespaces left: {after:?}");
    // Tenant B's pod ran until the end: its namespace's file goes with its VM.
    let spy_uid = spy[0].metadata.uid.clone().unwrap();
    assert!(
        !Path::new(&format!("/run/netns/canopy-{spy_uid}")).exists(),
        "the namespace file of a pod of a destroyed VM is left"
    );
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains(&format!("canopy_{tag}")),
        "nft table left"
    );
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&format!("v{tag}pub")),
        "the host's public link is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_provisioning_leaves_no_orphans() {
    require_root_tools();
    let scratch = tempfile::tempdir().unwrap();
    let nets = TestNetworks::take();
    let mut cluster = cloud_cluster(scratch.path(), &nets);
    let admin = cluster.client().await;
    tenant_namespace(&admin, "shop", "acme").await;
    Api::<Deployment>::namespaced(admin.clone(), "shop")
        .create(&PostParams::default(), &deployment("web", 2, "600m"))
        .await
        .unwrap();
    // Killed (SIGKILL) as soon as it starts making the first VM, then started again.
    wait_logged(
        &cluster,
        "the first VM to be made",
        Duration::from_secs(60),
        async || cluster.log().contains("server created").then_some(()),
    )
    .await;
    cluster.crash_and_restart();
    let admin = cluster.client().await;
    let shop: Api<Pod> = Api::namespaced(admin.clone(), "shop");
    let web = running_pods(&cluster, &shop, "app=web", 2).await;
    let node_api: Api<Node> = Api::all(admin.clone());
    let vms: Vec<String> = node_api
        .list(&ListParams::default().labels("canopy.io/tenant=acme"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert_eq!(
        vms.len(),
        2,
        "two VMs for two pods, none left over: {vms:?}"
    );
    let tag = instance_of(&cluster);
    let vm_namespaces = |tag: &str| {
        namespaces_with(&format!("cnp-{tag}-"))
            .into_iter()
            .filter(|n| !n.ends_with("-sw"))
            .collect::<Vec<_>>()
    };
    assert_eq!(vm_namespaces(&tag).len(), 2, "{:?}", vm_namespaces(&tag));
    for pod in &web {
        assert!(
            pod.metadata
                .annotations
                .as_ref()
                .unwrap()
                .contains_key(canopy_api::POD_PORT_ANNOTATION)
        );
    }
    // Everything made before and after the crash goes when no longer needed.
    Api::<Deployment>::namespaced(admin.clone(), "shop")
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .unwrap();
    wait_logged(
        &cluster,
        "every VM to be removed",
        Duration::from_secs(90),
        async || vm_namespaces(&tag).is_empty().then_some(()),
    )
    .await;
    let ports: Vec<_> = std::fs::read_dir(cluster.data_dir().join("cloud/ports"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        ports
            .iter()
            .all(|p| !p.to_string_lossy().starts_with("pod-")),
        "pods' ports left: {ports:?}"
    );
}

/// The pid in the holder identity (`host_pid_suffix`) of a Lease in kube-system.
async fn leader_pid(admin: &kube::Client, lease: &str) -> Option<u32> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(admin.clone(), "kube-system");
    let holder = leases.get(lease).await.ok()?.spec?.holder_identity?;
    holder.split('_').nth(1)?.parse().ok()
}

/// `canopy cloud-controller` alone, twice, against a server that runs none: one leads; it is
/// killed (SIGKILL) as soon as it starts making a VM; the other takes over, finishes the
/// work with nothing orphaned, reports its IaaS calls on /metrics, and cleans the cloud
/// up when stopped with SIGTERM and `--cleanup`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_cloud_controllers_fail_over_without_orphans() {
    require_root_tools();
    let scratch = tempfile::tempdir().unwrap();
    let nets = TestNetworks::take();
    let images = image_store(scratch.path());
    let management = nets.management();
    let public = nets.public();
    let cluster = Cluster::with_scheduler_and(
        common::Backend::Embedded,
        &[
            "--cloud",
            "local",
            "--disable-cloud-controller",
            "--cloud-management-cidr",
            &management,
        ],
    );
    let admin = cluster.client().await;
    let data_dir = cluster.data_dir().to_path_buf();
    let replica = |name: &str| {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log =
            std::fs::File::create(data_dir.join(format!("cloud-controller-{name}.log"))).unwrap();
        let child = Command::new(common::canopy_exe())
            .arg("cloud-controller")
            .arg("--kubeconfig")
            .arg(data_dir.join("cloud-controller.kubeconfig"))
            .arg("--data-dir")
            .arg(&data_dir)
            .args([
                "--cloud-flavors",
                "c1m1:1:1024",
                "--cloud-idle-timeout",
                "5s",
            ])
            .args(["--cloud-management-cidr", &management])
            .args(["--cloud-public-cidr", &public])
            .arg("--cloud-image-store")
            .arg(&images)
            .args(["--cleanup", "--metrics-bind-address", &addr.to_string()])
            .args(["--leader-elect-lease-duration", "4s"])
            .args(["--leader-elect-renew-deadline", "3s"])
            .args(["--leader-elect-retry-period", "500ms"])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        (common::Child(child), addr)
    };
    let mut replicas = vec![replica("first"), replica("second")];
    for (_, addr) in &replicas {
        common::wait_for("a cloud controller's /readyz", async || {
            common::http_get(*addr, "/readyz").filter(|a| *a == (200, "ok".to_string()))
        })
        .await;
    }
    let leader = common::wait_for("a cloud-controller leader", async || {
        leader_pid(&admin, "cloud-controller").await
    })
    .await;
    let leader_at = replicas
        .iter()
        .position(|(child, _)| child.0.id() == leader)
        .expect("the leader is one of the replicas");

    tenant_namespace(&admin, "shop", "acme").await;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), "shop");
    deployments
        .create(&PostParams::default(), &deployment("web", 2, "600m"))
        .await
        .unwrap();
    // Killed as soon as a VM is being made (its record is written before it is built).
    let servers_dir = data_dir.join("cloud/servers");
    common::wait_for("the leader to start making a VM", async || {
        std::fs::read_dir(&servers_dir)
            .ok()?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .then_some(())
    })
    .await;
    let (mut killed, _) = replicas.remove(leader_at);
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    let (survivor, survivor_addr) = replicas.remove(0);

    let shop: Api<Pod> = Api::namespaced(admin.clone(), "shop");
    let web = running_pods(&cluster, &shop, "app=web", 2).await;
    assert_eq!(
        leader_pid(&admin, "cloud-controller").await,
        Some(survivor.0.id()),
        "the survivor leads"
    );
    let vms: Vec<String> = Api::<Node>::all(admin.clone())
        .list(&ListParams::default().labels("canopy.io/tenant=acme"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert_eq!(vms.len(), 2, "two VMs for two pods, none orphaned: {vms:?}");
    let tag = instance_of(&cluster);
    let vm_namespaces = || {
        namespaces_with(&format!("cnp-{tag}-"))
            .into_iter()
            .filter(|n| !n.ends_with("-sw"))
            .collect::<Vec<_>>()
    };
    assert_eq!(vm_namespaces().len(), 2, "{:?}", vm_namespaces());
    for pod in &web {
        assert!(
            pod.metadata
                .annotations
                .as_ref()
                .unwrap()
                .contains_key(canopy_api::POD_PORT_ANNOTATION)
        );
    }
    let (status, exposition) = common::http_get(survivor_addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    let created = common::sample(
        &exposition,
        "cloudprovider_api_request_duration_seconds_count",
        &[r#"request="create_server""#, r#"result="ok""#],
    );
    assert!(created >= Some(1.0), "{exposition}");
    assert!(
        common::sample(
            &exposition,
            "cloud_controller_reconcile_duration_seconds_count",
            &[]
        ) >= Some(1.0),
        "{exposition}"
    );

    // SIGTERM with --cleanup: the cloud goes with the controller.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(survivor.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut survivor = survivor;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let exited = loop {
        if let Some(status) = survivor.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cloud controller did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exited.success(), "{exited}: {}", agent_logs(&data_dir));
    let left = namespaces_with(&format!("cnp-{tag}-"));
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

/// The spare VMs of the local cloud, by their records.
fn spares(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("cloud/servers"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let name = name.strip_suffix(".json")?.to_string();
            let record: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(e.path()).ok()?).ok()?;
            (record["phase"] == "Spare").then_some(name)
        })
        .collect()
}

/// A warm pool of one: a spare VM waits with no Node; a tenant's pod that needs a VM takes
/// it (the pod runs on it, the Event says so), and the pool is filled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_takes_the_warm_pools_spare_and_the_pool_refills() {
    require_root_tools();
    let scratch = tempfile::tempdir().unwrap();
    let nets = TestNetworks::take();
    let cluster = cloud_cluster_with(scratch.path(), &nets, &["--cloud-warm-pool", "1"]);
    let admin = cluster.client().await;
    let first = wait_logged(
        &cluster,
        "a spare VM",
        Duration::from_secs(60),
        async || spares(cluster.data_dir()).pop(),
    )
    .await;
    let node_api: Api<Node> = Api::all(admin.clone());
    assert!(
        node_api.get_opt(&first).await.unwrap().is_none(),
        "a spare has no Node"
    );
    let shop = tenant_namespace(&admin, "shop", "acme").await;
    Api::<Deployment>::namespaced(admin.clone(), "shop")
        .create(&PostParams::default(), &deployment("web", 1, "600m"))
        .await
        .unwrap();
    let web = running_pods(&cluster, &shop, "app=web", 1).await;
    assert_eq!(
        web[0].spec.as_ref().unwrap().node_name.as_deref(),
        Some(first.as_str()),
        "the pod runs on the spare"
    );
    let node = node_api.get(&first).await.unwrap();
    assert_eq!(node.metadata.labels.unwrap()["canopy.io/tenant"], "acme");
    let events = cluster.kubectl_ok(&["-n", "shop", "get", "events"]);
    assert!(
        events.contains(&format!("VM {first} (c1m1, from the warm pool)")),
        "{events}"
    );
    let second = wait_logged(
        &cluster,
        "the pool to be filled again",
        Duration::from_secs(60),
        async || spares(cluster.data_dir()).into_iter().find(|s| *s != first),
    )
    .await;
    assert_ne!(second, first);
    // The spare is torn down with the rest by --cleanup.
    let tag = instance_of(&cluster);
    assert!(namespaces_with(&format!("cnp-{tag}-{second}")).len() == 1);
    drop(cluster);
    let left = namespaces_with(&format!("cnp-{tag}-"));
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

/// What `n` HTTP requests from inside `pod` to `ip:port` got: each answer's body (the
/// serving pod's name), or `-` for no answer.
fn ask(
    cluster: &Cluster,
    namespace: &str,
    pod: &str,
    ip: &str,
    port: u16,
    n: usize,
) -> Vec<String> {
    let script = format!(
        "for i in $(seq {n}); do a=$(printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} {port} | tail -n 1); echo \"${{a:--}}\"; done"
    );
    let out = cluster.kubectl(&["-n", namespace, "exec", pod, "--", "sh", "-c", &script]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A process whose network namespace holds `ip` (a pod's), found from the host without the
/// agent (which may be down).
fn process_with_address(ip: Ipv4Addr) -> u32 {
    let mut seen = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["ip", "-4", "-o", "addr"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains(&format!(" {ip}/")) {
            return pid;
        }
    }
    panic!("no process in a network namespace with {ip}");
}

/// The body of `GET /index.html` from `ip:port`, asked from the network namespace of `pid`.
fn fetch_in(pid: u32, ip: &str, port: u16) -> Option<String> {
    let net = format!("--net=/proc/{pid}/ns/net");
    fetch_with(&["nsenter", &net], ip, port, "/index.html").map(|b| b.trim().to_string())
}

fn web_service(cluster_ip: Option<&str>, selector: bool) -> serde_json::Value {
    let mut spec = json!({"type": "NodePort",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080}]});
    if selector {
        spec["selector"] = json!({"app": "web"});
    }
    if let Some(ip) = cluster_ip {
        spec["clusterIP"] = json!(ip);
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": spec})
}

async fn ready_condition(pods: &Api<Pod>, name: &str) -> Option<bool> {
    let pod = pods.get(name).await.ok()?;
    pod.status?
        .conditions?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status == "True")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_reach_a_tenants_pods_and_no_one_elses() {
    require_root_tools();
    let scratch = tempfile::tempdir().unwrap();
    let nets = TestNetworks::take();
    let mut cluster = cloud_cluster(scratch.path(), &nets);
    let admin = cluster.client().await;
    let shop = tenant_namespace(&admin, "shop", "acme").await;
    let other = tenant_namespace(&admin, "other", "beta").await;

    // Two web pods serving their own name, ready while /tmp/ready exists; a client pod.
    let web: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": IMAGE,
                    "command": ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && touch /tmp/ready && exec httpd -f -p 8080 -h /www"],
                    "readinessProbe": {"exec": {"command": ["cat", "/tmp/ready"]},
                        "periodSeconds": 1, "failureThreshold": 1},
                    "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}}}]}}}
    }))
    .unwrap();
    Api::<Deployment>::namespaced(admin.clone(), "shop")
        .create(&PostParams::default(), &web)
        .await
        .unwrap();
    for ns in ["shop", "other"] {
        Api::<Deployment>::namespaced(admin.clone(), ns)
            .create(&PostParams::default(), &deployment("client", 1, "100m"))
            .await
            .unwrap();
    }
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(admin.clone(), "shop");
    let svc = services
        .create(
            &PostParams::default(),
            &serde_json::from_value(web_service(None, true)).unwrap(),
        )
        .await
        .unwrap();
    let spec = svc.spec.unwrap();
    let vip = spec.cluster_ip.unwrap();
    let node_port = spec.ports.unwrap()[0].node_port.unwrap() as u16;
    let web_pods = running_pods(&cluster, &shop, "app=web", 2).await;
    let names: Vec<String> = web_pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    let client_pod = running_pods(&cluster, &shop, "app=client", 1)
        .await
        .remove(0);
    let client = client_pod.metadata.name.clone().unwrap();
    let client_pid = process_with_address(pod_ip(&client_pod));
    let rival = running_pods(&cluster, &other, "app=client", 1).await[0]
        .metadata
        .name
        .clone()
        .unwrap();

    // The ClusterIP spreads requests over both pods.
    let answers = wait_logged(
        &cluster,
        "both web pods to answer on the ClusterIP",
        Duration::from_secs(60),
        async || {
            let answers = ask(&cluster, "shop", &client, &vip, 80, 12);
            names.iter().all(|n| answers.contains(n)).then_some(answers)
        },
    )
    .await;
    assert!(answers.iter().all(|a| names.contains(a)), "{answers:?}");

    // Cluster DNS on the pod's node: the full name, the short name through the search
    // path, SRV, and a request to whatever the name resolves to.
    let lookup = |ns: &str, pod: &str, args: &str| {
        let out = cluster.kubectl(&[
            "-n",
            ns,
            "exec",
            pod,
            "--",
            "sh",
            "-c",
            &format!("nslookup {args}"),
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let resolv = cluster.kubectl_ok(&[
        "-n",
        "shop",
        "exec",
        &client,
        "--",
        "cat",
        "/etc/resolv.conf",
    ]);
    assert!(
        resolv.contains("search shop.svc.cluster.local svc.cluster.local cluster.local")
            && resolv.contains("options ndots:5"),
        "{resolv}"
    );
    let found = wait_logged(
        &cluster,
        "the service's name to resolve",
        Duration::from_secs(20),
        async || {
            let found = lookup("shop", &client, "web.shop.svc.cluster.local");
            found.contains(&format!("Address: {vip}")).then_some(found)
        },
    )
    .await;
    assert!(
        found.contains("Name:\tweb.shop.svc.cluster.local"),
        "{found}"
    );
    let short = lookup("shop", &client, "web");
    assert!(
        short.contains(&format!("Address: {vip}")),
        "search path: {short}"
    );
    let srv = lookup(
        "shop",
        &client,
        "-type=srv _http._tcp.web.shop.svc.cluster.local",
    );
    assert!(srv.contains("80 web.shop.svc.cluster.local"), "SRV: {srv}");
    let by_name = cluster.kubectl_ok(&["-n", "shop", "exec", &client, "--", "sh", "-c",
        "ip=$(nslookup web.shop.svc.cluster.local | awk '/^Address: / {a=$2} END {print a}'); printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 $ip 80 | tail -n 1"]);
    assert!(
        names.contains(&by_name.trim().to_string()),
        "by name: {by_name}"
    );
    let outside = lookup("shop", &client, "example.com");
    assert!(
        outside.contains("REFUSED"),
        "no upstream resolver: {outside}"
    );
    // Beta's node does not know acme's names, even for the same namespace and name.
    let rival_lookup = lookup("other", &rival, "web.shop.svc.cluster.local");
    assert!(
        rival_lookup.contains("NXDOMAIN"),
        "beta resolved acme's service: {rival_lookup}"
    );

    // A node port on a VM's address in the tenant's network.
    let annotation = web_pods[0].metadata.annotations.as_ref().unwrap()["canopy.io/port"].clone();
    let port: serde_json::Value = serde_json::from_str(&annotation).unwrap();
    let vm_ip = port["serviceRoute"]["via"].as_str().unwrap().to_string();
    let answers = ask(&cluster, "shop", &client, &vm_ip, node_port, 8);
    assert!(
        answers.iter().all(|a| names.contains(a)),
        "node port {vm_ip}:{node_port}: {answers:?}"
    );

    // Tenant beta's Service with the very same ClusterIP and no endpoints: beta's pod is
    // refused by its own node, never answered by acme's pods.
    let beta_services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(admin.clone(), "other");
    beta_services
        .create(
            &PostParams::default(),
            &serde_json::from_value(web_service(Some(&vip), false)).unwrap(),
        )
        .await
        .unwrap();
    let answers = ask(&cluster, "other", &rival, &vip, 80, 4);
    assert_eq!(
        answers,
        vec!["-"; 4],
        "beta reached acme's service: {answers:?}"
    );
    for ip in web_pods.iter().map(pod_ip) {
        let answers = ask(&cluster, "other", &rival, &ip.to_string(), 8080, 1);
        assert_eq!(answers, vec!["-"], "beta reached acme's pod {ip}");
    }

    // A pod that turns unready gets no new connections within a second.
    let (gone, stays) = (&names[0], &names[1]);
    cluster.kubectl_ok(&["-n", "shop", "exec", gone, "--", "rm", "/tmp/ready"]);
    wait_logged(
        &cluster,
        "the pod to turn unready",
        Duration::from_secs(20),
        async || (ready_condition(&shop, gone).await == Some(false)).then_some(()),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answers = ask(&cluster, "shop", &client, &vip, 80, 10);
    assert_eq!(
        answers,
        vec![stays.clone(); 10],
        "an unready pod still served"
    );

    // The proxy's metrics, in the client's VM (whose proxy carried its traffic), as
    // kube-proxy's.
    let vm_netns = format!(
        "cnp-{}-{}",
        instance_of(&cluster),
        client_pod
            .spec
            .as_ref()
            .unwrap()
            .node_name
            .as_deref()
            .unwrap()
    );
    let metrics = wait_logged(
        &cluster,
        "the proxy's /metrics in the client's VM",
        Duration::from_secs(20),
        async || {
            fetch_with(
                &["ip", "netns", "exec", &vm_netns],
                "127.0.0.1",
                10249,
                "/metrics",
            )
        },
    )
    .await;
    let programmed = common::sample(
        &metrics,
        "kubeproxy_network_programming_duration_seconds_count",
        &[],
    );
    assert!(programmed.is_some_and(|n| n >= 1.0), "{metrics}");
    assert!(
        metrics.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket"),
        "{metrics}"
    );

    // The proxy's rules stay while the agents are down, and a restarted proxy resyncs.
    let agents: Vec<u32> = namespaces_with(&format!("cnp-{}-", instance_of(&cluster)))
        .iter()
        .flat_map(|ns| {
            let out = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("\0agent\0"))
                .unwrap_or(false)
        })
        .collect();
    assert!(!agents.is_empty(), "found no agent processes");
    for pid in &agents {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for _ in 0..4 {
        let answer = fetch_in(client_pid, &vip, 80);
        assert_eq!(
            answer.as_ref(),
            Some(stays),
            "traffic stopped with the agents"
        );
    }
    cluster.crash_and_restart();
    let admin = cluster.client().await;
    let shop: Api<Pod> = Api::namespaced(admin.clone(), "shop");
    cluster.kubectl_ok(&["-n", "shop", "exec", gone, "--", "touch", "/tmp/ready"]);
    wait_logged(
        &cluster,
        "the pod to serve again through the restarted proxies",
        Duration::from_secs(60),
        async || {
            if ready_condition(&shop, gone).await != Some(true) {
                return None;
            }
            let answers = ask(&cluster, "shop", &client, &vip, 80, 12);
            names.iter().all(|n| answers.contains(n)).then_some(())
        },
    )
    .await;

    // Deleting the Service removes its rules: nothing answers on the ClusterIP.
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(admin.clone(), "shop");
    services.delete("web", &Default::default()).await.unwrap();
    wait_logged(
        &cluster,
        "the ClusterIP to stop answering",
        Duration::from_secs(10),
        async || (ask(&cluster, "shop", &client, &vip, 80, 2) == vec!["-", "-"]).then_some(()),
    )
    .await;
}
