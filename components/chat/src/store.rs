//! This node's SQL database: accounts, messages (rooms and direct
//! messages, one table) and the rooms known here.
//!
//! Personal data, by user id: `accounts.user`, `messages.sender`,
//! `messages.recipient` (keel.toml `[components.chat.personal-data] sql`).

use crate::bindings::keel::platform::sql::{self, Value as Sql};
use crate::{Failure, is_name};
use serde_json::{Value, json};

/// Every statement is idempotent; run when a table is missing.
const SCHEMA: [&str; 6] = [
    "CREATE TABLE IF NOT EXISTS accounts (
        user       TEXT PRIMARY KEY,
        salt       BLOB NOT NULL,
        hash       BLOB NOT NULL,
        iterations INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS messages (
        id        TEXT PRIMARY KEY,
        conv      TEXT NOT NULL,
        room      TEXT,
        sender    TEXT NOT NULL,
        recipient TEXT,
        name      TEXT,
        text      TEXT NOT NULL,
        at        INTEGER NOT NULL,
        edge      TEXT NOT NULL,
        region    TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS messages_by_conv ON messages (conv, id)",
    "CREATE INDEX IF NOT EXISTS messages_by_sender ON messages (sender, id)",
    "CREATE INDEX IF NOT EXISTS messages_by_recipient ON messages (recipient, id)",
    "CREATE TABLE IF NOT EXISTS rooms (
        name       TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL
    )",
];
const TABLES: i64 = 3;

/// Creates the tables unless they are all there (a read, no write
/// transaction, on the common path).
pub fn ensure_schema() -> Result<(), Failure> {
    let found = sql::query(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('accounts', 'messages', 'rooms')",
        &[],
    )?;
    if matches!(found.rows.first().and_then(|r| r.first()), Some(Sql::Integer(n)) if *n == TABLES) {
        return Ok(());
    }
    let statements = SCHEMA.map(|s| sql::Statement {
        sql: s.into(),
        params: Vec::new(),
    });
    sql::execute_batch(&statements)?;
    Ok(())
}

// ---- accounts ----

pub struct Account {
    pub salt: Vec<u8>,
    pub hash: Vec<u8>,
    pub iterations: u32,
}

pub fn account(user: &str) -> Result<Option<Account>, Failure> {
    let found = sql::query(
        "SELECT salt, hash, iterations FROM accounts WHERE user = ?1",
        &[text(user)],
    )?;
    match found.rows.into_iter().next().as_deref() {
        None => Ok(None),
        Some([Sql::Blob(salt), Sql::Blob(hash), Sql::Integer(iterations)]) => Ok(Some(Account {
            salt: salt.clone(),
            hash: hash.clone(),
            iterations: u32::try_from(*iterations).unwrap_or(0),
        })),
        Some(_) => Err(Failure::internal("unexpected row shape in accounts")),
    }
}

/// Which of `users` are registered on this edge.
pub fn registered(users: &[&str]) -> Result<Vec<String>, Failure> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let marks = (1..=users.len())
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let params: Vec<Sql> = users.iter().map(|u| text(u)).collect();
    let found = sql::query(
        &format!("SELECT user FROM accounts WHERE user IN ({marks})"),
        &params,
    )?;
    Ok(found
        .rows
        .into_iter()
        .filter_map(|row| match row.into_iter().next() {
            Some(Sql::Text(user)) => Some(user),
            _ => None,
        })
        .collect())
}

/// Registers `user`; false if the id is taken.
pub fn create_account(
    user: &str,
    salt: &[u8],
    hash: &[u8],
    iterations: u32,
    at_ms: u64,
) -> Result<bool, Failure> {
    let r = sql::execute(
        "INSERT OR IGNORE INTO accounts (user, salt, hash, iterations, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        &[
            text(user),
            Sql::Blob(salt.to_vec()),
            Sql::Blob(hash.to_vec()),
            Sql::Integer(i64::from(iterations)),
            int(at_ms),
        ],
    )?;
    Ok(r.rows_affected == 1)
}

