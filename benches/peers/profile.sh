#!/usr/bin/env bash
# One swiftlet 1:1 run (peerload tput) with the server's /metrics, /proc/PID/io and (MODE=strace) strace -c -f
# or (MODE=perf) perf record; prints per delivered message: server CPU us, syscalls, frames, bytes, store writes.
# Usage: BIN=path/to/swiftlet PAIRS=100 WINDOW=1 SECS=10 MODE=plain|strace|perf ./profile.sh
set -u
cd "$(dirname "$0")"
. ./servers.sh
PAIRS=${PAIRS:-100}; WINDOW=${WINDOW:-1}; SECS=${SECS:-10}; MODE=${MODE:-plain}; DACK=${DACK:-0}
export SWIFTLET_BIN=${BIN:-$SWIFTLET_BIN}
OUT=${OUT:-results/profile_$(basename $SWIFTLET_BIN)_${PAIRS}x${WINDOW}_$MODE}
metrics() { curl -s http://127.0.0.1:17480/metrics | awk '/^swiftlet_(messages|acks|store_write_seconds_count|store_rows|delivery_acks|cursors_written|receipts)/{print $1"="$2}' | tr '\n' ' '; }
io() { awk '{printf "%s=%s ", $1, $2}' /proc/$SPID/io | tr -d ':'; }
flock /tmp/bench.lock bash -c '
  . ./servers.sh; trap stop_peer EXIT; start_peer swiftlet
  m0=$('"$(declare -f metrics)"'; metrics); i0=$(awk "{printf \"%s=%s \", \$1, \$2}" /proc/$SPID/io | tr -d :)
  case '"$MODE"' in
    trace) strace -f -qq -e trace=read,write,recvfrom,sendto,readv,writev,recvmsg,sendmsg -p $SPID -o '"$OUT"'.trace & TP=$! ; sleep 1 ;;
    perfstat) perf stat -e raw_syscalls:sys_enter,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_write,syscalls:sys_enter_futex,syscalls:sys_enter_fdatasync,context-switches -p $SPID -o '"$OUT"'.perfstat & TP=$! ; sleep 1 ;;
    strace) strace -c -f -p $SPID -o '"$OUT"'.strace & TP=$! ; sleep 1 ;;
    perf) perf record -F 999 -g -p $SPID -o '"$OUT"'.perf.data >/dev/null 2>&1 & TP=$! ; sleep 1 ;;
  esac
  r=$(peerload/target/release/peerload tput --proto swiftlet --addr $SADDR --pairs '"$PAIRS"' --window '"$WINDOW"' --size 100 \
      --secs '"$SECS"' --warmup 2 --dack-ms '"$DACK"' '"${SKIPOWN:-}"' --spid $SPID --src 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 2>/dev/null)
  [ -n "${TP:-}" ] && { kill -INT $TP; wait $TP; }
  m1=$('"$(declare -f metrics)"'; metrics); i1=$(awk "{printf \"%s=%s \", \$1, \$2}" /proc/$SPID/io | tr -d :)
  echo "RESULT $r"; echo "M0 $m0"; echo "M1 $m1"; echo "IO0 $i0"; echo "IO1 $i1"
' > $OUT.txt
python3 - $OUT.txt <<'PY'
import sys,re
L={l.split(' ',1)[0]:l.split(' ',1)[1] for l in open(sys.argv[1]) if ' ' in l}
kv=lambda s: dict(x.split('=',1) for x in s.split() if '=' in x)
r=kv(L['RESULT']); m0=kv(L.get('M0','')); m1=kv(L.get('M1','')); i0=kv(L['IO0']); i1=kv(L['IO1'])
recv=int(r['recv_total']); sent=int(r['sent_total'])
d=lambda a,b,k: float(b.get(k,0))-float(a.get(k,0))
dacks=d(m0,m1,'swiftlet_delivery_acks_total')
frames=sent+int(r['acks_total'])+recv+int(r['own_inbox_events'])+dacks
print(f"rate={r['rate']} msgs/s  server_cpu_us_per_msg={float(r['server_cpu_measure_s'])*1e6/(float(r['rate'])*float(r['secs'])):.1f}  integrity_dups={r['dups']} undelivered={r['undelivered']}")
print(f"whole run: recv={recv} frames/msg={frames/recv:.2f} (own_inbox_events/msg={int(r['own_inbox_events'])/recv:.2f}, server-counted DeliveryAcks/msg={dacks/recv:.2f})")
print(f"  server rchar/msg={d(i0,i1,'rchar')/recv:.0f} B  wchar/msg={d(i0,i1,'wchar')/recv:.0f} B  syscr/msg={d(i0,i1,'syscr')/recv:.2f} syscw/msg={d(i0,i1,'syscw')/recv:.2f}")
for k in sorted(m1):
    print(f"  {k}/msg = {d(m0,m1,k)/recv:.3f}")
PY
[ "$MODE" = strace ] && head -25 $OUT.strace
if [ "$MODE" = perfstat ]; then
  recv=$(grep -o 'recv_total=[0-9]*' $OUT.txt | cut -d= -f2)
  awk -v n=$recv '/[0-9] +[a-z_:-]+/{gsub(",","",$1); printf "  %s: %.2f per msg\n", $2, $1/n}' $OUT.perfstat
fi
[ "$MODE" = trace ] && python3 trace_bytes.py $OUT.trace $OUT.txt

true
