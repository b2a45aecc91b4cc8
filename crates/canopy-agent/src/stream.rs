//! Streaming into pods: `kubectl exec` and `kubectl port-forward` as the kubelet serves them
//! (`/exec/{namespace}/{pod}/{container}`, `/portForward/{namespace}/{pod}`), over
//! WebSocket with Kubernetes' channel protocol.
//!
//! Every binary message starts with a channel byte. For exec (`v4.channel.k8s.io` and
//! `v5.channel.k8s.io`, what kubectl 1.30+, kube-rs and the Python client speak): 0 stdin,
//! 1 stdout, 2 stderr, 3 the final Status (JSON), 4 terminal resizes (`{"Width","Height"}`);
//! v5 adds 255, "close this channel" (the client's end of stdin). For port-forward each
//! requested port gets a data channel (2i) and an error channel (2i+1), both opened by the
//! port number in two little-endian bytes.
//!
//! The API server only authorizes and relays the upgraded connection (as upstream's
//! apiserver proxies to kubelets); the protocol ends here.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        handshake::derive_accept_key,
        protocol::{CloseFrame, Role, frame::coding::CloseCode},
    },
};
use tokio_util::sync::CancellationToken;

use crate::{api::Body, pods};

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
/// v5: the client closes one of its channels (stdin).
const CLOSE: u8 = 255;

/// Exec protocols we speak, best first.
const EXEC_PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// How much a client may send on a data stream before its pod connection is made.
const EARLY_DATA_LIMIT: usize = 1 << 20;

/// kubectl 1.31+: SPDY's byte stream carried in WebSocket binary messages.
const SPDY_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";
/// Port-forward protocols: the SPDY tunnel, then the channel protocol, named or not (as
/// the kubelet).
const PORT_FORWARD_PROTOCOLS: &[&str] =
    &[SPDY_TUNNEL, "v4.channel.k8s.io", "portforward.k8s.io", ""];

/// Why a stream request is refused before it is upgraded.
pub type Refusal = (StatusCode, String);

/// The handshake's answer and the protocol chosen, or why the request cannot be upgraded.
fn accept(
    request: &Request<Incoming>,
    ours: &[&'static str],
) -> Result<(Response<Body>, &'static str), Refusal> {
    let headers = request.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::UPGRADE, "websocket") {
        let offered = headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let message = if offered.to_ascii_lowercase().starts_with("spdy") {
            "this node serves streams over WebSocket only (kubectl 1.30 or later, kube-rs, the Python client); SPDY is not supported".to_string()
        } else {
            "Upgrade request required: a WebSocket upgrade (v4.channel.k8s.io or v5.channel.k8s.io)"
                .to_string()
        };
        return Err((StatusCode::BAD_REQUEST, message));
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).ok_or((
        StatusCode::BAD_REQUEST,
        "missing Sec-WebSocket-Key".to_string(),
    ))?;
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "unsupported Sec-WebSocket-Version (13 is)".to_string(),
        ));
    }
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .filter(|p| !p.is_empty())
        .collect();
    let chosen = ours
        .iter()
        .copied()
        .find(|p| {
            if p.is_empty() {
                offered.is_empty()
            } else {
                offered.iter().any(|o| o == p)
            }
        })
        .ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                format!(
                    "none of the offered subprotocols {offered:?} is supported; this node speaks {:?}",
                    ours.iter().filter(|p| !p.is_empty()).collect::<Vec<_>>()
                ),
            )
        })?;
    let mut response = Response::new(Empty::new().boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?,
    );
    if !chosen.is_empty() {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(chosen),
        );
    }
    Ok((response, chosen))
}

/// A query flag as the kubelet reads it.
fn flag(query: &[(String, String)], name: &str) -> bool {
    query
        .iter()
        .any(|(k, v)| k == name && matches!(v.as_str(), "1" | "true" | "True"))
}

