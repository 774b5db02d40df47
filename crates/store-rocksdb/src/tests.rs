use super::*;
use keel_store::{ERASED_EVENT_KIND, ErasedUser, UserDataStore, UserRecords};
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

/// Many writers on many threads form many groups, each reading the
/// sequence counters the groups before it wrote (and a group keeps only a
/// counter's last value): gapless in the log and in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_writers_on_many_threads_get_gapless_sequences_in_log_and_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    let a = ns("a");
    let mut tasks = Vec::new();
    for w in 0..32u32 {
        let (s, a) = (s.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..100u32 {
                let e = event("e", &(w * 1000 + i).to_be_bytes());
                out.push(s.append(&a, e, true).await.unwrap());
            }
            out
        }));
    }
    let mut stored = Vec::new();
    for t in tasks {
        stored.extend(t.await.unwrap());
    }
    let seqs: BTreeSet<u64> = stored.iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, (1..=3200).collect(), "gapless, no duplicate");
    let ids: BTreeSet<&str> = stored.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 3200);
    let log = s.read(&a, 1, 5000).unwrap();
    assert_eq!(log.len(), 3200);
    let outbox = s.outbox_peek(0, 5000).unwrap();
    assert_eq!(
        outbox.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
        (1..=3200).collect::<Vec<_>>()
    );
    // The outbox holds the log's events, in log order.
    for ((_, entry), e) in outbox.iter().zip(&log) {
        match entry {
            OutboxEntry::Event { component, event } => {
                assert_eq!(component, "a");
                assert_eq!(event, e);
            }
            other => panic!("unexpected outbox entry {other:?}"),
        }
    }
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
    // (last appended, last acknowledged), read back at open.
    assert_eq!(s.outbox_positions().unwrap(), (2, 2));
    s.append(&a, event("e", b"3"), true).await.unwrap();
    assert_eq!(s.outbox_positions().unwrap(), (3, 2));
    assert_eq!(s.outbox_peek(0, 10).unwrap()[0].0, 3);
    assert_eq!(s.outbox_depth().unwrap(), 1);
}

#[tokio::test]
async fn a_forwarded_write_wakes_the_forwarder_even_if_its_caller_stopped_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    let signal = s.outbox_signal();
    // Queued when called; the caller (a cancelled request) never awaits it.
    drop(s.append(&ns("a"), event("e", b"1"), true));
    tokio::time::timeout(std::time::Duration::from_secs(5), signal.notified())
        .await
        .expect("outbox signal after a forwarded write nobody awaited");
    let out = s.outbox_peek(0, 10).unwrap();
    assert_eq!(out.len(), 1, "the signal comes after the entry is written");
}

/// A peek of a few waiting entries reads them by key, a longer one through
/// iterators: both return the same entries, over the gaps erasure leaves,
/// and entries of every kind (a reference to a logged event or not).
#[tokio::test]
async fn outbox_peeks_by_key_and_by_iterator_agree_across_erased_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    let a = ns("a");
    for i in 0..12 {
        if i % 5 == 3 {
            s.record_activity(&a, "bob".into(), activity("x"))
                .await
                .unwrap();
            continue;
        }
        let user = if i % 4 == 1 { "alice" } else { "bob" };
        let e = user_event("note", &format!("n{i}"), "p", Some(user));
        s.append(&a, e, true).await.unwrap();
    }
    s.erase_user("alice".into(), vec![]).await.unwrap();
    // Alice's events were entries 2, 6 and 10.
    let all = s.outbox_peek(0, 100).unwrap();
    let seqs: Vec<u64> = all.iter().map(|(q, _)| *q).collect();
    assert_eq!(seqs, [1, 3, 4, 5, 7, 8, 9, 11, 12]);
    assert!(matches!(all[2].1, OutboxEntry::Activity { .. }));
    assert!(matches!(all[3].1, OutboxEntry::Event { .. }));
    for after in 0..=13 {
        for limit in [1, 3, 8, 100] {
            let want: Vec<_> = all
                .iter()
                .filter(|(q, _)| *q > after)
                .take(limit)
                .cloned()
                .collect();
            assert_eq!(
                s.outbox_peek(after, limit).unwrap(),
                want,
                "after {after}, limit {limit}"
            );
        }
    }
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
    /// `None` (the test is skipped) only where mounting needs a root we
    /// are not; as root on Linux, failing to mount fails the test.
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                !cfg!(target_os = "linux") || is_not_root(),
                "running as root but cannot mount a tmpfs"
            );
            eprintln!("skipped: mounting a tmpfs needs root");
        }
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

