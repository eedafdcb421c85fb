"""Random-weight llama-architecture GGUF files, for tests and benchmarks without downloading a model.

Fast enough for the 1B shape (1.2 G parameters, ~5 s of CPU): normals come from a quantile table,
quantization runs in a vectorised block-transposed layout, chunks are processed on a thread pool (NumPy
releases the GIL) and each tensor is written as soon as it is ready, so memory stays around two tensors.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from dllama.tokenizer.tokenizer import bytes_to_unicode

SHAPES: dict[str, dict] = {
    "1b": dict(
        dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=49152, rope_base=500000.0
    ),
    "tiny-8kv": dict(
        dim=256, hidden_dim=768, n_layers=4, n_heads=8, n_kv_heads=8, head_dim=32, vocab_size=1024
    ),
    "tiny": dict(dim=128, hidden_dim=384, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512),
}

WEIGHT_TYPES: dict[str, QT] = {
    "q4_0": QT.Q4_0,
    "q4_1": QT.Q4_1,
    "q8_0": QT.Q8_0,
    "f16": QT.F16,
    "f32": QT.F32,
}
_FILE_TYPES = {
    QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QT.F16: gguf.LlamaFileType.MOSTLY_F16,
    QT.F32: gguf.LlamaFileType.ALL_F32,
}

QK = 32  # block size of Q4_0 / Q4_1 / Q8_0
BOS_ID, EOS_ID = 256, 257
# A few real GPT-2 merges, so the BPE path of a tokenizer is exercised; their results are in the vocab.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r", "a n", "Ġ a", "o n", "r e", "Ġ s", "e n", "a t", "o r", "Ġ w"]

# Chunking is part of the output format: element values depend on (seed, tensor name, task index),
# never on the thread count, so files are byte-identical whatever the parallelism.
_TASK_ELEMS = 1 << 20  # one RNG stream per task
_SUB_ELEMS = 1 << 17  # working set of a task step: fits in L2


# ---------------------------------------------------------------------------------------------------------
# Quantizers. They work on a block-transposed layout zt[j, i] = element j of block i, where every step is a
# contiguous vector op; this is ~2.5x faster than gguf.quants and bit-exact with it (tests check both).


def _absmax_signed_t(zt: np.ndarray) -> np.ndarray:
    """Per block, the signed element of largest magnitude; on ties the first one (as argmax in gguf)."""
    mx, mn = zt.max(axis=0), zt.min(axis=0)
    m = np.where(-mn > mx, mn, mx)
    tie = np.flatnonzero(-mn == mx)  # rare for random data (includes all-zero blocks: sign of zero matters)
    if tie.size:
        bt = zt[:, tie]
        m[tie] = bt[np.abs(bt).argmax(axis=0), np.arange(tie.size)]
    return m


def _inv(d: np.ndarray) -> np.ndarray:
    out = np.zeros_like(d)
    np.divide(np.float32(1), d, out=out, where=d != 0)
    return out


def _pack_nibbles_t(q: np.ndarray) -> np.ndarray:
    """(32, n) uint8 nibbles -> (16, n) bytes: element j in the low nibble, j+16 in the high (ggml layout)."""
    hi = q[16:]
    hi <<= 4
    hi |= q[:16]
    return hi


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _quantize_t(zt: np.ndarray, qtype: QT) -> np.ndarray:
    """Quantize float32 zt of shape (32, n_blocks) (consumed as scratch) to (n_blocks, type_size) uint8."""
    n = zt.shape[1]
    if qtype == QT.Q4_0:
        d = _absmax_signed_t(zt) / np.float32(-8)
        zt *= _inv(d)
        zt += np.float32(8.5)  # range [0.5, 16.5]: the uint8 cast truncates like np.trunc
        q = zt.astype(np.uint8)
        np.minimum(q, 15, out=q)
        out = np.empty((n, 18), np.uint8)
        out[:, :2] = _f16_bytes(d)
        out[:, 2:] = _pack_nibbles_t(q).T
    elif qtype == QT.Q4_1:
        mx, mn = zt.max(axis=0), zt.min(axis=0)
        d = (mx - mn) / np.float32(15)
        zt -= mn
        zt *= _inv(d)
        zt += np.float32(0.5)
        q = zt.astype(np.uint8)
        np.minimum(q, 15, out=q)
        out = np.empty((n, 20), np.uint8)
        out[:, :2] = _f16_bytes(d)
        out[:, 2:4] = _f16_bytes(mn)
        out[:, 4:] = _pack_nibbles_t(q).T
    elif qtype == QT.Q8_0:
        d = np.abs(zt).max(axis=0) / np.float32(127)
        zt *= _inv(d)
        # round half away from zero, exactly (gguf's np_roundf); x - trunc(x) is exact in float
        r = np.trunc(zt)
        zt -= r
        r += zt >= 0.5
        r -= zt <= -0.5
        out = np.empty((n, 34), np.uint8)
        out[:, :2] = _f16_bytes(d)
        out[:, 2:] = r.astype(np.int8).view(np.uint8).T
    else:
        raise ValueError(f"no block quantizer for {qtype.name}")
    return out


def quantize(x: np.ndarray, qtype: QT) -> np.ndarray:
    """Drop-in for gguf.quants.quantize for Q4_0, Q4_1 and Q8_0 (same bytes), F16 and F32."""
    if qtype in (QT.F32, QT.F16):
        return gguf.quants.quantize(x, qtype)
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QK:
        raise ValueError(f"row size {x.shape[-1]} is not a multiple of {QK}")
    zt = np.ascontiguousarray(x.reshape(-1, QK).T)
    return _quantize_t(zt, qtype).reshape(gguf.quant_shape_to_byte_shape(x.shape, qtype))


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): id b < 256 is byte b, then <s>, </s>, the merge results, fillers."""
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["<s>", "</s>"] + [m.replace(" ", "") for m in MERGES]
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size must be >= {len(tokens)}")
    tokens += [f"<unused_{i}>" for i in range(vocab_size - len(tokens))]
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    types[BOS_ID] = types[EOS_ID] = int(gguf.TokenType.CONTROL)
    return tokens, types, list(MERGES)


