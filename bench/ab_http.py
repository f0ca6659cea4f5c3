#!/usr/bin/env python3
"""W-http A/B: Switchyard against itself under variants, paired per round.

For a hot-path or tuning change whose effect is smaller than the drift between
runs against peers: each round starts a fresh agent per variant (alternating
order) on the W-http backends and runs `wrk -t1 -c50`, then reports each
variant's median req/s, p99 and CPU per request, and the paired ratios to the
first variant.

A variant is `base` (as shipped) or `+`-joined settings:
  NAME=value    an environment variable for the agent (e.g. SY_EXTRA, see w_http.py)
  slice=NS      the proxy threads' EEVDF slice (sched_setattr's sched_runtime
                for SCHED_OTHER, Linux 6.12+), set after start
  bin=PATH      another build of the agent (e.g. a copy of the binary before a
                hot-path change), instead of --binary

With --tcp the load goes through an L4 listener instead (W-tcp's setup).

Usage: bench/ab_http.py base,slice=300000 [--rounds 5] [--seconds 6] [--path /]
       bench/ab_http.py bin=/tmp/before,base [--tcp]
       (after cargo build --release)
Needs: apt-get install -y nginx wrk
"""

import argparse
import ctypes
import os
import shutil
import statistics
import struct
import tempfile

import peers
import w_http
import w_tcp
from procstat import session_pids

SYS_SCHED_SETATTR = 314  # x86_64
LIBC = ctypes.CDLL(None, use_errno=True)


def set_slice(tid, ns):
    """SCHED_OTHER with a custom slice: struct sched_attr (VER0, 48 bytes)."""
    attr = ctypes.create_string_buffer(struct.pack("IIQiIQQQ", 48, 0, 0, 0, 0, ns, 0, 0))
    if LIBC.syscall(SYS_SCHED_SETATTR, tid, attr, 0) != 0:
        raise OSError(ctypes.get_errno(), f"sched_setattr on thread {tid}")


def proxy_threads(pid):
    tasks = os.listdir(f"/proc/{pid}/task")
    return [int(t) for t in tasks if open(f"/proc/{pid}/task/{t}/comm").read().startswith("proxy-")]


def shown(variant):
    """A variant on one line (SY_EXTRA values hold TOML lines)."""
    return variant.replace("\n", "\\n")


def start(work, binary, variant, tcp):
    settings = [s for s in variant.split("+") if s != "base"]
    env = {k: v for k, v in (s.split("=", 1) for s in settings) if k not in ("slice", "bin")}
    binary = next((s.split("=", 1)[1] for s in settings if s.startswith("bin=")), binary)
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        agent = (w_tcp if tcp else w_http).start_switchyard(work, binary)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    for setting in settings:
        if setting.startswith("slice="):
            for tid in proxy_threads(agent.pid):
                set_slice(tid, int(setting.split("=", 1)[1]))
    return agent


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", help='comma-separated, the first is the base, e.g. base,slice=300000')
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--path", default="/")
    parser.add_argument("--binary", default="target/release/switchyard")
    parser.add_argument("--tcp", action="store_true", help="through an L4 listener (W-tcp)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    port = (w_tcp if args.tcp else w_http).PORTS["switchyard"]
    work = tempfile.mkdtemp(prefix="ab-http-")
    backends = peers.start_backends(work)
    results = {v: [] for v in variants}
    try:
        for rnd in range(args.rounds):
            for variant in variants if rnd % 2 == 0 else variants[::-1]:
                agent = start(work, args.binary, variant, args.tcp)
                try:
                    peers.wait_http(port, args.path)
                    pids = session_pids(agent.pid)
                    rps, total, p99, bad, _, cpu, steal = peers.measured_wrk(
                        port, args.path, args.connections, args.seconds, pids)
                finally:
                    agent.terminate()
                    agent.wait(timeout=10)
                    shutil.rmtree(os.path.join(work, "sy-data"), ignore_errors=True)
                results[variant].append((rps, p99, cpu))
                print(f"round {rnd} {shown(variant)}: {rps:.0f} req/s, p99 {p99:.2f} ms, {cpu:.1f} us CPU/req, "
                      f"non-2xx {bad}, steal {steal:.1%}", flush=True)
    finally:
        peers.stop_all([backends], work)
    med = statistics.median
    base = results[variants[0]]
    print(f"\n{'W-tcp' if args.tcp else 'W-http'} A/B: wrk -t1 -c{args.connections} -d{args.seconds}s, {args.rounds} rounds, "
          f"nproc={os.cpu_count()}")
    print("| variant | req/s | p99 | CPU µs/req | req/s ÷ base | CPU ÷ base | p99 ÷ base |")
    print("|---|---|---|---|---|---|---|")
    for variant in variants:
        rows = results[variant]
        ratio = [med(a[i] / b[i] for a, b in zip(rows, base)) for i in range(3)]
        print(f"| {shown(variant)} | {med(r[0] for r in rows):.0f} | {med(r[1] for r in rows):.2f} ms | "
              f"{med(r[2] for r in rows):.1f} | {ratio[0]:.3f} | {ratio[2]:.3f} | {ratio[1]:.3f} |")


if __name__ == "__main__":
    main()
