#!/usr/bin/env bash
# Edge-tier benchmark (numbers go to BENCHMARKS.md; nothing here is asserted).
#
# 1. edge-bench: guest -> host kv.get / kv.set / sql.query vs the rocksdb and
#    rusqlite crates called directly; durable event appends with 64 writers
#    (group commit) vs one fsync per event. Same run, same machine.
# 2. wrk: p50/p99 latency of one edge operation per HTTP request through the
#    edge-probe component, for each of the six `edge-operations` functions
#    (the durable writes, record-local-event and record-user-activity, are
#    fsynced before the response; authenticate-user verifies an HS256 JWT;
#    baseline: the probe's /edge/node, no store call), with one request in
#    flight (the operation's latency) and with 8 (the box saturated: wrk
#    shares its 2 cores, so that p99 is mostly queueing). Last row: the
#    disk's own fdatasync latency with the idle gap of a request in flight
#    (edge-bench fsync-latency), the floor under the durable writes' p99.
#
# Usage: benches/edge.sh [SECONDS]   (default 3)
# PROFILE=profiling benches/edge.sh uses that cargo profile's build (release
# code with symbols) instead of `release`.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

SECS=${1:-3}
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
command -v wrk >/dev/null || { echo "wrk missing: run scripts/bootstrap.sh" >&2; exit 1; }

PROFILE=${PROFILE:-release}
echo "== building $PROFILE binaries" >&2
cargo build --profile "$PROFILE" --workspace --bins >&2
BIN=$TARGET_DIR/$PROFILE
KEEL=$BIN/keel
PROBE=$PWD/components/target/wasm/edge-probe.wasm
[ -f "$PROBE" ] || { echo "$PROBE missing: run make guests" >&2; exit 1; }

echo "== store calls through a guest vs native (5 interleaved rounds of 1s each)" >&2
"$BIN/edge-bench" "$KEEL" "$PROBE" 1

echo "== one edge operation per HTTP request (wrk, 1 thread, 1 and 8 connections)" >&2
SECRET=edge-bench-hs256-secret-of-32-bytes-or-more
cat >"$WORK/keel.toml" <<TOML
[server]
listen = "127.0.0.1:0"
data-dir = "data"

[auth]
[[auth.keys]]
algorithm = "HS256"
secret = "$SECRET"

[components.probe]
wasm = "$PROBE"
route = "/probe/..."
grants = ["kv", "sql", "events", "edge-operations"]
TOML
"$KEEL" --log-format json up --config "$WORK/keel.toml" >"$WORK/out" 2>"$WORK/err" &
PIDS+=($!)
for _ in $(seq 1 500); do grep -q "keel listening" "$WORK/out" && break; sleep 0.01; done
BASE=$(sed -n 's/^keel listening on //p' "$WORK/out")/probe
curl -fsS -X PUT --data-binary 'hello' "$BASE/edge/state/k" >/dev/null
curl -fsS -X PUT --data-binary 'dark' "$BASE/edge/prefs/u1/theme" >/dev/null
TOKEN=$("$BIN/edge-bench" jwt "$SECRET" u1)
wrk_script() { # file method body [header]
  {
    printf 'wrk.method = "%s"\nwrk.body = %s\n' "$2" "$3"
    [ -z "${4:-}" ] || printf 'wrk.headers["%s"] = "%s"\n' "${4%%:*}" "${4#*: }"
  } >"$WORK/$1"
}
wrk_script event.lua POST '"{\"kind\":\"bench\",\"key\":\"k\",\"payload\":\"0123456789abcdef\"}"'
wrk_script cache.lua PUT '"0123456789abcdef"'
wrk_script auth.lua POST '""' "Authorization: Bearer $TOKEN"
wrk_script activity.lua POST '"{\"kind\":\"view\",\"attributes\":{\"page\":\"home\"}}"'
echo "| operation (HTTP, loopback) | connections | req/s | p50 | p99 |"
echo "|---|---:|---|---|---|"
lat() { # name connections url [script]
  wrk -t1 -c"$2" -d1s ${4:+-s "$4"} "$3" >/dev/null
  wrk -t1 -c"$2" -d"${SECS}s" --latency ${4:+-s "$4"} "$3" >"$WORK/wrk"
  if grep -q "Non-2xx" "$WORK/wrk"; then
    echo "$1: error responses" >&2
    cat "$WORK/wrk" >&2
    exit 1
  fi
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk")
  p50=$(awk '$1=="50%" {print $2}' "$WORK/wrk")
  p99=$(awk '$1=="99%" {print $2}' "$WORK/wrk")
  echo "| $1 | $2 | $rps | $p50 | $p99 |"
}
for c in 1 8; do
  lat "no store call (/edge/node)" "$c" "$BASE/edge/node"
  lat "get-local-state" "$c" "$BASE/edge/state/k"
  lat "update-local-cache" "$c" "$BASE/edge/cache/k" "$WORK/cache.lua"
  lat "authenticate-user (HS256)" "$c" "$BASE/edge/auth" "$WORK/auth.lua"
  lat "get-user-preferences" "$c" "$BASE/edge/prefs/u1"
  lat "record-local-event (fsynced)" "$c" "$BASE/edge/event" "$WORK/event.lua"
  lat "record-user-activity (fsynced)" "$c" "$BASE/edge/activity/u1" "$WORK/activity.lua"
done
"$BIN/edge-bench" fsync-latency 3000 300
