//! `keel.toml`: the configuration of one node.
//!
//! Parsing is strict (unknown keys are errors) and every error is a
//! [`Diagnostic`] naming file, line, column, key and what is accepted, so an
//! operator can fix the file without reading our source.

mod auth;
mod diagnostic;
mod infra;
mod regions;
mod units;

pub use auth::{AuthConfig, AuthKey, DEFAULT_LEEWAY, JwtAlgorithm, KeySource};
pub use diagnostic::{Diagnostic, Diagnostics, Location};
pub use infra::{
    CacheBackend, EventLogBackend, EventStreamBackend, InfrastructureConfig, KvBackend,
    LedgerConfig, LedgerLogKind, NodeConfig, SqlBackend, StateBackend,
};
pub use regions::{
    CacheTier, ConsensusProtocol, Coordination, GLOBAL_REGION, GlobalEventStream, NatsServerAddr,
    NatsTopology, PartitionTolerance, Region, RegionalDatabase, RegionsConfig, Residency,
};
pub use units::{parse_duration, parse_size};

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Default cap on one component instance's linear memory.
pub const DEFAULT_MEMORY: u64 = 64 * 1024 * 1024;
/// Default wall-clock budget of one request in a component.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of instances of one component alive at once.
pub const DEFAULT_MAX_INSTANCES: u32 = 256;
/// Default cap on table elements per instance.
pub const DEFAULT_MAX_TABLE_ELEMENTS: u32 = 100_000;
/// Default cap on (core) instances created by one component instantiation.
pub const DEFAULT_MAX_CORE_INSTANCES: u32 = 32;

/// Paths below these prefixes belong to the host (admin API, metrics).
pub const RESERVED_ROUTE_PREFIXES: &[&str] = &["/_keel", "/metrics"];

/// A fully validated node configuration.
#[derive(Debug, Clone)]
pub struct KeelConfig {
    /// The file this came from (as given).
    pub path: PathBuf,
    pub server: ServerConfig,
    pub engine: EngineConfig,
    /// `[auth]`: token verification (default: no keys).
    pub auth: AuthConfig,
    pub node: NodeConfig,
    pub infrastructure: InfrastructureConfig,
    /// Components in file order.
    pub components: Vec<ComponentConfig>,
    /// The deployment's topology when `node.regions` is set (see
    /// [`KeelConfig::place_node`]); `None` on the embedded single node.
    pub regions: Option<std::sync::Arc<RegionsConfig>>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: std::net::SocketAddr,
    /// Node-local state: compiled-artifact cache and (later) stores.
    pub data_dir: PathBuf,
    /// Worker threads, each with its own current-thread runtime and listener.
    /// 0 = one per available core.
    pub workers: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    /// How long in-flight requests may run after SIGTERM.
    pub drain_timeout: Duration,
}

/// Engine-wide trade-offs (see BENCHMARKS.md for the numbers behind defaults).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// `true`: guard pages + signal-based traps (faster compute, more VM work
    /// per instantiation). `false`: explicit bounds checks, no guard regions,
    /// pool slots reset without touching VM mappings (faster per request).
    pub guard_pages: bool,
    /// Bytes of each linear memory reset by memset instead of madvise.
    pub keep_resident: u64,
}

#[derive(Debug, Clone)]
pub struct ComponentConfig {
    pub name: String,
    /// Absolute (resolved against the config file's directory).
    pub wasm: PathBuf,
    pub route: Route,
    pub grants: Vec<Grant>,
    /// Origins (`scheme://host[:port]`) the component may call with
    /// `wasi:http/outgoing-handler`; empty = none.
    pub allowed_outbound_hosts: Vec<String>,
    pub limits: Limits,
    /// `[components.<name>.personal-data]`: where the component keeps one
    /// user's data (GDPR erase and export).
    pub personal_data: PersonalData,
    /// `[components.<name>.env]`: the component's environment variables
    /// (`wasi:cli/environment`), in name order. Empty: no environment.
    pub env: Vec<EnvVar>,
    /// `[components.<name>.live] channels`: which live (SSE) channels a
    /// signed-in user may open; empty: none.
    pub live_channels: Vec<LiveChannel>,
    /// Where `[components.<name>]` is, for diagnostics.
    pub location: Location,
    /// Where the `wasm` key is, for diagnostics about the module itself.
    pub wasm_location: Location,
}

