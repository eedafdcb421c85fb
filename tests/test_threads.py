"""The default thread count follows what a process may really use: its CPU affinity and its cgroup CPU quota (two
threads in a one-core group measured 2x slower than one: bench/bench_threads.py), and the memory check reads the
cgroup memory limit through the same cgroup lookup. Real cgroups, real processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cgroups import CpuCgroup, MemoryCgroup

PROBE = (
    "from dllama.runtime.threads import cpu_quota, default_threads, usable_cpus\n"
    "from dllama.runtime.memory import cgroup_available\n"
    "print(cpu_quota(), usable_cpus(), default_threads(), default_threads(2), cgroup_available())"
)


def probe(prefix: list[str] = (), wrap=None) -> list[str]:
    argv = [*prefix, sys.executable, "-c", PROBE]
    r = subprocess.run(wrap(argv) if wrap else argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_without_limits_every_cpu_of_the_affinity_mask():
    quota, usable, one, two, _ = probe()
    n = len(os.sched_getaffinity(0))
    assert quota == "None" and int(usable) == n and int(one) == n and int(two) == max(1, n // 2)


def test_the_affinity_mask_caps_the_default():
    quota, usable, one, *_ = probe(["taskset", "-c", "0"])
    assert int(usable) == 1 and int(one) == 1


@pytest.mark.parametrize(("quota_us", "cores", "threads"), [(5000, 0.5, 1), (10000, 1.0, 1), (15000, 1.5, 1)])
def test_a_cpu_quota_caps_the_default(quota_us, cores, threads):
    if os.geteuid() != 0:
        pytest.fail("CPU cgroups need root (the test machine and CI run as root)")
    with CpuCgroup(quota_us=quota_us, period_us=10000, tag="dllama-threads-test") as cg:
        quota, usable, one, two, _ = probe(cg.prefix())
    assert float(quota) == pytest.approx(cores)
    assert int(usable) == threads and int(one) == threads and int(two) == 1


def test_a_cpu_quota_above_the_cpus_changes_nothing():
    n = len(os.sched_getaffinity(0))
    with CpuCgroup(quota_us=10000 * (n + 1), period_us=10000, tag="dllama-threads-test") as cg:
        quota, usable, *_ = probe(cg.prefix())
    assert float(quota) == pytest.approx(n + 1) and int(usable) == n


def test_the_memory_limit_is_read_through_the_same_lookup():
    with MemoryCgroup(300 << 20, tag="dllama-threads-test") as cg:
        *_, avail = probe(wrap=cg.wrap)
    assert 0 < int(avail) <= 300 << 20


def test_the_worker_and_the_runtime_take_the_default(tmp_path):
    with CpuCgroup(quota_us=10000, period_us=10000, tag="dllama-threads-test") as cg:
        r = subprocess.run([*cg.prefix(), sys.executable, "-m", "dllama", "inference", "--prompt", "Hi", "--steps", "2",
                            "--temperature", "0"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "1 node(s) x 1 thread(s)" in r.stderr
