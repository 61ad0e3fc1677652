#!/usr/bin/env bash
# Browser test of the web chat page: headless Chromium (Debian's package) driven
# by playwright-core against a fresh release server with --dev-auth.
#
#   tools/scripts/browser-test.sh
#
# Installs what is missing on a fresh Debian machine: the chromium package
# (apt-get, via sudo when not root) and tests/browser/node_modules (npm; only
# playwright-core, which downloads no browser: never `npx playwright install`).
# Builds the release binaries when they are missing, starts
# `swiftlet serve --dev-auth` on free loopback ports with a throwaway data
# directory, waits for /healthz, runs tests/browser/chat.test.mjs, stops the
# server on exit and exits with the test's status.
#
# Environment: CARGO_TARGET_DIR (default ~/.cache/swiftlet/target),
# SWIFTLET_ARTIFACTS (screenshots, default target/browser-artifacts: ignored
# by git), CHROMIUM (default /usr/bin/chromium), KEEP_DATA=1 keeps the data
# directory and server log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$HOME/.cache/swiftlet/target}"
BIN="$TARGET/release/swiftlet"
CLI="$TARGET/release/swiftlet-cli"
export SWIFTLET_ARTIFACTS="${SWIFTLET_ARTIFACTS:-$ROOT/target/browser-artifacts}"
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

say() { echo "[browser-test.sh] $*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- what the test needs ------------------------------------------------------
if [ ! -x "$CHROMIUM" ]; then
  say "installing chromium (apt-get)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
command -v node >/dev/null || { say "node is missing: install nodejs (>= 18) and npm"; exit 1; }
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  say "installing playwright-core (npm)"
  if [ -f tests/browser/package-lock.json ]; then
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
  else
    (cd tests/browser && npm install --no-audit --no-fund --loglevel=error)
  fi
fi
if [ ! -x "$BIN" ] || [ ! -x "$CLI" ]; then
  say "building release binaries into $TARGET"
  CARGO_TARGET_DIR="$TARGET" cargo build --release -p swiftlet -p swiftlet-client --bins
fi

# --- a server of our own ------------------------------------------------------
healthy() {
  if command -v curl >/dev/null; then curl -fsS -o /dev/null "$1"
  else python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1"; fi
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
TCP_PORT="$(free_port)"
HTTP_PORT="$(free_port)"
while [ "$HTTP_PORT" = "$TCP_PORT" ]; do HTTP_PORT="$(free_port)"; done
DATA="$(mktemp -d "${TMPDIR:-/tmp}/swiftlet-browser.XXXXXX")"
LOG="$DATA/server.log"
SERVER_PID=""

cleanup() {
  local rc=$?
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -f "$LOG" ]; then
    say "server log (last 40 lines):"; tail -n 40 "$LOG" | sed 's/^/  /'
  fi
  if [ "${KEEP_DATA:-0}" = 1 ]; then say "kept $DATA"; else rm -rf "$DATA"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting $BIN (tcp 127.0.0.1:$TCP_PORT, http 127.0.0.1:$HTTP_PORT, data $DATA)"
"$BIN" serve --dev-auth --data-dir "$DATA/data" \
  --listen "127.0.0.1:$TCP_PORT" --http "127.0.0.1:$HTTP_PORT" >"$LOG" 2>&1 &
SERVER_PID=$!

ok=0
for _ in $(seq 150); do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then say "the server exited during start-up"; exit 1; fi
  if healthy "http://127.0.0.1:$HTTP_PORT/healthz" 2>/dev/null; then ok=1; break; fi
  sleep 0.1
done
[ "$ok" = 1 ] || { say "no /healthz answer within 15 s"; exit 1; }

export SWIFTLET_PAGE_URL="http://127.0.0.1:$HTTP_PORT"
export SWIFTLET_TCP="127.0.0.1:$TCP_PORT"
export SWIFTLET_BIN_DIR="$TARGET/release"
set +e
node tests/browser/chat.test.mjs
status=$?
set -e
exit "$status"
