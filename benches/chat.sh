#!/usr/bin/env bash
# Load on the global chat (numbers go to BENCHMARKS.md): the demo topology
# (3 regions x 2 edges, one nats-server per region, release keel nodes with
# the chat on every edge), USERS simulated users signed in on their home
# edges, SENDERS concurrent senders of direct messages (same edge,
# cross-edge same region, cross-region) and room messages for DURATION
# seconds, live receivers measuring delivery latency; then every
# acknowledged message is checked to be readable exactly once (exit status
# non-zero if any was lost or duplicated). Prints a markdown table:
# sign-in time, delivery latency per class, messages/s and RSS per edge.
# Details: the header of benches/tier-bench/src/bin/chat-load.rs.
#
# Usage: benches/chat.sh [USERS] [DURATION]   (default 1200 users, 20 s)
# Env: USERS, DURATION, SENDERS (64), WATCHED (10 per edge),
#      SIGNIN_CONCURRENCY (4 per edge), CHECK_DEADLINE (60 s), KEEL_BIN, KEEL_CHAT_WASM,
#      KEEL_DEMO_JWT_SECRET (a development default if unset), KEEL_LOG.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

USERS=${1:-${USERS:-1200}}
DURATION=${2:-${DURATION:-20}}
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

echo "== building release binaries" >&2
cargo build --release --workspace --bins >&2
[ -f "$PWD/components/target/wasm/chat.wasm" ] || [ -n "${KEEL_CHAT_WASM:-}" ] \
  || { echo "chat.wasm missing: run make guests" >&2; exit 1; }
# exec: a SIGTERM to this script reaches the load tool, which cleans up.
KEEL_BIN=${KEEL_BIN:-$TARGET_DIR/release/keel} exec \
  "$TARGET_DIR/release/chat-load" "$USERS" "$DURATION"
