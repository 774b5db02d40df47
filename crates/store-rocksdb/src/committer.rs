//! Group commit: callers stage, one thread writes.
//!
//! A writer runs its job on its own thread, under the committer's lock,
//! against the *open* group's [`Txn`] (each job sees the writes of every
//! job before it, including the group being written right now). The
//! committer thread takes the open group, writes it as one `WriteBatch`
//! with `sync = true` (each key once, with its last value; only a group of
//! [`Committer::write_unsynced`] jobs skips the fsync), and only then
//! completes each caller. N concurrent writers share one fsync, and the
//! next group is staged while this one is fsynced. A group that added
//! outbox entries wakes the forwarder once it is durable, whether or not
//! its callers still wait.
//!
//! An unsynced job does not wake a committer that waits briefly: it waits
//! up to [`UNSYNCED_DELAY`] in the open group for a synced write to share
//! it with. After a group that added outbox entries the committer waits
//! briefly, so the forwarder's acknowledgement of those entries rides on
//! the next event's group instead of a wake-up and a write of its own.
//!
//! A job that must see the database quiet ([`Committer::write_alone`]) is
//! queued instead, and so is every job called after it until it is
//! written: queued jobs run on the committer thread, in call order.

use crate::{Cf, map_err};
use keel_store::{StoreError, StoreResult, WriteFuture};
use rocksdb::{ColumnFamily, DB, WriteBatch, WriteOptions};
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot};

/// Most queued jobs the committer runs in one group: bounds the latency of
/// the first. (Groups staged by their callers are bounded by the writers in
/// flight.)
const MAX_QUEUED_GROUP: usize = 1024;

/// Longest an unsynced job waits in the open group for a synced one: far
/// longer than the gap between a busy edge's writes, short enough for the
/// forwarder, which only awaits an acknowledgement's write before the
/// next one or when it has nothing to send.
const UNSYNCED_DELAY: Duration = Duration::from_millis(1);

/// One write: runs against a group's [`Txn`] (on its caller's thread, or
/// on the committer's if it was queued), then learns whether the group
/// committed. One allocation per write.
trait Job: Send {
    fn run(&mut self, tx: &mut Txn);
    fn complete(self: Box<Self>, commit: StoreResult<()>);
}

struct Write<F, R> {
    f: Option<F>,
    result: Option<StoreResult<R>>,
    done: oneshot::Sender<StoreResult<R>>,
}

impl<F, R> Job for Write<F, R>
where
    R: Send + 'static,
    F: FnOnce(&mut Txn) -> StoreResult<R> + Send + 'static,
{
    fn run(&mut self, tx: &mut Txn) {
        if let Some(f) = self.f.take() {
            self.result = Some(tx.stage(f));
        }
    }

    fn complete(self: Box<Self>, commit: StoreResult<()>) {
        let r = match self.result {
            Some(r) => commit.and(r),
            None => Err(StoreError::Internal("store job never ran".into())),
        };
        let _ = self.done.send(r);
    }
}

/// A job not run yet; an `alone` one runs in a group of its own (see
/// [`Committer::write_alone`]); a `synced` one needs its group fsynced
/// before it completes (all but [`Committer::write_unsynced`]).
struct Queued {
    job: Box<dyn Job>,
    alone: bool,
    synced: bool,
}

/// Jobs that have run, and their writes, waiting to be written together.
#[derive(Default)]
struct Group {
    overlay: Overlay,
    jobs: Vec<Box<dyn Job>>,
    /// Unsynced jobs staged by callers: completed after `jobs` (and the
    /// forwarder's wake-up), so a request's thread wakes before the
    /// forwarder's.
    unsynced_jobs: Vec<Box<dyn Job>>,
    /// Whether any job needs the group fsynced (and so written now).
    synced: bool,
    /// When the first unsynced job joined.
    unsynced_since: Option<Instant>,
}

impl Group {
    fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.unsynced_jobs.is_empty()
    }

    /// Whether the committer should write it now rather than wait for more.
    fn due(&self, delay: Duration) -> bool {
        !self.is_empty()
            && (self.synced || self.unsynced_since.is_some_and(|t| t.elapsed() >= delay))
    }
}

