//! `canopy proxy`: the service proxy of one tenant's node (seed §9).
//!
//! Upstream's kube-proxy holds every service of the cluster on every node. Canopy's proxy runs
//! with its tenant's identity (`system:canopy-proxy:<tenant>`), which can read that tenant's
//! Services and EndpointSlices and nothing else, so a node's rules grow with its tenant, never
//! with the cloud. It watches both, computes what the node's rules must be ([`rules`]), and
//! writes the difference to nftables as one atomic transaction ([`nft`]); on start (and
//! after any failed transaction) it replaces the whole table in one transaction.

pub mod dns;
pub mod nft;
pub mod rules;

use std::{
    collections::BTreeMap,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{io::AsyncWriteExt, sync::Notify};
use tokio_util::sync::CancellationToken;

pub use rules::{Backend, Frontend, Protocol, Rules, Target};

/// Told each set of rules once it is live.
pub type AppliedHook = Arc<dyn Fn(&Rules) + Send + Sync>;

/// What the proxy is told.
#[derive(Clone)]
pub struct ProxyConfig {
    /// The tenant whose Services are programmed.
    pub tenant: String,
    /// This node's name (for `Local` traffic policies).
    pub node: String,
    /// The command that runs `nft` in the node's network namespace: `["nft"]` where the
    /// proxy runs in it (as under the agent); tests and benchmarks prefix `ip netns exec`.
    pub nft: Vec<String>,
    /// Changes arriving within this window are written together.
    pub min_sync: Duration,
    /// The whole table is rewritten at least this often, repairing any drift.
    pub resync: Duration,
    /// Cluster DNS to serve to the node's pods, if any.
    pub dns: Option<DnsServing>,
    /// Whether the proxy sets up the network namespace it runs in (forwarding on, redirects
    /// off). Off only where the rules go to another namespace (`canopy bench proxy`).
    pub configure_node: bool,
    /// Called with the rules each time a transaction has made them live.
    pub on_applied: Option<AppliedHook>,
}

/// Where and how the node serves cluster DNS.
#[derive(Clone, Debug)]
pub struct DnsServing {
    /// The address pods ask (the tenant's cluster DNS address, in its Service range). The
    /// proxy puts it on the node's loopback: pods route the Service range to their node, so
    /// each pod's queries reach its own node.
    pub address: std::net::Ipv4Addr,
    /// The cluster domain (`cluster.local`).
    pub domain: String,
    /// Where names outside the cluster domain go; None answers REFUSED.
    pub upstream: Option<std::net::SocketAddr>,
}

/// The proxy's metrics (upstream kube-proxy's names where there is one).
#[derive(Clone)]
pub struct ProxyMetrics {
    /// Time to write a change to nftables.
    pub sync_duration: Histogram,
    /// Time from a watch event to its rules being live.
    pub event_to_live: Histogram,
    /// Transactions written, and failed.
    pub syncs: Counter,
    pub sync_failures: Counter,
    /// Frontends (service ports and node ports) programmed.
    pub frontends: Gauge,
}

impl ProxyMetrics {
    /// Metrics registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let buckets = || {
            Histogram::new([
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
            ])
        };
        let metrics = Self {
            sync_duration: buckets(),
            event_to_live: buckets(),
            syncs: Counter::default(),
            sync_failures: Counter::default(),
            frontends: Gauge::default(),
        };
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time to write a rules change to nftables",
            metrics.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "Time from a Service or EndpointSlice event to its rules being live",
            metrics.event_to_live.clone(),
        );
        registry.register(
            "canopy_proxy_syncs",
            "nftables transactions written",
            metrics.syncs.clone(),
        );
        registry.register(
            "canopy_proxy_sync_failures",
            "nftables transactions that failed (a full resync follows)",
            metrics.sync_failures.clone(),
        );
        registry.register(
            "canopy_proxy_frontends",
            "Service ports and node ports programmed on this node",
            metrics.frontends.clone(),
        );
        metrics
    }
}

