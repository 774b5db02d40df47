//! Sync between replicas on one in-process bus (the embedded default's
//! transport), each with its own RocksDB store: merge, anti-entropy after
//! lost deltas, restart from disk, limits. Multi-process runs over real NATS
//! are in the workspace's tests/all/sync.rs.

use keel_bus::Bus;
use keel_bus::local::LocalBus;
use keel_store::{Namespace, StoreError};
use keel_store_rocksdb::{NodeIdentity, RocksOptions, RocksStore};
use keel_sync::{Scope, Sync, SyncOptions};
use keel_telemetry::SyncMetrics;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn open(dir: &Path, edge: &str, bus: Arc<dyn Bus>) -> (Sync, SyncMetrics) {
    let options = RocksOptions {
        limits: Default::default(),
        node: NodeIdentity {
            edge: edge.into(),
            region: "r".into(),
        },
        forwarding: false,
        block_cache_bytes: 1 << 20,
    };
    // A store reopened in the same process waits until the previous
    // instance's last task let go of it (RocksDB's lock).
    let mut store = None;
    let opened = keel_test_support::wait_until(Duration::from_secs(10), || {
        store = RocksStore::open(dir, options.clone()).ok();
        store.is_some()
    });
    assert!(opened, "reopening {} timed out", dir.display());
    let store = store.expect("opened");
    let metrics = SyncMetrics::default();
    let sync = Sync::start(
        Arc::new(store),
        keel_bus::Buses::single(bus),
        SyncOptions {
            edge: edge.into(),
            region: "r".into(),
            anti_entropy_interval: Duration::from_millis(50),
            max_state_bytes: 2048,
            max_key_bytes: 64,
            max_value_bytes: 256,
            max_clock_drift: Duration::from_secs(60),
        },
        metrics.clone(),
        &tokio::runtime::Handle::current(),
    )
    .unwrap();
    (sync, metrics)
}

