"""Memory per node divided by N, root included: the 1B-shape model on 2 and 3 nodes, every node in its own memory
cgroup limited to its slice + its KV cache + MARGIN, gives the same greedy text as without limits; the same budget on
one node is refused before loading, with the numbers (not killed). Needs root (cgroups), like the netns test."""

import os
import re
import subprocess
import sys

import pytest
from cgroups import MemoryCgroup

from dllama.model.gguf_model import GGUFModel
from dllama.runtime.root import Root
from dllama.testing.synthetic import SHAPES, write_synthetic_gguf

MARGIN = 10 / 100, 160 << 20  # 10 % + 160 MB over slice + KV: the runtime (~130 MB) and buffers
SECRET = "mem-secret"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_1b(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("this test puts processes in memory cgroups and must run as root (CI does)")
    return write_synthetic_gguf(str(tmp_path_factory.mktemp("m1b") / "1b.gguf"), **SHAPES["1b"], weight_type="q4_0")


def budgets(path: str, n: int, max_seq: int) -> list[int]:
    r = Root(GGUFModel(path, verbose=False), max_seq=max_seq, workers=[f"x:{i}" for i in range(n - 1)], dry_run=True,
             log=lambda *a: None)  # fmt: skip
    return [int((m.weights + m.kv_cache) * (1 + MARGIN[0]) + MARGIN[1]) for m in r.memory]


def run(path: str, limits: list[int | None], max_seq: int = 1024) -> subprocess.CompletedProcess:
    cgs = [MemoryCgroup(lim) for lim in limits]
    workers = []
    try:
        for cg in cgs[1:]:
            p = subprocess.Popen(cg.wrap([sys.executable, "-m", "dllama", "worker", "--port", "0", "--nthreads", "1",
                                          "--secret", SECRET]), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
            workers.append((p, p.stdout.readline().split()[-1]))
        cmd = [sys.executable, "-m", "dllama", "inference", "--model", path, "--prompt", "Hello world", "--steps", "12",
               "--temperature", "0", "--nthreads", "1", "--max-seq-len", str(max_seq), "--secret", SECRET]
        if workers:
            cmd += ["--workers", *[a for _, a in workers]]
        r = subprocess.run(cgs[0].wrap(cmd), capture_output=True, text=True, timeout=600)
        r.oom = [cg.oom_killed() for cg in cgs]
        return r
    finally:
        for p, _ in workers:
            p.terminate()
            p.wait(timeout=10)
        for cg in cgs:
            cg.close()


def text(r: subprocess.CompletedProcess) -> str:
    return re.split(r"\n\n(?:prompt:)", r.stdout)[0]


@pytest.mark.parametrize("n", [2, 3])
def test_every_node_runs_within_its_slice_plus_kv_plus_margin(model_1b, n):
    free = run(model_1b, [None] * n)
    assert free.returncode == 0, free.stderr[-2000:]
    limits = budgets(model_1b, n, 1024)
    tight = run(model_1b, limits)
    print(f"{n} nodes, limits {[f'{x / 1e6:.0f} MB' for x in limits]}: exit {tight.returncode}, oom {tight.oom}")
    assert tight.returncode == 0, tight.stderr[-2000:]
    assert not any(tight.oom)
    assert text(tight) == text(free) and len(text(free)) > len("Hello world")


def test_the_same_budget_on_one_node_is_refused_before_loading(model_1b):
    limit = budgets(model_1b, 3, 1024)[0]
    r = run(model_1b, [limit])
    err = r.stderr.strip().splitlines()
    print(err[-1])
    assert r.returncode == 1 and not any(r.oom)
    assert "does not fit in memory" in err[-1] and "MB available" in err[-1]
    assert "Traceback" not in r.stderr
