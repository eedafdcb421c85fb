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


KV_TYPES = (QT.F32, QT.F16, QT.Q8_0)  # KV cache row types the C attention reads


def kv_quantize(x: np.ndarray, kv_type: int) -> np.ndarray:
    """float32 cache rows [..., hd] -> raw bytes of kv_type (F16: NumPy's round-to-nearest-even; Q8_0: per 32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if kv_type == QT.F32:
        return x.view(np.uint8).reshape(-1)
    if kv_type == QT.F16:
        return x.astype(np.float16).view(np.uint8).reshape(-1)
    if kv_type == QT.Q8_0:
        return quantize_q80(x.reshape(-1))
    raise ValueError(f"KV cache type {kv_type} is not F32, F16 or Q8_0")


def attention(q, kc, vc, T: int, pos: int, nh: int, nkv: int, hd: int, kv_type: int = QT.F32) -> np.ndarray:
    """q [T, nh, hd]; causal: row t sees positions 0..pos+t.

    kc, vc: float32 [nkv, max_seq, hd] (F32), or the raw cache bytes of kv_type, dequantized here. With a Q8_0 K
    cache the query is quantized to Q8_0 first (one row per head), like the C kernel's int8 K.q products."""

    def cache(c):
        c = np.asarray(c)
        if c.dtype != np.uint8:
            return c.astype(np.float64).reshape(nkv, -1, hd)
        rb = {QT.F32: 4 * hd, QT.F16: 2 * hd, QT.Q8_0: hd // 32 * 34}[kv_type]
        return dequant(c, kv_type, c.size // rb, hd).astype(np.float64).reshape(nkv, -1, hd)

    K, V = cache(kc), cache(vc)
    q = np.asarray(q, dtype=np.float32).reshape(T * nh, hd)
    if kv_type == QT.Q8_0:
        q = dequant(quantize_q80(q.reshape(-1)), QT.Q8_0, T * nh, hd)
    q = q.reshape(T, nh, hd).astype(np.float64)
    out = np.zeros((T, nh, hd))
    group = nh // nkv
    for t in range(T):
        n = pos + t + 1
        for g in range(nkv):
            s = q[t, g * group : (g + 1) * group] @ K[g, :n].T / np.sqrt(hd)  # [group, n]
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[t, g * group : (g + 1) * group] = (p / p.sum(axis=1, keepdims=True)) @ V[g, :n]
    return out.reshape(T, nh * hd).astype(np.float32)


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    g = g.astype(np.float64)
    return (g / (1 + np.exp(-g)) * u).astype(np.float32)


def rope_neox(x: np.ndarray, n_heads: int, head_dim: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Pairs (x[i], x[i + head_dim/2]) of each head rotated (Qwen2 / Qwen3 / NEOX layout)."""
    v = x.reshape(n_heads, 2, head_dim // 2).astype(np.float64)
    a, b = v[:, 0], v[:, 1]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(-1).astype(np.float32)


class GGUFWeights:
    """A GGUF file read with gguf-py alone (shares no code with the product): metadata and float64 tensors."""

    def __init__(self, path: str):
        from gguf import GGUFReader

        r = GGUFReader(path)
        self.meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
        self.arch = self.meta["general.architecture"]
        self._t = {t.name: t for t in r.tensors}

    def get(self, key: str, default=None):
        return self.meta.get(f"{self.arch}.{key}", default)

    def has(self, name: str) -> bool:
        return name in self._t

    def w(self, name: str) -> np.ndarray:
        """float64, numpy order (rows first); 3-D expert tensors as [n_experts, rows, cols]."""
        t = self._t[name]
        shape = [int(v) for v in reversed(t.shape)]
        raw = np.asarray(t.data)
        if QT(int(t.tensor_type)) in (QT.F32, QT.F16):
            f = raw.astype(np.float64)
        else:
            f = dequantize(raw, QT(int(t.tensor_type))).astype(np.float64)
        return f.reshape(shape)


def forward(path: str, tokens: list[int]) -> np.ndarray:
    """Whole model in float64 NumPy straight from the GGUF file (no activation quantization): logits [T, vocab].

    Llama (adjacent-pair rope; Mixtral's experts), Qwen2 (q/k/v biases, NEOX rope), Qwen3 and Qwen3-MoE (q/k
    RMS norms per head, NEOX rope), with llama.cpp's tensor names; rope with Llama 3.1 frequency factors and
    linear scaling, computed here from the metadata."""
    g = GGUFWeights(path)
    dim = int(g.get("embedding_length"))
    nh = int(g.get("attention.head_count"))
    nkv = int(g.get("attention.head_count_kv", nh))
    hd = int(g.get("attention.key_length", dim // nh))
    eps = float(g.get("attention.layer_norm_rms_epsilon", 1e-5))
    base = float(g.get("rope.freq_base", 10000.0))
    scale = float(g.get("rope.scaling.factor", 1.0)) if g.get("rope.scaling.type") == "linear" else 1.0
    neox = g.arch in ("qwen2", "qwen3", "qwen3moe")
    n_exp, k_exp = int(g.get("expert_count", 0)), int(g.get("expert_used_count", 0))
    T = len(tokens)
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    if g.has("rope_freqs.weight"):
        inv = inv / g.w("rope_freqs.weight").reshape(-1)
    ang = np.outer(np.arange(T, dtype=np.float64) / scale, inv)
    cos, sin = np.cos(ang), np.sin(ang)
    rot = rope_neox if neox else rope

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def silu(x):
        return x / (1 + np.exp(-x))

    x = g.w("token_embd.weight")[tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for layer in range(int(g.get("block_count"))):
        p = f"blk.{layer}."
        h = norm(x, g.w(p + "attn_norm.weight"))
        q, k, v = (h @ g.w(p + f"attn_{n}.weight").T for n in "qkv")
        if g.has(p + "attn_q.bias"):
            q, k, v = q + g.w(p + "attn_q.bias"), k + g.w(p + "attn_k.bias"), v + g.w(p + "attn_v.bias")
        q, k, v = q.reshape(T, nh, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
        if g.has(p + "attn_q_norm.weight"):
            q, k = norm(q, g.w(p + "attn_q_norm.weight")), norm(k, g.w(p + "attn_k_norm.weight"))
        q = np.stack([rot(q[t].reshape(-1), nh, hd, cos[t], sin[t]) for t in range(T)]).astype(np.float64)
        k = np.stack([rot(k[t].reshape(-1), nkv, hd, cos[t], sin[t]) for t in range(T)]).astype(np.float64)
        q, k = q.reshape(T, nh, hd), k.reshape(T, nkv, hd)
        att = np.zeros((T, nh, hd))
        for hh in range(nh):
            kv = hh // (nh // nkv)
            s = q[:, hh] @ k[:, kv].T / np.sqrt(hd) + mask
            pr = np.exp(s - s.max(axis=1, keepdims=True))
            att[:, hh] = (pr / pr.sum(axis=1, keepdims=True)) @ v[:, kv]
        x = x + att.reshape(T, -1) @ g.w(p + "attn_output.weight").T
        h = norm(x, g.w(p + "ffn_norm.weight"))
        if n_exp:
            logits = h @ g.w(p + "ffn_gate_inp.weight").T  # [T, n_experts]
            pr = np.exp(logits - logits.max(axis=1, keepdims=True))
            pr /= pr.sum(axis=1, keepdims=True)
            gate, up, down = (g.w(p + f"ffn_{n}_exps.weight") for n in ("gate", "up", "down"))
            y = np.zeros_like(x)
            for t in range(T):
                top = np.argsort(-pr[t], kind="stable")[:k_exp]
                w = pr[t, top] / pr[t, top].sum()
                for e, we in zip(top, w, strict=True):
                    y[t] += we * (down[e] @ (silu(gate[e] @ h[t]) * (up[e] @ h[t])))
            x = x + y
        else:
            x = x + (silu(h @ g.w(p + "ffn_gate.weight").T) * (h @ g.w(p + "ffn_up.weight").T)) @ g.w(p + "ffn_down.weight").T
    out = g.w("output.weight") if g.has("output.weight") else g.w("token_embd.weight")
    return (norm(x, g.w("output_norm.weight")) @ out.T).astype(np.float32)
