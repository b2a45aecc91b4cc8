use std::collections::{HashMap, HashSet};

use futures::FutureExt;
use proptest::prelude::*;

use super::*;

fn queue(fifo: bool) -> WorkQueue<String> {
    WorkQueue::new(
        "test",
        QueueConfig {
            fifo,
            ..QueueConfig::default()
        },
        &QueueMetrics::unregistered(),
    )
}

/// The next key if one is ready now.
fn next(q: &WorkQueue<String>) -> Option<(String, Lane)> {
    q.get().now_or_never().flatten()
}

fn k(s: &str) -> String {
    s.to_string()
}

#[test]
fn lanes_are_served_strictly_by_priority() {
    let q = queue(false);
    q.add(k("resync"), Lane::Sync);
    q.add(k("deleted"), Lane::Delete);
    q.add(k("changed"), Lane::Update);
    q.add(k("new"), Lane::Add);
    q.add(k("new2"), Lane::Add);
    let order: Vec<_> = std::iter::from_fn(|| next(&q)).collect();
    assert_eq!(
        order,
        vec![
            (k("new"), Lane::Add),
            (k("new2"), Lane::Add),
            (k("changed"), Lane::Update),
            (k("deleted"), Lane::Delete),
            (k("resync"), Lane::Sync),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn resync_work_is_paced_to_its_share_and_new_work_is_not() {
    let q = WorkQueue::new(
        "test",
        QueueConfig {
            sync_share: 0.25,
            ..QueueConfig::default()
        },
        &QueueMetrics::unregistered(),
    );
    for i in 0..4 {
        q.add(format!("s{i}"), Lane::Sync);
    }
    // 1 ms of resync work earns 3 ms of pause: nothing yet below the 5 ms quantum.
    let (key, lane) = next(&q).unwrap();
    q.observe_work(lane, Duration::from_millis(1));
    q.done(&key);
    let (key, lane) = next(&q).unwrap();
    assert_eq!(key, "s1");
    // 2 ms more makes 9 ms of pause, taken at once.
    q.observe_work(lane, Duration::from_millis(2));
    q.done(&key);
    assert_eq!(next(&q), None, "the SYNC lane pauses");
    q.add(k("new"), Lane::Add);
    assert_eq!(
        next(&q),
        Some((k("new"), Lane::Add)),
        "new work does not wait"
    );
    q.done(&k("new"));
    let started = Instant::now();
    let (key, _) = q.get().await.unwrap();
    assert_eq!(key, "s2");
    assert_eq!(started.elapsed(), Duration::from_millis(9));
    q.done(&key);
    // Draining does not wait for pauses.
    q.observe_work(Lane::Sync, Duration::from_millis(10));
    let drain = {
        let q = q.clone();
        tokio::spawn(async move { q.shut_down_with_drain().await })
    };
    tokio::task::yield_now().await;
    let (key, _) = next(&q).expect("draining hands out the paused key");
    assert_eq!(key, "s3");
    q.done(&key);
    drain.await.unwrap();
}

#[test]
fn a_fifo_or_a_full_share_does_not_pace() {
    for config in [
        QueueConfig {
            fifo: true,
            ..QueueConfig::default()
        },
        QueueConfig {
            sync_share: 1.0,
            ..QueueConfig::default()
        },
    ] {
        let q = WorkQueue::new("test", config, &QueueMetrics::unregistered());
        q.add(k("a"), Lane::Sync);
        q.add(k("b"), Lane::Sync);
        let (key, lane) = next(&q).unwrap();
        q.observe_work(lane, Duration::from_secs(1));
        q.done(&key);
        assert_eq!(next(&q).map(|(key, _)| key), Some(k("b")));
    }
}

#[test]
fn fifo_flag_serves_in_arrival_order() {
    let q = queue(true);
    q.add(k("resync"), Lane::Sync);
    q.add(k("deleted"), Lane::Delete);
    q.add(k("new"), Lane::Add);
    let order: Vec<_> = std::iter::from_fn(|| next(&q))
        .map(|(key, _)| key)
        .collect();
    assert_eq!(order, vec![k("resync"), k("deleted"), k("new")]);
}

#[test]
fn a_key_is_queued_once_in_its_highest_lane() {
    let q = queue(false);
    q.add(k("a"), Lane::Sync);
    q.add(k("b"), Lane::Sync);
    q.add(k("a"), Lane::Sync);
    assert_eq!(q.len(), 2);
    q.add(k("a"), Lane::Add);
    assert_eq!(q.depths(), [1, 0, 0, 1]);
    // A lower lane does not demote it.
    q.add(k("a"), Lane::Delete);
    assert_eq!(next(&q), Some((k("a"), Lane::Add)));
    assert_eq!(next(&q), Some((k("b"), Lane::Sync)));
    // The stale entry of "a" in SYNC is skipped.
    assert_eq!(next(&q), None);
}

#[test]
fn a_key_in_flight_is_not_handed_out_twice_and_runs_again_after() {
    let q = queue(false);
    q.add(k("a"), Lane::Update);
    let (key, _) = next(&q).unwrap();
    q.add(k("a"), Lane::Sync);
    q.add(k("a"), Lane::Add);
    assert_eq!(next(&q), None, "a is in flight");
    q.done(&key);
    assert_eq!(
        next(&q),
        Some((k("a"), Lane::Add)),
        "re-added in its best lane"
    );
    q.done(&key);
    assert_eq!(next(&q), None);
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_and_forget_resets() {
    let q = queue(false);
    for expected_ms in [5u64, 10, 20, 40] {
        let start = Instant::now();
        q.add_rate_limited(k("a"), Lane::Update);
        let (key, lane) = q.get().await.unwrap();
        let waited = start.elapsed();
        assert_eq!(lane, Lane::Update);
        q.done(&key);
        assert!(
            waited >= Duration::from_millis(expected_ms)
                && waited < Duration::from_millis(expected_ms * 2),
            "retry after {waited:?}, expected {expected_ms} ms"
        );
    }
    assert_eq!(q.failures(&k("a")), 4);
    q.forget(&k("a"));
    assert_eq!(q.failures(&k("a")), 0);
    let start = Instant::now();
    q.add_rate_limited(k("a"), Lane::Update);
    q.get().await.unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(10),
        "back to the base delay"
    );
}

#[tokio::test(start_paused = true)]
async fn per_key_backoff_doubles_and_is_capped() {
    let q = WorkQueue::new(
        "test",
        QueueConfig {
            max_delay: Duration::from_millis(100),
            ..QueueConfig::default()
        },
        &QueueMetrics::unregistered(),
    );
    for _ in 0..10 {
        q.add_rate_limited(k("a"), Lane::Update);
    }
    // Ten failures would mean 5 ms × 2⁹ = 2.56 s uncapped.
    let started = Instant::now();
    let (key, _) = q.get().await.unwrap();
    assert_eq!(key, "a");
    // The earliest of the delays wins for a key waiting already: the first (5 ms).
    assert!(started.elapsed() <= Duration::from_millis(100));
    q.done(&key);
    q.add_rate_limited(k("a"), Lane::Update);
    let started = Instant::now();
    q.get().await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_millis(150),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_overall_retry_budget_spaces_retries_of_many_keys() {
    let q = WorkQueue::new(
        "test",
        QueueConfig {
            retry_qps: 10.0,
            retry_burst: 2,
            ..QueueConfig::default()
        },
        &QueueMetrics::unregistered(),
    );
    let started = Instant::now();
    for i in 0..5 {
        q.add_rate_limited(format!("k{i}"), Lane::Update);
    }
    for _ in 0..5 {
        let (key, _) = q.get().await.unwrap();
        q.done(&key);
    }
    // Two go at once (burst), the other three at 10 per second.
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn delayed_keys_wake_a_waiting_worker() {
    let q = queue(false);
    let waiter = {
        let q = q.clone();
        tokio::spawn(async move { q.get().await })
    };
    tokio::task::yield_now().await;
    q.add_after(k("later"), Lane::Update, Duration::from_secs(5));
    q.add_after(k("sooner"), Lane::Update, Duration::from_secs(1));
    let started = Instant::now();
    let (key, _) = waiter.await.unwrap().unwrap();
    assert_eq!(key, "sooner");
    assert!(
        started.elapsed() >= Duration::from_secs(1) && started.elapsed() < Duration::from_secs(5)
    );
}

#[tokio::test]
async fn shut_down_abandons_queued_keys() {
    let q = queue(false);
    q.add(k("a"), Lane::Add);
    let waiter = {
        let q = q.clone();
        tokio::spawn(async move {
            let first = q.get().await;
            let second = q.get().await;
            (first, second)
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    q.add(k("b"), Lane::Sync);
    // b may or may not have been taken; shutting down ends the second wait either way.
    q.shut_down();
    let (first, _) = waiter.await.unwrap();
    assert_eq!(first, Some((k("a"), Lane::Add)));
    assert_eq!(q.get().await, None);
    q.add(k("c"), Lane::Add);
    assert!(q.is_empty(), "a shut down queue refuses keys");
}

#[tokio::test]
async fn shut_down_with_drain_finishes_queued_and_in_flight_work() {
    let q = queue(false);
    for i in 0..10 {
        q.add(format!("k{i}"), Lane::Sync);
    }
    let processed = Arc::new(Mutex::new(Vec::new()));
    let worker = {
        let q = q.clone();
        let processed = processed.clone();
        tokio::spawn(async move {
            while let Some((key, _)) = q.get().await {
                tokio::time::sleep(Duration::from_millis(2)).await;
                processed.lock().push(key.clone());
                q.done(&key);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    q.shut_down_with_drain().await;
    assert_eq!(processed.lock().len(), 10);
    q.add(k("late"), Lane::Add);
    worker.await.unwrap();
    assert_eq!(
        processed.lock().len(),
        10,
        "no key accepted after the drain"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Add(u8, Lane),
    Get,
    Done(usize),
}

fn lane() -> impl Strategy<Value = Lane> {
    prop_oneof![
        Just(Lane::Add),
        Just(Lane::Update),
        Just(Lane::Delete),
        Just(Lane::Sync)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, lane()).prop_map(|(key, lane)| Op::Add(key, lane)),
        Just(Op::Get),
        (0usize..4).prop_map(Op::Done),
    ]
}

proptest! {
    /// Against a model: a key is queued at most once, in its best lane; keys come out in
    /// lane order (FIFO within a lane); never twice at once; a key added while in flight
    /// comes back after done; nothing added is lost.
    #[test]
    fn queue_matches_its_model(ops in proptest::collection::vec(op(), 1..200), fifo in any::<bool>()) {
        let q = queue(fifo);
        // Model: queued keys with lane and arrival order, in-flight keys, dirty keys.
        let mut queued: Vec<(String, Lane)> = Vec::new();
        let mut in_flight: Vec<(String, Lane)> = Vec::new();
        let mut dirty: HashMap<String, Lane> = HashMap::new();
        for op in ops {
            match op {
                Op::Add(key, lane) => {
                    let key = format!("k{key}");
                    q.add(key.clone(), lane);
                    if in_flight.iter().any(|(k, _)| *k == key) {
                        let d = dirty.entry(key).or_insert(lane);
                        *d = (*d).min(lane);
                    } else if let Some(pos) = queued.iter().position(|(k, _)| *k == key) {
                        if !fifo && lane < queued[pos].1 {
                            // Promotion goes to the back of the better lane.
                            queued.remove(pos);
                            queued.push((key, lane));
                        }
                    } else {
                        queued.push((key, lane));
                    }
                }
                Op::Get => {
                    let expected = if fifo {
                        queued.first().cloned()
                    } else {
                        Lane::ALL.iter().find_map(|l| queued.iter().find(|(_, ql)| ql == l).cloned())
                    };
                    let got = next(&q);
                    prop_assert_eq!(&got, &expected);
                    if let Some((key, lane)) = got {
                        prop_assert!(!in_flight.iter().any(|(k, _)| *k == key), "{} handed out twice", key);
                        queued.retain(|(k, _)| *k != key);
                        in_flight.push((key, lane));
                    }
                }
                Op::Done(i) => {
                    if in_flight.is_empty() { continue; }
                    let (key, _) = in_flight.remove(i % in_flight.len());
                    q.done(&key);
                    if let Some(lane) = dirty.remove(&key) {
                        queued.push((key, lane));
                    }
                }
            }
            prop_assert_eq!(q.len(), queued.len());
        }
        // Once the workers are done, everything still queued comes out, each key once.
        for (key, _) in in_flight {
            q.done(&key);
            if let Some(lane) = dirty.remove(&key) {
                queued.push((key, lane));
            }
        }
        let mut seen = HashSet::new();
        while let Some((key, _)) = next(&q) {
            prop_assert!(seen.insert(key.clone()));
            q.done(&key);
        }
        let expected: HashSet<String> = queued.into_iter().map(|(k, _)| k).collect();
        prop_assert_eq!(expected, seen);
    }
}
