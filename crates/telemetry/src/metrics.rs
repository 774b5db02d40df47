//! Prometheus metrics. Handles are resolved once per component at load time
//! so the request path touches only atomics (and one histogram lock).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Upper bounds of the latency buckets: 50 µs .. ~13 s.
const LATENCY_START: f64 = 0.00005;
const LATENCY_FACTOR: f64 = 2.0;
const LATENCY_BUCKETS: usize = 19;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        LATENCY_START,
        LATENCY_FACTOR,
        LATENCY_BUCKETS as u16,
    ))
}

fn latency_bound(i: usize) -> f64 {
    LATENCY_START * LATENCY_FACTOR.powi(i as i32)
}

/// Why the host answered a request without running a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    NotFound,
    BodyTooLarge,
    Overloaded,
    Draining,
}

impl RejectReason {
    fn label(self) -> &'static str {
        match self {
            RejectReason::NotFound => "not_found",
            RejectReason::BodyTooLarge => "body_too_large",
            RejectReason::Overloaded => "overloaded",
            RejectReason::Draining => "draining",
        }
    }
}

/// The process's registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    instantiation: Family<Labels, Histogram, fn() -> Histogram>,
    traps: Family<Labels, Counter>,
    in_flight: Family<Labels, Gauge>,
    rejected: Family<Labels, Counter>,
    connections: Counter,
    /// State sync (`keel-sync`).
    pub sync: SyncMetrics,
    /// The bus connection (`keel-bus`).
    pub bus: BusMetrics,
    /// The outbox forwarder (`keel-coord`).
    pub outbox: OutboxMetrics,
    /// The hierarchical cache (`keel-cache`).
    pub cache: CacheMetrics,
    /// The strongly consistent ledger (`keel-ledger`).
    pub ledger: LedgerMetrics,
    /// Live (SSE) connections to browsers (`keel-runtime`'s live hub).
    pub live: LiveMetrics,
    /// Subscription deliveries to components (`keel-runtime`'s regional
    /// tier).
    pub deliveries: DeliveryMetrics,
}

/// Subscription deliveries to components' `subscriber` exports. Cheap to
/// clone (shared atomics).
#[derive(Clone, Default)]
pub struct DeliveryMetrics {
    /// Events delivered (in successful calls).
    pub events: Counter,
    /// Successful `subscriber` calls (one per batch).
    pub batches: Counter,
    /// Milliseconds from publication (the event's HLC) to the delivery of
    /// the newest event of the last batch: how far this node's
    /// subscriptions run behind.
    pub lag_ms: Gauge,
}

/// Live delivery to browsers. Cheap to clone (shared atomics).
#[derive(Clone, Default)]
pub struct LiveMetrics {
    /// Open live connections.
    pub connections: Gauge,
    /// Events queued to a connection (one publish to n connections counts n).
    pub events: Counter,
    /// Connections closed because they fell behind.
    pub slow_disconnects: Counter,
    /// Connection attempts refused (auth, channel not allowed, limits).
    pub refused: Counter,
}

/// The ledger (`keel-ledger`). Cheap to clone (shared atomics).
#[derive(Clone, Default)]
pub struct LedgerMetrics {
    /// Entries appended (replays and refusals not counted).
    pub appends: Counter,
    /// Appends answered with an earlier entry of the same idempotency key.
    pub replays: Counter,
    /// Appends refused: insufficient funds or a reused key with another amount.
    pub refusals: Counter,
    /// Records written to the log (each carries the appends batched into it).
    pub records: Counter,
    /// Appends of a record that lost the compare-and-set to another writer.
    pub conflicts: Counter,
}

/// Counters of the state-sync service. Cheap to clone (shared atomics).
#[derive(Clone, Default)]
pub struct SyncMetrics {
    /// Delta messages published (after coalescing).
    pub deltas_sent: Counter,
    pub delta_bytes_sent: Counter,
    /// Delta messages received from other replicas and merged.
    pub deltas_received: Counter,
    /// Anti-entropy digests published.
    pub digests_sent: Counter,
    /// Full states pushed to repair a replica whose digest differed.
    pub repairs_sent: Counter,
    /// Messages refused: undecodable, wrong scope, or a clock too far ahead.
    pub rejected: Counter,
    /// Deltas dropped because the publish queue was full (anti-entropy
    /// repairs them).
    pub dropped: Counter,
    /// Replica writes whose persistence failed.
    pub persist_failures: Counter,
}

/// The bus connection. `connected` is 1 while connected, 0 otherwise.
#[derive(Clone, Default)]
pub struct BusMetrics {
    pub connected: Gauge,
    /// Times the connection was lost.
    pub disconnects: Counter,
}

