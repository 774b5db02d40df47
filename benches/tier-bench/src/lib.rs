//! The harness of the tier benchmarks (`regional-op`, `cache-bench`,
//! `ledger-bench`): a loopback super-cluster rendered from a regions.toml
//! as `keel topology` does (one or more nats-servers per region; optionally
//! with a fault proxy on every gateway link, to inject latency between
//! regions), release `keel up` nodes, keep-alive HTTP
//! clients, latency samples, and clean-up on exit, error, panic or signal
//! (keel nodes die with this process: `PR_SET_PDEATHSIG`). Every wait has a
//! deadline; a timeout fails with the nodes' logs. Nothing is asserted:
//! numbers go to BENCHMARKS.md.

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use keel_config::RegionsConfig;
use keel_test_support::{FaultProxy, NatsSupercluster, ServerSpec};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The environment variable regions.toml names for the deployment secret.
pub const SECRET_ENV: &str = "KEEL_TEST_NATS_SECRET";
pub const SECRET: &str = "tier-bench-secret";
/// Deadline for a node to print its address.
const START_DEADLINE: Duration = Duration::from_secs(120);
/// Deadline for a node's bus to connect.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// Unmeasured samples before each measurement.
pub const WARMUP: usize = 20;

/// Set by the first SIGINT/SIGTERM/SIGHUP: loops stop, guards clean up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted by a signal");
    }
    Ok(())
}

/// The first argument: how many samples (`default` without one).
pub fn samples_arg(program: &str, default: usize) -> anyhow::Result<usize> {
    let samples = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .with_context(|| format!("usage: {program} [samples]"))?
        .unwrap_or(default);
    anyhow::ensure!(samples > 0, "samples must be at least 1");
    Ok(samples)
}

/// `$<env>`, else `components/target/wasm/<name>.wasm`; it must exist.
pub fn guest_wasm(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    let wasm = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        keel_test_support::workspace_root().join(format!("components/target/wasm/{name}.wasm"))
    });
    anyhow::ensure!(
        wasm.is_file(),
        "{} is missing: run `make guests` (or set {env})",
        wasm.display()
    );
    Ok(wasm)
}

/// The demo topology (`keel-demo`, `chat-load`): 3 regions x 2 edges, the
/// first edge of each region its coordinator.
pub const DEMO_REGIONS: &[(&str, &[&str])] = &[
    ("us-east", &["nyc", "bos"]),
    ("eu-west", &["ams", "lon"]),
    ("ap-south", &["bom", "sin"]),
];
/// Every edge of [`DEMO_REGIONS`], region by region.
pub const DEMO_EDGES: &[&str] = &["nyc", "bos", "ams", "lon", "bom", "sin"];

/// The `[auth]` and `[components.chat]` tables of the demo's keel.toml: the
/// chat (`$KEEL_CHAT_WASM`, else `components/target/wasm/chat.wasm`) at
/// `/chat/...`, its tokens signed with `$KEEL_DEMO_JWT_SECRET` (which must
/// be set: the nodes inherit it).
pub fn chat_components() -> anyhow::Result<String> {
    let chat = guest_wasm("KEEL_CHAT_WASM", "chat")?;
    anyhow::ensure!(
        std::env::var_os("KEEL_DEMO_JWT_SECRET").is_some(),
        "set KEEL_DEMO_JWT_SECRET (the chat's token secret); `make demo` sets a development default"
    );
    Ok(format!(
        r#"[auth]
[[auth.keys]]
algorithm = "HS256"
secret-env = "KEEL_DEMO_JWT_SECRET"

[components.chat]
wasm = {:?}
route = "/chat/..."
grants = ["edge-operations", "regional-coordination", "global-coordination", "state", "sql", "live"]
[components.chat.env]
CHAT_JWT_SECRET = {{ from-env = "KEEL_DEMO_JWT_SECRET" }}
[components.chat.live]
channels = ["user/{{user}}", "room/*", "presence"]
[components.chat.personal-data]
keys = ["user/{{user}}/"]
sql = ["accounts.user", "messages.sender", "messages.recipient"]
"#,
        chat.display().to_string()
    ))
}

