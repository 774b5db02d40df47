//! `regional-probe`: a thin HTTP API over the regional tier
//! (`regional-coordination`), the publish/subscribe/query/report part of the
//! global tier (`global-coordination`) and the edge calls that feed the
//! region (`edge-operations`), plus the exported `subscriber` that records
//! every delivery into `kv`. Used by the integration tests. Targets world
//! `edge-service`, but calls only `regional-coordination`,
//! `global-coordination`, `edge-operations` and `kv`, so the built component
//! imports only those (and `types` + WASI). The `/global/...` routes are the
//! cargo feature `global` (on by default); without it the component imports
//! no `global-coordination`. Mount it at a prefix route
//! (`/regional/...`); routes below are relative to that prefix.
//!
//! | route | call | answer |
//! |---|---|---|
//! | `POST /sync` `[{kind, key, payload, user?, content_type?}, ..]` | `sync-to-region` | `{"id": s}` |
//! | `GET /sync/<id>` | `get-sync-status` | `"queued"` / `"forwarded"` |
//! | `POST /subscribe` `{"kinds": [..], "key_prefix": s/null, "edges": [..]}` | `subscribe-regional-updates` | `{"id": n}` |
//! | `DELETE /subscribe/<id>` | `unsubscribe-regional-updates` | 204 |
//! | `POST /migrate` `{"user", "from", "to"}` | `migrate-user-region` | `{"id": s}` |
//! | `GET /migrate/<id>` | `get-migration-status` | `{"id", "user", "from", "to", "phase", "detail"}` |
//! | `GET /user/<user>` | `get-regional-user-state` | `{"user", "home_region", "online_edges", "last_seen", "last_seen_edge", "last_activity"}` |
//! | `POST /metric/<type>?value=F` | `record-metric` | 204 |
//! | `GET /metrics/<type>?start=MS&end=MS` | `get-regional-metrics` | metrics object (below) |
//! | `POST /leaderboard/<category>` `[{"member", "delta"}, ..]` | `update-regional-leaderboard` | 204 |
//! | `GET /leaderboard/<category>?limit=N` (default 10) | `get-regional-leaderboard` | `[{"rank", "member", "score"}, ..]` |
//! | `POST /event` (as one `/sync` element) | `edge-operations.record-local-event` | `{"id": s}` |
//! | `POST /activity/<user>` `{kind, attributes: {..}}` | `edge-operations.record-user-activity` | 204 |
//! | `GET /node` | `edge-operations.local-node` | `{"edge", "region"}` |
//! | `POST /auth` (`authorization: Bearer <token>`) | `edge-operations.authenticate-user` | `{"user", "home_region"}` / 401 |
//! | `POST /global/publish` `{"id", "event_type", "subject"?, "content_type"?, "data", "user"?}` | `publish-global-event` | 204 |
//! | `POST /global/subscribe` `["type", "prefix.>", ..]` | `subscribe-global-events` | `{"id": n}` |
//! | `DELETE /global/subscribe/<id>` | `unsubscribe-global-events` | 204 |
//! | `POST /global/query` (one-key object, below) | `query-global-state` | the result (below) |
//! | `POST /global/report/<type>` `{"start_ms", "end_ms", "regions"?, "options"?}` | `generate-global-report` | report object (below) |
//! | `POST /global/search` `{"name_prefix"?, "home_region"?, "active_since_ms"?, "limit"}` | `search-global-users` | `{"users": [{"user", "home_region", "display_name", "last_seen_ms"}], "regions", "missing_regions"}` |
//! | `PUT /fail-updates?n=N` | `kv.set("fail-updates", N)` | 204 |
//! | `GET /deliveries?prefix=P` | `kv.list-keys` (all pages) + `kv.get` | `[<recorded JSON>, ..]` in key order |
//!
//! Event and global-event payloads (`payload`, `data`) are strings, sent as
//! their UTF-8 bytes; bytes coming back are decoded as lossy UTF-8. HLC
//! timestamps are `{"physical_ms", "logical", "node"}`. A metrics object is
//! `{"metric_type", "region", "range": {"start_ms", "end_ms"},
//! "resolution_ms", "points": [{"start_ms", "count", "sum", "min", "max"}]}`.
//!
//! `/global/query` takes exactly one of `{"home_region": user}` (answers a
//! region or `null`), `{"user_count": region/null}` (a number),
//! `{"metric": {"metric_type", "start_ms", "end_ms"}}` (a list of metrics
//! objects, one per region), `{"leaderboard": {"category", "limit"}}` (a list
//! of entries) and `{"topology": null}` (`[{"name", "edges", "coordinator",
//! "data_residency", "compliance"}]`). A report answers `{"report_type",
//! "generated_at_ms", "regions", "missing_regions", "content_type", "body"}`
//! (`body` as lossy UTF-8).
//!
//! Deliveries: `subscriber.on-updates` first checks kv key `fail-updates`;
//! if it holds a decimal n > 0 it writes n-1 back and fails the whole batch
//! with `unavailable` (so the host redelivers it). Otherwise, for each
//! update of the batch, it writes kv key
//! `update/<subscription:020>/<sequence:020>` = `{"subscription", "sequence",
//! "id", "event_sequence", "origin", "region", "kind", "key", "payload",
//! "user"}`, and counts the call: kv key `batches/<subscription:020>` holds
//! the number of `on-updates` calls, `largest-batch/<subscription:020>` the
//! most updates one call brought. `subscriber.on-global-events` writes, per
//! event,
//! `global/<subscription:020>/<event id>` = `{"subscription", "id",
//! "event_type", "subject", "data", "source", "origin_region",
//! "published_at"}`. Both are idempotent: a redelivery rewrites the same key
//! with the same value.
//!
//! Platform errors answer `{"error": "<case>", "message": ".."}` with the
//! status `keel_guest::error_status` gives the case. Requests the probe
//! itself cannot parse answer 400 `bad-request`; unknown routes 404
//! `no-route`.

mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "edge-service",
        with: {
            "wasi:http/types@0.2.12": wasip2::http::types,
            "wasi:io/error@0.2.12": wasip2::io::error,
            "wasi:io/poll@0.2.12": wasip2::io::poll,
            "wasi:io/streams@0.2.12": wasip2::io::streams,
            "wasi:clocks/monotonic-clock@0.2.12": wasip2::clocks::monotonic_clock,
        },
        generate_all,
    });
}

use bindings::exports::keel::platform::subscriber;
use bindings::exports::wasi::http::incoming_handler;
#[cfg(feature = "global")]
use bindings::keel::platform::global_coordination as global;
use bindings::keel::platform::{
    edge_operations as edge, kv, regional_coordination as regional, types,
};
use keel_guest::{Request, percent_decode};
use serde_json::{Value, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct RegionalProbe;

bindings::export!(RegionalProbe with_types_in bindings);

impl incoming_handler::Guest for RegionalProbe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let outcome = Request::read(request)
            .map_err(Failure::bad_request)
            .and_then(|req| route(&req));
        match outcome {
            Ok(Reply::Json(value)) => keel_guest::json(out, 200, &value.to_string()),
            Ok(Reply::NoContent) => keel_guest::empty(out, 204),
            Err(f) => keel_guest::error(out, f.status, f.error, &f.message),
        }
    }
}

/// The kv key holding how many `on-updates` deliveries should still fail.
const FAIL_UPDATES: &str = "fail-updates";

