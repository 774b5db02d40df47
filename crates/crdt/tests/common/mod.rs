//! Shared simulation harness for the property tests: a model per CRDT type
//! (operations on small domains so states collide), replicas with their own
//! HLC clocks, and histories that interleave operations and syncs.

#![allow(dead_code)]

use keel_crdt::*;
use proptest::prelude::*;
use proptest::test_runner::Config;
use std::fmt::Debug;

pub const CASES: u32 = 10_000;

pub fn config() -> Config {
    Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    }
}

/// How a CRDT type is exercised.
pub trait Model: 'static {
    type S: Crdt + Debug;
    type Op: Debug + Clone + 'static;

    fn op() -> BoxedStrategy<Self::Op>;

    /// Applies `op` at `replica` (whose clock is `clock`), returning the delta.
    fn apply(s: &mut Self::S, replica: &ReplicaId, clock: &mut HlcClock, op: &Self::Op) -> Self::S;

    /// The causal context, for types that have one.
    fn context(_s: &Self::S) -> Option<&CausalContext> {
        None
    }

    /// Extra checks on a converged state given every op that was applied.
    fn check_converged(_s: &Self::S, _ops: &[Self::Op]) -> Result<(), TestCaseError> {
        Ok(())
    }
}

pub fn replica_id(i: usize) -> ReplicaId {
    ReplicaId(format!("r{i}"))
}

/// A set of replicas, each with a state and an HLC clock.
pub struct Sim<M: Model> {
    pub states: Vec<M::S>,
    pub clocks: Vec<HlcClock>,
    pub ids: Vec<ReplicaId>,
    /// Every op applied, in order (for exact-sum checks).
    pub ops: Vec<M::Op>,
    /// Every state any replica had (for resurrection checks).
    pub snapshots: Vec<M::S>,
}

impl<M: Model> Sim<M> {
    pub fn new(n: usize) -> Self {
        Sim {
            states: (0..n).map(|_| M::S::default()).collect(),
            clocks: (0..n)
                .map(|i| HlcClock::new(format!("r{i}"), u64::MAX))
                .collect(),
            ids: (0..n).map(replica_id).collect(),
            ops: Vec::new(),
            snapshots: Vec::new(),
        }
    }

    pub fn op(&mut self, r: usize, op: &M::Op) -> M::S {
        self.ops.push(op.clone());
        let delta = M::apply(&mut self.states[r], &self.ids[r], &mut self.clocks[r], op);
        self.snapshots.push(self.states[r].clone());
        delta
    }

    pub fn sync(&mut self, from: usize, to: usize) {
        let src = self.states[from].clone();
        self.states[to].merge(&src);
        self.snapshots.push(self.states[to].clone());
    }

    pub fn run(&mut self, steps: &[Step<M::Op>]) {
        let n = self.states.len();
        for step in steps {
            match step {
                Step::Op(r, op) => {
                    self.op(r % n, op);
                }
                Step::Sync { from, to } => self.sync(from % n, to % n),
            }
        }
    }
}

#[derive(Debug, Clone)]
pub enum Step<O> {
    Op(usize, O),
    Sync { from: usize, to: usize },
}

/// Histories over three replicas: mostly operations, some full-state syncs,
/// so the resulting states overlap partially.
pub fn history<M: Model>(max_len: usize) -> impl Strategy<Value = Vec<Step<M::Op>>> {
    let step = prop_oneof![
        3 => (0..3usize, M::op()).prop_map(|(r, o)| Step::Op(r, o)),
        1 => (0..3usize, 0..3usize).prop_map(|(from, to)| Step::Sync { from, to }),
    ];
    proptest::collection::vec(step, 0..max_len)
}

pub fn run_history<M: Model>(steps: &[Step<M::Op>]) -> Sim<M> {
    let mut sim = Sim::<M>::new(3);
    sim.run(steps);
    sim
}

fn joined<S: Crdt>(a: &S, b: &S) -> S {
    let mut out = a.clone();
    out.merge(b);
    out
}

/// States equal, and (canonical form) byte-identical with equal digests.
fn assert_same<S: Crdt + Debug>(a: &S, b: &S) -> Result<(), TestCaseError> {
    prop_assert_eq!(a, b);
    prop_assert_eq!(encode(a), encode(b));
    prop_assert_eq!(digest(a), digest(b));
    Ok(())
}

