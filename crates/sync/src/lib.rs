//! State sync: the host side of the guest `state` interface.
//!
//! Every CRDT replica lives in memory, is persisted through a [`CrdtStore`]
//! (RocksDB) and, unless its scope is `edge`, is replicated over the bus:
//!
//! 1. **Write.** A mutation is applied to the in-memory replica and its full
//!    state is queued for a durable save (group commit) under one lock, so
//!    saves of one CRDT reach the disk in mutation order. The guest's call
//!    returns after the save is fsynced.
//! 2. **Ship.** Only then is the mutation's delta queued for publishing on
//!    `keel.<region>.crdt.<component>` (`keel.global.crdt.<component>` for
//!    global scope). Shipping after the save matters: a node that crashed
//!    after shipping but before saving would restart with counters and dots
//!    older than what its peers hold, and reuse them.
//! 3. **Receive.** Deltas from other replicas are merged and saved.
//! 4. **Repair.** Every `anti_entropy_interval`, right after start and right
//!    after every reconnect, each node publishes a digest (hash of each
//!    replica's canonical encoding) per component; a node that sees a
//!    different digest pushes its full state, one that lacks a replica asks
//!    for it. Merge is idempotent, so repairs are always safe.
//!
//! Replica ids are `<edge>.<incarnation>`: a node whose data dir was wiped
//! starts a new incarnation and never reuses its former self's dots.

mod wire;

use keel_bus::{Buses, ConnectionState};
use keel_core::{Hlc, HlcClock};
use keel_crdt::{CounterMap, Crdt, LwwMap, LwwRegister, OrSet, PnCounter, ReplicaId};
use keel_store::{CrdtStore, Namespace, StoreError, StoreResult};
use keel_telemetry::SyncMetrics;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use wire::{Digest, DigestRange, Id};

/// Where a CRDT replicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    /// This node only.
    Edge,
    /// Every node of the region.
    Region,
    /// Every node of every region.
    Global,
}

/// The type of a CRDT. A counter and a set with the same name are different
/// objects.
///
/// Part of every persisted store key and sync message (postcard encodes the
/// variant index): new variants go at the end, never in between, so keys
/// and states written by older versions stay decodable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Counter,
    Set,
    Register,
    Map,
    /// A map of per-member scores ([`CounterMap`]).
    Leaderboard,
}

/// One replica's state. Persisted and sent as is: append variants only (see
/// [`Kind`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Value {
    Counter(PnCounter),
    Set(OrSet<String>),
    Register(LwwRegister<Vec<u8>>),
    Map(LwwMap<Vec<u8>>),
    Leaderboard(CounterMap),
}

impl Value {
    fn empty(kind: Kind) -> Value {
        match kind {
            Kind::Counter => Value::Counter(PnCounter::default()),
            Kind::Set => Value::Set(OrSet::default()),
            Kind::Register => Value::Register(LwwRegister::default()),
            Kind::Map => Value::Map(LwwMap::default()),
            Kind::Leaderboard => Value::Leaderboard(CounterMap::default()),
        }
    }

    fn kind(&self) -> Kind {
        match self {
            Value::Counter(_) => Kind::Counter,
            Value::Set(_) => Kind::Set,
            Value::Register(_) => Kind::Register,
            Value::Map(_) => Kind::Map,
            Value::Leaderboard(_) => Kind::Leaderboard,
        }
    }

    /// Joins `other` in; `false` (and no change) if the kinds differ.
    fn merge(&mut self, other: &Value) -> bool {
        match (self, other) {
            (Value::Counter(a), Value::Counter(b)) => a.merge(b),
            (Value::Set(a), Value::Set(b)) => a.merge(b),
            (Value::Register(a), Value::Register(b)) => a.merge(b),
            (Value::Map(a), Value::Map(b)) => a.merge(b),
            (Value::Leaderboard(a), Value::Leaderboard(b)) => a.merge(b),
            _ => return false,
        }
        true
    }

    /// The latest HLC timestamp in the value, if it holds any.
    fn max_timestamp(&self) -> Option<Hlc> {
        match self {
            Value::Register(r) => r.timestamp().cloned(),
            Value::Map(m) => m
                .keys()
                .filter_map(|k| m.get_write(k).map(|w| w.at.clone()))
                .max(),
            Value::Counter(_) | Value::Set(_) | Value::Leaderboard(_) => None,
        }
    }
}

/// One CRDT entry about a user ([`Sync::export_user`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCrdtEntry {
    pub component: String,
    pub scope: Scope,
    pub kind: Kind,
    pub name: String,
    pub entry: UserCrdtValue,
}

