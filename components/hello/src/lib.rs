//! `hello`: the smallest useful `wasi:http/incoming-handler`.
//!
//! - any method but POST/PUT: 200 `hello from keel\n`
//! - POST/PUT: streams the request body chunk by chunk and answers
//!   200 `received N bytes\n`, or 400 `body error\n` when the host cuts the
//!   body (for example because it exceeds the configured size limit).

use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
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
        respond(response_out, status, body.as_bytes());
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

fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
        .expect("valid header");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("valid status");
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
