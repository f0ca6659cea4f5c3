#!/usr/bin/env python3
"""W-churn on etcd (shared/WORKLOADS.md), beside the embedded store in the same run.

For each store:
- durable changes/s: `--endpoints` endpoints registered through agent A's batch
  API in batches of `--batch`, `--clients` clients at once; every batch is
  acknowledged only once durable (fsync for redb; an etcd transaction, which
  etcd commits to its raft log and fsyncs, for etcd);
- change-to-visibility: `--changes` single registrations, one at a time,
  through agent A; after each acknowledgment a client polls agent B's DNS
  (UDP, a fresh service name per change) until the endpoint is answered. For
  the embedded store there is no second agent sharing the catalog, so B is A
  itself (the figure is then the local publish path only).

etcd runs as one member on loopback with a temporary data dir, started with
--max-txn-ops and --max-request-bytes raised for the batches.

Usage: bench/w_churn_etcd.py [--endpoints 50000] [--batch 1000] [--clients 2]
       [--changes 300]        (after cargo build --release)
Needs: apt-get install -y etcd-server
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/switchyard")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, within=30.0):
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


def start_etcd(tmp):
    etcd = shutil.which("etcd")
    if not etcd:
        sys.exit("etcd not found: apt-get install -y etcd-server")
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    proc = subprocess.Popen(
        [etcd, "--name", "b0", "--data-dir", os.path.join(tmp, "etcd"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"b0=http://127.0.0.1:{peer}",
         "--max-txn-ops", "100000", "--max-request-bytes", "33554432"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "etcd.log"), "w"))
    wait_for("etcd", lambda: b'"health":"true"' in urllib.request.urlopen(url + "/health").read())
    return proc, url


def start_agent(tmp, name, store):
    conf = os.path.join(tmp, f"{name}.toml")
    with open(conf, "w") as f:
        f.write(store)
    proc = subprocess.Popen(
        [BIN, "agent", "--config", conf, "--node-name", name, "--data-dir",
         os.path.join(tmp, f"data-{name}"), "--api-addr", "127.0.0.1:0",
         "--dns-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--proxy-threads", "1"],
        stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, f"{name}.log"), "w"))
    ready = json.loads(proc.stdout.readline())
    host, port = ready["dns"].rsplit(":", 1)
    return proc, "http://" + ready["api"], (host, int(port))


def put(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status}")


def churn(api, endpoints, batch, clients):
    batches = [list(range(i, min(i + batch, endpoints))) for i in range(0, endpoints, batch)]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not batches:
                    return
                ids = batches.pop()
            node = f"node{ids[0] // batch}"
            body = {"nodes": [{"name": node, "address": "10.1.0.1"}],
                    "endpoints": [{"node": node, "service": f"svc{i % 1000}", "id": f"t{i}",
                                   "address": "10.1.0.1", "port": 1000 + i % 50000} for i in ids]}
            put(api + "/v1/switchyard/batch", body)

    started = time.time()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return endpoints / (time.time() - started)


def dns_query(name):
    qid = os.getpid() & 0xFFFF
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + qname + struct.pack(">HH", 1, 1)


def answered(sock, dns, packet):
    sock.sendto(packet, dns)
    data = sock.recv(4096)
    return struct.unpack(">H", data[6:8])[0] > 0


def visibility(api_a, dns_b, changes):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    delays = []
    for i in range(changes):
        service = f"vis{i}"
        body = {"nodes": [{"name": "visnode", "address": "10.2.0.1"}],
                "endpoints": [{"node": "visnode", "service": service, "id": f"v{i}",
                               "address": "10.2.0.1", "port": 80}]}
        packet = dns_query(f"{service}.service.consul")
        put(api_a + "/v1/switchyard/batch", body)
        acked = time.perf_counter()
        deadline = acked + 10
        while not answered(sock, dns_b, packet):
            if time.perf_counter() > deadline:
                sys.exit(f"{service} never became visible on B")
        delays.append((time.perf_counter() - acked) * 1000)
    delays.sort()
    return statistics.median(delays), delays[int(len(delays) * 0.99) - 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoints", type=int, default=50000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--changes", type=int, default=300)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="w-churn-etcd-")
    procs = []
    try:
        print(f"## machine: {os.cpu_count()} cores, {os.uname().release}, {time.strftime('%F')}")
        print(f"endpoints {args.endpoints}, batch {args.batch}, clients {args.clients}, "
              f"visibility samples {args.changes}\n")
        print("| store | durable changes/s | visibility p50 ms | visibility p99 ms | visible on |")
        print("|---|---|---|---|---|")
        a, api, dns = start_agent(tmp, "emb", '[store]\nkind = "embedded"\n')
        procs.append(a)
        rate = churn(api, args.endpoints, args.batch, args.clients)
        p50, p99 = visibility(api, dns, args.changes)
        print(f"| embedded (redb) | {rate:,.0f} | {p50:.2f} | {p99:.2f} | the same agent |")
        a.terminate()

        etcd, url = start_etcd(tmp)
        procs.append(etcd)
        conf = f'[store]\nkind = "etcd"\nendpoints = ["{url}"]\nprefix = "/bench"\n'
        a, api_a, _ = start_agent(tmp, "a", conf)
        b, _, dns_b = start_agent(tmp, "b", conf)
        procs += [a, b]
        rate = churn(api_a, args.endpoints, args.batch, args.clients)
        p50, p99 = visibility(api_a, dns_b, args.changes)
        print(f"| etcd (1 member) | {rate:,.0f} | {p50:.2f} | {p99:.2f} | a second agent |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
