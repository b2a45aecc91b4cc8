//! Builds a container's OCI `config.json` (runc's default spec plus the pod's settings).

use std::fs;
use std::path::Path;

use oci_spec::runtime::Spec;
use serde_json::{Value, json};

use crate::types::{ContainerSpec, RuntimeError, Sandbox};

/// Docker/containerd's default capability set.
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability up to CAP_CHECKPOINT_RESTORE, for privileged containers.
const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// runc's default masked paths.
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

/// runc's default read-only paths.
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Resolved process identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// A file of the image read from the host, as the image sees it only if nothing on the way
/// is a symlink (which the host would resolve against its own root) and it is a regular
/// file (a FIFO would block, /dev/zero would never end); at most 1 MiB. Anything else reads
/// as empty: the user is then looked up as if the image had no such file.
fn read_image_file(rootfs: &Path, relative: &str) -> String {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let mut path = rootfs.to_path_buf();
    for part in relative.split('/') {
        path.push(part);
        match fs::symlink_metadata(&path) {
            Ok(meta) if !meta.file_type().is_symlink() => {}
            _ => return String::new(),
        }
    }
    let Ok(file) = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&path)
    else {
        return String::new();
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.take(1 << 20).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

fn read_passwd(rootfs: &Path) -> Vec<PasswdEntry> {
    let text = read_image_file(rootfs, "etc/passwd");
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        })
        .collect()
}

fn read_group(rootfs: &Path) -> Vec<GroupEntry> {
    let text = read_image_file(rootfs, "etc/group");
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

fn id_from_i64(v: i64, what: &str) -> Result<u32, RuntimeError> {
    u32::try_from(v).map_err(|_| RuntimeError::InvalidSpec(format!("{what} {v} out of range")))
}

/// Resolves the container's uid/gid/groups like containerd: `run_as_user`/`run_as_group`
/// override the `user` string, names are looked up in the rootfs's /etc/passwd and
/// /etc/group, the primary gid defaults to the passwd entry's, and groups listing the user
/// in /etc/group are added to the supplemental groups.
pub fn resolve_user(rootfs: &Path, spec: &ContainerSpec) -> Result<ResolvedUser, RuntimeError> {
    let passwd = read_passwd(rootfs);
    let groups = read_group(rootfs);
    let by_uid = |uid: u32| passwd.iter().find(|p| p.uid == uid);

    let (mut uid, mut gid) = (0u32, None::<u32>);
    if let Some(user) = spec.user.as_deref().filter(|u| !u.is_empty()) {
        let (u, g) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user, None),
        };
        uid = match u.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                passwd
                    .iter()
                    .find(|p| p.name == u)
                    .ok_or_else(|| {
                        RuntimeError::InvalidSpec(format!(
                            "unable to find user {u}: no matching entries in passwd file"
                        ))
                    })?
                    .uid
            }
        };
        if let Some(g) = g.filter(|g| !g.is_empty()) {
            gid = Some(match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => {
                    groups
                        .iter()
                        .find(|e| e.name == g)
                        .ok_or_else(|| {
                            RuntimeError::InvalidSpec(format!(
                                "unable to find group {g}: no matching entries in group file"
                            ))
                        })?
                        .gid
                }
            });
        }
    }
    if let Some(u) = spec.run_as_user {
        uid = id_from_i64(u, "runAsUser")?;
        gid = None;
    }
    if let Some(g) = spec.run_as_group {
        gid = Some(id_from_i64(g, "runAsGroup")?);
    }
    let entry = by_uid(uid);
    let gid = gid.or(entry.map(|e| e.gid)).unwrap_or(0);
    let mut additional = Vec::new();
    if let Some(e) = entry {
        for g in &groups {
            if g.members.contains(&e.name) && !additional.contains(&g.gid) {
                additional.push(g.gid);
            }
        }
    }
    for g in &spec.supplemental_groups {
        let g = id_from_i64(*g, "supplementalGroup")?;
        if !additional.contains(&g) {
            additional.push(g);
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids: additional,
    })
}

/// Upstream's `MilliCPUToShares`: 1024 shares per CPU, at least 2.
pub fn cpu_shares(request_millis: Option<u64>) -> u64 {
    let m = request_millis.unwrap_or(0);
    (m.saturating_mul(1024) / 1000).max(2)
}

