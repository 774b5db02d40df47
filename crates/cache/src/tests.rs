use super::*;
use keel_bus::local::LocalBus;
use std::sync::atomic::AtomicUsize;

fn ns(n: &str) -> Namespace {
    Namespace::new(n).unwrap()
}

fn opts(edge: &str) -> CacheOptions {
    let bucket = |name: &str| KvSpec {
        bucket: name.into(),
        history: 1,
        max_age: Some(Duration::from_secs(3600)),
        replicas: 1,
        placement: None,
    };
    CacheOptions {
        region: "local".into(),
        edge: edge.into(),
        l1_max_bytes: 1 << 20,
        default_ttls: DEFAULT_TTLS,
        max_ttl: Duration::from_secs(3600),
        max_key_bytes: 64,
        max_value_bytes: 1024,
        region_bucket: Some(bucket("L2")),
        global_bucket: bucket("L3"),
        personal_keys: Default::default(),
    }
}

/// Two nodes of one region sharing a bus.
fn two_nodes() -> (TieredCache, TieredCache) {
    let bus: Arc<dyn Bus> = Arc::new(LocalBus::new());
    let node = |edge| {
        TieredCache::new(
            opts(edge),
            bus.clone(),
            bus.clone(),
            CacheMetrics::default(),
        )
    };
    (node("a"), node("b"))
}

async fn value(c: &TieredCache, n: &str, key: &str) -> Option<Vec<u8>> {
    c.get(&ns(n), key, None).await.unwrap().map(|v| v.to_vec())
}

#[test]
fn envelopes_carry_their_expiry() {
    let e = envelope(b"v", Duration::from_secs(2), 1_000);
    assert_eq!(
        open_envelope(&e, 1_500),
        Stored::Live {
            value: Bytes::from_static(b"v"),
            remaining: Duration::from_millis(1_500)
        }
    );
    assert_eq!(open_envelope(&e, 3_000), Stored::Expired);
    assert_eq!(open_envelope(&e, 9_000), Stored::Expired);
    assert_eq!(
        open_envelope(&Bytes::from_static(b"x"), 0),
        Stored::Unreadable
    );
    let mut wrong_version = e.to_vec();
    wrong_version[0] = 9;
    assert_eq!(open_envelope(&wrong_version.into(), 0), Stored::Unreadable);
}

#[test]
fn tier_keys_are_valid_kv_keys_and_keep_prefixes() {
    let k = tier_key(&ns("app"), "user:1 é.*>");
    keel_bus::check_kv_key(&k).unwrap();
    assert!(k.starts_with(&tier_key(&ns("app"), "user:")));
    assert!(!tier_key(&ns("app2"), "user:1").starts_with(&tier_key(&ns("app"), "")));
}

#[tokio::test]
async fn scopes_write_the_levels_they_name() {
    let (a, b) = two_nodes();
    a.set(&ns("app"), "e", b"1".to_vec(), None, Scope::Edge)
        .await
        .unwrap();
    a.set(&ns("app"), "r", b"2".to_vec(), None, Scope::Region)
        .await
        .unwrap();
    a.set(&ns("app"), "g", b"3".to_vec(), None, Scope::Global)
        .await
        .unwrap();
    assert_eq!(value(&a, "app", "e").await.as_deref(), Some(&b"1"[..]));
    // Node b shares L2 and L3, not L1.
    assert_eq!(value(&b, "app", "e").await, None);
    assert_eq!(value(&b, "app", "r").await.as_deref(), Some(&b"2"[..]));
    assert_eq!(value(&b, "app", "g").await.as_deref(), Some(&b"3"[..]));
    let m = &b.inner.metrics;
    assert_eq!(m.l1.hits.get(), 0);
    assert_eq!(m.l2.hits.get(), 2);
    // Filled on the way up: the second read is an L1 hit.
    assert_eq!(value(&b, "app", "r").await.as_deref(), Some(&b"2"[..]));
    assert_eq!(m.l1.hits.get(), 1);
    // Global entries are in L3 too.
    let l3 = &a.inner.l3;
    assert!(l3.get(&tier_key(&ns("app"), "g")).await.unwrap().is_some());
    assert!(l3.get(&tier_key(&ns("app"), "r")).await.unwrap().is_none());
}

