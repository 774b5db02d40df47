//! The rendered configs, run: a real nats-server super-cluster of three
//! regions (us-west: 1 server, eu-central: 3, ap-south: 1) started from
//! `keel_topology::render`'s output, exercised with async-nats clients that
//! authenticate with `keel_topology::password`.
//!
//! Everything waits by polling with a deadline; "nothing arrived" is
//! established by a sentinel published after the data on the same path.

use async_nats::jetstream::{self, stream};
use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event, ServerError};
use futures::StreamExt as _;
use keel_config::{
    CacheTier, ConsensusProtocol, Coordination, GlobalEventStream, Location, NatsServerAddr,
    NatsTopology, PartitionTolerance, Region, RegionalDatabase, RegionsConfig, Residency,
};
use keel_test_support::{NatsSupercluster, ServerSpec, free_port, wait_until_async};
use keel_topology::{RenderedServer, password, region_account, render, replicas, stream_name};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tempfile::TempDir;

const SECRET: &[u8] = b"supercluster-test-secret";
const WAIT: Duration = Duration::from_secs(30);

const US: &str = "us-west-1";
const EU1: &str = "eu-central-1";
const EU2: &str = "eu-central-2";
const EU3: &str = "eu-central-3";
const AP: &str = "ap-south-1";

/// A running super-cluster and the topology it was rendered from.
struct Topo {
    // Dropped first: the servers die before their store dirs are removed.
    sc: NatsSupercluster,
    regions: RegionsConfig,
    rendered: Vec<RenderedServer>,
    _dir: TempDir,
}

/// `n` distinct currently free loopback ports.
fn ports(n: usize) -> Vec<u16> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let p = free_port();
        if seen.insert(p) {
            out.push(p);
        }
    }
    out
}

fn region(name: &str, class: Residency, edges: &[&str], servers: usize) -> Region {
    let p = ports(4 * servers);
    Region {
        name: name.into(),
        edges: edges.iter().map(|e| (*e).to_string()).collect(),
        coordinator: edges[0].into(),
        database: RegionalDatabase::Nats,
        cache_tier: CacheTier::Nats,
        data_residency: class,
        compliance: vec![],
        servers: p
            .chunks(4)
            .map(|c| NatsServerAddr {
                host: "127.0.0.1".into(),
                client_port: c[0],
                cluster_port: c[1],
                gateway_port: c[2],
                monitor_port: c[3],
            })
            .collect(),
        location: Location {
            file: "regions.toml".into(),
            line: 1,
            column: 1,
        },
    }
}

/// The test topology on fresh free ports, JetStream under `store_root`.
fn topology(store_root: &Path, spec: &[(&str, Residency, &[&str], usize)]) -> RegionsConfig {
    RegionsConfig {
        path: "regions.toml".into(),
        regions: spec
            .iter()
            .map(|(n, c, e, s)| region(n, *c, e, *s))
            .collect(),
        coordination: Coordination {
            global_event_stream: GlobalEventStream::NatsGateways,
            consensus_protocol: ConsensusProtocol::Raft,
            partition_tolerance: PartitionTolerance::Ap,
            allow_cross_zone_migration: false,
        },
        nats: NatsTopology {
            secret_env: "KEEL_NATS_SECRET".into(),
            store_dir: store_root.to_path_buf(),
        },
    }
}

fn three_regions(store_root: &Path) -> RegionsConfig {
    topology(
        store_root,
        &[
            ("us-west", Residency::Us, &["sfo", "lax"], 1),
            ("eu-central", Residency::Gdpr, &["fra", "ams"], 3),
            ("ap-south", Residency::Local, &["bom", "del"], 1),
        ],
    )
}

/// Renders `make(store_root)` and starts it (again on new ports if one was
/// taken meanwhile); returns once routes, gateways and JetStream formed.
fn start(make: fn(&Path) -> RegionsConfig) -> Topo {
    let dir = tempfile::Builder::new()
        .prefix("keel-topology-")
        .tempdir()
        .expect("temp dir");
    let root = dir.path().join("jetstream");
    let mut last = None;
    let sc = NatsSupercluster::start_retrying(|| {
        let regions = make(&root);
        let rendered = render(&regions, SECRET);
        let specs = rendered.iter().cloned().map(ServerSpec::from).collect();
        last = Some((regions, rendered));
        specs
    });
    let (regions, rendered) = last.expect("the closure ran");
    Topo {
        sc,
        regions,
        rendered,
        _dir: dir,
    }
}

