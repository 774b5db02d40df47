//! `[node]` (who this node is) and `[infrastructure]` (which backend serves
//! each raw interface, chosen by `type`, with its limits).

use crate::diagnostic::Source;
use crate::{Diagnostic, duration, size};
use serde::Deserialize;
use std::time::Duration;
use toml::Spanned;

/// This node's place in the topology. On the embedded single node the node
/// is its own region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub edge: String,
    pub region: String,
    /// `regions = "regions.toml"` (resolved against keel.toml's directory):
    /// the node is `edge` of a multi-region deployment, and its region, NATS
    /// servers and credentials come from that file.
    pub regions: Option<std::path::PathBuf>,
    /// Whether `region` was written in keel.toml (it must then agree with
    /// regions.toml).
    pub region_explicit: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            edge: "local".into(),
            region: "local".into(),
            regions: None,
            region_explicit: false,
        }
    }
}

/// Backends of the raw infrastructure interfaces, and their limits.
#[derive(Debug, Clone, PartialEq)]
pub struct InfrastructureConfig {
    pub kv: KvBackend,
    pub sql: SqlBackend,
    pub event_log: EventLogBackend,
    pub event_stream: EventStreamBackend,
    pub state: StateBackend,
    pub cache: CacheBackend,
    pub ledger: LedgerConfig,
}

/// Where ledger records live (`keel-ledger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerLogKind {
    /// JetStream when the node's bus is NATS, SQLite on the in-process bus.
    Auto,
    /// One SQLite database on this node: strong on this node only.
    Sqlite,
    /// The region's replicated ledger stream (needs a NATS bus).
    JetStream,
}

/// The ledger: its log and its policy.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerConfig {
    pub log: LedgerLogKind,
    /// Lowest balance a debit may leave (0: no overdraft).
    pub min_balance: i64,
    /// Per-account overrides of `min_balance`, keyed `<component>/<account>`.
    pub account_min_balance: std::collections::BTreeMap<String, i64>,
    /// Most entries one `history` call returns.
    pub max_page: u32,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            log: LedgerLogKind::Auto,
            min_balance: 0,
            account_min_balance: Default::default(),
            max_page: 1000,
        }
    }
}

