//! `regional-coordination` on one node (the embedded default: the node is
//! its own region, its stream on the in-process bus), through the
//! `regional-probe` guest: every function, subscriptions delivered to the
//! exported handler, component isolation, and errors. Plus global event
//! ids across two nodes on a real nats-server.

use crate::support::*;
use serde_json::{Value, json};

fn probe_node(extra: &str) -> Node {
    Node::new(&format!(
        "{}\n{}\n{extra}",
        component(
            "reg",
            "regional-probe",
            "/reg/...",
            r#"grants = ["regional-coordination", "global-coordination", "edge-operations", "kv"]"#
        ),
        component(
            "other",
            "regional-probe",
            "/other/...",
            r#"grants = ["regional-coordination", "global-coordination", "edge-operations", "kv"]"#
        ),
    ))
}

/// Polls `path` until it answers 200 with JSON for which `f` holds.
async fn poll(node: &Keel, path: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    node.poll("GET", path, "", what, |s, v| s == 200 && f(v))
        .await
}

async fn post_json(node: &Keel, path: &str, body: Value) -> Reply {
    node.post(path, body.to_string()).await
}

fn event(kind: &str, key: &str, payload: &str) -> Value {
    json!({"kind": kind, "key": key, "payload": payload})
}

#[tokio::test]
async fn sync_to_region_reports_queued_then_forwarded() {
    let node = probe_node("");
    let keel = node.start();
    let r = post_json(
        &keel,
        "/reg/sync",
        json!([
            event("order.placed", "o-1", "a"),
            event("order.placed", "o-2", "b")
        ]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let status = poll(&keel, &format!("/reg/sync/{id}"), "forwarded", |v| {
        v == "forwarded"
    })
    .await;
    assert_eq!(status, "forwarded");
    // Unknown, malformed and future ids are not found.
    for bad in ["nope", "0000000000000000-1", &format!("{}9999", &id)] {
        let r = keel.get(&format!("/reg/sync/{bad}")).await;
        assert_eq!(r.status, 404, "{bad}: {}", r.body);
    }
    // An empty batch is invalid; an invalid event refuses the whole batch.
    let r = post_json(&keel, "/reg/sync", json!([])).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = post_json(
        &keel,
        "/reg/sync",
        json!([event("ok", "k", "x"), event("", "k", "x")]),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("invalid"))
    );
    assert!(r.body.contains("event 1"), "{}", r.body);
    // Both events of the first batch are in the local log: the subscription
    // below sees them (sequences 1 and 2), and nothing of the refused batch.
}

#[tokio::test]
async fn subscriptions_deliver_matching_events_in_order_at_least_once() {
    let node = probe_node("");
    let keel = node.start();
    let r = post_json(
        &keel,
        "/reg/subscribe",
        json!({"kinds": ["chat.message"], "key_prefix": "room-1"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sub = r.json()["id"].as_u64().unwrap();
    // An equal filter (lists in another order) is the same subscription.
    let again = post_json(
        &keel,
        "/reg/subscribe",
        json!({"kinds": ["chat.message", "chat.message"], "key_prefix": "room-1", "edges": []}),
    )
    .await;
    assert_eq!(again.json()["id"].as_u64(), Some(sub));
    // The other component subscribes to everything: it must see only its own.
    let other = post_json(&keel, "/other/subscribe", json!({})).await;
    assert_eq!(other.status, 200, "{}", other.body);

    // The first two deliveries fail (the handler says `unavailable`): the
    // host retries, in order.
    assert_eq!(keel.put("/reg/fail-updates?n=2", "").await.status, 204);
    for (kind, key, payload) in [
        ("chat.message", "room-1", "hello"),
        ("chat.typing", "room-1", "..."),
        ("chat.message", "room-2", "elsewhere"),
        ("chat.message", "room-1/thread", "world"),
    ] {
        let r = post_json(&keel, "/reg/event", event(kind, key, payload)).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let synced = post_json(
        &keel,
        "/reg/sync",
        json!([event("chat.message", "room-1", "batched")]),
    )
    .await;
    assert_eq!(synced.status, 200, "{}", synced.body);
    let deliveries = poll(
        &keel,
        "/reg/deliveries?prefix=update/",
        "3 deliveries",
        |v| v.as_array().unwrap().len() >= 3,
    )
    .await;
    let got: Vec<(&str, &str)> = deliveries
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["key"].as_str().unwrap(), d["payload"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            ("room-1", "hello"),
            ("room-1/thread", "world"),
            ("room-1", "batched")
        ]
    );
    let first = &deliveries[0];
    assert_eq!(first["subscription"].as_u64(), Some(sub));
    assert_eq!(first["kind"], "chat.message");
    assert_eq!(first["event_sequence"], 1);
    assert_eq!(first["origin"], "local");
    let seqs: Vec<u64> = deliveries
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["sequence"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // The injected failures were retried (the counter is used up).
    let log = keel.log();
    assert!(log.contains("delivery failed; will retry"), "{log}");
    // `other` recorded nothing, so it got nothing.
    assert_eq!(
        keel.get("/other/deliveries?prefix=update/").await.json(),
        json!([])
    );

    // Unsubscribed: later events are not delivered; unknown ids are 404,
    // also another component's id.
    let r = keel.delete(&format!("/reg/subscribe/{sub}")).await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        keel.delete(&format!("/reg/subscribe/{sub}")).await.status,
        404
    );
    assert_eq!(keel.delete("/other/subscribe/99").await.status, 404);
    // A marker subscription proves the feed moved past the next event.
    let marker = post_json(&keel, "/reg/subscribe", json!({"kinds": ["marker"]})).await;
    let marker = marker.json()["id"].as_u64().unwrap();
    assert!(marker > sub, "subscription ids are never reused");
    post_json(&keel, "/reg/event", event("chat.message", "room-1", "late")).await;
    post_json(&keel, "/reg/event", event("marker", "m", "m")).await;
    poll(
        &keel,
        &format!("/reg/deliveries?prefix=update/{marker:020}/"),
        "the marker",
        |v| v.as_array().unwrap().len() == 1,
    )
    .await;
    let all = keel.get("/reg/deliveries?prefix=update/").await.json();
    assert!(
        !all.as_array()
            .unwrap()
            .iter()
            .any(|d| d["payload"] == "late"),
        "{all}"
    );

    // Bad filters are invalid.
    let long = "x".repeat(300);
    let r = post_json(&keel, "/reg/subscribe", json!({"key_prefix": long})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = post_json(&keel, "/reg/subscribe", json!({"kinds": [""]})).await;
    assert_eq!(r.status, 400, "{}", r.body);
}

#[tokio::test]
async fn subscriptions_survive_a_restart() {
    let node = probe_node("");
    let keel = node.start();
    let sub = post_json(&keel, "/reg/subscribe", json!({"kinds": ["k"]})).await;
    let sub = sub.json()["id"].as_u64().unwrap();
    post_json(&keel, "/reg/event", event("k", "a", "before")).await;
    poll(&keel, "/reg/deliveries?prefix=update/", "before", |v| {
        v.as_array().unwrap().len() == 1
    })
    .await;
    keel.sigkill();
    let keel = node.start();
    post_json(&keel, "/reg/event", event("k", "b", "after")).await;
    let d = poll(&keel, "/reg/deliveries?prefix=update/", "after", |v| {
        v.as_array()
            .unwrap()
            .iter()
            .any(|d| d["payload"] == "after")
    })
    .await;
    assert!(
        d.as_array()
            .unwrap()
            .iter()
            .all(|d| d["subscription"].as_u64() == Some(sub)),
        "{d}"
    );
    // Same filter after the restart: the same subscription.
    let again = post_json(&keel, "/reg/subscribe", json!({"kinds": ["k"]})).await;
    assert_eq!(again.json()["id"].as_u64(), Some(sub));
}

#[tokio::test]
async fn user_state_metrics_and_leaderboards_are_regional_views_per_component() {
    let node = probe_node("");
    let keel = node.start();
    // Unknown user: not found.
    assert_eq!(keel.get("/reg/user/nobody").await.status, 404);
    let r = post_json(
        &keel,
        "/reg/activity/alice",
        json!({"kind": "page.view", "attributes": {"path": "/home"}}),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let state = poll(&keel, "/reg/user/alice", "alice's state", |v| {
        v["last_activity"] == "page.view"
    })
    .await;
    assert_eq!(state["home_region"], "local");
    assert_eq!(state["online_edges"], json!(["local"]));
    assert_eq!(state["last_seen_edge"], "local");
    // Another component does not see it.
    assert_eq!(keel.get("/other/user/alice").await.status, 404);

    // Metrics: samples aggregated per bucket.
    for v in ["1.5", "2.5", "-4"] {
        let r = keel
            .post(&format!("/reg/metric/latency?value={v}"), "")
            .await;
        assert_eq!(r.status, 204, "{}", r.body);
    }
    let m = poll(
        &keel,
        "/reg/metrics/latency?start=0&end=18446744073709551615",
        "3 samples",
        |v| {
            v["points"]
                .as_array()
                .is_some_and(|p| p.iter().map(|p| p["count"].as_u64().unwrap()).sum::<u64>() == 3)
        },
    )
    .await;
    assert_eq!(m["region"], "local");
    assert_eq!(m["resolution_ms"], 60_000);
    let points = m["points"].as_array().unwrap();
    let sum: f64 = points.iter().map(|p| p["sum"].as_f64().unwrap()).sum();
    assert_eq!(sum, 0.0);
    let min = points
        .iter()
        .map(|p| p["min"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    assert_eq!(min, -4.0);
    let other = keel
        .get("/other/metrics/latency?start=0&end=18446744073709551615")
        .await
        .json();
    assert_eq!(other["points"], json!([]));
    // Non-finite samples and bad ranges are invalid.
    for bad in ["NaN", "inf"] {
        let r = keel
            .post(&format!("/reg/metric/latency?value={bad}"), "")
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    let r = keel.get("/reg/metrics/latency?start=10&end=5").await;
    assert_eq!(r.status, 400, "{}", r.body);

    // Leaderboard: scores add up, ties share a rank, top-k.
    let r = post_json(
        &keel,
        "/reg/leaderboard/weekly",
        json!([{"member": "ann", "delta": 10}, {"member": "bob", "delta": 7}, {"member": "cy", "delta": 3}]),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    post_json(
        &keel,
        "/reg/leaderboard/weekly",
        json!([{"member": "bob", "delta": 3}, {"member": "cy", "delta": -1}]),
    )
    .await;
    let top = keel.get("/reg/leaderboard/weekly?limit=2").await.json();
    assert_eq!(
        top,
        json!([
            {"rank": 1, "member": "ann", "score": 10},
            {"rank": 1, "member": "bob", "score": 10}
        ])
    );
    let all = keel.get("/reg/leaderboard/weekly?limit=10").await.json();
    assert_eq!(all[2], json!({"rank": 3, "member": "cy", "score": 2}));
    assert_eq!(
        keel.get("/other/leaderboard/weekly?limit=10").await.json(),
        json!([])
    );
    let r = post_json(
        &keel,
        "/reg/leaderboard/weekly",
        json!([{"member": "", "delta": 1}]),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
}

#[tokio::test]
async fn migrations_on_a_single_node_are_refused_with_reasons() {
    let node = probe_node("");
    let keel = node.start();
    let r = post_json(
        &keel,
        "/reg/migrate",
        json!({"user": "alice", "from": "local", "to": "elsewhere"}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("unknown region \\\"elsewhere\\\""),
        "{}",
        r.body
    );
    let r = post_json(
        &keel,
        "/reg/migrate",
        json!({"user": "alice", "from": "local", "to": "local"}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(keel.get("/reg/migrate/nope").await.status, 404);
}

#[tokio::test]
async fn global_events_reach_subscribers_of_their_type_once_per_id() {
    let node = probe_node("");
    let keel = node.start();
    let r = post_json(
        &keel,
        "/reg/global/subscribe",
        json!(["user.>", "order.placed"]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sub = r.json()["id"].as_u64().unwrap();
    // Same types, another order: the same subscription.
    let again = post_json(
        &keel,
        "/reg/global/subscribe",
        json!(["order.placed", "user.>"]),
    )
    .await;
    assert_eq!(again.json()["id"].as_u64(), Some(sub));
    let other = post_json(&keel, "/other/global/subscribe", json!([">"])).await;
    assert_eq!(other.status, 200, "{}", other.body);
    let publish = |id: &str, ty: &str| json!({"id": id, "event_type": ty, "subject": "s", "content_type": "text/plain", "data": format!("data-{id}")});
    for (id, ty) in [
        ("e1", "user.registered"),
        ("e2", "order.placed"),
        ("e3", "order.shipped"),
        ("e4", "user.profile.updated"),
        // The same id again: deduplicated.
        ("e1", "user.registered"),
    ] {
        let r = post_json(&keel, "/reg/global/publish", publish(id, ty)).await;
        assert_eq!(r.status, 204, "{id}: {}", r.body);
    }
    let got = poll(
        &keel,
        "/reg/deliveries?prefix=global/",
        "3 global events",
        |v| v.as_array().unwrap().len() >= 3,
    )
    .await;
    let ids: Vec<&str> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["e1", "e2", "e4"], "{got}");
    let e1 = &got[0];
    assert_eq!(e1["event_type"], "user.registered");
    assert_eq!(e1["data"], "data-e1");
    assert_eq!(e1["origin_region"], "local");
    assert_eq!(e1["source"], "keel://local/local/reg");
    // Only its own component's events reach `other`, which published none.
    assert_eq!(
        keel.get("/other/deliveries?prefix=global/").await.json(),
        json!([])
    );
    // Bad types and ids are invalid; unknown subscriptions are 404.
    for bad in [
        json!({"id": "x", "event_type": "a..b", "data": ""}),
        json!({"id": "", "event_type": "a", "data": ""}),
    ] {
        let r = post_json(&keel, "/reg/global/publish", bad).await;
        assert_eq!(r.status, 400, "{}", r.body);
    }
    let r = post_json(&keel, "/reg/global/subscribe", json!(["a b"])).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = post_json(&keel, "/reg/global/subscribe", json!([])).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(keel.delete("/reg/global/subscribe/999").await.status, 404);
    assert_eq!(
        keel.delete(&format!("/reg/global/subscribe/{sub}"))
            .await
            .status,
        204
    );
}

#[tokio::test]
async fn global_queries_and_reports_on_a_single_node() {
    let node = probe_node("");
    let keel = node.start();
    let q = |body: Value| post_json(&keel, "/reg/global/query", body);
    let topo = q(json!({"topology": null})).await;
    assert_eq!(topo.status, 200, "{}", topo.body);
    assert_eq!(topo.json()[0]["name"], "local");
    assert_eq!(
        q(json!({"home_region": "nobody"})).await.json(),
        Value::Null
    );
    assert_eq!(q(json!({"user_count": null})).await.json(), 0);
    // A migration attempt claims the user's home here first.
    post_json(
        &keel,
        "/reg/migrate",
        json!({"user": "alice", "from": "local", "to": "nowhere"}),
    )
    .await;
    post_json(&keel, "/reg/metric/rps?value=3", json!(null)).await;
    post_json(&keel, "/reg/event", event("order", "o", "x")).await;
    post_json(&keel, "/reg/event", event("order", "o", "y")).await;
    post_json(
        &keel,
        "/reg/leaderboard/all",
        json!([{"member": "a", "delta": 2}]),
    )
    .await;
    let m = poll(
        &keel,
        "/reg/metrics/rps?start=0&end=18446744073709551615",
        "the sample",
        |v| !v["points"].as_array().unwrap().is_empty(),
    )
    .await;
    assert_eq!(m["points"][0]["sum"], 3.0);
    let metric =
        q(json!({"metric": {"metric_type": "rps", "start_ms": 0, "end_ms": u64::MAX}})).await;
    assert_eq!(metric.status, 200, "{}", metric.body);
    assert_eq!(metric.json()[0]["region"], "local");
    assert_eq!(metric.json()[0]["points"][0]["count"], 1);
    let lb = q(json!({"leaderboard": {"category": "all", "limit": 5}})).await;
    assert_eq!(lb.json(), json!([{"rank": 1, "member": "a", "score": 2}]));
    // Reports: application events per type, metrics totals.
    let report = keel
        .poll(
            "POST",
            "/reg/global/report/events",
            &json!({"start_ms": 0, "end_ms": u64::MAX}).to_string(),
            "the events report",
            |s, v| {
                s == 200
                    && v["body"]
                        .as_str()
                        .is_some_and(|b| b.contains("\"count\":2"))
            },
        )
        .await;
    assert_eq!(report["regions"], json!(["local"]));
    assert_eq!(report["missing_regions"], json!([]));
    let body: Value = serde_json::from_str(report["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["regions"]["local"]["order"]["count"], 2);
    let metrics = post_json(
        &keel,
        "/reg/global/report/metrics",
        json!({"start_ms": 0, "end_ms": u64::MAX}),
    )
    .await;
    let body: Value = serde_json::from_str(metrics.json()["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["regions"]["local"]["rps"]["sum"], 3.0);
    // Errors: unknown report type or region.
    let r = post_json(
        &keel,
        "/reg/global/report/nope",
        json!({"start_ms": 0, "end_ms": 1}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = post_json(
        &keel,
        "/reg/global/report/events",
        json!({"start_ms": 0, "end_ms": 1, "regions": ["mars"]}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
}

/// An id published again on another node, after JetStream's duplicate
/// window, is not delivered to a subscription a second time (the window is
/// 1 s here; in production 2 min, while the stream keeps events 7 days).
#[tokio::test]
async fn a_global_event_id_is_delivered_once_across_nodes_and_windows() {
    let nats = keel_test_support::NatsServer::start();
    let node = |edge: &str| {
        Node::new(&format!(
            "[node]\nedge = \"{edge}\"\n\n[infrastructure]\nevent-stream = {{ type = \"nats\", servers = [\"{}\"] }}\n\n{}",
            nats.url(),
            component(
                "reg",
                "regional-probe",
                "/reg/...",
                r#"grants = ["regional-coordination", "global-coordination", "edge-operations", "kv"]"#
            )
        ))
    };
    let window = std::time::Duration::from_secs(1);
    let env = [("KEEL_TEST_GLOBAL_DUPLICATE_WINDOW", "1000")];
    let (node_a, node_b) = (node("a"), node("b"));
    let (a, b) = (node_a.start_with_env(&env), node_b.start_with_env(&env));
    let r = post_json(&b, "/reg/global/subscribe", json!(["dup.>"])).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let publish = |at: &Keel, id: &str, data: &str| {
        let body = json!({"id": id, "event_type": "dup.x", "data": data});
        let at = at.addr;
        async move { request(at, "POST", "/reg/global/publish", body.to_string().into()).await }
    };
    let published = std::time::Instant::now();
    let r = publish(&a, "x1", "first").await;
    assert_eq!(r.status, 204, "{}", r.body);
    poll(&b, "/reg/deliveries?prefix=global/", "x1 at b", |v| {
        v.as_array().is_some_and(|d| d.len() == 1)
    })
    .await;
    // Let the stream forget the message id (time passing is what is under
    // test here, not a synchronisation).
    while published.elapsed() < window * 2 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The same id from another node (whose own ids do not know it), then
    // a marker; once the marker is delivered, x1 must still be the first.
    for (id, data) in [("x1", "second"), ("x2", "marker")] {
        let r = publish(&b, id, data).await;
        assert_eq!(r.status, 204, "{}", r.body);
    }
    let got = poll(
        &b,
        "/reg/deliveries?prefix=global/",
        "the marker at b",
        |v| v.as_array().is_some_and(|d| d.len() == 2),
    )
    .await;
    assert_eq!(got[0]["id"], "x1", "{got}");
    assert_eq!(got[0]["data"], "first", "x1 was delivered twice: {got}");
    assert_eq!(got[1]["id"], "x2", "{got}");
    // And the publishing node keeps its own ids beyond the window too.
    let r = publish(&a, "x1", "third").await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = publish(&a, "x3", "marker").await;
    assert_eq!(r.status, 204, "{}", r.body);
    let got = poll(&b, "/reg/deliveries?prefix=global/", "x3 at b", |v| {
        v.as_array().is_some_and(|d| d.len() == 3)
    })
    .await;
    assert_eq!(got[0]["data"], "first", "{got}");
}

#[tokio::test]
async fn a_backlog_is_delivered_in_batches_of_at_most_64_once_each() {
    let node = probe_node("");
    let keel = node.start();
    // 100 events in the region's stream before anyone subscribes: the
    // subscription's first read finds them all.
    let events: Vec<Value> = (0..100)
        .map(|i| event("chat.message", "room-1", &format!("m{i:03}")))
        .collect();
    let r = post_json(&keel, "/reg/sync", Value::from(events)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    poll(&keel, &format!("/reg/sync/{id}"), "forwarded", |v| {
        v == "forwarded"
    })
    .await;
    // The first call fails: the same batch comes again.
    assert_eq!(keel.put("/reg/fail-updates?n=1", "").await.status, 204);
    let r = post_json(&keel, "/reg/subscribe", json!({"kinds": ["chat.message"]})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sub = r.json()["id"].as_u64().unwrap();

    let deliveries = poll(
        &keel,
        "/reg/deliveries?prefix=update/",
        "100 deliveries",
        |v| v.as_array().unwrap().len() >= 100,
    )
    .await;
    let payloads: Vec<&str> = deliveries
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["payload"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..100).map(|i| format!("m{i:03}")).collect();
    assert_eq!(payloads, expected);
    // 64, then the 36 left: two successful calls, the largest of 64.
    let batches = keel.get("/reg/deliveries?prefix=batches/").await.json();
    assert_eq!(batches, json!([2]), "calls of on-updates for {sub}");
    let largest = keel
        .get("/reg/deliveries?prefix=largest-batch/")
        .await
        .json();
    assert_eq!(largest, json!([64]));
    assert!(keel.log().contains("delivery failed; will retry"));

    // A later event alone is a batch of one, delivered after the backlog.
    let r = post_json(&keel, "/reg/event", event("chat.message", "room-1", "late")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    poll(
        &keel,
        "/reg/deliveries?prefix=batches/",
        "a third call",
        |v| *v == json!([3]),
    )
    .await;
    let deliveries = keel.get("/reg/deliveries?prefix=update/").await.json();
    let last = deliveries.as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (
            deliveries.as_array().unwrap().len(),
            last["payload"].as_str()
        ),
        (101, Some("late"))
    );
}
