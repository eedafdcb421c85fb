"""Llama (SmolLM2, TinyLlama, Llama 2/3/3.1/3.2/3.3), Mistral and Mixtral: GGUF architecture `llama`.

q and k rows were permuted by the converter for rope on adjacent pairs. Mixtral is `llama` with `expert_count`
(its experts as 3-D tensors); Mistral's sliding window is honoured where the file sets it."""

from dllama.arch.base import Architecture


class Llama(Architecture):
    name = "llama"
