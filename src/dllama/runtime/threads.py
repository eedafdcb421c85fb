"""How many compute threads a node uses by default: the CPUs it may run on (its affinity mask and its cgroup CPU
quota, v1 `cpu.cfs_quota_us` / v2 `cpu.max`), shared fairly by the nodes started on this machine.

Why the quota matters: the thread pool's workers spin for a moment between the ops of a pass; two threads in a
group allowed one core burn the group's quota on spinning and get throttled for the rest of the period, which
measured slower than one thread (bench/bench_threads.py)."""

from __future__ import annotations

import math
import os

from dllama.runtime.cgroup import group_dirs, read


def cpu_quota() -> float | None:
    """Cores the process's CPU cgroup allows (the tightest of the group and its ancestors), or None."""
    best = None
    for v2, d in group_dirs("cpu"):
        if v2:
            q, _, period = (read(f"{d}/cpu.max") or "max").partition(" ")
        else:
            q, period = read(f"{d}/cpu.cfs_quota_us") or "-1", read(f"{d}/cpu.cfs_period_us") or "0"
        if q.isdigit() and period.isdigit() and int(period) > 0:  # "max" and -1 are "no limit"
            cores = int(q) / int(period)
            best = cores if best is None else min(best, cores)
    return best


def usable_cpus() -> int:
    """Whole CPUs this process can keep busy: its affinity mask, capped by its cgroup quota (at least one)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota + 1e-9)))
    return max(1, n)


def default_threads(nodes_here: int = 1) -> int:
    """Threads per node when --nthreads is not given: the usable CPUs split among the nodes on this machine."""
    return max(1, usable_cpus() // max(1, nodes_here))
