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
# directory, waits for /healthz, runs tests/browser/chat.test.mjs; then
# starts a redis-server and two cluster nodes (`--cluster`, node 2 allowing
# node 1's page origin) and runs tests/browser/cluster.test.mjs (a login
# redirected from node 1 to node 2, chat across them, then node 2 paused
# past its lease and the user's partition moved to node 1 under the open
# page). Stops everything
# on exit and exits with the first failing test's status. CLUSTER=0 skips
# the cluster part.
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
CLUSTER_PIDS=()

stop() {
  local pid=$1
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
}

cleanup() {
  local rc=$?
  stop "$SERVER_PID"
  # Nodes before their Redis (the first pid), so they stop quietly.
  for ((i = ${#CLUSTER_PIDS[@]} - 1; i >= 0; i--)); do stop "${CLUSTER_PIDS[$i]}"; done
  if [ "$rc" -ne 0 ]; then
    for f in "$LOG" "$DATA"/cluster-*.log; do
      [ -s "$f" ] && { say "$(basename "$f") (last 40 lines):"; tail -n 40 "$f" | sed 's/^/  /'; }
    done
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
[ "$status" -eq 0 ] || exit "$status"
[ "${CLUSTER:-1}" = 1 ] || exit 0

# --- a cluster of two: a redirected login and chat across nodes ---------------
command -v redis-server >/dev/null || { say "redis-server is missing (tools/scripts/setup.sh installs it)"; exit 1; }
stop "$SERVER_PID"; SERVER_PID=""
REDIS_PORT="$(free_port)"
mkdir -p "$DATA/redis"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --dir "$DATA/redis" \
  >"$DATA/cluster-redis.log" 2>&1 &
CLUSTER_PIDS+=($!)
REDIS="redis://127.0.0.1:$REDIS_PORT"
T1="$(free_port)"; H1="$(free_port)"; T2="$(free_port)"; H2="$(free_port)"
# Both pages load from node 1; node 2 must accept node 1's page origin.
for i in 1 2; do
  if [ "$i" = 1 ]; then t=$T1 h=$H1; else t=$T2 h=$H2; fi
  # A short lease: the test pauses node 2 until it lapses.
  "$BIN" serve --dev-auth --data-dir "$DATA/cluster-$i" --listen "127.0.0.1:$t" --http "127.0.0.1:$h" \
    --cluster "$REDIS" --node-id "$i" --lease-ms 3000 --allow-origin "http://127.0.0.1:$H1" \
    >"$DATA/cluster-node$i.log" 2>&1 &
  CLUSTER_PIDS+=($!)
done
for h in "$H1" "$H2"; do
  ok=0
  for _ in $(seq 150); do
    if healthy "http://127.0.0.1:$h/healthz" 2>/dev/null; then ok=1; break; fi
    sleep 0.1
  done
  [ "$ok" = 1 ] || { say "cluster node on $h: no /healthz within 15 s"; exit 1; }
done
"$BIN" cluster --redis "$REDIS" init --nodes 1,2
# `cluster init --nodes 1,2` gives partition p to node (p mod 2) + 1.
home_of() { "$BIN" cluster --redis "$REDIS" partition --user "$1" | awk '{ print $3 % 2 + 1 }'; }
LOCAL_USER=""; REMOTE_USER=""
for i in $(seq 0 40); do
  case "$(home_of "web$i")" in
    1) [ -n "$LOCAL_USER" ] || LOCAL_USER="web$i" ;;
    2) [ -n "$REMOTE_USER" ] || REMOTE_USER="web$i" ;;
  esac
  [ -n "$LOCAL_USER" ] && [ -n "$REMOTE_USER" ] && break
done
say "cluster: redis $REDIS, node 1 http $H1, node 2 http $H2; $LOCAL_USER lives on 1, $REMOTE_USER on 2"
export SWIFTLET_PAGE_URL="http://127.0.0.1:$H1"
export SWIFTLET_LOCAL_USER="$LOCAL_USER" SWIFTLET_REMOTE_USER="$REMOTE_USER"
export SWIFTLET_REDIS="$REDIS" SWIFTLET_NODE2_PID="${CLUSTER_PIDS[2]}"
SWIFTLET_REMOTE_PARTITION="$("$BIN" cluster --redis "$REDIS" partition --user "$REMOTE_USER" | awk '{ print $3 }')"
export SWIFTLET_REMOTE_PARTITION
set +e
node tests/browser/cluster.test.mjs
status=$?
set -e
exit "$status"
