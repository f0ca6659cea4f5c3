#!/usr/bin/env python3
"""W-http (shared/WORKLOADS.md): Switchyard's L7 proxy beside nginx and HAProxy.

One nginx (worker_processes 1) serves the three backends on 127.0.0.1:18081-18083
(`hello, world\\n`, or a 64 KiB body at /big). Candidates round-robin over them
with upstream keep-alive, two workers/threads each: nginx on :18084, HAProxy on
:18085, Switchyard on :18080 (the three endpoints registered as one service, a
config route to it, two proxy threads, every feature on as shipped: peak-EWMA
balancing, retries, outlier ejection, X-Forwarded-*, request ids, metrics).
`direct` is wrk straight at one backend.

Each round runs every candidate once, in alternating order: 1 s warm-up thrown
away, then `wrk -t1 -cN -dS --latency`. Reported: median req/s, p99 and proxy
CPU µs per request (utime + stime from /proc), and paired ratios (candidate ÷
peer within the same round, then the median).

Usage: bench/w_http.py [--rounds 7] [--seconds 8] [--connections 50] [--path /]
       (after cargo build --release)
Needs: apt-get install -y nginx haproxy wrk
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

from peers import measured_wrk, nginx_upstreams, require_binary, start_backends, stop_all, wait_http
from peers import start_haproxy as start_haproxy_with
from peers import start_nginx as start_nginx_with
from peers import start_switchyard as start_switchyard_with
from procstat import session_pids

PORTS = {"switchyard": 18080, "nginx": 18084, "haproxy": 18085, "direct": 18081}


def start_nginx(work):
    return start_nginx_with(work, "nginx", f"""http {{ access_log off; keepalive_requests 1000000;
  upstream app {{ {nginx_upstreams()} keepalive 64; }}
  server {{ listen 127.0.0.1:{PORTS['nginx']} reuseport;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}""")


def start_haproxy(work):
    return start_haproxy_with(work, "haproxy", PORTS["haproxy"], defaults="  http-reuse always\n")


def start_switchyard(work, binary):
    """The agent on W-http's port, routing every request to `web` (the
    environment's SY_EXTRA first: TOML lines of a variant)."""
    proc, _ = start_switchyard_with(work, binary, '[[http.routes]]\nservice = "web"\n',
                                    ["--http-addr", f"127.0.0.1:{PORTS['switchyard']}"])
    return proc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--path", default="/", help="/ for 13 bytes, /big for 64 KiB")
    parser.add_argument("--binary", default="target/release/switchyard")
    args = parser.parse_args()
    for tool in ("nginx", "haproxy", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install -y nginx haproxy wrk")
    require_binary(args.binary)
    work = tempfile.mkdtemp(prefix="w-http-")
    backends = start_backends(work)
    procs = {"switchyard": start_switchyard(work, args.binary), "nginx": start_nginx(work),
             "haproxy": start_haproxy(work)}
    names = list(PORTS)
    try:
        for name in names:
            size = wait_http(PORTS[name], args.path)
            print(f"# {name} answers {args.path} with {size} bytes", file=sys.stderr)
        results = {name: [] for name in names}
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else list(reversed(names))
            for name in order:
                pids = session_pids(procs[name].pid) if name in procs else []
                rps, total, p99, bad, sock, cpu_us, steal = measured_wrk(
                    PORTS[name], args.path, args.connections, args.seconds, pids)
                results[name].append({"rps": rps, "p99": p99, "cpu": cpu_us, "bad": bad})
                print(f"round {rnd} {name}: {rps:.0f} req/s, p99 {p99:.2f} ms, {cpu_us:.1f} us CPU/req, "
                      f"non-2xx {bad} {sock}, steal {steal:.1%}", file=sys.stderr)
        med = statistics.median
        print(f"\nW-http: wrk -t1 -c{args.connections} -d{args.seconds}s, path {args.path}, {args.rounds} rounds, "
              f"alternating order; nproc={os.cpu_count()}")
        print("| candidate | req/s | p99 | CPU µs/req | req/s ÷ HAProxy | req/s ÷ nginx | p99 ÷ HAProxy | CPU ÷ HAProxy | CPU ÷ nginx | non-2xx |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name in names:
            r = results[name]
            ratio = lambda peer, key: med([a[key] / b[key] for a, b in zip(r, results[peer])])
            cpu = med([x["cpu"] for x in r])
            cpu_ratio = lambda peer: f"{ratio(peer, 'cpu'):.2f}×" if name in procs else "–"
            print(f"| {name} | {med([x['rps'] for x in r]):.0f} | {med([x['p99'] for x in r]):.2f} ms | "
                  f"{cpu:.1f} | {ratio('haproxy', 'rps'):.2f}× | {ratio('nginx', 'rps'):.2f}× | "
                  f"{ratio('haproxy', 'p99'):.2f}× | {cpu_ratio('haproxy')} | {cpu_ratio('nginx')} | "
                  f"{sum(x['bad'] for x in r)} |")
    finally:
        stop_all(list(procs.values()) + [backends], work)


if __name__ == "__main__":
    main()
