#!/usr/bin/env python3
"""W-kv (issue 30): durable KV writes beside etcd, blocking-read wake latency,
and lock hand-over.

Both servers run on this machine with their data on the same disk: the agent
on its embedded store (every write fsynced before it is acknowledged, group
commit) and one etcd member (its WAL fsynced per batch). Each gets the same
writes over HTTP/1.1 from the same client, etcd through its own JSON gateway
(`/v3/kv/put`, `/v3/kv/txn`, `/v3/watch`):

- single key: `wrk` PUTs one key over 16 connections;
- many keys: the same with a new key per request;
- CAS loop: 8 contenders each read the key and write it back only if it did
  not change (Consul's `?cas=`, etcd's transaction on mod_revision); the
  figure is successful writes/s;
- wake: a reader blocks on the key (Consul's `?index=`, an etcd watch), a
  writer on another connection changes it; the time from sending the write
  to the reader's answer arriving (one thread, `select`; 200 samples);
- lock hand-over (ours only): a holder's session is destroyed (or its linked
  check fails); the time until a waiting contender holds the lock (lock delay
  0, 50 samples each).

Rounds alternate which server goes first. Server CPU per write from /proc.

Usage: bench/w_kv.py [--rounds 3] [--seconds 8]   (after cargo build --release)
Needs: apt-get install -y etcd-server wrk
"""

import argparse
import base64
import http.client
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from procstat import cpu_seconds
from w_churn_etcd import free_port, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/switchyard")


class Client:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method, path, body=None):
        self.conn.request(method, path, body=body)
        r = self.conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def b64(data):
    return base64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()


def start_etcd(tmp):
    etcd = shutil.which("etcd")
    if not etcd:
        sys.exit("etcd not found: apt-get install -y etcd-server")
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    proc = subprocess.Popen(
        [etcd, "--name", "k0", "--data-dir", os.path.join(tmp, "etcd"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"k0=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "etcd.log"), "w"))
    wait_for("etcd", lambda: Client(client).call("GET", "/health")[0] == 200)
    return proc, client


def start_agent(tmp):
    if not os.access(BIN, os.X_OK):
        sys.exit(f"no agent binary at {BIN}: cargo build --release first")
    proc = subprocess.Popen(
        [BIN, "agent", "--node-name", "kv", "--data-dir", os.path.join(tmp, "sy-data"),
         "--api-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
         "--proxy-threads", "1"],
        stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, "agent.log"), "w"))
    ready = json.loads(proc.stdout.readline())
    return proc, int(ready["api"].rsplit(":", 1)[1])


LUA = {
    # A new value each time: an identical rewrite changes nothing, so it
    # would not be a write.
    "sy-single": ('wrk.method = "PUT"\nlocal n = 0\nrequest = function()\n  n = n + 1\n'
                  '  return wrk.format(nil, "/v1/kv/bench/k", nil, "value-" .. tostring(n) .. "-" .. tostring(math.random(1e9)))\nend\n'),
    "sy-many": ('wrk.method = "PUT"\nwrk.body = "value-0123456789"\nlocal n = 0\n'
                'request = function()\n  n = n + 1\n'
                '  return wrk.format(nil, "/v1/kv/bench/" .. tostring(n) .. "-" .. tostring(math.random(1e9)))\nend\n'),
    "etcd-single": ('wrk.method = "POST"\nlocal a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"\n'
                    'local n = 0\nrequest = function()\n  n = n + 1\n  local v = ""\n  local m = n + math.random(1e9) * 64\n'
                    '  for i = 1, 8 do local d = m % 64; v = v .. a:sub(d + 1, d + 1); m = math.floor(m / 64) end\n'
                    f'  return wrk.format(nil, "/v3/kv/put", nil, \'{{"key":"{b64("bench/k")}","value":"\' .. v .. \'"}}\')\nend\n'),
    # Any four base64 letters decode to three bytes: a new key per request.
    "etcd-many": ('wrk.method = "POST"\nlocal a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"\n'
                  'local n = 0\nrequest = function()\n  n = n + 1\n  local k = ""\n  local m = n + math.random(1e9) * 64\n'
                  '  for i = 1, 8 do local d = m % 64; k = k .. a:sub(d + 1, d + 1); m = math.floor(m / 64) end\n'
                  f'  return wrk.format(nil, "/v3/kv/put", nil, \'{{"key":"{b64("bench/")}\' .. k .. \'","value":"{b64("value-0123456789")}"}}\')\nend\n'),
}


def wrk(port, script, seconds, work):
    path = os.path.join(work, "script.lua")
    with open(path, "w") as f:
        f.write(script)
    out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", "-s", path, f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True).stdout
    rps = float(out.split("Requests/sec:")[1].split()[0])
    bad = out.split("Non-2xx or 3xx responses:")[1].split()[0] if "Non-2xx" in out else "0"
    return rps, int(bad)


def cas_loop(kind, port, seconds):
    """8 contenders, read then conditional write: successful writes/s."""
    done = [0]
    lock = threading.Lock()
    stop = time.time() + seconds
    key = "bench/cas"
    if kind == "sy":
        Client(port).call("PUT", f"/v1/kv/{key}", b"0")
    else:
        Client(port).call("POST", "/v3/kv/put", json.dumps({"key": b64(key), "value": b64("0")}))

    def contender():
        c = Client(port)
        while time.time() < stop:
            if kind == "sy":
                _, _, body = c.call("GET", f"/v1/kv/{key}")
                entry = json.loads(body)[0]
                value = int(base64.b64decode(entry["Value"]))
                _, _, ok = c.call("PUT", f"/v1/kv/{key}?cas={entry['ModifyIndex']}", str(value + 1).encode())
                won = ok == b"true"
            else:
                _, _, body = c.call("POST", "/v3/kv/range", json.dumps({"key": b64(key)}))
                kv = json.loads(body)["kvs"][0]
                value = int(base64.b64decode(kv["value"]))
                txn = {"compare": [{"key": b64(key), "target": "MOD", "mod_revision": kv["mod_revision"]}],
                       "success": [{"request_put": {"key": b64(key), "value": b64(str(value + 1))}}]}
                _, _, answer = c.call("POST", "/v3/kv/txn", json.dumps(txn))
                won = json.loads(answer).get("succeeded", False)
            if won:
                with lock:
                    done[0] += 1

    threads = [threading.Thread(target=contender) for _ in range(8)]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.time() - started)


