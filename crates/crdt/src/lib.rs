//! Pure delta-state CRDTs for Keel.
//!
//! The types follow Almeida, Shoker and Baquero, *Delta State Replicated
//! Data Types* (2018): every mutator changes `self` **and** returns a delta,
//! a value of the same type that has the same effect when merged into any
//! other replica. Deltas and full states share one type so a single
//! [`Crdt::merge`] (the lattice join: associative, commutative, idempotent)
//! serves delta shipping and full-state anti-entropy alike.
//!
//! Why this shape:
//! - **No I/O, no implicit clocks.** Time enters only as a
//!   [`keel_core::Hlc`] argument, so replicas are deterministic and testable.
//! - **Causal types use dots, never timestamps, to decide removal.** Adds,
//!   removes and overwrites in [`OrSet`], [`OrMap`], [`LwwValue`] and
//!   [`LwwMap`] supersede exactly the writes they observed, tracked by a
//!   shared [`CausalContext`]; a concurrent add/set therefore wins and a
//!   removed value can never resurface through a stale merge. Timestamps
//!   only order *concurrent* surviving writes in the LWW types.
//! - **Canonical form.** Logically equal states are `==` and [`encode`] to
//!   identical bytes (ordered collections, no empty entries, compacted
//!   contexts), so [`digest`] can drive anti-entropy: equal states ⇒ equal
//!   digests.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod context;
mod counter;
mod counter_map;
mod dot_store;
mod encoding;
mod lww;
mod lww_map;
mod or_map;
mod or_set;
mod replica;

pub use context::CausalContext;
pub use counter::{GCounter, PnCounter};
pub use counter_map::CounterMap;
pub use dot_store::{CausalCrdt, DotFun, DotMap, DotSet, DotStore};
pub use encoding::{
    DecodeError, EncodeError, FORMAT_VERSION, decode, digest, digest_encoded, encode, try_encode,
};
pub use keel_core::{Hlc, HlcClock};
pub use lww::{LwwRegister, LwwValue, LwwWrite};
pub use lww_map::LwwMap;
pub use or_map::OrMap;
pub use or_set::OrSet;
pub use replica::{Dot, ReplicaId};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A state-based CRDT whose states (and deltas) form a join-semilattice.
///
/// `merge` must be associative, commutative and idempotent; that is what lets
/// replicas exchange deltas and states in any order, any number of times,
/// and still converge.
pub trait Crdt: Clone + PartialEq + Default + Serialize + DeserializeOwned {
    /// Joins `other` into `self` (least upper bound of the two states).
    fn merge(&mut self, other: &Self);
}

/// Bound for set elements and map keys: ordered (canonical, deterministic
/// iteration) and serializable. Blanket-implemented.
pub trait Element: Ord + Clone + Serialize + DeserializeOwned {}
impl<T: Ord + Clone + Serialize + DeserializeOwned> Element for T {}

/// Bound for register payloads. Blanket-implemented.
pub trait Payload: Clone + PartialEq + Serialize + DeserializeOwned {}
impl<T: Clone + PartialEq + Serialize + DeserializeOwned> Payload for T {}
