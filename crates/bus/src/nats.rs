//! [`NatsBus`]: the bus over `async-nats` core NATS and JetStream.
//!
//! **Connection.** [`NatsBus::connect`] never fails because servers are
//! unreachable: the client connects in the background
//! (`retry_on_initial_connect`) and the bus reports
//! [`ConnectionState::Connecting`] until it does. Reconnects never give up.
//! The reconnect delay grows exponentially from
//! [`NatsOptions::min_reconnect_delay`] (10 ms) to
//! [`NatsOptions::max_reconnect_delay`] (500 ms), so after a partition heals
//! the bus is back within about half a second; the first attempt after a
//! loss is immediate. Pings every [`NatsOptions::ping_interval`] (2 s) notice
//! a black-holed link (async-nats disconnects after two unanswered pings).
//!
//! **State.** async-nats events drive a `tokio::sync::watch` channel:
//! `Disconnected`/`Closed` → [`ConnectionState::Disconnected`] at once;
//! `Connected` → a round trip through a private inbox first (see
//! [`NatsBus::round_trip`]), then [`ConnectionState::Connected`]. async-nats
//! re-sends its subscriptions right after reconnecting, before that round
//! trip, so when the state says `Connected` every existing [`Subscription`]
//! is live on the server again — the sync service can run anti-entropy
//! right away. (In a cluster, interest still takes a moment to reach the
//! other servers.)
//!
//! **Fail fast.** While the state is not `Connected`, calls that need the
//! server (publish, request, streams, KV) return [`BusError::Unavailable`] at
//! once instead of queueing in the client: a publisher is never blocked by a
//! partition. Only `subscribe` works in any state (the subscription is
//! registered on the server when the connection comes back).
//!
//! **No responders on JetStream writes.** Right after an R3 stream is
//! created its subject interest is still propagating between servers, and
//! while a stream elects a new leader nobody listens on its subjects. A
//! `stream_append` or KV write that meets "no responders" therefore asks
//! once whether the stream (bucket) exists — `NotFound` at once if not —
//! and otherwise retries with a 25 ms → 250 ms backoff within
//! `request_timeout` (nats.go does the same). That is safe without a
//! `msg_id`: a message nobody received was not stored.
//!
//! **Subscription buffers.** async-nats queues each subscription's messages
//! until the subscriber takes them, up to [`SUBSCRIPTION_CAPACITY`] (1024;
//! async-nats's own default is 65,536); beyond that it drops new ones (a
//! *slow consumer*, logged at most every 10 s with a count). A queued
//! message keeps its part of the connection's read buffer alive, so the
//! bound is what keeps a lagging subscriber from holding the node's memory:
//! under the chat load (BENCHMARKS.md) the feeds' wake-up subscriptions,
//! which carry every event of the stream, held ~65,000 messages (~75 MB)
//! per node with the default, and still 10-20 MB with 4096 (feeds now take
//! their wake-ups off the subscription at once). Every core NATS
//! subscriber of keel tolerates drops (wake-ups, CRDT deltas repaired by
//! anti-entropy, snapshots, requests retried after their timeout), and a
//! drop changes [`Bus::connection_epoch`], so the cache forgets the L1
//! entries it may have missed an invalidation of, as after a reconnect.
//! JetStream fetches queue in a subscription too, so no
//! fetch asks for as many (`list_keys` pages by 512; feeds read 256, the
//! ledger 512).
//!
//! **Publish path.** `publish` is one async-nats `publish` (a channel send to
//! the connection task): no extra task hop, no allocation beyond the
//! subject and, when there are headers, the header map.
//!
//! **Headers.** [`Headers`] travel as NATS headers. NATS keeps header names
//! in a hash map, so on receipt headers are sorted by name (values of one
//! name keep their order). Names starting with `Nats-` are the server's
//! (`Nats-Msg-Id`, …) and are not passed to callers.
//!
//! **`stream_read`.** Creates an ephemeral pull consumer (memory storage,
//! one replica, no acks, `DeliverPolicy::ByStartSequence`, the filter) and
//! does one no-wait fetch of `min(max, num_pending)` messages, where
//! `num_pending` comes back with the consumer's creation. That is two round
//! trips for any batch size, works on replicated streams, never waits for
//! messages that do not exist, and the whole call is bounded by
//! [`NatsOptions::request_timeout`]. The consumer is deleted in the
//! background afterwards (its `inactive_threshold` is the backstop). The
//! consumer reads at the stream leader, so a read sees every acknowledged
//! append. Trade-off: in a cluster, creating a consumer needs the JetStream
//! meta leader, so reads fail (`Timeout`) for the few seconds the meta group
//! takes to elect a new one after losing its leader, while appends only
//! need the stream's leader. Rejected: `STREAM.MSG.GET` (one round trip per
//! message) and batched direct get (replicas answer too, so a read could
//! miss a just-acknowledged append).

use crate::{
    Bus, BusError, BusResult, ConnectionState, Headers, KvEntry, KvSpec, KvWatch, KvWatchSource,
    Message, StreamAck, StreamAppend, StreamMessage, StreamSpec, Subscription, SubscriptionSource,
    check_filter_subject, check_headers, check_kv_key, check_kv_key_pattern, check_name,
    check_publish_subject, check_queue_group,
};
use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::{Event, HeaderMap};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// How to reach NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsOptions {
    /// Server URLs (`nats://host:port`); the client picks one and fails over.
    pub servers: Vec<String>,
    /// Client name shown by the server (`/connz`).
    pub name: String,
    /// Deadline for one connection attempt (TCP + handshake).
    pub connect_timeout: Duration,
    /// Client pings the server this often; two unanswered pings disconnect.
    pub ping_interval: Duration,
    /// Delay before the second reconnect attempt (the first is immediate);
    /// doubles per attempt.
    pub min_reconnect_delay: Duration,
    /// Cap of the reconnect delay.
    pub max_reconnect_delay: Duration,
    /// Deadline for JetStream calls (acks, stream/KV API, `stream_read`).
    pub request_timeout: Duration,
    /// User and password, if the servers require them (a `regions.toml`
    /// deployment derives them from its secret; see `keel-topology`).
    pub credentials: Option<(String, String)>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            servers: vec!["nats://127.0.0.1:4222".into()],
            name: "keel".into(),
            connect_timeout: Duration::from_secs(2),
            ping_interval: Duration::from_secs(2),
            min_reconnect_delay: Duration::from_millis(10),
            max_reconnect_delay: Duration::from_millis(500),
            request_timeout: Duration::from_secs(5),
            credentials: None,
        }
    }
}

