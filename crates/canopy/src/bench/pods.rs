//! `canopy bench pods`: the node agent on a warm node (image present). It starts a
//! `canopy server` and a real `canopy agent` (root, runc), then measures pod create → Running
//! one pod at a time, pods started per second for a burst, and runs create/delete cycles,
//! checking that no mount, network namespace, cgroup or process is left behind.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
    runtime::watcher,
};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::Notify;

use super::{machine, percentiles};
use canopy::procs::ServerProcess;

const IMAGE: &str = "bench.canopy/busybox:1";
const NODE: &str = "bench-node";
const TENANT: &str = "bench";
const NAMESPACE: &str = "bench";

#[derive(clap::Args)]
pub struct PodsArgs {
    /// Pods created one after another, each timed from its create to Running.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Pods created at once to measure pods started per second.
    #[arg(long, default_value_t = 100)]
    burst: usize,
    /// Create → Running → delete cycles for the leak check (in batches of --batch).
    #[arg(long, default_value_t = 1000)]
    cycles: usize,
    /// Pods per batch of the leak check.
    #[arg(long, default_value_t = 20)]
    batch: usize,
    /// The OCI runtime the agent uses.
    #[arg(long, default_value = "runc")]
    container_runtime: String,
}

/// When each pod was first seen Running (also as seconds since boot, the clock a container
/// reads in `/proc/uptime`).
#[derive(Default)]
struct Seen {
    running: Mutex<HashMap<String, Instant>>,
    running_since_boot: Mutex<HashMap<String, f64>>,
    gone: Mutex<HashMap<String, Instant>>,
    changed: Notify,
}

fn follow(pods: Api<Pod>, seen: Arc<Seen>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = watcher(pods, watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            let now = Instant::now();
            match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                    let running =
                        pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                    if running && let Some(name) = pod.metadata.name {
                        seen.running_since_boot
                            .lock()
                            .entry(name.clone())
                            .or_insert_with(seconds_since_boot);
                        seen.running.lock().entry(name).or_insert(now);
                        seen.changed.notify_waiters();
                    }
                }
                Ok(watcher::Event::Delete(pod)) => {
                    if let Some(name) = pod.metadata.name {
                        seen.gone.lock().insert(name, now);
                        seen.changed.notify_waiters();
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "bench watch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    })
}

impl Seen {
    async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Seen) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if done(self) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }
}

/// CLOCK_BOOTTIME, which `/proc/uptime` shows.
fn seconds_since_boot() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .unwrap_or_default()
}

/// The pod prints when its process started running (seconds since boot, to 10 ms), so that
/// the bench can tell how long its Running status took to be seen after that.
fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": IMAGE, "imagePullPolicy": "Never",
                "command": ["sh", "-c", "cat /proc/uptime; exec sleep 3600"]}]
        }
    }))
    .unwrap_or_default()
}

/// The seconds since boot a pod's process printed first, from its log (CRI format:
/// `<time> stdout F <uptime> <idle>`).
fn printed_start(log_dir: &Path, pod: &Pod) -> Option<f64> {
    let dir = format!(
        "{}_{}_{}",
        pod.metadata.namespace.as_deref()?,
        pod.metadata.name.as_deref()?,
        pod.metadata.uid.as_deref()?
    );
    let log = std::fs::read_to_string(log_dir.join(dir).join("main").join("0.log")).ok()?;
    log.lines()
        .find_map(|line| line.splitn(4, ' ').nth(3)?.split(' ').next()?.parse().ok())
}

/// What a node has that a pod could leak: mounts, pinned namespaces, cgroups, processes.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Footprint {
    mounts: usize,
    netns: usize,
    cgroups: usize,
    shims: usize,
}

fn footprint(base: &Path, cgroup_parent: &str) -> Footprint {
    let base = base.display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&base))
        .count();
    let netns = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("canopy-"))
                .count()
        })
        .unwrap_or(0);
    let mut cgroups = 0;
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(pods) = std::fs::read_dir(hierarchy.path().join(cgroup_parent)) {
            cgroups += pods.flatten().filter(|e| e.path().is_dir()).count();
        }
    }
    let shims = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read(e.path().join("cmdline"))
                        .map(|c| {
                            let text = String::from_utf8_lossy(&c);
                            text.contains("shim") && text.contains(&base)
                        })
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0);
    Footprint {
        mounts,
        netns,
        cgroups,
        shims,
    }
}

