//! Regional tier through guests, end to end, run by `benches/regional-op.sh`
//! (numbers go to BENCHMARKS.md; nothing is asserted). A real loopback
//! topology: 2 regions x 2 edges (us-east: nyc, bos; us-west: sfo, lax), one
//! nats-server per region (gateways, residency zone "us"), release `keel up`
//! nodes for nyc, bos and sfo serving regional-probe at `/reg/...` (granted
//! what it imports: `regional-coordination`, `global-coordination` with its
//! default `global` feature, `edge-operations`, `kv`). Each
//! HTTP figure is measured over one keep-alive connection per node; the
//! baseline is measured in the same run on the same servers:
//!
//! 1. regional op, edge -> region -> edge: `POST /reg/activity/<user>` at
//!    nyc, then `GET /reg/user/<user>` at bos in a tight loop (no sleep)
//!    until `last_activity` is the new kind; from just before the POST until
//!    the successful poll;
//! 2. baseline: a raw async-nats core request/reply round trip between two
//!    connections (nyc's and bos's zone-account users) on the us-east server;
//! 3. subscription delivery: at bos a regional subscription to kind
//!    `bench`; `POST /reg/event` at nyc until bos's `GET /reg/deliveries`
//!    lists one more delivery (at most 200 samples: the listing grows);
//! 4. HTTP floor: `GET /reg/node` at bos, a guest call with no regional
//!    work; and `GET /reg/user/<known user>` at bos, the cost of one poll of
//!    (1).
//!
//! Every child (nats-server, keel) is killed and every temp dir removed on
//! exit, error, panic or SIGINT/SIGTERM/SIGHUP (keel nodes also die with
//! this process: `PR_SET_PDEATHSIG`). Every wait has a deadline; a timeout
//! fails with the nodes' logs.
//!
//! Usage: regional-op [samples]   (default 500)
//! Env: `KEEL_BIN` (default `$CARGO_TARGET_DIR/release/keel`, else the
//! `keel` next to this binary), `KEEL_REGIONAL_PROBE` (default
//! `components/target/wasm/regional-probe.wasm`), `KEEL_LOG` of the nodes
//! (default `warn`), `KEEL_NATS_SERVER` (see keel-test-support).

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use keel_config::RegionsConfig;
use keel_test_support::{NatsSupercluster, ServerSpec, free_port};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The environment variable regions.toml names for the deployment secret.
const SECRET_ENV: &str = "KEEL_TEST_NATS_SECRET";
const SECRET: &str = "regional-op-bench-secret";
/// us-east, then us-west; the first edge of a region is its coordinator.
const REGIONS: [(&str, [&str; 2]); 2] = [("us-east", ["nyc", "bos"]), ("us-west", ["sfo", "lax"])];
/// The edges that run a keel node.
const NODES: [&str; 3] = ["nyc", "bos", "sfo"];
/// Deadline for a node to print its address.
const START_DEADLINE: Duration = Duration::from_secs(120);
/// Deadline for a node's bus to connect.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// Deadline for one sample (a write to become visible on the other edge).
const SAMPLE_DEADLINE: Duration = Duration::from_secs(30);
/// Unmeasured samples before each measurement.
const WARMUP: usize = 20;
/// Cap on subscription-delivery samples: each poll lists every delivery.
const MAX_DELIVERY_SAMPLES: usize = 200;
const ECHO_SUBJECT: &str = "bench.regional-op.echo";

/// Set by the first SIGINT/SIGTERM/SIGHUP: loops stop, guards clean up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted by a signal");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let samples: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("usage: regional-op [samples]")?
        .unwrap_or(500);
    anyhow::ensure!(samples > 0, "samples must be at least 1");
    let bin = keel_bin()?;
    let wasm = std::env::var_os("KEEL_REGIONAL_PROBE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            keel_test_support::workspace_root().join("components/target/wasm/regional-probe.wasm")
        });
    anyhow::ensure!(
        wasm.is_file(),
        "{} is missing: run `make guests` (or set KEEL_REGIONAL_PROBE)",
        wasm.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(watch_signals())?;

    eprintln!("== nats: 2 regions x 1 server (us-east: nyc, bos; us-west: sfo, lax)");
    let topology = Topology::start()?;
    check_interrupted()?;
    let mut nodes = Vec::new();
    for edge in NODES {
        eprintln!("== keel {edge} ({})", bin.display());
        nodes.push(Node::start(&bin, &wasm, &topology, edge)?);
        check_interrupted()?;
    }
    let outcome = rt.block_on(run(&topology, &nodes, samples));
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
    // Drops: nodes (keel killed), then the topology (nats-servers killed,
    // then its temp dir removed).
}

