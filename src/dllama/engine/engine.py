"""One node's engine: its slice of every layer, run by the C engine (csrc/graph.c) one forward pass per call.

The residual stream `x`, the partial output `out` and the `logits` are NumPy arrays shared with the C side. The
engine is handed tensors placement by placement (what the split plan says this node holds) and a comm for the
all-reduce; it knows nothing of files, sockets or the other nodes."""

from __future__ import annotations

import numpy as np

from dllama.engine import _kernels
from dllama.engine.rope import rope_tables
from dllama.kv_cache import DEFAULT_KV_TYPE, KV_TYPES
from dllama.model.config import ModelConfig
from dllama.model.tensor_view import TensorView
from dllama.model.weight_types import row_bytes
from dllama.split.plan import NodeShare, Placement

CommError = _kernels.CommError
LAYER_SLOTS = {name: i for i, name in enumerate(_kernels.LAYER_SLOTS)}
GLOBAL_SLOTS = {name: i for i, name in enumerate(_kernels.GLOBAL_SLOTS)}
SYNC_FORMATS = {"q80": _kernels.SYNC_Q80, "f16": _kernels.SYNC_F16, "f32": _kernels.SYNC_F32}


def slot_of(p: Placement) -> int:
    return (GLOBAL_SLOTS if p.layer < 0 else LAYER_SLOTS)[p.spec.slot]


def sync_in_pairs(n_nodes: int) -> bool:
    """Whether n nodes add their partial sums in a butterfly of pairwise swaps (graph.c) rather than all-to-all: a
    node then waits only for its partner of each round, which may itself be waiting for another node."""
    return n_nodes >= _kernels.BUTTERFLY_MIN_NODES and n_nodes & (n_nodes - 1) == 0


def sync_row_bytes(sync: str, dim: int) -> int:
    """Bytes of one row of a partial sum on the wire."""
    return dim * 34 // 32 if sync == "q80" else dim * (2 if sync == "f16" else 4)


def embed_rows(raw: bytes | memoryview | np.ndarray, qtype: int, dim: int, out: np.ndarray) -> None:
    """Embedding rows in the model's own type (as the root ships them) -> float32 out[:T]: the one embedding path,
    the same on the root and on every worker."""
    data = np.frombuffer(raw, dtype=np.uint8)
    v = TensorView.packed(data, qtype, len(data) // row_bytes(qtype, dim), dim)
    v.dequantize_rows(range(v.rows), out[: v.rows])


class Engine:
    def __init__(self, cfg: ModelConfig, share: NodeShare, *, max_seq: int, max_batch: int, nthreads: int,
                 sync: str = "q80", check_residual: bool = False, kv_dir: str | None = None,
                 kv_type: str = DEFAULT_KV_TYPE):  # fmt: skip
        self.cfg, self.share = cfg, share
        self.max_seq, self.max_batch = max_seq, max_batch
        self.x = np.zeros((max_batch, cfg.dim), dtype=np.float32)  # residual stream [B, dim]
        self.out = np.zeros((max_batch, cfg.dim), dtype=np.float32)  # this node's partial sum [B, dim]
        self.logits = np.zeros(max(share.vocab_rows, 1), dtype=np.float32)  # [vocab rows of this node]
        cos, sin = rope_tables(cfg, max_seq)  # [max_seq, head_dim/2]
        self.k = _kernels.Engine(
            cfg.dim, cfg.n_layers, cfg.head_dim, share.n_heads, share.n_kv_heads, share.hidden, share.vocab_rows,
            max_seq, max_batch, cfg.norm_eps, cos, sin, nthreads, self.x, self.out, self.logits,
            rope_neox=cfg.rope_neox, qk_norm=cfg.qk_norm, attn_bias=cfg.attn_bias, n_experts=cfg.n_experts,
            n_active=cfg.n_active_experts, norm_topk=cfg.norm_topk, sync=SYNC_FORMATS[sync],
            check_residual=check_residual, kv_dir=kv_dir, kv_type=KV_TYPES[kv_type],
        )  # fmt: skip
        self.weight_bytes = 0

    def set(self, p: Placement, v: TensorView) -> bool:
        """Hand the engine one tensor of its share. True if the engine reads it in place (keeps a reference),
        False if it made its own (repacked) copy, so the source's memory may go."""
        uses = self.k.set_tensor(p.layer, slot_of(p), p.expert, v.base, v.offset, v.type, v.rows, v.cols, v.stride)
        self.weight_bytes += v.nbytes
        return uses

    def ready(self) -> None:
        """Raises ValueError unless every tensor the graph reads was set."""
        self.k.check()

    def set_comm(self, comm) -> None:
        self.k.set_comm(comm)

    # one C call each, GIL released inside
    def forward(self, pos: int, T: int) -> None:
        self.k.forward(pos, T)

    def residual_hashes(self) -> bytes | None:
        """With check_residual: a u64 hash of the residual stream after each block of the last forward."""
        return self.k.residual_hashes()

    def compute_logits(self, row: int) -> np.ndarray:
        self.k.logits(row)
        return self.logits
