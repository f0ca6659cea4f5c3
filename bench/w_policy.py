#!/usr/bin/env python3
"""Issue 32's benchmarks: ingress policy against HAProxy and nginx.

`http`: W-http with policy on. Every candidate rewrites the path prefix
/api/ to /, sets two request headers, removes the origin's Server header and
keeps a per-client rate limit that never triggers: HAProxy (`replace-path`,
`set-header`, `del-header`, a stick-table rate), nginx (`rewrite`,
`proxy_set_header`, `proxy_hide_header`, `limit_req`), Switchyard (a route
with `rewrite_prefix`, `request_headers`, `response_headers`, `rate_limit`),
and beside them Switchyard's plain W-http route on a second agent.

`compress`: the origin's 64 KiB JSON body, compressed: nginx `gzip on`
(level 1) against Switchyard's gzip (level 1, as nginx), and zstd and
brotli beside them (`wrk -H "Accept-Encoding: ..."`); bytes per response
from one request each.

`ratelimit`: a limit of 200 requests/s (`key = "route"`) offered 400/s by a
paced client (arrivals evenly spaced) for `--seconds`; agent scope on one
agent (burst 0 and the default, a tenth of the rate), then cluster scope on
three agents sharing an etcd (default burst), offered evenly and skewed
(70/20/10).
Reports the admitted rate against the configured one.

Usage: bench/w_policy.py http|compress [--rounds 7] [--seconds 5]
       bench/w_policy.py ratelimit [--seconds 10]
       (after cargo build --release)
Needs: apt-get install -y nginx haproxy wrk etcd-server
"""

import argparse
import http.client
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

from peers import measured_wrk, nginx_upstreams, require_binary, start_backends, start_haproxy, stop_all
from peers import wait_http as wait
from peers import start_nginx as start_nginx_with
from peers import start_switchyard as start_switchyard_with
from procstat import session_pids
from w_churn_etcd import free_port, start_etcd

POLICY_ROUTE = """[[http.routes]]
path_prefix = "/api/"
service = "web"
rewrite_prefix = "/"
request_headers = { set = { x-a = "a", x-b = "b" } }
response_headers = { remove = ["server"] }
rate_limit = { rate = "100000000/s", burst = 1000000 }
"""


def start_haproxy_policy(work, port):
    return start_haproxy(work, "haproxy-policy", port, defaults="  http-reuse always\n", frontend="""\
  stick-table type ip size 100k expire 30s store http_req_rate(10s)
  http-request track-sc0 src
  http-request deny deny_status 429 if { sc_http_req_rate(0) gt 1000000000 }
  http-request replace-path ^/api/(.*) /\\1
  http-request set-header X-A a
  http-request set-header X-B b
  http-response del-header Server
""")


def start_nginx_policy(work, port):
    return start_nginx_with(work, "nginx-policy", f"""http {{ access_log off; keepalive_requests 1000000;
  limit_req_zone $binary_remote_addr zone=rl:10m rate=1000000r/s;
  upstream app {{ {nginx_upstreams()} keepalive 64; }}
  server {{ listen 127.0.0.1:{port} reuseport;
    location /api/ {{ limit_req zone=rl burst=1000000 nodelay;
      rewrite ^/api/(.*)$ /$1 break;
      proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-A a; proxy_set_header X-B b; proxy_hide_header Server; }} }} }}""")


def start_nginx_gzip(work, port):
    return start_nginx_with(work, "nginx-gzip", f"""http {{ access_log off; keepalive_requests 1000000;
  gzip on; gzip_types application/json; gzip_proxied any;
  upstream app {{ {nginx_upstreams()} keepalive 64; }}
  server {{ listen 127.0.0.1:{port} reuseport;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}""")


def agent(work, binary, name, config, port):
    """An agent of its own (directory, config) on `port`, the origin registered."""
    home = os.path.join(work, name)
    os.makedirs(home, exist_ok=True)
    proc, _ = start_switchyard_with(home, binary, config, ["--http-addr", f"127.0.0.1:{port}"])
    return proc


def response_bytes(port, path, accept):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept-Encoding": accept})
    with urllib.request.urlopen(req, timeout=5) as r:
        return len(r.read()), r.headers.get("Content-Encoding") or "identity"