/// The exec options of a request (`command` repeated, `input`, `output`, `error`, `tty`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOptions {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl ExecOptions {
    pub fn parse(query: &[(String, String)]) -> Result<ExecOptions, String> {
        let options = ExecOptions {
            command: query
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.clone())
                .collect(),
            stdin: flag(query, "input"),
            stdout: flag(query, "output"),
            stderr: flag(query, "error"),
            tty: flag(query, "tty"),
        };
        if options.command.is_empty() {
            return Err("you must specify at least one command for the container".into());
        }
        if !(options.stdin || options.stdout || options.stderr) {
            return Err("you must specify at least one of stdin, stdout, stderr".into());
        }
        Ok(options)
    }
}

/// `/exec/{namespace}/{pod}/{container}`: runs a command in a running container and
/// streams it over the upgraded connection.
pub async fn exec(
    ctx: &Arc<pods::Context>,
    namespace: &str,
    pod_name: &str,
    container: &str,
    query: &[(String, String)],
    request: Request<Incoming>,
    shutdown: CancellationToken,
) -> Result<Response<Body>, Refusal> {
    let options = ExecOptions::parse(query).map_err(|m| (StatusCode::BAD_REQUEST, m))?;
    let id = running_container(ctx, namespace, pod_name, container).await?;
    let (response, protocol) = accept(&request, EXEC_PROTOCOLS)?;
    let runtime = ctx.runtime.clone();
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(request).await {
            Ok(u) => u,
            Err(error) => {
                tracing::debug!(error = %error, "an exec connection failed to upgrade");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let v5 = protocol == "v5.channel.k8s.io";
        run_exec(ws, &runtime, &id, options, v5, shutdown).await;
    });
    Ok(response)
}

/// The id of the container's current run, which must be running.
async fn running_container(
    ctx: &Arc<pods::Context>,
    namespace: &str,
    pod_name: &str,
    container: &str,
) -> Result<String, Refusal> {
    let pod = ctx.pod_named(namespace, pod_name).ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{pod_name} is not on this node"),
        )
    })?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let runs = ctx
        .runtime
        .list_containers(&uid)
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    runs.into_iter()
        .filter(|c| c.name == container)
        .max_by_key(|c| c.attempt)
        .filter(|c| matches!(c.state, canopy_runtime::ContainerState::Running { .. }))
        .map(|c| c.id)
        .ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                format!("container {container:?} in pod {pod_name:?} is not running"),
            )
        })
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(channel);
    out.extend_from_slice(data);
    Message::Binary(Bytes::from(out))
}

/// Upstream's final Status of an exec: Success, or the exit code as kubectl reads it.
pub fn exit_status(
    command: &[String],
    exit_code: Option<i32>,
    error: Option<&str>,
) -> serde_json::Value {
    match (exit_code, error) {
        (Some(0), None) => json!({"metadata": {}, "status": "Success"}),
        (Some(code), None) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}
        }),
        (_, error) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "error executing command {command:?}: {}",
                error.unwrap_or("the process ended without an exit status")
            ),
            "reason": "InternalError",
        }),
    }
}

