//! The per-container monitor ("shim", like conmon).
//!
//! The agent starts one shim per container and forgets it. The shim outlives the agent
//! (own session, stdio not tied to the agent), so containers keep running and their exit
//! status is still recorded while the agent restarts. It:
//!
//! 1. becomes a session leader and a child subreaper, so the container's init (whose parent,
//!    `runc create`, exits) is reparented to it and can be `waitpid`ed;
//! 2. runs `runc create` with pipes as the container's stdout/stderr, then `runc start`,
//!    writing `<bundle>/started` (start time) — or `<bundle>/start-error` on failure;
//! 3. copies both pipes into the CRI log file (`<time> stdout|stderr F|P <line>`);
//! 4. reaps the init, reads the cgroup's OOM-kill count, runs `runc delete --force` (which
//!    removes the cgroup), and only then writes `<bundle>/exit.json` atomically, so that an
//!    Exited container never leaves a cgroup behind.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::attach::{self, Streams, Tee};
use crate::sys;

/// Maximum length of one CRI log line; longer lines are split into `P` records.
const MAX_LOG_LINE: usize = 16 * 1024;

/// Files inside a bundle that carry the container's lifecycle.
pub(crate) const PID_FILE: &str = "pid";
pub(crate) const STARTED_FILE: &str = "started";
pub(crate) const START_ERROR_FILE: &str = "start-error";
pub(crate) const EXIT_FILE: &str = "exit.json";

/// Arguments of the shim, passed on its command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShimArgs {
    pub id: String,
    pub bundle: PathBuf,
    pub runtime_binary: PathBuf,
    /// `runc --root`.
    pub runtime_root: PathBuf,
    pub log_path: PathBuf,
    /// Container cgroup path (as in config.json), read for OOM kills.
    pub cgroup_path: String,
    /// The container reads stdin (a pipe the shim writes attached clients' input to).
    pub stdin: bool,
    /// The first attached client to leave closes the container's stdin.
    pub stdin_once: bool,
    /// The container runs on a terminal whose master side the shim holds.
    pub tty: bool,
}

impl ShimArgs {
    /// The arguments after `shim` (the caller prepends the subcommand).
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--id".into(),
            self.id.clone(),
            "--bundle".into(),
            self.bundle.to_string_lossy().into_owned(),
            "--runtime".into(),
            self.runtime_binary.to_string_lossy().into_owned(),
            "--runtime-root".into(),
            self.runtime_root.to_string_lossy().into_owned(),
            "--log".into(),
            self.log_path.to_string_lossy().into_owned(),
            "--cgroup".into(),
            self.cgroup_path.clone(),
            "--stdin".into(),
            self.stdin.to_string(),
            "--stdin-once".into(),
            self.stdin_once.to_string(),
            "--tty".into(),
            self.tty.to_string(),
        ]
    }

    /// Parses what [`ShimArgs::to_args`] produced; a leading `shim` word is skipped.
    pub fn parse(args: &[String]) -> Result<ShimArgs> {
        let rest = match args.first() {
            Some(first) if first == "shim" => &args[1..],
            _ => args,
        };
        let mut it = rest.iter();
        let (mut id, mut bundle, mut runtime, mut root, mut log, mut cgroup) =
            (None, None, None, None, None, None);
        let (mut stdin, mut stdin_once, mut tty) = (false, false, false);
        let boolean = |flag: &str, value: &str| -> Result<bool> {
            value
                .parse()
                .with_context(|| format!("{flag} takes true or false, not {value:?}"))
        };
        while let Some(flag) = it.next() {
            let value = it
                .next()
                .with_context(|| format!("missing value for {flag}"))?
                .clone();
            match flag.as_str() {
                "--id" => id = Some(value),
                "--bundle" => bundle = Some(PathBuf::from(value)),
                "--runtime" => runtime = Some(PathBuf::from(value)),
                "--runtime-root" => root = Some(PathBuf::from(value)),
                "--log" => log = Some(PathBuf::from(value)),
                "--cgroup" => cgroup = Some(value),
                "--stdin" => stdin = boolean(flag, &value)?,
                "--stdin-once" => stdin_once = boolean(flag, &value)?,
                "--tty" => tty = boolean(flag, &value)?,
                other => bail!("unknown shim argument {other}"),
            }
        }
        Ok(ShimArgs {
            id: id.context("--id is required")?,
            bundle: bundle.context("--bundle is required")?,
            runtime_binary: runtime.context("--runtime is required")?,
            runtime_root: root.context("--runtime-root is required")?,
            log_path: log.context("--log is required")?,
            cgroup_path: cgroup.unwrap_or_default(),
            stdin,
            stdin_once,
            tty,
        })
    }
}