/// Where a component keeps one user's data, beyond what the host knows
/// itself (events and activity naming the user, preferences, CRDT members
/// and map keys equal to the user id). `process-data-deletion` erases it
/// and `export-user-data` collects it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersonalData {
    /// Key prefixes with `{user}` in them, e.g. `"profile/{user}/"`: the KV
    /// keys, cache keys and `state` CRDTs named under the prefix (user id
    /// substituted) are the user's.
    pub keys: Vec<String>,
    /// SQL tables and the column holding the user id (`"notes.owner"`):
    /// those rows are the user's.
    pub sql: Vec<SqlUserColumn>,
}

/// One variable of `[components.<name>.env]`.
#[derive(Clone, PartialEq, Eq)]
pub struct EnvVar {
    pub name: String,
    pub source: EnvSource,
    /// Where it is written (an unset host variable is reported here).
    pub location: Location,
}

impl std::fmt::Debug for EnvVar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvVar")
            .field("name", &self.name)
            .field("source", &self.source)
            .finish()
    }
}

/// Where an environment variable's value comes from. Nothing is read while
/// parsing: host variables are read when the component loads.
#[derive(Clone, PartialEq, Eq)]
pub enum EnvSource {
    /// `NAME = "value"`.
    Value(String),
    /// `NAME = { from-env = "HOST_VAR" }`: the host's variable (secrets).
    Host(String),
}

impl std::fmt::Debug for EnvSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Values may be secrets: never print them.
            EnvSource::Value(v) => write!(f, "Value(<{} bytes>)", v.len()),
            EnvSource::Host(n) => f.debug_tuple("Host").field(n).finish(),
        }
    }
}

/// A live channel pattern: literal text, at most one `{user}` (the
/// token's subject) and optionally a final `*` (any rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveChannel(String);

impl LiveChannel {
    /// Whether `user` may open `channel` under this pattern.
    pub fn allows(&self, user: &str, channel: &str) -> bool {
        let pattern = self.0.replace("{user}", user);
        match pattern.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix) && channel.len() > prefix.len(),
            None => channel == pattern,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Bytes of a live channel name, and which ones (see `wit/live.wit`).
pub const MAX_LIVE_CHANNEL_BYTES: usize = 128;

pub fn is_live_channel_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'/' | b'-')
}

/// `"<table>.<column>"` of `personal-data.sql`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlUserColumn {
    pub table: String,
    pub column: String,
}

impl PersonalData {
    /// The key prefixes holding `user`'s data.
    pub fn key_prefixes(&self, user: &str) -> Vec<String> {
        self.keys
            .iter()
            .map(|t| t.replace("{user}", user))
            .collect()
    }
}

/// One entry of `grants = [...]`, with where it was written.
#[derive(Debug, Clone)]
pub struct Grant {
    pub name: String,
    pub location: Location,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memory: u64,
    pub timeout: Duration,
    pub max_instances: u32,
    pub max_table_elements: u32,
    pub max_core_instances: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: DEFAULT_MEMORY,
            timeout: DEFAULT_TIMEOUT,
            max_instances: DEFAULT_MAX_INSTANCES,
            max_table_elements: DEFAULT_MAX_TABLE_ELEMENTS,
            max_core_instances: DEFAULT_MAX_CORE_INSTANCES,
        }
    }
}

/// A route: an exact path, or a prefix when written with a trailing `/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Path without the `/...` suffix; `""` for the catch-all `/...`.
    pub path: String,
    pub wildcard: bool,
}