impl subscriber::Guest for RegionalProbe {
    fn on_updates(
        subscription: types::SubscriptionId,
        updates: Vec<types::Update>,
    ) -> Result<(), types::Error> {
        let pending = read_count(FAIL_UPDATES)?;
        if pending > 0 {
            kv::set(FAIL_UPDATES, (pending - 1).to_string().as_bytes())?;
            return Err(types::Error::Unavailable("injected failure".into()));
        }
        for update in &updates {
            let e = &update.event;
            let record = json!({
                "subscription": subscription,
                "sequence": update.sequence,
                "id": e.id,
                "event_sequence": e.sequence,
                "origin": e.origin,
                "region": e.region,
                "kind": e.data.kind,
                "key": e.data.key,
                "payload": String::from_utf8_lossy(&e.data.payload),
                "user": e.data.user,
            });
            let key = format!("update/{subscription:020}/{:020}", update.sequence);
            kv::set(&key, record.to_string().as_bytes())?;
        }
        let batches = format!("batches/{subscription:020}");
        kv::set(&batches, (read_count(&batches)? + 1).to_string().as_bytes())?;
        let largest = format!("largest-batch/{subscription:020}");
        let n = updates.len() as u64;
        if n > read_count(&largest)? {
            kv::set(&largest, n.to_string().as_bytes())?;
        }
        Ok(())
    }

    fn on_global_events(
        subscription: types::SubscriptionId,
        events: Vec<types::ReceivedGlobalEvent>,
    ) -> Result<(), types::Error> {
        for event in &events {
            let g = &event.event;
            let record = json!({
                "subscription": subscription,
                "id": g.id,
                "event_type": g.event_type,
                "subject": g.subject,
                "data": String::from_utf8_lossy(&g.data),
                "source": event.source,
                "origin_region": event.origin_region,
                "published_at": hlc_out(&event.published_at),
            });
            let key = format!("global/{subscription:020}/{}", g.id);
            kv::set(&key, record.to_string().as_bytes())?;
        }
        Ok(())
    }
}

/// The decimal count in kv key `key` (0 if absent or not a number).
fn read_count(key: &str) -> Result<u64, types::Error> {
    Ok(kv::get(key)?
        .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<u64>().ok())
        .unwrap_or(0))
}

/// A successful answer.
enum Reply {
    /// 200 with a JSON body.
    Json(Value),
    /// 204.
    NoContent,
}

/// A failed request: status and the `{"error", "message"}` body.
#[derive(Debug)]
struct Failure {
    status: u16,
    error: &'static str,
    message: String,
}

impl Failure {
    fn new(status: u16, error: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            status,
            error,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(400, "bad-request", message)
    }
}

impl From<types::Error> for Failure {
    fn from(e: types::Error) -> Failure {
        use types::Error as E;
        let (case, message) = match e {
            E::NotFound => ("not-found", "not found".to_string()),
            E::Denied(m) => ("denied", m),
            E::Invalid(m) => ("invalid", m),
            E::Unavailable(m) => ("unavailable", m),
            E::Conflict(m) => ("conflict", m),
            E::Residency(m) => ("residency", m),
            E::Limit(m) => ("limit", m),
            E::Internal(m) => ("internal", m),
        };
        Failure::new(keel_guest::error_status(case), case, message)
    }
}

type Outcome = Result<Reply, Failure>;

