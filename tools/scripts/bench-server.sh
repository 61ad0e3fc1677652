#!/usr/bin/env bash
# Run one loadgen scenario against a fresh server on a temp data dir, then
# stop the server. Usage: tools/scripts/bench-server.sh SCENARIO [loadgen flags...]
# Example: tools/scripts/bench-server.sh chat --users 1000 --duration 10
# SERVER_BIN and LOADGEN_BIN pick other builds (to compare two in one run).
# Afterwards the server's own latency histograms (store write, push delay:
# see /metrics) go to stderr, so loadgen's JSON stays the last stdout line.
set -euo pipefail
BIN=${CARGO_TARGET_DIR:-$HOME/.cache/swiftlet/target}/release
DATA=$(mktemp -d)
PORT=${PORT:-7498}
ulimit -n 20000
HTTP_PORT=${HTTP_PORT:-$((PORT + 1))}
RUST_LOG=warn "${SERVER_BIN:-$BIN/swiftlet}" serve --dev-auth --data-dir "$DATA" --listen "127.0.0.1:$PORT" --http "127.0.0.1:$HTTP_PORT" ${SERVER_ARGS:-} &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA"' EXIT
sleep 1
SCENARIO=$1
shift
"${LOADGEN_BIN:-$BIN/loadgen}" "$SCENARIO" --server "127.0.0.1:$PORT" --http-server "127.0.0.1:$HTTP_PORT" \
  --dev-auth --server-pid "$PID" "$@"
# The server's share of the latency, from its /metrics (bash's /dev/tcp: no
# curl needed).
if exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT"; then
  printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  grep -E '^swiftlet_(request|store_write|push_delay)_seconds' <&3 >&2 || true
  exec 3<&-
fi
