"""How many threads a node should use: decode and prefill tok/s for every thread count from 1 to the machine's
CPUs, on a tiny and a larger model, with the whole machine and inside a CPU cgroup of a smaller quota; and what
`--nthreads`'s default (dllama.runtime.threads.default_threads) picks in each setup against the best measured.
Setups run interleaved, each in a fresh process, medians over the rounds.

    sudo python bench/bench_threads.py [--rounds 3] [--quotas 0 1.0 0.5] [--models smol 1b]

A quota of 0 means no cgroup; others run the benchmark inside a cgroup v1 `cpu` group (or v2 cpu.max) allowing that
many cores (CFS period 10 ms), as a container or a small VM would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from dllama_peer import bench_dllama  # noqa: E402
from llamacpp_peer import default_prompt_tokens  # noqa: E402
from models import smollm2_original, synthetic_1b  # noqa: E402

MODELS = {"smol": ("SmolLM2-135M Q4_1", smollm2_original), "1b": ("1B shape Q4_0", synthetic_1b)}
PERIOD_US = 10000


def default_inside(prefix: list[str]) -> int:
    """What the default picks when run in the same cgroup as the benchmark."""
    code = "from dllama.runtime.threads import default_threads; print(default_threads())"
    return int(subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n-decode", type=int, default=64)
    p.add_argument("--quotas", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    a = p.parse_args()
    ncpu = len(os.sched_getaffinity(0))
    prompt = default_prompt_tokens(100)
    rows = []
    for key in a.models:
        label, make = MODELS[key]
        path = make()
        for quota in a.quotas:
            cg = None
            if quota:
                from cgroups import CpuCgroup

                cg = CpuCgroup(quota_us=int(quota * PERIOD_US), period_us=PERIOD_US, tag="dllama-threads")
            prefix = cg.prefix() if cg else []
            try:
                picked = default_inside(prefix)
                res: dict[int, list[dict]] = {t: [] for t in range(1, ncpu + 1)}
                for r in range(a.rounds):
                    order = list(res) if r % 2 == 0 else list(reversed(res))
                    for t in order:
                        res[t].append(bench_dllama(path, t, a.n_decode, prompt, prefix=prefix))
            finally:
                if cg:
                    cg.close()
            med = {t: {f: statistics.median(o[f] for o in v) for f in ("decode_tps", "prefill_tps")}
                   for t, v in res.items()}  # fmt: skip
            best = max(med, key=lambda t: med[t]["decode_tps"])
            for t, m in med.items():
                rows.append(dict(model=label, quota=quota or None, threads=t, decode=m["decode_tps"],
                                 prefill=m["prefill_tps"], best=t == best, default=t == picked,
                                 default_vs_best=med[picked]["decode_tps"] / med[best]["decode_tps"]))  # fmt: skip
            print(json.dumps(rows[-len(med) :]), file=sys.stderr)
    print(
        f"\nthreads per node ({ncpu} CPUs, {a.rounds} rounds, {a.n_decode} decode tokens, 100-token prompt)"
    )
    print("| model | cgroup quota | threads | decode tok/s | prefill tok/s | |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mark = ", ".join(x for x, on in (("best decode", r["best"]), ("default", r["default"])) if on)
        q = f"{r['quota']:g} core" if r["quota"] else "none"
        print(f"| {r['model']} | {q} | {r['threads']} | {r['decode']:.1f} | {r['prefill']:.1f} | {mark} |")
    worst = min(r["default_vs_best"] for r in rows)
    print(f"\ndefault's decode vs the best thread count, worst setup: {worst:.2f}x")


if __name__ == "__main__":
    main()
