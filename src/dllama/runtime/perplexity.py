"""Perplexity of a text, defined exactly as llama.cpp's `llama-perplexity -c N` (tools/perplexity/perplexity.cpp):

- the text is tokenized once (BOS in front when the vocabulary adds one) and cut into `len // N` chunks of N tokens
  (the tail that does not fill a chunk is dropped);
- each chunk is evaluated from an empty context, its first token replaced by BOS (when the vocabulary adds one);
- only the second half is scored: for j = N/2 .. N-2 the negative log-likelihood of token j+1 under the logits at
  position j, so N - N/2 - 1 tokens per chunk;
- perplexity = exp(mean nll); its uncertainty ppl * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)).

The runner's `run(tokens, pos, want)` returns the logits of the last token only, so each chunk runs its unscored
first half in batches (no output head) and then the scored positions one token at a time. No I/O here: the
front end (dllama.cli.perplexity) reads the file and draws the progress bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from dllama.errors import DllamaError


def token_nll(logits: np.ndarray, target: int) -> float:
    """-log softmax(logits)[target], in float64 (the log-sum-exp shifted by the max, as llama.cpp does)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    return float(m + math.log(np.exp(x - m).sum()) - x[target])


@dataclass(frozen=True)
class Estimate:
    """The running value: perplexity over the `count` tokens scored so far, and its standard error."""

    count: int
    nll_sum: float
    nll2_sum: float

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.count

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def err(self) -> float:
        """llama.cpp's "+/-": the standard error of the mean nll, carried to the perplexity (d ppl = ppl d nll)."""
        if self.count < 2:
            return float("nan")
        var = self.nll2_sum / self.count - self.mean_nll**2
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 else 0.0


@dataclass(frozen=True)
class Plan:
    tokens: list[int]
    n_ctx: int
    n_chunks: int
    bos_id: int | None  # replaces each chunk's first token; None when the vocabulary adds no BOS

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.n_ctx - self.first - 1

    def chunk(self, i: int) -> list[int]:
        c = self.tokens[i * self.n_ctx : (i + 1) * self.n_ctx]
        if self.bos_id is not None:
            c[0] = self.bos_id
        return c


def make_plan(tokens: list[int], n_ctx: int, bos_id: int | None, max_chunks: int | None = None) -> Plan:
    """`tokens` is the whole text already tokenized (with BOS in front if the vocabulary adds one)."""
    if n_ctx < 4:
        raise DllamaError(f"--ctx must be >= 4, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise DllamaError(f"the text has {len(tokens)} tokens but a context of {n_ctx} needs at least "
                          f"{2 * n_ctx} (two chunks); give a longer text or a smaller --ctx")  # fmt: skip
    n = len(tokens) // n_ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    return Plan(list(tokens), n_ctx, n, bos_id)


def chunk_nlls(run: Callable, chunk: list[int], batch: int) -> list[float]:
    """Negative log-likelihoods of chunk[j+1] for j = n/2 .. n-2, evaluated from an empty context.

    `run(tokens, pos, want)` is `Root.run`; positions from 0 overwrite whatever the KV cache held."""
    n = len(chunk)
    first = n // 2
    for s in range(0, first, batch):  # unscored context: no output head
        run(chunk[s : min(s + batch, first)], s, "none")
    out = []
    for j in range(first, n - 1):
        logits = run([chunk[j]], j, "full").logits
        out.append(token_nll(logits, chunk[j + 1]))
    return out


def evaluate(run: Callable, plan: Plan, batch: int) -> Iterator[tuple[int, Estimate]]:
    """Yields (chunks done, running estimate) after each chunk."""
    if batch < 1:
        raise DllamaError(f"--batch must be >= 1, got {batch}")
    s = s2 = 0.0
    count = 0
    for i in range(plan.n_chunks):
        for v in chunk_nlls(run, plan.chunk(i), batch):
            s += v
            s2 += v * v
            count += 1
        yield i + 1, Estimate(count, s, s2)


def perplexity(run: Callable, plan: Plan, batch: int) -> Estimate:
    *_, (_, est) = evaluate(run, plan, batch)
    return est
