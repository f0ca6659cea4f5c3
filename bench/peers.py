"""What every proxy workload starts and measures, in one place: the origin
backends, the peers (nginx, HAProxy) from a workload's own configuration
fragment, the Switchyard agent under test, and the load tools (wrk, h2load)
with their CPU and steal accounting. The workload scripts (w_http.py,
w_h2.py, w_tcp.py, w_drain.py, ...) hold only what is their own: ports,
configuration fragments and the table they print.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

from procstat import cpu_seconds

# The origin: one nginx (worker_processes 1) answering on three ports.
BACKENDS = [18081, 18082, 18083]


def spawn(argv, **kwargs):
    """A process in a session of its own (so its CPU is summed over the
    session), output discarded unless `kwargs` say otherwise."""
    options = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    options.update(kwargs)
    return subprocess.Popen(argv, **options)


def json_body():
    """64 KiB of JSON (an array of small objects), as W-compress serves it."""
    items, i = [], 0
    while sum(len(x) for x in items) < 65536 - 64:
        items.append('{"id":%d,"name":"item %d","price":%d.%02d,"ok":true}' % (i, i, i * 7 % 1000, i % 100))
        i += 1
    return ("[" + ",".join(items) + "]").encode()


def start_backends(work):
    """The origin nginx: `/` answers 13 bytes, `/big` 64 KiB, `/json` 64 KiB
    of JSON (application/json)."""
    # nginx workers run as an unprivileged user: they must be able to read /big.
    os.chmod(work, 0o755)
    with open(os.path.join(work, "big"), "wb") as f:
        f.write(b"x" * 65536)
    os.chmod(os.path.join(work, "big"), 0o644)
    with open(os.path.join(work, "json"), "wb") as f:
        f.write(json_body())
    os.chmod(os.path.join(work, "json"), 0o644)
    listens = "".join(f"listen 127.0.0.1:{p} reuseport;" for p in BACKENDS)
    conf = os.path.join(work, "backends.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {work}/backends.pid; error_log {work}/backends.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  server {{ {listens}
    location = /big {{ alias {work}/big; default_type application/octet-stream; }}
    location = /json {{ alias {work}/json; default_type application/json; }}
    location / {{ return 200 "hello, world\\n"; }} }} }}
""")
    return spawn(["nginx", "-c", conf])


def nginx_upstreams():
    """`server` lines of nginx's upstream block for the origin."""
    return "".join(f"server 127.0.0.1:{p};" for p in BACKENDS)


def start_nginx(work, name, body, preamble=""):
    """nginx as a peer: 2 workers, `body` its `http { }` or `stream { }`
    block (use `nginx_upstreams()` for the origin), `preamble` lines before
    the main context (`load_module`)."""
    conf = os.path.join(work, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(f"""{preamble}worker_processes 2; daemon off; pid {work}/{name}.pid; error_log {work}/{name}.err;
events {{ worker_connections 8192; }}
{body}
""")
    return spawn(["nginx", "-c", conf])


def start_haproxy(work, name, port, mode="http", bind="", defaults="", frontend=""):
    """HAProxy as a peer: 2 threads, round robin over the origin, `mode`
    http or tcp, `bind` options after the address (`proto h2`), extra
    `defaults` and `frontend` lines."""
    servers = "\n".join(f"  server b{p} 127.0.0.1:{p}" for p in BACKENDS)
    conf = os.path.join(work, f"{name}.cfg")
    with open(conf, "w") as f:
        f.write(f"""global
  nbthread 2
  maxconn 4096
defaults
  mode {mode}
  timeout connect 5s
  timeout client 60s
  timeout server 60s
{defaults}frontend fe
  bind 127.0.0.1:{port} {bind}
{frontend}  default_backend be
backend be
  balance roundrobin
{servers}
""")
    return spawn(["haproxy", "-f", conf])


def require_binary(path):
    """Exits with a clear message, before anything is started, when the agent
    binary is missing (the default path is relative to the repository root)."""
    if not os.access(path, os.X_OK):
        sys.exit(f"no agent binary at {path}: run from the repository root after "
                 "`cargo build --release`, or pass --binary")


def start_switchyard(work, binary, config, args=(), register=True, node="bench"):
    """The agent under test with 2 proxy threads: `config` (TOML) after the
    environment's SY_EXTRA, API and DNS on free ports, `args` added (its
    `--http-addr`, say). Returns the process and its ready line; with
    `register` the origin is registered as service `web` first."""
    conf = os.path.join(work, "switchyard.toml")
    with open(conf, "w") as f:
        f.write(os.environ.get("SY_EXTRA", "") + "\n" + config)
    argv = [binary, "agent", "--config", conf, "--api-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0",
            "--proxy-threads", "2", "--data-dir", os.path.join(work, "sy-data"), "--node-name", node]
    proc = spawn(argv + list(args), stdout=subprocess.PIPE, text=True)
    ready = json.loads(proc.stdout.readline())
    if register:
        register_backends(ready["api"])
    return proc, ready


def register_backends(api):
    """Registers the origin as service `web` through the agent at `api`."""
    batch = {"nodes": [{"name": "backends", "address": "127.0.0.1"}],
             "endpoints": [{"node": "backends", "service": "web", "id": f"web-{p}", "port": p} for p in BACKENDS]}
    req = urllib.request.Request(f"http://{api}/v1/switchyard/batch", data=json.dumps(batch).encode(),
                                 method="PUT")
    urllib.request.urlopen(req).read()


def wait_http(port, path):
    """Waits (20 s at most) for a 200 on `path`; returns the body's length."""
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                if r.status == 200:
                    return len(r.read())
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"nothing answers on port {port}")


