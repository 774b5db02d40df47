//! Load on the global chat, run by `benches/chat.sh` (numbers go to
//! BENCHMARKS.md): many simulated users on the demo topology for a bounded
//! time, then a check that no acknowledged message was lost or duplicated.
//!
//! The topology is `keel-demo`'s: 3 regions x 2 edges (us-east: nyc, bos;
//! eu-west: ams, lon; ap-south: bom, sin), one nats-server per region
//! joined by gateways, a `keel up` node on every edge serving the chat
//! (`components/chat`).
//!
//! 1. Sign-in: `USERS` users `u00000`.., user i homed on edge i % 6, each
//!    signed in on its edge (`POST /chat/signin`: registers it there, with
//!    PBKDF2 in wasm, and mints its token), `SIGNIN_CONCURRENCY` at a time
//!    per edge. Timed.
//! 2. Receivers: the first `WATCHED` users of every edge keep a live stream
//!    open on their edge (`/_keel/live/chat?channel=user/<u>&token=..`).
//! 3. Load, for `DURATION` seconds: `SENDERS` concurrent senders (sender k
//!    on edge k % 6, one keep-alive connection, one request at a time),
//!    each sending as a random user of its edge. Every 10th message goes
//!    to the room `load`; the others are direct messages, rotating over
//!    three classes: to a user of the same edge, of the other edge of the
//!    region, or of an edge of another region. Half of the direct messages
//!    go to a watched receiver of the chosen edge (so that latency has
//!    samples), the other half to any of its users. A 201 is an
//!    acknowledged message (its id is recorded); anything else, or no
//!    answer within 30 s, is a failed send (counted, not "lost").
//! 4. Delivery latency: for a direct message to a watched receiver, from
//!    the start of its POST to the arrival of its `dm` event on the
//!    receiver's stream (messages are matched by their text, `load <seq>`),
//!    per class. Live delivery is best effort: events that never arrive
//!    are counted, not failed.
//! 5. RSS of every keel process (VmRSS, split into anonymous and
//!    file-backed pages, and VmHWM from /proc) with every user signed in
//!    before the load, right after the load, and settled (after the check
//!    and a 6 s pause, past the node's 5 s malloc trim).
//! 6. Check: for every (recipient, sender) pair with acknowledged direct
//!    messages, the recipient reads the conversation on its own edge
//!    (`GET /chat/dm/<sender>/messages?after=..&limit=200`, paged), and
//!    every edge reads the room `load`, until every acknowledged id is
//!    there (polled; `CHECK_DEADLINE` seconds, default 60). An id still missing then is lost; an
//!    id listed twice is duplicated. The tool exits non-zero if either
//!    count is not zero (or nothing was acknowledged).
//!
//! Prints a markdown table to stdout (progress to stderr).
//!
//! Usage: chat-load [USERS] [DURATION_SECONDS]   (default 1200 users, 20 s;
//! also from the environment variables `USERS` and `DURATION`)
//! Env: `SENDERS` (64), `WATCHED` (receivers with a live stream per edge,
//! 10), `SIGNIN_CONCURRENCY` (sign-ins in flight per edge, 4),
//! `CHECK_DEADLINE` (seconds, 60; a debug build needs more), `KEEL_BIN`
//! (default `$CARGO_TARGET_DIR/release/keel`), `KEEL_CHAT_WASM` (default
//! `components/target/wasm/chat.wasm`), `KEEL_DEMO_JWT_SECRET` (set to a
//! development default if unset), `KEEL_LOG` (default `warn`),
//! `KEEL_NATS_SERVER`. Build first: `cargo build --release --workspace
//! --bins` and the chat guest (`make guests`); `benches/chat.sh` does the
//! former.

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, Empty};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tier_bench::{
    DEMO_EDGES, DEMO_REGIONS, Http, Node, Samples, chat_components, check_interrupted, run_bench,
    text, wait_connected,
};

