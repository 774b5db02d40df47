//! The hierarchical cache through guests, run by `benches/cache.sh` (numbers
//! go to BENCHMARKS.md; nothing is asserted). A real loopback topology: 2
//! regions x 3 edges (east: e1 e2 e3; west: w1 w2 w3), one nats-server per
//! region, every gateway link through a fault proxy, release `keel up`
//! nodes on all six edges serving cache-probe at `/c/...`. Baselines are
//! measured in the same run:
//!
//! 1. L1 hit through a guest: `POST /c/bench/get?n=N&key=hot` at e1 (N
//!    `cache.get` in one instance) minus the same request with `n=0`,
//!    divided by N; vs a raw `moka::sync::Cache` get in this process (and
//!    keel-cache's own L1 hit without a guest, for the host share).
//! 2. L2 hit: keys set at region scope at e1, read once each at e2 (an L1
//!    miss and an L2 hit): in one instance (`/c/bench/get-each`, mean per
//!    call) and one HTTP request per key (p50/p99, and the HTTP floor of an
//!    L1-hit request); vs a raw async-nats JetStream KV get of the same
//!    entries with e2's credentials on the east server.
//! 3. Invalidation propagation: a key in L1 on all six nodes (edge scope),
//!    `DELETE /c/entry/<key>?scope=global` at e1, then every node polled
//!    until it misses; per sample the time until the last node missed,
//!    from the call's start and from its return. Without delay, then with
//!    30 ms one-way latency on the gateway links.
//!
//! Usage: cache-bench [samples]   (default 200)
//! Env: `KEEL_BIN`, `KEEL_CACHE_PROBE` (default
//! `components/target/wasm/cache-probe.wasm`), `KEEL_LOG`,
//! `KEEL_NATS_SERVER` (see keel-test-support).

use anyhow::{Context, bail};
use bytes::Bytes;
use keel_store::Namespace;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tier_bench::{
    Http, Node, Samples, Topology, check_interrupted, guest_wasm, run_bench, samples_arg, text,
    wait_connected,
};

const REGIONS: [(&str, &[&str]); 2] =
    [("east", &["e1", "e2", "e3"]), ("west", &["w1", "w2", "w3"])];
const NODES: [&str; 6] = ["e1", "e2", "e3", "w1", "w2", "w3"];
/// Deadline for an invalidation to reach every node.
const PROPAGATION_DEADLINE: Duration = Duration::from_secs(30);
/// The injected one-way latency between regions.
const GATEWAY_DELAY: Duration = Duration::from_millis(30);
/// `cache.get` calls per in-guest loop.
const LOOP_CALLS: u64 = 20_000;
/// Repetitions of each in-guest loop (the median is kept).
const LOOP_REPEATS: usize = 15;
/// Bytes of every cached value.
const VALUE_BYTES: usize = 100;

fn main() -> anyhow::Result<()> {
    let samples = samples_arg("cache-bench", 200)?;
    let wasm = guest_wasm("KEEL_CACHE_PROBE", "cache-probe")?;
    let components = format!(
        "[components.c]\nwasm = {:?}\nroute = \"/c/...\"\ngrants = [\"cache\"]\n",
        wasm.display().to_string()
    );
    run_bench(
        "cache-bench",
        &REGIONS,
        true,
        &NODES,
        &components,
        async |topology, nodes| run(topology, nodes, samples).await,
    )
}

/// One request that must answer `want`; its duration.
async fn expect(
    node: &Node,
    http: &mut Http,
    method: &str,
    path: &str,
    body: impl Into<Bytes>,
    want: u16,
) -> anyhow::Result<(Duration, Bytes)> {
    let start = Instant::now();
    let (status, reply) = http.call(method, path, body).await?;
    let d = start.elapsed();
    if status != want {
        bail!(
            "{method} {path} at {}: {status} {} (wanted {want})\n{}",
            node.edge,
            text(&reply),
            node.log_text()
        );
    }
    Ok((d, reply))
}

fn value() -> Bytes {
    Bytes::from(vec![b'v'; VALUE_BYTES])
}

/// Median duration of `POST path` over [`LOOP_REPEATS`] runs.
async fn loop_median(node: &Node, http: &mut Http, path: &str) -> anyhow::Result<Duration> {
    let mut runs = Vec::new();
    for _ in 0..LOOP_REPEATS {
        check_interrupted()?;
        runs.push(expect(node, http, "POST", path, "", 200).await?.0);
    }
    runs.sort();
    Ok(runs[runs.len() / 2])
}

