//! Property tests: lattice laws, delta/full-state equivalence, convergence
//! under lossy delivery, type-specific semantics, HLC monotonicity, encoding
//! robustness and context compaction. 10,000 cases per property.

mod common;

use common::*;
use keel_core::HlcError;
use keel_crdt::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

// ---------------------------------------------------------------- models

struct GCounterModel;
impl Model for GCounterModel {
    type S = GCounter;
    type Op = u64;
    fn op() -> BoxedStrategy<u64> {
        (0..5u64).boxed()
    }
    fn apply(s: &mut GCounter, r: &ReplicaId, _: &mut HlcClock, by: &u64) -> GCounter {
        s.inc(r, *by)
    }
    fn check_converged(s: &GCounter, ops: &[u64]) -> Result<(), TestCaseError> {
        prop_assert_eq!(s.value(), ops.iter().sum::<u64>());
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum PnOp {
    Inc(u64),
    Dec(u64),
}

struct PnCounterModel;
impl Model for PnCounterModel {
    type S = PnCounter;
    type Op = PnOp;
    fn op() -> BoxedStrategy<PnOp> {
        prop_oneof![(0..5u64).prop_map(PnOp::Inc), (0..5u64).prop_map(PnOp::Dec)].boxed()
    }
    fn apply(s: &mut PnCounter, r: &ReplicaId, _: &mut HlcClock, op: &PnOp) -> PnCounter {
        match op {
            PnOp::Inc(by) => s.inc(r, *by),
            PnOp::Dec(by) => s.dec(r, *by),
        }
    }
    fn check_converged(s: &PnCounter, ops: &[PnOp]) -> Result<(), TestCaseError> {
        let expected: i64 = ops
            .iter()
            .map(|op| match op {
                PnOp::Inc(by) => *by as i64,
                PnOp::Dec(by) => -(*by as i64),
            })
            .sum();
        prop_assert_eq!(s.value(), expected);
        Ok(())
    }
}

/// `(wall-clock ms, value)`; the replica's HLC turns the (colliding,
/// sometimes backwards) wall time into a unique timestamp.
struct LwwRegisterModel;
impl Model for LwwRegisterModel {
    type S = LwwRegister<u8>;
    type Op = (u64, u8);
    fn op() -> BoxedStrategy<(u64, u8)> {
        (0..8u64, 0..4u8).boxed()
    }
    fn apply(
        s: &mut LwwRegister<u8>,
        _: &ReplicaId,
        clock: &mut HlcClock,
        (ms, v): &(u64, u8),
    ) -> LwwRegister<u8> {
        let at = clock.now(*ms).expect("small test clock");
        s.set(*v, at)
    }
}

#[derive(Debug, Clone)]
enum SetOp {
    Add(u8),
    Remove(u8),
    Clear,
}

struct OrSetModel;
impl Model for OrSetModel {
    type S = OrSet<u8>;
    type Op = SetOp;
    fn op() -> BoxedStrategy<SetOp> {
        prop_oneof![
            5 => (0..5u8).prop_map(SetOp::Add),
            4 => (0..5u8).prop_map(SetOp::Remove),
            1 => Just(SetOp::Clear),
        ]
        .boxed()
    }
    fn apply(s: &mut OrSet<u8>, r: &ReplicaId, _: &mut HlcClock, op: &SetOp) -> OrSet<u8> {
        match op {
            SetOp::Add(e) => s.add(r, *e),
            SetOp::Remove(e) => s.remove(e),
            SetOp::Clear => s.clear(),
        }
    }
    fn context(s: &OrSet<u8>) -> Option<&CausalContext> {
        Some(s.context())
    }
}

#[derive(Debug, Clone)]
enum MapOp {
    Set { key: u8, value: u8, ms: u64 },
    Remove { key: u8 },
}

fn key(k: u8) -> String {
    format!("k{k}")
}

struct LwwMapModel;
impl Model for LwwMapModel {
    type S = LwwMap<u8>;
    type Op = MapOp;
    fn op() -> BoxedStrategy<MapOp> {
        prop_oneof![
            3 => (0..3u8, 0..4u8, 0..8u64).prop_map(|(key, value, ms)| MapOp::Set { key, value, ms }),
            1 => (0..3u8).prop_map(|key| MapOp::Remove { key }),
        ]
        .boxed()
    }
    fn apply(s: &mut LwwMap<u8>, r: &ReplicaId, clock: &mut HlcClock, op: &MapOp) -> LwwMap<u8> {
        match op {
            MapOp::Set { key: k, value, ms } => {
                let at = clock.now(*ms).expect("small test clock");
                s.set(r, key(*k), *value, at)
            }
            MapOp::Remove { key: k } => s.remove(&key(*k)),
        }
    }
    fn context(s: &LwwMap<u8>) -> Option<&CausalContext> {
        Some(s.context())
    }
}

#[derive(Debug, Clone)]
enum PresenceOp {
    Add { key: u8, e: u8 },
    RemoveElem { key: u8, e: u8 },
    RemoveKey { key: u8 },
}

type Presence = OrMap<u8, OrSet<u8>>;

struct OrMapModel;
impl Model for OrMapModel {
    type S = Presence;
    type Op = PresenceOp;
    fn op() -> BoxedStrategy<PresenceOp> {
        prop_oneof![
            4 => (0..3u8, 0..3u8).prop_map(|(key, e)| PresenceOp::Add { key, e }),
            3 => (0..3u8, 0..3u8).prop_map(|(key, e)| PresenceOp::RemoveElem { key, e }),
            1 => (0..3u8).prop_map(|key| PresenceOp::RemoveKey { key }),
        ]
        .boxed()
    }
    fn apply(s: &mut Presence, r: &ReplicaId, _: &mut HlcClock, op: &PresenceOp) -> Presence {
        match *op {
            PresenceOp::Add { key, e } => s.apply(key, |set| set.add(r, e)),
            PresenceOp::RemoveElem { key, e } => s.apply(key, |set| set.remove(&e)),
            PresenceOp::RemoveKey { key } => s.remove(&key),
        }
    }
    fn context(s: &Presence) -> Option<&CausalContext> {
        Some(s.context())
    }
}

/// `(member, delta)`: mostly small adjustments (exact sums are checked), a
/// few zero deltas (must store nothing) and extremes (must not panic).
struct CounterMapModel;
impl Model for CounterMapModel {
    type S = CounterMap;
    type Op = (u8, i64);
    fn op() -> BoxedStrategy<(u8, i64)> {
        let delta = prop_oneof![
            12 => -4..=4i64,
            1 => prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(i64::MIN + 1)],
        ];
        (0..3u8, delta).boxed()
    }
    fn apply(
        s: &mut CounterMap,
        r: &ReplicaId,
        _: &mut HlcClock,
        (m, by): &(u8, i64),
    ) -> CounterMap {
        s.apply(r, &key(*m), *by)
    }
    fn check_converged(s: &CounterMap, ops: &[(u8, i64)]) -> Result<(), TestCaseError> {
        let touched: BTreeSet<u8> = ops
            .iter()
            .filter(|(_, by)| *by != 0)
            .map(|(m, _)| *m)
            .collect();
        prop_assert_eq!(
            s.len(),
            touched.len(),
            "exactly the adjusted members are stored"
        );
        for m in 0..3u8 {
            let deltas = ops.iter().filter(|(o, _)| *o == m).map(|(_, by)| *by);
            if deltas.clone().all(|by| by.unsigned_abs() <= 4) {
                prop_assert_eq!(s.score(&key(m)), deltas.sum::<i64>());
            }
        }
        Ok(())
    }
}

crdt_properties!(gcounter, GCounterModel);
crdt_properties!(pncounter, PnCounterModel);
crdt_properties!(lww_register, LwwRegisterModel);
crdt_properties!(or_set, OrSetModel);
crdt_properties!(lww_map, LwwMapModel);
crdt_properties!(or_map_of_or_sets, OrMapModel);
crdt_properties!(counter_map, CounterMapModel);

// ------------------------------------------------------- type semantics

/// Brings replicas 0 and 1 to a common state, then lets each run a few more
/// ops of its own (concurrently with the other).
fn diverge<M: Model>(steps: &[Step<M::Op>], ops_a: &[M::Op], ops_b: &[M::Op]) -> Sim<M> {
    let mut sim = run_history::<M>(steps);
    sim.sync(0, 1);
    sim.sync(1, 0);
    for op in ops_a {
        sim.op(0, op);
    }
    for op in ops_b {
        sim.op(1, op);
    }
    sim
}

/// After `removed` is applied to a state whose context was `observed`, merging
/// any earlier snapshot may only bring back writes `observed` did not contain.
fn survivors_unobserved(
    dots: impl IntoIterator<Item = Dot>,
    observed: &CausalContext,
) -> Result<(), TestCaseError> {
    for d in dots {
        prop_assert!(!observed.contains(&d), "removed dot {} resurfaced", d);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn or_set_concurrent_add_wins_over_remove(
        h in history::<OrSetModel>(16),
        ops_a in proptest::collection::vec(OrSetModel::op(), 0..4),
        ops_b in proptest::collection::vec(OrSetModel::op(), 0..4),
        e in 0..5u8,
    ) {
        let mut sim = diverge::<OrSetModel>(&h, &ops_a, &ops_b);
        let d_add = sim.states[0].add(&sim.ids[0], e);
        let d_rm = sim.states[1].remove(&e);
        let (mut a, mut b) = (sim.states[0].clone(), sim.states[1].clone());
        a.merge(&d_rm);
        b.merge(&d_add);
        prop_assert!(a.contains(&e) && b.contains(&e));
        a.merge(&sim.states[1]);
        b.merge(&sim.states[0]);
        prop_assert!(a.contains(&e));
        prop_assert_eq!(a, b);
    }

    #[test]
    fn or_set_removed_element_never_resurfaces(
        h in history::<OrSetModel>(24),
        x in 0..3usize,
        e in 0..5u8,
    ) {
        let mut sim = run_history::<OrSetModel>(&h);
        let observed = sim.states[x].context().clone();
        sim.states[x].remove(&e);
        for snap in &sim.snapshots {
            let mut merged = sim.states[x].clone();
            merged.merge(snap);
            let dots = merged.store().get(&e).map(|s| s.iter().cloned().collect::<Vec<_>>());
            survivors_unobserved(dots.unwrap_or_default(), &observed)?;
        }
    }

    #[test]
    fn lww_map_concurrent_set_wins_over_remove(
        h in history::<LwwMapModel>(16),
        ops_a in proptest::collection::vec(LwwMapModel::op(), 0..4),
        ops_b in proptest::collection::vec(LwwMapModel::op(), 0..4),
        k in 0..3u8,
        v in any::<u8>(),
        ms in 0..8u64,
    ) {
        let mut sim = diverge::<LwwMapModel>(&h, &ops_a, &ops_b);
        // Replica 1 saw everything replica 0 did up to the fork, so the
        // remove covers the writes replica 0 is about to supersede anyway.
        let at = sim.clocks[0].now(ms).expect("small test clock");
        let d_set = sim.states[0].set(&sim.ids[0], key(k), v, at);
        let d_rm = sim.states[1].remove(&key(k));
        let (mut a, mut b) = (sim.states[0].clone(), sim.states[1].clone());
        a.merge(&d_rm);
        b.merge(&d_set);
        prop_assert_eq!(a.get(&key(k)), Some(&v));
        prop_assert!(b.contains_key(&key(k)));
        a.merge(&sim.states[1]);
        b.merge(&sim.states[0]);
        prop_assert_eq!(&a, &b);
        prop_assert!(a.contains_key(&key(k)));
        // The set observed all of replica 0's writes to k; only replica 1's
        // concurrent writes (if any) can compete with it.
        let writes = a.as_or_map().get(key(k).as_str()).map_or(0, |w| w.len());
        prop_assert!(writes >= 1);
    }

    #[test]
    fn lww_map_removed_value_never_resurfaces(
        h in history::<LwwMapModel>(24),
        x in 0..3usize,
        k in 0..3u8,
    ) {
        let mut sim = run_history::<LwwMapModel>(&h);
        let observed = sim.states[x].context().clone();
        sim.states[x].remove(&key(k));
        prop_assert_eq!(sim.states[x].get(&key(k)), None);
        for snap in &sim.snapshots {
            let mut merged = sim.states[x].clone();
            merged.merge(snap);
            let dots = merged
                .as_or_map()
                .get(key(k).as_str())
                .map(|w| w.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>());
            survivors_unobserved(dots.unwrap_or_default(), &observed)?;
            // A snapshot this replica had fully observed brings nothing back.
            if snap.context().version_vector().iter().all(|(r, &n)| observed.version_vector().get(r).is_some_and(|&m| m >= n))
                && snap.context().cloud().iter().all(|d| observed.contains(d))
            {
                prop_assert_eq!(merged.get(&key(k)), None);
            }
        }
    }

    #[test]
    fn or_map_concurrent_update_wins_over_key_remove(
        h in history::<OrMapModel>(16),
        ops_a in proptest::collection::vec(OrMapModel::op(), 0..4),
        ops_b in proptest::collection::vec(OrMapModel::op(), 0..4),
        k in 0..3u8,
        e in 0..3u8,
    ) {
        let mut sim = diverge::<OrMapModel>(&h, &ops_a, &ops_b);
        let r0 = sim.ids[0].clone();
        let d_add = sim.states[0].apply(k, |s| s.add(&r0, e));
        let d_rm = sim.states[1].remove(&k);
        let (mut a, mut b) = (sim.states[0].clone(), sim.states[1].clone());
        a.merge(&d_rm);
        b.merge(&d_add);
        prop_assert!(a.get(&k).is_some_and(|s| s.contains(&e)));
        a.merge(&sim.states[1]);
        b.merge(&sim.states[0]);
        prop_assert_eq!(&a, &b);
        prop_assert!(a.get(&k).is_some_and(|s| s.contains(&e)));
    }

    /// `top` agrees with a naive ranking: sorted by score descending then
    /// member, rank = 1 + number of members with a strictly higher score,
    /// cut at `limit`; and it is the same on every converged replica.
    #[test]
    fn counter_map_top_is_competition_ranking(
        h in history::<CounterMapModel>(24),
        limit in 0..5usize,
    ) {
        let mut sim = run_history::<CounterMapModel>(&h);
        for i in 0..3 {
            for j in 0..3 {
                sim.sync(i, j);
            }
        }
        let s = &sim.states[0];
        let mut all: Vec<(String, i64)> = s.iter().map(|(m, v)| (m.to_string(), v)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let expected: Vec<(u32, String, i64)> = all
            .iter()
            .take(limit)
            .map(|(m, v)| (1 + all.iter().filter(|(_, w)| w > v).count() as u32, m.clone(), *v))
            .collect();
        prop_assert_eq!(s.top(limit), expected);
        prop_assert_eq!(sim.states[1].top(limit), sim.states[2].top(limit));
    }

    /// Dots inserted in any order and split across contexts that are then
    /// merged give one canonical context that contains exactly those dots.
    #[test]
    fn causal_context_is_canonical(
        dots in proptest::collection::vec((0..3usize, 1..10u64), 0..24),
        split in proptest::collection::vec(any::<bool>(), 24),
    ) {
        let dots: Vec<Dot> = dots.into_iter().map(|(r, c)| Dot::new(replica_id(r), c)).collect();
        let set: BTreeSet<Dot> = dots.iter().cloned().collect();
        let sorted: CausalContext = set.iter().cloned().collect();
        let reversed: CausalContext = dots.iter().rev().cloned().collect();
        let (mut left, mut right) = (CausalContext::new(), CausalContext::new());
        for (d, to_left) in dots.iter().zip(&split) {
            if *to_left { left.insert(d.clone()) } else { right.insert(d.clone()) }
        }
        left.merge(&right);
        for c in [&reversed, &left] {
            prop_assert_eq!(c, &sorted);
            prop_assert_eq!(encode(c), encode(&sorted));
        }
        let back: CausalContext = decode(&encode(&sorted)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &sorted);
        for r in 0..3 {
            let id = replica_id(r);
            for counter in 0..12 {
                let d = Dot::new(id.clone(), counter);
                prop_assert_eq!(sorted.contains(&d), counter == 0 || set.contains(&d));
            }
            let max = set.iter().filter(|d| d.replica == id).map(|d| d.counter).max().unwrap_or(0);
            prop_assert_eq!(sorted.next_dot(&id).counter, max + 1);
            // Compact: the vector holds exactly the contiguous prefix.
            let prefix = (1..).take_while(|&c| set.contains(&Dot::new(id.clone(), c))).count() as u64;
            prop_assert_eq!(sorted.version_vector().get(&id).copied().unwrap_or(0), prefix);
        }
        // Canonical: no cloud dot is covered by or contiguous with the vector.
        for d in sorted.cloud() {
            let seen = sorted.version_vector().get(&d.replica).copied().unwrap_or(0);
            prop_assert!(d.counter > seen + 1, "{} should be in the vector", d);
        }
    }
}

// ------------------------------------------------------------------ HLC

#[derive(Debug, Clone)]
enum ClockEvent {
    Now {
        wall: u64,
    },
    Observe {
        wall: u64,
        remote_ms: u64,
        remote_logical: u32,
        remote_node: u8,
    },
}

fn clock_events() -> impl Strategy<Value = Vec<ClockEvent>> {
    let logical = prop_oneof![8 => 0..4u32, 1 => (u32::MAX - 2)..=u32::MAX];
    let ev = prop_oneof![
        (0..20u64).prop_map(|wall| ClockEvent::Now { wall }),
        (0..20u64, 0..30u64, logical, 0..3u8).prop_map(
            |(wall, remote_ms, remote_logical, remote_node)| {
                ClockEvent::Observe {
                    wall,
                    remote_ms,
                    remote_logical,
                    remote_node,
                }
            }
        ),
    ];
    proptest::collection::vec(ev, 0..40)
}

proptest! {
    #![proptest_config(config())]

    /// `now` and `observe` issue strictly increasing timestamps whatever the
    /// wall clock does (including going backwards), `observe` moves past the
    /// remote timestamp, and refusals (drift, logical overflow) change nothing.
    #[test]
    fn hlc_is_strictly_monotonic(events in clock_events()) {
        const DRIFT: u64 = 5;
        let mut clock = HlcClock::new("r1", DRIFT);
        let mut last: Option<Hlc> = None;
        for ev in events {
            let issued = match &ev {
                ClockEvent::Now { wall } => clock.now(*wall),
                ClockEvent::Observe { wall, remote_ms, remote_logical, remote_node } => {
                    let remote = Hlc {
                        physical_ms: *remote_ms,
                        logical: *remote_logical,
                        node: format!("r{remote_node}"),
                    };
                    let res = clock.observe(&remote, *wall);
                    match &res {
                        Ok(t) => prop_assert!(*t > remote, "{:?} not after remote {:?}", t, remote),
                        Err(HlcError::DriftTooLarge { .. }) => prop_assert!(*remote_ms > wall + DRIFT),
                        Err(HlcError::LogicalOverflow) => {}
                    }
                    res
                }
            };
            if let Ok(t) = issued {
                prop_assert_eq!(t.node.as_str(), "r1");
                if let Some(prev) = &last {
                    prop_assert!(t > *prev, "{:?} after {:?} on {:?}", t, prev, ev);
                }
                last = Some(t);
            }
        }
    }
}
