//! The node's adapters, shared by every component: stores, auth, caches,
//! the bus and state sync.

use keel_bus::Bus;
use keel_cache::LocalCache;
use keel_config::{
    Diagnostic, Diagnostics, EventLogBackend, EventStreamBackend, KeelConfig, KvBackend,
    NodeConfig, RegionsConfig, SqlBackend, StateBackend,
};
use keel_store::{EdgeStore, EventLog, KvStore, SqlStore, StoreLimits};
use keel_telemetry::Metrics;
use std::sync::Arc;

/// Bytes of L1 cache per node.
const L1_BYTES: u64 = 64 * 1024 * 1024;

/// Everything a host interface may call. Built once per process.
pub struct Services {
    pub node: NodeConfig,
    pub limits: StoreLimits,
    pub kv: Arc<dyn KvStore>,
    pub events: Arc<dyn EventLog>,
    pub edge: Arc<dyn EdgeStore>,
    pub sql: Arc<dyn SqlStore>,
    pub auth: Arc<keel_auth::Authenticator>,
    pub local_cache: LocalCache,
    /// The region's bus (in a `regions.toml` deployment: the connection in
    /// the region's residency-zone account).
    pub bus: Arc<dyn Bus>,
    /// The bus of `keel.global.>` (the `GLOBAL` account); the same as `bus`
    /// outside a `regions.toml` deployment.
    pub global_bus: Arc<dyn Bus>,
    pub sync: keel_sync::Sync,
    /// Runs the bus connection and the sync tasks, apart from the serving
    /// threads (which run one current-thread runtime per core).
    background: Option<tokio::runtime::Runtime>,
}

impl Drop for Services {
    fn drop(&mut self) {
        // Dropping a runtime from async context panics; never block here.
        if let Some(rt) = self.background.take() {
            rt.shutdown_background();
        }
    }
}

impl Services {
    /// Opens the backends `[infrastructure]` selects, under `data-dir`.
    /// Connecting to NATS does not wait for the servers: a node started
    /// during a partition serves, and its bus reports `connecting`.
    pub fn open(config: &KeelConfig, metrics: &Metrics) -> Result<Arc<Services>, Diagnostics> {
        let KvBackend::RocksDb {
            max_key_bytes,
            max_value_bytes,
        } = config.infrastructure.kv;
        let EventLogBackend::RocksDb { max_event_bytes } = config.infrastructure.event_log;
        let SqlBackend::Sqlite {
            max_rows,
            max_result_bytes,
            max_param_bytes,
            statement_timeout,
        } = config.infrastructure.sql;
        let limits = StoreLimits {
            max_key_bytes,
            max_value_bytes,
            max_event_bytes,
            max_rows,
            max_result_bytes,
            statement_timeout,
            ..StoreLimits::default()
        };
        let sql_limits = StoreLimits {
            max_value_bytes: max_param_bytes,
            ..limits
        };
        let data = &config.server.data_dir;
        let fail = |what: &str, e: keel_store::StoreError| {
            Diagnostics::one(Diagnostic::file(
                &config.path,
                format!("cannot open the {what} under {}: {e}", data.display()),
            ))
        };
        let rocks = keel_store_rocksdb::RocksStore::open(
            &data.join("rocksdb"),
            keel_store_rocksdb::RocksOptions {
                limits,
                node: keel_store_rocksdb::NodeIdentity {
                    edge: config.node.edge.clone(),
                    region: config.node.region.clone(),
                },
                // The embedded node is its own region: nothing to forward to.
                forwarding: config.regions.is_some(),
                block_cache_bytes: 16 << 20,
            },
        )
        .map_err(|e| fail("RocksDB store (kv, event log)", e))?;
        let sql = keel_store_sqlite::SqliteStore::open(&data.join("sql"), sql_limits)
            .map_err(|e| fail("SQLite databases", e))?;
        let auth = keel_auth::Authenticator::from_config(&config.auth)?;
        let rocks = Arc::new(rocks);
        let background = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keel-bus")
            .enable_all()
            .build()
            .map_err(|e| {
                Diagnostics::one(Diagnostic::file(
                    &config.path,
                    format!("cannot start the bus runtime: {e}"),
                ))
            })?;
        let buses = connect(config, &background)?;
        let bus = buses.region.clone();
        watch_connection(&background, bus.clone(), metrics.bus.clone());
        if let Some(regions) = &config.regions {
            let region = &config.node.region;
            keel_coord::start_forwarder(
                rocks.clone(),
                bus.clone(),
                keel_coord::ForwarderOptions {
                    region: region.clone(),
                    edge: config.node.edge.clone(),
                    stream: region_stream(regions, region),
                },
                metrics.outbox.clone(),
                background.handle(),
            );
        }
        let StateBackend::RocksDb {
            anti_entropy_interval,
            max_state_bytes,
        } = config.infrastructure.state;
        let sync = keel_sync::Sync::start(
            rocks.clone(),
            buses.clone(),
            keel_sync::SyncOptions {
                edge: config.node.edge.clone(),
                region: config.node.region.clone(),
                anti_entropy_interval,
                max_state_bytes,
                max_key_bytes,
                max_value_bytes,
                max_clock_drift: std::time::Duration::from_secs(60),
            },
            metrics.sync.clone(),
            background.handle(),
        )
        .map_err(|e| fail("CRDT replicas", e))?;
        Ok(Arc::new(Services {
            node: config.node.clone(),
            limits,
            kv: rocks.clone(),
            events: rocks.clone(),
            edge: rocks,
            sql: Arc::new(sql),
            auth: Arc::new(auth),
            local_cache: LocalCache::new(L1_BYTES),
            bus,
            global_bus: buses.global,
            sync,
            background: Some(background),
        }))
    }
}

