//! Start `keel` child processes on free ports and talk HTTP to them.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The checkout under test. Cargo names it at run time; the compile-time
/// value can name another clone that shares the target dir (CI clones), whose
/// build of this binary cargo considers fresh here too.
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Path of a built guest component.
pub fn guest(name: &str) -> PathBuf {
    let p = repo()
        .join("components/target/wasm")
        .join(format!("{name}.wasm"));
    assert!(
        p.is_file(),
        "guest {} is missing; build guests with `make guests`",
        p.display()
    );
    p
}

/// A `[components.<name>]` table for `guest`.
pub fn component(name: &str, guest_name: &str, route: &str, extra: &str) -> String {
    format!(
        "[components.{name}]\nwasm = {:?}\nroute = {route:?}\n{extra}\n",
        guest(guest_name).display().to_string()
    )
}

/// Tests that run several keel nodes under load (plus NATS servers) take
/// this lock, so on a 2-core machine they do not starve each other into
/// request deadlines; everything else still runs in parallel.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// [`HEAVY`] from a plain `#[test]` (must not run inside a runtime).
pub fn heavy_test() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.blocking_lock()
}

/// [`HEAVY`] from a `#[tokio::test]`.
pub async fn heavy_test_async() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}

pub fn keel_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keel")
}

/// A temp dir with a keel.toml in it.
pub struct Node {
    pub dir: tempfile::TempDir,
    /// Extra environment of every `keel` command run for this node.
    pub env: Vec<(String, String)>,
}

impl Node {
    pub fn new(toml: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let full = format!("[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n{toml}");
        std::fs::write(dir.path().join("keel.toml"), full).unwrap();
        Node { dir, env: vec![] }
    }

    /// keel.toml exactly as given (no [server] prelude).
    pub fn raw(toml: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keel.toml"), toml).unwrap();
        Node { dir, env: vec![] }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("keel.toml")
    }