pub fn check_associative<M: Model>(steps: &[Step<M::Op>]) -> Result<(), TestCaseError> {
    let sim = run_history::<M>(steps);
    let [a, b, c] = [&sim.states[0], &sim.states[1], &sim.states[2]];
    assert_same(&joined(&joined(a, b), c), &joined(a, &joined(b, c)))
}

pub fn check_commutative<M: Model>(steps: &[Step<M::Op>]) -> Result<(), TestCaseError> {
    let sim = run_history::<M>(steps);
    let [a, b, c] = [&sim.states[0], &sim.states[1], &sim.states[2]];
    assert_same(&joined(a, b), &joined(b, a))?;
    assert_same(&joined(a, c), &joined(c, a))
}

pub fn check_idempotent<M: Model>(steps: &[Step<M::Op>]) -> Result<(), TestCaseError> {
    let sim = run_history::<M>(steps);
    let [a, b] = [&sim.states[0], &sim.states[1]];
    assert_same(&joined(a, a), a)?;
    let ab = joined(a, b);
    assert_same(&joined(&ab, b), &ab)?;
    assert_same(&joined(&ab, a), &ab)
}

/// A mutator's deltas, merged into the pre-mutation state (one by one, or
/// joined into a delta group first), reproduce the post-mutation state; and a
/// replica that had the old state reaches the same state from the deltas as
/// from the new full state.
pub fn check_delta_equals_full<M: Model>(
    steps: &[Step<M::Op>],
    at: usize,
    ops: &[M::Op],
) -> Result<(), TestCaseError> {
    let mut sim = run_history::<M>(steps);
    let x = at % 3;
    let y = (x + 1) % 3;
    let before = sim.states[x].clone();
    let mut stepwise = before.clone();
    let mut group = M::S::default();
    let mut deltas = Vec::new();
    for op in ops {
        let delta = sim.op(x, op);
        stepwise.merge(&delta);
        prop_assert_eq!(&stepwise, &sim.states[x], "after delta of {:?}", op);
        group.merge(&delta);
        deltas.push(delta);
    }
    let after = &sim.states[x];
    assert_same(&joined(&before, &group), after)?;

    let mut via_deltas = joined(&sim.states[y], &before);
    for d in &deltas {
        via_deltas.merge(d);
    }
    assert_same(&via_deltas, &joined(&sim.states[y], after))
}

#[derive(Debug, Clone)]
pub enum Event<O> {
    Op(usize, O),
    /// Deliver the in-flight delta at `pick % len`; keep a copy if `dup`.
    Deliver {
        pick: usize,
        dup: bool,
    },
    Drop {
        pick: usize,
    },
}

pub fn events<M: Model>(max_len: usize) -> impl Strategy<Value = (usize, Vec<Event<M::Op>>)> {
    let ev = prop_oneof![
        4 => (0..4usize, M::op()).prop_map(|(r, o)| Event::Op(r, o)),
        4 => (any::<usize>(), proptest::bool::weighted(0.2))
            .prop_map(|(pick, dup)| Event::Deliver { pick, dup }),
        1 => any::<usize>().prop_map(|pick| Event::Drop { pick }),
    ];
    (3..=4usize, proptest::collection::vec(ev, 0..max_len))
}

/// Replicas exchange deltas over a network that reorders, duplicates and
/// drops them, then run one round of full-state anti-entropy: all must end
/// equal (byte-identical), with compact contexts.
pub fn check_convergence<M: Model>(n: usize, evs: &[Event<M::Op>]) -> Result<(), TestCaseError> {
    let mut sim = Sim::<M>::new(n);
    let mut in_flight: Vec<(usize, M::S)> = Vec::new();
    for ev in evs {
        match ev {
            Event::Op(r, op) => {
                let r = r % n;
                let delta = sim.op(r, op);
                for dest in (0..n).filter(|&d| d != r) {
                    in_flight.push((dest, delta.clone()));
                }
            }
            Event::Deliver { pick, dup } if !in_flight.is_empty() => {
                let i = pick % in_flight.len();
                let (dest, delta) = if *dup {
                    in_flight[i].clone()
                } else {
                    in_flight.swap_remove(i)
                };
                sim.states[dest].merge(&delta);
            }
            Event::Drop { pick } if !in_flight.is_empty() => {
                let i = pick % in_flight.len();
                in_flight.swap_remove(i);
            }
            _ => {}
        }
    }
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let other = sim.states[j].clone();
                sim.states[i].merge(&other);
            }
        }
    }
    for s in &sim.states[1..] {
        assert_same(s, &sim.states[0])?;
    }
    let s = &sim.states[0];
    if let Some(ctx) = M::context(s) {
        prop_assert!(ctx.cloud().is_empty(), "cloud not compacted: {:?}", ctx);
        prop_assert!(ctx.version_vector().len() <= n);
        for (r, &count) in ctx.version_vector() {
            prop_assert!(count > 0, "zero entry for {}", r);
        }
    }
    M::check_converged(s, &sim.ops)
}

