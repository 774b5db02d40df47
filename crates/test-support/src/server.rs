//! `nats-server` child processes for tests.

use crate::{free_port, nats_server_binary, wait_until};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a node may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop()` waits for a graceful exit before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at starting when a just-picked free port was taken meanwhile.
const PORT_ATTEMPTS: usize = 3;

/// One server's configuration, rendered into a nats-server config file.
/// Grows a block per feature (a `gateway` block will join `cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub server_name: String,
    pub host: String,
    /// Client port.
    pub port: u16,
    /// Monitoring (HTTP) port: `/healthz`, `/jsz`, `/routez`, `/varz`.
    pub http_port: u16,
    /// JetStream store directory.
    pub store_dir: PathBuf,
    pub cluster: Option<ClusterBlock>,
}

/// The `cluster { … }` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterBlock {
    pub name: String,
    /// Route listen port.
    pub port: u16,
    /// Route URLs of the other members (`nats-route://127.0.0.1:PORT`).
    pub routes: Vec<String>,
}

/// A quoted config string (the nats-server config syntax accepts JSON strings).
fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("string serialises")
}

impl ServerConfig {
    /// A single node on free loopback ports storing JetStream in `store_dir`.
    pub fn single(server_name: &str, store_dir: PathBuf) -> ServerConfig {
        ServerConfig {
            server_name: server_name.to_owned(),
            host: "127.0.0.1".into(),
            port: free_port(),
            http_port: free_port(),
            store_dir,
            cluster: None,
        }
    }

    /// Picks new free ports (client, monitoring and, if any, route port).
    fn repick_ports(&mut self) {
        self.port = free_port();
        self.http_port = free_port();
        if let Some(c) = &mut self.cluster {
            c.port = free_port();
        }
    }

    /// The config file text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "server_name: {}", quote(&self.server_name));
        let _ = writeln!(
            out,
            "listen: {}",
            quote(&format!("{}:{}", self.host, self.port))
        );
        let _ = writeln!(
            out,
            "http: {}",
            quote(&format!("{}:{}", self.host, self.http_port))
        );
        let _ = writeln!(out, "jetstream {{");
        let _ = writeln!(
            out,
            "  store_dir: {}",
            quote(&self.store_dir.to_string_lossy())
        );
        let _ = writeln!(out, "}}");
        if let Some(c) = &self.cluster {
            let _ = writeln!(out, "cluster {{");
            let _ = writeln!(out, "  name: {}", quote(&c.name));
            let _ = writeln!(
                out,
                "  listen: {}",
                quote(&format!("{}:{}", self.host, c.port))
            );
            let routes: Vec<String> = c.routes.iter().map(|r| quote(r)).collect();
            let _ = writeln!(out, "  routes: [{}]", routes.join(", "));
            let _ = writeln!(out, "}}");
        }
        out
    }
}

/// A server whose config file is given as text, e.g. rendered by
/// `keel topology`. The addresses repeat what the text says, so tests can
/// connect and poll the monitoring endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// `server_name` in the text.
    pub server_name: String,
    /// `cluster.name` in the text (the region), `None` without a cluster
    /// block. [`crate::NatsSupercluster`] waits for routes to the other
    /// members of the same cluster and gateways to every other cluster.
    pub cluster: Option<String>,
    /// Host of the client and monitoring listeners.
    pub host: String,
    pub client_port: u16,
    pub monitor_port: u16,
    /// `jetstream.store_dir` in the text (put it in a temporary directory
    /// the test owns).
    pub store_dir: PathBuf,
    /// The config file's text.
    pub config: String,
}

impl From<keel_topology::RenderedServer> for ServerSpec {
    /// A server as `keel topology` renders it (in its region's cluster
    /// unless the topology has a single server, which has no cluster block).
    fn from(r: keel_topology::RenderedServer) -> ServerSpec {
        let clustered = r
            .config
            .lines()
            .any(|l| l.trim_start().starts_with("cluster {"));
        ServerSpec {
            server_name: r.server_name,
            cluster: clustered.then_some(r.region),
            host: r.addr.host,
            client_port: r.addr.client_port,
            monitor_port: r.addr.monitor_port,
            store_dir: r.store_dir,
            config: r.config,
        }
    }
}

