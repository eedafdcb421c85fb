"""Rotary position tables for the engine: cos and sin of position x frequency, with Llama 3.1 frequency factors
and linear position scaling."""

from __future__ import annotations

import numpy as np

from dllama.model.config import ModelConfig


def rope_tables(cfg: ModelConfig, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: float32 [max_seq, head_dim/2]; pair i rotates by position * base^(-2i/head_dim)."""
    half = cfg.head_dim // 2
    freqs = cfg.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / cfg.head_dim)
    if cfg.rope_freq_factors is not None:
        freqs = freqs / np.asarray(cfg.rope_freq_factors, dtype=np.float64)
    cos = np.empty((max_seq, half), dtype=np.float32)
    sin = np.empty((max_seq, half), dtype=np.float32)
    for s in range(0, max_seq, 4096):  # in chunks: no float64 [max_seq, half] temporary for long contexts
        angles = np.outer(np.arange(s, min(s + 4096, max_seq), dtype=np.float64) / cfg.rope_linear_scale, freqs)
        cos[s : s + len(angles)] = np.cos(angles)
        sin[s : s + len(angles)] = np.sin(angles)
    return cos, sin
