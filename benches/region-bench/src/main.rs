//! Regional-tier benchmark, run by `benches/region.sh` (numbers go to
//! BENCHMARKS.md; nothing is asserted). The host side runs in-process with
//! the production parts (RocksDB store with forwarding, `keel-coord`'s
//! forwarder, `NatsBus`) against one real nats-server; each figure has a
//! baseline measured in the same run:
//!
//! 1. outbox drain: N events appended while the region is unreachable, then
//!    drained, vs raw async-nats JetStream async publish of N messages of the
//!    same size with msg ids (windows of 512 publishes, then their acks);
//! 2. replay after a 10 s partition at 1,000 events/s: time from heal until
//!    the outbox is empty (reconnect included);
//! 3. edge -> region: an acknowledged local write until a subscriber of
//!    the region's subject on another connection has it, vs raw JetStream
//!    publish -> that subscriber.
//!
//! Usage: region-bench [events]

use bytes::Bytes;
use futures::StreamExt;
use keel_bus::nats::{NatsBus, NatsOptions};
use keel_bus::{Bus, StreamSpec};
use keel_store::{EventData, EventLog, Namespace, Outbox};
use keel_store_rocksdb::{NodeIdentity, RocksOptions, RocksStore};
use keel_test_support::{FaultProxy, NatsServer};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const WINDOW: usize = 512;

fn main() -> anyhow::Result<()> {
    let events: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir()?;
    println!("| measurement | keel | baseline | ratio |");
    println!("|---|---|---|---|");

    let (keel_rate, size) = rt.block_on(drain(&nats, &dir.path().join("drain"), events))?;
    let raw_rate = rt.block_on(raw_publish(&nats, events, size))?;
    println!(
        "| outbox drain, {events} events of {size} B vs raw JetStream async publish (events/s) | {keel_rate:.0} | {raw_rate:.0} | {:.2} |",
        keel_rate / raw_rate
    );

    let replay = rt.block_on(replay_after_partition(&nats, &dir.path().join("replay")))?;
    println!(
        "| replay after a 10 s partition at 1,000 events/s: heal -> outbox empty (ms) | {:.0} | | |",
        replay * 1e3
    );

    let (keel_lat, ack_lat, raw_lat) =
        rt.block_on(edge_to_region(&nats, &dir.path().join("lat"), 1000))?;
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        let (k, a, r) = (
            quantile(&keel_lat, q),
            quantile(&ack_lat, q),
            quantile(&raw_lat, q),
        );
        println!(
            "| edge -> region {name}: durable local write (fsync) + forward -> region subscriber vs raw JetStream publish -> subscriber (µs) | {:.0} | {:.0} | {:.2} |",
            k * 1e6,
            r * 1e6,
            k / r
        );
        println!(
            "| edge -> region {name}: from the write's ack -> region subscriber (µs) | {:.0} | {:.0} | {:.2} |",
            a * 1e6,
            r * 1e6,
            a / r
        );
    }
    Ok(())
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() as f64 - 1.0) * q).round() as usize]
}

/// Each measurement has its own region (streams must not overlap).
fn stream(region: &str) -> StreamSpec {
    StreamSpec {
        name: format!("KEEL_{}_EVENTS", region.to_uppercase()),
        subjects: vec![format!("keel.{region}.edge.*.events")],
        replicas: 1,
        duplicate_window: Duration::from_secs(120),
        max_age: None,
        placement: None,
    }
}

fn open(dir: &Path, region: &str) -> anyhow::Result<RocksStore> {
    Ok(RocksStore::open(
        dir,
        RocksOptions {
            limits: keel_store::StoreLimits::default(),
            node: NodeIdentity {
                edge: "edge".into(),
                region: region.into(),
            },
            forwarding: true,
            block_cache_bytes: 8 << 20,
        },
    )?)
}

fn event(i: usize) -> EventData {
    EventData {
        kind: "order.placed".into(),
        key: format!("order-{i}"),
        payload: vec![b'x'; 200],
        content_type: Some("application/json".into()),
        user: Some(format!("user-{}", i % 1000)),
    }
}

async fn bus(url: String) -> anyhow::Result<Arc<dyn Bus>> {
    let b = NatsBus::connect(NatsOptions::new([url])).await?;
    b.wait_connected(Duration::from_secs(10)).await?;
    Ok(Arc::new(b))
}