impl Route {
    pub fn parse(s: &str) -> Result<Route, String> {
        const ACCEPTED: &str = "accepted: an absolute path such as \"/hello\", or a prefix ending in \"/...\" such as \"/api/...\" or \"/...\"";
        if !s.starts_with('/') {
            return Err(format!("route {s:?} must start with '/'; {ACCEPTED}"));
        }
        let (path, wildcard) = match s.strip_suffix("/...") {
            Some(p) => (p, true),
            None => (s, false),
        };
        if path.contains("...") || path.contains('*') || path.contains('?') || path.contains('#') {
            return Err(format!("route {s:?} is not supported; {ACCEPTED}"));
        }
        let path = path.trim_end_matches('/');
        Ok(Route {
            path: path.to_string(),
            wildcard,
        })
    }

    /// Does `request_path` belong to this route?
    pub fn matches(&self, request_path: &str) -> bool {
        let p = request_path.trim_end_matches('/');
        if self.wildcard {
            p == self.path
                || (p.starts_with(&self.path) && p.as_bytes().get(self.path.len()) == Some(&b'/'))
        } else {
            p == self.path
        }
    }

    pub fn is_reserved(&self) -> bool {
        RESERVED_ROUTE_PREFIXES
            .iter()
            .any(|r| self.path == *r || self.path.starts_with(&format!("{r}/")))
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.wildcard, self.path.is_empty()) {
            (true, _) => write!(f, "{}/...", self.path),
            (false, true) => f.write_str("/"),
            (false, false) => f.write_str(&self.path),
        }
    }
}

