//! `notes`: the example app `make run` serves. Personal notes and a user
//! profile behind JWT authentication, built on the edge tier (world
//! `http-edge-tier`: `edge-operations` + `sql`).
//!
//! The root `keel.toml` mounts it at `/notes/...`, and the paths below are
//! as served there (the component ignores the first path segment, so any
//! prefix works). Every request needs `Authorization: Bearer <JWT>`: the host
//! verifies the token against `[auth]` in keel.toml
//! (`edge-operations.authenticate-user`) and its `sub` claim is the user.
//!
//! | request | answer |
//! |---|---|
//! | `GET /notes?before=<id>&limit=<n>` | 200 `{"notes": [note, ..], "next_before": id or null}`: own notes, newest first, `limit` 1..100 (default 20) |
//! | `POST /notes` `{"title": .., "body": ..}` | 201 the new note |
//! | `GET /notes/<id>` | 200 the note; 404 if it does not exist or is someone else's |
//! | `DELETE /notes/<id>` | 204; 404 as above |
//! | `GET /notes/profile` | 200 `{"user", "home_region", "scopes", "preferences": {name: value}}` |
//! | `PUT /notes/profile/<name>` (body = value, empty removes it) | 204 |
//!
//! A note is `{"id", "title", "body", "created_at"}`. Errors are
//! `{"error": "<case>", "message": ".."}`: 401 with the `auth-error` case
//! (`expired`, `bad-signature`, `malformed` for a missing header, ...) when
//! the token is not accepted, 400 `bad-request` for input this component
//! rejects, 404 `not-found`, and the platform's `error` cases otherwise.
//!
//! Where things live: notes in this component's SQL database (schema created
//! on first use); `note.created` events in its local event log
//! (`record-local-event`, forwarded to the region); preferences and activity
//! in the edge's user state (`set-user-preference`, `record-user-activity`).

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
use bindings::keel::platform::edge_operations::{self as edge, UserSession};
use bindings::keel::platform::sql::{self, Value as Sql};
use bindings::keel::platform::types;
use keel_guest::{Request, percent_decode};
use serde_json::{Value, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

/// Run before the first query of a request; every statement is idempotent.
const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS notes (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        owner      TEXT NOT NULL,
        title      TEXT NOT NULL,
        body       TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
    )",
    "CREATE INDEX IF NOT EXISTS notes_by_owner ON notes (owner, id)",
];

const NOTE_COLUMNS: &str = "id, title, body, created_at";
const MAX_TITLE_CHARS: usize = 200;
const MAX_BODY_BYTES: usize = 64 * 1024;
const DEFAULT_PAGE: i64 = 20;
const MAX_PAGE: i64 = 100;

struct Notes;

bindings::export!(Notes with_types_in bindings);

impl Guest for Notes {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let answer = Request::read(request)
            .map_err(Failure::bad_request)
            .and_then(|req| serve(&req));
        match answer {
            Ok(Answer { status, body: None }) => keel_guest::empty(out, status),
            Ok(Answer {
                status,
                body: Some(body),
            }) => keel_guest::json(out, status, &body.to_string()),
            Err(f) if f.status == 401 => {
                let body = json!({ "error": f.case, "message": f.message }).to_string();
                let headers = [
                    ("content-type", "application/json"),
                    ("www-authenticate", "Bearer"),
                ];
                keel_guest::respond_with(out, 401, &headers, body.as_bytes());
            }
            Err(f) => keel_guest::error(out, f.status, f.case, &f.message),
        }
    }
}

fn serve(req: &Request) -> Result<Answer, Failure> {
    let session = authenticate(req)?;
    let user = session.user.as_str();
    let path: Vec<&str> = req
        .sub_path()
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match (req.method.as_str(), path.as_slice()) {
        ("GET", []) => list_notes(user, req),
        ("POST", []) => create_note(user, req),
        ("GET", ["profile"]) => profile(&session),
        ("PUT", ["profile", name]) => set_preference(user, &percent_decode(name), &req.body),
        ("GET", [id]) => get_note(user, note_id(id)?),
        ("DELETE", [id]) => delete_note(user, note_id(id)?),
        (method, _) => Err(Failure::new(
            404,
            "no-route",
            format!("no route for {method} {}", req.path),
        )),
    }
}

