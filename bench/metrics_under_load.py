#!/usr/bin/env python3
"""/metrics under full proxy load (issue: operators' view).

Switchyard proxies `wrk -t1 -c64` to three nginx backends (two proxy threads
on the two cores, as in W-http) while this script scrapes `/metrics` twice
every 50 ms: once on the API address (served by the agent's runtime) and once
on `api.metrics_addr` (a thread and runtime of its own). Reported: scrape
latency p50/p99/max for each, idle and under load, and the ratio under load ÷
idle for the same listener in the same run.

Usage: bench/metrics_under_load.py [--seconds 20] [--connections 64]
       (after cargo build --release)
Needs: apt-get install -y nginx wrk
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from peers import start_backends, stop_all, wait_http
from peers import start_switchyard as start_agent

PROXY_PORT = 18080


def start_switchyard(work, binary):
    config = '[api]\nmetrics_addr = "127.0.0.1:0"\n[[http.routes]]\nservice = "web"\n'
    return start_agent(work, binary, config, ["--http-addr", f"127.0.0.1:{PROXY_PORT}"])


def scrape(addr):
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        body = r.read()
    if b"switchyard_proxy_requests_total" not in body:
        sys.exit(f"{addr}/metrics lacks the proxy's series")
    return (time.perf_counter() - started) * 1e3


def sample(addrs, seconds):
    """Scrapes each address every 50 ms for `seconds`; latencies in ms per address."""
    out = {a: [] for a in addrs}
    deadline = time.time() + seconds
    while time.time() < deadline:
        for a in addrs:
            out[a].append(scrape(a))
        time.sleep(0.05)
    return out


def summary(values):
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return statistics.median(values), p99, values[-1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--binary", default="target/release/switchyard")
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install -y nginx wrk")
    work = tempfile.mkdtemp(prefix="metrics-load-")
    backends = start_backends(work)
    agent, ready = start_switchyard(work, args.binary)
    try:
        wait_http(PROXY_PORT, "/")
        addrs = {"api": ready["api"], "metrics_addr": ready["metrics"]}
        idle = sample(list(addrs.values()), min(args.seconds, 10))
        load = subprocess.Popen(["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds + 2}s",
                                 f"http://127.0.0.1:{PROXY_PORT}/"], stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        busy = sample(list(addrs.values()), args.seconds)
        wrk_out = load.communicate(timeout=args.seconds + 30)[0]
        rps = next((line.split()[1] for line in wrk_out.splitlines() if line.startswith("Requests/sec")), "?")
        print(f"\n/metrics under load: wrk -t1 -c{args.connections} at the proxy ({rps} req/s), "
              f"scrapes every 50 ms for {args.seconds}s; nproc={os.cpu_count()}")
        print("| listener | idle p50 / p99 / max (ms) | under load p50 / p99 / max (ms) | p99 ratio load ÷ idle |")
        print("|---|---|---|---|")
        for name, addr in addrs.items():
            i, b = summary(idle[addr]), summary(busy[addr])
            print(f"| {name} | {i[0]:.2f} / {i[1]:.2f} / {i[2]:.2f} | {b[0]:.2f} / {b[1]:.2f} / {b[2]:.2f} | "
                  f"{b[1] / i[1]:.1f}× |")
    finally:
        stop_all([agent, backends], work)


if __name__ == "__main__":
    main()
