//! State sync (`state` interface) across real `keel` processes and a real
//! nats-server: convergence under concurrency, partitions (a TCP fault proxy
//! between one node and NATS) and SIGKILL + restart.

use crate::support::*;
use keel_test_support::{FaultProxy, NatsServer};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const REGION: &str = "eu-central";

/// A node of region eu-central on edge `edge`, with `state-probe` at
/// `/state/...`, on the bus at `nats_url` (`None`: the in-process bus).
fn state_node(edge: &str, nats_url: Option<&str>) -> Node {
    let bus = match nats_url {
        Some(url) => format!("event-stream = {{ type = \"nats\", servers = [\"{url}\"] }}"),
        None => String::new(),
    };
    Node::new(&format!(
        r#"
[node]
edge = "{edge}"
region = "{REGION}"

[infrastructure]
{bus}
state = {{ type = "rocksdb", anti-entropy-interval = "200ms", max-state-bytes = "64KiB" }}
kv = {{ type = "rocksdb", max-value-bytes = "4KiB" }}

{}
{}"#,
        component(
            "state",
            "state-probe",
            "/state/...",
            r#"grants = ["state"]"#
        ),
        component(
            "other",
            "state-probe",
            "/other/...",
            r#"grants = ["state"]"#
        ),
    ))
}