#[tokio::test]
async fn components_never_see_each_others_entries() {
    let (a, b) = two_nodes();
    for scope in [Scope::Edge, Scope::Region, Scope::Global] {
        a.set(&ns("one"), "k", b"secret".to_vec(), None, scope)
            .await
            .unwrap();
        assert_eq!(value(&a, "two", "k").await, None);
        assert_eq!(value(&b, "two", "k").await, None);
    }
    a.invalidate(&ns("two"), Target::Prefix(String::new()), Scope::Global)
        .await
        .unwrap();
    assert_eq!(value(&a, "one", "k").await.as_deref(), Some(&b"secret"[..]));
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let (a, _) = two_nodes();
    let app = ns("app");
    let e = a
        .set(&app, "k", vec![0; 1025], None, Scope::Global)
        .await
        .unwrap_err();
    assert!(matches!(e, CacheError::Limit(_)), "{e:?}");
    let long = "k".repeat(65);
    let e = a.set(&app, &long, vec![1], None, Scope::Region).await;
    assert!(matches!(e, Err(CacheError::Limit(_))), "{e:?}");
    assert!(matches!(
        a.get(&app, &long, None).await,
        Err(CacheError::Limit(_))
    ));
    assert!(matches!(
        a.get(&app, "", None).await,
        Err(CacheError::Invalid(_))
    ));
    for ttl in [Duration::ZERO, Duration::from_secs(3601)] {
        let e = a.set(&app, "k", vec![1], Some(ttl), Scope::Edge).await;
        assert!(matches!(e, Err(CacheError::Invalid(_))), "{e:?}");
    }
    assert_eq!(value(&a, "app", "k").await, None);
    assert!(
        a.inner
            .l3
            .get(&tier_key(&app, "k"))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn entries_expire_at_every_level() {
    let (a, b) = two_nodes();
    let app = ns("app");
    a.set(
        &app,
        "g",
        b"v".to_vec(),
        Some(Duration::from_secs(1)),
        Scope::Global,
    )
    .await
    .unwrap();
    assert!(value(&b, "app", "g").await.is_some());
    let deadline = Instant::now() + Duration::from_secs(10);
    // Each node's L1, the shared L2 and L3 all stop answering.
    while value(&a, "app", "g").await.is_some() || value(&b, "app", "g").await.is_some() {
        assert!(Instant::now() < deadline, "entry outlived its ttl");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tk = tier_key(&app, "g");
    assert!(
        a.inner
            .l2
            .as_ref()
            .unwrap()
            .get(&tk)
            .await
            .unwrap()
            .is_none()
    );
    assert!(a.inner.l3.get(&tk).await.unwrap().is_none());
    assert!(a.inner.metrics.l3.evictions.get() >= 1);
}

#[tokio::test]
async fn region_invalidation_reaches_the_other_node() {
    let (a, b) = two_nodes();
    a.start(&tokio::runtime::Handle::current());
    b.start(&tokio::runtime::Handle::current());
    let app = ns("app");
    // Subscriptions start in the background: re-invalidate until b hears.
    b.set(&app, "user:1", b"x".to_vec(), None, Scope::Edge)
        .await
        .unwrap();
    b.set(&app, "other", b"y".to_vec(), None, Scope::Edge)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while value(&b, "app", "user:1").await.is_some() {
        assert!(Instant::now() < deadline, "invalidation never arrived");
        a.invalidate(&app, Target::Prefix("user:".into()), Scope::Region)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(value(&b, "app", "other").await.as_deref(), Some(&b"y"[..]));
}

#[tokio::test]
async fn an_invalidation_during_a_lookup_keeps_the_old_value_out_of_l1() {
    let (a, _) = two_nodes();
    let app = ns("app");
    a.set(&app, "k", b"old".to_vec(), None, Scope::Region)
        .await
        .unwrap();
    a.drop_l1(&app, &Target::Key("k".into()));
    let stamp = a.stamp();
    // Another invalidation runs while the lookup is reading L2.
    a.drop_l1(&app, &Target::Key("other".into()));
    a.fill_l1(
        &app,
        "k",
        Arc::from(&b"old"[..]),
        Duration::from_secs(60),
        stamp,
    );
    assert!(a.l1_get(&app, "k").is_none());
}

struct SlowLoader {
    calls: AtomicUsize,
}

#[async_trait]
impl Loader for SlowLoader {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, CacheError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok((key != "absent").then(|| Loaded {
            value: format!("loaded {key}").into_bytes(),
            ttl: None,
            scope: Scope::Region,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_load() {
    let (a, b) = two_nodes();
    let loader = Arc::new(SlowLoader {
        calls: AtomicUsize::new(0),
    });
    let app = ns("app");
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (a, loader, app) = (a.clone(), loader.clone(), app.clone());
        tasks.push(tokio::spawn(async move {
            a.get(&app, "k", Some(loader.as_ref())).await
        }));
    }
    for t in tasks {
        let v = t.await.unwrap().unwrap();
        assert_eq!(v.as_deref(), Some(&b"loaded k"[..]));
    }
    assert_eq!(loader.calls.load(Ordering::SeqCst), 1);
    assert_eq!(a.inner.metrics.loads.get(), 1);
    // Written through at the loader's scope: the other node finds it in L2.
    assert_eq!(
        value(&b, "app", "k").await.as_deref(),
        Some(&b"loaded k"[..])
    );
    // A miss everywhere is not remembered: a later read asks again.
    assert_eq!(a.get(&app, "absent", Some(loader.as_ref())).await, Ok(None));
    assert_eq!(a.get(&app, "absent", Some(loader.as_ref())).await, Ok(None));
    assert_eq!(loader.calls.load(Ordering::SeqCst), 3);
}

#[test]
fn l1_is_bounded_by_bytes() {
    let bus: Arc<dyn Bus> = Arc::new(LocalBus::new());
    let c = TieredCache::new(
        CacheOptions {
            l1_max_bytes: 64 * 1024,
            ..opts("a")
        },
        bus.clone(),
        bus,
        CacheMetrics::default(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..1000 {
            c.set(&ns("a"), &format!("k{i}"), vec![0; 1000], None, Scope::Edge)
                .await
                .unwrap();
        }
    });
    assert!(c.l1_entry_count() <= 64, "{}", c.l1_entry_count());
    assert!(c.inner.metrics.l1.evictions.get() > 0);
}

#[tokio::test]
async fn a_region_without_l2_uses_l1_and_l3() {
    let bus: Arc<dyn Bus> = Arc::new(LocalBus::new());
    let node = |edge| {
        TieredCache::new(
            CacheOptions {
                region_bucket: None,
                ..opts(edge)
            },
            bus.clone(),
            bus.clone(),
            CacheMetrics::default(),
        )
    };
    let (a, b) = (node("a"), node("b"));
    let app = ns("app");
    a.set(&app, "r", b"1".to_vec(), None, Scope::Region)
        .await
        .unwrap();
    a.set(&app, "g", b"2".to_vec(), None, Scope::Global)
        .await
        .unwrap();
    assert_eq!(value(&a, "app", "r").await.as_deref(), Some(&b"1"[..]));
    assert_eq!(value(&b, "app", "r").await, None);
    assert_eq!(value(&b, "app", "g").await.as_deref(), Some(&b"2"[..]));
    assert_eq!(b.inner.metrics.l3.hits.get(), 1);
    assert_eq!(b.inner.metrics.l2.misses.get(), 0);
}
