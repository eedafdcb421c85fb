"""Decode speed of two dllama builds, finely interleaved: both run at once in their own process (PYTHONPATH = each
build's src folder), each with the model loaded and a prompt prefilled, and they take turns of a few tokens, so
load from other programs on the machine hits both alike. Reports each build's median step time and tok/s, the
median of the per-turn ratios, and the percentage of the memory-bandwidth limit (weight bytes per token / read
bandwidth measured by bandwidth.py).

    python bench/bench_decode_ab.py --a src --b /work/wt/before/src [--model PATH] [--threads 2] [--turns 40]
                                    [--prompt 100] [--window 64] [--kv f32|f16|q8_0]

Decode positions cycle through [prompt, prompt + window), so both builds see the same context lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
from dllama.model.gguf_model import GGUFModel
from dllama.runtime.root import Root
path, threads, prompt, window, kv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
extra = {"kv_type": kv} if kv else {}  # builds from before KV cache types take no kv_type
root = Root(GGUFModel(path, verbose=False), nthreads=threads, max_seq=prompt + window + 8, log=lambda *a: None,
            **extra)
ids = [(1000 + 7 * i) % 30000 for i in range(prompt)]
for i in range(0, prompt, root.max_batch):
    r = root.run(ids[i:i + root.max_batch], i, "argmax")
tok, k = int(r.logits.argmax()), 0
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    steps = []
    for _ in range(n):
        t = time.perf_counter()
        r = root.run([tok], prompt + k % window, "argmax")
        tok = int(r.logits.argmax())
        steps.append(time.perf_counter() - t)
        k += 1
    print(json.dumps(steps), flush=True)
"""


def start(src: str, args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
    p = subprocess.Popen([sys.executable, "-c", CHILD, args.model, str(args.threads), str(args.prompt), str(args.window),
                          args.kv or ""],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    if p.stdout.readline().strip() != "ready":
        raise SystemExit(f"the build in {src} failed to start")
    return p


def turn(p: subprocess.Popen, n: int) -> list[float]:
    p.stdin.write(f"{n}\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="src folder of build A")
    ap.add_argument("--b", required=True, help="src folder of build B")
    ap.add_argument("--model", help="GGUF file (default: the default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=16, help="tokens per turn")
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--kv", choices=["f32", "f16", "q8_0"], help="KV cache type (default: the engine's default)")
    ap.add_argument("--no-bandwidth", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from dllama.model.default import default_model_path
    from dllama.model.gguf_model import GGUFModel

    args.model = args.model or default_model_path()
    per_token = GGUFModel(args.model, verbose=False).weight_bytes_per_token()
    procs = {"A": start(args.a, args), "B": start(args.b, args)}
    for p in procs.values():
        turn(p, 8)  # warm-up
    steps = {"A": [], "B": []}
    ratios = []
    for i in range(args.turns):
        med = {}
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            s = turn(procs[name], args.tokens)
            steps[name] += s
            med[name] = statistics.median(s)
        ratios.append(med["B"] / med["A"])
    for p in procs.values():
        p.stdin.close()
        p.wait()
    bw = None
    if not args.no_bandwidth:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bandwidth import measure_bandwidth

        time.sleep(0.2)
        bw = measure_bandwidth(args.threads)  # the 2 GiB of bench_single.py: the same limit
    print(f"model {os.path.basename(args.model)}, {args.threads} threads, {args.turns} turns x {args.tokens} tokens"
          + (f", read bandwidth {bw:.1f} GB/s (limit {bw * 1e9 / per_token:.1f} tok/s)" if bw else ""))  # fmt: skip
    for name, src in (("A", args.a), ("B", args.b)):
        m = statistics.median(steps[name])
        pct = f"  {100 / m / (bw * 1e9 / per_token):5.1f}% of the BW limit" if bw else ""
        print(f"  {name} {src}: median step {m * 1e3:.3f} ms = {1 / m:.1f} tok/s{pct}")
    print(f"  speed A / B: x{statistics.median(ratios):.3f} (median of per-turn ratios)")


if __name__ == "__main__":
    main()
