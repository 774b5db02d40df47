//! The strongly consistent ledger behind the `ledger` interface.
//!
//! Each account is a log of *records* in a [`RecordLog`]: on NATS one
//! JetStream subject per account ([`JetStreamLog`]), on the embedded node a
//! SQLite table ([`SqliteLog`]). A record holds one or more entries and is
//! self-contained: every entry carries its account sequence and the balance
//! after it, so the last record alone answers `balance`.
//!
//! A record is written only if the account's last record is still the one
//! this node planned against (JetStream's expected-last-subject-sequence, a
//! compare-and-set). That makes appends linearizable per account with any
//! number of writers on any number of nodes, and it is why no interleaving
//! can overdraw an account: a debit is checked against the balance of the
//! record it is appended after. A writer that loses the race reads the
//! records it missed and plans again.
//!
//! Idempotency keys are checked against the account's whole history (kept
//! in memory per account once loaded), so a key is applied once forever,
//! not only within a deduplication window. A node's cached history can only
//! lag the log, never contradict it, and a lagging plan fails the
//! compare-and-set — so the check is exact.
//!
//! Concurrent appends to one account on one node share one record (group
//! commit): whoever holds the account's lock takes every append queued
//! meanwhile. That is what makes a hot account faster than one round trip
//! per append.

pub mod audit;
mod jetstream;
mod sqlite;

pub use jetstream::JetStreamLog;
pub use sqlite::SqliteLog;

use async_trait::async_trait;
use keel_telemetry::LedgerMetrics;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest account id, in bytes.
pub const MAX_ACCOUNT_BYTES: usize = 128;
/// Longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Accounts whose history a node keeps in memory before it forgets idle
/// ones.
const MAX_CACHED_ACCOUNTS: usize = 4096;
/// Records read per round trip while catching up.
const READ_BATCH: usize = 512;
/// Appends batched into one record at most (keeps records far below
/// NATS's max_payload: ~400 bytes per entry at the longest key).
const MAX_BATCH: usize = 256;

/// One account of one component.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountKey {
    pub component: String,
    pub account: String,
}

impl AccountKey {
    pub fn new(component: &str, account: &str) -> AccountKey {
        AccountKey {
            component: component.to_owned(),
            account: account.to_owned(),
        }
    }
}

/// An entry as records store it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEntry {
    #[serde(rename = "s")]
    pub sequence: u64,
    #[serde(rename = "a")]
    pub amount: i64,
    #[serde(rename = "b")]
    pub balance: i64,
    #[serde(rename = "k")]
    pub key: String,
    #[serde(rename = "t")]
    pub at_ms: u64,
}

/// The entries of one record, in sequence order, and the id of the write
/// that made it (to recognise one's own record after an uncertain write).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    #[serde(rename = "v")]
    pub version: u8,
    pub id: String,
    pub entries: Vec<StoredEntry>,
}

const BATCH_VERSION: u8 = 1;

impl Batch {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a batch always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Batch, LogError> {
        let b: Batch = serde_json::from_slice(bytes)
            .map_err(|e| LogError::Internal(format!("undecodable ledger record: {e}")))?;
        if b.version != BATCH_VERSION {
            return Err(LogError::Internal(format!(
                "ledger record version {} is not supported (this build reads {BATCH_VERSION})",
                b.version
            )));
        }
        if b.entries.is_empty() {
            return Err(LogError::Internal("ledger record without entries".into()));
        }
        Ok(b)
    }
}

/// A record as a [`RecordLog`] stores it: opaque bytes at a position
/// (increasing per key, not necessarily contiguous).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub position: u64,
    pub bytes: Vec<u8>,
}

/// A ledger record and its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub position: u64,
    pub batch: Batch,
}

impl Record {
    fn decode(raw: RawRecord) -> Result<Record, LogError> {
        Ok(Record {
            position: raw.position,
            batch: Batch::decode(&raw.bytes)?,
        })
    }
}

/// Why a log call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// The compare-and-set lost: the account has records after `expected`.
    /// Nothing was written.
    #[error("another writer appended first")]
    Conflict,
    /// The write may or may not have been stored (timeout, lost connection).
    #[error("{0}")]
    Uncertain(String),
    /// Not reachable; nothing was written.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

