//! GDPR erasure and export through `privacy-probe`, with the user's data
//! written through every channel a component has (SQL rows, KV keys, events
//! naming the user, preferences, activity, CRDT members and map entries,
//! cache entries at every level): on the embedded node, and across two
//! regions of real NATS clusters with a restart of the asking node while a
//! region is down. After an erasure, every file of every node's data dir
//! and every NATS server's JetStream store is scanned for the user's
//! marker strings.

use crate::regions::{RegionSpec, World, runtime, world};
use crate::support::*;
use keel_test_support::files_containing;
use serde_json::{Value, json};
use std::path::PathBuf;

/// The components of a node: the user's data goes in through `app`
/// (edge-probe), `st` (state-probe) and `cc` (cache-probe); `gdpr`
/// (privacy-probe) erases and exports.
fn components() -> String {
    [
        component(
            "app",
            "edge-probe",
            "/app/...",
            "grants = [\"edge-operations\", \"events\", \"kv\", \"sql\"]\n[components.app.personal-data]\nkeys = [\"user/{user}/\"]\nsql = [\"notes.owner\"]",
        ),
        component("st", "state-probe", "/st/...", "grants = [\"state\"]"),
        component(
            "cc",
            "cache-probe",
            "/cc/...",
            "grants = [\"cache\"]\n[components.cc.personal-data]\nkeys = [\"u/{user}/\"]",
        ),
        component(
            "gdpr",
            "privacy-probe",
            "/gdpr/...",
            "grants = [\"global-coordination\"]",
        ),
    ]
    .join("\n")
}

/// A marker string: what the byte scans look for.
fn marker(user: &str, what: &str, at: &str) -> String {
    format!("{}-{what}-{at}-Q7Z", user.to_uppercase())
}

const KINDS: &[&str] = &["SQL", "KV", "EVENT", "PREF", "NAME", "CRDT", "CACHE"];

async fn ok(r: Reply, what: &str) -> Reply {
    assert!(r.status < 300, "{what}: {} {}", r.status, r.body);
    r
}

/// Writes `user`'s data on `node` (edge `at`) through every channel.
async fn write_user(node: &Keel, user: &str, at: &str) {
    let m = |what| marker(user, what, at);
    ok(
        node.post(
            "/app/sql/execute",
            json!({"sql": "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, owner TEXT, body TEXT)", "params": []}).to_string(),
        )
        .await,
        "create table",
    )
    .await;
    ok(
        node.post(
            "/app/sql/execute",
            json!({"sql": "INSERT INTO notes (owner, body) VALUES (?, ?)", "params": [user, m("SQL")]}).to_string(),
        )
        .await,
        "insert",
    )
    .await;
    ok(
        node.put(&format!("/app/kv/user%2F{user}%2Fprofile"), m("KV"))
            .await,
        "kv",
    )
    .await;
    ok(
        node.post(
            "/app/edge/event",
            json!({"kind": "note", "key": "n1", "payload": m("EVENT"), "user": user}).to_string(),
        )
        .await,
        "event",
    )
    .await;
    ok(
        node.put(&format!("/app/edge/prefs/{user}/color"), m("PREF"))
            .await,
        "pref",
    )
    .await;
    ok(
        node.post(
            &format!("/app/edge/activity/{user}"),
            json!({"kind": "login", "attributes": {"display-name": m("NAME")}}).to_string(),
        )
        .await,
        "activity",
    )
    .await;
    ok(
        node.put(&format!("/st/map/profiles/{user}?scope=region"), m("CRDT"))
            .await,
        "map",
    )
    .await;
    ok(
        node.post(&format!("/st/set/online/{user}?scope=region"), "")
            .await,
        "set",
    )
    .await;
    ok(
        node.put(
            &format!("/cc/entry/u%2F{user}%2Fcard?scope=global"),
            m("CACHE"),
        )
        .await,
        "cache",
    )
    .await;
}

/// Polls a job's status until it is `completed` (panics on `failed`).
async fn wait_job(node: &Keel, status_path: &str) -> Value {
    node.poll("GET", status_path, "", "the job to complete", |s, v| {
        assert_ne!(v["state"], "failed", "{v}");
        s == 200 && v["state"] == "completed"
    })
    .await
}

