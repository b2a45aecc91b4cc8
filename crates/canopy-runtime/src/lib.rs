//! Canopy's container runtime: pod sandboxes and OCI containers run by `runc`, each under a
//! monitor process (the "shim", see [`shim`]).
//!
//! # Layout on disk
//!
//! ```text
//! /run/netns/canopy-<pod-uid>                 netns of the pod (bind mount of an nsfs file)
//! <state_dir>/                                bind-mounted onto itself, shared propagation
//!   sandboxes/<pod-uid>/sandbox.json          written last: its presence = sandbox complete
//!   sandboxes/<pod-uid>/ns/{ipc,uts}          pinned namespaces (bind mounts)
//!   sandboxes/<pod-uid>/{hosts,hostname,resolv.conf}   bind-mounted into every container
//!   containers/<id>/meta.json                 who the container is (pod, name, labels, log)
//!   containers/<id>/config.json               OCI spec;  rootfs/ = overlay mount
//!   containers/<id>/shim.pid, shim.log        the monitor's pid and diagnostics
//!   containers/<id>/pid                       container init pid (written by runc create)
//!   containers/<id>/started                   start time, written by the shim after runc start
//!   containers/<id>/start-error               why the start failed
//!   containers/<id>/exit.json                 exit status, written last by the shim
//!   runc/                                     `runc --root`
//! <root_dir>/containers/<id>/{upper,work}     overlay upper and work dirs
//! /sys/fs/cgroup/[<ctrl>/]<cgroup_parent>/pod<uid>/<id>   cgroups (cgroupfs driver)
//! ```
//!
//! Container ids are `<pod-uid>-<name>-<attempt>`.
//!
//! # Crashes and restarts
//!
//! There is no in-memory state: everything is re-read from these files, so a new
//! [`Runtime`] on the same directories adopts whatever runs. Containers survive the agent
//! because their shims run in their own sessions; a container is Running once `pid` and
//! `started` exist and Exited once `exit.json` exists. If a shim died (killed, OOM) while
//! its container's init is also gone, the container is reported Exited with code 255 and a
//! synthesized `exit.json` is persisted. Removal operations unmount lazily and tolerate
//! missing pieces, so a crash half-way through is repaired by calling them again.
//! Shims live in the agent's cgroup: a service manager must not kill that cgroup when the
//! agent restarts (systemd: `KillMode=process`, as for containerd), or exit codes are lost
//! (the containers themselves live on in their own cgroups and are reported as code 255).
//! The state dir is meant for a tmpfs (`/run`): after a reboot everything in it is gone
//! and the agent removes the leftover upper dirs by removing the sandboxes it does not know.

pub mod attach;
pub mod shim;

mod sandbox;
mod spec;
mod sys;
mod types;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nix::mount::{MsFlags, mount};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use sandbox::recorded_netns_files;
pub use shim::{ShimArgs, run_shim};
pub use types::*;

use shim::{EXIT_FILE, ExitRecord, PID_FILE, START_ERROR_FILE, STARTED_FILE};
use types::IoContext;

/// How long `start_container` waits for the shim to report started or failed.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for a container to die after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll period of the event watcher.
const WATCH_PERIOD: Duration = Duration::from_millis(100);

/// `meta.json` of a container bundle.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ContainerMeta {
    id: String,
    pod_uid: String,
    name: String,
    attempt: u32,
    labels: BTreeMap<String, String>,
    log_path: PathBuf,
    cgroup_path: String,
    created_at: DateTime<Utc>,
    #[serde(default)]
    stdin: bool,
    #[serde(default)]
    stdin_once: bool,
    #[serde(default)]
    tty: bool,
}

struct Inner {
    config: RuntimeConfig,
    events: broadcast::Sender<ContainerEvent>,
    /// Serialises sandbox create/remove per pod uid.
    pod_locks: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    watcher_started: parking_lot::Mutex<bool>,
}

/// Handle on the runtime; cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.inner.config)
            .finish()
    }
}

fn blocking_err(e: tokio::task::JoinError) -> RuntimeError {
    RuntimeError::Other(format!("blocking task failed: {e}"))
}

impl Inner {
    fn containers_dir(&self) -> PathBuf {
        self.config.state_dir.join("containers")
    }
    fn bundle(&self, id: &str) -> PathBuf {
        self.containers_dir().join(id)
    }
    fn upper_dir(&self, id: &str) -> PathBuf {
        self.config.root_dir.join("containers").join(id)
    }
    fn runc_root(&self) -> PathBuf {
        self.config.state_dir.join("runc")
    }
    fn pod_cgroup(&self, pod_uid: &str) -> String {
        format!(
            "/{}/pod{pod_uid}",
            self.config.cgroup_parent.trim_matches('/')
        )
    }
    fn sandbox_paths(&self, pod_uid: &str) -> sandbox::SandboxPaths {
        sandbox::SandboxPaths::new(&self.config.state_dir, pod_uid)
    }

