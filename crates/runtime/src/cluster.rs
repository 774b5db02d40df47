//! The cluster view behind the operator dashboard (`/_keel/cluster`,
//! `/_keel/ui`): every node publishes a snapshot of its own state every
//! second on [`SUBJECT`] (core NATS on the `GLOBAL` connection: operational,
//! non-personal data, so it crosses gateways) and keeps the latest snapshot
//! of every other node. The nodes expected are the edges of `regions.toml`
//! (just this node without one); one not heard from within
//! [`STALE_AFTER`] is `stale`, one never heard from is `down`.

use keel_bus::Bus;
use keel_telemetry::{CacheLevelMetrics, ComponentMetrics, Metrics};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where nodes publish their snapshots (in the `GLOBAL` account).
pub const SUBJECT: &str = "keel.global.nodes.stats";
/// How often a node publishes its snapshot.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
/// A node whose last snapshot is older than this is shown stale.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// One node's state, as it publishes it. Counters are totals since the node
/// started (the dashboard derives rates from successive snapshots).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct NodeSnapshot {
    pub region: String,
    pub edge: String,
    pub uptime_seconds: u64,
    /// When the snapshot was taken (Unix ms, the node's wall clock).
    pub at_ms: u64,
    pub bus: BusSnapshot,
    /// Writes waiting in the outbox for the region's stream.
    pub outbox_depth: i64,
    pub components: Vec<ComponentSnapshot>,
    pub cache: CacheSnapshot,
    pub sync: SyncSnapshot,
    /// Open live (server-sent events) connections to browsers.
    pub live_connections: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct BusSnapshot {
    /// `local` or `nats`.
    pub backend: String,
    /// The region's connection: `connected`, `connecting`, `disconnected`.
    pub region: String,
    /// The `GLOBAL` connection (`None`: the same as `region`).
    pub global: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ComponentSnapshot {
    pub name: String,
    pub requests: u64,
    pub server_errors: u64,
    pub traps: u64,
    pub in_flight: i64,
    /// Requests (and subscriber deliveries) timed, and their total time.
    pub latency_count: u64,
    pub latency_sum_seconds: f64,
    /// Since start; bucket upper bounds (factor 2 apart).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CacheLevelSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub invalidations: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CacheSnapshot {
    pub l1: CacheLevelSnapshot,
    pub l2: CacheLevelSnapshot,
    pub l3: CacheLevelSnapshot,
    /// `cache-loader` calls after a miss everywhere.
    pub loads: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SyncSnapshot {
    pub deltas_sent: u64,
    pub deltas_received: u64,
    /// Anti-entropy: digests published, full states pushed for repair.
    pub digests_sent: u64,
    pub repairs_sent: u64,
    pub rejected: u64,
    pub dropped: u64,
    /// Region and global events delivered to components' subscriptions,
    /// in how many `subscriber` calls.
    pub delivered_events: u64,
    pub delivered_batches: u64,
    /// Publication to delivery of the newest event of the last batch (ms):
    /// how far this node's subscriptions run behind.
    pub delivery_lag_ms: i64,
}

/// How a node is doing, as far as this node can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Heard from within [`STALE_AFTER`] (or this node itself).
    Up,
    /// Heard from, but not within [`STALE_AFTER`].
    Stale,
    /// Never heard from since this node started.
    Down,
}

/// One row of [`ClusterReport::nodes`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeEntry {
    pub region: String,
    pub edge: String,
    /// Listed in `regions.toml` (a node that is not still shows up).
    pub expected: bool,
    #[serde(rename = "self")]
    pub is_self: bool,
    pub status: NodeStatus,
    /// Time since its last snapshot arrived (`None`: never).
    pub age_ms: Option<u64>,
    /// Its last snapshot (`None`: never heard from).
    pub snapshot: Option<NodeSnapshot>,
}

/// `/_keel/cluster`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterReport {
    #[serde(rename = "self")]
    pub me: NodeSnapshot,
    pub stale_after_ms: u64,
    /// Expected nodes in `regions.toml` order (regions, then their edges),
    /// then any others heard from, by (region, edge).
    pub nodes: Vec<NodeEntry>,
}

type Snapshotter = Box<dyn Fn() -> NodeSnapshot + Send + Sync>;

/// What this node knows about every node of the deployment.
pub struct ClusterView {
    region: String,
    edge: String,
    /// (region, edge) of every node of `regions.toml`, in its order.
    expected: Vec<(String, String)>,
    /// Latest snapshot and its arrival per (region, edge), others only.
    peers: Mutex<BTreeMap<(String, String), (NodeSnapshot, Instant)>>,
    /// Takes this node's snapshot; set once components are loaded.
    snapshotter: OnceLock<Snapshotter>,
}

