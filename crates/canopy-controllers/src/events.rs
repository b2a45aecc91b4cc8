//! Events the controllers record, written as client-go's `record` package writes them for
//! kube-controller-manager: core/v1 Events (what `kubectl describe` and `kubectl get events`
//! read), sent from a background task so that a controller never waits on one.
//!
//! Upstream's correlation is kept, so that a controller stuck in a loop cannot flood the
//! store:
//! - **Deduplication**: an event equal to an earlier one (same object, type, reason, message
//!   and source) bumps the earlier Event's `count` and `lastTimestamp` instead of creating
//!   another.
//! - **Aggregation**: more than [`AGGREGATE_THRESHOLD`] events of one object, type and reason
//!   with different messages within [`AGGREGATE_WINDOW`] are folded into one Event whose
//!   message starts with "(combined from similar events): ".
//! - **Spam filter**: each source and object has a token bucket of [`SPAM_BURST`] events,
//!   refilled by one every [`SPAM_REFILL`]; events beyond it are dropped.
//!
//! Writes that fail are retried a few times on server errors and dropped on client errors
//! (a namespace being deleted refuses new Events): an Event is a hint to a person, never
//! state a controller relies on.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams, PostParams},
};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::mpsc;

use crate::util::not_found;

/// Events of one kind, reason and object with different messages before they are combined.
pub const AGGREGATE_THRESHOLD: usize = 10;
/// How far back aggregation looks.
pub const AGGREGATE_WINDOW: Duration = Duration::from_secs(600);
/// Events of one source and object let through at once.
pub const SPAM_BURST: f64 = 25.0;
/// How long the spam filter takes to let one more event through.
pub const SPAM_REFILL: Duration = Duration::from_secs(300);
/// Events correlated at once; the least recently seen are forgotten beyond it.
const CACHE_SIZE: usize = 4096;
/// Events waiting to be written; more are dropped (client-go's `maxQueuedEvents`).
const QUEUE_SIZE: usize = 1000;
/// Writes of one event tried on server errors.
const ATTEMPTS: u32 = 3;

/// `Normal` or `Warning`, the two upstream types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    /// Something expected happened.
    Normal,
    /// Something a person may need to look at.
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// What a controller asked to record.
#[derive(Clone, Debug)]
struct Recorded {
    component: Arc<str>,
    object: ObjectReference,
    kind: EventType,
    reason: String,
    message: String,
}

/// Where events go; [`EventSink::run`] writes them. Cheap to clone.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Recorded>,
    rx: Arc<Mutex<Option<mpsc::Receiver<Recorded>>>>,
}

impl Default for EventSink {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_SIZE);
        Self {
            tx,
            rx: Arc::new(Mutex::new(Some(rx))),
        }
    }
}

impl EventSink {
    /// A recorder whose events say they come from `component` (upstream's
    /// `EventSource.Component`, e.g. `replicaset-controller`).
    pub fn recorder(&self, component: impl Into<Arc<str>>) -> Recorder {
        Recorder {
            component: component.into(),
            tx: self.tx.clone(),
        }
    }

    /// Writes recorded events until every recorder is gone. Runs once per sink.
    pub async fn run(&self, client: Client) {
        let Some(mut rx) = self.rx.lock().take() else {
            return;
        };
        let mut correlator = Correlator::default();
        while let Some(recorded) = rx.recv().await {
            let Some(action) = correlator.correlate(recorded, Instant::now()) else {
                continue;
            };
            write(&client, &mut correlator, action).await;
        }
    }
}

/// Records events for one controller. Never blocks: when the writer falls behind by
/// [`QUEUE_SIZE`] events, further ones are dropped.
#[derive(Clone)]
pub struct Recorder {
    component: Arc<str>,
    tx: mpsc::Sender<Recorded>,
}

impl Recorder {
    /// Records a `Normal` event about `object`.
    pub fn normal<K>(&self, object: &K, reason: &str, message: impl Into<String>)
    where
        K: Resource<DynamicType = ()>,
    {
        self.record(object, EventType::Normal, reason, message.into());
    }

