#!/usr/bin/env python3
"""W-lifecycle (shared/PAINS.md item 11): keep-alive HTTP/1.1 and HTTP/2 load
through the proxy while the agent reloads its configuration 100 times and
upgrades its own binary 5 times (SIGUSR2: the successor takes the sockets and
the store). Counts every failed request and socket error at the clients:
the claim is zero.

The W-http backends (one nginx on 127.0.0.1:18081-18083) sit behind one agent
on :18080. `wrk -t1 -c50` (HTTP/1.1 keep-alive) and `h2load -c10 -m10` (HTTP/2,
prior knowledge) run for the whole time; the reloads and upgrades are spread
evenly over it. Each reload flips `http.response_timeout`, so every one changes
the running configuration. After each upgrade the script follows the new main
process (the successor is the old agent's child and prints its ready line on
the same stdout). The agents' log is left in /tmp/w-lifecycle-agent.log.

h2load does not reconnect: a client that gets GOAWAY at an upgrade stops. So
h2load runs again and again (5 s each) for the whole time, and every run opens
fresh connections to whichever agent serves. A stream h2load opens after the
final GOAWAY is refused unprocessed (a client may retry it), and h2load counts
it as failed.

Usage: bench/w_lifecycle.py [--seconds 60] [--reloads 100] [--upgrades 5]
       (after cargo build --release)
Needs: apt-get install -y nginx wrk nghttp2-client
"""

import argparse
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from peers import register_backends, start_backends, stop_all, wait_http

PORT = 18080


def config_text(flip):
    return f'[http]\nresponse_timeout = "{30 if flip else 20}s"\n[[http.routes]]\nservice = "web"\n'


def start_agent(work, binary):
    conf = os.path.join(work, "lifecycle.toml")
    with open(conf, "w") as f:
        f.write(config_text(False))
    proc = subprocess.Popen([binary, "agent", "--config", conf, "--api-addr", "127.0.0.1:0", "--dns-addr",
                             "127.0.0.1:0", "--http-addr", f"127.0.0.1:{PORT}", "--proxy-threads", "2",
                             "--data-dir", os.path.join(work, "sy-data"), "--node-name", "bench"],
                            stdout=subprocess.PIPE, stderr=open(os.path.join(work, "agent.log"), "w"),
                            text=True, start_new_session=True)
    lines = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    ready = json.loads(lines.get(timeout=30))
    register_backends(ready["api"])
    return proc, conf, lines


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


def upgrade(pid, lines):
    """SIGUSR2 to `pid`; returns the successor's PID once it serves and the
    old process has exited, and the seconds that took."""
    started = time.monotonic()
    os.kill(pid, signal.SIGUSR2)
    deadline = started + 30
    successor = None
    while successor is None and time.monotonic() < deadline:
        kids = children(pid)
        successor = kids[0] if kids else None
        time.sleep(0.005)
    if successor is None:
        sys.exit(f"no successor of {pid} appeared")
    ready = json.loads(lines.get(timeout=deadline - time.monotonic()))
    assert ready["ready"], ready
    while not gone(pid):
        if time.monotonic() > deadline:
            sys.exit(f"the old agent {pid} did not exit")
        time.sleep(0.01)
    return successor, time.monotonic() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--reloads", type=int, default=100)
    parser.add_argument("--upgrades", type=int, default=5)
    parser.add_argument("--binary", default="target/release/switchyard")
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "h2load"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install -y nginx wrk nghttp2-client")
    binary = os.path.abspath(args.binary)
    work = tempfile.mkdtemp(prefix="w-lifecycle-")
    backends = start_backends(work)
    proc, conf, lines = start_agent(work, binary)
    pid = proc.pid
    h2_runs, h2_stop = [], threading.Event()
    try:
        wait_http(PORT, "/")
        url = f"http://127.0.0.1:{PORT}/"
        load = args.seconds + 4
        h1 = subprocess.Popen(["wrk", "-t1", "-c50", f"-d{load}s", url], stdout=subprocess.PIPE, text=True)

        def h2_loop():
            until = time.monotonic() + load
            while not h2_stop.is_set() and time.monotonic() < until - 1:
                seconds = max(1, min(5, int(until - time.monotonic())))
                out = subprocess.run(["h2load", "-c10", "-m10", "-t1", f"-D{seconds}", url],
                                     capture_output=True, text=True).stdout
                h2_runs.append(out)

        h2 = threading.Thread(target=h2_loop)
        h2.start()
        time.sleep(2)
        events = args.reloads + args.upgrades
        every = args.seconds / events
        upgrade_at = {round((i + 1) * events / (args.upgrades + 1)) for i in range(args.upgrades)}
        reloads, took, flip = 0, [], False
        for i in range(events):
            due = time.monotonic() + every
            if i in upgrade_at:
                pid, seconds = upgrade(pid, lines)
                took.append(seconds)
                print(f"upgrade {len(took)}: pid {pid} serves after {seconds * 1000:.0f} ms", file=sys.stderr)
            else:
                flip = not flip
                with open(conf, "w") as f:
                    f.write(config_text(flip))
                os.kill(pid, signal.SIGHUP)
                reloads += 1
            time.sleep(max(0.0, due - time.monotonic()))
        h1_out, _ = h1.communicate(timeout=60)
        h2.join(timeout=60)
    finally:
        h2_stop.set()
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        time.sleep(1)
        shutil.copy(os.path.join(work, "agent.log"), "/tmp/w-lifecycle-agent.log")
        stop_all([backends], work)
    total1 = int(re.search(r"(\d+) requests in", h1_out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", h1_out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", h1_out)
    socket_errors = sum(map(int, socket.groups())) if socket else 0
    h2_done = h2_failed = h2_errored = h2_bad = 0
    for out in h2_runs:
        done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                         r"(\d+) errored", out)
        if not done:
            print(f"# h2load printed no totals:\n{out}", file=sys.stderr)
            h2_bad += 1
            continue
        status = re.search(r"status codes: (\d+) 2xx", out)
        ok = int(done.group(3))
        h2_done += int(done.group(2))
        h2_failed += int(done.group(4))
        h2_errored += int(done.group(5))
        # h2load's "errored" streams are a subset of its "failed" ones.
        h2_bad += int(done.group(4)) + max(ok - (int(status.group(1)) if status else 0), 0)
    print(f"\nW-lifecycle: {args.seconds} s of wrk -t1 -c50 (HTTP/1.1) + h2load -c10 -m10 (HTTP/2), "
          f"{reloads} reloads, {len(took)} upgrades; nproc={os.cpu_count()}")
    print("| load | requests | req/s | failed (non-2xx) | socket errors / failed streams |")
    print("|---|---|---|---|---|")
    print(f"| HTTP/1.1 keep-alive | {total1} | {total1 / load:.0f} | {int(non2xx.group(1)) if non2xx else 0} | "
          f"{socket.group(0) if socket else 'none'} |")
    print(f"| HTTP/2 ({len(h2_runs)} h2load runs) | {h2_done} | {h2_done / load:.0f} | {h2_bad} | "
          f"{h2_failed} failed, {h2_errored} errored |")
    if took:
        print(f"\nUpgrade, SIGUSR2 to the old agent's exit: {min(took) * 1000:.0f}–{max(took) * 1000:.0f} ms")
    bad = (int(non2xx.group(1)) if non2xx else 0) + socket_errors + h2_bad
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
