//! nats-server 2.15 configs for every server of a topology.

use crate::credentials::{
    GATEWAY_USER, GLOBAL_ACCOUNT, ROUTE_USER, SYS_ACCOUNT, edge_global_user, edge_user, password,
    region_account, sys_user,
};
use keel_config::{NatsServerAddr, Region, RegionsConfig, Residency};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// The subject prefix of global traffic, exported by [`GLOBAL_ACCOUNT`].
const GLOBAL_SUBJECTS: &str = "keel.global.>";

/// One server's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedServer {
    pub region: String,
    /// `<region>-<n>`, `n` counting the region's servers from 1.
    pub server_name: String,
    pub addr: NatsServerAddr,
    /// `<regions.nats.store_dir>/<server_name>`.
    pub store_dir: PathBuf,
    /// The config file's text (nats-server 2.15 syntax). Holds passwords.
    pub config: String,
}

impl RenderedServer {
    /// `<server_name>.conf`, the file [`write`] puts it in.
    pub fn file_name(&self) -> String {
        format!("{}.conf", self.server_name)
    }
}

/// The `server_name` of the region's server at `index` (0-based position in
/// [`Region::servers`]): `<region>-<index + 1>`.
pub fn server_name(region: &str, index: usize) -> String {
    format!("{region}-{}", index + 1)
}

/// A quoted config string. nats-server's config syntax accepts JSON
/// strings (and treats quoted strings literally: no `$VAR` expansion).
fn q(s: &str) -> String {
    // Serialising a `str` to JSON cannot fail.
    serde_json::to_string(s).expect("a str serialises to JSON")
}

/// `host:port`, with brackets around an IPv6 literal.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Problems that would make [`render`]'s output refused by nats-server or
/// leak across residency zones; empty when the topology can be rendered.
/// `keel topology` refuses to render when there are any.
pub fn validate(regions: &RegionsConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if regions.regions.is_empty() {
        problems.push("no regions: nothing to render".to_string());
    }
    let bad_name = |n: &str| {
        n.is_empty()
            || n.chars()
                .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
    };
    for r in &regions.regions {
        if bad_name(&r.name) {
            problems.push(format!(
                "region {:?}: not usable in NATS subjects (empty, or contains '.', '*', '>', \
                 whitespace or control characters)",
                r.name
            ));
        }
        for e in &r.edges {
            if bad_name(e) {
                problems.push(format!(
                    "edge {e:?} of region {}: not usable as a NATS user or subject token \
                     (empty, or contains '.', '*', '>', whitespace or control characters)",
                    r.name
                ));
            }
        }
        if r.servers.is_empty() {
            problems.push(format!("region {}: no NATS servers", r.name));
        }
        // Users of one server must be unique across its accounts.
        let mut users: BTreeMap<String, usize> = BTreeMap::new();
        for u in region_users(r) {
            *users.entry(u).or_default() += 1;
        }
        for (u, n) in users {
            if n > 1 {
                problems.push(format!(
                    "region {}: NATS user {u:?} would be defined {n} times (edge names, \
                     `global-<edge>` and `sys-<region>` share one namespace)",
                    r.name
                ));
            }
        }
    }
    // Accounts: two regions share one only when they are in the same
    // `us` or `gdpr` zone.
    for (i, a) in regions.regions.iter().enumerate() {
        let acc = region_account(regions, &a.name);
        if acc == SYS_ACCOUNT || acc == GLOBAL_ACCOUNT {
            problems.push(format!(
                "region {}: its account would be {acc}, which is reserved",
                a.name
            ));
        }
        for b in &regions.regions[i + 1..] {
            let same_zone = a.data_residency == b.data_residency
                && matches!(a.data_residency, Residency::Us | Residency::Gdpr);
            if !same_zone && region_account(regions, &b.name) == acc {
                problems.push(format!(
                    "regions {} ({}) and {} ({}) would share account {acc}: rename one",
                    a.name,
                    a.data_residency.as_str(),
                    b.name,
                    b.data_residency.as_str()
                ));
            }
        }
    }
    // Every listening address once.
    let mut seen: BTreeMap<(String, u16), String> = BTreeMap::new();
    for r in &regions.regions {
        for (i, s) in r.servers.iter().enumerate() {
            let name = server_name(&r.name, i);
            for (what, port) in [
                ("client", s.client_port),
                ("cluster", s.cluster_port),
                ("gateway", s.gateway_port),
                ("monitor", s.monitor_port),
            ] {
                let here = format!("{name} {what} port");
                if let Some(prev) = seen.insert((s.host.clone(), port), here.clone()) {
                    problems.push(format!(
                        "{}: used twice ({prev}, {here})",
                        host_port(&s.host, port)
                    ));
                }
            }
        }
    }
    problems
}

