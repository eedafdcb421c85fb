"""Read the original Distributed Llama's model files (`.m`, with a `.t` tokenizer) and write standard GGUF.

`.m` layout (little-endian): int32 magic 0x0A00ABCD, int32 header size (the byte offset of the first tensor),
(key, value) int32 pairs, then the tensors back to back with no per-tensor header, each row-major [out][in]:
the f32 embedding; per layer q, k, v, o, then w1 (gate), w2 (down), w3 (up) -- or, for MoE, an f32 router
followed by w1, w2, w3 of every expert --, qwen3's f32 q/k norms, the f32 attention and ffn norms; finally the
f32 final norm and the output head (always present: the original's converter writes the embedding again when
the model ties them). Its Q40/Q80 blocks are byte-identical to GGUF Q4_0/Q8_0, and for the llama architecture
its converter already permuted q/k rows into the interleaved-RoPE order GGUF llama expects, so weights are
copied as they are, tensor by tensor from a memory map.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from dllama.errors import DllamaError
from dllama.model.hf_convert import llama3_rope_divisors, permute
from dllama.model.original_tokenizer import add_tokenizer_metadata, read_tokenizer

MODEL_MAGIC = 0x0A00ABCD
OLD_MAGICS = (0xABCD00, 0xABCD01)
ARCHS = {0xABCD00: "llama", 0xABCD01: "qwen3", 0xABCD02: "qwen3moe"}
WEIGHT_TYPES = {0: QT.F32, 1: QT.F16, 2: QT.Q4_0, 3: QT.Q8_0}
ROPE_LLAMA, ROPE_FALCON, ROPE_LLAMA3_1 = 0, 1, 2
KEYS = {
    0: "version", 1: "arch", 2: "dim", 3: "hidden_dim", 4: "n_layers", 5: "n_heads", 6: "n_kv_heads",
    7: "n_experts", 8: "n_active_experts", 9: "vocab_size", 10: "max_seq_len", 11: "hidden_act",
    12: "rope_theta", 13: "weight_type", 14: "rope_scaling_factor", 15: "rope_scaling_low_freq_factor",
    16: "rope_scaling_high_freq_factor", 17: "rope_scaling_orig_max_seq_len", 18: "rope_type",
    19: "head_dim", 20: "norm_epsilon", 21: "moe_hidden_dim",
}  # fmt: skip
TARGETS = {"q40": QT.Q4_0, "q41": QT.Q4_1, "q80": QT.Q8_0, "f16": QT.F16, "f32": QT.F32}
_FILE_TYPES = {
    QT.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    QT.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    QT.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    QT.F16: LlamaFileType.MOSTLY_F16,
    QT.F32: LlamaFileType.ALL_F32,
}
_FORMAT_VERSION = 1  # of the conversion cache: bump when the output of convert_original changes


@dataclass(frozen=True)
class OriginalHeader:
    path: str
    header_size: int
    file_size: int
    arch: str
    weight_type: QT
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    n_experts: int
    n_active_experts: int
    moe_hidden_dim: int
    rope_theta: float
    rope_type: int
    rope_scaling_factor: float
    rope_scaling_low_freq_factor: float
    rope_scaling_high_freq_factor: float
    rope_scaling_orig_max_seq_len: int
    norm_eps: float
    raw: dict

    @property
    def ff_dim(self) -> int:
        """Rows of each w1/w3: the expert size for qwen3-moe, as the original's buildLlmNet decides."""
        return self.moe_hidden_dim if self.arch == "qwen3moe" else self.hidden_dim


@dataclass(frozen=True)
class Entry:
    """One tensor of the `.m` file: where it is, its numpy shape (rows first) and type."""

    key: tuple  # ("embd",), (layer, "q"), (layer, "w1", expert), ("final_norm",), ("head",)
    offset: int
    shape: tuple[int, ...]
    qtype: QT
    nbytes: int


def _nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _err(path: str, msg: str) -> DllamaError:
    return DllamaError(f"model file {path}: {msg}")


