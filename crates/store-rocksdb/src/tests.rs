use super::*;
use std::collections::BTreeSet;

fn options(forwarding: bool) -> RocksOptions {
    RocksOptions {
        limits: StoreLimits {
            max_value_bytes: 1024,
            list_page: 3,
            ..StoreLimits::default()
        },
        node: NodeIdentity {
            edge: "fra".into(),
            region: "eu".into(),
        },
        forwarding,
        block_cache_bytes: 1 << 20,
    }
}

fn ns(n: &str) -> Namespace {
    Namespace::new(n).unwrap()
}

fn event(kind: &str, payload: &[u8]) -> EventData {
    EventData {
        kind: kind.into(),
        key: "k".into(),
        payload: payload.to_vec(),
        content_type: None,
        user: None,
    }
}

#[tokio::test]
async fn kv_is_namespaced_per_component() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    let (a, b, ab) = (ns("a"), ns("b"), ns("a-b"));
    s.set(&a, "k".into(), b"A".to_vec()).await.unwrap();
    s.set(&ab, "k".into(), b"AB".to_vec()).await.unwrap();
    assert_eq!(s.get(&a, "k").unwrap(), Some(b"A".to_vec()));
    assert_eq!(s.get(&b, "k").unwrap(), None);
    assert!(!s.exists(&b, "k").unwrap());
    assert_eq!(s.list_keys(&a, "", None, 10).unwrap(), vec!["k"]);
    assert_eq!(s.list_keys(&b, "", None, 10).unwrap(), Vec::<String>::new());
    // Deleting in B does not touch A.
    s.delete(&b, "k".into()).await.unwrap();
    assert_eq!(s.get(&a, "k").unwrap(), Some(b"A".to_vec()));
}

#[tokio::test]
async fn list_keys_pages_by_cursor_within_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    let a = ns("a");
    for k in ["u/1", "u/2", "u/3", "u/4", "v/1"] {
        s.set(&a, k.into(), vec![1]).await.unwrap();
    }
    let p1 = s.list_keys(&a, "u/", None, 3).unwrap();
    assert_eq!(p1, vec!["u/1", "u/2", "u/3"]);
    let p2 = s.list_keys(&a, "u/", Some("u/3"), 3).unwrap();
    assert_eq!(p2, vec!["u/4"]);
    // A cursor before the prefix cannot widen the scan.
    assert_eq!(s.list_keys(&a, "v/", Some("a"), 3).unwrap(), vec!["v/1"]);
}

#[tokio::test]
async fn oversized_and_empty_keys_are_invalid_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    let a = ns("a");
    let err = s.set(&a, "k".into(), vec![0; 1025]).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(s.get(&a, "k").unwrap(), None);
    assert!(matches!(
        s.set(&a, String::new(), vec![]).await,
        Err(StoreError::Invalid(_))
    ));
    let long = "x".repeat(1025);
    assert!(matches!(s.get(&a, &long), Err(StoreError::Invalid(_))));
}

