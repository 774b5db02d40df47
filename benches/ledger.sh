#!/usr/bin/env bash
# The strongly consistent ledger through guests (numbers go to
# BENCHMARKS.md; nothing here is asserted): a loopback region of 3 edges on
# a cluster of 3 nats-servers (the ledger stream has 3 replicas), release
# keel nodes on the three edges serving ledger-probe. Appends/s with many
# concurrent clients on one hot account and across 1,000 accounts, vs raw
# JetStream compare-and-set publishes (expected last subject sequence) on
# the same cluster, in the same run.
#
# Usage: benches/ledger.sh [APPENDS] [CLIENTS]   (default 20000 64)
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

APPENDS=${1:-20000}
CLIENTS=${2:-64}
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

echo "== building release binaries" >&2
cargo build --release --workspace --bins >&2
PROBE=$PWD/components/target/wasm/ledger-probe.wasm
[ -f "$PROBE" ] || { echo "$PROBE missing: run make guests" >&2; exit 1; }
# exec: a SIGTERM to this script reaches the benchmark, which cleans up.
KEEL_BIN=${KEEL_BIN:-$TARGET_DIR/release/keel} KEEL_LEDGER_PROBE=$PROBE exec \
  "$TARGET_DIR/release/ledger-bench" "$APPENDS" "$CLIENTS"