impl NatsOptions {
    /// Default options for these servers.
    pub fn new<S: Into<String>>(servers: impl IntoIterator<Item = S>) -> Self {
        NatsOptions {
            servers: servers.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// Reconnect delay for the `attempts`-th consecutive attempt (1-based):
/// zero for the first, then `min · 2^(attempts-2)` capped at `max`.
pub fn reconnect_delay(attempts: usize, min: Duration, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = (attempts - 2).min(20) as u32;
    min.saturating_mul(1u32 << exp).min(max)
}

/// The bus over NATS. Cheap to clone. The connection closes when the last
/// clone and the last [`Subscription`] are dropped (or on
/// [`NatsBus::shutdown`]).
#[derive(Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    state: Arc<StateCell>,
    request_timeout: Duration,
    streams: Mutex<HashMap<String, stream::Stream>>,
    buckets: Mutex<HashMap<String, Arc<kv::Store>>>,
    /// Pull consumers of finished reads by (stream, filter, the sequence
    /// they deliver next): a read that continues where one ended (a feed
    /// following a stream) fetches from it instead of creating a consumer
    /// (a JetStream API round trip and server work per read).
    read_consumers: Mutex<HashMap<ReadKey, (ReadConsumer, std::time::Instant)>>,
}

type ReadKey = (String, String, u64);
type ReadConsumer = consumer::Consumer<consumer::pull::Config>;
/// Messages queued per subscription before async-nats drops new ones (see
/// the module docs); no fetch asks for as many.
pub const SUBSCRIPTION_CAPACITY: usize = 1024;
/// Slow-consumer drops are logged at most this often (with a count).
const SLOW_CONSUMER_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// The header a KV delete or purge marker carries (`DEL`, `PURGE`).
const KV_OPERATION_HEADER: &str = "KV-Operation";
/// Idle read consumers are deleted by the server after this...
const READ_CONSUMER_INACTIVE: Duration = Duration::from_secs(30);
/// ...so they are reused only if idle for less than this.
const READ_CONSUMER_REUSE: Duration = Duration::from_secs(20);
/// Parked read consumers at most (one per feed position in practice).
const READ_CONSUMERS_MAX: usize = 256;

impl Drop for Inner {
    fn drop(&mut self) {
        // The event callback (owned by the connection task) holds the state
        // cell; a client in it would keep the connection alive forever.
        lock(&self.state.client).take();
    }
}

/// Connection state, written by the async-nats event callback.
struct StateCell {
    tx: watch::Sender<ConnectionState>,
    /// Bumped on every Connected/Disconnected event; a post-connect round trip
    /// only publishes `Connected` if no event came in between. The lock also
    /// orders that check against the event task's writes.
    generation: Mutex<u64>,
    client: Mutex<Option<async_nats::Client>>,
    round_trip_timeout: Duration,
    /// Messages dropped by slow consumers since the last warning, and when
    /// that was.
    slow_consumer: Mutex<(u64, Option<std::time::Instant>)>,
    /// Messages dropped by slow consumers, ever: part of
    /// [`Bus::connection_epoch`], since whoever lost one may have missed
    /// something (the bus cannot tell which subscription it was).
    dropped: std::sync::atomic::AtomicU64,
}

impl StateCell {
    fn set(&self, state: ConnectionState) {
        self.tx.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
    }

    fn on_event(self: &Arc<Self>, event: Event) {
        match event {
            Event::Connected => {
                let generation = {
                    let mut g = lock(&self.generation);
                    *g += 1;
                    *g
                };
                let client = lock(&self.client).clone();
                match client {
                    // First connection, before `connect` stored the client:
                    // there are no subscriptions to re-establish yet.
                    None => self.set(ConnectionState::Connected),
                    Some(client) => {
                        let cell = self.clone();
                        tokio::spawn(async move {
                            if let Err(e) = round_trip(&client, cell.round_trip_timeout).await {
                                tracing::debug!("nats: round trip after connect: {e}");
                            }
                            let g = lock(&cell.generation);
                            if *g == generation {
                                cell.set(ConnectionState::Connected);
                            }
                        });
                    }
                }
                tracing::info!("nats: connected");
            }
            Event::Disconnected | Event::Closed => {
                let mut g = lock(&self.generation);
                *g += 1;
                self.set(ConnectionState::Disconnected);
                drop(g);
                tracing::warn!("nats: {event}");
            }
            Event::LameDuckMode => tracing::warn!("nats: server entered lame duck mode"),
            Event::SlowConsumer(sid) => {
                // One event per dropped message: count them, warn now and then.
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut slow = lock(&self.slow_consumer);
                slow.0 += 1;
                if slow
                    .1
                    .is_none_or(|at| at.elapsed() >= SLOW_CONSUMER_LOG_INTERVAL)
                {
                    tracing::warn!(
                        dropped = slow.0,
                        "nats: slow consumer (latest on subscription {sid}): messages dropped since the last report"
                    );
                    *slow = (0, Some(std::time::Instant::now()));
                }
            }
            Event::ServerError(e) => tracing::warn!("nats: server error: {e}"),
            Event::ClientError(e) => tracing::debug!("nats: client error: {e}"),
            Event::Draining => tracing::info!("nats: draining"),
        }
    }
}

/// Publishes to a fresh inbox this client subscribes to and waits for the
/// message to come back. The server handles a connection's commands in
/// order, so on return it has processed everything sent before (notably the
/// subscriptions async-nats re-sends after a reconnect). async-nats's own
/// `flush` only flushes the socket.
async fn round_trip(client: &async_nats::Client, timeout: Duration) -> BusResult<()> {
    let inbox = client.new_inbox();
    let work = async {
        let mut sub = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        client
            .publish(inbox, Bytes::new())
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        sub.next()
            .await
            .map(|_| ())
            .ok_or_else(|| BusError::Unavailable("connection closed".into()))
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(BusError::Timeout(timeout)))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl NatsBus {
    /// Starts connecting and returns at once; see the module docs. Fails
    /// only on malformed options.
    pub async fn connect(opts: NatsOptions) -> BusResult<NatsBus> {
        if opts.servers.is_empty() {
            return Err(BusError::Invalid("no NATS servers configured".into()));
        }
        let addrs = opts
            .servers
            .iter()
            .map(|s| {
                s.parse::<async_nats::ServerAddr>()
                    .map_err(|e| BusError::Invalid(format!("bad NATS server URL {s:?}: {e}")))
            })
            .collect::<BusResult<Vec<_>>>()?;
        let (tx, _) = watch::channel(ConnectionState::Connecting);
        let state = Arc::new(StateCell {
            tx,
            generation: Mutex::new(0),
            client: Mutex::new(None),
            round_trip_timeout: opts.request_timeout,
            slow_consumer: Mutex::new((0, None)),
            dropped: Default::default(),
        });
        let (min, max) = (opts.min_reconnect_delay, opts.max_reconnect_delay);
        let cell = state.clone();
        let base = match &opts.credentials {
            Some((user, password)) => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            None => async_nats::ConnectOptions::new(),
        };
        let client = base
            .name(&opts.name)
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .connection_timeout(opts.connect_timeout)
            .ping_interval(opts.ping_interval)
            .request_timeout(Some(opts.request_timeout))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, min, max))
            .event_callback(move |event| {
                let cell = cell.clone();
                async move { cell.on_event(event) }
            })
            .connect(addrs)
            .await
            .map_err(|e| BusError::Invalid(format!("NATS connect: {e}")))?;
        *lock(&state.client) = Some(client.clone());
        let mut js = jetstream::new(client.clone());
        js.set_timeout(opts.request_timeout);
        Ok(NatsBus {
            inner: Arc::new(Inner {
                client,
                js,
                state,
                request_timeout: opts.request_timeout,
                streams: Mutex::new(HashMap::new()),
                buckets: Mutex::new(HashMap::new()),
                read_consumers: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Waits until the state is `Connected`; `Timeout` otherwise.
    pub async fn wait_connected(&self, timeout: Duration) -> BusResult<()> {
        let mut rx = self.inner.state.tx.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|s| *s == ConnectionState::Connected)).await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(BusError::Unavailable("bus closed".into())),
            Err(_) => Err(BusError::Timeout(timeout)),
        }
    }

    /// Returns once the server has processed everything this bus sent
    /// before (subscriptions included): a round trip through a private
    /// inbox. `Timeout` if that takes longer than `timeout`.
    pub async fn round_trip(&self, timeout: Duration) -> BusResult<()> {
        round_trip(&self.inner.client, timeout).await
    }

    /// The underlying client (benchmarks, diagnostics).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// Drains subscriptions and closes the connection; subscriptions then
    /// end with `None`.
    pub async fn shutdown(&self) -> BusResult<()> {
        self.inner
            .client
            .drain()
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))
    }

    fn ensure_connected(&self) -> BusResult<()> {
        match *self.inner.state.tx.borrow() {
            ConnectionState::Connected => Ok(()),
            s => Err(BusError::Unavailable(format!(
                "not connected to NATS ({})",
                s.as_str()
            ))),
        }
    }

    /// Checks a stream append's arguments and connection, and builds the
    /// JetStream message (shared by `stream_append` and
    /// `stream_append_many`).
    fn stream_message(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        msg_id: Option<&str>,
    ) -> BusResult<jetstream::message::PublishMessage> {
        check_publish_subject(subject)?;
        check_headers(&headers)?;
        if let Some(id) = msg_id
            && (id.is_empty() || id.contains(['\r', '\n']))
        {
            return Err(BusError::Invalid(format!("invalid msg_id {id:?}")));
        }
        self.ensure_connected()?;
        let mut msg = jetstream::message::PublishMessage::build().payload(payload);
        if let Some(h) = to_header_map(headers) {
            msg = msg.headers(h);
        }
        if let Some(id) = msg_id {
            msg = msg.message_id(id);
        }
        Ok(msg)
    }

    /// Publishes `msg` to the stream capturing `subject` and waits for the
    /// acknowledgement, riding out a leader election.
    async fn publish_to_stream(
        &self,
        subject: &str,
        msg: jetstream::message::PublishMessage,
    ) -> BusResult<StreamAck> {
        let classify = |e: jetstream::context::PublishError| match self.classify(&e) {
            BusError::NotFound(_) => {
                BusError::NotFound(format!("no stream captures subject {subject:?}"))
            }
            other => other,
        };
        let publish = || async {
            self.inner
                .js
                .send_publish(subject.to_owned(), msg.clone())
                .await
                .map_err(classify)?
                .await
                .map_err(classify)
        };
        let exists = || async {
            match self.inner.js.stream_by_subject(subject).await {
                Ok(_) => Some(true),
                Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                    Some(false)
                }
                Err(_) => None,
            }
        };
        let ack = self.retry_while_leaderless(publish, exists).await?;
        Ok(StreamAck {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// A message get answered by the stream's leader (not the direct get:
    /// with `allow_direct` any replica may answer that, a lagging follower
    /// included): the last message on `subject`, or with `from` the first
    /// at or after that sequence.
    async fn leader_get(
        &self,
        stream: &str,
        subject: &str,
        from: Option<u64>,
    ) -> BusResult<Option<StreamMessage>> {
        check_name("stream", stream)?;
        check_publish_subject(subject)?;
        self.ensure_connected()?;
        let handle = self.stream_handle(stream).await?;
        let request = match from {
            Some(seq) => handle
                .raw_message_builder()
                .sequence(seq)
                .next_by_subject(subject),
            None => handle.raw_message_builder().last_by_subject(subject),
        };
        let got = tokio::time::timeout(self.inner.request_timeout, request.send())
            .await
            .map_err(|_| BusError::Timeout(self.inner.request_timeout))?;
        match got {
            Ok(m) => Ok(Some(StreamMessage {
                sequence: m.sequence,
                subject: m.subject.to_string(),
                headers: from_header_map(Some(&m.headers)),
                payload: m.payload,
                time_ms: u64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
            })),
            Err(e) => {
                let err = match e.kind() {
                    stream::LastRawMessageErrorKind::NoMessageFound => return Ok(None),
                    stream::LastRawMessageErrorKind::JetStream(api) => from_api(&api),
                    stream::LastRawMessageErrorKind::InvalidSubject => {
                        BusError::Invalid(e.to_string())
                    }
                    stream::LastRawMessageErrorKind::Other => self.classify(&e),
                };
                if matches!(err, BusError::NotFound(_)) {
                    lock(&self.inner.streams).remove(stream);
                }
                Err(err)
            }
        }
    }

    fn classify(&self, err: &(dyn StdError + 'static)) -> BusError {
        classify(err, self.inner.request_timeout)
    }

    async fn stream_handle(&self, name: &str) -> BusResult<stream::Stream> {
        if let Some(s) = lock(&self.inner.streams).get(name) {
            return Ok(s.clone());
        }
        let s = self
            .inner
            .js
            .get_stream(name)
            .await
            .map_err(|e| self.classify(&e))?;
        lock(&self.inner.streams).insert(name.to_owned(), s.clone());
        Ok(s)
    }

    async fn store(&self, bucket: &str) -> BusResult<Arc<kv::Store>> {
        if let Some(s) = lock(&self.inner.buckets).get(bucket) {
            return Ok(s.clone());
        }
        let store = Arc::new(
            self.inner
                .js
                .get_key_value(bucket)
                .await
                .map_err(|e| self.classify(&e))?,
        );
        lock(&self.inner.buckets).insert(bucket.to_owned(), store.clone());
        Ok(store)
    }

    /// Classifies a KV error and forgets a bucket that turned out missing.
    fn kv_error(&self, bucket: &str, err: &(dyn StdError + 'static)) -> BusError {
        let e = self.classify(err);
        if matches!(e, BusError::NotFound(_)) {
            lock(&self.inner.buckets).remove(bucket);
            return BusError::NotFound(format!("KV bucket {bucket:?}"));
        }
        e
    }

    /// Runs a JetStream write, retrying while it meets no responders but
    /// the stream (or bucket) exists: right after an R3 stream is created
    /// its subject interest is still propagating between servers, and
    /// during a leader election nobody listens. Backoff 25 ms doubling to
    /// 250 ms, bounded by `request_timeout` (as nats.go retries
    /// no-responders on publish). Safe: a message that met no responders
    /// was not stored. `exists` is asked once, at the first miss: `false`
    /// ends the retries with `NotFound` at once; `None` means unknown.
    async fn retry_while_leaderless<T, Op, OpFut, Ex, ExFut>(
        &self,
        mut op: Op,
        exists: Ex,
    ) -> BusResult<T>
    where
        Op: FnMut() -> OpFut,
        OpFut: Future<Output = BusResult<T>>,
        Ex: FnOnce() -> ExFut,
        ExFut: Future<Output = Option<bool>>,
    {
        let deadline = tokio::time::Instant::now() + self.inner.request_timeout;
        let mut exists = Some(exists);
        let mut known = None;
        let mut wait = Duration::from_millis(25);
        loop {
            match op().await {
                Err(BusError::NotFound(msg)) => {
                    if let Some(check) = exists.take() {
                        known = tokio::time::timeout(Duration::from_secs(1), check())
                            .await
                            .ok()
                            .flatten();
                    }
                    if known == Some(false) {
                        return Err(BusError::NotFound(msg));
                    }
                    if tokio::time::Instant::now() + wait > deadline {
                        return Err(match known {
                            Some(true) => BusError::Unavailable(format!(
                                "{msg}: the stream exists but no server answers for it"
                            )),
                            _ => BusError::NotFound(msg),
                        });
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(250));
                }
                other => return other,
            }
        }
    }

    /// Whether the KV bucket's stream exists (`None`: could not tell).
    async fn bucket_exists(&self, bucket: &str) -> Option<bool> {
        match self.inner.js.get_stream(format!("KV_{bucket}")).await {
            Ok(_) => Some(true),
            Err(e) => match self.classify(&e) {
                BusError::NotFound(_) => Some(false),
                _ => None,
            },
        }
    }

    async fn read(
        &self,
        name: &str,
        filter: &str,
        from_sequence: u64,
        max: usize,
    ) -> BusResult<Vec<StreamMessage>> {
        let from = from_sequence.max(1);
        let key = (name.to_owned(), filter.to_owned(), from);
        let parked = lock(&self.inner.read_consumers).remove(&key);
        if let Some((consumer, idle_since)) = parked {
            if idle_since.elapsed() < READ_CONSUMER_REUSE {
                match self.fetch(&consumer, max).await {
                    Ok(out) => {
                        self.park(name, filter, from, &out, consumer);
                        return Ok(out);
                    }
                    // Gone (stream recreated, server restarted): make one.
                    Err(e) => tracing::debug!("nats: parked read consumer failed: {e}"),
                }
            }
            self.delete_read_consumer(name, consumer);
        }
        let handle = self.stream_handle(name).await?;
        let config = consumer::pull::Config {
            deliver_policy: if from <= 1 {
                consumer::DeliverPolicy::All
            } else {
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                }
            },
            filter_subject: if filter == ">" {
                String::new()
            } else {
                filter.to_owned()
            },
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: READ_CONSUMER_INACTIVE,
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        let consumer = match handle.create_consumer(config).await {
            Ok(c) => c,
            Err(e) => {
                if let stream::ConsumerErrorKind::JetStream(api) = e.kind()
                    && api.error_code() == jetstream::ErrorCode::CONSUMER_FILTER_NOT_SUBSET
                {
                    // The filter cannot match anything the stream holds.
                    return Ok(Vec::new());
                }
                let err = self.classify(&e);
                if matches!(err, BusError::NotFound(_)) {
                    lock(&self.inner.streams).remove(name);
                    return Err(BusError::NotFound(format!("stream {name:?}")));
                }
                return Err(err);
            }
        };
        let pending = usize::try_from(consumer.cached_info().num_pending).unwrap_or(usize::MAX);
        let result = if pending == 0 {
            Ok(Vec::new())
        } else {
            self.fetch(&consumer, max.min(pending)).await
        };
        match &result {
            Ok(out) => self.park(name, filter, from, out, consumer),
            Err(_) => self.delete_read_consumer(name, consumer),
        }
        result
    }

    /// Up to `max` messages the consumer has now (no waiting).
    async fn fetch(&self, consumer: &ReadConsumer, max: usize) -> BusResult<Vec<StreamMessage>> {
        // More could overflow the fetch's inbox (see SUBSCRIPTION_CAPACITY).
        debug_assert!(max < SUBSCRIPTION_CAPACITY, "stream read of {max} messages");
        let mut out = Vec::new();
        let mut batch = consumer
            .fetch()
            .max_messages(max)
            .messages()
            .await
            .map_err(|e| self.classify(&e))?;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| BusError::Unavailable(format!("stream read: {e}")))?;
            let info = m.info().map_err(|e| {
                BusError::Internal(format!("stream read: bad message metadata: {e}"))
            })?;
            let time_ms = SystemTime::from(info.published)
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            out.push(StreamMessage {
                sequence: info.stream_sequence,
                subject: m.subject.to_string(),
                headers: from_header_map(m.headers.as_ref()),
                payload: m.payload.clone(),
                time_ms,
            });
        }
        Ok(out)
    }

    /// The live keys a last-per-subject, headers-only consumer on a KV
    /// stream delivers (delete and purge markers skipped).
    async fn list_keys(&self, bucket: &str, consumer: &ReadConsumer) -> BusResult<Vec<String>> {
        // A fetch's messages (and its status message) queue in one
        // subscription: ask for well under what it holds.
        const BATCH: usize = SUBSCRIPTION_CAPACITY / 2;
        let prefix = format!("$KV.{bucket}.");
        let mut keys = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(keys);
        }
        // A consumer just created in another cluster is reachable only once
        // its interest has crossed the gateway: until then a pull gets "no
        // responders" (status 503, which async-nats reports only as text).
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut backoff = Duration::from_millis(2);
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(BATCH)
                .messages()
                .await
                .map_err(|e| self.classify(&e))?;
            let mut got = 0;
            let mut no_responders = false;
            while let Some(m) = batch.next().await {
                let m = match m {
                    Ok(m) => m,
                    Err(e) if got == 0 && e.to_string().contains("503") => {
                        no_responders = true;
                        break;
                    }
                    Err(e) => {
                        return Err(BusError::Unavailable(format!(
                            "listing keys of {bucket}: {e}"
                        )));
                    }
                };
                got += 1;
                let removed = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(KV_OPERATION_HEADER))
                    .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
                if !removed && let Some(key) = m.subject.strip_prefix(prefix.as_str()) {
                    keys.push(key.to_owned());
                }
            }
            if no_responders {
                if std::time::Instant::now() + backoff > deadline {
                    return Err(BusError::Unavailable(format!(
                        "listing keys of {bucket}: its consumer is not reachable (no responders)"
                    )));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(100));
                continue;
            }
            if got < BATCH {
                return Ok(keys);
            }
        }
    }

