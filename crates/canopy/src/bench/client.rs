//! A lean HTTPS client for benchmarks: raw hyper connections with the kubeconfig's client
//! certificate, so that what is measured is the server, not client-side decoding.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;

/// Where and how to connect.
#[derive(Clone)]
pub struct Target {
    host: String,
    port: u16,
    h1: Arc<rustls::ClientConfig>,
    h2: Arc<rustls::ClientConfig>,
}

fn b64(value: &serde_yaml::Value, what: &str) -> Result<Vec<u8>> {
    let text = value
        .as_str()
        .with_context(|| format!("kubeconfig has no {what}"))?;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .with_context(|| format!("kubeconfig {what} is not base64"))
}

impl Target {
    /// Reads the first cluster and user of a kubeconfig.
    pub fn from_kubeconfig(path: &std::path::Path) -> Result<Self> {
        Self::load(path, true)
    }

    /// The first cluster of a kubeconfig, connecting without a client certificate (for
    /// requests that authenticate with a bearer token).
    pub fn without_client_cert(path: &std::path::Path) -> Result<Self> {
        Self::load(path, false)
    }

    fn load(path: &std::path::Path, client_cert: bool) -> Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let config: serde_yaml::Value = serde_yaml::from_str(&text)?;
        let cluster = &config["clusters"][0]["cluster"];
        let user = &config["users"][0]["user"];
        let server = cluster["server"]
            .as_str()
            .context("kubeconfig has no server")?;
        let rest = server
            .strip_prefix("https://")
            .context("only https:// servers are supported")?;
        let (host, port) = rest
            .trim_end_matches('/')
            .rsplit_once(':')
            .context("server URL has no port")?;
        let ca = b64(
            &cluster["certificate-authority-data"],
            "certificate-authority-data",
        )?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut ca.as_slice()) {
            roots.add(c?)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let base = if client_cert {
            let cert = b64(&user["client-certificate-data"], "client-certificate-data")?;
            let key = b64(&user["client-key-data"], "client-key-data")?;
            let certs: Vec<_> =
                rustls_pemfile::certs(&mut cert.as_slice()).collect::<Result<_, _>>()?;
            let key = rustls_pemfile::private_key(&mut key.as_slice())?.context("no client key")?;
            builder.with_client_auth_cert(certs, key)?
        } else {
            builder.with_no_client_auth()
        };
        let mut h1 = base.clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut h2 = base;
        h2.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: port.parse()?,
            h1: Arc::new(h1),
            h2: Arc::new(h2),
        })
    }

    async fn tls(
        &self,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(self.host.clone())?;
        Ok(tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?)
    }

    /// A new HTTP/1.1 connection.
    pub async fn http1(&self) -> Result<http1::SendRequest<Full<Bytes>>> {
        let io = TokioIo::new(self.tls(self.h1.clone()).await?);
        let (send, conn) = http1::handshake(io).await?;
        tokio::spawn(conn);
        Ok(send)
    }

    /// A new HTTP/2 connection (many concurrent streams).
    pub async fn http2(&self) -> Result<http2::SendRequest<Full<Bytes>>> {
        let io = TokioIo::new(self.tls(self.h2.clone()).await?);
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(1 << 20)
            .handshake(io)
            .await?;
        tokio::spawn(conn);
        Ok(send)
    }
}

/// Builds a request.
pub fn request(
    method: &str,
    path: &str,
    body: Option<Bytes>,
) -> Result<http::Request<Full<Bytes>>> {
    let mut builder = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "canopy")
        .header("accept", "application/json");
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    Ok(builder.body(Full::new(body.unwrap_or_default()))?)
}

/// Sends a request on an HTTP/1.1 connection and reads the whole answer.
pub async fn send(
    conn: &mut http1::SendRequest<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> Result<(u16, Bytes)> {
    conn.ready().await?;
    let response = conn.send_request(req).await?;
    let code = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((code, body))
}

/// A request builder for [`in_parallel`]: request `i` of the run.
pub type MakeRequest = Arc<dyn Fn(usize) -> Result<http::Request<Full<Bytes>>> + Send + Sync>;

/// Sends `count` requests over `clients` HTTP/1.1 connections (`make(i)` builds request i),
/// waiting and retrying on 429 as a well-behaved client does; fails on any other non-success.
/// Returns each request's latency in seconds.
pub async fn in_parallel(
    target: &Target,
    clients: usize,
    count: usize,
    what: &'static str,
    make: MakeRequest,
) -> Result<Vec<f64>> {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients.max(1))
        .map(|_| {
            let target = target.clone();
            let next = next.clone();
            let make = make.clone();
            tokio::spawn(async move {
                let mut conn = target.http1().await?;
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return Ok::<_, anyhow::Error>(latencies);
                    }
                    let started = Instant::now();
                    loop {
                        let (code, body) = send(&mut conn, make(i)?).await?;
                        if code == 429 {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        ok(code, &body, what)?;
                        break;
                    }
                    latencies.push(started.elapsed().as_secs_f64());
                }
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok(latencies)
}

/// Fails unless the status is a success.
pub fn ok(code: u16, body: &Bytes, what: &str) -> Result<()> {
    if !(200..300).contains(&code) {
        bail!(
            "{what}: HTTP {code}: {}",
            String::from_utf8_lossy(&body[..body.len().min(400)])
        );
    }
    Ok(())
}