def alternate(candidates, procs, rounds, seconds, connections):
    """Every candidate once a round, in alternating order: median req/s,
    p99, CPU µs per request, and paired ratios against `ratio_to`."""
    names = list(candidates)
    results = {name: [] for name in names}
    for rnd in range(rounds):
        order = names if rnd % 2 == 0 else list(reversed(names))
        for name in order:
            port, path, headers, proc = candidates[name]
            pids = session_pids(procs[proc].pid) if proc else []
            rps, total, p99, bad, sock, cpu_us, steal = measured_wrk(
                port, path, connections, seconds, pids, headers=headers)
            results[name].append({"rps": rps, "p99": p99, "cpu": cpu_us, "bad": bad})
            print(f"round {rnd} {name}: {rps:.0f} req/s, p99 {p99:.2f} ms, {cpu_us:.1f} us CPU/req, "
                  f"non-2xx {bad} {sock}, steal {steal:.1%}", file=sys.stderr)
    return results


def table(results, peers, notes=None):
    med = statistics.median
    head = "| candidate | req/s | p99 | CPU µs/req | " + " | ".join(
        f"req/s ÷ {p} | CPU ÷ {p}" for p in peers) + " | non-2xx |" + (" bytes |" if notes else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, r in results.items():
        ratio = lambda peer, key: med([a[key] / b[key] for a, b in zip(r, results[peer])])
        cells = " | ".join(f"{ratio(p, 'rps'):.2f}× | {ratio(p, 'cpu'):.2f}×" for p in peers)
        extra = f" {notes[name]} |" if notes else ""
        print(f"| {name} | {med([x['rps'] for x in r]):.0f} | {med([x['p99'] for x in r]):.2f} ms | "
              f"{med([x['cpu'] for x in r]):.1f} | {cells} | {sum(x['bad'] for x in r)} |{extra}")


def run_http(args, work, procs):
    ports = {"switchyard": 18080, "switchyard plain": 18086, "haproxy": 18085, "nginx": 18084}
    procs["switchyard"] = agent(work, args.binary, "policy", POLICY_ROUTE, ports["switchyard"])
    procs["switchyard plain"] = agent(work, args.binary, "plain", '[[http.routes]]\nservice = "web"\n',
                                      ports["switchyard plain"])
    procs["haproxy"] = start_haproxy_policy(work, ports["haproxy"])
    procs["nginx"] = start_nginx_policy(work, ports["nginx"])
    candidates = {name: (ports[name], "/" if name == "switchyard plain" else "/api/", (), name)
                  for name in ports}
    for name, (port, path, _, _) in candidates.items():
        wait(port, path)
        check = urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
        print(f"# {name}: {path} -> {check.status}, Server: {check.headers.get('Server')}", file=sys.stderr)
    results = alternate(candidates, procs, args.rounds, args.seconds, args.connections)
    print(f"\nW-http with policy on: wrk -t1 -c{args.connections} -d{args.seconds}s, {args.rounds} rounds, "
          f"alternating; nproc={os.cpu_count()}")
    table(results, ["haproxy", "nginx", "switchyard plain"])


def run_compress(args, work, procs):
    ports = {"switchyard": 18080, "nginx": 18084}
    procs["switchyard"] = agent(work, args.binary, "gzip",
                                '[[http.routes]]\nservice = "web"\ncompress = ["gzip", "zstd", "br"]\n',
                                ports["switchyard"])
    procs["nginx"] = start_nginx_gzip(work, ports["nginx"])
    candidates = {
        "nginx gzip": (ports["nginx"], "/json", ("Accept-Encoding: gzip",), "nginx"),
        "switchyard gzip": (ports["switchyard"], "/json", ("Accept-Encoding: gzip",), "switchyard"),
        "switchyard zstd": (ports["switchyard"], "/json", ("Accept-Encoding: zstd",), "switchyard"),
        "switchyard br": (ports["switchyard"], "/json", ("Accept-Encoding: br",), "switchyard"),
    }
    sizes = {}
    for name, (port, path, headers, _) in candidates.items():
        wait(port, path)
        sizes[name] = response_bytes(port, path, headers[0].split(": ")[1])
        print(f"# {name}: {sizes[name][0]} bytes ({sizes[name][1]})", file=sys.stderr)
    results = alternate(candidates, procs, args.rounds, args.seconds, args.connections)
    print(f"\nW-compress: 64 KiB JSON (`/json`), wrk -t1 -c{args.connections} -d{args.seconds}s, "
          f"{args.rounds} rounds, alternating; nproc={os.cpu_count()}")
    table(results, ["nginx gzip"], {name: f"{size} ({coding})" for name, (size, coding) in sizes.items()})


def offer(targets, rate, seconds):
    """Sends `rate` requests/s in all for `seconds`, each target (port,
    share) getting its share, on keep-alive connections paced by the clock.
    Returns (admitted, refused, other) counts."""
    counts = {"ok": 0, "limited": 0, "other": 0}
    lock = threading.Lock()
    threads_per_target = 4

    def client(port, per_thread, slot):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        gap = 1.0 / per_thread
        # The target's threads take turns: arrivals evenly spaced, not in bursts.
        start = begin + gap * slot / threads_per_target
        sent = 0
        mine = {"ok": 0, "limited": 0, "other": 0}
        while True:
            due = start + sent * gap
            now = time.monotonic()
            if due - start >= seconds:
                break
            if due > now:
                time.sleep(due - now)
            try:
                conn.request("GET", "/", headers={"Host": "rl.test"})
                status = conn.getresponse()
                status.read()
                key = {200: "ok", 429: "limited"}.get(status.status, "other")
            except OSError:
                key = "other"
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            mine[key] += 1
            sent += 1
        with lock:
            for k, v in mine.items():
                counts[k] += v

    begin = time.monotonic() + 0.1
    threads = [threading.Thread(target=client, args=(port, rate * share / threads_per_target, slot))
               for port, share in targets if share > 0 for slot in range(threads_per_target)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts["ok"], counts["limited"], counts["other"]


def run_ratelimit(args, work, procs):
    limit = 200
    route = lambda scope, burst: (
        f'[[http.routes]]\nhost = "rl.test"\nservice = "web"\n'
        f'rate_limit = {{ rate = "{limit}/s", {"" if burst is None else f"burst = {burst}, "}'
        f'key = "route", scope = "{scope}" }}\n')
    rows = []
    # Agent scope: one agent, without a burst and with one.
    for burst in (0, None):
        port = free_port()
        procs[f"agent-{burst}"] = agent(work, args.binary, f"agent-scope-{burst}", route("agent", burst), port)
        shown = "default (20)" if burst is None else burst
        wait_host(port)
        offer([(port, 1.0)], 2 * limit, 2)  # warm-up
        ok, limited, other = offer([(port, 1.0)], 2 * limit, args.seconds)
        rows.append((f"agent scope, 1 agent, burst {shown}", ok, limited, other))
    # Cluster scope: three agents sharing an etcd.
    etcd, url = start_etcd(work)
    procs["etcd"] = etcd
    store = f'[store]\nkind = "etcd"\nendpoints = ["{url}"]\nprefix = "/rl"\nlease_ttl = "2s"\n'
    ports = [free_port() for _ in range(3)]
    for i, p in enumerate(ports):
        home = os.path.join(work, f"cluster-{i}")
        os.makedirs(home, exist_ok=True)
        procs[f"cluster-{i}"], _ = start_switchyard_with(
            home, args.binary, store + route("cluster", None), ["--http-addr", f"127.0.0.1:{p}"],
            register=(i == 0), node=f"agent-{i}")
    for p in ports:
        wait_host(p)
    for label, shares in [("even", (1 / 3, 1 / 3, 1 / 3)), ("skewed 70/20/10", (0.7, 0.2, 0.1))]:
        targets = list(zip(ports, shares))
        offer(targets, 2 * limit, 4)  # the shares settle (one exchange a second)
        ok, limited, other = offer(targets, 2 * limit, args.seconds)
        rows.append((f"cluster scope, 3 agents, burst default (20), offered {label}", ok, limited, other))
    print(f"\nRate limit accuracy: limit {limit}/s (key = \"route\"), offered {2 * limit}/s for "
          f"{args.seconds} s by a paced client; nproc={os.cpu_count()}")
    print("| setup | offered/s | admitted/s | admitted ÷ limit | 429s | other |")
    print("|---|---|---|---|---|---|")
    for label, ok, limited, other in rows:
        total = ok + limited + other
        print(f"| {label} | {total / args.seconds:.0f} | {ok / args.seconds:.1f} | "
              f"{ok / args.seconds / limit:.3f} | {limited} | {other} |")


def wait_host(port):
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/", headers={"Host": "rl.test"})
            if conn.getresponse().status in (200, 429):
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"nothing routes rl.test on port {port}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["http", "compress", "ratelimit"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--binary", default="target/release/switchyard")
    args = parser.parse_args()
    for tool in ("nginx", "haproxy", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install -y nginx haproxy wrk")
    require_binary(args.binary)
    args.binary = os.path.abspath(args.binary)
    work = tempfile.mkdtemp(prefix="w-policy-")
    backends = start_backends(work)
    procs = {}
    try:
        {"http": run_http, "compress": run_compress, "ratelimit": run_ratelimit}[args.mode](args, work, procs)
    finally:
        stop_all(list(procs.values()) + [backends], work)


if __name__ == "__main__":
    main()