/// (1) Per-call cost of an L1 hit through the guest.
async fn l1_through_guest(e1: &Node, http: &mut Http) -> anyhow::Result<f64> {
    expect(e1, http, "PUT", "/c/entry/hot?scope=edge", value(), 204).await?;
    // Warm the instance pool and the code.
    loop_median(e1, http, &format!("/c/bench/get?n={LOOP_CALLS}&key=hot")).await?;
    let empty = loop_median(e1, http, "/c/bench/get?n=0&key=hot").await?;
    let full = loop_median(e1, http, &format!("/c/bench/get?n={LOOP_CALLS}&key=hot")).await?;
    Ok(full.saturating_sub(empty).as_secs_f64() / LOOP_CALLS as f64)
}

/// (1) Baselines in this process: a raw moka get, and keel-cache's L1 hit.
async fn l1_in_process() -> anyhow::Result<(f64, f64)> {
    let n = 2_000_000u64;
    let raw: moka::sync::Cache<(String, String), Arc<[u8]>> =
        moka::sync::Cache::builder().max_capacity(64 << 20).build();
    raw.insert(("c".into(), "hot".into()), Arc::from(&value()[..]));
    let key = ("c".to_string(), "hot".to_string());
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box(raw.get(std::hint::black_box(&key)));
    }
    let moka_get = start.elapsed().as_secs_f64() / n as f64;

    let bus: Arc<dyn keel_bus::Bus> = Arc::new(keel_bus::local::LocalBus::new());
    let kv = |bucket: &str| keel_bus::KvSpec {
        bucket: bucket.into(),
        history: 1,
        max_age: None,
        replicas: 1,
        placement: None,
    };
    let cache = keel_cache::TieredCache::new(
        keel_cache::CacheOptions {
            region: "bench".into(),
            edge: "bench".into(),
            l1_max_bytes: 64 << 20,
            default_ttls: keel_cache::DEFAULT_TTLS,
            max_ttl: Duration::from_secs(3600),
            max_key_bytes: 512,
            max_value_bytes: 1 << 20,
            region_bucket: Some(kv("L2")),
            global_bucket: kv("L3"),
            personal_keys: Default::default(),
        },
        bus.clone(),
        bus,
        keel_telemetry::CacheMetrics::default(),
    );
    let ns = Namespace::new("c").context("namespace")?;
    cache
        .set(&ns, "hot", value().to_vec(), None, keel_cache::Scope::Edge)
        .await?;
    let n = 500_000u64;
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box(cache.get(&ns, "hot", None).await?);
    }
    let keel_l1 = start.elapsed().as_secs_f64() / n as f64;
    Ok((moka_get, keel_l1))
}

struct L2Results {
    in_guest_mean: f64,
    per_request: Samples,
    floor: Samples,
    raw: Samples,
}

/// (2) L2 hits at e2 of keys e1 set at region scope, and the raw KV gets.
async fn l2_hits(
    topology: &Topology,
    (e1, e2): (&Node, &Node),
    (a, b): (&mut Http, &mut Http),
    n: usize,
) -> anyhow::Result<L2Results> {
    eprintln!("   setting {} keys at region scope at e1", 2 * n + 1000);
    for prefix in ["l2a-", "l2b-"] {
        for i in 0..n {
            check_interrupted()?;
            let path = format!("/c/entry/{prefix}{i}?scope=region");
            expect(e1, a, "PUT", &path, value(), 204).await?;
        }
    }
    for i in 0..1000 {
        let path = format!("/c/entry/l2c-{i}?scope=region");
        expect(e1, a, "PUT", &path, value(), 204).await?;
    }
    // In one instance: 1000 L2 hits.
    let (d, reply) = expect(
        e2,
        b,
        "POST",
        "/c/bench/get-each?n=1000&prefix=l2c-",
        "",
        200,
    )
    .await?;
    anyhow::ensure!(
        &reply[..] == b"1000",
        "not every key was in L2: {}",
        text(&reply)
    );
    let in_guest_mean = d.as_secs_f64() / 1000.0;
    // One request per key (l2a- warms up connections and code paths).
    let mut per_request = Samples::default();
    for prefix in ["l2a-", "l2b-"] {
        for i in 0..n {
            check_interrupted()?;
            let path = format!("/c/entry/{prefix}{i}");
            let (d, _) = expect(e2, b, "GET", &path, "", 200).await?;
            if prefix == "l2b-" {
                per_request.push(d);
            }
        }
    }
    let mut floor = Samples::default();
    for i in 0..n {
        let (d, _) = expect(e2, b, "GET", &format!("/c/entry/l2b-{i}"), "", 200).await?;
        floor.push(d);
    }
    // Raw: the same entries straight from the bucket, as e2's user.
    let c = topology.credentials("e2")?;
    let url = c.servers.first().context("east has a server")?.clone();
    let client = async_nats::ConnectOptions::with_user_and_password(c.user, c.password)
        .connect(url.as_str())
        .await
        .with_context(|| format!("connect as e2 to {url}"))?;
    let js = async_nats::jetstream::new(client);
    let store = js
        .get_key_value(keel_topology::cache_bucket_name("east"))
        .await
        .context("the east cache bucket")?;
    let ns = Namespace::new("c").context("namespace")?;
    let mut raw = Samples::default();
    for prefix in ["l2a-", "l2b-"] {
        for i in 0..n {
            check_interrupted()?;
            let key = keel_cache::TieredCache::tier_key(&ns, &format!("{prefix}{i}"));
            let start = Instant::now();
            let got = store.get(&key).await?;
            let d = start.elapsed();
            anyhow::ensure!(got.is_some(), "raw get of {key}: missing");
            if prefix == "l2b-" {
                raw.push(d);
            }
        }
    }
    Ok(L2Results {
        in_guest_mean,
        per_request,
        floor,
        raw,
    })
}

