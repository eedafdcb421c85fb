"""Plants known bugs one at a time in a throw-away copy of the repository and checks that the tests catch each:

  python scripts/mutate.py            # all mutants
  python scripts/mutate.py dropped-block argmax-sampler

Every mutant is an exact text substitution (the original text must occur exactly once, so a refactor that moves
the code makes this script fail loudly instead of planting nothing). The copy is made once (git's tracked files
of HEAD plus the built extensions); C mutants rebuild it and get the pristine extensions back afterwards. Each
mutant runs only the test files that promise to catch it, stopping at the first failure, and the script prints a
table: mutant, caught, by which test (and the first line of its failure). Exit status 1 if any survived."""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: list[str]
    expect: str = ""  # a phrase the failure output must contain (e.g. "unexplained divergence")


GRAPH = "src/dllama/engine/csrc/graph.c"
MUTANTS = [
    Mutant("f32-for-q80", "src/dllama/engine/engine.py",
           '"q80": _kernels.SYNC_Q80,', '"q80": _kernels.SYNC_F32,',
           ["tests/test_traffic.py::test_kernel_counted_bytes_match_the_hand_computed_formula[q80]"]),
    Mutant("argmax-sampler", "src/dllama/sampling/sampler.py",
           "if self.temperature == 0.0:", "if True:",
           ["tests/test_sampling.py", "-k", "not distributed"]),
    Mutant("own-partial-unquantized", GRAPH,
           "        if (e->c.sync == SYNC_Q80) accumulate_q80(e->acc, (const block_q8_0 *)p, (int)n);",
           "        if (e->c.sync == SYNC_Q80 && node == cm->self) for (size_t i = 0; i < n; i++) e->acc[i] += "
           "e->out[i];\n        else if (e->c.sync == SYNC_Q80) accumulate_q80(e->acc, (const block_q8_0 *)p, (int)n);",
           ["tests/test_distributed.py", "-k", "argmax_agrees_where_clear and 2-q80"], expect="residual stream"),
    Mutant("dropped-block", GRAPH,
           "        if (e->c.sync == SYNC_Q80) accumulate_q80(e->acc, (const block_q8_0 *)p, (int)n);",
           "        if (e->c.sync == SYNC_Q80) { const int d = node == cm->self ? 0 : 1;\n"
           "            accumulate_q80(e->acc + 32 * d, (const block_q8_0 *)p + d, (int)n - 32 * d); }",
           ["tests/test_distributed.py", "-k", "greedy_agrees_with_single_node and 2-q80"],
           expect="unexplained divergence"),
    Mutant("rope-sign-flip", GRAPH,
           "            v[i + half] = a * sin_t[i] + b * cos_t[i];",
           "            v[i + half] = a * sin_t[i] - b * cos_t[i];",
           ["tests/test_architectures.py", "-k", "single_node"]),
    Mutant("silu-sign-flip", "src/dllama/engine/csrc/kernels.c",
           "g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];", "g[i] = g[i] / (1.0f + expf(g[i])) * u[i];",
           ["tests/test_kernels.py"]),
    Mutant("split-offset", "src/dllama/split/plan.py",
           "            return v.col_slice(h0 * hd, h1 * hd)\n        if s in (Split.FFN_ROWS",
           "            return v.col_slice(h0 * hd // 2, h0 * hd // 2 + (h1 - h0) * hd)\n        if s in (Split.FFN_ROWS",
           ["tests/test_distributed.py", "-k", "synthetic_8kv_exact"]),
    Mutant("special-token-check", "src/dllama/tokenizer/tokenizer.py",
           '"special_ids": [i for i, t in enumerate(types) if t == _CONTROL],',
           '"special_ids": [i for i, t in enumerate(types) if False],',
           ["tests/test_tokenizer.py"]),
    Mutant("skipped-q-bias", GRAPH,
           "        add_rows(e->q, (const float *)LT(e, l, S_Q_BIAS)->data, T, qd);\n", "",
           ["tests/test_architectures.py", "-k", "single_node"]),
    Mutant("moe-no-renorm", GRAPH,
           "c->norm_topk ? w[j] / wsum : w[j];", "w[j];",
           ["tests/test_architectures.py", "-k", "single_node"]),
    Mutant("sampling-drops-worker-logits", "src/dllama/runtime/cluster/tcp.py",
           "out[v0:v1] = np.frombuffer(got.values, dtype=np.float32)", "out[v0:v1] = 0.0",
           ["tests/test_sampling.py", "-k", "distributed"]),
    Mutant("rope-linear-scaling-ignored", "src/dllama/engine/rope.py",
           " / cfg.rope_linear_scale", "", ["tests/test_rope_scaling.py"]),
    Mutant("rope-freqs-ignored", "src/dllama/engine/rope.py",
           "freqs = freqs / np.asarray(cfg.rope_freq_factors, dtype=np.float64)", "freqs = freqs",
           ["tests/test_rope_scaling.py"]),
]


