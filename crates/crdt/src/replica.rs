//! Replica identities and dots (unique event identifiers).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Identity of one replica. Every replica that mutates must have a distinct
/// id: dots `(replica, counter)` are only unique if ids are.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReplicaId(pub String);

impl ReplicaId {
    /// Wraps an id.
    pub fn new(id: impl Into<String>) -> Self {
        ReplicaId(id.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ReplicaId {
    fn from(id: &str) -> Self {
        ReplicaId(id.to_owned())
    }
}

impl From<String> for ReplicaId {
    fn from(id: String) -> Self {
        ReplicaId(id)
    }
}

/// One event: the `counter`-th event created by `replica` (counters start
/// at 1). Ordered by `(replica, counter)`, which keeps a replica's dots
/// adjacent in ordered collections (context compaction relies on it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// The replica that created the event.
    pub replica: ReplicaId,
    /// Per-replica sequence number, starting at 1.
    pub counter: u64,
}

impl Dot {
    /// Builds a dot.
    pub fn new(replica: ReplicaId, counter: u64) -> Self {
        Dot { replica, counter }
    }
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.replica, self.counter)
    }
}
