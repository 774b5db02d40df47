//! One user's rows: erased ([`SqlStore::erase_user_rows`]) or exported
//! ([`SqlStore::export_user_rows`]).
//!
//! Where SQLite keeps deleted bytes, and what removes them:
//! - the freed space of the database file's pages: the writer connection
//!   runs with `secure_delete = ON` (set at open, see `conn::open`), so a
//!   DELETE overwrites the row's cell, freeblocks and freed pages with zeros;
//! - the WAL: it holds page images of earlier transactions (the row as
//!   inserted, too) until it is reset, and a reset only rewinds it, so old
//!   frames past the new end survive. A `TRUNCATE` checkpoint copies the
//!   zeroed pages into the database file and truncates the WAL to 0 bytes;
//! - the `-shm` file holds only the WAL index (page numbers, checksums).
//!
//! Not covered: blocks a file system or SSD keeps after a truncate, and
//! full-text indexes (an FTS5 table records deletions as new entries;
//! older segments keep the tokens until they are merged).
//!
//! [`SqlStore::erase_user_rows`]: keel_store::SqlStore::erase_user_rows
//! [`SqlStore::export_user_rows`]: keel_store::SqlStore::export_user_rows

use crate::conn::Conn;
use crate::{error, prefixed, query_rows};
use keel_store::{QueryResult, SqlValue, StoreError, StoreLimits, StoreResult, UserTable};
use rusqlite::ErrorCode;
use rusqlite::config::DbConfig;
use rusqlite::wal::CheckpointMode;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long an erasure keeps trying to truncate the WAL while readers hold
/// it.
const CHECKPOINT_DEADLINE: Duration = Duration::from_secs(5);
/// How long one checkpoint attempt waits for readers (SQLite's busy handler).
const CHECKPOINT_BUSY_WAIT: Duration = Duration::from_millis(500);
/// Pause between attempts.
const CHECKPOINT_RETRY: Duration = Duration::from_millis(20);

/// A table with its identifiers ready for SQL text.
pub(crate) struct Quoted {
    table: String,
    sql_table: String,
    sql_column: String,
}

/// `name` as a double-quoted SQL identifier (embedded quotes doubled).
/// `Invalid` for an empty name or one with NUL (SQLite would cut it there).
pub(crate) fn quote_ident(what: &str, name: &str) -> StoreResult<String> {
    if name.is_empty() {
        return Err(StoreError::Invalid(format!(
            "{what} name must not be empty"
        )));
    }
    if name.contains('\0') {
        return Err(StoreError::Invalid(format!(
            "{what} name must not contain NUL"
        )));
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// Checks every identifier and the user id before anything runs.
pub(crate) fn prepare(
    tables: &[UserTable],
    user: &str,
    limits: &StoreLimits,
) -> StoreResult<Vec<Quoted>> {
    if user.is_empty() {
        return Err(StoreError::Invalid("user id must not be empty".into()));
    }
    if user.len() > limits.max_value_bytes {
        return Err(StoreError::Invalid(format!(
            "user id of {} bytes exceeds the limit of {} bytes",
            user.len(),
            limits.max_value_bytes
        )));
    }
    tables
        .iter()
        .map(|t| {
            Ok(Quoted {
                table: t.table.clone(),
                sql_table: quote_ident("table", &t.table)?,
                sql_column: quote_ident("column", &t.column)?,
            })
        })
        .collect()
}

/// Runs `f` with double-quoted string literals off (`SQLITE_DBCONFIG_DQS_DML`).
/// SQLite otherwise reads a double-quoted name that is no column as a
/// string: with a misspelt column, `"col" = ?` compares the text `col` with
/// the user id, and a column "named" like the user would match every row.
/// Now it is "no such column" (`Invalid`). Guests keep SQLite's default.
fn strict_identifiers<T>(
    c: &Conn,
    limits: &StoreLimits,
    f: impl FnOnce() -> StoreResult<T>,
) -> StoreResult<T> {
    let fail = |e| error::map(e, &c.ctl, limits);
    let was = c
        .conn
        .db_config(DbConfig::SQLITE_DBCONFIG_DQS_DML)
        .map_err(fail)?;
    c.conn
        .set_db_config(DbConfig::SQLITE_DBCONFIG_DQS_DML, false)
        .map_err(fail)?;
    let result = f();
    let restored = c
        .conn
        .set_db_config(DbConfig::SQLITE_DBCONFIG_DQS_DML, was)
        .map_err(fail);
    let value = result?;
    restored?;
    Ok(value)
}

/// Whether the main schema has a table (or virtual table) of that name
/// (identifiers compare case-insensitively, as SQLite resolves them).
fn table_exists(conn: &rusqlite::Connection, table: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM main.sqlite_master \
         WHERE type = 'table' AND name = ?1 COLLATE NOCASE)",
        [table],
        |r| r.get(0),
    )
}

