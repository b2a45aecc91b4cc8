//! Small Linux helpers: atomic files, mount table, cgroup cleanup, process liveness.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, umount2};

/// Writes `data` to `path` through a temporary file and a rename, so readers (possibly in
/// another process, after a crash) see either nothing or the whole file.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// Unescapes the octal escapes (`\040`) the kernel uses in /proc/self/mountinfo.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(oct) = s.get(i + 1..i + 4)
            && let Ok(v) = u8::from_str_radix(oct, 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// All mount points of this mount namespace (in mount order).
pub fn mount_points() -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .collect()
}

/// Whether `path` is a mount point.
pub fn is_mounted(path: &Path) -> bool {
    mount_points().iter().any(|p| p == path)
}

/// Lazily unmounts every mount at or below `path`, deepest first. Missing mounts are fine:
/// removal must be idempotent after a crash half-way through.
pub fn unmount_all_under(path: &Path) -> Result<(), std::io::Error> {
    let mut mounts: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| p.starts_with(path))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in mounts {
        // A path can be mounted several times over; detach until nothing is left.
        for _ in 0..16 {
            match umount2(&m, MntFlags::MNT_DETACH) {
                Ok(()) => {}
                Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Removes a directory tree, tolerating its absence.
pub fn remove_dir_all_if_exists(path: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Removes a file, tolerating its absence.
pub fn remove_file_if_exists(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Pure cgroup v2 host (otherwise v1 or hybrid, where limits live in the v1 hierarchies).
pub fn is_cgroup_v2() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").exists()
}

/// Every directory that represents cgroup path `rel` (e.g. `canopy/pod<uid>`): one per
/// mounted hierarchy on v1/hybrid, one on v2.
pub fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let rel = rel.trim_start_matches('/');
    if is_cgroup_v2() {
        return vec![Path::new(CGROUP_ROOT).join(rel)];
    }
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(CGROUP_ROOT) {
        for e in entries.flatten() {
            // Symlinks like cpu,cpuacct -> cpu point at hierarchies listed anyway.
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(e.path().join(rel));
            }
        }
    }
    out
}

/// Removes the cgroup directories for `rel` and their children, deepest first. A cgroup
/// directory can only be removed once empty of processes, so errors are returned.
pub fn remove_cgroup(rel: &str) -> std::io::Result<()> {
    let mut first_err = None;
    for dir in cgroup_dirs(rel) {
        if let Err(e) = remove_cgroup_dir(&dir)
            && first_err.is_none()
        {
            first_err = Some(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn remove_cgroup_dir(dir: &Path) -> std::io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in entries.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_dir(&e.path())?;
        }
    }
    // The kernel may take a moment to release a cgroup whose last task just exited.
    let mut last = None;
    for _ in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("cgroup removal failed")))
}

/// OOM kills recorded for the container cgroup `rel` (v1 `memory.oom_control`, v2
/// `memory.events`). Zero when unknown.
pub fn oom_kill_count(rel: &str) -> u64 {
    let rel = rel.trim_start_matches('/');
    let file = if is_cgroup_v2() {
        Path::new(CGROUP_ROOT).join(rel).join("memory.events")
    } else {
        Path::new(CGROUP_ROOT)
            .join("memory")
            .join(rel)
            .join("memory.oom_control")
    };
    let Ok(text) = fs::read_to_string(file) else {
        return 0;
    };
    text.lines()
        .filter_map(|l| l.strip_prefix("oom_kill "))
        .filter_map(|v| v.trim().parse().ok())
        .next()
        .unwrap_or(0)
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain ')'.
    match stat.rfind(')') {
        Some(i) => !matches!(
            stat[i + 1..].trim_start().chars().next(),
            Some('Z') | Some('X')
        ),
        None => false,
    }
}

/// Reads a pid file; `None` when absent or garbage.
pub fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The NOFILE limit to give containers: 1048576 like containerd, but never above our own
/// hard limit, which cannot be raised without CAP_SYS_RESOURCE (missing in some sandboxes).
pub fn nofile_limit() -> u64 {
    const WANT: u64 = 1_048_576;
    let Ok(text) = fs::read_to_string("/proc/self/limits") else {
        return WANT;
    };
    let hard = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|h| h.parse::<u64>().ok());
    match hard {
        Some(h) => h.min(WANT),
        None => WANT, // "unlimited" or unparsable
    }
}
