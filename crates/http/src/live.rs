//! `GET /_keel/live/<component>`: a browser's server-sent-events stream of
//! the component's live channels (see `wit/live.wit` and
//! `keel_runtime::live`). Authenticated with the node's `[auth]` keys,
//! authorized by `[components.<name>.live] channels`; the stream ends when
//! the token expires, when the node drains, or when the browser falls
//! behind (it reconnects and re-reads what it missed).

use crate::service::{Body, Shared, text};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use keel_runtime::live::{LiveError, LiveSubscription, check_channel, encode_event};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// A comment line this often keeps proxies and browsers from timing out an
/// idle stream (and notices a vanished client).
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Bytes of the query string accepted.
const MAX_QUERY_BYTES: usize = 8 * 1024;

pub(crate) fn handle<B>(shared: &Arc<Shared>, req: &Request<B>, component: &str) -> Response<Body> {
    let refuse = |status: StatusCode, why: String| {
        if let Some(s) = shared.runtime.services() {
            s.live.refused();
        }
        text(status, why + "\n")
    };
    if req.method() != Method::GET {
        let mut r = refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "live streams are opened with GET".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    if shared.is_draining() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is draining; reconnect to another".into(),
        );
    }
    let Some(services) = shared.runtime.services() else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "no services".into());
    };
    let Some(c) = shared
        .runtime
        .components()
        .iter()
        .find(|c| c.name() == component)
    else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("no component named {component:?}"),
        );
    };
    if c.config.live_channels.is_empty() {
        return refuse(
            StatusCode::NOT_FOUND,
            format!(
                "component {component} has no live channels ([components.{component}.live] channels)"
            ),
        );
    }
    let query = req.uri().query().unwrap_or("");
    if query.len() > MAX_QUERY_BYTES {
        return refuse(
            StatusCode::URI_TOO_LONG,
            format!("query longer than {MAX_QUERY_BYTES} bytes"),
        );
    }
    let mut channels = Vec::new();
    let mut token = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "channel" => channels.push(v.into_owned()),
            "token" => token = Some(v.into_owned()),
            other => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown query parameter {other:?}; accepted: channel (repeated), token"
                    ),
                );
            }
        }
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::to_owned);
    let Some(token) = bearer.or(token) else {
        let mut r = refuse(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required: the authorization header or a token query parameter"
                .into(),
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    };
    let session = match services.auth.authenticate(&token) {
        Ok(s) => s,
        Err(e) => {
            let mut r = refuse(StatusCode::UNAUTHORIZED, format!("token rejected: {e}"));
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    };
    for ch in &channels {
        if let Err(e) = check_channel(ch) {
            return refuse(StatusCode::BAD_REQUEST, e.to_string());
        }
        if !c
            .config
            .live_channels
            .iter()
            .any(|p| p.allows(&session.user, ch))
        {
            return refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "channel {ch:?} is not open to user {:?}; component {component} opens: {}",
                    session.user,
                    c.config
                        .live_channels
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
    let (subscription, rx) = match services.live.subscribe(component, &session.user, &channels) {
        Ok(s) => s,
        Err(LiveError::Invalid(m)) => return refuse(StatusCode::BAD_REQUEST, m),
        Err(LiveError::Limit(m)) => {
            let mut r = refuse(StatusCode::TOO_MANY_REQUESTS, m);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return r;
        }
    };
    let ready = encode_event(
        "ready",
        &serde_json::json!({"user": session.user, "channels": channels}).to_string(),
    );
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let expires_in = Duration::from_millis(session.expires_at_ms.saturating_sub(now_ms));
    let mut r = Response::new(sse_body(ready, rx, subscription, expires_in));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Reverse proxies (nginx) must not buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

struct Stream {
    first: Option<Bytes>,
    rx: mpsc::Receiver<Bytes>,
    keepalive: tokio::time::Interval,
    expires: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Unregisters the connection when the body is dropped.
    _subscription: LiveSubscription,
}

fn sse_body(
    ready: Bytes,
    rx: mpsc::Receiver<Bytes>,
    subscription: LiveSubscription,
    expires_in: Duration,
) -> Body {
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = Stream {
        first: Some(ready),
        rx,
        keepalive,
        expires: Box::pin(tokio::time::sleep(expires_in)),
        _subscription: subscription,
    };
    let frames = futures::stream::unfold(state, |mut s| async move {
        if let Some(first) = s.first.take() {
            // The interval's first tick is immediate: consume it here.
            s.keepalive.tick().await;
            return Some((Ok(Frame::data(first)), s));
        }
        let bytes = tokio::select! {
            m = s.rx.recv() => m?,
            _ = s.keepalive.tick() => Bytes::from_static(b": keepalive\n\n"),
            // The token's session is over: the browser signs in again.
            () = &mut s.expires => return None,
        };
        Some((Ok(Frame::data(bytes)), s))
    });
    StreamBody::new(frames).boxed_unsync()
}
