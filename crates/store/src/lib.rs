//! Storage traits of the edge tier. The runtime's host interfaces (`kv`,
//! `events`, `sql`, `edge-operations`) talk to these traits only; backends
//! (`keel-store-rocksdb`, `keel-store-sqlite`) are chosen by `keel.toml`
//! `[infrastructure]`.
//!
//! Invariants every backend keeps:
//! - **Namespacing.** Every call names the component's [`Namespace`]; a
//!   backend never lets one namespace observe or change another's data.
//! - **Durable acks.** A write future resolves `Ok` only after the write is
//!   on stable storage (fsynced). Reads are synchronous and cheap.
//! - **Errors change nothing.** `Invalid`/`Limit` are checked before any
//!   write; `Unavailable` means the write was not acknowledged.

mod limits;
mod types;

pub use limits::StoreLimits;
pub use types::*;

use keel_core::Hlc;
use std::future::Future;
use std::pin::Pin;

pub type StoreResult<T> = Result<T, StoreError>;

/// A durable write in flight: resolves once the write is fsynced (or failed;
/// [`Outbox::outbox_ack`] says where it resolves earlier).
/// The write is queued when the method returning it is called, so writes
/// take effect in call order whichever future is awaited first (user
/// erasure, which first searches on a thread, is the one exception).
pub type WriteFuture<T> = Pin<Box<dyn Future<Output = StoreResult<T>> + Send + 'static>>;

/// Why a store call failed. Maps one-to-one onto the WIT `error` variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Malformed argument; nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// A size or count limit; nothing changed.
    #[error("{0}")]
    Limit(String),
    /// The backend cannot serve now (I/O error, disk full, shutting down).
    /// Nothing was acknowledged.
    #[error("{0}")]
    Unavailable(String),
    /// A constraint or concurrent write refused the operation.
    #[error("{0}")]
    Conflict(String),
    /// A bug or an unexpected backend state.
    #[error("{0}")]
    Internal(String),
}

/// The raw key-value store (`kv` interface).
pub trait KvStore: Send + Sync + 'static {
    fn get(&self, ns: &Namespace, key: &str) -> StoreResult<Option<Vec<u8>>>;
    fn exists(&self, ns: &Namespace, key: &str) -> StoreResult<bool>;
    /// Up to `limit` keys starting with `prefix`, strictly after `after`, ascending.
    fn list_keys(
        &self,
        ns: &Namespace,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>>;
    fn set(&self, ns: &Namespace, key: String, value: Vec<u8>) -> WriteFuture<()>;
    fn delete(&self, ns: &Namespace, key: String) -> WriteFuture<()>;
    /// Replaces the value if the current one equals `expected` (`None`: absent).
    fn compare_and_swap(
        &self,
        ns: &Namespace,
        key: String,
        expected: Option<Vec<u8>>,
        new_value: Vec<u8>,
    ) -> WriteFuture<bool>;
}

/// The per-component append-only event log (`events`, `record-local-event`).
pub trait EventLog: Send + Sync + 'static {
    /// Appends one event with the next gapless sequence number. With
    /// `forward`, the event is also queued for the region in the same atomic
    /// write (when this node forwards at all).
    fn append(&self, ns: &Namespace, event: EventData, forward: bool) -> WriteFuture<StoredEvent>;
    /// Appends `events` in one atomic write (all or none), each with the
    /// next sequence. With `forward` (on a forwarding node) they are queued
    /// for the region in the same write; the result then carries the outbox
    /// sequence of the last one (see [`Outbox::outbox_positions`]).
    fn append_batch(
        &self,
        ns: &Namespace,
        events: Vec<EventData>,
        forward: bool,
    ) -> WriteFuture<AppendedBatch>;
    /// Up to `limit` events with sequence >= `from`, in order.
    fn read(&self, ns: &Namespace, from: u64, limit: usize) -> StoreResult<Vec<StoredEvent>>;
    fn last_sequence(&self, ns: &Namespace) -> StoreResult<Option<u64>>;
}

