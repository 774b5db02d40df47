//! One behaviour suite, run against both backends: `LocalBus` and `NatsBus`
//! on a real `nats-server` (one fresh server per test).
//!
//! Each case is an `async fn(Arc<dyn Bus>)`; the `conformance!` macro makes
//! a `local::case` and a `nats::case` test of it.

use bytes::Bytes;
use keel_bus::local::LocalBus;
use keel_bus::nats::{NatsBus, NatsOptions};
use keel_bus::{
    Bus, BusError, ConnectionState, Headers, KvEntry, KvSpec, StreamAppend, StreamSpec,
    Subscription,
};
use keel_test_support::{NatsServer, wait_until_async};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Deadline for anything that should arrive promptly.
const WAIT: Duration = Duration::from_secs(10);

struct Backend {
    bus: Arc<dyn Bus>,
    // Dropped after `bus`.
    _server: Option<NatsServer>,
}

fn local_backend() -> Backend {
    Backend {
        bus: Arc::new(LocalBus::new()),
        _server: None,
    }
}

async fn nats_backend() -> Backend {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let bus = NatsBus::connect(NatsOptions::new([server.url()]))
        .await
        .unwrap();
    bus.wait_connected(WAIT).await.unwrap();
    Backend {
        bus: Arc::new(bus),
        _server: Some(server),
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::local_backend();
                    super::$case(backend.bus.clone()).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::nats_backend().await;
                    super::$case(backend.bus.clone()).await;
                }
            )*
        }
    };
}

conformance!(
    reports_connected,
    publish_subscribe_with_wildcards_and_headers,
    queue_groups_deliver_each_message_once_per_group,
    request_reply,
    request_times_out_without_reply,
    request_without_subscribers_has_no_responders,
    stream_append_and_read,
    stream_dedups_by_msg_id,
    stream_append_if_is_a_compare_and_set_per_subject,
    stream_append_many_acks_a_prefix_in_order,
    stream_and_core_subjects_are_one_namespace,
    stream_and_bucket_errors,
    kv_get_put_create_update_delete,
    kv_watch_sees_later_changes_matching_the_pattern,
    stream_erase_removes_one_subject,
    kv_erase_removes_every_revision,
    invalid_input_is_rejected,
);

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn h(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn next(sub: &mut Subscription) -> keel_bus::Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("no message within deadline")
        .expect("subscription closed")
}

async fn reports_connected(bus: Arc<dyn Bus>) {
    assert!(matches!(bus.kind(), "local" | "nats"));
    assert_eq!(bus.connection_state(), ConnectionState::Connected);
    assert_eq!(
        *bus.connection_events().borrow(),
        ConnectionState::Connected
    );
}

async fn publish_subscribe_with_wildcards_and_headers(bus: Arc<dyn Bus>) {
    let mut exact = bus.subscribe("orders.eu.created", None).await.unwrap();
    let mut star = bus.subscribe("orders.*.created", None).await.unwrap();
    let mut tail = bus.subscribe("orders.>", None).await.unwrap();
    let mut other = bus.subscribe("orders.us.*", None).await.unwrap();
    let mut shallow = bus.subscribe("orders.*", None).await.unwrap();

    let headers = h(&[("Trace-Id", "abc"), ("X-Tenant", "t1")]);
    bus.publish("orders.eu.created", headers.clone(), b("order-1"))
        .await
        .unwrap();
    for sub in [&mut exact, &mut star, &mut tail] {
        let m = next(sub).await;
        assert_eq!(m.subject, "orders.eu.created");
        assert_eq!(m.payload, b("order-1"));
        assert_eq!(m.headers, headers);
        assert_eq!(m.reply, None);
    }
    // Non-matching subscriptions: the first thing they see is a later
    // message they do match.
    bus.publish("orders.us.created", vec![], b("order-2"))
        .await
        .unwrap();
    bus.publish("orders.eu", vec![], b("shallow"))
        .await
        .unwrap();
    assert_eq!(next(&mut other).await.payload, b("order-2"));
    assert_eq!(next(&mut shallow).await.payload, b("shallow"));
    assert_eq!(next(&mut tail).await.payload, b("order-2"));
    assert_eq!(next(&mut tail).await.payload, b("shallow"));
    assert_eq!(next(&mut star).await.payload, b("order-2"));

    // Order is preserved per publisher and subject; empty payloads pass.
    for i in 0..100 {
        bus.publish("orders.eu.created", vec![], Bytes::from(format!("{i}")))
            .await
            .unwrap();
    }
    bus.publish("orders.eu.created", vec![], Bytes::new())
        .await
        .unwrap();
    for i in 0..100 {
        assert_eq!(next(&mut exact).await.payload, Bytes::from(format!("{i}")));
    }
    assert_eq!(next(&mut exact).await.payload, Bytes::new());
}

