use super::*;
use keel_bus::Bus;
use keel_bus::nats::{NatsBus, NatsOptions};
use keel_test_support::NatsServer;

fn stream(name: &str) -> keel_bus::StreamSpec {
    keel_bus::StreamSpec {
        name: name.into(),
        subjects: vec!["keel.test.ledger.>".into()],
        replicas: 1,
        duplicate_window: Duration::from_secs(120),
        max_age: None,
        placement: None,
    }
}

fn ledger(log: Arc<dyn RecordLog>, writer: &str) -> Ledger {
    Ledger::new(
        log,
        LedgerOptions {
            writer: writer.into(),
            account_min_balance: HashMap::from([("c/credit".to_string(), -500)]),
            max_page: 3,
            ..LedgerOptions::default()
        },
        LedgerMetrics::default(),
    )
}

fn sqlite(dir: &tempfile::TempDir) -> Arc<dyn RecordLog> {
    Arc::new(SqliteLog::open(&dir.path().join("ledger.sqlite")).unwrap())
}

fn local_stream() -> Arc<dyn RecordLog> {
    let bus: Arc<dyn Bus> = Arc::new(keel_bus::local::LocalBus::new());
    Arc::new(JetStreamLog::new(
        bus,
        stream("LEDGER"),
        "keel.test.ledger".into(),
    ))
}

async fn nats_log(server: &NatsServer) -> Arc<dyn RecordLog> {
    let bus = NatsBus::connect(NatsOptions::new([server.url()]))
        .await
        .unwrap();
    bus.wait_connected(Duration::from_secs(10)).await.unwrap();
    Arc::new(JetStreamLog::new(
        Arc::new(bus),
        stream("LEDGER"),
        "keel.test.ledger".into(),
    ))
}

fn acct(a: &str) -> AccountKey {
    AccountKey::new("c", a)
}