async fn start_three() -> Topo {
    tokio::task::spawn_blocking(|| start(three_regions))
        .await
        .expect("start task")
}

impl Topo {
    fn rendered(&self, server: &str) -> &RenderedServer {
        self.rendered
            .iter()
            .find(|s| s.server_name == server)
            .expect("rendered server")
    }

    async fn try_connect(
        &self,
        server: &str,
        user: &str,
        options: ConnectOptions,
    ) -> Result<Client, async_nats::ConnectError> {
        options
            .user_and_password(user.into(), password(SECRET, user))
            .name(format!("{user}@{server}"))
            .connect(self.sc.url(server))
            .await
    }

    /// A client of `user` on `server`, with the password derived from the
    /// test secret.
    async fn connect(&self, server: &str, user: &str) -> Client {
        self.try_connect(server, user, ConnectOptions::new())
            .await
            .unwrap_or_else(|e| panic!("{user}@{server} connects: {e}"))
    }
}

#[derive(Debug, Clone)]
struct Seen {
    subject: String,
    payload: Vec<u8>,
}

impl Seen {
    fn payload_str(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// Returns once the server has processed `client`'s earlier commands (a
/// message to its own inbox came back; async-nats's `flush` only writes the
/// socket).
async fn round_trip(client: &Client) {
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .expect("subscribe inbox");
    client
        .publish(inbox, "rt".into())
        .await
        .expect("publish to inbox");
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("round trip within deadline")
        .expect("subscription open");
}

/// Everything a subscription receives, collected in the background.
struct Collector {
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    /// Subscribes `client` to `subject`; returns once the server has the
    /// subscription.
    async fn start(name: &str, client: &Client, subject: &str) -> Collector {
        let mut sub = client
            .subscribe(subject.to_string())
            .await
            .unwrap_or_else(|e| panic!("{name} subscribes to {subject}: {e}"));
        round_trip(client).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                sink.lock().expect("collector lock").push(Seen {
                    subject: m.subject.to_string(),
                    payload: m.payload.to_vec(),
                });
            }
        });
        Collector {
            name: name.into(),
            seen,
            task,
        }
    }

    fn snapshot(&self) -> Vec<Seen> {
        self.seen.lock().expect("collector lock").clone()
    }

    fn count(&self, f: impl Fn(&Seen) -> bool) -> usize {
        self.seen
            .lock()
            .expect("collector lock")
            .iter()
            .filter(|s| f(s))
            .count()
    }

    fn has_subject(&self, subject: &str) -> bool {
        self.count(|s| s.subject == subject) > 0
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A message that carries EU personal data or an EU user's id: any
/// `keel.eu-central.*` subject (the GDPR account's traffic), a `PII-`
/// payload, or a user-scoped subject inside a payload (JetStream API
/// answers, Raft entries, advisories).
fn is_personal(s: &Seen) -> bool {
    s.subject.starts_with("keel.eu-central.")
        || contains(&s.payload, b"PII-")
        || contains(&s.payload, b"keel.eu-central.user.")
}

/// Publishes `payload` on `subject` with `Nats-Msg-Id: id` until the
/// stream acknowledges it. A stream just created accepts messages once its
/// leader is elected and the leader's interest has reached the publisher's
/// server; until then a publish finds no responders. Retrying is safe: the
/// id deduplicates.
async fn publish_when_ready(
    js: &jetstream::Context,
    subject: &str,
    id: &str,
    payload: &str,
) -> jetstream::publish::PublishAck {
    let ack = Mutex::new(None);
    let acked = wait_until_async(WAIT, || async {
        let message = jetstream::message::PublishMessage::build()
            .message_id(id)
            .payload(payload.to_string().into());
        if let Ok(future) = js.send_publish(subject.to_string(), message).await
            && let Ok(a) = future.await
        {
            *ack.lock().expect("ack lock") = Some(a);
        }
        ack.lock().expect("ack lock").is_some()
    })
    .await;
    assert!(acked, "no stream acknowledged {subject} within {WAIT:?}");
    ack.into_inner().expect("ack lock").expect("acked")
}

/// The EU events stream, as `fra` creates it: R3 on eu-central only.
/// Returns once it stores what `fra` publishes (one warm-up event,
/// `keel.eu-central.edge.warmup.events`, is in it).
async fn create_eu_stream(t: &Topo, fra: &Client) -> stream::Stream {
    let js = jetstream::new(fra.clone());
    let config = stream::Config {
        name: stream_name("eu-central"),
        subjects: vec!["keel.eu-central.edge.*.events".into()],
        num_replicas: replicas(&t.regions, "eu-central"),
        placement: Some(stream::Placement {
            cluster: Some("eu-central".into()),
            tags: vec!["region:eu-central".into()],
        }),
        ..Default::default()
    };
    // The meta leader learns each peer's cluster and tags from its stats,
    // which can trail the formed super-cluster: until then placement finds
    // "no suitable peers" (10005). Creating the same config again is a no-op.
    let created = Mutex::new(None);
    let placed = wait_until_async(WAIT, || async {
        match js.create_stream(config.clone()).await {
            Ok(s) => {
                *created.lock().expect("stream lock") = Some(Ok(s));
                true
            }
            Err(e) => {
                let unplaced = matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(api)
                    if api.error_code() == jetstream::ErrorCode(10005));
                if !unplaced {
                    *created.lock().expect("stream lock") = Some(Err(e));
                }
                !unplaced
            }
        }
    })
    .await;
    assert!(placed, "no EU peers for the EU stream within {WAIT:?}");
    let s = created
        .into_inner()
        .expect("stream lock")
        .expect("a result")
        .expect("fra creates the EU stream");
    publish_when_ready(
        &js,
        "keel.eu-central.edge.warmup.events",
        "warmup",
        "warmup",
    )
    .await;
    s
}

