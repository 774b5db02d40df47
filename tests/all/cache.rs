//! The hierarchical `cache` through the `cache-probe` guest: on the
//! embedded node (L2 and L3 on the in-process bus), and across two regions
//! of real NATS clusters joined by a gateway, with a partitioned edge.

use crate::regions::{RegionSpec, world};
use crate::support::*;
use keel_test_support::FaultProxy;

const GRANTS: &str = r#"grants = ["cache"]"#;

fn probe_node(extra: &str) -> Node {
    Node::new(&format!(
        "{}\n{}\n{extra}",
        component("c", "cache-probe", "/c/...", GRANTS),
        component("other", "cache-probe", "/other/...", GRANTS),
    ))
}

/// `GET /c/entry/<key>`: `Some(body)` on 200, `None` on a 404 miss.
async fn read(keel: &Keel, path: &str) -> Option<String> {
    let r = keel.get(path).await;
    match r.status {
        200 => Some(r.body),
        404 => {
            assert_eq!(r.body, "miss", "{path}");
            None
        }
        s => panic!("{path}: {s} {}", r.body),
    }
}

async fn put(keel: &Keel, path: &str, body: &str) {
    let r = keel.put(path, body.to_string()).await;
    assert_eq!(r.status, 204, "PUT {path}: {}", r.body);
}

async fn delete(keel: &Keel, path: &str) {
    let r = keel.delete(path).await;
    assert_eq!(r.status, 204, "DELETE {path}: {}", r.body);
}

/// Polls until `path` misses.
async fn wait_miss(keel: &Keel, path: &str, what: &str) {
    keel.poll("GET", path, "", what, |s, _| s == 404).await;
}

/// The value of one sample line of `/metrics`, e.g.
/// `keel_cache_hits_total{level="l1"}`.
async fn metric(keel: &Keel, sample: &str) -> u64 {
    let text = keel.get("/metrics").await.body;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{sample} not in /metrics:\n{text}"))
}

#[tokio::test]
async fn every_cache_function_on_one_node() {
    let node = probe_node("");
    let keel = node.start();
    for scope in ["edge", "region", "global"] {
        put(&keel, &format!("/c/entry/k-{scope}?scope={scope}"), scope).await;
        assert_eq!(
            read(&keel, &format!("/c/entry/k-{scope}")).await.as_deref(),
            Some(scope)
        );
        // Another component never sees it, at any level.
        assert_eq!(read(&keel, &format!("/other/entry/k-{scope}")).await, None);
    }
    assert_eq!(read(&keel, "/c/entry/never-set").await, None);
    assert!(metric(&keel, "keel_cache_hits_total{level=\"l1\"}").await >= 3);
    assert!(metric(&keel, "keel_cache_misses_total{level=\"l3\"}").await >= 1);

    // Keys are any UTF-8; prefixes drop exactly what they cover.
    for k in ["user%3A1", "user%3A2", "user2", "us"] {
        put(&keel, &format!("/c/entry/{k}?scope=global"), k).await;
    }
    delete(&keel, "/c/prefix/user%3A?scope=global").await;
    assert_eq!(read(&keel, "/c/entry/user%3A1").await, None);
    assert_eq!(read(&keel, "/c/entry/user%3A2").await, None);
    assert_eq!(
        read(&keel, "/c/entry/user2").await.as_deref(),
        Some("user2")
    );
    delete(&keel, "/c/entry/user2?scope=region").await;
    assert_eq!(
        read(&keel, "/c/entry/user2").await.as_deref(),
        Some("user2"),
        "still in L3"
    );
    delete(&keel, "/c/entry/user2?scope=global").await;
    assert_eq!(read(&keel, "/c/entry/user2").await, None);
    // Everything of one component, and nothing of the other.
    put(&keel, "/other/entry/us?scope=global", "theirs").await;
    delete(&keel, "/c/prefix/?scope=global").await;
    assert_eq!(read(&keel, "/c/entry/us").await, None);
    assert_eq!(
        read(&keel, "/other/entry/us").await.as_deref(),
        Some("theirs")
    );

    // Bad input: a typed error, nothing stored.
    let big = "x".repeat(512 * 1024 + 1);
    let r = keel.put("/c/entry/big?scope=global", big).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (413, "limit".into()),
        "{}",
        r.body
    );
    assert_eq!(read(&keel, "/c/entry/big").await, None);
    let long = "k".repeat(513);
    let r = keel.put(&format!("/c/entry/{long}"), "v").await;
    assert_eq!(r.status, 413, "{}", r.body);
    for ttl in ["0", "86401"] {
        let r = keel.put(&format!("/c/entry/t?ttl={ttl}"), "v").await;
        assert_eq!(
            (r.status, r.json()["error"].clone()),
            (400, "invalid".into()),
            "{}",
            r.body
        );
    }
    assert_eq!(read(&keel, "/c/entry/t").await, None);
    let r = keel.get("/c/entry/").await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, "invalid".into()),
        "{}",
        r.body
    );

    // A TTL ends the entry in every level.
    put(&keel, "/c/entry/short?scope=global&ttl=1", "s").await;
    assert_eq!(read(&keel, "/c/entry/short").await.as_deref(), Some("s"));
    wait_miss(&keel, "/c/entry/short", "the 1 s entry to expire").await;
}

