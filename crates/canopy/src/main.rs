//! `canopy`: the one binary of Canopy. `canopy server` runs the whole control plane in one
//! process; the other subcommands run single components and tools.

mod agent;
mod bench;
mod cloud;
mod cni;
mod component_http;
mod leader;
mod login;
mod proxy;
mod server;

// The API server allocates and frees many small JSON nodes per request; mimalloc spends less
// time on that than glibc's malloc and returns memory instead of fragmenting.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "canopy",
    version,
    about = "Canopy: one Kubernetes-compatible control plane for a multi-tenant container cloud",
    long_about = "Canopy runs a public container cloud over an IaaS with one Kubernetes-compatible \
                  control plane. `canopy server` starts everything in one process on an embedded \
                  store; kubectl, kube-rs and other Kubernetes clients work against it unchanged."
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CANOPY_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter in tracing-subscriber's EnvFilter syntax, e.g. `info` or
    /// `canopy_apiserver=debug,info`.
    #[arg(long, global = true, default_value = "info", env = "CANOPY_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane (API server and controllers) in one process.
    Server(Box<server::ServerArgs>),
    /// Run the scheduler alone against an API server (`canopy server` runs one itself unless
    /// given --disable-scheduler).
    Scheduler(SchedulerCmd),
    /// Run the controller manager alone against an API server (`canopy server` runs one
    /// itself unless given --disable-controllers).
    ControllerManager(ControllerManagerCmd),
    /// Run the cloud controller alone (`canopy server` runs one itself unless given
    /// --disable-cloud-controller): tenants' VMs and pods' NICs on the local cloud, with
    /// leader election among replicas.
    CloudController(Box<cloud::CloudControllerCmd>),
    /// Run the node agent (Canopy's kubelet): register this machine as a Node and run the
    /// pods bound to it in OCI containers.
    Agent(agent::AgentArgs),
    /// Run a tenant's service proxy: program the tenant's Services (ClusterIPs, node ports)
    /// into nftables in this network namespace. The agent runs one itself on the cloud's VMs.
    Proxy(proxy::ProxyArgs),
    /// Manage the node agent's local image store.
    #[command(subcommand)]
    Image(agent::ImageCommand),
    /// Act as a CNI 1.0 plugin (container runtimes run `canopy` with CNI_COMMAND set and no
    /// arguments, which does the same): moves the pod's port from the VM into the pod. The
    /// network configuration on stdin names the node's kubeconfig.
    Cni,
    /// The monitor of one container, started by the agent (not for direct use).
    #[command(hide = true)]
    Shim {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure Canopy's performance.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Issue a client certificate signed by the cluster CA and write a kubeconfig for it.
    Kubeconfig(KubeconfigArgs),
    /// Log in with a Keystone user and project (flags or the OpenStack CLI's OS_* variables)
    /// and write a kubeconfig context for kubectl.
    Login(login::LoginArgs),
    /// kubectl's exec credential plugin: print a Keystone token as an ExecCredential, asking
    /// Keystone for a new one when the saved one nears expiry. `canopy login` sets it up.
    Credential(login::CredentialArgs),
}

#[derive(clap::Args)]
struct SchedulerCmd {
    /// Kubeconfig of the scheduler's identity (`canopy server` writes
    /// <data-dir>/scheduler.kubeconfig).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    #[command(flatten)]
    scheduler: server::SchedulerArgs,
    #[command(flatten)]
    leader_election: leader::LeaderElectionArgs,
    /// Address of the plain-HTTP endpoint with /metrics, /healthz, /livez and /readyz
    /// (upstream's former insecure scheduler port; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:10251")]
    metrics_bind_address: std::net::SocketAddr,
}

#[derive(clap::Args)]
struct ControllerManagerCmd {
    /// Kubeconfig of the controller manager's identity (`canopy server` writes
    /// <data-dir>/controller-manager.kubeconfig).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    #[command(flatten)]
    controller_manager: server::ControllerManagerArgs,
    #[command(flatten)]
    leader_election: leader::LeaderElectionArgs,
    /// Address of the plain-HTTP endpoint with /metrics, /healthz, /livez and /readyz
    /// (upstream's former insecure controller-manager port; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:10252")]
    metrics_bind_address: std::net::SocketAddr,
}

#[derive(clap::Args)]
struct KubeconfigArgs {
    /// The server's data directory (holds the CA).
    #[arg(long, default_value = "./canopy-data")]
    data_dir: PathBuf,
    /// User name (the certificate's common name).
    #[arg(long)]
    user: String,
    /// Groups (the certificate's organizations); `system:masters` makes an administrator.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// API server URL to put in the kubeconfig.
    #[arg(long, default_value = "https://127.0.0.1:6443")]
    server: String,
    /// Where to write the kubeconfig.
    #[arg(long, short)]
    output: PathBuf,
}

