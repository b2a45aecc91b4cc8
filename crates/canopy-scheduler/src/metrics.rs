//! The scheduler's Prometheus metrics, named like upstream kube-scheduler's where one exists.
//! They live in a registry of their own: `canopy server` shows it on the API server's
//! `/metrics`, `canopy scheduler` serves it itself.

use std::{collections::HashMap, sync::Arc, time::Duration};

use parking_lot::Mutex;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::partition::Partition;

/// Labels of a scheduling attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `scheduled`, `unschedulable` or `error`.
    pub result: String,
    /// The scheduler name (upstream: the profile).
    pub profile: String,
}

/// Labels of the bind step.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BindLabels {
    /// Always `Bind`.
    pub extension_point: String,
    /// `Success`, `Error` or `Conflict` (pod gone or bound elsewhere).
    pub status: String,
    /// The scheduler name.
    pub profile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

type Partitions = Arc<Mutex<HashMap<String, Arc<Mutex<Partition>>>>>;

/// Counts the pending pods of the running scheduler at scrape time, so that the figures
/// cannot drift from the queues.
#[derive(Default)]
struct PendingPods {
    partitions: Mutex<Option<Partitions>>,
}

impl std::fmt::Debug for PendingPods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingPods")
    }
}

impl Collector for PendingPods {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let partitions: Vec<_> = match self.partitions.lock().as_ref() {
            Some(partitions) => partitions.lock().values().cloned().collect(),
            None => Vec::new(),
        };
        let mut totals = [0usize; 3];
        for partition in partitions {
            let counts = partition.lock().pending_counts();
            for (total, count) in totals.iter_mut().zip(counts) {
                *total += count;
            }
        }
        let family = Family::<QueueLabels, Gauge>::default();
        for (queue, count) in ["active", "backoff", "unschedulable"].iter().zip(totals) {
            family
                .get_or_create(&QueueLabels {
                    queue: queue.to_string(),
                })
                .set(count as i64);
        }
        let metric = encoder.encode_descriptor(
            "scheduler_pending_pods",
            "Pending pods by queue: active (waiting for a worker), backoff (after a failed binding), unschedulable (fit nowhere; retried when the tenant's nodes or pods change).",
            None,
            family.metric_type(),
        )?;
        family.encode(metric)
    }
}

/// Every metric of the scheduler; cheap to clone (the metrics are shared).
#[derive(Clone, Debug)]
pub struct SchedulerMetrics {
    attempts: Family<AttemptLabels, Counter>,
    attempt_duration: Family<AttemptLabels, Histogram>,
    queue_wait: Histogram,
    sli_duration: Histogram,
    bind_duration: Family<BindLabels, Histogram>,
    pending: Arc<PendingPods>,
}

fn buckets() -> impl Iterator<Item = f64> {
    [
        0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0,
        100.0,
    ]
    .into_iter()
}

impl SchedulerMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            attempts: Family::default(),
            attempt_duration: Family::new_with_constructor(|| Histogram::new(buckets())),
            queue_wait: Histogram::new(buckets()),
            sli_duration: Histogram::new(buckets()),
            bind_duration: Family::new_with_constructor(|| Histogram::new(buckets())),
            pending: Arc::default(),
        };
        registry.register(
            "scheduler_schedule_attempts",
            "Attempts to schedule pods, by result",
            metrics.attempts.clone(),
        );
        registry.register(
            "scheduler_scheduling_attempt_duration_seconds",
            "Time filtering and scoring took for one pod, by result",
            metrics.attempt_duration.clone(),
        );
        registry.register(
            "canopy_scheduler_queue_wait_duration_seconds",
            "Time a pod waited in its tenant's active queue before a worker took it",
            metrics.queue_wait.clone(),
        );
        registry.register(
            "scheduler_pod_scheduling_sli_duration_seconds",
            "Time from a pod first entering the queue to its successful binding, retries included",
            metrics.sli_duration.clone(),
        );
        registry.register(
            "scheduler_framework_extension_point_duration_seconds",
            "Latency of the bind step (a pods/binding request)",
            metrics.bind_duration.clone(),
        );
        registry.register_collector(Box::new(metrics.pending.clone()));
        metrics
    }

    pub(crate) fn watch_queues(&self, partitions: Partitions) {
        *self.pending.partitions.lock() = Some(partitions);
    }

    pub(crate) fn attempt(
        &self,
        result: &str,
        profile: &str,
        decided_in: Duration,
        waited: Duration,
    ) {
        let labels = AttemptLabels {
            result: result.to_string(),
            profile: profile.to_string(),
        };
        self.attempts.get_or_create(&labels).inc();
        self.attempt_duration
            .get_or_create(&labels)
            .observe(decided_in.as_secs_f64());
        self.queue_wait.observe(waited.as_secs_f64());
    }

    pub(crate) fn bound(&self, status: &str, profile: &str, took: Duration) {
        self.bind_duration
            .get_or_create(&BindLabels {
                extension_point: "Bind".into(),
                status: status.to_string(),
                profile: profile.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub(crate) fn scheduled(&self, since_first_queued: Duration) {
        self.sli_duration.observe(since_first_queued.as_secs_f64());
    }

    pub(crate) fn error(&self, profile: &str) {
        self.attempts
            .get_or_create(&AttemptLabels {
                result: "error".into(),
                profile: profile.to_string(),
            })
            .inc();
    }
}

/// Renders a registry in Prometheus' text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}
