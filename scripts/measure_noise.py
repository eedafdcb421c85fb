"""Measures the logit noise the greedy-agreement tests allow for, on the default model, teacher-forced along the
reference's greedy path of fixed prompts (so both sides see the same tokens at every position):

  python scripts/measure_noise.py --nodes 2 --sync q80          # N-node cluster vs the single node
  python scripts/measure_noise.py --vs transformers             # the single node vs Hugging Face transformers

For every position it prints quantiles of: max |logit diff|, the correlation of the two logit vectors, and
|delta margin| = |(got[a] - got[b]) - (ref[a] - ref[b])| for a = the reference's argmax and b = its runner-up:
how far noise moves the top-2 gap. A greedy step can only flip where the reference's gap is below that shift,
so the tests' near-tie allowance is a high quantile of it with a margin (numbers in tests/test_distributed.py
and tests/test_reference.py)."""

from __future__ import annotations

import argparse
import os

import numpy as np

PROMPTS = [
    "The three primary colors are",
    "Water boils at",
    "Once upon a time",
    "def fibonacci(n):",
    "The capital of France is",
    "My favourite food is",
]


def forced(root, ids: list[int]) -> np.ndarray:
    out = [root.forward(ids[:3], 0).copy()]
    out += [root.forward([t], i).copy() for i, t in enumerate(ids[3:], 3)]
    return np.array(out)


def stats(ref: np.ndarray, got: np.ndarray) -> dict[str, np.ndarray]:
    top = np.argsort(ref, axis=1)[:, -2:]
    a, b = top[:, 1], top[:, 0]
    r = np.arange(len(ref))
    dm = np.abs((got[r, a] - got[r, b]) - (ref[r, a] - ref[r, b]))
    corr = np.array([np.corrcoef(got[i], ref[i])[0, 1] for i in r])
    return {"max_abs": np.abs(got - ref).max(axis=1), "corr": corr, "dmargin": dm}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--sync", default="q80")
    ap.add_argument("--vs", choices=["single", "transformers"], default="single")
    ap.add_argument("--tokens", type=int, default=40)
    a = ap.parse_args()
    from dllama.model.default import default_model_path
    from dllama.model.gguf_model import GGUFModel
    from dllama.runtime.local_workers import LocalWorkers
    from dllama.runtime.root import Root
    from dllama.runtime.session import Session
    from dllama.sampling.sampler import Sampler
    from dllama.tokenizer import Tokenizer

    path = default_model_path()
    m = GGUFModel(path)
    tok = Tokenizer.from_gguf(path, reader=m.reader)
    quiet = {"log": lambda *x: None}
    single = Root(m, nthreads=1, max_seq=128, **quiet)
    paths = []
    for p in PROMPTS:
        ids = tok.encode(p)
        s = Session(single)
        paths.append([*ids, *s.generate(ids, Sampler(0), a.tokens)][:-1])
    rows = []
    if a.vs == "transformers":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM

        d, n = os.path.split(path)
        hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=n, dtype=torch.float32).eval()
        for ids in paths:
            with torch.no_grad():
                ref = hf(torch.tensor([ids])).logits[0].numpy()
            rows.append(stats(ref[2:], forced(single, ids)))  # forced(): the first row is after 3 tokens
        label = "1 node Q4_1 vs transformers"
    else:
        lw = LocalWorkers(a.nodes - 1)
        try:
            with Root(m, nthreads=1, max_seq=128, workers=lw.addresses, secret=lw.secret, sync=a.sync,
                      **quiet) as r:  # fmt: skip
                for ids in paths:
                    rows.append(stats(forced(single, ids), forced(r, ids)))
        finally:
            lw.close()
        label = f"{a.nodes} nodes {a.sync} vs 1 node"
    qs = [0.5, 0.9, 0.99, 0.999, 1.0]
    print(f"{label}: {sum(len(r['corr']) for r in rows)} positions over {len(PROMPTS)} prompts")
    for key in ("max_abs", "dmargin", "corr"):
        v = np.concatenate([r[key] for r in rows])
        q = np.quantile(v, [1 - x for x in qs] if key == "corr" else qs)
        names = [f"q{1 - x:g}" for x in qs] if key == "corr" else [f"q{x:g}" for x in qs]
        print(f"  {key:8s} " + "  ".join(f"{n}={x:.5f}" for n, x in zip(names, q, strict=True)))


if __name__ == "__main__":
    main()
