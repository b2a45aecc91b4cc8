//! `canopy bench auth`: what Keystone tokens cost the API server (seed §3).
//!
//! Against a real Keystone: mints distinct tokens for one member user, then measures
//! 1. in process, the cost of authenticating a request whose token is cached (the path every
//!    request but a token's first takes): bearer parsing, SHA-256, map lookup;
//! 2. over HTTPS against a `canopy server`, how many times Keystone is asked for many
//!    requests spread over those tokens (ideally once per token).

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use canopy::procs::ServerProcess;
use canopy_apiserver::{
    auth::Authenticator,
    keystone::{Keystone, KeystoneConfig, KeystoneStats, ServiceCredentials},
};

use super::{
    client::{Target, in_parallel, ok, request, send},
    machine, percentiles,
};
use crate::login::KeystoneUser;

/// Flags of `canopy bench auth`. The member's password comes from OS_PASSWORD.
#[derive(clap::Args)]
pub struct AuthArgs {
    #[command(flatten)]
    user: KeystoneUser,
    /// Canopy's service account (as `canopy server --keystone-credentials-file`); without
    /// it, CANOPY_KEYSTONE_USERNAME, _PASSWORD, _PROJECT and _DOMAIN.
    #[arg(long)]
    keystone_credentials_file: Option<PathBuf>,
    /// Distinct tokens (logins of the user).
    #[arg(long, default_value_t = 100)]
    tokens: usize,
    /// HTTPS requests sent to the server, spread over the tokens.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Concurrent HTTPS clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Cached-token authentications per in-process round.
    #[arg(long, default_value_t = 1_000_000)]
    iterations: usize,
    /// In-process rounds (the median is reported).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
}

pub async fn run(args: AuthArgs) -> Result<()> {
    let password = std::env::var("OS_PASSWORD")
        .context("OS_PASSWORD must hold the password of the --os-username user")?;
    if args.tokens == 0 || args.rounds == 0 || args.clients == 0 {
        bail!("--tokens, --rounds and --clients must be at least 1");
    }
    let url = args.user.url();
    let credentials = ServiceCredentials::load(args.keystone_credentials_file.as_deref())?;
    println!(
        "canopy bench auth: Keystone {url}, {} tokens, machine {}",
        args.tokens,
        machine()
    );

    let http = reqwest::Client::new();
    let auth = args.user.auth(password);
    let mut tokens = Vec::with_capacity(args.tokens);
    for i in 0..args.tokens {
        let issued = canopy_apiserver::keystone::request_token(&http, &url, &auth).await?;
        tokens.push(issued.token);
        if (i + 1) % 25 == 0 || i + 1 == args.tokens {
            eprintln!("  minted {}/{} tokens", i + 1, args.tokens);
        }
    }
    let headers: Arc<Vec<String>> =
        Arc::new(tokens.iter().map(|t| format!("Bearer {t}")).collect());

    in_process(&args, &url, credentials, headers.clone()).await?;
    over_https(&args, &url, headers).await
}

