"""The emulated home cluster of bench/bench_home_cluster.py, small: root and worker each in its own network namespace
and CPU cgroup (half a core), joined through a bridge by veth links limited to 1 Gbit/s in both directions.

Needs root and iproute2; without them it fails loudly with the reason, it is never skipped."""

import os
import re
import subprocess
import sys

import pytest
from cgroups import CpuCgroup
from netns import Star, loopback_text, text_of

pytestmark = pytest.mark.netns

PROMPT = "The capital of France is"


def test_two_node_star_with_cpu_budgets_matches_loopback(default_model):
    if os.geteuid() != 0:
        pytest.fail("this test creates network namespaces and cgroups and must run as root (CI does)")
    common = ["--prompt", PROMPT, "--steps", "16", "--temperature", "0", "--nthreads", "1"]
    local = loopback_text(common, timeout=180)
    with Star(2, rate="1gbit") as star, CpuCgroup(5000, 10000) as cg_root, CpuCgroup(5000, 10000) as cg_worker:
        qdiscs = [subprocess.run(["tc", "-n", ns, "qdisc", "show"], capture_output=True, text=True).stdout
                  for ns in (*star.namespaces, star.ns_switch)]  # fmt: skip
        assert all(q.count("tbf") >= 1 and "rate 1Gbit" in q for q in qdiscs[:2]) and qdiscs[2].count("tbf") == 2
        worker = subprocess.Popen(
            [*cg_worker.prefix(), *star.prefix(1), sys.executable, "-m", "dllama", "worker", "--host", star.addrs[1],
             "--port", "9990", "--nthreads", "1", "--secret", "home-secret"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert worker.stdout.readline().startswith("listening on"), worker.stderr.read()
            assert worker.pid in cg_worker.pids()  # the worker itself, not just a shell, runs inside its budget
            root = subprocess.run(
                [*cg_root.prefix(), *star.prefix(0), sys.executable, "-m", "dllama", "inference", *common,
                 "--secret", "home-secret", "--workers", f"{star.addrs[1]}:9990", "--per-token"],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
        finally:
            worker.terminate()
            worker.wait(timeout=10)
        used = cg_root.stat(), cg_worker.stat()
        # loopback is not the way between the two namespaces: the root cannot reach the worker at 127.0.0.1
        probe = subprocess.run([*star.prefix(0), sys.executable, "-c", "import socket; socket.create_connection("
                                "('127.0.0.1', 9990), timeout=2)"], capture_output=True, text=True)  # fmt: skip
    assert root.returncode == 0, root.stderr
    assert text_of(root.stdout) == local
    assert text_of(root.stdout).startswith(PROMPT + " Paris")
    m = re.search(r"sent ([\d.]+) kB, received ([\d.]+) kB", root.stdout)
    assert m and float(m.group(1)) > 30  # Q80 partial sums really crossed the bridge
    for u in used:  # both processes ran under a quota of 5 ms per 10 ms period
        assert u["usage_s"] > 0.05 and u["periods"] > 10, u
    assert probe.returncode != 0 and "Connection refused" in probe.stderr
    assert not any(ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
                   for ns in star.namespaces)  # fmt: skip
