//! Liveness, readiness and startup probes, as upstream's prober: one task per probe of a
//! running container, ticking every `periodSeconds` after `initialDelaySeconds`, turning
//! `successThreshold`/`failureThreshold` consecutive results into a state the pod's worker
//! reads. A failed liveness or startup probe stops the container, which the worker then
//! restarts by the pod's `restartPolicy`.
//!
//! TCP and HTTP probes connect from inside the pod's network namespace to its loopback
//! address: the pod's ports are reached exactly as its own processes reach them, without
//! depending on the pod's network (which the cloud controller sets up, or not).

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use canopy_runtime::{ContainerState, Runtime};
use http_body_util::{BodyExt, Empty};
use k8s_openapi::{
    api::core::v1::{Container, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Which probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Liveness,
    Readiness,
    Startup,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
            Kind::Startup => "Startup",
        }
    }
}

/// The results of every probe of the node's containers, by container ID.
#[derive(Default)]
pub struct Results {
    states: Mutex<HashMap<(String, Kind), bool>>,
    running: Mutex<HashMap<(String, Kind), tokio::task::AbortHandle>>,
}

impl Results {
    /// Whether the container counts as ready: running, started (startup probe passed) and its
    /// readiness probe passed, as upstream.
    pub fn ready(&self, container_id: &str, container: &Container) -> bool {
        let states = self.states.lock();
        let get = |kind| states.get(&(container_id.to_string(), kind)).copied();
        let started = container.startup_probe.is_none() || get(Kind::Startup) == Some(true);
        let ready = container.readiness_probe.is_none() || get(Kind::Readiness) == Some(true);
        started && ready
    }

    /// Whether the container's startup probe passed (or it has none).
    pub fn started(&self, container_id: &str, container: &Container) -> bool {
        container.startup_probe.is_none()
            || self
                .states
                .lock()
                .get(&(container_id.to_string(), Kind::Startup))
                .copied()
                == Some(true)
    }

    /// Forgets containers that no longer run, and stops their probes.
    pub fn retain(&self, live: &dyn Fn(&str) -> bool) {
        self.states.lock().retain(|(id, _), _| live(id));
        self.running.lock().retain(|(id, _), handle| {
            let keep = live(id);
            if !keep {
                handle.abort();
            }
            keep
        });
    }
}

/// What a probe needs to run against one container.
pub struct Target {
    pub runtime: Runtime,
    pub container_id: String,
    pub container: Container,
    pub netns: PathBuf,
    pub grace: Duration,
    /// Woken when a result changes or the container was stopped.
    pub wake: Arc<Notify>,
    pub pod: String,
    /// The pod, for Events (`Unhealthy`, `Killing`).
    pub subject: Arc<k8s_openapi::api::core::v1::Pod>,
    pub events: canopy_controllers::events::Recorder,
}

/// Starts the probes of a running container that are not running yet.
pub fn ensure(results: &Arc<Results>, target: Target) {
    let target = Arc::new(target);
    let probes = [
        (Kind::Startup, target.container.startup_probe.clone()),
        (Kind::Liveness, target.container.liveness_probe.clone()),
        (Kind::Readiness, target.container.readiness_probe.clone()),
    ];
    let mut running = results.running.lock();
    for (kind, probe) in probes {
        let Some(probe) = probe else { continue };
        let key = (target.container_id.clone(), kind);
        if running.contains_key(&key) {
            continue;
        }
        let task = tokio::spawn(run(results.clone(), target.clone(), kind, probe));
        running.insert(key, task.abort_handle());
    }
}

async fn run(results: Arc<Results>, target: Arc<Target>, kind: Kind, probe: Probe) {
    let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    let key = (target.container_id.clone(), kind);
    tokio::time::sleep(Duration::from_secs(
        probe.initial_delay_seconds.unwrap_or(0).max(0) as u64,
    ))
    .await;
    let (mut successes, mut failures) = (0, 0);
    loop {
        // Liveness and readiness wait for the startup probe, as upstream.
        let gated = kind != Kind::Startup
            && target.container.startup_probe.is_some()
            && results
                .states
                .lock()
                .get(&(target.container_id.clone(), Kind::Startup))
                .copied()
                != Some(true);
        if !gated {
            match target.runtime.container_status(&target.container_id).await {
                Ok(Some(status)) if matches!(status.state, ContainerState::Running { .. }) => {}
                _ => return,
            }
            let outcome = check(
                &CheckTarget {
                    runtime: &target.runtime,
                    container_id: &target.container_id,
                    container: &target.container,
                    netns: &target.netns,
                },
                &probe,
                timeout,
            )
            .await;
            if let Err(why) = &outcome {
                tracing::debug!(pod = %target.pod, container = %target.container.name, probe = kind.name(), why = %why, "probe failed");
                target.events.warning(
                    &*target.subject,
                    "Unhealthy",
                    format!("{} probe failed: {why}", kind.name()),
                );
            }
            if outcome.is_ok() {
                successes += 1;
                failures = 0;
            } else {
                failures += 1;
                successes = 0;
            }
            let previous = results.states.lock().get(&key).copied();
            let state = if successes >= success_threshold {
                Some(true)
            } else if failures >= failure_threshold {
                Some(false)
            } else {
                previous
            };
            if let Some(state) = state
                && previous != Some(state)
            {
                results.states.lock().insert(key.clone(), state);
                target.wake.notify_one();
            }
            if state == Some(false) && kind != Kind::Readiness {
                let message = format!(
                    "Container {} failed {} probe, will be restarted",
                    target.container.name,
                    kind.name().to_lowercase()
                );
                tracing::info!(pod = %target.pod, container = %target.container.name, "{message}");
                target.events.normal(&*target.subject, "Killing", message);
                if let Err(error) = target
                    .runtime
                    .stop_container(&target.container_id, target.grace, None)
                    .await
                {
                    tracing::warn!(error = %error, "stopping a container that failed its probe failed");
                }
                target.wake.notify_one();
                return;
            }
            // A startup probe that passed is done.
            if kind == Kind::Startup && state == Some(true) {
                return;
            }
        }
        tokio::time::sleep(period).await;
    }
}

