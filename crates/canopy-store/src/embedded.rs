//! The embedded store: one redb file, written by one thread that commits concurrent writes
//! together.
//!
//! Layout (three redb tables):
//! - `log`: revision → record. Every write appends one record: put or delete, the key, its
//!   create revision and version, the revision it replaced (`prev`), and the value. A key's
//!   current value is the record its `index` entry points to, so values are stored once.
//! - `index`: key → the modification revision (where its current record is), create revision
//!   and version of each live key. An update needs only this entry, not the record it
//!   replaces, so it reads no value: with many keys, the record is usually not in the page
//!   cache and reading it cost a disk read per write.
//! - `meta`: the current and the compacted revision.
//!
//! Stores written before `index` existed have `keys` (key → revision) instead; opening one
//! builds `index` from it and the log, once.
//!
//! Compacting to revision C removes, for every record r below C, the record r replaced (it is
//! superseded at a revision below C) and r itself when r is a deletion: what remains is, per
//! key, the newest record below C plus everything since, which is what etcd keeps.
//!
//! Durability: a write is acknowledged only after the transaction holding it committed with
//! `Durability::Immediate` (fsync). Writers that arrive while a commit is in flight wait for
//! the next one and share it (group commit), so throughput grows with concurrency instead of
//! being bounded by the disk's fsync rate.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::{
    Error, Event, EventKind, KeyValue, Outcome, RangeRequest, RangeResponse, Result, Revision,
    Store, Watch, WatchResponse,
};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// key → (modification revision, create revision, version).
const INDEX: TableDefinition<&str, (u64, u64, u64)> = TableDefinition::new("index");
/// The index of stores written before `INDEX` existed: key → modification revision.
const LEGACY_KEYS: TableDefinition<&str, u64> = TableDefinition::new("keys");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// Tuning of the embedded store.
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// Most writes committed in one transaction.
    pub max_batch: usize,
    /// redb's page cache, in bytes.
    pub cache_bytes: usize,
    /// Log records removed per compaction transaction, so compaction never stalls writers
    /// for long.
    pub compaction_chunk: usize,
    /// Committed batches buffered for watchers before a slow watcher has to catch up from the
    /// log instead.
    pub watch_buffer: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            cache_bytes: 16 << 20,
            compaction_chunk: 10_000,
            watch_buffer: 4096,
        }
    }
}

/// A [`Store`] in a single redb file. See the module documentation.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    ops: std_mpsc::SyncSender<Op>,
    writer: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    db: Database,
    path: PathBuf,
    revision: AtomicI64,
    compacted: AtomicI64,
    commits: broadcast::Sender<Arc<Commit>>,
}

/// The events of one committed transaction, in revision order.
struct Commit {
    events: Vec<Event>,
    /// The store revision after the commit.
    revision: Revision,
}

