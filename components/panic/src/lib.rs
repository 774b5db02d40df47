//! `panic`: a fault-isolation fixture. Every request panics before a response
//! is set; with `panic = "abort"` the instance traps and the host must turn
//! that into a 500 for this one request only.

use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Panic;

wasip2::http::proxy::export!(Panic);

impl wasip2::exports::http::incoming_handler::Guest for Panic {
    fn handle(_request: IncomingRequest, _response_out: ResponseOutparam) {
        panic!("boom");
    }
}