/// The session of the request's bearer token.
fn authenticate(req: &Request) -> Result<UserSession, Failure> {
    let token = req.bearer_token().ok_or_else(|| {
        Failure::new(
            401,
            "malformed",
            "send the token as `Authorization: Bearer <token>`",
        )
    })?;
    Ok(edge::authenticate_user(token)?)
}

fn list_notes(user: &str, req: &Request) -> Result<Answer, Failure> {
    let before = query_int(req, "before")?.unwrap_or(i64::MAX);
    let limit = query_int(req, "limit")?.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Failure::bad_request(format!(
            "limit must be 1 to {MAX_PAGE}"
        )));
    }
    ensure_schema()?;
    let found = sql::query(
        &format!(
            "SELECT {NOTE_COLUMNS} FROM notes WHERE owner = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3"
        ),
        &[text(user), Sql::Integer(before), Sql::Integer(limit)],
    )?;
    let notes = found
        .rows
        .into_iter()
        .map(note_json)
        .collect::<Result<Vec<_>, _>>()?;
    // A full page may have more behind it: pass the last id as `before`.
    let next_before = match notes.last() {
        Some(last) if notes.len() as i64 == limit => last["id"].clone(),
        _ => Value::Null,
    };
    Ok(Answer::json(
        200,
        json!({ "notes": notes, "next_before": next_before }),
    ))
}

fn create_note(user: &str, req: &Request) -> Result<Answer, Failure> {
    let input: Value = serde_json::from_slice(&req.body)
        .map_err(|e| Failure::bad_request(format!("expected JSON {{\"title\", \"body\"}}: {e}")))?;
    let title = input["title"].as_str().map(str::trim).unwrap_or_default();
    let body = input["body"].as_str().unwrap_or_default();
    if title.is_empty() || title.chars().count() > MAX_TITLE_CHARS {
        return Err(Failure::bad_request(format!(
            "title must be 1 to {MAX_TITLE_CHARS} characters"
        )));
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(Failure::bad_request(format!(
            "body must be at most {MAX_BODY_BYTES} bytes"
        )));
    }

    ensure_schema()?;
    let inserted = sql::execute(
        "INSERT INTO notes (owner, title, body) VALUES (?1, ?2, ?3)",
        &[text(user), text(title), text(body)],
    )?;
    let id = inserted
        .last_insert_id
        .ok_or_else(|| Failure::internal("the insert returned no row id"))?;

    // Tell the region (the event is durable here and forwarded later) and
    // mark the user active on this edge. These are separate durable steps:
    // a crash right after the insert leaves a note without its event.
    edge::record_local_event(&types::EventData {
        kind: "note.created".into(),
        key: format!("note/{id}"),
        payload: json!({ "id": id, "title": title }).to_string().into_bytes(),
        content_type: Some("application/json".into()),
        user: Some(user.into()),
    })?;
    edge::record_user_activity(
        user,
        &edge::ActivityData {
            kind: "note.created".into(),
            attributes: vec![("note".into(), id.to_string())],
        },
    )?;

    let note = find_note(user, id)?.ok_or_else(|| Failure::internal("new note not found"))?;
    Ok(Answer::json(201, note))
}

fn get_note(user: &str, id: i64) -> Result<Answer, Failure> {
    ensure_schema()?;
    match find_note(user, id)? {
        Some(note) => Ok(Answer::json(200, note)),
        None => Err(Failure::not_found(id)),
    }
}

