#!/usr/bin/env python3
"""W-dns (shared/WORKLOADS.md): Switchyard beside NSD and Knot, alternating rounds.

1,000 services x 3 endpoints; queries 50% A, 30% SRV, 20% NXDOMAIN; dnsperf
-c 4 -q 200 -l 8 per run. Reports the median of each figure and the paired
ratio (candidate / peer within a round, then the median). Server CPU per
query comes from /proc/PID/stat (utime + stime) around each run.

Usage: bench/w_dns.py [--rounds 7] [--seconds 8] [--policy batch|normal]
                     [--peer-policy normal|batch]   (after cargo build --release)
Needs: apt-get install -y nsd knot dnsperf dnsutils
"""

import argparse
import json
import os
import random
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

PORTS = {"switchyard": 15353, "nsd": 15354, "knot": 15355}


def addr(n, k):
    return f"10.{k}.{n // 250}.{n % 250 + 1}"


def zone_text():
    lines = [
        "$ORIGIN consul.",
        "$TTL 0",
        "@ IN SOA ns.consul. hostmaster.consul. 1 3600 600 86400 0",
        "@ IN NS ns.consul.",
        "ns IN A 127.0.0.1",
    ]
    for n in range(1000):
        for k in (1, 2, 3):
            lines.append(f"svc-{n}.service IN A {addr(n, k)}")
            lines.append(f"svc-{n}.service IN SRV 1 1 {8000 + n % 100} ep-{n}-{k}.node.dc1.consul.")
            lines.append(f"ep-{n}-{k}.node.dc1 IN A {addr(n, k)}")
    return "\n".join(lines) + "\n"


def batch_json():
    nodes, endpoints = [], []
    for n in range(1000):
        for k in (1, 2, 3):
            nodes.append({"name": f"ep-{n}-{k}", "address": addr(n, k)})
            endpoints.append({"node": f"ep-{n}-{k}", "service": f"svc-{n}", "id": f"svc-{n}-{k}", "port": 8000 + n % 100})
    return json.dumps({"nodes": nodes, "endpoints": endpoints})


def queries_text():
    rng = random.Random(42)
    out = []
    for _ in range(100_000):
        r = rng.random()
        n = rng.randrange(1000)
        if r < 0.5:
            out.append(f"svc-{n}.service.consul A")
        elif r < 0.8:
            out.append(f"svc-{n}.service.consul SRV")
        else:
            out.append(f"nosuch-{n}.service.consul A")
    return "\n".join(out) + "\n"


def wait_dns(port, name="svc-1.service.consul"):
    deadline = time.time() + 20
    while time.time() < deadline:
        out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), name, "A", "+short", "+time=1", "+tries=1"],
                             capture_output=True, text=True).stdout
        if out.strip():
            return out
        time.sleep(0.2)
    sys.exit(f"server on port {port} does not answer")


def dnsperf(port, qfile, seconds):
    out = subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", qfile, "-l", str(seconds),
                          "-c", "4", "-q", "200"], capture_output=True, text=True).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    lat = float(re.search(r"Average Latency \(s\):\s+([\d.]+)", out).group(1))
    completed = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))
    return qps, lat, completed, lost


