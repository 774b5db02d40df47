//! Parsing and validation of `regions.toml`.
//!
//! Two passes like `keel.toml`: serde with `deny_unknown_fields` into raw
//! shapes that keep every value's span (a syntax error, an unknown key or a
//! wrong type stops there, with its place), then validation that collects
//! every remaining problem. Required keys are `Option`s in the raw shapes so
//! that a missing key is one diagnostic among the others, not the end of
//! the parse.

use super::{
    CacheTier, ConsensusProtocol, Coordination, GLOBAL_REGION, GlobalEventStream, NatsServerAddr,
    NatsTopology, PartitionTolerance, Region, RegionalDatabase, RegionsConfig, Residency,
};
use crate::diagnostic::{Source, key_from_message};
use crate::{Diagnostic, Diagnostics, Location};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Ports of a server written as a URL, or left out of its table.
pub(crate) const DEFAULT_CLIENT_PORT: u16 = 4222;
pub(crate) const DEFAULT_CLUSTER_PORT: u16 = 6222;
pub(crate) const DEFAULT_GATEWAY_PORT: u16 = 7222;
pub(crate) const DEFAULT_MONITOR_PORT: u16 = 8222;
pub(crate) const DEFAULT_SECRET_ENV: &str = "KEEL_NATS_SECRET";
pub(crate) const DEFAULT_STORE_DIR: &str = "/var/lib/keel/nats";

const DATABASE_SUPPORTED: &str = "supported: \"nats\" (the region's JetStream on its `servers`). Keel keeps regional data in JetStream: write database = \"nats\"";
const CACHE_SUPPORTED: &str = "supported: \"nats\" (JetStream KV on the region's servers) or \"none\" (no L2; edges use their L1 and L3). Keel keeps the regional cache in JetStream KV: write cache_tier = \"nats\"";
const GLOBAL_STREAM_SUPPORTED: &str = "supported: \"nats\" (NATS gateways). Global events travel over NATS gateways between the regions' clusters: write global_event_stream = \"nats\"";
const SERVER_ACCEPTED: &str = "accepted: \"nats://host[:port]\" (client port, default 4222; cluster, gateway and monitor ports 6222, 7222, 8222) or a table { host = \"...\", client = 4222, cluster = 6222, gateway = 7222, monitor = 8222 } (host and client required)";
const HOST_ACCEPTED: &str = "accepted: a host name (letters, digits, '-' and '.') or an IP address (in a URL, IPv6 in brackets: \"nats://[::1]:4222\")";
const NAME_ACCEPTED: &str = "accepted: 1 to 63 lowercase letters, digits and '-'";

// ---- raw serde shapes (strict) ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    regions: Option<Spanned<BTreeMap<Spanned<String>, RawRegion>>>,
    #[serde(default)]
    coordination: Option<RawCoordination>,
    #[serde(default)]
    nats: Option<RawNats>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    edges: Option<Spanned<Vec<Spanned<String>>>>,
    coordinator: Option<Spanned<String>>,
    database: Option<Spanned<String>>,
    cache_tier: Option<Spanned<String>>,
    data_residency: Option<Spanned<String>>,
    #[serde(default)]
    compliance: Vec<Spanned<String>>,
    servers: Option<Spanned<Vec<Spanned<RawServer>>>>,
}

