"""The tensor-parallel split: which rows / columns of each tensor every node holds.

Megatron-style, as in the original system: q, k, v, gate and up are split by output rows (whole heads, whole
32-row blocks of the feed-forward), o and down by input columns, so each node's o / down result is a full-length
partial sum that is added across nodes. Each node owns whole KV groups (its KV heads and the query heads that
read them) and the KV cache of those heads only. Norms are copied. The embedding stays on the root, which sends
each token's embedding row (a few hundred bytes) instead of an f32 vector. The output head is split by vocabulary
rows like the other row-split tensors; for greedy decoding each worker returns only its best (logit, id), for
sampling its f32 logits slice.

Any node count up to n_kv_heads works, even when it does not divide the model (3, 5, 6 nodes): shares are
unequal whole heads / blocks. `weights` gives faster nodes a larger share. N=1 is the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

from dllama.errors import DllamaError
from dllama.model.config import ModelConfig
from dllama.model.gguf_model import LAYER_TENSORS, TensorView

FFN_UNIT = 32  # feed-forward rows move in whole quant blocks so `down` column slices stay block-aligned


@dataclass(frozen=True)
class NodeShare:
    index: int
    kv_heads: tuple[int, int]  # [start, end) of global KV heads
    heads: tuple[int, int]  # query heads reading those KV heads
    ffn: tuple[int, int]  # feed-forward rows
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


@dataclass(frozen=True)
class SplitPlan:
    cfg: ModelConfig
    weights: tuple[float, ...]
    nodes: tuple[NodeShare, ...]

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @classmethod
    def make(cls, cfg: ModelConfig, n_nodes: int, weights: list[float] | None = None) -> SplitPlan:
        if n_nodes < 1:
            raise DllamaError("the number of nodes must be >= 1")
        if n_nodes > cfg.n_kv_heads:
            raise DllamaError(
                f"{n_nodes} nodes but the model has only {cfg.n_kv_heads} KV heads: at most {cfg.n_kv_heads} nodes"
            )
        weights = list(weights) if weights else [1.0] * n_nodes
        if len(weights) != n_nodes or any(w <= 0 for w in weights):
            raise DllamaError(f"--weights needs {n_nodes} positive numbers (one per node, root first)")
        total_w = sum(weights)
        kv = _apportion(cfg.n_kv_heads, weights, minimum=1)
        # balance each layer's work (weights read per token): attention is coarse (whole KV groups), the
        # feed-forward fills each node up to its share
        d = cfg.dim
        attn_per_kv = d * cfg.head_dim * (2 * cfg.group + 2)
        ffn_per_unit = 3 * d * FFN_UNIT
        total = cfg.n_kv_heads * attn_per_kv + cfg.hidden_dim // FFN_UNIT * ffn_per_unit
        want = [max(0.0, total * w / total_w - kv[i] * attn_per_kv) for i, w in enumerate(weights)]
        units = _apportion(cfg.hidden_dim // FFN_UNIT, want if sum(want) > 0 else weights)
        vocab = [8 * u for u in _apportion(cfg.vocab_size // 8, weights)]
        vocab[-1] += (
            cfg.vocab_size % 8
        )  # whole groups of 8 rows (the repacked layout), the rest to the last node
        nodes, kv0, f0, v0 = [], 0, 0, 0
        for i in range(n_nodes):
            f1 = f0 + units[i] * FFN_UNIT
            nodes.append(
                NodeShare(
                    index=i,
                    kv_heads=(kv0, kv0 + kv[i]),
                    heads=(kv0 * cfg.group, (kv0 + kv[i]) * cfg.group),
                    ffn=(f0, f1),
                    vocab=(v0, v0 + vocab[i]),
                )
            )
            kv0, f0, v0 = kv0 + kv[i], f1, v0 + vocab[i]
        return cls(cfg, tuple(weights), tuple(nodes))

    def slice(self, share: NodeShare, name: str, view: TensorView) -> TensorView:
        """This node's part of one layer tensor (`name` as in GGUF: attn_q, ffn_down, ...)."""
        hd = self.cfg.head_dim
        h0, h1 = share.heads
        k0, k1 = share.kv_heads
        f0, f1 = share.ffn
        if name == "attn_q":
            return view.row_slice(h0 * hd, h1 * hd)
        if name in ("attn_k", "attn_v"):
            return view.row_slice(k0 * hd, k1 * hd)
        if name == "attn_output":
            return view.col_slice(h0 * hd, h1 * hd)
        if name in ("ffn_gate", "ffn_up"):
            return view.row_slice(f0, f1)
        if name == "ffn_down":
            return view.col_slice(f0, f1)
        return view  # norms: every node has them

    def describe(self, weight_bytes: list[int], kv_bytes: list[int]) -> str:
        """One line per node: its share of the model and the memory it holds."""
        lines = ["node  weight  kv heads  q heads  ffn rows  vocab rows  weights MB  KV cache MB"]
        for n in self.nodes:
            lines.append(
                f"{n.index:>4}  {self.weights[n.index] / sum(self.weights):>6.2f}  {n.n_kv_heads:>8}  {n.n_heads:>7}  "
                f"{n.hidden:>8}  {n.vocab_rows:>10}  {weight_bytes[n.index] / 1e6:>10.1f}  {kv_bytes[n.index] / 1e6:>11.1f}"
            )
        return "\n".join(lines)

    def node_weight_bytes(self, share: NodeShare, model) -> int:
        """Bytes of weights the node holds (its layer slices, its head rows, the norms)."""
        n = sum(self.slice(share, name, model.layer(layer, name)).nbytes
                for layer in range(self.cfg.n_layers) for name in LAYER_TENSORS)  # fmt: skip
        if share.vocab_rows:
            n += model.output.row_slice(*share.vocab).nbytes + model.output_norm.nbytes
        return n
