//! Grow-only map of PN-counters: scores per member (leaderboards).

use crate::Crdt;
use crate::counter::PnCounter;
use crate::replica::ReplicaId;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// Grow-only map from member names to [`PnCounter`]s, joined pointwise: a
/// member's score is the sum of every replica's adjustments to it, however
/// often and in whatever order they are delivered.
///
/// Members are never removed (a score may go back to 0, the member stays).
/// Canonical form: members are ordered and a member is only stored once it
/// has a non-zero adjustment, so equal states are `==` and encode to
/// identical bytes.
///
/// ```
/// use keel_crdt::{CounterMap, Crdt, ReplicaId};
/// let (a, b) = (ReplicaId::from("a"), ReplicaId::from("b"));
/// let mut ra = CounterMap::new();
/// let mut rb = CounterMap::new();
/// let da = ra.apply(&a, "alice", 10);
/// let db = rb.apply(&b, "alice", -3);
/// ra.merge(&db);
/// rb.merge(&da);
/// assert_eq!(ra, rb);
/// assert_eq!(ra.score("alice"), 7);
/// assert_eq!(ra.top(1), vec![(1, "alice".to_string(), 7)]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CounterMap {
    entries: BTreeMap<String, PnCounter>,
}

/// `true` if no replica ever adjusted the counter (the state no canonical
/// map stores).
fn is_empty_counter(c: &PnCounter) -> bool {
    c.increments().counts().is_empty() && c.decrements().counts().is_empty()
}

impl CounterMap {
    /// The empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `delta` to `member`'s score on behalf of `replica` (a negative
    /// `delta` subtracts; `i64::MIN` included); returns the delta state.
    /// A zero `delta` changes nothing and returns the empty map, so members
    /// without adjustments never appear. Per-replica totals saturate like
    /// [`PnCounter`]'s.
    pub fn apply(&mut self, replica: &ReplicaId, member: &str, delta: i64) -> CounterMap {
        if delta == 0 {
            return CounterMap::default();
        }
        let by = delta.unsigned_abs();
        let counter = self.entries.entry(member.to_owned()).or_default();
        let d = if delta > 0 {
            counter.inc(replica, by)
        } else {
            counter.dec(replica, by)
        };
        CounterMap {
            entries: BTreeMap::from([(member.to_owned(), d)]),
        }
    }

    /// Cancels `replica`'s own adjustments of `member`'s score (see
    /// [`PnCounter::cancel_own`]); returns the delta (empty if there were
    /// none).
    pub fn cancel_own(&mut self, replica: &ReplicaId, member: &str) -> CounterMap {
        let Some(counter) = self.entries.get_mut(member) else {
            return CounterMap::default();
        };
        let d = counter.cancel_own(replica);
        if is_empty_counter(&d) {
            return CounterMap::default();
        }
        CounterMap {
            entries: BTreeMap::from([(member.to_owned(), d)]),
        }
    }

    /// `member`'s score (0 if it was never adjusted), clamped to the i64
    /// range as [`PnCounter::value`].
    pub fn score(&self, member: &str) -> i64 {
        self.entries.get(member).map_or(0, PnCounter::value)
    }

    /// The counter behind `member`'s score, if it was ever adjusted.
    pub fn counter(&self, member: &str) -> Option<&PnCounter> {
        self.entries.get(member)
    }

    /// Number of members ever adjusted (including those back at 0).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` if no member was ever adjusted.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every member and its score, in member order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.entries.iter().map(|(m, c)| (m.as_str(), c.value()))
    }

    /// The `limit` best members as `(rank, member, score)`: highest score
    /// first, ties in member order. Equal scores share a rank and the next
    /// score's rank skips accordingly ("competition ranking": 1, 2, 2, 4).
    /// `limit == 0` gives an empty list.
    pub fn top(&self, limit: usize) -> Vec<(u32, String, i64)> {
        if limit == 0 {
            return Vec::new();
        }
        fn order(a: &(&str, i64), b: &(&str, i64)) -> Ordering {
            b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0))
        }
        let mut all: Vec<(&str, i64)> = self.iter().collect();
        if limit < all.len() {
            // Everything that outranks a kept member is kept too, so ranks
            // computed over the kept prefix are the ranks over all members.
            all.select_nth_unstable_by(limit - 1, order);
            all.truncate(limit);
        }
        all.sort_unstable_by(order);
        let mut out: Vec<(u32, String, i64)> = Vec::with_capacity(all.len());
        for (i, (member, score)) in all.into_iter().enumerate() {
            let rank = match out.last() {
                Some(&(rank, _, prev)) if prev == score => rank,
                _ => u32::try_from(i + 1).unwrap_or(u32::MAX),
            };
            out.push((rank, member.to_owned(), score));
        }
        out
    }
}