# ---------------------------------------------------------------------------------------------------------
# Weights


def _tensor_plan(cfg):
    """[(name, shape, std or None for a norm-like vector, always_f32)] in file order, from the architecture's
    description (shape in NumPy order, rows first; 3-D for per-expert tensors).

    std = 1/sqrt(fan_in) keeps every projection's output at unit scale after the RMS norms; the two
    projections that write into the residual stream are further scaled by 1/sqrt(2 n_layers) (GPT-2 style)
    so the stream stays O(1) whatever the depth. Biases are small noise, norms ~1.
    """
    from dllama.arch import OUTPUT, OUTPUT_NORM, architecture

    res = 1.0 / np.sqrt(2 * cfg.n_layers)
    plan = [("token_embd.weight", (cfg.vocab_size, cfg.dim), 1.0 / np.sqrt(cfg.dim), False)]
    for i in range(cfg.n_layers):
        for spec in architecture(cfg.arch).layer_tensors(cfg):
            rows, cols = spec.shape(cfg)
            name = f"blk.{i}.{spec.name}"
            if spec.vector:
                plan.append((name, (cols,), -0.1 if spec.name.endswith(".bias") else None, True))
                continue
            shape = (cfg.n_experts, rows, cols) if spec.experts else (rows, cols)
            scale = res if spec.name.startswith(("attn_output", "ffn_down")) else 1.0
            plan.append((name, shape, scale / np.sqrt(cols), spec.name.startswith("ffn_gate_inp")))
    plan.append((OUTPUT_NORM.name, (cfg.dim,), None, True))
    if not cfg.tied_output:
        plan.append((OUTPUT.name, (cfg.vocab_size, cfg.dim), 1.0 / np.sqrt(cfg.dim), False))
    return plan