/// What a CRDT holds about a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UserCrdtValue {
    /// The user is a member of the set.
    Member,
    /// The map's value under the user's id.
    MapValue(Vec<u8>),
    /// The user's leaderboard score.
    Score(i64),
    /// A personal counter's value.
    Count(i64),
    /// A personal set's members (sorted).
    Members(Vec<String>),
    /// A personal register's value.
    Value(Vec<u8>),
    /// A personal map's entries (sorted by key).
    Entries(Vec<(String, Vec<u8>)>),
    /// A personal leaderboard's non-zero scores (sorted by member).
    Scores(Vec<(String, i64)>),
}

/// Settings of the sync service.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub edge: String,
    pub region: String,
    pub anti_entropy_interval: Duration,
    /// Largest encoded state of one CRDT; larger writes fail with `Limit`.
    pub max_state_bytes: usize,
    /// Largest accepted name, set member or map key.
    pub max_key_bytes: usize,
    /// Largest register or map value.
    pub max_value_bytes: usize,
    /// Remote timestamps further ahead of the local clock are refused.
    pub max_clock_drift: Duration,
}

/// Most `(member, delta)` pairs one [`Sync::leaderboard_update`] accepts.
pub const LEADERBOARD_MAX_UPDATES: usize = 1024;

/// Deltas waiting for the publisher task; beyond this they are dropped and
/// left to anti-entropy rather than blocking guests during a partition.
const PUBLISH_QUEUE: usize = 65_536;

/// The sync service. Cheap to clone.
#[derive(Clone)]
pub struct Sync {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn CrdtStore>,
    replica: ReplicaId,
    region: String,
    opts: SyncOptions,
    replicas: Mutex<HashMap<(Namespace, Id), Slot>>,
    clock: Mutex<HlcClock>,
    outgoing: mpsc::Sender<Outgoing>,
    metrics: SyncMetrics,
    /// Woken whenever a remote delta or repair changed a replica.
    remote_changes: tokio::sync::Notify,
}

struct Slot {
    value: Value,
    digest: u64,
    /// Saves queued and not yet finished.
    pending_saves: u32,
    /// A save failed: memory may hold changes the disk does not. Reloaded
    /// from disk once no save is pending; refuses writes until then.
    poisoned: bool,
}

enum Outgoing {
    Delta {
        ns: Namespace,
        id: Id,
        delta: Value,
    },
    /// Full state (a repair).
    Full {
        ns: Namespace,
        id: Id,
    },
    Digest,
    Need {
        ns: Namespace,
        scope: Scope,
        ids: Vec<Id>,
    },
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn internal(what: &str) -> StoreError {
    StoreError::Internal(format!("{what} lock poisoned"))
}

impl Sync {
    /// Loads every persisted replica and starts the bus tasks on `rt` (the
    /// runtime that owns the bus connection).
    pub fn start(
        store: Arc<dyn CrdtStore>,
        buses: Buses,
        opts: SyncOptions,
        metrics: SyncMetrics,
        rt: &tokio::runtime::Handle,
    ) -> StoreResult<Sync> {
        let replica = ReplicaId(format!("{}.{:016x}", opts.edge, store.incarnation()));
        let mut replicas = HashMap::new();
        for keel_store::StoredCrdt { ns, id, state } in store.all_crdts()? {
            let id = Id::decode(&id)?;
            let value: Value = keel_crdt::decode(&state)
                .map_err(|e| StoreError::Internal(format!("corrupt CRDT {}: {e}", id.name)))?;
            let digest = keel_crdt::digest(&value);
            replicas.insert(
                (ns, id),
                Slot {
                    value,
                    digest,
                    pending_saves: 0,
                    poisoned: false,
                },
            );
        }
        let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        let inner = Arc::new(Inner {
            store,
            clock: Mutex::new(HlcClock::new(
                replica.0.clone(),
                opts.max_clock_drift.as_millis() as u64,
            )),
            replica,
            region: opts.region.clone(),
            opts,
            replicas: Mutex::new(replicas),
            outgoing: tx,
            metrics,
            remote_changes: tokio::sync::Notify::new(),
        });
        // The tasks hold weak references: dropping the last `Sync` closes
        // the store and ends them.
        let weak = Arc::downgrade(&inner);
        rt.spawn(wire::publisher(weak.clone(), buses.clone(), rx));
        rt.spawn(wire::receiver(weak.clone(), buses.clone()));
        rt.spawn(anti_entropy_timer(weak, buses));
        Ok(Sync { inner })
    }

    /// This node's replica id.
    pub fn replica(&self) -> &ReplicaId {
        &self.inner.replica
    }

    /// Replicas held (every scope and component).
    pub fn replica_count(&self) -> usize {
        self.inner.replicas.lock().map_or(0, |m| m.len())
    }

    /// Notified (`notify_waiters`) each time a message from another replica
    /// changed a replica here. Create the `notified()` future before
    /// checking state, then await it, to never miss a change.
    pub fn remote_changes(&self) -> &tokio::sync::Notify {
        &self.inner.remote_changes
    }