struct AgentProcess(std::process::Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

pub async fn run(args: PodsArgs) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("canopy bench pods runs real containers: run it as root");
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    println!(
        "canopy bench pods: {} pods one at a time, a burst of {}, {} create/delete cycles; runtime {}; machine {}",
        args.pods,
        args.burst,
        args.cycles,
        args.container_runtime,
        machine()
    );
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe().context("locating the canopy binary")?;
    let server = ServerProcess::start(
        &exe,
        &dir.path().join("server"),
        "embedded",
        &["--disable-controllers"],
    )?;
    let admin = crate::server::client_from(&server.kubeconfig).await?;

    // The node: its credential, the image, the agent.
    let base = dir.path().join("agent");
    let root = base.join("root");
    std::fs::create_dir_all(&root)?;
    let pki = canopy_apiserver::pki::Pki::new(&dir.path().join("server"));
    let ca = pki.ensure_ca()?;
    let pair = pki.issue_client(
        &format!("system:node:{NODE}"),
        &["system:nodes", &format!("canopy:tenant:{TENANT}")],
    )?;
    let node_kubeconfig = base.join("node.kubeconfig");
    canopy_apiserver::kubeconfig::write(
        &node_kubeconfig,
        &server.url,
        &ca.cert_pem,
        &pair,
        &format!("system:node:{NODE}"),
    )?;
    let archive = base.join("image.tar");
    canopy_image::testing::busybox_oci_archive(&archive, IMAGE)?;
    canopy_image::ImageStore::open(root.join("images"))?.import_archive(&archive)?;
    let cgroup_parent = format!("canopy-bench-{}", std::process::id());
    let state = base.join("state");
    let agent_log = std::fs::File::create(base.join("agent.log"))?;
    let agent = AgentProcess(
        Command::new(&exe)
            .arg("agent")
            .arg("--kubeconfig")
            .arg(&node_kubeconfig)
            .args([
                "--node-name",
                NODE,
                "--tenant",
                TENANT,
                "--node-ip",
                "127.0.0.1",
            ])
            .args(["--cpu", "64", "--memory", "64Gi"])
            .args(["--max-pods", &(args.burst.max(args.batch) + 10).to_string()])
            .arg("--root-dir")
            .arg(&root)
            .arg("--state-dir")
            .arg(&state)
            .arg("--log-dir")
            .arg(base.join("logs"))
            .args(["--cgroup-parent", &cgroup_parent])
            .args(["--container-runtime", &args.container_runtime])
            .stdout(Stdio::null())
            .stderr(agent_log)
            .spawn()
            .context("starting canopy agent")?,
    );
    let nodes: Api<Node> = Api::all(admin.clone());
    let started = Instant::now();
    loop {
        let ready = nodes.get_opt(NODE).await?.is_some_and(|n| {
            n.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "the agent's node did not become Ready; its log:\n{}",
                std::fs::read_to_string(base.join("agent.log")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "agent registered and Ready in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let ns: Namespace = serde_json::from_value(
        json!({"metadata": {"name": NAMESPACE, "labels": {"canopy.io/tenant": TENANT}}}),
    )?;
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
    let seen = Arc::new(Seen::default());
    let watch = follow(pods.clone(), seen.clone());
    let before = footprint(&base, &cgroup_parent);

    // One pod at a time on the warm node.
    let mut latencies = Vec::with_capacity(args.pods);
    let mut after_start = Vec::with_capacity(args.pods);
    for i in 0..args.pods {
        let name = format!("one-{i}");
        let t0 = Instant::now();
        let created = pods.create(&PostParams::default(), &pod(&name)).await?;
        seen.wait(
            &format!("pod {name} Running"),
            Duration::from_secs(30),
            |s| s.running.lock().contains_key(&name),
        )
        .await?;
        let at = seen.running.lock()[&name];
        latencies.push(at.duration_since(t0).as_secs_f64() * 1000.0);
        let seen_at = seen.running_since_boot.lock()[&name];
        let log_dir = base.join("logs");
        let printed = wait_printed(&log_dir, &created).await;
        if let Some(started) = printed {
            after_start.push((seen_at - started) * 1000.0);
        }
        if (i + 1) % 25 == 0 {
            eprintln!("  {}/{} pods timed", i + 1, args.pods);
        }
    }
    let max = latencies.iter().cloned().fold(0.0, f64::max);
    let (p50, p99) = percentiles(&mut latencies);
    println!(
        "create → Running, one pod at a time ({}): p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms",
        args.pods
    );
    if after_start.is_empty() {
        println!("process start → Running seen: no pod printed its start");
    } else {
        let timed = after_start.len();
        let (p50, p99) = percentiles(&mut after_start);
        println!(
            "process start → Running seen by a watch ({timed} pods; the container reads /proc/uptime, 10 ms steps): p50 {p50:.0} ms, p99 {p99:.0} ms"
        );
    }
    delete_all(&pods, &seen, "one-", args.pods).await?;

    // A burst: pods started per second.
    let t0 = Instant::now();
    futures::stream::iter(0..args.burst)
        .map(|i| {
            let pods = pods.clone();
            async move {
                pods.create(&PostParams::default(), &pod(&format!("burst-{i}")))
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    let created = t0.elapsed().as_secs_f64();
    let burst = args.burst;
    seen.wait("the burst Running", Duration::from_secs(300), |s| {
        s.running
            .lock()
            .keys()
            .filter(|k| k.starts_with("burst-"))
            .count()
            >= burst
    })
    .await?;
    let all_running = t0.elapsed().as_secs_f64();
    println!(
        "burst of {}: created in {created:.2} s, all Running after {all_running:.2} s: {:.1} pods started/s on one node",
        args.burst,
        args.burst as f64 / all_running
    );
    let t1 = Instant::now();
    delete_all(&pods, &seen, "burst-", args.burst).await?;
    println!(
        "deleted the burst (grace 1 s) in {:.2} s",
        t1.elapsed().as_secs_f64()
    );

    // Create/delete cycles: nothing may be left behind.
    let t2 = Instant::now();
    let mut done = 0;
    while done < args.cycles {
        let n = args.batch.min(args.cycles - done);
        let prefix = format!("cycle-{done}-");
        for i in 0..n {
            pods.create(&PostParams::default(), &pod(&format!("{prefix}{i}")))
                .await?;
        }
        let p = prefix.clone();
        seen.wait("a cycle batch Running", Duration::from_secs(120), |s| {
            s.running
                .lock()
                .keys()
                .filter(|k| k.starts_with(&p))
                .count()
                >= n
        })
        .await?;
        delete_all(&pods, &seen, &prefix, n).await?;
        done += n;
        if done % 100 < args.batch {
            eprintln!("  {done}/{} cycles", args.cycles);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = footprint(&base, &cgroup_parent);
    println!(
        "{} create → Running → delete cycles in {:.1} s; before: {before:?}; after: {after:?}",
        args.cycles,
        t2.elapsed().as_secs_f64()
    );
    watch.abort();
    drop(agent);
    cleanup(&exe, &state, &root, &cgroup_parent).await;
    if after != before {
        bail!("resources leaked: {before:?} before the cycles, {after:?} after");
    }
    println!(
        "no leaks: mounts, network namespaces, pod cgroups and monitors are back where they were"
    );
    Ok(())
}

/// The start a pod printed, once its log has it (within a few seconds).
async fn wait_printed(log_dir: &Path, pod: &Pod) -> Option<f64> {
    for _ in 0..100 {
        if let Some(started) = printed_start(log_dir, pod) {
            return Some(started);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn delete_all(pods: &Api<Pod>, seen: &Arc<Seen>, prefix: &str, count: usize) -> Result<()> {
    futures::stream::iter(0..count)
        .map(|i| {
            let pods = pods.clone();
            let name = format!("{prefix}{i}");
            async move {
                match pods.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                    Err(e) => Err(e),
                }
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    let prefix = prefix.to_string();
    seen.wait("pods to be gone", Duration::from_secs(120), |s| {
        s.gone
            .lock()
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .count()
            >= count
    })
    .await
}

/// The bench's containers outlive its agent by design; remove them.
async fn cleanup(exe: &Path, state: &Path, root: &Path, cgroup_parent: &str) {
    let runtime = canopy_runtime::Runtime::new(canopy_runtime::RuntimeConfig {
        runtime_binary: PathBuf::from("runc"),
        shim_binary: exe.to_path_buf(),
        root_dir: root.join("containers"),
        state_dir: state.to_path_buf(),
        cgroup_parent: cgroup_parent.to_string(),
    });
    if let Ok(runtime) = runtime {
        for sandbox in runtime.list_sandboxes().await.unwrap_or_default() {
            let _ = runtime.remove_sandbox(&sandbox.pod_uid).await;
        }
    }
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_dir(hierarchy.path().join(cgroup_parent));
    }
}
