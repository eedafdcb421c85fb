"""A GGUF model file, memory-mapped: config + weight views, checked against its architecture's description.

Weights of a native type (F32, F16, Q4_0, Q4_1, Q8_0) are used in place from the memory map; any other type
(Q5_x, K-quants, BF16, ...) is converted once at load to Q8_0 (matrices) or F32 (vectors), which keeps the model's
quality, and one line says so. Nothing is ever re-quantized to 4 bits behind the user's back. Every tensor in the
file must be one the architecture uses: a tensor we would silently ignore (e.g. attention biases in a `llama`
file) is refused. A model split into `-0000i-of-0000n.gguf` parts loads as one."""

from __future__ import annotations

import mmap
import os
import sys
from collections import Counter
from functools import cached_property

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize

from dllama.arch import OUTPUT, OUTPUT_NORM, ROPE_FREQS, TOKEN_EMBD, TensorSpec, architecture
from dllama.engine import _kernels
from dllama.errors import DllamaError
from dllama.model.config import ModelConfig
from dllama.model.gguf_check import check_layout, check_small_tensors_finite, check_tokenizer_metadata
from dllama.model.gguf_file import GGUFFile
from dllama.model.parts import split_parts
from dllama.model.tensor_view import TensorView
from dllama.model.weight_types import NATIVE, row_bytes


