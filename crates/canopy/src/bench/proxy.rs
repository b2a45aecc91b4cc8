//! `canopy bench proxy` (root): a tenant-scoped proxy against a live `canopy server` holding
//! many tenants' Services, programming nftables in a scratch network namespace.
//!
//! Reports the rules one node holds for the biggest tenant against all Services of the
//! cloud (what upstream's kube-proxy programs on every node), the time from an EndpointSlice
//! write to its rule being live in the kernel (p50/p99), and the time of a full resync of
//! the biggest tenant's table against the whole cloud's.

use std::{
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use canopy::procs::ServerProcess;
use canopy_proxy::{Backend, Frontend, Protocol, Rules, Target as Rule, nft};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use super::{
    client::{Target, in_parallel, request},
    machine, percentiles,
};

/// Flags of `canopy bench proxy`.
#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    /// Services in the whole cloud.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Tenants they are spread over.
    #[arg(long, default_value_t = 100)]
    tenants: usize,
    /// Services of the biggest tenant (the one whose node is measured).
    #[arg(long, default_value_t = 1_000)]
    biggest: usize,
    /// Ready endpoints per Service.
    #[arg(long, default_value_t = 2)]
    endpoints: usize,
    /// EndpointSlice changes timed one after the other.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Full resyncs timed per table.
    #[arg(long, default_value_t = 5)]
    resyncs: usize,
    /// Concurrent HTTPS clients creating the objects.
    #[arg(long, default_value_t = 32)]
    clients: usize,
}

fn tenant_of(i: usize, args: &ProxyArgs) -> usize {
    // The first `biggest` Services are tenant 0's; the rest go round the others.
    if i < args.biggest || args.tenants == 1 {
        0
    } else {
        1 + (i - args.biggest) % (args.tenants - 1)
    }
}

fn endpoint_ip(i: usize, e: usize) -> String {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i * 8 + e) as u32 + 2).to_string()
}

/// A scratch network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Result<Self> {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let status = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .context("running ip")?;
        if !status.success() {
            bail!("ip netns add {name} failed (root is needed)");
        }
        Ok(Self(name))
    }

    fn nft(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.0, "nft"]
            .map(String::from)
            .to_vec()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