/// Files under `dir` (recursively) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| contains(&b, needle)) {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

/// (a) EU personal data never reaches a client, a system user or a
/// JetStream store outside eu-central, though every non-EU connection
/// subscribes to everything it may; EU users do not exist outside the EU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eu_personal_data_stays_in_the_eu() {
    let t = start_three().await;

    // Non-EU: every user a non-EU server defines, subscribed as widely as
    // it may.
    let sfo = t.connect(US, "sfo").await;
    let global_sfo = t.connect(US, "global-sfo").await;
    let bom = t.connect(AP, "bom").await;
    let global_bom = t.connect(AP, "global-bom").await;
    let non_eu = [
        Collector::start("sfo@us-west-1 (US)", &sfo, ">").await,
        Collector::start("global-sfo@us-west-1 (GLOBAL)", &global_sfo, ">").await,
        Collector::start("bom@ap-south-1 (AP_SOUTH)", &bom, ">").await,
        Collector::start("global-bom@ap-south-1 (GLOBAL)", &global_bom, ">").await,
    ];
    // The system user may not subscribe to `>` (its Raft and JetStream API
    // traffic would leak); `$SYS.>` and `_INBOX.>` it may.
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let sys_us = t
        .try_connect(
            US,
            "sys-us-west",
            ConnectOptions::new().event_callback(move |e| {
                let tx = events_tx.clone();
                async move {
                    let _ = tx.send(e);
                }
            }),
        )
        .await
        .expect("sys-us-west connects");
    let _refused = sys_us.subscribe(">").await.expect("subscribe is sent");
    let refused = tokio::time::timeout(WAIT, async {
        while let Some(e) = events.recv().await {
            if let Event::ServerError(ServerError::Other(m)) = &e
                && m.to_lowercase()
                    .contains("permissions violation for subscription")
            {
                return m.clone();
            }
        }
        String::new()
    })
    .await
    .expect("the server refuses the system user's `>` subscription");
    assert!(refused.contains('>'), "{refused}");
    let sys_collectors = [
        Collector::start("sys-us-west@us-west-1 $SYS.>", &sys_us, "$SYS.>").await,
        Collector::start("sys-us-west@us-west-1 _INBOX.>", &sys_us, "_INBOX.>").await,
    ];

    // EU: the publisher and its GLOBAL connection on eu-central-1 (the
    // sentinel then travels every path the data would), a reader on -2,
    // a system user on each EU server.
    let fra = t.connect(EU1, "fra").await;
    let global_fra = t.connect(EU1, "global-fra").await;
    let ams = t.connect(EU2, "ams").await;
    let ams_sub = Collector::start("ams@eu-central-2", &ams, "keel.eu-central.>").await;
    let mut sys_eu = Vec::new();
    for server in [EU1, EU2, EU3] {
        sys_eu.push(t.connect(server, "sys-eu-central").await);
    }
    // The PII also goes through an R3 stream, so its Raft traffic is there
    // to leak too.
    let eu_stream = create_eu_stream(&t, &fra).await;

    // Interest has propagated: EU route interest, GLOBAL gateway interest
    // of every non-EU subscriber, SYS gateway interest.
    assert!(
        wait_until_async(WAIT, || async {
            fra.publish("keel.eu-central.warmup", "w".into())
                .await
                .expect("publish");
            global_fra
                .publish("keel.global.warmup", "w".into())
                .await
                .expect("publish");
            for (i, c) in sys_eu.iter().enumerate() {
                c.publish(format!("$SYS.REQ.KEEL.WARMUP.{i}"), "w".into())
                    .await
                    .expect("publish");
            }
            ams_sub.has_subject("keel.eu-central.warmup")
                && non_eu.iter().all(|c| c.has_subject("keel.global.warmup"))
                && (0..3)
                    .all(|i| sys_collectors[0].has_subject(&format!("$SYS.REQ.KEEL.WARMUP.{i}")))
        })
        .await,
        "interest did not propagate"
    );

    for n in 0..200 {
        fra.publish("keel.eu-central.edge.fra.events", format!("PII-{n}").into())
            .await
            .expect("publish event");
        fra.publish(
            "keel.eu-central.user.u1.profile",
            format!("PII-{}", 200 + n).into(),
        )
        .await
        .expect("publish profile");
    }
    fra.flush().await.expect("flush");

    // The EU reader gets all 400, the EU stream stores the 200 events.
    let eu_pii = || {
        ams_sub
            .snapshot()
            .iter()
            .filter(|s| s.payload.starts_with(b"PII-"))
            .map(|s| s.payload_str())
            .collect::<BTreeSet<_>>()
            .len()
    };
    assert!(
        wait_until_async(WAIT, || async { eu_pii() == 400 }).await,
        "ams received {} of 400 EU messages",
        eu_pii()
    );
    assert!(
        wait_until_async(WAIT, || async {
            eu_stream
                .get_info()
                .await
                .is_ok_and(|i| i.state.messages == 201)
        })
        .await,
        "the EU stream did not store the 200 events (and the warm-up)"
    );

    // Sentinels after the data, on the paths it would have taken.
    global_fra
        .publish("keel.global.sentinel", "end".into())
        .await
        .expect("publish sentinel");
    for (i, c) in sys_eu.iter().enumerate() {
        c.publish(format!("$SYS.REQ.KEEL.SENTINEL.{i}"), "end".into())
            .await
            .expect("publish sys sentinel");
    }
    assert!(
        wait_until_async(WAIT, || async {
            non_eu.iter().all(|c| c.has_subject("keel.global.sentinel"))
                && (0..3)
                    .all(|i| sys_collectors[0].has_subject(&format!("$SYS.REQ.KEEL.SENTINEL.{i}")))
        })
        .await,
        "sentinels did not arrive"
    );

    for c in non_eu.iter().chain(&sys_collectors) {
        let leaked: Vec<(String, String)> = c
            .snapshot()
            .iter()
            .filter(|s| is_personal(s))
            .map(|s| (s.subject.clone(), s.payload_str()))
            .collect();
        assert!(
            leaked.is_empty(),
            "{} received {} EU personal messages, e.g. {:?}",
            c.name,
            leaked.len(),
            &leaked[..leaked.len().min(3)]
        );
    }
    // Nor did any non-EU JetStream store get a copy.
    for server in [US, AP] {
        let hits = files_containing(&t.rendered(server).store_dir, b"PII-");
        assert!(
            hits.is_empty(),
            "{server} stored EU personal data: {hits:?}"
        );
    }
    let eu_hits = files_containing(&t.rendered(EU2).store_dir, b"PII-");
    assert!(!eu_hits.is_empty(), "the check would see stored data");

    // EU users exist only in EU server configs.
    for server in [US, AP] {
        for user in ["fra", "ams", "global-fra", "sys-eu-central"] {
            match t.try_connect(server, user, ConnectOptions::new()).await {
                Ok(_) => panic!("{user} connected to {server}"),
                Err(e) => assert_eq!(
                    e.kind(),
                    ConnectErrorKind::AuthorizationViolation,
                    "{user}@{server}: {e}"
                ),
            }
        }
    }
    // A wrong password is refused too (the secret matters).
    let wrong = ConnectOptions::with_user_and_password("fra".into(), password(b"other", "fra"))
        .connect(t.sc.url(EU1))
        .await;
    assert!(
        wrong.is_err_and(|e| e.kind() == ConnectErrorKind::AuthorizationViolation),
        "a password from another secret must be refused"
    );
}

