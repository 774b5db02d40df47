//! GDPR erasure across three regions, end to end, run by
//! `benches/erase.sh` (numbers go to BENCHMARKS.md; nothing is asserted).
//! A real loopback topology: 3 regions x 1 edge (us-east: nyc, us-west:
//! sfo, eu-central: fra), one nats-server per region, release `keel up`
//! nodes on the three edges serving `edge-probe` (`/app`, with
//! `personal-data` keys and SQL), `state-probe` (`/st`), `cache-probe`
//! (`/cc`, with personal keys) and `privacy-probe` (`/gdpr`).
//!
//! Per sample: a fresh user's data is written on every edge through every
//! channel (a SQL row, a KV key, an event naming the user, a preference,
//! an activity, a CRDT map entry and set member, a global cache entry; not
//! timed), then `POST /gdpr/erase/<user>` at nyc and `GET
//! /gdpr/erase-status/<id>` at nyc every millisecond until `completed`:
//! the time from the POST to the first `completed`. Each erasure runs every
//! edge's local erasure (with a full RocksDB compaction and a SQLite WAL
//! truncation), destroys the user's data key in each region, erases the
//! directory entry and appends two audit records.
//!
//! Baseline, same run, same servers: a raw async-nats core request/reply
//! round trip from nyc's connection to an echo on fra's (us-east ->
//! eu-central through the gateway): the floor of one cross-region ask.
//!
//! Usage: erase-bench [samples]   (default 30)
//! Env: `KEEL_BIN`, `KEEL_EDGE_PROBE`, `KEEL_STATE_PROBE`,
//! `KEEL_CACHE_PROBE`, `KEEL_PRIVACY_PROBE` (default
//! `components/target/wasm/<name>.wasm`), `KEEL_LOG` (default `warn`),
//! `KEEL_NATS_SERVER`.

use anyhow::bail;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tier_bench::{
    Http, Node, Samples, Topology, check_interrupted, guest_wasm, raw_round_trip, run_bench,
    samples_arg, text, wait_connected,
};

const REGIONS: [(&str, &[&str]); 3] = [
    ("us-east", &["nyc"]),
    ("us-west", &["sfo"]),
    ("eu-central", &["fra"]),
];
const NODES: [&str; 3] = ["nyc", "sfo", "fra"];
/// Deadline of one erasure.
const SAMPLE_DEADLINE: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    let samples = samples_arg("erase-bench", 30)?;
    let wasm = |env: &str, name: &str| -> anyhow::Result<String> {
        Ok(guest_wasm(env, name)?.display().to_string())
    };
    let components = format!(
        "[components.app]\nwasm = {:?}\nroute = \"/app/...\"\n\
         grants = [\"edge-operations\", \"events\", \"kv\", \"sql\"]\n\
         [components.app.personal-data]\nkeys = [\"user/{{user}}/\"]\nsql = [\"notes.owner\"]\n\n\
         [components.st]\nwasm = {:?}\nroute = \"/st/...\"\ngrants = [\"state\"]\n\n\
         [components.cc]\nwasm = {:?}\nroute = \"/cc/...\"\ngrants = [\"cache\"]\n\
         [components.cc.personal-data]\nkeys = [\"u/{{user}}/\"]\n\n\
         [components.gdpr]\nwasm = {:?}\nroute = \"/gdpr/...\"\ngrants = [\"global-coordination\"]\n",
        wasm("KEEL_EDGE_PROBE", "edge-probe")?,
        wasm("KEEL_STATE_PROBE", "state-probe")?,
        wasm("KEEL_CACHE_PROBE", "cache-probe")?,
        wasm("KEEL_PRIVACY_PROBE", "privacy-probe")?,
    );
    run_bench(
        "erase",
        &REGIONS,
        false,
        &NODES,
        &components,
        async |topology, nodes| run(topology, nodes, samples).await,
    )
}

async fn call(
    http: &mut Http,
    node: &Node,
    method: &str,
    path: &str,
    body: String,
) -> anyhow::Result<Value> {
    let (status, reply) = http.call(method, path, body).await?;
    if status >= 300 {
        bail!(
            "{method} {path} at {}: {status} {}",
            node.edge,
            text(&reply)
        );
    }
    Ok(serde_json::from_slice(&reply).unwrap_or(Value::Null))
}