#[tokio::test]
async fn compare_and_swap_is_atomic_under_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    let a = ns("a");
    assert!(
        s.compare_and_swap(&a, "n".into(), None, 0u64.to_be_bytes().to_vec())
            .await
            .unwrap()
    );
    assert!(
        !s.compare_and_swap(&a, "n".into(), None, vec![9])
            .await
            .unwrap()
    );
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (s, a) = (s.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                loop {
                    let cur = s.get(&a, "n").unwrap().unwrap();
                    let n = u64::from_be_bytes(cur.clone().try_into().unwrap());
                    let next = (n + 1).to_be_bytes().to_vec();
                    if s.compare_and_swap(&a, "n".into(), Some(cur), next)
                        .await
                        .unwrap()
                    {
                        break;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = s.get(&a, "n").unwrap().unwrap();
    assert_eq!(u64::from_be_bytes(n.try_into().unwrap()), 400);
}

#[tokio::test]
async fn events_are_gapless_per_component_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (ns("a"), ns("b"));
    {
        let s = RocksStore::open(dir.path(), options(false)).unwrap();
        assert_eq!(s.last_sequence(&a).unwrap(), None);
        let mut tasks = Vec::new();
        for i in 0..64u32 {
            let (s, a) = (s.clone(), a.clone());
            tasks.push(tokio::spawn(async move {
                s.append(&a, event("e", &i.to_be_bytes()), true)
                    .await
                    .unwrap()
            }));
        }
        let mut seqs = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for t in tasks {
            let e = t.await.unwrap();
            seqs.insert(e.sequence);
            assert!(e.id.starts_with("fra:"));
            ids.insert(e.id);
        }
        assert_eq!(seqs, (1..=64).collect());
        assert_eq!(ids.len(), 64);
        let e = s.append(&b, event("e", b"b"), false).await.unwrap();
        assert_eq!(e.sequence, 1, "sequences are per component");
        // Embedded node: nothing is queued for a region.
        assert!(s.outbox_peek(0, 10).unwrap().is_empty());
    }
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    assert_eq!(s.last_sequence(&a).unwrap(), Some(64));
    let all = s.read(&a, 1, 1000).unwrap();
    assert_eq!(all.len(), 64);
    assert!(all.windows(2).all(|w| w[0].sequence + 1 == w[1].sequence));
    assert!(
        all.windows(2).all(|w| w[0].at < w[1].at),
        "HLC order equals log order"
    );
    assert_eq!(s.read(&a, 60, 2).unwrap().len(), 2);
    assert!(s.read(&a, 65, 10).unwrap().is_empty());
    assert_eq!(s.read(&b, 1, 10).unwrap().len(), 1);
    let next = s.append(&a, event("e", b"x"), false).await.unwrap();
    assert_eq!(next.sequence, 65);
}

#[tokio::test]
async fn forwarded_writes_land_in_the_outbox_in_the_same_batch() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    let signal = s.outbox_signal();
    let a = ns("a");
    let e1 = s.append(&a, event("e", b"1"), true).await.unwrap();
    // The forwarder is woken only after the write is durable.
    tokio::time::timeout(std::time::Duration::from_secs(5), signal.notified())
        .await
        .expect("outbox signal after a forwarded write");
    s.append(&a, event("e", b"local"), false).await.unwrap();
    s.record_activity(
        &a,
        "u1".into(),
        Activity {
            kind: "login".into(),
            attributes: vec![],
        },
    )
    .await
    .unwrap();
    let out = s.outbox_peek(0, 10).unwrap();
    // Outbox sequences are gapless even though the local-only event took a
    // node sequence in between.
    assert_eq!(out.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
    match &out[0].1 {
        OutboxEntry::Event { component, event } => {
            assert_eq!(component, "a");
            assert_eq!(event, &e1);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(out[1].1, OutboxEntry::Activity { .. }));
    assert_eq!(s.outbox_depth().unwrap(), 2);
    assert_eq!(s.outbox_peek(1, 10).unwrap().len(), 1);
    s.outbox_ack(1).await.unwrap();
    assert_eq!(s.outbox_peek(0, 10).unwrap().len(), 1);
    assert_eq!(s.outbox_depth().unwrap(), 1);
    // Acknowledging again, or beyond the last entry, changes nothing wrong.
    s.outbox_ack(1).await.unwrap();
    s.outbox_ack(99).await.unwrap();
    assert!(s.outbox_peek(0, 10).unwrap().is_empty());
    assert_eq!(s.outbox_depth().unwrap(), 0);
    // Sequences continue after a restart.
    drop(s);
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    s.append(&a, event("e", b"3"), true).await.unwrap();
    assert_eq!(s.outbox_peek(0, 10).unwrap()[0].0, 3);
    assert_eq!(s.outbox_depth().unwrap(), 1);
}

#[tokio::test]
async fn oversized_event_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(false);
    o.limits.max_event_bytes = 100;
    let s = RocksStore::open(dir.path(), o).unwrap();
    let a = ns("a");
    assert!(matches!(
        s.append(&a, event("e", &[0; 200]), true).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(s.last_sequence(&a).unwrap(), None);
}

#[tokio::test]
async fn state_versions_preferences_activity_and_directory() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    let (a, b) = (ns("a"), ns("b"));
    assert_eq!(s.get_state(&a, "k").unwrap(), None);
    assert_eq!(s.set_state(&a, "k".into(), b"1".to_vec()).await.unwrap(), 1);
    assert_eq!(s.set_state(&a, "k".into(), b"2".to_vec()).await.unwrap(), 2);
    let v = s.get_state(&a, "k").unwrap().unwrap();
    assert_eq!((v.value.as_slice(), v.version), (&b"2"[..], 2));
    assert_eq!(s.get_state(&b, "k").unwrap(), None);

    s.set_preference(&a, "u".into(), "lang".into(), Some("de".into()))
        .await
        .unwrap();
    s.set_preference(&a, "u".into(), "tz".into(), Some("CET".into()))
        .await
        .unwrap();
    // A user id that is a prefix of another must not see its preferences.
    s.set_preference(&a, "u2".into(), "lang".into(), Some("fr".into()))
        .await
        .unwrap();
    assert_eq!(
        s.preferences(&a, "u").unwrap(),
        vec![("lang".into(), "de".into()), ("tz".into(), "CET".into())]
    );
    s.set_preference(&a, "u".into(), "tz".into(), None)
        .await
        .unwrap();
    assert_eq!(s.preferences(&a, "u").unwrap().len(), 1);
    assert!(s.preferences(&b, "u").unwrap().is_empty());

    let act = Activity {
        kind: "message.sent".into(),
        attributes: vec![("room".into(), "1".into())],
    };
    s.record_activity(&a, "u".into(), act.clone())
        .await
        .unwrap();
    let rec = s.last_activity(&a, "u").unwrap().unwrap();
    assert_eq!((rec.activity, rec.edge.as_str()), (act, "fra"));

    assert_eq!(s.user_region("u").unwrap(), None);
    assert_eq!(
        s.register_user("u".into(), "eu".into()).await.unwrap(),
        "eu"
    );
    assert_eq!(
        s.register_user("u".into(), "us".into()).await.unwrap(),
        "eu",
        "first registration wins"
    );
    assert_eq!(s.user_region("u").unwrap().as_deref(), Some("eu"));
}

/// A small tmpfs, unmounted on drop. Mounting needs root (CI runs as root);
/// elsewhere the disk-full test cannot run and says so.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn disk_full_is_unavailable_and_loses_no_acknowledged_write() {
    let Some(disk) = SmallDisk::mount("6M") else {
        assert!(
            !cfg!(target_os = "linux") || is_not_root(),
            "running as root but cannot mount a tmpfs"
        );
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let mut o = options(false);
    o.limits.max_value_bytes = 256 * 1024;
    let s = RocksStore::open(disk.dir.path(), o).unwrap();
    let a = ns("a");
    let mut acked = Vec::new();
    let err = loop {
        let key = format!("k{}", acked.len());
        match s
            .set(&a, key.clone(), vec![acked.len() as u8; 200 * 1024])
            .await
        {
            Ok(()) => acked.push(key),
            Err(e) => break e,
        }
        assert!(acked.len() < 1000, "a 6 MiB disk never filled up");
    };
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(!acked.is_empty());
    for (i, k) in acked.iter().enumerate() {
        assert_eq!(
            s.get(&a, k).unwrap().as_deref(),
            Some(&vec![i as u8; 200 * 1024][..]),
            "acknowledged {k} lost"
        );
    }
}

fn is_not_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout != b"0\n")
}

