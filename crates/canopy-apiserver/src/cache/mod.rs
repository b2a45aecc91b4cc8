//! The watch cache: every object of one resource in memory, fed by one store watch, serving
//! lists and watches without touching the store.
//!
//! - Objects are kept as their final JSON (resourceVersion included), so a list is a
//!   concatenation of byte strings, plus the labels and selectable fields pre-extracted for
//!   filtering.
//! - The object map is persistent (`imbl::OrdMap`): a snapshot is O(1), which is how a
//!   paginated list keeps serving the revision its first page was read at.
//! - A window of recent events serves watches that start at a past revision; older ones get
//!   410 Gone, as upstream.
//! - Every watcher has a bounded queue. A watcher that falls behind by a full queue is
//!   dropped, its stream ends and its client re-establishes the watch: memory stays bounded
//!   whatever clients do.
//! - Consistent reads: the caller learns the store's current revision and waits until the
//!   cache has caught up to it, asking the store for a progress notification so that an idle
//!   resource catches up too.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use canopy_api::{
    ResourceDef, kinds, meta,
    selector::{FieldSelector, LabelSelector},
};
use canopy_store::{
    Error as StoreError, Event as StoreEvent, EventKind, KeyValue, Revision, Store,
};
use imbl::OrdMap;
use parking_lot::RwLock;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, watch};

use crate::metrics::Metrics;

mod packed;

pub use packed::{Dictionary, Packed};

/// One object as the cache holds it.
#[derive(Debug)]
pub struct CachedObject {
    /// `namespace/name`, or `name` for cluster-scoped kinds.
    pub key: Arc<str>,
    /// The store revision that last modified the object (its resourceVersion).
    pub revision: Revision,
    /// The object's JSON, resourceVersion included.
    packed: Packed,
    /// Labels, then the kind's selectable field values (in `ResourceDef::field_selectors`
    /// order), as length-prefixed strings in one allocation.
    attrs: Box<[u8]>,
    labels: u16,
}

fn push_attr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl CachedObject {
    /// Builds the cached form of an object; `obj` must already carry its resourceVersion.
    pub fn new(
        def: &ResourceDef,
        obj: &Value,
        revision: Revision,
        dictionary: Option<&Arc<Dictionary>>,
    ) -> Self {
        let namespace = meta::namespace(obj);
        let name = meta::name(obj);
        let key: Arc<str> = if def.namespaced {
            format!("{namespace}/{name}").into()
        } else {
            name.into()
        };
        let mut attrs = Vec::new();
        let mut labels = 0u16;
        for (k, v) in meta::labels(obj) {
            push_attr(&mut attrs, k);
            push_attr(&mut attrs, v);
            labels = labels.saturating_add(1);
        }
        for f in def.field_selectors {
            push_attr(
                &mut attrs,
                &kinds::field_value(def, obj, f).unwrap_or_default(),
            );
        }
        let json = Bytes::from(serde_json::to_vec(obj).unwrap_or_default());
        Self {
            key,
            revision,
            packed: Packed::new(json, dictionary),
            attrs: attrs.into_boxed_slice(),
            labels,
        }
    }

    /// The same object packed with another dictionary.
    fn repacked(&self, dictionary: &Arc<Dictionary>) -> Self {
        Self {
            key: self.key.clone(),
            revision: self.revision,
            packed: Packed::new(self.packed.json(), Some(dictionary)),
            attrs: self.attrs.clone(),
            labels: self.labels,
        }
    }

    /// The namespace ("" for cluster-scoped objects).
    pub fn namespace(&self) -> &str {
        self.key.split_once('/').map_or("", |(ns, _)| ns)
    }

    /// The name.
    pub fn name(&self) -> &str {
        self.key.split_once('/').map_or(&self.key, |(_, n)| n)
    }

    /// The object's JSON.
    pub fn json(&self) -> Bytes {
        self.packed.json()
    }

    /// Appends the object's JSON to `out`.
    pub fn append_json(&self, out: &mut Vec<u8>) {
        self.packed.append_to(out);
    }

    /// The length of the object's JSON.
    pub fn json_len(&self) -> usize {
        self.packed.len()
    }

    /// Bytes the object's JSON takes in memory.
    pub fn footprint(&self) -> usize {
        self.packed.footprint() + self.attrs.len() + self.key.len()
    }

    /// The object as a JSON value.
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.json()).unwrap_or(Value::Null)
    }

    fn attrs(&self) -> impl Iterator<Item = &str> {
        let mut rest: &[u8] = &self.attrs;
        std::iter::from_fn(move || {
            let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let s = std::str::from_utf8(rest.get(4..4 + len)?).ok()?;
            rest = &rest[4 + len..];
            Some(s)
        })
    }

    /// The value of one of the object's labels.
    pub fn label(&self, key: &str) -> Option<&str> {
        let mut attrs = self.attrs();
        for _ in 0..self.labels {
            let (k, v) = (attrs.next()?, attrs.next()?);
            if k == key {
                return Some(v);
            }
        }
        None
    }

    fn field(&self, def: &ResourceDef, name: &str) -> Option<String> {
        match name {
            "metadata.name" => Some(self.name().to_string()),
            "metadata.namespace" => Some(self.namespace().to_string()),
            _ => {
                let index = def.field_selectors.iter().position(|f| *f == name)?;
                self.attrs()
                    .nth(2 * self.labels as usize + index)
                    .map(str::to_string)
            }
        }
    }
}

