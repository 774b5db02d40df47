//! The `ledger` interface through `ledger-probe`: every function and error
//! on the embedded node (SQLite) with SIGKILL mid-append; and on a region's
//! replicated JetStream stream, many writers on three nodes of one region
//! with client timeouts, retries and SIGKILLs, checked for overdrafts,
//! double applies and lost acknowledged entries.

use crate::regions::{RegionSpec, world};
use crate::support::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn probe(name: &str, route: &str) -> String {
    component(name, "ledger-probe", route, r#"grants = ["ledger"]"#)
}

fn append_path(prefix: &str, account: &str, amount: i64, key: &str) -> String {
    format!("{prefix}/append?account={account}&amount={amount}&key={key}")
}

/// Every entry of `account`, following cursors.
async fn history(node: &Keel, prefix: &str, account: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let r = node
            .get(&format!(
                "{prefix}/history?account={account}&limit=1000{cursor}"
            ))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let page = r.json();
        out.extend(page["entries"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_u64() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

/// The entries are a gapless sequence whose balances are the running sum,
/// never below `min`, each key once; returns key → amount.
fn check_entries(account: &str, entries: &[Value], min: i64) -> BTreeMap<String, i64> {
    let mut balance = 0i64;
    let mut keys = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["sequence"], i as u64 + 1, "{account}: {e}");
        balance += e["amount"].as_i64().unwrap();
        assert_eq!(e["balance"], balance, "{account}: {e}");
        assert!(balance >= min, "{account} below {min}: {e}");
        let key = e["key"].as_str().unwrap().to_string();
        assert!(
            keys.insert(key, e["amount"].as_i64().unwrap()).is_none(),
            "{account}: key applied twice: {e}"
        );
    }
    keys
}

#[test]
fn embedded_ledger_every_function_and_error_and_sigkill_mid_append() {
    let node = Node::new(&format!(
        "[infrastructure]\nledger = {{ type = \"auto\", max-page = 4, account-min-balance = {{ \"bank/credit\" = -100 }} }}\n\n{}\n{}",
        probe("bank", "/bank/..."),
        probe("other", "/other/...")
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let keel = node.start();
    let acked = rt.block_on(async {
        let b = "/bank";
        let r = keel.post(&append_path(b, "alice", 100, "k1"), "").await;
        assert_eq!(r.status, 200, "{}", r.body);
        let e = r.json();
        assert_eq!(
            (&e["account"], &e["sequence"], &e["balance"], &e["replayed"]),
            (&"alice".into(), &1.into(), &100.into(), &false.into())
        );
        let again = keel
            .post(&append_path(b, "alice", 100, "k1"), "")
            .await
            .json();
        assert_eq!(
            (&again["sequence"], &again["replayed"]),
            (&1.into(), &true.into())
        );
        assert_eq!(again["at_ms"], e["at_ms"]);
        // Errors: typed, and nothing changes.
        let reused = keel.post(&append_path(b, "alice", 7, "k1"), "").await;
        assert_eq!(
            (reused.status, reused.json()["error"].as_str()),
            (409, Some("conflict"))
        );
        let over = keel.post(&append_path(b, "alice", -101, "k2"), "").await;
        assert_eq!(over.status, 409, "{}", over.body);
        assert!(over.body.contains("insufficient funds"), "{}", over.body);
        let zero = keel.post(&append_path(b, "alice", 0, "k3"), "").await;
        assert_eq!(
            (zero.status, zero.json()["error"].as_str()),
            (400, Some("invalid"))
        );
        let long_key = "k".repeat(300);
        let r = keel.post(&append_path(b, "alice", 1, &long_key), "").await;
        assert_eq!(r.status, 400, "{}", r.body);
        let r = keel
            .get(&format!("{b}/history?account=alice&limit=0"))
            .await;
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(
            keel.get(&format!("{b}/balance?account=alice")).await.body,
            "100"
        );
        // The overdraft allowance of one account, from keel.toml.
        let r = keel.post(&append_path(b, "credit", -100, "c1"), "").await;
        assert_eq!((r.status, &r.json()["balance"]), (200, &(-100).into()));
        let r = keel.post(&append_path(b, "credit", -1, "c2"), "").await;
        assert_eq!(r.status, 409, "{}", r.body);
        // Accounts are per component.
        assert_eq!(keel.get("/other/balance?account=alice").await.body, "0");
        let r = keel
            .post(&append_path("/other", "alice", -1, "k1"), "")
            .await;
        assert_eq!(r.status, 409, "{}", r.body);
        // History pages (max-page 4 caps a larger limit).
        for i in 0..5 {
            let r = keel
                .post(&append_path(b, "alice", -1, &format!("h{i}")), "")
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
        let p1 = keel
            .get(&format!("{b}/history?account=alice&limit=100"))
            .await
            .json();
        assert_eq!(p1["entries"].as_array().unwrap().len(), 4);
        assert_eq!(p1["next_cursor"], 4);
        let p2 = keel
            .get(&format!("{b}/history?account=alice&limit=100&cursor=4"))
            .await
            .json();
        assert_eq!(p2["entries"].as_array().unwrap().len(), 2);
        assert_eq!(p2["entries"][1]["balance"], 95);
        assert_eq!(p2["next_cursor"], Value::Null);

        // Concurrent appends to one account, SIGKILLed while they are in
        // flight: every acknowledged one survives the restart.
        let addr = keel.addr;
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let mut tasks = Vec::new();
        for w in 0..16 {
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let key = format!("w{w}-{i}");
                    let path = append_path("/bank", "hot", 1, &key);
                    match try_request(addr, "POST", &path, &[], bytes::Bytes::new()).await {
                        Ok(r) if r.status == 200 => {
                            acked.lock().unwrap().insert(key);
                        }
                        Ok(r) => panic!("{}: {}", r.status, r.body),
                        Err(_) => return,
                    }
                }
            }));
        }
        let until = Instant::now() + Duration::from_secs(30);
        while acked.lock().unwrap().len() < 200 {
            assert!(Instant::now() < until, "appends do not progress");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (acked, tasks)
    });
    keel.sigkill();
    let keel = node.start();
    rt.block_on(async {
        let (acked, tasks) = acked;
        for t in tasks {
            t.await.unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        let entries = history(&keel, "/bank", "hot").await;
        let keys = check_entries("hot", &entries, 0);
        let missing: Vec<_> = acked.iter().filter(|k| !keys.contains_key(*k)).collect();
        assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
        assert_eq!(
            keel.get("/bank/balance?account=hot").await.body,
            entries.len().to_string()
        );
        // A retried key after the crash is a replay, not a second entry.
        let k = acked.iter().next().unwrap();
        let r = keel
            .post(&append_path("/bank", "hot", 1, k), "")
            .await
            .json();
        assert_eq!(r["replayed"], true, "{r}");
        assert_eq!(history(&keel, "/bank", "hot").await.len(), entries.len());
    });
    keel.stop();
}

#[test]
fn ledger_config_errors_name_the_key_and_what_is_accepted() {
    let node = Node::new(&format!(
        "[infrastructure]\nledger = {{ type = \"raft\" }}\n\n{}",
        probe("bank", "/bank/...")
    ));
    let (code, _, err) = node.check();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("infrastructure.ledger.type"), "{err}");
    assert!(err.contains("\"auto\", \"sqlite\", \"jetstream\""), "{err}");
    let node = Node::new(&format!(
        "[infrastructure]\nledger = {{ type = \"auto\", account-min-balance = {{ \"no-slash\" = -5 }} }}\n\n{}",
        probe("bank", "/bank/...")
    ));
    let (code, _, err) = node.check();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("infrastructure.ledger.account-min-balance"),
        "{err}"
    );
    // The in-process bus has no stream to put a ledger on.
    let node = Node::new(&format!(
        "[infrastructure]\nledger = {{ type = \"jetstream\" }}\n\n{}",
        probe("bank", "/bank/...")
    ));
    let (code, err) = node.up_fails();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs a NATS bus"), "{err}");
}

/// How a writer's key ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Applied(i64),
    Refused,
}

