"""Test helper: write the original Distributed Llama's `.m` model and `.t` tokenizer files, byte for byte as its
converter/writer.py + convert-hf.py and converter/tokenizer-writer.py + convert-tokenizer-hf.py lay them out.

Deliberately independent of dllama.model.original_format (no shared code): the layout is re-derived here from the
original's Python converter, so a misreading in the reader shows up as a test failure.
"""

from __future__ import annotations

import struct

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

LLAMA, QWEN3, QWEN3_MOE = 0xABCD00, 0xABCD01, 0xABCD02
FLOAT_TYPES = {"f32": 0, "f16": 1, "q40": 2, "q80": 3}
# writer.py's headerKeys
HEADER_KEYS = {
    "version": 0, "arch_type": 1, "dim": 2, "hidden_dim": 3, "n_layers": 4, "n_heads": 5, "n_kv_heads": 6,
    "n_experts": 7, "n_active_experts": 8, "vocab_size": 9, "max_seq_len": 10, "hidden_act": 11,
    "rope_theta": 12, "weights_float_type": 13, "rope_scaling_factor": 14, "rope_scaling_low_freq_factor": 15,
    "rope_scaling_high_freq_factory": 16, "rope_scaling_orig_max_seq_len": 17, "rope_type": 18, "head_dim": 19,
    "norm_epsilon": 20, "moe_hidden_dim": 21,
}  # fmt: skip


def header_bytes(params: dict) -> bytes:
    """writer.writeHeader: magic, header size (= 8 + 8 * pairs), pairs in the params' insertion order."""
    data = b"".join(struct.pack("<ii", HEADER_KEYS[k], v) for k, v in params.items() if k in HEADER_KEYS)
    return struct.pack("<i", 0xA00ABCD) + struct.pack("<i", 8 + len(data)) + data


def tensor_bytes(x: np.ndarray, float_type: str) -> bytes:
    """writer.writeTensor of a float tensor (flattened row-major)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if float_type == "f32":
        return x.astype("<f4").tobytes()
    if float_type == "f16":
        return x.astype("<f2").tobytes()
    groups = x.reshape(-1, 32)
    gmax, gmin = groups.max(axis=1), groups.min(axis=1)
    if float_type == "q40":  # writeQuantizedQ40Tensor
        deltas = np.where(-gmin > gmax, gmin, gmax) / np.float32(-8)
        with np.errstate(divide="ignore"):
            ids = np.where(deltas != 0, np.float32(1.0) / deltas, np.float32(0)).astype(np.float32)
        q = np.clip(groups * ids[:, None] + np.float32(8.5), 0, 15).astype(int)
        packed = ((q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)).astype(np.uint8)
        out = np.empty((len(groups), 18), np.uint8)
    else:  # writeQuantizedQ80Tensor: np.round rounds half to even
        deltas = np.where(-gmin > gmax, -gmin, gmax) / np.float32(127)
        with np.errstate(divide="ignore"):
            ids = np.where(deltas != 0, np.float32(1.0) / deltas, np.float32(0)).astype(np.float32)
        packed = np.round(groups * ids[:, None]).astype(np.int8).view(np.uint8)
        out = np.empty((len(groups), 34), np.uint8)
    out[:, :2] = deltas.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = packed
    return out.tobytes()


def params_for(
    arch_type: int, *, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len, weight_type,
    rope_theta=10000, head_dim=None, norm_eps=1e-5, n_experts=0, n_active_experts=0, moe_hidden_dim=None,
    rope_scaling=None,
) -> dict:  # fmt: skip
    """convert-hf.loadConfig's dict, in its key order (the order the header pairs are written in)."""
    p = {
        "version": 0,
        "arch_type": arch_type,
        "hidden_act": 1,  # silu
        "dim": dim,
        "hidden_dim": hidden_dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "weights_float_type": FLOAT_TYPES[weight_type],
        "max_seq_len": max_seq_len,
        "vocab_size": vocab_size,
        "files": ["model.safetensors"],  # not a header key: writeHeader skips it
        "n_experts": n_experts,
        "n_active_experts": n_active_experts,
        "rope_theta": int(rope_theta),
    }
    if rope_scaling:
        p["rope_scaling_factor"] = int(rope_scaling["factor"])
        p["rope_scaling_low_freq_factor"] = int(rope_scaling["low_freq_factor"])
        p["rope_scaling_high_freq_factory"] = int(rope_scaling["high_freq_factor"])
        p["rope_scaling_orig_max_seq_len"] = int(rope_scaling["original_max_position_embeddings"])
        p["rope_type"] = 2
    if head_dim is not None:
        p["head_dim"] = head_dim
    p["norm_epsilon"] = {1e-5: 5, 1e-6: 6}[norm_eps]
    if moe_hidden_dim is not None:
        p["moe_hidden_dim"] = moe_hidden_dim
    return p