/// Edge-local records behind `edge-operations`: versioned state, user
/// preferences, last activity, and this edge's copy of the user directory.
pub trait EdgeStore: Send + Sync + 'static {
    fn get_state(&self, ns: &Namespace, key: &str) -> StoreResult<Option<StateValue>>;
    /// Writes the value; returns the new version (previous + 1).
    fn set_state(&self, ns: &Namespace, key: String, value: Vec<u8>) -> WriteFuture<u64>;
    fn preferences(&self, ns: &Namespace, user: &str) -> StoreResult<Vec<(String, String)>>;
    fn set_preference(
        &self,
        ns: &Namespace,
        user: String,
        name: String,
        value: Option<String>,
    ) -> WriteFuture<()>;
    /// Queues one sample of a regional metric for the region (nothing is
    /// kept on the edge). `Invalid` for an empty or oversized name or a
    /// value that is NaN or infinite.
    fn record_metric(&self, ns: &Namespace, metric: String, value: f64) -> WriteFuture<()>;
    /// Queues an event for every region (forwarded to the global stream).
    /// An id this node already queued for the component is not queued again
    /// (`Ok`: publishing is idempotent per id). `Invalid` if it is larger
    /// than the event limit.
    fn queue_global_event(&self, ns: &Namespace, event: GlobalEvent) -> WriteFuture<()>;
    /// Stores the user's last activity and queues it for the region.
    fn record_activity(&self, ns: &Namespace, user: String, activity: Activity) -> WriteFuture<()>;
    fn last_activity(&self, ns: &Namespace, user: &str) -> StoreResult<Option<ActivityRecord>>;
    /// The user's home region from this edge's directory copy.
    fn user_region(&self, user: &str) -> StoreResult<Option<String>>;
    /// Records the home region of a user first seen here, unless one is
    /// already known; returns the region in effect.
    fn register_user(&self, user: String, region: String) -> WriteFuture<String>;
}

/// Result of [`EventLog::append_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendedBatch {
    pub events: Vec<StoredEvent>,
    /// Outbox sequence of the batch's last entry; `None` when nothing was
    /// queued (not forwarded, or an empty batch).
    pub last_outbox_seq: Option<u64>,
}

/// A write waiting in the outbox for the region.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum OutboxEntry {
    Event {
        component: String,
        event: StoredEvent,
    },
    Activity {
        component: String,
        user: String,
        record: ActivityRecord,
    },
    /// An event for every region (`global-coordination.publish-global-event`).
    Global {
        component: String,
        event: GlobalEvent,
        edge: String,
        at: Hlc,
    },
    /// One sample of a regional metric (`regional-coordination.record-metric`).
    Metric {
        component: String,
        metric: String,
        value: f64,
        edge: String,
        at: Hlc,
    },
}

/// The durable queue of writes bound for the region (DESIGN §5 "Edge
/// tier"). Entries are appended in the same atomic write as the local write
/// they belong to, numbered by an outbox sequence (1, 2, 3, ...), and
/// removed only after the region acknowledged them.
///
/// The sequence is handed out gaplessly, but [`UserDataStore::erase_user`]
/// deletes waiting entries about the user, leaving gaps. Readers must not
/// assume `s + 1` follows `s`: peek returns the entries that exist, and an
/// ack "through" `s` covers any gap below `s`. The acknowledged position
/// never stops right before a gap (it moves over erased sequences), so
/// [`Outbox::outbox_depth`] overcounts only by erased entries lying between
/// waiting ones, and only until the region acknowledged past them.
pub trait Outbox: Send + Sync + 'static {
    /// Up to `limit` entries with sequence > `after`, oldest first.
    fn outbox_peek(&self, after: u64, limit: usize) -> StoreResult<Vec<(u64, OutboxEntry)>>;
    /// Removes entries up to and including `through` (acknowledged by the
    /// region). Applied when the future resolves, and survives the process
    /// being killed; it may not survive a machine crash until the next
    /// durable write, in which case the entries are sent again (the region
    /// drops them as duplicates by message id, consumers by origin and
    /// outbox sequence).
    fn outbox_ack(&self, through: u64) -> WriteFuture<()>;
    /// Entries waiting (appended and not yet acknowledged); see the gaps
    /// note above.
    fn outbox_depth(&self) -> StoreResult<u64>;
    /// `(last appended, last acknowledged)` outbox sequences: an entry
    /// `s` with `acked < s <= last` is waiting, `s <= acked` reached the
    /// region or was erased.
    fn outbox_positions(&self) -> StoreResult<(u64, u64)>;
    /// Notified after every committed write that added outbox entries.
    fn outbox_signal(&self) -> std::sync::Arc<tokio::sync::Notify>;
    /// This store's incarnation (see [`CrdtStore::incarnation`]): part of the
    /// outbox's deduplication ids, so a wiped node never reuses them.
    fn outbox_incarnation(&self) -> u64;
}

