//! Crash safety: concurrent `kv.set` and `record-local-event` through
//! `edge-probe`, SIGKILL after a random number of acknowledged writes
//! (with writes in flight), restart on the same data dir,
//! and check that every acknowledged write is there and nothing is there
//! twice. `KEEL_CRASH_KILLS` sets the number of kills (default 20;
//! `scripts/crash-soak.sh` runs 1000).

use crate::edge_tier::{assert_edge_event_id, edge_node, probe};
use crate::support::*;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Concurrent writers per round.
const WRITERS: usize = 16;

/// What the writers sent and which writes were acknowledged (2xx).
#[derive(Default)]
struct Ledger {
    /// kv key -> value, every attempt.
    kv_sent: BTreeMap<String, String>,
    kv_acked: BTreeSet<String>,
    events_sent: BTreeSet<String>,
    events_acked: BTreeSet<String>,
}

impl Ledger {
    fn merge(&mut self, other: Ledger) {
        self.kv_sent.extend(other.kv_sent);
        self.kv_acked.extend(other.kv_acked);
        self.events_sent.extend(other.events_sent);
        self.events_acked.extend(other.events_acked);
    }
}

/// xorshift64*: the kill points only need to vary, not be unpredictable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let kills: usize = std::env::var("KEEL_CRASH_KILLS")
        .ok()
        .map(|v| v.parse().expect("KEEL_CRASH_KILLS is a number"))
        .unwrap_or(20);
    let seed = std::env::var("KEEL_CRASH_SEED")
        .ok()
        .map(|v| v.parse().expect("KEEL_CRASH_SEED is a number"))
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash test: {kills} kills, KEEL_CRASH_SEED={seed}");
    let mut rng = Rng(seed | 1);

    let node = edge_node(&probe("p"));
    let mut ledger = Ledger::default();
    let mut checked = Checked::default();
    for round in 0..kills {
        let keel = node.start();
        checked.verify(&keel, &ledger, round).await;

        let (acks, mut acked) = watch::channel(0u64);
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| tokio::spawn(write_until_refused(keel.addr, round, w, acks.clone())))
            .collect();
        // Kill after a random number of acknowledgements: every round dies
        // mid-stream, with writes of all writers in flight.
        let kill_after = 1 + rng.below(400);
        tokio::time::timeout(
            Duration::from_secs(60),
            acked.wait_for(|n| *n >= kill_after),
        )
        .await
        .expect("writers stopped being acknowledged before the kill")
        .expect("ack counter lives while writers run");
        keel.sigkill();
        for w in writers {
            ledger.merge(w.await.unwrap());
        }
        if (round + 1) % 50 == 0 {
            eprintln!(
                "crash test: {} kills, {} kv and {} events acknowledged",
                round + 1,
                ledger.kv_acked.len(),
                ledger.events_acked.len()
            );
        }
    }

    let keel = node.start();
    checked.verify(&keel, &ledger, kills).await;
    // Once more from scratch: the whole log and every key.
    Checked::default().verify(&keel, &ledger, 0).await;
    verify_all_keys(&keel, &ledger).await;
    assert!(
        !ledger.kv_acked.is_empty() && !ledger.events_acked.is_empty(),
        "no write was acknowledged: the test proved nothing"
    );
    eprintln!(
        "crash test: {} kv and {} events acknowledged over {kills} kills, all present",
        ledger.kv_acked.len(),
        ledger.events_acked.len()
    );
}

/// One writer: alternates `PUT /p/kv/<unique>` and `POST /p/edge/event`
/// (unique payload) until a request fails, i.e. the node was killed.
/// Returns what it sent and what was acknowledged.
async fn write_until_refused(
    addr: SocketAddr,
    round: usize,
    w: usize,
    acks: watch::Sender<u64>,
) -> Ledger {
    let mut ledger = Ledger::default();
    for i in 0u64.. {
        let name = format!("r{round}-w{w}-{i}");
        let reply = if i % 2 == 0 {
            let key = format!("crash-{name}");
            let value = format!("value of {name}");
            ledger.kv_sent.insert(key.clone(), value.clone());
            let r = try_request(addr, "PUT", &format!("/p/kv/{key}"), &[], value.into()).await;
            if matches!(&r, Ok(r) if r.status == 204) {
                ledger.kv_acked.insert(key);
            }
            r
        } else {
            let payload = format!("event {name}");
            ledger.events_sent.insert(payload.clone());
            let body = json!({"kind": "crash", "key": name, "payload": payload});
            let r = try_request(addr, "POST", "/p/edge/event", &[], body.to_string().into()).await;
            if matches!(&r, Ok(r) if r.status == 200) {
                ledger.events_acked.insert(payload);
            }
            r
        };
        match reply {
            Ok(r) if (200..300).contains(&r.status) => acks.send_modify(|n| *n += 1),
            // The node answered but refused: a bug, not a crash.
            Ok(r) => panic!("write {name} answered {}: {}", r.status, r.body),
            Err(_) => return ledger,
        }
    }
    unreachable!()
}

