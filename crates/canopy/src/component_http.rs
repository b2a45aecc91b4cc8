//! The plain-HTTP endpoint of a component running alone (`canopy scheduler`): `/metrics`
//! for Prometheus, `/healthz` and `/livez` (the process serves), `/readyz` (the API server
//! it works through answers its own `/readyz`).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Binds `addr` and serves until the process ends; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    client: kube::Client,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors, say: retrying at once would spin.
                    tracing::warn!(error = %err, "accepting a metrics connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let registry = registry.clone();
                    let client = client.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(answer(req, &registry, &client).await)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

async fn answer(
    req: Request<Incoming>,
    registry: &Registry,
    client: &kube::Client,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            canopy_scheduler::metrics::render(registry),
        ),
        "/healthz" | "/livez" => (StatusCode::OK, "text/plain", "ok".to_string()),
        "/readyz" => match api_ready(client).await {
            Ok(()) => (StatusCode::OK, "text/plain", "ok".to_string()),
            Err(err) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("[-]api-server failed: {err}\nreadyz check failed"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "404 page not found".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

async fn api_ready(client: &kube::Client) -> Result<()> {
    let request = http::Request::get("/readyz").body(Vec::new())?;
    let text = tokio::time::timeout(Duration::from_secs(2), client.request_text(request))
        .await
        .context("no answer within 2 s")??;
    anyhow::ensure!(text.trim() == "ok", "answered {text:?}");
    Ok(())
}