async fn pump(mut from: impl AsyncRead + Unpin, channel: u8, to: mpsc::Sender<Message>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            // A pty's master reads EIO once its terminal side is closed: that is its EOF.
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.send(frame(channel, &buf[..n])).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn run_exec<S>(
    ws: WebSocketStream<S>,
    runtime: &canopy_runtime::Runtime,
    id: &str,
    options: ExecOptions,
    v5: bool,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut source) = ws.split();
    let (out, mut outgoing) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(message) = outgoing.recv().await {
            if sink.send(message).await.is_err() {
                return;
            }
        }
        // Clients (client-go) read a close without a status as an error.
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        let _ = sink.close().await;
    });
    // Upstream's kubelet tells the client the streams are up with an empty message on the
    // lowest channel it will write.
    let first = if options.stdout {
        STDOUT
    } else if options.stderr {
        STDERR
    } else {
        ERROR
    };
    let _ = out.send(frame(first, &[])).await;
    let session = match runtime
        .exec_interactive(id, &options.command, options.stdin, options.tty)
        .await
    {
        Ok(session) => session,
        Err(error) => {
            let status = exit_status(&options.command, None, Some(&error.to_string()));
            let _ = out.send(frame(ERROR, status.to_string().as_bytes())).await;
            drop(out);
            let _ = writer.await;
            return;
        }
    };
    let canopy_runtime::ExecSession { mut child, io } = session;
    let mut pumps = Vec::new();
    // Where stdin goes, and the terminal to resize.
    let (mut stdin, terminal): (
        Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>>,
        Option<std::fs::File>,
    ) = match io {
        canopy_runtime::ExecIo::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            if options.stdout {
                pumps.push(tokio::spawn(pump(stdout, STDOUT, out.clone())));
            } else {
                pumps.push(tokio::spawn(pump(stdout, u8::MAX, drain())));
            }
            if options.stderr {
                pumps.push(tokio::spawn(pump(stderr, STDERR, out.clone())));
            } else {
                pumps.push(tokio::spawn(pump(stderr, u8::MAX, drain())));
            }
            (stdin.map(|s| Box::new(s) as _), None)
        }
        canopy_runtime::ExecIo::Tty { master } => {
            let (reader, writer) = match (master.try_clone(), master.try_clone()) {
                (Ok(r), Ok(w)) => (r, w),
                _ => {
                    let _ = child.start_kill();
                    return;
                }
            };
            pumps.push(tokio::spawn(pump(
                tokio::fs::File::from_std(reader),
                STDOUT,
                out.clone(),
            )));
            let input: Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> = options
                .stdin
                .then(|| Box::new(tokio::fs::File::from_std(writer)) as _);
            (input, Some(master))
        }
    };
    let child_pid = child.id().map(|p| p as i32);
    let resize = |terminal: &Option<std::fs::File>, data: &[u8]| {
        #[derive(serde::Deserialize)]
        struct Size {
            #[serde(rename = "Width")]
            width: u16,
            #[serde(rename = "Height")]
            height: u16,
        }
        if let (Some(master), Ok(size)) = (terminal, serde_json::from_slice::<Size>(data)) {
            let winsize = rustix::termios::Winsize {
                ws_row: size.height,
                ws_col: size.width,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let _ = rustix::termios::tcsetwinsize(master, winsize);
            if let Some(pid) = child_pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGWINCH,
                );
            }
        }
    };
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.ok(),
            message = source.next() => match message {
                Some(Ok(Message::Binary(data))) if !data.is_empty() => match data[0] {
                    STDIN => {
                        if let Some(input) = stdin.as_mut()
                            && input.write_all(&data[1..]).await.is_err()
                        {
                            stdin = None;
                        }
                    }
                    RESIZE => resize(&terminal, &data[1..]),
                    CLOSE if v5 && data.get(1) == Some(&STDIN) => {
                        if let Some(mut input) = stdin.take() {
                            let _ = input.shutdown().await;
                        }
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    // The client is gone: the process loses its input (and its terminal,
                    // which hangs it up) and is left to finish.
                    drop(stdin);
                    drop(terminal);
                    tokio::spawn(async move { let _ = child.wait().await; });
                    for p in pumps {
                        p.abort();
                    }
                    drop(out);
                    writer.abort();
                    return;
                }
                _ => {}
            },
            _ = shutdown.cancelled() => {
                let _ = child.start_kill();
                break None;
            }
        }
    };
    drop(stdin);
    drop(terminal);
    // The output is complete once the pipes (or the terminal) are at EOF; a background
    // process that keeps them open does not hold the session longer than a moment.
    for p in pumps {
        let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
    }
    let exit_code = status.map(|s| {
        use std::os::unix::process::ExitStatusExt;
        s.code()
            .or_else(|| s.signal().map(|n| 128 + n))
            .unwrap_or(255)
    });
    let status = exit_status(&options.command, exit_code, None);
    let _ = out.send(frame(ERROR, status.to_string().as_bytes())).await;
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// `/attach/{namespace}/{pod}/{container}`: the container's main process, through its
/// monitor: output as it is produced, input and resizes when the container has a stdin or
/// a terminal.
pub async fn attach(
    ctx: &Arc<pods::Context>,
    namespace: &str,
    pod_name: &str,
    container: &str,
    query: &[(String, String)],
    request: Request<Incoming>,
    shutdown: CancellationToken,
) -> Result<Response<Body>, Refusal> {
    let options = AttachOptions {
        stdin: flag(query, "input"),
        stdout: flag(query, "output"),
        stderr: flag(query, "error"),
    };
    if !(options.stdin || options.stdout || options.stderr) {
        return Err((
            StatusCode::BAD_REQUEST,
            "you must specify at least one of stdin, stdout, stderr".to_string(),
        ));
    }
    let id = running_container(ctx, namespace, pod_name, container).await?;
    let (monitor, tty) = ctx
        .runtime
        .attach(&id)
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (response, protocol) = accept(&request, EXEC_PROTOCOLS)?;
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(request).await {
            Ok(u) => u,
            Err(error) => {
                tracing::debug!(error = %error, "an attach connection failed to upgrade");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        run_attach(
            ws,
            monitor,
            tty,
            options,
            protocol == "v5.channel.k8s.io",
            shutdown,
        )
        .await;
    });
    Ok(response)
}

