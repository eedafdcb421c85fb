"""NumPy reference of every C kernel (and of a whole forward pass), for tests. Slow and obvious on purpose.

Block layouts are not re-derived here: dequantization of weights uses gguf-py (`gguf.quants`)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """float32 [n] -> GGUF Q8_0 bytes [n/32*34]; d = amax/127, q = rint(x * (1/d)) (half to even)."""
    b = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(b * inv[:, None]).astype(np.int8)
    out = np.empty((b.shape[0], 34), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16)[:, None].view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(-1)


def dequant(data: np.ndarray, qtype: int, rows: int, cols: int) -> np.ndarray:
    """Weights in any GGUF type -> float32 [rows, cols], via gguf-py."""
    raw = np.asarray(data, dtype=np.uint8).reshape(rows, -1)
    if qtype == QT.F32:
        return raw.view(np.float32).reshape(rows, cols).copy()
    if qtype == QT.F16:
        return raw.view(np.float16).reshape(rows, cols).astype(np.float32)
    return dequantize(raw, QT(qtype)).astype(np.float32).reshape(rows, cols)


def matmul(w: np.ndarray, qtype: int, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """y [T, rows] = W . x[t]; activations are quantized to Q8_0 first when W is quantized (like the C side)."""
    W = dequant(w, qtype, rows, cols).astype(np.float64)
    x = np.asarray(x, dtype=np.float32).reshape(-1, cols)
    if qtype in (QT.Q4_0, QT.Q4_1, QT.Q8_0):
        x = np.stack([dequant(quantize_q80(r), QT.Q8_0, 1, cols)[0] for r in x])
    return (x.astype(np.float64) @ W.T).astype(np.float32)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w).astype(np.float32)


def rope(x: np.ndarray, n_heads: int, head_dim: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Interleaved pairs (x[2i], x[2i+1]) of each head rotated by the angle whose cos/sin are given."""
    v = x.reshape(n_heads, head_dim // 2, 2).astype(np.float64)
    a, b = v[..., 0], v[..., 1]
    out = np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(-1).astype(np.float32)


def attention(q, kc, vc, T: int, pos: int, nh: int, nkv: int, hd: int) -> np.ndarray:
    """q [T, nh, hd]; kc, vc [nkv, max_seq, hd]; causal: row t sees positions 0..pos+t."""
    q = q.reshape(T, nh, hd).astype(np.float64)
    out = np.zeros((T, nh, hd))
    group = nh // nkv
    for t in range(T):
        n = pos + t + 1
        for h in range(nh):
            k = kc[h // group, :n].astype(np.float64)
            v = vc[h // group, :n].astype(np.float64)
            s = k @ q[t, h] / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v
    return out.reshape(T, nh * hd).astype(np.float32)


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    g = g.astype(np.float64)
    return (g / (1 + np.exp(-g)) * u).astype(np.float32)


def forward(model, tokens: list[int]) -> np.ndarray:
    """Whole model in float64 NumPy with dequantized weights (no activation quantization): logits [T, vocab]."""
    cfg = model.config
    T, hd = len(tokens), cfg.head_dim
    cos, sin = cfg.rope_tables(T)

    def W(view):
        return view.to_float().astype(np.float64)

    x = model.embed(tokens).astype(np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for layer in range(cfg.n_layers):
        h = rmsnorm(x, model.layer(layer, "attn_norm").to_float()[0], cfg.norm_eps).astype(np.float64)
        q = h @ W(model.layer(layer, "attn_q")).T
        k = h @ W(model.layer(layer, "attn_k")).T
        v = h @ W(model.layer(layer, "attn_v")).T
        q = np.stack([rope(q[t], cfg.n_heads, hd, cos[t], sin[t]) for t in range(T)]).reshape(
            T, cfg.n_heads, hd
        )
        k = np.stack([rope(k[t], cfg.n_kv_heads, hd, cos[t], sin[t]) for t in range(T)]).reshape(
            T, cfg.n_kv_heads, hd
        )
        v = v.reshape(T, cfg.n_kv_heads, hd)
        att = np.zeros((T, cfg.n_heads, hd))
        for hh in range(cfg.n_heads):
            kv = hh // cfg.group
            s = q[:, hh] @ k[:, kv].T / np.sqrt(hd) + mask
            p = np.exp(s - s.max(axis=1, keepdims=True))
            att[:, hh] = (p / p.sum(axis=1, keepdims=True)) @ v[:, kv]
        x = x + att.reshape(T, -1) @ W(model.layer(layer, "attn_output")).T
        h = rmsnorm(x, model.layer(layer, "ffn_norm").to_float()[0], cfg.norm_eps).astype(np.float64)
        g = h @ W(model.layer(layer, "ffn_gate")).T
        u = h @ W(model.layer(layer, "ffn_up")).T
        x = x + (g / (1 + np.exp(-g)) * u) @ W(model.layer(layer, "ffn_down")).T
    h = rmsnorm(x, model.output_norm.to_float()[0], cfg.norm_eps).astype(np.float64)
    return (h @ W(model.output).T).astype(np.float32)