/// One persisted CRDT replica.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoredCrdt {
    pub ns: Namespace,
    pub id: Vec<u8>,
    pub state: Vec<u8>,
}

/// Durable home of CRDT replicas (`state`, via `keel-sync`). The store
/// keeps opaque encoded states under (namespace, id); `keel-sync` owns the
/// encoding and builds the ids.
pub trait CrdtStore: Send + Sync + 'static {
    fn load_crdt(&self, ns: &Namespace, id: &[u8]) -> StoreResult<Option<Vec<u8>>>;
    /// Replaces one CRDT's persisted state; durable when the future resolves.
    /// Saves of the same id resolve in call order, so the last one wins.
    fn save_crdt(&self, ns: &Namespace, id: Vec<u8>, state: Vec<u8>) -> WriteFuture<()>;
    /// Every persisted CRDT, for loading replicas at start.
    fn all_crdts(&self) -> StoreResult<Vec<StoredCrdt>>;
    /// A random id created the first time this store was opened. Replica ids
    /// include it, so a node whose data was wiped never reuses the dots and
    /// counter slots of its former self.
    fn incarnation(&self) -> u64;
}

/// Small durable records the host keeps for itself (subscriptions, migration
/// jobs), in tables apart from every component's data: no guest call can
/// reach them. Writes are fsynced like every other write.
pub trait HostRecords: Send + Sync + 'static {
    fn host_record(&self, table: &str, key: &str) -> StoreResult<Option<Vec<u8>>>;
    /// Every record of `table`, by key ascending.
    fn host_records(&self, table: &str) -> StoreResult<Vec<(String, Vec<u8>)>>;
    fn put_host_record(&self, table: &str, key: String, value: Vec<u8>) -> WriteFuture<()>;
    fn delete_host_record(&self, table: &str, key: String) -> WriteFuture<()>;
    /// A record written with [`HostWrite::PutExpiring`], while it lives.
    /// Expiring tables are apart from plain ones of the same name.
    fn expiring_host_record(&self, table: &str, key: &str) -> StoreResult<Option<Vec<u8>>>;
    /// Several writes in one atomic, fsynced batch. Each call also deletes
    /// some expired records (oldest first), so expiring tables stay bounded
    /// by what lives.
    fn write_host_records(&self, writes: Vec<HostWrite>) -> WriteFuture<()>;
}

/// One write of [`HostRecords::write_host_records`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostWrite {
    Put {
        table: &'static str,
        key: String,
        value: Vec<u8>,
    },
    /// Readable with [`HostRecords::expiring_host_record`] until
    /// `expires_at_ms` (ms since the Unix epoch, this node's clock).
    PutExpiring {
        table: &'static str,
        key: String,
        value: Vec<u8>,
        expires_at_ms: u64,
    },
}

/// How long an id given to `publish-global-event` stays an idempotency key
/// (on the publishing node and for every subscription): as long as the
/// global event stream keeps the event.
pub const GLOBAL_EVENT_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(7 * 24 * 3600);

/// The `kind` of an event whose content was erased
/// ([`UserDataStore::erase_user`]): the log keeps the event's id, sequence,
/// origin, region and time (so it stays gapless) and nothing else.
pub const ERASED_EVENT_KIND: &str = "keel.erased";

/// Whether `key` falls under a `personal-data.keys` template such as
/// `"profile/{user}/"` for some (non-empty) user id.
pub fn is_personal_key(template: &str, key: &str) -> bool {
    let Some((before, after)) = template.split_once("{user}") else {
        return false;
    };
    key.strip_prefix(before)
        .and_then(|rest| rest.get(1..))
        .is_some_and(|rest| rest.contains(after))
}

