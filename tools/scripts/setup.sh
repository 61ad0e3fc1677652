#!/usr/bin/env bash
# Installs what building and testing swiftlet needs on a fresh Debian machine,
# and only what is missing:
#   - libclang (Debian libclang-dev): the rocksdb crate's bindgen needs it.
#   - redis-server (Debian redis-server): cluster tests start their own.
#   - cargo-nextest: the test runner (installed from crates.io if absent).
#   - a nightly toolchain and cargo-fuzz, for the fuzz targets (fuzz/, run by
#     tools/scripts/fuzz.sh): tried, never required. Without them fuzzing is
#     skipped with one line; everything else builds and tests on stable.
#     SWIFTLET_NO_NIGHTLY=1 skips the attempt.
# protoc is not needed: the .proto files are compiled by protox (pure Rust).
set -euo pipefail

need_apt=()
if ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q 'libclang\.so'; then
  need_apt+=(libclang-dev)
fi
if ! command -v cc >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
  need_apt+=(build-essential)
fi
# A real redis-server for the cluster tests, which start their own on a free
# loopback port (never the system service).
if ! command -v redis-server >/dev/null 2>&1; then
  need_apt+=(redis-server)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest >&2
fi

# Fuzzing wants nightly (libFuzzer's sanitizer flags) and cargo-fuzz. Both
# are optional: a failed install (no network to static.rust-lang.org, no
# rustup) says so and moves on; tools/scripts/fuzz.sh then skips with a line.
if [ -z "${SWIFTLET_NO_NIGHTLY:-}" ]; then
  if ! cargo +nightly --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      echo "setup: installing the nightly toolchain (for fuzzing)" >&2
      rustup toolchain install nightly --profile minimal >&2 ||
        echo "setup: nightly toolchain not installed; fuzzing will be skipped" >&2
    else
      echo "setup: no rustup, so no nightly toolchain; fuzzing will be skipped" >&2
    fi
  fi
  if cargo +nightly --version >/dev/null 2>&1 && ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz >&2 ||
      echo "setup: cargo-fuzz not installed; fuzzing will be skipped" >&2
  fi
fi
