//! Hybrid logical clocks (Kulkarni et al., 2014): timestamps that follow
//! wall-clock time when clocks behave, and still order causally related
//! events when they do not.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

/// One HLC timestamp. Ordered by (physical, logical, node): `node` breaks
/// ties so two replicas never produce equal timestamps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch.
    pub physical_ms: u64,
    pub logical: u32,
    pub node: String,
}

impl Ord for Hlc {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.physical_ms, self.logical, &self.node).cmp(&(
            other.physical_ms,
            other.logical,
            &other.node,
        ))
    }
}

impl PartialOrd for Hlc {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HlcError {
    /// A remote timestamp is further ahead of our wall clock than allowed.
    DriftTooLarge {
        remote_ms: u64,
        local_ms: u64,
        max_drift_ms: u64,
    },
    /// The logical counter would overflow (more than 2^32 events within one
    /// millisecond of a stuck clock).
    LogicalOverflow,
}

impl std::fmt::Display for HlcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HlcError::DriftTooLarge {
                remote_ms,
                local_ms,
                max_drift_ms,
            } => write!(
                f,
                "remote clock {remote_ms} ms is {} ms ahead of local {local_ms} ms (max drift {max_drift_ms} ms)",
                remote_ms - local_ms
            ),
            HlcError::LogicalOverflow => f.write_str("hlc logical counter overflow"),
        }
    }
}

impl std::error::Error for HlcError {}

/// The clock of one node. Not thread-safe by itself; wrap in a mutex.
#[derive(Debug, Clone)]
pub struct HlcClock {
    node: String,
    physical_ms: u64,
    logical: u32,
    max_drift_ms: u64,
}

impl HlcClock {
    pub fn new(node: impl Into<String>, max_drift_ms: u64) -> Self {
        HlcClock {
            node: node.into(),
            physical_ms: 0,
            logical: 0,
            max_drift_ms,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Timestamp for a local event at wall-clock time `now_ms`. Strictly
    /// greater than every timestamp this clock issued or observed before.
    pub fn now(&mut self, now_ms: u64) -> Result<Hlc, HlcError> {
        if now_ms > self.physical_ms {
            self.physical_ms = now_ms;
            self.logical = 0;
        } else {
            self.logical = self
                .logical
                .checked_add(1)
                .ok_or(HlcError::LogicalOverflow)?;
        }
        Ok(self.current())
    }

    /// Merges a timestamp received from another node, refusing one that is
    /// more than `max_drift_ms` ahead of the local wall clock (a broken or
    /// malicious clock must not drag every node into the future).
    pub fn observe(&mut self, remote: &Hlc, now_ms: u64) -> Result<Hlc, HlcError> {
        if remote.physical_ms > now_ms.saturating_add(self.max_drift_ms) {
            return Err(HlcError::DriftTooLarge {
                remote_ms: remote.physical_ms,
                local_ms: now_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }
        let physical = self.physical_ms.max(remote.physical_ms).max(now_ms);
        let logical = if physical == self.physical_ms && physical == remote.physical_ms {
            self.logical.max(remote.logical).checked_add(1)
        } else if physical == self.physical_ms {
            self.logical.checked_add(1)
        } else if physical == remote.physical_ms {
            remote.logical.checked_add(1)
        } else {
            Some(0)
        };
        self.logical = logical.ok_or(HlcError::LogicalOverflow)?;
        self.physical_ms = physical;
        Ok(self.current())
    }

    fn current(&self) -> Hlc {
        Hlc {
            physical_ms: self.physical_ms,
            logical: self.logical,
            node: self.node.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_when_wall_clock_goes_backwards() {
        let mut c = HlcClock::new("a", 1000);
        let t1 = c.now(100).unwrap();
        let t2 = c.now(50).unwrap();
        let t3 = c.now(100).unwrap();
        assert!(t1 < t2 && t2 < t3, "{t1:?} {t2:?} {t3:?}");
    }

    #[test]
    fn observe_moves_past_remote() {
        let mut a = HlcClock::new("a", 1000);
        let remote = Hlc {
            physical_ms: 500,
            logical: 7,
            node: "b".into(),
        };
        let t = a.observe(&remote, 400).unwrap();
        assert!(t > remote);
        assert!(a.now(400).unwrap() > t);
    }

    #[test]
    fn refuses_remote_far_in_the_future() {
        let mut a = HlcClock::new("a", 1000);
        let remote = Hlc {
            physical_ms: 10_000,
            logical: 0,
            node: "b".into(),
        };
        assert!(matches!(
            a.observe(&remote, 100),
            Err(HlcError::DriftTooLarge { .. })
        ));
        // Refusal changed nothing.
        assert_eq!(a.now(100).unwrap().physical_ms, 100);
    }
}
