//! Prometheus metrics. Handles are resolved once per component at load time
//! so the request path touches only atomics (and one histogram lock).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~13 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 19))
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
        Metrics {
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
    pub duration: Histogram,
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
}
