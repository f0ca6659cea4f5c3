#!/usr/bin/env python3
"""W-drain (shared/WORKLOADS.md): drain one of three nodes under W-http load.

Three nodes n1..n3, each with an endpoint of `web` (the W-http nginx backends on
127.0.0.1:18081-18083) and one of `slow` (a Python server on :18181-18183 that
answers after 2 s). Switchyard on :18080 routes /slow to `slow` and everything
else to `web`, two proxy threads. Each round: `wrk -t1 -c50` at / for the whole
round; 1.5 s in, 30 requests to /slow start (about ten land on n1); 0.5 s later
n1 is drained through the API. Then:

- failed requests: wrk's non-2xx and socket errors, and slow requests that did
  not answer 200 (must all be 0);
- new requests on n1 after the ack: responses counted for n1's endpoints after
  the drain was acknowledged (counters read just after the ack), minus the
  requests the ack reported in flight; 0 or less means no request started on
  n1 after the ack;
- last fast n1 response after the ack: when the proxy's counter for n1's `web`
  endpoint stopped moving (polled every few ms through /metrics), an upper
  bound on "time until n1 gets no new requests", at the polling granularity;
- time until drained: from the ack until the drain status says `drained` (the
  slow requests keep it busy for up to 2 s).

n1 is undrained between rounds.

Usage: bench/w_drain.py [--rounds 5] [--seconds 6]   (after cargo build --release)
Needs: apt-get install -y nginx wrk
"""

import argparse
import http.server
import json
import os
import re
import shutil
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from peers import BACKENDS, require_binary, start_backends, stop_all, wait_http
from peers import start_switchyard as start_agent

SLOW = [18181, 18182, 18183]
PORT = 18080


class Slow(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        time.sleep(2)
        body = b"slow\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def start_switchyard(work, binary):
    config = ('[[http.routes]]\npath_prefix = "/slow"\nservice = "slow"\n'
              '[[http.routes]]\nservice = "web"\n')
    proc, ready = start_agent(work, binary, config, ["--http-addr", f"127.0.0.1:{PORT}"], register=False)
    api = f"http://{ready['api']}"
    nodes = [{"name": f"n{i + 1}", "address": "127.0.0.1"} for i in range(3)]
    endpoints = [{"node": f"n{i + 1}", "service": "web", "id": f"web-n{i + 1}", "port": p} for i, p in enumerate(BACKENDS)]
    endpoints += [{"node": f"n{i + 1}", "service": "slow", "id": f"slow-n{i + 1}", "port": p} for i, p in enumerate(SLOW)]
    call(api, "PUT", "/v1/switchyard/batch", {"nodes": nodes, "endpoints": endpoints})
    return proc, api


def call(api, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(api + path, data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read()
    return json.loads(text) if text else None


def n1_responses(api):
    """Responses from n1's endpoints: (all, web only)."""
    with urllib.request.urlopen(api + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = web = 0
    for line in text.splitlines():
        if line.startswith("switchyard_proxy_requests_total") and 'node="n1"' in line:
            count = int(float(line.rsplit(" ", 1)[1]))
            total += count
            if 'endpoint="web-n1"' in line:
                web += count
    return total, web


def slow_request(results):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/slow", timeout=20) as r:
            results.append(r.status)
    except Exception as e:  # noqa: BLE001 - any failure counts as one
        results.append(str(e))


def one_round(api, seconds):
    wrk = subprocess.Popen(["wrk", "-t1", "-c50", f"-d{seconds}s", f"http://127.0.0.1:{PORT}/"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    slow_results = []
    slow_threads = [threading.Thread(target=slow_request, args=(slow_results,)) for _ in range(30)]
    for t in slow_threads:
        t.start()
    time.sleep(0.5)
    ack = call(api, "PUT", "/v1/switchyard/nodes/n1/drain", {"deadline": "30s"})
    acked = time.monotonic()
    at_ack, web_at_ack = n1_responses(api)
    in_flight = ack["in_flight"]
    last_change, last_web, drained_after = acked, web_at_ack, None
    while time.monotonic() - acked < 5:
        _, web = n1_responses(api)
        now = time.monotonic()
        if web != last_web:
            last_web, last_change = web, now
        if drained_after is None and call(api, "GET", "/v1/switchyard/nodes/n1/drain")["drained"]:
            drained_after = now - acked
        if drained_after is not None and now - last_change > 1:
            break
        time.sleep(0.003)
    for t in slow_threads:
        t.join()
    out = wrk.communicate()[0]
    final, _ = n1_responses(api)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    slow_failed = sum(1 for r in slow_results if r != 200)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    call(api, "DELETE", "/v1/switchyard/nodes/n1/drain")
    return {
        "rps": rps, "failed": failed, "slow_failed": slow_failed, "slow_ok": len(slow_results) - slow_failed,
        "in_flight": in_flight, "new_after_ack": final - at_ack - in_flight,
        "last_n1_ms": (last_change - acked) * 1e3,
        "drained_ms": drained_after * 1e3 if drained_after is not None else float("nan"),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--binary", default="target/release/switchyard")
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install -y nginx wrk")
    require_binary(args.binary)
    work = tempfile.mkdtemp(prefix="w-drain-")
    backends = start_backends(work)
    slow_servers = [Server(("127.0.0.1", p), Slow) for p in SLOW]
    for s in slow_servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    proc, api = start_switchyard(work, args.binary)
    try:
        wait_http(PORT, "/")
        rows = []
        for rnd in range(args.rounds):
            row = one_round(api, args.seconds)
            rows.append(row)
            print(f"round {rnd}: {json.dumps(row)}", file=sys.stderr)
            time.sleep(1)
        med = statistics.median
        print(f"\nW-drain: wrk -t1 -c50 -d{args.seconds}s at /, 30 × 2 s requests at /slow, drain n1 of 3; "
              f"{args.rounds} rounds; nproc={os.cpu_count()}")
        print("| round | req/s | failed | slow ok / failed | in flight at ack | new n1 requests after ack | "
              "last fast n1 response after ack | drained after ack |")
        print("|---|---|---|---|---|---|---|---|")
        for i, r in enumerate(rows):
            print(f"| {i} | {r['rps']:.0f} | {r['failed']} | {r['slow_ok']} / {r['slow_failed']} | {r['in_flight']} | "
                  f"{r['new_after_ack']} | {r['last_n1_ms']:.0f} ms | {r['drained_ms']:.0f} ms |")
        print(f"| median | {med([r['rps'] for r in rows]):.0f} | {sum(r['failed'] for r in rows)} (sum) | "
              f"{sum(r['slow_ok'] for r in rows)} / {sum(r['slow_failed'] for r in rows)} (sum) | "
              f"{med([r['in_flight'] for r in rows])} | {max(r['new_after_ack'] for r in rows)} (max) | "
              f"{med([r['last_n1_ms'] for r in rows]):.0f} ms | {med([r['drained_ms'] for r in rows]):.0f} ms |")
    finally:
        for s in slow_servers:
            s.shutdown()
        stop_all([proc, backends], work)


if __name__ == "__main__":
    main()