fn route(req: &Request) -> Outcome {
    // "/sync/a%2Fb" -> ["sync", "a/b"]: segments are decoded one by one, so
    // `%2F` inside an id or name stays part of it.
    let segments: Vec<String> = req
        .sub_path()
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let json = |v: Value| Ok(Reply::Json(v));
    match (req.method.as_str(), segments.as_slice()) {
        // ---- regional-coordination ----
        ("POST", ["sync"]) => {
            let body = json_body(req)?;
            let events = body
                .as_array()
                .ok_or_else(|| Failure::bad_request("a sync batch is a list of events"))?
                .iter()
                .map(event_in)
                .collect::<Result<Vec<_>, _>>()?;
            json(json!({ "id": regional::sync_to_region(&events)? }))
        }
        ("GET", ["sync", id]) => {
            let state = match regional::get_sync_status(id)? {
                regional::SyncState::Queued => "queued",
                regional::SyncState::Forwarded => "forwarded",
            };
            json(state.into())
        }
        ("POST", ["subscribe"]) => {
            let body = json_body_or_empty(req)?;
            let filter = regional::UpdateFilter {
                kinds: string_list(&body["kinds"], "kinds")?,
                key_prefix: opt_str_field(&body, "key_prefix")?,
                edges: string_list(&body["edges"], "edges")?,
            };
            json(json!({ "id": regional::subscribe_regional_updates(&filter)? }))
        }
        ("DELETE", ["subscribe", id]) => {
            regional::unsubscribe_regional_updates(parse_id(id)?)?;
            Ok(Reply::NoContent)
        }
        ("POST", ["migrate"]) => {
            let body = json_body(req)?;
            let id = regional::migrate_user_region(
                &str_field(&body, "user")?,
                &str_field(&body, "from")?,
                &str_field(&body, "to")?,
            )?;
            json(json!({ "id": id }))
        }
        ("GET", ["migrate", id]) => json(migration_out(regional::get_migration_status(id)?)),
        ("GET", ["user", user]) => json(user_state_out(regional::get_regional_user_state(user)?)),
        ("POST", ["metric", metric_type]) => {
            let value = req
                .query_param("value")
                .ok_or_else(|| Failure::bad_request("`value` is required"))?
                .parse::<f64>()
                .map_err(|_| Failure::bad_request("`value` must be a number"))?;
            regional::record_metric(metric_type, value)?;
            Ok(Reply::NoContent)
        }
        ("GET", ["metrics", metric_type]) => {
            let range = types::TimeRange {
                start_ms: required_number(req, "start")?,
                end_ms: required_number(req, "end")?,
            };
            json(metrics_out(regional::get_regional_metrics(
                metric_type,
                range,
            )?))
        }
        ("POST", ["leaderboard", category]) => {
            let body = json_body(req)?;
            let updates = body
                .as_array()
                .ok_or_else(|| Failure::bad_request("a leaderboard update is a list"))?
                .iter()
                .map(|u| {
                    Ok(regional::ScoreUpdate {
                        member: str_field(u, "member")?,
                        delta: u["delta"]
                            .as_i64()
                            .ok_or_else(|| Failure::bad_request("`delta` must be an integer"))?,
                    })
                })
                .collect::<Result<Vec<_>, Failure>>()?;
            regional::update_regional_leaderboard(category, &updates)?;
            Ok(Reply::NoContent)
        }
        ("GET", ["leaderboard", category]) => {
            let limit = query_number(req, "limit", 10)?;
            let limit =
                u32::try_from(limit).map_err(|_| Failure::bad_request("limit too large"))?;
            let entries = regional::get_regional_leaderboard(category, limit)?;
            json(entries.into_iter().map(entry_out).collect())
        }
        // ---- edge-operations ----
        ("POST", ["event"]) => {
            let id = edge::record_local_event(&event_in(&json_body(req)?)?)?;
            json(json!({ "id": id }))
        }
        ("POST", ["activity", user]) => {
            let body = json_body(req)?;
            let activity = edge::ActivityData {
                kind: str_field(&body, "kind")?,
                attributes: string_map(&body["attributes"])?,
            };
            edge::record_user_activity(user, &activity)?;
            Ok(Reply::NoContent)
        }
        ("POST", ["auth"]) => {
            let token = req
                .bearer_token()
                .ok_or_else(|| Failure::bad_request("authorization: Bearer <token> required"))?;
            match edge::authenticate_user(token) {
                Ok(s) => json(json!({"user": s.user, "home_region": s.home_region})),
                Err(e) => Err(Failure::new(401, "auth", format!("{e:?}"))),
            }
        }
        ("GET", ["node"]) => {
            let node = edge::local_node();
            json(json!({"edge": node.edge, "region": node.region}))
        }
        // ---- global-coordination ----
        #[cfg(feature = "global")]
        ("POST", ["global", "publish"]) => {
            let body = json_body(req)?;
            let event = types::GlobalEvent {
                id: str_field(&body, "id")?,
                event_type: str_field(&body, "event_type")?,
                subject: opt_str_field(&body, "subject")?,
                content_type: opt_str_field(&body, "content_type")?,
                data: str_field(&body, "data")?.into_bytes(),
                user: opt_str_field(&body, "user")?,
            };
            global::publish_global_event(&event)?;
            Ok(Reply::NoContent)
        }
        #[cfg(feature = "global")]
        ("POST", ["global", "subscribe"]) => {
            let types_list = string_list(&json_body(req)?, "event types")?;
            json(json!({ "id": global::subscribe_global_events(&types_list)? }))
        }
        #[cfg(feature = "global")]
        ("DELETE", ["global", "subscribe", id]) => {
            global::unsubscribe_global_events(parse_id(id)?)?;
            Ok(Reply::NoContent)
        }
        #[cfg(feature = "global")]
        ("POST", ["global", "query"]) => {
            let query = global_query_in(&json_body(req)?)?;
            json(global_result_out(global::query_global_state(&query)?))
        }
        #[cfg(feature = "global")]
        ("POST", ["global", "search"]) => {
            let body = json_body(req)?;
            let criteria = global::SearchCriteria {
                name_prefix: opt_str_field(&body, "name_prefix")?,
                home_region: opt_str_field(&body, "home_region")?,
                active_since_ms: body["active_since_ms"].as_u64(),
                limit: u32::try_from(u64_field(&body, "limit")?)
                    .map_err(|_| Failure::bad_request("`limit` is at most 2^32-1"))?,
            };
            let found = global::search_global_users(&criteria)?;
            let users: Vec<Value> = found
                .users
                .iter()
                .map(|u| {
                    json!({
                        "user": u.user,
                        "home_region": u.home_region,
                        "display_name": u.display_name,
                        "last_seen_ms": u.last_seen_ms,
                    })
                })
                .collect();
            json(json!({
                "users": users,
                "regions": found.regions,
                "missing_regions": found.missing_regions,
            }))
        }
        #[cfg(feature = "global")]
        ("POST", ["global", "report", report_type]) => {
            let body = json_body(req)?;
            let params = global::ReportParams {
                range: types::TimeRange {
                    start_ms: u64_field(&body, "start_ms")?,
                    end_ms: u64_field(&body, "end_ms")?,
                },
                regions: string_list(&body["regions"], "regions")?,
                options: string_map(&body["options"])?,
            };
            let report = global::generate_global_report(report_type, &params)?;
            json(json!({
                "report_type": report.report_type,
                "generated_at_ms": report.generated_at_ms,
                "regions": report.regions,
                "missing_regions": report.missing_regions,
                "content_type": report.content_type,
                "body": String::from_utf8_lossy(&report.body),
            }))
        }
        // ---- deliveries (kv) ----
        ("PUT", ["fail-updates"]) => {
            let n = required_number(req, "n")?;
            kv::set(FAIL_UPDATES, n.to_string().as_bytes())?;
            Ok(Reply::NoContent)
        }
        ("GET", ["deliveries"]) => {
            let prefix = req.query_param("prefix").unwrap_or_default();
            json(deliveries(&prefix)?)
        }
        (method, _) => Err(Failure::new(
            404,
            "no-route",
            format!("no route for {method} {}", req.path),
        )),
    }
}

