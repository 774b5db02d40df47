//! Vocabulary shared by every Keel crate: hybrid logical clock timestamps.
//!
//! Pure: no I/O, no clock reads. Callers pass wall-clock time in, so the
//! same code runs under tests with a controlled clock.

mod hlc;

pub use hlc::{Hlc, HlcClock, HlcError};
