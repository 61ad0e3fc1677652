#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a bounded time each:
#   FUZZ_SECONDS   seconds per target (default 60)
#   FUZZ_TARGETS   which targets (default: all, as `cargo fuzz list` gives them)
# Needs a nightly toolchain and cargo-fuzz (tools/scripts/setup.sh installs
# both where it can). Without them it prints one line saying what is missing
# and exits 0, so `make test` stays runnable on stable alone.
#
# Seeds come from fuzz/corpus/<target> (in the repo, read only); what
# libFuzzer finds goes to a scratch corpus outside the checkout
# ($FUZZ_WORK/corpus/<target>, kept between runs so each run starts where
# the last stopped). A crash stops the run with a non-zero exit and leaves
# its input in fuzz/artifacts/<target>/ (git-ignored): reproduce it with
# `cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>` in fuzz/.
set -euo pipefail

cd "$(dirname "$0")/../.."
seconds="${FUZZ_SECONDS:-60}"
work="${FUZZ_WORK:-$HOME/.cache/swiftlet/fuzz}"
# The fuzz crate builds with sanitizer flags on nightly: its own target
# directory, never the main workspace's.
target_dir="$work/target"

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: skipped: no nightly toolchain (rustup toolchain install nightly; tools/scripts/setup.sh tries it)"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: skipped: cargo-fuzz is not installed (cargo install --locked cargo-fuzz; tools/scripts/setup.sh does it when nightly is present)"
  exit 0
fi

cd fuzz
unset CARGO_TARGET_DIR
cargo +nightly fuzz build -O --target-dir "$target_dir" >&2
targets="${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}"
for t in $targets; do
  mkdir -p "$work/corpus/$t"
  # The HTTP parser's limits sit at 8 KiB of head: let inputs reach past it.
  max_len=4096
  [ "$t" = http_request ] && max_len=20000
  echo "fuzz: $t for ${seconds}s" >&2
  log="$work/$t.log"
  if ! cargo +nightly fuzz run -O --target-dir "$target_dir" "$t" \
      "$work/corpus/$t" "corpus/$t" -- \
      -max_total_time="$seconds" -max_len="$max_len" -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz: $t FAILED (log: $log, input: fuzz/artifacts/$t/)"
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  echo "fuzz: $t ok: $runs runs in ${seconds}s, $cov, corpus $(ls "$work/corpus/$t" | wc -l) inputs"
done
