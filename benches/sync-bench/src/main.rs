//! State-sync benchmark, run by `benches/sync.sh` (numbers go to
//! BENCHMARKS.md; nothing is asserted). Every figure has a baseline measured
//! in the same run:
//!
//! 1. `state.counter-inc` through a guest (state-probe, N calls per request,
//!    64 concurrent requests) vs `keel_sync::Sync::counter_inc` called
//!    in-process with the same store (the host's own cost); and one
//!    increment's latency (p50/p99): one per HTTP request, one in flight, vs
//!    one in-process call at a time;
//! 2. delta bytes per op vs the full state's bytes (keel-crdt encodings);
//! 3. propagation: acknowledged write on node A until visible on node B,
//!    both on one real nats-server, vs raw async-nats publish -> receive
//!    between two connections on that server;
//! 4. convergence after a partition heals, 3 nodes (one behind a fault
//!    proxy), ≥ 20 cut/heal runs.
//!
//! Usage: sync-bench <keel-binary> <state-probe.wasm> [seconds] [heal-runs]

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use keel_bus::nats::{NatsBus, NatsOptions};
use keel_bus::{Bus, ConnectionState};
use keel_crdt::{Crdt, Hlc, LwwMap, OrSet, PnCounter, ReplicaId};
use keel_store::Namespace;
use keel_sync::{Scope, Sync, SyncOptions};
use keel_test_support::{FaultProxy, KeelProcess, NatsServer};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 3,
        "usage: sync-bench <keel-binary> <state-probe.wasm> [seconds] [heal-runs]"
    );
    let secs: f64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3.0);
    let heal_runs: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(20);
    let window = Duration::from_secs_f64(secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    println!("| measurement | keel | baseline | ratio |");
    println!("|---|---|---|---|");
    let dir = tempfile::tempdir()?;
    {
        let (keel, base) = start_keel(Path::new(&args[1]), Path::new(&args[2]), dir.path())?;
        for conns in [64, 256] {
            let guest = rt.block_on(guest_increments(&base, conns, 100, window))?;
            let native = rt.block_on(native_increments(
                &dir.path().join(format!("native-{conns}")),
                conns,
                window,
            ))?;
            row(
                &format!(
                    "counter-inc through a guest, {conns} concurrent requests x 100 incs vs {conns} in-process Sync writers (ops/s)"
                ),
                guest,
                native,
            );
        }
        // One operation's latency: one counter-inc per HTTP request (one in
        // flight) vs one in-process `Sync::counter_inc` at a time; both wait
        // for the fsync.
        let guest = rt.block_on(guest_op_latency(&base, 5000))?;
        let native = rt.block_on(native_op_latency(&dir.path().join("native-lat"), 5000))?;
        latency_rows(
            "counter-inc {q}, one per HTTP request through a guest vs one in-process Sync call",
            &guest,
            &native,
        );
        drop(keel);
    }

    delta_sizes();

    let nats = NatsServer::start();
    let (sync_p, raw_p) = rt.block_on(propagation(&nats, dir.path(), 2000))?;
    latency_rows(
        "propagation {q}: acked write on A -> visible on B vs raw async-nats publish -> receive",
        &sync_p,
        &raw_p,
    );

    let heal = rt.block_on(convergence_after_heal(&nats, dir.path(), heal_runs))?;
    println!(
        "| convergence after heal, 3 nodes, {} runs: p50 / p99 (ms) | {:.0} / {:.0} | | |",
        heal.len(),
        quantile(&heal, 0.5) * 1e3,
        quantile(&heal, 0.99) * 1e3
    );
    Ok(())
}

fn row(name: &str, keel: f64, baseline: f64) {
    println!(
        "| {name} | {keel:.0} | {baseline:.0} | {:.2} |",
        keel / baseline
    );
}