/// Content of `<bundle>/exit.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default)]
    pub oom_killed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: DateTime<Utc>,
}

pub(crate) fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// Runs the monitor to completion. Errors before the container started are also recorded
/// in `<bundle>/start-error` for the agent.
pub fn run_shim(args: &ShimArgs) -> Result<()> {
    // Not fatal: if we are already a session leader (or the call is refused) the shim
    // still works, it is just more exposed to the parent's terminal signals.
    let _ = nix::unistd::setsid();
    nix::sys::prctl::set_child_subreaper(true).context("set child subreaper")?;
    match start(args) {
        Ok(started) => monitor(args, started),
        Err(e) => {
            let msg = format!("{e:#}");
            let _ = sys::write_atomic(&args.bundle.join(START_ERROR_FILE), msg.as_bytes());
            // Best effort: leave no half-created container behind.
            let _ = runc(args, &["delete", "--force", &args.id]);
            Err(e)
        }
    }
}

fn runc(args: &ShimArgs, extra: &[&str]) -> Result<std::process::Output> {
    Command::new(&args.runtime_binary)
        .arg("--root")
        .arg(&args.runtime_root)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", args.runtime_binary.display()))
}

/// runc with its state root and a JSON log file, whose last error explains a failure
/// better than runc's stderr.
fn runc_logged(args: &ShimArgs, log: &std::path::Path) -> Command {
    let mut command = Command::new(&args.runtime_binary);
    command
        .arg("--root")
        .arg(&args.runtime_root)
        .arg("--log")
        .arg(log)
        .arg("--log-format")
        .arg("json");
    command
}

struct Started {
    pid: i32,
    started_at: DateTime<Utc>,
    copiers: mpsc::Receiver<()>,
    n_copiers: usize,
    streams: Arc<Streams>,
}

/// Extracts the last error message from runc's JSON log (`--log-format json`).
fn runc_log_error(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["level"] == "error" || v["level"] == "fatal")
        .filter_map(|v| v["msg"].as_str().map(str::to_string))
        .next()
}

