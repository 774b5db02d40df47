//! `regions.toml`: the valid round trip, the deployment file, the seed's
//! original text and one test per error (exact message, key and line).

use super::*;

const FILE: &str = "/etc/keel/regions.toml";

fn parse(text: &str) -> Result<RegionsConfig, Diagnostics> {
    RegionsConfig::parse(Path::new(FILE), text)
}

/// Every diagnostic of `text` as (line, key, message); panics if it parses.
fn errors(text: &str) -> Vec<(usize, String, String)> {
    match parse(text) {
        Ok(c) => panic!("expected errors, parsed: {c:#?}"),
        Err(e) => {
            for d in &e.0 {
                assert_eq!(d.location.file, Path::new(FILE), "{e}");
            }
            e.0.into_iter()
                .map(|d| (d.location.line, d.key, d.message))
                .collect()
        }
    }
}

/// The single diagnostic of `text`.
fn error(text: &str) -> (usize, String, String) {
    let mut all = errors(text);
    assert_eq!(all.len(), 1, "expected one error: {all:#?}");
    all.remove(0)
}

fn e(line: usize, key: &str, message: &str) -> (usize, String, String) {
    (line, key.to_string(), message.to_string())
}

/// A valid region on lines 1-5; cases append to it or replace a line.
const EU: &str = "[regions.eu-central]
edges = [\"fra\", \"ams\"]
coordinator = \"fra\"
data_residency = \"gdpr\"
servers = [\"nats://10.0.1.1:4222\"]
";

/// `EU` with `key = ...` (the whole line) replaced by `line`.
fn eu_with(key: &str, line: &str) -> String {
    let mut found = false;
    let out: Vec<String> = EU
        .lines()
        .map(|l| {
            if l.starts_with(&format!("{key} =")) {
                found = true;
                line.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(found, "no {key} in EU");
    out.join("\n") + "\n"
}

// ---- valid files ----

#[test]
fn valid_file_round_trip_with_defaults() {
    let c = parse(
        r#"[regions.us-west]
edges = ["sfo", "lax"]
coordinator = "lax"
data_residency = "us"
servers = ["nats://nats-1.us-west:4222", "nats://10.0.0.2", { host = "127.0.0.1", client = 4220, cluster = 6220, gateway = 7220, monitor = 8220 }]

[regions.us-east]
edges = ["iad"]
coordinator = "iad"
database = "nats://anything"
cache_tier = "none"
data_residency = "us"
servers = [{ host = "::1", client = 4223 }]

[regions.eu-central]
edges = ["fra", "ams"]
coordinator = "fra"
database = "nats"
cache_tier = "nats://eu"
data_residency = "gdpr"
compliance = ["gdpr", "dma"]
servers = ["nats://[fd00::1]:4224"]

[regions.ap-south]
edges = ["bom"]
coordinator = "bom"
data_residency = "local"
servers = ["nats://10.0.3.1:4222"]

[regions.anywhere]
edges = ["xyz"]
coordinator = "xyz"
data_residency = "global"
servers = ["nats://10.0.4.1:4222"]

[coordination]
global_event_stream = "nats://gateways"
consensus_protocol = "none"
allow_cross_zone_migration = true

[nats]
secret_env = "MY_SECRET_2"
store_dir = "nats-data"
"#,
    )
    .unwrap();
    assert_eq!(c.path, Path::new(FILE));
    let names: Vec<_> = c.regions.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["us-west", "us-east", "eu-central", "ap-south", "anywhere"],
        "file order, not name order"
    );

    let w = &c.regions[0];
    assert_eq!(w.edges, ["sfo", "lax"]);
    assert_eq!(w.coordinator, "lax");
    assert_eq!(w.database, RegionalDatabase::Nats, "default");
    assert_eq!(w.cache_tier, CacheTier::Nats, "default");
    assert_eq!(w.data_residency, Residency::Us);
    assert!(w.compliance.is_empty(), "default");
    assert_eq!(
        (w.location.line, w.location.column),
        (1, 10),
        "the [regions.<name>] header key"
    );
    assert_eq!(
        w.servers,
        [
            NatsServerAddr {
                host: "nats-1.us-west".into(),
                client_port: 4222,
                cluster_port: 6222,
                gateway_port: 7222,
                monitor_port: 8222,
            },
            NatsServerAddr {
                host: "10.0.0.2".into(),
                client_port: 4222,
                cluster_port: 6222,
                gateway_port: 7222,
                monitor_port: 8222,
            },
            NatsServerAddr {
                host: "127.0.0.1".into(),
                client_port: 4220,
                cluster_port: 6220,
                gateway_port: 7220,
                monitor_port: 8220,
            },
        ]
    );
    assert_eq!(w.servers[1].client_url(), "nats://10.0.0.2:4222");

    let e = &c.regions[1];
    assert_eq!(e.location.line, 7);
    assert_eq!(e.database, RegionalDatabase::Nats);
    assert_eq!(e.cache_tier, CacheTier::None);
    assert_eq!(
        e.servers,
        [NatsServerAddr {
            host: "::1".into(),
            client_port: 4223,
            cluster_port: 6222,
            gateway_port: 7222,
            monitor_port: 8222,
        }]
    );
    assert_eq!(e.servers[0].client_url(), "nats://[::1]:4223");

    let eu = &c.regions[2];
    assert_eq!(eu.cache_tier, CacheTier::Nats);
    assert_eq!(eu.compliance, ["gdpr", "dma"]);
    assert_eq!(eu.servers[0].host, "fd00::1", "stored without brackets");
    assert_eq!(eu.servers[0].client_url(), "nats://[fd00::1]:4224");

    assert_eq!(
        c.coordination,
        Coordination {
            global_event_stream: GlobalEventStream::NatsGateways,
            consensus_protocol: ConsensusProtocol::None,
            partition_tolerance: PartitionTolerance::Ap,
            allow_cross_zone_migration: true,
        }
    );
    assert_eq!(
        c.nats,
        NatsTopology {
            secret_env: "MY_SECRET_2".into(),
            store_dir: PathBuf::from("/etc/keel/nats-data"),
        },
        "relative store_dir resolves against the file's directory"
    );

    assert_eq!(
        c.region_of_edge("lax").map(|r| r.name.as_str()),
        Some("us-west")
    );
    assert_eq!(
        c.region_of_edge("ams").map(|r| r.name.as_str()),
        Some("eu-central")
    );
    assert!(c.region_of_edge("nowhere").is_none());
    assert_eq!(
        c.region("ap-south").map(|r| r.coordinator.as_str()),
        Some("bom")
    );

    assert_eq!(c.zone_of("us-west").as_deref(), Some("us"));
    assert_eq!(c.zone_of("us-east").as_deref(), Some("us"));
    assert_eq!(c.zone_of("eu-central").as_deref(), Some("gdpr"));
    assert_eq!(c.zone_of("ap-south").as_deref(), Some("ap-south"));
    assert_eq!(c.zone_of("anywhere").as_deref(), Some("anywhere"));
    assert_eq!(c.zone_of("mars"), None);

    assert_eq!(c.residency_allows("us-west", "us-east"), Some(true));
    assert_eq!(c.residency_allows("us-west", "eu-central"), Some(false));
    assert_eq!(c.residency_allows("eu-central", "us-east"), Some(false));
    assert_eq!(c.residency_allows("eu-central", "eu-central"), Some(true));
    assert_eq!(c.residency_allows("ap-south", "ap-south"), Some(true));
    assert_eq!(c.residency_allows("ap-south", "anywhere"), Some(false));
    assert_eq!(c.residency_allows("anywhere", "ap-south"), Some(true));
    assert_eq!(c.residency_allows("anywhere", "us-west"), Some(true));
    assert_eq!(c.residency_allows("us-west", "mars"), None);
    assert_eq!(c.residency_allows("mars", "us-west"), None);
}

#[test]
fn defaults_of_coordination_and_nats() {
    let c = parse(EU).unwrap();
    assert_eq!(
        c.coordination,
        Coordination {
            global_event_stream: GlobalEventStream::NatsGateways,
            consensus_protocol: ConsensusProtocol::Raft,
            partition_tolerance: PartitionTolerance::Ap,
            allow_cross_zone_migration: false,
        }
    );
    assert_eq!(
        c.nats,
        NatsTopology {
            secret_env: "KEEL_NATS_SECRET".into(),
            store_dir: PathBuf::from("/var/lib/keel/nats"),
        }
    );
    // Every key of [coordination] and [nats] is optional.
    let c = parse(&format!("{EU}[coordination]\n[nats]\n")).unwrap();
    assert_eq!(c.coordination.consensus_protocol, ConsensusProtocol::Raft);
    assert_eq!(c.nats.secret_env, "KEEL_NATS_SECRET");
}

#[test]
fn residency_spellings_round_trip() {
    for s in Residency::ACCEPTED {
        assert_eq!(Residency::parse(s).map(Residency::as_str), Some(*s));
    }
    assert_eq!(Residency::parse("GDPR"), None);
}

#[test]
fn deployment_regions_toml_is_the_seed_in_supported_form() {
    // Run-time first: the compile-time value may name another clone that
    // shares the target dir (CI). What `keel_test_support::workspace_root`
    // does; this crate cannot use it (test-support depends on it).
    let path = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
        .join("../../deployment/regions.toml");
    let c = RegionsConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let summary: Vec<_> = c
        .regions
        .iter()
        .map(|r| {
            (
                r.name.as_str(),
                r.edges.iter().map(String::as_str).collect::<Vec<_>>(),
                r.coordinator.as_str(),
                r.data_residency,
                r.compliance.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        })
        .collect();
    let none: Vec<&str> = Vec::new();
    assert_eq!(
        summary,
        [
            (
                "us-west",
                vec!["sfo", "lax", "sea", "pdx"],
                "sfo",
                Residency::Us,
                none.clone()
            ),
            (
                "us-east",
                vec!["iad", "atl", "mia", "bos"],
                "iad",
                Residency::Us,
                none.clone()
            ),
            (
                "eu-central",
                vec!["fra", "ams", "lon", "par"],
                "fra",
                Residency::Gdpr,
                vec!["gdpr", "dma"]
            ),
            (
                "ap-south",
                vec!["bom", "del", "blr", "hyd"],
                "bom",
                Residency::Local,
                vec!["data-localization"]
            ),
            (
                "ap-northeast",
                vec!["nrt", "icn", "hkg", "tpe"],
                "nrt",
                Residency::Local,
                none
            ),
        ]
    );
    for r in &c.regions {
        assert_eq!(r.database, RegionalDatabase::Nats);
        assert_eq!(r.cache_tier, CacheTier::Nats);
        let expected = if r.name == "ap-northeast" { 1 } else { 3 };
        assert_eq!(r.servers.len(), expected, "{}", r.name);
        for (i, s) in r.servers.iter().enumerate() {
            assert_eq!(
                s.client_url(),
                format!("nats://nats-{}.{}.keel.internal:4222", i + 1, r.name)
            );
        }
    }
    assert_eq!(
        c.coordination,
        Coordination {
            global_event_stream: GlobalEventStream::NatsGateways,
            consensus_protocol: ConsensusProtocol::Raft,
            partition_tolerance: PartitionTolerance::Ap,
            allow_cross_zone_migration: false,
        }
    );
    assert_eq!(c.zone_of("us-east").as_deref(), Some("us"));
    assert_eq!(c.residency_allows("us-west", "us-east"), Some(true));
    assert_eq!(c.residency_allows("eu-central", "us-east"), Some(false));
    assert_eq!(c.residency_allows("ap-south", "ap-northeast"), Some(false));
    assert_eq!(
        c.region_of_edge("hkg").map(|r| r.name.as_str()),
        Some("ap-northeast")
    );
}

/// Seed 000, lines 275-317 (the TOML of lines 275-318 without the closing
/// code fence), as written.
const SEED: &str = r#"# deployment/regions.toml
[regions.us-west]
edges = ["sfo", "lax", "sea", "pdx"]
coordinator = "sfo"
database = "spanner://us-west/keel"
cache_tier = "redis://us-west-cache.cluster"
data_residency = "us"

[regions.us-east]
edges = ["iad", "atl", "mia", "bos"]
coordinator = "iad"
database = "spanner://us-central/keel"
cache_tier = "redis://us-east-cache.cluster"
data_residency = "us"

[regions.eu-central]
edges = ["fra", "ams", "lon", "par"]
coordinator = "fra"
database = "spanner://eu/keel"
cache_tier = "redis://eu-cache.cluster"
data_residency = "gdpr"
compliance = ["gdpr", "dma"]

[regions.ap-south]
edges = ["bom", "del", "blr", "hyd"]
coordinator = "bom"
database = "spanner://ap-south/keel"
cache_tier = "redis://ap-cache.cluster"
data_residency = "local"
compliance = ["data-localization"]

[regions.ap-northeast]
edges = ["nrt", "icn", "hkg", "tpe"]
coordinator = "nrt"
database = "spanner://ap-northeast/keel"
cache_tier = "redis://ap-ne-cache.cluster"
data_residency = "local"

[coordination]
# Global coordination settings
global_event_stream = "kafka://global-events.cluster"
consensus_protocol = "raft"
partition_tolerance = "ap"  # Availability and Partition tolerance (CAP theorem)
"#;

#[test]
fn the_seeds_original_text_is_refused_with_every_error_and_what_to_write() {
    const DB: &str = "; supported: \"nats\" (the region's JetStream on its `servers`). Keel keeps regional data in JetStream: write database = \"nats\"";
    const CACHE: &str = "; supported: \"nats\" (JetStream KV on the region's servers) or \"none\" (no L2; edges use their L1 and L3). Keel keeps the regional cache in JetStream KV: write cache_tier = \"nats\"";
    let servers = |region: &str| {
        format!(
            "missing key `servers`; the region's NATS cluster (1 or more servers) is required; {SERVER_ACCEPTED}; e.g. servers = [\"nats://nats-1.{region}.keel.internal:4222\"]"
        )
    };
    let mut expected = Vec::new();
    for (header, region) in [
        (2, "us-west"),
        (9, "us-east"),
        (16, "eu-central"),
        (24, "ap-south"),
        (32, "ap-northeast"),
    ] {
        let key = |k: &str| format!("regions.{region}.{k}");
        expected.push((header, key("servers"), servers(region)));
        expected.push((
            header + 3,
            key("database"),
            format!("unsupported scheme \"spanner\"{DB}"),
        ));
        expected.push((
            header + 4,
            key("cache_tier"),
            format!("unsupported scheme \"redis\"{CACHE}"),
        ));
    }
    expected.push(e(
        41,
        "coordination.global_event_stream",
        "unsupported scheme \"kafka\"; supported: \"nats\" (NATS gateways). Global events travel over NATS gateways between the regions' clusters: write global_event_stream = \"nats\"",
    ));
    assert_eq!(errors(SEED), expected);
    // The seed with what the messages say written in, and servers added,
    // is the deployment file's content.
    let fixed: String = SEED
        .lines()
        .map(|l| {
            if l.starts_with("database") {
                "database = \"nats\"".to_string()
            } else if l.starts_with("cache_tier") {
                "cache_tier = \"nats\"".to_string()
            } else if l.starts_with("global_event_stream") {
                "global_event_stream = \"nats\"".to_string()
            } else if let Some(region) = l
                .strip_prefix("[regions.")
                .and_then(|r| r.strip_suffix(']'))
            {
                format!("{l}\nservers = [\"nats://nats-1.{region}.keel.internal:4222\"]")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let c = parse(&fixed).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.regions.len(), 5);
}

const SERVER_ACCEPTED: &str = "accepted: \"nats://host[:port]\" (client port, default 4222; cluster, gateway and monitor ports 6222, 7222, 8222) or a table { host = \"...\", client = 4222, cluster = 6222, gateway = 7222, monitor = 8222 } (host and client required)";
const HOST_ACCEPTED: &str = "accepted: a host name (letters, digits, '-' and '.') or an IP address (in a URL, IPv6 in brackets: \"nats://[::1]:4222\")";

// ---- the error matrix: one test per case ----

#[test]
fn toml_syntax_error() {
    assert_eq!(
        error("[regions.eu-central]\nedges = [\"fra\"\n"),
        e(2, "", "unclosed array, expected `]`")
    );
}

#[test]
fn wrong_type() {
    assert_eq!(
        error(&eu_with("edges", "edges = \"fra\"")),
        e(2, "", "invalid type: string \"fra\", expected a sequence")
    );
    assert_eq!(
        error(&eu_with("servers", "servers = [4222]")),
        e(
            5,
            "",
            "invalid type: integer `4222`, expected a server URL \"nats://host[:port]\" or a table { host, client, cluster, gateway, monitor }"
        )
    );
}

#[test]
fn unknown_key_in_a_region() {
    assert_eq!(
        error(&format!("{EU}replicas = 3\n")),
        e(
            6,
            "replicas",
            "unknown field `replicas`, expected one of `edges`, `coordinator`, `database`, `cache_tier`, `data_residency`, `compliance`, `servers`"
        )
    );
}

#[test]
fn unknown_top_level_table() {
    assert_eq!(
        error(&format!("{EU}[zones]\n")),
        e(
            6,
            "zones",
            "unknown field `zones`, expected one of `regions`, `coordination`, `nats`"
        )
    );
}

#[test]
fn unknown_key_in_coordination() {
    assert_eq!(
        error(&format!("{EU}[coordination]\nquorum = 2\n")),
        e(
            7,
            "quorum",
            "unknown field `quorum`, expected one of `global_event_stream`, `consensus_protocol`, `partition_tolerance`, `allow_cross_zone_migration`"
        )
    );
}

#[test]
fn unknown_key_in_nats() {
    assert_eq!(
        error(&format!("{EU}[nats]\npassword = \"x\"\n")),
        e(
            7,
            "password",
            "unknown field `password`, expected `secret_env` or `store_dir`"
        )
    );
}

#[test]
fn unknown_key_in_a_server_table() {
    assert_eq!(
        error(&eu_with(
            "servers",
            "servers = [{ host = \"10.0.1.1\", client = 4222, leafnode = 7422 }]"
        )),
        e(
            5,
            "leafnode",
            "unknown field `leafnode`, expected one of `host`, `client`, `cluster`, `gateway`, `monitor`"
        )
    );
}

#[test]
fn kebab_case_keys_are_unknown() {
    assert_eq!(
        error(&eu_with("data_residency", "data-residency = \"gdpr\"")),
        e(
            4,
            "data-residency",
            "unknown field `data-residency`, expected one of `edges`, `coordinator`, `database`, `cache_tier`, `data_residency`, `compliance`, `servers`"
        )
    );
}

#[test]
fn missing_required_keys_are_all_reported_at_the_region() {
    assert_eq!(
        errors("[regions.eu-central]\ndatabase = \"nats\"\n"),
        [
            e(
                1,
                "regions.eu-central.edges",
                "missing key `edges`; accepted: a list of 1 or more edge (POP) names, e.g. edges = [\"fra\", \"ams\"]"
            ),
            e(
                1,
                "regions.eu-central.coordinator",
                "missing key `coordinator`; accepted: one of the region's edges, e.g. coordinator = \"fra\""
            ),
            e(
                1,
                "regions.eu-central.data_residency",
                "missing key `data_residency`; accepted: \"global\", \"us\", \"gdpr\", \"local\""
            ),
            e(
                1,
                "regions.eu-central.servers",
                &format!(
                    "missing key `servers`; the region's NATS cluster (1 or more servers) is required; {SERVER_ACCEPTED}; e.g. servers = [\"nats://nats-1.eu-central.keel.internal:4222\"]"
                )
            ),
        ]
    );
}

#[test]
fn missing_coordinator_lists_the_edges() {
    assert_eq!(
        error(&EU.replace("coordinator = \"fra\"\n", "")),
        e(
            1,
            "regions.eu-central.coordinator",
            "missing key `coordinator`; accepted: one of the region's edges: \"fra\", \"ams\""
        )
    );
}

#[test]
fn empty_edges() {
    assert_eq!(
        error(&eu_with("edges", "edges = []")),
        e(
            2,
            "regions.eu-central.edges",
            "a region needs at least one edge; accepted: a list of edge (POP) names, e.g. edges = [\"fra\", \"ams\"]"
        )
    );
}

#[test]
fn invalid_edge_name() {
    assert_eq!(
        error(&eu_with("edges", "edges = [\"fra\", \"AMS 2\"]")),
        e(
            2,
            "regions.eu-central.edges",
            "\"AMS 2\" is not a valid edge name; accepted: 1 to 63 lowercase letters, digits and '-'"
        )
    );
    let long = "a".repeat(64);
    assert_eq!(
        error(&eu_with("edges", &format!("edges = [\"fra\", \"{long}\"]"))).2,
        format!(
            "\"{long}\" is not a valid edge name; accepted: 1 to 63 lowercase letters, digits and '-'"
        )
    );
}

#[test]
fn edge_in_two_regions_names_the_other_region_and_its_line() {
    let text = format!(
        "{EU}\n[regions.us-west]\nedges = [\"sfo\",\n  \"fra\"]\ncoordinator = \"sfo\"\ndata_residency = \"us\"\nservers = [\"nats://10.0.2.1:4222\"]\n"
    );
    assert_eq!(
        error(&text),
        e(
            9,
            "regions.us-west.edges",
            "edge \"fra\" is already listed in region \"eu-central\" (line 2); an edge belongs to exactly one region, listed once"
        )
    );
}

#[test]
fn edge_twice_in_one_region() {
    assert_eq!(
        error(&eu_with("edges", "edges = [\"fra\", \"ams\", \"fra\"]")),
        e(
            2,
            "regions.eu-central.edges",
            "edge \"fra\" is already listed in region \"eu-central\" (line 2); an edge belongs to exactly one region, listed once"
        )
    );
}

#[test]
fn coordinator_not_among_the_edges_lists_them() {
    assert_eq!(
        error(&eu_with("coordinator", "coordinator = \"ber\"")),
        e(
            3,
            "regions.eu-central.coordinator",
            "\"ber\" is not one of the region's edges; accepted: \"fra\", \"ams\""
        )
    );
}

#[test]
fn unknown_residency_class() {
    assert_eq!(
        error(&eu_with("data_residency", "data_residency = \"eu\"")),
        e(
            4,
            "regions.eu-central.data_residency",
            "unknown residency class \"eu\"; accepted: \"global\", \"us\", \"gdpr\", \"local\""
        )
    );
}

#[test]
fn database_spanner() {
    assert_eq!(
        error(&format!("{EU}database = \"spanner://us-west/keel\"\n")),
        e(
            6,
            "regions.eu-central.database",
            "unsupported scheme \"spanner\"; supported: \"nats\" (the region's JetStream on its `servers`). Keel keeps regional data in JetStream: write database = \"nats\""
        )
    );
}

#[test]
fn database_bare_word() {
    assert_eq!(
        error(&format!("{EU}database = \"postgres\"\n")),
        e(
            6,
            "regions.eu-central.database",
            "unsupported value \"postgres\"; supported: \"nats\" (the region's JetStream on its `servers`). Keel keeps regional data in JetStream: write database = \"nats\""
        )
    );
    // `none` is a cache tier, not a database.
    assert_eq!(
        error(&format!("{EU}database = \"none\"\n")).2,
        "unsupported value \"none\"; supported: \"nats\" (the region's JetStream on its `servers`). Keel keeps regional data in JetStream: write database = \"nats\""
    );
}

#[test]
fn cache_tier_redis() {
    assert_eq!(
        error(&format!("{EU}cache_tier = \"redis://eu-cache.cluster\"\n")),
        e(
            6,
            "regions.eu-central.cache_tier",
            "unsupported scheme \"redis\"; supported: \"nats\" (JetStream KV on the region's servers) or \"none\" (no L2; edges use their L1 and L3). Keel keeps the regional cache in JetStream KV: write cache_tier = \"nats\""
        )
    );
}

#[test]
fn global_event_stream_kafka() {
    assert_eq!(
        error(&format!(
            "{EU}[coordination]\nglobal_event_stream = \"kafka://global-events.cluster\"\n"
        )),
        e(
            7,
            "coordination.global_event_stream",
            "unsupported scheme \"kafka\"; supported: \"nats\" (NATS gateways). Global events travel over NATS gateways between the regions' clusters: write global_event_stream = \"nats\""
        )
    );
}

#[test]
fn partition_tolerance_cp() {
    assert_eq!(
        error(&format!(
            "{EU}[coordination]\npartition_tolerance = \"cp\"\n"
        )),
        e(
            7,
            "coordination.partition_tolerance",
            "\"cp\" is not supported; accepted: \"ap\" only: edges keep serving during a partition and their outbox replays after it heals; strongly consistent operations use the ledger"
        )
    );
}

#[test]
fn unknown_consensus_protocol() {
    assert_eq!(
        error(&format!(
            "{EU}[coordination]\nconsensus_protocol = \"paxos\"\n"
        )),
        e(
            7,
            "coordination.consensus_protocol",
            "unknown consensus protocol \"paxos\"; accepted: \"raft\" (JetStream's Raft: streams and KV buckets replicated on up to 3 of the region's servers) or \"none\" (no replication, for development topologies)"
        )
    );
}

#[test]
fn region_named_global_is_reserved() {
    assert_eq!(
        error(&EU.replace("eu-central", "global")),
        e(
            1,
            "regions.global",
            "\"global\" is reserved (subjects `keel.global.*` carry global-scope traffic); pick another region name"
        )
    );
}

#[test]
fn invalid_region_name() {
    assert_eq!(
        error(&EU.replace("[regions.eu-central]", "[regions.EU_Central]")),
        e(
            1,
            "regions.EU_Central",
            "\"EU_Central\" is not a valid region name; accepted: 1 to 63 lowercase letters, digits and '-'"
        )
    );
}

#[test]
fn no_regions() {
    let message = "no regions defined; the file needs at least one [regions.<name>] table with edges, coordinator, data_residency and servers";
    assert_eq!(error(""), e(1, "regions", message));
    assert_eq!(
        error("# nothing yet\n[coordination]\nconsensus_protocol = \"raft\"\n"),
        e(1, "regions", message)
    );
    assert_eq!(error("\n[regions]\n"), e(2, "regions", message));
}

#[test]
fn empty_servers() {
    assert_eq!(
        error(&eu_with("servers", "servers = []")),
        e(
            5,
            "regions.eu-central.servers",
            &format!(
                "a region needs at least one NATS server; {SERVER_ACCEPTED}; e.g. servers = [\"nats://nats-1.eu-central.keel.internal:4222\"]"
            )
        )
    );
}

#[test]
fn server_not_a_url() {
    assert_eq!(
        error(&eu_with("servers", "servers = [\"10.0.1.1:4222\"]")),
        e(
            5,
            "regions.eu-central.servers[0]",
            &format!("\"10.0.1.1:4222\" is not a NATS server URL; {SERVER_ACCEPTED}")
        )
    );
}

#[test]
fn server_unsupported_scheme() {
    assert_eq!(
        error(&eu_with(
            "servers",
            "servers = [\"nats://10.0.1.1\", \"tls://10.0.1.2:4222\"]"
        )),
        e(
            5,
            "regions.eu-central.servers[1]",
            &format!("unsupported scheme \"tls\" in \"tls://10.0.1.2:4222\"; {SERVER_ACCEPTED}")
        )
    );
}

#[test]
fn server_url_with_user_or_path() {
    assert_eq!(
        error(&eu_with(
            "servers",
            "servers = [\"nats://u:p@10.0.1.1:4222\"]"
        )),
        e(
            5,
            "regions.eu-central.servers[0]",
            &format!(
                "\"nats://u:p@10.0.1.1:4222\": only a host and a port are accepted (no user, path or query); {SERVER_ACCEPTED}"
            )
        )
    );
}

#[test]
fn server_bad_host() {
    assert_eq!(
        error(&eu_with(
            "servers",
            "servers = [\"nats://nats_1.internal:4222\"]"
        )),
        e(
            5,
            "regions.eu-central.servers[0]",
            &format!(
                "bad host \"nats_1.internal\" in \"nats://nats_1.internal:4222\"; {HOST_ACCEPTED}"
            )
        )
    );
    assert_eq!(
        error(&eu_with("servers", "servers = [\"nats://:4222\"]")).2,
        format!("bad host \"\" in \"nats://:4222\"; {HOST_ACCEPTED}")
    );
    assert_eq!(
        error(&eu_with("servers", "servers = [\"nats://[::g]:4222\"]")).2,
        format!("bad host \"::g\" in \"nats://[::g]:4222\"; {HOST_ACCEPTED}")
    );
    assert_eq!(
        error(&eu_with(
            "servers",
            "servers = [{ host = \"-bad-.internal\", client = 4222 }]"
        )),
        e(
            5,
            "regions.eu-central.servers[0].host",
            &format!("bad host \"-bad-.internal\"; {HOST_ACCEPTED}")
        )
    );
}

#[test]
fn server_port_zero_or_too_large() {
    assert_eq!(
        error(&eu_with("servers", "servers = [\"nats://10.0.1.1:0\"]")),
        e(
            5,
            "regions.eu-central.servers[0]",
            "bad port \"0\" in \"nats://10.0.1.1:0\"; accepted: 1 to 65535 (default 4222)"
        )
    );
    assert_eq!(
        error(&eu_with("servers", "servers = [\"nats://10.0.1.1:65536\"]")).2,
        "bad port \"65536\" in \"nats://10.0.1.1:65536\"; accepted: 1 to 65535 (default 4222)"
    );
    assert_eq!(
        errors(&eu_with(
            "servers",
            "servers = [{ host = \"10.0.1.1\", client = 0, gateway = 70000 }]"
        )),
        [
            e(
                5,
                "regions.eu-central.servers[0].client",
                "port 0 is out of range; accepted: 1 to 65535"
            ),
            e(
                5,
                "regions.eu-central.servers[0].gateway",
                "port 70000 is out of range; accepted: 1 to 65535"
            ),
        ]
    );
}

#[test]
fn server_table_without_host_or_client() {
    assert_eq!(
        error(&eu_with("servers", "servers = [{ cluster = 6222 }]")),
        e(
            5,
            "regions.eu-central.servers[0]",
            "missing key `host` and `client` in the server table; host and client are required, e.g. { host = \"10.0.1.1\", client = 4222 }"
        )
    );
    assert_eq!(
        error(&eu_with("servers", "servers = [{ host = \"10.0.1.1\" }]")).2,
        "missing key `client` in the server table; host and client are required, e.g. { host = \"10.0.1.1\", client = 4222 }"
    );
}

#[test]
fn server_client_port_equal_to_its_own_cluster_port() {
    assert_eq!(
        error(&eu_with(
            "servers",
            "servers = [{ host = \"10.0.1.1\", client = 4222, cluster = 4222 }]"
        )),
        e(
            5,
            "regions.eu-central.servers[0]",
            "cluster port 4222 is also this server's client port; client, cluster, gateway and monitor need four different ports (the URL form uses 6222, 7222 and 8222 for the last three; write a table to choose others)"
        )
    );
    // The URL form's client port against its default monitor port.
    assert_eq!(
        error(&eu_with("servers", "servers = [\"nats://10.0.1.1:8222\"]")).2,
        "monitor port 8222 is also this server's client port; client, cluster, gateway and monitor need four different ports (the URL form uses 6222, 7222 and 8222 for the last three; write a table to choose others)"
    );
}

#[test]
fn duplicate_host_port_across_the_file_names_both_servers() {
    let text = format!(
        "{EU}\n[regions.us-west]\nedges = [\"sfo\"]\ncoordinator = \"sfo\"\ndata_residency = \"us\"\nservers = [\"nats://10.0.2.1\", {{ host = \"10.0.1.1\", client = 6222, cluster = 4222 }}]\n"
    );
    assert_eq!(
        error(&text),
        e(
            11,
            "regions.us-west.servers[1]",
            "10.0.1.1:6222 (client here, cluster there), 10.0.1.1:4222 (cluster here, client there), 10.0.1.1:7222 (gateway), 10.0.1.1:8222 (monitor) are already used by regions.eu-central.servers[0] (line 5); every server needs its own host:port"
        )
    );
    // One shared port, and one diagnostic per earlier server.
    let text = format!(
        "{EU}\n[regions.us-west]\nedges = [\"sfo\"]\ncoordinator = \"sfo\"\ndata_residency = \"us\"\nservers = [\"nats://10.0.2.1\",\n  {{ host = \"10.0.1.1\", client = 4223, cluster = 6223, gateway = 7223, monitor = 8223 }},\n  {{ host = \"10.0.1.1\", client = 4224, cluster = 6224, gateway = 8223, monitor = 8222 }}]\n"
    );
    assert_eq!(
        errors(&text),
        [
            e(
                13,
                "regions.us-west.servers[2]",
                "10.0.1.1:8223 (gateway here, monitor there) is already used by regions.us-west.servers[1] (line 12); every server needs its own host:port"
            ),
            e(
                13,
                "regions.us-west.servers[2]",
                "10.0.1.1:8222 (monitor) is already used by regions.eu-central.servers[0] (line 5); every server needs its own host:port"
            ),
        ]
    );
    // Same host, other ports: fine (several servers on one machine).
    let ok = eu_with(
        "servers",
        "servers = [\"nats://127.0.0.1:4222\", { host = \"127.0.0.1\", client = 4223, cluster = 6223, gateway = 7223, monitor = 8223 }]",
    );
    assert_eq!(parse(&ok).unwrap().regions[0].servers.len(), 2);
    // Host names compare without case.
    assert_eq!(
        error(&eu_with(
            "servers",
            "servers = [\"nats://NATS-1.internal\", \"nats://nats-1.internal\"]"
        ))
        .2,
        "nats-1.internal:4222 (client), nats-1.internal:6222 (cluster), nats-1.internal:7222 (gateway), nats-1.internal:8222 (monitor) are already used by regions.eu-central.servers[0] (line 5); every server needs its own host:port"
    );
}

#[test]
fn invalid_compliance_label() {
    assert_eq!(
        error(&format!("{EU}compliance = [\"gdpr\", \"DMA\"]\n")),
        e(
            6,
            "regions.eu-central.compliance",
            "\"DMA\" is not a valid compliance label; accepted: lowercase letters, digits and '-', e.g. \"gdpr\", \"data-localization\""
        )
    );
}

#[test]
fn invalid_secret_env() {
    assert_eq!(
        error(&format!("{EU}[nats]\nsecret_env = \"keel-secret\"\n")),
        e(
            7,
            "nats.secret_env",
            "\"keel-secret\" is not an environment variable name; accepted: [A-Z_][A-Z0-9_]*, e.g. \"KEEL_NATS_SECRET\""
        )
    );
    assert_eq!(
        error(&format!("{EU}[nats]\nsecret_env = \"1SECRET\"\n")).1,
        "nats.secret_env"
    );
}

#[test]
fn empty_store_dir() {
    assert_eq!(
        error(&format!("{EU}[nats]\nstore_dir = \"\"\n")),
        e(
            7,
            "nats.store_dir",
            "accepted: a directory (relative paths resolve against the directory of /etc/keel/regions.toml), e.g. \"/var/lib/keel/nats\""
        )
    );
}

#[test]
fn every_error_is_reported_in_file_order() {
    let text = "[regions.b]
edges = [\"x\"]
coordinator = \"y\"
data_residency = \"mars\"
servers = [\"nats://h:0\"]

[regions.a]
edges = [\"x\"]
database = \"spanner://a\"

[coordination]
partition_tolerance = \"cp\"
consensus_protocol = \"paxos\"
";
    let got: Vec<_> = errors(text)
        .into_iter()
        .map(|(line, key, _)| (line, key))
        .collect();
    let want: Vec<(usize, String)> = [
        (3, "regions.b.coordinator"),
        (4, "regions.b.data_residency"),
        (5, "regions.b.servers[0]"),
        (7, "regions.a.coordinator"),
        (7, "regions.a.data_residency"),
        (7, "regions.a.servers"),
        (8, "regions.a.edges"),
        (9, "regions.a.database"),
        (12, "coordination.partition_tolerance"),
        (13, "coordination.consensus_protocol"),
    ]
    .into_iter()
    .map(|(l, k)| (l, k.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn diagnostics_display_file_line_column_key_message() {
    let e = parse(&eu_with("coordinator", "coordinator = \"ber\"")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "error: /etc/keel/regions.toml:3:15: regions.eu-central.coordinator: \"ber\" is not one of the region's edges; accepted: \"fra\", \"ams\""
    );
}
