//! The controllers' work queue: client-go's rate-limited work queue with four priority lanes
//! (seed §6).
//!
//! Upstream controllers put every key (new object, changed object, deleted object, periodic
//! resync) into one FIFO, so after a resync enqueues every object of the cluster, a newly
//! created object waits behind all of them. Here each key is queued in one of four lanes,
//! served strictly in the order ADD > UPDATE > DELETE > SYNC: new work is handed out before
//! any older, lower-priority key. Everything else is client-go's semantics:
//!
//! - **Deduplication**: a key is queued at most once, in the highest-priority lane it was
//!   added with (adding it again with a higher priority moves it up).
//! - **In-flight tracking**: a key handed to a worker is not handed to another until the
//!   first calls [`WorkQueue::done`]; adding it meanwhile marks it to run once more after.
//! - **Rate-limited retries**: [`WorkQueue::add_rate_limited`] delays a failed key by the
//!   larger of a per-key exponential backoff and an overall token bucket, as client-go's
//!   `DefaultControllerRateLimiter` (5 ms doubling to 1000 s; 10 per second, bursts of 100).
//!   [`WorkQueue::forget`] resets a key's backoff after a success.
//! - **Paced resyncs**: strict priority decides which key goes first, but a resync of every
//!   object would still take the CPU that new work arriving meanwhile needs. The SYNC lane
//!   keeps workers busy for at most [`QueueConfig::sync_share`] of the time (see
//!   [`crate::pace`]): a resync takes longer, new work stays real-time.
//! - **Shutdown**: [`WorkQueue::shut_down`] abandons queued keys at once;
//!   [`WorkQueue::shut_down_with_drain`] refuses new keys, lets workers finish what is queued
//!   and in flight, and returns when they have.
//!
//! With [`QueueConfig::fifo`] every lane shares one FIFO, which is upstream's behaviour, kept
//! for comparison (`canopy bench controllers` measures both).

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fmt,
    hash::Hash,
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{sync::Notify, time::Instant};

use crate::pace::Pacer;

/// Why a key was queued, which is also its priority: lower lanes are served first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// A new object.
    Add = 0,
    /// A changed object (or a retry, or a timer the controller set).
    Update = 1,
    /// A deleted object.
    Delete = 2,
    /// The periodic resync of every object.
    Sync = 3,
}

impl Lane {
    /// Every lane, highest priority first.
    pub const ALL: [Lane; 4] = [Lane::Add, Lane::Update, Lane::Delete, Lane::Sync];

    /// The lane's name in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Add => "add",
            Lane::Update => "update",
            Lane::Delete => "delete",
            Lane::Sync => "sync",
        }
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a queue orders and retries keys.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// One FIFO for every lane (upstream's order) instead of strict priority.
    pub fifo: bool,
    /// First retry delay of a failing key; doubles with every further failure.
    pub base_delay: Duration,
    /// Longest retry delay of one key.
    pub max_delay: Duration,
    /// Retries let through per second over all keys.
    pub retry_qps: f64,
    /// Retries let through at once before `retry_qps` applies.
    pub retry_burst: u32,
    /// The share of time workers may spend on keys from the SYNC lane, in (0, 1]; 1 does
    /// not pace resyncs. Lanes only: the FIFO is upstream's, unpaced.
    pub sync_share: f64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            fifo: false,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_secs(1000),
            retry_qps: 10.0,
            retry_burst: 100,
            sync_share: 0.1,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaneLabels {
    name: String,
    lane: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabels {
    name: String,
}

/// The work queues' Prometheus metrics, upstream's `workqueue_*` with a `lane` label. One
/// set serves every queue of a process; each queue is a `name`.
#[derive(Clone, Debug)]
pub struct QueueMetrics {
    depth: Family<LaneLabels, Gauge>,
    adds: Family<LaneLabels, Counter>,
    queue_duration: Family<LaneLabels, Histogram>,
    work_duration: Family<LaneLabels, Histogram>,
    retries: Family<NameLabels, Counter>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 1 µs to ~16 min, like client-go's workqueue buckets (ExponentialBuckets(1e-8, 10, 10))
    // where they matter for controllers.
    prometheus_client::metrics::histogram::exponential_buckets(1e-6, 4.0, 16)
}

impl QueueMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            depth: Family::default(),
            adds: Family::default(),
            queue_duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            work_duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            retries: Family::default(),
        };
        registry.register(
            "workqueue_depth",
            "Keys waiting in a work queue, by lane",
            metrics.depth.clone(),
        );
        registry.register(
            "workqueue_adds",
            "Keys added to a work queue, by the lane they were queued in",
            metrics.adds.clone(),
        );
        registry.register(
            "workqueue_queue_duration_seconds",
            "How long a key waited in a work queue before a worker took it, by lane",
            metrics.queue_duration.clone(),
        );
        registry.register(
            "workqueue_work_duration_seconds",
            "How long a worker took to process a key, by the lane it came from",
            metrics.work_duration.clone(),
        );
        registry.register(
            "workqueue_retries",
            "Failed keys queued again after a backoff",
            metrics.retries.clone(),
        );
        metrics
    }

    /// Metrics that nobody scrapes (tests, tools).
    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default())
    }

    /// Keys waiting in one lane of the queue `name` now.
    pub fn depth(&self, name: &str, lane: Lane) -> i64 {
        self.depth.get_or_create(&Self::lane(name, lane)).get()
    }

    fn lane(name: &str, lane: Lane) -> LaneLabels {
        LaneLabels {
            name: name.to_string(),
            lane: lane.as_str().to_string(),
        }
    }
}