/// The outbox and its forwarder to the region's stream.
#[derive(Clone, Default)]
pub struct OutboxMetrics {
    /// Entries waiting for the region's acknowledgement.
    pub depth: Gauge,
    /// Entries acknowledged by the region's stream (duplicates included).
    pub forwarded: Counter,
    /// Acknowledgements that said "duplicate": the region already had it.
    pub duplicates: Counter,
    /// Failed forwarding rounds (partition, stream missing, timeout).
    pub errors: Counter,
}

/// One level of the hierarchical cache (`level` label `l1`, `l2`, `l3`).
#[derive(Clone, Default)]
pub struct CacheLevelMetrics {
    pub hits: Counter,
    pub misses: Counter,
    /// Entries dropped for size or age (L2/L3: found expired on read).
    pub evictions: Counter,
    /// Keys or prefixes dropped by `invalidate` (remote ones included).
    pub invalidations: Counter,
    /// Reads of the level that failed (bus unavailable); counted as misses too.
    pub errors: Counter,
}

/// The hierarchical cache: per level, plus the component loader.
#[derive(Clone)]
pub struct CacheMetrics {
    pub l1: CacheLevelMetrics,
    pub l2: CacheLevelMetrics,
    pub l3: CacheLevelMetrics,
    /// Calls of a component's `cache-loader.load` (after a miss everywhere).
    pub loads: Counter,
    pub load_errors: Counter,
    pub load_duration: Histogram,
}

impl CacheMetrics {
    /// Registers the cache's families; the level handles are their children.
    fn registered(registry: &mut Registry) -> CacheMetrics {
        let family = |registry: &mut Registry, name: &str, help: &str| {
            let f = Family::<Labels, Counter>::default();
            registry.register(name, help, f.clone());
            f
        };
        let hits = family(
            registry,
            "cache_hits",
            "Cache lookups answered by the level",
        );
        let misses = family(
            registry,
            "cache_misses",
            "Cache lookups the level could not answer",
        );
        let evictions = family(
            registry,
            "cache_evictions",
            "Cache entries dropped for size or age (L2/L3: found expired)",
        );
        let invalidations = family(
            registry,
            "cache_invalidations",
            "Cache keys or prefixes dropped by invalidate",
        );
        let errors = family(
            registry,
            "cache_errors",
            "Cache level reads or writes that failed (bus unavailable)",
        );
        let level = |name: &str| {
            let l: Labels = vec![("level", name.to_string())];
            CacheLevelMetrics {
                hits: hits.get_or_create_owned(&l),
                misses: misses.get_or_create_owned(&l),
                evictions: evictions.get_or_create_owned(&l),
                invalidations: invalidations.get_or_create_owned(&l),
                errors: errors.get_or_create_owned(&l),
            }
        };
        let m = CacheMetrics {
            l1: level("l1"),
            l2: level("l2"),
            l3: level("l3"),
            loads: Counter::default(),
            load_errors: Counter::default(),
            load_duration: latency_histogram(),
        };
        registry.register(
            "cache_loads",
            "Calls of a component's cache-loader after a miss in every level",
            m.loads.clone(),
        );
        registry.register(
            "cache_load_errors",
            "cache-loader calls that failed",
            m.load_errors.clone(),
        );
        registry.register(
            "cache_load_duration_seconds",
            "Time a cache-loader call took",
            m.load_duration.clone(),
        );
        m
    }
}

