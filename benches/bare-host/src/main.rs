//! The raw-wasmtime baseline: the smallest host that serves a `wasi:http`
//! component with a fresh instance per request, on the pool and runtime
//! settings keel defaults to (research/tuned-host.md "Z + rt local"):
//! pooled slots reset by pagemap scan + memset, no guard pages, one
//! current-thread runtime per core on `SO_REUSEPORT`. No routing, limits,
//! metrics, request ids or WASI context beyond `wasi:io` + `wasi:http`, so
//! keel / bare-host is what keel's own per-request work costs.
//!
//! Usage: bare-host 127.0.0.1:PORT component.wasm

#[path = "../../native-hello/src/listener.rs"]
mod listener;

use std::net::SocketAddr;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store,
};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

const MEMORY: usize = 64 << 20;

struct State {
    http: WasiHttpCtx,
    table: ResourceTable,
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: wasmtime_wasi_http::default_hooks(),
        }
    }
}

impl wasmtime_wasi_io::IoView for State {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

fn main() -> wasmtime::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(wasm)) = (args.next(), args.next()) else {
        return Err(wasmtime::format_err!(
            "usage: bare-host ADDR COMPONENT.wasm"
        ));
    };
    let addr: SocketAddr = addr.parse()?;

    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(1000)
        .max_memory_size(MEMORY)
        .linear_memory_keep_resident(4 << 20)
        .table_keep_resident(64 << 10)
        .pagemap_scan(Enabled::Auto);
    let mut cfg = Config::new();
    cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .concurrency_support(false)
        .signals_based_traps(false)
        .memory_guard_size(0)
        .memory_reservation(MEMORY as u64)
        .memory_reservation_for_growth(0);
    let engine = Engine::new(&cfg)?;
    let component = Component::from_file(&engine, &wasm)?;
    let mut linker = Linker::<State>::new(&engine);
    wasmtime_wasi_io::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    let pre = ProxyPre::new(linker.instantiate_pre(&component)?)?;

    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = Vec::new();
    for _ in 0..workers {
        let listener = listener::reuseport(addr)?;
        let pre = pre.clone();
        threads.push(std::thread::spawn(move || serve(listener, pre)));
    }
    println!("bare-host listening on http://{addr}");
    for t in threads {
        t.join()
            .map_err(|_| wasmtime::format_err!("worker panicked"))??;
    }
    Ok(())
}

fn serve(listener: std::net::TcpListener, pre: ProxyPre<State>) -> wasmtime::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let pre = pre.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let pre = pre.clone();
                    async move { handle(pre, req).await }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

async fn handle(
    pre: ProxyPre<State>,
    req: hyper::Request<hyper::body::Incoming>,
) -> wasmtime::Result<hyper::Response<wasmtime_wasi_http::p2::body::HyperOutgoingBody>> {
    let mut store = Store::new(
        pre.engine(),
        State {
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
        },
    );
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let req = store
        .data_mut()
        .http()
        .new_incoming_request(Scheme::Http, req)?;
    let out = store.data_mut().http().new_response_outparam(sender)?;
    let guest = tokio::spawn(async move {
        let proxy = pre.instantiate_async(&mut store).await?;
        proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut store, req, out)
            .await
    });
    match receiver.await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(code)) => Err(code.into()),
        Err(_) => Err(match guest.await {
            Ok(Err(e)) => e,
            _ => wasmtime::format_err!("guest set no response"),
        }),
    }
}
