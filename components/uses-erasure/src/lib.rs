//! `uses-erasure`: targets world `http-global` and calls
//! `global-coordination.process-data-deletion`, a function this build does
//! not implement yet. Tests use it to check that such a component is refused
//! at load time, naming the function, while the interface's implemented
//! functions stay usable by other components.

mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "http-global", generate_all });
}

use bindings::exports::keel::platform::subscriber;
use bindings::exports::wasi::http::incoming_handler::Guest;
use bindings::keel::platform::{global_coordination as global, types};
use bindings::wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct UsesErasure;

bindings::export!(UsesErasure with_types_in bindings);

impl Guest for UsesErasure {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let body = match global::process_data_deletion("u", &[]) {
            Ok(id) => id,
            Err(e) => format!("{e:?}"),
        };
        let headers = Fields::new();
        let response = OutgoingResponse::new(headers);
        let outgoing = response.body().expect("body taken once");
        ResponseOutparam::set(response_out, Ok(response));
        {
            let stream = outgoing.write().expect("stream taken once");
            let _ = stream.blocking_write_and_flush(body.as_bytes());
        }
        let _ = OutgoingBody::finish(outgoing, None);
    }
}

impl subscriber::Guest for UsesErasure {
    fn on_update(_: types::SubscriptionId, _: types::Update) -> Result<(), types::Error> {
        Ok(())
    }

    fn on_global_event(
        _: types::SubscriptionId,
        _: types::ReceivedGlobalEvent,
    ) -> Result<(), types::Error> {
        Ok(())
    }
}
