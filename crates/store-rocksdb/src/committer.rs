//! Group commit: one thread owns all writes.
//!
//! Callers queue jobs; the thread takes every job queued while the previous
//! sync ran, runs them in order against a [`Txn`] (each job sees the writes
//! of the jobs before it), writes the union as one `WriteBatch` with
//! `sync = true`, and only then completes each caller. N concurrent writers
//! share one fsync.

use crate::{Cf, map_err};
use keel_store::{StoreError, StoreResult, WriteFuture};
use rocksdb::{ColumnFamily, DB, WriteBatch, WriteOptions};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most jobs in one group: bounds the latency of the first job in a group.
const MAX_GROUP: usize = 1024;
/// Queue depth before writers wait (backpressure).
const QUEUE: usize = 8192;

type Completion = Box<dyn FnOnce(StoreResult<()>) + Send>;
type Job = Box<dyn FnOnce(&mut Txn) -> Completion + Send>;

/// A queued job; an `alone` job runs in a group of its own (see
/// [`Committer::write_alone`]).
struct Queued {
    job: Job,
    alone: bool,
}

pub(crate) fn handle(db: &DB, cf: Cf) -> StoreResult<&ColumnFamily> {
    db.cf_handle(cf.name())
        .ok_or_else(|| StoreError::Internal(format!("column family {} missing", cf.name())))
}

pub(crate) struct Committer {
    /// `None` only while dropping.
    queue: Option<mpsc::Sender<Queued>>,
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
    pub fn start(db: Arc<DB>) -> StoreResult<Committer> {
        for cf in Cf::ALL {
            handle(&db, cf)?;
        }
        let (queue, rx) = mpsc::channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("keel-store-commit".into())
            .spawn(move || run(db, rx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start committer: {e}")))?;
        Ok(Committer {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Runs `f` on the committer thread; resolves after its writes are
    /// synced. If `f` fails, its writes are discarded and the others of the
    /// group still commit.
    pub fn write<R, F>(&self, f: F) -> WriteFuture<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Txn) -> StoreResult<R> + Send + 'static,
    {
        self.enqueue(f, false)
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
        self.enqueue(f, true)
    }

    fn enqueue<R, F>(&self, f: F, alone: bool) -> WriteFuture<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Txn) -> StoreResult<R> + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move |tx: &mut Txn| {
            let r = tx.stage(f);
            Box::new(move |commit: StoreResult<()>| {
                let _ = done.send(commit.and(r));
            })
        });
        let queue = self.queue.clone();
        Box::pin(async move {
            queue
                .ok_or_else(|| StoreError::Unavailable("store is shut down".into()))?
                .send(Queued { job, alone })
                .await
                .map_err(|_| StoreError::Unavailable("store is shut down".into()))?;
            result
                .await
                .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
        })
    }
}

fn run(db: Arc<DB>, mut rx: mpsc::Receiver<Queued>) {
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    let mut jobs = Vec::with_capacity(MAX_GROUP);
    // A job that must run alone, taken off the queue while a group formed:
    // it starts the next group.
    let mut held: Option<Queued> = None;
    while let Some(first) = held.take().or_else(|| rx.blocking_recv()) {
        let alone = first.alone;
        jobs.push(first.job);
        while !alone && jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(q) if q.alone => {
                    held = Some(q);
                    break;
                }
                Ok(q) => jobs.push(q.job),
                Err(_) => break,
            }
        }
        let mut tx = Txn::new(&db);
        let completions: Vec<Completion> = jobs.drain(..).map(|job| job(&mut tx)).collect();
        let result = tx.commit(&sync);
        if let Err(e) = &result {
            tracing::error!(error = %e, jobs = completions.len(), "store write failed; callers get `unavailable`");
        }
        for c in completions {
            c(result.clone());
        }
    }
}

/// The writes of one group, readable before they are committed.
pub(crate) struct Txn<'a> {
    db: &'a DB,
    batch: WriteBatch,
    /// Committed-to-batch writes of earlier jobs in this group.
    overlay: HashMap<(Cf, Vec<u8>), Option<Vec<u8>>>,
    /// Writes of the job now running; merged on success, dropped on error.
    staged: Vec<Op>,
    broken: Option<StoreError>,
}

enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
}

impl<'a> Txn<'a> {
    fn new(db: &'a DB) -> Self {
        Txn {
            db,
            batch: WriteBatch::default(),
            overlay: HashMap::new(),
            staged: Vec::new(),
            broken: None,
        }
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
            for op in std::mem::take(&mut self.staged) {
                let res = match op {
                    Op::Put(cf, k, v) => handle(self.db, cf).map(|h| {
                        self.batch.put_cf(h, &k, &v);
                        self.overlay.insert((cf, k), Some(v));
                    }),
                    Op::Delete(cf, k) => handle(self.db, cf).map(|h| {
                        self.batch.delete_cf(h, &k);
                        self.overlay.insert((cf, k), None);
                    }),
                };
                if let Err(e) = res {
                    self.broken = Some(e);
                }
            }
        }
        r
    }

    fn commit(self, sync: &WriteOptions) -> StoreResult<()> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        if self.batch.is_empty() {
            return Ok(());
        }
        self.db.write_opt(self.batch, sync).map_err(map_err)
    }

    /// Current value: this job's writes, then the group's, then the database.
    pub fn get(&self, cf: Cf, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        for op in self.staged.iter().rev() {
            match op {
                Op::Put(c, k, v) if *c == cf && k == key => return Ok(Some(v.clone())),
                Op::Delete(c, k) if *c == cf && k == key => return Ok(None),
                _ => {}
            }
        }
        if let Some(v) = self.overlay.get(&(cf, key.to_vec())) {
            return Ok(v.clone());
        }
        self.db.get_cf(handle(self.db, cf)?, key).map_err(map_err)
    }

    /// The database as committed before this group. Inside a
    /// [`Committer::write_alone`] job that is the current state, apart from
    /// the job's own writes.
    pub fn db(&self) -> &'a DB {
        self.db
    }

    pub fn get_u64(&self, cf: Cf, key: &[u8]) -> StoreResult<u64> {
        match self.get(cf, key)? {
            Some(b) => crate::keys::decode_u64(&b),
            None => Ok(0),
        }
    }

    /// Up to `max` keys starting with `prefix`, ascending, as committed
    /// before this group (this group's own writes are not seen).
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

    pub fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        self.staged.push(Op::Put(cf, key, value));
    }

    pub fn delete(&mut self, cf: Cf, key: Vec<u8>) {
        self.staged.push(Op::Delete(cf, key));
    }
}
