//! The strongly consistent ledger through guests, run by `benches/ledger.sh`
//! (numbers go to BENCHMARKS.md; nothing is asserted). A real loopback
//! topology: one region (east: e1 e2 e3) with a cluster of three
//! nats-servers, so the ledger stream `KEEL_EAST_LEDGER` has three replicas
//! as in production, and release `keel up` nodes on the three edges serving
//! ledger-probe at `/l/...` (`grants = ["ledger"]`). Load: many concurrent
//! keep-alive HTTP clients in this process (default 64), each issuing one
//! `POST /l/append?account=A&amount=1&key=K` (a unique key) after the
//! other, client `i` at node `i mod nodes`. A 503 (`unavailable`: the
//! append kept losing the compare-and-set) is retried with the same key, as
//! the interface says is safe; a sample is the time until the 200. Any
//! other answer is counted as a failure and reported with its message. The
//! baselines are measured in the same run on the same servers, with raw
//! async-nats JetStream as the coordinator edge's user, in a stream of the
//! benchmark's own (`BENCH_RAW`, `bench.raw.>`, three replicas placed on
//! the region like the ledger's):
//!
//! 1. hot account: every append to one account, clients spread over the
//!    three nodes (writers on three nodes race for the account's
//!    compare-and-set), then all clients at e1 only (one writer: pure group
//!    commit);
//! 2. 1,000 accounts: the same load, append `i` to account `i mod 1000`,
//!    clients over the three nodes, then all at e1;
//! 3. raw hot subject: publishes with expected-last-subject-sequence (and a
//!    `Nats-Msg-Id`, as the ledger's records carry) on one subject, one
//!    after the other (each needs the previous ack's sequence; a refusal
//!    although the subject's last sequence is the expected one is retried
//!    and counted);
//! 4. raw 1,000 subjects: as many tasks as clients, each owning its share
//!    of 1,000 subjects and publishing round-robin over them, each publish
//!    with its subject's expected last sequence;
//! 5. HTTP floor: `POST /l/append` without parameters (the guest answers
//!    400 without a ledger call) with the same clients over the three
//!    nodes, then all at e1: what HTTP and a guest instance cost at this
//!    concurrency.
//!
//! Every measurement runs a warm-up first (same pattern, not measured).
//! After each ledger measurement the balances are checked (their sum is
//! the acknowledged appends, plus at most the failed ones), the nodes'
//! `/metrics` give the records written (appends per record = the
//! batching), the compare-and-sets lost and the replays (retries of appends
//! that had been stored). At the end: the consumer limits of the ledger
//! stream and the account (a node's catch-up read after a lost
//! compare-and-set, or its first touch of an account, creates a JetStream
//! consumer).
//!
//! Usage: ledger-bench [appends] [clients]   (default 20000 64)
//! Env: `KEEL_BIN`, `KEEL_LEDGER_PROBE` (default
//! `components/target/wasm/ledger-probe.wasm`), `KEEL_LOG`,
//! `KEEL_NATS_SERVER` (see keel-test-support).

use anyhow::{Context, bail};
use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tier_bench::{
    Http, Node, Samples, Topology, check_interrupted, guest_wasm, run_bench_servers, samples_arg,
    text, wait_connected,
};

const REGIONS: [(&str, &[&str]); 1] = [("east", &["e1", "e2", "e3"])];
/// nats-servers in the region: the ledger stream gets three replicas.
const SERVERS: usize = 3;
const NODES: [&str; 3] = ["e1", "e2", "e3"];
const ACCOUNTS: usize = 1000;
/// Deadline for the ledger to accept its first append on every node (the
/// coordinator creates the stream at start).
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// Retries of one append answered 503 before the benchmark gives up.
const MAX_RETRIES: u32 = 50;
const RAW_STREAM: &str = "BENCH_RAW";
/// About one single-entry ledger record (`{"v":1,"id":"e1.<ms>.<n>",
/// "entries":[{"s":..,"a":1,"b":..,"k":"..","t":<ms>}]}`).
const RAW_PAYLOAD_BYTES: usize = 110;

