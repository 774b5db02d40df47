//! `privacy-probe`: GDPR erasure and export over HTTP, for the integration
//! tests and the erase benchmark (world `http-global`; grant
//! `global-coordination`). Routes are relative to the prefix it is mounted
//! at.
//!
//! | route | call | answer |
//! |---|---|---|
//! | `POST /erase/<user>?regions=a,b` | `process-data-deletion` | `{"id": s}` |
//! | `GET /erase-status/<id>` | `get-deletion-status` | `{"state", "user", "regions": [{"region", "state", "detail"}]}` |
//! | `POST /export/<user>?format=json\|ndjson` | `export-user-data` | `{"id": s}` |
//! | `GET /export-status/<id>` | `get-export-status` | as erase-status, plus `"format"`, `"size_bytes"` |
//! | `GET /export/<id>?chunk=N` | `read-export` in chunks of N bytes (default 65536) until empty | the archive |
//!
//! Platform errors answer `{"error": "<case>", "message": ".."}` with
//! `keel_guest::error_status`.

mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "http-global",
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
use bindings::keel::platform::{global_coordination as global, types};
use keel_guest::{Request, percent_decode};
use serde_json::{Value, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct PrivacyProbe;

bindings::export!(PrivacyProbe with_types_in bindings);

enum Reply {
    Json(Value),
    Bytes(Vec<u8>),
}

impl incoming_handler::Guest for PrivacyProbe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let req = match Request::read(request) {
            Ok(r) => r,
            Err(m) => return keel_guest::error(out, 400, "bad-request", &m),
        };
        let path = req.sub_path().trim_matches('/').to_string();
        let (route, arg) = match path.split_once('/') {
            Some((r, a)) => (r, percent_decode(a)),
            None => (path.as_str(), String::new()),
        };
        let outcome: Result<Reply, types::Error> = match (req.method.as_str(), route) {
            ("POST", "erase") => {
                let regions: Vec<String> = req
                    .query_param("regions")
                    .map(|r| {
                        r.split(',')
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default();
                global::process_data_deletion(&arg, &regions)
                    .map(|id| Reply::Json(json!({ "id": id })))
            }
            ("GET", "erase-status") => global::get_deletion_status(&arg).map(|s| {
                Reply::Json(json!({
                    "id": s.id,
                    "user": s.user,
                    "state": job_state(s.state),
                    "regions": regions(&s.regions),
                }))
            }),
            ("POST", "export") => {
                let format = match req.query_param("format").as_deref() {
                    None | Some("json") => global::ExportFormat::Json,
                    Some("ndjson") => global::ExportFormat::Ndjson,
                    Some(f) => {
                        return keel_guest::error(
                            out,
                            400,
                            "bad-request",
                            &format!("format {f:?}"),
                        );
                    }
                };
                global::export_user_data(&arg, format).map(|id| Reply::Json(json!({ "id": id })))
            }
            ("GET", "export-status") => global::get_export_status(&arg).map(|s| {
                Reply::Json(json!({
                    "id": s.id,
                    "user": s.user,
                    "state": job_state(s.state),
                    "format": match s.format {
                        global::ExportFormat::Json => "json",
                        global::ExportFormat::Ndjson => "ndjson",
                    },
                    "size_bytes": s.size_bytes,
                    "regions": regions(&s.regions),
                }))
            }),
            ("GET", "export") => {
                let chunk = req
                    .query_param("chunk")
                    .and_then(|c| c.parse::<u32>().ok())
                    .unwrap_or(65_536);
                read_all(&arg, chunk).map(Reply::Bytes)
            }
            _ => return keel_guest::error(out, 404, "no-route", &req.path),
        };
        match outcome {
            Ok(Reply::Json(v)) => keel_guest::json(out, 200, &v.to_string()),
            Ok(Reply::Bytes(b)) => keel_guest::respond(out, 200, "application/octet-stream", &b),
            Err(e) => {
                let (case, message) = error_case(e);
                keel_guest::error(out, keel_guest::error_status(case), case, &message)
            }
        }
    }
}

fn read_all(id: &str, chunk: u32) -> Result<Vec<u8>, types::Error> {
    let mut archive = Vec::new();
    loop {
        let part = global::read_export(id, archive.len() as u64, chunk)?;
        if part.is_empty() {
            return Ok(archive);
        }
        archive.extend_from_slice(&part);
    }
}

fn job_state(s: types::JobState) -> &'static str {
    match s {
        types::JobState::Pending => "pending",
        types::JobState::Running => "running",
        types::JobState::Completed => "completed",
        types::JobState::Failed => "failed",
    }
}

fn regions(list: &[types::RegionProgress]) -> Value {
    list.iter()
        .map(|p| json!({ "region": p.region, "state": job_state(p.state), "detail": p.detail }))
        .collect()
}

impl subscriber::Guest for PrivacyProbe {
    fn on_updates(_: u64, _: Vec<subscriber::Update>) -> Result<(), types::Error> {
        Ok(())
    }

    fn on_global_events(
        _: u64,
        _: Vec<subscriber::ReceivedGlobalEvent>,
    ) -> Result<(), types::Error> {
        Ok(())
    }
}

fn error_case(e: types::Error) -> (&'static str, String) {
    use types::Error as E;
    match e {
        E::NotFound => ("not-found", "not found".to_string()),
        E::Denied(m) => ("denied", m),
        E::Invalid(m) => ("invalid", m),
        E::Unavailable(m) => ("unavailable", m),
        E::Conflict(m) => ("conflict", m),
        E::Residency(m) => ("residency", m),
        E::Limit(m) => ("limit", m),
        E::Internal(m) => ("internal", m),
    }
}
