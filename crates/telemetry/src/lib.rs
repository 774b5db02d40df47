//! Logging setup and the process-wide metrics registry.

pub mod metrics;
pub use metrics::{
    BusMetrics, CacheLevelMetrics, CacheMetrics, ComponentMetrics, DeliveryMetrics, LatencySummary,
    LedgerMetrics, LiveMetrics, Metrics, OutboxMetrics, RejectReason, SyncMetrics,
};

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Log format for [`init_logging`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Pretty on a TTY, JSON lines otherwise.
    Auto,
    Pretty,
    Json,
}

/// Installs the global `tracing` subscriber. Filter from `KEEL_LOG` (same
/// syntax as `RUST_LOG`), default `info`. Logs go to stderr.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("KEEL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Auto => !std::io::stderr().is_terminal(),
        LogFormat::Pretty => false,
        LogFormat::Json => true,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}
