//! The edge tier through real guests: `edge-probe` (a thin HTTP API over
//! every `kv`, `sql`, `events` and `edge-operations` function) and the
//! `notes` example app, on `keel` child processes.

use crate::support::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) const SECRET: &str = "edge-tier-test-secret-at-least-32-bytes";
const ISSUER: &str = "https://id.keel.test";
const AUDIENCE: &str = "keel-tests";
const ALL_GRANTS: &str = r#"grants = ["edge-operations", "kv", "sql", "events"]"#;

/// A node on edge "fra" of region "eu-central" with one HS256 key (kid
/// "k1"), a 4 KiB kv value limit, and `components`. Keep the `Node` alive
/// while its keel runs: its temp dir is the data dir.
pub fn edge_node(components: &str) -> Node {
    Node::new(&format!(
        r#"
[node]
edge = "fra"
region = "eu-central"

[auth]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
[[auth.keys]]
kid = "k1"
algorithm = "HS256"
secret = "{SECRET}"

[infrastructure]
kv = {{ type = "rocksdb", max-value-bytes = "4KiB" }}

{components}"#
    ))
}

/// `edge-probe` as component `name` at `/<name>/...` with every grant.
pub fn probe(name: &str) -> String {
    component(name, "edge-probe", &format!("/{name}/..."), ALL_GRANTS)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims that pass every check of `edge_node`'s `[auth]`.
pub(crate) fn good_claims(user: &str) -> Value {
    json!({
        "sub": user,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now(),
        "exp": now() + 600,
        "jti": "session-1",
    })
}

/// An HS256 token with header `kid` signed with `secret`.
pub(crate) fn token(kid: Option<&str>, secret: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Asserts a JSON error reply: status and `error` case.
#[track_caller]
fn assert_error(r: &Reply, status: u16, case: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.json()["error"], case, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_cannot_see_each_others_data() {
    let node = edge_node(&format!("{}{}", probe("a"), probe("b")));
    let keel = node.start();

    // kv
    assert_eq!(keel.put("/a/kv/shared-name", "a's value").await.status, 204);
    assert_error(&keel.get("/b/kv/shared-name").await, 404, "not-found");
    assert_eq!(keel.get("/b/kv-exists/shared-name").await.json(), false);
    assert_eq!(
        keel.get("/b/kv-list?prefix=").await.json(),
        json!({"keys": [], "next_cursor": null})
    );
    assert_eq!(keel.put("/b/kv/shared-name", "b's value").await.status, 204);
    assert_eq!(keel.get("/a/kv/shared-name").await.body, "a's value");
    assert_eq!(keel.get("/b/kv/shared-name").await.body, "b's value");
    assert_eq!(keel.delete("/b/kv/shared-name").await.status, 204);
    assert_eq!(keel.get("/a/kv/shared-name").await.body, "a's value");

    // sql: same table name, separate databases.
    let create = json!({"sql": "CREATE TABLE t (v TEXT)"}).to_string();
    let insert =
        |v: &str| json!({"sql": "INSERT INTO t (v) VALUES (?1)", "params": [v]}).to_string();
    let select = json!({"sql": "SELECT v FROM t"}).to_string();
    assert_eq!(
        keel.post("/a/sql/execute", create.clone()).await.status,
        200
    );
    assert_eq!(
        keel.post("/a/sql/execute", insert("from a")).await.status,
        200
    );
    let r = keel.post("/b/sql/query", select.clone()).await;
    assert!(
        (400..500).contains(&r.status),
        "b sees a's table: {}",
        r.body
    );
    assert_eq!(keel.post("/b/sql/execute", create).await.status, 200);
    assert_eq!(
        keel.post("/b/sql/execute", insert("from b")).await.status,
        200
    );
    assert_eq!(
        keel.post("/a/sql/query", select.clone()).await.json()["rows"],
        json!([["from a"]])
    );
    assert_eq!(
        keel.post("/b/sql/query", select).await.json()["rows"],
        json!([["from b"]])
    );

    // events (both the raw log and record-local-event)
    let ev = json!({"kind": "k", "key": "x", "payload": "a's event"}).to_string();
    assert_eq!(
        keel.post("/a/events", ev.clone()).await.json()["sequence"],
        1
    );
    assert_eq!(keel.post("/a/edge/event", ev).await.status, 200);
    assert_eq!(keel.get("/b/events-last").await.json(), Value::Null);
    assert_eq!(
        keel.get("/b/events?from=1&limit=10").await.json(),
        json!([])
    );
    assert_eq!(keel.get("/a/events-last").await.json(), 2);

    // edge-local state
    assert_eq!(
        keel.put("/a/edge/state/s", "a's state").await.json()["version"],
        1
    );
    assert_error(&keel.get("/b/edge/state/s").await, 404, "not-found");
    assert_eq!(
        keel.put("/b/edge/state/s", "b's state").await.json()["version"],
        1
    );
    assert_eq!(
        keel.get("/a/edge/state/s").await.json()["value"],
        "a's state"
    );

    // user preferences
    assert_eq!(
        keel.put("/a/edge/prefs/alice/theme", "dark").await.status,
        204
    );
    assert_eq!(
        keel.get("/a/edge/prefs/alice").await.json(),
        json!({"theme": "dark"})
    );
    assert_eq!(keel.get("/b/edge/prefs/alice").await.json(), json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_round_trip_paging_and_compare_and_swap() {
    let node = edge_node(&probe("p"));
    let keel = node.start();

    // Binary values and keys with '/', spaces and non-ASCII.
    let value: Vec<u8> = (0..=255u8).collect();
    let key = "user/ä b/1";
    let path = "/p/kv/user%2F%C3%A4%20b%2F1";
    assert_error(&keel.get(path).await, 404, "not-found");
    assert_eq!(keel.put(path, value.clone()).await.status, 204);
    let r = keel.get(path).await;
    assert_eq!((r.status, &r.raw[..]), (200, &value[..]));
    assert_eq!(
        keel.get("/p/kv-exists/user%2F%C3%A4%20b%2F1").await.json(),
        true
    );
    assert_eq!(
        keel.get("/p/kv-list?prefix=user%2F").await.json(),
        json!({"keys": [key], "next_cursor": null})
    );
    assert_eq!(keel.put(path, "replaced").await.status, 204);
    assert_eq!(keel.get(path).await.body, "replaced");
    assert_eq!(
        keel.put(path, "").await.status,
        204,
        "empty values are values"
    );
    let r = keel.get(path).await;
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    assert_eq!(keel.delete(path).await.status, 204);
    assert_error(&keel.get(path).await, 404, "not-found");
    assert_eq!(
        keel.get("/p/kv-exists/user%2F%C3%A4%20b%2F1").await.json(),
        false
    );
    assert_eq!(
        keel.delete(path).await.status,
        204,
        "deleting a missing key"
    );

    // Paging: more keys than one page, plus keys outside the prefix.
    let mut expected = BTreeSet::new();
    for i in 0..250 {
        let k = format!("page/{i:04}");
        assert_eq!(keel.put(&format!("/p/kv/{k}"), "x").await.status, 204);
        expected.insert(k);
    }
    for k in ["pag", "pagf", "page0", "zzz"] {
        assert_eq!(keel.put(&format!("/p/kv/{k}"), "x").await.status, 204);
    }
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("/p/kv-list?prefix=page%2F&cursor={}", encode(c)),
            None => "/p/kv-list?prefix=page%2F".to_string(),
        };
        let page = keel.get(&q).await.json();
        pages += 1;
        listed.extend(
            page["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages < 100, "paging does not end");
    }
    assert!(pages > 1, "250 keys should take more than one page");
    assert_eq!(
        listed,
        expected.into_iter().collect::<Vec<_>>(),
        "ascending, complete, no repeats"
    );

    // Compare-and-swap.
    let cas = |expected: Value, new: &str| json!({"expected": expected, "new": new}).to_string();
    assert_eq!(
        keel.post("/p/kv-cas/c", cas(Value::Null, "v1"))
            .await
            .json(),
        true
    );
    assert_eq!(
        keel.post("/p/kv-cas/c", cas(Value::Null, "v1b"))
            .await
            .json(),
        false
    );
    assert_eq!(
        keel.post("/p/kv-cas/c", cas("wrong".into(), "v2"))
            .await
            .json(),
        false
    );
    assert_eq!(keel.get("/p/kv/c").await.body, "v1");
    assert_eq!(
        keel.post("/p/kv-cas/c", cas("v1".into(), "v2"))
            .await
            .json(),
        true
    );
    assert_eq!(keel.get("/p/kv/c").await.body, "v2");
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_keys_and_values_are_invalid_and_write_nothing() {
    let node = edge_node(&probe("p"));
    let keel = node.start();
    // At the configured limit (4 KiB): accepted.
    assert_eq!(keel.put("/p/kv/fits", vec![b'v'; 4096]).await.status, 204);
    assert_eq!(keel.get("/p/kv/fits").await.raw.len(), 4096);
    // One byte over: invalid, and nothing is written.
    let r = keel.put("/p/kv/too-big", vec![b'v'; 4097]).await;
    assert_error(&r, 400, "invalid");
    assert_eq!(keel.get("/p/kv-exists/too-big").await.json(), false);
    // Over the limit on an existing key: the old value stays.
    assert_error(
        &keel.put("/p/kv/fits", vec![b'w'; 4097]).await,
        400,
        "invalid",
    );
    assert_eq!(keel.get("/p/kv/fits").await.raw, vec![b'v'; 4096]);
    // Same through compare-and-swap.
    let big = "w".repeat(4097);
    let r = keel
        .post(
            "/p/kv-cas/cas-big",
            json!({"expected": null, "new": big}).to_string(),
        )
        .await;
    assert_error(&r, 400, "invalid");
    assert_eq!(keel.get("/p/kv-exists/cas-big").await.json(), false);
    // Keys over the default 1 KiB limit.
    let long_key = "k".repeat(1025);
    assert_error(
        &keel.put(&format!("/p/kv/{long_key}"), "v").await,
        400,
        "invalid",
    );
    assert_eq!(
        keel.get("/p/kv-list?prefix=k").await.json()["keys"],
        json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_types_round_trip_parameters_are_inert_and_batches_are_atomic() {
    let node = edge_node(&probe("p"));
    let keel = node.start();
    let exec = |sql: &str, params: Value| json!({"sql": sql, "params": params}).to_string();

    // Every storage class, both ways.
    let r = keel
        .post(
            "/p/sql/execute",
            exec(
                "CREATE TABLE typed (n, i INTEGER, r REAL, t TEXT, b BLOB, two REAL)",
                json!([]),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let row = json!([
        null,
        i64::MIN,
        -0.25,
        "text ✓ 'quoted' \"double\"",
        {"blob": "00ff10a5"},
        2.0
    ]);
    let r = keel
        .post(
            "/p/sql/execute",
            exec(
                "INSERT INTO typed VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                row.clone(),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"rows_affected": 1, "last_insert_id": 1}));
    let r = keel
        .post(
            "/p/sql/execute",
            exec("INSERT INTO typed (i) VALUES (?1)", json!([i64::MAX])),
        )
        .await;
    assert_eq!(r.json()["last_insert_id"], 2);
    let q = keel
        .post(
            "/p/sql/query",
            exec(
                "SELECT n, i, r, t, b, two FROM typed ORDER BY rowid",
                json!([]),
            ),
        )
        .await;
    assert_eq!(q.status, 200, "{}", q.body);
    assert_eq!(
        q.json(),
        json!({
            "columns": ["n", "i", "r", "t", "b", "two"],
            "rows": [row, [null, i64::MAX, null, null, null, null]],
        })
    );
    // A real stays a real (2.0 is not the integer 2), and typeof agrees.
    let q = keel
        .post(
            "/p/sql/query",
            exec(
                "SELECT typeof(n), typeof(i), typeof(r), typeof(t), typeof(b), typeof(two) FROM typed WHERE rowid = 1",
                json!([]),
            ),
        )
        .await;
    assert_eq!(
        q.json()["rows"],
        json!([["null", "integer", "real", "text", "blob", "real"]])
    );

    // Injection through parameters is inert: the text is stored as text.
    let r = keel
        .post(
            "/p/sql/execute",
            exec(
                "CREATE TABLE users (name TEXT PRIMARY KEY, admin INTEGER)",
                json!([]),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let evil = "x', 1); DROP TABLE users; --";
    let r = keel
        .post(
            "/p/sql/execute",
            exec(
                "INSERT INTO users (name, admin) VALUES (?1, 0)",
                json!([evil]),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let q = keel
        .post(
            "/p/sql/query",
            exec("SELECT name, admin FROM users", json!([])),
        )
        .await;
    assert_eq!(
        q.json()["rows"],
        json!([[evil, 0]]),
        "table intact, text literal"
    );
    let q = keel
        .post(
            "/p/sql/query",
            exec(
                "SELECT count(*) FROM users WHERE name = ?1",
                json!(["' OR '1'='1"]),
            ),
        )
        .await;
    assert_eq!(q.json()["rows"], json!([[0]]));

    // Batch: all or nothing. The third statement violates the primary key.
    let batch = json!([
        {"sql": "INSERT INTO users (name, admin) VALUES (?1, 0)", "params": ["bob"]},
        {"sql": "UPDATE users SET admin = 1", "params": []},
        {"sql": "INSERT INTO users (name, admin) VALUES (?1, 0)", "params": ["bob"]},
    ])
    .to_string();
    let r = keel.post("/p/sql/batch", batch).await;
    assert_error(&r, 409, "conflict");
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.starts_with("statement 2"),
        "names the failing statement: {message}"
    );
    let q = keel
        .post(
            "/p/sql/query",
            exec("SELECT name, admin FROM users ORDER BY name", json!([])),
        )
        .await;
    assert_eq!(
        q.json()["rows"],
        json!([[evil, 0]]),
        "nothing of the batch applied"
    );
    // A good batch applies every statement and reports each result.
    let batch = json!([
        {"sql": "INSERT INTO users (name, admin) VALUES (?1, 0)", "params": ["bob"]},
        {"sql": "UPDATE users SET admin = 1 WHERE name = ?1", "params": ["bob"]},
    ])
    .to_string();
    let r = keel.post("/p/sql/batch", batch).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()[1]["rows_affected"], 1);
    let q = keel
        .post(
            "/p/sql/query",
            exec("SELECT admin FROM users WHERE name = ?1", json!(["bob"])),
        )
        .await;
    assert_eq!(q.json()["rows"], json!([[1]]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_run_many_times_and_are_capped_per_instance() {
    let node = edge_node(&probe("p"));
    let keel = node.start();
    let post = |path: &'static str, body: Value| keel.post(path, body.to_string());
    let r = post(
        "/p/sql/execute",
        json!({"sql": "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, tag BLOB)"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // One prepared INSERT, run three times; the third run's text is inert.
    let evil = "x'); DROP TABLE notes; --";
    let r = post(
        "/p/sql/prepared",
        json!({
            "sql": "INSERT INTO notes (body, tag) VALUES (?1, ?2)",
            "op": "execute",
            "runs": [["one", {"blob": "01"}], ["two", null], [evil, {"blob": "ff"}]],
        }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!([
            {"rows_affected": 1, "last_insert_id": 1},
            {"rows_affected": 1, "last_insert_id": 2},
            {"rows_affected": 1, "last_insert_id": 3},
        ])
    );

    // One prepared SELECT, run with two parameter lists: the flat values
    // split into rows by `columns` answer what the ad hoc query answers.
    let select = "SELECT id, body, tag FROM notes WHERE id >= ?1 ORDER BY id";
    let r = post(
        "/p/sql/prepared",
        json!({"sql": select, "runs": [[2], [4]]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let columns = json!(["id", "body", "tag"]);
    assert_eq!(
        r.json(),
        json!([
            {"columns": columns, "rows": [[2, "two", null], [3, evil, {"blob": "ff"}]]},
            {"columns": columns, "rows": []},
        ])
    );
    let adhoc = post("/p/sql/query", json!({"sql": select, "params": [2]})).await;
    assert_eq!(adhoc.json(), r.json()[0]);

    // Typed errors, and nothing changes.
    for (body, case) in [
        (json!({"sql": "SELEC 1", "runs": []}), "invalid"),
        (
            json!({"sql": "SELECT * FROM nowhere", "runs": []}),
            "invalid",
        ),
        (json!({"sql": "PRAGMA user_version", "runs": []}), "invalid"),
        (json!({"sql": select, "runs": [[]]}), "invalid"),
        (
            json!({"sql": "DELETE FROM notes WHERE id > ?1", "runs": [[0]]}),
            "invalid",
        ),
        (
            json!({"sql": "DELETE FROM notes RETURNING id", "runs": [[]]}),
            "invalid",
        ),
        (
            json!({"sql": "SELECT id FROM notes", "op": "execute", "runs": [[]]}),
            "invalid",
        ),
    ] {
        let r = post("/p/sql/prepared", body.clone()).await;
        assert_error(&r, 400, case);
        assert!(!r.body.contains("panic"), "{body}: {}", r.body);
    }
    let r = post("/p/sql/query", json!({"sql": "SELECT count(*) FROM notes"})).await;
    assert_eq!(r.json()["rows"], json!([[3]]), "nothing was deleted");

    // An instance's open prepared statements may hold 1 MiB of host memory:
    // five 200 KiB statements fit, a sixth is refused with `limit`;
    // statements dropped as they go release their share; the next request
    // (a new instance) starts from nothing.
    let big = format!("SELECT 1 AS one -- {}", "x".repeat(200 * 1024 - 19));
    let many = |count: u32, keep: bool| json!({"sql": big, "count": count, "keep": keep});
    let r = post("/p/sql/prepare-many", many(5, true)).await;
    assert_eq!((r.status, r.body.as_str()), (200, "5"), "{}", r.body);
    let r = post("/p/sql/prepare-many", many(6, true)).await;
    assert_error(&r, 413, "limit");
    let r = post("/p/sql/prepare-many", many(50, false)).await;
    assert_eq!((r.status, r.body.as_str()), (200, "50"), "{}", r.body);
    let r = post("/p/sql/prepare-many", many(5, true)).await;
    assert_eq!((r.status, r.body.as_str()), (200, "5"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_gapless_and_local_event_ids_name_the_edge() {
    let node = edge_node(&probe("p"));
    let keel = node.start();
    assert_eq!(keel.get("/p/events-last").await.json(), Value::Null);
    assert_eq!(
        keel.get("/p/edge/node").await.json(),
        json!({"edge": "fra", "region": "eu-central"})
    );

    // Concurrent appends through both paths.
    let mut tasks = Vec::new();
    for i in 0..60 {
        let addr = keel.addr;
        tasks.push(tokio::spawn(async move {
            let path = if i % 2 == 0 {
                "/p/events"
            } else {
                "/p/edge/event"
            };
            let body = json!({
                "kind": "test.event",
                "key": format!("k{i}"),
                "payload": format!("payload {i}"),
                "user": (i % 3 == 0).then_some("alice"),
            });
            let r = request(addr, "POST", path, body.to_string().into()).await;
            assert_eq!(r.status, 200, "{}", r.body);
            (i, r.json())
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        let (i, v) = t.await.unwrap();
        if i % 2 == 1 {
            ids.push((i, v["id"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(keel.get("/p/events-last").await.json(), 60);

    let events = keel.get("/p/events?from=1&limit=1000").await.json();
    let events = events.as_array().unwrap();
    assert_eq!(events.len(), 60);
    for (n, e) in events.iter().enumerate() {
        assert_eq!(e["sequence"], n as u64 + 1, "gapless, in order: {e}");
        assert_eq!(e["origin"], "fra");
        assert_eq!(e["region"], "eu-central");
        assert_eq!(e["kind"], "test.event");
    }
    let payloads: BTreeSet<&str> = events
        .iter()
        .map(|e| e["payload"].as_str().unwrap())
        .collect();
    assert_eq!(payloads.len(), 60, "each event exactly once");
    // record-local-event ids are "<edge>:<n>", unique, and name the event
    // in the same log.
    let distinct: BTreeSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(distinct.len(), 60, "ids are unique");
    for (i, id) in ids {
        assert_edge_event_id(&id);
        let e = events
            .iter()
            .find(|e| e["payload"] == format!("payload {i}"))
            .unwrap();
        assert_eq!(e["id"], id.as_str());
        assert_eq!(
            e["user"],
            if i % 3 == 0 {
                json!("alice")
            } else {
                Value::Null
            }
        );
    }
    // Reading from the middle, and past the end.
    let tail = keel.get("/p/events?from=59&limit=10").await.json();
    assert_eq!(tail.as_array().unwrap().len(), 2);
    assert_eq!(
        keel.get("/p/events?from=61&limit=10").await.json(),
        json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_operations_state_cache_preferences_and_activity() {
    let node = edge_node(&probe("p"));
    let keel = node.start();
    assert_error(&keel.get("/p/edge/state/counter").await, 404, "not-found");
    assert_eq!(
        keel.put("/p/edge/state/counter", "1").await.json()["version"],
        1
    );
    assert_eq!(
        keel.put("/p/edge/state/counter", "2").await.json()["version"],
        2
    );
    let s = keel.get("/p/edge/state/counter").await.json();
    assert_eq!(
        (s["value"].clone(), s["version"].clone()),
        (json!("2"), json!(2))
    );
    assert_eq!(
        s["updated_at"]["node"].as_str().map(|n| !n.is_empty()),
        Some(true),
        "{s}"
    );

    assert_eq!(
        keel.put("/p/edge/cache/c?ttl=30", "cached").await.status,
        204
    );
    assert_error(
        &keel.put("/p/edge/cache/c?ttl=0", "x").await,
        400,
        "invalid",
    );

    assert_eq!(keel.get("/p/edge/prefs/bob").await.json(), json!({}));
    assert_eq!(keel.put("/p/edge/prefs/bob/lang", "de").await.status, 204);
    assert_eq!(
        keel.put("/p/edge/prefs/bob/theme", "dark").await.status,
        204
    );
    assert_eq!(
        keel.get("/p/edge/prefs/bob").await.json(),
        json!({"lang": "de", "theme": "dark"})
    );
    assert_eq!(
        keel.put("/p/edge/prefs/bob/lang", "").await.status,
        204,
        "remove"
    );
    assert_eq!(
        keel.get("/p/edge/prefs/bob").await.json(),
        json!({"theme": "dark"})
    );

    let activity = json!({"kind": "message.sent", "attributes": {"to": "alice"}}).to_string();
    assert_eq!(
        keel.post("/p/edge/activity/bob", activity).await.status,
        204
    );

    // The user directory: unknown until the user authenticates here.
    assert_error(&keel.get("/p/edge/region/carol").await, 404, "not-found");
    let t = token(Some("k1"), SECRET, &good_claims("carol"));
    let r = keel
        .send(
            "POST",
            "/p/edge/auth",
            &[("authorization", &bearer(&t))],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(keel.get("/p/edge/region/carol").await.json(), "eu-central");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_routes_loop_and_answer_the_count() {
    let node = edge_node(&probe("p"));
    let keel = node.start();
    for kind in ["kv-set", "kv-get", "sql-query", "sql-query", "sql-prepared"] {
        let r = keel.post(&format!("/p/bench/{kind}?n=250"), "").await;
        assert_eq!((r.status, r.body.as_str()), (200, "250"), "{kind}");
    }
    assert_eq!(keel.get("/p/kv/bench-99").await.raw.len(), 16);
    assert_error(
        &keel.post("/p/bench/kv-nope?n=1", "").await,
        404,
        "no-route",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_matrix_through_the_guest() {
    let node = edge_node(&probe("p"));
    let keel = node.start();
    let auth = |token: String| {
        let keel = &keel;
        async move {
            keel.send(
                "POST",
                "/p/edge/auth",
                &[("authorization", &bearer(&token))],
                "",
            )
            .await
        }
    };
    let with = |patch: Value| {
        let mut c = good_claims("alice");
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };

    // Valid.
    let claims = good_claims("alice");
    let r = auth(token(Some("k1"), SECRET, &claims)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s = r.json();
    assert_eq!(s["user"], "alice");
    assert_eq!(
        s["home_region"], "eu-central",
        "first seen here: homed in this node's region"
    );
    assert_eq!(s["session_id"], "session-1");
    assert_eq!(s["expires_at_ms"], claims["exp"].as_i64().unwrap() * 1000);
    assert_eq!(s["issued_at_ms"], claims["iat"].as_i64().unwrap() * 1000);
    // Without a kid: the key configured for the algorithm.
    assert_eq!(auth(token(None, SECRET, &claims)).await.status, 200);

    // Time: beyond the default 30 s leeway either way.
    let r = auth(token(
        Some("k1"),
        SECRET,
        &with(json!({"exp": now() - 300})),
    ))
    .await;
    assert_error(&r, 401, "expired");
    let r = auth(token(
        Some("k1"),
        SECRET,
        &with(json!({"nbf": now() + 300})),
    ))
    .await;
    assert_error(&r, 401, "not-yet-valid");

    // Claims.
    let r = auth(token(
        Some("k1"),
        SECRET,
        &with(json!({"iss": "https://evil.test"})),
    ))
    .await;
    assert_error(&r, 401, "claim-mismatch");
    let r = auth(token(
        Some("k1"),
        SECRET,
        &with(json!({"aud": "someone-else"})),
    ))
    .await;
    assert_error(&r, 401, "claim-mismatch");

    // Signature: tampered payload, and the wrong secret.
    let good = token(Some("k1"), SECRET, &claims);
    let parts: Vec<&str> = good.split('.').collect();
    let forged = token(Some("k1"), SECRET, &with(json!({"sub": "mallory"})));
    let forged_payload = forged.split('.').nth(1).unwrap();
    let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert_error(&auth(tampered).await, 401, "bad-signature");
    let r = auth(token(
        Some("k1"),
        "another-secret-of-at-least-32-bytes",
        &claims,
    ))
    .await;
    assert_error(&r, 401, "bad-signature");

    // Keys and garbage.
    let r = auth(token(Some("k9"), SECRET, &claims)).await;
    assert_error(&r, 401, "unknown-key");
    assert_error(&auth("garbage".into()).await, 401, "malformed");
    assert_error(&auth("a.b.c".into()).await, 401, "malformed");
    let r = keel.post("/p/edge/auth", "").await;
    assert_error(&r, 401, "malformed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_a_restart_on_the_same_data_dir() {
    let node = edge_node(&probe("p"));
    let keel = node.start();
    assert_eq!(keel.put("/p/kv/kept", "kv value").await.status, 204);
    let r = keel
        .post(
            "/p/sql/batch",
            json!([
                {"sql": "CREATE TABLE kept (v TEXT)"},
                {"sql": "INSERT INTO kept VALUES (?1)", "params": ["sql row"]},
            ])
            .to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ev = json!({"kind": "k", "key": "x", "payload": "event payload"}).to_string();
    let id = keel.post("/p/edge/event", ev).await.json()["id"].clone();
    assert_eq!(keel.put("/p/edge/state/s", "state value").await.status, 200);
    assert_eq!(
        keel.put("/p/edge/prefs/alice/theme", "dark").await.status,
        204
    );
    let t = token(Some("k1"), SECRET, &good_claims("alice"));
    let r = keel
        .send(
            "POST",
            "/p/edge/auth",
            &[("authorization", &bearer(&t))],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    keel.stop();

    let keel = node.start();
    assert_eq!(keel.get("/p/kv/kept").await.body, "kv value");
    let q = keel
        .post(
            "/p/sql/query",
            json!({"sql": "SELECT v FROM kept"}).to_string(),
        )
        .await;
    assert_eq!(q.json()["rows"], json!([["sql row"]]));
    let events = keel.get("/p/events?from=1&limit=10").await.json();
    assert_eq!(events.as_array().unwrap().len(), 1, "{events}");
    assert_eq!(events[0]["id"], id);
    assert_eq!(events[0]["payload"], "event payload");
    let s = keel.get("/p/edge/state/s").await.json();
    assert_eq!(
        (s["value"].clone(), s["version"].clone()),
        (json!("state value"), json!(1))
    );
    assert_eq!(
        keel.get("/p/edge/prefs/alice").await.json(),
        json!({"theme": "dark"})
    );
    assert_eq!(keel.get("/p/edge/region/alice").await.json(), "eu-central");
    // The log continues without a gap, with a new id.
    let ev = json!({"kind": "k", "key": "x", "payload": "after restart"}).to_string();
    let next = keel.post("/p/edge/event", ev).await.json()["id"].clone();
    assert_edge_event_id(next.as_str().unwrap());
    assert_ne!(next, id);
    let events = keel.get("/p/events?from=1&limit=10").await.json();
    assert_eq!(events[1]["sequence"], 2);
    assert_eq!(events[1]["id"], next);
}

/// An event id of edge "fra": `fra:<n>` with n ≥ 1.
#[track_caller]
pub fn assert_edge_event_id(id: &str) {
    let n = id.strip_prefix("fra:").and_then(|n| n.parse::<u64>().ok());
    assert!(
        matches!(n, Some(n) if n >= 1),
        "not an id of edge fra: {id:?}"
    );
}

#[test]
fn importing_sql_without_the_grant_is_refused_with_the_line_to_add() {
    let node = Node::raw(&component(
        "probe",
        "edge-probe",
        "/...",
        r#"grants = ["edge-operations", "kv", "events"]"#,
    ));
    let (code, _out, err) = node.check();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(r#"component "probe" imports keel:platform/sql@0.1.0, which is not granted; add `grants = ["edge-operations", "kv", "events", "sql"]` under [components.probe]"#),
        "{err}"
    );
    let (code, up_err) = node.up_fails();
    assert_eq!(code, 2, "{up_err}");
    assert!(
        up_err.contains("keel:platform/sql@0.1.0, which is not granted"),
        "{up_err}"
    );
}

/// A request with `authorization: <auth>`.
async fn authed(keel: &Keel, method: &str, path: &str, auth: &str, body: &str) -> Reply {
    keel.send(method, path, &[("authorization", auth)], body.to_string())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notes_app_end_to_end() {
    let node = edge_node(&component(
        "notes",
        "notes",
        "/notes/...",
        r#"grants = ["edge-operations", "sql"]"#,
    ));
    let keel = node.start();
    let alice = bearer(&token(Some("k1"), SECRET, &good_claims("alice")));
    let bob = bearer(&token(Some("k1"), SECRET, &good_claims("bob")));

    // No token, a bad token: 401 with the auth-error case.
    let r = keel.get("/notes").await;
    assert_error(&r, 401, "malformed");
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    let mut claims = good_claims("alice");
    claims["exp"] = json!(now() - 300);
    let expired = bearer(&token(Some("k1"), SECRET, &claims));
    assert_error(
        &authed(&keel, "GET", "/notes", &expired, "").await,
        401,
        "expired",
    );

    // Empty list, then create (the schema is made on first use).
    let r = authed(&keel, "GET", "/notes", &alice, "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"notes": [], "next_before": null}));
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = json!({"title": format!("note {i}"), "body": format!("body {i}")}).to_string();
        let r = authed(&keel, "POST", "/notes", &alice, &body).await;
        assert_eq!(r.status, 201, "{}", r.body);
        let note = r.json();
        assert_eq!(note["title"], format!("note {i}"));
        assert!(
            note["created_at"].as_str().unwrap().ends_with('Z'),
            "{note}"
        );
        ids.push(note["id"].as_i64().unwrap());
    }
    let blank = json!({"title": " "}).to_string();
    assert_error(
        &authed(&keel, "POST", "/notes", &alice, &blank).await,
        400,
        "bad-request",
    );

    // Newest first, paged with ?before=.
    let page = authed(&keel, "GET", "/notes?limit=3", &alice, "")
        .await
        .json();
    let titles: Vec<&str> = page["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["note 4", "note 3", "note 2"]);
    let next = format!("/notes?limit=3&before={}", page["next_before"]);
    let page = authed(&keel, "GET", &next, &alice, "").await.json();
    assert_eq!(page["notes"].as_array().unwrap().len(), 2, "{page}");
    assert_eq!(page["next_before"], Value::Null);

    // Only one's own notes.
    let first = format!("/notes/{}", ids[0]);
    assert_eq!(
        authed(&keel, "GET", &first, &alice, "").await.json()["body"],
        "body 0"
    );
    assert_error(
        &authed(&keel, "GET", &first, &bob, "").await,
        404,
        "not-found",
    );
    assert_error(
        &authed(&keel, "DELETE", &first, &bob, "").await,
        404,
        "not-found",
    );
    let r = authed(&keel, "GET", "/notes", &bob, "").await;
    assert_eq!(r.json()["notes"], json!([]));
    assert_eq!(
        authed(&keel, "DELETE", &first, &alice, "").await.status,
        204
    );
    assert_error(
        &authed(&keel, "GET", &first, &alice, "").await,
        404,
        "not-found",
    );

    // The profile: preferences, home region, scopes.
    let r = authed(&keel, "PUT", "/notes/profile/theme", &alice, "dark").await;
    assert_eq!(r.status, 204, "{}", r.body);
    let p = authed(&keel, "GET", "/notes/profile", &alice, "")
        .await
        .json();
    assert_eq!(p["user"], "alice");
    assert_eq!(p["home_region"], "eu-central");
    assert_eq!(p["preferences"], json!({"theme": "dark"}));
    assert!(p["scopes"].is_array(), "{p}");
    let r = authed(&keel, "PUT", "/notes/profile/theme", &alice, "").await;
    assert_eq!(r.status, 204, "{}", r.body);
    let p = authed(&keel, "GET", "/notes/profile", &alice, "")
        .await
        .json();
    assert_eq!(p["preferences"], json!({}));
}
