//! Live delivery (`live.publish` + `GET /_keel/live/<component>`, server-
//! sent events) and the component environment, through `live-probe` on a
//! real `keel`: who may open which stream, what arrives and in which order,
//! components kept apart, the stream ending at token expiry and on drain.

use crate::edge_tier::{SECRET, edge_node, good_claims, token};
use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde_json::json;
use std::time::{Duration, Instant};

const LIVE: &str = "grants = [\"live\"]";

fn components() -> String {
    [
        component(
            "lp",
            "live-probe",
            "/lp/...",
            &format!(
                "{LIVE}\n[components.lp.env]\nTITLE = \"Keel live\"\nSECRET = {{ from-env = \"LIVE_TEST_SECRET\" }}\n\
                 [components.lp.live]\nchannels = [\"user/{{user}}\", \"room/*\"]"
            ),
        ),
        component(
            "other",
            "live-probe",
            "/other/...",
            &format!("{LIVE}\n[components.other.live]\nchannels = [\"room/*\"]"),
        ),
        component("quiet", "live-probe", "/quiet/...", LIVE),
    ]
    .join("\n")
}

fn token_for(user: &str) -> String {
    token(Some("k1"), SECRET, &good_claims(user))
}

/// An open SSE response: its events, parsed as they arrive.
struct Sse {
    body: hyper::body::Incoming,
    buf: String,
}

