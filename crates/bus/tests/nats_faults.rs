//! `NatsBus` under faults: a `FaultProxy` between the bus and a real
//! `nats-server`, server restarts, and a node killed in a 3-node cluster.
//! Everything waits by polling with a deadline.

use bytes::Bytes;
use keel_bus::nats::{NatsBus, NatsOptions};
use keel_bus::{Bus, BusError, ConnectionState, StreamSpec, Subscription};
use keel_test_support::{FaultProxy, NatsCluster, NatsServer, wait_until_async};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

fn options(servers: Vec<String>) -> NatsOptions {
    NatsOptions {
        servers,
        name: "keel-fault-test".into(),
        ..Default::default()
    }
}

async fn wait_state(bus: &NatsBus, want: ConnectionState) -> bool {
    wait_until_async(WAIT, || async { bus.connection_state() == want }).await
}

/// A plain client straight to the server (not through the proxy).
async fn raw_client(url: &str) -> async_nats::Client {
    async_nats::connect(url).await.expect("raw client connects")
}

/// Returns once the server has processed the client's earlier commands.
async fn raw_round_trip(client: &async_nats::Client) {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client.publish(inbox, Bytes::new()).await.unwrap();
    tokio::time::timeout(WAIT, futures::StreamExt::next(&mut sub))
        .await
        .expect("round trip within deadline")
        .expect("subscription open");
}

