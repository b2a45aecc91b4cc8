//! The watch cache: every object of one resource in memory, fed by one store watch, serving
//! lists and watches without touching the store.
//!
//! - Objects are kept as the JSON the store holds, so a list is a concatenation of byte
//!   strings, plus the labels and selectable fields pre-extracted for filtering. The store's
//!   JSON has no resourceVersion (it is the store's revision); it is spliced in as the object
//!   is rendered, which is also what lets a writer build the cached object before the store
//!   has assigned its revision.
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
    /// The object's JSON as stored: without its resourceVersion.
    packed: Packed,
    /// Where the resourceVersion goes in the JSON (see [`ResourceVersionSlot`]).
    slot: Option<ResourceVersionSlot>,
    /// Labels, then the kind's selectable field values (in `ResourceDef::field_selectors`
    /// order), as length-prefixed strings in one allocation.
    attrs: Box<[u8]>,
    labels: u16,
}

fn push_attr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Longest `"resourceVersion":"…",` field (an i64 has at most 20 characters).
const RV_FIELD_MAX: usize = 41;

/// Where the resourceVersion field goes in an object's stored JSON: just inside its
/// top-level `metadata` object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ResourceVersionSlot {
    /// Byte offset just after metadata's `{`.
    at: u32,
    /// Whether metadata has other fields, which the inserted one must be separated from.
    comma: bool,
}

