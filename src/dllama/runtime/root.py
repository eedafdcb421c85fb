"""The root node's runner: loads the split plan, builds its own engine, drives the cluster (local for one node,
TCP with workers), and runs forward passes: `run(tokens, pos, want)` returns the logits together with the compute
and network time and the bytes of that step. With no workers it is simply the single-device runner (N = 1 is the
same code)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from dllama.engine.engine import Engine, embed_rows
from dllama.errors import DllamaError
from dllama.kv_cache import DEFAULT_KV_TYPE, KV_TYPES
from dllama.model.gguf_model import GGUFModel
from dllama.net import messages as M
from dllama.runtime.cluster import Cluster
from dllama.runtime.cluster.local import LocalCluster
from dllama.runtime.cluster.tcp import Settings, TcpCluster
from dllama.runtime.memory import (
    RUNTIME_BYTES,
    NodeMemory,
    buffer_bytes,
    cap_seq_len,
    check_fits,
    kv_cache_bytes,
    kv_directory,
)
from dllama.runtime.stats import Step
from dllama.split.plan import SplitPlan

DEFAULT_MAX_BATCH = 64
WANT = {"none": M.LOGITS_NONE, "argmax": M.LOGITS_ARGMAX, "full": M.LOGITS_FULL}


@dataclass
class StepResult:
    logits: np.ndarray | None  # [vocab] after the last token (only the argmax entry when "argmax" was asked)
    step: Step  # its time and traffic


class Root:
    def __init__(self, model: GGUFModel, *, nthreads: int = 1, max_seq: int | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, workers: list[str] | None = None, split_weights=None,
                 sync: str = "q80", secret: str | None = None, check_residual: bool | None = None,
                 kv_storage: str = "ram", kv_dir: str | None = None, kv_type: str = DEFAULT_KV_TYPE,
                 dry_run: bool = False, log=None, encrypt: bool = False):  # fmt: skip
        self.model = model
        self.cfg = cfg = model.config
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.workers = list(workers or [])
        if sync not in ("q80", "f16", "f32"):
            raise DllamaError(f"unknown sync format {sync!r} (q80, f16 or f32)")
        if check_residual is None:  # debug: DLLAMA_CHECK_RESIDUAL=1 makes every node prove its stream is the root's
            check_residual = os.environ.get("DLLAMA_CHECK_RESIDUAL", "") not in ("", "0")
        self.plan = SplitPlan.make(cfg, 1 + len(self.workers), split_weights)
        self.kv_dir = kv_directory(kv_storage, kv_dir)
        if kv_type not in KV_TYPES:
            raise DllamaError(f"unknown KV cache type {kv_type!r} (f32, f16 or q8_0)")
        if kv_type == "q8_0" and cfg.head_dim % 32:
            raise DllamaError(f"a q8_0 KV cache needs head_dim % 32 == 0 (this model's is {cfg.head_dim}): use f16")
        self.kv_type = kv_type
        requested = min(max_seq or cfg.context_length, cfg.context_length) if max_seq is None else max_seq
        if cfg.sliding_window and requested > cfg.sliding_window:
            # attention over every position equals sliding-window attention within the window: stay inside it
            self.log(f"note: --max-seq-len capped to the model's sliding window ({cfg.sliding_window})")
            requested = cfg.sliding_window
        if requested < 2:
            raise DllamaError("--max-seq-len must be >= 2")
        per_pos = max(kv_cache_bytes(cfg, n.n_kv_heads, 1, kv_type) + 4 * cfg.head_dim for n in self.plan.nodes)
        reserve = max(self.plan.node_bytes(n, model) for n in self.plan.nodes) + RUNTIME_BYTES
        if self.kv_dir:  # on disk the cache does not take RAM: only the rope tables count
            per_pos = 4 * cfg.head_dim
        self.max_seq, note = cap_seq_len(requested, per_pos, reserve)
        if note:
            self.log(note)
        self.max_batch = max(1, min(max_batch, self.max_seq))
        self.nthreads = nthreads
        self.memory = [self.node_memory(i) for i in range(self.plan.n_nodes)]
        self.cluster: Cluster | None = None
        if dry_run:  # only the plan: nothing loaded, nobody contacted
            return
        if self.plan.n_nodes > 1:
            self.log(self.describe())
        check_fits(self.memory[0], "the root")
        share = self.plan.nodes[0]
        self.engine = Engine(cfg, share, max_seq=self.max_seq, max_batch=self.max_batch, nthreads=nthreads, sync=sync,
                             check_residual=check_residual and bool(self.workers), kv_dir=self.kv_dir,
                             kv_type=kv_type)  # fmt: skip
        for p in self.plan.placements(share):
            v = self.plan.view(share, p, model)
            # a node holding a slice reads it fastest from its own packed copy (TensorView.packed_copy); whatever
            # the engine copied (a slice, a repacked tensor) no longer needs its file pages
            copied = self.plan.n_nodes > 1
            if not self.engine.set(p, v.packed_copy() if copied else v) or copied:
                # alone, the file stays in the page cache (reclaimable, not ours): the next start is warm (a
                # 135M model starts in 0.3 s less); in a cluster the root is the node short of memory
                model.release(v, evict=copied)
        self.engine.ready()
        self.settings = Settings(self.max_seq, self.max_batch, sync, secret, check_residual and bool(self.workers),
                                 tuple(m.weights for m in self.memory), kv_storage, kv_type, encrypt)  # fmt: skip
        if self.workers:
            self.reconnect()
        else:
            self.cluster = LocalCluster(self.engine)

    def node_memory(self, i: int) -> NodeMemory:
        """What node i holds: its slice in the file's weight types, its KV cache, the engine's buffers."""
        n, cfg = self.plan.nodes[i], self.cfg
        kv = 0 if self.kv_dir else kv_cache_bytes(cfg, n.n_kv_heads, self.max_seq, self.kv_type)
        return NodeMemory(self.plan.node_bytes(n, self.model), kv,
                          buffer_bytes(cfg, n.n_heads, n.n_kv_heads, n.hidden, n.vocab_rows, self.max_seq,
                                       self.max_batch, self.nthreads), kv_type=self.kv_type)  # fmt: skip

    def describe(self) -> str:
        """One line per node: its share and the memory it holds and needs; then what the KV cache holds."""
        table = self.plan.describe([m.weights for m in self.memory], [m.kv_cache for m in self.memory],
                                   [m.total for m in self.memory])  # fmt: skip
        where = f"on disk in {self.kv_dir}" if self.kv_dir else "in RAM"
        return f"{table}\nKV cache: {self.kv_type} keys and values, {self.max_seq} positions, {where}"

    @property
    def n_nodes(self) -> int:
        return self.plan.n_nodes

    @property
    def available(self) -> bool:
        """False after a worker failed (or, while idle, its link closed), until `reconnect()` succeeds."""
        if self.cluster is None or self.cluster.broken:
            return False
        probe = getattr(self.cluster, "probe", None)
        return probe() if probe else True

    def reconnect(self) -> None:
        """(Re)connects the workers and ships their slices again. Callers must forget their cached tokens: the KV
        caches start empty."""
        self.close()
        self.cluster = TcpCluster.connect(self.workers, plan=self.plan, model=self.model, engine=self.engine,
                                          settings=self.settings, log=self.log)  # fmt: skip

    def run(self, tokens: list[int], pos: int, want: str = "full") -> StepResult:
        """Runs `tokens` at positions pos.. through the model. want="argmax" only promises the argmax entry of the
        logits (other nodes send just their best), "none" skips the output head."""
        T = len(tokens)
        if T < 1 or T > self.max_batch or pos < 0 or pos + T > self.max_seq:
            raise DllamaError(f"forward: {T} tokens at position {pos} exceed the context ({self.max_seq})")
        if self.cluster is None:
            raise DllamaError("cluster unavailable: the workers are not connected")
        t0 = time.perf_counter()
        c0 = self.cluster.counters()
        emb = self.model.embedding
        if min(tokens) < 0 or max(tokens) >= emb.rows:
            raise DllamaError(f"token id out of range: the vocabulary has {emb.rows} tokens")
        if isinstance(self.cluster, LocalCluster):
            # alone: the same rows dequantized in place, without packing them for the wire (~8 us a token)
            rows = b""
            emb.dequantize_rows(tokens, self.engine.x[:T])
        else:
            rows = emb.raw_rows(tokens)
            embed_rows(rows, emb.type, self.cfg.dim, self.engine.x)
        logits = self.cluster.step(pos, T, emb.type, rows, WANT[want])
        d = self.cluster.counters() - c0
        total = time.perf_counter() - t0
        return StepResult(logits, Step(T, total, total - d.network_s, d.network_s, d.sent, d.received))

    def forward(self, tokens: list[int], pos: int, logits: str = "full") -> np.ndarray | None:
        return self.run(tokens, pos, logits).logits

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
