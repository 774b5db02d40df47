//! `chat`: the global chat, Keel's showcase application. Rooms, direct
//! messages and presence for users on any edge of any region, with its
//! single-page web UI (`ui/`, embedded) and live delivery over the host's
//! server-sent events (`live`).
//!
//! Mounted at a prefix route (`/chat/...`); paths below are as served there
//! (the component ignores the first path segment, so any prefix works).
//!
//! | request | answer |
//! |---|---|
//! | `GET /chat/`, `/chat/index.html`, `/chat/app.js`, `/chat/app.css` | the web UI (`GET /chat` redirects to `/chat/`) |
//! | `POST /chat/signin` `{"user", "password"}` | 200 `{"token", "user", "registered"}`; 401 `bad-credentials` |
//! | `GET /chat/me` | 200 `{"user", "display-name", "edge", "region", "home-region", "registered-here", "live", "expires-at-ms"}` |
//! | `PUT /chat/me` `{"display-name"}` (empty removes it) | 200 as `GET` |
//! | `GET /chat/rooms` | 200 `[{"name", "last-id"}]`: rooms known on this node, `lobby` always |
//! | `PUT /chat/rooms/<room>` | 200 `{"name"}`: makes the room known here |
//! | `POST /chat/rooms/<room>/messages` `{"text"}` | 201 the stored message plus `"delivery"` |
//! | `GET /chat/rooms/<room>/messages?after=<id>\|before=<id>&limit=<n>` | 200 `{"messages": [..ascending], "more"}` |
//! | `GET /chat/dm` | 200 `[{"user", "last-id"}]`: the caller's conversations, newest first |
//! | `POST /chat/dm/<user>/messages` `{"text"}` | 201 as for rooms |
//! | `GET /chat/dm/<user>/messages?after=\|before=&limit=` | 200 as for rooms |
//! | `PUT /chat/presence` `{"status": "online"\|"away"\|"offline"}` | 200 the presence entry plus `"delivery"` |
//! | `GET /chat/presence` | 200 `[{"user", "status", "region", "edge", "at"}]` by user |
//! | `GET /chat/stats` | 200 `{"user", "sent", "total-sent", "stored-here", "sent-stored-here", "rooms-here"}` |
//!
//! Everything but the UI and `signin` needs `Authorization: Bearer <JWT>`
//! (`edge-operations.authenticate-user`: any token the node's `[auth]` keys
//! accept, whose `sub` is a valid user id). `signin` registers a user id on
//! its first use on this node (password: PBKDF2-HMAC-SHA256, random salt,
//! in SQL) and mints an HS256 token (`sub`, `iat`, `exp` = 12 h) with the
//! secret in the environment variable `CHAT_JWT_SECRET`, which must be one
//! of the node's `[auth]` keys.
//!
//! A message is `{"id", "kind": "room"|"dm", "room", "from", "to", "name",
//! "text", "at", "edge", "region"}` (`room` or `to` is null; `name` is the
//! sender's display name when sent). Ids are `<ms:015>-<edge>-<seq:010>`:
//! unique (the sequence is this edge's, durable) and ordered by time as
//! strings. Page parameters compare ids as strings.
//!
//! Where things go: a message is inserted into this node's SQL first (the
//! request is answered only after that), then published live on this node
//! (`room/<room>` event `message`; `user/<to>` and `user/<from>` event
//! `dm`), counted (`state` counters `user/<user>/sent` and `messages`, global
//! scope), and — for room messages and direct messages to users not
//! registered on this edge — sent to the region (`sync-to-region`, kind
//! `chat.message`) and to every region (`publish-global-event`, type
//! `chat.message`; refused with `residency` when the sender's data must
//! stay in its zone: then it stays regional). Direct messages between
//! users registered on this edge stay on this edge. Each node subscribes
//! itself to the region's and the world's `chat.*` events; the exported
//! `subscriber` inserts what arrives (`INSERT OR IGNORE` on the id, so
//! redeliveries and echoes change nothing) and publishes it live only if
//! it was new; a direct message is kept only on edges where its sender or
//! recipient is registered. Presence is a `state` map `presence` (user -> entry; region
//! scope, and global scope unless the user's data must stay in its zone),
//! announced live (`presence` event `presence`) and by `chat.presence`
//! events the same way.
//!
//! Errors are `{"error": "<case>", "message"}`: 401 with the auth-error
//! case or `bad-credentials`, 400 `bad-request` for input this component
//! refuses, 404 `no-route`, and the platform's `error` cases otherwise.

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

