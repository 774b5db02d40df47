// Browser end-to-end test of the operator dashboard (`/_keel/ui`) in
// headless Chromium driven by playwright-core.
//
//   node tests/browser/dashboard.e2e.mjs <ui-url> <edges-json> <watch>
//
// (or the env variables DASHBOARD_URL / DASHBOARD_EDGES / DASHBOARD_WATCH):
//   ui-url      the dashboard of one node, e.g. http://127.0.0.1:40001/_keel/ui
//   edges-json  every edge the page must show, region by region:
//               [["us-east","nyc"],["us-east","bos"],["eu-west","ams"],...]
//   watch       region/edge/component whose request count must rise under
//               the harness's load, e.g. ap-south/sin/hello
// tests/all/browser.rs runs it against the demo topology (3 regions x 2
// edges on real NATS).
//
// The page must show every expected edge `up`, in its region, and no other
// edge. Then the script reads the watched request count and asks the harness
// for load, with lines on this script's stdout and stdin:
//   script: LOAD          the harness sends requests to the watched component
//   harness: LOADED <n>   once n of them have been answered;
//   script: COUNT <before> <after>
//                         the count the page showed before the load and once
//                         it had risen by at least n (the harness checks it).
//
// Environment: CHROMIUM (default /usr/bin/chromium); KEEL_ARTIFACTS, the
// directory for screenshots and, on failure, the page's console log
// (default ./artifacts). Exits 0 on success; on failure prints what was
// awaited and what the page showed, screenshots the page and exits 1.

import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";

const UI_URL = process.argv[2] || process.env.DASHBOARD_URL;
const EDGES_JSON = process.argv[3] || process.env.DASHBOARD_EDGES;
const WATCH = process.argv[4] || process.env.DASHBOARD_WATCH;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = resolve(process.env.KEEL_ARTIFACTS || "artifacts");
/// Deadline for the page to show something (snapshots are published every
/// second and cross gateways; the page polls every second).
const WAIT = 30_000;
/// Deadline for the harness to generate its load.
const LOAD_WAIT = 60_000;

const started = Date.now();
const log = (...a) => console.log(`[e2e +${((Date.now() - started) / 1000).toFixed(1)}s]`, ...a);

function usage(why) {
  console.error(`${why}\nusage: node dashboard.e2e.mjs <ui-url> <edges-json> <region/edge/component> (or DASHBOARD_URL / DASHBOARD_EDGES / DASHBOARD_WATCH)`);
  process.exit(2);
}
if (!UI_URL || !EDGES_JSON || !WATCH) usage("missing arguments");
let EDGES;
try {
  EDGES = JSON.parse(EDGES_JSON);
} catch (e) {
  usage(`edges-json is not JSON (${e.message}): ${EDGES_JSON}`);
}
if (!Array.isArray(EDGES) || !EDGES.length || !EDGES.every((e) => Array.isArray(e) && e.length === 2 && e.every((s) => typeof s === "string" && s))) {
  usage(`edges-json should be a non-empty list of [region, edge]: ${EDGES_JSON}`);
}
const watchParts = WATCH.split("/");
if (watchParts.length !== 3 || watchParts.some((s) => !s)) usage(`watch should be region/edge/component: ${WATCH}`);
const [W_REGION, W_EDGE, W_COMPONENT] = watchParts;
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
const edgeId = (region, edge) => `edge-${region}-${edge}`;
const requestsId = `requests-${W_REGION}-${W_EDGE}-${W_COMPONENT}`;

const consoleLines = [];
let page;
let step = 0;

async function screenshot(label) {
  step += 1;
  const path = join(ARTIFACTS, `${String(step).padStart(2, "0")}-${label}.png`);
  await page.screenshot({ path, fullPage: true });
  return path;
}

/// What the page shows now: its node, its error line, every edge card
/// (testid, region section, status) and the watched request count.
function shown() {
  return page.evaluate((requestsId) => {
    const text = (id) => document.getElementById(id)?.textContent ?? null;
    const edges = [...document.querySelectorAll("article.edge")].map((a) => ({
      id: a.dataset.testid,
      section: a.closest("section.region")?.dataset.testid ?? null,
      status: a.dataset.status,
    }));
    const regions = [...document.querySelectorAll("section.region")].map((s) => ({
      id: s.dataset.testid,
      heading: s.querySelector("h2")?.textContent ?? null,
    }));
    const cell = document.querySelector(`[data-testid="${requestsId}"]`);
    return { me: text("me"), error: text("error"), regions, edges, requests: cell ? cell.textContent : null };
  }, requestsId);
}

/// `shown()` for a failure message, a line per item.
function describe(s) {
  return [
    `  page of: ${JSON.stringify(s.me)}; error line: ${JSON.stringify(s.error)}`,
    ...s.regions.map((r) => `  ${r.id}: ${JSON.stringify(r.heading)}`),
    ...s.edges.map((e) => `  ${e.id}: ${e.status} (in ${e.section})`),
    `  ${requestsId}: ${JSON.stringify(s.requests)}`,
  ].join("\n");
}

/// Waits (Playwright polling the page, with a deadline) until `pred(arg)`
/// holds in the page; fails with `what` and what the page showed last.
async function until(what, pred, arg, timeout = WAIT) {
  try {
    await page.waitForFunction(pred, arg, { timeout, polling: 100 });
  } catch (e) {
    const last = await shown().then(describe, (err) => `(unreadable: ${err.message})`);
    throw new Error(`the dashboard should show ${what} within ${timeout} ms (${e.message.split("\n")[0]}); it shows:\n${last}`);
  }
  return shown();
}

