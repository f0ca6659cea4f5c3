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

Variants (`--variant`): `unary` (the above); `one-conn`, one client
connection with 100 concurrent streams (`h2load -c1 -m100`), which also
reports how the calls spread over the three backends (each backend's count,
read from its `/_calls`); `stream`, server-streaming throughput: calls to
`/echo.Echo/Stream`, each answered with 16 messages of 1 MiB
(`h2load -c4 -m1`), reported in MiB/s and CPU ms per GiB.

Usage: bench/w_grpc.py [--variant unary] [--rounds 7] [--seconds 6] [--baseline BINARY]
   (--baseline: another Switchyard build as one more candidate, :18081,
   for an A/B in the same rounds)
   (after cargo build --release -p switchyard -p switchyard-bench)
Needs: apt-get install -y nginx haproxy nghttp2-client curl
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


def start_switchyard(work, binary, name="switchyard", balancer=None):
    route = '[[http.routes]]\nservice = "echo"\n' + (f'balancer = "{balancer}"\n' if balancer else "")
    proc, ready = peers.start_switchyard(work, binary, route,
                                         ["--http-addr", f"127.0.0.1:{PORTS[name]}"],
                                         register=False)
    endpoints = [{"node": "bench", "service": "echo", "id": f"g{p}", "address": "127.0.0.1", "port": p}
                 for p in GRPC]
    request = urllib.request.Request(f"http://{ready['api']}/v1/switchyard/batch",
                                     data=json.dumps({"endpoints": endpoints}).encode(), method="PUT")
    urllib.request.urlopen(request).read()
    return proc


# h2load's load and the method called, per variant.
VARIANTS = {
    "unary": (["-c50", "-m10"], "Say"),
    "one-conn": (["-c1", "-m100"], "Say"),
    "stream": (["-c4", "-m1"], "Stream"),
}


def h2load_grpc(port, seconds, body, variant="unary"):
    """calls/s, calls done, failed calls, MiB/s received."""
    load, method = VARIANTS[variant]
    out = subprocess.run(["h2load", *load, "-t1", f"-D{seconds}", "--warm-up-time=1", "-d", body,
                          "-H", "content-type: application/grpc", "-H", "te: trailers",
                          f"http://127.0.0.1:{port}/echo.Echo/{method}"],
                         capture_output=True, text=True).stdout
    finished = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s, ([\d.]+)([KMG]?)B/s", out)
    rps = float(finished.group(1))
    mib = float(finished.group(2)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[finished.group(3)] / 2**20
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    total, succeeded, failed, errored = (int(done.group(i)) for i in (2, 3, 4, 5))
    status = re.search(r"status codes: (\d+) 2xx", out)
    ok = int(status.group(1)) if status else 0
    return rps, total, failed + errored + max(succeeded - ok, 0), mib


def backend_calls():
    """Calls each backend port has served so far."""
    out = subprocess.run(["curl", "-sf", "--http2-prior-knowledge", f"http://127.0.0.1:{GRPC[0]}/_calls"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def spread(before, after):
    """Each backend's share of the calls between two counts, in %."""
    diff = [after[str(p)] - before[str(p)] for p in GRPC]
    total = max(sum(diff), 1)
    return [100.0 * d / total for d in diff]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--binary", default="target/release/switchyard")
    parser.add_argument("--bench", default="target/release/switchyard-bench")
    parser.add_argument("--baseline", help="another Switchyard build, run as candidate 'baseline'")
    parser.add_argument("--variant", choices=list(VARIANTS), default="unary")
    parser.add_argument("--balancer", help="Switchyard's route balancer (default: the route default, peak_ewma)")
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
    procs = {"switchyard": start_switchyard(work, args.binary, balancer=args.balancer), "haproxy": start_haproxy(work),
             "nginx": start_nginx(work)}
    names = ["switchyard", "haproxy", "nginx", "direct"]
    if args.baseline:
        require_binary(args.baseline)
        os.mkdir(os.path.join(work, "baseline"))
        procs["baseline"] = start_switchyard(os.path.join(work, "baseline"), args.baseline, "baseline",
                                             balancer=args.balancer)
        names.insert(1, "baseline")
    try:
        time.sleep(1)
        for name in names:
            h2load_grpc(PORTS[name], 1, body, args.variant)
        results = {name: [] for name in names}
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else list(reversed(names))
            for name in order:
                pids = session_pids(procs[name].pid) if name in procs else []
                before = cpu_seconds(pids)
                counted = backend_calls()
                rps, total, bad, mib = h2load_grpc(PORTS[name], args.seconds, body, args.variant)
                cpu = cpu_seconds(pids) - before if pids else float("nan")
                shares = spread(counted, backend_calls())
                results[name].append({"rps": rps, "cpu": cpu * 1e6 / max(total, 1), "bad": bad, "mib": mib,
                                      "gib_ms": cpu * 1e3 / max(mib * args.seconds / 1024, 1e-9),
                                      "spread": shares})
                print(f"round {rnd} {name}: {rps:.0f} calls/s, {mib:.0f} MiB/s, {cpu * 1e6 / max(total, 1):.1f} us CPU/call, "
                      f"spread {'/'.join(f'{x:.0f}' for x in shares)}%, bad {bad}", file=sys.stderr)
        med = statistics.median
        load = " ".join(VARIANTS[args.variant][0])
        print(f"\nW-grpc ({args.variant}): h2load {load} -t1 -D{args.seconds}, {args.rounds} rounds, "
              f"alternating order; nproc={os.cpu_count()}")
        if args.variant == "stream":
            print("| candidate | MiB/s | CPU ms/GiB | MiB/s ÷ HAProxy | CPU ÷ HAProxy | MiB/s ÷ nginx | failed |")
            keys = ("mib", "gib_ms")
        else:
            print("| candidate | calls/s | CPU µs/call | calls/s ÷ HAProxy | CPU ÷ HAProxy | calls/s ÷ nginx | "
                  "failed | spread over backends (%) |")
            keys = ("rps", "cpu")
        print("|---|---|---|---|---|---|---|" + ("" if args.variant == "stream" else "---|"))
        for name in names:
            r = results[name]
            ratio = lambda peer, key: med([a[key] / b[key] if b[key] else float("nan")
                                           for a, b in zip(r, results[peer])])
            shares = "/".join(f"{med([x['spread'][i] for x in r]):.0f}" for i in range(len(GRPC)))
            print(f"| {name} | {med([x[keys[0]] for x in r]):.0f} | {med([x[keys[1]] for x in r]):.1f} | "
                  f"{ratio('haproxy', keys[0]):.2f}× | {ratio('haproxy', keys[1]):.2f}× | "
                  f"{ratio('nginx', keys[0]):.2f}× | {sum(x['bad'] for x in r)} |"
                  + ("" if args.variant == "stream" else f" {shares} |"))
    finally:
        stop_all(list(procs.values()) + [backends], work)


if __name__ == "__main__":
    main()
