//! Public data types of the runtime API.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Static configuration of a [`crate::Runtime`].
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// The OCI runtime (`runc` on `PATH` by default; `crun` works too).
    pub runtime_binary: PathBuf,
    /// The executable that runs the monitor: invoked as `<shim_binary> shim <args...>`.
    pub shim_binary: PathBuf,
    /// Persistent data: container upper/work dirs (e.g. `/var/lib/canopy/agent`).
    pub root_dir: PathBuf,
    /// Runtime state lost at reboot: bundles, sandbox files, `runc --root` (e.g. `/run/canopy/agent`).
    pub state_dir: PathBuf,
    /// Cgroup parent (cgroupfs driver) of every pod cgroup, e.g. `canopy`.
    pub cgroup_parent: String,
}

/// resolv.conf content of a sandbox. All empty means "copy the host's /etc/resolv.conf".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// What a pod sandbox is made of.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub pod_uid: String,
    pub namespace: String,
    pub name: String,
    /// Hostname inside the pod; empty means the pod name.
    pub hostname: String,
    pub dns: DnsConfig,
    /// Extra /etc/hosts lines `(ip, names)`, after the localhost lines (e.g. the pod IP).
    pub hosts: Vec<(String, Vec<String>)>,
}

/// A pod sandbox: pinned network, IPC and UTS namespaces plus per-pod files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub pod_uid: String,
    pub namespace: String,
    pub name: String,
    pub hostname: String,
    /// Bind-mounted network namespace, `/run/netns/<netns_name>` (usable by `ip netns` and CNI).
    pub netns_path: PathBuf,
    pub netns_name: String,
    pub ipc_ns_path: PathBuf,
    pub uts_ns_path: PathBuf,
    /// Directory holding hosts, hostname and resolv.conf.
    pub dir: PathBuf,
    pub created_at: DateTime<Utc>,
}

/// A host path bind-mounted into a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    pub host_path: PathBuf,
    pub container_path: String,
    pub read_only: bool,
}

/// Everything needed to run one container of a sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub pod_uid: String,
    pub name: String,
    pub attempt: u32,
    /// Unpacked image layers, base layer first.
    pub lower_dirs: Vec<PathBuf>,
    /// Final argv.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// "uid", "uid:gid", "name", "name:group" (image USER or securityContext).
    pub user: Option<String>,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub supplemental_groups: Vec<i64>,
    pub privileged: bool,
    pub read_only_rootfs: bool,
    pub cpu_request_millis: Option<u64>,
    pub cpu_limit_millis: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    /// `/proc/<pid>/oom_score_adj` of the container process (the agent computes it from QoS).
    pub oom_score_adj: Option<i32>,
    pub mounts: Vec<BindMount>,
    pub log_path: PathBuf,
    pub labels: BTreeMap<String, String>,
    /// Keep a stdin open for attached clients.
    pub stdin: bool,
    /// Close that stdin when the first attached client leaves.
    pub stdin_once: bool,
    /// Run on a terminal.
    pub tty: bool,
}

/// Observed state of a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub id: String,
    pub pod_uid: String,
    pub name: String,
    pub attempt: u32,
    pub labels: BTreeMap<String, String>,
    pub state: ContainerState,
    pub log_path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    /// Bundle made, process not (yet) started.
    Created,
    Running {
        pid: i32,
        started_at: DateTime<Utc>,
    },
    /// `exit_code` is 128+signal when killed by a signal; 255 with no signal when the
    /// monitor vanished and the real status is unknown.
    Exited {
        exit_code: i32,
        signal: Option<i32>,
        oom_killed: bool,
        started_at: Option<DateTime<Utc>>,
        finished_at: DateTime<Utc>,
    },
}

/// Result of [`crate::Runtime::exec_sync`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A process started in a running container with its standard streams handed to the
/// caller (`kubectl exec`).
pub struct ExecSession {
    /// `runc exec`, which exits with the process's status.
    pub child: tokio::process::Child,
    /// The process's streams.
    pub io: ExecIo,
}

/// How an exec session's process talks.
pub enum ExecIo {
    /// Plain pipes; `stdin` only when asked for.
    Pipes {
        stdin: Option<tokio::process::ChildStdin>,
        stdout: tokio::process::ChildStdout,
        stderr: tokio::process::ChildStderr,
    },
    /// A terminal: input and output both go through the pty's master side; resize it with
    /// [`ExecSession::resize`].
    Tty { master: std::fs::File },
}

impl ExecSession {
    /// Sets the terminal size of a tty session: on our pty (runc's console), which runc
    /// copies into the container's when it gets SIGWINCH.
    pub fn resize(&self, width: u16, height: u16) -> std::io::Result<()> {
        let ExecIo::Tty { master } = &self.io else {
            return Ok(());
        };
        let size = rustix::termios::Winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(master, size)?;
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGWINCH,
            );
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerEventKind {
    Started,
    Exited,
}

/// A state change noticed by the runtime's watcher (see [`crate::Runtime::subscribe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerEvent {
    pub id: String,
    pub pod_uid: String,
    pub kind: ContainerEventKind,
}

/// Errors of the runtime. Messages carry the OCI runtime's stderr where there is one.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("sandbox {0} not found")]
    SandboxNotFound(String),
    #[error("container {0} not found")]
    ContainerNotFound(String),
    #[error("container {0} already exists")]
    AlreadyExists(String),
    /// The container could not be started (e.g. executable not found): upstream's StartError.
    #[error("failed to start container {id}: {message}")]
    StartFailed { id: String, message: String },
    #[error("{binary} {args}: {message}")]
    Command {
        binary: String,
        args: String,
        message: String,
    },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl RuntimeError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds a path/context to io errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, RuntimeError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, RuntimeError> {
        self.map_err(|e| RuntimeError::io(context(), e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, RuntimeError> {
        self.map_err(|e| RuntimeError::io(context(), std::io::Error::from(e)))
    }
}