impl Crdt for CounterMap {
    fn merge(&mut self, other: &Self) {
        for (member, theirs) in &other.entries {
            match self.entries.get_mut(member) {
                Some(mine) => mine.merge(theirs),
                None => {
                    // Merging into an empty counter drops zero entries, so
                    // forged all-zero counters never enter the state.
                    let mut c = PnCounter::default();
                    c.merge(theirs);
                    if !is_empty_counter(&c) {
                        self.entries.insert(member.clone(), c);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(scores: &[(&str, i64)]) -> CounterMap {
        let r = ReplicaId::from("r");
        let mut m = CounterMap::new();
        for &(member, score) in scores {
            m.apply(&r, member, score);
        }
        m
    }

    fn ranked(v: &[(u32, &str, i64)]) -> Vec<(u32, String, i64)> {
        v.iter().map(|&(r, m, s)| (r, m.to_string(), s)).collect()
    }

    #[test]
    fn cancelling_own_adjustments_touches_one_member_and_one_replica() {
        let (a, b) = (ReplicaId::from("a"), ReplicaId::from("b"));
        let mut m = CounterMap::new();
        m.apply(&a, "alice", 10);
        m.apply(&b, "alice", 4);
        m.apply(&a, "bob", 2);
        let d = m.cancel_own(&a, "alice");
        assert_eq!((m.score("alice"), m.score("bob")), (4, 2));
        assert_eq!(d.score("alice"), -10);
        assert_eq!(m.cancel_own(&a, "alice"), CounterMap::default());
        assert_eq!(m.cancel_own(&a, "carol"), CounterMap::default());
    }

    #[test]
    fn top_uses_competition_ranking_with_ties_in_member_order() {
        let m = board(&[("d", 5), ("c", 7), ("b", 7), ("a", 9), ("e", 1)]);
        assert_eq!(
            m.top(10),
            ranked(&[
                (1, "a", 9),
                (2, "b", 7),
                (2, "c", 7),
                (4, "d", 5),
                (5, "e", 1)
            ])
        );
        let all_tied = board(&[("z", 3), ("y", 3), ("x", 3)]);
        assert_eq!(
            all_tied.top(2),
            ranked(&[(1, "x", 3), (1, "y", 3)]),
            "a cut inside a tie keeps the shared rank"
        );
    }

    #[test]
    fn top_respects_the_limit() {
        let m = board(&[("a", 3), ("b", 2), ("c", 2), ("d", 1)]);
        assert!(m.top(0).is_empty());
        assert!(CounterMap::new().top(5).is_empty());
        assert_eq!(m.top(1), ranked(&[(1, "a", 3)]));
        assert_eq!(m.top(3), ranked(&[(1, "a", 3), (2, "b", 2), (2, "c", 2)]));
        assert_eq!(m.top(4), m.top(usize::MAX));
        assert_eq!(m.top(4).len(), 4);
        // Every limit agrees with the full ranking's prefix.
        let full = m.top(usize::MAX);
        for limit in 0..=5 {
            assert_eq!(m.top(limit), full[..limit.min(full.len())].to_vec());
        }
    }

    #[test]
    fn negative_and_zero_scores_rank_below_positive_ones() {
        let r = ReplicaId::from("r");
        let mut m = board(&[("neg", -4), ("pos", 2), ("low", -10)]);
        m.apply(&r, "zero", 6);
        m.apply(&r, "zero", -6);
        assert_eq!(m.score("zero"), 0);
        assert_eq!(m.len(), 4, "a member back at 0 stays");
        assert_eq!(
            m.top(10),
            ranked(&[
                (1, "pos", 2),
                (2, "zero", 0),
                (3, "neg", -4),
                (4, "low", -10)
            ])
        );
    }

    #[test]
    fn zero_deltas_store_nothing_and_extremes_do_not_panic() {
        let r = ReplicaId::from("r");
        let mut m = CounterMap::new();
        assert_eq!(m.apply(&r, "a", 0), CounterMap::new());
        assert!(m.is_empty());
        assert_eq!(crate::encode(&m), crate::encode(&CounterMap::new()));
        m.apply(&r, "min", i64::MIN);
        m.apply(&r, "max", i64::MAX);
        assert_eq!(m.score("min"), i64::MIN);
        assert_eq!(m.score("max"), i64::MAX);
        m.apply(&r, "min", i64::MIN);
        assert_eq!(m.score("min"), i64::MIN, "clamped, not wrapped");
        assert_eq!(m.score("absent"), 0);
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![("max", i64::MAX), ("min", i64::MIN)]
        );
    }

    #[test]
    fn forged_zero_counters_are_not_stored() {
        // A PnCounter whose only entry is a zero count: GCounter merge drops
        // it, so the map must not keep an empty counter for the member.
        let forged: CounterMap =
            crate::decode(&[crate::FORMAT_VERSION, 1, 1, b'm', 1, 1, b'r', 0, 0])
                .expect("forged but well-formed");
        assert_eq!(forged.len(), 1);
        let mut m = CounterMap::new();
        m.merge(&forged);
        assert!(m.is_empty());
    }

    #[test]
    fn concurrent_adjustments_sum_and_redelivery_is_harmless() {
        let (a, b) = (ReplicaId::from("a"), ReplicaId::from("b"));
        let mut ra = CounterMap::new();
        let mut rb = CounterMap::new();
        let d1 = ra.apply(&a, "x", 5);
        let d2 = rb.apply(&b, "x", 3);
        let d3 = rb.apply(&b, "y", -2);
        for _ in 0..3 {
            ra.merge(&d2);
            ra.merge(&d3);
            rb.merge(&d1);
        }
        assert_eq!(ra, rb);
        assert_eq!(ra.score("x"), 8);
        assert_eq!(ra.score("y"), -2);
    }
}
