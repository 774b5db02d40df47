//! `wasi-everything`: imitates the components that JS/Python toolchains
//! produce. It imports all of `wasi:cli`, `wasi:filesystem` and
//! `wasi:sockets`, at mixed WASI patch versions (cli, filesystem and http at
//! 0.2.9 from the `wasip2` 1.0.3 crate; sockets at 0.2.12 from the
//! repository's `wit/deps`), and
//! reports the capability context it observes:
//!
//! `{"env":N,"args":N,"preopens":N,"tcp":"ok|<error-code>","stdout":"ok|error"}`
//!
//! Query flags (each keeps its interface's imports alive in the component):
//! - `?touch=all` also calls stdin, stderr, terminal-*, filesystem types,
//!   instance-network, tcp, udp and ip-name-lookup (and, like real toolchain
//!   output, the clocks and random), and adds a `"touched"` object with what
//!   they returned;
//! - `?exit=0` / `?exit=1` calls `wasi:cli/exit` instead of responding.

use wasip2::cli::{
    environment, exit, stderr, stdin, stdout, terminal_stderr, terminal_stdin, terminal_stdout,
};
use wasip2::clocks::{monotonic_clock, wall_clock};
use wasip2::filesystem::preopens;
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasip2::random::{insecure_seed, random};

mod bindings {
    // The project's vendored WASI 0.2.12 WIT (copied from wasmtime-wasi-http).
    wit_bindgen::generate!({
        path: [
            "../../wit/deps/io.wit",
            "../../wit/deps/clocks.wit",
            "../../wit/deps/sockets.wit",
        ],
        world: "wasi:sockets/imports@0.2.12",
        generate_all,
    });
}

use bindings::wasi::sockets::{
    instance_network, ip_name_lookup, network::IpAddressFamily, tcp_create_socket,
    udp_create_socket,
};

struct Everything;

wasip2::http::proxy::export!(Everything);

impl wasip2::exports::http::incoming_handler::Guest for Everything {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let query = request
            .path_with_query()
            .and_then(|p| p.split_once('?').map(|(_, q)| q.to_string()))
            .unwrap_or_default();
        let flag = |name: &str| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_string)
        };

        if let Some(code) = flag("exit") {
            exit::exit(if code == "0" { Ok(()) } else { Err(()) });
        }

        let env = environment::get_environment().len();
        let args = environment::get_arguments().len();
        let preopens = preopens::get_directories();
        let tcp = match tcp_create_socket::create_tcp_socket(IpAddressFamily::Ipv4) {
            Ok(_socket) => "ok",
            Err(code) => code.name(),
        };
        let stdout =
            match stdout::get_stdout().blocking_write_and_flush(b"wasi-everything: request\n") {
                Ok(()) => "ok",
                Err(_) => "error",
            };

        let mut json = format!(
            r#"{{"env":{env},"args":{args},"preopens":{},"tcp":"{tcp}","stdout":"{stdout}""#,
            preopens.len()
        );
        if flag("touch").as_deref() == Some("all") {
            json.push_str(&format!(r#","touched":{}"#, touch_all(&preopens)));
        }
        json.push_str("}\n");
        respond(response_out, json.as_bytes());
    }
}

/// Calls into every remaining interface; returns a JSON object of results.
fn touch_all(preopens: &[(wasip2::filesystem::types::Descriptor, String)]) -> String {
    let cwd = environment::initial_cwd().is_some();
    let clocks = wall_clock::now().seconds > 0 && monotonic_clock::now() > 0;
    let random_differs = random::get_random_u64() != insecure_seed::insecure_seed().0;
    drop(stdin::get_stdin());
    let stderr = stderr::get_stderr()
        .blocking_write_and_flush(b"wasi-everything: touch\n")
        .is_ok();
    let terminals = [
        terminal_stdin::get_terminal_stdin().is_some(),
        terminal_stdout::get_terminal_stdout().is_some(),
        terminal_stderr::get_terminal_stderr().is_some(),
    ];
    let dirs: Vec<String> = preopens
        .iter()
        .map(|(dir, _)| match dir.get_type() {
            Ok(ty) => format!("\"{ty:?}\""),
            Err(code) => format!("\"{}\"", code.name()),
        })
        .collect();

    let network = instance_network::instance_network();
    let tcp_family = tcp_create_socket::create_tcp_socket(IpAddressFamily::Ipv6)
        .map(|socket| format!("{:?}", socket.address_family()))
        .unwrap_or_else(|code| code.name().to_string());
    let udp = match udp_create_socket::create_udp_socket(IpAddressFamily::Ipv4) {
        Ok(socket) => format!("{:?}", socket.address_family()),
        Err(code) => code.name().to_string(),
    };
    let lookup = match ip_name_lookup::resolve_addresses(&network, "localhost") {
        Ok(stream) => {
            stream.subscribe().block();
            match stream.resolve_next_address() {
                Ok(Some(_)) => "ok".to_string(),
                Ok(None) => "empty".to_string(),
                Err(code) => code.name().to_string(),
            }
        }
        Err(code) => code.name().to_string(),
    };

    format!(
        r#"{{"cwd":{cwd},"clocks":{clocks},"random":{random_differs},"stderr":{stderr},"terminals":{terminals:?},"dirs":[{}],"tcp6":"{tcp_family}","udp":"{udp}","lookup":"{lookup}"}}"#,
        dirs.join(",")
    )
}

fn respond(out: ResponseOutparam, body: &[u8]) {
    let headers = Fields::from_list(&[("content-type".into(), b"application/json".to_vec())])
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
