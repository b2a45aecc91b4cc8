//! Shared informers: one kube-rs watch per resource feeds a local cache (with secondary
//! indexes) and tells every registered handler what changed, as client-go's
//! `SharedIndexInformer` does.
//!
//! Handlers receive a [`Change`]: `Add` for an object the cache did not hold, `Update` with
//! the old and new object, `Delete`, and `Sync` for every cached object at each resync. A
//! controller maps a change to work queue keys in the change's [`Lane`], so that resyncs only
//! ever fill the SYNC lane. After a relist (a watch that expired), objects that vanished are
//! reported deleted, changed ones updated, and new ones added, like upstream's `Replace`.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt,
    sync::Arc,
    time::Duration,
};

use futures::{StreamExt, stream::BoxStream};
use kube::{
    Api, Resource, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use parking_lot::RwLock;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::{pace::Pacer, queue::Lane};

/// A namespaced (or cluster-scoped, with no namespace) object's name: the key of caches and
/// work queues.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// The namespace, `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    /// The name.
    pub name: String,
}

impl ObjectKey {
    /// The key of an object.
    pub fn of<K: Resource>(obj: &K) -> Self {
        Self {
            namespace: obj.meta().namespace.clone(),
            name: obj.meta().name.clone().unwrap_or_default(),
        }
    }

    /// A namespaced key.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: Some(namespace.to_string()),
            name: name.to_string(),
        }
    }

    /// A cluster-scoped key.
    pub fn cluster(name: &str) -> Self {
        Self {
            namespace: None,
            name: name.to_string(),
        }
    }

    /// The namespace, `""` for cluster-scoped objects.
    pub fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or("")
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// What happened to an object.
pub enum Change<K> {
    /// The cache did not hold it.
    Add(Arc<K>),
    /// It changed.
    Update {
        /// As cached before.
        old: Arc<K>,
        /// As now.
        new: Arc<K>,
    },
    /// It was deleted (the last state seen).
    Delete(Arc<K>),
    /// A periodic resync: nothing happened, look again.
    Sync(Arc<K>),
}

impl<K> Change<K> {
    /// The object as it is now (or was last, for deletions).
    pub fn object(&self) -> &Arc<K> {
        match self {
            Change::Add(obj) | Change::Delete(obj) | Change::Sync(obj) => obj,
            Change::Update { new, .. } => new,
        }
    }

    /// The work queue lane of work caused by this change.
    pub fn lane(&self) -> Lane {
        match self {
            Change::Add(_) => Lane::Add,
            Change::Update { .. } => Lane::Update,
            Change::Delete(_) => Lane::Delete,
            Change::Sync(_) => Lane::Sync,
        }
    }
}

type Handler<K> = Arc<dyn Fn(&Change<K>) + Send + Sync>;
type IndexFn<K> = Arc<dyn Fn(&K) -> Vec<String> + Send + Sync>;

struct Index<K> {
    values_of: IndexFn<K>,
    keys: HashMap<String, HashSet<ObjectKey>>,
}

struct Cache<K> {
    objects: HashMap<ObjectKey, Arc<K>>,
    indexes: HashMap<&'static str, Index<K>>,
}

impl<K> Cache<K> {
    fn unindex(&mut self, key: &ObjectKey, obj: &K) {
        for index in self.indexes.values_mut() {
            for value in (index.values_of)(obj) {
                if let Some(keys) = index.keys.get_mut(&value) {
                    keys.remove(key);
                    if keys.is_empty() {
                        index.keys.remove(&value);
                    }
                }
            }
        }
    }

    fn insert(&mut self, key: ObjectKey, obj: Arc<K>) -> Option<Arc<K>> {
        let old = self.objects.insert(key.clone(), obj.clone());
        if let Some(old) = &old {
            self.unindex(&key, old);
        }
        for index in self.indexes.values_mut() {
            for value in (index.values_of)(&obj) {
                index.keys.entry(value).or_default().insert(key.clone());
            }
        }
        old
    }

    fn remove(&mut self, key: &ObjectKey) -> Option<Arc<K>> {
        let old = self.objects.remove(key)?;
        self.unindex(key, &old);
        Some(old)
    }
}

