//! The bus: every message that leaves a component's node goes through one
//! [`Bus`]. Two backends implement it:
//!
//! - [`local::LocalBus`]: in-process, the embedded single node's default
//!   (`[infrastructure] event-stream = { type = "local" }`). The node is its
//!   own region and its own globe, so every subject is delivered in-process.
//! - [`nats::NatsBus`]: `async-nats` + JetStream
//!   (`event-stream = { type = "nats", servers = [...] }`).
//!
//! Subjects follow NATS syntax on both backends: dot-separated tokens, `*`
//! matches one token, `>` matches one or more trailing tokens. Both backends
//! give the same answers to the same calls (the conformance tests run one
//! suite against both).

use async_trait::async_trait;
use bytes::Bytes;
use std::time::Duration;

pub mod local;
pub mod nats;

pub type BusResult<T> = Result<T, BusError>;

/// Why a bus call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// Not connected (partition, server down) or the server refused service.
    /// Nothing was acknowledged.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// No reply or acknowledgement within the deadline. The message may or
    /// may not have been delivered.
    #[error("bus timeout after {0:?}")]
    Timeout(Duration),
    /// A request found no subscriber on its subject.
    #[error("no responders on {0}")]
    NoResponders(String),
    /// Malformed subject, bucket, key or stream name; nothing was sent.
    #[error("{0}")]
    Invalid(String),
    /// A compare-and-set lost: the entry's revision was not the expected one
    /// (or the key already existed for `kv_create`).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The stream or bucket does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A bug or an unexpected server answer.
    #[error("{0}")]
    Internal(String),
}

/// Message headers, in order; names may repeat.
pub type Headers = Vec<(String, String)>;

/// A message as a subscriber receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub subject: String,
    pub headers: Headers,
    pub payload: Bytes,
    /// Where to send a reply, for requests.
    pub reply: Option<String>,
}

/// Connection state of the bus, for `/_keel/ready` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    Connected,
    /// Connecting for the first time or reconnecting after a loss.
    Connecting,
    Disconnected,
}

impl ConnectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Connected => "connected",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Disconnected => "disconnected",
        }
    }
}

/// A durable stream to create (or check) with [`Bus::ensure_stream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// Stream name: `[A-Za-z0-9_-]+`.
    pub name: String,
    /// Subjects the stream captures (wildcards allowed).
    pub subjects: Vec<String>,
    /// Replicas (1 on a single server; 3 on a 3-node cluster).
    pub replicas: usize,
    /// Window in which a repeated `msg_id` is dropped as a duplicate.
    pub duplicate_window: Duration,
    /// Age after which messages are removed; `None` keeps them.
    pub max_age: Option<Duration>,
    /// Where a NATS super-cluster places the stream (ignored in-process).
    pub placement: Option<Placement>,
}

/// JetStream placement: the cluster (region) and server tags a stream's
/// replicas must be on. Residency depends on it: a region's stream is
/// always placed in that region's cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    pub cluster: Option<String>,
    pub tags: Vec<String>,
}

/// One message for [`Bus::stream_append_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAppend {
    pub subject: String,
    pub headers: Headers,
    pub payload: Bytes,
    pub msg_id: Option<String>,
}

/// Acknowledgement of a stream append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAck {
    /// Sequence of the message in its stream.
    pub sequence: u64,
    /// The `msg_id` was seen within the duplicate window: nothing was
    /// appended and `sequence` is the original message's.
    pub duplicate: bool,
}

/// A message read back from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMessage {
    pub sequence: u64,
    pub subject: String,
    pub headers: Headers,
    pub payload: Bytes,
    /// Milliseconds since the Unix epoch when the stream stored it.
    pub time_ms: u64,
}

/// A KV bucket to create (or check) with [`Bus::ensure_kv`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvSpec {
    /// Bucket name: `[A-Za-z0-9_-]+`.
    pub bucket: String,
    /// Revisions kept per key (1..=64).
    pub history: u8,
    /// Age after which entries expire; `None` keeps them.
    pub max_age: Option<Duration>,
    pub replicas: usize,
    /// Where a NATS super-cluster places the bucket (ignored in-process).
    pub placement: Option<Placement>,
}

/// One KV entry (or a deletion, in a watch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    /// `None` for a delete or purge marker.
    pub value: Option<Bytes>,
    /// Monotonic per bucket; the CAS token for [`Bus::kv_update`].
    pub revision: u64,
}

/// A live subscription. Dropping it unsubscribes.
pub struct Subscription {
    inner: Box<dyn SubscriptionSource>,
}

