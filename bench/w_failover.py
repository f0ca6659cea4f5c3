#!/usr/bin/env python3
"""W-failover (issue 29): two datacenters on loopback, one agent each, service
`web` with three endpoints in each; W-http load (`wrk -t1 -c50`) through
dc1's proxy while every dc1 endpoint fails (its TTL check turns critical) and
recovers, `--cycles` times.

Measured:
- failed requests under load (wrk's non-2xx and socket errors) over all cycles;
- switch time: from the acknowledgment of the write that fails dc1's last
  endpoint to the first answer from dc2 seen by a probe client (a keep-alive
  connection asking every ~1 ms), and back after the first endpoint passes;
- remote change to dc1's DNS: from the acknowledgment of a registration in
  dc2 to the first answer of `probe.service.dc2.consul` from dc1 that holds it;
- the cost of a remote copy: dc1's RSS before and after `--copies` services of
  `--endpoints` endpoints each are asked for in DNS.

dc1's endpoints are the origin nginx (18081-18083, "hello, world"), dc2's a
second nginx (18181-18183, "dc2"). No peer runs this; Consul's documented
behaviour is in bench/RESULTS.md beside the figures.

Usage: bench/w_failover.py [--binary target/release/switchyard] [--cycles 20]
       [--copies 1000] [--endpoints 10]
       (W_FAILOVER_ACCESS_LOG=FILE: dc1's proxy logs every request there)
Needs: apt-get install -y nginx wrk
"""

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import peers
from peers import BACKENDS, require_binary, spawn, start_backends, stop_all

DC2_BACKENDS = [18181, 18182, 18183]
PROXY = 18080