struct Shared<K> {
    name: String,
    cache: RwLock<Cache<K>>,
    handlers: RwLock<Vec<Handler<K>>>,
    synced: watch::Sender<bool>,
    /// Whether any controller uses this informer (a handler, an index, or waiting for its
    /// cache): an informer nobody uses never watches.
    wanted: watch::Sender<bool>,
    /// Resyncs asked for so far; the run loop compares it with those done, so a request
    /// made while the loop is busy with an event is not lost.
    resync: watch::Sender<u64>,
    /// Resyncs delivered to the handlers so far.
    resyncs_done: std::sync::atomic::AtomicU64,
    /// The share of the time a resync's delivery may take (see [`crate::pace`]).
    resync_share: f64,
}

/// A watch of one resource shared by every controller that needs it: its cache, indexes and
/// handlers. Cloning gives another handle on the same informer.
pub struct Informer<K> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for Informer<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// The index every informer keeps: objects by namespace.
pub const BY_NAMESPACE: &str = "namespace";

impl<K> Informer<K>
where
    K: Resource + Clone + fmt::Debug + Send + Sync + 'static,
{
    /// An informer called `name` in logs; nothing is watched until [`Informer::run`].
    pub fn new(name: &str) -> Self {
        Self::with_resync_share(name, 1.0)
    }

    /// As [`Informer::new`], delivering resyncs in at most `share` of the time, in (0, 1].
    pub fn with_resync_share(name: &str, share: f64) -> Self {
        let mut indexes = HashMap::new();
        let by_namespace: IndexFn<K> =
            Arc::new(|obj: &K| obj.meta().namespace.clone().into_iter().collect());
        indexes.insert(
            BY_NAMESPACE,
            Index {
                values_of: by_namespace,
                keys: HashMap::new(),
            },
        );
        Self {
            shared: Arc::new(Shared {
                name: name.to_string(),
                cache: RwLock::new(Cache {
                    objects: HashMap::new(),
                    indexes,
                }),
                handlers: RwLock::new(Vec::new()),
                synced: watch::channel(false).0,
                wanted: watch::channel(false).0,
                resync: watch::channel(0).0,
                resyncs_done: std::sync::atomic::AtomicU64::new(0),
                resync_share: share,
            }),
        }
    }

    /// Adds a secondary index: `values_of` gives the index values of an object. Add indexes
    /// before running the informer.
    pub fn add_index(
        &self,
        name: &'static str,
        values_of: impl Fn(&K) -> Vec<String> + Send + Sync + 'static,
    ) {
        self.want();
        let mut cache = self.shared.cache.write();
        let values_of: IndexFn<K> = Arc::new(values_of);
        let mut keys: HashMap<String, HashSet<ObjectKey>> = HashMap::new();
        for (key, obj) in &cache.objects {
            for value in values_of(obj) {
                keys.entry(value).or_default().insert(key.clone());
            }
        }
        cache.indexes.insert(name, Index { values_of, keys });
    }

    /// Registers a handler of every change. Handlers run on the informer's task: they must
    /// be quick (queue keys, not call the API).
    pub fn add_handler(&self, handler: impl Fn(&Change<K>) + Send + Sync + 'static) {
        self.want();
        self.shared.handlers.write().push(Arc::new(handler));
    }

    /// The cached object of a key.
    pub fn get(&self, key: &ObjectKey) -> Option<Arc<K>> {
        self.shared.cache.read().objects.get(key).cloned()
    }

    fn want(&self) {
        self.shared
            .wanted
            .send_if_modified(|wanted| !std::mem::replace(wanted, true));
    }

    /// Every cached object.
    pub fn list(&self) -> Vec<Arc<K>> {
        self.shared.cache.read().objects.values().cloned().collect()
    }

    /// How many objects are cached.
    pub fn len(&self) -> usize {
        self.shared.cache.read().objects.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cached objects whose index `index` has `value`.
    pub fn by_index(&self, index: &str, value: &str) -> Vec<Arc<K>> {
        let cache = self.shared.cache.read();
        let Some(keys) = cache.indexes.get(index).and_then(|i| i.keys.get(value)) else {
            return Vec::new();
        };
        keys.iter()
            .filter_map(|key| cache.objects.get(key).cloned())
            .collect()
    }

    /// The cached objects of a namespace.
    pub fn in_namespace(&self, namespace: &str) -> Vec<Arc<K>> {
        self.by_index(BY_NAMESPACE, namespace)
    }

    /// Waits until the first list has been loaded into the cache.
    pub async fn wait_synced(&self) {
        self.want();
        let mut synced = self.shared.synced.subscribe();
        let _ = synced.wait_for(|s| *s).await;
    }

    /// Whether the first list has been loaded.
    pub fn has_synced(&self) -> bool {
        *self.shared.synced.borrow()
    }

    /// Reports every cached object to the handlers as a `Sync` change, now.
    pub fn resync(&self) {
        self.shared.resync.send_modify(|n| *n += 1);
    }

    /// How many resyncs have been delivered to every handler.
    pub fn resyncs_done(&self) -> u64 {
        self.shared
            .resyncs_done
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Once a controller uses the informer, watches `api` (all namespaces or one, as the
    /// `Api` was made) and keeps the cache and handlers current until the stream ends;
    /// resyncs every `resync_period` if given.
    pub async fn run(self, api: Api<K>, config: watcher::Config, resync_period: Option<Duration>)
    where
        K: DeserializeOwned,
        K::DynamicType: Default,
    {
        // Controllers that are not enabled leave their informers unused: no watch, no cache.
        let mut wanted = self.shared.wanted.subscribe();
        let _ = wanted.wait_for(|w| *w).await;
        let events = watcher(api, config).default_backoff().boxed();
        self.run_stream(events, resync_period).await;
    }

    /// As [`Informer::run`], on a stream of watch events.
    pub async fn run_stream(
        self,
        mut events: BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>,
        resync_period: Option<Duration>,
    ) {
        let mut relisted: Option<HashSet<ObjectKey>> = None;
        let mut resyncs = self.shared.resync.subscribe();
        let mut resync_timer = resync_period.map(|period| {
            let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            timer
        });
        // A resync is delivered in chunks between watch events, so that new objects keep
        // flowing to the controllers while every cached object is being reported, and paced,
        // so that it leaves the CPU to them.
        let mut pending: VecDeque<Arc<K>> = VecDeque::new();
        let mut pacer = Pacer::new(self.shared.resync_share);
        // Watch events go first, but a chunk of a resync still goes after every so many, so
        // that a busy watch cannot postpone a resync for ever.
        let mut events_since_chunk = 0usize;
        loop {
            let paused_until = pacer.paused_until();
            if !pending.is_empty() && paused_until.is_none() && events_since_chunk >= 64 {
                events_since_chunk = 0;
                self.sync_some(&mut pending, &mut pacer);
                tokio::task::yield_now().await;
                continue;
            }
            let periodic = async {
                match resync_timer.as_mut() {
                    Some(timer) => {
                        timer.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let pause = async {
                match paused_until {
                    Some(until) => tokio::time::sleep_until(until).await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                biased;
                event = events.next() => event,
                _ = periodic => { pending = self.snapshot(); continue; }
                _ = resyncs.changed() => { pending = self.snapshot(); continue; }
                _ = std::future::ready(()), if !pending.is_empty() && paused_until.is_none() => {
                    events_since_chunk = 0;
                    self.sync_some(&mut pending, &mut pacer);
                    tokio::task::yield_now().await;
                    continue;
                }
                _ = pause, if !pending.is_empty() => continue,
            };
            let Some(event) = event else { break };
            events_since_chunk += 1;
            match event {
                Ok(watcher::Event::Init) => relisted = Some(HashSet::new()),
                Ok(watcher::Event::InitApply(obj)) => {
                    let key = ObjectKey::of(&obj);
                    if let Some(seen) = relisted.as_mut() {
                        seen.insert(key.clone());
                    }
                    self.apply(key, obj);
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(seen) = relisted.take() {
                        let gone: Vec<ObjectKey> = self
                            .shared
                            .cache
                            .read()
                            .objects
                            .keys()
                            .filter(|k| !seen.contains(k))
                            .cloned()
                            .collect();
                        for key in gone {
                            self.delete(&key);
                        }
                    }
                    self.shared.synced.send_replace(true);
                }
                Ok(watcher::Event::Apply(obj)) => self.apply(ObjectKey::of(&obj), obj),
                Ok(watcher::Event::Delete(obj)) => self.delete(&ObjectKey::of(&obj)),
                Err(err) => {
                    tracing::warn!(informer = %self.shared.name, error = %err, "watch failed; retrying");
                }
            }
        }
    }

    fn apply(&self, key: ObjectKey, obj: K) {
        let obj = Arc::new(obj);
        let old = self.shared.cache.write().insert(key, obj.clone());
        let change = match old {
            Some(old) => {
                if old.resource_version().is_some()
                    && old.resource_version() == obj.resource_version()
                {
                    return;
                }
                Change::Update { old, new: obj }
            }
            None => Change::Add(obj),
        };
        self.notify(&change);
    }

    fn delete(&self, key: &ObjectKey) {
        let old = self.shared.cache.write().remove(key);
        if let Some(old) = old {
            self.notify(&Change::Delete(old));
        }
    }

    /// The objects a resync reports. Pointers only: a copy of every key would be an
    /// allocation burst of its own, at once, on the thread that new objects need.
    fn snapshot(&self) -> VecDeque<Arc<K>> {
        let objects: VecDeque<Arc<K>> =
            self.shared.cache.read().objects.values().cloned().collect();
        tracing::debug!(informer = %self.shared.name, objects = objects.len(), "resync");
        objects
    }

    /// Reports the next chunk of a resync, each object as cached now.
    fn sync_some(&self, pending: &mut VecDeque<Arc<K>>, pacer: &mut Pacer) {
        const CHUNK: usize = 256;
        let started = std::time::Instant::now();
        for snapshot in pending.drain(..CHUNK.min(pending.len())) {
            if let Some(obj) = self.get(&ObjectKey::of(snapshot.as_ref())) {
                self.notify(&Change::Sync(obj));
            }
        }
        pacer.worked(started.elapsed());
        if pending.is_empty() {
            self.shared
                .resyncs_done
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
    }

    fn notify(&self, change: &Change<K>) {
        // Called for every event: no copy of the handler list. Handlers only queue keys, and
        // never register handlers, so holding the read lock through them is safe.
        for handler in self.shared.handlers.read().iter() {
            handler(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use k8s_openapi::api::core::v1::ConfigMap;
    use parking_lot::Mutex;
    use tokio::sync::mpsc;

    use super::*;

    fn cm(name: &str, rv: &str) -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}
        }))
        .unwrap()
    }

    type Sender = mpsc::UnboundedSender<Result<watcher::Event<ConfigMap>, watcher::Error>>;

    fn start(informer: &Informer<ConfigMap>) -> Sender {
        let (tx, rx) = mpsc::unbounded_channel();
        let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed();
        tokio::spawn(informer.clone().run_stream(events, None));
        tx
    }

    fn record(informer: &Informer<ConfigMap>) -> Arc<Mutex<Vec<String>>> {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = seen.clone();
        informer.add_handler(move |change| {
            let name = change.object().metadata.name.clone().unwrap_or_default();
            log.lock().push(format!("{}:{name}", change.lane()));
        });
        seen
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn changes_follow_the_cache_and_a_relist_reports_what_changed() {
        let informer = Informer::<ConfigMap>::new("test");
        informer.add_index("first-letter", |c: &ConfigMap| {
            vec![c.metadata.name.clone().unwrap_or_default()[..1].to_string()]
        });
        let seen = record(&informer);
        let tx = start(&informer);
        tx.send(Ok(watcher::Event::Init)).unwrap();
        tx.send(Ok(watcher::Event::InitApply(cm("a1", "1"))))
            .unwrap();
        tx.send(Ok(watcher::Event::InitApply(cm("b1", "2"))))
            .unwrap();
        tx.send(Ok(watcher::Event::InitDone)).unwrap();
        informer.wait_synced().await;
        tx.send(Ok(watcher::Event::Apply(cm("a1", "3")))).unwrap();
        tx.send(Ok(watcher::Event::Apply(cm("a1", "3")))).unwrap();
        tx.send(Ok(watcher::Event::Delete(cm("b1", "2")))).unwrap();
        settle().await;
        assert_eq!(
            *seen.lock(),
            vec!["add:a1", "add:b1", "update:a1", "delete:b1"],
            "an event with an unchanged resourceVersion is not reported"
        );
        assert_eq!(informer.by_index("first-letter", "a").len(), 1);
        assert!(informer.by_index("first-letter", "b").is_empty());

        // A relist: a1 changed, a2 is new, and a1's sibling b2 vanished meanwhile.
        tx.send(Ok(watcher::Event::Apply(cm("b2", "4")))).unwrap();
        tx.send(Ok(watcher::Event::Init)).unwrap();
        tx.send(Ok(watcher::Event::InitApply(cm("a1", "5"))))
            .unwrap();
        tx.send(Ok(watcher::Event::InitApply(cm("a2", "6"))))
            .unwrap();
        tx.send(Ok(watcher::Event::InitDone)).unwrap();
        settle().await;
        assert_eq!(
            seen.lock()[4..],
            ["add:b2", "update:a1", "add:a2", "delete:b2"]
        );
        assert_eq!(informer.in_namespace("ns").len(), 2);
        assert_eq!(informer.by_index("first-letter", "a").len(), 2);
    }

    #[tokio::test]
    async fn a_paced_resync_pauses_but_watch_events_do_not() {
        const OBJECTS: usize = 600;
        let informer = Informer::<ConfigMap>::with_resync_share("test", 0.1);
        let syncs = Arc::new(AtomicUsize::new(0));
        let added: Arc<Mutex<Option<usize>>> = Arc::default();
        {
            let (syncs, added) = (syncs.clone(), added.clone());
            informer.add_handler(move |change| match change {
                Change::Sync(_) => {
                    // A handler with some work to do, so that chunks earn pauses.
                    std::thread::sleep(Duration::from_micros(100));
                    syncs.fetch_add(1, Ordering::SeqCst);
                }
                Change::Add(obj) if obj.metadata.name.as_deref() == Some("late") => {
                    *added.lock() = Some(syncs.load(Ordering::SeqCst));
                }
                _ => {}
            });
        }
        let tx = start(&informer);
        tx.send(Ok(watcher::Event::Init)).unwrap();
        for i in 0..OBJECTS {
            tx.send(Ok(watcher::Event::InitApply(cm(&format!("c{i}"), "1"))))
                .unwrap();
        }
        tx.send(Ok(watcher::Event::InitDone)).unwrap();
        informer.wait_synced().await;

        let started = std::time::Instant::now();
        informer.resync();
        settle().await;
        tx.send(Ok(watcher::Event::Apply(cm("late", "2")))).unwrap();
        while informer.resyncs_done() == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the resync ended"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(syncs.load(Ordering::SeqCst), OBJECTS);
        let seen_after = added.lock().expect("the new object was reported");
        assert!(
            seen_after < OBJECTS,
            "the new object waited for the whole resync"
        );
        // 60 ms of handler work at a tenth of the time.
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "the resync was not paced: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_resync_asked_for_during_a_stream_of_events_is_not_lost() {
        let informer = Informer::<ConfigMap>::new("test");
        let syncs = Arc::new(AtomicUsize::new(0));
        {
            let syncs = syncs.clone();
            informer.add_handler(move |change| {
                if let Change::Sync(_) = change {
                    syncs.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        let tx = start(&informer);
        tx.send(Ok(watcher::Event::Init)).unwrap();
        tx.send(Ok(watcher::Event::InitDone)).unwrap();
        informer.wait_synced().await;
        for round in 0..50 {
            for i in 0..20 {
                let rv = (round * 20 + i + 1).to_string();
                tx.send(Ok(watcher::Event::Apply(cm(&format!("c{i}"), &rv))))
                    .unwrap();
            }
            if round == 10 {
                informer.resync();
            }
            tokio::task::yield_now().await;
        }
        settle().await;
        assert_eq!(
            syncs.load(Ordering::SeqCst),
            20,
            "one Sync per cached object"
        );
    }
}