async fn export(node: &Keel, user: &str, format: &str) -> (Value, Vec<u8>) {
    let r = ok(
        node.post(&format!("/gdpr/export/{user}?format={format}"), "")
            .await,
        "export",
    )
    .await;
    let id = r.json()["id"].as_str().unwrap().to_string();
    let status = wait_job(node, &format!("/gdpr/export-status/{id}")).await;
    let archive = node.get(&format!("/gdpr/export/{id}?chunk=1000")).await;
    assert_eq!(archive.status, 200, "{}", archive.body);
    assert_eq!(status["size_bytes"], archive.raw.len() as u64, "{status}");
    (status, archive.raw.to_vec())
}

async fn erase(node: &Keel, user: &str) -> Value {
    let r = ok(node.post(&format!("/gdpr/erase/{user}"), "").await, "erase").await;
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_job(node, &format!("/gdpr/erase-status/{id}")).await
}

/// The archive's records of `kind`.
fn records<'a>(archive: &'a Value, kind: &str) -> Vec<&'a Value> {
    archive["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["type"] == kind)
        .collect()
}

/// Checks a JSON archive holds exactly `user`'s data written at `edges`
/// (one write of each kind per edge) and nothing of anyone else.
fn check_archive(archive: &Value, user: &str, edges: &[&str], other: &str) {
    let text = archive.to_string();
    assert!(
        !text.contains(&other.to_uppercase()),
        "{other}'s data in {user}'s export: {text}"
    );
    assert_eq!(archive["manifest"]["user"], user);
    assert_eq!(
        archive["manifest"]["records"],
        archive["records"].as_array().unwrap().len()
    );
    let values = |kind: &str, field: &dyn Fn(&Value) -> Value| {
        let mut v: Vec<String> = records(archive, kind)
            .into_iter()
            .map(|r| field(r).as_str().unwrap_or_default().to_string())
            .collect();
        v.sort();
        v
    };
    let expect = |what: &str| {
        let mut v: Vec<String> = edges.iter().map(|e| marker(user, what, e)).collect();
        v.sort();
        v
    };
    assert_eq!(
        values("sql-row", &|r| r["row"]["body"].clone()),
        expect("SQL"),
        "{text}"
    );
    assert_eq!(values("kv", &|r| r["value"].clone()), expect("KV"));
    assert_eq!(values("event", &|r| r["payload"].clone()), expect("EVENT"));
    assert_eq!(
        values("preference", &|r| r["value"].clone()),
        expect("PREF")
    );
    assert_eq!(
        values("activity", &|r| r["attributes"][0][1].clone()),
        expect("NAME")
    );
    // The map is one region-wide CRDT: one copy per region holding it.
    let crdt = values("state", &|r| r["entry"]["value"].clone());
    assert!(
        crdt.iter()
            .filter(|v| !v.is_empty())
            .all(|v| expect("CRDT").contains(v)),
        "{crdt:?}"
    );
    for r in archive["records"].as_array().unwrap() {
        assert!(r["region"].is_string() && r["edge"].is_string(), "{r}");
    }
}

/// Files under `dirs` holding `needle`.
fn scan(dirs: &[PathBuf], needle: &str) -> Vec<PathBuf> {
    dirs.iter()
        .flat_map(|d| files_containing(d, needle.as_bytes()))
        .collect()
}

fn data_dir(node: &Node) -> PathBuf {
    node.dir.path().join(".keel")
}