async fn queue_groups_deliver_each_message_once_per_group(bus: Arc<dyn Bus>) {
    const N: usize = 30;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(&'static str, usize, Bytes)>();
    let mut tasks = Vec::new();
    for (group, members) in [("workers", 3), ("auditors", 1)] {
        for member in 0..members {
            let mut sub = bus.subscribe("jobs.>", Some(group)).await.unwrap();
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    if tx.send((group, member, m.payload)).is_err() {
                        return;
                    }
                }
            }));
        }
    }
    let mut plain = bus.subscribe("jobs.*", None).await.unwrap();
    for i in 0..N {
        bus.publish(&format!("jobs.{i}"), vec![], Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    for i in 0..N {
        assert_eq!(next(&mut plain).await.payload, Bytes::from(i.to_string()));
    }
    let mut seen: HashSet<(&str, Bytes)> = HashSet::new();
    while seen.len() < 2 * N {
        let (group, _member, payload) = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("queue group message within deadline")
            .unwrap();
        assert!(
            seen.insert((group, payload.clone())),
            "{group} got {payload:?} twice"
        );
    }
    for t in tasks {
        t.abort();
    }
}

async fn request_reply(bus: Arc<dyn Bus>) {
    // Two responders in a queue group: each request is answered once.
    let mut responders = Vec::new();
    for id in ["r1", "r2"] {
        let mut sub = bus.subscribe("svc.echo", Some("echo")).await.unwrap();
        let bus = bus.clone();
        responders.push(tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let reply = m.reply.expect("request has a reply subject");
                let mut payload = m.payload.to_vec();
                payload.reverse();
                let mut headers = m.headers.clone();
                headers.push(("Responder".into(), id.into()));
                headers.sort();
                bus.publish(&reply, headers, payload.into()).await.unwrap();
            }
        }));
    }
    for i in 0..5 {
        let reply = bus
            .request(
                "svc.echo",
                h(&[("Attempt", &i.to_string())]),
                b("abc"),
                WAIT,
            )
            .await
            .unwrap();
        assert_eq!(reply.payload, b("cba"));
        assert_eq!(reply.headers[0], ("Attempt".to_string(), i.to_string()));
        assert_eq!(reply.headers[1].0, "Responder");
        assert!(reply.subject.starts_with("_INBOX."), "{}", reply.subject);
    }
    for r in responders {
        r.abort();
    }
}

async fn request_times_out_without_reply(bus: Arc<dyn Bus>) {
    let mut silent = bus.subscribe("svc.silent", None).await.unwrap();
    let timeout = Duration::from_millis(200);
    let started = std::time::Instant::now();
    let err = bus
        .request("svc.silent", vec![], b("ping"), timeout)
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::Timeout(_)), "{err:?}");
    assert!(started.elapsed() >= timeout);
    // The request did reach the subscriber.
    assert!(next(&mut silent).await.reply.is_some());
}

async fn request_without_subscribers_has_no_responders(bus: Arc<dyn Bus>) {
    let err = bus
        .request("svc.nobody", vec![], b("ping"), WAIT)
        .await
        .unwrap_err();
    assert_eq!(err, BusError::NoResponders("svc.nobody".into()));
}