/// Classes of direct messages, by where the recipient is homed.
const CLASSES: [&str; 3] = ["same edge", "cross-edge, same region", "cross-region"];
const ROOM: &str = "load";
const PASSWORD: &str = "load-test-password";
/// Deadline of one request (a send, a sign-in, a history page).
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Deadline for a live stream to say `ready`.
const LIVE_DEADLINE: Duration = Duration::from_secs(30);
/// History reads in flight during the check.
const CHECK_CONCURRENCY: usize = 24;

struct Config {
    users: usize,
    duration: Duration,
    senders: usize,
    watched: usize,
    signin_concurrency: usize,
    /// Deadline for every acknowledged message to be readable.
    check_deadline: Duration,
}

/// Positional argument `arg` if given, else `$env`, else `default`.
fn setting(arg: Option<usize>, env: &str, default: usize) -> anyhow::Result<usize> {
    let v = match arg.and_then(|a| std::env::args().nth(a)) {
        Some(a) => Some(a),
        None => std::env::var(env).ok(),
    };
    let n = match v {
        Some(v) => v.parse().with_context(|| {
            format!("{env}: {v:?} is not a count; usage: chat-load [USERS] [DURATION_SECONDS]")
        })?,
        None => default,
    };
    anyhow::ensure!(n > 0, "{env} must be at least 1");
    Ok(n)
}

fn env_setting(env: &str, default: usize) -> anyhow::Result<usize> {
    setting(None, env, default)
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os("KEEL_DEMO_JWT_SECRET").is_none() {
        // SAFETY: no other thread exists yet (the runtime starts later).
        unsafe {
            std::env::set_var(
                "KEEL_DEMO_JWT_SECRET",
                "chat-load-development-secret-not-for-production",
            )
        };
    }
    let config = Config {
        users: setting(Some(1), "USERS", 1200)?,
        duration: Duration::from_secs(setting(Some(2), "DURATION", 20)? as u64),
        senders: env_setting("SENDERS", 64)?,
        watched: env_setting("WATCHED", 10)?,
        signin_concurrency: env_setting("SIGNIN_CONCURRENCY", 4)?,
        check_deadline: Duration::from_secs(env_setting("CHECK_DEADLINE", 60)? as u64),
    };
    anyhow::ensure!(
        config.users >= 2 * DEMO_EDGES.len(),
        "USERS must be at least {} (two per edge)",
        2 * DEMO_EDGES.len()
    );
    let components = chat_components()?;
    run_bench(
        "chat-load",
        DEMO_REGIONS,
        false,
        DEMO_EDGES,
        &components,
        async |_topology, nodes| run(nodes, &config).await,
    )
}

/// A signed-in user.
struct User {
    id: String,
    edge: usize,
    token: String,
}

fn region_of(edge: usize) -> usize {
    edge / 2
}

/// splitmix64: reproducible, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// An acknowledged message.
struct Acked {
    seq: u64,
    id: String,
    from: usize,
    /// The recipient; `None` for a room message.
    to: Option<usize>,
    class: usize,
    sender_edge: usize,
}

