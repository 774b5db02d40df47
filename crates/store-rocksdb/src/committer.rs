//! Group commit: one thread owns all writes.
//!
//! Callers queue jobs; the thread takes every job queued while the previous
//! group was written, runs them in order against a [`Txn`] (each job sees
//! the writes of the jobs before it), writes the group as one `WriteBatch`
//! with `sync = true` (each key once, with its last value; only a group of
//! [`Committer::write_unsynced`] jobs skips the fsync), and only then
//! completes each caller. N concurrent writers share one fsync. A group
//! that added outbox entries wakes the forwarder once it is durable, whether
//! or not its callers still wait.

use crate::{Cf, map_err};
use keel_store::{StoreError, StoreResult, WriteFuture};
use rocksdb::{ColumnFamily, DB, WriteBatch, WriteOptions};
use std::borrow::Cow;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio::sync::{Notify, mpsc, oneshot};

/// Most jobs in one group: bounds the latency of the first job in a group.
const MAX_GROUP: usize = 1024;

/// One queued write: runs on the committer thread against the group's
/// [`Txn`], then learns whether the group committed. One allocation per
/// write.
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

/// A queued job; an `alone` job runs in a group of its own (see
/// [`Committer::write_alone`]); a `synced` one needs its group fsynced
/// before it completes (all but [`Committer::write_unsynced`]).
struct Queued {
    job: Box<dyn Job>,
    alone: bool,
    synced: bool,
}

pub(crate) fn handle(db: &DB, cf: Cf) -> StoreResult<&ColumnFamily> {
    db.cf_handle(cf.name())
        .ok_or_else(|| StoreError::Internal(format!("column family {} missing", cf.name())))
}

