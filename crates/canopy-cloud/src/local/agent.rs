//! The process that makes a namespace a "VM": `canopy agent`, started inside the server's
//! network namespace and cgroup, detached from the provider (it outlives the controller,
//! as a VM would).

use std::{
    fs,
    io::Write,
    os::unix::{
        fs::{MetadataExt, OpenOptionsExt},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context, Result};
use tokio::process::Command;

use super::state::AgentProcess;

/// Runs before the agent, in the process that becomes it: moves itself into the server's
/// cgroups, then execs `nsenter --net=… agent …`. Moving the pid from outside after spawn
/// would leave a window in which the agent's first children could start in the provider's
/// cgroup; from inside there is none, and the pid stays the same through both execs.
const LAUNCH: &str = r#"for f in $CANOPY_CGROUP_PROCS; do echo $$ > "$f" || exit 125; done
unset CANOPY_CGROUP_PROCS
exec "$@""#;

/// The environment of the agent: a VM does not inherit its cloud controller's variables
/// (which may hold credentials).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to start.
pub struct Launch<'a> {
    pub server: &'a str,
    pub netns: &'a str,
    pub binary: &'a Path,
    pub args: Vec<String>,
    pub cgroup_procs: Vec<PathBuf>,
    pub log: PathBuf,
    pub pid_file: PathBuf,
}

/// Starts the agent and returns its identity. A task reaps it when it exits, while this
/// process lives; after that, init does.
pub fn start(launch: Launch<'_>) -> Result<AgentProcess> {
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&launch.log)
        .with_context(|| format!("opening {}", launch.log.display()))?;
    writeln!(
        log,
        "--- {} canopy-cloud: starting the agent of server {}",
        chrono::Utc::now().to_rfc3339(),
        launch.server
    )
    .with_context(|| format!("writing {}", launch.log.display()))?;
    let stderr = log.try_clone()?;
    let cgroup_procs = launch
        .cgroup_procs
        .iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(LAUNCH)
        .arg("canopy-vm")
        // The VM's network namespace, and a mount namespace of its own: everything the
        // agent mounts (containers' root filesystems, volumes, pods' namespaces) lives and
        // dies with the VM, as in a real one. Not `ip netns exec`, whose fresh /sys would
        // hide the cgroup hierarchies runc needs. Both exec in place: the pid stays.
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", launch.netns))
        .args(["--", "unshare", "--mount", "--propagation", "slave", "--"])
        .arg(launch.binary)
        .args(&launch.args)
        .env_clear()
        .env("PATH", PATH)
        .env("CANOPY_CGROUP_PROCS", cgroup_procs)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr))
        .kill_on_drop(false);
    if let Ok(filter) = std::env::var("RUST_LOG") {
        command.env("RUST_LOG", filter);
    }
    // Its own process group: a Ctrl-C at the controller's terminal is not the VM's.
    command.as_std_mut().process_group(0);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting the agent of server {}", launch.server))?;
    let pid = child
        .id()
        .context("the agent exited before its pid was read")?;
    // Not yet reaped, so /proc/<pid> is there even if it already exited.
    let start_time = start_time(pid).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let process = AgentProcess {
        pid,
        start_time,
        boot_id: boot_id()?,
    };
    let server = launch.server.to_string();
    tokio::spawn(async move {
        match child.wait().await {
            Ok(status) => tracing::info!(server, pid, %status, "agent exited"),
            Err(e) => tracing::warn!(server, pid, error = %e, "waiting for the agent"),
        }
    });
    super::state::write_atomic(&launch.pid_file, format!("{pid}\n").as_bytes(), 0o644)?;
    Ok(process)
}

/// Whether the recorded agent still runs: same boot, same pid with the same start time,
/// and not a zombie.
pub fn is_alive(process: &AgentProcess) -> bool {
    let Ok(current_boot) = boot_id() else {
        return false;
    };
    if current_boot != process.boot_id {
        return false;
    }
    match stat(process.pid) {
        Some((state, start)) => start == process.start_time && !matches!(state, 'Z' | 'X'),
        None => false,
    }
}

/// Whether the agent runs in the namespace now named `netns` (not in one deleted behind
/// the provider's back, which `ip netns add` cannot bring back).
pub fn in_netns(process: &AgentProcess, netns: &str) -> bool {
    let theirs = fs::metadata(format!("/proc/{}/ns/net", process.pid));
    let ours = fs::metadata(Path::new("/run/netns").join(netns));
    match (theirs, ours) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, start)| start)
}

/// The state and start time of a process, from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<(char, u64)> {
    // The command name (field 2) is in parentheses and may itself hold ") ": the fields
    // that follow start after the last one.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 (starttime) is the 20th after the command name.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// This boot's id (read once: it cannot change while this process lives).
fn boot_id() -> Result<String> {
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(id) = BOOT_ID.get() {
        return Ok(id.clone());
    }
    let id = fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .context("reading the boot id")?
        .trim()
        .to_string();
    Ok(BOOT_ID.get_or_init(|| id).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let text =
            "4242 (a) b) (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_stat(text), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn recognises_itself_and_not_an_impostor() {
        let me = std::process::id();
        let process = AgentProcess {
            pid: me,
            start_time: start_time(me).unwrap(),
            boot_id: boot_id().unwrap(),
        };
        assert!(is_alive(&process));
        let reused = AgentProcess {
            start_time: process.start_time + 1,
            ..process.clone()
        };
        assert!(!is_alive(&reused), "same pid, other process");
        let rebooted = AgentProcess {
            boot_id: "another-boot".into(),
            ..process
        };
        assert!(!is_alive(&rebooted));
    }
}
