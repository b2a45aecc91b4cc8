//! The node agent against a real `canopy server`: it registers its Node and Lease with a
//! node-scoped identity, runs the pods the scheduler binds to it in runc containers from an
//! imported OCI image, and reports upstream's statuses (exit codes, reasons, restarts,
//! crash-loop back-off, OOM kills, init containers); a deleted pod is stopped gracefully and
//! leaves nothing behind; a restarted agent adopts running containers.
//!
//! Needs root, `runc` and Debian's `busybox-static` (`.ci/run` installs them).

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{Child, Cluster, canopy_exe, client_for, wait_for, wait_until};
use k8s_openapi::api::{
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{ConfigMap, Namespace, Node, Pod, Secret},
};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

const IMAGE: &str = "canopy.test/busybox:1.35";

fn require_root_tools() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the agent tests run containers and must run as root (CI does)"
    );
    common::require("runc", "install Debian's runc (.ci/run does)");
    common::require("ip", "install Debian's iproute2 (.ci/run does)");
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is required: install Debian's busybox-static (.ci/run does)"
    );
}

/// A node agent process with its own directories.
struct Agent {
    process: Option<Child>,
    args: Vec<String>,
    root: PathBuf,
    state: PathBuf,
    logs: PathBuf,
    log_file: PathBuf,
    cgroup_parent: String,
}

impl Agent {
    fn start(cluster: &Cluster, node: &str, tenant: &str) -> Agent {
        Agent::start_with(cluster, node, tenant, &[])
    }

    fn start_with(cluster: &Cluster, node: &str, tenant: &str, extra: &[&str]) -> Agent {
        let kubeconfig = node_kubeconfig(cluster, node, Some(tenant));
        Agent::start_from(cluster, &kubeconfig, node, tenant, extra)
    }

    fn start_from(
        cluster: &Cluster,
        kubeconfig: &Path,
        node: &str,
        tenant: &str,
        extra: &[&str],
    ) -> Agent {
        let base = cluster.data_dir().join(format!("agent-{node}"));
        let (root, state, logs) = (base.join("root"), base.join("state"), base.join("logs"));
        std::fs::create_dir_all(&base).unwrap();
        // The image every test pod runs, built from the host's busybox.
        common::import_busybox(&root, IMAGE);
        let cgroup_parent = format!("canopy-test-{node}-{}", std::process::id());
        let args: Vec<String> = [
            "agent".into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--node-name".into(),
            node.into(),
            "--tenant".into(),
            tenant.into(),
            "--node-ip".into(),
            "127.0.0.1".into(),
            "--cpu".into(),
            "4".into(),
            "--memory".into(),
            "8Gi".into(),
            "--root-dir".into(),
            root.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
            "--log-dir".into(),
            logs.display().to_string(),
            "--cgroup-parent".into(),
            cgroup_parent.clone(),
            // Tests run agents side by side.
            "--port".into(),
            "0".into(),
        ]
        .into_iter()
        .chain(extra.iter().map(|a| a.to_string()))
        .collect();
        let mut agent = Agent {
            process: None,
            args,
            root,
            state,
            logs,
            log_file: base.join("agent.log"),
            cgroup_parent,
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .unwrap();
        let child = Command::new(canopy_exe())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.process = Some(Child(child));
    }

    fn kill(&mut self) {
        self.process = None;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.process = None;
        // Containers outlive the agent by design: tear them down for the next test.
        self.remove_everything();
    }
}

/// Runs a future to completion on a thread of its own: the agent's runtime is driven from
/// tests' async contexts and from `Drop`, where blocking the test's runtime is not allowed.
/// `None` when the thread could not run it; never panics, as `Drop` may run while a failed
/// test unwinds.
fn on_own_thread<T: Send + 'static>(
    future: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()
            .map(|rt| rt.block_on(future))
    })
    .join()
    .ok()
    .flatten()
}

impl Agent {
    /// The agent's container runtime, opened beside it.
    fn runtime(&self) -> Result<canopy_runtime::Runtime, canopy_runtime::RuntimeError> {
        canopy_runtime::Runtime::new(canopy_runtime::RuntimeConfig {
            runtime_binary: "runc".into(),
            shim_binary: canopy_exe(),
            root_dir: self.root.join("containers"),
            state_dir: self.state.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
        })
    }

    /// Stops every container and sandbox the agent left (tests only: a real node keeps
    /// them), and the empty parent cgroup of its pods.
    fn remove_everything(&self) {
        // Runs in Drop, maybe while a failed test unwinds: nothing here may panic.
        if let Ok(runtime) = self.runtime() {
            on_own_thread(async move {
                for sandbox in runtime.list_sandboxes().await.unwrap_or_default() {
                    let _ = runtime.remove_sandbox(&sandbox.pod_uid).await;
                }
            });
        }
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir(hierarchy.path().join(&self.cgroup_parent));
        }
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&self.cgroup_parent));
    }

    /// Removes one pod's sandbox behind the agent's back.
    fn remove_sandbox(&self, uid: &str) {
        let (runtime, uid) = (self.runtime().unwrap(), uid.to_string());
        on_own_thread(async move { runtime.remove_sandbox(&uid).await })
            .unwrap()
            .unwrap();
    }
}

fn node_kubeconfig(cluster: &Cluster, node: &str, tenant: Option<&str>) -> PathBuf {
    let tenant_group = tenant.map(|t| format!("canopy:tenant:{t}"));
    let mut groups = vec!["system:nodes"];
    groups.extend(tenant_group.as_deref());
    cluster.kubeconfig_file(
        &format!("system:node:{node}"),
        &groups,
        &format!("{node}-{}.kubeconfig", tenant.unwrap_or("none")),
    )
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

/// The pods of a namespace of the platform (no tenant's): where hostPath is allowed.
async fn platform_namespace(admin: &kube::Client) -> Api<Pod> {
    let platform: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "platform"}})).unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &platform)
        .await
        .unwrap();
    Api::namespaced(admin.clone(), "platform")
}

fn pod(name: &str, restart: &str, script: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": IMAGE, "command": ["sh", "-c", script]}]
        }
    }))
    .unwrap()
}

async fn phase(pods: &Api<Pod>, name: &str) -> Option<String> {
    pods.get(name).await.ok()?.status?.phase
}

async fn wait_phase(pods: &Api<Pod>, name: &str, want: &str) -> Pod {
    wait_until(
        &format!("pod {name} to be {want}"),
        Duration::from_secs(40),
        async || {
            let pod = pods.get(name).await.ok()?;
            (pod.status.as_ref()?.phase.as_deref() == Some(want)).then_some(pod)
        },
    )
    .await
}

fn main_status(pod: &Pod) -> k8s_openapi::api::core::v1::ContainerStatus {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first().cloned())
        .unwrap_or_else(|| panic!("no container status in {:?}", pod.status))
}

/// The log file of a pod's container run (upstream's /var/log/pods layout, CRI format).
fn container_log(agent: &Agent, pod: &Pod, container: &str, attempt: u32) -> String {
    let dir = format!(
        "{}_{}_{}",
        pod.metadata.namespace.as_deref().unwrap(),
        pod.metadata.name.as_deref().unwrap(),
        pod.metadata.uid.as_deref().unwrap()
    );
    std::fs::read_to_string(
        agent
            .logs
            .join(dir)
            .join(container)
            .join(format!("{attempt}.log")),
    )
    .unwrap_or_default()
}

/// A cluster with a scheduler and one Ready agent node of tenant `acme`.
async fn cluster_with_node(node: &str, extra: &[&str]) -> (Cluster, kube::Client, Agent) {
    require_root_tools();
    let cluster = Cluster::with_scheduler(common::Backend::Embedded);
    let admin = cluster.client().await;
    let agent = Agent::start_with(&cluster, node, "acme", extra);
    ready_node(&admin, &agent, node).await;
    (cluster, admin, agent)
}

