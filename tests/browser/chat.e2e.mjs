// Browser end-to-end test of the global chat (components/chat) on two edges
// in two regions, in headless Chromium driven by playwright-core.
//
//   node tests/browser/chat.e2e.mjs <alice-chat-url> <bob-chat-url>
//
// (or the env variables CHAT_URL_ALICE / CHAT_URL_BOB), each the chat's page
// on one edge, e.g. http://127.0.0.1:40001/chat/. tests/all/browser.rs runs
// it against a fresh two-region world.
//
// alice (edge A) and bob (edge B) sign in, see each other online, exchange
// room messages and direct messages, each seen live by the other. Then bob's
// edge is restarted by the harness, with lines on this script's stdout and
// stdin:
//   script: RESTART     the harness kills bob's keel (tests/all: SIGKILL) and
//   harness: DOWN       answers once it is gone;
//   script: UP          alice has sent her messages meanwhile; the harness
//                       starts bob's keel again (same data dir and address)
//   harness: RESTARTED  and answers once it serves again.
// While bob's edge is down, alice sends a room message and a DM to bob and
// waits until her page shows them acknowledged; after the restart bob's page
// must go back to `live` by itself (no reload) and show both, and a fresh
// page of bob's must find every acknowledged message in the restarted edge's
// history exactly once.
//
// Environment: CHROMIUM (default /usr/bin/chromium); KEEL_ARTIFACTS, the
// directory for screenshots and, on failure, the pages' console logs
// (default ./artifacts). Exits 0 on success; on failure prints what was
// awaited, screenshots both pages and exits 1.

import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";

const ALICE_URL = process.argv[2] || process.env.CHAT_URL_ALICE;
const BOB_URL = process.argv[3] || process.env.CHAT_URL_BOB;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = resolve(process.env.KEEL_ARTIFACTS || "artifacts");
/// Deadline for anything that crosses regions or needs a reconnect.
const WAIT = 30_000;
/// Deadline for the harness to restart bob's edge.
const RESTART_WAIT = 120_000;

const started = Date.now();
const log = (...a) => console.log(`[e2e +${((Date.now() - started) / 1000).toFixed(1)}s]`, ...a);

if (!ALICE_URL || !BOB_URL) {
  console.error("usage: node chat.e2e.mjs <alice-chat-url> <bob-chat-url> (or CHAT_URL_ALICE / CHAT_URL_BOB)");
  process.exit(2);
}
if (!existsSync(CHROMIUM)) {
  console.error(`chromium not found at ${CHROMIUM}: install Debian's chromium (scripts/bootstrap.sh) or set CHROMIUM`);
  process.exit(2);
}
mkdirSync(ARTIFACTS, { recursive: true });

// ---- the harness protocol: lines on stdin ----

const stdinLines = [];
const stdinWaiters = [];
let stdinClosed = false;
const rl = createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const w = stdinWaiters.shift();
  if (w) w.resolve(line.trim());
  else stdinLines.push(line.trim());
});
rl.on("close", () => {
  stdinClosed = true;
  for (const w of stdinWaiters.splice(0)) w.reject(new Error("stdin closed by the harness"));
});

function nextLine(timeout) {
  if (stdinLines.length) return Promise.resolve(stdinLines.shift());
  if (stdinClosed) return Promise.reject(new Error("stdin closed by the harness"));
  return new Promise((resolve, reject) => {
    const waiter = { resolve, reject };
    stdinWaiters.push(waiter);
    const timer = setTimeout(() => {
      stdinWaiters.splice(stdinWaiters.indexOf(waiter), 1);
      reject(new Error(`no line from the harness within ${timeout} ms`));
    }, timeout);
    waiter.resolve = (v) => (clearTimeout(timer), resolve(v));
    waiter.reject = (e) => (clearTimeout(timer), reject(e));
  });
}

// ---- helpers ----

const tid = (id) => `[data-testid="${id}"]`;
/// A CSS string literal.
const lit = (s) => JSON.stringify(s);
const messageText = (text) => `${tid("message-text")}:text-is(${lit(text)})`;

const pages = []; // {name, page, console: [lines]}
let step = 0;

async function screenshot(label) {
  step += 1;
  const n = String(step).padStart(2, "0");
  await Promise.all(
    pages.map((p) => p.page.screenshot({ path: join(ARTIFACTS, `${n}-${label}-${p.name}.png`), fullPage: true })),
  );
}

/// Waits (auto-waiting, with a deadline) until `selector` is visible in
/// `who`'s page; fails with `what`.
async function see(who, selector, what, timeout = WAIT) {
  try {
    await who.page.locator(selector).first().waitFor({ state: "visible", timeout });
  } catch (e) {
    throw new Error(`${who.name} should see ${what} (${selector}) within ${timeout} ms: ${e.message.split("\n")[0]}`);
  }
}

async function countOf(who, selector) {
  return who.page.locator(selector).count();
}