/// How long a region's events are kept in its stream.
const REGION_STREAM_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The region's event stream: every edge's outbox lands here, placed on the
/// region's own cluster (residency) and replicated per `consensus_protocol`.
pub fn region_stream(regions: &RegionsConfig, region: &str) -> keel_bus::StreamSpec {
    keel_bus::StreamSpec {
        name: keel_topology::stream_name(region),
        subjects: vec![format!("keel.{region}.edge.*.events")],
        replicas: keel_topology::replicas(regions, region),
        duplicate_window: std::time::Duration::from_secs(120),
        max_age: Some(REGION_STREAM_MAX_AGE),
        placement: Some(keel_bus::Placement {
            cluster: Some(region.to_string()),
            tags: vec![format!("region:{region}")],
        }),
    }
}

/// Opens the node's bus connections. In a `regions.toml` deployment: two
/// NATS connections to the region's servers (or `event-stream.servers`, if
/// keel.toml names others), one per account, with credentials derived from
/// the deployment's secret. Otherwise the one bus `event-stream` selects.
fn connect(
    config: &KeelConfig,
    rt: &tokio::runtime::Runtime,
) -> Result<keel_bus::Buses, Diagnostics> {
    let node = &config.node;
    let nats = |servers: Vec<String>, credentials: Option<(String, String)>, what: &str| {
        let opts = keel_bus::nats::NatsOptions {
            servers,
            name: format!("keel {}/{} {what}", node.region, node.edge),
            credentials,
            ..Default::default()
        };
        rt.block_on(keel_bus::nats::NatsBus::connect(opts))
            .map(|b| Arc::new(b) as Arc<dyn Bus>)
            .map_err(|e| {
                Diagnostics::one(Diagnostic::file(
                    &config.path,
                    format!("infrastructure.event-stream: {e}"),
                ))
            })
    };
    let Some(regions) = &config.regions else {
        let bus: Arc<dyn Bus> = match &config.infrastructure.event_stream {
            EventStreamBackend::Local => Arc::new(keel_bus::local::LocalBus::new()),
            EventStreamBackend::Nats { servers } => nats(servers.clone(), None, "bus")?,
        };
        return Ok(keel_bus::Buses::single(bus));
    };
    let env = &regions.nats.secret_env;
    let secret = std::env::var(env).ok().filter(|s| !s.is_empty()).ok_or_else(|| {
        Diagnostics::one(Diagnostic::file(
            &regions.path,
            format!(
                "nats.secret_env: environment variable {env} is not set; it must hold the deployment's NATS secret (the one `keel topology` used)"
            ),
        ))
    })?;
    let creds = keel_topology::edge_credentials(regions, secret.as_bytes(), &node.edge)
        .ok_or_else(|| {
            Diagnostics::one(Diagnostic::file(
                &regions.path,
                format!("edge {:?} is not listed in any region", node.edge),
            ))
        })?;
    let servers = match &config.infrastructure.event_stream {
        EventStreamBackend::Nats { servers } => servers.clone(),
        EventStreamBackend::Local => creds.servers.clone(),
    };
    let region = nats(
        servers.clone(),
        Some((creds.user.clone(), creds.password.clone())),
        "region",
    )?;
    let global = nats(
        servers,
        Some((creds.global_user.clone(), creds.global_password.clone())),
        "global",
    )?;
    Ok(keel_bus::Buses { region, global })
}

/// Mirrors the bus connection state into `/metrics`.
fn watch_connection(
    rt: &tokio::runtime::Runtime,
    bus: Arc<dyn Bus>,
    metrics: keel_telemetry::BusMetrics,
) {
    let mut events = bus.connection_events();
    rt.spawn(async move {
        loop {
            let state = *events.borrow_and_update();
            let connected = state == keel_bus::ConnectionState::Connected;
            if !connected && metrics.connected.get() == 1 {
                metrics.disconnects.inc();
            }
            metrics.connected.set(i64::from(connected));
            tracing::info!(bus = bus.kind(), state = state.as_str(), "bus connection");
            if events.changed().await.is_err() {
                return;
            }
        }
    });
}