/// Runs a tier benchmark: a multi-thread runtime with signal handling, the
/// topology of `regions` (one nats-server each; with gateway proxies if
/// asked), a release node with `components` on each of `edges`, then
/// `body`. Afterwards the nodes' warnings go to stderr, and on failure the
/// servers' log tails too. Drops the nodes (keel killed), then the topology
/// (nats-servers killed, then its temp dir removed).
pub fn run_bench(
    name: &str,
    regions: &[(&str, &[&str])],
    gateway_proxies: bool,
    edges: &[&'static str],
    components: &str,
    body: impl AsyncFnOnce(&Topology, &[Node]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    run_bench_servers(name, regions, 1, gateway_proxies, edges, components, body)
}

/// [`run_bench`] with `servers` nats-servers per region (a cluster; 3 gives
/// the region's streams three replicas, as in production).
pub fn run_bench_servers(
    name: &str,
    regions: &[(&str, &[&str])],
    servers: usize,
    gateway_proxies: bool,
    edges: &[&'static str],
    components: &str,
    body: impl AsyncFnOnce(&Topology, &[Node]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let bin = keel_bin()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(watch_signals())?;
    let names: Vec<String> = regions
        .iter()
        .map(|(r, e)| format!("{r}: {}", e.join(", ")))
        .collect();
    eprintln!(
        "== nats: {} regions x {servers} server{} ({}){}",
        regions.len(),
        if servers == 1 { "" } else { "s" },
        names.join("; "),
        if gateway_proxies {
            ", gateways through fault proxies"
        } else {
            ""
        }
    );
    let topology = Topology::start_servers(name, regions, servers, gateway_proxies)?;
    check_interrupted()?;
    let mut nodes = Vec::new();
    for edge in edges {
        eprintln!("== keel {edge} ({})", bin.display());
        nodes.push(Node::start(&bin, &topology, edge, components)?);
        check_interrupted()?;
    }
    let outcome = rt.block_on(body(&topology, &nodes));
    report_logs(&nodes);
    if outcome.is_err() && !INTERRUPTED.load(Ordering::Relaxed) {
        for s in topology.nats.servers() {
            eprintln!(
                "--- {} log ({}), last 30 lines:\n{}",
                s.server_name(),
                s.log_path().display(),
                s.log_tail(30)
            );
        }
    }
    outcome
}

/// `$KEEL_BIN`, else `$CARGO_TARGET_DIR/release/keel`, else the `keel` next
/// to this binary (both are built into the same release dir).
pub fn keel_bin() -> anyhow::Result<PathBuf> {
    let bin = match (
        std::env::var_os("KEEL_BIN"),
        std::env::var_os("CARGO_TARGET_DIR"),
    ) {
        (Some(b), _) => PathBuf::from(b),
        (None, Some(t)) => PathBuf::from(t).join("release/keel"),
        (None, None) => std::env::current_exe()?.with_file_name("keel"),
    };
    anyhow::ensure!(
        bin.is_file(),
        "{} is missing: `cargo build --release --workspace --bins` (or set KEEL_BIN)",
        bin.display()
    );
    Ok(bin)
}

/// The first signal stops the run at the next check (children and temp
/// dirs are cleaned up as `main` returns); a second one exits at once.
pub async fn watch_signals() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    for kind in [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
    ] {
        let mut s = signal(kind)?;
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if INTERRUPTED.swap(true, Ordering::Relaxed) {
                    eprintln!("second signal: exiting without cleanup");
                    std::process::exit(130);
                }
                eprintln!("signal: stopping after the current step and cleaning up");
            }
        });
    }
    Ok(())
}

/// regions.toml on disk and its running NATS servers.
pub struct Topology {
    pub regions: RegionsConfig,
    pub path: PathBuf,
    // Declared before `_dir`: the servers are killed before their store
    // (inside `_dir`) is removed.
    pub nats: NatsSupercluster,
    /// With gateway proxies: one per server, in front of its gateway port;
    /// every other region's server connects to it through this proxy.
    pub gateway_proxies: Vec<FaultProxy>,
    _dir: tempfile::TempDir,
}

