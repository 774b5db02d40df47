//! [`LocalBus`]: the in-process backend, the embedded single node's default.
//!
//! Everything lives behind one mutex: subscriptions, streams and KV buckets.
//! Calls never block on I/O and never hold the lock across an `.await`.
//!
//! Semantics follow NATS/JetStream so that the conformance suite gives the
//! same answers on both backends:
//!
//! - Subjects match with `*` and `>`; a message goes to every matching plain
//!   subscriber and to one member of each matching queue group (round-robin
//!   per group name, skipping members whose queue is full).
//! - A core `publish` to a subject a stream captures is also stored in that
//!   stream, and a `stream_append` is also delivered to core subscribers (as
//!   JetStream does).
//! - Streams number messages from 1; `msg_id` deduplicates within the
//!   stream's `duplicate_window`; `max_age` is applied lazily on access.
//! - KV buckets have one revision counter per bucket (like the JetStream
//!   stream sequence behind a KV bucket), keep `history` records per key, and
//!   write delete markers.
//!
//! **Slow subscribers.** Every subscription and KV watch has a bounded queue
//! of [`SUBSCRIBER_QUEUE`] messages. Publishing never waits for a
//! subscriber: when a queue is full the message is dropped for that
//! subscriber and a `tracing::warn!` is logged (on the 1st, 2nd, 4th, 8th…
//! drop of that subscriber, so a stuck consumer does not flood the log). This
//! is core NATS's at-most-once contract, and what NATS itself does to a slow
//! consumer.

use crate::{
    Bus, BusError, BusResult, ConnectionState, Headers, KvEntry, KvSpec, KvWatch, KvWatchSource,
    Message, StreamAck, StreamMessage, StreamSpec, Subscription, SubscriptionSource,
    check_filter_subject, check_headers, check_kv_key, check_kv_key_pattern, check_name,
    check_publish_subject, check_queue_group, subject_matches,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};

/// Capacity of each subscriber's (and KV watcher's) queue.
pub const SUBSCRIBER_QUEUE: usize = 65_536;

/// The in-process bus. Cheap to clone: clones share the same subjects,
/// streams and buckets. When the last clone is dropped, subscriptions and
/// watches end (`next()` returns `None`).
#[derive(Clone)]
pub struct LocalBus {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    next_id: AtomicU64,
    events: watch::Sender<ConnectionState>,
}

#[derive(Default)]
struct State {
    subs: Vec<Sub>,
    /// Round-robin cursor per queue group name.
    queue_cursor: HashMap<String, usize>,
    streams: HashMap<String, LocalStream>,
    buckets: HashMap<String, LocalKv>,
}

struct Sub {
    id: u64,
    filter: String,
    queue: Option<String>,
    tx: mpsc::Sender<Message>,
    dropped: u64,
    /// Request inboxes take the first reply and silently drop the rest.
    inbox: bool,
}

struct LocalStream {
    spec: StreamSpec,
    msgs: VecDeque<Stored>,
    last_seq: u64,
    /// msg_id → (sequence, stored at), in insertion order for expiry.
    dedup: HashMap<String, u64>,
    dedup_order: VecDeque<(Instant, String)>,
}

struct Stored {
    seq: u64,
    subject: String,
    headers: Headers,
    payload: Bytes,
    time_ms: u64,
    at: Instant,
}

impl Stored {
    fn message(&self) -> StreamMessage {
        StreamMessage {
            sequence: self.seq,
            subject: self.subject.clone(),
            headers: self.headers.clone(),
            payload: self.payload.clone(),
            time_ms: self.time_ms,
        }
    }
}

struct LocalKv {
    spec: KvSpec,
    revision: u64,
    keys: HashMap<String, VecDeque<KvRecord>>,
    watchers: Vec<KvWatcher>,
}

struct KvRecord {
    value: Option<Bytes>,
    revision: u64,
    at: Instant,
}

struct KvWatcher {
    id: u64,
    pattern: String,
    tx: mpsc::Sender<BusResult<KvEntry>>,
    dropped: u64,
}

