use super::*;

fn parse(text: &str) -> Result<KeelConfig, Diagnostics> {
    let dir = tempfile_dir();
    std::fs::write(dir.join("hello.wasm"), b"\0asm").unwrap();
    KeelConfig::parse(&dir.join("keel.toml"), text)
}

fn tempfile_dir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "keel-config-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn minimal_component_gets_defaults() {
    let c = parse("[components.hello]\nwasm = \"hello.wasm\"\nroute = \"/...\"\n").unwrap();
    assert_eq!(c.components.len(), 1);
    let h = &c.components[0];
    assert_eq!(h.limits.memory, DEFAULT_MEMORY);
    assert_eq!(h.limits.timeout, DEFAULT_TIMEOUT);
    assert_eq!(h.location.line, 1);
    assert_eq!(h.wasm_location.line, 2);
    assert!(h.route.matches("/anything/at/all"));
    assert_eq!(c.server.listen.port(), 8080);
}

#[test]
fn unknown_key_names_line_and_key() {
    let e = parse("[components.hello]\nwasm = \"hello.wasm\"\nroute = \"/\"\nmemroy = \"1MiB\"\n")
        .unwrap_err();
    let d = &e.0[0];
    assert_eq!(d.location.line, 4, "{e}");
    assert_eq!(d.key, "memroy");
    assert!(d.message.contains("unknown field"), "{e}");
}

#[test]
fn wrong_type_names_line() {
    let e = parse("[server]\nworkers = \"two\"\n").unwrap_err();
    assert_eq!(e.0[0].location.line, 2, "{e}");
}

#[test]
fn missing_wasm_file_names_key() {
    let e = parse("[components.a]\nwasm = \"nope.wasm\"\nroute = \"/a\"\n").unwrap_err();
    let d = &e.0[0];
    assert_eq!(d.key, "components.a.wasm");
    assert_eq!(d.location.line, 2);
    assert!(d.message.contains("not found"));
}

#[test]
fn every_error_is_reported() {
    let e = parse(
        "[components.a]\nwasm = \"hello.wasm\"\nroute = \"a\"\n[components.a.limits]\nmemory = \"lots\"\ntimeout = \"1fortnight\"\n",
    )
    .unwrap_err();
    let keys: Vec<_> = e.0.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "components.a.route",
            "components.a.limits.memory",
            "components.a.limits.timeout"
        ],
        "{e}"
    );
}

#[test]
fn reserved_and_duplicate_routes_are_refused() {
    let e = parse("[components.a]\nwasm = \"hello.wasm\"\nroute = \"/_keel/...\"\n").unwrap_err();
    assert!(e.0[0].message.contains("reserved"), "{e}");
    let e = parse(
        "[components.a]\nwasm = \"hello.wasm\"\nroute = \"/x\"\n[components.b]\nwasm = \"hello.wasm\"\nroute = \"/x/\"\n",
    )
    .unwrap_err();
    assert!(e.0[0].message.contains("already served"), "{e}");
    assert_eq!(e.0[0].location.line, 4);
}

#[test]
fn routes_match_prefixes_on_segment_boundaries() {
    let r = Route::parse("/api/...").unwrap();
    assert!(r.matches("/api"));
    assert!(r.matches("/api/x/y"));
    assert!(!r.matches("/apix"));
    let exact = Route::parse("/hello").unwrap();
    assert!(exact.matches("/hello"));
    assert!(exact.matches("/hello/"));
    assert!(!exact.matches("/hello/x"));
    assert!(Route::parse("/a/*").is_err());
}

#[test]
fn units() {
    assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
    assert_eq!(parse_size("100").unwrap(), 100);
    assert!(parse_size("12 parsecs").is_err());
    assert!(parse_size("99999999999999GiB").is_err());
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
    assert!(parse_duration("5").is_err());
}