/// Next message whose payload is `payload` (earlier ones are skipped).
async fn receive(sub: &mut Subscription, payload: &str) {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(m) = sub.next().await {
            if m.payload == payload.as_bytes() {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "did not receive {payload:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_disconnects_heal_reconnects_and_subscription_resumes() {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let proxy = FaultProxy::start(server.addr());
    let bus = NatsBus::connect(options(vec![proxy.url()])).await.unwrap();
    bus.wait_connected(WAIT).await.unwrap();
    let events = bus.connection_events();
    let raw = raw_client(&server.url()).await;

    let mut sub = bus.subscribe("events.>", None).await.unwrap();
    bus.round_trip(WAIT).await.unwrap(); // the SUB reached the server
    raw.publish("events.before", "before".into()).await.unwrap();
    receive(&mut sub, "before").await;

    proxy.cut();
    assert!(
        wait_state(&bus, ConnectionState::Disconnected).await,
        "state after cut: {:?}",
        bus.connection_state()
    );
    assert!(events.has_changed().unwrap());
    // While cut, calls fail fast instead of queueing.
    let err = bus
        .publish("events.x", vec![], Bytes::new())
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::Unavailable(_)), "{err:?}");
    let err = bus
        .request("svc.x", vec![], Bytes::new(), WAIT)
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::Unavailable(_)), "{err:?}");
    // The client keeps trying (and the proxy keeps refusing).
    assert!(wait_until_async(WAIT, || async { proxy.connections_refused() >= 2 }).await);

    let healed = Instant::now();
    proxy.heal();
    assert!(
        wait_state(&bus, ConnectionState::Connected).await,
        "state after heal: {:?}",
        bus.connection_state()
    );
    eprintln!("reconnected {:?} after heal", healed.elapsed());
    // `Connected` means the subscription is live on the server again.
    raw.publish("events.after", "after".into()).await.unwrap();
    receive(&mut sub, "after").await;
    // And the bus publishes again.
    let mut raw_sub = raw.subscribe("check.>").await.unwrap();
    raw_round_trip(&raw).await;
    bus.publish("check.1", vec![], "from-bus".into())
        .await
        .unwrap();
    let m = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut raw_sub))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.payload, "from-bus");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_partitioned_and_connects_after_heal() {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let proxy = FaultProxy::start(server.addr());
    proxy.cut();
    let bus = NatsBus::connect(options(vec![proxy.url()])).await.unwrap();
    assert_eq!(bus.connection_state(), ConnectionState::Connecting);
    // It is trying, and stays not-connected while the partition lasts.
    assert!(wait_until_async(WAIT, || async { proxy.connections_refused() >= 3 }).await);
    assert_ne!(bus.connection_state(), ConnectionState::Connected);
    let err = bus
        .stream_append("x.y", vec![], Bytes::new(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::Unavailable(_)), "{err:?}");
    // Subscribing works before the first connection.
    let mut sub = bus.subscribe("early.>", None).await.unwrap();

    proxy.heal();
    assert!(wait_state(&bus, ConnectionState::Connected).await);
    let raw = raw_client(&server.url()).await;
    raw.publish("early.1", "hello".into()).await.unwrap();
    receive(&mut sub, "hello").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_link_is_detected_by_pings() {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let proxy = FaultProxy::start(server.addr());
    let bus = NatsBus::connect(NatsOptions {
        ping_interval: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(500),
        ..options(vec![proxy.url()])
    })
    .await
    .unwrap();
    bus.wait_connected(WAIT).await.unwrap();
    proxy.set_drop(true);
    assert!(
        wait_state(&bus, ConnectionState::Disconnected).await,
        "a black-holed link was not noticed"
    );
    proxy.set_drop(false);
    assert!(wait_state(&bus, ConnectionState::Connected).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_data_survives_server_restart() {
    let mut server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let bus = NatsBus::connect(options(vec![server.url()])).await.unwrap();
    bus.wait_connected(WAIT).await.unwrap();
    bus.ensure_stream(&StreamSpec {
        name: "DURABLE".into(),
        subjects: vec!["durable.>".into()],
        replicas: 1,
        duplicate_window: Duration::from_secs(60),
        max_age: None,
        placement: None,
    })
    .await
    .unwrap();
    for i in 1..=3 {
        bus.stream_append("durable.x", vec![], Bytes::from(format!("{i}")), None)
            .await
            .unwrap();
    }
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    assert!(wait_state(&bus, ConnectionState::Connected).await);
    let msgs = bus.stream_read("DURABLE", ">", 1, 10).await.unwrap();
    assert_eq!(
        msgs.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let ack = bus
        .stream_append("durable.x", vec![], Bytes::from("4"), None)
        .await
        .unwrap();
    assert_eq!(ack.sequence, 4);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_stream_append_survives_killing_a_node() {
    let mut cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .unwrap();
    let urls = cluster.urls();
    let bus = NatsBus::connect(options(urls.clone())).await.unwrap();
    bus.wait_connected(WAIT).await.unwrap();
    bus.ensure_stream(&StreamSpec {
        name: "REPLICATED".into(),
        subjects: vec!["rep.>".into()],
        replicas: 3,
        duplicate_window: Duration::from_secs(60),
        max_age: None,
        placement: None,
    })
    .await
    .unwrap();
    for i in 0..10 {
        let ack = bus
            .stream_append(
                "rep.x",
                vec![],
                Bytes::from(format!("{i}")),
                Some(&format!("m{i}")),
            )
            .await
            .unwrap();
        assert_eq!(ack.sequence, i + 1);
    }

    // Kill the stream's leader: the hardest node to lose (the survivors
    // elect a new one after nats-server's election timeout, ~4-5 s).
    let raw = async_nats::ConnectOptions::new()
        .reconnect_delay_callback(|_| Duration::from_millis(50))
        .connect(urls.as_slice())
        .await
        .expect("raw client connects");
    let mut js = async_nats::jetstream::new(raw);
    js.set_timeout(Duration::from_millis(500));
    let leader = stream_leader(&js).await.expect("stream has a leader");
    let victim = cluster.index_of(&leader).expect("leader is a cluster node");
    cluster.node_mut(victim).kill();

    // Wait (polling) for a new leader among the survivors and for the bus to
    // be connected, then append once more.
    let failed_over = wait_until_async(WAIT, || async {
        matches!(stream_leader(&js).await, Some(l) if l != leader)
            && bus.connection_state() == ConnectionState::Connected
    })
    .await;
    assert!(failed_over, "no new stream leader after killing {leader}");
    let ack = bus
        .stream_append("rep.x", vec![], Bytes::from("10"), Some("m10"))
        .await
        .unwrap();
    assert_eq!((ack.sequence, ack.duplicate), (11, false));
    // Acknowledged history is intact, and msg_id dedup still holds.
    let dup = bus
        .stream_append("rep.x", vec![], Bytes::from("9"), Some("m9"))
        .await
        .unwrap();
    assert_eq!((dup.sequence, dup.duplicate), (10, true));
    // Reads create an ephemeral consumer, which takes the JetStream meta
    // leader: wait until the survivors agree on one (if the victim was it).
    let formed = tokio::task::block_in_place(|| cluster.wait_formed(WAIT));
    assert!(formed, "survivors did not re-form the JetStream meta group");
    let msgs = bus.stream_read("REPLICATED", ">", 1, 100).await.unwrap();
    assert_eq!(
        msgs.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(),
        (0..=10)
            .map(|i| Bytes::from(format!("{i}")))
            .collect::<Vec<_>>()
    );
}

async fn stream_leader(js: &async_nats::jetstream::Context) -> Option<String> {
    let mut stream = js.get_stream("REPLICATED").await.ok()?;
    let info = stream.info().await.ok()?;
    info.cluster
        .as_ref()?
        .leader
        .clone()
        .filter(|l| !l.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_bus_closes_its_connection() {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let connections = |server: &NatsServer| {
        server
            .monitor("/connz")
            .and_then(|c| c["num_connections"].as_u64())
    };
    let bus = NatsBus::connect(options(vec![server.url()])).await.unwrap();
    bus.wait_connected(WAIT).await.unwrap();
    let sub = bus.subscribe("x", None).await.unwrap();
    assert_eq!(connections(&server), Some(1));
    drop(bus);
    drop(sub);
    assert!(wait_until_async(WAIT, || async { connections(&server) == Some(0) }).await);
}

/// A subscription that falls more than `SUBSCRIPTION_CAPACITY` messages
/// behind loses the newest (a slow consumer), and the connection epoch
/// changes, so caches know they may have missed something; a subscriber that
/// keeps up changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_drop_changes_the_connection_epoch() {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let bus = NatsBus::connect(options(vec![server.url()])).await.unwrap();
    bus.wait_connected(WAIT).await.unwrap();
    let raw = raw_client(&server.url()).await;
    let mut kept_up = bus.subscribe("fast", None).await.unwrap();
    bus.round_trip(WAIT).await.unwrap();
    let epoch = bus.connection_epoch();
    for i in 0..100 {
        raw.publish("fast", i.to_string().into()).await.unwrap();
    }
    receive(&mut kept_up, "99").await;
    assert_eq!(bus.connection_epoch(), epoch, "nothing was dropped");

    let mut slow = bus.subscribe("slow", None).await.unwrap();
    bus.round_trip(WAIT).await.unwrap();
    let sent = keel_bus::nats::SUBSCRIPTION_CAPACITY + 100;
    for i in 0..sent {
        raw.publish("slow", i.to_string().into()).await.unwrap();
    }
    raw_round_trip(&raw).await;
    assert!(
        wait_until_async(WAIT, || async { bus.connection_epoch() != epoch }).await,
        "no drop was noticed"
    );
    assert_eq!(bus.connection_state(), ConnectionState::Connected);
    // What was queued (a full queue) is still delivered, in order; the
    // newest were dropped: the next message after them is a new one.
    for i in 0..keel_bus::nats::SUBSCRIPTION_CAPACITY {
        let m = tokio::time::timeout(WAIT, slow.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload, i.to_string().as_bytes());
    }
    raw.publish("slow", "after".into()).await.unwrap();
    let m = tokio::time::timeout(WAIT, slow.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        m.payload,
        "after".as_bytes(),
        "the rest of the {sent} were dropped"
    );
}
