//! Integration tests: real `keel` processes serving real compiled guests.
//! Guests come from `make guests` (components/target/wasm/).

mod support;

mod admin;
mod audit;
mod browser;
mod cache;
mod chat;
mod config_errors;
mod crash;
mod dashboard;
mod edge_tier;
mod http_limits;
mod isolation;
mod ledger;
mod live;
mod privacy;
mod regional;
mod regions;
mod serving;
mod sync;