fn ns(n: &str) -> Namespace {
    Namespace::new(n).unwrap()
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    let ok =
        keel_test_support::wait_until_async(Duration::from_secs(10), || std::future::ready(f()))
            .await;
    assert!(ok, "timed out: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_and_scopes_and_namespaces_stay_apart() {
    let bus: Arc<dyn Bus> = Arc::new(LocalBus::new());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, ma) = open(da.path(), "a", bus.clone());
    let (b, _) = open(db.path(), "b", bus.clone());
    assert_ne!(a.replica(), b.replica());
    let app = ns("app");
    a.counter_inc(&app, Scope::Region, "c", 5).await.unwrap();
    b.counter_dec(&app, Scope::Region, "c", 2).await.unwrap();
    a.counter_inc(&app, Scope::Edge, "c", 100).await.unwrap();
    a.set_add(&app, Scope::Global, "s", "x".into())
        .await
        .unwrap();
    b.map_set(&app, Scope::Region, "m", "k".into(), b"v".to_vec())
        .await
        .unwrap();
    b.register_set(&app, Scope::Region, "r", b"one".to_vec())
        .await
        .unwrap();
    eventually("counter", || {
        a.counter_value(&app, Scope::Region, "c").unwrap() == 3
            && b.counter_value(&app, Scope::Region, "c").unwrap() == 3
    })
    .await;
    eventually("set, map, register", || {
        b.set_contains(&app, Scope::Global, "s", "x").unwrap()
            && a.map_get(&app, Scope::Region, "m", "k").unwrap() == Some(b"v".to_vec())
            && a.register_get(&app, Scope::Region, "r").unwrap() == Some(b"one".to_vec())
    })
    .await;
    // A register write after observing the other's wins everywhere.
    a.register_set(&app, Scope::Region, "r", b"two".to_vec())
        .await
        .unwrap();
    eventually("register", || {
        b.register_get(&app, Scope::Region, "r").unwrap() == Some(b"two".to_vec())
    })
    .await;
    assert_eq!(b.counter_value(&app, Scope::Edge, "c").unwrap(), 0);
    assert_eq!(a.counter_value(&app, Scope::Edge, "c").unwrap(), 100);
    assert_eq!(
        b.counter_value(&ns("other"), Scope::Region, "c").unwrap(),
        0
    );
    assert!(ma.deltas_sent.get() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_everything_is_repaired_by_anti_entropy_and_restarts_from_disk() {
    let bus: Arc<dyn Bus> = Arc::new(LocalBus::new());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let app = ns("app");
    let (a, _) = open(da.path(), "a", bus.clone());
    for i in 0..20 {
        a.set_add(&app, Scope::Region, "s", format!("m{i}"))
            .await
            .unwrap();
    }
    a.set_remove(&app, Scope::Region, "s", "m3".into())
        .await
        .unwrap();
    a.counter_inc(&app, Scope::Region, "c", 7).await.unwrap();
    // B joins late: it saw none of the deltas, anti-entropy brings it all.
    let (b, mb) = open(db.path(), "b", bus.clone());
    eventually("b repaired", || {
        b.set_members(&app, Scope::Region, "s").unwrap().len() == 19
            && b.counter_value(&app, Scope::Region, "c").unwrap() == 7
    })
    .await;
    assert!(mb.deltas_received.get() >= 1);
    assert!(!b.set_contains(&app, Scope::Region, "s", "m3").unwrap());
    // Restart A from disk with its acknowledged state, on a fresh bus.
    drop(a);
    let (a, _) = open(da.path(), "a", Arc::new(LocalBus::new()));
    assert_eq!(a.counter_value(&app, Scope::Region, "c").unwrap(), 7);
    assert_eq!(a.set_members(&app, Scope::Region, "s").unwrap().len(), 19);
    // Its next increment uses its own slot, continuing from disk.
    assert_eq!(a.counter_inc(&app, Scope::Region, "c", 1).await.unwrap(), 8);
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path(), "a", Arc::new(LocalBus::new()));
    let app = ns("app");
    let limit = |e: StoreError| matches!(e, StoreError::Limit(_));
    assert!(matches!(
        s.counter_inc(&app, Scope::Region, "", 1).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(limit(
        s.counter_inc(&app, Scope::Region, &"n".repeat(65), 1)
            .await
            .unwrap_err()
    ));
    assert!(limit(
        s.set_add(&app, Scope::Region, "s", "m".repeat(65))
            .await
            .unwrap_err()
    ));
    // Refused writes leave no (empty) replica behind.
    assert_eq!(s.replica_count(), 0);
    assert!(limit(
        s.register_set(&app, Scope::Region, "r", vec![0; 257])
            .await
            .unwrap_err()
    ));
    // max_state_bytes = 2048: a map of 200-byte values fills up, and the
    // refused write leaves the map as it was.
    let mut accepted = 0;
    let err = loop {
        match s
            .map_set(
                &app,
                Scope::Region,
                "m",
                format!("k{accepted}"),
                vec![1; 200],
            )
            .await
        {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 100, "max_state_bytes never applied");
    };
    assert!(limit(err));
    assert_eq!(
        s.map_keys(&app, Scope::Region, "m").unwrap().len(),
        accepted
    );
    assert_eq!(
        s.map_get(&app, Scope::Region, "m", &format!("k{accepted}"))
            .unwrap(),
        None
    );
    // Counters saturate instead of overflowing.
    s.counter_inc(&app, Scope::Edge, "big", u64::MAX)
        .await
        .unwrap();
    s.counter_inc(&app, Scope::Edge, "big", u64::MAX)
        .await
        .unwrap();
    assert_eq!(s.counter_value(&app, Scope::Edge, "big").unwrap(), i64::MAX);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_repairs_more_crdts_than_one_digest_message_holds() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let app = ns("app");
    // Each side writes alone (separate buses), so only anti-entropy can
    // bring them together, across several digest chunks per side.
    {
        let (a, _) = open(da.path(), "a", Arc::new(LocalBus::new()));
        let (b, _) = open(db.path(), "b", Arc::new(LocalBus::new()));
        for i in 0..1200 {
            let node = if i < 600 { &b } else { &a };
            node.counter_inc(&app, Scope::Region, &format!("c{i:04}"), 1)
                .await
                .unwrap();
        }
    }
    let bus: Arc<dyn Bus> = Arc::new(LocalBus::new());
    let (a, _) = open(da.path(), "a", bus.clone());
    let (b, mb) = open(db.path(), "b", bus.clone());
    let all_there = |s: &Sync| {
        (0..1200).all(|i| {
            s.counter_value(&app, Scope::Region, &format!("c{i:04}"))
                .unwrap()
                == 1
        })
    };
    eventually("both have all 1200", || all_there(&a) && all_there(&b)).await;
    assert!(mb.digests_sent.get() >= 2, "digests were chunked");
}