/// p50 and p99 rows (µs) of two latency samples in seconds; `{q}` in
/// `what` becomes the quantile's name.
fn latency_rows(what: &str, keel: &[f64], baseline: &[f64]) {
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        let (k, b) = (quantile(keel, q), quantile(baseline, q));
        println!(
            "| {} (µs) | {:.0} | {:.0} | {:.2} |",
            what.replace("{q}", name),
            k * 1e6,
            b * 1e6,
            k / b
        );
    }
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() as f64 - 1.0) * q).round() as usize]
}

/// Starts keel on a fresh config in `dir`; `base` is the component's URL
/// prefix. Instances are capped well above the 256 concurrent requests:
/// at exactly 256 (the default), a client that sends its next request as
/// soon as it has read a response can find the previous instance not yet
/// released and get a 503, which this benchmark is not about.
fn start_keel(bin: &Path, wasm: &Path, dir: &Path) -> anyhow::Result<(KeelProcess, String)> {
    let config = dir.join("keel.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata-dir = \"keel-data\"\n\n[components.state]\nwasm = {:?}\nroute = \"/state/...\"\ngrants = [\"state\"]\n[components.state.limits]\nmax-instances = 512\n",
            wasm.display().to_string()
        ),
    )?;
    let keel = KeelProcess::start(bin, &config)?;
    let base = format!("{}/state", keel.base);
    Ok((keel, base))
}

