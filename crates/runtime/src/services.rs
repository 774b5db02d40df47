//! The node's adapters, shared by every component: stores, auth, caches,
//! the bus and state sync.

use keel_bus::Bus;
use keel_config::{
    CacheBackend, Diagnostic, Diagnostics, EventLogBackend, EventStreamBackend, KeelConfig,
    KvBackend, LedgerLogKind, NodeConfig, RegionsConfig, SqlBackend, StateBackend,
};
use keel_store::{EdgeStore, EventLog, KvStore, SqlStore, StoreLimits};
use keel_telemetry::Metrics;
use std::sync::Arc;

/// Everything a host interface may call. Built once per process.
pub struct Services {
    pub node: NodeConfig,
    pub limits: StoreLimits,
    pub kv: Arc<dyn KvStore>,
    pub events: Arc<dyn EventLog>,
    pub edge: Arc<dyn EdgeStore>,
    /// The outbox of writes bound for the region (positions for
    /// `get-sync-status`).
    pub outbox: Arc<dyn keel_store::Outbox>,
    pub sql: Arc<dyn SqlStore>,
    pub auth: Arc<keel_auth::Authenticator>,
    /// The hierarchical cache (L1 here, L2 the region's bucket, L3 global).
    pub cache: keel_cache::TieredCache,
    /// The region's bus (in a `regions.toml` deployment: the connection in
    /// the region's residency-zone account).
    pub bus: Arc<dyn Bus>,
    /// The bus of `keel.global.>` (the `GLOBAL` account); the same as `bus`
    /// outside a `regions.toml` deployment.
    pub global_bus: Arc<dyn Bus>,
    pub sync: keel_sync::Sync,
    /// The regional tier: views over the region's stream, subscriptions.
    pub regional: crate::regional::RegionalTier,
    /// User → home region (global, compare-and-set).
    pub directory: Arc<keel_coord::directory::Directory>,
    pub migrations: Arc<keel_coord::migration::Migrations>,
    /// Global queries to every region's API.
    pub api: crate::global::GlobalApi,
    /// The deployment (`None`: this node is its own region).
    pub regions: Option<Arc<RegionsConfig>>,
    /// Who may hold whose personal data (from `regions.toml`).
    pub residency: keel_coord::migration::ResidencyRules,
    /// The strongly consistent ledger (the region's stream, or SQLite on
    /// the embedded node).
    pub ledger: Arc<keel_ledger::Ledger>,
    /// The hash-chained audit trail of global and compliance operations.
    pub audit: Arc<keel_ledger::audit::AuditTrail>,
    /// GDPR erasure and export jobs.
    pub privacy: Arc<crate::privacy::Privacy>,
    /// Live (SSE) connections of this node's browsers.
    pub live: Arc<crate::live::LiveHub>,
    /// Every node's latest snapshot, for the dashboard (`/_keel/cluster`).
    pub cluster: Arc<crate::cluster::ClusterView>,
    /// When the services were opened (the node's uptime).
    pub started: std::time::Instant,
    /// Runs the bus connection and the sync tasks, apart from the serving
    /// threads (which run one current-thread runtime per core). Taken out
    /// by [`Services::stop_background`].
    background: std::sync::Mutex<Option<tokio::runtime::Runtime>>,
    background_handle: tokio::runtime::Handle,
}

impl Drop for Services {
    fn drop(&mut self) {
        self.stop_background();
    }
}

impl Services {
    /// The background runtime (bus, sync, feeds).
    pub(crate) fn background(&self) -> &tokio::runtime::Handle {
        &self.background_handle
    }

    /// Stops the background runtime's tasks (the feeds and the outbox
    /// forwarder read RocksDB): a task still inside RocksDB while the
    /// process exits aborts it ("pthread lock: Invalid argument", as C++
    /// destructors run). Call after the drain, before returning from
    /// `main`: tasks hold `Services` themselves (subscriptions reach
    /// components, which hold their context), so dropping the last handle
    /// of it is not guaranteed to happen. Idempotent.
    pub fn stop_background(&self) {
        let Some(rt) = self
            .background
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Blocking on a runtime from async context panics.
            rt.shutdown_background();
        } else {
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }

