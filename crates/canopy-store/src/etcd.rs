//! The etcd v3 store, through the `etcd-client` crate. Conditional writes are etcd
//! transactions comparing the key's mod revision (create: create revision 0), exactly as the
//! upstream apiserver's etcd3 storage does.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use crate::{
    Error, Event, EventKind, KeyValue, Outcome, RangeRequest, RangeResponse, Result, Revision,
    Store, Watch, WatchResponse, prefix_end,
};

/// etcd's default `--max-request-bytes`; larger values are refused before they are sent.
const MAX_VALUE_BYTES: usize = 1536 * 1024;

/// A [`Store`] on an etcd v3 cluster.
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
    ordered_progress: bool,
}

impl EtcdStore {
    /// Connects to the cluster (any of `endpoints`).
    pub async fn connect(endpoints: Vec<String>) -> Result<Self> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(30))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(10));
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|e| Error::Unavailable(format!("connecting to {endpoints:?}: {e}")))?;
        let version = client
            .maintenance_client()
            .status()
            .await
            .map_err(|e| Error::Unavailable(format!("etcd status at {endpoints:?}: {e}")))?
            .version()
            .to_string();
        let ordered_progress = progress_is_ordered(&version);
        if !ordered_progress {
            tracing::warn!(
                %version,
                "etcd orders progress notifications after events only from 3.4.31 and 3.5.13; consistent lists will be read from etcd"
            );
        }
        Ok(Self {
            client,
            endpoints,
            ordered_progress,
        })
    }

    fn kv(&self) -> etcd_client::KvClient {
        // Like upstream's apiserver, accept responses of any size: one object may be up to
        // etcd's request limit, and a watch response batches many events.
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// gRPC's default 4 MiB receive limit is far below what a batch of large objects can reach.
const MAX_MESSAGE_BYTES: usize = i32::MAX as usize;

/// Keys per etcd range call when reading many: long lists are read in revision-pinned chunks so
/// that neither etcd nor this process builds one response holding the whole prefix.
const RANGE_CHUNK: usize = 2_000;

fn key_after(key: &str) -> Vec<u8> {
    key_after_bytes(key.as_bytes())
}

/// The smallest key sorting after `key`.
fn key_after_bytes(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

fn to_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    Ok(KeyValue {
        key: String::from_utf8(kv.key().to_vec())
            .map_err(|_| Error::Corrupt("etcd key is not UTF-8".into()))?,
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
    })
}

fn map_err(e: etcd_client::Error) -> Error {
    let text = e.to_string();
    if text.contains("required revision has been compacted") {
        // The exact compaction revision is not in the message; callers only need the fact.
        return Error::Compacted {
            requested: 0,
            compacted: 0,
        };
    }
    if text.contains("request is too large") {
        return Error::TooLarge {
            size: 0,
            limit: MAX_VALUE_BYTES,
        };
    }
    match &e {
        etcd_client::Error::GRpcStatus(status)
            if matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) =>
        {
            Error::Unavailable(text)
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            Error::Unavailable(text)
        }
        _ => Error::Etcd(text),
    }
}