#[derive(Clone, Copy, Debug)]
struct AttachOptions {
    stdin: bool,
    stdout: bool,
    stderr: bool,
}

async fn run_attach<S>(
    ws: WebSocketStream<S>,
    monitor: tokio::net::UnixStream,
    tty: bool,
    options: AttachOptions,
    v5: bool,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use canopy_runtime::attach as frames;
    let (mut sink, mut source) = ws.split();
    let (mut from_monitor, mut to_monitor) = monitor.into_split();
    let (out, mut outgoing) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(message) = outgoing.recv().await {
            if sink.send(message).await.is_err() {
                return;
            }
        }
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        let _ = sink.close().await;
    });
    let first = if options.stdout {
        STDOUT
    } else if options.stderr {
        STDERR
    } else {
        ERROR
    };
    let _ = out.send(frame(first, &[])).await;
    // The monitor's frames, read by a task of their own (a frame read halfway must not be
    // dropped by the loop below); it ends when the container exits.
    let output = {
        let out = out.clone();
        tokio::spawn(async move {
            loop {
                let mut head = [0u8; 5];
                if from_monitor.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
                let mut payload = vec![0u8; len.min(1 << 20)];
                if from_monitor.read_exact(&mut payload).await.is_err() {
                    return;
                }
                let channel = match head[0] {
                    frames::STDOUT if options.stdout => STDOUT,
                    // On a terminal everything is one stream, as upstream.
                    frames::STDERR if options.stderr && !tty => STDERR,
                    frames::STDERR if options.stdout && tty => STDOUT,
                    _ => continue,
                };
                if out.send(frame(channel, &payload)).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut output = output;
    let send = async |to: &mut tokio::net::unix::OwnedWriteHalf, kind: u8, payload: &[u8]| {
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.push(kind);
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(payload);
        to.write_all(&buf).await
    };
    let ended = loop {
        tokio::select! {
            _ = &mut output => break true,
            message = source.next() => match message {
                Some(Ok(Message::Binary(data))) if !data.is_empty() => match data[0] {
                    STDIN if options.stdin => {
                        let _ = send(&mut to_monitor, frames::STDIN, &data[1..]).await;
                    }
                    RESIZE => {
                        #[derive(serde::Deserialize)]
                        struct Size {
                            #[serde(rename = "Width")]
                            width: u16,
                            #[serde(rename = "Height")]
                            height: u16,
                        }
                        if let Ok(size) = serde_json::from_slice::<Size>(&data[1..]) {
                            let mut payload = size.width.to_be_bytes().to_vec();
                            payload.extend_from_slice(&size.height.to_be_bytes());
                            let _ = send(&mut to_monitor, frames::RESIZE, &payload).await;
                        }
                    }
                    CLOSE if v5 && data.get(1) == Some(&STDIN) => {
                        let _ = send(&mut to_monitor, frames::CLOSE_STDIN, &[]).await;
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break false,
                _ => {}
            },
            _ = shutdown.cancelled() => break false,
        }
    };
    output.abort();
    if ended {
        // The container exited: the session ends as upstream's, successfully.
        let status = json!({"metadata": {}, "status": "Success"});
        let _ = out.send(frame(ERROR, status.to_string().as_bytes())).await;
    }
    drop(to_monitor);
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// `/portForward/{namespace}/{pod}?port=P...`: one TCP connection per requested port to
/// the pod's loopback, made from inside its network namespace, relayed over the upgraded
/// connection.
pub async fn port_forward(
    ctx: &Arc<pods::Context>,
    namespace: &str,
    pod_name: &str,
    query: &[(String, String)],
    request: Request<Incoming>,
    shutdown: CancellationToken,
) -> Result<Response<Body>, Refusal> {
    let ports = query
        .iter()
        .filter(|(k, _)| k == "port")
        .flat_map(|(_, v)| v.split(','))
        .map(|p| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    (
                        StatusCode::BAD_REQUEST,
                        format!("invalid port {p:?}: ports are 1 to 65535"),
                    )
                })
        })
        .collect::<Result<Vec<u16>, Refusal>>()?;
    // Channels are one byte: two per port.
    if ports.len() > 127 {
        return Err((
            StatusCode::BAD_REQUEST,
            "at most 127 ports can be forwarded over one connection".to_string(),
        ));
    }
    let pod = ctx.pod_named(namespace, pod_name).ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{pod_name} is not on this node"),
        )
    })?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let netns = ctx
        .runtime
        .list_sandboxes()
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .into_iter()
        .find(|s| s.pod_uid == uid)
        .map(|s| s.netns_path)
        .ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                format!("pod {pod_name:?} has no sandbox on this node (not running)"),
            )
        })?;
    if is_spdy(&request) {
        let response = accept_spdy(&request, "portforward.k8s.io")?;
        tokio::spawn(async move {
            match hyper::upgrade::on(request).await {
                Ok(upgraded) => {
                    run_spdy_port_forward(TokioIo::new(upgraded), netns, uid, shutdown).await
                }
                Err(error) => {
                    tracing::debug!(error = %error, "a port-forward connection failed to upgrade")
                }
            }
        });
        return Ok(response);
    }
    let (response, protocol) = accept(&request, PORT_FORWARD_PROTOCOLS)?;
    if protocol == SPDY_TUNNEL {
        tokio::spawn(async move {
            match hyper::upgrade::on(request).await {
                Ok(upgraded) => {
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        None,
                    )
                    .await;
                    run_spdy_port_forward(tunnel(ws), netns, uid, shutdown).await
                }
                Err(error) => {
                    tracing::debug!(error = %error, "a port-forward connection failed to upgrade")
                }
            }
        });
        return Ok(response);
    }
    // SPDY clients name the port of each stream in its headers; channel clients in the URL.
    if ports.is_empty() {
        return Err((
            StatusCode::BAD_REQUEST,
            "query parameter \"port\" is required".to_string(),
        ));
    }
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(request).await {
            Ok(u) => u,
            Err(error) => {
                tracing::debug!(error = %error, "a port-forward connection failed to upgrade");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        run_port_forward(ws, netns, uid, ports, shutdown).await;
    });
    Ok(response)
}