    /// Opens the backends `[infrastructure]` selects, under `data-dir`.
    /// Connecting to NATS does not wait for the servers: a node started
    /// during a partition serves, and its bus reports `connecting`.
    pub fn open(config: &KeelConfig, metrics: &Metrics) -> Result<Arc<Services>, Diagnostics> {
        let KvBackend::RocksDb {
            max_key_bytes,
            max_value_bytes,
            block_cache,
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
                forwarding: true,
                block_cache_bytes: block_cache,
            },
        )
        .map_err(|e| fail("RocksDB store (kv, event log)", e))?;
        let sql = keel_store_sqlite::SqliteStore::open(&data.join("sql"), sql_limits)
            .map_err(|e| fail("SQLite databases", e))?;
        let auth = keel_auth::Authenticator::from_config(&config.auth)?;
        let rocks = Arc::new(rocks);
        let started = std::time::Instant::now();
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
        let region = &config.node.region;
        // Every node forwards, the embedded one too (to the stream on its
        // own bus): the regional tier reads the region's stream only.
        let stream = region_stream(config.regions.as_deref(), region, bus.kind());
        let mut global_stream = keel_coord::global_stream(
            config
                .regions
                .as_deref()
                .map_or(1, |r| keel_topology::replicas(r, region)),
        );
        if let Some(window) = test_global_duplicate_window() {
            global_stream.duplicate_window = window;
        }
        // Personal payloads leave the edge sealed with the user's key
        // (crypto-shredding, `keel_coord::shred`).
        let user_keys = Arc::new(keel_coord::shred::UserKeys::new(
            bus.clone(),
            keel_coord::shred::user_keys_spec(region, stream.replicas, stream.placement.clone()),
        ));
        keel_coord::start_forwarder(
            rocks.clone(),
            bus.clone(),
            keel_coord::ForwarderOptions {
                region: region.clone(),
                edge: config.node.edge.clone(),
                stream: stream.clone(),
                global: Some(keel_coord::GlobalRoute {
                    bus: buses.global.clone(),
                    stream: global_stream.clone(),
                }),
                keys: Some(user_keys.clone()),
            },
            metrics.outbox.clone(),
            background.handle(),
        );
        let regional = crate::regional::RegionalTier::start(
            region,
            (bus.clone(), &stream),
            user_keys.clone(),
            (buses.global.clone(), &global_stream),
            rocks.clone(),
            metrics.deliveries.clone(),
            background.handle(),
        );
        let residency = residency_rules(config);
        let directory = Arc::new(keel_coord::directory::Directory::new(
            buses.global.clone(),
            config
                .regions
                .as_deref()
                .map_or(1, |r| keel_topology::replicas(r, region)),
        ));
        let migrations = keel_coord::migration::Migrations::new(
            keel_coord::migration::MigrationOptions {
                region: region.clone(),
                edge: config.node.edge.clone(),
                rules: residency.clone(),
                crash_after: crash_hook(),
            },
            keel_coord::migration::MigrationServices {
                bus: bus.clone(),
                keys: user_keys.clone(),
                directory: directory.clone(),
                users: regional.users.clone(),
                users_feed: regional.views_feed.clone(),
                records: rocks.clone(),
            },
            background.handle(),
        );
        migrations.start();
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
        let cache = keel_cache::TieredCache::new(
            cache_options(config),
            bus.clone(),
            buses.global.clone(),
            metrics.cache.clone(),
        );
        cache.start(background.handle());
        let (ledger, audit) = open_ledger(
            config,
            bus.clone(),
            buses.global.clone(),
            metrics,
            background.handle(),
        )?;
        let sql: Arc<dyn SqlStore> = Arc::new(sql);
        let privacy = Arc::new(crate::privacy::Privacy {
            region: region.clone(),
            edge: config.node.edge.clone(),
            all_regions: match &config.regions {
                Some(r) => r.regions.iter().map(|g| g.name.clone()).collect(),
                None => vec![region.clone()],
            },
            region_edges: config
                .regions
                .as_deref()
                .and_then(|r| r.region(region))
                .map_or_else(|| vec![config.node.edge.clone()], |r| r.edges.clone()),
            bus: bus.clone(),
            store: rocks.clone(),
            sql: sql.clone(),
            cache: cache.clone(),
            sync: sync.clone(),
            users: regional.users.clone(),
            keys: user_keys.clone(),
            directory: directory.clone(),
            residency: residency.clone(),
            records: rocks.clone(),
            audit: audit.clone(),
            components: config
                .components
                .iter()
                .filter_map(|c| {
                    Some(crate::privacy::ComponentData {
                        ns: keel_store::Namespace::new(&c.name)?,
                        declared: c.personal_data.clone(),
                    })
                })
                .collect(),
            exports_dir: data.join("exports"),
            rt: background.handle().clone(),
            running: Default::default(),
        });
        privacy.start();
        let api = crate::global::GlobalApi::new(region, bus.clone());
        api.serve(
            crate::global::Answerer {
                region: region.clone(),
                metrics: regional.metrics.clone(),
                events: regional.events.clone(),
                users: regional.users.clone(),
                sync: sync.clone(),
                directory: directory.clone(),
                residency: residency.clone(),
                usage: regional.usage.clone(),
                ledger: ledger.clone(),
            },
            background.handle(),
        );
        Ok(Arc::new(Services {
            node: config.node.clone(),
            limits,
            kv: rocks.clone(),
            events: rocks.clone(),
            outbox: rocks.clone(),
            edge: rocks,
            sql,
            auth: Arc::new(auth),
            cache,
            bus,
            global_bus: buses.global,
            sync,
            regional,
            directory,
            migrations,
            api,
            regions: config.regions.clone(),
            residency,
            ledger,
            audit,
            privacy,
            live: crate::live::LiveHub::new(metrics.live.clone()),
            cluster: Arc::new(crate::cluster::ClusterView::new(
                region,
                &config.node.edge,
                crate::cluster::expected_nodes(config.regions.as_deref()),
            )),
            started,
            background_handle: background.handle().clone(),
            background: std::sync::Mutex::new(Some(background)),
        }))
    }
}

