//! `state-probe`: a thin HTTP API over the replicated `state` interface
//! (world `http-state`), used by the sync integration tests and benchmarks.
//! Mount it at a prefix route (`/state/...`); routes below are relative to
//! it. Every route takes `?scope=edge|region|global` (default `region`).
//!
//! | route | call | answer |
//! |---|---|---|
//! | `POST /counter/<name>/inc?by=N` | `counter-inc` | value |
//! | `POST /counter/<name>/dec?by=N` | `counter-dec` | value |
//! | `GET /counter/<name>` | `counter-value` | value |
//! | `POST /set/<name>/<member>` | `set-add` | `true` if new |
//! | `DELETE /set/<name>/<member>` | `set-remove` | `true` if it was a member |
//! | `GET /set/<name>/<member>` | `set-contains` | `true` / `false` |
//! | `GET /set/<name>` | `set-members` | sorted list |
//! | `PUT /register/<name>` (body) | `register-set` | 204 |
//! | `GET /register/<name>` | `register-get` | raw value / 404 |
//! | `PUT /map/<name>/<key>` (body) | `map-set` | 204 |
//! | `GET /map/<name>/<key>` | `map-get` | raw value / 404 |
//! | `DELETE /map/<name>/<key>` | `map-remove` | `true` if it was present |
//! | `GET /map/<name>` | `map-entries` | `{"key": "value (UTF-8, lossy)"}` |
//! | `GET /map-keys/<name>` | `map-keys` | sorted list |
//! | `POST /bench/counter-inc?n=N&name=C` | N increments in a loop | final value |
//!
//! Platform errors answer `{"error": "<case>", "message": ".."}` with the
//! status `keel_guest::error_status` gives the case.

mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "http-state",
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
use bindings::keel::platform::state;
use bindings::keel::platform::types::{Error, Scope};
use keel_guest::{Request, percent_decode};
use serde_json::{Map, Value};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct StateProbe;

bindings::export!(StateProbe with_types_in bindings);

enum Reply {
    Json(Value),
    Bytes(Vec<u8>),
    NoContent,
}

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
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let (case, message) = match e {
            Error::NotFound => ("not-found", "not found".to_string()),
            Error::Denied(m) => ("denied", m),
            Error::Invalid(m) => ("invalid", m),
            Error::Unavailable(m) => ("unavailable", m),
            Error::Conflict(m) => ("conflict", m),
            Error::Residency(m) => ("residency", m),
            Error::Limit(m) => ("limit", m),
            Error::Internal(m) => ("internal", m),
        };
        Failure::new(keel_guest::error_status(case), case, message)
    }
}

impl Guest for StateProbe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let outcome = Request::read(request)
            .map_err(|m| Failure::new(400, "bad-request", m))
            .and_then(|req| route(&req));
        match outcome {
            Ok(Reply::Json(v)) => keel_guest::json(out, 200, &v.to_string()),
            Ok(Reply::Bytes(b)) => keel_guest::respond(out, 200, "application/octet-stream", &b),
            Ok(Reply::NoContent) => keel_guest::empty(out, 204),
            Err(f) => keel_guest::error(out, f.status, f.error, &f.message),
        }
    }
}

fn scope(req: &Request) -> Result<Scope, Failure> {
    match req.query_param("scope").as_deref() {
        None | Some("region") => Ok(Scope::Region),
        Some("edge") => Ok(Scope::Edge),
        Some("global") => Ok(Scope::Global),
        Some(other) => Err(Failure::new(
            400,
            "bad-request",
            format!("scope {other:?}; accepted: edge, region, global"),
        )),
    }
}

fn number(req: &Request, name: &str, default: u64) -> Result<u64, Failure> {
    match req.query_param(name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| Failure::new(400, "bad-request", format!("`{name}` must be a number"))),
    }
}

fn sorted(mut v: Vec<String>) -> Value {
    v.sort();
    Value::from(v)
}

fn route(req: &Request) -> Result<Reply, Failure> {
    let s = scope(req)?;
    let parts: Vec<String> = req
        .sub_path()
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let json = |v: Value| Ok(Reply::Json(v));
    match (req.method.as_str(), parts.as_slice()) {
        ("POST", ["counter", name, "inc"]) => {
            json(state::counter_inc(name, s, number(req, "by", 1)?)?.into())
        }
        ("POST", ["counter", name, "dec"]) => {
            json(state::counter_dec(name, s, number(req, "by", 1)?)?.into())
        }
        ("GET", ["counter", name]) => json(state::counter_value(name, s)?.into()),
        ("POST", ["set", name, member]) => json(state::set_add(name, s, member)?.into()),
        ("DELETE", ["set", name, member]) => json(state::set_remove(name, s, member)?.into()),
        ("GET", ["set", name, member]) => json(state::set_contains(name, s, member)?.into()),
        ("GET", ["set", name]) => json(sorted(state::set_members(name, s)?)),
        ("PUT", ["register", name]) => {
            state::register_set(name, s, &req.body)?;
            Ok(Reply::NoContent)
        }
        ("GET", ["register", name]) => match state::register_get(name, s)? {
            Some(v) => Ok(Reply::Bytes(v)),
            None => Err(Failure::new(404, "not-found", "never written")),
        },
        ("PUT", ["map", name, key]) => {
            state::map_set(name, s, key, &req.body)?;
            Ok(Reply::NoContent)
        }
        ("GET", ["map", name, key]) => match state::map_get(name, s, key)? {
            Some(v) => Ok(Reply::Bytes(v)),
            None => Err(Failure::new(404, "not-found", "no such key")),
        },
        ("DELETE", ["map", name, key]) => json(state::map_remove(name, s, key)?.into()),
        ("GET", ["map", name]) => {
            let entries: Map<String, Value> = state::map_entries(name, s)?
                .into_iter()
                .map(|(k, v)| (k, Value::from(String::from_utf8_lossy(&v).into_owned())))
                .collect();
            json(Value::Object(entries))
        }
        ("GET", ["map-keys", name]) => json(sorted(state::map_keys(name, s)?)),
        ("POST", ["bench", "counter-inc"]) => {
            let name = req.query_param("name").unwrap_or_else(|| "bench".into());
            let mut value = 0;
            for _ in 0..number(req, "n", 1)? {
                value = state::counter_inc(&name, s, 1)?;
            }
            json(value.into())
        }
        (method, _) => Err(Failure::new(
            404,
            "no-route",
            format!("no route for {method} {}", req.path),
        )),
    }
}
