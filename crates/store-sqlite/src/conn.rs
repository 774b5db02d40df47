//! Opening and locking down one SQLite connection.

use keel_store::StoreLimits;
use rusqlite::config::DbConfig;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The progress handler runs every this many VM instructions (a few µs).
const PROGRESS_OPS: i32 = 1000;
/// No statement may produce a string, BLOB or row larger than this floor or
/// the configured result/value caps, whichever is largest.
const MIN_LENGTH_LIMIT: usize = 64 * 1024;
/// Virtual table modules a guest may instantiate (all store only inside the
/// same database file).
const ALLOWED_MODULES: [&str; 5] = ["fts3", "fts4", "fts5", "rtree", "rtree_i32"];
/// PRAGMAs SQLite's own FTS and R*Tree code runs internally through the
/// same connection (so the authorizer sees them). Only their read-only,
/// value-less form is allowed; it reveals nothing outside this database.
const INTERNAL_PRAGMAS: [&str; 2] = ["data_version", "page_size"];
/// Functions refused even though they are disabled by default.
const DENIED_FUNCTIONS: [&str; 2] = ["load_extension", "fts3_tokenizer"];

const ATTACH_REFUSED: &str = "ATTACH, DETACH and VACUUM are not allowed";

/// rusqlite panics on a busy timeout beyond `i32::MAX` ms; a statement
/// timeout that large is a misconfiguration anyway.
const MAX_BUSY_TIMEOUT: Duration = Duration::from_secs(3600);

const NO_DEADLINE: u64 = u64::MAX;

/// SQLite's `unix-excl` VFS: the first connection to lock a database file
/// takes one exclusive POSIX lock on it for the whole process, and from then
/// on this process's connections coordinate in memory (the WAL index lives
/// on the heap, no `-shm` file). A read then costs no system call, where
/// the default VFS makes two `fcntl` calls per read transaction for its
/// read-mark lock (a fifth of a point query's time). The price: no other
/// process can open a database while keel has it open, which keel wants
/// anyway. The writer is opened first and holds its SHARED lock for as long
/// as it is open (WAL mode), so the read-only readers, whose own locks
/// would pass through to `fcntl`, never change the process's lock.
const LOCK_VFS: &str = "unix-excl";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The one read-write connection of a database.
    Writer,
    /// A pooled `SQLITE_OPEN_READONLY` connection.
    Reader,
}

/// State shared between a connection's owner and its hooks (all on the
/// thread running the connection's statement; atomics only make it `Sync`).
pub(crate) struct Control {
    epoch: Instant,
    /// Wall-clock budget of the running statement in ns, `NO_DEADLINE` when
    /// none runs.
    budget: AtomicU64,
    /// Deadline of the running statement in ns since `epoch`, fixed the
    /// first time the progress handler runs during it (`NO_DEADLINE` until
    /// then). SQLite counts a cached statement's VM steps across its runs
    /// and calls the handler every `PROGRESS_OPS` of them, so a point query
    /// reads the clock once in dozens of runs instead of on every run; a
    /// statement's budget starts at most one interval, a few µs, late.
    deadline: AtomicU64,
    /// Set while the host itself runs BEGIN/COMMIT/ROLLBACK.
    host: AtomicBool,
    /// Why the authorizer last refused something (for the error message).
    denied: Mutex<Option<String>>,
    /// Whether `denied` may hold a reason: lets `start` skip its lock on
    /// every statement (a refusal is rare).
    any_denied: AtomicBool,
}

