//! Running Canopy and etcd as child processes, for benchmarks and end-to-end tests.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// An etcd started for the benchmark in a temporary directory.
pub struct Etcd {
    child: Child,
    /// Client URL.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts `etcd` from PATH on free loopback ports and waits until it answers.
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let client = free_port()?;
        let peer = free_port()?;
        let url = format!("http://127.0.0.1:{client}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path().join("etcd"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
                "--quota-backend-bytes",
                &(8u64 << 30).to_string(),
                "--log-level",
                "error",
                // As kubeadm configures it: idle watches learn the revision every 5 s.
                "--experimental-watch-progress-notify-interval",
                "5s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcd (is etcd-server installed?)")?;
        let etcd = Self {
            child,
            url,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
            if Instant::now() > deadline {
                bail!("etcd did not start listening");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(etcd)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `canopy server` child process.
pub struct ServerProcess {
    child: Child,
    /// The API URL.
    pub url: String,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
}

impl ServerProcess {
    /// Starts `exe server` (exe: the canopy binary) on a free port with the given store
    /// and data directory; its log goes to `<data_dir>/server.log`.
    pub fn start(exe: &Path, data_dir: &Path, store: &str, extra: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("server.log"))?;
        let mut child = Command::new(exe)
            .args([
                "--log",
                "info",
                "server",
                "--bind",
                "127.0.0.1:0",
                "--store",
                store,
            ])
            .arg("--data-dir")
            .arg(data_dir)
            // Only the cloud's own tests run a cloud: the others need none.
            .args(
                (!extra.iter().any(|f| f.starts_with("--cloud")))
                    .then_some(["--cloud", "none"])
                    .into_iter()
                    .flatten(),
            )
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting canopy server")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the server's start line")?;
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("https://"))
            .map(|w| w.trim_end_matches([';', ',']).to_string())
            .with_context(|| format!("server did not report its URL: {line:?}"))?;
        Ok(Self {
            child,
            url,
            kubeconfig: data_dir.join("admin.kubeconfig"),
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory of the server, in bytes.
    pub fn rss_bytes(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS")?;
        Ok(kb * 1024)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
