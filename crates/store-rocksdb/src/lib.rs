//! RocksDB backend of the edge tier: [`KvStore`], [`EventLog`] and
//! [`EdgeStore`] in one database, plus the outbox that later forwards
//! writes to the region, and [`keel_store::UserDataStore`] (erasing and
//! exporting one user's data, `erase.rs`).
//!
//! Durability: every write is a job staged into the committer's open group
//! (on the caller's thread, under the committer's lock); one committer
//! thread writes each group as one `WriteBatch` and syncs the WAL once
//! (group commit), while the next group stages. A caller's future resolves
//! only after that sync. Read-modify-write operations (CAS, event sequence
//! numbers, state versions) are jobs, so they are atomic without further
//! locks; they read through the uncommitted writes before them.

mod committer;
mod erase;
mod keys;

use committer::{Committer, Txn};
use keel_core::{Hlc, HlcClock};

use keel_store::{
    Activity, ActivityRecord, AppendedBatch, CrdtStore, EdgeStore, EventData, EventLog,
    GLOBAL_EVENT_RETENTION, GlobalEvent, HostRecords, HostWrite, KvStore, Namespace, Outbox,
    OutboxEntry, StateValue, StoreError, StoreLimits, StoreResult, StoredCrdt, StoredEvent,
    WriteFuture,
};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBRawIterator, Options,
    WriteBufferManager,
};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Column families. Order matters: `Cf as usize` indexes the handle list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Cf {
    Kv,
    Events,
    State,
    Users,
    Outbox,
    Meta,
    Crdt,
}

impl Cf {
    const ALL: [Cf; 7] = [
        Cf::Kv,
        Cf::Events,
        Cf::State,
        Cf::Users,
        Cf::Outbox,
        Cf::Meta,
        Cf::Crdt,
    ];

    fn name(self) -> &'static str {
        match self {
            Cf::Kv => "kv",
            Cf::Events => "events",
            Cf::State => "state",
            Cf::Users => "users",
            Cf::Outbox => "outbox",
            Cf::Meta => "meta",
            Cf::Crdt => "crdt",
        }
    }
}

/// Arena block size of a memtable (see [`RocksStore::open`]).
const MEMTABLE_ARENA_BLOCK: usize = 128 << 10;
/// Memtable memory (all column families) below which no flush is forced:
/// every column family written holds at least one arena block.
pub const MIN_WRITE_BUFFERS: usize = 2 << 20;

/// Who this node is: stamped on events and ids.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub edge: String,
    pub region: String,
}

#[derive(Debug, Clone)]
pub struct RocksOptions {
    pub limits: StoreLimits,
    pub node: NodeIdentity,
    /// Queue forwarded writes in the outbox. Off on the embedded single
    /// node, which is its own region (its local log is the regional log).
    pub forwarding: bool,
    /// Block cache size (shared by all column families). The memtables'
    /// memory is charged to it, so this bounds RocksDB's memory as a whole;
    /// the memtables of all column families together are flushed at half of
    /// it (at least [`MIN_WRITE_BUFFERS`]).
    pub block_cache_bytes: usize,
}

/// The id of a node-sequenced write: event ids, and the outbox entry's
/// deduplication id for JetStream (`Nats-Msg-Id`): `<edge>:<node-seq>`.
pub fn node_write_id(edge: &str, node_seq: u64) -> String {
    format!("{edge}:{node_seq}")
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct RocksStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    db: Arc<DB>,
    committer: Committer,
    limits: StoreLimits,
    node: NodeIdentity,
    clock: Mutex<HlcClock>,
    forwarding: bool,
    incarnation: u64,
    outbox_signal: Arc<tokio::sync::Notify>,
    /// One file purge ([`keel_store::UserDataStore::erase_user`]) at a
    /// time: a second one would only wait for the first's compactions.
    purge: Mutex<()>,
}

/// Version byte in front of every encoded value, so the format can evolve.
const FORMAT_V1: u8 = 1;

pub(crate) fn encode<T: Serialize>(v: &T) -> StoreResult<Vec<u8>> {
    thread_local! {
        /// Serialization scratch: postcard grows its output a byte at a
        /// time, so encoding straight into a fresh `Vec` reallocates it
        /// several times per record; here it grows once per thread and each
        /// record is copied out in one allocation of its exact size.
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        let mut buf = std::mem::take(scratch);
        buf.clear();
        buf.push(FORMAT_V1);
        let buf = postcard::to_extend(v, buf)
            .map_err(|e| StoreError::Internal(format!("encode: {e}")))?;
        let out = buf.clone();
        // A rare huge record must not pin its size for the thread's life.
        if buf.capacity() <= 64 << 10 {
            *scratch = buf;
        }
        Ok(out)
    })
}