#[tokio::test]
async fn crdt_states_persist_per_namespace_and_incarnation_is_stable() {
    let dir = tempfile::tempdir().unwrap();
    let a = Namespace::new("a").unwrap();
    let b = Namespace::new("b").unwrap();
    let incarnation = {
        let s = RocksStore::open(dir.path(), options(false)).unwrap();
        s.save_crdt(&a, b"c/x".to_vec(), b"one".to_vec())
            .await
            .unwrap();
        s.save_crdt(&a, b"c/x".to_vec(), b"two".to_vec())
            .await
            .unwrap();
        s.save_crdt(&b, b"c/x".to_vec(), b"other".to_vec())
            .await
            .unwrap();
        assert_eq!(s.load_crdt(&a, b"c/x").unwrap(), Some(b"two".to_vec()));
        assert_eq!(s.load_crdt(&a, b"c/y").unwrap(), None);
        s.incarnation()
    };
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    assert_eq!(s.incarnation(), incarnation);
    let mut all = s.all_crdts().unwrap();
    all.sort();
    assert_eq!(
        all,
        vec![
            StoredCrdt {
                ns: a,
                id: b"c/x".to_vec(),
                state: b"two".to_vec()
            },
            StoredCrdt {
                ns: b,
                id: b"c/x".to_vec(),
                state: b"other".to_vec()
            }
        ]
    );
    let fresh = tempfile::tempdir().unwrap();
    assert_ne!(
        RocksStore::open(fresh.path(), options(false))
            .unwrap()
            .incarnation(),
        incarnation
    );
}