/// Per-queue handles on the metric series, so the hot path does not build label strings.
struct Series {
    depth: [Gauge; 4],
    adds: [Counter; 4],
    queue_duration: [Histogram; 4],
    work_duration: [Histogram; 4],
    retries: Counter,
}

impl Series {
    fn new(metrics: &QueueMetrics, name: &str) -> Self {
        let lanes = Lane::ALL.map(|lane| QueueMetrics::lane(name, lane));
        Self {
            depth: lanes
                .clone()
                .map(|l| metrics.depth.get_or_create(&l).clone()),
            adds: lanes
                .clone()
                .map(|l| metrics.adds.get_or_create(&l).clone()),
            queue_duration: lanes
                .clone()
                .map(|l| metrics.queue_duration.get_or_create(&l).clone()),
            work_duration: lanes.map(|l| metrics.work_duration.get_or_create(&l).clone()),
            retries: metrics
                .retries
                .get_or_create(&NameLabels {
                    name: name.to_string(),
                })
                .clone(),
        }
    }
}

struct Queued {
    lane: Lane,
    /// Tells the live entry of a key from stale ones left in lower lanes after a promotion.
    seq: u64,
    since: Instant,
}

struct State<K> {
    /// Keys by serving order; with `fifo`, only the first is used.
    lanes: [VecDeque<(K, u64)>; 4],
    queued: HashMap<K, Queued>,
    processing: HashSet<K>,
    /// Paces the SYNC lane.
    sync_pacer: Pacer,
    /// Keys added while being processed: queued again, in this lane, when done.
    dirty: HashMap<K, Lane>,
    /// Keys waiting for a delay, earliest first; `waiting` holds each key's entry.
    delayed: BTreeMap<(Instant, u64), K>,
    waiting: HashMap<K, (Instant, u64, Lane)>,
    failures: HashMap<K, u32>,
    /// The overall retry bucket: tokens left (negative: reserved ahead) and when counted.
    tokens: f64,
    tokens_at: Instant,
    seq: u64,
    draining: bool,
    shut_down: bool,
}

struct Shared<K> {
    name: String,
    config: QueueConfig,
    state: Mutex<State<K>>,
    /// Wakes workers waiting in `get` (new keys, delays to recompute, shutdown).
    ready: Notify,
    /// Wakes `shut_down_with_drain` when the last key is done.
    idle: Notify,
    series: Series,
}