fn delete_note(user: &str, id: i64) -> Result<Answer, Failure> {
    ensure_schema()?;
    let deleted = sql::execute(
        "DELETE FROM notes WHERE id = ?1 AND owner = ?2",
        &[Sql::Integer(id), text(user)],
    )?;
    match deleted.rows_affected {
        0 => Err(Failure::not_found(id)),
        _ => Ok(Answer::no_content()),
    }
}

fn profile(session: &UserSession) -> Result<Answer, Failure> {
    let preferences: serde_json::Map<String, Value> = edge::get_user_preferences(&session.user)?
        .into_iter()
        .map(|(name, value)| (name, Value::String(value)))
        .collect();
    Ok(Answer::json(
        200,
        json!({
            "user": session.user,
            "home_region": session.home_region,
            "scopes": session.scopes,
            "preferences": preferences,
        }),
    ))
}

fn set_preference(user: &str, name: &str, value: &[u8]) -> Result<Answer, Failure> {
    let value = std::str::from_utf8(value)
        .map_err(|_| Failure::bad_request("a preference value is UTF-8 text"))?;
    let value = (!value.is_empty()).then_some(value);
    edge::set_user_preference(user, name, value)?;
    Ok(Answer::no_content())
}

// ---- SQL helpers ----

fn ensure_schema() -> Result<(), Failure> {
    let statements = SCHEMA.map(|s| sql::Statement {
        sql: s.into(),
        params: Vec::new(),
    });
    sql::execute_batch(&statements)?;
    Ok(())
}

/// The note `id` if `user` owns it.
fn find_note(user: &str, id: i64) -> Result<Option<Value>, Failure> {
    let found = sql::query(
        &format!("SELECT {NOTE_COLUMNS} FROM notes WHERE id = ?1 AND owner = ?2"),
        &[Sql::Integer(id), text(user)],
    )?;
    found.rows.into_iter().next().map(note_json).transpose()
}

/// A row of `NOTE_COLUMNS` as JSON.
fn note_json(row: Vec<Sql>) -> Result<Value, Failure> {
    match row.as_slice() {
        [
            Sql::Integer(id),
            Sql::Text(title),
            Sql::Text(body),
            Sql::Text(created_at),
        ] => Ok(json!({
            "id": id,
            "title": title,
            "body": body,
            "created_at": created_at,
        })),
        _ => Err(Failure::internal("unexpected row shape in notes")),
    }
}

fn text(s: &str) -> Sql {
    Sql::Text(s.to_string())
}

// ---- request parsing ----

fn note_id(segment: &str) -> Result<i64, Failure> {
    segment
        .parse()
        .map_err(|_| Failure::new(404, "no-route", format!("no note id {segment:?}")))
}

fn query_int(req: &Request, name: &str) -> Result<Option<i64>, Failure> {
    req.query_param(name)
        .map(|v| {
            v.parse()
                .map_err(|_| Failure::bad_request(format!("{name} must be an integer")))
        })
        .transpose()
}

// ---- answers ----

/// A successful answer: status and JSON body (none for 204).
struct Answer {
    status: u16,
    body: Option<Value>,
}

impl Answer {
    fn json(status: u16, body: Value) -> Answer {
        Answer {
            status,
            body: Some(body),
        }
    }

    fn no_content() -> Answer {
        Answer {
            status: 204,
            body: None,
        }
    }
}

/// A failed request: status and the `{"error", "message"}` body.
struct Failure {
    status: u16,
    case: &'static str,
    message: String,
}

impl Failure {
    fn new(status: u16, case: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            status,
            case,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(400, "bad-request", message)
    }

    fn not_found(id: i64) -> Failure {
        Failure::new(404, "not-found", format!("no note {id}"))
    }

    fn internal(message: &str) -> Failure {
        Failure::new(500, "internal", message)
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
            // The node cannot verify tokens right now: not the client's fault.
            A::Unavailable(m) => return Failure::new(503, "unavailable", m),
        };
        Failure::new(401, case, message)
    }
}