/// The encoding of a [`StoredEvent`] (as [`encode`]), given the encoding of
/// its `data`, its last field: the data is encoded before the job and only
/// copied in it, under the committer's lock. Postcard writes fields in
/// order, with nothing after the last one, so this is the head (the fields
/// before) followed by the data's bytes.
fn encode_event_record(
    id: &str,
    sequence: u64,
    node: &NodeIdentity,
    at: &Hlc,
    encoded_data: &[u8],
) -> StoreResult<Vec<u8>> {
    /// `StoredEvent` up to `data`, field for field.
    #[derive(Serialize)]
    struct Head<'a> {
        id: &'a str,
        sequence: u64,
        origin: &'a str,
        region: &'a str,
        at: &'a Hlc,
    }
    let head = Head {
        id,
        sequence,
        origin: &node.edge,
        region: &node.region,
        at,
    };
    // Four string lengths and three integers, each a varint of at most 10
    // bytes.
    let head_bytes = 70 + id.len() + node.edge.len() + node.region.len() + at.node.len();
    let data = encoded_data
        .strip_prefix(&[FORMAT_V1])
        .ok_or_else(|| StoreError::Internal("encoding without its version".into()))?;
    let mut out = Vec::with_capacity(1 + head_bytes + data.len());
    out.push(FORMAT_V1);
    let mut out = postcard::to_extend(&head, out)
        .map_err(|e| StoreError::Internal(format!("encode: {e}")))?;
    out.extend_from_slice(data);
    Ok(out)
}

/// First byte of an outbox value that refers to an event in the log
/// (followed by the event's key) instead of holding an encoded
/// [`OutboxEntry`] (which starts with [`FORMAT_V1`]). An event is written
/// once: its outbox entry is this reference, resolved when the forwarder
/// reads it, which halves the bytes a forwarded event costs the WAL, the
/// memtables and compaction.
const OUTBOX_EVENT_REF: u8 = 0xE1;

/// The outbox value of the event stored under `event_key`.
fn encode_outbox_event_ref(event_key: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + event_key.len());
    v.push(OUTBOX_EVENT_REF);
    v.extend_from_slice(event_key);
    v
}

/// The event key an outbox value refers to, if it is a reference.
pub(crate) fn outbox_event_ref(value: &[u8]) -> Option<&[u8]> {
    match value.split_first() {
        Some((&OUTBOX_EVENT_REF, key)) => Some(key),
        _ => None,
    }
}

/// An outbox value as the entry it stands for; a reference is read from
/// the log through `events`, an iterator over [`Cf::Events`] that a peek
/// moves forward: consecutive entries usually refer to consecutive events,
/// which are then read in order instead of looked up one by one.
fn decode_outbox_entry(events: &mut DBRawIterator<'_>, value: &[u8]) -> StoreResult<OutboxEntry> {
    let Some(key) = outbox_event_ref(value) else {
        return decode(value);
    };
    if events.valid() {
        events.next();
    }
    if events.key() != Some(key) {
        events.seek(key);
    }
    let event = match (events.key(), events.value()) {
        (Some(k), Some(event)) if k == key => Some(event),
        _ => {
            events.status().map_err(map_err)?;
            None
        }
    };
    referred_event(key, event)
}

/// The entry of an outbox reference to the event under `key`, read as
/// `event` (`None`: missing).
fn referred_event(key: &[u8], event: Option<&[u8]>) -> StoreResult<OutboxEntry> {
    let (ns, _) = keys::split_ns_key(key)?;
    match event {
        Some(event) => Ok(OutboxEntry::Event {
            component: ns.to_string(),
            event: decode(event)?,
        }),
        None => Err(StoreError::Internal(format!(
            "outbox entry of {ns} refers to a missing event"
        ))),
    }
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> StoreResult<T> {
    match bytes.split_first() {
        Some((&FORMAT_V1, rest)) => postcard::from_bytes(rest)
            .map_err(|e| StoreError::Internal(format!("corrupt record: {e}"))),
        Some((v, _)) => Err(StoreError::Internal(format!(
            "record format version {v} is newer than this build understands"
        ))),
        None => Err(StoreError::Internal("empty record".into())),
    }
}

pub(crate) fn map_err(e: rocksdb::Error) -> StoreError {
    use rocksdb::ErrorKind as K;
    match e.kind() {
        K::IOError
        | K::ShutdownInProgress
        | K::TimedOut
        | K::Busy
        | K::TryAgain
        | K::Aborted
        | K::Incomplete => StoreError::Unavailable(format!("storage: {e}")),
        _ => StoreError::Internal(format!("storage: {e}")),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl RocksStore {
    pub fn open(path: &Path, options: RocksOptions) -> StoreResult<RocksStore> {
        std::fs::create_dir_all(path).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", path.display()))
        })?;
        // One memory budget: the block cache, with the memtables' arena
        // memory charged to it (see `RocksOptions::block_cache_bytes`).
        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let write_buffers = WriteBufferManager::new_write_buffer_manager_with_cache(
            (options.block_cache_bytes / 2).max(MIN_WRITE_BUFFERS),
            false,
            cache.clone(),
        );
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        let mut cf_opts = Options::default();
        cf_opts.set_block_based_table_factory(&table);
        cf_opts.set_write_buffer_size(8 << 20);
        cf_opts.set_max_write_buffer_number(2);
        // A memtable takes arena memory in blocks of this size (default:
        // an eighth of the write buffer, 1 MiB), starting with its first
        // write: 1 MiB per column family written, even for a few bytes.
        cf_opts.set_arena_block_size(MEMTABLE_ARENA_BLOCK);
        let mut db_opts = cf_opts.clone();
        db_opts.set_write_buffer_manager(&write_buffers);
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        // Multi-CF batches must never be half-flushed.
        db_opts.set_atomic_flush(true);
        db_opts.set_max_total_wal_size(64 << 20);
        db_opts.set_max_open_files(512);
        db_opts.set_keep_log_file_num(4);
        // No WAL recycling (`recycle_log_file_num`): it made group syncs
        // ~25 % cheaper (fdatasync need not journal the file's growth), but
        // a recycled WAL keeps old records past its new end, so an erased
        // user's bytes would survive erasure.
        let cfs = Cf::ALL
            .iter()
            .map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf_opts.clone()));
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| {
            StoreError::Unavailable(format!("cannot open RocksDB at {}: {e}", path.display()))
        })?;
        let db = Arc::new(db);
        let incarnation = load_or_create_incarnation(&db)?;
        let outbox_signal = Arc::new(tokio::sync::Notify::new());
        let committer = Committer::start(db.clone(), outbox_signal.clone())?;
        Ok(RocksStore {
            inner: Arc::new(Inner {
                db,
                committer,
                limits: options.limits,
                clock: Mutex::new(HlcClock::new(options.node.edge.clone(), 60_000)),
                node: options.node,
                forwarding: options.forwarding,
                incarnation,
                outbox_signal,
                purge: Mutex::new(()),
            }),
        })
    }
}