enum Write {
    Create {
        key: String,
        value: Bytes,
    },
    Update {
        key: String,
        value: Bytes,
        expected: Revision,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
}

enum Op {
    Write(Write, oneshot::Sender<Result<Outcome>>),
    Compact(Revision, oneshot::Sender<Result<()>>),
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path, options: EmbeddedOptions) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Database(format!("creating {}: {e}", dir.display())))?;
        }
        let started = Instant::now();
        let db = redb::Builder::new()
            .set_cache_size(options.cache_bytes)
            .create(path)
            .map_err(|e| Error::Database(format!("opening {}: {e}", path.display())))?;
        let (revision, compacted) = {
            let txn = db.begin_write().map_err(db_err)?;
            let (revision, compacted) = {
                // Opening creates the tables on first start.
                txn.open_table(LOG).map_err(db_err)?;
                txn.open_table(INDEX).map_err(db_err)?;
                migrate_legacy_keys(&txn)?;
                let meta = txn.open_table(META).map_err(db_err)?;
                (
                    read_meta(&meta, META_REVISION)?,
                    read_meta(&meta, META_COMPACTED)?,
                )
            };
            txn.commit().map_err(db_err)?;
            (revision, compacted)
        };
        tracing::info!(
            path = %path.display(),
            revision,
            compacted,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "opened embedded store"
        );
        let (commits, _) = broadcast::channel(options.watch_buffer);
        let shared = Arc::new(Shared {
            db,
            path: path.to_path_buf(),
            revision: AtomicI64::new(revision),
            compacted: AtomicI64::new(compacted),
            commits,
        });
        // Bounded so that a flood of writers queues in their tasks rather than in memory here.
        let (ops, receiver) = std_mpsc::sync_channel(options.max_batch * 4);
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || Writer::new(writer_shared, options).run(receiver))
            .map_err(|e| Error::Database(format!("starting writer thread: {e}")))?;
        Ok(Self {
            shared,
            ops,
            writer: Some(writer),
        })
    }

    async fn submit(&self, write: Write) -> Result<Outcome> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Write(write, reply)).await?;
        answer.await.map_err(|_| Error::Closed)?
    }

    async fn send(&self, op: Op) -> Result<()> {
        match self.ops.try_send(op) {
            Ok(()) => Ok(()),
            Err(std_mpsc::TrySendError::Disconnected(_)) => Err(Error::Closed),
            Err(std_mpsc::TrySendError::Full(op)) => {
                // The writer is saturated: wait for room off the async runtime.
                let ops = self.ops.clone();
                tokio::task::spawn_blocking(move || ops.send(op).map_err(|_| Error::Closed))
                    .await
                    .map_err(|_| Error::Closed)?
            }
        }
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| Error::Database(format!("read task failed: {e}")))?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer after it finishes what it has; joining it makes
        // sure the last commit is on disk before the process goes on to exit.
        let (dead, _) = std_mpsc::sync_channel(1);
        drop(std::mem::replace(&mut self.ops, dead));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Revision)> {
        let key = key.to_string();
        self.read(move |shared| {
            let txn = shared.db.begin_read().map_err(db_err)?;
            let index = txn.open_table(INDEX).map_err(db_err)?;
            let log = txn.open_table(LOG).map_err(db_err)?;
            let meta = txn.open_table(META).map_err(db_err)?;
            let revision = read_meta(&meta, META_REVISION)?;
            let kv = match index.get(key.as_str()).map_err(db_err)? {
                Some(entry) => {
                    let (rev, _, _) = entry.value();
                    Some(load(&log, rev)?.into_kv(rev))
                }
                None => None,
            };
            Ok((kv, revision))
        })
        .await
    }

    async fn range(&self, request: RangeRequest) -> Result<RangeResponse> {
        self.read(move |shared| {
            let txn = shared.db.begin_read().map_err(db_err)?;
            let index = txn.open_table(INDEX).map_err(db_err)?;
            let log = txn.open_table(LOG).map_err(db_err)?;
            let meta = txn.open_table(META).map_err(db_err)?;
            let current = read_meta(&meta, META_REVISION)?;
            let compacted = read_meta(&meta, META_COMPACTED)?;
            match request.revision {
                Some(rev) if rev > current => return Err(Error::FutureRevision(rev)),
                Some(rev) if rev > 0 && rev <= compacted => {
                    return Err(Error::Compacted {
                        requested: rev,
                        compacted,
                    });
                }
                Some(rev) if rev > 0 && rev < current => {
                    return range_at(&index, &log, &request, rev);
                }
                _ => {}
            }
            let start = request.start_after.as_deref().unwrap_or(&request.prefix);
            let mut kvs = Vec::new();
            let mut more = false;
            let mut count = 0;
            for entry in index.range::<&str>(start..).map_err(db_err)? {
                let (key, entry) = entry.map_err(db_err)?;
                let key = key.value();
                if !key.starts_with(request.prefix.as_str()) {
                    break;
                }
                if request.start_after.as_deref() == Some(key) {
                    continue;
                }
                count += 1;
                if request.limit > 0 && kvs.len() == request.limit {
                    // Past the page only keys are counted, not loaded.
                    more = true;
                    continue;
                }
                let (rev, _, _) = entry.value();
                kvs.push(load(&log, rev)?.into_kv(rev));
            }
            Ok(RangeResponse {
                kvs,
                more,
                count,
                revision: current,
            })
        })
        .await
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Outcome> {
        self.submit(Write::Create {
            key: key.to_string(),
            value,
        })
        .await
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Outcome> {
        self.submit(Write::Update {
            key: key.to_string(),
            value,
            expected,
        })
        .await
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<Outcome> {
        self.submit(Write::Delete {
            key: key.to_string(),
            expected,
        })
        .await
    }

    async fn watch(&self, prefix: &str, start: Revision) -> Result<Watch> {
        let compacted = self.shared.compacted.load(Ordering::Acquire);
        if start <= compacted {
            return Err(Error::Compacted {
                requested: start,
                compacted,
            });
        }
        let (tx, rx) = mpsc::channel(64);
        let (progress_tx, progress_rx) = mpsc::channel(1);
        let watcher = Watcher {
            shared: self.shared.clone(),
            prefix: prefix.to_string(),
            next: start.max(1),
            tx,
            progress: progress_rx,
        };
        tokio::spawn(watcher.run());
        Ok(Watch::new(rx, progress_tx))
    }

    async fn current_revision(&self) -> Result<Revision> {
        Ok(self.shared.revision.load(Ordering::Acquire))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Compact(revision, reply)).await?;
        answer.await.map_err(|_| Error::Closed)?
    }

    fn describe(&self) -> String {
        format!("embedded:{}", self.shared.path.display())
    }
}

/// A range read at a past revision: the current keys, each walked back along its `prev`
/// chain, plus keys deleted since, found in the log after the revision.
fn range_at(
    index: &impl ReadableTable<&'static str, (u64, u64, u64)>,
    log: &impl ReadableTable<u64, &'static [u8]>,
    request: &RangeRequest,
    revision: Revision,
) -> Result<RangeResponse> {
    let in_range = |key: &str| {
        key.starts_with(request.prefix.as_str())
            && request
                .start_after
                .as_deref()
                .is_none_or(|after| key > after)
    };
    let mut found = std::collections::BTreeMap::new();
    let start = request.start_after.as_deref().unwrap_or(&request.prefix);
    for entry in index.range::<&str>(start..).map_err(db_err)? {
        let (key, entry) = entry.map_err(db_err)?;
        let key = key.value();
        if !key.starts_with(request.prefix.as_str()) {
            break;
        }
        if in_range(key)
            && let Some((rev, record)) = record_at(log, entry.value().0, revision)?
        {
            found.insert(key.to_string(), record.into_kv(rev));
        }
    }
    // Keys deleted after `revision` are not in the index but existed then.
    for entry in log.range((revision as u64 + 1)..).map_err(db_err)? {
        let (_, bytes) = entry.map_err(db_err)?;
        let record = Record::decode(bytes.value())?;
        if record.kind == EventKind::Delete
            && in_range(&record.key)
            && !found.contains_key(&record.key)
            && let Some((rev, record)) = record_at(log, record.prev, revision)?
        {
            found.insert(record.key.clone(), record.into_kv(rev));
        }
    }
    let mut kvs: Vec<KeyValue> = found.into_values().collect();
    let count = kvs.len();
    let more = request.limit > 0 && kvs.len() > request.limit;
    if more {
        kvs.truncate(request.limit);
    }
    Ok(RangeResponse {
        kvs,
        more,
        count,
        revision,
    })
}

/// The put record of a key that was current at `revision`, walking back from `rev`.
fn record_at(
    log: &impl ReadableTable<u64, &'static [u8]>,
    mut rev: u64,
    revision: Revision,
) -> Result<Option<(u64, Record)>> {
    while rev > 0 {
        let Some(bytes) = log.get(rev).map_err(db_err)? else {
            return Ok(None);
        };
        let record = Record::decode(bytes.value())?;
        if rev as Revision <= revision {
            return Ok((record.kind == EventKind::Put).then_some((rev, record)));
        }
        rev = record.prev;
    }
    Ok(None)
}

/// One log record. See the module documentation.
struct Record {
    kind: EventKind,
    key: String,
    create_revision: u64,
    version: u64,
    /// The record this one replaced (0: none).
    prev: u64,
    value: Bytes,
}

const HEADER: usize = 1 + 8 + 8 + 8 + 4;

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.key.len() + self.value.len());
        out.push(match self.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        out.extend_from_slice(&self.create_revision.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.prev.to_le_bytes());
        out.extend_from_slice(&(self.key.len() as u32).to_le_bytes());
        out.extend_from_slice(self.key.as_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        let corrupt = |what: &str| Error::Corrupt(format!("log record: {what}"));
        if bytes.len() < HEADER {
            return Err(corrupt("too short"));
        }
        let kind = match bytes[0] {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            _ => return Err(corrupt("unknown kind")),
        };
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        let key_len = u32::from_le_bytes(bytes[25..29].try_into().unwrap_or([0; 4])) as usize;
        if bytes.len() < HEADER + key_len {
            return Err(corrupt("key beyond end"));
        }
        let key = std::str::from_utf8(&bytes[HEADER..HEADER + key_len])
            .map_err(|_| corrupt("key is not UTF-8"))?
            .to_string();
        Ok(Record {
            kind,
            key,
            create_revision: u64_at(1),
            version: u64_at(9),
            prev: u64_at(17),
            value: Bytes::copy_from_slice(&bytes[HEADER + key_len..]),
        })
    }

    fn into_kv(self, revision: u64) -> KeyValue {
        KeyValue {
            key: self.key,
            value: self.value,
            create_revision: self.create_revision as Revision,
            mod_revision: revision as Revision,
            version: self.version as i64,
        }
    }
}

