//! Several NATS clusters joined by gateways, from config files given as
//! text (e.g. rendered by `keel topology`).

use crate::server::{NatsServer, ServerSpec};
use crate::wait_until;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

/// How long a super-cluster may take to form.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at starting when a just-picked free port was taken meanwhile.
const PORT_ATTEMPTS: usize = 3;

/// `nats-server` processes started from config texts ([`ServerSpec`]):
/// any number of clusters, joined by gateways when the texts say so.
/// Dropping it kills every server.
pub struct NatsSupercluster {
    servers: Vec<NatsServer>,
}

impl NatsSupercluster {
    /// Starts every server and waits until the super-cluster has formed
    /// (see [`NatsSupercluster::wait_formed`]). Panics with every server's
    /// config and log tail if it does not form within 60 s.
    pub fn start(specs: Vec<ServerSpec>) -> NatsSupercluster {
        let mut specs = Some(specs);
        Self::start_with(
            move || specs.take().expect("called once: no port retries"),
            1,
        )
    }

    /// Like [`NatsSupercluster::start`], but when it does not form because a
    /// port was taken by someone else between picking and binding it (the
    /// log says "address already in use"), kills everything and starts
    /// again on the specs `make` returns next (up to 3 attempts): `make`
    /// should pick fresh free ports each call.
    pub fn start_retrying(make: impl FnMut() -> Vec<ServerSpec>) -> NatsSupercluster {
        Self::start_with(make, PORT_ATTEMPTS)
    }

    fn start_with(mut make: impl FnMut() -> Vec<ServerSpec>, attempts: usize) -> NatsSupercluster {
        let mut last_failure = String::new();
        for attempt in 1..=attempts {
            let specs = make();
            assert!(
                !specs.is_empty(),
                "a super-cluster needs at least one server"
            );
            let mut names = BTreeSet::new();
            for s in &specs {
                assert!(
                    names.insert(s.server_name.clone()),
                    "server name {} given twice",
                    s.server_name
                );
            }
            let mut servers: Vec<NatsServer> =
                specs.into_iter().map(NatsServer::from_spec).collect();
            for s in &mut servers {
                s.spawn();
            }
            let mut sc = NatsSupercluster { servers };
            if sc.wait_formed(FORM_TIMEOUT) {
                return sc;
            }
            let port_taken = sc.servers.iter().any(|s| s.port_taken());
            last_failure = sc.describe();
            if !(port_taken && attempt < attempts) {
                break;
            }
            eprintln!("nats super-cluster: a port was taken; retrying on other ports");
        }
        panic!("nats super-cluster did not form within {FORM_TIMEOUT:?}\n{last_failure}");
    }

    /// Polls until every running server is healthy (`/healthz`: JetStream
    /// current with the meta leader), has routes to every other running
    /// member of its cluster (`/routez`) and an outbound gateway connection
    /// to every other cluster with a running member, each cluster has an
    /// inbound gateway connection from every running server of every other
    /// cluster (`/gatewayz`), and all agree on one JetStream meta leader.
    pub fn wait_formed(&mut self, timeout: Duration) -> bool {
        let servers = &mut self.servers;
        wait_until(timeout, || {
            let running: Vec<usize> = (0..servers.len())
                .filter(|&i| servers[i].is_running())
                .collect();
            if running.is_empty() {
                return false;
            }
            let clusters: BTreeSet<&str> = running
                .iter()
                .filter_map(|&i| servers[i].cluster())
                .collect();
            let mut leader: Option<String> = None;
            // (cluster, remote cluster) → inbound gateway connections.
            let mut inbound: BTreeMap<(String, String), usize> = BTreeMap::new();
            for &i in &running {
                let s = &servers[i];
                if !s.healthy() {
                    return false;
                }
                if let Some(cluster) = s.cluster() {
                    let peers = running
                        .iter()
                        .filter(|&&j| j != i && servers[j].cluster() == Some(cluster))
                        .count();
                    if peers > 0 && route_peers(s) < peers {
                        return false;
                    }
                    let others: Vec<&str> =
                        clusters.iter().copied().filter(|c| *c != cluster).collect();
                    if !others.is_empty() {
                        let Some(gw) = s.monitor("/gatewayz") else {
                            return false;
                        };
                        if !others
                            .iter()
                            .all(|c| gw["outbound_gateways"].get(*c).is_some())
                        {
                            return false;
                        }
                        for (from, conns) in
                            gw["inbound_gateways"].as_object().into_iter().flatten()
                        {
                            let n = conns.as_array().map_or(0, Vec::len);
                            *inbound
                                .entry((cluster.to_string(), from.clone()))
                                .or_default() += n;
                        }
                    }
                }
                let Some(jsz) = s.monitor("/jsz") else {
                    return false;
                };
                // A standalone server has no meta group; healthy is enough.
                if let Some(l) = jsz["meta_cluster"]["leader"].as_str() {
                    if l.is_empty() {
                        return false;
                    }
                    match &leader {
                        None => leader = Some(l.to_owned()),
                        Some(prev) if prev != l => return false,
                        Some(_) => {}
                    }
                }
            }
            // Every server of a cluster connects to one server of each
            // other cluster: a cluster's servers together have an inbound
            // connection per running server of every other cluster.
            for &i in &running {
                let Some(from) = servers[i].cluster() else {
                    continue;
                };
                let expected = running
                    .iter()
                    .filter(|&&j| servers[j].cluster() == Some(from))
                    .count();
                for to in clusters.iter().filter(|c| **c != from) {
                    let got = inbound
                        .get(&(to.to_string(), from.to_string()))
                        .copied()
                        .unwrap_or(0);
                    if got < expected {
                        return false;
                    }
                }
            }
            true
        })
    }

    /// Every server, in the order given.
    pub fn servers(&self) -> &[NatsServer] {
        &self.servers
    }

    /// The server called `server_name`. Panics if there is none.
    pub fn server(&self, server_name: &str) -> &NatsServer {
        let i = self.index_of(server_name);
        &self.servers[i]
    }

    /// For `stop()`, `kill()`, `restart()` of one server.
    pub fn server_mut(&mut self, server_name: &str) -> &mut NatsServer {
        let i = self.index_of(server_name);
        &mut self.servers[i]
    }

    /// `nats://host:client_port` of the server called `server_name`.
    pub fn url(&self, server_name: &str) -> String {
        self.server(server_name).url()
    }

    fn index_of(&self, server_name: &str) -> usize {
        self.servers
            .iter()
            .position(|s| s.server_name() == server_name)
            .unwrap_or_else(|| panic!("no server {server_name} in the super-cluster"))
    }

    /// Every server's state, config and log tail (for failure messages).
    pub fn describe(&mut self) -> String {
        let mut out = String::new();
        for s in &mut self.servers {
            let running = s.is_running();
            let _ = writeln!(
                out,
                "--- {} (running: {running}, healthz: {:?})\nconfig:\n{}last log lines ({}):\n{}",
                s.server_name(),
                s.http("/healthz"),
                s.config_text(),
                s.log_path().display(),
                s.log_tail(30)
            );
        }
        out
    }
}

/// Distinct servers `s` has routes to.
fn route_peers(s: &NatsServer) -> usize {
    let Some(routez) = s.monitor("/routez") else {
        return 0;
    };
    let peers: BTreeSet<&str> = routez["routes"]
        .as_array()
        .map(|rs| rs.iter().filter_map(|r| r["remote_id"].as_str()).collect())
        .unwrap_or_default();
    peers.len()
}
