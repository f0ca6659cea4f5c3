#!/usr/bin/env python3
"""A/B of two Switchyard builds on W-dns's catalog and query mix.

Both agents run side by side (ports 15356 and 15357, W-dns's 1,000 services x 3
endpoints); dnsperf (-c 4 -q 200) alternates between them, A first in even
rounds and B first in odd ones. Reports each round and the median paired ratio
B/A of queries/s and of server CPU per query.

Usage: bench/ab_dns.py --a OLD_BINARY --b NEW_BINARY [--rounds 7] [--seconds 8]
Needs: apt-get install -y dnsperf dnsutils
"""

import argparse
import os
import signal
import statistics
import sys
import tempfile

import w_dns
from procstat import cpu_seconds, session_pids


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", required=True, help="the build to compare against (before)")
    parser.add_argument("--b", required=True, help="the build measured (after)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="ab-dns-")
    qfile = os.path.join(work, "queries.txt")
    with open(qfile, "w") as f:
        f.write(w_dns.queries_text())
    procs = {}
    ports = {"a": 15356, "b": 15357}
    try:
        for name, binary in (("a", args.a), ("b", args.b)):
            w_dns.PORTS["switchyard"] = ports[name]
            sub = os.path.join(work, name)
            os.makedirs(sub)
            procs[name], _ = w_dns.start_switchyard(sub, binary, 2, "batch")
            w_dns.wait_dns(ports[name])
        rows = {"a": [], "b": []}
        for rnd in range(args.rounds):
            for name in ("a", "b") if rnd % 2 == 0 else ("b", "a"):
                pids = session_pids(procs[name].pid)
                before = cpu_seconds(pids)
                qps, _, completed, lost = w_dns.dnsperf(ports[name], qfile, args.seconds)
                cpu_us = (cpu_seconds(pids) - before) * 1e6 / max(completed, 1)
                rows[name].append((qps, cpu_us))
                print(f"round {rnd} {name}: {qps:.0f} q/s, {cpu_us:.2f} us CPU/query, lost {lost}", file=sys.stderr)
        qps = statistics.median(b[0] / a[0] for a, b in zip(rows["a"], rows["b"]))
        cpu = statistics.median(b[1] / a[1] for a, b in zip(rows["a"], rows["b"]))
        print(f"B/A over {args.rounds} rounds of {args.seconds} s: queries/s {qps:.3f}x, CPU per query {cpu:.3f}x")
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait()


if __name__ == "__main__":
    main()