/// One user's data in a node's store, for `process-data-deletion` and
/// `export-user-data`. `key_prefixes` names, per component, the prefixes of
/// its KV keys that belong to the user (from the component's
/// `personal-data` declaration, the user id already substituted).
///
/// What is covered: the user's preferences and last activity in every
/// component, this node's directory entry, every event whose `data.user` is
/// the user in every component's log, outbox entries about the user not yet
/// forwarded, and KV keys under `key_prefixes`. Not covered (the caller's or
/// another layer's job): versioned `state` keys, CRDT replicas, SQL rows
/// ([`SqlStore::erase_user_rows`]), and what already reached the region.
pub trait UserDataStore: Send + Sync + 'static {
    /// Deletes the user's data (events are rewritten to
    /// [`ERASED_EVENT_KIND`] placeholders), durably, then makes the bytes
    /// physically gone from the store's files (flush, WAL release, full
    /// compaction). Idempotent: a second call erases nothing and returns
    /// zeros. `Invalid` (nothing changed) for an empty or oversized user id
    /// or an empty prefix (it would mean every key). `Unavailable` if the
    /// records were deleted but the files could not be purged: call again.
    fn erase_user(
        &self,
        user: String,
        key_prefixes: Vec<(Namespace, Vec<String>)>,
    ) -> WriteFuture<ErasedUser>;
    /// Everything [`UserDataStore::erase_user`] would erase, with the
    /// events' payloads (erased placeholders are not the user's any more).
    fn export_user(
        &self,
        user: &str,
        key_prefixes: &[(Namespace, Vec<String>)],
    ) -> StoreResult<UserRecords>;
}

/// One SQLite (or other) database per component (`sql`).
pub trait SqlStore: Send + Sync + 'static {
    fn query(&self, ns: &Namespace, sql: &str, params: Vec<SqlValue>) -> StoreResult<QueryResult>;
    /// Compiles `sql` without running it: the errors are those `query` or
    /// `execute` would report for the text itself (syntax, unknown tables,
    /// what the authorizer refuses).
    fn prepare(&self, ns: &Namespace, sql: String) -> StoreResult<PreparedSql>;
    /// Runs a prepared read-only statement that returns rows, as `query`
    /// (same caps), and returns the values of every row, row after row
    /// (`prepared.columns.len()` values each). `Invalid` if the schema
    /// changed the statement's columns since `prepare`.
    fn query_prepared(
        &self,
        ns: &Namespace,
        prepared: &PreparedSql,
        params: Vec<SqlValue>,
    ) -> StoreResult<Vec<SqlValue>>;
    fn execute(
        &self,
        ns: &Namespace,
        sql: String,
        params: Vec<SqlValue>,
    ) -> WriteFuture<ExecuteResult>;
    /// All statements in one transaction; on failure none applies and the
    /// error says which statement (by index) failed.
    fn execute_batch(
        &self,
        ns: &Namespace,
        statements: Vec<SqlStatement>,
    ) -> WriteFuture<Vec<ExecuteResult>>;
    /// Deletes the rows of `user` from each table (rows whose `column` equals `user` as TEXT), in one transaction; a table that does not exist counts 0. Deleted content is overwritten (secure_delete) and the WAL checkpointed and truncated, so no file of the database still holds it. Returns rows deleted.
    ///
    /// Tables are cleared in the given order (children before parents when
    /// foreign keys refer to them: a violation is `Conflict` and deletes
    /// nothing). `Invalid` for an empty identifier or one containing NUL, or
    /// a column the table lacks. `Unavailable` if the rows were deleted but
    /// the WAL could not be truncated (a reader held it): call again.
    fn erase_user_rows(
        &self,
        ns: &Namespace,
        tables: Vec<UserTable>,
        user: String,
    ) -> WriteFuture<u64>;
    /// The rows of `user` in each existing table (`SELECT * ... WHERE column = ?`), per table in the given order.
    fn export_user_rows(
        &self,
        ns: &Namespace,
        tables: &[UserTable],
        user: &str,
    ) -> StoreResult<Vec<(String, QueryResult)>>;
}

#[cfg(test)]
mod tests {
    #[test]
    fn personal_keys_match_their_template_only() {
        use super::is_personal_key as p;
        assert!(p("profile/{user}/", "profile/bo/x"));
        assert!(p("profile/{user}/", "profile/bo/"));
        assert!(!p("profile/{user}/", "profile//x"));
        assert!(!p("profile/{user}/", "profile/bo"));
        assert!(!p("profile/{user}/", "other/bo/x"));
        assert!(p("u:{user}:card", "u:bo:card"));
        assert!(!p("no-placeholder", "no-placeholder"));
    }
}