/// Disk full under many concurrent appends: a failed group takes its
/// events and its sequence numbers with it (the next group reads the
/// counters as committed), so the log is exactly the acknowledged events,
/// gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_full_under_concurrent_appends_keeps_the_log_gapless_and_acknowledged() {
    let Some(disk) = SmallDisk::mount("8M") else {
        return;
    };
    let mut o = options(true);
    o.limits.max_event_bytes = 64 * 1024;
    let s = RocksStore::open(disk.dir.path(), o).unwrap();
    let a = ns("a");
    let mut tasks = Vec::new();
    for w in 0..32u8 {
        let (s, a) = (s.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..1000u32 {
                let mut payload = vec![w; 16 * 1024];
                payload[..4].copy_from_slice(&i.to_be_bytes());
                match s.append(&a, event("e", &payload), true).await {
                    Ok(e) => acked.push(e),
                    Err(e) => {
                        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
                        return acked;
                    }
                }
            }
            panic!("an 8 MiB disk never filled up");
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    acked.sort_by_key(|e| e.sequence);
    let log = s.read(&a, 1, 10_000).unwrap();
    assert_eq!(
        log.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=log.len() as u64).collect::<Vec<_>>(),
        "gapless"
    );
    assert_eq!(log, acked, "the log is exactly the acknowledged events");
}

fn is_not_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout != b"0\n")
}

/// Writes run in the order they were called, not the order their futures
/// are first awaited: `keel-sync` stages CRDT saves under its lock and
/// awaits them after releasing it, so two saves of one CRDT can be awaited
/// in the other order. The one called last must win.
#[tokio::test]
async fn writes_commit_in_call_order_whichever_future_is_awaited_first() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    let a = ns("a");
    for round in 0..50u32 {
        let older = s.save_crdt(&a, b"c/x".to_vec(), format!("{round}-older").into_bytes());
        let newer = s.save_crdt(&a, b"c/x".to_vec(), format!("{round}-newer").into_bytes());
        let kv_older = s.set(&a, "k".into(), format!("{round}-older").into_bytes());
        let kv_newer = s.set(&a, "k".into(), format!("{round}-newer").into_bytes());
        kv_newer.await.unwrap();
        newer.await.unwrap();
        older.await.unwrap();
        kv_older.await.unwrap();
        let want = format!("{round}-newer").into_bytes();
        assert_eq!(s.load_crdt(&a, b"c/x").unwrap(), Some(want.clone()));
        assert_eq!(s.get(&a, "k").unwrap(), Some(want));
    }
}

/// A key written many times in one group (here: by 200 writes queued before
/// the committer runs) ends at the last value, and every write before it
/// resolves as committed.
#[tokio::test]
async fn a_group_writing_one_key_many_times_keeps_the_last_value() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    let a = ns("a");
    let writes: Vec<_> = (0..200u32)
        .map(|i| s.set(&a, "k".into(), i.to_be_bytes().to_vec()))
        .collect();
    for w in writes {
        w.await.unwrap();
    }
    assert_eq!(s.get(&a, "k").unwrap(), Some(199u32.to_be_bytes().to_vec()));
    drop(s);
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    assert_eq!(s.get(&a, "k").unwrap(), Some(199u32.to_be_bytes().to_vec()));
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

/// Every file under `dir` (recursively), raw bytes.
fn all_files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_files(&path));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            out.push((path, bytes));
        }
    }
    out
}

/// The files under `dir` whose bytes contain `marker`.
fn files_with(dir: &Path, marker: &str) -> Vec<std::path::PathBuf> {
    all_files(dir)
        .into_iter()
        .filter(|(_, b)| b.windows(marker.len()).any(|w| w == marker.as_bytes()))
        .map(|(p, _)| p)
        .collect()
}

