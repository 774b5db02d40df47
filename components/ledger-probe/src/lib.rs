//! `ledger-probe`: a thin HTTP API over the `ledger` interface, for the
//! integration tests and `benches/ledger`. Targets world `http-ledger`
//! (imports `ledger` only). Mount it at a prefix route; routes are relative
//! to that prefix.
//!
//! | route | call | answer |
//! |---|---|---|
//! | `POST /append?account=A&amount=N&key=K` | `ledger.append` | 200 the entry as JSON |
//! | `GET /balance?account=A` | `ledger.balance` | 200 the balance |
//! | `GET /history?account=A[&cursor=C]&limit=L` | `ledger.history` | 200 `{"entries": [..], "next_cursor": C \| null}` |
//!
//! An entry is `{"account", "sequence", "amount", "balance", "key",
//! "at_ms", "replayed"}`. Platform errors answer `{"error": "<case>",
//! "message": ".."}` with `keel_guest::error_status`'s status (an
//! overdraft is 409 `conflict`); a missing or malformed parameter is 400
//! `bad-request`; unknown routes 404 `no-route`.

mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "http-ledger",
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
use bindings::keel::platform::{ledger, types};
use keel_guest::Request;
use serde_json::{Value, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct LedgerProbe;

bindings::export!(LedgerProbe with_types_in bindings);

fn entry(e: &ledger::Entry) -> Value {
    json!({
        "account": e.account,
        "sequence": e.sequence,
        "amount": e.amount,
        "balance": e.balance,
        "key": e.idempotency_key,
        "at_ms": e.at_ms,
        "replayed": e.replayed,
    })
}

impl incoming_handler::Guest for LedgerProbe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let req = match Request::read(request) {
            Ok(r) => r,
            Err(m) => return keel_guest::error(out, 400, "bad-request", &m),
        };
        let Some(account) = req.query_param("account") else {
            return keel_guest::error(out, 400, "bad-request", "account is required");
        };
        let number = |name: &str| req.query_param(name).map(|v| v.parse::<i64>());
        let outcome = match (req.method.as_str(), req.sub_path().trim_matches('/')) {
            ("POST", "append") => {
                let (Some(Ok(amount)), Some(key)) = (number("amount"), req.query_param("key"))
                else {
                    return keel_guest::error(
                        out,
                        400,
                        "bad-request",
                        "amount (an integer) and key are required",
                    );
                };
                ledger::append(&account, amount, &key).map(|e| entry(&e))
            }
            ("GET", "balance") => ledger::balance(&account).map(|b| json!(b)),
            ("GET", "history") => {
                let cursor = match number("cursor") {
                    None => None,
                    Some(Ok(c)) if c >= 0 => Some(c as u64),
                    Some(_) => {
                        return keel_guest::error(out, 400, "bad-request", "cursor is a number");
                    }
                };
                let Some(Ok(limit)) = number("limit").map(|r| r.map(|l| l.clamp(0, 1 << 20)))
                else {
                    return keel_guest::error(out, 400, "bad-request", "limit is a number");
                };
                ledger::history(&account, cursor, limit as u32).map(|p| {
                    json!({
                        "entries": p.entries.iter().map(entry).collect::<Vec<_>>(),
                        "next_cursor": p.next_cursor,
                    })
                })
            }
            _ => return keel_guest::error(out, 404, "no-route", &req.path),
        };
        match outcome {
            Ok(v) => keel_guest::json(out, 200, &v.to_string()),
            Err(e) => {
                let (case, message) = error_case(e);
                keel_guest::error(out, keel_guest::error_status(case), case, &message)
            }
        }
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
