//! What replicas send each other, and the two bus tasks that send and
//! receive it. Messages are `keel_crdt::encode`d (a version byte, then
//! postcard); the component is the subject's last token and the scope its
//! prefix (`keel.<region>.` or `keel.global.`).

use super::{Inner, Kind, Outgoing, Scope, Sync, Value, subject};
use bytes::Bytes;
use keel_bus::{Buses, Subscription};
use keel_store::{Namespace, StoreError, StoreResult};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Weak;
use tokio::sync::mpsc;

/// Identifies a CRDT within its component.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Id {
    pub scope: Scope,
    pub kind: Kind,
    pub name: String,
}

impl Id {
    /// The store key of this CRDT (under its component's namespace).
    pub fn encode(&self) -> Vec<u8> {
        keel_crdt::encode(self)
    }

    pub fn decode(b: &[u8]) -> StoreResult<Id> {
        keel_crdt::decode(b).map_err(|e| StoreError::Internal(format!("corrupt CRDT id: {e}")))
    }
}

/// A replica set's digest: each CRDT's id and the digest of its state.
pub(crate) type Digest = Vec<(Id, u64)>;

/// Digest entries per message, so a digest stays far below NATS's
/// `max_payload` however many CRDTs a component has.
const DIGEST_CHUNK: usize = 512;

/// The ids a digest message speaks for: `after < id <= through` (`None` is
/// unbounded), so a receiver can tell "absent from this chunk" from
/// "absent at the sender".
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DigestRange {
    pub after: Option<Id>,
    pub through: Option<Id>,
}

