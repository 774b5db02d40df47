//! Multi-region deployments from a `regions.toml`: real NATS clusters
//! joined by gateways (configs rendered by `keel-topology`, as `keel
//! topology` writes them), `keel up` nodes placed by `[node] regions`, the
//! outbox forwarder, residency, and partitions between an edge and its
//! region (a TCP fault proxy) with and without SIGKILL.

use crate::support::*;
use keel_bus::Bus;
use keel_bus::nats::{NatsBus, NatsOptions};
use keel_config::RegionsConfig;
use keel_coord::envelope::CloudEvent;
use keel_test_support::{
    FaultProxy, NatsSupercluster, ServerSpec, free_port, wait_until, wait_until_async,
};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET_ENV: &str = "KEEL_TEST_NATS_SECRET";
const SECRET: &str = "regions-test-secret";
/// Deadline for anything that should arrive promptly.
const WAIT: Duration = Duration::from_secs(30);

struct RegionSpec {
    name: &'static str,
    residency: &'static str,
    edges: &'static [&'static str],
    servers: usize,
}

/// A running topology: the regions.toml on disk and its NATS servers.
struct World {
    _dir: tempfile::TempDir,
    path: PathBuf,
    regions: RegionsConfig,
    _nats: NatsSupercluster,
}

fn regions_text(specs: &[RegionSpec], store_dir: &std::path::Path) -> String {
    let mut text = String::new();
    for r in specs {
        let servers: Vec<String> = (0..r.servers)
            .map(|_| {
                format!(
                    "{{ host = \"127.0.0.1\", client = {}, cluster = {}, gateway = {}, monitor = {} }}",
                    free_port(),
                    free_port(),
                    free_port(),
                    free_port()
                )
            })
            .collect();
        let edges: Vec<String> = r.edges.iter().map(|e| format!("{e:?}")).collect();
        text.push_str(&format!(
            "[regions.{}]\nedges = [{}]\ncoordinator = {:?}\ndata_residency = {:?}\nservers = [{}]\n\n",
            r.name,
            edges.join(", "),
            r.edges[0],
            r.residency,
            servers.join(", ")
        ));
    }
    text.push_str(&format!(
        "[coordination]\nconsensus_protocol = \"raft\"\n\n[nats]\nsecret_env = {SECRET_ENV:?}\nstore_dir = {:?}\n",
        store_dir.display().to_string()
    ));
    text
}

fn world(specs: &[RegionSpec]) -> World {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("regions.toml");
    let last: Arc<Mutex<Option<RegionsConfig>>> = Arc::default();
    let keep = last.clone();
    let store = dir.path().join("nats");
    let nats = NatsSupercluster::start_retrying(|| {
        let text = regions_text(specs, &store);
        std::fs::write(&path, &text).unwrap();
        let regions = RegionsConfig::parse(&path, &text).unwrap();
        let rendered = keel_topology::render(&regions, SECRET.as_bytes());
        *keep.lock().unwrap() = Some(regions);
        rendered
            .into_iter()
            .map(|r| ServerSpec {
                server_name: r.server_name,
                cluster: Some(r.region),
                host: r.addr.host.clone(),
                client_port: r.addr.client_port,
                monitor_port: r.addr.monitor_port,
                store_dir: r.store_dir,
                config: r.config,
            })
            .collect()
    });
    let regions = last.lock().unwrap().take().unwrap();
    World {
        _dir: dir,
        path,
        regions,
        _nats: nats,
    }
}

impl World {
    /// A client of `edge`'s account (`global`: the GLOBAL account) on the
    /// first server of the edge's region.
    async fn client(&self, edge: &str, global: bool) -> NatsBus {
        let c = keel_topology::edge_credentials(&self.regions, SECRET.as_bytes(), edge).unwrap();
        let credentials = if global {
            (c.global_user, c.global_password)
        } else {
            (c.user, c.password)
        };
        let bus = NatsBus::connect(NatsOptions {
            credentials: Some(credentials),
            ..NatsOptions::new([c.servers[0].clone()])
        })
        .await
        .unwrap();
        bus.wait_connected(WAIT).await.unwrap();
        bus
    }

    fn server_url(&self, region: &str) -> String {
        self.regions.region(region).unwrap().servers[0].client_url()
    }

    /// A keel node for `edge` serving edge-probe at `/probe/...`; with
    /// `servers`, it reaches NATS there instead (a fault proxy).
    fn edge_node(&self, edge: &str, servers: Option<&str>) -> Node {
        let bus = servers
            .map(|s| format!("event-stream = {{ type = \"nats\", servers = [\"{s}\"] }}"))
            .unwrap_or_default();
        let mut node = Node::new(&format!(
            "[node]\nedge = \"{edge}\"\nregions = {:?}\n\n[infrastructure]\n{bus}\n\n{}",
            self.path.display().to_string(),
            component(
                "probe",
                "edge-probe",
                "/probe/...",
                r#"grants = ["edge-operations", "events", "kv", "sql"]"#
            )
        ));
        node.env.push((SECRET_ENV.into(), SECRET.into()));
        node
    }
}

