//! A server's cgroup: the "VM"'s size. `canopy-<i>/<server>` holds the flavor's limits and
//! the agent; `canopy-<i>/<server>/pods` is the agent's `--cgroup-parent`, so every pod of
//! the server is inside the server's limits.
//!
//! Two layouts: cgroup v1 (or hybrid), where each controller is its own hierarchy under
//! `/sys/fs/cgroup/<controller>` and limits live there (the v2 tree of a hybrid host has no
//! controllers), and pure v2. The server's cgroup is made in every hierarchy (as runc does
//! for containers), so that every process of the server is found, and killed, from any of
//! them.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{sys::signal, unistd::Pid};

use super::names;

const ROOT: &str = "/sys/fs/cgroup";

/// The CFS period; the quota is `vcpus` periods, i.e. `vcpus` CPUs' worth of time.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Processes a server may have per vCPU: enough for a full node's pods, few enough that a
/// fork bomb inside one "VM" cannot exhaust the host's pids (see [`Limits::pids`]).
pub const PIDS_PER_VCPU: u64 = 4096;

/// What a server's cgroup is limited to.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub memory_bytes: u64,
    pub vcpus: u32,
}

impl Limits {
    pub fn cpu_quota_us(&self) -> u64 {
        u64::from(self.vcpus) * CPU_PERIOD_US
    }