    /// Keeps `consumer` for the read that continues after `out`.
    fn park(
        &self,
        name: &str,
        filter: &str,
        from: u64,
        out: &[StreamMessage],
        consumer: ReadConsumer,
    ) {
        let next = out.last().map_or(from, |m| m.sequence + 1);
        let evicted = {
            let mut parked = lock(&self.inner.read_consumers);
            let mut evicted = Vec::new();
            if parked.len() >= READ_CONSUMERS_MAX
                && let Some(k) = parked.keys().next().cloned()
            {
                evicted.extend(parked.remove(&k).map(|(c, _)| (k.0, c)));
            }
            let key = (name.to_owned(), filter.to_owned(), next);
            if let Some((old, _)) = parked.insert(key, (consumer, std::time::Instant::now())) {
                evicted.push((name.to_owned(), old));
            }
            evicted
        };
        for (stream, c) in evicted {
            self.delete_read_consumer(&stream, c);
        }
    }

    fn delete_read_consumer(&self, stream: &str, consumer: ReadConsumer) {
        let js = self.inner.js.clone();
        let stream = stream.to_owned();
        let name = consumer.cached_info().name.clone();
        tokio::spawn(async move {
            if let Err(e) = js.delete_consumer_from_stream(&name, &stream).await {
                tracing::debug!("nats: deleting read consumer {name}: {e}");
            }
        });
    }
}

