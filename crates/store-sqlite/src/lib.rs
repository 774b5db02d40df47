//! SQLite backend of [`keel_store::SqlStore`]: one database file per
//! component namespace (`<dir>/<namespace>.db`).
//!
//! - **Isolation.** Every connection has `SQLITE_LIMIT_ATTACHED = 0`,
//!   `SQLITE_DBCONFIG_DEFENSIVE`, untrusted schema, no extension loading,
//!   and an authorizer refusing ATTACH/DETACH (and with them VACUUM and
//!   VACUUM INTO), PRAGMAs, transaction control, temporary objects and
//!   virtual table modules other than FTS3/4/5 and R*Tree. A guest's SQL can
//!   reach its own file only.
//! - **Reads** (`query`) run inline on the caller's thread on a pooled
//!   `SQLITE_OPEN_READONLY` connection: a WAL read is microseconds, less than
//!   a thread hop. Every connection uses the `unix-excl` VFS: the process
//!   holds one exclusive lock per file and its connections share the WAL
//!   index in memory, so a read makes no system call (the default VFS makes
//!   two `fcntl` per read); no other process can open a database meanwhile.
//! - **Writes** (`execute`, `execute_batch`) run on the database's single
//!   writer connection inside `spawn_blocking`; WAL with `synchronous=FULL`
//!   means the commit (and so the future) completes only after the fsync.
//! - **Limits.** Every statement has a wall-clock budget enforced by a
//!   progress handler; results are capped in rows and bytes; parameters and
//!   single values are capped in bytes.

mod conn;
mod erase;
mod error;
mod sql;
#[cfg(test)]
mod tests;

use conn::{Conn, Role};
use keel_store::{
    ExecuteResult, Namespace, PreparedSql, QueryResult, SqlStatement, SqlStore, SqlValue,
    StoreError, StoreLimits, StoreResult, UserTable, WriteFuture,
};
use rustc_hash::FxHashMap;
use sql::{Lead, Param};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// Idle read connections kept per database; more are opened on demand and
/// closed when returned.
const MAX_IDLE_READERS: usize = 8;
/// `last_insert_rowid` is set to this before each statement, so a value
/// still equal to it afterwards means "no row inserted by this statement".
const NO_ROWID: i64 = i64::MIN;

/// The SQLite [`SqlStore`]. Cheap to share behind an `Arc`; databases are
/// opened on first use and kept open.
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    limits: StoreLimits,
    /// Looked up on every statement: Fx rather than SipHash, since the keys
    /// are the operator's component names, not input.
    dbs: RwLock<FxHashMap<Namespace, Arc<Database>>>,
}

/// One namespace's database file.
struct Database {
    path: PathBuf,
    writer: Mutex<Conn>,
    readers: Mutex<Vec<Conn>>,
}

fn poisoned<T>(_: PoisonError<T>) -> StoreError {
    StoreError::Internal("SQL store lock poisoned by an earlier panic".into())
}

impl SqliteStore {
    /// Opens (creating it if needed) the directory holding the databases.
    pub fn open(dir: &Path, limits: StoreLimits) -> StoreResult<SqliteStore> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create the SQL data directory {}: {e}",
                dir.display()
            ))
        })?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                limits,
                dbs: RwLock::new(FxHashMap::default()),
            }),
        })
    }
}

impl Inner {
    /// The namespace's database, opening (and creating) it on first use.
    fn database(&self, ns: &Namespace) -> StoreResult<Arc<Database>> {
        if let Some(db) = self.dbs.read().map_err(poisoned)?.get(ns) {
            return Ok(db.clone());
        }
        let mut dbs = self.dbs.write().map_err(poisoned)?;
        if let Some(db) = dbs.get(ns) {
            return Ok(db.clone());
        }
        let path = self.path(ns);
        let writer = conn::open(&path, Role::Writer, &self.limits).map_err(|e| {
            tracing::error!(namespace = %ns, path = %path.display(), error = %e,
                "sql store: cannot open database");
            StoreError::Unavailable(format!("cannot open the SQL database: {}", plain(&e)))
        })?;
        tracing::debug!(namespace = %ns, path = %path.display(), "sql store: opened database");
        let db = Arc::new(Database {
            path,
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
        });
        dbs.insert(ns.clone(), db.clone());
        Ok(db)
    }
}

