#!/usr/bin/env python3
"""W-tcp through the io_uring prototype (uring_l4.c) beside nginx stream:
alternating rounds, req/s, the proxy's CPU per request and the machine's.
Usage, from the repository root:
  mkdir -p /tmp/ur && gcc -O2 -o /tmp/ur/urproxy bench/prototypes/uring_l4.c -luring -lpthread
  python3 bench/prototypes/uring_vs_nginx.py ROUNDS [NAME=BINARY ...]
With NAME=BINARY arguments, each named build of the prototype (say
ms=/tmp/ur/urms, compiled with -DMULTISHOT) runs too, on its own port.
(needs apt-get install -y liburing-dev nginx libnginx-mod-stream wrk)
"""
import os, subprocess, sys, tempfile, time, statistics
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import w_http, w_tcp
from procstat import session_pids

def busy():
    v = list(map(int, open("/proc/stat").readline().split()[1:]))
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")

work = tempfile.mkdtemp(prefix="ur-")
backends = w_http.start_backends(work)
builds = {"uring": "/tmp/ur/urproxy"}
builds.update(arg.split("=", 1) for arg in sys.argv[2:])
procs, ports = {}, {}
for i, (name, binary) in enumerate(builds.items()):
    ports[name] = 18096 + i
    procs[name] = subprocess.Popen([binary, str(ports[name])] + [str(p) for p in w_http.BACKENDS], start_new_session=True)
procs["nginx"] = ng = w_tcp.start_nginx(work)
ports["nginx"] = w_tcp.PORTS["nginx"]
res = {k: [] for k in ports}
try:
    for name in ports: w_http.wait_http(ports[name], "/")
    for rnd in range(int(sys.argv[1])):
        for name in (list(ports) if rnd % 2 == 0 else list(ports)[::-1]):
            pids = session_pids(procs[name].pid)
            b = busy()
            rps, total, p99, bad, sock, pcpu, steal = w_http.measured_wrk(ports[name], "/", 50, 6, pids)
            # Machine CPU over every try measured_wrk made; close enough when it made one.
            mcpu = (busy() - b) * 1e6 / max(total, 1)
            res[name].append((rps, p99, pcpu, mcpu))
            print(f"round {rnd} {name}: {rps:.0f} req/s p99 {p99:.2f} ms proxy CPU {pcpu:.1f} us/req machine {mcpu:.1f} us/req bad {bad} {sock} steal {steal:.0%}", flush=True)
finally:
    for p in procs.values(): p.terminate()
    w_http.stop_all([backends], work)
med = statistics.median
for name in ports:
    r, n = res[name], res["nginx"]
    print(name, f"{med(x[0] for x in r):.0f} req/s", f"ratio {med(a[0]/b[0] for a, b in zip(r, n)):.2f}",
          f"proxy CPU ratio {med(a[2]/b[2] for a, b in zip(r, n)):.2f}",
          f"machine CPU ratio {med(a[3]/b[3] for a, b in zip(r, n)):.2f}", f"p99 {med(x[1] for x in r):.2f}")