/// SST blocks are compressed (LZ4): a marker after a similar string is
/// stored as a back-reference, invisible to a byte scan. Without
/// compression, bytes present in a file are found (and absent ones are
/// truly absent); what is kept where does not depend on it.
fn uncompressed(s: &RocksStore) {
    let db = &s.inner.db;
    for cf in Cf::ALL {
        db.set_options_cf(
            committer::handle(db, cf).unwrap(),
            &[("compression", "kNoCompression")],
        )
        .unwrap();
    }
}

fn about_alice(e: &OutboxEntry) -> bool {
    match e {
        OutboxEntry::Event { event, .. } => event.data.user.as_deref() == Some("alice"),
        OutboxEntry::Activity { user, .. } => user == "alice",
        OutboxEntry::Global { event, .. } => event.user.as_deref() == Some("alice"),
        OutboxEntry::Metric { .. } => false,
    }
}

fn user_event(kind: &str, key: &str, payload: &str, user: Option<&str>) -> EventData {
    EventData {
        kind: kind.into(),
        key: key.into(),
        payload: payload.as_bytes().to_vec(),
        content_type: Some("text/plain".into()),
        user: user.map(Into::into),
    }
}

fn activity(marker: &str) -> Activity {
    Activity {
        kind: "login".into(),
        attributes: vec![("ip".into(), marker.into())],
    }
}

// Markers of the erased user all start with `MARKER-ALICE-`; the others'
// with `MARKER-KEEP-` (no marker is a substring of another).
const ALICE_MARKERS: [&str; 13] = [
    "MARKER-ALICE-PREF-7f3a",
    "MARKER-ALICE-PREFNAME-31c9",
    "MARKER-ALICE-PREF-OLD-5b0e",
    "MARKER-ALICE-ACT-a1b2",
    "MARKER-ALICE-ACT-B-c3d4",
    "MARKER-ALICE-EV-1-11aa",
    "MARKER-ALICE-EVKEY-33cc",
    "MARKER-ALICE-EV-B-66ff",
    "MARKER-ALICE-GLOBAL-77aa",
    "MARKER-ALICE-KV-1-99cc",
    "MARKER-ALICE-KVKEY-aa11",
    "MARKER-ALICE-KV-B-dd44",
    "MARKER-ALICE-REGION-e0f1",
];

/// Her markers that are part of keys (a preference name, a KV key).
const IN_KEYS: [&str; 2] = ["MARKER-ALICE-PREFNAME-31c9", "MARKER-ALICE-KVKEY-aa11"];

fn is_manifest(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("MANIFEST-"))
}

const KEEP_MARKERS: [&str; 12] = [
    "MARKER-KEEP-PREF-ALICE2-5d21",
    "MARKER-KEEP-PREF-ALIC-0b7e",
    "MARKER-KEEP-PREF-BOB-9a4f",
    "MARKER-KEEP-ACT-ALICE2-e5f6",
    "MARKER-KEEP-ACT-BOB-0a1b",
    "MARKER-KEEP-EV-BOB-22bb",
    "MARKER-KEEP-EV-ANON-44dd",
    "MARKER-KEEP-EV-ALICE2-55ee",
    "MARKER-KEEP-GLOBAL-BOB-88bb",
    "MARKER-KEEP-KV-ALICE2-bb22",
    "MARKER-KEEP-KV-BOB-cc33",
    "MARKER-KEEP-KV-B-ALICE2-ee55",
];

