//! The outbox forwarder: drains the edge's durable outbox into the region's
//! JetStream stream.
//!
//! Invariants:
//! - an entry leaves the outbox only after the stream acknowledged it (or
//!   said it already had it): nothing acknowledged to a guest is lost;
//! - entries are sent in outbox order with `Nats-Msg-Id = <origin>:<seq>`,
//!   so a resend after a lost acknowledgement is dropped by JetStream inside
//!   its window and by consumers ([`crate::Dedup`]) beyond it;
//! - a partition only delays: the loop waits for the connection and
//!   retries with backoff, and the guest-facing writes never wait for it.

use crate::envelope::{self, CONTENT_TYPE};
use crate::shred::{DataKey, UserKeys};
use bytes::Bytes;
use keel_bus::{Bus, BusError, ConnectionState, StreamAppend, StreamSpec};
use keel_store::{Outbox, OutboxEntry};
use keel_telemetry::OutboxMetrics;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Entries sent per round (one pipelined batch).
const BATCH: usize = 2048;
/// Backoff after a failed round: doubles from `MIN` to `MAX`.
const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Re-check the outbox this often even without a signal (belt and braces:
/// a signal raised while a round ran is kept by `Notify`, so this is only
/// for entries left by a previous process).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Where the forwarder sends.
#[derive(Clone)]
pub struct ForwarderOptions {
    pub region: String,
    pub edge: String,
    /// The region's event stream (created if missing).
    pub stream: StreamSpec,
    /// Where global events go; `None`: the region's bus, stream
    /// [`global_stream`] with one replica.
    pub global: Option<GlobalRoute>,
    /// The region's user data keys: events and activity about a user are
    /// sealed with the user's key before they leave ([`crate::shred`]).
    /// `None` forwards them in plaintext (benchmarks of the bare path).
    pub keys: Option<Arc<UserKeys>>,
}

/// The global events' bus (the `GLOBAL` account) and stream.
#[derive(Clone)]
pub struct GlobalRoute {
    pub bus: Arc<dyn Bus>,
    pub stream: StreamSpec,
}

/// Subjects of global events: `keel.global.events.<type>`.
pub const GLOBAL_EVENTS_PREFIX: &str = "keel.global.events";

/// The stream of every global event.
pub fn global_stream(replicas: usize) -> StreamSpec {
    StreamSpec {
        name: "KEEL_GLOBAL_EVENTS".into(),
        subjects: vec![format!("{GLOBAL_EVENTS_PREFIX}.>")],
        replicas,
        duplicate_window: Duration::from_secs(120),
        max_age: Some(Duration::from_secs(7 * 24 * 3600)),
        placement: None,
    }
}

/// One destination of outbox entries.
struct Route {
    bus: Arc<dyn Bus>,
    stream: StreamSpec,
    ready: bool,
    connection: tokio::sync::watch::Receiver<ConnectionState>,
}

fn is_global(entry: &OutboxEntry) -> bool {
    matches!(entry, OutboxEntry::Global { .. })
}

/// Subject an edge's outbox is forwarded to.
pub fn edge_events_subject(region: &str, edge: &str) -> String {
    format!("keel.{region}.edge.{edge}.events")
}

/// Starts the forwarder on `rt`. It runs until the runtime shuts down.
pub fn start_forwarder(
    outbox: Arc<dyn Outbox>,
    bus: Arc<dyn Bus>,
    opts: ForwarderOptions,
    metrics: OutboxMetrics,
    rt: &tokio::runtime::Handle,
) {
    rt.spawn(run(outbox, bus, opts, metrics));
}

async fn run(
    outbox: Arc<dyn Outbox>,
    bus: Arc<dyn Bus>,
    opts: ForwarderOptions,
    metrics: OutboxMetrics,
) {
    let origin = envelope::origin_id(&opts.edge, outbox.outbox_incarnation());
    let subject = edge_events_subject(&opts.region, &opts.edge);
    let signal = outbox.outbox_signal();
    let route = |bus: Arc<dyn Bus>, stream: StreamSpec| Route {
        connection: bus.connection_events(),
        bus,
        stream,
        ready: false,
    };
    let global = match &opts.global {
        Some(g) => route(g.bus.clone(), g.stream.clone()),
        None => route(bus.clone(), global_stream(1)),
    };
    // [region, global]
    let mut routes = [route(bus, opts.stream.clone()), global];
    let mut backoff = RETRY_MIN;
    // Entries through `sent` are acknowledged by the stream; their removal
    // from the outbox may still be committing (`removing`), so the next
    // batch goes out while that fsync runs.
    let mut sent = 0u64;
    let mut removing: Option<Removal> = None;
    let mut prepared: Option<Prepared> = None;
    loop {
        // The positions are kept in memory: cheap to ask every round.
        let appended = match outbox.outbox_positions() {
            Ok((last, acked)) => {
                metrics
                    .depth
                    .set(i64::try_from(last.saturating_sub(acked)).unwrap_or(i64::MAX));
                last
            }
            Err(_) => u64::MAX,
        };
        // A batch prepared while the previous one was in flight is used
        // only if it starts right after what the region acknowledged.
        let (mut batch, mut msgs) = match prepared.take() {
            Some(p) if p.batch.first().map(|e| e.0) == Some(sent + 1) => (p.batch, Some(p.msgs)),
            // Nothing appended after what was sent: no need to read.
            _ if appended <= sent => (Vec::new(), None),
            _ => match outbox.outbox_peek(sent, BATCH) {
                Ok(b) => (b, None),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    metrics.errors.inc();
                    tokio::time::sleep(RETRY_MAX).await;
                    continue;
                }
            },
        };
        let region_route = &mut routes[0];
        if batch.is_empty()
            && !region_route.ready
            && *region_route.connection.borrow() == ConnectionState::Connected
        {
            // Create the stream before the first write too: the region's
            // feeds and migration copies need it even while this edge has
            // nothing to forward. (Only the coordinator may create it; the
            // others find it or retry.)
            match region_route.bus.ensure_stream(&region_route.stream).await {
                Ok(()) => region_route.ready = true,
                Err(e) => {
                    tracing::debug!(error = %e, stream = %region_route.stream.name, "region stream not there yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            }
        }
        if batch.is_empty() {
            if let Some(r) = removing.take() {
                finish_removal(r, &metrics, &mut sent).await;
                continue;
            }
            tokio::select! {
                _ = signal.notified() => {}
                _ = tokio::time::sleep(IDLE_CHECK) => {}
            }
            continue;
        }
        // Both destinations take their entries of the batch at once (a chat
        // message is often an event and a global event: one destination per
        // round would make every round one entry long). A destination that
        // is not connected cuts the batch before its first entry.
        let mut waiting_for = None;
        for (d, route) in routes.iter_mut().enumerate() {
            let Some(first) = batch.iter().position(|(_, e)| destination(e) == d) else {
                continue;
            };
            if *route.connection.borrow_and_update() != ConnectionState::Connected {
                batch.truncate(first);
                if batch.is_empty() {
                    waiting_for = Some(d);
                }
            }
        }
        if let Some(d) = waiting_for {
            tokio::select! {
                _ = routes[d].connection.changed() => {}
                _ = tokio::time::sleep(RETRY_MAX) => {}
            }
            continue;
        }
        let mut not_ready = false;
        for (d, route) in routes.iter_mut().enumerate() {
            if route.ready || !batch.iter().any(|(_, e)| destination(e) == d) {
                continue;
            }
            match route.bus.ensure_stream(&route.stream).await {
                Ok(()) => route.ready = true,
                Err(e) => {
                    tracing::warn!(error = %e, stream = %route.stream.name, "cannot ensure the stream");
                    metrics.errors.inc();
                    not_ready = true;
                    break;
                }
            }
        }
        if not_ready {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_MAX);
            continue;
        }
        let msgs = match msgs.take() {
            Some(mut m) => {
                m.truncate(batch.len());
                m
            }
            None => match data_keys(&batch, opts.keys.as_deref()).await {
                Ok(keys) => build(&batch, &opts.region, &origin, &subject, &keys),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot get user data keys; forwarding paused");
                    metrics.errors.inc();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            },
        };
        // Prepare the next batch while this one's acknowledgements are on
        // their way (it goes out only after all of them, so order and
        // "removed only after acknowledged" hold).
        let last = batch[batch.len() - 1].0;
        let send = send_both(&routes, &batch, msgs);
        let prepare = async {
            if outbox
                .outbox_positions()
                .is_ok_and(|(appended, _)| appended <= last)
            {
                return None;
            }
            let next = outbox.outbox_peek(last, BATCH).ok()?;
            if next.is_empty() {
                return None;
            }
            let keys = data_keys(&next, opts.keys.as_deref()).await.ok()?;
            let msgs = build(&next, &opts.region, &origin, &subject, &keys);
            Some(Prepared { batch: next, msgs })
        };
        let (acks, next) = tokio::join!(send, prepare);
        prepared = next;
        let acked = acks.iter().take_while(|a| a.is_ok()).count();
        for a in acks.iter().take(acked).flatten() {
            metrics.forwarded.inc();
            if a.duplicate {
                metrics.duplicates.inc();
            }
        }
        if acked > 0 {
            // One removal in flight at a time, in order.
            if let Some(r) = removing.take() {
                finish_removal(r, &metrics, &mut sent).await;
            }
            sent = batch[acked - 1].0;
            // Spawned: the write future only starts when polled.
            removing = Some(tokio::spawn(outbox.outbox_ack(sent)));
        }
        match acks.get(acked) {
            None => backoff = RETRY_MIN,
            Some(Err(e)) => {
                metrics.errors.inc();
                if matches!(e, BusError::NotFound(_)) {
                    routes[destination(&batch[acked].1)].ready = false;
                }
                tracing::debug!(error = %e, waiting = batch.len() - acked, "outbox forwarding paused");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
            Some(Ok(_)) => {}
        }
    }
}

/// The next batch, built while the previous one was in flight.
struct Prepared {
    batch: Vec<(u64, OutboxEntry)>,
    msgs: Vec<StreamAppend>,
}

/// Where an entry goes: 0 the region's stream, 1 the global one (the
/// index in the forwarder's routes).
fn destination(entry: &OutboxEntry) -> usize {
    usize::from(is_global(entry))
}

/// Sends `msgs` (built from `batch`, one each) to both destinations at
/// once, each its entries in outbox order; the acknowledgements in batch
/// order. A destination stops at its first failure, so the list ends at
/// the first entry without an acknowledgement from its destination (or an
/// error): what precedes it is acknowledged.
async fn send_both(
    routes: &[Route; 2],
    batch: &[(u64, OutboxEntry)],
    msgs: Vec<StreamAppend>,
) -> Vec<keel_bus::BusResult<keel_bus::StreamAck>> {
    let mut split: [Vec<StreamAppend>; 2] = [Vec::new(), Vec::new()];
    for ((_, entry), m) in batch.iter().zip(msgs) {
        split[destination(entry)].push(m);
    }
    let [region, global] = split;
    let send = |d: usize, m: Vec<StreamAppend>| async move {
        if m.is_empty() {
            Vec::new()
        } else {
            routes[d].bus.stream_append_many(m).await
        }
    };
    let (region, global) = tokio::join!(send(0, region), send(1, global));
    let mut acks = [region.into_iter(), global.into_iter()];
    let mut out = Vec::with_capacity(batch.len());
    for (_, entry) in batch {
        match acks[destination(entry)].next() {
            Some(Ok(a)) => out.push(Ok(a)),
            Some(Err(e)) => {
                out.push(Err(e));
                break;
            }
            None => break,
        }
    }
    out
}

/// The user whose data key seals an entry: events and activity about a
/// user. (Global events are pseudonymous by contract; metrics are about no
/// one.)
fn sealed_for(entry: &OutboxEntry) -> Option<&str> {
    match entry {
        OutboxEntry::Event { event, .. } => event.data.user.as_deref(),
        OutboxEntry::Activity { user, .. } => Some(user),
        OutboxEntry::Global { .. } | OutboxEntry::Metric { .. } => None,
    }
}

/// The data keys of the users a batch's entries are about (none without
/// `keys`).
async fn data_keys(
    batch: &[(u64, OutboxEntry)],
    keys: Option<&UserKeys>,
) -> keel_bus::BusResult<HashMap<String, Arc<DataKey>>> {
    let mut out = HashMap::new();
    let Some(keys) = keys else {
        return Ok(out);
    };
    for (_, entry) in batch {
        if let Some(user) = sealed_for(entry)
            && !out.contains_key(user)
        {
            out.insert(user.to_owned(), keys.for_writing(user).await?);
        }
    }
    Ok(out)
}

/// The stream messages of a batch: CloudEvents JSON, `Nats-Msg-Id`
/// `<origin>:<seq>` (global events: `global:<component>:<id>`), payloads
/// about a user sealed with the user's key from `keys`.
fn build(
    batch: &[(u64, OutboxEntry)],
    region: &str,
    origin: &str,
    subject: &str,
    keys: &HashMap<String, Arc<DataKey>>,
) -> Vec<StreamAppend> {
    batch
        .iter()
        .map(|(seq, entry)| {
            let mut event = envelope::outbox_event(region, origin, *seq, entry);
            if let Some(key) = sealed_for(entry).and_then(|u| keys.get(u)) {
                event.seal(key);
            }
            let (subject, msg_id) = match entry {
                OutboxEntry::Global {
                    component,
                    event: g,
                    ..
                } => (
                    format!("{GLOBAL_EVENTS_PREFIX}.{}", g.event_type),
                    envelope::global_msg_id(component, &g.id),
                ),
                _ => (subject.to_string(), envelope::outbox_msg_id(origin, *seq)),
            };
            StreamAppend {
                subject,
                headers: vec![("content-type".into(), CONTENT_TYPE.into())],
                payload: Bytes::from(event.to_json()),
                msg_id: Some(msg_id),
            }
        })
        .collect()
}

/// An outbox removal committing in the background.
type Removal = tokio::task::JoinHandle<keel_store::StoreResult<()>>;

/// Awaits an outbox removal. If it failed, the entries are still in the
/// outbox: rewind so they are sent again (their msg ids make that safe).
async fn finish_removal(removal: Removal, metrics: &OutboxMetrics, sent: &mut u64) {
    let result = removal
        .await
        .unwrap_or_else(|e| Err(keel_store::StoreError::Internal(e.to_string())));
    if let Err(e) = result {
        tracing::error!(error = %e, "cannot remove forwarded entries from the outbox");
        metrics.errors.inc();
        *sent = 0;
        tokio::time::sleep(RETRY_MAX).await;
    }
}
