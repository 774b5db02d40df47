//! Helpers shared by the `wasi:http` guests in this workspace (built on the
//! `wasip2` crate's WASI 0.2.12 bindings).
//!
//! Guests that generate `keel:platform` bindings with `wit_bindgen::generate!`
//! map the WASI interfaces onto `wasip2` (`with: { "wasi:http/types@0.2.12":
//! wasip2::http::types, ... }`), so these helpers work for them too.

use std::io::Read as _;

use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// Sends a complete response with `content-type` and `body`.
pub fn respond(out: ResponseOutparam, status: u16, content_type: &str, body: &[u8]) {
    respond_with(out, status, &[("content-type", content_type)], body);
}

/// Sends a complete response with the given headers and `body`.
pub fn respond_with(out: ResponseOutparam, status: u16, headers: &[(&str, &str)], body: &[u8]) {
    let list: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    let headers = Fields::from_list(&list).expect("valid response headers");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("valid status code");
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

/// `respond` with `text/plain`.
pub fn text(out: ResponseOutparam, status: u16, body: &str) {
    respond(out, status, "text/plain", body.as_bytes());
}

/// `respond` with `application/json`; `body` is already serialized.
pub fn json(out: ResponseOutparam, status: u16, body: &str) {
    respond(out, status, "application/json", body.as_bytes());
}

/// An error response: `{"error": "<case>", "message": "..."}`.
pub fn error(out: ResponseOutparam, status: u16, case: &str, message: &str) {
    let body = serde_json::json!({ "error": case, "message": message });
    json(out, status, &body.to_string());
}

/// The HTTP status for a case of the `keel:platform` `error` variant
/// (kebab-case name, as in WIT).
pub fn error_status(case: &str) -> u16 {
    match case {
        "invalid" => 400,
        "denied" | "residency" => 403,
        "not-found" => 404,
        "conflict" => 409,
        "limit" => 413,
        "unavailable" => 503,
        _ => 500,
    }
}

/// A response without a body (e.g. 204).
pub fn empty(out: ResponseOutparam, status: u16) {
    respond_with(out, status, &[], &[]);
}

/// An incoming request, read completely: method, path, query, headers, body.
pub struct Request {
    /// `GET`, `POST`, ... (other methods as sent).
    pub method: String,
    /// The path without the query, still percent-encoded (`/notes/12`).
    pub path: String,
    /// The raw query string without `?` (empty if there is none).
    pub query: String,
    headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Request {
    /// Reads the head and the whole body. Keel caps the body at the
    /// component's `max-body-bytes`, so this cannot grow without bound.
    pub fn read(request: IncomingRequest) -> Result<Request, String> {
        let method = match request.method() {
            Method::Get => "GET".to_string(),
            Method::Head => "HEAD".to_string(),
            Method::Post => "POST".to_string(),
            Method::Put => "PUT".to_string(),
            Method::Delete => "DELETE".to_string(),
            Method::Connect => "CONNECT".to_string(),
            Method::Options => "OPTIONS".to_string(),
            Method::Trace => "TRACE".to_string(),
            Method::Patch => "PATCH".to_string(),
            Method::Other(other) => other,
        };
        let path_with_query = request.path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = match path_with_query.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (path_with_query, String::new()),
        };
        let headers = request.headers().entries();
        let body = request
            .consume()
            .map_err(|()| "request body already consumed".to_string())?;
        let mut buf = Vec::new();
        {
            let mut stream = body
                .stream()
                .map_err(|()| "request body stream already taken".to_string())?;
            stream
                .read_to_end(&mut buf)
                .map_err(|e| format!("cannot read the request body: {e}"))?;
        }
        drop(IncomingBody::finish(body));
        Ok(Request {
            method,
            path,
            query,
            headers,
            body: buf,
        })
    }

    /// The first value of header `name` (case-insensitive), if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The token of an `Authorization: Bearer <token>` header.
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.header("authorization")?.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty())
    }

    /// The percent-decoded value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(n, _)| query_decode(n) == name)
            .map(|(_, v)| query_decode(v))
    }

    /// The path below the component's route prefix: the path without its
    /// first segment (`/notes/12` -> `/12`, `/probe` -> `/`).
    pub fn sub_path(&self) -> &str {
        let rest = self.path.strip_prefix('/').unwrap_or(&self.path);
        match rest.find('/') {
            Some(i) => &rest[i..],
            None => "/",
        }
    }
}

/// Decodes `%XX` escapes (a path segment: `+` stays `+`). Invalid escapes
/// stay as they are; bytes that are not UTF-8 become U+FFFD.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex_digit),
                bytes.get(i + 2).copied().and_then(hex_digit),
            )
        {
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A query-string component: `+` is a space, then `%XX` escapes.
fn query_decode(s: &str) -> String {
    percent_decode(&s.replace('+', " "))
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