/// Per key: its outcome and whether any attempt's fate was unknown
/// (timeout, connection lost, 503), so a refusal may hide an earlier apply.
type Outcomes = BTreeMap<String, (String, Outcome, bool)>;

const ACCOUNTS: [&str; 3] = ["a", "b", "c"];

/// One writer: `keys` appends of random amounts to random accounts, each
/// retried on the next node until it gets a definite answer; some first
/// attempts get a client timeout too short to wait for the answer.
async fn writer(
    w: usize,
    keys: usize,
    nodes: Arc<Mutex<Vec<SocketAddr>>>,
    done: Arc<AtomicUsize>,
) -> Outcomes {
    let mut out = Outcomes::new();
    let mut x: u64 = 0x2545f4914f6cdd1d ^ ((w as u64 + 1) << 17);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..keys {
        let r = next();
        let account = ACCOUNTS[(r % 3) as usize];
        // -10..=10 without 0, mean +1/21: each account's balance is a walk
        // that keeps coming back to 0, so debits are refused ~150 times a
        // run. (With -9..=11 the balance drifted away from 0 and in about a
        // third of interleavings no debit was ever refused.)
        let amount = ((r >> 8) % 21) as i64 - 10;
        let amount = if amount == 0 { 1 } else { amount };
        let key = format!("w{w}-{i}");
        let path = append_path("/bank", account, amount, &key);
        let mut uncertain = false;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut attempt = 0usize;
        let outcome = loop {
            let addr = {
                let n = nodes.lock().unwrap();
                n[(w + i + attempt) % n.len()]
            };
            let timeout = if attempt == 0 && r % 20 == 0 {
                Duration::from_millis(1)
            } else {
                Duration::from_secs(10)
            };
            attempt += 1;
            let reply = tokio::time::timeout(
                timeout,
                try_request(addr, "POST", &path, &[], bytes::Bytes::new()),
            )
            .await;
            match reply {
                Ok(Ok(r)) if r.status == 200 => {
                    let e = r.json();
                    assert_eq!(e["amount"], amount, "{e}");
                    assert!(e["balance"].as_i64().unwrap() >= 0, "{e}");
                    break Outcome::Applied(e["sequence"].as_i64().unwrap());
                }
                Ok(Ok(r)) if r.status == 409 => {
                    assert!(r.body.contains("insufficient funds"), "{}", r.body);
                    break Outcome::Refused;
                }
                Ok(Ok(r)) if r.status == 503 || r.status == 500 => uncertain = true,
                Ok(Ok(r)) => panic!("{key}: {} {}", r.status, r.body),
                Ok(Err(_)) | Err(_) => uncertain = true,
            }
            assert!(Instant::now() < deadline, "{key}: no answer in 120 s");
        };
        out.insert(key, (account.to_string(), outcome, uncertain));
        done.fetch_add(1, Ordering::Relaxed);
    }
    out
}

