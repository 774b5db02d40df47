//! `uses-ledger`: targets the `keel:platform` world `http-ledger` (imports
//! `keel:platform/ledger@0.1.0`). Every request reads the balance of account
//! `a`. Tests use it to check that a granted interface this build does not
//! implement yet is refused at load time as "not available in this build".

mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "http-ledger", generate_all });
}

use bindings::exports::wasi::http::incoming_handler::Guest;
use bindings::keel::platform::ledger;
use bindings::wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct UsesLedger;

bindings::export!(UsesLedger with_types_in bindings);

impl Guest for UsesLedger {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let (status, body) = match ledger::balance("a") {
            Ok(balance) => (200, balance.to_string().into_bytes()),
            Err(error) => (500, format!("ledger error: {error:?}").into_bytes()),
        };
        respond(response_out, status, &body);
    }
}

fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
        .expect("valid header");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("valid status");
    let outgoing = response.body().expect("body taken once");
    ResponseOutparam::set(out, Ok(response));
    {
        let stream = outgoing.write().expect("stream taken once");
        let _ = body
            .chunks(4096)
            .try_for_each(|chunk| stream.blocking_write_and_flush(chunk));
    }
    let _ = OutgoingBody::finish(outgoing, None);
}
