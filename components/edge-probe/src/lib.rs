//! `edge-probe`: a thin HTTP API over every function of the edge tier
//! (world `http-edge-tier`: `kv`, `sql`, `events`, `edge-operations`), used
//! by the integration tests and the benchmarks. Mount it at a prefix route
//! (`/probe/...`); routes below are relative to that prefix.
//!
//! | route | call | answer |
//! |---|---|---|
//! | `GET /kv/<key>` | `kv.get` | 200 raw value, 404 |
//! | `PUT /kv/<key>` (body = value) | `kv.set` | 204 |
//! | `DELETE /kv/<key>` | `kv.delete` | 204 |
//! | `GET /kv-exists/<key>` | `kv.exists` | `true` / `false` |
//! | `GET /kv-list?prefix=P&cursor=C` | `kv.list-keys` | `{"keys": [..], "next_cursor": s/null}` |
//! | `POST /kv-cas/<key>` `{"expected": s/null, "new": s}` | `kv.compare-and-swap` | `true` / `false` |
//! | `POST /sql/execute` `{"sql", "params"}` | `sql.execute` | `{"rows_affected", "last_insert_id"}` |
//! | `POST /sql/query` `{"sql", "params"}` | `sql.query` | `{"columns": [..], "rows": [[..]]}` |
//! | `POST /sql/batch` `[{"sql", "params"}, ..]` | `sql.execute-batch` | list of execute results |
//! | `POST /sql/prepared` `{"sql", "runs": [[params], ..], "op": "query"/"execute"}` | `sql.prepare`, then `prepared.query` / `.execute` per run | list of results (as `/sql/query`, `/sql/execute`) |
//! | `POST /sql/prepare-many` `{"sql", "count", "keep"}` | `count` x `sql.prepare`, each kept open (or dropped) | `count` |
//! | `POST /events` `{kind, key, payload, user?, content_type?}` | `events.append` | `{"sequence": n}` |
//! | `GET /events?from=N&limit=M` | `events.read` | list of events |
//! | `GET /events-last` | `events.last-sequence` | number / `null` |
//! | `GET /edge/node` | `local-node` | `{"edge", "region"}` |
//! | `POST /edge/event` (as `/events`) | `record-local-event` | `{"id": "<edge>:<n>"}` |
//! | `GET /edge/state/<key>` | `get-local-state` | `{"value", "version", "updated_at"}` |
//! | `PUT /edge/state/<key>` (body) | `set-local-state` | `{"version": n}` |
//! | `PUT /edge/cache/<key>?ttl=S` (body) | `update-local-cache` | 204 |
//! | `POST /edge/auth` (`authorization: Bearer <token>`) | `authenticate-user` | session / 401 |
//! | `GET /edge/region/<user>` | `get-user-region` | `"<region>"` / 404 |
//! | `GET /edge/prefs/<user>` | `get-user-preferences` | `{"name": "value", ..}` |
//! | `PUT /edge/prefs/<user>/<name>` (body; empty = remove) | `set-user-preference` | 204 |
//! | `POST /edge/activity/<user>` `{kind, attributes: {..}}` | `record-user-activity` | 204 |
//! | `POST /bench/{kv-get,kv-set,sql-query,sql-prepared}?n=N` | N calls in a loop | N |
//!
//! SQL values in JSON: `null`, integers, floats (`real`), strings (`text`)
//! and `{"blob": "<hex>"}`, both ways. Platform errors answer
//! `{"error": "<case>", "message": ".."}` with 400 `invalid`, 404
//! `not-found`, 409 `conflict`, 413 `limit`, 503 `unavailable`, 403 `denied`
//! / `residency`, 500 `internal`; auth errors answer 401 with the
//! `auth-error` case (503 for `unavailable`). Requests the probe itself
//! cannot parse answer 400 `bad-request`; unknown routes 404 `no-route`.

mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "http-edge-tier",
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