/// Reads this data dir's incarnation id, creating (and syncing) it on the
/// first open.
fn load_or_create_incarnation(db: &DB) -> StoreResult<u64> {
    let cf = committer::handle(db, Cf::Meta)?;
    let key = keys::meta_incarnation();
    if let Some(v) = db.get_cf(cf, &key).map_err(map_err)? {
        return keys::decode_u64(&v);
    }
    // RandomState is seeded from the OS's randomness.
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let id = h.finish();
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    db.put_cf_opt(cf, &key, id.to_be_bytes(), &opts)
        .map_err(map_err)?;
    Ok(id)
}

fn stamp(inner: &Inner) -> StoreResult<Hlc> {
    let mut clock = inner
        .clock
        .lock()
        .map_err(|_| StoreError::Internal("clock lock poisoned".into()))?;
    clock
        .now(now_ms())
        .map_err(|e| StoreError::Internal(e.to_string()))
}

fn ready<T: Send + 'static>(r: StoreResult<T>) -> WriteFuture<T> {
    Box::pin(std::future::ready(r))
}

/// Allocates the next node-wide sequence (event ids).
fn next_node_seq(tx: &mut Txn) -> StoreResult<u64> {
    let key = keys::meta_node_seq();
    let n = tx.get_u64(Cf::Meta, key)? + 1;
    tx.put(Cf::Meta, key, n.to_be_bytes().to_vec());
    Ok(n)
}

/// Appends `entry` to the outbox under the next outbox sequence, in the
/// caller's batch; returns that sequence.
fn enqueue_outbox(tx: &mut Txn, encoded_entry: Vec<u8>) -> StoreResult<u64> {
    let key = keys::meta_outbox_seq();
    let seq = tx.get_u64(Cf::Meta, key)? + 1;
    tx.put(Cf::Meta, key, seq.to_be_bytes().to_vec());
    tx.put(Cf::Outbox, keys::u64_key(seq), encoded_entry);
    Ok(seq)
}

/// The highest `p >= from` (and `<= last`) such that no outbox entry
/// `from < s <= p` exists: moves an acknowledged position over the gap that
/// erased entries left after it. Costs one lookup when there is no gap.
fn skip_outbox_gap(tx: &Txn, from: u64, last: u64) -> StoreResult<u64> {
    let mut p = from;
    while p < last && tx.get(Cf::Outbox, &keys::u64_key(p + 1))?.is_none() {
        p += 1;
    }
    Ok(p)
}

/// A peek of at most this many entries reads them by key: a forwarder
/// that keeps up asks for the one or few entries just appended, and two
/// iterators (created over every memtable and table file, and seeked) cost
/// several times what a few point lookups in the memtable do.
const POINT_READ_ENTRIES: u64 = 8;

