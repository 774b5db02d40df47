//! Causal context: the set of dots a replica has observed.

use crate::replica::{Dot, ReplicaId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The set of events (dots) a state has observed, stored compactly as a
/// version vector (for each replica, all counters `1..=n` were seen) plus a
/// "dot cloud" of observed dots that are not contiguous with the vector.
///
/// The representation is kept canonical after every operation: any cloud
/// dot that extends the vector is folded into it and zero entries are
/// dropped. Hence logically equal contexts are `==` and encode to identical
/// bytes, and once every replica has seen every dot (e.g. after full-state
/// anti-entropy) the cloud is empty and the metadata is one integer per
/// replica.
///
/// Deserialization re-canonicalizes, so decoded contexts obey the same
/// invariant whatever the bytes said.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "RawContext")]
pub struct CausalContext {
    vv: BTreeMap<ReplicaId, u64>,
    cloud: BTreeSet<Dot>,
}

/// Wire shape of [`CausalContext`]; compacted on the way in.
#[derive(Deserialize)]
struct RawContext {
    vv: BTreeMap<ReplicaId, u64>,
    cloud: BTreeSet<Dot>,
}

impl From<RawContext> for CausalContext {
    fn from(raw: RawContext) -> Self {
        let mut ctx = CausalContext {
            vv: raw.vv,
            cloud: raw.cloud,
        };
        ctx.compact();
        ctx
    }
}

impl CausalContext {
    /// The empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `dot` has been observed. Counter 0 never names an event, so it
    /// counts as observed (it is below every version vector entry).
    pub fn contains(&self, dot: &Dot) -> bool {
        dot.counter <= self.vv.get(&dot.replica).copied().unwrap_or(0) || self.cloud.contains(dot)
    }

    /// Highest counter of `replica` observed (in the vector or the cloud).
    pub fn max_counter(&self, replica: &ReplicaId) -> u64 {
        let in_vv = self.vv.get(replica).copied().unwrap_or(0);
        let lo = Dot::new(replica.clone(), 0);
        let hi = Dot::new(replica.clone(), u64::MAX);
        let in_cloud = self
            .cloud
            .range(lo..=hi)
            .next_back()
            .map_or(0, |d| d.counter);
        in_vv.max(in_cloud)
    }

    /// The next fresh dot for `replica`: max seen + 1. Only meaningful when
    /// called on the replica's own state (which has seen all its own dots).
    /// Saturates at `u64::MAX`, reachable only with forged input.
    pub fn next_dot(&self, replica: &ReplicaId) -> Dot {
        Dot::new(replica.clone(), self.max_counter(replica).saturating_add(1))
    }

    /// Records `dot` as observed, keeping the representation compact.
    pub fn insert(&mut self, dot: Dot) {
        if self.contains(&dot) {
            return;
        }
        let seen = self.vv.get(&dot.replica).copied().unwrap_or(0);
        if dot.counter == seen + 1 {
            // Extends the vector: absorb any cloud dots that are now
            // contiguous with it.
            let mut top = dot.counter;
            let replica = dot.replica;
            while top < u64::MAX {
                let next = Dot::new(replica.clone(), top + 1);
                if !self.cloud.remove(&next) {
                    break;
                }
                top += 1;
            }
            self.vv.insert(replica, top);
        } else {
            self.cloud.insert(dot);
        }
    }

    /// Joins `other` into `self` (set union of observed dots).
    pub fn merge(&mut self, other: &Self) {
        for (replica, &n) in &other.vv {
            match self.vv.get_mut(replica) {
                Some(mine) => *mine = (*mine).max(n),
                None => {
                    self.vv.insert(replica.clone(), n);
                }
            }
        }
        if other.cloud.is_empty() && self.cloud.is_empty() {
            self.vv.retain(|_, n| *n > 0);
            return;
        }
        self.cloud.extend(other.cloud.iter().cloned());
        self.compact();
    }

    /// Whether no dot has been observed.
    pub fn is_empty(&self) -> bool {
        self.vv.is_empty() && self.cloud.is_empty()
    }

    /// The version vector part: replica ↦ n means dots `1..=n` were seen.
    pub fn version_vector(&self) -> &BTreeMap<ReplicaId, u64> {
        &self.vv
    }

    /// Observed dots not (yet) contiguous with the version vector.
    pub fn cloud(&self) -> &BTreeSet<Dot> {
        &self.cloud
    }

    /// Restores the canonical form: drops zero vector entries and cloud dots
    /// already covered, and folds dots contiguous with the vector into it.
    fn compact(&mut self) {
        self.vv.retain(|_, n| *n > 0);
        if self.cloud.is_empty() {
            return;
        }
        // The cloud is ordered by (replica, counter), so one ascending pass
        // sees each replica's dots in counter order.
        let cloud = std::mem::take(&mut self.cloud);
        for dot in cloud {
            let seen = self.vv.get(&dot.replica).copied().unwrap_or(0);
            if dot.counter <= seen {
                continue;
            }
            if dot.counter == seen + 1 {
                self.vv.insert(dot.replica, dot.counter);
            } else {
                self.cloud.insert(dot);
            }
        }
    }
}

impl FromIterator<Dot> for CausalContext {
    fn from_iter<I: IntoIterator<Item = Dot>>(iter: I) -> Self {
        let mut ctx = CausalContext::new();
        for dot in iter {
            ctx.insert(dot);
        }
        ctx
    }
}

impl Extend<Dot> for CausalContext {
    fn extend<I: IntoIterator<Item = Dot>>(&mut self, iter: I) {
        for dot in iter {
            self.insert(dot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(r: &str, n: u64) -> Dot {
        Dot::new(ReplicaId::from(r), n)
    }

    #[test]
    fn out_of_order_inserts_compact_into_the_vector() {
        let mut c = CausalContext::new();
        c.insert(d("a", 3));
        c.insert(d("a", 2));
        assert_eq!(c.cloud().len(), 2);
        assert_eq!(c.next_dot(&"a".into()), d("a", 4));
        c.insert(d("a", 1));
        assert!(c.cloud().is_empty());
        assert_eq!(c.version_vector().get(&ReplicaId::from("a")), Some(&3));
    }

    #[test]
    fn merge_is_canonical() {
        let a: CausalContext = [d("a", 1), d("a", 3), d("b", 2)].into_iter().collect();
        let b: CausalContext = [d("a", 2), d("b", 1)].into_iter().collect();
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert!(ab.cloud().is_empty());
        assert_eq!(ab.version_vector().len(), 2);
    }

    #[test]
    fn counter_zero_and_max_do_not_panic() {
        let mut c = CausalContext::new();
        c.insert(d("a", 0));
        assert!(c.is_empty());
        c.insert(d("a", u64::MAX));
        assert_eq!(c.next_dot(&"a".into()).counter, u64::MAX);
    }
}
