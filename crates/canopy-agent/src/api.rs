//! The agent's HTTPS endpoint, in the shape of the kubelet's API: `/containerLogs` (what
//! `kubectl logs` reaches through the API server) and `/healthz`.
//!
//! Callers authenticate with a client certificate of the cluster CA and must be the API
//! server's own identity ([`canopy_api::AGENT_API_CLIENT_USER`]), which authorizes the user
//! behind each request first: not an administrator's kubeconfig, not a controller. The agent serves with a self-signed certificate
//! kept under its root directory and publishes its SHA-256 on its Node
//! ([`canopy_api::AGENT_SERVING_CERT_ANNOTATION`]) for the API server to pin.

use std::{
    collections::HashMap,
    convert::Infallible,
    io::SeekFrom,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use canopy_runtime::ContainerState;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::sync::CancellationToken;

use crate::{pods, stream};

pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// The agent's serving certificate and its fingerprint.
pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// Hex SHA-256 of the certificate's DER, published on the Node.
    pub sha256: String,
}

/// The serving certificate under `dir`, made (self-signed, for the node's name and
/// addresses) on first start and kept, so that the published pin survives restarts.
pub fn ensure_serving_cert(dir: &Path, node: &str, ips: &[String]) -> Result<ServingCert> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cert_path, key_path) = (dir.join("agent.crt"), dir.join("agent.key"));
    let (cert_pem, key_pem) = match (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) {
        (Ok(cert), Ok(key)) => (cert, key),
        _ => {
            let mut names = vec![node.to_string()];
            names.extend(ips.iter().cloned());
            let certified = rcgen::generate_simple_self_signed(names)
                .context("making the agent's serving certificate")?;
            let (cert, key) = (certified.cert.pem(), certified.signing_key.serialize_pem());
            write_private(&key_path, key.as_bytes())?;
            std::fs::write(&cert_path, cert.as_bytes())
                .with_context(|| format!("writing {}", cert_path.display()))?;
            (cert, key)
        }
    };
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .context("no certificate in the agent's serving certificate file")??;
    let sha256 = Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(ServingCert {
        cert_pem,
        key_pem,
        sha256,
    })
}

fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents)?;
    Ok(())
}

fn tls_acceptor(cert: &ServingCert, client_ca: &[Vec<u8>]) -> Result<tokio_rustls::TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in client_ca {
        roots.add(CertificateDer::from(der.clone()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut cert.cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut cert.key_pem.as_bytes())?
        .context("no private key in the agent's key file")?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Whether a verified client certificate is the API server's.
fn is_api_server(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .map(|(_, cert)| {
            cert.subject()
                .iter_common_name()
                .any(|cn| cn.as_str() == Ok(canopy_api::AGENT_API_CLIENT_USER))
        })
        .unwrap_or(false)
}

/// Serves the agent API on `listener` until `shutdown`.
pub async fn serve(
    ctx: Arc<pods::Context>,
    listener: tokio::net::TcpListener,
    cert: &ServingCert,
    client_ca: &[Vec<u8>],
    shutdown: CancellationToken,
) -> Result<()> {
    let acceptor = tls_acceptor(cert, client_ca)?;
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(error = %error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Streams (exec, port-forward) carry small interactive writes.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, error = %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let admin = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .is_some_and(is_api_server);
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                async move { Ok::<_, Infallible>(handle(ctx, admin, request, shutdown).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .with_upgrades()
                .await;
        });
    }
}

fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Response<Body> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message.into(), "reason": reason, "code": code.as_u16(),
    });
    let mut response = Response::new(
        Full::new(Bytes::from(serde_json::to_vec(&body).unwrap_or_default())).boxed(),
    );
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(
    ctx: Arc<pods::Context>,
    admin: bool,
    request: Request<Incoming>,
    shutdown: CancellationToken,
) -> Response<Body> {
    let path = request.uri().path().to_string();
    if path == "/healthz" {
        return Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
    }
    if !admin {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "only the API server may use the node agent's API",
        );
    }
    // Streams are upgraded from GET or POST, as the kubelet allows.
    if request.method() != http::Method::GET && request.method() != http::Method::POST {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "only GET and POST are served",
        );
    }
    let pairs: Vec<(String, String)> = request
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let query: HashMap<String, String> = pairs.iter().cloned().collect();
    let parts: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|p| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    match parts
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["containerLogs", namespace, pod, container] => match LogOptions::parse(&query) {
            Ok(options) => container_logs(&ctx, namespace, pod, container, options, shutdown)
                .await
                .unwrap_or_else(|(code, message)| {
                    let reason = if code == StatusCode::NOT_FOUND {
                        "NotFound"
                    } else {
                        "BadRequest"
                    };
                    status(code, reason, message)
                }),
            Err(message) => status(StatusCode::BAD_REQUEST, "BadRequest", message),
        },
        ["portForward", namespace, pod] => {
            stream::port_forward(&ctx, namespace, pod, &pairs, request, shutdown)
                .await
                .unwrap_or_else(|(code, message)| refusal(code, message))
        }
        ["attach", namespace, pod, container] => {
            stream::attach(&ctx, namespace, pod, container, &pairs, request, shutdown)
                .await
                .unwrap_or_else(|(code, message)| refusal(code, message))
        }
        ["exec", namespace, pod, container] => {
            stream::exec(&ctx, namespace, pod, container, &pairs, request, shutdown)
                .await
                .unwrap_or_else(|(code, message)| refusal(code, message))
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no handler for {path}"),
        ),
    }
}

