//! Revisioned key-value stores with etcd's semantics.
//!
//! Every write gets the next revision of one store-wide, monotonic counter. A key carries the
//! revision that created it, the revision that last modified it and a per-key version. Writers
//! compare-and-swap on the modification revision; readers range over a prefix in key order,
//! with a limit; watchers receive every change after a revision, in revision order, each with
//! the value it replaced. History older than the compaction revision is gone.
//!
//! Two backends implement [`Store`]:
//! - [`EmbeddedStore`]: a redb file, one writer thread that commits concurrent writes together
//!   (group commit), acknowledging each only after its transaction is on disk;
//! - [`EtcdStore`]: etcd v3 through the `etcd-client` crate.
//!
//! [`open`] picks one from a URL-like specification, like k3s/kine do.

mod embedded;
mod etcd;

use std::{fmt, sync::Arc};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use etcd::EtcdStore;

/// A store revision. Revision 0 is "before any write".
pub type Revision = i64;

/// One key as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key, a `/`-separated path such as `/registry/pods/default/web-0`.
    pub key: String,
    /// The stored value (JSON for Canopy's objects). Empty for a deletion event.
    pub value: Bytes,
    /// Revision of the write that created this incarnation of the key.
    pub create_revision: Revision,
    /// Revision of the last write to the key (for a deletion event: the deletion's revision).
    pub mod_revision: Revision,
    /// Number of writes to this incarnation of the key, starting at 1.
    pub version: i64,
}

impl fmt::Debug for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &self.key)
            .field("value_len", &self.value.len())
            .field("create_revision", &self.create_revision)
            .field("mod_revision", &self.mod_revision)
            .field("version", &self.version)
            .finish()
    }
}

/// Whether a watch event stores or removes a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or modified.
    Put,
    /// The key was deleted.
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change. For a delete, `value` is empty and `mod_revision` is the
    /// revision of the deletion.
    ///
    /// Events do not carry the key's previous value (etcd's `prev_kv`): finding it costs
    /// the store a read per write, and a watcher that needs it (the API server's watch cache)
    /// already holds it.
    pub kv: KeyValue,
}

/// What a watch delivers: events in revision order, and how far the watch has progressed.
#[derive(Clone, Debug, Default)]
pub struct WatchResponse {
    /// Changes under the watched prefix; may be empty for a pure progress notification.
    pub events: Vec<Event>,
    /// Every change under the prefix with a revision at or below this one has been delivered.
    pub progress: Revision,
}

/// The result of a conditional write.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The write happened. For puts, the key as now stored; for deletes, the key as it was
    /// just before with `mod_revision` set to the revision of the deletion.
    Committed(KeyValue),
    /// The condition failed; this is the key as currently stored (None: it does not exist).
    Conflict(Option<KeyValue>),
}

/// A range read over the keys that start with `prefix`.
#[derive(Clone, Debug, Default)]
pub struct RangeRequest {
    /// Only keys starting with this prefix.
    pub prefix: String,
    /// Only keys strictly after this one (for pagination).
    pub start_after: Option<String>,
    /// At most this many keys; 0 means no limit.
    pub limit: usize,
    /// Read as of this revision; None reads the current state.
    pub revision: Option<Revision>,
}

/// The keys a range read found.
#[derive(Clone, Debug, Default)]
pub struct RangeResponse {
    /// Keys in ascending order.
    pub kvs: Vec<KeyValue>,
    /// True when more keys match beyond the limit.
    pub more: bool,
    /// How many keys the range holds from its start, ignoring the limit (etcd's `count`).
    pub count: usize,
    /// The revision the read was served at.
    pub revision: Revision,
}

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested revision is older than the compaction revision.
    #[error("required revision {requested} has been compacted (compacted at {compacted})")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision still available, minus one.
        compacted: Revision,
    },
    /// The requested revision is newer than the store's current revision.
    #[error("required revision {0} is a future revision")]
    FutureRevision(Revision),
    /// The value is larger than the store accepts.
    #[error("value of {size} bytes exceeds the store's limit of {limit} bytes")]
    TooLarge {
        /// Size of the value.
        size: usize,
        /// The store's limit.
        limit: usize,
    },
    /// The store cannot be reached or did not answer in time.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store is shutting down or its writer is gone.
    #[error("store is closed")]
    Closed,
    /// A stored record could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// An embedded database error.
    #[error("embedded database: {0}")]
    Database(String),
    /// An etcd error that is none of the above.
    #[error("etcd: {0}")]
    Etcd(String),
    /// The store specification could not be understood.
    #[error("invalid store specification: {0}")]
    InvalidSpec(String),
}

