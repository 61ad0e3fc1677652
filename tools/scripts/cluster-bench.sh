#!/usr/bin/env bash
# Cluster benchmark: a redis-server on a free loopback port, NODES local
# swiftlet nodes joined through it (`serve --cluster`, `cluster init`), one
# loadgen scenario spread over all of them (logins that land away from the
# user's home follow NOT_HOME), then everything stopped and removed.
#
#   tools/scripts/cluster-bench.sh SCENARIO [loadgen flags...]
#   tools/scripts/cluster-bench.sh chat --users 1000 --duration 10
#   SINGLE=1 tools/scripts/cluster-bench.sh chat --users 1000 --duration 10   # the baseline
#   NODES=3 tools/scripts/cluster-bench.sh idle --connections 54000 --workers 3 \
#       --source 127.0.0.1-127.0.0.8 --duration 10                            # density
#
# Environment:
#   NODES=3        nodes (ids 1..N) on free loopback ports, each its own data dir
#   SINGLE=1       the baseline: one plain node (no --cluster, no Redis), same
#                  loadgen flags, same script
#   SHARDS=N       --shards per node (default: the server's, one per core)
#   SERVER_ARGS    more flags for every node (e.g. "--wal-sync off")
#   LIMIT=600      seconds the loadgen run may take before it is killed
#   IDLE_SAMPLE=5  seconds of an idle cluster measured before the run (Redis
#                  background traffic: leases, stream polls)
#   KEEP=1         keep the work dir (node and Redis logs, data)
#   CARGO_TARGET_DIR, SERVER_BIN, LOADGEN_BIN: which binaries
#
# Output: loadgen's progress on stderr, a digest on stderr, and one JSON
# object as the last stdout line: {"mode", "nodes", "loadgen": <loadgen's
# summary>, "redis": <deltas per delivered message>, "node_memory": [per
# node: RSS before, at its most connections, bytes per connection],
# "loadavg_before"/"loadavg_after": the machine's 1-minute load}.
# Redis figures come from `INFO commandstats` and `INFO stats`
# (total_net_input_bytes / total_net_output_bytes) read just before and
# just after loadgen, so they include the run's logins; the INFO calls
# themselves are left out. Everything listens on 127.0.0.1 only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN=${CARGO_TARGET_DIR:-$HOME/.cache/swiftlet/target}/release
SERVER=${SERVER_BIN:-$BIN/swiftlet}
LOADGEN=${LOADGEN_BIN:-$BIN/loadgen}
SINGLE=${SINGLE:-0}
NODES=${NODES:-3}
[ "$SINGLE" = 1 ] && NODES=1
LIMIT=${LIMIT:-600}
IDLE_SAMPLE=${IDLE_SAMPLE:-5}
SCENARIO=${1:?usage: tools/scripts/cluster-bench.sh SCENARIO [loadgen flags...]}
shift

