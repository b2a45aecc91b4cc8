//! Pod sandboxes: network, IPC and UTS namespaces pinned by bind mounts (no pause process).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};

use crate::sys;
use crate::types::{DnsConfig, IoContext, RuntimeError, Sandbox, SandboxSpec};

/// Where named network namespaces live (iproute2's convention, so `ip netns` and CNI see them).
pub const NETNS_DIR: &str = "/run/netns";

/// Serialises the one-time mount propagation setup of shared directories in this process.
static SHARED_DIR_LOCK: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Makes `dir` a mount point with shared propagation, as iproute2 does for /run/netns:
/// containers' mount namespaces (runc makes them slaves of the host) then see our later
/// unmounts of namespace files and rootfs mounts, instead of pinning them until they exit.
pub fn make_shared_mount(dir: &Path) -> Result<(), RuntimeError> {
    let _guard = SHARED_DIR_LOCK.lock();
    fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let none: Option<&str> = None;
    match mount(none, dir, none, MsFlags::MS_SHARED | MsFlags::MS_REC, none) {
        Ok(()) => return Ok(()),
        Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(e).ctx(|| format!("making {} shared", dir.display())),
    }
    // Not a mount point yet: bind it onto itself first.
    if !sys::is_mounted(dir) {
        mount(
            Some(dir),
            dir,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .ctx(|| format!("bind-mounting {} onto itself", dir.display()))?;
    }
    mount(none, dir, none, MsFlags::MS_SHARED | MsFlags::MS_REC, none)
        .ctx(|| format!("making {} shared", dir.display()))
}

/// Pod uids become file and cgroup names: keep them to a safe alphabet.
pub fn validate_name(kind: &str, s: &str) -> Result<(), RuntimeError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::InvalidSpec(format!("invalid {kind} {s:?}")))
    }
}

pub fn netns_name(pod_uid: &str) -> String {
    format!("canopy-{pod_uid}")
}

/// The network-namespace files of the sandboxes a runtime state directory records, for
/// whoever tears a node down without its agent (the files are the host's even when the
/// agent's mounts lived in a mount namespace of its own).
pub fn recorded_netns_files(state_dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(state_dir.join("sandboxes"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let uid = entry.file_name().to_str()?.to_string();
            validate_name("pod uid", &uid).ok()?;
            Some(SandboxPaths::new(state_dir, &uid).netns)
        })
        .collect()
}

pub fn hosts_content(hosts: &[(String, Vec<String>)]) -> String {
    let mut s = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    for (ip, names) in hosts {
        if names.is_empty() {
            continue;
        }
        s.push_str(&format!("{ip}\t{}\n", names.join("\t")));
    }
    s
}