/// Every recorded value under `prefix`, in key order. A value that is not
/// JSON (only a hand-written key could be) comes back as a string.
fn deliveries(prefix: &str) -> Result<Value, Failure> {
    let mut keys = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = kv::list_keys(prefix, cursor.as_deref())?;
        keys.extend(page.keys);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    keys.sort();
    keys.dedup();
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        // A key deleted between the listing and the read is skipped.
        if let Some(bytes) = kv::get(&key)? {
            out.push(
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&bytes).into_owned())),
            );
        }
    }
    Ok(Value::Array(out))
}

// ---- JSON in ----

fn json_body(req: &Request) -> Result<Value, Failure> {
    serde_json::from_slice(&req.body)
        .map_err(|e| Failure::bad_request(format!("invalid JSON body: {e}")))
}

/// Like `json_body`, but an empty body is `{}`.
fn json_body_or_empty(req: &Request) -> Result<Value, Failure> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    json_body(req)
}

fn str_field(v: &Value, name: &str) -> Result<String, Failure> {
    v[name]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Failure::bad_request(format!("`{name}` must be a string")))
}

fn opt_str_field(v: &Value, name: &str) -> Result<Option<String>, Failure> {
    match &v[name] {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(Failure::bad_request(format!(
            "`{name}` must be a string or null"
        ))),
    }
}