/// Polls `path` on every node until all answer 200 with the same JSON body
/// satisfying `ok`, or fails after `within`.
async fn converge(
    nodes: &[&Keel],
    path: &str,
    within: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let end = Instant::now() + within;
    loop {
        let mut bodies = Vec::new();
        for n in nodes {
            let r = n.get(path).await;
            bodies.push(if r.status == 200 {
                Some(r.json())
            } else {
                None
            });
        }
        if let Some(Some(first)) = bodies.first()
            && bodies.iter().all(|b| b.as_ref() == Some(first))
            && ok(first)
        {
            return first.clone();
        }
        assert!(
            Instant::now() < end,
            "{path} did not converge within {within:?}: {bodies:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ok_json(node: &Keel, method: &str, path: &str) -> Value {
    let r = node.send(method, path, &[], "").await;
    assert_eq!(r.status, 200, "{method} {path}: {}", r.body);
    r.json()
}

/// Polls `/_keel/ready` until the bus reports `state`.
async fn wait_bus(node: &Keel, state: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let v = node.get("/_keel/ready").await.json();
        if v["bus"]["state"] == state {
            return;
        }
        assert!(Instant::now() < end, "bus never became {state}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_converge_on_30000_concurrent_increments_and_one_set() {
    let _heavy = heavy_test_async().await;
    let nats = NatsServer::start();
    let nodes: Vec<Node> = ["fra", "ams", "par"]
        .iter()
        .map(|e| state_node(e, Some(&nats.url())))
        .collect();
    let keels: Vec<Keel> = nodes.iter().map(Node::start).collect();
    for k in &keels {
        wait_bus(k, "connected").await;
        assert_eq!(k.get("/_keel/ready").await.json()["bus"]["backend"], "nats");
    }
    // 3 nodes x 8 writers x 25 requests x 50 increments, all at once.
    let mut tasks = Vec::new();
    for k in &keels {
        for _ in 0..8 {
            let addr = k.addr;
            tasks.push(tokio::spawn(async move {
                for _ in 0..25 {
                    let path = "/state/bench/counter-inc?n=50&name=hits";
                    let r = request(addr, "POST", path, "".into()).await;
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            }));
        }
    }
    // Concurrent set adds and removes on every node: each node adds every
    // m, and removes a third of them; plus one member only ever added and
    // one added and removed by the same node before anyone else saw it.
    for (i, k) in keels.iter().enumerate() {
        ok_json(k, "POST", &format!("/state/set/s/keep-{i}")).await;
        ok_json(k, "POST", &format!("/state/set/s/gone-{i}")).await;
        ok_json(k, "DELETE", &format!("/state/set/s/gone-{i}")).await;
        for m in 0..20 {
            ok_json(k, "POST", &format!("/state/set/s/m{m}")).await;
            if m % 3 == i {
                ok_json(k, "DELETE", &format!("/state/set/s/m{m}")).await;
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let refs: Vec<&Keel> = keels.iter().collect();
    converge(&refs, "/state/counter/hits", Duration::from_secs(30), |v| {
        v == &json!(30000)
    })
    .await;
    let members = converge(&refs, "/state/set/s", Duration::from_secs(30), |_| true).await;
    // Whether a concurrently added and removed m survives depends on which
    // adds the remover had observed; that every node agrees is the point.
    let members: Vec<&str> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for i in 0..3 {
        assert!(
            members.contains(&format!("keep-{i}").as_str()),
            "{members:?}"
        );
        assert!(
            !members.contains(&format!("gone-{i}").as_str()),
            "{members:?}"
        );
    }
    assert!(
        members
            .iter()
            .all(|m| m.starts_with("keep-") || m.starts_with('m')),
        "{members:?}"
    );
    // The other component's state of the same name is untouched.
    assert_eq!(
        ok_json(&keels[0], "GET", "/other/counter/hits").await,
        json!(0)
    );
    assert!(
        keels[0]
            .get("/metrics")
            .await
            .body
            .contains("keel_sync_deltas_sent_total"),
        "sync metrics exported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edge_scope_stays_on_its_node_and_global_scope_replicates() {
    let nats = NatsServer::start();
    let (na, nb) = (
        state_node("fra", Some(&nats.url())),
        state_node("ams", Some(&nats.url())),
    );
    let (a, b) = (na.start(), nb.start());
    wait_bus(&a, "connected").await;
    wait_bus(&b, "connected").await;
    ok_json(&a, "POST", "/state/counter/c/inc?by=5&scope=edge").await;
    ok_json(&a, "POST", "/state/counter/c/inc?by=7&scope=global").await;
    ok_json(&a, "POST", "/state/counter/c/inc?by=9").await;
    converge(
        &[&a, &b],
        "/state/counter/c?scope=global",
        Duration::from_secs(20),
        |v| v == &json!(7),
    )
    .await;
    converge(
        &[&a, &b],
        "/state/counter/c",
        Duration::from_secs(20),
        |v| v == &json!(9),
    )
    .await;
    // Anti-entropy ran several rounds by now; the edge counter never left.
    assert_eq!(
        ok_json(&a, "GET", "/state/counter/c?scope=edge").await,
        json!(5)
    );
    assert_eq!(
        ok_json(&b, "GET", "/state/counter/c?scope=edge").await,
        json!(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_node_keeps_serving_and_converges_after_the_heal() {
    let nats = NatsServer::start();
    let proxy = FaultProxy::start(nats.addr());
    let n1 = state_node("fra", Some(&nats.url()));
    let n2 = state_node("ams", Some(&nats.url()));
    let n3 = state_node("par", Some(&proxy.url()));
    let (k1, k2, k3) = (n1.start(), n2.start(), n3.start());
    for k in [&k1, &k2, &k3] {
        wait_bus(k, "connected").await;
    }
    ok_json(&k1, "POST", "/state/set/s/before").await;
    converge(
        &[&k1, &k2, &k3],
        "/state/set/s",
        Duration::from_secs(20),
        |v| v == &json!(["before"]),
    )
    .await;

    proxy.cut();
    wait_bus(&k3, "disconnected").await;
    let metrics = k3.get("/metrics").await.body;
    assert!(metrics.contains("\nkeel_bus_connected 0\n"), "{metrics}");
    assert!(
        metrics.contains("\nkeel_bus_disconnects_total 1\n"),
        "{metrics}"
    );
    // Disconnected is not unready: the node keeps serving.
    assert_eq!(k3.get("/_keel/ready").await.status, 200);
    // Both sides keep writing.
    ok_json(&k1, "POST", "/state/counter/c/inc?by=5").await;
    ok_json(&k2, "POST", "/state/set/s/majority").await;
    ok_json(&k1, "DELETE", "/state/set/s/before").await;
    ok_json(&k3, "POST", "/state/counter/c/inc?by=7").await;
    ok_json(&k3, "POST", "/state/set/s/minority").await;
    ok_json(&k3, "POST", "/state/set/s/before").await; // concurrent with the remove: wins
    let r = k3.put("/state/map/m/k3", "from-par").await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(ok_json(&k3, "GET", "/state/counter/c").await, json!(7));
    assert_eq!(ok_json(&k1, "GET", "/state/counter/c").await, json!(5));

    proxy.heal();
    let healed = Instant::now();
    let all = [&k1, &k2, &k3];
    converge(&all, "/state/counter/c", Duration::from_secs(20), |v| {
        v == &json!(12)
    })
    .await;
    converge(&all, "/state/set/s", Duration::from_secs(20), |v| {
        v == &json!(["before", "majority", "minority"])
    })
    .await;
    converge(&all, "/state/map/m", Duration::from_secs(20), |v| {
        v == &json!({"k3": "from-par"})
    })
    .await;
    eprintln!("converged {:?} after the heal", healed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_with_sigkill_keeps_its_state_and_resyncs() {
    let nats = NatsServer::start();
    let (n1, n2) = (
        state_node("fra", Some(&nats.url())),
        state_node("ams", Some(&nats.url())),
    );
    let k1 = n1.start();
    let k2 = n2.start();
    wait_bus(&k1, "connected").await;
    for _ in 0..10 {
        ok_json(&k1, "POST", "/state/counter/c/inc?by=10").await;
    }
    ok_json(&k1, "POST", "/state/set/s/from-fra").await;
    let r = k1.put("/state/register/r", "fra-wrote-this").await;
    assert_eq!(r.status, 204);
    k1.sigkill();
    // While it is down, the other node writes.
    ok_json(&k2, "POST", "/state/counter/c/inc?by=50").await;
    ok_json(&k2, "POST", "/state/set/s/from-ams").await;

    let k1 = n1.start();
    // Acknowledged before the kill: there at once, from disk.
    let v = ok_json(&k1, "GET", "/state/counter/c")
        .await
        .as_i64()
        .unwrap();
    assert!(v >= 100, "lost acknowledged increments: {v}");
    assert_eq!(k1.get("/state/register/r").await.body, "fra-wrote-this");
    // And it catches up with what happened while it was down.
    converge(
        &[&k1, &k2],
        "/state/counter/c",
        Duration::from_secs(20),
        |v| v == &json!(150),
    )
    .await;
    converge(&[&k1, &k2], "/state/set/s", Duration::from_secs(20), |v| {
        v == &json!(["from-ams", "from-fra"])
    })
    .await;
    let end = Instant::now() + Duration::from_secs(20);
    while k2.get("/state/register/r").await.body != "fra-wrote-this" {
        assert!(Instant::now() < end, "the register never reached ams");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_state_function_on_the_embedded_node_and_bad_input_is_refused() {
    let n = state_node("local", None);
    let k = n.start();
    assert_eq!(
        k.get("/_keel/ready").await.json()["bus"],
        json!({"backend": "local", "state": "connected", "region": "eu-central", "edge": "local"})
    );
    assert_eq!(
        ok_json(&k, "POST", "/state/counter/c/inc?by=3").await,
        json!(3)
    );
    assert_eq!(
        ok_json(&k, "POST", "/state/counter/c/dec?by=5").await,
        json!(-2)
    );
    assert_eq!(ok_json(&k, "GET", "/state/counter/c").await, json!(-2));
    assert_eq!(ok_json(&k, "GET", "/state/counter/never").await, json!(0));
    assert_eq!(ok_json(&k, "POST", "/state/set/s/a").await, json!(true));
    assert_eq!(ok_json(&k, "POST", "/state/set/s/a").await, json!(false));
    assert_eq!(ok_json(&k, "POST", "/state/set/s/b").await, json!(true));
    assert_eq!(ok_json(&k, "GET", "/state/set/s/a").await, json!(true));
    assert_eq!(ok_json(&k, "DELETE", "/state/set/s/a").await, json!(true));
    assert_eq!(ok_json(&k, "DELETE", "/state/set/s/a").await, json!(false));
    assert_eq!(ok_json(&k, "GET", "/state/set/s").await, json!(["b"]));
    assert_eq!(k.get("/state/register/r").await.status, 404);
    assert_eq!(k.put("/state/register/r", "one").await.status, 204);
    assert_eq!(k.put("/state/register/r", "two").await.status, 204);
    assert_eq!(k.get("/state/register/r").await.body, "two");
    assert_eq!(k.put("/state/map/m/x", "1").await.status, 204);
    assert_eq!(k.put("/state/map/m/y", "2").await.status, 204);
    assert_eq!(k.put("/state/map/m/x", "3").await.status, 204);
    assert_eq!(k.get("/state/map/m/x").await.body, "3");
    assert_eq!(
        ok_json(&k, "GET", "/state/map/m").await,
        json!({"x": "3", "y": "2"})
    );
    assert_eq!(ok_json(&k, "DELETE", "/state/map/m/x").await, json!(true));
    assert_eq!(ok_json(&k, "DELETE", "/state/map/m/x").await, json!(false));
    assert_eq!(ok_json(&k, "GET", "/state/map-keys/m").await, json!(["y"]));
    assert_eq!(k.get("/state/map/m/x").await.status, 404);
    // Kinds are separate objects: a set named "c" is not the counter "c".
    assert_eq!(ok_json(&k, "GET", "/state/set/c").await, json!([]));
    // Components are isolated.
    assert_eq!(ok_json(&k, "GET", "/other/counter/c").await, json!(0));
    assert_eq!(ok_json(&k, "GET", "/other/set/s").await, json!([]));

    // Bad input: typed errors, nothing changes.
    let big = "x".repeat(5 * 1024);
    let r = k.put("/state/register/r", big.clone()).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (413, json!("limit")),
        "{}",
        r.body
    );
    assert_eq!(k.get("/state/register/r").await.body, "two");
    let r = k
        .send(
            "POST",
            &format!("/state/set/s/{}", "m".repeat(2048)),
            &[],
            "",
        )
        .await;
    assert_eq!(r.json()["error"], "limit", "{}", r.body);
    let r = k.send("POST", "/state/counter//inc", &[], "").await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("invalid")),
        "{}",
        r.body
    );
    // A CRDT may not outgrow max-state-bytes (64 KiB here).
    let value = "v".repeat(3000);
    let mut refused = None;
    for i in 0..40 {
        let r = k.put(&format!("/state/map/big/k{i}"), value.clone()).await;
        if r.status != 204 {
            refused = Some((i, r));
            break;
        }
    }
    let (i, r) = refused.expect("the map should hit max-state-bytes");
    assert_eq!(r.json()["error"], "limit", "{}", r.body);
    assert_eq!(
        ok_json(&k, "GET", "/state/map-keys/big")
            .await
            .as_array()
            .unwrap()
            .len(),
        i
    );

    // Everything persists across a restart.
    k.stop();
    let k = n.start();
    assert_eq!(ok_json(&k, "GET", "/state/counter/c").await, json!(-2));
    assert_eq!(ok_json(&k, "GET", "/state/set/s").await, json!(["b"]));
    assert_eq!(k.get("/state/register/r").await.body, "two");
    assert_eq!(ok_json(&k, "GET", "/state/map/m").await, json!({"y": "2"}));
}
