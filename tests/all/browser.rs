//! The web UIs in a real browser: scripts in `tests/browser/` (playwright-core
//! driving headless Debian `chromium`) against real keel nodes on real NATS:
//! - `chat.e2e.mjs`: the chat on two edges in two regions, with one edge
//!   SIGKILLed and restarted mid-conversation;
//! - `dashboard.e2e.mjs`: the operator dashboard of the demo topology (3
//!   regions x 2 edges) shows every edge up and a component's request count
//!   rising under load on an edge of another region.
//!
//! Needs `node`, `chromium` (scripts/bootstrap.sh) and the scripts' npm
//! packages (`make browser-deps`, a prerequisite of `make test`).
//! Screenshots go to `<target dir>/test-artifacts/browser/<test>/`.

use crate::chat::two_region_chat;
use crate::regions::{RegionSpec, runtime, world};
use crate::support::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The whole chat browser run, restart included.
const DEADLINE: Duration = Duration::from_secs(240);

/// `<target dir>/test-artifacts/browser/<test>`, created empty (no
/// failure screenshots of an earlier run).
fn artifacts(test: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        repo().join(target)
    };
    let dir = target.join("test-artifacts/browser").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// tests/browser, with its npm packages installed.
fn browser_dir() -> PathBuf {
    let dir = repo().join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core/package.json")
            .is_file(),
        "{}/node_modules is missing: run `make browser-deps` (or `make test`, which does it) \
         to install the browser tests' npm packages (`npm ci --prefix tests/browser`)",
        dir.display()
    );
    dir
}

/// A browser script (`node tests/browser/<name>`) and its harness protocol:
/// lines on its stdout, answers on its stdin. Killed when dropped.
struct Script {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    stderr: Option<JoinHandle<String>>,
    /// Its stdout so far.
    output: String,
    /// Where it writes screenshots and console logs.
    artifacts: PathBuf,
    started: Instant,
    /// The whole run must be over by then.
    end: Instant,
    deadline: Duration,
}

impl Script {
    /// `node <dir>/<name> <args>` in `dir`, writing to `artifacts`; the
    /// whole run must end within `deadline`.
    fn start(
        dir: &Path,
        name: &str,
        args: &[&str],
        artifacts: &Path,
        deadline: Duration,
    ) -> Script {
        let started = Instant::now();
        let mut child = Command::new("node")
            .arg(dir.join(name))
            .args(args)
            .current_dir(dir)
            .env("KEEL_ARTIFACTS", artifacts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `node` ({e}): install nodejs (scripts/bootstrap.sh)")
            });
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Script {
            child,
            stdin,
            lines,
            stderr: Some(stderr),
            output: String::new(),
            artifacts: artifacts.to_path_buf(),
            started,
            end: started + deadline,
            deadline,
        }
    }

    /// Its next stdout line (printed and kept in `output`), `None` once its
    /// stdout closed. Past the deadline it is killed, and this panics with
    /// what it printed.
    fn next_line(&mut self) -> Option<String> {
        match self
            .lines
            .recv_timeout(self.end.saturating_duration_since(Instant::now()))
        {
            Ok(line) => {
                println!("{line}");
                self.output.push_str(&line);
                self.output.push('\n');
                Some(line)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let errors = self.take_stderr();
                panic!(
                    "the browser test did not finish within {:?}; its output:\n{}\nstderr:\n{errors}",
                    self.deadline, self.output
                );
            }
        }
    }

    /// Writes `line` to its stdin.
    fn answer(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }

    /// After its stdout closed: waits for it to exit; its status and its
    /// stderr (printed).
    fn finish(&mut self) -> (ExitStatus, String) {
        let status = wait_with_deadline(
            &mut self.child,
            self.end.saturating_duration_since(Instant::now()) + Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("the browser test closed its stdout but did not exit"));
        let errors = self.take_stderr();
        eprint!("{errors}");
        println!(
            "browser test: {status} after {:?}; screenshots in {}",
            self.started.elapsed(),
            self.artifacts.display()
        );
        (status, errors)
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn chat_in_browsers_on_two_regions_survives_an_edge_restart() {
    let test = "chat_in_browsers_on_two_regions_survives_an_edge_restart";
    let dir = browser_dir();
    let out_dir = artifacts(test);
    let _heavy = heavy_test();
    // Both regions `global`: everyone's messages and presence may cross.
    let (_world, nodes) = two_region_chat("global");
    let rt = runtime();
    let a = nodes[0].start();
    let b = nodes[1].start();
    // bob's page reconnects to the same URL: pin his edge to the port it
    // got, for the restart.
    let config = std::fs::read_to_string(nodes[1].config()).unwrap();
    let pinned = config.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{}\"", b.addr),
    );
    assert_ne!(config, pinned, "the node's listen address");
    std::fs::write(nodes[1].config(), pinned).unwrap();
    rt.block_on(async {
        for k in [&a, &b] {
            k.wait_ready(|v| v["bus"]["state"] == "connected").await;
        }
    });
    let (alice_url, bob_url) = (
        format!("http://{}/chat/", a.addr),
        format!("http://{}/chat/", b.addr),
    );
    let mut b = Some(b);

    let mut script = Script::start(
        &dir,
        "chat.e2e.mjs",
        &[&alice_url, &bob_url],
        &out_dir,
        DEADLINE,
    );
    let mut restarts = 0;
    let mut down = None;
    while let Some(line) = script.next_line() {
        match line.trim() {
            // bob's edge dies without any cleanup; alice writes meanwhile.
            "RESTART" => {
                restarts += 1;
                let killed = b.take().expect("bob's edge is running");
                down = Some((killed.addr, Instant::now()));
                killed.sigkill();
                script.answer("DOWN");
            }
            // Back on the same data dir and address.
            "UP" => {
                let (addr, since) = down.take().expect("UP before RESTART");
                let back = nodes[1].start();
                assert_eq!(
                    back.addr, addr,
                    "bob's edge should come back on its address"
                );
                rt.block_on(back.wait_ready(|v| v["bus"]["state"] == "connected"));
                b = Some(back);
                println!(
                    "[harness] bob's edge was down {:?}, restarted on {addr}",
                    since.elapsed()
                );
                script.answer("RESTARTED");
            }
            _ => {}
        }
    }
    let (status, errors) = script.finish();
    let b = b.expect("bob's edge is running at the end");
    assert!(
        status.success(),
        "the browser test failed ({status}); screenshots and console logs in {}\nstdout:\n{}\nstderr:\n{errors}\n\
         ---- edge A log ----\n{}\n---- edge B log ----\n{}",
        out_dir.display(),
        script.output,
        a.log(),
        b.log()
    );
    assert_eq!(restarts, 1, "the script should ask for one restart");
    a.stop();
    b.stop();
}