use bindings::exports::wasi::http::incoming_handler::Guest;
use bindings::keel::platform::{edge_operations as edge, events, kv, sql, types};
use keel_guest::{Request, percent_decode};
use serde_json::{Map, Value, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct EdgeProbe;

bindings::export!(EdgeProbe with_types_in bindings);

impl Guest for EdgeProbe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let outcome = Request::read(request)
            .map_err(Failure::bad_request)
            .and_then(|req| route(&req));
        match outcome {
            Ok(Reply::Json(value)) => keel_guest::json(out, 200, &value.to_string()),
            Ok(Reply::Bytes(bytes)) => {
                keel_guest::respond(out, 200, "application/octet-stream", &bytes)
            }
            Ok(Reply::NoContent) => keel_guest::empty(out, 204),
            Err(f) => keel_guest::error(out, f.status, f.error, &f.message),
        }
    }
}

/// A successful answer.
enum Reply {
    /// 200 with a JSON body.
    Json(Value),
    /// 200 with raw bytes.
    Bytes(Vec<u8>),
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

impl From<types::AuthError> for Failure {
    fn from(e: types::AuthError) -> Failure {
        use types::AuthError as A;
        let (case, message) = match e {
            A::Expired => ("expired", "the token has expired".to_string()),
            A::NotYetValid => ("not-yet-valid", "the token is not valid yet".to_string()),
            A::BadSignature => ("bad-signature", "the signature does not verify".to_string()),
            A::Malformed(m) => ("malformed", m),
            A::UnknownKey(m) => ("unknown-key", m),
            A::UnsupportedAlgorithm(m) => ("unsupported-algorithm", m),
            A::ClaimMismatch(m) => ("claim-mismatch", m),
            A::Revoked => ("revoked", "the token was revoked".to_string()),
            A::Unavailable(m) => return Failure::new(503, "unavailable", m),
        };
        Failure::new(401, case, message)
    }
}

type Outcome = Result<Reply, Failure>;

fn route(req: &Request) -> Outcome {
    // "/kv/a%2Fb" -> ("kv", Some("a%2Fb")); "/events-last" -> ("events-last", None)
    let sub = req.sub_path().trim_start_matches('/');
    let (section, rest) = match sub.split_once('/') {
        Some((s, r)) => (s, Some(r)),
        None => (sub, None),
    };
    // Keys are decoded per segment, so `%2F` inside a key stays a `/` of the key.
    let key = rest.map(percent_decode);
    match (req.method.as_str(), section, key) {
        ("GET", "kv", Some(k)) => match kv::get(&k)? {
            Some(value) => Ok(Reply::Bytes(value)),
            None => Err(types::Error::NotFound.into()),
        },
        ("PUT", "kv", Some(k)) => {
            kv::set(&k, &req.body)?;
            Ok(Reply::NoContent)
        }
        ("DELETE", "kv", Some(k)) => {
            kv::delete(&k)?;
            Ok(Reply::NoContent)
        }
        ("GET", "kv-exists", Some(k)) => Ok(Reply::Json(kv::exists(&k)?.into())),
        ("GET", "kv-list", None) => {
            let prefix = req.query_param("prefix").unwrap_or_default();
            let page = kv::list_keys(&prefix, req.query_param("cursor").as_deref())?;
            Ok(Reply::Json(
                json!({"keys": page.keys, "next_cursor": page.next_cursor}),
            ))
        }
        ("POST", "kv-cas", Some(k)) => {
            let body = json_body(req)?;
            let expected = match &body["expected"] {
                Value::Null => None,
                Value::String(s) => Some(s.as_bytes().to_vec()),
                _ => return Err(Failure::bad_request("`expected` is a string or null")),
            };
            let new = str_field(&body, "new")?;
            let swapped = kv::compare_and_swap(&k, expected.as_deref(), new.as_bytes())?;
            Ok(Reply::Json(swapped.into()))
        }
        ("POST", "sql", Some(op)) => sql_route(&op, &json_body(req)?),
        ("POST", "events", None) => {
            let sequence = events::append(&event_in(&json_body(req)?)?)?;
            Ok(Reply::Json(json!({ "sequence": sequence })))
        }
        ("GET", "events", None) => {
            let from = query_number(req, "from", 1)?;
            let limit = query_number(req, "limit", 100)?;
            let limit =
                u32::try_from(limit).map_err(|_| Failure::bad_request("limit too large"))?;
            let list = events::read(from, limit)?;
            Ok(Reply::Json(list.into_iter().map(event_out).collect()))
        }
        ("GET", "events-last", None) => Ok(Reply::Json(events::last_sequence()?.into())),
        (method, "edge", Some(_)) => edge_route(req, method, rest.unwrap_or_default()),
        ("POST", "bench", Some(kind)) => bench(&kind, query_number(req, "n", 1)?),
        (method, _, _) => Err(Failure::new(
            404,
            "no-route",
            format!("no route for {method} {}", req.path),
        )),
    }
}

fn sql_route(op: &str, body: &Value) -> Outcome {
    match op {
        "execute" => {
            let (sql, params) = statement_in(body)?;
            Ok(Reply::Json(execute_result(sql::execute(&sql, &params)?)))
        }
        "query" => {
            let (sql, params) = statement_in(body)?;
            let result = sql::query(&sql, &params)?;
            let rows: Vec<Value> = result
                .rows
                .into_iter()
                .map(|row| row.into_iter().map(value_out).collect())
                .collect();
            Ok(Reply::Json(
                json!({"columns": result.columns, "rows": rows}),
            ))
        }
        "prepared" => {
            let sql = str_field(body, "sql")?;
            let runs = body["runs"]
                .as_array()
                .ok_or_else(|| Failure::bad_request("`runs` must be a list of parameter lists"))?;
            let execute = match &body["op"] {
                Value::Null => false,
                Value::String(op) if op == "query" => false,
                Value::String(op) if op == "execute" => true,
                _ => return Err(Failure::bad_request("`op` is \"query\" or \"execute\"")),
            };
            let statement = sql::prepare(&sql)?;
            let columns = statement.columns();
            let mut results = Vec::with_capacity(runs.len());
            for run in runs {
                let params = run
                    .as_array()
                    .ok_or_else(|| Failure::bad_request("each run is a list of parameters"))?
                    .iter()
                    .map(value_in)
                    .collect::<Result<Vec<_>, _>>()?;
                results.push(if execute {
                    execute_result(statement.execute(&params)?)
                } else {
                    let values = statement.query(&params)?;
                    let width = columns.len().max(1);
                    let rows: Vec<Value> = values
                        .chunks(width)
                        .map(|row| row.iter().cloned().map(value_out).collect())
                        .collect();
                    json!({"columns": columns, "rows": rows})
                });
            }
            Ok(Reply::Json(results.into()))
        }
        "prepare-many" => {
            let sql = str_field(body, "sql")?;
            let count = body["count"]
                .as_u64()
                .ok_or_else(|| Failure::bad_request("`count` must be a number"))?;
            let keep = body["keep"].as_bool().unwrap_or(true);
            let mut open = Vec::new();
            for _ in 0..count {
                let statement = sql::prepare(&sql)?;
                if keep {
                    open.push(statement);
                }
            }
            Ok(Reply::Json(count.into()))
        }
        "batch" => {
            let list = body
                .as_array()
                .ok_or_else(|| Failure::bad_request("a batch is a list of statements"))?;
            let statements = list
                .iter()
                .map(|s| statement_in(s).map(|(sql, params)| sql::Statement { sql, params }))
                .collect::<Result<Vec<_>, _>>()?;
            let results = sql::execute_batch(&statements)?;
            Ok(Reply::Json(
                results.into_iter().map(execute_result).collect(),
            ))
        }
        other => Err(Failure::new(
            404,
            "no-route",
            format!("no sql operation {other:?}"),
        )),
    }
}

fn edge_route(req: &Request, method: &str, rest: &str) -> Outcome {
    let (op, arg) = match rest.split_once('/') {
        Some((op, arg)) => (op, Some(arg)),
        None => (rest, None),
    };
    let decoded = arg.map(percent_decode);
    match (method, op, decoded) {
        ("GET", "node", None) => {
            let node = edge::local_node();
            Ok(Reply::Json(
                json!({"edge": node.edge, "region": node.region}),
            ))
        }
        ("POST", "event", None) => {
            let id = edge::record_local_event(&event_in(&json_body(req)?)?)?;
            Ok(Reply::Json(json!({ "id": id })))
        }
        ("GET", "state", Some(key)) => {
            let state = edge::get_local_state(&key)?;
            Ok(Reply::Json(json!({
                "value": String::from_utf8_lossy(&state.value),
                "version": state.version,
                "updated_at": {
                    "physical_ms": state.updated_at.physical_ms,
                    "logical": state.updated_at.logical,
                    "node": state.updated_at.node,
                },
            })))
        }
        ("PUT", "state", Some(key)) => {
            let version = edge::set_local_state(&key, &req.body)?;
            Ok(Reply::Json(json!({ "version": version })))
        }
        ("PUT", "cache", Some(key)) => {
            let ttl = query_number(req, "ttl", 60)?;
            let ttl = u32::try_from(ttl).map_err(|_| Failure::bad_request("ttl too large"))?;
            edge::update_local_cache(&key, &req.body, ttl)?;
            Ok(Reply::NoContent)
        }
        ("POST", "auth", None) => {
            // A missing header is passed on as an empty token: the host
            // answers `malformed`, which is what the tests expect to see.
            let session = edge::authenticate_user(req.bearer_token().unwrap_or(""))?;
            Ok(Reply::Json(session_out(session)))
        }
        ("GET", "region", Some(user)) => Ok(Reply::Json(edge::get_user_region(&user)?.into())),
        ("GET", "prefs", Some(user)) => {
            let prefs: Map<String, Value> = edge::get_user_preferences(&user)?
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            Ok(Reply::Json(prefs.into()))
        }
        ("PUT", "prefs", Some(_)) => {
            let (user, name) = arg
                .and_then(|a| a.split_once('/'))
                .map(|(u, n)| (percent_decode(u), percent_decode(n)))
                .ok_or_else(|| Failure::bad_request("expected /edge/prefs/<user>/<name>"))?;
            let value = match req.body.is_empty() {
                true => None,
                false => Some(utf8(&req.body)?.to_string()),
            };
            edge::set_user_preference(&user, &name, value.as_deref())?;
            Ok(Reply::NoContent)
        }
        ("POST", "activity", Some(user)) => {
            let body = json_body(req)?;
            let activity = edge::ActivityData {
                kind: str_field(&body, "kind")?,
                attributes: string_map(&body["attributes"])?,
            };
            edge::record_user_activity(&user, &activity)?;
            Ok(Reply::NoContent)
        }
        _ => Err(Failure::new(
            404,
            "no-route",
            format!("no route for {method} {}", req.path),
        )),
    }
}

/// N calls in a loop, answering N: the per-call guest -> host cost is the
/// request time divided by N, minus one request's fixed cost.
fn bench(kind: &str, n: u64) -> Outcome {
    let keys: Vec<String> = (0..100).map(|i| format!("bench-{i}")).collect();
    let key = |i: u64| keys[(i % 100) as usize].as_str();
    match kind {
        "kv-get" => {
            for i in 0..n {
                kv::get(key(i))?;
            }
        }
        "kv-set" => {
            let value = [0x5a_u8; 16];
            for i in 0..n {
                kv::set(key(i), &value)?;
            }
        }
        "sql-query" => {
            ensure_bench_table()?;
            let query = "SELECT v FROM bench WHERE id = ?1";
            for i in 0..n {
                let result = sql::query(query, &[sql::Value::Integer((i % 100) as i64)])?;
                if result.rows.len() != 1 {
                    return Err(Failure::new(500, "internal", "bench row missing"));
                }
            }
        }
        "sql-prepared" => {
            ensure_bench_table()?;
            let query = sql::prepare("SELECT v FROM bench WHERE id = ?1")?;
            for i in 0..n {
                let values = query.query(&[sql::Value::Integer((i % 100) as i64)])?;
                if values.len() != 1 {
                    return Err(Failure::new(500, "internal", "bench row missing"));
                }
            }
        }
        other => {
            return Err(Failure::new(
                404,
                "no-route",
                format!("no benchmark {other:?}; kv-get, kv-set, sql-query, sql-prepared"),
            ));
        }
    }
    Ok(Reply::Json(n.into()))
}

/// Table `bench` with rows 0..100 of 16-byte blobs.
fn ensure_bench_table() -> Result<(), Failure> {
    let present = sql::query("SELECT count(*) FROM bench", &[])
        .ok()
        .and_then(|r| r.rows.into_iter().next())
        .and_then(|row| row.into_iter().next());
    if matches!(present, Some(sql::Value::Integer(100))) {
        return Ok(());
    }
    let mut statements = vec![sql::Statement {
        sql: "CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, v BLOB NOT NULL)".into(),
        params: vec![],
    }];
    statements.extend((0..100).map(|i| sql::Statement {
        sql: "INSERT OR IGNORE INTO bench (id, v) VALUES (?1, ?2)".into(),
        params: vec![sql::Value::Integer(i), sql::Value::Blob(vec![0x5a; 16])],
    }));
    sql::execute_batch(&statements)?;
    Ok(())
}

// ---- JSON in ----

fn json_body(req: &Request) -> Result<Value, Failure> {
    serde_json::from_slice(&req.body)
        .map_err(|e| Failure::bad_request(format!("invalid JSON body: {e}")))
}

fn utf8(bytes: &[u8]) -> Result<&str, Failure> {
    std::str::from_utf8(bytes).map_err(|_| Failure::bad_request("the body is not UTF-8"))
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

/// `{"a": "1", ...}` (or null/absent: empty) -> `[("a", "1"), ...]`.
fn string_map(v: &Value) -> Result<Vec<(String, String)>, Failure> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(Failure::bad_request(format!(
                    "attribute `{k}` must be a string"
                ))),
            })
            .collect(),
        _ => Err(Failure::bad_request("`attributes` must be an object")),
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

