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
const JWT_SECRET: &str = "regions-test-jwt-secret-of-32-bytes!";

/// A valid session token for `user` (HS256, no issuer/audience checks).
fn user_token(user: &str) -> String {
    hs256_token(user, JWT_SECRET)
}

/// An HS256 token for `user` signed with `secret`, valid for 10 minutes.
pub(crate) fn hs256_token(user: &str, secret: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

const SECRET: &str = "regions-test-secret";
/// Deadline for anything that should arrive promptly.
const WAIT: Duration = Duration::from_secs(30);

pub(crate) struct RegionSpec {
    pub(crate) name: &'static str,
    pub(crate) residency: &'static str,
    pub(crate) edges: &'static [&'static str],
    pub(crate) servers: usize,
}

/// A running topology: the regions.toml on disk and its NATS servers.
pub(crate) struct World {
    _dir: tempfile::TempDir,
    path: PathBuf,
    pub(crate) regions: RegionsConfig,
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

pub(crate) fn world(specs: &[RegionSpec]) -> World {
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
        rendered.into_iter().map(ServerSpec::from).collect()
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
    pub(crate) async fn client(&self, edge: &str, global: bool) -> NatsBus {
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

    /// Where the NATS servers keep their JetStream stores.
    pub(crate) fn nats_store(&self) -> PathBuf {
        self._dir.path().join("nats")
    }

    fn server_url(&self, region: &str) -> String {
        self.regions.region(region).unwrap().servers[0].client_url()
    }

    /// A keel node for `edge` serving edge-probe at `/probe/...`; with
    /// `servers`, it reaches NATS there instead (a fault proxy).
    fn edge_node(&self, edge: &str, servers: Option<&str>) -> Node {
        self.node(
            edge,
            servers,
            &component(
                "probe",
                "edge-probe",
                "/probe/...",
                r#"grants = ["edge-operations", "events", "kv", "sql"]"#,
            ),
        )
    }

    /// A keel node for `edge` with `components` (keel.toml tables); with
    /// `servers`, it reaches NATS there instead (a fault proxy).
    pub(crate) fn node(&self, edge: &str, servers: Option<&str>, components: &str) -> Node {
        let bus = servers
            .map(|s| format!("event-stream = {{ type = \"nats\", servers = [\"{s}\"] }}"))
            .unwrap_or_default();
        let mut node = Node::new(&format!(
            "[node]\nedge = \"{edge}\"\nregions = {:?}\n\n[infrastructure]\n{bus}\n\n{components}",
            self.path.display().to_string(),
        ));
        node.env.push((SECRET_ENV.into(), SECRET.into()));
        node
    }
}

impl World {
    /// A keel node for `edge` serving regional-probe at `/reg/...`
    /// (tokens: HS256 with [`JWT_SECRET`]).
    fn regional_node(&self, edge: &str) -> Node {
        let mut node = Node::new(&format!(
            "[node]\nedge = \"{edge}\"\nregions = {:?}\n\n[auth]\n[[auth.keys]]\nalgorithm = \"HS256\"\nsecret = \"{JWT_SECRET}\"\n\n{}",
            self.path.display().to_string(),
            component(
                "reg",
                "regional-probe",
                "/reg/...",
                r#"grants = ["regional-coordination", "global-coordination", "edge-operations", "kv"]"#
            )
        ));
        node.env.push((SECRET_ENV.into(), SECRET.into()));
        node
    }
}

/// Polls `GET path` on `node` until `f` holds for its status and JSON.
async fn poll_json(
    node: &Keel,
    path: &str,
    what: &str,
    f: impl Fn(u16, &serde_json::Value) -> bool,
) -> serde_json::Value {
    node.poll("GET", path, "", what, f).await
}

/// The tests' own runtime: they are plain `#[test]`s because starting NATS
/// servers and keel processes blocks.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
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
            // Personal payloads are sealed with the user's key, which the
            // region's own account can read.
            let keys = keel_coord::shred::UserKeys::new(
                Arc::new(bus),
                keel_coord::shred::user_keys_spec(region, 1, None),
            );
            for e in &events {
                assert_eq!(e.event_type, "order.placed");
                assert!(writers.contains(&e.edge()), "{e:?}");
                assert_eq!(e.source, format!("keel://{region}/{}/probe", e.edge()));
                let user = e.keeluser.clone().unwrap();
                let n = user.rsplit('-').next().unwrap();
                let plaintext = format!("secret-{}-{n}", e.edge());
                assert!(e.is_sealed(), "{e:?}");
                assert!(
                    !String::from_utf8_lossy(&e.data()).contains("secret-"),
                    "{e:?}"
                );
                let key = keys
                    .for_reading(&user, e.keelkey.as_deref().unwrap())
                    .await
                    .unwrap()
                    .expect("the user's key exists");
                let mut opened = e.clone();
                assert!(opened.open(&key), "{e:?}");
                assert_eq!(String::from_utf8(opened.data()).unwrap(), plaintext);
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

/// The regional tier across edges: a subscription on one edge receives
/// events recorded on another edge of its region (and none of another
/// region); user state, metrics and leaderboards aggregate the region's
/// edges; migrations move a user's home between regions of one residency
/// zone and are refused across zones.
#[test]
fn regional_coordination_spans_the_edges_of_a_region() {
    let _heavy = heavy_test();
    let world = world(&[
        RegionSpec {
            name: "us-east",
            residency: "us",
            edges: &["nyc", "bos"],
            servers: 1,
        },
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
    ]);
    let rt = runtime();
    let nodes = BTreeMap::from(["nyc", "bos", "sfo", "fra"].map(|e| (e, world.regional_node(e))));
    let keels: BTreeMap<&str, Keel> = nodes.iter().map(|(e, n)| (*e, n.start())).collect();
    let (nyc, bos, sfo, fra) = (&keels["nyc"], &keels["bos"], &keels["sfo"], &keels["fra"]);
    rt.block_on(async {
        for k in [nyc, bos, sfo, fra] {
            k.wait_ready(|v| v["bus"]["state"] == "connected").await;
        }
        // Subscriptions on bos and sfo; events recorded at nyc.
        let sub = bos
            .post("/reg/subscribe", json!({"kinds": ["order"]}).to_string())
            .await;
        assert_eq!(sub.status, 200, "{}", sub.body);
        let west = sfo.post("/reg/subscribe", json!({}).to_string()).await;
        assert_eq!(west.status, 200, "{}", west.body);
        for (kind, key) in [("order", "o-1"), ("note", "n-1"), ("order", "o-2")] {
            let r = nyc
                .post(
                    "/reg/event",
                    json!({"kind": kind, "key": key, "payload": key}).to_string(),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
        let got = poll_json(
            bos,
            "/reg/deliveries?prefix=update/",
            "2 orders at bos",
            |_, v| v.as_array().is_some_and(|a| a.len() == 2),
        )
        .await;
        assert_eq!(got[0]["key"], "o-1");
        assert_eq!(got[1]["key"], "o-2");
        assert_eq!(got[0]["origin"], "nyc");
        assert_eq!(got[0]["region"], "us-east");

        // Activity at nyc is the region's view at bos.
        let r = nyc
            .post(
                "/reg/activity/alice",
                json!({"kind": "login", "attributes": {}}).to_string(),
            )
            .await;
        assert_eq!(r.status, 204, "{}", r.body);
        let alice = poll_json(bos, "/reg/user/alice", "alice at bos", |s, v| {
            s == 200 && v["last_activity"] == "login"
        })
        .await;
        assert_eq!(alice["online_edges"], json!(["nyc"]));
        assert_eq!(alice["home_region"], "us-east");
        // Metrics from both edges add up; leaderboard updates converge.
        for (k, v) in [(nyc, 2.0), (bos, 4.0)] {
            let r = k.post(&format!("/reg/metric/load?value={v}"), "").await;
            assert_eq!(r.status, 204, "{}", r.body);
            let r = k
                .post(
                    "/reg/leaderboard/top",
                    json!([{"member": "alice", "delta": 5}]).to_string(),
                )
                .await;
            assert_eq!(r.status, 204, "{}", r.body);
        }
        let m = poll_json(
            nyc,
            "/reg/metrics/load?start=0&end=18446744073709551615",
            "both samples at nyc",
            |_, v| {
                v["points"].as_array().is_some_and(|p| {
                    p.iter().map(|p| p["count"].as_u64().unwrap()).sum::<u64>() == 2
                })
            },
        )
        .await;
        let sum: f64 = m["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["sum"].as_f64().unwrap())
            .sum();
        assert_eq!(sum, 6.0);
        for k in [nyc, bos] {
            poll_json(k, "/reg/leaderboard/top", "converged scores", |_, v| {
                *v == json!([{"rank": 1, "member": "alice", "score": 10}])
            })
            .await;
        }
        // Nothing of us-east in us-west.
        assert_eq!(sfo.get("/reg/user/alice").await.status, 404);
        let m = sfo
            .get("/reg/metrics/load?start=0&end=18446744073709551615")
            .await
            .json();
        assert_eq!(m["points"], json!([]));
        assert_eq!(sfo.get("/reg/leaderboard/top").await.json(), json!([]));

        // Migration: us-east -> us-west (one zone), started in the source.
        let r = nyc
            .post(
                "/reg/migrate",
                json!({"user": "alice", "from": "us-east", "to": "us-west"}).to_string(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let id = r.json()["id"].as_str().unwrap().to_string();
        let done = poll_json(nyc, &format!("/reg/migrate/{id}"), "completed", |_, v| {
            v["phase"] == "completed" || v["phase"] == "failed"
        })
        .await;
        assert_eq!(done["phase"], "completed", "{done}");
        let moved = poll_json(sfo, "/reg/user/alice", "alice in us-west", |s, v| {
            s == 200 && v["last_activity"] == "login"
        })
        .await;
        assert_eq!(moved["home_region"], "us-west");
        let left = poll_json(
            bos,
            "/reg/user/alice",
            "alice tombstoned in us-east",
            |s, v| s == 200 && v["last_activity"].is_null(),
        )
        .await;
        assert_eq!(left["home_region"], "us-west");
        // Again: the user is no longer homed in us-east.
        let r = nyc
            .post(
                "/reg/migrate",
                json!({"user": "alice", "from": "us-east", "to": "us-west"}).to_string(),
            )
            .await;
        assert_eq!(r.status, 409, "{}", r.body);
        // Across residency zones: refused, nothing written.
        let r = nyc
            .post(
                "/reg/migrate",
                json!({"user": "bob", "from": "us-east", "to": "eu-central"}).to_string(),
            )
            .await;
        assert_eq!(
            (r.status, r.json()["error"].clone()),
            (403, json!("residency")),
            "{}",
            r.body
        );
        // Started outside the source region: invalid.
        let r = sfo
            .post(
                "/reg/migrate",
                json!({"user": "carol", "from": "us-east", "to": "us-west"}).to_string(),
            )
            .await;
        assert_eq!(r.status, 400, "{}", r.body);

        // Global events: published at nyc, delivered once in every region
        // (the GLOBAL account crosses the zones), also when published twice.
        for k in [bos, sfo, fra] {
            let r = k
                .post("/reg/global/subscribe", json!(["news.>"]).to_string())
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
        let news = json!({"id": "n-1", "event_type": "news.flash", "data": "hello world"});
        for _ in 0..2 {
            let r = nyc.post("/reg/global/publish", news.to_string()).await;
            assert_eq!(r.status, 204, "{}", r.body);
        }
        let marker = json!({"id": "n-2", "event_type": "news.marker", "data": ""});
        let r = nyc.post("/reg/global/publish", marker.to_string()).await;
        assert_eq!(r.status, 204, "{}", r.body);
        for k in [bos, sfo, fra] {
            let got = poll_json(k, "/reg/deliveries?prefix=global/", "both news", |_, v| {
                v.as_array().is_some_and(|a| a.len() >= 2)
            })
            .await;
            let ids: Vec<&str> = got
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap())
                .collect();
            assert_eq!(ids, ["n-1", "n-2"], "{got}");
            assert_eq!(got[0]["origin_region"], "us-east");
            assert_eq!(got[0]["data"], "hello world");
        }
        // Residency of writes: eve signs in at fra and is homed in
        // eu-central (the directory's first claim wins); her personal data
        // is then refused on US edges and accepted in the EU.
        let r = fra
            .send(
                "POST",
                "/reg/auth",
                &[("authorization", &format!("Bearer {}", user_token("eve")))],
                bytes::Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["home_region"], "eu-central");
        let r = nyc
            .send(
                "POST",
                "/reg/auth",
                &[("authorization", &format!("Bearer {}", user_token("eve")))],
                bytes::Bytes::new(),
            )
            .await;
        assert_eq!(r.json()["home_region"], "eu-central", "{}", r.body);
        let personal = json!({"kind": "note", "key": "k", "payload": "p", "user": "eve"});
        for (path, body) in [
            ("/reg/event", personal.clone()),
            ("/reg/sync", json!([personal.clone()])),
            (
                "/reg/activity/eve",
                json!({"kind": "login", "attributes": {}}),
            ),
        ] {
            let r = nyc.post(path, body.to_string()).await;
            assert_eq!(
                (r.status, r.json()["error"].clone()),
                (403, json!("residency")),
                "{path}: {}",
                r.body
            );
            let ok = fra.post(path, body.to_string()).await;
            assert!(ok.status == 200 || ok.status == 204, "{path}: {}", ok.body);
        }
        // Residency: personal global events of users homed in a restricted
        // zone are refused (eve is unknown to the directory: she lives where
        // she is seen, eu-central; alice lives in us-west).
        for (k, user) in [(fra, "eve"), (nyc, "alice")] {
            let ev = json!({"id": "p-1", "event_type": "user.seen", "data": "", "user": user});
            let r = k.post("/reg/global/publish", ev.to_string()).await;
            assert_eq!(
                (r.status, r.json()["error"].clone()),
                (403, json!("residency")),
                "{user}: {}",
                r.body
            );
        }
        // Global queries reach every region, across zones.
        let topo = sfo
            .post("/reg/global/query", json!({"topology": null}).to_string())
            .await
            .json();
        let names: Vec<&str> = topo
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["us-east", "us-west", "eu-central"]);
        assert_eq!(topo[2]["data_residency"], "gdpr");
        assert_eq!(
            fra.post(
                "/reg/global/query",
                json!({"home_region": "alice"}).to_string()
            )
            .await
            .json(),
            "us-west"
        );
        let metric = fra
            .post(
                "/reg/global/query",
                json!({"metric": {"metric_type": "load", "start_ms": 0, "end_ms": u64::MAX}})
                    .to_string(),
            )
            .await;
        assert_eq!(metric.status, 200, "{}", metric.body);
        let series = metric.json();
        let regions: Vec<&str> = series
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["region"].as_str().unwrap())
            .collect();
        assert_eq!(regions, ["eu-central", "us-east", "us-west"], "{series}");
        assert_eq!(series[1]["points"][0]["count"], 2, "{series}");
        let r = sfo
            .post(
                "/reg/leaderboard/top",
                json!([{"member": "alice", "delta": 1}]).to_string(),
            )
            .await;
        assert_eq!(r.status, 204, "{}", r.body);
        poll_json(sfo, "/reg/leaderboard/top", "sfo's score", |_, v| {
            *v == json!([{"rank": 1, "member": "alice", "score": 1}])
        })
        .await;
        let lb = bos
            .post(
                "/reg/global/query",
                json!({"leaderboard": {"category": "top", "limit": 3}}).to_string(),
            )
            .await;
        assert_eq!(
            lb.json(),
            json!([{"rank": 1, "member": "alice", "score": 11}])
        );
        let report = fra
            .post(
                "/reg/global/report/events",
                json!({"start_ms": 0, "end_ms": u64::MAX}).to_string(),
            )
            .await;
        assert_eq!(report.status, 200, "{}", report.body);
        let report = report.json();
        assert_eq!(report["missing_regions"], json!([]));
        let body: serde_json::Value =
            serde_json::from_str(report["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["regions"]["us-east"]["order"]["count"], 2, "{body}");
        assert_eq!(body["regions"]["us-east"]["note"]["count"], 1, "{body}");

        // Global user search: every region's users of the component; a
        // display name only where the user's residency allows it (eve is
        // homed in eu-central: her name never leaves the EU); partial,
        // and saying so, when a region does not answer.
        for (node, user, name) in [
            (nyc, "srch-ann", "Srch Ann"),
            (sfo, "srch-bob", "Srch Bob"),
            (fra, "eve", "Srchy Eve"),
        ] {
            let r = node
                .post(
                    &format!("/reg/activity/{user}"),
                    json!({"kind": "sign-in", "attributes": {"display-name": name}}).to_string(),
                )
                .await;
            assert_eq!(r.status, 204, "{}", r.body);
        }
        let search = json!({"name_prefix": "SRCH", "limit": 10}).to_string();
        let found = nyc
            .poll(
                "POST",
                "/reg/global/search",
                &search,
                "three users found",
                |s, v| s == 200 && v["users"].as_array().is_some_and(|u| u.len() == 3),
            )
            .await;
        let by_user = |v: &serde_json::Value, user: &str| {
            v["users"]
                .as_array()
                .unwrap()
                .iter()
                .find(|u| u["user"] == user)
                .cloned()
                .unwrap_or_else(|| panic!("{user} not found: {v}"))
        };
        assert_eq!(found["missing_regions"], json!([]), "{found}");
        assert_eq!(
            found["regions"],
            json!(["eu-central", "us-east", "us-west"])
        );
        let ann = by_user(&found, "srch-ann");
        assert_eq!(
            (&ann["home_region"], &ann["display_name"]),
            (&json!("us-east"), &json!("Srch Ann"))
        );
        assert_eq!(by_user(&found, "srch-bob")["home_region"], "us-west");
        let eve = by_user(&found, "eve");
        assert_eq!(eve["home_region"], "eu-central");
        assert_eq!(
            eve["display_name"],
            json!(null),
            "a gdpr user's name left the EU: {found}"
        );
        // In the EU her name is shown; the home filter keeps only her.
        let eu = json!({"name_prefix": "srch", "home_region": "eu-central", "limit": 10});
        let r = fra.post("/reg/global/search", eu.to_string()).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let users = r.json()["users"].clone();
        assert_eq!(users.as_array().map(Vec::len), Some(1), "{users}");
        assert_eq!(users[0]["display_name"], "Srchy Eve");
        let r = nyc
            .post("/reg/global/search", json!({"limit": 0}).to_string())
            .await;
        assert_eq!(r.status, 400, "{}", r.body);
        // us-west stops: the answer is partial and says which region is missing.
        sfo.sigterm();
        let partial = nyc
            .poll(
                "POST",
                "/reg/global/search",
                &search,
                "us-west missing",
                |s, v| s == 200 && v["missing_regions"] == json!(["us-west"]),
            )
            .await;
        assert_eq!(
            partial["regions"],
            json!(["eu-central", "us-east"]),
            "{partial}"
        );
        let users: Vec<&str> = partial["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["user"].as_str().unwrap())
            .collect();
        assert!(!users.contains(&"srch-bob"), "{partial}");
        assert!(
            users.contains(&"srch-ann") && users.contains(&"eve"),
            "{partial}"
        );
    });
    // Every global query above, from every region, is in one audit chain.
    let records = crate::audit::verified_records(&nodes["fra"]);
    assert!(records >= 8, "{records} audit records");
    assert_eq!(crate::audit::verified_records(&nodes["nyc"]), records);
    // A record appended by someone on the bus, without the chain key, is
    // found and named.
    rt.block_on(async {
        let bus = world.client("nyc", true).await;
        let subject = format!("keel.global.audit.$keel.{}", hex_of("audit"));
        let last = bus
            .stream_last("KEEL_AUDIT", &subject)
            .await
            .unwrap()
            .unwrap();
        let mut forged: serde_json::Value = serde_json::from_slice(&last.payload).unwrap();
        forged["seq"] = json!(records + 1);
        forged["prev"] = forged["hash"].clone();
        forged["operation"] = json!("process-data-deletion");
        bus.stream_append(&subject, vec![], forged.to_string().into(), None)
            .await
            .unwrap();
    });
    let (code, out, err) = nodes["fra"].audit_verify();
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!("(chain seq {})", records + 1)),
        "{err}"
    );
}

fn hex_of(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// `migrate-user-region` killed right after each phase's effect (before the
/// phase is recorded) resumes after a restart and ends with exactly one
/// home, the copy in the target region once and the source tombstoned once.
#[test]
fn migration_resumes_after_a_crash_at_each_step() {
    let _heavy = heavy_test();
    let world = world(&[
        RegionSpec {
            name: "us-east",
            residency: "us",
            edges: &["nyc", "bos"],
            servers: 1,
        },
        RegionSpec {
            name: "us-west",
            residency: "us",
            edges: &["sfo", "lax"],
            servers: 1,
        },
    ]);
    let rt = runtime();
    let nyc_node = world.regional_node("nyc");
    let sfo_node = world.regional_node("sfo");
    let sfo = sfo_node.start();
    let east = rt.block_on(world.client("nyc", false));
    let west = rt.block_on(world.client("sfo", false));
    for phase in ["copying", "switching-home", "tombstoning-source"] {
        let user = format!("user-{phase}");
        // The crashing run and the resuming run share nyc's data dir: the
        // env var is the only difference.
        let mut nyc = nyc_node.start_with_env(&[("KEEL_TEST_CRASH_MIGRATION_AFTER", phase)]);
        let id = rt.block_on(async {
            nyc.wait_ready(|v| v["bus"]["state"] == "connected").await;
            let r = nyc
                .post(
                    &format!("/reg/activity/{user}"),
                    json!({"kind": "seen", "attributes": {}}).to_string(),
                )
                .await;
            assert_eq!(r.status, 204, "{}", r.body);
            poll_json(
                &nyc,
                &format!("/reg/user/{user}"),
                "the activity in the view",
                |s, v| s == 200 && v["last_activity"] == "seen",
            )
            .await;
            let r = nyc
                .post(
                    "/reg/migrate",
                    json!({"user": user, "from": "us-east", "to": "us-west"}).to_string(),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["id"].as_str().unwrap().to_string()
        });
        let status = wait_with_deadline(&mut nyc.child, WAIT)
            .unwrap_or_else(|| panic!("nyc did not crash after {phase}:\n{}", nyc.log()));
        assert!(!status.success(), "{phase}: {status:?}");
        drop(nyc);
        let nyc = nyc_node.start();
        rt.block_on(async {
            let done = poll_json(
                &nyc,
                &format!("/reg/migrate/{id}"),
                "resumed to completion",
                |_, v| v["phase"] == "completed" || v["phase"] == "failed",
            )
            .await;
            assert_eq!(done["phase"], "completed", "{phase}: {done}");
            let moved = poll_json(
                &sfo,
                &format!("/reg/user/{user}"),
                "the copy in us-west",
                |s, v| s == 200 && v["last_activity"] == "seen",
            )
            .await;
            assert_eq!(moved["home_region"], "us-west", "{phase}");
            poll_json(
                &nyc,
                &format!("/reg/user/{user}"),
                "the tombstone in us-east",
                |s, v| s == 200 && v["last_activity"].is_null() && v["home_region"] == "us-west",
            )
            .await;
            // Exactly once in each stream.
            let origin = format!("migration.{id}");
            let copies = read_stream(&west, &keel_topology::stream_name("us-west"))
                .await
                .into_iter()
                .filter(|e| e.keelorigin == origin)
                .count();
            assert_eq!(copies, 1, "{phase}: copies of the user's state in us-west");
            let tombstones = read_stream(&east, &keel_topology::stream_name("us-east"))
                .await
                .into_iter()
                .filter(|e| e.keelorigin == format!("{origin}.tombstone"))
                .count();
            assert_eq!(tombstones, 1, "{phase}: tombstones in us-east");
        });
        nyc.stop();
    }
}