fn stream_spec(name: &str, subjects: &[&str]) -> StreamSpec {
    StreamSpec {
        name: name.into(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        replicas: 1,
        duplicate_window: Duration::from_secs(60),
        max_age: None,
        placement: None,
    }
}

async fn stream_append_and_read(bus: Arc<dyn Bus>) {
    let spec = stream_spec("ORDERS", &["orders.>"]);
    bus.ensure_stream(&spec).await.unwrap();
    bus.ensure_stream(&spec).await.unwrap(); // idempotent
    let before_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for i in 1..=6u64 {
        let region = if i % 2 == 1 { "eu" } else { "us" };
        let ack = bus
            .stream_append(
                &format!("orders.{region}.{i}"),
                h(&[("A", "1"), ("B", &i.to_string())]),
                Bytes::from(format!("o{i}")),
                None,
            )
            .await
            .unwrap();
        assert_eq!(ack.sequence, i);
        assert!(!ack.duplicate);
    }
    let all = bus.stream_read("ORDERS", ">", 1, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(all[0].subject, "orders.eu.1");
    assert_eq!(all[1].subject, "orders.us.2");
    assert_eq!(all[1].payload, b("o2"));
    assert_eq!(all[1].headers, h(&[("A", "1"), ("B", "2")]));
    let after_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for m in &all {
        assert!(
            m.time_ms + 1_000 >= before_ms && m.time_ms <= after_ms + 1_000,
            "time_ms {} outside [{before_ms}, {after_ms}]",
            m.time_ms
        );
    }
    // From a sequence, bounded by max.
    let page = bus.stream_read("ORDERS", ">", 3, 2).await.unwrap();
    assert_eq!(
        page.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        vec![3, 4]
    );
    // Sequence 0 reads from the start.
    assert_eq!(
        bus.stream_read("ORDERS", ">", 0, 1).await.unwrap()[0].sequence,
        1
    );
    // Filters.
    let eu = bus
        .stream_read("ORDERS", "orders.eu.*", 1, 100)
        .await
        .unwrap();
    assert_eq!(
        eu.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        vec![1, 3, 5]
    );
    let us_from_3 = bus
        .stream_read("ORDERS", "orders.us.>", 3, 100)
        .await
        .unwrap();
    assert_eq!(
        us_from_3.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        vec![4, 6]
    );
    let one = bus
        .stream_read("ORDERS", "orders.us.4", 1, 100)
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].sequence, 4);
    // Nothing to read: empty, promptly.
    assert!(
        bus.stream_read("ORDERS", ">", 7, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        bus.stream_read("ORDERS", "orders.none.>", 1, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        bus.stream_read("ORDERS", ">", 1, 0)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn stream_dedups_by_msg_id(bus: Arc<dyn Bus>) {
    bus.ensure_stream(&stream_spec("EVENTS", &["events.*"]))
        .await
        .unwrap();
    let first = bus
        .stream_append("events.a", vec![], b("1"), Some("m1"))
        .await
        .unwrap();
    assert_eq!((first.sequence, first.duplicate), (1, false));
    let again = bus
        .stream_append("events.a", vec![], b("1 again"), Some("m1"))
        .await
        .unwrap();
    assert_eq!((again.sequence, again.duplicate), (1, true));
    let second = bus
        .stream_append("events.b", vec![], b("2"), Some("m2"))
        .await
        .unwrap();
    assert_eq!((second.sequence, second.duplicate), (2, false));
    let no_id = bus
        .stream_append("events.b", vec![], b("3"), None)
        .await
        .unwrap();
    assert_eq!(no_id.sequence, 3);
    let msgs = bus.stream_read("EVENTS", ">", 1, 10).await.unwrap();
    assert_eq!(
        msgs.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(),
        vec![b("1"), b("2"), b("3")]
    );
    // The msg_id is not a user header.
    assert!(msgs.iter().all(|m| m.headers.is_empty()), "{msgs:?}");
}

async fn stream_append_if_is_a_compare_and_set_per_subject(bus: Arc<dyn Bus>) {
    bus.ensure_stream(&stream_spec("ACCOUNTS", &["acct.*"]))
        .await
        .unwrap();
    assert_eq!(bus.stream_last("ACCOUNTS", "acct.a").await.unwrap(), None);
    // 0: the subject must have no message yet.
    let a1 = bus
        .stream_append_if("acct.a", vec![], b("a1"), None, 0)
        .await
        .unwrap();
    assert_eq!(a1.sequence, 1);
    let again = bus
        .stream_append_if("acct.a", vec![], b("a1 again"), None, 0)
        .await;
    assert!(matches!(again, Err(BusError::Conflict(_))), "{again:?}");
    // Another subject's messages do not move `acct.a`'s last sequence.
    let b1 = bus
        .stream_append_if("acct.b", vec![], b("b1"), None, 0)
        .await
        .unwrap();
    assert_eq!(b1.sequence, 2);
    let a2 = bus
        .stream_append_if("acct.a", h(&[("K", "v")]), b("a2"), None, a1.sequence)
        .await
        .unwrap();
    assert_eq!(a2.sequence, 3);
    let stale = bus
        .stream_append_if("acct.a", vec![], b("stale"), None, a1.sequence)
        .await;
    assert!(matches!(stale, Err(BusError::Conflict(_))), "{stale:?}");
    let last = bus
        .stream_last("ACCOUNTS", "acct.a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (last.sequence, last.subject.as_str(), last.payload.clone()),
        (3, "acct.a", b("a2"))
    );
    assert_eq!(last.headers, h(&[("K", "v")]));
    // The next message on a subject from a sequence on.
    let next = |from| {
        let bus = bus.clone();
        async move {
            bus.stream_next("ACCOUNTS", "acct.a", from)
                .await
                .unwrap()
                .map(|m| (m.sequence, m.payload))
        }
    };
    assert_eq!(next(0).await, Some((1, b("a1"))));
    assert_eq!(next(2).await, Some((3, b("a2"))));
    assert_eq!(next(3).await, Some((3, b("a2"))));
    assert_eq!(next(4).await, None);
    let msgs = bus.stream_read("ACCOUNTS", ">", 1, 10).await.unwrap();
    assert_eq!(
        msgs.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(),
        vec![b("a1"), b("b1"), b("a2")]
    );
    assert!(matches!(
        bus.stream_last("NOPE", "acct.a").await,
        Err(BusError::NotFound(_))
    ));
    assert!(matches!(
        bus.stream_last("ACCOUNTS", "acct.*").await,
        Err(BusError::Invalid(_))
    ));
}

async fn stream_append_many_acks_a_prefix_in_order(bus: Arc<dyn Bus>) {
    bus.ensure_stream(&stream_spec("MANY", &["many.*"]))
        .await
        .unwrap();
    let msg = |subject: &str, id: &str| StreamAppend {
        subject: subject.into(),
        headers: h(&[("k", id)]),
        payload: b(id),
        msg_id: Some(id.into()),
    };
    let batch: Vec<StreamAppend> = (1..=100).map(|i| msg("many.a", &format!("m{i}"))).collect();
    let acks = bus.stream_append_many(batch.clone()).await;
    assert_eq!(acks.len(), 100);
    for (i, a) in acks.iter().enumerate() {
        let a = a.as_ref().unwrap();
        assert_eq!((a.sequence, a.duplicate), (i as u64 + 1, false));
    }
    // Replaying a batch is deduplicated message by message.
    let again = bus.stream_append_many(batch[..10].to_vec()).await;
    assert!(again.iter().all(|a| a.as_ref().unwrap().duplicate));
    // A message no stream captures fails and ends the acknowledged prefix
    // (a pipelining backend may still have stored what followed it).
    let acks = bus
        .stream_append_many(vec![
            msg("many.b", "n1"),
            msg("elsewhere", "n2"),
            msg("many.b", "n3"),
        ])
        .await;
    assert_eq!(acks.len(), 2, "{acks:?}");
    assert_eq!(acks[0].as_ref().unwrap().sequence, 101);
    assert!(acks[1].is_err(), "{acks:?}");
    let read = bus.stream_read("MANY", ">", 95, 100).await.unwrap();
    let payloads: Vec<Bytes> = read.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(
        payloads[..7],
        ["m95", "m96", "m97", "m98", "m99", "m100", "n1"].map(b)
    );
    assert!(
        payloads.len() == 7 || payloads[7] == b("n3"),
        "{payloads:?}"
    );
}

async fn stream_and_core_subjects_are_one_namespace(bus: Arc<dyn Bus>) {
    bus.ensure_stream(&stream_spec("AUDIT", &["audit.>"]))
        .await
        .unwrap();
    let mut sub = bus.subscribe("audit.>", None).await.unwrap();
    // An append is delivered to core subscribers…
    bus.stream_append("audit.login", vec![], b("appended"), None)
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.payload, b("appended"));
    // …and a core publish is stored by the stream capturing its subject.
    bus.publish("audit.logout", vec![], b("published"))
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.payload, b("published"));
    let stored = wait_until_async(WAIT, || async {
        bus.stream_read("AUDIT", ">", 1, 10).await.unwrap().len() == 2
    })
    .await;
    assert!(stored, "core publish was not stored in the stream");
    let msgs = bus.stream_read("AUDIT", ">", 2, 10).await.unwrap();
    assert_eq!(msgs[0].subject, "audit.logout");
}

async fn stream_and_bucket_errors(bus: Arc<dyn Bus>) {
    bus.ensure_stream(&stream_spec("S1", &["s1.>"]))
        .await
        .unwrap();
    let err = bus
        .ensure_stream(&stream_spec("S1", &["other.>"]))
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::Conflict(_)), "{err:?}");
    let err = bus
        .ensure_stream(&stream_spec("S2", &["s1.x.>"]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, BusError::Conflict(_)),
        "overlapping subjects: {err:?}"
    );
    let err = bus
        .stream_append("nostream.x", vec![], b("x"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::NotFound(_)), "{err:?}");
    let err = bus.stream_read("MISSING", ">", 1, 10).await.unwrap_err();
    assert!(matches!(err, BusError::NotFound(_)), "{err:?}");
    let err = bus.kv_get("missing", "k").await.unwrap_err();
    assert!(matches!(err, BusError::NotFound(_)), "{err:?}");
    let err = bus.kv_put("missing", "k", b("v")).await.unwrap_err();
    assert!(matches!(err, BusError::NotFound(_)), "{err:?}");
    let err = bus.kv_watch("missing", ">").await.err().unwrap();
    assert!(matches!(err, BusError::NotFound(_)), "{err:?}");
}

