//! `outbound`: makes one outgoing HTTP request with `wasi:http/outgoing-handler`.
//!
//! `GET /?to=HOST:PORT` requests `http://HOST:PORT/_keel/health` and answers
//! 200 `upstream <status>\n`, or 502 `error <code>\n` when the host refuses
//! or the request fails. It exists to test that outgoing HTTP is denied
//! unless the origin is in `allowed-outbound-hosts`.

use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, IncomingRequest, OutgoingRequest, ResponseOutparam, Scheme};

struct Outbound;

wasip2::http::proxy::export!(Outbound);

impl wasip2::exports::http::incoming_handler::Guest for Outbound {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let target = request
            .path_with_query()
            .and_then(|p| p.split_once("?to=").map(|(_, t)| t.to_string()))
            .unwrap_or_default();
        let (status, body) = match fetch(&target) {
            Ok(upstream) => (200, format!("upstream {upstream}\n")),
            Err(e) => (502, format!("error {e}\n")),
        };
        keel_guest::text(response_out, status, &body);
    }
}

fn fetch(authority: &str) -> Result<u16, String> {
    let req = OutgoingRequest::new(Fields::new());
    req.set_scheme(Some(&Scheme::Http))
        .map_err(|()| "scheme".to_string())?;
    req.set_authority(Some(authority))
        .map_err(|()| "authority".to_string())?;
    req.set_path_with_query(Some("/_keel/health"))
        .map_err(|()| "path".to_string())?;
    let pending = outgoing_handler::handle(req, None).map_err(|e| format!("{e:?}"))?;
    pending.subscribe().block();
    match pending.get() {
        Some(Ok(Ok(resp))) => Ok(resp.status()),
        Some(Ok(Err(code))) => Err(format!("{code:?}")),
        Some(Err(())) => Err("response already taken".into()),
        None => Err("not ready".into()),
    }
}
