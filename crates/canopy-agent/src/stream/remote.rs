//! Exec and attach sessions. The process side (a `runc exec`, or the container's monitor
//! for attach) sees [`Ends`]: input events, an output channel and the final status; a
//! transport (WebSocket channels or SPDY streams) turns them into the client's protocol.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, oneshot},
};
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};
use tokio_util::sync::CancellationToken;

use super::{
    CLOSE, ERROR, EXEC_PROTOCOLS, ExecOptions, RESIZE, Refusal, STDERR, STDIN, STDOUT, accept,
    accept_spdy, close_normally, exit_status, flag, frame, is_spdy, running_container, upgraded,
    upgraded_websocket,
};
use crate::{api::Body, pods, spdy};

/// The only remote-command protocol spoken over SPDY (its Status is JSON, as v5's).
const SPDY_PROTOCOL: &str = "v4.channel.k8s.io";
/// How long a SPDY client has to open the streams it asked for (the kubelet's default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// What the client sends.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    Stdin(Bytes),
    CloseStdin,
    Resize { width: u16, height: u16 },
}

/// Which output stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Out {
    Stdout,
    Stderr,
}

/// The process side of a session. `input` ends (None) when the client is gone; dropping
/// every `output` sender and then sending the status ends the session.
struct Ends {
    input: mpsc::Receiver<Input>,
    output: mpsc::Sender<(Out, Bytes)>,
    status: oneshot::Sender<Value>,
}

/// The streams a client asked for.
#[derive(Clone, Copy, Debug)]
struct Wanted {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

/// What a session runs.
enum Target {
    Exec {
        runtime: canopy_runtime::Runtime,
        id: String,
        command: Vec<String>,
    },
    Attach {
        monitor: tokio::net::UnixStream,
        tty: bool,
    },
}

/// `/exec/{namespace}/{pod}/{container}`: a command in a running container.
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
    let wanted = Wanted {
        stdin: options.stdin,
        stdout: options.stdout,
        stderr: options.stderr,
        tty: options.tty,
    };
    let target = Target::Exec {
        runtime: ctx.runtime.clone(),
        id,
        command: options.command,
    };
    serve(request, wanted, target, shutdown)
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
    let mut wanted = Wanted {
        stdin: flag(query, "input"),
        stdout: flag(query, "output"),
        stderr: flag(query, "error"),
        tty: flag(query, "tty"),
    };
    if !(wanted.stdin || wanted.stdout || wanted.stderr) {
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
    // A container without a terminal has none to resize, whatever the client thinks.
    wanted.tty &= tty;
    serve(request, wanted, Target::Attach { monitor, tty }, shutdown)
}

/// Answers the upgrade, then runs the session on the upgraded connection.
fn serve(
    request: Request<Incoming>,
    wanted: Wanted,
    target: Target,
    shutdown: CancellationToken,
) -> Result<Response<Body>, Refusal> {
    if is_spdy(&request) {
        let response = accept_spdy(&request, SPDY_PROTOCOL)?;
        tokio::spawn(async move {
            let Some(io) = upgraded(request).await else {
                return;
            };
            if let Some(ends) = spdy_transport(io, wanted).await {
                run(target, ends, wanted, shutdown).await;
            }
        });
        return Ok(response);
    }
    let (response, protocol) = accept(&request, EXEC_PROTOCOLS)?;
    tokio::spawn(async move {
        if let Some(ws) = upgraded_websocket(request).await {
            let ends = websocket_transport(ws, protocol == "v5.channel.k8s.io", wanted);
            run(target, ends, wanted, shutdown).await;
        }
    });
    Ok(response)
}

async fn run(target: Target, ends: Ends, wanted: Wanted, shutdown: CancellationToken) {
    match target {
        Target::Exec {
            runtime,
            id,
            command,
        } => run_exec(ends, &runtime, &id, command, wanted, shutdown).await,
        Target::Attach { monitor, tty } => run_attach(ends, monitor, tty, wanted, shutdown).await,
    }
}

/// Copies a reader into the output until it ends (a pty's master reads EIO once its
/// terminal side is closed: that is its end too); output nobody asked for is read and
/// dropped, so the process never blocks on a full pipe.
async fn pump(mut from: impl AsyncRead + Unpin, kind: Out, to: Option<mpsc::Sender<(Out, Bytes)>>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Some(to) = &to
                    && to
                        .send((kind, Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                {
                    return;
                }
            }
        }
    }
}