fn kv_spec(bucket: &str) -> KvSpec {
    KvSpec {
        bucket: bucket.into(),
        history: 5,
        max_age: None,
        placement: None,
        replicas: 1,
    }
}

fn entry(key: &str, value: Option<&str>, revision: u64) -> KvEntry {
    KvEntry {
        key: key.into(),
        value: value.map(b),
        revision,
    }
}

async fn kv_get_put_create_update_delete(bus: Arc<dyn Bus>) {
    bus.ensure_kv(&kv_spec("config")).await.unwrap();
    bus.ensure_kv(&kv_spec("config")).await.unwrap(); // idempotent
    assert_eq!(bus.kv_get("config", "a").await.unwrap(), None);

    assert_eq!(bus.kv_put("config", "a", b("1")).await.unwrap(), 1);
    assert_eq!(
        bus.kv_get("config", "a").await.unwrap(),
        Some(entry("a", Some("1"), 1))
    );

    let err = bus.kv_create("config", "a", b("x")).await.unwrap_err();
    assert!(matches!(err, BusError::Conflict(_)), "{err:?}");
    assert_eq!(bus.kv_create("config", "b.c", b("2")).await.unwrap(), 2);

    assert_eq!(bus.kv_update("config", "a", b("1b"), 1).await.unwrap(), 3);
    let err = bus
        .kv_update("config", "a", b("stale"), 1)
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::Conflict(_)), "{err:?}");
    let err = bus.kv_update("config", "b.c", b("x"), 0).await.unwrap_err();
    assert!(matches!(err, BusError::Conflict(_)), "{err:?}");
    assert_eq!(
        bus.kv_get("config", "a").await.unwrap(),
        Some(entry("a", Some("1b"), 3))
    );

    let mut keys = bus.kv_keys("config").await.unwrap();
    keys.sort();
    assert_eq!(keys, ["a", "b.c"]);
    bus.kv_delete("config", "a").await.unwrap(); // revision 4
    assert_eq!(bus.kv_get("config", "a").await.unwrap(), None);
    // Deleted keys are not listed.
    assert_eq!(bus.kv_keys("config").await.unwrap(), ["b.c"]);
    // Create succeeds on a deleted key.
    assert_eq!(bus.kv_create("config", "a", b("reborn")).await.unwrap(), 5);
    assert_eq!(
        bus.kv_get("config", "a").await.unwrap(),
        Some(entry("a", Some("reborn"), 5))
    );
    // Update with revision 0 creates an absent key only.
    assert_eq!(
        bus.kv_update("config", "fresh", b("f"), 0).await.unwrap(),
        6
    );
    // A plain put always wins.
    assert_eq!(bus.kv_put("config", "b.c", b("3")).await.unwrap(), 7);
    assert_eq!(
        bus.kv_get("config", "b.c").await.unwrap(),
        Some(entry("b.c", Some("3"), 7))
    );
}

