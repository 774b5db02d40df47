//! `hello`: the smallest useful `wasi:http/incoming-handler`.
//!
//! - any method but POST/PUT: 200 `hello from keel\n`
//! - POST/PUT: streams the request body chunk by chunk and answers
//!   200 `received N bytes\n`, or 400 `body error\n` when the host cuts the
//!   body (for example because it exceeds the configured size limit).

use wasip2::http::types::{IncomingBody, IncomingRequest, Method, ResponseOutparam};
use wasip2::io::streams::StreamError;

struct Hello;

wasip2::http::proxy::export!(Hello);

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let (status, body) = match request.method() {
            Method::Post | Method::Put => match body_len(request) {
                Ok(n) => (200, format!("received {n} bytes\n")),
                Err(()) => (400, "body error\n".to_string()),
            },
            _ => (200, "hello from keel\n".to_string()),
        };
        keel_guest::text(response_out, status, &body);
    }
}

/// Reads the whole request body without buffering it and returns its length.
fn body_len(request: IncomingRequest) -> Result<u64, ()> {
    let body = request.consume()?;
    let stream = body.stream()?;
    let mut total = 0u64;
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => total += chunk.len() as u64,
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(_)) => return Err(()),
        }
    }
    drop(stream);
    drop(IncomingBody::finish(body));
    Ok(total)
}
