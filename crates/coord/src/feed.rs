//! The consumer side of a region's stream: a task that follows
//! `KEEL_<REGION>_EVENTS` in stream order and hands every event that is new
//! *in effect* to a [`FeedHandler`].
//!
//! Invariants:
//! - **Stream order, no gaps.** The handler sees events in increasing stream
//!   sequence. An event (or batch) whose `apply` fails is retried, with
//!   backoff, until it succeeds: nothing is skipped and nothing after it is
//!   applied first. (An `Err` must therefore mean "nothing applied", or the
//!   handler must be idempotent for those events.)
//! - **Batches never wait.** A handler with a [`BatchLimit`] above one gets
//!   the new events of one stream read together (consecutive, in order, up
//!   to the limit): a batch is what had arrived, never a reason to wait for
//!   more, so batching adds no latency at low rates and saves per-call cost
//!   (an instance, a transaction, a cursor write) under load.
//! - **Once per write.** [`Dedup`] on `(keelorigin, keeloutboxseq)` drops
//!   copies the stream holds twice (a resend after JetStream's duplicate
//!   window) and messages read again.
//! - **Bad input changes nothing.** A message that is not a Keel CloudEvent
//!   is counted ([`FeedHandle::undecodable`]), logged (1st, then every
//!   100th) and stepped over; it never stops the feed.
//!
//! **Dedup state is rebuilt from the stream.** `Dedup` lives in memory. A
//! feed always reads the stream from sequence 1: messages at or below
//! [`FeedOptions::start_after`] only go through `Dedup` (counted as
//! [`FeedHandle::replayed`]); the handler is called only for sequences above
//! it. `Dedup`'s decisions are a pure function of the (filtered) stream
//! prefix, so a feed restarted with `start_after = ` the last sequence the
//! handler durably applied (it gets the sequence with every event, so it can
//! persist it in the same write as the effect) decides exactly as the first
//! one did. This holds while the stream keeps every message a late resend
//! could duplicate: with `max_age`, the region's stream must outlive the
//! longest partition an edge may resend across, and the filter must be the
//! same on every start.
//!
//! **Wake-ups.** A core subscription to the filter (a stream append is also
//! delivered to core subscribers) wakes the feed for new messages: a task of
//! its own takes every message off the subscription at once and leaves one
//! wake-up permit, so notifications that arrive while the feed reads
//! coalesce instead of queueing in the subscription (a queue that a long
//! read could overflow, making the bus drop messages as a slow consumer);
//! the feed then
//! reads `stream_read(stream, filter, cursor + 1, batch)` until a read comes
//! back empty. Subscriptions are at most once, so the feed also reads every
//! [`FeedOptions::poll_interval`], right after each reconnect, and again
//! after 1, 2, 4, ... 32 ms when a notification's read found nothing (the
//! notification can overtake the stream's store on NATS). A missing stream
//! (`BusError::NotFound`: no edge has forwarded yet) is waited for.

use crate::Dedup;
use crate::envelope::CloudEvent;
use crate::shred::UserKeys;
use async_trait::async_trait;
use keel_bus::{Bus, BusError, ConnectionState, StreamMessage, Subscription};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::sync::watch;
use tokio::time::Instant;

/// Backoff after a failed read: doubles from `MIN` to `MAX` (and never
/// beyond the poll interval).
const READ_RETRY_MIN: Duration = Duration::from_millis(20);
const READ_RETRY_MAX: Duration = Duration::from_secs(1);
/// Backoff between attempts of a failing handler: doubles from `MIN` to `MAX`.
const APPLY_RETRY_MIN: Duration = Duration::from_millis(20);
const APPLY_RETRY_MAX: Duration = Duration::from_secs(5);
/// Second looks after a notification whose read found nothing new (the
/// notification overtook the stream's store): after 1 ms, then doubling,
/// until one finds something or the wait would exceed `RECHECK_MAX`.
const RECHECK_MIN: Duration = Duration::from_millis(1);
const RECHECK_MAX: Duration = Duration::from_millis(32);
/// Undecodable messages are logged on the 1st, 101st, 201st, ...
const UNDECODABLE_LOG_EVERY: u64 = 100;

