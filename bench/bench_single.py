"""Single-machine speed: dllama vs llama.cpp (llama-cpp-python) on the same GGUF files and thread counts.

Models: a Llama-3.2-1B-shaped synthetic model (Q4_0), the default SmolLM2-135M converted to pure Q4_0, and the
original SmolLM2 Q4_1 file. For each model and thread count the two engines run interleaved (A B A B ...),
each in a fresh process; medians over the rounds. Decode = 128 greedy tokens one at a time; prefill = a
100-token prompt. The bandwidth limit is measured read bandwidth / weight bytes read per token.

    python bench/bench_single.py [--rounds 5] [--threads 2 1] [--models 1b smol-q40 smol-q41 smol-q80] [--prompt-len 100]
    python bench/bench_single.py --vs-src ../main/src ...   # this dllama vs another dllama build (before/after)

With --vs-src the second engine is dllama run with PYTHONPATH=DIR (another worktree's src with its own built
extension) instead of llama.cpp, so a change is measured against its base in one interleaved run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bandwidth import measure_bandwidth  # noqa: E402
from dllama_peer import bench_dllama  # noqa: E402
from llamacpp_peer import bench_llamacpp, default_prompt_tokens, ensure_llama_cpp  # noqa: E402
from models import MODELS, smollm2_original, smollm2_q4_0, synthetic_1b  # noqa: E402

TEXT = (
    "The history of computing is a story of people who wanted to calculate faster than they could by hand. "
    "From the abacus to mechanical calculators, from punched cards to vacuum tubes, each generation of machines "
    "made the previous one look slow. Transistors replaced tubes, integrated circuits replaced discrete parts, "
    "and today a small board that costs less than a dinner can run a language model."
)


def prompt_for(path: str, n: int = 100) -> list[int]:
    if "synth" in os.path.basename(path):
        return default_prompt_tokens(n)
    from dllama.tokenizer import Tokenizer

    ids = Tokenizer.from_gguf(path).encode(TEXT)
    return (ids * (n // len(ids) + 1))[:n]


def smollm2_q8_0() -> str:
    """The default model converted to pure Q8_0 (cached beside the other bench models)."""
    from dllama.model.convert import convert

    path = os.path.join(MODELS, "smollm2-135m-q8_0.gguf")
    if not os.path.exists(path):
        os.makedirs(MODELS, exist_ok=True)
        convert(smollm2_original(), path, "q80")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--models", nargs="+", default=["1b", "smol-q40", "smol-q41"])
    p.add_argument("--n-decode", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument(
        "--vs-src", metavar="DIR", help="compare with the dllama in DIR (a src folder) instead of llama.cpp"
    )
    a = p.parse_args()
    if a.vs_src:
        other = f"dllama@{a.vs_src}"
        src = os.path.abspath(a.vs_src)

        def bench_other(path, threads, n_decode, prompt):
            return bench_dllama(path, threads, n_decode, prompt, prefix=["env", f"PYTHONPATH={src}"])
    else:
        other, bench_other = "llama.cpp", bench_llamacpp
        ensure_llama_cpp()
    from dllama.model.gguf_model import GGUFModel

    paths = {
        "1b": synthetic_1b,
        "smol-q40": smollm2_q4_0,
        "smol-q41": smollm2_original,
        "smol-q80": smollm2_q8_0,
    }
    names = {"1b": "1B shape Q4_0", "smol-q40": "SmolLM2 Q4_0", "smol-q41": "SmolLM2 Q4_1 (original)",
             "smol-q80": "SmolLM2 Q8_0"}  # fmt: skip
    bw = {t: measure_bandwidth(t) for t in sorted(set(a.threads))}
    print(f"load average before: {os.getloadavg()[0]:.2f}; read bandwidth: "
          + ", ".join(f"{t} thr {v:.1f} GB/s" for t, v in bw.items()), file=sys.stderr)  # fmt: skip
    rows, raw = [], []
    for key in a.models:
        path = paths[key]()
        per_token = GGUFModel(path, verbose=False).weight_bytes_per_token()
        prompt = prompt_for(path, a.prompt_len)
        for t in a.threads:
            res = {"dllama": [], other: []}
            for r in range(a.rounds):
                order = [("dllama", bench_dllama), (other, bench_other)]
                for name, fn in order if r % 2 == 0 else order[::-1]:
                    out = fn(path, t, a.n_decode, prompt)
                    out.pop("tokens", None)
                    res[name].append(out)
                    raw.append({"model": key, **out})
            med = {n: {k: statistics.median(o[k] for o in v) for k in ("decode_tps", "decode_tps_median", "prefill_tps")}
                   for n, v in res.items()}  # fmt: skip
            limit = bw[t] * 1e9 / per_token
            rows.append((names[key], t, {"dllama": med["dllama"], "other": med[other]}, limit))
    print(f"\n{'model':<24} {'thr':>3} | {'decode tok/s':>27} {'ratio':>6} {'% BW limit':>10} | "
          f"{'prefill tok/s':>21} {'ratio':>6}")  # fmt: skip
    print(f"{'':<24} {'':>3} | {'dllama':>8} {'other':>9} {'limit':>8} {'':>6} {'(dllama)':>10} | "
          f"{'dllama':>10} {'other':>10} {'':>6}   (other = {other})")  # fmt: skip
    for name, t, med, limit in rows:
        d, c = med["dllama"], med["other"]
        print(
            f"{name:<24} {t:>3} | {d['decode_tps']:>8.1f} {c['decode_tps']:>9.1f} {limit:>8.1f} "
            f"{d['decode_tps'] / c['decode_tps']:>6.2f} {100 * d['decode_tps'] / limit:>9.0f}% | "
            f"{d['prefill_tps']:>10.1f} {c['prefill_tps']:>10.1f} {d['prefill_tps'] / c['prefill_tps']:>6.2f}"
        )
    print("\n(medians of rounds of mean tok/s; per-step medians, robust to other load: "
          + "; ".join(f"{n} {t}thr dllama {m['dllama']['decode_tps_median']:.1f} other "
                      f"{m['other']['decode_tps_median']:.1f}" for n, t, m, _ in rows) + ")")  # fmt: skip
    os.makedirs(os.path.join(os.path.dirname(MODELS), "out"), exist_ok=True)
    out = os.path.join(os.path.dirname(MODELS), "out", f"single-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(out, "w") as f:
        json.dump({"bandwidth_gbs": bw, "runs": raw}, f, indent=1)
    print(f"raw results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
