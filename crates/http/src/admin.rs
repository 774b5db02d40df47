//! `/_keel/health`, `/_keel/ready`, `/_keel/components`, `/_keel/cluster`,
//! `/_keel/ui` (the operator dashboard), `/metrics`.

use crate::service::{Body, Shared, text};
use http::{HeaderValue, Request, StatusCode, header};
use std::sync::Arc;

/// The operator dashboard: one self-contained page polling `/_keel/cluster`.
const DASHBOARD: &str = include_str!("../ui/dashboard.html");

pub(crate) fn handle<B>(shared: &Arc<Shared>, req: &Request<B>) -> http::Response<Body> {
    match req.uri().path() {
        "/_keel/health" => text(StatusCode::OK, "ok\n"),
        "/_keel/ready" => {
            if shared.is_draining() {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"ready": false, "reason": "draining"}),
                )
            } else {
                // A disconnected bus does not make the node unready: edge
                // operations keep working through a partition (state syncs
                // and the outbox drains after the heal). It is reported so
                // operators and load balancers can tell.
                let bus = shared.runtime.services().map(|s| {
                    let mut v = serde_json::json!({
                        "backend": s.bus.kind(),
                        "state": s.bus.connection_state().as_str(),
                        "region": s.node.region,
                        "edge": s.node.edge,
                    });
                    if !std::sync::Arc::ptr_eq(&s.bus, &s.global_bus) {
                        v["global_state"] = s.global_bus.connection_state().as_str().into();
                        v["outbox_depth"] = shared.metrics.outbox.depth.get().into();
                    }
                    v
                });
                json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "ready": true,
                        "uptime_seconds": shared.started_at.elapsed().as_secs(),
                        "bus": bus,
                    }),
                )
            }
        }
        "/_keel/components" => json(StatusCode::OK, &components(shared)),
        "/_keel/cluster" => match shared.runtime.services() {
            Some(s) => {
                let report = s
                    .cluster
                    .report(s.cluster.snapshot(), std::time::Instant::now());
                match serde_json::to_value(&report) {
                    Ok(v) => json(StatusCode::OK, &v),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                }
            }
            None => text(StatusCode::NOT_FOUND, "this node runs no services\n"),
        },
        "/_keel/ui" => {
            let mut r = text(StatusCode::OK, DASHBOARD);
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        "/metrics" => {
            let mut r = text(StatusCode::OK, shared.metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        other => text(
            StatusCode::NOT_FOUND,
            format!(
                "no admin endpoint {other}; try /_keel/health, /_keel/ready, /_keel/components, /_keel/cluster, /_keel/ui, /metrics\n"
            ),
        ),
    }
}

fn components(shared: &Shared) -> serde_json::Value {
    let list: Vec<_> = shared
        .runtime
        .components()
        .iter()
        .map(|c| {
            let l = &c.config.limits;
            serde_json::json!({
                "name": c.name(),
                "route": c.config.route.to_string(),
                "wasm": c.config.wasm.display().to_string(),
                "sha256": c.digest,
                "grants": c.config.grants.iter().map(|g| g.name.clone()).collect::<Vec<_>>(),
                "allowed_outbound_hosts": c.config.allowed_outbound_hosts,
                "imports": c.imports,
                "exports": c.exports,
                "limits": {
                    "memory_bytes": l.memory,
                    "timeout_ms": l.timeout.as_millis() as u64,
                    "max_instances": l.max_instances,
                    "max_table_elements": l.max_table_elements,
                    "max_core_instances": l.max_core_instances,
                },
                "requests": c.metrics.total_requests(),
                "server_errors": c.metrics.server_errors(),
                "traps": c.metrics.traps.get(),
                "in_flight": c.metrics.in_flight.get(),
                "compiled_from_cache": c.from_cache,
                "load_ms": c.load_time.as_secs_f64() * 1000.0,
            })
        })
        .collect();
    serde_json::json!({ "components": list })
}

fn json(status: StatusCode, v: &serde_json::Value) -> http::Response<Body> {
    let mut r = text(status, v.to_string());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
