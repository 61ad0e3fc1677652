#!/usr/bin/env bash
# Idle density: server RSS per logged-in idle connection, measured with
# loadgen against a fresh server. Usage: tools/scripts/density.sh [CONNECTIONS]
# TRANSPORT=ws measures WebSocket connections instead of TCP.
# TLS=1 serves both listeners with TLS (a throwaway CA and certificate made
# with openssl) and has loadgen connect with --ca: TCP+TLS, or WSS.
# SERVER_BIN and LOADGEN_BIN choose other builds (a before/after pair);
# SERVER_ARGS adds flags to the server.
# Prints loadgen's JSON summary (server_rss_bytes_per_conn, kernel memory).
set -euo pipefail
N=${1:-18000}
BIN=${CARGO_TARGET_DIR:-$HOME/.cache/swiftlet/target}/release
DATA=$(mktemp -d)
PORT=${PORT:-7499}
ulimit -n 20000
HTTP_PORT=${HTTP_PORT:-$((PORT + 1))}
SERVER_TLS=()
CLIENT_TLS=()
if [ "${TLS:-0}" = 1 ]; then
  # A CA, and a P-256 server certificate it signs for 127.0.0.1.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=density-ca -keyout "$DATA/ca.key" -out "$DATA/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
    -keyout "$DATA/key.pem" -out "$DATA/req.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$DATA/ext.cnf"
  openssl x509 -req -in "$DATA/req.csr" -CA "$DATA/ca.pem" -CAkey "$DATA/ca.key" \
    -CAcreateserial -days 1 -extfile "$DATA/ext.cnf" -out "$DATA/cert.pem" 2>/dev/null
  SERVER_TLS=(--tls-cert "$DATA/cert.pem" --tls-key "$DATA/key.pem")
  CLIENT_TLS=(--ca "$DATA/ca.pem")
fi
RUST_LOG=warn "${SERVER_BIN:-$BIN/swiftlet}" serve --dev-auth --data-dir "$DATA/db" --listen "127.0.0.1:$PORT" --http "127.0.0.1:$HTTP_PORT" "${SERVER_TLS[@]}" ${SERVER_ARGS:-} &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA"' EXIT
sleep 1
"${LOADGEN_BIN:-$BIN/loadgen}" idle --server "127.0.0.1:$PORT" --connections "$N" --workers 2 \
  --transport "${TRANSPORT:-tcp}" --http-server "127.0.0.1:$HTTP_PORT" "${CLIENT_TLS[@]}" \
  --source 127.0.0.1-127.0.0.4 --dev-auth --server-pid "$PID" --duration 5 2>/dev/null | tail -1