say() { echo "[cluster-bench] $*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }

ulimit -n 20000
WORK="$(mktemp -d "${TMPDIR:-/tmp}/swiftlet-cluster.XXXXXX")"
NODE_PIDS=()
REDIS_PID=""
LOADGEN_PID=""

stop() {
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  stop "$LOADGEN_PID"
  for pid in "${NODE_PIDS[@]}"; do stop "$pid"; done
  stop "$REDIS_PID"
  wait 2>/dev/null || true
  if [ "$rc" -ne 0 ]; then
    for log in "$WORK"/*.log; do
      [ -s "$log" ] && { say "$(basename "$log") (last 15 lines):"; tail -n 15 "$log" | sed 's/^/  /' >&2; }
    done
  fi
  if [ "${KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# One HTTP/1.0 GET on loopback with bash's /dev/tcp (no curl needed).
http_get() {
  local port=$1 path=$2
  exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$path" >&3
  cat <&3
  exec 3<&-
}
rss_bytes() { awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$1/status" 2>/dev/null || echo 0; }
conns() {
  http_get "$1" /metrics 2>/dev/null | awk '/^swiftlet_connections\{/ { n += $2 } END { print n + 0 }'
}

# --- Redis --------------------------------------------------------------------
REDIS_PORT=""
if [ "$SINGLE" != 1 ]; then
  REDIS_PORT=$(free_port)
  mkdir -p "$WORK/redis"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
    --dir "$WORK/redis" >"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$REDIS_PORT" ping >/dev/null || { say "redis-server did not start"; exit 1; }
fi
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"

# --- nodes --------------------------------------------------------------------
TCP=(); HTTP=()
for i in $(seq "$NODES"); do
  TCP+=("$(free_port)"); HTTP+=("$(free_port)")
done
for i in $(seq "$NODES"); do
  tcp=${TCP[$((i - 1))]} http=${HTTP[$((i - 1))]}
  args=(serve --dev-auth --data-dir "$WORK/node$i" --listen "127.0.0.1:$tcp" --http "127.0.0.1:$http")
  [ -n "${SHARDS:-}" ] && args+=(--shards "$SHARDS")
  [ "$SINGLE" != 1 ] && args+=(--cluster "$REDIS_URL" --node-id "$i")
  # shellcheck disable=SC2086 # SERVER_ARGS is a list of flags
  RUST_LOG=${RUST_LOG:-warn} "$SERVER" "${args[@]}" ${SERVER_ARGS:-} >"$WORK/node$i.log" 2>&1 &
  NODE_PIDS+=($!)
done
for i in $(seq "$NODES"); do
  ok=0
  for _ in $(seq 150); do
    kill -0 "${NODE_PIDS[$((i - 1))]}" 2>/dev/null || { say "node $i exited during start-up"; exit 1; }
    if http_get "${HTTP[$((i - 1))]}" /healthz 2>/dev/null | head -1 | grep -q ' 200'; then ok=1; break; fi
    sleep 0.1
  done
  [ "$ok" = 1 ] || { say "node $i: no /healthz within 15 s"; exit 1; }
done
TCP_LIST=$(printf '127.0.0.1:%s,' "${TCP[@]}"); TCP_LIST=${TCP_LIST%,}
HTTP_LIST=$(printf '127.0.0.1:%s,' "${HTTP[@]}"); HTTP_LIST=${HTTP_LIST%,}

if [ "$SINGLE" != 1 ]; then
  "$SERVER" cluster --redis "$REDIS_URL" init --nodes "$(seq -s, "$NODES")" >&2
  # Ready when every node serves logins of users homed anywhere (each has
  # read the map): a small idle run through all of them without an error.
  ready=0
  for attempt in $(seq 30); do
    probe=$("$LOADGEN" idle --dev-auth --server "$TCP_LIST" --connections $((8 * NODES)) \
      --duration 0 --user-prefix "probe$attempt" 2>/dev/null | tail -1 || true)
    if echo "$probe" | python3 -c 'import json, sys; s = json.load(sys.stdin); sys.exit(0 if s["errors_total"] == 0 and s["redirects"] > 0 else 1)' 2>/dev/null; then
      ready=1; break
    fi
    sleep 1
  done
  [ "$ready" = 1 ] || { say "the cluster did not serve logins within 30 tries"; exit 1; }
fi

redis_info() {
  if [ -n "$REDIS_PORT" ]; then
    for section in commandstats stats memory; do redis-cli -p "$REDIS_PORT" INFO "$section"; done | tr -d '\r'
    # The process's CPU time (utime + stime, clock ticks): commands, parsing, I/O.
    echo "cpu_ticks:$(awk '{ print $14 + $15 }' "/proc/$REDIS_PID/stat")"
  fi
}

say "$NODES node(s)$([ "$SINGLE" = 1 ] && echo ', no cluster' || echo ", Redis 127.0.0.1:$REDIS_PORT"): tcp $TCP_LIST, http $HTTP_LIST"
redis_info >"$WORK/redis-idle0.txt"
[ "$SINGLE" != 1 ] && sleep "$IDLE_SAMPLE"
redis_info >"$WORK/redis-before.txt"
for i in $(seq "$NODES"); do rss_bytes "${NODE_PIDS[$((i - 1))]}"; done >"$WORK/rss-before.txt"

# --- the run --------------------------------------------------------------------
pid_args=()
[ "$NODES" = 1 ] && pid_args=(--server-pid "${NODE_PIDS[0]}")
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
START=$(date +%s.%N)
timeout --kill-after=10 "$LIMIT" "$LOADGEN" "$SCENARIO" --dev-auth --server "$TCP_LIST" \
  --http-server "$HTTP_LIST" "${pid_args[@]}" "$@" >"$WORK/loadgen.out" &
LOADGEN_PID=$!
# Each second: every node's logged-in connections and RSS; the sample with
# its most connections gives its bytes per connection (idle density).
: >"$WORK/samples.txt"
while kill -0 "$LOADGEN_PID" 2>/dev/null; do
  for i in $(seq "$NODES"); do
    echo "$i $(conns "${HTTP[$((i - 1))]}") $(rss_bytes "${NODE_PIDS[$((i - 1))]}")"
  done >>"$WORK/samples.txt"
  # Redis's memory as "node 0".
  if [ -n "$REDIS_PORT" ]; then
    echo "0 0 $(redis-cli -p "$REDIS_PORT" INFO memory | tr -d '\r' | awk -F: '/^used_memory:/ { print $2 }')"
  fi >>"$WORK/samples.txt"
  sleep 1
done
set +e
wait "$LOADGEN_PID"
LG_STATUS=$?
set -e
LOADGEN_PID=""
END=$(date +%s.%N)
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)
redis_info >"$WORK/redis-after.txt"
SUMMARY=$(tail -n 1 "$WORK/loadgen.out")
[ -n "$SUMMARY" ] || { say "loadgen printed no summary (status $LG_STATUS)"; exit 1; }

MODE=$([ "$SINGLE" = 1 ] && echo single || echo cluster)
python3 - "$WORK" "$MODE" "$NODES" "$START" "$END" "$IDLE_SAMPLE" "$SUMMARY" "$LOAD_BEFORE" "$LOAD_AFTER" "$(getconf CLK_TCK)" <<'PY'
import json, sys
work, mode, nodes, start, end, idle_s, summary, load0, load1, hz = sys.argv[1:]
nodes, run_s, idle_s = int(nodes), float(end) - float(start), float(idle_s)
lg = json.loads(summary)

def info(name):
    calls, stats = {}, {"usec": 0}
    try:
        text = open(f"{work}/{name}").read()
    except OSError:
        return calls, stats
    for line in text.splitlines():
        if line.startswith("cmdstat_"):
            cmd, rest = line[len("cmdstat_"):].split(":", 1)
            fields = dict(kv.split("=") for kv in rest.split(","))
            calls[cmd] = int(fields["calls"])
            if cmd != "info":
                stats["usec"] += int(fields["usec"])
        elif ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            stats[k] = v
    return calls, stats

def delta(a, b):
    (ca, sa), (cb, sb) = a, b
    cmds = {c: cb[c] - ca.get(c, 0) for c in cb if c != "info" and cb[c] - ca.get(c, 0) > 0}
    num = lambda s, k: int(s.get(k, 0))
    keys = ("total_net_input_bytes", "total_net_output_bytes", "usec", "cpu_ticks")
    return cmds, {k: num(sb, k) - num(sa, k) for k in keys}

redis = None
i0, b, a = info("redis-idle0.txt"), info("redis-before.txt"), info("redis-after.txt")
if b[0]:
    cmds, net = delta(b, a)
    idle_cmds, idle_net = delta(i0, b)
    d = max(lg.get("delivered", 0), 1)
    per = lambda x: round(x / d, 3)
    idle_rate = sum(idle_cmds.values()) / idle_s if idle_s > 0 else 0.0
    redis = {
        "delivered": lg.get("delivered", 0),
        "run_s": round(run_s, 1),
        "commands": sum(cmds.values()),
        "commands_per_msg": per(sum(cmds.values())),
        "in_bytes_per_msg": per(net["total_net_input_bytes"]),
        "out_bytes_per_msg": per(net["total_net_output_bytes"]),
        # Redis's own time: executing commands (commandstats usec), and the
        # whole process (CPU ticks, so coarse: 10 ms at 100 Hz).
        "command_usec_per_msg": per(net["usec"]),
        "cpu_usec_per_msg": per(net["cpu_ticks"] * 1e6 / int(hz)),
        "cpu_share_of_a_core": round(net["cpu_ticks"] / int(hz) / run_s, 3),
        # Redis's memory after the run minus before (e.g. per-user keys of
        # the connections an idle run still holds open).
        "used_memory_delta_bytes": int(a[1].get("used_memory", 0)) - int(b[1].get("used_memory", 0)),
        "by_command_per_1000_msgs": {c: round(n * 1000 / d, 1) for c, n in sorted(cmds.items(), key=lambda kv: -kv[1])},
        "idle_commands_per_s": round(idle_rate, 1),
        "idle_in_bytes_per_s": round(idle_net["total_net_input_bytes"] / idle_s, 1) if idle_s > 0 else None,
        "commands_per_msg_less_idle": per(max(sum(cmds.values()) - idle_rate * run_s, 0)),
    }

before = [int(x) for x in open(f"{work}/rss-before.txt").read().split()]
peak, redis_peak_memory = {}, 0
for line in open(f"{work}/samples.txt"):
    parts = line.split()
    if len(parts) != 3:
        continue
    n, c, r = int(parts[0]), int(parts[1] or 0), int(parts[2] or 0)
    if n == 0:
        redis_peak_memory = max(redis_peak_memory, r)
    elif n not in peak or c >= peak[n][0]:
        peak[n] = (c, r)
memory = []
for n in range(1, nodes + 1):
    c, r = peak.get(n, (0, 0))
    rb = before[n - 1] if n - 1 < len(before) else 0
    memory.append({
        "node": n, "rss_before_bytes": rb, "rss_at_peak_bytes": r, "connections_at_peak": c,
        "bytes_per_conn": round((r - rb) / c) if c else None,
    })

if redis is not None:
    # Its most memory during the run, over its memory just before.
    redis["used_memory_peak_delta_bytes"] = redis_peak_memory - int(b[1].get("used_memory", 0))
out = {"mode": mode, "nodes": nodes, "loadgen": lg, "redis": redis, "node_memory": memory,
       "loadavg_before": float(load0), "loadavg_after": float(load1)}
lat = lg.get("latency_ms") or {}
digest = (f"{mode}, {nodes} node(s): delivered {lg.get('delivered')} ({lg.get('msgs_per_s')}/s), "
          f"lost {lg.get('lost')}, dup {lg.get('duplicated')}, errors {lg.get('errors_total')}, "
          f"redirects {lg.get('redirects')}, p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms")
print(f"[cluster-bench] {digest}", file=sys.stderr)
if redis:
    print(f"[cluster-bench] redis per delivered message: {redis['commands_per_msg']} commands "
          f"({redis['commands_per_msg_less_idle']} less idle), in {redis['in_bytes_per_msg']} B, "
          f"out {redis['out_bytes_per_msg']} B, {redis['cpu_usec_per_msg']} us of Redis CPU "
          f"({redis['cpu_share_of_a_core']} of a core); idle {redis['idle_commands_per_s']} commands/s", file=sys.stderr)
for m in memory:
    print(f"[cluster-bench] node {m['node']}: {m['connections_at_peak']} connections, "
          f"RSS {m['rss_before_bytes']} -> {m['rss_at_peak_bytes']} B, {m['bytes_per_conn']} B/conn", file=sys.stderr)
print(json.dumps(out, sort_keys=True))
PY
exit "$LG_STATUS"
