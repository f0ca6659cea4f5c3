"""CPU time of server processes from /proc, shared by the bench scripts."""

import os

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    """utime + stime of `pids`, in seconds (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICK


def session_pids(pid):
    """Every process of `pid`'s session (servers that fork workers)."""
    pids = []
    for task in os.listdir("/proc"):
        if task.isdigit():
            try:
                with open(f"/proc/{task}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[3]) == pid:
                        pids.append(int(task))
            except OSError:
                pass
    return pids