#[tokio::test]
async fn the_loader_fills_misses_once() {
    let node = probe_node("");
    let keel = node.start();
    // Loaded, written through at the loader's scope, then served from L1.
    assert_eq!(
        read(&keel, "/c/entry/region%2Fa").await.as_deref(),
        Some("loaded region/a")
    );
    assert_eq!(
        read(&keel, "/c/entry/region%2Fa").await.as_deref(),
        Some("loaded region/a")
    );
    assert_eq!(metric(&keel, "keel_cache_loads_total").await, 1);
    // Nothing to load: a miss, asked again next time.
    assert_eq!(read(&keel, "/c/entry/absent").await, None);
    assert_eq!(read(&keel, "/c/entry/absent").await, None);
    assert_eq!(metric(&keel, "keel_cache_loads_total").await, 3);
    // A failing loader is the caller's `unavailable`.
    let r = keel.get("/c/entry/fail%2Fx").await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (503, "unavailable".into()),
        "{}",
        r.body
    );
    assert_eq!(metric(&keel, "keel_cache_load_errors_total").await, 1);
    // Inside the loader, `get` of the same key does not recurse.
    assert_eq!(
        read(&keel, "/c/entry/nested%2Fx").await.as_deref(),
        Some("nested none")
    );

    // 16 concurrent misses of one key: one load (it takes 300 ms), one value.
    let before = metric(&keel, "keel_cache_loads_total").await;
    let gets: Vec<_> = (0..16)
        .map(|_| keel.spawn_get("/c/entry/slow%2Fk"))
        .collect();
    for g in gets {
        let r = g.await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "loaded slow/k"));
    }
    assert_eq!(metric(&keel, "keel_cache_loads_total").await, before + 1);
}