/// Inputs of [`build_spec`] other than the container spec.
pub struct SpecInputs<'a> {
    pub sandbox: &'a Sandbox,
    pub rootfs: &'a Path,
    pub cgroups_path: &'a str,
    pub user: &'a ResolvedUser,
    /// Whether the v1 memory hierarchy can limit swap (memory.memsw.*).
    pub limit_swap: bool,
}

/// Builds the OCI spec. It is assembled as JSON mirroring runc's `runc spec` output and
/// then parsed into oci-spec's types, which validates the shape before runc sees it.
pub fn build_spec(spec: &ContainerSpec, inp: &SpecInputs<'_>) -> Result<Spec, RuntimeError> {
    if spec.args.is_empty() {
        return Err(RuntimeError::InvalidSpec("no command given".into()));
    }
    let mut env: Vec<String> = Vec::new();
    if !spec.env.iter().any(|(k, _)| k == "PATH") {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    if !spec.env.iter().any(|(k, _)| k == "HOSTNAME") {
        env.push(format!("HOSTNAME={}", inp.sandbox.hostname));
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') {
            return Err(RuntimeError::InvalidSpec(format!(
                "invalid environment variable name {k:?}"
            )));
        }
        env.push(format!("{k}={v}"));
    }
    let cwd = spec
        .working_dir
        .clone()
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(RuntimeError::InvalidSpec(format!(
            "working directory {cwd:?} is not absolute"
        )));
    }
    let caps: Vec<&str> = if spec.privileged {
        ALL_CAPS.to_vec()
    } else {
        DEFAULT_CAPS.to_vec()
    };
    let nofile = crate::sys::nofile_limit();
    let mut process = json!({
        "terminal": spec.tty,
        "user": {
            "uid": inp.user.uid,
            "gid": inp.user.gid,
            "additionalGids": inp.user.additional_gids,
        },
        "args": spec.args,
        "env": env,
        "cwd": cwd,
        "capabilities": {
            "bounding": caps,
            "effective": caps,
            "permitted": caps,
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
        "noNewPrivileges": !spec.privileged,
    });
    if let Some(adj) = spec.oom_score_adj {
        process["oomScoreAdj"] = json!(adj.clamp(-1000, 1000));
    }

    let sys_opts: Vec<&str> = if spec.privileged {
        vec!["nosuid", "noexec", "nodev"]
    } else {
        vec!["nosuid", "noexec", "nodev", "ro"]
    };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_opts}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
               "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ];
    let dir = &inp.sandbox.dir;
    let user_paths: Vec<&str> = spec
        .mounts
        .iter()
        .map(|m| m.container_path.as_str())
        .collect();
    for (file, dest) in [
        ("hosts", "/etc/hosts"),
        ("hostname", "/etc/hostname"),
        ("resolv.conf", "/etc/resolv.conf"),
    ] {
        if user_paths.contains(&dest) {
            continue;
        }
        mounts.push(json!({"destination": dest, "type": "bind",
            "source": dir.join(file), "options": ["rbind", "rprivate", "rw"]}));
    }
    for m in &spec.mounts {
        if !m.container_path.starts_with('/') {
            return Err(RuntimeError::InvalidSpec(format!(
                "mount path {:?} is not absolute",
                m.container_path
            )));
        }
        let rw = if m.read_only { "ro" } else { "rw" };
        mounts.push(json!({"destination": m.container_path, "type": "bind",
            "source": m.host_path, "options": ["rbind", "rprivate", rw]}));
    }

    let mut resources = json!({
        "devices": [{"allow": spec.privileged, "access": "rwm"}],
        "cpu": {"shares": cpu_shares(spec.cpu_request_millis)},
    });
    if let Some(limit) = spec.cpu_limit_millis {
        // Upstream's MilliCPUToQuota with a 100 ms period and a 1 ms minimum quota.
        resources["cpu"]["period"] = json!(100_000u64);
        resources["cpu"]["quota"] = json!((limit.saturating_mul(100)).clamp(1000, i64::MAX as u64));
    }
    if let Some(mem) = spec.memory_limit_bytes {
        let mem = mem.min(i64::MAX as u64);
        resources["memory"] = json!({"limit": mem});
        if inp.limit_swap {
            resources["memory"]["swap"] = json!(mem);
        }
    }
    let ns = |t: &str, p: Option<&Path>| match p {
        Some(p) => json!({"type": t, "path": p}),
        None => json!({"type": t}),
    };
    let mut linux = json!({
        "namespaces": [
            ns("pid", None),
            ns("mount", None),
            ns("network", Some(&inp.sandbox.netns_path)),
            ns("ipc", Some(&inp.sandbox.ipc_ns_path)),
            ns("uts", Some(&inp.sandbox.uts_ns_path)),
        ],
        "cgroupsPath": inp.cgroups_path,
        "resources": resources,
    });
    if !spec.privileged {
        linux["maskedPaths"] = json!(MASKED_PATHS);
        linux["readonlyPaths"] = json!(READONLY_PATHS);
    }
    let annotations: serde_json::Map<String, Value> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let doc = json!({
        "ociVersion": "1.0.2-dev",
        "process": process,
        "root": {"path": inp.rootfs, "readonly": spec.read_only_rootfs},
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux,
    });
    serde_json::from_value(doc).map_err(|e| RuntimeError::InvalidSpec(format!("OCI spec: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_files_are_never_read_through_host_symlinks_or_fifos() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        fs::create_dir(&etc).unwrap();
        fs::write(etc.join("group"), "root:x:0:\n").unwrap();
        assert_eq!(read_image_file(root.path(), "etc/group"), "root:x:0:\n");
        // A symlink resolves against the host's root when the agent reads it.
        std::os::unix::fs::symlink("/etc/passwd", etc.join("passwd")).unwrap();
        assert_eq!(read_image_file(root.path(), "etc/passwd"), "");
        // A FIFO would block the reader forever.
        fs::remove_file(etc.join("passwd")).unwrap();
        nix::unistd::mkfifo(&etc.join("passwd"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(read_image_file(root.path(), "etc/passwd"), "");
        // So does a symlinked directory on the way.
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join("group"), "secret:x:1:\n").unwrap();
        fs::remove_dir_all(&etc).unwrap();
        std::os::unix::fs::symlink(other.path(), &etc).unwrap();
        assert_eq!(read_image_file(root.path(), "etc/group"), "");
    }

    #[test]
    fn shares() {
        assert_eq!(cpu_shares(None), 2);
        assert_eq!(cpu_shares(Some(1)), 2);
        assert_eq!(cpu_shares(Some(1000)), 1024);
        assert_eq!(cpu_shares(Some(250)), 256);
    }

    #[test]
    fn users() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65533:nobody:/:/bin/false\napp:x:1000:1000::/:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nnogroup:x:65533:\napp:x:1000:\nwheel:x:10:app,root\n",
        )
        .unwrap();
        let mut s = ContainerSpec::default();
        let r = resolve_user(dir.path(), &s).unwrap();
        assert_eq!((r.uid, r.gid, r.additional_gids), (0, 0, vec![10]));
        s.user = Some("nobody".into());
        let r = resolve_user(dir.path(), &s).unwrap();
        assert_eq!((r.uid, r.gid), (65534, 65533));
        s.user = Some("app:nogroup".into());
        let r = resolve_user(dir.path(), &s).unwrap();
        assert_eq!(
            (r.uid, r.gid, r.additional_gids.clone()),
            (1000, 65533, vec![10])
        );
        s.user = Some("123:456".into());
        let r = resolve_user(dir.path(), &s).unwrap();
        assert_eq!((r.uid, r.gid), (123, 456));
        s.user = Some("ghost".into());
        assert!(resolve_user(dir.path(), &s).is_err());
        s.user = Some("app".into());
        s.run_as_user = Some(65534);
        s.supplemental_groups = vec![5, 10];
        let r = resolve_user(dir.path(), &s).unwrap();
        assert_eq!(
            (r.uid, r.gid, r.additional_gids),
            (65534, 65533, vec![5, 10])
        );
        s.run_as_user = Some(-1);
        assert!(resolve_user(dir.path(), &s).is_err());
    }
}
