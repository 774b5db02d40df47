//! The chat component (`components/chat`): accounts, rooms, direct
//! messages, presence, counters and the UI on one node; live delivery over
//! the host's server-sent events; and two regions on real NATS, where a
//! room message, a direct message and presence cross from one region to
//! the other while a user whose data must stay in its zone keeps it there.

use crate::regions::{RegionSpec, World, hs256_token, runtime, world};
use crate::support::*;
use bytes::Bytes;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The token secret: the chat signs with it (`CHAT_JWT_SECRET`), the
/// node's `[auth]` verifies with it.
pub(crate) const JWT_SECRET: &str = "chat-test-jwt-secret-0123456789abcdef";
pub(crate) const SECRET_ENV: &str = "CHAT_TEST_JWT_SECRET";
/// Deadline for anything that should arrive promptly.
const WAIT: Duration = Duration::from_secs(30);

/// keel.toml tables for the chat at `/chat/...` (as an operator writes
/// them), and the `[auth]` key its tokens verify with.
pub(crate) fn chat_tables() -> String {
    format!(
        "{}\n[auth]\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret-env = {SECRET_ENV:?}\n",
        component(
            "chat",
            "chat",
            "/chat/...",
            r#"grants = ["edge-operations", "regional-coordination", "global-coordination", "state", "sql", "live"]
[components.chat.env]
CHAT_JWT_SECRET = { from-env = "CHAT_TEST_JWT_SECRET" }
[components.chat.live]
channels = ["user/{user}", "room/*", "presence"]
[components.chat.personal-data]
keys = ["user/{user}/"]
sql = ["accounts.user", "messages.sender", "messages.recipient"]"#,
        )
    )
}

fn chat_node() -> Node {
    let mut node = Node::new(&chat_tables());
    node.env.push((SECRET_ENV.into(), JWT_SECRET.into()));
    node
}

/// `method path` with a JSON body (or none) and a bearer token (or none).
async fn call(keel: &Keel, method: &str, path: &str, token: Option<&str>, body: Value) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let body = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    keel.send(method, path, &headers, body).await
}

/// `call` that must answer `status`; returns the JSON body.
async fn expect(
    keel: &Keel,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Value,
    status: u16,
) -> Value {
    let r = call(keel, method, path, token, body).await;
    assert_eq!(r.status, status, "{method} {path}: {}", r.body);
    serde_json::from_slice(&r.raw).unwrap_or(Value::Null)
}

async fn signin(keel: &Keel, user: &str, password: &str) -> Value {
    expect(
        keel,
        "POST",
        "/chat/signin",
        None,
        json!({"user": user, "password": password}),
        200,
    )
    .await
}