fn load(log: &impl ReadableTable<u64, &'static [u8]>, rev: u64) -> Result<Record> {
    match log.get(rev).map_err(db_err)? {
        Some(bytes) => Record::decode(bytes.value()),
        None => Err(Error::Corrupt(format!(
            "key points at missing revision {rev}"
        ))),
    }
}

fn read_meta(meta: &impl ReadableTable<&'static str, u64>, name: &str) -> Result<Revision> {
    Ok(meta
        .get(name)
        .map_err(db_err)?
        .map(|v| v.value())
        .unwrap_or(0) as Revision)
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::Database(e.to_string())
}

/// Callers waiting for a compaction to finish.
type Waiters = Vec<oneshot::Sender<Result<()>>>;

/// The single writer. Owns every write transaction.
struct Writer {
    shared: Arc<Shared>,
    options: EmbeddedOptions,
    /// A compaction in progress: target revision, where it got to, and who waits for it.
    compaction: Option<(u64, u64, Waiters)>,
}

impl Writer {
    fn new(shared: Arc<Shared>, options: EmbeddedOptions) -> Self {
        Self {
            shared,
            options,
            compaction: None,
        }
    }

    fn run(mut self, ops: std_mpsc::Receiver<Op>) {
        loop {
            // Block for work unless a compaction has chunks left to do.
            let first = if self.compaction.is_some() {
                match ops.try_recv() {
                    Ok(op) => Some(op),
                    Err(std_mpsc::TryRecvError::Empty) => None,
                    Err(std_mpsc::TryRecvError::Disconnected) => return,
                }
            } else {
                match ops.recv() {
                    Ok(op) => Some(op),
                    Err(_) => return,
                }
            };
            let mut batch = Vec::new();
            let push = |op: Op, batch: &mut Vec<_>, this: &mut Self| match op {
                Op::Write(write, reply) => batch.push((write, reply)),
                Op::Compact(rev, reply) => this.start_compaction(rev, reply),
            };
            if let Some(op) = first {
                push(op, &mut batch, &mut self);
                while batch.len() < self.options.max_batch {
                    match ops.try_recv() {
                        Ok(op) => push(op, &mut batch, &mut self),
                        Err(_) => break,
                    }
                }
            }
            if !batch.is_empty() {
                self.commit(batch);
            }
            if self.compaction.is_some() {
                self.compact_chunk();
            }
        }
    }