impl RocksStore {
    /// The outbox entries with sequences in `seqs` that exist (erasure
    /// leaves gaps), each read by key. An event and the entry that refers
    /// to it commit together, so an entry read here finds its event.
    fn outbox_read(
        &self,
        seqs: std::ops::RangeInclusive<u64>,
    ) -> StoreResult<Vec<(u64, OutboxEntry)>> {
        let db = &self.inner.db;
        let outbox = committer::handle(db, Cf::Outbox)?;
        let events = committer::handle(db, Cf::Events)?;
        let mut out = Vec::new();
        for seq in seqs {
            let Some(value) = db
                .get_pinned_cf(outbox, keys::u64_key(seq))
                .map_err(map_err)?
            else {
                continue;
            };
            let entry = match outbox_event_ref(&value) {
                Some(key) => {
                    let event = db.get_pinned_cf(events, key).map_err(map_err)?;
                    referred_event(key, event.as_deref())?
                }
                None => decode(&value)?,
            };
            out.push((seq, entry));
        }
        Ok(out)
    }
}

impl Outbox for RocksStore {
    fn outbox_peek(&self, after: u64, limit: usize) -> StoreResult<Vec<(u64, OutboxEntry)>> {
        let (last, _) = self.inner.committer.outbox_positions();
        let waiting = last.saturating_sub(after);
        if waiting > 0 && waiting <= POINT_READ_ENTRIES.min(limit as u64) {
            return self.outbox_read(after + 1..=last);
        }
        let db = &self.inner.db;
        let mut it = db.raw_iterator_cf(committer::handle(db, Cf::Outbox)?);
        // Created after the outbox's: its snapshot holds every event the
        // outbox's refers to (an event and its entry commit together).
        let mut events = db.raw_iterator_cf(committer::handle(db, Cf::Events)?);
        it.seek(keys::u64_key(after.saturating_add(1)));
        let mut out = Vec::new();
        while out.len() < limit {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            out.push((keys::decode_u64(k)?, decode_outbox_entry(&mut events, v)?));
            it.next();
        }
        it.status().map_err(map_err)?;
        Ok(out)
    }

    fn outbox_ack(&self, through: u64) -> WriteFuture<()> {
        // Unsynced: a removal lost in a machine crash resends entries the
        // region drops as duplicates, and an ack alone in a group no longer
        // holds the next writes up for an fsync of its own.
        self.inner.committer.write_unsynced(move |tx: &mut Txn| {
            let acked_key = keys::meta_outbox_acked();
            let acked = tx.get_u64(Cf::Meta, acked_key)?;
            let last = tx.get_u64(Cf::Meta, keys::meta_outbox_seq())?;
            let through = through.min(last);
            if through <= acked {
                return Ok(());
            }
            // The keys acked+1..=through exist, apart from erased ones.
            for seq in acked + 1..=through {
                tx.delete(Cf::Outbox, keys::u64_key(seq));
            }
            // Never stop right before erased entries: they will not be
            // acknowledged, and the depth must not count them forever.
            let through = skip_outbox_gap(tx, through, last)?;
            tx.put(Cf::Meta, acked_key, through.to_be_bytes().to_vec());
            Ok(())
        })
    }

    fn outbox_depth(&self) -> StoreResult<u64> {
        let (last, acked) = self.outbox_positions()?;
        Ok(last.saturating_sub(acked))
    }

    fn outbox_positions(&self) -> StoreResult<(u64, u64)> {
        Ok(self.inner.committer.outbox_positions())
    }

    fn outbox_signal(&self) -> Arc<tokio::sync::Notify> {
        self.inner.outbox_signal.clone()
    }

    fn outbox_incarnation(&self) -> u64 {
        self.inner.incarnation
    }
}

impl HostRecords for RocksStore {
    fn host_record(&self, table: &str, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let db = &self.inner.db;
        db.get_cf(
            committer::handle(db, Cf::Meta)?,
            keys::host_record_key(table, key),
        )
        .map_err(map_err)
    }

    fn host_records(&self, table: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
        let db = &self.inner.db;
        let prefix = keys::host_table_prefix(table);
        let mut it = db.raw_iterator_cf(committer::handle(db, Cf::Meta)?);
        it.seek(&prefix);
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some(key) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            let key = String::from_utf8(key.to_vec())
                .map_err(|_| StoreError::Internal("corrupt host record key".into()))?;
            out.push((key, v.to_vec()));
            it.next();
        }
        it.status().map_err(map_err)?;
        Ok(out)
    }

    fn put_host_record(&self, table: &str, key: String, value: Vec<u8>) -> WriteFuture<()> {
        let k = keys::host_record_key(table, &key);
        self.inner.committer.write(move |tx| {
            tx.put(Cf::Meta, k, value);
            Ok(())
        })
    }

    fn delete_host_record(&self, table: &str, key: String) -> WriteFuture<()> {
        let k = keys::host_record_key(table, &key);
        self.inner.committer.write(move |tx| {
            tx.delete(Cf::Meta, k);
            Ok(())
        })
    }

    fn expiring_host_record(&self, table: &str, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let db = &self.inner.db;
        let v = db
            .get_cf(
                committer::handle(db, Cf::Meta)?,
                keys::expiring_record_key(table, key),
            )
            .map_err(map_err)?;
        Ok(v.and_then(|v| live_expiring(&v, now_ms()).map(<[u8]>::to_vec)))
    }

    fn write_host_records(&self, writes: Vec<HostWrite>) -> WriteFuture<()> {
        self.inner.committer.write(move |tx| {
            for w in writes {
                match w {
                    HostWrite::Put { table, key, value } => {
                        tx.put(Cf::Meta, keys::host_record_key(table, &key), value)
                    }
                    HostWrite::PutExpiring {
                        table,
                        key,
                        value,
                        expires_at_ms,
                    } => put_expiring(tx, table, &key, &value, expires_at_ms)?,
                }
            }
            prune_expired(tx, now_ms())
        })
    }
}