#[test]
fn embedded_erase_and_export_cover_every_channel_and_leave_no_bytes() {
    let node = Node::new(&components());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let keel = node.start();
    rt.block_on(async {
        for user in ["alice", "bob"] {
            write_user(&keel, user, "local").await;
        }
        // The activity reached the region's view (through the sealed stream).
        keel.poll(
            "GET",
            "/gdpr/export-status/none",
            "",
            "the probe",
            |s, _| s == 404,
        )
        .await;

        let (status, raw) = export(&keel, "alice", "json").await;
        assert_eq!(status["format"], "json");
        assert_eq!(status["regions"][0]["state"], "completed", "{status}");
        let archive: Value = serde_json::from_slice(&raw).unwrap();
        check_archive(&archive, "alice", &["local"], "bob");
        // Set membership and the map entry of the region-scope CRDTs.
        let state = records(&archive, "state");
        assert!(
            state
                .iter()
                .any(|r| r["name"] == "online" && r["entry"]["member"] == true),
            "{state:?}"
        );
        // NDJSON: the manifest, then the same records, one per line.
        let (_, nd) = export(&keel, "alice", "ndjson").await;
        let lines: Vec<Value> = String::from_utf8(nd)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["type"], "manifest");
        assert_eq!(
            lines.len() - 1,
            archive["records"].as_array().unwrap().len()
        );
        // Unknown ids and other kinds of job are not found; bad input.
        assert_eq!(keel.get("/gdpr/erase-status/nope").await.status, 404);
        let r = keel.post("/gdpr/erase/", "").await;
        assert_eq!(r.status, 400, "{}", r.body);
        let r = keel.post("/gdpr/erase/alice?regions=mars", "").await;
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains("unknown region"), "{}", r.body);

        let status = erase(&keel, "alice").await;
        assert_eq!(status["user"], "alice");
        assert_eq!(status["regions"][0]["state"], "completed", "{status}");

        // Gone through every interface; bob's data intact.
        assert_eq!(keel.get("/app/kv/user%2Falice%2Fprofile").await.status, 404);
        assert_eq!(
            keel.get("/app/kv/user%2Fbob%2Fprofile").await.body,
            marker("bob", "KV", "local")
        );
        let rows = keel
            .post(
                "/app/sql/query",
                json!({"sql": "SELECT owner, body FROM notes ORDER BY owner", "params": []})
                    .to_string(),
            )
            .await
            .json();
        assert_eq!(
            rows["rows"],
            json!([["bob", marker("bob", "SQL", "local")]])
        );
        assert_eq!(keel.get("/app/edge/prefs/alice").await.json(), json!({}));
        assert_eq!(
            keel.get("/app/edge/prefs/bob").await.json()["color"],
            marker("bob", "PREF", "local")
        );
        assert_eq!(
            keel.get("/st/map/profiles/alice?scope=region").await.status,
            404
        );
        assert_eq!(
            keel.get("/st/set/online?scope=region").await.json(),
            json!(["bob"])
        );
        assert_eq!(keel.get("/cc/entry/u%2Falice%2Fcard").await.status, 404);
        assert_eq!(
            keel.get("/cc/entry/u%2Fbob%2Fcard").await.body,
            marker("bob", "CACHE", "local")
        );
        let events = keel.get("/app/events?from=1&limit=10").await;
        assert!(!events.body.contains("ALICE"), "{}", events.body);
        // The archives were copies of alice's data: gone with it.
        let (_, after) = export(&keel, "bob", "json").await;
        check_archive(
            &serde_json::from_slice(&after).unwrap(),
            "bob",
            &["local"],
            "alice",
        );

        // Erasing again is harmless.
        erase(&keel, "alice").await;
    });
    keel.stop();
    // No byte of alice's markers in any file the node keeps; bob's are
    // there (the scan can find what it looks for).
    let dirs = [data_dir(&node)];
    for kind in KINDS {
        let m = marker("alice", kind, "local");
        assert_eq!(scan(&dirs, &m), Vec::<PathBuf>::new(), "{m}");
    }
    for kind in ["SQL", "KV", "EVENT", "PREF"] {
        let m = marker("bob", kind, "local");
        assert!(
            !scan(&dirs, &m).is_empty(),
            "{m} not found: the scan is blind"
        );
    }
    // After a restart: still gone, bob still there, the job still completed.
    let keel = node.start();
    rt.block_on(async {
        assert_eq!(keel.get("/app/kv/user%2Falice%2Fprofile").await.status, 404);
        assert_eq!(keel.get("/app/kv/user%2Fbob%2Fprofile").await.status, 200);
        assert_eq!(keel.get("/app/edge/prefs/alice").await.json(), json!({}));
    });
    keel.stop();
    let (code, out, err) = node.audit_verify();
    assert_eq!(code, 0, "{out}{err}");
}

fn two_regions() -> World {
    world(&[
        RegionSpec {
            name: "eu-central",
            residency: "gdpr",
            edges: &["fra", "ams"],
            servers: 1,
        },
        // `global`: its users' data may go anywhere, so an export from
        // the EU may collect it.
        RegionSpec {
            name: "us-east",
            residency: "global",
            edges: &["iad"],
            servers: 1,
        },
    ])
}

/// Polls until `f` holds for the job's status JSON.
async fn poll_status(node: &Keel, path: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    node.poll("GET", path, "", what, |s, v| s == 200 && f(v))
        .await
}