#[test]
fn infrastructure_backends_and_limits() {
    let c = parse(
        "[node]\nedge = \"fra\"\nregion = \"eu-central\"\n\n[infrastructure]\nkv = { type = \"rocksdb\", max-value-bytes = \"64KiB\", block-cache = \"64MiB\" }\nsql = { type = \"sqlite\", max-rows = 5, statement-timeout = \"250ms\" }\nevent-log = { type = \"rocksdb\" }\n",
    )
    .unwrap();
    assert_eq!(c.node.edge, "fra");
    assert_eq!(c.node.region, "eu-central");
    let KvBackend::RocksDb {
        max_value_bytes,
        block_cache,
        ..
    } = c.infrastructure.kv;
    assert_eq!(max_value_bytes, 64 * 1024);
    assert_eq!(block_cache, 64 << 20);
    let SqlBackend::Sqlite {
        max_rows,
        statement_timeout,
        ..
    } = c.infrastructure.sql;
    assert_eq!(
        (max_rows, statement_timeout),
        (5, Duration::from_millis(250))
    );
    let d = parse("").unwrap();
    assert_eq!(d.node, NodeConfig::default());
    assert_eq!(d.infrastructure, InfrastructureConfig::default());
}

#[test]
fn rocksdb_block_cache_is_bounded() {
    let e = parse("[infrastructure]\nkv = { type = \"rocksdb\", block-cache = \"512KiB\" }\n")
        .unwrap_err();
    let d = &e.0[0];
    assert_eq!(d.key, "infrastructure.kv.block-cache", "{e}");
    assert!(d.message.contains("accepted: 1048576 to"), "{e}");
    let KvBackend::RocksDb { block_cache, .. } = parse("").unwrap().infrastructure.kv;
    assert_eq!(block_cache, 16 << 20);
}