async fn run_port_forward<S>(
    ws: WebSocketStream<S>,
    netns: std::path::PathBuf,
    uid: String,
    ports: Vec<u16>,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut source) = ws.split();
    let (out, mut outgoing) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(message) = outgoing.recv().await {
            if sink.send(message).await.is_err() {
                return;
            }
        }
        // Clients (client-go) read a close without a status as an error.
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        let _ = sink.close().await;
    });
    for (i, port) in ports.iter().enumerate() {
        let le = port.to_le_bytes();
        let _ = out.send(frame(2 * i as u8, &le)).await;
        let _ = out.send(frame(2 * i as u8 + 1, &le)).await;
    }
    let mut to_pod: Vec<Option<tokio::net::tcp::OwnedWriteHalf>> = Vec::new();
    let mut readers = tokio::task::JoinSet::new();
    for (i, port) in ports.iter().enumerate() {
        match crate::probe::connect(netns.clone(), *port, Duration::from_secs(5)).await {
            Ok(stream) => {
                let (read, write) = stream.into_split();
                to_pod.push(Some(write));
                readers.spawn(pump(read, 2 * i as u8, out.clone()));
            }
            Err(error) => {
                to_pod.push(None);
                let message = format!("error forwarding port {port} to pod {uid}: {error}");
                let _ = out.send(frame(2 * i as u8 + 1, message.as_bytes())).await;
            }
        }
    }
    loop {
        tokio::select! {
            message = source.next() => match message {
                Some(Ok(Message::Binary(data))) if !data.is_empty() => {
                    let channel = data[0] as usize;
                    if channel.is_multiple_of(2)
                        && let Some(slot) = to_pod.get_mut(channel / 2)
                        && let Some(tcp) = slot.as_mut()
                        && tcp.write_all(&data[1..]).await.is_err()
                    {
                        *slot = None;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => {}
            },
            // Every connection to the pod ended (or none could be made): so does the stream.
            done = readers.join_next() => if done.is_none() { break },
            _ = shutdown.cancelled() => break,
        }
    }
    readers.abort_all();
    drop(to_pod);
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// Whether the client asks for SPDY (kubectl's fallback when WebSocket is refused).
fn is_spdy(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("SPDY/3.1"))
}

/// The answer to a SPDY upgrade offering `protocol` in `X-Stream-Protocol-Version`.
fn accept_spdy(
    request: &Request<Incoming>,
    protocol: &'static str,
) -> Result<Response<Body>, Refusal> {
    let offered: Vec<&str> = request
        .headers()
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    if !offered.contains(&protocol) {
        return Err((
            StatusCode::FORBIDDEN,
            format!(
                "none of the offered stream protocols {offered:?} is supported; this node speaks {protocol:?}"
            ),
        ));
    }
    let mut response = Response::new(Empty::new().boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        "x-stream-protocol-version",
        HeaderValue::from_static(protocol),
    );
    Ok(response)
}

/// What the SPDY port-forward session knows of a client stream.
struct SpdyStream {
    request_id: String,
    is_error: bool,
}

/// A forwarding request: its error and data streams, once both are open.
#[derive(Default)]
struct ForwardPair {
    error: Option<u32>,
    data: Option<u32>,
    port: u16,
    started: bool,
}

/// kubectl's port-forward over SPDY (the kubelet's `portforward.k8s.io`): for each local
/// connection the client opens an error stream and a data stream with the same
/// `requestid` and `port`; the data stream is relayed to a TCP connection made inside the
/// pod's network namespace, a failure is written on the error stream.
async fn run_spdy_port_forward<S>(
    io: S,
    netns: std::path::PathBuf,
    uid: String,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    use crate::spdy;
    let (mut reader, mut writer) = tokio::io::split(io);
    let (out, mut outgoing) = mpsc::channel::<Vec<u8>>(64);
    let writer_task = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if writer.write_all(&frame).await.is_err() {
                return;
            }
        }
        let _ = writer.shutdown().await;
    });
    // Reading a frame is not cancel-safe (a frame read halfway would be lost when another
    // branch of the loop wins), so frames are read by a task of their own.
    let (frames_tx, mut frames) = mpsc::channel::<Result<spdy::Frame, spdy::SpdyError>>(16);
    let frame_reader = tokio::spawn(async move {
        let mut headers_in = spdy::HeaderReader::default();
        loop {
            let frame = spdy::read_frame(&mut reader, &mut headers_in).await;
            let failed = frame.is_err();
            if frames_tx.send(frame).await.is_err() || failed {
                return;
            }
        }
    });
    let mut headers_out = spdy::HeaderWriter::default();
    let mut streams: std::collections::HashMap<u32, SpdyStream> = Default::default();
    let mut pairs: std::collections::HashMap<String, ForwardPair> = Default::default();
    let mut to_pod: std::collections::HashMap<u32, tokio::net::tcp::OwnedWriteHalf> =
        Default::default();
    let mut relays: std::collections::HashMap<u32, tokio::task::AbortHandle> = Default::default();
    // Data (and whether the client already finished) of data streams still connecting.
    let mut early: std::collections::HashMap<u32, (Vec<u8>, bool)> = Default::default();
    let (connected_tx, mut connected) =
        mpsc::channel::<(String, Result<tokio::net::TcpStream, String>)>(16);
    loop {
        tokio::select! {
            frame = frames.recv() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    None => break,
                    Some(
                    Err(error)) => {
                        tracing::debug!(error = %error, "a SPDY port-forward session ended");
                        break;
                    }
                };
                match frame {
                    spdy::Frame::SynStream { stream_id, headers, .. } => {
                        let get = |name: &str| {
                            headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
                        };
                        let port = get("port").and_then(|p| p.parse::<u16>().ok()).filter(|p| *p > 0);
                        let kind = get("streamtype");
                        let (Some(port), Some(kind @ ("error" | "data"))) = (port, kind.as_deref()) else {
                            let _ = out.send(spdy::rst_stream(stream_id, spdy::REFUSED_STREAM)).await;
                            continue;
                        };
                        // Clients that send no request id pair streams by creation order.
                        let request_id = get("requestid").unwrap_or_else(|| {
                            let base = if kind == "error" { stream_id } else { stream_id.saturating_sub(2) };
                            base.to_string()
                        });
                        let _ = out.send(headers_out.syn_reply(stream_id, &[])).await;
                        streams.insert(stream_id, SpdyStream {
                            request_id: request_id.clone(),
                            is_error: kind == "error",
                        });
                        let pair = pairs.entry(request_id.clone()).or_default();
                        pair.port = port;
                        if kind == "error" {
                            pair.error = Some(stream_id);
                        } else {
                            pair.data = Some(stream_id);
                            early.insert(stream_id, (Vec::new(), false));
                        }
                        if pair.error.is_some() && pair.data.is_some() && !pair.started {
                            pair.started = true;
                            let (netns, tx) = (netns.clone(), connected_tx.clone());
                            tokio::spawn(async move {
                                let result = crate::probe::connect(netns, port, Duration::from_secs(5)).await;
                                let _ = tx.send((request_id, result)).await;
                            });
                        }
                    }
                    spdy::Frame::Data { stream_id, flags, data } => {
                        // Data may come before the connection to the pod is made: it waits
                        // (bounded, as the client does not wait for us either).
                        if let Some(waiting) = early.get_mut(&stream_id) {
                            if waiting.0.len() + data.len() > EARLY_DATA_LIMIT {
                                early.remove(&stream_id);
                                let _ = out.send(spdy::rst_stream(stream_id, spdy::REFUSED_STREAM)).await;
                            } else {
                                waiting.0.extend_from_slice(&data);
                                waiting.1 |= flags & spdy::FLAG_FIN != 0;
                            }
                        } else if let Some(tcp) = to_pod.get_mut(&stream_id) {
                            if !data.is_empty() && tcp.write_all(&data).await.is_err() {
                                to_pod.remove(&stream_id);
                            } else if flags & spdy::FLAG_FIN != 0 {
                                // The client is done sending: half-close towards the pod.
                                if let Some(mut tcp) = to_pod.remove(&stream_id) {
                                    let _ = tcp.shutdown().await;
                                }
                            }
                        }
                    }
                    spdy::Frame::RstStream { stream_id, .. } => {
                        to_pod.remove(&stream_id);
                        early.remove(&stream_id);
                        if let Some(relay) = relays.remove(&stream_id) {
                            relay.abort();
                        }
                        if let Some(stream) = streams.remove(&stream_id)
                            && !stream.is_error
                        {
                            pairs.remove(&stream.request_id);
                        }
                    }
                    spdy::Frame::Ping { id } => {
                        let _ = out.send(spdy::ping(id)).await;
                    }
                    spdy::Frame::GoAway => break,
                    spdy::Frame::Other => {}
                }
            }
            Some((request_id, result)) = connected.recv() => {
                let Some(pair) = pairs.get(&request_id) else { continue };
                let (Some(error_id), Some(data_id)) = (pair.error, pair.data) else { continue };
                match result {
                    Ok(tcp) => {
                        let (mut read, mut write) = tcp.into_split();
                        let (waiting, finished) = early.remove(&data_id).unwrap_or_default();
                        if write.write_all(&waiting).await.is_ok() {
                            if finished {
                                let _ = write.shutdown().await;
                            } else {
                                to_pod.insert(data_id, write);
                            }
                        }
                        let out = out.clone();
                        let relay = tokio::spawn(async move {
                            let mut buf = vec![0u8; 32 * 1024];
                            loop {
                                match read.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if out.send(spdy::data(data_id, false, &buf[..n])).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                            }
                            let _ = out.send(spdy::data(data_id, true, &[])).await;
                            let _ = out.send(spdy::data(error_id, true, &[])).await;
                        });
                        relays.insert(data_id, relay.abort_handle());
                    }
                    Err(error) => {
                        early.remove(&data_id);
                        let message = format!(
                            "error forwarding port {} to pod {uid}: {error}",
                            pair.port
                        );
                        let _ = out.send(spdy::data(error_id, true, message.as_bytes())).await;
                        let _ = out.send(spdy::data(data_id, true, &[])).await;
                    }
                }
            }
            _ = shutdown.cancelled() => break,
        }
    }
    for relay in relays.values() {
        relay.abort();
    }
    frame_reader.abort();
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
}

