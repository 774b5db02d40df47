//! `membomb`: a fault-isolation fixture. Every request allocates 1 MiB chunks,
//! touching every page, until the host refuses to grow memory; then it traps.
//! It never responds normally.

use core::hint::black_box;

use wasip2::http::types::{IncomingRequest, ResponseOutparam};

const CHUNK: usize = 1 << 20;

struct MemBomb;

wasip2::http::proxy::export!(MemBomb);

impl wasip2::exports::http::incoming_handler::Guest for MemBomb {
    fn handle(_request: IncomingRequest, _response_out: ResponseOutparam) {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = Vec::new();
            if chunk.try_reserve_exact(CHUNK).is_err() || hoard.try_reserve(1).is_err() {
                panic!("out of memory after {} MiB", hoard.len());
            }
            // Write every byte so the memory is really committed.
            chunk.resize(CHUNK, hoard.len() as u8 | 1);
            hoard.push(black_box(chunk));
        }
    }
}