    pub fn counter_inc(
        &self,
        ns: &Namespace,
        scope: Scope,
        name: &str,
        by: u64,
    ) -> impl Future<Output = StoreResult<i64>> + Send + 'static {
        let r = self.inner.replica.clone();
        self.mutate(ns, scope, Kind::Counter, name, move |v, _| match v {
            Value::Counter(c) => {
                let d = c.inc(&r, by);
                Ok((Value::Counter(d), c.value()))
            }
            _ => unreachable_kind(),
        })
    }

    pub fn counter_dec(
        &self,
        ns: &Namespace,
        scope: Scope,
        name: &str,
        by: u64,
    ) -> impl Future<Output = StoreResult<i64>> + Send + 'static {
        let r = self.inner.replica.clone();
        self.mutate(ns, scope, Kind::Counter, name, move |v, _| match v {
            Value::Counter(c) => {
                let d = c.dec(&r, by);
                Ok((Value::Counter(d), c.value()))
            }
            _ => unreachable_kind(),
        })
    }

    pub fn counter_value(&self, ns: &Namespace, scope: Scope, name: &str) -> StoreResult<i64> {
        self.read(ns, scope, Kind::Counter, name, |v| match v {
            Some(Value::Counter(c)) => c.value(),
            _ => 0,
        })
    }

    /// Adds `member`; `true` if it was not a member here before.
    pub fn set_add(
        &self,
        ns: &Namespace,
        scope: Scope,
        name: &str,
        member: String,
    ) -> impl Future<Output = StoreResult<bool>> + Send + 'static {
        let r = self.inner.replica.clone();
        let check = self.check_key("member", &member);
        self.mutate(ns, scope, Kind::Set, name, move |v, _| {
            check?;
            match v {
                Value::Set(s) => {
                    let was = s.contains(&member);
                    let d = s.add(&r, member);
                    Ok((Value::Set(d), !was))
                }
                _ => unreachable_kind(),
            }
        })
    }

    /// Removes `member` (the adds observed here); `true` if it was a member.
    pub fn set_remove(
        &self,
        ns: &Namespace,
        scope: Scope,
        name: &str,
        member: String,
    ) -> impl Future<Output = StoreResult<bool>> + Send + 'static {
        self.mutate(ns, scope, Kind::Set, name, move |v, _| match v {
            Value::Set(s) => {
                let was = s.contains(&member);
                let d = s.remove(&member);
                Ok((Value::Set(d), was))
            }
            _ => unreachable_kind(),
        })
    }

    pub fn set_contains(
        &self,
        ns: &Namespace,
        scope: Scope,
        name: &str,
        member: &str,
    ) -> StoreResult<bool> {
        self.read(ns, scope, Kind::Set, name, |v| match v {
            Some(Value::Set(s)) => s.contains(&member.to_string()),
            _ => false,
        })
    }

    pub fn set_members(
        &self,
        ns: &Namespace,
        scope: Scope,
        name: &str,
    ) -> StoreResult<Vec<String>> {
        self.read(ns, scope, Kind::Set, name, |v| match v {
            Some(Value::Set(s)) => s.members().cloned().collect(),
            _ => Vec::new(),
        })
    }

    pub fn register_set(
        &self,
        ns: &Namespace,
        scope: Scope,
        name: &str,
        value: Vec<u8>,
    ) -> impl Future<Output = StoreResult<()>> + Send + 'static {
        let check = self.check_value(&value);
        self.mutate(ns, scope, Kind::Register, name, move |v, at| {
            check?;
            match v {
                Value::Register(r) => Ok((Value::Register(r.set(value, at()?)), ())),
                _ => unreachable_kind(),
            }
        })
    }

    pub fn register_get(
        &self,
        ns: &Namespace,
        scope: Scope,
        name: &str,
    ) -> StoreResult<Option<Vec<u8>>> {
        self.read(ns, scope, Kind::Register, name, |v| match v {
            Some(Value::Register(r)) => r.get().cloned(),
            _ => None,
        })
    }

    pub fn map_set(
        &self,
        ns: &Namespace,
        scope: Scope,
        name: &str,
        key: String,
        value: Vec<u8>,
    ) -> impl Future<Output = StoreResult<()>> + Send + 'static {
        let r = self.inner.replica.clone();
        let check = self
            .check_key("map key", &key)
            .and_then(|_| self.check_value(&value));
        self.mutate(ns, scope, Kind::Map, name, move |v, at| {
            check?;
            match v {
                Value::Map(m) => Ok((Value::Map(m.set(&r, key, value, at()?)), ())),
                _ => unreachable_kind(),
            }
        })
    }

    /// Removes `key`; `true` if it was present here.
    pub fn map_remove(
        &self,
        ns: &Namespace,
        scope: Scope,
        name: &str,
        key: String,
    ) -> impl Future<Output = StoreResult<bool>> + Send + 'static {
        self.mutate(ns, scope, Kind::Map, name, move |v, _| match v {
            Value::Map(m) => {
                let was = m.contains_key(&key);
                Ok((Value::Map(m.remove(&key)), was))
            }
            _ => unreachable_kind(),
        })
    }

    pub fn map_get(
        &self,
        ns: &Namespace,
        scope: Scope,
        name: &str,
        key: &str,
    ) -> StoreResult<Option<Vec<u8>>> {
        self.read(ns, scope, Kind::Map, name, |v| match v {
            Some(Value::Map(m)) => m.get(key).cloned(),
            _ => None,
        })
    }

    pub fn map_entries(
        &self,
        ns: &Namespace,
        scope: Scope,
        name: &str,
    ) -> StoreResult<Vec<(String, Vec<u8>)>> {
        self.read(ns, scope, Kind::Map, name, |v| match v {
            Some(Value::Map(m)) => m.entries().map(|(k, v)| (k.clone(), v.clone())).collect(),
            _ => Vec::new(),
        })
    }

    pub fn map_keys(&self, ns: &Namespace, scope: Scope, name: &str) -> StoreResult<Vec<String>> {
        self.read(ns, scope, Kind::Map, name, |v| match v {
            Some(Value::Map(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        })
    }

    /// What this node's CRDTs hold about `user` (GDPR export), as
    /// (component, scope, kind, name, entry): every set it is a member of,
    /// every map entry keyed by it and every leaderboard score of it; and
    /// whole, every non-empty CRDT whose name starts with one of the
    /// component's `personal` prefixes (its declared `personal-data.keys`,
    /// user substituted).
    pub fn export_user(
        &self,
        user: &str,
        personal: &[(Namespace, Vec<String>)],
    ) -> StoreResult<Vec<UserCrdtEntry>> {
        let map = self.lock()?;
        let mut out: Vec<UserCrdtEntry> = map
            .iter()
            .filter_map(|((ns, id), slot)| {
                let entry = if is_personal(personal, ns, &id.name) {
                    match &slot.value {
                        Value::Counter(c) if c.value() != 0 => UserCrdtValue::Count(c.value()),
                        Value::Set(s) if !s.is_empty() => {
                            UserCrdtValue::Members(sorted(s.members().cloned()))
                        }
                        Value::Register(r) => {
                            UserCrdtValue::Value(r.get().filter(|v| !v.is_empty())?.clone())
                        }
                        Value::Map(m) if !m.is_empty() => UserCrdtValue::Entries(sorted(
                            m.entries().map(|(k, v)| (k.clone(), v.clone())),
                        )),
                        Value::Leaderboard(b) if b.iter().any(|(_, s)| s != 0) => {
                            UserCrdtValue::Scores(sorted(
                                b.iter()
                                    .filter(|(_, s)| *s != 0)
                                    .map(|(m, s)| (m.to_string(), s)),
                            ))
                        }
                        _ => return None,
                    }
                } else {
                    match &slot.value {
                        Value::Set(s) if s.contains(user) => UserCrdtValue::Member,
                        Value::Map(m) => UserCrdtValue::MapValue(m.get(user)?.clone()),
                        Value::Leaderboard(b) if b.score(user) != 0 => {
                            UserCrdtValue::Score(b.score(user))
                        }
                        _ => return None,
                    }
                };
                Some(UserCrdtEntry {
                    component: ns.as_str().to_string(),
                    scope: id.scope,
                    kind: id.kind,
                    name: id.name.clone(),
                    entry,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.component, a.scope, a.kind, &a.name).cmp(&(&b.component, b.scope, b.kind, &b.name))
        });
        Ok(out)
    }

    /// Erases `user` from every CRDT on this node (GDPR erasure): set
    /// members equal to the user id and map entries keyed by it, in every
    /// component and scope, and this replica's adjustments of a leaderboard
    /// member named by it (leaderboards keep member names). A CRDT whose
    /// name starts with one of the component's `personal` prefixes is
    /// erased whole: every set member and map entry removed, a register
    /// overwritten with empty bytes, this replica's adjustments of a
    /// counter (or of every leaderboard member) cancelled. Cancelling only
    /// its own adjustments is what lets every replica erase at once without
    /// over-correcting: the value reaches 0 when all have (a replica that
    /// no longer runs keeps its part). The CRDT's name stays, as the
    /// state-based CRDTs have no tombstones. Each erasure is an ordinary
    /// mutation, persisted and shipped as a delta, so the other replicas of
    /// region and global CRDTs drop it too. Returns the CRDTs changed;
    /// idempotent.
    pub async fn erase_user(
        &self,
        user: &str,
        personal: &[(Namespace, Vec<String>)],
    ) -> StoreResult<u64> {
        let replica = &self.inner.replica;
        let holding: Vec<(Namespace, Id, bool)> = self
            .lock()?
            .iter()
            .filter_map(|((ns, id), slot)| {
                let whole = is_personal(personal, ns, &id.name);
                holds(&slot.value, replica, user, whole).then(|| (ns.clone(), id.clone(), whole))
            })
            .collect();
        let mut changed = 0;
        for (ns, id, whole) in holding {
            let member = user.to_string();
            let r = replica.clone();
            self.mutate(&ns, id.scope, id.kind, &id.name, move |v, at| {
                Ok((erasure(v, &r, &member, whole, at)?, ()))
            })
            .await?;
            changed += 1;
        }
        Ok(changed)
    }

    /// Adds each `(member, delta)` to the member's score in leaderboard
    /// `category` (negative deltas subtract; a member may appear several
    /// times). All updates are one mutation: one delta shipped, one save,
    /// and on any error (empty or oversized member, more than
    /// [`LEADERBOARD_MAX_UPDATES`] updates, state over `max_state_bytes`)
    /// nothing changes.
    pub fn leaderboard_update(
        &self,
        ns: &Namespace,
        scope: Scope,
        category: &str,
        updates: Vec<(String, i64)>,
    ) -> impl Future<Output = StoreResult<()>> + Send + 'static {
        let r = self.inner.replica.clone();
        let check = self.check_leaderboard_updates(&updates);
        self.mutate(ns, scope, Kind::Leaderboard, category, move |v, _| {
            check?;
            match v {
                Value::Leaderboard(board) => {
                    let mut delta = CounterMap::default();
                    for (member, by) in &updates {
                        delta.merge(&board.apply(&r, member, *by));
                    }
                    Ok((Value::Leaderboard(delta), ()))
                }
                _ => unreachable_kind(),
            }
        })
    }

    /// The `limit` best members of leaderboard `category` as
    /// `(rank, member, score)`: highest score first, ties by member name,
    /// equal scores sharing a rank (1, 2, 2, 4). Empty for a category never
    /// written.
    pub fn leaderboard_top(
        &self,
        ns: &Namespace,
        scope: Scope,
        category: &str,
        limit: u32,
    ) -> StoreResult<Vec<(u32, String, i64)>> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        self.read(ns, scope, Kind::Leaderboard, category, |v| match v {
            Some(Value::Leaderboard(board)) => board.top(limit),
            _ => Vec::new(),
        })
    }

    fn check_leaderboard_updates(&self, updates: &[(String, i64)]) -> StoreResult<()> {
        if updates.len() > LEADERBOARD_MAX_UPDATES {
            return Err(StoreError::Limit(format!(
                "{} leaderboard updates exceed the limit of {LEADERBOARD_MAX_UPDATES} per call",
                updates.len()
            )));
        }
        for (member, _) in updates {
            if member.is_empty() {
                return Err(StoreError::Invalid(
                    "a leaderboard member must not be empty".into(),
                ));
            }
            self.check_key("leaderboard member", member)?;
        }
        Ok(())
    }

    fn check_key(&self, what: &str, s: &str) -> StoreResult<()> {
        if s.len() > self.inner.opts.max_key_bytes {
            return Err(StoreError::Limit(format!(
                "{what} of {} bytes exceeds the limit of {} bytes",
                s.len(),
                self.inner.opts.max_key_bytes
            )));
        }
        Ok(())
    }

    fn check_value(&self, v: &[u8]) -> StoreResult<()> {
        if v.len() > self.inner.opts.max_value_bytes {
            return Err(StoreError::Limit(format!(
                "value of {} bytes exceeds the limit of {} bytes",
                v.len(),
                self.inner.opts.max_value_bytes
            )));
        }
        Ok(())
    }

    fn id(&self, scope: Scope, kind: Kind, name: &str) -> StoreResult<Id> {
        if name.is_empty() {
            return Err(StoreError::Invalid("a CRDT name must not be empty".into()));
        }
        self.check_key("name", name)?;
        Ok(Id {
            scope,
            kind,
            name: name.to_string(),
        })
    }

    fn lock(&self) -> StoreResult<MutexGuard<'_, HashMap<(Namespace, Id), Slot>>> {
        self.inner.replicas.lock().map_err(|_| internal("replica"))
    }

    fn read<R>(
        &self,
        ns: &Namespace,
        scope: Scope,
        kind: Kind,
        name: &str,
        f: impl FnOnce(Option<&Value>) -> R,
    ) -> StoreResult<R> {
        let key = (ns.clone(), self.id(scope, kind, name)?);
        let map = self.lock()?;
        Ok(f(map.get(&key).map(|s| &s.value)))
    }

    /// Applies `f` to the replica (creating it empty), queues the save of the
    /// new full state and, once it is durable, the delta for shipping.
    /// `f` gets a function that stamps an HLC timestamp.
    fn mutate<R: Send + 'static>(
        &self,
        ns: &Namespace,
        scope: Scope,
        kind: Kind,
        name: &str,
        f: impl FnOnce(&mut Value, &dyn Fn() -> StoreResult<Hlc>) -> StoreResult<(Value, R)>,
    ) -> impl Future<Output = StoreResult<R>> + Send + 'static {
        let staged = self.stage(ns, scope, kind, name, f);
        let this = self.clone();
        async move {
            let (ns, id, save, delta, r) = staged?;
            let saved = save.await;
            this.finish_save(&ns, &id, saved.is_ok());
            saved?;
            if id.scope != Scope::Edge {
                this.enqueue(Outgoing::Delta { ns, id, delta });
            }
            Ok(r)
        }
    }

    #[allow(clippy::type_complexity)]
    fn stage<R>(
        &self,
        ns: &Namespace,
        scope: Scope,
        kind: Kind,
        name: &str,
        f: impl FnOnce(&mut Value, &dyn Fn() -> StoreResult<Hlc>) -> StoreResult<(Value, R)>,
    ) -> StoreResult<(Namespace, Id, keel_store::WriteFuture<()>, Value, R)> {
        let id = self.id(scope, kind, name)?;
        let key = (ns.clone(), id);
        let mut map = self.lock()?;
        let current = match map.get(&key) {
            Some(slot) if slot.poisoned => {
                return Err(StoreError::Unavailable(
                    "an earlier write of this CRDT failed to persist; retry shortly".into(),
                ));
            }
            Some(slot) => slot.value.clone(),
            None => Value::empty(kind),
        };
        // Mutate a copy: a refused write (bad input, over the limit)
        // changes nothing, not even by creating an empty replica.
        let mut next = current;
        let stamp = || self.stamp();
        let (delta, r) = f(&mut next, &stamp)?;
        let bytes = keel_crdt::encode(&next);
        if bytes.len() > self.inner.opts.max_state_bytes {
            return Err(StoreError::Limit(format!(
                "CRDT {:?} would grow to {} bytes, over the limit of {} bytes",
                name,
                bytes.len(),
                self.inner.opts.max_state_bytes
            )));
        }
        let slot = map.entry(key.clone()).or_insert_with(|| Slot {
            value: Value::empty(kind),
            digest: 0,
            pending_saves: 0,
            poisoned: false,
        });
        slot.digest = keel_crdt::digest_encoded(&bytes);
        slot.value = next;
        slot.pending_saves += 1;
        // Queued under the lock: saves of one CRDT commit in mutation order.
        let save = self.inner.store.save_crdt(ns, key.1.encode(), bytes);
        Ok((key.0, key.1, save, delta, r))
    }

    fn stamp(&self) -> StoreResult<Hlc> {
        let mut clock = self.inner.clock.lock().map_err(|_| internal("clock"))?;
        clock
            .now(now_ms())
            .map_err(|e| StoreError::Internal(e.to_string()))
    }

    /// Bookkeeping after a save; reloads a poisoned replica from disk once
    /// nothing is in flight.
    fn finish_save(&self, ns: &Namespace, id: &Id, ok: bool) {
        if !ok {
            self.inner.metrics.persist_failures.inc();
        }
        let Ok(mut map) = self.inner.replicas.lock() else {
            return;
        };
        let key = (ns.clone(), id.clone());
        let Some(slot) = map.get_mut(&key) else {
            return;
        };
        slot.pending_saves = slot.pending_saves.saturating_sub(1);
        slot.poisoned |= !ok;
        if slot.poisoned && slot.pending_saves == 0 {
            let disk = self
                .inner
                .store
                .load_crdt(ns, &id.encode())
                .and_then(|b| match b {
                    Some(b) => keel_crdt::decode::<Value>(&b)
                        .map_err(|e| StoreError::Internal(e.to_string())),
                    None => Ok(Value::empty(id.kind)),
                });
            match disk {
                Ok(v) => {
                    slot.digest = keel_crdt::digest(&v);
                    slot.value = v;
                    slot.poisoned = false;
                }
                Err(e) => tracing::warn!(error = %e, name = %id.name, "reloading a CRDT failed"),
            }
        }
    }

    fn enqueue(&self, msg: Outgoing) {
        if self.inner.outgoing.try_send(msg).is_err() {
            self.inner.metrics.dropped.inc();
        }
    }

    /// Merges a replica received from another node and persists it.
    fn apply_remote(&self, ns: Namespace, id: Id, value: Value) {
        if value.kind() != id.kind {
            self.inner.metrics.rejected.inc();
            return;
        }
        if let Some(ts) = value.max_timestamp() {
            let observed = self
                .inner
                .clock
                .lock()
                .map_err(|_| ())
                .and_then(|mut c| c.observe(&ts, now_ms()).map_err(|_| ()));
            if observed.is_err() {
                // A clock too far ahead would make its writes win for as long
                // as it is ahead; refuse them until our clock catches up
                // (anti-entropy offers them again).
                self.inner.metrics.rejected.inc();
                tracing::warn!(origin = %ts.node, name = %id.name, "refused a CRDT write from a clock too far ahead");
                return;
            }
        }
        self.inner.metrics.deltas_received.inc();
        let save = {
            let Ok(mut map) = self.lock() else { return };
            let key = (ns.clone(), id.clone());
            let slot = map.entry(key).or_insert_with(|| Slot {
                value: Value::empty(id.kind),
                digest: keel_crdt::digest(&Value::empty(id.kind)),
                pending_saves: 0,
                poisoned: false,
            });
            let mut next = slot.value.clone();
            next.merge(&value);
            if next == slot.value {
                return;
            }
            let bytes = keel_crdt::encode(&next);
            let digest = keel_crdt::digest_encoded(&bytes);
            slot.value = next;
            slot.digest = digest;
            slot.pending_saves += 1;
            self.inner.store.save_crdt(&ns, id.encode(), bytes)
        };
        self.inner.remote_changes.notify_waiters();
        let this = self.clone();
        tokio::spawn(async move {
            let ok = save.await.is_ok();
            this.finish_save(&ns, &id, ok);
        });
    }

    /// Digests of every replicated CRDT, grouped per (scope, component).
    fn digests(&self) -> Vec<(Scope, Namespace, Digest)> {
        let Ok(map) = self.inner.replicas.lock() else {
            return Vec::new();
        };
        let mut groups: HashMap<(Scope, Namespace), Digest> = HashMap::new();
        for ((ns, id), slot) in map.iter() {
            if id.scope != Scope::Edge {
                groups
                    .entry((id.scope, ns.clone()))
                    .or_default()
                    .push((id.clone(), slot.digest));
            }
        }
        groups
            .into_iter()
            .map(|((scope, ns), mut v)| {
                v.sort();
                (scope, ns, v)
            })
            .collect()
    }

    /// Compares another replica's digest (one chunk of it) with ours: pushes
    /// what differs or it lacks, asks for what differs or we lack.
    fn compare_digest(&self, ns: Namespace, scope: Scope, theirs: Digest, range: &DigestRange) {
        let mut push = Vec::new();
        let mut need = Vec::new();
        {
            let Ok(map) = self.inner.replicas.lock() else {
                return;
            };
            let mut seen = std::collections::HashSet::new();
            for (id, digest) in theirs {
                if id.scope != scope {
                    continue;
                }
                match map.get(&(ns.clone(), id.clone())) {
                    Some(slot) if slot.digest == digest => {}
                    // Both sides may hold what the other lacks: push ours
                    // and ask for theirs, so one round repairs both.
                    Some(_) => {
                        push.push(id.clone());
                        need.push(id.clone());
                    }
                    None => need.push(id.clone()),
                }
                seen.insert(id);
            }
            for (n, id) in map.keys() {
                if *n == ns && id.scope == scope && range.covers(id) && !seen.contains(id) {
                    push.push(id.clone());
                }
            }
        }
        for id in push {
            self.enqueue(Outgoing::Full { ns: ns.clone(), id });
        }
        if !need.is_empty() {
            self.enqueue(Outgoing::Need {
                ns,
                scope,
                ids: need,
            });
        }
    }

    fn full_state(&self, ns: &Namespace, id: &Id) -> Option<Value> {
        let map = self.inner.replicas.lock().ok()?;
        map.get(&(ns.clone(), id.clone())).map(|s| s.value.clone())
    }

    /// Triggers an anti-entropy round now.
    pub fn anti_entropy(&self) {
        self.enqueue(Outgoing::Digest);
    }
}