def read_header(path: str | os.PathLike) -> OriginalHeader:
    """Parse and check a `.m` header; also checks that the tensors it implies fill the file exactly."""
    path = os.fspath(path)
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            magic, header_size = struct.unpack("<ii", head) if len(head) == 8 else (None, None)
            if magic is None:
                raise _err(path, f"truncated ({file_size} bytes): not a Distributed Llama model")
            if magic in OLD_MAGICS:
                raise _err(path, f"old Distributed Llama model format (magic 0x{magic:X}), not supported: "
                                 "reconvert the model with the original's converter/convert-hf.py (v0.13 or "
                                 "newer), or use a GGUF file")  # fmt: skip
            if magic != MODEL_MAGIC:
                what = (
                    "a GGUF file, pass it as is" if head[:4] == b"GGUF" else "not a Distributed Llama model"
                )
                raise _err(path, f"unknown magic 0x{magic & 0xFFFFFFFF:08X} ({what})")
            if header_size < 8 or (header_size - 8) % 8 or header_size > 8 + 8 * 4096:
                raise _err(path, f"bad header size {header_size}")
            body = f.read(header_size - 8)
    except OSError as e:
        raise DllamaError(f"cannot read model file {path}: {e.strerror}") from None
    if len(body) != header_size - 8:
        raise _err(path, f"truncated in its header ({file_size} of {header_size} bytes)")
    pairs = struct.unpack(f"<{len(body) // 4}i", body)
    raw: dict[str, int] = {}
    for key, value in zip(pairs[0::2], pairs[1::2], strict=True):
        if key not in KEYS:
            raise _err(path, f"unknown header key {key} (written by a newer converter?)")
        raw[KEYS[key]] = value
    return _build_header(path, header_size, file_size, raw)