def raw_conn(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def raw_request(method, path, body=b""):
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def wake_sy(port, samples):
    """A reader's blocking GET parked on the key; the time from sending a
    write (another connection) to the reader's answer arriving. One thread:
    no interpreter scheduling in the figure."""
    key = "bench/wake"
    c = Client(port)
    c.call("PUT", f"/v1/kv/{key}", b"start")
    out = []
    for i in range(samples):
        _, headers, _ = c.call("GET", f"/v1/kv/{key}")
        reader = raw_conn(port)
        reader.sendall(raw_request("GET", f"/v1/kv/{key}?index={headers['x-consul-index']}&wait=30s"))
        time.sleep(0.01)  # the read is parked on the server
        writer = raw_conn(port)
        sent = time.perf_counter()
        writer.sendall(raw_request("PUT", f"/v1/kv/{key}", f"v{i}".encode()))
        ready, _, _ = select.select([reader], [], [], 10)
        assert ready, "the blocked read did not wake"
        out.append((time.perf_counter() - sent) * 1000)
        reader.close()
        writer.close()
    return out


def wake_etcd(port, samples):
    """The same with an etcd watch (created before the write)."""
    key = b64("bench/wake")
    out = []
    for i in range(samples):
        reader = raw_conn(port)
        reader.sendall(raw_request("POST", "/v3/watch", json.dumps({"create_request": {"key": key}}).encode()))
        seen = b""
        while b"created" not in seen:
            seen += reader.recv(65536)
        writer = raw_conn(port)
        sent = time.perf_counter()
        writer.sendall(raw_request("POST", "/v3/kv/put", json.dumps({"key": key, "value": b64(f"v{i}")}).encode()))
        ready, _, _ = select.select([reader], [], [], 10)
        assert ready, "the watch did not fire"
        out.append((time.perf_counter() - sent) * 1000)
        reader.close()
        writer.close()
    return out


def handover(port, samples, by_check):
    """Lock hand-over: the holder's session destroyed (or its check
    failed); ms until a waiting contender holds the lock."""
    c = Client(port)
    out = []
    key = "bench/leader"
    for i in range(samples):
        check = f"hold-{i}"
        body = {"LockDelay": "0s"}
        if by_check:
            c.call("PUT", "/v1/agent/check/register",
                   json.dumps({"Name": check, "ID": check, "TTL": "1h", "Status": "passing"}).encode())
            body["Checks"] = ["serfHealth", check]
        _, _, made = c.call("PUT", "/v1/session/create", json.dumps(body).encode())
        holder = json.loads(made)["ID"]
        _, _, made = c.call("PUT", "/v1/session/create", json.dumps({"LockDelay": "0s"}).encode())
        waiter = json.loads(made)["ID"]
        assert c.call("PUT", f"/v1/kv/{key}?acquire={holder}", b"h")[2] == b"true"
        got = {}
        ready = threading.Event()

        def contend():
            w = Client(port)
            _, headers, _ = w.call("GET", f"/v1/kv/{key}")
            index = headers["x-consul-index"]
            ready.set()
            while True:
                # Consul's lock loop: wait for the holder to go, then acquire.
                _, headers, body = w.call("GET", f"/v1/kv/{key}?index={index}&wait=30s")
                index = headers["x-consul-index"]
                if "Session" not in json.loads(body)[0]:
                    if w.call("PUT", f"/v1/kv/{key}?acquire={waiter}", b"w")[2] == b"true":
                        got["t"] = time.perf_counter()
                        return

        t = threading.Thread(target=contend)
        t.start()
        ready.wait()
        time.sleep(0.02)
        sent = time.perf_counter()
        if by_check:
            c.call("PUT", f"/v1/agent/check/fail/{check}", b"")
        else:
            c.call("PUT", f"/v1/session/destroy/{holder}", b"")
        t.join()
        out.append((got["t"] - sent) * 1000)
        c.call("PUT", f"/v1/session/destroy/{waiter}", b"")
        if by_check:
            c.call("PUT", f"/v1/agent/check/deregister/{check}", b"")
    return out


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk")
    work = tempfile.mkdtemp(prefix="w-kv-")
    etcd, etcd_port = start_etcd(work)
    agent, sy_port = start_agent(work)
    pids = {"sy": [agent.pid], "etcd": [etcd.pid]}
    ports = {"sy": sy_port, "etcd": etcd_port}
    results = {}
    try:
        for r in range(args.rounds):
            order = ["sy", "etcd"] if r % 2 == 0 else ["etcd", "sy"]
            for shape in ["single", "many"]:
                for kind in order:
                    before = cpu_seconds(pids[kind])
                    rps, bad = wrk(ports[kind], LUA[f"{kind}-{shape}"], args.seconds, work)
                    cpu = cpu_seconds(pids[kind]) - before
                    us = cpu / max(rps * args.seconds, 1) * 1e6
                    results.setdefault((kind, shape), []).append((rps, us))
                    print(f"round {r} {shape:6} {kind:4}: {rps:9.0f} writes/s  {us:6.1f} us CPU/write  non-2xx {bad}",
                          flush=True)
            for kind in order:
                rate = cas_loop(kind, ports[kind], args.seconds)
                results.setdefault((kind, "cas"), []).append((rate, 0))
                print(f"round {r} cas    {kind:4}: {rate:9.0f} successful writes/s", flush=True)
        wakes = {"sy": wake_sy(sy_port, 200), "etcd": wake_etcd(etcd_port, 200)}
        hands = {"destroy": handover(sy_port, 50, False), "check": handover(sy_port, 50, True)}
    finally:
        for proc in (agent, etcd):
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    print("\nmedian over rounds (switchyard / etcd):")
    for shape in ["single", "many", "cas"]:
        sy = statistics.median(v[0] for v in results[("sy", shape)])
        et = statistics.median(v[0] for v in results[("etcd", shape)])
        line = f"  {shape:6}: switchyard {sy:8.0f}/s  etcd {et:8.0f}/s  ratio {sy / et:.2f}x"
        if shape != "cas":
            sy_cpu = statistics.median(v[1] for v in results[("sy", shape)])
            et_cpu = statistics.median(v[1] for v in results[("etcd", shape)])
            line += f"  CPU/write {sy_cpu:.1f} vs {et_cpu:.1f} us ({sy_cpu / et_cpu:.2f}x)"
        print(line)
    for kind, values in wakes.items():
        print(f"  wake {kind:4}: p50 {pct(values, 0.5):.2f} ms  p99 {pct(values, 0.99):.2f} ms")
    for trigger, values in hands.items():
        print(f"  lock hand-over ({trigger}): p50 {pct(values, 0.5):.2f} ms  p99 {pct(values, 0.99):.2f} ms")


if __name__ == "__main__":
    main()