impl ClusterView {
    pub fn new(region: &str, edge: &str, expected: Vec<(String, String)>) -> ClusterView {
        let mut expected = expected;
        if expected.is_empty() {
            expected.push((region.to_string(), edge.to_string()));
        }
        ClusterView {
            region: region.to_string(),
            edge: edge.to_string(),
            expected,
            peers: Mutex::default(),
            snapshotter: OnceLock::new(),
        }
    }

    /// This node's snapshot now (identity only until [`ClusterView::start`]).
    pub fn snapshot(&self) -> NodeSnapshot {
        match self.snapshotter.get() {
            Some(f) => f(),
            None => NodeSnapshot {
                region: self.region.clone(),
                edge: self.edge.clone(),
                ..NodeSnapshot::default()
            },
        }
    }

    /// Keeps `s` as the latest of its node (arrived at `now`). This node's
    /// own snapshots (echoed by the bus) are ignored: it reports itself
    /// fresh.
    pub fn record(&self, s: NodeSnapshot, now: Instant) {
        if s.region == self.region && s.edge == self.edge {
            return;
        }
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.insert((s.region.clone(), s.edge.clone()), (s, now));
    }

    /// The cluster as of `now`, with `me` as this node's snapshot.
    pub fn report(&self, me: NodeSnapshot, now: Instant) -> ClusterReport {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let me_key = (self.region.clone(), self.edge.clone());
        let entry = |key: &(String, String), expected: bool, peers: &mut BTreeMap<_, _>| {
            if *key == me_key {
                return NodeEntry {
                    region: key.0.clone(),
                    edge: key.1.clone(),
                    expected,
                    is_self: true,
                    status: NodeStatus::Up,
                    age_ms: Some(0),
                    snapshot: Some(me.clone()),
                };
            }
            let heard: Option<(NodeSnapshot, Instant)> = peers.remove(key);
            let age = heard
                .as_ref()
                .map(|(_, at)| now.saturating_duration_since(*at));
            NodeEntry {
                region: key.0.clone(),
                edge: key.1.clone(),
                expected,
                is_self: false,
                status: match age {
                    None => NodeStatus::Down,
                    Some(a) if a > STALE_AFTER => NodeStatus::Stale,
                    Some(_) => NodeStatus::Up,
                },
                age_ms: age.map(|a| a.as_millis() as u64),
                snapshot: heard.map(|(s, _)| s),
            }
        };
        let mut nodes: Vec<NodeEntry> = self
            .expected
            .iter()
            .map(|k| entry(k, true, &mut peers))
            .collect();
        if !self.expected.contains(&me_key) {
            nodes.push(entry(&me_key, false, &mut peers));
        }
        let others: Vec<(String, String)> = peers.keys().cloned().collect();
        for k in others {
            nodes.push(entry(&k, false, &mut peers));
        }
        ClusterReport {
            me,
            stale_after_ms: STALE_AFTER.as_millis() as u64,
            nodes,
        }
    }

    /// Installs this node's snapshot source and starts publishing its
    /// snapshot every [`PUBLISH_INTERVAL`] on `bus` and collecting the
    /// others'. Both tasks run on `rt` and end with it. A second call does
    /// nothing.
    pub fn start(
        self: &Arc<Self>,
        source: SnapshotSource,
        bus: Arc<dyn Bus>,
        rt: &tokio::runtime::Handle,
    ) {
        if self
            .snapshotter
            .set(Box::new(move || source.take()))
            .is_err()
        {
            return;
        }
        let me = self.clone();
        let publisher = bus.clone();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Ok(payload) = serde_json::to_vec(&me.snapshot()) else {
                    continue;
                };
                if let Err(e) = publisher.publish(SUBJECT, Vec::new(), payload.into()).await {
                    tracing::debug!("node snapshot not published: {e}");
                }
            }
        });
        let me = self.clone();
        rt.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            let mut sub = loop {
                match bus.subscribe(SUBJECT, None).await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::debug!("node snapshots: {e}; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            while let Some(msg) = sub.next().await {
                match serde_json::from_slice::<NodeSnapshot>(&msg.payload) {
                    Ok(s) => me.record(s, Instant::now()),
                    Err(e) => tracing::debug!("undecodable node snapshot ignored: {e}"),
                }
            }
        });
    }
}

/// The handles a node's snapshot is read from: cheap clones of the
/// metrics' atomics and the bus connections.
pub struct SnapshotSource {
    region: String,
    edge: String,
    started: Instant,
    bus: Arc<dyn Bus>,
    /// `None`: the same connection as `bus`.
    global_bus: Option<Arc<dyn Bus>>,
    components: Vec<(String, ComponentMetrics)>,
    outbox: keel_telemetry::OutboxMetrics,
    cache: keel_telemetry::CacheMetrics,
    sync: keel_telemetry::SyncMetrics,
    live: keel_telemetry::LiveMetrics,
    deliveries: keel_telemetry::DeliveryMetrics,
}