// ---- messages ----

/// A chat message: to a room (`room`) or to a user (`to`).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: String,
    pub room: Option<String>,
    pub from: String,
    pub to: Option<String>,
    /// The sender's display name when it was sent.
    pub name: Option<String>,
    pub text: String,
    pub at: u64,
    pub edge: String,
    pub region: String,
}

impl Message {
    /// The conversation: `room/<room>` or `dm/<a>/<b>` (ids in order).
    pub fn conv(&self) -> String {
        match (&self.room, &self.to) {
            (Some(room), _) => format!("room/{room}"),
            (None, Some(to)) => dm_conv(&self.from, to),
            (None, None) => String::new(),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "kind": if self.room.is_some() { "room" } else { "dm" },
            "room": self.room,
            "from": self.from,
            "to": self.to,
            "name": self.name,
            "text": self.text,
            "at": self.at,
            "edge": self.edge,
            "region": self.region,
        })
    }

    /// A message received from elsewhere, if it is well-formed.
    pub fn from_json(v: &Value) -> Option<Message> {
        let opt_name = |field: &str| match &v[field] {
            Value::Null => Some(None),
            Value::String(s) if is_name(s) => Some(Some(s.clone())),
            _ => None,
        };
        let room = opt_name("room")?;
        let to = opt_name("to")?;
        if room.is_some() == to.is_some() {
            return None;
        }
        let name = match &v["name"] {
            Value::Null => None,
            Value::String(s) if s.chars().count() <= 64 => Some(s.clone()),
            _ => return None,
        };
        let text = v["text"].as_str()?;
        if text.is_empty() || text.chars().count() > crate::MAX_TEXT_CHARS {
            return None;
        }
        let id = v["id"].as_str().filter(|id| is_message_id(id))?;
        Some(Message {
            id: id.to_string(),
            room,
            from: v["from"].as_str().filter(|u| is_name(u))?.to_string(),
            to,
            name,
            text: text.to_string(),
            at: v["at"].as_u64()?,
            edge: v["edge"].as_str().filter(|e| e.len() <= 63)?.to_string(),
            region: v["region"].as_str().filter(|r| r.len() <= 63)?.to_string(),
        })
    }
}

/// The conversation key of a direct message between `a` and `b`.
pub fn dm_conv(a: &str, b: &str) -> String {
    if a <= b {
        format!("dm/{a}/{b}")
    } else {
        format!("dm/{b}/{a}")
    }
}

