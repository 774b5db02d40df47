//! `uses-kv`: targets the `keel:platform` world `http-kv` (imports
//! `keel:platform/kv@0.1.0`). Every request reads key `hello` and answers
//! 200 with its value (`none` when missing) or 500 with the kv error. The host
//! uses it to test that an ungranted import is refused at load time and that
//! an interface missing from the build is reported as such.

mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "http-kv", generate_all });
}

use bindings::exports::wasi::http::incoming_handler::Guest;
use bindings::keel::platform::kv;
use bindings::wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct UsesKv;

bindings::export!(UsesKv with_types_in bindings);

impl Guest for UsesKv {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let (status, body) = match kv::get("hello") {
            Ok(Some(value)) => (200, value),
            Ok(None) => (200, b"none".to_vec()),
            Err(error) => (500, format!("kv error: {error:?}").into_bytes()),
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