/// In the page: every [region, edge] of `edges` has its card, `up`, in its
/// region's section.
function edgesUp(edges) {
  return edges.every(([r, e]) => {
    const card = document.querySelector(`section[data-testid="region-${r}"] article[data-testid="edge-${r}-${e}"]`);
    return card !== null && card.dataset.status === "up";
  });
}

/// In the page: the cell `id` shows a count of at least `min`.
function countAtLeast({ id, min }) {
  const cell = document.querySelector(`[data-testid="${id}"]`);
  const text = cell ? cell.textContent.trim() : "";
  return /^\d+$/.test(text) && Number(text) >= min;
}

/// The watched count as a number, `null` if not shown (or not a count).
function count(s) {
  return s.requests !== null && /^\d+$/.test(s.requests.trim()) ? Number(s.requests.trim()) : null;
}

async function main() {
  log(`chromium ${CHROMIUM}; dashboard at ${UI_URL}; ${EDGES.length} edges; watching ${WATCH}; artifacts in ${ARTIFACTS}`);
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
    const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
    page = await context.newPage();
    page.on("console", (m) => consoleLines.push(`[${new Date().toISOString()}] ${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => consoleLines.push(`[${new Date().toISOString()}] pageerror: ${e.message}`));
    const response = await page.goto(UI_URL);
    if (!response || response.status() !== 200) throw new Error(`GET ${UI_URL} answered ${response && response.status()}`);

    // 1. Every expected edge up, each in its region's section, and no other
    //    edge; each region's heading counts all its edges up.
    const expected = new Set(EDGES.map(([r, e]) => edgeId(r, e)));
    const perRegion = new Map();
    for (const [r] of EDGES) perRegion.set(r, (perRegion.get(r) || 0) + 1);
    const allUp = (s) => {
      const byId = new Map(s.edges.map((e) => [e.id, e]));
      return EDGES.every(([r, e]) => {
        const card = byId.get(edgeId(r, e));
        return card && card.status === "up" && card.section === `region-${r}`;
      });
    };
    let s = await until(`every expected edge up (${[...expected].join(", ")})`, edgesUp, EDGES);
    if (!allUp(s)) throw new Error(`an edge went away right after all were up:\n${describe(s)}`);
    log(`page of ${s.me}: every expected edge up`);
    const extra = s.edges.filter((e) => !expected.has(e.id)).map((e) => `${e.id} (${e.status})`);
    if (extra.length) throw new Error(`the dashboard shows edges that are not expected: ${extra.join(", ")}`);
    if (s.edges.length !== expected.size) {
      throw new Error(`the dashboard shows ${s.edges.length} edge cards for ${expected.size} expected edges:\n${describe(s)}`);
    }
    for (const [region, n] of perRegion) {
      const section = s.regions.find((x) => x.id === `region-${region}`);
      if (!section || !section.heading.includes(`${n}/${n} edges up`)) {
        throw new Error(`region ${region}'s heading should say ${n}/${n} edges up, it says ${JSON.stringify(section && section.heading)}`);
      }
    }
    if (s.error) throw new Error(`the dashboard shows an error: ${s.error}`);

    // 2. The watched component's request count, before the load.
    s = await until(`a request count for ${WATCH} (${tid(requestsId)})`, countAtLeast, { id: requestsId, min: 0 });
    const before = count(s);
    log(`${WATCH}: ${before} requests before the load`);
    log(`screenshot ${await screenshot("before-load")}`);

    // 3. The harness loads it; the count on the page must rise by at least
    //    as many requests.
    console.log("LOAD");
    const line = await nextLine(LOAD_WAIT);
    const m = /^LOADED (\d+)$/.exec(line);
    if (!m) throw new Error(`expected LOADED <n> from the harness, got ${JSON.stringify(line)}`);
    const n = Number(m[1]);
    if (n < 1) throw new Error(`the harness sent no load (LOADED ${n})`);
    log(`harness: ${n} requests answered`);
    s = await until(`${WATCH}'s request count risen from ${before} by at least ${n}`, countAtLeast, {
      id: requestsId,
      min: before + n,
    });
    const after = count(s);
    log(`${WATCH}: ${after} requests after the load (+${after - before})`);
    if (!allUp(s)) throw new Error(`an edge went away during the load:\n${describe(s)}`);
    log(`screenshot ${await screenshot("after-load")}`);

    const errors = consoleLines.filter((l) => / pageerror: /.test(l));
    if (errors.length) throw new Error(`uncaught errors in the page:\n${errors.join("\n")}`);
    console.log(`COUNT ${before} ${after}`);
    log(`ok: screenshots in ${ARTIFACTS}`);
  } catch (e) {
    console.error(`FAILED: ${e.message}`);
    if (page) {
      try {
        await page.screenshot({ path: join(ARTIFACTS, "failure.png"), fullPage: true });
      } catch (_) {
        // The page may be gone.
      }
    }
    writeFileSync(join(ARTIFACTS, "console.log"), consoleLines.join("\n") + "\n");
    console.error(`---- the page's console (${consoleLines.length} lines) ----\n${consoleLines.join("\n")}`);
    console.error(`screenshots and console log in ${ARTIFACTS}`);
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