fn refusal(code: StatusCode, message: String) -> Response<Body> {
    let reason = match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::BAD_REQUEST => "BadRequest",
        _ => "InternalError",
    };
    status(code, reason, message)
}

/// Upstream's PodLogOptions, as the API server passes them on.
#[derive(Debug, Default, Clone)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<usize>,
    pub limit_bytes: Option<u64>,
    /// Entries at or after this time only.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

impl LogOptions {
    fn parse(query: &HashMap<String, String>) -> Result<Self, String> {
        let flag =
            |name: &str| matches!(query.get(name).map(String::as_str), Some("true" | "1" | ""));
        let number = |name: &str| -> Result<Option<u64>, String> {
            query
                .get(name)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| format!("{name}: {v:?} is not a number"))
                })
                .transpose()
        };
        let since = match (query.get("sinceSeconds"), query.get("sinceTime")) {
            (Some(seconds), _) => {
                let seconds: i64 = seconds
                    .parse()
                    .map_err(|_| format!("sinceSeconds: {seconds:?} is not a number"))?;
                // Further back than time can go means everything.
                chrono::TimeDelta::try_seconds(seconds)
                    .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
            }
            (None, Some(time)) => Some(
                chrono::DateTime::parse_from_rfc3339(time)
                    .map_err(|e| format!("sinceTime: {e}"))?
                    .with_timezone(&chrono::Utc),
            ),
            (None, None) => None,
        };
        Ok(LogOptions {
            follow: flag("follow"),
            previous: flag("previous"),
            timestamps: flag("timestamps"),
            tail_lines: number("tailLines")?.map(|n| n as usize),
            limit_bytes: number("limitBytes")?,
            since,
        })
    }
}

/// One entry of a CRI log file: `<RFC 3339 time> <stream> <F|P> <content>`.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub time: &'a str,
    pub partial: bool,
    pub content: &'a str,
}

pub fn parse_entry(line: &str) -> Option<Entry<'_>> {
    let mut parts = line.splitn(4, ' ');
    let time = parts.next()?;
    let _stream = parts.next()?;
    let tag = parts.next()?;
    let content = parts.next().unwrap_or("");
    Some(Entry {
        time,
        partial: tag == "P",
        content,
    })
}

/// Turns CRI entries into what the user reads, applying the options' time filter and
/// timestamps.
pub fn render(lines: &[&str], options: &LogOptions) -> Vec<u8> {
    let mut out = Vec::new();
    let mut continuing = false;
    for line in lines {
        let Some(entry) = parse_entry(line) else {
            continue;
        };
        if let Some(since) = options.since
            && chrono::DateTime::parse_from_rfc3339(entry.time)
                .is_ok_and(|t| t.with_timezone(&chrono::Utc) < since)
        {
            continue;
        }
        if options.timestamps && !continuing {
            out.extend_from_slice(entry.time.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(entry.content.as_bytes());
        if !entry.partial {
            out.push(b'\n');
        }
        continuing = entry.partial;
    }
    out
}

/// The last `n` complete log lines (a partial entry belongs with the entries after it).
pub fn tail<'a>(lines: &[&'a str], n: usize) -> Vec<&'a str> {
    let mut kept = Vec::new();
    let mut complete = 0;
    for line in lines.iter().rev() {
        let partial = parse_entry(line).is_some_and(|e| e.partial);
        if !partial {
            if complete == n {
                break;
            }
            complete += 1;
        }
        kept.push(*line);
    }
    kept.reverse();
    kept
}

