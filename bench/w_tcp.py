#!/usr/bin/env python3
"""W-tcp (shared/WORKLOADS.md): Switchyard's L4 listener beside nginx `stream`
and HAProxy `mode tcp`.

The W-http backends (one nginx, worker_processes 1, on 127.0.0.1:18081-18083)
sit behind three TCP proxies, round robin, one backend connection per client
connection, two workers/threads each: Switchyard on :18090 (a `[[tcp.listeners]]`
entry to the three registered endpoints), nginx stream on :18091, HAProxy on
:18092. `wrk` drives HTTP keep-alive through the tunnels, so a request costs the
proxy one read and one write each way.

Each round runs every candidate once, in alternating order (1 s warm-up thrown
away, then `wrk -t1 -cN -dS --latency`). Reported: median req/s, p99, proxy CPU
µs per request (utime + stime from /proc), and paired ratios to each peer.

Usage: bench/w_tcp.py [--rounds 7] [--seconds 8] [--connections 50]
       (after cargo build --release)
Needs: apt-get install -y nginx libnginx-mod-stream haproxy wrk
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

import peers
from peers import measured_wrk, require_binary, start_backends, stop_all, wait_http
from procstat import session_pids

PORTS = {"switchyard": 18090, "nginx": 18091, "haproxy": 18092}
# Debian ships nginx's stream module separately (libnginx-mod-stream).
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def start_nginx(work):
    return peers.start_nginx(work, "nginx-stream", f"""stream {{ upstream app {{ {peers.nginx_upstreams()} }}
  server {{ listen 127.0.0.1:{PORTS['nginx']} reuseport; proxy_pass app; }} }}""",
                             preamble=f"load_module {STREAM_MODULE};\n")


def start_haproxy(work):
    return peers.start_haproxy(work, "haproxy-tcp", PORTS["haproxy"], mode="tcp")


def start_switchyard(work, binary):
    """The agent with one L4 listener to `web` on W-tcp's port (the
    environment's SY_EXTRA first)."""
    config = f'[[tcp.listeners]]\naddr = "127.0.0.1:{PORTS["switchyard"]}"\nservice = "web"\n'
    proc, _ = peers.start_switchyard(work, binary, config, ["--http-addr", "127.0.0.1:0"])
    return proc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--binary", default="target/release/switchyard")
    args = parser.parse_args()
    for tool in ("nginx", "haproxy", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install -y nginx libnginx-mod-stream haproxy wrk")
    if not os.path.exists(STREAM_MODULE):
        sys.exit(f"missing {STREAM_MODULE}: apt-get install -y libnginx-mod-stream")
    require_binary(args.binary)
    work = tempfile.mkdtemp(prefix="w-tcp-")
    backends = start_backends(work)
    procs = {"switchyard": start_switchyard(work, args.binary), "nginx": start_nginx(work),
             "haproxy": start_haproxy(work)}
    names = list(PORTS)
    try:
        for name in names:
            wait_http(PORTS[name], "/")
        results = {name: [] for name in names}
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else list(reversed(names))
            for name in order:
                pids = session_pids(procs[name].pid)
                rps, total, p99, bad, sock, cpu_us, steal = measured_wrk(
                    PORTS[name], "/", args.connections, args.seconds, pids)
                results[name].append({"rps": rps, "p99": p99, "cpu": cpu_us, "bad": bad})
                print(f"round {rnd} {name}: {rps:.0f} req/s, p99 {p99:.2f} ms, {cpu_us:.1f} us CPU/req, "
                      f"non-2xx {bad} {sock}, steal {steal:.1%}", file=sys.stderr)
        med = statistics.median
        print(f"\nW-tcp: wrk -t1 -c{args.connections} -d{args.seconds}s through each TCP proxy, {args.rounds} rounds, "
              f"alternating order; nproc={os.cpu_count()}")
        print("| candidate | req/s | p99 | CPU µs/req | req/s ÷ nginx | req/s ÷ HAProxy | CPU ÷ nginx | CPU ÷ HAProxy | p99 ÷ nginx | non-2xx |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name in names:
            r = results[name]
            ratio = lambda peer, key: med([a[key] / b[key] for a, b in zip(r, results[peer])])
            print(f"| {name} | {med([x['rps'] for x in r]):.0f} | {med([x['p99'] for x in r]):.2f} ms | "
                  f"{med([x['cpu'] for x in r]):.1f} | {ratio('nginx', 'rps'):.2f}× | {ratio('haproxy', 'rps'):.2f}× | "
                  f"{ratio('nginx', 'cpu'):.2f}× | {ratio('haproxy', 'cpu'):.2f}× | {ratio('nginx', 'p99'):.2f}× | "
                  f"{sum(x['bad'] for x in r)} |")
    finally:
        stop_all(list(procs.values()) + [backends], work)


if __name__ == "__main__":
    main()