/// Maps an async-nats error (walking its source chain) onto [`BusError`].
fn classify(err: &(dyn StdError + 'static), timeout: Duration) -> BusError {
    use async_nats::jetstream::context::{
        CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind, PublishError,
        PublishErrorKind, RequestError as JsRequestError, RequestErrorKind as JsRequestErrorKind,
    };
    use async_nats::{RequestError, RequestErrorKind};
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(api) = e.downcast_ref::<jetstream::Error>() {
            return from_api(api);
        }
        if let Some(p) = e.downcast_ref::<PublishError>() {
            match p.kind() {
                PublishErrorKind::TimedOut => return BusError::Timeout(timeout),
                PublishErrorKind::StreamNotFound => {
                    return BusError::NotFound("no stream captures the subject".into());
                }
                PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId => {
                    return BusError::Conflict(p.to_string());
                }
                PublishErrorKind::MaxPayloadExceeded => return BusError::Invalid(p.to_string()),
                PublishErrorKind::BrokenPipe | PublishErrorKind::MaxAckPending => {
                    return BusError::Unavailable(p.to_string());
                }
                PublishErrorKind::Other => {}
            }
        }
        if let Some(r) = e.downcast_ref::<JsRequestError>() {
            match r.kind() {
                JsRequestErrorKind::TimedOut => return BusError::Timeout(timeout),
                JsRequestErrorKind::NoResponders => {
                    return BusError::Unavailable("JetStream not available".into());
                }
                JsRequestErrorKind::InvalidSubject => return BusError::Invalid(r.to_string()),
                JsRequestErrorKind::Other => {}
            }
        }
        if let Some(r) = e.downcast_ref::<RequestError>() {
            match r.kind() {
                RequestErrorKind::TimedOut => return BusError::Timeout(timeout),
                RequestErrorKind::NoResponders => {
                    return BusError::Unavailable("JetStream not available".into());
                }
                RequestErrorKind::InvalidSubject | RequestErrorKind::MaxPayloadExceeded => {
                    return BusError::Invalid(r.to_string());
                }
                RequestErrorKind::Other => {}
            }
        }
        if let Some(c) = e.downcast_ref::<CreateStreamError>() {
            match c.kind() {
                CreateStreamErrorKind::JetStream(api) => return from_api(&api),
                CreateStreamErrorKind::TimedOut => return BusError::Timeout(timeout),
                CreateStreamErrorKind::JetStreamUnavailable => {
                    return BusError::Unavailable("JetStream not available".into());
                }
                CreateStreamErrorKind::NotFound => return BusError::NotFound(c.to_string()),
                CreateStreamErrorKind::EmptyStreamName
                | CreateStreamErrorKind::InvalidStreamName => {
                    return BusError::Invalid(c.to_string());
                }
                _ => {}
            }
        }
        if let Some(g) = e.downcast_ref::<GetStreamError>() {
            match g.kind() {
                GetStreamErrorKind::JetStream(api) => return from_api(&api),
                GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => {
                    return BusError::Invalid(g.to_string());
                }
                GetStreamErrorKind::Request => {}
            }
        }
        if let Some(c) = e.downcast_ref::<stream::ConsumerError>() {
            match c.kind() {
                stream::ConsumerErrorKind::JetStream(api) => return from_api(&api),
                stream::ConsumerErrorKind::TimedOut => return BusError::Timeout(timeout),
                _ => {}
            }
        }
        if let Some(u) = e.downcast_ref::<kv::UpdateError>() {
            match u.kind() {
                kv::UpdateErrorKind::WrongLastRevision => return BusError::Conflict(u.to_string()),
                kv::UpdateErrorKind::TimedOut => return BusError::Timeout(timeout),
                kv::UpdateErrorKind::InvalidKey => return BusError::Invalid(u.to_string()),
                kv::UpdateErrorKind::Other => {}
            }
        }
        if let Some(c) = e.downcast_ref::<kv::CreateError>() {
            match c.kind() {
                kv::CreateErrorKind::AlreadyExists => {
                    return BusError::Conflict("key exists".into());
                }
                kv::CreateErrorKind::InvalidKey => return BusError::Invalid(c.to_string()),
                _ => {}
            }
        }
        if let Some(p) = e.downcast_ref::<kv::PutError>()
            && p.kind() == kv::PutErrorKind::InvalidKey
        {
            return BusError::Invalid(p.to_string());
        }
        if let Some(x) = e.downcast_ref::<kv::EntryError>() {
            match x.kind() {
                kv::EntryErrorKind::InvalidKey => return BusError::Invalid(x.to_string()),
                kv::EntryErrorKind::TimedOut => return BusError::Timeout(timeout),
                kv::EntryErrorKind::Other => {}
            }
        }
        if let Some(w) = e.downcast_ref::<kv::WatchError>() {
            match w.kind() {
                kv::WatchErrorKind::InvalidKey => return BusError::Invalid(w.to_string()),
                kv::WatchErrorKind::TimedOut => return BusError::Timeout(timeout),
                _ => {}
            }
        }
        if e.downcast_ref::<tokio::time::error::Elapsed>().is_some() {
            return BusError::Timeout(timeout);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return BusError::Timeout(timeout);
            }
            return BusError::Unavailable(err.to_string());
        }
        cur = e.source();
    }
    BusError::Unavailable(err.to_string())
}

