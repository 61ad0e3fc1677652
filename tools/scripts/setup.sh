#!/usr/bin/env bash
# Installs what building and testing swiftlet needs on a fresh Debian machine,
# and only what is missing:
#   - libclang (Debian libclang-dev): the rocksdb crate's bindgen needs it.
#   - redis-server (Debian redis-server): cluster tests start their own.
#   - cargo-nextest: the test runner (installed from crates.io if absent).
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