#[tokio::test]
async fn erase_user_leaves_no_byte_of_the_user_in_any_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    uncompressed(&s);
    let (a, b) = (ns("a"), ns("b"));
    let pref = |n: &Namespace, user: &str, name: &str, value: &str| {
        s.set_preference(n, user.into(), name.into(), Some(value.into()))
    };

    // First generation, pushed down to the bottommost level (as old data
    // would be): an old preference value, later overwritten.
    pref(&a, "alice", "lang", "MARKER-ALICE-PREF-OLD-5b0e")
        .await
        .unwrap();
    let bob_event = s
        .append(
            &a,
            user_event("note", "n1", "MARKER-KEEP-EV-BOB-22bb", Some("bob")),
            true,
        )
        .await
        .unwrap();
    let e1 = s
        .append(
            &a,
            user_event("note", "n2", "MARKER-ALICE-EV-1-11aa", Some("alice")),
            true,
        )
        .await
        .unwrap();
    s.set(
        &a,
        "user/alice/profile".into(),
        b"MARKER-ALICE-KV-1-99cc".to_vec(),
    )
    .await
    .unwrap();
    s.register_user("alice".into(), "MARKER-ALICE-REGION-e0f1".into())
        .await
        .unwrap();
    erase::purge(&s.inner.db).unwrap();
    // The region acknowledged bob's event (the first entry).
    s.outbox_ack(1).await.unwrap();

    // Second generation: in the memtables and the WAL.
    pref(&a, "alice", "lang", "MARKER-ALICE-PREF-7f3a")
        .await
        .unwrap();
    pref(&b, "alice", "MARKER-ALICE-PREFNAME-31c9", "1")
        .await
        .unwrap();
    // Ids that share a prefix with hers ("alice2", "alic") are not hers.
    pref(&a, "alice2", "lang", "MARKER-KEEP-PREF-ALICE2-5d21")
        .await
        .unwrap();
    pref(&a, "alic", "lang", "MARKER-KEEP-PREF-ALIC-0b7e")
        .await
        .unwrap();
    pref(&b, "bob", "lang", "MARKER-KEEP-PREF-BOB-9a4f")
        .await
        .unwrap();
    s.record_activity(&a, "alice".into(), activity("MARKER-ALICE-ACT-a1b2"))
        .await
        .unwrap();
    s.record_activity(&b, "alice".into(), activity("MARKER-ALICE-ACT-B-c3d4"))
        .await
        .unwrap();
    s.record_activity(&a, "alice2".into(), activity("MARKER-KEEP-ACT-ALICE2-e5f6"))
        .await
        .unwrap();
    s.record_activity(&a, "bob".into(), activity("MARKER-KEEP-ACT-BOB-0a1b"))
        .await
        .unwrap();
    let batch = s
        .append_batch(
            &a,
            vec![
                user_event("note", "MARKER-ALICE-EVKEY-33cc", "x", Some("alice")),
                user_event("ping", "p", "MARKER-KEEP-EV-ANON-44dd", None),
                user_event("note", "n3", "MARKER-KEEP-EV-ALICE2-55ee", Some("alice2")),
            ],
            true,
        )
        .await
        .unwrap();
    let e_b = s
        .append(
            &b,
            user_event("note", "n", "MARKER-ALICE-EV-B-66ff", Some("alice")),
            false,
        )
        .await
        .unwrap();
    s.set(
        &a,
        "user/alice/MARKER-ALICE-KVKEY-aa11".into(),
        b"v".to_vec(),
    )
    .await
    .unwrap();
    s.set(
        &a,
        "user/alice2/profile".into(),
        b"MARKER-KEEP-KV-ALICE2-bb22".to_vec(),
    )
    .await
    .unwrap();
    s.set(&a, "user/bob".into(), b"MARKER-KEEP-KV-BOB-cc33".to_vec())
        .await
        .unwrap();
    s.set(
        &b,
        "sessions/alice:1".into(),
        b"MARKER-ALICE-KV-B-dd44".to_vec(),
    )
    .await
    .unwrap();
    s.set(
        &b,
        "sessions/alice2:1".into(),
        b"MARKER-KEEP-KV-B-ALICE2-ee55".to_vec(),
    )
    .await
    .unwrap();
    s.register_user("bob".into(), "us".into()).await.unwrap();
    s.record_metric(&a, "latency".into(), 1.5).await.unwrap();
    let global = |id: &str, user: &str, data: &str| GlobalEvent {
        id: id.into(),
        event_type: "user.seen".into(),
        subject: None,
        content_type: None,
        data: data.as_bytes().to_vec(),
        user: Some(user.into()),
    };
    s.queue_global_event(&a, global("g1", "bob", "MARKER-KEEP-GLOBAL-BOB-88bb"))
        .await
        .unwrap();
    // Hers is the last entry: erasing it leaves a gap at the end.
    s.queue_global_event(&a, global("g2", "alice", "MARKER-ALICE-GLOBAL-77aa"))
        .await
        .unwrap();
    // Before: every marker is somewhere in the files (SST or WAL).
    for m in ALICE_MARKERS.iter().chain(&KEEP_MARKERS) {
        assert!(!files_with(dir.path(), m).is_empty(), "{m} not written");
    }

    let prefixes = vec![
        (a.clone(), vec!["user/alice/".to_string()]),
        (b.clone(), vec!["sessions/alice:".to_string()]),
        (ns("c"), vec!["user/alice/".to_string()]),
    ];

    // Export: exactly what was written, in order.
    let act_a = s.last_activity(&a, "alice").unwrap().unwrap();
    let act_b = s.last_activity(&b, "alice").unwrap().unwrap();
    let exported = s.export_user("alice", &prefixes).unwrap();
    assert_eq!(
        exported,
        UserRecords {
            preferences: vec![
                (
                    "a".into(),
                    vec![("lang".into(), "MARKER-ALICE-PREF-7f3a".into())]
                ),
                (
                    "b".into(),
                    vec![("MARKER-ALICE-PREFNAME-31c9".into(), "1".into())]
                ),
            ],
            activities: vec![("a".into(), act_a), ("b".into(), act_b)],
            events: vec![
                ("a".into(), e1.clone()),
                ("a".into(), batch.events[0].clone()),
                ("b".into(), e_b.clone()),
            ],
            kv: vec![
                (
                    "a".into(),
                    "user/alice/MARKER-ALICE-KVKEY-aa11".into(),
                    b"v".to_vec()
                ),
                (
                    "a".into(),
                    "user/alice/profile".into(),
                    b"MARKER-ALICE-KV-1-99cc".to_vec()
                ),
                (
                    "b".into(),
                    "sessions/alice:1".into(),
                    b"MARKER-ALICE-KV-B-dd44".to_vec()
                ),
            ],
            home_region: Some("MARKER-ALICE-REGION-e0f1".into()),
        }
    );

    // Refused before anything changes.
    for (user, prefixes) in [
        ("alice", vec![(a.clone(), vec![String::new()])]),
        ("", vec![]),
    ] {
        let err = s.erase_user(user.into(), prefixes).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    }
    assert!(matches!(
        s.export_user("alice", &[(a.clone(), vec![String::new()])]),
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(s.export_user("alice", &prefixes).unwrap(), exported);

    let (last_before, acked_before) = s.outbox_positions().unwrap();
    assert_eq!((last_before, acked_before), (12, 1));
    let erased = s
        .erase_user("alice".into(), prefixes.clone())
        .await
        .unwrap();
    assert_eq!(
        erased,
        ErasedUser {
            preferences: 2,
            activities: 2,
            events: 3,
            // e1, the batch's first, two activities, g2 (e_b was not forwarded).
            outbox_entries: 5,
            kv_keys: 3,
            directory: true,
        }
    );

    // Reads: hers are gone, the others' intact.
    assert!(s.preferences(&a, "alice").unwrap().is_empty());
    assert!(s.preferences(&b, "alice").unwrap().is_empty());
    assert_eq!(s.preferences(&a, "alice2").unwrap().len(), 1);
    assert_eq!(s.preferences(&a, "alic").unwrap().len(), 1);
    assert_eq!(s.preferences(&b, "bob").unwrap().len(), 1);
    assert_eq!(s.last_activity(&a, "alice").unwrap(), None);
    assert_eq!(s.last_activity(&b, "alice").unwrap(), None);
    assert!(s.last_activity(&a, "alice2").unwrap().is_some());
    assert!(s.last_activity(&a, "bob").unwrap().is_some());
    assert_eq!(s.user_region("alice").unwrap(), None);
    assert_eq!(s.user_region("bob").unwrap().as_deref(), Some("us"));
    assert_eq!(s.get(&a, "user/alice/profile").unwrap(), None);
    assert_eq!(
        s.list_keys(&a, "user/", None, 10).unwrap(),
        ["user/alice2/profile", "user/bob"]
    );
    assert_eq!(
        s.list_keys(&b, "", None, 10).unwrap(),
        ["sessions/alice2:1"]
    );

    // The logs stay gapless; her events keep their place and identity.
    let log = s.read(&a, 1, 100).unwrap();
    assert_eq!(
        log.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(log[0], bob_event);
    assert_eq!(log[3], batch.events[1]);
    assert_eq!(log[4], batch.events[2]);
    for (stored, original) in [(&log[1], &e1), (&log[2], &batch.events[0])] {
        assert_eq!(
            (
                &stored.id,
                stored.sequence,
                &stored.origin,
                &stored.region,
                &stored.at
            ),
            (
                &original.id,
                original.sequence,
                &original.origin,
                &original.region,
                &original.at
            )
        );
        assert_eq!(
            stored.data,
            EventData {
                kind: ERASED_EVENT_KIND.into(),
                key: String::new(),
                payload: Vec::new(),
                content_type: None,
                user: None,
            }
        );
    }
    let log_b = s.read(&b, 1, 100).unwrap();
    assert_eq!(log_b.len(), 1);
    assert_eq!(log_b[0].data.kind, ERASED_EVENT_KIND);
    assert_eq!(s.last_sequence(&a).unwrap(), Some(5));

    // No WAL or SST file holds a byte of hers; the others' data is still
    // found (so the scan does see what the files hold). The MANIFEST may
    // still name her keys (as some file's smallest or largest key, never a
    // value) until it is rewritten: see `erase::purge`.
    for m in ALICE_MARKERS {
        let left: Vec<_> = files_with(dir.path(), m)
            .into_iter()
            .filter(|p| !(IN_KEYS.contains(&m) && is_manifest(p)))
            .collect();
        assert_eq!(left, Vec::<std::path::PathBuf>::new(), "{m}");
    }
    for m in KEEP_MARKERS {
        assert!(!files_with(dir.path(), m).is_empty(), "{m} vanished");
    }

    // The outbox holds only the others' entries (2, 3, 4, 7 and 12 were
    // hers). The acknowledged position moved over the gap right after it;
    // the depth counts the interior gap (7) and the one at the end (12)
    // until acknowledgements pass them.
    let out = s.outbox_peek(0, 100).unwrap();
    let seqs: Vec<u64> = out.iter().map(|e| e.0).collect();
    assert_eq!(seqs, [5, 6, 8, 9, 10, 11]);
    assert!(out.iter().all(|(_, e)| !about_alice(e)));
    assert_eq!(s.outbox_positions().unwrap(), (12, 4));
    assert_eq!(s.outbox_depth().unwrap(), 8);
    s.outbox_ack(6).await.unwrap();
    assert_eq!(s.outbox_positions().unwrap(), (12, 7));
    assert_eq!(s.outbox_peek(0, 100).unwrap().len(), 4);
    s.outbox_ack(11).await.unwrap();
    assert_eq!(s.outbox_positions().unwrap(), (12, 12));
    assert_eq!(s.outbox_depth().unwrap(), 0);

    // Idempotent, and nothing of hers to export any more.
    assert_eq!(
        s.erase_user("alice".into(), prefixes.clone())
            .await
            .unwrap(),
        ErasedUser::default()
    );
    assert_eq!(
        s.export_user("alice", &prefixes).unwrap(),
        UserRecords::default()
    );
    // Durable: still gone after a restart, which also writes a new MANIFEST
    // from the live files (and deletes the old one): then no file at all
    // holds a byte of hers.
    drop(s);
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    assert_eq!(
        s.export_user("alice", &prefixes).unwrap(),
        UserRecords::default()
    );
    assert_eq!(s.read(&a, 1, 100).unwrap().len(), 5);
    for m in ALICE_MARKERS {
        assert_eq!(
            files_with(dir.path(), m),
            Vec::<std::path::PathBuf>::new(),
            "{m}"
        );
    }
    // (The others' outbox entries were acknowledged since, and the second
    // erasure's purge dropped them; their records remain.)
    for m in [
        "MARKER-KEEP-PREF-BOB-9a4f",
        "MARKER-KEEP-EV-BOB-22bb",
        "MARKER-KEEP-KV-BOB-cc33",
    ] {
        assert!(!files_with(dir.path(), m).is_empty(), "{m} vanished");
    }
}

/// A forwarded event's outbox entry refers to the event in the log; the
/// forwarder still reads an `OutboxEntry::Event`, and entries written whole
/// (by earlier versions) still read as before.
#[tokio::test]
async fn an_event_outbox_entry_refers_to_the_log_and_whole_entries_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    let billing = ns("billing");
    let stored = s
        .append(
            &billing,
            EventData {
                content_type: Some("application/json".into()),
                user: Some("alice".into()),
                ..event("signup", b"{\"a\":1}")
            },
            true,
        )
        .await
        .unwrap();
    let db = &s.inner.db;
    let outbox = committer::handle(db, Cf::Outbox).unwrap();
    let raw = db.get_cf(outbox, keys::u64_key(1)).unwrap().unwrap();
    assert_eq!(
        outbox_event_ref(&raw),
        Some(keys::event_key(&billing, stored.sequence).as_slice()),
        "the entry is a reference, not a second copy of the event"
    );
    // Entries of two components interleaved: each is read from its own log.
    let shop = ns("shop");
    let other = s.append(&shop, event("order", b"o"), true).await.unwrap();
    let again = s.append(&billing, event("paid", b"p"), true).await.unwrap();
    let entry = |component: &str, event: &StoredEvent| OutboxEntry::Event {
        component: component.into(),
        event: event.clone(),
    };
    // An entry as earlier versions wrote it, under the next sequence (and
    // the outbox's last sequence with it), read after a restart.
    db.put_cf(
        outbox,
        keys::u64_key(4),
        encode(&entry("billing", &stored)).unwrap(),
    )
    .unwrap();
    let meta = committer::handle(db, Cf::Meta).unwrap();
    db.put_cf(meta, keys::meta_outbox_seq(), 4u64.to_be_bytes())
        .unwrap();
    drop(s);
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    assert_eq!(
        s.outbox_peek(0, 10).unwrap(),
        vec![
            (1, entry("billing", &stored)),
            (2, entry("shop", &other)),
            (3, entry("billing", &again)),
            (4, entry("billing", &stored)),
        ]
    );
    assert_eq!(
        s.outbox_peek(2, 1).unwrap(),
        vec![(3, entry("billing", &again))]
    );
}

/// The committer writes an event as its head plus the data encoded on the
/// caller's thread; that must be byte for byte the event's own encoding.
#[test]
fn an_event_record_spliced_from_its_data_is_the_events_encoding() {
    let node = NodeIdentity {
        edge: "fra-1".into(),
        region: "eu-west".into(),
    };
    for data in [
        event("signup", b""),
        EventData {
            content_type: Some("application/json".into()),
            user: Some("alice".into()),
            ..event("signup", &[7; 300])
        },
    ] {
        let stored = StoredEvent {
            id: node_write_id(&node.edge, 300),
            sequence: u64::MAX,
            origin: node.edge.clone(),
            region: node.region.clone(),
            at: keel_core::Hlc {
                physical_ms: 1_700_000_000_000,
                logical: 70_000,
                node: "fra-1".into(),
            },
            data,
        };
        let spliced = encode_event_record(
            &stored.id,
            stored.sequence,
            &node,
            &stored.at,
            &encode(&stored.data).unwrap(),
        )
        .unwrap();
        assert_eq!(spliced, encode(&stored).unwrap());
        assert_eq!(decode::<StoredEvent>(&spliced).unwrap(), stored);
    }
}

/// A write staged while the group below it is being written reads that
/// group's writes, so when that group fails it must fail too, even though
/// its own group's write would succeed.
#[tokio::test]
async fn a_write_staged_on_a_group_that_fails_fails_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    let committer = &s.inner.committer;
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let mut first = true;
    committer.inject_fault(move || {
        if !std::mem::take(&mut first) {
            return Ok(());
        }
        entered_tx.send(()).unwrap();
        released.recv().unwrap();
        Err(StoreError::Unavailable("injected write failure".into()))
    });
    let key = b"test/k".to_vec();
    let below = {
        let key = key.clone();
        committer.write(move |tx| {
            tx.put(Cf::Meta, key, b"1".to_vec());
            Ok(())
        })
    };
    // The committer is now writing `below`.
    entered.recv().unwrap();
    let on_top = {
        let key = key.clone();
        committer.write(move |tx| {
            let seen = tx.get(Cf::Meta, &key)?;
            tx.put(Cf::Meta, key, b"2".to_vec());
            Ok(seen)
        })
    };
    release.send(()).unwrap();
    assert!(matches!(below.await, Err(StoreError::Unavailable(_))));
    assert!(
        matches!(on_top.await, Err(StoreError::Unavailable(_))),
        "a write staged on a failed group is not acknowledged"
    );
    let after = {
        let key = key.clone();
        committer.write(move |tx| tx.get(Cf::Meta, &key))
    };
    assert_eq!(after.await.unwrap(), None, "neither write is visible");
    drop(s);
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    let read = s.inner.committer.write(move |tx| tx.get(Cf::Meta, &key));
    assert_eq!(read.await.unwrap(), None, "neither write reached the disk");
}