/// A compare-and-set log of opaque records per key (an account; the audit
/// trail is one more key): where the ledger and the audit chain live.
/// Positions are compared only within one key.
#[async_trait]
pub trait RecordLog: Send + Sync + 'static {
    /// "jetstream" or "sqlite".
    fn kind(&self) -> &'static str;

    /// Up to `max` records of `key` with position > `after`, in order.
    async fn read_after(
        &self,
        key: &AccountKey,
        after: u64,
        max: usize,
    ) -> Result<Vec<RawRecord>, LogError>;

    /// The key's last record, reflecting every acknowledged write.
    async fn last(&self, key: &AccountKey) -> Result<Option<RawRecord>, LogError>;

    /// Writes `bytes` as the key's next record if its last record is at
    /// `expected` (0: it has none); returns the new record's position.
    /// `id` is unique per write (the bus deduplicates retries by it).
    async fn append(
        &self,
        key: &AccountKey,
        expected: u64,
        bytes: Vec<u8>,
        id: &str,
    ) -> Result<u64, LogError>;

    /// Up to `max` records of every key of `component` with position >
    /// `after` (positions ordered across keys), with their key's name.
    async fn scan(
        &self,
        component: &str,
        after: u64,
        max: usize,
    ) -> Result<Vec<(String, RawRecord)>, LogError>;
}

/// One account's entries over a period (`reconcile-billing`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeriodTotals {
    /// Sum of positive amounts.
    pub credits: i64,
    /// Sum of negative amounts (≤ 0).
    pub debits: i64,
    pub debit_entries: u64,
    pub entries: u64,
}

/// An entry as the `ledger` interface returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub account: String,
    pub sequence: u64,
    pub amount: i64,
    pub balance: i64,
    pub idempotency_key: String,
    pub at_ms: u64,
    /// An earlier entry with the same key; this call appended nothing.
    pub replayed: bool,
}

/// A page of history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryPage {
    pub entries: Vec<Entry>,
    pub next_cursor: Option<u64>,
}

/// Why a ledger call failed (maps onto the WIT `error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("{0}")]
    Invalid(String),
    /// Refused: insufficient funds, or a key reused with another amount.
    #[error("{0}")]
    Conflict(String),
    /// The log could not be reached, or the append could not win the
    /// compare-and-set in time. Retrying with the same key is safe.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

/// Ledger policy.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// Lowest balance a debit may leave (0: no overdraft).
    pub min_balance: i64,
    /// Per-account overrides, keyed `<component>/<account>`.
    pub account_min_balance: HashMap<String, i64>,
    /// Most entries `history` returns per page.
    pub max_page: u32,
    /// How long an append may keep losing compare-and-sets before it gives
    /// up with `unavailable`.
    pub append_deadline: Duration,
    /// This writer's name, unique in the deployment (the edge), for record
    /// ids.
    pub writer: String,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            min_balance: 0,
            account_min_balance: HashMap::new(),
            max_page: 1000,
            append_deadline: Duration::from_secs(10),
            writer: "node".into(),
        }
    }
}

/// The ledger of one node: the account cache and the append protocol over a
/// [`RecordLog`].
pub struct Ledger {
    log: Arc<dyn RecordLog>,
    opts: LedgerOptions,
    metrics: LedgerMetrics,
    accounts: Mutex<HashMap<AccountKey, Arc<Account>>>,
    /// Record ids: `<writer>.<incarnation>.<n>`.
    incarnation: u64,
    next_record: AtomicU64,
}

struct Pending {
    amount: i64,
    key: String,
    reply: tokio::sync::oneshot::Sender<Result<Entry, LedgerError>>,
}

struct Account {
    queue: Mutex<Vec<Pending>>,
    state: tokio::sync::Mutex<AccountState>,
}

/// What this node knows of an account: a prefix of its log.
#[derive(Default)]
struct AccountState {
    /// Whether the log was read since the last uncertain or lost write.
    current: bool,
    position: u64,
    entries: Vec<StoredEntry>,
    /// Idempotency key → index in `entries`, record id.
    keys: HashMap<String, (usize, Arc<str>)>,
}

impl AccountState {
    fn balance(&self) -> i64 {
        self.entries.last().map_or(0, |e| e.balance)
    }