impl Inner {
    fn path(&self, ns: &Namespace) -> PathBuf {
        // `Namespace` is `[a-z0-9_-]{1,64}`: no separator, no dot, no escape.
        self.dir.join(format!("{}.db", ns.as_str()))
    }

    /// The namespace's database if it has one (open, or a file from an
    /// earlier run); `None` without creating it.
    fn existing_database(&self, ns: &Namespace) -> StoreResult<Option<Arc<Database>>> {
        if self.dbs.read().map_err(poisoned)?.contains_key(ns) || self.path(ns).exists() {
            return self.database(ns).map(Some);
        }
        Ok(None)
    }
}

/// SQLite's message for an open failure, without rusqlite's decorations.
fn plain(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(err, Some(msg)) => format!("{msg} ({err})"),
        rusqlite::Error::SqliteFailure(err, None) => err.to_string(),
        _ => "unexpected error".into(),
    }
}

impl Database {
    fn take_reader(&self, limits: &StoreLimits) -> StoreResult<Conn> {
        if let Some(reader) = self.readers.lock().map_err(poisoned)?.pop() {
            return Ok(reader);
        }
        conn::open(&self.path, Role::Reader, limits).map_err(|e| {
            tracing::error!(path = %self.path.display(), error = %e,
                "sql store: cannot open read connection");
            StoreError::Unavailable(format!("cannot open the SQL database: {}", plain(&e)))
        })
    }

    fn return_reader(&self, reader: Conn) {
        // A connection left inside a transaction would pin an old snapshot.
        if !reader.conn.is_autocommit() {
            return;
        }
        if let Ok(mut readers) = self.readers.lock()
            && readers.len() < MAX_IDLE_READERS
        {
            readers.push(reader);
        }
    }
}

fn check_sql(sql: &str) -> StoreResult<Lead> {
    match sql::lead(sql) {
        Lead::Empty => Err(StoreError::Invalid("empty SQL statement".into())),
        lead => Ok(lead),
    }
}

fn check_param_count(stmt: &rusqlite::Statement<'_>, params: &[SqlValue]) -> StoreResult<()> {
    let expected = stmt.parameter_count();
    if expected != params.len() {
        return Err(StoreError::Invalid(format!(
            "statement takes {expected} parameters but {} were given",
            params.len()
        )));
    }
    Ok(())
}

/// Column names of a prepared statement. rusqlite panics on a non-UTF-8
/// name (only possible with a database file crafted outside this store);
/// that becomes an error here instead.
fn column_names(stmt: &rusqlite::Statement<'_>) -> StoreResult<Vec<String>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        (0..stmt.column_count())
            .map(|i| stmt.column_name(i).map(str::to_owned).unwrap_or_default())
            .collect()
    }))
    .map_err(|_| StoreError::Internal("column name is not valid UTF-8".into()))
}

/// One read-only statement on a reader.
fn run_query(
    reader: &Conn,
    sql: &str,
    params: &[SqlValue],
    limits: &StoreLimits,
) -> StoreResult<QueryResult> {
    check_sql(sql)?;
    sql::check_params(params, limits)?;
    reader.budgeted(limits.statement_timeout, || {
        query_rows(reader, sql, params, limits)
    })
}

fn query_rows(
    reader: &Conn,
    sql: &str,
    params: &[SqlValue],
    limits: &StoreLimits,
) -> StoreResult<QueryResult> {
    let fail = |e| error::map(e, &reader.ctl, limits);
    let mut stmt = cached_query(reader, sql, params, limits)?;
    let mut rows = Vec::new();
    let mut row = Vec::new();
    read_rows(&mut stmt, params, limits, fail, &mut row, |row| {
        rows.push(std::mem::take(row))
    })?;
    // Read after stepping: a schema change re-prepares the statement.
    let columns = column_names(&stmt)?;
    Ok(QueryResult { columns, rows })
}

/// A prepared statement's run on a reader: every row's values in one list.
fn run_prepared_query(
    reader: &Conn,
    prepared: &PreparedSql,
    params: &[SqlValue],
    limits: &StoreLimits,
) -> StoreResult<Vec<SqlValue>> {
    if prepared.columns.is_empty() {
        return Err(StoreError::Invalid(
            "statement returns no rows; use execute".into(),
        ));
    }
    sql::check_params(params, limits)?;
    reader.budgeted(limits.statement_timeout, || {
        prepared_rows(reader, prepared, params, limits)
    })
}

