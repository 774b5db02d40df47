//! The hierarchical cache (DESIGN §5 "Hierarchical cache"), behind the
//! guest `cache` interface and `edge-operations.update-local-cache`.
//!
//! - **L1**: this process (moka): bounded by bytes, a TTL per entry.
//! - **L2**: the region's KV bucket (`KEEL_<REGION>_CACHE`, on the region's
//!   cluster, in its residency zone's account).
//! - **L3**: the global KV bucket (`KEEL_GLOBAL_CACHE`, `GLOBAL` account).
//!
//! Reads go L1 → L2 → L3 → the component's loader and fill the levels above
//! the one that answered; concurrent misses of one key share one lookup
//! (single flight). Writes go through from the lowest level of the chosen
//! scope up to L1 (no write-behind). Entries are per component: every key is
//! stored under the component's namespace, in every level.
//!
//! Invariants:
//! - A level is written only after every level below it (of the scope)
//!   accepted the write, so an upper level never holds what a lower one
//!   refused.
//! - L1 never keeps a value read from a lower level if an invalidation ran
//!   on this node while it was being read (the invalidation generation).
//! - An L1 entry that came from L2 or L3 (or was written at region or global
//!   scope) is served only while the bus connections it could be invalidated
//!   over are the ones it was filled under ([`keel_bus::Bus::connection_epoch`]):
//!   a node that lost its connection may have missed invalidations, so it
//!   forgets those entries instead of serving them after the reconnect.
//! - L2/L3 entries carry their expiry time (wall clock of the writer):
//!   JetStream KV expires whole buckets, not entries. The buckets' own
//!   `max_age` (the longest TTL accepted) collects what nobody reads again.
//!
//! Invalidation: `edge` drops this node's L1; `region` deletes from L2, drops
//! L1 here and publishes on `keel.<region>.cache.invalidate` (every node of
//! the region drops L1); `global` deletes from L3 and this region's L2 and
//! publishes on `keel.global.cache.invalidate`: every node drops L1 at once,
//! and one node per region (queue group `keel-cache-<region>`) deletes the
//! key from its region's L2, then tells its region to drop L1 again (a node
//! may have refilled L1 from that L2 in between).

use async_trait::async_trait;
use bytes::Bytes;
use keel_bus::{Bus, KvSpec};
use keel_store::Namespace;
use keel_telemetry::{CacheLevelMetrics, CacheMetrics};
use moka::Expiry;
use moka::notification::RemovalCause;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default time to live per level when a caller does not choose one.
pub const DEFAULT_TTLS: LevelTtls = LevelTtls {
    l1: Duration::from_secs(300),
    l2: Duration::from_secs(900),
    l3: Duration::from_secs(3600),
};

/// Time to live per level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelTtls {
    pub l1: Duration,
    pub l2: Duration,
    pub l3: Duration,
}

/// Which levels a write or invalidation reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// L1 of this node.
    Edge,
    /// L2 and L1 of every node of the region.
    Region,
    /// Every level everywhere.
    Global,
}

/// What `invalidate` drops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    Key(String),
    Prefix(String),
}

/// Why a cache call failed. Nothing was changed unless it says so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Limit(String),
    /// A level below L1 could not be reached (partition, bucket missing).
    #[error("{0}")]
    Unavailable(String),
}

/// A value a component's loader produced after a miss everywhere; written
/// through like `set` before the read returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub value: Vec<u8>,
    pub ttl: Option<Duration>,
    pub scope: Scope,
}

/// A component's `cache-loader` export.
#[async_trait]
pub trait Loader: Send + Sync {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, CacheError>;
}

/// Limits and defaults (`[infrastructure] cache` in keel.toml).
#[derive(Debug, Clone)]
pub struct CacheOptions {
    pub region: String,
    pub edge: String,
    /// Bytes of keys and values L1 holds at most.
    pub l1_max_bytes: u64,
    pub default_ttls: LevelTtls,
    /// Longest TTL a caller may ask for (and the buckets' `max_age`).
    pub max_ttl: Duration,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// The region's bucket (L2) on the region's bus; `None` when
    /// regions.toml says `cache_tier = "none"` (then L1 and L3 only).
    pub region_bucket: Option<KvSpec>,
    /// The global bucket (L3) on the global bus.
    pub global_bucket: KvSpec,
    /// Per component, its `personal-data.keys` templates: a write of such a
    /// key to L2/L3 first erases the value it replaces, so no superseded
    /// copy of a user's data stays in the buckets' files (GDPR).
    pub personal_keys: BTreeMap<String, Vec<String>>,
}

