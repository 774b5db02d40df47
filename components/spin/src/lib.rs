//! `spin`: a fault-isolation fixture. Every request spins forever without
//! responding; only the host's epoch deadline can stop it.

use core::hint::black_box;

use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Spin;

wasip2::http::proxy::export!(Spin);

impl wasip2::exports::http::incoming_handler::Guest for Spin {
    fn handle(_request: IncomingRequest, _response_out: ResponseOutparam) {
        let mut n = 0u64;
        loop {
            // `black_box` keeps the optimizer from proving the loop useless.
            n = black_box(n.wrapping_add(1));
        }
    }
}
