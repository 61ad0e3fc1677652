#!/usr/bin/env bash
# Run one loadgen scenario against a fresh server on a temp data dir, then
# stop the server. Usage: tools/scripts/bench-server.sh SCENARIO [loadgen flags...]
# Example: tools/scripts/bench-server.sh chat --users 1000 --duration 10
set -euo pipefail
BIN=${CARGO_TARGET_DIR:-$HOME/.cache/swiftlet/target}/release
DATA=$(mktemp -d)
PORT=${PORT:-7498}
ulimit -n 20000
HTTP_PORT=${HTTP_PORT:-$((PORT + 1))}
RUST_LOG=warn "$BIN/swiftlet" serve --dev-auth --data-dir "$DATA" --listen "127.0.0.1:$PORT" --http "127.0.0.1:$HTTP_PORT" ${SERVER_ARGS:-} &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA"' EXIT
sleep 1
SCENARIO=$1
shift
"$BIN/loadgen" "$SCENARIO" --server "127.0.0.1:$PORT" --http-server "127.0.0.1:$HTTP_PORT" \
  --dev-auth --server-pid "$PID" "$@"