/// What a list or watch selects.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Label selector.
    pub labels: LabelSelector,
    /// Field selector.
    pub fields: FieldSelector,
}

impl Filter {
    /// Whether an object passes.
    pub fn matches(&self, def: &ResourceDef, obj: &CachedObject) -> bool {
        if let Some(ns) = &self.namespace
            && def.namespaced
            && obj.namespace() != ns
        {
            return false;
        }
        (self.labels.is_empty() || self.labels.matches(|k| obj.label(k)))
            && (self.fields.is_empty() || self.fields.matches(|f| obj.field(def, f)))
    }
}

/// Watch event types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// `ADDED`.
    Added,
    /// `MODIFIED`.
    Modified,
    /// `DELETED`.
    Deleted,
}

impl EventType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change to the resource.
#[derive(Debug)]
pub struct CacheEvent {
    /// What happened in the store.
    pub kind: EventType,
    /// The store revision of the change.
    pub revision: Revision,
    /// The object after the change (for a deletion: its last state, at the deletion's
    /// revision).
    pub object: Arc<CachedObject>,
    /// The object before the change.
    pub prev: Option<Arc<CachedObject>>,
    /// The previous state at this event's revision, for watchers the change moves out of
    /// their selection (they see a DELETED event).
    prev_at_revision: OnceLock<Bytes>,
}

impl CacheEvent {
    /// The object a watcher sees for an event of type `seen` (which may differ from
    /// `kind` for filtered watchers).
    pub fn object_json(&self, seen: EventType) -> Bytes {
        match (seen, self.kind) {
            (EventType::Deleted, EventType::Deleted)
            | (EventType::Added, _)
            | (EventType::Modified, _) => self.object.json(),
            (EventType::Deleted, _) => self
                .prev_at_revision
                .get_or_init(|| {
                    let Some(prev) = &self.prev else {
                        return self.object.json();
                    };
                    let mut value = prev.value();
                    meta::set_meta(
                        &mut value,
                        "resourceVersion",
                        Value::String(self.revision.to_string()),
                    );
                    Bytes::from(serde_json::to_vec(&value).unwrap_or_default())
                })
                .clone(),
        }
    }

    /// How a watcher with `filter` sees this event, if at all (upstream's
    /// `convertToWatchEvent`).
    pub fn seen_by(&self, def: &ResourceDef, filter: &Filter) -> Option<EventType> {
        let now = self.kind != EventType::Deleted && filter.matches(def, &self.object);
        let before = match (&self.prev, self.kind) {
            (_, EventType::Deleted) => filter.matches(def, &self.object),
            (Some(prev), _) => filter.matches(def, prev),
            (None, _) => false,
        };
        match (before, now) {
            (false, true) => Some(EventType::Added),
            (true, true) => Some(EventType::Modified),
            (true, false) => Some(EventType::Deleted),
            (false, false) => None,
        }
    }
}