#[test]
fn ledger_is_linearizable_per_account_across_nodes_timeouts_and_sigkill() {
    let _heavy = heavy_test();
    let world = world(&[
        RegionSpec {
            name: "eu-central",
            residency: "gdpr",
            edges: &["fra", "ams", "par"],
            servers: 3,
        },
        RegionSpec {
            name: "us-west",
            residency: "us",
            edges: &["sfo"],
            servers: 1,
        },
    ]);
    let bank = probe("bank", "/bank/...");
    let nodes: Vec<Node> = ["fra", "ams", "par"]
        .iter()
        .map(|e| world.node(e, None, &bank))
        .collect();
    let mut running: Vec<Keel> = nodes.iter().map(Node::start).collect();
    let sfo_node = world.node("sfo", None, &bank);
    let sfo = sfo_node.start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Seed the accounts (through fra, the region's coordinator, which
    // creates the ledger stream).
    rt.block_on(async {
        for a in ACCOUNTS {
            running[0]
                .poll(
                    "POST",
                    &append_path("/bank", a, 50, &format!("seed-{a}")),
                    "",
                    "the ledger stream",
                    |s, _| s == 200,
                )
                .await;
        }
    });
    let addrs = Arc::new(Mutex::new(
        running.iter().map(|k| k.addr).collect::<Vec<_>>(),
    ));
    let done = Arc::new(AtomicUsize::new(0));
    let writers = 8;
    let per_writer = 1250;
    let tasks: Vec<_> = (0..writers)
        .map(|w| rt.spawn(writer(w, per_writer, addrs.clone(), done.clone())))
        .collect();
    // Observers: no balance read on any node is ever negative.
    let stop = Arc::new(AtomicBool::new(false));
    let observed = Arc::new(AtomicUsize::new(0));
    let observer = {
        let (addrs, stop, observed) = (addrs.clone(), stop.clone(), observed.clone());
        rt.spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let addr = {
                    let n = addrs.lock().unwrap();
                    n[i % n.len()]
                };
                let path = format!("/bank/balance?account={}", ACCOUNTS[i % 3]);
                i += 1;
                if let Ok(r) = try_request(addr, "GET", &path, &[], bytes::Bytes::new()).await
                    && r.status == 200
                {
                    let b: i64 = r.body.parse().unwrap();
                    assert!(b >= 0, "balance {b} observed at {addr}");
                    observed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // SIGKILL ams, then par, mid-run; each comes back on its data dir.
    for (at, victim) in [(3000, 1), (6000, 2)] {
        assert!(
            keel_test_support::wait_until(Duration::from_secs(300), || done
                .load(Ordering::Relaxed)
                >= at),
            "writers stalled at {}",
            done.load(Ordering::Relaxed)
        );
        let killed = running.remove(victim);
        killed.sigkill();
        let restarted = nodes[victim].start();
        addrs.lock().unwrap()[victim] = restarted.addr;
        running.insert(victim, restarted);
    }
    let mut outcomes = Outcomes::new();
    rt.block_on(async {
        for t in tasks {
            outcomes.extend(t.await.unwrap());
        }
        stop.store(true, Ordering::Relaxed);
        observer.await.unwrap();
    });
    assert!(observed.load(Ordering::Relaxed) > 0);
    assert_eq!(outcomes.len(), writers * per_writer);
    rt.block_on(async {
        for account in ACCOUNTS {
            let entries = history(&running[0], "/bank", account).await;
            let mut applied = check_entries(account, &entries, 0);
            assert_eq!(applied.remove(&format!("seed-{account}")), Some(50));
            for (key, (acc, outcome, uncertain)) in &outcomes {
                if acc != account {
                    continue;
                }
                match outcome {
                    Outcome::Applied(seq) => {
                        let e = &entries[*seq as usize - 1];
                        assert_eq!(&e["key"], key.as_str(), "{account}: {e}");
                    }
                    // A refusal with an earlier attempt in limbo may have
                    // been preceded by that attempt's apply; otherwise
                    // nothing was applied.
                    Outcome::Refused if !uncertain => {
                        assert!(!applied.contains_key(key), "{key} refused but applied");
                    }
                    Outcome::Refused => {}
                }
                applied.remove(key);
            }
            assert!(applied.is_empty(), "entries nobody appended: {applied:?}");
            let final_balance = entries.last().unwrap()["balance"].clone();
            for node in &running {
                let r = node.get(&format!("/bank/balance?account={account}")).await;
                assert_eq!(
                    r.body,
                    final_balance.to_string(),
                    "{account} at {}",
                    node.addr
                );
            }
        }
        // The other region's account of the same name is another account.
        assert_eq!(sfo.get("/bank/balance?account=a").await.body, "0");
        let r = sfo.post(&append_path("/bank", "a", 5, "seed-a"), "").await;
        assert_eq!(
            (r.status, &r.json()["sequence"]),
            (200, &1.into()),
            "{}",
            r.body
        );
    });
    let refused = outcomes
        .values()
        .filter(|(_, o, _)| *o == Outcome::Refused)
        .count();
    let uncertain = outcomes.values().filter(|(_, _, u)| *u).count();
    eprintln!(
        "ledger: {} keys, {refused} refused for insufficient funds, {uncertain} retried after an unknown outcome",
        outcomes.len()
    );
    assert!(
        refused > 0,
        "no debit was ever refused: the test did not test overdrafts"
    );
    assert!(uncertain > 0, "no key was retried");
    for k in running {
        k.stop();
    }
    sfo.stop();
}

fn billing_probe() -> String {
    component(
        "billing",
        "billing-probe",
        "/billing/...",
        r#"grants = ["edge-operations", "ledger", "global-coordination"]"#,
    )
}

#[test]
fn reconcile_billing_finds_an_injected_discrepancy_in_any_region_and_is_deterministic() {
    use keel_bus::Bus;
    let _heavy = heavy_test();
    let world = world(&[
        RegionSpec {
            name: "eu-central",
            residency: "gdpr",
            edges: &["fra"],
            servers: 1,
        },
        RegionSpec {
            name: "us-east",
            residency: "us",
            edges: &["nyc"],
            servers: 1,
        },
    ]);
    let (fra_node, nyc_node) = (
        world.node("fra", None, &billing_probe()),
        world.node("nyc", None, &billing_probe()),
    );
    let (fra, nyc) = (fra_node.start(), nyc_node.start());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (start, end) = (now - 1000, now + 600_000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ok = |r: Reply| assert_eq!(r.status, 200, "{}", r.body);
        // Clean data: usage and charges agree in both regions.
        for (node, account, usages, charge, key) in [
            (&fra, "acme", &[100, 50][..], 150, "fra-1"),
            (&nyc, "acme", &[70][..], 70, "nyc-1"),
        ] {
            // A credit first, so the debit is covered.
            node.poll(
                "POST",
                &format!("/billing/append?account={account}&amount=1000&key={key}-credit"),
                "",
                "the ledger stream",
                |s, _| s == 200,
            )
            .await;
            for u in usages {
                ok(node
                    .post(&format!("/billing/usage?account={account}&amount={u}"), "")
                    .await);
            }
            ok(node
                .post(
                    &format!("/billing/append?account={account}&amount=-{charge}&key={key}"),
                    "",
                )
                .await);
        }
        ok(nyc
            .post("/billing/usage?account=acme&amount=lots", "")
            .await);
        let reconcile = format!("/billing/reconcile?start={start}&end={end}");
        let clean = fra
            .poll(
                "POST",
                &reconcile,
                "",
                "every usage event in the views",
                |s, v| s == 200 && v["usage_events"] == 3 && v["malformed_usage_events"] == 1,
            )
            .await;
        assert_eq!(
            clean,
            serde_json::json!({
                "regions": ["eu-central", "us-east"],
                "missing_regions": [],
                "accounts_checked": 2,
                "usage_events": 3,
                "entries_checked": 4,
                "total_usage": 220,
                "total_credits": 2000,
                "total_debits": -220,
                "malformed_usage_events": 1,
                "mismatches": [],
            })
        );
        // Rerun, from the other region: the same result.
        let again = nyc.post(&reconcile, "").await;
        assert_eq!((again.status, again.json()), (200, clean.clone()));
        // Injected: usage in us-east that was never charged, and a charge
        // in eu-central without usage.
        ok(nyc.post("/billing/usage?account=zed&amount=30", "").await);
        ok(fra
            .post("/billing/append?account=acme&amount=-5&key=stray", "")
            .await);
        let found = fra
            .poll(
                "POST",
                &reconcile,
                "",
                "the injected usage in the views",
                |s, v| s == 200 && v["usage_events"] == 4,
            )
            .await;
        assert_eq!(
            found["mismatches"],
            serde_json::json!([
                {"account": "acme", "region": "eu-central", "usage": 150, "charged": 155,
                 "detail": "usage 150 in 2 events, charged 155 in 2 entries"},
                {"account": "zed", "region": "us-east", "usage": 30, "charged": 0,
                 "detail": "usage 30 in 1 events, charged 0 in 0 entries"},
            ]),
            "{found}"
        );
        let again = nyc.post(&reconcile, "").await;
        assert_eq!((again.status, again.json()), (200, found.clone()));
        // A period with nothing in it.
        let empty = fra
            .post("/billing/reconcile?start=0&end=1", "")
            .await
            .json();
        assert_eq!(empty["accounts_checked"], 0, "{empty}");
        let bad = fra.post("/billing/reconcile?start=5&end=1", "").await;
        assert_eq!(bad.status, 400, "{}", bad.body);
        // Stored, latest per component and period.
        let bus = world.client("fra", true).await;
        let stored = bus
            .kv_get("KEEL_RECONCILIATIONS", &format!("billing.{start}-{end}"))
            .await
            .unwrap()
            .unwrap();
        let stored: Value = serde_json::from_slice(&stored.value.unwrap()).unwrap();
        assert_eq!(
            stored["mismatches"].as_array().unwrap().len(),
            2,
            "{stored}"
        );
        assert_eq!(stored["total_usage"], found["total_usage"]);
    });
    // Every reconciliation is in the audit chain.
    let (code, out, err) = fra_node.audit_verify();
    assert_eq!(code, 0, "{out}{err}");
    fra.stop();
    nyc.stop();
}
