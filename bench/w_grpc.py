#!/usr/bin/env python3
"""W-grpc (issue 27): unary gRPC calls through each candidate to three
gRPC-shaped backends (`switchyard-bench grpc-backend`: one thread, h2c,
echoes the message with `grpc-status: 0` in the trailers).

`h2load -t1 -c50 -m10` posts one framed 16-byte message per call with
`content-type: application/grpc` and `te: trailers`. Candidates, two
workers/threads each: Switchyard (:18080, gRPC goes upstream over h2c by
itself), HAProxy (:18097, `proto h2` on both sides), nginx (:18096,
`grpc_pass`), and direct to one backend (:18091). Alternating rounds;
reported: median calls/s, CPU µs per call, paired ratios. h2load checks
the HTTP status only, not `grpc-status` in the trailers.

Usage: bench/w_grpc.py [--rounds 7] [--seconds 6] [--baseline BINARY]
   (--baseline: another Switchyard build as one more candidate, :18081,
   for an A/B in the same rounds)
   (after cargo build --release -p switchyard -p switchyard-bench)
Needs: apt-get install -y nginx haproxy nghttp2-client
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import peers
from peers import require_binary, spawn, stop_all
from procstat import cpu_seconds, session_pids

GRPC = [18091, 18092, 18093]
PORTS = {"switchyard": 18080, "haproxy": 18097, "nginx": 18096, "direct": 18091, "baseline": 18081}


def start_grpc_backends(bench):
    proc = subprocess.Popen([bench, "grpc-backend", "--ports", ",".join(map(str, GRPC))],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    if proc.stdout.readline().strip() != "ready":
        sys.exit("the gRPC backend did not start")
    return proc


def start_haproxy(work):
    servers = "\n".join(f"  server g{p} 127.0.0.1:{p} proto h2" for p in GRPC)
    conf = os.path.join(work, "haproxy-grpc.cfg")
    with open(conf, "w") as f:
        f.write(f"""global
  nbthread 2
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:{PORTS['haproxy']} proto h2
  default_backend be
backend be
  balance roundrobin
{servers}
""")
    return spawn(["haproxy", "-f", conf])


def start_nginx(work):
    servers = "".join(f"server 127.0.0.1:{p};" for p in GRPC)
    return peers.start_nginx(work, "nginx-grpc", f"""http {{ access_log off; http2_max_requests 1000000;
  upstream grpcs {{ {servers} keepalive 64; }}
  server {{ listen 127.0.0.1:{PORTS['nginx']} http2 reuseport;
    location / {{ grpc_pass grpc://grpcs; }} }} }}""")


def start_switchyard(work, binary, name="switchyard"):
    proc, ready = peers.start_switchyard(work, binary, '[[http.routes]]\nservice = "echo"\n',
                                         ["--http-addr", f"127.0.0.1:{PORTS[name]}"],
                                         register=False)
    endpoints = [{"node": "bench", "service": "echo", "id": f"g{p}", "address": "127.0.0.1", "port": p}
                 for p in GRPC]
    request = urllib.request.Request(f"http://{ready['api']}/v1/switchyard/batch",
                                     data=json.dumps({"endpoints": endpoints}).encode(), method="PUT")
    urllib.request.urlopen(request).read()
    return proc


def h2load_grpc(port, seconds, body):
    out = subprocess.run(["h2load", "-c50", "-m10", "-t1", f"-D{seconds}", "--warm-up-time=1", "-d", body,
                          "-H", "content-type: application/grpc", "-H", "te: trailers",
                          f"http://127.0.0.1:{port}/echo.Echo/Say"],
                         capture_output=True, text=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    total, succeeded, failed, errored = (int(done.group(i)) for i in (2, 3, 4, 5))
    status = re.search(r"status codes: (\d+) 2xx", out)
    ok = int(status.group(1)) if status else 0
    return rps, total, failed + errored + max(succeeded - ok, 0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--binary", default="target/release/switchyard")
    parser.add_argument("--bench", default="target/release/switchyard-bench")
    parser.add_argument("--baseline", help="another Switchyard build, run as candidate 'baseline'")
    args = parser.parse_args()
    for tool in ("nginx", "haproxy", "h2load"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install -y nginx haproxy nghttp2-client")
    require_binary(args.binary)
    require_binary(args.bench)
    work = tempfile.mkdtemp(prefix="w-grpc-")
    body = os.path.join(work, "call.bin")
    with open(body, "wb") as f:
        f.write(b"\x00\x00\x00\x00\x10" + b"0123456789abcdef")
    backends = start_grpc_backends(args.bench)
    procs = {"switchyard": start_switchyard(work, args.binary), "haproxy": start_haproxy(work),
             "nginx": start_nginx(work)}
    names = ["switchyard", "haproxy", "nginx", "direct"]
    if args.baseline:
        require_binary(args.baseline)
        os.mkdir(os.path.join(work, "baseline"))
        procs["baseline"] = start_switchyard(os.path.join(work, "baseline"), args.baseline, "baseline")
        names.insert(1, "baseline")
    try:
        time.sleep(1)
        for name in names:
            h2load_grpc(PORTS[name], 1, body)
        results = {name: [] for name in names}
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else list(reversed(names))
            for name in order:
                pids = session_pids(procs[name].pid) if name in procs else []
                before = cpu_seconds(pids)
                rps, total, bad = h2load_grpc(PORTS[name], args.seconds, body)
                cpu_us = (cpu_seconds(pids) - before) * 1e6 / max(total, 1) if pids else float("nan")
                results[name].append({"rps": rps, "cpu": cpu_us, "bad": bad})
                print(f"round {rnd} {name}: {rps:.0f} calls/s, {cpu_us:.1f} us CPU/call, bad {bad}", file=sys.stderr)
        med = statistics.median
        print(f"\nW-grpc: h2load -c50 -m10 -t1 -D{args.seconds}, unary calls of 16 bytes, {args.rounds} rounds, "
              f"alternating order; nproc={os.cpu_count()}")
        print("| candidate | calls/s | CPU µs/call | calls/s ÷ HAProxy | CPU ÷ HAProxy | calls/s ÷ nginx | failed |")
        print("|---|---|---|---|---|---|---|")
        for name in names:
            r = results[name]
            ratio = lambda peer, key: med([a[key] / b[key] for a, b in zip(r, results[peer])])
            print(f"| {name} | {med([x['rps'] for x in r]):.0f} | {med([x['cpu'] for x in r]):.1f} | "
                  f"{ratio('haproxy', 'rps'):.2f}× | {ratio('haproxy', 'cpu'):.2f}× | {ratio('nginx', 'rps'):.2f}× | "
                  f"{sum(x['bad'] for x in r)} |")
    finally:
        stop_all(list(procs.values()) + [backends], work)


if __name__ == "__main__":
    main()