/// An event as queued for one watcher, with the JSON frame shared by every plain-JSON
/// watcher that sees the event the same way.
#[derive(Clone, Debug)]
pub struct WatchItem {
    /// The event.
    pub event: Arc<CacheEvent>,
    /// How this watcher sees it.
    pub seen: EventType,
    /// `{"type":...,"object":...}\n`.
    pub frame: Bytes,
}

/// Builds a watch event frame.
pub fn frame(seen: EventType, object: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(object.len() + 32);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(seen.as_str().as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    out.extend_from_slice(object);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

struct WatcherSlot {
    filter: Arc<Filter>,
    tx: mpsc::Sender<WatchItem>,
}

struct Snapshot {
    revision: Revision,
    objects: OrdMap<Arc<str>, Arc<CachedObject>>,
    taken: Instant,
}

struct Inner {
    objects: OrdMap<Arc<str>, Arc<CachedObject>>,
    revision: Revision,
    events: VecDeque<Arc<CacheEvent>>,
    /// Watches must start after this revision to be served from the window.
    oldest: Revision,
    watchers: HashMap<u64, WatcherSlot>,
    snapshots: VecDeque<Snapshot>,
    ready: bool,
    /// The dictionary new objects are compressed with.
    dictionary: Option<Arc<Dictionary>>,
    /// How many objects there were when the dictionary was last trained.
    trained_for: usize,
}

/// Objects a resource needs before its first dictionary is trained; later ones are
/// trained each time the resource grows this many times over.
const TRAIN_MIN: usize = 512;
const RETRAIN_GROWTH: usize = 8;
/// Objects sampled to train a dictionary.
const TRAIN_SAMPLES: usize = 2048;
/// Objects repacked per lock acquisition after training.
const REPACK_CHUNK: usize = 1024;

/// Tuning of a watch cache.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// Most events kept for watches that start in the past.
    pub window: usize,
    /// Events queued per watcher before it is dropped as too slow.
    pub watcher_queue: usize,
    /// Paginated-list snapshots kept.
    pub snapshots: usize,
    /// How long a snapshot serves continue tokens.
    pub snapshot_ttl: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            window: 50_000,
            watcher_queue: 4096,
            snapshots: 32,
            snapshot_ttl: Duration::from_secs(300),
        }
    }
}

/// A page of a list.
pub struct ListPage {
    /// The objects, in key order.
    pub items: Vec<Arc<CachedObject>>,
    /// The revision the list is consistent at.
    pub revision: Revision,
    /// The key of the last item when more remain.
    pub more_after: Option<Arc<str>>,
    /// How many objects remain after this page (when no selector filtered the list).
    pub remaining: Option<usize>,
}

/// Why a read could not be served from the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The revision is older than the window or the snapshot is gone.
    #[error("too old resource version: {requested} ({oldest})")]
    TooOld {
        /// Asked for.
        requested: Revision,
        /// Oldest servable.
        oldest: Revision,
    },
    /// The cache did not reach the revision in time.
    #[error("Too large resource version: {requested}, current: {current}")]
    TooNew {
        /// Asked for.
        requested: Revision,
        /// Where the cache is.
        current: Revision,
    },
    /// The cache is not initialised yet.
    #[error("the watch cache for {0} is not ready yet")]
    NotReady(&'static str),
}

/// The cache of one resource.
pub struct WatchCache {
    def: &'static ResourceDef,
    store: Arc<dyn Store>,
    options: CacheOptions,
    inner: RwLock<Inner>,
    revision: watch::Sender<Revision>,
    progress_wanted: Notify,
    next_watcher: AtomicU64,
    metrics: Arc<Metrics>,
    training: std::sync::atomic::AtomicBool,
    /// The highest revision of a write to this resource this server acknowledged.
    written: std::sync::atomic::AtomicI64,
    /// Objects this server wrote, by revision, built before their store event arrives so
    /// that the event need not be decoded again.
    primed: parking_lot::Mutex<HashMap<Revision, Arc<CachedObject>>>,
}

/// Most primed objects kept; beyond that the cache is far behind and decoding is fine.
const PRIMED_LIMIT: usize = 8192;