    fn read_meta(&self, id: &str) -> Option<ContainerMeta> {
        let data = fs::read(self.bundle(id).join("meta.json")).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Ids of all bundles with a meta.json.
    fn all_metas(&self) -> Vec<ContainerMeta> {
        let Ok(entries) = fs::read_dir(self.containers_dir()) else {
            return Vec::new();
        };
        let mut out: Vec<ContainerMeta> = entries
            .flatten()
            .filter_map(|e| self.read_meta(&e.file_name().to_string_lossy()))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    fn status_of(&self, meta: ContainerMeta) -> ContainerStatus {
        let state = self.state_of(&meta);
        ContainerStatus {
            id: meta.id,
            pod_uid: meta.pod_uid,
            name: meta.name,
            attempt: meta.attempt,
            labels: meta.labels,
            state,
            log_path: meta.log_path,
        }
    }

    /// Derives the state from the bundle's files (see the module docs).
    fn state_of(&self, meta: &ContainerMeta) -> ContainerState {
        let bundle = self.bundle(&meta.id);
        if let Some(rec) = read_exit(&bundle) {
            return exited(rec);
        }
        let started = fs::read_to_string(bundle.join(STARTED_FILE))
            .ok()
            .and_then(|s| DateTime::parse_from_rfc3339(s.trim()).ok())
            .map(|t| t.with_timezone(&Utc));
        let pid = sys::read_pid(&bundle.join(PID_FILE));
        let shim_pid = sys::read_pid(&bundle.join("shim.pid"));
        let shim_alive = shim_pid.is_some_and(|p| process_mentions(p, "cmdline", &meta.id));
        if let (Some(started_at), Some(pid)) = (started, pid) {
            if shim_alive || process_mentions(pid, "cgroup", &meta.id) {
                return ContainerState::Running { pid, started_at };
            }
            // The shim died without recording the exit and the process is gone too.
            if let Some(rec) = read_exit(&bundle) {
                return exited(rec);
            }
            let rec = ExitRecord {
                exit_code: 255,
                signal: None,
                oom_killed: false,
                started_at: Some(started_at),
                finished_at: Utc::now(),
            };
            if let Ok(data) = serde_json::to_vec(&rec) {
                let _ = sys::write_atomic(&bundle.join(EXIT_FILE), &data);
            }
            return exited(rec);
        }
        if shim_pid.is_none() || shim_alive {
            ContainerState::Created
        } else {
            ContainerState::Exited {
                exit_code: 255,
                signal: None,
                oom_killed: false,
                started_at: None,
                finished_at: Utc::now(),
            }
        }
    }

    fn runc_command(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.config.runtime_binary);
        c.arg("--root").arg(self.runc_root());
        c.stdin(Stdio::null());
        c.kill_on_drop(true);
        c
    }

    /// Runs `runc --root <root> <args>`, returning stderr as the error message.
    async fn runc(&self, args: &[&str]) -> Result<std::process::Output, RuntimeError> {
        let out = self
            .runc_command()
            .args(args)
            .output()
            .await
            .ctx(|| format!("running {}", self.config.runtime_binary.display()))?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(RuntimeError::Command {
                binary: self.config.runtime_binary.display().to_string(),
                args: args.join(" "),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Unmounts and deletes everything of container `id`. Its processes must be gone.
    fn remove_container_files(
        &self,
        id: &str,
        cgroup_path: Option<&str>,
    ) -> Result<(), RuntimeError> {
        let bundle = self.bundle(id);
        sys::unmount_all_under(&bundle).ctx(|| format!("unmounting {}", bundle.display()))?;
        sys::remove_dir_all_if_exists(&bundle).ctx(|| format!("removing {}", bundle.display()))?;
        let upper = self.upper_dir(id);
        sys::remove_dir_all_if_exists(&upper).ctx(|| format!("removing {}", upper.display()))?;
        if let Some(cg) = cgroup_path
            && let Err(e) = sys::remove_cgroup(cg)
        {
            tracing::warn!(container = id, error = %e, "removing container cgroup");
        }
        Ok(())
    }
}

fn exited(rec: ExitRecord) -> ContainerState {
    ContainerState::Exited {
        exit_code: rec.exit_code,
        signal: rec.signal,
        oom_killed: rec.oom_killed,
        started_at: rec.started_at,
        finished_at: rec.finished_at,
    }
}

fn read_exit(bundle: &Path) -> Option<ExitRecord> {
    let data = fs::read(bundle.join(EXIT_FILE)).ok()?;
    serde_json::from_slice(&data).ok()
}

/// Whether live process `pid` has `needle` in `/proc/<pid>/<file>`: guards pid files
/// against pid reuse (the shim's cmdline names the container id, the container's init
/// sits in a cgroup named after it).
fn process_mentions(pid: i32, file: &str, needle: &str) -> bool {
    if !sys::process_alive(pid) {
        return false;
    }
    fs::read(format!("/proc/{pid}/{file}"))
        .map(|d| d.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .unwrap_or(false)
}

/// Accepts "TERM", "SIGTERM", "sigterm" or "15"; returns what runc understands.
fn normalize_signal(s: &str) -> Result<String, RuntimeError> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map(|_| n.to_string())
            .map_err(|_| RuntimeError::InvalidSpec(format!("unknown signal {s}")));
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig.as_str().to_string())
        .map_err(|_| RuntimeError::InvalidSpec(format!("unknown signal {s}")))
}

impl Runtime {
    /// Creates the directories, makes the state dir a shared mount (so unmounts reach the
    /// containers' mount namespaces) and checks the OCI runtime runs.
    pub fn new(config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let parent = config.cgroup_parent.trim_matches('/');
        if parent.is_empty() || parent.split('/').any(|c| c.is_empty() || c == "..") {
            return Err(RuntimeError::InvalidSpec(format!(
                "invalid cgroup parent {:?}",
                config.cgroup_parent
            )));
        }
        for d in [
            config.root_dir.join("containers"),
            config.state_dir.join("containers"),
            config.state_dir.join("sandboxes"),
            config.state_dir.join("runc"),
        ] {
            fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))?;
        }
        sandbox::make_shared_mount(&config.state_dir)?;
        let out = std::process::Command::new(&config.runtime_binary)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .ctx(|| format!("running {} --version", config.runtime_binary.display()))?;
        if !out.status.success() {
            return Err(RuntimeError::Command {
                binary: config.runtime_binary.display().to_string(),
                args: "--version".into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let (events, _) = broadcast::channel(1024);
        Ok(Runtime {
            inner: Arc::new(Inner {
                config,
                events,
                pod_locks: parking_lot::Mutex::new(HashMap::new()),
                watcher_started: parking_lot::Mutex::new(false),
            }),
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    fn pod_lock(&self, pod_uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .pod_locks
            .lock()
            .entry(pod_uid.to_string())
            .or_default()
            .clone()
    }

    /// Creates the pod's namespaces and files; returns the existing sandbox if complete.
    pub async fn create_sandbox(&self, spec: &SandboxSpec) -> Result<Sandbox, RuntimeError> {
        sandbox::validate_name("pod uid", &spec.pod_uid)?;
        let lock = self.pod_lock(&spec.pod_uid);
        let _g = lock.lock().await;
        let inner = self.inner.clone();
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || {
            let paths = inner.sandbox_paths(&spec.pod_uid);
            if let Some(sb) = sandbox::load(&paths)
                && sandbox::intact(&paths)
            {
                return Ok(sb);
            }
            // A crashed or broken attempt: start over.
            sandbox::destroy(&paths)?;
            let res = sandbox::create(&paths, &spec);
            if res.is_err() {
                let _ = sandbox::destroy(&paths);
            }
            res
        })
        .await
        .map_err(blocking_err)?
    }

    /// Rewrites the sandbox's /etc/hosts (e.g. once the pod IP is known after CNI). The
    /// file is rewritten in place because containers bind-mount its inode.
    pub async fn set_sandbox_hosts(
        &self,
        pod_uid: &str,
        hosts: &[(String, Vec<String>)],
    ) -> Result<(), RuntimeError> {
        sandbox::validate_name("pod uid", pod_uid)?;
        let paths = self.inner.sandbox_paths(pod_uid);
        if sandbox::load(&paths).is_none() {
            return Err(RuntimeError::SandboxNotFound(pod_uid.to_string()));
        }
        let file = paths.dir.join("hosts");
        tokio::fs::write(&file, sandbox::hosts_content(hosts))
            .await
            .ctx(|| format!("writing {}", file.display()))
    }

    /// Kills and removes the pod's containers, then its namespaces, files and cgroup.
    /// Idempotent.
    pub async fn remove_sandbox(&self, pod_uid: &str) -> Result<(), RuntimeError> {
        sandbox::validate_name("pod uid", pod_uid)?;
        let lock = self.pod_lock(pod_uid);
        let _g = lock.lock().await;
        let mut ids: Vec<String> = self
            .inner
            .all_metas()
            .into_iter()
            .filter(|m| m.pod_uid == pod_uid)
            .map(|m| m.id)
            .collect();
        // Leftovers of a crash between creating the dirs and writing meta.json.
        let prefix = format!("{pod_uid}-");
        for dir in [
            self.inner.containers_dir(),
            self.inner.config.root_dir.join("containers"),
        ] {
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with(&prefix)
                        && !ids.contains(&name)
                        && self.inner.read_meta(&name).is_none()
                    {
                        ids.push(name);
                    }
                }
            }
        }
        for id in &ids {
            self.remove_container(id).await?;
        }
        let inner = self.inner.clone();
        let uid = pod_uid.to_string();
        tokio::task::spawn_blocking(move || {
            sandbox::destroy(&inner.sandbox_paths(&uid))?;
            sys::remove_cgroup(&inner.pod_cgroup(&uid))
                .ctx(|| format!("removing cgroup {}", inner.pod_cgroup(&uid)))
        })
        .await
        .map_err(blocking_err)??;
        self.inner.pod_locks.lock().remove(pod_uid);
        Ok(())
    }

    /// All complete sandboxes on disk.
    pub async fn list_sandboxes(&self) -> Result<Vec<Sandbox>, RuntimeError> {
        let dir = self.inner.config.state_dir.join("sandboxes");
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for e in fs::read_dir(&dir)
                .ctx(|| format!("reading {}", dir.display()))?
                .flatten()
            {
                let uid = e.file_name().to_string_lossy().into_owned();
                if let Some(sb) = sandbox::load(&inner.sandbox_paths(&uid)) {
                    out.push(sb);
                }
            }
            out.sort_by(|a, b| a.pod_uid.cmp(&b.pod_uid));
            Ok(out)
        })
        .await
        .map_err(blocking_err)?
    }

    /// Creates the bundle and starts the container under a new shim. Returns once it runs
    /// (or ran and already exited); a failed start (e.g. executable not found) is an
    /// `Err(StartFailed)` carrying runc's message, and leaves nothing behind.
    pub async fn start_container(
        &self,
        sandbox: &Sandbox,
        spec: &ContainerSpec,
    ) -> Result<ContainerStatus, RuntimeError> {
        sandbox::validate_name("pod uid", &spec.pod_uid)?;
        sandbox::validate_name("container name", &spec.name)?;
        if spec.pod_uid != sandbox.pod_uid {
            return Err(RuntimeError::InvalidSpec(format!(
                "container of pod {} in sandbox of pod {}",
                spec.pod_uid, sandbox.pod_uid
            )));
        }
        if !spec.log_path.is_absolute() {
            return Err(RuntimeError::InvalidSpec(format!(
                "log path {:?} is not absolute",
                spec.log_path
            )));
        }
        if sandbox::load(&self.inner.sandbox_paths(&sandbox.pod_uid)).is_none() {
            return Err(RuntimeError::SandboxNotFound(sandbox.pod_uid.clone()));
        }
        let id = format!("{}-{}-{}", spec.pod_uid, spec.name, spec.attempt);
        let bundle = self.inner.bundle(&id);
        if bundle.exists() {
            return Err(RuntimeError::AlreadyExists(id));
        }
        let inner = self.inner.clone();
        let (sb, sp, cid) = (sandbox.clone(), spec.clone(), id.clone());
        let prepared = tokio::task::spawn_blocking(move || prepare_bundle(&inner, &sb, &sp, &cid))
            .await
            .map_err(blocking_err)?;
        let meta = match prepared {
            Ok(m) => m,
            Err(e) => {
                self.cleanup_failed(&id).await;
                return Err(e);
            }
        };
        match self.spawn_shim(&meta).await {
            Ok(()) => {}
            Err(e) => {
                self.cleanup_failed(&id).await;
                return Err(e);
            }
        }
        Ok(self.inner.status_of(meta))
    }

    async fn cleanup_failed(&self, id: &str) {
        let _ = self.inner.runc(&["delete", "--force", id]).await;
        let inner = self.inner.clone();
        let id = id.to_string();
        let _ = tokio::task::spawn_blocking(move || {
            let cg = inner.read_meta(&id).map(|m| m.cgroup_path);
            inner.remove_container_files(&id, cg.as_deref())
        })
        .await;
    }

    async fn spawn_shim(&self, meta: &ContainerMeta) -> Result<(), RuntimeError> {
        let bundle = self.inner.bundle(&meta.id);
        let args = ShimArgs {
            id: meta.id.clone(),
            bundle: bundle.clone(),
            runtime_binary: self.inner.config.runtime_binary.clone(),
            runtime_root: self.inner.runc_root(),
            log_path: meta.log_path.clone(),
            cgroup_path: meta.cgroup_path.clone(),
            stdin: meta.stdin,
            stdin_once: meta.stdin_once,
            tty: meta.tty,
        };
        let shim_log =
            fs::File::create(bundle.join("shim.log")).ctx(|| "creating shim.log".into())?;
        let mut child = tokio::process::Command::new(&self.inner.config.shim_binary)
            .arg("shim")
            .args(args.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(shim_log))
            .spawn()
            .ctx(|| format!("spawning shim {}", self.inner.config.shim_binary.display()))?;
        if let Some(pid) = child.id() {
            sys::write_atomic(&bundle.join("shim.pid"), pid.to_string().as_bytes())
                .ctx(|| "writing shim.pid".into())?;
        }
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if bundle.join(STARTED_FILE).exists() {
                // Dropping `child` neither kills nor leaks it: tokio reaps it when it exits.
                return Ok(());
            }
            if let Ok(msg) = fs::read_to_string(bundle.join(START_ERROR_FILE)) {
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                return Err(RuntimeError::StartFailed {
                    id: meta.id.clone(),
                    message: msg.trim().to_string(),
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                if bundle.join(STARTED_FILE).exists() {
                    return Ok(());
                }
                if let Ok(msg) = fs::read_to_string(bundle.join(START_ERROR_FILE)) {
                    return Err(RuntimeError::StartFailed {
                        id: meta.id.clone(),
                        message: msg.trim().to_string(),
                    });
                }
                let log = fs::read_to_string(bundle.join("shim.log")).unwrap_or_default();
                return Err(RuntimeError::StartFailed {
                    id: meta.id.clone(),
                    message: format!("shim exited ({status}): {}", log.trim()),
                });
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.start_kill();
                return Err(RuntimeError::Timeout(format!(
                    "starting container {}",
                    meta.id
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Status of one container; `None` if unknown.
    pub async fn container_status(
        &self,
        id: &str,
    ) -> Result<Option<ContainerStatus>, RuntimeError> {
        if sandbox::validate_name("container id", id).is_err() {
            return Ok(None);
        }
        Ok(self.inner.read_meta(id).map(|m| self.inner.status_of(m)))
    }

    /// Containers of one pod, sorted by id.
    pub async fn list_containers(
        &self,
        pod_uid: &str,
    ) -> Result<Vec<ContainerStatus>, RuntimeError> {
        let inner = self.inner.clone();
        let uid = pod_uid.to_string();
        tokio::task::spawn_blocking(move || {
            inner
                .all_metas()
                .into_iter()
                .filter(|m| m.pod_uid == uid)
                .map(|m| inner.status_of(m))
                .collect()
        })
        .await
        .map_err(blocking_err)
    }

    /// Containers of all pods, sorted by id.
    pub async fn list_all_containers(&self) -> Result<Vec<ContainerStatus>, RuntimeError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner
                .all_metas()
                .into_iter()
                .map(|m| inner.status_of(m))
                .collect()
        })
        .await
        .map_err(blocking_err)
    }

    async fn wait_exited(&self, id: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.inner.read_meta(id).map(|m| self.inner.state_of(&m)) {
                None | Some(ContainerState::Exited { .. }) => return true,
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `stop_signal` (default SIGTERM), waits up to `grace` for the exit, then
    /// SIGKILLs and waits again. Ok if the container already exited.
    pub async fn stop_container(
        &self,
        id: &str,
        grace: Duration,
        stop_signal: Option<&str>,
    ) -> Result<(), RuntimeError> {
        let sig = normalize_signal(stop_signal.unwrap_or("SIGTERM"))?;
        let Some(meta) = self.inner.read_meta(id) else {
            return Err(RuntimeError::ContainerNotFound(id.to_string()));
        };
        if matches!(self.inner.state_of(&meta), ContainerState::Exited { .. }) {
            return Ok(());
        }
        if grace > Duration::ZERO && sig != "SIGKILL" {
            if let Err(e) = self.inner.runc(&["kill", id, &sig]).await {
                tracing::debug!(container = id, error = %e, "runc kill");
            }
            if self.wait_exited(id, grace).await {
                return Ok(());
            }
        }
        if let Err(e) = self.inner.runc(&["kill", "--all", id, "SIGKILL"]).await {
            tracing::debug!(container = id, error = %e, "runc kill KILL");
        }
        if self.wait_exited(id, KILL_TIMEOUT).await {
            Ok(())
        } else {
            Err(RuntimeError::Timeout(format!(
                "container {id} did not die after SIGKILL"
            )))
        }
    }

    /// Kills the container if needed, then deletes its runc state, rootfs mount, bundle,
    /// upper dir and cgroup. Idempotent.
    pub async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        sandbox::validate_name("container id", id)?;
        let meta = self.inner.read_meta(id);
        if let Some(m) = &meta
            && !matches!(self.inner.state_of(m), ContainerState::Exited { .. })
        {
            self.stop_container(id, Duration::ZERO, Some("SIGKILL"))
                .await?;
        }
        // The shim exits right after writing exit.json; wait for it so that nothing of
        // the container is left running once this returns.
        let shim_pid = sys::read_pid(&self.inner.bundle(id).join("shim.pid"));
        if let Some(pid) = shim_pid {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while process_mentions(pid, "cmdline", id) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if let Err(e) = self.inner.runc(&["delete", "--force", id]).await
            && !e.to_string().contains("does not exist")
        {
            tracing::debug!(container = id, error = %e, "runc delete");
        }
        let inner = self.inner.clone();
        let id = id.to_string();
        let cg = meta.map(|m| m.cgroup_path);
        tokio::task::spawn_blocking(move || inner.remove_container_files(&id, cg.as_deref()))
            .await
            .map_err(blocking_err)?
    }

    /// Runs `cmd` in the running container (`runc exec`, the container's user, env and
    /// cwd), killing it after `timeout`.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        let Some(meta) = self.inner.read_meta(id) else {
            return Err(RuntimeError::ContainerNotFound(id.to_string()));
        };
        if !matches!(self.inner.state_of(&meta), ContainerState::Running { .. }) {
            return Err(RuntimeError::Other(format!(
                "container {id} is not running"
            )));
        }
        if cmd.is_empty() {
            return Err(RuntimeError::InvalidSpec("empty exec command".into()));
        }
        static EXEC_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = EXEC_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The exec'd process's pid, so a timeout can kill it and not only `runc exec`.
        let pid_file = self
            .inner
            .bundle(id)
            .join(format!("exec-{}-{seq}.pid", std::process::id()));
        let child = self
            .inner
            .runc_command()
            .arg("exec")
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .args(cmd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ctx(|| {
                format!(
                    "running {} exec",
                    self.inner.config.runtime_binary.display()
                )
            })?;
        let res = tokio::time::timeout(timeout, child.wait_with_output()).await;
        if res.is_err()
            && let Some(pid) = sys::read_pid(&pid_file)
            && process_mentions(pid, "cgroup", id)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = sys::remove_file_if_exists(&pid_file);
        match res {
            Ok(Ok(out)) => {
                use std::os::unix::process::ExitStatusExt;
                let exit_code = out
                    .status
                    .code()
                    .or_else(|| out.status.signal().map(|s| 128 + s))
                    .unwrap_or(255);
                Ok(ExecOutput {
                    exit_code,
                    stdout: out.stdout,
                    stderr: out.stderr,
                })
            }
            Ok(Err(e)) => Err(RuntimeError::io("runc exec", e)),
            // kill_on_drop killed `runc exec` when the timed-out future was dropped.
            Err(_) => Err(RuntimeError::Timeout(format!(
                "exec in {id} exceeded {timeout:?}"
            ))),
        }
    }

    /// Attaches to the main process of running container `id`: the shim's stream of its
    /// output and its input ([`attach`] frames). Whether input reaches the container depends
    /// on its spec (`stdin`).
    pub async fn attach(&self, id: &str) -> Result<(tokio::net::UnixStream, bool), RuntimeError> {
        let Some(meta) = self.inner.read_meta(id) else {
            return Err(RuntimeError::ContainerNotFound(id.to_string()));
        };
        if !matches!(self.inner.state_of(&meta), ContainerState::Running { .. }) {
            return Err(RuntimeError::Other(format!(
                "container {id} is not running"
            )));
        }
        let dir = fs::File::open(self.inner.bundle(id))
            .map_err(|e| RuntimeError::io("opening the container's bundle", e))?;
        let stream = tokio::net::UnixStream::connect(attach::short_path(&dir, attach::SOCKET))
            .await
            .map_err(|e| RuntimeError::io("connecting to the container's monitor", e))?;
        Ok((stream, meta.tty))
    }

    /// Starts `cmd` in running container `id` with its streams handed to the caller, on a
    /// terminal when `tty` (runc's console is a pty of ours whose master the caller gets).
    pub async fn exec_interactive(
        &self,
        id: &str,
        cmd: &[String],
        stdin: bool,
        tty: bool,
    ) -> Result<ExecSession, RuntimeError> {
        let Some(meta) = self.inner.read_meta(id) else {
            return Err(RuntimeError::ContainerNotFound(id.to_string()));
        };
        if !matches!(self.inner.state_of(&meta), ContainerState::Running { .. }) {
            return Err(RuntimeError::Other(format!(
                "container {id} is not running"
            )));
        }
        if cmd.is_empty() {
            return Err(RuntimeError::InvalidSpec("empty exec command".into()));
        }
        let mut command = self.inner.runc_command();
        command.arg("exec");
        // The session ends with the connection; a process left behind is the user's, as
        // upstream, but `runc exec` itself must not outlive the agent's interest.
        command.kill_on_drop(false);
        if tty {
            use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
            let pty_error = |e: rustix::io::Errno| RuntimeError::io("opening a pty", e.into());
            let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
                .map_err(pty_error)?;
            grantpt(&master).map_err(pty_error)?;
            unlockpt(&master).map_err(pty_error)?;
            let name = ptsname(&master, Vec::new()).map_err(pty_error)?;
            let slave_path = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(name.as_bytes()));
            let slave = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_NOCTTY.bits())
                .open(&slave_path)
                .map_err(|e| RuntimeError::io("opening the pty's terminal", e))?;
            // runc sets its own stdin raw and copies between it and the container's console.
            command
                .arg("--tty")
                .arg("--env")
                .arg("TERM=xterm")
                .arg(id)
                .args(cmd)
                .stdin(Stdio::from(
                    slave.try_clone().map_err(|e| RuntimeError::io("pty", e))?,
                ))
                .stdout(Stdio::from(
                    slave.try_clone().map_err(|e| RuntimeError::io("pty", e))?,
                ))
                .stderr(Stdio::from(slave));
            let child = command
                .spawn()
                .map_err(|e| RuntimeError::io("running runc exec", e))?;
            // Our copies of the terminal side go with `command`: the master reads EOF (EIO)
            // once the process and runc are gone.
            drop(command);
            return Ok(ExecSession {
                child,
                io: ExecIo::Tty {
                    master: std::fs::File::from(master),
                },
            });
        }
        command
            .arg(id)
            .args(cmd)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| RuntimeError::io("running runc exec", e))?;
        let io = ExecIo::Pipes {
            stdin: child.stdin.take(),
            stdout: child
                .stdout
                .take()
                .ok_or_else(|| RuntimeError::Other("no stdout pipe".into()))?,
            stderr: child
                .stderr
                .take()
                .ok_or_else(|| RuntimeError::Other("no stderr pipe".into()))?,
        };
        Ok(ExecSession { child, io })
    }

    /// Container start/exit events, from a watcher polling the bundles every 100 ms while
    /// anybody subscribes. Lagging receivers lose events (then re-list).
    pub fn subscribe(&self) -> broadcast::Receiver<ContainerEvent> {
        let rx = self.inner.events.subscribe();
        let mut started = self.inner.watcher_started.lock();
        if !*started && let Ok(handle) = tokio::runtime::Handle::try_current() {
            *started = true;
            handle.spawn(watch(Arc::downgrade(&self.inner)));
        }
        rx
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Exited,
}

/// Polls container states and broadcasts changes. Stops when the runtime is dropped.
///
/// Cheap per tick: exited containers are not looked at again, running ones only get an
/// `exit.json` existence check except on every 10th tick (which also catches dead shims).
async fn watch(weak: Weak<Inner>) {
    let mut known: HashMap<String, (String, Phase)> = HashMap::new();
    let mut first = true;
    let mut tick: u64 = 0;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.events.receiver_count() > 0 || first {
            let full = tick.is_multiple_of(10);
            let snapshot = known.clone();
            let scan = {
                let inner = inner.clone();
                tokio::task::spawn_blocking(move || scan_phases(&inner, &snapshot, full)).await
            };
            if let Ok(scan) = scan {
                for (id, (pod_uid, phase)) in &scan {
                    let before = known.get(id).map(|(_, p)| *p);
                    if first || before == Some(*phase) {
                        continue;
                    }
                    let kinds: &[ContainerEventKind] = match (before, phase) {
                        (_, Phase::Created) => &[],
                        (Some(Phase::Running), Phase::Exited) => &[ContainerEventKind::Exited],
                        (_, Phase::Exited) => {
                            &[ContainerEventKind::Started, ContainerEventKind::Exited]
                        }
                        (_, Phase::Running) => &[ContainerEventKind::Started],
                    };
                    for kind in kinds {
                        let _ = inner.events.send(ContainerEvent {
                            id: id.clone(),
                            pod_uid: pod_uid.clone(),
                            kind: *kind,
                        });
                    }
                }
                known = scan;
                first = false;
            }
        }
        drop(inner);
        tick = tick.wrapping_add(1);
        tokio::time::sleep(WATCH_PERIOD).await;
    }
}

/// One watcher pass over the bundles: id -> (pod uid, phase).
fn scan_phases(
    inner: &Inner,
    known: &HashMap<String, (String, Phase)>,
    full: bool,
) -> HashMap<String, (String, Phase)> {
    let mut out = HashMap::new();
    let Ok(entries) = fs::read_dir(inner.containers_dir()) else {
        return out;
    };
    for e in entries.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        match known.get(&id) {
            Some((pod, Phase::Exited)) => {
                out.insert(id, (pod.clone(), Phase::Exited));
                continue;
            }
            Some((pod, Phase::Running)) if !full => {
                let phase = if inner.bundle(&id).join(EXIT_FILE).exists() {
                    Phase::Exited
                } else {
                    Phase::Running
                };
                out.insert(id, (pod.clone(), phase));
                continue;
            }
            _ => {}
        }
        if let Some(m) = inner.read_meta(&id) {
            let phase = match inner.state_of(&m) {
                ContainerState::Created => Phase::Created,
                ContainerState::Running { .. } => Phase::Running,
                ContainerState::Exited { .. } => Phase::Exited,
            };
            out.insert(id, (m.pod_uid, phase));
        }
    }
    out
}

/// Creates dirs, the overlay rootfs, config.json and meta.json of a new container.
fn prepare_bundle(
    inner: &Inner,
    sb: &Sandbox,
    spec: &ContainerSpec,
    id: &str,
) -> Result<ContainerMeta, RuntimeError> {
    let bundle = inner.bundle(id);
    let rootfs = bundle.join("rootfs");
    let upper_base = inner.upper_dir(id);
    let (upper, work) = (upper_base.join("upper"), upper_base.join("work"));
    for d in [&rootfs, &upper, &work] {
        fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?;
    }
    let mut lowers: Vec<PathBuf> = spec.lower_dirs.iter().rev().cloned().collect();
    if lowers.is_empty() {
        let empty = upper_base.join("empty");
        fs::create_dir_all(&empty).ctx(|| format!("creating {}", empty.display()))?;
        lowers.push(empty);
    }
    for l in &lowers {
        let s = l.to_string_lossy();
        if s.contains([':', ',']) || !l.is_absolute() {
            return Err(RuntimeError::InvalidSpec(format!(
                "layer dir {s:?} must be absolute without ':' or ','"
            )));
        }
    }
    let lowerdir = lowers
        .iter()
        .map(|l| l.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":");
    let opts = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    if opts.len() >= 4000 {
        return Err(RuntimeError::InvalidSpec(format!(
            "too many image layers for one overlay mount ({} bytes of options)",
            opts.len()
        )));
    }
    mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .ctx(|| format!("mounting overlay on {}", rootfs.display()))?;

    let user = spec::resolve_user(&rootfs, spec)?;
    let cgroup_path = format!("{}/{id}", inner.pod_cgroup(&spec.pod_uid));
    let limit_swap = !sys::is_cgroup_v2()
        && Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists();
    let oci = spec::build_spec(
        spec,
        &spec::SpecInputs {
            sandbox: sb,
            rootfs: &rootfs,
            cgroups_path: &cgroup_path,
            user: &user,
            limit_swap,
        },
    )?;
    let data = serde_json::to_vec_pretty(&oci).map_err(|e| RuntimeError::Other(e.to_string()))?;
    sys::write_atomic(&bundle.join("config.json"), &data).ctx(|| "writing config.json".into())?;
    if let Some(parent) = spec.log_path.parent() {
        fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    }
    let meta = ContainerMeta {
        id: id.to_string(),
        pod_uid: spec.pod_uid.clone(),
        name: spec.name.clone(),
        attempt: spec.attempt,
        labels: spec.labels.clone(),
        log_path: spec.log_path.clone(),
        cgroup_path,
        created_at: Utc::now(),
        stdin: spec.stdin,
        stdin_once: spec.stdin_once,
        tty: spec.tty,
    };
    let data = serde_json::to_vec_pretty(&meta).map_err(|e| RuntimeError::Other(e.to_string()))?;
    sys::write_atomic(&bundle.join("meta.json"), &data).ctx(|| "writing meta.json".into())?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(normalize_signal("TERM").unwrap(), "SIGTERM");
        assert_eq!(normalize_signal("sigkill").unwrap(), "SIGKILL");
        assert_eq!(normalize_signal("15").unwrap(), "15");
        assert!(normalize_signal("NOPE").is_err());
    }
}
