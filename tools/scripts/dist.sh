#!/usr/bin/env bash
# The lean release: builds the binaries and writes dist/ with
#   swiftlet, swiftlet-cli, loadgen   stripped of debug information (symbols
#                                     kept: a panic's backtrace names functions)
#   *.debug                           the debug information split out, linked
#                                     by .gnu_debuglink (gdb and addr2line find
#                                     it beside the binary or in /usr/lib/debug)
#   swiftlet.service, 99-swiftlet.conf  the systemd unit and kernel settings
# Usage: tools/scripts/dist.sh [OUT_DIR]   (default: dist)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-dist}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/swiftlet/target}
cargo build --release --workspace
mkdir -p "$OUT"
for bin in swiftlet swiftlet-cli loadgen; do
  src="$CARGO_TARGET_DIR/release/$bin"
  objcopy --only-keep-debug "$src" "$OUT/$bin.debug"
  objcopy --strip-debug --add-gnu-debuglink="$OUT/$bin.debug" "$src" "$OUT/$bin"
  chmod 0755 "$OUT/$bin"
  chmod 0644 "$OUT/$bin.debug"
done
cp tools/packaging/swiftlet.service tools/packaging/99-swiftlet.conf "$OUT/"
ls -l "$OUT"
