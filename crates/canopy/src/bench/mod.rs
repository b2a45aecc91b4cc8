//! `canopy bench ...`: benchmarks that run Canopy for real and print figures.

mod api;
mod auth;
mod client;
mod controllers;
mod pods;
mod provision;
mod proxy;
mod scheduler;

/// Benchmarks.
#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// The API server: pod creates/s and latency, LIST of every pod, watch delivery latency
    /// with many watchers, memory per stored pod.
    Api(api::ApiArgs),
    /// Keystone token authentication: the cost of a cached token per request (in process) and
    /// the Keystone calls a server makes for many requests with a few distinct tokens.
    Auth(auth::AuthArgs),
    /// The controllers' work queues: time from a new ReplicaSet to its pods, idle and during
    /// a full resync of 100,000 pods in 10,000 ReplicaSets, with priority lanes and with one
    /// FIFO.
    Controllers(controllers::ControllersArgs),
    /// The node agent on a warm node (root, runc): pod create → Running latency, pods started
    /// per second, and create/delete cycles checked for leaks.
    Pods(pods::PodsArgs),
    /// The single-machine cloud (root): pod create → Running on a warm VM and when the pod
    /// needs a brand-new VM, and the VM's boot (create → Node Ready).
    Provision(provision::ProvisionArgs),
    /// The service proxy (root): rules per node for the biggest tenant against every
    /// service of the cloud, EndpointSlice write → rule live latency, full resync time.
    Proxy(proxy::ProxyArgs),
    /// The scheduler: pods bound per second and create→bound latency with simulated nodes
    /// spread over tenants.
    Scheduler(scheduler::SchedulerArgs),
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Api(args) => api::run(args).await,
        BenchCommand::Auth(args) => auth::run(args).await,
        BenchCommand::Scheduler(args) => scheduler::run(args).await,
        BenchCommand::Controllers(args) => controllers::run(args).await,
        BenchCommand::Pods(args) => pods::run(args).await,
        BenchCommand::Provision(args) => provision::run(args).await,
        BenchCommand::Proxy(args) => proxy::run(args).await,
    }
}

/// The median and 99th percentile of a set of samples (sorted in place).
pub fn percentiles(samples: &mut [f64]) -> (f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99))
}

/// CPU time (user + system) a process has used so far, from /proc. The clock tick is
/// 100 Hz on every Linux architecture Canopy targets (USER_HZ).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// The machine the figures come from.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}
