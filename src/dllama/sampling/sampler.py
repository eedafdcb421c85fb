"""Token sampling: greedy at temperature 0, else temperature + top-p (nucleus), reproducible for a seed."""

from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, temperature: float = 0.8, top_p: float = 0.9, seed: int | None = None):
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        # Any integer is a seed (OpenAI takes any int64, e.g. -1): negative ones as their 64-bit two's
        # complement, since NumPy's generators take only non-negative seeds.
        self.rng = np.random.default_rng(None if seed is None else seed if seed >= 0 else seed & (2**64 - 1))

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1.0:
            # the nucleus nearly always lies in the top few hundred tokens: sort those, not the whole vocab
            k = min(256, len(p))
            cand = np.argpartition(-p, k - 1)[:k] if k < len(p) else np.arange(len(p))
            if p[cand].sum() < self.top_p:
                cand = np.arange(len(p))
            order = cand[np.argsort(-p[cand], kind="stable")]
            cum = np.cumsum(p[order])
            # the draw walks the nucleus in token-id order, not probability order: two near-equal tail tokens
            # swapping places under 1e-7 of arithmetic noise must not change what a seed picks
            keep = np.sort(order[: int(np.searchsorted(cum, self.top_p)) + 1])
            q = p[keep] / p[keep].sum()
            return int(keep[self.rng.choice(len(keep), p=q)])
        return int(self.rng.choice(len(p), p=p))
