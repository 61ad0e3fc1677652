#!/usr/bin/env bash
# Idle density: server RSS per logged-in idle connection, measured with
# loadgen against a fresh server. Usage: tools/scripts/density.sh [CONNECTIONS]
# TRANSPORT=ws measures WebSocket connections instead of TCP.
# Prints loadgen's JSON summary (server_rss_bytes_per_conn, kernel memory).
set -euo pipefail
N=${1:-18000}
BIN=${CARGO_TARGET_DIR:-$HOME/.cache/swiftlet/target}/release
DATA=$(mktemp -d)
PORT=${PORT:-7499}
ulimit -n 20000
HTTP_PORT=${HTTP_PORT:-$((PORT + 1))}
RUST_LOG=warn "${SERVER_BIN:-$BIN/swiftlet}" serve --dev-auth --data-dir "$DATA" --listen "127.0.0.1:$PORT" --http "127.0.0.1:$HTTP_PORT" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA"' EXIT
sleep 1
"$BIN/loadgen" idle --server "127.0.0.1:$PORT" --connections "$N" --workers 2 \
  --transport "${TRANSPORT:-tcp}" --http-server "127.0.0.1:$HTTP_PORT" \
  --source 127.0.0.1-127.0.0.4 --dev-auth --server-pid "$PID" --duration 5 2>/dev/null | tail -1
