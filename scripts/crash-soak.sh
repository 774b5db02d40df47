#!/usr/bin/env bash
# Crash-safety soak: the crash test of `make test` (tests/all/crash.rs) with
# 1000 SIGKILLs instead of 20. Concurrent kv.set and record-local-event
# through a real component; after each kill, keel restarts on the same data
# dir and every acknowledged write must be there, no event twice.
#
#   scripts/crash-soak.sh            # 1000 kills
#   scripts/crash-soak.sh 5000       # another count
#   KEEL_CRASH_SEED=123 scripts/crash-soak.sh   # replay a run's kill moments
#
# About 0.4 s per kill on 2 cores. Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

export KEEL_CRASH_KILLS="${1:-${KEEL_CRASH_KILLS:-1000}}"
CARGO="${CARGO:-cargo}"

make guests
# --workspace --all-targets like every host build (see Makefile); the filter
# selects the one test.
env -u RUST_BACKTRACE "$CARGO" test --workspace --all-targets -- \
    --exact crash::acknowledged_writes_survive_sigkill --nocapture