/// `$KEEL_BIN`, else `$CARGO_TARGET_DIR/release/keel`, else the `keel` next
/// to this binary (both are built into the same release dir).
fn keel_bin() -> anyhow::Result<PathBuf> {
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
async fn watch_signals() -> anyhow::Result<()> {
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
struct Topology {
    regions: RegionsConfig,
    path: PathBuf,
    // Declared before `_dir`: the servers are killed before their store
    // (inside `_dir`) is removed.
    nats: NatsSupercluster,
    _dir: tempfile::TempDir,
}

fn regions_text(store_dir: &Path) -> String {
    let mut text = String::new();
    for (name, edges) in REGIONS {
        text.push_str(&format!(
            "[regions.{name}]\nedges = {edges:?}\ncoordinator = {:?}\ndata_residency = \"us\"\n\
             servers = [{{ host = \"127.0.0.1\", client = {}, cluster = {}, gateway = {}, monitor = {} }}]\n\n",
            edges[0],
            free_port(),
            free_port(),
            free_port(),
            free_port()
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
    /// server's log tail).
    fn start() -> anyhow::Result<Topology> {
        let dir = tempfile::Builder::new()
            .prefix("keel-regional-op-")
            .tempdir()?;
        let path = dir.path().join("regions.toml");
        let store = dir.path().join("nats");
        let last: Arc<Mutex<Option<RegionsConfig>>> = Arc::default();
        let keep = last.clone();
        let nats = NatsSupercluster::start_retrying(|| {
            let text = regions_text(&store);
            std::fs::write(&path, &text).expect("write regions.toml");
            let regions = RegionsConfig::parse(&path, &text)
                .unwrap_or_else(|e| panic!("invalid regions.toml: {e:?}\n{text}"));
            let rendered = keel_topology::render(&regions, SECRET.as_bytes());
            *keep.lock().expect("not poisoned") = Some(regions);
            rendered
                .into_iter()
                .map(|r| ServerSpec {
                    server_name: r.server_name,
                    cluster: Some(r.region),
                    host: r.addr.host.clone(),
                    client_port: r.addr.client_port,
                    monitor_port: r.addr.monitor_port,
                    store_dir: r.store_dir,
                    config: r.config,
                })
                .collect()
        });
        let regions = last
            .lock()
            .expect("not poisoned")
            .take()
            .context("no regions.toml was rendered")?;
        Ok(Topology {
            regions,
            path,
            nats,
            _dir: dir,
        })
    }

    fn credentials(&self, edge: &str) -> anyhow::Result<keel_topology::EdgeCredentials> {
        keel_topology::edge_credentials(&self.regions, SECRET.as_bytes(), edge)
            .with_context(|| format!("{edge} is in no region"))
    }
}

/// A running `keel up` for one edge; killed and reaped on drop, then its
/// temp dir (config, data, log) removed.
struct Node {
    edge: &'static str,
    addr: SocketAddr,
    log: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts `keel up` for `edge` and returns once it prints its address.
    fn start(
        bin: &Path,
        wasm: &Path,
        topology: &Topology,
        edge: &'static str,
    ) -> anyhow::Result<Node> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("keel-regional-op-{edge}-"))
            .tempdir()?;
        let config = dir.path().join("keel.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n\n[node]\nedge = {edge:?}\nregions = {:?}\n\n\
                 [components.reg]\nwasm = {:?}\nroute = \"/reg/...\"\n\
                 grants = [\"regional-coordination\", \"global-coordination\", \"edge-operations\", \"kv\"]\n",
                topology.path.display().to_string(),
                wasm.display().to_string()
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

    /// The node's log (its last 200 lines), for failure messages.
    fn log_text(&self) -> String {
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
fn logs(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| n.log_text())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Warn/error lines in the nodes' logs, to stderr (nothing is asserted).
fn report_logs(nodes: &[Node]) {
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
struct Http {
    addr: SocketAddr,
    send: Option<SendRequest<Full<Bytes>>>,
    reconnects: u64,
}

impl Http {
    fn new(node: &Node) -> Http {
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
    async fn call(
        &mut self,
        method: &str,
        path: &str,
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
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .body(Full::new(body.into()))?;
        let resp = send
            .send_request(req)
            .await
            .with_context(|| format!("{method} {path} to {}", self.addr))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Polls `/_keel/ready` until the node's bus is connected.
async fn wait_connected(node: &Node) -> anyhow::Result<()> {
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
struct Samples(Vec<f64>);

impl Samples {
    fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64());
    }

    fn quantile(&self, q: f64) -> f64 {
        let mut s = self.0.clone();
        s.sort_by(f64::total_cmp);
        s[((s.len() as f64 - 1.0) * q).round() as usize]
    }

    fn mean(&self) -> f64 {
        self.0.iter().sum::<f64>() / self.0.len() as f64
    }

    fn max(&self) -> f64 {
        self.0.iter().copied().fold(0.0, f64::max)
    }
}

/// A write at one edge until a poll at the other shows it.
#[derive(Default)]
struct Propagation {
    total: Samples,
    /// The write's own request.
    write: Samples,
    /// The last, successful poll.
    last_poll: Samples,
    polls: u64,
    /// Statuses other than the expected ones while polling.
    odd_statuses: BTreeMap<u16, u64>,
    /// Samples whose poll found more deliveries but not the event just
    /// recorded.
    out_of_order: u64,
}

/// (1) `POST /reg/activity/<prefix>-<i>` at nyc until `GET /reg/user/..` at
/// bos has its kind as `last_activity`.
async fn regional_op(
    (nyc, bos): (&Node, &Node),
    (a, b): (&mut Http, &mut Http),
    prefix: &str,
    n: usize,
) -> anyhow::Result<Propagation> {
    let mut out = Propagation::default();
    for i in 0..n {
        check_interrupted()?;
        let user = format!("{prefix}-{i}");
        let kind = format!("k{i}");
        let body = json!({"kind": kind, "attributes": {}}).to_string();
        let poll = format!("/reg/user/{user}");
        let start = Instant::now();
        let (status, reply) = a
            .call("POST", &format!("/reg/activity/{user}"), body)
            .await?;
        out.write.push(start.elapsed());
        if status != 204 {
            bail!(
                "POST /reg/activity/{user} at nyc: {status} {}\n{}",
                text(&reply),
                logs(&[nyc])
            );
        }
        let deadline = start + SAMPLE_DEADLINE;
        loop {
            let t = Instant::now();
            let (status, reply) = b.call("GET", &poll, "").await?;
            out.polls += 1;
            if status == 200 {
                let v: Value = serde_json::from_slice(&reply)?;
                if v["last_activity"].as_str() == Some(kind.as_str()) {
                    let end = Instant::now();
                    out.total.push(end - start);
                    out.last_poll.push(end - t);
                    break;
                }
            } else if status != 404 {
                *out.odd_statuses.entry(status).or_default() += 1;
            }
            if Instant::now() > deadline {
                bail!(
                    "{user}'s activity {kind} not visible at bos within {SAMPLE_DEADLINE:?}; last GET {poll}: {status} {}\n{}",
                    text(&reply),
                    logs(&[nyc, bos])
                );
            }
            check_interrupted()?;
        }
    }
    Ok(out)
}

/// (2) Core request/reply between nyc's and bos's zone-account users on
/// the us-east server (bos's connection echoes).
async fn raw_round_trip(topology: &Topology, n: usize) -> anyhow::Result<Samples> {
    let connect = |edge: &'static str| async move {
        let c = topology.credentials(edge)?;
        let url = c.servers.first().context("us-east has a server")?.clone();
        let client = async_nats::ConnectOptions::with_user_and_password(c.user, c.password)
            .connect(url.as_str())
            .await
            .with_context(|| format!("connect as {edge} to {url}"))?;
        anyhow::Ok(client)
    };
    let requester = connect("nyc").await?;
    let responder = connect("bos").await?;
    let mut sub = responder.subscribe(ECHO_SUBJECT).await?;
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
    let deadline = Instant::now() + SAMPLE_DEADLINE;
    loop {
        check_interrupted()?;
        match requester.request(ECHO_SUBJECT, payload.clone()).await {
            Ok(_) => break,
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => bail!("the echo on the us-east server does not answer: {e}"),
        }
    }
    let mut out = Samples::default();
    for i in 0..WARMUP + n {
        check_interrupted()?;
        let start = Instant::now();
        let outcome = tokio::time::timeout(
            SAMPLE_DEADLINE,
            requester.request(ECHO_SUBJECT, payload.clone()),
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

/// (3) A regional subscription at bos to kind `bench`; `POST /reg/event` at
/// nyc until bos's deliveries list one more (the first `WARMUP.min(n)`
/// events unmeasured).
/// Which subscription [`delivery`] measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `record-local-event` → `subscribe-regional-updates` (same region).
    Regional,
    /// `publish-global-event` → `subscribe-global-events` (another region).
    Global,
}

async fn delivery(
    (nyc, bos): (&Node, &Node),
    (a, b): (&mut Http, &mut Http),
    n: usize,
    via: Via,
) -> anyhow::Result<Propagation> {
    let (subscribe, filter) = match via {
        Via::Regional => ("/reg/subscribe", json!({"kinds": ["bench"]})),
        Via::Global => ("/reg/global/subscribe", json!(["bench.>"])),
    };
    let (status, reply) = b.call("POST", subscribe, filter.to_string()).await?;
    if status != 200 {
        bail!(
            "POST {subscribe} at {}: {status} {}\n{}",
            bos.edge,
            text(&reply),
            logs(&[bos])
        );
    }
    let id = serde_json::from_slice::<Value>(&reply)?["id"]
        .as_u64()
        .with_context(|| format!("subscription id in {}", text(&reply)))?;
    let poll = match via {
        Via::Regional => format!("/reg/deliveries?prefix=update/{id:020}/"),
        Via::Global => format!("/reg/deliveries?prefix=global/{id:020}/"),
    };
    let warmup = WARMUP.min(n);
    let mut out = Propagation::default();
    let mut have = 0;
    for i in 0..warmup + n {
        check_interrupted()?;
        let key = format!("k{i}");
        let (write, body, field) = match via {
            Via::Regional => (
                "/reg/event",
                json!({"kind": "bench", "key": key, "payload": "p"}),
                "key",
            ),
            Via::Global => (
                "/reg/global/publish",
                json!({"id": key, "event_type": "bench.tick", "data": "p"}),
                "id",
            ),
        };
        let start = Instant::now();
        let (status, reply) = a.call("POST", write, body.to_string()).await?;
        let written = start.elapsed();
        if status != 200 && status != 204 {
            bail!(
                "POST {write} at nyc: {status} {}\n{}",
                text(&reply),
                logs(&[nyc])
            );
        }
        let deadline = start + SAMPLE_DEADLINE;
        loop {
            let t = Instant::now();
            let (status, reply) = b.call("GET", &poll, "").await?;
            let end = Instant::now();
            let list = if status == 200 {
                serde_json::from_slice::<Value>(&reply)?
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            } else {
                *out.odd_statuses.entry(status).or_default() += 1;
                Vec::new()
            };
            if i >= warmup {
                out.polls += 1;
            }
            if list.len() > have {
                have = list.len();
                if i >= warmup {
                    out.total.push(end - start);
                    out.write.push(written);
                    out.last_poll.push(end - t);
                    if !list.iter().any(|d| d[field].as_str() == Some(key.as_str())) {
                        out.out_of_order += 1;
                    }
                }
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "delivery of {key} not recorded at {} within {SAMPLE_DEADLINE:?} ({have} so far); last GET {poll}: {status}\n{}",
                    bos.edge,
                    logs(&[nyc, bos])
                );
            }
            check_interrupted()?;
        }
    }
    Ok(out)
}

/// (6) `n` POSTs of `body` to `path` at `node` (after a warm-up), each
/// answered 200.
async fn posts(
    node: &Node,
    http: &mut Http,
    path: &str,
    body: &Value,
    n: usize,
) -> anyhow::Result<Samples> {
    let mut out = Samples::default();
    for i in 0..WARMUP + n {
        check_interrupted()?;
        let start = Instant::now();
        let (status, reply) = http.call("POST", path, body.to_string()).await?;
        let d = start.elapsed();
        if status != 200 {
            bail!(
                "POST {path} at {}: {status} {}\n{}",
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

/// (4) `n` GETs of `path` at `node` (after a warm-up), each answered 200.
async fn gets(node: &Node, http: &mut Http, path: &str, n: usize) -> anyhow::Result<Samples> {
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

async fn run(topology: &Topology, nodes: &[Node], n: usize) -> anyhow::Result<()> {
    let (nyc, bos) = (&nodes[0], &nodes[1]);
    for node in nodes {
        wait_connected(node).await?;
    }
    let mut a = Http::new(nyc);
    let mut b = Http::new(bos);

    eprintln!("== 1. regional op: {WARMUP} warm-up + {n} samples");
    regional_op((nyc, bos), (&mut a, &mut b), "warm", WARMUP).await?;
    let op = regional_op((nyc, bos), (&mut a, &mut b), "user", n).await?;

    eprintln!("== 2. raw NATS round trip: {WARMUP} warm-up + {n} samples");
    let raw = raw_round_trip(topology, n).await?;

    let nd = n.min(MAX_DELIVERY_SAMPLES);
    eprintln!(
        "== 3. subscription delivery: {} warm-up + {nd} samples",
        WARMUP.min(nd)
    );
    let sub = delivery((nyc, bos), (&mut a, &mut b), nd, Via::Regional).await?;

    let sfo = &nodes[2];
    let mut c = Http::new(sfo);
    eprintln!(
        "== 5. global event delivery nyc -> sfo: {} warm-up + {nd} samples",
        WARMUP.min(nd)
    );
    let global = delivery((nyc, sfo), (&mut a, &mut c), nd, Via::Global).await?;
    eprintln!("== 6. global query (metric, both regions): {WARMUP} warm-up + {n} samples");
    let query = posts(
        nyc,
        &mut a,
        "/reg/global/query",
        &json!({"metric": {"metric_type": "bench", "start_ms": 0, "end_ms": u64::MAX}}),
        n,
    )
    .await?;

    eprintln!("== 4. HTTP floor: {WARMUP} warm-up + {n} samples each");
    let floor = gets(bos, &mut b, "/reg/node", n).await?;
    let user_get = gets(bos, &mut b, "/reg/user/user-0", n).await?;

    let us = |s: f64| format!("{:.0}", s * 1e6);
    let row = |what: &str, samples: usize, s: &Samples, ratio: bool| {
        let r = if ratio {
            format!(
                "{:.1} / {:.1}",
                s.quantile(0.5) / raw.quantile(0.5),
                s.quantile(0.99) / raw.quantile(0.99)
            )
        } else {
            String::new()
        };
        println!(
            "| {what} | {samples} | {} | {} | {} | {} | {r} |",
            us(s.quantile(0.5)),
            us(s.quantile(0.99)),
            us(s.mean()),
            us(s.max())
        );
    };
    println!(
        "| measurement (loopback, 2 regions x 2 edges, 1 nats-server per region; µs) | samples | p50 | p99 | mean | max | keel / raw NATS round trip (p50 / p99) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    row(
        "regional op, edge -> region -> edge: POST /reg/activity/<user> at nyc until GET /reg/user/<user> at bos shows it",
        n,
        &op.total,
        true,
    );
    row(
        "... of which the POST at nyc (record-user-activity)",
        n,
        &op.write,
        false,
    );
    row(
        "... of which the last, successful GET /reg/user/<user> at bos",
        n,
        &op.last_poll,
        false,
    );
    row(
        "baseline: raw NATS core request/reply, nyc user -> bos user (echo), us-east server",
        n,
        &raw,
        true,
    );
    row(
        "subscription delivery: POST /reg/event at nyc until bos's on-update is listed by GET /reg/deliveries",
        nd,
        &sub.total,
        true,
    );
    row(
        "... of which the POST at nyc (record-local-event)",
        nd,
        &sub.write,
        false,
    );
    row(
        &format!(
            "... of which the last, successful GET /reg/deliveries at bos (up to {nd} entries)"
        ),
        nd,
        &sub.last_poll,
        false,
    );
    row(
        "global op: publish-global-event at nyc (us-east) until sfo's (us-west) on-global-event is listed by GET /reg/deliveries",
        nd,
        &global.total,
        true,
    );
    row(
        "... of which the POST at nyc (publish-global-event: outbox write)",
        nd,
        &global.write,
        false,
    );
    row(
        "global op: query-global-state(metric) at nyc, scatter-gather to both regions",
        n,
        &query,
        true,
    );
    row(
        "HTTP floor: GET /reg/node at bos (guest call, no regional work)",
        n,
        &floor,
        false,
    );
    row(
        "one poll of the regional op: GET /reg/user/<known user> at bos",
        n,
        &user_get,
        false,
    );
    println!();
    println!(
        "Polls per sample (mean): regional op {:.1}, subscription delivery {:.1}. \
         Warm-up samples before each measurement are not counted.",
        op.polls as f64 / n as f64,
        sub.polls as f64 / nd as f64
    );
    let mut odd = Vec::new();
    if !op.odd_statuses.is_empty() {
        odd.push(format!(
            "GET /reg/user statuses other than 200/404: {:?}",
            op.odd_statuses
        ));
    }
    if !sub.odd_statuses.is_empty() {
        odd.push(format!(
            "GET /reg/deliveries statuses other than 200: {:?}",
            sub.odd_statuses
        ));
    }
    if sub.out_of_order > 0 {
        odd.push(format!(
            "{} regional deliveries whose poll did not show the event just recorded",
            sub.out_of_order
        ));
    }
    if a.reconnects + b.reconnects > 0 {
        odd.push(format!(
            "keep-alive connections reopened: nyc {}, bos {}",
            a.reconnects, b.reconnects
        ));
    }
    for o in odd {
        println!("Note: {o}.");
    }
    Ok(())
}