async fn run_exec(
    ends: Ends,
    runtime: &canopy_runtime::Runtime,
    id: &str,
    command: Vec<String>,
    wanted: Wanted,
    shutdown: CancellationToken,
) {
    let Ends {
        mut input,
        output,
        status,
    } = ends;
    let session = match runtime
        .exec_interactive(id, &command, wanted.stdin, wanted.tty)
        .await
    {
        Ok(session) => session,
        Err(error) => {
            drop(output);
            let _ = status.send(exit_status(&command, None, Some(&error.to_string())));
            return;
        }
    };
    let canopy_runtime::ExecSession { mut child, io } = session;
    let mut pumps = Vec::new();
    let (mut stdin, terminal): (
        Option<Box<dyn AsyncWrite + Unpin + Send>>,
        Option<std::fs::File>,
    ) = match io {
        canopy_runtime::ExecIo::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            let out = wanted.stdout.then(|| output.clone());
            let err = wanted.stderr.then(|| output.clone());
            pumps.push(tokio::spawn(pump(stdout, Out::Stdout, out)));
            pumps.push(tokio::spawn(pump(stderr, Out::Stderr, err)));
            (stdin.map(|s| Box::new(s) as _), None)
        }
        canopy_runtime::ExecIo::Tty { master } => {
            let (Ok(reader), Ok(writer)) = (master.try_clone(), master.try_clone()) else {
                let _ = child.start_kill();
                return;
            };
            pumps.push(tokio::spawn(pump(
                tokio::fs::File::from_std(reader),
                Out::Stdout,
                Some(output.clone()),
            )));
            let input: Option<Box<dyn AsyncWrite + Unpin + Send>> = wanted
                .stdin
                .then(|| Box::new(tokio::fs::File::from_std(writer)) as _);
            (input, Some(master))
        }
    };
    drop(output);
    let child_pid = child.id().map(|p| p as i32);
    let resize = |terminal: &Option<std::fs::File>, width: u16, height: u16| {
        let Some(master) = terminal else { return };
        let size = rustix::termios::Winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let _ = rustix::termios::tcsetwinsize(master, size);
        // runc copies our terminal's size into the container's on SIGWINCH.
        if let Some(pid) = child_pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGWINCH,
            );
        }
    };
    let exited = loop {
        tokio::select! {
            exited = child.wait() => break exited.ok(),
            event = input.recv() => match event {
                Some(Input::Stdin(data)) => {
                    if let Some(writer) = stdin.as_mut()
                        && writer.write_all(&data).await.is_err()
                    {
                        stdin = None;
                    }
                }
                Some(Input::CloseStdin) => {
                    if let Some(mut writer) = stdin.take() {
                        let _ = writer.shutdown().await;
                    }
                }
                Some(Input::Resize { width, height }) => resize(&terminal, width, height),
                None => {
                    // The client is gone: the process loses its input (and its terminal,
                    // which hangs it up) and is left to finish.
                    drop(stdin);
                    drop(terminal);
                    tokio::spawn(async move { let _ = child.wait().await; });
                    for p in pumps {
                        p.abort();
                    }
                    return;
                }
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
        let handle = p.abort_handle();
        if tokio::time::timeout(Duration::from_secs(2), p)
            .await
            .is_err()
        {
            handle.abort();
        }
    }
    let exit_code = exited.map(|s| {
        use std::os::unix::process::ExitStatusExt;
        s.code()
            .or_else(|| s.signal().map(|n| 128 + n))
            .unwrap_or(255)
    });
    let _ = status.send(exit_status(&command, exit_code, None));
}

async fn run_attach(
    ends: Ends,
    monitor: tokio::net::UnixStream,
    tty: bool,
    wanted: Wanted,
    shutdown: CancellationToken,
) {
    use canopy_runtime::attach as frames;
    let Ends {
        mut input,
        output,
        status,
    } = ends;
    let (mut from_monitor, mut to_monitor) = monitor.into_split();
    // The monitor's frames, read by a task of their own (a frame read halfway must not be
    // dropped by the loop below); it ends when the container exits.
    let mut relay = tokio::spawn(async move {
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
            // On a terminal everything is one stream, as upstream.
            let kind = match head[0] {
                frames::STDOUT if wanted.stdout => Out::Stdout,
                frames::STDERR if tty && wanted.stdout => Out::Stdout,
                frames::STDERR if !tty && wanted.stderr => Out::Stderr,
                _ => continue,
            };
            if output.send((kind, Bytes::from(payload))).await.is_err() {
                return;
            }
        }
    });
    let send = async |to: &mut tokio::net::unix::OwnedWriteHalf, kind: u8, payload: &[u8]| {
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.push(kind);
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(payload);
        to.write_all(&buf).await
    };
    let container_ended = loop {
        tokio::select! {
            _ = &mut relay => break true,
            event = input.recv() => match event {
                Some(Input::Stdin(data)) if wanted.stdin => {
                    let _ = send(&mut to_monitor, frames::STDIN, &data).await;
                }
                Some(Input::Stdin(_)) => {}
                Some(Input::CloseStdin) => {
                    let _ = send(&mut to_monitor, frames::CLOSE_STDIN, &[]).await;
                }
                Some(Input::Resize { width, height }) => {
                    let mut payload = width.to_be_bytes().to_vec();
                    payload.extend_from_slice(&height.to_be_bytes());
                    let _ = send(&mut to_monitor, frames::RESIZE, &payload).await;
                }
                None => break false,
            },
            _ = shutdown.cancelled() => break false,
        }
    };
    relay.abort();
    if container_ended {
        // The container exited: the session ends as upstream's, successfully.
        let _ = status.send(json!({"metadata": {}, "status": "Success"}));
    }
}