def start_switchyard(work, binary, udp_workers, policy):
    conf = os.path.join(work, "switchyard.toml")
    with open(conf, "w") as f:
        f.write(f"[dns]\nudp_workers = {udp_workers}\nthread_policy = \"{policy}\"\n")
    proc = subprocess.Popen([binary, "agent", "--api-addr", "127.0.0.1:0", "--dns-addr", f"127.0.0.1:{PORTS['switchyard']}",
                             "--data-dir", os.path.join(work, "sy-data"), "--node-name", "bench", "--config", conf],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    ready = json.loads(proc.stdout.readline())
    req = urllib.request.Request(f"http://{ready['api']}/v1/switchyard/batch", data=batch_json().encode(), method="PUT")
    urllib.request.urlopen(req).read()
    return proc, ready["api"]


def peer_command(argv, policy):
    """`argv` under the peers' scheduling policy: `batch` runs it with `chrt -b 0`."""
    return ["chrt", "-b", "0"] + argv if policy == "batch" else argv


def start_nsd(work, zone, workers, policy):
    conf = os.path.join(work, "nsd.conf")
    with open(conf, "w") as f:
        f.write(f"""server:
  ip-address: 127.0.0.1@{PORTS['nsd']}
  server-count: {workers}
  reuseport: yes
  rrl-ratelimit: 0
  username: ""
  zonesdir: "{work}"
  database: ""
  pidfile: "{work}/nsd.pid"
  xfrdfile: "{work}/xfrd.state"
  zonelistfile: "{work}/zone.list"
  logfile: "{work}/nsd.log"
  verbosity: 0
remote-control:
  control-enable: no
zone:
  name: consul.
  zonefile: {zone}
""")
    return subprocess.Popen(peer_command(["nsd", "-d", "-c", conf], policy), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def start_knot(work, zone, workers, policy):
    conf = os.path.join(work, "knot.conf")
    os.makedirs(os.path.join(work, "knot"), exist_ok=True)
    with open(conf, "w") as f:
        f.write(f"""server:
    listen: 127.0.0.1@{PORTS['knot']}
    udp-workers: {workers}
    tcp-workers: 1
    background-workers: 1
    rundir: "{work}/knot"
database:
    storage: "{work}/knot"
log:
  - target: stderr
    any: error
zone:
  - domain: consul.
    file: "{zone}"
    storage: "{work}/knot"
    semantic-checks: off
""")
    return subprocess.Popen(peer_command(["knotd", "-c", conf], policy), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def propagation(api, port, iterations):
    """Time from an API write's acknowledgment until a DNS answer shows it."""
    import socket
    import struct

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2)
    query = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    for label in ("prop", "service", "consul"):
        query += bytes([len(label)]) + label.encode()
    query += b"\x00" + struct.pack(">HH", 1, 1)
    body = lambda ip: json.dumps({"nodes": [{"name": "prop-node", "address": "10.250.0.1"}],
                                  "endpoints": [{"node": "prop-node", "service": "prop", "id": "prop-1",
                                                 "address": ip, "port": 80}]}).encode()
    delays = []
    for i in range(iterations):
        ip = f"10.251.{i // 250 % 250}.{i % 250 + 1}"
        want = bytes(int(x) for x in ip.split("."))
        req = urllib.request.Request(f"http://{api}/v1/switchyard/batch", data=body(ip), method="PUT")
        urllib.request.urlopen(req).read()
        acked = time.perf_counter()
        while True:
            sock.sendto(query, ("127.0.0.1", port))
            answer, _ = sock.recvfrom(4096)
            if want in answer[12:]:
                break
        delays.append((time.perf_counter() - acked) * 1e3)
    delays.sort()
    pick = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))]
    return pick(0.5), pick(0.99), delays[-1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--binary", default="target/release/switchyard")
    parser.add_argument("--propagation", type=int, default=1000, help="write-to-DNS samples (0 = skip)")
    parser.add_argument("--udp-workers", type=int, default=2, help="Switchyard's dns.udp_workers")
    parser.add_argument("--peer-workers", type=int, default=2, help="NSD's server-count and Knot's udp-workers")
    parser.add_argument("--policy", default="batch", choices=["batch", "normal"], help="Switchyard's dns.thread_policy")
    parser.add_argument("--peer-policy", default="normal", choices=["batch", "normal"],
                        help="batch runs NSD and Knot under chrt -b (a control: the same policy for everyone)")
    args = parser.parse_args()
    for tool in ("nsd", "knotd", "dnsperf", "dig"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install -y nsd knot dnsperf dnsutils")
    work = tempfile.mkdtemp(prefix="w-dns-")
    zone = os.path.join(work, "consul.zone")
    with open(zone, "w") as f:
        f.write(zone_text())
    qfile = os.path.join(work, "queries.txt")
    with open(qfile, "w") as f:
        f.write(queries_text())
    switchyard, api = start_switchyard(work, args.binary, args.udp_workers, args.policy)
    procs = {"switchyard": switchyard, "nsd": start_nsd(work, zone, args.peer_workers, args.peer_policy),
             "knot": start_knot(work, zone, args.peer_workers, args.peer_policy)}
    try:
        for name, port in PORTS.items():
            print(f"# {name} answers svc-1 A: {wait_dns(port).split()}", file=sys.stderr)
            srv = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "svc-1.service.consul", "SRV", "+short"],
                                 capture_output=True, text=True).stdout.split("\n")
            print(f"# {name} answers svc-1 SRV: {sorted(s for s in srv if s)}", file=sys.stderr)
        results = {name: [] for name in PORTS}
        for rnd in range(args.rounds):
            order = list(PORTS) if rnd % 2 == 0 else list(reversed(PORTS))
            for name in order:
                pids = session_pids(procs[name].pid)
                before = cpu_seconds(pids)
                qps, lat, completed, lost = dnsperf(PORTS[name], qfile, args.seconds)
                cpu = cpu_seconds(pids) - before
                results[name].append({"qps": qps, "lat": lat, "lost": lost, "cpu_us": cpu * 1e6 / max(completed, 1)})
                print(f"round {rnd} {name}: {qps:.0f} q/s, {lat * 1e6:.0f} us, lost {lost}, {cpu * 1e6 / max(completed, 1):.2f} us CPU/query",
                      file=sys.stderr)
        med = lambda xs: statistics.median(xs)
        print(f"| server | queries/s | mean latency | lost | CPU µs/query | q/s ÷ NSD | q/s ÷ Knot | CPU ÷ NSD | CPU ÷ Knot |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in PORTS:
            r = results[name]
            ratio = lambda peer, key: med([a[key] / b[key] for a, b in zip(r, results[peer])])
            print(f"| {name} | {med([x['qps'] for x in r]):.0f} | {med([x['lat'] for x in r]) * 1e6:.0f} µs | "
                  f"{sum(x['lost'] for x in r)} | {med([x['cpu_us'] for x in r]):.2f} | "
                  f"{ratio('nsd', 'qps'):.2f}× | {ratio('knot', 'qps'):.2f}× | {ratio('nsd', 'cpu_us'):.2f}× | {ratio('knot', 'cpu_us'):.2f}× |")
        print(f"\n{args.rounds} rounds of {args.seconds} s, alternating order; nproc={os.cpu_count()}; TTL 0 on every server; "
              f"switchyard udp_workers={args.udp_workers}, thread_policy={args.policy}; NSD and Knot "
              f"workers={args.peer_workers}, policy={args.peer_policy}.")
        if args.propagation:
            p50, p99, worst = propagation(api, PORTS["switchyard"], args.propagation)
            print(f"\nWrite acknowledged -> visible in a DNS answer ({args.propagation} samples, client-measured, "
                  f"includes one UDP round trip): p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {worst:.3f} ms")
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