/// `[infrastructure] ledger` and the audit trail: on a NATS bus the
/// region's replicated ledger stream (shared by the region's edges), on
/// the in-process bus a SQLite database under `data-dir`.
fn open_ledger(
    config: &KeelConfig,
    bus: Arc<dyn Bus>,
    global: Arc<dyn Bus>,
    metrics: &Metrics,
    background: &tokio::runtime::Handle,
) -> Result<
    (
        Arc<keel_ledger::Ledger>,
        Arc<keel_ledger::audit::AuditTrail>,
    ),
    Diagnostics,
> {
    let l = &config.infrastructure.ledger;
    let region = &config.node.region;
    let nats = bus.kind() != "local";
    let mut local = None;
    let log: Arc<dyn keel_ledger::RecordLog> = match (l.log, nats) {
        (LedgerLogKind::JetStream, false) => {
            return Err(Diagnostics::one(Diagnostic::file(
                &config.path,
                "infrastructure.ledger: type = \"jetstream\" needs a NATS bus (event-stream = { type = \"nats\", ... } or [node] regions); accepted here: \"auto\", \"sqlite\"".into(),
            )));
        }
        (LedgerLogKind::Sqlite, _) | (LedgerLogKind::Auto, false) => {
            let db = ledger_db(config)?;
            local = Some(db.clone());
            db
        }
        (LedgerLogKind::JetStream | LedgerLogKind::Auto, true) => {
            let regions = config.regions.as_deref();
            let stream = keel_bus::StreamSpec {
                name: keel_topology::ledger_stream_name(region),
                subjects: vec![format!("keel.{region}.ledger.>")],
                replicas: regions.map_or(1, |r| keel_topology::replicas(r, region)),
                duplicate_window: std::time::Duration::from_secs(120),
                // Entries are kept forever: idempotency keys are too.
                max_age: None,
                placement: regions.map(|_| keel_bus::Placement {
                    cluster: Some(region.to_string()),
                    tags: vec![format!("region:{region}")],
                }),
            };
            let log = Arc::new(keel_ledger::JetStreamLog::new(
                bus,
                stream,
                format!("keel.{region}.ledger"),
            ));
            // Only the coordinator may create the region's streams: it does
            // so at start, so the other edges find the stream on first use.
            let coordinator = regions
                .and_then(|r| r.region(region))
                .is_some_and(|r| r.coordinator == config.node.edge);
            if coordinator {
                let log = log.clone();
                background.spawn(async move {
                    let mut wait = std::time::Duration::from_millis(100);
                    while let Err(e) = log.ensure().await {
                        tracing::debug!("ledger stream not created yet: {e}");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(std::time::Duration::from_secs(5));
                    }
                });
            }
            log
        }
    };
    let ledger = Arc::new(keel_ledger::Ledger::new(
        log,
        keel_ledger::LedgerOptions {
            min_balance: l.min_balance,
            account_min_balance: l.account_min_balance.clone().into_iter().collect(),
            max_page: l.max_page,
            append_deadline: std::time::Duration::from_secs(10),
            writer: config.node.edge.clone(),
        },
        metrics.ledger.clone(),
    ));
    let (audit_log, key) = audit_log(config, global, local)?;
    let audit = Arc::new(keel_ledger::audit::AuditTrail::new(
        audit_log,
        key,
        &config.node.edge,
    ));
    Ok((ledger, audit))
}

