#!/usr/bin/env bash
# Regional-tier benchmark (numbers go to BENCHMARKS.md; nothing here is
# asserted): outbox drain vs raw JetStream async publish, replay after a
# 10 s partition at 1,000 events/s, edge -> region latency vs raw JetStream.
#
# Usage: benches/region.sh [EVENTS]   (default 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

EVENTS=${1:-20000}
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

echo "== building release binaries" >&2
cargo build --release --workspace --bins >&2
"$TARGET_DIR/release/region-bench" "$EVENTS"
