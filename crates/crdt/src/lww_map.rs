//! Observed-remove map of last-writer-wins values: the `state.map-*` type.

use crate::context::CausalContext;
use crate::dot_store::{CausalCrdt, DotFun, DotMap};
use crate::lww::{LwwValue, LwwWrite};
use crate::or_map::OrMap;
use crate::replica::ReplicaId;
use crate::{Crdt, Payload};
use keel_core::Hlc;
use serde::{Deserialize, Serialize};

/// Map from string keys to last-writer-wins values, with observed-remove
/// semantics: `OrMap<String, LwwValue<V>>` behind a string-keyed API.
///
/// Each `set` is a dot carrying `(Hlc, value)` that supersedes the writes
/// observed for that key; the visible value is the greatest-`Hlc` write
/// among the surviving (concurrent) ones. `remove` deletes only observed
/// writes, so a concurrent `set` wins, and a removed value can never
/// resurface through a merge with a stale replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
#[serde(bound(serialize = "", deserialize = ""))]
pub struct LwwMap<V: Payload> {
    inner: OrMap<String, LwwValue<V>>,
}

impl<V: Payload> Default for LwwMap<V> {
    fn default() -> Self {
        LwwMap {
            inner: OrMap::default(),
        }
    }
}

impl<V: Payload> LwwMap<V> {
    /// The empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `value` under `key` at `at` on behalf of `replica`; returns
    /// the delta.
    pub fn set(&mut self, replica: &ReplicaId, key: String, value: V, at: Hlc) -> LwwMap<V> {
        LwwMap {
            inner: self.inner.apply(key, |v| v.set(replica, value, at)),
        }
    }

    /// Removes `key` (the writes observed for it); returns the delta.
    pub fn remove(&mut self, key: &str) -> LwwMap<V> {
        LwwMap {
            inner: self.inner.remove(key),
        }
    }

    /// The visible value under `key`.
    pub fn get(&self, key: &str) -> Option<&V> {
        self.inner.get(key).and_then(DotFun::value)
    }

    /// The winning write under `key` (value and timestamp).
    pub fn get_write(&self, key: &str) -> Option<&LwwWrite<V>> {
        self.inner.get(key).and_then(DotFun::current)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.inner.contains_key(key)
    }

    /// Present keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.inner.keys()
    }

    /// `(key, visible value)` pairs, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&String, &V)> {
        self.inner
            .iter()
            .filter_map(|(k, writes)| writes.value().map(|v| (k, v)))
    }

    /// Number of present keys.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether no key is present.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// The underlying generic map.
    pub fn as_or_map(&self) -> &OrMap<String, LwwValue<V>> {
        &self.inner
    }
}

impl<V: Payload> Crdt for LwwMap<V> {
    fn merge(&mut self, other: &Self) {
        self.inner.merge(&other.inner);
    }
}

impl<V: Payload> CausalCrdt for LwwMap<V> {
    type Store = DotMap<String, DotFun<LwwWrite<V>>>;

    fn store(&self) -> &Self::Store {
        self.inner.store()
    }

    fn context(&self) -> &CausalContext {
        self.inner.context()
    }

    fn from_parts(store: Self::Store, ctx: CausalContext) -> Self {
        LwwMap {
            inner: OrMap::from_parts(store, ctx),
        }
    }

    fn into_parts(self) -> (Self::Store, CausalContext) {
        self.inner.into_parts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64, node: &str) -> Hlc {
        Hlc {
            physical_ms: ms,
            logical: 0,
            node: node.into(),
        }
    }

    #[test]
    fn concurrent_set_beats_remove_even_with_older_timestamp() {
        let (ra, rb) = (ReplicaId::from("a"), ReplicaId::from("b"));
        let mut a = LwwMap::new();
        let d0 = a.set(&ra, "k".into(), 1, t(10, "a"));
        let mut b = LwwMap::new();
        b.merge(&d0);
        let d_rm = a.remove("k");
        let d_set = b.set(&rb, "k".into(), 2, t(5, "b"));
        a.merge(&d_set);
        b.merge(&d_rm);
        assert_eq!(a, b);
        assert_eq!(a.get("k"), Some(&2));
    }

    #[test]
    fn removed_value_never_resurfaces() {
        let ra = ReplicaId::from("a");
        let mut a = LwwMap::new();
        a.set(&ra, "k".into(), "v".to_string(), t(10, "a"));
        let stale = a.clone();
        let d = a.remove("k");
        a.merge(&stale);
        assert_eq!(a.get("k"), None);
        let mut s = stale;
        s.merge(&d);
        assert_eq!(s.get("k"), None);
        assert_eq!(s, a);
        assert_eq!(a.entries().count(), 0);
    }

    #[test]
    fn overwrite_keeps_one_write_and_bounded_context() {
        let ra = ReplicaId::from("a");
        let mut a = LwwMap::new();
        for i in 0..100u64 {
            a.set(&ra, format!("k{}", i % 3), i, t(i, "a"));
        }
        assert_eq!(a.len(), 3);
        assert_eq!(a.get("k0"), Some(&99));
        assert!(a.context().cloud().is_empty());
        assert_eq!(a.context().version_vector().len(), 1);
        let entries: Vec<_> = a.entries().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(entries, [("k0", 99), ("k1", 97), ("k2", 98)]);
    }
}