async function signIn(who, url, password) {
  await who.page.goto(url);
  await who.page.fill(tid("signin-user"), who.name);
  await who.page.fill(tid("signin-password"), password);
  await who.page.click(tid("signin-submit"));
  await see(who, `${tid("connection")}[data-state="live"]`, "its live stream connected");
  await see(who, tid("me-user"), "who it is signed in as");
}

/// Types `text` into the open conversation and sends it; waits until the
/// server acknowledged it (the page shows it only after the 201).
async function send(who, text) {
  await who.page.fill(tid("message-input"), text);
  await who.page.click(tid("message-send"));
  await see(who, messageText(text), `its own message ${lit(text)} acknowledged`);
  // The input is cleared once the server stored it.
  await who.page.waitForFunction(
    () => document.querySelector('[data-testid="message-input"]').value === "",
    null,
    { timeout: WAIT },
  );
}

async function openDm(who, peer) {
  await who.page.fill(tid("dm-start-input"), peer);
  await who.page.click(tid("dm-start-submit"));
  await see(who, `${tid("view-title")}:text-is(${lit(`@ ${peer}`)})`, `the DM with ${peer} open`);
}

async function openRoom(who, room) {
  await who.page.click(`${tid("room-item")}[data-room=${lit(room)}]`);
  await see(who, `${tid("room-item")}[data-room=${lit(room)}].active`, `room ${room} open`);
}

/// Records every change of the page's connection state (window.__conn).
async function recordConnection(who) {
  await who.page.evaluate(() => {
    const el = document.querySelector('[data-testid="connection"]');
    window.__conn = [el.dataset.state];
    new MutationObserver(() => {
      if (window.__conn[window.__conn.length - 1] !== el.dataset.state) window.__conn.push(el.dataset.state);
    }).observe(el, { attributes: true, attributeFilter: ["data-state"] });
  });
}