/// Runs one `nft -f -` transaction with `nft` (a command and its first arguments).
pub async fn apply(nft: &[String], script: &str) -> Result<()> {
    let (program, args) = nft.split_first().context("an empty nft command")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    let mut stdin = child.stdin.take().context("nft stdin")?;
    stdin.write_all(script.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "nft refused the transaction: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes the proxy's table (on `--cleanup`, or when a node stops serving services).
pub async fn remove_table(nft: &[String]) -> Result<()> {
    apply(
        nft,
        &format!("add table ip {0}\ndelete table ip {0}\n", nft::TABLE),
    )
    .await
}

/// Lets the node forward what it translated: pods' packets for a ClusterIP arrive at the
/// node and leave it for the backend, through the interface they came in by. Redirects are
/// turned off: a node that forwards a packet back out of its arrival interface would
/// otherwise tell the pod "use the gateway directly", and the pod would then send that
/// ClusterIP past the node for good. Per network namespace, so only this node's.
pub fn enable_forwarding() -> Result<()> {
    let write = |path: &str, value: &str| {
        std::fs::write(path, value).with_context(|| format!("writing {value} to {path}"))
    };
    write("/proc/sys/net/ipv4/ip_forward", "1")?;
    // An interface sends redirects if `all` or its own setting says so: clear both.
    for entry in std::fs::read_dir("/proc/sys/net/ipv4/conf")? {
        let path = entry?.path().join("send_redirects");
        write(&path.to_string_lossy(), "0")?;
    }
    Ok(())
}

/// One watched kind: the objects and whether the first list is in.
struct Watched<K> {
    objects: BTreeMap<(String, String), K>,
    synced: bool,
}

impl<K> Default for Watched<K> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            synced: false,
        }
    }
}

#[derive(Default)]
struct State {
    services: Watched<Service>,
    slices: Watched<EndpointSlice>,
    /// The oldest event not yet programmed.
    pending_since: Option<Instant>,
}

fn key_of<K: ResourceExt>(obj: &K) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Applies a watch event; whether the objects changed. A relist replaces them whole once
/// it is complete, so nothing is programmed from a partial list.
fn on_event<K: ResourceExt + Clone>(
    event: Event<K>,
    watched: &mut Watched<K>,
    relist: &mut BTreeMap<(String, String), K>,
) -> bool {
    match event {
        Event::Apply(obj) => {
            watched.objects.insert(key_of(&obj), obj);
            true
        }
        Event::Delete(obj) => {
            watched.objects.remove(&key_of(&obj));
            true
        }
        Event::Init => {
            relist.clear();
            false
        }
        Event::InitApply(obj) => {
            relist.insert(key_of(&obj), obj);
            false
        }
        Event::InitDone => {
            watched.objects = std::mem::take(relist);
            watched.synced = true;
            true
        }
    }
}

/// Follows one kind of the tenant's objects into `state`, waking `changed` on each change.
async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    state: Arc<parking_lot::Mutex<State>>,
    pick: fn(&mut State) -> &mut Watched<K>,
    changed: Arc<Notify>,
) where
    K: kube::Resource<DynamicType = ()>
        + ResourceExt
        + Clone
        + std::fmt::Debug
        + Send
        + serde::de::DeserializeOwned
        + 'static,
{
    let mut relist = BTreeMap::new();
    // Backing off: while the API server is away, a tight retry loop would spin the VM's CPU
    // (its agent's too) and flood the log.
    let mut stream = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                let mut s = state.lock();
                if on_event(event, pick(&mut s), &mut relist) {
                    s.pending_since.get_or_insert_with(Instant::now);
                    changed.notify_one();
                }
            }
            Err(err) => tracing::warn!(%err, kind = %K::kind(&()), "watching the tenant's objects"),
        }
    }
}