async fn stream_erase_removes_one_subject(bus: Arc<dyn Bus>) {
    bus.ensure_stream(&stream_spec("USERS", &["users.>"]))
        .await
        .unwrap();
    for (subject, body) in [
        ("users.u1", "one"),
        ("users.u2", "keep"),
        ("users.u1", "two"),
        ("users.u1.x", "deeper"),
    ] {
        bus.stream_append(subject, Headers::new(), b(body), None)
            .await
            .unwrap();
    }
    assert_eq!(bus.stream_erase("USERS", "users.u1").await.unwrap(), 2);
    let left: Vec<(u64, String)> = bus
        .stream_read("USERS", ">", 1, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.sequence, m.subject))
        .collect();
    assert_eq!(left, [(2, "users.u2".into()), (4, "users.u1.x".into())]);
    assert_eq!(bus.stream_last("USERS", "users.u1").await.unwrap(), None);
    // Idempotent; sequences are never reused.
    assert_eq!(bus.stream_erase("USERS", "users.u1").await.unwrap(), 0);
    let ack = bus
        .stream_append("users.u1", Headers::new(), b("three"), None)
        .await
        .unwrap();
    assert_eq!(ack.sequence, 5);
    let err = bus.stream_erase("NOPE", "users.u1").await.unwrap_err();
    assert!(matches!(err, BusError::NotFound(_)), "{err:?}");
    let err = bus.stream_erase("USERS", "users.*").await.unwrap_err();
    assert!(matches!(err, BusError::Invalid(_)), "{err:?}");
}

