#!/usr/bin/env bash
# Regional tier through guests, end to end (numbers go to BENCHMARKS.md;
# nothing here is asserted): a loopback topology of 2 regions x 2 edges, one
# nats-server per region, release keel nodes for nyc, bos and sfo serving
# regional-probe. Regional op nyc -> region -> bos (record-user-activity until
# get-regional-user-state at bos shows it) vs a raw NATS request/reply round
# trip on the same server; subscription delivery nyc -> bos; the HTTP floor
# of a guest call.
#
# Usage: benches/regional-op.sh [SAMPLES]   (default 500; delivery: at most 200)
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

SAMPLES=${1:-500}
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

echo "== building release binaries" >&2
cargo build --release --workspace --bins >&2
PROBE=$PWD/components/target/wasm/regional-probe.wasm
[ -f "$PROBE" ] || { echo "$PROBE missing: run make guests" >&2; exit 1; }
# exec: a SIGTERM to this script reaches the benchmark, which cleans up.
KEEL_BIN=${KEEL_BIN:-$TARGET_DIR/release/keel} KEEL_REGIONAL_PROBE=$PROBE exec \
  "$TARGET_DIR/release/regional-op" "$SAMPLES"
