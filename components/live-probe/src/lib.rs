//! `live-probe`: live pushes and the component environment, for the
//! integration tests (world `http-live`; grant `live`). Routes are relative
//! to the prefix it is mounted at.
//!
//! | route | call | answer |
//! |---|---|---|
//! | `POST /publish/<channel>?event=<name>` (body: data) | `live.publish` | `{"queued": n}` |
//! | `GET /env` | `wasi:cli/environment.get-environment` | `{"NAME": "value", ...}` |
//!
//! Platform errors answer `{"error": "<case>", "message": ".."}` with
//! `keel_guest::error_status`.

mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "http-live",
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

use bindings::exports::wasi::http::incoming_handler;
use bindings::keel::platform::{live, types};
use keel_guest::{Request, percent_decode};
use serde_json::json;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct LiveProbe;

bindings::export!(LiveProbe with_types_in bindings);

impl incoming_handler::Guest for LiveProbe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let req = match Request::read(request) {
            Ok(r) => r,
            Err(m) => return keel_guest::error(out, 400, "bad-request", &m),
        };
        let path = req.sub_path().trim_matches('/').to_string();
        match (req.method.as_str(), path.split_once('/')) {
            ("POST", Some(("publish", channel))) => {
                let event = req.query_param("event").unwrap_or_else(|| "message".into());
                let data = String::from_utf8_lossy(&req.body);
                match live::publish(&percent_decode(channel), &event, &data) {
                    Ok(n) => keel_guest::json(out, 200, &json!({"queued": n}).to_string()),
                    Err(e) => {
                        let (case, message) = error_case(&e);
                        keel_guest::error(out, keel_guest::error_status(case), case, &message)
                    }
                }
            }
            ("GET", None) if path == "env" => {
                let env: serde_json::Map<String, serde_json::Value> =
                    wasip2::cli::environment::get_environment()
                        .into_iter()
                        .map(|(k, v)| (k, v.into()))
                        .collect();
                keel_guest::json(out, 200, &serde_json::Value::Object(env).to_string())
            }
            _ => keel_guest::error(
                out,
                404,
                "not-found",
                "routes: POST /publish/<channel>, GET /env",
            ),
        }
    }
}

fn error_case(e: &types::Error) -> (&'static str, String) {
    match e {
        types::Error::NotFound => ("not-found", String::new()),
        types::Error::Denied(m) => ("denied", m.clone()),
        types::Error::Invalid(m) => ("invalid", m.clone()),
        types::Error::Unavailable(m) => ("unavailable", m.clone()),
        types::Error::Conflict(m) => ("conflict", m.clone()),
        types::Error::Residency(m) => ("residency", m.clone()),
        types::Error::Limit(m) => ("limit", m.clone()),
        types::Error::Internal(m) => ("internal", m.clone()),
    }
}