/// A byte stream carried in a WebSocket's binary messages (kubectl's SPDY tunnel).
fn tunnel<S>(ws: WebSocketStream<S>) -> tokio::io::DuplexStream
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut from_session, mut to_session) = tokio::io::split(theirs);
    let (mut sink, mut source) = ws.split();
    tokio::spawn(async move {
        let inbound = async {
            while let Some(Ok(message)) = source.next().await {
                match message {
                    Message::Binary(data) if to_session.write_all(&data).await.is_err() => break,
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            let _ = to_session.shutdown().await;
        };
        let outbound = async {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match from_session.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if sink
                            .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            let _ = sink
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                })))
                .await;
        };
        tokio::join!(inbound, outbound);
    });
    ours
}

/// A sender whose messages go nowhere: output the client did not ask for is read and
/// dropped, so the process never blocks on a full pipe.
fn drain() -> mpsc::Sender<Message> {
    let (tx, mut rx) = mpsc::channel(1);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn exec_options_follow_the_kubelet() {
        let options = ExecOptions::parse(&q(&[
            ("command", "sh"),
            ("command", "-c"),
            ("command", "echo hi"),
            ("output", "1"),
            ("tty", "true"),
        ]))
        .unwrap();
        assert_eq!(options.command, ["sh", "-c", "echo hi"]);
        assert!(options.stdout && options.tty && !options.stdin && !options.stderr);
        assert!(ExecOptions::parse(&q(&[("output", "1")])).is_err());
        assert!(ExecOptions::parse(&q(&[("command", "ls")])).is_err());
    }

    #[test]
    fn exit_statuses_as_kubectl_reads_them() {
        let cmd = vec!["false".to_string()];
        assert_eq!(exit_status(&cmd, Some(0), None)["status"], "Success");
        let failed = exit_status(&cmd, Some(3), None);
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        let broken = exit_status(&cmd, None, Some("no such container"));
        assert_eq!(broken["status"], "Failure");
        assert!(
            broken["message"]
                .as_str()
                .unwrap()
                .contains("no such container")
        );
    }
}