def sh(cmd: list[str], cwd: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def make_copy() -> str:
    d = tempfile.mkdtemp(prefix="dllama-mutants-")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for f in files.decode().split("\0"):
        if f and os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(d, f)) or d, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(d, f))
    for so in glob.glob(os.path.join(ROOT, "src/dllama/**/*.so"), recursive=True):
        shutil.copy2(so, os.path.join(d, os.path.relpath(so, ROOT)))
    return d


def build(d: str) -> None:
    r = sh([sys.executable, "setup.py", "build_ext", "--inplace", "-q", "--force"], d)
    if r.returncode:
        raise SystemExit(f"build of the mutant failed:\n{r.stderr[-2000:]}")


def run_mutant(d: str, m: Mutant, pristine_so: dict[str, bytes]) -> tuple[bool, str]:
    path = os.path.join(d, m.path)
    original = open(path).read()
    if original.count(m.old) != 1:
        raise SystemExit(f"{m.name}: the text to replace occurs {original.count(m.old)} times in {m.path}")
    is_c = m.path.endswith((".c", ".h"))
    try:
        with open(path, "w") as f:
            f.write(original.replace(m.old, m.new))
        if is_c:
            build(d)
        env = dict(os.environ, PYTHONPATH=os.path.join(d, "src"), COLUMNS="250")
        r = sh([sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *m.tests], d, env)
        out = r.stdout + r.stderr
        failed = re.findall(r"^FAILED (\S+)(?: - (.*))?$", out, re.M)
        if r.returncode == 1 and failed:
            test, why = failed[0]
            why = (why or "").strip()
            if m.expect and m.expect not in out:
                return False, f"{test} failed but without {m.expect!r}: {why[:120]}"
            return True, f"{test}: {why[:120]}"
        if r.returncode == 0:
            return False, "all tests passed"
        return False, f"pytest exit {r.returncode} (errors, not failures): {out.strip().splitlines()[-1][:160]}"
    finally:
        with open(path, "w") as f:
            f.write(original)
        if is_c:
            for so, data in pristine_so.items():
                with open(so, "wb") as f:
                    f.write(data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the copy")
    a = ap.parse_args()
    todo = [m for m in MUTANTS if not a.names or m.name in a.names]
    if a.names and len(todo) != len(a.names):
        raise SystemExit(f"unknown mutant(s); known: {[m.name for m in MUTANTS]}")
    d = make_copy()
    print(f"copy of the repository in {d}", flush=True)
    try:
        pristine = {so: open(so, "rb").read() for so in glob.glob(os.path.join(d, "src/dllama/**/*.so"), recursive=True)}
        if not pristine:
            build(d)
            pristine = {so: open(so, "rb").read() for so in glob.glob(os.path.join(d, "src/dllama/**/*.so"),
                                                                      recursive=True)}  # fmt: skip
        rows = []
        for m in todo:
            caught, how = run_mutant(d, m, pristine)
            rows.append((m.name, caught, how))
            print(f"{m.name}: {'caught' if caught else 'SURVIVED'} ({how})", flush=True)
        w = max(len(r[0]) for r in rows)
        print(f"\n| {'mutant':{w}} | caught | by |\n|{'-' * (w + 2)}|--------|----|")
        for name, caught, how in rows:
            print(f"| {name:{w}} | {'yes' if caught else 'NO':6} | {how} |")
        if not all(c for _, c, _ in rows):
            sys.exit(1)
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