    fn command(&self, sub: &str) -> Command {
        let mut c = Command::new(keel_bin());
        c.arg("--log-format")
            .arg("json")
            .arg(sub)
            .arg("--config")
            .arg(self.config())
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .env("KEEL_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// `keel check`: (exit code, stdout, stderr).
    pub fn check(&self) -> (i32, String, String) {
        let out = self.command("check").output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `keel audit verify`: (exit code, stdout, stderr).
    pub fn audit_verify(&self) -> (i32, String, String) {
        let out = Command::new(keel_bin())
            .args(["--log-format", "json", "audit", "verify", "--config"])
            .arg(self.config())
            .env_remove("RUST_BACKTRACE")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `keel up` expected to fail at startup: (exit code, stderr).
    pub fn up_fails(&self) -> (i32, String) {
        let mut child = self
            .command("up")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_with_deadline(&mut child, Duration::from_secs(60))
            .expect("keel up should exit on a bad config");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        (status.code().unwrap_or(-1), err)
    }

    /// `keel up`, returning once it prints its listening address.
    pub fn start(&self) -> Keel {
        self.start_with_env(&[])
    }

    /// [`start`](Self::start) with extra environment for this run only.
    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Keel {
        let log = self.dir.path().join("keel.log");
        let mut child = self
            .command("up")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("keel listening on http://") {
                    let _ = tx.send(a.parse::<SocketAddr>().unwrap());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(addr) => Keel { child, addr, log },
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "keel did not start; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }
}

pub fn wait_with_deadline(child: &mut Child, d: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::yield_now();
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// A running `keel up`.
pub struct Keel {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    /// The body as text (lossy UTF-8); `raw` has the bytes.
    pub body: String,
    pub raw: Bytes,
}

impl Reply {
    /// The body parsed as JSON; panics with the status and body if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.raw)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

impl Keel {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> Reply {
        request(self.addr, "GET", path, Bytes::new()).await
    }

    pub async fn put(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        request(self.addr, "PUT", path, body.into()).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        request(self.addr, "DELETE", path, Bytes::new()).await
    }

    /// Any request, with extra headers.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        try_request(self.addr, method, path, headers, body.into())
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A GET on its own connection and task, for requests that must be in
    /// flight while the test does something else.
    pub fn spawn_get(&self, path: &str) -> tokio::task::JoinHandle<Reply> {
        let (addr, path) = (self.addr, path.to_string());
        tokio::spawn(async move { request(addr, "GET", &path, Bytes::new()).await })
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        request(self.addr, "POST", path, body.into()).await
    }

    pub fn sigterm(&self) {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
    }

    /// SIGKILL: the process dies wherever it is, without any cleanup.
    pub fn sigkill(mut self) {
        // SAFETY: plain kill(2) on our own child's pid, which is not reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        assert_eq!(rc, 0);
        self.child.wait().unwrap();
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    pub fn stop(mut self) {
        self.sigterm();
        let status = wait_with_deadline(&mut self.child, Duration::from_secs(30))
            .expect("keel should exit after SIGTERM");
        assert!(
            status.success(),
            "keel exited with {status}; log:\n{}",
            self.log()
        );
    }

    /// Poll `/_keel/ready` until `f` holds for its JSON (30 s deadline).
    pub async fn wait_ready(&self, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.get("/_keel/ready").await.json();
            if f(&v) {
                return v;
            }
            assert!(Instant::now() < end, "timed out; last /_keel/ready: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Repeats `method path` (with `body`) until `f` holds for the reply's
    /// status and JSON (`null` if not JSON); returns that JSON. Panics after
    /// 30 s with `what`, the last reply and the node's log.
    pub async fn poll(
        &self,
        method: &str,
        path: &str,
        body: &str,
        what: &str,
        f: impl Fn(u16, &serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let r = request(self.addr, method, path, Bytes::from(body.to_string())).await;
            let v: serde_json::Value = serde_json::from_slice(&r.raw).unwrap_or_default();
            if f(r.status, &v) {
                return v;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; last {method} {path}: {} {}\n{}",
                r.status,
                r.body,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Poll `/_keel/components` until `f` holds for component `name`.
    pub async fn wait_component(
        &self,
        name: &str,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.get("/_keel/components").await;
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            let c = v["components"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .cloned()
                .unwrap();
            if f(&c) {
                return;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {name}: {what}; last: {c}"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Keel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on a fresh connection, to a node that must answer.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: Bytes) -> Reply {
    try_request(addr, method, path, &[], body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// One HTTP/1.1 request on a fresh connection with extra headers; `Err` when
/// the connection fails or breaks before the whole response arrived (e.g.
/// the node was killed).
pub async fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Reply, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(body)).unwrap();
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let raw = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&raw).into_owned(),
        raw,
    })
}

pub fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// A `text/event-stream` response read event by event.
pub struct Sse {
    pub status: u16,
    pub headers: http::HeaderMap,
    body: hyper::body::Incoming,
    buf: String,
    _send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Sse {
    /// `GET path` with `headers`; check `status` before reading events.
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::get(path)
            .header("host", addr.to_string())
            .header("accept", "text/event-stream");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        let resp = send.send_request(req).await.unwrap();
        Sse {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.into_body(),
            buf: String::new(),
            _send: send,
        }
    }

    /// The rest of the body as text (the reason of a refused stream).
    pub async fn text(self) -> String {
        let raw = self
            .body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        format!("{}{}", self.buf, String::from_utf8_lossy(&raw))
    }

    /// The next event (name, data) before `deadline`: `Ok(None)` when the
    /// stream ended, `Err` (what was buffered) at the deadline. Comments
    /// are skipped; an event without a name is a `message`.
    pub async fn next(&mut self, deadline: Instant) -> Result<Option<(String, String)>, String> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut data) = (String::new(), Vec::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim_start().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                    }
                }
                if !event.is_empty() || !data.is_empty() {
                    let event = if event.is_empty() {
                        "message".into()
                    } else {
                        event
                    };
                    return Ok(Some((event, data.join("\n"))));
                }
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(self.buf.clone());
            };
            match tokio::time::timeout(left, self.body.frame()).await {
                Err(_) => return Err(self.buf.clone()),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => panic!("event stream broke: {e}"),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.push_str(&String::from_utf8_lossy(&data));
                    }
                }
            }
        }
    }

    /// Reads events until one named `event` whose JSON data satisfies `f`
    /// (30 s deadline).
    pub async fn expect(
        &mut self,
        event: &str,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let Ok(Some((name, data))) = self.next(deadline).await else {
                panic!("no {event:?} event with {what} before the deadline; saw {seen:?}");
            };
            let v: serde_json::Value =
                serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data.clone()));
            if name == event && f(&v) {
                return v;
            }
            seen.push((name, data));
        }
    }
}
