//! Observed-remove map embedding causal CRDTs.

use crate::context::CausalContext;
use crate::dot_store::{CausalCrdt, DotMap, DotStore, join_causal};
use crate::{Crdt, Element};
use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
use std::collections::BTreeSet;

/// Observed-remove map from `K` to causal CRDTs `C` (ORMap of the
/// delta-CRDT paper). Values do not carry their own context: they are stored
/// as `C::Store` and share the map's [`CausalContext`], so the metadata is
/// one context per map, not per key, and removing a key is just "forget the
/// dots observed under it" — a concurrent update to the value survives
/// (update wins), and a removed value never comes back from a stale replica.
///
/// Works for any [`CausalCrdt`]: [`crate::OrSet`] (e.g. presence: user ↦ set
/// of connections), [`crate::LwwValue`], and `OrMap` itself (nesting).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "K: Serialize", deserialize = "K: Element"))]
pub struct OrMap<K, C: CausalCrdt> {
    entries: DotMap<K, C::Store>,
    ctx: CausalContext,
}

impl<K, C: CausalCrdt> Default for OrMap<K, C> {
    fn default() -> Self {
        OrMap {
            entries: DotMap::default(),
            ctx: CausalContext::default(),
        }
    }
}

impl<K: Element, C: CausalCrdt> OrMap<K, C> {
    /// The empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Updates the value under `key` with a mutator of `C` and returns the
    /// map delta.
    ///
    /// `f` receives the current value (empty if absent) carrying the *map's*
    /// context, so fresh dots are unique map-wide; it must return the delta
    /// its mutators produced (join several with [`Crdt::merge`]). Only that
    /// returned delta is applied, so other changes `f` makes to its argument
    /// are discarded. For safety the delta's context is restricted to the
    /// dots of this key's old value and of the delta's payload: a closure
    /// that returns its whole state instead of a delta cannot erase other
    /// keys.
    ///
    /// ```
    /// use keel_crdt::{OrMap, OrSet, ReplicaId};
    /// let me = ReplicaId::from("a");
    /// let mut presence: OrMap<String, OrSet<String>> = OrMap::new();
    /// let _delta = presence.apply("alice".into(), |conns| conns.add(&me, "ws-1".into()));
    /// assert!(presence.get("alice").is_some_and(|s| s.contains("ws-1")));
    /// ```
    pub fn apply<F>(&mut self, key: K, f: F) -> OrMap<K, C>
    where
        F: FnOnce(&mut C) -> C,
    {
        let old = self.entries.get(&key).cloned().unwrap_or_default();
        let mut relevant = BTreeSet::new();
        old.collect_dots(&mut relevant);
        let mut view = C::from_parts(old, self.ctx.clone());
        let (store, full_ctx) = f(&mut view).into_parts();
        store.collect_dots(&mut relevant);
        let ctx: CausalContext = relevant
            .into_iter()
            .filter(|d| full_ctx.contains(d))
            .collect();
        let delta = OrMap {
            entries: if store.is_bottom() {
                DotMap::default()
            } else {
                DotMap::single(key, store)
            },
            ctx,
        };
        self.merge(&delta);
        delta
    }