#[test]
fn cache_levels_span_regions_and_invalidations_reach_their_scope() {
    let _heavy = heavy_test();
    // east: e1 e2 (e2 behind a fault proxy); west: w1 w2.
    let world = world(&[
        RegionSpec {
            name: "east",
            residency: "global",
            edges: &["e1", "e2"],
            servers: 1,
        },
        RegionSpec {
            name: "west",
            residency: "global",
            edges: &["w1", "w2"],
            servers: 1,
        },
    ]);
    let node = |edge, servers| {
        world.node(
            edge,
            servers,
            &component("c", "cache-probe", "/c/...", GRANTS),
        )
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let upstream = world.regions.region("east").unwrap().servers[0].clone();
    let proxy = FaultProxy::start(
        format!("127.0.0.1:{}", upstream.client_port)
            .parse()
            .unwrap(),
    );
    let nodes = [
        node("e1", None),
        node("e2", Some(proxy.url().as_str())),
        node("w1", None),
        node("w2", None),
    ];
    let keels: Vec<Keel> = nodes.iter().map(Node::start).collect();
    let [e1, e2, w1, w2] = [&keels[0], &keels[1], &keels[2], &keels[3]];
    rt.block_on(async {
        for k in &keels {
            k.wait_ready(|v| v["bus"]["state"] == "connected").await;
        }
        // Every node's L2 and L3 exist once a region-scope write succeeds
        // there (non-coordinators wait for their coordinator's bucket).
        for (i, k) in keels.iter().enumerate() {
            k.poll(
                "PUT",
                &format!("/c/entry/warm-{i}?scope=global"),
                "w",
                "buckets ready",
                |s, _| s == 204,
            )
            .await;
        }

        // A global entry set in east is read in west (from L3), and
        // west's second edge finds it too.
        put(e1, "/c/entry/g?scope=global", "from-east").await;
        assert_eq!(read(w1, "/c/entry/g").await.as_deref(), Some("from-east"));
        assert_eq!(read(w2, "/c/entry/g").await.as_deref(), Some("from-east"));
        // A region entry stays in its region.
        put(e1, "/c/entry/r?scope=region", "east-only").await;
        assert_eq!(read(e2, "/c/entry/r").await.as_deref(), Some("east-only"));
        assert_eq!(read(w1, "/c/entry/r").await, None);

        // TTL at every level: L1 of e1, L3, west's L2 (filled by w1 with the
        // remaining time) and w2 that reads it from there.
        put(e1, "/c/entry/t?scope=global&ttl=2", "brief").await;
        assert_eq!(read(w1, "/c/entry/t").await.as_deref(), Some("brief"));
        for k in [e1, w1, w2] {
            wait_miss(k, "/c/entry/t", "the 2 s entry to expire everywhere").await;
        }

        // Region-scope invalidation: every edge of east drops it, no edge
        // of west does.
        for (k, v) in [(e1, "e1"), (e2, "e2"), (w1, "w1"), (w2, "w2")] {
            put(k, "/c/entry/local?scope=edge", v).await;
        }
        delete(e1, "/c/entry/local?scope=region").await;
        assert_eq!(read(e1, "/c/entry/local").await, None);
        wait_miss(e2, "/c/entry/local", "east's region invalidation at e2").await;
        // A later global invalidation of another key reaching west orders
        // after it: had the region one leaked, it would be there by now.
        put(w1, "/c/entry/barrier?scope=edge", "b").await;
        put(w2, "/c/entry/barrier?scope=edge", "b").await;
        delete(e1, "/c/entry/barrier?scope=global").await;
        wait_miss(w1, "/c/entry/barrier", "global invalidation at w1").await;
        wait_miss(w2, "/c/entry/barrier", "global invalidation at w2").await;
        assert_eq!(read(w1, "/c/entry/local").await.as_deref(), Some("w1"));
        assert_eq!(read(w2, "/c/entry/local").await.as_deref(), Some("w2"));

        // Global invalidation drops every level in every region: w1 had it
        // in L1 and west's L2; w2 (never read it) must not find it either.
        put(e1, "/c/entry/gi?scope=global", "v").await;
        assert_eq!(read(w1, "/c/entry/gi").await.as_deref(), Some("v"));
        delete(e1, "/c/entry/gi?scope=global").await;
        wait_miss(w1, "/c/entry/gi", "global invalidation at w1").await;
        wait_miss(w2, "/c/entry/gi", "west's L2 to drop it").await;
        assert_eq!(read(e2, "/c/entry/gi").await, None);
    });

    // A partitioned edge never serves, after it reconnects, an entry
    // invalidated while it was away.
    rt.block_on(async {
        put(e1, "/c/entry/p?scope=region", "old").await;
        assert_eq!(read(e2, "/c/entry/p").await.as_deref(), Some("old"));
        assert_eq!(
            read(e2, "/c/entry/p").await.as_deref(),
            Some("old"),
            "an L1 hit"
        );
        proxy.cut();
        e2.wait_ready(|v| v["bus"]["state"] != "connected").await;
        delete(e1, "/c/entry/p?scope=region").await;
        // Cut off, the edge still serves edge scope; region scope is
        // refused rather than half-written.
        put(e2, "/c/entry/mine?scope=edge", "x").await;
        let r = e2.put("/c/entry/theirs?scope=region", "y").await;
        assert_eq!(
            (r.status, r.json()["error"].clone()),
            (503, "unavailable".into()),
            "{}",
            r.body
        );
        assert_eq!(read(e2, "/c/entry/theirs").await, None);
        proxy.heal();
        e2.wait_ready(|v| v["bus"]["state"] == "connected").await;
        assert_eq!(
            read(e2, "/c/entry/p").await,
            None,
            "stale entry served after the heal"
        );
        assert_eq!(read(e2, "/c/entry/mine").await.as_deref(), Some("x"));
    });
}
