//! The cloud controller's Prometheus metrics: the latency and outcome of every IaaS call
//! (upstream's cloud-controller-manager reports `cloudprovider_*_api_request_duration_seconds`),
//! and of every reconcile pass.

use std::{sync::Arc, time::Instant};

use async_trait::async_trait;
use canopy_cloud::{
    CloudError, CloudProvider, Network, NetworkSpec, Port, PortSpec, PublicIp, PublicIpSpec,
    Server, ServerSpec, SpareSpec,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    provider: String,
    request: String,
    /// `ok`, or the error's kind (`not_found`, `conflict`, `invalid`, `exhausted`,
    /// `failed`).
    result: String,
}

/// The cloud controller's metrics; one set per process, shared by its terms as leader.
#[derive(Clone, Debug)]
pub struct Metrics {
    requests: Family<CallLabels, Histogram>,
    pass_duration: Histogram,
    pass_failures: Counter,
}

fn buckets() -> impl Iterator<Item = f64> {
    // 100 µs to ~100 s: a cached list to a VM that boots slowly.
    prometheus_client::metrics::histogram::exponential_buckets(1e-4, 4.0, 11)
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Metrics {
        let metrics = Metrics {
            requests: Family::new_with_constructor(|| Histogram::new(buckets())),
            pass_duration: Histogram::new(buckets()),
            pass_failures: Counter::default(),
        };
        registry.register(
            "cloudprovider_api_request_duration_seconds",
            "Latency of the cloud controller's IaaS calls, by request and result",
            metrics.requests.clone(),
        );
        registry.register(
            "cloud_controller_reconcile_duration_seconds",
            "How long one pass over pods, nodes and the IaaS took",
            metrics.pass_duration.clone(),
        );
        registry.register(
            "cloud_controller_reconcile_failures",
            "Passes that failed (and are retried)",
            metrics.pass_failures.clone(),
        );
        metrics
    }

    /// Metrics nobody scrapes.
    pub fn unregistered() -> Metrics {
        Metrics::register(&mut Registry::default())
    }

    pub(crate) fn pass(&self, started: Instant, ok: bool) {
        self.pass_duration.observe(started.elapsed().as_secs_f64());
        if !ok {
            self.pass_failures.inc();
        }
    }

    /// The provider, with every call measured.
    pub fn instrument(&self, provider: Arc<dyn CloudProvider>) -> Arc<dyn CloudProvider> {
        Arc::new(Instrumented {
            inner: provider,
            metrics: self.clone(),
        })
    }
}

struct Instrumented {
    inner: Arc<dyn CloudProvider>,
    metrics: Metrics,
}

fn kind(error: &CloudError) -> &'static str {
    match error {
        CloudError::NotFound { .. } => "not_found",
        CloudError::Conflict(_) => "conflict",
        CloudError::Invalid(_) => "invalid",
        CloudError::Exhausted(_) => "exhausted",
        CloudError::Failed(_) => "failed",
    }
}

impl Instrumented {
    async fn timed<T>(
        &self,
        request: &str,
        call: impl Future<Output = Result<T, CloudError>>,
    ) -> Result<T, CloudError> {
        let started = Instant::now();
        let result = call.await;
        let labels = CallLabels {
            provider: self.inner.name().to_string(),
            request: request.to_string(),
            result: result.as_ref().map_or_else(kind, |_| "ok").to_string(),
        };
        self.metrics
            .requests
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

#[async_trait]
impl CloudProvider for Instrumented {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<Network, CloudError> {
        self.timed("ensure_network", self.inner.ensure_network(spec))
            .await
    }
    async fn delete_network(&self, name: &str) -> Result<(), CloudError> {
        self.timed("delete_network", self.inner.delete_network(name))
            .await
    }
    async fn list_networks(&self) -> Result<Vec<Network>, CloudError> {
        self.timed("list_networks", self.inner.list_networks())
            .await
    }
    async fn create_server(&self, spec: &ServerSpec) -> Result<Server, CloudError> {
        self.timed("create_server", self.inner.create_server(spec))
            .await
    }
    async fn create_spare(&self, spec: &SpareSpec) -> Result<Server, CloudError> {
        self.timed("create_spare", self.inner.create_spare(spec))
            .await
    }
    async fn claim_spare(&self, spec: &ServerSpec) -> Result<Server, CloudError> {
        self.timed("claim_spare", self.inner.claim_spare(spec))
            .await
    }
    async fn delete_server(&self, name: &str) -> Result<(), CloudError> {
        self.timed("delete_server", self.inner.delete_server(name))
            .await
    }
    async fn server(&self, name: &str) -> Result<Option<Server>, CloudError> {
        self.timed("get_server", self.inner.server(name)).await
    }
    async fn list_servers(&self) -> Result<Vec<Server>, CloudError> {
        self.timed("list_servers", self.inner.list_servers()).await
    }
    async fn create_port(&self, spec: &PortSpec) -> Result<Port, CloudError> {
        self.timed("create_port", self.inner.create_port(spec))
            .await
    }
    async fn attach_port(&self, port: &str, server: &str) -> Result<Port, CloudError> {
        self.timed("attach_port", self.inner.attach_port(port, server))
            .await
    }
    async fn detach_port(&self, port: &str) -> Result<Port, CloudError> {
        self.timed("detach_port", self.inner.detach_port(port))
            .await
    }
    async fn delete_port(&self, name: &str) -> Result<(), CloudError> {
        self.timed("delete_port", self.inner.delete_port(name))
            .await
    }
    async fn list_ports(&self) -> Result<Vec<Port>, CloudError> {
        self.timed("list_ports", self.inner.list_ports()).await
    }
    async fn create_public_ip(&self, spec: &PublicIpSpec) -> Result<PublicIp, CloudError> {
        self.timed("create_public_ip", self.inner.create_public_ip(spec))
            .await
    }
    async fn bind_public_ip(&self, name: &str, port: &str) -> Result<PublicIp, CloudError> {
        self.timed("bind_public_ip", self.inner.bind_public_ip(name, port))
            .await
    }
    async fn delete_public_ip(&self, name: &str) -> Result<(), CloudError> {
        self.timed("delete_public_ip", self.inner.delete_public_ip(name))
            .await
    }
    async fn list_public_ips(&self) -> Result<Vec<PublicIp>, CloudError> {
        self.timed("list_public_ips", self.inner.list_public_ips())
            .await
    }
}