    /// Removes `key`: forgets the dots observed under it. The delta has an
    /// empty store and those dots as context.
    pub fn remove<Q>(&mut self, key: &Q) -> OrMap<K, C>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let ctx = self
            .entries
            .get(key)
            .map(DotStore::dots)
            .unwrap_or_default();
        let delta = OrMap {
            entries: DotMap::default(),
            ctx,
        };
        self.merge(&delta);
        delta
    }

    /// Removes every observed key.
    pub fn clear(&mut self) -> OrMap<K, C> {
        let delta = OrMap {
            entries: DotMap::default(),
            ctx: self.entries.dots(),
        };
        self.merge(&delta);
        delta
    }

    /// The value under `key`, as its payload store (e.g. for
    /// `OrMap<_, OrSet<E>>` a `DotMap<E, DotSet>`, which has `contains` and
    /// `members`; for `LwwValue<V>` a `DotFun<LwwWrite<V>>`, which has
    /// `value` and `timestamp`).
    pub fn get<Q>(&self, key: &Q) -> Option<&C::Store>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.entries.get(key)
    }

    /// The value under `key` as a standalone `C` (cloned; carries a copy of
    /// the map's context, so it can be merged with other values of `C` from
    /// the same map).
    pub fn get_cloned<Q>(&self, key: &Q) -> Option<C>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.entries
            .get(key)
            .map(|s| C::from_parts(s.clone(), self.ctx.clone()))
    }

    /// Whether `key` is present.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.entries.contains_key(key)
    }

    /// Present keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.keys()
    }

    /// Entries, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &C::Store)> {
        self.entries.iter()
    }

    /// Number of present keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is present.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<K: Element, C: CausalCrdt> Crdt for OrMap<K, C> {
    fn merge(&mut self, other: &Self) {
        join_causal(&mut self.entries, &mut self.ctx, &other.entries, &other.ctx);
    }
}

impl<K: Element, C: CausalCrdt> CausalCrdt for OrMap<K, C> {
    type Store = DotMap<K, C::Store>;

    fn store(&self) -> &Self::Store {
        &self.entries
    }

    fn context(&self) -> &CausalContext {
        &self.ctx
    }

    fn from_parts(entries: Self::Store, ctx: CausalContext) -> Self {
        OrMap { entries, ctx }
    }

    fn into_parts(self) -> (Self::Store, CausalContext) {
        (self.entries, self.ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{OrSet, ReplicaId};

    type Presence = OrMap<String, OrSet<String>>;

    #[test]
    fn presence_per_user() {
        let (ra, rb) = (ReplicaId::from("a"), ReplicaId::from("b"));
        let mut a = Presence::new();
        let mut b = Presence::new();
        let d1 = a.apply("alice".into(), |s| s.add(&ra, "c1".into()));
        let d2 = b.apply("bob".into(), |s| s.add(&rb, "c2".into()));
        b.merge(&d1);
        // Concurrently: a removes alice, b adds a connection for alice.
        let d3 = a.remove("alice");
        let d4 = b.apply("alice".into(), |s| s.add(&rb, "c3".into()));
        a.merge(&d2);
        a.merge(&d4);
        b.merge(&d3);
        assert_eq!(a, b);
        // Only the concurrent connection survives the remove.
        let alice: Vec<_> = a.get("alice").unwrap().members().cloned().collect();
        assert_eq!(alice, ["c3"]);
        assert!(a.get("bob").unwrap().contains("c2"));
    }

    #[test]
    fn removing_the_last_member_removes_the_key() {
        let ra = ReplicaId::from("a");
        let mut m = Presence::new();
        m.apply("u".into(), |s| s.add(&ra, "c".into()));
        let d = m.apply("u".into(), |s| s.remove("c"));
        assert!(m.is_empty());
        assert!(d.is_empty());
        assert!(m.context().cloud().is_empty());
    }

    #[test]
    fn returning_the_full_state_cannot_erase_other_keys() {
        let ra = ReplicaId::from("a");
        let mut m = Presence::new();
        m.apply("u".into(), |s| s.add(&ra, "c".into()));
        let d = m.apply("v".into(), |s| {
            s.add(&ra, "d".into());
            s.clone()
        });
        assert_eq!(m.len(), 2);
        let mut fresh = Presence::new();
        fresh.merge(&d);
        assert_eq!(fresh.keys().collect::<Vec<_>>(), ["v"]);
    }

    #[test]
    fn nested_maps_compose() {
        let ra = ReplicaId::from("a");
        let mut m: OrMap<u8, OrMap<u8, OrSet<u8>>> = OrMap::new();
        let d = m.apply(1, |inner| inner.apply(2, |s| s.add(&ra, 3)));
        let mut other = OrMap::new();
        other.merge(&d);
        assert_eq!(other, m);
        assert!(m.get(&1).unwrap().get(&2).unwrap().contains(&3));
        m.apply(1, |inner| inner.remove(&2));
        assert!(m.is_empty());
    }
}
