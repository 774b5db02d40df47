//! The HTTP front: hyper 1 (HTTP/1.1 and h2c), routing to components, the
//! admin API under `/_keel/`, `/metrics`, limits and graceful drain.
//!
//! Threading: one current-thread tokio runtime per worker, each with its own
//! `SO_REUSEPORT` listener on the same address. A request is accepted,
//! routed, instantiated and answered on one core, which keeps pool-slot
//! resets from needing cross-core TLB shootdowns (see BENCHMARKS.md).

mod admin;
mod live;
mod service;

use keel_config::ServerConfig;
use keel_runtime::Runtime;
use keel_telemetry::Metrics;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;

pub use service::Shared;

/// A bound server, not yet serving.
pub struct Server {
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    config: ServerConfig,
}

/// Tells the server to stop accepting and drain.
#[derive(Clone)]
pub struct ShutdownHandle {
    tx: Arc<watch::Sender<bool>>,
    draining: Arc<AtomicBool>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.tx.send(true);
    }
}

impl Server {
    /// Binds one listener per worker on `config.listen` (port 0 picks a free
    /// port shared by all workers).
    pub fn bind(
        config: &ServerConfig,
        runtime: Arc<Runtime>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Server> {
        let workers = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let first = reuseport_listener(config.listen)?;
        let addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..workers {
            listeners.push(reuseport_listener(addr)?);
        }
        Ok(Server {
            listeners,
            shared: Arc::new(Shared::new(runtime, metrics, config)),
            config: config.clone(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        // Bound above; a bound socket always has a local address.
        self.listeners[0]
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves until `shutdown` is triggered, then drains in-flight requests
    /// for at most `drain-timeout`. Blocks the calling thread.
    pub fn run(self, shutdown: &ShutdownHandle) -> std::io::Result<()> {
        let mut threads = Vec::new();
        for (i, l) in self.listeners.into_iter().enumerate() {
            let shared = self.shared.clone();
            let config = self.config.clone();
            let rx = shutdown.tx.subscribe();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("keel-worker-{i}"))
                    .spawn(move || worker(l, shared, config, rx))?,
            );
        }
        for t in threads {
            match t.join() {
                Ok(r) => r?,
                Err(_) => return Err(std::io::Error::other("a worker thread panicked")),
            }
        }
        Ok(())
    }

    /// A handle to stop this server; marks it not-ready immediately.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        let (tx, _) = watch::channel(false);
        ShutdownHandle {
            tx: Arc::new(tx),
            draining: self.shared.draining.clone(),
        }
    }
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn worker(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    config: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut builder =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .max_buf_size(config.max_header_bytes.max(8192))
            .keep_alive(true);
        builder
            .http2()
            .timer(hyper_util::rt::TokioTimer::new())
            .max_header_list_size(config.max_header_bytes as u32)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .max_concurrent_streams(256);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _peer) = match accepted {
                        Ok(s) => s,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    shared.metrics.connection_accepted();
                    let started = Arc::new(AtomicBool::new(false));
                    let svc = service::service(shared.clone(), started.clone());
                    let conn = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .into_owned();
                    let conn = graceful.watch(conn);
                    let header_timeout = config.header_read_timeout;
                    tokio::spawn(async move {
                        tokio::select! {
                            r = conn => {
                                if let Err(e) = r {
                                    tracing::debug!(error = %e, "connection ended with an error");
                                }
                            }
                            // Protocol sniffing happens before hyper's own
                            // header timeout applies: close connections that
                            // have not produced a first request in time.
                            _ = first_request_guard(started, header_timeout) => {
                                tracing::debug!("closing connection: no request head within the header timeout");
                            }
                        }
                    });
                }
                _ = shutdown.changed() => break,
            }
        }
        // Stop accepting: new connections are refused from here on.
        drop(listener);
        // Live streams never end on their own: end them so the drain
        // waits only for requests (browsers reconnect elsewhere).
        if let Some(s) = shared.runtime.services() {
            s.live.close_all();
        }
        if tokio::time::timeout(config.drain_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?config.drain_timeout, "drain timeout reached; closing remaining connections");
        }
        Ok(())
    })
}

async fn first_request_guard(started: Arc<AtomicBool>, timeout: Duration) {
    tokio::time::sleep(timeout).await;
    if started.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
}
