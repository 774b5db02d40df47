//! The hierarchical cache. This crate has L1 so far: a bounded in-process
//! cache with a TTL per entry and size-aware eviction, keyed per component.
//! (L2 regional and L3 global tiers over the bus come with the cache issue.)

use keel_store::Namespace;
use moka::Expiry;
use moka::sync::Cache;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default L1 time to live when a caller does not choose one.
pub const DEFAULT_L1_TTL: Duration = Duration::from_secs(300);

#[derive(Clone)]
struct Entry {
    value: Arc<[u8]>,
    ttl: Duration,
}

struct PerEntryTtl;

impl Expiry<(Namespace, String), Entry> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &(Namespace, String),
        value: &Entry,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &(Namespace, String),
        value: &Entry,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// L1: this process only; lost on restart by design.
#[derive(Clone)]
pub struct LocalCache {
    inner: Cache<(Namespace, String), Entry>,
}

impl LocalCache {
    /// A cache holding at most about `max_bytes` of keys and values.
    pub fn new(max_bytes: u64) -> Self {
        LocalCache {
            inner: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|k: &(Namespace, String), v: &Entry| {
                    (k.1.len() + v.value.len() + 64)
                        .try_into()
                        .unwrap_or(u32::MAX)
                })
                .expire_after(PerEntryTtl)
                .build(),
        }
    }

    pub fn insert(&self, ns: &Namespace, key: String, value: Vec<u8>, ttl: Duration) {
        self.inner.insert(
            (ns.clone(), key),
            Entry {
                value: value.into(),
                ttl,
            },
        );
    }

    pub fn get(&self, ns: &Namespace, key: &str) -> Option<Arc<[u8]>> {
        self.inner
            .get(&(ns.clone(), key.to_string()))
            .map(|e| e.value)
    }

    pub fn remove(&self, ns: &Namespace, key: &str) {
        self.inner.invalidate(&(ns.clone(), key.to_string()));
    }

    /// Entries currently held (after pending evictions ran).
    pub fn entry_count(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(n: &str) -> Namespace {
        Namespace::new(n).unwrap()
    }

    #[test]
    fn entries_are_per_component() {
        let c = LocalCache::new(1 << 20);
        c.insert(&ns("a"), "k".into(), b"v".to_vec(), DEFAULT_L1_TTL);
        assert_eq!(c.get(&ns("a"), "k").as_deref(), Some(&b"v"[..]));
        assert_eq!(c.get(&ns("b"), "k"), None);
        c.remove(&ns("a"), "k");
        assert_eq!(c.get(&ns("a"), "k"), None);
    }

    #[test]
    fn entries_expire_after_their_ttl() {
        let c = LocalCache::new(1 << 20);
        c.insert(&ns("a"), "short".into(), vec![1], Duration::from_millis(30));
        c.insert(&ns("a"), "long".into(), vec![2], Duration::from_secs(60));
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.get(&ns("a"), "short").is_some() {
            assert!(Instant::now() < deadline, "entry outlived its ttl");
            std::thread::yield_now();
        }
        assert!(c.get(&ns("a"), "long").is_some());
    }

    #[test]
    fn size_bound_evicts() {
        let c = LocalCache::new(64 * 1024);
        for i in 0..1000 {
            c.insert(&ns("a"), format!("k{i}"), vec![0; 1024], DEFAULT_L1_TTL);
        }
        assert!(c.entry_count() <= 64, "{}", c.entry_count());
    }
}