async fn container_logs(
    ctx: &Arc<pods::Context>,
    namespace: &str,
    pod_name: &str,
    container: &str,
    options: LogOptions,
    shutdown: CancellationToken,
) -> Result<Response<Body>, (StatusCode, String)> {
    let pod = ctx.pod_named(namespace, pod_name).ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{pod_name} is not on this node"),
        )
    })?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let mut runs: Vec<_> = ctx
        .runtime
        .list_containers(&uid)
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .into_iter()
        .filter(|c| c.name == container)
        .collect();
    runs.sort_by_key(|r| std::cmp::Reverse(r.attempt));
    let run = if options.previous {
        runs.get(1)
    } else {
        runs.first()
    };
    let Some(run) = run else {
        return Err((
            StatusCode::BAD_REQUEST,
            if options.previous {
                format!("previous terminated container {container:?} in pod {pod_name:?} not found")
            } else {
                format!(
                    "container {container:?} in pod {pod_name:?} is waiting to start: ContainerCreating"
                )
            },
        ));
    };
    let follow = options.follow && matches!(run.state, ContainerState::Running { .. });
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let runtime = ctx.runtime.clone();
    let id = run.id.clone();
    let path = run.log_path.clone();
    tokio::spawn(async move {
        if let Err(error) = stream_file(&path, &options, follow, &tx, &runtime, &id, shutdown).await
        {
            tracing::debug!(error = %error, "streaming a log ended");
        }
    });
    let stream = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |b| {
        Ok::<_, Infallible>(Frame::data(b))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(response)
}

/// Everything of `file` from `offset` on, whole lines or not, rendered for the client.
async fn read_rest(
    file: &mut tokio::fs::File,
    offset: u64,
    buffer: &mut Vec<u8>,
    options: &LogOptions,
) -> Result<Vec<u8>> {
    file.seek(SeekFrom::Start(offset)).await?;
    buffer.clear();
    file.read_to_end(buffer).await?;
    let text = String::from_utf8_lossy(buffer);
    let lines: Vec<&str> = text.lines().collect();
    Ok(render(&lines, options))
}

/// Whether `path` now names another, non-empty file than `file` (the log was rotated and the
/// monitor has written to its new file).
async fn reopened_at_path(file: &tokio::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(open) = file.metadata().await else {
        return false;
    };
    match tokio::fs::metadata(path).await {
        Ok(current) => current.ino() != open.ino() && current.len() > 0,
        Err(_) => false,
    }
}

