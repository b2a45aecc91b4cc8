//! `canopy proxy`: a tenant's service proxy (`canopy-proxy`), alone or inside the agent.
//!
//! The cloud controller gives each VM a kubeconfig with two contexts: the node's (current)
//! and [`PROXY_CONTEXT`], the tenant's proxy identity. The agent runs the proxy with the
//! latter in the VM's network namespace, so every node of a tenant programs that tenant's
//! Services and nothing else.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use canopy_apiserver::authz::PROXY_USER_PREFIX;
use tokio_util::sync::CancellationToken;

/// The kubeconfig context holding the proxy's identity in a VM's kubeconfig.
pub const PROXY_CONTEXT: &str = "canopy-proxy";

/// Flags shared by `canopy proxy` and the agent's built-in proxy.
#[derive(clap::Args, Clone, Debug)]
pub struct ProxyTuning {
    /// Changes arriving within this period after the first are written in one transaction
    /// (0: at once; changes that arrive while a transaction runs join the next one).
    #[arg(long, default_value = "0s", value_parser = crate::server::parse_duration)]
    pub proxy_min_sync_period: Duration,
    /// The whole rule table is rewritten at least this often, repairing any drift (it also
    /// forgets ClientIP affinity, as a kube-proxy restart does).
    #[arg(long, default_value = "1h", value_parser = crate::server::parse_duration)]
    pub proxy_sync_period: Duration,
    /// Address of the proxy's plain-HTTP endpoint with /metrics, /healthz and /readyz
    /// (upstream kube-proxy's metrics port).
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub proxy_metrics_bind_address: std::net::SocketAddr,
    /// The cluster domain of Services' and pods' DNS names (the kubelet's clusterDomain).
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Resolver (`address[:port]`) that cluster DNS forwards names outside the cluster
    /// domain to; without one they are REFUSED.
    #[arg(long, value_parser = parse_upstream)]
    pub cluster_dns_upstream: Option<std::net::SocketAddr>,
}

impl ProxyTuning {
    /// Cluster DNS served at `address` with these flags.
    pub fn dns_at(&self, address: std::net::Ipv4Addr) -> canopy_proxy::DnsServing {
        canopy_proxy::DnsServing {
            address,
            domain: self.cluster_domain.clone(),
            upstream: self.cluster_dns_upstream,
        }
    }
}

fn parse_upstream(text: &str) -> Result<std::net::SocketAddr, String> {
    text.parse::<std::net::SocketAddr>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
        .map_err(|_| format!("{text:?} is not an address such as 192.0.2.53 or 192.0.2.53:53"))
}

/// `canopy proxy`.
#[derive(clap::Args)]
pub struct ProxyArgs {
    /// Kubeconfig of the tenant's proxy identity, user `system:canopy-proxy:<tenant>` in group
    /// `canopy:proxies` (a VM's kubeconfig holds it as context `canopy-proxy`).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: std::path::PathBuf,
    /// The context to use (default: `canopy-proxy` when the kubeconfig has it, else the
    /// current one).
    #[arg(long)]
    context: Option<String>,
    /// The Node this proxy runs on, for `Local` traffic policies (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Remove the proxy's rules from this network namespace and exit.
    #[arg(long)]
    cleanup: bool,
    /// The `nft` command.
    #[arg(long, default_value = "nft")]
    nft: String,
    /// Serve cluster DNS at this address (port 53, UDP and TCP), which the proxy adds to
    /// the loopback: the tenant's cluster DNS address, the 10th of its Service range.
    #[arg(long)]
    cluster_dns: Option<std::net::Ipv4Addr>,
    #[command(flatten)]
    tuning: ProxyTuning,
}

/// A proxy client and the tenant its identity names, from `context` of a kubeconfig.
async fn proxy_client(path: &Path, context: &str) -> Result<(kube::Client, String)> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let user = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.user.clone())
        .with_context(|| format!("{} has no context {context:?}", path.display()))?;
    let Some(tenant) = user
        .strip_prefix(PROXY_USER_PREFIX)
        .filter(|t| !t.is_empty())
    else {
        bail!(
            "context {context:?} of {} is user {user:?}, not a tenant's proxy ({PROXY_USER_PREFIX}<tenant>)",
            path.display()
        );
    };
    let options = kube::config::KubeConfigOptions {
        context: Some(context.to_string()),
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig.clone(), &options)
        .await
        .context("loading the proxy's kubeconfig context")?;
    let client = kube::Client::try_from(config).context("building the proxy's API client")?;
    Ok((client, tenant.to_string()))
}

/// Whether a kubeconfig holds the proxy's context.
pub fn has_proxy_context(path: &Path) -> bool {
    kube::config::Kubeconfig::read_from(path)
        .map(|k| k.contexts.iter().any(|c| c.name == PROXY_CONTEXT))
        .unwrap_or(false)
}

/// Runs the proxy of the tenant `context` names until `shutdown`.
pub async fn run_proxy(
    kubeconfig: &Path,
    context: &str,
    node: String,
    nft: Vec<String>,
    tuning: &ProxyTuning,
    dns: Option<canopy_proxy::DnsServing>,
    shutdown: CancellationToken,
) -> Result<()> {
    let (client, tenant) = proxy_client(kubeconfig, context).await?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = canopy_proxy::ProxyMetrics::register(&mut registry);
    let served = crate::component_http::serve(
        tuning.proxy_metrics_bind_address,
        Arc::new(registry),
        client.clone(),
    )
    .await?;
    tracing::info!(%tenant, %node, metrics = %served, "service proxy starting");
    let config = canopy_proxy::ProxyConfig {
        tenant,
        node,
        nft,
        min_sync: tuning.proxy_min_sync_period,
        resync: tuning.proxy_sync_period,
        dns,
        configure_node: true,
        on_applied: None,
    };
    canopy_proxy::run(client, config, metrics, shutdown).await
}

/// `canopy proxy`.
pub async fn run(args: ProxyArgs) -> Result<()> {
    let nft = vec![args.nft.clone()];
    if args.cleanup {
        canopy_proxy::remove_table(&nft).await?;
        println!("removed the service proxy's rules");
        return Ok(());
    }
    let context = match &args.context {
        Some(c) => c.clone(),
        None if has_proxy_context(&args.kubeconfig) => PROXY_CONTEXT.to_string(),
        None => kube::config::Kubeconfig::read_from(&args.kubeconfig)
            .ok()
            .and_then(|k| k.current_context)
            .context("the kubeconfig has no current context; give --context")?,
    };
    let node = args
        .node_name
        .clone()
        .unwrap_or_else(crate::agent::host_name);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        crate::server::shutdown_signal().await;
        token.cancel();
    });
    let dns = args.cluster_dns.map(|address| args.tuning.dns_at(address));
    run_proxy(
        &args.kubeconfig,
        &context,
        node,
        nft,
        &args.tuning,
        dns,
        shutdown,
    )
    .await
}
