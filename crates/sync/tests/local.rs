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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaderboards_converge_to_summed_scores_and_survive_a_restart() {
    let bus: Arc<dyn Bus> = Arc::new(LocalBus::new());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, _) = open(da.path(), "a", bus.clone());
    let (b, _) = open(db.path(), "b", bus.clone());
    let app = ns("app");
    let up = |v: &[(&str, i64)]| -> Vec<(String, i64)> {
        v.iter().map(|&(m, d)| (m.to_string(), d)).collect()
    };
    // Both nodes update the same members at the same time.
    let (ra, rb) = tokio::join!(
        a.leaderboard_update(
            &app,
            Scope::Region,
            "weekly",
            up(&[("alice", 10), ("bob", 5), ("carol", -3)])
        ),
        b.leaderboard_update(
            &app,
            Scope::Region,
            "weekly",
            up(&[("alice", -4), ("bob", 1), ("dave", 6), ("alice", 2)])
        ),
    );
    ra.unwrap();
    rb.unwrap();
    let mut writes = Vec::new();
    for i in 0..20 {
        let (node, by) = if i % 2 == 0 { (&a, 1) } else { (&b, 2) };
        writes.push(node.leaderboard_update(&app, Scope::Region, "hot", up(&[("x", by)])));
    }
    for w in writes {
        w.await.unwrap();
    }
    a.leaderboard_update(&app, Scope::Edge, "weekly", up(&[("local", 1)]))
        .await
        .unwrap();
    let expected = vec![
        (1, "alice".to_string(), 8),
        (2, "bob".to_string(), 6),
        (2, "dave".to_string(), 6),
        (4, "carol".to_string(), -3),
    ];
    eventually("summed scores on both nodes", || {
        [&a, &b].iter().all(|s| {
            s.leaderboard_top(&app, Scope::Region, "weekly", 10)
                .unwrap()
                == expected
                && s.leaderboard_top(&app, Scope::Region, "hot", 10).unwrap()
                    == vec![(1, "x".to_string(), 30)]
        })
    })
    .await;
    // Limits cut the ranking, ties keep their shared rank.
    assert_eq!(
        b.leaderboard_top(&app, Scope::Region, "weekly", 2).unwrap(),
        expected[..2].to_vec()
    );
    assert!(
        b.leaderboard_top(&app, Scope::Region, "weekly", 0)
            .unwrap()
            .is_empty()
    );
    assert!(
        b.leaderboard_top(&app, Scope::Region, "never", 10)
            .unwrap()
            .is_empty()
    );
    // Edge scope stays local; kinds do not collide with same-named CRDTs.
    assert!(
        b.leaderboard_top(&app, Scope::Edge, "weekly", 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(a.counter_value(&app, Scope::Region, "weekly").unwrap(), 0);
    // Restart A from disk on a fresh bus: the merged state is there.
    drop(a);
    let (a, _) = open(da.path(), "a", Arc::new(LocalBus::new()));
    assert_eq!(
        a.leaderboard_top(&app, Scope::Region, "weekly", 10)
            .unwrap(),
        expected
    );
    assert_eq!(
        a.leaderboard_top(&app, Scope::Edge, "weekly", 10).unwrap(),
        vec![(1, "local".to_string(), 1)]
    );
    // Its next update continues from its own persisted slot.
    a.leaderboard_update(&app, Scope::Region, "weekly", up(&[("carol", 20)]))
        .await
        .unwrap();
    assert_eq!(
        a.leaderboard_top(&app, Scope::Region, "weekly", 1).unwrap(),
        vec![(1, "carol".to_string(), 17)]
    );
}

#[tokio::test]
async fn leaderboard_limits_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path(), "a", Arc::new(LocalBus::new()));
    let app = ns("app");
    let invalid = |e: StoreError| matches!(e, StoreError::Invalid(_));
    let limit = |e: StoreError| matches!(e, StoreError::Limit(_));
    let top = |name: &str| {
        s.leaderboard_top(&app, Scope::Region, name, u32::MAX)
            .unwrap()
    };
    let ok = || ("ok".to_string(), 5);
    assert!(invalid(
        s.leaderboard_update(&app, Scope::Region, "", vec![ok()])
            .await
            .unwrap_err()
    ));
    assert!(limit(
        s.leaderboard_update(&app, Scope::Region, &"n".repeat(65), vec![ok()])
            .await
            .unwrap_err()
    ));
    // One bad member refuses the whole call, including the valid updates.
    assert!(invalid(
        s.leaderboard_update(&app, Scope::Region, "b", vec![ok(), (String::new(), 1)])
            .await
            .unwrap_err()
    ));
    assert!(limit(
        s.leaderboard_update(&app, Scope::Region, "b", vec![ok(), ("m".repeat(65), 1)])
            .await
            .unwrap_err()
    ));
    assert!(limit(
        s.leaderboard_update(&app, Scope::Region, "b", vec![ok(); 1025])
            .await
            .unwrap_err()
    ));
    assert_eq!(s.replica_count(), 0, "refused writes leave no replica");
    assert!(top("b").is_empty());
    // 1024 updates is fine, and applied as one mutation.
    s.leaderboard_update(&app, Scope::Region, "b", vec![ok(); 1024])
        .await
        .unwrap();
    assert_eq!(top("b"), vec![(1, "ok".to_string(), 5 * 1024)]);
    assert!(limit(
        s.leaderboard_update(&app, Scope::Region, "b", vec![ok(); 1025])
            .await
            .unwrap_err()
    ));
    assert_eq!(top("b"), vec![(1, "ok".to_string(), 5 * 1024)]);
    // max_state_bytes = 2048: batches of three 60-byte members fill the
    // board; the refused batch is not partially applied.
    let mut accepted = 0;
    let err = loop {
        let batch = (0..3)
            .map(|j| (format!("{:060}", accepted * 3 + j), 1))
            .collect();
        match s
            .leaderboard_update(&app, Scope::Region, "full", batch)
            .await
        {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 100, "max_state_bytes never applied");
    };
    assert!(limit(err));
    assert!(accepted > 0);
    assert_eq!(top("full").len(), accepted * 3);
    // Extreme deltas neither panic nor wrap.
    s.leaderboard_update(
        &app,
        Scope::Edge,
        "x",
        vec![
            ("lo".into(), i64::MIN),
            ("lo".into(), i64::MIN),
            ("hi".into(), i64::MAX),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        s.leaderboard_top(&app, Scope::Edge, "x", 5).unwrap(),
        vec![
            (1, "hi".to_string(), i64::MAX),
            (2, "lo".to_string(), i64::MIN)
        ]
    );
}

