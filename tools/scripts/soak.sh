#!/usr/bin/env bash
# The soak (issue 14): builds the server and swiftlet-exercise, then runs
# `swiftlet-exercise soak`: mixed 1:1 and group traffic at a steady rate
# (250 sends/s by default) for 30 minutes while devices log out and back in
# with their cursors and users leave and join (retention on, at its
# defaults, so the database stays bounded), sampling the server's RSS
# and open files from /proc every 2 s. Passes when, after the 15-minute
# warm-up, RSS's peaks and troughs (first half of the rest against the
# second) moved less than 5%, no client saw an error, the server logged no
# ERROR, and the final
# verification found every acknowledged message exactly once and every
# device stream gap-free. A benchmark, not part of the test suite.
# Usage: tools/scripts/soak.sh [--minutes 30] [--rate 250] [--seed N] [...]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/swiftlet/target}
cargo build --release -p swiftlet --bin swiftlet -p swiftlet-client --bin swiftlet-exercise >&2
exec "$CARGO_TARGET_DIR/release/swiftlet-exercise" soak "$@"
