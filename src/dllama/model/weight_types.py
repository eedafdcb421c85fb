"""The one registry of weight types: block size, bytes per block, and whether the engine computes it natively.

Block layouts come from gguf-py (`GGML_QUANT_SIZES`), never re-derived. A type that is not native (Q5_x, K-quants,
BF16, ...) is converted once at load: matrices to Q8_0, vectors to F32. Splits read `block` from here, so a column
split is aligned to the type's block by construction."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from dllama.errors import DllamaError

NATIVE = (QT.F32, QT.F16, QT.Q4_0, QT.Q4_1, QT.Q8_0)
QUANTIZED = (QT.Q4_0, QT.Q4_1, QT.Q8_0)  # activations feeding these are quantized to Q8_0


@dataclass(frozen=True)
class WeightType:
    qtype: QT
    block: int  # elements per block
    block_bytes: int

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def native(self) -> bool:
        return self.qtype in NATIVE

    @property
    def quantized(self) -> bool:
        return self.qtype in QUANTIZED

    def row_bytes(self, cols: int) -> int:
        if cols % self.block:
            raise DllamaError(f"a {self.name} row of {cols} elements is not a whole number of {self.block}-blocks")
        return cols // self.block * self.block_bytes


@functools.lru_cache(maxsize=64)  # on the per-token path (embedding rows): an enum lookup per call adds up
def weight_type(qtype: int) -> WeightType:
    try:
        q = QT(int(qtype))
        block, size = GGML_QUANT_SIZES[q]
    except (ValueError, KeyError):
        raise DllamaError(f"unknown GGML weight type {qtype}") from None
    return WeightType(q, block, size)


def row_bytes(qtype: int, cols: int) -> int:
    return weight_type(qtype).row_bytes(cols)


def split_unit(*qtypes: int, minimum: int = 32) -> int:
    """Smallest column-split step that keeps every given type's blocks whole (and the 8-row repack groups)."""
    unit = minimum
    for q in qtypes:
        unit = math.lcm(unit, weight_type(q).block)
    return unit