async fn kv_erase_removes_every_revision(bus: Arc<dyn Bus>) {
    bus.ensure_kv(&kv_spec("keys")).await.unwrap();
    bus.kv_put("keys", "u1", b("first")).await.unwrap();
    bus.kv_put("keys", "u1", b("second")).await.unwrap();
    bus.kv_put("keys", "u2", b("other")).await.unwrap();
    assert_eq!(bus.kv_erase("keys", "u1").await.unwrap(), 2);
    assert_eq!(bus.kv_get("keys", "u1").await.unwrap(), None);
    assert_eq!(bus.kv_keys("keys").await.unwrap(), ["u2"]);
    assert_eq!(bus.kv_erase("keys", "u1").await.unwrap(), 0);
    // The key can be created again (no delete marker is left behind).
    bus.kv_create("keys", "u1", b("again")).await.unwrap();
    assert_eq!(
        bus.kv_get("keys", "u1").await.unwrap().unwrap().value,
        Some(b("again"))
    );
    let err = bus.kv_erase("nope", "u1").await.unwrap_err();
    assert!(matches!(err, BusError::NotFound(_)), "{err:?}");
}

/// The secure delete really removes the bytes from the server's store
/// files, where a plain delete only drops the index entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_erase_overwrites_the_stored_bytes() {
    let backend = nats_backend().await;
    let bus = backend.bus.clone();
    let store = backend._server.as_ref().unwrap().store_dir().to_path_buf();
    bus.ensure_stream(&stream_spec("USERS", &["users.>"]))
        .await
        .unwrap();
    bus.ensure_kv(&kv_spec("keys")).await.unwrap();
    for i in 0..3 {
        bus.stream_append(
            "users.u1",
            Headers::new(),
            b(&format!("SECRET-MARKER-STREAM-{i}")),
            None,
        )
        .await
        .unwrap();
    }
    bus.stream_append("users.u2", Headers::new(), b("KEPT-MARKER-STREAM"), None)
        .await
        .unwrap();
    // Enough other data that the erased messages are a small part of
    // their block (NATS compacts blocks that are mostly deleted anyway).
    for i in 0..50 {
        bus.kv_put(
            "keys",
            &format!("other{i}"),
            b(&format!("KEPT-MARKER-KV-{i:02}-{}", "x".repeat(200))),
        )
        .await
        .unwrap();
        bus.stream_append(
            "users.u3",
            Headers::new(),
            b(&format!("KEPT-MARKER-STREAM-{i:02}-{}", "x".repeat(200))),
            None,
        )
        .await
        .unwrap();
    }
    bus.kv_put("keys", "u1", b("SECRET-MARKER-KV"))
        .await
        .unwrap();
    let on_disk = |needle: &str| keel_test_support::files_containing(&store, needle.as_bytes());
    // Written through to the block files (JetStream writes before acking).
    assert!(!on_disk("SECRET-MARKER-STREAM-1").is_empty());
    assert!(!on_disk("SECRET-MARKER-KV").is_empty());
    assert_eq!(bus.stream_erase("USERS", "users.u1").await.unwrap(), 3);
    assert_eq!(bus.kv_erase("keys", "u1").await.unwrap(), 1);
    for i in 0..3 {
        let marker = format!("SECRET-MARKER-STREAM-{i}");
        assert_eq!(
            on_disk(&marker),
            Vec::<std::path::PathBuf>::new(),
            "{marker}"
        );
    }
    assert_eq!(
        on_disk("SECRET-MARKER-KV"),
        Vec::<std::path::PathBuf>::new()
    );
    assert!(!on_disk("KEPT-MARKER-STREAM").is_empty());
    assert!(!on_disk("KEPT-MARKER-KV-49").is_empty());
}