async fn stream_file(
    path: &PathBuf,
    options: &LogOptions,
    follow: bool,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    runtime: &canopy_runtime::Runtime,
    id: &str,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut file = tokio::fs::File::open(path).await?;
    // Bytes, not text: a container may write anything, and the monitor splits long lines
    // at byte boundaries.
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).await?;
    // Only whole lines: a line being written is read on the next pass.
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut offset = complete as u64;
    let text = String::from_utf8_lossy(&bytes[..complete]);
    let lines: Vec<&str> = text.lines().collect();
    let lines = match options.tail_lines {
        Some(n) => tail(&lines, n),
        None => lines,
    };
    let mut budget = options.limit_bytes.unwrap_or(u64::MAX);
    // At most `limitBytes` in all.
    let send = |budget: &mut u64, mut bytes: Vec<u8>| {
        let take = (bytes.len() as u64).min(*budget) as usize;
        *budget -= take as u64;
        bytes.truncate(take);
        Bytes::from(bytes)
    };
    let first = send(&mut budget, render(&lines, options));
    if !first.is_empty() && tx.send(first).await.is_err() {
        return Ok(());
    }
    if !follow {
        return Ok(());
    }
    let mut buffer = Vec::new();
    loop {
        if budget == 0 {
            return Ok(());
        }
        file.seek(SeekFrom::Start(offset)).await?;
        buffer.clear();
        let read = file.read_to_end(&mut buffer).await?;
        if read > 0 {
            let complete = buffer
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            offset += complete as u64;
            let text = String::from_utf8_lossy(&buffer[..complete]);
            let lines: Vec<&str> = text.lines().collect();
            let chunk = send(&mut budget, render(&lines, options));
            if !chunk.is_empty() && tx.send(chunk).await.is_err() {
                return Ok(());
            }
            if complete > 0 {
                continue;
            }
        }
        // Rotated (see `logs`): once the monitor writes to the new file at the path, the old
        // one gets nothing more; what it still held was read above.
        if reopened_at_path(&file, path).await {
            let rest = read_rest(&mut file, offset, &mut buffer, options).await?;
            let chunk = send(&mut budget, rest);
            if !chunk.is_empty() && tx.send(chunk).await.is_err() {
                return Ok(());
            }
            file = tokio::fs::File::open(path).await?;
            offset = 0;
            continue;
        }
        let running = matches!(
            runtime.container_status(id).await,
            Ok(Some(canopy_runtime::ContainerStatus {
                state: ContainerState::Running { .. },
                ..
            }))
        );
        if !running {
            // The monitor writes everything before it records the exit: one last read.
            let rest = read_rest(&mut file, offset, &mut buffer, options).await?;
            let chunk = send(&mut budget, rest);
            if !chunk.is_empty() {
                let _ = tx.send(chunk).await;
            }
            return Ok(());
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tx.closed() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "2026-01-01T00:00:01.000000001Z stdout F one\n\
2026-01-01T00:00:02.000000001Z stderr F two\n\
2026-01-01T00:00:03.000000001Z stdout P thr\n\
2026-01-01T00:00:03.100000001Z stdout F ee\n\
2026-01-01T00:00:04.000000001Z stdout F four\n";

    #[test]
    fn renders_entries_joining_partials() {
        let lines: Vec<&str> = LOG.lines().collect();
        let out = render(&lines, &LogOptions::default());
        assert_eq!(String::from_utf8(out).unwrap(), "one\ntwo\nthree\nfour\n");
        let stamped = render(
            &lines[..2],
            &LogOptions {
                timestamps: true,
                ..Default::default()
            },
        );
        assert_eq!(
            String::from_utf8(stamped).unwrap(),
            "2026-01-01T00:00:01.000000001Z one\n2026-01-01T00:00:02.000000001Z two\n"
        );
    }

    #[test]
    fn tail_counts_whole_lines() {
        let lines: Vec<&str> = LOG.lines().collect();
        let last_two = tail(&lines, 2);
        assert_eq!(
            String::from_utf8(render(&last_two, &LogOptions::default())).unwrap(),
            "three\nfour\n"
        );
        assert!(tail(&lines, 0).is_empty());
        assert_eq!(tail(&lines, 10).len(), 5);
    }

    #[test]
    fn since_filters_by_entry_time() {
        let lines: Vec<&str> = LOG.lines().collect();
        let options = LogOptions {
            since: Some("2026-01-01T00:00:02Z".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(render(&lines, &options)).unwrap(),
            "two\nthree\nfour\n"
        );
    }

    #[test]
    fn options_parse_and_refuse_nonsense() {
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let o = LogOptions::parse(&q(&[("follow", "true"), ("tailLines", "3")])).unwrap();
        assert!(o.follow && !o.previous);
        assert_eq!(o.tail_lines, Some(3));
        assert!(LogOptions::parse(&q(&[("tailLines", "x")])).is_err());
        assert!(LogOptions::parse(&q(&[("sinceTime", "yesterday")])).is_err());
    }

    #[test]
    fn serving_certificate_is_kept_with_its_pin() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_serving_cert(dir.path(), "n1", &["127.0.0.1".into()]).unwrap();
        let again = ensure_serving_cert(dir.path(), "n1", &[]).unwrap();
        assert_eq!(first.sha256, again.sha256);
        assert_eq!(first.sha256.len(), 64);
    }
}