impl DigestRange {
    pub fn covers(&self, id: &Id) -> bool {
        self.after.as_ref().is_none_or(|a| id > a) && self.through.as_ref().is_none_or(|t| id <= t)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Wire {
    /// A delta, or a full state pushed as a repair (same merge).
    State {
        origin: String,
        id: Id,
        value: Value,
    },
    /// Anti-entropy: the sender's digest of every CRDT of this component.
    Digest {
        origin: String,
        entries: Digest,
        range: DigestRange,
    },
    /// The sender lacks these CRDTs; whoever has them pushes them.
    Need { origin: String, ids: Vec<Id> },
}

/// States of several CRDTs, merged per CRDT (a delta group each), in the
/// order each CRDT first appeared: what the publisher sends and the
/// receiver applies once per round instead of once per state.
#[derive(Default)]
struct DeltaGroups {
    states: HashMap<(Namespace, Id), Value>,
    order: Vec<(Namespace, Id)>,
}

impl DeltaGroups {
    fn add(&mut self, ns: Namespace, id: Id, value: Value) {
        let key = (ns, id);
        match self.states.get_mut(&key) {
            Some(acc) => {
                acc.merge(&value);
            }
            None => {
                self.order.push(key.clone());
                self.states.insert(key, value);
            }
        }
    }

    fn into_groups(mut self) -> impl Iterator<Item = (Namespace, Id, Value)> {
        self.order.into_iter().filter_map(move |key| {
            let value = self.states.remove(&key)?;
            Some((key.0, key.1, value))
        })
    }
}

/// Most queued messages coalesced into one publishing round.
const BATCH: usize = 1024;

/// Drains the outgoing queue. Deltas of one CRDT queued together are merged
/// into one message (a delta group), so a hot counter costs one message per
/// round, not one per increment.
pub(crate) async fn publisher(weak: Weak<Inner>, buses: Buses, mut rx: mpsc::Receiver<Outgoing>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let Some(inner) = weak.upgrade() else { return };
        let sync = Sync { inner };
        let me = sync.inner.replica.0.clone();
        let region = sync.inner.region.clone();
        let mut states = DeltaGroups::default();
        let mut control = Vec::new();
        for m in batch.drain(..) {
            match m {
                Outgoing::Delta { ns, id, delta } => states.add(ns, id, delta),
                Outgoing::Full { ns, id } => {
                    if let Some(v) = sync.full_state(&ns, &id) {
                        sync.inner.metrics.repairs_sent.inc();
                        states.add(ns, id, v);
                    }
                }
                Outgoing::Digest => {
                    for (scope, ns, entries) in sync.digests() {
                        let chunks: Vec<&[(Id, u64)]> = entries.chunks(DIGEST_CHUNK).collect();
                        for (i, chunk) in chunks.iter().enumerate() {
                            let range = DigestRange {
                                after: (i > 0)
                                    .then(|| chunks[i - 1].last().map(|e| e.0.clone()))
                                    .flatten(),
                                through: (i + 1 < chunks.len())
                                    .then(|| chunk.last().map(|e| e.0.clone()))
                                    .flatten(),
                            };
                            sync.inner.metrics.digests_sent.inc();
                            let w = Wire::Digest {
                                origin: me.clone(),
                                entries: chunk.to_vec(),
                                range,
                            };
                            control.push((scope, ns.clone(), w));
                        }
                    }
                }
                Outgoing::Need { ns, scope, ids } => control.push((
                    scope,
                    ns,
                    Wire::Need {
                        origin: me.clone(),
                        ids,
                    },
                )),
            }
        }
        for (ns, id, value) in states.into_groups() {
            let scope = id.scope;
            let w = Wire::State {
                origin: me.clone(),
                id,
                value,
            };
            if let Some(n) = send(&buses, &region, scope, &ns, &w).await {
                sync.inner.metrics.deltas_sent.inc();
                sync.inner.metrics.delta_bytes_sent.inc_by(n as u64);
            }
        }
        for (scope, ns, w) in control {
            send(&buses, &region, scope, &ns, &w).await;
        }
    }
}

/// Publishes one message; the payload size if the bus took it.
async fn send(
    buses: &Buses,
    region: &str,
    scope: Scope,
    ns: &Namespace,
    w: &Wire,
) -> Option<usize> {
    let subject = subject(region, scope, ns)?;
    let payload = keel_crdt::encode(w);
    let n = payload.len();
    match buses
        .for_subject(&subject)
        .publish(&subject, Vec::new(), Bytes::from(payload))
        .await
    {
        Ok(()) => Some(n),
        Err(e) => {
            // Anti-entropy repairs whatever a disconnected bus loses.
            tracing::debug!(error = %e, %subject, "sync publish failed");
            None
        }
    }
}

/// Subscribes to the region's and the globe's sync subjects and merges
/// what arrives.
pub(crate) async fn receiver(weak: Weak<Inner>, buses: Buses) {
    let Some(region) = weak.upgrade().map(|i| i.region.clone()) else {
        return;
    };
    for (filter, scope) in [
        (format!("keel.{region}.crdt.*"), Scope::Region),
        ("keel.global.crdt.*".to_string(), Scope::Global),
    ] {
        match buses.for_subject(&filter).subscribe(&filter, None).await {
            Ok(sub) => {
                tokio::spawn(receive(weak.clone(), sub, scope));
            }
            Err(e) => tracing::error!(error = %e, %filter, "cannot subscribe to state sync"),
        }
    }
}

/// Most messages [`receive`] takes off its subscription at once.
const RECEIVE_BATCH: usize = 256;

/// Merges what arrives on one sync subscription. It takes every message
/// already queued (up to [`RECEIVE_BATCH`]) at once and merges the states
/// for the same CRDT before applying them, so a burst of deltas to one CRDT
/// (a global counter every node increments) costs one merge into the
/// replica and one save instead of one each; a receiver that fell behind
/// catches up instead of letting the subscription's queue overflow. States
/// are applied before the batch's digests and needs are answered (all are
/// merges, so order does not matter for the result; this way a digest is
/// compared with the freshest state).
async fn receive(weak: Weak<Inner>, mut sub: Subscription, scope: Scope) {
    let mut batch = Vec::with_capacity(RECEIVE_BATCH);
    while let Some(first) = sub.next().await {
        batch.push(first);
        let mut open = true;
        while batch.len() < RECEIVE_BATCH {
            tokio::select! {
                biased;
                m = sub.next() => match m {
                    Some(m) => batch.push(m),
                    None => {
                        open = false;
                        break;
                    }
                },
                () = std::future::ready(()) => break,
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        let sync = Sync { inner };
        let me = &sync.inner.replica.0;
        let mut states = DeltaGroups::default();
        let mut others = Vec::new();
        for msg in batch.drain(..) {
            let ns = msg.subject.rsplit('.').next().and_then(Namespace::new);
            let wire = keel_crdt::decode::<Wire>(&msg.payload);
            let (Some(ns), Ok(wire)) = (ns, wire) else {
                sync.inner.metrics.rejected.inc();
                continue;
            };
            match wire {
                Wire::State { origin, .. }
                | Wire::Digest { origin, .. }
                | Wire::Need { origin, .. }
                    if &origin == me => {}
                Wire::State { id, value, .. } => {
                    if id.scope != scope || value.kind() != id.kind {
                        sync.inner.metrics.rejected.inc();
                        continue;
                    }
                    states.add(ns, id, value);
                }
                other => others.push((ns, other)),
            }
        }
        for (ns, id, value) in states.into_groups() {
            sync.apply_remote(ns, id, value);
        }
        for (ns, wire) in others {
            match wire {
                Wire::Digest { entries, range, .. } => {
                    sync.compare_digest(ns, scope, entries, &range)
                }
                Wire::Need { ids, .. } => {
                    for id in ids.into_iter().filter(|id| id.scope == scope) {
                        sync.enqueue(Outgoing::Full { ns: ns.clone(), id });
                    }
                }
                Wire::State { .. } => {}
            }
        }
        if !open {
            return;
        }
    }
}
