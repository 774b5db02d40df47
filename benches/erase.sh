#!/usr/bin/env bash
# GDPR erasure across three regions through guests (numbers go to
# BENCHMARKS.md; nothing here is asserted): a loopback topology of 3
# regions x 1 edge, release keel nodes serving edge-probe, state-probe,
# cache-probe and privacy-probe. Time from process-data-deletion to a
# completed status, vs a raw cross-region NATS round trip in the same run.
#
# Usage: benches/erase.sh [SAMPLES]   (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

SAMPLES=${1:-30}
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

echo "== building release binaries" >&2
cargo build --release --workspace --bins >&2
for g in edge-probe state-probe cache-probe privacy-probe; do
  [ -f "$PWD/components/target/wasm/$g.wasm" ] || { echo "$g.wasm missing: run make guests" >&2; exit 1; }
done
# exec: a SIGTERM to this script reaches the benchmark, which cleans up.
KEEL_BIN=${KEEL_BIN:-$TARGET_DIR/release/keel} exec \
  "$TARGET_DIR/release/erase-bench" "$SAMPLES"
