use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_readiness_components_and_metrics() {
    let node = Node::new(&component("hello", "hello", "/app/...", ""));
    let keel = node.start();
    assert_eq!(keel.get("/app/x").await.status, 200);

    let h = keel.get("/_keel/health").await;
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    let r = keel.get("/_keel/ready").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["ready"],
        true
    );

    let c = keel.get("/_keel/components").await;
    assert_eq!(c.headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_str(&c.body).unwrap();
    let hello = &v["components"][0];
    assert_eq!(hello["name"], "hello");
    assert_eq!(hello["route"], "/app/...");
    assert_eq!(hello["requests"], 1);
    assert_eq!(hello["limits"]["memory_bytes"], 64 * 1024 * 1024);
    assert_eq!(hello["limits"]["timeout_ms"], 5000);
    assert_eq!(hello["sha256"].as_str().unwrap().len(), 64);
    assert!(hello["exports"].as_array().unwrap().iter().any(|e| {
        e.as_str()
            .unwrap()
            .starts_with("wasi:http/incoming-handler@0.2")
    }));

    let m = keel.get("/metrics").await;
    assert!(
        m.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    for needle in [
        "keel_http_requests_total{component=\"hello\",status=\"2xx\"} 1",
        "keel_http_request_duration_seconds_count{component=\"hello\"} 1",
        "keel_instantiation_duration_seconds_count{component=\"hello\"} 1",
        "keel_traps_total{component=\"hello\"} 0",
    ] {
        assert!(
            m.body.contains(needle),
            "{needle} missing from:\n{}",
            m.body
        );
    }
    assert_eq!(keel.get("/_keel/nope").await.status, 404);
    assert_eq!(keel.get("/nothing-here").await.status, 404);
}