fn main() -> anyhow::Result<()> {
    let appends = samples_arg("ledger-bench", 20_000)?;
    let clients: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse())
        .transpose()
        .context("usage: ledger-bench [appends] [clients]")?
        .unwrap_or(64);
    anyhow::ensure!(clients > 0, "clients must be at least 1");
    let wasm = guest_wasm("KEEL_LEDGER_PROBE", "ledger-probe")?;
    let components = format!(
        "[components.l]\nwasm = {:?}\nroute = \"/l/...\"\ngrants = [\"ledger\"]\n",
        wasm.display().to_string()
    );
    run_bench_servers(
        "ledger-bench",
        &REGIONS,
        SERVERS,
        false,
        &NODES,
        &components,
        async |topology, nodes| run(topology, nodes, appends, clients).await,
    )
}

/// One throughput measurement.
struct Load {
    /// Requests answered as wanted.
    ops: usize,
    elapsed: Duration,
    latency: Samples,
    /// 503s retried with the same key.
    retries: u64,
    /// 200s that said `replayed` (a retried append had been stored).
    replayed: u64,
    /// Requests that failed (another status, or 503 after
    /// [`MAX_RETRIES`] retries): by status and error case, the count and
    /// the first message.
    failed: BTreeMap<String, (u64, String)>,
}

impl Load {
    fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn failures(&self) -> u64 {
        self.failed.values().map(|(n, _)| n).sum()
    }

    fn fail(&mut self, status: u16, reply: &Bytes) {
        let body: serde_json::Value = serde_json::from_slice(reply).unwrap_or_default();
        let case = body["error"].as_str().unwrap_or("?");
        let message = body["message"]
            .as_str()
            .map_or_else(|| text(reply), str::to_owned);
        self.failed
            .entry(format!("{status} {case}"))
            .or_insert((0, message))
            .0 += 1;
    }

    fn absorb(&mut self, other: Load) {
        self.ops += other.ops;
        self.latency.0.extend(other.latency.0);
        self.retries += other.retries;
        self.replayed += other.replayed;
        for (k, (n, m)) in other.failed {
            self.failed.entry(k).or_insert((0, m)).0 += n;
        }
    }

    fn empty() -> Load {
        Load {
            ops: 0,
            elapsed: Duration::ZERO,
            latency: Samples::default(),
            retries: 0,
            replayed: 0,
            failed: BTreeMap::new(),
        }
    }
}

/// The ledger counters summed over the nodes.
#[derive(Clone, Copy, Default)]
struct LedgerCounters {
    appends: f64,
    records: f64,
    conflicts: f64,
    replays: f64,
}

impl std::ops::Sub for LedgerCounters {
    type Output = LedgerCounters;
    fn sub(self, o: LedgerCounters) -> LedgerCounters {
        LedgerCounters {
            appends: self.appends - o.appends,
            records: self.records - o.records,
            conflicts: self.conflicts - o.conflicts,
            replays: self.replays - o.replays,
        }
    }
}

async fn ledger_counters(nodes: &[Node]) -> anyhow::Result<LedgerCounters> {
    let mut sum = LedgerCounters::default();
    for node in nodes {
        let (status, body) = Http::new(node).call("GET", "/metrics", "").await?;
        anyhow::ensure!(status == 200, "GET /metrics at {}: {status}", node.edge);
        for line in text(&body).lines() {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            match name {
                "keel_ledger_appends_total" => sum.appends += value,
                "keel_ledger_records_total" => sum.records += value,
                "keel_ledger_conflicts_total" => sum.conflicts += value,
                "keel_ledger_replays_total" => sum.replays += value,
                _ => {}
            }
        }
    }
    Ok(sum)
}

/// `n` requests from `clients` concurrent keep-alive connections, client
/// `c` at `nodes[c mod len]`; request `i` is `path(i)` and should answer
/// `want` (503 is retried with the same path; other answers are counted as
/// failures).
async fn http_load(
    nodes: &[Node],
    clients: usize,
    n: usize,
    want: u16,
    path: PathFn,
) -> anyhow::Result<Load> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let mut http = Http::new(&nodes[c % nodes.len()]);
            let (next, path) = (next.clone(), path.clone());
            tokio::spawn(async move {
                let mut load = Load::empty();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    if i % 256 == 0 {
                        check_interrupted()?;
                    }
                    let path = path(i);
                    let sent = Instant::now();
                    let mut tries = 0;
                    loop {
                        let (status, reply) = http.call("POST", &path, "").await?;
                        if status == want {
                            if want == 200 && reply.windows(15).any(|w| w == b"\"replayed\":true") {
                                load.replayed += 1;
                            }
                            load.ops += 1;
                            load.latency.push(sent.elapsed());
                            break;
                        }
                        if status == 503 && tries < MAX_RETRIES {
                            tries += 1;
                            load.retries += 1;
                            continue;
                        }
                        load.fail(status, &reply);
                        break;
                    }
                }
                anyhow::Ok((load, http.reconnects))
            })
        })
        .collect();
    let mut load = Load::empty();
    let mut reconnects = 0;
    for t in tasks {
        let (l, r) = t.await.context("client task")??;
        load.absorb(l);
        reconnects += r;
    }
    load.elapsed = start.elapsed();
    if reconnects > 0 {
        eprintln!("   note: keep-alive connections reopened {reconnects} times");
    }
    for (k, (count, m)) in &load.failed {
        eprintln!("   {count} requests failed: {k}: {m}");
    }
    anyhow::ensure!(load.ops > 0, "every request failed: {:?}", load.failed);
    Ok(load)
}

