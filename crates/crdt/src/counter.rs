//! Grow-only and positive-negative counters.

use crate::Crdt;
use crate::replica::ReplicaId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Grow-only counter: one monotone count per replica, joined by pointwise
/// max, so a replica's increments are never double counted however often
/// they are delivered.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GCounter {
    counts: BTreeMap<ReplicaId, u64>,
}

impl GCounter {
    /// A zero counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `by` on behalf of `replica`; returns the delta (that replica's
    /// new total, which is what max-merging needs). Saturates at `u64::MAX`
    /// per replica.
    pub fn inc(&mut self, replica: &ReplicaId, by: u64) -> GCounter {
        if by == 0 {
            // No change; an empty delta keeps zero entries out of the state.
            return GCounter::default();
        }
        let slot = self.counts.entry(replica.clone()).or_insert(0);
        *slot = slot.saturating_add(by);
        GCounter {
            counts: BTreeMap::from([(replica.clone(), *slot)]),
        }
    }

    /// The total, saturating at `u64::MAX`.
    pub fn value(&self) -> u64 {
        u64::try_from(self.total()).unwrap_or(u64::MAX)
    }

    /// Exact total (cannot overflow: fewer than 2^64 replicas).
    pub(crate) fn total(&self) -> u128 {
        self.counts.values().map(|&n| u128::from(n)).sum()
    }

    /// The count contributed by `replica`.
    pub fn count_of(&self, replica: &ReplicaId) -> u64 {
        self.counts.get(replica).copied().unwrap_or(0)
    }

    /// Per-replica counts.
    pub fn counts(&self) -> &BTreeMap<ReplicaId, u64> {
        &self.counts
    }
}

impl Crdt for GCounter {
    fn merge(&mut self, other: &Self) {
        for (replica, &n) in &other.counts {
            match self.counts.get_mut(replica) {
                Some(mine) => *mine = (*mine).max(n),
                // Zero entries (only in forged input) would break canonical form.
                None if n > 0 => {
                    self.counts.insert(replica.clone(), n);
                }
                None => {}
            }
        }
    }
}

/// Counter supporting increments and decrements: two [`GCounter`]s, value
/// is their difference.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PnCounter {
    incs: GCounter,
    decs: GCounter,
}

impl PnCounter {
    /// A zero counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `by`; returns the delta.
    pub fn inc(&mut self, replica: &ReplicaId, by: u64) -> PnCounter {
        PnCounter {
            incs: self.incs.inc(replica, by),
            decs: GCounter::default(),
        }
    }

    /// Subtracts `by`; returns the delta.
    pub fn dec(&mut self, replica: &ReplicaId, by: u64) -> PnCounter {
        PnCounter {
            incs: GCounter::default(),
            decs: self.decs.inc(replica, by),
        }
    }

    /// Cancels `replica`'s own adjustments (its increments minus its
    /// decrements), leaving every other replica's; returns the delta. When
    /// each replica cancels its own, concurrently or not, the value ends at
    /// 0 and never below (GDPR erasure: cancelling by the value seen here
    /// would over-correct when two replicas do it at once).
    pub fn cancel_own(&mut self, replica: &ReplicaId) -> PnCounter {
        let (incs, decs) = (self.incs.count_of(replica), self.decs.count_of(replica));
        match incs.cmp(&decs) {
            std::cmp::Ordering::Greater => self.dec(replica, incs - decs),
            std::cmp::Ordering::Less => self.inc(replica, decs - incs),
            std::cmp::Ordering::Equal => PnCounter::default(),
        }
    }

    /// Increments minus decrements, computed exactly in i128 and clamped to
    /// the i64 range.
    pub fn value(&self) -> i64 {
        let incs = i128::try_from(self.incs.total()).unwrap_or(i128::MAX);
        let decs = i128::try_from(self.decs.total()).unwrap_or(i128::MAX);
        let v = incs - decs;
        i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
    }

    /// The increments half.
    pub fn increments(&self) -> &GCounter {
        &self.incs
    }

    /// The decrements half.
    pub fn decrements(&self) -> &GCounter {
        &self.decs
    }
}

impl Crdt for PnCounter {
    fn merge(&mut self, other: &Self) {
        self.incs.merge(&other.incs);
        self.decs.merge(&other.decs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivered_deltas_are_not_double_counted() {
        let a = ReplicaId::from("a");
        let b = ReplicaId::from("b");
        let mut ra = PnCounter::new();
        let mut rb = PnCounter::new();
        let d1 = ra.inc(&a, 5);
        let d2 = rb.dec(&b, 7);
        for _ in 0..3 {
            ra.merge(&d2);
            rb.merge(&d1);
        }
        assert_eq!(ra, rb);
        assert_eq!(ra.value(), -2);
    }

    #[test]
    fn replicas_cancelling_their_own_adjustments_concurrently_end_at_zero() {
        let (a, b, c) = (
            ReplicaId::from("a"),
            ReplicaId::from("b"),
            ReplicaId::from("c"),
        );
        let mut ra = PnCounter::new();
        let mut rb = PnCounter::new();
        let mut rc = PnCounter::new();
        let mut deltas = vec![ra.inc(&a, 5), ra.dec(&a, 1), rb.inc(&b, 3), rc.dec(&c, 4)];
        for r in [&mut ra, &mut rb, &mut rc] {
            deltas.iter().for_each(|d| r.merge(d));
        }
        assert_eq!(ra.value(), 3);
        // Each cancels what it sees of its own, at once: no over-correction
        // (cancelling the value 3 seen everywhere would end at -6).
        let cancels = [ra.cancel_own(&a), rb.cancel_own(&b), rc.cancel_own(&c)];
        deltas.extend(cancels);
        for r in [&mut ra, &mut rb, &mut rc] {
            deltas.iter().for_each(|d| r.merge(d));
            assert_eq!(r.value(), 0);
        }
        assert_eq!(
            ra.cancel_own(&a),
            PnCounter::default(),
            "nothing left to cancel"
        );
    }

    #[test]
    fn value_clamps_instead_of_overflowing() {
        let mut c = PnCounter::new();
        c.inc(&"a".into(), u64::MAX);
        c.inc(&"b".into(), u64::MAX);
        assert_eq!(c.value(), i64::MAX);
        assert_eq!(c.increments().value(), u64::MAX);
        c.dec(&"c".into(), u64::MAX);
        c.dec(&"d".into(), u64::MAX);
        c.dec(&"e".into(), u64::MAX);
        assert_eq!(c.value(), i64::MIN);
    }
}