/// Every function's semantics and errors, on one log.
async fn functions(l: &Ledger) {
    let a = acct("alice");
    assert_eq!(l.balance(&a).await.unwrap(), 0);
    let e = l.append(&a, 100, "k1").await.unwrap();
    assert_eq!(
        (
            e.sequence,
            e.amount,
            e.balance,
            e.replayed,
            e.account.as_str()
        ),
        (1, 100, 100, false, "alice")
    );
    let again = l.append(&a, 100, "k1").await.unwrap();
    assert_eq!(
        (again.sequence, again.balance, again.replayed),
        (1, 100, true)
    );
    assert_eq!(again.at_ms, e.at_ms);
    let reused = l.append(&a, 5, "k1").await;
    assert!(
        matches!(reused, Err(LedgerError::Conflict(ref m)) if m.contains("k1")),
        "{reused:?}"
    );
    let over = l.append(&a, -101, "k2").await;
    assert!(
        matches!(over, Err(LedgerError::Conflict(ref m)) if m.contains("insufficient")),
        "{over:?}"
    );
    // A refused key is not used up.
    let d = l.append(&a, -100, "k2").await.unwrap();
    assert_eq!((d.sequence, d.balance), (2, 0));
    assert!(matches!(
        l.append(&a, 0, "k3").await,
        Err(LedgerError::Invalid(_))
    ));
    assert!(matches!(
        l.append(&a, 1, "").await,
        Err(LedgerError::Invalid(_))
    ));
    let long = "k".repeat(MAX_KEY_BYTES + 1);
    assert!(matches!(
        l.append(&a, 1, &long).await,
        Err(LedgerError::Invalid(_))
    ));
    assert!(matches!(
        l.append(&acct(""), 1, "k").await,
        Err(LedgerError::Invalid(_))
    ));
    let long = "a".repeat(MAX_ACCOUNT_BYTES + 1);
    assert!(matches!(
        l.balance(&acct(&long)).await,
        Err(LedgerError::Invalid(_))
    ));
    assert_eq!(l.balance(&a).await.unwrap(), 0);
    // Overflow is refused, not wrapped.
    let big = acct("big");
    l.append(&big, i64::MAX, "max").await.unwrap();
    assert!(matches!(
        l.append(&big, 1, "one").await,
        Err(LedgerError::Invalid(_))
    ));
    // An account with an overdraft allowance.
    let credit = acct("credit");
    assert_eq!(l.append(&credit, -500, "d1").await.unwrap().balance, -500);
    assert!(l.append(&credit, -1, "d2").await.is_err());
    // Accounts of other components are other accounts.
    assert_eq!(
        l.balance(&AccountKey::new("other", "alice")).await.unwrap(),
        0
    );
    // Any account id is fine (it becomes hex in a subject).
    let odd = acct("ünïcode account/with.dots *>");
    assert_eq!(l.append(&odd, 7, "x").await.unwrap().balance, 7);
    assert_eq!(l.balance(&odd).await.unwrap(), 7);
    // History pages (max_page 3).
    for i in 0..5 {
        l.append(&a, 1, &format!("h{i}")).await.unwrap();
    }
    assert!(matches!(
        l.history(&a, None, 0).await,
        Err(LedgerError::Invalid(_))
    ));
    let p1 = l.history(&a, None, 100).await.unwrap();
    assert_eq!(
        p1.entries.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(p1.next_cursor, Some(3));
    let p2 = l.history(&a, p1.next_cursor, 100).await.unwrap();
    assert_eq!(
        p2.entries
            .iter()
            .map(|e| (e.sequence, e.balance, e.idempotency_key.as_str()))
            .collect::<Vec<_>>(),
        vec![(4, 2, "h1"), (5, 3, "h2"), (6, 4, "h3")]
    );
    let p3 = l.history(&a, p2.next_cursor, 2).await.unwrap();
    assert_eq!(p3.entries.len(), 1);
    assert_eq!(p3.next_cursor, None);
    assert!(l.history(&a, Some(99), 5).await.unwrap().entries.is_empty());
    // Totals of every account of the component over a period.
    let all = l.period_totals("c", 0, u64::MAX).await.unwrap();
    assert_eq!(
        all["alice"],
        PeriodTotals {
            credits: 105,
            debits: -100,
            debit_entries: 1,
            entries: 7
        }
    );
    assert_eq!(all["credit"].debits, -500);
    assert_eq!(all.len(), 4, "{all:?}");
    assert!(l.period_totals("c", 0, 1).await.unwrap().is_empty());
    assert!(
        l.period_totals("other", 0, u64::MAX)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    functions(&ledger(sqlite(&dir), "n1")).await;
    // Reopened: the same history, and keys still known.
    let l = ledger(sqlite(&dir), "n1");
    assert_eq!(l.balance(&acct("alice")).await.unwrap(), 5);
    let replay = l.append(&acct("alice"), 100, "k1").await.unwrap();
    assert!(replay.replayed);
    assert_eq!(
        l.history(&acct("alice"), None, 3).await.unwrap().entries[0].amount,
        100
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_on_the_in_process_stream() {
    functions(&ledger(local_stream(), "n1")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_on_jetstream() {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    functions(&ledger(nats_log(&server).await, "n1")).await;
    // Another node (its own connection, cold cache) sees the same account.
    let l = ledger(nats_log(&server).await, "n2");
    assert_eq!(l.balance(&acct("alice")).await.unwrap(), 5);
    assert!(l.append(&acct("alice"), 100, "k1").await.unwrap().replayed);
}

/// Several nodes (ledgers over the same log), many concurrent writers of
/// random debits and credits with retried keys: never below the minimum,
/// every key applied once, the balance the sum of the entries.
async fn contended(ledgers: Vec<Arc<Ledger>>) {
    let accounts = ["a", "b", "c"];
    let writers = 12;
    let per_writer = 150;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let l = ledgers[w % ledgers.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut applied = Vec::new();
            let mut x: u64 = 0x9e3779b97f4a7c15 ^ (w as u64 + 1);
            for i in 0..per_writer {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let account = acct(accounts[(x % 3) as usize]);
                let amount = (x % 21) as i64 - 10;
                let amount = if amount == 0 { 1 } else { amount };
                let key = format!("w{w}-{i}");
                let first = l.append(&account, amount, &key).await;
                // Every key is retried: after a success the retry must be
                // a replay of it.
                let retry = l.append(&account, amount, &key).await;
                match (&first, &retry) {
                    (Ok(f), Ok(r)) => {
                        assert!(!f.replayed, "{f:?}");
                        assert!(r.replayed, "{r:?}");
                        assert_eq!((f.sequence, f.balance), (r.sequence, r.balance));
                        assert!(f.balance >= 0, "{f:?}");
                        applied.push((account.account.clone(), amount, key));
                    }
                    (Err(LedgerError::Conflict(_)), Err(LedgerError::Conflict(_))) => {}
                    // A refused debit does not use up its key: credits
                    // in between may let the retry through.
                    (Err(LedgerError::Conflict(_)), Ok(r)) => {
                        assert!(!r.replayed && amount < 0, "{r:?}");
                        applied.push((account.account.clone(), amount, key));
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            applied
        }));
    }
    let mut applied = Vec::new();
    for t in tasks {
        applied.extend(t.await.unwrap());
    }
    let l = &ledgers[0];
    for a in accounts {
        let key = acct(a);
        let mut entries = Vec::new();
        let mut cursor = None;
        loop {
            let page = l.history(&key, cursor, 1000).await.unwrap();
            entries.extend(page.entries);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let mut balance = 0i64;
        let mut keys = HashSet::new();
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.sequence, i as u64 + 1);
            balance += e.amount;
            assert_eq!(e.balance, balance);
            assert!(e.balance >= 0, "{e:?}");
            assert!(keys.insert(e.idempotency_key.clone()), "key twice: {e:?}");
        }
        let expected: Vec<&(String, i64, String)> =
            applied.iter().filter(|(acc, _, _)| acc == a).collect();
        assert_eq!(entries.len(), expected.len(), "account {a}");
        assert_eq!(expected.iter().map(|(_, amt, _)| amt).sum::<i64>(), balance);
        for other in &ledgers {
            assert_eq!(other.balance(&key).await.unwrap(), balance);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let ledgers = (0..3)
        .map(|i| Arc::new(ledger(sqlite(&dir), &format!("n{i}"))))
        .collect();
    contended(ledgers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_on_jetstream() {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let mut ledgers = Vec::new();
    for i in 0..3 {
        ledgers.push(Arc::new(ledger(nats_log(&server).await, &format!("n{i}"))));
    }
    contended(ledgers).await;
}

/// A log whose appends are stored but answered "uncertain" (an ack lost on
/// the way back) while `lose_acks` is set.
struct LosingAcks {
    inner: Arc<dyn RecordLog>,
    lose_acks: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl RecordLog for LosingAcks {
    fn kind(&self) -> &'static str {
        "losing-acks"
    }
    async fn read_after(
        &self,
        account: &AccountKey,
        after: u64,
        max: usize,
    ) -> Result<Vec<RawRecord>, LogError> {
        self.inner.read_after(account, after, max).await
    }
    async fn last(&self, account: &AccountKey) -> Result<Option<RawRecord>, LogError> {
        self.inner.last(account).await
    }
    async fn scan(
        &self,
        component: &str,
        after: u64,
        max: usize,
    ) -> Result<Vec<(String, RawRecord)>, LogError> {
        self.inner.scan(component, after, max).await
    }
    async fn append(
        &self,
        account: &AccountKey,
        expected: u64,
        bytes: Vec<u8>,
        id: &str,
    ) -> Result<u64, LogError> {
        let p = self.inner.append(account, expected, bytes, id).await?;
        if self.lose_acks.swap(false, Ordering::SeqCst) {
            return Err(LogError::Uncertain("ack lost".into()));
        }
        Ok(p)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ack_is_resolved_by_reading_the_log_not_by_appending_twice() {
    let log = Arc::new(LosingAcks {
        inner: local_stream(),
        lose_acks: true.into(),
    });
    let l = ledger(log.clone(), "n1");
    let e = l.append(&acct("a"), 10, "k").await.unwrap();
    // Found in the log as this call's own record: not a replay.
    assert_eq!((e.sequence, e.balance, e.replayed), (1, 10, false));
    assert_eq!(
        l.history(&acct("a"), None, 10).await.unwrap().entries.len(),
        1
    );
    assert!(l.append(&acct("a"), 10, "k").await.unwrap().replayed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_on_one_node_share_records() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = LedgerMetrics::default();
    let l = Arc::new(Ledger::new(
        sqlite(&dir),
        LedgerOptions::default(),
        metrics.clone(),
    ));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let l = l.clone();
            tokio::spawn(async move { l.append(&acct("hot"), 1, &format!("k{i}")).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(l.balance(&acct("hot")).await.unwrap(), 200);
    assert_eq!(metrics.appends.get(), 200);
    assert!(
        metrics.records.get() < 200,
        "{} records for 200 concurrent appends",
        metrics.records.get()
    );
}

fn audit_event(i: usize) -> audit::AuditEvent {
    audit::AuditEvent {
        actor: format!("c@n{}", i % 3),
        operation: "search-global-users".into(),
        subject: format!("prefix={i}"),
        outcome: "ok".into(),
        region: "eu".into(),
        edge: format!("n{}", i % 3),
    }
}

/// Rewrites the record at `position` of the SQLite log.
fn edit_row(dir: &tempfile::TempDir, position: u64, f: impl FnOnce(&mut serde_json::Value)) {
    let c = rusqlite::Connection::open(dir.path().join("ledger.sqlite")).unwrap();
    let bytes: Vec<u8> = c
        .query_row(
            "SELECT record FROM ledger_records WHERE position = ?1",
            [position as i64],
            |r| r.get(0),
        )
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    f(&mut v);
    c.execute(
        "UPDATE ledger_records SET record = ?1 WHERE position = ?2",
        rusqlite::params![serde_json::to_vec(&v).unwrap(), position as i64],
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_is_one_chain_across_writers_and_any_edit_breaks_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = b"chain key".to_vec();
    let trails: Vec<Arc<audit::AuditTrail>> = (0..3)
        .map(|i| {
            Arc::new(audit::AuditTrail::new(
                sqlite(&dir),
                Some(key.clone()),
                &format!("n{i}"),
            ))
        })
        .collect();
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let t = trails[i % 3].clone();
            tokio::spawn(async move { t.append(audit_event(i)).await.unwrap() })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (1..=60).collect::<Vec<u64>>());
    let log = sqlite(&dir);
    let ok = audit::verify(log.as_ref(), Some(&key)).await.unwrap();
    assert_eq!(ok.records, 60);
    // Without the key the hashes do not check out.
    assert!(audit::verify(log.as_ref(), None).await.is_err());

    // Edit record 17's outcome: verify names it.
    edit_row(&dir, 17, |v| v["outcome"] = "error: denied".into());
    let broken = match audit::verify(log.as_ref(), Some(&key)).await {
        Err(audit::VerifyError::Broken(b)) => b,
        other => panic!("{other:?}"),
    };
    assert_eq!((broken.position, broken.seq), (17, 17), "{broken}");
    assert!(broken.reason.contains("altered"), "{broken}");
    // Recompute its hash too (without knowing the key): still caught there.
    edit_row(&dir, 17, |v| {
        v["hash"] = "f".repeat(64).into();
    });
    let broken = match audit::verify(log.as_ref(), Some(&key)).await {
        Err(audit::VerifyError::Broken(b)) => b,
        other => panic!("{other:?}"),
    };
    assert_eq!(broken.position, 17, "{broken}");
    // A deleted record breaks the chain at the next one.
    let dir2 = tempfile::tempdir().unwrap();
    let t = audit::AuditTrail::new(sqlite(&dir2), None, "n");
    for i in 0..5 {
        t.append(audit_event(i)).await.unwrap();
    }
    let c = rusqlite::Connection::open(dir2.path().join("ledger.sqlite")).unwrap();
    c.execute("DELETE FROM ledger_records WHERE position = 3", [])
        .unwrap();
    let broken = match audit::verify(sqlite(&dir2).as_ref(), None).await {
        Err(audit::VerifyError::Broken(b)) => b,
        other => panic!("{other:?}"),
    };
    assert_eq!((broken.position, broken.seq), (4, 3), "{broken}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_accounts_are_forgotten_and_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(sqlite(&dir), "n1");
    for i in 0..MAX_CACHED_ACCOUNTS + 10 {
        l.append(&acct(&format!("a{i}")), 2, "k").await.unwrap();
    }
    assert!(l.accounts.lock().unwrap().len() <= MAX_CACHED_ACCOUNTS);
    // A forgotten account still knows its keys and balance.
    let again = l.append(&acct("a0"), 2, "k").await.unwrap();
    assert!(again.replayed);
    assert_eq!(l.append(&acct("a0"), -2, "k2").await.unwrap().balance, 0);
}