/// GDPR erasure on two replicas at once: the user's members, entries and
/// scores go, CRDTs named under the user's declared prefix go whole (a
/// counter and a leaderboard by each replica cancelling its own part, so
/// erasing on both at once ends at 0, not below), others' data stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasing_a_user_on_every_replica_at_once_leaves_nothing_of_theirs() {
    use keel_sync::UserCrdtValue;
    let bus: Arc<dyn Bus> = Arc::new(LocalBus::new());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, _) = open(da.path(), "a", bus.clone());
    let (b, _) = open(db.path(), "b", bus.clone());
    let app = ns("app");
    let personal = [(app.clone(), vec!["user/alice/".to_string()])];
    let g = Scope::Global;
    for (replica, by) in [(&a, 3), (&b, 4)] {
        replica
            .counter_inc(&app, g, "user/alice/sent", by)
            .await
            .unwrap();
        replica
            .counter_inc(&app, g, "user/bob/sent", 1)
            .await
            .unwrap();
        replica
            .leaderboard_update(
                &app,
                Scope::Region,
                "top",
                vec![("alice".into(), by as i64), ("bob".into(), 1)],
            )
            .await
            .unwrap();
    }
    a.set_add(&app, g, "user/alice/rooms", "lobby".into())
        .await
        .unwrap();
    a.set_add(&app, g, "online", "alice".into()).await.unwrap();
    a.set_add(&app, g, "online", "bob".into()).await.unwrap();
    b.map_set(
        &app,
        g,
        "user/alice/prefs",
        "theme".into(),
        b"dark".to_vec(),
    )
    .await
    .unwrap();
    b.map_set(&app, g, "names", "alice".into(), b"Alice".to_vec())
        .await
        .unwrap();
    b.register_set(&app, g, "user/alice/bio", b"hi".to_vec())
        .await
        .unwrap();
    eventually("both replicas hold everything", || {
        [&a, &b].iter().all(|r| {
            r.counter_value(&app, g, "user/alice/sent").unwrap() == 7
                && r.leaderboard_top(&app, Scope::Region, "top", 1).unwrap()[0].2 == 7
                && r.register_get(&app, g, "user/alice/bio").unwrap().is_some()
                && r.map_get(&app, g, "names", "alice").unwrap().is_some()
                && r.export_user("alice", &personal).unwrap().len() == 7
        })
    })
    .await;
    let exported = a.export_user("alice", &personal).unwrap();
    let sent = exported
        .iter()
        .find(|e| e.name == "user/alice/sent")
        .unwrap();
    assert_eq!(sent.entry, UserCrdtValue::Count(7));
    let rooms = exported
        .iter()
        .find(|e| e.name == "user/alice/rooms")
        .unwrap();
    assert_eq!(rooms.entry, UserCrdtValue::Members(vec!["lobby".into()]));
    let online = exported.iter().find(|e| e.name == "online").unwrap();
    assert_eq!(online.entry, UserCrdtValue::Member);
    assert!(
        exported.iter().all(|e| !e.name.contains("bob")),
        "{exported:?}"
    );

    // Both erase before seeing each other's erasure.
    let (ea, eb) = tokio::join!(
        a.erase_user("alice", &personal),
        b.erase_user("alice", &personal)
    );
    assert!(ea.unwrap() >= 4 && eb.unwrap() >= 3);
    eventually("nothing of alice is left anywhere", || {
        [&a, &b]
            .iter()
            .all(|r| r.export_user("alice", &personal).unwrap().is_empty())
    })
    .await;
    for r in [&a, &b] {
        assert_eq!(
            r.counter_value(&app, g, "user/alice/sent").unwrap(),
            0,
            "not below 0"
        );
        assert_eq!(r.counter_value(&app, g, "user/bob/sent").unwrap(), 2);
        let top = r.leaderboard_top(&app, Scope::Region, "top", 10).unwrap();
        assert!(top.contains(&(1, "bob".to_string(), 2)), "{top:?}");
        assert!(
            top.iter().all(|(_, m, s)| m != "alice" || *s == 0),
            "{top:?}"
        );
        assert!(r.set_contains(&app, g, "online", "bob").unwrap());
        assert_eq!(r.map_get(&app, g, "names", "alice").unwrap(), None);
        assert_eq!(
            r.register_get(&app, g, "user/alice/bio").unwrap(),
            Some(Vec::new())
        );
    }
    // Idempotent.
    assert_eq!(a.erase_user("alice", &personal).await.unwrap(), 0);
}