#[cfg(feature = "global")]
fn u64_field(v: &Value, name: &str) -> Result<u64, Failure> {
    v[name]
        .as_u64()
        .ok_or_else(|| Failure::bad_request(format!("`{name}` must be a non-negative integer")))
}

/// `["a", "b"]` (or null/absent: empty) -> `vec!["a", "b"]`.
fn string_list(v: &Value, what: &str) -> Result<Vec<String>, Failure> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(list) => list
            .iter()
            .map(|item| {
                item.as_str().map(str::to_string).ok_or_else(|| {
                    Failure::bad_request(format!("`{what}` must be a list of strings"))
                })
            })
            .collect(),
        _ => Err(Failure::bad_request(format!(
            "`{what}` must be a list of strings"
        ))),
    }
}

/// `{"a": "1", ...}` (or null/absent: empty) -> `[("a", "1"), ...]`.
fn string_map(v: &Value) -> Result<Vec<(String, String)>, Failure> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(Failure::bad_request(format!("`{k}` must be a string"))),
            })
            .collect(),
        _ => Err(Failure::bad_request("expected an object of string values")),
    }
}

fn query_number(req: &Request, name: &str, default: u64) -> Result<u64, Failure> {
    match req.query_param(name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| Failure::bad_request(format!("`{name}` must be a number"))),
    }
}

fn required_number(req: &Request, name: &str) -> Result<u64, Failure> {
    req.query_param(name)
        .ok_or_else(|| Failure::bad_request(format!("`{name}` is required")))?
        .parse()
        .map_err(|_| Failure::bad_request(format!("`{name}` must be a number")))
}

/// A subscription id from the path.
fn parse_id(s: &str) -> Result<types::SubscriptionId, Failure> {
    s.parse()
        .map_err(|_| Failure::bad_request(format!("subscription id {s:?} is not a number")))
}

/// `{kind, key, payload, user?, content_type?}`; `payload` is a string.
fn event_in(v: &Value) -> Result<types::EventData, Failure> {
    Ok(types::EventData {
        kind: str_field(v, "kind")?,
        key: str_field(v, "key")?,
        payload: str_field(v, "payload")?.into_bytes(),
        content_type: opt_str_field(v, "content_type")?,
        user: opt_str_field(v, "user")?,
    })
}

