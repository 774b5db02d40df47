//! Live delivery (`live.publish` + `GET /_keel/live/<component>`, server-
//! sent events) and the component environment, through `live-probe` on a
//! real `keel`: who may open which stream, what arrives and in which order,
//! components kept apart, the stream ending at token expiry and on drain.

use crate::edge_tier::{SECRET, edge_node, good_claims, token};
use crate::support::*;
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

/// Opens a live stream on `keel`: `Err((status, body))` when refused.
async fn open(keel: &Keel, path: &str, headers: &[(&str, &str)]) -> Result<Sse, (u16, String)> {
    let s = Sse::open(keel.addr, path, headers).await;
    if s.status != 200 {
        return Err((s.status, s.text().await));
    }
    assert_eq!(s.headers["content-type"], "text/event-stream");
    Ok(s)
}

/// The next event as (name, data); `None` when the stream ended. Panics
/// after [`WAIT`].
async fn next(s: &mut Sse) -> Option<(String, String)> {
    s.next(Instant::now() + WAIT)
        .await
        .unwrap_or_else(|buf| panic!("no live event within {WAIT:?}; have {buf:?}"))
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
        let (got, body) = open(&keel, &p, &headers)
            .await
            .err()
            .unwrap_or_else(|| panic!("{p} opened"));
        assert_eq!(got, status, "{p}: {body}");
        assert!(body.contains(needle), "{p}: {body}");
    }
    let r = keel
        .post(&path(&format!("channel=room/x&token={alice}")), "")
        .await;
    assert_eq!(r.status, 405, "{}", r.body);

    // alice listens on her own channel and a room (token in the header).
    let bearer = format!("Bearer {alice}");
    let mut a = open(
        &keel,
        &path("channel=user/alice&channel=room/lobby"),
        &[("authorization", &bearer)],
    )
    .await
    .unwrap_or_else(|(status, body)| panic!("{status} {body}"));
    let (name, data) = next(&mut a).await.unwrap();
    assert_eq!(name, "ready");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&data).unwrap(),
        json!({"user": "alice", "channels": ["user/alice", "room/lobby"]})
    );
    let mut b = open(
        &keel,
        &path(&format!("channel=room/lobby&token={}", token_for("bob"))),
        &[],
    )
    .await
    .unwrap_or_else(|(status, body)| panic!("{status} {body}"));
    assert_eq!(next(&mut b).await.unwrap().0, "ready");

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
        next(&mut a).await.unwrap(),
        ("message".into(), "hello\nworld".into()),
        "multi-line data arrives whole, and nothing of `other`"
    );
    assert_eq!(next(&mut a).await.unwrap(), ("dm".into(), "psst".into()));
    assert_eq!(
        next(&mut b).await.unwrap(),
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
    assert_eq!(next(&mut a).await, None);
    assert_eq!(next(&mut b).await, None);
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
    let mut s = open(
        &keel,
        &format!("/_keel/live/lp?channel=user/alice&token={t}"),
        &[],
    )
    .await
    .unwrap_or_else(|(status, body)| panic!("{status} {body}"));
    assert_eq!(next(&mut s).await.unwrap().0, "ready");
    assert_eq!(
        next(&mut s).await,
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