/// Increments/s of `POST /bench/counter-inc?n=N` from `conns` concurrent
/// requests for `window`.
async fn guest_increments(
    base: &str,
    conns: usize,
    n: u64,
    window: Duration,
) -> anyhow::Result<f64> {
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let url: hyper::Uri = format!("{base}/bench/counter-inc?n={n}&name=bench").parse()?;
    let call = |client: Client, url: hyper::Uri| async move {
        let req = hyper::Request::post(url).body(Full::new(Bytes::new()))?;
        let res = client.request(req).await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status.is_success(), "counter-inc: {status} {body:?}");
        Ok::<_, anyhow::Error>(())
    };
    call(client.clone(), url.clone()).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut ops = 0u64;
            while started.elapsed() < window {
                call(client.clone(), url.clone()).await?;
                ops += n;
            }
            Ok::<_, anyhow::Error>(ops)
        }));
    }
    let mut ops = 0;
    for t in tasks {
        ops += t.await??;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

fn open_sync(dir: &Path, edge: &str, bus: Arc<dyn Bus>) -> anyhow::Result<Sync> {
    let store = keel_store_rocksdb::RocksStore::open(
        dir,
        keel_store_rocksdb::RocksOptions {
            limits: keel_store::StoreLimits::default(),
            node: keel_store_rocksdb::NodeIdentity {
                edge: edge.into(),
                region: "bench".into(),
            },
            forwarding: false,
            block_cache_bytes: 8 << 20,
        },
    )?;
    Ok(Sync::start(
        Arc::new(store),
        keel_bus::Buses::single(bus),
        SyncOptions {
            edge: edge.into(),
            region: "bench".into(),
            anti_entropy_interval: Duration::from_millis(100),
            max_state_bytes: 4 << 20,
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_clock_drift: Duration::from_secs(60),
        },
        keel_telemetry::SyncMetrics::default(),
        &tokio::runtime::Handle::current(),
    )?)
}

fn ns() -> Namespace {
    Namespace::new("bench").expect("valid namespace")
}

/// Increments/s of `Sync::counter_inc` from `writers` concurrent tasks.
async fn native_increments(dir: &Path, writers: usize, window: Duration) -> anyhow::Result<f64> {
    let sync = open_sync(dir, "native", Arc::new(keel_bus::local::LocalBus::new()))?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let sync = sync.clone();
        tasks.push(tokio::spawn(async move {
            let mut ops = 0u64;
            while started.elapsed() < window {
                sync.counter_inc(&ns(), Scope::Region, "bench", 1).await?;
                ops += 1;
            }
            Ok::<_, anyhow::Error>(ops)
        }));
    }
    let mut ops = 0;
    for t in tasks {
        ops += t.await??;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

/// Seconds per `POST /counter/lat/inc`, one request at a time.
async fn guest_op_latency(base: &str, samples: usize) -> anyhow::Result<Vec<f64>> {
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let url: hyper::Uri = format!("{base}/counter/lat/inc").parse()?;
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples + 100 {
        let started = Instant::now();
        let req = hyper::Request::post(url.clone()).body(Full::new(Bytes::new()))?;
        let res = client.request(req).await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status.is_success(), "counter inc: {status} {body:?}");
        // The first 100 warm up the connection and the instance pool.
        if i >= 100 {
            out.push(started.elapsed().as_secs_f64());
        }
    }
    Ok(out)
}

/// Seconds per in-process `Sync::counter_inc`, one at a time.
async fn native_op_latency(dir: &Path, samples: usize) -> anyhow::Result<Vec<f64>> {
    let sync = open_sync(dir, "native", Arc::new(keel_bus::local::LocalBus::new()))?;
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples + 100 {
        let started = Instant::now();
        sync.counter_inc(&ns(), Scope::Region, "lat", 1).await?;
        if i >= 100 {
            out.push(started.elapsed().as_secs_f64());
        }
    }
    Ok(out)
}

/// Encoded delta of one op vs the encoded full state it changed.
fn delta_sizes() {
    let replicas: Vec<ReplicaId> = (0..3)
        .map(|i| ReplicaId(format!("edge-{i}.00000000")))
        .collect();
    let at = |ms: u64, r: &ReplicaId| Hlc {
        physical_ms: 1_700_000_000_000 + ms,
        logical: 0,
        node: r.0.clone(),
    };
    let mut counter = PnCounter::default();
    for (i, r) in replicas.iter().enumerate() {
        counter.inc(r, 1000 + i as u64);
    }
    let d = counter.inc(&replicas[0], 1);
    size_row("PN-counter, 3 replicas: inc", &d, &counter);

    let mut set = OrSet::<String>::default();
    for i in 0..1000 {
        set.add(&replicas[i % 3], format!("member-{i}"));
    }
    let d = set.add(&replicas[0], "new-member".into());
    size_row("OR-set of 1,000 members: add", &d, &set);
    let d = set.remove(&"member-7".to_string());
    size_row("OR-set of 1,000 members: remove", &d, &set);

    let mut map = LwwMap::<Vec<u8>>::default();
    for i in 0..1000u64 {
        map.set(
            &replicas[(i % 3) as usize],
            format!("user-{i}"),
            b"online".to_vec(),
            at(i, &replicas[(i % 3) as usize]),
        );
    }
    let d = map.set(
        &replicas[1],
        "user-5".into(),
        b"away".to_vec(),
        at(5000, &replicas[1]),
    );
    size_row("LWW-map of 1,000 keys (presence): set", &d, &map);
}

fn size_row<T: Crdt>(name: &str, delta: &T, full: &T) {
    let (d, f) = (
        keel_crdt::encode(delta).len(),
        keel_crdt::encode(full).len(),
    );
    println!(
        "| delta bytes per op vs full state: {name} | {d} | {f} | {:.4} |",
        d as f64 / f as f64
    );
}

/// Seconds from an acknowledged increment on A until B sees it, and from a
/// raw publish until another connection receives it.
async fn propagation(
    nats: &NatsServer,
    dir: &Path,
    samples: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let bus = |name: &str| {
        let opts = NatsOptions {
            name: name.into(),
            ..NatsOptions::new(vec![nats.url()])
        };
        async move {
            let b = NatsBus::connect(opts).await?;
            b.wait_connected(Duration::from_secs(10)).await?;
            Ok::<_, anyhow::Error>(Arc::new(b) as Arc<dyn Bus>)
        }
    };
    let a = open_sync(&dir.join("prop-a"), "a", bus("a").await?)?;
    let b = open_sync(&dir.join("prop-b"), "b", bus("b").await?)?;
    // Let both subscribe before measuring.
    a.counter_inc(&ns(), Scope::Region, "warm", 1).await?;
    wait(&b, || {
        b.counter_value(&ns(), Scope::Region, "warm").ok() == Some(1)
    })
    .await?;

    let mut sync_s = Vec::with_capacity(samples);
    for i in 1..=samples as i64 {
        a.counter_inc(&ns(), Scope::Region, "prop", 1).await?;
        let acked = Instant::now();
        wait(&b, || {
            b.counter_value(&ns(), Scope::Region, "prop").ok() == Some(i)
        })
        .await?;
        sync_s.push(acked.elapsed().as_secs_f64());
    }

    let c1 = async_nats::connect(nats.url()).await?;
    let c2 = async_nats::connect(nats.url()).await?;
    let mut sub = c2.subscribe("bench.raw").await?;
    c2.flush().await?;
    let mut raw_s = Vec::with_capacity(samples);
    for _ in 0..samples {
        let sent = Instant::now();
        c1.publish("bench.raw", Bytes::from_static(b"0123456789abcdef"))
            .await?;
        c1.flush().await?;
        sub.next()
            .await
            .ok_or_else(|| anyhow::anyhow!("raw subscription closed"))?;
        raw_s.push(sent.elapsed().as_secs_f64());
    }
    Ok((sync_s, raw_s))
}

/// Waits until `f` holds on `node`, woken by its remote changes (like the
/// raw subscriber, no polling); 10 s at most.
async fn wait(node: &Sync, f: impl Fn() -> bool) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let changed = node.remote_changes().notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if f() {
                return;
            }
            changed.await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("timed out"))
}