mod crypto;
mod store;

use bindings::exports::keel::platform::subscriber;
use bindings::exports::wasi::http::incoming_handler;
use bindings::keel::platform::edge_operations::{self as edge, UserSession};
use bindings::keel::platform::{
    global_coordination as global, live, regional_coordination as regional, state, types,
};
use keel_guest::{Request, percent_decode};
use serde_json::{Value, json};
use store::{Message, Page};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const APP_CSS: &str = include_str!("../ui/app.css");

/// The room every user starts in.
const DEFAULT_ROOM: &str = "lobby";
/// Message text, after trimming.
const MAX_TEXT_CHARS: usize = 2000;
const MAX_DISPLAY_NAME_CHARS: usize = 64;
const MIN_PASSWORD_BYTES: usize = 4;
const MAX_PASSWORD_BYTES: usize = 256;
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 200;
/// The preference holding a user's display name.
const DISPLAY_NAME_PREF: &str = "chat.display-name";
/// The `state` map of presence entries (user -> JSON entry).
const PRESENCE_MAP: &str = "presence";
/// Event kinds / global event types this component sends and receives.
const MESSAGE_EVENT: &str = "chat.message";
const PRESENCE_EVENT: &str = "chat.presence";
/// The environment variable with the HS256 token secret.
const SECRET_VAR: &str = "CHAT_JWT_SECRET";
/// Optional: where the browser opens the live stream (default
/// `/_keel/live/chat`, for a component named `chat`).
const LIVE_PATH_VAR: &str = "CHAT_LIVE_PATH";

struct Chat;

bindings::export!(Chat with_types_in bindings);

