//! [`UserDataStore`]: one user's data, erased or exported.
//!
//! An erasure runs in three steps:
//! 1. **Find** (on a thread of its own, the committer keeps committing):
//!    scan the event log and the outbox for the user's records; remember how
//!    far each was scanned.
//! 2. **Erase** (one committer job that runs alone, so it reads the current
//!    state): recheck what step 1 found, scan what was appended since, look
//!    up preferences, activities and the directory entry per component, list
//!    the KV keys under the prefixes; delete or rewrite them all in one
//!    fsynced batch.
//! 3. **Purge** (on a thread of its own): the records are gone from reads,
//!    but their bytes are still in the WAL, in memtables and in older SST
//!    files. Flush every column family (atomic flush: the WAL holding them
//!    becomes obsolete and is deleted), then compact every column family
//!    fully, bottommost level included (old versions and the tombstones
//!    themselves are dropped). See [`purge`] for what that does not reach
//!    (keys in the MANIFEST).

use crate::committer::{self, Txn};
use crate::{Cf, Inner, RocksStore, decode, encode, keys, map_err, outbox_event_ref, ready};
use keel_store::{
    ERASED_EVENT_KIND, ErasedUser, EventData, Namespace, OutboxEntry, StoreError, StoreLimits,
    StoreResult, StoredEvent, UserDataStore, UserRecords, WriteFuture,
};
use rocksdb::{
    BottommostLevelCompaction, ColumnFamily, CompactOptions, DB, FlushOptions,
    WaitForCompactOptions,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// How long a purge waits for background flushes and compactions.
const PURGE_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

impl UserDataStore for RocksStore {
    fn erase_user(
        &self,
        user: String,
        key_prefixes: Vec<(Namespace, Vec<String>)>,
    ) -> WriteFuture<ErasedUser> {
        if let Err(e) = check_request(&self.inner.limits, &user, &key_prefixes) {
            return ready(Err(e));
        }
        let inner = self.inner.clone();
        Box::pin(async move {
            let db = inner.db.clone();
            let who = user.clone();
            let found = on_thread(move || find(&db, &who)).await?;
            let erased = inner
                .committer
                .write_alone(move |tx| erase(tx, &user, &key_prefixes, found))
                .await?;
            let purging = inner.clone();
            on_thread(move || {
                let _one = purging
                    .purge
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                purge(&purging.db)
            })
            .await?;
            Ok(erased)
        })
    }

    fn export_user(
        &self,
        user: &str,
        key_prefixes: &[(Namespace, Vec<String>)],
    ) -> StoreResult<UserRecords> {
        check_request(&self.inner.limits, user, key_prefixes)?;
        export(&self.inner, user, key_prefixes)
    }
}

/// `Invalid` for a user id or prefix that would not name one user's data.
fn check_request(
    limits: &StoreLimits,
    user: &str,
    key_prefixes: &[(Namespace, Vec<String>)],
) -> StoreResult<()> {
    limits
        .check_key(user)
        .map_err(|e| StoreError::Invalid(format!("user id: {e}")))?;
    for (ns, prefixes) in key_prefixes {
        for prefix in prefixes {
            if prefix.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "empty KV key prefix for {ns}: it would name every key"
                )));
            }
            limits
                .check_key(prefix)
                .map_err(|e| StoreError::Invalid(format!("KV key prefix for {ns}: {e}")))?;
        }
    }
    Ok(())
}

/// Runs `f` on a new thread (scans and compactions must not block a tokio
/// worker or the committer); starts when first polled.
async fn on_thread<T, F>(f: F) -> StoreResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> StoreResult<T> + Send + 'static,
{
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("keel-store-erase".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err(StoreError::Internal("erasure panicked".into())));
            let _ = done.send(r);
        })
        .map_err(|e| StoreError::Unavailable(format!("cannot start a thread: {e}")))?;
    result
        .await
        .map_err(|_| StoreError::Internal("erasure thread stopped".into()))?
}

