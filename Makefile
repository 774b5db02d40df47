# The README's commands. Build output honours CARGO_TARGET_DIR.
#
# Every host build is `--workspace --all-targets`: cargo resolves dependency
# features per selected package set, so `-p xtask` or `--bin keel` would
# rebuild wasmtime with other features. One resolution, one build.
.PHONY: run demo test browser-deps guests build host bootstrap bench bench-edge bench-sync bench-region bench-regional-op bench-cache bench-ledger bench-erase bench-chat check fmt clippy

CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
KEEL := $(TARGET_DIR)/debug/keel
XTASK := $(TARGET_DIR)/debug/xtask

bootstrap:
	@./scripts/bootstrap.sh

host: bootstrap
	$(CARGO) build --workspace --all-targets

guests: host
	$(XTASK) guests

build: guests

# The browser tests' npm packages (tests/all/browser.rs runs tests/browser/
# with node and Debian's chromium): `npm ci` only when node_modules is
# missing or older than package-lock.json (npm ci writes the stamp).
BROWSER := tests/browser
browser-deps: $(BROWSER)/node_modules/.package-lock.json

$(BROWSER)/node_modules/.package-lock.json: $(BROWSER)/package-lock.json $(BROWSER)/package.json | bootstrap
	npm ci --prefix $(BROWSER) --no-audit --no-fund
	@touch $@

# The example app's JWT key (keel.toml [auth] reads it from the environment).
# A development default, so `make run` works as is; set your own to override.
run check demo bench-chat: export KEEL_DEMO_JWT_SECRET ?= keel-dev-secret-change-me-before-deploying

# Serve the example app (keel.toml) on the embedded single node at http://127.0.0.1:8080.
run: build
	env -u RUST_BACKTRACE $(KEEL) up --config keel.toml

# The global chat on a loopback deployment: 3 regions x 2 edges, NATS
# clusters and gateways rendered as `keel topology` does. Prints the URLs;
# Ctrl-C stops everything it started.
demo: build
	env -u RUST_BACKTRACE KEEL_BIN=$(KEEL) $(TARGET_DIR)/debug/keel-demo

# Tests and benchmarks start their own nats-server (bootstrap installs it).
test demo bench bench-sync bench-region bench-regional-op bench-cache bench-ledger bench-erase bench-chat: export KEEL_NATS_SERVER ?= $(CURDIR)/.tools/venv/bin/nats-server

test: guests browser-deps
	env -u RUST_BACKTRACE $(CARGO) test --workspace --all-targets --no-fail-fast

check: build
	$(KEEL) check --config keel.toml

bench: guests
	./benches/http.sh
	./benches/edge.sh
	./benches/sync.sh
	./benches/region.sh
	./benches/regional-op.sh
	./benches/cache.sh
	./benches/ledger.sh
	./benches/erase.sh
	./benches/chat.sh

bench-edge: guests
	./benches/edge.sh

bench-sync: guests
	./benches/sync.sh

bench-region: bootstrap
	./benches/region.sh

# Needs the regional-probe guest.
bench-regional-op: guests
	./benches/regional-op.sh

bench-cache: guests
	./benches/cache.sh

# Needs the ledger-probe guest.
bench-ledger: guests
	./benches/ledger.sh
	./benches/erase.sh

# Needs the edge-, state-, cache- and privacy-probe guests.
bench-erase: guests
	./benches/erase.sh

# The global chat under load: 1,200 users on 3 regions x 2 edges (benches/chat.sh).
bench-chat: guests
	./benches/chat.sh

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