/// An outbox acknowledgement (an unsynced write) waits in the open group
/// for the next synced write and is written with it: one group, not two.
/// Alone, it is written after the delay; a store dropped meanwhile writes
/// it before it closes.
#[tokio::test]
async fn an_unsynced_write_waits_for_a_synced_one_to_share_its_group() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    let a = ns("a");
    s.append(&a, event("e", b"1"), true).await.unwrap();
    s.append(&a, event("e", b"2"), true).await.unwrap();
    let committer = &s.inner.committer;
    let groups = Arc::new(AtomicUsize::new(0));
    let counted = groups.clone();
    committer.inject_fault(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    // Far longer than the test: only a synced write can take it along.
    committer.set_unsynced_delay(std::time::Duration::from_secs(600));
    let ack = s.outbox_ack(1);
    let event = s.append(&a, event("e", b"3"), true);
    event.await.unwrap();
    ack.await.unwrap();
    assert_eq!(groups.load(Ordering::SeqCst), 1, "one group for both");
    assert_eq!(s.outbox_positions().unwrap(), (3, 1));

    // Alone, it is written once the delay is over.
    committer.set_unsynced_delay(std::time::Duration::from_millis(1));
    s.outbox_ack(2).await.unwrap();
    assert_eq!(groups.load(Ordering::SeqCst), 2);
    assert_eq!(s.outbox_positions().unwrap(), (3, 2));

    // Waiting when the store is dropped: written before it closes.
    committer.set_unsynced_delay(std::time::Duration::from_secs(600));
    let ack = s.outbox_ack(3);
    drop(s);
    ack.await.unwrap();
    let s = RocksStore::open(dir.path(), options(true)).unwrap();
    assert_eq!(s.outbox_positions().unwrap(), (3, 3));
}

