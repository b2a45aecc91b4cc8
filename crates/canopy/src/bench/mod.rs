//! `canopy bench ...`: benchmarks that run Canopy for real and print figures.

mod api;
mod client;

/// Benchmarks.
#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// The API server: pod creates/s and latency, LIST of every pod, watch delivery latency
    /// with many watchers, memory per stored pod.
    Api(api::ApiArgs),
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Api(args) => api::run(args).await,
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
