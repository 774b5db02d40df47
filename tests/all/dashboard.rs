//! The operator dashboard: `/_keel/ui` (one self-contained page) over
//! `/_keel/cluster` (this node's snapshot and every node's latest, shared on
//! `keel.global.nodes.stats`).

use crate::regions::{RegionSpec, runtime, world};
use crate::support::*;
use serde_json::Value;

/// The entry of `edge` in a `/_keel/cluster` document.
fn node<'a>(v: &'a Value, edge: &str) -> &'a Value {
    v["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["edge"] == edge))
        .unwrap_or(&Value::Null)
}

/// `component`'s request total in `edge`'s snapshot (`None`: not listed).
fn requests(v: &Value, edge: &str, component: &str) -> Option<u64> {
    node(v, edge)["snapshot"]["components"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == component)?["requests"]
        .as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_page_polls_the_cluster_view_of_the_embedded_node() {
    let node_cfg = Node::new(&component("hello", "hello", "/app/...", ""));
    let keel = node_cfg.start();

    let ui = keel.get("/_keel/ui").await;
    assert_eq!(ui.status, 200);
    assert!(
        ui.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(ui.body.starts_with("<!doctype html>"));
    assert!(ui.body.contains("/_keel/cluster"), "{}", ui.body);
    assert!(ui.body.contains("data-testid"));
    // Self-contained: nothing loaded from elsewhere.
    assert!(!ui.body.contains("<script src"));
    assert!(!ui.body.contains("<link"));

    let c = keel.get("/_keel/cluster").await;
    assert_eq!(c.status, 200);
    assert_eq!(c.headers["content-type"], "application/json");
    let v = c.json();
    let me = &v["self"];
    let (region, edge) = (me["region"].as_str().unwrap(), me["edge"].as_str().unwrap());
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{v}");
    assert_eq!(nodes[0]["region"], region);
    assert_eq!(nodes[0]["edge"], edge);
    assert_eq!(nodes[0]["self"], true);
    assert_eq!(nodes[0]["expected"], true);
    assert_eq!(nodes[0]["status"], "up");
    assert_eq!(me["bus"]["backend"], "local");
    assert_eq!(me["bus"]["region"], "connected");
    assert_eq!(me["bus"]["global"], Value::Null);
    assert_eq!(v["stale_after_ms"], 5000);
    for key in [
        "outbox_depth",
        "live_connections",
        "uptime_seconds",
        "at_ms",
    ] {
        assert!(me[key].is_number(), "{key} missing: {me}");
    }
    for level in ["l1", "l2", "l3"] {
        assert!(me["cache"][level]["hits"].is_u64(), "{me}");
    }
    assert!(me["sync"]["deltas_sent"].is_u64(), "{me}");
    let before = requests(&v, edge, "hello").expect("hello listed");

    for _ in 0..5 {
        assert_eq!(keel.get("/app/x").await.status, 200);
    }
    let v = keel
        .poll(
            "GET",
            "/_keel/cluster",
            "",
            "hello's requests to rise",
            |s, v| s == 200 && requests(v, edge, "hello").is_some_and(|n| n >= before + 5),
        )
        .await;
    let hello = node(&v, edge)["snapshot"]["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "hello")
        .unwrap()
        .clone();
    assert!(hello["latency_count"].as_u64().unwrap() >= 5, "{hello}");
    assert!(hello["p50_ms"].as_f64().unwrap() > 0.0, "{hello}");
    assert!(hello["p99_ms"].as_f64().unwrap() >= hello["p50_ms"].as_f64().unwrap());
    assert_eq!(hello["traps"], 0);
}

/// Every node of a two-region deployment sees every edge of regions.toml
/// (snapshots cross the gateway in the GLOBAL account, between residency
/// zones); a node that stops is shown stale by the others.
#[test]
fn every_node_sees_every_edge_and_a_stopped_one_goes_stale() {
    let _heavy = heavy_test();
    let world = world(&[
        RegionSpec {
            name: "us-east",
            residency: "us",
            edges: &["nyc", "bos"],
            servers: 1,
        },
        RegionSpec {
            name: "eu-central",
            residency: "gdpr",
            edges: &["fra"],
            servers: 1,
        },
    ]);
    let rt = runtime();
    let hello = component("hello", "hello", "/app/...", "");
    let nodes: Vec<(&str, Node)> = ["nyc", "bos", "fra"]
        .into_iter()
        .map(|e| (e, world.node(e, None, &hello)))
        .collect();
    let mut keels: Vec<(&str, Keel)> = nodes.iter().map(|(e, n)| (*e, n.start())).collect();
    let expected = [
        ("us-east", "nyc"),
        ("us-east", "bos"),
        ("eu-central", "fra"),
    ];
    rt.block_on(async {
        for (edge, k) in &keels {
            let v = k
                .poll("GET", "/_keel/cluster", "", "every edge up", |s, v| {
                    s == 200 && expected.iter().all(|(_, e)| node(v, e)["status"] == "up")
                })
                .await;
            let listed: Vec<(&str, &str)> = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| (n["region"].as_str().unwrap(), n["edge"].as_str().unwrap()))
                .collect();
            assert_eq!(listed, expected, "{v}");
            assert_eq!(node(&v, edge)["self"], true);
            assert_eq!(v["self"]["bus"]["backend"], "nats");
            // Peers' snapshots carry their components.
            for (_, e) in expected {
                assert!(requests(&v, e, "hello").is_some(), "{e} in {v}");
            }
        }

        // Load on fra shows at nyc (across the gateway).
        let fra = &keels[2].1;
        for _ in 0..3 {
            assert_eq!(fra.get("/app/x").await.status, 200);
        }
        keels[0]
            .1
            .poll(
                "GET",
                "/_keel/cluster",
                "",
                "fra's requests at nyc",
                |_, v| requests(v, "fra", "hello").is_some_and(|n| n >= 3),
            )
            .await;
    });

    let (_, bos) = keels.remove(1);
    bos.stop();
    rt.block_on(async {
        for (_, k) in &keels {
            let v = k
                .poll("GET", "/_keel/cluster", "", "bos stale", |_, v| {
                    node(v, "bos")["status"] == "stale"
                })
                .await;
            // Stale means older than 5 s; `age_ms` is truncated to the ms.
            assert!(node(&v, "bos")["age_ms"].as_u64().unwrap() >= 5000, "{v}");
            assert_eq!(node(&v, "nyc")["status"], "up");
            assert_eq!(node(&v, "fra")["status"], "up");
        }
    });
}
