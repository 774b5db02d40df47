//! Last-writer-wins registers.

use crate::context::CausalContext;
use crate::dot_store::{CausalCrdt, DotFun, DotStore, join_causal};
use crate::replica::ReplicaId;
use crate::{Crdt, Payload};
use keel_core::Hlc;
use serde::{Deserialize, Serialize};

/// One write: a value and the hybrid logical time it was written at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LwwWrite<V> {
    /// When the write happened; `Hlc` is totally ordered and unique per
    /// node, so it decides between concurrent writes.
    pub at: Hlc,
    /// The written value.
    pub value: V,
}

/// Plain last-writer-wins register: keeps the write with the greatest
/// [`Hlc`]. Two writes with equal `Hlc` are assumed to be the same write
/// (an [`keel_core::HlcClock`] never issues a timestamp twice).
///
/// Unlike [`LwwValue`] it has no causal metadata, so it is tiny, but a
/// write carrying an older timestamp loses even if it causally follows the
/// newer one; use [`LwwValue`] when that matters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(
    serialize = "V: Serialize",
    deserialize = "V: serde::de::DeserializeOwned"
))]
pub struct LwwRegister<V> {
    write: Option<LwwWrite<V>>,
}

impl<V> Default for LwwRegister<V> {
    fn default() -> Self {
        LwwRegister { write: None }
    }
}

impl<V: Payload> LwwRegister<V> {
    /// An unset register.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `value` at time `at`. Returns the delta: the write itself, or
    /// an empty register if a write at `>= at` is already held (then
    /// nothing changed).
    pub fn set(&mut self, value: V, at: Hlc) -> LwwRegister<V> {
        if self.write.as_ref().is_some_and(|w| w.at >= at) {
            return LwwRegister::default();
        }
        let write = LwwWrite { at, value };
        self.write = Some(write.clone());
        LwwRegister { write: Some(write) }
    }

    /// The current value, if ever written.
    pub fn get(&self) -> Option<&V> {
        self.write.as_ref().map(|w| &w.value)
    }

    /// The timestamp of the current value.
    pub fn timestamp(&self) -> Option<&Hlc> {
        self.write.as_ref().map(|w| &w.at)
    }

    /// The current write.
    pub fn write(&self) -> Option<&LwwWrite<V>> {
        self.write.as_ref()
    }
}

impl<V: Payload> Crdt for LwwRegister<V> {
    fn merge(&mut self, other: &Self) {
        if let Some(theirs) = &other.write
            && self.write.as_ref().is_none_or(|mine| theirs.at > mine.at)
        {
            self.write = Some(theirs.clone());
        }
    }
}

/// Causal last-writer-wins value (a multi-value register resolved by
/// timestamp): every write is a dot carrying `(Hlc, value)`, and a write
/// supersedes exactly the writes its replica had observed. Concurrent writes
/// all survive until a later write observes them; the visible value is the
/// one with the greatest `Hlc` among them.
///
/// Why not just [`LwwRegister`]: inside a map, removals must be causal
/// (a remove deletes the writes it saw, a concurrent write survives, and a
/// removed write never comes back), which needs dots. This is the value type
/// of [`crate::LwwMap`] and can be embedded in any [`crate::OrMap`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(
    serialize = "V: Serialize",
    deserialize = "V: serde::de::DeserializeOwned"
))]
pub struct LwwValue<V> {
    writes: DotFun<LwwWrite<V>>,
    ctx: CausalContext,
}

impl<V> Default for LwwValue<V> {
    fn default() -> Self {
        LwwValue {
            writes: DotFun::default(),
            ctx: CausalContext::default(),
        }
    }
}

impl<V: Payload> LwwValue<V> {
    /// An unset value.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `value` at `at` on behalf of `replica`, superseding every write
    /// observed so far. Returns the delta: the new write, with a context of
    /// the new dot plus the superseded dots.
    pub fn set(&mut self, replica: &ReplicaId, value: V, at: Hlc) -> LwwValue<V> {
        let dot = self.ctx.next_dot(replica);
        let mut ctx = self.writes.dots();
        ctx.insert(dot.clone());
        let delta = LwwValue {
            writes: DotFun::single(dot, LwwWrite { at, value }),
            ctx,
        };
        self.merge(&delta);
        delta
    }

