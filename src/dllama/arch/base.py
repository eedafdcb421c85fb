"""What an architecture declares, once: its config from GGUF metadata and its tensors (name, shape, how the
tensor-parallel split cuts it, which engine slot it fills).

Everything else reads these declarations: the loader's shape checks, the split plan, what the root ships and a
worker expects, the engine's slots, the NumPy reference model and the synthetic model generator."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum

from dllama.errors import DllamaError
from dllama.model.config import ModelConfig


class Split(Enum):
    """How a tensor is cut across nodes (rows = output features, cols = input features)."""

    COPY = "copy"  # every node holds all of it (norms, router)
    Q_ROWS = "q_rows"  # rows of this node's query heads
    KV_ROWS = "kv_rows"  # rows of this node's KV heads
    Q_COLS = "q_cols"  # input columns of this node's query heads (attention output)
    FFN_ROWS = "ffn_rows"  # this node's feed-forward rows
    FFN_COLS = "ffn_cols"  # this node's feed-forward input columns (down)
    EXPERT_ROWS = "expert_rows"  # per expert: this node's rows of the expert's feed-forward
    EXPERT_COLS = "expert_cols"  # per expert: this node's input columns of the expert's down
    VOCAB_ROWS = "vocab_rows"  # this node's rows of the output head


# shape symbols: ModelConfig attributes or properties; 1 for vectors
Dim = str | int


@dataclass(frozen=True)
class TensorSpec:
    name: str  # GGUF name inside a block, e.g. "attn_q.weight" (blk.N.attn_q.weight)
    rows: Dim
    cols: Dim
    split: Split
    slot: str  # engine slot (dllama.engine.slots)
    experts: bool = False  # one such matrix per expert: a 3-D GGUF tensor [n_experts, rows, cols]
    vector: bool = False  # a 1-D tensor (norms, biases): always F32 in the engine

    def shape(self, cfg: ModelConfig) -> tuple[int, int]:
        def ev(d: Dim) -> int:
            return d if isinstance(d, int) else int(getattr(cfg, d))

        return ev(self.rows), ev(self.cols)


def vec(name: str, size: Dim, split: Split = Split.COPY, slot: str | None = None) -> TensorSpec:
    return TensorSpec(name, 1, size, split, slot or name.split(".")[0], vector=True)


def mat(name: str, rows: Dim, cols: Dim, split: Split, slot: str | None = None, experts: bool = False) -> TensorSpec:
    return TensorSpec(name, rows, cols, split, slot or name.split(".")[0], experts=experts)


# The tensors outside the blocks are the same in every family we run.
TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = vec("output_norm.weight", "dim")
OUTPUT = mat("output.weight", "vocab_size", "dim", Split.VOCAB_ROWS)
ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class Meta:
    """GGUF metadata of one architecture (keys prefixed with `<arch>.`), with typed, range-checked getters."""

    meta: dict
    prefix: str

    def get(self, key: str, default=None):
        return self.meta.get(self.prefix + key, default)

    def int(self, key: str, default: int | None = None, lo: int = 1, hi: int = 1 << 24) -> int:
        v = self.get(key, default)
        if v is None:
            raise DllamaError(f"model metadata lacks '{self.prefix}{key}'")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not lo <= int(v) <= hi:
            raise DllamaError(f"model metadata '{self.prefix}{key}' = {v!r} is not an integer in [{lo}, {hi}]")
        return int(v)

    def float(self, key: str, default: float) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
            raise DllamaError(f"model metadata '{self.prefix}{key}' = {v!r} is not a positive number")
        return float(v)


class Architecture:
    """One model family. Subclasses set `name`, `layer_tensors()` and tweak `config()`."""

    name: str = ""
    rope_neox = False
    attn_bias = False
    qk_norm = False

    # ---- config ----
    def config(self, meta: dict, vocab_rows: int, tied: bool, freq_factors=None) -> ModelConfig:
        m = Meta(meta, self.name + ".")
        dim = m.int("embedding_length")
        n_heads = m.int("attention.head_count", hi=1 << 12)
        n_kv = m.int("attention.head_count_kv", n_heads, hi=1 << 12)
        if n_heads % n_kv:
            raise DllamaError(f"{n_heads} attention heads are not a multiple of {n_kv} KV heads")
        head_dim = m.int("attention.key_length", m.get("rope.dimension_count") or dim // n_heads, hi=1 << 12)
        scaling = m.get("rope.scaling.type", "none")
        n_experts = m.int("expert_count", 0, lo=0, hi=1 << 12)
        cfg = ModelConfig(
            arch=self.name,
            dim=dim,
            hidden_dim=0 if n_experts else m.int("feed_forward_length", hi=1 << 20),
            n_layers=m.int("block_count", hi=1 << 12),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            vocab_size=m.int("vocab_size", vocab_rows, hi=1 << 24),
            context_length=m.int("context_length", 2048, hi=1 << 24),
            rope_base=m.float("rope.freq_base", 10000.0),
            norm_eps=m.float("attention.layer_norm_rms_epsilon", 1e-5),
            tied_output=tied,
            name=str(meta.get("general.name", ""))[:200],
            rope_linear_scale=m.float("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0,
            rope_freq_factors=tuple(float(v) for v in freq_factors) if freq_factors is not None else None,
            rope_neox=self.rope_neox,
            attn_bias=self.attn_bias,
            qk_norm=self.qk_norm,
            sliding_window=m.int("attention.sliding_window", 0, lo=0),
        )
        if n_experts:
            used = m.int("expert_used_count", hi=1 << 12)
            if used > n_experts:
                raise DllamaError(f"expert_used_count {used} exceeds expert_count {n_experts}")
            ff = m.get("expert_feed_forward_length") or m.get("feed_forward_length")
            cfg = replace(cfg, n_experts=n_experts, n_active_experts=used,
                          expert_hidden_dim=m.int("expert_feed_forward_length", ff, hi=1 << 20))  # fmt: skip
        self.check(cfg)
        return cfg

    def check(self, cfg: ModelConfig) -> None:
        if cfg.dim % 32 or cfg.hidden_dim % 32 or cfg.expert_hidden_dim % 32 or cfg.head_dim % 2:
            raise DllamaError(
                f"unsupported model shape: dim {cfg.dim}, feed-forward {cfg.hidden_dim or cfg.expert_hidden_dim}, "
                f"head_dim {cfg.head_dim} (need multiples of 32, 32 and 2)"
            )
        if cfg.rope_freq_factors is not None and len(cfg.rope_freq_factors) != cfg.head_dim // 2:
            raise DllamaError(f"rope_freqs has {len(cfg.rope_freq_factors)} values, expected {cfg.head_dim // 2}")
        if cfg.rope_freq_factors is not None and not all(math.isfinite(v) and v > 0 for v in cfg.rope_freq_factors):
            raise DllamaError("rope_freqs holds zero, negative or non-finite frequency factors")

    # ---- tensors ----
    def attention_tensors(self, cfg: ModelConfig) -> list[TensorSpec]:
        t = [
            vec("attn_norm.weight", "dim"),
            mat("attn_q.weight", "q_dim", "dim", Split.Q_ROWS),
            mat("attn_k.weight", "kv_dim", "dim", Split.KV_ROWS),
            mat("attn_v.weight", "kv_dim", "dim", Split.KV_ROWS),
        ]
        if cfg.attn_bias:
            t += [vec("attn_q.bias", "q_dim", Split.Q_ROWS, "attn_q_bias"),
                  vec("attn_k.bias", "kv_dim", Split.KV_ROWS, "attn_k_bias"),
                  vec("attn_v.bias", "kv_dim", Split.KV_ROWS, "attn_v_bias")]  # fmt: skip
        if cfg.qk_norm:
            t += [vec("attn_q_norm.weight", "head_dim"), vec("attn_k_norm.weight", "head_dim")]
        t.append(mat("attn_output.weight", "dim", "q_dim", Split.Q_COLS))
        return t

    def ffn_tensors(self, cfg: ModelConfig) -> list[TensorSpec]:
        t = [vec("ffn_norm.weight", "dim")]
        if cfg.moe:
            return t + [
                mat("ffn_gate_inp.weight", "n_experts", "dim", Split.COPY),
                mat("ffn_gate_exps.weight", "expert_hidden_dim", "dim", Split.EXPERT_ROWS, experts=True),
                mat("ffn_up_exps.weight", "expert_hidden_dim", "dim", Split.EXPERT_ROWS, experts=True),
                mat("ffn_down_exps.weight", "dim", "expert_hidden_dim", Split.EXPERT_COLS, experts=True),
            ]
        return t + [
            mat("ffn_gate.weight", "hidden_dim", "dim", Split.FFN_ROWS),
            mat("ffn_up.weight", "hidden_dim", "dim", Split.FFN_ROWS),
            mat("ffn_down.weight", "dim", "hidden_dim", Split.FFN_COLS),
        ]

    def layer_tensors(self, cfg: ModelConfig) -> list[TensorSpec]:
        """Every tensor of one block, in the order they are shipped and set."""
        return self.attention_tensors(cfg) + self.ffn_tensors(cfg)