/// A registered watch: initial objects (if asked for), then live events.
pub struct Subscription {
    /// Events after `revision`, in order.
    pub events: mpsc::Receiver<WatchItem>,
    /// Objects of the initial state (when requested), in key order.
    pub initial: Vec<Arc<CachedObject>>,
    /// Events already in the window after the start revision, to send before `events`.
    pub backlog: Vec<Arc<CacheEvent>>,
    /// The revision the initial state / start point is at.
    pub revision: Revision,
    id: u64,
    cache: Arc<WatchCache>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut inner = self.cache.inner.write();
        if inner.watchers.remove(&self.id).is_some() {
            self.cache
                .metrics
                .watchers
                .get_or_create(&self.cache.metric_labels())
                .dec();
        }
    }
}

impl WatchCache {
    /// Creates the cache and starts feeding it from the store.
    pub fn start(
        def: &'static ResourceDef,
        store: Arc<dyn Store>,
        options: CacheOptions,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let cache = Arc::new(Self {
            def,
            store,
            options,
            inner: RwLock::new(Inner {
                objects: OrdMap::new(),
                revision: 0,
                events: VecDeque::new(),
                oldest: 0,
                watchers: HashMap::new(),
                snapshots: VecDeque::new(),
                ready: false,
                dictionary: None,
                trained_for: 0,
            }),
            revision: watch::channel(0).0,
            progress_wanted: Notify::new(),
            next_watcher: AtomicU64::new(1),
            metrics,
            training: std::sync::atomic::AtomicBool::new(false),
            written: std::sync::atomic::AtomicI64::new(0),
            primed: parking_lot::Mutex::new(HashMap::new()),
        });
        tokio::spawn(cache.clone().feed());
        cache
    }

    fn metric_labels(&self) -> crate::metrics::ResourceLabels {
        crate::metrics::ResourceLabels {
            resource: self.def.plural.to_string(),
        }
    }