/// What the committer thread is doing, for callers deciding whether to
/// wake it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// Working, or about to look at the state again.
    No,
    /// Until woken.
    Forever,
    /// Until woken or a timeout: only a synced or queued job wakes it.
    Briefly,
}

struct State {
    /// Staged by callers, on top of `in_flight`; the committer takes it
    /// whole once the group in flight is written.
    open: Group,
    /// Jobs not run yet, in call order, for the committer to run. While
    /// any wait here or run (`running_queued`), callers queue theirs too:
    /// staging before them would reorder writes.
    queued: VecDeque<Queued>,
    running_queued: bool,
    /// The group being written: not in the database yet, so jobs staged
    /// meanwhile read it below their own group.
    in_flight: Option<Arc<Overlay>>,
    /// A job's writes until it succeeds (see [`Txn::stage`]); kept for its
    /// capacity.
    scratch: Vec<Op>,
    waiting: Waiting,
    /// [`UNSYNCED_DELAY`]; longer in tests that must see an unsynced job
    /// wait for a synced one.
    unsynced_delay: Duration,
    shut_down: bool,
}

/// See `Shared::fault`.
#[cfg(test)]
type Fault = Box<dyn FnMut() -> StoreResult<()> + Send>;

struct Shared {
    db: Arc<DB>,
    state: Mutex<State>,
    outbox: OutboxPositions,
    /// Wakes the committer when it waits for work.
    work: Condvar,
    /// Runs before each group's write; an error fails the group as a
    /// failed write would.
    #[cfg(test)]
    fault: Mutex<Option<Fault>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Jobs run under the lock with their panics caught (`Txn::stage`),
        // and nothing else under it can leave the state half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The outbox's `(last appended, last acknowledged)` sequences as of the
/// last committed group, kept in memory so the forwarder can ask for them
/// on every round (and skip reading an outbox it knows is empty) without
/// two RocksDB reads each time. Every write of the two keys goes through
/// the committer, which stores their new values once the group is
/// written, before its callers learn it.
struct OutboxPositions {
    last: AtomicU64,
    acked: AtomicU64,
}

impl OutboxPositions {
    fn read_from(db: &DB) -> StoreResult<OutboxPositions> {
        let meta = handle(db, Cf::Meta)?;
        let read = |k: &[u8]| -> StoreResult<u64> {
            match db.get_pinned_cf(meta, k).map_err(map_err)? {
                Some(v) => crate::keys::decode_u64(&v),
                None => Ok(0),
            }
        };
        Ok(OutboxPositions {
            last: AtomicU64::new(read(crate::keys::meta_outbox_seq())?),
            acked: AtomicU64::new(read(crate::keys::meta_outbox_acked())?),
        })
    }