impl Control {
    fn new() -> Control {
        Control {
            epoch: Instant::now(),
            budget: AtomicU64::new(NO_DEADLINE),
            deadline: AtomicU64::new(NO_DEADLINE),
            host: AtomicBool::new(false),
            denied: Mutex::new(None),
            any_denied: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(NO_DEADLINE - 1)
    }

    /// Starts the wall-clock budget of one guest statement.
    fn start(&self, budget: Duration) {
        let budget = u64::try_from(budget.as_nanos()).unwrap_or(NO_DEADLINE - 1);
        self.budget
            .store(budget.min(NO_DEADLINE - 1), Ordering::Relaxed);
        self.deadline.store(NO_DEADLINE, Ordering::Relaxed);
        // A plain load on the hot path; only a connection whose
        // authorizer refused something pays for the lock.
        if self.any_denied.load(Ordering::Relaxed) {
            self.any_denied.store(false, Ordering::Relaxed);
            if let Ok(mut denied) = self.denied.lock() {
                *denied = None;
            }
        }
    }

    fn stop(&self) {
        self.budget.store(NO_DEADLINE, Ordering::Relaxed);
    }

    /// The progress handler: whether the running statement is out of time.
    fn expired(&self) -> bool {
        let budget = self.budget.load(Ordering::Relaxed);
        if budget == NO_DEADLINE {
            return false;
        }
        let now = self.now();
        let deadline = self.deadline.load(Ordering::Relaxed);
        if deadline == NO_DEADLINE {
            let deadline = now.saturating_add(budget).min(NO_DEADLINE - 1);
            self.deadline.store(deadline, Ordering::Relaxed);
            return budget == 0;
        }
        now >= deadline
    }

    pub(crate) fn take_denied(&self) -> Option<String> {
        self.denied.lock().ok().and_then(|mut d| d.take())
    }

    fn deny(&self, why: String) -> Authorization {
        if let Ok(mut denied) = self.denied.lock()
            && denied.is_none()
        {
            *denied = Some(why);
            self.any_denied.store(true, Ordering::Relaxed);
        }
        Authorization::Deny
    }

    fn authorize(&self, ctx: AuthContext<'_>) -> Authorization {
        // Defence in depth: no other database can be attached anyway. For
        // ALTER TABLE the schema is the first argument (the fourth, which
        // rusqlite reports as `database_name`, is a column for DROP COLUMN).
        let schema = match ctx.action {
            AuthAction::AlterTable { database_name, .. } => Some(database_name),
            _ => ctx.database_name,
        };
        if let Some(db) = schema
            && db != "main"
            && db != "temp"
        {
            return self.deny(format!("database {db:?} is not accessible"));
        }
        match ctx.action {
            AuthAction::Attach { .. } | AuthAction::Detach { .. } => {
                // VACUUM (and VACUUM INTO) attach internally, so they end here too.
                self.deny(ATTACH_REFUSED.into())
            }
            AuthAction::Pragma {
                pragma_name,
                pragma_value: None,
            } if INTERNAL_PRAGMAS
                .iter()
                .any(|p| p.eq_ignore_ascii_case(pragma_name)) =>
            {
                Authorization::Allow
            }
            AuthAction::Pragma { pragma_name, .. } => {
                self.deny(format!("PRAGMA {pragma_name} is not allowed"))
            }
            AuthAction::Transaction { .. } | AuthAction::Savepoint { .. }
                if !self.host.load(Ordering::Relaxed) =>
            {
                self.deny(
                    "transaction control is not allowed; execute_batch runs statements atomically"
                        .into(),
                )
            }
            AuthAction::CreateTempTable { .. }
            | AuthAction::CreateTempIndex { .. }
            | AuthAction::CreateTempTrigger { .. }
            | AuthAction::CreateTempView { .. } => {
                self.deny("temporary tables, indexes, triggers and views are not allowed".into())
            }
            AuthAction::CreateVtable { module_name, .. }
                if !ALLOWED_MODULES
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(module_name)) =>
            {
                self.deny(format!(
                    "virtual table module {module_name:?} is not allowed"
                ))
            }
            AuthAction::Function { function_name }
                if DENIED_FUNCTIONS
                    .iter()
                    .any(|f| f.eq_ignore_ascii_case(function_name)) =>
            {
                self.deny(format!("function {function_name} is not allowed"))
            }
            // rusqlite reports an ATTACH whose file name is not a literal
            // (`ATTACH ?`) as Unknown; anything unknown is refused.
            AuthAction::Unknown { code, .. }
                if code == rusqlite::ffi::SQLITE_ATTACH || code == rusqlite::ffi::SQLITE_DETACH =>
            {
                self.deny(ATTACH_REFUSED.into())
            }
            AuthAction::Unknown { code, .. } => {
                self.deny(format!("operation {code} is not allowed"))
            }
            _ => Authorization::Allow,
        }
    }
}

