//! `canopy bench api`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::json;

use canopy::procs::{Etcd, ServerProcess};

use super::{
    client::{Target, ok, request, send},
    machine, percentiles,
};

/// Flags of `canopy bench api`.
#[derive(clap::Args, Debug)]
pub struct ApiArgs {
    /// Store of the server under test: `embedded`, `etcd` (starts a local etcd from PATH)
    /// or `etcd=http://host:port`.
    #[arg(long, default_value = "embedded")]
    store: String,
    /// Pods to create (and then list).
    #[arg(long, default_value_t = 100_000)]
    pods: usize,
    /// Concurrent clients creating pods, each on its own HTTPS connection.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Concurrent watchers for the watch latency measurement.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Changes made while the watchers watch.
    #[arg(long, default_value_t = 300)]
    watch_events: usize,
    /// Changes per second while the watchers watch.
    #[arg(long, default_value_t = 20)]
    watch_rate: u64,
    /// Times each LIST is repeated.
    #[arg(long, default_value_t = 5)]
    list_runs: usize,
}

fn pod(name: &str, namespace: &str, i: usize) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": "bench", "shard": (i % 16).to_string()}},
            "spec": {"containers": [{
                "name": "app",
                "image": "registry.local/bench/app:1.0",
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
            }]},
        }))
        .unwrap_or_default(),
    )
}

fn ms(d: f64) -> String {
    format!("{:.2} ms", d * 1000.0)
}

pub async fn run(args: ApiArgs) -> Result<()> {
    let _etcd;
    let store = match args.store.as_str() {
        "etcd" => {
            let etcd = Etcd::start()?;
            let spec = format!("etcd={}", etcd.url);
            _etcd = Some(etcd);
            spec
        }
        other => {
            _etcd = None;
            other.to_string()
        }
    };
    let dir = tempfile::tempdir()?;
    println!("canopy bench api: store {store}, machine {}", machine());
    let exe = std::env::current_exe().context("locating the canopy binary")?;
    let server = ServerProcess::start(&exe, dir.path(), &store, &["--disable-controllers"])?;
    let target = Target::from_kubeconfig(&server.kubeconfig)?;
    let mut conn = target.http1().await?;
    for ns in ["bench", "bench-watch"] {
        let body = Bytes::from(serde_json::to_vec(
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )?);
        let (code, resp) = send(
            &mut conn,
            request("POST", "/api/v1/namespaces", Some(body))?,
        )
        .await?;
        ok(code, &resp, "creating namespace")?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = server.rss_bytes()?;

    // 1. Creates.
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let target = target.clone();
        let next = next.clone();
        let total = args.pods;
        tasks.push(tokio::spawn(async move {
            let mut conn = target.http1().await?;
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let name = format!("bench-{i:06}");
                let req = request(
                    "POST",
                    "/api/v1/namespaces/bench/pods",
                    Some(pod(&name, "bench", i)),
                )?;
                let t = Instant::now();
                let (code, body) = send(&mut conn, req).await?;
                latencies.push(t.elapsed().as_secs_f64());
                ok(code, &body, "creating a pod")?;
            }
        }));
    }
    let progress = {
        let next = next.clone();
        let total = args.pods;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(5));
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let done = next.load(Ordering::Relaxed).min(total);
                eprintln!(
                    "  ... {done}/{total} pods created ({:.0}/s so far)",
                    done as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut latencies = Vec::with_capacity(args.pods);
    for task in tasks {
        latencies.extend(task.await??);
    }
    progress.abort();
    let elapsed = started.elapsed().as_secs_f64();
    let (p50, p99) = percentiles(&mut latencies);
    println!(
        "creates: {} pods with {} clients in {:.1} s = {:.0} pods/s; latency p50 {} p99 {}",
        args.pods,
        args.clients,
        elapsed,
        args.pods as f64 / elapsed,
        ms(p50),
        ms(p99)
    );

    // 2. Memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = server.rss_bytes()?;
    println!(
        "memory: server RSS {:.1} MiB before, {:.1} MiB after {} pods = {:.0} bytes per stored pod",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        args.pods,
        (rss_after.saturating_sub(rss_before)) as f64 / args.pods as f64
    );

    // 3. Lists.
    for (label, query) in [
        ("consistent (resourceVersion unset)", ""),
        ("from cache (resourceVersion=0)", "?resourceVersion=0"),
    ] {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..args.list_runs {
            let t = Instant::now();
            let (code, body) = send(
                &mut conn,
                request("GET", &format!("/api/v1/pods{query}"), None)?,
            )
            .await?;
            times.push(t.elapsed().as_secs_f64());
            ok(code, &body, "listing pods")?;
            let needle = b"\"name\":\"bench-";
            let count = body.windows(needle.len()).filter(|w| *w == needle).count();
            if count != args.pods {
                bail!("LIST returned {count} pods, expected {}", args.pods);
            }
            size = body.len();
        }
        let (p50, _) = percentiles(&mut times);
        let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
        println!(
            "list {} pods {label}: median {} (best {}), {:.0} MiB",
            args.pods,
            ms(p50),
            ms(best),
            size as f64 / 1048576.0
        );
    }

    // 4. Watch latency.
    watch_latency(&target, &mut conn, &args).await?;
    drop(server);
    Ok(())
}