// ---- raw serde shapes (strict) ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFile {
    #[serde(default)]
    server: Option<RawServer>,
    #[serde(default)]
    engine: Option<RawEngine>,
    #[serde(default)]
    auth: Option<auth::RawAuth>,
    #[serde(default)]
    node: Option<infra::RawNode>,
    #[serde(default)]
    infrastructure: Option<infra::RawInfrastructure>,
    #[serde(default)]
    components: BTreeMap<Spanned<String>, Spanned<RawComponent>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawServer {
    listen: Option<Spanned<String>>,
    data_dir: Option<Spanned<String>>,
    workers: Option<Spanned<i64>>,
    header_read_timeout: Option<Spanned<String>>,
    max_header_bytes: Option<Spanned<String>>,
    max_body_bytes: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawEngine {
    guard_pages: Option<bool>,
    keep_resident: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawComponent {
    wasm: Spanned<String>,
    route: Spanned<String>,
    #[serde(default)]
    grants: Vec<Spanned<String>>,
    #[serde(default)]
    allowed_outbound_hosts: Vec<Spanned<String>>,
    #[serde(default)]
    limits: Option<RawLimits>,
    #[serde(default)]
    personal_data: Option<RawPersonalData>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    live: Option<RawLive>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLive {
    #[serde(default)]
    channels: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawPersonalData {
    #[serde(default)]
    keys: Vec<Spanned<String>>,
    #[serde(default)]
    sql: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLimits {
    memory: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    max_instances: Option<Spanned<i64>>,
    max_table_elements: Option<Spanned<i64>>,
    max_core_instances: Option<Spanned<i64>>,
}

impl KeelConfig {
    /// Read and validate a `keel.toml`.
    pub fn load(path: &Path) -> Result<KeelConfig, Diagnostics> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Diagnostics::one(Diagnostic::file(path, format!("cannot read: {e}"))))?;
        let mut config = Self::parse(path, &text)?;
        config.place_node(None, None)?;
        Ok(config)
    }

    /// Validate `text` as if it were the content of `path` (relative paths in
    /// it resolve against `path`'s directory).
    pub fn parse(path: &Path, text: &str) -> Result<KeelConfig, Diagnostics> {
        let src = diagnostic::Source::new(path, text);
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let key = diagnostic::key_from_message(e.message());
            Diagnostics::one(src.at(e.span(), &key, e.message().trim().to_string()))
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut diags = Vec::new();

        let server = build_server(&src, &base, raw.server.unwrap_or_default(), &mut diags);
        let engine = build_engine(&src, raw.engine.unwrap_or_default(), &mut diags);
        let auth = auth::build(&src, &base, raw.auth, &mut diags);
        let node = infra::build_node(&src, &base, raw.node.unwrap_or_default(), &mut diags);
        let infrastructure =
            infra::build_infrastructure(&src, raw.infrastructure.unwrap_or_default(), &mut diags);

        let mut components: Vec<ComponentConfig> = Vec::new();
        for (name, comp) in raw.components {
            let location = src.location(Some(name.span()));
            let name = name.into_inner();
            if let Some(c) =
                build_component(&src, &base, &name, location, comp.into_inner(), &mut diags)
            {
                components.push(c);
            }
        }
        // Components keep file order for predictable output.
        components.sort_by_key(|c| (c.location.line, c.location.column));

        for (i, a) in components.iter().enumerate() {
            for b in &components[..i] {
                if a.route == b.route {
                    diags.push(Diagnostic::new(
                        a.location.clone(),
                        format!("components.{}.route", a.name),
                        format!(
                            "route {} is already served by component {:?} (line {}); each route must be unique",
                            a.route, b.name, b.location.line
                        ),
                    ));
                }
            }
        }

        if diags.is_empty() {
            Ok(KeelConfig {
                path: path.to_path_buf(),
                server,
                engine,
                auth,
                node,
                infrastructure,
                components,
                regions: None,
            })
        } else {
            Err(Diagnostics(diags))
        }
    }

    /// Applies `keel up --edge/--regions` and, if the node belongs to a
    /// `regions.toml` deployment, loads it and takes the node's region from
    /// it. A region written in keel.toml must agree.
    pub fn place_node(
        &mut self,
        edge: Option<String>,
        regions: Option<PathBuf>,
    ) -> Result<(), Diagnostics> {
        if let Some(e) = edge {
            self.node.edge = e;
        }
        if let Some(r) = regions {
            self.node.regions = Some(r);
        }
        let Some(path) = self.node.regions.clone() else {
            return Ok(());
        };
        let topology = RegionsConfig::load(&path)?;
        let edge = &self.node.edge;
        let Some(region) = topology.region_of_edge(edge) else {
            let known: Vec<String> = topology
                .regions
                .iter()
                .flat_map(|r| r.edges.iter().map(|e| format!("{e:?}")))
                .collect();
            return Err(Diagnostics::one(Diagnostic::file(
                &path,
                format!(
                    "edge {edge:?} (this node) is not listed in any region; edges: {}",
                    known.join(", ")
                ),
            )));
        };
        if self.node.region_explicit && self.node.region != region.name {
            return Err(Diagnostics::one(Diagnostic::file(
                &self.path,
                format!(
                    "node.region is {:?} but {} puts edge {edge:?} in region {:?}; remove node.region or make them agree",
                    self.node.region,
                    path.display(),
                    region.name
                ),
            )));
        }
        self.node.region = region.name.clone();
        self.regions = Some(std::sync::Arc::new(topology));
        Ok(())
    }
}

fn build_server(
    src: &diagnostic::Source,
    base: &Path,
    raw: RawServer,
    diags: &mut Vec<Diagnostic>,
) -> ServerConfig {
    let mut s = ServerConfig {
        listen: "127.0.0.1:8080".parse().expect("literal address parses"),
        data_dir: base.join(".keel"),
        workers: 0,
        header_read_timeout: Duration::from_secs(10),
        max_header_bytes: 16 * 1024,
        max_body_bytes: 10 * 1024 * 1024,
        drain_timeout: Duration::from_secs(30),
    };
    if let Some(v) = raw.listen {
        match v.get_ref().parse() {
            Ok(a) => s.listen = a,
            Err(_) => diags.push(src.at(
                Some(v.span()),
                "server.listen",
                format!(
                    "{:?} is not a socket address; accepted: \"IP:PORT\" such as \"127.0.0.1:8080\" or \"[::]:80\"",
                    v.get_ref()
                ),
            )),
        }
    }
    if let Some(v) = raw.data_dir {
        s.data_dir = base.join(v.get_ref());
    }
    if let Some(v) = raw.workers {
        match usize::try_from(*v.get_ref()) {
            Ok(n) if n <= 1024 => s.workers = n,
            _ => diags.push(src.at(
                Some(v.span()),
                "server.workers",
                "accepted: 0 (one per core) to 1024".into(),
            )),
        }
    }
    if let Some(v) = raw.header_read_timeout
        && let Some(d) = duration(src, &v, "server.header-read-timeout", diags)
    {
        s.header_read_timeout = d;
    }
    if let Some(v) = raw.drain_timeout
        && let Some(d) = duration(src, &v, "server.drain-timeout", diags)
    {
        s.drain_timeout = d;
    }
    if let Some(v) = raw.max_header_bytes
        && let Some(n) = size(src, &v, "server.max-header-bytes", diags)
    {
        if !(1024..=1024 * 1024).contains(&n) {
            diags.push(src.at(
                Some(v.span()),
                "server.max-header-bytes",
                "accepted: 1KiB to 1MiB".into(),
            ));
        } else {
            s.max_header_bytes = n as usize;
        }
    }
    if let Some(v) = raw.max_body_bytes
        && let Some(n) = size(src, &v, "server.max-body-bytes", diags)
    {
        s.max_body_bytes = n;
    }
    s
}

fn build_engine(
    src: &diagnostic::Source,
    raw: RawEngine,
    diags: &mut Vec<Diagnostic>,
) -> EngineConfig {
    let mut e = EngineConfig {
        guard_pages: false,
        keep_resident: 4 * 1024 * 1024,
    };
    if let Some(g) = raw.guard_pages {
        e.guard_pages = g;
    }
    if let Some(v) = raw.keep_resident
        && let Some(n) = size(src, &v, "engine.keep-resident", diags)
    {
        e.keep_resident = n;
    }
    e
}

fn build_component(
    src: &diagnostic::Source,
    base: &Path,
    name: &str,
    location: Location,
    raw: RawComponent,
    diags: &mut Vec<Diagnostic>,
) -> Option<ComponentConfig> {
    let key = |k: &str| format!("components.{name}.{k}");
    let before = diags.len();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        diags.push(Diagnostic::new(
            location.clone(),
            format!("components.{name}"),
            "component names use lowercase letters, digits, '-' and '_'".into(),
        ));
    }
    let wasm_location = src.location(Some(raw.wasm.span()));
    let wasm = base.join(raw.wasm.get_ref());
    if !wasm.is_file() {
        diags.push(src.at(
            Some(raw.wasm.span()),
            &key("wasm"),
            format!(
                "file {} not found (relative paths resolve against the directory of {}); build guests with `make guests`",
                wasm.display(),
                src.path.display()
            ),
        ));
    }
    let route = match Route::parse(raw.route.get_ref()) {
        Ok(r) if r.is_reserved() => {
            diags.push(src.at(
                Some(raw.route.span()),
                &key("route"),
                format!(
                    "route {r} is reserved for the host ({}); choose another path",
                    RESERVED_ROUTE_PREFIXES.join(", ")
                ),
            ));
            None
        }
        Ok(r) => Some(r),
        Err(m) => {
            diags.push(src.at(Some(raw.route.span()), &key("route"), m));
            None
        }
    };
    let grants = raw
        .grants
        .iter()
        .map(|g| Grant {
            name: g.get_ref().clone(),
            location: src.location(Some(g.span())),
        })
        .collect();
    let mut allowed = Vec::new();
    for h in &raw.allowed_outbound_hosts {
        let v = h.get_ref();
        let ok = v == "*"
            || ((v.starts_with("http://") || v.starts_with("https://"))
                && !v
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .is_empty()
                && !v
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .contains('/'));
        if ok {
            allowed.push(v.clone());
        } else {
            diags.push(src.at(
                Some(h.span()),
                &key("allowed-outbound-hosts"),
                format!("{v:?} is not an origin; accepted: \"https://host\", \"http://host:port\" or \"*\""),
            ));
        }
    }
    let mut limits = Limits::default();
    if let Some(l) = raw.limits {
        if let Some(v) = l.memory
            && let Some(n) = size(src, &v, &key("limits.memory"), diags)
        {
            if !(64 * 1024..=4 * 1024 * 1024 * 1024).contains(&n) {
                diags.push(src.at(
                    Some(v.span()),
                    &key("limits.memory"),
                    "accepted: 64KiB to 4GiB".into(),
                ));
            } else {
                limits.memory = n;
            }
        }
        if let Some(v) = l.timeout
            && let Some(d) = duration(src, &v, &key("limits.timeout"), diags)
        {
            if d < Duration::from_millis(10) {
                diags.push(src.at(
                    Some(v.span()),
                    &key("limits.timeout"),
                    "accepted: at least 10ms".into(),
                ));
            } else {
                limits.timeout = d;
            }
        }
        let mut count = |v: Option<Spanned<i64>>, k: &str, max: i64, out: &mut u32| {
            if let Some(v) = v {
                match *v.get_ref() {
                    n if (1..=max).contains(&n) => *out = n as u32,
                    _ => diags.push(src.at(
                        Some(v.span()),
                        &key(k),
                        format!("accepted: an integer from 1 to {max}"),
                    )),
                }
            }
        };
        count(
            l.max_instances,
            "limits.max-instances",
            10_000,
            &mut limits.max_instances,
        );
        count(
            l.max_table_elements,
            "limits.max-table-elements",
            10_000_000,
            &mut limits.max_table_elements,
        );
        count(
            l.max_core_instances,
            "limits.max-core-instances",
            1_000,
            &mut limits.max_core_instances,
        );
    }
    let personal_data = build_personal_data(src, name, raw.personal_data, diags);
    let env = build_env(src, name, raw.env, diags);
    let live_channels = build_live(src, name, raw.live, diags);
    if diags.len() > before {
        return None;
    }
    Some(ComponentConfig {
        name: name.to_string(),
        wasm,
        route: route?,
        grants,
        allowed_outbound_hosts: allowed,
        limits,
        personal_data,
        env,
        live_channels,
        location,
        wasm_location,
    })
}

/// Variables a component may have, and bytes of one value.
const MAX_ENV_VARS: usize = 64;
const MAX_ENV_VALUE_BYTES: usize = 64 * 1024;

fn build_env(
    src: &diagnostic::Source,
    name: &str,
    raw: BTreeMap<String, Spanned<toml::Value>>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<EnvVar> {
    let mut out = Vec::new();
    if raw.len() > MAX_ENV_VARS {
        diags.push(Diagnostic::new(
            src.location(None),
            format!("components.{name}.env"),
            format!("{} variables; at most {MAX_ENV_VARS}", raw.len()),
        ));
        return out;
    }
    for (var, value) in raw {
        let key = format!("components.{name}.env.{var}");
        let span = Some(value.span());
        let valid_name = var.len() <= 128
            && var.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            diags.push(src.at(
                span,
                &key,
                "variable names are letters, digits and '_', not starting with a digit (at most 128)".into(),
            ));
            continue;
        }
        let source = match value.get_ref() {
            toml::Value::String(v) if v.len() <= MAX_ENV_VALUE_BYTES => EnvSource::Value(v.clone()),
            toml::Value::String(v) => {
                diags.push(src.at(
                    span,
                    &key,
                    format!("{} bytes; at most {MAX_ENV_VALUE_BYTES}", v.len()),
                ));
                continue;
            }
            toml::Value::Table(t)
                if t.len() == 1
                    && let Some(toml::Value::String(host)) = t.get("from-env")
                    && !host.is_empty() =>
            {
                EnvSource::Host(host.clone())
            }
            _ => {
                diags.push(src.at(
                    span,
                    &key,
                    "accepted: a string, or { from-env = \"HOST_VARIABLE\" }".into(),
                ));
                continue;
            }
        };
        out.push(EnvVar {
            name: var,
            source,
            location: src.location(span),
        });
    }
    out
}

fn build_live(
    src: &diagnostic::Source,
    name: &str,
    raw: Option<RawLive>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<LiveChannel> {
    let mut out = Vec::new();
    let key = format!("components.{name}.live.channels");
    for c in raw.map(|r| r.channels).unwrap_or_default() {
        let v = c.get_ref();
        let literal = v.replacen("{user}", "u", 1);
        let body = literal.strip_suffix('*').unwrap_or(&literal);
        let ok = !body.is_empty()
            && v.matches("{user}").count() <= 1
            && v.len() <= MAX_LIVE_CHANNEL_BYTES
            && body.bytes().all(is_live_channel_byte);
        if ok {
            out.push(LiveChannel(v.clone()));
        } else {
            diags.push(src.at(
                Some(c.span()),
                &key,
                format!(
                    "{v:?} is not a channel pattern; accepted: up to {MAX_LIVE_CHANNEL_BYTES} bytes of A-Z a-z 0-9 _ . : @ / -, at most one {{user}} (the signed-in user) and an optional final * (e.g. \"user/{{user}}\", \"room/*\")"
                ),
            ));
        }
    }
    out
}

fn build_personal_data(
    src: &diagnostic::Source,
    name: &str,
    raw: Option<RawPersonalData>,
    diags: &mut Vec<Diagnostic>,
) -> PersonalData {
    let mut out = PersonalData::default();
    let Some(raw) = raw else {
        return out;
    };
    let key = |k: &str| format!("components.{name}.personal-data.{k}");
    for t in raw.keys {
        let v = t.get_ref();
        let why = if v.matches("{user}").count() != 1 {
            Some("must contain {user} exactly once")
        } else if v.ends_with("{user}") {
            // "user/{user}" would also cover user "bob" when erasing "bo".
            Some("must not end with {user}: end it with a separator, e.g. \"profile/{user}/\"")
        } else if v.len() > 1024 {
            Some("at most 1024 bytes")
        } else {
            None
        };
        match why {
            Some(why) => diags.push(src.at(
                Some(t.span()),
                &key("keys"),
                format!("{v:?} {why}; accepted: key prefixes such as \"profile/{{user}}/\""),
            )),
            None => out.keys.push(v.clone()),
        }
    }
    let ident = |s: &str| {
        s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    for c in raw.sql {
        match c.get_ref().split_once('.') {
            Some((table, column)) if ident(table) && ident(column) => {
                out.sql.push(SqlUserColumn {
                    table: table.to_string(),
                    column: column.to_string(),
                })
            }
            _ => diags.push(src.at(
                Some(c.span()),
                &key("sql"),
                format!(
                    "{:?} is not \"<table>.<column>\"; accepted: identifiers of letters, digits and '_', e.g. \"notes.owner\"",
                    c.get_ref()
                ),
            )),
        }
    }
    out
}

fn duration(
    src: &diagnostic::Source,
    v: &Spanned<String>,
    key: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<Duration> {
    match parse_duration(v.get_ref()) {
        Ok(d) => Some(d),
        Err(m) => {
            diags.push(src.at(Some(v.span()), key, m));
            None
        }
    }
}

fn size(
    src: &diagnostic::Source,
    v: &Spanned<String>,
    key: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<u64> {
    match parse_size(v.get_ref()) {
        Ok(n) => Some(n),
        Err(m) => {
            diags.push(src.at(Some(v.span()), key, m));
            None
        }
    }
}

#[cfg(test)]
mod tests;