/// What message ids look like: up to 100 of `a-z 0-9 -`.
pub fn is_message_id(s: &str) -> bool {
    (1..=100).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Stores `m` unless its id is there already; true if it was new. A room
/// message also makes its room known here.
pub fn insert_message(m: &Message) -> Result<bool, Failure> {
    Ok(insert_messages(std::slice::from_ref(m))?.contains(&true))
}

/// Stores each of `messages` whose id is not there already, in one
/// transaction; for each, whether it was new. Room messages also make
/// their rooms known here.
pub fn insert_messages(messages: &[Message]) -> Result<Vec<bool>, Failure> {
    let mut statements: Vec<sql::Statement> = messages
        .iter()
        .map(|m| sql::Statement {
            sql: "INSERT OR IGNORE INTO messages (id, conv, room, sender, recipient, name, text, at, edge, region)
                  VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
                .into(),
            params: vec![
                text(&m.id),
                text(&m.conv()),
                opt_text(m.room.as_deref()),
                text(&m.from),
                opt_text(m.to.as_deref()),
                opt_text(m.name.as_deref()),
                text(&m.text),
                int(m.at),
                text(&m.edge),
                text(&m.region),
            ],
        })
        .collect();
    let mut rooms: Vec<&str> = messages.iter().filter_map(|m| m.room.as_deref()).collect();
    rooms.sort_unstable();
    rooms.dedup();
    statements.extend(rooms.into_iter().map(add_room_statement));
    let results = sql::execute_batch(&statements)?;
    Ok(results
        .iter()
        .take(messages.len())
        .map(|r| r.rows_affected == 1)
        .collect())
}

/// Which part of a conversation to read.
pub enum Page {
    /// The newest messages.
    Latest,
    /// Messages with ids below this one (older).
    Before(String),
    /// Messages with ids above this one (newer).
    After(String),
}

const COLUMNS: &str = "id, room, sender, recipient, name, text, at, edge, region";

/// Up to `limit` messages of `conv` in ascending id order, and whether
/// more exist in the direction of the page (older for `Latest`/`Before`,
/// newer for `After`).
pub fn page(conv: &str, page: &Page, limit: u32) -> Result<(Vec<Message>, bool), Failure> {
    let fetch = Sql::Integer(i64::from(limit) + 1);
    let (query, params) = match page {
        Page::Latest => (
            format!("SELECT {COLUMNS} FROM messages WHERE conv = ?1 ORDER BY id DESC LIMIT ?2"),
            vec![text(conv), fetch],
        ),
        Page::Before(id) => (
            format!(
                "SELECT {COLUMNS} FROM messages WHERE conv = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3"
            ),
            vec![text(conv), text(id), fetch],
        ),
        Page::After(id) => (
            format!(
                "SELECT {COLUMNS} FROM messages WHERE conv = ?1 AND id > ?2 ORDER BY id ASC LIMIT ?3"
            ),
            vec![text(conv), text(id), fetch],
        ),
    };
    let found = sql::query(&query, &params)?;
    let mut messages = found
        .rows
        .into_iter()
        .map(message_row)
        .collect::<Result<Vec<_>, _>>()?;
    let more = messages.len() > limit as usize;
    messages.truncate(limit as usize);
    if !matches!(page, Page::After(_)) {
        messages.reverse();
    }
    Ok((messages, more))
}

fn message_row(row: Vec<Sql>) -> Result<Message, Failure> {
    let s = |v: &Sql| match v {
        Sql::Text(t) => Some(t.clone()),
        _ => None,
    };
    match row.as_slice() {
        [
            id,
            room,
            sender,
            recipient,
            name,
            body,
            Sql::Integer(at),
            edge,
            region,
        ] => Ok(Message {
            id: s(id).unwrap_or_default(),
            room: s(room),
            from: s(sender).unwrap_or_default(),
            to: s(recipient),
            name: s(name),
            text: s(body).unwrap_or_default(),
            at: u64::try_from(*at).unwrap_or(0),
            edge: s(edge).unwrap_or_default(),
            region: s(region).unwrap_or_default(),
        }),
        _ => Err(Failure::internal("unexpected row shape in messages")),
    }
}

/// `user`'s direct-message partners, newest conversation first:
/// `[{"user", "last-id"}]`.
pub fn conversations(user: &str) -> Result<Value, Failure> {
    let found = sql::query(
        "SELECT CASE WHEN sender = ?1 THEN recipient ELSE sender END AS peer, max(id) AS last
         FROM messages
         WHERE room IS NULL AND (sender = ?1 OR recipient = ?1)
         GROUP BY peer ORDER BY last DESC LIMIT 500",
        &[text(user)],
    )?;
    Ok(found
        .rows
        .into_iter()
        .filter_map(|row| match row.as_slice() {
            [Sql::Text(peer), Sql::Text(last)] => Some(json!({ "user": peer, "last-id": last })),
            _ => None,
        })
        .collect())
}

// ---- rooms ----

fn add_room_statement(room: &str) -> sql::Statement {
    sql::Statement {
        sql: "INSERT OR IGNORE INTO rooms (name, created_at) VALUES (?1, CAST(strftime('%s', 'now') AS INTEGER) * 1000)".into(),
        params: vec![text(room)],
    }
}

pub fn add_room(room: &str) -> Result<(), Failure> {
    sql::execute_batch(&[add_room_statement(room)])?;
    Ok(())
}

/// The rooms known here (and `default`), by name: `[{"name", "last-id"}]`.
pub fn rooms(default: &str) -> Result<Value, Failure> {
    let found = sql::query(
        "SELECT r.name, (SELECT max(m.id) FROM messages m WHERE m.conv = 'room/' || r.name)
         FROM rooms r ORDER BY r.name LIMIT 1000",
        &[],
    )?;
    let mut rooms: Vec<Value> = found
        .rows
        .into_iter()
        .filter_map(|row| match row.as_slice() {
            [Sql::Text(name), last] => Some(json!({
                "name": name,
                "last-id": match last { Sql::Text(t) => Value::from(t.clone()), _ => Value::Null },
            })),
            _ => None,
        })
        .collect();
    if !rooms.iter().any(|r| r["name"] == default) {
        rooms.insert(0, json!({ "name": default, "last-id": null }));
    }
    Ok(Value::Array(rooms))
}

// ---- stats ----

pub struct Counts {
    pub messages: i64,
    pub sent_by_user: i64,
    pub rooms: i64,
}

pub fn counts(user: &str) -> Result<Counts, Failure> {
    let found = sql::query(
        "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM messages WHERE sender = ?1), (SELECT count(*) FROM rooms)",
        &[text(user)],
    )?;
    match found.rows.first().map(Vec::as_slice) {
        Some([Sql::Integer(m), Sql::Integer(s), Sql::Integer(r)]) => Ok(Counts {
            messages: *m,
            sent_by_user: *s,
            rooms: *r,
        }),
        _ => Err(Failure::internal("unexpected row shape in counts")),
    }
}

fn text(s: &str) -> Sql {
    Sql::Text(s.to_string())
}

fn opt_text(s: Option<&str>) -> Sql {
    s.map_or(Sql::Null, text)
}

fn int(n: u64) -> Sql {
    Sql::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> Message {
        Message {
            id: "000001700000000-ams-0000000001".into(),
            room: Some("lobby".into()),
            from: "alice".into(),
            to: None,
            name: Some("Alice".into()),
            text: "hello".into(),
            at: 1_700_000_000_000,
            edge: "ams".into(),
            region: "alpha".into(),
        }
    }

    #[test]
    fn messages_round_trip_through_json() {
        let m = message();
        assert_eq!(Message::from_json(&m.to_json()), Some(m.clone()));
        let dm = Message {
            room: None,
            to: Some("bob".into()),
            ..m
        };
        assert_eq!(Message::from_json(&dm.to_json()), Some(dm.clone()));
        assert_eq!(dm.conv(), "dm/alice/bob");
    }

    #[test]
    fn malformed_messages_are_refused() {
        let good = message().to_json();
        let broken = |f: &dyn Fn(&mut Value)| {
            let mut v = good.clone();
            f(&mut v);
            Message::from_json(&v)
        };
        assert!(broken(&|v| v["to"] = "bob".into()).is_none(), "room and to");
        assert!(broken(&|v| v["room"] = Value::Null).is_none(), "neither");
        assert!(broken(&|v| v["room"] = "Lobby!".into()).is_none());
        assert!(broken(&|v| v["from"] = "".into()).is_none());
        assert!(broken(&|v| v["id"] = "a b".into()).is_none());
        assert!(broken(&|v| v["text"] = "".into()).is_none());
        assert!(broken(&|v| v["text"] = "x".repeat(2001).into()).is_none());
        assert!(broken(&|v| v["at"] = "soon".into()).is_none());
        assert!(Message::from_json(&json!("text")).is_none());
    }

    #[test]
    fn dm_conversations_are_symmetric() {
        assert_eq!(dm_conv("bob", "alice"), dm_conv("alice", "bob"));
        assert_eq!(dm_conv("al", "al"), "dm/al/al");
    }

    #[test]
    fn names_and_ids() {
        assert!(is_name("a") && is_name("user_1-x") && is_name(&"a".repeat(32)));
        assert!(!is_name("") && !is_name(&"a".repeat(33)) && !is_name("A") && !is_name("a.b"));
        assert!(is_message_id("000001700000000-ams-0000000001"));
        assert!(!is_message_id("") && !is_message_id("x y") && !is_message_id(&"1".repeat(101)));
    }
}