impl Subscription {
    pub fn new(inner: Box<dyn SubscriptionSource>) -> Self {
        Subscription { inner }
    }

    /// The next message; `None` once the subscription is closed (bus shut
    /// down). Survives reconnects: a NATS subscription resumes after a
    /// reconnect (messages published while disconnected may be lost; that is
    /// what anti-entropy and the outbox are for).
    pub async fn next(&mut self) -> Option<Message> {
        self.inner.next().await
    }
}

/// Backend side of a [`Subscription`].
#[async_trait]
pub trait SubscriptionSource: Send {
    async fn next(&mut self) -> Option<Message>;
}

/// A live KV watch. Dropping it stops watching.
pub struct KvWatch {
    inner: Box<dyn KvWatchSource>,
}

impl KvWatch {
    pub fn new(inner: Box<dyn KvWatchSource>) -> Self {
        KvWatch { inner }
    }

    /// The next change (puts and deletes) after the watch started; `None`
    /// once closed.
    pub async fn next(&mut self) -> Option<BusResult<KvEntry>> {
        self.inner.next().await
    }
}

/// Backend side of a [`KvWatch`].
#[async_trait]
pub trait KvWatchSource: Send {
    async fn next(&mut self) -> Option<BusResult<KvEntry>>;
}

/// The bus. Object safe: the runtime holds an `Arc<dyn Bus>`.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Which backend, for logs and `/_keel/ready` ("local" or "nats").
    fn kind(&self) -> &'static str;

    /// Current connection state (always `Connected` in-process).
    fn connection_state(&self) -> ConnectionState;

    /// A watch channel that changes whenever the connection state does; the
    /// sync service uses it to run anti-entropy right after a reconnect.
    fn connection_events(&self) -> tokio::sync::watch::Receiver<ConnectionState>;

    /// Changes whenever the connection is lost or re-established (before
    /// the state says `Connected` again) and whenever a subscription dropped
    /// a message because its queue was full (a slow consumer). Whoever
    /// caches what it heard over the bus compares epochs to know that it may
    /// have missed messages (core NATS delivers at most once). Always 0
    /// in-process.
    fn connection_epoch(&self) -> u64 {
        0
    }

    /// Fire-and-forget publish (core NATS semantics: at most once).
    async fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> BusResult<()>;

    /// Subscribes to `subject` (wildcards allowed). With a `queue` group,
    /// each message goes to one member of the group only.
    async fn subscribe(&self, subject: &str, queue: Option<&str>) -> BusResult<Subscription>;

    /// Sends a request and waits for the first reply.
    async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> BusResult<Message>;

    /// Creates the stream, or checks that an existing one is compatible.
    async fn ensure_stream(&self, spec: &StreamSpec) -> BusResult<()>;

    /// Appends to the stream capturing `subject` and waits for the durable
    /// acknowledgement. `msg_id` deduplicates within the stream's window.
    async fn stream_append(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        msg_id: Option<&str>,
    ) -> BusResult<StreamAck>;

    /// Appends to the stream capturing `subject` only if the last message on
    /// `subject` has stream sequence `expected_last` (0: the subject has no
    /// message): JetStream's expected-last-subject-sequence, the
    /// compare-and-set of a per-subject log. `Conflict` if it does not;
    /// nothing is stored then.
    async fn stream_append_if(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        msg_id: Option<&str>,
        expected_last: u64,
    ) -> BusResult<StreamAck>;

    /// The last message on `subject` (no wildcards) in `stream`, read from
    /// the stream's leader, so it reflects every acknowledged append.
    async fn stream_last(&self, stream: &str, subject: &str) -> BusResult<Option<StreamMessage>>;

    /// The first message on `subject` (no wildcards) in `stream` with
    /// sequence ≥ `from_sequence`, read from the stream's leader. One
    /// request and no consumer: for reading a few messages of one subject.
    async fn stream_next(
        &self,
        stream: &str,
        subject: &str,
        from_sequence: u64,
    ) -> BusResult<Option<StreamMessage>>;

    /// Appends several messages, pipelined where the backend can, and
    /// returns the acknowledgements of a prefix of `msgs` in order: it stops
    /// at the first failure, whose error is the last element. Messages after
    /// a failure may or may not have been stored; appending them again with
    /// the same `msg_id` is safe within the duplicate window.
    async fn stream_append_many(&self, msgs: Vec<StreamAppend>) -> Vec<BusResult<StreamAck>> {
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            let r = self
                .stream_append(&m.subject, m.headers, m.payload, m.msg_id.as_deref())
                .await;
            let failed = r.is_err();
            out.push(r);
            if failed {
                break;
            }
        }
        out
    }

    /// Reads up to `max` messages with sequence ≥ `from_sequence` whose
    /// subject matches `filter` (wildcards allowed; `>` for all).
    async fn stream_read(
        &self,
        stream: &str,
        filter: &str,
        from_sequence: u64,
        max: usize,
    ) -> BusResult<Vec<StreamMessage>>;

    /// Erases every message on `subject` (no wildcards) from `stream` and
    /// returns how many. On NATS each is a secure delete: the server
    /// overwrites the message in its block file, so the bytes are gone from
    /// disk, not only from the index (GDPR erasure). Slow (a few requests
    /// per message): for erasing, not for trimming.
    async fn stream_erase(&self, stream: &str, subject: &str) -> BusResult<u64>;

    /// Creates the KV bucket, or checks that an existing one is compatible.
    async fn ensure_kv(&self, spec: &KvSpec) -> BusResult<()>;

    /// The current entry of `key`; `None` if absent or deleted.
    async fn kv_get(&self, bucket: &str, key: &str) -> BusResult<Option<KvEntry>>;

    /// Unconditional write; returns the new revision.
    async fn kv_put(&self, bucket: &str, key: &str, value: Bytes) -> BusResult<u64>;

    /// Writes only if `key` is absent (or deleted); `Conflict` otherwise.
    async fn kv_create(&self, bucket: &str, key: &str, value: Bytes) -> BusResult<u64>;

    /// Compare-and-set: writes only if the key's current revision is
    /// `expected_revision`; `Conflict` otherwise.
    async fn kv_update(
        &self,
        bucket: &str,
        key: &str,
        value: Bytes,
        expected_revision: u64,
    ) -> BusResult<u64>;

    /// Every key of the bucket with a current value (deleted keys are not
    /// listed), in no particular order.
    async fn kv_keys(&self, bucket: &str) -> BusResult<Vec<String>>;

    /// Deletes `key` (a delete marker; watchers see `value: None`).
    async fn kv_delete(&self, bucket: &str, key: &str) -> BusResult<()>;

    /// Erases `key` with every revision the bucket keeps of it, securely
    /// (see [`Bus::stream_erase`]) and without leaving a delete marker:
    /// watchers are not told. Returns the revisions erased (0: absent).
    async fn kv_erase(&self, bucket: &str, key: &str) -> BusResult<u64>;

    /// Watches keys matching `key_pattern` (NATS wildcards; `>` for all).
    async fn kv_watch(&self, bucket: &str, key_pattern: &str) -> BusResult<KvWatch>;
}