    /// Removes every observed write. Returns the delta (empty store, context
    /// of the removed dots).
    pub fn clear(&mut self) -> LwwValue<V> {
        let delta = LwwValue {
            writes: DotFun::default(),
            ctx: self.writes.dots(),
        };
        self.merge(&delta);
        delta
    }

    /// The visible value: greatest `Hlc` among surviving writes.
    pub fn get(&self) -> Option<&V> {
        self.writes.value()
    }

    /// Timestamp of the visible value.
    pub fn timestamp(&self) -> Option<&Hlc> {
        self.writes.timestamp()
    }

    /// Number of surviving concurrent writes (1 in steady state).
    pub fn concurrent_writes(&self) -> usize {
        self.writes.len()
    }
}

/// Read access when a `DotFun` of writes is the payload of an [`LwwValue`]
/// (e.g. a value of an `OrMap<K, LwwValue<V>>`).
impl<V> DotFun<LwwWrite<V>> {
    /// The winning write: greatest `Hlc`; on an (improper) tie, the greatest
    /// dot, so the choice is still deterministic.
    pub fn current(&self) -> Option<&LwwWrite<V>> {
        self.iter().map(|(_, w)| w).max_by(|a, b| a.at.cmp(&b.at))
    }

    /// The winning value.
    pub fn value(&self) -> Option<&V> {
        self.current().map(|w| &w.value)
    }

    /// The winning timestamp.
    pub fn timestamp(&self) -> Option<&Hlc> {
        self.current().map(|w| &w.at)
    }
}

impl<V: Payload> Crdt for LwwValue<V> {
    fn merge(&mut self, other: &Self) {
        join_causal(&mut self.writes, &mut self.ctx, &other.writes, &other.ctx);
    }
}

impl<V: Payload> CausalCrdt for LwwValue<V> {
    type Store = DotFun<LwwWrite<V>>;

    fn store(&self) -> &Self::Store {
        &self.writes
    }

    fn context(&self) -> &CausalContext {
        &self.ctx
    }

    fn from_parts(writes: Self::Store, ctx: CausalContext) -> Self {
        LwwValue { writes, ctx }
    }

    fn into_parts(self) -> (Self::Store, CausalContext) {
        (self.writes, self.ctx)
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
    fn register_keeps_the_latest_write_in_any_order() {
        let mut a = LwwRegister::new();
        let mut b = LwwRegister::new();
        let d1 = a.set('x', t(10, "a"));
        let d2 = b.set('y', t(20, "b"));
        // A stale write is a no-op with an empty delta.
        assert_eq!(b.set('o', t(5, "b")), LwwRegister::default());
        a.merge(&d2);
        b.merge(&d1);
        assert_eq!(a, b);
        assert_eq!(a.get(), Some(&'y'));
        assert_eq!(a.timestamp(), Some(&t(20, "b")));
    }

    #[test]
    fn causal_value_lets_an_observing_write_win_despite_older_clock() {
        let (ra, rb) = (ReplicaId::from("a"), ReplicaId::from("b"));
        let mut a = LwwValue::new();
        let mut b = LwwValue::new();
        let d1 = a.set(&ra, 1, t(100, "a"));
        b.merge(&d1);
        // b's clock is behind, but b has observed a's write: it supersedes.
        let d2 = b.set(&rb, 2, t(50, "b"));
        a.merge(&d2);
        assert_eq!(a.get(), Some(&2));
        assert_eq!(a.concurrent_writes(), 1);
        assert_eq!(a, b);
    }

    #[test]
    fn concurrent_causal_writes_resolve_by_hlc_then_collapse() {
        let (ra, rb) = (ReplicaId::from("a"), ReplicaId::from("b"));
        let mut a = LwwValue::new();
        let mut b = LwwValue::new();
        let d1 = a.set(&ra, 'a', t(100, "a"));
        let d2 = b.set(&rb, 'b', t(90, "b"));
        a.merge(&d2);
        b.merge(&d1);
        assert_eq!(a, b);
        assert_eq!(a.get(), Some(&'a'));
        assert_eq!(a.concurrent_writes(), 2);
        let d3 = b.set(&rb, 'c', t(101, "b"));
        a.merge(&d3);
        assert_eq!(a.concurrent_writes(), 1);
        assert_eq!(a.get(), Some(&'c'));
    }
}
