//! `keel topology`: the NATS super-cluster of a `regions.toml`.
//!
//! One NATS cluster per region, joined by gateways. Gateways cannot filter
//! subjects, so data residency comes from **accounts** (measured in
//! `research/nats-residency.md`, "Recommended configuration"):
//!
//! - one account per residency zone ([`region_account`]): all of the zone's
//!   regional traffic, personal data included. Its users (the edges of a
//!   region) exist **only in the configs of that region's servers**, so no
//!   server outside the zone ever has a subscriber — hence interest — in it.
//!   It exports only the request/reply API `keel.<region>.api.>` of each of
//!   its regions, imports those of every other zone and the stream
//!   `keel.global.>` from [`GLOBAL_ACCOUNT`]; its JetStream replication
//!   traffic stays in the account (`cluster_traffic: owner`).
//! - [`GLOBAL_ACCOUNT`]: global, non-personal data (`keel.global.>`, global
//!   KV); every edge has a second user `global-<edge>` there.
//! - [`SYS_ACCOUNT`]: the system account; its users (`sys-<region>`) may
//!   only subscribe to `$SYS.>` and `_INBOX.>` (unrestricted system users
//!   receive other accounts' JetStream API answers and Raft entries).
//!
//! Every password is derived from one secret ([`password`]), so a host
//! needs only the secret and its edge name to connect.

mod credentials;
mod render;

pub use credentials::{
    EdgeCredentials, GATEWAY_USER, GLOBAL_ACCOUNT, GLOBAL_CACHE_BUCKET, ROUTE_USER, SYS_ACCOUNT,
    audit_chain_key, cache_bucket_name, edge_credentials, edge_global_user, edge_user,
    ledger_stream_name, password, region_account, replicas, stream_name, sys_user,
};
pub use render::{RenderedServer, render, server_name, validate, write};