/// A node's connections. In a `regions.toml` deployment a node holds two:
/// its region's account (everything `keel.<region>.>`, the region's streams
/// and buckets) and the `GLOBAL` account (`keel.global.>`, global buckets),
/// because residency comes from NATS accounts (DESIGN §5 "Residency").
/// Elsewhere both are the same bus.
#[derive(Clone)]
pub struct Buses {
    pub region: std::sync::Arc<dyn Bus>,
    pub global: std::sync::Arc<dyn Bus>,
}

impl Buses {
    /// One bus for everything (embedded node, or one NATS without accounts).
    pub fn single(bus: std::sync::Arc<dyn Bus>) -> Buses {
        Buses {
            region: bus.clone(),
            global: bus,
        }
    }

    /// The bus that carries `subject`: global for `keel.global.*`.
    pub fn for_subject(&self, subject: &str) -> &std::sync::Arc<dyn Bus> {
        if subject.starts_with("keel.global.") {
            &self.global
        } else {
            &self.region
        }
    }

    /// Whether region and global traffic share one connection.
    pub fn is_single(&self) -> bool {
        std::sync::Arc::ptr_eq(&self.region, &self.global)
    }
}

/// Validates a subject for publishing: non-empty tokens of printable ASCII
/// without whitespace, `*` or `>`.
pub fn check_publish_subject(subject: &str) -> BusResult<()> {
    check_subject(subject, false)
}

/// Validates a subscription subject: like [`check_publish_subject`], plus
/// `*` as a whole token and `>` as the whole last token.
pub fn check_filter_subject(subject: &str) -> BusResult<()> {
    check_subject(subject, true)
}