/// Deletes the user's rows from every existing table in one transaction;
/// returns the rows deleted. The host's statements run without the guest
/// statement deadline (an erasure must not stop halfway through a table),
/// but under the authorizer like any other.
pub(crate) fn erase_rows(
    writer: &Conn,
    tables: &[Quoted],
    user: &str,
    limits: &StoreLimits,
) -> StoreResult<u64> {
    strict_identifiers(writer, limits, || delete_rows(writer, tables, user, limits))
}

fn delete_rows(
    writer: &Conn,
    tables: &[Quoted],
    user: &str,
    limits: &StoreLimits,
) -> StoreResult<u64> {
    let fail = |e| error::map(e, &writer.ctl, limits);
    writer.rollback();
    writer
        .host(|c| c.execute_batch("BEGIN IMMEDIATE"))
        .map_err(fail)?;
    let mut deleted = 0u64;
    for t in tables {
        let run = || -> StoreResult<u64> {
            if !table_exists(&writer.conn, &t.table).map_err(fail)? {
                return Ok(0);
            }
            let sql = format!("DELETE FROM {} WHERE {} = ?1", t.sql_table, t.sql_column);
            let n = writer.conn.execute(&sql, [user]).map_err(fail)?;
            Ok(n as u64)
        };
        match run() {
            Ok(n) => deleted += n,
            Err(e) => {
                writer.rollback();
                return Err(prefixed(&format!("table {:?}", t.table), e));
            }
        }
    }
    if let Err(e) = writer.host(|c| c.execute_batch("COMMIT")) {
        writer.rollback();
        return Err(prefixed("commit", fail(e)));
    }
    Ok(deleted)
}

/// Copies the WAL into the database file and truncates it to 0 bytes,
/// retrying while readers hold it, up to [`CHECKPOINT_DEADLINE`].
/// `Unavailable` if it never succeeds (the WAL may still hold deleted rows).
pub(crate) fn checkpoint_truncate(
    writer: &Conn,
    db_path: &Path,
    limits: &StoreLimits,
) -> StoreResult<()> {
    let wal = {
        let mut p = db_path.as_os_str().to_owned();
        p.push("-wal");
        std::path::PathBuf::from(p)
    };
    // A shorter busy wait per attempt, so the deadline holds.
    let busy = |d: Duration| {
        writer
            .conn
            .busy_timeout(d)
            .map_err(|e| error::map(e, &writer.ctl, limits))
    };
    busy(CHECKPOINT_BUSY_WAIT.min(crate::conn::busy_timeout(limits)))?;
    let deadline = Instant::now() + CHECKPOINT_DEADLINE;
    let result = loop {
        let why = match writer
            .conn
            .wal_checkpoint_v2(Some(rusqlite::MAIN_DB), CheckpointMode::TRUNCATE)
        {
            Ok(_) => match std::fs::metadata(&wal) {
                Ok(m) if m.len() > 0 => format!("the WAL still has {} bytes", m.len()),
                Ok(_) => break Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break Ok(()),
                Err(e) => format!("cannot stat the WAL: {e}"),
            },
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                ) =>
            {
                "readers hold the WAL".to_string()
            }
            Err(e) => break Err(error::map(e, &writer.ctl, limits)),
        };
        if Instant::now() >= deadline {
            break Err(StoreError::Unavailable(format!(
                "rows deleted, but the WAL could not be truncated within {CHECKPOINT_DEADLINE:?} \
                 ({why}); erase again to finish"
            )));
        }
        std::thread::sleep(CHECKPOINT_RETRY);
    };
    busy(crate::conn::busy_timeout(limits))?;
    result
}

/// `SELECT *` of the user's rows, per existing table, under the guest
/// query caps (rows, bytes, statement time: `Limit` when exceeded).
pub(crate) fn export_rows(
    reader: &Conn,
    tables: &[Quoted],
    user: &str,
    limits: &StoreLimits,
) -> StoreResult<Vec<(String, QueryResult)>> {
    strict_identifiers(reader, limits, || select_rows(reader, tables, user, limits))
}

fn select_rows(
    reader: &Conn,
    tables: &[Quoted],
    user: &str,
    limits: &StoreLimits,
) -> StoreResult<Vec<(String, QueryResult)>> {
    let params = [SqlValue::Text(user.to_owned())];
    let mut out = Vec::new();
    for t in tables {
        let exists =
            table_exists(&reader.conn, &t.table).map_err(|e| error::map(e, &reader.ctl, limits))?;
        if !exists {
            continue;
        }
        let sql = format!("SELECT * FROM {} WHERE {} = ?1", t.sql_table, t.sql_column);
        let rows = reader.budgeted(limits.statement_timeout, || {
            query_rows(reader, &sql, &params, limits)
        });
        out.push((
            t.table.clone(),
            rows.map_err(|e| prefixed(&format!("table {:?}", t.table), e))?,
        ));
    }
    Ok(out)
}