/// One user's data on one edge, through every channel.
async fn write_user(http: &mut Http, node: &Node, user: &str) -> anyhow::Result<()> {
    let sql = |sql: &str, params: Value| json!({"sql": sql, "params": params}).to_string();
    call(
        http,
        node,
        "POST",
        "/app/sql/execute",
        sql(
            "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, owner TEXT, body TEXT)",
            json!([]),
        ),
    )
    .await?;
    call(
        http,
        node,
        "POST",
        "/app/sql/execute",
        sql(
            "INSERT INTO notes (owner, body) VALUES (?, ?)",
            json!([user, "a note"]),
        ),
    )
    .await?;
    call(
        http,
        node,
        "PUT",
        &format!("/app/kv/user%2F{user}%2Fprofile"),
        "profile".into(),
    )
    .await?;
    let event = json!({"kind": "note", "key": "n", "payload": "an event", "user": user});
    call(http, node, "POST", "/app/edge/event", event.to_string()).await?;
    call(
        http,
        node,
        "PUT",
        &format!("/app/edge/prefs/{user}/color"),
        "blue".into(),
    )
    .await?;
    let activity = json!({"kind": "login", "attributes": {"display-name": user}});
    call(
        http,
        node,
        "POST",
        &format!("/app/edge/activity/{user}"),
        activity.to_string(),
    )
    .await?;
    call(
        http,
        node,
        "PUT",
        &format!("/st/map/profiles/{user}?scope=region"),
        "p".into(),
    )
    .await?;
    call(
        http,
        node,
        "POST",
        &format!("/st/set/online/{user}?scope=region"),
        String::new(),
    )
    .await?;
    call(
        http,
        node,
        "PUT",
        &format!("/cc/entry/u%2F{user}%2Fcard?scope=global"),
        "card".into(),
    )
    .await?;
    Ok(())
}

async fn run(topology: &Topology, nodes: &[Node], n: usize) -> anyhow::Result<()> {
    for node in nodes {
        wait_connected(node).await?;
    }
    let mut https: Vec<Http> = nodes.iter().map(Http::new).collect();
    let nyc = &nodes[0];
    eprintln!("== erasures: {n} samples (each after writing a fresh user's data on 3 edges)");
    let mut erase = Samples::default();
    let mut polls = 0u64;
    for i in 0..n + 1 {
        check_interrupted()?;
        let user = format!("user-{i}");
        for (node, http) in nodes.iter().zip(https.iter_mut()) {
            write_user(http, node, &user).await?;
        }
        let http = &mut https[0];
        let start = Instant::now();
        let id = call(
            http,
            nyc,
            "POST",
            &format!("/gdpr/erase/{user}"),
            String::new(),
        )
        .await?["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        loop {
            let v = call(
                http,
                nyc,
                "GET",
                &format!("/gdpr/erase-status/{id}"),
                String::new(),
            )
            .await?;
            polls += 1;
            match v["state"].as_str() {
                Some("completed") => break,
                Some("failed") => bail!("erasure {id} failed: {v}"),
                _ if start.elapsed() > SAMPLE_DEADLINE => {
                    bail!(
                        "erasure {id} not done within {SAMPLE_DEADLINE:?}: {v}\n{}",
                        nyc.log_text()
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        // The first erasure also creates buckets and warms caches.
        if i > 0 {
            erase.push(start.elapsed());
        }
    }
    if std::env::var_os("KEEL_BENCH_SHOW_LOG").is_some() {
        eprintln!("{}", nyc.log_text());
    }
    eprintln!("== baseline: raw NATS round trip nyc -> fra, {n} samples");
    let raw = raw_round_trip(topology, "nyc", "fra", "bench.erase.echo", n.max(100)).await?;

    let ms = |s: f64| format!("{:.1}", s * 1e3);
    println!(
        "| measurement (loopback, 3 regions x 1 edge, 1 nats-server per region; ms) | samples | p50 | p99 | mean | max | / raw round trip (p50) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| erasure across 3 regions: POST /gdpr/erase/<user> at nyc until GET /gdpr/erase-status shows completed (status polled every ms; {polls} polls in all) | {} | {} | {} | {} | {} | {:.0} |",
        erase.0.len(),
        ms(erase.quantile(0.5)),
        ms(erase.quantile(0.99)),
        ms(erase.mean()),
        ms(erase.max()),
        erase.quantile(0.5) / raw.quantile(0.5)
    );
    println!(
        "| baseline: raw NATS core request/reply nyc -> fra (us-east -> eu-central, echo) | {} | {} | {} | {} | {} | 1 |",
        raw.0.len(),
        ms(raw.quantile(0.5)),
        ms(raw.quantile(0.99)),
        ms(raw.mean()),
        ms(raw.max()),
    );
    Ok(())
}
