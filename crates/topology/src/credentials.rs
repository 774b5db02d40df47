//! Names and credentials: the one way to compute account and user names,
//! passwords, stream names and replica counts, shared by `keel topology`
//! (server configs) and `keel up --edge` (client connections).

use hmac::{Hmac, Mac};
use keel_config::{ConsensusProtocol, RegionsConfig};
use sha2::Sha256;
use std::fmt;

/// The account of global, non-personal data (`keel.global.>`, global KV).
pub const GLOBAL_ACCOUNT: &str = "GLOBAL";
/// The system account (`system_account` of every server).
pub const SYS_ACCOUNT: &str = "SYS";
/// The user servers of one region authenticate their gateway connections
/// with.
pub const GATEWAY_USER: &str = "gateway";
/// The user servers of one region authenticate their cluster routes with.
pub const ROUTE_USER: &str = "route";

/// Hex digits of a password (128 bits).
const PASSWORD_HEX_LEN: usize = 32;

/// The password of NATS user `user`: the first 32 lowercase hex digits of
/// HMAC-SHA256(`secret`, `"keel-nats-user:" + user`).
pub fn password(secret: &[u8], user: &str) -> String {
    // HMAC accepts keys of any length (longer ones are hashed first), so
    // `new_from_slice` cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(b"keel-nats-user:");
    mac.update(user.as_bytes());
    let mut hex = hex::encode(mac.finalize().into_bytes());
    hex.truncate(PASSWORD_HEX_LEN);
    hex
}

/// The HMAC key of the audit chain (`keel-ledger::audit`): only holders
/// of the deployment secret can write records that verify.
pub fn audit_chain_key(secret: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(b"keel-audit-chain");
    mac.finalize().into_bytes().to_vec()
}

/// An edge's user in its residency zone's account: the edge name.
pub fn edge_user(edge: &str) -> String {
    edge.to_string()
}

/// An edge's user in [`GLOBAL_ACCOUNT`]: `global-<edge>`.
pub fn edge_global_user(edge: &str) -> String {
    format!("global-{edge}")
}

/// A region's user in [`SYS_ACCOUNT`]: `sys-<region>`.
pub fn sys_user(region: &str) -> String {
    format!("sys-{region}")
}

/// `ap-south` → `AP_SOUTH`.
fn upper_snake(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

/// The account of `region`'s residency zone ([`RegionsConfig::zone_of`]):
/// the zone name uppercased with `-` → `_` (`gdpr` → `GDPR`, a `local`
/// region `ap-south` → `AP_SOUTH`). A region not in `regions` is taken as a
/// zone of its own.
pub fn region_account(regions: &RegionsConfig, region: &str) -> String {
    let zone = regions
        .zone_of(region)
        .unwrap_or_else(|| region.to_string());
    upper_snake(&zone)
}

/// The JetStream stream of a region's events: `KEEL_<REGION>_EVENTS`
/// (`eu-central` → `KEEL_EU_CENTRAL_EVENTS`).
pub fn stream_name(region: &str) -> String {
    format!("KEEL_{}_EVENTS", upper_snake(region))
}

/// The JetStream stream of a region's ledger: `KEEL_<REGION>_LEDGER`, in
/// the region's zone account, placed on the region's cluster, subjects
/// `keel.<region>.ledger.>`.
pub fn ledger_stream_name(region: &str) -> String {
    format!("KEEL_{}_LEDGER", upper_snake(region))
}

/// The KV bucket of a region's cache tier (L2): `KEEL_<REGION>_CACHE`, in
/// the region's zone account, placed on the region's cluster.
pub fn cache_bucket_name(region: &str) -> String {
    format!("KEEL_{}_CACHE", upper_snake(region))
}

/// The KV bucket of the global cache tier (L3), in the `GLOBAL` account.
pub const GLOBAL_CACHE_BUCKET: &str = "KEEL_GLOBAL_CACHE";

/// Replicas of a region's streams and KV buckets: with
/// `consensus_protocol = "raft"` `min(3, servers in the region)`, with
/// `"none"` 1. At least 1 (also for an unknown region).
pub fn replicas(regions: &RegionsConfig, region: &str) -> usize {
    match regions.coordination.consensus_protocol {
        ConsensusProtocol::Raft => regions
            .region(region)
            .map_or(1, |r| r.servers.len().clamp(1, 3)),
        ConsensusProtocol::None => 1,
    }
}

/// Everything an edge host needs to connect to its region's cluster: two
/// connections, one in its zone's account and one in [`GLOBAL_ACCOUNT`].
/// `Debug` does not print the passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct EdgeCredentials {
    pub edge: String,
    pub region: String,
    /// The zone account ([`region_account`]).
    pub account: String,
    pub user: String,
    pub password: String,
    pub global_user: String,
    pub global_password: String,
    /// Client URLs of the region's servers (`nats://host:port`), file order.
    pub servers: Vec<String>,
}