/// `[infrastructure] cache` and the buckets of this node's L2 and L3: the
/// region's bucket on its own cluster (none with `cache_tier = "none"`),
/// the global one wherever its first user created it.
fn cache_options(config: &KeelConfig) -> keel_cache::CacheOptions {
    let CacheBackend::Tiered {
        l1_max_bytes,
        l1_ttl,
        l2_ttl,
        l3_ttl,
        max_ttl,
        max_key_bytes,
        max_value_bytes,
    } = config.infrastructure.cache;
    let region = &config.node.region;
    let regions = config.regions.as_deref();
    let replicas = regions.map_or(1, |r| keel_topology::replicas(r, region));
    let has_l2 = regions
        .and_then(|r| r.region(region))
        .is_none_or(|r| r.cache_tier != keel_config::CacheTier::None);
    keel_cache::CacheOptions {
        region: region.clone(),
        edge: config.node.edge.clone(),
        l1_max_bytes,
        default_ttls: keel_cache::LevelTtls {
            l1: l1_ttl,
            l2: l2_ttl,
            l3: l3_ttl,
        },
        max_ttl,
        max_key_bytes,
        max_value_bytes,
        region_bucket: has_l2.then(|| keel_bus::KvSpec {
            bucket: keel_topology::cache_bucket_name(region),
            history: 1,
            max_age: Some(max_ttl),
            replicas,
            placement: regions.map(|_| keel_bus::Placement {
                cluster: Some(region.clone()),
                tags: vec![format!("region:{region}")],
            }),
        }),
        global_bucket: keel_bus::KvSpec {
            bucket: keel_topology::GLOBAL_CACHE_BUCKET.to_string(),
            history: 1,
            max_age: Some(max_ttl),
            replicas,
            placement: None,
        },
        personal_keys: config
            .components
            .iter()
            .filter(|c| !c.personal_data.keys.is_empty())
            .map(|c| (c.name.clone(), c.personal_data.keys.clone()))
            .collect(),
    }
}

/// Region → residency zone of every region, and whether users may move
/// between zones. A node without `regions.toml` is its own region and zone.
fn residency_rules(config: &KeelConfig) -> keel_coord::migration::ResidencyRules {
    match &config.regions {
        Some(r) => keel_coord::migration::ResidencyRules {
            zones: r
                .regions
                .iter()
                .filter_map(|g| Some((g.name.clone(), r.zone_of(&g.name)?)))
                .collect(),
            unrestricted: r
                .regions
                .iter()
                .filter(|g| g.data_residency == keel_config::Residency::Global)
                .map(|g| g.name.clone())
                .collect(),
            allow_cross_zone_migration: r.coordination.allow_cross_zone_migration,
        },
        None => keel_coord::migration::ResidencyRules {
            zones: [(config.node.region.clone(), config.node.region.clone())].into(),
            unrestricted: [config.node.region.clone()].into(),
            allow_cross_zone_migration: false,
        },
    }
}

/// `KEEL_TEST_CRASH_MIGRATION_AFTER=<phase>`: the crash-at-each-step tests
/// abort the node right after that migration phase's effect.
fn crash_hook() -> Option<keel_coord::migration::Phase> {
    let v = std::env::var("KEEL_TEST_CRASH_MIGRATION_AFTER").ok()?;
    let phase = keel_coord::migration::Phase::parse(&v);
    if phase.is_none() {
        tracing::warn!(value = %v, "KEEL_TEST_CRASH_MIGRATION_AFTER names no migration phase; ignored");
    }
    phase
}

/// `KEEL_TEST_GLOBAL_DUPLICATE_WINDOW=<ms>`: the global stream's duplicate
/// window when this node creates it, so tests can outlive it (every node of
/// a deployment must agree, or the stream check refuses the difference).
fn test_global_duplicate_window() -> Option<std::time::Duration> {
    let v = std::env::var("KEEL_TEST_GLOBAL_DUPLICATE_WINDOW").ok()?;
    match v.parse() {
        Ok(ms) => Some(std::time::Duration::from_millis(ms)),
        Err(_) => {
            tracing::warn!(value = %v, "KEEL_TEST_GLOBAL_DUPLICATE_WINDOW is not a number of ms; ignored");
            None
        }
    }
}

