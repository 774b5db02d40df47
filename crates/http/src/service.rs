//! Per-request handling: admin routes, component routes, limits, errors.

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use keel_config::ServerConfig;
use keel_runtime::{GuestFailure, HyperOutgoingBody, LimitedBody, Runtime};
use keel_telemetry::{Metrics, RejectReason};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// State shared by every worker.
pub struct Shared {
    pub runtime: Arc<Runtime>,
    pub metrics: Arc<Metrics>,
    pub(crate) draining: Arc<AtomicBool>,
    max_body_bytes: u64,
    request_seq: AtomicU64,
    /// Distinguishes request ids of different processes.
    id_prefix: u32,
    pub started_at: Instant,
}

impl Shared {
    pub(crate) fn new(runtime: Arc<Runtime>, metrics: Arc<Metrics>, config: &ServerConfig) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
            .unwrap_or(0)
            ^ std::process::id().rotate_left(16);
        Shared {
            runtime,
            metrics,
            draining: Arc::new(AtomicBool::new(false)),
            max_body_bytes: config.max_body_bytes,
            request_seq: AtomicU64::new(1),
            id_prefix: seed,
            started_at: Instant::now(),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn next_request_id(&self) -> String {
        let n = self.request_seq.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}{:08x}", self.id_prefix, n)
    }
}

pub(crate) type Body = HyperOutgoingBody;

pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e: Infallible| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(crate) fn service(
    shared: Arc<Shared>,
    started: Arc<AtomicBool>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |req: Request<Incoming>| {
        started.store(true, Ordering::Relaxed);
        let shared = shared.clone();
        async move { Ok(handle(&shared, req).await) }
    })
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    if let Some(component) = path.strip_prefix("/_keel/live/") {
        return crate::live::handle(shared, &req, component);
    }
    if path.starts_with("/_keel/") || path == "/_keel" || path == "/metrics" {
        return crate::admin::handle(shared, &req);
    }
    let Some(component) = shared.runtime.route(path) else {
        shared.metrics.rejected(RejectReason::NotFound);
        return text(
            StatusCode::NOT_FOUND,
            format!("no component serves {path}\n"),
        );
    };
    let started = Instant::now();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > shared.max_body_bytes) {
        shared.metrics.rejected(RejectReason::BodyTooLarge);
        return too_large(shared.max_body_bytes);
    }
    let Some(permit) = component.try_reserve() else {
        shared.metrics.rejected(RejectReason::Overloaded);
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "component {} is at its instance limit; retry\n",
                component.name()
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };

    let request_id = shared.next_request_id();
    let (req, flag) = {
        let (parts, body) = req.into_parts();
        let (body, flag) = LimitedBody::new(body, shared.max_body_bytes);
        (Request::from_parts(parts, body), flag)
    };
    let mut response = match component.handle(req, permit).await {
        Ok(_) if flag.exceeded() => {
            shared.metrics.rejected(RejectReason::BodyTooLarge);
            too_large(shared.max_body_bytes)
        }
        Ok(r) => r,
        Err(GuestFailure(reason)) => {
            component.metrics.traps.inc();
            tracing::error!(
                component = component.name(),
                request_id = %request_id,
                reason = %reason,
                "request failed in component"
            );
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "internal error in component {} (request id {request_id})\n",
                    component.name()
                ),
            )
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    component
        .metrics
        .observe_duration(started.elapsed().as_secs_f64());
    component.metrics.response(response.status().as_u16());
    response
}

fn too_large(limit: u64) -> Response<Body> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {limit} bytes\n"),
    )
}