/// `regions`: (name, edges) in order; the first edge is the coordinator.
/// Every region has `servers` nats-servers on free loopback ports; zone
/// `us` for all (one account).
fn regions_text(regions: &[(&str, &[&str])], servers: usize, store_dir: &Path) -> String {
    let mut text = String::new();
    for (name, edges) in regions {
        let list: Vec<String> = (0..servers)
            .map(|_| {
                format!(
                    "{{ host = \"127.0.0.1\", client = {}, cluster = {}, gateway = {}, monitor = {} }}",
                    keel_test_support::free_port(),
                    keel_test_support::free_port(),
                    keel_test_support::free_port(),
                    keel_test_support::free_port()
                )
            })
            .collect();
        text.push_str(&format!(
            "[regions.{name}]\nedges = {edges:?}\ncoordinator = {:?}\ndata_residency = \"us\"\n\
             servers = [{}]\n\n",
            edges[0],
            list.join(", ")
        ));
    }
    text.push_str(&format!(
        "[coordination]\nconsensus_protocol = \"raft\"\n\n[nats]\nsecret_env = {SECRET_ENV:?}\nstore_dir = {:?}\n",
        store_dir.display().to_string()
    ));
    text
}

impl Topology {
    /// Renders the servers' configs as `keel topology` does and starts them
    /// (retrying on fresh ports if one was taken meanwhile); returns once
    /// the super-cluster has formed (60 s deadline, then a panic with every
    /// server's log tail). With `gateway_proxies`, each server's gateway is
    /// reached by the others through a [`FaultProxy`] (no delay until
    /// [`Topology::set_gateway_delay`]).
    pub fn start(
        name: &str,
        regions: &[(&str, &[&str])],
        gateway_proxies: bool,
    ) -> anyhow::Result<Topology> {
        Topology::start_servers(name, regions, 1, gateway_proxies)
    }

    /// [`Topology::start`] with `servers` nats-servers per region (a
    /// cluster of that many; at least 1).
    pub fn start_servers(
        name: &str,
        regions: &[(&str, &[&str])],
        servers: usize,
        gateway_proxies: bool,
    ) -> anyhow::Result<Topology> {
        anyhow::ensure!(servers > 0, "a region needs at least one nats-server");
        let dir = tempfile::Builder::new()
            .prefix(&format!("keel-{name}-"))
            .tempdir()?;
        let path = dir.path().join("regions.toml");
        let store = dir.path().join("nats");
        type Rendered = Option<(RegionsConfig, Vec<FaultProxy>)>;
        let last: Arc<Mutex<Rendered>> = Arc::default();
        let keep = last.clone();
        let nats = NatsSupercluster::start_retrying(|| {
            let text = regions_text(regions, servers, &store);
            std::fs::write(&path, &text).expect("write regions.toml");
            let config = RegionsConfig::parse(&path, &text)
                .unwrap_or_else(|e| panic!("invalid regions.toml: {e:?}\n{text}"));
            let mut rendered = keel_topology::render(&config, SECRET.as_bytes());
            let mut proxies = Vec::new();
            if gateway_proxies {
                // Gateway URLs appear as `...@host:port"` in the other
                // servers' `gateways` lists only (a server's own `listen`
                // has no `@`).
                let ports: Vec<u16> = rendered.iter().map(|r| r.addr.gateway_port).collect();
                for port in ports {
                    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port)));
                    let (from, to) = (
                        format!("@127.0.0.1:{port}\""),
                        format!("@127.0.0.1:{}\"", proxy.addr().port()),
                    );
                    for r in &mut rendered {
                        r.config = r.config.replace(&from, &to);
                    }
                    proxies.push(proxy);
                }
            }
            *keep.lock().expect("not poisoned") = Some((config, proxies));
            rendered.into_iter().map(ServerSpec::from).collect()
        });
        let (regions, gateway_proxies) = last
            .lock()
            .expect("not poisoned")
            .take()
            .context("no regions.toml was rendered")?;
        Ok(Topology {
            regions,
            path,
            nats,
            gateway_proxies,
            _dir: dir,
        })
    }

    /// One-way latency on every gateway link (needs `gateway_proxies`).
    pub fn set_gateway_delay(&self, delay: Duration) {
        for p in &self.gateway_proxies {
            p.set_delay(delay);
        }
    }

    pub fn credentials(&self, edge: &str) -> anyhow::Result<keel_topology::EdgeCredentials> {
        keel_topology::edge_credentials(&self.regions, SECRET.as_bytes(), edge)
            .with_context(|| format!("{edge} is in no region"))
    }
}

