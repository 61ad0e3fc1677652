#!/usr/bin/env bash
# Hostile clients while honest users chat (issue 14): alternating runs, each
# against a fresh server and data dir, of `loadgen chat` alone ("base") and
# of the same with `swiftlet-hostile` running throughout ("hostile").
# Prints one JSON line per run, then the honest p99 ratios of each pair.
# With KINDS="base hostile decoy" each round adds a control ("decoy"): the
# same hostile tool aimed at a second, identical server on the same box,
# while the measured server serves only the honest users. The box's CPU is
# as busy as in "hostile", but no hostile byte reaches the measured server;
# so hostile / decoy is what the abuse costs honest users *through the
# server*, and decoy / base what sharing two cores with it costs them.
# Usage: tools/scripts/hostile.sh [ROUNDS]     (default 3)
# Knobs (environment): RATE (2000 msgs/s) USERS (200) DURATION (30 s)
# WARMUP (5 s: covers the hostile ramp-up) MAX_CONNS (3000: the flood meets
# the cap long before the 20,000 fds) HOSTILE_ARGS (extra flags for
# swiftlet-hostile) SERVER_ARGS (extra flags for the server) NICE (19: the
# hostile tool runs at the lowest priority, so on this 2-core box it takes
# the CPU the server and loadgen leave; its own CPU is reported)
# OUT (a directory for every log, JSON and sample; default a temp dir)
# KINDS (the runs of a round, in order; default "base hostile"; "decoy"
# adds the control above) ONLY (one kind only, e.g. to try one abuse alone)
# SERVER_BIN (the server binary; default the build's, e.g. to compare two).
# Each run also reports the server's own share of the honest requests' time
# (server_req_*: read to answer written, from /metrics on the operator's
# port, PORT+2), which separates work in the server from waiting for a core.
set -euo pipefail
PAIRS=${1:-3}
RATE=${RATE:-2000}
USERS=${USERS:-200}
DURATION=${DURATION:-30}
WARMUP=${WARMUP:-5}
MAX_CONNS=${MAX_CONNS:-3000}
NICE=${NICE:-19}
PORT=${PORT:-7731}
HTTP_PORT=$((PORT + 1))
OPS_PORT=$((PORT + 2))
# The decoy server's ports (KINDS with decoy).
DECOY_PORT=$((PORT + 10))
DECOY_HTTP_PORT=$((PORT + 11))
KINDS=${ONLY:-${KINDS:-base hostile}}
BIN=${CARGO_TARGET_DIR:-$HOME/.cache/swiftlet/target}/release
OUT=${OUT:-$(mktemp -d /tmp/hostile.XXXXXX)}
mkdir -p "$OUT"
ulimit -n 20000
HZ=$(getconf CLK_TCK)
for b in swiftlet loadgen swiftlet-hostile; do
  [ -x "$BIN/$b" ] || { echo "hostile.sh: no $BIN/$b (cargo build --release --workspace; CARGO_TARGET_DIR?)" >&2; exit 1; }
done
echo "hostile.sh: logs and samples in $OUT" >&2

# CPU ticks (utime + stime) of a process, or empty when it is gone.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || true; }

# Every second: seconds since start, server RSS (kB), server fds, server /
# hostile-tool / loadgen CPU ticks, and whether the hostile tool runs.
sample() {
  local spid=$1 file=$2 t0=$SECONDS
  echo -e "t\trss_kb\tfds\tserver_ticks\thostile_ticks\tloadgen_ticks\thostile_running" >"$file"
  while kill -0 "$spid" 2>/dev/null; do
    local rss fds hpid lpid h l run=0
    rss=$(awk '/^VmRSS:/{print $2}' "/proc/$spid/status" 2>/dev/null || echo 0)
    fds=$(ls "/proc/$spid/fd" 2>/dev/null | wc -l)
    hpid=$(cat "$OUT/.hostile.pid" 2>/dev/null || true)
    lpid=$(cat "$OUT/.loadgen.pid" 2>/dev/null || true)
    h=""; l=""
    if [ -n "$hpid" ]; then h=$(ticks "$hpid"); [ -n "$h" ] && run=1; fi
    if [ -n "$lpid" ]; then l=$(ticks "$lpid"); fi
    echo -e "$((SECONDS - t0))\t$rss\t$fds\t$(ticks "$spid")\t${h:-}\t${l:-}\t$run" >>"$file"
    sleep 1
  done
}

