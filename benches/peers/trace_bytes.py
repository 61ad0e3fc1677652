#!/usr/bin/env python3
# Per delivered message: socket and WAL syscalls and bytes from a `strace -f` log (profile.sh MODE=trace).
# Usage: trace_bytes.py OUT.trace OUT.txt
import sys, re, collections
recv = int(dict(x.split('=', 1) for x in open(sys.argv[2]).readline().split() if '=' in x)['recv_total'])
c = collections.Counter(); b = collections.Counter()
for l in open(sys.argv[1]):
    m = re.match(r'\d+\s+(\w+)\(.*\)\s+=\s+(-?\d+)', l) or re.match(r'\d+\s+<\.\.\. (\w+) resumed>.*=\s+(-?\d+)', l)
    if m:
        c[m.group(1)] += 1
        if int(m.group(2)) > 0:
            b[m.group(1)] += int(m.group(2))
for k in sorted(c):
    print(f"  {k}: {c[k]/recv:.2f} calls/msg, {b[k]/recv:.0f} B/msg")