/// Appends `n` events concurrently (64 writers), all forwarded.
async fn append_many(store: &RocksStore, n: usize, offset: usize) -> anyhow::Result<()> {
    let ns = Namespace::new("bench").expect("valid name");
    let mut tasks = Vec::new();
    for w in 0..64 {
        let (store, ns) = (store.clone(), ns.clone());
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(64) {
                store.append(&ns, event(offset + i), true).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn wait_empty(store: &RocksStore) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(120);
    while store.outbox_depth()? > 0 {
        anyhow::ensure!(
            Instant::now() < end,
            "the outbox did not drain: {} entries left",
            store.outbox_depth()?
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Fills the outbox, then starts the forwarder and times the drain.
async fn drain(nats: &NatsServer, dir: &Path, n: usize) -> anyhow::Result<(f64, usize)> {
    let store = open(dir, "drain")?;
    append_many(&store, n, 0).await?;
    let (_, first) = store.outbox_peek(0, 1)?.remove(0);
    let origin = keel_coord::envelope::origin_id("edge", store.outbox_incarnation());
    let size = keel_coord::envelope::outbox_event("drain", &origin, 1, &first)
        .to_json()
        .len();
    let bus = bus(nats.url()).await?;
    bus.ensure_stream(&stream("drain")).await?;
    let start = Instant::now();
    keel_coord::start_forwarder(
        Arc::new(store.clone()),
        bus,
        keel_coord::ForwarderOptions {
            region: "drain".into(),
            edge: "edge".into(),
            stream: stream("drain"),
            global: None,
            keys: None,
        },
        keel_telemetry::OutboxMetrics::default(),
        &tokio::runtime::Handle::current(),
    );
    wait_empty(&store).await?;
    Ok((n as f64 / start.elapsed().as_secs_f64(), size))
}

async fn raw_publish(nats: &NatsServer, n: usize, size: usize) -> anyhow::Result<f64> {
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "RAW".into(),
        subjects: vec!["raw.>".into()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let payload = Bytes::from(vec![b'x'; size]);
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let mut acks = Vec::with_capacity(WINDOW);
        for _ in 0..WINDOW.min(n - i) {
            let msg = async_nats::jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(format!("raw:{i}"));
            acks.push(js.send_publish("raw.edge.events", msg).await?);
            i += 1;
        }
        for a in acks {
            a.await?;
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn replay_after_partition(nats: &NatsServer, dir: &Path) -> anyhow::Result<f64> {
    let store = open(dir, "replay")?;
    let proxy = FaultProxy::start(nats.addr());
    let bus = bus(proxy.url()).await?;
    keel_coord::start_forwarder(
        Arc::new(store.clone()),
        bus.clone(),
        keel_coord::ForwarderOptions {
            region: "replay".into(),
            edge: "edge".into(),
            stream: stream("replay"),
            global: None,
            keys: None,
        },
        keel_telemetry::OutboxMetrics::default(),
        &tokio::runtime::Handle::current(),
    );
    bus.ensure_stream(&stream("replay")).await?;
    proxy.cut();
    eprintln!("replay: cut; writing 10,000 events over 10 s");
    let ns = Namespace::new("bench").expect("valid name");
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut writes = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        tick.tick().await;
        let (store, ns) = (store.clone(), ns.clone());
        writes.push(tokio::spawn(async move {
            store.append(&ns, event(i), true).await
        }));
    }
    for w in writes {
        w.await??;
    }
    anyhow::ensure!(
        store.outbox_depth()? == 10_000,
        "the cut let events through"
    );
    proxy.heal();
    eprintln!("replay: healed");
    let healed = Instant::now();
    wait_empty(&store).await?;
    Ok(healed.elapsed().as_secs_f64())
}

async fn edge_to_region(
    nats: &NatsServer,
    dir: &Path,
    samples: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let store = open(dir, "lat")?;
    let bus = bus(nats.url()).await?;
    bus.ensure_stream(&stream("lat")).await?;
    keel_coord::start_forwarder(
        Arc::new(store.clone()),
        bus,
        keel_coord::ForwarderOptions {
            region: "lat".into(),
            edge: "edge".into(),
            stream: stream("lat"),
            global: None,
            keys: None,
        },
        keel_telemetry::OutboxMetrics::default(),
        &tokio::runtime::Handle::current(),
    );
    let client = async_nats::connect(nats.url()).await?;
    let mut sub = client.subscribe("keel.lat.edge.edge.events").await?;
    client.flush().await?;
    let ns = Namespace::new("bench").expect("valid name");
    let mut keel = Vec::with_capacity(samples);
    let mut from_ack = Vec::with_capacity(samples);
    for i in 0..samples {
        let start = Instant::now();
        store.append(&ns, event(i), true).await?;
        let acked = Instant::now();
        sub.next()
            .await
            .ok_or_else(|| anyhow::anyhow!("subscription closed"))?;
        keel.push(start.elapsed().as_secs_f64());
        from_ack.push(acked.elapsed().as_secs_f64());
    }
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "RAWLAT".into(),
        subjects: vec!["rawlat.>".into()],
        ..Default::default()
    })
    .await?;
    let mut raw_sub = client.subscribe("rawlat.edge.events").await?;
    client.flush().await?;
    let mut raw = Vec::with_capacity(samples);
    for i in 0..samples {
        let start = Instant::now();
        let msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(Bytes::from(vec![b'x'; 200]))
            .message_id(format!("raw-lat:{i}"));
        js.send_publish("rawlat.edge.events", msg).await?.await?;
        raw_sub
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("subscription closed"))?;
        raw.push(start.elapsed().as_secs_f64());
    }
    Ok((keel, from_ack, raw))
}