/// (b) `keel.global.>` published in each region (on GLOBAL) reaches a
/// subscriber in every region exactly once, both through the zone
/// account's import and on GLOBAL itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_events_reach_every_region_exactly_once() {
    let t = start_three().await;
    let publishers = [
        ("us-west", t.connect(US, "global-sfo").await),
        ("eu-central", t.connect(EU1, "global-fra").await),
        ("ap-south", t.connect(AP, "global-bom").await),
    ];
    let mut clients = Vec::new();
    let mut subs = Vec::new();
    for (server, user) in [
        (US, "sfo"),
        (US, "global-lax"),
        (EU2, "ams"),
        (EU3, "global-ams"),
        (AP, "bom"),
        (AP, "global-del"),
    ] {
        let c = t.connect(server, user).await;
        subs.push(Collector::start(&format!("{user}@{server}"), &c, "keel.global.>").await);
        clients.push(c);
    }

    // Every subscriber's interest reached every region.
    assert!(
        wait_until_async(WAIT, || async {
            for (region, p) in &publishers {
                p.publish(format!("keel.global.warmup.{region}"), "w".into())
                    .await
                    .expect("publish");
            }
            subs.iter().all(|s| {
                publishers
                    .iter()
                    .all(|(r, _)| s.has_subject(&format!("keel.global.warmup.{r}")))
            })
        })
        .await,
        "global interest did not propagate"
    );

    for (region, p) in &publishers {
        for n in 0..50 {
            p.publish("keel.global.events.test", format!("{region}-{n}").into())
                .await
                .expect("publish");
        }
        p.publish(format!("keel.global.done.{region}"), "end".into())
            .await
            .expect("publish sentinel");
        p.flush().await.expect("flush");
    }
    assert!(
        wait_until_async(WAIT, || async {
            subs.iter().all(|s| {
                publishers
                    .iter()
                    .all(|(r, _)| s.has_subject(&format!("keel.global.done.{r}")))
            })
        })
        .await,
        "sentinels did not arrive"
    );
    for s in &subs {
        let mut per_payload: BTreeMap<String, usize> = BTreeMap::new();
        for m in s
            .snapshot()
            .iter()
            .filter(|m| m.subject == "keel.global.events.test")
        {
            *per_payload.entry(m.payload_str()).or_default() += 1;
        }
        assert_eq!(per_payload.len(), 150, "{}: distinct messages", s.name);
        let dups: Vec<_> = per_payload.iter().filter(|(_, n)| **n != 1).collect();
        assert!(dups.is_empty(), "{}: duplicates {dups:?}", s.name);
    }
}