/// What earlier verifications established, so each restart reads only the
/// new part of the event log.
#[derive(Default)]
struct Checked {
    /// Event payloads seen in the log, sequences 1..=`last_sequence`.
    payloads: BTreeSet<String>,
    last_sequence: u64,
}

impl Checked {
    /// After a restart that followed round `round`'s kill.
    async fn verify(&mut self, keel: &Keel, ledger: &Ledger, round: usize) {
        // The event log: gapless, every payload one we sent, none twice,
        // every acknowledged one present.
        loop {
            let from = self.last_sequence + 1;
            let r = keel.get(&format!("/p/events?from={from}&limit=1000")).await;
            assert_eq!(r.status, 200, "{}", r.body);
            let page = r.json();
            let page = page.as_array().unwrap();
            if page.is_empty() {
                break;
            }
            for e in page {
                self.last_sequence += 1;
                assert_eq!(
                    e["sequence"], self.last_sequence,
                    "round {round}: gap or disorder in the log at {e}"
                );
                assert_edge_event_id(e["id"].as_str().unwrap());
                let payload = e["payload"].as_str().unwrap().to_string();
                assert!(
                    ledger.events_sent.contains(&payload),
                    "round {round}: event {payload:?} was never sent"
                );
                assert!(
                    self.payloads.insert(payload.clone()),
                    "round {round}: event {payload:?} is in the log twice"
                );
            }
        }
        let last = keel.get("/p/events-last").await.json();
        let expected_last = match self.last_sequence {
            0 => serde_json::Value::Null,
            n => n.into(),
        };
        assert_eq!(last, expected_last, "round {round}: last-sequence");
        let lost: Vec<&String> = ledger.events_acked.difference(&self.payloads).collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} acknowledged events lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );

        // kv of the round just killed: every acknowledged key is there, and
        // every key there is one we sent, with the value we sent (no torn
        // or foreign writes).
        let Some(killed) = round.checked_sub(1) else {
            return;
        };
        let prefix = format!("crash-r{killed}-");
        let present = list_all(keel, &prefix).await;
        for key in &present {
            let sent = ledger
                .kv_sent
                .get(key)
                .unwrap_or_else(|| panic!("round {round}: key {key:?} was never written"));
            let r = keel.get(&format!("/p/kv/{key}")).await;
            assert_eq!(
                (r.status, &r.body),
                (200, sent),
                "round {round}: value of {key}"
            );
        }
        let lost: Vec<&String> = ledger
            .kv_acked
            .iter()
            .filter(|k| k.starts_with(&prefix) && !present.contains(*k))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} acknowledged kv writes lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
    }
}

/// At the end: every acknowledged key of every round is still there, and
/// nothing else is.
async fn verify_all_keys(keel: &Keel, ledger: &Ledger) {
    let present = list_all(keel, "crash-").await;
    let foreign: Vec<&String> = present
        .iter()
        .filter(|k| !ledger.kv_sent.contains_key(*k))
        .collect();
    assert!(foreign.is_empty(), "keys never written: {foreign:?}");
    let lost: Vec<&String> = ledger.kv_acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged kv writes lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

/// Every key with `prefix`, through all pages of `kv-list`.
async fn list_all(keel: &Keel, prefix: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/p/kv-list?prefix={prefix}&cursor={c}"),
            None => format!("/p/kv-list?prefix={prefix}"),
        };
        let r = keel.get(&path).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let page = r.json();
        for k in page["keys"].as_array().unwrap() {
            assert!(
                keys.insert(k.as_str().unwrap().to_string()),
                "{k} listed twice"
            );
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return keys,
        }
    }
}