fn check_subject(subject: &str, wildcards: bool) -> BusResult<()> {
    let bad = |why: &str| {
        Err(BusError::Invalid(format!(
            "invalid subject {subject:?}: {why}"
        )))
    };
    if subject.is_empty() {
        return bad("empty");
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return bad("empty token");
        }
        if token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            return bad("tokens must be printable ASCII without whitespace");
        }
        let is_last = i + 1 == tokens.len();
        match *token {
            "*" if wildcards => {}
            ">" if wildcards && is_last => {}
            _ if token.contains('*') || token.contains('>') => {
                return bad(if wildcards {
                    "`*` must be a whole token and `>` the whole last token"
                } else {
                    "wildcards are not allowed here"
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `subject` matches the (possibly wildcard) `filter`.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Validates a stream or bucket name: `[A-Za-z0-9_-]+`.
pub fn check_name(what: &str, name: &str) -> BusResult<()> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(BusError::Invalid(format!(
            "invalid {what} name {name:?}: expected [A-Za-z0-9_-]+"
        )));
    }
    Ok(())
}

fn is_kv_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'=')
}

/// Validates a KV key as JetStream KV does: dot-separated non-empty tokens
/// of `[-/_=A-Za-z0-9]`.
pub fn check_kv_key(key: &str) -> BusResult<()> {
    if key.is_empty()
        || !key
            .split('.')
            .all(|t| !t.is_empty() && t.bytes().all(is_kv_key_byte))
    {
        return Err(BusError::Invalid(format!(
            "invalid KV key {key:?}: expected dot-separated tokens of [-/_=A-Za-z0-9]"
        )));
    }
    Ok(())
}

/// Validates a KV watch pattern: like [`check_kv_key`], plus `*` as a whole
/// token and `>` as the whole last token.
pub fn check_kv_key_pattern(pattern: &str) -> BusResult<()> {
    check_filter_subject(pattern)?;
    if !pattern
        .split('.')
        .all(|t| t == "*" || t == ">" || t.bytes().all(is_kv_key_byte))
    {
        return Err(BusError::Invalid(format!(
            "invalid KV key pattern {pattern:?}: expected tokens of [-/_=A-Za-z0-9], `*` or `>`"
        )));
    }
    Ok(())
}

/// Validates a queue group name: non-empty printable ASCII without whitespace.
pub fn check_queue_group(queue: &str) -> BusResult<()> {
    if queue.is_empty() || queue.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err(BusError::Invalid(format!(
            "invalid queue group {queue:?}: expected printable ASCII without whitespace"
        )));
    }
    Ok(())
}

/// Validates headers: names are non-empty printable ASCII without whitespace
/// or `:`; values contain no CR or LF (they travel in a NATS header block).
pub fn check_headers(headers: &Headers) -> BusResult<()> {
    for (name, value) in headers {
        if name.is_empty()
            || name
                .bytes()
                .any(|b| !(0x21..0x7f).contains(&b) || b == b':')
        {
            return Err(BusError::Invalid(format!("invalid header name {name:?}")));
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(BusError::Invalid(format!(
                "invalid value for header {name:?}: contains CR or LF"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        assert!(check_publish_subject("a.b.c").is_ok());
        assert!(check_publish_subject("a.*.c").is_err());
        assert!(check_publish_subject("a..c").is_err());
        assert!(check_publish_subject("a b").is_err());
        assert!(check_publish_subject("").is_err());
        assert!(check_filter_subject("a.*.>").is_ok());
        assert!(check_filter_subject("a.>.c").is_err());
        assert!(check_filter_subject("a.b*").is_err());
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches(">", "a"));
        assert!(!subject_matches("a.b", "a.b.c"));
    }

    #[test]
    fn names_keys_headers() {
        assert!(check_name("stream", "orders_v1-x").is_ok());
        assert!(check_name("stream", "a.b").is_err());
        assert!(check_name("stream", "").is_err());
        assert!(check_kv_key("user/1=x.b").is_ok());
        assert!(check_kv_key(".a").is_err());
        assert!(check_kv_key("a.").is_err());
        assert!(check_kv_key("a*").is_err());
        assert!(check_kv_key_pattern("a.*.>").is_ok());
        assert!(check_kv_key_pattern("a$.>").is_err());
        assert!(check_queue_group("workers").is_ok());
        assert!(check_queue_group("a b").is_err());
        assert!(check_headers(&vec![("X-A".into(), "1 2".into())]).is_ok());
        assert!(check_headers(&vec![("X:A".into(), "1".into())]).is_err());
        assert!(check_headers(&vec![("X-A".into(), "1\r\n".into())]).is_err());
    }
}