/// `{"sql": "...", "params": [...]}` (params optional).
fn statement_in(v: &Value) -> Result<(String, Vec<sql::Value>), Failure> {
    let sql = str_field(v, "sql")?;
    let params = match &v["params"] {
        Value::Null => Vec::new(),
        Value::Array(list) => list.iter().map(value_in).collect::<Result<_, _>>()?,
        _ => return Err(Failure::bad_request("`params` must be a list")),
    };
    Ok((sql, params))
}

fn value_in(v: &Value) -> Result<sql::Value, Failure> {
    match v {
        Value::Null => Ok(sql::Value::Null),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(sql::Value::Integer(i)),
            (None, Some(_)) if n.is_u64() => {
                Err(Failure::bad_request(format!("integer {n} is out of range")))
            }
            (None, Some(f)) => Ok(sql::Value::Real(f)),
            (None, None) => Err(Failure::bad_request(format!("unsupported number {n}"))),
        },
        Value::String(s) => Ok(sql::Value::Text(s.clone())),
        Value::Object(m) if m.len() == 1 && m.contains_key("blob") => m["blob"]
            .as_str()
            .and_then(hex_decode)
            .map(sql::Value::Blob)
            .ok_or_else(|| Failure::bad_request("`blob` must be a hex string")),
        other => Err(Failure::bad_request(format!(
            "unsupported SQL parameter {other}: use null, a number, a string or {{\"blob\": \"<hex>\"}}"
        ))),
    }
}