/// Answers every request on `subject` with `reply` until dropped.
async fn respond(
    client: &Client,
    subject: &str,
    reply: &'static str,
) -> tokio::task::JoinHandle<()> {
    let mut sub = client
        .subscribe(subject.to_string())
        .await
        .expect("responder subscribes");
    round_trip(client).await;
    let c = client.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(to) = m.reply {
                let _ = c.publish(to, reply.into()).await;
            }
        }
    })
}

/// A reply to `subject` within 500 ms, if any.
async fn ask(client: &Client, subject: &str) -> Option<String> {
    match tokio::time::timeout(
        Duration::from_millis(500),
        client.request(subject.to_string(), "q".into()),
    )
    .await
    {
        Ok(Ok(m)) => Some(String::from_utf8_lossy(&m.payload).into_owned()),
        _ => None,
    }
}

/// (c) Every zone's API (`keel.<region>.api.>`) answers requests from the
/// other zones; nothing else of a zone is reachable from another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_apis_answer_across_zones() {
    let t = start_three().await;
    let fra = t.connect(EU1, "fra").await;
    let bom = t.connect(AP, "bom").await;
    let sfo = t.connect(US, "sfo").await;
    let ams = t.connect(EU2, "ams").await;
    let _eu_api = respond(&fra, "keel.eu-central.api.stats", "eu-central stats").await;
    let _eu_private = respond(&fra, "keel.eu-central.user.u1.profile", "PII").await;
    let _ap_api = respond(&bom, "keel.ap-south.api.stats", "ap-south stats").await;

    for (name, client, subject, want) in [
        (
            "sfo@us-west-1",
            &sfo,
            "keel.eu-central.api.stats",
            "eu-central stats",
        ),
        (
            "bom@ap-south-1",
            &bom,
            "keel.eu-central.api.stats",
            "eu-central stats",
        ),
        (
            "ams@eu-central-2",
            &ams,
            "keel.eu-central.api.stats",
            "eu-central stats",
        ),
        (
            "sfo@us-west-1",
            &sfo,
            "keel.ap-south.api.stats",
            "ap-south stats",
        ),
        (
            "fra@eu-central-1",
            &fra,
            "keel.ap-south.api.stats",
            "ap-south stats",
        ),
    ] {
        // The first answer comes once the responder's interest has crossed
        // the gateways; after that every request is answered.
        assert!(
            wait_until_async(WAIT, || async { ask(client, subject).await.is_some() }).await,
            "{name}: no answer on {subject}"
        );
        for _ in 0..20 {
            let reply = client
                .request(subject.to_string(), "q".into())
                .await
                .unwrap_or_else(|e| panic!("{name} → {subject}: {e}"));
            assert_eq!(reply.payload, want.as_bytes(), "{name} → {subject}");
        }
    }
    // Another zone's non-API subjects do not exist for a US user: no
    // responders in its own account.
    let err = sfo
        .request("keel.eu-central.user.u1.profile", "q".into())
        .await
        .expect_err("EU personal subjects are not reachable from us-west");
    assert_eq!(
        err.kind(),
        async_nats::RequestErrorKind::NoResponders,
        "{err}"
    );
    // ... while the same request inside the EU is answered.
    assert!(
        wait_until_async(WAIT, || async {
            ask(&ams, "keel.eu-central.user.u1.profile")
                .await
                .as_deref()
                == Some("PII")
        })
        .await
    );
}