    /// After `overlay` is written. `last` first: a reader that sees the
    /// new `acked` sees a `last` at least as new.
    fn committed(&self, overlay: &Overlay) {
        let meta = &overlay[Cf::Meta as usize];
        if meta.is_empty() {
            return;
        }
        let value = |k: &[u8]| match meta.get(k) {
            Some(Some(v)) => crate::keys::decode_u64(v).ok(),
            _ => None,
        };
        if let Some(last) = value(crate::keys::meta_outbox_seq()) {
            self.last.store(last, Ordering::Release);
        }
        if let Some(acked) = value(crate::keys::meta_outbox_acked()) {
            self.acked.store(acked, Ordering::Release);
        }
    }
}

pub(crate) fn handle(db: &DB, cf: Cf) -> StoreResult<&ColumnFamily> {
    db.cf_handle(cf.name())
        .ok_or_else(|| StoreError::Internal(format!("column family {} missing", cf.name())))
}

pub(crate) struct Committer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Committer {
    /// Refuses new writes and waits for every write called before, so the
    /// database is closed (and its lock released) when the store is
    /// dropped.
    fn drop(&mut self) {
        self.shared.lock().shut_down = true;
        self.shared.work.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Committer {
    /// `outbox_signal` is notified after each group that added outbox
    /// entries is durable.
    pub fn start(db: Arc<DB>, outbox_signal: Arc<Notify>) -> StoreResult<Committer> {
        for cf in Cf::ALL {
            handle(&db, cf)?;
        }
        let outbox = OutboxPositions::read_from(&db)?;
        let shared = Arc::new(Shared {
            outbox,
            db,
            state: Mutex::new(State {
                open: Group::default(),
                queued: VecDeque::new(),
                running_queued: false,
                in_flight: None,
                scratch: Vec::new(),
                waiting: Waiting::No,
                unsynced_delay: UNSYNCED_DELAY,
                shut_down: false,
            }),
            work: Condvar::new(),
            #[cfg(test)]
            fault: Mutex::new(None),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("keel-store-commit".into())
                .spawn(move || run(&shared, &outbox_signal))
                .map_err(|e| StoreError::Unavailable(format!("cannot start committer: {e}")))?
        };
        Ok(Committer {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs `f` *now*, on this thread (or queues it, see the module doc):
    /// writes run in the order of these calls, whichever of their futures
    /// is awaited first. The future resolves after `f`'s writes are synced.
    /// If `f` fails, its writes are discarded and the others of the group
    /// still commit. `f` must not write through the committer itself.
    pub fn write<R, F>(&self, f: F) -> WriteFuture<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Txn) -> StoreResult<R> + Send + 'static,
    {
        self.enqueue(f, false, true)
    }

    /// Like [`Committer::write`], but the future resolves once `f`'s writes
    /// are applied (readable, and in the WAL in the OS's cache, so they
    /// survive the process being killed); they reach the disk with the next
    /// synced group. `f` waits up to [`UNSYNCED_DELAY`] in the open group
    /// for a synced write to share it with; a group made only of these
    /// skips the fsync. For writes
    /// whose loss in a machine crash is harmless because they are redone
    /// (removing outbox entries the region already has: they are sent
    /// again and dropped as duplicates).
    pub fn write_unsynced<R, F>(&self, f: F) -> WriteFuture<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Txn) -> StoreResult<R> + Send + 'static,
    {
        self.enqueue(f, false, false)
    }

    /// Like [`Committer::write`], but `f` runs on the committer thread in a
    /// group of its own: every write called before it is committed first,
    /// so what `f` reads straight from the database (iterators,
    /// [`Txn::db`]) is the current state, not only the state before the
    /// group. For jobs that scan.
    pub fn write_alone<R, F>(&self, f: F) -> WriteFuture<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Txn) -> StoreResult<R> + Send + 'static,
    {
        self.enqueue(f, true, true)
    }

    /// `(last appended, last acknowledged)` outbox sequences, as of the
    /// last committed write. Acked first: a concurrent ack can then only
    /// make `last` look further ahead, never `acked` beyond `last`.
    pub fn outbox_positions(&self) -> (u64, u64) {
        let p = &self.shared.outbox;
        let acked = p.acked.load(Ordering::Acquire);
        (p.last.load(Ordering::Acquire), acked)
    }

    /// How long unsynced jobs wait for a synced one from now on (tests
    /// only).
    #[cfg(test)]
    pub fn set_unsynced_delay(&self, delay: Duration) {
        let mut st = self.shared.lock();
        st.unsynced_delay = delay;
        // A brief wait may have started with the old delay.
        st.waiting = Waiting::No;
        self.shared.work.notify_one();
    }

    /// Runs `fault` before each group's write from now on (tests only).
    #[cfg(test)]
    pub fn inject_fault(&self, fault: impl FnMut() -> StoreResult<()> + Send + 'static) {
        *self.shared.fault.lock().unwrap() = Some(Box::new(fault));
    }

    fn enqueue<R, F>(&self, f: F, alone: bool, synced: bool) -> WriteFuture<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Txn) -> StoreResult<R> + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let mut job: Box<dyn Job> = Box::new(Write {
            f: Some(f),
            result: None,
            done,
        });
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        if st.shut_down {
            return crate::ready(Err(StoreError::Unavailable("store is shut down".into())));
        }
        let wake = if alone || st.running_queued || !st.queued.is_empty() {
            st.queued.push_back(Queued { job, alone, synced });
            st.waiting != Waiting::No
        } else {
            let mut tx = Txn {
                db: &self.shared.db,
                overlay: &mut st.open.overlay,
                below: st.in_flight.as_deref(),
                staged: &mut st.scratch,
            };
            job.run(&mut tx);
            if synced {
                st.open.jobs.push(job);
                st.open.synced = true;
            } else {
                st.open.unsynced_jobs.push(job);
                st.open.unsynced_since.get_or_insert_with(Instant::now);
            }
            // A committer waiting for ever must learn of an unsynced job
            // too, to wait for it with a timeout.
            st.waiting == Waiting::Forever || (st.waiting == Waiting::Briefly && synced)
        };
        if wake {
            st.waiting = Waiting::No;
            self.shared.work.notify_one();
        }
        drop(guard);
        Box::pin(async move {
            result
                .await
                .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
        })
    }
}

/// Per column family (indexed by `Cf as usize`), the last value a group
/// wrote to each key, `None` for a delete.
///
/// foldhash, not SipHash: several lookups and inserts per write on the
/// hot path; foldhash is seeded per process.
type Overlay = [HashMap<Vec<u8>, Option<Vec<u8>>, foldhash::fast::RandomState>; Cf::ALL.len()];

/// Whether a group puts a key in [`Cf::Outbox`] (acknowledgements only
/// delete there).
fn adds_outbox_entries(overlay: &Overlay) -> bool {
    overlay[Cf::Outbox as usize].values().any(Option::is_some)
}

/// The committer thread: takes the open group (or runs the queued jobs),
/// writes it as one batch with `sync = true` and only then completes each
/// caller; meanwhile callers stage the next group on top of it.
///
/// Earlier designs, measured (BENCHMARKS.md, sessions 12-16): the
/// committer ran every job itself, so a group's staging (~3 µs per event)
/// and its fsync took turns; a second thread that wrote a group while the
/// committer staged the next cost two thread hand-offs per group, which
/// ate the overlap. Staging on the callers' threads overlaps the two
/// without a hand-off: the committer takes the next group as soon as it is
/// done with one.
fn run(shared: &Shared, outbox_signal: &Notify) {
    let db = &*shared.db;
    let mut synced = WriteOptions::default();
    synced.set_sync(true);
    let unsynced = WriteOptions::default();
    // The last written group's maps, so the next starts with their
    // capacity; and the scratch writes of the queued jobs run here.
    let mut spare = Group::default();
    let mut scratch = Vec::new();
    // After a group that added outbox entries: their acknowledgement is
    // on its way, so wait briefly for it before waiting for ever.
    let mut ack_expected = false;
    let mut st = shared.lock();
    loop {
        // Queued jobs were called after the open group's: it goes first.
        let open_due = st.open.due(st.unsynced_delay)
            || (!st.open.is_empty() && (st.shut_down || !st.queued.is_empty()));
        let group = if open_due {
            std::mem::replace(&mut st.open, std::mem::take(&mut spare))
        } else if let Some(first) = st.queued.pop_front() {
            let mut jobs = vec![first];
            while !jobs[0].alone && jobs.len() < MAX_QUEUED_GROUP {
                match st.queued.front() {
                    Some(q) if !q.alone => jobs.extend(st.queued.pop_front()),
                    _ => break,
                }
            }
            st.running_queued = true;
            drop(st);
            // Nothing is in flight and nothing staged: the database is
            // current.
            let mut group = std::mem::take(&mut spare);
            let mut tx = Txn {
                db,
                overlay: &mut group.overlay,
                below: None,
                staged: &mut scratch,
            };
            for mut q in jobs {
                q.job.run(&mut tx);
                group.jobs.push(q.job);
                group.synced |= q.synced;
            }
            st = shared.lock();
            st.running_queued = false;
            group
        } else if st.shut_down {
            // Nothing staged (shutting down makes the open group due).
            return;
        } else {
            let timeout = match st.open.unsynced_since {
                Some(since) => Some(st.unsynced_delay.saturating_sub(since.elapsed())),
                None if ack_expected => Some(st.unsynced_delay),
                None => None,
            };
            ack_expected = false;
            st = match timeout {
                Some(timeout) => {
                    st.waiting = Waiting::Briefly;
                    shared
                        .work
                        .wait_timeout(st, timeout)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => {
                    st.waiting = Waiting::Forever;
                    shared.work.wait(st).unwrap_or_else(PoisonError::into_inner)
                }
            };
            st.waiting = Waiting::No;
            continue;
        };
        let Group {
            overlay,
            mut jobs,
            mut unsynced_jobs,
            synced: sync,
            unsynced_since: _,
        } = group;
        let overlay = Arc::new(overlay);
        st.in_flight = Some(overlay.clone());
        drop(st);
        let result = injected_fault(shared)
            .and_then(|()| commit(db, &overlay, if sync { &synced } else { &unsynced }));
        if let Err(e) = &result {
            tracing::error!(error = %e, jobs = jobs.len() + unsynced_jobs.len(), "store write failed; callers get `unavailable`");
        }
        if result.is_ok() {
            shared.outbox.committed(&overlay);
        }
        st = shared.lock();
        st.in_flight = None;
        // Jobs staged meanwhile read this group's writes: they fail with it.
        let staged_on_failed = match result {
            Ok(()) => None,
            Err(_) => Some(std::mem::take(&mut st.open)),
        };
        drop(st);
        for job in jobs.drain(..) {
            job.complete(result.clone());
        }
        for job in staged_on_failed
            .into_iter()
            .flat_map(|g| g.jobs.into_iter().chain(g.unsynced_jobs))
        {
            job.complete(result.clone());
        }
        // Here, not in each writer's future: one wake-up per group, and also
        // for writes whose callers stopped waiting. After the callers, so
        // their threads wake first (the forwarder's work can wait).
        ack_expected = result.is_ok() && adds_outbox_entries(&overlay);
        if ack_expected {
            outbox_signal.notify_one();
        }
        for job in unsynced_jobs.drain(..) {
            job.complete(result.clone());
        }
        // Callers only read `in_flight` under the lock, and it is unset.
        let mut overlay = Arc::try_unwrap(overlay).unwrap_or_default();
        overlay.iter_mut().for_each(HashMap::clear);
        spare = Group {
            overlay,
            jobs,
            unsynced_jobs,
            ..Group::default()
        };
        st = shared.lock();
    }
}
#[cfg(test)]
fn injected_fault(shared: &Shared) -> StoreResult<()> {
    match shared.fault.lock().unwrap().as_mut() {
        Some(fault) => fault(),
        None => Ok(()),
    }
}

#[cfg(not(test))]
fn injected_fault(_: &Shared) -> StoreResult<()> {
    Ok(())
}

/// Writes `overlay` as one batch.
fn commit(db: &DB, overlay: &Overlay, options: &WriteOptions) -> StoreResult<()> {
    let bytes: usize = overlay
        .iter()
        .flat_map(|m| m.iter())
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 24)
        .sum();
    if bytes == 0 {
        return Ok(());
    }
    let mut batch = WriteBatch::with_capacity_bytes(bytes);
    for (cf, writes) in Cf::ALL.into_iter().zip(overlay) {
        if writes.is_empty() {
            continue;
        }
        let h = handle(db, cf)?;
        // In key order: RocksDB's memtable skiplist remembers where its
        // last insert went, so ascending keys (event and outbox sequences)
        // insert without a search from the top (~19 % more groups per
        // second with 64 writers, BENCHMARKS.md).
        let mut writes: Vec<_> = writes.iter().collect();
        writes.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (k, v) in writes {
            match v {
                Some(v) => batch.put_cf(h, k, v),
                None => batch.delete_cf(h, k),
            }
        }
    }
    db.write_opt(batch, options).map_err(map_err)
}

/// The writes of one group, readable before they are committed.
pub(crate) struct Txn<'a> {
    db: &'a DB,
    /// The group's writes so far. Written as one batch, so a key the group
    /// writes many times (a sequence counter, a CRDT saved after each of
    /// many increments) costs one write.
    overlay: &'a mut Overlay,
    /// The group being written meanwhile, if any: not in `db` yet.
    below: Option<&'a Overlay>,
    /// Writes of the job now running; merged on success, dropped on error.
    staged: &'a mut Vec<Op>,
}

/// A staged write. Keys are often constants (the node's counters), which
/// then cost no allocation.
enum Op {
    Put(Cf, Cow<'static, [u8]>, Vec<u8>),
    Delete(Cf, Cow<'static, [u8]>),
}

impl<'a> Txn<'a> {
    fn stage<R>(&mut self, f: impl FnOnce(&mut Txn) -> StoreResult<R>) -> StoreResult<R> {
        self.staged.clear();
        // Jobs are our own code, but they handle guest data: a bug must fail
        // one write, not kill the committer.
        let r = match std::panic::catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(r) => r,
            Err(_) => Err(StoreError::Internal("store job panicked".into())),
        };
        if r.is_ok() {
            for op in self.staged.drain(..) {
                let (cf, k, v) = match op {
                    Op::Put(cf, k, v) => (cf, k, Some(v)),
                    Op::Delete(cf, k) => (cf, k, None),
                };
                // A key the group wrote before (a counter) keeps its entry.
                let writes = &mut self.overlay[cf as usize];
                match writes.get_mut(k.as_ref()) {
                    Some(slot) => *slot = v,
                    None => {
                        writes.insert(k.into_owned(), v);
                    }
                }
            }
        }
        r
    }

    /// Current value: this job's writes, then the group's, then the group
    /// being written, then the database.
    pub fn get(&self, cf: Cf, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        self.with_value(cf, key, |v| v.map(<[u8]>::to_vec))
    }

    /// Calls `f` with the current value (as [`Txn::get`]) without copying
    /// it.
    fn with_value<T>(
        &self,
        cf: Cf,
        key: &[u8],
        f: impl FnOnce(Option<&[u8]>) -> T,
    ) -> StoreResult<T> {
        for op in self.staged.iter().rev() {
            match op {
                Op::Put(c, k, v) if *c == cf && k.as_ref() == key => return Ok(f(Some(v))),
                Op::Delete(c, k) if *c == cf && k.as_ref() == key => return Ok(f(None)),
                _ => {}
            }
        }
        if let Some(v) = self.overlay[cf as usize].get(key) {
            return Ok(f(v.as_deref()));
        }
        if let Some(v) = self.below.and_then(|b| b[cf as usize].get(key)) {
            return Ok(f(v.as_deref()));
        }
        let v = self
            .db
            .get_pinned_cf(handle(self.db, cf)?, key)
            .map_err(map_err)?;
        Ok(f(v.as_deref()))
    }

    /// The database as committed so far: without this group's writes nor
    /// those of the group being written meanwhile. Inside a
    /// [`Committer::write_alone`] job nothing else is in flight: it is the
    /// current state, apart from the job's own writes.
    pub fn db(&self) -> &'a DB {
        self.db
    }

