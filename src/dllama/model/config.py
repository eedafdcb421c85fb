"""Model configuration read from GGUF metadata (llama architecture family)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dllama.errors import DllamaError

SUPPORTED_ARCHS = ("llama",)  # SmolLM2, TinyLlama, Llama 2/3/3.1/3.2/3.3 and Mistral all use "llama" in GGUF


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_base: float
    norm_eps: float
    tied_output: bool
    name: str = ""
    rope_linear_scale: float = 1.0  # "linear" rope scaling: positions are divided by this factor
    rope_freq_factors: tuple[float, ...] | None = field(
        default=None, repr=False
    )  # Llama 3.1 (rope_freqs.weight)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def rope_tables(self, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin: float32 [max_seq, head_dim/2] for interleaved-pair RoPE."""
        half = self.head_dim // 2
        freqs = self.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / self.head_dim)
        if self.rope_freq_factors is not None:
            freqs = freqs / np.asarray(self.rope_freq_factors, dtype=np.float64)
        angles = np.outer(np.arange(max_seq, dtype=np.float64) / self.rope_linear_scale, freqs)
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _get(meta: dict, key: str, default=None, required: bool = True):
    if key in meta:
        return meta[key]
    if default is None and required:
        raise DllamaError(f"model metadata lacks '{key}'")
    return default


def config_from_metadata(meta: dict, vocab_rows: int, tied: bool, freq_factors=None) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise DllamaError(
            f"unsupported model architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    p = arch + "."
    dim = int(_get(meta, p + "embedding_length"))
    n_heads = int(_get(meta, p + "attention.head_count"))
    n_kv = int(_get(meta, p + "attention.head_count_kv", n_heads))
    head_dim = int(
        meta.get(p + "attention.key_length") or meta.get(p + "rope.dimension_count") or dim // n_heads
    )
    scaling_type = meta.get(p + "rope.scaling.type", "none")
    linear = float(meta.get(p + "rope.scaling.factor", 1.0)) if scaling_type == "linear" else 1.0
    cfg = ModelConfig(
        arch=arch,
        dim=dim,
        hidden_dim=int(_get(meta, p + "feed_forward_length")),
        n_layers=int(_get(meta, p + "block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=int(meta.get(p + "vocab_size", vocab_rows)),
        context_length=int(_get(meta, p + "context_length", 2048)),
        rope_base=float(meta.get(p + "rope.freq_base", 10000.0)),
        norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        tied_output=tied,
        name=str(meta.get("general.name", "")),
        rope_linear_scale=linear or 1.0,
        rope_freq_factors=tuple(float(v) for v in freq_factors) if freq_factors is not None else None,
    )
    if cfg.n_heads % cfg.n_kv_heads or cfg.dim % 32 or cfg.hidden_dim % 32 or cfg.head_dim % 2:
        raise DllamaError(f"unsupported model shape: {cfg}")
    return cfg