/// (d) The EU stream: R3 on eu-central (placement cluster and tag),
/// deduplication by `Nats-Msg-Id`, replication traffic in the zone's
/// account, invisible from other zones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eu_stream_is_placed_replicated_and_deduplicated_in_the_eu() {
    let t = start_three().await;
    let fra = t.connect(EU1, "fra").await;
    let s = create_eu_stream(&t, &fra).await;
    let js = jetstream::new(fra.clone());
    let mut acks = Vec::new();
    for _ in 0..2 {
        let ack = js
            .send_publish(
                "keel.eu-central.edge.fra.events",
                jetstream::message::PublishMessage::build()
                    .message_id("fra:1")
                    .payload("event 1".into()),
            )
            .await
            .expect("publish")
            .await
            .expect("ack");
        acks.push(ack);
    }
    assert_eq!(acks[0].stream, "KEEL_EU_CENTRAL_EVENTS");
    assert!(!acks[0].duplicate);
    assert!(acks[1].duplicate, "same Nats-Msg-Id is a duplicate");
    assert_eq!(acks[0].sequence, acks[1].sequence);

    let info = s.get_info().await.expect("stream info");
    // The warm-up event and fra:1 once.
    assert_eq!(info.state.messages, 2);
    assert_eq!(info.config.num_replicas, 3);
    let cluster = info.cluster.expect("clustered stream");
    assert_eq!(cluster.name.as_deref(), Some("eu-central"));
    assert_eq!(
        cluster.traffic_account.as_deref(),
        Some(region_account(&t.regions, "eu-central").as_str()),
        "replication traffic stays in the zone account"
    );
    let mut members: Vec<String> = cluster.replicas.iter().map(|p| p.name.clone()).collect();
    members.extend(cluster.leader.clone());
    members.sort();
    assert_eq!(members, [EU1, EU2, EU3]);

    // Another edge of the region appends to it, but may not create streams
    // (only the coordinator places zone data).
    let ams = t.connect(EU2, "ams").await;
    let mut ams_js = jetstream::new(ams);
    ams_js.set_timeout(Duration::from_secs(2));
    let ack = ams_js
        .send_publish(
            "keel.eu-central.edge.ams.events",
            jetstream::message::PublishMessage::build()
                .message_id("ams:1")
                .payload("event from ams".into()),
        )
        .await
        .expect("publish")
        .await
        .expect("ams appends to the region's stream");
    assert_eq!(ack.stream, "KEEL_EU_CENTRAL_EVENTS");
    let refused = ams_js
        .create_stream(stream::Config {
            name: "EU_ELSEWHERE".into(),
            subjects: vec!["keel.eu-central.user.>".into()],
            placement: Some(stream::Placement {
                cluster: Some("us-west".into()),
                tags: vec![],
            }),
            ..Default::default()
        })
        .await;
    assert!(refused.is_err(), "a non-coordinator edge created a stream");

    // Other zones' accounts do not see it.
    for (server, user) in [(US, "sfo"), (AP, "bom")] {
        let c = t.connect(server, user).await;
        let err = jetstream::new(c)
            .get_stream(stream_name("eu-central"))
            .await
            .expect_err("the EU stream is not in other accounts");
        assert!(err.to_string().contains("not found"), "{user}: {err}");
    }
}

