//! The ledger of the embedded node: records in one SQLite table (WAL,
//! `synchronous=FULL`, so a record is on disk before its append returns);
//! the compare-and-set is a check of the account's last position inside an
//! `IMMEDIATE` transaction.

use crate::{AccountKey, LogError, RawRecord, RecordLog};
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::path::Path;
use std::sync::{Arc, Mutex};

pub struct SqliteLog {
    conn: Arc<Mutex<Connection>>,
}

fn internal(e: rusqlite::Error) -> LogError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::ReadOnly
            ) =>
        {
            LogError::Unavailable(format!("ledger database: {e}"))
        }
        e => LogError::Internal(format!("ledger database: {e}")),
    }
}

impl SqliteLog {
    pub fn open(path: &Path) -> Result<SqliteLog, LogError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| LogError::Unavailable(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(internal)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(internal)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(internal)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS ledger_records (
                 position INTEGER PRIMARY KEY AUTOINCREMENT,
                 component TEXT NOT NULL,
                 account TEXT NOT NULL,
                 record BLOB NOT NULL
             );
             CREATE INDEX IF NOT EXISTS ledger_records_account
                 ON ledger_records (component, account, position);",
        )
        .map_err(internal)?;
        Ok(SqliteLog {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().expect("ledger database lock");
            f(&mut conn)
        })
        .await
        .map_err(|e| LogError::Internal(format!("ledger database task: {e}")))?
    }
}

fn record(position: i64, bytes: Vec<u8>) -> RawRecord {
    RawRecord {
        position: position as u64,
        bytes,
    }
}

#[async_trait]
impl RecordLog for SqliteLog {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn read_after(
        &self,
        account: &AccountKey,
        after: u64,
        max: usize,
    ) -> Result<Vec<RawRecord>, LogError> {
        let key = account.clone();
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT position, record FROM ledger_records
                     WHERE component = ?1 AND account = ?2 AND position > ?3
                     ORDER BY position LIMIT ?4",
                )
                .map_err(internal)?;
            let rows = stmt
                .query_map(
                    params![key.component, key.account, after as i64, max as i64],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
                )
                .map_err(internal)?;
            let mut out = Vec::new();
            for row in rows {
                let (p, bytes) = row.map_err(internal)?;
                out.push(record(p, bytes));
            }
            Ok(out)
        })
        .await
    }

    async fn last(&self, account: &AccountKey) -> Result<Option<RawRecord>, LogError> {
        let key = account.clone();
        self.with(move |c| {
            Ok(c.prepare_cached(
                "SELECT position, record FROM ledger_records
                     WHERE component = ?1 AND account = ?2
                     ORDER BY position DESC LIMIT 1",
            )
            .map_err(internal)?
            .query_row(params![key.component, key.account], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()
            .map_err(internal)?
            .map(|(p, bytes)| record(p, bytes)))
        })
        .await
    }

    async fn scan(
        &self,
        component: &str,
        after: u64,
        max: usize,
    ) -> Result<Vec<(String, RawRecord)>, LogError> {
        let component = component.to_owned();
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT account, position, record FROM ledger_records
                     WHERE component = ?1 AND position > ?2
                     ORDER BY position LIMIT ?3",
                )
                .map_err(internal)?;
            let rows = stmt
                .query_map(params![component, after as i64, max as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .map_err(internal)?;
            let mut out = Vec::new();
            for row in rows {
                let (account, p, bytes) = row.map_err(internal)?;
                out.push((account, record(p, bytes)));
            }
            Ok(out)
        })
        .await
    }

    async fn append(
        &self,
        account: &AccountKey,
        expected: u64,
        bytes: Vec<u8>,
        _id: &str,
    ) -> Result<u64, LogError> {
        let key = account.clone();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(internal)?;
            let last: i64 = tx
                .query_row(
                    "SELECT coalesce(max(position), 0) FROM ledger_records
                     WHERE component = ?1 AND account = ?2",
                    params![key.component, key.account],
                    |r| r.get(0),
                )
                .map_err(internal)?;
            if last as u64 != expected {
                return Err(LogError::Conflict);
            }
            tx.execute(
                "INSERT INTO ledger_records (component, account, record) VALUES (?1, ?2, ?3)",
                params![key.component, key.account, bytes],
            )
            .map_err(internal)?;
            let position = tx.last_insert_rowid();
            tx.commit().map_err(internal)?;
            Ok(position as u64)
        })
        .await
    }
}