def _build_header(path: str, header_size: int, file_size: int, raw: dict) -> OriginalHeader:
    def need(name: str) -> int:
        if name not in raw:
            raise _err(path, f"header lacks '{name}'")
        return raw[name]

    arch_code = need("arch")
    if arch_code not in ARCHS:
        raise _err(path, f"unknown architecture 0x{arch_code & 0xFFFFFFFF:X}")
    arch = ARCHS[arch_code]
    wt = need("weight_type")
    if wt not in WEIGHT_TYPES:
        raise _err(path, f"unknown weight type {wt} (0 f32, 1 f16, 2 q40, 3 q80)")
    if raw.get("hidden_act", 1) != 1:
        raise _err(path, "gelu feed-forward activation is not supported (llama/qwen3 use silu)")
    eps_code = raw.get("norm_epsilon")
    if eps_code not in (None, 5, 6):
        raise _err(path, f"unknown norm epsilon code {eps_code} (5 = 1e-5, 6 = 1e-6)")
    dims = {k: need(k) for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")}
    for k, v in dims.items():
        if v <= 0:
            raise _err(path, f"bad {k} {v}")
    n_heads, n_kv = dims["n_heads"], dims["n_kv_heads"]
    head_dim = raw.get("head_dim") or dims["dim"] // n_heads
    if n_heads % n_kv or head_dim % 2:
        raise _err(path, f"bad attention shape: {n_heads} heads, {n_kv} kv heads, head_dim {head_dim}")
    n_experts = raw.get("n_experts", 0)
    if arch == "qwen3moe" and (n_experts <= 0 or raw.get("moe_hidden_dim", 0) <= 0):
        raise _err(path, "qwen3-moe header lacks n_experts / moe_hidden_dim")
    # qwen3 always runs NEOX ("falcon") rope in the original, whatever the header says
    rope_type = ROPE_FALCON if arch != "llama" else raw.get("rope_type", ROPE_LLAMA)
    if rope_type not in (ROPE_LLAMA, ROPE_FALCON, ROPE_LLAMA3_1):
        raise _err(path, f"unknown rope type {rope_type}")
    h = OriginalHeader(
        path=path,
        header_size=header_size,
        file_size=file_size,
        arch=arch,
        weight_type=WEIGHT_TYPES[wt],
        head_dim=head_dim,
        max_seq_len=raw.get("max_seq_len", 2048),
        n_experts=n_experts,
        n_active_experts=raw.get("n_active_experts", 0),
        moe_hidden_dim=raw.get("moe_hidden_dim", 0),
        rope_theta=float(raw.get("rope_theta", 10000)),
        rope_type=rope_type,
        rope_scaling_factor=float(raw.get("rope_scaling_factor", 1)),
        rope_scaling_low_freq_factor=float(raw.get("rope_scaling_low_freq_factor", 0)),
        rope_scaling_high_freq_factor=float(raw.get("rope_scaling_high_freq_factor", 0)),
        rope_scaling_orig_max_seq_len=raw.get("rope_scaling_orig_max_seq_len", 0),
        norm_eps=1e-6 if eps_code == 6 else 1e-5,
        raw=dict(raw),
        **dims,
    )
    if (
        arch == "llama"
        and h.rope_scaling_factor != 1
        and (
            h.rope_scaling_low_freq_factor <= 0
            or h.rope_scaling_high_freq_factor <= h.rope_scaling_low_freq_factor
            or h.rope_scaling_orig_max_seq_len <= 0
        )
    ):
        raise _err(path, "rope scaling factor without valid low/high frequency factors and original length")
    if h.weight_type != QT.F32:
        block = GGML_QUANT_SIZES[h.weight_type][0]
        bad = sorted({c for c in (h.dim, h.n_heads * head_dim, h.ff_dim) if c % block})
        if bad:
            raise _err(path, f"{h.weight_type.name} needs row lengths divisible by {block}, got {bad}")
    expected = header_size + sum(e.nbytes for e in tensor_entries(h))
    if expected != file_size:
        diff = file_size - expected
        what = f"{-diff} bytes missing: truncated" if diff < 0 else f"{diff} extra bytes"
        raise _err(path, f"sizes do not add up: its header implies {expected} bytes, the file has "
                         f"{file_size} ({what}, or the header does not match the weights)")  # fmt: skip
    return h


def tensor_entries(h: OriginalHeader) -> list[Entry]:
    """Every tensor of the file in file order, as the original's loadLlmNetWeight walks it."""
    wt, f32 = h.weight_type, QT.F32
    q_dim, kv_dim, ff = h.n_heads * h.head_dim, h.n_kv_heads * h.head_dim, h.ff_dim
    out: list[Entry] = []
    pos = h.header_size

    def add(key, shape, qtype):
        nonlocal pos
        n = _nbytes(shape, qtype)
        out.append(Entry(key, pos, shape, qtype, n))
        pos += n

    add(("embd",), (h.vocab_size, h.dim), f32)
    for i in range(h.n_layers):
        add((i, "q"), (q_dim, h.dim), wt)
        add((i, "k"), (kv_dim, h.dim), wt)
        add((i, "v"), (kv_dim, h.dim), wt)
        add((i, "o"), (h.dim, q_dim), wt)
        if h.n_experts > 0:
            add((i, "router"), (h.n_experts, h.dim), f32)
            for e in range(h.n_experts):
                add((i, "w1", e), (ff, h.dim), wt)
                add((i, "w2", e), (h.dim, ff), wt)
                add((i, "w3", e), (ff, h.dim), wt)
        else:
            add((i, "w1"), (ff, h.dim), wt)
            add((i, "w2"), (h.dim, ff), wt)
            add((i, "w3"), (ff, h.dim), wt)
        if h.arch in ("qwen3", "qwen3moe"):
            add((i, "q_norm"), (h.head_dim,), f32)
            add((i, "k_norm"), (h.head_dim,), f32)
        add((i, "att_norm"), (h.dim,), f32)
        add((i, "ffn_norm"), (h.dim,), f32)
    add(("final_norm",), (h.dim,), f32)
    add(("head",), (h.vocab_size, h.dim), wt)
    return out


def llama3_rope_factors(h: OriginalHeader) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` (per frequency divisor), computed the way its HF converter does; the
    original applies the same Llama 3.1 scaling to every frequency when the scaling factor is not 1."""
    return llama3_rope_divisors(h.rope_theta, h.head_dim, h.rope_scaling_factor, h.rope_scaling_low_freq_factor,
                                h.rope_scaling_high_freq_factor, h.rope_scaling_orig_max_seq_len)  # fmt: skip


def _gguf_shape_info(shape: tuple[int, ...], qtype: QT) -> tuple[tuple[int, ...], np.dtype, int]:
    nbytes = _nbytes(shape, qtype)
    if qtype == QT.F32:
        return shape, np.dtype(np.float32), nbytes
    if qtype == QT.F16:
        return shape, np.dtype(np.float16), nbytes
    block, size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8), nbytes


def _raw(mm: np.memmap, e: Entry) -> np.ndarray:
    """The tensor's bytes viewed in its natural numpy form: floats (rows first) or block bytes per row."""
    b = mm[e.offset : e.offset + e.nbytes]
    if e.qtype == QT.F32:
        return b.view(np.float32).reshape(e.shape)
    if e.qtype == QT.F16:
        return b.view(np.float16).reshape(e.shape)
    return b.reshape(_gguf_shape_info(e.shape, e.qtype)[0])


def _retype(data: np.ndarray, src: QT, dst: QT, shape: tuple[int, ...]) -> np.ndarray:
    if src == dst:
        return np.ascontiguousarray(data)
    if src == QT.F32:
        f = np.asarray(data, dtype=np.float32)
    elif src == QT.F16:
        f = np.asarray(data).astype(np.float32)
    else:
        f = dequantize(np.asarray(data), src).astype(np.float32)
    f = f.reshape(shape)
    if dst == QT.F32:
        return f
    if dst == QT.F16:
        return f.astype(np.float16)
    return quantize(f, dst)


@dataclass
class _Out:
    name: str
    shape: tuple[int, ...]
    qtype: QT
    parts: list  # callables returning arrays, concatenated along axis 0 (expert stacks)


def _plan(h: OriginalHeader, mm: np.memmap, target: QT | None) -> list[_Out]:
    entries = {e.key: e for e in tensor_entries(h)}
    interleave = h.arch == "llama" and h.rope_type == ROPE_FALCON  # stored unpermuted: make it interleaved

    def out_type(e: Entry) -> QT:
        if target is None or len(e.shape) < 2:
            return e.qtype
        block = GGML_QUANT_SIZES[target][0]
        return target if e.shape[-1] % block == 0 else QT.F32

    def reader(e: Entry, dst: QT, permute_heads: int = 0):
        def get():
            a = _raw(mm, e)
            if permute_heads:
                a = permute(a, permute_heads)
            return _retype(a, e.qtype, dst, e.shape)

        return get

    outs: list[_Out] = []

    def single(name: str, key: tuple, permute_heads: int = 0):
        e = entries[key]
        dst = out_type(e)
        outs.append(_Out(name, e.shape, dst, [reader(e, dst, permute_heads)]))

    single("token_embd.weight", ("embd",))
    if h.arch == "llama" and h.rope_scaling_factor != 1:
        factors = llama3_rope_factors(h)
        outs.append(_Out("rope_freqs.weight", factors.shape, QT.F32, [lambda: factors]))
    for i in range(h.n_layers):
        p = f"blk.{i}."
        single(p + "attn_norm.weight", (i, "att_norm"))
        single(p + "attn_q.weight", (i, "q"), h.n_heads if interleave else 0)
        single(p + "attn_k.weight", (i, "k"), h.n_kv_heads if interleave else 0)
        single(p + "attn_v.weight", (i, "v"))
        single(p + "attn_output.weight", (i, "o"))
        if h.arch in ("qwen3", "qwen3moe"):
            single(p + "attn_q_norm.weight", (i, "q_norm"))
            single(p + "attn_k_norm.weight", (i, "k_norm"))
        single(p + "ffn_norm.weight", (i, "ffn_norm"))
        if h.n_experts > 0:
            single(p + "ffn_gate_inp.weight", (i, "router"))
            for name, w in (("ffn_gate_exps", "w1"), ("ffn_down_exps", "w2"), ("ffn_up_exps", "w3")):
                es = [entries[(i, w, x)] for x in range(h.n_experts)]
                dst = out_type(es[0])
                outs.append(_Out(p + name + ".weight", (h.n_experts, *es[0].shape), dst,
                                 [reader(e, dst) for e in es]))  # fmt: skip
        else:
            single(p + "ffn_gate.weight", (i, "w1"))
            single(p + "ffn_down.weight", (i, "w2"))
            single(p + "ffn_up.weight", (i, "w3"))
    single("output_norm.weight", ("final_norm",))
    single("output.weight", ("head",))
    return outs


def _add_model_metadata(w: GGUFWriter, h: OriginalHeader, name: str, file_type: LlamaFileType) -> None:
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(2)
    w.add_block_count(h.n_layers)
    w.add_context_length(h.max_seq_len)
    w.add_embedding_length(h.dim)
    w.add_feed_forward_length(h.hidden_dim)
    w.add_head_count(h.n_heads)
    w.add_head_count_kv(h.n_kv_heads)
    w.add_rope_dimension_count(h.head_dim)
    w.add_rope_freq_base(h.rope_theta)
    w.add_layer_norm_rms_eps(h.norm_eps)
    w.add_vocab_size(h.vocab_size)
    if h.arch != "llama" or h.head_dim != h.dim // h.n_heads:
        w.add_key_length(h.head_dim)
        w.add_value_length(h.head_dim)
    if h.n_experts > 0:
        w.add_expert_count(h.n_experts)
        w.add_expert_used_count(h.n_active_experts)
        if h.arch == "qwen3moe":
            w.add_expert_feed_forward_length(h.moe_hidden_dim)


def convert_original(
    m_path: str | os.PathLike,
    out_path: str | os.PathLike,
    target: str | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict:
    """Write a GGUF (architecture llama, qwen3 or qwen3moe) from a `.m` model and optional `.t` tokenizer.

    Weights keep their own type unless `target` (q40, q41, q80, f16, f32) asks for another. The output
    appears atomically. Returns {"tensors", "bytes", "arch"}.
    """
    m_path, out_path = os.fspath(m_path), os.fspath(out_path)
    if target is not None and target not in TARGETS:
        raise DllamaError(f"unknown --type {target!r} (choose from {', '.join(TARGETS)})")
    if os.path.abspath(m_path) == os.path.abspath(out_path):
        raise DllamaError("output file must differ from the input file")
    if not os.path.exists(m_path):
        raise DllamaError(f"model file not found: {m_path}")
    h = read_header(m_path)
    tok = read_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    if tok is not None and len(tok.tokens) > h.vocab_size:
        raise DllamaError(f"tokenizer {tokenizer_path} has {len(tok.tokens)} tokens but the model only "
                          f"{h.vocab_size} embedding rows: they do not belong together")  # fmt: skip
    dst = TARGETS[target] if target else None
    mm = np.memmap(m_path, dtype=np.uint8, mode="r")
    outs = _plan(h, mm, dst)
    main_type = dst or h.weight_type
    name = Path(m_path).stem
    if name.startswith("dllama_model_"):
        name = name[len("dllama_model_") :]

    tmp = out_path + ".tmp"
    w = GGUFWriter(tmp, h.arch)
    try:
        _add_model_metadata(w, h, name, _FILE_TYPES[main_type])
        if tok is not None:
            add_tokenizer_metadata(w, tok, h.vocab_size)
        for o in outs:
            shape, dtype, nbytes = _gguf_shape_info(o.shape, o.qtype)
            w.add_tensor_info(o.name, shape, dtype, nbytes, raw_dtype=o.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for k, o in enumerate(outs):
            arrays = [get() for get in o.parts]
            w.write_tensor_data(arrays[0] if len(arrays) == 1 else np.stack(arrays))
            if progress and (k + 1) % 50 == 0:
                print(f"[convert] {k + 1}/{len(outs)} tensors", file=sys.stderr, flush=True)
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        w.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        del mm
    return {"tensors": len(outs), "bytes": os.path.getsize(out_path), "arch": h.arch}


def _stat_key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def converted_path(m_path: str | os.PathLike, t_path: str | os.PathLike | None) -> Path:
    """Where ensure_gguf_from_original caches the GGUF of this `.m` (+ `.t`) pair."""
    key = _stat_key(os.fspath(m_path)) + "|" + (_stat_key(os.fspath(t_path)) if t_path else "-")
    key += f"|{_FORMAT_VERSION}"
    root = os.environ.get("DLLAMA_CACHE_DIR") or Path.home() / ".cache" / "dllama"
    return Path(root) / "converted" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.gguf"


def ensure_gguf_from_original(
    m_path: str | os.PathLike, t_path: str | os.PathLike | None = None, log=None
) -> str:
    """Path of a GGUF converted from the original's files: converted once (one line printed), then reused."""
    m_path = os.fspath(m_path)
    for p in (m_path, t_path):
        if p is not None and not os.path.exists(p):
            raise DllamaError(f"file not found: {os.fspath(p)}")
    out = converted_path(m_path, t_path)
    if out.exists():
        return str(out)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"converting {m_path} (Distributed Llama format) to GGUF once, cached at {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # a private temporary name per process: several processes may convert the same pair at once
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.gguf")
    try:
        convert_original(m_path, tmp, tokenizer_path=t_path)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return str(out)