def _open(path: str) -> GGUFFile:
    if not os.path.exists(path):
        raise DllamaError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise DllamaError(f"model path is a directory, not a GGUF file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise DllamaError(f"not a GGUF file (bad magic {magic!r}): {path}")
    f = GGUFFile(path)  # the header walk: every count and length checked against the file size
    check_layout(f)  # what the walk does not see: tensors overlapping each other
    check_tokenizer_metadata(f)  # types and id ranges, before the tokenizer indexes with them
    return f


class GGUFModel:
    """Config + weight views of one GGUF model (one file or all parts of a split one)."""

    def __init__(self, path: str, *, verbose: bool = True):
        self.path = os.path.abspath(path)
        self.parts = split_parts(self.path)
        self.files = [_open(p) for p in self.parts]
        self.file_size = sum(f.size for f in self.files)
        self.metadata = self.files[0].metadata()
        self.arch = architecture(self.metadata.get("general.architecture"))
        self.tensors: dict[str, TensorView] = {}
        converted: Counter = Counter()
        for f in self.files:
            for t in f.tensors:
                if t.name in self.tensors:
                    raise DllamaError(f"tensor '{t.name}' appears twice in {self.path}")
                self.tensors[t.name] = self._view(t, converted)
        if converted and verbose:
            kinds = ", ".join(f"{n} x {k}" for k, n in sorted(converted.items()))
            print(f"note: converted at load to a native type: {kinds}", file=sys.stderr)
        self.converted = dict(converted)
        self.config = self._config()
        self.specs: list[TensorSpec] = self.arch.layer_tensors(self.config)
        self._check_tensors()

    @cached_property
    def reader(self) -> GGUFReader:
        """gguf-py's full reader of the first part, made only when asked (the tokenizer's one-time conversion)."""
        return GGUFReader(self.parts[0], "r")

    @staticmethod
    def _view(t, converted: Counter) -> TensorView:
        qtype = QT(int(t.type))
        cols = t.shape[0]  # GGUF order: ne0 (columns) first
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        if qtype in NATIVE and not (rows == 1 and qtype != QT.F32):
            return TensorView(t.data, 0, int(qtype), rows, cols, row_bytes(qtype, cols))
        # not computed natively: vectors become F32, matrices Q8_0 (never fewer bits than the source)
        raw = np.asarray(t.data).reshape(rows, -1)
        try:
            if qtype in (QT.F16, QT.F32, QT.F64):
                raw = raw.view({QT.F16: np.float16, QT.F32: np.float32, QT.F64: np.float64}[qtype])
            f = dequantize(raw, qtype).astype(np.float32).reshape(rows, cols)
        except NotImplementedError:
            raise DllamaError(f"tensor '{t.name}' has type {qtype.name}, which cannot be converted") from None
        if rows == 1 or cols % 32:
            converted[f"{qtype.name}->F32"] += 1
            return TensorView.packed(f, QT.F32, rows, cols)
        q = np.empty(rows * row_bytes(QT.Q8_0, cols), dtype=np.uint8)
        _kernels.quantize_q80(np.ascontiguousarray(f).reshape(-1), q)
        converted[f"{qtype.name}->Q8_0"] += 1
        return TensorView.packed(q, QT.Q8_0, rows, cols)

    def _config(self) -> ModelConfig:
        emb = self.tensors.get(TOKEN_EMBD)
        if emb is None:
            raise DllamaError(f"model has no {TOKEN_EMBD} tensor")
        ff = self.tensors.get(ROPE_FREQS)
        freqs = ff.to_float()[0] if ff is not None else None
        return self.arch.config(self.metadata, emb.rows, OUTPUT.name not in self.tensors, freqs)

    def _check_tensors(self) -> None:
        cfg = self.config
        expect: dict[str, tuple[int, int]] = {
            TOKEN_EMBD: (cfg.vocab_size, cfg.dim), OUTPUT_NORM.name: OUTPUT_NORM.shape(cfg),
        }  # fmt: skip
        if not cfg.tied_output:
            expect[OUTPUT.name] = OUTPUT.shape(cfg)
        if ROPE_FREQS in self.tensors:
            expect[ROPE_FREQS] = (1, cfg.head_dim // 2)
        for layer in range(cfg.n_layers):
            for spec in self.specs:
                rows, cols = spec.shape(cfg)
                expect[f"blk.{layer}.{spec.name}"] = (rows * (cfg.n_experts if spec.experts else 1), cols)
        for key, shape in expect.items():
            t = self.tensors.get(key)
            if t is None:
                raise DllamaError(f"model lacks tensor '{key}' (unsupported variant of the {cfg.arch} architecture?)")
            if (t.rows, t.cols) != shape:
                raise DllamaError(f"tensor '{key}' has shape {(t.rows, t.cols)}, expected {shape}")
        unused = sorted(set(self.tensors) - set(expect))
        if unused:
            more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
            raise DllamaError(
                f"model has tensors the {cfg.arch} architecture does not use: {', '.join(unused[:3])}{more} "
                "(a variant dllama does not support; running without them would give wrong output)"
            )
        for spec in (s for s in self.specs if s.vector):
            for layer in range(cfg.n_layers):
                if self.layer(layer, spec.name).type != QT.F32:
                    raise DllamaError(f"tensor 'blk.{layer}.{spec.name}' must be F32")
        check_small_tensors_finite(self.tensors)

    def release(self, v: TensorView, evict: bool = True) -> None:
        """Drop the file pages under view `v` from this process (the node does not read them again: a worker's
        slice that was shipped, a tensor the engine copied) and, with `evict`, from the page cache too, so a
        memory-limited cgroup is not charged for them. The mapping stays valid."""
        for f, part in zip(self.files, self.parts, strict=True):
            mm = f.data
            start = v.base.ctypes.data + v.offset - mm.ctypes.data
            if not 0 <= start < mm.nbytes:
                continue
            length = (v.rows - 1) * v.stride + v.row_bytes if v.rows else 0
            page = mmap.PAGESIZE
            lo, hi = start // page * page, min(mm.nbytes, -(-(start + length) // page) * page)
            raw = getattr(mm, "_mmap", None)
            if raw is not None and hi > lo:
                raw.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            if evict and hi > lo:
                fd = os.open(part, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            return

    # ---- accessors ----
    def layer(self, layer: int, name: str) -> TensorView:
        """Tensor `name` of block `layer` ("attn_q.weight"; a bare "attn_q" means its weight)."""
        return self.tensors[f"blk.{layer}.{name if '.' in name else name + '.weight'}"]

    @property
    def embedding(self) -> TensorView:
        return self.tensors[TOKEN_EMBD]

    @property
    def output(self) -> TensorView:
        return self.tensors.get(OUTPUT.name, self.embedding)

    @property
    def output_norm(self) -> TensorView:
        return self.tensors[OUTPUT_NORM.name]

    def embed(self, ids) -> np.ndarray:
        return self.embedding.dequantize_rows(ids)

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights read for one decoded token (everything but the embedding table; all experts)."""
        n = sum(t.nbytes for k, t in self.tensors.items() if k.startswith("blk."))
        return n + self.output.nbytes + self.output_norm.nbytes
