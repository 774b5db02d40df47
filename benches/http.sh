#!/usr/bin/env bash
# Side-by-side HTTP benchmark (numbers go to BENCHMARKS.md; nothing here is asserted).
#
# Same component, same run, same load generator (wrk, HTTP/1.1 keep-alive):
#   keel (defaults)  vs  `wasmtime serve` 48.0.x  vs  a native hyper hello
#   vs  bare-host (the smallest per-request wasmtime host on keel's pool
#   settings: what keel's own per-request work costs),
# plus keel with guard pages, keel with limits off (the cost of limits), a
# compute-heavy component, cold start, idle RSS and binary size.
#
# Usage: benches/http.sh [DURATION_SECONDS]   (default 5; BENCH_ROUNDS=3 interleaved rounds)
# wasmtime-cli is installed into .tools/wasmtime (never committed).
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE   # a captured backtrace per trap/error skews numbers

DURATION=${1:-5}
CONNS=${BENCH_CONNECTIONS:-16}
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
TOOLS=$PWD/.tools
WASMTIME_VERSION=48.0.8
WASMTIME=$TOOLS/wasmtime/bin/wasmtime
WASM=$PWD/components/target/wasm
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk missing: run scripts/bootstrap.sh" >&2; exit 1; }

echo "== building release binaries" >&2
cargo build --release --workspace --bins >&2
KEEL=$TARGET_DIR/release/keel
NATIVE=$TARGET_DIR/release/native-hello
BARE=$TARGET_DIR/release/bare-host