async fn ready_node(admin: &kube::Client, agent: &Agent, name: &str) -> Node {
    let nodes: Api<Node> = Api::all(admin.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(node) = nodes.get(name).await {
            let ready = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if ready {
                return node;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent's Node is not Ready after 30 s; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_registers_and_runs_pods() {
    require_root_tools();
    let cluster = Cluster::with_scheduler(common::Backend::Embedded);
    let admin = cluster.client().await;
    let agent = Agent::start(&cluster, "node-1", "acme");

    // Registration: labels, capacity, Ready, info, a Lease owned by the Node.
    let node = ready_node(&admin, &agent, "node-1").await;
    let labels = node.metadata.labels.clone().unwrap();
    assert_eq!(labels["canopy.io/tenant"], "acme", "{}", agent.log());
    assert_eq!(labels["kubernetes.io/hostname"], "node-1");
    let status = node.status.clone().unwrap();
    assert_eq!(status.allocatable.as_ref().unwrap()["cpu"].0, "4");
    assert_eq!(
        status.allocatable.as_ref().unwrap()["memory"].0,
        "8388608Ki"
    );
    let info = status.node_info.unwrap();
    assert!(
        info.container_runtime_version.starts_with("runc://"),
        "{info:?}"
    );
    assert!(info.kubelet_version.contains("canopy"));
    assert!(
        status.images.unwrap_or_default().iter().any(|i| i
            .names
            .iter()
            .flatten()
            .any(|n| n.contains("canopy.test/busybox"))),
        "the imported image is reported"
    );
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "kube-node-lease");
    let lease = wait_for("the node Lease", async || leases.get("node-1").await.ok()).await;
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("node-1"));
    assert_eq!(spec.lease_duration_seconds, Some(40));
    assert_eq!(
        lease.metadata.owner_references.unwrap()[0].uid,
        node.metadata.uid.clone().unwrap()
    );

    let pods = tenant_namespace(&admin, "shop", "acme").await;

    // A Deployment's pods run.
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), "shop");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                "terminationGracePeriodSeconds": 2,
                "containers": [{"name": "web", "image": IMAGE,
                    "command": ["sh", "-c", "echo serving; exec sleep 3600"],
                    "resources": {"requests": {"cpu": "100m", "memory": "32Mi"},
                                  "limits": {"memory": "64Mi"}}}]}}}
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    wait_until(
        "the Deployment to have 2 available replicas",
        Duration::from_secs(60),
        async || {
            let d = deployments.get("web").await.ok()?;
            (d.status?.available_replicas == Some(2)).then_some(())
        },
    )
    .await;
    let web = pods
        .list(&kube::api::ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items;
    assert_eq!(web.len(), 2);
    for p in &web {
        let s = p.status.as_ref().unwrap();
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(s.qos_class.as_deref(), Some("Burstable"));
        let c = main_status(p);
        assert!(c.ready && c.started == Some(true));
        assert_eq!(c.restart_count, 0);
        assert!(c.container_id.as_deref().unwrap().starts_with("canopy://"));
        assert!(c.image_id.starts_with("sha256:"), "{c:?}");
        assert!(c.state.unwrap().running.is_some());
        let ready = s
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        assert!(container_log(&agent, p, "web", 0).contains(" stdout F serving"));
    }

    // Exit codes and reasons.
    pods.create(
        &PostParams::default(),
        &pod("fails", "Never", "echo hello; echo oops >&2; exit 3"),
    )
    .await
    .unwrap();
    pods.create(&PostParams::default(), &pod("completes", "Never", "exit 0"))
        .await
        .unwrap();
    let failed = wait_phase(&pods, "fails", "Failed").await;
    let terminated = main_status(&failed).state.unwrap().terminated.unwrap();
    assert_eq!(terminated.exit_code, 3);
    assert_eq!(terminated.reason.as_deref(), Some("Error"));
    let log = container_log(&agent, &failed, "main", 0);
    assert!(log.contains(" stdout F hello"), "{log}");
    assert!(log.contains(" stderr F oops"), "{log}");
    let done = wait_phase(&pods, "completes", "Succeeded").await;
    let terminated = main_status(&done).state.unwrap().terminated.unwrap();
    assert_eq!(
        (terminated.exit_code, terminated.reason.as_deref()),
        (0, Some("Completed"))
    );

    // A crashing container is restarted, then backs off.
    pods.create(&PostParams::default(), &pod("crashes", "Always", "exit 1"))
        .await
        .unwrap();
    let looping = wait_until("CrashLoopBackOff", Duration::from_secs(40), async || {
        let p = pods.get("crashes").await.ok()?;
        let c = p.status?.container_statuses?.into_iter().next()?;
        let waiting = c.state.clone()?.waiting?;
        (waiting.reason.as_deref() == Some("CrashLoopBackOff")).then_some(c)
    })
    .await;
    assert!(looping.restart_count >= 1, "{looping:?}");
    let last = looping.last_state.unwrap().terminated.unwrap();
    assert_eq!(last.exit_code, 1);
    assert!(
        looping
            .state
            .unwrap()
            .waiting
            .unwrap()
            .message
            .unwrap()
            .contains("back-off 10s restarting failed container=main"),
    );
    assert_eq!(phase(&pods, "crashes").await.as_deref(), Some("Running"));

    // The memory limit is enforced and reported.
    let oom: Pod = serde_json::from_value(json!({
        "metadata": {"name": "hog"},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": IMAGE,
            "command": ["sh", "-c", "tail /dev/zero"],
            "resources": {"limits": {"memory": "24Mi"}}}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &oom).await.unwrap();
    let hog = wait_phase(&pods, "hog", "Failed").await;
    let terminated = main_status(&hog).state.unwrap().terminated.unwrap();
    assert_eq!(
        terminated.reason.as_deref(),
        Some("OOMKilled"),
        "{terminated:?}"
    );
    assert_eq!(terminated.exit_code, 137);

    // Init containers run first, in order, sharing an emptyDir; env and the downward API.
    let init: Pod = serde_json::from_value(json!({
        "metadata": {"name": "init", "labels": {"team": "blue"}},
        "spec": {"restartPolicy": "Never",
            "volumes": [{"name": "work", "emptyDir": {}}],
            "initContainers": [
                {"name": "one", "image": IMAGE, "command": ["sh", "-c", "echo one >> /work/trail"],
                 "volumeMounts": [{"name": "work", "mountPath": "/work"}]},
                {"name": "two", "image": IMAGE, "command": ["sh", "-c", "echo two >> /work/trail"],
                 "volumeMounts": [{"name": "work", "mountPath": "/work"}]}],
            "containers": [{"name": "main", "image": IMAGE,
                "command": ["sh", "-c", "cat /work/trail; echo $(POD) $TEAM $GREETING; hostname; pwd; id -u"],
                "workingDir": "/tmp",
                "securityContext": {"runAsUser": 65534},
                "env": [
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}}},
                    {"name": "GREETING", "value": "hi-$(POD)"}],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}]}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &init).await.unwrap();
    let init = wait_phase(&pods, "init", "Succeeded").await;
    let inits = init
        .status
        .as_ref()
        .unwrap()
        .init_container_statuses
        .clone()
        .unwrap();
    assert_eq!(inits.len(), 2);
    assert!(inits.iter().all(|s| {
        s.state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .exit_code
            == 0
    }));
    let log = container_log(&agent, &init, "main", 0);
    let lines: Vec<&str> = log
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .collect();
    assert_eq!(
        lines,
        ["one", "two", "init blue hi-init", "init", "/tmp", "65534"],
        "{log}"
    );

    // Probes: readiness by exec flips the Ready condition both ways; a tcpSocket probe
    // reaches the pod's port; a failing httpGet liveness probe restarts the container.
    let probed: Pod = serde_json::from_value(json!({
        "metadata": {"name": "probed"},
        "spec": {"terminationGracePeriodSeconds": 2, "containers": [
            {"name": "flips", "image": IMAGE,
             "command": ["sh", "-c", "sleep 2; touch /tmp/ready; sleep 4; rm /tmp/ready; exec sleep 3600"],
             "readinessProbe": {"exec": {"command": ["cat", "/tmp/ready"]},
                                "periodSeconds": 1, "failureThreshold": 1}},
            {"name": "web", "image": IMAGE,
             "command": ["sh", "-c", "mkdir -p /www; echo ok > /www/healthz; httpd -f -p 8080 -h /www & sleep 4; rm /www/healthz; exec sleep 3600"],
             "ports": [{"name": "http", "containerPort": 8080}],
             "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1},
             "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080},
                               "periodSeconds": 1, "failureThreshold": 2}}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &probed).await.unwrap();
    let ready_of = |pod: &Pod, name: &str| {
        pod.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.name == name))
            .map(|c| c.ready)
    };
    let early = wait_phase(&pods, "probed", "Running").await;
    assert_eq!(
        ready_of(&early, "flips"),
        Some(false),
        "not ready before its probe passes"
    );
    wait_until("readiness to pass", Duration::from_secs(20), async || {
        let p = pods.get("probed").await.ok()?;
        (ready_of(&p, "flips") == Some(true) && ready_of(&p, "web") == Some(true)).then_some(())
    })
    .await;
    wait_until(
        "readiness to fail again",
        Duration::from_secs(20),
        async || {
            let p = pods.get("probed").await.ok()?;
            let ready = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "Ready")?
                .status
                .clone();
            (ready_of(&p, "flips") == Some(false) && ready == "False").then_some(())
        },
    )
    .await;
    wait_until(
        "the liveness probe to restart the web container",
        Duration::from_secs(30),
        async || {
            let p = pods.get("probed").await.ok()?;
            let web = p
                .status?
                .container_statuses?
                .into_iter()
                .find(|c| c.name == "web")?;
            (web.restart_count >= 1).then_some(())
        },
    )
    .await;
    // Each probe failure is an Unhealthy event, the restart a Killing one (the kubelet's).
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(admin.clone(), "shop");
    let messages = wait_for("the probe events", async || {
        let listed = events
            .list(&kube::api::ListParams::default().fields("involvedObject.name=probed"))
            .await
            .ok()?;
        let messages: Vec<String> = listed
            .items
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e.reason.as_deref().unwrap_or(""),
                    e.message.as_deref().unwrap_or("")
                )
            })
            .collect();
        messages
            .iter()
            .any(|m| m == "Killing: Container web failed liveness probe, will be restarted")
            .then_some(messages)
    })
    .await;
    assert!(
        messages.iter().any(|m| m.starts_with(
            "Unhealthy: Liveness probe failed: HTTP probe failed with statuscode: 404"
        )),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("Unhealthy: Readiness probe failed")),
        "{messages:?}"
    );

    // What the agent cannot do safely yet is refused with upstream's reason, not run: a
    // subPath is resolved on the host through what the pod wrote into its volume.
    let sub_path: Pod = serde_json::from_value(json!({
        "metadata": {"name": "subpath"},
        "spec": {"volumes": [{"name": "v", "emptyDir": {}}],
            "containers": [{"name": "main", "image": IMAGE, "command": ["true"],
                "volumeMounts": [{"name": "v", "mountPath": "/data", "subPath": "evil"}]}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &sub_path)
        .await
        .unwrap();
    let refused = wait_until(
        "CreateContainerConfigError",
        Duration::from_secs(20),
        async || {
            let p = pods.get("subpath").await.ok()?;
            let waiting = p
                .status?
                .container_statuses?
                .first()?
                .state
                .clone()?
                .waiting?;
            (waiting.reason.as_deref() == Some("CreateContainerConfigError")).then_some(waiting)
        },
    )
    .await;
    assert!(refused.message.unwrap().contains("subPath"));

    // Graceful deletion: SIGTERM, the grace period, then the pod is gone with its sandbox.
    pods.create(
        &PostParams::default(),
        &pod(
            "graceful",
            "Always",
            "trap 'echo got TERM; exit 0' TERM; while true; do sleep 0.1; done",
        ),
    )
    .await
    .unwrap();
    let graceful = wait_phase(&pods, "graceful", "Running").await;
    let uid = graceful.metadata.uid.clone().unwrap();
    let netns = PathBuf::from(format!("/run/netns/canopy-{uid}"));
    assert!(netns.exists(), "the sandbox's network namespace is pinned");
    pods.delete("graceful", &DeleteParams::default())
        .await
        .unwrap();
    wait_until(
        "the deleted pod to be gone",
        Duration::from_secs(20),
        async || pods.get_opt("graceful").await.ok()?.is_none().then_some(()),
    )
    .await;
    assert!(!netns.exists(), "the sandbox is removed");
    assert!(
        !agent.root.join("pods").join(&uid).exists(),
        "the pod's volumes are removed"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&uid), "no mount of the pod is left");

    // A restarted agent adopts running containers instead of restarting them, and cleans up
    // after a pod deleted while it was down.
    let left: Pod = serde_json::from_value(json!({
        "metadata": {"name": "left-behind"},
        "spec": {"volumes": [{"name": "v", "emptyDir": {}}],
            "containers": [{"name": "main", "image": IMAGE, "command": ["sh", "-c", "echo hi; exec sleep 3600"],
                "volumeMounts": [{"name": "v", "mountPath": "/v"}]}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &left).await.unwrap();
    let left = wait_phase(&pods, "left-behind", "Running").await;
    let left_uid = left.metadata.uid.clone().unwrap();
    let before = pods
        .get(&web[0].metadata.name.clone().unwrap())
        .await
        .unwrap();
    let id_before = main_status(&before).container_id;
    let mut agent = agent;
    agent.kill();
    pods.delete("left-behind", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_until("the forced deletion", Duration::from_secs(10), async || {
        pods.get_opt("left-behind")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    // As a reboot would (runtime state lives on tmpfs), the sandbox goes and the pod's
    // volumes and logs on disk stay.
    agent.remove_sandbox(&left_uid);
    assert!(!PathBuf::from(format!("/run/netns/canopy-{left_uid}")).exists());
    assert!(agent.root.join("pods").join(&left_uid).exists());
    agent.spawn();
    wait_until(
        "the orphan's sandbox, volumes and logs to go",
        Duration::from_secs(20),
        async || {
            let gone = !PathBuf::from(format!("/run/netns/canopy-{left_uid}")).exists()
                && !agent.root.join("pods").join(&left_uid).exists()
                && !std::fs::read_dir(&agent.logs)
                    .unwrap()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(&left_uid));
            gone.then_some(())
        },
    )
    .await;
    // The new agent writes the status again only if something changed; give it time to
    // sync and check that nothing restarted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = pods
        .get(&web[0].metadata.name.clone().unwrap())
        .await
        .unwrap();
    let status = main_status(&after);
    assert_eq!(status.container_id, id_before, "{}", agent.log());
    assert_eq!(status.restart_count, 0);
    assert!(status.state.unwrap().running.is_some());
    // And it still controls them: scaling down stops one.
    let scale = json!({"spec": {"replicas": 1}});
    deployments
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&scale),
        )
        .await
        .unwrap();
    wait_until("scale down to 1 pod", Duration::from_secs(30), async || {
        let list = pods
            .list(&kube::api::ListParams::default().labels("app=web"))
            .await
            .ok()?;
        (list.items.len() == 1).then_some(())
    })
    .await;
}

/// `kubectl logs` through the API server: the agent streams the CRI log files, with
/// --tail, --timestamps, --previous and -f; tenants read only their own pods' logs, and
/// nobody but the API server may call the agent directly.
/// A VM may boot while its control plane restarts: an agent that cannot reach the API
/// server retries registering (as the kubelet does) and joins once it answers, instead of
/// giving up, or living on as a VM without a Node. The agent reaches the server through a
/// TCP relay that refuses connections at first, as a restarting server's address does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_joins_once_the_api_server_answers() {
    require_root_tools();
    let cluster = Cluster::with_scheduler(common::Backend::Embedded);
    let admin = cluster.client().await;
    let relay_port = canopy::procs::free_port().unwrap();
    let server_addr = cluster
        .url()
        .strip_prefix("https://")
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let direct = node_kubeconfig(&cluster, "node-late", Some("acme"));
    let relayed = cluster.data_dir().join("node-late-relayed.kubeconfig");
    let text = std::fs::read_to_string(&direct).unwrap();
    assert!(text.contains(cluster.url()));
    std::fs::write(
        &relayed,
        text.replace(cluster.url(), &format!("https://127.0.0.1:{relay_port}")),
    )
    .unwrap();
    let agent = Agent::start_from(&cluster, &relayed, "node-late", "acme", &[]);
    wait_for("the agent to retry registering", async || {
        (agent
            .log()
            .matches("registering the Node failed; retrying")
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    let nodes: Api<Node> = Api::all(admin.clone());
    assert!(nodes.get_opt("node-late").await.unwrap().is_none());

    let relay = tokio::net::TcpListener::bind(("127.0.0.1", relay_port))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = relay.accept().await {
            let server_addr = server_addr.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&server_addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let node = ready_node(&admin, &agent, "node-late").await;
    assert_eq!(
        node.metadata.labels.unwrap()["canopy.io/tenant"],
        "acme",
        "{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_through_the_api_server() {
    require_root_tools();
    let cluster = Cluster::with_scheduler(common::Backend::Embedded);
    let admin = cluster.client().await;
    let agent = Agent::start(&cluster, "node-logs", "acme");
    let node = ready_node(&admin, &agent, "node-logs").await;
    let pods = tenant_namespace(&admin, "shop", "acme").await;
    tenant_namespace(&admin, "rival", "globex").await;

    pods.create(
        &PostParams::default(),
        &pod(
            "talker",
            "Always",
            "for i in 1 2 3 4 5; do echo line $i; done; sleep 0.5; echo oops >&2; exec sleep 3600",
        ),
    )
    .await
    .unwrap();
    wait_phase(&pods, "talker", "Running").await;
    let logs = |args: &[&str]| {
        let mut all = vec!["-n", "shop", "logs"];
        all.extend_from_slice(args);
        cluster.kubectl_ok(&all)
    };
    let all = wait_until("the talker's output", Duration::from_secs(10), async || {
        let out = logs(&["talker"]);
        out.contains("oops").then_some(out)
    })
    .await;
    assert_eq!(all, "line 1\nline 2\nline 3\nline 4\nline 5\noops\n");
    assert_eq!(logs(&["talker", "--tail=2"]), "line 5\noops\n");
    assert_eq!(logs(&["talker", "--limit-bytes=9"]), "line 1\nli");
    let stamped = logs(&["talker", "--timestamps", "--tail=1"]);
    let (time, rest) = stamped.split_once(' ').unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(time).is_ok(),
        "{stamped}"
    );
    assert_eq!(rest, "oops\n");

    // The previous run of a restarted container.
    pods.create(
        &PostParams::default(),
        &pod("crasher", "Always", "echo run $$; exit 1"),
    )
    .await
    .unwrap();
    wait_until("a restart", Duration::from_secs(30), async || {
        let p = pods.get("crasher").await.ok()?;
        (p.status?.container_statuses?.first()?.restart_count >= 1).then_some(())
    })
    .await;
    assert!(logs(&["crasher", "--previous"]).starts_with("run "));
    let no_previous = cluster.kubectl(&["-n", "shop", "logs", "talker", "--previous"]);
    assert!(!no_previous.status.success());
    assert!(
        String::from_utf8_lossy(&no_previous.stderr).contains("previous terminated container"),
        "{}",
        String::from_utf8_lossy(&no_previous.stderr)
    );

    // -f follows until the container ends.
    pods.create(
        &PostParams::default(),
        &pod(
            "counter",
            "Never",
            "sleep 1; for i in 1 2 3 4 5; do echo tick $i; sleep 0.3; done",
        ),
    )
    .await
    .unwrap();
    wait_phase(&pods, "counter", "Running").await;
    let follow = std::process::Command::new(common::kubectl_bin())
        .args(["-n", "shop", "logs", "-f", "counter"])
        .env("KUBECONFIG", cluster.kubeconfig())
        .output()
        .unwrap();
    assert!(
        follow.status.success(),
        "{}",
        String::from_utf8_lossy(&follow.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&follow.stdout),
        "tick 1\ntick 2\ntick 3\ntick 4\ntick 5\n"
    );

    // Tenants: their own pods' logs only.
    let alice = cluster.user_kubeconfig("alice", Some("canopy:tenant:acme"));
    let bob = cluster.user_kubeconfig("bob", Some("canopy:tenant:globex"));
    let as_user = |kubeconfig: &Path| {
        std::process::Command::new(common::kubectl_bin())
            .args(["-n", "shop", "logs", "talker", "--tail=1"])
            .env("KUBECONFIG", kubeconfig)
            .output()
            .unwrap()
    };
    let mine = as_user(&alice);
    assert_eq!(String::from_utf8_lossy(&mine.stdout), "oops\n");
    let theirs = as_user(&bob);
    assert!(!theirs.status.success());
    assert!(
        String::from_utf8_lossy(&theirs.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&theirs.stderr)
    );

    // The agent itself answers only the API server: not a node, not a tenant, not even a
    // cluster administrator's kubeconfig.
    let port = node
        .status
        .unwrap()
        .daemon_endpoints
        .unwrap()
        .kubelet_endpoint
        .unwrap()
        .port;
    let url = format!("https://127.0.0.1:{port}/containerLogs/shop/talker/main");
    for (who, kubeconfig) in [
        (
            "a node",
            node_kubeconfig(&cluster, "node-logs", Some("acme")),
        ),
        ("a tenant member", alice.clone()),
        ("an administrator", cluster.kubeconfig().to_path_buf()),
    ] {
        let client = identity_client(&pem_of_kubeconfig(&kubeconfig));
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 403, "{who}");
    }
    let pki = cluster.data_dir().join("pki");
    let mut api_server = std::fs::read(pki.join("apiserver-node-client.crt")).unwrap();
    api_server.extend(std::fs::read(pki.join("apiserver-node-client.key")).unwrap());
    let response = identity_client(&api_server).get(&url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200, "the API server's identity");
    assert_eq!(
        response.text().await.unwrap(),
        "line 1\nline 2\nline 3\nline 4\nline 5\noops\n"
    );
    // Without a client certificate there is no handshake at all.
    let anonymous = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    assert!(anonymous.get(&url).send().await.is_err());
}

/// A kubeconfig's client certificate and key, as one PEM.
fn pem_of_kubeconfig(kubeconfig: &Path) -> Vec<u8> {
    use base64::Engine;
    let text = std::fs::read_to_string(kubeconfig).unwrap();
    let value: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let user = &value["users"][0]["user"];
    let decode = |field: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(user[field].as_str().unwrap())
            .unwrap()
    };
    let mut pem = decode("client-certificate-data");
    pem.extend(decode("client-key-data"));
    pem
}

/// An HTTPS client with a client certificate that accepts any server certificate (the
/// agent's is self-signed; the API server pins it).
fn identity_client(pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .identity(reqwest::Identity::from_pem(pem).unwrap())
        .build()
        .unwrap()
}

/// A node's credential names its tenant; it can register its Node for that tenant only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_labels_itself_only_with_its_credentials_tenant() {
    let cluster = Cluster::start(common::Backend::Embedded);
    let node_for = |name: &str, tenant: Option<&str>| node_kubeconfig(&cluster, name, tenant);
    let create = async |kubeconfig: PathBuf, name: &str, tenant: &str| {
        let client = client_for(&kubeconfig).await;
        let node: Node = serde_json::from_value(
            json!({"metadata": {"name": name, "labels": {"canopy.io/tenant": tenant}}}),
        )
        .unwrap();
        Api::<Node>::all(client)
            .create(&PostParams::default(), &node)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                kube::Error::Api(s) => s.code,
                other => panic!("{other}"),
            })
    };
    assert_eq!(
        create(node_for("n1", Some("acme")), "n1", "acme").await,
        Ok(())
    );
    assert_eq!(
        create(node_for("n2", Some("acme")), "n2", "globex").await,
        Err(403),
        "another tenant than the credential's"
    );
    assert_eq!(
        create(node_for("n3", None), "n3", "acme").await,
        Err(403),
        "a credential that names no tenant"
    );
    // Once labelled, not even its own credential's tenant list moves it.
    let client = client_for(&node_for("n1", Some("globex"))).await;
    let patch = json!({"metadata": {"labels": {"canopy.io/tenant": "globex"}}});
    let err = Api::<Node>::all(client)
        .patch(
            "n1",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 403));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_read_config_maps_secrets_and_the_downward_api() {
    require_root_tools();
    let cluster = Cluster::with_scheduler(common::Backend::Embedded);
    let admin = cluster.client().await;
    let agent = Agent::start(&cluster, "node-cfg", "acme");
    ready_node(&admin, &agent, "node-cfg").await;
    let pods = tenant_namespace(&admin, "conf", "acme").await;
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), "conf");
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "conf");
    let config_map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "settings"},
        "data": {"greeting": "hello", "color": "blue"}
    }))
    .unwrap();
    config_maps
        .create(&PostParams::default(), &config_map)
        .await
        .unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "creds"},
        "stringData": {"password": "hunter2", "token": "t0k"}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    // Everything through files and variables; the container prints what it sees, then
    // keeps printing the greeting file so that an update shows in its log.
    let script = r#"
        echo "env greeting=$GREETING password=$PASSWORD color=$CFG_color"
        echo "file greeting=$(cat /etc/settings/greeting) color=$(cat /etc/settings/color)"
        echo "item=$(cat /etc/items/conf/hello.txt) others=$(ls /etc/items)"
        echo "secret=$(cat /etc/creds/password) mode=$(stat -L -c %a /etc/creds/password)"
        echo "labels=$(cat /etc/podinfo/labels | tr '\n' ' ') name=$(cat /etc/podinfo/name)"
        echo "projected=$(cat /etc/all/greeting)/$(cat /etc/all/token)/$(cat /etc/all/mem)"
        touch /etc/settings/x 2>/dev/null && echo writable || echo read-only
        while true; do echo "now greeting=$(cat /etc/settings/greeting)"; sleep 0.2; done
    "#;
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": "reader", "labels": {"app": "reader", "tier": "x"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "volumes": [
                {"name": "settings", "configMap": {"name": "settings"}},
                {"name": "items", "configMap": {"name": "settings",
                    "items": [{"key": "greeting", "path": "conf/hello.txt"}]}},
                {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 256}},
                {"name": "podinfo", "downwardAPI": {"items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
                {"name": "all", "projected": {"sources": [
                    {"configMap": {"name": "settings", "items": [{"key": "greeting", "path": "greeting"}]}},
                    {"secret": {"name": "creds", "items": [{"key": "token", "path": "token"}]}},
                    {"downwardAPI": {"items": [{"path": "mem", "resourceFieldRef": {
                        "containerName": "main", "resource": "limits.memory", "divisor": "1Mi"}}]}}]}}
            ],
            "containers": [{"name": "main", "image": IMAGE, "command": ["sh", "-c", script],
                "resources": {"limits": {"memory": "48Mi"}},
                "env": [
                    {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}}
                ],
                "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
                "volumeMounts": [
                    {"name": "settings", "mountPath": "/etc/settings"},
                    {"name": "items", "mountPath": "/etc/items"},
                    {"name": "creds", "mountPath": "/etc/creds"},
                    {"name": "podinfo", "mountPath": "/etc/podinfo"},
                    {"name": "all", "mountPath": "/etc/all"}
                ]}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
    let running = wait_phase(&pods, "reader", "Running").await;
    let log = wait_until("the reader's report", Duration::from_secs(20), async || {
        let log = container_log(&agent, &running, "main", 0);
        log.contains("now greeting=").then_some(log)
    })
    .await;
    for line in [
        "env greeting=hello password=hunter2 color=blue",
        "file greeting=hello color=blue",
        "item=hello others=conf",
        "secret=hunter2 mode=400",
        r#"labels=app="reader" canopy.io/tenant="acme" tier="x" name=reader"#,
        "projected=hello/t0k/48",
        "read-only",
    ] {
        assert!(log.contains(line), "{line:?} missing from:\n{log}");
    }
    // Secrets, and whatever may hold one, live on tmpfs, never on the node's disk.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let uid = running.metadata.uid.clone().unwrap();
    for plugin in ["secret", "downward-api", "projected"] {
        assert!(
            mounts.lines().any(|l| l.starts_with("tmpfs ")
                && l.contains(&uid)
                && l.contains(&format!("kubernetes.io~{plugin}"))),
            "no tmpfs for the {plugin} volume"
        );
    }

    // An update reaches the files (not the environment) when the pod is synced next.
    let patch = json!({"data": {"greeting": "bonjour"}});
    config_maps
        .patch(
            "settings",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let touch = json!({"metadata": {"annotations": {"touched": "1"}}});
    pods.patch(
        "reader",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&touch),
    )
    .await
    .unwrap();
    wait_until(
        "the updated greeting in the volume",
        Duration::from_secs(20),
        async || {
            container_log(&agent, &running, "main", 0)
                .contains("now greeting=bonjour")
                .then_some(())
        },
    )
    .await;

    // A missing ConfigMap holds the container back with upstream's reason until it exists.
    let waiting: Pod = serde_json::from_value(json!({
        "metadata": {"name": "waits"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "main", "image": IMAGE,
            "command": ["sh", "-c", "echo late=$LATE; exec sleep 3600"],
            "env": [{"name": "LATE", "valueFrom": {"configMapKeyRef": {"name": "later", "key": "v"}}}]}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &waiting).await.unwrap();
    let stuck = wait_until(
        "CreateContainerConfigError",
        Duration::from_secs(30),
        async || {
            let p = pods.get("waits").await.ok()?;
            let status = p.status?.container_statuses?.into_iter().next()?;
            let w = status.state?.waiting?;
            (w.reason.as_deref() == Some("CreateContainerConfigError")).then_some(w)
        },
    )
    .await;
    assert_eq!(
        stuck.message.as_deref(),
        Some(r#"configmap "later" not found"#)
    );
    let later: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "later"}, "data": {"v": "here"}}))
            .unwrap();
    config_maps
        .create(&PostParams::default(), &later)
        .await
        .unwrap();
    let started = wait_phase(&pods, "waits", "Running").await;
    wait_until("the late value", Duration::from_secs(10), async || {
        container_log(&agent, &started, "main", 0)
            .contains("late=here")
            .then_some(())
    })
    .await;

    // hostPath is for the platform's pods: refused in a tenant's namespace, whoever asks.
    let host_path: Pod = serde_json::from_value(json!({
        "metadata": {"name": "escape"},
        "spec": {"volumes": [{"name": "root", "hostPath": {"path": "/"}}],
            "containers": [{"name": "main", "image": IMAGE}]}
    }))
    .unwrap();
    let err = pods
        .create(&PostParams::default(), &host_path)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403 && s.message.contains("hostPath")),
        "{err}"
    );
    // In a platform namespace, the admin's pod gets the node's directory.
    let shared = cluster.data_dir().join("shared-host-dir");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("note"), "from the node").unwrap();
    let platform_pods = platform_namespace(&admin).await;
    let host_reader: Pod = serde_json::from_value(json!({
        "metadata": {"name": "host-reader"},
        "spec": {"nodeName": "node-cfg", "restartPolicy": "Never",
            "volumes": [{"name": "h", "hostPath": {"path": shared.display().to_string(), "type": "Directory"}}],
            "containers": [{"name": "main", "image": IMAGE, "command": ["sh", "-c", "cat /host/note"],
                "volumeMounts": [{"name": "h", "mountPath": "/host"}]}]}
    }))
    .unwrap();
    platform_pods
        .create(&PostParams::default(), &host_reader)
        .await
        .unwrap();
    let done = wait_phase(&platform_pods, "host-reader", "Succeeded").await;
    assert!(container_log(&agent, &done, "main", 0).contains("from the node"));

    // Deleting the pod unmounts its tmpfs volumes.
    pods.delete("reader", &DeleteParams::default())
        .await
        .unwrap();
    wait_until(
        "the reader to be gone",
        Duration::from_secs(30),
        async || {
            pods.get_opt("reader")
                .await
                .ok()
                .and_then(|p| p.is_none().then_some(()))
        },
    )
    .await;
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(&uid),
        "mounts of the deleted pod remain:\n{mounts}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reads_only_the_objects_its_pods_reference() {
    let cluster = Cluster::start(common::Backend::Embedded);
    let admin = cluster.client().await;
    let nodes: Api<Node> = Api::all(admin.clone());
    for name in ["n1", "n2"] {
        let node: Node = serde_json::from_value(
            json!({"metadata": {"name": name, "labels": {"canopy.io/tenant": "acme"}}}),
        )
        .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }
    let pods = tenant_namespace(&admin, "app", "acme").await;
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), "app");
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "app");
    for name in ["used", "unused", "elsewhere"] {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": "v"}}))
                .unwrap();
        config_maps
            .create(&PostParams::default(), &cm)
            .await
            .unwrap();
        let s: Secret =
            serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"k": "v"}}))
                .unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    let bound = |name: &str, node: &str, refs: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node,
                "volumes": [{"name": "s", "secret": {"secretName": refs}}],
                "containers": [{"name": "c", "image": IMAGE,
                    "envFrom": [{"configMapRef": {"name": refs}}]}]}
        }))
        .unwrap()
    };
    pods.create(&PostParams::default(), &bound("p1", "n1", "used"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &bound("p2", "n2", "elsewhere"))
        .await
        .unwrap();

    let node_client = client_for(&node_kubeconfig(&cluster, "n1", Some("acme"))).await;
    fn code<T>(r: Result<T, kube::Error>) -> u16 {
        match r {
            Ok(_) => 200,
            Err(kube::Error::Api(s)) => s.code,
            Err(other) => panic!("{other}"),
        }
    }
    let node_cms: Api<ConfigMap> = Api::namespaced(node_client.clone(), "app");
    let node_secrets: Api<Secret> = Api::namespaced(node_client.clone(), "app");
    let read = node_secrets.get("used").await.unwrap();
    assert_eq!(read.data.unwrap()["k"].0, b"v");
    assert_eq!(code(node_cms.get("used").await), 200);
    for name in ["unused", "elsewhere", "missing"] {
        assert_eq!(code(node_cms.get(name).await), 403, "configmap {name}");
        assert_eq!(code(node_secrets.get(name).await), 403, "secret {name}");
    }
    // Nothing but a get by name: no lists, watches or writes.
    assert_eq!(code(node_secrets.list(&Default::default()).await), 403);
    assert_eq!(code(node_cms.list(&Default::default()).await), 403);
    let patch = json!({"data": {"k": "dg=="}});
    assert_eq!(
        code(
            node_secrets
                .patch(
                    "used",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch)
                )
                .await
        ),
        403
    );
    assert_eq!(
        code(node_secrets.delete("used", &DeleteParams::default()).await),
        403
    );
    // The right ends with the pod.
    pods.delete("p1", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_until(
        "the node to lose access with its pod",
        Duration::from_secs(10),
        async || (code(node_secrets.get("used").await) == 403).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_port_forward_through_the_api_server() {
    use futures::SinkExt;
    use kube::api::AttachParams;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    require_root_tools();
    let cluster = Cluster::with_scheduler(common::Backend::Embedded);
    let admin = cluster.client().await;
    let agent = Agent::start(&cluster, "node-exec", "acme");
    ready_node(&admin, &agent, "node-exec").await;
    let pods = tenant_namespace(&admin, "shop", "acme").await;
    tenant_namespace(&admin, "rival", "globex").await;
    // A web server on the pod's loopback (pods have no other network until the cloud
    // controller gives them NICs) and a second container.
    let web: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [
            {"name": "httpd", "image": IMAGE, "command": ["sh", "-c",
                "mkdir -p /www && echo hello from the pod > /www/index.html && exec httpd -f -p 8080 -h /www"]},
            {"name": "side", "image": IMAGE, "command": ["sleep", "3600"]}
        ]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &web).await.unwrap();
    wait_phase(&pods, "web", "Running").await;
    wait_until(
        "both containers running",
        Duration::from_secs(20),
        async || {
            let p = pods.get("web").await.ok()?;
            let statuses = p.status?.container_statuses?;
            statuses
                .iter()
                .all(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()))
                .then_some(())
        },
    )
    .await;

    // kubectl exec: output, exit codes, stdin, container choice, upstream's errors.
    let exec_with = |websockets: &str, args: &[&str], input: Option<&str>| {
        let mut all = vec!["-n", "shop", "exec"];
        all.extend_from_slice(args);
        let mut child = std::process::Command::new(common::kubectl_bin())
            .args(&all)
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = input {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    };
    let exec = |args: &[&str], input: Option<&str>| exec_with("true", args, input);
    let out = exec(
        &["web", "-c", "httpd", "--", "cat", "/www/index.html"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from the pod\n");
    let out = exec(
        &[
            "web",
            "-c",
            "side",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "kubectl exits with the command's code"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err"));
    let out = exec(
        &[
            "-i",
            "web",
            "-c",
            "side",
            "--",
            "sh",
            "-c",
            "tr a-z A-Z; echo done",
        ],
        Some("piped in\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PIPED IN\ndone\n");
    let out = exec(&["web", "-c", "nope", "--", "true"], None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("container nope is not valid for pod web"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // kubectl before 1.30 (or with WebSockets off) speaks SPDY: the same through it.
    let out = exec_with(
        "false",
        &[
            "web",
            "-c",
            "side",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 5",
        ],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err"));
    let out = exec_with(
        "false",
        &["-i", "web", "-c", "side", "--", "sh", "-c", "tr a-z A-Z"],
        Some("over spdy\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OVER SPDY\n");

    // kube-rs over WebSocket: a terminal with a size.
    let mut session = pods
        .exec(
            "web",
            [
                "sh",
                "-c",
                "stty size; tty >/dev/null && echo on a tty; read line; echo got $line",
            ],
            &AttachParams::interactive_tty().container("side"),
        )
        .await
        .unwrap();
    let mut resize = session.terminal_size().unwrap();
    resize
        .send(kube::api::TerminalSize {
            width: 100,
            height: 40,
        })
        .await
        .unwrap();
    // The size must be set before the command reads it: give the resize a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut stdin = session.stdin().unwrap();
    stdin.write_all(b"hi there\r").await.unwrap();
    let mut stdout = session.stdout().unwrap();
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !seen.contains("got hi there") && std::time::Instant::now() < deadline {
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_secs(5), stdout.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Ok(Err(e)) => panic!("{e}"),
        }
    }
    assert!(seen.contains("on a tty"), "{seen:?}");
    assert!(seen.contains("got hi there"), "{seen:?}");
    let status = session.take_status().unwrap().await.unwrap();
    assert_eq!(status.status.as_deref(), Some("Success"), "{status:?}");

    // Port-forward (kube-rs's WebSocket protocol) to the pod's loopback.
    let mut forwarder = pods.portforward("web", &[8080]).await.unwrap();
    let mut stream = forwarder.take_stream(8080).unwrap();
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with("hello from the pod\n"), "{response}");
    drop(stream);
    // The agent ends the stream once the pod closed the connection, as the kubelet does;
    // kube-rs may then report that it could not send its own close.
    let _ = forwarder.join().await;

    // Another tenant, a node and an anonymous caller cannot open streams into the pod.
    let bob = client_for(&cluster.user_kubeconfig("bob", Some("canopy:tenant:globex"))).await;
    let node = client_for(&node_kubeconfig(&cluster, "node-exec", Some("acme"))).await;
    for (who, client) in [("another tenant", bob), ("the node", node)] {
        let theirs: Api<Pod> = Api::namespaced(client, "shop");
        let err = theirs
            .exec("web", ["true"], &AttachParams::default().container("side"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{who} could exec"));
        assert!(format!("{err:?}").contains("403"), "{who}: {err:?}");
        assert!(
            theirs.portforward("web", &[8080]).await.is_err(),
            "{who} could port-forward"
        );
    }
    let alice = client_for(&cluster.user_kubeconfig("alice", Some("canopy:tenant:acme"))).await;
    let own: Api<Pod> = Api::namespaced(alice, "shop");
    let mut mine = own
        .exec(
            "web",
            ["echo", "mine"],
            &AttachParams::default().container("side").stderr(false),
        )
        .await
        .unwrap();
    let mut out = String::new();
    mine.stdout()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    assert_eq!(out, "mine\n");
    // An exec with no upgrade is refused with upstream's words.
    let plain = cluster.kubectl(&[
        "get",
        "--raw",
        "/api/v1/namespaces/shop/pods/web/exec?command=true&stdout=true",
    ]);
    assert!(!plain.status.success());
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("Upgrade request required"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
}

/// `kubectl port-forward` to a pod's loopback port, fetched through the local port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_port_forward() {
    require_root_tools();
    let cluster = Cluster::with_scheduler(common::Backend::Embedded);
    let admin = cluster.client().await;
    let agent = Agent::start(&cluster, "node-pf", "acme");
    ready_node(&admin, &agent, "node-pf").await;
    let pods = tenant_namespace(&admin, "shop", "acme").await;
    let web: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [
            {"name": "httpd", "image": IMAGE, "command": ["sh", "-c",
                "mkdir -p /www && echo forwarded > /www/index.html && exec httpd -f -p 8080 -h /www"]}
        ]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &web).await.unwrap();
    wait_phase(&pods, "web", "Running").await;
    // kubectl 1.31+ tunnels SPDY through a WebSocket; with the tunnel off (as older kubectl)
    // it upgrades to SPDY directly. Several connections go over each session.
    for (how, tunnel) in [("tunnelled", "true"), ("plain SPDY", "false")] {
        let local = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let forward_log = cluster
            .data_dir()
            .join(format!("port-forward-{tunnel}.log"));
        let _forward = Child(
            std::process::Command::new(common::kubectl_bin())
                .args([
                    "-n",
                    "shop",
                    "port-forward",
                    "pod/web",
                    &format!("{local}:8080"),
                ])
                .env("KUBECONFIG", cluster.kubeconfig())
                .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", tunnel)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&forward_log).unwrap())
                .spawn()
                .unwrap(),
        );
        for round in 0..3 {
            let body = wait_until(
                &format!("a page through the forwarded port ({how}, round {round})"),
                Duration::from_secs(20),
                async || {
                    let response = reqwest::get(format!("http://127.0.0.1:{local}/index.html"))
                        .await
                        .ok()?;
                    response.text().await.ok()
                },
            )
            .await;
            assert_eq!(
                body,
                "forwarded\n",
                "{how}; kubectl:\n{}",
                std::fs::read_to_string(&forward_log).unwrap_or_default()
            );
        }
    }
    // A port nobody listens on: the connection fails and kubectl reports the pod's error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stderr_path = cluster.data_dir().join("port-forward.stderr");
    let _failing = Child(
        std::process::Command::new(common::kubectl_bin())
            .args([
                "-n",
                "shop",
                "port-forward",
                "pod/web",
                &format!("{closed}:9"),
            ])
            .env("KUBECONFIG", cluster.kubeconfig())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut connection = wait_until("the listener", Duration::from_secs(20), async || {
        tokio::net::TcpStream::connect(("127.0.0.1", closed))
            .await
            .ok()
    })
    .await;
    // kubectl closes the local connection once the pod's side failed.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut connection, &mut rest),
    )
    .await;
    let stderr = wait_until("kubectl's error", Duration::from_secs(10), async || {
        let text = std::fs::read_to_string(&stderr_path).ok()?;
        text.contains("error forwarding port 9").then_some(text)
    })
    .await;
    assert!(stderr.contains("refused"), "{stderr}");
}

/// `kubectl run -i` (attach with stdin once), `kubectl attach` to running output, and a
/// terminal through kube-rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_run_and_attach() {
    use kube::api::AttachParams;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    require_root_tools();
    let cluster = Cluster::with_scheduler(common::Backend::Embedded);
    let admin = cluster.client().await;
    let agent = Agent::start(&cluster, "node-attach", "acme");
    ready_node(&admin, &agent, "node-attach").await;
    let pods = tenant_namespace(&admin, "shop", "acme").await;

    // kubectl run -i: the pod gets stdin (once), kubectl attaches and feeds it.
    let mut run = std::process::Command::new(common::kubectl_bin())
        .args([
            "-n",
            "shop",
            "run",
            "reader",
            "-i",
            "--rm",
            "--restart=Never",
            "--image",
            IMAGE,
            "--",
            "sh",
            "-c",
            "read line; echo got: $line; read more || echo stdin closed",
        ])
        .env("KUBECONFIG", cluster.kubeconfig())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut input = run.stdin.take().unwrap();
        input.write_all(b"from kubectl\n").unwrap();
    }
    let out = tokio::task::spawn_blocking(move || run.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("got: from kubectl"), "{stdout}");
    assert!(stdout.contains("stdin closed"), "{stdout}");
    wait_until(
        "--rm to delete the pod",
        Duration::from_secs(30),
        async || {
            pods.get_opt("reader")
                .await
                .ok()
                .and_then(|p| p.is_none().then_some(()))
        },
    )
    .await;

    // kubectl attach (here over SPDY): what the container prints from now on.
    pods.create(
        &PostParams::default(),
        &pod(
            "ticker",
            "Always",
            "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done",
        ),
    )
    .await
    .unwrap();
    wait_phase(&pods, "ticker", "Running").await;
    let log = cluster.data_dir().join("attach.out");
    let attached = Child(
        std::process::Command::new(common::kubectl_bin())
            .args(["-n", "shop", "attach", "ticker"])
            .env("KUBECONFIG", cluster.kubeconfig())
            // As kubectl before 1.30: over SPDY.
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(
        "ticks through kubectl attach",
        Duration::from_secs(20),
        async || {
            let text = std::fs::read_to_string(&log).ok()?;
            (text.matches("tick ").count() >= 3).then_some(())
        },
    )
    .await;
    drop(attached);

    // A shell on a terminal (tty and stdin in the spec), driven through kube-rs.
    let shell: Pod = serde_json::from_value(json!({
        "metadata": {"name": "shell"},
        "spec": {"terminationGracePeriodSeconds": 1, "restartPolicy": "Never",
            "containers": [{"name": "main", "image": IMAGE, "command": ["sh"],
                "stdin": true, "tty": true}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &shell).await.unwrap();
    wait_phase(&pods, "shell", "Running").await;
    let mut session = pods
        .attach("shell", &AttachParams::interactive_tty())
        .await
        .unwrap();
    let mut stdin = session.stdin().unwrap();
    let mut stdout = session.stdout().unwrap();
    stdin
        .write_all(b"tty >/dev/null && echo on a ter''minal; exit 3\r")
        .await
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    while !seen.contains("on a terminal") {
        match tokio::time::timeout(Duration::from_secs(10), stdout.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            other => panic!("no shell output ({other:?}): {seen:?}"),
        }
    }
    let done = wait_phase(&pods, "shell", "Failed").await;
    let terminated = main_status(&done).state.unwrap().terminated.unwrap();
    assert_eq!(terminated.exit_code, 3);
    // The session ends with the container.
    let _ = tokio::time::timeout(Duration::from_secs(10), session.join()).await;
    assert!(container_log(&agent, &done, "main", 0).contains("on a terminal"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_a_projected_service_account_token() {
    let (cluster, admin, agent) = cluster_with_node("node-sa", &[]).await;
    let pods = tenant_namespace(&admin, "sa", "acme").await;
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(admin.clone(), "sa");
    let robot = serde_json::from_value(json!({"metadata": {"name": "robot"}})).unwrap();
    accounts
        .create(&PostParams::default(), &robot)
        .await
        .unwrap();
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": "holder"},
        "spec": {
            "serviceAccountName": "robot",
            "terminationGracePeriodSeconds": 1,
            "volumes": [{"name": "token", "projected": {"sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 600}},
                {"serviceAccountToken": {"path": "vault-token", "audience": "vault"}}]}}],
            "containers": [{"name": "main", "image": IMAGE, "command": ["sh", "-c",
                "echo token=$(cat /var/run/secrets/tokens/token); echo mode=$(stat -L -c %a /var/run/secrets/tokens/token); echo vault=$(cat /var/run/secrets/tokens/vault-token); sleep 3600"],
                "volumeMounts": [{"name": "token", "mountPath": "/var/run/secrets/tokens"}]}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
    let running = wait_phase(&pods, "holder", "Running").await;
    let log = wait_for("the pod to print its tokens", async || {
        let log = container_log(&agent, &running, "main", 0);
        log.contains("vault=").then_some(log)
    })
    .await;
    let field = |name: &str| {
        log.lines()
            .find_map(|l| {
                l.split_once(&format!("{name}="))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {name} in {log}"))
    };
    let (token, vault) = (field("token"), field("vault"));
    assert_eq!(token.split('.').count(), 3, "{log}");
    assert_eq!(field("mode"), "644");
    assert_ne!(token, vault);

    // The pod's token is the service account's, for the API; the other audience's is not.
    let as_pod = common::token_client(cluster.kubeconfig(), &token).await;
    let (code, _, body) =
        common::raw(&as_pod, "GET", "/api/v1/namespaces/sa/pods", None, vec![]).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("system:serviceaccount:sa:robot")
    );
    let as_vault = common::token_client(cluster.kubeconfig(), &vault).await;
    assert_eq!(
        common::raw(&as_vault, "GET", "/api", None, vec![]).await.0,
        401
    );

    // Deleting the pod ends its token.
    pods.delete("holder", &DeleteParams::default())
        .await
        .unwrap();
    wait_until(
        "the deleted pod's token to stop authenticating",
        Duration::from_secs(30),
        async || (common::raw(&as_pod, "GET", "/api", None, vec![]).await.0 == 401).then_some(()),
    )
    .await;

    // The agent told the story as the kubelet does, in Events about the pod.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(admin.clone(), "sa");
    let reasons = wait_for("the agent's events about the pod", async || {
        let listed = events
            .list(&kube::api::ListParams::default().fields("involvedObject.name=holder"))
            .await
            .ok()?;
        let reasons: Vec<(String, String, String)> = listed
            .items
            .iter()
            .map(|e| {
                (
                    e.reason.clone().unwrap_or_default(),
                    e.message.clone().unwrap_or_default(),
                    e.source
                        .as_ref()
                        .and_then(|s| s.component.clone())
                        .unwrap_or_default(),
                )
            })
            .collect();
        reasons
            .iter()
            .any(|(r, _, _)| r == "Killing")
            .then_some(reasons)
    })
    .await;
    for (reason, message) in [
        (
            "Pulled",
            format!("Container image \"{IMAGE}\" already present on machine"),
        ),
        ("Created", "Created container: main".to_string()),
        ("Started", "Started container main".to_string()),
        ("Killing", "Stopping container main".to_string()),
    ] {
        assert!(
            reasons
                .iter()
                .any(|(r, m, from)| r == reason && *m == message && from == "kubelet"),
            "no {reason} event {message:?} in {reasons:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_image_restarts_the_container() {
    let (_cluster, admin, agent) = cluster_with_node("node-img", &[]).await;
    const OTHER: &str = "canopy.test/busybox:other";
    common::import_busybox(&agent.root, OTHER);
    let pods = tenant_namespace(&admin, "img", "acme").await;
    pods.create(
        &PostParams::default(),
        &pod("web", "Always", "exec sleep 3600"),
    )
    .await
    .unwrap();
    let before = main_status(&wait_phase(&pods, "web", "Running").await);

    // `kubectl set image pod/web main=...`: the one container field a pod may change.
    let patch = json!({"spec": {"containers": [{"name": "main", "image": OTHER}]}});
    pods.patch(
        "web",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Strategic(&patch),
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        let status = main_status(&pods.get("web").await.unwrap());
        if status.restart_count == 1
            && status.container_id != before.container_id
            && status
                .state
                .as_ref()
                .and_then(|s| s.running.as_ref())
                .is_some()
        {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the container did not run again from its new definition: {status:?}\nagent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(after.image, OTHER);
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(admin.clone(), "img");
    wait_for("the restart's event", async || {
        events
            .list(&kube::api::ListParams::default().fields("involvedObject.name=web"))
            .await
            .ok()?
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("Killing")
                    && e.message.as_deref()
                        == Some("Container main definition changed, will be restarted")
            })
            .then_some(())
    })
    .await;
    // Nothing else changes: the container is not restarted again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        main_status(&pods.get("web").await.unwrap()).restart_count,
        1
    );
    pods.delete("web", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_stop_hooks_run_before_the_container_stops() {
    let (cluster, admin, agent) = cluster_with_node("node-hook", &[]).await;
    // The hook leaves its mark in a node directory (a platform pod's hostPath), which outlives
    // the pod; the container records SIGTERM there too, so the order shows.
    let shared = cluster.data_dir().join("hook-dir");
    std::fs::create_dir_all(&shared).unwrap();
    let pods = platform_namespace(&admin).await;
    let hooked: Pod = serde_json::from_value(json!({
        "metadata": {"name": "hooked"},
        "spec": {"nodeName": "node-hook", "terminationGracePeriodSeconds": 10,
            "volumes": [{"name": "h", "hostPath": {"path": shared.display().to_string(), "type": "Directory"}}],
            "containers": [{"name": "main", "image": IMAGE,
                "command": ["sh", "-c", "trap 'echo term >> /host/order; exit 0' TERM; while true; do sleep 0.1; done"],
                "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "echo prestop >> /host/order"]}}},
                "volumeMounts": [{"name": "h", "mountPath": "/host"}]}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &hooked).await.unwrap();
    wait_phase(&pods, "hooked", "Running").await;
    pods.delete("hooked", &DeleteParams::default())
        .await
        .unwrap();
    wait_until("the pod to be gone", Duration::from_secs(30), async || {
        pods.get_opt("hooked")
            .await
            .ok()
            .and_then(|p| p.is_none().then_some(()))
    })
    .await;
    let order = std::fs::read_to_string(shared.join("order")).unwrap_or_default();
    assert_eq!(order, "prestop\nterm\n", "agent log:\n{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_logs_rotate_and_follow_goes_on() {
    let (_cluster, admin, agent) = cluster_with_node(
        "node-logs",
        &[
            "--container-log-max-size",
            "4Ki",
            "--container-log-max-files",
            "3",
            "--container-log-monitor-interval",
            "200ms",
        ],
    )
    .await;
    let pods = tenant_namespace(&admin, "logs", "acme").await;
    // About 20 KB/s of numbered lines: several rotations a second.
    let script = "i=0; while true; do echo \"line $i ....................................................\"; i=$((i+1)); sleep 0.003; done";
    pods.create(&PostParams::default(), &pod("chatty", "Always", script))
        .await
        .unwrap();
    let running = wait_phase(&pods, "chatty", "Running").await;

    // A follower reads on across rotations and misses no line.
    use futures::{AsyncBufReadExt, TryStreamExt};
    let params = kube::api::LogParams {
        follow: true,
        ..Default::default()
    };
    let mut lines = pods.log_stream("chatty", &params).await.unwrap().lines();
    let mut numbers = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < deadline {
        let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_secs(5), lines.try_next()).await
        else {
            panic!("the follow stream stalled after {} lines", numbers.len());
        };
        if let Some(n) = line
            .strip_prefix("line ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
        {
            numbers.push(n);
        }
    }
    assert!(numbers.len() > 200, "only {} lines followed", numbers.len());
    for pair in numbers.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "a gap in the followed lines");
    }

    // On disk: the current file and at most two rotated ones, none much past the limit.
    let dir = agent
        .logs
        .join(format!(
            "logs_chatty_{}",
            running.metadata.uid.as_deref().unwrap()
        ))
        .join("main");
    // (A listing can fall between a rotation's rename and its pruning: look a few times.)
    let list = || -> Vec<(String, u64)> {
        std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                Some((e.file_name().into_string().ok()?, e.metadata().ok()?.len()))
            })
            .collect()
    };
    let mut files = list();
    for _ in 0..20 {
        if files.len() <= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        files = list();
    }
    assert!(files.len() <= 3, "{files:?}");
    assert!(
        files.iter().any(|(name, _)| name.starts_with("0.log.")),
        "never rotated: {files:?}"
    );
    // A file grows for at most one interval (plus the monitor's reopen) past the limit.
    assert!(files.iter().all(|(_, len)| *len < 64 * 1024), "{files:?}");
    pods.delete("chatty", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_group_owns_the_pods_volumes() {
    let (_cluster, admin, agent) = cluster_with_node("node-fsg", &[]).await;
    let pods = tenant_namespace(&admin, "fsg", "acme").await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "fsg");
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "creds"}, "stringData": {"password": "hunter2"}}),
    )
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    // A non-root user reads a 0400 secret and writes an emptyDir through its fsGroup only.
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": "grouped"},
        "spec": {
            "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000},
            "volumes": [{"name": "data", "emptyDir": {}},
                        {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 256}}],
            "containers": [{"name": "main", "image": IMAGE, "command": ["sh", "-c",
                "echo groups=$(id -G); echo secret=$(cat /etc/creds/password); mkdir /data/sub && touch /data/sub/x && echo file-group=$(stat -c %g /data/sub/x); sleep 3600"],
                "volumeMounts": [{"name": "data", "mountPath": "/data"},
                                 {"name": "creds", "mountPath": "/etc/creds"}]}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
    let running = wait_phase(&pods, "grouped", "Running").await;
    let log = wait_for("the pod's report", async || {
        let log = container_log(&agent, &running, "main", 0);
        log.contains("file-group=").then_some(log)
    })
    .await;
    assert!(log.contains("groups=1000 2000"), "{log}");
    assert!(log.contains("secret=hunter2"), "{log}");
    assert!(log.contains("file-group=2000"), "{log}");
    pods.delete("grouped", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
}