fn init_logging(format: LogFormat, filter: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid --log filter {filter:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

fn main() -> Result<()> {
    // Container runtimes run CNI plugins with no arguments and CNI_COMMAND set.
    let as_plugin = std::env::args_os().len() == 1 && std::env::var_os("CNI_COMMAND").is_some();
    let cli = if as_plugin {
        Cli::parse_from(["canopy", "cni"])
    } else {
        Cli::parse()
    };
    if let Command::Cni = cli.command {
        // CNI's output is stdout; logs would corrupt it.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        std::process::exit(runtime.block_on(cni::main()));
    }
    // The shim is a small synchronous monitor: no logging set-up, no async runtime.
    if let Command::Shim { args } = &cli.command {
        let args = canopy_runtime::ShimArgs::parse(args)?;
        return canopy_runtime::run_shim(&args);
    }
    init_logging(cli.log_format, &cli.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Server(args) => server::run(*args).await,
            Command::Cni => Ok(()),
            Command::Scheduler(cmd) => {
                let config = cmd.scheduler.config();
                run_component(
                    &cmd.kubeconfig,
                    cmd.metrics_bind_address,
                    "kube-scheduler",
                    cmd.leader_election,
                    canopy_scheduler::metrics::SchedulerMetrics::register,
                    move |client, metrics| {
                        canopy_scheduler::run::run(client, config.clone(), metrics)
                    },
                )
                .await
            }
            Command::ControllerManager(cmd) => {
                cmd.controller_manager.validate()?;
                let config = cmd.controller_manager.config();
                run_component(
                    &cmd.kubeconfig,
                    cmd.metrics_bind_address,
                    "kube-controller-manager",
                    cmd.leader_election,
                    canopy_controllers::queue::QueueMetrics::register,
                    move |client, metrics| {
                        canopy_controllers::manager::run(canopy_controllers::manager::Context::new(
                            client,
                            config.clone(),
                            metrics,
                        ))
                    },
                )
                .await
            }
            Command::CloudController(cmd) => cloud::run_standalone(*cmd).await,
            Command::Agent(args) => agent::run(args).await,
            Command::Proxy(args) => proxy::run(args).await,
            Command::Image(cmd) => agent::image(cmd),
            Command::Shim { .. } => Ok(()),
            Command::Bench(cmd) => bench::run(cmd).await,
            Command::Kubeconfig(args) => issue_kubeconfig(args),
            Command::Login(args) => login::login(args).await,
            Command::Credential(args) => login::credential(args).await,
        }
    })
}

/// Runs a component alone: its metrics and health on a plain-HTTP endpoint, the component
/// itself while it holds the Lease `lease`, until SIGTERM.
async fn run_component<M, Fut>(
    kubeconfig: &std::path::Path,
    metrics_address: std::net::SocketAddr,
    lease: &str,
    election: leader::LeaderElectionArgs,
    register: impl FnOnce(&mut prometheus_client::registry::Registry) -> M,
    component: impl Fn(kube::Client, M) -> Fut,
) -> Result<()>
where
    M: Clone,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let client = server::client_from(kubeconfig).await?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = register(&mut registry);
    let served = component_http::serve(
        metrics_address,
        std::sync::Arc::new(registry),
        client.clone(),
    )
    .await?;
    tracing::info!(address = %served, "serving /metrics, /healthz and /readyz");
    leader::run_elected(
        client.clone(),
        lease,
        election,
        server::shutdown_signal(),
        move || component(client.clone(), metrics.clone()),
    )
    .await;
    Ok(())
}

fn issue_kubeconfig(args: KubeconfigArgs) -> Result<()> {
    let pki = canopy_apiserver::pki::Pki::new(&args.data_dir);
    if !pki.ca_cert_path().exists() {
        anyhow::bail!(
            "no CA in {}: start `canopy server --data-dir {}` once first",
            args.data_dir.display(),
            args.data_dir.display()
        );
    }
    let ca = pki.ensure_ca()?;
    let groups: Vec<&str> = args.groups.iter().map(String::as_str).collect();
    let pair = pki.issue_client(&args.user, &groups)?;
    canopy_apiserver::kubeconfig::write(
        &args.output,
        &args.server,
        &ca.cert_pem,
        &pair,
        &args.user,
    )?;
    eprintln!("wrote {} for user {:?}", args.output.display(), args.user);
    Ok(())
}