/// Expiring table of the global event ids this node queued, per component.
const GLOBAL_EVENT_IDS: &str = "global-event-ids";

fn global_id_key(ns: &Namespace, id: &str) -> String {
    format!("{ns}\0{id}")
}

/// The record of an expiring value that is still alive at `now_ms`.
fn live_expiring(v: &[u8], now_ms: u64) -> Option<&[u8]> {
    let (at, record) = v.split_at_checked(8)?;
    let at = u64::from_be_bytes(at.try_into().ok()?);
    (at > now_ms).then_some(record)
}

fn put_expiring(
    tx: &mut committer::Txn,
    table: &str,
    key: &str,
    value: &[u8],
    expires_at_ms: u64,
) -> StoreResult<()> {
    let k = keys::expiring_record_key(table, key);
    if let Some(old) = tx.get(Cf::Meta, &k)?
        && let Some(at) = old.get(..8)
    {
        let at = u64::from_be_bytes(at.try_into().expect("8 bytes"));
        tx.delete(Cf::Meta, keys::expiry_index_key(at, table, key));
    }
    let mut v = expires_at_ms.to_be_bytes().to_vec();
    v.extend_from_slice(value);
    tx.put(Cf::Meta, k, v);
    tx.put(
        Cf::Meta,
        keys::expiry_index_key(expires_at_ms, table, key),
        Vec::new(),
    );
    Ok(())
}

/// Expired records removed per write: enough to keep up with any rate of
/// expiring writes (each write adds one), bounded so no write waits long.
const PRUNE_PER_WRITE: usize = 16;

/// Deletes up to [`PRUNE_PER_WRITE`] expired records, oldest first. A record
/// rewritten since its index entry was made keeps its newer value.
fn prune_expired(tx: &mut committer::Txn, now_ms: u64) -> StoreResult<()> {
    for ik in tx.committed_keys(Cf::Meta, keys::EXPIRY_INDEX_PREFIX, PRUNE_PER_WRITE)? {
        let Some((at, record)) = keys::parse_expiry_index_key(&ik) else {
            tx.delete(Cf::Meta, ik);
            continue;
        };
        if at > now_ms {
            break;
        }
        tx.delete(Cf::Meta, ik);
        if tx
            .get(Cf::Meta, &record)?
            .is_some_and(|v| v.get(..8) == Some(&at.to_be_bytes()[..]))
        {
            tx.delete(Cf::Meta, record);
        }
    }
    Ok(())
}

impl KvStore for RocksStore {
    fn get(&self, ns: &Namespace, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.inner.limits.check_key(key)?;
        let db = &self.inner.db;
        db.get_cf(committer::handle(db, Cf::Kv)?, keys::ns_key(ns, key))
            .map_err(map_err)
    }

    fn exists(&self, ns: &Namespace, key: &str) -> StoreResult<bool> {
        self.inner.limits.check_key(key)?;
        let db = &self.inner.db;
        Ok(db
            .get_pinned_cf(committer::handle(db, Cf::Kv)?, keys::ns_key(ns, key))
            .map_err(map_err)?
            .is_some())
    }

    fn list_keys(
        &self,
        ns: &Namespace,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        let db = &self.inner.db;
        let cf = committer::handle(db, Cf::Kv)?;
        let scope = keys::ns_key(ns, prefix);
        let start = match after {
            Some(a) if a.as_bytes() >= prefix.as_bytes() => keys::ns_key(ns, a),
            _ => scope.clone(),
        };
        let ns_len = keys::ns_prefix(ns).len();
        let mut out = Vec::new();
        let mut it = db.raw_iterator_cf(cf);
        it.seek(&start);
        while it.valid() && out.len() < limit {
            let Some(k) = it.key() else { break };
            if !k.starts_with(&scope) {
                break;
            }
            let user_key = &k[ns_len..];
            if after.is_none_or(|a| user_key > a.as_bytes())
                && let Ok(s) = std::str::from_utf8(user_key)
            {
                out.push(s.to_string());
            }
            it.next();
        }
        it.status().map_err(map_err)?;
        Ok(out)
    }