// ---- JSON out ----

fn value_out(v: sql::Value) -> Value {
    match v {
        sql::Value::Null => Value::Null,
        sql::Value::Integer(i) => i.into(),
        // Non-finite reals have no JSON form: null.
        sql::Value::Real(f) => f.into(),
        sql::Value::Text(s) => s.into(),
        sql::Value::Blob(b) => json!({ "blob": hex_encode(&b) }),
    }
}

fn execute_result(r: sql::ExecuteResult) -> Value {
    json!({"rows_affected": r.rows_affected, "last_insert_id": r.last_insert_id})
}

fn event_out(e: types::RecordedEvent) -> Value {
    json!({
        "id": e.id,
        "sequence": e.sequence,
        "origin": e.origin,
        "region": e.region,
        "kind": e.data.kind,
        "key": e.data.key,
        "payload": String::from_utf8_lossy(&e.data.payload),
        "content_type": e.data.content_type,
        "user": e.data.user,
    })
}

fn session_out(s: edge::UserSession) -> Value {
    let claims: Map<String, Value> = s
        .claims
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    json!({
        "user": s.user,
        "session_id": s.session_id,
        "home_region": s.home_region,
        "issued_at_ms": s.issued_at_ms,
        "expires_at_ms": s.expires_at_ms,
        "scopes": s.scopes,
        "claims": claims,
    })
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