/// Every user the configs of `region`'s servers define.
fn region_users(region: &Region) -> impl Iterator<Item = String> + '_ {
    std::iter::once(sys_user(&region.name)).chain(
        region
            .edges
            .iter()
            .flat_map(|e| [edge_user(e), edge_global_user(e)]),
    )
}

/// A zone's account and the regions in it, in file order of first
/// appearance.
struct Zone<'a> {
    account: String,
    regions: Vec<&'a Region>,
}

fn zones(regions: &RegionsConfig) -> Vec<Zone<'_>> {
    let mut out: Vec<Zone<'_>> = Vec::new();
    for r in &regions.regions {
        let account = region_account(regions, &r.name);
        match out.iter_mut().find(|z| z.account == account) {
            Some(z) => z.regions.push(r),
            None => out.push(Zone {
                account,
                regions: vec![r],
            }),
        }
    }
    out
}

/// JetStream API subjects only a region's coordinator may publish to.
const STREAM_ADMIN_SUBJECTS: &[&str] = &[
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.RESTORE.>",
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.ACCOUNT.STREAM.MOVE.>",
];

fn api_subject(region: &str) -> String {
    format!("keel.{region}.api.>")
}

/// Renders the config of every server of every region (regions in file
/// order, servers in file order). Deterministic: the same topology and
/// secret give the same text. Check the topology with [`validate`] first.
///
/// A topology of exactly one server has no `cluster` block (nats-server's
/// JetStream would wait for the missing route peer forever); one region has
/// no `gateway` block.
pub fn render(regions: &RegionsConfig, secret: &[u8]) -> Vec<RenderedServer> {
    let total_servers: usize = regions.regions.iter().map(|r| r.servers.len()).sum();
    let zones = zones(regions);
    let mut out = Vec::with_capacity(total_servers);
    for region in &regions.regions {
        let accounts = render_accounts(regions, &zones, region, secret);
        for (i, addr) in region.servers.iter().enumerate() {
            let name = server_name(&region.name, i);
            let store_dir = regions.nats.store_dir.join(&name);
            let mut c = String::new();
            render_server(
                &mut c,
                regions,
                region,
                &name,
                addr,
                &store_dir,
                total_servers,
                secret,
            );
            c.push_str(&accounts);
            out.push(RenderedServer {
                region: region.name.clone(),
                server_name: name,
                addr: addr.clone(),
                store_dir,
                config: c,
            });
        }
    }
    out
}

