"""The tensor-parallel split: which rows / columns of each tensor every node holds.

Megatron-style, as in the original system: tensors split by output rows (q, k, v, gate, up, the output head) give
each node whole outputs; tensors split by input columns (attention output, down) give each node a full-length
partial sum that is added across nodes. Each node owns whole KV groups (its KV heads and the query heads that read
them) and the KV cache of those heads only. A mixture-of-experts layer is split inside every expert (each node holds
its slice of every expert, as the original does). Which rule cuts which tensor is declared by the architecture
(`dllama.arch`); this module only decides the ranges.

Any node count up to n_kv_heads works, even when it does not divide the model (3, 5, 6 nodes): shares are unequal
whole heads / blocks. `weights` gives faster nodes a larger share. N=1 is the same code.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from dllama.arch import OUTPUT, OUTPUT_NORM, Split, TensorSpec, architecture
from dllama.errors import DllamaError
from dllama.model.config import ModelConfig
from dllama.model.tensor_view import TensorView

FFN_UNIT = 32  # feed-forward rows move in whole 32-blocks: column slices of down stay block-aligned for every
# native type, and row slices keep whole groups of 8 rows for the repacked layout
VOCAB_UNIT = 8  # output-head rows in whole repack groups


@dataclass(frozen=True)
class NodeShare:
    index: int
    kv_heads: tuple[int, int]  # [start, end) of global KV heads
    heads: tuple[int, int]  # query heads reading those KV heads
    ffn: tuple[int, int]  # feed-forward rows (of the dense feed-forward, or of every expert)
    vocab: tuple[int, int]  # output-head rows

    @property
    def n_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def hidden(self) -> int:
        return self.ffn[1] - self.ffn[0]

    @property
    def vocab_rows(self) -> int:
        return self.vocab[1] - self.vocab[0]


def _apportion(total: int, shares: list[float], minimum: int = 0) -> list[int]:
    """Integers summing to `total`, proportional to `shares` (largest remainder), each >= minimum."""
    s = sum(shares)
    if s <= 0:
        shares, s = [1.0] * len(shares), float(len(shares))
    exact = [total * x / s for x in shares]
    out = [max(minimum, int(e)) for e in exact]
    order = sorted(range(len(out)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(out) < total:
        out[order[i % len(out)]] += 1
        i += 1
    while sum(out) > total:  # minimums overshot: take from the largest
        j = max(range(len(out)), key=lambda k: (out[k] - exact[k], out[k]))
        if out[j] <= minimum:
            j = max(range(len(out)), key=lambda k: out[k])
        out[j] -= 1
    return out


def ffn_rows(cfg: ModelConfig) -> int:
    """Rows of the feed-forward that is split: the dense one, or one expert's."""
    return cfg.expert_hidden_dim if cfg.moe else cfg.hidden_dim


@dataclass(frozen=True)
class Placement:
    """One tensor a node holds: block `layer` (-1 outside the blocks), its description, expert (-1 if none) and
    the shape of the node's part."""

    layer: int
    spec: TensorSpec
    expert: int
    rows: int
    cols: int


