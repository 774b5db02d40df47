use crate::support::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn hello_node(server: &str) -> Node {
    Node::new(&format!(
        "{server}\n{}",
        component("hello", "hello", "/...", "")
    ))
}

/// Reads until EOF or `limit`; returns what arrived.
async fn read_all(s: &mut tokio::net::TcpStream, limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "connection still open after {limit:?}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_gets_431() {
    let node = Node::raw(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax-header-bytes = \"16KiB\"\n{}",
        component("hello", "hello", "/...", "")
    ));
    let keel = node.start();
    let mut s = tokio::net::TcpStream::connect(keel.addr).await.unwrap();
    let big = "a".repeat(64 * 1024);
    s.write_all(format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap_or(());
    let reply = read_all(&mut s, Duration::from_secs(10)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    // Normal requests still work.
    assert_eq!(keel.get("/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_gets_413() {
    let keel = hello_node("max-body-bytes = \"1KiB\"").start();
    // Declared length over the limit: refused before any guest runs.
    let r = keel.post("/", vec![b'x'; 2048]).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.body, "request body larger than 1024 bytes\n");
    // Chunked (no length): cut off while streaming, still 413.
    let mut s = tokio::net::TcpStream::connect(keel.addr).await.unwrap();
    let mut req =
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            .to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'y'; 0x200]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let reply = read_all(&mut s, Duration::from_secs(10)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // At the limit is fine.
    let r = keel.post("/", vec![b'x'; 1024]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "received 1024 bytes\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_by_the_header_timeout() {
    let keel = hello_node("header-read-timeout = \"1s\"").start();
    // A partial head, then silence.
    let mut partial = tokio::net::TcpStream::connect(keel.addr).await.unwrap();
    partial
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n")
        .await
        .unwrap();
    // Fewer bytes than it takes to tell HTTP/1 from HTTP/2.
    let mut tiny = tokio::net::TcpStream::connect(keel.addr).await.unwrap();
    tiny.write_all(b"GE").await.unwrap();
    let t = Instant::now();
    read_all(&mut partial, Duration::from_secs(10)).await;
    read_all(&mut tiny, Duration::from_secs(10)).await;
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "closed too early: {:?}",
        t.elapsed()
    );
    assert_eq!(keel.get("/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_request_and_refuses_new_ones() {
    let node = Node::new(&component("slow", "slow", "/...", ""));
    let mut keel = node.start();
    let addr = keel.addr;
    let slow = keel.spawn_get("/slow?ms=1500");
    keel.wait_component("slow", "request in flight", |c| c["in_flight"] == 1)
        .await;
    keel.sigterm();
    // New connections are refused once the listeners close.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            break;
        }
        assert!(Instant::now() < end, "still accepting after SIGTERM");
        tokio::task::yield_now().await;
    }
    let r = slow.await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "slept 1500 ms\n"));
    let status = wait_with_deadline(&mut keel.child, Duration::from_secs(30))
        .expect("keel exits after draining");
    assert!(status.success(), "{status:?}");
    assert!(keel.log().contains("SIGTERM: draining"), "{}", keel.log());
}