impl Default for LocalBus {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalBus {
    pub fn new() -> LocalBus {
        let (events, _) = watch::channel(ConnectionState::Connected);
        LocalBus {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                next_id: AtomicU64::new(1),
                events,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a subscription and returns its receiving end.
    fn add_sub(
        &self,
        state: &mut State,
        filter: String,
        queue: Option<String>,
        capacity: usize,
    ) -> LocalSubscription {
        let id = self.next_id();
        let (tx, rx) = mpsc::channel(capacity);
        state.subs.push(Sub {
            id,
            filter,
            queue,
            tx,
            dropped: 0,
            inbox: capacity == 1,
        });
        LocalSubscription {
            id,
            rx,
            bus: Arc::downgrade(&self.inner),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn warn_dropped(dropped: &mut u64, what: &str, filter: &str) {
    *dropped += 1;
    if dropped.is_power_of_two() {
        tracing::warn!(
            filter,
            dropped = *dropped,
            "local bus: {what} queue full ({SUBSCRIBER_QUEUE}); dropping message for slow consumer"
        );
    }
}

impl State {
    /// Delivers `msg` to matching subscribers; returns how many subscriptions
    /// (plain ones plus one per queue group) showed interest.
    fn deliver(&mut self, msg: &Message) -> usize {
        let State {
            subs, queue_cursor, ..
        } = self;
        let mut interest = 0;
        // Queue group name → indices of matching members.
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, sub) in subs.iter().enumerate() {
            if !subject_matches(&sub.filter, &msg.subject) {
                continue;
            }
            match &sub.queue {
                None => interest += 1,
                Some(q) => match groups.iter_mut().find(|(name, _)| *name == q.as_str()) {
                    Some((_, members)) => members.push(i),
                    None => groups.push((q.as_str(), vec![i])),
                },
            }
        }
        let groups: Vec<(String, Vec<usize>)> = groups
            .into_iter()
            .map(|(name, members)| (name.to_owned(), members))
            .collect();
        for sub in subs.iter_mut() {
            if sub.queue.is_none() && subject_matches(&sub.filter, &msg.subject) {
                match sub.tx.try_send(msg.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) if !sub.inbox => {
                        warn_dropped(&mut sub.dropped, "subscriber", &sub.filter)
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        for (name, members) in groups {
            interest += 1;
            let cursor = queue_cursor.entry(name).or_insert(0);
            let start = *cursor % members.len();
            *cursor = cursor.wrapping_add(1);
            let mut sent = false;
            for k in 0..members.len() {
                let sub = &subs[members[(start + k) % members.len()]];
                if sub.tx.try_send(msg.clone()).is_ok() {
                    sent = true;
                    break;
                }
            }
            if !sent {
                let sub = &mut subs[members[start]];
                warn_dropped(&mut sub.dropped, "queue group", &sub.filter);
            }
        }
        interest
    }

    fn capturing_stream(&mut self, subject: &str) -> Option<&mut LocalStream> {
        self.streams
            .values_mut()
            .find(|s| s.spec.subjects.iter().any(|f| subject_matches(f, subject)))
    }
}

impl LocalStream {
    fn prune(&mut self) {
        let now = Instant::now();
        if let Some(max_age) = self.spec.max_age {
            while self
                .msgs
                .front()
                .is_some_and(|m| now.duration_since(m.at) > max_age)
            {
                self.msgs.pop_front();
            }
        }
        let window = dedup_window(&self.spec);
        while let Some((at, _)) = self.dedup_order.front() {
            if now.duration_since(*at) <= window {
                break;
            }
            if let Some((_, id)) = self.dedup_order.pop_front() {
                self.dedup.remove(&id);
            }
        }
    }

    fn append(
        &mut self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        msg_id: Option<&str>,
    ) -> StreamAck {
        self.prune();
        if let Some(id) = msg_id
            && let Some(&sequence) = self.dedup.get(id)
        {
            return StreamAck {
                sequence,
                duplicate: true,
            };
        }
        self.last_seq += 1;
        let at = Instant::now();
        self.msgs.push_back(Stored {
            seq: self.last_seq,
            subject: subject.to_owned(),
            headers,
            payload,
            time_ms: now_ms(),
            at,
        });
        if let Some(id) = msg_id {
            self.dedup.insert(id.to_owned(), self.last_seq);
            self.dedup_order.push_back((at, id.to_owned()));
        }
        StreamAck {
            sequence: self.last_seq,
            duplicate: false,
        }
    }
}

/// The effective duplicate window: JetStream replaces zero by two minutes.
fn dedup_window(spec: &StreamSpec) -> Duration {
    if spec.duplicate_window.is_zero() {
        Duration::from_secs(120)
    } else {
        spec.duplicate_window
    }
}

/// Whether some subject matches both filters.
fn filters_overlap(a: &str, b: &str) -> bool {
    let mut a = a.split('.');
    let mut b = b.split('.');
    loop {
        match (a.next(), b.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
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

enum Expect {
    Any,
    /// The key's last revision (0: no record) must be this.
    Revision(u64),
}

impl LocalKv {
    fn records(&mut self, key: &str) -> Option<&mut VecDeque<KvRecord>> {
        let max_age = self.spec.max_age;
        let records = self.keys.get_mut(key)?;
        if let Some(max_age) = max_age {
            let now = Instant::now();
            while records
                .front()
                .is_some_and(|r| now.duration_since(r.at) > max_age)
            {
                records.pop_front();
            }
        }
        Some(records)
    }

    fn last(&mut self, key: &str) -> Option<(u64, Option<Bytes>)> {
        self.records(key)?
            .back()
            .map(|r| (r.revision, r.value.clone()))
    }

    fn write(&mut self, key: &str, value: Option<Bytes>, expect: Expect) -> BusResult<u64> {
        let current = self.last(key).map(|(rev, _)| rev).unwrap_or(0);
        if let Expect::Revision(expected) = expect
            && expected != current
        {
            return Err(BusError::Conflict(format!(
                "key {key:?} is at revision {current}, expected {expected}"
            )));
        }
        self.revision += 1;
        let revision = self.revision;
        let history = usize::from(self.spec.history.max(1));
        let records = self.keys.entry(key.to_owned()).or_default();
        records.push_back(KvRecord {
            value: value.clone(),
            revision,
            at: Instant::now(),
        });
        while records.len() > history {
            records.pop_front();
        }
        let entry = KvEntry {
            key: key.to_owned(),
            value,
            revision,
        };
        for w in &mut self.watchers {
            if !subject_matches(&w.pattern, key) {
                continue;
            }
            match w.tx.try_send(Ok(entry.clone())) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    warn_dropped(&mut w.dropped, "KV watch", &w.pattern)
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        Ok(revision)
    }
}

fn not_found_bucket(bucket: &str) -> BusError {
    BusError::NotFound(format!("KV bucket {bucket:?}"))
}

impl LocalBus {
    fn append_to_stream(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        msg_id: Option<&str>,
        expected_last: Option<u64>,
    ) -> BusResult<StreamAck> {
        check_publish_subject(subject)?;
        check_headers(&headers)?;
        let mut state = self.lock();
        let stream = state
            .capturing_stream(subject)
            .ok_or_else(|| BusError::NotFound(format!("no stream captures subject {subject:?}")))?;
        if let Some(expected) = expected_last {
            let last = stream
                .msgs
                .iter()
                .rev()
                .find(|m| m.subject == subject)
                .map_or(0, |m| m.seq);
            if last != expected {
                return Err(BusError::Conflict(format!(
                    "wrong last sequence on {subject:?}: {last}, not {expected}"
                )));
            }
        }
        let ack = stream.append(subject, headers.clone(), payload.clone(), msg_id);
        if !ack.duplicate {
            state.deliver(&Message {
                subject: subject.to_owned(),
                headers,
                payload,
                reply: None,
            });
        }
        Ok(ack)
    }

    /// `f` on stream `stream`, its expired messages pruned first.
    fn with_stream<T>(&self, stream: &str, f: impl FnOnce(&mut LocalStream) -> T) -> BusResult<T> {
        let mut state = self.lock();
        let s = state
            .streams
            .get_mut(stream)
            .ok_or_else(|| BusError::NotFound(format!("stream {stream:?}")))?;
        s.prune();
        Ok(f(s))
    }

    fn with_bucket<T>(
        &self,
        bucket: &str,
        key: &str,
        f: impl FnOnce(&mut LocalKv) -> BusResult<T>,
    ) -> BusResult<T> {
        check_name("bucket", bucket)?;
        check_kv_key(key)?;
        let mut state = self.lock();
        let kv = state
            .buckets
            .get_mut(bucket)
            .ok_or_else(|| not_found_bucket(bucket))?;
        f(kv)
    }
}

/// Receiving end of a local subscription (also used for request inboxes).
/// Dropping it removes the subscription.
struct LocalSubscription {
    id: u64,
    rx: mpsc::Receiver<Message>,
    bus: Weak<Inner>,
}

impl Drop for LocalSubscription {
    fn drop(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            let mut state = inner.lock();
            if let Some(i) = state.subs.iter().position(|s| s.id == self.id) {
                state.subs.swap_remove(i);
            }
        }
    }
}

#[async_trait]
impl SubscriptionSource for LocalSubscription {
    async fn next(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
}

struct LocalKvWatch {
    id: u64,
    bucket: String,
    rx: mpsc::Receiver<BusResult<KvEntry>>,
    bus: Weak<Inner>,
}

impl Drop for LocalKvWatch {
    fn drop(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            let mut state = inner.lock();
            if let Some(kv) = state.buckets.get_mut(&self.bucket) {
                kv.watchers.retain(|w| w.id != self.id);
            }
        }
    }
}

#[async_trait]
impl KvWatchSource for LocalKvWatch {
    async fn next(&mut self) -> Option<BusResult<KvEntry>> {
        self.rx.recv().await
    }
}

#[async_trait]
impl Bus for LocalBus {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn connection_state(&self) -> ConnectionState {
        ConnectionState::Connected
    }

    fn connection_events(&self) -> watch::Receiver<ConnectionState> {
        self.inner.events.subscribe()
    }

    async fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> BusResult<()> {
        check_publish_subject(subject)?;
        check_headers(&headers)?;
        let mut state = self.lock();
        if let Some(stream) = state.capturing_stream(subject) {
            stream.append(subject, headers.clone(), payload.clone(), None);
        }
        state.deliver(&Message {
            subject: subject.to_owned(),
            headers,
            payload,
            reply: None,
        });
        Ok(())
    }

    async fn subscribe(&self, subject: &str, queue: Option<&str>) -> BusResult<Subscription> {
        check_filter_subject(subject)?;
        if let Some(q) = queue {
            check_queue_group(q)?;
        }
        let mut state = self.lock();
        let sub = self.add_sub(
            &mut state,
            subject.to_owned(),
            queue.map(str::to_owned),
            SUBSCRIBER_QUEUE,
        );
        Ok(Subscription::new(Box::new(sub)))
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
        let inbox = format!("_INBOX.{}", self.next_id());
        let mut reply_sub = {
            let mut state = self.lock();
            // Register the inbox before delivering, so a fast responder on
            // another thread cannot reply into the void.
            let reply_sub = self.add_sub(&mut state, inbox.clone(), None, 1);
            let interest = state.deliver(&Message {
                subject: subject.to_owned(),
                headers,
                payload,
                reply: Some(inbox),
            });
            if interest == 0 {
                drop(state);
                return Err(BusError::NoResponders(subject.to_owned()));
            }
            reply_sub
        };
        match tokio::time::timeout(timeout, reply_sub.rx.recv()).await {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(BusError::Unavailable("local bus dropped".into())),
            Err(_) => Err(BusError::Timeout(timeout)),
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
        let mut state = self.lock();
        if let Some(existing) = state.streams.get(&spec.name) {
            if same_subjects(&existing.spec.subjects, &spec.subjects) {
                return Ok(());
            }
            return Err(BusError::Conflict(format!(
                "stream {:?} exists with subjects {:?}",
                spec.name, existing.spec.subjects
            )));
        }
        for (name, other) in &state.streams {
            for a in &other.spec.subjects {
                if let Some(b) = spec.subjects.iter().find(|b| filters_overlap(a, b)) {
                    return Err(BusError::Conflict(format!(
                        "subjects {b:?} of stream {:?} overlap {a:?} of stream {name:?}",
                        spec.name
                    )));
                }
            }
        }
        state.streams.insert(
            spec.name.clone(),
            LocalStream {
                spec: spec.clone(),
                msgs: VecDeque::new(),
                last_seq: 0,
                dedup: HashMap::new(),
                dedup_order: VecDeque::new(),
            },
        );
        Ok(())
    }

    async fn stream_append(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        msg_id: Option<&str>,
    ) -> BusResult<StreamAck> {
        self.append_to_stream(subject, headers, payload, msg_id, None)
    }

    async fn stream_append_if(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        msg_id: Option<&str>,
        expected_last: u64,
    ) -> BusResult<StreamAck> {
        self.append_to_stream(subject, headers, payload, msg_id, Some(expected_last))
    }

    async fn stream_next(
        &self,
        stream: &str,
        subject: &str,
        from_sequence: u64,
    ) -> BusResult<Option<StreamMessage>> {
        check_name("stream", stream)?;
        check_publish_subject(subject)?;
        self.with_stream(stream, |s| {
            let start = s.msgs.partition_point(|m| m.seq < from_sequence);
            s.msgs
                .range(start..)
                .find(|m| m.subject == subject)
                .map(Stored::message)
        })
    }

    async fn stream_last(&self, stream: &str, subject: &str) -> BusResult<Option<StreamMessage>> {
        check_name("stream", stream)?;
        check_publish_subject(subject)?;
        self.with_stream(stream, |s| {
            s.msgs
                .iter()
                .rev()
                .find(|m| m.subject == subject)
                .map(Stored::message)
        })
    }

    async fn stream_erase(&self, stream: &str, subject: &str) -> BusResult<u64> {
        check_name("stream", stream)?;
        check_publish_subject(subject)?;
        self.with_stream(stream, |s| {
            let before = s.msgs.len();
            s.msgs.retain(|m| m.subject != subject);
            (before - s.msgs.len()) as u64
        })
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
        self.with_stream(stream, |s| {
            let start = s.msgs.partition_point(|m| m.seq < from_sequence);
            s.msgs
                .range(start..)
                .filter(|m| subject_matches(filter, &m.subject))
                .take(max)
                .map(Stored::message)
                .collect()
        })
    }

    async fn ensure_kv(&self, spec: &KvSpec) -> BusResult<()> {
        check_name("bucket", &spec.bucket)?;
        if !(1..=64).contains(&spec.history) {
            return Err(BusError::Invalid(format!(
                "KV bucket {:?}: history must be 1..=64, not {}",
                spec.bucket, spec.history
            )));
        }
        let mut state = self.lock();
        state
            .buckets
            .entry(spec.bucket.clone())
            .or_insert_with(|| LocalKv {
                spec: spec.clone(),
                revision: 0,
                keys: HashMap::new(),
                watchers: Vec::new(),
            });
        Ok(())
    }

    async fn kv_get(&self, bucket: &str, key: &str) -> BusResult<Option<KvEntry>> {
        self.with_bucket(bucket, key, |kv| {
            Ok(match kv.last(key) {
                Some((revision, Some(value))) => Some(KvEntry {
                    key: key.to_owned(),
                    value: Some(value),
                    revision,
                }),
                _ => None,
            })
        })
    }

    async fn kv_keys(&self, bucket: &str) -> BusResult<Vec<String>> {
        check_name("bucket", bucket)?;
        let mut state = self.lock();
        let kv = state
            .buckets
            .get_mut(bucket)
            .ok_or_else(|| not_found_bucket(bucket))?;
        let keys: Vec<String> = kv.keys.keys().cloned().collect();
        Ok(keys
            .into_iter()
            .filter(|k| matches!(kv.last(k), Some((_, Some(_)))))
            .collect())
    }

    async fn kv_put(&self, bucket: &str, key: &str, value: Bytes) -> BusResult<u64> {
        self.with_bucket(bucket, key, |kv| kv.write(key, Some(value), Expect::Any))
    }

    async fn kv_create(&self, bucket: &str, key: &str, value: Bytes) -> BusResult<u64> {
        self.with_bucket(bucket, key, |kv| match kv.last(key) {
            Some((_, Some(_))) => Err(BusError::Conflict(format!("key {key:?} exists"))),
            Some((revision, None)) => kv.write(key, Some(value), Expect::Revision(revision)),
            None => kv.write(key, Some(value), Expect::Revision(0)),
        })
    }

    async fn kv_update(
        &self,
        bucket: &str,
        key: &str,
        value: Bytes,
        expected_revision: u64,
    ) -> BusResult<u64> {
        self.with_bucket(bucket, key, |kv| {
            kv.write(key, Some(value), Expect::Revision(expected_revision))
        })
    }

    async fn kv_delete(&self, bucket: &str, key: &str) -> BusResult<()> {
        self.with_bucket(bucket, key, |kv| {
            kv.write(key, None, Expect::Any).map(|_| ())
        })
    }

    async fn kv_erase(&self, bucket: &str, key: &str) -> BusResult<u64> {
        self.with_bucket(bucket, key, |kv| {
            let records = kv.keys.remove(key).unwrap_or_default();
            Ok(records.iter().filter(|r| r.value.is_some()).count() as u64)
        })
    }

    async fn kv_watch(&self, bucket: &str, key_pattern: &str) -> BusResult<KvWatch> {
        check_name("bucket", bucket)?;
        check_kv_key_pattern(key_pattern)?;
        let id = self.next_id();
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let mut state = self.lock();
        let kv = state
            .buckets
            .get_mut(bucket)
            .ok_or_else(|| not_found_bucket(bucket))?;
        kv.watchers.push(KvWatcher {
            id,
            pattern: key_pattern.to_owned(),
            tx,
            dropped: 0,
        });
        Ok(KvWatch::new(Box::new(LocalKvWatch {
            id,
            bucket: bucket.to_owned(),
            rx,
            bus: Arc::downgrade(&self.inner),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap() {
        assert!(filters_overlap("a.>", "a.b"));
        assert!(filters_overlap("a.*", "a.b"));
        assert!(filters_overlap("*.b", "a.*"));
        assert!(!filters_overlap("a.>", "a"));
        assert!(!filters_overlap("a.b", "a.c"));
        assert!(!filters_overlap("a.*", "a.b.c"));
        assert!(filters_overlap(">", "x.y"));
    }

    #[tokio::test]
    async fn slow_subscriber_drops_instead_of_blocking() {
        let bus = LocalBus::new();
        let mut sub = bus.subscribe("s", None).await.unwrap();
        for _ in 0..SUBSCRIBER_QUEUE + 10 {
            bus.publish("s", vec![], Bytes::new()).await.unwrap();
        }
        let mut n = 0;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, sub.next()).await {
            n += 1;
        }
        assert_eq!(n, SUBSCRIBER_QUEUE);
    }

    #[tokio::test]
    async fn queue_group_is_round_robin() {
        let bus = LocalBus::new();
        let mut members = Vec::new();
        for _ in 0..3 {
            members.push(bus.subscribe("q.>", Some("g")).await.unwrap());
        }
        for _ in 0..9 {
            bus.publish("q.x", vec![], Bytes::new()).await.unwrap();
        }
        for m in &mut members {
            let mut n = 0;
            while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, m.next()).await {
                n += 1;
            }
            assert_eq!(n, 3);
        }
    }

    #[tokio::test]
    async fn dropping_subscription_unsubscribes_and_dropping_bus_closes() {
        let bus = LocalBus::new();
        let sub = bus.subscribe("a.>", Some("q")).await.unwrap();
        assert_eq!(bus.lock().subs.len(), 1);
        drop(sub);
        assert_eq!(bus.lock().subs.len(), 0);
        let mut sub = bus.subscribe("a.>", None).await.unwrap();
        drop(bus);
        assert_eq!(sub.next().await, None);
    }
}