run() {
  local kind=$1 n=$2
  local tag="$kind-$n" data
  # Another server on the port would take loadgen's connections
  # (SO_REUSEPORT is refused, but only once ours starts).
  if ss -ltn | grep -q ":$PORT \|:$HTTP_PORT \|:$OPS_PORT \|:$DECOY_PORT \|:$DECOY_HTTP_PORT "; then
    echo "hostile.sh: port $PORT, $HTTP_PORT, $OPS_PORT, $DECOY_PORT or $DECOY_HTTP_PORT is in use; set PORT" >&2
    exit 1
  fi
  data=$(mktemp -d)
  rm -f "$OUT/.hostile.pid" "$OUT/.loadgen.pid" "$OUT/metrics-$tag-"*
  # The server's own share of each request's time comes from /metrics on
  # the operator's port, which the flood's connection cap does not reach
  # (a server built before --ops-listen is run without it).
  local sbin=${SERVER_BIN:-$BIN/swiftlet} ops=()
  if "$sbin" serve --help | grep -q -- --ops-listen; then ops=(--ops-listen "127.0.0.1:$OPS_PORT"); fi
  # shellcheck disable=SC2086
  RUST_LOG=warn "$sbin" serve --dev-auth --data-dir "$data" --listen "127.0.0.1:$PORT" \
    --http "127.0.0.1:$HTTP_PORT" --max-connections "$MAX_CONNS" "${ops[@]}" ${SERVER_ARGS:-} 2>"$OUT/server-$tag.log" &
  local spid=$!
  # The control's target: the same server, built and configured alike,
  # with a data dir of its own.
  local decoy_data="" dpid="" hport=$PORT hhttp=$HTTP_PORT
  if [ "$kind" = decoy ]; then
    decoy_data=$(mktemp -d)
    # shellcheck disable=SC2086
    RUST_LOG=warn "$sbin" serve --dev-auth --data-dir "$decoy_data" --listen "127.0.0.1:$DECOY_PORT" \
      --http "127.0.0.1:$DECOY_HTTP_PORT" --max-connections "$MAX_CONNS" ${SERVER_ARGS:-} 2>"$OUT/decoy-$tag.log" &
    dpid=$!
    hport=$DECOY_PORT hhttp=$DECOY_HTTP_PORT
  fi
  sleep 1
  if ! kill -0 "$spid" 2>/dev/null || { [ -n "$dpid" ] && ! kill -0 "$dpid" 2>/dev/null; }; then
    echo "hostile.sh: a server did not start (port $PORT or $DECOY_PORT taken? see $OUT/server-$tag.log, $OUT/decoy-$tag.log)" >&2
    exit 1
  fi
  sample "$spid" "$OUT/samples-$tag.tsv" &
  local sampler=$!
  "$BIN/loadgen" chat --server "127.0.0.1:$PORT" --http-server "127.0.0.1:$HTTP_PORT" --dev-auth \
    --server-pid "$spid" --users "$USERS" --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" \
    >"$OUT/loadgen-$tag.json" 2>"$OUT/loadgen-$tag.err" &
  local lpid=$!
  echo "$lpid" >"$OUT/.loadgen.pid"
  local hpid=""
  if [ "$kind" != base ]; then
    sleep 1
    # shellcheck disable=SC2086
    nice -n "$NICE" "$BIN/swiftlet-hostile" --server "127.0.0.1:$hport" --http-server "127.0.0.1:$hhttp" \
      --dev-auth --duration $((WARMUP + DURATION + 2)) ${HOSTILE_ARGS:-} \
      >"$OUT/hostile-$tag.json" 2>"$OUT/hostile-$tag.err" &
    hpid=$!
    echo "$hpid" >"$OUT/.hostile.pid"
  fi
  local scraper=""
  if [ ${#ops[@]} -gt 0 ]; then
    (sleep $((WARMUP + 1)); curl -s -m 5 "http://127.0.0.1:$OPS_PORT/metrics" >"$OUT/metrics-$tag-0.txt" || true) &
    scraper=$!
  fi
  local lrc=0 hrc=0
  wait "$lpid" || lrc=$?
  if [ -n "$scraper" ]; then
    wait "$scraper" || true
    curl -s -m 5 "http://127.0.0.1:$OPS_PORT/metrics" >"$OUT/metrics-$tag-1.txt" || true
  fi
  if [ -n "$hpid" ]; then wait "$hpid" || hrc=$?; fi
  # Ten seconds more of samples: does the server give back what the
  # hostile clients took?
  sleep 10
  local fds_end
  fds_end=$(ls "/proc/$spid/fd" 2>/dev/null | wc -l)
  local decoy_ticks=""
  if [ -n "$dpid" ]; then
    decoy_ticks=$(ticks "$dpid")
    kill "$dpid"
    wait "$dpid" 2>/dev/null || true
    rm -rf "$decoy_data"
  fi
  kill "$spid"
  wait "$spid" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  rm -rf "$data"
  python3 - "$OUT" "$tag" "$kind" "$lrc" "$hrc" "$HZ" "$fds_end" "$decoy_ticks" <<'PY'
import json, sys
out, tag, kind, lrc, hrc, hz, fds_end, decoy_ticks = sys.argv[1:9]
hz = int(hz)
lg = json.loads(open(f"{out}/loadgen-{tag}.json").read().strip().splitlines()[-1])
rows = [l.rstrip("\n").split("\t") for l in open(f"{out}/samples-{tag}.tsv")][1:]
rows = [r for r in rows if len(r) == 7 and r[1] not in ("", "0")]
rss = [int(r[1]) for r in rows]
fds = [int(r[2]) for r in rows]
running = [r for r in rows if r[6] == "1"]
after = [r for r in rows if r[6] == "0"][-3:]
ticks = lambda col: max((int(r[col]) for r in rows if r[col]), default=0)
res = {
    "run": tag, "kind": kind,
    "p50_ms": lg["latency_ms"]["p50"], "p99_ms": lg["latency_ms"]["p99"], "p999_ms": lg["latency_ms"]["p999"],
    "ack_p99_ms": lg["ack_latency_ms"]["p99"],
    "delivered_per_s": lg["delivered_per_s"], "acked": lg["acked"], "delivered": lg["delivered"],
    "lost": lg["lost"], "duplicated": lg["duplicated"], "reordered": lg["reordered"], "gaps": lg["gaps"],
    "honest_errors": lg["errors"], "loadgen_rc": int(lrc),
    "server_rss_max_mb": round(max(rss) / 1024, 1) if rss else None,
    "server_rss_end_mb": round(rss[-1] / 1024, 1) if rss else None,
    "server_fds_max": max(fds) if fds else None, "server_fds_end": int(fds_end),
    "server_cpu_s": round(ticks(3) / hz, 1), "loadgen_cpu_s": round(ticks(5) / hz, 1),
}
def buckets(path, name):
    # A histogram's cumulative buckets (le in seconds) and its _sum.
    try:
        text = open(path).read()
    except OSError:
        return None
    b = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = line.split('le="')[1].split('"')[0]
            b[float("inf") if le == "+Inf" else float(le)] = float(line.split()[-1])
        elif line.startswith(name + "_sum"):
            b["sum"] = float(line.split()[-1])
    return b or None
# swiftlet_request_seconds: from reading a request to writing its answer.
b0 = buckets(f"{out}/metrics-{tag}-0.txt", "swiftlet_request_seconds")
b1 = buckets(f"{out}/metrics-{tag}-1.txt", "swiftlet_request_seconds")
if b0 and b1:
    # Over the measured window: the share over 1 and 5 ms, and the bucket
    # holding the 99th percentile (its upper bound).
    les = sorted(k for k in b1 if k != "sum")
    n = b1[les[-1]] - b0.get(les[-1], 0)
    if n > 0:
        frac = {le: (b1[le] - b0.get(le, 0)) / n for le in les}
        res["server_req_n"] = int(n)
        res["server_req_over_1ms_pct"] = round(100 * (1 - frac.get(0.001, 0)), 3)
        res["server_req_over_5ms_pct"] = round(100 * (1 - frac.get(0.005, 0)), 3)
        res["server_req_p99_le_ms"] = next((le * 1000 for le in les if frac[le] >= 0.99), None)
# swiftlet_shard_turn_seconds: how long the shards' turns ran; input that
# arrives during one waits for its end before it is even read.
t0 = buckets(f"{out}/metrics-{tag}-0.txt", "swiftlet_shard_turn_seconds")
t1 = buckets(f"{out}/metrics-{tag}-1.txt", "swiftlet_shard_turn_seconds")
if t0 and t1:
    secs = float(lg.get("measured_s") or 0) or 1.0
    over = lambda le: (t1[float("inf")] - t1[le]) - (t0[float("inf")] - t0[le])
    res["server_turns_over_1ms_per_s"] = round(over(0.001) / secs, 1)
    res["server_turns_over_5ms_per_s"] = round(over(0.005) / secs, 2)
    res["server_turn_busy_pct"] = round(100 * (t1["sum"] - t0["sum"]) / secs, 1)
if decoy_ticks:
    res["decoy_server_cpu_s"] = round(int(decoy_ticks) / hz, 1)
if kind != "base":
    lines = open(f"{out}/hostile-{tag}.json").read().strip().splitlines()
    if not lines:
        sys.exit(f"hostile.sh: swiftlet-hostile printed no report (see {out}/hostile-{tag}.err)")
    h = json.loads(lines[-1])
    res["hostile_cpu_s"] = round(ticks(4) / hz, 1)
    res["hostile_rc"] = int(hrc)
    res["hostile_unexpected"] = h["unexpected_total"]
    res["server_rss_max_while_hostile_mb"] = round(max(int(r[1]) for r in running) / 1024, 1) if running else None
    res["server_rss_after_hostile_mb"] = round(sum(int(r[1]) for r in after) / len(after) / 1024, 1) if after else None
    res["server_fds_max_while_hostile"] = max(int(r[2]) for r in running) if running else None
    k = h["kinds"]
    res["fast_sender_acked"] = k.get("fast_sender", {}).get("counters", {}).get("acked", 0)
    res["answers"] = sum(sum(v["answers"].values()) for v in k.values())
print(json.dumps(res))
PY
}

for n in $(seq 1 "$PAIRS"); do
  for kind in $KINDS; do
    run "$kind" "$n" | tee -a "$OUT/runs.jsonl"
  done
done
python3 - "$OUT/runs.jsonl" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
by = lambda kind: {r["run"].split("-")[1]: r for r in runs if r["kind"] == kind}
base, host, decoy = by("base"), by("hostile"), by("decoy")
ratio = lambda a, b, q: round(a[q] / b[q], 2) if b[q] else None
pairs = []
for n in sorted(base, key=int):
    if n in host:
        b, h = base[n], host[n]
        p = {"pair": int(n), "base_p99_ms": b["p99_ms"], "hostile_p99_ms": h["p99_ms"],
             "p99_ratio": ratio(h, b, "p99_ms"), "p50_ratio": ratio(h, b, "p50_ms"),
             "lost": b["lost"] + h["lost"], "duplicated": b["duplicated"] + h["duplicated"],
             "reordered": b["reordered"] + h["reordered"]}
        if n in decoy:
            d = decoy[n]
            p.update({"decoy_p99_ms": d["p99_ms"], "decoy_over_base_p99": ratio(d, b, "p99_ms"),
                      "hostile_over_decoy_p99": ratio(h, d, "p99_ms")})
        pairs.append(p)
print(json.dumps({"pairs": pairs}))
PY