fn is_users_event(e: &StoredEvent, user: &str) -> bool {
    e.data.user.as_deref() == Some(user)
}

fn is_about(entry: &OutboxEntry, user: &str) -> bool {
    match entry {
        OutboxEntry::Event { event, .. } => is_users_event(event, user),
        OutboxEntry::Activity { user: u, .. } => u == user,
        OutboxEntry::Global { event, .. } => event.user.as_deref() == Some(user),
        OutboxEntry::Metric { .. } => false,
    }
}

/// Whether the outbox value `v` (an encoded entry, or a reference to an
/// event in the log) is about the user.
fn stored_entry_is_about(db: &DB, v: &[u8], user: &str) -> StoreResult<bool> {
    let Some(event_key) = outbox_event_ref(v) else {
        return Ok(contains(v, user.as_bytes()) && is_about(&decode(v)?, user));
    };
    let events = committer::handle(db, Cf::Events)?;
    Ok(
        match db.get_pinned_cf(events, event_key).map_err(map_err)? {
            Some(e) => contains(&e, user.as_bytes()) && is_users_event(&decode(&e)?, user),
            None => false,
        },
    )
}

/// Whether `haystack` contains `needle`: a record without the user id's
/// bytes cannot be the user's, so most records are never decoded.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// What step 1 found.
struct Found {
    /// Keys of the user's events.
    events: Vec<Vec<u8>>,
    /// Per `<ns>\0`: the highest event sequence scanned.
    events_scanned: HashMap<Vec<u8>, u64>,
    /// Outbox sequences of entries about the user.
    outbox: Vec<u64>,
    /// Highest outbox sequence scanned (0: none).
    outbox_scanned: u64,
}

/// Step 1: scans the event log and the outbox without holding up writes.
fn find(db: &DB, user: &str) -> StoreResult<Found> {
    let mut found = find_events(db, user)?;
    find_outbox(db, user, &mut found)?;
    Ok(found)
}

/// Step 1's scan of the event log.
fn find_events(db: &DB, user: &str) -> StoreResult<Found> {
    let mut found = Found {
        events: Vec::new(),
        events_scanned: HashMap::new(),
        outbox: Vec::new(),
        outbox_scanned: 0,
    };
    let mut it = db.raw_iterator_cf(committer::handle(db, Cf::Events)?);
    it.seek_to_first();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let (ns, seq) = split_event_key(k)?;
        found.events_scanned.insert(ns.to_vec(), seq);
        if contains(v, user.as_bytes()) && is_users_event(&decode(v)?, user) {
            found.events.push(k.to_vec());
        }
        it.next();
    }
    it.status().map_err(map_err)?;
    Ok(found)
}

/// Step 1's scan of the outbox, after [`find_events`].
fn find_outbox(db: &DB, user: &str, found: &mut Found) -> StoreResult<()> {
    // Most outbox entries refer to events the event scan already judged;
    // only those appended since are read.
    let users_events: HashSet<&[u8]> = found.events.iter().map(Vec::as_slice).collect();
    let mut it = db.raw_iterator_cf(committer::handle(db, Cf::Outbox)?);
    it.seek_to_first();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let seq = keys::decode_u64(k)?;
        found.outbox_scanned = seq;
        let about = match outbox_event_ref(v) {
            Some(event_key) if scanned(&found.events_scanned, event_key)? => {
                users_events.contains(event_key)
            }
            _ => stored_entry_is_about(db, v, user)?,
        };
        if about {
            found.outbox.push(seq);
        }
        it.next();
    }
    it.status().map_err(map_err)
}

/// Whether the event scan of step 1 covered the event under `event_key`.
fn scanned(events_scanned: &HashMap<Vec<u8>, u64>, event_key: &[u8]) -> StoreResult<bool> {
    let (ns, seq) = split_event_key(event_key)?;
    Ok(events_scanned
        .get(ns)
        .is_some_and(|&through| seq <= through))
}

