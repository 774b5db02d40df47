//! `billing-probe`: usage events, ledger charges and `reconcile-billing`
//! over HTTP, for the integration tests. Targets world `edge-service` but
//! calls only `edge-operations`, `ledger` and `global-coordination`, so
//! the built component imports only those (grant all three). Routes are
//! relative to the prefix it is mounted at.
//!
//! | route | call | answer |
//! |---|---|---|
//! | `POST /usage?account=A&amount=N` | `record-local-event` of a `billing.usage` event (key A, payload N) | `{"id": s}` |
//! | `POST /append?account=A&amount=N&key=K` | `ledger.append` (a charge is a negative amount) | `{"sequence", "balance"}` |
//! | `POST /reconcile?start=MS&end=MS` | `reconcile-billing` | the reconciliation as JSON (below) |
//!
//! A reconciliation is `{"regions", "missing_regions", "accounts_checked",
//! "usage_events", "entries_checked", "total_usage", "total_credits",
//! "total_debits", "malformed_usage_events", "mismatches": [{"account",
//! "region", "usage", "charged", "detail"}]}`. Platform errors answer
//! `{"error": "<case>", "message": ".."}` with `keel_guest::error_status`.

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
use bindings::keel::platform::{edge_operations, global_coordination as global, ledger, types};
use keel_guest::Request;
use serde_json::{Value, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct BillingProbe;

bindings::export!(BillingProbe with_types_in bindings);

impl incoming_handler::Guest for BillingProbe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let req = match Request::read(request) {
            Ok(r) => r,
            Err(m) => return keel_guest::error(out, 400, "bad-request", &m),
        };
        let text = |name: &str| req.query_param(name).unwrap_or_default();
        let number = |name: &str| req.query_param(name).and_then(|v| v.parse::<i64>().ok());
        let outcome: Result<Value, types::Error> =
            match (req.method.as_str(), req.sub_path().trim_matches('/')) {
                ("POST", "usage") => edge_operations::record_local_event(&types::EventData {
                    kind: "billing.usage".into(),
                    key: text("account"),
                    payload: text("amount").into_bytes(),
                    content_type: Some("text/plain".into()),
                    user: None,
                })
                .map(|id| json!({ "id": id })),
                ("POST", "append") => {
                    let Some(amount) = number("amount") else {
                        return keel_guest::error(out, 400, "bad-request", "amount is a number");
                    };
                    ledger::append(&text("account"), amount, &text("key"))
                        .map(|e| json!({ "sequence": e.sequence, "balance": e.balance }))
                }
                ("POST", "reconcile") => {
                    let (Some(start), Some(end)) = (number("start"), number("end")) else {
                        return keel_guest::error(
                            out,
                            400,
                            "bad-request",
                            "start and end are numbers",
                        );
                    };
                    global::reconcile_billing(types::TimeRange {
                        start_ms: start as u64,
                        end_ms: end as u64,
                    })
                    .map(|r| {
                        json!({
                            "regions": r.regions,
                            "missing_regions": r.missing_regions,
                            "accounts_checked": r.accounts_checked,
                            "usage_events": r.usage_events,
                            "entries_checked": r.entries_checked,
                            "total_usage": r.total_usage,
                            "total_credits": r.total_credits,
                            "total_debits": r.total_debits,
                            "malformed_usage_events": r.malformed_usage_events,
                            "mismatches": r.mismatches.iter().map(|m| json!({
                                "account": m.account,
                                "region": m.region,
                                "usage": m.usage,
                                "charged": m.charged,
                                "detail": m.detail,
                            })).collect::<Vec<_>>(),
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

impl subscriber::Guest for BillingProbe {
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