fn prepared_rows(
    reader: &Conn,
    prepared: &PreparedSql,
    params: &[SqlValue],
    limits: &StoreLimits,
) -> StoreResult<Vec<SqlValue>> {
    let fail = |e| error::map(e, &reader.ctl, limits);
    let mut stmt = cached_query(reader, &prepared.sql, params, limits)?;
    let mut values = Vec::new();
    read_rows(&mut stmt, params, limits, fail, &mut values, |_| {})?;
    // SQLite re-prepares a statement after a schema change when it steps
    // it; `SELECT *` may then have other columns than the guest was told,
    // so compare after stepping.
    if stmt.column_count() != prepared.columns.len() {
        return Err(StoreError::Invalid(format!(
            "the statement's result changed from {} to {} columns since it was prepared (schema change); prepare it again",
            prepared.columns.len(),
            stmt.column_count()
        )));
    }
    Ok(values)
}

/// `sql` from the reader's statement cache, if it only reads and takes
/// `params`.
fn cached_query<'c>(
    reader: &'c Conn,
    sql: &str,
    params: &[SqlValue],
    limits: &StoreLimits,
) -> StoreResult<rusqlite::CachedStatement<'c>> {
    let stmt = reader
        .conn
        .prepare_cached(sql)
        .map_err(|e| error::map(e, &reader.ctl, limits))?;
    if !stmt.readonly() {
        return Err(StoreError::Invalid(
            "statement writes to the database; use execute".into(),
        ));
    }
    check_param_count(&stmt, params)?;
    Ok(stmt)
}

/// Compiles `sql` on a reader (the authorizer is the writer's) without
/// running it.
fn run_prepare(reader: &Conn, sql: String, limits: &StoreLimits) -> StoreResult<PreparedSql> {
    check_sql(&sql)?;
    let columns = reader.budgeted(limits.statement_timeout, || {
        reader
            .conn
            .prepare_cached(&sql)
            .map_err(|e| error::map(e, &reader.ctl, limits))
            .and_then(|stmt| column_names(&stmt))
    })?;
    Ok(PreparedSql { sql, columns })
}

/// Steps `stmt`, pushing each value of the current row onto `values` and
/// calling `row_done` after each row; enforces the row and byte caps.
fn read_rows(
    stmt: &mut rusqlite::Statement<'_>,
    params: &[SqlValue],
    limits: &StoreLimits,
    fail: impl Fn(rusqlite::Error) -> StoreError,
    values: &mut Vec<SqlValue>,
    mut row_done: impl FnMut(&mut Vec<SqlValue>),
) -> StoreResult<()> {
    let mut count = 0usize;
    let mut bytes = 0usize;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(params.iter().map(Param)))
        .map_err(&fail)?;
    while let Some(row) = rows.next().map_err(&fail)? {
        if count >= limits.max_rows {
            return Err(StoreError::Limit(format!(
                "query returns more than {} rows",
                limits.max_rows
            )));
        }
        count += 1;
        let width = row.as_ref().column_count();
        // One allocation per row when `row_done` takes the row away.
        values.reserve(width);
        for i in 0..width {
            let value = row.get_ref(i).map_err(&fail)?;
            bytes = bytes.saturating_add(sql::value_ref_bytes(value));
            if bytes > limits.max_result_bytes {
                return Err(StoreError::Limit(format!(
                    "query result exceeds {} bytes",
                    limits.max_result_bytes
                )));
            }
            values.push(sql::from_value_ref(value));
        }
        row_done(values);
    }
    Ok(())
}

/// One statement on the writer, in whatever transaction is open (none:
/// autocommit, so it is committed and fsynced when this returns).
fn run_statement(
    writer: &Conn,
    sql: &str,
    params: &[SqlValue],
    limits: &StoreLimits,
) -> StoreResult<ExecuteResult> {
    let lead = check_sql(sql)?;
    writer.budgeted(limits.statement_timeout, || {
        write_statement(writer, lead, sql, params, limits)
    })
}