    fn set(&self, ns: &Namespace, key: String, value: Vec<u8>) -> WriteFuture<()> {
        let l = &self.inner.limits;
        if let Err(e) = l.check_key(&key).and_then(|_| l.check_value(&value)) {
            return ready(Err(e));
        }
        let k = keys::ns_key(ns, &key);
        self.inner.committer.write(move |tx| {
            tx.put(Cf::Kv, k, value);
            Ok(())
        })
    }

    fn delete(&self, ns: &Namespace, key: String) -> WriteFuture<()> {
        if let Err(e) = self.inner.limits.check_key(&key) {
            return ready(Err(e));
        }
        let k = keys::ns_key(ns, &key);
        self.inner.committer.write(move |tx| {
            tx.delete(Cf::Kv, k);
            Ok(())
        })
    }

    fn compare_and_swap(
        &self,
        ns: &Namespace,
        key: String,
        expected: Option<Vec<u8>>,
        new_value: Vec<u8>,
    ) -> WriteFuture<bool> {
        let l = &self.inner.limits;
        if let Err(e) = l.check_key(&key).and_then(|_| l.check_value(&new_value)) {
            return ready(Err(e));
        }
        let k = keys::ns_key(ns, &key);
        self.inner.committer.write(move |tx| {
            if tx.get(Cf::Kv, &k)? != expected {
                return Ok(false);
            }
            tx.put(Cf::Kv, k, new_value);
            Ok(true)
        })
    }
}

impl RocksStore {
    /// Refuses an event the log must not take; nothing is written.
    fn check_event(&self, event: &EventData) -> StoreResult<()> {
        let size = event.payload.len() + event.kind.len() + event.key.len();
        if size > self.inner.limits.max_event_bytes {
            return Err(StoreError::Invalid(format!(
                "event of {size} bytes exceeds the limit of {} bytes",
                self.inner.limits.max_event_bytes
            )));
        }
        if event.kind.is_empty() {
            return Err(StoreError::Invalid("event kind must not be empty".into()));
        }
        Ok(())
    }
}

/// Most events one `append_batch` takes.
const MAX_BATCH_EVENTS: usize = 1024;

impl EventLog for RocksStore {
    fn append(&self, ns: &Namespace, event: EventData, forward: bool) -> WriteFuture<StoredEvent> {
        let batch = self.append_batch(ns, vec![event], forward);
        Box::pin(async move {
            let mut b = batch.await?;
            b.events
                .pop()
                .ok_or_else(|| StoreError::Internal("append wrote no event".into()))
        })
    }

    fn append_batch(
        &self,
        ns: &Namespace,
        events: Vec<EventData>,
        forward: bool,
    ) -> WriteFuture<AppendedBatch> {
        if events.len() > MAX_BATCH_EVENTS {
            return ready(Err(StoreError::Limit(format!(
                "{} events in one batch; at most {MAX_BATCH_EVENTS}",
                events.len()
            ))));
        }
        for (i, e) in events.iter().enumerate() {
            if let Err(e) = self.check_event(e) {
                let msg = if events.len() == 1 {
                    e.to_string()
                } else {
                    format!("event {i}: {e}")
                };
                return ready(Err(StoreError::Invalid(msg)));
            }
        }
        // Only what must be ordered runs in the job, under the committer's
        // lock (sequences, the HLC stamp, the record's head); each event's
        // data is encoded before it, and the returned events are assembled
        // after it.
        let bodies = match events.iter().map(encode).collect::<StoreResult<Vec<_>>>() {
            Ok(b) => b,
            Err(e) => return ready(Err(e)),
        };
        let forward = forward && self.inner.forwarding;
        let inner = self.inner.clone();
        let ns = ns.clone();
        let seq_key = keys::meta_event_seq(&ns);
        let write = self.inner.committer.write(move |tx| {
            let mut sequence = tx.get_u64(Cf::Meta, &seq_key)?;
            let mut stamped = Vec::with_capacity(bodies.len());
            let mut last_outbox_seq = None;
            for body in &bodies {
                sequence += 1;
                let node_seq = next_node_seq(tx)?;
                // Stamped in the job: HLC order equals log order.
                let at = stamp(&inner)?;
                let id = node_write_id(&inner.node.edge, node_seq);
                let encoded = encode_event_record(&id, sequence, &inner.node, &at, body)?;
                let key = keys::event_key(&ns, sequence);
                if forward {
                    let entry = encode_outbox_event_ref(&key);
                    last_outbox_seq = Some(enqueue_outbox(tx, entry)?);
                }
                tx.put(Cf::Events, key, encoded);
                stamped.push((id, sequence, at));
            }
            tx.put(Cf::Meta, seq_key, sequence.to_be_bytes().to_vec());
            Ok((stamped, last_outbox_seq))
        });
        let store = self.inner.clone();
        Box::pin(async move {
            let (stamped, last_outbox_seq) = write.await?;
            let events = events
                .into_iter()
                .zip(stamped)
                .map(|(data, (id, sequence, at))| StoredEvent {
                    id,
                    sequence,
                    origin: store.node.edge.clone(),
                    region: store.node.region.clone(),
                    at,
                    data,
                })
                .collect();
            Ok(AppendedBatch {
                events,
                last_outbox_seq,
            })
        })
    }

