use keel_core::Hlc;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A component's namespace: its name from `keel.toml` (lowercase letters,
/// digits, '-' and '_', validated by the config). Backends prefix every key
/// with it, so it must never contain the separator byte 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace(Arc<str>);

impl Namespace {
    /// `None` if `name` is empty or has a byte outside `[a-z0-9_-]`.
    pub fn new(name: &str) -> Option<Namespace> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        ok.then(|| Namespace(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event as a component writes it (WIT `event-data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventData {
    pub kind: String,
    pub key: String,
    pub payload: Vec<u8>,
    pub content_type: Option<String>,
    pub user: Option<String>,
}

/// An event in a log (WIT `recorded-event`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// `<edge>:<component>:<sequence>`: unique across the deployment.
    pub id: String,
    pub sequence: u64,
    pub origin: String,
    pub region: String,
    pub at: Hlc,
    pub data: EventData,
}

/// An event published to every region (WIT `global-event`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalEvent {
    /// Publisher-chosen id (CloudEvents `id`).
    pub id: String,
    /// Dotted type; the subject is `keel.global.events.<type>`.
    pub event_type: String,
    pub subject: Option<String>,
    pub content_type: Option<String>,
    pub data: Vec<u8>,
    pub user: Option<String>,
}

/// A versioned value of edge-local state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateValue {
    pub value: Vec<u8>,
    pub version: u64,
    pub updated_at: Hlc,
}

/// Something a user did (WIT `activity-data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    pub kind: String,
    pub attributes: Vec<(String, String)>,
}

/// A user's last activity on this edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityRecord {
    pub activity: Activity,
    pub edge: String,
    pub at: Hlc,
}

/// SQL parameter / column value (SQLite storage classes).
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SqlStatement {
    pub sql: String,
    pub params: Vec<SqlValue>,
}

/// A statement [`crate::SqlStore::prepare`] checked, to be run many times
/// by [`crate::SqlStore::query_prepared`] or
/// [`crate::SqlStore::execute`] (with `sql`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedSql {
    pub sql: String,
    /// Names of the result columns; empty if the statement returns no rows.
    pub columns: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<SqlValue>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecuteResult {
    pub rows_affected: u64,
    pub last_insert_id: Option<i64>,
}

/// What [`crate::UserDataStore::erase_user`] erased (all zero when there
/// was nothing left to erase: erasing twice is harmless).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ErasedUser {
    /// Preference records deleted (one per name, over every component).
    pub preferences: u64,
    /// Last-activity records deleted (at most one per component).
    pub activities: u64,
    /// Events rewritten to [`crate::ERASED_EVENT_KIND`] placeholders.
    pub events: u64,
    /// Outbox entries about the user deleted before they reached the region.
    pub outbox_entries: u64,
    /// KV keys deleted under the user's prefixes.
    pub kv_keys: u64,
    /// Whether this node's directory entry (home region) was deleted.
    pub directory: bool,
}

/// One user's data in a node's store ([`crate::UserDataStore::export_user`]),
/// ordered by component, then by key or sequence.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UserRecords {
    /// Per component: the user's preferences, by name.
    pub preferences: Vec<(String, Vec<(String, String)>)>,
    /// Per component: the user's last activity.
    pub activities: Vec<(String, ActivityRecord)>,
    /// Every event of the user (`data.user`), per component in sequence order.
    pub events: Vec<(String, StoredEvent)>,
    /// `(component, key, value)` of every KV key under the user's prefixes.
    pub kv: Vec<(String, String, Vec<u8>)>,
    /// The user's home region in this node's directory copy.
    pub home_region: Option<String>,
}

/// A SQL table holding personal data, and the column naming its user
/// ([`crate::SqlStore::erase_user_rows`]). Identifiers as declared, unquoted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UserTable {
    pub table: String,
    pub column: String,
}
