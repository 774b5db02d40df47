//! The feed (consumer side of a region's stream) against both bus backends:
//! `LocalBus` and `NatsBus` on a real `nats-server` (one fresh server per
//! test). Each case is an `async fn(Arc<dyn Bus>)`; the `both!` macro makes
//! a `local::case` and a `nats::case` test of it. Everything waits by
//! polling with a deadline.

use bytes::Bytes;
use keel_bus::local::LocalBus;
use keel_bus::nats::{NatsBus, NatsOptions};
use keel_bus::{Bus, ConnectionState, StreamSpec};
use keel_coord::envelope::{self, CONTENT_TYPE, CloudEvent};
use keel_coord::{
    FeedHandle, FeedHandler, FeedOptions, METRIC_TYPE, MetricsView, UserStateView,
    edge_events_subject, metric_event_data, start_feed,
};
use keel_core::Hlc;
use keel_store::{Activity, ActivityRecord, EventData, OutboxEntry, StoredEvent};
use keel_test_support::{FaultProxy, NatsServer, wait_until_async};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Deadline for anything that should happen promptly.
const WAIT: Duration = Duration::from_secs(20);
/// A poll interval no test outlives: where a test uses it, only
/// notifications, reconnects and retries can wake the feed.
const NO_POLL: Duration = Duration::from_secs(3600);

const REGION: &str = "eu-central";
const STREAM: &str = "KEEL_EU_CENTRAL_EVENTS";
const FILTER: &str = "keel.eu-central.edge.*.events";

struct Backend {
    bus: Arc<dyn Bus>,
    // Dropped after `bus`.
    _server: Option<NatsServer>,
}

fn local_backend() -> Backend {
    Backend {
        bus: Arc::new(LocalBus::new()),
        _server: None,
    }
}

async fn start_server() -> NatsServer {
    tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap()
}

async fn connect(url: String) -> NatsBus {
    let bus = NatsBus::connect(NatsOptions {
        name: "keel-feed-test".into(),
        ..NatsOptions::new([url])
    })
    .await
    .unwrap();
    bus.wait_connected(WAIT).await.unwrap();
    bus
}

async fn nats_backend() -> Backend {
    let server = start_server().await;
    let bus = connect(server.url()).await;
    Backend {
        bus: Arc::new(bus),
        _server: Some(server),
    }
}

macro_rules! both {
    ($($case:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::local_backend();
                    super::$case(backend.bus.clone()).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::nats_backend().await;
                    super::$case(backend.bus.clone()).await;
                }
            )*
        }
    };
}

both!(
    applies_each_write_once_in_stream_order,
    failing_handler_is_retried_in_place,
    waits_for_the_stream_to_be_created,
    skips_and_counts_undecodable_messages,
    start_after_replays_only_to_rebuild_dedup,
    views_follow_the_stream,
);

// --- fixtures --------------------------------------------------------------

fn spec() -> StreamSpec {
    StreamSpec {
        name: STREAM.into(),
        subjects: vec![FILTER.into()],
        replicas: 1,
        duplicate_window: Duration::from_secs(120),
        max_age: None,
        placement: None,
    }
}

fn options(poll_interval: Duration) -> FeedOptions {
    FeedOptions {
        poll_interval,
        batch: 3, // small, so reads take several rounds
        ..FeedOptions::new(STREAM, FILTER)
    }
}

/// An edge incarnation forwarding its outbox.
struct Origin {
    edge: &'static str,
    id: String,
}

fn origin(edge: &'static str, incarnation: u64) -> Origin {
    Origin {
        edge,
        id: envelope::origin_id(edge, incarnation),
    }
}

fn hlc(ms: u64, node: &str) -> Hlc {
    Hlc {
        physical_ms: ms,
        logical: 0,
        node: node.into(),
    }
}