/// What a feed follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedOptions {
    /// The region's stream, e.g. `KEEL_EU_CENTRAL_EVENTS`.
    pub stream: String,
    /// Subjects to follow, e.g. `keel.eu-central.edge.*.events`.
    pub filter: String,
    /// Stream sequence the handler already applied (0: none). The feed
    /// still reads from 1 to rebuild its dedup state; see the module docs.
    pub start_after: u64,
    /// Fallback read period when no notification arrives.
    pub poll_interval: Duration,
    /// Messages per `stream_read` (at least 1).
    pub batch: usize,
}

impl FeedOptions {
    /// Follows `filter` in `stream` from the start, polling every second,
    /// 256 messages per read.
    pub fn new(stream: impl Into<String>, filter: impl Into<String>) -> FeedOptions {
        FeedOptions {
            stream: stream.into(),
            filter: filter.into(),
            start_after: 0,
            poll_interval: Duration::from_secs(1),
            batch: 256,
        }
    }
}

/// How many new events a handler takes in one [`FeedHandler::apply_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimit {
    /// Most events per batch (at least 1).
    pub events: usize,
    /// Most stream payload bytes per batch; a single larger event still
    /// makes a batch of one.
    pub bytes: usize,
}

impl BatchLimit {
    /// One event at a time.
    pub const ONE: BatchLimit = BatchLimit {
        events: 1,
        bytes: usize::MAX,
    };
}

/// What a feed does with each new-in-effect event.
#[async_trait]
pub trait FeedHandler: Send + Sync {
    /// Applies one event. Called in stream order, once per (origin, outbox
    /// sequence). `Err` makes the feed call it again with the same event
    /// (with backoff) until it returns `Ok`: return `Err` only for transient
    /// failures, and ignore (or count) events that can never apply, or the
    /// feed stops there for good. The future may be dropped at an `.await`
    /// when the feed stops.
    async fn apply(&self, stream_sequence: u64, event: &CloudEvent) -> Result<(), String>;

    /// How many events [`apply_batch`](Self::apply_batch) takes at once.
    fn batch_limit(&self) -> BatchLimit {
        BatchLimit::ONE
    }

