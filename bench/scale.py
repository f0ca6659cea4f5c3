#!/usr/bin/env python3
"""Scale figures of cluster mode (issue 28, item 7).

N agents (default 20, one proxy thread each, DNS on) on one 3-member etcd
cluster, all on loopback. Reported:
- memory (RSS) and CPU per agent at idle, and while one writer makes
  `--rate` endpoint changes per second (ten batches a second through agent 0);
- the etcd members' CPU over the same phases (the watch fan-out to N agents);
- propagation: for every write, the time from its acknowledgment until each
  agent's blocking query on the service returns an index at least the
  write's (p50, p99, max over writes x agents);
- start-up: a catalog of `--catalog` endpoints loaded into etcd, then the
  time a new agent takes from its start to its ready line.

Usage: bench/scale.py [--agents 20] [--rate 1000] [--seconds 10] [--catalog 1000000]
   (after cargo build --release -p switchyard)
Needs: apt-get install -y etcd-server
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from faults import Agent, Etcd, free_port

HZ = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def put(api, body, timeout=60):
    req = urllib.request.Request(f"http://{api}/v1/switchyard/batch", data=json.dumps(body).encode(),
                                 method="PUT")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())["index"]


def measure(procs, seconds):
    """CPU seconds per second of each process over `seconds`."""
    before = [cpu_s(p.pid) for p in procs]
    time.sleep(seconds)
    return [(cpu_s(p.pid) - b) / seconds for p, b in zip(procs, before)]


def watcher(agent, seen, stop):
    """Blocking queries on service `scale`: (index, time) as each returns."""
    index = 0
    while not stop.is_set():
        try:
            with urllib.request.urlopen(
                    f"http://{agent.api}/v1/health/service/scale?index={index}&wait=2s", timeout=10) as r:
                index = int(r.headers.get("X-Consul-Index", index))
                seen.append((index, time.time()))
        except OSError:
            time.sleep(0.1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--rate", type=int, default=1000, help="endpoint changes per second")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--catalog", type=int, default=1_000_000, help="endpoints for the start-up figure")
    parser.add_argument("--binary", default="target/release/switchyard")
    args = parser.parse_args()
    if not shutil.which("etcd"):
        sys.exit("missing etcd: apt-get install -y etcd-server")
    args.binary = os.path.abspath(args.binary)
    work = tempfile.mkdtemp(prefix="scale-")
    ports = [(free_port(), free_port()) for _ in range(3)]
    cluster = ",".join(f"e{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
    members = [Etcd(work, f"e{i}", c, p, cluster) for i, (c, p) in enumerate(ports)]
    for m in members:
        m.start(extra=["--max-txn-ops", "20000", "--max-request-bytes", str(32 << 20),
                       "--quota-backend-bytes", str(8 << 30)])
    agents = []
    stop = threading.Event()
    try:
        time.sleep(2)
        urls = [m.url() for m in members]
        for i in range(args.agents):
            agent = Agent(work, args.binary, f"s{i}", urls, "30s")
            agent.start()
            agents.append(agent)
        procs = [a.proc for a in agents]
        etcds = [m.proc for m in members]
        time.sleep(3)
        idle_cpu = measure(procs + etcds, args.seconds)
        idle_rss = [rss_mib(p.pid) for p in procs]

        seen = [[] for _ in agents]
        watchers = [threading.Thread(target=watcher, args=(a, s, stop), daemon=True) for a, s in zip(agents, seen)]
        for t in watchers:
            t.start()
        writes = []
        # Ten batches a second, each a tenth of the rate.
        batches = 10
        per_batch = max(1, args.rate // batches)

        def write_load():
            n = 0
            end = time.time() + args.seconds
            while time.time() < end:
                started = time.time()
                for _ in range(batches):
                    # Half new endpoints, half removed: the service stays bounded.
                    ids = [f"e{(n + k) % 2000}" for k in range(per_batch)]
                    n += per_batch
                    if (n // 2000) % 2 == 0:
                        body = {"nodes": [{"name": "load", "address": "127.0.0.1"}],
                                "endpoints": [{"node": "load", "service": "scale", "id": i,
                                               "address": "127.0.0.1", "port": 30000} for i in ids]}
                    else:
                        body = {"deregister": [{"node": "load", "id": i} for i in ids]}
                    writes.append((put(agents[0].api, body), time.time()))
                rest = started + 1 - time.time()
                if rest > 0:
                    time.sleep(rest)

        loader = threading.Thread(target=write_load)
        before = [cpu_s(p.pid) for p in procs + etcds]
        t0 = time.time()
        loader.start()
        loader.join()
        elapsed = time.time() - t0
        load_cpu = [(cpu_s(p.pid) - b) / elapsed for p, b in zip(procs + etcds, before)]
        load_rss = [rss_mib(p.pid) for p in procs]
        time.sleep(3)
        stop.set()
        delays = []
        for s in seen:
            for index, acked in writes:
                arrival = next((t for i, t in s if i >= index), None)
                if arrival is not None:
                    delays.append(max(0.0, arrival - acked))
        delays.sort()
        achieved = len(writes) * per_batch / elapsed
        n = args.agents

        def pct(p):
            return delays[min(len(delays) - 1, int(p * len(delays)))] * 1000 if delays else float("nan")

        print(f"\nCluster scale: {n} agents (1 proxy thread each) on a 3-member etcd, all on {os.cpu_count()} cores")
        print("| phase | agent RSS MiB (median / max) | agent CPU % (median / max) | etcd CPU % (sum of 3) |")
        print("|---|---|---|---|")
        med = statistics.median
        print(f"| idle | {med(idle_rss):.1f} / {max(idle_rss):.1f} | {med(idle_cpu[:n]) * 100:.1f} / "
              f"{max(idle_cpu[:n]) * 100:.1f} | {sum(idle_cpu[n:]) * 100:.1f} |")
        print(f"| {achieved:.0f} changes/s | {med(load_rss):.1f} / {max(load_rss):.1f} | "
              f"{med(load_cpu[:n]) * 100:.1f} / {max(load_cpu[:n]) * 100:.1f} | {sum(load_cpu[n:]) * 100:.1f} |")
        print(f"\nPropagation to all {n} agents, {len(writes)} writes: p50 {pct(0.5):.0f} ms, "
              f"p99 {pct(0.99):.0f} ms, max {delays[-1] * 1000 if delays else float('nan'):.0f} ms "
              f"({len(delays)} of {len(writes) * n} arrivals seen)")

        if args.catalog > 0:
            for a in agents[1:]:
                a.kill()
            agents = agents[:1]
            loaded = 0
            t0 = time.time()
            chunk = 10_000
            while loaded < args.catalog:
                node = f"big{loaded // chunk}"
                body = {"nodes": [{"name": node, "address": "127.0.0.2"}],
                        "endpoints": [{"node": node, "service": f"svc{(loaded + k) % 1000}", "id": f"i{loaded + k}",
                                       "address": "127.0.0.2", "port": 40000} for k in range(chunk)]}
                put(agents[0].api, body, timeout=300)
                loaded += chunk
            load_s = time.time() - t0
            fresh = Agent(work, args.binary, "fresh", urls, "30s")
            t0 = time.time()
            fresh.start()
            start_s = time.time() - t0
            rss = rss_mib(fresh.proc.pid)
            agents.append(fresh)
            print(f"\nStart-up against {loaded} endpoints in etcd (loaded in {load_s:.0f} s, batches of {chunk}): "
                  f"ready in {start_s:.1f} s, RSS {rss:.0f} MiB")
    finally:
        stop.set()
        for a in agents:
            if a.proc and a.proc.poll() is None:
                a.proc.kill()
                a.proc.wait()
        for m in members:
            m.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