    fn read(&self, ns: &Namespace, from: u64, limit: usize) -> StoreResult<Vec<StoredEvent>> {
        let db = &self.inner.db;
        let cf = committer::handle(db, Cf::Events)?;
        let prefix = keys::ns_prefix(ns);
        let mut it = db.raw_iterator_cf(cf);
        it.seek(keys::event_key(ns, from.max(1)));
        let mut out = Vec::new();
        while it.valid() && out.len() < limit {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(decode(v)?);
            it.next();
        }
        it.status().map_err(map_err)?;
        Ok(out)
    }

    fn last_sequence(&self, ns: &Namespace) -> StoreResult<Option<u64>> {
        let db = &self.inner.db;
        let v = db
            .get_cf(committer::handle(db, Cf::Meta)?, keys::meta_event_seq(ns))
            .map_err(map_err)?;
        Ok(match v {
            Some(b) => Some(keys::decode_u64(&b)?).filter(|n| *n > 0),
            None => None,
        })
    }
}

impl EdgeStore for RocksStore {
    fn get_state(&self, ns: &Namespace, key: &str) -> StoreResult<Option<StateValue>> {
        self.inner.limits.check_key(key)?;
        let db = &self.inner.db;
        db.get_cf(committer::handle(db, Cf::State)?, keys::ns_key(ns, key))
            .map_err(map_err)?
            .map(|v| decode(&v))
            .transpose()
    }

    fn set_state(&self, ns: &Namespace, key: String, value: Vec<u8>) -> WriteFuture<u64> {
        let l = &self.inner.limits;
        if let Err(e) = l.check_key(&key).and_then(|_| l.check_value(&value)) {
            return ready(Err(e));
        }
        let k = keys::ns_key(ns, &key);
        let inner = self.inner.clone();
        self.inner.committer.write(move |tx| {
            let version = match tx.get(Cf::State, &k)? {
                Some(b) => decode::<StateValue>(&b)?.version + 1,
                None => 1,
            };
            let v = StateValue {
                value,
                version,
                updated_at: stamp(&inner)?,
            };
            tx.put(Cf::State, k, encode(&v)?);
            Ok(version)
        })
    }

