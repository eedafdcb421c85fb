"""`dllama convert`: write a GGUF whose weight matrices are in one chosen type (done once, when asked)."""

from __future__ import annotations

import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize

from dllama.errors import DllamaError

TARGETS = {"q40": QT.Q4_0, "q41": QT.Q4_1, "q80": QT.Q8_0, "f16": QT.F16, "f32": QT.F32}
FILE_TYPES = {
    QT.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    QT.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    QT.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    QT.F16: LlamaFileType.MOSTLY_F16,
    QT.F32: LlamaFileType.ALL_F32,
}
_SKIP_KEYS = ("GGUF.", "general.file_type", "general.quantization_version")


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter) -> None:
    for key, field in reader.fields.items():
        if key.startswith(_SKIP_KEYS) or key == "general.architecture":
            continue
        vtype = GGUFValueType(field.types[0])
        sub = (
            GGUFValueType(field.types[-1]) if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        )
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _to_type(data: np.ndarray, src: QT, dst: QT, shape: tuple[int, int]) -> np.ndarray:
    if src == dst:
        return np.asarray(data)
    f = np.asarray(data).view(np.float32) if src == QT.F32 else dequantize(np.asarray(data), src)
    f = f.astype(np.float32).reshape(shape)
    if dst == QT.F32:
        return f
    if dst == QT.F16:
        return f.astype(np.float16)
    return quantize(f, dst)


def convert(src: str, dst: str, target: str) -> dict:
    if target not in TARGETS:
        raise DllamaError(f"unknown --type {target!r} (choose from {', '.join(TARGETS)})")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise DllamaError("output file must differ from the input file")
    if not os.path.exists(src):
        raise DllamaError(f"model file not found: {src}")
    dtype = TARGETS[target]
    try:
        reader = GGUFReader(src, "r")
    except Exception as e:  # noqa: BLE001
        raise DllamaError(f"cannot read GGUF file {src}: {e}") from None
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch)
    _copy_metadata(reader, writer)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_quantization_version(2)
    plans = []
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # numpy order: rows first
        src_type = QT(int(t.tensor_type))
        # matrices take the target type; vectors (norms, rope factors) stay F32
        out_type = dtype if len(shape) == 2 and shape[-1] % 32 == 0 else QT.F32
        plans.append((t, shape, src_type, out_type))
        writer.add_tensor_info(t.name, *_info(shape, out_type), raw_dtype=out_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # imported here, not at the top: every CLI start imports this module for its choices (tqdm costs ~20 ms)
    from tqdm import tqdm

    for t, shape, src_type, out_type in tqdm(
        plans, desc=f"converting to {target}", unit="tensor", file=sys.stderr
    ):
        writer.write_tensor_data(_to_type(t.data, src_type, out_type, shape))
    writer.close()
    return {"tensors": len(plans), "bytes": os.path.getsize(dst)}


def _info(shape: tuple[int, ...], qtype: QT) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as GGUFWriter wants it, dtype, nbytes): quantized tensors are described by their byte shape."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    nbytes = int(np.prod(shape)) // block * size
    if qtype == QT.F32:
        return shape, np.dtype(np.float32), nbytes
    if qtype == QT.F16:
        return shape, np.dtype(np.float16), nbytes
    return (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8), nbytes
