//! `cache-probe`: a thin HTTP API over the hierarchical `cache`, plus an
//! exported `cache-loader` whose behaviour the key chooses. Used by the
//! integration tests and `benches/cache`. Targets world
//! `http-cache-loading` (imports `cache` only). Mount it at a prefix route;
//! routes are relative to that prefix.
//!
//! | route | call | answer |
//! |---|---|---|
//! | `GET /entry/<key>` | `cache.get` | 200 the value / 404 `miss` |
//! | `PUT /entry/<key>?scope=edge\|region\|global&ttl=S` (body) | `cache.set` (`ttl` optional) | 204 |
//! | `DELETE /entry/<key>?scope=..` | `cache.invalidate(key)` | 204 |
//! | `DELETE /prefix/<prefix>?scope=..` | `cache.invalidate(prefix)` (`/prefix/` = everything) | 204 |
//! | `POST /bench/get?n=N&key=K` | `cache.get(K)` N times | 200 `N` |
//! | `POST /bench/get-each?n=N&prefix=P` | `cache.get(P0)` .. `cache.get(P<N-1>)` | 200 hits |
//!
//! `cache-loader.load(key)`, by the key's first segment:
//! `edge/..`, `region/..`, `global/..` load `loaded <key>` at that scope;
//! `slow/..` waits 300 ms on the monotonic clock, then loads at `region`;
//! `nested/..` reads its own key with `cache.get` (which must not call the
//! loader again) and loads `nested <none|some>` at `edge`; `fail/..` fails
//! with `unavailable`; anything else is not loadable (`none`).
//!
//! Platform errors answer `{"error": "<case>", "message": ".."}` with
//! `keel_guest::error_status`'s status; a bad scope or ttl is 400
//! `bad-request`; unknown routes 404 `no-route`.

mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "http-cache-loading",
        with: {
            "wasi:http/types@0.2.12": wasip2::http::types,
            "wasi:io/error@0.2.12": wasip2::io::error,
            "wasi:io/poll@0.2.12": wasip2::io::poll,
            "wasi:io/streams@0.2.12": wasip2::io::streams,
            "wasi:clocks/monotonic-clock@0.2.12": wasip2::clocks::monotonic_clock,
        },
        generate_all,
    });
}

use bindings::exports::keel::platform::cache_loader;
use bindings::exports::wasi::http::incoming_handler;
use bindings::keel::platform::{cache, types};
use keel_guest::{Request, percent_decode};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct CacheProbe;

bindings::export!(CacheProbe with_types_in bindings);

impl incoming_handler::Guest for CacheProbe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let req = match Request::read(request) {
            Ok(r) => r,
            Err(m) => return keel_guest::error(out, 400, "bad-request", &m),
        };
        let (path, rest) = match req.sub_path().trim_start_matches('/').split_once('/') {
            Some((p, rest)) => (p, percent_decode(rest)),
            None => return keel_guest::error(out, 404, "no-route", req.sub_path()),
        };
        let scope = match req.query_param("scope").as_deref() {
            None | Some("edge") => types::Scope::Edge,
            Some("region") => types::Scope::Region,
            Some("global") => types::Scope::Global,
            Some(other) => {
                return keel_guest::error(out, 400, "bad-request", &format!("scope {other:?}"));
            }
        };
        let outcome = match (req.method.as_str(), path) {
            ("GET", "entry") => match cache::get(&rest) {
                Ok(Some(v)) => {
                    return keel_guest::respond(out, 200, "application/octet-stream", &v);
                }
                Ok(None) => return keel_guest::text(out, 404, "miss"),
                Err(e) => Err(e),
            },
            ("PUT", "entry") => {
                let ttl = match req.query_param("ttl").map(|t| t.parse::<u32>()) {
                    None => None,
                    Some(Ok(t)) => Some(t),
                    Some(Err(_)) => {
                        return keel_guest::error(out, 400, "bad-request", "ttl is a number");
                    }
                };
                cache::set(&rest, &req.body, ttl, scope)
            }
            ("DELETE", "entry") => cache::invalidate(&cache::InvalidationTarget::Key(rest), scope),
            ("DELETE", "prefix") => {
                cache::invalidate(&cache::InvalidationTarget::Prefix(rest), scope)
            }
            ("POST", "bench") => {
                let n: u64 = match req.query_param("n").map(|n| n.parse()) {
                    Some(Ok(n)) => n,
                    _ => return keel_guest::error(out, 400, "bad-request", "n is a number"),
                };
                let param = |name| req.query_param(name).unwrap_or_default();
                let mut hits = 0u64;
                for i in 0..n {
                    let key = match rest.as_str() {
                        "get" => param("key"),
                        "get-each" => format!("{}{i}", param("prefix")),
                        _ => return keel_guest::error(out, 404, "no-route", &req.path),
                    };
                    match cache::get(&key) {
                        Ok(found) => hits += u64::from(found.is_some()),
                        Err(e) => {
                            let (case, message) = error_case(e);
                            let status = keel_guest::error_status(case);
                            return keel_guest::error(out, status, case, &message);
                        }
                    }
                }
                return keel_guest::text(out, 200, &hits.to_string());
            }
            _ => return keel_guest::error(out, 404, "no-route", &req.path),
        };
        match outcome {
            Ok(()) => keel_guest::empty(out, 204),
            Err(e) => {
                let (case, message) = error_case(e);
                keel_guest::error(out, keel_guest::error_status(case), case, &message)
            }
        }
    }
}

fn error_case(e: types::Error) -> (&'static str, String) {
    use types::Error as E;
    match e {
        E::NotFound => ("not-found", "not found".to_string()),
        E::Denied(m) => ("denied", m),
        E::Invalid(m) => ("invalid", m),
        E::Unavailable(m) => ("unavailable", m),
        E::Conflict(m) => ("conflict", m),
        E::Residency(m) => ("residency", m),
        E::Limit(m) => ("limit", m),
        E::Internal(m) => ("internal", m),
    }
}

impl cache_loader::Guest for CacheProbe {
    fn load(key: String) -> Result<Option<cache_loader::LoadedEntry>, types::Error> {
        let entry = |value: String, scope| {
            Ok(Some(cache_loader::LoadedEntry {
                value: value.into_bytes(),
                ttl_seconds: None,
                scope,
            }))
        };
        let loaded = format!("loaded {key}");
        match key.split('/').next().unwrap_or("") {
            "edge" => entry(loaded, types::Scope::Edge),
            "region" => entry(loaded, types::Scope::Region),
            "global" => entry(loaded, types::Scope::Global),
            "slow" => {
                wasip2::clocks::monotonic_clock::subscribe_duration(300_000_000).block();
                entry(loaded, types::Scope::Region)
            }
            "nested" => {
                let inner = if cache::get(&key)?.is_some() {
                    "some"
                } else {
                    "none"
                };
                entry(format!("nested {inner}"), types::Scope::Edge)
            }
            "fail" => Err(types::Error::Unavailable("injected loader failure".into())),
            _ => Ok(None),
        }
    }
}
