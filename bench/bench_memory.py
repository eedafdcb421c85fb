"""Peak memory per node against the ideal (its slice + its KV cache), and which budgets can run which models.

Each node (root included) runs in its own memory cgroup; the peak is the cgroup's `max_usage_in_bytes` (page cache
included) and the process's VmHWM (resident high-water mark). Goal (issue "memory per node divided by N"): every
node <= slice + KV + 10 % + 100 MB.

    python bench/bench_memory.py [--nodes 1 2 3 4] [--max-seq-len 1024] [--budgets 300 450 700]   (needs root)
    python bench/bench_memory.py --model default --max-seq-len 0 --nodes 1 2 --kv f32 f16

--model default: SmolLM2-135M (the default model) instead of the 1B shape; --max-seq-len 0: the model's own context
(the default of `dllama inference`); --kv: one table block per KV cache type (default: dllama's default type).
--full-cache: every node runs with MALLOC_PERTURB_, so glibc writes every page of the calloc'd KV cache and the peak is
that of a full context (otherwise a 16-token run touches only the cache pages it uses).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from cgroups import MemoryCgroup  # noqa: E402
from models import synthetic_1b  # noqa: E402

SECRET = "bench-memory"


def hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


def start_worker(cg: MemoryCgroup, env=None) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(cg.wrap([sys.executable, "-m", "dllama", "worker", "--port", "0", "--nthreads", "1",
                                  "--secret", SECRET]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)  # fmt: skip
    line = p.stdout.readline()
    if not line.startswith("listening on"):
        raise RuntimeError(f"worker did not start: {line!r}")
    return p, line.split()[-1]


def run(path: str, n: int, max_seq: int, limits: list[int | None] | None = None, steps: int = 16,
        kv: str | None = None, full_cache: bool = False) -> dict:  # fmt: skip
    """Runs the model on n nodes, each in its own cgroup; returns peaks, text, exit code and stderr tail."""
    limits = limits or [None] * n
    cgs = [MemoryCgroup(limits[i]) for i in range(n)]
    env = dict(os.environ, MALLOC_PERTURB_="165") if full_cache else None
    workers = []
    try:
        for cg in cgs[1:]:
            workers.append(start_worker(cg, env))
        cmd = [sys.executable, "-m", "dllama", "inference", "--model", path, "--prompt", "Hello world", "--steps",
               str(steps), "--temperature", "0", "--nthreads", "1", "--secret", SECRET]
        cmd += ["--max-seq-len", str(max_seq)] if max_seq else []
        cmd += ["--kv-cache-type", kv] if kv else []
        if workers:
            cmd += ["--workers", *[a for _, a in workers]]
        root = subprocess.Popen(cgs[0].wrap(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        peak_hwm = [0] * n
        while root.poll() is None:
            for i, pid in enumerate([root.pid] + [w.pid for w, _ in workers]):
                peak_hwm[i] = max(peak_hwm[i], hwm(pid))
            time.sleep(0.05)
        out, err = root.communicate()
        time.sleep(0.3)
        return {"code": root.returncode, "text": out.split("\n\n")[0], "err": err.strip().splitlines()[-3:],
                "cgroup_peak": [cg.peak() for cg in cgs], "hwm": peak_hwm, "oom": [cg.oom_killed() for cg in cgs],
                "tok_s": float(m.group(1)) if (m := re.search(r"generation: ([\d.]+) tokens/s", out)) else 0.0}  # fmt: skip
    finally:
        for w, _ in workers:
            w.terminate()
            w.wait(timeout=10)
        time.sleep(0.2)
        for cg in cgs:
            cg.close()


def ideal(path: str, n: int, max_seq: int, kv: str | None = None) -> list:
    from dllama.model.gguf_model import GGUFModel
    from dllama.runtime.root import Root

    kw = {"kv_type": kv} if kv else {}
    r = Root(GGUFModel(path, verbose=False), max_seq=max_seq or None, workers=[f"x:{i}" for i in range(n - 1)],
             dry_run=True, log=lambda *a: None, **kw)  # fmt: skip
    return r.memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--budgets", type=int, nargs="*", default=[], help="per-node cgroup limits in MB for the table")
    ap.add_argument("--model", default="1b", help="1b (synthetic 1B shape, Q4_0), default (SmolLM2-135M) or a path")
    ap.add_argument("--full-cache", action="store_true", help="make every KV cache page resident (MALLOC_PERTURB_)")
    ap.add_argument("--kv", nargs="+", default=[None], choices=["f32", "f16", "q8_0"], help="KV cache types")
    a = ap.parse_args()
    if a.model == "1b":
        path, name = synthetic_1b(), "1B-shape Q4_0"
    elif a.model == "default":
        from dllama.model.default import default_model_path

        path, name = default_model_path(), "SmolLM2-135M Q4_1 (the default model)"
    else:
        path, name = a.model, os.path.basename(a.model)
    seq = a.max_seq_len or "the model's"
    print(f"{name} ({os.path.getsize(path) / 1e6:.0f} MB file), --max-seq-len {seq}, greedy 16 tokens"
          + (", every KV cache page resident (--full-cache)" if a.full_cache else ""))
    print(f"{'kv':>4} {'N':>2} {'node':>4} {'KV MB':>6} {'slice+KV MB':>11} {'goal MB':>8} {'VmHWM MB':>9} "
          f"{'cgroup peak MB':>14} {'ok':>3}")  # fmt: skip
    for n in a.nodes:
        for kv in a.kv:  # types interleaved within a node count
            mem = ideal(path, n, a.max_seq_len, kv)
            r = run(path, n, a.max_seq_len, kv=kv, full_cache=a.full_cache)
            if r["code"] != 0:
                print(f"{kv or 'dflt':>4} {n:>2} failed: {r['err']}")
                continue
            for i in range(n):
                base = mem[i].weights + mem[i].kv_cache
                goal = base * 1.1 + 100e6
                print(f"{mem[i].kv_type:>4} {n:>2} {i:>4} {mem[i].kv_cache / 1e6:>6.0f} {base / 1e6:>11.0f} "
                      f"{goal / 1e6:>8.0f} {r['hwm'][i] / 1e6:>9.0f} {r['cgroup_peak'][i] / 1e6:>14.0f} "
                      f"{'yes' if r['hwm'][i] <= goal else 'NO':>3}")  # fmt: skip
    if a.budgets:
        print("\nper-node budget (cgroup limit) -> which node counts run the 1B shape (tok/s), like the seed's table")
        for mb in a.budgets:
            row = []
            for n in a.nodes:
                r = run(path, n, a.max_seq_len, [mb << 20] * n, steps=8)
                row.append(f"{n} nodes: " + (f"{r['tok_s']:.1f} tok/s" if r["code"] == 0 else
                                             ("not enough RAM" if "does not fit" in " ".join(r["err"]) else f"failed ({r['err'][-1][:60]})")))  # fmt: skip
            print(f"{mb:>5} MB  " + " | ".join(row))


if __name__ == "__main__":
    main()
