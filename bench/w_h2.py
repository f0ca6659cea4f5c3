#!/usr/bin/env python3
"""W-http's HTTP/2 variant (shared/WORKLOADS.md): `h2load -c50 -m10` through
each proxy with HTTP/2 cleartext (prior knowledge) on the client side and
HTTP/1.1 keep-alive to the three W-http backends (one nginx on :18081-18083).

Candidates, two workers/threads each: Switchyard on :18080 (the HTTP listener
takes h2 by its preface), nginx on :18094 (`listen ... http2`), HAProxy on
:18095 (`bind ... proto h2`). Alternating rounds, 1 s warm-up, then `h2load
-D S`. Reported: median req/s, proxy CPU µs per request, paired ratios.

Usage: bench/w_h2.py [--rounds 5] [--seconds 6] [--baseline BINARY]
   (after cargo build --release; --baseline: another Switchyard build as one
   more candidate, on :18098, for an A/B in the same rounds)
Needs: apt-get install -y nginx haproxy nghttp2-client
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

import peers
from peers import h2load, require_binary, start_backends, stop_all, wait_http
from procstat import cpu_seconds, session_pids
from w_http import start_switchyard

PORTS = {"switchyard": 18080, "nginx": 18094, "haproxy": 18095, "baseline": 18098}


def start_nginx(work):
    return peers.start_nginx(work, "nginx-h2", f"""http {{ access_log off; keepalive_requests 1000000; http2_max_requests 1000000;
  upstream app {{ {peers.nginx_upstreams()} keepalive 64; }}
  server {{ listen 127.0.0.1:{PORTS['nginx']} http2 reuseport;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}""")


def start_haproxy(work):
    return peers.start_haproxy(work, "haproxy-h2", PORTS["haproxy"], bind="proto h2",
                               defaults="  http-reuse always\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--binary", default="target/release/switchyard")
    parser.add_argument("--baseline", help="another Switchyard build, run as candidate 'baseline'")
    args = parser.parse_args()
    for tool in ("nginx", "haproxy", "h2load"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install -y nginx haproxy nghttp2-client")
    require_binary(args.binary)
    work = tempfile.mkdtemp(prefix="w-h2-")
    backends = start_backends(work)
    procs = {"switchyard": start_switchyard(work, args.binary), "nginx": start_nginx(work),
             "haproxy": start_haproxy(work)}
    names = ["switchyard", "nginx", "haproxy"]
    if args.baseline:
        require_binary(args.baseline)
        os.mkdir(os.path.join(work, "baseline"))
        procs["baseline"], _ = peers.start_switchyard(
            os.path.join(work, "baseline"), args.baseline, '[[http.routes]]\nservice = "web"\n',
            ["--http-addr", f"127.0.0.1:{PORTS['baseline']}"])
        names.insert(1, "baseline")
    try:
        wait_http(PORTS["switchyard"], "/")
        if args.baseline:
            wait_http(PORTS["baseline"], "/")
        for name in ("nginx", "haproxy"):
            h2load(PORTS[name], 1)
        results = {name: [] for name in names}
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else list(reversed(names))
            for name in order:
                pids = session_pids(procs[name].pid)
                before = cpu_seconds(pids)
                rps, total, bad = h2load(PORTS[name], args.seconds)
                cpu_us = (cpu_seconds(pids) - before) * 1e6 / max(total, 1)
                results[name].append({"rps": rps, "cpu": cpu_us, "bad": bad})
                print(f"round {rnd} {name}: {rps:.0f} req/s, {cpu_us:.1f} us CPU/req, bad {bad}", file=sys.stderr)
        med = statistics.median
        print(f"\nW-http h2: h2load -c50 -m10 -D{args.seconds} (prior knowledge), {args.rounds} rounds, "
              f"alternating order; nproc={os.cpu_count()}")
        print("| candidate | req/s | CPU µs/req | req/s ÷ nginx | req/s ÷ HAProxy | CPU ÷ nginx | CPU ÷ HAProxy | failed |")
        print("|---|---|---|---|---|---|---|---|")
        for name in names:
            r = results[name]
            ratio = lambda peer, key: med([a[key] / b[key] for a, b in zip(r, results[peer])])
            print(f"| {name} | {med([x['rps'] for x in r]):.0f} | {med([x['cpu'] for x in r]):.1f} | "
                  f"{ratio('nginx', 'rps'):.2f}× | {ratio('haproxy', 'rps'):.2f}× | {ratio('nginx', 'cpu'):.2f}× | "
                  f"{ratio('haproxy', 'cpu'):.2f}× | {sum(x['bad'] for x in r)} |")
    finally:
        stop_all(list(procs.values()) + [backends], work)


if __name__ == "__main__":
    main()