if [ ! -x "$WASMTIME" ] || ! "$WASMTIME" --version | grep -q "$WASMTIME_VERSION"; then
  echo "== installing wasmtime-cli $WASMTIME_VERSION into $TOOLS/wasmtime (once)" >&2
  CARGO_TARGET_DIR=$TOOLS/wasmtime-build cargo install --locked --quiet \
    --root "$TOOLS/wasmtime" --version "$WASMTIME_VERSION" wasmtime-cli >&2
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_http() { # url
  for _ in $(seq 1 3000); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.01
  done
  echo "server at $1 did not come up" >&2; return 1
}

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# wrk → "req/s p50 p99" (latencies in ms)
load() { # url [body-file]
  local url=$1 script=""
  if [ -n "${2:-}" ]; then
    script=$WORK/post.lua
    printf 'wrk.method = "POST"\nlocal f = io.open("%s", "rb")\nwrk.body = f:read("*a")\nf:close()\n' "$2" >"$script"
  fi
  wrk -t1 -c"$CONNS" -d3s ${script:+-s "$script"} "$url" >/dev/null
  wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency ${script:+-s "$script"} "$url" >"$WORK/wrk.out"
  python3 - "$WORK/wrk.out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
    if not m:
        sys.exit(f"cannot read a latency from {v!r} in wrk's output:\n{t}")
    n, u = m.groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
# Anchored: "Req/Sec ... 77.50%" ends with "50%" too.
p50 = ms(re.search(r"^\s*50%\s+(\S+)", t, re.M).group(1))
p99 = ms(re.search(r"^\s*99%\s+(\S+)", t, re.M).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
if errs:
    sys.exit(f"non-2xx responses during the run: {errs.group(1)}")
print(f"{rps:.0f} {p50:.3f} {p99:.3f}")
PY
}

keel_config() { # file component route engine-extra
  cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$PORT"
data-dir = "$WORK/data"
[engine]
$4
[components.$2]
wasm = "$WASM/$2.wasm"
route = "$3"
EOF
}

run_keel() { # label component path engine-extra env... ; prints "label rps p50 p99"
  local label=$1 comp=$2 path=$3 extra=$4 body=${5:-}; shift 5 || true
  PORT=$(free_port)
  keel_config "$WORK/keel.toml" "$comp" "/..." "$extra"
  env "$@" "$KEEL" --log-format json up --config "$WORK/keel.toml" >/dev/null 2>"$WORK/keel.log" &
  local pid=$!; PIDS+=("$pid")
  wait_http "http://127.0.0.1:$PORT$path"
  echo "$label $(load "http://127.0.0.1:$PORT$path" "$body")"
  stop "$pid"
}

run_serve() { # label component path [body]
  PORT=$(free_port)
  "$WASMTIME" serve --addr "127.0.0.1:$PORT" "$WASM/$2.wasm" >/dev/null 2>"$WORK/serve.log" &
  local pid=$!; PIDS+=("$pid")
  wait_http "http://127.0.0.1:$PORT$3"
  echo "$1 $(load "http://127.0.0.1:$PORT$3" "${4:-}")"
  stop "$pid"
}

run_bare() { # label component path
  PORT=$(free_port)
  "$BARE" "127.0.0.1:$PORT" "$WASM/$2.wasm" >/dev/null &
  local pid=$!; PIDS+=("$pid")
  wait_http "http://127.0.0.1:$PORT$3"
  echo "$1 $(load "http://127.0.0.1:$PORT$3")"
  stop "$pid"
}

run_native() {
  PORT=$(free_port)
  "$NATIVE" "127.0.0.1:$PORT" >/dev/null &
  local pid=$!; PIDS+=("$pid")
  wait_http "http://127.0.0.1:$PORT/"
  echo "native $(load "http://127.0.0.1:$PORT/")"
  stop "$pid"
}

python3 -c 'import json; print(json.dumps({"items": list(range(300)), "name": "keel", "nested": [{"k": i, "v": str(i) * 8} for i in range(60)]}))' >"$WORK/body.json"

ROUNDS=${BENCH_ROUNDS:-3}
echo "== $ROUNDS interleaved rounds of wrk -t1 -c$CONNS -d${DURATION}s (3 s warm-up each); medians reported" >&2
RESULTS=$WORK/results
for round in $(seq 1 "$ROUNDS"); do
  echo "-- round $round" >&2
  {
    run_native
    run_serve serve hello /
    run_bare bare-host hello /
    run_keel keel hello / "" ""
    run_keel keel-guard-pages hello / "guard-pages = true" ""
    run_keel keel-limits-off hello / "" "" KEEL_BENCH_DISABLE_LIMITS=1
    run_serve serve-compute compute / "$WORK/body.json"
    run_keel keel-compute compute / "" "$WORK/body.json"
    run_keel keel-compute-guard-pages compute / "guard-pages = true" "$WORK/body.json"
  } | tee -a "$RESULTS" >&2
done

python3 - "$RESULTS" <<'PY'
import sys, statistics
runs = {}
for l in open(sys.argv[1]):
    if l.strip():
        name, *vals = l.split()
        runs.setdefault(name, []).append(tuple(map(float, vals)))
# Median of each column over the rounds (the machine is noisy; single runs vary by 30%+).
rows = {n: tuple(statistics.median(r[i] for r in rs) for i in range(3)) for n, rs in runs.items()}
def ratio(a, b): return rows[a][0] / rows[b][0]
print("| server | req/s | p50 ms | p99 ms | vs serve | vs native | req/s of each round |")
print("|---|---:|---:|---:|---:|---:|---|")
for name, (rps, p50, p99) in rows.items():
    base = "serve-compute" if "compute" in name else "serve"
    vs_serve = f"{rps / rows[base][0]:.2f}x" if base in rows else ""
    vs_native = f"{100 * rps / rows['native'][0]:.1f}%" if "compute" not in name else ""
    each = ", ".join(f"{r[0]:.0f}" for r in runs[name])
    print(f"| {name} | {rps:.0f} | {p50:.3f} | {p99:.3f} | {vs_serve} | {vs_native} | {each} |")
print()
print(f"keel/serve req/s: {ratio('keel', 'serve'):.2f}x; keel p99 / serve p99: {rows['keel'][2] / rows['serve'][2]:.2f}")
print(f"keel/bare-host req/s: {ratio('keel', 'bare-host'):.2f}; bare-host/serve req/s: {ratio('bare-host', 'serve'):.2f}x")
print(f"cost of limits (limits-off req/s over keel req/s - 1): {100 * (ratio('keel-limits-off', 'keel') - 1):.1f}%")
print(f"guard pages on compute (req/s vs default): {100 * (ratio('keel-compute-guard-pages', 'keel-compute') - 1):+.1f}%")
PY

echo "== cold start (process start -> first 200, warm compile cache), 10 runs" >&2
PORT=$(free_port)
keel_config "$WORK/keel.toml" hello "/..." ""
"$KEEL" check --config "$WORK/keel.toml" >/dev/null   # warms the artifact cache
python3 - "$KEEL" "$WORK/keel.toml" "$PORT" <<'PY'
import subprocess, sys, time, urllib.request, statistics
keel, cfg, port = sys.argv[1:]
times = []
for _ in range(10):
    t = time.perf_counter()
    p = subprocess.Popen([keel, "--log-format", "json", "up", "--config", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            break
        except Exception:
            time.sleep(0.001)
    times.append((time.perf_counter() - t) * 1000)
    p.terminate(); p.wait()
print(f"cold start to first 200: median {statistics.median(times):.1f} ms, max {max(times):.1f} ms")
PY

echo "== idle RSS with 5 components" >&2
PORT=$(free_port)
cat >"$WORK/keel5.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
data-dir = "$WORK/data"
[components.hello]
wasm = "$WASM/hello.wasm"
route = "/hello"
[components.compute]
wasm = "$WASM/compute.wasm"
route = "/compute"
[components.slow]
wasm = "$WASM/slow.wasm"
route = "/slow"
[components.panic]
wasm = "$WASM/panic.wasm"
route = "/panic"
[components.everything]
wasm = "$WASM/wasi-everything.wasm"
route = "/everything"
EOF
"$KEEL" --log-format json up --config "$WORK/keel5.toml" >/dev/null 2>&1 &
pid=$!; PIDS+=("$pid")
wait_http "http://127.0.0.1:$PORT/hello"
for p in /hello /compute /everything; do curl -fsS -o /dev/null "http://127.0.0.1:$PORT$p"; done
echo "idle RSS with 5 components after one request each: $(awk '/VmRSS/ {print $2/1024 " MiB"}' /proc/$pid/status)"
stop "$pid"

echo "stripped release binary: $(du -m "$KEEL" | cut -f1) MiB ($(stat -c %s "$KEEL") bytes)"