struct Propagation {
    /// Until the last of the six nodes stopped serving the key (the send
    /// time of its first GET that missed: every GET sent later misses and
    /// the previous one, one L1-hit round trip earlier, still hit), from
    /// the call's start.
    from_call: Samples,
    /// The same, from the call's return.
    from_return: Samples,
    /// Until the last node's first missing GET was answered (it looked in
    /// L2 and L3 too: L3 may be in the other region), from the return.
    answered: Samples,
    /// The invalidate call itself at e1.
    call: Samples,
    /// Per node (first region's nodes, then the other's), from the return.
    per_node: Vec<Samples>,
}

/// (3) `n` global invalidations at e1 of a key every node holds in L1.
async fn propagation(
    nodes: &[Node],
    https: &mut [Http],
    tag: &str,
    n: usize,
) -> anyhow::Result<Propagation> {
    let mut out = Propagation {
        from_call: Samples::default(),
        from_return: Samples::default(),
        answered: Samples::default(),
        call: Samples::default(),
        per_node: (0..nodes.len()).map(|_| Samples::default()).collect(),
    };
    for i in 0..n {
        check_interrupted()?;
        let key = format!("inv-{tag}-{i}");
        for (node, http) in nodes.iter().zip(https.iter_mut()) {
            let path = format!("/c/entry/{key}?scope=edge");
            expect(node, http, "PUT", &path, value(), 204).await?;
        }
        let start = Instant::now();
        let path = format!("/c/entry/{key}?scope=global");
        let (call, _) = expect(&nodes[0], &mut https[0], "DELETE", &path, "", 204).await?;
        let returned = start + call;
        let get = format!("/c/entry/{key}");
        let polls = nodes.iter().zip(https.iter_mut()).map(|(node, http)| {
            let (get, key) = (get.clone(), key.clone());
            async move {
                loop {
                    let sent = Instant::now();
                    let (status, reply) = http.call("GET", &get, "").await?;
                    match status {
                        404 => return anyhow::Ok((sent, Instant::now())),
                        200 => {}
                        s => bail!("GET {get} at {}: {s} {}", node.edge, text(&reply)),
                    }
                    if start.elapsed() > PROPAGATION_DEADLINE {
                        bail!(
                            "{} still serves {key} {PROPAGATION_DEADLINE:?} after the invalidation\n{}",
                            node.edge,
                            node.log_text()
                        );
                    }
                }
            }
        });
        let missed = futures::future::try_join_all(polls).await?;
        let last = missed.iter().map(|m| m.0).max().unwrap_or(returned);
        let answered = missed.iter().map(|m| m.1).max().unwrap_or(returned);
        out.call.push(call);
        out.from_call.push(last - start);
        out.from_return
            .push(last.saturating_duration_since(returned));
        out.answered
            .push(answered.saturating_duration_since(returned));
        for (s, (sent, _)) in out.per_node.iter_mut().zip(&missed) {
            s.push(sent.saturating_duration_since(returned));
        }
    }
    Ok(out)
}

