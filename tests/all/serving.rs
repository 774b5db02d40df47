use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_is_served_over_http1_and_http2() {
    let node = Node::new(&component("hello", "hello", "/...", ""));
    let keel = node.start();
    let r = keel.get("/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "hello from keel\n");
    assert!(r.headers.contains_key("x-request-id"));

    let r = keel.post("/echo", vec![b'x'; 100_000]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "received 100000 bytes\n")
    );

    // h2c with prior knowledge on the same port.
    let stream = tokio::net::TcpStream::connect(keel.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = http::Request::builder()
            .uri(format!("http://{}/h2", keel.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"hello from keel\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_components_on_two_routes() {
    let node = Node::new(&format!(
        "{}{}",
        component("hello", "hello", "/hello/...", ""),
        component("compute", "compute", "/compute", "")
    ));
    let keel = node.start();
    let h = keel.get("/hello/world").await;
    assert_eq!((h.status, h.body.as_str()), (200, "hello from keel\n"));
    let c1 = keel.get("/compute").await;
    assert_eq!(c1.status, 200, "{}", c1.body);
    assert_eq!(c1.body.trim().len(), 64, "a sha256 hex digest: {}", c1.body);
    // Deterministic: same input, same digest, separate instances.
    assert_eq!(keel.get("/compute").await.body, c1.body);
    let other = keel.post("/compute", r#"{"a":[1,2,3]}"#).await;
    assert_eq!(other.status, 200);
    assert_ne!(other.body, c1.body);
    // Not routed: /compute is exact, /hellox is not under /hello/.
    assert_eq!(keel.get("/compute/x").await.status, 404);
    assert_eq!(keel.get("/hellox").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_heavy_component_runs_with_an_empty_capability_context() {
    let node = Node::new(&component("everything", "wasi-everything", "/...", ""));
    let keel = node.start();
    let r = keel.get("/?touch=all").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["env"], 0, "{v}");
    assert_eq!(v["args"], 0, "{v}");
    assert_eq!(v["preopens"], 0, "{v}");
    assert_ne!(v["tcp"], "ok", "sockets must be denied: {v}");
    // It really imports the whole WASI surface at more than one patch version.
    let comps = keel.get("/_keel/components").await;
    let v: serde_json::Value = serde_json::from_str(&comps.body).unwrap();
    let imports: Vec<String> = v["components"][0]["imports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect();
    for iface in [
        "wasi:cli/environment",
        "wasi:filesystem/preopens",
        "wasi:sockets/tcp",
    ] {
        assert!(
            imports.iter().any(|i| i.starts_with(iface)),
            "{iface} in {imports:?}"
        );
    }
    let versions: std::collections::BTreeSet<&str> = imports
        .iter()
        .filter_map(|i| i.split_once('@').map(|(_, v)| v))
        .collect();
    assert!(
        versions.len() >= 2,
        "mixed 0.2.x versions expected: {versions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_uses_the_compiled_artifact_cache() {
    let node = Node::new(&component("hello", "hello", "/...", ""));
    let first = node.start();
    first
        .wait_component("hello", "compiled fresh", |c| {
            c["compiled_from_cache"] == false
        })
        .await;
    drop(first);
    let second = node.start();
    second
        .wait_component("hello", "loaded from cache", |c| {
            c["compiled_from_cache"] == true
        })
        .await;
    assert_eq!(second.get("/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outgoing_http_is_refused_unless_the_origin_is_allowed() {
    // The denied component calls this node's own health endpoint.
    let denied = Node::new(&component("outbound", "outbound", "/...", ""));
    let keel = denied.start();
    let r = keel.get(&format!("/?to={}", keel.addr)).await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("HttpRequestDenied"), "{}", r.body);
    drop(keel);

    // Allowed origin: the same call goes through. The port is only known
    // after binding, so allow every origin of this loopback host instead of
    // guessing a port.
    let allowed = Node::new(&component(
        "outbound",
        "outbound",
        "/...",
        "allowed-outbound-hosts = [\"*\"]",
    ));
    let keel = allowed.start();
    let r = keel.get(&format!("/?to={}", keel.addr)).await;
    assert_eq!((r.status, r.body.as_str()), (200, "upstream 200\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_origin_allows_only_that_origin() {
    // Pick a port, then bind keel to it, so the config can name the origin.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let node = Node::raw(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n{}",
        component(
            "outbound",
            "outbound",
            "/...",
            &format!("allowed-outbound-hosts = [\"http://127.0.0.1:{port}\"]")
        )
    ));
    let keel = node.start();
    let ok = keel.get(&format!("/?to=127.0.0.1:{port}")).await;
    assert_eq!((ok.status, ok.body.as_str()), (200, "upstream 200\n"));
    let other = keel.get(&format!("/?to=localhost:{port}")).await;
    assert_eq!(other.status, 502, "{}", other.body);
    assert!(other.body.contains("HttpRequestDenied"), "{}", other.body);
}