    /// Records a `Warning` event about `object`.
    pub fn warning<K>(&self, object: &K, reason: &str, message: impl Into<String>)
    where
        K: Resource<DynamicType = ()>,
    {
        self.record(object, EventType::Warning, reason, message.into());
    }

    fn record<K>(&self, object: &K, kind: EventType, reason: &str, message: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let meta = object.meta();
        let object = ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            field_path: None,
        };
        let recorded = Recorded {
            component: self.component.clone(),
            object,
            kind,
            reason: reason.to_string(),
            message,
        };
        if self.tx.try_send(recorded).is_err() {
            tracing::debug!(
                component = %self.component,
                reason,
                "event dropped: too many waiting to be written"
            );
        }
    }
}

/// What the writer does with a recorded event.
#[derive(Debug, PartialEq)]
enum Action {
    /// Create this Event; remember its name under `key`.
    Create { key: EventKey, event: Box<Event> },
    /// Bump an Event written before (in the namespace of `event`, which is the object's).
    Bump {
        key: EventKey,
        name: String,
        count: i32,
        last: Time,
        /// The whole Event, to create again if the earlier one is gone.
        event: Box<Event>,
    },
}

/// The object an event is about: apiVersion, kind, namespace, name, uid.
type ObjectId = (String, String, String, String, String);

/// Identifies a group of events that aggregation folds together: all but the message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GroupKey {
    component: Arc<str>,
    object: ObjectId,
    kind: EventType,
    reason: String,
}

/// Identifies one Event for deduplication: everything but the timestamps and count.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct EventKey {
    group: GroupKey,
    message: String,
}

struct Written {
    name: String,
    count: i32,
    first: Time,
    used: Instant,
}

