//! `compute`: a CPU-bound benchmark guest.
//!
//! Takes the request body (or, when it is empty, an embedded ~4 KiB JSON
//! document), parses it into a `serde_json::Value`, serializes it again and
//! hashes the result 16 times, each round as `sha256(previous digest ||
//! document)`. Answers 200 with the final digest in hex. Deterministic: the
//! same input always gives the same digest. Invalid JSON gives 400.

use std::io::Read as _;

use sha2::{Digest as _, Sha256};
use wasip2::http::types::{IncomingBody, IncomingRequest, ResponseOutparam};

const SAMPLE: &str = include_str!("sample.json");
const ROUNDS: usize = 16;

struct Compute;

wasip2::http::proxy::export!(Compute);

impl wasip2::exports::http::incoming_handler::Guest for Compute {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let (status, body) = match read_body(request) {
            Err(()) => (400, "body error\n".to_string()),
            Ok(input) => {
                let input = if input.is_empty() {
                    SAMPLE.as_bytes()
                } else {
                    &input[..]
                };
                match digest(input) {
                    Ok(hex) => (200, hex + "\n"),
                    Err(e) => (400, format!("invalid json: {e}\n")),
                }
            }
        };
        keel_guest::text(response_out, status, &body);
    }
}

fn digest(input: &[u8]) -> Result<String, serde_json::Error> {
    let value: serde_json::Value = serde_json::from_slice(input)?;
    let doc = serde_json::to_vec(&value)?;
    let mut digest = [0u8; 32];
    for _ in 0..ROUNDS {
        digest = Sha256::new()
            .chain_update(digest)
            .chain_update(&doc)
            .finalize()
            .into();
    }
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

fn read_body(request: IncomingRequest) -> Result<Vec<u8>, ()> {
    let body = request.consume()?;
    let mut buf = Vec::new();
    {
        let mut stream = body.stream()?;
        stream.read_to_end(&mut buf).map_err(|_| ())?;
    }
    drop(IncomingBody::finish(body));
    Ok(buf)
}
