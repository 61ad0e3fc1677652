#!/usr/bin/env bash
# Crash rounds (issue 14): builds the server and swiftlet-exercise, then
# runs `swiftlet-exercise crash-rounds`: kill -9 of the real server at
# seeded random moments under mixed 1:1 and group traffic (12 users x 3
# devices by default), restart on the same data, and after every restart
# verify that every acknowledged message is in each inbox it was for exactly
# once and every device's stream is gap-free and in order.
# Usage: tools/scripts/crash-rounds.sh [--rounds 20] [--seed N] [any other
# swiftlet-exercise option]. Prints a line per round and a JSON summary;
# exits non-zero if any check failed. The test suite runs a 3-round form
# (tools/tests/crash_rounds.rs).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/swiftlet/target}
cargo build --release -p swiftlet --bin swiftlet -p swiftlet-client --bin swiftlet-exercise >&2
case " $* " in
  *" --rounds "*) exec "$CARGO_TARGET_DIR/release/swiftlet-exercise" crash-rounds "$@" ;;
  *) exec "$CARGO_TARGET_DIR/release/swiftlet-exercise" crash-rounds --rounds 20 "$@" ;;
esac
