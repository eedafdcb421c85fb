"""One node's compute: its slice of every layer, run by the C Engine.

The residual stream `x`, the partial output `out` and the `logits` are NumPy arrays shared with the C side,
so the synchronisation code reads and writes them in place."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dllama.engine import _kernels
from dllama.model.config import ModelConfig
from dllama.model.gguf_model import LAYER_TENSORS, TensorView
from dllama.split.plan import NodeShare

SLOT = {name: i for i, name in enumerate(LAYER_TENSORS)}  # same order as the C enum
SLOT_OUT_NORM, SLOT_OUTPUT = 0, 1


def kv_cache_bytes(cfg: ModelConfig, share: NodeShare, max_seq: int) -> int:
    return 2 * cfg.n_layers * share.n_kv_heads * cfg.head_dim * max_seq * 4


class NodeEngine:
    def __init__(
        self,
        cfg: ModelConfig,
        share: NodeShare,
        layer_tensor: Callable[[int, str], TensorView],
        output: TensorView | None,
        output_norm: TensorView | None,
        *,
        max_seq: int,
        max_batch: int,
        nthreads: int,
    ):
        self.cfg, self.share = cfg, share
        self.max_seq, self.max_batch = max_seq, max_batch
        self.x = np.zeros((max_batch, cfg.dim), dtype=np.float32)  # residual stream [B, dim]
        self.out = np.zeros((max_batch, cfg.dim), dtype=np.float32)  # this node's partial sum [B, dim]
        self.logits = np.zeros(max(share.vocab_rows, 1), dtype=np.float32)  # [vocab rows of this node]
        cos, sin = cfg.rope_tables(max_seq)  # [max_seq, head_dim/2]
        self.k = _kernels.Engine(
            cfg.dim, cfg.n_layers, cfg.head_dim, share.n_heads, share.n_kv_heads, share.hidden, share.vocab_rows,
            max_seq, max_batch, cfg.norm_eps, cos, sin, nthreads, self.x, self.out, self.logits,
        )  # fmt: skip
        self.weight_bytes = 0
        for layer in range(cfg.n_layers):
            for name in LAYER_TENSORS:
                self._set(layer, SLOT[name], layer_tensor(layer, name))
        if share.vocab_rows:
            self._set(-1, SLOT_OUT_NORM, output_norm)
            self._set(-1, SLOT_OUTPUT, output)

    def _set(self, layer: int, slot: int, v: TensorView) -> None:
        self.k.set_tensor(layer, slot, v.base, v.offset, v.type, v.rows, v.cols, v.stride)
        self.weight_bytes += v.nbytes

    # one C call each, GIL released inside
    def forward(self, pos: int, T: int) -> None:
        self.k.forward(pos, T)

    def compute_logits(self, row: int) -> np.ndarray:
        self.k.logits(row)
        return self.logits
