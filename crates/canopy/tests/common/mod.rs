//! Shared by the end-to-end tests: a real `canopy server` (on the embedded store or on an
//! etcd the test starts), and ways to talk to it with kubectl, kube-rs and raw HTTP.

#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use canopy::procs::{Etcd, ServerProcess};

/// Which store the server runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The embedded redb store.
    Embedded,
    /// An etcd started for the test.
    Etcd,
}

/// A running server and what it needs.
pub struct Cluster {
    pub server: ServerProcess,
    pub backend: Backend,
    store: String,
    extra: Vec<String>,
    etcd: Option<Etcd>,
    pub dir: tempfile::TempDir,
}

pub fn canopy_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_canopy"))
}

/// The kubectl to test with (`$KUBECTL`, else `kubectl` on PATH).
pub fn kubectl_bin() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

pub fn require(tool: &str, hint: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is required by this test and was not found on PATH: {hint}"
    );
}

impl Cluster {
    /// Starts a server on the backend, without the scheduler: tests of the API's own
    /// semantics must not race the scheduler's writes to their pods.
    pub fn start(backend: Backend) -> Self {
        Self::start_with(backend, &[])
    }

    /// Starts a server with its scheduler.
    pub fn with_scheduler(backend: Backend) -> Self {
        Self::launch(backend, &[])
    }

    /// Starts a server with its scheduler, every controller and extra flags.
    pub fn with_scheduler_and(backend: Backend, extra: &[&str]) -> Self {
        Self::launch(backend, extra)
    }

    /// Starts a server (without the scheduler) with extra `canopy server` flags. Of the
    /// controllers it runs only those the API's own behaviour relies on (namespace deletion,
    /// Tenant status), unless `extra` says otherwise: workload controllers would race the
    /// tests' writes to Deployments, ReplicaSets and pods.
    pub fn start_with(backend: Backend, extra: &[&str]) -> Self {
        let mut flags = vec!["--disable-scheduler"];
        if !extra
            .iter()
            .any(|f| f.starts_with("--controllers") || *f == "--disable-controllers")
        {
            flags.push("--controllers=namespace,tenant");
        }
        flags.extend_from_slice(extra);
        Self::launch(backend, &flags)
    }

    /// Starts a server with every controller (and extra flags), without the scheduler.
    pub fn with_controllers(backend: Backend, extra: &[&str]) -> Self {
        let mut flags = vec!["--disable-scheduler"];
        flags.extend_from_slice(extra);
        Self::launch(backend, &flags)
    }

    fn launch(backend: Backend, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let etcd = match backend {
            Backend::Embedded => None,
            Backend::Etcd => {
                require("etcd", "install Debian's etcd-server (.ci/run does)");
                Some(Etcd::start().expect("starting etcd"))
            }
        };
        let store = match &etcd {
            Some(etcd) => format!("etcd={}", etcd.url),
            None => "embedded".to_string(),
        };
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let server = start_server(dir.path(), &store, &extra);
        Self {
            server,
            backend,
            store,
            extra,
            etcd,
            dir,
        }
    }

    /// Kills the server with SIGKILL and starts it again on the same data.
    pub fn crash_and_restart(&mut self) {
        self.server.kill();
        self.server = start_server(self.dir.path(), &self.store, &self.extra);
    }

    /// The API server's URL.
    pub fn url(&self) -> &str {
        &self.server.url
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.server.kubeconfig
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs kubectl with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_env(args, &[])
    }

    /// Runs kubectl with extra environment variables.
    pub fn kubectl_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(kubectl_bin());
        cmd.args(args).env("KUBECONFIG", self.kubeconfig());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("running kubectl")
    }

    /// Runs kubectl, asserting success; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs kubectl with stdin, asserting success.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> String {
        use std::io::Write;
        let mut child = Command::new(kubectl_bin())
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("writing stdin");
        let out = child.wait_with_output().expect("kubectl output");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A kube-rs client with the admin credentials.
    pub async fn client(&self) -> kube::Client {
        client_for(self.kubeconfig()).await
    }

    /// A kubeconfig for another user (client certificate signed by the cluster CA).
    pub fn user_kubeconfig(&self, user: &str, group: Option<&str>) -> PathBuf {
        let groups: Vec<&str> = group.into_iter().collect();
        self.kubeconfig_file(user, &groups, &format!("{user}.kubeconfig"))
    }

    /// A kubeconfig for a user in several groups (a client certificate holds up to two),
    /// written to `file` in the data directory.
    pub fn kubeconfig_file(&self, user: &str, groups: &[&str], file: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        let mut cmd = Command::new(canopy_exe());
        cmd.args(["kubeconfig", "--user", user, "--server", &self.server.url])
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--output")
            .arg(&path);
        for group in groups {
            cmd.args(["--group", group]);
        }
        let out = cmd.output().expect("canopy kubeconfig");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

fn start_server(dir: &Path, store: &str, extra: &[String]) -> ServerProcess {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    ServerProcess::start(&canopy_exe(), dir, store, &extra).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        panic!("starting canopy server: {e:#}\n{log}")
    })
}

/// Imports a busybox image named `image`, built from the host's busybox, into the agent image
/// store under `root` with `canopy image import` (as an operator would); returns the store.
pub fn import_busybox(root: &Path, image: &str) -> PathBuf {
    std::fs::create_dir_all(root).unwrap();
    let archive = root.join("busybox.tar");
    canopy_image::testing::busybox_oci_archive(&archive, image).unwrap();
    let out = std::process::Command::new(canopy_exe())
        .args(["image", "import"])
        .arg(&archive)
        .arg("--root-dir")
        .arg(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "canopy image import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&archive);
    root.join("images")
}

/// A kube-rs client from a kubeconfig file.
pub async fn client_for(path: &Path) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kube config");
    // Tests must see the server's answers, not kube-rs's retries of 429/503/504.
    config.default_retry = false;
    kube::Client::try_from(config).expect("kube client")
}

/// A kube-rs client for the server of a kubeconfig that authenticates with a bearer token
/// instead of the kubeconfig's credentials.
pub async fn token_client(kubeconfig: &Path, token: &str) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kube config");
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.to_string().into()),
        ..Default::default()
    };
    config.default_retry = false;
    kube::Client::try_from(config).expect("kube client")
}

/// Percent-encodes a query parameter value.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `f` until it returns true or the timeout passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// Sends a raw request through a kube-rs client; returns status, headers and body.
pub async fn raw(
    client: &kube::Client,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, http::HeaderMap, serde_json::Value) {
    let mut builder = http::Request::builder().method(method).uri(path);
    if let Some(ct) = content_type {
        builder = builder.header("content-type", ct);
    }
    let request = builder.body(body).expect("request");
    let response = client
        .send(request.map(kube::client::Body::from))
        .await
        .expect("send");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("body")
        .to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    (status, headers, value)
}

/// The value of the first sample of `metric` whose labels include all of `labels`.
pub fn sample(exposition: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (name, rest) = series.split_once('{').unwrap_or((series, ""));
        (name == metric && labels.iter().all(|l| rest.contains(l))).then(|| value.parse().ok())?
    })
}

/// A plain-HTTP GET (a standalone component's endpoint): status and body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: component\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let status = answer.split_whitespace().nth(1)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// A child process killed when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` every 100 ms until it gives a value; fails the test after `timeout`.
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`wait_until`] with 30 s.
pub async fn wait_for<T>(what: &str, f: impl AsyncFnMut() -> Option<T>) -> T {
    wait_until(what, Duration::from_secs(30), f).await
}
