"""Qwen3 (dense) and Qwen3-MoE: a per-head RMS norm of q and k before rope, NEOX rope, an explicit head_dim
(`attention.key_length`, not dim / heads). Qwen3-MoE routes each token to the top 8 of 128 experts, whose router
weights are renormalized to sum to 1, with its own expert feed-forward size."""

from dllama.arch.base import Architecture


class Qwen3(Architecture):
    name = "qwen3"
    rope_neox = True
    qk_norm = True


class Qwen3Moe(Qwen3):
    name = "qwen3moe"
