//! Add-wins observed-remove set.

use crate::context::CausalContext;
use crate::dot_store::{CausalCrdt, DotMap, DotSet, DotStore, join_causal};
use crate::replica::ReplicaId;
use crate::{Crdt, Element};
use serde::{Deserialize, Serialize};
use std::borrow::Borrow;

/// Add-wins observed-remove set (AWORSet of the delta-CRDT paper).
///
/// Each add tags the element with a fresh dot; a remove deletes only the
/// dots it has observed. So a remove concurrent with an add cannot cancel
/// it (add wins), no timestamps are involved, and removed elements leave no
/// tombstone beyond the compacted causal context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(
    serialize = "E: Serialize",
    deserialize = "E: Ord + serde::de::DeserializeOwned"
))]
pub struct OrSet<E> {
    entries: DotMap<E, DotSet>,
    ctx: CausalContext,
}

impl<E> Default for OrSet<E> {
    fn default() -> Self {
        OrSet {
            entries: DotMap::default(),
            ctx: CausalContext::default(),
        }
    }
}

impl<E: Element> OrSet<E> {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `e` on behalf of `replica`. The delta holds `e` with one fresh
    /// dot, and a context of that dot plus `e`'s previous dots, so it also
    /// supersedes them (keeping one dot per element in steady state).
    pub fn add(&mut self, replica: &ReplicaId, e: E) -> OrSet<E> {
        let dot = self.ctx.next_dot(replica);
        let mut ctx = self.entries.get(&e).map(DotStore::dots).unwrap_or_default();
        ctx.insert(dot.clone());
        let delta = OrSet {
            entries: DotMap::single(e, DotSet::single(dot)),
            ctx,
        };
        self.merge(&delta);
        delta
    }

    /// Removes `e`. The delta has an empty store and a context of the dots
    /// of `e` observed here: concurrent adds elsewhere survive.
    pub fn remove<Q>(&mut self, e: &Q) -> OrSet<E>
    where
        E: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let ctx = self.entries.get(e).map(DotStore::dots).unwrap_or_default();
        let delta = OrSet {
            entries: DotMap::default(),
            ctx,
        };
        self.merge(&delta);
        delta
    }

    /// Removes every observed element.
    pub fn clear(&mut self) -> OrSet<E> {
        let delta = OrSet {
            entries: DotMap::default(),
            ctx: self.entries.dots(),
        };
        self.merge(&delta);
        delta
    }

    /// Whether `e` is present.
    pub fn contains<Q>(&self, e: &Q) -> bool
    where
        E: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.entries.contains_key(e)
    }

    /// Members in order.
    pub fn members(&self) -> impl Iterator<Item = &E> {
        self.entries.keys()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the set has no members.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<E: Element> Crdt for OrSet<E> {
    fn merge(&mut self, other: &Self) {
        join_causal(&mut self.entries, &mut self.ctx, &other.entries, &other.ctx);
    }
}

impl<E: Element> CausalCrdt for OrSet<E> {
    type Store = DotMap<E, DotSet>;

    fn store(&self) -> &Self::Store {
        &self.entries
    }

    fn context(&self) -> &CausalContext {
        &self.ctx
    }

    fn from_parts(entries: Self::Store, ctx: CausalContext) -> Self {
        OrSet { entries, ctx }
    }

    fn into_parts(self) -> (Self::Store, CausalContext) {
        (self.entries, self.ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_add_wins_over_remove() {
        let ra = ReplicaId::from("a");
        let mut a = OrSet::<String>::new();
        let d0 = a.add(&ra, "x".into());
        let mut b = OrSet::new();
        b.merge(&d0);
        let d_add = a.add(&ra, "x".into());
        let d_rm = b.remove("x");
        assert!(!b.contains("x"));
        a.merge(&d_rm);
        b.merge(&d_add);
        assert!(a.contains("x") && b.contains("x"));
        assert_eq!(a, b);
    }

    #[test]
    fn removed_element_does_not_resurface_from_stale_state() {
        let ra = ReplicaId::from("a");
        let mut a = OrSet::new();
        a.add(&ra, 1);
        let stale = a.clone();
        a.remove(&1);
        a.merge(&stale);
        assert!(!a.contains(&1));
        assert!(a.is_empty());
        // Re-adding after the remove works and keeps one dot.
        a.add(&ra, 1);
        a.add(&ra, 1);
        assert_eq!(a.store().get(&1).map(DotSet::len), Some(1));
        assert!(a.context().cloud().is_empty());
    }
}
