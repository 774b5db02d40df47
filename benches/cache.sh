#!/usr/bin/env bash
# Hierarchical cache through guests (numbers go to BENCHMARKS.md; nothing
# here is asserted): a loopback topology of 2 regions x 3 edges, one
# nats-server per region with every gateway link through a fault proxy,
# release keel nodes on all six edges serving cache-probe. L1 hit through a
# guest vs raw moka; L2 hit vs a raw JetStream KV get; global invalidation
# propagation to the six nodes, without and with 30 ms between the regions.
#
# Usage: benches/cache.sh [SAMPLES]   (default 200; propagation: at most 200)
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

SAMPLES=${1:-200}
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

echo "== building release binaries" >&2
cargo build --release --workspace --bins >&2
PROBE=$PWD/components/target/wasm/cache-probe.wasm
[ -f "$PROBE" ] || { echo "$PROBE missing: run make guests" >&2; exit 1; }
# exec: a SIGTERM to this script reaches the benchmark, which cleans up.
KEEL_BIN=${KEEL_BIN:-$TARGET_DIR/release/keel} KEEL_CACHE_PROBE=$PROBE exec \
  "$TARGET_DIR/release/cache-bench" "$SAMPLES"