impl Sse {
    async fn open(keel: &Keel, path: &str, headers: &[(&str, &str)]) -> Result<Sse, Reply> {
        let stream = tokio::net::TcpStream::connect(keel.addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .uri(path)
            .header("host", keel.addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = send
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        if resp.status() != 200 {
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let raw = resp.into_body().collect().await.unwrap().to_bytes();
            return Err(Reply {
                status,
                headers,
                body: String::from_utf8_lossy(&raw).into_owned(),
                raw,
            });
        }
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Ok(Sse {
            body: resp.into_body(),
            buf: String::new(),
        })
    }

    /// The next event as (name, data); `None` when the stream ended.
    /// Keepalive comments are skipped. Panics after `within`.
    async fn next(&mut self, within: Duration) -> Option<(String, String)> {
        let end = Instant::now() + within;
        loop {
            while let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let mut name = String::new();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v);
                    }
                }
                if !name.is_empty() {
                    return Some((name, data.join("\n")));
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.body.frame()).await {
                Err(_) => panic!("no live event within {within:?}; have {:?}", self.buf),
                Ok(None) => return None,
                Ok(Some(Err(e))) => panic!("live stream broke: {e}"),
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.push_str(&String::from_utf8_lossy(&d));
                    }
                }
            }
        }
    }
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn live_streams_deliver_what_the_component_publishes_to_allowed_users_only() {
    let node = edge_node(&components());
    let keel = node.start_with_env(&[("LIVE_TEST_SECRET", "s3cret")]);
    let alice = token_for("alice");
    let path = |q: &str| format!("/_keel/live/lp?{q}");

    // Refusals: each a clear 4xx, nothing opened.
    for (p, headers, status, needle) in [
        (
            path("channel=room/x"),
            vec![],
            401,
            "bearer token is required",
        ),
        (
            path("channel=room/x&token=garbage"),
            vec![],
            401,
            "token rejected",
        ),
        (
            path(&format!("channel=user/bob&token={alice}")),
            vec![],
            403,
            "not open to user \"alice\"",
        ),
        (
            path(&format!("channel=room%20x&token={alice}")),
            vec![],
            400,
            "channel \"room x\"",
        ),
        (
            path(&format!("channel=room/x&token={alice}&since=1")),
            vec![],
            400,
            "unknown query parameter \"since\"",
        ),
        (path(&format!("token={alice}")), vec![], 400, "0 channels"),
        (
            format!("/_keel/live/nope?channel=room/x&token={alice}"),
            vec![],
            404,
            "no component named \"nope\"",
        ),
        (
            format!("/_keel/live/quiet?channel=room/x&token={alice}"),
            vec![],
            404,
            "has no live channels",
        ),
    ] {
        let r = Sse::open(&keel, &p, &headers)
            .await
            .err()
            .unwrap_or_else(|| panic!("{p} opened"));
        assert_eq!(r.status, status, "{p}: {}", r.body);
        assert!(r.body.contains(needle), "{p}: {}", r.body);
    }
    let r = keel
        .post(&path(&format!("channel=room/x&token={alice}")), "")
        .await;
    assert_eq!(r.status, 405, "{}", r.body);

    // alice listens on her own channel and a room (token in the header).
    let bearer = format!("Bearer {alice}");
    let mut a = Sse::open(
        &keel,
        &path("channel=user/alice&channel=room/lobby"),
        &[("authorization", &bearer)],
    )
    .await
    .unwrap_or_else(|r| panic!("{} {}", r.status, r.body));
    let (name, data) = a.next(WAIT).await.unwrap();
    assert_eq!(name, "ready");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&data).unwrap(),
        json!({"user": "alice", "channels": ["user/alice", "room/lobby"]})
    );
    let mut b = Sse::open(
        &keel,
        &path(&format!("channel=room/lobby&token={}", token_for("bob"))),
        &[],
    )
    .await
    .unwrap_or_else(|r| panic!("{} {}", r.status, r.body));
    assert_eq!(b.next(WAIT).await.unwrap().0, "ready");

    let publish = |component: &'static str,
                   channel: &'static str,
                   event: &'static str,
                   data: &'static str| {
        let keel = &keel;
        async move {
            keel.post(
                &format!("/{component}/publish/{channel}?event={event}"),
                data,
            )
            .await
        }
    };
    // Another component's channel of the same name reaches nobody here.
    let r = publish("other", "room%2Flobby", "message", "from other").await;
    assert_eq!(
        (r.status, r.json()["queued"].as_u64()),
        (200, Some(0)),
        "{}",
        r.body
    );
    let r = publish("lp", "room%2Flobby", "message", "hello\nworld").await;
    assert_eq!(r.json()["queued"], 2, "{}", r.body);
    let r = publish("lp", "user%2Falice", "dm", "psst").await;
    assert_eq!(r.json()["queued"], 1, "{}", r.body);
    let r = publish("lp", "user%2Fcarol", "dm", "nobody").await;
    assert_eq!(r.json()["queued"], 0, "{}", r.body);
    assert_eq!(
        a.next(WAIT).await.unwrap(),
        ("message".into(), "hello\nworld".into()),
        "multi-line data arrives whole, and nothing of `other`"
    );
    assert_eq!(a.next(WAIT).await.unwrap(), ("dm".into(), "psst".into()));
    assert_eq!(
        b.next(WAIT).await.unwrap(),
        ("message".into(), "hello\nworld".into())
    );

    // Guest misuse is a typed error, not a trap.
    let r = publish("lp", "room%2Flobby", "bad%20name", "x").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "invalid", "{}", r.body);

    // The environment is exactly what keel.toml declares.
    let r = keel.get("/lp/env").await;
    assert_eq!(r.json(), json!({"SECRET": "s3cret", "TITLE": "Keel live"}));

    let metrics = keel.get("/metrics").await.body;
    assert!(metrics.contains("live_connections 2"), "{metrics}");

    // Draining ends the streams, so the node stops promptly.
    keel.sigterm();
    assert_eq!(a.next(WAIT).await, None);
    assert_eq!(b.next(WAIT).await, None);
    let mut keel = keel;
    let status = wait_with_deadline(&mut keel.child, Duration::from_secs(30))
        .expect("keel should exit after SIGTERM with live streams open");
    assert!(status.success(), "{}", keel.log());
}

#[tokio::test]
async fn a_live_stream_ends_when_its_token_expires() {
    let node = edge_node(&components());
    let keel = node.start_with_env(&[("LIVE_TEST_SECRET", "x")]);
    let mut claims = good_claims("alice");
    claims["exp"] = json!(claims["iat"].as_i64().unwrap() + 2);
    let t = token(Some("k1"), SECRET, &claims);
    let mut s = Sse::open(
        &keel,
        &format!("/_keel/live/lp?channel=user/alice&token={t}"),
        &[],
    )
    .await
    .unwrap_or_else(|r| panic!("{} {}", r.status, r.body));
    assert_eq!(s.next(WAIT).await.unwrap().0, "ready");
    assert_eq!(
        s.next(WAIT).await,
        None,
        "the stream ends at the token's exp"
    );
    keel.stop();
}

#[tokio::test]
async fn a_missing_host_variable_fails_the_load_naming_the_line() {
    let node = edge_node(&components());
    let (code, out) = node.up_fails();
    assert_ne!(code, 0);
    assert!(
        out.contains("components.lp.env.SECRET") && out.contains("LIVE_TEST_SECRET"),
        "{out}"
    );
}
