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
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from procstat import cpu_seconds, session_pids

BACKENDS = [18081, 18082, 18083]
PORTS = {"switchyard": 18080, "nginx": 18084, "haproxy": 18085, "direct": 18081}


def start_backends(work):
    # nginx workers run as an unprivileged user: they must be able to read /big.
    os.chmod(work, 0o755)
    with open(os.path.join(work, "big"), "wb") as f:
        f.write(b"x" * 65536)
    os.chmod(os.path.join(work, "big"), 0o644)
    listens = "".join(f"listen 127.0.0.1:{p} reuseport;" for p in BACKENDS)
    conf = os.path.join(work, "backends.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {work}/backends.pid; error_log {work}/backends.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  server {{ {listens}
    location = /big {{ alias {work}/big; default_type application/octet-stream; }}
    location / {{ return 200 "hello, world\\n"; }} }} }}
""")
    return subprocess.Popen(["nginx", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def start_nginx(work):
    servers = "".join(f"server 127.0.0.1:{p};" for p in BACKENDS)
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 2; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream app {{ {servers} keepalive 64; }}
  server {{ listen 127.0.0.1:{PORTS['nginx']} reuseport;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}
""")
    return subprocess.Popen(["nginx", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def start_haproxy(work):
    servers = "\n".join(f"  server b{p} 127.0.0.1:{p}" for p in BACKENDS)
    conf = os.path.join(work, "haproxy.cfg")
    with open(conf, "w") as f:
        f.write(f"""global
  nbthread 2
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:{PORTS['haproxy']}
  default_backend be
backend be
  balance roundrobin
{servers}
""")
    return subprocess.Popen(["haproxy", "-f", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def start_switchyard(work, binary):
    conf = os.path.join(work, "switchyard.toml")
    with open(conf, "w") as f:
        f.write(os.environ.get("SY_EXTRA", "") + "\n[[http.routes]]\nservice = \"web\"\n")
    proc = subprocess.Popen([binary, "agent", "--config", conf, "--api-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0",
                             "--http-addr", f"127.0.0.1:{PORTS['switchyard']}", "--proxy-threads", "2",
                             "--data-dir", os.path.join(work, "sy-data"), "--node-name", "bench"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    ready = json.loads(proc.stdout.readline())
    register_backends(ready["api"])
    return proc


def require_binary(path):
    """Exits with a clear message, before anything is started, when the agent
    binary is missing (the default path is relative to the repository root)."""
    if not os.access(path, os.X_OK):
        sys.exit(f"no agent binary at {path}: run from the repository root after "
                 "`cargo build --release`, or pass --binary")


def register_backends(api):
    """Registers the W-http backends as service `web` through the agent at `api`."""
    batch = {"nodes": [{"name": "backends", "address": "127.0.0.1"}],
             "endpoints": [{"node": "backends", "service": "web", "id": f"web-{p}", "port": p} for p in BACKENDS]}
    req = urllib.request.Request(f"http://{api}/v1/switchyard/batch", data=json.dumps(batch).encode(),
                                 method="PUT")
    urllib.request.urlopen(req).read()


def wait_http(port, path):
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                if r.status == 200:
                    return len(r.read())
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"nothing answers on port {port}")


def to_ms(text):
    match = re.match(r"([\d.]+)(us|ms|s)$", text)
    if not match:
        print(f"# unreadable latency {text!r}", file=sys.stderr)
        return float("nan")
    value, unit = match.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(port, path, connections, seconds):
    url = f"http://127.0.0.1:{port}{path}"
    subprocess.run(["wrk", "-t1", f"-c{connections}", "-d1s", url], capture_output=True)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p99_line = re.search(r"^\s*99%\s+(\S+)", out, re.M)
    if not p99_line:
        print(f"# wrk printed no latency distribution:\n{out}", file=sys.stderr)
    p99 = to_ms(p99_line.group(1)) if p99_line else float("nan")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return rps, total, p99, int(errors.group(1)) if errors else 0, socket_errors.group(1) if socket_errors else ""


# A run in which the hypervisor stole more than this share of the machine's
# time measures the host's other guests, not the candidate: it is run again.
MAX_STEAL = float(os.environ.get("BENCH_MAX_STEAL", "0.05"))


def steal_and_total_ticks():
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return fields[7], sum(fields)


def measured_wrk(port, path, connections, seconds, pids, tries=4):
    """`wrk`, plus the CPU µs per request of `pids` (nan without pids) and the
    share of machine time stolen meanwhile; a run with more than MAX_STEAL
    stolen is repeated, up to `tries` runs in all (the last one is kept)."""
    for attempt in range(tries):
        steal0, total0 = steal_and_total_ticks()
        before = cpu_seconds(pids)
        rps, total, p99, bad, sock = wrk(port, path, connections, seconds)
        cpu_us = (cpu_seconds(pids) - before) * 1e6 / max(total, 1) if pids else float("nan")
        steal1, total1 = steal_and_total_ticks()
        steal = (steal1 - steal0) / max(total1 - total0, 1)
        if steal <= MAX_STEAL or attempt == tries - 1:
            return rps, total, p99, bad, sock, cpu_us, steal
        print(f"# {steal:.0%} of the machine stolen by the hypervisor: run again", file=sys.stderr)


def stop_all(procs, work):
    """SIGTERM every process, wait (bounded), kill stragglers, remove `work`."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(work, ignore_errors=True)


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