/// Runs the proxy until `shutdown`. The rules stay in place when it returns: traffic keeps
/// flowing through a restart, and the next start resyncs them.
pub async fn run(
    client: Client,
    config: ProxyConfig,
    metrics: ProxyMetrics,
    shutdown: CancellationToken,
) -> Result<()> {
    if config.configure_node {
        enable_forwarding()?;
    }
    let selector = format!("{}={}", canopy_api::tenant::TENANT_LABEL, config.tenant);
    let watch_config = watcher::Config::default().labels(&selector);
    let state = Arc::new(parking_lot::Mutex::new(State::default()));
    let changed = Arc::new(Notify::new());
    let services = follow(
        Api::<Service>::all(client.clone()),
        watch_config.clone(),
        state.clone(),
        |s| &mut s.services,
        changed.clone(),
    );
    let slices = follow(
        Api::<EndpointSlice>::all(client.clone()),
        watch_config,
        state.clone(),
        |s| &mut s.slices,
        changed.clone(),
    );
    let watchers = tokio::spawn(async move {
        tokio::join!(services, slices);
    });
    let zone = Arc::new(parking_lot::RwLock::new(Arc::new(dns::Zone::default())));
    if let Some(dns) = &config.dns {
        add_local_address(dns.address).await?;
    }
    let result = program(&config, &metrics, &state, &zone, &changed, &shutdown).await;
    watchers.abort();
    result
}

/// Puts `address` on the loopback of this network namespace, so that packets for it are
/// delivered here rather than routed on.
async fn add_local_address(address: std::net::Ipv4Addr) -> Result<()> {
    let out = tokio::process::Command::new("ip")
        .args(["addr", "replace", &format!("{address}/32"), "dev", "lo"])
        .output()
        .await
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "putting the cluster DNS address {address} on lo: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

async fn program(
    config: &ProxyConfig,
    metrics: &ProxyMetrics,
    state: &parking_lot::Mutex<State>,
    zone: &Arc<parking_lot::RwLock<Arc<dns::Zone>>>,
    changed: &Notify,
    shutdown: &CancellationToken,
) -> Result<()> {
    let mut dns_pending = config.dns.clone();
    let mut live: Option<Rules> = None;
    let mut last_full = Instant::now();
    loop {
        let resync_in = config.resync.saturating_sub(last_full.elapsed());
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = changed.notified() => {}
            _ = tokio::time::sleep(resync_in) => { live = None; }
        }
        if !config.min_sync.is_zero() {
            tokio::time::sleep(config.min_sync).await;
        }
        let (wanted, names, since) = {
            let mut s = state.lock();
            if !(s.services.synced && s.slices.synced) {
                continue;
            }
            let (services, slices) = (s.services.objects.values(), s.slices.objects.values());
            let wanted = rules::compute(services.clone(), slices.clone(), &config.node);
            let names = config
                .dns
                .is_some()
                .then(|| dns::Zone::compute(services, slices));
            (wanted, names, s.pending_since.take())
        };
        if let Some(names) = names
            && **zone.read() != names
        {
            *zone.write() = Arc::new(names);
        }
        // DNS answers once the zone is whole, never from a half-listed tenant.
        if let Some(serving) = dns_pending.take() {
            let handler = dns::ClusterDns::new(&serving.domain, zone.clone(), serving.upstream);
            let address = std::net::SocketAddr::from((serving.address, 53));
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if let Err(err) = dns::serve(address, handler, shutdown).await {
                    tracing::error!(error = format!("{err:#}"), "cluster DNS stopped");
                }
            });
        }
        let script = match &live {
            Some(old) => match nft::diff(old, &wanted) {
                Some(script) => script,
                None => continue,
            },
            None => nft::full(&wanted),
        };
        let full = live.is_none();
        let started = Instant::now();
        match apply(&config.nft, &script).await {
            Ok(()) => {
                metrics.syncs.inc();
                metrics
                    .sync_duration
                    .observe(started.elapsed().as_secs_f64());
                if let Some(since) = since {
                    metrics.event_to_live.observe(since.elapsed().as_secs_f64());
                }
                metrics.frontends.set(wanted.len() as i64);
                if let Some(hook) = &config.on_applied {
                    hook(&wanted);
                }
                if full {
                    last_full = Instant::now();
                    tracing::info!(
                        tenant = %config.tenant,
                        frontends = wanted.len(),
                        backends = nft::element_count(&wanted),
                        took_ms = started.elapsed().as_millis() as u64,
                        "programmed every service of the tenant"
                    );
                }
                live = Some(wanted);
            }
            Err(err) => {
                metrics.sync_failures.inc();
                tracing::warn!(%err, full, "writing the service rules failed; resyncing the whole table");
                live = None;
                changed.notify_one();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