impl SnapshotSource {
    pub fn new(
        services: &crate::Services,
        metrics: &Metrics,
        components: Vec<(String, ComponentMetrics)>,
    ) -> SnapshotSource {
        SnapshotSource {
            region: services.node.region.clone(),
            edge: services.node.edge.clone(),
            started: services.started,
            bus: services.bus.clone(),
            global_bus: (!Arc::ptr_eq(&services.bus, &services.global_bus))
                .then(|| services.global_bus.clone()),
            components,
            outbox: metrics.outbox.clone(),
            cache: metrics.cache.clone(),
            sync: metrics.sync.clone(),
            live: metrics.live.clone(),
            deliveries: metrics.deliveries.clone(),
        }
    }

    fn take(&self) -> NodeSnapshot {
        let level = |l: &CacheLevelMetrics| CacheLevelSnapshot {
            hits: l.hits.get(),
            misses: l.misses.get(),
            evictions: l.evictions.get(),
            invalidations: l.invalidations.get(),
            errors: l.errors.get(),
        };
        let ms = |s: Option<f64>| s.map(|s| s * 1000.0);
        NodeSnapshot {
            region: self.region.clone(),
            edge: self.edge.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            bus: BusSnapshot {
                backend: self.bus.kind().to_string(),
                region: self.bus.connection_state().as_str().to_string(),
                global: self
                    .global_bus
                    .as_ref()
                    .map(|b| b.connection_state().as_str().to_string()),
            },
            outbox_depth: self.outbox.depth.get(),
            components: self
                .components
                .iter()
                .map(|(name, m)| {
                    let l = m.latency();
                    ComponentSnapshot {
                        name: name.clone(),
                        requests: m.total_requests(),
                        server_errors: m.server_errors(),
                        traps: m.traps.get(),
                        in_flight: m.in_flight.get(),
                        latency_count: l.count,
                        latency_sum_seconds: l.sum_seconds,
                        p50_ms: ms(l.p50_seconds),
                        p99_ms: ms(l.p99_seconds),
                    }
                })
                .collect(),
            cache: CacheSnapshot {
                l1: level(&self.cache.l1),
                l2: level(&self.cache.l2),
                l3: level(&self.cache.l3),
                loads: self.cache.loads.get(),
            },
            sync: SyncSnapshot {
                deltas_sent: self.sync.deltas_sent.get(),
                deltas_received: self.sync.deltas_received.get(),
                digests_sent: self.sync.digests_sent.get(),
                repairs_sent: self.sync.repairs_sent.get(),
                rejected: self.sync.rejected.get(),
                dropped: self.sync.dropped.get(),
                delivered_events: self.deliveries.events.get(),
                delivered_batches: self.deliveries.batches.get(),
                delivery_lag_ms: self.deliveries.lag_ms.get(),
            },
            live_connections: self.live.connections.get(),
        }
    }
}