impl ResourceVersionSlot {
    /// Finds the top-level `metadata` object of a JSON object; None when there is none.
    fn find(json: &[u8]) -> Option<Self> {
        let skip_space = |mut i: usize| {
            while json.get(i).is_some_and(u8::is_ascii_whitespace) {
                i += 1;
            }
            i
        };
        let mut depth = 0usize;
        let mut i = 0;
        while i < json.len() {
            match json[i] {
                b'"' => {
                    let start = i + 1;
                    i = start;
                    while i < json.len() && json[i] != b'"' {
                        i += if json[i] == b'\\' { 2 } else { 1 };
                    }
                    if depth == 1 && json.get(start..i) == Some(b"metadata") {
                        let colon = skip_space(i + 1);
                        if json.get(colon) == Some(&b':') {
                            let open = skip_space(colon + 1);
                            if json.get(open) != Some(&b'{') {
                                return None;
                            }
                            let next = skip_space(open + 1);
                            return Some(Self {
                                at: u32::try_from(open + 1).ok()?,
                                comma: json.get(next) != Some(&b'}'),
                            });
                        }
                    }
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
            i += 1;
        }
        None
    }

    /// The length of the field to insert.
    fn field_len(self, revision: Revision) -> usize {
        let digits = revision
            .unsigned_abs()
            .checked_ilog10()
            .map_or(1, |d| d as usize + 1);
        // The name, the colon and the value's quotes, then the value and the comma.
        "\"resourceVersion\":\"\"".len()
            + usize::from(revision < 0)
            + digits
            + usize::from(self.comma)
    }

    /// The field to insert.
    fn field(self, revision: Revision) -> Vec<u8> {
        let mut field = Vec::with_capacity(RV_FIELD_MAX);
        field.extend_from_slice(b"\"resourceVersion\":\"");
        field.extend_from_slice(revision.to_string().as_bytes());
        field.push(b'"');
        if self.comma {
            field.push(b',');
        }
        field
    }
}

impl CachedObject {
    /// Builds the cached form of an object: `stored` is its JSON as the store holds it
    /// (without resourceVersion), `obj` the same object decoded, for its labels and
    /// selectable fields.
    pub fn new(
        def: &ResourceDef,
        obj: &Value,
        stored: Bytes,
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
        Self::assemble(key, revision, stored, dictionary, attrs, labels)
    }

    fn assemble(
        key: Arc<str>,
        revision: Revision,
        stored: Bytes,
        dictionary: Option<&Arc<Dictionary>>,
        attrs: Vec<u8>,
        labels: u16,
    ) -> Self {
        Self {
            key,
            revision,
            slot: ResourceVersionSlot::find(&stored),
            packed: Packed::new(stored, dictionary),
            attrs: attrs.into_boxed_slice(),
            labels,
        }
    }

    /// Builds the cached form of a store record.
    pub fn from_stored(
        def: &ResourceDef,
        kv: &KeyValue,
        dictionary: Option<&Arc<Dictionary>>,
    ) -> Result<Self, String> {
        let mut value = parse_stored(def, kv)?;
        // Canopy never stores a resourceVersion; should a record hold one anyway, it must
        // not be rendered twice.
        let stored = if meta::remove_meta(&mut value, "resourceVersion").is_some() {
            Bytes::from(serde_json::to_vec(&value).unwrap_or_default())
        } else {
            kv.value.clone()
        };
        Ok(Self::new(def, &value, stored, kv.mod_revision, dictionary))
    }

    /// The same object at another revision (a deletion shows the last state at the
    /// deletion's revision).
    pub fn at_revision(&self, revision: Revision) -> Self {
        Self {
            key: self.key.clone(),
            revision,
            packed: self.packed.clone(),
            slot: self.slot,
            attrs: self.attrs.clone(),
            labels: self.labels,
        }
    }

    /// The object after a write that changed its stored JSON to `stored` and, of its
    /// labels and selectable fields, only `field` (name, new value): built from this one
    /// without decoding the new JSON.
    pub fn updated(
        &self,
        def: &ResourceDef,
        stored: Bytes,
        field: (&str, &str),
        dictionary: Option<&Arc<Dictionary>>,
    ) -> Self {
        let changed = def
            .field_selectors
            .iter()
            .position(|f| *f == field.0)
            .map(|i| 2 * self.labels as usize + i);
        let mut attrs = Vec::with_capacity(self.attrs.len() + field.1.len());
        for (i, attr) in self.attrs().enumerate() {
            push_attr(&mut attrs, if Some(i) == changed { field.1 } else { attr });
        }
        let key = self.key.clone();
        Self::assemble(key, self.revision, stored, dictionary, attrs, self.labels)
    }

    /// The same object packed with another dictionary.
    fn repacked(&self, dictionary: &Arc<Dictionary>) -> Self {
        Self {
            packed: Packed::new(self.packed.json(), Some(dictionary)),
            key: self.key.clone(),
            revision: self.revision,
            slot: self.slot,
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
        self.json_at(self.revision)
    }

    /// The object's JSON with `revision` as its resourceVersion.
    pub fn json_at(&self, revision: Revision) -> Bytes {
        let mut out = Vec::with_capacity(self.packed.len() + RV_FIELD_MAX);
        self.render(revision, &mut out);
        Bytes::from(out)
    }

    /// Appends the object's JSON to `out`.
    pub fn append_json(&self, out: &mut Vec<u8>) {
        self.render(self.revision, out);
    }

    fn render(&self, revision: Revision, out: &mut Vec<u8>) {
        let start = out.len();
        self.packed.append_to(out);
        self.splice_revision(out, start, revision);
    }

    /// Puts the resourceVersion field into the object's JSON that starts at `start` of `out`.
    fn splice_revision(&self, out: &mut Vec<u8>, start: usize, revision: Revision) {
        if let Some(slot) = self.slot {
            let at = start + slot.at as usize;
            if at <= out.len() {
                out.splice(at..at, slot.field(revision));
            }
        }
    }

    /// The object's JSON rendered from `stored`, its bytes as stored, which the caller has at
    /// hand: the same as [`CachedObject::json`] without unpacking.
    pub fn json_from_stored(&self, stored: &[u8]) -> Bytes {
        // A record that held a resourceVersion was packed re-encoded without it (see
        // `from_stored`): its stored bytes are not what the cache renders from.
        if stored.len() != self.packed.len() {
            return self.json();
        }
        let mut out = Vec::with_capacity(stored.len() + RV_FIELD_MAX);
        out.extend_from_slice(stored);
        self.splice_revision(&mut out, 0, self.revision);
        Bytes::from(out)
    }

    /// The JSON as stored, which is what a compression dictionary is trained on.
    pub fn stored_json(&self) -> Bytes {
        self.packed.json()
    }

    /// The length of the object's JSON.
    pub fn json_len(&self) -> usize {
        self.packed.len() + self.slot.map_or(0, |s| s.field_len(self.revision))
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

    /// The value of one of the kind's selectable fields.
    pub fn field(&self, def: &ResourceDef, name: &str) -> Option<String> {
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
                .get_or_init(|| match &self.prev {
                    Some(prev) => prev.json_at(self.revision),
                    None => self.object.json(),
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
    /// Objects this server is writing, by key, with the bytes written: built before their
    /// store event arrives so that the event need not be decoded (see [`WatchCache::prime`]).
    primed: parking_lot::Mutex<HashMap<Arc<str>, (Bytes, CachedObject)>>,
}

/// Most primed objects kept (writes that failed leave theirs until the key's next event);
/// beyond that the cache is far behind and decoding is fine.
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

    /// Builds the cached form of an object this server is about to write, `stored` being the
    /// bytes it hands the store. When the store's event carries the same bytes, the cache
    /// takes this instead of decoding the event: the work is done by the writer, in parallel
    /// with other writers, rather than by the one task that feeds the cache.
    pub fn prime(&self, obj: &Value, stored: &Bytes) {
        let dictionary = self.dictionary();
        let cached = CachedObject::new(self.def, obj, stored.clone(), 0, dictionary.as_ref());
        self.prime_object(cached, stored);
    }

    /// [`WatchCache::prime`] with the cached form already built.
    pub fn prime_object(&self, cached: CachedObject, stored: &Bytes) {
        let mut primed = self.primed.lock();
        if primed.len() >= PRIMED_LIMIT {
            primed.clear();
        }
        primed.insert(cached.key.clone(), (stored.clone(), cached));
    }

    /// The dictionary new objects are compressed with.
    pub fn dictionary(&self) -> Option<Arc<Dictionary>> {
        self.inner.read().dictionary.clone()
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
            match CachedObject::from_stored(self.def, kv, None) {
                Ok(obj) => {
                    objects.insert(obj.key.clone(), Arc::new(obj));
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
            let built = match event.kind {
                EventKind::Put => {
                    let primed = self
                        .primed
                        .lock()
                        .remove(cache_key(self.def, &event.kv.key).as_str())
                        .filter(|(stored, _)| *stored == event.kv.value);
                    match primed {
                        Some((_, mut obj)) => {
                            obj.revision = revision;
                            Some(Arc::new(obj))
                        }
                        None => match CachedObject::from_stored(
                            self.def,
                            &event.kv,
                            dictionary.as_ref(),
                        ) {
                            Ok(obj) => Some(Arc::new(obj)),
                            Err(err) => {
                                tracing::error!(resource = self.def.plural, key = %event.kv.key, error = %err, "skipping undecodable stored object");
                                None
                            }
                        },
                    }
                }
                EventKind::Delete => None,
            };
            applied.push((event.kind, revision, event.kv.key, built, event.kv.value));
        }
        let mut inner = self.inner.write();
        for (kind, revision, store_key, built, stored) in applied {
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
                    CacheEvent {
                        kind: EventType::Deleted,
                        revision,
                        object: Arc::new(prev.at_revision(revision)),
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
            // A put's frames are rendered from the stored bytes at hand, not unpacked again.
            let stored = (event.kind != EventType::Deleted).then_some(&stored[..]);
            self.dispatch(&mut inner, &event, stored);
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

    /// Queues an event for every watcher that sees it. `stored`: the event's object as
    /// stored, when at hand, to render frames from.
    fn dispatch(&self, inner: &mut Inner, event: &Arc<CacheEvent>, stored: Option<&[u8]>) {
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
                .get_or_insert_with(|| match (seen, stored) {
                    (EventType::Added | EventType::Modified, Some(stored)) => {
                        frame(seen, &event.object.json_from_stored(stored))
                    }
                    _ => frame(seen, &event.object_json(seen)),
                })
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
                .map(|o| o.stored_json())
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
    let mut value = parse_stored(def, kv)?;
    meta::set_meta(
        &mut value,
        "resourceVersion",
        Value::String(kv.mod_revision.to_string()),
    );
    Ok((value, kv.mod_revision))
}

fn parse_stored(def: &ResourceDef, kv: &KeyValue) -> Result<Value, String> {
    let value: Value =
        serde_json::from_slice(&kv.value).map_err(|e| format!("{} {}: {e}", def.plural, kv.key))?;
    if !value.is_object() {
        return Err(format!("{} {}: not a JSON object", def.plural, kv.key));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(json: &str) -> Option<(u32, bool)> {
        ResourceVersionSlot::find(json.as_bytes()).map(|s| (s.at, s.comma))
    }

    fn record(json: &str, revision: Revision) -> KeyValue {
        KeyValue {
            key: "/registry/pods/acme/web".into(),
            value: Bytes::from(json.to_string()),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
        }
    }

    #[test]
    fn finds_the_top_level_metadata_only() {
        assert_eq!(slot(r#"{"metadata":{}}"#), Some((13, false)));
        assert_eq!(slot(r#"{"metadata":{"name":"a"}}"#), Some((13, true)));
        assert_eq!(slot(r#"{ "metadata" : { } }"#), Some((16, false)));
        // "metadata" as a nested key, a value, and inside an escaped string come first.
        let tricky = r#"{"data":{"metadata":{"x":[1,{"metadata":{}}]}},"kind":"metadata","s":"\"metadata\":{","metadata":{"name":"b"}}"#;
        let (at, comma) = slot(tricky).unwrap();
        assert!(comma);
        assert_eq!(&tricky[at as usize..], r#""name":"b"}}"#);
        assert_eq!(slot(r#"{"kind":"Pod"}"#), None);
        assert_eq!(slot(r#"{"metadata":null}"#), None);
        assert_eq!(slot("not json"), None);
        for comma in [false, true] {
            let slot = ResourceVersionSlot { at: 0, comma };
            for revision in [0, 7, 10, 99, 100, 123_456, i64::MAX, -5] {
                assert_eq!(
                    slot.field_len(revision),
                    slot.field(revision).len(),
                    "{revision}"
                );
            }
        }
    }

    #[test]
    fn renders_the_revision_into_the_stored_json() {
        let registry = canopy_api::Registry::builtin();
        let def = registry.get("", "v1", "pods").unwrap();
        let json = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"labels":{"app":"web"},"name":"web","namespace":"acme"},"spec":{"nodeName":"n1"}}"#;
        let obj = CachedObject::from_stored(def, &record(json, 42), None).unwrap();
        let rendered: Value = serde_json::from_slice(&obj.json()).unwrap();
        let mut expected: Value = serde_json::from_str(json).unwrap();
        meta::set_meta(&mut expected, "resourceVersion", "42".into());
        assert_eq!(rendered, expected);
        assert_eq!(obj.json_len(), obj.json().len());
        assert_eq!(obj.stored_json(), json.as_bytes());
        assert_eq!(obj.label("app"), Some("web"));
        assert_eq!(obj.field(def, "spec.nodeName").as_deref(), Some("n1"));
        let later: Value = serde_json::from_slice(&obj.json_at(1234567)).unwrap();
        assert_eq!(meta::resource_version(&later), "1234567");
        let mut listed = b"[".to_vec();
        obj.append_json(&mut listed);
        listed.push(b',');
        obj.at_revision(43).append_json(&mut listed);
        listed.push(b']');
        let listed: Vec<Value> = serde_json::from_slice(&listed).unwrap();
        assert_eq!(meta::resource_version(&listed[1]), "43");

        // Compressed with a dictionary, it renders the same.
        let samples: Vec<Bytes> = (0..500)
            .map(|i| Bytes::from(json.replace("\"web\"", &format!("\"web-{i}\""))))
            .collect();
        let dictionary = Dictionary::train(&samples).unwrap();
        let packed = CachedObject::from_stored(def, &record(json, 42), Some(&dictionary)).unwrap();
        assert!(packed.packed.is_compressed());
        assert_eq!(packed.json(), obj.json());
        assert_eq!(packed.json_len(), obj.json_len());
        // Rendered from the stored bytes at hand, without unpacking, it is the same too.
        assert_eq!(packed.json_from_stored(json.as_bytes()), obj.json());
        assert_eq!(obj.json_from_stored(json.as_bytes()), obj.json());
    }

    #[test]
    fn a_stored_resource_version_is_not_rendered_twice() {
        let registry = canopy_api::Registry::builtin();
        let def = registry.get("", "v1", "pods").unwrap();
        let json =
            r#"{"kind":"Pod","metadata":{"name":"web","namespace":"acme","resourceVersion":"5"}}"#;
        let obj = CachedObject::from_stored(def, &record(json, 9), None).unwrap();
        let text = String::from_utf8(obj.json().to_vec()).unwrap();
        assert_eq!(text.matches("resourceVersion").count(), 1, "{text}");
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(meta::resource_version(&value), "9");
        // The watch feed renders events from the record's bytes; these are not what the
        // cache packed, so the object is rendered as cached.
        assert_eq!(obj.json_from_stored(json.as_bytes()), obj.json());
    }
}