def to_ms(text):
    match = re.match(r"([\d.]+)(us|ms|s)$", text)
    if not match:
        print(f"# unreadable latency {text!r}", file=sys.stderr)
        return float("nan")
    value, unit = match.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(port, path, connections, seconds, headers=()):
    """1 s of warm-up thrown away, then `wrk -t1` (with `headers`, "Name:
    value" each): req/s, requests, p99 (ms), non-2xx count, socket errors."""
    url = f"http://127.0.0.1:{port}{path}"
    extra = [arg for h in headers for arg in ("-H", h)]
    subprocess.run(["wrk", "-t1", f"-c{connections}", "-d1s", *extra, url], capture_output=True)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *extra, url],
                         capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p99_line = re.search(r"^\s*99%\s+(\S+)", out, re.M)
    if not p99_line:
        print(f"# wrk printed no latency distribution:\n{out}", file=sys.stderr)
    p99 = to_ms(p99_line.group(1)) if p99_line else float("nan")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return rps, total, p99, int(errors.group(1)) if errors else 0, socket_errors.group(1) if socket_errors else ""


def h2load(port, seconds):
    """`h2load -c50 -m10 -t1` (prior knowledge): req/s, requests done, and
    requests that failed or did not get a 2xx."""
    url = f"http://127.0.0.1:{port}/"
    out = subprocess.run(["h2load", "-c50", "-m10", "-t1", f"-D{seconds}", "--warm-up-time=1", url],
                         capture_output=True, text=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    total, succeeded, failed, errored = int(done.group(2)), int(done.group(3)), int(done.group(4)), int(done.group(5))
    status = re.search(r"status codes: (\d+) 2xx", out)
    ok = int(status.group(1)) if status else 0
    return rps, total, failed + errored + max(succeeded - ok, 0)


# A run in which the hypervisor stole more than this share of the machine's
# time measures the host's other guests, not the candidate: it is run again.
MAX_STEAL = float(os.environ.get("BENCH_MAX_STEAL", "0.05"))


def steal_and_total_ticks():
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return fields[7], sum(fields)


def measured_wrk(port, path, connections, seconds, pids, tries=4, headers=()):
    """`wrk`, plus the CPU µs per request of `pids` (nan without pids) and the
    share of machine time stolen meanwhile; a run with more than MAX_STEAL
    stolen is repeated, up to `tries` runs in all (the last one is kept)."""
    for attempt in range(tries):
        steal0, total0 = steal_and_total_ticks()
        before = cpu_seconds(pids)
        rps, total, p99, bad, sock = wrk(port, path, connections, seconds, headers)
        cpu_us = (cpu_seconds(pids) - before) * 1e6 / max(total, 1) if pids else float("nan")
        steal1, total1 = steal_and_total_ticks()
        steal = (steal1 - steal0) / max(total1 - total0, 1)
        if steal <= MAX_STEAL or attempt == tries - 1:
            return rps, total, p99, bad, sock, cpu_us, steal
        print(f"# {steal:.0%} of the machine stolen by the hypervisor: run again", file=sys.stderr)


def stop_all(procs, work):
    """SIGTERM every process, wait (bounded), kill stragglers, remove `work`."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(work, ignore_errors=True)
