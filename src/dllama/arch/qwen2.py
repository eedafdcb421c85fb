"""Qwen2 / Qwen2.5: Llama with biases on q, k and v, and rope on the two halves of a head (NEOX)."""

from dllama.arch.base import Architecture


class Qwen2(Architecture):
    name = "qwen2"
    rope_neox = True
    attn_bias = True