/// The subject of region-scope invalidations in `region`.
pub fn region_invalidation_subject(region: &str) -> String {
    format!("keel.{region}.cache.invalidate")
}

/// The subject of global-scope invalidations.
pub const GLOBAL_INVALIDATION_SUBJECT: &str = "keel.global.cache.invalidate";

/// An invalidation as it travels on the bus (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Invalidation {
    component: String,
    target: Target,
    scope: Scope,
    region: String,
    edge: String,
}

type L1Key = (Namespace, String);

/// Where an L1 entry's value came from, and the bus epochs it was read
/// under (see the crate invariants).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Edge,
    Remote {
        region_epoch: u64,
        global_epoch: u64,
    },
}

#[derive(Clone)]
struct L1Entry {
    value: Arc<[u8]>,
    ttl: Duration,
    origin: Origin,
}

struct PerEntryTtl;

impl Expiry<L1Key, L1Entry> for PerEntryTtl {
    fn expire_after_create(&self, _: &L1Key, value: &L1Entry, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _: &L1Key,
        value: &L1Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Version byte of an L2/L3 value: `[1][expires-at ms, u64 BE][value]`.
const ENVELOPE_V1: u8 = 1;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn envelope(value: &[u8], ttl: Duration, now_ms: u64) -> Bytes {
    let expires = now_ms.saturating_add(ttl.as_millis() as u64);
    let mut out = Vec::with_capacity(9 + value.len());
    out.push(ENVELOPE_V1);
    out.extend_from_slice(&expires.to_be_bytes());
    out.extend_from_slice(value);
    out.into()
}

/// What an L2/L3 entry says at `now_ms`.
#[derive(Debug, PartialEq, Eq)]
enum Stored {
    Live {
        value: Bytes,
        remaining: Duration,
    },
    Expired,
    /// Not written by this version of Keel; treated as a miss.
    Unreadable,
}

fn open_envelope(bytes: &Bytes, now_ms: u64) -> Stored {
    if bytes.len() < 9 || bytes[0] != ENVELOPE_V1 {
        return Stored::Unreadable;
    }
    let mut expires = [0u8; 8];
    expires.copy_from_slice(&bytes[1..9]);
    let expires = u64::from_be_bytes(expires);
    if expires <= now_ms {
        return Stored::Expired;
    }
    Stored::Live {
        value: bytes.slice(9..),
        remaining: Duration::from_millis(expires - now_ms),
    }
}

/// The key of a component's entry in L2/L3: `<component>.k<hex of key>`.
/// Hex keeps any key inside JetStream's key alphabet and keeps prefixes:
/// the tier key of a prefix is a prefix of the tier keys it covers.
fn tier_key(ns: &Namespace, key: &str) -> String {
    format!("{}.k{}", ns.as_str(), hex::encode(key))
}

/// L2 or L3: a KV bucket, created on first use.
struct Tier {
    name: &'static str,
    bus: Arc<dyn Bus>,
    spec: KvSpec,
    ready: AtomicBool,
    default_ttl: Duration,
    metrics: CacheLevelMetrics,
}

impl Tier {
    async fn ensure(&self) -> Result<(), CacheError> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        self.bus
            .ensure_kv(&self.spec)
            .await
            .map_err(|e| self.unavailable(e))?;
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    fn unavailable(&self, e: keel_bus::BusError) -> CacheError {
        CacheError::Unavailable(format!("cache {} ({}): {e}", self.name, self.spec.bucket))
    }

    async fn get(&self, key: &str) -> Result<Option<(Bytes, Duration)>, CacheError> {
        self.ensure().await?;
        let entry = self
            .bus
            .kv_get(&self.spec.bucket, key)
            .await
            .map_err(|e| self.unavailable(e))?;
        let Some(value) = entry.and_then(|e| e.value) else {
            return Ok(None);
        };
        Ok(match open_envelope(&value, now_ms()) {
            Stored::Live { value, remaining } => Some((value, remaining)),
            Stored::Expired => {
                self.metrics.evictions.inc();
                None
            }
            Stored::Unreadable => None,
        })
    }

    /// Writes `key`; `erase_first` overwrites the value it replaces in
    /// place first (a bucket keeps one revision, and the one a put
    /// supersedes leaves only the index, not the files).
    async fn put(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        erase_first: bool,
    ) -> Result<(), CacheError> {
        self.ensure().await?;
        if erase_first {
            self.bus
                .kv_erase(&self.spec.bucket, key)
                .await
                .map_err(|e| self.unavailable(e))?;
        }
        self.bus
            .kv_put(&self.spec.bucket, key, envelope(value, ttl, now_ms()))
            .await
            .map(|_| ())
            .map_err(|e| self.unavailable(e))
    }

    /// Deletes a key, or every key under a prefix, of one component.
    async fn delete(&self, ns: &Namespace, target: &Target) -> Result<(), CacheError> {
        self.ensure().await?;
        let keys = match target {
            Target::Key(k) => vec![tier_key(ns, k)],
            Target::Prefix(p) => {
                let prefix = tier_key(ns, p);
                self.bus
                    .kv_keys(&self.spec.bucket)
                    .await
                    .map_err(|e| self.unavailable(e))?
                    .into_iter()
                    .filter(|k| k.starts_with(&prefix))
                    .collect()
            }
        };
        // Erased, not only deleted: the value leaves the bucket's files
        // too, so an invalidation is also a GDPR erasure of the entry.
        for k in keys {
            self.bus
                .kv_erase(&self.spec.bucket, &k)
                .await
                .map_err(|e| self.unavailable(e))?;
        }
        self.metrics.invalidations.inc();
        Ok(())
    }
}

/// Snapshot taken before a lookup below L1 (see the crate invariants).
#[derive(Clone, Copy)]
struct Stamp {
    generation: u64,
    origin: Origin,
}

type Flight = Arc<tokio::sync::OnceCell<Result<Option<Arc<[u8]>>, CacheError>>>;

struct Inner {
    opts: CacheOptions,
    l1: moka::sync::Cache<L1Key, L1Entry>,
    l2: Option<Tier>,
    l3: Tier,
    region_bus: Arc<dyn Bus>,
    global_bus: Arc<dyn Bus>,
    /// Bumped by every L1 invalidation and write on this node.
    generation: AtomicU64,
    flights: Mutex<HashMap<L1Key, Flight>>,
    metrics: CacheMetrics,
}

/// The node's cache. Cheap to clone.
#[derive(Clone)]
pub struct TieredCache {
    inner: Arc<Inner>,
}

impl TieredCache {
    /// A cache whose L2 is on `region_bus` and L3 on `global_bus` (the same
    /// bus on a node without `regions.toml`). Call [`TieredCache::start`] to
    /// receive other nodes' invalidations.
    pub fn new(
        opts: CacheOptions,
        region_bus: Arc<dyn Bus>,
        global_bus: Arc<dyn Bus>,
        metrics: CacheMetrics,
    ) -> TieredCache {
        let evictions = metrics.l1.evictions.clone();
        let l1 = moka::sync::Cache::builder()
            .max_capacity(opts.l1_max_bytes)
            .weigher(|k: &L1Key, v: &L1Entry| {
                (k.1.len() + v.value.len() + 64)
                    .try_into()
                    .unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .support_invalidation_closures()
            .eviction_listener(move |_, _, cause| {
                if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    evictions.inc();
                }
            })
            .build();
        let tier = |name, bus, spec: &KvSpec, default_ttl, metrics: &CacheLevelMetrics| Tier {
            name,
            bus,
            spec: spec.clone(),
            ready: AtomicBool::new(false),
            default_ttl,
            metrics: metrics.clone(),
        };
        TieredCache {
            inner: Arc::new(Inner {
                l2: opts.region_bucket.as_ref().map(|spec| {
                    tier(
                        "L2",
                        region_bus.clone(),
                        spec,
                        opts.default_ttls.l2,
                        &metrics.l2,
                    )
                }),
                l3: tier(
                    "L3",
                    global_bus.clone(),
                    &opts.global_bucket,
                    opts.default_ttls.l3,
                    &metrics.l3,
                ),
                opts,
                l1,
                region_bus,
                global_bus,
                generation: AtomicU64::new(0),
                flights: Mutex::new(HashMap::new()),
                metrics,
            }),
        }
    }

    /// Creates the buckets (retrying until the bus allows it) and receives
    /// other nodes' invalidations, on `rt`.
    pub fn start(&self, rt: &tokio::runtime::Handle) {
        let me = self.clone();
        rt.spawn(async move {
            for tier in me.inner.l2.iter().chain([&me.inner.l3]) {
                let mut backoff = Duration::from_millis(100);
                while let Err(e) = tier.ensure().await {
                    tracing::debug!("{e}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        });
        let region_subject = region_invalidation_subject(&self.inner.opts.region);
        let queue = format!("keel-cache-{}", self.inner.opts.region);
        for (bus, subject, queue) in [
            (self.inner.region_bus.clone(), region_subject, None),
            (
                self.inner.global_bus.clone(),
                GLOBAL_INVALIDATION_SUBJECT.to_string(),
                None,
            ),
            (
                self.inner.global_bus.clone(),
                GLOBAL_INVALIDATION_SUBJECT.to_string(),
                Some(queue),
            ),
        ] {
            let me = self.clone();
            rt.spawn(async move { me.receive(bus, subject, queue).await });
        }
    }

    async fn receive(self, bus: Arc<dyn Bus>, subject: String, queue: Option<String>) {
        let mut backoff = Duration::from_millis(100);
        let mut sub = loop {
            match bus.subscribe(&subject, queue.as_deref()).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::debug!(%subject, "cache invalidations: {e}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        while let Some(msg) = sub.next().await {
            let Ok(inv) = serde_json::from_slice::<Invalidation>(&msg.payload) else {
                tracing::warn!(%subject, "undecodable cache invalidation ignored");
                continue;
            };
            let Some(ns) = Namespace::new(&inv.component) else {
                continue;
            };
            if queue.is_some() {
                self.apply_global_in_region(&ns, inv).await;
            } else if inv.edge != self.inner.opts.edge {
                self.drop_l1(&ns, &inv.target);
            }
        }
    }

    /// The region's share of a global invalidation: its L2, then every
    /// node's L1 in the region (one node per region runs this).
    async fn apply_global_in_region(&self, ns: &Namespace, inv: Invalidation) {
        if inv.region == self.inner.opts.region {
            return; // the origin already did it
        }
        if let Some(l2) = &self.inner.l2
            && let Err(e) = l2.delete(ns, &inv.target).await
        {
            l2.metrics.errors.inc();
            tracing::warn!("global cache invalidation not applied to this region's L2: {e}");
        }
        self.drop_l1(ns, &inv.target);
        let _ = self
            .publish(&Invalidation {
                scope: Scope::Region,
                edge: self.inner.opts.edge.clone(),
                ..inv
            })
            .await;
    }

    async fn publish(&self, inv: &Invalidation) -> Result<(), CacheError> {
        let (bus, subject) = match inv.scope {
            Scope::Edge => return Ok(()),
            Scope::Region => (
                &self.inner.region_bus,
                region_invalidation_subject(&self.inner.opts.region),
            ),
            Scope::Global => (
                &self.inner.global_bus,
                GLOBAL_INVALIDATION_SUBJECT.to_string(),
            ),
        };
        let payload = serde_json::to_vec(inv).expect("invalidations serialize");
        bus.publish(&subject, Vec::new(), payload.into())
            .await
            .map_err(|e| CacheError::Unavailable(format!("publishing the invalidation: {e}")))
    }

    fn check_key(&self, what: &str, key: &str, empty_ok: bool) -> Result<(), CacheError> {
        if key.is_empty() && !empty_ok {
            return Err(CacheError::Invalid(format!("{what} must not be empty")));
        }
        let max = self.inner.opts.max_key_bytes;
        if key.len() > max {
            return Err(CacheError::Limit(format!(
                "{what} is {} bytes; the limit is {max}",
                key.len()
            )));
        }
        Ok(())
    }

    /// The levels below L1 that `scope` reaches, lowest first.
    fn levels_below_l1(&self, scope: Scope) -> Vec<&Tier> {
        let l2 = self.inner.l2.as_ref();
        match scope {
            Scope::Edge => vec![],
            Scope::Region => l2.into_iter().collect(),
            Scope::Global => std::iter::once(&self.inner.l3).chain(l2).collect(),
        }
    }

    fn stamp(&self) -> Stamp {
        Stamp {
            generation: self.inner.generation.load(Ordering::Acquire),
            origin: Origin::Remote {
                region_epoch: self.inner.region_bus.connection_epoch(),
                global_epoch: self.inner.global_bus.connection_epoch(),
            },
        }
    }

    /// Whether an L1 entry may still be served (see the crate invariants).
    fn current(&self, origin: Origin) -> bool {
        match origin {
            Origin::Edge => true,
            Origin::Remote {
                region_epoch,
                global_epoch,
            } => {
                region_epoch == self.inner.region_bus.connection_epoch()
                    && global_epoch == self.inner.global_bus.connection_epoch()
            }
        }
    }

    fn l1_get(&self, ns: &Namespace, key: &str) -> Option<Arc<[u8]>> {
        let k = (ns.clone(), key.to_string());
        let entry = self.inner.l1.get(&k)?;
        if self.current(entry.origin) {
            Some(entry.value)
        } else {
            self.inner.l1.invalidate(&k);
            None
        }
    }

    /// Puts a value read below L1 into L1, unless an invalidation ran on
    /// this node since `stamp` (then the value may be one it dropped).
    fn fill_l1(&self, ns: &Namespace, key: &str, value: Arc<[u8]>, ttl: Duration, stamp: Stamp) {
        let k = (ns.clone(), key.to_string());
        self.inner.l1.insert(
            k.clone(),
            L1Entry {
                value,
                ttl: ttl.min(self.inner.opts.default_ttls.l1),
                origin: stamp.origin,
            },
        );
        if self.inner.generation.load(Ordering::Acquire) != stamp.generation {
            self.inner.l1.invalidate(&k);
        }
    }

    fn drop_l1(&self, ns: &Namespace, target: &Target) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        match target {
            Target::Key(k) => self.inner.l1.invalidate(&(ns.clone(), k.clone())),
            Target::Prefix(p) => {
                let (ns, p) = (ns.clone(), p.clone());
                self.inner
                    .l1
                    .invalidate_entries_if(move |k, _| k.0 == ns && k.1.starts_with(p.as_str()))
                    .expect("the L1 cache supports invalidation closures");
            }
        }
        self.inner.metrics.l1.invalidations.inc();
    }

    /// Looks `key` up in L1, L2, L3, then asks `loader` (a component's
    /// export), filling the levels above the one that answered. A level
    /// that cannot be reached counts as a miss.
    pub async fn get(
        &self,
        ns: &Namespace,
        key: &str,
        loader: Option<&dyn Loader>,
    ) -> Result<Option<Arc<[u8]>>, CacheError> {
        self.check_key("key", key, false)?;
        if let Some(v) = self.l1_get(ns, key) {
            self.inner.metrics.l1.hits.inc();
            return Ok(Some(v));
        }
        self.inner.metrics.l1.misses.inc();
        let k = (ns.clone(), key.to_string());
        let flight = self
            .inner
            .flights
            .lock()
            .expect("flights lock")
            .entry(k.clone())
            .or_default()
            .clone();
        let result = flight
            .get_or_init(|| self.lookup_below_l1(ns, key, loader))
            .await
            .clone();
        let mut flights = self.inner.flights.lock().expect("flights lock");
        if flights.get(&k).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(&k);
        }
        result
    }

    /// Like [`TieredCache::get`] without a loader and outside the single
    /// flight: for a component's loader itself, whose own lookup of the key
    /// it is loading would otherwise wait for itself.
    pub async fn get_without_loader(
        &self,
        ns: &Namespace,
        key: &str,
    ) -> Result<Option<Arc<[u8]>>, CacheError> {
        self.check_key("key", key, false)?;
        if let Some(v) = self.l1_get(ns, key) {
            self.inner.metrics.l1.hits.inc();
            return Ok(Some(v));
        }
        self.inner.metrics.l1.misses.inc();
        self.lookup_below_l1(ns, key, None).await
    }

    async fn lookup_below_l1(
        &self,
        ns: &Namespace,
        key: &str,
        loader: Option<&dyn Loader>,
    ) -> Result<Option<Arc<[u8]>>, CacheError> {
        let stamp = self.stamp();
        let tk = tier_key(ns, key);
        let l2 = self.inner.l2.as_ref();
        let levels = l2
            .map(|l2| (l2, None))
            .into_iter()
            .chain([(&self.inner.l3, l2)]);
        for (tier, fill) in levels {
            match tier.get(&tk).await {
                Ok(Some((value, remaining))) => {
                    tier.metrics.hits.inc();
                    if let Some(below) = fill
                        && let Err(e) = below
                            .put(&tk, &value, remaining, self.is_personal(ns, key))
                            .await
                    {
                        below.metrics.errors.inc();
                        tracing::debug!("filling {}: {e}", below.name);
                    }
                    let value: Arc<[u8]> = value.as_ref().into();
                    self.fill_l1(ns, key, value.clone(), remaining, stamp);
                    return Ok(Some(value));
                }
                Ok(None) => {
                    tier.metrics.misses.inc();
                }
                Err(e) => {
                    tier.metrics.misses.inc();
                    tier.metrics.errors.inc();
                    tracing::debug!("{e}; counted as a miss");
                }
            }
        }
        let Some(loader) = loader else {
            return Ok(None);
        };
        let m = &self.inner.metrics;
        m.loads.inc();
        let started = Instant::now();
        let loaded = loader.load(key).await;
        m.load_duration.observe(started.elapsed().as_secs_f64());
        match loaded {
            Ok(Some(l)) => {
                let value: Arc<[u8]> = l.value.as_slice().into();
                // The value is the caller's answer even if a level below L1
                // cannot take it now; `set` then leaves L1 alone too.
                if let Err(e) = self.set(ns, key, l.value, l.ttl, l.scope).await {
                    tracing::debug!("writing a loaded cache entry through: {e}");
                    if matches!(e, CacheError::Invalid(_) | CacheError::Limit(_)) {
                        m.load_errors.inc();
                        return Err(CacheError::Invalid(format!(
                            "cache-loader returned an entry set refuses: {e}"
                        )));
                    }
                }
                Ok(Some(value))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                m.load_errors.inc();
                Err(e)
            }
        }
    }

    /// Writes `value` to the levels of `scope`, lowest first. `ttl` of
    /// `None` takes each level's default.
    pub async fn set(
        &self,
        ns: &Namespace,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
        scope: Scope,
    ) -> Result<(), CacheError> {
        self.check_key("key", key, false)?;
        let max = self.inner.opts.max_value_bytes;
        if value.len() > max {
            return Err(CacheError::Limit(format!(
                "value is {} bytes; the limit is {max}",
                value.len()
            )));
        }
        if let Some(ttl) = ttl {
            let max = self.inner.opts.max_ttl;
            if ttl < Duration::from_secs(1) || ttl > max {
                return Err(CacheError::Invalid(format!(
                    "ttl-seconds must be 1 to {}",
                    max.as_secs()
                )));
            }
        }
        let stamp = self.stamp();
        let tk = tier_key(ns, key);
        let lower = self.levels_below_l1(scope);
        for tier in lower {
            let ttl = ttl.unwrap_or(tier.default_ttl);
            if let Err(e) = tier.put(&tk, &value, ttl, self.is_personal(ns, key)).await {
                tier.metrics.errors.inc();
                return Err(e);
            }
        }
        // Any lookup of this node still in flight read an older value.
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.l1.insert(
            (ns.clone(), key.to_string()),
            L1Entry {
                value: value.into(),
                ttl: ttl.unwrap_or(self.inner.opts.default_ttls.l1),
                origin: if scope == Scope::Edge {
                    Origin::Edge
                } else {
                    stamp.origin
                },
            },
        );
        Ok(())
    }

    /// Drops a key or prefix from the levels of `scope`: lower levels here
    /// first, then L1 here, then other nodes (over the bus, eventually).
    pub async fn invalidate(
        &self,
        ns: &Namespace,
        target: Target,
        scope: Scope,
    ) -> Result<(), CacheError> {
        match &target {
            Target::Key(k) => self.check_key("key", k, false)?,
            Target::Prefix(p) => self.check_key("prefix", p, true)?,
        }
        let lower = self.levels_below_l1(scope);
        for tier in lower {
            if let Err(e) = tier.delete(ns, &target).await {
                tier.metrics.errors.inc();
                return Err(e);
            }
        }
        self.drop_l1(ns, &target);
        self.publish(&Invalidation {
            component: ns.as_str().to_string(),
            target,
            scope,
            region: self.inner.opts.region.clone(),
            edge: self.inner.opts.edge.clone(),
        })
        .await
    }

    fn is_personal(&self, ns: &Namespace, key: &str) -> bool {
        self.inner
            .opts
            .personal_keys
            .get(ns.as_str())
            .is_some_and(|t| t.iter().any(|t| keel_store::is_personal_key(t, key)))
    }

    /// L1 entries currently held (after pending evictions ran).
    pub fn l1_entry_count(&self) -> u64 {
        self.inner.l1.run_pending_tasks();
        self.inner.l1.entry_count()
    }

    /// The key of a component's entry in L2/L3 (benchmarks read it raw).
    pub fn tier_key(ns: &Namespace, key: &str) -> String {
        tier_key(ns, key)
    }
}

#[cfg(test)]
mod tests;