/// A locked-down connection and the state its hooks read.
pub(crate) struct Conn {
    pub(crate) conn: Connection,
    pub(crate) ctl: Arc<Control>,
}

impl Conn {
    /// Runs `f`, one guest statement's work, under a wall-clock `budget`
    /// (enforced by the progress handler).
    pub(crate) fn budgeted<T>(&self, budget: Duration, f: impl FnOnce() -> T) -> T {
        self.ctl.start(budget);
        let result = f();
        self.ctl.stop();
        result
    }

    /// Runs host-issued transaction control (allowed by the authorizer only
    /// here) with no statement deadline.
    pub(crate) fn host<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.ctl.stop();
        self.ctl.host.store(true, Ordering::Relaxed);
        let result = f(&self.conn);
        self.ctl.host.store(false, Ordering::Relaxed);
        result
    }

    /// Rolls back an open transaction, if any (after an error in a batch, or
    /// defensively before a write).
    pub(crate) fn rollback(&self) {
        if !self.conn.is_autocommit()
            && let Err(e) = self.host(|c| c.execute_batch("ROLLBACK"))
        {
            tracing::error!(error = %e, "sql store: rollback failed");
        }
    }
}

/// The busy timeout of every connection.
pub(crate) fn busy_timeout(limits: &StoreLimits) -> Duration {
    limits.statement_timeout.min(MAX_BUSY_TIMEOUT)
}

/// Opens the database at `path` (creating it for the writer) with every
/// guard on. Settings that need a PRAGMA are applied before the authorizer
/// (which refuses every PRAGMA) is installed.
pub(crate) fn open(path: &Path, role: Role, limits: &StoreLimits) -> rusqlite::Result<Conn> {
    let flags = match role {
        Role::Writer => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        Role::Reader => OpenFlags::SQLITE_OPEN_READ_ONLY,
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW
        | OpenFlags::SQLITE_OPEN_EXRESCODE;
    let mut conn = Connection::open_with_flags_and_vfs(path, flags, LOCK_VFS)?;

    // SQLITE_BUSY is rare here (one writer per file, WAL readers never wait
    // for it); wait no longer than a statement may run.
    conn.busy_timeout(busy_timeout(limits))?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_WRITABLE_SCHEMA, false)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER, false)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_ATTACH_CREATE, false)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_ATTACH_WRITE, false)?;
    conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
    let length = limits
        .max_result_bytes
        .max(limits.max_value_bytes)
        .max(MIN_LENGTH_LIMIT);
    conn.set_limit(
        Limit::SQLITE_LIMIT_LENGTH,
        i32::try_from(length).unwrap_or(i32::MAX),
    )?;

    if role == Role::Writer {
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!("cannot switch to WAL (journal mode is {mode})")),
            ));
        }
        // Every DELETE (and UPDATE, which frees the old cell) overwrites the
        // freed content with zeros, so an erased user's rows do not linger
        // in free space of the file (`erase_user_rows`). The cost: freed
        // bytes and freelist pages are written (pages that would otherwise
        // only be marked free), so deletes write more; reads are unaffected.
        // Guests cannot turn it off: the authorizer refuses PRAGMA.
        let on: i64 = conn.query_row("PRAGMA secure_delete = ON", [], |r| r.get(0))?;
        if on != 1 {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!("cannot turn secure_delete on (it is {on})")),
            ));
        }
    }
    // A write is durable when its commit returns; WAL + FULL fsyncs the log
    // on every commit.
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;

    let ctl = Arc::new(Control::new());
    let progress = ctl.clone();
    conn.progress_handler(PROGRESS_OPS, Some(move || progress.expired()))?;
    let auth = ctl.clone();
    conn.authorizer(Some(move |ctx: AuthContext<'_>| auth.authorize(ctx)))?;
    Ok(Conn { conn, ctl })
}