pub fn check_round_trip<M: Model>(steps: &[Step<M::Op>]) -> Result<(), TestCaseError> {
    let sim = run_history::<M>(steps);
    for s in &sim.states {
        let bytes = encode(s);
        let back: M::S = decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, s);
        prop_assert_eq!(encode(&back), bytes);
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub enum Mutation {
    Flip { at: usize, xor: u8 },
    Insert { at: usize, byte: u8 },
    Truncate { at: usize },
}

pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let m = prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ];
    proptest::collection::vec(m, 0..4)
}

/// Arbitrary bytes and corrupted valid encodings must decode to an error or
/// a value, never panic; a decoded value must round-trip and be mergeable
/// with genuine states (both ways) without panicking.
pub fn check_decode_hostile<M: Model>(
    raw: &[u8],
    steps: &[Step<M::Op>],
    muts: &[Mutation],
) -> Result<(), TestCaseError> {
    let sim = run_history::<M>(steps);
    let genuine = &sim.states[0];
    let mut corrupted = encode(genuine);
    for m in muts {
        let len = corrupted.len();
        match *m {
            Mutation::Flip { at, xor } if len > 0 => corrupted[at % len] ^= xor,
            Mutation::Insert { at, byte } => corrupted.insert(at % (len + 1), byte),
            Mutation::Truncate { at } => corrupted.truncate(at % (len + 1)),
            _ => {}
        }
    }
    let mut versioned = vec![FORMAT_VERSION];
    versioned.extend_from_slice(raw);
    for input in [raw, &versioned[..], &corrupted[..]] {
        if let Ok(v) = decode::<M::S>(input) {
            let again: M::S =
                decode(&encode(&v)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&again, &v);
            let mut a = v.clone();
            a.merge(genuine);
            let mut b = genuine.clone();
            b.merge(&v);
            let _ = (digest(&a), digest(&b));
        }
    }
    Ok(())
}

/// Generates the standard law, delta, convergence and encoding property
/// tests for one model.
#[macro_export]
macro_rules! crdt_properties {
    ($module:ident, $model:ty) => {
        mod $module {
            use super::*;
            type M = $model;

            proptest! {
                #![proptest_config(config())]

                #[test]
                fn merge_is_associative(h in history::<M>(24)) {
                    check_associative::<M>(&h)?;
                }

                #[test]
                fn merge_is_commutative(h in history::<M>(24)) {
                    check_commutative::<M>(&h)?;
                }

                #[test]
                fn merge_is_idempotent(h in history::<M>(24)) {
                    check_idempotent::<M>(&h)?;
                }

                #[test]
                fn delta_merge_equals_full_state_merge(
                    h in history::<M>(16),
                    at in 0..3usize,
                    ops in proptest::collection::vec(<M as Model>::op(), 1..8),
                ) {
                    check_delta_equals_full::<M>(&h, at, &ops)?;
                }

                #[test]
                fn replicas_converge_despite_lossy_delivery((n, evs) in events::<M>(40)) {
                    check_convergence::<M>(n, &evs)?;
                }

                #[test]
                fn encode_decode_round_trips(h in history::<M>(16)) {
                    check_round_trip::<M>(&h)?;
                }

                #[test]
                fn decoding_hostile_bytes_never_panics(
                    raw in proptest::collection::vec(any::<u8>(), 0..48),
                    h in history::<M>(8),
                    muts in mutations(),
                ) {
                    check_decode_hostile::<M>(&raw, &h, &muts)?;
                }
            }
        }
    };
}