/// Outbox entry `seq` of `o`: an activity of user `u<seq>`, at `1000·seq` ms.
fn activity_entry(o: &Origin, seq: u64) -> OutboxEntry {
    OutboxEntry::Activity {
        component: "app".into(),
        user: format!("u{seq}"),
        record: ActivityRecord {
            activity: Activity {
                kind: "view".into(),
                attributes: vec![("n".into(), seq.to_string())],
            },
            edge: o.edge.into(),
            at: hlc(1_000 * seq, o.edge),
        },
    }
}

fn metric_entry(o: &Origin, seq: u64, at_ms: u64, value: f64) -> OutboxEntry {
    OutboxEntry::Event {
        component: "app".into(),
        event: StoredEvent {
            id: format!("{}:app:{seq}", o.edge),
            sequence: seq,
            origin: o.edge.into(),
            region: REGION.into(),
            at: hlc(at_ms, o.edge),
            data: EventData {
                kind: METRIC_TYPE.into(),
                key: "latency".into(),
                payload: metric_event_data("latency", value),
                content_type: Some("application/json".into()),
                user: None,
            },
        },
    }
}

/// Appends raw bytes to `edge`'s subject without a msg id (so an exact
/// resend lands under a new stream sequence, as one beyond JetStream's
/// duplicate window does); returns the stream sequence.
async fn append_raw(bus: &Arc<dyn Bus>, edge: &str, payload: Vec<u8>) -> u64 {
    let ack = bus
        .stream_append(
            &edge_events_subject(REGION, edge),
            vec![("content-type".into(), CONTENT_TYPE.into())],
            Bytes::from(payload),
            None,
        )
        .await
        .unwrap();
    assert!(!ack.duplicate);
    ack.sequence
}

/// Appends the envelope of outbox entry `seq` of `o`.
async fn append(bus: &Arc<dyn Bus>, o: &Origin, seq: u64, entry: &OutboxEntry) -> u64 {
    let ce = envelope::outbox_event(REGION, &o.id, seq, entry);
    append_raw(bus, o.edge, ce.to_json()).await
}

/// Appends activity `seq` of `o`.
async fn append_activity(bus: &Arc<dyn Bus>, o: &Origin, seq: u64) -> u64 {
    append(bus, o, seq, &activity_entry(o, seq)).await
}

/// Records every call; fails the first `n` attempts of chosen writes.
#[derive(Default)]
struct Recorder {
    /// Successful applies: (stream sequence, origin, outbox sequence).
    applied: Mutex<Vec<(u64, String, u64)>>,
    /// Every attempt: (stream sequence, ok).
    attempts: Mutex<Vec<(u64, bool)>>,
    /// Failures left per (origin, outbox sequence).
    fail: Mutex<HashMap<(String, u64), u32>>,
}