/// A `write_alone` job reads the database with every write called before
/// it committed, and every write called after it runs after it, whichever
/// future is awaited first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_around_a_write_alone_stay_in_call_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), options(false)).unwrap();
    let committer = &s.inner.committer;
    let key = b"test/k".to_vec();
    for round in 0..200u32 {
        let put = |value: String| {
            let key = key.clone();
            move |tx: &mut Txn| {
                let seen = tx.get(Cf::Meta, &key)?;
                tx.put(Cf::Meta, key, value.into_bytes());
                Ok(seen)
            }
        };
        let before = committer.write(put(format!("{round}-before")));
        let alone = {
            let key = key.clone();
            committer.write_alone(move |tx| {
                let db = tx.db();
                let committed = db
                    .get_cf(committer::handle(db, Cf::Meta)?, &key)
                    .map_err(map_err)?;
                tx.put(Cf::Meta, key, format!("{round}-alone").into_bytes());
                Ok(committed)
            })
        };
        let after = committer.write(put(format!("{round}-after")));
        let want = |s: &str| Some(format!("{round}-{s}").into_bytes());
        assert_eq!(after.await.unwrap(), want("alone"));
        assert_eq!(alone.await.unwrap(), want("before"), "seen in the database");
        before.await.unwrap();
    }
    let last = committer.write(move |tx| tx.get(Cf::Meta, &key));
    assert_eq!(last.await.unwrap(), Some(b"199-after".to_vec()));
}