async fn token(keel: &Keel, user: &str, password: &str) -> String {
    signin(keel, user, password).await["token"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn post_message(keel: &Keel, token: &str, path: &str, text: &str) -> Value {
    expect(keel, "POST", path, Some(token), json!({"text": text}), 201).await
}

/// The texts of a history page.
fn texts(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("not a page: {page}"))
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect()
}

/// Polls `GET path` (as `token`) until `f` holds for a 200 JSON answer.
async fn poll_get(
    keel: &Keel,
    path: &str,
    token: &str,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let end = Instant::now() + WAIT;
    loop {
        let r = call(keel, "GET", path, Some(token), Value::Null).await;
        let v: Value = serde_json::from_slice(&r.raw).unwrap_or_default();
        if r.status == 200 && f(&v) {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}; last GET {path}: {} {}\n{}",
            r.status,
            r.body,
            keel.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn live_path(token: &str, channels: &[&str]) -> String {
    let mut q: Vec<String> = channels
        .iter()
        .map(|c| format!("channel={}", c.replace('/', "%2F")))
        .collect();
    q.push(format!("token={token}"));
    format!("/_keel/live/chat?{}", q.join("&"))
}

// ---- one node ----

#[tokio::test]
async fn chat_serves_ui_accounts_rooms_dms_presence_and_stats_on_one_node() {
    let node = chat_node();
    let keel = node.start();

    // The UI: static files with their content types, no token needed.
    for (path, ct, needle) in [
        ("/chat/", "text/html", "data-testid=\"signin-user\""),
        (
            "/chat/index.html",
            "text/html",
            "data-testid=\"message-list\"",
        ),
        ("/chat/app.js", "text/javascript", "EventSource"),
        ("/chat/app.css", "text/css", ".messages"),
    ] {
        let r = keel.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let got = r.headers["content-type"].to_str().unwrap();
        assert!(got.starts_with(ct), "{path}: {got}");
        assert!(r.body.contains(needle), "{path}");
    }
    let r = keel.get("/chat").await;
    assert_eq!(r.status, 308);
    assert_eq!(r.headers["location"], "/chat/");

    // Sign-in registers on first use; later sign-ins must match.
    let first = signin(&keel, "alice", "alice-secret").await;
    assert_eq!(first["user"], "alice");
    assert_eq!(first["registered"], true);
    let again = signin(&keel, "alice", "alice-secret").await;
    assert_eq!(again["registered"], false);
    let alice = again["token"].as_str().unwrap().to_string();
    // The token: HS256 with the configured secret, sub/iat/exp = 12 h.
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["sub", "exp", "iat"]);
    let claims = jsonwebtoken::decode::<Value>(
        &alice,
        &jsonwebtoken::DecodingKey::from_secret(JWT_SECRET.as_bytes()),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        12 * 3600
    );
    let r = call(
        &keel,
        "POST",
        "/chat/signin",
        None,
        json!({"user": "alice", "password": "wrong-one"}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (401, json!("bad-credentials")),
        "{}",
        r.body
    );
    for bad in [
        json!({"user": "Alice", "password": "long-enough"}),
        json!({"user": "", "password": "long-enough"}),
        json!({"user": "a".repeat(33), "password": "long-enough"}),
        json!({"user": "al ice", "password": "long-enough"}),
        json!({"user": "carol", "password": "abc"}),
        json!({"user": "carol"}),
        json!(["not", "an", "object"]),
    ] {
        let r = call(&keel, "POST", "/chat/signin", None, bad.clone()).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }

    // Every other endpoint needs a valid token.
    let r = call(&keel, "GET", "/chat/me", None, Value::Null).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (401, json!("malformed"))
    );
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    let r = call(&keel, "GET", "/chat/rooms", Some("garbage"), Value::Null).await;
    assert_eq!(r.status, 401, "{}", r.body);
    let forged = hs256_token("alice", "some-other-secret-of-enough-length");
    let r = call(&keel, "GET", "/chat/me", Some(&forged), Value::Null).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (401, json!("bad-signature"))
    );
    // A valid token whose subject is no chat user id.
    let odd = hs256_token("Not A Chat User", JWT_SECRET);
    let r = call(&keel, "GET", "/chat/me", Some(&odd), Value::Null).await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = call(
        &keel,
        "POST",
        "/chat/rooms/lobby/messages",
        None,
        json!({"text": "hi"}),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);

    // Profile.
    let me = expect(&keel, "GET", "/chat/me", Some(&alice), Value::Null, 200).await;
    assert_eq!(me["user"], "alice");
    assert_eq!(me["registered-here"], true);
    assert_eq!(me["edge"], "local");
    assert_eq!(me["live"], "/_keel/live/chat");
    assert_eq!(me["display-name"], Value::Null);
    let me = expect(
        &keel,
        "PUT",
        "/chat/me",
        Some(&alice),
        json!({"display-name": " Alice A. "}),
        200,
    )
    .await;
    assert_eq!(me["display-name"], "Alice A.");
    let r = call(
        &keel,
        "PUT",
        "/chat/me",
        Some(&alice),
        json!({"display-name": "x".repeat(65)}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);

    // Room messages: ids unique and increasing, the history pages both ways.
    let mut ids = Vec::new();
    for i in 1..=5 {
        let m = post_message(
            &keel,
            &alice,
            "/chat/rooms/lobby/messages",
            &format!("m{i}"),
        )
        .await;
        assert_eq!(m["from"], "alice");
        assert_eq!(m["room"], "lobby");
        assert_eq!(m["kind"], "room");
        assert_eq!(m["name"], "Alice A.");
        assert_eq!(m["text"], format!("m{i}"));
        assert_eq!(m["delivery"]["scope"], "global", "{m}");
        assert_eq!(m["delivery"]["region"]["state"], "queued", "{m}");
        assert_eq!(m["delivery"]["global"]["state"], "queued", "{m}");
        ids.push(m["id"].as_str().unwrap().to_string());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let lobby = "/chat/rooms/lobby/messages";
    let page = expect(&keel, "GET", lobby, Some(&alice), Value::Null, 200).await;
    assert_eq!(texts(&page), ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(page["more"], false);
    let page = expect(
        &keel,
        "GET",
        &format!("{lobby}?limit=2"),
        Some(&alice),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(
        (texts(&page), page["more"].clone()),
        (vec!["m4".into(), "m5".into()], json!(true))
    );
    let page = expect(
        &keel,
        "GET",
        &format!("{lobby}?before={}&limit=2", ids[3]),
        Some(&alice),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(
        (texts(&page), page["more"].clone()),
        (vec!["m2".into(), "m3".into()], json!(true))
    );
    let page = expect(
        &keel,
        "GET",
        &format!("{lobby}?before={}&limit=2", ids[1]),
        Some(&alice),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(
        (texts(&page), page["more"].clone()),
        (vec!["m1".into()], json!(false))
    );
    let page = expect(
        &keel,
        "GET",
        &format!("{lobby}?after={}&limit=3", ids[0]),
        Some(&alice),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(
        (texts(&page), page["more"].clone()),
        (vec!["m2".into(), "m3".into(), "m4".into()], json!(true))
    );
    let page = expect(
        &keel,
        "GET",
        &format!("{lobby}?after={}", ids[4]),
        Some(&alice),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(
        (texts(&page), page["more"].clone()),
        (Vec::<String>::new(), json!(false))
    );
    for bad in [
        format!("{lobby}?after={}&before={}", ids[0], ids[4]),
        format!("{lobby}?limit=0"),
        format!("{lobby}?limit=201"),
        format!("{lobby}?limit=ten"),
        format!("{lobby}?after=NOT%20AN%20ID"),
    ] {
        let r = call(&keel, "GET", &bad, Some(&alice), Value::Null).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }

    // Bad input is refused and stores nothing.
    for (path, body) in [
        (lobby.to_string(), json!({"text": ""})),
        (lobby.to_string(), json!({"text": "   "})),
        (lobby.to_string(), json!({"text": "x".repeat(2001)})),
        (lobby.to_string(), json!({"text": 5})),
        (lobby.to_string(), json!({})),
        (
            "/chat/rooms/Bad%20Room/messages".to_string(),
            json!({"text": "no"}),
        ),
        (
            format!("/chat/rooms/{}/messages", "r".repeat(33)),
            json!({"text": "no"}),
        ),
        (
            "/chat/rooms/a.b/messages".to_string(),
            json!({"text": "no"}),
        ),
        ("/chat/dm/BOB/messages".to_string(), json!({"text": "no"})),
        ("/chat/dm/bob!/messages".to_string(), json!({"text": "no"})),
    ] {
        let r = call(&keel, "POST", &path, Some(&alice), body.clone()).await;
        assert_eq!(r.status, 400, "{path} {body}: {}", r.body);
    }
    let r = keel
        .send(
            "POST",
            lobby,
            &[("authorization", &format!("Bearer {alice}"))],
            "not json",
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    // 2000 characters (not bytes) are fine.
    post_message(&keel, &alice, lobby, &"é".repeat(2000)).await;
    let rooms = expect(&keel, "GET", "/chat/rooms", Some(&alice), Value::Null, 200).await;
    let names: Vec<&str> = rooms
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lobby"], "{rooms}");
    let stats = expect(&keel, "GET", "/chat/stats", Some(&alice), Value::Null, 200).await;
    assert_eq!(stats["stored-here"], 6, "{stats}");
    assert_eq!(stats["sent"], 6, "{stats}");

    // Rooms: joining makes one known; its messages are its own.
    expect(
        &keel,
        "PUT",
        "/chat/rooms/dev",
        Some(&alice),
        Value::Null,
        200,
    )
    .await;
    post_message(&keel, &alice, "/chat/rooms/dev/messages", "in dev").await;
    let rooms = expect(&keel, "GET", "/chat/rooms", Some(&alice), Value::Null, 200).await;
    let names: Vec<&str> = rooms
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dev", "lobby"], "{rooms}");
    let dev = expect(
        &keel,
        "GET",
        "/chat/rooms/dev/messages",
        Some(&alice),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(texts(&dev), ["in dev"]);

    // Direct messages: between users registered here they stay here.
    let bob = token(&keel, "bob", "bob-secret").await;
    let carol = token(&keel, "carol", "carol-secret").await;
    let dm = post_message(&keel, &alice, "/chat/dm/bob/messages", "hi bob").await;
    assert_eq!(
        (dm["kind"].clone(), dm["to"].clone()),
        (json!("dm"), json!("bob"))
    );
    assert_eq!(dm["delivery"]["scope"], "edge", "{dm}");
    post_message(&keel, &bob, "/chat/dm/alice/messages", "hi alice").await;
    for (t, path) in [
        (&alice, "/chat/dm/bob/messages"),
        (&bob, "/chat/dm/alice/messages"),
    ] {
        let page = expect(&keel, "GET", path, Some(t), Value::Null, 200).await;
        assert_eq!(texts(&page), ["hi bob", "hi alice"]);
    }
    let page = expect(
        &keel,
        "GET",
        "/chat/dm/alice/messages",
        Some(&carol),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(texts(&page), Vec::<String>::new());
    let convs = expect(&keel, "GET", "/chat/dm", Some(&bob), Value::Null, 200).await;
    assert_eq!(convs.as_array().unwrap().len(), 1, "{convs}");
    assert_eq!(convs[0]["user"], "alice");
    // To someone not registered on this edge: sent on to the region and the world.
    let away = post_message(&keel, &alice, "/chat/dm/dave/messages", "hi dave").await;
    assert_eq!(away["delivery"]["scope"], "global", "{away}");
    let convs = expect(&keel, "GET", "/chat/dm", Some(&alice), Value::Null, 200).await;
    let peers: Vec<&str> = convs
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["user"].as_str().unwrap())
        .collect();
    assert_eq!(peers, ["dave", "bob"], "{convs}");

    // Presence.
    let p = expect(
        &keel,
        "PUT",
        "/chat/presence",
        Some(&alice),
        json!({"status": "away"}),
        200,
    )
    .await;
    assert_eq!(
        (p["user"].clone(), p["status"].clone()),
        (json!("alice"), json!("away"))
    );
    expect(
        &keel,
        "PUT",
        "/chat/presence",
        Some(&bob),
        json!({"status": "online"}),
        200,
    )
    .await;
    for bad in [json!({"status": "busy"}), json!({}), json!({"status": 1})] {
        let r = call(&keel, "PUT", "/chat/presence", Some(&bob), bad.clone()).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    let list = expect(
        &keel,
        "GET",
        "/chat/presence",
        Some(&carol),
        Value::Null,
        200,
    )
    .await;
    let got: Vec<(&str, &str, &str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["user"].as_str().unwrap(),
                e["status"].as_str().unwrap(),
                e["region"].as_str().unwrap(),
                e["edge"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("alice", "away", "local", "local"),
            ("bob", "online", "local", "local")
        ]
    );
    let p = expect(
        &keel,
        "PUT",
        "/chat/presence",
        Some(&alice),
        json!({"status": "online"}),
        200,
    )
    .await;
    let list = expect(
        &keel,
        "GET",
        "/chat/presence",
        Some(&carol),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(
        list[0],
        json!({"user": "alice", "status": "online", "region": "local", "edge": "local", "at": p["at"]})
    );

    // Counters: alice sent 6 + 1 + 2, bob 1.
    let stats = expect(&keel, "GET", "/chat/stats", Some(&alice), Value::Null, 200).await;
    assert_eq!(
        (stats["sent"].clone(), stats["total-sent"].clone()),
        (json!(9), json!(10)),
        "{stats}"
    );
    assert_eq!(stats["sent-stored-here"], 9, "{stats}");
    let stats = expect(&keel, "GET", "/chat/stats", Some(&bob), Value::Null, 200).await;
    assert_eq!(stats["sent"], 1, "{stats}");

    let r = call(
        &keel,
        "GET",
        "/chat/nothing-here",
        Some(&alice),
        Value::Null,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);

    // After a restart everything is still there and the account holds.
    keel.stop();
    let keel = node.start();
    let r = call(
        &keel,
        "POST",
        "/chat/signin",
        None,
        json!({"user": "alice", "password": "wrong-one"}),
    )
    .await;
    assert_eq!(r.status, 401);
    let alice = token(&keel, "alice", "alice-secret").await;
    let page = expect(
        &keel,
        "GET",
        &format!("{lobby}?limit=5"),
        Some(&alice),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(texts(&page)[..4], ["m2", "m3", "m4", "m5"]);
    let next = post_message(&keel, &alice, lobby, "after restart").await;
    assert!(next["id"].as_str().unwrap() > ids[4].as_str());
    keel.stop();
}

// ---- live delivery on one node ----

#[tokio::test]
async fn chat_messages_reach_a_browser_stream_on_the_node() {
    let node = chat_node();
    let keel = node.start();
    let alice = token(&keel, "alice", "alice-secret").await;
    let bob = token(&keel, "bob", "bob-secret").await;

    // Channels are checked against [components.chat.live].
    let refused = Sse::open(keel.addr, &live_path(&bob, &["user/alice"]), &[]).await;
    assert_eq!(refused.status, 403);
    let r = keel.get("/_keel/live/chat?channel=presence").await;
    assert_eq!(r.status, 401, "{}", r.body);

    let mut stream = Sse::open(
        keel.addr,
        &live_path(&bob, &["room/lobby", "user/bob", "presence"]),
        &[],
    )
    .await;
    assert_eq!(stream.status, 200);
    assert!(
        stream.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"),
        "{:?}",
        stream.headers
    );
    stream
        .expect("ready", "the channels", |v| {
            v["channels"].as_array().is_some_and(|c| c.len() == 3)
        })
        .await;

    let sent = post_message(&keel, &alice, "/chat/rooms/lobby/messages", "live hello").await;
    let got = stream
        .expect("message", "the room message", |v| v["text"] == "live hello")
        .await;
    assert_eq!(got["id"], sent["id"]);
    assert_eq!(got["from"], "alice");
    // Another room's messages are not on this stream; DMs to bob are.
    post_message(
        &keel,
        &alice,
        "/chat/rooms/elsewhere/messages",
        "not for bob",
    )
    .await;
    post_message(&keel, &alice, "/chat/dm/bob/messages", "psst").await;
    let dm = stream
        .expect("dm", "the direct message", |v| v["text"] == "psst")
        .await;
    assert_eq!(
        (dm["from"].clone(), dm["to"].clone()),
        (json!("alice"), json!("bob"))
    );
    // Bob's own DMs echo to his channel (his other tabs).
    post_message(&keel, &bob, "/chat/dm/alice/messages", "back at you").await;
    stream
        .expect("dm", "bob's own DM", |v| v["from"] == "bob")
        .await;
    expect(
        &keel,
        "PUT",
        "/chat/presence",
        Some(&alice),
        json!({"status": "away"}),
        200,
    )
    .await;
    let p = stream
        .expect("presence", "alice away", |v| v["user"] == "alice")
        .await;
    assert_eq!(p["status"], "away");

    // The reconnect path: what arrived meanwhile is in the history after
    // the last id the browser saw, once.
    drop(stream);
    post_message(&keel, &alice, "/chat/rooms/lobby/messages", "while away").await;
    let page = expect(
        &keel,
        "GET",
        &format!(
            "/chat/rooms/lobby/messages?after={}",
            got["id"].as_str().unwrap()
        ),
        Some(&bob),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(texts(&page), ["while away"]);
    keel.stop();
}

// ---- two regions ----

/// Regions `alpha` (`global`, edge ams) and `beta` (`beta_residency`, edge
/// sfo), each edge serving the chat; keep the `World` alive while the nodes
/// run.
pub(crate) fn two_region_chat(beta_residency: &'static str) -> (World, Vec<Node>) {
    let world = world(&[
        RegionSpec {
            name: "alpha",
            residency: "global",
            edges: &["ams"],
            servers: 1,
        },
        RegionSpec {
            name: "beta",
            residency: beta_residency,
            edges: &["sfo"],
            servers: 1,
        },
    ]);
    let nodes = ["ams", "sfo"]
        .into_iter()
        .map(|edge| {
            let mut n = world.node(edge, None, &chat_tables());
            n.env.push((SECRET_ENV.into(), JWT_SECRET.into()));
            n
        })
        .collect();
    (world, nodes)
}

#[test]
fn chat_crosses_regions_and_keeps_zone_bound_data_in_its_zone() {
    let _heavy = heavy_test();
    // alpha is `global`: its users' data may go anywhere. beta is `us`:
    // its users' data stays in the us zone.
    let (_world, nodes) = two_region_chat("us");
    let rt = runtime();
    let a = nodes[0].start();
    let b = nodes[1].start();
    rt.block_on(async {
        for k in [&a, &b] {
            k.wait_ready(|v| v["bus"]["state"] == "connected").await;
        }
        // alice lives at ams (alpha), bob and erin at sfo (beta): the first
        // authenticated request claims their home in the directory.
        let alice = token(&a, "alice", "alice-secret").await;
        let carol = token(&a, "carol", "carol-secret").await;
        let bob = token(&b, "bob", "bob-secret").await;
        for (k, t, region) in [
            (&a, &alice, "alpha"),
            (&a, &carol, "alpha"),
            (&b, &bob, "beta"),
        ] {
            let me = expect(k, "GET", "/chat/me", Some(t), Value::Null, 200).await;
            assert_eq!(me["home-region"], region, "{me}");
        }
        let mut stream = Sse::open(
            b.addr,
            &live_path(&bob, &["room/lobby", "user/bob", "presence"]),
            &[],
        )
        .await;
        assert_eq!(stream.status, 200);
        stream.expect("ready", "the channels", |_| true).await;

        // A room message and a DM from alice reach bob's region: history
        // and live stream.
        let room = post_message(&a, &alice, "/chat/rooms/lobby/messages", "hello from ams").await;
        assert_eq!(room["delivery"]["global"]["state"], "queued", "{room}");
        let dm = post_message(&a, &alice, "/chat/dm/bob/messages", "hi bob, from ams").await;
        assert_eq!(dm["delivery"]["scope"], "global", "{dm}");
        // Between two users of ams: stays at ams.
        let local = post_message(&a, &alice, "/chat/dm/carol/messages", "ams only").await;
        assert_eq!(local["delivery"]["scope"], "edge", "{local}");

        let got = stream
            .expect("message", "alice's room message", |v| {
                v["text"] == "hello from ams"
            })
            .await;
        assert_eq!(
            (
                got["id"].clone(),
                got["region"].clone(),
                got["edge"].clone()
            ),
            (room["id"].clone(), json!("alpha"), json!("ams"))
        );
        stream
            .expect("dm", "alice's DM", |v| v["text"] == "hi bob, from ams")
            .await;
        let page = poll_get(
            &b,
            "/chat/rooms/lobby/messages",
            &bob,
            "the room message at sfo",
            |v| texts(v).contains(&"hello from ams".to_string()),
        )
        .await;
        assert_eq!(texts(&page), ["hello from ams"]);
        let page = poll_get(&b, "/chat/dm/alice/messages", &bob, "the DM at sfo", |v| {
            !texts(v).is_empty()
        })
        .await;
        assert_eq!(texts(&page), ["hi bob, from ams"]);
        assert_eq!(page["messages"][0]["id"], dm["id"]);
        // sfo's dashboard counts those deliveries and how far behind they ran.
        let sync = b.get("/_keel/cluster").await.json()["self"]["sync"].clone();
        let (events, batches) = (
            sync["delivered_events"].as_u64().unwrap(),
            sync["delivered_batches"].as_u64().unwrap(),
        );
        assert!(events >= 2 && (1..=events).contains(&batches), "{sync}");
        assert!(sync["delivery_lag_ms"].as_i64().unwrap() >= 0, "{sync}");
        let metrics = b.get("/metrics").await.body;
        assert!(
            metrics.contains("keel_subscription_events_total"),
            "{metrics}"
        );

        // Presence: alice's (global map) is visible at sfo and pushed live.
        expect(
            &a,
            "PUT",
            "/chat/presence",
            Some(&alice),
            json!({"status": "online"}),
            200,
        )
        .await;
        let p = stream
            .expect("presence", "alice online", |v| v["user"] == "alice")
            .await;
        assert_eq!(
            (p["status"].clone(), p["region"].clone(), p["edge"].clone()),
            (json!("online"), json!("alpha"), json!("ams"))
        );
        poll_get(&b, "/chat/presence", &bob, "alice's presence at sfo", |v| {
            v.as_array()
                .unwrap()
                .iter()
                .any(|e| e["user"] == "alice" && e["status"] == "online" && e["edge"] == "ams")
        })
        .await;
        // Her message counter is global too.
        poll_get(&b, "/chat/stats", &alice, "alice's counter at sfo", |v| {
            v["sent"] == 3
        })
        .await;

        // Bob's data must stay in the us zone: his answer, room message
        // and presence stay in beta.
        let reply = post_message(&b, &bob, "/chat/dm/alice/messages", "hi alice, from sfo").await;
        assert_eq!(reply["delivery"]["region"]["state"], "queued", "{reply}");
        assert_eq!(
            reply["delivery"]["global"]["state"], "kept-in-zone",
            "{reply}"
        );
        let kept = post_message(&b, &bob, "/chat/rooms/lobby/messages", "sfo only").await;
        assert_eq!(
            kept["delivery"]["global"]["state"], "kept-in-zone",
            "{kept}"
        );
        let p = expect(
            &b,
            "PUT",
            "/chat/presence",
            Some(&bob),
            json!({"status": "away"}),
            200,
        )
        .await;
        assert_eq!(p["delivery"]["global-map"], false, "{p}");
        // alice (homed in alpha, may be anywhere) writes at sfo too: that
        // one crosses, and once it is at ams, bob's earlier ones would be
        // there if they had been sent at all.
        let marker = post_message(&b, &alice, "/chat/rooms/lobby/messages", "alice via sfo").await;
        assert_eq!(marker["delivery"]["global"]["state"], "queued", "{marker}");
        let page = poll_get(
            &a,
            "/chat/rooms/lobby/messages",
            &alice,
            "the marker at ams",
            |v| texts(v).contains(&"alice via sfo".to_string()),
        )
        .await;
        assert_eq!(texts(&page), ["hello from ams", "alice via sfo"]);
        let page = expect(
            &a,
            "GET",
            "/chat/dm/bob/messages",
            Some(&alice),
            Value::Null,
            200,
        )
        .await;
        assert_eq!(texts(&page), ["hi bob, from ams"]);
        let list = expect(&a, "GET", "/chat/presence", Some(&alice), Value::Null, 200).await;
        assert!(
            !list.as_array().unwrap().iter().any(|e| e["user"] == "bob"),
            "{list}"
        );
        // carol's DM never left ams.
        let page = expect(
            &b,
            "GET",
            "/chat/dm/carol/messages",
            Some(&alice),
            Value::Null,
            200,
        )
        .await;
        assert_eq!(texts(&page), Vec::<String>::new());
        // At sfo everything is there once: redeliveries changed nothing.
        let page = expect(
            &b,
            "GET",
            "/chat/rooms/lobby/messages",
            Some(&bob),
            Value::Null,
            200,
        )
        .await;
        assert_eq!(
            texts(&page),
            ["hello from ams", "sfo only", "alice via sfo"]
        );
    });
    a.stop();
    b.stop();
}

// ---- GDPR ----

/// Polls a privacy-probe job until it is `completed`.
async fn wait_job(keel: &Keel, path: &str) -> Value {
    keel.poll("GET", path, "", "the job to complete", |s, v| {
        assert_ne!(v["state"], "failed", "{v}");
        s == 200 && v["state"] == "completed"
    })
    .await
}

#[tokio::test]
async fn chat_users_data_is_exported_and_erased_by_user_id() {
    let mut node = Node::new(&format!(
        "{}\n{}",
        chat_tables(),
        component(
            "gdpr",
            "privacy-probe",
            "/gdpr/...",
            "grants = [\"global-coordination\"]"
        )
    ));
    node.env.push((SECRET_ENV.into(), JWT_SECRET.into()));
    let keel = node.start();
    let alice = token(&keel, "alice", "alice-secret").await;
    let bob = token(&keel, "bob", "bob-secret").await;
    expect(
        &keel,
        "PUT",
        "/chat/me",
        Some(&alice),
        json!({"display-name": "ALICE-NAME-Q7Z"}),
        200,
    )
    .await;
    post_message(
        &keel,
        &alice,
        "/chat/rooms/lobby/messages",
        "ALICE-ROOM-Q7Z",
    )
    .await;
    post_message(&keel, &bob, "/chat/rooms/lobby/messages", "bob in the room").await;
    post_message(&keel, &alice, "/chat/dm/bob/messages", "ALICE-DM-Q7Z").await;
    post_message(&keel, &bob, "/chat/dm/alice/messages", "BOB-TO-ALICE-Q7Z").await;
    for t in [&alice, &bob] {
        expect(
            &keel,
            "PUT",
            "/chat/presence",
            Some(t),
            json!({"status": "online"}),
            200,
        )
        .await;
    }

    // The export finds alice's rows by the declared columns.
    let r = keel.post("/gdpr/export/alice?format=json", "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_job(&keel, &format!("/gdpr/export-status/{id}")).await;
    let archive = keel.get(&format!("/gdpr/export/{id}")).await;
    assert_eq!(archive.status, 200, "{}", archive.body);
    for needle in [
        "ALICE-ROOM-Q7Z",
        "ALICE-DM-Q7Z",
        "BOB-TO-ALICE-Q7Z",
        "ALICE-NAME-Q7Z",
    ] {
        assert!(
            archive.body.contains(needle),
            "{needle} not in {}",
            archive.body
        );
    }
    assert!(
        !archive.body.contains("bob in the room"),
        "{}",
        archive.body
    );
    let archive = archive.json();
    let tables: std::collections::BTreeSet<&str> = archive["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["type"] == "sql-row" && r["component"] == "chat")
        .map(|r| r["table"].as_str().unwrap())
        .collect();
    assert_eq!(tables, ["accounts", "messages"].into(), "{archive}");
    // Her message counter (a state CRDT named under the declared
    // `user/{user}/`), whole; bob's is not hers.
    let counters: Vec<&Value> = archive["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["type"] == "state" && r["kind"] == "counter")
        .collect();
    assert_eq!(counters.len(), 1, "{archive}");
    assert_eq!(counters[0]["name"], "user/alice/sent", "{archive}");
    assert_eq!(counters[0]["entry"], json!({"count": 2}), "{archive}");

    // Erased: her messages (sent and received), account, profile and
    // presence; bob's own room message stays.
    let r = keel.post("/gdpr/erase/alice", "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_job(&keel, &format!("/gdpr/erase-status/{id}")).await;
    let page = expect(
        &keel,
        "GET",
        "/chat/rooms/lobby/messages",
        Some(&bob),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(texts(&page), ["bob in the room"]);
    let page = expect(
        &keel,
        "GET",
        "/chat/dm/alice/messages",
        Some(&bob),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(texts(&page), Vec::<String>::new());
    let list = expect(&keel, "GET", "/chat/presence", Some(&bob), Value::Null, 200).await;
    let users: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["bob"], "{list}");
    // The id is free again.
    let again = signin(&keel, "alice", "a-new-password").await;
    assert_eq!(again["registered"], true);
    let me = expect(
        &keel,
        "GET",
        "/chat/me",
        Some(again["token"].as_str().unwrap()),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(me["display-name"], Value::Null, "{me}");
    let stats = expect(
        &keel,
        "GET",
        "/chat/stats",
        Some(again["token"].as_str().unwrap()),
        Value::Null,
        200,
    )
    .await;
    assert_eq!(stats["sent"], 0, "her counter was erased: {stats}");
    let stats = expect(&keel, "GET", "/chat/stats", Some(&bob), Value::Null, 200).await;
    assert_eq!(stats["sent"], 2, "bob's counter stays: {stats}");
    // None of her messages or state is left to export (her new account is).
    let r = keel.post("/gdpr/export/alice?format=json", "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_job(&keel, &format!("/gdpr/export-status/{id}")).await;
    let archive = keel.get(&format!("/gdpr/export/{id}")).await.json();
    let left: Vec<&Value> = archive["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["type"] == "state" || r["table"] == "messages")
        .collect();
    assert!(left.is_empty(), "{archive}");
    keel.stop();
}