    fn preferences(&self, ns: &Namespace, user: &str) -> StoreResult<Vec<(String, String)>> {
        let db = &self.inner.db;
        let cf = committer::handle(db, Cf::Users)?;
        let prefix = keys::pref_prefix(ns, user);
        let mut it = db.raw_iterator_cf(cf);
        it.seek(&prefix);
        let mut out = Vec::new();
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !k.starts_with(&prefix) {
                break;
            }
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((name, String::from_utf8_lossy(v).into_owned()));
            it.next();
        }
        it.status().map_err(map_err)?;
        Ok(out)
    }

    fn set_preference(
        &self,
        ns: &Namespace,
        user: String,
        name: String,
        value: Option<String>,
    ) -> WriteFuture<()> {
        let l = &self.inner.limits;
        let check = l
            .check_key(&user)
            .and_then(|_| l.check_key(&name))
            .and_then(|_| l.check_value(value.as_deref().unwrap_or("").as_bytes()));
        if let Err(e) = check {
            return ready(Err(e));
        }
        let mut k = keys::pref_prefix(ns, &user);
        k.extend_from_slice(name.as_bytes());
        self.inner.committer.write(move |tx| {
            match value {
                Some(v) => tx.put(Cf::Users, k, v.into_bytes()),
                None => tx.delete(Cf::Users, k),
            }
            Ok(())
        })
    }

    fn record_metric(&self, ns: &Namespace, metric: String, value: f64) -> WriteFuture<()> {
        if let Err(e) = self.inner.limits.check_key(&metric) {
            return ready(Err(e));
        }
        if !value.is_finite() {
            return ready(Err(StoreError::Invalid(format!(
                "metric value must be a finite number, got {value}"
            ))));
        }
        if !self.inner.forwarding {
            return ready(Err(StoreError::Unavailable(
                "this node does not forward to a region".into(),
            )));
        }
        let inner = self.inner.clone();
        let ns = ns.clone();
        self.inner.committer.write(move |tx| {
            let entry = OutboxEntry::Metric {
                component: ns.to_string(),
                metric,
                value,
                edge: inner.node.edge.clone(),
                at: stamp(&inner)?,
            };
            enqueue_outbox(tx, encode(&entry)?)?;
            Ok(())
        })
    }

    fn queue_global_event(&self, ns: &Namespace, event: GlobalEvent) -> WriteFuture<()> {
        let size = event.data.len()
            + event.id.len()
            + event.event_type.len()
            + event.subject.as_ref().map_or(0, String::len);
        if size > self.inner.limits.max_event_bytes {
            return ready(Err(StoreError::Invalid(format!(
                "global event of {size} bytes exceeds the limit of {} bytes",
                self.inner.limits.max_event_bytes
            ))));
        }
        if !self.inner.forwarding {
            return ready(Err(StoreError::Unavailable(
                "this node does not forward".into(),
            )));
        }
        let inner = self.inner.clone();
        let ns = ns.clone();
        self.inner.committer.write(move |tx| {
            // Publishing an id again is a no-op on this node for as long as
            // the global stream keeps the event (JetStream's own dedup only
            // spans its window).
            let now = now_ms();
            let seen = keys::expiring_record_key(GLOBAL_EVENT_IDS, &global_id_key(&ns, &event.id));
            if tx
                .get(Cf::Meta, &seen)?
                .is_some_and(|v| live_expiring(&v, now).is_some())
            {
                return Ok(());
            }
            put_expiring(
                tx,
                GLOBAL_EVENT_IDS,
                &global_id_key(&ns, &event.id),
                &[],
                now.saturating_add(GLOBAL_EVENT_RETENTION.as_millis() as u64),
            )?;
            prune_expired(tx, now)?;
            let entry = OutboxEntry::Global {
                component: ns.to_string(),
                event,
                edge: inner.node.edge.clone(),
                at: stamp(&inner)?,
            };
            enqueue_outbox(tx, encode(&entry)?)?;
            Ok(())
        })
    }

    fn record_activity(&self, ns: &Namespace, user: String, activity: Activity) -> WriteFuture<()> {
        let l = &self.inner.limits;
        let size: usize = activity.kind.len()
            + activity
                .attributes
                .iter()
                .map(|(a, b)| a.len() + b.len())
                .sum::<usize>();
        if let Err(e) = l.check_key(&user) {
            return ready(Err(e));
        }
        if size > l.max_value_bytes {
            return ready(Err(StoreError::Invalid(format!(
                "activity of {size} bytes exceeds the limit of {} bytes",
                l.max_value_bytes
            ))));
        }
        let k = keys::activity_key(ns, &user);
        let inner = self.inner.clone();
        let ns = ns.clone();
        self.inner.committer.write(move |tx| {
            let record = ActivityRecord {
                activity,
                edge: inner.node.edge.clone(),
                at: stamp(&inner)?,
            };
            tx.put(Cf::Users, k, encode(&record)?);
            if inner.forwarding {
                let entry = OutboxEntry::Activity {
                    component: ns.to_string(),
                    user,
                    record,
                };
                enqueue_outbox(tx, encode(&entry)?)?;
            }
            Ok(())
        })
    }

    fn last_activity(&self, ns: &Namespace, user: &str) -> StoreResult<Option<ActivityRecord>> {
        let db = &self.inner.db;
        db.get_cf(
            committer::handle(db, Cf::Users)?,
            keys::activity_key(ns, user),
        )
        .map_err(map_err)?
        .map(|v| decode(&v))
        .transpose()
    }

    fn user_region(&self, user: &str) -> StoreResult<Option<String>> {
        let db = &self.inner.db;
        Ok(db
            .get_cf(committer::handle(db, Cf::Users)?, keys::directory_key(user))
            .map_err(map_err)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn register_user(&self, user: String, region: String) -> WriteFuture<String> {
        if let Err(e) = self.inner.limits.check_key(&user) {
            return ready(Err(e));
        }
        let k = keys::directory_key(&user);
        self.inner.committer.write(move |tx| {
            if let Some(existing) = tx.get(Cf::Users, &k)? {
                return Ok(String::from_utf8_lossy(&existing).into_owned());
            }
            tx.put(Cf::Users, k, region.clone().into_bytes());
            Ok(region)
        })
    }
}

#[cfg(test)]
mod tests;

impl CrdtStore for RocksStore {
    fn load_crdt(&self, ns: &Namespace, id: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let db = &self.inner.db;
        db.get_cf(committer::handle(db, Cf::Crdt)?, keys::ns_bytes_key(ns, id))
            .map_err(map_err)
    }

    fn save_crdt(&self, ns: &Namespace, id: Vec<u8>, state: Vec<u8>) -> WriteFuture<()> {
        let k = keys::ns_bytes_key(ns, &id);
        self.inner.committer.write(move |tx| {
            tx.put(Cf::Crdt, k, state);
            Ok(())
        })
    }

    fn all_crdts(&self) -> StoreResult<Vec<StoredCrdt>> {
        let db = &self.inner.db;
        let mut out = Vec::new();
        for item in db.iterator_cf(
            committer::handle(db, Cf::Crdt)?,
            rocksdb::IteratorMode::Start,
        ) {
            let (k, v) = item.map_err(map_err)?;
            let (ns, id) = keys::split_ns_key(&k)?;
            out.push(StoredCrdt {
                ns,
                id: id.to_vec(),
                state: v.to_vec(),
            });
        }
        Ok(out)
    }

    fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }
}