/// The hierarchical cache (`keel-cache`): L1 in-process, L2/L3 KV buckets
/// on the bus.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheBackend {
    Tiered {
        /// Bytes of keys and values L1 holds per node.
        l1_max_bytes: u64,
        /// Default TTLs per level (a call may choose its own).
        l1_ttl: Duration,
        l2_ttl: Duration,
        l3_ttl: Duration,
        /// Longest TTL a call may ask for.
        max_ttl: Duration,
        max_key_bytes: usize,
        max_value_bytes: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum KvBackend {
    RocksDb {
        max_key_bytes: usize,
        max_value_bytes: usize,
        /// The node's one RocksDB (kv, event log, state): block cache size,
        /// with the memtables' memory charged to it, so it bounds RocksDB's
        /// memory; memtables are flushed when they reach half of it.
        block_cache: usize,
    },
}

/// Default of `[infrastructure] kv.block-cache`: RocksDB's whole memory
/// (block cache and memtables).
const DEFAULT_ROCKSDB_BLOCK_CACHE: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum SqlBackend {
    Sqlite {
        max_rows: usize,
        max_result_bytes: usize,
        max_param_bytes: usize,
        statement_timeout: Duration,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventLogBackend {
    RocksDb { max_event_bytes: usize },
}

/// The bus (`keel-bus`): in-process on the embedded node, NATS otherwise.
#[derive(Debug, Clone, PartialEq)]
pub enum EventStreamBackend {
    Local,
    Nats {
        /// `nats://host:port` or `tls://host:port`, tried in order.
        servers: Vec<String>,
    },
}

/// CRDT replicas of the `state` interface (`keel-sync`).
#[derive(Debug, Clone, PartialEq)]
pub enum StateBackend {
    RocksDb {
        /// How often replicas exchange digests to repair lost deltas.
        anti_entropy_interval: Duration,
        /// Largest encoded size of one CRDT; writes that would exceed it fail
        /// with `limit`.
        max_state_bytes: usize,
    },
}

impl Default for InfrastructureConfig {
    fn default() -> Self {
        InfrastructureConfig {
            kv: KvBackend::RocksDb {
                max_key_bytes: 1024,
                max_value_bytes: 1024 * 1024,
                block_cache: DEFAULT_ROCKSDB_BLOCK_CACHE,
            },
            sql: SqlBackend::Sqlite {
                max_rows: 10_000,
                max_result_bytes: 16 * 1024 * 1024,
                max_param_bytes: 1024 * 1024,
                statement_timeout: Duration::from_secs(2),
            },
            event_log: EventLogBackend::RocksDb {
                max_event_bytes: 1024 * 1024,
            },
            event_stream: EventStreamBackend::Local,
            state: StateBackend::RocksDb {
                anti_entropy_interval: Duration::from_secs(1),
                // A full state travels in one NATS message during repairs:
                // stay well under the server's default max_payload (1 MiB).
                max_state_bytes: 512 * 1024,
            },
            cache: CacheBackend::Tiered {
                l1_max_bytes: 64 * 1024 * 1024,
                l1_ttl: Duration::from_secs(300),
                l2_ttl: Duration::from_secs(900),
                l3_ttl: Duration::from_secs(3600),
                max_ttl: Duration::from_secs(24 * 3600),
                // Keys travel hex-encoded in KV subjects; values in one NATS
                // message (default max_payload 1 MiB).
                max_key_bytes: 512,
                max_value_bytes: 512 * 1024,
            },
            ledger: LedgerConfig::default(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawNode {
    edge: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    regions: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawInfrastructure {
    kv: Option<Spanned<RawKv>>,
    sql: Option<Spanned<RawSql>>,
    event_log: Option<Spanned<RawEventLog>>,
    event_stream: Option<Spanned<RawEventStream>>,
    state: Option<Spanned<RawState>>,
    cache: Option<Spanned<RawCache>>,
    ledger: Option<Spanned<RawLedger>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLedger {
    r#type: Spanned<String>,
    min_balance: Option<Spanned<i64>>,
    max_page: Option<Spanned<i64>>,
    account_min_balance: Option<std::collections::BTreeMap<Spanned<String>, Spanned<i64>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawCache {
    r#type: Spanned<String>,
    l1_max_bytes: Option<Spanned<String>>,
    l1_ttl: Option<Spanned<String>>,
    l2_ttl: Option<Spanned<String>>,
    l3_ttl: Option<Spanned<String>>,
    max_ttl: Option<Spanned<String>>,
    max_key_bytes: Option<Spanned<String>>,
    max_value_bytes: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawEventStream {
    r#type: Spanned<String>,
    servers: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawState {
    r#type: Spanned<String>,
    anti_entropy_interval: Option<Spanned<String>>,
    max_state_bytes: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawKv {
    r#type: Spanned<String>,
    max_key_bytes: Option<Spanned<String>>,
    max_value_bytes: Option<Spanned<String>>,
    block_cache: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawSql {
    r#type: Spanned<String>,
    max_rows: Option<Spanned<i64>>,
    max_result_bytes: Option<Spanned<String>>,
    max_param_bytes: Option<Spanned<String>>,
    statement_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawEventLog {
    r#type: Spanned<String>,
    max_event_bytes: Option<Spanned<String>>,
}

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub(crate) fn build_node(
    src: &Source,
    base: &std::path::Path,
    raw: RawNode,
    diags: &mut Vec<Diagnostic>,
) -> NodeConfig {
    let mut n = NodeConfig {
        region_explicit: raw.region.is_some(),
        ..NodeConfig::default()
    };
    if let Some(r) = raw.regions {
        if r.get_ref().is_empty() {
            diags.push(src.at(
                Some(r.span()),
                "node.regions",
                "accepted: the path of a regions.toml, e.g. \"regions.toml\"".into(),
            ));
        } else {
            n.regions = Some(base.join(r.get_ref()));
        }
    }
    for (v, key, out) in [
        (raw.edge, "node.edge", &mut n.edge),
        (raw.region, "node.region", &mut n.region),
    ] {
        if let Some(v) = v {
            if key == "node.region" && v.get_ref() == "global" {
                diags.push(src.at(
                    Some(v.span()),
                    key,
                    "\"global\" is reserved (subjects `keel.global.*` carry global-scope traffic); pick another region name".into(),
                ));
            } else if name_ok(v.get_ref()) {
                *out = v.into_inner();
            } else {
                diags.push(src.at(
                    Some(v.span()),
                    key,
                    format!(
                        "{:?} is not a valid name; accepted: 1 to 63 lowercase letters, digits and '-'",
                        v.get_ref()
                    ),
                ));
            }
        }
    }
    n
}

/// `type` must be one of `supported`; otherwise a diagnostic listing them.
fn check_type(
    src: &Source,
    key: &str,
    t: &Spanned<String>,
    supported: &[&str],
    diags: &mut Vec<Diagnostic>,
) -> bool {
    if supported.contains(&t.get_ref().as_str()) {
        return true;
    }
    diags.push(src.at(
        Some(t.span()),
        key,
        format!(
            "unsupported backend type {:?}; supported: {}",
            t.get_ref(),
            supported
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));
    false
}

fn bounded_size(
    src: &Source,
    v: &Option<Spanned<String>>,
    key: &str,
    range: std::ops::RangeInclusive<u64>,
    out: &mut usize,
    diags: &mut Vec<Diagnostic>,
) {
    let Some(v) = v else { return };
    if let Some(n) = size(src, v, key, diags) {
        if range.contains(&n) {
            *out = n as usize;
        } else {
            diags.push(src.at(
                Some(v.span()),
                key,
                format!("accepted: {} to {} bytes", range.start(), range.end()),
            ));
        }
    }
}

pub(crate) fn build_infrastructure(
    src: &Source,
    raw: RawInfrastructure,
    diags: &mut Vec<Diagnostic>,
) -> InfrastructureConfig {
    let mut cfg = InfrastructureConfig::default();
    if let Some(kv) = raw.kv {
        let kv = kv.into_inner();
        if check_type(
            src,
            "infrastructure.kv.type",
            &kv.r#type,
            &["rocksdb"],
            diags,
        ) {
            let KvBackend::RocksDb {
                max_key_bytes,
                max_value_bytes,
                block_cache,
            } = &mut cfg.kv;
            bounded_size(
                src,
                &kv.max_key_bytes,
                "infrastructure.kv.max-key-bytes",
                1..=64 * 1024,
                max_key_bytes,
                diags,
            );
            bounded_size(
                src,
                &kv.max_value_bytes,
                "infrastructure.kv.max-value-bytes",
                1..=64 * 1024 * 1024,
                max_value_bytes,
                diags,
            );
            bounded_size(
                src,
                &kv.block_cache,
                "infrastructure.kv.block-cache",
                1024 * 1024..=64 * 1024 * 1024 * 1024,
                block_cache,
                diags,
            );
        }
    }
    if let Some(sql) = raw.sql {
        let sql = sql.into_inner();
        if check_type(
            src,
            "infrastructure.sql.type",
            &sql.r#type,
            &["sqlite"],
            diags,
        ) {
            let SqlBackend::Sqlite {
                max_rows,
                max_result_bytes,
                max_param_bytes,
                statement_timeout,
            } = &mut cfg.sql;
            if let Some(v) = &sql.max_rows {
                match usize::try_from(*v.get_ref()) {
                    Ok(n) if (1..=10_000_000).contains(&n) => *max_rows = n,
                    _ => diags.push(src.at(
                        Some(v.span()),
                        "infrastructure.sql.max-rows",
                        "accepted: an integer from 1 to 10000000".into(),
                    )),
                }
            }
            bounded_size(
                src,
                &sql.max_result_bytes,
                "infrastructure.sql.max-result-bytes",
                1024..=1024 * 1024 * 1024,
                max_result_bytes,
                diags,
            );
            bounded_size(
                src,
                &sql.max_param_bytes,
                "infrastructure.sql.max-param-bytes",
                1..=256 * 1024 * 1024,
                max_param_bytes,
                diags,
            );
            if let Some(v) = &sql.statement_timeout
                && let Some(d) = duration(src, v, "infrastructure.sql.statement-timeout", diags)
            {
                if d < Duration::from_millis(1) || d > Duration::from_secs(600) {
                    diags.push(src.at(
                        Some(v.span()),
                        "infrastructure.sql.statement-timeout",
                        "accepted: 1ms to 10m".into(),
                    ));
                } else {
                    *statement_timeout = d;
                }
            }
        }
    }
    if let Some(ev) = raw.event_log {
        let ev = ev.into_inner();
        if check_type(
            src,
            "infrastructure.event-log.type",
            &ev.r#type,
            &["rocksdb"],
            diags,
        ) {
            let EventLogBackend::RocksDb { max_event_bytes } = &mut cfg.event_log;
            bounded_size(
                src,
                &ev.max_event_bytes,
                "infrastructure.event-log.max-event-bytes",
                1..=64 * 1024 * 1024,
                max_event_bytes,
                diags,
            );
        }
    }
    if let Some(es) = raw.event_stream {
        let span = es.span();
        let es = es.into_inner();
        let key = "infrastructure.event-stream";
        if check_type(
            src,
            &format!("{key}.type"),
            &es.r#type,
            &["local", "nats"],
            diags,
        ) {
            match (es.r#type.get_ref().as_str(), es.servers) {
                ("local", None) => cfg.event_stream = EventStreamBackend::Local,
                ("local", Some(s)) => diags.push(src.at(
                    Some(s.span()),
                    &format!("{key}.servers"),
                    "the in-process bus has no servers; remove `servers` or use type = \"nats\"".into(),
                )),
                (_, None) => diags.push(src.at(
                    Some(span),
                    &format!("{key}.servers"),
                    "type = \"nats\" needs `servers`, e.g. servers = [\"nats://127.0.0.1:4222\"]".into(),
                )),
                (_, Some(list)) => {
                    let list_span = list.span();
                    let mut servers = Vec::new();
                    for s in list.into_inner() {
                        match check_nats_url(s.get_ref()) {
                            Ok(()) => servers.push(s.into_inner()),
                            Err(why) => diags.push(src.at(
                                Some(s.span()),
                                &format!("{key}.servers"),
                                format!("{:?}: {why}", s.get_ref()),
                            )),
                        }
                    }
                    if servers.is_empty() {
                        diags.push(src.at(
                            Some(list_span),
                            &format!("{key}.servers"),
                            "needs at least one server URL".into(),
                        ));
                    } else {
                        cfg.event_stream = EventStreamBackend::Nats { servers };
                    }
                }
            }
        }
    }
    if let Some(st) = raw.state {
        let st = st.into_inner();
        if check_type(
            src,
            "infrastructure.state.type",
            &st.r#type,
            &["rocksdb"],
            diags,
        ) {
            let StateBackend::RocksDb {
                anti_entropy_interval,
                max_state_bytes,
            } = &mut cfg.state;
            if let Some(v) = &st.anti_entropy_interval
                && let Some(d) =
                    duration(src, v, "infrastructure.state.anti-entropy-interval", diags)
            {
                if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
                    diags.push(src.at(
                        Some(v.span()),
                        "infrastructure.state.anti-entropy-interval",
                        "accepted: 10ms to 1h".into(),
                    ));
                } else {
                    *anti_entropy_interval = d;
                }
            }
            bounded_size(
                src,
                &st.max_state_bytes,
                "infrastructure.state.max-state-bytes",
                1024..=256 * 1024 * 1024,
                max_state_bytes,
                diags,
            );
        }
    }
    if let Some(c) = raw.cache {
        let span = c.span();
        let c = c.into_inner();
        if check_type(
            src,
            "infrastructure.cache.type",
            &c.r#type,
            &["tiered"],
            diags,
        ) {
            let CacheBackend::Tiered {
                l1_max_bytes,
                l1_ttl,
                l2_ttl,
                l3_ttl,
                max_ttl,
                max_key_bytes,
                max_value_bytes,
            } = &mut cfg.cache;
            let mut l1_bytes = *l1_max_bytes as usize;
            bounded_size(
                src,
                &c.l1_max_bytes,
                "infrastructure.cache.l1-max-bytes",
                1024 * 1024..=64 * 1024 * 1024 * 1024,
                &mut l1_bytes,
                diags,
            );
            *l1_max_bytes = l1_bytes as u64;
            bounded_size(
                src,
                &c.max_key_bytes,
                "infrastructure.cache.max-key-bytes",
                1..=1024,
                max_key_bytes,
                diags,
            );
            bounded_size(
                src,
                &c.max_value_bytes,
                "infrastructure.cache.max-value-bytes",
                1..=8 * 1024 * 1024,
                max_value_bytes,
                diags,
            );
            let day = Duration::from_secs(24 * 3600);
            bounded_duration(
                src,
                &c.max_ttl,
                "infrastructure.cache.max-ttl",
                (Duration::from_secs(1), 30 * day),
                max_ttl,
                diags,
            );
            for (v, key, out) in [
                (&c.l1_ttl, "infrastructure.cache.l1-ttl", &mut *l1_ttl),
                (&c.l2_ttl, "infrastructure.cache.l2-ttl", &mut *l2_ttl),
                (&c.l3_ttl, "infrastructure.cache.l3-ttl", &mut *l3_ttl),
            ] {
                bounded_duration(src, v, key, (Duration::from_secs(1), *max_ttl), out, diags);
            }
            // Defaults above a lowered max-ttl would be refused at every call.
            for (d, key) in [(l1_ttl, "l1-ttl"), (l2_ttl, "l2-ttl"), (l3_ttl, "l3-ttl")] {
                if *d > *max_ttl {
                    diags.push(src.at(
                        Some(span.clone()),
                        &format!("infrastructure.cache.{key}"),
                        format!(
                            "the default of {}s exceeds max-ttl ({}s); set {key} at most max-ttl",
                            d.as_secs(),
                            max_ttl.as_secs()
                        ),
                    ));
                }
            }
        }
    }
    if let Some(l) = raw.ledger {
        let l = l.into_inner();
        let key = "infrastructure.ledger";
        if check_type(
            src,
            &format!("{key}.type"),
            &l.r#type,
            &["auto", "sqlite", "jetstream"],
            diags,
        ) {
            let c = &mut cfg.ledger;
            c.log = match l.r#type.get_ref().as_str() {
                "sqlite" => LedgerLogKind::Sqlite,
                "jetstream" => LedgerLogKind::JetStream,
                _ => LedgerLogKind::Auto,
            };
            if let Some(m) = l.min_balance {
                c.min_balance = *m.get_ref();
            }
            if let Some(p) = l.max_page {
                match u32::try_from(*p.get_ref()) {
                    Ok(n @ 1..=10_000) => c.max_page = n,
                    _ => diags.push(src.at(
                        Some(p.span()),
                        &format!("{key}.max-page"),
                        "accepted: 1 to 10000".into(),
                    )),
                }
            }
            for (account, min) in l.account_min_balance.unwrap_or_default() {
                let ok = account
                    .get_ref()
                    .split_once('/')
                    .is_some_and(|(c, a)| !c.is_empty() && !a.is_empty() && a.len() <= 128);
                if ok {
                    c.account_min_balance
                        .insert(account.get_ref().clone(), *min.get_ref());
                } else {
                    diags.push(src.at(
                        Some(account.span()),
                        &format!("{key}.account-min-balance"),
                        format!(
                            "{:?}: accepted: \"<component>/<account>\" (an account id of 1 to 128 bytes)",
                            account.get_ref()
                        ),
                    ));
                }
            }
        }
    }
    cfg
}

/// A duration within `range` (inclusive), or a diagnostic naming it.
fn bounded_duration(
    src: &Source,
    v: &Option<Spanned<String>>,
    key: &str,
    (min, max): (Duration, Duration),
    out: &mut Duration,
    diags: &mut Vec<Diagnostic>,
) {
    let Some(v) = v else { return };
    if let Some(d) = duration(src, v, key, diags) {
        if d < min || d > max {
            diags.push(src.at(
                Some(v.span()),
                key,
                format!("accepted: {}s to {}s", min.as_secs(), max.as_secs()),
            ));
        } else {
            *out = d;
        }
    }
}

/// A NATS server URL as async-nats accepts it: `nats://` or `tls://`, a host
/// and an optional port.
fn check_nats_url(url: &str) -> Result<(), String> {
    let accepted = "accepted: nats://host[:port] or tls://host[:port]";
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("not a URL; {accepted}"));
    };
    if scheme != "nats" && scheme != "tls" {
        return Err(format!("unsupported scheme {scheme:?}; {accepted}"));
    }
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, hp)| hp);
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (host_port, None),
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("missing host; {accepted}"));
    }
    if let Some(p) = port
        && p.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(format!("bad port {p:?}; {accepted}"));
    }
    Ok(())
}