fn from_api(api: &jetstream::Error) -> BusError {
    use jetstream::ErrorCode as C;
    match api.error_code() {
        C::STREAM_NOT_FOUND | C::CONSUMER_NOT_FOUND => BusError::NotFound(api.to_string()),
        C::STREAM_WRONG_LAST_SEQUENCE
        | C::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
        | C::STREAM_SUBJECT_OVERLAP
        | C::STREAM_NAME_EXIST => BusError::Conflict(api.to_string()),
        C::INSUFFICIENT_RESOURCES => BusError::Unavailable(api.to_string()),
        _ => match api.code() {
            404 => BusError::NotFound(api.to_string()),
            408 => BusError::Timeout(Duration::ZERO),
            503 => BusError::Unavailable(api.to_string()),
            400 => BusError::Invalid(api.to_string()),
            _ => BusError::Internal(api.to_string()),
        },
    }
}

fn to_header_map(headers: Headers) -> Option<HeaderMap> {
    if headers.is_empty() {
        return None;
    }
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        // `check_headers` ran first, so these conversions cannot panic.
        map.append(name, value);
    }
    Some(map)
}

fn from_header_map(map: Option<&HeaderMap>) -> Headers {
    let Some(map) = map else {
        return Vec::new();
    };
    let mut out: Headers = Vec::with_capacity(map.len());
    for (name, values) in map.iter() {
        let name: &str = name.as_ref();
        if name.starts_with("Nats-") {
            continue;
        }
        for v in values {
            out.push((name.to_owned(), v.as_str().to_owned()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn from_nats(m: async_nats::Message) -> Message {
    Message {
        subject: m.subject.to_string(),
        headers: from_header_map(m.headers.as_ref()),
        payload: m.payload,
        reply: m.reply.map(|r| r.to_string()),
    }
}

struct NatsSubscription {
    inner: async_nats::Subscriber,
}

#[async_trait]
impl SubscriptionSource for NatsSubscription {
    async fn next(&mut self) -> Option<Message> {
        self.inner.next().await.map(from_nats)
    }
}

struct NatsKvWatch {
    inner: kv::Watch,
}

#[async_trait]
impl KvWatchSource for NatsKvWatch {
    async fn next(&mut self) -> Option<BusResult<KvEntry>> {
        let item = self.inner.next().await?;
        Some(match item {
            Ok(entry) => Ok(KvEntry {
                value: (entry.operation == kv::Operation::Put).then_some(entry.value),
                key: entry.key,
                revision: entry.revision,
            }),
            Err(e) => Err(BusError::Unavailable(format!("KV watch: {e}"))),
        })
    }
}

fn same_subjects(a: &[String], b: &[String]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    a.dedup();
    b.sort();
    b.dedup();
    a == b
}

#[async_trait]
impl Bus for NatsBus {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn connection_state(&self) -> ConnectionState {
        *self.inner.state.tx.borrow()
    }

    fn connection_events(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.tx.subscribe()
    }

    fn connection_epoch(&self) -> u64 {
        // Both only grow, so the sum changes whenever either does.
        let dropped = self
            .inner
            .state
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        lock(&self.inner.state.generation).wrapping_add(dropped)
    }

    async fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> BusResult<()> {
        check_publish_subject(subject)?;
        check_headers(&headers)?;
        self.ensure_connected()?;
        let client = &self.inner.client;
        let result = match to_header_map(headers) {
            None => client.publish(subject.to_owned(), payload).await,
            Some(h) => {
                client
                    .publish_with_headers(subject.to_owned(), h, payload)
                    .await
            }
        };
        result.map_err(|e| match e.kind() {
            async_nats::PublishErrorKind::MaxPayloadExceeded
            | async_nats::PublishErrorKind::InvalidSubject => BusError::Invalid(e.to_string()),
            _ => BusError::Unavailable(e.to_string()),
        })
    }

    async fn subscribe(&self, subject: &str, queue: Option<&str>) -> BusResult<Subscription> {
        check_filter_subject(subject)?;
        if let Some(q) = queue {
            check_queue_group(q)?;
        }
        let client = &self.inner.client;
        let sub = match queue {
            None => client.subscribe(subject.to_owned()).await,
            Some(q) => {
                client
                    .queue_subscribe(subject.to_owned(), q.to_owned())
                    .await
            }
        }
        .map_err(|e| match e.kind() {
            async_nats::SubscribeErrorKind::Other => BusError::Unavailable(e.to_string()),
            _ => BusError::Invalid(e.to_string()),
        })?;
        Ok(Subscription::new(Box::new(NatsSubscription { inner: sub })))
    }

    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> BusResult<Message> {
        check_publish_subject(subject)?;
        check_headers(&headers)?;
        self.ensure_connected()?;
        let mut request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        if let Some(h) = to_header_map(headers) {
            request = request.headers(h);
        }
        match self
            .inner
            .client
            .send_request(subject.to_owned(), request)
            .await
        {
            Ok(m) => Ok(from_nats(m)),
            Err(e) => Err(match e.kind() {
                async_nats::RequestErrorKind::TimedOut => BusError::Timeout(timeout),
                async_nats::RequestErrorKind::NoResponders => {
                    BusError::NoResponders(subject.to_owned())
                }
                async_nats::RequestErrorKind::InvalidSubject
                | async_nats::RequestErrorKind::MaxPayloadExceeded => {
                    BusError::Invalid(e.to_string())
                }
                async_nats::RequestErrorKind::Other => BusError::Unavailable(e.to_string()),
            }),
        }
    }

    async fn ensure_stream(&self, spec: &StreamSpec) -> BusResult<()> {
        check_name("stream", &spec.name)?;
        if spec.subjects.is_empty() {
            return Err(BusError::Invalid(format!(
                "stream {:?} captures no subjects",
                spec.name
            )));
        }
        for s in &spec.subjects {
            check_filter_subject(s)?;
        }
        self.ensure_connected()?;
        let config = stream::Config {
            name: spec.name.clone(),
            subjects: spec.subjects.clone(),
            num_replicas: spec.replicas.max(1),
            duplicate_window: spec.duplicate_window,
            max_age: spec.max_age.unwrap_or_default(),
            storage: stream::StorageType::File,
            allow_direct: true,
            placement: spec.placement.as_ref().map(|p| stream::Placement {
                cluster: p.cluster.clone(),
                tags: p.tags.clone(),
            }),
            ..Default::default()
        };
        let s = self
            .inner
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| self.classify(&e))?;
        let existing = &s.cached_info().config.subjects;
        if !same_subjects(existing, &spec.subjects) {
            return Err(BusError::Conflict(format!(
                "stream {:?} exists with subjects {existing:?}",
                spec.name
            )));
        }
        lock(&self.inner.streams).insert(spec.name.clone(), s);
        Ok(())
    }

    async fn stream_append(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        msg_id: Option<&str>,
    ) -> BusResult<StreamAck> {
        let msg = self.stream_message(subject, headers, payload, msg_id)?;
        self.publish_to_stream(subject, msg).await
    }

    async fn stream_append_if(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        msg_id: Option<&str>,
        expected_last: u64,
    ) -> BusResult<StreamAck> {
        let msg = self
            .stream_message(subject, headers, payload, msg_id)?
            .expected_last_subject_sequence(expected_last);
        self.publish_to_stream(subject, msg).await
    }

    async fn stream_last(&self, stream: &str, subject: &str) -> BusResult<Option<StreamMessage>> {
        self.leader_get(stream, subject, None).await
    }

    async fn stream_next(
        &self,
        stream: &str,
        subject: &str,
        from_sequence: u64,
    ) -> BusResult<Option<StreamMessage>> {
        self.leader_get(stream, subject, Some(from_sequence.max(1)))
            .await
    }

    async fn stream_erase(&self, stream: &str, subject: &str) -> BusResult<u64> {
        let handle = self.stream_handle(stream).await?;
        let mut erased = 0;
        let mut from = 1;
        while let Some(m) = self.leader_get(stream, subject, Some(from)).await? {
            // `STREAM.MSG.DELETE` without `no_erase`: the server overwrites
            // the message with random bytes before removing it.
            let deleted = tokio::time::timeout(
                self.inner.request_timeout,
                handle.delete_message(m.sequence),
            )
            .await
            .map_err(|_| BusError::Timeout(self.inner.request_timeout))?;
            match deleted {
                Ok(_) => erased += 1,
                // Gone meanwhile (another eraser, a limit): nothing to do.
                Err(e) if matches!(self.classify(&e), BusError::NotFound(_)) => {}
                Err(e) => return Err(self.classify(&e)),
            }
            from = m.sequence + 1;
        }
        Ok(erased)
    }

    /// Writes every publish before awaiting any acknowledgement, so a batch
    /// costs about one round trip instead of one per message.
    async fn stream_append_many(&self, msgs: Vec<StreamAppend>) -> Vec<BusResult<StreamAck>> {
        let mut out = Vec::with_capacity(msgs.len());
        let mut pending = Vec::with_capacity(msgs.len());
        for m in msgs {
            let msg =
                match self.stream_message(&m.subject, m.headers, m.payload, m.msg_id.as_deref()) {
                    Ok(msg) => msg,
                    Err(e) => {
                        pending.push(Err(e));
                        break;
                    }
                };
            match self.inner.js.send_publish(m.subject, msg).await {
                Ok(ack) => pending.push(Ok(ack)),
                Err(e) => {
                    pending.push(Err(self.classify(&e)));
                    break;
                }
            }
        }
        for p in pending {
            let r = match p {
                Ok(ack) => ack
                    .await
                    .map(|a| StreamAck {
                        sequence: a.sequence,
                        duplicate: a.duplicate,
                    })
                    .map_err(|e| self.classify(&e)),
                Err(e) => Err(e),
            };
            let failed = r.is_err();
            out.push(r);
            if failed {
                break;
            }
        }
        out
    }

    async fn stream_read(
        &self,
        stream: &str,
        filter: &str,
        from_sequence: u64,
        max: usize,
    ) -> BusResult<Vec<StreamMessage>> {
        check_name("stream", stream)?;
        check_filter_subject(filter)?;
        self.ensure_connected()?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let timeout = self.inner.request_timeout;
        tokio::time::timeout(timeout, self.read(stream, filter, from_sequence, max))
            .await
            .unwrap_or(Err(BusError::Timeout(timeout)))
    }

    async fn ensure_kv(&self, spec: &KvSpec) -> BusResult<()> {
        check_name("bucket", &spec.bucket)?;
        if !(1..=64).contains(&spec.history) {
            return Err(BusError::Invalid(format!(
                "KV bucket {:?}: history must be 1..=64, not {}",
                spec.bucket, spec.history
            )));
        }
        self.ensure_connected()?;
        match self.store(&spec.bucket).await {
            Ok(_) => return Ok(()),
            Err(BusError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        // The bucket's stream as async-nats's `create_key_value` makes it,
        // except that message deletes are allowed: `kv_erase` overwrites
        // values in place (GDPR), and a stream cannot allow them later.
        let config = stream::Config {
            name: format!("KV_{}", spec.bucket),
            subjects: vec![format!("$KV.{}.>", spec.bucket)],
            max_messages_per_subject: i64::from(spec.history),
            max_age: spec.max_age.unwrap_or_default(),
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: false,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            num_replicas: spec.replicas.max(1),
            placement: spec.placement.as_ref().map(|p| stream::Placement {
                cluster: p.cluster.clone(),
                tags: p.tags.clone(),
            }),
            ..Default::default()
        };
        match self.inner.js.create_stream(config).await {
            Ok(_) => self.store(&spec.bucket).await.map(|_| ()),
            // Lost a creation race with another client: the bucket exists.
            Err(e) => match self.classify(&e) {
                BusError::Conflict(_) => self.store(&spec.bucket).await.map(|_| ()),
                other => Err(other),
            },
        }
    }

    async fn kv_get(&self, bucket: &str, key: &str) -> BusResult<Option<KvEntry>> {
        check_name("bucket", bucket)?;
        check_kv_key(key)?;
        self.ensure_connected()?;
        let store = self.store(bucket).await?;
        let entry = store
            .entry(key)
            .await
            .map_err(|e| self.kv_error(bucket, &e))?;
        Ok(entry.and_then(|e| {
            (e.operation == kv::Operation::Put).then(|| KvEntry {
                key: e.key,
                value: Some(e.value),
                revision: e.revision,
            })
        }))
    }

    async fn kv_keys(&self, bucket: &str) -> BusResult<Vec<String>> {
        check_name("bucket", bucket)?;
        self.ensure_connected()?;
        let stream = format!("KV_{bucket}");
        let not_found = |e| match e {
            BusError::NotFound(_) => BusError::NotFound(format!("KV bucket {bucket:?}")),
            e => e,
        };
        let handle = self.stream_handle(&stream).await.map_err(not_found)?;
        // Not async-nats's `Store::keys`: its push consumer counts on the
        // pending count taken at creation, and an entry erased before it
        // is delivered (another node invalidating the same prefix) leaves
        // it waiting for a 5 s idle heartbeat. A pull consumer fetched
        // without waiting ends when the server has nothing more.
        let config = consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            filter_subject: format!("$KV.{bucket}.>"),
            headers_only: true,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: READ_CONSUMER_INACTIVE,
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        let consumer = match handle.create_consumer(config).await {
            Ok(c) => c,
            Err(e) => {
                let err = self.classify(&e);
                if matches!(err, BusError::NotFound(_)) {
                    lock(&self.inner.streams).remove(&stream);
                }
                return Err(not_found(err));
            }
        };
        let listed = self.list_keys(bucket, &consumer).await;
        self.delete_read_consumer(&stream, consumer);
        listed
    }

    async fn kv_put(&self, bucket: &str, key: &str, value: Bytes) -> BusResult<u64> {
        check_name("bucket", bucket)?;
        check_kv_key(key)?;
        self.ensure_connected()?;
        let store = self.store(bucket).await?;
        self.retry_while_leaderless(
            || async {
                store
                    .put(key, value.clone())
                    .await
                    .map_err(|e| self.kv_error(bucket, &e))
            },
            || self.bucket_exists(bucket),
        )
        .await
    }

    async fn kv_create(&self, bucket: &str, key: &str, value: Bytes) -> BusResult<u64> {
        check_name("bucket", bucket)?;
        check_kv_key(key)?;
        self.ensure_connected()?;
        let store = self.store(bucket).await?;
        self.retry_while_leaderless(
            || async {
                store
                    .create(key, value.clone())
                    .await
                    .map_err(|e| self.kv_error(bucket, &e))
            },
            || self.bucket_exists(bucket),
        )
        .await
    }

    async fn kv_update(
        &self,
        bucket: &str,
        key: &str,
        value: Bytes,
        expected_revision: u64,
    ) -> BusResult<u64> {
        check_name("bucket", bucket)?;
        check_kv_key(key)?;
        self.ensure_connected()?;
        let store = self.store(bucket).await?;
        self.retry_while_leaderless(
            || async {
                store
                    .update(key, value.clone(), expected_revision)
                    .await
                    .map_err(|e| self.kv_error(bucket, &e))
            },
            || self.bucket_exists(bucket),
        )
        .await
    }

    async fn kv_delete(&self, bucket: &str, key: &str) -> BusResult<()> {
        check_name("bucket", bucket)?;
        check_kv_key(key)?;
        self.ensure_connected()?;
        let store = self.store(bucket).await?;
        self.retry_while_leaderless(
            || async {
                store
                    .delete(key)
                    .await
                    .map_err(|e| self.kv_error(bucket, &e))
            },
            || self.bucket_exists(bucket),
        )
        .await
    }

    async fn kv_erase(&self, bucket: &str, key: &str) -> BusResult<u64> {
        check_name("bucket", bucket)?;
        check_kv_key(key)?;
        self.ensure_connected()?;
        let stream = format!("KV_{bucket}");
        let subject = format!("$KV.{bucket}.{key}");
        let not_found = |e| match e {
            BusError::NotFound(_) => BusError::NotFound(format!("KV bucket {bucket:?}")),
            e => e,
        };
        match self.stream_erase(&stream, &subject).await {
            Ok(n) => Ok(n),
            // A bucket created before Keel allowed deletes on it: purge the
            // subject (the values leave the index at once and the block
            // files when NATS compacts them).
            Err(BusError::Unavailable(m)) if m.contains("10057") => {
                let handle = self.stream_handle(&stream).await.map_err(not_found)?;
                let purged = tokio::time::timeout(
                    self.inner.request_timeout,
                    handle.purge().filter(subject),
                )
                .await
                .map_err(|_| BusError::Timeout(self.inner.request_timeout))?
                .map_err(|e| self.classify(&e))?;
                Ok(purged.purged)
            }
            Err(e) => Err(not_found(e)),
        }
    }

    async fn kv_watch(&self, bucket: &str, key_pattern: &str) -> BusResult<KvWatch> {
        check_name("bucket", bucket)?;
        check_kv_key_pattern(key_pattern)?;
        self.ensure_connected()?;
        let store = self.store(bucket).await?;
        let watch = store
            .watch(key_pattern)
            .await
            .map_err(|e| self.kv_error(bucket, &e))?;
        Ok(KvWatch::new(Box::new(NatsKvWatch { inner: watch })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_exponential_and_capped() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(500));
        let d = |a| reconnect_delay(a, min, max);
        assert_eq!(d(0), Duration::ZERO);
        assert_eq!(d(1), Duration::ZERO);
        assert_eq!(d(2), Duration::from_millis(10));
        assert_eq!(d(3), Duration::from_millis(20));
        assert_eq!(d(6), Duration::from_millis(160));
        assert_eq!(d(7), Duration::from_millis(320));
        assert_eq!(d(8), max);
        assert_eq!(d(usize::MAX), max);
    }

    #[test]
    fn headers_round_trip_sorted_without_server_headers() {
        let map = to_header_map(vec![
            ("b".into(), "1".into()),
            ("a".into(), "x".into()),
            ("b".into(), "2".into()),
            ("Nats-Msg-Id".into(), "m".into()),
        ]);
        assert_eq!(
            from_header_map(map.as_ref()),
            vec![
                ("a".to_string(), "x".to_string()),
                ("b".to_string(), "1".to_string()),
                ("b".to_string(), "2".to_string())
            ]
        );
        assert!(to_header_map(vec![]).is_none());
    }
}
