"""The runtime behind every front end: the model file, its tokenizer, the root runner and its workers (local worker
processes included), and the session that holds the conversation in the KV cache."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from dllama.errors import DllamaError
from dllama.model.default import resolve_model
from dllama.model.gguf_model import GGUFModel
from dllama.runtime.local_workers import LocalWorkers
from dllama.runtime.root import Root
from dllama.runtime.session import Session, check_prompt_length
from dllama.tokenizer import Tokenizer


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RuntimeConfig:
    model: str | None = None  # path (default: the default model)
    nthreads: int | None = None  # None: the machine's cores, shared fairly with local workers
    max_seq: int | None = None
    workers: tuple[str, ...] = ()
    local_workers: int = 0
    weights: tuple[float, ...] | None = None  # split weights, root first
    sync: str = "q80"  # format of the partial sums exchanged after each block
    secret: str | None = None  # None: $DLLAMA_SECRET

    @classmethod
    def from_args(cls, args) -> RuntimeConfig:
        g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        return cls(model=g("model"), nthreads=g("nthreads"), max_seq=g("max_seq_len"), workers=tuple(g("workers") or ()),
                   local_workers=g("local_workers", 0) or 0, weights=tuple(g("weights")) if g("weights") else None,
                   sync=g("buffer_float_type", "q80"), secret=g("secret"))  # fmt: skip


class Runtime:
    def __init__(self, cfg: RuntimeConfig, log=log):
        self.log = log
        if cfg.local_workers < 0:
            raise DllamaError("--local-workers must be >= 0")
        path = resolve_model(cfg.model)
        t0 = time.perf_counter()
        model = GGUFModel(path)
        self.tokenizer = Tokenizer.from_gguf(path)  # reads the vocabulary only when its cache is cold
        self.model_id = os.path.basename(path).removesuffix(".gguf")
        # local workers share this machine's cores: oversubscribing them costs ~30 %
        self.nthreads = cfg.nthreads or max(1, (os.cpu_count() or 1) // (1 + cfg.local_workers))
        secret = cfg.secret or os.environ.get("DLLAMA_SECRET")
        workers = list(cfg.workers)
        self.local = None
        if cfg.local_workers:
            if cfg.secret:
                raise DllamaError("--secret cannot be combined with --local-workers (they use their own secret)")
            self.local = LocalWorkers(cfg.local_workers, nthreads=1)
            workers += self.local.addresses
            secret = self.local.secret
        try:
            self.root = Root(model, nthreads=self.nthreads, max_seq=cfg.max_seq, workers=workers,
                             weights=list(cfg.weights) if cfg.weights else None, sync=cfg.sync, secret=secret, log=log)  # fmt: skip
        except BaseException:
            if self.local:
                self.local.close()
            raise
        self.session = Session(self.root, self.tokenizer)
        c = model.config
        log(f"model: {os.path.basename(path)} ({c.name or c.arch}, {c.n_layers} layers, dim {c.dim}, "
            f"{c.n_heads}/{c.n_kv_heads} heads, vocab {c.vocab_size}); context {self.root.max_seq}; "
            f"{self.root.n_nodes} node(s) x {self.nthreads} thread(s); loaded in {time.perf_counter() - t0:.1f} s")  # fmt: skip

    @property
    def max_seq(self) -> int:
        return self.root.max_seq

    @property
    def n_nodes(self) -> int:
        return self.root.n_nodes

    @property
    def available(self) -> bool:
        return self.root.available

    def ensure_available(self) -> bool:
        """Reconnects the workers after a failure (the session forgets its cached tokens); True if it did."""
        if self.root.available:
            return False
        self.session.reset()
        self.root.reconnect()
        return True

    def check_prompt(self, ids: list[int]) -> None:
        check_prompt_length(len(ids), self.max_seq)

    def close(self) -> None:
        self.root.close()
        if self.local:
            self.local.close()
            self.local = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