impl incoming_handler::Guest for Chat {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let answer = Request::read(request)
            .map_err(Failure::bad_request)
            .and_then(|req| route(&req));
        match answer {
            Ok(Reply::Json(status, body)) => keel_guest::json(out, status, &body.to_string()),
            Ok(Reply::Static(content_type, body)) => keel_guest::respond_with(
                out,
                200,
                &[
                    ("content-type", content_type),
                    ("cache-control", "no-cache"),
                ],
                body.as_bytes(),
            ),
            Ok(Reply::Redirect(to)) => {
                keel_guest::respond_with(out, 308, &[("location", to.as_str())], &[])
            }
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

impl subscriber::Guest for Chat {
    fn on_updates(
        _: types::SubscriptionId,
        updates: Vec<types::Update>,
    ) -> Result<(), types::Error> {
        let events = updates.iter().map(|u| {
            let e = &u.event;
            (
                e.data.kind.as_str(),
                e.data.payload.as_slice(),
                e.origin.as_str(),
            )
        });
        deliver(events)
    }

    fn on_global_events(
        _: types::SubscriptionId,
        events: Vec<types::ReceivedGlobalEvent>,
    ) -> Result<(), types::Error> {
        let events = events.iter().map(|g| {
            // source: "keel://<region>/<edge>/<component>".
            let origin = g
                .source
                .strip_prefix("keel://")
                .and_then(|rest| rest.split('/').nth(1))
                .unwrap_or_default();
            (g.event.event_type.as_str(), g.event.data.as_slice(), origin)
        });
        deliver(events)
    }
}

/// Applies delivered events (kind, payload, origin edge): their messages
/// in one transaction, then what is new goes live. Only failures worth a
/// redelivery (the database cannot be written now) are errors: anything
/// malformed is dropped, since an error would hold back every later
/// delivery.
fn deliver<'a>(
    events: impl Iterator<Item = (&'a str, &'a [u8], &'a str)>,
) -> Result<(), types::Error> {
    let mut messages = Vec::new();
    let mut presence = Vec::new();
    let here = edge::local_node().edge;
    for (kind, payload, origin_edge) in events {
        let Ok(value) = serde_json::from_slice::<Value>(payload) else {
            continue;
        };
        match kind {
            MESSAGE_EVENT => messages.extend(Message::from_json(&value)),
            // The origin announced it to its own browsers already.
            PRESENCE_EVENT if origin_edge != here => presence.extend(presence_entry(&value)),
            _ => {}
        }
    }
    if !messages.is_empty() {
        store::ensure_schema()?;
        // A direct message is kept only where one of its two users is
        // registered (their edge reads it); rooms are kept everywhere.
        let mut dm_users: Vec<&str> = messages
            .iter()
            .filter(|m| m.room.is_none())
            .flat_map(|m| [Some(m.from.as_str()), m.to.as_deref()])
            .flatten()
            .collect();
        dm_users.sort_unstable();
        dm_users.dedup();
        let here = store::registered(&dm_users)?;
        messages.retain(|m| {
            m.room.is_some()
                || here.contains(&m.from)
                || m.to.as_ref().is_some_and(|to| here.contains(to))
        });
        let new = store::insert_messages(&messages)?;
        for (message, _) in messages.iter().zip(new).filter(|(_, new)| *new) {
            publish_message(message);
        }
    }
    for entry in presence {
        let _ = live::publish("presence", "presence", &entry.to_string());
    }
    Ok(())
}

// ---- routing ----

/// A successful answer.
enum Reply {
    Json(u16, Value),
    /// A file of the UI: content type and body.
    Static(&'static str, &'static str),
    /// 308 to this location.
    Redirect(String),
}

fn route(req: &Request) -> Result<Reply, Failure> {
    let segments: Vec<String> = req
        .sub_path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method.as_str();

    // The UI and sign-in: no token.
    match (method, segments.as_slice()) {
        ("GET", []) if !req.path.ends_with('/') => {
            return Ok(Reply::Redirect(format!("{}/", req.path)));
        }
        ("GET", [] | ["index.html"]) => {
            return Ok(Reply::Static("text/html; charset=utf-8", INDEX_HTML));
        }
        ("GET", ["app.js"]) => {
            return Ok(Reply::Static("text/javascript; charset=utf-8", APP_JS));
        }
        ("GET", ["app.css"]) => return Ok(Reply::Static("text/css; charset=utf-8", APP_CSS)),
        ("POST", ["signin"]) => return signin(req),
        _ => {}
    }

    let session = authenticate(req)?;
    let user = session.user.as_str();
    store::ensure_schema()?;
    ensure_subscriptions();
    match (method, segments.as_slice()) {
        ("GET", ["me"]) => me(&session),
        ("PUT", ["me"]) => set_me(&session, req),
        ("GET", ["rooms"]) => rooms(),
        ("PUT", ["rooms", room]) => {
            let room = room_name(room)?;
            store::add_room(room)?;
            Ok(Reply::Json(200, json!({ "name": room })))
        }
        ("GET", ["rooms", room, "messages"]) => history(&format!("room/{}", room_name(room)?), req),
        ("POST", ["rooms", room, "messages"]) => send(user, Target::Room(room_name(room)?), req),
        ("GET", ["dm"]) => Ok(Reply::Json(200, store::conversations(user)?)),
        ("GET", ["dm", peer, "messages"]) => history(&store::dm_conv(user, user_id(peer)?), req),
        ("POST", ["dm", peer, "messages"]) => send(user, Target::User(user_id(peer)?), req),
        ("GET", ["presence"]) => presence_list(),
        ("PUT", ["presence"]) => set_presence(user, req),
        ("GET", ["stats"]) => stats(user),
        _ => Err(Failure::new(
            404,
            "no-route",
            format!("no route for {method} {}", req.path),
        )),
    }
}

// ---- accounts and sessions ----

fn signin(req: &Request) -> Result<Reply, Failure> {
    let input = json_body(req)?;
    let user = user_id(input["user"].as_str().unwrap_or_default())?;
    let password = input["password"].as_str().unwrap_or_default();
    if !(MIN_PASSWORD_BYTES..=MAX_PASSWORD_BYTES).contains(&password.len()) {
        return Err(Failure::bad_request(format!(
            "password must be {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    let secret = env_var(SECRET_VAR)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Failure::new(
                503,
                "unavailable",
                format!("{SECRET_VAR} is not set: this node cannot issue tokens"),
            )
        })?;
    store::ensure_schema()?;
    let registered = match store::account(user)? {
        Some(account) => {
            if !crypto::verify_password(password, &account.salt, account.iterations, &account.hash)
            {
                return Err(bad_credentials());
            }
            false
        }
        None => {
            let salt = crypto::random_bytes(crypto::SALT_BYTES);
            let hash = crypto::hash_password(password, &salt, crypto::PBKDF2_ITERATIONS);
            let created =
                store::create_account(user, &salt, &hash, crypto::PBKDF2_ITERATIONS, now_ms())?;
            // Someone registered the id meanwhile: their password counts.
            if !created {
                let account = store::account(user)?
                    .ok_or_else(|| Failure::internal("an account vanished while signing in"))?;
                if !crypto::verify_password(
                    password,
                    &account.salt,
                    account.iterations,
                    &account.hash,
                ) {
                    return Err(bad_credentials());
                }
            }
            created
        }
    };
    ensure_subscriptions();
    let token = crypto::sign_token(secret.as_bytes(), user, now_ms() / 1000);
    Ok(Reply::Json(
        200,
        json!({ "token": token, "user": user, "registered": registered }),
    ))
}

fn bad_credentials() -> Failure {
    Failure::new(
        401,
        "bad-credentials",
        "this user id is registered with another password",
    )
}

/// The session of the request's bearer token, for a valid chat user id.
fn authenticate(req: &Request) -> Result<UserSession, Failure> {
    let token = req.bearer_token().ok_or_else(|| {
        Failure::new(
            401,
            "malformed",
            "send the token as `Authorization: Bearer <token>`",
        )
    })?;
    let session = edge::authenticate_user(token)?;
    if !is_name(&session.user) {
        return Err(Failure::new(
            401,
            "claim-mismatch",
            "the token's subject is not a chat user id (1-32 of a-z 0-9 _ -)",
        ));
    }
    Ok(session)
}

/// Subscribes this component (on this node) to the region's and the
/// world's chat events. Idempotent and cheap once subscribed; a failure
/// (bus down) is retried by the next request.
fn ensure_subscriptions() {
    let _ = regional::subscribe_regional_updates(&regional::UpdateFilter {
        kinds: vec![MESSAGE_EVENT.into(), PRESENCE_EVENT.into()],
        key_prefix: None,
        edges: Vec::new(),
    });
    let _ = global::subscribe_global_events(&[MESSAGE_EVENT.into(), PRESENCE_EVENT.into()]);
}

fn me(session: &UserSession) -> Result<Reply, Failure> {
    let node = edge::local_node();
    Ok(Reply::Json(
        200,
        json!({
            "user": session.user,
            "display-name": display_name(&session.user),
            "edge": node.edge,
            "region": node.region,
            "home-region": session.home_region,
            "registered-here": store::account(&session.user)?.is_some(),
            "live": env_var(LIVE_PATH_VAR).unwrap_or_else(|| "/_keel/live/chat".into()),
            "expires-at-ms": session.expires_at_ms,
        }),
    ))
}

fn set_me(session: &UserSession, req: &Request) -> Result<Reply, Failure> {
    let input = json_body(req)?;
    let name = match &input["display-name"] {
        Value::String(s) => s.trim().to_string(),
        Value::Null => String::new(),
        _ => return Err(Failure::bad_request("`display-name` must be a string")),
    };
    if name.chars().count() > MAX_DISPLAY_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(Failure::bad_request(format!(
            "a display name is at most {MAX_DISPLAY_NAME_CHARS} characters, without control characters"
        )));
    }
    let value = (!name.is_empty()).then_some(name.as_str());
    edge::set_user_preference(&session.user, DISPLAY_NAME_PREF, value)?;
    me(session)
}

fn display_name(user: &str) -> Option<String> {
    edge::get_user_preferences(user)
        .ok()?
        .into_iter()
        .find(|(name, _)| name == DISPLAY_NAME_PREF)
        .map(|(_, value)| value)
}

// ---- messages ----

/// Where a message goes.
enum Target<'a> {
    Room(&'a str),
    User(&'a str),
}

fn rooms() -> Result<Reply, Failure> {
    Ok(Reply::Json(200, store::rooms(DEFAULT_ROOM)?))
}

fn history(conv: &str, req: &Request) -> Result<Reply, Failure> {
    let after = query_id(req, "after")?;
    let before = query_id(req, "before")?;
    let page = match (after, before) {
        (Some(_), Some(_)) => {
            return Err(Failure::bad_request("give `after` or `before`, not both"));
        }
        (Some(id), None) => Page::After(id),
        (None, Some(id)) => Page::Before(id),
        (None, None) => Page::Latest,
    };
    let limit = match req.query_param("limit") {
        None => DEFAULT_PAGE,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| Failure::bad_request(format!("limit must be 1 to {MAX_PAGE}")))?,
    };
    let (messages, more) = store::page(conv, &page, limit)?;
    let messages: Vec<Value> = messages.iter().map(Message::to_json).collect();
    Ok(Reply::Json(
        200,
        json!({ "messages": messages, "more": more }),
    ))
}

fn send(user: &str, target: Target<'_>, req: &Request) -> Result<Reply, Failure> {
    let input = json_body(req)?;
    let text = input["text"]
        .as_str()
        .ok_or_else(|| Failure::bad_request("expected JSON {\"text\": \"...\"}"))?
        .trim();
    let chars = text.chars().count();
    if chars == 0 || chars > MAX_TEXT_CHARS {
        return Err(Failure::bad_request(format!(
            "text must be 1 to {MAX_TEXT_CHARS} characters"
        )));
    }
    let node = edge::local_node();
    let (room, to) = match target {
        Target::Room(room) => (Some(room.to_string()), None),
        Target::User(to) => (None, Some(to.to_string())),
    };
    let message = Message {
        id: next_id("", &node.edge)?,
        room,
        from: user.to_string(),
        to,
        name: display_name(user),
        text: text.to_string(),
        at: now_ms(),
        edge: node.edge,
        region: node.region,
    };
    // Durable here before anything else happens.
    if !store::insert_message(&message)? {
        return Err(Failure::internal("a new message id was already taken"));
    }
    publish_message(&message);
    let counted = count_sent(user);

    // A direct message to someone registered on this edge stays here.
    let local_only = match &message.to {
        Some(to) => store::account(to)?.is_some(),
        None => false,
    };
    let mut delivery = if local_only {
        json!({ "scope": "edge" })
    } else {
        propagate(
            MESSAGE_EVENT,
            &message.conv(),
            &message.id,
            &message.to_json().to_string(),
            user,
        )
        .0
    };
    delivery["counted"] = counted.into();
    let mut body = message.to_json();
    body["delivery"] = delivery;
    Ok(Reply::Json(201, body))
}

/// Publishes a stored message to the browsers on this node (best effort:
/// live delivery is at most once, and browsers re-read what they missed).
fn publish_message(message: &Message) {
    let data = message.to_json().to_string();
    match (&message.room, &message.to) {
        (Some(room), _) => {
            let _ = live::publish(&format!("room/{room}"), "message", &data);
        }
        (None, Some(to)) => {
            let _ = live::publish(&format!("user/{to}"), "dm", &data);
            if *to != message.from {
                let _ = live::publish(&format!("user/{}", message.from), "dm", &data);
            }
        }
        (None, None) => {}
    }
}

/// Increments the sender's and the total message counters (global CRDTs).
/// The message is stored already: a failure is reported, not fatal.
fn count_sent(user: &str) -> bool {
    let a = state::counter_inc(&format!("user/{user}/sent"), types::Scope::Global, 1);
    let b = state::counter_inc("messages", types::Scope::Global, 1);
    a.is_ok() && b.is_ok()
}

/// Sends an event to the region and to every region. Returns what
/// happened (for the client) and whether the global publish was accepted.
/// A global publish refused with `residency` is the sender's residency
/// rule at work: the event stays in its region.
fn propagate(kind: &str, key: &str, id: &str, payload: &str, user: &str) -> (Value, bool) {
    let event = types::EventData {
        kind: kind.into(),
        key: key.into(),
        payload: payload.as_bytes().to_vec(),
        content_type: Some("application/json".into()),
        user: Some(user.into()),
    };
    let region = match regional::sync_to_region(&[event]) {
        Ok(id) => json!({ "state": "queued", "id": id }),
        Err(e) => json!({ "state": "failed", "error": Failure::from(e).to_json() }),
    };
    let published = global::publish_global_event(&types::GlobalEvent {
        id: id.into(),
        event_type: kind.into(),
        subject: Some(key.into()),
        content_type: Some("application/json".into()),
        data: payload.as_bytes().to_vec(),
        user: Some(user.into()),
    });
    let (global, ok) = match published {
        Ok(()) => (json!({ "state": "queued" }), true),
        Err(types::Error::Residency(m)) => (json!({ "state": "kept-in-zone", "reason": m }), false),
        Err(e) => (
            json!({ "state": "failed", "error": Failure::from(e).to_json() }),
            false,
        ),
    };
    (
        json!({ "scope": "global", "region": region, "global": global }),
        ok,
    )
}

/// A new id `<prefix><ms:015>-<edge>-<seq:010>`: the sequence is this
/// edge's durable write counter of one local-state key.
fn next_id(prefix: &str, edge_name: &str) -> Result<String, Failure> {
    let seq = edge::set_local_state("chat/id-sequence", b"1")?;
    Ok(format!(
        "{prefix}{:015}-{edge_name}-{:010}",
        now_ms(),
        seq % 10_000_000_000
    ))
}

// ---- presence ----

const STATUSES: [&str; 3] = ["online", "away", "offline"];

fn set_presence(user: &str, req: &Request) -> Result<Reply, Failure> {
    let input = json_body(req)?;
    let status = input["status"]
        .as_str()
        .filter(|s| STATUSES.contains(s))
        .ok_or_else(|| Failure::bad_request("status must be online, away or offline"))?;
    let node = edge::local_node();
    let entry = json!({
        "user": user,
        "status": status,
        "region": node.region,
        "edge": node.edge,
        "at": now_ms(),
    });
    let data = entry.to_string();
    state::map_set(PRESENCE_MAP, types::Scope::Region, user, data.as_bytes())?;
    let _ = live::publish("presence", "presence", &data);
    let id = next_id("presence-", &node.edge)?;
    let (mut delivery, global_ok) = propagate(
        PRESENCE_EVENT,
        &format!("presence/{user}"),
        &id,
        &data,
        user,
    );
    // Only users whose data may leave their zone are in the global map.
    if global_ok {
        state::map_set(PRESENCE_MAP, types::Scope::Global, user, data.as_bytes())?;
    }
    delivery["global-map"] = global_ok.into();
    let mut body = entry;
    body["delivery"] = delivery;
    Ok(Reply::Json(200, body))
}

/// Region and global presence merged: per user the newest entry.
fn presence_list() -> Result<Reply, Failure> {
    let mut merged: std::collections::BTreeMap<String, Value> = Default::default();
    for scope in [types::Scope::Region, types::Scope::Global] {
        for (user, bytes) in state::map_entries(PRESENCE_MAP, scope)? {
            let Some(entry) = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .as_ref()
                .and_then(presence_entry)
            else {
                continue;
            };
            if entry["user"] != user.as_str() {
                continue;
            }
            let newer = merged.get(&user).is_none_or(|old| {
                (entry["at"].as_u64(), entry["edge"].as_str())
                    > (old["at"].as_u64(), old["edge"].as_str())
            });
            if newer {
                merged.insert(user, entry);
            }
        }
    }
    Ok(Reply::Json(
        200,
        Value::Array(merged.into_values().collect()),
    ))
}

/// A presence entry with exactly the expected fields, if `v` is one.
fn presence_entry(v: &Value) -> Option<Value> {
    let user = v["user"].as_str().filter(|u| is_name(u))?;
    let status = v["status"].as_str().filter(|s| STATUSES.contains(s))?;
    let region = v["region"].as_str()?;
    let edge_name = v["edge"].as_str()?;
    let at = v["at"].as_u64()?;
    Some(json!({
        "user": user,
        "status": status,
        "region": region,
        "edge": edge_name,
        "at": at,
    }))
}

fn stats(user: &str) -> Result<Reply, Failure> {
    let sent = state::counter_value(&format!("user/{user}/sent"), types::Scope::Global)?;
    let total = state::counter_value("messages", types::Scope::Global)?;
    let here = store::counts(user)?;
    Ok(Reply::Json(
        200,
        json!({
            "user": user,
            "sent": sent,
            "total-sent": total,
            "stored-here": here.messages,
            "sent-stored-here": here.sent_by_user,
            "rooms-here": here.rooms,
        }),
    ))
}

// ---- input ----

/// User ids and room names: 1-32 of `a-z 0-9 _ -`.
pub(crate) fn is_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn user_id(s: &str) -> Result<&str, Failure> {
    if is_name(s) {
        Ok(s)
    } else {
        Err(Failure::bad_request(format!(
            "{s:?} is not a user id: 1-32 of a-z 0-9 _ -"
        )))
    }
}

fn room_name(s: &str) -> Result<&str, Failure> {
    if is_name(s) {
        Ok(s)
    } else {
        Err(Failure::bad_request(format!(
            "{s:?} is not a room name: 1-32 of a-z 0-9 _ -"
        )))
    }
}

/// A message id in a query parameter.
fn query_id(req: &Request, name: &str) -> Result<Option<String>, Failure> {
    match req.query_param(name) {
        None => Ok(None),
        Some(id) if store::is_message_id(&id) => Ok(Some(id)),
        Some(_) => Err(Failure::bad_request(format!(
            "`{name}` is not a message id"
        ))),
    }
}

fn json_body(req: &Request) -> Result<Value, Failure> {
    let v: Value = serde_json::from_slice(&req.body)
        .map_err(|e| Failure::bad_request(format!("invalid JSON body: {e}")))?;
    if v.is_object() {
        Ok(v)
    } else {
        Err(Failure::bad_request("the body must be a JSON object"))
    }
}

fn env_var(name: &str) -> Option<String> {
    wasip2::cli::environment::get_environment()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

fn now_ms() -> u64 {
    let t = wasip2::clocks::wall_clock::now();
    t.seconds * 1000 + u64::from(t.nanoseconds / 1_000_000)
}

// ---- failures ----

/// A failed request: status and the `{"error", "message"}` body.
#[derive(Debug)]
pub(crate) struct Failure {
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

    pub(crate) fn internal(message: &str) -> Failure {
        Failure::new(500, "internal", message)
    }

    fn to_json(&self) -> Value {
        json!({ "error": self.case, "message": self.message })
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

/// For the subscriber: a failure as a platform error.
impl From<Failure> for types::Error {
    fn from(f: Failure) -> types::Error {
        match f.case {
            "unavailable" => types::Error::Unavailable(f.message),
            _ => types::Error::Internal(format!("{}: {}", f.case, f.message)),
        }
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