    pub fn get_u64(&self, cf: Cf, key: &[u8]) -> StoreResult<u64> {
        self.with_value(cf, key, |v| v.map_or(Ok(0), crate::keys::decode_u64))?
    }

    /// Up to `max` keys starting with `prefix`, ascending, as committed so
    /// far (the writes of this group and of the one being written are not
    /// seen: check each key with [`Txn::get`] before acting on it).
    pub fn committed_keys(&self, cf: Cf, prefix: &[u8], max: usize) -> StoreResult<Vec<Vec<u8>>> {
        let mut it = self.db.raw_iterator_cf(handle(self.db, cf)?);
        it.seek(prefix);
        let mut out = Vec::new();
        while out.len() < max {
            match it.key() {
                Some(k) if k.starts_with(prefix) => out.push(k.to_vec()),
                _ => break,
            }
            it.next();
        }
        it.status().map_err(map_err)?;
        Ok(out)
    }

    pub fn put(&mut self, cf: Cf, key: impl Into<Cow<'static, [u8]>>, value: Vec<u8>) {
        self.staged.push(Op::Put(cf, key.into(), value));
    }

    pub fn delete(&mut self, cf: Cf, key: impl Into<Cow<'static, [u8]>>) {
        self.staged.push(Op::Delete(cf, key.into()));
    }
}