    fn commit(&mut self, batch: Vec<(Write, oneshot::Sender<Result<Outcome>>)>) {
        let started = revision_now(&self.shared);
        let result = (|| -> Result<(Vec<Result<Outcome>>, Vec<Event>, Revision)> {
            let mut txn = self.shared.db.begin_write().map_err(db_err)?;
            txn.set_durability(Durability::Immediate).map_err(db_err)?;
            let mut outcomes = Vec::with_capacity(batch.len());
            let mut events = Vec::new();
            let mut revision = started;
            {
                let mut log = txn.open_table(LOG).map_err(db_err)?;
                let mut index = txn.open_table(INDEX).map_err(db_err)?;
                for (write, _) in &batch {
                    let outcome = apply(&mut log, &mut index, write, revision + 1);
                    if let Ok((Outcome::Committed(_), Some(event))) = &outcome {
                        revision += 1;
                        events.push(event.clone());
                    }
                    outcomes.push(outcome.map(|(outcome, _)| outcome));
                }
                let mut meta = txn.open_table(META).map_err(db_err)?;
                meta.insert(META_REVISION, revision as u64)
                    .map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            Ok((outcomes, events, revision))
        })();
        match result {
            Ok((outcomes, events, revision)) => {
                self.shared.revision.store(revision, Ordering::Release);
                if !events.is_empty() {
                    // No receivers is fine: nobody watches yet.
                    let _ = self
                        .shared
                        .commits
                        .send(Arc::new(Commit { events, revision }));
                }
                for ((_, reply), outcome) in batch.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(err) => {
                tracing::error!(error = %err, writes = batch.len(), "store commit failed");
                for (_, reply) in batch {
                    let _ = reply.send(Err(Error::Database(err.to_string())));
                }
            }
        }
    }

    fn start_compaction(&mut self, target: Revision, reply: oneshot::Sender<Result<()>>) {
        let current = self.shared.revision.load(Ordering::Acquire);
        let compacted = self.shared.compacted.load(Ordering::Acquire);
        if target > current {
            let _ = reply.send(Err(Error::FutureRevision(target)));
            return;
        }
        if target <= compacted {
            let _ = reply.send(Err(Error::Compacted {
                requested: target,
                compacted,
            }));
            return;
        }
        match &mut self.compaction {
            Some((running, _, waiters)) if *running as Revision >= target => waiters.push(reply),
            Some((running, _, waiters)) => {
                *running = target as u64;
                waiters.push(reply);
            }
            None => self.compaction = Some((target as u64, compacted as u64 + 1, vec![reply])),
        }
    }

    /// Removes the superseded records of one chunk of the log below the compaction target.
    fn compact_chunk(&mut self) {
        let Some((target, from, _)) = &self.compaction else {
            return;
        };
        let (target, from) = (*target, *from);
        let chunk = self.options.compaction_chunk;
        let result = (|| -> Result<u64> {
            let mut txn = self.shared.db.begin_write().map_err(db_err)?;
            txn.set_durability(Durability::Immediate).map_err(db_err)?;
            let reached;
            {
                let mut log = txn.open_table(LOG).map_err(db_err)?;
                let mut doomed = Vec::new();
                let mut last = from;
                for entry in log.range(from..target).map_err(db_err)?.take(chunk) {
                    let (rev, bytes) = entry.map_err(db_err)?;
                    let record = Record::decode(bytes.value())?;
                    if record.prev > 0 {
                        doomed.push(record.prev);
                    }
                    if record.kind == EventKind::Delete {
                        doomed.push(rev.value());
                    }
                    last = rev.value();
                }
                let done = last + 1 >= target || doomed.is_empty() && last == from;
                for rev in doomed {
                    log.remove(rev).map_err(db_err)?;
                }
                reached = if done { target } else { last + 1 };
                let mut meta = txn.open_table(META).map_err(db_err)?;
                meta.insert(META_COMPACTED, reached - 1).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            Ok(reached)
        })();
        match result {
            Ok(reached) => {
                self.shared
                    .compacted
                    .store(reached as Revision - 1, Ordering::Release);
                if reached >= target {
                    if let Some((_, _, waiters)) = self.compaction.take() {
                        for waiter in waiters {
                            let _ = waiter.send(Ok(()));
                        }
                    }
                } else if let Some((_, from, _)) = &mut self.compaction {
                    *from = reached;
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "store compaction failed");
                if let Some((_, _, waiters)) = self.compaction.take() {
                    for waiter in waiters {
                        let _ = waiter.send(Err(Error::Database(err.to_string())));
                    }
                }
            }
        }
    }
}

fn revision_now(shared: &Shared) -> Revision {
    shared.revision.load(Ordering::Acquire)
}

/// Applies one write inside the batch transaction at revision `rev` (used only if it
/// commits). Returns the outcome and, when it commits, its event.
fn apply(
    log: &mut redb::Table<u64, &[u8]>,
    index: &mut redb::Table<&str, (u64, u64, u64)>,
    write: &Write,
    rev: Revision,
) -> Result<(Outcome, Option<Event>)> {
    let key = match write {
        Write::Create { key, .. } | Write::Update { key, .. } | Write::Delete { key, .. } => key,
    };
    let current = index.get(key.as_str()).map_err(db_err)?.map(|e| e.value());
    let record = match (write, current) {
        (Write::Create { value, .. }, None) => Record {
            kind: EventKind::Put,
            key: key.clone(),
            create_revision: rev as u64,
            version: 1,
            prev: 0,
            value: value.clone(),
        },
        (
            Write::Update {
                value, expected, ..
            },
            Some((mod_revision, create_revision, version)),
        ) if mod_revision as Revision == *expected => Record {
            kind: EventKind::Put,
            key: key.clone(),
            create_revision,
            version: version + 1,
            prev: mod_revision,
            value: value.clone(),
        },
        (Write::Delete { expected, .. }, Some((mod_revision, create_revision, version)))
            if expected.is_none_or(|e| e == mod_revision as Revision) =>
        {
            Record {
                kind: EventKind::Delete,
                key: key.clone(),
                create_revision,
                version,
                prev: mod_revision,
                value: Bytes::new(),
            }
        }
        (_, current) => {
            let current = match current {
                Some((mod_revision, _, _)) => Some(load(log, mod_revision)?.into_kv(mod_revision)),
                None => None,
            };
            return Ok((Outcome::Conflict(current), None));
        }
    };
    log.insert(rev as u64, record.encode().as_slice())
        .map_err(db_err)?;
    let kind = record.kind;
    let outcome_kv = match kind {
        EventKind::Put => {
            index
                .insert(
                    key.as_str(),
                    (rev as u64, record.create_revision, record.version),
                )
                .map_err(db_err)?;
            record.into_kv(rev as u64)
        }
        EventKind::Delete => {
            index.remove(key.as_str()).map_err(db_err)?;
            // A deletion answers with the key as it was, at the deletion's revision.
            KeyValue {
                mod_revision: rev,
                ..load(log, record.prev)?.into_kv(record.prev)
            }
        }
    };
    let event_kv = match kind {
        EventKind::Put => outcome_kv.clone(),
        EventKind::Delete => KeyValue {
            value: Bytes::new(),
            ..outcome_kv.clone()
        },
    };
    Ok((
        Outcome::Committed(outcome_kv),
        Some(Event { kind, kv: event_kv }),
    ))
}

/// Builds `index` from a store written before it existed (key → revision in `keys`), taking
/// each key's create revision and version from its current record, then drops `keys`.
fn migrate_legacy_keys(txn: &redb::WriteTransaction) -> Result<()> {
    use redb::TableHandle;
    let legacy = txn
        .list_tables()
        .map_err(db_err)?
        .any(|table| table.name() == LEGACY_KEYS.name());
    if !legacy {
        return Ok(());
    }
    let started = Instant::now();
    let mut migrated = 0usize;
    {
        let keys = txn.open_table(LEGACY_KEYS).map_err(db_err)?;
        let log = txn.open_table(LOG).map_err(db_err)?;
        let mut index = txn.open_table(INDEX).map_err(db_err)?;
        for entry in keys.iter().map_err(db_err)? {
            let (key, rev) = entry.map_err(db_err)?;
            let rev = rev.value();
            let record = load(&log, rev)?;
            index
                .insert(key.value(), (rev, record.create_revision, record.version))
                .map_err(db_err)?;
            migrated += 1;
        }
    }
    txn.delete_table(LEGACY_KEYS).map_err(db_err)?;
    tracing::info!(
        keys = migrated,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "embedded store: built the key index from the previous format"
    );
    Ok(())
}

/// Feeds one watch: first from the log (history, or after falling behind), then from the
/// live broadcast of commits.
struct Watcher {
    shared: Arc<Shared>,
    prefix: String,
    /// The next revision to deliver.
    next: Revision,
    tx: mpsc::Sender<Result<WatchResponse>>,
    progress: mpsc::Receiver<()>,
}

/// Events delivered per response while catching up from the log.
const CATCH_UP_CHUNK: usize = 1000;

impl Watcher {
    async fn run(mut self) {
        // A progress request waits until every commit up to the revision current at request
        // time has been delivered.
        let mut progress_wanted: Option<Revision> = None;
        loop {
            // Subscribe before reading the log so that nothing committed in between is missed.
            let mut live = self.shared.commits.subscribe();
            match self.catch_up().await {
                Ok(true) => {}
                Ok(false) => return,
                Err(err) => {
                    let _ = self.tx.send(Err(err)).await;
                    return;
                }
            }
            loop {
                if let Some(target) = progress_wanted
                    && self.next > target
                {
                    progress_wanted = None;
                    let response = WatchResponse {
                        events: Vec::new(),
                        progress: self.next - 1,
                    };
                    if self.tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    commit = live.recv() => match commit {
                        Ok(commit) => {
                            if !self.deliver(&commit).await {
                                return;
                            }
                        }
                        // Fell behind the broadcast buffer: catch up from the log.
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    request = self.progress.recv() => {
                        if request.is_none() {
                            return;
                        }
                        let current = self.shared.revision.load(Ordering::Acquire);
                        progress_wanted = Some(progress_wanted.map_or(current, |t| t.max(current)));
                    }
                    _ = self.tx.closed() => return,
                }
            }
        }
    }

    /// Sends the events of one commit that fall under the prefix. Returns false when the
    /// receiver is gone.
    async fn deliver(&mut self, commit: &Commit) -> bool {
        if commit.revision < self.next {
            return true;
        }
        let events: Vec<Event> = commit
            .events
            .iter()
            .filter(|e| {
                e.kv.mod_revision >= self.next && e.kv.key.starts_with(self.prefix.as_str())
            })
            .cloned()
            .collect();
        self.next = commit.revision + 1;
        if events.is_empty() {
            return true;
        }
        let response = WatchResponse {
            events,
            progress: commit.revision,
        };
        self.tx.send(Ok(response)).await.is_ok()
    }

    /// Delivers the log from `next` to the current revision. Returns false when the receiver
    /// is gone.
    async fn catch_up(&mut self) -> Result<bool> {
        loop {
            let shared = self.shared.clone();
            let prefix = self.prefix.clone();
            let from = self.next;
            let (events, reached, done) =
                tokio::task::spawn_blocking(move || catch_up_chunk(&shared, &prefix, from))
                    .await
                    .map_err(|e| Error::Database(format!("watch catch-up task failed: {e}")))??;
            self.next = reached + 1;
            if !events.is_empty() {
                let response = WatchResponse {
                    events,
                    progress: reached,
                };
                if self.tx.send(Ok(response)).await.is_err() {
                    return Ok(false);
                }
            }
            if done {
                return Ok(true);
            }
        }
    }
}

/// Reads up to [`CATCH_UP_CHUNK`] matching events from revision `from`. Returns the events,
/// the revision read through, and whether that is the current revision.
fn catch_up_chunk(
    shared: &Shared,
    prefix: &str,
    from: Revision,
) -> Result<(Vec<Event>, Revision, bool)> {
    let txn = shared.db.begin_read().map_err(db_err)?;
    let log = txn.open_table(LOG).map_err(db_err)?;
    let meta = txn.open_table(META).map_err(db_err)?;
    let current = read_meta(&meta, META_REVISION)?;
    let compacted = read_meta(&meta, META_COMPACTED)?;
    if from <= compacted {
        return Err(Error::Compacted {
            requested: from,
            compacted,
        });
    }
    let mut events = Vec::new();
    let mut reached = from - 1;
    let started = Instant::now();
    for entry in log.range(from as u64..).map_err(db_err)? {
        let (rev, bytes) = entry.map_err(db_err)?;
        let rev = rev.value();
        if rev as Revision > current {
            break;
        }
        reached = rev as Revision;
        let record = Record::decode(bytes.value())?;
        if !record.key.starts_with(prefix) {
            continue;
        }
        let kind = record.kind;
        let mut kv = record.into_kv(rev);
        if kind == EventKind::Delete {
            kv.value = Bytes::new();
        }
        events.push(Event { kind, kv });
        if events.len() >= CATCH_UP_CHUNK || started.elapsed() > Duration::from_millis(200) {
            return Ok((events, reached, false));
        }
    }
    Ok((events, current.max(reached), true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb"), Default::default()).unwrap();
        (dir, store)
    }

    fn committed(outcome: Outcome) -> KeyValue {
        match outcome {
            Outcome::Committed(kv) => kv,
            Outcome::Conflict(c) => panic!("unexpected conflict: {c:?}"),
        }
    }

    #[tokio::test]
    async fn opens_a_store_of_the_format_without_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut log = txn.open_table(LOG).unwrap();
                let mut keys = txn.open_table(LEGACY_KEYS).unwrap();
                let mut meta = txn.open_table(META).unwrap();
                let record = |key: &str, create_revision, version, prev, value: &'static str| {
                    Record {
                        kind: EventKind::Put,
                        key: key.to_string(),
                        create_revision,
                        version,
                        prev,
                        value: Bytes::from(value),
                    }
                    .encode()
                };
                // /m/a: created at 1, updated at 2; /m/b: created at 3.
                log.insert(1, record("/m/a", 1, 1, 0, "1").as_slice())
                    .unwrap();
                log.insert(2, record("/m/a", 1, 2, 1, "2").as_slice())
                    .unwrap();
                log.insert(3, record("/m/b", 3, 1, 0, "b").as_slice())
                    .unwrap();
                keys.insert("/m/a", 2).unwrap();
                keys.insert("/m/b", 3).unwrap();
                meta.insert(META_REVISION, 3).unwrap();
            }
            txn.commit().unwrap();
        }

        let s = EmbeddedStore::open(&path, Default::default()).unwrap();
        let (a, revision) = s.get("/m/a").await.unwrap();
        let a = a.unwrap();
        assert_eq!(revision, 3);
        assert_eq!(
            (&a.value, a.create_revision, a.mod_revision, a.version),
            (&Bytes::from("2"), 1, 2, 2)
        );
        // Updates go on from the migrated create revision and version.
        let updated = committed(s.update("/m/a", Bytes::from("3"), 2).await.unwrap());
        assert_eq!(
            (
                updated.create_revision,
                updated.mod_revision,
                updated.version
            ),
            (1, 4, 3)
        );
        match s.update("/m/b", Bytes::from("x"), 1).await.unwrap() {
            Outcome::Conflict(Some(current)) => assert_eq!(current.value, Bytes::from("b")),
            other => panic!("a stale update must conflict with the current value: {other:?}"),
        }
        let listed = s
            .range(RangeRequest {
                prefix: "/m/".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let values: Vec<_> = listed.kvs.iter().map(|kv| kv.value.clone()).collect();
        assert_eq!(values, ["3", "b"].map(Bytes::from));
        drop(s);

        // The old table is gone, and reopening does not migrate again.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_read().unwrap();
            let tables: Vec<String> = txn
                .list_tables()
                .unwrap()
                .map(|t| redb::TableHandle::name(&t).to_string())
                .collect();
            assert!(!tables.iter().any(|t| t == "keys"), "{tables:?}");
        }
        let s = EmbeddedStore::open(&path, Default::default()).unwrap();
        let (a, _) = s.get("/m/a").await.unwrap();
        assert_eq!(a.unwrap().version, 3);
    }

    #[tokio::test]
    async fn revisions_versions_and_compare_and_swap() {
        let (_dir, s) = store();
        let a = committed(s.create("/a", Bytes::from("1")).await.unwrap());
        assert_eq!((a.create_revision, a.mod_revision, a.version), (1, 1, 1));
        assert!(matches!(
            s.create("/a", Bytes::from("x")).await.unwrap(),
            Outcome::Conflict(Some(_))
        ));
        let a2 = committed(s.update("/a", Bytes::from("2"), 1).await.unwrap());
        assert_eq!((a2.create_revision, a2.mod_revision, a2.version), (1, 2, 2));
        match s.update("/a", Bytes::from("3"), 1).await.unwrap() {
            Outcome::Conflict(Some(cur)) => assert_eq!(cur.value, Bytes::from("2")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.update("/missing", Bytes::from("3"), 1).await.unwrap(),
            Outcome::Conflict(None)
        ));
        let gone = committed(s.delete("/a", Some(2)).await.unwrap());
        assert_eq!(gone.mod_revision, 3);
        assert_eq!(gone.value, Bytes::from("2"));
        let (got, rev) = s.get("/a").await.unwrap();
        assert!(got.is_none());
        assert_eq!(rev, 3);
        // A new incarnation starts its version again.
        let a3 = committed(s.create("/a", Bytes::from("4")).await.unwrap());
        assert_eq!((a3.create_revision, a3.version), (4, 1));
    }

    #[tokio::test]
    async fn range_prefix_limit_and_past_revision() {
        let (_dir, s) = store();
        for name in ["a", "b", "c", "d"] {
            s.create(&format!("/r/x/{name}"), Bytes::from(name))
                .await
                .unwrap();
        }
        s.create("/r/y/z", Bytes::from("z")).await.unwrap();
        let page = s
            .range(RangeRequest {
                prefix: "/r/x/".into(),
                limit: 2,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(page.kvs.len(), 2);
        assert!(page.more);
        let rest = s
            .range(RangeRequest {
                prefix: "/r/x/".into(),
                start_after: Some(page.kvs[1].key.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
        let keys: Vec<_> = rest.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["/r/x/c", "/r/x/d"]);
        assert!(!rest.more);
        // Past revision: after deleting b and changing c, revision 5 still shows the old state.
        let b = s.get("/r/x/b").await.unwrap().0.unwrap();
        s.delete("/r/x/b", Some(b.mod_revision)).await.unwrap();
        let c = s.get("/r/x/c").await.unwrap().0.unwrap();
        s.update("/r/x/c", Bytes::from("c2"), c.mod_revision)
            .await
            .unwrap();
        let old = s
            .range(RangeRequest {
                prefix: "/r/x/".into(),
                revision: Some(5),
                ..Default::default()
            })
            .await
            .unwrap();
        let values: Vec<_> = old.kvs.iter().map(|kv| kv.value.clone()).collect();
        assert_eq!(values, ["a", "b", "c", "d"].map(Bytes::from));
    }

    #[tokio::test]
    async fn watch_replays_history_then_follows_live() {
        let (_dir, s) = store();
        s.create("/w/a", Bytes::from("1")).await.unwrap();
        s.create("/other", Bytes::from("x")).await.unwrap();
        s.update("/w/a", Bytes::from("2"), 1).await.unwrap();
        let mut watch = s.watch("/w/", 1).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            seen.extend(watch.next().await.unwrap().unwrap().events);
        }
        let update = &seen[1].kv;
        assert_eq!(
            (&update.value, update.create_revision, update.version),
            (&Bytes::from("2"), 1, 2)
        );
        s.delete("/w/a", None).await.unwrap();
        let live = watch.next().await.unwrap().unwrap();
        assert_eq!(live.events.len(), 1);
        assert_eq!(live.events[0].kind, EventKind::Delete);
        let deleted = &live.events[0].kv;
        assert_eq!(
            (
                deleted.mod_revision,
                deleted.create_revision,
                deleted.version
            ),
            (4, 1, 2)
        );
        assert!(deleted.value.is_empty());
    }

    #[tokio::test]
    async fn progress_reports_current_revision_without_events() {
        let (_dir, s) = store();
        let mut watch = s.watch("/p/", 1).await.unwrap();
        s.create("/elsewhere", Bytes::from("x")).await.unwrap();
        s.create("/elsewhere2", Bytes::from("x")).await.unwrap();
        let target = s.current_revision().await.unwrap();
        loop {
            watch.request_progress();
            let resp = tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert!(resp.events.is_empty());
            if resp.progress >= target {
                break;
            }
        }
    }

    #[tokio::test]
    async fn compaction_keeps_latest_and_rejects_old_watches() {
        let (_dir, s) = store();
        s.create("/c/a", Bytes::from("1")).await.unwrap(); // 1
        s.update("/c/a", Bytes::from("2"), 1).await.unwrap(); // 2
        s.create("/c/b", Bytes::from("1")).await.unwrap(); // 3
        s.delete("/c/b", None).await.unwrap(); // 4
        s.update("/c/a", Bytes::from("3"), 2).await.unwrap(); // 5
        s.compact(5).await.unwrap();
        assert!(matches!(
            s.watch("/c/", 3).await,
            Err(Error::Compacted { compacted: 4, .. })
        ));
        // Revision 5's event is still there, with its key's create revision and version.
        let mut watch = s.watch("/c/", 5).await.unwrap();
        let resp = watch.next().await.unwrap().unwrap();
        let kv = &resp.events[0].kv;
        assert_eq!(
            (&kv.value, kv.create_revision, kv.version),
            (&Bytes::from("3"), 1, 3)
        );
        let (a, _) = s.get("/c/a").await.unwrap();
        assert_eq!(a.unwrap().value, Bytes::from("3"));
        assert!(s.get("/c/b").await.unwrap().0.is_none());
        assert!(matches!(s.compact(3).await, Err(Error::Compacted { .. })));
    }

    #[tokio::test]
    async fn concurrent_writers_share_commits_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let s = Arc::new(EmbeddedStore::open(&path, Default::default()).unwrap());
            let mut tasks = Vec::new();
            for i in 0..64 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    for j in 0..20 {
                        let key = format!("/k/{i}/{j}");
                        committed(s.create(&key, Bytes::from(key.clone())).await.unwrap());
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(s.current_revision().await.unwrap(), 64 * 20);
        }
        let s = EmbeddedStore::open(&path, Default::default()).unwrap();
        assert_eq!(s.current_revision().await.unwrap(), 64 * 20);
        let all = s
            .range(RangeRequest {
                prefix: "/k/".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(all.kvs.len(), 64 * 20);
        let mut revs: Vec<_> = all.kvs.iter().map(|kv| kv.mod_revision).collect();
        revs.sort();
        revs.dedup();
        assert_eq!(revs.len(), 64 * 20, "every write has its own revision");
    }
}