#[test]
fn unknown_backend_types_list_the_supported_ones() {
    let e = parse("[infrastructure]\n\nkv = { type = \"redis\" }\nsql = { type = \"postgres\" }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains(":3:"), "{e}");
    assert!(e.contains("infrastructure.kv.type"), "{e}");
    assert!(
        e.contains("unsupported backend type \"redis\"; supported: \"rocksdb\""),
        "{e}"
    );
    assert!(e.contains("supported: \"sqlite\""), "{e}");
    let e = parse("[infrastructure]\nkv = { type = \"rocksdb\", colour = \"red\" }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("colour"), "{e}");
    let e = parse("[infrastructure]\nkv = { type = \"rocksdb\", max-value-bytes = \"1TiB\" }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("infrastructure.kv.max-value-bytes"), "{e}");
    let e = parse("[node]\nedge = \"Frankfurt 1\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("node.edge") && e.contains("lowercase"), "{e}");
}

#[test]
fn event_stream_and_state_backends() {
    use crate::{EventStreamBackend, StateBackend};
    let c = parse(
        "[infrastructure]\nevent-stream = { type = \"nats\", servers = [\"nats://127.0.0.1:4222\", \"tls://nats.example:4443\"] }\nstate = { type = \"rocksdb\", anti-entropy-interval = \"250ms\", max-state-bytes = \"1MiB\" }\n",
    )
    .unwrap();
    assert_eq!(
        c.infrastructure.event_stream,
        EventStreamBackend::Nats {
            servers: vec![
                "nats://127.0.0.1:4222".into(),
                "tls://nats.example:4443".into()
            ]
        }
    );
    assert_eq!(
        c.infrastructure.state,
        StateBackend::RocksDb {
            anti_entropy_interval: std::time::Duration::from_millis(250),
            max_state_bytes: 1024 * 1024
        }
    );
    let d = parse("").unwrap();
    assert_eq!(d.infrastructure.event_stream, EventStreamBackend::Local);
}

#[test]
fn event_stream_errors_name_key_and_accepted_values() {
    for (toml, needle) in [
        (
            "event-stream = { type = \"kafka\" }",
            "supported: \"local\", \"nats\"",
        ),
        ("event-stream = { type = \"nats\" }", "needs `servers`"),
        (
            "event-stream = { type = \"nats\", servers = [] }",
            "at least one",
        ),
        (
            "event-stream = { type = \"nats\", servers = [\"redis://x:1\"] }",
            "unsupported scheme \"redis\"",
        ),
        (
            "event-stream = { type = \"nats\", servers = [\"nats://x:99999\"] }",
            "bad port",
        ),
        (
            "event-stream = { type = \"local\", servers = [\"nats://x\"] }",
            "no servers",
        ),
        (
            "event-stream = { type = \"nats\", servers = [\"nats://x\"], user = \"a\" }",
            "keel.toml:2:",
        ),
        (
            "state = { type = \"rocksdb\", anti-entropy-interval = \"1ms\" }",
            "10ms to 1h",
        ),
    ] {
        let e = parse(&format!("[infrastructure]\n{toml}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{toml}: {e}");
        assert!(e.contains("keel.toml:2:"), "{toml}: {e}");
    }
}

#[test]
fn region_global_is_reserved() {
    let e = parse("[node]\nregion = \"global\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("node.region") && e.contains("reserved"), "{e}");
}

#[test]
fn cache_backend_defaults_and_overrides() {
    use crate::CacheBackend;
    use std::time::Duration;
    let d = parse("").unwrap();
    let CacheBackend::Tiered {
        l1_ttl,
        l2_ttl,
        l3_ttl,
        ..
    } = d.infrastructure.cache;
    assert_eq!(
        (l1_ttl, l2_ttl, l3_ttl),
        (
            Duration::from_secs(300),
            Duration::from_secs(900),
            Duration::from_secs(3600)
        )
    );
    let c = parse(
        "[infrastructure]\ncache = { type = \"tiered\", l1-max-bytes = \"8MiB\", l1-ttl = \"10s\", l2-ttl = \"1m\", l3-ttl = \"2h\", max-ttl = \"2h\", max-key-bytes = \"256\", max-value-bytes = \"64KiB\" }\n",
    )
    .unwrap();
    assert_eq!(
        c.infrastructure.cache,
        CacheBackend::Tiered {
            l1_max_bytes: 8 << 20,
            l1_ttl: Duration::from_secs(10),
            l2_ttl: Duration::from_secs(60),
            l3_ttl: Duration::from_secs(7200),
            max_ttl: Duration::from_secs(7200),
            max_key_bytes: 256,
            max_value_bytes: 64 << 10,
        }
    );
}

#[test]
fn cache_errors_name_key_and_accepted_values() {
    for (toml, needle) in [
        ("cache = { type = \"redis\" }", "supported: \"tiered\""),
        (
            "cache = { type = \"tiered\", l2-ttl = \"0s\" }",
            "infrastructure.cache.l2-ttl",
        ),
        (
            "cache = { type = \"tiered\", max-ttl = \"10m\" }",
            "exceeds max-ttl",
        ),
        (
            "cache = { type = \"tiered\", max-value-bytes = \"1GiB\" }",
            "infrastructure.cache.max-value-bytes",
        ),
        ("cache = { type = \"tiered\", l4-ttl = \"1s\" }", "l4-ttl"),
    ] {
        let e = parse(&format!("[infrastructure]\n{toml}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{toml}: {e}");
        assert!(e.contains("keel.toml:2:"), "{toml}: {e}");
    }
}

#[test]
fn personal_data_is_parsed_and_checked() {
    let c = parse(
        "[components.hello]\nwasm = \"hello.wasm\"\nroute = \"/...\"\n\
         [components.hello.personal-data]\nkeys = [\"profile/{user}/\"]\nsql = [\"notes.owner\", \"likes.user_id\"]\n",
    )
    .unwrap();
    let p = &c.components[0].personal_data;
    assert_eq!(p.key_prefixes("bo"), ["profile/bo/"]);
    assert_eq!(
        p.sql,
        [
            SqlUserColumn {
                table: "notes".into(),
                column: "owner".into()
            },
            SqlUserColumn {
                table: "likes".into(),
                column: "user_id".into()
            }
        ]
    );
    let e = parse(
        "[components.hello]\nwasm = \"hello.wasm\"\nroute = \"/...\"\n\
         [components.hello.personal-data]\nkeys = [\"profile/\", \"p/{user}\"]\nsql = [\"notes\", \"a.b;drop\"]\n",
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("keel.toml:5") && text.contains("personal-data.keys"),
        "{text}"
    );
    assert!(
        text.contains("exactly once") && text.contains("must not end with {user}"),
        "{text}"
    );
    assert!(
        text.contains("keel.toml:6") && text.contains("\"notes\" is not"),
        "{text}"
    );
    assert!(text.contains("\"a.b;drop\" is not"), "{text}");
    let e = parse(
        "[components.hello]\nwasm = \"hello.wasm\"\nroute = \"/...\"\n\
         [components.hello.personal-data]\nfiles = []\n",
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("keel.toml:5") && text.contains("unknown field `files`"),
        "{text}"
    );
}

#[test]
fn env_and_live_channels_are_parsed_and_checked() {
    let c = parse(
        "[components.hello]\nwasm = \"hello.wasm\"\nroute = \"/...\"\n\
         [components.hello.env]\nTITLE = \"Keel chat\"\nSECRET = { from-env = \"HOST_SECRET\" }\n\
         [components.hello.live]\nchannels = [\"user/{user}\", \"room/*\", \"presence\"]\n",
    )
    .unwrap();
    let h = &c.components[0];
    assert_eq!(
        h.env
            .iter()
            .map(|v| (v.name.as_str(), v.source.clone()))
            .collect::<Vec<_>>(),
        [
            ("SECRET", EnvSource::Host("HOST_SECRET".into())),
            ("TITLE", EnvSource::Value("Keel chat".into())),
        ]
    );
    assert_eq!(h.env[0].location.line, 6);
    assert!(
        !format!("{:?}", h.env).contains("Keel chat"),
        "values stay out of logs"
    );
    let allows =
        |user: &str, channel: &str| h.live_channels.iter().any(|p| p.allows(user, channel));
    assert!(allows("alice", "user/alice"));
    assert!(!allows("bob", "user/alice"));
    assert!(!allows("alice", "user/alice2"));
    assert!(allows("bob", "room/lobby"));
    assert!(!allows("bob", "room/"), "* needs at least one byte");
    assert!(allows("bob", "presence"));
    assert!(!allows("bob", "presence2"));

    let e = parse(
        "[components.hello]\nwasm = \"hello.wasm\"\nroute = \"/...\"\n\
         [components.hello.env]\n1BAD = \"x\"\nN = 3\nM = { from-env = \"\" }\n\
         [components.hello.live]\nchannels = [\"user/{user}/{user}\", \"room x\", \"\"]\n",
    )
    .unwrap_err();
    let text = e.to_string();
    for (line, needle) in [
        ("keel.toml:5", "env.1BAD"),
        ("keel.toml:6", "env.N"),
        ("keel.toml:7", "env.M"),
        (
            "keel.toml:9",
            "\"user/{user}/{user}\" is not a channel pattern",
        ),
        ("keel.toml:9", "\"room x\" is not a channel pattern"),
    ] {
        assert!(
            text.lines().any(|l| l.contains(line) && l.contains(needle)),
            "{needle}: {text}"
        );
    }
    assert!(text.contains("from-env"), "{text}");
    let e = parse(
        "[components.hello]\nwasm = \"hello.wasm\"\nroute = \"/...\"\n\
         [components.hello.live]\nchanels = []\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown field `chanels`"), "{e}");
}
