//! Prometheus metrics, named like upstream's where an upstream metric exists.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Verb (get, list, watch, create, update, patch, delete, deletecollection, or the
    /// HTTP method for non-resource paths).
    pub verb: String,
    /// Resource (plural), empty for non-resource paths.
    pub resource: String,
    /// Subresource.
    pub subresource: String,
    /// HTTP status code.
    pub code: String,
}

/// Labels of request latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// Verb.
    pub verb: String,
    /// Resource (plural).
    pub resource: String,
}

/// Labels of store operations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// Operation: get, range, create, update, delete, current_revision.
    pub operation: String,
    /// Resource (plural).
    pub resource: String,
}

/// Labels carrying a resource.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    /// Resource (plural).
    pub resource: String,
}

/// Labels of token cache lookups.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheStatusLabels {
    /// `hit` or `miss`.
    pub status: String,
}

/// Labels of calls to Keystone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeystoneLabels {
    /// `validate` (a user's token) or `login` (Canopy's service token).
    pub operation: String,
}

/// Labels of in-flight requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `readOnly` or `mutating`, as upstream's `request_kind`.
    pub request_kind: String,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ]
    .into_iter()
}

/// Every metric of the API server.
pub struct Metrics {
    /// Registry the text exposition is rendered from.
    pub registry: Registry,
    /// `apiserver_request_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `apiserver_request_duration_seconds`.
    pub request_duration: Family<LatencyLabels, Histogram>,
    /// `apiserver_current_inflight_requests`.
    pub inflight: Family<KindLabels, Gauge>,
    /// `apiserver_storage_request_duration_seconds` (upstream: etcd_request_duration_seconds).
    pub store_duration: Family<StoreLabels, Histogram>,
    /// `apiserver_registered_watchers`.
    pub watchers: Family<ResourceLabels, Gauge>,
    /// `apiserver_terminated_watchers_total`: watchers dropped for being too slow.
    pub watchers_dropped: Family<ResourceLabels, Counter>,
    /// `apiserver_watch_events_total`.
    pub watch_events: Family<ResourceLabels, Counter>,
    /// `apiserver_authentication_token_cache_request_total`: Keystone token lookups in the
    /// shared cache, as upstream's token cache.
    pub token_cache: Family<CacheStatusLabels, Counter>,
    /// `canopy_keystone_requests_total`: calls to Keystone.
    pub keystone_requests: Family<KeystoneLabels, Counter>,
    /// `canopy_keystone_request_duration_seconds`.
    pub keystone_duration: Family<KeystoneLabels, Histogram>,
    /// `apiserver_storage_objects`.
    pub objects: Family<ResourceLabels, Gauge>,
    /// `apiserver_watch_cache_consistent_read_fallbacks_total`: consistent reads served
    /// by the store because the cache could not prove freshness.
    pub cache_fallbacks: Family<ResourceLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "apiserver_request",
            "Counter of apiserver requests broken out by verb, resource, subresource and HTTP response code",
            requests.clone(),
        );
        let request_duration = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "apiserver_request_duration_seconds",
            "Response latency distribution in seconds for each verb and resource",
            request_duration.clone(),
        );
        let inflight = Family::<KindLabels, Gauge>::default();
        registry.register(
            "apiserver_current_inflight_requests",
            "Number of requests in flight, by read-only or mutating",
            inflight.clone(),
        );
        let store_duration = Family::<StoreLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "apiserver_storage_request_duration_seconds",
            "Store request latency in seconds for each operation and resource",
            store_duration.clone(),
        );
        let watchers = Family::<ResourceLabels, Gauge>::default();
        registry.register(
            "apiserver_registered_watchers",
            "Number of currently registered watchers per resource",
            watchers.clone(),
        );
        let watchers_dropped = Family::<ResourceLabels, Counter>::default();
        registry.register(
            "apiserver_terminated_watchers",
            "Watchers closed because they could not keep up",
            watchers_dropped.clone(),
        );
        let watch_events = Family::<ResourceLabels, Counter>::default();
        registry.register(
            "apiserver_watch_events",
            "Number of events sent in watch clients",
            watch_events.clone(),
        );
        let objects = Family::<ResourceLabels, Gauge>::default();
        registry.register(
            "apiserver_storage_objects",
            "Number of stored objects at the time of last check split by kind",
            objects.clone(),
        );
        let cache_fallbacks = Family::<ResourceLabels, Counter>::default();
        registry.register(
            "apiserver_watch_cache_consistent_read_fallbacks",
            "Consistent reads served by the store because the watch cache could not prove it was fresh",
            cache_fallbacks.clone(),
        );
        let token_cache = Family::<CacheStatusLabels, Counter>::default();
        registry.register(
            "apiserver_authentication_token_cache_request",
            "Keystone token authentications by whether the shared cache answered",
            token_cache.clone(),
        );
        let keystone_requests = Family::<KeystoneLabels, Counter>::default();
        registry.register(
            "canopy_keystone_requests",
            "Requests to Keystone: validate (a user's token) or login (the service token)",
            keystone_requests.clone(),
        );
        let keystone_duration = Family::<KeystoneLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "canopy_keystone_request_duration_seconds",
            "Latency of requests to Keystone in seconds",
            keystone_duration.clone(),
        );
        Self {
            registry,
            token_cache,
            keystone_requests,
            keystone_duration,
            requests,
            request_duration,
            inflight,
            store_duration,
            watchers,
            watchers_dropped,
            watch_events,
            objects,
            cache_fallbacks,
        }
    }

    /// The Prometheus text exposition of these metrics followed by other registries'
    /// (components in the same process), with one end-of-file marker.
    pub fn render(&self, others: &[std::sync::Arc<Registry>]) -> String {
        let mut out = String::new();
        for registry in std::iter::once(&self.registry).chain(others.iter().map(|r| &**r)) {
            let mut part = String::new();
            if prometheus_client::encoding::text::encode_registry(&mut part, registry).is_ok() {
                out.push_str(&part);
            }
        }
        if prometheus_client::encoding::text::encode_eof(&mut out).is_err() {
            out.clear();
        }
        out
    }
}