impl Recorder {
    fn applied(&self) -> Vec<(u64, String, u64)> {
        self.applied.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl FeedHandler for Recorder {
    async fn apply(&self, stream_sequence: u64, event: &CloudEvent) -> Result<(), String> {
        let key = (event.keelorigin.clone(), event.keeloutboxseq);
        let fail = match self.fail.lock().unwrap().get_mut(&key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        self.attempts.lock().unwrap().push((stream_sequence, !fail));
        if fail {
            return Err(format!("injected failure of {key:?}"));
        }
        self.applied
            .lock()
            .unwrap()
            .push((stream_sequence, key.0, key.1));
        Ok(())
    }
}

fn feed(bus: &Arc<dyn Bus>, opts: FeedOptions, handler: Arc<dyn FeedHandler>) -> FeedHandle {
    start_feed(
        bus.clone(),
        opts,
        None,
        handler,
        &tokio::runtime::Handle::current(),
    )
}

async fn wait_cursor(feed: &FeedHandle, seq: u64) {
    assert!(
        feed.wait_cursor(seq, WAIT).await,
        "cursor stuck at {} (waiting for {seq}); applied {}, duplicates {}, undecodable {}, read errors {}",
        feed.cursor(),
        feed.applied(),
        feed.duplicates(),
        feed.undecodable(),
        feed.read_errors()
    );
}

// --- cases -----------------------------------------------------------------

/// Two origins, out-of-order outbox sequences, and exact resends under new
/// stream sequences: each (origin, seq) is applied once, in stream order.
/// The feed never polls: notifications alone wake it.
async fn applies_each_write_once_in_stream_order(bus: Arc<dyn Bus>) {
    bus.ensure_stream(&spec()).await.unwrap();
    let rec = Arc::new(Recorder::default());
    let feed = feed(&bus, options(NO_POLL), rec.clone());
    let (fra, par) = (origin("fra", 0xf1), origin("par", 0xa2));

    let mut expected = Vec::new();
    for (o, seq) in [(&fra, 1), (&par, 1), (&fra, 2), (&par, 3)] {
        let s = append_activity(&bus, o, seq).await;
        expected.push((s, o.id.clone(), seq));
    }
    wait_cursor(&feed, expected[3].0).await;
    assert_eq!(rec.applied(), expected);

    let dup1 = append_activity(&bus, &fra, 2).await; // resend
    let s = append_activity(&bus, &par, 2).await; // fills par's gap
    expected.push((s, par.id.clone(), 2));
    let s = append_activity(&bus, &fra, 3).await;
    expected.push((s, fra.id.clone(), 3));
    append_activity(&bus, &par, 3).await; // resend above par's old watermark
    let last = append_activity(&bus, &fra, 1).await; // resend of the very first
    assert!(dup1 > expected[3].0 && last > dup1);

    wait_cursor(&feed, last).await;
    assert_eq!(rec.applied(), expected);
    assert_eq!(feed.cursor(), last);
    assert_eq!(feed.applied(), 6);
    assert_eq!(feed.duplicates(), 3);
    assert_eq!(feed.undecodable(), 0);
    assert_eq!(feed.replayed(), 0);
    assert_eq!(feed.handler_errors(), 0);
    assert!(feed.is_running());
}

/// A handler failing three times on one event: the same event is retried
/// until it applies, and nothing after it is attempted before.
async fn failing_handler_is_retried_in_place(bus: Arc<dyn Bus>) {
    bus.ensure_stream(&spec()).await.unwrap();
    let (fra, par) = (origin("fra", 1), origin("par", 2));
    let rec = Arc::new(Recorder::default());
    rec.fail.lock().unwrap().insert((fra.id.clone(), 2), 3);

    let s1 = append_activity(&bus, &fra, 1).await;
    let s2 = append_activity(&bus, &fra, 2).await;
    let s3 = append_activity(&bus, &par, 1).await;
    let feed = feed(&bus, options(NO_POLL), rec.clone());
    let s4 = append_activity(&bus, &fra, 3).await;

    wait_cursor(&feed, s4).await;
    assert_eq!(
        *rec.attempts.lock().unwrap(),
        [
            (s1, true),
            (s2, false),
            (s2, false),
            (s2, false),
            (s2, true),
            (s3, true),
            (s4, true)
        ]
    );
    assert_eq!(
        rec.applied(),
        [
            (s1, fra.id.clone(), 1),
            (s2, fra.id.clone(), 2),
            (s3, par.id.clone(), 1),
            (s4, fra.id.clone(), 3)
        ]
    );
    assert_eq!(feed.handler_errors(), 3);
    assert_eq!(feed.applied(), 4);
}

/// Started before any edge forwarded (no stream yet): the feed waits and
/// picks the stream up once the first forwarder creates it.
async fn waits_for_the_stream_to_be_created(bus: Arc<dyn Bus>) {
    let rec = Arc::new(Recorder::default());
    let feed = feed(&bus, options(NO_POLL), rec.clone());
    assert!(
        wait_until_async(WAIT, || async { feed.read_errors() >= 2 }).await,
        "the feed did not retry the missing stream"
    );
    assert_eq!(feed.cursor(), 0);

    bus.ensure_stream(&spec()).await.unwrap();
    let fra = origin("fra", 1);
    let s1 = append_activity(&bus, &fra, 1).await;
    let s2 = append_activity(&bus, &fra, 2).await;
    wait_cursor(&feed, s2).await;
    assert_eq!(
        rec.applied(),
        [(s1, fra.id.clone(), 1), (s2, fra.id.clone(), 2)]
    );
}

/// Messages that are not Keel CloudEvents are stepped over and counted.
async fn skips_and_counts_undecodable_messages(bus: Arc<dyn Bus>) {
    bus.ensure_stream(&spec()).await.unwrap();
    let rec = Arc::new(Recorder::default());
    let feed = feed(&bus, options(Duration::from_millis(100)), rec.clone());
    let fra = origin("fra", 1);

    let s1 = append_activity(&bus, &fra, 1).await;
    append_raw(&bus, "fra", b"\x00\x01 not json".to_vec()).await;
    append_raw(&bus, "fra", br#"{"hello":"world"}"#.to_vec()).await;
    let mut old_spec = envelope::outbox_event(REGION, &fra.id, 2, &activity_entry(&fra, 2));
    old_spec.specversion = "0.3".into();
    append_raw(&bus, "fra", old_spec.to_json()).await;
    append_raw(&bus, "fra", Vec::new()).await;
    let s6 = append_activity(&bus, &fra, 2).await;

    wait_cursor(&feed, s6).await;
    assert_eq!(
        rec.applied(),
        [(s1, fra.id.clone(), 1), (s6, fra.id.clone(), 2)]
    );
    assert_eq!(feed.undecodable(), 4);
    assert_eq!(feed.duplicates(), 0);
    assert!(feed.is_running());
}

/// `start_after`: the handler sees only later sequences, but the prefix is
/// read to rebuild dedup state, so a later resend of a write applied before
/// the restart is still recognised.
async fn start_after_replays_only_to_rebuild_dedup(bus: Arc<dyn Bus>) {
    bus.ensure_stream(&spec()).await.unwrap();
    let (fra, par) = (origin("fra", 1), origin("par", 2));
    append_activity(&bus, &fra, 1).await;
    append_activity(&bus, &par, 1).await;
    append_raw(&bus, "par", b"junk".to_vec()).await;
    let applied_through = append_activity(&bus, &fra, 2).await;
    // After the (simulated) restart:
    append_activity(&bus, &fra, 1).await; // resend of an applied write
    let s_par2 = append_activity(&bus, &par, 2).await;
    append_activity(&bus, &fra, 2).await; // resend
    let s_fra3 = append_activity(&bus, &fra, 3).await;

    let rec = Arc::new(Recorder::default());
    let feed = feed(
        &bus,
        FeedOptions {
            start_after: applied_through,
            ..options(NO_POLL)
        },
        rec.clone(),
    );
    assert!(feed.cursor() >= applied_through);
    wait_cursor(&feed, s_fra3).await;
    assert_eq!(
        rec.applied(),
        [(s_par2, par.id.clone(), 2), (s_fra3, fra.id.clone(), 3)]
    );
    assert_eq!(feed.replayed(), 4);
    assert_eq!(feed.duplicates(), 2);
    assert_eq!(feed.undecodable(), 0);
    assert_eq!(feed.applied(), 2);
}

/// Both views behind feeds: duplicates are not counted twice, and the
/// user's last activity is the latest by HLC.
async fn views_follow_the_stream(bus: Arc<dyn Bus>) {
    bus.ensure_stream(&spec()).await.unwrap();
    let users = Arc::new(UserStateView::new(60_000));
    let metrics = Arc::new(MetricsView::new(60_000));
    let user_feed = feed(&bus, options(Duration::from_millis(100)), users.clone());
    let metric_feed = feed(&bus, options(Duration::from_millis(100)), metrics.clone());
    let (fra, par) = (origin("fra", 1), origin("par", 2));

    let activity = |o: &Origin, at_ms: u64, kind: &str| OutboxEntry::Activity {
        component: "app".into(),
        user: "alice".into(),
        record: ActivityRecord {
            activity: Activity {
                kind: kind.into(),
                attributes: vec![],
            },
            edge: o.edge.into(),
            at: hlc(at_ms, o.edge),
        },
    };
    // par's write happened later but is forwarded first.
    append(&bus, &par, 1, &activity(&par, 120_000, "checkout")).await;
    append(&bus, &fra, 1, &activity(&fra, 100_000, "browse")).await;
    let m1 = metric_entry(&fra, 2, 60_000, 5.0);
    append(&bus, &fra, 2, &m1).await;
    append(&bus, &fra, 2, &m1).await; // resend: must not count twice
    append(&bus, &par, 2, &metric_entry(&par, 2, 119_999, 1.0)).await;
    let last = append(&bus, &par, 3, &metric_entry(&par, 3, 120_000, 2.0)).await;

    wait_cursor(&user_feed, last).await;
    wait_cursor(&metric_feed, last).await;
    let alice = users.get_at("app", "alice", 130_000).unwrap();
    assert_eq!(alice.last_seen, hlc(120_000, "par"));
    assert_eq!(alice.last_seen_edge, "par");
    assert_eq!(alice.last_activity.kind, "checkout");
    assert_eq!(alice.online_edges, ["par", "fra"]);
    assert_eq!(users.online_edges("app", "alice", 165_000, 60_000), ["par"]);

    let points = metrics.query("app", "latency", 0, 180_000);
    let summary: Vec<(u64, u64, f64)> = points
        .iter()
        .map(|p| (p.start_ms, p.count, p.sum))
        .collect();
    assert_eq!(summary, [(60_000, 2, 6.0), (120_000, 1, 2.0)]);
    assert_eq!((points[0].min, points[0].max), (1.0, 5.0));
    assert_eq!(metric_feed.duplicates(), 1);
    assert_eq!(users.ignored() + metrics.ignored(), 0);
}

/// Notifications published while the feed's connection is down are lost;
/// the read right after the reconnect catches up (the feed never polls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_reads_after_reconnect() {
    let server = start_server().await;
    let proxy = FaultProxy::start(server.addr());
    let feed_bus = connect(proxy.url()).await;
    let feed_bus: Arc<dyn Bus> = Arc::new(feed_bus);
    let writer: Arc<dyn Bus> = Arc::new(connect(server.url()).await);
    writer.ensure_stream(&spec()).await.unwrap();

    let rec = Arc::new(Recorder::default());
    let feed = feed(&feed_bus, options(NO_POLL), rec.clone());
    let fra = origin("fra", 1);
    let s1 = append_activity(&writer, &fra, 1).await;
    wait_cursor(&feed, s1).await;
    // Idle (not in the middle of a read that the cut would fail and the
    // retry would redo): only the reconnect can make it read again.
    assert!(wait_until_async(WAIT, || async { feed.caught_up() }).await);

    proxy.cut();
    assert!(
        wait_until_async(WAIT, || async {
            feed_bus.connection_state() != ConnectionState::Connected
        })
        .await
    );
    let s2 = append_activity(&writer, &fra, 2).await;
    let s3 = append_activity(&writer, &fra, 3).await;
    assert_eq!(feed.cursor(), s1);
    proxy.heal();
    wait_cursor(&feed, s3).await;
    assert_eq!(
        rec.applied(),
        [
            (s1, fra.id.clone(), 1),
            (s2, fra.id.clone(), 2),
            (s3, fra.id.clone(), 3)
        ]
    );
}

/// Dropping the handle stops the feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_dropping_the_handle_stops_the_feed() {
    let bus: Arc<dyn Bus> = Arc::new(LocalBus::new());
    bus.ensure_stream(&spec()).await.unwrap();
    let rec = Arc::new(Recorder::default());
    let f = feed(&bus, options(NO_POLL), rec.clone());
    let fra = origin("fra", 1);
    let s1 = append_activity(&bus, &fra, 1).await;
    wait_cursor(&f, s1).await;
    drop(f);
    // The aborted task drops its handler (and its subscription).
    assert!(wait_until_async(WAIT, || async { Arc::strong_count(&rec) == 1 }).await);
    append_activity(&bus, &fra, 2).await;
    assert_eq!(rec.applied().len(), 1);
}