/// How long a region's events are kept in its stream.
const REGION_STREAM_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
/// The same on the in-process bus, which holds the stream in memory.
const LOCAL_STREAM_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The region's event stream: every edge's outbox lands here. In a
/// `regions.toml` deployment it is placed on the region's own cluster
/// (residency) and replicated per `consensus_protocol`; a node without one
/// is its own region, with a one-replica stream on its bus (`bus_kind`).
pub fn region_stream(
    regions: Option<&RegionsConfig>,
    region: &str,
    bus_kind: &str,
) -> keel_bus::StreamSpec {
    keel_bus::StreamSpec {
        name: keel_topology::stream_name(region),
        subjects: vec![format!("keel.{region}.edge.*.events")],
        replicas: regions.map_or(1, |r| keel_topology::replicas(r, region)),
        duplicate_window: std::time::Duration::from_secs(120),
        max_age: Some(if bus_kind == "local" {
            LOCAL_STREAM_MAX_AGE
        } else {
            REGION_STREAM_MAX_AGE
        }),
        placement: regions.map(|_| keel_bus::Placement {
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
    let secret = deployment_secret(regions)?;
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

/// The deployment's secret, from the environment variable regions.toml
/// names.
fn deployment_secret(regions: &RegionsConfig) -> Result<String, Diagnostics> {
    let env = &regions.nats.secret_env;
    std::env::var(env).ok().filter(|s| !s.is_empty()).ok_or_else(|| {
        Diagnostics::one(Diagnostic::file(
            &regions.path,
            format!(
                "nats.secret_env: environment variable {env} is not set; it must hold the deployment's NATS secret (the one `keel topology` used)"
            ),
        ))
    })
}

/// The ledger's SQLite database (and, on the in-process bus, the audit
/// chain's).
fn ledger_db(config: &KeelConfig) -> Result<Arc<keel_ledger::SqliteLog>, Diagnostics> {
    let path = config.server.data_dir.join("ledger").join("ledger.sqlite");
    keel_ledger::SqliteLog::open(&path)
        .map(Arc::new)
        .map_err(|e| {
            Diagnostics::one(Diagnostic::file(
                &config.path,
                format!("cannot open the ledger database {}: {e}", path.display()),
            ))
        })
}

/// A log and the HMAC key of its chain.
type AuditLog = (Arc<dyn keel_ledger::RecordLog>, Option<Vec<u8>>);

/// The audit chain's log and HMAC key: on NATS the global stream
/// `KEEL_AUDIT` (subjects `keel.global.audit.>`, in the `GLOBAL` account),
/// on the in-process bus the ledger database. The key is derived from the
/// deployment secret in a `regions.toml` deployment.
fn audit_log(
    config: &KeelConfig,
    global: Arc<dyn Bus>,
    local: Option<Arc<keel_ledger::SqliteLog>>,
) -> Result<AuditLog, Diagnostics> {
    let key = match config.regions.as_deref() {
        Some(r) => Some(keel_topology::audit_chain_key(
            deployment_secret(r)?.as_bytes(),
        )),
        None => None,
    };
    if global.kind() == "local" {
        let db = match local {
            Some(db) => db,
            None => ledger_db(config)?,
        };
        return Ok((db, key));
    }
    let stream = keel_bus::StreamSpec {
        name: "KEEL_AUDIT".into(),
        subjects: vec!["keel.global.audit.>".into()],
        replicas: config
            .regions
            .as_deref()
            .map_or(1, |r| keel_topology::replicas(r, &config.node.region)),
        duplicate_window: std::time::Duration::from_secs(120),
        max_age: None,
        placement: None,
    };
    Ok((
        Arc::new(keel_ledger::JetStreamLog::new(
            global,
            stream,
            "keel.global.audit".into(),
        )),
        key,
    ))
}

/// `keel audit verify`: reads the whole audit chain `config`'s node writes
/// to (without opening anything else of the node) and checks every link.
pub fn verify_audit(
    config: &KeelConfig,
) -> Result<Result<keel_ledger::audit::Verified, keel_ledger::audit::VerifyError>, Diagnostics> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| {
            Diagnostics::one(Diagnostic::file(
                &config.path,
                format!("cannot start a runtime: {e}"),
            ))
        })?;
    let buses = connect(config, &rt)?;
    let (log, key) = audit_log(config, buses.global.clone(), None)?;
    Ok(rt.block_on(async {
        let mut state = buses.global.connection_events();
        let connected = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            state.wait_for(|s| *s == keel_bus::ConnectionState::Connected),
        )
        .await;
        if !matches!(connected, Ok(Ok(_))) {
            return Err(keel_ledger::audit::VerifyError::Log(
                keel_ledger::LogError::Unavailable("not connected to NATS within 10 s".into()),
            ));
        }
        keel_ledger::audit::verify(log.as_ref(), key.as_deref()).await
    }))
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