#[cfg(feature = "global")]
/// A one-key object naming the `global-query` case.
fn global_query_in(v: &Value) -> Result<global::GlobalQuery, Failure> {
    let (case, arg) = match v.as_object() {
        Some(m) if m.len() == 1 => m.iter().next().expect("one entry"),
        _ => {
            return Err(Failure::bad_request(
                "a global query is an object with exactly one of home_region, \
                 user_count, metric, leaderboard, topology",
            ));
        }
    };
    match case.as_str() {
        "home_region" => match arg {
            Value::String(user) => Ok(global::GlobalQuery::HomeRegion(user.clone())),
            _ => Err(Failure::bad_request("`home_region` takes a user id")),
        },
        "user_count" => match arg {
            Value::Null => Ok(global::GlobalQuery::UserCount(None)),
            Value::String(region) => Ok(global::GlobalQuery::UserCount(Some(region.clone()))),
            _ => Err(Failure::bad_request("`user_count` takes a region or null")),
        },
        "metric" => Ok(global::GlobalQuery::Metric(types::MetricQuery {
            metric_type: str_field(arg, "metric_type")?,
            range: types::TimeRange {
                start_ms: u64_field(arg, "start_ms")?,
                end_ms: u64_field(arg, "end_ms")?,
            },
        })),
        "leaderboard" => Ok(global::GlobalQuery::Leaderboard(types::LeaderboardQuery {
            category: str_field(arg, "category")?,
            limit: u32::try_from(u64_field(arg, "limit")?)
                .map_err(|_| Failure::bad_request("limit too large"))?,
        })),
        "topology" => Ok(global::GlobalQuery::Topology),
        other => Err(Failure::bad_request(format!(
            "unknown global query {other:?}; home_region, user_count, metric, leaderboard, topology"
        ))),
    }
}

// ---- JSON out ----

fn hlc_out(t: &types::HlcTimestamp) -> Value {
    json!({"physical_ms": t.physical_ms, "logical": t.logical, "node": t.node})
}

fn migration_out(s: regional::MigrationStatus) -> Value {
    use regional::MigrationPhase as P;
    let phase = match s.phase {
        P::Pending => "pending",
        P::Copying => "copying",
        P::SwitchingHome => "switching-home",
        P::TombstoningSource => "tombstoning-source",
        P::Completed => "completed",
        P::Failed => "failed",
    };
    json!({
        "id": s.id,
        "user": s.user,
        "from": s.from_region,
        "to": s.to_region,
        "phase": phase,
        "detail": s.detail,
    })
}

fn user_state_out(s: regional::UserState) -> Value {
    json!({
        "user": s.user,
        "home_region": s.home_region,
        "online_edges": s.online_edges,
        "last_seen": s.last_seen.as_ref().map(hlc_out),
        "last_seen_edge": s.last_seen_edge,
        "last_activity": s.last_activity,
    })
}

fn metrics_out(m: types::Metrics) -> Value {
    // Non-finite sums/extremes have no JSON form: `json!` turns them into null.
    let points: Vec<Value> = m
        .points
        .into_iter()
        .map(|p| {
            json!({
                "start_ms": p.start_ms,
                "count": p.count,
                "sum": p.sum,
                "min": p.min,
                "max": p.max,
            })
        })
        .collect();
    json!({
        "metric_type": m.metric_type,
        "region": m.region,
        "range": {"start_ms": m.range.start_ms, "end_ms": m.range.end_ms},
        "resolution_ms": m.resolution_ms,
        "points": points,
    })
}

fn entry_out(e: types::LeaderboardEntry) -> Value {
    json!({"rank": e.rank, "member": e.member, "score": e.score})
}

#[cfg(feature = "global")]
fn region_info_out(r: types::RegionInfo) -> Value {
    json!({
        "name": r.name,
        "edges": r.edges,
        "coordinator": r.coordinator,
        "data_residency": r.data_residency,
        "compliance": r.compliance,
    })
}

#[cfg(feature = "global")]
fn global_result_out(r: global::GlobalResult) -> Value {
    use global::GlobalResult as R;
    match r {
        R::HomeRegion(region) => region.into(),
        R::UserCount(n) => n.into(),
        R::Metric(list) => list.into_iter().map(metrics_out).collect(),
        R::Leaderboard(list) => list.into_iter().map(entry_out).collect(),
        R::Topology(list) => list.into_iter().map(region_info_out).collect(),
    }
}