#[derive(Default)]
struct SenderOutcome {
    acked: Vec<Acked>,
    /// POST round trip of acknowledged direct messages, per class.
    ack_latency: [Samples; 3],
    room_ack_latency: Samples,
    edge: usize,
    failures: u64,
    /// Failure descriptions -> count.
    errors: HashMap<String, u64>,
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn run(nodes: &[Node], config: &Config) -> anyhow::Result<()> {
    for node in nodes {
        wait_connected(node).await?;
    }
    let edges = nodes.len();

    // 1. Sign-in.
    eprintln!(
        "== sign-in: {} users on {edges} edges, {} per edge at a time",
        config.users, config.signin_concurrency
    );
    let start = Instant::now();
    let signins: Vec<anyhow::Result<(User, Duration)>> = futures::stream::iter(0..config.users)
        .map(|i| async move {
            check_interrupted()?;
            let edge = i % edges;
            let node = &nodes[edge];
            let id = format!("u{i:05}");
            let body = json!({"user": id, "password": PASSWORD}).to_string();
            let t = Instant::now();
            let mut http = Http::new(node);
            let (status, reply) =
                tokio::time::timeout(REQUEST_DEADLINE, http.call("POST", "/chat/signin", body))
                    .await
                    .with_context(|| format!("sign-in of {id} at {}: no answer", node.edge))??;
            let d = t.elapsed();
            if status != 200 {
                bail!(
                    "sign-in of {id} at {}: {status} {}",
                    node.edge,
                    text(&reply)
                );
            }
            let v: Value = serde_json::from_slice(&reply)?;
            let token = v["token"].as_str().context("a token")?.to_string();
            Ok((User { id, edge, token }, d))
        })
        .buffered(config.signin_concurrency * edges)
        .collect()
        .await;
    let mut users = Vec::new();
    let mut signin = Samples::default();
    for s in signins {
        let (u, d) = s?;
        users.push(u);
        signin.push(d);
    }
    let signin_total = start.elapsed();
    eprintln!(
        "   {} sign-ins in {:.1} s ({:.0}/s; each p50 {:.0} ms, p99 {:.0} ms)",
        users.len(),
        signin_total.as_secs_f64(),
        users.len() as f64 / signin_total.as_secs_f64(),
        signin.quantile(0.5) * 1e3,
        signin.quantile(0.99) * 1e3
    );
    let users = Arc::new(users);
    let by_edge: Arc<Vec<Vec<usize>>> = Arc::new(
        (0..edges)
            .map(|e| (0..users.len()).filter(|i| i % edges == e).collect())
            .collect(),
    );
    let watched: Vec<Vec<usize>> = by_edge
        .iter()
        .map(|list| list[..config.watched.min(list.len())].to_vec())
        .collect();

    // 2. Receivers' live streams.
    eprintln!("== live streams: {} receivers per edge", watched[0].len());
    type Arrival = (u64, usize, Instant);
    let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
    let mut streams = Vec::new();
    for (e, list) in watched.iter().enumerate() {
        for &u in list {
            let user = &users[u];
            let path = format!(
                "/_keel/live/chat?channel=user/{}&token={}",
                user.id, user.token
            );
            let mut sse = Sse::open(&nodes[e], &path)
                .await
                .with_context(|| format!("live stream of {} at {}", user.id, nodes[e].edge))?;
            match sse.next(LIVE_DEADLINE).await? {
                Some((name, _)) if name == "ready" => {}
                other => bail!("live stream of {}: first event {other:?}", user.id),
            }
            let arrivals = arrivals.clone();
            let me = user.id.clone();
            streams.push(tokio::spawn(async move {
                // Ends when aborted, or when the stream ends or breaks.
                while let Ok(Some((name, data))) = sse.next(Duration::from_secs(3600)).await {
                    let at = Instant::now();
                    if name != "dm" {
                        continue;
                    }
                    let v: Value = serde_json::from_str(&data).unwrap_or_default();
                    if v["to"].as_str() != Some(me.as_str()) {
                        continue;
                    }
                    let seq = v["text"]
                        .as_str()
                        .and_then(|t| t.strip_prefix("load "))
                        .and_then(|s| s.parse().ok());
                    if let Some(seq) = seq {
                        arrivals.lock().expect("not poisoned").push((seq, u, at));
                    }
                }
            }));
        }
    }

    // The chat loaded, every user signed in, nothing sent yet.
    let rss_before: Vec<Memory> = nodes.iter().map(|n| memory(n.pid())).collect();

    // 3. Load.
    eprintln!(
        "== load: {} senders for {:?} (1 in 10 to room {ROOM:?}, the rest direct messages in 3 classes)",
        config.senders, config.duration
    );
    let watched = Arc::new(watched);
    let starts: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let seq = Arc::new(AtomicU64::new(0));
    let load_start = Instant::now();
    let end = load_start + config.duration;
    let mut tasks = Vec::new();
    for k in 0..config.senders {
        let edge = k % edges;
        let mut http = Http::new(&nodes[edge]);
        let (users, by_edge, watched, starts, seq) = (
            users.clone(),
            by_edge.clone(),
            watched.clone(),
            starts.clone(),
            seq.clone(),
        );
        tasks.push(async move {
            let mut rng = Rng(k as u64 + 1);
            let mut out = SenderOutcome {
                edge,
                ..SenderOutcome::default()
            };
            let mut n = 0usize;
            while Instant::now() < end && check_interrupted().is_ok() {
                let s = seq.fetch_add(1, Ordering::Relaxed);
                let from = by_edge[edge][rng.below(by_edge[edge].len())];
                let room = n % 10 == 9;
                let class = (n - n / 10) % 3;
                n += 1;
                let (path, to) = if room {
                    (format!("/chat/rooms/{ROOM}/messages"), None)
                } else {
                    let target = match class {
                        0 => edge,
                        1 => edge ^ 1,
                        _ => {
                            let r = (region_of(edge) + 1 + rng.below(2)) % 3;
                            r * 2 + rng.below(2)
                        }
                    };
                    let pool = if rng.below(2) == 0 {
                        &watched[target]
                    } else {
                        &by_edge[target]
                    };
                    let mut to = pool[rng.below(pool.len())];
                    while to == from {
                        to = by_edge[target][rng.below(by_edge[target].len())];
                    }
                    (format!("/chat/dm/{}/messages", users[to].id), Some(to))
                };
                let body = json!({"text": format!("load {s}")}).to_string();
                let auth = bearer(&users[from].token);
                let t = Instant::now();
                if to.is_some() {
                    starts.lock().expect("not poisoned").insert(s, t);
                }
                let reply = tokio::time::timeout(
                    REQUEST_DEADLINE,
                    http.call_with("POST", &path, &[("authorization", &auth)], body),
                )
                .await;
                let d = t.elapsed();
                let failure = match reply {
                    Err(_) => {
                        // The connection may be mid-request: a fresh one.
                        http = Http::new(&nodes[edge]);
                        "no answer within 30 s".to_string()
                    }
                    Ok(Err(e)) => format!("{e:#}"),
                    Ok(Ok((201, body))) => {
                        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                        match v["id"].as_str() {
                            Some(id) => {
                                if to.is_some() {
                                    out.ack_latency[class].push(d);
                                } else {
                                    out.room_ack_latency.push(d);
                                }
                                out.acked.push(Acked {
                                    seq: s,
                                    id: id.to_string(),
                                    from,
                                    to,
                                    class,
                                    sender_edge: edge,
                                });
                                continue;
                            }
                            None => format!("201 without an id: {}", text(&body)),
                        }
                    }
                    Ok(Ok((status, body))) => {
                        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                        match v["error"].as_str() {
                            Some(case) => format!("{status} {case}"),
                            None => format!(
                                "{status} {}",
                                text(&body).chars().take(80).collect::<String>()
                            ),
                        }
                    }
                };
                out.failures += 1;
                *out.errors.entry(failure).or_default() += 1;
            }
            out
        });
    }
    let outcomes = futures::future::join_all(tasks).await;
    let elapsed = load_start.elapsed();
    check_interrupted()?;

    // 5. RSS right after the load.
    let rss: Vec<Memory> = nodes.iter().map(|n| memory(n.pid())).collect();

    let mut acked = Vec::new();
    let mut ack_latency: [Samples; 3] = Default::default();
    let mut room_ack_latency = Samples::default();
    let mut failures = 0;
    let mut failures_by_edge = vec![0u64; edges];
    let mut errors: HashMap<String, u64> = HashMap::new();
    for o in outcomes {
        acked.extend(o.acked);
        for (all, s) in ack_latency.iter_mut().zip(o.ack_latency) {
            all.0.extend(s.0);
        }
        room_ack_latency.0.extend(o.room_ack_latency.0);
        failures += o.failures;
        failures_by_edge[o.edge] += o.failures;
        for (k, v) in o.errors {
            *errors.entry(k).or_default() += v;
        }
    }
    eprintln!(
        "   {} acknowledged, {failures} failed in {:.1} s",
        acked.len(),
        elapsed.as_secs_f64()
    );
    for (e, n) in &errors {
        eprintln!("   failed: {n} x {e}");
    }
    anyhow::ensure!(!acked.is_empty(), "no message was acknowledged");

    // 6. Check.
    eprintln!(
        "== check: every acknowledged message readable, once (deadline {:?})",
        config.check_deadline
    );
    let check = Check::run(nodes, &users, &acked, config.check_deadline).await?;
    // Settled: the backlog delivered and read, the periodic malloc trim run.
    // A measurement point, not synchronisation: the node trims every 5 s on
    // its own timer and exposes no signal to wait for, so the reading is
    // taken once a full trim interval (plus a second) has surely passed.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss_settled: Vec<Memory> = nodes.iter().map(|n| memory(n.pid())).collect();

    // Stop the streams only now: late live events still count.
    for s in &streams {
        s.abort();
    }
    let starts = starts.lock().expect("not poisoned").clone();
    let arrivals = arrivals.lock().expect("not poisoned").clone();
    let by_seq: HashMap<u64, &Acked> = acked.iter().map(|a| (a.seq, a)).collect();
    let mut latency: [Samples; 3] = Default::default();
    let mut seen = HashSet::new();
    let mut live_duplicates = 0u64;
    for (s, u, at) in arrivals {
        let Some(a) = by_seq.get(&s) else { continue };
        if a.to != Some(u) {
            continue;
        }
        if !seen.insert(s) {
            live_duplicates += 1;
            continue;
        }
        if let Some(t) = starts.get(&s) {
            latency[a.class].push(at.saturating_duration_since(*t));
        }
    }
    let watched_set: HashSet<usize> = watched.iter().flatten().copied().collect();
    let live_expected: [usize; 3] = std::array::from_fn(|c| {
        acked
            .iter()
            .filter(|a| a.class == c && a.to.is_some_and(|t| watched_set.contains(&t)))
            .count()
    });

    // The table.
    let ms = |s: f64| format!("{:.1}", s * 1e3);
    let stats = |s: &Samples| {
        if s.0.is_empty() {
            "0 | - | - | - | -".to_string()
        } else {
            format!(
                "{} | {} | {} | {} | {}",
                s.0.len(),
                ms(s.quantile(0.5)),
                ms(s.quantile(0.99)),
                ms(s.mean()),
                ms(s.max())
            )
        }
    };
    let secs = elapsed.as_secs_f64();
    println!(
        "\nchat load: {} users on 3 regions x 2 edges (1 nats-server per region, loopback), {} senders for {:.1} s, {} live receivers per edge\n",
        users.len(),
        config.senders,
        secs,
        watched[0].len()
    );
    println!("| measurement (ms) | samples | p50 | p99 | mean | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| sign-in (`POST /chat/signin`, registers: PBKDF2 in wasm; {} in flight per edge; all {} in {:.1} s) | {} |",
        config.signin_concurrency,
        users.len(),
        signin_total.as_secs_f64(),
        stats(&signin)
    );
    for (c, name) in CLASSES.iter().enumerate() {
        println!(
            "| DM delivery {name}: POST start -> `dm` event on the recipient's live stream ({} of {} arrived) | {} |",
            latency[c].0.len(),
            live_expected[c],
            stats(&latency[c])
        );
    }
    for (c, name) in CLASSES.iter().enumerate() {
        println!(
            "| DM send {name}: POST -> 201 | {} |",
            stats(&ack_latency[c])
        );
    }
    println!(
        "| room message send: POST -> 201 | {} |",
        stats(&room_ack_latency)
    );
    println!(
        "\n| edge | region | acknowledged sends | messages/s | failed sends | RSS before the load (MB) | RSS after the load (MB) | of it anonymous / file (MB) | RSS settled (MB) | peak RSS (MB) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (e, node) in nodes.iter().enumerate() {
        let sent = acked.iter().filter(|a| a.sender_edge == e).count();
        let region = DEMO_REGIONS[region_of(e)].0;
        println!(
            "| {} | {region} | {sent} | {:.0} | {} | {:.1} | {:.1} | {:.1} / {:.1} | {:.1} | {:.1} |",
            node.edge,
            sent as f64 / secs,
            failures_by_edge[e],
            mb(rss_before[e].rss),
            mb(rss[e].rss),
            mb(rss[e].anonymous),
            mb(rss[e].file),
            mb(rss_settled[e].rss),
            mb(rss_settled[e].peak)
        );
    }
    println!(
        "| all | | {} | {:.0} | {failures} | | | | | |",
        acked.len(),
        acked.len() as f64 / secs
    );
    let dms = acked.iter().filter(|a| a.to.is_some()).count();
    println!(
        "\n| check | count |\n|---|---:|\n| acknowledged direct messages | {dms} |\n| acknowledged room messages (checked on all {edges} edges) | {} |\n| (recipient, sender) conversations read | {} |\n| history pages read | {} |\n| time until all readable (s) | {:.1} |\n| lost | {} |\n| duplicated | {} |\n| duplicated live events | {live_duplicates} |",
        acked.len() - dms,
        check.conversations,
        check.pages,
        check.elapsed.as_secs_f64(),
        check.lost,
        check.duplicated
    );
    if check.lost > 0 || check.duplicated > 0 {
        for l in check.examples.iter().take(10) {
            eprintln!("   {l}");
        }
        bail!(
            "{} lost and {} duplicated of {} acknowledged messages",
            check.lost,
            check.duplicated,
            acked.len()
        );
    }
    Ok(())
}

/// A process's memory from /proc, in kB (0 if unreadable).
struct Memory {
    rss: u64,
    anonymous: u64,
    file: u64,
    peak: u64,
}

fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss: field("VmRSS:"),
        anonymous: field("RssAnon:"),
        file: field("RssFile:"),
        peak: field("VmHWM:"),
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The outcome of the check.
struct Check {
    conversations: usize,
    pages: u64,
    lost: usize,
    duplicated: usize,
    elapsed: Duration,
    examples: Vec<String>,
}

/// One history to read until it holds `expected`.
struct Conversation {
    /// Reader's edge and token.
    edge: usize,
    token: String,
    path: String,
    label: String,
    expected: HashSet<String>,
}

impl Check {
    async fn run(
        nodes: &[Node],
        users: &[User],
        acked: &[Acked],
        deadline: Duration,
    ) -> anyhow::Result<Check> {
        let mut pairs: HashMap<(usize, usize), HashSet<String>> = HashMap::new();
        let mut room = HashSet::new();
        for a in acked {
            match a.to {
                Some(to) => {
                    pairs.entry((to, a.from)).or_default().insert(a.id.clone());
                }
                None => {
                    room.insert(a.id.clone());
                }
            }
        }
        let mut pending: Vec<Conversation> = pairs
            .into_iter()
            .map(|((to, from), expected)| Conversation {
                edge: users[to].edge,
                token: users[to].token.clone(),
                path: format!("/chat/dm/{}/messages", users[from].id),
                label: format!("{} <- {}", users[to].id, users[from].id),
                expected,
            })
            .collect();
        let conversations = pending.len();
        if !room.is_empty() {
            for (e, node) in nodes.iter().enumerate() {
                let reader = users.iter().find(|u| u.edge == e).context("a user")?;
                pending.push(Conversation {
                    edge: e,
                    token: reader.token.clone(),
                    path: format!("/chat/rooms/{ROOM}/messages"),
                    label: format!("room {ROOM} at {}", node.edge),
                    expected: room.clone(),
                });
            }
        }
        let pages = AtomicU64::new(0);
        let start = Instant::now();
        let mut duplicated = 0;
        let mut examples = Vec::new();
        let mut round = 0;
        loop {
            check_interrupted()?;
            round += 1;
            let pages = &pages;
            let reads: Vec<(Conversation, anyhow::Result<Vec<String>>)> =
                futures::stream::iter(pending)
                    .map(|c| async move {
                        let ids = read_all(&nodes[c.edge], &c, pages).await;
                        (c, ids)
                    })
                    .buffer_unordered(CHECK_CONCURRENCY)
                    .collect()
                    .await;
            pending = Vec::new();
            let mut missing = 0;
            let mut errors = 0;
            for (c, ids) in reads {
                let ids = match ids {
                    Ok(ids) => ids,
                    Err(e) => {
                        errors += 1;
                        if errors <= 3 {
                            eprintln!("   read of {} failed: {e:#}", c.label);
                        }
                        pending.push(c);
                        continue;
                    }
                };
                let mut count: HashMap<&str, usize> = HashMap::new();
                for id in &ids {
                    *count.entry(id).or_default() += 1;
                }
                let lacking = c
                    .expected
                    .iter()
                    .filter(|id| !count.contains_key(id.as_str()))
                    .count();
                if lacking == 0 {
                    for (id, n) in count {
                        if n > 1 && c.expected.contains(id) {
                            duplicated += n - 1;
                            examples.push(format!("{}: {id} listed {n} times", c.label));
                        }
                    }
                } else {
                    missing += lacking;
                    pending.push(c);
                }
            }
            if pending.is_empty() {
                break;
            }
            if start.elapsed() > deadline {
                let mut lost = 0;
                for c in &pending {
                    let ids = read_all(&nodes[c.edge], c, pages).await.unwrap_or_default();
                    let have: HashSet<&String> = ids.iter().collect();
                    for id in c.expected.iter().filter(|id| !have.contains(id)) {
                        lost += 1;
                        examples.push(format!("{}: {id} missing", c.label));
                    }
                }
                return Ok(Check {
                    conversations,
                    pages: pages.load(Ordering::Relaxed),
                    lost,
                    duplicated,
                    elapsed: start.elapsed(),
                    examples,
                });
            }
            eprintln!(
                "   round {round}: {} histories incomplete ({missing} ids missing, {errors} reads failed); again",
                pending.len()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(Check {
            conversations,
            pages: pages.load(Ordering::Relaxed),
            lost: 0,
            duplicated,
            elapsed: start.elapsed(),
            examples,
        })
    }
}

/// Every message id of a history, oldest first, paging with `after=`.
async fn read_all(node: &Node, c: &Conversation, pages: &AtomicU64) -> anyhow::Result<Vec<String>> {
    let mut http = Http::new(node);
    let auth = bearer(&c.token);
    // Below every id (ids start with a zero-padded time).
    let mut after = "0".to_string();
    let mut ids = Vec::new();
    loop {
        let path = format!("{}?after={after}&limit=200", c.path);
        let (status, body) = tokio::time::timeout(
            REQUEST_DEADLINE,
            http.call_with("GET", &path, &[("authorization", &auth)], ""),
        )
        .await
        .with_context(|| format!("GET {path}: no answer"))??;
        pages.fetch_add(1, Ordering::Relaxed);
        if status != 200 {
            bail!("GET {path} at {}: {status} {}", node.edge, text(&body));
        }
        let v: Value = serde_json::from_slice(&body)?;
        let page = v["messages"].as_array().context("messages")?;
        for m in page {
            ids.push(m["id"].as_str().context("an id")?.to_string());
        }
        match (v["more"].as_bool(), ids.last()) {
            (Some(true), Some(last)) if !page.is_empty() => after = last.clone(),
            _ => return Ok(ids),
        }
    }
}

/// A server-sent events stream (one connection).
struct Sse {
    body: hyper::body::Incoming,
    buf: String,
}

impl Sse {
    async fn open(node: &Node, path: &str) -> anyhow::Result<Sse> {
        let stream = tokio::net::TcpStream::connect(node.addr).await?;
        stream.set_nodelay(true)?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .uri(path)
            .header("host", node.addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        if resp.status() != 200 {
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            bail!("{status} {}", text(&body));
        }
        Ok(Sse {
            body: resp.into_body(),
            buf: String::new(),
        })
    }

    /// The next event as (name, data); `None` when the stream ended.
    async fn next(&mut self, within: Duration) -> anyhow::Result<Option<(String, String)>> {
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
                    return Ok(Some((name, data.join("\n"))));
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.body.frame()).await {
                Err(_) => bail!("no live event within {within:?}"),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => bail!("live stream broke: {e}"),
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.push_str(&String::from_utf8_lossy(&d));
                    }
                }
            }
        }
    }
}