/// A terminal size as clients send it.
#[derive(serde::Deserialize)]
struct Size {
    #[serde(rename = "Width")]
    width: u16,
    #[serde(rename = "Height")]
    height: u16,
}

/// The WebSocket channel transport (v4, v5).
fn websocket_transport<S>(ws: WebSocketStream<S>, v5: bool, wanted: Wanted) -> Ends
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut source) = ws.split();
    let (input_tx, input) = mpsc::channel(64);
    let (output, mut output_rx) = mpsc::channel::<(Out, Bytes)>(64);
    let (status, status_rx) = oneshot::channel::<Value>();
    // Reading the client: never blocked by output, so a process that does not read its
    // input cannot stall its output.
    tokio::spawn(async move {
        while let Some(Ok(message)) = source.next().await {
            let data = match message {
                Message::Binary(data) if !data.is_empty() => data,
                Message::Close(_) => break,
                _ => continue,
            };
            let event = match data[0] {
                STDIN => Input::Stdin(data.slice(1..)),
                RESIZE => match serde_json::from_slice::<Size>(&data[1..]) {
                    Ok(size) => Input::Resize {
                        width: size.width,
                        height: size.height,
                    },
                    Err(_) => continue,
                },
                CLOSE if v5 && data.get(1) == Some(&STDIN) => Input::CloseStdin,
                _ => continue,
            };
            if input_tx.send(event).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        // Upstream's kubelet tells the client the streams are up with an empty message on
        // the lowest channel it will write.
        let first = if wanted.stdout {
            STDOUT
        } else if wanted.stderr {
            STDERR
        } else {
            ERROR
        };
        if sink.send(frame(first, &[])).await.is_err() {
            return;
        }
        while let Some((kind, data)) = output_rx.recv().await {
            let channel = if kind == Out::Stdout { STDOUT } else { STDERR };
            if sink.send(frame(channel, &data)).await.is_err() {
                return;
            }
        }
        if let Ok(status) = status_rx.await {
            let _ = sink.send(frame(ERROR, status.to_string().as_bytes())).await;
        }
        close_normally(&mut sink).await;
    });
    Ends {
        input,
        output,
        status,
    }
}

