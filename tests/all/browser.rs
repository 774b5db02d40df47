//! The chat in a real browser: `tests/browser/chat.e2e.mjs` (playwright-core
//! driving headless Debian `chromium`) against two edges in two regions on
//! real NATS, with one edge SIGKILLed and restarted mid-conversation.
//!
//! Needs `node`, `chromium` (scripts/bootstrap.sh) and the script's npm
//! packages (`make browser-deps`, a prerequisite of `make test`).
//! Screenshots go to `<target dir>/test-artifacts/browser/<test>/`.

use crate::chat::two_region_chat;
use crate::regions::runtime;
use crate::support::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The whole browser run, restart included.
const DEADLINE: Duration = Duration::from_secs(240);

/// `<target dir>/test-artifacts/browser/<test>`, created.
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

    let started = Instant::now();
    let mut node = Command::new("node")
        .arg(dir.join("chat.e2e.mjs"))
        .arg(&alice_url)
        .arg(&bob_url)
        .current_dir(&dir)
        .env("KEEL_ARTIFACTS", &out_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run `node` ({e}): install nodejs (scripts/bootstrap.sh)")
        });
    let mut stdin = node.stdin.take().unwrap();
    let stdout = node.stdout.take().unwrap();
    let mut stderr = node.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut output = String::new();
    let mut restarts = 0;
    let mut down = None;
    let end = Instant::now() + DEADLINE;
    loop {
        let line = match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = node.kill();
                let _ = node.wait();
                panic!(
                    "the browser test did not finish within {DEADLINE:?}; its output:\n{output}\nstderr:\n{}",
                    err_reader.join().unwrap_or_default()
                );
            }
        };
        println!("{line}");
        output.push_str(&line);
        output.push('\n');
        match line.trim() {
            // bob's edge dies without any cleanup; alice writes meanwhile.
            "RESTART" => {
                restarts += 1;
                let killed = b.take().expect("bob's edge is running");
                down = Some((killed.addr, Instant::now()));
                killed.sigkill();
                writeln!(stdin, "DOWN").unwrap();
                stdin.flush().unwrap();
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
                writeln!(stdin, "RESTARTED").unwrap();
                stdin.flush().unwrap();
            }
            _ => {}
        }
    }
    let status = node.wait().unwrap();
    let errors = err_reader.join().unwrap_or_default();
    eprint!("{errors}");
    println!(
        "browser test: {status} after {:?}; screenshots in {}",
        started.elapsed(),
        out_dir.display()
    );
    let b = b.expect("bob's edge is running at the end");
    assert!(
        status.success(),
        "the browser test failed ({status}); screenshots and console logs in {}\nstdout:\n{output}\nstderr:\n{errors}\n\
         ---- edge A log ----\n{}\n---- edge B log ----\n{}",
        out_dir.display(),
        a.log(),
        b.log()
    );
    assert_eq!(restarts, 1, "the script should ask for one restart");
    a.stop();
    b.stop();
}