/// One entry of `servers`: a URL string or a table.
enum RawServer {
    Url(String),
    Table(RawServerTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerTable {
    host: Option<Spanned<String>>,
    client: Option<Spanned<i64>>,
    cluster: Option<Spanned<i64>>,
    gateway: Option<Spanned<i64>>,
    monitor: Option<Spanned<i64>>,
}

// Hand-written instead of `#[serde(untagged)]`: untagged buffers the value
// and loses the spans of the table's keys, and its error ("data did not
// match any variant") would not say what was wrong.
impl<'de> Deserialize<'de> for RawServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawServer;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a server URL \"nats://host[:port]\" or a table { host, client, cluster, gateway, monitor }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawServer, E> {
                Ok(RawServer::Url(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawServer, A::Error> {
                RawServerTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawServer::Table)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordination {
    global_event_stream: Option<Spanned<String>>,
    consensus_protocol: Option<Spanned<String>>,
    partition_tolerance: Option<Spanned<String>>,
    allow_cross_zone_migration: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNats {
    secret_env: Option<Spanned<String>>,
    store_dir: Option<Spanned<String>>,
}

// ---- validation ----

pub(super) fn parse(path: &Path, text: &str) -> Result<RegionsConfig, Diagnostics> {
    let src = Source::new(path, text);
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let key = key_from_message(e.message());
        Diagnostics::one(src.at(e.span(), &key, e.message().trim().to_string()))
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut v = Validator {
        src: &src,
        diags: Vec::new(),
        edges: HashMap::new(),
        servers: Vec::new(),
        ports: HashMap::new(),
    };

    let mut regions = Vec::new();
    match raw.regions {
        Some(map) if !map.get_ref().is_empty() => {
            // Regions keep file order for predictable output and so that a
            // duplicate is reported at its second listing.
            let mut list: Vec<_> = map.into_inner().into_iter().collect();
            list.sort_by_key(|(name, _)| name.span().start);
            for (name, region) in list {
                if let Some(r) = v.region(name, region) {
                    regions.push(r);
                }
            }
        }
        other => {
            let span = other.map(|m| m.span());
            v.diags.push(src.at(
                span,
                "regions",
                "no regions defined; the file needs at least one [regions.<name>] table with edges, coordinator, data_residency and servers".into(),
            ));
        }
    }
    let coordination = v.coordination(raw.coordination);
    let nats = v.nats(&base, raw.nats);

    if v.diags.is_empty() {
        Ok(RegionsConfig {
            path: path.to_path_buf(),
            regions,
            coordination,
            nats,
        })
    } else {
        // Report in file order (missing keys point at their region's header).
        let mut diags = v.diags;
        diags.sort_by_key(|d| (d.location.line, d.location.column));
        Err(Diagnostics(diags))
    }
}

/// Which server uses a host:port, for the file-wide clash check.
struct PortUse {
    /// Index into `Validator::servers`.
    server: usize,
    /// `client`, `cluster`, `gateway` or `monitor`.
    role: &'static str,
}

struct Validator<'a> {
    src: &'a Source<'a>,
    diags: Vec<Diagnostic>,
    /// Every edge listed so far: its region and where.
    edges: HashMap<String, (String, Location)>,
    /// Every valid server so far: `regions.<name>.servers[<i>]` and its line.
    servers: Vec<(String, usize)>,
    /// Every (lowercased host, port) a server listed so far uses.
    ports: HashMap<(String, u16), PortUse>,
}

impl Validator<'_> {
    fn err<T>(&mut self, v: &Spanned<T>, key: &str, message: String) {
        self.diags.push(self.src.at(Some(v.span()), key, message));
    }

    fn region(&mut self, name: Spanned<String>, raw: RawRegion) -> Option<Region> {
        let location = self.src.location(Some(name.span()));
        let name = name.into_inner();
        let before = self.diags.len();
        let key = |k: &str| format!("regions.{name}.{k}");
        let missing = |k: &str, accepted: String| {
            Diagnostic::new(
                location.clone(),
                key(k),
                format!("missing key `{k}`; {accepted}"),
            )
        };

        if name == GLOBAL_REGION {
            self.diags.push(Diagnostic::new(
                location.clone(),
                format!("regions.{name}"),
                format!("\"{GLOBAL_REGION}\" is reserved (subjects `keel.{GLOBAL_REGION}.*` carry global-scope traffic); pick another region name"),
            ));
        } else if !is_name(&name) {
            self.diags.push(Diagnostic::new(
                location.clone(),
                format!("regions.{name}"),
                format!("{name:?} is not a valid region name; {NAME_ACCEPTED}"),
            ));
        }

        // edges
        let mut edges = Vec::new();
        let mut edges_ok = false;
        match raw.edges {
            None => self.diags.push(missing(
                "edges",
                "accepted: a list of 1 or more edge (POP) names, e.g. edges = [\"fra\", \"ams\"]"
                    .into(),
            )),
            Some(list) if list.get_ref().is_empty() => self.err(
                &list,
                &key("edges"),
                "a region needs at least one edge; accepted: a list of edge (POP) names, e.g. edges = [\"fra\", \"ams\"]".into(),
            ),
            Some(list) => {
                edges_ok = true;
                for e in list.into_inner() {
                    let here = self.src.location(Some(e.span()));
                    if !is_name(e.get_ref()) {
                        edges_ok = false;
                        self.err(
                            &e,
                            &key("edges"),
                            format!("{:?} is not a valid edge name; {NAME_ACCEPTED}", e.get_ref()),
                        );
                    } else if let Some((other, at)) = self.edges.get(e.get_ref()) {
                        let message = format!(
                            "edge {:?} is already listed in region {other:?} (line {}); an edge belongs to exactly one region, listed once",
                            e.get_ref(),
                            at.line
                        );
                        self.err(&e, &key("edges"), message);
                    } else {
                        self.edges
                            .insert(e.get_ref().clone(), (name.clone(), here));
                    }
                    edges.push(e.into_inner());
                }
            }
        }

        // coordinator
        let listed = || {
            edges
                .iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let coordinator = match raw.coordinator {
            None => {
                let accepted = if edges_ok {
                    format!("accepted: one of the region's edges: {}", listed())
                } else {
                    "accepted: one of the region's edges, e.g. coordinator = \"fra\"".into()
                };
                self.diags.push(missing("coordinator", accepted));
                None
            }
            Some(c) => {
                // Without a valid `edges` there is nothing to compare with;
                // that problem is reported already.
                if edges_ok && !edges.contains(c.get_ref()) {
                    self.err(
                        &c,
                        &key("coordinator"),
                        format!(
                            "{:?} is not one of the region's edges; accepted: {}",
                            c.get_ref(),
                            listed()
                        ),
                    );
                }
                Some(c.into_inner())
            }
        };

        let database = match raw.database {
            None => Some(RegionalDatabase::Nats),
            Some(d) => match url_word(d.get_ref(), false) {
                Ok(_) => Some(RegionalDatabase::Nats),
                Err(what) => {
                    self.err(
                        &d,
                        &key("database"),
                        format!("{what}; {DATABASE_SUPPORTED}"),
                    );
                    None
                }
            },
        };
        let cache_tier = match raw.cache_tier {
            None => Some(CacheTier::Nats),
            Some(c) => match url_word(c.get_ref(), true) {
                Ok(Word::Nats) => Some(CacheTier::Nats),
                Ok(Word::None) => Some(CacheTier::None),
                Err(what) => {
                    self.err(&c, &key("cache_tier"), format!("{what}; {CACHE_SUPPORTED}"));
                    None
                }
            },
        };

        let accepted_residency = Residency::ACCEPTED
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let data_residency = match raw.data_residency {
            None => {
                self.diags.push(missing(
                    "data_residency",
                    format!("accepted: {accepted_residency}"),
                ));
                None
            }
            Some(r) => {
                let parsed = Residency::parse(r.get_ref());
                if parsed.is_none() {
                    self.err(
                        &r,
                        &key("data_residency"),
                        format!(
                            "unknown residency class {:?}; accepted: {accepted_residency}",
                            r.get_ref()
                        ),
                    );
                }
                parsed
            }
        };

        let mut compliance = Vec::new();
        for c in raw.compliance {
            if !is_label(c.get_ref()) {
                self.err(
                    &c,
                    &key("compliance"),
                    format!(
                        "{:?} is not a valid compliance label; accepted: lowercase letters, digits and '-', e.g. \"gdpr\", \"data-localization\"",
                        c.get_ref()
                    ),
                );
            }
            compliance.push(c.into_inner());
        }

        let example = format!("servers = [\"nats://nats-1.{name}.keel.internal:4222\"]");
        let mut servers = Vec::new();
        match raw.servers {
            None => self.diags.push(missing(
                "servers",
                format!("the region's NATS cluster (1 or more servers) is required; {SERVER_ACCEPTED}; e.g. {example}"),
            )),
            Some(list) if list.get_ref().is_empty() => self.err(
                &list,
                &key("servers"),
                format!("a region needs at least one NATS server; {SERVER_ACCEPTED}; e.g. {example}"),
            ),
            Some(list) => {
                for (i, s) in list.into_inner().into_iter().enumerate() {
                    let skey = format!("regions.{name}.servers[{i}]");
                    if let Some(addr) = self.server(&skey, s) {
                        servers.push(addr);
                    }
                }
            }
        }

        if self.diags.len() > before {
            return None;
        }
        Some(Region {
            name,
            edges,
            coordinator: coordinator?,
            database: database?,
            cache_tier: cache_tier?,
            data_residency: data_residency?,
            compliance,
            servers,
            location,
        })
    }

    /// One entry of `servers` (`key` is `regions.<name>.servers[<i>]`).
    fn server(&mut self, key: &str, raw: Spanned<RawServer>) -> Option<NatsServerAddr> {
        let span = raw.span();
        let line = self.src.location(Some(span.clone())).line;
        let addr = match raw.into_inner() {
            RawServer::Url(url) => match parse_server_url(&url) {
                Ok((host, client_port)) => NatsServerAddr {
                    host,
                    client_port,
                    cluster_port: DEFAULT_CLUSTER_PORT,
                    gateway_port: DEFAULT_GATEWAY_PORT,
                    monitor_port: DEFAULT_MONITOR_PORT,
                },
                Err(m) => {
                    self.diags.push(self.src.at(Some(span), key, m));
                    return None;
                }
            },
            RawServer::Table(t) => {
                let (Some(host), Some(client)) = (&t.host, &t.client) else {
                    let absent: Vec<_> = [
                        ("`host`", t.host.is_none()),
                        ("`client`", t.client.is_none()),
                    ]
                    .into_iter()
                    .filter_map(|(k, absent)| absent.then_some(k))
                    .collect();
                    self.diags.push(self.src.at(
                        Some(span),
                        key,
                        format!(
                            "missing key {} in the server table; host and client are required, e.g. {{ host = \"10.0.1.1\", client = 4222 }}",
                            absent.join(" and ")
                        ),
                    ));
                    return None;
                };
                let mut ok = true;
                if !valid_host(host.get_ref()) {
                    ok = false;
                    self.err(
                        host,
                        &format!("{key}.host"),
                        format!("bad host {:?}; {HOST_ACCEPTED}", host.get_ref()),
                    );
                }
                let mut port = |v: Option<&Spanned<i64>>, role: &str, default: u16| match v {
                    None => default,
                    Some(p) => match u16::try_from(*p.get_ref()) {
                        Ok(n) if n > 0 => n,
                        _ => {
                            ok = false;
                            self.diags.push(self.src.at(
                                Some(p.span()),
                                &format!("{key}.{role}"),
                                format!(
                                    "port {} is out of range; accepted: 1 to 65535",
                                    p.get_ref()
                                ),
                            ));
                            default
                        }
                    },
                };
                let client_port = port(Some(client), "client", DEFAULT_CLIENT_PORT);
                let cluster_port = port(t.cluster.as_ref(), "cluster", DEFAULT_CLUSTER_PORT);
                let gateway_port = port(t.gateway.as_ref(), "gateway", DEFAULT_GATEWAY_PORT);
                let monitor_port = port(t.monitor.as_ref(), "monitor", DEFAULT_MONITOR_PORT);
                if !ok {
                    return None;
                }
                NatsServerAddr {
                    host: host.get_ref().clone(),
                    client_port,
                    cluster_port,
                    gateway_port,
                    monitor_port,
                }
            }
        };

        // A server's four listeners need four ports.
        let roles = addr.roles();
        let mut own_clash = false;
        for (i, (role, port)) in roles.iter().enumerate() {
            if let Some((other, _)) = roles[..i].iter().find(|(_, p)| p == port) {
                own_clash = true;
                self.diags.push(self.src.at(
                    Some(span.clone()),
                    key,
                    format!(
                        "{role} port {port} is also this server's {other} port; client, cluster, gateway and monitor need four different ports (the URL form uses 6222, 7222 and 8222 for the last three; write a table to choose others)"
                    ),
                ));
            }
        }
        if own_clash {
            return None;
        }

        // No two servers of the file may listen on one host:port: one
        // diagnostic per earlier server this one clashes with, listing the
        // shared ports.
        let host = addr.host.to_ascii_lowercase();
        let mut clashes: Vec<(usize, Vec<String>)> = Vec::new();
        for (role, port) in roles {
            if let Some(u) = self.ports.get(&(host.clone(), port)) {
                let shared = if u.role == role {
                    format!("{} ({role})", host_port(&addr.host, port))
                } else {
                    format!(
                        "{} ({role} here, {} there)",
                        host_port(&addr.host, port),
                        u.role
                    )
                };
                match clashes.iter_mut().find(|(server, _)| *server == u.server) {
                    Some((_, list)) => list.push(shared),
                    None => clashes.push((u.server, vec![shared])),
                }
            }
        }
        for (server, shared) in &clashes {
            let other = &self.servers[*server];
            let verb = if shared.len() == 1 { "is" } else { "are" };
            self.diags.push(self.src.at(
                Some(span.clone()),
                key,
                format!(
                    "{} {verb} already used by {} (line {}); every server needs its own host:port",
                    shared.join(", "),
                    other.0,
                    other.1
                ),
            ));
        }
        if !clashes.is_empty() {
            return None;
        }
        let id = self.servers.len();
        self.servers.push((key.to_string(), line));
        for (role, port) in roles {
            self.ports
                .insert((host.clone(), port), PortUse { server: id, role });
        }
        Some(addr)
    }

    fn coordination(&mut self, raw: Option<RawCoordination>) -> Coordination {
        let mut c = Coordination {
            global_event_stream: GlobalEventStream::NatsGateways,
            consensus_protocol: ConsensusProtocol::Raft,
            partition_tolerance: PartitionTolerance::Ap,
            allow_cross_zone_migration: false,
        };
        let Some(raw) = raw else { return c };
        if let Some(g) = raw.global_event_stream
            && let Err(what) = url_word(g.get_ref(), false)
        {
            self.err(
                &g,
                "coordination.global_event_stream",
                format!("{what}; {GLOBAL_STREAM_SUPPORTED}"),
            );
        }
        if let Some(p) = raw.consensus_protocol {
            match p.get_ref().as_str() {
                "raft" => c.consensus_protocol = ConsensusProtocol::Raft,
                "none" => c.consensus_protocol = ConsensusProtocol::None,
                other => {
                    let message = format!(
                        "unknown consensus protocol {other:?}; accepted: \"raft\" (JetStream's Raft: streams and KV buckets replicated on up to 3 of the region's servers) or \"none\" (no replication, for development topologies)"
                    );
                    self.err(&p, "coordination.consensus_protocol", message);
                }
            }
        }
        if let Some(p) = raw.partition_tolerance
            && p.get_ref() != "ap"
        {
            let message = format!(
                "{:?} is not supported; accepted: \"ap\" only: edges keep serving during a partition and their outbox replays after it heals; strongly consistent operations use the ledger",
                p.get_ref()
            );
            self.err(&p, "coordination.partition_tolerance", message);
        }
        if let Some(b) = raw.allow_cross_zone_migration {
            c.allow_cross_zone_migration = b;
        }
        c
    }

    fn nats(&mut self, base: &Path, raw: Option<RawNats>) -> NatsTopology {
        let mut n = NatsTopology {
            secret_env: DEFAULT_SECRET_ENV.into(),
            store_dir: PathBuf::from(DEFAULT_STORE_DIR),
        };
        let Some(raw) = raw else { return n };
        if let Some(s) = raw.secret_env {
            if is_env_name(s.get_ref()) {
                n.secret_env = s.into_inner();
            } else {
                let message = format!(
                    "{:?} is not an environment variable name; accepted: [A-Z_][A-Z0-9_]*, e.g. \"{DEFAULT_SECRET_ENV}\"",
                    s.get_ref()
                );
                self.err(&s, "nats.secret_env", message);
            }
        }
        if let Some(d) = raw.store_dir {
            if d.get_ref().is_empty() {
                let message = format!(
                    "accepted: a directory (relative paths resolve against the directory of {}), e.g. \"{DEFAULT_STORE_DIR}\"",
                    self.src.path.display()
                );
                self.err(&d, "nats.store_dir", message);
            } else {
                n.store_dir = base.join(d.get_ref());
            }
        }
        n
    }
}

impl NatsServerAddr {
    /// The four listeners and their ports.
    fn roles(&self) -> [(&'static str, u16); 4] {
        [
            ("client", self.client_port),
            ("cluster", self.cluster_port),
            ("gateway", self.gateway_port),
            ("monitor", self.monitor_port),
        ]
    }
}

/// What a URL-valued key (`database`, `cache_tier`, `global_event_stream`)
/// says.
enum Word {
    /// `"nats"` or `nats://...`.
    Nats,
    /// `"none"` (only where `allow_none`).
    None,
}

/// `Err` says what is wrong with `v`; the caller appends what is supported.
fn url_word(v: &str, allow_none: bool) -> Result<Word, String> {
    if v == "nats" || v.starts_with("nats://") {
        return Ok(Word::Nats);
    }
    if allow_none && v == "none" {
        return Ok(Word::None);
    }
    match v.split_once("://") {
        Some((scheme, _)) => Err(format!("unsupported scheme {scheme:?}")),
        None => Err(format!("unsupported value {v:?}")),
    }
}

/// `nats://host[:port]` to host and client port.
fn parse_server_url(url: &str) -> Result<(String, u16), String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "{url:?} is not a NATS server URL; {SERVER_ACCEPTED}"
        ));
    };
    if scheme != "nats" {
        return Err(format!(
            "unsupported scheme {scheme:?} in {url:?}; {SERVER_ACCEPTED}"
        ));
    }
    if rest.contains(['/', '@', '?', '#']) {
        return Err(format!(
            "{url:?}: only a host and a port are accepted (no user, path or query); {SERVER_ACCEPTED}"
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let Some((h, after)) = v6.split_once(']') else {
            return Err(format!("bad host in {url:?}; {HOST_ACCEPTED}"));
        };
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("bad host {h:?} in {url:?}; {HOST_ACCEPTED}"));
        }
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(format!("bad host in {url:?}; {HOST_ACCEPTED}")),
        }
    } else {
        let (h, p) = match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        };
        if !valid_host(h) || h.contains(':') {
            return Err(format!("bad host {h:?} in {url:?}; {HOST_ACCEPTED}"));
        }
        (h, p)
    };
    let port = match port {
        None => DEFAULT_CLIENT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(format!(
                    "bad port {p:?} in {url:?}; accepted: 1 to 65535 (default 4222)"
                ));
            }
        },
    };
    Ok((host.to_string(), port))
}

/// A host name (RFC 1123 labels) or an IP address.
fn valid_host(h: &str) -> bool {
    if h.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `host:port`, IPv6 in brackets.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Region and edge names: 1 to 63 of `[a-z0-9-]`.
fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && is_label(s)
}

/// Compliance labels: `[a-z0-9-]+`.
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `[A-Z_][A-Z0-9_]*`.
fn is_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_uppercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}
