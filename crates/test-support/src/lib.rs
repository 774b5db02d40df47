//! Test fixtures shared by the workspace's integration tests:
//!
//! - [`NatsServer`] / [`NatsCluster`]: real `nats-server` child processes
//!   with JetStream, on free loopback ports, in their own temporary
//!   directories, killed and reaped on drop.
//! - [`NatsSupercluster`]: servers started from config texts (e.g. rendered
//!   by `keel topology`), waited for until routes, gateways and the
//!   JetStream meta group have formed; [`NatsServer::start_rendered`] for
//!   one such server on its own.
//! - [`FaultProxy`]: a TCP proxy to put between a client and a server, with
//!   cut / heal / delay / black-hole controls that act immediately.
//! - [`KeelProcess`]: a `keel up` child process (benchmarks).
//! - [`wait_until`] / [`wait_until_async`]: poll a condition with a deadline
//!   (tests synchronise by polling, never by sleeping a fixed time).

mod keel;
mod proxy;
mod server;
mod supercluster;

pub use keel::KeelProcess;
pub use proxy::FaultProxy;
pub use server::{ClusterBlock, NatsCluster, NatsServer, ServerConfig, ServerSpec};
pub use supercluster::NatsSupercluster;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Polling period of [`wait_until`] and [`wait_until_async`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The `nats-server` binary: `$KEEL_NATS_SERVER` if set, else the
/// workspace's `.tools/venv/bin/nats-server` (installed by `make
/// bootstrap`), else `nats-server` on `PATH`. Panics with instructions when
/// there is none.
pub fn nats_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEL_NATS_SERVER") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "KEEL_NATS_SERVER={} does not exist; unset it or run `make bootstrap`",
            p.display()
        );
        return p;
    }
    let venv = workspace_root().join(".tools/venv/bin/nats-server");
    if venv.is_file() {
        return venv;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "nats-server not found: run `make bootstrap` (scripts/bootstrap.sh installs it into {}), \
         set KEEL_NATS_SERVER to a nats-server binary, or put nats-server on PATH",
        venv.display()
    );
}

/// The workspace root: the nearest ancestor with a `Cargo.lock` of the
/// package under test (cargo sets `CARGO_MANIFEST_DIR` when it runs a test),
/// else two levels above this crate as compiled. The run-time value comes
/// first because one build in a shared target dir serves several clones (CI),
/// and the compile-time one may name a clone that is gone.
pub fn workspace_root() -> PathBuf {
    if let Some(start) = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from)
        && let Some(root) = start.ancestors().find(|d| d.join("Cargo.lock").is_file())
    {
        return root.to_path_buf();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// A currently free TCP port on 127.0.0.1 (bound, then released: another
/// process may still take it before the caller binds it).
pub fn free_port() -> u16 {
    // The kernel may hand a just-closed port out again; a config that names
    // one port twice (two calls in a row) is invalid, so this process never
    // gets the same port twice.
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0");
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// Polls `cond` every [`POLL_INTERVAL`] until it holds (true) or `timeout`
/// passes (false). Blocks the thread: inside async code use
/// [`wait_until_async`].
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Async [`wait_until`]: polls `cond().await` until it holds or `timeout`
/// passes.
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Every regular file under `dir` (recursively) whose raw bytes contain
/// `needle`: the byte scan of erasure tests (GDPR), over RocksDB, SQLite
/// and JetStream store directories alike. Files that vanish while scanning
/// (a compaction, a WAL rotation) are skipped.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(path),
                Ok(t)
                    if t.is_file()
                        && std::fs::read(&path).is_ok_and(|bytes| {
                            bytes.windows(needle.len()).any(|w| w == needle)
                        }) =>
                {
                    found.push(path)
                }
                _ => {}
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_reports_success_and_timeout() {
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(5), || {
            n += 1;
            n == 3
        }));
        assert!(!wait_until(Duration::from_millis(30), || false));
    }

    #[test]
    fn free_ports_are_bindable() {
        let p = free_port();
        assert!(TcpListener::bind(("127.0.0.1", p)).is_ok());
    }

    #[test]
    fn finds_nats_server() {
        assert!(nats_server_binary().is_file());
    }

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..500).map(|_| free_port()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }
}
