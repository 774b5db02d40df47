//! A TCP proxy with fault controls, for partition tests.
//!
//! The proxy runs on its own thread with its own (current-thread) tokio
//! runtime, so it works the same under plain `#[test]` and under
//! `#[tokio::test]` of either flavour, never competes with the test's
//! runtime, and is torn down deterministically on drop (the runtime is
//! dropped, closing every socket, and the thread is joined).
//!
//! Controls act immediately:
//! - [`FaultProxy::cut`] closes every live connection and closes new ones
//!   right after accepting them until [`FaultProxy::heal`];
//! - [`FaultProxy::set_delay`] adds a one-way latency to every chunk in
//!   both directions (order preserved; a round trip gains twice the delay);
//! - [`FaultProxy::set_drop`] black-holes: connections stay open, bytes in
//!   both directions are read and discarded.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

struct Shared {
    upstream: SocketAddr,
    cut: AtomicBool,
    drop_bytes: AtomicBool,
    delay_us: AtomicU64,
    /// Bumped by `cut()`: live connections close when it changes.
    cut_generation: watch::Sender<u64>,
    accepted: AtomicU64,
    refused: AtomicU64,
    active: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

impl Shared {
    fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::Relaxed))
    }
}

/// A TCP proxy on a free 127.0.0.1 port forwarding to `upstream`.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts forwarding to `upstream`; returns once the port is bound.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind proxy port");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let (cut_generation, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            upstream,
            cut: AtomicBool::new(false),
            drop_bytes: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            cut_generation,
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            active: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
        });
        let (shutdown, shutdown_rx) = oneshot::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                rt.block_on(accept_loop(listener, thread_shared, shutdown_rx));
                // Dropping the runtime cancels the connection tasks,
                // closing their sockets.
                drop(rt);
            })
            .expect("spawn proxy thread");
        FaultProxy {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `nats://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Closes every live connection and refuses (accepts, then closes) new
    /// ones until [`FaultProxy::heal`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.cut_generation.send_modify(|g| *g += 1);
    }

    /// Accepts and forwards new connections again (after [`FaultProxy::cut`]).
    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }

    /// One-way latency added to every chunk, both directions.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_us.store(
            delay.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::SeqCst,
        );
    }

    /// Black-hole mode: keep connections open but discard all bytes.
    pub fn set_drop(&self, drop_bytes: bool) {
        self.shared.drop_bytes.store(drop_bytes, Ordering::SeqCst);
    }

    /// Connections accepted and forwarded (not counting refused ones).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections accepted and closed at once because the proxy was cut.
    pub fn connections_refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Connections currently open through the proxy.
    pub fn active_connections(&self) -> u64 {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Bytes written to the upstream (client → server).
    pub fn bytes_up(&self) -> u64 {
        self.shared.bytes_up.load(Ordering::SeqCst)
    }

    /// Bytes written back to clients (server → client).
    pub fn bytes_down(&self) -> u64 {
        self.shared.bytes_down.load(Ordering::SeqCst)
    }

    /// Bytes forwarded in both directions.
    pub fn bytes_forwarded(&self) -> u64 {
        self.bytes_up() + self.bytes_down()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: StdListener,
    shared: Arc<Shared>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let socket = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(_) => continue,
            },
        };
        // Subscribe before checking the flag: a cut racing with this accept
        // either is seen here or changes the generation we watch.
        let cut_rx = shared.cut_generation.subscribe();
        if shared.cut.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            drop(socket);
            continue;
        }
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(connection(socket, shared.clone(), cut_rx));
    }
}

async fn connection(client: TcpStream, shared: Arc<Shared>, mut cut_rx: watch::Receiver<u64>) {
    let upstream = tokio::select! {
        _ = cut_rx.changed() => return,
        up = TcpStream::connect(shared.upstream) => match up {
            Ok(up) => up,
            Err(_) => return,
        },
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    shared.active.fetch_add(1, Ordering::SeqCst);
    let (client_r, client_w) = client.into_split();
    let (up_r, up_w) = upstream.into_split();
    // Either direction ending (EOF, error) or a cut closes both sockets.
    tokio::select! {
        _ = cut_rx.changed() => {}
        _ = pump(client_r, up_w, &shared, &shared.bytes_up) => {}
        _ = pump(up_r, client_w, &shared, &shared.bytes_down) => {}
    }
    shared.active.fetch_sub(1, Ordering::SeqCst);
}

/// Copies `from` to `to`, delaying each chunk by the current delay (a
/// reader queues chunks with their due time, a writer writes them in order
/// when due) and discarding chunks in black-hole mode.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
    counter: &AtomicU64,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if shared.drop_bytes.load(Ordering::SeqCst) {
                continue;
            }
            let due = Instant::now() + shared.delay();
            if tx.send((due, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let writer = async {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if shared.drop_bytes.load(Ordering::SeqCst) {
                continue;
            }
            // Counted before the write: once the peer can see the bytes,
            // the counter already includes them (tests compare the two).
            counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wait_until;
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream as StdStream;
    use std::time::Instant as StdInstant;

    /// An echo server on its own threads.
    fn echo_server() -> SocketAddr {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn connect(proxy: &FaultProxy) -> StdStream {
        let s = StdStream::connect(proxy.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn round_trip(s: &mut StdStream, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).unwrap();
        got
    }

    /// Whether the peer closed the connection (EOF or reset) within 10 s.
    fn closed(s: &mut StdStream) -> bool {
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }

    #[test]
    fn forwards_bytes_both_ways_and_counts() {
        let proxy = FaultProxy::start(echo_server());
        let mut s = connect(&proxy);
        assert_eq!(round_trip(&mut s, b"hello proxy"), b"hello proxy");
        assert_eq!(proxy.connections_accepted(), 1);
        assert!(wait_until(Duration::from_secs(5), || proxy
            .bytes_forwarded()
            == 22));
        assert_eq!(proxy.bytes_up(), 11);
        assert_eq!(proxy.active_connections(), 1);
        drop(s);
        assert!(wait_until(Duration::from_secs(5), || proxy
            .active_connections()
            == 0));
    }

    #[test]
    fn cut_closes_live_connections_and_refuses_new_until_healed() {
        let proxy = FaultProxy::start(echo_server());
        let mut live = connect(&proxy);
        assert_eq!(round_trip(&mut live, b"x"), b"x");
        proxy.cut();
        assert!(closed(&mut live), "live connection survived cut()");
        let mut refused = connect(&proxy);
        assert!(closed(&mut refused), "new connection served while cut");
        assert_eq!(proxy.connections_refused(), 1);
        proxy.heal();
        let mut s = connect(&proxy);
        assert_eq!(round_trip(&mut s, b"again"), b"again");
        assert_eq!(proxy.connections_accepted(), 2);
    }

    #[test]
    fn delay_is_applied_in_both_directions() {
        let proxy = FaultProxy::start(echo_server());
        let mut s = connect(&proxy);
        assert_eq!(round_trip(&mut s, b"warm"), b"warm");
        let delay = Duration::from_millis(100);
        proxy.set_delay(delay);
        let started = StdInstant::now();
        assert_eq!(round_trip(&mut s, b"slow"), b"slow");
        assert!(
            started.elapsed() >= 2 * delay,
            "round trip took {:?}",
            started.elapsed()
        );
        proxy.set_delay(Duration::ZERO);
        assert_eq!(round_trip(&mut s, b"fast"), b"fast");
    }

    #[test]
    fn black_hole_discards_bytes_but_keeps_connections() {
        let proxy = FaultProxy::start(echo_server());
        let mut s = connect(&proxy);
        assert_eq!(round_trip(&mut s, b"a"), b"a");
        proxy.set_drop(true);
        let before = proxy.bytes_forwarded();
        s.write_all(b"lost").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 8];
        let err = s.read(&mut buf).expect_err("black-holed bytes arrived");
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err}"
        );
        assert_eq!(proxy.bytes_forwarded(), before);
        assert_eq!(proxy.active_connections(), 1);
        proxy.set_drop(false);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(round_trip(&mut s, b"back"), b"back");
    }

    #[tokio::test]
    async fn works_inside_a_current_thread_tokio_test() {
        let proxy = FaultProxy::start(echo_server());
        let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"async").await.unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"async");
        proxy.cut();
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut got))
            .await
            .expect("cut did not close the connection");
        assert!(matches!(n, Ok(0) | Err(_)));
    }
}