/// Everything before `accounts`: identity, listeners, JetStream, cluster,
/// gateways.
#[allow(clippy::too_many_arguments)]
fn render_server(
    c: &mut String,
    regions: &RegionsConfig,
    region: &Region,
    name: &str,
    addr: &NatsServerAddr,
    store_dir: &Path,
    total_servers: usize,
    secret: &[u8],
) {
    let zone = regions
        .zone_of(&region.name)
        .unwrap_or_else(|| region.name.clone());
    let _ = writeln!(
        c,
        "# {name}: NATS server of region {} (zone {zone}, account {}).\n\
         # Generated by `keel topology` from {}; regenerate instead of editing.\n\
         # Holds passwords: keep it readable by the nats-server user only.",
        region.name,
        region_account(regions, &region.name),
        regions.path.display()
    );
    let _ = writeln!(c, "server_name: {}", q(name));
    let _ = writeln!(c, "listen: {}", q(&host_port(&addr.host, addr.client_port)));
    let _ = writeln!(c, "http: {}", q(&host_port(&addr.host, addr.monitor_port)));
    let _ = writeln!(
        c,
        "server_tags: [{}, {}]",
        q(&format!("region:{}", region.name)),
        q(&format!("zone:{zone}"))
    );
    let _ = writeln!(c, "jetstream {{");
    let _ = writeln!(c, "  store_dir: {}", q(&store_dir.to_string_lossy()));
    let _ = writeln!(c, "}}");

    if total_servers > 1 {
        let route_pw = password(secret, ROUTE_USER);
        let _ = writeln!(c, "cluster {{");
        let _ = writeln!(c, "  name: {}", q(&region.name));
        let _ = writeln!(
            c,
            "  listen: {}",
            q(&host_port(&addr.host, addr.cluster_port))
        );
        let _ = writeln!(
            c,
            "  authorization {{ user: {}, password: {} }}",
            q(ROUTE_USER),
            q(&route_pw)
        );
        let _ = writeln!(c, "  routes: [");
        for s in &region.servers {
            let url = format!(
                "nats-route://{ROUTE_USER}:{route_pw}@{}",
                host_port(&s.host, s.cluster_port)
            );
            let _ = writeln!(c, "    {}", q(&url));
        }
        let _ = writeln!(c, "  ]");
        let _ = writeln!(c, "}}");
    }

    if regions.regions.len() > 1 {
        let gw_pw = password(secret, GATEWAY_USER);
        let _ = writeln!(c, "gateway {{");
        let _ = writeln!(c, "  name: {}", q(&region.name));
        let _ = writeln!(
            c,
            "  listen: {}",
            q(&host_port(&addr.host, addr.gateway_port))
        );
        let _ = writeln!(c, "  reject_unknown_cluster: true");
        let _ = writeln!(
            c,
            "  authorization {{ user: {}, password: {} }}",
            q(GATEWAY_USER),
            q(&gw_pw)
        );
        let _ = writeln!(c, "  gateways: [");
        for r in &regions.regions {
            let urls: Vec<String> = r
                .servers
                .iter()
                .map(|s| {
                    q(&format!(
                        "nats://{GATEWAY_USER}:{gw_pw}@{}",
                        host_port(&s.host, s.gateway_port)
                    ))
                })
                .collect();
            let _ = writeln!(
                c,
                "    {{ name: {}, urls: [{}] }}",
                q(&r.name),
                urls.join(", ")
            );
        }
        let _ = writeln!(c, "  ]");
        let _ = writeln!(c, "}}");
    }
}