    fn apply(&mut self, record: Record) -> Result<(), LogError> {
        let id: Arc<str> = record.batch.id.into();
        for e in record.batch.entries {
            let expected = self.entries.len() as u64 + 1;
            if e.sequence != expected {
                return Err(LogError::Internal(format!(
                    "ledger record at {} has entry {} where {expected} was next",
                    record.position, e.sequence
                )));
            }
            self.keys
                .insert(e.key.clone(), (self.entries.len(), id.clone()));
            self.entries.push(e);
        }
        self.position = record.position;
        Ok(())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn check_account(account: &str) -> Result<(), LedgerError> {
    if account.is_empty() || account.len() > MAX_ACCOUNT_BYTES {
        return Err(LedgerError::Invalid(format!(
            "an account id is 1..={MAX_ACCOUNT_BYTES} bytes, not {}",
            account.len()
        )));
    }
    Ok(())
}

fn entry(account: &str, e: &StoredEntry, replayed: bool) -> Entry {
    Entry {
        account: account.to_owned(),
        sequence: e.sequence,
        amount: e.amount,
        balance: e.balance,
        idempotency_key: e.key.clone(),
        at_ms: e.at_ms,
        replayed,
    }
}

fn log_error(e: LogError) -> LedgerError {
    match e {
        LogError::Internal(m) => LedgerError::Internal(m),
        LogError::Conflict => LedgerError::Unavailable("ledger compare-and-set lost".into()),
        LogError::Uncertain(m) | LogError::Unavailable(m) => {
            LedgerError::Unavailable(format!("ledger unavailable: {m}"))
        }
    }
}

impl Ledger {
    pub fn new(log: Arc<dyn RecordLog>, opts: LedgerOptions, metrics: LedgerMetrics) -> Ledger {
        Ledger {
            log,
            opts,
            metrics,
            accounts: Mutex::new(HashMap::new()),
            incarnation: now_ms(),
            next_record: AtomicU64::new(1),
        }
    }

    pub fn log_kind(&self) -> &'static str {
        self.log.kind()
    }

    fn account(&self, key: &AccountKey) -> Arc<Account> {
        let mut accounts = self.accounts.lock().expect("ledger accounts lock");
        if accounts.len() >= MAX_CACHED_ACCOUNTS && !accounts.contains_key(key) {
            // Forget accounts no call is using; a forgotten one is read from
            // the log again on its next use. (Two copies of one account on a
            // node would still be safe: the compare-and-set orders them.)
            accounts.retain(|_, a| Arc::strong_count(a) > 1);
        }
        accounts
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Account {
                    queue: Mutex::new(Vec::new()),
                    state: tokio::sync::Mutex::new(AccountState::default()),
                })
            })
            .clone()
    }

    fn min_balance(&self, key: &AccountKey) -> i64 {
        self.opts
            .account_min_balance
            .get(&format!("{}/{}", key.component, key.account))
            .copied()
            .unwrap_or(self.opts.min_balance)
    }

    /// Appends `amount` to the account unless `idempotency_key` was used
    /// there before (then that entry is returned, `replayed`).
    pub async fn append(
        &self,
        key: &AccountKey,
        amount: i64,
        idempotency_key: &str,
    ) -> Result<Entry, LedgerError> {
        check_account(&key.account)?;
        if amount == 0 {
            return Err(LedgerError::Invalid(
                "an amount of 0 is not an entry".into(),
            ));
        }
        if idempotency_key.is_empty() || idempotency_key.len() > MAX_KEY_BYTES {
            return Err(LedgerError::Invalid(format!(
                "an idempotency key is 1..={MAX_KEY_BYTES} bytes, not {}",
                idempotency_key.len()
            )));
        }
        let account = self.account(key);
        let (reply, answer) = tokio::sync::oneshot::channel();
        account
            .queue
            .lock()
            .expect("ledger queue lock")
            .push(Pending {
                amount,
                key: idempotency_key.to_owned(),
                reply,
            });
        {
            let mut state = account.state.lock().await;
            loop {
                let batch: Vec<Pending> = {
                    let mut q = account.queue.lock().expect("ledger queue lock");
                    let n = q.len().min(MAX_BATCH);
                    q.drain(..n).collect()
                };
                if batch.is_empty() {
                    break;
                }
                self.write(key, &mut state, batch).await;
            }
        }
        answer
            .await
            .unwrap_or_else(|_| Err(LedgerError::Internal("ledger append dropped".into())))
    }

    /// Reads the records this node has not seen, if it may have missed any.
    async fn catch_up(&self, key: &AccountKey, state: &mut AccountState) -> Result<(), LogError> {
        if state.current {
            return Ok(());
        }
        loop {
            let records = self.log.read_after(key, state.position, READ_BATCH).await?;
            let n = records.len();
            for r in records {
                let r = Record::decode(r)?;
                if r.position <= state.position {
                    return Err(LogError::Internal(format!(
                        "ledger log returned position {} after {}",
                        r.position, state.position
                    )));
                }
                state.apply(r)?;
            }
            if n < READ_BATCH {
                break;
            }
        }
        state.current = true;
        Ok(())
    }

    /// Plans `batch` against the account, writes it as one record, and
    /// answers every append in it.
    async fn write(&self, key: &AccountKey, state: &mut AccountState, batch: Vec<Pending>) {
        let deadline = Instant::now() + self.opts.append_deadline;
        let min = self.min_balance(key);
        // Records this call wrote (or may have): their entries are not replays.
        let mut ours: HashSet<Arc<str>> = HashSet::new();
        let mut conflicts = 0u32;
        let answers = loop {
            if let Err(e) = self.catch_up(key, state).await {
                let e = log_error(e);
                break batch.iter().map(|_| Err(e.clone())).collect();
            }
            let id: Arc<str> = format!(
                "{}.{}.{}",
                self.opts.writer,
                self.incarnation,
                self.next_record.fetch_add(1, Ordering::Relaxed)
            )
            .into();
            let (answers, new) = self.plan(key, state, &batch, min, &ours);
            if new.is_empty() {
                break answers;
            }
            let record = Batch {
                version: BATCH_VERSION,
                id: id.to_string(),
                entries: new,
            };
            ours.insert(id);
            match self
                .log
                .append(key, state.position, record.encode(), &record.id)
                .await
            {
                Ok(position) => {
                    self.metrics.records.inc();
                    self.metrics.appends.inc_by(record.entries.len() as u64);
                    let record = Record {
                        position,
                        batch: record,
                    };
                    if let Err(e) = state.apply(record) {
                        state.current = false;
                        let e = log_error(e);
                        break batch.iter().map(|_| Err(e.clone())).collect();
                    }
                    break answers;
                }
                Err(LogError::Conflict) => {
                    self.metrics.conflicts.inc();
                    conflicts += 1;
                    state.current = false;
                }
                Err(LogError::Uncertain(m)) => {
                    // Reading the log tells whether it was stored; a record
                    // stored late fails its compare-and-set, so retrying
                    // cannot apply anything twice.
                    tracing::debug!(account = ?key, "ledger write uncertain: {m}");
                    state.current = false;
                }
                Err(e) => {
                    state.current = false;
                    let e = log_error(e);
                    break batch.iter().map(|_| Err(e.clone())).collect();
                }
            }
            if Instant::now() >= deadline {
                let e = LedgerError::Unavailable(format!(
                    "ledger account {:?} is contended: {conflicts} compare-and-sets lost in {:?}; retry with the same idempotency key",
                    key.account, self.opts.append_deadline
                ));
                break batch.iter().map(|_| Err(e.clone())).collect();
            }
        };
        let answers: Vec<Result<Entry, LedgerError>> = answers;
        for (p, a) in batch.into_iter().zip(answers) {
            match &a {
                Ok(e) if e.replayed => {
                    self.metrics.replays.inc();
                }
                Err(LedgerError::Conflict(_)) => {
                    self.metrics.refusals.inc();
                }
                _ => {}
            }
            let _ = p.reply.send(a);
        }
    }

    /// The answers `batch` gets if the entries it adds are written right
    /// after the account's state, and those entries.
    fn plan(
        &self,
        key: &AccountKey,
        state: &AccountState,
        batch: &[Pending],
        min: i64,
        ours: &HashSet<Arc<str>>,
    ) -> (Vec<Result<Entry, LedgerError>>, Vec<StoredEntry>) {
        let at_ms = now_ms().max(state.entries.last().map_or(0, |e| e.at_ms));
        let mut balance = state.balance();
        let mut new: Vec<StoredEntry> = Vec::new();
        let mut planned: HashMap<&str, usize> = HashMap::new();
        let mut answers = Vec::with_capacity(batch.len());
        for p in batch {
            let earlier = match state.keys.get(&p.key) {
                Some((i, id)) => Some((&state.entries[*i], !ours.contains(id))),
                None => planned.get(p.key.as_str()).map(|&i| (&new[i], true)),
            };
            if let Some((e, replayed)) = earlier {
                answers.push(if e.amount == p.amount {
                    Ok(entry(&key.account, e, replayed))
                } else {
                    Err(LedgerError::Conflict(format!(
                        "idempotency key {:?} was used for an amount of {}, not {}",
                        p.key, e.amount, p.amount
                    )))
                });
                continue;
            }
            let Some(after) = balance.checked_add(p.amount) else {
                answers.push(Err(LedgerError::Invalid(format!(
                    "the balance {balance} plus {} overflows",
                    p.amount
                ))));
                continue;
            };
            if p.amount < 0 && after < min {
                answers.push(Err(LedgerError::Conflict(format!(
                    "insufficient funds: balance {balance}, debit {}, minimum balance {min}",
                    -i128::from(p.amount)
                ))));
                continue;
            }
            balance = after;
            let e = StoredEntry {
                sequence: state.entries.len() as u64 + new.len() as u64 + 1,
                amount: p.amount,
                balance,
                key: p.key.clone(),
                at_ms,
            };
            answers.push(Ok(entry(&key.account, &e, false)));
            planned.insert(p.key.as_str(), new.len());
            new.push(e);
        }
        (answers, new)
    }

    /// The account's balance after every acknowledged append (0 without
    /// entries): read from the log's last record.
    pub async fn balance(&self, key: &AccountKey) -> Result<i64, LedgerError> {
        check_account(&key.account)?;
        let Some(last) = self.log.last(key).await.map_err(log_error)? else {
            return Ok(0);
        };
        let last = Record::decode(last).map_err(log_error)?;
        Ok(last.batch.entries.last().map_or(0, |e| e.balance))
    }

    /// Every account of `component` with entries whose `at_ms` is in
    /// `[start_ms, end_ms)`, with their totals there. Reads the whole log of
    /// the component as of the call.
    pub async fn period_totals(
        &self,
        component: &str,
        start_ms: u64,
        end_ms: u64,
    ) -> Result<std::collections::BTreeMap<String, PeriodTotals>, LedgerError> {
        let mut out: std::collections::BTreeMap<String, PeriodTotals> = Default::default();
        let mut after = 0;
        loop {
            let page = self
                .log
                .scan(component, after, READ_BATCH)
                .await
                .map_err(log_error)?;
            let n = page.len();
            for (account, raw) in page {
                after = raw.position;
                let record = Record::decode(raw).map_err(log_error)?;
                for e in record.batch.entries {
                    if e.at_ms < start_ms || e.at_ms >= end_ms {
                        continue;
                    }
                    let t = out.entry(account.clone()).or_default();
                    t.entries += 1;
                    if e.amount > 0 {
                        t.credits = t.credits.saturating_add(e.amount);
                    } else {
                        t.debits = t.debits.saturating_add(e.amount);
                        t.debit_entries += 1;
                    }
                }
            }
            if n < READ_BATCH {
                return Ok(out);
            }
        }
    }

    /// Entries with sequence > `cursor`, at most `limit` (capped).
    pub async fn history(
        &self,
        key: &AccountKey,
        cursor: Option<u64>,
        limit: u32,
    ) -> Result<EntryPage, LedgerError> {
        check_account(&key.account)?;
        if limit == 0 {
            return Err(LedgerError::Invalid("limit must be at least 1".into()));
        }
        let limit = limit.min(self.opts.max_page) as usize;
        let account = self.account(key);
        let mut state = account.state.lock().await;
        // Linearizable: whatever other nodes appended is read first.
        state.current = false;
        self.catch_up(key, &mut state).await.map_err(log_error)?;
        let start = usize::try_from(cursor.unwrap_or(0))
            .unwrap_or(usize::MAX)
            .min(state.entries.len());
        let end = start.saturating_add(limit).min(state.entries.len());
        let entries = state.entries[start..end]
            .iter()
            .map(|e| entry(&key.account, e, false))
            .collect();
        Ok(EntryPage {
            entries,
            next_cursor: (end < state.entries.len()).then_some(end as u64),
        })
    }
}

#[cfg(test)]
mod tests;
