"""Root and worker on different hosts: two network namespaces joined by a veth pair limited to 1 Gbit/s.

Needs root and iproute2 (scripts/test.sh installs iproute2). Without them the test fails loudly with the
reason: it is never skipped silently."""

import os
import re
import subprocess
import sys
import time

import pytest
from netns import VethPair, loopback_text, text_of

pytestmark = pytest.mark.netns

PROMPT = "The capital of France is"


def test_root_and_worker_in_separate_namespaces(default_model):
    if os.geteuid() != 0:
        pytest.fail("this test creates network namespaces and must run as root (CI does)")
    common = ["--prompt", PROMPT, "--steps", "24", "--temperature", "0", "--nthreads", "1"]
    local = loopback_text(common, timeout=120)
    with VethPair(rate="1gbit") as net:
        worker = subprocess.Popen(
            [*net.prefix(net.ns_b), sys.executable, "-m", "dllama", "worker", "--host", net.addr_b, "--port", "9990",
             "--nthreads", "1", "--secret", "ns-secret"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert worker.stdout.readline().startswith("listening on"), worker.stderr.read()
            t0 = time.monotonic()
            root = subprocess.run(
                [*net.prefix(net.ns_a), sys.executable, "-m", "dllama", "inference", *common, "--secret", "ns-secret",
                 "--workers", f"{net.addr_b}:9990", "--per-token"],
                capture_output=True, text=True, timeout=180,
            )  # fmt: skip
            elapsed = time.monotonic() - t0
        finally:
            worker.terminate()
            worker.wait(timeout=10)
    assert root.returncode == 0, root.stderr
    assert text_of(root.stdout) == local
    assert text_of(root.stdout).startswith(PROMPT + " Paris")
    m = re.search(r"sent ([\d.]+) kB, received ([\d.]+) kB", root.stdout)
    assert m and float(m.group(1)) > 30  # Q80 partial sums really crossed the veth pair
    print(f"2 nodes over veth (1 Gbit/s) in {elapsed:.1f} s: {root.stdout.splitlines()[-2]}")