fn write_statement(
    writer: &Conn,
    lead: Lead,
    sql: &str,
    params: &[SqlValue],
    limits: &StoreLimits,
) -> StoreResult<ExecuteResult> {
    let fail = |e| error::map(e, &writer.ctl, limits);
    let mut stmt = writer.conn.prepare_cached(sql).map_err(fail)?;
    // Checked before stepping: the first step of `INSERT ... RETURNING`
    // already writes.
    if stmt.column_count() > 0 {
        return Err(StoreError::Invalid(
            "statement returns rows; use query".into(),
        ));
    }
    check_param_count(&stmt, params)?;
    set_last_insert_rowid(&writer.conn, NO_ROWID);
    let changed = stmt
        .execute(rusqlite::params_from_iter(params.iter().map(Param)))
        .map_err(fail)?;
    // `changes()` keeps the count of the last INSERT/UPDATE/DELETE, so it
    // says nothing about DDL; a rowid is only reported for an INSERT that
    // inserted (not an upsert that updated, not a WITHOUT ROWID table: both
    // leave the sentinel in place).
    let rows_affected = if lead.is_dml() { changed as u64 } else { 0 };
    let rowid = writer.conn.last_insert_rowid();
    let last_insert_id =
        (lead == Lead::Insert && changed > 0 && rowid != NO_ROWID).then_some(rowid);
    Ok(ExecuteResult {
        rows_affected,
        last_insert_id,
    })
}

fn set_last_insert_rowid(conn: &rusqlite::Connection, rowid: i64) {
    // SAFETY: `handle()` is the live connection owned by `conn`, which we
    // hold exclusively (the writer lock); sqlite3_set_last_insert_rowid only
    // stores an integer in it.
    unsafe { rusqlite::ffi::sqlite3_set_last_insert_rowid(conn.handle(), rowid) }
}

fn run_execute(
    writer: &Conn,
    sql: &str,
    params: &[SqlValue],
    limits: &StoreLimits,
) -> StoreResult<ExecuteResult> {
    writer.rollback();
    run_statement(writer, sql, params, limits)
}

fn run_batch(
    writer: &Conn,
    statements: &[SqlStatement],
    limits: &StoreLimits,
) -> StoreResult<Vec<ExecuteResult>> {
    let fail = |e| error::map(e, &writer.ctl, limits);
    writer.rollback();
    writer
        .host(|c| c.execute_batch("BEGIN IMMEDIATE"))
        .map_err(fail)?;
    let mut results = Vec::with_capacity(statements.len());
    for (index, statement) in statements.iter().enumerate() {
        match run_statement(writer, &statement.sql, &statement.params, limits) {
            Ok(result) => results.push(result),
            Err(e) => {
                writer.rollback();
                return Err(at_statement(index, e));
            }
        }
    }
    if let Err(e) = writer.host(|c| c.execute_batch("COMMIT")) {
        writer.rollback();
        return Err(prefixed("commit", fail(e)));
    }
    Ok(results)
}

fn at_statement(index: usize, e: StoreError) -> StoreError {
    prefixed(&format!("statement {index}"), e)
}

fn prefixed(prefix: &str, e: StoreError) -> StoreError {
    match e {
        StoreError::Invalid(m) => StoreError::Invalid(format!("{prefix}: {m}")),
        StoreError::Limit(m) => StoreError::Limit(format!("{prefix}: {m}")),
        StoreError::Unavailable(m) => StoreError::Unavailable(format!("{prefix}: {m}")),
        StoreError::Conflict(m) => StoreError::Conflict(format!("{prefix}: {m}")),
        StoreError::Internal(m) => StoreError::Internal(format!("{prefix}: {m}")),
    }
}

fn log_failure(ns: &Namespace, op: &str, e: &StoreError) {
    if matches!(e, StoreError::Unavailable(_) | StoreError::Internal(_)) {
        tracing::warn!(namespace = %ns, op, error = %e, "sql store failure");
    }
}

/// Runs `f` on the blocking pool; the future resolves when it is done.
fn blocking<T: Send + 'static>(
    ns: Namespace,
    op: &'static str,
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> WriteFuture<T> {
    Box::pin(async move {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| StoreError::Internal("SQL writes need a tokio runtime".into()))?;
        let result = match handle.spawn_blocking(f).await {
            Ok(result) => result,
            Err(e) if e.is_cancelled() => {
                Err(StoreError::Unavailable("the store is shutting down".into()))
            }
            Err(_) => Err(StoreError::Internal("SQL write task panicked".into())),
        };
        if let Err(e) = &result {
            log_failure(&ns, op, e);
        }
        result
    })
}