impl fmt::Debug for EdgeCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeCredentials")
            .field("edge", &self.edge)
            .field("region", &self.region)
            .field("account", &self.account)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("global_user", &self.global_user)
            .field("global_password", &"<redacted>")
            .field("servers", &self.servers)
            .finish()
    }
}

/// The credentials of `edge`; `None` if no region lists it.
pub fn edge_credentials(
    regions: &RegionsConfig,
    secret: &[u8],
    edge: &str,
) -> Option<EdgeCredentials> {
    let region = regions.region_of_edge(edge)?;
    let user = edge_user(edge);
    let global_user = edge_global_user(edge);
    Some(EdgeCredentials {
        edge: edge.to_string(),
        region: region.name.clone(),
        account: region_account(regions, &region.name),
        password: password(secret, &user),
        global_password: password(secret, &global_user),
        user,
        global_user,
        servers: region.servers.iter().map(|s| s.client_url()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::{sample, three_regions};
    use keel_config::ConsensusProtocol;

    #[test]
    fn password_is_hmac_sha256_hex_prefix() {
        // RFC 4231 test case 2 checks the HMAC itself; this pins our
        // derivation (message prefix, truncation) so configs and clients
        // never drift apart.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").expect("any key length");
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let p = password(b"secret", "fra");
        assert_eq!(p.len(), 32);
        assert!(
            p.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").expect("any key length");
        mac.update(b"keel-nats-user:fra");
        assert_eq!(p, hex::encode(mac.finalize().into_bytes())[..32]);
        assert_eq!(p, password(b"secret", "fra"));
        assert_ne!(p, password(b"secret", "ams"));
        assert_ne!(p, password(b"other", "fra"));
        assert_eq!(password(b"", "x").len(), 32);
    }

    #[test]
    fn names() {
        let r = three_regions();
        assert_eq!(edge_user("sfo"), "sfo");
        assert_eq!(edge_global_user("sfo"), "global-sfo");
        assert_eq!(sys_user("us-west"), "sys-us-west");
        assert_eq!(region_account(&r, "us-west"), "US");
        assert_eq!(region_account(&r, "eu-central"), "GDPR");
        assert_eq!(region_account(&r, "ap-south"), "AP_SOUTH");
        assert_eq!(region_account(&r, "nowhere"), "NOWHERE");
        assert_eq!(stream_name("eu-central"), "KEEL_EU_CENTRAL_EVENTS");
        assert_eq!(stream_name("us-west"), "KEEL_US_WEST_EVENTS");
    }

    #[test]
    fn replicas_follow_consensus_protocol() {
        let mut r = three_regions();
        assert_eq!(replicas(&r, "eu-central"), 3);
        assert_eq!(replicas(&r, "us-west"), 1);
        assert_eq!(replicas(&r, "nowhere"), 1);
        let mut big = sample(&[("big", keel_config::Residency::Us, 5, &["a"])]);
        assert_eq!(replicas(&big, "big"), 3);
        big.coordination.consensus_protocol = ConsensusProtocol::None;
        assert_eq!(replicas(&big, "big"), 1);
        r.coordination.consensus_protocol = ConsensusProtocol::None;
        assert_eq!(replicas(&r, "eu-central"), 1);
    }

    #[test]
    fn edge_credentials_name_region_account_and_servers() {
        let r = three_regions();
        let c = edge_credentials(&r, b"s", "ams").expect("ams is an edge");
        assert_eq!(c.region, "eu-central");
        assert_eq!(c.account, "GDPR");
        assert_eq!(c.user, "ams");
        assert_eq!(c.password, password(b"s", "ams"));
        assert_eq!(c.global_user, "global-ams");
        assert_eq!(c.global_password, password(b"s", "global-ams"));
        assert_eq!(c.servers.len(), 3);
        assert!(!format!("{c:?}").contains(&c.password));
        assert!(edge_credentials(&r, b"s", "nowhere").is_none());
    }
}