/// `(<ns>\0, sequence)` of an event key.
fn split_event_key(k: &[u8]) -> StoreResult<(&[u8], u64)> {
    let corrupt = || StoreError::Internal("corrupt event key".into());
    let zero = k.iter().position(|&b| b == 0).ok_or_else(corrupt)?;
    let (ns, seq) = k.split_at(zero + 1);
    Ok((ns, keys::decode_u64(seq)?))
}

/// The event with its content gone: same id, sequence, origin, region and
/// time, so the log stays gapless and ids stay unique.
fn erased_event(e: StoredEvent) -> StoredEvent {
    StoredEvent {
        data: EventData {
            kind: ERASED_EVENT_KIND.into(),
            key: String::new(),
            payload: Vec::new(),
            content_type: None,
            user: None,
        },
        ..e
    }
}

/// Step 2, on the committer in a group of its own: what the database holds
/// now is what `tx.db()` reads.
fn erase(
    tx: &mut Txn,
    user: &str,
    key_prefixes: &[(Namespace, Vec<String>)],
    found: Found,
) -> StoreResult<ErasedUser> {
    let db = tx.db();
    let mut erased = ErasedUser::default();

    for ns in namespaces_with(db, keys::PREF_TAG)? {
        for (k, _, _) in preferences_in(db, &ns, user)? {
            tx.delete(Cf::Users, k);
            erased.preferences += 1;
        }
    }
    let users = committer::handle(db, Cf::Users)?;
    for ns in namespaces_with(db, keys::ACTIVITY_TAG)? {
        let k = keys::user_record_prefix(keys::ACTIVITY_TAG, &ns, user);
        if db.get_pinned_cf(users, &k).map_err(map_err)?.is_some() {
            tx.delete(Cf::Users, k);
            erased.activities += 1;
        }
    }
    let dir = keys::directory_key(user);
    if db.get_pinned_cf(users, &dir).map_err(map_err)?.is_some() {
        tx.delete(Cf::Users, dir);
        erased.directory = true;
    }

    // Events: what step 1 found (events are never deleted, but recheck),
    // then whatever was appended after step 1 scanned each log.
    let events = committer::handle(db, Cf::Events)?;
    for k in found.events {
        if let Some(v) = db.get_cf(events, &k).map_err(map_err)? {
            let e: StoredEvent = decode(&v)?;
            if is_users_event(&e, user) {
                tx.put(Cf::Events, k, encode(&erased_event(e))?);
                erased.events += 1;
            }
        }
    }
    let mut it = db.raw_iterator_cf(events);
    it.seek_to_first();
    while let Some(k) = it.key() {
        let (ns, _) = split_event_key(k)?;
        let ns = ns.to_vec();
        if let Some(&scanned) = found.events_scanned.get(&ns) {
            let mut from = ns.clone();
            from.extend_from_slice(&scanned.saturating_add(1).to_be_bytes());
            it.seek(&from);
        }
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(&ns) {
                break;
            }
            if contains(v, user.as_bytes()) {
                let e: StoredEvent = decode(v)?;
                if is_users_event(&e, user) {
                    tx.put(Cf::Events, k.to_vec(), encode(&erased_event(e))?);
                    erased.events += 1;
                }
            }
            it.next();
        }
    }
    it.status().map_err(map_err)?;

    // Outbox: the same, then move the acknowledged position over a gap
    // the deletions left right after it.
    let outbox = committer::handle(db, Cf::Outbox)?;
    let mut deleted = BTreeSet::new();
    for seq in found.outbox {
        let k = keys::u64_key(seq);
        if let Some(v) = db.get_cf(outbox, &k).map_err(map_err)?
            && stored_entry_is_about(db, &v, user)?
        {
            deleted.insert(seq);
        }
    }
    let mut it = db.raw_iterator_cf(outbox);
    it.seek(keys::u64_key(found.outbox_scanned.saturating_add(1)));
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if stored_entry_is_about(db, v, user)? {
            deleted.insert(keys::decode_u64(k)?);
        }
        it.next();
    }
    it.status().map_err(map_err)?;
    erased.outbox_entries = deleted.len() as u64;
    for seq in deleted {
        tx.delete(Cf::Outbox, keys::u64_key(seq));
    }
    let acked_key = keys::meta_outbox_acked();
    let acked = tx.get_u64(Cf::Meta, acked_key)?;
    let last = tx.get_u64(Cf::Meta, keys::meta_outbox_seq())?;
    let moved = crate::skip_outbox_gap(tx, acked, last)?;
    if moved > acked {
        tx.put(Cf::Meta, acked_key, moved.to_be_bytes().to_vec());
    }

    let kv = committer::handle(db, Cf::Kv)?;
    let mut doomed = BTreeSet::new();
    for (ns, prefixes) in key_prefixes {
        for prefix in prefixes {
            let scope = keys::ns_key(ns, prefix);
            let mut it = db.raw_iterator_cf(kv);
            it.seek(&scope);
            while let Some(k) = it.key() {
                if !k.starts_with(&scope) {
                    break;
                }
                doomed.insert(k.to_vec());
                it.next();
            }
            it.status().map_err(map_err)?;
        }
    }
    erased.kv_keys = doomed.len() as u64;
    for k in doomed {
        tx.delete(Cf::Kv, k);
    }
    Ok(erased)
}

