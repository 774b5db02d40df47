//! `slow`: sleeps for `?ms=N` milliseconds (default 0) on the host's monotonic
//! clock, then answers 200 `slept N ms\n`. Used to test concurrency, timeouts
//! and graceful drain.

use wasip2::clocks::monotonic_clock;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Slow;

wasip2::http::proxy::export!(Slow);

impl wasip2::exports::http::incoming_handler::Guest for Slow {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let ms = request
            .path_with_query()
            .as_deref()
            .and_then(query_ms)
            .unwrap_or(0);
        monotonic_clock::subscribe_duration(ms.saturating_mul(1_000_000)).block();
        keel_guest::text(response_out, 200, &format!("slept {ms} ms\n"));
    }
}

/// `/slow?x=1&ms=800` -> `Some(800)`.
fn query_ms(path_with_query: &str) -> Option<u64> {
    let (_, query) = path_with_query.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
}