type PathFn = Arc<dyn Fn(usize) -> String + Send + Sync>;

/// Append `i` of 1 to account `<tag>-<i mod accounts>`, key
/// `<key_tag>-<i>`.
fn append_path(tag: &str, key_tag: &str, accounts: usize) -> PathFn {
    let (tag, key_tag) = (tag.to_owned(), key_tag.to_owned());
    Arc::new(move |i| {
        format!(
            "/l/append?account={tag}-{}&amount=1&key={key_tag}-{i}",
            i % accounts
        )
    })
}

/// The sum of the balances of `tag`'s accounts.
async fn balances(node: &Node, tag: &str, accounts: usize) -> anyhow::Result<i64> {
    let mut http = Http::new(node);
    let mut sum = 0;
    for a in 0..accounts {
        let path = format!("/l/balance?account={tag}-{a}");
        let (status, reply) = http.call("GET", &path, "").await?;
        anyhow::ensure!(status == 200, "GET {path}: {status} {}", text(&reply));
        sum += text(&reply).trim().parse::<i64>().context("a balance")?;
    }
    Ok(sum)
}

struct LedgerRun {
    load: Load,
    counters: LedgerCounters,
    warm_failures: u64,
}

/// The ledger stream's `max_consumers`.
async fn ledger_max_consumers(js: &jetstream::Context) -> anyhow::Result<i32> {
    let name = keel_topology::ledger_stream_name(REGIONS[0].0);
    let mut stream = js
        .get_stream(&name)
        .await
        .with_context(|| format!("stream {name}"))?;
    let info = stream.info().await?;
    Ok(info.config.max_consumers)
}

/// A warm-up of `warm` appends, then `n` measured ones, to `accounts`
/// accounts of `tag`; checks the balances and takes the ledger counters of
/// the measured part.
async fn ledger_run(
    all: &[Node],
    nodes: &[Node],
    clients: usize,
    (warm, n): (usize, usize),
    tag: &str,
    accounts: usize,
) -> anyhow::Result<LedgerRun> {
    // The warm-up uses other keys on the same accounts: every node has
    // loaded the accounts' state when the measurement starts.
    let warm_path = append_path(tag, &format!("{tag}-warm"), accounts);
    let warmed = http_load(nodes, clients, warm, 200, warm_path).await?;
    let before = ledger_counters(all).await?;
    let path = append_path(tag, tag, accounts);
    let load = http_load(nodes, clients, n, 200, path).await?;
    let counters = ledger_counters(all).await? - before;
    // Every acknowledged append counts once; a failed one may or may not
    // have been stored.
    let sum = balances(&all[0], tag, accounts).await?;
    let acked = (warmed.ops + load.ops) as i64;
    let failed = (warmed.failures() + load.failures()) as i64;
    anyhow::ensure!(
        (acked..=acked + failed).contains(&sum),
        "{tag}: the balances add up to {sum}; {acked} appends were acknowledged, {failed} failed"
    );
    Ok(LedgerRun {
        load,
        counters,
        warm_failures: warmed.failures(),
    })
}

/// A connection as `edge`'s user to the region's first server.
async fn raw_js(topology: &Topology, edge: &str) -> anyhow::Result<jetstream::Context> {
    let c = topology.credentials(edge)?;
    let url = c.servers.first().context("east has a server")?.clone();
    let client = async_nats::ConnectOptions::with_user_and_password(c.user, c.password)
        .connect(url.as_str())
        .await
        .with_context(|| format!("connect as {edge} to {url}"))?;
    Ok(jetstream::new(client))
}