impl Default for CacheMetrics {
    /// Unregistered handles (tests).
    fn default() -> Self {
        CacheMetrics::registered(&mut Registry::default())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keel");
        let requests = Family::<Labels, Counter>::default();
        let duration =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let instantiation =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let traps = Family::<Labels, Counter>::default();
        let in_flight = Family::<Labels, Gauge>::default();
        let rejected = Family::<Labels, Counter>::default();
        let connections = Counter::default();
        registry.register(
            "http_requests",
            "Requests answered by a component, by status class",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request head to response head, per component",
            duration.clone(),
        );
        registry.register(
            "instantiation_duration_seconds",
            "Time to create a fresh instance for one request",
            instantiation.clone(),
        );
        registry.register(
            "traps",
            "Requests that ended in a trap, panic, deadline or memory limit",
            traps.clone(),
        );
        registry.register("instances_in_flight", "Live instances", in_flight.clone());
        registry.register(
            "http_rejected",
            "Requests answered by the host without running a component",
            rejected.clone(),
        );
        registry.register(
            "http_connections",
            "Accepted TCP connections",
            connections.clone(),
        );
        let sync = SyncMetrics::default();
        for (name, help, c) in [
            (
                "sync_deltas_sent",
                "CRDT delta messages published",
                &sync.deltas_sent,
            ),
            (
                "sync_delta_bytes_sent",
                "Bytes of CRDT delta messages published",
                &sync.delta_bytes_sent,
            ),
            (
                "sync_deltas_received",
                "CRDT delta messages received and merged",
                &sync.deltas_received,
            ),
            (
                "sync_digests_sent",
                "Anti-entropy digests published",
                &sync.digests_sent,
            ),
            (
                "sync_repairs_sent",
                "Full CRDT states pushed to repair another replica",
                &sync.repairs_sent,
            ),
            (
                "sync_rejected",
                "Sync messages refused (undecodable, wrong scope, clock too far ahead)",
                &sync.rejected,
            ),
            (
                "sync_dropped",
                "CRDT deltas dropped on a full publish queue (repaired by anti-entropy)",
                &sync.dropped,
            ),
            (
                "sync_persist_failures",
                "CRDT replica writes that failed to persist",
                &sync.persist_failures,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        let bus = BusMetrics::default();
        registry.register(
            "bus_connected",
            "1 while the bus is connected, 0 otherwise",
            bus.connected.clone(),
        );
        registry.register(
            "bus_disconnects",
            "Times the bus connection was lost",
            bus.disconnects.clone(),
        );
        let outbox = OutboxMetrics::default();
        registry.register(
            "outbox_depth",
            "Writes waiting in the outbox for the region",
            outbox.depth.clone(),
        );
        for (name, help, c) in [
            (
                "outbox_forwarded",
                "Outbox entries acknowledged by the region's stream",
                &outbox.forwarded,
            ),
            (
                "outbox_duplicates",
                "Outbox entries the region's stream already had",
                &outbox.duplicates,
            ),
            (
                "outbox_errors",
                "Failed outbox forwarding rounds",
                &outbox.errors,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        let cache = CacheMetrics::registered(&mut registry);
        let ledger = LedgerMetrics::default();
        for (name, help, c) in [
            ("ledger_appends", "Ledger entries appended", &ledger.appends),
            (
                "ledger_replays",
                "Ledger appends answered by an earlier entry with the same idempotency key",
                &ledger.replays,
            ),
            (
                "ledger_refusals",
                "Ledger appends refused (insufficient funds, key reused with another amount)",
                &ledger.refusals,
            ),
            (
                "ledger_records",
                "Ledger records written (each batches concurrent appends of one account)",
                &ledger.records,
            ),
            (
                "ledger_conflicts",
                "Ledger record writes that lost the compare-and-set to another writer",
                &ledger.conflicts,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        let live = LiveMetrics::default();
        registry.register(
            "live_connections",
            "Open live (server-sent events) connections",
            live.connections.clone(),
        );
        for (name, help, c) in [
            (
                "live_events",
                "Live events queued to connections",
                &live.events,
            ),
            (
                "live_slow_disconnects",
                "Live connections closed because they fell behind",
                &live.slow_disconnects,
            ),
            (
                "live_refused",
                "Live connections refused (auth, channel, limits)",
                &live.refused,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        let deliveries = DeliveryMetrics::default();
        registry.register(
            "subscription_lag_ms",
            "Milliseconds from publication to delivery of the newest event of the last subscriber batch",
            deliveries.lag_ms.clone(),
        );
        for (name, help, c) in [
            (
                "subscription_events",
                "Events delivered to subscriber exports",
                &deliveries.events,
            ),
            (
                "subscription_batches",
                "Successful subscriber calls (batches)",
                &deliveries.batches,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        Metrics {
            deliveries,
            live,
            ledger,
            sync,
            bus,
            outbox,
            cache,
            registry,
            requests,
            duration,
            instantiation,
            traps,
            in_flight,
            rejected,
            connections,
        }
    }

    /// Handles for one component (call once, at load).
    pub fn component(&self, name: &str) -> ComponentMetrics {
        let l = |extra: Option<(&'static str, &str)>| {
            let mut v: Labels = vec![("component", name.to_string())];
            if let Some((k, val)) = extra {
                v.push((k, val.to_string()));
            }
            v
        };
        ComponentMetrics {
            ok: self
                .requests
                .get_or_create_owned(&l(Some(("status", "2xx")))),
            redirect: self
                .requests
                .get_or_create_owned(&l(Some(("status", "3xx")))),
            client_error: self
                .requests
                .get_or_create_owned(&l(Some(("status", "4xx")))),
            server_error: self
                .requests
                .get_or_create_owned(&l(Some(("status", "5xx")))),
            duration: self.duration.get_or_create_owned(&l(None)),
            latency: LatencyBuckets::default(),
            instantiation: self.instantiation.get_or_create_owned(&l(None)),
            traps: self.traps.get_or_create_owned(&l(None)),
            in_flight: self.in_flight.get_or_create_owned(&l(None)),
        }
    }

    pub fn rejected(&self, reason: RejectReason) {
        self.rejected
            .get_or_create(&vec![("reason", reason.label().to_string())])
            .inc();
    }

    pub fn connection_accepted(&self) {
        self.connections.inc();
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Pre-resolved metric handles of one component.
#[derive(Clone)]
pub struct ComponentMetrics {
    ok: Counter,
    redirect: Counter,
    client_error: Counter,
    server_error: Counter,
    /// Exported as `keel_http_request_duration_seconds`; observe through
    /// [`ComponentMetrics::observe_duration`] so quantiles see it too.
    duration: Histogram,
    /// The same observations, readable here (the Prometheus histogram's
    /// buckets are not), for quantiles on the dashboard.
    latency: LatencyBuckets,
    pub instantiation: Histogram,
    pub traps: Counter,
    pub in_flight: Gauge,
}

impl ComponentMetrics {
    pub fn response(&self, status: u16) {
        match status {
            200..=299 => &self.ok,
            300..=399 => &self.redirect,
            400..=499 => &self.client_error,
            _ => &self.server_error,
        }
        .inc();
    }

    /// Total requests answered (for `/_keel/components`).
    pub fn total_requests(&self) -> u64 {
        self.ok.get() + self.redirect.get() + self.client_error.get() + self.server_error.get()
    }

    pub fn server_errors(&self) -> u64 {
        self.server_error.get()
    }

    /// Records how long one request (or subscriber delivery) took.
    pub fn observe_duration(&self, seconds: f64) {
        self.duration.observe(seconds);
        self.latency.observe(seconds);
    }

    /// Count, sum and quantiles of every duration observed so far.
    pub fn latency(&self) -> LatencySummary {
        self.latency.summary()
    }
}

/// Cumulative latency of one component. Quantiles are bucket upper bounds
/// (factor 2 apart), `None` before the first observation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub sum_seconds: f64,
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
}

/// Bucket counts (not cumulative) of the latency histogram's bounds, plus
/// one past the last bound, and the sum in nanoseconds.
#[derive(Clone, Default)]
struct LatencyBuckets(std::sync::Arc<LatencyInner>);

#[derive(Default)]
struct LatencyInner {
    buckets: [std::sync::atomic::AtomicU64; LATENCY_BUCKETS + 1],
    sum_nanos: std::sync::atomic::AtomicU64,
}

impl LatencyBuckets {
    fn observe(&self, seconds: f64) {
        use std::sync::atomic::Ordering::Relaxed;
        let i = (0..LATENCY_BUCKETS)
            .find(|&i| seconds <= latency_bound(i))
            .unwrap_or(LATENCY_BUCKETS);
        self.0.buckets[i].fetch_add(1, Relaxed);
        self.0
            .sum_nanos
            .fetch_add((seconds.max(0.0) * 1e9) as u64, Relaxed);
    }

    fn summary(&self) -> LatencySummary {
        let sum_seconds = self.0.sum_nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9;
        let counts: Vec<u64> = self
            .0
            .buckets
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let quantile = |q: f64| {
            if total == 0 {
                return None;
            }
            let rank = ((q * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    // Past the last bound: report the last bound.
                    return Some(latency_bound(i.min(LATENCY_BUCKETS - 1)));
                }
            }
            Some(latency_bound(LATENCY_BUCKETS - 1))
        };
        LatencySummary {
            count: total,
            sum_seconds,
            p50_seconds: quantile(0.5),
            p99_seconds: quantile(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_are_bucket_upper_bounds() {
        let m = Metrics::new().component("c");
        assert_eq!(m.latency().p50_seconds, None);
        for _ in 0..98 {
            m.observe_duration(0.00004); // first bucket: <= 50 µs
        }
        m.observe_duration(0.003); // <= 3.2 ms
        m.observe_duration(100.0); // past the last bound
        let l = m.latency();
        assert_eq!(l.count, 100);
        assert!((l.sum_seconds - (98.0 * 0.00004 + 100.003)).abs() < 1e-6);
        assert_eq!(l.p50_seconds, Some(0.00005));
        assert_eq!(l.p99_seconds, Some(0.00005 * 64.0));
        m.observe_duration(100.0);
        m.observe_duration(100.0);
        assert_eq!(l.count + 2, m.latency().count);
        assert_eq!(
            m.latency().p99_seconds,
            Some(latency_bound(LATENCY_BUCKETS - 1))
        );
    }
}
