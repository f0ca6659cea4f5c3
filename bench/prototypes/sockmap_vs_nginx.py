#!/usr/bin/env python3
"""W-tcp through the sockmap prototype (sockmap_l4.c) beside nginx stream,
alternating rounds, machine-wide CPU per request (the redirect's work runs in
kworkers, outside the proxy's PID). Usage, from the repository root, as root:
  mkdir -p /tmp/sk && gcc -O2 -o /tmp/sk/skproxy bench/prototypes/sockmap_l4.c -lpthread
  python3 bench/prototypes/sockmap_vs_nginx.py 3
"""
import os, subprocess, sys, tempfile, time, statistics
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import w_http, w_tcp

def busy():
    f = open("/proc/stat").readline().split()[1:]
    v = list(map(int, f))
    idle = v[3] + v[4]
    return (sum(v) - idle) / os.sysconf("SC_CLK_TCK")

work = tempfile.mkdtemp(prefix="sk-")
backends = w_http.start_backends(work)
sk = subprocess.Popen(["/tmp/sk/skproxy", "18095"] + [str(p) for p in w_http.BACKENDS], stderr=open("/tmp/sk/sk.err", "w"), start_new_session=True)
ng = w_tcp.start_nginx(work)
ports = {"sockmap": 18095, "nginx": w_tcp.PORTS["nginx"]}
res = {k: [] for k in ports}
try:
    time.sleep(1)
    for name in ports: w_http.wait_http(ports[name], "/")
    for rnd in range(int(sys.argv[1])):
        for name in (list(ports) if rnd % 2 == 0 else list(ports)[::-1]):
            b = busy()
            rps, total, p99, bad, sock = w_http.wrk(ports[name], "/", 50, 6)
            cpu = (busy() - b) * 1e6 / max(total, 1)
            res[name].append((rps, p99, cpu))
            print(f"round {rnd} {name}: {rps:.0f} req/s p99 {p99:.2f} ms machine CPU {cpu:.1f} us/req bad {bad} {sock}", flush=True)
finally:
    for p in (sk, ng): p.terminate()
    w_http.stop_all([backends], work)
    print(open("/tmp/sk/sk.err").read()[-300:])
med = statistics.median
for name in ports:
    r = res[name]
    print(name, f"{med(x[0] for x in r):.0f} req/s", f"ratio {med(a[0]/b[0] for a, b in zip(r, res['nginx'])):.2f}",
          f"machine CPU ratio {med(a[2]/b[2] for a, b in zip(r, res['nginx'])):.2f}", f"p99 {med(x[1] for x in r):.2f}")
