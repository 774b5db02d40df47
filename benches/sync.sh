#!/usr/bin/env bash
# State-sync benchmark (numbers go to BENCHMARKS.md; nothing here is asserted).
#
# sync-bench: counter increments through a guest vs in-process Sync; delta
# bytes per op vs full state; propagation A -> B over a real nats-server vs
# raw async-nats publish -> receive; convergence of 3 nodes after a partition
# heals (fault proxy), over HEAL_RUNS cut/heal cycles.
#
# Usage: benches/sync.sh [SECONDS] [HEAL_RUNS]   (defaults 3, 20)
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

SECS=${1:-3}
RUNS=${2:-20}
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

echo "== building release binaries" >&2
cargo build --release --workspace --bins >&2
PROBE=$PWD/components/target/wasm/state-probe.wasm
[ -f "$PROBE" ] || { echo "$PROBE missing: run make guests" >&2; exit 1; }
"$TARGET_DIR/release/sync-bench" "$TARGET_DIR/release/keel" "$PROBE" "$SECS" "$RUNS"
