#!/usr/bin/env python3
"""Flood (issue 26): the agent's listeners under connection floods.

Phase 1 holds `--idle` idle connections to the API (from many loopback
source addresses, 100 each, so the per-client cap is not what stops them);
phase 2 adds `--slow` slow-head connections on each listener (API, proxy,
DNS over TCP: a partial request head or a partial DNS length prefix, then
nothing). Before and during each phase, fresh clients ask each listener
`--probes` times, one at a time: what share is answered, and the latency
p50/p99 of the answers (ms). nginx, as the proxy peer (2 workers,
worker_connections 8192, client_header_timeout 10s as ours), takes the
same slow-head flood on its listener, measured the same way.

    python3 bench/flood.py [--binary target/release/switchyard] [--idle 20000] [--slow 1000]
"""

import argparse
import multiprocessing
import os
import resource
import socket
import struct
import sys
import tempfile
import time

from peers import nginx_upstreams, require_binary, spawn, start_backends
from peers import start_nginx as start_nginx_with
from peers import start_switchyard, wait_http

PORTS = {"switchyard": 18080, "nginx": 18084}


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def source(i):
    """A loopback source address, 100 connections each."""
    n = i // 100
    return f"127.{2 + n // 62500 % 250}.{n // 250 % 250}.{n % 250 + 1}"


def holder(addr, count, payload, start, ready, done):
    """Opens `count` connections to `addr` (sources from index `start`),
    sends `payload` on each, holds them until `done` is set."""
    raise_nofile()
    held, failed = [], 0
    for i in range(count):
        s = socket.socket()
        try:
            s.bind((source(start + i), 0))
            s.settimeout(2)
            s.connect(addr)
            if payload:
                s.sendall(payload)
            held.append(s)
        except OSError:
            failed += 1
            s.close()
    ready.put((len(held), failed))
    done.wait(600)
    # How many the server still holds open: nothing sent back (a refusal or
    # a 408 comes with a response and a close) and not closed.
    alive = 0
    for s in held:
        s.setblocking(False)
        try:
            s.recv(1)
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
        s.close()
    ready.put(alive)


def flood(addr, count, payload, start=0, per_process=9000):
    """Starts holders; returns (processes, done event, result queue, held, failed)."""
    ready, done, procs = multiprocessing.Queue(), multiprocessing.Event(), []
    for first in range(0, count, per_process):
        n = min(per_process, count - first)
        p = multiprocessing.Process(target=holder, args=(addr, n, payload, start + first, ready, done))
        p.start()
        procs.append(p)
    held = failed = 0
    for _ in procs:
        h, f = ready.get(timeout=600)
        held += h
        failed += f
    return procs, done, ready, held, failed


def end(flooding):
    procs, done, ready, _, _ = flooding
    done.set()
    alive = sum(ready.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    return alive


def http_probe(port, path, host="x"):
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = s.recv(64)
        return data.startswith(b"HTTP/1.1 200")
    finally:
        s.close()


def dns_query():
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    for label in b"web.service.consul".split(b"."):
        q += bytes([len(label)]) + label
    return q + b"\0" + struct.pack(">HH", 1, 1)


def udp_probe(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.sendto(dns_query(), ("127.0.0.1", port))
        data = s.recv(4096)
        return data[:2] == b"\x12\x34" and data[3] & 0x0F == 0
    finally:
        s.close()


def tcp_dns_probe(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        q = dns_query()
        s.sendall(struct.pack(">H", len(q)) + q)
        data = s.recv(4096)
        return len(data) > 4 and data[2:4] == b"\x12\x34"
    finally:
        s.close()


def probe(name, fn, count):
    """Share answered and p50/p99 latency (ms) of `count` one-at-a-time asks."""
    times, ok = [], 0
    for _ in range(count):
        t = time.perf_counter()
        try:
            good = fn()
        except OSError:
            good = False
        if good:
            ok += 1
            times.append((time.perf_counter() - t) * 1000)
    times.sort()
    pct = lambda q: times[min(len(times) - 1, int(q * len(times)))] if times else float("nan")
    return f"{name}: {ok}/{count} answered, p50 {pct(0.5):.2f} ms, p99 {pct(0.99):.2f} ms"


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/switchyard")
    parser.add_argument("--idle", type=int, default=20000)
    parser.add_argument("--slow", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=200)
    args = parser.parse_args()
    require_binary(args.binary)
    limit = raise_nofile()
    print(f"open-file limit here (and the agent's): {limit}")
    work = tempfile.mkdtemp(prefix="flood-")
    procs = [start_backends(work)]
    try:
        nginx = start_nginx_with(work, "nginx", f"""http {{ access_log off; client_header_timeout 10s;
  upstream app {{ {nginx_upstreams()} keepalive 64; }}
  server {{ listen 127.0.0.1:{PORTS['nginx']} reuseport;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}""")
        procs.append(nginx)
        agent, ready = start_switchyard(work, args.binary, '[[http.routes]]\nservice = "web"\n',
                                        ["--http-addr", f"127.0.0.1:{PORTS['switchyard']}"])
        procs.append(agent)
        api_port = int(ready["api"].rsplit(":", 1)[1])
        dns_port = int(ready["dns"].rsplit(":", 1)[1])
        wait_http(PORTS["switchyard"], "/")
        wait_http(PORTS["nginx"], "/")
        probes = [
            ("API", lambda: http_probe(api_port, "/v1/catalog/services")),
            ("DNS UDP", lambda: udp_probe(dns_port)),
            ("DNS TCP", lambda: tcp_dns_probe(dns_port)),
            ("proxy", lambda: http_probe(PORTS["switchyard"], "/")),
            ("nginx (peer)", lambda: http_probe(PORTS["nginx"], "/")),
        ]

        t0 = time.monotonic()

        def report(phase):
            print(f"\n{phase}, at {time.monotonic() - t0:.1f} s (agent RSS {rss_mib(agent.pid):.0f} MiB, "
                  f"{len(os.listdir(f'/proc/{agent.pid}/fd'))} descriptors open)")
            for name, fn in probes:
                print("  " + probe(name, fn, args.probes))

        report("before")
        started = time.monotonic()
        idle = flood(("127.0.0.1", api_port), args.idle, b"")
        print(f"\n{args.idle} idle API connections in {time.monotonic() - started:.1f} s: "
              f"{idle[3]} connected, {idle[4]} failed to connect")
        report("with the idle flood")
        partial = b"GET /v1/agent/self HTTP/1.1\r\nHost: x\r\n"
        slow = [
            flood(("127.0.0.1", api_port), args.slow, partial, start=400_000),
            flood(("127.0.0.1", PORTS["switchyard"]), args.slow, partial, start=500_000),
            flood(("127.0.0.1", dns_port), args.slow, b"\x00", start=600_000),
            flood(("127.0.0.1", PORTS["nginx"]), args.slow, partial, start=700_000),
        ]
        print(f"\n{args.slow} slow-head connections on the API, the proxy, DNS TCP and nginx")
        report("with both floods")
        names = ["API slow-head", "proxy slow-head", "DNS TCP slow-head", "nginx slow-head"]
        alive = [end(s) for s in slow]
        idle_alive = end(idle)
        print(f"\nstill open when the floods ended: API idle {idle_alive}/{idle[3]}, " +
              ", ".join(f"{n} {a}/{s[3]}" for n, a, s in zip(names, alive, slow)))
        report("after")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
            except OSError:
                pass


if __name__ == "__main__":
    main()
