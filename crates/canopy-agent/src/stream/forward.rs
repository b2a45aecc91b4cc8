//! Port-forward sessions: WebSocket channels, and SPDY (plain or tunnelled in WebSocket).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};
use tokio_util::sync::CancellationToken;

use super::{
    EARLY_DATA_LIMIT, PORT_FORWARD_PROTOCOLS, Refusal, SPDY_TUNNEL, accept, accept_spdy,
    close_normally, frame, is_spdy, upgraded, upgraded_websocket,
};
use crate::{api::Body, pods};

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
            if let Some(io) = upgraded(request).await {
                run_spdy_port_forward(io, netns, uid, shutdown).await;
            }
        });
        return Ok(response);
    }
    let (response, protocol) = accept(&request, PORT_FORWARD_PROTOCOLS)?;
    if protocol == SPDY_TUNNEL {
        tokio::spawn(async move {
            if let Some(ws) = upgraded_websocket(request).await {
                run_spdy_port_forward(tunnel(ws), netns, uid, shutdown).await;
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
        if let Some(ws) = upgraded_websocket(request).await {
            run_port_forward(ws, netns, uid, ports, shutdown).await;
        }
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
        close_normally(&mut sink).await;
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
            close_normally(&mut sink).await;
        };
        tokio::join!(inbound, outbound);
    });
    ours
}

/// Copies a reader into channel frames until it ends.
async fn pump(mut from: impl tokio::io::AsyncRead + Unpin, channel: u8, to: mpsc::Sender<Message>) {
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