/// A running `keel up` for one edge; killed and reaped on drop, then its
/// temp dir (config, data, log) removed.
pub struct Node {
    pub edge: &'static str,
    pub addr: SocketAddr,
    log: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts `keel up` for `edge` and returns once it prints its address.
    /// `components`: the `[components.*]` tables of its keel.toml.
    pub fn start(
        bin: &Path,
        topology: &Topology,
        edge: &'static str,
        components: &str,
    ) -> anyhow::Result<Node> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("keel-{edge}-"))
            .tempdir()?;
        let config = dir.path().join("keel.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n\n[node]\nedge = {edge:?}\nregions = {:?}\n\n{components}\n",
                topology.path.display().to_string(),
            ),
        )?;
        let log = dir.path().join("keel.log");
        let mut command = Command::new(bin);
        command
            .args(["--log-format", "json", "up", "--config"])
            .arg(&config)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .env(
                "KEEL_LOG",
                std::env::var("KEEL_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env(SECRET_ENV, SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        // SAFETY: only prctl(2), async-signal-safe, between fork and exec.
        // The node gets SIGKILL when the thread that spawned it (main, which
        // lives as long as the process) exits, however it exits.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let stdout = child.stdout.take().context("keel stdout is piped")?;
        let mut node = Node {
            edge,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            child,
            _dir: dir,
        };
        // Reads stdout to its end, so keel never blocks on a full pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("keel listening on http://") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            check_interrupted()?;
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(a) => {
                    node.addr = a
                        .parse()
                        .with_context(|| format!("keel {edge} printed address {a:?}"))?;
                    return Ok(node);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = node.child.wait()?;
                    bail!(
                        "keel {edge} exited ({status}) before listening\n{}",
                        node.log_text()
                    );
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = node.child.try_wait()? {
                        bail!(
                            "keel {edge} exited ({status}) before listening\n{}",
                            node.log_text()
                        );
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "keel {edge} did not listen within {START_DEADLINE:?}\n{}",
                            node.log_text()
                        );
                    }
                }
            }
        }
    }

    /// The `keel` process id (for /proc/<pid>/status).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The node's log (its last 200 lines), for failure messages.
    pub fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- keel {} log ({}, last {} of {} lines):\n{}",
            self.edge,
            self.log.display(),
            lines.len().min(200),
            lines.len(),
            lines[lines.len().saturating_sub(200)..].join("\n")
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every node's log, for failure messages.
pub fn logs(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| n.log_text())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Warn/error lines in the nodes' logs, to stderr (nothing is asserted).
pub fn report_logs(nodes: &[Node]) {
    for n in nodes {
        let text = std::fs::read_to_string(&n.log).unwrap_or_default();
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
            .collect();
        eprintln!("keel {}: {} warn/error log lines", n.edge, bad.len());
        for l in bad.iter().take(10) {
            eprintln!("  {l}");
        }
    }
}

/// One keep-alive HTTP/1.1 connection to a node (TCP_NODELAY), reopened
/// if the node closes it (counted).
pub struct Http {
    addr: SocketAddr,
    send: Option<SendRequest<Full<Bytes>>>,
    pub reconnects: u64,
}

impl Http {
    pub fn new(node: &Node) -> Http {
        Http {
            addr: node.addr,
            send: None,
            reconnects: 0,
        }
    }

    async fn connect(&mut self) -> anyhow::Result<()> {
        let stream = tokio::net::TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.send = Some(send);
        Ok(())
    }