async function main() {
  log(`chromium ${CHROMIUM}; alice at ${ALICE_URL}, bob at ${BOB_URL}; artifacts in ${ARTIFACTS}`);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  try {
    for (const name of ["alice", "bob"]) {
      const context = await browser.newContext({ viewport: { width: 1200, height: 700 } });
      const page = await context.newPage();
      const who = { name, page, console: [] };
      page.on("console", (m) => who.console.push(`[${new Date().toISOString()}] ${m.type()}: ${m.text()}`));
      page.on("pageerror", (e) => who.console.push(`[${new Date().toISOString()}] pageerror: ${e.message}`));
      pages.push(who);
    }
    const [alice, bob] = pages;
    const nonce = Date.now().toString(36);
    const t = (s) => `${s} [${nonce}]`;

    // 1. Both sign in, each on its own edge in its own region.
    await signIn(alice, ALICE_URL, "alice-password");
    await signIn(bob, BOB_URL, "bob-password");
    const whereA = await alice.page.textContent(tid("me-where"));
    const whereB = await bob.page.textContent(tid("me-where"));
    log(`alice is at ${whereA}, bob at ${whereB}`);
    if (whereA === whereB) throw new Error(`alice and bob should be on different edges, both are at ${whereA}`);
    await screenshot("signed-in");

    // 2. Each sees the other online.
    await see(alice, `${tid("presence-entry")}[data-user="bob"][data-status="online"]`, "bob online");
    await see(bob, `${tid("presence-entry")}[data-user="alice"][data-status="online"]`, "alice online");
    log("presence: both online on both pages");
    await screenshot("presence");

    // 3. Room messages both ways, live.
    const room1 = t("hello lobby from alice");
    await send(alice, room1);
    await see(bob, messageText(room1), "alice's room message live");
    const room2 = t("hello lobby from bob");
    await send(bob, room2);
    await see(alice, messageText(room2), "bob's room message live");
    log("room messages crossed both ways");
    await screenshot("room");

    // 4. alice DMs bob; bob gets an unread badge, opens it, answers.
    await openDm(alice, "bob");
    const dm1 = t("psst bob, alice here");
    await send(alice, dm1);
    await see(bob, `${tid("dm-user")}[data-user="alice"] ${tid("unread")}`, "an unread DM from alice");
    await bob.page.click(`${tid("dm-user")}[data-user="alice"]`);
    await see(bob, messageText(dm1), "alice's DM");
    const dm2 = t("hi alice, bob answering");
    await send(bob, dm2);
    await see(alice, messageText(dm2), "bob's DM answer live");
    log("direct messages crossed both ways");
    await screenshot("dm");

    // 5. Restart bob's edge. alice writes to the lobby and to bob while his
    //    page has lost its stream; both are acknowledged at her edge.
    await openRoom(alice, "lobby");
    await recordConnection(bob);
    console.log("RESTART");
    const down = await nextLine(RESTART_WAIT);
    if (down !== "DOWN") throw new Error(`expected DOWN from the harness, got ${lit(down)}`);
    log("harness: bob's edge is down");
    await bob.page.waitForFunction(() => window.__conn.some((s) => s !== "live"), null, { timeout: WAIT })
      .catch(() => { throw new Error("bob's page should notice its edge went away (connection state leaves live)"); });
    log("bob's page lost its stream:", JSON.stringify(await bob.page.evaluate(() => window.__conn)));
    await screenshot("bob-edge-down");
    const during1 = t("lobby message while bob's edge restarts");
    await send(alice, during1);
    await openDm(alice, "bob");
    const during2 = t("DM while bob's edge restarts");
    await send(alice, during2);
    const bobUp = await fetch(BOB_URL).then(() => true, () => false);
    if (bobUp) throw new Error("bob's edge should still be down while alice sends");
    log("alice's two messages acknowledged while bob's edge is down");
    await screenshot("sent-while-bob-edge-down");
    console.log("UP");
    const line = await nextLine(RESTART_WAIT);
    if (line !== "RESTARTED") throw new Error(`expected RESTARTED from the harness, got ${lit(line)}`);
    log("harness: bob's edge restarted");

    // 6. bob's page reconnects by itself and shows both.
    await see(bob, `${tid("connection")}[data-state="live"]`, "its stream live again (no reload)");
    const states = await bob.page.evaluate(() => window.__conn);
    log("bob's connection states:", JSON.stringify(states));
    if (!states.slice(1).some((s) => s !== "live") || states[states.length - 1] !== "live") {
      throw new Error(`bob's connection should go live -> reconnecting -> live, went ${JSON.stringify(states)}`);
    }
    await see(bob, messageText(during2), "alice's DM sent during the restart");
    await screenshot("bob-reconnected-dm");
    await openRoom(bob, "lobby");
    await see(bob, messageText(during1), "alice's room message sent during the restart");
    log("bob's page shows both messages sent while his edge was down");
    await screenshot("bob-reconnected-room");

    // 7. Live again both ways after the restart.
    await openRoom(alice, "lobby");
    const after1 = t("still there, bob?");
    await send(alice, after1);
    await see(bob, messageText(after1), "alice's room message live after the restart");
    const after2 = t("yes, back live");
    await send(bob, after2);
    await see(alice, messageText(after2), "bob's room message live after the restart");
    log("live both ways after the restart");
    await screenshot("live-after-restart");

    // 8. Nothing acknowledged lost, nothing twice: bob's pages (the one
    //    that lived through the restart and a fresh one, which reads the
    //    restarted edge's history) and alice's.
    const fresh = { name: "bob-fresh", page: await bob.page.context().newPage(), console: [] };
    fresh.page.on("console", (m) => fresh.console.push(`${m.type()}: ${m.text()}`));
    pages.push(fresh);
    await fresh.page.goto(BOB_URL);
    await see(fresh, `${tid("connection")}[data-state="live"]`, "its live stream connected");
    const expectOnce = async (who, texts, where) => {
      for (const text of texts) {
        await see(who, messageText(text), `${lit(text)} in ${where}`);
        const n = await countOf(who, messageText(text));
        if (n !== 1) throw new Error(`${who.name} shows ${lit(text)} ${n} times in ${where}`);
      }
    };
    const roomTexts = [room1, room2, during1, after1, after2];
    const dmTexts = [dm1, dm2, during2];
    await openRoom(fresh, "lobby");
    await expectOnce(fresh, roomTexts, "the lobby");
    await expectOnce(bob, roomTexts, "the lobby");
    await expectOnce(alice, roomTexts, "the lobby");
    await fresh.page.click(`${tid("dm-user")}[data-user="alice"]`);
    await expectOnce(fresh, dmTexts, "the DM with alice");
    await bob.page.click(`${tid("dm-user")}[data-user="alice"]`);
    await expectOnce(bob, dmTexts, "the DM with alice");
    await openDm(alice, "bob");
    await expectOnce(alice, dmTexts, "the DM with bob");
    log("every acknowledged message exactly once, on both edges");
    await screenshot("final");

    const errors = pages.flatMap((p) => p.console.filter((l) => / pageerror: /.test(l)).map((l) => `${p.name} ${l}`));
    if (errors.length) throw new Error(`uncaught errors in the pages:\n${errors.join("\n")}`);
    log(`ok: screenshots in ${ARTIFACTS}`);
  } catch (e) {
    console.error(`FAILED: ${e.message}`);
    for (const p of pages) {
      try {
        await p.page.screenshot({ path: join(ARTIFACTS, `failure-${p.name}.png`), fullPage: true });
      } catch (_) {
        // The page may be gone.
      }
      writeFileSync(join(ARTIFACTS, `console-${p.name}.log`), p.console.join("\n") + "\n");
      console.error(`---- ${p.name}'s console (${p.console.length} lines) ----\n${p.console.join("\n")}`);
    }
    console.error(`screenshots and console logs in ${ARTIFACTS}`);
    process.exitCode = 1;
  } finally {
    await browser.close().catch(() => {});
    rl.close();
  }
}

main().catch((e) => {
  console.error(`FAILED: ${e.stack || e}`);
  process.exitCode = 1;
}).finally(() => process.exit(process.exitCode ?? 0));