/// The `<ns>\0` of every component with a key under `tag` in the `users`
/// column family: one seek per component, not one step per record.
fn namespaces_with(db: &DB, tag: &[u8]) -> StoreResult<Vec<Vec<u8>>> {
    let mut it = db.raw_iterator_cf(committer::handle(db, Cf::Users)?);
    it.seek(tag);
    let mut out = Vec::new();
    while let Some(k) = it.key() {
        if !k.starts_with(tag) {
            break;
        }
        match keys::tagged_ns_prefix(tag, k) {
            Some(ns) => {
                let next = [tag, &keys::after_ns(ns)].concat();
                out.push(ns.to_vec());
                it.seek(&next);
            }
            // Not written by this store; step over it.
            None => it.next(),
        }
    }
    it.status().map_err(map_err)?;
    Ok(out)
}

/// `(key, name, value)` of the user's preferences in one component.
fn preferences_in(db: &DB, ns: &[u8], user: &str) -> StoreResult<Vec<(Vec<u8>, String, String)>> {
    let prefix = keys::user_record_prefix(keys::PREF_TAG, ns, user);
    let mut it = db.raw_iterator_cf(committer::handle(db, Cf::Users)?);
    it.seek(&prefix);
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let Some(name) = k.strip_prefix(prefix.as_slice()) else {
            break;
        };
        out.push((
            k.to_vec(),
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        ));
        it.next();
    }
    it.status().map_err(map_err)?;
    Ok(out)
}

/// A component's name from its `<ns>\0` key prefix.
fn ns_name(ns: &[u8]) -> String {
    String::from_utf8_lossy(ns.strip_suffix(&[0]).unwrap_or(ns)).into_owned()
}

