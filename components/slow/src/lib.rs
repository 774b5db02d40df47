//! `slow`: sleeps for `?ms=N` milliseconds (default 0) on the host's monotonic
//! clock, then answers 200 `slept N ms\n`. Used to test concurrency, timeouts
//! and graceful drain.

use wasip2::clocks::monotonic_clock;
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

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
        respond(response_out, format!("slept {ms} ms\n").as_bytes());
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

fn respond(out: ResponseOutparam, body: &[u8]) {
    let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
        .expect("valid header");
    let response = OutgoingResponse::new(headers);
    let outgoing = response.body().expect("body taken once");
    ResponseOutparam::set(out, Ok(response));
    {
        let stream = outgoing.write().expect("stream taken once");
        // `blocking-write-and-flush` takes at most 4096 bytes per call. A
        // client that went away is not the guest's problem.
        let _ = body
            .chunks(4096)
            .try_for_each(|chunk| stream.blocking_write_and_flush(chunk));
    }
    let _ = OutgoingBody::finish(outgoing, None);
}