    /// [`PIDS_PER_VCPU`] per vCPU, but never more than half the host's pid space (32768
    /// pids on small hosts): one server must not be able to starve the host of pids.
    pub fn pids(&self) -> u64 {
        let wanted = u64::from(self.vcpus) * PIDS_PER_VCPU;
        let host = fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        match host {
            Some(max) => wanted.min((max / 2).max(1024)),
            None => wanted,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Layout {
    /// One hierarchy per v1 controller (plus named and hybrid v2 ones).
    V1 { hierarchies: Vec<PathBuf> },
    /// The unified hierarchy alone.
    V2,
}

/// The controllers a v2 server cgroup limits.
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

impl Layout {
    pub fn detect() -> Layout {
        let root = Path::new(ROOT);
        if root.join("cgroup.controllers").exists() {
            return Layout::V2;
        }
        let mut hierarchies = Vec::new();
        if let Ok(entries) = fs::read_dir(root) {
            for entry in entries.flatten() {
                // `cpu,cpuacct`-style co-mounts appear once as a directory and again as
                // symlinks named after each controller: the directory is enough.
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if is_dir && entry.path().join("cgroup.procs").exists() {
                    hierarchies.push(entry.path());
                }
            }
        }
        hierarchies.sort();
        Layout::V1 { hierarchies }
    }

    /// Every directory that is cgroup `rel`: one per hierarchy.
    pub fn dirs(&self, rel: &str) -> Vec<PathBuf> {
        match self {
            Layout::V1 { hierarchies } => hierarchies.iter().map(|h| h.join(rel)).collect(),
            Layout::V2 => vec![Path::new(ROOT).join(rel)],
        }
    }

    /// Creates the server's cgroups with the flavor's limits. Idempotent: a repair after a
    /// reboot (cgroupfs is not persistent) runs the same code.
    pub fn ensure_server(&self, instance: &str, server: &str, limits: Limits) -> Result<()> {
        let top = names::instance_cgroup(instance);
        let own = names::server_cgroup(instance, server);
        let pods = names::pods_cgroup(instance, server);
        match self {
            Layout::V1 { hierarchies } => {
                for hierarchy in hierarchies {
                    for rel in [&top, &own, &pods] {
                        let dir = hierarchy.join(rel);
                        make_dir(&dir)?;
                        prepare_v1(&dir)?;
                    }
                    limit_v1(&hierarchy.join(&own), limits)?;
                }
            }
            Layout::V2 => {
                let root = Path::new(ROOT);
                enable_v2_controllers(root)?;
                make_dir(&root.join(&top))?;
                enable_v2_controllers(&root.join(&top))?;
                let dir = root.join(&own);
                make_dir(&dir)?;
                limit_v2(&dir, limits)?;
                // A v2 cgroup that hands controllers to children may hold no process
                // itself: the agent goes into a leaf beside the pods.
                enable_v2_controllers(&dir)?;
                make_dir(&dir.join("agent"))?;
                make_dir(&dir.join("pods"))?;
                enable_v2_controllers(&dir.join("pods"))?;
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files the agent's pid is written to.
    pub fn agent_procs_files(&self, instance: &str, server: &str) -> Vec<PathBuf> {
        let own = names::server_cgroup(instance, server);
        match self {
            Layout::V1 { hierarchies } => hierarchies
                .iter()
                .map(|h| h.join(&own).join("cgroup.procs"))
                .collect(),
            Layout::V2 => vec![Path::new(ROOT).join(own).join("agent/cgroup.procs")],
        }
    }

    /// Every process in cgroup `rel` and its descendants, in any hierarchy.
    pub fn processes(&self, rel: &str) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in self.dirs(rel) {
            walk(&dir, &mut |d| {
                if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
                    pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            });
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs every process of cgroup `rel` and below until none is left (a process may
    /// fork while its siblings are being killed), or fails after `timeout`. `cgroup.kill`
    /// (v2, also the controller-less v2 tree of a hybrid host) kills a whole subtree at
    /// once, racing no fork; the per-pid kill covers kernels without it.
    pub async fn kill_all(&self, rel: &str, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            for dir in self.dirs(rel) {
                let kill = dir.join("cgroup.kill");
                if kill.exists() {
                    let _ = fs::write(&kill, "1");
                }
            }
            let pids = self.processes(rel);
            if pids.is_empty() {
                return Ok(());
            }
            for pid in &pids {
                let _ = signal::kill(Pid::from_raw(*pid), signal::Signal::SIGKILL);
            }
            if started.elapsed() > timeout {
                bail!(
                    "processes {pids:?} of cgroup {rel} are still alive {timeout:?} after SIGKILL"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Removes cgroup `rel` and everything below it, deepest first. The kernel releases a
    /// cgroup a moment after its last process is reaped, so a busy cgroup is retried.
    pub async fn remove(&self, rel: &str) -> Result<()> {
        for dir in self.dirs(rel) {
            let mut all = Vec::new();
            walk(&dir, &mut |d| all.push(d.to_path_buf()));
            // Deeper paths are longer: removing longest first empties every parent.
            all.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in all {
                remove_dir_retrying(&d).await?;
            }
        }
        Ok(())
    }
}

/// Calls `visit` on `dir` and every cgroup directory below it (missing: nothing).
fn walk(dir: &Path, visit: &mut dyn FnMut(&Path)) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    visit(dir);
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(&entry.path(), visit);
        }
    }
}

async fn remove_dir_retrying(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(nix::libc::EBUSY) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("removing cgroup {}", dir.display())),
        }
    }
}

fn make_dir(dir: &Path) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating cgroup {}", dir.display())),
    }
}

fn write(file: &Path, value: &str) -> Result<()> {
    fs::write(file, value).with_context(|| format!("writing {value:?} to {}", file.display()))
}

/// What a new v1 cgroup needs before it can hold processes or children.
fn prepare_v1(dir: &Path) -> Result<()> {
    // A new cpuset cgroup starts with no CPUs and no memory nodes, and refuses processes
    // until it has some: inherit the parent's.
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let path = dir.join(file);
        let Ok(current) = fs::read_to_string(&path) else {
            continue;
        };
        if current.trim().is_empty() {
            let parent = dir.parent().context("cgroup without parent")?.join(file);
            let inherited = fs::read_to_string(&parent)
                .with_context(|| format!("reading {}", parent.display()))?;
            write(&path, inherited.trim())?;
        }
    }
    // Old kernels default to flat memory accounting, under which the pods would escape
    // the server's limit; newer ones only accept 1.
    let hierarchy = dir.join("memory.use_hierarchy");
    if fs::read_to_string(&hierarchy).is_ok_and(|v| v.trim() == "0") {
        write(&hierarchy, "1")?;
    }
    Ok(())
}

fn limit_v1(dir: &Path, limits: Limits) -> Result<()> {
    let memory = dir.join("memory.limit_in_bytes");
    if memory.exists() {
        let bytes = limits.memory_bytes.to_string();
        // memory+swap must stay at or above memory: set them in the order that keeps it so.
        let memsw = dir.join("memory.memsw.limit_in_bytes");
        if write(&memory, &bytes).is_err() {
            write(&memsw, &bytes)?;
            write(&memory, &bytes)?;
        }
        // A VM's memory is its RAM: no swap on top of it.
        if memsw.exists() {
            write(&memsw, &bytes)?;
        }
    }
    if dir.join("cpu.cfs_quota_us").exists() {
        write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        write(
            &dir.join("cpu.cfs_quota_us"),
            &limits.cpu_quota_us().to_string(),
        )?;
        write(
            &dir.join("cpu.shares"),
            &(1024 * u64::from(limits.vcpus)).to_string(),
        )?;
    }
    if dir.join("pids.max").exists() {
        write(&dir.join("pids.max"), &limits.pids().to_string())?;
    }
    Ok(())
}

fn limit_v2(dir: &Path, limits: Limits) -> Result<()> {
    if dir.join("memory.max").exists() {
        write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
        if dir.join("memory.swap.max").exists() {
            write(&dir.join("memory.swap.max"), "0")?;
        }
    }
    if dir.join("cpu.max").exists() {
        write(
            &dir.join("cpu.max"),
            &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us()),
        )?;
        let weight = (100 * u64::from(limits.vcpus)).clamp(1, 10_000);
        write(&dir.join("cpu.weight"), &weight.to_string())?;
    }
    if dir.join("pids.max").exists() {
        write(&dir.join("pids.max"), &limits.pids().to_string())?;
    }
    Ok(())
}

/// Hands the controllers a server cgroup limits down to `dir`'s children.
fn enable_v2_controllers(dir: &Path) -> Result<()> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for controller in V2_CONTROLLERS {
        let has = |list: &str| list.split_whitespace().any(|c| c == controller);
        if has(&available) && !has(&enabled) {
            write(
                &dir.join("cgroup.subtree_control"),
                &format!("+{controller}"),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        let limits = Limits {
            memory_bytes: 512 << 20,
            vcpus: 2,
        };
        assert_eq!(limits.cpu_quota_us(), 200_000);
        assert!((1024..=8192).contains(&limits.pids()), "{}", limits.pids());
    }

    #[test]
    fn v1_directories_are_per_hierarchy() {
        let layout = Layout::V1 {
            hierarchies: vec!["/sys/fs/cgroup/cpu".into(), "/sys/fs/cgroup/memory".into()],
        };
        assert_eq!(
            layout.agent_procs_files("t", "vm"),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu/canopy-t/vm/cgroup.procs"),
                PathBuf::from("/sys/fs/cgroup/memory/canopy-t/vm/cgroup.procs"),
            ]
        );
        assert_eq!(
            Layout::V2.agent_procs_files("t", "vm"),
            vec![PathBuf::from(
                "/sys/fs/cgroup/canopy-t/vm/agent/cgroup.procs"
            )]
        );
    }
}