/// Seconds from heal until three nodes agree, one per run.
async fn convergence_after_heal(
    nats: &NatsServer,
    dir: &Path,
    runs: usize,
) -> anyhow::Result<Vec<f64>> {
    let proxy = FaultProxy::start(nats.addr());
    let mut buses = Vec::new();
    for (i, url) in [nats.url(), nats.url(), proxy.url()]
        .into_iter()
        .enumerate()
    {
        let b = NatsBus::connect(NatsOptions {
            name: format!("heal-{i}"),
            ..NatsOptions::new(vec![url])
        })
        .await?;
        b.wait_connected(Duration::from_secs(10)).await?;
        buses.push(Arc::new(b));
    }
    let nodes: Vec<Sync> = buses
        .iter()
        .enumerate()
        .map(|(i, b)| open_sync(&dir.join(format!("heal-{i}")), &format!("n{i}"), b.clone()))
        .collect::<anyhow::Result<_>>()?;
    let mut out = Vec::with_capacity(runs);
    for run in 0..runs {
        proxy.cut();
        wait_state(&*buses[2], ConnectionState::Disconnected).await?;
        // Both sides write while apart.
        for (i, n) in nodes.iter().enumerate() {
            n.counter_inc(&ns(), Scope::Region, "heal", 1 + i as u64)
                .await?;
            n.set_add(&ns(), Scope::Region, "heal", format!("r{run}-n{i}"))
                .await?;
        }
        proxy.heal();
        let healed = Instant::now();
        let expected = (run as i64 + 1) * 6;
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let counts: Vec<_> = nodes
                .iter()
                .map(|n| n.counter_value(&ns(), Scope::Region, "heal").ok())
                .collect();
            let sets: Vec<_> = nodes
                .iter()
                .map(|n| {
                    n.set_members(&ns(), Scope::Region, "heal")
                        .ok()
                        .map(|mut m| {
                            m.sort();
                            m
                        })
                })
                .collect();
            if counts.iter().all(|c| *c == Some(expected)) && sets.iter().all(|s| *s == sets[0]) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < end,
                "run {run} did not converge: {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        out.push(healed.elapsed().as_secs_f64());
    }
    Ok(out)
}

async fn wait_state(bus: &dyn Bus, state: ConnectionState) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(30);
    while bus.connection_state() != state {
        anyhow::ensure!(Instant::now() < end, "bus never became {state:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}