    /// Applies consecutive new-in-effect events (stream order, within
    /// [`batch_limit`](Self::batch_limit)); `Err` makes the feed call it
    /// again with the same batch, so a handler that overrides the limit must
    /// apply a batch atomically or idempotently. The default applies one
    /// event after the other, which is only right for the default limit.
    async fn apply_batch(&self, events: &[(u64, CloudEvent)]) -> Result<(), String> {
        for (sequence, event) in events {
            self.apply(*sequence, event).await?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Counters {
    applied: AtomicU64,
    duplicates: AtomicU64,
    undecodable: AtomicU64,
    replayed: AtomicU64,
    erased: AtomicU64,
    handler_errors: AtomicU64,
    read_errors: AtomicU64,
    caught_up: AtomicBool,
}

fn bump(c: &AtomicU64) -> u64 {
    c.fetch_add(1, Ordering::Relaxed) + 1
}

/// A running feed. Dropping it stops the feed (the task is aborted, also in
/// the middle of an `apply`).
pub struct FeedHandle {
    counters: Arc<Counters>,
    cursor: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl FeedHandle {
    /// The last stream sequence the feed is done with: everything at or
    /// below it was applied, or found to be a duplicate or undecodable (or
    /// was at or below `start_after`). Starts at `start_after`.
    pub fn cursor(&self) -> u64 {
        *self.cursor.borrow()
    }

    /// Events the handler applied (in successful `apply_batch` calls).
    pub fn applied(&self) -> u64 {
        self.counters.applied.load(Ordering::Relaxed)
    }

    /// Events above `start_after` skipped as already applied.
    pub fn duplicates(&self) -> u64 {
        self.counters.duplicates.load(Ordering::Relaxed)
    }

    /// Messages above `start_after` that were not Keel CloudEvents.
    pub fn undecodable(&self) -> u64 {
        self.counters.undecodable.load(Ordering::Relaxed)
    }

    /// Messages at or below `start_after`, read only to rebuild dedup state.
    pub fn replayed(&self) -> u64 {
        self.counters.replayed.load(Ordering::Relaxed)
    }

    /// Events stepped over because their user was erased (the data key
    /// that sealed them is gone).
    pub fn erased(&self) -> u64 {
        self.counters.erased.load(Ordering::Relaxed)
    }

    /// Failed `apply` calls (each one was retried).
    pub fn handler_errors(&self) -> u64 {
        self.counters.handler_errors.load(Ordering::Relaxed)
    }

    /// Failed stream reads, a missing stream included.
    pub fn read_errors(&self) -> u64 {
        self.counters.read_errors.load(Ordering::Relaxed)
    }

    /// Whether the feed is idle after a read that found nothing new: it
    /// had everything the stream held then (a view behind it is warm).
    /// False while it reads, retries a handler or a read, or waits for the
    /// stream to exist.
    pub fn caught_up(&self) -> bool {
        self.counters.caught_up.load(Ordering::Relaxed)
    }

    /// Whether the task still runs (false only if a handler panicked).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Waits until [`cursor`](Self::cursor) reaches `sequence`; `false` on
    /// timeout or if the feed ended.
    pub async fn wait_cursor(&self, sequence: u64, timeout: Duration) -> bool {
        let mut rx = self.cursor.clone();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|c| *c >= sequence)).await,
            Ok(Ok(_))
        )
    }
}

impl Drop for FeedHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a feed on `rt`; it runs until the handle is dropped. With
/// `keys`, sealed payloads are opened before the handler sees them, and an
/// event whose user's key was destroyed (an erased user) is stepped over
/// ([`FeedHandle::erased`]); without, they reach the handler sealed.
pub fn start_feed(
    bus: Arc<dyn Bus>,
    opts: FeedOptions,
    keys: Option<Arc<UserKeys>>,
    handler: Arc<dyn FeedHandler>,
    rt: &tokio::runtime::Handle,
) -> FeedHandle {
    let counters = Arc::new(Counters::default());
    let (cursor_tx, cursor_rx) = watch::channel(opts.start_after);
    let feed = Feed {
        bus,
        keys,
        handler,
        counters: counters.clone(),
        cursor: cursor_tx,
        dedup: Dedup::new(),
        position: 0,
        opts,
    };
    FeedHandle {
        counters,
        cursor: cursor_rx,
        task: rt.spawn(feed.run()),
    }
}

struct Feed {
    bus: Arc<dyn Bus>,
    keys: Option<Arc<UserKeys>>,
    opts: FeedOptions,
    handler: Arc<dyn FeedHandler>,
    counters: Arc<Counters>,
    cursor: watch::Sender<u64>,
    dedup: Dedup,
    /// Last stream sequence read (replayed, applied or skipped); the next
    /// read starts after it.
    position: u64,
}

/// Why the feed woke up.
enum Wake {
    Notification,
    SubscriptionClosed,
    Connection(ConnectionState),
    ConnectionEventsClosed,
    Timer,
}

impl Feed {
    async fn run(mut self) {
        let poll = self.opts.poll_interval.max(Duration::from_millis(1));
        let mut connection = self.bus.connection_events();
        let mut connection_open = true;
        let mut subscription: Option<Wakeups> = None;
        let mut subscribe_at = Instant::now();
        let mut read_backoff = READ_RETRY_MIN;
        let mut failing = false;
        let mut notified = false;
        // The current second-look delay (see `RECHECK_MIN`).
        let mut recheck: Option<Duration> = None;
        loop {
            let connected = *connection.borrow_and_update() == ConnectionState::Connected;
            // Subscribe before reading, so nothing appended after the read
            // goes unnoticed.
            if connected && subscription.is_none() && Instant::now() >= subscribe_at {
                match self.bus.subscribe(&self.opts.filter, None).await {
                    Ok(s) => subscription = Some(Wakeups::start(s)),
                    Err(e) => {
                        tracing::debug!(error = %e, filter = %self.opts.filter, "feed: cannot subscribe; polling");
                        subscribe_at = Instant::now() + poll;
                    }
                }
            }
            let wait = if !connected {
                // Reads would fail fast; the reconnect wakes us.
                poll
            } else {
                self.counters.caught_up.store(false, Ordering::Relaxed);
                let drained = self.drain().await;
                self.counters
                    .caught_up
                    .store(drained.is_ok(), Ordering::Relaxed);
                match drained {
                    Ok(read) => {
                        if failing {
                            tracing::info!(stream = %self.opts.stream, "feed: reading again");
                            failing = false;
                        }
                        read_backoff = READ_RETRY_MIN;
                        recheck = if read > 0 {
                            None
                        } else if notified {
                            Some(RECHECK_MIN)
                        } else {
                            recheck.map(|d| d * 2).filter(|d| *d <= RECHECK_MAX)
                        };
                        recheck.map_or(poll, |d| d.min(poll))
                    }
                    Err(e) => {
                        bump(&self.counters.read_errors);
                        if !failing {
                            if matches!(e, BusError::NotFound(_)) {
                                tracing::info!(stream = %self.opts.stream, "feed: waiting for the stream to be created");
                            } else {
                                tracing::warn!(error = %e, stream = %self.opts.stream, "feed: cannot read the stream; retrying");
                            }
                            failing = true;
                        }
                        let wait = read_backoff.min(poll);
                        read_backoff = (read_backoff * 2).min(READ_RETRY_MAX);
                        wait
                    }
                }
            };
            notified = false;
            let wake = {
                let next = async {
                    match subscription.as_ref() {
                        Some(w) => w.next().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    open = next => if open { Wake::Notification } else { Wake::SubscriptionClosed },
                    changed = connection.changed(), if connection_open => match changed {
                        Ok(()) => Wake::Connection(*connection.borrow_and_update()),
                        Err(_) => Wake::ConnectionEventsClosed,
                    },
                    _ = tokio::time::sleep(wait) => Wake::Timer,
                }
            };
            match wake {
                Wake::Notification => notified = true,
                Wake::SubscriptionClosed => {
                    subscription = None;
                    subscribe_at = Instant::now() + poll;
                }
                Wake::Connection(state) => {
                    if state == ConnectionState::Connected {
                        // Read (and resubscribe, if that had failed) now.
                        subscribe_at = Instant::now();
                        read_backoff = READ_RETRY_MIN;
                    }
                }
                Wake::ConnectionEventsClosed => connection_open = false,
                Wake::Timer => {}
            }
        }
    }

    /// Reads from the cursor until a read comes back empty; returns how many
    /// messages it processed.
    async fn drain(&mut self) -> Result<u64, BusError> {
        let limit = self.handler.batch_limit();
        let mut read = 0;
        let mut batch = Batch::default();
        loop {
            let msgs = self
                .bus
                .stream_read(
                    &self.opts.stream,
                    &self.opts.filter,
                    self.position.saturating_add(1),
                    self.opts.batch.max(1),
                )
                .await?;
            if msgs.is_empty() {
                return Ok(read);
            }
            for m in msgs {
                // A backend never returns these; stepping over them keeps
                // the order invariant even if one did.
                if m.sequence <= self.position {
                    continue;
                }
                let size = m.payload.len();
                if let Some(event) = self.process(m).await {
                    if !batch.fits(size, limit) {
                        // Done with everything before this event.
                        self.apply(&mut batch, event.0 - 1).await;
                    }
                    batch.push(event, size);
                } else if batch.events.is_empty() && self.position > self.opts.start_after {
                    self.cursor.send_replace(self.position);
                }
                read += 1;
            }
            // A batch is what one read brought: never wait for more.
            self.apply(&mut batch, self.position).await;
        }
    }

    /// Decodes, dedups and opens one message; the event if the handler
    /// should apply it. Moves `position` past the message either way.
    async fn process(&mut self, m: StreamMessage) -> Option<(u64, CloudEvent)> {
        let sequence = m.sequence;
        self.position = sequence;
        let live = sequence > self.opts.start_after;
        match CloudEvent::from_json(&m.payload) {
            Err(e) if live => {
                let n = bump(&self.counters.undecodable);
                if n % UNDECODABLE_LOG_EVERY == 1 {
                    tracing::warn!(
                        stream = %self.opts.stream,
                        sequence = m.sequence,
                        subject = %m.subject,
                        error = %e,
                        undecodable_total = n,
                        "feed: skipping a message that is not a Keel CloudEvent"
                    );
                }
            }
            Err(_) => {
                bump(&self.counters.replayed);
            }
            Ok(mut event) => {
                let first = self
                    .dedup
                    .first_time(&event.keelorigin, event.keeloutboxseq);
                if !live {
                    bump(&self.counters.replayed);
                } else if !first {
                    bump(&self.counters.duplicates);
                    tracing::debug!(
                        sequence = m.sequence,
                        origin = %event.keelorigin,
                        outbox_sequence = event.keeloutboxseq,
                        "feed: duplicate skipped"
                    );
                } else if event.is_sealed() && !self.open(&mut event).await {
                    bump(&self.counters.erased);
                } else {
                    return Some((sequence, event));
                }
            }
        }
        None
    }

    /// Opens a sealed event with its user's key, retrying while the key
    /// store cannot answer; `false` if the key is gone (or there are no
    /// keys to open it with).
    async fn open(&self, event: &mut CloudEvent) -> bool {
        let (Some(keys), Some(user), Some(id)) =
            (&self.keys, event.keeluser.clone(), event.keelkey.clone())
        else {
            return false;
        };
        let mut backoff = APPLY_RETRY_MIN;
        loop {
            match keys.for_reading(&user, &id).await {
                Ok(Some(key)) => return event.open(&key),
                Ok(None) => return false,
                Err(e) => {
                    bump(&self.counters.handler_errors);
                    tracing::debug!(error = %e, "feed: cannot read a data key; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(APPLY_RETRY_MAX);
                }
            }
        }
    }

    /// Calls the handler with `batch` until it succeeds (nothing if it is
    /// empty), then empties it and moves the cursor to `done_through`.
    async fn apply(&self, batch: &mut Batch, done_through: u64) {
        let Some((sequence, event)) = batch.events.first() else {
            return;
        };
        let (sequence, origin, outbox_sequence) =
            (*sequence, event.keelorigin.clone(), event.keeloutboxseq);
        let mut backoff = APPLY_RETRY_MIN;
        let mut attempts: u64 = 0;
        loop {
            match self.handler.apply_batch(&batch.events).await {
                Ok(()) => {
                    if attempts > 0 {
                        tracing::info!(
                            sequence,
                            attempts = attempts + 1,
                            "feed: applied after retries"
                        );
                    }
                    self.counters
                        .applied
                        .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
                    batch.events.clear();
                    batch.bytes = 0;
                    self.cursor.send_replace(done_through);
                    return;
                }
                Err(e) => {
                    attempts += 1;
                    bump(&self.counters.handler_errors);
                    if attempts.is_power_of_two() {
                        tracing::warn!(
                            stream = %self.opts.stream,
                            sequence,
                            origin = %origin,
                            outbox_sequence,
                            events = batch.events.len(),
                            attempts,
                            error = %e,
                            "feed: handler failed; retrying the same events"
                        );
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(APPLY_RETRY_MAX);
                }
            }
        }
    }
}

/// New events waiting for the handler, consecutive in stream order.
#[derive(Default)]
struct Batch {
    events: Vec<(u64, CloudEvent)>,
    /// Stream payload bytes of `events`.
    bytes: usize,
}

impl Batch {
    /// Whether one more event of `size` bytes stays within `limit` (an
    /// empty batch takes any event).
    fn fits(&self, size: usize, limit: BatchLimit) -> bool {
        self.events.is_empty()
            || (self.events.len() < limit.events.max(1)
                && self.bytes.saturating_add(size) <= limit.bytes)
    }

    fn push(&mut self, event: (u64, CloudEvent), size: usize) {
        self.events.push(event);
        self.bytes = self.bytes.saturating_add(size);
    }
}

/// A feed's wake-up subscription, consumed by a task of its own (see the
/// module docs). Dropping it stops the task and the subscription.
struct Wakeups {
    notify: Arc<Notify>,
    closed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Wakeups {
    fn start(mut subscription: Subscription) -> Wakeups {
        let notify = Arc::new(Notify::new());
        let closed = Arc::new(AtomicBool::new(false));
        let (n, c) = (notify.clone(), closed.clone());
        let task = tokio::spawn(async move {
            while subscription.next().await.is_some() {
                // At most one permit is kept: a burst is one wake-up.
                n.notify_one();
            }
            c.store(true, Ordering::Release);
            n.notify_one();
        });
        Wakeups {
            notify,
            closed,
            task,
        }
    }

    /// Waits for a notification; `false` once the subscription closed.
    async fn next(&self) -> bool {
        self.notify.notified().await;
        !self.closed.load(Ordering::Acquire)
    }
}

impl Drop for Wakeups {
    fn drop(&mut self) {
        self.task.abort();
    }
}