/// A prioritised, deduplicating, rate-limited work queue of keys (see the module docs).
/// Cloning gives another handle on the same queue.
pub struct WorkQueue<K> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for WorkQueue<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<K: Clone + Eq + Hash + Send + 'static> WorkQueue<K> {
    /// A queue called `name` in metrics and logs.
    pub fn new(name: &str, config: QueueConfig, metrics: &QueueMetrics) -> Self {
        let burst = f64::from(config.retry_burst.max(1));
        Self {
            shared: Arc::new(Shared {
                name: name.to_string(),
                series: Series::new(metrics, name),
                state: Mutex::new(State {
                    lanes: Default::default(),
                    queued: HashMap::new(),
                    processing: HashSet::new(),
                    sync_pacer: Pacer::new(if config.fifo { 1.0 } else { config.sync_share }),
                    dirty: HashMap::new(),
                    delayed: BTreeMap::new(),
                    waiting: HashMap::new(),
                    failures: HashMap::new(),
                    tokens: burst,
                    tokens_at: Instant::now(),
                    seq: 0,
                    draining: false,
                    shut_down: false,
                }),
                config,
                ready: Notify::new(),
                idle: Notify::new(),
            }),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Queues `key` in `lane`, or moves it up if it waits in a lower one. A key being
    /// processed runs once more when its worker is done with it.
    pub fn add(&self, key: K, lane: Lane) {
        let mut state = self.shared.state.lock();
        if state.draining || state.shut_down {
            return;
        }
        if self.enqueue(&mut state, key, lane) {
            // A resync queues thousands of keys in a burst: during a pause, a worker woken
            // for each would only go back to sleep. The one woken for the lane's first key
            // waits for the end of the pause.
            let waits_for_pause = lane == Lane::Sync
                && !self.shared.config.fifo
                && state.lanes[Lane::Sync as usize].len() > 1
                && state.sync_pacer.paused_until().is_some();
            drop(state);
            if !waits_for_pause {
                self.shared.ready.notify_one();
            }
        }
    }

    /// Queues `key` in `lane` once `delay` has passed. A key already waiting keeps the earlier
    /// of its two times and the higher of its two lanes.
    pub fn add_after(&self, key: K, lane: Lane, delay: Duration) {
        if delay.is_zero() {
            return self.add(key, lane);
        }
        let at = Instant::now() + delay;
        let mut state = self.shared.state.lock();
        if state.draining || state.shut_down {
            return;
        }
        state.seq += 1;
        let seq = state.seq;
        match state.waiting.get(&key).copied() {
            Some((old_at, old_seq, old_lane)) => {
                let lane = lane.min(old_lane);
                if at < old_at {
                    state.delayed.remove(&(old_at, old_seq));
                    state.delayed.insert((at, seq), key.clone());
                    state.waiting.insert(key, (at, seq, lane));
                } else {
                    state.waiting.insert(key, (old_at, old_seq, lane));
                }
            }
            None => {
                state.delayed.insert((at, seq), key.clone());
                state.waiting.insert(key, (at, seq, lane));
            }
        }
        drop(state);
        // A worker asleep until a later deadline must learn of this earlier one.
        self.shared.ready.notify_waiters();
    }

    /// Queues a key that failed, after its backoff: the larger of its own exponential delay
    /// and the overall retry budget's.
    pub fn add_rate_limited(&self, key: K, lane: Lane) {
        let delay = {
            let mut state = self.shared.state.lock();
            let config = &self.shared.config;
            let failures = state.failures.entry(key.clone()).or_insert(0);
            let exponent = (*failures).min(40);
            *failures = failures.saturating_add(1);
            let per_key = config
                .base_delay
                .saturating_mul(1u32 << exponent.min(31))
                .min(config.max_delay);
            let now = Instant::now();
            let refill = now.duration_since(state.tokens_at).as_secs_f64() * config.retry_qps;
            state.tokens = (state.tokens + refill).min(f64::from(config.retry_burst.max(1)));
            state.tokens_at = now;
            state.tokens -= 1.0;
            let overall = if state.tokens >= 0.0 || config.retry_qps <= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-state.tokens / config.retry_qps)
            };
            per_key.max(overall)
        };
        self.shared.series.retries.inc();
        self.add_after(key, lane, delay);
    }

    /// Clears a key's failures, so its next retry starts from the base delay.
    pub fn forget(&self, key: &K) {
        self.shared.state.lock().failures.remove(key);
    }

    /// How many times the key failed since it was last forgotten.
    pub fn failures(&self, key: &K) -> u32 {
        self.shared
            .state
            .lock()
            .failures
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Waits for the next key, highest lane first; `None` once the queue is shut down (or,
    /// draining, empty). The caller must call [`WorkQueue::done`] with the key afterwards.
    pub async fn get(&self) -> Option<(K, Lane)> {
        loop {
            let notified = self.shared.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next_delay = {
                let mut state = self.shared.state.lock();
                if state.shut_down {
                    return None;
                }
                self.promote_due(&mut state);
                if let Some(item) = self.pop(&mut state) {
                    return Some(item);
                }
                if state.draining {
                    return None;
                }
                let pause_ends = state
                    .sync_pacer
                    .paused_until()
                    .filter(|_| !state.lanes[Lane::Sync as usize].is_empty());
                let due = state.delayed.keys().next().map(|(at, _)| *at);
                match (due, pause_ends) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            match next_delay {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Marks a key's processing finished; if it was added meanwhile, queues it again.
    pub fn done(&self, key: &K) {
        let mut state = self.shared.state.lock();
        state.processing.remove(key);
        let mut queued = false;
        if let Some(lane) = state.dirty.remove(key)
            && !state.shut_down
        {
            queued = self.enqueue(&mut state, key.clone(), lane);
        }
        let idle = state.processing.is_empty() && state.queued.is_empty();
        drop(state);
        if queued {
            self.shared.ready.notify_one();
        }
        if idle {
            self.shared.idle.notify_waiters();
        }
    }

    /// Records how long a worker spent on a key from `lane`; SYNC work earns the lane its
    /// pauses.
    pub fn observe_work(&self, lane: Lane, took: Duration) {
        self.shared.series.work_duration[lane as usize].observe(took.as_secs_f64());
        if lane == Lane::Sync {
            self.shared.state.lock().sync_pacer.worked(took);
        }
    }

    /// Stops at once: queued and delayed keys are dropped, `get` returns `None`. Workers
    /// still processing a key finish it.
    pub fn shut_down(&self) {
        let mut state = self.shared.state.lock();
        state.shut_down = true;
        for lane in &mut state.lanes {
            lane.clear();
        }
        state.queued.clear();
        state.dirty.clear();
        state.delayed.clear();
        state.waiting.clear();
        for gauge in &self.shared.series.depth {
            gauge.set(0);
        }
        drop(state);
        self.shared.ready.notify_waiters();
        self.shared.idle.notify_waiters();
    }

    /// Refuses new keys and drops delayed ones, lets workers take what is queued, and
    /// returns once every key is done; then shuts down.
    pub async fn shut_down_with_drain(&self) {
        {
            let mut state = self.shared.state.lock();
            state.draining = true;
            state.delayed.clear();
            state.waiting.clear();
        }
        self.shared.ready.notify_waiters();
        loop {
            let idle = self.shared.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let state = self.shared.state.lock();
                if state.shut_down || (state.processing.is_empty() && state.queued.is_empty()) {
                    break;
                }
            }
            idle.await;
        }
        self.shut_down();
    }

    /// Keys queued (not delayed, not in flight).
    pub fn len(&self) -> usize {
        self.shared.state.lock().queued.len()
    }

    /// Whether no key is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys queued in each lane, highest priority first.
    pub fn depths(&self) -> [usize; 4] {
        let state = self.shared.state.lock();
        let mut depths = [0; 4];
        for queued in state.queued.values() {
            depths[queued.lane as usize] += 1;
        }
        depths
    }

    /// Puts a key in its lane; `true` when a worker has something new to take.
    fn enqueue(&self, state: &mut State<K>, key: K, lane: Lane) -> bool {
        if state.processing.contains(&key) {
            let entry = state.dirty.entry(key).or_insert(lane);
            *entry = (*entry).min(lane);
            return false;
        }
        let fifo = self.shared.config.fifo;
        let series = &self.shared.series;
        state.seq += 1;
        let seq = state.seq;
        match state.queued.get_mut(&key) {
            Some(queued) if fifo || queued.lane <= lane => false,
            Some(queued) => {
                // Promotion: the entry in the lower lane goes stale (its seq no longer
                // matches) and is skipped when reached.
                series.depth[queued.lane as usize].dec();
                series.depth[lane as usize].inc();
                queued.lane = lane;
                queued.seq = seq;
                state.lanes[lane as usize].push_back((key, seq));
                true
            }
            None => {
                series.adds[lane as usize].inc();
                series.depth[lane as usize].inc();
                state.queued.insert(
                    key.clone(),
                    Queued {
                        lane,
                        seq,
                        since: Instant::now(),
                    },
                );
                let slot = if fifo { 0 } else { lane as usize };
                state.lanes[slot].push_back((key, seq));
                true
            }
        }
    }

    fn pop(&self, state: &mut State<K>) -> Option<(K, Lane)> {
        // Draining takes every key that is queued, paced or not.
        let sync_paused = !state.draining && state.sync_pacer.paused_until().is_some();
        let State {
            lanes,
            queued,
            processing,
            ..
        } = state;
        for (slot, lane) in lanes.iter_mut().enumerate() {
            if slot == Lane::Sync as usize && sync_paused {
                break;
            }
            while let Some((key, seq)) = lane.pop_front() {
                // A stale lane entry (the key was re-queued since) is skipped.
                if queued.get(&key).is_none_or(|q| q.seq != seq) {
                    continue;
                }
                let Some(entry) = queued.remove(&key) else {
                    continue;
                };
                let series = &self.shared.series;
                series.depth[entry.lane as usize].dec();
                series.queue_duration[entry.lane as usize]
                    .observe(entry.since.elapsed().as_secs_f64());
                processing.insert(key.clone());
                return Some((key, entry.lane));
            }
        }
        None
    }

    fn promote_due(&self, state: &mut State<K>) {
        let now = Instant::now();
        while let Some(entry) = state.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            if let Some((_, _, lane)) = state.waiting.remove(&key) {
                self.enqueue(state, key, lane);
            }
        }
    }
}

impl<K> fmt::Debug for WorkQueue<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkQueue")
            .field("name", &self.shared.name)
            .finish()
    }
}

#[cfg(test)]
mod tests;