/// The compare-and-set was refused: "wrong last sequence" with details
/// (10071) or without (10164, which clustered streams answer too); keel-bus
/// maps both onto a conflict.
fn refused_cas(e: &jetstream::context::PublishError) -> bool {
    use jetstream::ErrorCode as C;
    e.kind() == PublishErrorKind::WrongLastSequence
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|api| {
                matches!(
                    api.error_code(),
                    C::STREAM_WRONG_LAST_SEQUENCE | C::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
                )
            })
}

/// Raw JetStream as the coordinator's user, on [`RAW_STREAM`].
#[derive(Clone)]
struct Raw {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    /// Compare-and-sets refused although the subject's last sequence (read
    /// right after) was the expected one: retried.
    spurious: Arc<AtomicUsize>,
}

impl Raw {
    /// Publishes `payload` to `subject` if its last message is at
    /// `expected`; the new message's sequence. A refusal is retried after
    /// reading the subject's last sequence, as a ledger writer would (only
    /// this task writes the subject, so it must be `expected`; counted).
    async fn cas_publish(
        &self,
        subject: &str,
        expected: u64,
        id: String,
        payload: Bytes,
    ) -> anyhow::Result<u64> {
        let mut expected = expected;
        for _ in 0..MAX_RETRIES {
            let msg = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(&id)
                .expected_last_subject_sequence(expected);
            let acked = self
                .js
                .send_publish(subject.to_string(), msg)
                .await
                .with_context(|| format!("publish to {subject}"))?
                .await;
            match acked {
                Ok(ack) => return Ok(ack.sequence),
                Err(e) if refused_cas(&e) => {
                    let last = match self.stream.get_last_raw_message_by_subject(subject).await {
                        Ok(m) => m.sequence,
                        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => 0,
                        Err(e) => return Err(e).context(format!("last message of {subject}")),
                    };
                    anyhow::ensure!(
                        last == expected,
                        "{subject}: the last sequence is {last}, not the {expected} of the last ack"
                    );
                    self.spurious.fetch_add(1, Ordering::Relaxed);
                    expected = last;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("ack of a publish to {subject} after {expected}")
                    });
                }
            }
        }
        bail!("{subject}: {MAX_RETRIES} compare-and-sets after {expected} refused")
    }
}

/// (3) `warm` + `n` compare-and-set publishes on one subject, one after
/// the other; the measured `n`.
async fn raw_hot(raw: &Raw, (warm, n): (usize, usize)) -> anyhow::Result<Load> {
    let payload = Bytes::from(vec![b'r'; RAW_PAYLOAD_BYTES]);
    let subject = "bench.raw.hot";
    let mut last = 0;
    let mut latency = Samples::default();
    let mut start = Instant::now();
    let refused = raw.spurious.load(Ordering::Relaxed);
    for i in 0..warm + n {
        if i % 256 == 0 {
            check_interrupted()?;
        }
        if i == warm {
            start = Instant::now();
        }
        let sent = Instant::now();
        last = raw
            .cas_publish(subject, last, format!("hot-{i}"), payload.clone())
            .await?;
        if i >= warm {
            latency.push(sent.elapsed());
        }
    }
    Ok(Load {
        ops: n,
        elapsed: start.elapsed(),
        latency,
        retries: (raw.spurious.load(Ordering::Relaxed) - refused) as u64,
        replayed: 0,
        failed: BTreeMap::new(),
    })
}

/// (4) `tasks` tasks, task `t` owning subjects `t, t + tasks, ...` of
/// [`ACCOUNTS`], publishing round-robin over them with their expected last
/// sequences, `n` publishes in all.
async fn raw_spread(raw: &Raw, tasks: usize, n: usize, tag: &'static str) -> anyhow::Result<Load> {
    let tasks = tasks.min(ACCOUNTS);
    let next = Arc::new(AtomicUsize::new(0));
    let payload = Bytes::from(vec![b'r'; RAW_PAYLOAD_BYTES]);
    let start = Instant::now();
    let refused = raw.spurious.load(Ordering::Relaxed);
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (raw, next, payload) = (raw.clone(), next.clone(), payload.clone());
            tokio::spawn(async move {
                let subjects: Vec<usize> = (t..ACCOUNTS).step_by(tasks).collect();
                let mut last = vec![0u64; subjects.len()];
                let mut latency = Samples::default();
                let mut round = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    if i % 256 == 0 {
                        check_interrupted()?;
                    }
                    let s = round % subjects.len();
                    round += 1;
                    let subject = format!("bench.raw.{tag}.{}", subjects[s]);
                    let sent = Instant::now();
                    last[s] = raw
                        .cas_publish(&subject, last[s], format!("{tag}-{i}"), payload.clone())
                        .await?;
                    latency.push(sent.elapsed());
                }
                anyhow::Ok(latency)
            })
        })
        .collect();
    let mut latency = Samples::default();
    for h in handles {
        latency.0.extend(h.await.context("publisher task")??.0);
    }
    Ok(Load {
        ops: n,
        elapsed: start.elapsed(),
        latency,
        retries: (raw.spurious.load(Ordering::Relaxed) - refused) as u64,
        replayed: 0,
        failed: BTreeMap::new(),
    })
}

