#!/usr/bin/env python3
"""Cluster faults (issue 28, item 4): nothing acknowledged is lost.

A real 3-member etcd cluster and 3 agents on loopback. One writer per agent
registers endpoints (and deregisters some of its own acknowledged ones)
through that agent's API for the whole run, while the harness injects, in
order: kill -9 of one etcd member and its restart; kill -9 of two members
(quorum lost) and their restart; kill -9 of an agent and its restart (on its
data directory); a partition of the third agent from etcd (every connection
it has to etcd goes through a relay here, which cuts them all and refuses new
ones, then heals; before that it delays, then pauses, the same traffic).
Monitors poll every agent's index (it must never go back
within one process), its staleness, its DNS (UDP) and its proxy.

Afterwards, once the agents agree on the catalog index: every acknowledged
write must be present on every agent (an acknowledged deregistration absent),
no refused registration may appear (a ghost), and the sets must be equal.

Usage: bench/faults.py [--seconds 45]   (after cargo build --release -p switchyard)
Needs: apt-get install -y etcd-server
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

PREFIX = "/faults"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    def __init__(self, work, name, client, peer, cluster):
        self.work, self.name, self.client, self.peer, self.cluster = work, name, client, peer, cluster
        self.proc = None

    def url(self):
        return f"http://127.0.0.1:{self.client}"

    def start(self, state="new", extra=()):
        peer = f"http://127.0.0.1:{self.peer}"
        self.proc = subprocess.Popen(
            ["etcd", *extra, "--name", self.name, "--data-dir", os.path.join(self.work, self.name),
             "--listen-client-urls", self.url(), "--advertise-client-urls", self.url(),
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", self.cluster, "--initial-cluster-state", state],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def kill(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class Relay:
    """TCP relay 127.0.0.1:port -> target that can be paused (bytes held,
    connections kept), delayed (each chunk held `delay` s), cut (every
    connection closed, new ones refused) and healed."""

    def __init__(self, target):
        self.target = target
        self.port = free_port()
        self.flowing = threading.Event()
        self.flowing.set()
        self.delay = 0.0
        self.conns = []
        self.lock = threading.Lock()
        self.listener = None
        self.listen()

    def listen(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(128)
        threading.Thread(target=self.accept, args=(self.listener,), daemon=True).start()

    def accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    def pipe(self, a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                self.flowing.wait()
                if self.delay:
                    time.sleep(self.delay)
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def partition(self):
        # shutdown wakes the thread blocked in accept (close alone does not).
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.conns = []

    def heal(self):
        self.listen()

    def pause(self):
        self.flowing.clear()

    def slow(self, delay):
        self.delay = delay

    def resume(self):
        self.delay = 0.0
        self.flowing.set()


class Agent:
    def __init__(self, work, binary, name, endpoints, request_timeout="2s"):
        self.work, self.binary, self.name = work, binary, name
        self.conf = os.path.join(work, f"{name}.toml")
        with open(self.conf, "w") as f:
            f.write('[store]\nkind = "etcd"\nendpoints = %s\nprefix = "%s"\nlease_ttl = "2s"\n'
                    'request_timeout = "%s"\n' % (json.dumps(endpoints), PREFIX, request_timeout))
        self.proc, self.api, self.dns, self.http = None, None, None, None
        self.generation = 0

    def start(self):
        proc = subprocess.Popen(
            [self.binary, "agent", "--config", self.conf, "--data-dir", os.path.join(self.work, f"data-{self.name}"),
             "--node-name", self.name, "--api-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0",
             "--http-addr", "127.0.0.1:0", "--proxy-threads", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        ready = json.loads(proc.stdout.readline())
        self.api, self.dns, self.http = ready["api"], ready["dns"], ready["http"]
        self.generation += 1
        self.proc = proc

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def request(self, method, path, body=None, timeout=60):
        req = urllib.request.Request(f"http://{self.api}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers
        except ConnectionRefusedError:
            return 0, b"refused: the agent is down", {}
        except (urllib.error.URLError, OSError) as e:
            if isinstance(getattr(e, "reason", None), ConnectionRefusedError):
                return 0, b"refused: the agent is down", {}
            return None, str(e).encode(), {}


class Book:
    """What the writers did: per id, the last acknowledged state; refused
    and unknown outcomes."""

    def __init__(self):
        self.lock = threading.Lock()
        self.present = {}  # id -> True (registered) / False (deregistered), acknowledged
        self.refused = set()  # registrations refused: must never appear
        self.uncertain = set()  # ids whose last write's outcome is unknown
        self.why = {}  # refused id -> the answer
        self.unknown = 0
        self.down = 0  # refused by a dead agent's closed port: never sent
        self.attempted = self.acked = 0
        self.last_ok = time.time()
        self.longest_gap = 0.0

    def ok(self):
        now = time.time()
        self.longest_gap = max(self.longest_gap, now - self.last_ok)
        self.last_ok = now


def writer(agent, book, stop, rng):
    n = 0
    mine = []
    while not stop.is_set():
        n += 1
        deregister = mine and rng.random() < 0.2
        if deregister:
            victim = mine.pop(rng.randrange(len(mine)))
            body = {"deregister": [{"node": "n1", "id": victim}]}
            key = victim
        else:
            key = f"{agent.name}-{n}"
            body = {"nodes": [{"name": "n1", "address": "127.0.0.1"}],
                    "endpoints": [{"node": "n1", "service": "web", "id": key,
                                   "address": "127.0.0.1", "port": 20000 + n % 40000}]}
        status, text, _ = agent.request("PUT", "/v1/switchyard/batch", body)
        with book.lock:
            book.attempted += 1
            if status == 200:
                book.acked += 1
                book.ok()
                book.present[key] = not deregister
                if not deregister:
                    mine.append(key)
            elif status == 0:
                book.down += 1
                if deregister:
                    mine.append(victim)
            elif b"outcome is unknown" in text or status is None:
                # Applied or not: this id is not checked either way.
                book.unknown += 1
                book.present.pop(key, None)
                book.uncertain.add(key)
            else:
                if deregister:
                    mine.append(victim)  # still registered
                else:
                    book.refused.add(key)
                    book.why[key] = f"{status} {text[:300]!r} at {time.strftime('%H:%M:%S')} via {agent.name}"
        if status != 200:
            time.sleep(0.05)


def dns_query(port, name="web.service.consul"):
    qid = random.randrange(65536)
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        s.sendto(header + question, ("127.0.0.1", port))
        data, _ = s.recvfrom(4096)
        return data[:2] == struct.pack(">H", qid)


def monitor(agents, stop, seen):
    last = {}
    while not stop.is_set():
        for a in agents:
            if a.proc is None or a.proc.poll() is not None:
                continue
            status, text, headers = a.request("GET", "/v1/switchyard/status", timeout=2)
            if status == 200:
                state = json.loads(text).get("store_state", {})
                seen["staleness_ms"] = max(seen["staleness_ms"], state.get("staleness_ms", 0))
            status, _, headers = a.request("GET", "/v1/health/service/web", timeout=2)
            if status == 200:
                index = int(headers.get("X-Consul-Index", "0"))
                key = (a.name, a.generation)
                if index < last.get(key, 0):
                    seen["regressions"] += 1
                last[key] = index
            seen["dns"] += 1
            try:
                if not dns_query(int(a.dns.rsplit(":", 1)[1])):
                    seen["dns_failed"] += 1
            except OSError:
                seen["dns_failed"] += 1
            seen["proxy"] += 1
            try:
                host, port = a.http.rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=1) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\nConnection: close\r\n\r\n")
                    s.settimeout(1)
                    if not s.recv(64).startswith(b"HTTP/1.1 "):
                        seen["proxy_failed"] += 1
            except OSError:
                seen["proxy_failed"] += 1
        time.sleep(0.2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=45, help="length of the fault schedule")
    parser.add_argument("--binary", default="target/release/switchyard")
    args = parser.parse_args()
    if not shutil.which("etcd"):
        sys.exit("missing etcd: apt-get install -y etcd-server")
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"missing {args.binary}: cargo build --release -p switchyard")
    work = tempfile.mkdtemp(prefix="faults-")
    ports = [(free_port(), free_port()) for _ in range(3)]
    cluster = ",".join(f"e{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
    members = [Etcd(work, f"e{i}", c, p, cluster) for i, (c, p) in enumerate(ports)]
    for m in members:
        m.start()
    relays = [Relay(("127.0.0.1", m.client)) for m in members]
    agents = []
    stop = threading.Event()
    book = Book()
    seen = {"staleness_ms": 0, "regressions": 0, "dns": 0, "dns_failed": 0, "proxy": 0, "proxy_failed": 0}
    try:
        time.sleep(2)
        direct = [m.url() for m in members]
        via_relay = [f"http://127.0.0.1:{r.port}" for r in relays]
        agents = [Agent(work, args.binary, "a0", direct), Agent(work, args.binary, "a1", direct),
                  Agent(work, args.binary, "a2", via_relay)]
        for a in agents:
            a.start()
        threads = [threading.Thread(target=writer, args=(a, book, stop, random.Random(i)), daemon=True)
                   for i, a in enumerate(agents)]
        threads.append(threading.Thread(target=monitor, args=(agents, stop, seen), daemon=True))
        for t in threads:
            t.start()
        step = args.seconds / 11
        schedule = [
            ("kill -9 etcd e0", lambda: members[0].kill()),
            ("restart e0", lambda: members[0].start("existing")),
            ("kill -9 etcd e1 and e2 (quorum lost)", lambda: (members[1].kill(), members[2].kill())),
            ("restart e1 and e2", lambda: (members[1].start("existing"), members[2].start("existing"))),
            ("kill -9 agent a1", lambda: agents[1].kill()),
            ("restart agent a1", lambda: agents[1].start()),
            ("delay agent a2's etcd traffic 300 ms a chunk", lambda: [r.slow(0.3) for r in relays]),
            ("pause agent a2's etcd traffic", lambda: [r.pause() for r in relays]),
            ("resume it, then partition agent a2 from etcd",
             lambda: [(r.resume(), r.partition()) for r in relays]),
            ("heal the partition", lambda: [r.heal() for r in relays]),
        ]
        for what, act in schedule:
            time.sleep(step)
            print(f"{time.strftime('%H:%M:%S')} {what}", file=sys.stderr)
            act()
        time.sleep(step)
        stop.set()
        for t in threads:
            t.join(timeout=90)
        # Converged: every agent at the same index.
        deadline = time.time() + 60
        while time.time() < deadline:
            indexes = {a.request("GET", "/v1/health/service/web")[2].get("X-Consul-Index") for a in agents}
            if len(indexes) == 1 and None not in indexes:
                break
            time.sleep(0.5)
        views = []
        for a in agents:
            status, text, headers = a.request("GET", "/v1/catalog/service/web")
            views.append({e["ServiceID"] for e in json.loads(text)} if status == 200 else set())
        registered = {k for k, v in book.present.items() if v}
        deregistered = {k for k, v in book.present.items() if not v}
        missing = [sorted((registered - v) | (deregistered & v)) for v in views]
        lost = sum(len(m) for m in missing)
        if lost:
            print(f"lost: {missing}", file=sys.stderr)
        ghosts = sum(len(book.refused & v) for v in views)
        for key in sorted(set().union(*[book.refused & v for v in views])):
            print(f"ghost {key}: refused as {book.why.get(key)}", file=sys.stderr)
        same = all(v == views[0] for v in views)
        print(f"\nCluster faults: 3 etcd members, 3 agents, {args.seconds} s schedule; nproc={os.cpu_count()}")
        print("| writes attempted | acknowledged | refused | agent down | outcome unknown | lost | ghosts | agents agree | "
              "longest write gap | staleness seen | index regressions | DNS failed | proxy failed |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {book.attempted} | {book.acked} | {len(book.refused)} | {book.down} | {book.unknown} | {lost} | {ghosts} | "
              f"{'yes' if same else 'NO'} | {book.longest_gap:.1f} s | {seen['staleness_ms'] / 1000:.1f} s | "
              f"{seen['regressions']} | {seen['dns_failed']}/{seen['dns']} | {seen['proxy_failed']}/{seen['proxy']} |")
        if lost or ghosts or not same:
            sys.exit(1)
    finally:
        stop.set()
        for a in agents:
            if a.proc and a.proc.poll() is None:
                a.proc.send_signal(signal.SIGTERM)
                try:
                    a.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    a.proc.kill()
        for m in members:
            m.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
