//! One contract, both backends: what the REST layer relies on from a store holds for the
//! embedded store and for a real etcd (started from PATH on free loopback ports).

use std::{net::TcpListener, process::Child, sync::Arc, time::Duration};

use bytes::Bytes;
use canopy_store::{
    EmbeddedStore, Error, EtcdStore, EventKind, Outcome, RangeRequest, Store, WatchResponse,
};

struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_etcd() -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = std::process::Command::new("etcd")
        .arg("--data-dir")
        .arg(dir.path().join("etcd"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args([
            "--initial-cluster",
            &format!("default={peer_url}"),
            "--log-level",
            "error",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("etcd is required by this test (Debian's etcd-server; .ci/run installs it)");
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", client)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Etcd {
        child,
        url,
        _dir: dir,
    }
}

fn committed(outcome: Outcome) -> canopy_store::KeyValue {
    match outcome {
        Outcome::Committed(kv) => kv,
        Outcome::Conflict(c) => panic!("unexpected conflict: {c:?}"),
    }
}

async fn next(watch: &mut canopy_store::Watch) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("watch response in time")
        .expect("watch open")
        .expect("watch ok")
}

async fn contract(store: Arc<dyn Store>) {
    let base = store.current_revision().await.unwrap();

    // Create, conflicting create, CAS update, stale update, delete with and without revision.
    let a = committed(store.create("/c/items/a", Bytes::from("1")).await.unwrap());
    assert_eq!(
        (a.create_revision, a.mod_revision, a.version),
        (base + 1, base + 1, 1)
    );
    match store.create("/c/items/a", Bytes::from("x")).await.unwrap() {
        Outcome::Conflict(Some(cur)) => assert_eq!(cur.value, Bytes::from("1")),
        other => panic!("{other:?}"),
    }
    let a2 = committed(
        store
            .update("/c/items/a", Bytes::from("2"), a.mod_revision)
            .await
            .unwrap(),
    );
    assert_eq!((a2.create_revision, a2.version), (a.create_revision, 2));
    assert!(a2.mod_revision > a.mod_revision);
    match store
        .update("/c/items/a", Bytes::from("3"), a.mod_revision)
        .await
        .unwrap()
    {
        Outcome::Conflict(Some(cur)) => assert_eq!(cur.mod_revision, a2.mod_revision),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store
            .update("/c/items/none", Bytes::from("3"), 1)
            .await
            .unwrap(),
        Outcome::Conflict(None)
    ));
    assert!(matches!(
        store
            .delete("/c/items/a", Some(a.mod_revision))
            .await
            .unwrap(),
        Outcome::Conflict(Some(_))
    ));
    assert!(matches!(
        store.delete("/c/items/none", None).await.unwrap(),
        Outcome::Conflict(None)
    ));

    // Ranges: prefix, order, limit with `more` and `count`, start_after, past revision.
    for name in ["b", "c", "d", "e"] {
        store
            .create(&format!("/c/items/{name}"), Bytes::from(name))
            .await
            .unwrap();
    }
    store
        .create("/c/itemsx", Bytes::from("outside"))
        .await
        .unwrap();
    let page = store
        .range(RangeRequest {
            prefix: "/c/items/".into(),
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let keys: Vec<_> = page.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/c/items/a", "/c/items/b"]);
    assert!(page.more);
    assert_eq!(page.count, 5);
    let rest = store
        .range(RangeRequest {
            prefix: "/c/items/".into(),
            start_after: Some("/c/items/b".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.kvs.len(), 3);
    assert!(!rest.more);
    let before = store.current_revision().await.unwrap();
    let d = store.get("/c/items/d").await.unwrap().0.unwrap();
    committed(
        store
            .delete("/c/items/d", Some(d.mod_revision))
            .await
            .unwrap(),
    );
    committed(
        store
            .update(
                "/c/items/e",
                Bytes::from("e2"),
                store
                    .get("/c/items/e")
                    .await
                    .unwrap()
                    .0
                    .unwrap()
                    .mod_revision,
            )
            .await
            .unwrap(),
    );
    let old = store
        .range(RangeRequest {
            prefix: "/c/items/".into(),
            revision: Some(before),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        old.revision, before,
        "a past read reports the revision it read at"
    );
    let values: Vec<_> = old.kvs.iter().map(|kv| kv.value.clone()).collect();
    assert_eq!(values, ["2", "b", "c", "d", "e"].map(Bytes::from));

    // Watch from a past revision: history in order, then live events.
    let mut watch = store.watch("/c/items/", a.mod_revision).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 8 {
        seen.extend(next(&mut watch).await.events);
    }
    assert_eq!(seen[0].kv.value, Bytes::from("1"));
    // An update keeps the key's create revision and counts its version.
    let update = &seen[1].kv;
    assert_eq!(
        (&update.value, update.create_revision, update.version),
        (&Bytes::from("2"), a.create_revision, 2)
    );
    let deletion = seen.iter().find(|e| e.kind == EventKind::Delete).unwrap();
    assert!(deletion.kv.key.ends_with("/d") && deletion.kv.value.is_empty());
    assert!(
        seen.windows(2)
            .all(|w| w[0].kv.mod_revision < w[1].kv.mod_revision)
    );
    let live = committed(store.create("/c/items/f", Bytes::from("f")).await.unwrap());
    let event = loop {
        let response = next(&mut watch).await;
        if let Some(e) = response.events.into_iter().next() {
            break e;
        }
    };
    assert_eq!(event.kv.mod_revision, live.mod_revision);
    // Keys outside the prefix never show up.
    assert!(seen.iter().all(|e| e.kv.key.starts_with("/c/items/")));

    // Compaction: older watches fail, newer reads work.
    let now = store.current_revision().await.unwrap();
    store.compact(now).await.unwrap();
    match store.watch("/c/items/", a.mod_revision).await {
        Err(Error::Compacted { .. }) => {}
        Ok(mut w) => match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Err(Error::Compacted { .. }))) => {}
            other => panic!(
                "watch from a compacted revision must fail: {:?}",
                other.map(|o| o.map(|r| r.map(|r| r.events.len())))
            ),
        },
        Err(other) => panic!("{other}"),
    }
    assert!(matches!(
        store
            .range(RangeRequest {
                prefix: "/c/items/".into(),
                revision: Some(a.mod_revision),
                ..Default::default()
            })
            .await,
        Err(Error::Compacted { .. })
    ));
    assert_eq!(
        store.get("/c/items/f").await.unwrap().0.unwrap().value,
        Bytes::from("f")
    );
}

/// Ranges longer than any backend's internal read chunk: complete, ordered, counted, and read as
/// of one revision even while writes go on.
async fn long_ranges(store: Arc<dyn Store>) {
    const KEYS: usize = 5_000;
    let mut writes = Vec::with_capacity(KEYS);
    for i in 0..KEYS {
        let store = store.clone();
        writes.push(tokio::spawn(async move {
            committed(
                store
                    .create(&format!("/long/items/{i:05}"), Bytes::from(vec![b'x'; 512]))
                    .await
                    .unwrap(),
            )
        }));
    }
    for write in writes {
        write.await.unwrap();
    }
    let full = store
        .range(RangeRequest {
            prefix: "/long/items/".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((full.kvs.len(), full.count, full.more), (KEYS, KEYS, false));
    assert!(full.kvs.windows(2).all(|w| w[0].key < w[1].key));

    let page = store
        .range(RangeRequest {
            prefix: "/long/items/".into(),
            start_after: Some("/long/items/00999".into()),
            limit: 3_500,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (page.kvs.len(), page.count, page.more),
        (3_500, 4_000, true)
    );
    assert_eq!(page.kvs[0].key, "/long/items/01000");
    assert_eq!(page.kvs[3_499].key, "/long/items/04499");

    // A read pinned to the revision of the full range sees none of the later changes.
    for i in 0..100 {
        store
            .delete(&format!("/long/items/{i:05}"), None)
            .await
            .unwrap();
    }
    let pinned = store
        .range(RangeRequest {
            prefix: "/long/items/".into(),
            revision: Some(full.revision),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((pinned.kvs.len(), pinned.revision), (KEYS, full.revision));
    let now = store
        .range(RangeRequest {
            prefix: "/long/items/".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(now.kvs.len(), KEYS - 100);
}

#[tokio::test]
async fn embedded_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("s.redb"), Default::default()).unwrap();
    contract(Arc::new(store)).await;
}

#[tokio::test]
async fn embedded_store_reads_long_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("s.redb"), Default::default()).unwrap();
    long_ranges(Arc::new(store)).await;
}

#[tokio::test]
async fn etcd_store_reads_long_ranges() {
    let etcd = start_etcd();
    let store = EtcdStore::connect(vec![etcd.url.clone()]).await.unwrap();
    long_ranges(Arc::new(store)).await;
}

#[tokio::test]
async fn etcd_store_keeps_the_contract() {
    let etcd = start_etcd();
    let store = EtcdStore::connect(vec![etcd.url.clone()]).await.unwrap();
    contract(Arc::new(store)).await;
}