fn start(args: &ShimArgs) -> Result<Started> {
    let runc_log = args.bundle.join("runc.log");
    let pid_file = args.bundle.join(PID_FILE);
    // A terminal's master side comes over a console socket while `runc create` runs; its
    // path must fit `sun_path` and runc resolves it itself, so it lives in /run.
    let console = if args.tty {
        let path = PathBuf::from(format!("/run/canopy-console-{}.sock", std::process::id()));
        let _ = fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("binding {}", path.display()))?;
        let receiver = std::thread::spawn(move || crate::attach::receive_terminal(&listener));
        Some((path, receiver))
    } else {
        None
    };
    let (stdin_reader, stdin_writer) = if args.stdin && !args.tty {
        let (reader, writer) = std::io::pipe().context("making the stdin pipe")?;
        (
            Some(reader),
            Some(File::from(std::os::fd::OwnedFd::from(writer))),
        )
    } else {
        (None, None)
    };
    let mut create = runc_logged(args, &runc_log);
    create.arg("create").arg("--bundle").arg(&args.bundle);
    if let Some((path, _)) = &console {
        create.arg("--console-socket").arg(path);
    }
    let mut child = create
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(&args.id)
        .stdin(match stdin_reader {
            Some(reader) => Stdio::from(reader),
            None => Stdio::null(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", args.runtime_binary.display()))?;
    // Our copy of the container's end of stdin must go, or the container never sees EOF.
    drop(create);
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    let status = child.wait().context("waiting for runc create")?;
    if let Some((path, _)) = &console {
        let _ = fs::remove_file(path);
    }
    if !status.success() {
        // The container's init is gone, so the pipes are at EOF once runc exited.
        let mut out = String::new();
        let _ = stderr.read_to_string(&mut out);
        let msg = runc_log_error(&runc_log).unwrap_or_else(|| out.trim().to_string());
        bail!("runc create: {msg}");
    }
    let pid = sys::read_pid(&pid_file).context("runc create wrote no pid file")?;

    let log = open_log(&args.log_path)?;
    let (tx, rx) = mpsc::channel();
    let (streams, n_copiers) = match console {
        Some((_, receiver)) => {
            let terminal = receiver
                .join()
                .map_err(|_| anyhow::anyhow!("the console receiver panicked"))?
                .context("receiving the container's terminal")?;
            let input = terminal.try_clone().context("duplicating the terminal")?;
            let output = terminal.try_clone().context("duplicating the terminal")?;
            let streams =
                Streams::new(args.stdin.then_some(input), Some(terminal), args.stdin_once);
            // On a terminal both streams are one; runc's own pipes carry nothing more.
            spawn_copier(
                Tee {
                    inner: output,
                    streams: streams.clone(),
                    kind: attach::STDOUT,
                },
                "stdout",
                log,
                tx,
            );
            (streams, 1)
        }
        None => {
            let streams = Streams::new(stdin_writer, None, args.stdin_once);
            spawn_copier(
                Tee {
                    inner: stdout,
                    streams: streams.clone(),
                    kind: attach::STDOUT,
                },
                "stdout",
                log.clone(),
                tx.clone(),
            );
            spawn_copier(
                Tee {
                    inner: stderr,
                    streams: streams.clone(),
                    kind: attach::STDERR,
                },
                "stderr",
                log,
                tx,
            );
            (streams, 2)
        }
    };
    // Attaching is a convenience: a container runs without it.
    if let Err(error) = streams.serve(&args.bundle) {
        eprintln!("serving attach for {}: {error}", args.id);
    }

    let out = runc_logged(args, &runc_log)
        .arg("start")
        .arg(&args.id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("running runc start")?;
    if !out.status.success() {
        let msg = runc_log_error(&runc_log)
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string());
        bail!("runc start: {msg}");
    }
    let started_at = Utc::now();
    sys::write_atomic(
        &args.bundle.join(STARTED_FILE),
        rfc3339(&started_at).as_bytes(),
    )
    .context("writing started marker")?;
    Ok(Started {
        pid,
        started_at,
        copiers: rx,
        n_copiers,
        streams,
    })
}

/// The container's log file. Log rotation renames the file away: the shim notices (the
/// path no longer names the inode it writes to, checked at most once a second) and
/// reopens the path, so rotation needs no signal to the shim (CRI's ReopenContainerLog).
struct LogFile {
    path: PathBuf,
    file: File,
    ino: u64,
    checked: std::time::Instant,
}

impl LogFile {
    fn open(path: &Path) -> Result<LogFile> {
        use std::os::unix::fs::MetadataExt;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening log {}", path.display()))?;
        let ino = file.metadata().map(|m| m.ino()).unwrap_or(0);
        Ok(LogFile {
            path: path.to_path_buf(),
            file,
            ino,
            checked: std::time::Instant::now(),
        })
    }

    fn write(&mut self, rec: &[u8]) {
        use std::os::unix::fs::MetadataExt;
        if self.checked.elapsed() >= Duration::from_secs(1) {
            self.checked = std::time::Instant::now();
            let current = fs::metadata(&self.path).map(|m| m.ino()).ok();
            if current != Some(self.ino)
                && let Ok(reopened) = LogFile::open(&self.path)
            {
                *self = reopened;
            }
        }
        // A full disk must not block the container: drop the record.
        let _ = self.file.write_all(rec);
    }
}

fn open_log(path: &Path) -> Result<Arc<Mutex<LogFile>>> {
    Ok(Arc::new(Mutex::new(LogFile::open(path)?)))
}

/// Formats one CRI log record.
pub(crate) fn cri_line(
    time: &DateTime<Utc>,
    stream: &str,
    partial: bool,
    content: &[u8],
) -> Vec<u8> {
    let mut rec = format!(
        "{} {} {} ",
        rfc3339(time),
        stream,
        if partial { "P" } else { "F" }
    )
    .into_bytes();
    rec.extend_from_slice(content);
    rec.push(b'\n');
    rec
}

/// Splits a byte stream into CRI records: full lines get `F`, chunks of an overlong line and
/// a final unterminated line get `P`.
pub(crate) fn copy_stream<R: Read>(reader: R, stream: &str, mut emit: impl FnMut(Vec<u8>)) {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if buf.is_empty() {
            break;
        }
        let room = MAX_LOG_LINE - line.len();
        let take = buf.len().min(room);
        match buf[..take].iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..i]);
                reader.consume(i + 1);
                emit(cri_line(&Utc::now(), stream, false, &line));
                line.clear();
            }
            None => {
                line.extend_from_slice(&buf[..take]);
                reader.consume(take);
                if line.len() >= MAX_LOG_LINE {
                    emit(cri_line(&Utc::now(), stream, true, &line));
                    line.clear();
                }
            }
        }
    }
    if !line.is_empty() {
        emit(cri_line(&Utc::now(), stream, true, &line));
    }
}