#[tokio::test]
async fn append_batch_is_atomic_and_reports_its_outbox_position() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(true);
    o.limits.max_event_bytes = 100;
    let s = RocksStore::open(dir.path(), o).unwrap();
    let a = ns("a");
    let b = s
        .append_batch(&a, vec![event("x", b"1"), event("y", b"2")], true)
        .await
        .unwrap();
    assert_eq!(
        b.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(b.last_outbox_seq, Some(2));
    assert_eq!(s.outbox_positions().unwrap(), (2, 0));
    // One bad event refuses the whole batch, naming it.
    let err = s
        .append_batch(&a, vec![event("ok", b"3"), event("e", &[0; 200])], true)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid(m) if m.starts_with("event 1: ")),
        "{err:?}"
    );
    assert_eq!(s.last_sequence(&a).unwrap(), Some(2));
    assert_eq!(s.outbox_positions().unwrap(), (2, 0));
    // Too many events: `Limit`, nothing written.
    let many = (0..1025).map(|_| event("e", b"")).collect();
    assert!(matches!(
        s.append_batch(&a, many, true).await,
        Err(StoreError::Limit(_))
    ));
    // Not forwarded: nothing queued, no position.
    let local = s
        .append_batch(&a, vec![event("z", b"")], false)
        .await
        .unwrap();
    assert_eq!(local.last_outbox_seq, None);
    s.outbox_ack(1).await.unwrap();
    assert_eq!(s.outbox_positions().unwrap(), (2, 1));
}