async fn time_apply(nft: &[String], script: &str, times: usize) -> Result<Vec<f64>> {
    let mut samples = Vec::new();
    for _ in 0..times.max(1) {
        let started = Instant::now();
        canopy_proxy::apply(nft, script).await?;
        samples.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(samples)
}

type Awaited = Option<(Frontend, Ipv4Addr, tokio::sync::oneshot::Sender<Instant>)>;

pub async fn run(args: ProxyArgs) -> Result<()> {
    if args.tenants == 0 || args.biggest > args.services || args.endpoints == 0 {
        bail!("need tenants, --biggest ≤ --services and at least one endpoint");
    }
    println!(
        "canopy bench proxy: {} services over {} tenants (biggest {}), {} endpoints each, machine {}",
        args.services,
        args.tenants,
        args.biggest,
        args.endpoints,
        machine()
    );
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe().context("locating the canopy binary")?;
    let server = ServerProcess::start(
        &exe,
        dir.path(),
        "embedded",
        &["--disable-controllers", "--disable-scheduler"],
    )?;
    let target = Target::from_kubeconfig(&server.kubeconfig)?;
    let args = Arc::new(args);

    let started = Instant::now();
    in_parallel(&target, args.clients, args.tenants, "creating a namespace", Arc::new(|t| {
        let body = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("t{t}"), "labels": {"canopy.io/tenant": format!("t{t}")}}});
        request("POST", "/api/v1/namespaces", Some(Bytes::from(serde_json::to_vec(&body)?)))
    }))
    .await?;
    let a = args.clone();
    in_parallel(
        &target,
        args.clients,
        args.services,
        "creating a service",
        Arc::new(move |i| {
            let body = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("s{i}")},
            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}});
            request(
                "POST",
                &format!("/api/v1/namespaces/t{}/services", tenant_of(i, &a)),
                Some(Bytes::from(serde_json::to_vec(&body)?)),
            )
        }),
    )
    .await?;
    let a = args.clone();
    in_parallel(&target, args.clients, args.services, "creating an endpoint slice", Arc::new(move |i| {
        let endpoints: Vec<_> = (0..a.endpoints)
            .map(|e| json!({"addresses": [endpoint_ip(i, e)], "conditions": {"ready": true}}))
            .collect();
        let body = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("s{i}-1"), "labels": {"kubernetes.io/service-name": format!("s{i}")}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints});
        request("POST", &format!("/apis/discovery.k8s.io/v1/namespaces/t{}/endpointslices", tenant_of(i, &a)),
            Some(Bytes::from(serde_json::to_vec(&body)?)))
    }))
    .await?;
    println!(
        "created {} namespaces, {} services and {} endpoint slices in {:.1} s",
        args.tenants,
        args.services,
        args.services,
        started.elapsed().as_secs_f64()
    );

    // The biggest tenant's node: its proxy, with the tenant's proxy identity, programming a
    // scratch namespace.
    let node = Netns::new(format!("canopy-bench-proxy-{}", std::process::id()))?;
    let mut kubeconfig = kube::config::Kubeconfig::read_from(&server.kubeconfig)?;
    for auth in &mut kubeconfig.auth_infos {
        if let Some(info) = auth.auth_info.as_mut() {
            info.impersonate = Some("system:canopy-proxy:t0".into());
            info.impersonate_groups = Some(vec!["canopy:proxies".into()]);
        }
    }
    let proxy_client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?,
    )?;
    let awaited: Arc<parking_lot::Mutex<Awaited>> = Arc::default();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<(Instant, usize)>();
    let first = Arc::new(parking_lot::Mutex::new(Some(first_tx)));
    let hook = {
        let (awaited, first) = (awaited.clone(), first.clone());
        Arc::new(move |rules: &Rules| {
            if let Some(tx) = first.lock().take() {
                let _ = tx.send((Instant::now(), rules.len()));
            }
            let mut awaited = awaited.lock();
            let live = awaited.as_ref().is_some_and(|(frontend, ip, _)| {
                matches!(rules.get(frontend), Some(Rule::Balance(b)) if b.iter().any(|b| b.ip == *ip))
            });
            if live && let Some((_, _, tx)) = awaited.take() {
                let _ = tx.send(Instant::now());
            }
        })
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let config = canopy_proxy::ProxyConfig {
        tenant: "t0".into(),
        node: "bench-node".into(),
        nft: node.nft(),
        min_sync: Duration::ZERO,
        resync: Duration::from_secs(3600),
        dns: None,
        configure_node: false,
        on_applied: Some(hook),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = canopy_proxy::ProxyMetrics::register(&mut registry);
    let proxy_started = Instant::now();
    let proxy = tokio::spawn(canopy_proxy::run(
        proxy_client,
        config,
        metrics,
        shutdown.clone(),
    ));
    let (programmed_at, frontends) = tokio::time::timeout(Duration::from_secs(120), first_rx)
        .await
        .context("the proxy did not program its tenant within 2 minutes")??;
    println!(
        "proxy start → the tenant's {frontends} service ports live: {:.0} ms (list, watch, one transaction)",
        (programmed_at - proxy_started).as_secs_f64() * 1e3
    );

    // EndpointSlice writes → rule live, one at a time.
    let admin = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&server.kubeconfig)?,
            &Default::default(),
        )
        .await?,
    )?;
    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), "t0");
    let services: Api<Service> = Api::namespaced(admin.clone(), "t0");
    let mut latencies = Vec::new();
    for change in 0..args.changes {
        let i = change % args.biggest.max(1);
        let svc = services.get(&format!("s{i}")).await?;
        let vip: Ipv4Addr = svc
            .spec
            .and_then(|s| s.cluster_ip)
            .context("service without a ClusterIP")?
            .parse()?;
        let fresh = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + change as u32);
        let (tx, rx) = tokio::sync::oneshot::channel();
        *awaited.lock() = Some((Frontend::Cluster(vip, Protocol::Tcp, 80), fresh, tx));
        let mut endpoints: Vec<_> = (1..args.endpoints)
            .map(|e| json!({"addresses": [endpoint_ip(i, e)], "conditions": {"ready": true}}))
            .collect();
        endpoints.push(json!({"addresses": [fresh.to_string()], "conditions": {"ready": true}}));
        let patch = json!({"endpoints": endpoints});
        let sent = Instant::now();
        slices
            .patch(
                &format!("s{i}-1"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        let live = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .context("a change did not become live within 10 s")??;
        latencies.push((live - sent).as_secs_f64() * 1e3);
    }
    let (p50, p99) = percentiles(&mut latencies);
    println!(
        "EndpointSlice write → rule live in the kernel ({} changes): p50 {p50:.1} ms, p99 {p99:.1} ms (target p99 ≤ 100 ms)",
        args.changes
    );
    shutdown.cancel();
    let _ = proxy.await;

    // The tenant's table against the whole cloud's, as upstream programs it on every node.
    let all_services: Vec<Service> = Api::<Service>::all(admin.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let all_slices: Vec<EndpointSlice> = Api::<EndpointSlice>::all(admin.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let in_t0 = |ns: &Option<String>| ns.as_deref() == Some("t0");
    let tenant_rules = canopy_proxy::rules::compute(
        all_services.iter().filter(|s| in_t0(&s.metadata.namespace)),
        all_slices.iter().filter(|s| in_t0(&s.metadata.namespace)),
        "bench-node",
    );
    let cloud_rules = canopy_proxy::rules::compute(&all_services, &all_slices, "bench-node");
    let mut vips: Vec<&str> = all_services
        .iter()
        .filter_map(|s| s.spec.as_ref()?.cluster_ip.as_deref())
        .collect();
    let with_vip = vips.len();
    vips.sort_unstable();
    vips.dedup();
    println!(
        "{} of {with_vip} ClusterIPs are held by Services of two tenants at once (tenants' ranges overlap): \
         a node programming every Service, as upstream's do, could serve only one of each",
        with_vip - vips.len()
    );
    let upstream_node = Netns::new(format!("canopy-bench-proxy-all-{}", std::process::id()))?;
    let mut rows = Vec::new();
    for (what, rules, netns) in [
        ("this tenant's node", &tenant_rules, &node),
        (
            "every node, upstream-style (all services)",
            &cloud_rules,
            &upstream_node,
        ),
    ] {
        let mut full = time_apply(&netns.nft(), &nft::full(rules), args.resyncs).await?;
        let (full_p50, _) = percentiles(&mut full);
        // One endpoint change as a diff on this table.
        let (frontend, target) = rules.iter().next().context("no rules")?;
        let mut changed = rules.clone();
        if let Rule::Balance(backends) = target {
            let mut backends = backends.clone();
            backends[0] = Backend {
                ip: Ipv4Addr::new(10, 200, 0, 1),
                port: backends[0].port,
            };
            changed.insert(*frontend, Rule::Balance(backends));
        }
        let forth = nft::diff(rules, &changed).context("no change")?;
        let back = nft::diff(&changed, rules).context("no change")?;
        let mut diffs = Vec::new();
        for _ in 0..args.resyncs.max(1) {
            diffs.extend(time_apply(&netns.nft(), &forth, 1).await?);
            diffs.extend(time_apply(&netns.nft(), &back, 1).await?);
        }
        let (diff_p50, _) = percentiles(&mut diffs);
        rows.push((
            what,
            rules.len(),
            nft::element_count(rules),
            full_p50,
            diff_p50,
        ));
    }
    println!();
    println!(
        "| node | service ports | map elements | full resync (median) | one endpoint change (median) |"
    );
    println!("|---|---|---|---|---|");
    for (what, frontends, elements, full, diff) in &rows {
        println!("| {what} | {frontends} | {elements} | {full:.1} ms | {diff:.1} ms |");
    }
    if let [(_, _, mine, my_full, _), (_, _, all, all_full, _)] = rows.as_slice() {
        println!(
            "\nper-node rules: {:.1}× fewer; full resync: {:.1}× faster than programming every service on every node",
            *all as f64 / (*mine).max(1) as f64,
            all_full / my_full
        );
    }
    drop(server);
    Ok(())
}