async fn in_process(
    args: &AuthArgs,
    url: &str,
    credentials: ServiceCredentials,
    headers: Arc<Vec<String>>,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = canopy_store::open("embedded", dir.path()).await?;
    let stats = KeystoneStats::default();
    let keystone = Keystone::new(
        KeystoneConfig {
            url: url.to_string(),
            credentials,
            cache_ttl: Duration::from_secs(3600),
            admin_project: "admin".into(),
        },
        store,
        stats.clone(),
    )?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(keystone.clone().run(shutdown.clone()));
    let authenticator = Arc::new(Authenticator {
        tokens: None,
        keystone: Some(keystone),
        service_accounts: None,
    });

    // First sight of each token: Keystone is asked.
    let mut misses = Vec::new();
    for header in headers.iter() {
        let started = Instant::now();
        authenticator
            .authenticate(None, Some(header))
            .await
            .map_err(|e| anyhow::anyhow!("Keystone did not accept a fresh token: {e:?}"))?;
        misses.push(started.elapsed().as_secs_f64());
    }
    let (miss_p50, miss_p99) = percentiles(&mut misses);
    println!(
        "first use of a token (Keystone validation + store write): p50 {:.2} ms, p99 {:.2} ms; Keystone validations {}",
        miss_p50 * 1e3,
        miss_p99 * 1e3,
        stats.validations.get()
    );

    // Cached: one task, then one task per core.
    let mut per_op = Vec::new();
    for _ in 0..args.rounds {
        let started = Instant::now();
        run_cached(&authenticator, &headers, 0, args.iterations, 1).await?;
        per_op.push(started.elapsed().as_secs_f64() / args.iterations as f64);
    }
    let (p50, _) = percentiles(&mut per_op);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rates = Vec::new();
    for _ in 0..args.rounds {
        let started = Instant::now();
        let tasks: Vec<_> = (0..cores)
            .map(|task| {
                let authenticator = authenticator.clone();
                let headers = headers.clone();
                let n = args.iterations / cores;
                tokio::spawn(
                    async move { run_cached(&authenticator, &headers, task, n, cores).await },
                )
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        rates.push((args.iterations / cores * cores) as f64 / started.elapsed().as_secs_f64());
    }
    let (rate, _) = percentiles(&mut rates);
    println!(
        "cached token authentication, in process: median {:.0} ns per request ({:.0}/s on one core); {:.0}/s on {cores} cores  (target ≤ 5 µs, ≥ 100k/s)",
        p50 * 1e9,
        1.0 / p50,
        rate
    );
    println!(
        "Keystone validations after {} cached authentications: {}",
        args.iterations * args.rounds * 2,
        stats.validations.get()
    );
    shutdown.cancel();
    Ok(())
}

async fn run_cached(
    authenticator: &Authenticator,
    headers: &[String],
    offset: usize,
    iterations: usize,
    stride: usize,
) -> Result<()> {
    for i in 0..iterations {
        let header = &headers[(offset + i * stride) % headers.len()];
        let user = authenticator.authenticate(None, Some(header)).await;
        if std::hint::black_box(user).is_err() {
            bail!("a cached token was refused");
        }
    }
    Ok(())
}

async fn over_https(args: &AuthArgs, url: &str, headers: Arc<Vec<String>>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe().context("locating the canopy binary")?;
    let mut extra = vec![
        "--disable-controllers".to_string(),
        "--keystone-url".into(),
        url.to_string(),
    ];
    if let Some(file) = &args.keystone_credentials_file {
        extra.push("--keystone-credentials-file".into());
        extra.push(file.display().to_string());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let server = ServerProcess::start(&exe, dir.path(), "embedded", &extra)?;
    let target = Target::without_client_cert(&server.kubeconfig)?;

    let tokens = headers.len();
    let started = Instant::now();
    let mut latencies = in_parallel(
        &target,
        args.clients,
        args.requests,
        "listing namespaces with a Keystone token",
        Arc::new(move |i| {
            let mut req = request("GET", "/api/v1/namespaces", None)?;
            req.headers_mut().insert(
                http::header::AUTHORIZATION,
                headers[i % headers.len()].parse()?,
            );
            Ok(req)
        }),
    )
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let (p50, p99) = percentiles(&mut latencies);

    let admin = Target::from_kubeconfig(&server.kubeconfig)?;
    let mut conn = admin.http1().await?;
    let (code, body) = send(&mut conn, request("GET", "/metrics", None)?).await?;
    ok(code, &body, "reading /metrics")?;
    let metrics = String::from_utf8_lossy(&body);
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let validations = sample("canopy_keystone_requests_total{operation=\"validate\"}");
    let hits = sample("apiserver_authentication_token_cache_request_total{status=\"hit\"}");
    println!(
        "over HTTPS ({} clients): {} requests with {} distinct tokens in {:.2} s ({:.0}/s), latency p50 {:.2} ms p99 {:.2} ms",
        args.clients,
        args.requests,
        tokens,
        elapsed,
        args.requests as f64 / elapsed,
        p50 * 1e3,
        p99 * 1e3
    );
    println!(
        "Keystone validations for those requests: {validations} (target: {}); cache hits {hits}",
        tokens
    );
    Ok(())
}