#[tokio::test]
async fn metrics_are_queued_for_the_region_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    let a = ns("a");
    s.record_metric(&a, "latency".into(), 12.5).await.unwrap();
    for bad in [f64::NAN, f64::INFINITY] {
        assert!(matches!(
            s.record_metric(&a, "latency".into(), bad).await,
            Err(StoreError::Invalid(_))
        ));
    }
    assert!(matches!(
        s.record_metric(&a, String::new(), 1.0).await,
        Err(StoreError::Invalid(_))
    ));
    let out = s.outbox_peek(0, 10).unwrap();
    assert_eq!(out.len(), 1);
    match &out[0].1 {
        OutboxEntry::Metric {
            component,
            metric,
            value,
            edge,
            ..
        } => {
            assert_eq!((component.as_str(), metric.as_str()), ("a", "latency"));
            assert_eq!((*value, edge.as_str()), (12.5, "fra"));
        }
        other => panic!("{other:?}"),
    }
    // A node that does not forward says so instead of dropping the sample.
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    assert!(matches!(
        s.record_metric(&a, "latency".into(), 1.0).await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn host_records_are_kept_per_table_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    s.put_host_record("subs", "a/1".into(), b"one".to_vec())
        .await
        .unwrap();
    s.put_host_record("subs", "a/2".into(), b"two".to_vec())
        .await
        .unwrap();
    s.put_host_record("subsx", "a/1".into(), b"other".to_vec())
        .await
        .unwrap();
    // A guest's kv key that looks like the record changes nothing.
    s.set(&ns("subs"), "a/1".into(), b"guest".to_vec())
        .await
        .unwrap();
    drop(s);
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    assert_eq!(
        s.host_records("subs").unwrap(),
        [
            ("a/1".to_string(), b"one".to_vec()),
            ("a/2".to_string(), b"two".to_vec())
        ]
    );
    assert_eq!(
        s.host_record("subsx", "a/1").unwrap(),
        Some(b"other".to_vec())
    );
    s.delete_host_record("subs", "a/1".into()).await.unwrap();
    assert_eq!(s.host_record("subs", "a/1").unwrap(), None);
    assert_eq!(s.host_records("subs").unwrap().len(), 1);
}

#[tokio::test]
async fn a_global_event_id_is_queued_once_per_component_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let ev = |id: &str| GlobalEvent {
        id: id.into(),
        event_type: "user.registered".into(),
        subject: None,
        content_type: None,
        data: b"d".to_vec(),
        user: None,
    };
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    s.queue_global_event(&ns("a"), ev("e1")).await.unwrap();
    s.queue_global_event(&ns("a"), ev("e1")).await.unwrap();
    // Another component's id space is its own.
    s.queue_global_event(&ns("b"), ev("e1")).await.unwrap();
    assert_eq!(s.outbox_positions().unwrap(), (2, 0));
    s.outbox_ack(2).await.unwrap();
    drop(s);
    // Long after the stream's dedup window: still once.
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    s.queue_global_event(&ns("a"), ev("e1")).await.unwrap();
    s.queue_global_event(&ns("a"), ev("e2")).await.unwrap();
    let out = s.outbox_peek(0, 10).unwrap();
    assert_eq!(out.len(), 1);
    assert!(matches!(&out[0].1, OutboxEntry::Global { event, .. } if event.id == "e2"));
}

#[tokio::test]
async fn expiring_host_records_vanish_and_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    let now = now_ms();
    let put = |key: &str, value: &[u8], expires_at_ms: u64| HostWrite::PutExpiring {
        table: "seen",
        key: key.into(),
        value: value.to_vec(),
        expires_at_ms,
    };
    s.write_host_records(vec![
        put("old", b"1", now - 1),
        put("live", b"2", now + 60_000),
        put("again", b"3", now - 1),
        HostWrite::Put {
            table: "seen",
            key: "plain".into(),
            value: b"4".to_vec(),
        },
    ])
    .await
    .unwrap();
    assert_eq!(s.expiring_host_record("seen", "old").unwrap(), None);
    assert_eq!(
        s.expiring_host_record("seen", "live").unwrap(),
        Some(b"2".to_vec())
    );
    // Expiring and plain tables of one name are apart.
    assert_eq!(s.expiring_host_record("seen", "plain").unwrap(), None);
    assert_eq!(s.host_record("seen", "plain").unwrap(), Some(b"4".to_vec()));
    assert_eq!(s.host_record("seen", "live").unwrap(), None);
    // Rewritten with a later expiry: the old index entry must not prune it.
    s.write_host_records(vec![put("again", b"5", now + 60_000)])
        .await
        .unwrap();
    // The next write prunes what expired (old), and keeps the rest.
    s.write_host_records(vec![]).await.unwrap();
    let meta = |prefix: &[u8]| {
        let db = &s.inner.db;
        let mut it = db.raw_iterator_cf(committer::handle(db, Cf::Meta).unwrap());
        it.seek(prefix);
        let mut n = 0;
        while it.key().is_some_and(|k| k.starts_with(prefix)) {
            n += 1;
            it.next();
        }
        n
    };
    assert_eq!(meta(b"x\0"), 2, "old is gone, live and again remain");
    assert_eq!(meta(keys::EXPIRY_INDEX_PREFIX), 2);
    assert_eq!(
        s.expiring_host_record("seen", "again").unwrap(),
        Some(b"5".to_vec())
    );
}
