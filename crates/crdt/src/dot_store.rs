//! Dot stores: the payload half of a causal CRDT (the other half is a
//! [`CausalContext`]). Composing them (`DotMap` of `DotSet`s, …) is what
//! lets a map's values share the map's single causal context.

use crate::context::CausalContext;
use crate::replica::Dot;
use crate::{Crdt, Element};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};

/// A store of dot-tagged data, joined relative to causal contexts.
///
/// The join rule (from the delta-CRDT paper): a dot present on one side
/// survives unless the other side's context has seen it *and* dropped it.
/// That is what makes removals stick and concurrent additions win without
/// tombstones.
pub trait DotStore: Clone + PartialEq + Default + Serialize + DeserializeOwned {
    /// Whether the store holds no dots (the bottom element); empty stores are
    /// dropped from enclosing maps to keep the form canonical.
    fn is_bottom(&self) -> bool;

    /// Adds every dot in the store to `out`.
    fn collect_dots(&self, out: &mut BTreeSet<Dot>);

    /// Joins `(other, other_ctx)` into `(self, ctx)`. The caller merges the
    /// contexts afterwards.
    fn join(&mut self, ctx: &CausalContext, other: &Self, other_ctx: &CausalContext);

    /// The dots in the store, as a context (what a removal must cover).
    fn dots(&self) -> CausalContext {
        let mut out = BTreeSet::new();
        self.collect_dots(&mut out);
        out.into_iter().collect()
    }
}

/// A causal CRDT: a [`DotStore`] plus the [`CausalContext`] it is relative
/// to. Implementors can be embedded as [`crate::OrMap`] values, where they
/// give up their own context and share the map's.
pub trait CausalCrdt: Crdt {
    /// The payload type; what an enclosing map stores per key.
    type Store: DotStore;

    /// The payload.
    fn store(&self) -> &Self::Store;

    /// The observed dots.
    fn context(&self) -> &CausalContext;

    /// Reassembles a state. `ctx` must cover every dot in `store`.
    fn from_parts(store: Self::Store, ctx: CausalContext) -> Self;

    /// Splits a state into payload and context.
    fn into_parts(self) -> (Self::Store, CausalContext);
}

/// Joins a causal pair in place: the shared body of every causal `merge`.
pub(crate) fn join_causal<S: DotStore>(
    store: &mut S,
    ctx: &mut CausalContext,
    other: &S,
    other_ctx: &CausalContext,
) {
    store.join(ctx, other, other_ctx);
    ctx.merge(other_ctx);
}

/// A set of dots: the payload of one OR-Set element (each dot is one add).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DotSet(BTreeSet<Dot>);

impl DotSet {
    /// A set holding one dot.
    pub fn single(dot: Dot) -> Self {
        DotSet(BTreeSet::from([dot]))
    }

    /// The dots, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Dot> {
        self.0.iter()
    }

    /// Number of dots.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no dots.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl DotStore for DotSet {
    fn is_bottom(&self) -> bool {
        self.0.is_empty()
    }

    fn collect_dots(&self, out: &mut BTreeSet<Dot>) {
        out.extend(self.0.iter().cloned());
    }

    fn join(&mut self, ctx: &CausalContext, other: &Self, other_ctx: &CausalContext) {
        self.0
            .retain(|d| other.0.contains(d) || !other_ctx.contains(d));
        for d in &other.0 {
            if !ctx.contains(d) {
                self.0.insert(d.clone());
            }
        }
    }
}

/// A map from dots to values: each entry is one write, so two entries with
/// the same dot are the same write. Payload of [`crate::LwwValue`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
#[serde(bound(
    serialize = "V: Serialize",
    deserialize = "V: serde::de::DeserializeOwned"
))]
pub struct DotFun<V>(BTreeMap<Dot, V>);

impl<V> Default for DotFun<V> {
    fn default() -> Self {
        DotFun(BTreeMap::new())
    }
}

impl<V> DotFun<V> {
    /// A store holding one write.
    pub fn single(dot: Dot, value: V) -> Self {
        DotFun(BTreeMap::from([(dot, value)]))
    }

    /// The writes, ordered by dot.
    pub fn iter(&self) -> impl Iterator<Item = (&Dot, &V)> {
        self.0.iter()
    }

    /// Number of (concurrent) writes held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no write is held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<V: Clone + PartialEq + Serialize + DeserializeOwned> DotStore for DotFun<V> {
    fn is_bottom(&self) -> bool {
        self.0.is_empty()
    }

    fn collect_dots(&self, out: &mut BTreeSet<Dot>) {
        out.extend(self.0.keys().cloned());
    }

    fn join(&mut self, ctx: &CausalContext, other: &Self, other_ctx: &CausalContext) {
        // A dot names one write, so when both sides hold it the values are
        // equal and keeping ours is the join.
        self.0
            .retain(|d, _| other.0.contains_key(d) || !other_ctx.contains(d));
        for (d, v) in &other.0 {
            if !ctx.contains(d) {
                self.0.entry(d.clone()).or_insert_with(|| v.clone());
            }
        }
    }
}

/// A map from keys to nested dot stores; empty values are removed. Payload
/// of [`crate::OrSet`] (`DotMap<E, DotSet>`) and [`crate::OrMap`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
#[serde(bound(
    serialize = "K: Serialize, S: Serialize",
    deserialize = "K: Ord + serde::de::DeserializeOwned, S: serde::de::DeserializeOwned"
))]
pub struct DotMap<K, S>(BTreeMap<K, S>);

impl<K, S> Default for DotMap<K, S> {
    fn default() -> Self {
        DotMap(BTreeMap::new())
    }
}

impl<K: Ord, S> DotMap<K, S> {
    /// A map with one entry.
    pub fn single(key: K, value: S) -> Self {
        DotMap(BTreeMap::from([(key, value)]))
    }

    /// The store under `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<&S>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.0.get(key)
    }

    /// Whether `key` is present (has at least one live dot).
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.0.contains_key(key)
    }

    /// Present keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.keys()
    }

    /// Entries, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &S)> {
        self.0.iter()
    }

    /// Number of present keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no key is present.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Read access when a `DotMap` is the payload of an OR-Set (e.g. a value of
/// an `OrMap<K, OrSet<E>>`).
impl<E: Ord> DotMap<E, DotSet> {
    /// Whether `e` is in the set.
    pub fn contains<Q>(&self, e: &Q) -> bool
    where
        E: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.0.contains_key(e)
    }

    /// The members, in order.
    pub fn members(&self) -> impl Iterator<Item = &E> {
        self.0.keys()
    }
}

impl<K: Element, S: DotStore> DotStore for DotMap<K, S> {
    fn is_bottom(&self) -> bool {
        self.0.is_empty()
    }

    fn collect_dots(&self, out: &mut BTreeSet<Dot>) {
        for v in self.0.values() {
            v.collect_dots(out);
        }
    }

    fn join(&mut self, ctx: &CausalContext, other: &Self, other_ctx: &CausalContext) {
        // Keys only we hold: our dots die where `other_ctx` saw them.
        let empty = S::default();
        for (k, v) in self.0.iter_mut() {
            match other.0.get(k) {
                Some(o) => v.join(ctx, o, other_ctx),
                None => v.join(ctx, &empty, other_ctx),
            }
        }
        // Keys only they hold: their dots live unless we saw them.
        for (k, o) in &other.0 {
            if !self.0.contains_key(k) {
                let mut v = S::default();
                v.join(ctx, o, other_ctx);
                if !v.is_bottom() {
                    self.0.insert(k.clone(), v);
                }
            }
        }
        self.0.retain(|_, v| !v.is_bottom());
    }
}
