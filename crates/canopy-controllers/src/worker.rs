//! The worker loop every controller runs: take a key from the work queue, sync it, and
//! retry it with backoff if that failed, as client-go controllers' `processNextWorkItem`.

use std::{fmt::Display, future::Future, hash::Hash, time::Duration};

use tokio::time::Instant;

use crate::queue::{Lane, WorkQueue};

/// What a successful sync asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing until the next change of the object.
    Done,
    /// Look again after a while (a deadline, a grace period), in the UPDATE lane.
    RequeueAfter(Duration),
}

/// Runs `workers` workers on `queue` until it shuts down. Each key goes to one worker at a
/// time; a failed sync is logged and retried after the queue's backoff, in its lane.
pub async fn run_workers<K, F, Fut, E>(queue: WorkQueue<K>, workers: usize, sync: F)
where
    K: Clone + Eq + Hash + Display + Send + Sync + 'static,
    F: Fn(K) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Outcome, E>> + Send + 'static,
    E: Display + Send + 'static,
{
    // A JoinSet aborts its workers when dropped: losing leadership stops them all.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers.max(1) {
        let queue = queue.clone();
        let sync = sync.clone();
        set.spawn(async move {
            while let Some((key, lane)) = queue.get().await {
                let started = Instant::now();
                match sync(key.clone()).await {
                    Ok(Outcome::Done) => queue.forget(&key),
                    Ok(Outcome::RequeueAfter(after)) => {
                        queue.forget(&key);
                        queue.add_after(key.clone(), Lane::Update, after);
                    }
                    Err(err) => {
                        let failures = queue.failures(&key);
                        if failures < 5 {
                            tracing::debug!(queue = queue.name(), %key, %err, "sync failed; will retry");
                        } else {
                            tracing::warn!(queue = queue.name(), %key, %err, failures, "sync keeps failing; will retry");
                        }
                        queue.add_rate_limited(key.clone(), lane);
                    }
                }
                queue.observe_work(lane, started.elapsed());
                queue.done(&key);
                // A queue full of keys that sync without awaiting anything (a resync) would
                // otherwise keep this thread from the tasks of the next new object.
                tokio::task::consume_budget().await;
            }
        });
    }
    while set.join_next().await.is_some() {}
}