impl SqliteStore {
    /// Runs `f` inline on a pooled reader of `ns`'s database.
    fn on_reader<T>(
        &self,
        ns: &Namespace,
        op: &str,
        f: impl FnOnce(&Conn, &StoreLimits) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let limits = &self.inner.limits;
        let result = self.inner.database(ns).and_then(|db| {
            let reader = db.take_reader(limits)?;
            let result = f(&reader, limits);
            db.return_reader(reader);
            result
        });
        if let Err(e) = &result {
            log_failure(ns, op, e);
        }
        result
    }
}

impl SqlStore for SqliteStore {
    fn query(&self, ns: &Namespace, sql: &str, params: Vec<SqlValue>) -> StoreResult<QueryResult> {
        self.on_reader(ns, "query", |reader, limits| {
            run_query(reader, sql, &params, limits)
        })
    }

    fn prepare(&self, ns: &Namespace, sql: String) -> StoreResult<PreparedSql> {
        self.on_reader(ns, "prepare", |reader, limits| {
            run_prepare(reader, sql, limits)
        })
    }

    fn query_prepared(
        &self,
        ns: &Namespace,
        prepared: &PreparedSql,
        params: Vec<SqlValue>,
    ) -> StoreResult<Vec<SqlValue>> {
        self.on_reader(ns, "query_prepared", |reader, limits| {
            run_prepared_query(reader, prepared, &params, limits)
        })
    }

    fn execute(
        &self,
        ns: &Namespace,
        sql: String,
        params: Vec<SqlValue>,
    ) -> WriteFuture<ExecuteResult> {
        if let Err(e) = sql::check_params(&params, &self.inner.limits) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let inner = self.inner.clone();
        let ns2 = ns.clone();
        blocking(ns.clone(), "execute", move || {
            let db = inner.database(&ns2)?;
            let writer = db.writer.lock().map_err(poisoned)?;
            run_execute(&writer, &sql, &params, &inner.limits)
        })
    }

    fn execute_batch(
        &self,
        ns: &Namespace,
        statements: Vec<SqlStatement>,
    ) -> WriteFuture<Vec<ExecuteResult>> {
        for (index, statement) in statements.iter().enumerate() {
            if let Err(e) = sql::check_params(&statement.params, &self.inner.limits) {
                return Box::pin(std::future::ready(Err(at_statement(index, e))));
            }
        }
        if statements.is_empty() {
            return Box::pin(std::future::ready(Ok(Vec::new())));
        }
        let inner = self.inner.clone();
        let ns2 = ns.clone();
        blocking(ns.clone(), "execute_batch", move || {
            let db = inner.database(&ns2)?;
            let writer = db.writer.lock().map_err(poisoned)?;
            run_batch(&writer, &statements, &inner.limits)
        })
    }

    fn erase_user_rows(
        &self,
        ns: &Namespace,
        tables: Vec<UserTable>,
        user: String,
    ) -> WriteFuture<u64> {
        let tables = match erase::prepare(&tables, &user, &self.inner.limits) {
            Ok(t) => t,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let inner = self.inner.clone();
        let ns2 = ns.clone();
        blocking(ns.clone(), "erase_user_rows", move || {
            // A component that never used SQL has nothing to erase; do not
            // create its database.
            let Some(db) = inner.existing_database(&ns2)? else {
                return Ok(0);
            };
            let writer = db.writer.lock().map_err(poisoned)?;
            let deleted = erase::erase_rows(&writer, &tables, &user, &inner.limits)?;
            // Also after deleting nothing: finishes an earlier erasure whose
            // checkpoint failed.
            erase::checkpoint_truncate(&writer, &db.path, &inner.limits)?;
            Ok(deleted)
        })
    }

    fn export_user_rows(
        &self,
        ns: &Namespace,
        tables: &[UserTable],
        user: &str,
    ) -> StoreResult<Vec<(String, QueryResult)>> {
        let limits = &self.inner.limits;
        let result = erase::prepare(tables, user, limits).and_then(|tables| {
            let Some(db) = self.inner.existing_database(ns)? else {
                return Ok(Vec::new());
            };
            let reader = db.take_reader(limits)?;
            let result = erase::export_rows(&reader, &tables, user, limits);
            db.return_reader(reader);
            result
        });
        if let Err(e) = &result {
            log_failure(ns, "export_user_rows", e);
        }
        result
    }
}