/// (region, edge) of every edge of `regions.toml`, in its order.
pub fn expected_nodes(regions: Option<&keel_config::RegionsConfig>) -> Vec<(String, String)> {
    regions.map_or_else(Vec::new, |r| {
        r.regions
            .iter()
            .flat_map(|g| g.edges.iter().map(|e| (g.name.clone(), e.clone())))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(region: &str, edge: &str, requests: u64) -> NodeSnapshot {
        NodeSnapshot {
            region: region.into(),
            edge: edge.into(),
            components: vec![ComponentSnapshot {
                name: "c".into(),
                requests,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn expected() -> Vec<(String, String)> {
        [("eu", "fra"), ("eu", "ams"), ("us", "nyc")]
            .map(|(r, e)| (r.to_string(), e.to_string()))
            .into()
    }

    fn statuses(r: &ClusterReport) -> Vec<(String, NodeStatus, bool)> {
        r.nodes
            .iter()
            .map(|n| (n.edge.clone(), n.status, n.expected))
            .collect()
    }

    #[test]
    fn expected_nodes_never_heard_from_are_down_and_self_is_up() {
        let v = ClusterView::new("eu", "fra", expected());
        let r = v.report(snap("eu", "fra", 3), Instant::now());
        assert_eq!(
            statuses(&r),
            vec![
                ("fra".into(), NodeStatus::Up, true),
                ("ams".into(), NodeStatus::Down, true),
                ("nyc".into(), NodeStatus::Down, true),
            ]
        );
        assert!(r.nodes[0].is_self);
        assert_eq!(
            r.nodes[0].snapshot.as_ref().unwrap().components[0].requests,
            3
        );
        assert_eq!(r.me.edge, "fra");
        assert_eq!(r.nodes[1].age_ms, None);
        assert_eq!(r.nodes[1].snapshot, None);
    }

    #[test]
    fn the_latest_snapshot_wins_and_goes_stale_after_the_bound() {
        let v = ClusterView::new("eu", "fra", expected());
        let t0 = Instant::now();
        v.record(snap("eu", "ams", 1), t0);
        v.record(snap("eu", "ams", 7), t0 + Duration::from_secs(2));
        v.record(snap("us", "nyc", 2), t0);
        // The node's own echo is ignored: it reports itself fresh.
        v.record(snap("eu", "fra", 99), t0);

        let r = v.report(snap("eu", "fra", 5), t0 + Duration::from_secs(5));
        assert_eq!(
            statuses(&r),
            vec![
                ("fra".into(), NodeStatus::Up, true),
                ("ams".into(), NodeStatus::Up, true),
                ("nyc".into(), NodeStatus::Up, true),
            ]
        );
        assert_eq!(
            r.nodes[0].snapshot.as_ref().unwrap().components[0].requests,
            5
        );
        assert_eq!(
            r.nodes[1].snapshot.as_ref().unwrap().components[0].requests,
            7
        );
        assert_eq!(r.nodes[1].age_ms, Some(3000));

        let later = t0 + STALE_AFTER + Duration::from_millis(1500);
        let r = v.report(snap("eu", "fra", 5), later);
        assert_eq!(
            statuses(&r),
            vec![
                ("fra".into(), NodeStatus::Up, true),
                ("ams".into(), NodeStatus::Up, true),
                ("nyc".into(), NodeStatus::Stale, true),
            ]
        );
        // A stale node keeps its last snapshot; a new one makes it up again.
        assert!(r.nodes[2].snapshot.is_some());
        v.record(snap("us", "nyc", 3), later);
        let r = v.report(snap("eu", "fra", 5), later);
        assert_eq!(r.nodes[2].status, NodeStatus::Up);
    }

    #[test]
    fn nodes_outside_regions_toml_are_listed_after_the_expected_ones() {
        let v = ClusterView::new("eu", "fra", expected());
        let t0 = Instant::now();
        v.record(snap("ap", "syd", 1), t0);
        let r = v.report(snap("eu", "fra", 0), t0);
        assert_eq!(r.nodes.len(), 4);
        assert_eq!(
            (
                r.nodes[3].edge.as_str(),
                r.nodes[3].expected,
                r.nodes[3].status
            ),
            ("syd", false, NodeStatus::Up)
        );

        // Without regions.toml the node expects only itself.
        let alone = ClusterView::new("local", "dev", Vec::new());
        let r = alone.report(snap("local", "dev", 0), t0);
        assert_eq!(statuses(&r), vec![("dev".into(), NodeStatus::Up, true)]);
    }

    #[test]
    fn snapshots_round_trip_and_tolerate_unknown_or_missing_fields() {
        let s = snap("eu", "ams", 4);
        let bytes = serde_json::to_vec(&s).unwrap();
        assert_eq!(serde_json::from_slice::<NodeSnapshot>(&bytes).unwrap(), s);
        let newer = serde_json::json!({"region": "eu", "edge": "ams", "future": 1});
        let old: NodeSnapshot = serde_json::from_value(newer).unwrap();
        assert_eq!((old.region.as_str(), old.edge.as_str()), ("eu", "ams"));
    }

    #[test]
    fn expected_nodes_follow_regions_toml_order() {
        let text = "[regions.eu]\nedges = [\"fra\", \"ams\"]\ncoordinator = \"fra\"\ndata_residency = \"gdpr\"\nservers = [{ host = \"127.0.0.1\", client = 4222, cluster = 6222, gateway = 7222, monitor = 8222 }]\n\n[regions.us]\nedges = [\"nyc\"]\ncoordinator = \"nyc\"\ndata_residency = \"us\"\nservers = [{ host = \"127.0.0.1\", client = 4223, cluster = 6223, gateway = 7223, monitor = 8223 }]\n\n[coordination]\nconsensus_protocol = \"raft\"\n\n[nats]\nsecret_env = \"S\"\nstore_dir = \"/tmp/x\"\n";
        let r =
            keel_config::RegionsConfig::parse(std::path::Path::new("regions.toml"), text).unwrap();
        let got = expected_nodes(Some(&r));
        let want: Vec<(String, String)> = [("eu", "fra"), ("eu", "ams"), ("us", "nyc")]
            .map(|(r, e)| (r.to_string(), e.to_string()))
            .into();
        assert_eq!(got, want);
        assert_eq!(expected_nodes(None), Vec::new());
    }
}