/// The tests' own runtime: they are plain `#[test]`s because starting NATS
/// servers and keel processes blocks.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Records one event at the node; its id.
async fn record(node: &Keel, kind: &str, key: &str, payload: &str, user: Option<&str>) -> String {
    let mut body = json!({"kind": kind, "key": key, "payload": payload});
    if let Some(u) = user {
        body["user"] = u.into();
    }
    let r = node.post("/probe/edge/event", body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["id"].as_str().unwrap().to_string()
}

/// Every message of a stream, decoded.
async fn read_stream(bus: &NatsBus, stream: &str) -> Vec<CloudEvent> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let page = bus.stream_read(stream, ">", from, 1000).await.unwrap();
        let Some(last) = page.last() else {
            return out;
        };
        from = last.sequence + 1;
        for m in page {
            out.push(CloudEvent::from_json(&m.payload).unwrap());
        }
    }
}

/// Polls the stream until it holds every id in `ids`; returns its events.
async fn wait_stream_has(bus: &NatsBus, stream: &str, ids: &BTreeSet<String>) -> Vec<CloudEvent> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let events = read_stream(bus, stream).await;
        let have: BTreeSet<String> = events.iter().map(|e| e.id.clone()).collect();
        if ids.is_subset(&have) {
            return events;
        }
        assert!(
            Instant::now() < end,
            "{stream} is missing {} of {} events",
            ids.difference(&have).count(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every message a `>` subscriber sees: (subject, payload).
fn snoop(bus: &NatsBus, rt: &tokio::runtime::Handle) -> Arc<Mutex<Vec<(String, String)>>> {
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let out = seen.clone();
    let mut sub = rt.block_on(bus.subscribe(">", None)).unwrap();
    rt.spawn(async move {
        while let Some(m) = sub.next().await {
            out.lock().unwrap().push((
                m.subject.clone(),
                String::from_utf8_lossy(&m.payload).into_owned(),
            ));
        }
    });
    seen
}

#[test]
fn events_reach_their_region_and_personal_data_stays_in_its_zone() {
    let _heavy = heavy_test();
    let world = world(&[
        RegionSpec {
            name: "us-west",
            residency: "us",
            edges: &["sfo", "lax"],
            servers: 1,
        },
        RegionSpec {
            name: "eu-central",
            residency: "gdpr",
            edges: &["fra", "ams"],
            servers: 1,
        },
        RegionSpec {
            name: "ap-south",
            residency: "local",
            edges: &["bom", "del"],
            servers: 1,
        },
    ]);
    let rt = runtime();
    // Wildcard subscribers on every non-EU server, in both accounts an edge
    // there holds.
    let mut snoopers = Vec::new();
    let mut clients = Vec::new();
    for (edge, global) in [("sfo", false), ("sfo", true), ("bom", false), ("bom", true)] {
        let c = rt.block_on(world.client(edge, global));
        snoopers.push((edge, global, snoop(&c, rt.handle())));
        clients.push(c);
    }
    let nodes = BTreeMap::from(["sfo", "fra", "ams", "bom"].map(|e| (e, world.edge_node(e, None))));
    let keels: BTreeMap<&str, Keel> = nodes.iter().map(|(e, n)| (*e, n.start())).collect();
    rt.block_on(async {
        let mut ids: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for i in 0..20 {
            for (edge, keel) in &keels {
                let user = format!("user-{edge}-{i}");
                let id = record(
                    keel,
                    "order.placed",
                    &format!("k{i}"),
                    &format!("secret-{edge}-{i}"),
                    Some(&user),
                )
                .await;
                ids.entry(edge).or_default().insert(id);
            }
        }
        // Visible in the region: another edge of the region reads its stream.
        for (region, writers, reader) in [
            ("us-west", &["sfo"][..], "lax"),
            ("eu-central", &["fra", "ams"][..], "ams"),
            ("ap-south", &["bom"][..], "del"),
        ] {
            let bus = world.client(reader, false).await;
            let stream = keel_topology::stream_name(region);
            let want: BTreeSet<String> = writers.iter().flat_map(|w| ids[w].clone()).collect();
            let events = wait_stream_has(&bus, &stream, &want).await;
            assert_eq!(events.len(), want.len(), "exactly once: {region}");
            for e in &events {
                assert_eq!(e.event_type, "order.placed");
                assert!(writers.contains(&e.edge()), "{e:?}");
                assert_eq!(e.source, format!("keel://{region}/{}/probe", e.edge()));
                let user = e.keeluser.clone().unwrap();
                let n = user.rsplit('-').next().unwrap();
                assert_eq!(
                    String::from_utf8(e.data()).unwrap(),
                    format!("secret-{}-{n}", e.edge())
                );
                assert!(e.traceparent.as_deref().unwrap().starts_with("00-"));
            }
        }
        // Every node's outbox drains.
        for keel in keels.values() {
            keel.wait_ready(|v| v["bus"]["outbox_depth"] == 0 && v["bus"]["state"] == "connected")
                .await;
        }
        let ready = keels["fra"].get("/_keel/ready").await.json();
        assert_eq!(ready["bus"]["region"], "eu-central");
        assert_eq!(ready["bus"]["global_state"], "connected");

        // A global sentinel published in the EU reaches every non-EU
        // subscriber; once it did, anything EU-personal would have too.
        let global_fra = world.client("fra", true).await;
        global_fra
            .publish("keel.global.sentinel", vec![], "sentinel".into())
            .await
            .unwrap();
        for (edge, _, seen) in &snoopers {
            let ok = wait_until_async(WAIT, || async {
                seen.lock()
                    .unwrap()
                    .iter()
                    .any(|(s, _)| s == "keel.global.sentinel")
            })
            .await;
            assert!(ok, "the global sentinel did not reach {edge}");
        }
    });
    for (edge, global, seen) in &snoopers {
        let seen = seen.lock().unwrap();
        for (subject, payload) in seen.iter() {
            assert!(
                !subject.starts_with("keel.eu-central")
                    && !payload.contains("user-fra")
                    && !payload.contains("user-ams"),
                "EU personal data reached {edge} (global account: {global}): {subject} {payload}"
            );
        }
        // Positive control: the zone-account snoopers saw their own region's
        // events, so they were listening.
        if !global {
            assert!(
                seen.iter()
                    .any(|(_, p)| p.contains(&format!("user-{edge}-"))),
                "{edge}'s snooper saw nothing of its own region"
            );
        }
    }
    // EU users do not exist outside the EU: their credentials are refused on
    // a us-west server.
    let c = keel_topology::edge_credentials(&world.regions, SECRET.as_bytes(), "fra").unwrap();
    let outside = rt.block_on(async {
        let bus = NatsBus::connect(NatsOptions {
            credentials: Some((c.user, c.password)),
            ..NatsOptions::new([world.server_url("us-west")])
        })
        .await
        .unwrap();
        bus.wait_connected(Duration::from_secs(3)).await
    });
    assert!(outside.is_err(), "an EU user connected to a us-west server");
}

/// A load generator recording events every few milliseconds until stopped.
/// Every call must succeed, partition or not.
struct SteadyLoad {
    stop: Arc<AtomicBool>,
    /// Events acknowledged so far.
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl SteadyLoad {
    fn start(keel: &Keel, rt: &tokio::runtime::Handle, prefix: &'static str) -> SteadyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let (flag, count, addr) = (stop.clone(), acked.clone(), keel.addr);
        let task = rt.spawn(async move {
            let mut ids = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let body = json!({"kind": "load", "key": format!("{prefix}{}", ids.len()), "payload": "x"});
                let r = request(addr, "POST", "/probe/edge/event", body.to_string().into()).await;
                assert_eq!(
                    r.status, 200,
                    "an edge operation failed during the partition: {}",
                    r.body
                );
                ids.push(r.json()["id"].as_str().unwrap().to_string());
                count.store(ids.len(), Ordering::Relaxed);
                // Pacing of the load, not synchronisation.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ids
        });
        SteadyLoad { stop, acked, task }
    }

    /// Waits until `n` more events than now are acknowledged.
    fn wait_more(&self, n: usize) {
        let target = self.acked.load(Ordering::Relaxed) + n;
        assert!(
            wait_until(WAIT, || self.acked.load(Ordering::Relaxed) >= target),
            "the load stalled"
        );
    }

    fn finish(self, rt: &tokio::runtime::Runtime) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        rt.block_on(self.task).unwrap()
    }
}

#[test]
fn partitioned_edge_keeps_serving_and_replays_exactly_once() {
    let _heavy = heavy_test();
    let world = world(&[RegionSpec {
        name: "us-west",
        residency: "us",
        edges: &["sfo", "lax"],
        servers: 1,
    }]);
    let rt = runtime();
    let upstream = world.regions.region("us-west").unwrap().servers[0].clone();
    let proxy = FaultProxy::start(
        format!("127.0.0.1:{}", upstream.client_port)
            .parse()
            .unwrap(),
    );
    let node = world.edge_node("sfo", Some(&proxy.url()));
    let stream = keel_topology::stream_name("us-west");
    let reader = rt.block_on(world.client("lax", false));

    // 1. Steady load; the edge is cut from its region for 10 s meanwhile.
    let keel = node.start();
    rt.block_on(keel.wait_ready(|v| v["bus"]["state"] == "connected"));
    let load = SteadyLoad::start(&keel, rt.handle(), "a");
    load.wait_more(50);
    proxy.cut();
    let cut_at = Instant::now();
    rt.block_on(keel.wait_ready(|v| v["bus"]["state"] != "connected"));
    // The partition lasts 10 s (the issue's minimum). Meanwhile the node
    // stays ready and its outbox grows with the load.
    let cut_for = Duration::from_secs(10);
    rt.block_on(async {
        let depth = |v: &serde_json::Value| v["bus"]["outbox_depth"].as_i64().unwrap();
        let mut first = None;
        let mut last = 0;
        while cut_at.elapsed() < cut_for {
            let r = keel.get("/_keel/ready").await;
            assert_eq!(r.status, 200, "a partition must not make the node unready");
            let v = r.json();
            assert_ne!(v["bus"]["state"], "connected");
            last = depth(&v);
            first.get_or_insert(last);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            last > first.unwrap_or(0),
            "the outbox did not queue the load during the partition"
        );
    });
    proxy.heal();
    // The load keeps going across the heal.
    load.wait_more(50);
    let acked = load.finish(&rt);
    assert!(acked.len() > 200, "steady load too thin: {}", acked.len());
    let want: BTreeSet<String> = acked.iter().cloned().collect();
    assert_eq!(want.len(), acked.len(), "ids are unique");
    let events = rt.block_on(wait_stream_has(&reader, &stream, &want));
    assert_eq!(
        events.len(),
        want.len(),
        "every acknowledged event exactly once"
    );
    rt.block_on(keel.wait_ready(|v| v["bus"]["outbox_depth"] == 0));

    // 2. Cut again, write, SIGKILL mid-partition, restart still cut, write
    // more, heal: everything arrives exactly once.
    proxy.cut();
    rt.block_on(keel.wait_ready(|v| v["bus"]["state"] != "connected"));
    let mut more = BTreeSet::new();
    rt.block_on(async {
        for i in 0..50 {
            more.insert(record(&keel, "load", &format!("b{i}"), "y", None).await);
        }
    });
    keel.sigkill();
    let keel = node.start();
    rt.block_on(async {
        for i in 0..50 {
            more.insert(record(&keel, "load", &format!("c{i}"), "z", None).await);
        }
        keel.wait_ready(|v| v["bus"]["outbox_depth"] == 100).await;
    });
    proxy.heal();
    let all: BTreeSet<String> = want.union(&more).cloned().collect();
    let events = rt.block_on(wait_stream_has(&reader, &stream, &all));
    assert_eq!(
        events.len(),
        all.len(),
        "every acknowledged event exactly once"
    );
    rt.block_on(keel.wait_ready(|v| v["bus"]["outbox_depth"] == 0));
    let metrics = rt.block_on(keel.get("/metrics")).body;
    assert!(metrics.contains("keel_outbox_forwarded_total"), "{metrics}");
}

#[test]
fn a_regional_node_with_a_bad_placement_or_no_secret_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let regions = dir.path().join("regions.toml");
    std::fs::write(
        &regions,
        regions_text(
            &[RegionSpec {
                name: "us-west",
                residency: "us",
                edges: &["sfo"],
                servers: 1,
            }],
            &dir.path().join("nats"),
        ),
    )
    .unwrap();
    let node = |edge: &str, extra: &str| {
        Node::new(&format!(
            "[node]\nedge = \"{edge}\"\nregions = {:?}\n{extra}\n",
            regions.display().to_string()
        ))
    };
    // Not an edge of the file.
    let (code, err) = node("xyz", "").up_fails();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("edge \"xyz\" (this node) is not listed in any region; edges: \"sfo\""),
        "{err}"
    );
    // keel.toml and regions.toml disagree on the region.
    let (code, err) = node("sfo", "region = \"eu-central\"").up_fails();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("node.region is \"eu-central\" but") && err.contains("region \"us-west\""),
        "{err}"
    );
    // The deployment secret is not in the environment.
    let (code, err) = node("sfo", "").up_fails();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("environment variable {SECRET_ENV} is not set")),
        "{err}"
    );
    // A broken regions.toml is reported with its own file and line.
    std::fs::write(&regions, "[regions.eu]\nedges = [\"sfo\"]\ncoordinator = \"nope\"\ndata_residency = \"gdpr\"\nservers = [\"nats://127.0.0.1:4222\"]\n").unwrap();
    let (code, err) = node("sfo", "").up_fails();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("regions.toml:3:") && err.contains("regions.eu.coordinator"),
        "{err}"
    );
}