/// A minimal HTTP GET against the monitoring port: `(status, body)`.
fn http_get(host: &str, port: u16, path: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = format!("{host}:{port}").parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// A `nats-server` child process with JetStream, bound to 127.0.0.1. Killed
/// (SIGKILL) and reaped on drop; its temporary directory (config, log,
/// JetStream store) is removed after.
pub struct NatsServer {
    config: ServerConfig,
    /// The config file's text when given as text ([`ServerSpec`]); else
    /// `config` is rendered.
    text: Option<String>,
    /// The cluster a [`ServerSpec`] names.
    spec_cluster: Option<String>,
    child: Option<Child>,
    config_path: PathBuf,
    log_path: PathBuf,
    // Last: dropped after the child is killed.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a single node and waits until `/healthz` says it (and
    /// JetStream) is ready. Panics with the server's log if it does not
    /// come up.
    pub fn start() -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("keel-nats-")
            .tempdir()
            .expect("create temp dir");
        let config = ServerConfig::single("keel-test", dir.path().join("jetstream"));
        let mut server = NatsServer::new(config, dir);
        server.start_with_port_retries(|s| s.healthy());
        server
    }

    /// A server for `config` (not started). The config, log and store live
    /// in `dir`.
    fn new(config: ServerConfig, dir: TempDir) -> NatsServer {
        NatsServer {
            config_path: dir.path().join("nats-server.conf"),
            log_path: dir.path().join("nats-server.log"),
            config,
            text: None,
            spec_cluster: None,
            child: None,
            dir,
        }
    }

    /// A server for a config given as text (not started); its config file
    /// and log live in a new temporary directory, its store where the text
    /// says.
    pub(crate) fn from_spec(spec: ServerSpec) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix(&format!("keel-nats-{}-", spec.server_name))
            .tempdir()
            .expect("create temp dir");
        let config = ServerConfig {
            server_name: spec.server_name,
            host: spec.host,
            port: spec.client_port,
            http_port: spec.monitor_port,
            store_dir: spec.store_dir,
            cluster: None,
        };
        let mut server = NatsServer::new(config, dir);
        server.text = Some(spec.config);
        server.spec_cluster = spec.cluster;
        server
    }

    /// Starts a server from a config given as text (e.g. one rendered by
    /// `keel topology`) and waits until `/healthz` says it is ready. For a
    /// server that needs peers to become healthy (a cluster or gateway
    /// member) use [`crate::NatsSupercluster`]. Panics with the server's
    /// log if it does not come up; ports are the text's, so there is no
    /// retry on other ports.
    pub fn start_rendered(spec: ServerSpec) -> NatsServer {
        let mut server = NatsServer::from_spec(spec);
        server.spawn();
        if let Err(why) = server.wait_ready(&|s| s.healthy()) {
            server.fail(&why);
        }
        server
    }

    /// The name of the cluster this server belongs to, if any.
    pub fn cluster(&self) -> Option<&str> {
        self.spec_cluster
            .as_deref()
            .or(self.config.cluster.as_ref().map(|c| c.name.as_str()))
    }

    /// The config file's text.
    pub fn config_text(&self) -> String {
        match &self.text {
            Some(t) => t.clone(),
            None => self.config.render(),
        }
    }

    fn start_with_port_retries(&mut self, ready: impl Fn(&NatsServer) -> bool) {
        for attempt in 1..=PORT_ATTEMPTS {
            self.spawn();
            match self.wait_ready(&ready) {
                Ok(()) => return,
                Err(why) if attempt < PORT_ATTEMPTS && self.port_taken() => {
                    eprintln!(
                        "nats-server {}: {why}; retrying on other ports",
                        self.config.server_name
                    );
                    self.kill();
                    self.config.repick_ports();
                }
                Err(why) => self.fail(&why),
            }
        }
    }

    pub(crate) fn port_taken(&self) -> bool {
        std::fs::read_to_string(&self.log_path)
            .is_ok_and(|log| log.contains("address already in use"))
    }

    /// Writes the config and spawns the process (does not wait).
    pub(crate) fn spawn(&mut self) {
        assert!(self.child.is_none(), "nats-server already running");
        std::fs::write(&self.config_path, self.config_text()).expect("write nats-server config");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open nats-server log");
        let binary = nats_server_binary();
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        self.child = Some(child);
    }

    /// Polls until `ready` holds; fails early if the process exits.
    fn wait_ready(&mut self, ready: &dyn Fn(&NatsServer) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("exited during startup with {status}"));
            }
            if ready(self) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("not ready after {START_TIMEOUT:?}"));
            }
            std::thread::sleep(crate::POLL_INTERVAL);
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        self.kill();
        panic!(
            "nats-server {} ({}) {why}\nconfig:\n{}\nlast log lines ({}):\n{}",
            self.config.server_name,
            nats_server_binary().display(),
            self.config_text(),
            self.log_path.display(),
            self.log_tail(40)
        );
    }

    /// `/healthz` answers 200 (JetStream ready and, in a cluster, current
    /// with the meta leader).
    pub fn healthy(&self) -> bool {
        matches!(self.http("/healthz"), Some((200, _)))
    }

    pub(crate) fn http(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.config.host, self.config.http_port, path)
    }

    /// GETs a monitoring endpoint (`/varz`, `/jsz`, `/routez`, …) as JSON;
    /// `None` if the server does not answer 200 with JSON.
    pub fn monitor(&self, path: &str) -> Option<serde_json::Value> {
        match self.http(path)? {
            (200, body) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.config.host, self.config.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.config.port
    }

    /// The client address (for a [`crate::FaultProxy`] upstream).
    pub fn addr(&self) -> SocketAddr {
        format!("{}:{}", self.config.host, self.config.port)
            .parse()
            .expect("valid address")
    }

    /// The monitoring port.
    pub fn http_port(&self) -> u16 {
        self.config.http_port
    }

    pub fn server_name(&self) -> &str {
        &self.config.server_name
    }

    /// The server's name, addresses and store; for a server started from
    /// text ([`ServerSpec`]) `cluster` is `None` whatever the text says.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn store_dir(&self) -> &Path {
        &self.config.store_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The temporary directory holding config, log and store.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last `n` lines of the server's log.
    pub fn log_tail(&self, n: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => match c.try_wait() {
                Ok(None) => true,
                _ => {
                    self.child = None;
                    false
                }
            },
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid; it is not reaped yet,
            // so the pid cannot have been reused.
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    /// Graceful stop: SIGTERM, wait for the exit (SIGKILL after
    /// 10 s). No-op if not running.
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("child present");
        let exited = wait_until(STOP_TIMEOUT, || {
            matches!(child.try_wait(), Ok(Some(_)) | Err(_))
        });
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL and reap. No-op if not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (gracefully) if running, then starts again with the same
    /// ports and store directory (JetStream data survives) and waits until
    /// healthy. Panics with the log if it does not come back.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Starts a stopped or killed server again (same ports and store) and
    /// waits until healthy.
    pub fn start_again(&mut self) {
        if self.is_running() {
            return;
        }
        self.spawn();
        if let Err(why) = self.wait_ready(&|s| s.healthy()) {
            self.fail(&format!("did not come back: {why}"));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` nodes in one cluster, JetStream on each (own store directory,
/// unique `server_name`s `n0`, `n1`, …). Dropping it kills every node.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes and waits until every node is healthy, sees the
    /// others over routes, and they agree on a JetStream meta leader.
    pub fn start(n: usize) -> NatsCluster {
        assert!(n >= 1, "a cluster needs at least one node");
        let mut last_failure = String::new();
        for attempt in 1..=PORT_ATTEMPTS {
            let mut nodes = Self::configure(n);
            for node in &mut nodes {
                node.spawn();
            }
            let mut cluster = NatsCluster { nodes };
            if cluster.wait_formed(START_TIMEOUT) {
                return cluster;
            }
            let port_taken = cluster.nodes.iter().any(|n| n.port_taken());
            last_failure = cluster.describe();
            if !(port_taken && attempt < PORT_ATTEMPTS) {
                break;
            }
            eprintln!("nats cluster: a port was taken; retrying on other ports");
        }
        panic!("nats cluster of {n} did not form within {START_TIMEOUT:?}\n{last_failure}");
    }

    fn configure(n: usize) -> Vec<NatsServer> {
        let cluster_name = "keel-test";
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        (0..n)
            .map(|i| {
                let dir = tempfile::Builder::new()
                    .prefix(&format!("keel-nats-n{i}-"))
                    .tempdir()
                    .expect("create temp dir");
                let mut config =
                    ServerConfig::single(&format!("n{i}"), dir.path().join("jetstream"));
                config.cluster = Some(ClusterBlock {
                    name: cluster_name.into(),
                    port: route_ports[i],
                    routes: route_ports
                        .iter()
                        .enumerate()
                        .filter(|&(j, _)| j != i)
                        .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
                        .collect(),
                });
                NatsServer::new(config, dir)
            })
            .collect()
    }

    fn describe(&mut self) -> String {
        let mut out = String::new();
        for node in &mut self.nodes {
            let running = node.is_running();
            let _ = writeln!(
                out,
                "--- {} (running: {running}, healthz: {:?})\nconfig:\n{}last log lines:\n{}",
                node.server_name(),
                node.http("/healthz"),
                node.config_text(),
                node.log_tail(25)
            );
        }
        out
    }

    /// Polls until every running node is healthy, routes to every other
    /// running node, and all agree on a JetStream meta leader.
    pub fn wait_formed(&mut self, timeout: Duration) -> bool {
        let nodes = &mut self.nodes;
        wait_until(timeout, || {
            let running: Vec<usize> = (0..nodes.len())
                .filter(|&i| nodes[i].is_running())
                .collect();
            if running.is_empty() {
                return false;
            }
            let mut leader: Option<String> = None;
            for &i in &running {
                let node = &nodes[i];
                if !node.healthy() {
                    return false;
                }
                let Some(routez) = node.monitor("/routez") else {
                    return false;
                };
                let mut peers: Vec<&str> = routez["routes"]
                    .as_array()
                    .map(|rs| rs.iter().filter_map(|r| r["remote_id"].as_str()).collect())
                    .unwrap_or_default();
                peers.sort_unstable();
                peers.dedup();
                if peers.len() + 1 < running.len() {
                    return false;
                }
                let Some(jsz) = node.monitor("/jsz") else {
                    return false;
                };
                let Some(l) = jsz["meta_cluster"]["leader"]
                    .as_str()
                    .filter(|l| !l.is_empty())
                else {
                    return false;
                };
                match &leader {
                    None => leader = Some(l.to_owned()),
                    Some(prev) if prev != l => return false,
                    Some(_) => {}
                }
            }
            true
        })
    }

    /// Client URLs of all nodes (running or not).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// For `stop()`, `kill()`, `restart()` of one node.
    pub fn node_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// Index of the node with this `server_name`.
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.server_name() == server_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_info(port: u16) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).expect("read INFO");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn config_renders_cluster_block() {
        let mut c = ServerConfig::single("n0", PathBuf::from("/tmp/x"));
        c.cluster = Some(ClusterBlock {
            name: "c".into(),
            port: 6222,
            routes: vec!["nats-route://127.0.0.1:6223".into()],
        });
        let text = c.render();
        assert!(text.contains("server_name: \"n0\""), "{text}");
        assert!(text.contains("store_dir: \"/tmp/x\""), "{text}");
        assert!(text.contains("listen: \"127.0.0.1:6222\""), "{text}");
        assert!(
            text.contains("routes: [\"nats-route://127.0.0.1:6223\"]"),
            "{text}"
        );
    }

    #[test]
    fn server_starts_restarts_on_same_port_and_is_killed() {
        let mut server = NatsServer::start();
        assert!(read_info(server.port()).starts_with("INFO "));
        assert!(server.monitor("/jsz").is_some());
        let port = server.port();
        server.restart();
        assert_eq!(server.port(), port);
        assert!(read_info(port).starts_with("INFO "));
        server.kill();
        assert!(!server.is_running());
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        server.start_again();
        assert!(server.healthy());
        let dir = server.dir().to_owned();
        drop(server);
        assert!(!dir.exists());
    }
}
