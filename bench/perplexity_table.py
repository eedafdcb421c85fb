"""Perplexity by node count x sync type, so users can see what splitting a model and quantizing the exchanged
partial sums (--buffer-float-type q80) cost in quality.

    python bench/perplexity_table.py [--model M] [--file TEXT] [--ctx 128] [--chunks N] [--nodes 1 2 3]

Every configuration runs the same chunks of the same text (default: tests/data/river_town.txt) through `dllama
perplexity`'s computation, with local worker processes on this machine; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dllama.runtime.perplexity import make_plan, perplexity
from dllama.service import Runtime, RuntimeConfig

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "river_town.txt"


def measure(model, text, ctx, chunks, nodes, sync, nthreads):
    quiet = lambda msg: None  # noqa: E731
    cfg = RuntimeConfig(model=model, nthreads=nthreads, max_seq=ctx, local_workers=nodes - 1, sync=sync)
    with Runtime(cfg, log=quiet) as rt:
        tok = rt.tokenizer
        plan = make_plan(tok.encode(text), ctx, tok.bos_id if tok.add_bos else None, chunks)
        t0 = time.perf_counter()
        est = perplexity(rt.root.run, plan, batch=min(64, ctx))
        dt = time.perf_counter() - t0
    return est, plan.n_chunks * (ctx - 1) / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF file (default: the default model)")
    ap.add_argument("--file", default=str(TEXT))
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, help="first N chunks only (default: all)")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--syncs", nargs="+", default=["f32", "q80"])
    ap.add_argument("--nthreads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="root threads")
    a = ap.parse_args()
    text = Path(a.file).read_text(encoding="utf-8")
    rows, base = [], None
    for n in a.nodes:
        for sync in a.syncs:
            est, tps = measure(a.model, text, a.ctx, a.chunks, n, sync, a.nthreads)
            base = base or est.ppl
            rows.append((n, sync, est, tps))
            print(f"[perplexity_table] {n} node(s), {sync}: {est.ppl:.4f} +/- {est.err:.4f} ({tps:.1f} tok/s)",
                  file=sys.stderr, flush=True)  # fmt: skip
    print(f"\nperplexity of {Path(a.file).name}, ctx {a.ctx}, {rows[0][2].count} tokens scored "
          f"(model: {a.model or 'default'})\n")  # fmt: skip
    print("| nodes | sync | perplexity | +/- | vs first row | tokens/s |")
    print("|---:|---|---:|---:|---:|---:|")
    for n, sync, est, tps in rows:
        print(
            f"| {n} | {sync} | {est.ppl:.4f} | {est.err:.4f} | {100 * (est.ppl / base - 1):+.2f} % | {tps:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
