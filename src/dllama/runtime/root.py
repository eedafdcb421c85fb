"""The root node: loads the model, plans the split, starts the workers, and runs forward passes over the
whole cluster. With no workers it is simply the single-device runner (N=1 of the same code)."""

from __future__ import annotations

import sys

import numpy as np

from dllama.engine.node import NodeEngine, kv_cache_bytes
from dllama.errors import DllamaError
from dllama.model.gguf_model import GGUFModel
from dllama.runtime.memory import cap_seq_len
from dllama.split.plan import SplitPlan

DEFAULT_MAX_BATCH = 64


class Root:
    def __init__(
        self,
        model: GGUFModel,
        *,
        nthreads: int = 1,
        max_seq: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        workers: list[str] | None = None,
        weights: list[float] | None = None,
        buffer_type: str = "q80",
        secret: str | None = None,
        log=None,
    ):
        self.model = model
        self.cfg = cfg = model.config
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        workers = list(workers or [])
        self.plan = SplitPlan.make(cfg, 1 + len(workers), weights)
        share = self.plan.nodes[0]
        requested = min(max_seq or cfg.context_length, cfg.context_length) if max_seq is None else max_seq
        if requested < 2:
            raise DllamaError("--max-seq-len must be >= 2")
        per_pos = max(kv_cache_bytes(cfg, n, 1) for n in self.plan.nodes)
        self.max_seq, note = cap_seq_len(requested, per_pos)
        if note:
            self.log(note)
        self.max_batch = max(1, min(max_batch, self.max_seq))
        if self.plan.n_nodes > 1:
            w = [self.plan.node_weight_bytes(n, model) for n in self.plan.nodes]
            w[0] += model.embedding.nbytes  # the root also keeps the embedding table for lookups
            self.log(self.plan.describe(w, [kv_cache_bytes(cfg, n, self.max_seq) for n in self.plan.nodes]))

        def own(
            v,
        ):  # a node holding a slice reads it fastest from its own packed copy (TensorView.packed_copy)
            return v if self.plan.n_nodes == 1 else v.packed_copy()

        def layer_tensor(layer: int, name: str):
            return own(self.plan.slice(share, name, model.layer(layer, name)))

        self.engine = NodeEngine(
            cfg,
            share,
            layer_tensor,
            own(model.output.row_slice(*share.vocab)),
            model.output_norm,
            max_seq=self.max_seq,
            max_batch=self.max_batch,
            nthreads=nthreads,
        )
        self.network_s = 0.0
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.cluster = None
        self._cluster_args = (workers, buffer_type, secret)
        if workers:
            self.reconnect()

    @property
    def available(self) -> bool:
        """False after a worker failed, until `reconnect()` succeeds."""
        if not self._cluster_args[0]:
            return True
        return self.cluster is not None and not self.cluster.broken

    def reconnect(self) -> None:
        """(Re)connects the workers and ships their slices again. Callers must forget their cached tokens:
        the KV caches start empty."""
        from dllama.runtime.cluster import ClusterLinks

        workers, buffer_type, secret = self._cluster_args
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        self.cluster = ClusterLinks.connect(self, workers, buffer_type=buffer_type, secret=secret)

    @property
    def n_nodes(self) -> int:
        return self.plan.n_nodes

    def forward(self, tokens: list[int], pos: int, logits: str = "full") -> np.ndarray | None:
        """Runs `tokens` at positions pos.. through the model; returns the logits after the last one (vocab-sized).
        logits="argmax" only promises the argmax entry (other nodes send just their best), "none" skips the head."""
        T = len(tokens)
        if T < 1 or T > self.max_batch or pos + T > self.max_seq:
            raise DllamaError(f"forward: {T} tokens at position {pos} exceed the context ({self.max_seq})")
        if self._cluster_args[0] and self.cluster is None:
            raise DllamaError("cluster unavailable: the workers are not connected")
        e = self.engine
        e.x[:T] = self.model.embed(tokens)
        if self.cluster is not None:
            return self.cluster.forward(tokens, pos, logits)
        e.forward(pos, T)
        return None if logits == "none" else e.compute_logits(T - 1)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