fn spawn_copier<R: Read + Send + 'static>(
    reader: R,
    stream: &'static str,
    log: Arc<Mutex<LogFile>>,
    done: mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        copy_stream(reader, stream, |rec| log.lock().write(&rec));
        let _ = done.send(());
    });
}

fn monitor(args: &ShimArgs, started: Started) -> Result<()> {
    let target = Pid::from_raw(started.pid);
    let (exit_code, signal) = loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(p, code)) if p == target => break (code, None),
            Ok(WaitStatus::Signaled(p, sig, _)) if p == target => {
                break (128 + sig as i32, Some(sig as i32));
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => {
                // Not our child (should not happen): wait for it to vanish; status unknown.
                while sys::process_alive(started.pid) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                break (255, None);
            }
        }
    };
    let finished_at = Utc::now();
    // The pipes reach EOF when every process of the container is gone (the kernel kills
    // the rest of the pid namespace with its init). Do not hang on a stray holder.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    for _ in 0..started.n_copiers {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if started.copiers.recv_timeout(left).is_err() {
            break;
        }
    }
    started.streams.close_all();
    let oom_killed = sys::oom_kill_count(&args.cgroup_path) > 0;
    let out = runc(args, &["delete", "--force", &args.id]);
    if let Ok(o) = &out
        && !o.status.success()
    {
        eprintln!(
            "runc delete {}: {}",
            args.id,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let rec = ExitRecord {
        exit_code,
        signal,
        oom_killed,
        started_at: Some(started.started_at),
        finished_at,
    };
    let data = serde_json::to_vec(&rec)?;
    sys::write_atomic(&args.bundle.join(EXIT_FILE), &data).context("writing exit.json")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(input: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        copy_stream(input, "stdout", |rec| {
            let s = String::from_utf8(rec).unwrap();
            let mut parts = s.splitn(4, ' ');
            let _time = parts.next().unwrap();
            assert_eq!(parts.next().unwrap(), "stdout");
            let tag = parts.next().unwrap().to_string();
            let body = parts.next().unwrap().trim_end_matches('\n').to_string();
            out.push((tag, body));
        });
        out
    }

    #[test]
    fn splits_lines() {
        assert_eq!(
            records(b"a\nbb\n\nc"),
            vec![
                ("F".into(), "a".into()),
                ("F".into(), "bb".into()),
                ("F".into(), "".into()),
                ("P".into(), "c".into())
            ]
        );
        let long = vec![b'x'; MAX_LOG_LINE + 10];
        let mut input = long.clone();
        input.push(b'\n');
        let r = records(&input);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, "P");
        assert_eq!(r[0].1.len(), MAX_LOG_LINE);
        assert_eq!(r[1], ("F".into(), "x".repeat(10)));
    }

    #[test]
    fn args_roundtrip() {
        let a = ShimArgs {
            id: "x".into(),
            bundle: "/b".into(),
            runtime_binary: "runc".into(),
            runtime_root: "/r".into(),
            log_path: "/l".into(),
            cgroup_path: "/canopy/podx/x".into(),
            stdin: true,
            stdin_once: false,
            tty: true,
        };
        let mut v = vec!["shim".to_string()];
        v.extend(a.to_args());
        assert_eq!(ShimArgs::parse(&v).unwrap(), a);
        assert_eq!(ShimArgs::parse(&a.to_args()).unwrap(), a);
        assert!(ShimArgs::parse(&["--id".to_string()]).is_err());
    }
}