/// The SPDY transport (kubectl before 1.30, or with its WebSocket support off): waits for
/// the streams the request asked for, then relays them. `None` when they never came.
async fn spdy_transport<S>(io: S, wanted: Wanted) -> Option<Ends>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(io);
    let mut headers_in = spdy::HeaderReader::default();
    let mut headers_out = spdy::HeaderWriter::default();
    let (raw, mut raw_rx) = mpsc::channel::<Vec<u8>>(64);
    // Streams by type: error, stdin, stdout, stderr, resize.
    let mut ids: std::collections::HashMap<String, u32> = Default::default();
    let expected = 1
        + usize::from(wanted.stdin)
        + usize::from(wanted.stdout)
        + usize::from(wanted.stderr)
        + usize::from(wanted.tty);
    let mut early: Vec<spdy::Frame> = Vec::new();
    let opened = tokio::time::timeout(STREAM_CREATION_TIMEOUT, async {
        while ids.len() < expected {
            match spdy::read_frame(&mut reader, &mut headers_in).await {
                Ok(spdy::Frame::SynStream {
                    stream_id, headers, ..
                }) => {
                    let kind = headers
                        .iter()
                        .find(|(n, _)| n == "streamtype")
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default();
                    writer
                        .write_all(&headers_out.syn_reply(stream_id, &[]))
                        .await
                        .ok()?;
                    ids.insert(kind, stream_id);
                }
                Ok(spdy::Frame::Ping { id }) => writer.write_all(&spdy::ping(id)).await.ok()?,
                Ok(frame @ spdy::Frame::Data { .. }) => early.push(frame),
                Ok(spdy::Frame::GoAway) | Err(_) => return None,
                Ok(_) => {}
            }
        }
        Some(())
    })
    .await;
    if !matches!(opened, Ok(Some(()))) {
        tracing::debug!("a SPDY client did not open the streams it asked for");
        return None;
    }
    let id = |kind: &str| ids.get(kind).copied();
    let (error_id, stdin_id, stdout_id, stderr_id, resize_id) = (
        id("error")?,
        id("stdin"),
        id("stdout"),
        id("stderr"),
        id("resize"),
    );
    let (input_tx, input) = mpsc::channel(64);
    let (output, mut output_rx) = mpsc::channel::<(Out, Bytes)>(64);
    let (status, status_rx) = oneshot::channel::<Value>();
    let pings = raw.clone();
    tokio::spawn(async move {
        let mut resizes = Vec::new();
        let handle = async |frame: spdy::Frame, resizes: &mut Vec<u8>| -> bool {
            match frame {
                spdy::Frame::Data {
                    stream_id,
                    flags,
                    data,
                } => {
                    if Some(stream_id) == stdin_id {
                        if !data.is_empty()
                            && input_tx
                                .send(Input::Stdin(Bytes::from(data)))
                                .await
                                .is_err()
                        {
                            return false;
                        }
                        if flags & spdy::FLAG_FIN != 0 {
                            let _ = input_tx.send(Input::CloseStdin).await;
                        }
                    } else if Some(stream_id) == resize_id {
                        // Consecutive JSON objects, as Go's json.Encoder writes them.
                        resizes.extend_from_slice(&data);
                        let mut sizes =
                            serde_json::Deserializer::from_slice(resizes).into_iter::<Size>();
                        let mut consumed = 0;
                        while let Some(Ok(size)) = sizes.next() {
                            consumed = sizes.byte_offset();
                            let event = Input::Resize {
                                width: size.width,
                                height: size.height,
                            };
                            if input_tx.send(event).await.is_err() {
                                return false;
                            }
                        }
                        resizes.drain(..consumed);
                        if resizes.len() > 64 << 10 {
                            resizes.clear();
                        }
                    }
                    true
                }
                spdy::Frame::Ping { id } => pings.send(spdy::ping(id)).await.is_ok(),
                spdy::Frame::GoAway => false,
                _ => true,
            }
        };
        for frame in early {
            if !handle(frame, &mut resizes).await {
                return;
            }
        }
        while let Ok(frame) = spdy::read_frame(&mut reader, &mut headers_in).await {
            if !handle(frame, &mut resizes).await {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let mut raw_open = true;
        loop {
            tokio::select! {
                frame = raw_rx.recv(), if raw_open => match frame {
                    Some(frame) => if writer.write_all(&frame).await.is_err() { return },
                    None => raw_open = false,
                },
                item = output_rx.recv() => match item {
                    Some((kind, data)) => {
                        let stream = match kind {
                            Out::Stdout => stdout_id,
                            Out::Stderr => stderr_id.or(stdout_id),
                        };
                        if let Some(stream) = stream
                            && writer.write_all(&spdy::data(stream, false, &data)).await.is_err()
                        {
                            return;
                        }
                    }
                    None => break,
                },
            }
        }
        let mut closing = Vec::new();
        for stream in [stdout_id, stderr_id].into_iter().flatten() {
            closing.extend(spdy::data(stream, true, &[]));
        }
        if let Ok(status) = status_rx.await {
            closing.extend(spdy::data(error_id, false, status.to_string().as_bytes()));
        }
        closing.extend(spdy::data(error_id, true, &[]));
        let _ = writer.write_all(&closing).await;
        let _ = writer.shutdown().await;
    });
    drop(raw);
    Some(Ends {
        input,
        output,
        status,
    })
}