fn unreachable_kind<T>() -> StoreResult<T> {
    // The slot's kind is part of its key, so this cannot happen.
    Err(StoreError::Internal("CRDT kind mismatch".into()))
}

/// The next connection state of `events`; `None` once its bus is gone;
/// pending forever without a receiver.
async fn changed_or_never(
    events: Option<&mut tokio::sync::watch::Receiver<ConnectionState>>,
) -> Option<ConnectionState> {
    match events {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(*rx.borrow_and_update()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// Runs anti-entropy every interval, at start and after every reconnect.
async fn anti_entropy_timer(weak: Weak<Inner>, buses: Buses) {
    let mut events = buses.region.connection_events();
    // With one bus for both scopes, one watch is enough (two receivers of
    // the same channel would run anti-entropy twice per reconnect).
    let mut global_events = (!buses.is_single()).then(|| buses.global.connection_events());
    let Some(interval) = weak.upgrade().map(|i| i.opts.anti_entropy_interval) else {
        return;
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = tokio::select! {
            _ = tick.tick() => true,
            changed = events.changed() => {
                if changed.is_err() {
                    return;
                }
                *events.borrow_and_update() == ConnectionState::Connected
            }
            changed = changed_or_never(global_events.as_mut()) => match changed {
                Some(state) => state == ConnectionState::Connected,
                None => return,
            },
        };
        let Some(inner) = weak.upgrade() else { return };
        if now {
            Sync { inner }.anti_entropy();
        }
    }
}

/// Subject of a scope's sync traffic for one component.
fn subject(region: &str, scope: Scope, ns: &Namespace) -> Option<String> {
    match scope {
        Scope::Edge => None,
        Scope::Region => Some(format!("keel.{region}.crdt.{}", ns.as_str())),
        Scope::Global => Some(format!("keel.global.crdt.{}", ns.as_str())),
    }
}

/// Whether CRDT `name` of `ns` is personal data as a whole (its name starts
/// with one of the component's declared prefixes, user substituted).
fn is_personal(personal: &[(Namespace, Vec<String>)], ns: &Namespace, name: &str) -> bool {
    personal
        .iter()
        .any(|(n, prefixes)| n == ns && prefixes.iter().any(|p| name.starts_with(p.as_str())))
}

/// Whether [`erasure`] would change `v` (see [`Sync::erase_user`]).
fn holds(v: &Value, replica: &ReplicaId, user: &str, whole: bool) -> bool {
    let own = |c: &PnCounter| c.increments().count_of(replica) != c.decrements().count_of(replica);
    match (v, whole) {
        (Value::Counter(c), true) => own(c),
        (Value::Set(s), true) => !s.is_empty(),
        (Value::Register(r), true) => r.get().is_some_and(|v| !v.is_empty()),
        (Value::Map(m), true) => !m.is_empty(),
        (Value::Leaderboard(b), true) => b.iter().any(|(m, _)| b.counter(m).is_some_and(own)),
        (Value::Set(s), false) => s.contains(user),
        (Value::Map(m), false) => m.contains_key(user),
        (Value::Leaderboard(b), false) => b.counter(user).is_some_and(own),
        (Value::Counter(_) | Value::Register(_), false) => false,
    }
}

/// Erases `user` from `v` (whole, or the user's member, entry or score;
/// see [`Sync::erase_user`]); returns the delta.
fn erasure(
    v: &mut Value,
    replica: &ReplicaId,
    user: &str,
    whole: bool,
    at: &dyn Fn() -> StoreResult<Hlc>,
) -> StoreResult<Value> {
    let delta = match (v, whole) {
        (Value::Counter(c), true) => Value::Counter(c.cancel_own(replica)),
        (Value::Set(s), true) => {
            let members: Vec<String> = s.members().cloned().collect();
            let mut d = OrSet::default();
            members.iter().for_each(|m| d.merge(&s.remove(m)));
            Value::Set(d)
        }
        (Value::Register(r), true) => Value::Register(r.set(Vec::new(), at()?)),
        (Value::Map(m), true) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let mut d = LwwMap::default();
            keys.iter().for_each(|k| d.merge(&m.remove(k)));
            Value::Map(d)
        }
        (Value::Leaderboard(b), true) => {
            let members: Vec<String> = b.iter().map(|(m, _)| m.to_string()).collect();
            let mut d = CounterMap::default();
            members
                .iter()
                .for_each(|m| d.merge(&b.cancel_own(replica, m)));
            Value::Leaderboard(d)
        }
        (Value::Set(s), false) => Value::Set(s.remove(user)),
        (Value::Map(m), false) => Value::Map(m.remove(user)),
        (Value::Leaderboard(b), false) => Value::Leaderboard(b.cancel_own(replica, user)),
        (other, false) => Value::empty(other.kind()),
    };
    Ok(delta)
}

fn sorted<T: Ord>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = items.collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kinds are in every store key and values in every stored state:
    /// encodings written before `Leaderboard` existed must stay valid.
    #[test]
    fn appended_kinds_keep_older_encodings_valid() {
        let kinds = [
            Kind::Counter,
            Kind::Set,
            Kind::Register,
            Kind::Map,
            Kind::Leaderboard,
        ];
        for (i, kind) in kinds.into_iter().enumerate() {
            assert_eq!(
                keel_crdt::encode(&kind),
                [keel_crdt::FORMAT_VERSION, i as u8]
            );
            let empty = Value::empty(kind);
            assert_eq!(empty.kind(), kind);
            assert_eq!(keel_crdt::encode(&empty)[1], i as u8);
            let back: Value = keel_crdt::decode(&keel_crdt::encode(&empty)).unwrap();
            assert_eq!(back, empty);
        }
        let id = Id {
            scope: Scope::Region,
            kind: Kind::Map,
            name: "m".into(),
        };
        assert_eq!(id.encode(), [keel_crdt::FORMAT_VERSION, 1, 3, 1, b'm']);
        // An existing kind's value does not merge into a leaderboard.
        let mut board = Value::empty(Kind::Leaderboard);
        assert!(!board.merge(&Value::empty(Kind::Counter)));
        assert!(board.max_timestamp().is_none());
    }
}