struct Group {
    messages: HashSet<String>,
    since: Instant,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// client-go's `EventCorrelator`: the spam filter, the aggregator and the deduplicating
/// logger, as pure state so that it can be tested without a server.
#[derive(Default)]
struct Correlator {
    written: HashMap<EventKey, Written>,
    groups: HashMap<GroupKey, Group>,
    buckets: HashMap<(Arc<str>, ObjectId), Bucket>,
}

fn object_id(o: &ObjectReference) -> ObjectId {
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    (
        s(&o.api_version),
        s(&o.kind),
        s(&o.namespace),
        s(&o.name),
        s(&o.uid),
    )
}

impl Correlator {
    fn correlate(&mut self, recorded: Recorded, now: Instant) -> Option<Action> {
        let group = GroupKey {
            component: recorded.component.clone(),
            object: object_id(&recorded.object),
            kind: recorded.kind,
            reason: recorded.reason.clone(),
        };
        if !self.allow(&group, now) {
            tracing::debug!(
                component = %recorded.component,
                reason = %recorded.reason,
                "event dropped by the spam filter"
            );
            return None;
        }
        let message = self.aggregate(&group, &recorded.message, now);
        let key = EventKey {
            group,
            message: message.clone(),
        };
        let stamp = Time(Timestamp::now());
        let namespace = recorded
            .object
            .namespace
            .clone()
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "default".to_string());
        let (first, count) = self
            .written
            .get(&key)
            .map_or((stamp.clone(), 1), |w| (w.first.clone(), w.count + 1));
        let event = Box::new(Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    recorded.object.name.as_deref().unwrap_or_default(),
                    stamp.0.as_nanosecond()
                )),
                namespace: Some(namespace),
                ..Default::default()
            },
            involved_object: recorded.object,
            reason: Some(recorded.reason),
            message: Some(message),
            type_: Some(recorded.kind.as_str().to_string()),
            count: Some(count),
            first_timestamp: Some(first),
            last_timestamp: Some(stamp.clone()),
            source: Some(EventSource {
                component: Some(recorded.component.to_string()),
                host: None,
            }),
            reporting_component: Some(recorded.component.to_string()),
            ..Default::default()
        });
        Some(match self.written.get_mut(&key) {
            Some(written) => {
                written.used = now;
                Action::Bump {
                    key,
                    name: written.name.clone(),
                    count,
                    last: stamp,
                    event,
                }
            }
            None => Action::Create { key, event },
        })
    }

    /// The spam filter's token bucket for the source and object.
    fn allow(&mut self, group: &GroupKey, now: Instant) -> bool {
        let id = (group.component.clone(), group.object.clone());
        if self.buckets.len() >= CACHE_SIZE && !self.buckets.contains_key(&id) {
            // Full buckets say nothing: forgetting them loses no limit.
            let refill = SPAM_REFILL.as_secs_f64();
            self.buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.at).as_secs_f64() / refill < SPAM_BURST
            });
        }
        let bucket = self.buckets.entry(id).or_insert(Bucket {
            tokens: SPAM_BURST,
            at: now,
        });
        let refilled = now.duration_since(bucket.at).as_secs_f64() / SPAM_REFILL.as_secs_f64();
        bucket.tokens = (bucket.tokens + refilled).min(SPAM_BURST);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The message to record: the event's own, or the combined one once its group has seen
    /// more than [`AGGREGATE_THRESHOLD`] different messages within the window.
    fn aggregate(&mut self, key: &GroupKey, message: &str, now: Instant) -> String {
        if self.groups.len() >= CACHE_SIZE && !self.groups.contains_key(key) {
            self.groups
                .retain(|_, g| now.duration_since(g.since) <= AGGREGATE_WINDOW);
        }
        let group = self.groups.entry(key.clone()).or_insert(Group {
            messages: HashSet::new(),
            since: now,
        });
        if now.duration_since(group.since) > AGGREGATE_WINDOW {
            group.messages.clear();
            group.since = now;
        }
        group.messages.insert(message.to_string());
        if group.messages.len() > AGGREGATE_THRESHOLD {
            format!("(combined from similar events): {message}")
        } else {
            message.to_string()
        }
    }

    fn remember(&mut self, key: EventKey, event: &Event, now: Instant) {
        if self.written.len() >= CACHE_SIZE && !self.written.contains_key(&key) {
            // Forget the least recently used eighth in one go, as an LRU would over time.
            let mut used: Vec<Instant> = self.written.values().map(|w| w.used).collect();
            used.sort_unstable();
            let cutoff = used[used.len() / 8];
            self.written.retain(|_, w| w.used > cutoff);
        }
        self.written.insert(
            key,
            Written {
                name: event.metadata.name.clone().unwrap_or_default(),
                count: event.count.unwrap_or(1),
                first: event
                    .first_timestamp
                    .clone()
                    .unwrap_or_else(|| Time(Timestamp::now())),
                used: now,
            },
        );
    }
}

/// Writes one correlated event, with a few retries on server errors.
async fn write(client: &Client, correlator: &mut Correlator, action: Action) {
    let (key, event, bump) = match action {
        Action::Create { key, event } => (key, event, None),
        Action::Bump {
            key,
            name,
            count,
            last,
            event,
        } => (key, event, Some((name, count, last))),
    };
    let namespace = event.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=ATTEMPTS {
        let result = match &bump {
            Some((name, count, last)) => {
                let patch = json!({"count": count, "lastTimestamp": last});
                match api
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    // The earlier Event expired or was deleted: write it anew.
                    Err(err) if not_found(&err) => api.create(&PostParams::default(), &event).await,
                    other => other,
                }
            }
            None => api.create(&PostParams::default(), &event).await,
        };
        match result {
            Ok(written) => {
                correlator.remember(key, &written, Instant::now());
                return;
            }
            Err(kube::Error::Api(s)) if s.code < 500 && s.code != 429 => {
                tracing::debug!(
                    reason = event.reason.as_deref().unwrap_or_default(),
                    object = event.involved_object.name.as_deref().unwrap_or_default(),
                    code = s.code,
                    message = %s.message,
                    "event refused; dropped"
                );
                return;
            }
            Err(err) if attempt == ATTEMPTS => {
                tracing::warn!(
                    reason = event.reason.as_deref().unwrap_or_default(),
                    object = %event.involved_object.name.as_deref().unwrap_or_default(),
                    error = %err,
                    "could not write an event; dropped"
                );
                return;
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay *= 4;
            }
        }
    }
}

#[cfg(test)]
mod tests;