/// Opens many watchers, changes a few pods at a steady rate with the send time in an
/// annotation, and measures how long each change takes to reach each watcher.
async fn watch_latency(
    target: &Target,
    conn: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    args: &ApiArgs,
) -> Result<()> {
    const OBJECTS: usize = 10;
    for i in 0..OBJECTS {
        let (code, body) = send(
            conn,
            request(
                "POST",
                "/api/v1/namespaces/bench-watch/pods",
                Some(pod(&format!("w-{i}"), "bench-watch", i)),
            )?,
        )
        .await?;
        ok(code, &body, "creating a watched pod")?;
    }
    let (code, list) = send(
        conn,
        request("GET", "/api/v1/namespaces/bench-watch/pods", None)?,
    )
    .await?;
    ok(code, &list, "listing watched pods")?;
    let rv = serde_json::from_slice::<serde_json::Value>(&list)?["metadata"]["resourceVersion"]
        .as_str()
        .context("list has no resourceVersion")?
        .to_string();
    let streams_per_conn = 100;
    let connected = Arc::new(AtomicUsize::new(0));
    let mut watchers = Vec::new();
    let mut h2 = None;
    for w in 0..args.watchers {
        if w % streams_per_conn == 0 {
            h2 = Some(target.http2().await?);
        }
        let mut send_req = h2.clone().context("no connection")?;
        let path = format!("/api/v1/namespaces/bench-watch/pods?watch=1&resourceVersion={rv}");
        let connected = connected.clone();
        let expected = args.watch_events;
        watchers.push(tokio::spawn(async move {
            send_req.ready().await?;
            let response = send_req.send_request(request("GET", &path, None)?).await?;
            if !response.status().is_success() {
                bail!("watch failed: HTTP {}", response.status());
            }
            connected.fetch_add(1, Ordering::Relaxed);
            let mut body = response.into_body();
            let mut latencies = Vec::with_capacity(expected);
            let marker = b"bench/sent\":\"";
            let mut carry = Vec::new();
            while latencies.len() < expected {
                let Some(frame) = body.frame().await else {
                    break;
                };
                let Ok(data) = frame?.into_data() else {
                    continue;
                };
                let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as i128;
                carry.extend_from_slice(&data);
                // Events are newline-terminated; handle whole lines only.
                while let Some(end) = carry.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = carry.drain(..=end).collect();
                    if let Some(at) = line.windows(marker.len()).position(|w| w == marker) {
                        let start = at + marker.len();
                        let digits: Vec<u8> = line[start..]
                            .iter()
                            .take_while(|b| b.is_ascii_digit())
                            .copied()
                            .collect();
                        if let Ok(sent) = std::str::from_utf8(&digits)?.parse::<i128>() {
                            latencies.push((now - sent) as f64 / 1e9);
                        }
                    }
                }
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while connected.load(Ordering::Relaxed) < args.watchers {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} watchers connected",
                connected.load(Ordering::Relaxed),
                args.watchers
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let period = Duration::from_nanos(1_000_000_000 / args.watch_rate.max(1));
    let mut ticker = tokio::time::interval(period);
    for e in 0..args.watch_events {
        ticker.tick().await;
        let sent = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let patch = json!({"metadata": {"annotations": {"bench/sent": sent.to_string()}}});
        let mut req = request(
            "PATCH",
            &format!("/api/v1/namespaces/bench-watch/pods/w-{}", e % OBJECTS),
            Some(Bytes::from(serde_json::to_vec(&patch)?)),
        )?;
        req.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/merge-patch+json"),
        );
        let (code, body) = send(conn, req).await?;
        ok(code, &body, "patching a watched pod")?;
    }
    let mut all = Vec::new();
    for w in watchers {
        match tokio::time::timeout(Duration::from_secs(30), w).await {
            Ok(result) => all.extend(result??),
            Err(_) => bail!("a watcher did not receive every event within 30 s"),
        }
    }
    let expected = args.watchers * args.watch_events;
    let (p50, p99) = percentiles(&mut all);
    println!(
        "watch: {} watchers, {} changes at {}/s, {} of {} deliveries; latency p50 {} p99 {}",
        args.watchers,
        args.watch_events,
        args.watch_rate,
        all.len(),
        expected,
        ms(p50),
        ms(p99)
    );
    Ok(())
}