@functools.cache
def _normal_table() -> np.ndarray:
    """Standard normal quantiles at the 65536 midpoints (i + 0.5) / 65536, rescaled to unit variance.

    Indexing it with random uint16 draws N(0, 1) at 16-bit resolution (tails cut at 4.3 sigma), ~6x faster
    than numpy's ziggurat; after this table everything is exact IEEE arithmetic, so files are reproducible.
    """
    nd = statistics.NormalDist()
    t = np.array([nd.inv_cdf((i + 0.5) / 65536) for i in range(65536)])
    return (t / t.std()).astype(np.float32)


def _rng(seed: int, name: str, task: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), task])


def _normal(g: np.random.Generator, shape: tuple[int, ...], table: np.ndarray) -> np.ndarray:
    n = int(np.prod(shape))
    bits = g.bit_generator.random_raw((n + 3) // 4).view("<u2")[:n]  # 4 draws per 64 random bits
    return table[bits.reshape(shape)]


def _fill_task(out: np.ndarray, seed: int, name: str, task: int, table: np.ndarray, qtype: QT) -> None:
    """Fill out (this task's slice: (n_blocks, type_size) uint8 for block types, flat floats otherwise)."""
    g = _rng(seed, name, task)
    if qtype in (QT.F32, QT.F16):
        for s in range(0, out.size, _SUB_ELEMS):
            z = _normal(g, (min(_SUB_ELEMS, out.size - s),), table)
            out[s : s + z.size] = z
        return
    sub = _SUB_ELEMS // QK
    for s in range(0, out.shape[0], sub):
        nb = min(sub, out.shape[0] - s)
        zt = _normal(g, (QK, nb), table)  # drawn directly in the block-transposed layout
        out[s : s + nb] = _quantize_t(zt, qtype)


def _generate(
    pool: ThreadPoolExecutor, seed: int, name: str, rows: int, cols: int, std: float | None, qtype: QT
) -> tuple[np.ndarray, list[Future]]:
    """Start generating one tensor; returns its buffer (filled once the futures are done)."""
    if std is None:  # norm weight: ~1 + small noise, always F32
        return 1 + _normal(_rng(seed, name, 0), (cols,), _normal_table() * np.float32(0.05)), []
    if std < 0:  # a bias: small noise, F32
        return _normal(_rng(seed, name, 0), (cols,), _normal_table() * np.float32(-std)), []
    table = _normal_table() * np.float32(std)
    n = rows * cols
    if qtype in (QT.F32, QT.F16):
        buf = np.empty((rows, cols), np.float32 if qtype == QT.F32 else np.float16)
        flat, per_task = buf.reshape(-1), _TASK_ELEMS
    else:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        buf = np.empty((rows, cols // block * type_size), np.uint8)
        flat, per_task = buf.reshape(-1, type_size), _TASK_ELEMS // block
        n //= block
    futs = [
        pool.submit(_fill_task, flat[t * per_task : (t + 1) * per_task], seed, name, t, table, qtype)
        for t in range((n + per_task - 1) // per_task)
    ]
    return buf, futs


def _check_dims(qtype: QT, plan) -> None:
    if qtype in (QT.F32, QT.F16):
        return
    bad = sorted({shape[-1] for _, shape, std, f32 in plan if len(shape) > 1 and not f32 and shape[-1] % QK})
    if bad:
        raise ValueError(f"{qtype.name} needs input dims that are multiples of {QK}, got {bad}")


def write_synthetic_gguf(
    path,
    *,
    dim: int,
    hidden_dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    vocab_size: int,
    head_dim: int | None = None,
    context_length: int = 2048,
    rope_base: float = 10000.0,
    norm_eps: float = 1e-5,
    tied: bool = False,
    arch: str = "llama",
    n_experts: int = 0,
    n_active_experts: int = 0,
    expert_hidden_dim: int = 0,
    weight_type: str = "q4_0",
    seed: int = 0,
    name: str = "synthetic",
    threads: int | None = None,
    progress: bool = False,
) -> str:
    """Write a random GGUF of architecture `arch` (llama, qwen2, qwen3, qwen3moe; llama with n_experts is
    Mixtral-like) with a byte-level "gpt2" tokenizer; returns the path as a string.

    Same arguments (whatever `threads`) give byte-identical files. The file appears atomically.
    """
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {sorted(WEIGHT_TYPES)}")
    if n_heads % n_kv_heads:
        raise ValueError("n_heads must be a multiple of n_kv_heads")
    from dllama.arch import architecture
    from dllama.model.config import ModelConfig

    qtype = WEIGHT_TYPES[weight_type]
    head_dim = head_dim or dim // n_heads
    a = architecture(arch)
    cfg = ModelConfig(arch, dim, 0 if n_experts else hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size,
                      context_length, rope_base, norm_eps, tied, rope_neox=a.rope_neox, attn_bias=a.attn_bias,
                      qk_norm=a.qk_norm, n_experts=n_experts, n_active_experts=n_active_experts,
                      expert_hidden_dim=expert_hidden_dim or hidden_dim)  # fmt: skip
    plan = _tensor_plan(cfg)
    _check_dims(qtype, plan)
    threads = threads or len(os.sched_getaffinity(0))

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(name)
    w.add_file_type(_FILE_TYPES[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden_dim)
    if n_experts:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(n_active_experts)
        w.add_expert_feed_forward_length(cfg.expert_hidden_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    if head_dim != dim // n_heads or a.qk_norm:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(norm_eps)
    w.add_vocab_size(vocab_size)
    tokens, types, merges = tokenizer_vocab(vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    types = {}
    for tname, shape, _std, f32 in plan:
        t = QT.F32 if f32 else qtype
        types[tname] = t
        n = int(np.prod(shape))
        if t in (QT.F32, QT.F16):
            dt = np.dtype(np.float32 if t == QT.F32 else np.float16)
            w.add_tensor_info(tname, shape, dt, n * dt.itemsize)
        else:
            bshape = gguf.quant_shape_to_byte_shape(shape, t)
            w.add_tensor_info(tname, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            # The main thread writes tensor k-1 while the pool generates tensor k.
            pending = None
            for tname, shape, std, _ in plan:
                rows, cols = int(np.prod(shape[:-1])), shape[-1]
                nxt = (tname, *_generate(pool, seed, tname, rows, cols, std, types[tname]))
                if pending is not None:
                    _finish(w, *pending, progress, t0)
                pending = nxt
            _finish(w, *pending, progress, t0)
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return str(path)


def _finish(w: gguf.GGUFWriter, tname: str, buf: np.ndarray, futs: list[Future], progress: bool, t0: float):
    for f in futs:
        f.result()
    w.write_tensor_data(buf)
    if progress and (tname.endswith(("ffn_down.weight", "ffn_down_exps.weight")) or not tname.startswith("blk.")):
        print(f"[synthetic] {tname} written ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m dllama.testing.synthetic", description="Write a random-weight llama GGUF model."
    )
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--weight-type", choices=sorted(WEIGHT_TYPES), default="q4_0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tied", action="store_true", help="no output.weight: reuse token_embd")
    ap.add_argument("--context-length", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="default: all available cores")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    out = write_synthetic_gguf(
        a.out,
        **SHAPES[a.shape],
        weight_type=a.weight_type,
        seed=a.seed,
        tied=a.tied,
        context_length=a.context_length,
        threads=a.threads,
        name=f"synthetic-{a.shape}",
        progress=True,
    )
    print(
        f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
