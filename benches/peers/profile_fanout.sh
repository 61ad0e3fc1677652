#!/usr/bin/env bash
# One fan-out run (1 publisher, SUBS members, RATE posts/s) with perf record -g on the server.
# Usage: BIN=bin/swiftlet-X ./profile_fanout.sh ; then perf report -i results/fanout_<bin>.perf.data
set -u
cd "$(dirname "$0")"
export SWIFTLET_BIN=$(realpath ${BIN})
OUT=results/fanout_$(basename $SWIFTLET_BIN)
flock /tmp/bench.lock bash -c '
  . ./servers.sh; trap stop_peer EXIT; start_peer swiftlet
  perf record -F 999 -g -p $SPID -o '"$OUT"'.perf.data >/dev/null 2>&1 & TP=$!; sleep 1
  peerload/target/release/peerload fanout --proto swiftlet --addr $SADDR --subs ${SUBS:-1000} --rate ${RATE:-20} --secs 10 --size 100 \
     --qos 1 --dack-ms ${DACK_MS:-10} --spid $SPID --src 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 2>/dev/null
  kill -INT $TP; wait $TP' | tr ' ' '\n' | grep -E "server_us_per_delivery|post_last_p50|integrity"