/// Until an append succeeds on every node (the coordinator creates the
/// ledger stream at start; the others find it on first use).
async fn wait_ledger(nodes: &[Node]) -> anyhow::Result<()> {
    for node in nodes {
        wait_connected(node).await?;
    }
    for node in nodes {
        let mut http = Http::new(node);
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            check_interrupted()?;
            let path = format!("/l/append?account=ready&amount=1&key={}", node.edge);
            let (status, reply) = http.call("POST", &path, "").await?;
            if status == 200 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: the ledger took no append within {READY_DEADLINE:?}: {status} {}\n{}",
                    node.edge,
                    text(&reply),
                    node.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Creates `BENCH_RAW` as the coordinator (only its user may create
/// streams), three replicas on the region's cluster, and waits until a
/// publish is acknowledged (its leader is elected).
async fn raw_stream(js: &jetstream::Context) -> anyhow::Result<Raw> {
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: RAW_STREAM.into(),
            subjects: vec!["bench.raw.>".into()],
            num_replicas: SERVERS,
            duplicate_window: Duration::from_secs(120),
            storage: jetstream::stream::StorageType::File,
            allow_direct: true,
            placement: Some(jetstream::stream::Placement {
                cluster: Some(REGIONS[0].0.into()),
                tags: vec![format!("region:{}", REGIONS[0].0)],
            }),
            ..Default::default()
        })
        .await
        .context("create the raw stream")?;
    let raw = Raw {
        js: js.clone(),
        stream,
        spurious: Arc::default(),
    };
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        check_interrupted()?;
        match raw
            .cas_publish("bench.raw.ready", 0, "ready".into(), Bytes::new())
            .await
        {
            Ok(_) => return Ok(raw),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn run(topology: &Topology, nodes: &[Node], n: usize, clients: usize) -> anyhow::Result<()> {
    wait_ledger(nodes).await?;
    let warm = (n / 10).clamp(500, 2_000);
    eprintln!("== ledger stream ready on {} nodes", nodes.len());
    let js = raw_js(topology, NODES[0]).await?;
    let raw = raw_stream(&js).await?;

    eprintln!("== 1. hot account: {n} appends, {clients} clients over {NODES:?}");
    let hot = ledger_run(nodes, nodes, clients, (warm, n), "hot", 1).await?;
    eprintln!("== 1. hot account: {n} appends, {clients} clients at e1 only");
    let hot1 = ledger_run(nodes, &nodes[..1], clients, (warm, n), "hot1", 1).await?;
    eprintln!("== 2. {ACCOUNTS} accounts: {n} appends, {clients} clients over {NODES:?}");
    let spread = ledger_run(nodes, nodes, clients, (warm, n), "acct", ACCOUNTS).await?;
    eprintln!("== 2. {ACCOUNTS} accounts: {n} appends, {clients} clients at e1 only");
    let spread1 = ledger_run(nodes, &nodes[..1], clients, (warm, n), "acct1", ACCOUNTS).await?;
    eprintln!("== 3. raw hot subject: {n} sequential compare-and-set publishes");
    let raw_hot = raw_hot(&raw, (warm, n)).await?;
    eprintln!("== 4. raw {ACCOUNTS} subjects: {n} publishes from {clients} tasks");
    raw_spread(&raw, clients, warm, "warm").await?;
    let raw_spread = raw_spread(&raw, clients, n, "acct").await?;
    eprintln!("== 5. HTTP floor: {n} guest requests without a ledger call, {clients} clients");
    let no_call: PathFn = Arc::new(|_| "/l/append".to_string());
    http_load(nodes, clients, warm, 400, no_call.clone()).await?;
    let floor = http_load(nodes, clients, n, 400, no_call.clone()).await?;
    let floor1 = http_load(&nodes[..1], clients, n, 400, no_call).await?;

    let ms = |s: f64| format!("{:.1}", s * 1e3);
    let rate = |l: &Load| format!("{:.0}", l.per_second());
    println!(
        "| {n} operations, {clients} concurrent clients | per second | p50 (ms) | p99 (ms) | keel / raw |"
    );
    println!("|---|---:|---:|---:|---:|");
    let row = |label: &str, l: &Load, ratio: Option<f64>| {
        println!(
            "| {label} | {} | {} | {} | {} |",
            rate(l),
            ms(l.latency.quantile(0.5)),
            ms(l.latency.quantile(0.99)),
            ratio.map_or(String::new(), |r| format!("{r:.2}"))
        );
    };
    row(
        "keel: hot account, clients over e1, e2, e3",
        &hot.load,
        Some(hot.load.per_second() / raw_hot.per_second()),
    );
    row(
        "keel: hot account, all clients at e1",
        &hot1.load,
        Some(hot1.load.per_second() / raw_hot.per_second()),
    );
    row(
        "raw: one subject, sequential compare-and-set publishes",
        &raw_hot,
        None,
    );
    row(
        &format!("keel: {ACCOUNTS} accounts, clients over e1, e2, e3"),
        &spread.load,
        Some(spread.load.per_second() / raw_spread.per_second()),
    );
    row(
        &format!("keel: {ACCOUNTS} accounts, all clients at e1"),
        &spread1.load,
        Some(spread1.load.per_second() / raw_spread.per_second()),
    );
    row(
        &format!("raw: {ACCOUNTS} subjects, {clients} tasks, compare-and-set publishes"),
        &raw_spread,
        None,
    );
    row(
        "HTTP floor: the guest answers 400 without a ledger call, over e1, e2, e3",
        &floor,
        None,
    );
    row("HTTP floor: the same, all clients at e1", &floor1, None);
    println!();
    println!(
        "| ledger, measured part | appends | records | appends per record | conflicts (CAS lost) | replays | 503s retried | failed |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (label, r) in [
        ("hot account over 3 nodes", &hot),
        ("hot account at e1", &hot1),
        (&*format!("{ACCOUNTS} accounts over 3 nodes"), &spread),
        (&*format!("{ACCOUNTS} accounts at e1"), &spread1),
    ] {
        let c = r.counters;
        println!(
            "| {label} | {:.0} | {:.0} | {:.1} | {:.0} | {:.0} | {} | {} |",
            c.appends,
            c.records,
            c.appends / c.records.max(1.0),
            c.conflicts,
            c.replays,
            r.load.retries,
            r.load.failures()
        );
    }
    let stream_max = ledger_max_consumers(&js).await?;
    let account = js.query_account().await.context("account info")?;
    let tiers: Vec<String> = account
        .tiers
        .iter()
        .map(|(t, v)| {
            format!(
                "{t}: {} consumers, max {:?}",
                v.consumers, v.limits.max_consumers
            )
        })
        .collect();
    println!(
        "\nLimits: the ledger stream's max_consumers {stream_max}, the account's {:?} (None: unlimited); the account has {} consumers now ({}).",
        account.limits.max_consumers,
        account.consumers,
        tiers.join("; ")
    );
    println!();
    println!(
        "Target: >= 5,000 appends/s on one hot account: {} over 3 nodes, {} at one node.",
        rate(&hot.load),
        rate(&hot1.load)
    );
    for (label, l) in [("one subject", &raw_hot), ("1,000 subjects", &raw_spread)] {
        if l.retries > 0 {
            println!(
                "Raw ({label}): {} compare-and-sets refused although the subject's last sequence was the expected one (retried; the ledger counts such refusals as conflicts).",
                l.retries
            );
        }
    }
    let replayed: u64 = [&hot, &hot1, &spread, &spread1]
        .iter()
        .map(|r| r.load.replayed)
        .sum();
    if replayed > 0 {
        println!("{replayed} retried appends answered `replayed` (stored by an earlier try).");
    }
    for (label, r) in [
        ("hot account over 3 nodes", &hot),
        ("hot account at e1", &hot1),
        (&*format!("{ACCOUNTS} accounts over 3 nodes"), &spread),
        (&*format!("{ACCOUNTS} accounts at e1"), &spread1),
    ] {
        for (k, (count, m)) in &r.load.failed {
            println!("Failed ({label}): {count} x {k}: {m}");
        }
        if r.warm_failures > 0 {
            println!("Failed ({label}, warm-up): {}", r.warm_failures);
        }
    }
    Ok(())
}