async fn kv_watch_sees_later_changes_matching_the_pattern(bus: Arc<dyn Bus>) {
    bus.ensure_kv(&kv_spec("users")).await.unwrap();
    assert_eq!(bus.kv_put("users", "user.0", b("before")).await.unwrap(), 1);
    let mut users = bus.kv_watch("users", "user.*").await.unwrap();
    let mut all = bus.kv_watch("users", ">").await.unwrap();

    bus.kv_put("users", "user.1", b("ann")).await.unwrap(); // 2
    bus.kv_put("users", "group.1", b("admins")).await.unwrap(); // 3
    bus.kv_delete("users", "user.1").await.unwrap(); // 4
    bus.kv_put("users", "user.2.profile", b("deep"))
        .await
        .unwrap(); // 5
    bus.kv_put("users", "user.3", b("bob")).await.unwrap(); // 6

    let mut got = Vec::new();
    for _ in 0..3 {
        let e = tokio::time::timeout(WAIT, users.next())
            .await
            .expect("watch entry within deadline")
            .expect("watch open")
            .unwrap();
        got.push(e);
    }
    assert_eq!(
        got,
        vec![
            entry("user.1", Some("ann"), 2),
            entry("user.1", None, 4),
            entry("user.3", Some("bob"), 6),
        ]
    );
    let mut revisions = Vec::new();
    for _ in 0..5 {
        let e = tokio::time::timeout(WAIT, all.next())
            .await
            .expect("watch entry within deadline")
            .expect("watch open")
            .unwrap();
        revisions.push(e.revision);
    }
    assert_eq!(revisions, vec![2, 3, 4, 5, 6]);
}

async fn invalid_input_is_rejected(bus: Arc<dyn Bus>) {
    fn invalid<T: std::fmt::Debug>(r: Result<T, BusError>) {
        match r {
            Err(BusError::Invalid(_)) => {}
            other => panic!("expected Invalid, got {other:?}"),
        }
    }
    invalid(bus.publish("", vec![], b("x")).await);
    invalid(bus.publish("a..b", vec![], b("x")).await);
    invalid(bus.publish("a.*", vec![], b("x")).await);
    invalid(bus.publish("a.>", vec![], b("x")).await);
    invalid(bus.publish("a b", vec![], b("x")).await);
    invalid(bus.publish("a", h(&[("Bad:Name", "v")]), b("x")).await);
    invalid(
        bus.publish("a", h(&[("Name", "line\r\nbreak")]), b("x"))
            .await,
    );
    invalid(bus.subscribe("a.>.b", None).await.map(|_| ()));
    invalid(bus.subscribe("a.b*", None).await.map(|_| ()));
    invalid(bus.subscribe("a.b", Some("bad queue")).await.map(|_| ()));
    invalid(bus.request("a.*", vec![], b("x"), WAIT).await);
    invalid(bus.stream_append("a.*", vec![], b("x"), None).await);
    invalid(bus.ensure_stream(&stream_spec("bad.name", &["x.>"])).await);
    invalid(bus.ensure_stream(&stream_spec("GOOD", &["x..y"])).await);
    invalid(bus.ensure_stream(&stream_spec("GOOD", &[])).await);
    invalid(bus.stream_read("bad name", ">", 1, 1).await);
    invalid(bus.stream_read("GOOD", "a b", 1, 1).await);
    invalid(bus.ensure_kv(&kv_spec("bad.bucket")).await);
    invalid(
        bus.ensure_kv(&KvSpec {
            history: 0,
            ..kv_spec("b")
        })
        .await,
    );
    invalid(bus.kv_get("b", ".key").await);
    invalid(bus.kv_put("b", "key.", b("x")).await);
    invalid(bus.kv_put("b", "a*b", b("x")).await);
    invalid(bus.kv_create("b", "", b("x")).await);
    invalid(bus.kv_update("b", "a b", b("x"), 1).await);
    invalid(bus.kv_delete("b.c", "k").await);
    invalid(bus.kv_watch("b", "a.>.c").await.map(|_| ()));
}