def start_dc2_backends(work):
    listens = "".join(f"listen 127.0.0.1:{p} reuseport;" for p in DC2_BACKENDS)
    conf = os.path.join(work, "dc2-backends.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {work}/dc2-backends.pid; error_log {work}/dc2-backends.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  server {{ {listens} location / {{ return 200 "dc2\\n"; }} }} }}
""")
    return spawn(["nginx", "-c", conf])


def start_agent(work, binary, name, config, http):
    conf = os.path.join(work, f"{name}.toml")
    with open(conf, "w") as f:
        f.write(config)
    argv = [binary, "agent", "--config", conf, "--api-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0",
            "--http-addr", http, "--proxy-threads", "2", "--data-dir", os.path.join(work, f"data-{name}"),
            "--node-name", name]
    proc = spawn(argv, stdout=subprocess.PIPE, text=True)
    return proc, json.loads(proc.stdout.readline())


def call(api, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{api}{path}", data=data, method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def dns_query(addr, name):
    """A records of `name` from the DNS server at `addr` (host, port)."""
    qid = random.randrange(65536)
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        packet += bytes([len(label)]) + label.encode()
    packet += b"\0" + struct.pack(">HH", 1, 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3)
    try:
        sock.sendto(packet, addr)
        data, _ = sock.recvfrom(4096)
    except OSError:
        return None
    finally:
        sock.close()
    ancount = struct.unpack(">H", data[6:8])[0]
    at = len(packet)
    ips = []
    for _ in range(ancount):
        if data[at] & 0xC0 == 0xC0:
            at += 2
        else:
            while data[at]:
                at += data[at] + 1
            at += 1
        rtype, _, _, rdlen = struct.unpack(">HHIH", data[at:at + 10])
        at += 10
        if rtype == 1 and rdlen == 4:
            ips.append(socket.inet_ntoa(data[at:at + 4]))
        at += rdlen
    return ips


class Probe:
    """A keep-alive client asking dc1's proxy every ~1 ms; `wait_for(text)`
    returns when an answer's body is `text`, with the time it came."""

    def __init__(self):
        self.conn = http.client.HTTPConnection("127.0.0.1", PROXY, timeout=5)

    def ask(self):
        try:
            self.conn.request("GET", "/", headers={"Host": "web"})
            response = self.conn.getresponse()
            return response.status, response.read().decode()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", PROXY, timeout=5)
            return 0, ""

    def wait_for(self, text, within=10.0):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            status, body = self.ask()
            if status == 200 and body == text:
                return time.monotonic()
            time.sleep(0.001)
        return None


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/switchyard")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--copies", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    args = parser.parse_args()
    require_binary(args.binary)
    work = tempfile.mkdtemp(prefix="w-failover-")
    procs = [start_backends(work), start_dc2_backends(work)]
    try:
        dc2, ready2 = start_agent(work, args.binary, "dc2", '[agent]\ndatacenter = "dc2"\n', "127.0.0.1:0")
        procs.append(dc2)
        api2 = ready2["api"]
        call(api2, "PUT", "/v1/switchyard/batch", {
            "nodes": [{"name": "dc2-backends", "address": "127.0.0.1"}],
            "endpoints": [{"node": "dc2-backends", "service": "web", "id": f"web-{p}", "port": p}
                          for p in DC2_BACKENDS]})
        log = os.environ.get("W_FAILOVER_ACCESS_LOG")
        access = f'[http]\naccess_log = "{log}"\n' if log else ""
        dc1, ready1 = start_agent(work, args.binary, "dc1", f"""[agent]
datacenter = "dc1"
[federation]
failover = ["dc2"]
probe_interval = "500ms"
[[federation.datacenters]]
name = "dc2"
api = ["{api2}"]
{access}[[http.routes]]
service = "web"
""", f"127.0.0.1:{PROXY}")
        procs.append(dc1)
        api1 = ready1["api"]
        dns1 = ready1["dns"].rsplit(":", 1)
        dns1 = (dns1[0], int(dns1[1]))
        for p in BACKENDS:
            call(api1, "PUT", "/v1/agent/service/register",
                 {"Name": "web", "ID": f"web-{p}", "Address": "127.0.0.1", "Port": p, "Check": {"TTL": "1h"}})
            call(api1, "PUT", f"/v1/agent/check/pass/service:web-{p}")
        probe = Probe()
        if probe.wait_for("hello, world\n") is None:
            sys.exit("dc1's proxy does not answer from dc1's endpoints")
        # dc2 measured reachable before the first failure.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = json.loads(call(api1, "GET", "/v1/switchyard/datacenters"))
            if any(r["name"] == "dc2" and r["reachable"] for r in rows):
                break
            time.sleep(0.1)

        # Failover and failback under load.
        seconds = max(4, args.cycles // 2 + 2)
        out = {}

        def load():
            out["wrk"] = subprocess.run(["wrk", "-t1", "-c50", f"-d{seconds * 2 + args.cycles}s", "--latency",
                                         f"http://127.0.0.1:{PROXY}/"], capture_output=True, text=True).stdout

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(1)
        to_dc2, back = [], []
        for _ in range(args.cycles):
            for p in BACKENDS:
                call(api1, "PUT", f"/v1/agent/check/fail/service:web-{p}")
            acked = time.monotonic()
            seen = probe.wait_for("dc2\n")
            to_dc2.append((seen - acked) * 1000 if seen else float("inf"))
            time.sleep(0.25)
            call(api1, "PUT", f"/v1/agent/check/pass/service:web-{BACKENDS[0]}")
            acked = time.monotonic()
            seen = probe.wait_for("hello, world\n")
            back.append((seen - acked) * 1000 if seen else float("inf"))
            for p in BACKENDS[1:]:
                call(api1, "PUT", f"/v1/agent/check/pass/service:web-{p}")
            time.sleep(0.25)
        loader.join()
        text = out.get("wrk", "")
        total = int(__import__("re").search(r"(\d+) requests in", text).group(1))
        non2xx = __import__("re").search(r"Non-2xx or 3xx responses: (\d+)", text)
        sock = __import__("re").search(r"Socket errors: (.*)", text)

        metrics = call(api1, "GET", "/metrics").decode()
        refused = {line.split("reason=\"")[1].split("\"")[0]: line.rsplit(" ", 1)[1]
                   for line in metrics.splitlines()
                   if line.startswith("switchyard_proxy_rejected_total{") and not line.endswith(" 0")}

        # A remote change reaching dc1's DNS.
        call(api2, "PUT", "/v1/agent/service/register", {"Name": "probe", "ID": "probe-0", "Address": "10.7.0.1", "Port": 1})
        dns_query(dns1, "probe.service.dc2.consul")
        changes = []
        for i in range(1, args.changes + 1):
            address = f"10.7.{i // 250}.{i % 250 + 1}"
            call(api2, "PUT", "/v1/agent/service/register",
                 {"Name": "probe", "ID": f"probe-{i}", "Address": address, "Port": 1})
            acked = time.monotonic()
            while time.monotonic() - acked < 10:
                if address in (dns_query(dns1, "probe.service.dc2.consul") or []):
                    break
                time.sleep(0.0005)
            changes.append((time.monotonic() - acked) * 1000)

        # The cost of copies.
        batch = {"nodes": [{"name": f"n{j}", "address": f"10.8.{j // 250}.{j % 250 + 1}"} for j in range(args.endpoints)],
                 "endpoints": [{"node": f"n{j}", "service": f"svc{i}", "id": f"svc{i}-{j}", "port": 80}
                               for i in range(args.copies) for j in range(args.endpoints)]}
        call(api2, "PUT", "/v1/switchyard/batch", batch)
        before = rss_kib(dc1.pid)
        started = time.monotonic()
        for i in range(args.copies):
            dns_query(dns1, f"svc{i}.service.dc2.consul")
        made = time.monotonic() - started
        time.sleep(1)
        after = rss_kib(dc1.pid)

        print(f"\nW-failover: wrk -t1 -c50 through dc1's proxy, {args.cycles} failover/failback cycles "
              f"(all 3 dc1 endpoints' TTL checks failed, then passed); nproc={os.cpu_count()}")
        print("| measure | value |")
        print("|---|---|")
        print(f"| requests under load | {total} |")
        print(f"| failed requests (non-2xx, socket errors) | {non2xx.group(1) if non2xx else 0}, {sock.group(1) if sock else 'none'} |")
        print(f"| requests the proxy answered itself, by reason | {refused or 'none'} |")
        print(f"| switch to dc2 after the last fail's ack: median / p99 / max | "
              f"{statistics.median(to_dc2):.1f} / {percentile(to_dc2, 99):.1f} / {max(to_dc2):.1f} ms |")
        print(f"| back to dc1 after the first pass's ack: median / p99 / max | "
              f"{statistics.median(back):.1f} / {percentile(back, 99):.1f} / {max(back):.1f} ms |")
        print(f"| a dc2 registration in dc1's DNS ({len(changes)} changes): median / p99 / max | "
              f"{statistics.median(changes):.1f} / {percentile(changes, 99):.1f} / {max(changes):.1f} ms |")
        print(f"| copies of {args.copies} services x {args.endpoints} endpoints: made in | {made:.2f} s "
              f"({made / args.copies * 1000:.2f} ms each, first DNS query included) |")
        print(f"| dc1 RSS for them | {(after - before) / 1024:.1f} MiB "
              f"({(after - before) * 1024 / args.copies:.0f} B per service, "
              f"{(after - before) * 1024 / (args.copies * args.endpoints):.0f} B per endpoint) |")
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
