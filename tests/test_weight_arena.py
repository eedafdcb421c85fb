"""The engine keeps its repacked weights in huge pages (engine/csrc/arena.c): decoding streams every weight once per
token, and 2 MiB pages save the page walks of 4 KiB ones (bench_single.py before/after in the commit). Checked from
outside the engine, in the kernel's own accounting of a fresh process (AnonHugePages in /proc/self/smaps_rollup),
and the packing must not cost memory: the process's anonymous memory stays within a few MiB of the weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

THP = "/sys/kernel/mm/transparent_hugepage/enabled"

CHILD = r"""
import json
from dllama.model.default import default_model_path
from dllama.model.gguf_model import GGUFModel
from dllama.runtime.root import Root

def rollup():
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        k, _, v = line.partition(":")
        if v.strip().endswith("kB"):
            out[k] = int(v.split()[0]) * 1024
    return out

before = rollup()
model = GGUFModel(str(default_model_path()), verbose=False)
root = Root(model, nthreads=1, max_seq=64, log=lambda *a: None)
root.run([1], 0, "argmax")
after = rollup()
repacked = sum(t.nbytes for t in model.tensors.values() if t.type in (2, 3, 8))  # Q4_0, Q4_1, Q8_0
print(json.dumps({"huge": after["AnonHugePages"] - before["AnonHugePages"],
                  "anon": after["Anonymous"] - before["Anonymous"], "repacked": repacked}))
"""


def _thp_mode() -> str:
    try:
        with open(THP) as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "absent"


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason=f"transparent huge pages off here ({THP})")
def test_repacked_weights_live_in_huge_pages():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["repacked"] > 50 << 20
    # whole 2 MiB pages only: the arena's chunk ends and the odd tensor on its own stay in small pages
    assert m["huge"] >= 0.8 * m["repacked"], m
    # packing tensors together must not waste memory: an arena chunk's unused tail is never touched
    assert m["anon"] <= m["repacked"] + (16 << 20), m
