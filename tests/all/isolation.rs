use crate::support::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_component_fails_alone_under_concurrent_load() {
    let node = Node::new(&format!(
        "{}{}",
        component("hello", "hello", "/hello", ""),
        component("panic", "panic", "/panic", "")
    ));
    let keel = node.start();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let addr = keel.addr;
        let path = if i % 3 == 0 { "/panic" } else { "/hello" };
        tasks.push(tokio::spawn(async move {
            (path, request(addr, "GET", path, bytes::Bytes::new()).await)
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        let (path, r) = t.await.unwrap();
        if path == "/hello" {
            assert_eq!((r.status, r.body.as_str()), (200, "hello from keel\n"));
        } else {
            assert_eq!(r.status, 500, "{}", r.body);
            let id = r.headers["x-request-id"].to_str().unwrap().to_string();
            assert_eq!(
                r.body,
                format!("internal error in component panic (request id {id})\n")
            );
            ids.push(id);
        }
    }
    assert_eq!(ids.len(), 100);
    // Logged with the component name and the same request id.
    let log = keel.log();
    let line = log
        .lines()
        .find(|l| l.contains(&ids[0]))
        .unwrap_or_else(|| panic!("request id {} not in log:\n{log}", ids[0]));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["component"], "panic", "{line}");
    assert!(v["reason"].as_str().unwrap().contains("panic"), "{line}");
    let metrics = keel.get("/metrics").await.body;
    assert!(
        metrics.contains("keel_traps_total{component=\"panic\"} 100"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keel_http_requests_total{component=\"hello\",status=\"2xx\"} 200"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_is_interrupted_at_the_deadline() {
    let deadline = Duration::from_millis(500);
    let node = Node::new(&format!(
        "{}{}",
        component("hello", "hello", "/hello", ""),
        component(
            "spin",
            "spin",
            "/spin",
            "[components.spin.limits]\ntimeout = \"500ms\""
        )
    ));
    let keel = node.start();
    // Warm up so the measured request is not a first-request outlier.
    assert_eq!(keel.get("/hello").await.status, 200);
    let addr = keel.addr;
    let spin = tokio::spawn(async move {
        let t = Instant::now();
        let r = request(addr, "GET", "/spin", bytes::Bytes::new()).await;
        (r, t.elapsed())
    });
    // While one worker's guest spins, other requests are still answered.
    keel.wait_component("spin", "one spinning instance", |c| c["in_flight"] == 1)
        .await;
    for _ in 0..20 {
        assert_eq!(keel.get("/hello").await.status, 200);
    }
    let (r, elapsed) = spin.await.unwrap();
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(
        elapsed >= deadline,
        "answered before the deadline: {elapsed:?}"
    );
    // Behaviour, not timing: a spin that was not interrupted would run
    // forever (no host call to time out), so any answer well within a few
    // seconds proves the epoch deadline fired; the log names it below.
    // (A tight bound failed on a loaded 2-core machine: 871 ms.)
    assert!(
        elapsed <= deadline + Duration::from_secs(10),
        "interrupted too late: {elapsed:?}"
    );
    assert!(
        keel.log().contains("deadline of 500ms exceeded"),
        "{}",
        keel.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_is_refused_without_affecting_others() {
    let node = Node::new(&format!(
        "{}{}",
        component("hello", "hello", "/hello", ""),
        component(
            "bomb",
            "membomb",
            "/bomb",
            "[components.bomb.limits]\nmemory = \"16MiB\""
        )
    ));
    let keel = node.start();
    let bombs: Vec<_> = (0..4).map(|_| keel.spawn_get("/bomb")).collect();
    for _ in 0..50 {
        assert_eq!(keel.get("/hello").await.status, 200);
    }
    for b in bombs {
        assert_eq!(b.await.unwrap().status, 500);
    }
    assert!(
        keel.log().contains("memory limit reached"),
        "{}",
        keel.log()
    );
    assert_eq!(keel.get("/hello").await.body, "hello from keel\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_limit_answers_503_and_recovers() {
    let node = Node::new(&component(
        "slow",
        "slow",
        "/...",
        "[components.slow.limits]\nmax-instances = 1",
    ));
    let keel = node.start();
    let first = keel.spawn_get("/slow?ms=1000");
    keel.wait_component("slow", "one instance busy", |c| c["in_flight"] == 1)
        .await;
    let busy = keel.get("/slow?ms=1").await;
    assert_eq!(busy.status, 503, "{}", busy.body);
    assert_eq!(busy.headers["retry-after"], "1");
    assert_eq!(first.await.unwrap().status, 200);
    // The slot is released once the first request's instance is gone.
    keel.wait_component("slow", "instance released", |c| c["in_flight"] == 0)
        .await;
    assert_eq!(keel.get("/slow?ms=1").await.status, 200);
}