fn resolv_content(dns: &DnsConfig) -> String {
    if dns.nameservers.is_empty() && dns.searches.is_empty() && dns.options.is_empty() {
        return fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    }
    let mut s = String::new();
    if !dns.searches.is_empty() {
        s.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    for ns in &dns.nameservers {
        s.push_str(&format!("nameserver {ns}\n"));
    }
    if !dns.options.is_empty() {
        s.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    s
}

/// Paths of one sandbox.
pub struct SandboxPaths {
    pub dir: PathBuf,
    pub meta: PathBuf,
    pub netns: PathBuf,
    pub ipc: PathBuf,
    pub uts: PathBuf,
}

impl SandboxPaths {
    pub fn new(state_dir: &Path, pod_uid: &str) -> SandboxPaths {
        let dir = state_dir.join("sandboxes").join(pod_uid);
        SandboxPaths {
            meta: dir.join("sandbox.json"),
            netns: Path::new(NETNS_DIR).join(netns_name(pod_uid)),
            ipc: dir.join("ns").join("ipc"),
            uts: dir.join("ns").join("uts"),
            dir,
        }
    }
}

/// Reads a complete sandbox (sandbox.json is written last, so its presence means complete).
pub fn load(paths: &SandboxPaths) -> Option<Sandbox> {
    let data = fs::read(&paths.meta).ok()?;
    serde_json::from_slice(&data).ok()
}

/// Creates the sandbox from scratch (any leftovers of a crashed attempt must be gone).
pub fn create(paths: &SandboxPaths, spec: &SandboxSpec) -> Result<Sandbox, RuntimeError> {
    let mut hostname = if spec.hostname.is_empty() {
        spec.name.clone()
    } else {
        spec.hostname.clone()
    };
    // Linux hostnames are at most 64 bytes; upstream truncates pod hostnames to 63.
    while hostname.len() > 63 {
        hostname.pop();
    }
    let hostname = hostname.trim_end_matches(['-', '.']).to_string();
    if hostname.is_empty() {
        return Err(RuntimeError::InvalidSpec("empty hostname".into()));
    }
    let ns_dir = paths.dir.join("ns");
    fs::create_dir_all(&ns_dir).ctx(|| format!("creating {}", ns_dir.display()))?;
    fs::write(paths.dir.join("hosts"), hosts_content(&spec.hosts))
        .ctx(|| "writing hosts".into())?;
    fs::write(paths.dir.join("hostname"), format!("{hostname}\n"))
        .ctx(|| "writing hostname".into())?;
    fs::write(paths.dir.join("resolv.conf"), resolv_content(&spec.dns))
        .ctx(|| "writing resolv.conf".into())?;
    make_shared_mount(Path::new(NETNS_DIR))?;
    for f in [&paths.netns, &paths.ipc, &paths.uts] {
        fs::File::create(f).ctx(|| format!("creating {}", f.display()))?;
    }

    // unshare() only affects the calling thread for these namespaces; a dedicated thread
    // that exits afterwards leaves no thread of ours inside the pod's namespaces.
    let (netns, ipc, uts) = (paths.netns.clone(), paths.ipc.clone(), paths.uts.clone());
    let host = hostname.clone();
    let handle = std::thread::Builder::new()
        .name("canopy-sandbox".into())
        .spawn(move || -> Result<(), RuntimeError> {
            unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
                .ctx(|| "unshare(net, ipc, uts)".into())?;
            nix::unistd::sethostname(&host).ctx(|| format!("sethostname {host}"))?;
            let none: Option<&str> = None;
            for (ns, target) in [("net", &netns), ("ipc", &ipc), ("uts", &uts)] {
                let src = format!("/proc/thread-self/ns/{ns}");
                mount(
                    Some(src.as_str()),
                    target.as_path(),
                    none,
                    MsFlags::MS_BIND,
                    none,
                )
                .ctx(|| format!("bind-mounting {src} onto {}", target.display()))?;
            }
            // A child forked from this thread starts in the new network namespace.
            let out = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .stdin(Stdio::null())
                .output()
                .ctx(|| "running ip link set lo up".into())?;
            if !out.status.success() {
                return Err(RuntimeError::Command {
                    binary: "ip".into(),
                    args: "link set lo up".into(),
                    message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            Ok(())
        })
        .ctx(|| "spawning sandbox thread".into())?;
    handle
        .join()
        .map_err(|_| RuntimeError::Other("sandbox thread panicked".into()))??;

    let sb = Sandbox {
        pod_uid: spec.pod_uid.clone(),
        namespace: spec.namespace.clone(),
        name: spec.name.clone(),
        hostname,
        netns_path: paths.netns.clone(),
        netns_name: netns_name(&spec.pod_uid),
        ipc_ns_path: paths.ipc.clone(),
        uts_ns_path: paths.uts.clone(),
        dir: paths.dir.clone(),
        created_at: chrono::Utc::now(),
    };
    let data = serde_json::to_vec_pretty(&sb).map_err(|e| RuntimeError::Other(e.to_string()))?;
    sys::write_atomic(&paths.meta, &data).ctx(|| "writing sandbox.json".into())?;
    Ok(sb)
}

/// Unmounts and deletes the namespace files and the sandbox directory. Idempotent.
pub fn destroy(paths: &SandboxPaths) -> Result<(), RuntimeError> {
    sys::unmount_all_under(&paths.netns).ctx(|| format!("unmounting {}", paths.netns.display()))?;
    sys::remove_file_if_exists(&paths.netns)
        .ctx(|| format!("removing {}", paths.netns.display()))?;
    sys::unmount_all_under(&paths.dir).ctx(|| format!("unmounting {}", paths.dir.display()))?;
    sys::remove_dir_all_if_exists(&paths.dir).ctx(|| format!("removing {}", paths.dir.display()))
}

/// Whether every namespace file of the sandbox is still a mount.
pub fn intact(paths: &SandboxPaths) -> bool {
    let mounts = sys::mount_points();
    [&paths.netns, &paths.ipc, &paths.uts]
        .iter()
        .all(|p| mounts.iter().any(|m| m == *p))
}