    /// The resource cached.
    pub fn def(&self) -> &'static ResourceDef {
        self.def
    }

    /// Whether the initial list has been loaded.
    pub fn is_ready(&self) -> bool {
        self.inner.read().ready
    }

    /// The revision the cache has caught up to.
    pub fn revision(&self) -> Revision {
        *self.revision.borrow()
    }

    /// Waits until the cache has seen every change up to `target`.
    pub async fn wait_for(&self, target: Revision, timeout: Duration) -> Result<(), CacheError> {
        let mut rx = self.revision.subscribe();
        if *rx.borrow() >= target && self.is_ready() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.progress_wanted.notify_one();
            let tick = tokio::time::sleep(Duration::from_millis(50));
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Err(CacheError::NotReady(self.def.plural));
                    }
                }
                _ = tick => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let current = *rx.borrow();
                    return if self.is_ready() {
                        Err(CacheError::TooNew { requested: target, current })
                    } else {
                        Err(CacheError::NotReady(self.def.plural))
                    };
                }
            }
            if *rx.borrow() >= target && self.is_ready() {
                return Ok(());
            }
        }
    }

    /// Records an object this server stored at `revision` (with its resourceVersion set):
    /// when the store's event for it arrives, the cache uses this instead of decoding.
    pub fn prime(&self, revision: Revision, obj: &Value) {
        // The store's event often reaches the cache before the writer gets here; then the
        // cache has built the object already and building it again would be wasted.
        if self.revision() >= revision {
            self.note_write(revision);
            return;
        }
        let dictionary = self.inner.read().dictionary.clone();
        let cached = Arc::new(CachedObject::new(
            self.def,
            obj,
            revision,
            dictionary.as_ref(),
        ));
        let mut primed = self.primed.lock();
        if primed.len() >= PRIMED_LIMIT {
            primed.clear();
        }
        primed.insert(revision, cached);
        drop(primed);
        self.note_write(revision);
    }

    /// Records a write this server acknowledged, so that later reads through this server see
    /// it (see [`WatchCache::wait_for_own_writes`]).
    pub fn note_write(&self, revision: Revision) {
        self.written.fetch_max(revision, Ordering::AcqRel);
    }

    /// Waits until the cache holds every write this server has acknowledged for the
    /// resource. Reads that accept any resourceVersion ("0") still see the client's own
    /// writes; the wait is normally the time the store takes to deliver one event.
    pub async fn wait_for_own_writes(&self, timeout: Duration) -> Result<(), CacheError> {
        let written = self.written.load(Ordering::Acquire);
        if self.revision() >= written && self.is_ready() {
            return Ok(());
        }
        self.wait_for(written, timeout).await
    }

    /// One object by key (`ns/name`).
    pub fn get(&self, key: &str) -> Option<Arc<CachedObject>> {
        self.inner.read().objects.get(key).cloned()
    }

    /// A page of objects. `start_after`: the key the previous page ended at; `at`: the
    /// revision a continued list is pinned to.
    pub fn list(
        &self,
        filter: &Filter,
        limit: usize,
        start_after: Option<&str>,
        at: Option<Revision>,
    ) -> Result<ListPage, CacheError> {
        let (objects, revision) = {
            let mut inner = self.inner.write();
            if !inner.ready {
                return Err(CacheError::NotReady(self.def.plural));
            }
            match at {
                Some(rev) if rev != inner.revision => {
                    let ttl = self.options.snapshot_ttl;
                    inner.snapshots.retain(|s| s.taken.elapsed() < ttl);
                    match inner.snapshots.iter().find(|s| s.revision == rev) {
                        Some(s) => (s.objects.clone(), rev),
                        None => {
                            return Err(CacheError::TooOld {
                                requested: rev,
                                oldest: inner.oldest,
                            });
                        }
                    }
                }
                _ => (inner.objects.clone(), inner.revision),
            }
        };
        // Namespaced lists range over the keys of that namespace only.
        let lower: Option<String> = match (&filter.namespace, start_after) {
            (_, Some(after)) => Some(after.to_string()),
            (Some(ns), None) if self.def.namespaced => Some(format!("{ns}/")),
            _ => None,
        };
        let ns_prefix = filter
            .namespace
            .as_ref()
            .filter(|_| self.def.namespaced)
            .map(|ns| format!("{ns}/"));
        let iter: Box<dyn Iterator<Item = (&Arc<str>, &Arc<CachedObject>)>> = match &lower {
            Some(lower) => {
                let lower: Arc<str> = Arc::from(lower.as_str());
                Box::new(objects.range(lower..))
            }
            None => Box::new(objects.iter()),
        };
        let unfiltered = filter.labels.is_empty() && filter.fields.is_empty();
        let mut items = Vec::new();
        let mut more_after = None;
        for (key, obj) in iter {
            if start_after == Some(&**key) {
                continue;
            }
            if let Some(prefix) = &ns_prefix
                && !key.starts_with(prefix.as_str())
            {
                break;
            }
            if !filter.matches(self.def, obj) {
                continue;
            }
            if limit > 0 && items.len() == limit {
                more_after = items.last().map(|o: &Arc<CachedObject>| o.key.clone());
                break;
            }
            items.push(obj.clone());
        }
        // Upstream reports how many objects remain only when no selector filters the list.
        let remaining = match (&more_after, unfiltered) {
            (Some(last), true) => {
                let after = objects.range((
                    std::ops::Bound::Excluded(last.clone()),
                    std::ops::Bound::Unbounded,
                ));
                Some(match &ns_prefix {
                    Some(prefix) => after
                        .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                        .count(),
                    None => after.count(),
                })
            }
            _ => None,
        };
        if more_after.is_some() && at.is_none() {
            self.keep_snapshot(revision, objects);
        }
        Ok(ListPage {
            items,
            revision,
            more_after,
            remaining,
        })
    }

    fn keep_snapshot(&self, revision: Revision, objects: OrdMap<Arc<str>, Arc<CachedObject>>) {
        let mut inner = self.inner.write();
        if inner.snapshots.iter().any(|s| s.revision == revision) {
            return;
        }
        while inner.snapshots.len() >= self.options.snapshots {
            inner.snapshots.pop_front();
        }
        inner.snapshots.push_back(Snapshot {
            revision,
            objects,
            taken: Instant::now(),
        });
    }

    /// Registers a watcher. With `initial`, the subscription carries the current state
    /// (filtered) and events after it; otherwise events after `from` (which must be
    /// within the window).
    pub fn subscribe(
        self: &Arc<Self>,
        filter: Arc<Filter>,
        initial: bool,
        from: Revision,
    ) -> Result<Subscription, CacheError> {
        let (tx, rx) = mpsc::channel(self.options.watcher_queue);
        let id = self.next_watcher.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.inner.write();
        if !inner.ready {
            return Err(CacheError::NotReady(self.def.plural));
        }
        let (initial_objects, backlog, revision) = if initial {
            let objects: Vec<Arc<CachedObject>> = inner
                .objects
                .values()
                .filter(|o| filter.matches(self.def, o))
                .cloned()
                .collect();
            (objects, Vec::new(), inner.revision)
        } else {
            if from < inner.oldest {
                return Err(CacheError::TooOld {
                    requested: from,
                    oldest: inner.oldest,
                });
            }
            let backlog: Vec<Arc<CacheEvent>> = inner
                .events
                .iter()
                .filter(|e| e.revision > from)
                .cloned()
                .collect();
            (Vec::new(), backlog, from.max(inner.revision))
        };
        inner.watchers.insert(
            id,
            WatcherSlot {
                filter: filter.clone(),
                tx,
            },
        );
        drop(inner);
        self.metrics
            .watchers
            .get_or_create(&self.metric_labels())
            .inc();
        Ok(Subscription {
            events: rx,
            initial: initial_objects,
            backlog,
            revision,
            id,
            cache: self.clone(),
        })
    }

    /// The events of the window after `from` that `filter` sees (used for backlogs).
    pub fn visible(&self, event: &CacheEvent, filter: &Filter) -> Option<EventType> {
        event.seen_by(self.def, filter)
    }

    async fn feed(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let revision = match self.relist().await {
                Ok(rev) => rev,
                Err(err) => {
                    tracing::warn!(resource = self.def.plural, error = %err, "watch cache list failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let mut from = revision + 1;
            // Follow the store until the history we need is gone.
            loop {
                match self.follow(from).await {
                    Ok(next) => from = next,
                    Err((next, StoreError::Compacted { .. })) => {
                        tracing::warn!(
                            resource = self.def.plural,
                            revision = next,
                            "watch cache fell behind compaction; relisting"
                        );
                        break;
                    }
                    Err((next, err)) => {
                        tracing::warn!(resource = self.def.plural, error = %err, "store watch failed; resuming");
                        from = next;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    /// Loads the whole resource from the store. Watchers of a previous incarnation cannot
    /// be continued consistently and are ended.
    async fn relist(self: &Arc<Self>) -> Result<Revision, StoreError> {
        let started = Instant::now();
        let list = self
            .store
            .range(canopy_store::RangeRequest {
                prefix: self.def.key_prefix(),
                ..Default::default()
            })
            .await?;
        let mut objects = OrdMap::new();
        for kv in &list.kvs {
            match decode(self.def, kv) {
                Ok((value, rev)) => {
                    let obj = Arc::new(CachedObject::new(self.def, &value, rev, None));
                    objects.insert(obj.key.clone(), obj);
                }
                Err(err) => {
                    tracing::error!(resource = self.def.plural, key = %kv.key, error = %err, "skipping undecodable stored object")
                }
            }
        }
        let count = objects.len();
        {
            let mut inner = self.inner.write();
            inner.objects = objects;
            inner.revision = list.revision;
            inner.oldest = list.revision;
            inner.events.clear();
            inner.snapshots.clear();
            inner.watchers.clear();
        }
        // Compress before serving: a large resource would otherwise sit in memory uncompressed.
        if self.training_due() {
            self.train().await;
        }
        self.inner.write().ready = true;
        self.revision.send_replace(list.revision);
        tracing::info!(
            resource = self.def.plural,
            objects = count,
            revision = list.revision,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "watch cache loaded"
        );
        Ok(list.revision)
    }

    /// Applies store events from `from` on. Returns where to resume when the watch ends.
    async fn follow(self: &Arc<Self>, from: Revision) -> Result<Revision, (Revision, StoreError)> {
        let mut watch = self
            .store
            .watch(&self.def.key_prefix(), from)
            .await
            .map_err(|e| (from, e))?;
        let mut next = from;
        loop {
            tokio::select! {
                response = watch.next() => {
                    let response = match response {
                        Some(Ok(r)) => r,
                        Some(Err(err)) => return Err((next, err)),
                        None => return Err((next, StoreError::Unavailable("store watch ended".into()))),
                    };
                    if let Some(last) = response.events.last() {
                        next = last.kv.mod_revision + 1;
                    }
                    let progress = response.progress;
                    self.apply(response.events, progress);
                    next = next.max(progress + 1);
                    if self.training_due() {
                        let cache = self.clone();
                        tokio::spawn(async move { cache.train().await });
                    }
                }
                _ = self.progress_wanted.notified() => watch.request_progress(),
            }
        }
    }

    fn apply(&self, events: Vec<StoreEvent>, progress: Revision) {
        let dictionary = self.inner.read().dictionary.clone();
        let mut applied = Vec::with_capacity(events.len());
        for event in events {
            let revision = event.kv.mod_revision;
            let primed = match event.kind {
                EventKind::Put => self
                    .primed
                    .lock()
                    .remove(&revision)
                    .filter(|o| *o.key == cache_key(self.def, &event.kv.key)),
                EventKind::Delete => None,
            };
            let built = match event.kind {
                EventKind::Put if primed.is_some() => primed,
                EventKind::Put => match decode(self.def, &event.kv) {
                    Ok((value, rev)) => Some(Arc::new(CachedObject::new(
                        self.def,
                        &value,
                        rev,
                        dictionary.as_ref(),
                    ))),
                    Err(err) => {
                        tracing::error!(resource = self.def.plural, key = %event.kv.key, error = %err, "skipping undecodable stored object");
                        None
                    }
                },
                EventKind::Delete => None,
            };
            applied.push((event.kind, revision, event.kv.key, built));
        }
        let mut inner = self.inner.write();
        for (kind, revision, store_key, built) in applied {
            if revision <= inner.revision {
                continue;
            }
            let key = cache_key(self.def, &store_key);
            let prev = inner.objects.get(key.as_str()).cloned();
            let event = match (kind, built, prev) {
                (EventKind::Put, Some(obj), prev) => {
                    inner.objects.insert(obj.key.clone(), obj.clone());
                    CacheEvent {
                        kind: if prev.is_some() {
                            EventType::Modified
                        } else {
                            EventType::Added
                        },
                        revision,
                        object: obj,
                        prev,
                        prev_at_revision: OnceLock::new(),
                    }
                }
                (EventKind::Delete, _, Some(prev)) => {
                    inner.objects.remove(key.as_str());
                    let mut value = prev.value();
                    meta::set_meta(
                        &mut value,
                        "resourceVersion",
                        Value::String(revision.to_string()),
                    );
                    CacheEvent {
                        kind: EventType::Deleted,
                        revision,
                        object: Arc::new(CachedObject::new(
                            self.def,
                            &value,
                            revision,
                            dictionary.as_ref(),
                        )),
                        prev: Some(prev),
                        prev_at_revision: OnceLock::new(),
                    }
                }
                _ => {
                    inner.revision = revision;
                    continue;
                }
            };
            inner.revision = revision;
            let event = Arc::new(event);
            self.dispatch(&mut inner, &event);
            inner.events.push_back(event);
            while inner.events.len() > self.options.window {
                if let Some(dropped) = inner.events.pop_front() {
                    inner.oldest = dropped.revision;
                }
            }
        }
        if progress > inner.revision {
            inner.revision = progress;
        }
        let revision = inner.revision;
        drop(inner);
        self.revision.send_replace(revision);
    }

    fn dispatch(&self, inner: &mut Inner, event: &Arc<CacheEvent>) {
        if inner.watchers.is_empty() {
            return;
        }
        let mut frames: [Option<Bytes>; 3] = [None, None, None];
        let mut slow = Vec::new();
        for (id, slot) in &inner.watchers {
            let Some(seen) = event.seen_by(self.def, &slot.filter) else {
                continue;
            };
            let index = seen as usize;
            let frame_bytes = frames[index]
                .get_or_insert_with(|| frame(seen, &event.object_json(seen)))
                .clone();
            let item = WatchItem {
                event: event.clone(),
                seen,
                frame: frame_bytes,
            };
            match slot.tx.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => slow.push(*id),
                Err(mpsc::error::TrySendError::Closed(_)) => slow.push(*id),
            }
        }
        for id in slow {
            if inner.watchers.remove(&id).is_some() {
                self.metrics
                    .watchers
                    .get_or_create(&self.metric_labels())
                    .dec();
                self.metrics
                    .watchers_dropped
                    .get_or_create(&self.metric_labels())
                    .inc();
            }
        }
    }

    fn training_due(&self) -> bool {
        let inner = self.inner.read();
        inner.objects.len() >= TRAIN_MIN.max(inner.trained_for.saturating_mul(RETRAIN_GROWTH))
            && !self.training.load(Ordering::Acquire)
    }

    /// Trains a compression dictionary on a sample of the cached objects, then compresses
    /// the objects still held uncompressed, a chunk at a time.
    async fn train(self: &Arc<Self>) {
        if self.training.swap(true, Ordering::AcqRel) {
            return;
        }
        let started = Instant::now();
        let (samples, count) = {
            let inner = self.inner.read();
            let count = inner.objects.len();
            let step = (count / TRAIN_SAMPLES).max(1);
            let samples: Vec<Bytes> = inner
                .objects
                .values()
                .step_by(step)
                .take(TRAIN_SAMPLES)
                .map(|o| o.json())
                .collect();
            (samples, count)
        };
        let dictionary = tokio::task::spawn_blocking(move || Dictionary::train(&samples))
            .await
            .ok()
            .flatten();
        {
            let mut inner = self.inner.write();
            inner.trained_for = count;
            if let Some(d) = &dictionary {
                inner.dictionary = Some(d.clone());
            }
        }
        if let Some(dictionary) = dictionary {
            let plain: Vec<Arc<CachedObject>> = self
                .inner
                .read()
                .objects
                .values()
                .filter(|o| !o.packed.is_compressed())
                .cloned()
                .collect();
            for chunk in plain.chunks(REPACK_CHUNK) {
                let d = dictionary.clone();
                let chunk = chunk.to_vec();
                let repacked = tokio::task::spawn_blocking(move || {
                    chunk
                        .into_iter()
                        .map(|o| {
                            let packed = Arc::new(o.repacked(&d));
                            (o, packed)
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
                let mut inner = self.inner.write();
                for (old, packed) in repacked {
                    // Only if nothing replaced the object meanwhile.
                    if inner
                        .objects
                        .get(&old.key)
                        .is_some_and(|current| Arc::ptr_eq(current, &old))
                    {
                        inner.objects.insert(old.key.clone(), packed);
                    }
                }
            }
            tracing::info!(
                resource = self.def.plural,
                objects = count,
                dictionary_bytes = dictionary.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "watch cache compression dictionary trained"
            );
        }
        self.training.store(false, Ordering::Release);
    }

    /// The number of objects cached.
    pub fn len(&self) -> usize {
        self.inner.read().objects.len()
    }

    /// Whether the cache holds no objects.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of registered watchers.
    pub fn watcher_count(&self) -> usize {
        self.inner.read().watchers.len()
    }
}

/// The cache key (`ns/name` or `name`) of a store key.
pub fn cache_key(def: &ResourceDef, store_key: &str) -> String {
    store_key
        .strip_prefix(&def.key_prefix())
        .unwrap_or(store_key)
        .to_string()
}

/// Decodes a stored object and sets its resourceVersion from the store's mod revision.
pub fn decode(def: &ResourceDef, kv: &KeyValue) -> Result<(Value, Revision), String> {
    let mut value: Value =
        serde_json::from_slice(&kv.value).map_err(|e| format!("{} {}: {e}", def.plural, kv.key))?;
    if !value.is_object() {
        return Err(format!("{} {}: not a JSON object", def.plural, kv.key));
    }
    meta::set_meta(
        &mut value,
        "resourceVersion",
        Value::String(kv.mod_revision.to_string()),
    );
    Ok((value, kv.mod_revision))
}