@dataclass(frozen=True)
class SplitPlan:
    cfg: ModelConfig
    split_weights: tuple[float, ...]  # relative share of each node (--weights), root first
    nodes: tuple[NodeShare, ...]

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @classmethod
    def make(cls, cfg: ModelConfig, n_nodes: int, split_weights: list[float] | None = None) -> SplitPlan:
        if n_nodes < 1:
            raise DllamaError("the number of nodes must be >= 1")
        if n_nodes > cfg.n_kv_heads:
            raise DllamaError(
                f"{n_nodes} nodes but the model has only {cfg.n_kv_heads} KV heads: at most {cfg.n_kv_heads} nodes"
            )
        weights = list(split_weights) if split_weights else [1.0] * n_nodes
        if len(weights) != n_nodes or any(w <= 0 for w in weights):
            raise DllamaError(f"--weights needs {n_nodes} positive numbers (one per node, root first)")
        total_w = sum(weights)
        kv = _apportion(cfg.n_kv_heads, weights, minimum=1)
        # balance each layer's work (weights read per token): attention is coarse (whole KV groups), the
        # feed-forward (all active experts for MoE) fills each node up to its share
        d, rows = cfg.dim, ffn_rows(cfg)
        attn_per_kv = d * cfg.head_dim * (2 * cfg.group + 2)
        ffn_per_unit = 3 * d * FFN_UNIT * max(1, cfg.n_active_experts)
        total = cfg.n_kv_heads * attn_per_kv + rows // FFN_UNIT * ffn_per_unit
        want = [max(0.0, total * w / total_w - kv[i] * attn_per_kv) for i, w in enumerate(weights)]
        units = _apportion(rows // FFN_UNIT, want if sum(want) > 0 else weights)
        vocab = [VOCAB_UNIT * u for u in _apportion(cfg.vocab_size // VOCAB_UNIT, weights)]
        vocab[-1] += cfg.vocab_size % VOCAB_UNIT  # the rest to the last node
        nodes, kv0, f0, v0 = [], 0, 0, 0
        for i in range(n_nodes):
            f1 = f0 + units[i] * FFN_UNIT
            nodes.append(NodeShare(i, (kv0, kv0 + kv[i]), (kv0 * cfg.group, (kv0 + kv[i]) * cfg.group),
                                   (f0, f1), (v0, v0 + vocab[i])))  # fmt: skip
            kv0, f0, v0 = kv0 + kv[i], f1, v0 + vocab[i]
        return cls(cfg, tuple(weights), tuple(nodes))

    @cached_property
    def specs(self) -> list[TensorSpec]:
        return architecture(self.cfg.arch).layer_tensors(self.cfg)

    def placements(self, share: NodeShare) -> Iterator[Placement]:
        """Every tensor the node holds, in the order they are shipped, received and set in the engine."""
        for layer in range(self.cfg.n_layers):
            for spec in self.specs:
                rows, cols = self.shape(share, spec)
                for e in range(self.cfg.n_experts) if spec.experts else (-1,):
                    yield Placement(layer, spec, e, rows, cols)
        if share.vocab_rows:  # the final norm and this node's rows of the output head
            for spec in (OUTPUT_NORM, OUTPUT):
                yield Placement(-1, spec, -1, *self.shape(share, spec))

    def view(self, share: NodeShare, p: Placement, model) -> TensorView:
        """The node's part of placement `p`, as a view into `model` (a GGUFModel)."""
        if p.layer < 0:
            full = model.output if p.spec is OUTPUT else model.output_norm
        else:
            full = model.layer(p.layer, p.spec.name)
        if p.expert >= 0:
            full = full.expert(p.expert, self.cfg.n_experts)
        return self._cut(share, p.spec, full)

    def node_bytes(self, share: NodeShare, model) -> int:
        """Bytes of weights the node holds (its slices, its head rows, the norms)."""
        return sum(self.view(share, p, model).nbytes for p in self.placements(share))

    def shape(self, share: NodeShare, spec: TensorSpec) -> tuple[int, int]:
        """Rows x cols of this node's part of one tensor (of one expert's matrix for per-expert tensors)."""
        rows, cols = spec.shape(self.cfg)
        hd, s = self.cfg.head_dim, spec.split
        if s == Split.Q_ROWS:
            return (1, share.n_heads * hd) if spec.vector else (share.n_heads * hd, cols)
        if s == Split.KV_ROWS:
            return (1, share.n_kv_heads * hd) if spec.vector else (share.n_kv_heads * hd, cols)
        if s == Split.Q_COLS:
            return rows, share.n_heads * hd
        if s in (Split.FFN_ROWS, Split.EXPERT_ROWS):
            return share.hidden, cols
        if s in (Split.FFN_COLS, Split.EXPERT_COLS):
            return rows, share.hidden
        if s == Split.VOCAB_ROWS:
            return share.vocab_rows, cols
        return rows, cols

    def _cut(self, share: NodeShare, spec: TensorSpec, v: TensorView) -> TensorView:
        hd, s = self.cfg.head_dim, spec.split
        h0, h1 = share.heads
        k0, k1 = share.kv_heads
        if s == Split.Q_ROWS:
            return v.col_slice(h0 * hd, h1 * hd) if spec.vector else v.row_slice(h0 * hd, h1 * hd)
        if s == Split.KV_ROWS:
            return v.col_slice(k0 * hd, k1 * hd) if spec.vector else v.row_slice(k0 * hd, k1 * hd)
        if s == Split.Q_COLS:
            return v.col_slice(h0 * hd, h1 * hd)
        if s in (Split.FFN_ROWS, Split.EXPERT_ROWS):
            return v.row_slice(*share.ffn)
        if s in (Split.FFN_COLS, Split.EXPERT_COLS):
            return v.col_slice(*share.ffn)
        if s == Split.VOCAB_ROWS:
            return v.row_slice(*share.vocab)
        return v

    def describe(self, weight_bytes: list[int], kv_bytes: list[int], need_bytes: list[int]) -> str:
        """One line per node: its share of the model, the memory it holds and the peak it needs."""
        lines = ["node  weight  kv heads  q heads  ffn rows  vocab rows  weights MB  KV cache MB  needs MB"]
        for n in self.nodes:
            lines.append(
                f"{n.index:>4}  {self.split_weights[n.index] / sum(self.split_weights):>6.2f}  {n.n_kv_heads:>8}  {n.n_heads:>7}  "
                f"{n.hidden:>8}  {n.vocab_rows:>10}  {weight_bytes[n.index] / 1e6:>10.1f}  {kv_bytes[n.index] / 1e6:>11.1f}"
                f"  {need_bytes[n.index] / 1e6:>8.1f}"
            )
        return "\n".join(lines)