/// A topology of one region renders without gateways and runs: one server
/// standalone (no cluster block), three servers as one cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_region_topologies_run() {
    fn one_server(root: &Path) -> RegionsConfig {
        topology(root, &[("solo", Residency::Local, &["x"], 1)])
    }
    fn one_cluster(root: &Path) -> RegionsConfig {
        topology(root, &[("eu-central", Residency::Gdpr, &["fra", "ams"], 3)])
    }
    for (make, server, user, replicas_want) in [
        (one_server as fn(&Path) -> RegionsConfig, "solo-1", "x", 1),
        (one_cluster, "eu-central-2", "fra", 3),
    ] {
        let t = tokio::task::spawn_blocking(move || start(make))
            .await
            .expect("start task");
        assert!(t.rendered.iter().all(|s| !s.config.contains("gateway {")));
        let region = t.rendered[0].region.clone();
        assert_eq!(replicas(&t.regions, &region), replicas_want);
        let c = t.connect(server, user).await;
        let js = jetstream::new(c.clone());
        js.create_stream(stream::Config {
            name: stream_name(&region),
            subjects: vec![format!("keel.{region}.edge.*.events")],
            num_replicas: replicas_want,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{region}: create stream: {e}"));
        let ack = publish_when_ready(
            &js,
            &format!("keel.{region}.edge.{user}.events"),
            &format!("{user}:1"),
            "e",
        )
        .await;
        assert_eq!((ack.sequence, ack.duplicate), (1, false));
        let g = t.connect(server, &format!("global-{user}")).await;
        let mut sub = c.subscribe("keel.global.>").await.expect("subscribe");
        round_trip(&c).await;
        g.publish("keel.global.events.x", "g".into())
            .await
            .expect("publish");
        let m = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap_or_else(|_| panic!("{server}: no global message within {WAIT:?}"))
            .expect("subscription open");
        assert_eq!(m.payload, "g".as_bytes());
    }
}
