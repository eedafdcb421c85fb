"""The model's hyper-parameters, one dataclass for every architecture (what is absent in one family keeps its
default). Filled from GGUF metadata by the architecture description (`dllama.arch`), shipped to workers in SETUP."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    dim: int
    hidden_dim: int  # dense feed-forward rows (0 for a pure mixture-of-experts model)
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
    rope_freq_factors: tuple[float, ...] | None = field(default=None, repr=False)  # Llama 3.1 (rope_freqs)
    rope_neox: bool = False  # rotate (x[i], x[i + head_dim/2]) instead of adjacent pairs (x[2i], x[2i+1])
    attn_bias: bool = False  # q, k, v projections carry biases (Qwen2)
    qk_norm: bool = False  # per-head RMS norm of q and k before rope (Qwen3)
    sliding_window: int = 0  # attend to the last N positions only (0 = all)
    n_experts: int = 0  # mixture of experts: experts per layer (0 = dense)
    n_active_experts: int = 0  # experts each token is routed to
    expert_hidden_dim: int = 0  # feed-forward rows of one expert
    norm_topk: bool = True  # renormalize the chosen experts' router weights to sum to 1

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def moe(self) -> bool:
        return self.n_experts > 0