fn port(container: &Container, port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("no port named {name:?} in the container")),
    }
}

/// A TCP connection from inside the pod's network namespace: a socket belongs to the
/// namespace it is created in, so a thread of its own (never reused, so that no other work
/// runs in the pod's namespace) enters it, connects, and hands the socket back.
pub(crate) async fn connect(
    netns: PathBuf,
    port: u16,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let ns = std::fs::File::open(&netns)
                .map_err(|e| format!("opening {}: {e}", netns.display()))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("entering the pod's network namespace: {e}"))?;
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                timeout,
            )
            .map_err(|e| format!("dial tcp 127.0.0.1:{port}: {e}"))
        })();
        let _ = tx.send(result);
    });
    let stream = rx
        .await
        .map_err(|_| "the probe thread died".to_string())??;
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    tokio::net::TcpStream::from_std(stream).map_err(|e| e.to_string())
}

/// Runs a lifecycle hook (`preStop`): exec in the container, an HTTP GET or TCP connect in
/// the pod's network, or a sleep, within `timeout`.
pub async fn run_handler(
    target: &CheckTarget<'_>,
    handler: &k8s_openapi::api::core::v1::LifecycleHandler,
    timeout: Duration,
) -> Result<(), String> {
    if let Some(sleep) = &handler.sleep {
        tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64).min(timeout)).await;
        return Ok(());
    }
    let probe = Probe {
        exec: handler.exec.clone(),
        http_get: handler.http_get.clone(),
        tcp_socket: handler.tcp_socket.clone(),
        ..Probe::default()
    };
    if probe.exec.is_none() && probe.http_get.is_none() && probe.tcp_socket.is_none() {
        return Err("the handler has no action".into());
    }
    tokio::time::timeout(timeout, check(target, &probe, timeout))
        .await
        .map_err(|_| format!("timed out after {timeout:?}"))?
}

/// Where a check runs: the container and its pod's network namespace.
pub struct CheckTarget<'a> {
    pub runtime: &'a Runtime,
    pub container_id: &'a str,
    pub container: &'a Container,
    pub netns: &'a std::path::Path,
}

async fn check(target: &CheckTarget<'_>, probe: &Probe, timeout: Duration) -> Result<(), String> {
    let container = target.container;
    if let Some(exec) = &probe.exec {
        let command = exec.command.clone().unwrap_or_default();
        let output = target
            .runtime
            .exec_sync(target.container_id, &command, timeout)
            .await
            .map_err(|e| e.to_string())?;
        return if output.exit_code == 0 {
            Ok(())
        } else {
            Err(format!(
                "command {command:?} exited with {}: {}",
                output.exit_code,
                String::from_utf8_lossy(&output.stdout)
            ))
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let port = port(container, &tcp.port)?;
        connect(target.netns.to_path_buf(), port, timeout).await?;
        return Ok(());
    }
    if let Some(http) = &probe.http_get {
        let port = port(container, &http.port)?;
        if http
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"))
        {
            return Err("HTTPS probes are not supported by this agent yet".into());
        }
        let stream = connect(target.netns.to_path_buf(), port, timeout).await?;
        let path = http
            .path
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into());
        let host = http.host.clone().unwrap_or_else(|| "127.0.0.1".into());
        let mut request = http::Request::get(&path)
            .header(http::header::HOST, format!("{host}:{port}"))
            .header(http::header::USER_AGENT, "kube-probe/1.33")
            .header(http::header::ACCEPT, "*/*");
        for header in http.http_headers.iter().flatten() {
            request = request.header(header.name.as_str(), header.value.as_str());
        }
        let request = request
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| format!("building the probe request: {e}"))?;
        let exchange = async {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            // Upstream reads at most 10 KiB of the body; the verdict needs none of it.
            let _ = http_body_util::Limited::new(response.into_body(), 10 << 10)
                .collect()
                .await;
            Ok::<_, String>(status)
        };
        let status = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("HTTP probe timed out after {timeout:?}"))??;
        return if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!(
                "HTTP probe failed with statuscode: {}",
                status.as_u16()
            ))
        };
    }
    Err(
        "the probe has no exec, httpGet or tcpSocket handler (gRPC probes are not supported yet)"
            .into(),
    )
}