pub(crate) struct Committer {
    /// `None` only while dropping. Unbounded: every writer awaits its write,
    /// so the queue never holds more than the writers in flight (requests,
    /// sync and coordination tasks), and queuing never waits — a write is
    /// queued when it is called, which is what orders writes (see
    /// [`Committer::write`]).
    queue: Option<mpsc::UnboundedSender<Queued>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Committer {
    /// Closes the queue and waits for the last group, so the database is
    /// closed (and its lock released) when the store is dropped.
    fn drop(&mut self) {
        self.queue.take();
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
        let (queue, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("keel-store-commit".into())
            .spawn(move || run(db, rx, outbox_signal))
            .map_err(|e| StoreError::Unavailable(format!("cannot start committer: {e}")))?;
        Ok(Committer {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues `f` for the committer thread *now* (not when the future is
    /// first polled): writes run in the order of these calls, whichever of
    /// their futures is awaited first. The future resolves after `f`'s
    /// writes are synced. If `f` fails, its writes are discarded and the
    /// others of the group still commit.
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
    /// synced group. A group made only of these skips the fsync. For writes
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

    /// Like [`Committer::write`], but `f` runs in a group of its own: every
    /// job queued before it is committed first, so what `f` reads straight
    /// from the database (iterators, [`Txn::db`]) is the current state, not
    /// only the state before the group. For jobs that scan.
    pub fn write_alone<R, F>(&self, f: F) -> WriteFuture<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Txn) -> StoreResult<R> + Send + 'static,
    {
        self.enqueue(f, true, true)
    }

    fn enqueue<R, F>(&self, f: F, alone: bool, synced: bool) -> WriteFuture<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Txn) -> StoreResult<R> + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let job = Box::new(Write {
            f: Some(f),
            result: None,
            done,
        });
        let queued = self
            .queue
            .as_ref()
            .is_some_and(|q| q.send(Queued { job, alone, synced }).is_ok());
        Box::pin(async move {
            if !queued {
                return Err(StoreError::Unavailable("store is shut down".into()));
            }
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
/// committer's hot path; foldhash is seeded per process.
type Overlay = [HashMap<Vec<u8>, Option<Vec<u8>>, foldhash::fast::RandomState>; Cf::ALL.len()];

/// Takes every job queued while the previous group was written (up to
/// [`MAX_GROUP`]), runs them in order against one [`Txn`], writes the group
/// as one batch with `sync = true` and only then completes each caller.
///
/// One thread on purpose: a second one that staged the next group while
/// this one was written (tried in session 12) raised in-process event
/// appends with 64 writers from 95-102k to 135-145k events/s (heavy
/// staging: encoding, three counters per event) but cut guest counter
/// increments by about a quarter (111-160k to 88-119k ops/s): smaller
/// groups, more fsyncs and two more thread hand-offs on a guest's
/// latency-bound write path. Tried again in session 14, after events were
/// encoded on the caller's thread: handing a group to a sync thread and
/// staging the jobs that arrive meanwhile into the next one, with 64
/// in-process writers, gave 7.8-8.0x one fsync per event when every group
/// was handed off, 8.6-8.9x when only groups staged for 50 µs or more were,
/// and 9.8-10.0x when none was (same binary, interleaved).
fn run(db: Arc<DB>, mut rx: mpsc::UnboundedReceiver<Queued>, outbox_signal: Arc<Notify>) {
    let mut synced = WriteOptions::default();
    synced.set_sync(true);
    let unsynced = WriteOptions::default();
    let mut jobs: Vec<Box<dyn Job>> = Vec::new();
    // A job that must run alone, taken off the queue while a group formed:
    // it starts the next group.
    let mut held: Option<Queued> = None;
    // One for the thread's life: a group starts with the maps and buffers
    // the last one grew, not with empty ones.
    let mut tx = Txn::new(&db);
    while let Some(first) = held.take().or_else(|| rx.blocking_recv()) {
        let alone = first.alone;
        let mut sync = first.synced;
        jobs.push(first.job);
        while !alone && jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(q) if q.alone => {
                    held = Some(q);
                    break;
                }
                Ok(q) => {
                    sync |= q.synced;
                    jobs.push(q.job);
                }
                Err(_) => break,
            }
        }
        tx.clear();
        for job in jobs.iter_mut() {
            job.run(&mut tx);
        }
        let result = commit(&db, &tx.overlay, if sync { &synced } else { &unsynced });
        match &result {
            // Here, not in each writer's future: one wake-up per group, and
            // also for writes whose callers stopped waiting.
            Ok(()) if tx.adds_outbox_entries() => outbox_signal.notify_one(),
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, jobs = jobs.len(), "store write failed; callers get `unavailable`")
            }
        }
        for job in jobs.drain(..) {
            job.complete(result.clone());
        }
    }
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
    overlay: Overlay,
    /// Writes of the job now running; merged on success, dropped on error.
    staged: Vec<Op>,
}

/// A staged write. Keys are often constants (the node's counters), which
/// then cost no allocation.
enum Op {
    Put(Cf, Cow<'static, [u8]>, Vec<u8>),
    Delete(Cf, Cow<'static, [u8]>),
}

impl<'a> Txn<'a> {
    fn new(db: &'a DB) -> Self {
        Txn {
            db,
            overlay: Default::default(),
            staged: Vec::new(),
        }
    }

    /// Empties the group, keeping its capacity.
    fn clear(&mut self) {
        self.overlay.iter_mut().for_each(HashMap::clear);
        self.staged.clear();
    }

    /// Whether the group puts a key in [`Cf::Outbox`] (acknowledgements only
    /// delete there).
    fn adds_outbox_entries(&self) -> bool {
        self.overlay[Cf::Outbox as usize]
            .values()
            .any(Option::is_some)
    }

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

    /// Current value: this job's writes, then the group's, then the database.
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
        let v = self
            .db
            .get_pinned_cf(handle(self.db, cf)?, key)
            .map_err(map_err)?;
        Ok(f(v.as_deref()))
    }

    /// The database as committed before this group. Inside a
    /// [`Committer::write_alone`] job that is the current state, apart from
    /// the job's own writes.
    pub fn db(&self) -> &'a DB {
        self.db
    }

    pub fn get_u64(&self, cf: Cf, key: &[u8]) -> StoreResult<u64> {
        self.with_value(cf, key, |v| v.map_or(Ok(0), crate::keys::decode_u64))?
    }

    /// Up to `max` keys starting with `prefix`, ascending, as committed
    /// before this group (this group's own writes are not seen: check each
    /// key with [`Txn::get`] before acting on it).
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