def write_m(path, params: dict, layers: list[dict], embedding, final_norm, head) -> None:
    """convert-hf.Processor's plan order. layers[i]: q k v o (+ gate / experts) w1 w2 w3 q_norm k_norm att ffn."""
    wt = {v: k for k, v in FLOAT_TYPES.items()}[params["weights_float_type"]]
    qwen = params["arch_type"] in (QWEN3, QWEN3_MOE)
    with open(path, "wb") as f:
        f.write(header_bytes(params))
        f.write(tensor_bytes(embedding, "f32"))
        for L in layers:
            for name in ("q", "k", "v", "o"):
                f.write(tensor_bytes(L[name], wt))
            if params["n_experts"] > 0:
                f.write(tensor_bytes(L["gate"], "f32"))
                for e in range(params["n_experts"]):
                    for name in ("w1", "w2", "w3"):
                        f.write(tensor_bytes(L["experts"][e][name], wt))
            else:
                for name in ("w1", "w2", "w3"):
                    f.write(tensor_bytes(L[name], wt))
            if qwen:
                f.write(tensor_bytes(L["q_norm"], "f32"))
                f.write(tensor_bytes(L["k_norm"], "f32"))
            f.write(tensor_bytes(L["att_norm"], "f32"))
            f.write(tensor_bytes(L["ffn_norm"], "f32"))
        f.write(tensor_bytes(final_norm, "f32"))
        f.write(tensor_bytes(head, wt))


# ---------------------------------------------------------------------------------------------------------
# From a llama GGUF