#[test]
fn erase_across_regions_survives_a_restart_and_leaves_no_bytes_anywhere() {
    let _heavy = heavy_test();
    let world = two_regions();
    let rt = runtime();
    let nodes: Vec<(&str, Node)> = ["fra", "ams", "iad"]
        .into_iter()
        .map(|e| (e, world.node(e, None, &components())))
        .collect();
    let node = |edge: &str| &nodes.iter().find(|(e, _)| *e == edge).unwrap().1;
    let mut running: Vec<(&str, Keel)> = nodes.iter().map(|(e, n)| (*e, n.start())).collect();
    rt.block_on(async {
        for (edge, k) in &running {
            for user in ["alice", "bob"] {
                write_user(k, user, edge).await;
            }
        }
        // Exported from the EU (alice is homed nowhere: she lives where
        // seen), every region answers with what its edges hold.
        let fra = &running[0].1;
        // From us-east, the EU's part is refused for good: alice lives in
        // the EU (where seen), and gdpr data stays there.
        let iad = &running[2].1;
        let r = ok(iad.post("/gdpr/export/alice", "").await, "export").await;
        let id = r.json()["id"].as_str().unwrap().to_string();
        let v = poll_status(
            iad,
            &format!("/gdpr/export-status/{id}"),
            "a failed export",
            |v| v["state"] == "failed",
        )
        .await;
        let eu = v["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["region"] == "eu-central")
            .unwrap();
        assert_eq!(eu["state"], "failed", "{v}");
        assert!(eu["detail"].as_str().unwrap().contains("residency"), "{v}");
        assert_eq!(iad.get(&format!("/gdpr/export/{id}")).await.status, 409);
        let (status, raw) = export(fra, "alice", "json").await;
        assert_eq!(status["regions"].as_array().unwrap().len(), 2, "{status}");
        let archive: Value = serde_json::from_slice(&raw).unwrap();
        check_archive(&archive, "alice", &["fra", "ams", "iad"], "bob");

        // us-east goes down; the erasure waits for it.
        let (_, iad) = running.pop().unwrap();
        iad.stop();
        let fra = &running[0].1;
        let r = ok(fra.post("/gdpr/erase/alice", "").await, "erase").await;
        let id = r.json()["id"].as_str().unwrap().to_string();
        let path = format!("/gdpr/erase-status/{id}");
        let v = poll_status(fra, &path, "eu-central done, us-east pending", |v| {
            let regions = v["regions"].as_array().unwrap();
            regions
                .iter()
                .any(|r| r["region"] == "eu-central" && r["state"] == "completed")
                && regions
                    .iter()
                    .any(|r| r["region"] == "us-east" && r["state"] == "running")
        })
        .await;
        assert_eq!(v["state"], "running", "{v}");
        // The asking node dies mid-way and comes back; so does us-east.
        let (_, fra) = running.remove(0);
        fra.sigkill();
        running.insert(0, ("fra", node("fra").start()));
        running.push(("iad", node("iad").start()));
        let fra = &running[0].1;
        let done = wait_job(fra, &path).await;
        assert!(
            done["regions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["state"] == "completed"),
            "{done}"
        );
        // Gone on every edge; bob intact.
        for (edge, k) in &running {
            assert_eq!(
                k.get("/app/kv/user%2Falice%2Fprofile").await.status,
                404,
                "{edge}"
            );
            assert_eq!(
                k.get("/app/edge/prefs/alice").await.json(),
                json!({}),
                "{edge}"
            );
            assert_eq!(
                k.get("/app/kv/user%2Fbob%2Fprofile").await.body,
                marker("bob", "KV", edge),
                "{edge}"
            );
        }
    });
    for (_, k) in running {
        k.stop();
    }
    let mut dirs: Vec<PathBuf> = nodes.iter().map(|(_, n)| data_dir(n)).collect();
    dirs.push(world.nats_store());
    for edge in ["fra", "ams", "iad"] {
        for kind in KINDS {
            let m = marker("alice", kind, edge);
            assert_eq!(scan(&dirs, &m), Vec::<PathBuf>::new(), "{m}");
        }
        // Bob's events are in the region's stream sealed (never in plaintext
        // on the servers), and in plaintext on the edge that wrote them.
        let m = marker("bob", "EVENT", edge);
        let found = scan(&dirs, &m);
        assert!(!found.is_empty(), "{m} not found: the scan is blind");
        assert!(
            found.iter().all(|p| !p.starts_with(world.nats_store())),
            "{m} in plaintext on a NATS server: {found:?}"
        );
    }
    for (_, n) in &nodes {
        let (code, out, err) = n.audit_verify();
        assert_eq!(code, 0, "{out}{err}");
    }
}
