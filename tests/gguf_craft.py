"""Hostile GGUF files for the loader: byte-level lies (counts and lengths far past the end of the file, unknown
types, truncations) and well-formed files with bad contents (0 layers, strings for numbers, NaN norms, missing
tensors, no tokenizer, ...). Written with a small GGUF serializer of our own so any field can lie; the valid base
is a tiny synthetic model read back with gguf-py.

`crafted_files(directory)` writes them all and returns {case name: path}."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType

from dllama.testing.synthetic import SHAPES, write_synthetic_gguf

V = GGUFValueType
_SCALAR = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}  # fmt: skip


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def encode_value(vtype: int, value, etype: int | None = None) -> bytes:
    if vtype == V.STRING:
        return _str(value)
    if vtype == V.ARRAY:
        return struct.pack("<IQ", etype, len(value)) + b"".join(encode_value(etype, v) for v in value)
    return struct.pack(_SCALAR[V(vtype)], value)


class Gguf:
    """An editable GGUF: kvs = {key: (type, value, element type)}, tensors = {name: (dims, type, raw bytes)}."""

    def __init__(self, kvs: dict, tensors: dict):
        self.kvs, self.tensors = kvs, tensors

    @classmethod
    def read(cls, path: str) -> Gguf:
        r = GGUFReader(path)
        kvs = {}
        for key, f in r.fields.items():
            if key.startswith("GGUF."):
                continue
            t = f.types[0]
            kvs[key] = (t, f.contents(), f.types[1] if t == V.ARRAY else None)
        tensors = {t.name: ([int(d) for d in t.shape], int(t.tensor_type), np.asarray(t.data).tobytes())
                   for t in r.tensors}  # fmt: skip
        return cls(kvs, tensors)

    def copy(self) -> Gguf:
        return Gguf(dict(self.kvs), dict(self.tensors))

    def arch(self, key: str) -> str:
        return f"{self.kvs['general.architecture'][1]}.{key}"

    def to_bytes(self, *, version: int = 3, n_tensors: int | None = None, n_kv: int | None = None,
                 raw_kv: bytes = b"", raw_tensor_info: bytes = b"") -> bytes:  # fmt: skip
        align = 32
        out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(self.tensors) if n_tensors is None else n_tensors,
                                              len(self.kvs) + bool(raw_kv) if n_kv is None else n_kv))  # fmt: skip
        for key, (t, v, et) in self.kvs.items():
            out += _str(key) + struct.pack("<I", t) + encode_value(t, v, et)
        out += raw_kv
        offset, blobs = 0, []
        for name, (dims, qtype, raw) in self.tensors.items():
            out += _str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            out += struct.pack("<IQ", qtype, offset)
            pad = -len(raw) % align
            blobs.append(raw + b"\0" * pad)
            offset += len(raw) + pad
        out += raw_tensor_info
        out += b"\0" * (-len(out) % align)
        return bytes(out) + b"".join(blobs)


def _f32_tensor(values) -> tuple[list[int], int, bytes]:
    a = np.asarray(values, dtype=np.float32)
    return [a.size], 0, a.tobytes()


def cases(base: Gguf) -> dict[str, bytes]:
    """{name: file bytes}."""
    out: dict[str, bytes] = {}
    good = base.to_bytes()

    # ---- byte level: lies about sizes, unknown types, truncations ----
    out["empty"] = b""
    out["magic-only"] = b"GGUF"
    out["version-99"] = base.to_bytes(version=99)
    out["version-1"] = base.to_bytes(version=1)
    out["tensor-count-2^60"] = base.to_bytes(n_tensors=1 << 60)
    out["kv-count-2^62"] = base.to_bytes(n_kv=1 << 62)
    small = Gguf({"general.architecture": (V.STRING, "llama", None)}, {})
    out["array-2^40-u8-in-7kb"] = small.to_bytes(raw_kv=_str("x") + struct.pack("<IIQ", V.ARRAY, V.UINT8, 1 << 40)
                                                 + b"\0" * 7000)  # fmt: skip
    out["array-2^40-strings"] = small.to_bytes(raw_kv=_str("x") + struct.pack("<IIQ", V.ARRAY, V.STRING, 1 << 40)
                                               + _str("a") * 500)  # fmt: skip
    out["array-2^40-arrays"] = small.to_bytes(raw_kv=_str("x") + struct.pack("<IIQ", V.ARRAY, V.ARRAY, 1 << 40)
                                              + b"\0" * 7000)  # fmt: skip
    out["string-2^62"] = small.to_bytes(raw_kv=_str("x") + struct.pack("<IQ", V.STRING, 1 << 62) + b"a" * 100)
    out["key-2^40"] = small.to_bytes(raw_kv=struct.pack("<Q", 1 << 40) + b"k" * 100)
    out["unknown-value-type"] = small.to_bytes(raw_kv=_str("x") + struct.pack("<I", 77) + b"\0" * 64)
    out["unknown-array-type"] = small.to_bytes(raw_kv=_str("x") + struct.pack("<IIQ", V.ARRAY, 55, 4) + b"\0" * 64)
    nested = struct.pack("<I", V.ARRAY) + b"".join(struct.pack("<IQ", V.ARRAY, 1) for _ in range(40))
    out["arrays-nested-40-deep"] = small.to_bytes(raw_kv=_str("x") + nested + struct.pack("<IQ", V.UINT8, 0))

    def with_tensor(name, dims, qtype, offset, data=b"\0" * 64):
        g = small.copy()
        info = _str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        info += struct.pack("<IQ", qtype, offset)
        return g.to_bytes(n_tensors=1, raw_tensor_info=info) + data

    out["tensor-100-dims"] = with_tensor("t", [1] * 100, 0, 0)
    out["tensor-dim-0"] = with_tensor("t", [0, 4], 0, 0)
    out["tensor-dim-2^62"] = with_tensor("t", [1 << 62, 1 << 62], 0, 0)
    out["tensor-unknown-type"] = with_tensor("t", [32], 999, 0)
    out["tensor-offset-past-eof"] = with_tensor("t", [16], 0, 1 << 50)
    out["tensor-offset-unaligned"] = with_tensor("t", [4], 0, 3)
    out["tensor-ends-past-eof"] = with_tensor("t", [1 << 20], 0, 0)
    g = base.copy()
    g.kvs["general.alignment"] = (V.UINT32, 3, None)
    out["alignment-3"] = g.to_bytes()
    for frac in (0.0001, 0.01, 0.3, 0.999):
        out[f"truncated-at-{frac}"] = good[: int(len(good) * frac)]
    out["truncated-last-byte"] = good[:-1]

    # ---- well-formed files with bad contents ----
    def edit(name: str, key: str | None = None, value=None, vtype=None, drop=(), tensors=None):
        g = base.copy()
        if key is not None:
            k = g.arch(key) if not key.startswith(("general.", "tokenizer.")) else key
            if value is None:
                g.kvs.pop(k, None)
            else:
                g.kvs[k] = (vtype, value, None)
        for d in drop:
            for k in [k for k in g.kvs if k.startswith(d)]:
                del g.kvs[k]
            g.tensors.pop(d, None)
        g.tensors.update(tensors or {})
        out[name] = g.to_bytes()

    edit("zero-layers", "block_count", 0, V.UINT32)
    edit("layers-2^31", "block_count", 1 << 31, V.UINT32)
    edit("zero-kv-heads", "attention.head_count_kv", 0, V.UINT32)
    edit("zero-heads", "attention.head_count", 0, V.UINT32)
    edit("heads-not-multiple-of-kv", "attention.head_count_kv", 3, V.UINT32)
    edit("zero-dim", "embedding_length", 0, V.UINT32)
    edit("string-for-layers", "block_count", "2", V.STRING)
    edit("float-for-layers", "block_count", 2.5, V.FLOAT32)
    edit("bool-for-heads", "attention.head_count", True, V.BOOL)
    edit("string-for-rope-base", "rope.freq_base", "10000", V.STRING)
    edit("no-block-count", "block_count")
    edit("rope-base-zero", "rope.freq_base", 0.0, V.FLOAT32)
    edit("rope-base-negative", "rope.freq_base", -10000.0, V.FLOAT32)
    edit("rope-base-nan", "rope.freq_base", float("nan"), V.FLOAT32)
    edit("rope-base-inf", "rope.freq_base", float("inf"), V.FLOAT32)
    edit("norm-eps-zero", "attention.layer_norm_rms_epsilon", 0.0, V.FLOAT32)
    edit("norm-eps-negative", "attention.layer_norm_rms_epsilon", -1e-5, V.FLOAT32)
    edit("norm-eps-nan", "attention.layer_norm_rms_epsilon", float("nan"), V.FLOAT32)
    edit("context-2^40", "context_length", 1 << 40, V.UINT64)
    edit("context-zero", "context_length", 0, V.UINT32)
    edit("head-dim-odd", "attention.key_length", 31, V.UINT32)
    edit("no-architecture", "general.architecture")
    edit("unknown-architecture", "general.architecture", "gpt-j-9000", V.STRING)
    edit("number-for-architecture", "general.architecture", 7, V.UINT32)
    edit("no-tokenizer", drop=("tokenizer.",))
    edit("no-token-list", "tokenizer.ggml.tokens")
    edit("unknown-tokenizer-model", "tokenizer.ggml.model", "sentencepiece-9", V.STRING)
    edit("bos-id-huge", "tokenizer.ggml.bos_token_id", 10**9, V.UINT32)
    edit("eos-id-huge", "tokenizer.ggml.eos_token_id", 1 << 31, V.UINT32)
    edit("bos-id-string", "tokenizer.ggml.bos_token_id", "1", V.STRING)
    edit("chat-template-number", "tokenizer.chat_template", 5, V.UINT32)
    g = base.copy()
    g.kvs["tokenizer.ggml.tokens"] = (V.ARRAY, list(range(len(base.kvs["tokenizer.ggml.tokens"][1]))), V.UINT32)
    out["token-list-of-numbers"] = g.to_bytes()
    g = base.copy()
    g.kvs["tokenizer.ggml.token_type"] = (V.ARRAY, [1, 2, 3], V.INT32)
    out["token-types-too-short"] = g.to_bytes()
    edit("no-output-norm", drop=("output_norm.weight",))
    edit("no-token-embd", drop=("token_embd.weight",))
    edit("no-layer-1-ffn", drop=("blk.1.ffn_down.weight",))
    head_dim = base.kvs[base.arch("embedding_length")][1] // base.kvs[base.arch("attention.head_count")][1]
    edit("rope-freqs-wrong-length", tensors={"rope_freqs.weight": _f32_tensor(np.ones(head_dim // 2 + 3))})
    edit("rope-freqs-nan", tensors={"rope_freqs.weight": _f32_tensor([np.nan] * (head_dim // 2))})
    edit("rope-freqs-zero", tensors={"rope_freqs.weight": _f32_tensor(np.zeros(head_dim // 2))})
    edit("extra-tensor", tensors={"blk.0.mystery.weight": _f32_tensor(np.ones(8))})
    dims, qt, raw = base.tensors["output_norm.weight"]
    edit("wrong-shape-output-norm", tensors={"output_norm.weight": ([dims[0] * 2], qt, raw + raw)})
    for name, val in (("nan", np.nan), ("inf", np.inf)):
        dims, qt, raw = base.tensors["blk.0.attn_norm.weight"]
        a = np.frombuffer(raw, dtype=np.float32).copy()
        a[len(a) // 2] = val
        edit(f"{name}-in-attn-norm", tensors={"blk.0.attn_norm.weight": (dims, qt, a.tobytes())})
    dims, qt, raw = base.tensors["output_norm.weight"]
    a = np.frombuffer(raw, dtype=np.float32).copy()
    a[0] = np.nan
    edit("nan-in-output-norm", tensors={"output_norm.weight": (dims, qt, a.tobytes())})
    dims, qt, raw = base.tensors["blk.0.attn_q.weight"]
    g = base.copy()
    g.tensors["blk.0.attn_q.weight"] = ([dims[0], dims[1] * 2], qt, raw)  # claims twice the bytes written
    out["tensor-overlaps-next"] = g.to_bytes()
    return out


def base_model(directory: Path) -> Gguf:
    path = write_synthetic_gguf(str(directory / "base.gguf"), **SHAPES["tiny"], weight_type="f32", seed=1)
    return Gguf.read(path)


def crafted_files(directory: Path) -> dict[str, str]:
    base = base_model(directory)
    paths = {}
    for name, data in cases(base).items():
        p = directory / f"{name}.gguf"
        p.write_bytes(data)
        paths[name] = str(p)
    paths["valid"] = str(directory / "valid.gguf")
    Path(paths["valid"]).write_bytes(base.to_bytes())
    return paths