/// Results of the store layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A revisioned key-value store with etcd's semantics. See the crate documentation.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key at the current revision; returns it and the revision read at.
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Revision)>;

    /// Reads keys under a prefix in key order.
    async fn range(&self, request: RangeRequest) -> Result<RangeResponse>;

    /// Creates a key; conflicts when it exists.
    async fn create(&self, key: &str, value: Bytes) -> Result<Outcome>;

    /// Replaces a key whose modification revision is `expected`; conflicts otherwise
    /// (including when the key does not exist).
    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Outcome>;

    /// Deletes a key, if its modification revision is `expected` (when given); conflicts
    /// when the key does not exist or the revision differs.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<Outcome>;

    /// Watches every change under `prefix` with revision >= `start` (which must be > 0).
    async fn watch(&self, prefix: &str, start: Revision) -> Result<Watch>;

    /// The revision of the last write.
    async fn current_revision(&self) -> Result<Revision>;

    /// Forgets history older than `revision`: reads and watches before it fail with
    /// [`Error::Compacted`] afterwards.
    async fn compact(&self, revision: Revision) -> Result<()>;

    /// A human-readable description such as `embedded:/var/lib/canopy/store.redb`.
    fn describe(&self) -> String;

    /// Whether a progress notification is delivered only after every event it covers. When
    /// it is not (etcd before 3.4.31 and 3.5.13, etcd-io/etcd#15220), a watch cache cannot
    /// prove it is fresh and consistent reads must go to the store.
    fn ordered_progress(&self) -> bool {
        true
    }
}

/// A stream of watch responses for one prefix.
///
/// Dropping it cancels the watch.
pub struct Watch {
    responses: mpsc::Receiver<Result<WatchResponse>>,
    progress: mpsc::Sender<()>,
}

impl Watch {
    /// A watch fed by a channel of responses, with a channel that carries its progress
    /// requests: how a store is layered over another (fault injection, instrumentation).
    pub fn new(
        responses: mpsc::Receiver<Result<WatchResponse>>,
        progress: mpsc::Sender<()>,
    ) -> Self {
        Self {
            responses,
            progress,
        }
    }

    /// The next response; `None` when the watch has ended. After an error the watch ends.
    pub async fn next(&mut self) -> Option<Result<WatchResponse>> {
        self.responses.recv().await
    }

    /// Asks for a progress notification: a response (possibly without events) whose
    /// `progress` is at least the store's revision at the time of the request, once all
    /// events up to it have been delivered. Stores without [`Store::ordered_progress`] may
    /// not answer; a watch only ever reports progress it is certain of.
    pub fn request_progress(&self) {
        // A request already pending answers this one too.
        let _ = self.progress.try_send(());
    }
}

/// The key just after every key that starts with `prefix` (etcd's "range end").
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range is open-ended; etcd spells that "\0".
    vec![0]
}

/// Opens the store a specification names:
/// - `embedded` or `embedded:<path>`: a redb file (default `<data_dir>/store.redb`);
/// - `etcd=<url>[,<url>...]` or `etcd://host:port[,...]`: an etcd v3 cluster.
pub async fn open(spec: &str, data_dir: &std::path::Path) -> Result<Arc<dyn Store>> {
    if spec == "embedded" || spec.is_empty() {
        let path = data_dir.join("store.redb");
        return Ok(Arc::new(EmbeddedStore::open(
            &path,
            EmbeddedOptions::default(),
        )?));
    }
    if let Some(path) = spec.strip_prefix("embedded:") {
        return Ok(Arc::new(EmbeddedStore::open(
            std::path::Path::new(path),
            EmbeddedOptions::default(),
        )?));
    }
    let endpoints = if let Some(list) = spec.strip_prefix("etcd=") {
        list
    } else if let Some(list) = spec.strip_prefix("etcd://") {
        list
    } else {
        return Err(Error::InvalidSpec(format!(
            "{spec:?}: expected `embedded`, `embedded:<path>` or `etcd=http://host:port[,...]`"
        )));
    };
    let endpoints: Vec<String> = endpoints
        .split(',')
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e.contains("://") {
                e.to_string()
            } else {
                format!("http://{e}")
            }
        })
        .collect();
    if endpoints.is_empty() {
        return Err(Error::InvalidSpec(format!("{spec:?}: no etcd endpoint")));
    }
    Ok(Arc::new(EtcdStore::connect(endpoints).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end("/registry/pods/"), b"/registry/pods0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