fn check_size(value: &Bytes) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::TooLarge {
            size: value.len(),
            limit: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

/// The key read in a transaction's failure branch.
fn current_from(responses: &[TxnOpResponse]) -> Result<Option<KeyValue>> {
    for response in responses {
        if let TxnOpResponse::Get(get) = response {
            return get.kvs().first().map(to_kv).transpose();
        }
    }
    Ok(None)
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Revision)> {
        let response = self.kv().get(key, None).await.map_err(map_err)?;
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        Ok((response.kvs().first().map(to_kv).transpose()?, revision))
    }

    async fn range(&self, request: RangeRequest) -> Result<RangeResponse> {
        let mut start = match &request.start_after {
            Some(after) => key_after(after),
            None => request.prefix.clone().into_bytes(),
        };
        let range_end = prefix_end(&request.prefix);
        let mut pinned = request.revision.filter(|r| *r > 0);
        let mut kvs = Vec::new();
        let mut count = None;
        loop {
            let wanted = match request.limit {
                0 => RANGE_CHUNK,
                limit => (limit - kvs.len()).min(RANGE_CHUNK),
            };
            let mut options = GetOptions::new()
                .with_range(range_end.clone())
                .with_limit(wanted as i64);
            if let Some(rev) = pinned {
                options = options.with_revision(rev);
            }
            let response =
                self.kv()
                    .get(start.clone(), Some(options))
                    .await
                    .map_err(|e| match (map_err(e), pinned) {
                        (Error::Compacted { .. }, Some(rev)) => Error::Compacted {
                            requested: rev,
                            compacted: 0,
                        },
                        (other, _) => other,
                    })?;
            // The header carries the current revision; later chunks read as of the first one's,
            // and a read at a past revision happened there.
            let revision =
                *pinned.get_or_insert_with(|| response.header().map(|h| h.revision()).unwrap_or(0));
            // etcd counts the keys from `start` on; the first chunk's count is the caller's.
            count.get_or_insert(usize::try_from(response.count()).unwrap_or(0));
            for kv in response.kvs() {
                kvs.push(to_kv(kv)?);
            }
            let done = request.limit > 0 && kvs.len() >= request.limit;
            if !response.more() || done {
                let count = count.unwrap_or(kvs.len()).max(kvs.len());
                return Ok(RangeResponse {
                    more: response.more(),
                    count,
                    kvs,
                    revision,
                });
            }
            match response.kvs().last() {
                Some(last) => start = key_after_bytes(last.key()),
                None => {
                    return Err(Error::Corrupt(
                        "etcd reported more keys but returned none".into(),
                    ));
                }
            }
        }
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Outcome> {
        check_size(&value)?;
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value.to_vec(), None)])
            .or_else([TxnOp::get(key, None)]);
        let response = self.kv().txn(txn).await.map_err(map_err)?;
        if !response.succeeded() {
            return Ok(Outcome::Conflict(current_from(
                response.op_responses().as_slice(),
            )?));
        }
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        Ok(Outcome::Committed(KeyValue {
            key: key.to_string(),
            value,
            create_revision: revision,
            mod_revision: revision,
            version: 1,
        }))
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Outcome> {
        check_size(&value)?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(
                key,
                value.to_vec(),
                Some(PutOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let response = self.kv().txn(txn).await.map_err(map_err)?;
        if !response.succeeded() {
            return Ok(Outcome::Conflict(current_from(
                response.op_responses().as_slice(),
            )?));
        }
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        let prev = response.op_responses().iter().find_map(|r| match r {
            TxnOpResponse::Put(put) => put.prev_key().map(to_kv),
            _ => None,
        });
        let prev = prev.transpose()?;
        Ok(Outcome::Committed(KeyValue {
            key: key.to_string(),
            value,
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
        }))
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<Outcome> {
        let compare = match expected {
            Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
            // Unconditional: only require that the key exists.
            None => Compare::create_revision(key, CompareOp::Greater, 0),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::delete(
                key,
                Some(etcd_client::DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let response = self.kv().txn(txn).await.map_err(map_err)?;
        if !response.succeeded() {
            return Ok(Outcome::Conflict(current_from(
                response.op_responses().as_slice(),
            )?));
        }
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        let prev = response.op_responses().iter().find_map(|r| match r {
            TxnOpResponse::Delete(del) => del.prev_kvs().first().map(to_kv),
            _ => None,
        });
        match prev.transpose()? {
            Some(prev) => Ok(Outcome::Committed(KeyValue {
                mod_revision: revision,
                ..prev
            })),
            None => Ok(Outcome::Conflict(None)),
        }
    }

    async fn watch(&self, prefix: &str, start: Revision) -> Result<Watch> {
        let options = WatchOptions::new()
            .with_range(prefix_end(prefix))
            .with_start_revision(start)
            .with_progress_notify();
        let stream = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .watch(prefix, Some(options))
            .await
            .map_err(map_err)?;
        let (mut requests, mut responses) = stream.split();
        let ordered = self.ordered_progress;
        let (tx, rx) = mpsc::channel(64);
        let (progress_tx, mut progress_rx) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = responses.message() => {
                        let response = match message {
                            Ok(Some(response)) => response,
                            Ok(None) => {
                                let _ = tx.send(Err(Error::Unavailable("etcd closed the watch".into()))).await;
                                return;
                            }
                            Err(e) => {
                                let _ = tx.send(Err(map_err(e))).await;
                                return;
                            }
                        };
                        if response.canceled() {
                            let compacted = response.compact_revision();
                            let err = if compacted > 0 {
                                Error::Compacted { requested: start, compacted }
                            } else {
                                Error::Unavailable(format!("etcd cancelled the watch: {}", response.cancel_reason()))
                            };
                            let _ = tx.send(Err(err)).await;
                            return;
                        }
                        if response.created() && response.events().is_empty() {
                            continue;
                        }
                        // Before 3.4.31/3.5.13, a progress notification someone requested
                        // (watch id -1) can overtake events still queued for the watch
                        // (etcd-io/etcd#15220); only periodic ones are ordered with events.
                        if response.events().is_empty() && response.watch_id() < 0 && !ordered {
                            continue;
                        }
                        let progress = response.header().map(|h| h.revision()).unwrap_or(0);
                        let mut events = Vec::with_capacity(response.events().len());
                        for event in response.events() {
                            let Some(kv) = event.kv() else { continue };
                            let kind = match event.event_type() {
                                EventType::Put => EventKind::Put,
                                EventType::Delete => EventKind::Delete,
                            };
                            let converted = (|| -> Result<Event> {
                                Ok(Event {
                                    kind,
                                    kv: to_kv(kv)?,
                                })
                            })();
                            match converted {
                                Ok(event) => events.push(event),
                                Err(err) => {
                                    let _ = tx.send(Err(err)).await;
                                    return;
                                }
                            }
                        }
                        // A response with events reports the header revision, which can be
                        // ahead of its last event; only the events' revision is certain.
                        let progress = events.last().map_or(progress, |e| e.kv.mod_revision);
                        if tx.send(Ok(WatchResponse { events, progress })).await.is_err() {
                            return;
                        }
                    }
                    request = progress_rx.recv() => {
                        if request.is_none() {
                            return;
                        }
                        if let Err(e) = requests.request_progress().await {
                            let _ = tx.send(Err(map_err(e))).await;
                            return;
                        }
                    }
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Watch::new(rx, progress_tx))
    }

    async fn current_revision(&self) -> Result<Revision> {
        // Any read returns the cluster's revision in its header; a count-only read of an
        // empty range is the cheapest.
        let response = self
            .kv()
            .get("\0", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(map_err)?;
        Ok(response.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.kv()
            .compact(revision, None)
            .await
            .map(|_| ())
            .map_err(map_err)
    }

    fn describe(&self) -> String {
        format!("etcd:{}", self.endpoints.join(","))
    }

    fn ordered_progress(&self) -> bool {
        self.ordered_progress
    }
}

/// Whether an etcd version has the fix for etcd-io/etcd#15220 and #17507.
fn progress_is_ordered(version: &str) -> bool {
    let parts: Vec<u64> = version
        .split(['.', '-', '+'])
        .take(3)
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    match parts.as_slice() {
        [3, 4, patch] => *patch >= 31,
        [3, 5, patch] => *patch >= 13,
        [3, minor, _] => *minor >= 6,
        [major, ..] => *major > 3,
        [] => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn progress_ordering_by_version() {
        assert!(!super::progress_is_ordered("3.4.23"));
        assert!(super::progress_is_ordered("3.4.31"));
        assert!(!super::progress_is_ordered("3.5.12"));
        assert!(super::progress_is_ordered("3.5.13"));
        assert!(super::progress_is_ordered("3.6.0"));
    }
}