def gguf_floats(path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    """Every tensor of a GGUF dequantized to float32, numpy shape (rows first)."""
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        qt = QT(int(t.tensor_type))
        a = np.asarray(t.data)
        f = a.astype(np.float32) if qt in (QT.F32, QT.F16) else gguf.quants.dequantize(a, qt)
        out[t.name] = np.asarray(f, dtype=np.float32).reshape(shape)
    return r, out


def write_m_from_gguf(gguf_path, m_path, weight_type: str, floats=None) -> dict[str, np.ndarray]:
    """A llama GGUF as the original's convert-hf.py would have written it from the same weights.

    GGUF llama q/k rows are already in the interleaved order convert-hf.py's permute() produces, so they go
    as they are; a tied model (no output.weight) gets the embedding as its head, like convert-hf.py's
    `lm_head.weight` fallback. Returns the float tensors used (GGUF names; pass them back as `floats` to
    skip dequantizing again)."""
    r, w = gguf_floats(gguf_path) if floats is None else (gguf.GGUFReader(gguf_path), floats)

    def meta(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    dim, n_heads = meta("llama.embedding_length"), meta("llama.attention.head_count")
    head_dim = meta("llama.attention.key_length")
    params = params_for(
        LLAMA,
        dim=dim,
        hidden_dim=meta("llama.feed_forward_length"),
        n_layers=meta("llama.block_count"),
        n_heads=n_heads,
        n_kv_heads=meta("llama.attention.head_count_kv", n_heads),
        vocab_size=w["token_embd.weight"].shape[0],
        max_seq_len=meta("llama.context_length"),
        weight_type=weight_type,
        rope_theta=meta("llama.rope.freq_base", 10000.0),
        head_dim=head_dim,
        norm_eps=1e-6 if meta("llama.attention.layer_norm_rms_epsilon") < 5e-6 else 1e-5,
    )
    layers = []
    for i in range(params["n_layers"]):
        p = f"blk.{i}."
        layers.append(
            {
                "q": w[p + "attn_q.weight"],
                "k": w[p + "attn_k.weight"],
                "v": w[p + "attn_v.weight"],
                "o": w[p + "attn_output.weight"],
                "w1": w[p + "ffn_gate.weight"],
                "w2": w[p + "ffn_down.weight"],
                "w3": w[p + "ffn_up.weight"],
                "att_norm": w[p + "attn_norm.weight"],
                "ffn_norm": w[p + "ffn_norm.weight"],
            }
        )
    head = w.get("output.weight", w["token_embd.weight"])
    write_m(m_path, params, layers, w["token_embd.weight"], w["output_norm.weight"], head)
    return w


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def _unicode_to_bytes() -> dict[str, int]:
    """convert-tokenizer-hf.unicodeToBytes (GPT-2's table, inverted)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip([chr(c) for c in cs], bs, strict=True))


def t_bytes(tokens: list[bytes], scores: list[float], chat_template: bytes | None, bos_id: int, add_bos: bool,
            eos_ids: list[int]) -> bytes:  # fmt: skip
    """tokenizer-writer.writeTokenizer."""
    params = {
        "bos_id": bos_id,
        "version": 1,
        "vocab_size": len(tokens),
        "max_token_length": max(len(t) for t in tokens),
    }
    if chat_template:
        params["chat_template"] = len(chat_template)
    params["n_eos_tokens"] = len(eos_ids)
    params["add_bos"] = 1 if add_bos else 0
    keys = {"version": 0, "vocab_size": 1, "max_token_length": 2, "bos_id": 3, "chat_template": 7,
            "n_eos_tokens": 9, "add_bos": 10}  # fmt: skip
    data = b"".join(struct.pack("<ii", keys[k], v) for k, v in params.items())
    out = struct.pack("<i", 0x567124) + struct.pack("<i", 8 + len(data)) + data
    if chat_template:
        out += chat_template
    out += b"".join(struct.pack("<i", e) for e in eos_ids)
    for t, s in zip(tokens, scores, strict=True):
        assert len(t) > 0
        out += struct.pack("<fI", s, len(t)) + t
    return out


def write_t_from_gguf(gguf_path, t_path, eos_ids: list[int] | None = None) -> None:
    """A byte-level BPE GGUF vocabulary as convert-tokenizer-hf.py's resolvePreTrainedTokenizerFast writes it:
    each token's characters mapped back through GPT-2's table (other characters UTF-8), score = -id."""
    r = gguf.GGUFReader(gguf_path)

    def meta(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    assert meta("tokenizer.ggml.model") == "gpt2"
    template = meta("tokenizer.chat_template")
    eos = eos_ids if eos_ids is not None else [meta("tokenizer.ggml.eos_token_id")]
    write_t_fast(t_path, meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.bos_token_id"), eos,
                 template, meta("tokenizer.ggml.add_bos_token", True))  # fmt: skip


def write_t_fast(
    t_path, vocab: list[str], bos_id: int, eos_ids: list[int], template=None, add_bos=True
) -> None:
    """resolvePreTrainedTokenizerFast on a vocabulary (token strings by id), for any tokenizer.json model."""
    utb = _unicode_to_bytes()
    tokens = []
    for tok in vocab:
        b = []
        for ch in tok:
            b += [utb[ch]] if ch in utb else list(ch.encode("utf-8"))
        tokens.append(bytes(b))
    scores = [-float(i) for i in range(len(tokens))]
    with open(t_path, "wb") as f:
        f.write(t_bytes(tokens, scores, template.encode() if template else None, bos_id, add_bos, eos_ids))


def write_t_sentencepiece(t_path, pieces: list[str], scores: list[float], bos_id=1, eos_ids=(2,)) -> None:
    """convert-tokenizer-hf.py's resolveLlamaTokenizer: '▁' -> ' ', `<0xNN>` -> that byte."""
    tokens = []
    for t in pieces:
        t = t.replace("\u2581", " ")
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            tokens.append(bytes.fromhex(t[3:-1]))
        else:
            tokens.append(t.encode("utf-8"))
    with open(t_path, "wb") as f:
        f.write(t_bytes(tokens, scores, None, bos_id, True, list(eos_ids)))


# ---------------------------------------------------------------------------------------------------------
# Tiny Qwen3 / Qwen3-MoE models (random weights, HF layout: the converter does not permute qwen3)


def write_qwen3_m(m_path, *, moe: bool, weight_type="f32", seed=0) -> tuple[dict, dict]:
    """Returns (params, tensors keyed by the GGUF names llama.cpp uses, experts stacked)."""
    g = np.random.default_rng(seed)
    dim, hidden, n_layers, n_heads, n_kv, head_dim, vocab = 64, 96, 2, 4, 2, 32, 300
    n_exp, n_act, moe_hidden = (4, 2, 64) if moe else (0, 0, None)
    params = params_for(
        QWEN3_MOE if moe else QWEN3, dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, vocab_size=vocab, max_seq_len=512, weight_type=weight_type, rope_theta=1000000,
        head_dim=head_dim, norm_eps=1e-6, n_experts=n_exp, n_active_experts=n_act, moe_hidden_dim=moe_hidden,
    )  # fmt: skip

    def m(rows, cols):
        return (g.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def v(n):
        return (1 + 0.1 * g.standard_normal(n)).astype(np.float32)

    ff = moe_hidden if moe else hidden
    out = {"token_embd.weight": m(vocab, dim)}
    layers = []
    for i in range(n_layers):
        p = f"blk.{i}."
        L = {"q": m(n_heads * head_dim, dim), "k": m(n_kv * head_dim, dim), "v": m(n_kv * head_dim, dim),
             "o": m(dim, n_heads * head_dim), "q_norm": v(head_dim), "k_norm": v(head_dim),
             "att_norm": v(dim), "ffn_norm": v(dim)}  # fmt: skip
        out.update({p + "attn_q.weight": L["q"], p + "attn_k.weight": L["k"], p + "attn_v.weight": L["v"],
                    p + "attn_output.weight": L["o"], p + "attn_q_norm.weight": L["q_norm"],
                    p + "attn_k_norm.weight": L["k_norm"], p + "attn_norm.weight": L["att_norm"],
                    p + "ffn_norm.weight": L["ffn_norm"]})  # fmt: skip
        if moe:
            L["gate"] = m(n_exp, dim)
            L["experts"] = [{"w1": m(ff, dim), "w2": m(dim, ff), "w3": m(ff, dim)} for _ in range(n_exp)]
            out[p + "ffn_gate_inp.weight"] = L["gate"]
            for name, key in (("ffn_gate_exps", "w1"), ("ffn_down_exps", "w2"), ("ffn_up_exps", "w3")):
                out[p + name + ".weight"] = np.stack([e[key] for e in L["experts"]])
        else:
            L.update(w1=m(ff, dim), w2=m(dim, ff), w3=m(ff, dim))
            out.update({p + "ffn_gate.weight": L["w1"], p + "ffn_down.weight": L["w2"],
                        p + "ffn_up.weight": L["w3"]})  # fmt: skip
        layers.append(L)
    out["output_norm.weight"] = v(dim)
    out["output.weight"] = m(vocab, dim)
    write_m(m_path, params, layers, out["token_embd.weight"], out["output_norm.weight"], out["output.weight"])
    return params, out