async fn run(topology: &Topology, nodes: &[Node], n: usize) -> anyhow::Result<()> {
    for node in nodes {
        wait_connected(node).await?;
    }
    let mut https: Vec<Http> = nodes.iter().map(Http::new).collect();
    // Both levels exist once a global write succeeds everywhere (edges
    // other than the coordinator wait for its region bucket).
    for (i, (node, http)) in nodes.iter().zip(https.iter_mut()).enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            check_interrupted()?;
            let path = format!("/c/entry/warm-{i}?scope=global");
            let (status, reply) = http.call("PUT", &path, value()).await?;
            if status == 204 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: cache levels not ready: {status} {}",
                    node.edge,
                    text(&reply)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    eprintln!(
        "== 1. L1 hit: {LOOP_REPEATS} x {LOOP_CALLS} calls in one instance, and in-process baselines"
    );
    let guest_l1 = l1_through_guest(&nodes[0], &mut https[0]).await?;
    let (moka_get, keel_l1) = l1_in_process().await?;

    eprintln!("== 2. L2 hit at e2: {n} keys");
    let (left, right) = https.split_at_mut(1);
    let l2 = l2_hits(
        topology,
        (&nodes[0], &nodes[1]),
        (&mut left[0], &mut right[0]),
        n,
    )
    .await?;

    let np = n.min(200);
    eprintln!("== 3. invalidation propagation to 6 nodes: {np} samples, no injected delay");
    propagation(nodes, &mut https, "warm", 10).await?;
    let direct = propagation(nodes, &mut https, "direct", np).await?;
    eprintln!("== 3. ... with {GATEWAY_DELAY:?} one-way between the regions");
    topology.set_gateway_delay(GATEWAY_DELAY);
    let before: Vec<u64> = topology
        .gateway_proxies
        .iter()
        .map(|p| p.bytes_forwarded())
        .collect();
    let delayed = propagation(nodes, &mut https, "delayed", np).await?;
    let through_proxies: u64 = topology
        .gateway_proxies
        .iter()
        .zip(&before)
        .map(|(p, b)| p.bytes_forwarded() - b)
        .sum();
    topology.set_gateway_delay(Duration::ZERO);

    let us = |s: f64| format!("{:.1}", s * 1e6);
    let ms = |s: f64| format!("{:.1}", s * 1e3);
    println!("| L1 hit (µs per call) | keel | baseline | keel / baseline |");
    println!("|---|---:|---:|---:|");
    println!(
        "| cache.get through the guest ({LOOP_CALLS} calls in one instance, median of {LOOP_REPEATS}) vs raw moka get | {} | {} | {:.0} |",
        us(guest_l1),
        us(moka_get),
        guest_l1 / moka_get
    );
    println!(
        "| keel-cache L1 hit in-process (no guest) vs raw moka get | {} | {} | {:.1} |",
        us(keel_l1),
        us(moka_get),
        keel_l1 / moka_get
    );
    println!();
    println!(
        "| L2 hit at e2, east server (µs) | samples | p50 | p99 | mean | keel / raw KV get (p50 / p99 or mean) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let raw = &l2.raw;
    println!(
        "| cache.get L2 hit in one instance (1000 distinct keys) | 1000 | | | {} | {:.2} (mean) |",
        us(l2.in_guest_mean),
        l2.in_guest_mean / raw.mean()
    );
    println!(
        "| GET /c/entry/<key> at e2, an L2 hit per request | {n} | {} | {} | {} | {:.2} / {:.2} |",
        us(l2.per_request.quantile(0.5)),
        us(l2.per_request.quantile(0.99)),
        us(l2.per_request.mean()),
        l2.per_request.quantile(0.5) / raw.quantile(0.5),
        l2.per_request.quantile(0.99) / raw.quantile(0.99)
    );
    println!(
        "| HTTP floor: the same GET again (an L1 hit) | {n} | {} | {} | {} | |",
        us(l2.floor.quantile(0.5)),
        us(l2.floor.quantile(0.99)),
        us(l2.floor.mean())
    );
    println!(
        "| baseline: raw async-nats JetStream KV get of the same entries (e2's user) | {n} | {} | {} | {} | |",
        us(raw.quantile(0.5)),
        us(raw.quantile(0.99)),
        us(raw.mean())
    );
    println!();
    println!(
        "| global invalidation at e1 until all 6 nodes stopped serving the key (ms) | samples | p50 | p99 | max |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (label, p) in [
        ("no injected delay", &direct),
        (
            &*format!("{GATEWAY_DELAY:?} one-way between regions"),
            &delayed,
        ),
    ] {
        for (what, s) in [
            ("from the call's return", &p.from_return),
            ("from the call's start", &p.from_call),
            (
                "until the last node's miss was answered (incl. its L2 and L3 lookups), from the return",
                &p.answered,
            ),
            ("the invalidate call at e1", &p.call),
        ] {
            println!(
                "| {label}: {what} | {np} | {} | {} | {} |",
                ms(s.quantile(0.5)),
                ms(s.quantile(0.99)),
                ms(s.max())
            );
        }
        let per: Vec<String> = NODES
            .iter()
            .zip(&p.per_node)
            .map(|(e, s)| format!("{e} {}/{}", ms(s.quantile(0.5)), ms(s.quantile(0.99))))
            .collect();
        println!(
            "| {label}: per node from the return, p50/p99 | {np} | {} | | |",
            per.join(", ")
        );
    }
    println!();
    println!(
        "Gateway proxies forwarded {through_proxies} bytes during the delayed run (0 would mean the regions bypassed them)."
    );
    let reconnects: u64 = https.iter().map(|h| h.reconnects).sum();
    if reconnects > 0 {
        println!("Note: keep-alive connections reopened {reconnects} times.");
    }
    Ok(())
}