/// The demo topology (benches/tier-bench `DEMO_REGIONS`, as `keel-demo` and
/// `chat-load` run it): 3 regions x 2 edges, one nats-server per region,
/// gateways between them.
const DEMO: [RegionSpec; 3] = [
    RegionSpec {
        name: "us-east",
        residency: "us",
        edges: &["nyc", "bos"],
        servers: 1,
    },
    RegionSpec {
        name: "eu-west",
        residency: "us",
        edges: &["ams", "lon"],
        servers: 1,
    },
    RegionSpec {
        name: "ap-south",
        residency: "us",
        edges: &["bom", "sin"],
        servers: 1,
    },
];

/// Requests the harness sends while the dashboard watches.
const LOAD: u64 = 50;

/// The whole dashboard browser run.
const DASHBOARD_DEADLINE: Duration = Duration::from_secs(90);

/// The dashboard of the first demo edge (nyc) in a browser: every edge of the
/// demo topology up, and the request count of `hello` on the last edge (sin,
/// another region) rising by the [`LOAD`] the harness sends it.
#[test]
fn dashboard_in_a_browser_shows_every_demo_edge_and_requests_rising_under_load() {
    let test = "dashboard_in_a_browser_shows_every_demo_edge_and_requests_rising_under_load";
    let dir = browser_dir();
    let out_dir = artifacts(test);
    let _heavy = heavy_test();
    let demo = world(&DEMO);
    let rt = runtime();
    let edges: Vec<(&str, &str)> = DEMO
        .iter()
        .flat_map(|r| r.edges.iter().map(move |e| (r.name, *e)))
        .collect();
    let hello = component("hello", "hello", "/app/...", "");
    let nodes: Vec<Node> = edges
        .iter()
        .map(|(_, e)| demo.node(e, None, &hello))
        .collect();
    // Side by side: each start waits for its guest and its NATS connection.
    let keels: Vec<Keel> = std::thread::scope(|s| {
        let started: Vec<_> = nodes.iter().map(|n| s.spawn(|| n.start())).collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    rt.block_on(async {
        for k in &keels {
            k.wait_ready(|v| v["bus"]["state"] == "connected").await;
        }
    });
    let (ui, loaded) = (&keels[0], &keels[edges.len() - 1]);
    let (region, edge) = edges[edges.len() - 1];
    let watch = format!("{region}/{edge}/hello");
    println!(
        "[harness] dashboard of {}/{} at http://{}/_keel/ui; load on {watch} at {}",
        edges[0].0, edges[0].1, ui.addr, loaded.addr
    );

    let mut script = Script::start(
        &dir,
        "dashboard.e2e.mjs",
        &[
            &format!("http://{}/_keel/ui", ui.addr),
            &serde_json::to_string(&edges).unwrap(),
            &watch,
        ],
        &out_dir,
        DASHBOARD_DEADLINE,
    );
    let mut loads = 0;
    let mut counts = None;
    while let Some(line) = script.next_line() {
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            // Real requests to the guest, each answered before the next.
            ["LOAD"] => {
                loads += 1;
                let started = Instant::now();
                rt.block_on(async {
                    for i in 0..LOAD {
                        let r = loaded.get(&format!("/app/load-{i}")).await;
                        assert_eq!(r.status, 200, "GET /app/load-{i} at {edge}: {}", r.body);
                    }
                });
                println!(
                    "[harness] {LOAD} requests to {watch} answered in {:?}",
                    started.elapsed()
                );
                script.answer(&format!("LOADED {LOAD}"));
            }
            ["COUNT", before, after] => {
                counts = Some((
                    before.parse::<u64>().unwrap(),
                    after.parse::<u64>().unwrap(),
                ));
            }
            _ => {}
        }
    }
    let (status, errors) = script.finish();
    assert!(
        status.success(),
        "the browser test failed ({status}); screenshots and console log in {}\nstdout:\n{}\nstderr:\n{errors}\n\
         ---- dashboard edge's log ----\n{}\n---- loaded edge's log ----\n{}",
        out_dir.display(),
        script.output,
        ui.log(),
        loaded.log()
    );
    assert_eq!(loads, 1, "the script should ask for load once");
    let (before, after) = counts.expect("the script should report the counts it saw");
    assert!(
        after >= before + LOAD,
        "the page's count of {watch} went from {before} to {after} under {LOAD} requests"
    );
    for k in keels {
        k.stop();
    }
}
