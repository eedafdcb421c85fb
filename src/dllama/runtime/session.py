"""A conversation with the model: the tokens held in the KV cache, prefix reuse, and the generation loop.

Front ends (inference, chat, API) all go through `Session` (opened by dllama.service); it does not know whether
the model runs on one node or many (that is the runner's business, `Root`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from dllama.errors import DllamaError
from dllama.runtime.stats import Stats, Step
from dllama.sampling.sampler import Sampler


def check_prompt_length(n_tokens: int, max_seq: int) -> None:
    """The one prompt-length rule: a prompt needs at least one token and room for one generated token."""
    if n_tokens < 1:
        raise DllamaError("the prompt encodes to no tokens")
    if n_tokens >= max_seq:
        raise DllamaError(f"prompt has {n_tokens} tokens but the context holds {max_seq} (--max-seq-len)")


class Session:
    def __init__(self, root, tokenizer=None):
        self.root = root
        self.tokenizer = tokenizer
        self.tokens: list[int] = []  # what the KV cache holds, position by position
        self.stats = Stats()
        self.finish_reason: str | None = None
        self.reused = 0  # prompt tokens served from the cache by the last prefill
        self.logits_mode = "full"  # "argmax" when the sampler is greedy: workers then send only their best

    @property
    def max_seq(self) -> int:
        return self.root.max_seq

    def reset(self) -> None:
        self.tokens = []

    def _forward(self, ids: list[int], pos: int, kind: list[Step]) -> np.ndarray:
        B = self.root.max_batch
        logits = None
        for i in range(0, len(ids), B):
            chunk = ids[i : i + B]
            last = i + B >= len(ids)
            r = self.root.run(chunk, pos + i, self.logits_mode if last else "none")
            logits = r.logits
            kind.append(r.step)
        return logits

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Make the cache hold exactly `ids`; returns the logits after the last one. Only the part after the
        longest common prefix with the cached tokens is computed."""
        check_prompt_length(len(ids), self.max_seq)
        common = 0
        for a, b in zip(self.tokens, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # the last token must run again to produce logits
        self.reused = common
        self.tokens = self.tokens[:common]
        logits = self._forward(ids[common:], common, self.stats.prompt)
        self.tokens = list(ids)
        return logits

    def generate(
        self,
        ids: list[int],
        sampler: Sampler,
        max_new_tokens: int,
        stop_ids=(),
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[int]:
        """Yields generated token ids (stop tokens are not yielded). Sets `finish_reason` to "stop",
        "length" or "cancelled"."""
        self.finish_reason = None
        # greedy: workers send only their best logit, unless the sampler wants to see every logit (logprobs)
        full = getattr(sampler, "needs_full_logits", False)
        self.logits_mode = "argmax" if sampler.temperature == 0 and not full else "full"
        logits = self.prefill(ids)
        stop_ids = frozenset(stop_ids)
        for n in range(max_new_tokens):
            tok = sampler(logits)
            if tok in stop_ids:
                self.finish_reason = "stop"
                return
            yield tok
            if should_stop is not None and should_stop():
                self.finish_reason = "cancelled"
                return
            if n == max_new_tokens - 1:
                break
            if len(self.tokens) + 1 >= self.max_seq:
                self.finish_reason = "length"
                return
            pos = len(self.tokens)
            self.tokens.append(tok)
            logits = self._forward([tok], pos, self.stats.gen)
        self.finish_reason = "length"
