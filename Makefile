# The two commands of README.md: `make run` and `make test`.
# Both install missing system packages first (tools/scripts/setup.sh) and
# build in one persistent target directory outside the checkout, so RocksDB
# (C++, ~15 min on 2 cores) is compiled once per machine, in release only:
# tests, benches and the server all use the release profile.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/swiftlet/target
BIN := $(CARGO_TARGET_DIR)/release

.PHONY: setup build run test bench lint cli fuzz dist

setup:
	@tools/scripts/setup.sh

build: setup
	cargo build --release --workspace

## Run the server with its embedded defaults (127.0.0.1:7400, ./data). Extra flags: make run ARGS="--dev-auth"
run: build
	$(BIN)/swiftlet serve $(ARGS)

## Every test: unit, codec, integration (real server, real RocksDB, kill -9),
## the loom model of flat combining (src/commit/combine.rs, a few seconds),
## then the web page in headless Chromium (installs chromium and playwright-core if missing),
## then each fuzz target for 10 s (skipped, with one line saying why, without nightly + cargo-fuzz).
test: setup
	cargo nextest run --release --workspace --no-fail-fast
	cargo nextest run --release --features loom --test loom_combine
	cargo build --release --workspace
	tools/scripts/browser-test.sh
	FUZZ_SECONDS=$${FUZZ_SECONDS:-10} tools/scripts/fuzz.sh

## The lean release in dist/: stripped binaries (debug info split into *.debug), the systemd unit, kernel settings.
dist: setup
	tools/scripts/dist.sh

bench: setup
	cargo bench --bench codec --bench store

lint: setup
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets -- -D warnings

## Every cargo-fuzz target under fuzz/ for FUZZ_SECONDS each (default 60); needs nightly and
## cargo-fuzz, and says so in one line (exit 0) when they are missing. make fuzz FUZZ_SECONDS=600
fuzz: setup
	tools/scripts/fuzz.sh

## Interactive client against a local server: make cli U=alice (add CLI_ARGS="--dev-auth" for a --dev-auth server)
cli: build
	$(BIN)/swiftlet-cli --user $(U) $(CLI_ARGS)