fn export(
    inner: &Inner,
    user: &str,
    key_prefixes: &[(Namespace, Vec<String>)],
) -> StoreResult<UserRecords> {
    let db: &DB = &inner.db;
    let mut records = UserRecords::default();
    // Keys sort by `<ns>\0`, which is the order of the names.
    for ns in namespaces_with(db, keys::PREF_TAG)? {
        let prefs: Vec<(String, String)> = preferences_in(db, &ns, user)?
            .into_iter()
            .map(|(_, name, value)| (name, value))
            .collect();
        if !prefs.is_empty() {
            records.preferences.push((ns_name(&ns), prefs));
        }
    }
    let users = committer::handle(db, Cf::Users)?;
    for ns in namespaces_with(db, keys::ACTIVITY_TAG)? {
        let k = keys::user_record_prefix(keys::ACTIVITY_TAG, &ns, user);
        if let Some(v) = db.get_pinned_cf(users, &k).map_err(map_err)? {
            records.activities.push((ns_name(&ns), decode(&v)?));
        }
    }
    records.home_region = db
        .get_pinned_cf(users, keys::directory_key(user))
        .map_err(map_err)?
        .map(|v| String::from_utf8_lossy(&v).into_owned());

    let mut it = db.raw_iterator_cf(committer::handle(db, Cf::Events)?);
    it.seek_to_first();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if contains(v, user.as_bytes()) {
            let e: StoredEvent = decode(v)?;
            if is_users_event(&e, user) {
                let (ns, _) = split_event_key(k)?;
                records.events.push((ns_name(ns), e));
            }
        }
        it.next();
    }
    it.status().map_err(map_err)?;

    // Overlapping prefixes ("u/alice", "u/alice/") list a key once.
    let kv = committer::handle(db, Cf::Kv)?;
    let mut entries = BTreeMap::new();
    for (ns, prefixes) in key_prefixes {
        let ns_len = keys::ns_prefix(ns).len();
        for prefix in prefixes {
            let scope = keys::ns_key(ns, prefix);
            let mut it = db.raw_iterator_cf(kv);
            it.seek(&scope);
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if !k.starts_with(&scope) {
                    break;
                }
                let key = String::from_utf8_lossy(&k[ns_len..]).into_owned();
                entries.insert((ns.to_string(), key), v.to_vec());
                it.next();
            }
            it.status().map_err(map_err)?;
        }
    }
    records.kv = entries
        .into_iter()
        .map(|((ns, key), value)| (ns, key, value))
        .collect();
    Ok(records)
}