    /// One request; (status, body).
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: impl Into<Bytes>,
    ) -> anyhow::Result<(u16, Bytes)> {
        self.call_with(method, path, &[], body).await
    }

    /// One request with extra headers; (status, body).
    pub async fn call_with(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<(u16, Bytes)> {
        let ready = match &mut self.send {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !ready {
            if self.send.is_some() {
                self.reconnects += 1;
            }
            self.connect().await?;
        }
        let send = self.send.as_mut().context("connected")?;
        send.ready().await?;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into()))?;
        let resp = send
            .send_request(req)
            .await
            .with_context(|| format!("{method} {path} to {}", self.addr))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

pub fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Polls `/_keel/ready` until the node's bus is connected.
pub async fn wait_connected(node: &Node) -> anyhow::Result<()> {
    let mut http = Http::new(node);
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        check_interrupted()?;
        let (status, body) = http.call("GET", "/_keel/ready", "").await?;
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        if v["bus"]["state"] == "connected" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "keel {}: bus not connected within {READY_DEADLINE:?}; last /_keel/ready: {status} {}\n{}",
                node.edge,
                text(&body),
                node.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Samples of one measurement, in seconds.
#[derive(Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64());
    }

    pub fn quantile(&self, q: f64) -> f64 {
        let mut s = self.0.clone();
        s.sort_by(f64::total_cmp);
        s[((s.len() as f64 - 1.0) * q).round() as usize]
    }

    pub fn mean(&self) -> f64 {
        self.0.iter().sum::<f64>() / self.0.len() as f64
    }

    pub fn max(&self) -> f64 {
        self.0.iter().copied().fold(0.0, f64::max)
    }
}

/// (4) `n` GETs of `path` at `node` (after a warm-up), each answered 200.
pub async fn gets(node: &Node, http: &mut Http, path: &str, n: usize) -> anyhow::Result<Samples> {
    let mut out = Samples::default();
    for i in 0..WARMUP + n {
        check_interrupted()?;
        let start = Instant::now();
        let (status, reply) = http.call("GET", path, "").await?;
        let d = start.elapsed();
        if status != 200 {
            bail!(
                "GET {path} at {}: {status} {}\n{}",
                node.edge,
                text(&reply),
                node.log_text()
            );
        }
        if i >= WARMUP {
            out.push(d);
        }
    }
    Ok(out)
}

/// Deadline of one raw round trip (and of the echo's first answer).
const ROUND_TRIP_DEADLINE: Duration = Duration::from_secs(30);

/// A raw async-nats core request/reply round trip from `requester`'s
/// zone-account connection to an echo on `responder`'s (each on the first
/// server of its edge's region), `WARMUP` + `n` times: the baseline of the
/// tier benchmarks.
pub async fn raw_round_trip(
    topology: &Topology,
    requester: &'static str,
    responder: &'static str,
    subject: &'static str,
    n: usize,
) -> anyhow::Result<Samples> {
    let connect = |edge: &'static str| async move {
        let c = topology.credentials(edge)?;
        let url = c
            .servers
            .first()
            .context("the region has a server")?
            .clone();
        let client = async_nats::ConnectOptions::with_user_and_password(c.user, c.password)
            .connect(url.as_str())
            .await
            .with_context(|| format!("connect as {edge} to {url}"))?;
        anyhow::Ok(client)
    };
    let requester = connect(requester).await?;
    let responder = connect(responder).await?;
    let mut sub = responder.subscribe(subject).await?;
    responder.flush().await?;
    let echoed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = echoed.clone();
    let echo_state = responder.clone();
    let echo = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                if responder.publish(reply, m.payload).await.is_err() {
                    break;
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let payload = Bytes::from(json!({"kind": "k0", "attributes": {}}).to_string());
    // `flush` only writes the SUB out; the server may not have processed it
    // when the first request arrives on the other connection ("no
    // responders"). Wait until the echo answers.
    let deadline = Instant::now() + ROUND_TRIP_DEADLINE;
    loop {
        check_interrupted()?;
        match requester.request(subject, payload.clone()).await {
            Ok(_) => break,
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => bail!("the echo does not answer: {e}"),
        }
    }
    let mut out = Samples::default();
    for i in 0..WARMUP + n {
        check_interrupted()?;
        let start = Instant::now();
        let outcome = tokio::time::timeout(
            ROUND_TRIP_DEADLINE,
            requester.request(subject, payload.clone()),
        )
        .await;
        if !matches!(outcome, Ok(Ok(_))) {
            bail!(
                "raw NATS request {i}: {outcome:?}; {} echoed so far; echo task finished: {}; requester {:?}, responder {:?}",
                echoed.load(Ordering::Relaxed),
                echo.is_finished(),
                requester.connection_state(),
                echo_state.connection_state()
            );
        }
        if i >= WARMUP {
            out.push(start.elapsed());
        }
    }
    echo.abort();
    Ok(out)
}