/// `system_account` and the `accounts` block of `region`'s servers. The
/// accounts are the same on every server; only the users differ: a
/// server defines the users of its own region only.
fn render_accounts(
    regions: &RegionsConfig,
    zones: &[Zone<'_>],
    region: &Region,
    secret: &[u8],
) -> String {
    let user = |name: &str| {
        format!(
            "{{ user: {}, password: {} }}",
            q(name),
            q(&password(secret, name))
        )
    };
    let mut c = String::new();
    let _ = writeln!(c, "system_account: {}", q(SYS_ACCOUNT));
    let _ = writeln!(c, "accounts {{");

    // SYS: restricted users, or they receive other accounts' JetStream API
    // answers across the super-cluster.
    let sys = sys_user(&region.name);
    let _ = writeln!(c, "  {}: {{", q(SYS_ACCOUNT));
    let _ = writeln!(c, "    users: [");
    let _ = writeln!(
        c,
        "      {{ user: {}, password: {}, permissions: {{ publish: {{ allow: [{}, {}] }}, \
         subscribe: {{ allow: [{}, {}] }} }} }}",
        q(&sys),
        q(&password(secret, &sys)),
        q("$SYS.REQ.>"),
        q("_INBOX.>"),
        q("$SYS.>"),
        q("_INBOX.>")
    );
    let _ = writeln!(c, "    ]");
    let _ = writeln!(c, "  }}");

    // GLOBAL: only global, non-personal data; JetStream for global KV.
    let _ = writeln!(c, "  {}: {{", q(GLOBAL_ACCOUNT));
    let _ = writeln!(c, "    jetstream: enabled");
    let _ = writeln!(c, "    exports: [");
    let _ = writeln!(c, "      {{ stream: {} }}", q(GLOBAL_SUBJECTS));
    let _ = writeln!(c, "    ]");
    let _ = writeln!(c, "    users: [");
    for e in &region.edges {
        let _ = writeln!(c, "      {}", user(&edge_global_user(e)));
    }
    let _ = writeln!(c, "    ]");
    let _ = writeln!(c, "  }}");

    // One account per zone, users only on its own regions' servers.
    let own = region_account(regions, &region.name);
    for z in zones {
        let _ = writeln!(c, "  {}: {{", q(&z.account));
        let _ = writeln!(
            c,
            "    # Replication (Raft) traffic of this account's streams stays in it."
        );
        let _ = writeln!(c, "    jetstream: {{ cluster_traffic: {} }}", q("owner"));
        let _ = writeln!(c, "    exports: [");
        for r in &z.regions {
            let _ = writeln!(c, "      {{ service: {} }}", q(&api_subject(&r.name)));
        }
        let _ = writeln!(c, "    ]");
        let _ = writeln!(c, "    imports: [");
        let _ = writeln!(
            c,
            "      {{ stream: {{ account: {}, subject: {} }} }}",
            q(GLOBAL_ACCOUNT),
            q(GLOBAL_SUBJECTS)
        );
        for other in zones.iter().filter(|o| o.account != z.account) {
            for r in &other.regions {
                let _ = writeln!(
                    c,
                    "      {{ service: {{ account: {}, subject: {} }} }}",
                    q(&other.account),
                    q(&api_subject(&r.name))
                );
            }
        }
        let _ = writeln!(c, "    ]");
        if z.account == own {
            let _ = writeln!(c, "    users: [");
            for e in &region.edges {
                if *e == region.coordinator {
                    // The coordinator creates the region's streams and
                    // buckets (always placed on the region's cluster).
                    let _ = writeln!(c, "      {}", user(&edge_user(e)));
                } else {
                    // JetStream does not enforce placement per account, so
                    // only the coordinator may create, change or move
                    // streams: no other edge can place zone data elsewhere.
                    let deny: Vec<String> = STREAM_ADMIN_SUBJECTS.iter().map(|s| q(s)).collect();
                    let _ = writeln!(
                        c,
                        "      {{ user: {}, password: {}, permissions: {{ publish: {{ allow: [{}], deny: [{}] }} }} }}",
                        q(&edge_user(e)),
                        q(&password(secret, &edge_user(e))),
                        q(">"),
                        deny.join(", ")
                    );
                }
            }
            let _ = writeln!(c, "    ]");
        }
        let _ = writeln!(c, "  }}");
    }
    let _ = writeln!(c, "}}");
    c
}

/// Writes `<dir>/<server_name>.conf` for every server and `<dir>/README.txt`
/// (servers, ports, how to start them), each atomically (temporary file,
/// fsync, rename) and, on Unix, readable by the owner only (the configs
/// hold passwords). Creates `dir` if needed. Returns the paths written: the
/// configs in order, then the README.
pub fn write(dir: &Path, rendered: &[RenderedServer]) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::with_capacity(rendered.len() + 1);
    for s in rendered {
        let path = dir.join(s.file_name());
        write_atomic(&path, s.config.as_bytes())?;
        written.push(path);
    }
    let readme = dir.join("README.txt");
    write_atomic(&readme, readme_text(rendered).as_bytes())?;
    written.push(readme);
    Ok(written)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let result = (|| {
        let mut f = options.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn readme_text(rendered: &[RenderedServer]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "NATS server configs generated by `keel topology`.\n\
         \n\
         One NATS cluster per region, joined by gateways. Accounts per residency zone keep\n\
         personal data inside its zone: a zone's users exist only in its own servers' configs.\n\
         Every password is derived from the secret in the regions' `secret_env` variable;\n\
         the .conf files hold passwords, so keep them readable by the nats-server user only.\n\
         Regenerate (same regions.toml, same secret) instead of editing them.\n"
    );
    let regions: BTreeSet<&str> = rendered.iter().map(|s| s.region.as_str()).collect();
    let _ = writeln!(
        t,
        "{} server(s) in {} region(s):\n",
        rendered.len(),
        regions.len()
    );
    let width = |f: fn(&RenderedServer) -> usize, title: &str| {
        rendered.iter().map(f).max().unwrap_or(0).max(title.len())
    };
    let (sw, rw, hw) = (
        width(|s| s.server_name.len(), "server"),
        width(|s| s.region.len(), "region"),
        width(|s| s.addr.host.len(), "host"),
    );
    let _ = writeln!(
        t,
        "{:<sw$}  {:<rw$}  {:<hw$}  {:>6}  {:>7}  {:>7}  {:>7}  store_dir",
        "server", "region", "host", "client", "cluster", "gateway", "monitor"
    );
    for s in rendered {
        let _ = writeln!(
            t,
            "{:<sw$}  {:<rw$}  {:<hw$}  {:>6}  {:>7}  {:>7}  {:>7}  {}",
            s.server_name,
            s.region,
            s.addr.host,
            s.addr.client_port,
            s.addr.cluster_port,
            s.addr.gateway_port,
            s.addr.monitor_port,
            s.store_dir.display()
        );
    }
    let _ = writeln!(
        t,
        "\nStart each server on its host (nats-server 2.11 or newer; generated for 2.15):\n"
    );
    for s in rendered {
        let _ = writeln!(t, "  nats-server -c {}", s.file_name());
    }
    let _ = writeln!(
        t,
        "\nCheck a file without starting it: nats-server -t -c <file>.\n\
         Health: http://<host>:<monitor>/healthz; gateways: /gatewayz; routes: /routez."
    );
    t
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use keel_config::{
        CacheTier, ConsensusProtocol, Coordination, GlobalEventStream, Location, NatsTopology,
        PartitionTolerance, RegionalDatabase,
    };

    /// A topology with `(name, class, servers, edges)` per region, on
    /// documentation-style ports (not bound by these tests).
    pub(crate) fn sample(spec: &[(&str, Residency, usize, &[&str])]) -> RegionsConfig {
        let mut next = 0u16;
        let regions = spec
            .iter()
            .map(|(name, class, servers, edges)| Region {
                name: (*name).to_string(),
                edges: edges.iter().map(|e| (*e).to_string()).collect(),
                coordinator: edges[0].to_string(),
                database: RegionalDatabase::Nats,
                cache_tier: CacheTier::Nats,
                data_residency: *class,
                compliance: vec![],
                servers: (0..*servers)
                    .map(|_| {
                        next += 1;
                        NatsServerAddr {
                            host: "127.0.0.1".into(),
                            client_port: 4200 + next,
                            cluster_port: 6200 + next,
                            gateway_port: 7200 + next,
                            monitor_port: 8200 + next,
                        }
                    })
                    .collect(),
                location: Location {
                    file: "regions.toml".into(),
                    line: 1,
                    column: 1,
                },
            })
            .collect();
        RegionsConfig {
            path: "regions.toml".into(),
            regions,
            coordination: Coordination {
                global_event_stream: GlobalEventStream::NatsGateways,
                consensus_protocol: ConsensusProtocol::Raft,
                partition_tolerance: PartitionTolerance::Ap,
                allow_cross_zone_migration: false,
            },
            nats: NatsTopology {
                secret_env: "KEEL_NATS_SECRET".into(),
                store_dir: "/var/lib/keel/nats".into(),
            },
        }
    }

    pub(crate) fn three_regions() -> RegionsConfig {
        sample(&[
            ("us-west", Residency::Us, 1, &["sfo", "lax"]),
            ("eu-central", Residency::Gdpr, 3, &["fra", "ams"]),
            ("ap-south", Residency::Local, 1, &["bom", "del"]),
        ])
    }

    /// The lines of account `name`'s block in `config` (without the
    /// opening and closing line).
    fn account_block<'a>(config: &'a str, name: &str) -> Vec<&'a str> {
        let open = format!("  {}: {{", q(name));
        let mut lines = config.lines().skip_while(|l| *l != open);
        assert!(lines.next().is_some(), "no account {name} in\n{config}");
        lines.take_while(|l| *l != "  }").collect()
    }

    /// User names defined in account `name` of `config`.
    fn users_of(config: &str, name: &str) -> Vec<String> {
        account_block(config, name)
            .iter()
            .filter_map(|l| {
                let rest = l.trim().strip_prefix("{ user: \"")?;
                Some(rest.split('"').next()?.to_string())
            })
            .collect()
    }

    #[test]
    fn rendering_is_deterministic_and_names_servers_per_region() {
        let r = three_regions();
        let a = render(&r, b"secret");
        assert_eq!(a, render(&r, b"secret"));
        let names: Vec<&str> = a.iter().map(|s| s.server_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "us-west-1",
                "eu-central-1",
                "eu-central-2",
                "eu-central-3",
                "ap-south-1"
            ]
        );
        assert_eq!(a[2].region, "eu-central");
        assert_eq!(a[2].addr, r.regions[1].servers[1]);
        assert_eq!(
            a[2].store_dir,
            PathBuf::from("/var/lib/keel/nats/eu-central-2")
        );
        // Another secret changes every password and nothing else.
        let b = render(&r, b"other");
        assert_ne!(a[0].config, b[0].config);
        assert!(!b[0].config.contains(&password(b"secret", "sfo")));
    }

    #[test]
    fn server_block_has_identity_tags_cluster_and_gateways() {
        let r = three_regions();
        let s = render(&r, b"k");
        let eu2 = &s[2].config;
        for line in [
            "server_name: \"eu-central-2\"",
            "listen: \"127.0.0.1:4203\"",
            "http: \"127.0.0.1:8203\"",
            "server_tags: [\"region:eu-central\", \"zone:gdpr\"]",
            "  store_dir: \"/var/lib/keel/nats/eu-central-2\"",
            "  name: \"eu-central\"",
            "  listen: \"127.0.0.1:6203\"",
            "  listen: \"127.0.0.1:7203\"",
            "  reject_unknown_cluster: true",
            "system_account: \"SYS\"",
        ] {
            assert!(eu2.lines().any(|l| l == line), "no {line:?} in\n{eu2}");
        }
        let route_pw = password(b"k", "route");
        for port in [6202, 6203, 6204] {
            let url = format!("    \"nats-route://route:{route_pw}@127.0.0.1:{port}\"");
            assert!(eu2.lines().any(|l| l == url), "no {url} in\n{eu2}");
        }
        let gw_pw = password(b"k", "gateway");
        let eu_gw = format!(
            "    {{ name: \"eu-central\", urls: [\"nats://gateway:{gw_pw}@127.0.0.1:7202\", \
             \"nats://gateway:{gw_pw}@127.0.0.1:7203\", \"nats://gateway:{gw_pw}@127.0.0.1:7204\"] }}"
        );
        assert!(eu2.contains(&eu_gw), "{eu2}");
        assert!(eu2.contains(&format!(
            "{{ name: \"ap-south\", urls: [\"nats://gateway:{gw_pw}@127.0.0.1:7205\"] }}"
        )));
        assert_eq!(
            s[4].config
                .matches("server_tags: [\"region:ap-south\", \"zone:ap-south\"]")
                .count(),
            1
        );
    }

    #[test]
    fn single_region_has_no_gateway_and_single_server_no_cluster() {
        let one_region = sample(&[("eu-central", Residency::Gdpr, 3, &["fra"])]);
        for s in render(&one_region, b"k") {
            assert!(!s.config.contains("gateway {"), "{}", s.config);
            assert!(s.config.contains("cluster {"), "{}", s.config);
        }
        let one_server = sample(&[("solo", Residency::Local, 1, &["x"])]);
        let s = render(&one_server, b"k");
        assert_eq!(s.len(), 1);
        assert!(!s[0].config.contains("gateway {"), "{}", s[0].config);
        assert!(!s[0].config.contains("cluster {"), "{}", s[0].config);
        // Two 1-server regions: clusters (a gateway needs one) and gateways.
        let two = sample(&[
            ("a", Residency::Local, 1, &["x"]),
            ("b", Residency::Local, 1, &["y"]),
        ]);
        for s in render(&two, b"k") {
            assert!(s.config.contains("cluster {") && s.config.contains("gateway {"));
        }
    }

    #[test]
    fn zone_accounts_have_users_only_on_their_regions_servers() {
        let r = three_regions();
        for s in render(&r, b"k") {
            let (edges, own): (&[&str], &str) = match s.region.as_str() {
                "us-west" => (&["sfo", "lax"], "US"),
                "eu-central" => (&["fra", "ams"], "GDPR"),
                _ => (&["bom", "del"], "AP_SOUTH"),
            };
            for acc in ["US", "GDPR", "AP_SOUTH"] {
                let users = users_of(&s.config, acc);
                if acc == own {
                    assert_eq!(users, edges, "{}: {acc}", s.server_name);
                } else {
                    assert!(users.is_empty(), "{}: {acc} has {users:?}", s.server_name);
                    assert!(
                        !account_block(&s.config, acc)
                            .iter()
                            .any(|l| l.contains("users")),
                        "{}",
                        s.config
                    );
                }
                // Same accounts everywhere, replication traffic in the account.
                let block = account_block(&s.config, acc);
                assert!(block.contains(&"    jetstream: { cluster_traffic: \"owner\" }"));
                assert!(block.contains(
                    &"      { stream: { account: \"GLOBAL\", subject: \"keel.global.>\" } }"
                ));
            }
            let globals: Vec<String> = edges.iter().map(|e| format!("global-{e}")).collect();
            assert_eq!(users_of(&s.config, "GLOBAL"), globals);
            assert_eq!(
                users_of(&s.config, "SYS"),
                [format!("sys-{}", s.region)],
                "{}",
                s.config
            );
            let sys = account_block(&s.config, "SYS").join("\n");
            assert!(
                sys.contains(
                    "publish: { allow: [\"$SYS.REQ.>\", \"_INBOX.>\"] }, \
                     subscribe: { allow: [\"$SYS.>\", \"_INBOX.>\"] }"
                ),
                "{sys}"
            );
            for e in edges {
                assert!(s.config.contains(&password(b"k", e)));
            }
        }
        // Exports and imports of the GDPR account: its API out, the others' in.
        let eu = render(&r, b"k")[1].config.clone();
        let gdpr = account_block(&eu, "GDPR");
        assert!(gdpr.contains(&"      { service: \"keel.eu-central.api.>\" }"));
        assert!(
            gdpr.contains(
                &"      { service: { account: \"US\", subject: \"keel.us-west.api.>\" } }"
            )
        );
        assert!(gdpr.contains(
            &"      { service: { account: \"AP_SOUTH\", subject: \"keel.ap-south.api.>\" } }"
        ));
        assert!(!gdpr.iter().any(|l| l.contains("account: \"GDPR\"")));
        let global = account_block(&eu, "GLOBAL");
        assert!(global.contains(&"    jetstream: enabled"));
        assert!(global.contains(&"      { stream: \"keel.global.>\" }"));
    }

    #[test]
    fn regions_of_one_zone_share_its_account() {
        let r = sample(&[
            ("eu-central", Residency::Gdpr, 1, &["fra"]),
            ("eu-west", Residency::Gdpr, 1, &["dub"]),
            ("us-east", Residency::Us, 1, &["iad"]),
        ]);
        assert!(validate(&r).is_empty(), "{:?}", validate(&r));
        let s = render(&r, b"k");
        let west = &s[1].config;
        assert_eq!(users_of(west, "GDPR"), ["dub"]);
        let gdpr = account_block(west, "GDPR");
        assert!(gdpr.contains(&"      { service: \"keel.eu-central.api.>\" }"));
        assert!(gdpr.contains(&"      { service: \"keel.eu-west.api.>\" }"));
        let us = account_block(west, "US");
        assert!(us.contains(
            &"      { service: { account: \"GDPR\", subject: \"keel.eu-west.api.>\" } }"
        ));
        assert_eq!(
            west.matches("\n  \"GDPR\": {").count(),
            1,
            "one account per zone:\n{west}"
        );
    }

    #[test]
    fn validate_reports_collisions() {
        assert!(validate(&three_regions()).is_empty());
        // A local region called "us" would share the us zone's account.
        let r = sample(&[
            ("us", Residency::Local, 1, &["a"]),
            ("us-west", Residency::Us, 1, &["b"]),
        ]);
        let p = validate(&r);
        assert!(p.iter().any(|p| p.contains("share account US")), "{p:?}");
        let r = sample(&[("sys", Residency::Local, 1, &["a"])]);
        assert!(validate(&r).iter().any(|p| p.contains("reserved")));
        let r = sample(&[("x", Residency::Local, 1, &["a", "global-a"])]);
        assert!(validate(&r).iter().any(|p| p.contains("\"global-a\"")));
        let r = sample(&[("x.y", Residency::Local, 1, &["a b"])]);
        assert_eq!(validate(&r).len(), 2, "{:?}", validate(&r));
        let mut r = three_regions();
        r.regions[1].servers[2].monitor_port = r.regions[0].servers[0].client_port;
        let p = validate(&r);
        assert!(
            p.iter()
                .any(|p| p.contains("127.0.0.1:4201: used twice (us-west-1 client port")),
            "{p:?}"
        );
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        let mut r = sample(&[
            ("a", Residency::Local, 1, &["x"]),
            ("b", Residency::Local, 1, &["y"]),
        ]);
        r.regions[0].servers[0].host = "::1".into();
        let s = render(&r, b"k");
        assert!(s[0].config.contains("listen: \"[::1]:4201\""));
        assert!(s[1].config.contains("@[::1]:7201\""), "{}", s[1].config);
    }

    #[test]
    fn write_puts_each_config_and_a_readme_atomically() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("nats");
        let s = render(&three_regions(), b"k");
        let paths = write(&out, &s).expect("write");
        assert_eq!(paths.len(), 6);
        for (p, s) in paths.iter().zip(&s) {
            assert_eq!(p, &out.join(format!("{}.conf", s.server_name)));
            assert_eq!(std::fs::read_to_string(p).expect("read"), s.config);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = std::fs::metadata(p).expect("stat").permissions().mode();
                assert_eq!(mode & 0o777, 0o600);
            }
        }
        let readme = std::fs::read_to_string(&paths[5]).expect("readme");
        assert!(
            readme.contains("nats-server -c eu-central-3.conf"),
            "{readme}"
        );
        assert!(readme.contains("/var/lib/keel/nats/ap-south-1"), "{readme}");
        assert!(!readme.contains(&password(b"k", "sfo")));
        // Rewriting replaces, and leaves no temporary files behind.
        write(&out, &s).expect("rewrite");
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "README.txt",
                "ap-south-1.conf",
                "eu-central-1.conf",
                "eu-central-2.conf",
                "eu-central-3.conf",
                "us-west-1.conf"
            ]
        );
    }

    /// The real nats-server accepts every file in config-test mode.
    #[test]
    fn nats_server_accepts_every_rendered_config() {
        let binary = keel_test_support::nats_server_binary();
        let dir = tempfile::tempdir().expect("temp dir");
        let topologies = [
            ("three", three_regions()),
            (
                "one-region",
                sample(&[("eu-central", Residency::Gdpr, 3, &["fra", "ams"])]),
            ),
            (
                "one-server",
                sample(&[("solo", Residency::Local, 1, &["x"])]),
            ),
            (
                "shared-zone",
                sample(&[
                    ("eu-central", Residency::Gdpr, 2, &["fra"]),
                    ("eu-west", Residency::Gdpr, 1, &["dub"]),
                    ("anywhere", Residency::Global, 1, &["any"]),
                ]),
            ),
        ];
        for (name, mut r) in topologies {
            r.nats.store_dir = dir.path().join(name).join("js");
            let paths = write(&dir.path().join(name), &render(&r, b"k")).expect("write");
            for p in paths
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "conf"))
            {
                let out = std::process::Command::new(&binary)
                    .arg("-t")
                    .arg("-c")
                    .arg(p)
                    .output()
                    .expect("run nats-server -t");
                assert!(
                    out.status.success(),
                    "{name}: nats-server -t -c {} failed: {}{}\n{}",
                    p.display(),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    std::fs::read_to_string(p).unwrap_or_default()
                );
            }
        }
    }
}