/// Step 3: makes the erased bytes physically gone from the WAL and the SST
/// files. Safe to run any time (and again after a failure).
///
/// Where RocksDB keeps bytes, and what removes them:
/// - memtables and the WAL: an (atomic) flush of every column family, after
///   which no live memtable needs the old WAL files and RocksDB deletes
///   them (no WAL archive: `WAL_ttl_seconds` and `WAL_size_limit_MB` are 0;
///   no WAL recycling: `recycle_log_file_num` is 0);
/// - SST files: a full manual compaction of every column family with the
///   bottommost level forced (without it, files at the last level are only
///   rewritten with a compaction filter), which drops overwritten versions
///   and, at the last level, the tombstones.
///
/// Not covered:
/// - the MANIFEST: it appends every new file's smallest and largest *key*
///   (never a value) and is only rewritten from the live files when it
///   outgrows `max_manifest_file_size` (1 GiB) or when the database is
///   opened. Erased keys (user ids in preference, activity and directory
///   keys; KV keys) can stay in it until then. Forcing a rewrite needs
///   `SetDBOptions` (`max_manifest_file_size` and
///   `max_manifest_space_amp_pct` to 0 for one manifest write), which the
///   Rust binding does not wrap;
/// - blocks a file system or SSD keeps after a file is deleted.
pub(crate) fn purge(db: &DB) -> StoreResult<()> {
    let cfs: Vec<&ColumnFamily> = Cf::ALL
        .iter()
        .map(|&cf| committer::handle(db, cf))
        .collect::<StoreResult<_>>()?;
    let mut flush = FlushOptions::default();
    flush.set_wait(true);
    db.flush_cfs_opt(&cfs, &flush).map_err(map_err)?;
    let before: HashSet<String> = db
        .live_files()
        .map_err(map_err)?
        .into_iter()
        .map(|f| f.name)
        .collect();
    let mut compact = CompactOptions::default();
    compact.set_exclusive_manual_compaction(true);
    compact.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
    for cf in &cfs {
        db.compact_range_cf_opt(*cf, None::<&[u8]>, None::<&[u8]>, &compact);
    }
    // The C API drops CompactRange's status: check its effect instead.
    // Every file that existed before must have been rewritten.
    if let Some(f) = db
        .live_files()
        .map_err(map_err)?
        .iter()
        .find(|f| before.contains(&f.name))
    {
        return Err(StoreError::Unavailable(format!(
            "compaction left {} ({}) in place; erased data may remain on disk",
            f.name, f.column_family_name
        )));
    }
    // Obsolete files are deleted at the end of each flush or compaction
    // job; wait for those (and surface a background error).
    let mut wait = WaitForCompactOptions::default();
    wait.set_timeout(u64::try_from(PURGE_WAIT.as_micros()).unwrap_or(u64::MAX));
    db.wait_for_compact(&wait).map_err(map_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NodeIdentity, RocksOptions};
    use keel_store::{EventLog, Outbox};

    fn store(dir: &std::path::Path) -> RocksStore {
        let options = RocksOptions {
            limits: StoreLimits::default(),
            node: NodeIdentity {
                edge: "fra".into(),
                region: "eu".into(),
            },
            forwarding: true,
            block_cache_bytes: 1 << 20,
        };
        RocksStore::open(dir, options).unwrap()
    }

    fn ev(user: &str) -> EventData {
        EventData {
            kind: "k".into(),
            key: "k".into(),
            payload: b"p".to_vec(),
            content_type: None,
            user: Some(user.into()),
        }
    }

    #[tokio::test]
    async fn records_appended_after_the_scan_are_erased_too() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (a, b) = (Namespace::new("a").unwrap(), Namespace::new("b").unwrap());
        s.append(&a, ev("alice"), true).await.unwrap();
        let found = find(&s.inner.db, "alice").unwrap();
        assert_eq!((found.events.len(), found.outbox.len()), (1, 1));
        // After the scan: more in a's log, and the first event of b's.
        s.append(&a, ev("alice"), true).await.unwrap();
        s.append(&a, ev("bob"), true).await.unwrap();
        s.append(&b, ev("alice"), true).await.unwrap();
        let erased = s
            .inner
            .committer
            .write_alone(move |tx| erase(tx, "alice", &[], found))
            .await
            .unwrap();
        assert_eq!((erased.events, erased.outbox_entries), (3, 3));
        let kinds = |n: &Namespace| -> Vec<String> {
            s.read(n, 1, 10)
                .unwrap()
                .into_iter()
                .map(|e| e.data.kind)
                .collect()
        };
        assert_eq!(kinds(&a), [ERASED_EVENT_KIND, ERASED_EVENT_KIND, "k"]);
        assert_eq!(kinds(&b), [ERASED_EVENT_KIND]);
        let out = s.outbox_peek(0, 10).unwrap();
        assert_eq!(out.iter().map(|e| e.0).collect::<Vec<_>>(), [3]);
        // 1 and 2 are erased: nothing waits before bob's entry.
        assert_eq!(s.outbox_positions().unwrap(), (4, 2));
    }

    #[tokio::test]
    async fn outbox_entries_of_events_appended_between_the_two_scans_are_judged_by_their_event() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = Namespace::new("a").unwrap();
        s.append(&a, ev("alice"), true).await.unwrap();
        let mut found = find_events(&s.inner.db, "alice").unwrap();
        assert_eq!(found.events.len(), 1);
        // Appended after the event scan, before the outbox scan: their
        // outbox entries refer to events that scan never saw.
        s.append(&a, ev("bob"), true).await.unwrap();
        s.append(&a, ev("alice"), true).await.unwrap();
        find_outbox(&s.inner.db, "alice", &mut found).unwrap();
        assert_eq!(found.outbox, [1, 3]);
        assert_eq!(found.outbox_scanned, 3);
    }
}
