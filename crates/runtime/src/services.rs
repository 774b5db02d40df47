//! The node's adapters, shared by every component: stores, auth, caches.

use keel_cache::LocalCache;
use keel_config::{
    Diagnostic, Diagnostics, EventLogBackend, KeelConfig, KvBackend, NodeConfig, SqlBackend,
};
use keel_store::{EdgeStore, EventLog, KvStore, SqlStore, StoreLimits};
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
}

impl Services {
    /// Opens the backends `[infrastructure]` selects, under `data-dir`.
    pub fn open(config: &KeelConfig) -> Result<Arc<Services>, Diagnostics> {
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
                forwarding: false,
                block_cache_bytes: 16 << 20,
            },
        )
        .map_err(|e| fail("RocksDB store (kv, event log)", e))?;
        let sql = keel_store_sqlite::SqliteStore::open(&data.join("sql"), sql_limits)
            .map_err(|e| fail("SQLite databases", e))?;
        let auth = keel_auth::Authenticator::from_config(&config.auth)?;
        let rocks = Arc::new(rocks);
        Ok(Arc::new(Services {
            node: config.node.clone(),
            limits,
            kv: rocks.clone(),
            events: rocks.clone(),
            edge: rocks,
            sql: Arc::new(sql),
            auth: Arc::new(auth),
            local_cache: LocalCache::new(L1_BYTES),
        }))
    }
}
