//! `regions.toml`: the topology of a deployment (seed 000's format): which
//! edges form which region, each region's NATS cluster and residency class,
//! and how regions coordinate.
//!
//! Strict like `keel.toml`: unknown keys, an edge listed in two regions, a
//! coordinator that is not one of its region's edges, an unknown residency
//! class or an unsupported URL scheme are errors naming file, line, key and
//! what is accepted.

use crate::{Diagnostic, Diagnostics, Location};
use std::path::{Path, PathBuf};

/// The name of the reserved pseudo-region of global traffic
/// (`keel.global.>`); no region may be called this.
pub const GLOBAL_REGION: &str = "global";

/// A validated `regions.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionsConfig {
    /// The file this came from (as given).
    pub path: PathBuf,
    /// Regions in file order.
    pub regions: Vec<Region>,
    pub coordination: Coordination,
    pub nats: NatsTopology,
}

/// One `[regions.<name>]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    pub name: String,
    /// Edge (POP) names in file order; unique across the whole file.
    pub edges: Vec<String>,
    /// One of `edges`: the POP whose host runs the region's coordinator role
    /// (aggregation, migrations) beside the region's NATS servers.
    pub coordinator: String,
    /// Where the region's durable data lives (streams, KV).
    pub database: RegionalDatabase,
    /// Where the region's L2 cache lives.
    pub cache_tier: CacheTier,
    pub data_residency: Residency,
    /// Free-form compliance labels (`gdpr`, `dma`, `data-localization`, ...),
    /// reported by `region-info`; residency is decided by `data_residency`.
    pub compliance: Vec<String>,
    /// The members of the region's NATS cluster, in file order (≥ 1). Edges
    /// of the region connect to their client addresses.
    pub servers: Vec<NatsServerAddr>,
    /// Where `[regions.<name>]` is, for diagnostics.
    pub location: Location,
}

/// `database = ...`: the region's JetStream (streams, KV buckets) on its
/// NATS cluster. The only supported kind; the seed's `spanner://` is refused
/// with a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionalDatabase {
    Nats,
}

/// `cache_tier = ...`: the L2 cache backend of the region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheTier {
    /// JetStream KV bucket on the region's NATS cluster.
    Nats,
    /// No L2: edges use their L1 and L3 only.
    None,
}

/// `data_residency`: where a user homed in this region may have personal
/// data. Regions with the same zone form one NATS account (see
/// [`RegionsConfig::zone_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Residency {
    /// No restriction: personal data may go to any region.
    Global,
    /// United States: any region whose class is `us`.
    Us,
    /// EU/EEA (GDPR): any region whose class is `gdpr`.
    Gdpr,
    /// Data localization: the home region only.
    Local,
}

impl Residency {
    /// The spelling in `regions.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Residency::Global => "global",
            Residency::Us => "us",
            Residency::Gdpr => "gdpr",
            Residency::Local => "local",
        }
    }

    pub const ACCEPTED: &'static [&'static str] = &["global", "us", "gdpr", "local"];

    /// The class spelled `s` in `regions.toml` (one of [`Self::ACCEPTED`]).
    pub fn parse(s: &str) -> Option<Residency> {
        match s {
            "global" => Some(Residency::Global),
            "us" => Some(Residency::Us),
            "gdpr" => Some(Residency::Gdpr),
            "local" => Some(Residency::Local),
            _ => None,
        }
    }
}

/// One member of a region's NATS cluster. Written as a URL string
/// (`"nats://host:4222"`: cluster, gateway and monitoring ports default to
/// 6222, 7222 and 8222) or as a table naming every port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsServerAddr {
    /// Host name or IP address the other servers and the edges reach it at.
    pub host: String,
    pub client_port: u16,
    pub cluster_port: u16,
    pub gateway_port: u16,
    pub monitor_port: u16,
}

impl NatsServerAddr {
    /// `nats://host:client_port`, what edges connect to (an IPv6 host in
    /// brackets).
    pub fn client_url(&self) -> String {
        if self.host.contains(':') {
            format!("nats://[{}]:{}", self.host, self.client_port)
        } else {
            format!("nats://{}:{}", self.host, self.client_port)
        }
    }
}

/// `[coordination]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordination {
    /// `global_event_stream`: where `keel.global.>` travels. Only NATS
    /// gateways between the regions' clusters are supported.
    pub global_event_stream: GlobalEventStream,
    /// `consensus_protocol`: replication of regional streams and KV buckets.
    pub consensus_protocol: ConsensusProtocol,
    /// `partition_tolerance`: only `ap` (edges keep serving during a
    /// partition; the outbox replays after it).
    pub partition_tolerance: PartitionTolerance,
    /// `allow_cross_zone_migration`: may `migrate-user-region` move a user
    /// to a region of another residency zone? Default false.
    pub allow_cross_zone_migration: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobalEventStream {
    /// NATS gateways joining every region's cluster (a super-cluster).
    NatsGateways,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsensusProtocol {
    /// JetStream's Raft: streams and buckets replicated on
    /// `min(3, servers in the region)` servers.
    Raft,
    /// No replication (R1): for development topologies.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionTolerance {
    Ap,
}

/// `[nats]`: how `keel topology` and `keel up --edge` agree on credentials
/// and where generated servers keep JetStream data. Optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsTopology {
    /// Environment variable holding the secret every NATS password is
    /// derived from (HMAC-SHA256 of the user name), so nothing else has to
    /// be shipped to edges. Default `KEEL_NATS_SECRET`.
    pub secret_env: String,
    /// Root of the JetStream store directories in generated server configs
    /// (`<store_dir>/<server-name>`). Default `/var/lib/keel/nats`.
    pub store_dir: PathBuf,
}

impl RegionsConfig {
    /// Read and validate a `regions.toml`.
    pub fn load(path: &Path) -> Result<RegionsConfig, Diagnostics> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Diagnostics::one(Diagnostic::file(path, format!("cannot read: {e}"))))?;
        Self::parse(path, &text)
    }

    /// Validate `text` as if it were the content of `path` (relative paths
    /// in it resolve against `path`'s directory).
    pub fn parse(path: &Path, text: &str) -> Result<RegionsConfig, Diagnostics> {
        parse::parse(path, text)
    }

    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The region an edge belongs to.
    pub fn region_of_edge(&self, edge: &str) -> Option<&Region> {
        self.regions
            .iter()
            .find(|r| r.edges.iter().any(|e| e == edge))
    }

    /// The residency zone of a region: regions of class `us` share zone
    /// "us", `gdpr` regions share "gdpr"; a `local` or `global` region is a
    /// zone of its own (named after the region). One NATS account per zone.
    pub fn zone_of(&self, region: &str) -> Option<String> {
        let r = self.region(region)?;
        Some(match r.data_residency {
            Residency::Us | Residency::Gdpr => r.data_residency.as_str().to_string(),
            Residency::Local | Residency::Global => r.name.clone(),
        })
    }

    /// May personal data of a user homed in `home` be placed in `target`?
    /// `None` if either region is unknown.
    pub fn residency_allows(&self, home: &str, target: &str) -> Option<bool> {
        let h = self.region(home)?;
        self.region(target)?;
        Some(match h.data_residency {
            Residency::Global => true,
            _ => self.zone_of(home) == self.zone_of(target),
        })
    }
}

mod parse;
#[cfg(test)]
mod tests;
