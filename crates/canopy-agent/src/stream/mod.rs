//! Streaming into pods as the kubelet serves it: `kubectl exec` and `kubectl attach`
//! (`/exec/{namespace}/{pod}/{container}`, `/attach/...`) and `kubectl port-forward`
//! (`/portForward/{namespace}/{pod}`).
//!
//! Two families of protocols, both spoken here and only here (the API server authorizes and
//! relays the upgraded connection, as upstream's apiserver proxies to kubelets):
//!
//! - WebSocket channels: every binary message starts with a channel byte. For exec and
//!   attach (`v4.channel.k8s.io`, `v5.channel.k8s.io`: kubectl 1.30+, kube-rs, the Python
//!   client) 0 is stdin, 1 stdout, 2 stderr, 3 the final Status (JSON), 4 terminal resizes
//!   (`{"Width","Height"}`); v5 adds 255, "close this channel" (the client's end of stdin).
//!   For port-forward each requested port gets a data channel (2i) and an error channel
//!   (2i+1), both opened by the port number in two little-endian bytes.
//! - SPDY/3.1 streams (older kubectl, and kubectl's port-forward, tunnelled in WebSocket
//!   since 1.31): one stream per standard stream, named by a `streamType` header; for
//!   port-forward a data and an error stream per connection.

use std::sync::Arc;

use bytes::Bytes;
use futures::SinkExt;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        handshake::derive_accept_key,
        protocol::{CloseFrame, Role, frame::coding::CloseCode},
    },
};

use crate::{api::Body, pods};

mod forward;
mod remote;

pub use forward::port_forward;
pub use remote::{attach, exec};

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
        let message = format!("Upgrade request required: WebSocket or SPDY/3.1, not {offered:?}");
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

/// An upgraded connection.
type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// The connection once the client got our 101; `None` (logged) when it never does.
async fn upgraded(request: Request<Incoming>) -> Option<Upgraded> {
    match hyper::upgrade::on(request).await {
        Ok(upgraded) => Some(TokioIo::new(upgraded)),
        Err(error) => {
            tracing::debug!(error = %error, "a stream failed to upgrade");
            None
        }
    }
}

/// The server side of an upgraded WebSocket.
async fn upgraded_websocket(request: Request<Incoming>) -> Option<WebSocketStream<Upgraded>> {
    let io = upgraded(request).await?;
    Some(WebSocketStream::from_raw_socket(io, Role::Server, None).await)
}

/// Ends a WebSocket as clients expect: client-go reads a close without a status as an
/// error.
async fn close_normally<S>(sink: &mut futures::stream::SplitSink<WebSocketStream<S>, Message>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    let _ = sink.close().await;
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
