//! Exactly-once-in-effect application of forwarded writes.
//!
//! JetStream drops a repeated `Nats-Msg-Id` only inside the stream's
//! duplicate window. An edge partitioned longer than that, whose last
//! publish was stored but never acknowledged, sends it again after the heal
//! and the stream then holds it twice. Consumers therefore remember, per
//! origin, what they applied: outbox sequences are gapless per origin, so a
//! watermark (everything ≤ it applied) plus the few applied sequences above
//! it (out-of-order retries) is exact and stays small.

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default, Clone)]
pub struct Dedup {
    origins: HashMap<String, OriginState>,
}

#[derive(Debug, Default, Clone)]
struct OriginState {
    watermark: u64,
    above: BTreeSet<u64>,
}

impl Dedup {
    pub fn new() -> Dedup {
        Dedup::default()
    }

    /// Records `(origin, seq)`; `true` the first time, `false` for a repeat.
    pub fn first_time(&mut self, origin: &str, seq: u64) -> bool {
        let st = match self.origins.get_mut(origin) {
            Some(s) => s,
            None => self.origins.entry(origin.to_string()).or_default(),
        };
        if seq <= st.watermark || !st.above.insert(seq) {
            return false;
        }
        while st.above.remove(&(st.watermark + 1)) {
            st.watermark += 1;
        }
        true
    }

    /// Sequences held above the watermarks (a measure of reordering).
    pub fn pending(&self) -> usize {
        self.origins.values().map(|s| s.above.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        /// Any delivery order with any repeats applies each sequence exactly
        /// once, and state collapses to the watermark once all arrived.
        #[test]
        fn applies_each_sequence_once(
            n in 1u64..200,
            repeats in proptest::collection::vec(0u64..200, 0..100),
            seed in any::<u64>(),
        ) {
            let mut order: Vec<u64> = (1..=n).chain(repeats.into_iter().filter(|r| *r >= 1 && *r <= n)).collect();
            // Deterministic shuffle.
            let mut x = seed | 1;
            for i in (1..order.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut d = Dedup::new();
            let mut applied = BTreeSet::new();
            for s in order {
                if d.first_time("a", s) {
                    prop_assert!(applied.insert(s), "applied {} twice", s);
                }
            }
            prop_assert_eq!(applied, (1..=n).collect::<BTreeSet<_>>());
            prop_assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn origins_are_independent() {
        let mut d = Dedup::new();
        assert!(d.first_time("a", 1));
        assert!(d.first_time("b", 1));
        assert!(!d.first_time("a", 1));
        assert!(d.first_time("a", 3));
        assert_eq!(d.pending(), 1);
        assert!(d.first_time("a", 2));
        assert_eq!(d.pending(), 0);
    }
}
